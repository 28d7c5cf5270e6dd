//! The authoritative, mutable configuration the control thread owns: every
//! setting Pen keeps in its globals, the server list with each server's
//! blacklist and health state. Commands change it; every change is published
//! to the workers as a new routing table.

use std::net::IpAddr;
use std::path::PathBuf;

use crate::config::{Config, Endpoint, LogTarget, Mode, ServerSpec};
use crate::select::acl::AclEntry;

/// Pen has ten access lists, 0..=9; servers, clients and the control port
/// all use list 0 unless told otherwise.
pub const ACL_COUNT: usize = 10;

/// What the active health checks last concluded about a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Health {
    /// No active checks (Pen's behaviour): only passive blacklisting.
    #[default]
    Unchecked,
    Up,
    /// Takes no new connections; existing ones stay (Galera Donor/Desynced).
    Drain,
    Down,
}

impl Health {
    /// Whether new connections may go to a server in this state.
    pub fn accepts_new(self) -> bool {
        matches!(self, Health::Unchecked | Health::Up)
    }

    /// The word `health`, the status page and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Health::Unchecked => "unchecked",
            Health::Up => "up",
            Health::Drain => "drain",
            Health::Down => "down",
        }
    }
}

/// `tcp_fastclose`: close both sides as soon as one side sends EOF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FastClose {
    #[default]
    Off,
    /// When the backend (upstream) closes.
    Up,
    /// When the client (downstream) closes.
    Down,
    Both,
}

/// One backend as the control thread knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConf {
    pub spec: ServerSpec,
    /// Access list checked for clients of this server (`server N acl A`).
    pub acl: u8,
    /// Pen's `status`: the epoch second of the last failure (0 = none). The
    /// server is blacklisted while `now < status + blacklist_secs`.
    pub status: u64,
    /// `server N blacklist T`: blacklisted until this epoch second whatever
    /// `-b` is (with `-b 0` too), and a health check does not lift it.
    pub operator_blacklist_until: u64,
    pub health: Health,
}

impl ServerConf {
    pub fn new(spec: ServerSpec) -> Self {
        ServerConf {
            spec,
            acl: 0,
            status: 0,
            operator_blacklist_until: 0,
            health: Health::Unchecked,
        }
    }

    pub fn is_blacklisted(&self, now_epoch: u64, blacklist_secs: u64) -> bool {
        self.blacklist_left(now_epoch, blacklist_secs).is_some()
    }

    /// Seconds of blacklisting left, if any: after a failed connect or as
    /// the operator set it, whichever ends later.
    pub fn blacklist_left(&self, now_epoch: u64, blacklist_secs: u64) -> Option<u64> {
        let failed = match self.status {
            0 => 0,
            at => at.saturating_add(blacklist_secs).saturating_sub(now_epoch),
        };
        let operator = self.operator_blacklist_until.saturating_sub(now_epoch);
        Some(failed.max(operator)).filter(|&left| left > 0)
    }

    /// A connect failed (Pen's `blacklist_server`): blacklisted for
    /// `blacklist_secs` from now.
    pub fn connect_failed(&mut self, now_epoch: u64) {
        self.status = now_epoch;
    }

    /// `server N blacklist T`: T seconds from now; T = 0 lifts any blacklist.
    /// `status` becomes Pen's `now + T - blacklist_time` for the status page
    /// and `servers`.
    pub fn blacklist_for(&mut self, secs: u64, now_epoch: u64, blacklist_secs: u64) {
        self.status = now_epoch.saturating_add(secs).saturating_sub(blacklist_secs);
        self.operator_blacklist_until = now_epoch.saturating_add(secs);
    }

    /// A health check found the server up. That is newer news than a failed
    /// connect, so its blacklist ends at once rather than when `-b` runs
    /// out. The operator's blacklist stays (its own end time), and while it
    /// lasts `status` keeps showing it, as on the status page.
    pub fn checked_up(&mut self, now_epoch: u64) {
        if self.operator_blacklist_until <= now_epoch {
            self.status = 0;
        }
    }
}

/// Everything the control thread can change at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlState {
    pub listen: Endpoint,
    pub servers: Vec<ServerConf>,
    /// `-e`.
    pub emergency: Option<ServerConf>,
    /// `-B`: where clients denied by `client_acl` go.
    pub abuse: Option<ServerConf>,
    pub mode: Mode,
    pub blacklist_secs: u64,
    pub tracking_secs: u64,
    pub connect_timeout_secs: u64,
    pub clients_max: usize,
    pub conn_max: usize,
    pub pending_max: usize,
    pub accepts_per_wakeup: u32,
    pub http: bool,
    pub debug: u8,
    /// `ascii`: traffic dumps in ASCII rather than hex.
    pub ascii: bool,
    pub log: Option<LogTarget>,
    /// `-w` / `web_stats`: where `status` and SIGUSR1 write the HTML page.
    pub web_stats: Option<PathBuf>,
    /// `idle_timeout`: close connections idle this long (0 = never).
    pub idle_timeout_secs: u64,
    pub tcp_nodelay: bool,
    pub tcp_fastclose: FastClose,
    /// `source`: local address for connects to backends.
    pub source: Option<IpAddr>,
    /// `keepalive`: SO_KEEPALIVE on backend sockets.
    pub keepalive: bool,
    pub acls: [Vec<AclEntry>; ACL_COUNT],
    pub client_acl: u8,
    pub control_acl: u8,
    /// `-C`.
    pub control: Option<Endpoint>,
    /// `-X`: the `exit` command is allowed.
    pub exit_enabled: bool,
    /// `-F`: re-read on SIGHUP.
    pub config_file: Option<PathBuf>,
    /// `-U`: UDP mode (start-up only).
    pub udp: bool,
    /// `--udp-idle`.
    pub udp_idle_secs: u64,
    /// Start-up facts `write` repeats in its header comment.
    pub foreground: bool,
    pub user: Option<String>,
    pub chroot: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
}

impl ControlState {
    /// The state the command line describes, before `-F` and `-o` apply.
    pub fn from_config(config: &Config) -> Self {
        ControlState {
            listen: config.listen.clone(),
            servers: config.servers.iter().cloned().map(ServerConf::new).collect(),
            emergency: config.emergency.clone().map(ServerConf::new),
            abuse: config.abuse.clone().map(ServerConf::new),
            mode: config.mode,
            blacklist_secs: config.blacklist_secs,
            tracking_secs: config.tracking_secs,
            connect_timeout_secs: config.connect_timeout_secs,
            clients_max: config.clients_max,
            conn_max: config.conn_max,
            pending_max: 100,
            accepts_per_wakeup: config.accepts_per_wakeup,
            http: config.http,
            debug: config.debug,
            ascii: false,
            log: config.log.clone(),
            web_stats: config.web_stats.clone(),
            idle_timeout_secs: 0,
            tcp_nodelay: true,
            tcp_fastclose: FastClose::Off,
            source: None,
            keepalive: true,
            acls: Default::default(),
            client_acl: 0,
            control_acl: 0,
            control: config.control.clone(),
            exit_enabled: config.exit_enabled,
            config_file: config.config_file.clone(),
            udp: config.udp,
            udp_idle_secs: config.udp_idle_secs,
            foreground: config.foreground,
            user: config.user.clone(),
            chroot: config.chroot.clone(),
            pid_file: config.pid_file.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Endpoint;

    #[test]
    fn a_health_check_lifts_a_failed_connects_blacklist_but_not_the_operators() {
        let (now, b) = (1_000_000, 30);
        let mut conf = ServerConf::new(ServerSpec::new(Endpoint::Inet("127.0.0.1:1".parse().unwrap())));
        conf.connect_failed(now);
        assert_eq!(conf.blacklist_left(now + 10, b), Some(20));
        conf.checked_up(now);
        assert!(!conf.is_blacklisted(now, b), "checked up: back at once");

        // `server N blacklist 3600`, then the node is restarted and checked up.
        conf.blacklist_for(3600, now, b);
        conf.checked_up(now + 5);
        assert!(conf.is_blacklisted(now + 3599, b));
        // A connect that fails meanwhile does not shorten it either.
        conf.connect_failed(now + 10);
        conf.checked_up(now + 20);
        assert!(conf.is_blacklisted(now + 3599, b));
        assert!(!conf.is_blacklisted(now + 3600, b));
        // Once it is over, a check lifts a later failure's blacklist again.
        conf.connect_failed(now + 3590);
        conf.checked_up(now + 3600);
        assert!(!conf.is_blacklisted(now + 3600, b));

        // `server N blacklist 0` lifts it.
        conf.blacklist_for(3600, now, b);
        conf.blacklist_for(0, now, b);
        assert!(!conf.is_blacklisted(now, b));
    }

    #[test]
    fn the_operators_blacklist_holds_whatever_dash_b_is() {
        let now = 1_000_000;
        let mut conf = ServerConf::new(ServerSpec::new(Endpoint::Inet("127.0.0.1:1".parse().unwrap())));
        // `-b 0` (passive blacklisting off, health driven by penctl), and a
        // `-b` so large that Pen's `now + T - b` would go below zero.
        for b in [0, 99_999_999_999, u64::MAX] {
            conf.blacklist_for(60, now, b);
            assert_eq!(conf.blacklist_left(now, b), Some(60), "-b {b}");
            assert!(!conf.is_blacklisted(now + 60, b), "-b {b}");
            conf.blacklist_for(0, now, b);
            assert!(!conf.is_blacklisted(now, b), "-b {b}");
        }
        // With -b 0 a failed connect blacklists nothing, as in Pen.
        let mut fresh = ServerConf::new(conf.spec.clone());
        fresh.connect_failed(now);
        assert!(!fresh.is_blacklisted(now, 0));
    }
}
