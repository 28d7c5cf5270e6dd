//! The proxying logic of one connected client/backend pair, as a plain state
//! machine: it takes completion events and says which operations to submit.
//! It knows nothing about rings or sockets, so every path (half-close, back
//! pressure, a dry buffer ring, errors) is unit-tested without I/O.
//!
//! Each direction has at most one receive armed. While nothing waits to be
//! sent it is a multishot receive (no re-arm per message, the cheap path for
//! request/response traffic); once a chunk has to wait behind a send in
//! flight the multishot is cancelled and the direction receives one chunk at
//! a time, only while fewer than [`MAX_QUEUED`] chunks wait. So a direction
//! holds at most `MAX_QUEUED` buffers plus what one multishot burst took
//! before its cancel landed, however slowly its peer reads.
//!
//! Contract with the driver:
//! - Every `Op::Recv`, `Op::Send` and `Op::Shutdown` the machine emits gets
//!   exactly one terminal completion fed back through the matching `on_*`
//!   method (a multishot receive: every CQE, the last without `more`).
//! - A buffer named in `on_recv` belongs to the machine until it emits
//!   `Op::Release` for it; `Op::Send` sends `len` bytes at `offset` of it.
//! - `Op::Close` comes once, when nothing is in flight: then the driver closes
//!   both sockets and forgets the connection.

use std::collections::VecDeque;

/// One end of the proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Backend = 1,
}

impl Side {
    pub fn peer(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }
}

/// A receive buffer's id: the worker's buffer ring, or one of its spares.
pub type BufId = u32;

/// What the driver must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Receive from this side.
    Recv { from: Side, mode: RecvMode },
    /// Cancel the multishot receive on this side (back pressure, abort).
    CancelRecv(Side),
    /// Send bytes `offset..offset + len` of buffer `buf` to this side.
    Send {
        to: Side,
        buf: BufId,
        offset: u32,
        len: u32,
    },
    /// `shutdown(SHUT_WR)` this side: its peer sent EOF and all was forwarded.
    Shutdown(Side),
    /// Give the buffer back.
    Release(BufId),
    /// An error: shut both sockets down so that pending operations end.
    Abort,
    /// Nothing is in flight any more: close both sockets.
    Close,
}

/// How a receive takes its buffer, and how long it stays armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvMode {
    /// Buffers from the ring, a completion per chunk, until cancelled.
    Multishot,
    /// One chunk into a buffer from the ring.
    Once,
    /// One chunk into a spare buffer: the ring ran dry on the last try.
    Spare,
}

/// Chunks one direction may hold: one being sent while the next arrives.
pub const MAX_QUEUED: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    /// Not armed (the queue is full, or not started).
    Idle,
    Armed {
        multishot: bool,
    },
    /// Cancel requested; completions may still arrive until the terminal one.
    Cancelling,
    /// The source sent EOF.
    Eof,
}

#[derive(Debug, Clone, Copy)]
struct Chunk {
    buf: BufId,
    offset: u32,
    len: u32,
}

/// One direction: bytes received from `source` go out to its peer.
#[derive(Debug)]
struct Direction {
    recv: Recv,
    /// The last receive found the buffer ring empty.
    ring_dry: bool,
    /// A multishot was cancelled for back pressure: receive one chunk at a
    /// time until the queue has drained.
    throttled: bool,
    queue: VecDeque<Chunk>,
    sending: bool,
    shutdown_in_flight: bool,
    finished: bool,
    bytes: u64,
}

impl Direction {
    fn new() -> Self {
        Direction {
            recv: Recv::Idle,
            ring_dry: false,
            throttled: false,
            queue: VecDeque::with_capacity(MAX_QUEUED),
            sending: false,
            shutdown_in_flight: false,
            finished: false,
            bytes: 0,
        }
    }

    fn in_flight(&self) -> bool {
        self.sending || self.shutdown_in_flight || matches!(self.recv, Recv::Armed { .. } | Recv::Cancelling)
    }
}

/// The state of one proxied connection.
#[derive(Debug)]
pub struct Proxy {
    /// Indexed by the source side: `dirs[Client]` carries client → backend.
    dirs: [Direction; 2],
    /// `tcp_fastclose`, indexed by the side whose EOF closes everything.
    fast_close: [bool; 2],
    aborting: bool,
    closed: bool,
}

impl Proxy {
    /// `close_on_client_eof` / `close_on_backend_eof`: Pen's `tcp_fastclose`
    /// (down / up): that side's EOF closes both sides at once instead of
    /// being passed on as a half-close.
    pub fn new(close_on_client_eof: bool, close_on_backend_eof: bool) -> Self {
        Proxy {
            dirs: [Direction::new(), Direction::new()],
            fast_close: [close_on_client_eof, close_on_backend_eof],
            aborting: false,
            closed: false,
        }
    }

    /// The backend connect completed: start receiving on both sides.
    pub fn start(&mut self, out: &mut Vec<Op>) {
        for side in [Side::Client, Side::Backend] {
            self.pump(side, out);
        }
    }

    /// Bytes received so far from `source` (and queued or sent on).
    pub fn bytes_from(&self, source: Side) -> u64 {
        self.dirs[source as usize].bytes
    }

    /// A receive completion from `source`: `res` bytes into `buf` (res > 0),
    /// EOF (0) or -errno (`-ENOBUFS`: the buffer ring was empty); `more`:
    /// a multishot receive stays armed after this one.
    pub fn on_recv(&mut self, source: Side, res: i32, buf: Option<BufId>, more: bool, out: &mut Vec<Op>) {
        let dir = &mut self.dirs[source as usize];
        if !more {
            dir.recv = Recv::Idle;
        }
        if let (Some(buf), true) = (buf, res <= 0) {
            // A failed receive may still have taken a buffer: give it back.
            out.push(Op::Release(buf));
        }
        match res {
            1.. => {
                let Some(buf) = buf else {
                    // The kernel always names the buffer for a positive result.
                    return self.abort(out);
                };
                if self.aborting {
                    out.push(Op::Release(buf));
                } else {
                    dir.bytes += res as u64;
                    dir.queue.push_back(Chunk {
                        buf,
                        offset: 0,
                        len: res as u32,
                    });
                    if dir.recv == (Recv::Armed { multishot: true }) && dir.queue.len() >= MAX_QUEUED {
                        dir.recv = Recv::Cancelling;
                        dir.throttled = true;
                        out.push(Op::CancelRecv(source));
                    }
                }
            }
            // With `tcp_fastclose` this side's EOF closes both sides, but
            // only once what came before it has been passed on (`pump`).
            0 => dir.recv = Recv::Eof,
            e if e == -libc::ENOBUFS => dir.ring_dry = true,
            e if e == -libc::ECANCELED => {}
            _ => return self.abort(out),
        }
        if self.aborting {
            return self.maybe_close(out);
        }
        self.pump(source, out);
        self.maybe_close(out);
    }

    /// A send completion towards `to`: `res` bytes written or -errno.
    pub fn on_send(&mut self, to: Side, res: i32, out: &mut Vec<Op>) {
        let source = to.peer();
        let dir = &mut self.dirs[source as usize];
        dir.sending = false;
        if res <= 0 || self.aborting {
            // 0 bytes written to a stream socket means it can take no more.
            if !self.aborting {
                self.abort(out);
            }
            return self.maybe_close(out);
        }
        let head = dir
            .queue
            .front_mut()
            .expect("a send completed with nothing queued");
        let sent = (res as u32).min(head.len);
        head.offset += sent;
        head.len -= sent;
        if head.len == 0 {
            out.push(Op::Release(head.buf));
            dir.queue.pop_front();
        }
        self.pump(source, out);
        self.maybe_close(out);
    }

    /// The `shutdown(SHUT_WR)` of side `side` completed.
    pub fn on_shutdown(&mut self, side: Side, _res: i32, out: &mut Vec<Op>) {
        // An error here (the peer already reset) changes nothing: the
        // direction is over either way.
        let dir = &mut self.dirs[side.peer() as usize];
        dir.shutdown_in_flight = false;
        dir.finished = true;
        self.maybe_close(out);
    }

    /// Tear the connection down (an error, or the balancer stopping).
    /// Called again while aborting, it only closes if nothing is in flight
    /// any more: the completion that calls it may have been the last one.
    pub fn abort(&mut self, out: &mut Vec<Op>) {
        if !self.aborting && !self.closed {
            self.aborting = true;
            out.push(Op::Abort);
            for source in [Side::Client, Side::Backend] {
                let dir = &mut self.dirs[source as usize];
                if matches!(dir.recv, Recv::Armed { .. }) {
                    dir.recv = Recv::Cancelling;
                    out.push(Op::CancelRecv(source));
                }
                // The chunk being sent stays until its completion.
                let keep = usize::from(dir.sending);
                while dir.queue.len() > keep {
                    let chunk = dir.queue.pop_back().expect("length checked");
                    out.push(Op::Release(chunk.buf));
                }
            }
        }
        self.maybe_close(out);
    }

    /// Moves one direction forward: send the next chunk, receive again
    /// while there is room, pass EOF on once everything before it went out
    /// (under `tcp_fastclose`, close both sides then).
    fn pump(&mut self, source: Side, out: &mut Vec<Op>) {
        let fast_close = self.fast_close[source as usize];
        let dir = &mut self.dirs[source as usize];
        if !dir.sending {
            if let Some(chunk) = dir.queue.front() {
                dir.sending = true;
                out.push(Op::Send {
                    to: source.peer(),
                    buf: chunk.buf,
                    offset: chunk.offset,
                    len: chunk.len,
                });
            }
        }
        if dir.queue.is_empty() {
            dir.throttled = false;
        }
        match dir.recv {
            Recv::Idle if dir.queue.len() < MAX_QUEUED => {
                let mode = if std::mem::take(&mut dir.ring_dry) {
                    RecvMode::Spare
                } else if dir.throttled {
                    RecvMode::Once
                } else {
                    RecvMode::Multishot
                };
                dir.recv = Recv::Armed {
                    multishot: mode == RecvMode::Multishot,
                };
                out.push(Op::Recv { from: source, mode });
            }
            Recv::Eof if dir.queue.is_empty() && !dir.shutdown_in_flight && !dir.finished => {
                if fast_close {
                    return self.abort(out);
                }
                dir.shutdown_in_flight = true;
                out.push(Op::Shutdown(source.peer()));
            }
            _ => {}
        }
    }

    fn maybe_close(&mut self, out: &mut Vec<Op>) {
        if self.closed || self.dirs.iter().any(Direction::in_flight) {
            return;
        }
        let done = self.aborting || self.dirs.iter().all(|d| d.finished);
        if done {
            self.closed = true;
            for dir in &mut self.dirs {
                while let Some(chunk) = dir.queue.pop_front() {
                    out.push(Op::Release(chunk.buf));
                }
            }
            out.push(Op::Close);
        }
    }

    /// True once `Op::Close` was emitted.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Side::*;

    fn recv(from: Side, mode: RecvMode) -> Op {
        Op::Recv { from, mode }
    }

    fn multishot(from: Side) -> Op {
        recv(from, RecvMode::Multishot)
    }

    fn send(to: Side, buf: BufId, offset: u32, len: u32) -> Op {
        Op::Send { to, buf, offset, len }
    }

    fn started() -> (Proxy, Vec<Op>) {
        started_with(Proxy::new(false, false))
    }

    /// `p` after its connect completed, both receives armed.
    fn started_with(mut p: Proxy) -> (Proxy, Vec<Op>) {
        let mut out = Vec::new();
        p.start(&mut out);
        assert_eq!(out, vec![multishot(Client), multishot(Backend)]);
        out.clear();
        (p, out)
    }

    #[test]
    fn forwards_a_chunk_and_releases_its_buffer_after_the_send() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 100, Some(7), true, &mut out);
        assert_eq!(out, vec![send(Backend, 7, 0, 100)]);
        out.clear();
        p.on_send(Backend, 100, &mut out);
        assert_eq!(out, vec![Op::Release(7)]);
        assert_eq!(p.bytes_from(Client), 100);
    }

    #[test]
    fn a_chunk_waiting_behind_a_send_cancels_the_multishot_and_resumes_one_chunk_at_a_time() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 10, Some(1), true, &mut out);
        out.clear();
        p.on_recv(Client, 20, Some(2), true, &mut out);
        assert_eq!(out, vec![Op::CancelRecv(Client)]);
        out.clear();
        // Chunks already taken before the cancel landed still arrive, in order.
        p.on_recv(Client, 30, Some(3), true, &mut out);
        p.on_recv(Client, -libc::ECANCELED, None, false, &mut out);
        assert!(out.is_empty());
        p.on_send(Backend, 10, &mut out);
        assert_eq!(out, vec![Op::Release(1), send(Backend, 2, 0, 20)]);
        out.clear();
        p.on_send(Backend, 20, &mut out);
        assert_eq!(
            out,
            vec![
                Op::Release(2),
                send(Backend, 3, 0, 30),
                recv(Client, RecvMode::Once)
            ]
        );
        out.clear();
        p.on_recv(Client, 40, Some(4), false, &mut out);
        assert!(out.is_empty(), "two chunks wait: no receive");
        p.on_send(Backend, 30, &mut out);
        assert_eq!(
            out,
            vec![
                Op::Release(3),
                send(Backend, 4, 0, 40),
                recv(Client, RecvMode::Once)
            ]
        );
        out.clear();
        p.on_send(Backend, 40, &mut out);
        assert_eq!(out, vec![Op::Release(4)], "the receive in flight stays");
        out.clear();
        p.on_recv(Client, -libc::EAGAIN, None, false, &mut out);
        assert_eq!(out[0], Op::Abort, "a failed receive aborts");
    }

    #[test]
    fn a_drained_queue_goes_back_to_multishot() {
        let (mut p, mut out) = started();
        p.on_recv(Backend, 5, Some(1), true, &mut out);
        p.on_recv(Backend, 5, Some(2), true, &mut out);
        p.on_recv(Backend, -libc::ECANCELED, None, false, &mut out);
        p.on_send(Client, 5, &mut out);
        p.on_send(Client, 5, &mut out);
        out.clear();
        // The single receive armed while buffer 2 waited completes after
        // the queue drained: the next one is a multishot again.
        p.on_recv(Backend, 7, Some(3), false, &mut out);
        assert_eq!(out, vec![send(Client, 3, 0, 7), multishot(Backend)]);
    }

    #[test]
    fn a_short_send_resends_the_rest_of_the_same_buffer() {
        let (mut p, mut out) = started();
        p.on_recv(Backend, 1000, Some(3), true, &mut out);
        out.clear();
        p.on_send(Client, 400, &mut out);
        assert_eq!(out, vec![send(Client, 3, 400, 600)]);
    }

    #[test]
    fn a_reader_that_never_reads_stops_the_receives() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 1, Some(0), true, &mut out);
        p.on_recv(Client, 1, Some(1), true, &mut out);
        p.on_recv(Client, -libc::ECANCELED, None, false, &mut out);
        assert!(!out.iter().any(|op| matches!(op, Op::Recv { .. })), "{out:?}");
    }

    #[test]
    fn eof_becomes_shutdown_after_the_queue_drains_and_both_eofs_close() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 5, Some(1), true, &mut out);
        out.clear();
        p.on_recv(Client, 0, None, false, &mut out);
        assert!(out.is_empty(), "the send of buffer 1 is still in flight");
        p.on_send(Backend, 5, &mut out);
        assert_eq!(out, vec![Op::Release(1), Op::Shutdown(Backend)]);
        out.clear();
        p.on_shutdown(Backend, 0, &mut out);
        assert!(
            out.is_empty(),
            "the backend may still answer after the client's EOF"
        );
        // The backend answers, then closes: nothing may be lost.
        p.on_recv(Backend, 9, Some(4), true, &mut out);
        p.on_recv(Backend, 0, None, false, &mut out);
        p.on_send(Client, 9, &mut out);
        assert_eq!(
            out,
            vec![send(Client, 4, 0, 9), Op::Release(4), Op::Shutdown(Client)]
        );
        out.clear();
        p.on_shutdown(Client, 0, &mut out);
        assert_eq!(out, vec![Op::Close]);
        assert!(p.is_closed());
    }

    #[test]
    fn a_dry_ring_asks_for_a_spare_buffer_once() {
        let (mut p, mut out) = started();
        p.on_recv(Backend, -libc::ENOBUFS, None, false, &mut out);
        assert_eq!(out, vec![recv(Backend, RecvMode::Spare)]);
        out.clear();
        p.on_recv(Backend, 8, Some(300), false, &mut out);
        assert_eq!(out, vec![send(Client, 300, 0, 8), multishot(Backend)]);
    }

    #[test]
    fn a_reset_aborts_releases_everything_and_closes_when_idle() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 10, Some(1), true, &mut out);
        p.on_recv(Client, 10, Some(2), true, &mut out);
        p.on_recv(Client, -libc::ECANCELED, None, false, &mut out);
        out.clear();
        p.on_recv(Backend, -libc::ECONNRESET, None, false, &mut out);
        assert_eq!(out, vec![Op::Abort, Op::Release(2)]);
        out.clear();
        p.on_send(Backend, -libc::EPIPE, &mut out);
        assert_eq!(out, vec![Op::Release(1), Op::Close]);
    }

    #[test]
    fn data_arriving_while_aborting_goes_straight_back() {
        let (mut p, mut out) = started();
        p.abort(&mut out);
        assert_eq!(
            out,
            vec![Op::Abort, Op::CancelRecv(Client), Op::CancelRecv(Backend)]
        );
        out.clear();
        p.on_recv(Client, 10, Some(5), false, &mut out);
        assert_eq!(out, vec![Op::Release(5)]);
        out.clear();
        p.on_recv(Backend, -libc::ECANCELED, None, false, &mut out);
        assert_eq!(out, vec![Op::Close]);
    }

    #[test]
    fn fast_close_turns_that_sides_eof_into_a_close() {
        let (mut p, mut out) = started_with(Proxy::new(false, true));
        p.on_recv(Client, 0, None, false, &mut out);
        assert!(!out.contains(&Op::Abort), "a client EOF is still a half-close");
        out.clear();
        p.on_recv(Backend, 0, None, false, &mut out);
        assert_eq!(out[0], Op::Abort);
    }

    #[test]
    fn fast_close_passes_on_what_came_before_the_eof_first() {
        let (mut p, mut out) = started_with(Proxy::new(false, true));
        // The backend's last response and its EOF arrive together.
        p.on_recv(Backend, 2000, Some(4), true, &mut out);
        p.on_recv(Backend, 0, None, false, &mut out);
        assert_eq!(out, vec![send(Client, 4, 0, 2000)], "no abort before it is sent");
        out.clear();
        p.on_send(Client, 1500, &mut out);
        assert_eq!(out, vec![send(Client, 4, 1500, 500)]);
        out.clear();
        p.on_send(Client, 500, &mut out);
        assert_eq!(out[..2], [Op::Release(4), Op::Abort]);
    }

    #[test]
    fn a_failed_send_aborts() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 10, Some(1), true, &mut out);
        out.clear();
        p.on_send(Backend, -libc::EPIPE, &mut out);
        assert_eq!(out[0], Op::Abort);
        p.on_recv(Client, -libc::ECANCELED, None, false, &mut out);
        p.on_recv(Backend, -libc::ECANCELED, None, false, &mut out);
        assert_eq!(out.last(), Some(&Op::Close));
        assert!(out.contains(&Op::Release(1)));
    }

    /// A model of the kernel and the driver around one machine, checking
    /// the contract on every operation: one receive per side and one send
    /// per direction at a time, sends carrying exactly the next bytes of
    /// their stream, shutdowns only after everything before the EOF went
    /// out, every buffer released exactly once, and `Close` once, when
    /// nothing is in flight.
    struct Sim {
        proxy: Proxy,
        recv: [Option<RecvMode>; 2],
        cancelled: [bool; 2],
        /// By destination side: (buffer, offset, len).
        sending: [Option<(BufId, u32, u32)>; 2],
        shutting: [bool; 2],
        /// Buffer → (source side, stream offset of its first byte, length).
        held: std::collections::HashMap<BufId, (Side, u64, u32)>,
        next_buf: BufId,
        /// By source side.
        produced: [u64; 2],
        delivered: [u64; 2],
        eof: [bool; 2],
        aborted: bool,
        closed: bool,
    }

    impl Sim {
        fn new(fast_close: [bool; 2]) -> Sim {
            let mut sim = Sim {
                proxy: Proxy::new(fast_close[0], fast_close[1]),
                recv: [None; 2],
                cancelled: [false; 2],
                sending: [None; 2],
                shutting: [false; 2],
                held: Default::default(),
                next_buf: 0,
                produced: [0; 2],
                delivered: [0; 2],
                eof: [false; 2],
                aborted: false,
                closed: false,
            };
            let mut out = Vec::new();
            sim.proxy.start(&mut out);
            sim.apply(out);
            sim
        }

        fn apply(&mut self, ops: Vec<Op>) {
            for op in ops {
                assert!(!self.closed, "{op:?} after Close");
                match op {
                    Op::Recv { from, mode } => {
                        let side = from as usize;
                        assert!(self.recv[side].is_none(), "a second receive on {from:?}");
                        self.recv[side] = Some(mode);
                        self.cancelled[side] = false;
                    }
                    Op::CancelRecv(side) => {
                        assert!(
                            self.recv[side as usize].is_some(),
                            "cancel of no receive on {side:?}"
                        );
                        self.cancelled[side as usize] = true;
                    }
                    Op::Send { to, buf, offset, len } => {
                        assert!(self.sending[to as usize].is_none(), "a second send to {to:?}");
                        let &(source, start, chunk) =
                            self.held.get(&buf).expect("a send from a buffer not held");
                        assert_eq!(source, to.peer(), "buffer {buf} sent the wrong way");
                        assert!(len > 0 && offset + len <= chunk, "send outside its chunk");
                        assert_eq!(
                            start + u64::from(offset),
                            self.delivered[source as usize],
                            "bytes out of order"
                        );
                        self.sending[to as usize] = Some((buf, offset, len));
                    }
                    Op::Shutdown(side) => {
                        let source = side.peer() as usize;
                        assert!(!self.shutting[side as usize], "a second shutdown of {side:?}");
                        assert!(self.eof[source], "shutdown of {side:?} before its peer's EOF");
                        assert_eq!(
                            self.delivered[source], self.produced[source],
                            "shutdown before all data went out"
                        );
                        self.shutting[side as usize] = true;
                    }
                    Op::Release(buf) => {
                        assert!(
                            self.held.remove(&buf).is_some(),
                            "buffer {buf} released twice or never held"
                        );
                    }
                    Op::Abort => {
                        assert!(!self.aborted, "a second Abort");
                        self.aborted = true;
                    }
                    Op::Close => {
                        assert!(
                            self.recv == [None, None]
                                && self.sending == [None, None]
                                && self.shutting == [false, false],
                            "Close with operations in flight"
                        );
                        self.closed = true;
                    }
                }
            }
        }

        /// One completion for the receive on `side`; `more_data`: whether
        /// the peer may still send.
        fn complete_recv(&mut self, side: Side, pick: usize, more_data: bool) {
            let mode = self.recv[side as usize].expect("a receive is armed");
            let multishot = mode == RecvMode::Multishot && !self.cancelled[side as usize];
            let (res, buf, more) = match pick % 20 {
                _ if self.cancelled[side as usize] && pick % 2 == 0 => (-libc::ECANCELED, None, false),
                0..=15 if more_data && !self.eof[side as usize] && !self.aborted => {
                    let len = 1 + (pick % 70_000) as u32;
                    let buf = self.next_buf;
                    self.next_buf += 1;
                    self.held.insert(buf, (side, self.produced[side as usize], len));
                    self.produced[side as usize] += u64::from(len);
                    (len as i32, Some(buf), multishot && pick % 4 != 0)
                }
                16 if mode != RecvMode::Spare && more_data => (-libc::ENOBUFS, None, false),
                17 if more_data && pick % 3 == 0 => (-libc::ECONNRESET, None, false),
                _ => {
                    self.eof[side as usize] = true;
                    (0, None, false)
                }
            };
            if !more {
                self.recv[side as usize] = None;
            }
            let mut out = Vec::new();
            self.proxy.on_recv(side, res, buf, more, &mut out);
            self.apply(out);
        }

        fn complete_send(&mut self, to: Side, pick: usize) {
            let (_, _, len) = self.sending[to as usize].take().expect("a send is in flight");
            let res = match pick % 6 {
                0 if len > 1 => (len / 2) as i32,
                1 if self.aborted || pick % 7 == 1 => -libc::EPIPE,
                _ => len as i32,
            };
            if res > 0 {
                self.delivered[to.peer() as usize] += res as u64;
            }
            let mut out = Vec::new();
            self.proxy.on_send(to, res, &mut out);
            self.apply(out);
        }

        fn complete_shutdown(&mut self, side: Side) {
            self.shutting[side as usize] = false;
            let mut out = Vec::new();
            self.proxy.on_shutdown(side, 0, &mut out);
            self.apply(out);
        }

        /// Completes one operation in flight, chosen by `pick`; false if
        /// none is.
        fn step(&mut self, pick: usize, more_data: bool) -> bool {
            let mut pending = Vec::new();
            for side in [Side::Client, Side::Backend] {
                if self.recv[side as usize].is_some() {
                    pending.push((0, side));
                }
                if self.sending[side as usize].is_some() {
                    pending.push((1, side));
                }
                if self.shutting[side as usize] {
                    pending.push((2, side));
                }
            }
            if pending.is_empty() {
                return false;
            }
            match pending[pick % pending.len()] {
                (0, side) => self.complete_recv(side, pick / 7, more_data),
                (1, side) => self.complete_send(side, pick / 7),
                (_, side) => self.complete_shutdown(side),
            }
            true
        }
    }

    #[test]
    fn random_event_orders_keep_the_contract_and_always_end_in_close() {
        let mut rng = crate::test_rng::TestRng::new(0x9E37_79B9_7F4A_7C15);
        let mut next = move || (rng.next_u64() >> 11) as usize;
        for run in 0..3000 {
            let mut sim = Sim::new([run % 11 == 1, run % 13 == 2]);
            let busy = 1 + next() % 200;
            for step in 0.. {
                if sim.closed {
                    break;
                }
                // Now and then the worker tears the connection down itself
                // (`close N`, idle timeout).
                if step < busy && next() % 499 == 0 {
                    let mut out = Vec::new();
                    sim.proxy.abort(&mut out);
                    sim.apply(out);
                    continue;
                }
                // After `busy` steps the peers only finish: EOFs, sends
                // completing, cancels landing.
                let progressed = sim.step(next(), step < busy);
                assert!(progressed, "run {run}: nothing in flight and no Close");
                assert!(step < 10_000, "run {run}: no Close after 10,000 completions");
            }
            assert!(
                sim.held.is_empty(),
                "run {run}: buffers never released: {:?}",
                sim.held
            );
            if !sim.aborted {
                assert_eq!(sim.delivered, sim.produced, "run {run}: bytes lost");
            }
        }
    }
}
