//! The balancer's configuration: what the command line (and later `-F` files)
//! describe, resolved and validated, ready for the control thread to own.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use socket2::SockAddr;

/// Where a socket lives: an IP address and port, or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Inet(SocketAddr),
    Unix(PathBuf),
}

impl Endpoint {
    /// The address in the form the kernel takes it.
    pub fn to_sockaddr(&self) -> std::io::Result<SockAddr> {
        match self {
            Endpoint::Inet(addr) => Ok(SockAddr::from(*addr)),
            Endpoint::Unix(path) => SockAddr::unix(path),
        }
    }

    /// The port, or 0 for a Unix socket.
    pub fn port(&self) -> u16 {
        match self {
            Endpoint::Inet(addr) => addr.port(),
            Endpoint::Unix(_) => 0,
        }
    }

    /// Pen skips servers without a port or with the unspecified address.
    pub fn is_connectable(&self) -> bool {
        match self {
            Endpoint::Inet(addr) => addr.port() != 0 && !addr.ip().is_unspecified(),
            Endpoint::Unix(_) => true,
        }
    }

    /// Pen's `pen_ntoa`: the address without the port (a Unix path as is).
    pub fn host_string(&self) -> String {
        match self {
            Endpoint::Inet(addr) => addr.ip().to_string(),
            Endpoint::Unix(path) => path.display().to_string(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Inet(addr) => write!(f, "{addr}"),
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// One backend, as given by `host[:port[:max[:hard[:weight[:prio]]]]]`.
/// Fields left out are 0, as in Pen: `max` 0 means no limit, `hard` only
/// matters when it is above `max`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    pub addr: Endpoint,
    pub max: u32,
    pub hard: u32,
    pub weight: u32,
    pub prio: u32,
}

impl ServerSpec {
    pub fn new(addr: Endpoint) -> Self {
        ServerSpec {
            addr,
            max: 0,
            hard: 0,
            weight: 0,
            prio: 0,
        }
    }
}

/// Where `-l` sends the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// A file, appended to, reopened on SIGHUP.
    File(PathBuf),
    /// Pen's network log: one UDP datagram per line to `host:port`.
    Udp(SocketAddr),
}

/// As `log` shows it and `write` writes it.
impl std::fmt::Display for LogTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogTarget::File(path) => write!(f, "{}", path.display()),
            LogTarget::Udp(addr) => write!(f, "{addr}"),
        }
    }
}

/// The selection flags Pen calls the "mode" (`penctl mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mode {
    /// `-r`: no client tracking.
    pub roundrobin: bool,
    /// `-h`: first choice by a hash of the client address.
    pub hash: bool,
    /// `-s`: never fail over from the first choice.
    pub stubborn: bool,
    /// `-W`: weighted least connections.
    pub weight: bool,
    /// `prio`: lowest priority value first.
    pub prio: bool,
}

/// Pen's defaults, from its source (`event.h`, `pen.h`), not its man page.
pub mod defaults {
    pub const BLACKLIST_SECS: u64 = 30;
    pub const CLIENTS_MAX: usize = 2048;
    pub const CONN_MAX: usize = 500;
    /// The largest `-c`/`clients_max` and `-x`/`conn_max`: the tables only
    /// grow, and a slip of the keyboard must not make the balancer try to
    /// allocate more memory than the machine has.
    pub const TABLE_MAX: usize = 1 << 24;
    /// Workers are bits in a 64-bit mask (which of them wait for a slot).
    pub const WORKERS_MAX: usize = 64;
    pub const CONNECT_TIMEOUT_SECS: u64 = 3;
    pub const ACCEPTS_PER_WAKEUP: u32 = 100;
    pub const BACKLOG: u32 = 500;
    /// Pen raises smaller `-q` values to this.
    pub const BACKLOG_MIN: u32 = 50;
}

/// `--check`: what an active health check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// Read the MySQL/MariaDB greeting; an error packet means down.
    Mysql,
    /// Log in and read the Galera `wsrep_*` status.
    Galera,
}

/// `--donor`: what a Galera node in Donor/Desynced state gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DonorPolicy {
    /// No new connections, existing ones kept.
    #[default]
    Drain,
    Down,
    Up,
}

/// `--on-down`: what happens to existing connections of a server that
/// an active check takes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDown {
    #[default]
    Keep,
    Close,
}

/// Active health checks (long options only; Pen has none).
#[derive(Clone, PartialEq, Eq)]
pub struct HealthOptions {
    pub kind: CheckKind,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    /// Consecutive successes that bring a server back.
    pub rise: u32,
    /// Consecutive failures that take a server out.
    pub fall: u32,
    /// `--check-user`, for `galera`.
    pub user: Option<String>,
    /// From `--check-password-file` or `RINGPEN_CHECK_PASSWORD`, never argv.
    pub password: Option<String>,
    pub donor: DonorPolicy,
    pub on_down: OnDown,
}

impl fmt::Debug for HealthOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("HealthOptions")
            .field("kind", &self.kind)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("rise", &self.rise)
            .field("fall", &self.fall)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("donor", &self.donor)
            .field("on_down", &self.on_down)
            .finish()
    }
}

/// Everything the balancer needs to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: Endpoint,
    pub servers: Vec<ServerSpec>,
    /// `-e`: used when every regular server has failed.
    pub emergency: Option<ServerSpec>,
    pub mode: Mode,
    /// `-b`: seconds a server is skipped after a failed connect.
    pub blacklist_secs: u64,
    /// `-c`: client table slots.
    pub clients_max: usize,
    /// `-T`: client tracking time in seconds, 0 = forever.
    pub tracking_secs: u64,
    /// `-x`: most simultaneous connections.
    pub conn_max: usize,
    /// `-t`: backend connect timeout in seconds.
    pub connect_timeout_secs: u64,
    /// `-m`: connections accepted per wake-up.
    pub accepts_per_wakeup: u32,
    /// `-q`: listen backlog.
    pub backlog: u32,
    /// `-H`: add `X-Forwarded-For` to HTTP requests.
    pub http: bool,
    /// `-d` count.
    pub debug: u8,
    /// `-f`.
    pub foreground: bool,
    /// `-l`.
    pub log: Option<LogTarget>,
    /// `-p`.
    pub pid_file: Option<PathBuf>,
    /// `-u`: user to become after binding.
    pub user: Option<String>,
    /// `-j`: directory to chroot into after binding.
    pub chroot: Option<PathBuf>,
    /// `--workers`: data-plane threads.
    pub workers: usize,
    /// `-C`: the penctl control port.
    pub control: Option<Endpoint>,
    /// `-F`: penctl commands applied at start and on SIGHUP.
    pub config_file: Option<PathBuf>,
    /// `-O cmd` / `-o cmd`, in command-line order, applied after `-F`.
    pub startup_commands: Vec<String>,
    /// `-w`: HTML status file.
    pub web_stats: Option<PathBuf>,
    /// `-X`: allow the `exit` command.
    pub exit_enabled: bool,
    /// `-B`: where clients denied by the client ACL go.
    pub abuse: Option<ServerSpec>,
    /// `--metrics`: Prometheus text at `GET /metrics`.
    pub metrics: Option<SocketAddr>,
    /// `--check` and friends.
    pub health: Option<HealthOptions>,
    /// `-U`: balance UDP instead of TCP.
    pub udp: bool,
    /// `--udp-idle`: a UDP flow ends after this many idle seconds.
    pub udp_idle_secs: u64,
}

impl Config {
    /// `listen` and `servers` with every other setting at Pen's default, in
    /// the foreground, one worker: what a bare `pen -f LISTEN SERVERS` means.
    pub fn with_defaults(listen: Endpoint, servers: Vec<ServerSpec>) -> Self {
        Config {
            listen,
            servers,
            emergency: None,
            mode: Mode::default(),
            blacklist_secs: defaults::BLACKLIST_SECS,
            clients_max: defaults::CLIENTS_MAX,
            tracking_secs: 0,
            conn_max: defaults::CONN_MAX,
            connect_timeout_secs: defaults::CONNECT_TIMEOUT_SECS,
            accepts_per_wakeup: defaults::ACCEPTS_PER_WAKEUP,
            backlog: defaults::BACKLOG,
            http: false,
            debug: 0,
            foreground: true,
            log: None,
            pid_file: None,
            user: None,
            chroot: None,
            workers: 1,
            control: None,
            config_file: None,
            startup_commands: Vec::new(),
            web_stats: None,
            exit_enabled: false,
            abuse: None,
            metrics: None,
            health: None,
            udp: false,
            udp_idle_secs: 60,
        }
    }
}
