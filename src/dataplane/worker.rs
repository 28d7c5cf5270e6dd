//! One data-plane worker: the thin driver that turns completions into calls
//! on the pure logic (selection, the proxy state machine) and the operations
//! those return into submissions. It never blocks and takes no lock except
//! the client table's, once per new connection.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::{Domain, SockAddr, Socket, Type};

use super::bufring::BufRing;
use super::proxy::{Op, Proxy, Side};
use super::{http, ring, Shared};
use crate::control::ControlEvent;
use crate::routing::ServersView;
use crate::select::client_table::ClientKey;
use crate::select::{first_choice, Attempts, Target};

/// Receive buffers per worker and their size. Only buffers holding data in
/// flight are ever touched, so this is address space, not resident memory.
const BUF_COUNT: u16 = 256;
const BUF_SIZE: u32 = 32 * 1024;
/// Re-arm starved receives once this many buffers are back in the ring.
const REARM_THRESHOLD: u32 = BUF_COUNT as u32 / 8;

/// What a completion belongs to: the low byte of its user_data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Accept,
    Waker,
    Connect,
    ConnectTimeout,
    Cancel,
    Recv(Side),
    Send(Side),
    Shutdown(Side),
}

impl Tag {
    fn encode(self) -> u8 {
        match self {
            Tag::Accept => 1,
            Tag::Waker => 2,
            Tag::Connect => 3,
            Tag::ConnectTimeout => 4,
            Tag::Cancel => 5,
            Tag::Recv(side) => 6 + side as u8,
            Tag::Send(side) => 8 + side as u8,
            Tag::Shutdown(side) => 10 + side as u8,
        }
    }

    fn decode(v: u8) -> Option<Tag> {
        let side = if v % 2 == 0 { Side::Client } else { Side::Backend };
        Some(match v {
            1 => Tag::Accept,
            2 => Tag::Waker,
            3 => Tag::Connect,
            4 => Tag::ConnectTimeout,
            5 => Tag::Cancel,
            6 | 7 => Tag::Recv(side),
            8 | 9 => Tag::Send(side),
            10 | 11 => Tag::Shutdown(side),
            _ => return None,
        })
    }
}

fn user_data(conn: u32, tag: Tag) -> u64 {
    ((conn as u64) << 8) | u64::from(tag.encode())
}

/// A connection's lifecycle beyond the proxy state machine.
enum Phase {
    /// Waiting for the backend connect (with its linked timeout).
    Connecting,
    Proxying(Proxy),
    /// Gave up before proxying: closes once owed completions are in.
    Failed,
}

struct Conn {
    client: Socket,
    client_key: ClientKey,
    client_ip: Option<IpAddr>,
    /// The client's slot in the shared client table.
    slot: usize,
    tracked: Option<usize>,
    attempts: Attempts,
    /// The server whose connection counter this connection holds.
    target: Option<Target>,
    /// Servers whose connect failed for this client (rarely more than one).
    failed: Vec<usize>,
    backend: Option<Socket>,
    /// Kept here so the pointer handed to the kernel stays valid.
    backend_addr: Option<SockAddr>,
    phase: Phase,
    /// Completions owed outside the proxy machine (connect, its timeout,
    /// cancels); the slot is reused only when this is zero.
    owed: u32,
    /// `-H` as it was when the client arrived.
    http: bool,
    /// For `-l`: both addresses as text, set only when logging.
    client_text: String,
    server_text: String,
}

impl Conn {
    fn fd(&self, side: Side) -> RawFd {
        match side {
            Side::Client => self.client.as_raw_fd(),
            Side::Backend => self.backend.as_ref().map_or(-1, |s| s.as_raw_fd()),
        }
    }

    fn finished(&self) -> bool {
        self.owed == 0
            && match &self.phase {
                Phase::Proxying(p) => p.is_closed(),
                Phase::Failed => true,
                Phase::Connecting => false,
            }
    }
}

struct Worker {
    id: usize,
    // Field order matters: the ring must be dropped before the buffer ring's
    // memory is unmapped.
    ring: IoUring,
    bufs: BufRing,
    shared: Arc<Shared>,
    listener: Arc<OwnedFd>,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<u32>,
    /// Accepted sockets waiting for capacity (`-x`) or for the next turn (`-m`).
    parked: VecDeque<OwnedFd>,
    accept_armed: bool,
    /// Stopped accepting at the `-x` limit.
    paused: bool,
    /// (connection, side) whose receive ended for lack of buffers.
    starved: Vec<(u32, Side)>,
    waker_buf: Box<u64>,
    timeout: Box<types::Timespec>,
    ops: Vec<Op>,
    completions: Vec<(u64, i32, u32)>,
    log_line: Vec<u8>,
    stop: bool,
}

/// The worker thread's body.
pub fn run(id: usize, listener: Arc<OwnedFd>, shared: Arc<Shared>) -> anyhow::Result<()> {
    let ring = ring::new_ring().with_context(|| format!("worker {id}"))?;
    let bufs = BufRing::register(&ring.submitter(), 0, BUF_COUNT, BUF_SIZE)
        .with_context(|| format!("worker {id}: cannot register the buffer ring"))?;
    let mut worker = Worker {
        id,
        ring,
        bufs,
        shared,
        listener,
        conns: Vec::new(),
        free: Vec::new(),
        parked: VecDeque::new(),
        accept_armed: false,
        paused: false,
        starved: Vec::new(),
        waker_buf: Box::new(0),
        timeout: Box::new(types::Timespec::new()),
        ops: Vec::with_capacity(16),
        completions: Vec::with_capacity(256),
        log_line: Vec::new(),
        stop: false,
    };
    worker.arm_waker();
    worker.arm_accept();
    worker.run_loop()
}

impl Worker {
    fn run_loop(&mut self) -> anyhow::Result<()> {
        while !self.stop {
            let want = if self.parked.is_empty() || self.paused {
                1
            } else {
                0
            };
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                    ) => {}
                Err(e) => return Err(e).with_context(|| format!("worker {}: io_uring_enter", self.id)),
            }
            self.completions.clear();
            self.completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for i in 0..self.completions.len() {
                let (ud, res, flags) = self.completions[i];
                self.complete(ud, res, flags);
            }
            self.admit_parked();
        }
        Ok(())
    }

    /// Queues one submission, flushing the queue to the kernel when full.
    ///
    /// # Safety
    /// Every pointer in `sqe` must stay valid until its completion arrives
    /// (or, for data the kernel copies at submission, until submit returns).
    unsafe fn push(&mut self, sqe: &squeue::Entry) {
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                tracing::error!("worker {}: submit failed: {e}", self.id);
            }
        }
    }

    fn arm_waker(&mut self) {
        let fd = self.shared.waker_fd(self.id);
        let sqe = opcode::Read::new(types::Fd(fd), (&mut *self.waker_buf as *mut u64).cast(), 8)
            .build()
            .user_data(user_data(0, Tag::Waker));
        // SAFETY: waker_buf is boxed and lives as long as the worker, which
        // outlives the ring's operations (the ring is dropped first).
        unsafe { self.push(&sqe) };
    }

    fn arm_accept(&mut self) {
        if self.accept_armed || self.stop {
            return;
        }
        self.accept_armed = true;
        let sqe = opcode::AcceptMulti::new(types::Fd(self.listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(0, Tag::Accept));
        // SAFETY: no pointers; the listener fd is held by `self.listener`.
        unsafe { self.push(&sqe) };
    }

    fn cancel_accept(&mut self) {
        if !self.accept_armed {
            return;
        }
        let sqe = opcode::AsyncCancel::new(user_data(0, Tag::Accept))
            .build()
            .user_data(user_data(u32::MAX, Tag::Cancel));
        // SAFETY: no pointers.
        unsafe { self.push(&sqe) };
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let conn = (ud >> 8) as u32;
        let Some(tag) = Tag::decode(ud as u8) else {
            return;
        };
        match tag {
            Tag::Accept => self.on_accept(res, flags),
            Tag::Waker => self.on_waker(),
            Tag::Cancel if conn == u32::MAX => {}
            Tag::Cancel | Tag::ConnectTimeout => self.settle_owed(conn),
            Tag::Connect => self.on_connect(conn, res),
            Tag::Recv(side) => self.on_recv(conn, side, res, flags),
            Tag::Send(to) => self.drive(conn, |p, out| p.on_send(to, res, out)),
            Tag::Shutdown(side) => self.drive(conn, |p, out| p.on_shutdown(side, res, out)),
        }
    }

    fn on_waker(&mut self) {
        if self.shared.stopping.load(Ordering::SeqCst) {
            self.stop = true;
            return;
        }
        if self.paused {
            self.paused = false;
        }
        self.arm_waker();
    }

    fn on_accept(&mut self, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if res >= 0 {
            // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
            self.parked.push_back(unsafe { OwnedFd::from_raw_fd(res) });
            self.shared
                .counters
                .global
                .accepted
                .fetch_add(1, Ordering::Relaxed);
        } else if res != -libc::ECANCELED {
            tracing::warn!(
                "worker {}: accept failed: {}",
                self.id,
                std::io::Error::from_raw_os_error(-res)
            );
        }
        if !self.accept_armed && !self.paused {
            self.arm_accept();
        }
    }

    /// Sets up parked clients while there is capacity, at most `-m` a turn.
    fn admit_parked(&mut self) {
        let per_turn = self.shared.table.load().accepts_per_wakeup.max(1);
        let mut admitted = 0;
        while admitted < per_turn && !self.parked.is_empty() {
            if !self.take_capacity() {
                self.pause();
                return;
            }
            let fd = self.parked.pop_front().expect("checked non-empty");
            self.setup(fd);
            admitted += 1;
        }
        if self.paused && !self.stop {
            self.paused = false;
        }
        if !self.accept_armed {
            self.arm_accept();
        }
    }

    /// Reserves one of the `-x` connection slots.
    fn take_capacity(&self) -> bool {
        let max = self.shared.table.load().conn_max;
        self.shared
            .counters
            .global
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// At the `-x` limit: stop accepting until a connection closes.
    fn pause(&mut self) {
        self.paused = true;
        self.shared.paused.fetch_or(1 << self.id, Ordering::AcqRel);
        self.cancel_accept();
        // A connection may have closed between the check and the flag.
        if self.shared.counters.global.active.load(Ordering::Acquire) < self.shared.table.load().conn_max {
            self.shared.wake(self.id);
        }
    }

    fn setup(&mut self, fd: OwnedFd) {
        let client = Socket::from(fd);
        let peer = client.peer_addr().ok();
        let client_ip = peer.as_ref().and_then(|a| a.as_socket()).map(|a| a.ip());
        let client_port = peer.as_ref().and_then(|a| a.as_socket()).map_or(0, |a| a.port());
        let client_key = match client_ip {
            Some(ip) => ClientKey::Ip(canonical(ip)),
            None => ClientKey::Unix,
        };
        let now_secs = self.shared.now_secs();
        let (slot, tracked) = self.shared.clients.visit(client_key, now_secs);
        let table = self.shared.table.load();
        let view = ServersView {
            table: &table,
            counters: &self.shared.counters,
            now: Instant::now(),
            failed: &[],
        };
        let first = first_choice(
            &table.mode,
            &view,
            client_key,
            client_port,
            tracked,
            &self.shared.rr,
        );
        let conn = Box::new(Conn {
            client,
            client_key,
            client_ip,
            slot,
            tracked,
            attempts: Attempts::new(first),
            target: None,
            failed: Vec::new(),
            backend: None,
            backend_addr: None,
            phase: Phase::Connecting,
            owed: 0,
            http: table.http,
            client_text: if self.shared.log.is_enabled() {
                client_ip.map_or_else(|| "unix".to_string(), |ip| ip.to_string())
            } else {
                String::new()
            },
            server_text: String::new(),
        });
        let id = match self.free.pop() {
            Some(id) => {
                self.conns[id as usize] = Some(conn);
                id
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        self.connect_next(id);
    }

    /// Starts a connect to the next server the selection offers, or gives up.
    fn connect_next(&mut self, id: u32) {
        let table = self.shared.table.load_full();
        let shared = self.shared.clone();
        let Some(conn) = self.conns[id as usize].as_deref_mut() else {
            return;
        };
        let connect = loop {
            let view = ServersView {
                table: &table,
                counters: &shared.counters,
                now: Instant::now(),
                failed: &conn.failed,
            };
            let Some(choice) = conn
                .attempts
                .next(&table.mode, &view, conn.tracked, view.emergency())
            else {
                break None;
            };
            let (entry, counters) = match (choice.target, &table.emergency) {
                (Target::Server(i), _) => (&table.servers[i], &shared.counters.servers[i]),
                (Target::Emergency, Some(e)) => (e, &shared.counters.emergency),
                (Target::Emergency, None) => continue,
            };
            if !counters.try_reserve(choice.limit) {
                continue; // another worker took the last slot
            }
            let socket = match new_backend_socket(&entry.sockaddr) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("worker {}: cannot create a backend socket: {e}", self.id);
                    counters.release();
                    break None;
                }
            };
            // Pen records the choice when the connect starts, so a client
            // that failed over sticks to the server it failed over to.
            if let Target::Server(i) = choice.target {
                shared.clients.track(conn.slot, conn.client_key, i);
            }
            if shared.log.is_enabled() {
                conn.server_text = entry.spec.addr.host_string();
            }
            conn.target = Some(choice.target);
            let addr = conn.backend_addr.insert(entry.sockaddr.clone());
            let sqe = opcode::Connect::new(types::Fd(socket.as_raw_fd()), addr.as_ptr().cast(), addr.len())
                .build()
                .flags(squeue::Flags::IO_LINK)
                .user_data(user_data(id, Tag::Connect));
            conn.backend = Some(socket);
            conn.owed += 2;
            break Some(sqe);
        };
        let Some(connect) = connect else {
            conn.phase = Phase::Failed;
            return self.release(id);
        };
        *self.timeout = types::Timespec::from(table.connect_timeout);
        let timeout = opcode::LinkTimeout::new(&*self.timeout)
            .build()
            .user_data(user_data(id, Tag::ConnectTimeout));
        // SAFETY: the address lives in the boxed connection until it is
        // freed, which waits for both completions; the timespec is boxed in
        // the worker and read by the kernel at submission.
        unsafe {
            self.push(&connect);
            self.push(&timeout);
        }
    }

    fn on_connect(&mut self, id: u32, res: i32) {
        let shared = self.shared.clone();
        let Some(conn) = self.conns[id as usize].as_deref_mut() else {
            return;
        };
        conn.owed -= 1;
        let target = conn.target.expect("a connect in flight has a target");
        if res == 0 {
            counters_for(&shared, target)
                .total
                .fetch_add(1, Ordering::Relaxed);
            let mut proxy = Proxy::new();
            proxy.start(&mut self.ops);
            conn.phase = Phase::Proxying(proxy);
            self.apply(id);
            return;
        }
        // The linked timeout cancels the connect when it fires.
        let errno = if res == -libc::ECANCELED {
            libc::ETIMEDOUT
        } else {
            -res
        };
        let _ = shared.control.send(ControlEvent::ConnectFailed {
            target,
            at: Instant::now(),
            errno,
        });
        counters_for(&shared, target).release();
        if let Target::Server(i) = target {
            conn.failed.push(i);
        }
        conn.target = None;
        conn.backend = None;
        self.connect_next(id);
    }

    fn on_recv(&mut self, id: u32, side: Side, mut res: i32, flags: u32) {
        let buf = cqueue::buffer_select(flags);
        if buf.is_some() {
            self.bufs.lent();
        }
        let more = cqueue::more(flags);
        let shared = self.shared.clone();
        let Some(conn) = self.conns[id as usize].as_deref_mut() else {
            if let Some(bid) = buf {
                self.bufs.release(bid);
            }
            return;
        };
        if let (Some(bid), true) = (buf, res > 0) {
            let target = conn.target.expect("proxying has a target");
            let counters = counters_for(&shared, target);
            match side {
                Side::Client => {
                    if conn.http {
                        // SAFETY: the buffer is lent to us until released and
                        // the client receive leaves HEADROOM bytes free in it.
                        let whole =
                            unsafe { std::slice::from_raw_parts_mut(self.bufs.ptr(bid), BUF_SIZE as usize) };
                        res = http::add_forwarded_for(whole, res as usize, conn.client_ip) as i32;
                    }
                    if shared.log.is_enabled() {
                        let chunk = self.bufs.bytes(bid, res as u32);
                        shared
                            .log
                            .log(&mut self.log_line, &conn.client_text, &conn.server_text, chunk);
                    }
                    counters.sent.fetch_add(res as u64, Ordering::Relaxed);
                }
                Side::Backend => {
                    counters.received.fetch_add(res as u64, Ordering::Relaxed);
                }
            }
        }
        let Phase::Proxying(proxy) = &mut conn.phase else {
            if let Some(bid) = buf {
                self.bufs.release(bid);
            }
            return;
        };
        proxy.on_recv(side, res, buf, more, &mut self.ops);
        if proxy.is_starved(side) {
            self.starved.push((id, side));
        }
        self.apply(id);
    }

    /// Feeds one event to a connection's proxy machine and applies the result.
    fn drive(&mut self, id: u32, event: impl FnOnce(&mut Proxy, &mut Vec<Op>)) {
        if let Some(Phase::Proxying(proxy)) = self.conns[id as usize].as_deref_mut().map(|c| &mut c.phase) {
            event(proxy, &mut self.ops);
            self.apply(id);
        }
    }

    /// Turns the proxy machine's operations into submissions.
    fn apply(&mut self, id: u32) {
        let mut released = false;
        let mut ops = std::mem::take(&mut self.ops);
        for op in ops.drain(..) {
            let Some(conn) = self.conns[id as usize].as_deref_mut() else {
                break;
            };
            let sqe = match op {
                Op::ArmRecv(side) => {
                    // Leave room for the X-Forwarded-For insert in -H mode.
                    let len = if conn.http && side == Side::Client {
                        BUF_SIZE - http::HEADROOM
                    } else {
                        0
                    };
                    opcode::RecvMulti::new(types::Fd(conn.fd(side)), self.bufs.group())
                        .len(len)
                        .build()
                        .user_data(user_data(id, Tag::Recv(side)))
                }
                Op::CancelRecv(side) => {
                    conn.owed += 1;
                    opcode::AsyncCancel::new(user_data(id, Tag::Recv(side)))
                        .build()
                        .user_data(user_data(id, Tag::Cancel))
                }
                Op::Send { to, buf, offset, len } => {
                    let ptr = self.bufs.ptr(buf).wrapping_add(offset as usize);
                    opcode::Send::new(types::Fd(conn.fd(to)), ptr, len)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(user_data(id, Tag::Send(to)))
                }
                Op::Shutdown(side) => opcode::Shutdown::new(types::Fd(conn.fd(side)), libc::SHUT_WR)
                    .build()
                    .user_data(user_data(id, Tag::Shutdown(side))),
                Op::Release(buf) => {
                    self.bufs.release(buf);
                    released = true;
                    continue;
                }
                Op::Abort => {
                    // Ends pending receives at once; sends fail or finish.
                    let _ = conn.client.shutdown(std::net::Shutdown::Both);
                    if let Some(backend) = &conn.backend {
                        let _ = backend.shutdown(std::net::Shutdown::Both);
                    }
                    continue;
                }
                Op::Close => continue,
            };
            // SAFETY: the sockets live in the boxed connection, which is not
            // freed while the proxy machine has operations in flight; a send
            // points into a buffer the machine keeps out of the ring until
            // that send's completion has been handled.
            unsafe { self.push(&sqe) };
        }
        self.ops = ops;
        if self.conns[id as usize].as_deref().is_some_and(Conn::finished) {
            self.release(id);
        }
        if released {
            self.feed_starved();
        }
    }

    /// Re-arms receives that ran out of buffers once enough came back.
    fn feed_starved(&mut self) {
        if self.starved.is_empty() || self.bufs.available() < REARM_THRESHOLD {
            return;
        }
        let starved = std::mem::take(&mut self.starved);
        for (id, side) in starved {
            if let Some(Phase::Proxying(proxy)) = self.conns[id as usize].as_deref_mut().map(|c| &mut c.phase)
            {
                proxy.on_buffers(side, &mut self.ops);
                self.apply(id);
            }
        }
    }

    /// A connect timeout or a cancel completed.
    fn settle_owed(&mut self, id: u32) {
        if let Some(conn) = self.conns.get_mut(id as usize).and_then(|c| c.as_deref_mut()) {
            conn.owed = conn.owed.saturating_sub(1);
            if conn.finished() {
                self.release(id);
            }
        }
    }

    /// Frees a finished connection: closes its sockets, returns its slots.
    fn release(&mut self, id: u32) {
        let Some(conn) = self.conns[id as usize].take() else {
            return;
        };
        if conn.owed > 0 {
            // Not yet: completions still name this slot.
            self.conns[id as usize] = Some(conn);
            return;
        }
        let shared = &self.shared;
        if let Some(target) = conn.target {
            counters_for(shared, target).release();
        }
        if let Phase::Proxying(proxy) = &conn.phase {
            shared.clients.add_bytes(
                conn.slot,
                conn.client_key,
                proxy.bytes_from(Side::Backend),
                proxy.bytes_from(Side::Client),
            );
        }
        drop(conn);
        self.free.push(id);
        shared.counters.global.active.fetch_sub(1, Ordering::AcqRel);
        shared.wake_paused();
    }
}

fn counters_for(shared: &Shared, target: Target) -> &crate::routing::ServerCounters {
    match target {
        Target::Server(i) => &shared.counters.servers[i],
        Target::Emergency => &shared.counters.emergency,
    }
}

/// An IPv4 client reaching an IPv6 listener is the same client as when it
/// reaches an IPv4 one: track it by its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn new_backend_socket(addr: &SockAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(
        Domain::from(i32::from(addr.family())),
        Type::STREAM.cloexec(),
        None,
    )?;
    if !addr.is_unix() {
        socket.set_tcp_nodelay(true)?;
        socket.set_keepalive(true)?;
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tag_survives_the_user_data_round_trip() {
        let sides = [Side::Client, Side::Backend];
        let tags = [
            Tag::Accept,
            Tag::Waker,
            Tag::Connect,
            Tag::ConnectTimeout,
            Tag::Cancel,
        ]
        .into_iter()
        .chain(
            sides
                .into_iter()
                .flat_map(|s| [Tag::Recv(s), Tag::Send(s), Tag::Shutdown(s)]),
        );
        for tag in tags {
            let ud = user_data(123_456, tag);
            assert_eq!((ud >> 8, Tag::decode(ud as u8)), (123_456, Some(tag)));
        }
        assert_eq!(Tag::decode(0), None);
    }
}
