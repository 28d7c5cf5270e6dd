//! The io_uring data plane: N worker threads, each with its own ring and
//! buffer ring, accepting from the shared listener and proxying bytes.

pub mod buffers;
pub mod bufring;
pub mod http;
pub mod listener;
pub mod proxy;
pub mod ring;
pub mod udp;
mod worker;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::Context;

use crate::accesslog::AccessLog;
use crate::control::ControlSender;
use crate::routing::{GlobalCounters, SharedTable};
use crate::select::client_table::SharedClientTable;
use crate::select::{RoundRobin, Target};

/// Something the control thread asks one worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerRequest {
    /// `close N`: tear down the worker's connection with this local id,
    /// if it is still the one with this serial (ids are reused).
    Close { local: u32, serial: u64 },
    /// `listen`: a new listener was published; accept from it.
    Relisten,
    /// `-U` at the `-x` limit: end this worker's least recently used flow,
    /// or pass the request on if it has none; `asker` waits for the slot.
    EvictOldest { asker: usize },
}

/// One open connection as `connection N` and the status page show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    pub worker: usize,
    /// The worker's own id for it.
    pub local: u32,
    /// Unique for the process's lifetime, unlike `local` and the number.
    pub serial: u64,
    pub client: Option<SocketAddr>,
    /// The client's slot in the client table.
    pub client_slot: usize,
    pub client_fd: RawFd,
    /// -1 until a backend socket exists.
    pub backend_fd: RawFd,
    pub target: Option<Target>,
    /// The backend connect has completed.
    pub connected: bool,
}

/// Pen's connection table: numbers every open connection (lowest free
/// number first, as Pen's slots) so the control port can name it. Touched
/// once when a connection opens, when its backend changes and when it closes.
#[derive(Debug, Default)]
pub struct Registry {
    slots: Mutex<Vec<Option<ConnInfo>>>,
    serials: AtomicU64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Vec<Option<ConnInfo>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Numbers a new connection.
    /// Numbers a new connection; its `serial` is filled in here.
    pub fn open(&self, mut info: ConnInfo) -> usize {
        info.serial = self.serials.fetch_add(1, Ordering::Relaxed);
        let mut slots = self.lock();
        match slots.iter().position(Option::is_none) {
            Some(n) => {
                slots[n] = Some(info);
                n
            }
            None => {
                slots.push(Some(info));
                slots.len() - 1
            }
        }
    }

    pub fn set_backend(&self, number: usize, target: Option<Target>, backend_fd: RawFd) {
        if let Some(Some(info)) = self.lock().get_mut(number) {
            info.target = target;
            info.backend_fd = backend_fd;
            info.connected = false;
        }
    }

    pub fn set_connected(&self, number: usize) {
        if let Some(Some(info)) = self.lock().get_mut(number) {
            info.connected = true;
        }
    }

    pub fn close(&self, number: usize) {
        if let Some(slot) = self.lock().get_mut(number) {
            *slot = None;
        }
    }

    pub fn get(&self, number: usize) -> Option<ConnInfo> {
        self.lock().get(number).copied().flatten()
    }

    /// Every open connection with its number.
    pub fn snapshot(&self) -> Vec<(usize, ConnInfo)> {
        let slots = self.lock();
        slots
            .iter()
            .enumerate()
            .filter_map(|(n, s)| s.map(|info| (n, info)))
            .collect()
    }

    /// The highest number handed out so far plus one (Pen's "last").
    pub fn high_water(&self) -> usize {
        self.lock().len()
    }
}

/// What all workers share with each other and with the control thread.
pub struct Shared {
    pub table: SharedTable,
    pub global: Arc<GlobalCounters>,
    pub clients: SharedClientTable,
    pub rr: RoundRobin,
    /// Pen's `current`: the server most recently connected to.
    pub rr_current: AtomicUsize,
    /// The listening socket; `listen` replaces it.
    pub listener: arc_swap::ArcSwap<OwnedFd>,
    pub registry: Registry,
    requests: Vec<Mutex<Vec<WorkerRequest>>>,
    pub log: AccessLog,
    pub control: ControlSender,
    /// Set once, to make every worker stop.
    pub stopping: AtomicBool,
    /// Bit i set: worker i stopped accepting at the `-x` limit and waits
    /// to be woken when a connection closes anywhere.
    pub paused: AtomicU64,
    wakers: Vec<OwnedFd>,
    started: Instant,
}

impl Shared {
    pub fn new(
        table: SharedTable,
        global: Arc<GlobalCounters>,
        listener: OwnedFd,
        clients: SharedClientTable,
        log: AccessLog,
        control: ControlSender,
        workers: usize,
    ) -> anyhow::Result<Self> {
        let wakers = (0..workers)
            .map(|_| new_eventfd())
            .collect::<std::io::Result<Vec<_>>>()
            .context("cannot create the workers' wake-up eventfds")?;
        Ok(Shared {
            table,
            global,
            clients,
            rr: RoundRobin::new(),
            rr_current: AtomicUsize::new(0),
            listener: arc_swap::ArcSwap::from_pointee(listener),
            registry: Registry::default(),
            requests: (0..workers).map(|_| Mutex::default()).collect(),
            log,
            control,
            stopping: AtomicBool::new(false),
            paused: AtomicU64::new(0),
            wakers,
            started: Instant::now(),
        })
    }

    /// Whole seconds since start, never 0 (the client table's time base).
    pub fn now_secs(&self) -> u64 {
        self.started.elapsed().as_secs() + 1
    }

    /// Wakes worker `id` so it looks at `stopping` and `paused` again.
    pub fn wake(&self, id: usize) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        unsafe {
            libc::write(self.wakers[id].as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// Hands worker `id` a request and wakes it.
    pub fn request(&self, id: usize, request: WorkerRequest) {
        if let Some(queue) = self.requests.get(id) {
            queue.lock().unwrap_or_else(PoisonError::into_inner).push(request);
            self.wake(id);
        }
    }

    /// Asks every worker.
    pub fn request_all(&self, request: WorkerRequest) {
        for id in 0..self.requests.len() {
            self.request(id, request);
        }
    }

    pub fn worker_count(&self) -> usize {
        self.wakers.len()
    }

    fn take_requests(&self, id: usize) -> Vec<WorkerRequest> {
        std::mem::take(&mut *self.requests[id].lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Wakes every worker, so it looks at a new table's timers.
    pub fn wake_all(&self) {
        for id in 0..self.wakers.len() {
            self.wake(id);
        }
    }

    /// Tells every worker to stop.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    /// A connection closed: wake the workers that paused at the limit.
    pub fn wake_paused(&self) {
        let mut mask = self.paused.swap(0, Ordering::AcqRel);
        while mask != 0 {
            let id = mask.trailing_zeros() as usize;
            self.wake(id);
            mask &= mask - 1;
        }
    }

    fn waker_fd(&self, id: usize) -> RawFd {
        self.wakers[id].as_raw_fd()
    }
}

/// An IPv4 client reaching an IPv6 listener is the same client as when it
/// reaches an IPv4 one: track, hash and match ACLs on its IPv4 address.
pub fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

fn new_eventfd() -> std::io::Result<OwnedFd> {
    // Blocking on purpose: io_uring answers a read on a non-blocking fd
    // with EAGAIN instead of waiting for it to become readable.
    // SAFETY: eventfd takes no pointers; the result is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Checks, before daemonizing, that a worker ring and buffer ring can be
/// created here, so that a blocked io_uring is reported on the terminal.
pub fn probe() -> Result<(), ring::RingError> {
    let ring = ring::new_ring()?;
    bufring::BufRing::register(&ring.submitter(), 0, 2, 4096, 0)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => ring::RingError::MissingFeature("provided buffer rings (Linux 5.19)"),
            _ => ring::RingError::Other(e),
        })
        .map(drop)
}

/// Starts the workers: one per UDP socket in `udp` (`-U`), else `count`
/// TCP workers on the shared listener. Each returns when `stop` is called.
pub fn spawn_workers(
    count: usize,
    udp: Vec<OwnedFd>,
    shared: Arc<Shared>,
) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<()>>>> {
    anyhow::ensure!(
        count <= crate::config::defaults::WORKERS_MAX,
        "--workers: at most {} workers are supported",
        crate::config::defaults::WORKERS_MAX
    );
    let mut udp = udp.into_iter();
    (0..count)
        .map(|id| {
            let shared = shared.clone();
            let socket = udp.next();
            std::thread::Builder::new()
                .name(format!("ringpen-worker-{id}"))
                .spawn(move || {
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match socket {
                        Some(socket) => udp::run(id, shared.clone(), socket),
                        None => worker::run(id, shared.clone()),
                    }));
                    let result = outcome.unwrap_or_else(|_| Err(anyhow::anyhow!("worker {id} panicked")));
                    // One worker gone takes the balancer down at once rather
                    // than leaving it at reduced capacity, unnoticed.
                    if result.is_err() {
                        shared.stop();
                    }
                    result
                })
                .context("cannot start a worker thread")
        })
        .collect()
}
