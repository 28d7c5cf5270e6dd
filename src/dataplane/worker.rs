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

use super::buffers::Buffers;
use super::proxy::{BufId, Op, Proxy, RecvMode, Side};
use super::{http, ring, ConnInfo, Shared, WorkerRequest};
use crate::control::state::FastClose;
use crate::control::ControlEvent;
use crate::routing::{RoutingTable, ServerCounters, ServersView};
use crate::select::client_table::ClientKey;
use crate::select::{abuse_choice, first_choice, Attempts, Choice, Target};

/// Ring buffers per worker and their size. The ring hands buffers out in
/// order, so under traffic all of them are touched: this is the worker's
/// resident buffer memory. An idle connection holds none. 64 KiB is the
/// largest segment TCP hands over at once (GSO/TSO, and loopback's MTU):
/// one receive and one send per segment took single-stream bulk from 0.79×
/// to 0.93× direct here; 32 KiB halves each segment, 128 KiB measured worse.
const BUF_COUNT: u16 = 128;
const BUF_SIZE: u32 = 64 * 1024;
/// `IORING_RECVSEND_POLL_FIRST` (uapi): wait for readiness before trying to
/// receive, skipping an attempt that would find the socket empty.
const RECV_POLL_FIRST: u16 = 1;
/// Out of descriptors, accepting is tried again after this long even if
/// none of this worker's connections has closed (descriptors may come back
/// from elsewhere in the process).
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// What a completion belongs to: the low byte of its user_data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Accept,
    Waker,
    Connect,
    ConnectTimeout,
    Cancel,
    /// The once-a-second timer that enforces `idle_timeout`.
    Tick,
    /// Out of descriptors: the timer after which accepting is tried again.
    AcceptRetry,
    Recv(Side),
    Send(Side),
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
            Tag::Tick => 12,
            Tag::AcceptRetry => 13,
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
            12 => Tag::Tick,
            13 => Tag::AcceptRetry,
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
    /// Turned away by the client ACL: goes to the `-B` server or nowhere.
    abuse: bool,
    abuse_tried: bool,
    /// Set by `close N` or the idle timeout while a connect is in flight.
    closing: bool,
    /// The server this connection is connecting or connected to, and the
    /// counters it holds a slot in (kept here: a new table cannot lose them).
    target: Option<Target>,
    counters: Option<Arc<ServerCounters>>,
    /// Servers whose connect failed for this client (rarely more than one).
    failed: Vec<usize>,
    /// The choice whose socket could not be made for want of descriptors:
    /// tried again when some come back, before anything else.
    retry_choice: Option<Choice>,
    /// Since when it waits for descriptors; it gives up after `-t`.
    waiting_since: Option<Instant>,
    backend: Option<Socket>,
    /// Kept here so the pointer handed to the kernel stays valid.
    backend_addr: Option<SockAddr>,
    phase: Phase,
    /// The spare buffer lent to each side's pending receive, if any.
    spare: [Option<BufId>; 2],
    /// The last receive from each side took less than a buffer: the socket
    /// is most likely empty now.
    drained: [bool; 2],
    /// Completions owed outside the proxy machine (connect, its timeout,
    /// cancels); the slot is reused only when this is zero.
    owed: u32,
    /// Pen's connection number (`connection N`, `close N`).
    number: usize,
    /// When either side last sent something (`idle_timeout`).
    last_active: Instant,
    /// `-H` as it was when the client arrived.
    http: bool,
}

impl Conn {
    /// The client's address as `-l` shows it (`unix` for a Unix socket).
    /// Made when a line is written, not kept: connections outnumber lines.
    fn client_text(&self) -> String {
        self.client_ip
            .map_or_else(|| "unix".to_string(), |ip| ip.to_string())
    }

    /// The backend's address as `-l` shows it.
    fn server_text(&self, table: &RoutingTable) -> String {
        self.target
            .map_or_else(String::new, |target| table.host_text(target))
    }

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
    bufs: Buffers,
    shared: Arc<Shared>,
    listener: Arc<OwnedFd>,
    conns: Vec<Option<Box<Conn>>>,
    free: Vec<u32>,
    /// Accepted sockets waiting for capacity (`-x`, `pending_max`) or for
    /// the next turn (`-m`).
    parked: VecDeque<OwnedFd>,
    accept_armed: bool,
    /// Stopped accepting at the `-x` or `pending_max` limit.
    paused: bool,
    /// Stopped accepting because the process ran out of descriptors, until
    /// a connection closes or `accept_retry` fires.
    starved_of_fds: bool,
    /// The `accept_retry` timeout is pending (one at a time).
    retry_armed: bool,
    accept_retry: Box<types::Timespec>,
    /// Said so in the log; quiet until an accept succeeds again.
    warned_of_fds: bool,
    /// Connections whose backend socket could not be made for want of
    /// descriptors, in order: retried when a connection closes or
    /// `accept_retry` fires.
    waiting_for_fds: VecDeque<u32>,
    waker_buf: Box<u64>,
    timeout: Box<types::Timespec>,
    tick: Box<types::Timespec>,
    tick_armed: bool,
    /// Read once per loop turn: the clock for `idle_timeout`.
    now: Instant,
    ops: Vec<Op>,
    completions: Vec<(u64, i32, u32)>,
    log_line: Vec<u8>,
    stop: bool,
}

/// The worker thread's body.
pub fn run(id: usize, shared: Arc<Shared>) -> anyhow::Result<()> {
    let ring = ring::new_ring().with_context(|| format!("worker {id}"))?;
    let bufs = Buffers::new(&ring.submitter(), 0, BUF_COUNT, BUF_SIZE, http::HEADROOM)
        .with_context(|| format!("worker {id}: cannot register the buffer ring"))?;
    let mut worker = Worker {
        id,
        ring,
        bufs,
        listener: shared.listener.load_full(),
        shared,
        conns: Vec::new(),
        free: Vec::new(),
        parked: VecDeque::new(),
        accept_armed: false,
        paused: false,
        starved_of_fds: false,
        retry_armed: false,
        accept_retry: Box::new(types::Timespec::from(ACCEPT_RETRY)),
        warned_of_fds: false,
        waiting_for_fds: VecDeque::new(),
        waker_buf: Box::new(0),
        timeout: Box::new(types::Timespec::new()),
        tick: Box::new(types::Timespec::new().sec(1)),
        tick_armed: false,
        now: Instant::now(),
        ops: Vec::with_capacity(16),
        completions: Vec::with_capacity(256),
        log_line: Vec::new(),
        stop: false,
    };
    worker.arm_waker();
    worker.arm_accept();
    worker.arm_tick();
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
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
                Err(e) => return Err(e).with_context(|| format!("worker {}: io_uring_enter", self.id)),
            }
            self.now = Instant::now();
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
        // SAFETY: forwarded from the caller.
        unsafe { ring::push(&mut self.ring, sqe) }
    }

    fn arm_waker(&mut self) {
        let fd = self.shared.waker_fd(self.id);
        let sqe = ring::waker_read(fd, &mut self.waker_buf, user_data(0, Tag::Waker));
        // SAFETY: waker_buf is boxed and lives as long as the worker, which
        // outlives the ring's operations (the ring is dropped first).
        unsafe { self.push(&sqe) };
    }

    fn arm_accept(&mut self) {
        if self.accept_armed || self.stop || self.paused || self.starved_of_fds {
            return;
        }
        self.accept_armed = true;
        let sqe = opcode::AcceptMulti::new(types::Fd(self.listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(0, Tag::Accept));
        // SAFETY: no pointers; the listener fd is held by `self.listener`
        // until the accept has ended (see `relisten`).
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

    /// Arms the once-a-second timer while an idle timeout is configured.
    fn arm_tick(&mut self) {
        if self.tick_armed || self.stop || self.shared.table.load().idle_timeout.is_none() {
            return;
        }
        self.tick_armed = true;
        let sqe = opcode::Timeout::new(&*self.tick)
            .build()
            .user_data(user_data(0, Tag::Tick));
        // SAFETY: the timespec is boxed in the worker, which outlives the
        // ring; the kernel reads it at submission.
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
            Tag::Tick => self.on_tick(),
            Tag::AcceptRetry => {
                self.retry_armed = false;
                self.starved_of_fds = false;
                self.retry_waiting_for_fds();
                self.arm_accept();
            }
            Tag::Cancel if conn == u32::MAX => {}
            Tag::Cancel | Tag::ConnectTimeout => self.settle_owed(conn),
            Tag::Connect => self.on_connect(conn, res),
            Tag::Recv(side) => self.on_recv(conn, side, res, flags),
            Tag::Send(to) => {
                // A slow reader draining its queue is not idle.
                if let (true, Some(c)) = (
                    res > 0,
                    self.conns.get_mut(conn as usize).and_then(|c| c.as_deref_mut()),
                ) {
                    c.last_active = self.now;
                }
                self.drive(conn, |p, out| p.on_send(to, res, out))
            }
        }
    }

    fn on_waker(&mut self) {
        if self.shared.stopping.load(Ordering::SeqCst) {
            self.stop = true;
            return;
        }
        self.paused = false;
        self.starved_of_fds = false;
        // Woken because a connection closed somewhere: descriptors are back.
        self.retry_waiting_for_fds();
        for request in self.shared.take_requests(self.id) {
            match request {
                WorkerRequest::Close { local, serial } => {
                    let current = self.conns.get(local as usize).and_then(|c| c.as_deref());
                    if current.is_some_and(|c| {
                        self.shared
                            .registry
                            .get(c.number)
                            .is_some_and(|i| i.serial == serial)
                    }) {
                        self.abort(local);
                    }
                }
                WorkerRequest::Relisten => self.relisten(),
                // UDP flows only; a TCP worker has none.
                WorkerRequest::EvictOldest { .. } => {}
            }
        }
        // A table with an idle timeout may have arrived.
        self.arm_tick();
        self.arm_waker();
    }

    /// `listen`: accept from the new listener from now on.
    fn relisten(&mut self) {
        let current = self.shared.listener.load_full();
        if !Arc::ptr_eq(&current, &self.listener) {
            self.cancel_accept();
            // Dropping our handle is safe: the accept being cancelled holds
            // the kernel's own reference to the old socket, which the control
            // thread has already shut down. The next arm uses the new one.
            self.listener = current;
        }
    }

    /// Tears connection `id` down (`close N`, `idle_timeout`).
    fn abort(&mut self, id: u32) {
        let Some(conn) = self.conns.get_mut(id as usize).and_then(|c| c.as_deref_mut()) else {
            return;
        };
        match &mut conn.phase {
            Phase::Proxying(proxy) => {
                proxy.abort(&mut self.ops);
                self.apply(id);
            }
            // The connect's completion finds the client gone and gives up.
            Phase::Connecting => conn.closing = true,
            Phase::Failed => {}
        }
    }

    /// `idle_timeout`: closes connections silent for longer than it.
    fn on_tick(&mut self) {
        self.tick_armed = false;
        let Some(limit) = self.shared.table.load().idle_timeout else {
            return;
        };
        for id in 0..self.conns.len() as u32 {
            let idle = self.conns[id as usize].as_deref().is_some_and(|c| {
                matches!(c.phase, Phase::Proxying(_)) && self.now.duration_since(c.last_active) > limit
            });
            if idle {
                self.abort(id);
            }
        }
        self.arm_tick();
    }

    fn on_accept(&mut self, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if res >= 0 {
            // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
            self.parked.push_back(unsafe { OwnedFd::from_raw_fd(res) });
            self.warned_of_fds = false;
            self.shared.global.accepted.fetch_add(1, Ordering::Relaxed);
        } else if is_out_of_fds(-res) {
            self.starve_of_fds(-res);
        } else if res != -libc::ECANCELED {
            tracing::warn!(
                "worker {}: accept failed: {}",
                self.id,
                std::io::Error::from_raw_os_error(-res)
            );
        }
        self.arm_accept();
    }

    /// Out of descriptors: re-arming the accept now would fail again at
    /// once, in a tight loop, and each accepted client would need one more
    /// for its backend. Wait until a connection closes and gives some back,
    /// or `accept_retry` passes.
    fn starve_of_fds(&mut self, errno: i32) {
        if !self.warned_of_fds {
            tracing::warn!(
                "worker {}: not accepting until a connection closes or {} ms pass: {}",
                self.id,
                ACCEPT_RETRY.as_millis(),
                std::io::Error::from_raw_os_error(errno)
            );
            self.warned_of_fds = true;
        }
        if !self.starved_of_fds {
            self.starved_of_fds = true;
            self.shared.paused.fetch_or(1 << self.id, Ordering::AcqRel);
            self.cancel_accept();
        }
        if !self.retry_armed {
            self.retry_armed = true;
            let sqe = opcode::Timeout::new(&*self.accept_retry)
                .build()
                .user_data(user_data(0, Tag::AcceptRetry));
            // SAFETY: the timespec is boxed in the worker, which outlives
            // the ring; the kernel reads it at submission.
            unsafe { self.push(&sqe) };
        }
    }

    /// Tries the connects that waited for descriptors again, in order. One
    /// that waited longer than `-t` gives up: when accepted clients hold
    /// every descriptor, none would ever come back otherwise.
    fn retry_waiting_for_fds(&mut self) {
        if self.waiting_for_fds.is_empty() {
            return; // the usual case, once per closed connection
        }
        let limit = self.shared.table.load().connect_timeout;
        for id in std::mem::take(&mut self.waiting_for_fds) {
            if let Some(conn) = self.conns.get_mut(id as usize).and_then(|c| c.as_deref_mut()) {
                if conn
                    .waiting_since
                    .is_some_and(|since| self.now.duration_since(since) > limit)
                {
                    conn.closing = true;
                    self.shared.global.refused_limit.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.connect_next(id);
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
        self.paused = false;
        self.arm_accept();
    }

    /// Reserves one of the `-x` connection slots, unless `pending_max`
    /// connects are already in progress.
    fn take_capacity(&self) -> bool {
        let table = self.shared.table.load();
        let global = &self.shared.global;
        global.connecting.load(Ordering::Acquire) < table.pending_max
            && global
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < table.conn_max).then_some(n + 1)
                })
                .is_ok()
    }

    /// At a limit: stop accepting until a connection closes or a connect
    /// completes anywhere.
    fn pause(&mut self) {
        self.paused = true;
        self.shared.paused.fetch_or(1 << self.id, Ordering::AcqRel);
        self.cancel_accept();
        // Capacity may have come back between the check and the flag.
        let table = self.shared.table.load();
        let global = &self.shared.global;
        if global.active.load(Ordering::Acquire) < table.conn_max
            && global.connecting.load(Ordering::Acquire) < table.pending_max
        {
            self.shared.wake(self.id);
        }
    }

    fn setup(&mut self, fd: OwnedFd) {
        let client = Socket::from(fd);
        let peer = client.peer_addr().ok().and_then(|a| a.as_socket());
        let client_ip = peer.map(|a| super::canonical_ip(a.ip()));
        let client_port = peer.map_or(0, |a| a.port());
        let client_key = client_ip.map_or(ClientKey::Unix, ClientKey::Ip);
        let table = self.shared.table.load();
        if !table.tcp_nodelay {
            // The listener's TCP_NODELAY is inherited; `no tcp_nodelay` undoes it.
            let _ = client.set_tcp_nodelay(false);
        }
        let (slot, tracked) = self.shared.clients.visit(client_key, self.shared.now_secs());
        let abuse = !table.permits(table.client_acl, client_ip);
        let first = if abuse {
            None
        } else {
            let view = ServersView {
                table: &table,
                now: self.now,
                failed: &[],
                client: client_ip,
            };
            first_choice(
                &table.mode,
                &view,
                client_key,
                client_port,
                tracked,
                &self.shared.rr,
            )
        };
        let id = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            (self.conns.len() - 1) as u32
        });
        let number = self.shared.registry.open(ConnInfo {
            worker: self.id,
            local: id,
            serial: 0,
            client: peer,
            client_slot: slot,
            client_fd: client.as_raw_fd(),
            backend_fd: -1,
            target: None,
            connected: false,
        });
        self.conns[id as usize] = Some(Box::new(Conn {
            client,
            client_key,
            client_ip,
            slot,
            tracked,
            attempts: Attempts::new(first),
            abuse,
            abuse_tried: false,
            closing: false,
            target: None,
            counters: None,
            failed: Vec::new(),
            retry_choice: None,
            waiting_since: None,
            backend: None,
            backend_addr: None,
            phase: Phase::Connecting,
            spare: [None; 2],
            drained: [false; 2],
            owed: 0,
            number,
            last_active: self.now,
            http: table.http,
        }));
        if abuse && table.abuse.is_none() {
            self.shared.global.refused_acl.fetch_add(1, Ordering::Relaxed);
        }
        self.connect_next(id);
    }

    /// The next target for a connection: the `-B` server once for a client
    /// the ACL denies, else what selection offers.
    fn next_choice(conn: &mut Conn, table: &RoutingTable, now: Instant) -> Option<Choice> {
        if conn.closing {
            return None;
        }
        let view = ServersView {
            table,
            now,
            failed: &conn.failed,
            client: conn.client_ip,
        };
        if conn.abuse {
            // Pen never fails over from the abuse server: offer it once.
            let first_offer = !conn.abuse_tried;
            conn.abuse_tried = true;
            return abuse_choice(view.abuse()).filter(|_| first_offer);
        }
        conn.attempts
            .next(&table.mode, &view, conn.tracked, view.emergency())
    }

    /// Starts a connect to the next server the selection offers, or gives up.
    fn connect_next(&mut self, id: u32) {
        let table = self.shared.table.load_full();
        let shared = self.shared.clone();
        let now = self.now;
        let Some(conn) = self.conns[id as usize].as_deref_mut() else {
            return;
        };
        let connect = loop {
            let retry = conn.retry_choice.take().filter(|_| !conn.closing);
            let Some(choice) = retry.or_else(|| Self::next_choice(conn, &table, now)) else {
                break None;
            };
            let Some(entry) = table.entry(choice.target) else {
                continue;
            };
            if !entry.counters.try_reserve(choice.limit) {
                continue; // another worker took the last slot
            }
            let socket = match new_backend_socket(&entry.sockaddr, &table) {
                Ok(s) => s,
                Err(e) if e.raw_os_error().is_some_and(is_out_of_fds) => {
                    // Not the server's fault: keep the client and its choice
                    // until descriptors come back.
                    entry.counters.release();
                    conn.retry_choice = Some(choice);
                    conn.waiting_since.get_or_insert(now);
                    self.waiting_for_fds.push_back(id);
                    return self.starve_of_fds(e.raw_os_error().unwrap_or(libc::EMFILE));
                }
                Err(e) => {
                    tracing::warn!(
                        "worker {}: cannot create a socket for {}: {e}",
                        self.id,
                        entry.spec.addr
                    );
                    entry.counters.release();
                    break None;
                }
            };
            // Pen records the choice when the connect starts, so a client
            // that failed over sticks to the server it failed over to.
            if let Target::Server(i) = choice.target {
                shared.clients.track(conn.slot, conn.client_key, i);
                shared.rr_current.store(i, Ordering::Relaxed);
            }
            shared
                .registry
                .set_backend(conn.number, Some(choice.target), socket.as_raw_fd());
            conn.target = Some(choice.target);
            conn.counters = Some(entry.counters.clone());
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
            if !conn.abuse && !conn.closing {
                shared.global.refused_limit.fetch_add(1, Ordering::Relaxed);
            }
            conn.phase = Phase::Failed;
            return self.release(id);
        };
        shared.global.connecting.fetch_add(1, Ordering::AcqRel);
        *self.timeout = types::Timespec::from(table.connect_timeout);
        let timeout = opcode::LinkTimeout::new(&*self.timeout)
            .build()
            .user_data(user_data(id, Tag::ConnectTimeout));
        // SAFETY: the address lives in the boxed connection until it is
        // freed, which waits for both completions; the timespec is boxed in
        // the worker and read by the kernel at submission.
        unsafe { ring::push_linked(&mut self.ring, &[connect, timeout]) };
    }

    fn on_connect(&mut self, id: u32, res: i32) {
        let shared = self.shared.clone();
        shared.global.connecting.fetch_sub(1, Ordering::AcqRel);
        // Clients parked behind `pending_max` may go on.
        shared.wake_paused();
        let Some(conn) = self.conns[id as usize].as_deref_mut() else {
            return;
        };
        conn.owed -= 1;
        let target = conn.target.expect("a connect in flight has a target");
        let counters = conn.counters.clone().expect("a connect in flight holds counters");
        if res == 0 && !conn.closing {
            counters.total.fetch_add(1, Ordering::Relaxed);
            shared.registry.set_connected(conn.number);
            tracing::debug!(
                "connection {}: {} connected to {target:?} ({})",
                conn.number,
                conn.client_text(),
                conn.server_text(&shared.table.load())
            );
            let fast_close = shared.table.load().tcp_fastclose;
            let mut proxy = Proxy::new(
                matches!(fast_close, FastClose::Down | FastClose::Both),
                matches!(fast_close, FastClose::Up | FastClose::Both),
            );
            proxy.start(&mut self.ops);
            conn.phase = Phase::Proxying(proxy);
            conn.last_active = self.now;
            self.apply(id);
            return;
        }
        if res != 0 {
            // The linked timeout cancels the connect when it fires.
            let errno = if res == -libc::ECANCELED {
                libc::ETIMEDOUT
            } else {
                -res
            };
            counters.failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                "connection {}: connect to {target:?} ({}) failed: {}; trying the next",
                conn.number,
                conn.server_text(&shared.table.load()),
                std::io::Error::from_raw_os_error(errno)
            );
            let _ = shared.control.send(ControlEvent::ConnectFailed { target, errno });
            if let Target::Server(i) = target {
                conn.failed.push(i);
            }
        }
        counters.release();
        conn.target = None;
        conn.counters = None;
        conn.backend = None;
        shared.registry.set_backend(conn.number, None, -1);
        self.connect_next(id);
    }

    fn on_recv(&mut self, id: u32, side: Side, mut res: i32, flags: u32) {
        let ring_buf = cqueue::buffer_select(flags).map(|bid| self.bufs.lent(bid));
        let log = &self.shared.log;
        let Some(conn) = self.conns[id as usize].as_deref_mut() else {
            if let Some(bid) = ring_buf {
                self.bufs.release(bid);
            }
            return;
        };
        let buf = ring_buf.or_else(|| conn.spare[side as usize].take());
        conn.drained[side as usize] = (res as u32) < self.bufs.recv_len();
        if let (Some(bid), Some(counters)) = (buf.filter(|_| res > 0), &conn.counters) {
            conn.last_active = self.now;
            match side {
                Side::Client => {
                    if conn.http {
                        let size = self.bufs.size() as usize;
                        // SAFETY: the buffer is lent to us until released and
                        // the client receive leaves HEADROOM bytes free in it.
                        let whole = unsafe { std::slice::from_raw_parts_mut(self.bufs.ptr(bid), size) };
                        res = http::add_forwarded_for(whole, res as usize, conn.client_ip) as i32;
                    }
                    if log.is_enabled() {
                        let chunk = self.bufs.bytes(bid, res as u32);
                        let server = conn.server_text(&self.shared.table.load());
                        let client = conn.client_text();
                        log.log(&mut self.log_line, &client, &server, chunk);
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
        proxy.on_recv(side, res, buf, cqueue::more(flags), &mut self.ops);
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
        let mut ops = std::mem::take(&mut self.ops);
        // Results of shutdowns done in this call, by side, fed back after.
        let mut shutdowns: [Option<i32>; 2] = [None; 2];
        for op in ops.drain(..) {
            let Some(conn) = self.conns[id as usize].as_deref_mut() else {
                break;
            };
            let sqe = match op {
                Op::Recv { from, mode } => {
                    let fd = types::Fd(conn.fd(from));
                    let poll_first = if conn.drained[from as usize] {
                        RECV_POLL_FIRST
                    } else {
                        0
                    };
                    let recv = match mode {
                        RecvMode::Multishot => opcode::RecvMulti::new(fd, self.bufs.group()).build(),
                        RecvMode::Once => opcode::Recv::new(fd, std::ptr::null_mut(), 0)
                            .buf_group(self.bufs.group())
                            .ioprio(poll_first)
                            .build()
                            .flags(squeue::Flags::BUFFER_SELECT),
                        RecvMode::Spare => {
                            let bid = self.bufs.take_spare();
                            conn.spare[from as usize] = Some(bid);
                            opcode::Recv::new(fd, self.bufs.ptr(bid), self.bufs.recv_len())
                                .ioprio(poll_first)
                                .build()
                        }
                    };
                    recv.user_data(user_data(id, Tag::Recv(from)))
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
                Op::Shutdown(side) => {
                    // Done here rather than as IORING_OP_SHUTDOWN, which the
                    // kernel always hands to an io-wq thread: a FIN is only
                    // queued, so the call never blocks.
                    let socket = match side {
                        Side::Client => Some(&conn.client),
                        Side::Backend => conn.backend.as_ref(),
                    };
                    let res = match socket.map(|s| s.shutdown(std::net::Shutdown::Write)) {
                        Some(Ok(())) => 0,
                        Some(Err(e)) => -e.raw_os_error().unwrap_or(libc::EIO),
                        None => -libc::EBADF,
                    };
                    shutdowns[side as usize] = Some(res);
                    continue;
                }
                Op::Release(buf) => {
                    self.bufs.release(buf);
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
            // points into a buffer the machine keeps until that send's
            // completion has been handled, and a spare lent to a receive is
            // only given back after that receive's completion.
            unsafe { self.push(&sqe) };
        }
        self.ops = ops;
        for side in [Side::Client, Side::Backend] {
            if let Some(res) = shutdowns[side as usize] {
                self.drive(id, |p, out| p.on_shutdown(side, res, out));
            }
        }
        if self.conns[id as usize].as_deref().is_some_and(Conn::finished) {
            self.release(id);
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
        if let Some(counters) = &conn.counters {
            counters.release();
        }
        match &conn.phase {
            Phase::Proxying(proxy) => {
                let (from_client, to_client) =
                    (proxy.bytes_from(Side::Client), proxy.bytes_from(Side::Backend));
                tracing::debug!(
                    "connection {}: closed, {from_client} bytes from the client, {to_client} to it",
                    conn.number
                );
                shared
                    .clients
                    .add_bytes(conn.slot, conn.client_key, to_client, from_client);
            }
            _ => tracing::debug!("connection {}: closed without a server", conn.number),
        }
        shared.registry.close(conn.number);
        drop(conn);
        self.free.push(id);
        shared.global.active.fetch_sub(1, Ordering::AcqRel);
        shared.wake_paused();
        // Its descriptors are back.
        self.retry_waiting_for_fds();
    }
}

/// The errors of a process (or system) out of descriptors or memory for
/// one more socket.
fn is_out_of_fds(errno: i32) -> bool {
    matches!(errno, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
}

/// A socket for a backend connect, with the table's options: TCP_NODELAY,
/// SO_KEEPALIVE, and the `source` address to connect from.
fn new_backend_socket(addr: &SockAddr, table: &RoutingTable) -> std::io::Result<Socket> {
    let socket = Socket::new(
        Domain::from(i32::from(addr.family())),
        Type::STREAM.cloexec(),
        None,
    )?;
    if let Some(inet) = addr.as_socket() {
        socket.set_tcp_nodelay(table.tcp_nodelay)?;
        socket.set_keepalive(table.keepalive)?;
        if let Some(source) = table.source.filter(|s| s.is_ipv4() == inet.is_ipv4()) {
            socket.bind(&SockAddr::from(std::net::SocketAddr::new(source, 0)))?;
        }
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
            Tag::Tick,
            Tag::AcceptRetry,
        ]
        .into_iter()
        .chain(sides.into_iter().flat_map(|s| [Tag::Recv(s), Tag::Send(s)]));
        for tag in tags {
            let ud = user_data(123_456, tag);
            assert_eq!((ud >> 8, Tag::decode(ud as u8)), (123_456, Some(tag)));
        }
        assert_eq!(Tag::decode(0), None);
    }
}
