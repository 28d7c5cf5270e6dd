//! The routing table: an immutable snapshot of everything a worker needs to
//! place a new connection, published by the control thread with one atomic
//! swap, plus the live counters that change per connection and therefore
//! live outside the snapshot, shared by all its generations.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use socket2::SockAddr;

use crate::config::{Config, Mode, ServerSpec};
use crate::select::Candidate;

/// One server as the workers see it.
#[derive(Debug, Clone)]
pub struct ServerEntry {
    pub spec: ServerSpec,
    /// `spec.addr` in kernel form, made once per table rather than per connect.
    pub sockaddr: SockAddr,
    /// Skipped for new connections until then (passive blacklisting, `-b`).
    pub blacklisted_until: Option<Instant>,
}

impl ServerEntry {
    pub fn new(spec: ServerSpec) -> std::io::Result<Self> {
        Ok(ServerEntry {
            sockaddr: spec.addr.to_sockaddr()?,
            spec,
            blacklisted_until: None,
        })
    }

    pub fn is_blacklisted(&self, now: Instant) -> bool {
        self.blacklisted_until.is_some_and(|until| now < until)
    }

    /// The selection view of this server, given its live connection count.
    pub fn candidate(&self, now: Instant, conns: u32) -> Candidate {
        Candidate {
            usable: self.spec.addr.is_connectable(),
            blacklisted: self.is_blacklisted(now),
            conns,
            max: self.spec.max,
            hard: self.spec.hard,
            weight: self.spec.weight,
            prio: self.spec.prio,
        }
    }
}

/// An immutable generation of the routing state. Workers load the current
/// one once per new connection; the control thread replaces it whole.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    pub generation: u64,
    pub servers: Vec<ServerEntry>,
    pub emergency: Option<ServerEntry>,
    pub mode: Mode,
    pub connect_timeout: Duration,
    pub blacklist: Duration,
    pub http: bool,
    pub conn_max: usize,
    pub accepts_per_wakeup: u32,
}

impl RoutingTable {
    /// The first generation, straight from the command line.
    pub fn from_config(config: &Config) -> std::io::Result<Self> {
        Ok(RoutingTable {
            generation: 0,
            servers: config
                .servers
                .iter()
                .cloned()
                .map(ServerEntry::new)
                .collect::<Result<_, _>>()?,
            emergency: config.emergency.clone().map(ServerEntry::new).transpose()?,
            mode: config.mode,
            connect_timeout: Duration::from_secs(config.connect_timeout_secs),
            blacklist: Duration::from_secs(config.blacklist_secs),
            http: config.http,
            conn_max: config.conn_max,
            accepts_per_wakeup: config.accepts_per_wakeup,
        })
    }
}

/// Per-server counters, shared by every table generation.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Connections holding this server now, connects in progress included,
    /// so that limits hold during bursts (Pen counts only completed ones).
    pub active: AtomicU32,
    /// Completed connects since start.
    pub total: AtomicU64,
    /// Bytes sent to the server.
    pub sent: AtomicU64,
    /// Bytes received from the server.
    pub received: AtomicU64,
    /// Failed connects (refused, timed out, unreachable).
    pub failures: AtomicU64,
}

impl ServerCounters {
    /// Takes one connection slot if `limit` allows (None = no limit).
    /// Atomic, so that two workers cannot both take the last slot.
    pub fn try_reserve(&self, limit: Option<u32>) -> bool {
        match limit {
            None => {
                self.active.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(limit) => self
                .active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok(),
        }
    }

    pub fn release(&self) {
        // Saturating, so that a bookkeeping slip can never wrap to 4 billion.
        let _ = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// Counters of the whole balancer.
#[derive(Debug, Default)]
pub struct GlobalCounters {
    /// Client connections open now (accepted and not yet closed).
    pub active: AtomicUsize,
    pub accepted: AtomicU64,
}

/// Live counters: one per server index, plus the emergency server's.
#[derive(Debug)]
pub struct Counters {
    pub servers: Vec<ServerCounters>,
    pub emergency: ServerCounters,
    pub global: GlobalCounters,
}

impl Counters {
    pub fn new(servers: usize) -> Self {
        Counters {
            servers: (0..servers).map(|_| ServerCounters::default()).collect(),
            emergency: ServerCounters::default(),
            global: GlobalCounters::default(),
        }
    }
}

/// The published table: workers `load()`, the control thread `store()`s.
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

/// Adapts a table and its counters to what pure selection needs.
pub struct ServersView<'a> {
    pub table: &'a RoutingTable,
    pub counters: &'a Counters,
    pub now: Instant,
    /// Servers this connection already failed to reach: blacklisted for it
    /// at once, before the control thread's new table arrives (Pen
    /// blacklists synchronously, so its failover never retries them).
    pub failed: &'a [usize],
}

impl crate::select::Servers for ServersView<'_> {
    fn count(&self) -> usize {
        self.table.servers.len()
    }

    fn candidate(&self, index: usize) -> Candidate {
        let conns = self.counters.servers[index].active.load(Ordering::Relaxed);
        let mut candidate = self.table.servers[index].candidate(self.now, conns);
        candidate.blacklisted |= self.failed.contains(&index);
        candidate
    }
}

impl ServersView<'_> {
    pub fn emergency(&self) -> Option<Candidate> {
        let conns = self.counters.emergency.active.load(Ordering::Relaxed);
        self.table
            .emergency
            .as_ref()
            .map(|e| e.candidate(self.now, conns))
    }
}
