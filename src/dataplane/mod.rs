//! The io_uring data plane: N worker threads, each with its own ring and
//! buffer ring, accepting from the shared listener and proxying bytes.

pub mod bufring;
pub mod http;
pub mod listener;
pub mod proxy;
pub mod ring;
mod worker;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::Context;

use crate::accesslog::AccessLog;
use crate::control::ControlSender;
use crate::routing::{Counters, SharedTable};
use crate::select::client_table::SharedClientTable;
use crate::select::RoundRobin;

/// What all workers share with each other and with the control thread.
pub struct Shared {
    pub table: SharedTable,
    pub counters: Counters,
    pub clients: SharedClientTable,
    pub rr: RoundRobin,
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
        counters: Counters,
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
            counters,
            clients,
            rr: RoundRobin::new(),
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

    /// Tells every worker to stop.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for id in 0..self.wakers.len() {
            self.wake(id);
        }
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
    bufring::BufRing::register(&ring.submitter(), 0, 2, 4096)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => ring::RingError::MissingFeature("provided buffer rings (Linux 5.19)"),
            _ => ring::RingError::Other(e),
        })
        .map(drop)
}

/// Starts `count` workers on `listener`; each returns when `stop` is called.
pub fn spawn_workers(
    count: usize,
    listener: Arc<OwnedFd>,
    shared: Arc<Shared>,
) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<()>>>> {
    anyhow::ensure!(count <= 64, "--workers: at most 64 workers are supported");
    (0..count)
        .map(|id| {
            let listener = listener.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("ringpen-worker-{id}"))
                .spawn(move || worker::run(id, listener, shared))
                .context("cannot start a worker thread")
        })
        .collect()
}
