//! The routing table: an immutable snapshot of everything a worker needs to
//! place a new connection, built by the control thread from its state and
//! published with one atomic swap. Counters that change per connection live
//! outside the snapshot, shared by all its generations.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use socket2::SockAddr;

use crate::config::{Mode, ServerSpec};
use crate::control::state::{ControlState, FastClose, ServerConf, ACL_COUNT};
use crate::select::acl::AclEntry;
use crate::select::{Candidate, Target};

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
    /// Backend connects in progress (`pending_max`).
    pub connecting: AtomicUsize,
    pub accepted: AtomicU64,
    /// Clients turned away by the client ACL (with no `-B` server).
    pub refused_acl: AtomicU64,
    /// Clients closed because no server could take them.
    pub refused_limit: AtomicU64,
}

/// One server as the workers see it.
#[derive(Debug, Clone)]
pub struct ServerEntry {
    pub spec: ServerSpec,
    /// `spec.addr` in kernel form, made once per table rather than per connect.
    pub sockaddr: SockAddr,
    /// Skipped for new connections until then (passive blacklisting, `-b`).
    pub blacklisted_until: Option<Instant>,
    /// The access list its clients must pass.
    pub acl: u8,
    /// False while an active health check keeps new connections away.
    pub accepts_new: bool,
    pub counters: Arc<ServerCounters>,
}

impl ServerEntry {
    fn build(
        conf: &ServerConf,
        counters: Arc<ServerCounters>,
        blacklist_secs: u64,
        now: Instant,
        now_epoch: u64,
    ) -> Self {
        ServerEntry {
            // An address the kernel cannot take (an over-long Unix path) is
            // kept as unusable rather than failing the whole table.
            sockaddr: conf.spec.addr.to_sockaddr().unwrap_or_else(|_| unspecified()),
            spec: conf.spec.clone(),
            blacklisted_until: conf
                .blacklist_left(now_epoch, blacklist_secs)
                .map(|left| now + seconds(left)),
            acl: conf.acl,
            accepts_new: conf.health.accepts_new(),
            counters,
        }
    }

    pub fn is_blacklisted(&self, now: Instant) -> bool {
        self.blacklisted_until.is_some_and(|until| now < until)
    }

    /// The selection view of this server now.
    pub fn candidate(&self, now: Instant) -> Candidate {
        Candidate {
            usable: self.accepts_new && self.spec.addr.is_connectable() && self.sockaddr.family() != 0,
            blacklisted: self.is_blacklisted(now),
            conns: self.counters.active.load(Ordering::Relaxed),
            max: self.spec.max,
            hard: self.spec.hard,
            weight: self.spec.weight,
            prio: self.spec.prio,
            denied: false,
        }
    }
}

/// Seconds from the state as a Duration the workers can add to an Instant
/// or hand the kernel as a timespec: penctl takes values up to u64::MAX,
/// which would overflow both, and a century is forever here.
fn seconds(secs: u64) -> Duration {
    const CENTURY_SECS: u64 = 100 * 365 * 24 * 3600;
    Duration::from_secs(secs.min(CENTURY_SECS))
}

fn unspecified() -> SockAddr {
    SockAddr::from(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Counters the control thread keeps for every server slot it has ever had,
/// so they survive table generations and `server N` edits.
#[derive(Debug, Default)]
pub struct CounterBank {
    pub servers: Vec<Arc<ServerCounters>>,
    pub emergency: Arc<ServerCounters>,
    pub abuse: Arc<ServerCounters>,
    pub global: Arc<GlobalCounters>,
}

impl CounterBank {
    /// Counters for server `index`, made on first use.
    pub fn server(&mut self, index: usize) -> Arc<ServerCounters> {
        while self.servers.len() <= index {
            self.servers.push(Arc::default());
        }
        self.servers[index].clone()
    }
}

/// An immutable generation of the routing state. Workers load the current
/// one once per new connection; the control thread replaces it whole.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    pub generation: u64,
    pub servers: Vec<ServerEntry>,
    pub emergency: Option<ServerEntry>,
    /// `-B`: where clients the client ACL denies go.
    pub abuse: Option<ServerEntry>,
    pub mode: Mode,
    pub connect_timeout: Duration,
    pub blacklist: Duration,
    pub http: bool,
    pub conn_max: usize,
    pub pending_max: usize,
    pub accepts_per_wakeup: u32,
    pub acls: Arc<[Vec<AclEntry>; ACL_COUNT]>,
    pub client_acl: u8,
    pub idle_timeout: Option<Duration>,
    pub tcp_nodelay: bool,
    pub tcp_fastclose: FastClose,
    pub keepalive: bool,
    pub source: Option<IpAddr>,
    /// `--udp-idle`: how long a UDP flow may stay silent.
    pub udp_idle: Duration,
}

impl RoutingTable {
    /// Builds generation `generation` from the control thread's state.
    pub fn build(state: &ControlState, counters: &mut CounterBank, generation: u64) -> Self {
        let now = Instant::now();
        let now_epoch = epoch_now();
        let entry = |conf: &ServerConf, c: Arc<ServerCounters>| {
            ServerEntry::build(conf, c, state.blacklist_secs, now, now_epoch)
        };
        RoutingTable {
            generation,
            servers: state
                .servers
                .iter()
                .enumerate()
                .map(|(i, conf)| entry(conf, counters.server(i)))
                .collect(),
            emergency: state
                .emergency
                .as_ref()
                .map(|c| entry(c, counters.emergency.clone())),
            abuse: state.abuse.as_ref().map(|c| entry(c, counters.abuse.clone())),
            mode: state.mode,
            connect_timeout: seconds(state.connect_timeout_secs),
            blacklist: seconds(state.blacklist_secs),
            http: state.http,
            conn_max: state.conn_max,
            pending_max: state.pending_max.max(1),
            accepts_per_wakeup: state.accepts_per_wakeup,
            acls: Arc::new(state.acls.clone()),
            client_acl: state.client_acl,
            idle_timeout: (state.idle_timeout_secs > 0).then(|| seconds(state.idle_timeout_secs)),
            tcp_nodelay: state.tcp_nodelay,
            tcp_fastclose: state.tcp_fastclose,
            keepalive: state.keepalive,
            source: state.source,
            udp_idle: seconds(state.udp_idle_secs),
        }
    }

    /// The address of `target` without its port (a Unix socket's path), as
    /// Pen's `-l` log shows it; empty once the target is gone.
    pub fn host_text(&self, target: Target) -> String {
        self.entry(target)
            .map_or_else(String::new, |entry| entry.spec.addr.host_string())
    }

    /// The server a target names, if it still exists in this generation.
    pub fn entry(&self, target: Target) -> Option<&ServerEntry> {
        match target {
            Target::Server(i) => self.servers.get(i),
            Target::Emergency => self.emergency.as_ref(),
            Target::Abuse => self.abuse.as_ref(),
        }
    }

    /// Whether access list `acl` lets `client` in.
    pub fn permits(&self, acl: u8, client: Option<IpAddr>) -> bool {
        self.acls
            .get(usize::from(acl))
            .is_none_or(|list| crate::select::acl::permits(list, client))
    }
}

/// Seconds since the epoch, Pen's time base for blacklisting and stats.
pub fn epoch_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The published table: workers `load()`, the control thread `store()`s.
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

/// Adapts a table to what pure selection needs, for one client.
pub struct ServersView<'a> {
    pub table: &'a RoutingTable,
    pub now: Instant,
    /// Servers this connection already failed to reach: blacklisted for it
    /// at once, before the control thread's new table arrives (Pen
    /// blacklists synchronously, so its failover never retries them).
    pub failed: &'a [usize],
    /// The client, for per-server access lists.
    pub client: Option<IpAddr>,
}

impl crate::select::Servers for ServersView<'_> {
    fn count(&self) -> usize {
        self.table.servers.len()
    }

    fn candidate(&self, index: usize) -> Candidate {
        let entry = &self.table.servers[index];
        let mut candidate = entry.candidate(self.now);
        candidate.blacklisted |= self.failed.contains(&index);
        candidate.denied = !self.table.permits(entry.acl, self.client);
        candidate
    }
}

impl ServersView<'_> {
    /// The `-e` server; as in Pen, its access list (0 unless set) applies.
    pub fn emergency(&self) -> Option<Candidate> {
        self.table.emergency.as_ref().map(|e| Candidate {
            denied: !self.table.permits(e.acl, self.client),
            ..e.candidate(self.now)
        })
    }

    /// The `-B` server, for a client the client ACL denied.
    pub fn abuse(&self) -> Option<Candidate> {
        self.table.abuse.as_ref().map(|e| e.candidate(self.now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Endpoint, ServerSpec};

    #[test]
    fn the_emergency_server_keeps_its_access_list() {
        let local = |port: u16| Endpoint::Inet(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        let mut config = Config::with_defaults(local(2), vec![ServerSpec::new(local(1))]);
        config.emergency = Some(ServerSpec::new(local(3)));
        let mut state = ControlState::from_config(&config);
        state.acls[0].push(AclEntry::V4 {
            permit: false,
            addr: std::net::Ipv4Addr::new(127, 0, 0, 9),
            mask: std::net::Ipv4Addr::BROADCAST,
        });
        let table = RoutingTable::build(&state, &mut CounterBank::default(), 1);
        let view = |client: [u8; 4]| ServersView {
            table: &table,
            now: Instant::now(),
            failed: &[],
            client: Some(IpAddr::from(client)),
        };
        assert!(view([127, 0, 0, 9]).emergency().unwrap().denied);
        assert!(!view([127, 0, 0, 8]).emergency().unwrap().denied);
    }

    #[test]
    fn huge_blacklist_times_mean_blacklisted_for_good() {
        let server = ServerSpec::new(Endpoint::Inet("127.0.0.1:1".parse().unwrap()));
        let config = Config::with_defaults(Endpoint::Inet("127.0.0.1:2".parse().unwrap()), vec![server]);
        let mut state = ControlState::from_config(&config);
        let mut counters = CounterBank::default();
        // `server 0 blacklist 18446744073709551615`, then `blacklist` raised.
        state.servers[0].status = u64::MAX - 30;
        state.blacklist_secs = u64::MAX;
        let table = RoutingTable::build(&state, &mut counters, 1);
        assert!(table.servers[0].is_blacklisted(Instant::now()));
        // `blacklist 10000000000000000000` after a connect failed just now.
        state.servers[0].status = epoch_now();
        state.blacklist_secs = 10_000_000_000_000_000_000;
        let table = RoutingTable::build(&state, &mut counters, 2);
        assert!(table.servers[0].is_blacklisted(Instant::now()));
        // `timeout 18446744073709551615`: the linked timeout's timespec has
        // signed seconds; wrapped negative, it failed every connect at once.
        state.connect_timeout_secs = u64::MAX;
        let table = RoutingTable::build(&state, &mut counters, 3);
        assert!(i64::try_from(table.connect_timeout.as_secs()).is_ok());
    }
}
