//! The proxying logic of one connected client/backend pair, as a plain state
//! machine: it takes completion events and says which operations to submit.
//! It knows nothing about rings or sockets, so every path (half-close, back
//! pressure, buffer starvation, errors) is unit-tested without I/O.
//!
//! Contract with the driver:
//! - Every `Op::ArmRecv`, `Op::Send` and `Op::Shutdown` the machine emits gets
//!   exactly one terminal completion fed back through the matching `on_*`
//!   method (a multishot recv: every CQE, the last without `more`).
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

/// A provided buffer's id in the worker's buffer ring.
pub type BufId = u16;

/// What the driver must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Arm a multishot receive on this side's socket.
    ArmRecv(Side),
    /// Cancel the multishot receive on this side (back pressure).
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
    /// Give the buffer back to the ring.
    Release(BufId),
    /// An error: shut both sockets down so that pending operations end.
    Abort,
    /// Nothing is in flight any more: close both sockets.
    Close,
}

/// Chunks queued in one direction before its receive is paused. Together
/// with the one in flight this bounds the buffers one connection can hold.
pub const QUEUE_HIGH_WATER: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    /// Not armed (waiting for the queue to drain, or not started).
    Idle,
    Armed,
    /// Cancel requested; CQEs may still arrive until the terminal one.
    Cancelling,
    /// Ended with ENOBUFS: waits for the driver to report free buffers.
    Starved,
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
            queue: VecDeque::with_capacity(QUEUE_HIGH_WATER + 2),
            sending: false,
            shutdown_in_flight: false,
            finished: false,
            bytes: 0,
        }
    }

    fn in_flight(&self) -> bool {
        self.sending || self.shutdown_in_flight || matches!(self.recv, Recv::Armed | Recv::Cancelling)
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
            self.arm(side, out);
        }
    }

    /// Bytes received so far from `source` (and queued or sent on).
    pub fn bytes_from(&self, source: Side) -> u64 {
        self.dirs[source as usize].bytes
    }

    /// Whether this side's receive ended for lack of buffers.
    pub fn is_starved(&self, source: Side) -> bool {
        self.dirs[source as usize].recv == Recv::Starved
    }

    /// A receive completion from `source`: `res` bytes into `buf` (res > 0),
    /// EOF (0) or -errno; `more` is false on the multishot's last CQE.
    pub fn on_recv(&mut self, source: Side, res: i32, buf: Option<BufId>, more: bool, out: &mut Vec<Op>) {
        let dir = &mut self.dirs[source as usize];
        if let (Some(buf), true) = (buf, res <= 0) {
            // A failed receive may still have taken a buffer: give it back.
            out.push(Op::Release(buf));
        }
        if res > 0 {
            let Some(buf) = buf else {
                // The kernel always names the buffer for a positive result.
                self.abort(out);
                return;
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
            }
        }
        if !more {
            let failed = res < 0 && res != -libc::ENOBUFS && res != -libc::ECANCELED;
            self.dirs[source as usize].recv = match res {
                0 => Recv::Eof,
                r if r == -libc::ENOBUFS => Recv::Starved,
                _ => Recv::Idle,
            };
            if failed || (res == 0 && self.fast_close[source as usize]) {
                self.abort(out);
                return self.maybe_close(out);
            }
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

    /// The driver has buffers again: re-arm a receive that starved.
    pub fn on_buffers(&mut self, source: Side, out: &mut Vec<Op>) {
        if !self.aborting && self.dirs[source as usize].recv == Recv::Starved {
            self.dirs[source as usize].recv = Recv::Idle;
            self.pump(source, out);
        }
    }

    /// Tear the connection down (an error, or the balancer stopping).
    pub fn abort(&mut self, out: &mut Vec<Op>) {
        if self.aborting || self.closed {
            return;
        }
        self.aborting = true;
        out.push(Op::Abort);
        for source in [Side::Client, Side::Backend] {
            let dir = &mut self.dirs[source as usize];
            if dir.recv == Recv::Armed {
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
        self.maybe_close(out);
    }

    /// Moves one direction forward: send the next chunk, pause or resume
    /// the receive, pass EOF on once everything before it went out.
    fn pump(&mut self, source: Side, out: &mut Vec<Op>) {
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
        match dir.recv {
            Recv::Armed if dir.queue.len() >= QUEUE_HIGH_WATER => {
                dir.recv = Recv::Cancelling;
                out.push(Op::CancelRecv(source));
            }
            // Resume only once drained, so a slow reader costs one re-arm
            // per drained queue, not one per chunk.
            Recv::Idle if dir.queue.is_empty() => self.arm(source, out),
            Recv::Eof if dir.queue.is_empty() && !dir.shutdown_in_flight && !dir.finished => {
                dir.shutdown_in_flight = true;
                out.push(Op::Shutdown(source.peer()));
            }
            _ => {}
        }
    }

    fn arm(&mut self, source: Side, out: &mut Vec<Op>) {
        self.dirs[source as usize].recv = Recv::Armed;
        out.push(Op::ArmRecv(source));
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

    fn started() -> (Proxy, Vec<Op>) {
        let mut p = Proxy::new(false, false);
        let mut out = Vec::new();
        p.start(&mut out);
        assert_eq!(out, vec![Op::ArmRecv(Client), Op::ArmRecv(Backend)]);
        out.clear();
        (p, out)
    }

    #[test]
    fn forwards_a_chunk_and_releases_its_buffer_after_the_send() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 100, Some(7), true, &mut out);
        assert_eq!(
            out,
            vec![Op::Send {
                to: Backend,
                buf: 7,
                offset: 0,
                len: 100
            }]
        );
        out.clear();
        p.on_send(Backend, 100, &mut out);
        assert_eq!(out, vec![Op::Release(7)]);
        assert_eq!(p.bytes_from(Client), 100);
    }

    #[test]
    fn one_send_in_flight_per_direction_in_order() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 10, Some(1), true, &mut out);
        p.on_recv(Client, 20, Some(2), true, &mut out);
        assert_eq!(
            out,
            vec![Op::Send {
                to: Backend,
                buf: 1,
                offset: 0,
                len: 10
            }]
        );
        out.clear();
        p.on_send(Backend, 10, &mut out);
        assert_eq!(
            out,
            vec![
                Op::Release(1),
                Op::Send {
                    to: Backend,
                    buf: 2,
                    offset: 0,
                    len: 20
                }
            ]
        );
    }

    #[test]
    fn a_short_send_resends_the_rest_of_the_same_buffer() {
        let (mut p, mut out) = started();
        p.on_recv(Backend, 1000, Some(3), true, &mut out);
        out.clear();
        p.on_send(Client, 400, &mut out);
        assert_eq!(
            out,
            vec![Op::Send {
                to: Client,
                buf: 3,
                offset: 400,
                len: 600
            }]
        );
    }

    #[test]
    fn eof_becomes_shutdown_after_the_queue_drains_and_both_eofs_close() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 5, Some(1), true, &mut out);
        p.on_recv(Client, 0, None, false, &mut out);
        assert_eq!(
            out,
            vec![Op::Send {
                to: Backend,
                buf: 1,
                offset: 0,
                len: 5
            }]
        );
        out.clear();
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
            vec![
                Op::Send {
                    to: Client,
                    buf: 4,
                    offset: 0,
                    len: 9
                },
                Op::Release(4),
                Op::Shutdown(Client)
            ]
        );
        out.clear();
        p.on_shutdown(Client, 0, &mut out);
        assert_eq!(out, vec![Op::Close]);
        assert!(p.is_closed());
    }

    #[test]
    fn a_full_queue_pauses_the_receive_and_a_drained_one_resumes_it() {
        let (mut p, mut out) = started();
        for buf in 0..QUEUE_HIGH_WATER as u16 {
            p.on_recv(Client, 1, Some(buf), true, &mut out);
        }
        assert_eq!(out.last(), Some(&Op::CancelRecv(Client)));
        out.clear();
        // A chunk already on its way still arrives, then the cancel ends it.
        p.on_recv(Client, 1, Some(99), true, &mut out);
        p.on_recv(Client, -libc::ECANCELED, None, false, &mut out);
        assert!(out.is_empty());
        for _ in 0..QUEUE_HIGH_WATER {
            p.on_send(Backend, 1, &mut out);
        }
        assert!(
            !out.contains(&Op::ArmRecv(Client)),
            "not before the queue is empty"
        );
        out.clear();
        p.on_send(Backend, 1, &mut out);
        assert_eq!(out, vec![Op::Release(99), Op::ArmRecv(Client)]);
    }

    #[test]
    fn enobufs_waits_for_buffers_then_rearms() {
        let (mut p, mut out) = started();
        p.on_recv(Backend, -libc::ENOBUFS, None, false, &mut out);
        assert!(out.is_empty());
        assert!(p.is_starved(Backend));
        p.on_buffers(Backend, &mut out);
        assert_eq!(out, vec![Op::ArmRecv(Backend)]);
    }

    #[test]
    fn a_multishot_that_ends_by_itself_is_rearmed() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 3, Some(1), false, &mut out);
        out.clear();
        p.on_send(Backend, 3, &mut out);
        assert_eq!(out, vec![Op::Release(1), Op::ArmRecv(Client)]);
    }

    #[test]
    fn a_reset_aborts_releases_everything_and_closes_when_idle() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 10, Some(1), true, &mut out);
        p.on_recv(Client, 10, Some(2), true, &mut out);
        out.clear();
        p.on_recv(Backend, -libc::ECONNRESET, None, false, &mut out);
        assert_eq!(out, vec![Op::Abort, Op::CancelRecv(Client), Op::Release(2)]);
        out.clear();
        p.on_recv(Client, 0, None, false, &mut out);
        assert!(out.is_empty(), "the send of buffer 1 is still in flight");
        p.on_send(Backend, -libc::EPIPE, &mut out);
        assert_eq!(out, vec![Op::Release(1), Op::Close]);
    }

    #[test]
    fn data_arriving_while_aborting_goes_straight_back() {
        let (mut p, mut out) = started();
        p.abort(&mut out);
        out.clear();
        p.on_recv(Client, 10, Some(5), true, &mut out);
        assert_eq!(out, vec![Op::Release(5)]);
    }

    #[test]
    fn fast_close_turns_that_sides_eof_into_a_close() {
        let mut p = Proxy::new(false, true);
        let mut out = Vec::new();
        p.start(&mut out);
        out.clear();
        p.on_recv(Client, 0, None, false, &mut out);
        assert!(!out.contains(&Op::Abort), "a client EOF is still a half-close");
        out.clear();
        p.on_recv(Backend, 0, None, false, &mut out);
        assert_eq!(out[0], Op::Abort);
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
}
