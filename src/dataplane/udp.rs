//! `-U`: UDP balancing on a worker's ring. Each client address:port is a
//! flow with one socket connected to its backend; datagrams from clients
//! arrive through a multishot recvmsg on the worker's own listening socket
//! (SO_REUSEPORT, so the kernel keeps a client on one worker), replies
//! through a multishot recv on the flow's socket, and both are sent on out
//! of the provided buffer they arrived in. A flow holds one descriptor; it
//! ends when idle (`--udp-idle`), when `-x` needs room (least recently used
//! first), or when its backend answers with ICMP port unreachable, which
//! also blacklists that backend.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::{Domain, SockAddr, Socket, Type};

use super::bufring::BufRing;
use super::{ring, Shared};
use crate::control::ControlEvent;
use crate::routing::{ServerCounters, ServersView};
use crate::select::client_table::ClientKey;
use crate::select::{abuse_choice, first_choice, Attempts, Target};

/// Buffers hold a whole datagram (up to 64 KiB) plus the recvmsg header
/// and the sender's address in front of it.
const BUF_SIZE: u32 = 65_536 + 256;
/// A datagram holds its buffer until it has been sent on, and a flow sends
/// one at a time each way, so busy flows hold several: 64 buffers ran dry
/// with 64 clients keeping 4 datagrams each in flight, and every receive
/// re-armed after that failed again at once. Memory is only used as far as
/// datagrams fill the buffers (a page each for small ones).
const BUF_COUNT: u16 = 256;
/// Datagrams queued per flow and direction before new ones are dropped
/// (UDP's answer to a slow peer).
const QUEUE_MAX: usize = 32;

/// A completion's meaning: the low byte of its user_data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    ListenRecv,
    Waker,
    Tick,
    BackendRecv,
    SendUp,
    SendDown,
    Cancel,
}

impl Tag {
    const ALL: [Tag; 7] = [
        Tag::ListenRecv,
        Tag::Waker,
        Tag::Tick,
        Tag::BackendRecv,
        Tag::SendUp,
        Tag::SendDown,
        Tag::Cancel,
    ];

    fn user_data(self, flow: u32) -> u64 {
        ((flow as u64) << 8) | (self as u64 + 1)
    }

    fn decode(ud: u64) -> Option<(Tag, u32)> {
        let tag = Self::ALL.get(((ud & 0xff) as usize).checked_sub(1)?)?;
        Some((*tag, (ud >> 8) as u32))
    }
}

/// What `take_capacity` could do for a new flow.
enum Capacity {
    Granted,
    /// Another worker was asked to free a slot; wait to be woken.
    Asked,
    Refused,
}

/// A datagram waiting in a provided buffer.
#[derive(Debug, Clone, Copy)]
struct Datagram {
    buf: u16,
    offset: u32,
    len: u32,
}

struct Flow {
    /// Where replies go; boxed with the flow so the kernel's pointer holds.
    client: SockAddr,
    client_addr: SocketAddr,
    /// Closed as soon as the flow ends, so descriptors track live flows
    /// (an operation already submitted keeps its own reference to the
    /// socket; `close_flow` submits what is queued first).
    backend: Option<Socket>,
    target: Target,
    counters: Arc<ServerCounters>,
    last_active: Instant,
    up: VecDeque<Datagram>,
    down: VecDeque<Datagram>,
    sending_up: bool,
    sending_down: bool,
    recv_armed: bool,
    closing: bool,
    /// Cancel completions still to come.
    owed: u32,
    /// The client's slot in the client table, for its byte counts.
    slot: usize,
    /// Bytes from the client and to it, added to the client table at the end.
    bytes_from_client: u64,
    bytes_to_client: u64,
}

impl Flow {
    fn settled(&self) -> bool {
        self.closing && !self.recv_armed && !self.sending_up && !self.sending_down && self.owed == 0
    }
}

struct UdpWorker {
    id: usize,
    // The ring goes first: it must be dropped before the buffers it uses.
    ring: IoUring,
    bufs: BufRing,
    shared: Arc<Shared>,
    socket: OwnedFd,
    /// The recvmsg template: only the name and control lengths matter.
    msghdr: Box<libc::msghdr>,
    listen_armed: bool,
    listen_starved: bool,
    flows: Vec<Option<Box<Flow>>>,
    free: Vec<u32>,
    by_client: HashMap<SocketAddr, u32>,
    starved: Vec<u32>,
    /// Closed flows' sockets that a submission still in the queue may name
    /// (see `close_flow`): closed once the kernel has taken the queue.
    retired: Vec<Socket>,
    /// New clients' datagrams waiting for a slot another worker frees.
    waiting: VecDeque<(SocketAddr, Datagram)>,
    /// An eviction was asked of another worker and not yet answered.
    asked: bool,
    waker_buf: Box<u64>,
    tick: Box<types::Timespec>,
    now: Instant,
    stop: bool,
    /// The `-l` line being formatted, reused.
    log_line: Vec<u8>,
}

/// The UDP worker thread's body, on its own SO_REUSEPORT socket.
pub fn run(id: usize, shared: Arc<Shared>, socket: OwnedFd) -> anyhow::Result<()> {
    let ring = ring::new_ring().with_context(|| format!("worker {id}"))?;
    let bufs = BufRing::register(&ring.submitter(), 1, BUF_COUNT, BUF_SIZE, 0)
        .with_context(|| format!("worker {id}: cannot register the buffer ring"))?;
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msghdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
    msghdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
    let mut worker = UdpWorker {
        id,
        ring,
        bufs,
        shared,
        socket,
        msghdr,
        listen_armed: false,
        listen_starved: false,
        flows: Vec::new(),
        free: Vec::new(),
        by_client: HashMap::new(),
        starved: Vec::new(),
        retired: Vec::new(),
        waiting: VecDeque::new(),
        asked: false,
        waker_buf: Box::new(0),
        tick: Box::new(types::Timespec::new().sec(1)),
        now: Instant::now(),
        stop: false,
        log_line: Vec::new(),
    };
    worker.arm_waker();
    worker.arm_tick();
    worker.arm_listen();
    while !worker.stop {
        match worker.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
            Err(e) => return Err(e).with_context(|| format!("worker {id}: io_uring_enter")),
        }
        if worker.ring.submission().is_empty() {
            worker.retired.clear();
        }
        worker.now = Instant::now();
        let completions: Vec<(u64, i32, u32)> = worker
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (ud, res, flags) in completions {
            worker.complete(ud, res, flags);
        }
    }
    Ok(())
}

impl UdpWorker {
    /// # Safety
    /// Pointers in `sqe` must stay valid until its completion.
    unsafe fn push(&mut self, sqe: &squeue::Entry) {
        // SAFETY: forwarded from the caller.
        unsafe { ring::push(&mut self.ring, sqe) }
    }

    fn arm_waker(&mut self) {
        let fd = self.shared.waker_fd(self.id);
        let sqe = ring::waker_read(fd, &mut self.waker_buf, Tag::Waker.user_data(0));
        // SAFETY: the boxed counter lives as long as the worker, which
        // outlives the ring.
        unsafe { self.push(&sqe) };
    }

    fn arm_tick(&mut self) {
        let sqe = opcode::Timeout::new(&*self.tick)
            .build()
            .user_data(Tag::Tick.user_data(0));
        // SAFETY: the boxed timespec is read at submission.
        unsafe { self.push(&sqe) };
    }

    fn arm_listen(&mut self) {
        if self.listen_armed || self.stop {
            return;
        }
        self.listen_armed = true;
        let sqe = opcode::RecvMsgMulti::new(
            types::Fd(self.socket.as_raw_fd()),
            &*self.msghdr,
            self.bufs.group(),
        )
        .build()
        .user_data(Tag::ListenRecv.user_data(0));
        // SAFETY: the boxed msghdr lives as long as the worker.
        unsafe { self.push(&sqe) };
    }

    fn complete(&mut self, ud: u64, res: i32, flags: u32) {
        let Some((tag, flow)) = Tag::decode(ud) else {
            return;
        };
        let buf = cqueue::buffer_select(flags);
        if buf.is_some() {
            self.bufs.lent();
        }
        let more = cqueue::more(flags);
        match tag {
            Tag::Waker => {
                if self.shared.stopping.load(Ordering::SeqCst) {
                    self.stop = true;
                } else {
                    for request in self.shared.take_requests(self.id) {
                        if let super::WorkerRequest::EvictOldest { asker } = request {
                            self.evict_for(asker);
                        }
                    }
                    self.retry_waiting();
                    self.arm_waker();
                }
            }
            Tag::Tick => self.on_tick(),
            Tag::ListenRecv => self.on_client_datagram(res, buf, more),
            Tag::BackendRecv => self.on_backend_datagram(flow, res, buf, more),
            Tag::SendUp | Tag::SendDown => self.on_sent(flow, tag == Tag::SendUp, res),
            Tag::Cancel => {
                if let Some(f) = self.flow_mut(flow) {
                    f.owed = f.owed.saturating_sub(1);
                }
                self.maybe_free(flow);
            }
        }
    }

    fn flow_mut(&mut self, id: u32) -> Option<&mut Flow> {
        self.flows.get_mut(id as usize).and_then(|f| f.as_deref_mut())
    }

    fn on_client_datagram(&mut self, res: i32, buf: Option<u16>, more: bool) {
        if !more {
            self.listen_armed = false;
        }
        if let (Some(bid), true) = (buf, res > 0) {
            let parsed = types::RecvMsgOut::parse(self.bufs.bytes(bid, res as u32), &self.msghdr)
                .ok()
                .filter(|out| !out.is_payload_truncated())
                .and_then(|out| {
                    let offset = out.payload_data().as_ptr() as usize - self.bufs.ptr(bid) as usize;
                    let len = out.payload_data().len() as u32;
                    parse_sockaddr(out.name_data()).map(|client| (client, offset as u32, len))
                });
            match parsed {
                Some((client, offset, len)) => self.forward_up(
                    client,
                    Datagram {
                        buf: bid,
                        offset,
                        len,
                    },
                ),
                None => self.bufs.release(bid),
            }
        }
        if res == -libc::ENOBUFS {
            self.listen_starved = true;
        } else if !self.listen_armed {
            self.arm_listen();
        }
    }

    /// A client's datagram: to its flow, made first if it is new.
    fn forward_up(&mut self, client: SocketAddr, datagram: Datagram) {
        let id = match self.by_client.get(&client) {
            Some(&id) if self.flows[id as usize].as_deref().is_some_and(|f| !f.closing) => id,
            _ => match self.take_capacity() {
                Capacity::Granted => match self.open_flow(client) {
                    Some(id) => id,
                    None => return self.bufs.release(datagram.buf),
                },
                // Held until the other worker's flow is gone, so the limit
                // holds for descriptors too.
                Capacity::Asked if self.waiting.len() < QUEUE_MAX => {
                    return self.waiting.push_back((client, datagram));
                }
                Capacity::Asked | Capacity::Refused => return self.bufs.release(datagram.buf),
            },
        };
        let now = self.now;
        let flow = self.flows[id as usize].as_deref_mut().expect("just looked up");
        flow.last_active = now;
        if flow.up.len() >= QUEUE_MAX {
            return self.bufs.release(datagram.buf);
        }
        flow.counters
            .sent
            .fetch_add(u64::from(datagram.len), Ordering::Relaxed);
        flow.bytes_from_client += u64::from(datagram.len);
        let log = &self.shared.log;
        if log.is_enabled() {
            let bytes = self.bufs.bytes(datagram.buf, datagram.offset + datagram.len);
            let payload = &bytes[datagram.offset as usize..];
            let client = super::canonical_ip(flow.client_addr.ip()).to_string();
            let server = self.shared.table.load().host_text(flow.target);
            log.log(&mut self.log_line, &client, &server, payload);
        }
        flow.up.push_back(datagram);
        self.pump(id);
    }

    /// Chooses a backend for a new client (Pen's selection, as for TCP) and
    /// connects a socket to it.
    /// The caller holds one of the `-x` slots (see `take_capacity`).
    fn open_flow(&mut self, client: SocketAddr) -> Option<u32> {
        let ip = super::canonical_ip(client.ip());
        let key = ClientKey::Ip(ip);
        let (slot, tracked) = self.shared.clients.visit(key, self.shared.now_secs());
        let table = self.shared.table.load();
        let mut failed = Vec::new();
        let now = self.now;
        let view = ServersView {
            table: &table,
            now,
            failed: &[],
            client: Some(ip),
        };
        // As for TCP: a client the client ACL denies goes to `-B` once, or
        // its datagram is dropped.
        let denied = !table.permits(table.client_acl, Some(ip));
        let mut abuse_offer = denied.then(|| abuse_choice(view.abuse()));
        let first = if denied {
            None
        } else {
            first_choice(&table.mode, &view, key, client.port(), tracked, &self.shared.rr)
        };
        let mut attempts = Attempts::new(first);
        let flow = loop {
            let choice = match abuse_offer.take() {
                Some(offer) => offer,
                None if denied => None,
                None => {
                    let current = ServersView {
                        failed: &failed,
                        ..view
                    };
                    attempts.next(&table.mode, &current, tracked, current.emergency())
                }
            };
            let Some(choice) = choice else {
                break None;
            };
            let Some(entry) = table.entry(choice.target) else {
                continue;
            };
            if !entry.counters.try_reserve(choice.limit) {
                continue;
            }
            match connected_socket(&entry.sockaddr) {
                Ok(backend) => {
                    if let Target::Server(i) = choice.target {
                        self.shared.clients.track(slot, key, i);
                        self.shared.rr_current.store(i, Ordering::Relaxed);
                    }
                    entry.counters.total.fetch_add(1, Ordering::Relaxed);
                    break Some(Flow {
                        client: SockAddr::from(client),
                        client_addr: client,
                        backend: Some(backend),
                        target: choice.target,
                        counters: entry.counters.clone(),
                        last_active: self.now,
                        up: VecDeque::new(),
                        down: VecDeque::new(),
                        sending_up: false,
                        sending_down: false,
                        recv_armed: false,
                        closing: false,
                        owed: 0,
                        slot,
                        bytes_from_client: 0,
                        bytes_to_client: 0,
                    });
                }
                Err(e) => {
                    tracing::warn!("worker {}: UDP socket to {}: {e}", self.id, entry.spec.addr);
                    entry.counters.release();
                    if let Target::Server(i) = choice.target {
                        failed.push(i);
                    }
                }
            }
        };
        let Some(flow) = flow else {
            let global = &self.shared.global;
            global.active.fetch_sub(1, Ordering::AcqRel);
            if !denied {
                global.refused_limit.fetch_add(1, Ordering::Relaxed);
            } else if table.abuse.is_none() {
                global.refused_acl.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        };
        let id = self.free.pop().unwrap_or_else(|| {
            self.flows.push(None);
            (self.flows.len() - 1) as u32
        });
        self.flows[id as usize] = Some(Box::new(flow));
        self.by_client.insert(client, id);
        self.arm_backend_recv(id);
        Some(id)
    }

    /// One of the `-x` flow slots. At the limit, the least recently used
    /// flow of this worker gives its slot up; a worker with none asks the
    /// next worker to (once until it wakes), and is woken when it has.
    fn take_capacity(&mut self) -> Capacity {
        let max = self.shared.table.load().conn_max;
        let global = self.shared.global.clone();
        let active = &global.active;
        if active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
        {
            return Capacity::Granted;
        }
        if let Some(id) = self.oldest_flow() {
            // Its socket closes at once; its slot passes to the new flow now
            // and its own count is returned when it is freed.
            self.close_flow(id);
            active.fetch_add(1, Ordering::AcqRel);
            return Capacity::Granted;
        }
        let workers = self.shared.worker_count();
        if workers < 2 {
            return Capacity::Refused;
        }
        if !self.asked {
            self.asked = true;
            self.shared.paused.fetch_or(1 << self.id, Ordering::AcqRel);
            self.shared.request(
                (self.id + 1) % workers,
                super::WorkerRequest::EvictOldest { asker: self.id },
            );
        }
        Capacity::Asked
    }

    /// Another worker at the `-x` limit needs a slot: this worker's least
    /// recently used flow gives it up (freeing it wakes the asker). A
    /// worker with no open flow passes the request on around the workers;
    /// once it is back at the asker, no worker had one to give, and the
    /// asker looks again when woken (at once, or when a closing flow is
    /// freed: that wakes it too).
    fn evict_for(&mut self, asker: usize) {
        if let Some(id) = self.oldest_flow() {
            self.close_flow(id);
            return;
        }
        if self.flows.iter().flatten().any(|f| f.closing) {
            return;
        }
        let next = (self.id + 1) % self.shared.worker_count();
        if next == asker {
            self.shared.wake_paused();
        } else {
            self.shared
                .request(next, super::WorkerRequest::EvictOldest { asker });
        }
    }

    /// Datagrams of new clients that waited for another worker to free a
    /// slot: try them again.
    fn retry_waiting(&mut self) {
        self.asked = false;
        for (client, datagram) in std::mem::take(&mut self.waiting) {
            self.forward_up(client, datagram);
        }
    }

    /// This worker's least recently used open flow.
    fn oldest_flow(&self) -> Option<u32> {
        self.flows
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                f.as_deref()
                    .filter(|f| !f.closing)
                    .map(|f| (f.last_active, i as u32))
            })
            .min()
            .map(|(_, id)| id)
    }

    fn arm_backend_recv(&mut self, id: u32) {
        let Some(flow) = self.flow_mut(id) else { return };
        if flow.recv_armed || flow.closing {
            return;
        }
        flow.recv_armed = true;
        let Some(fd) = flow.backend.as_ref().map(|s| s.as_raw_fd()) else {
            return;
        };
        let sqe = opcode::RecvMulti::new(types::Fd(fd), self.bufs.group())
            .build()
            .user_data(Tag::BackendRecv.user_data(id));
        // SAFETY: no pointers; the socket lives in the flow until its
        // receive has ended.
        unsafe { self.push(&sqe) };
    }

    fn on_backend_datagram(&mut self, id: u32, res: i32, buf: Option<u16>, more: bool) {
        let now = self.now;
        let Some(flow) = self.flows.get_mut(id as usize).and_then(|f| f.as_deref_mut()) else {
            if let Some(bid) = buf {
                self.bufs.release(bid);
            }
            return;
        };
        if !more {
            flow.recv_armed = false;
        }
        if let (Some(bid), true) = (buf, res >= 0) {
            if flow.closing || flow.down.len() >= QUEUE_MAX {
                self.bufs.release(bid);
            } else {
                flow.last_active = now;
                flow.counters.received.fetch_add(res as u64, Ordering::Relaxed);
                flow.bytes_to_client += res as u64;
                flow.down.push_back(Datagram {
                    buf: bid,
                    offset: 0,
                    len: res as u32,
                });
            }
        }
        match res {
            r if r == -libc::ECONNREFUSED => {
                // ICMP port unreachable: Pen would never know. Blacklist the
                // backend; the client's next datagram picks another one.
                let target = flow.target;
                flow.counters.failures.fetch_add(1, Ordering::Relaxed);
                let _ = self.shared.control.send(ControlEvent::ConnectFailed {
                    target,
                    errno: libc::ECONNREFUSED,
                });
                self.close_flow(id);
            }
            r if r == -libc::ENOBUFS => self.starved.push(id),
            _ if !more => self.arm_backend_recv(id),
            _ => {}
        }
        self.pump(id);
        self.maybe_free(id);
    }

    /// Sends the next queued datagram each way, one in flight per direction
    /// so a flow's datagrams keep their order.
    fn pump(&mut self, id: u32) {
        let listen_fd = self.socket.as_raw_fd();
        let Some(flow) = self.flows.get_mut(id as usize).and_then(|f| f.as_deref_mut()) else {
            return;
        };
        let mut sqes = [None, None];
        let backend_fd = flow.backend.as_ref().map(|s| s.as_raw_fd());
        if let (false, Some(backend_fd)) = (flow.sending_up, backend_fd) {
            if let Some(d) = flow.up.front() {
                flow.sending_up = true;
                let ptr = self.bufs.ptr(d.buf).wrapping_add(d.offset as usize);
                sqes[0] = Some(
                    opcode::Send::new(types::Fd(backend_fd), ptr, d.len)
                        .build()
                        .user_data(Tag::SendUp.user_data(id)),
                );
            }
        }
        if !flow.sending_down {
            if let Some(d) = flow.down.front() {
                flow.sending_down = true;
                let ptr = self.bufs.ptr(d.buf).wrapping_add(d.offset as usize);
                sqes[1] = Some(
                    opcode::Send::new(types::Fd(listen_fd), ptr, d.len)
                        .dest_addr(flow.client.as_ptr().cast())
                        .dest_addr_len(flow.client.len())
                        .build()
                        .user_data(Tag::SendDown.user_data(id)),
                );
            }
        }
        for sqe in sqes.into_iter().flatten() {
            // SAFETY: the buffer stays out of the ring until this send's
            // completion; the client address and the sockets live in the
            // boxed flow, which is freed only after every send completed.
            unsafe { self.push(&sqe) };
        }
    }

    fn on_sent(&mut self, id: u32, up: bool, res: i32) {
        let Some(flow) = self.flow_mut(id) else { return };
        let (queue, sending) = if up {
            (&mut flow.up, &mut flow.sending_up)
        } else {
            (&mut flow.down, &mut flow.sending_down)
        };
        *sending = false;
        let sent = queue.pop_front();
        if res < 0 && up && res == -libc::ECONNREFUSED {
            // An earlier datagram's ICMP error surfaced on this send.
            let target = flow.target;
            let _ = self.shared.control.send(ControlEvent::ConnectFailed {
                target,
                errno: libc::ECONNREFUSED,
            });
            self.close_flow(id);
        }
        if let Some(d) = sent {
            self.bufs.release(d.buf);
        }
        self.pump(id);
        self.maybe_free(id);
        self.feed_starved();
    }

    /// Ends a flow: its receive is cancelled, queued datagrams dropped; it
    /// is freed once nothing is in flight.
    fn close_flow(&mut self, id: u32) {
        if self.flow_mut(id).is_none_or(|flow| flow.closing) {
            return;
        }
        // A send or receive still in the submission queue names the socket
        // by number only: the kernel must take its own reference before the
        // number is closed, or a new flow's socket could get it and carry
        // this flow's datagram.
        if !self.ring.submission().is_empty() {
            if let Err(e) = self.ring.submit() {
                tracing::error!("io_uring submit failed: {e}");
            }
        }
        let handed_over = self.ring.submission().is_empty();
        let Some(flow) = self.flows.get_mut(id as usize).and_then(|f| f.as_deref_mut()) else {
            return;
        };
        flow.closing = true;
        let socket = flow.backend.take();
        if handed_over {
            drop(socket); // closed now, so descriptors track live flows
        } else {
            // The submit failed: closed once the queue has been taken.
            self.retired.extend(socket);
        }
        let keep_up = usize::from(flow.sending_up);
        let keep_down = usize::from(flow.sending_down);
        let dropped: Vec<u16> = flow
            .up
            .drain(keep_up..)
            .chain(flow.down.drain(keep_down..))
            .map(|d| d.buf)
            .collect();
        let cancel = flow.recv_armed.then(|| {
            flow.owed += 1;
            opcode::AsyncCancel::new(Tag::BackendRecv.user_data(id))
                .build()
                .user_data(Tag::Cancel.user_data(id))
        });
        if self.by_client.get(&flow.client_addr) == Some(&id) {
            self.by_client.remove(&flow.client_addr);
        }
        for buf in dropped {
            self.bufs.release(buf);
        }
        if let Some(sqe) = cancel {
            // SAFETY: no pointers.
            unsafe { self.push(&sqe) };
        }
        self.maybe_free(id);
    }

    fn maybe_free(&mut self, id: u32) {
        if !self
            .flows
            .get(id as usize)
            .and_then(|f| f.as_deref())
            .is_some_and(Flow::settled)
        {
            return;
        }
        let flow = self.flows[id as usize].take().expect("checked above");
        flow.counters.release();
        let key = ClientKey::Ip(super::canonical_ip(flow.client_addr.ip()));
        self.shared
            .clients
            .add_bytes(flow.slot, key, flow.bytes_to_client, flow.bytes_from_client);
        // A worker may be waiting for this slot.
        self.shared.wake_paused();
        self.free.push(id);
        self.shared.global.active.fetch_sub(1, Ordering::AcqRel);
    }

    /// Once a second: flows idle longer than `--udp-idle` end.
    fn on_tick(&mut self) {
        let idle = self.shared.table.load().udp_idle;
        let now = self.now;
        let ids: Vec<u32> = (0..self.flows.len() as u32)
            .filter(|&i| {
                self.flows[i as usize]
                    .as_deref()
                    .is_some_and(|f| !f.closing && now.duration_since(f.last_active) > idle)
            })
            .collect();
        for id in ids {
            self.close_flow(id);
        }
        if !self.stop {
            self.arm_tick();
        }
    }

    /// Re-arms receives that ran out of buffers once some came back.
    fn feed_starved(&mut self) {
        if self.bufs.available() < u32::from(BUF_COUNT) / 4 {
            return;
        }
        if std::mem::take(&mut self.listen_starved) {
            self.arm_listen();
        }
        for id in std::mem::take(&mut self.starved) {
            self.arm_backend_recv(id);
        }
    }
}

/// A UDP socket connected to `addr`: the flow's one descriptor.
fn connected_socket(addr: &SockAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(
        Domain::from(i32::from(addr.family())),
        Type::DGRAM.cloexec(),
        None,
    )?;
    socket.connect(addr)?;
    Ok(socket)
}

/// Binds worker `id`'s listening UDP socket: all workers share the address
/// through SO_REUSEPORT, and the kernel's 4-tuple hash keeps each client on
/// one of them.
pub fn bind(addr: SocketAddr) -> anyhow::Result<OwnedFd> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Bursts from many clients land here before the ring takes them; the
    // default (about 208 KiB) dropped datagrams under load.
    let _ = socket.set_recv_buffer_size(4 << 20);
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket
        .bind(&SockAddr::from(addr))
        .with_context(|| format!("cannot listen on UDP {addr}"))?;
    Ok(socket.into())
}

/// The sender's address as recvmsg wrote it (a `sockaddr_in` or
/// `sockaddr_in6`, in network byte order).
fn parse_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(name.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET => {
            let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        libc::AF_INET6 => {
            let flowinfo = u32::from_be_bytes(name.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flowinfo,
                scope,
            )))
        }
        _ => None,
    }
}

/// Idle flows end after this long unless `--udp-idle` says otherwise.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(addr: SocketAddr) -> Vec<u8> {
        let sockaddr = SockAddr::from(addr);
        // SAFETY: as_ptr points at `len` initialised bytes of the address.
        unsafe {
            std::slice::from_raw_parts(sockaddr.as_ptr().cast::<u8>(), sockaddr.len() as usize).to_vec()
        }
    }

    #[test]
    fn sender_addresses_parse_both_families() {
        for text in ["127.0.0.9:5353", "[::1]:53", "[fe80::1%2]:4000"] {
            let addr: SocketAddr = text.parse().unwrap();
            assert_eq!(parse_sockaddr(&raw(addr)), Some(addr), "{text}");
        }
        assert_eq!(parse_sockaddr(&[0, 0]), None);
        assert_eq!(parse_sockaddr(&[]), None);
    }

    #[test]
    fn user_data_round_trips() {
        for tag in Tag::ALL {
            assert_eq!(Tag::decode(tag.user_data(77)), Some((tag, 77)));
        }
        assert_eq!(Tag::decode(0), None);
    }
}
