//! Gathers what the status page and the metrics endpoint show from the
//! control state, the live counters, the client table and the connection
//! registry. The renderers themselves (webstats, metrics) are pure.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::metrics::{BackendMetrics, MetricsSnapshot};
use super::state::Health;
use super::state::{ControlState, ServerConf};
use super::webstats::{local_time, ClientRow, ConnectionRow, HealthRow, ServerRow, StatsSnapshot};
use crate::dataplane::Shared;
use crate::routing::{epoch_now, CounterBank, ServerCounters};
use crate::select::client_table::ClientKey;
use crate::select::Target;

/// Pen's indices for the hidden server slots.
const EMERGENCY_INDEX: i64 = -1;
const ABUSE_INDEX: i64 = -2;

/// Pen's server index for a connection's target (-1 when none yet).
pub fn target_index(target: Option<Target>) -> i64 {
    match target {
        Some(Target::Server(i)) => i as i64,
        Some(Target::Emergency) => EMERGENCY_INDEX,
        Some(Target::Abuse) => ABUSE_INDEX,
        None => -1,
    }
}

fn load(c: &ServerCounters) -> (u32, u64, u64) {
    (
        c.active.load(Ordering::Relaxed),
        c.sent.load(Ordering::Relaxed),
        c.received.load(Ordering::Relaxed),
    )
}

/// The `web_stats` page's data.
pub fn stats(
    state: &ControlState,
    counters: &CounterBank,
    latencies: &[Option<Duration>],
    shared: &Shared,
) -> StatsSnapshot {
    let servers = state
        .servers
        .iter()
        .enumerate()
        .map(|(index, conf)| {
            let (conns, sent, received) = counters.servers.get(index).map_or((0, 0, 0), |c| load(c));
            ServerRow {
                index,
                address: conf.spec.addr.host_string(),
                status: conf.status,
                port: super::command::pen_port(&conf.spec.addr),
                conns,
                max: conf.spec.max,
                hard: conf.spec.hard,
                sent,
                received,
                weight: conf.spec.weight,
                prio: conf.spec.prio,
            }
        })
        .collect();
    let now_secs = shared.now_secs();
    let clients = shared
        .clients
        .lock()
        .iter()
        .map(|entry| ClientRow {
            index: entry.slot,
            // Pen shows no address for a Unix-socket client.
            address: match entry.key {
                ClientKey::Ip(ip) => ip.to_string(),
                ClientKey::Unix => String::new(),
            },
            age_secs: now_secs.saturating_sub(entry.last_secs) as i64,
            // Pen's NO_SERVER (-3) for a client that never got a server.
            last_server: entry.server.map_or(-3, |s| s as i64),
            connects: entry.connects,
            sent: entry.sent,
            received: entry.received,
        })
        .collect();
    let open = shared.registry.snapshot();
    let checked = state.servers.iter().any(|s| s.health != Health::Unchecked) || !latencies.is_empty();
    let health = if checked {
        state
            .servers
            .iter()
            .enumerate()
            .map(|(index, conf)| HealthRow {
                index,
                address: conf.spec.addr.to_string(),
                health: conf.health.name().to_string(),
                latency_ms: latencies
                    .get(index)
                    .copied()
                    .flatten()
                    .map(|d| d.as_millis() as u64),
            })
            .collect()
    } else {
        Vec::new()
    };
    StatsSnapshot {
        health,
        now_local: local_time(epoch_now()),
        current: shared.rr_current.load(Ordering::Relaxed) as i64,
        servers,
        clients_max: state.clients_max,
        clients,
        conn_max: state.conn_max,
        connections_used: open.len(),
        last_connection: shared.registry.high_water().saturating_sub(1),
        connections: open
            .into_iter()
            .map(|(index, info)| ConnectionRow {
                index,
                downfd: info.client_fd,
                upfd: info.backend_fd,
                // Bytes wait in the kernel's socket buffers, not in ours.
                pending_down: 0,
                pending_up: 0,
                client: info.client_slot as i64,
                server: target_index(info.target),
            })
            .collect(),
    }
}

/// The metrics endpoint's data.
pub fn metrics(
    state: &ControlState,
    counters: &CounterBank,
    latencies: &[Option<Duration>],
    shared: &Shared,
) -> MetricsSnapshot {
    let now = epoch_now();
    let none = ServerCounters::default();
    let backend = |index: usize, conf: &ServerConf, c: &ServerCounters| BackendMetrics {
        server: index.to_string(),
        address: conf.spec.addr.to_string(),
        connectable: conf.spec.addr.is_connectable(),
        blacklisted: conf.is_blacklisted(now, state.blacklist_secs),
        health: conf.health,
        active_connections: u64::from(c.active.load(Ordering::Relaxed)),
        connections_total: c.total.load(Ordering::Relaxed),
        sent_bytes_total: c.sent.load(Ordering::Relaxed),
        received_bytes_total: c.received.load(Ordering::Relaxed),
        connect_failures_total: c.failures.load(Ordering::Relaxed),
        check_latency: latencies.get(index).copied().flatten(),
    };
    let backends = state
        .servers
        .iter()
        .enumerate()
        .map(|(i, conf)| backend(i, conf, counters.servers.get(i).map_or(&none, |c| c)))
        .collect();
    let global = &shared.global;
    MetricsSnapshot {
        backends,
        active_connections: global.active.load(Ordering::Relaxed) as u64,
        accepted_connections_total: global.accepted.load(Ordering::Relaxed),
        refused_acl_total: global.refused_acl.load(Ordering::Relaxed),
        refused_limit_total: global.refused_limit.load(Ordering::Relaxed),
    }
}
