//! Active health checks (`--check tcp|mysql|galera`), run by the control
//! thread on its `tokio-uring` runtime: one task per server, each checking
//! every `interval` with a `timeout`, a rise/fall [`Tracker`] turning the
//! verdicts into a [`Health`], and a callback that hears every result.
//!
//! - [`mysql`]: the client protocol pieces, pure.
//! - [`check`]: one check of one server ([`check_once`]); its module
//!   comment says why `mysql` and `galera` checks log in and quit rather
//!   than read the greeting and hang up.
//! - [`tracker`]: rise/fall, pure.
//!
//! Everything here lives on one thread (`Rc`, `spawn_local`): the callback
//! and [`HealthChecker`] need not be `Send`.

pub mod check;
pub mod mysql;
pub mod tracker;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::HealthOptions;
use crate::control::state::Health;

pub use check::{check_once, Verdict};
pub use tracker::Tracker;

/// The shortest interval between two checks of one server: a zero
/// interval would spin.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// What the checks last saw of one server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCheck {
    pub addr: SocketAddr,
    /// After rise/fall.
    pub health: Health,
    /// How long the last check took, whatever its verdict (a timed-out
    /// check takes the timeout); `None` before the first one ends.
    pub latency: Option<Duration>,
    /// Why the last check did not find the server plainly up.
    pub reason: Option<String>,
    /// Checks completed.
    pub checks: u64,
}

/// The checks of a set of servers, and what they last found.
///
/// `run` drives them; the other methods read the results at any time, from
/// the same thread.
#[derive(Clone)]
pub struct HealthChecker {
    targets: Rc<Vec<(usize, SocketAddr)>>,
    opts: Rc<HealthOptions>,
    status: Rc<RefCell<BTreeMap<usize, ServerCheck>>>,
}

impl HealthChecker {
    /// `targets` pairs the caller's server index with its address.
    pub fn new(targets: Vec<(usize, SocketAddr)>, opts: HealthOptions) -> Self {
        let status = targets
            .iter()
            .map(|&(id, addr)| {
                let check = ServerCheck {
                    addr,
                    health: Health::Unchecked,
                    latency: None,
                    reason: None,
                    checks: 0,
                };
                (id, check)
            })
            .collect();
        HealthChecker {
            targets: Rc::new(targets),
            opts: Rc::new(opts),
            status: Rc::new(RefCell::new(status)),
        }
    }

    pub fn options(&self) -> &HealthOptions {
        &self.opts
    }

    /// What the checks last found about server `id`.
    pub fn status(&self, id: usize) -> Option<ServerCheck> {
        self.status.borrow().get(&id).cloned()
    }

    /// How long the last check of server `id` took.
    pub fn last_latency(&self, id: usize) -> Option<Duration> {
        self.status.borrow().get(&id).and_then(|s| s.latency)
    }

    /// Every server's last result, by index.
    pub fn snapshot(&self) -> Vec<(usize, ServerCheck)> {
        self.status
            .borrow()
            .iter()
            .map(|(&id, s)| (id, s.clone()))
            .collect()
    }

    /// Checks every target concurrently, one task each, every
    /// `opts.interval` (first checks spread over the first interval), and
    /// calls `report(id, health, latency, reason)` after every check,
    /// whether or not the health changed. `health` is after rise/fall;
    /// `reason` is why this check did not find the server plainly up.
    ///
    /// Never returns by itself; dropping the future stops every task.
    /// Must run inside `tokio_uring::start`. `report` runs on this thread
    /// between checks: it must not block.
    pub async fn run(&self, report: impl Fn(usize, Health, Duration, Option<String>) + 'static) {
        let report: Report = Rc::new(report);
        let interval = self.opts.interval.max(MIN_INTERVAL);
        let count = self.targets.len().max(1) as u32;
        let start = Instant::now();
        let mut tasks = AbortOnDrop(Vec::with_capacity(self.targets.len()));
        for (i, &(id, addr)) in self.targets.iter().enumerate() {
            let first = start + interval / count * i as u32;
            let watcher = Watcher {
                id,
                addr,
                opts: self.opts.clone(),
                status: Some(self.status.clone()),
                report: report.clone(),
            };
            tasks.0.push(tokio_uring::spawn(watcher.run(first, interval)));
        }
        for task in tasks.0.iter_mut() {
            if let Err(e) = task.await {
                if e.is_panic() {
                    tracing::error!("a health check task panicked: {e}");
                }
            }
        }
    }
}

/// Runs the checks of `targets` until the future is dropped; see
/// [`HealthChecker::run`]. Use a [`HealthChecker`] to read the last
/// latencies as well.
pub async fn run_checks(
    targets: Vec<(usize, SocketAddr)>,
    opts: HealthOptions,
    report: impl Fn(usize, Health, Duration, Option<String>) + 'static,
) {
    HealthChecker::new(targets, opts).run(report).await
}

struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// What hears every check result: server, health, latency, reason.
pub type Report = Rc<dyn Fn(usize, Health, Duration, Option<String>)>;

/// Checks server `id` at `addr` from `first` on, every `opts.interval`,
/// as one task of its own, until the task is aborted: for a caller that
/// starts and stops the checks of single servers. `report` as in
/// [`HealthChecker::run`]. Must run inside `tokio_uring::start`.
pub fn watch(
    id: usize,
    addr: SocketAddr,
    opts: Rc<HealthOptions>,
    first: Instant,
    report: Report,
) -> JoinHandle<()> {
    let interval = opts.interval.max(MIN_INTERVAL);
    let watcher = Watcher {
        id,
        addr,
        opts,
        status: None,
        report,
    };
    tokio_uring::spawn(watcher.run(first, interval))
}

/// The task that checks one server.
struct Watcher {
    id: usize,
    addr: SocketAddr,
    opts: Rc<HealthOptions>,
    /// A [`HealthChecker`]'s record of the results, if one keeps it.
    status: Option<Rc<RefCell<BTreeMap<usize, ServerCheck>>>>,
    report: Report,
}

impl Watcher {
    async fn run(self, first: Instant, interval: Duration) {
        let mut tracker = Tracker::new(self.opts.rise, self.opts.fall);
        let mut ticks = tokio::time::interval_at(first, interval);
        // A check slower than the interval delays the next one rather than
        // causing a burst.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let started = std::time::Instant::now();
            let verdict = check_once(self.opts.kind, self.addr, &self.opts).await;
            let latency = started.elapsed();
            if let Some(health) = tracker.record(&verdict) {
                tracing::info!(
                    server = self.id,
                    addr = %self.addr,
                    ?health,
                    reason = verdict.reason().unwrap_or(""),
                    "health changed"
                );
            }
            let reason = verdict.reason().map(str::to_owned);
            if let Some(status) = &self.status {
                if let Some(s) = status.borrow_mut().get_mut(&self.id) {
                    s.health = tracker.health();
                    s.latency = Some(latency);
                    s.reason = reason.clone();
                    s.checks += 1;
                }
            }
            (self.report)(self.id, tracker.health(), latency, reason);
        }
    }
}
