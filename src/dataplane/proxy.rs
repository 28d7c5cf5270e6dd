//! The proxying logic of one connected client/backend pair, as a plain state
//! machine: it takes completion events and says which operations to submit.
//! It knows nothing about rings or sockets, so every path (half-close, back
//! pressure, a dry buffer ring, errors) is unit-tested without I/O.
//!
//! Each direction has at most one receive armed and at most [`MAX_QUEUED`]
//! chunks held, so a connection never holds more than `2 * MAX_QUEUED`
//! buffers however slowly its peers read: back pressure is simply not
//! re-arming the receive.
//!
//! Contract with the driver:
//! - Every `Op::Recv`, `Op::Send` and `Op::Shutdown` the machine emits gets
//!   exactly one completion fed back through the matching `on_*` method.
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
    /// Receive once from this side. `spare`: the buffer ring ran dry on the
    /// last try, so receive into a buffer lent from outside the ring.
    Recv { from: Side, spare: bool },
    /// Cancel the receive on this side (only when aborting).
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

/// Chunks one direction may hold: one being sent while the next arrives.
pub const MAX_QUEUED: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    /// Not armed (the queue is full, or not started).
    Idle,
    Armed,
    /// Cancel requested while aborting; the completion is still owed.
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
            queue: VecDeque::with_capacity(MAX_QUEUED),
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
            self.pump(side, out);
        }
    }

    /// Bytes received so far from `source` (and queued or sent on).
    pub fn bytes_from(&self, source: Side) -> u64 {
        self.dirs[source as usize].bytes
    }

    /// A receive completion from `source`: `res` bytes into `buf` (res > 0),
    /// EOF (0) or -errno (`-ENOBUFS`: the buffer ring was empty).
    pub fn on_recv(&mut self, source: Side, res: i32, buf: Option<BufId>, out: &mut Vec<Op>) {
        let dir = &mut self.dirs[source as usize];
        dir.recv = Recv::Idle;
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
                }
            }
            0 => {
                dir.recv = Recv::Eof;
                if self.fast_close[source as usize] {
                    return self.abort(out);
                }
            }
            e if e == -libc::ENOBUFS => dir.ring_dry = true,
            e if e == -libc::ECANCELED && self.aborting => {}
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

    /// Moves one direction forward: send the next chunk, receive again
    /// while there is room, pass EOF on once everything before it went out.
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
            Recv::Idle if dir.queue.len() < MAX_QUEUED => {
                dir.recv = Recv::Armed;
                out.push(Op::Recv {
                    from: source,
                    spare: std::mem::take(&mut dir.ring_dry),
                });
            }
            Recv::Eof if dir.queue.is_empty() && !dir.shutdown_in_flight && !dir.finished => {
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

    fn recv(from: Side) -> Op {
        Op::Recv { from, spare: false }
    }

    fn send(to: Side, buf: BufId, offset: u32, len: u32) -> Op {
        Op::Send { to, buf, offset, len }
    }

    fn started() -> (Proxy, Vec<Op>) {
        let mut p = Proxy::new(false, false);
        let mut out = Vec::new();
        p.start(&mut out);
        assert_eq!(out, vec![recv(Client), recv(Backend)]);
        out.clear();
        (p, out)
    }

    #[test]
    fn forwards_a_chunk_receives_again_and_releases_the_buffer_after_the_send() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 100, Some(7), &mut out);
        assert_eq!(out, vec![send(Backend, 7, 0, 100), recv(Client)]);
        out.clear();
        p.on_send(Backend, 100, &mut out);
        assert_eq!(out, vec![Op::Release(7)]);
        assert_eq!(p.bytes_from(Client), 100);
    }

    #[test]
    fn one_send_in_flight_per_direction_in_order() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 10, Some(1), &mut out);
        out.clear();
        p.on_recv(Client, 20, Some(2), &mut out);
        assert!(out.is_empty(), "the queue is full: no send, no receive");
        p.on_send(Backend, 10, &mut out);
        assert_eq!(out, vec![Op::Release(1), send(Backend, 2, 0, 20), recv(Client)]);
    }

    #[test]
    fn a_short_send_resends_the_rest_of_the_same_buffer() {
        let (mut p, mut out) = started();
        p.on_recv(Backend, 1000, Some(3), &mut out);
        out.clear();
        p.on_send(Client, 400, &mut out);
        assert_eq!(out, vec![send(Client, 3, 400, 600)]);
    }

    #[test]
    fn a_reader_that_never_reads_pins_at_most_max_queued_buffers_per_direction() {
        let (mut p, mut out) = started();
        let mut held: BufId = 0;
        loop {
            out.clear();
            p.on_recv(Client, 1, Some(held), &mut out);
            held += 1;
            if !out.contains(&recv(Client)) {
                break;
            }
            assert!(held < 100, "the receive never stopped");
        }
        assert_eq!(held as usize, MAX_QUEUED);
    }

    #[test]
    fn eof_becomes_shutdown_after_the_queue_drains_and_both_eofs_close() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 5, Some(1), &mut out);
        out.clear();
        p.on_recv(Client, 0, None, &mut out);
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
        p.on_recv(Backend, 9, Some(4), &mut out);
        p.on_recv(Backend, 0, None, &mut out);
        p.on_send(Client, 9, &mut out);
        assert_eq!(
            out,
            vec![
                send(Client, 4, 0, 9),
                recv(Backend),
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
    fn a_dry_ring_asks_for_a_spare_buffer_once() {
        let (mut p, mut out) = started();
        p.on_recv(Backend, -libc::ENOBUFS, None, &mut out);
        assert_eq!(
            out,
            vec![Op::Recv {
                from: Backend,
                spare: true
            }]
        );
        out.clear();
        p.on_recv(Backend, 8, Some(300), &mut out);
        assert_eq!(out, vec![send(Client, 300, 0, 8), recv(Backend)]);
    }

    #[test]
    fn a_reset_aborts_releases_everything_and_closes_when_idle() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 10, Some(1), &mut out);
        p.on_recv(Client, 10, Some(2), &mut out);
        out.clear();
        p.on_recv(Backend, -libc::ECONNRESET, None, &mut out);
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
        p.on_recv(Client, 10, Some(5), &mut out);
        assert_eq!(out, vec![Op::Release(5)]);
        out.clear();
        p.on_recv(Backend, -libc::ECANCELED, None, &mut out);
        assert_eq!(out, vec![Op::Close]);
    }

    #[test]
    fn fast_close_turns_that_sides_eof_into_a_close() {
        let mut p = Proxy::new(false, true);
        let mut out = Vec::new();
        p.start(&mut out);
        out.clear();
        p.on_recv(Client, 0, None, &mut out);
        assert!(!out.contains(&Op::Abort), "a client EOF is still a half-close");
        out.clear();
        p.on_recv(Backend, 0, None, &mut out);
        assert_eq!(out[0], Op::Abort);
    }

    #[test]
    fn a_failed_send_aborts() {
        let (mut p, mut out) = started();
        p.on_recv(Client, 10, Some(1), &mut out);
        out.clear();
        p.on_send(Backend, -libc::EPIPE, &mut out);
        assert_eq!(out[0], Op::Abort);
        p.on_recv(Client, -libc::ECANCELED, None, &mut out);
        p.on_recv(Backend, -libc::ECANCELED, None, &mut out);
        assert_eq!(out.last(), Some(&Op::Close));
        assert!(out.contains(&Op::Release(1)));
    }
}
