//! The running facts penctl commands report ([`Live`]), read from the
//! shared counters, the client table and the connection registry; and the
//! reduced view used at start-up, before any of those exist.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;

use super::command::{ConnectionInfo, Live, ServerStats};
use super::state::ControlState;
use super::{snapshot, webstats};
use crate::dataplane::Shared;
use crate::routing::CounterBank;
use crate::select::client_table::ClientEntry;

/// Pen's connection state bits.
const CS_IN_PROGRESS: u32 = 1;
const CS_CONNECTED: u32 = 2;

/// The control thread's view while the balancer runs.
pub struct Running<'a> {
    pub shared: &'a Shared,
    pub counters: &'a CounterBank,
    /// The last health check's latency per server.
    pub latencies: &'a [Option<std::time::Duration>],
    /// Host names the control port looked up before passing the command on
    /// (`None`: no answer). Other names are looked up here, blocking.
    pub resolved: &'a HashMap<String, Option<IpAddr>>,
}

impl Live for Running<'_> {
    fn resolve(&self, host: &str) -> Option<IpAddr> {
        match self.resolved.get(host) {
            Some(answer) => *answer,
            None => super::command::resolve_blocking(host),
        }
    }

    fn server_stats(&self, index: usize) -> ServerStats {
        self.counters
            .servers
            .get(index)
            .map_or_else(ServerStats::default, |c| ServerStats {
                conns: c.active.load(Ordering::Relaxed),
                sent: c.sent.load(Ordering::Relaxed),
                received: c.received.load(Ordering::Relaxed),
            })
    }

    fn recent_clients(&self, secs: u64) -> Vec<ClientEntry> {
        let now = self.shared.now_secs();
        let table = self.shared.clients.lock();
        table
            .iter()
            .filter(|c| now.saturating_sub(c.last_secs) <= secs)
            .collect()
    }

    fn connection(&self, n: usize) -> Option<ConnectionInfo> {
        self.shared.registry.get(n).map(|info| ConnectionInfo {
            state: if info.backend_fd >= 0 && info.connected {
                CS_CONNECTED
            } else {
                CS_IN_PROGRESS
            },
            downfd: info.client_fd,
            upfd: info.backend_fd,
            client: info.client_slot as i64,
            server: snapshot::target_index(info.target),
            pend: i64::from(!info.connected),
        })
    }

    fn web_stats(&self, state: &ControlState) -> String {
        webstats::render(&snapshot::stats(
            state,
            self.counters,
            self.latencies,
            self.shared,
        ))
    }
}

/// The view for `-F` and `-o` at start-up: nothing has run yet.
pub struct Startup;

impl Live for Startup {
    fn server_stats(&self, _index: usize) -> ServerStats {
        ServerStats::default()
    }

    fn recent_clients(&self, _secs: u64) -> Vec<ClientEntry> {
        Vec::new()
    }

    fn connection(&self, _n: usize) -> Option<ConnectionInfo> {
        None
    }

    fn web_stats(&self, _state: &ControlState) -> String {
        String::new()
    }
}
