//! The penctl commands: [`parse`] reads one line as Pen's `do_cmd` splits it,
//! [`execute`] applies it to the [`ControlState`] and returns the reply text.
//!
//! Pure: no sockets, no clocks, no files. What only the control thread can
//! do is returned as [`Effect`]s; the running facts a command reports (live
//! counters, clients, the pid, name resolution, `include` files) come
//! through the [`Live`] trait.
//!
//! Replies are Pen 0.34.1's, byte for byte, where Pen has one; the tests
//! quote them as Debian's `pen 0.34.1-2` sent them.
//!
//! Deviation from Pen, by design: Pen reads numbers with `atoi` and stops
//! at the first word it does not understand, so `server 0 max abc` sets
//! max to 0, `timeout -1` sets -1, `acl 12 ...` and `server 0 address
//! nosuch.invalid port 80` quietly do nothing or half of it. Here every
//! argument is checked before anything changes: a bad command changes
//! nothing and replies with one line saying what is wrong.

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::configfile;
use super::state::{ControlState, FastClose, ServerConf, ACL_COUNT};
use super::writecfg::write_config;
use crate::config::{Endpoint, LogTarget, ServerSpec};
use crate::select::acl::AclEntry;
use crate::select::client_table::{ClientEntry, ClientKey};

/// The highest server index `server N` accepts, plus one. Pen grows its
/// table to any N (`server 2000000000` allocates gigabytes); a cap keeps a
/// typo from doing that.
pub const SERVERS_MAX: usize = 4096;

use crate::config::defaults::TABLE_MAX;

/// How deeply `include` files may include others (an include loop stops
/// here rather than recursing forever, as Pen's would).
pub const INCLUDE_DEPTH_MAX: usize = 8;

/// Live counters of one server, as `servers` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerStats {
    /// Connections now.
    pub conns: u32,
    /// Bytes sent to the server.
    pub sent: u64,
    /// Bytes received from the server.
    pub received: u64,
}

/// One connection slot, as `connection N` shows it (Pen's `struct conn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Pen's state bits: 0 unused, 1 connect in progress, 2 connected,
    /// 4 EOF from the server, 8 EOF from the client.
    pub state: u32,
    /// Client socket, -1 if none.
    pub downfd: i32,
    /// Server socket, -1 if none.
    pub upfd: i32,
    /// Index in the client table.
    pub client: i64,
    /// Server index (negative for the emergency and abuse servers).
    pub server: i64,
    /// Pen's `pend`: nonzero while the connect to the server is pending.
    pub pend: i64,
}

impl ConnectionInfo {
    /// An unused slot, printed as Pen prints one.
    pub const UNUSED: ConnectionInfo = ConnectionInfo {
        state: 0,
        downfd: -1,
        upfd: -1,
        client: 0,
        server: 0,
        pend: 0,
    };
}

/// The running facts commands report, read-only. The control thread
/// implements it over the shared counters and tables; tests use a fake.
pub trait Live {
    /// Live counters of server `index` (zeros for one without counters yet).
    fn server_stats(&self, index: usize) -> ServerStats;
    /// The balancer's process id.
    fn pid(&self) -> u32 {
        std::process::id()
    }
    /// Seconds since the Unix epoch (Pen's `now`), for `server N blacklist T`.
    fn now_epoch(&self) -> u64 {
        crate::routing::epoch_now()
    }
    /// Local time as "YYYY-MM-DD HH:MM:SS", for the header `write` writes.
    fn local_time(&self) -> String {
        super::webstats::local_time(self.now_epoch())
    }
    /// Clients whose last connect was at most `secs` seconds ago, in
    /// client-table order (`recent`).
    fn recent_clients(&self, secs: u64) -> Vec<ClientEntry>;
    /// Connection slot `n`, or `None` if it is not in use.
    fn connection(&self, n: usize) -> Option<ConnectionInfo>;
    /// The HTML status page (`status`), rendered for this state.
    fn web_stats(&self, state: &ControlState) -> String;
    /// Pen's `pen_aton` for a host name: the first address the resolver
    /// gives. Address literals are parsed here and never get this far.
    fn resolve(&self, host: &str) -> Option<IpAddr> {
        resolve_blocking(host)
    }
    /// Reads a file named by `include`.
    fn read_file(&self, path: &Path) -> io::Result<String> {
        super::files::read_text(path)
    }
}

/// The first address the system resolver gives for `host`, waiting for it.
pub fn resolve_blocking(host: &str) -> Option<IpAddr> {
    use std::net::ToSocketAddrs;
    (host, 0).to_socket_addrs().ok()?.next().map(|a| a.ip())
}

/// What only the control thread can do, in the order it should happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Open `state.log` afresh (`log FILE`, `no log`): Pen reopens the log
    /// even when the target is unchanged.
    ReopenLog,
    /// Close the listener and listen on `state.listen` (`listen ADDR`).
    Relisten,
    /// Close client connection N (`close N`).
    CloseConnection(usize),
    /// Write `contents` to `path`, replacing it: the configuration (`write`)
    /// or the status page (`status`). A failure is logged, and the command
    /// replies with it instead of its own reply.
    WriteFile { path: PathBuf, contents: String },
    /// Set the diagnostics level (`debug N`).
    DebugLevel(u8),
    /// Stop the balancer cleanly (`exit`, only with `-X`).
    Exit,
}

/// The result of one command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The reply to send before closing the control connection; may be empty.
    pub reply: String,
    /// The state changed: publish a new routing table.
    pub changed: bool,
    /// Work for the control thread, after the state is published.
    pub effects: Vec<Effect>,
    /// The reply instead of `reply` when a file in `effects` cannot be
    /// written: Pen's fixed text, or (None) `cannot write PATH: why`.
    pub write_failure_reply: Option<&'static str>,
}

/// An on/off setting, switched by `NAME` and `no NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    Ascii,
    Hash,
    Http,
    Keepalive,
    Prio,
    Roundrobin,
    Stubborn,
    TcpNodelay,
    Weight,
}

impl Flag {
    const ALL: [Flag; 9] = [
        Flag::Ascii,
        Flag::Hash,
        Flag::Http,
        Flag::Keepalive,
        Flag::Prio,
        Flag::Roundrobin,
        Flag::Stubborn,
        Flag::TcpNodelay,
        Flag::Weight,
    ];

    /// The command word.
    pub fn name(self) -> &'static str {
        match self {
            Flag::Ascii => "ascii",
            Flag::Hash => "hash",
            Flag::Http => "http",
            Flag::Keepalive => "keepalive",
            Flag::Prio => "prio",
            Flag::Roundrobin => "roundrobin",
            Flag::Stubborn => "stubborn",
            Flag::TcpNodelay => "tcp_nodelay",
            Flag::Weight => "weight",
        }
    }

    fn from_name(word: &str) -> Option<Flag> {
        Flag::ALL.into_iter().find(|f| f.name() == word)
    }

    /// The setting this flag switches.
    fn field(self, state: &mut ControlState) -> &mut bool {
        match self {
            Flag::Ascii => &mut state.ascii,
            Flag::Hash => &mut state.mode.hash,
            Flag::Http => &mut state.http,
            Flag::Keepalive => &mut state.keepalive,
            Flag::Prio => &mut state.mode.prio,
            Flag::Roundrobin => &mut state.mode.roundrobin,
            Flag::Stubborn => &mut state.mode.stubborn,
            Flag::TcpNodelay => &mut state.tcp_nodelay,
            Flag::Weight => &mut state.mode.weight,
        }
    }
}

/// One `KEY VALUE` pair of `server N ...`, applied in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerField {
    Acl(u8),
    /// An address literal, a host name (resolved when executed) or a Unix
    /// socket path (anything with a '/').
    Address(String),
    /// Ignored for a Unix socket server, which has no port.
    Port(u16),
    Max(u32),
    Hard(u32),
    /// Blacklist for this many seconds from now; 0 lifts the blacklist.
    Blacklist(u64),
    Weight(u32),
    Prio(u32),
}

/// A place as a command names it, resolved only when executed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A Unix socket (`listen`) or a file (`log`).
    Path(PathBuf),
    /// `host:port`; an empty host means all addresses (`listen` only).
    Net { host: String, port: u16 },
}

/// One parsed penctl command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An empty line or a `#` comment: Pen does nothing and says nothing.
    Nothing,
    /// Accepted without effect; the reply is fixed (possibly empty).
    NoOp(&'static str),
    /// `NAME` / `no NAME`.
    Set(Flag, bool),
    /// `acl N permit|deny ADDRESS [MASK]` / `acl N permit|deny ADDRESS6[/LEN]`.
    Acl {
        list: u8,
        entry: AclEntry,
    },
    /// `no acl N`.
    ClearAcl(u8),
    Blacklist(Option<u64>),
    ClientAcl(Option<u8>),
    ClientsMax(Option<usize>),
    Close(usize),
    Connection(usize),
    ConnMax(Option<usize>),
    Control,
    ControlAcl(Option<u8>),
    Debug(Option<u8>),
    Exit,
    /// ringpen's own: the health-check state of each server.
    Health,
    IdleTimeout(Option<u64>),
    /// `idlers` or `idlers 0`: ringpen keeps no idle connections.
    Idlers,
    Include(PathBuf),
    Listen(Option<Place>),
    Log(Option<Place>),
    NoLog,
    Mode,
    PendingMax(Option<usize>),
    Pid,
    /// `recent [N]`, N defaulting to 300 seconds.
    Recent(u64),
    Server {
        index: usize,
        fields: Vec<ServerField>,
    },
    Servers,
    /// `source ADDRESS`, resolved when executed.
    Source(String),
    Status,
    TcpFastclose(FastClose),
    Timeout(Option<u64>),
    Tracking(Option<u64>),
    WebStats(Option<PathBuf>),
    NoWebStats,
    Write(Option<PathBuf>),
}

impl Command {
    /// The host names running this command would look up (address
    /// literals and Unix paths need none), so that they can be looked up
    /// beforehand, away from the control thread.
    pub fn host_names(&self) -> Vec<&str> {
        let names: Vec<&str> = match self {
            Command::Server { fields, .. } => fields
                .iter()
                .filter_map(|field| match field {
                    ServerField::Address(text) if !text.contains('/') => Some(text.as_str()),
                    _ => None,
                })
                .collect(),
            Command::Listen(Some(Place::Net { host, .. })) | Command::Log(Some(Place::Net { host, .. }))
                if !host.is_empty() =>
            {
                vec![host.as_str()]
            }
            Command::Source(text) => vec![text.as_str()],
            _ => Vec::new(),
        };
        names
            .into_iter()
            .filter(|name| name.parse::<IpAddr>().is_err())
            .collect()
    }

    /// Whether a configuration file (`-F`, `include`) may hold this
    /// command. Commands that act on the running process rather than on
    /// the configuration may not: a reload must not stop the balancer, drop
    /// a connection or overwrite files.
    pub fn allowed_in_file(&self) -> bool {
        !matches!(
            self,
            Command::Exit | Command::Close(_) | Command::Write(_) | Command::Status
        )
    }
}

/// Why a line is not a command ringpen can run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// A command neither Pen nor ringpen knows.
    #[error("unknown command '{0}'")]
    Unknown(String),
    /// A known command with bad arguments, or one that cannot apply here.
    #[error("{0}")]
    Invalid(String),
}

impl CommandError {
    /// The control port's reply: Pen's own text for an unknown command.
    pub fn reply(&self) -> String {
        match self {
            CommandError::Unknown(word) => {
                format!("do_cmd: ignoring command starting with '{word}'\n")
            }
            CommandError::Invalid(message) => format!("{message}\n"),
        }
    }
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

/// The arguments after the command word, consumed front to back.
struct Args<'a> {
    /// The command as errors name it ("timeout", "no acl").
    name: String,
    words: std::vec::IntoIter<&'a str>,
}

impl<'a> Args<'a> {
    fn next(&mut self) -> Option<&'a str> {
        self.words.next()
    }

    fn invalid(&self, why: impl std::fmt::Display) -> CommandError {
        CommandError::Invalid(format!("{}: {why}", self.name))
    }

    fn required(&mut self, what: &str) -> Result<&'a str, CommandError> {
        self.next().ok_or_else(|| self.invalid(format!("missing {what}")))
    }

    /// An optional number: with it the command sets, without it it shows.
    fn optional<T: FromStr>(&mut self, what: &str) -> Result<Option<T>, CommandError> {
        let text = self.next();
        text.map(|text| field_number(&self.name, what, text)).transpose()
    }

    fn required_number<T: FromStr>(&mut self, what: &str) -> Result<T, CommandError> {
        let text = self.required(what)?;
        field_number(&self.name, what, text)
    }

    fn optional_acl(&mut self) -> Result<Option<u8>, CommandError> {
        self.next().map(|text| acl_number(&self.name, text)).transpose()
    }

    /// Pen ignores extra words; a typo there should not pass unnoticed.
    fn finish(mut self) -> Result<(), CommandError> {
        match self.next() {
            None => Ok(()),
            Some(extra) => Err(self.invalid(format_args!("unexpected argument '{extra}'"))),
        }
    }
}

/// Decimal digits only: Pen's `atoi` would read "abc" as 0 and "-1" as -1.
fn number<T: FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A number argument, or the error naming the command and the argument.
fn field_number<T: FromStr>(name: &str, what: &str, text: &str) -> Result<T, CommandError> {
    number(text)
        .ok_or_else(|| CommandError::Invalid(format!("{name}: {what} '{text}' is not a valid number")))
}

fn acl_number(name: &str, text: &str) -> Result<u8, CommandError> {
    number::<u8>(text)
        .filter(|&n| usize::from(n) < ACL_COUNT)
        .ok_or_else(|| {
            CommandError::Invalid(format!(
                "{name}: access list '{text}' is not one of 0 to {}",
                ACL_COUNT - 1
            ))
        })
}

/// Reads one penctl line. As Pen's `do_cmd`: the line ends at the first
/// '\r', then at the first '\n', and words are separated by spaces only
/// (runs of spaces count as one; a tab is part of a word).
pub fn parse(line: &str) -> Result<Command, CommandError> {
    let line = line.split('\r').next().unwrap_or_default();
    let line = line.split('\n').next().unwrap_or_default();
    let mut words = line.split(' ').filter(|w| !w.is_empty());
    let Some(first) = words.next() else {
        return Ok(Command::Nothing);
    };
    if first.starts_with('#') {
        return Ok(Command::Nothing);
    }
    let mut args = Args {
        name: first.to_owned(),
        words: words.collect::<Vec<_>>().into_iter(),
    };
    if first == "no" {
        let Some(what) = args.next() else {
            return Err(args.invalid("missing the setting to turn off"));
        };
        args.name = format!("no {what}");
        let command = parse_no(what, &mut args)?;
        args.finish()?;
        return Ok(command);
    }
    if let Some(flag) = Flag::from_name(first) {
        args.finish()?;
        return Ok(Command::Set(flag, true));
    }
    if let Some(why) = unsupported(first) {
        return Err(CommandError::Invalid(why.to_owned()));
    }
    let command = match first {
        // ringpen never abort()s on purpose: a fatal error exits non-zero.
        "abort_on_error" => Command::NoOp(""),
        // Obsolete since Pen 0.26 and gone from Pen 0.34's do_cmd, which
        // answers them as unknown; we answer the same but accept them, so
        // an old configuration file still loads.
        "block" => Command::NoOp("do_cmd: ignoring command starting with 'block'\n"),
        "delayed_forward" => Command::NoOp("do_cmd: ignoring command starting with 'delayed_forward'\n"),
        // Pen picks its event loop with these; harmless, so accepted.
        "epoll" | "poll" | "select" | "kqueue" => Command::NoOp("ringpen always uses io_uring\n"),
        "acl" => parse_acl(&mut args)?,
        "blacklist" => Command::Blacklist(args.optional("seconds")?),
        "client_acl" => Command::ClientAcl(args.optional_acl()?),
        "clients_max" => Command::ClientsMax(table_size(&mut args)?),
        "close" => Command::Close(args.required_number("connection number")?),
        "connection" => Command::Connection(args.required_number("connection number")?),
        "conn_max" => Command::ConnMax(table_size(&mut args)?),
        "control" => Command::Control,
        "control_acl" => Command::ControlAcl(args.optional_acl()?),
        "debug" => Command::Debug(args.optional("level")?),
        "exit" => Command::Exit,
        "health" => Command::Health,
        "idle_timeout" => Command::IdleTimeout(args.optional("seconds")?),
        "idlers" => match args.optional::<u32>("count")? {
            None | Some(0) => Command::Idlers,
            Some(_) => return Err(args.invalid("idle upstream connections are not supported")),
        },
        "include" => Command::Include(args.required("file name")?.into()),
        "listen" => Command::Listen(args.next().map(parse_listen).transpose()?),
        "log" => Command::Log(args.next().map(parse_log).transpose()?),
        "mode" => Command::Mode,
        "pending_max" => Command::PendingMax(positive(&mut args, "count")?),
        "pid" => Command::Pid,
        "recent" => Command::Recent(args.optional("seconds")?.unwrap_or(300)),
        "server" => parse_server(&mut args)?,
        "servers" => Command::Servers,
        "source" => Command::Source(args.required("address")?.to_owned()),
        "status" => Command::Status,
        "tcp_fastclose" => {
            // Pen's own reply for the missing argument.
            let Some(how) = args.next() else {
                return Err(CommandError::Invalid(
                    "do_cmd: ignoring tcp_fastclose without argument".into(),
                ));
            };
            Command::TcpFastclose(match how {
                "up" => FastClose::Up,
                "down" => FastClose::Down,
                "both" => FastClose::Both,
                "off" => FastClose::Off,
                other => {
                    return Err(args.invalid(format_args!("expected up, down, both or off, not '{other}'")))
                }
            })
        }
        "timeout" => Command::Timeout(positive(&mut args, "seconds")?),
        "tracking" => Command::Tracking(args.optional("seconds")?),
        "web_stats" => Command::WebStats(args.next().map(PathBuf::from)),
        "write" => Command::Write(args.next().map(PathBuf::from)),
        _ => return Err(CommandError::Unknown(first.to_owned())),
    };
    args.finish()?;
    Ok(command)
}

/// Pen features ringpen does not have, with the reason the reply gives.
fn unsupported(word: &str) -> Option<&'static str> {
    Some(match word {
        _ if word.starts_with("ssl_") => "TLS is not available in this version",
        "dsr_if" | "dsr_ip" | "tarpit_acl" => "direct server return is not supported",
        "dummy" => "dummy: the built-in test web server is not available in ringpen",
        "peek" => "peek: choosing the server from the client's first bytes is not supported",
        "transparent" => "transparent: connecting with the client's address is not supported",
        "socket" => "socket: ringpen's connections are not numbered by file descriptor; use connection N",
        _ => return None,
    })
}

/// The word after `no`.
fn parse_no(what: &str, args: &mut Args) -> Result<Command, CommandError> {
    if let Some(flag) = Flag::from_name(what) {
        return Ok(Command::Set(flag, false));
    }
    Ok(match what {
        "abort_on_error" => Command::NoOp(""),
        // Turning off what ringpen never does, or what no longer exists.
        "block" | "delayed_forward" | "dummy" | "peek" | "transparent" => Command::NoOp(""),
        "acl" => {
            let list = args.required("access list")?;
            Command::ClearAcl(acl_number(&args.name, list)?)
        }
        "log" => Command::NoLog,
        "web_stats" => Command::NoWebStats,
        // Pen ignores an unknown `no X` without a word.
        _ => return Err(CommandError::Invalid(format!("no: unknown setting '{what}'"))),
    })
}

/// An optional number of at least 1: a table size, a count, a timeout.
fn positive<T: FromStr + PartialEq + Default>(
    args: &mut Args,
    what: &str,
) -> Result<Option<T>, CommandError> {
    match args.optional::<T>(what)? {
        Some(n) if n == T::default() => Err(args.invalid(format_args!("{what} must be at least 1"))),
        n => Ok(n),
    }
}

/// `clients_max` / `conn_max`: 1 to [`TABLE_MAX`].
fn table_size(args: &mut Args) -> Result<Option<usize>, CommandError> {
    match positive(args, "size")? {
        Some(n) if n > TABLE_MAX => {
            Err(args.invalid(format_args!("size {n} is above the limit of {TABLE_MAX}")))
        }
        n => Ok(n),
    }
}

fn parse_acl(args: &mut Args) -> Result<Command, CommandError> {
    let list = acl_number("acl", args.required("access list")?)?;
    let permit = match args.required("permit or deny")? {
        "permit" => true,
        "deny" => false,
        other => return Err(args.invalid(format_args!("expected permit or deny, not '{other}'"))),
    };
    let address = args.required("address")?;
    if address == "country" {
        return Err(CommandError::Invalid(
            "GeoIP country ACLs are not supported".into(),
        ));
    }
    // As Pen: a ':' makes the entry IPv6, with an optional /length.
    let entry = if address.contains(':') {
        let (addr, len) = match address.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (address, None),
        };
        let addr: Ipv6Addr = addr
            .parse()
            .map_err(|_| args.invalid(format_args!("'{addr}' is not an IPv6 address")))?;
        let len = match len {
            None => 128,
            Some(text) => number::<u8>(text)
                .filter(|&n| n <= 128)
                .ok_or_else(|| args.invalid(format_args!("prefix length '{text}' is not 0 to 128")))?,
        };
        AclEntry::V6 { permit, addr, len }
    } else {
        let mask = args.next();
        let v4 = |text: &str| {
            text.parse::<Ipv4Addr>()
                .map_err(|_| args.invalid(format_args!("'{text}' is not an IPv4 address")))
        };
        let addr = v4(address)?;
        let mask = match mask {
            Some(text) => v4(text)?,
            None => Ipv4Addr::BROADCAST,
        };
        // Pen matches `client & mask == addr`: host bits in addr mean the
        // entry never matches, which is surely not what was meant.
        if u32::from(addr) & !u32::from(mask) != 0 {
            return Err(args.invalid(format_args!(
                "{addr} has bits outside the mask {mask}, so it would never match"
            )));
        }
        AclEntry::V4 { permit, addr, mask }
    };
    Ok(Command::Acl { list, entry })
}

fn parse_server(args: &mut Args) -> Result<Command, CommandError> {
    let text = args.required("server number")?;
    let index = number::<usize>(text)
        .filter(|&n| n < SERVERS_MAX)
        .ok_or_else(|| {
            args.invalid(format_args!(
                "server number '{text}' is not 0 to {}",
                SERVERS_MAX - 1
            ))
        })?;
    args.name = format!("server {index}");
    let mut fields = Vec::new();
    while let Some(key) = args.next() {
        let value = args.required(&format!("the value of {key}"))?;
        fields.push(match key {
            "acl" => ServerField::Acl(acl_number(&args.name, value)?),
            "address" => ServerField::Address(value.to_owned()),
            "port" => ServerField::Port(field_number(&args.name, "port", value)?),
            "max" => ServerField::Max(field_number(&args.name, "max", value)?),
            "hard" => ServerField::Hard(field_number(&args.name, "hard", value)?),
            "blacklist" => ServerField::Blacklist(field_number(&args.name, "blacklist", value)?),
            "weight" => ServerField::Weight(field_number(&args.name, "weight", value)?),
            "prio" => ServerField::Prio(field_number(&args.name, "prio", value)?),
            other => {
                return Err(args.invalid(format_args!(
                    "unknown field '{other}' (acl, address, port, max, hard, blacklist, weight, prio)"
                )))
            }
        });
    }
    Ok(Command::Server { index, fields })
}

/// Splits `host:port` at the last ':' as Pen does (`::1:80` is `::1` port
/// 80), or `[host]:port`; without a ':' the whole text is the port.
fn split_host_port(text: &str) -> Option<(&str, &str)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return Some((host, after.strip_prefix(':')?));
    }
    Some(text.rsplit_once(':').unwrap_or(("", text)))
}

fn nonzero_port(text: &str) -> Option<u16> {
    number::<u16>(text).filter(|&p| p != 0)
}

/// `listen [[addr:]port]` or a Unix socket path (anything with a '/').
fn parse_listen(text: &str) -> Result<Place, CommandError> {
    if text.contains('/') {
        return Ok(Place::Path(text.into()));
    }
    let bad = || CommandError::Invalid(format!("listen: bad address '{text}': expected [host:]port"));
    let (host, port) = split_host_port(text).ok_or_else(bad)?;
    let port = nonzero_port(port).ok_or_else(bad)?;
    Ok(Place::Net {
        host: host.to_owned(),
        port,
    })
}

/// `log FILE|host:port`: as the `-l` option, network when the text has a
/// ':' and no '/'.
fn parse_log(text: &str) -> Result<Place, CommandError> {
    if !text.contains(':') || text.contains('/') {
        return Ok(Place::Path(text.into()));
    }
    let bad = || CommandError::Invalid(format!("log: bad log server '{text}': expected host:port"));
    let (host, port) = split_host_port(text).ok_or_else(bad)?;
    let port = nonzero_port(port).ok_or_else(bad)?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Place::Net {
        host: host.to_owned(),
        port,
    })
}

// ---------------------------------------------------------------------------
// Execution
// ---------------------------------------------------------------------------

/// Runs one command. A command that fails changes nothing and replies with
/// one line saying why.
pub fn execute(state: &mut ControlState, cmd: Command, live: &dyn Live) -> Outcome {
    // Work on a copy and keep it only on success: whatever a command
    // checks late (a host name that does not resolve), nothing is half done.
    let mut next = state.clone();
    match run(&mut next, cmd, live, 0) {
        Ok(mut outcome) => {
            outcome.changed = next != *state;
            *state = next;
            outcome
        }
        Err(message) => Outcome {
            reply: format!("{message}\n"),
            ..Outcome::default()
        },
    }
}

/// Applies `cmd` to `state` (which the caller throws away on error) at
/// include depth `depth`. `changed` is left for the caller to set.
pub(crate) fn run(
    state: &mut ControlState,
    cmd: Command,
    live: &dyn Live,
    depth: usize,
) -> Result<Outcome, String> {
    let mut effects = Vec::new();
    let mut write_failure_reply = None;
    let reply = match cmd {
        Command::Nothing => String::new(),
        Command::NoOp(reply) => reply.to_owned(),
        Command::Set(flag, on) => {
            *flag.field(state) = on;
            String::new()
        }
        Command::Acl { list, entry } => {
            state.acls[usize::from(list)].push(entry);
            String::new()
        }
        Command::ClearAcl(list) => {
            state.acls[usize::from(list)].clear();
            String::new()
        }
        Command::Blacklist(secs) => line(set(&mut state.blacklist_secs, secs)),
        Command::ClientAcl(list) => line(set(&mut state.client_acl, list)),
        Command::ControlAcl(list) => line(set(&mut state.control_acl, list)),
        Command::Timeout(secs) => line(set(&mut state.connect_timeout_secs, secs)),
        Command::Tracking(secs) => line(set(&mut state.tracking_secs, secs)),
        // Pen says nothing when setting it and nothing when asked; asked,
        // we show the value.
        Command::PendingMax(Some(n)) => {
            state.pending_max = n;
            String::new()
        }
        Command::PendingMax(None) => line(state.pending_max),
        // The tables only grow, as in Pen: a smaller size is ignored and
        // the reply shows the size that holds.
        Command::ClientsMax(n) => line(grow(&mut state.clients_max, n)),
        Command::ConnMax(n) => line(grow(&mut state.conn_max, n)),
        Command::Debug(level) => {
            if let Some(level) = level {
                state.debug = level;
                effects.push(Effect::DebugLevel(level));
            }
            line(state.debug)
        }
        Command::IdleTimeout(secs) => {
            format!(
                "Idle timeout: {} seconds\n",
                set(&mut state.idle_timeout_secs, secs)
            )
        }
        Command::Idlers => "Idlers: 0/0\n".to_owned(),
        Command::Close(n) if n >= state.conn_max => out_of_range(n),
        Command::Close(n) => {
            effects.push(Effect::CloseConnection(n));
            format!("Forcibly closing connection {n}\n")
        }
        Command::Connection(n) if n >= state.conn_max => out_of_range(n),
        Command::Connection(n) => {
            let c = live.connection(n).unwrap_or(ConnectionInfo::UNUSED);
            format!(
                "Connection {n}:\nstate = {}\ndownfd = {}, upfd = {}\nclient = {}, server = {}\npend = {}\n",
                c.state, c.downfd, c.upfd, c.client, c.server, c.pend
            )
        }
        Command::Control => state.control.as_ref().map(line).unwrap_or_default(),
        Command::Exit if state.exit_enabled => {
            effects.push(Effect::Exit);
            String::new()
        }
        Command::Exit => "Exit is not enabled; restart with -X flag\n".to_owned(),
        Command::Health => list_servers(state, |_, s| format!("health {}", s.health.name())),
        Command::Servers => list_servers(state, |i, s| {
            let live = live.server_stats(i);
            format!(
                "conn {} max {} hard {} weight {} prio {} sx {} rx {}",
                live.conns, s.spec.max, s.spec.hard, s.spec.weight, s.spec.prio, live.sent, live.received
            )
        }),
        Command::Include(path) => {
            if depth >= INCLUDE_DEPTH_MAX {
                return Err(format!(
                    "include {}: includes nested more than {INCLUDE_DEPTH_MAX} deep",
                    path.display()
                ));
            }
            let text = live
                .read_file(&path)
                .map_err(|e| format!("include {}: {e}", path.display()))?;
            let (next, more) = configfile::apply_nested(state, &text, live, depth + 1)
                .map_err(|e| format!("include {}: {e}", path.display()))?;
            *state = next;
            effects = more;
            String::new()
        }
        Command::Listen(place) => {
            if let Some(place) = place {
                state.listen = match place {
                    Place::Path(path) => Endpoint::Unix(path),
                    Place::Net { host, port } if host.is_empty() => {
                        Endpoint::Inet(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))
                    }
                    Place::Net { host, port } => Endpoint::Inet(SocketAddr::new(ip_of(&host, live)?, port)),
                };
                effects.push(Effect::Relisten);
            }
            line(&state.listen)
        }
        Command::Log(place) => {
            if let Some(place) = place {
                state.log = Some(match place {
                    Place::Path(path) => LogTarget::File(path),
                    Place::Net { host, port } => LogTarget::Udp(SocketAddr::new(ip_of(&host, live)?, port)),
                });
                effects.push(Effect::ReopenLog);
            }
            state.log.as_ref().map(line).unwrap_or_default()
        }
        Command::NoLog => {
            state.log = None;
            effects.push(Effect::ReopenLog);
            String::new()
        }
        Command::Mode => {
            let no = |on: bool| if on { "" } else { "no " };
            let m = state.mode;
            format!(
                "{}hash {}roundrobin {}stubborn {}weight {}prio\n",
                no(m.hash),
                no(m.roundrobin),
                no(m.stubborn),
                no(m.weight),
                no(m.prio)
            )
        }
        Command::Pid => line(live.pid()),
        Command::Recent(secs) => {
            let mut out = String::new();
            for c in live.recent_clients(secs) {
                let addr = match c.key {
                    ClientKey::Ip(ip) => ip.to_string(),
                    ClientKey::Unix => "unix".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "{addr} connects {} sx {} rx {}",
                    c.connects, c.sent, c.received
                );
            }
            out
        }
        Command::Server { index, fields } => {
            set_server(state, index, fields, live)?;
            String::new()
        }
        Command::Source(text) => {
            // Pen's text; Pen sends it without the newline.
            let ip = ip_of(&text, live).map_err(|_| format!("unable to set source address to '{text}'"))?;
            state.source = Some(ip);
            String::new()
        }
        Command::Status => match &state.web_stats {
            None => UNABLE_TO_CREATE_WEBSTATS.to_owned(),
            Some(path) => {
                write_failure_reply = Some(UNABLE_TO_CREATE_WEBSTATS);
                let html = live.web_stats(state);
                effects.push(Effect::WriteFile {
                    path: path.clone(),
                    contents: html.clone(),
                });
                html
            }
        },
        Command::TcpFastclose(how) => {
            state.tcp_fastclose = how;
            String::new()
        }
        Command::WebStats(path) => {
            if path.is_some() {
                state.web_stats = path;
            }
            state
                .web_stats
                .as_ref()
                .map(|p| line(p.display()))
                .unwrap_or_default()
        }
        Command::NoWebStats => {
            state.web_stats = None;
            String::new()
        }
        Command::Write(path) => {
            // Pen writes to the -F file when no file is named.
            let path = path
                .or_else(|| state.config_file.clone())
                .ok_or("write: no file named and no -F configuration file")?;
            let contents = write_config(state, &path, &live.local_time());
            effects.push(Effect::WriteFile { path, contents });
            String::new()
        }
    };
    Ok(Outcome {
        reply,
        changed: false,
        effects,
        write_failure_reply,
    })
}

/// Pen's reply to `status` when there is no status file or it cannot be
/// written.
const UNABLE_TO_CREATE_WEBSTATS: &str = "Unable to create webstats\n";

/// `value` and a newline, Pen's `"%d\n"` / `"%s\n"`.
fn line(value: impl std::fmt::Display) -> String {
    format!("{value}\n")
}

/// Sets `field` if a value is given; returns what holds now.
fn set<T: Copy>(field: &mut T, value: Option<T>) -> T {
    if let Some(value) = value {
        *field = value;
    }
    *field
}

fn grow(field: &mut usize, value: Option<usize>) -> usize {
    *field = (*field).max(value.unwrap_or(0));
    *field
}

fn out_of_range(n: usize) -> String {
    format!("Connection {n} out of range\n")
}

/// One line per server: `N addr A port P ` and what `rest` adds.
fn list_servers(state: &ControlState, rest: impl Fn(usize, &ServerConf) -> String) -> String {
    let mut out = String::new();
    for (i, s) in state.servers.iter().enumerate() {
        let _ = writeln!(
            out,
            "{i} addr {} port {} {}",
            s.spec.addr.host_string(),
            pen_port(&s.spec.addr),
            rest(i, s)
        );
    }
    out
}

/// A server's port as Pen's `pen_getport` shows it: 1 for a Unix socket
/// (checked with Pen: `server 1 address /tmp/x.sock` lists `port 1`).
pub(crate) fn pen_port(addr: &Endpoint) -> u16 {
    match addr {
        Endpoint::Inet(a) => a.port(),
        Endpoint::Unix(_) => 1,
    }
}

/// An address literal, or what the resolver says about a host name.
fn ip_of(host: &str, live: &dyn Live) -> Result<IpAddr, String> {
    if let Ok(ip) = host.parse() {
        return Ok(ip);
    }
    live.resolve(host)
        .ok_or_else(|| format!("cannot resolve host '{host}'"))
}

/// A slot `server N` creates beyond the end of the table: no address, so
/// selection skips it until one is set (Pen shows such slots with an
/// "unknown address family"; we show 0.0.0.0 port 0).
fn empty_server() -> ServerConf {
    ServerConf::new(ServerSpec::new(Endpoint::Inet(SocketAddr::new(
        Ipv4Addr::UNSPECIFIED.into(),
        0,
    ))))
}

fn set_server(
    state: &mut ControlState,
    index: usize,
    fields: Vec<ServerField>,
    live: &dyn Live,
) -> Result<(), String> {
    let mut conf = state.servers.get(index).cloned().unwrap_or_else(empty_server);
    for field in fields {
        match field {
            ServerField::Acl(list) => conf.acl = list,
            ServerField::Address(text) if text.contains('/') => conf.spec.addr = Endpoint::Unix(text.into()),
            ServerField::Address(text) => {
                // A new address keeps the port, as in Pen.
                let ip = ip_of(&text, live).map_err(|why| format!("server {index}: {why}"))?;
                conf.spec.addr = Endpoint::Inet(SocketAddr::new(ip, conf.spec.addr.port()));
            }
            ServerField::Port(port) => {
                if let Endpoint::Inet(addr) = &mut conf.spec.addr {
                    addr.set_port(port);
                }
            }
            ServerField::Max(n) => conf.spec.max = n,
            ServerField::Hard(n) => conf.spec.hard = n,
            ServerField::Blacklist(secs) => conf.blacklist_for(secs, live.now_epoch(), state.blacklist_secs),
            ServerField::Weight(n) => conf.spec.weight = n,
            ServerField::Prio(n) => conf.spec.prio = n,
        }
    }
    if index >= state.servers.len() {
        state.servers.resize_with(index + 1, empty_server);
    }
    state.servers[index] = conf;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Config;
    use crate::control::state::Health;
    use std::collections::HashMap;
    use std::net::Ipv6Addr;

    /// A `Live` with fixed answers.
    #[derive(Default)]
    pub(crate) struct FakeLive {
        pub stats: HashMap<usize, ServerStats>,
        pub clients: Vec<ClientEntry>,
        pub connections: HashMap<usize, ConnectionInfo>,
        pub files: HashMap<PathBuf, String>,
    }

    impl Live for FakeLive {
        fn server_stats(&self, index: usize) -> ServerStats {
            self.stats.get(&index).copied().unwrap_or_default()
        }
        fn pid(&self) -> u32 {
            4525
        }
        fn now_epoch(&self) -> u64 {
            1_000_000
        }
        fn local_time(&self) -> String {
            "2026-11-25 20:36:01".into()
        }
        fn recent_clients(&self, secs: u64) -> Vec<ClientEntry> {
            let now = self.now_epoch();
            self.clients
                .iter()
                .filter(|c| now.saturating_sub(c.last_secs) <= secs)
                .copied()
                .collect()
        }
        fn connection(&self, n: usize) -> Option<ConnectionInfo> {
            self.connections.get(&n).copied()
        }
        fn web_stats(&self, state: &ControlState) -> String {
            format!("<html>{} servers</html>\n", state.servers.len())
        }
        fn resolve(&self, host: &str) -> Option<IpAddr> {
            (host == "localhost").then_some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        }
        fn read_file(&self, path: &Path) -> io::Result<String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
    }

    fn inet(s: &str) -> Endpoint {
        Endpoint::Inet(s.parse().unwrap())
    }

    /// The state of `pen -C 127.0.0.1:18001 127.0.0.1:18000 127.0.0.1:18002
    /// 127.0.0.1:18003`, the setup the replies below were taken from.
    pub(crate) fn pen_state() -> ControlState {
        let server = |a: &str| ServerSpec::new(inet(a));
        let mut config = Config::with_defaults(
            inet("127.0.0.1:18000"),
            vec![server("127.0.0.1:18002"), server("127.0.0.1:18003")],
        );
        config.user = Some("root".into());
        config.control = Some(inet("127.0.0.1:18001"));
        ControlState::from_config(&config)
    }

    /// Parses and runs `line`, as the control port does.
    pub(crate) fn cmd(state: &mut ControlState, line: &str, live: &FakeLive) -> Outcome {
        match parse(line) {
            Ok(c) => execute(state, c, live),
            Err(e) => Outcome {
                reply: e.reply(),
                ..Outcome::default()
            },
        }
    }

    /// Runs `line`, which must succeed.
    pub(crate) fn succeed(state: &mut ControlState, line: &str, live: &FakeLive) -> Outcome {
        let command = parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        run(state, command, live, 0).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn reply(state: &mut ControlState, line: &str) -> String {
        cmd(state, line, &FakeLive::default()).reply
    }

    // Replies checked byte for byte (`penctl ... | od -c`) against Debian's
    // pen 0.34.1-2 started as in `pen_state`.

    #[test]
    fn servers_as_pen() {
        let mut s = pen_state();
        let mut live = FakeLive::default();
        live.stats.insert(
            0,
            ServerStats {
                conns: 0,
                sent: 3,
                received: 5,
            },
        );
        assert_eq!(
            cmd(&mut s, "servers", &live).reply,
            "0 addr 127.0.0.1 port 18002 conn 0 max 0 hard 0 weight 0 prio 0 sx 3 rx 5\n\
             1 addr 127.0.0.1 port 18003 conn 0 max 0 hard 0 weight 0 prio 0 sx 0 rx 0\n"
        );
    }

    #[test]
    fn queries_as_pen() {
        let mut s = pen_state();
        let live = FakeLive::default();
        for (line, want) in [
            ("mode", "no hash no roundrobin no stubborn no weight no prio\n"),
            ("blacklist", "30\n"),
            ("timeout", "3\n"),
            ("tracking", "0\n"),
            ("clients_max", "2048\n"),
            ("conn_max", "500\n"),
            ("listen", "127.0.0.1:18000\n"),
            ("control", "127.0.0.1:18001\n"),
            ("log", ""),
            ("web_stats", ""),
            ("pid", "4525\n"),
            ("recent", ""),
            ("control_acl", "0\n"),
            ("client_acl", "0\n"),
            ("debug", "0\n"),
            ("idle_timeout", "Idle timeout: 0 seconds\n"),
            ("idlers", "Idlers: 0/0\n"),
            ("status", "Unable to create webstats\n"),
            ("exit", "Exit is not enabled; restart with -X flag\n"),
            ("close 600", "Connection 600 out of range\n"),
            ("connection 600", "Connection 600 out of range\n"),
            (
                "connection 0",
                "Connection 0:\nstate = 0\ndownfd = -1, upfd = -1\nclient = 0, server = 0\npend = 0\n",
            ),
            ("foo", "do_cmd: ignoring command starting with 'foo'\n"),
            ("block", "do_cmd: ignoring command starting with 'block'\n"),
            (
                "delayed_forward",
                "do_cmd: ignoring command starting with 'delayed_forward'\n",
            ),
            ("no block", ""),
            ("no delayed_forward", ""),
            ("#x", ""),
            (
                "tcp_fastclose",
                "do_cmd: ignoring tcp_fastclose without argument\n",
            ),
            ("keepalive", ""),
            ("write /tmp/x", ""),
        ] {
            let out = cmd(&mut s, line, &live);
            assert_eq!(out.reply, want, "{line}");
            assert_eq!(s, pen_state(), "{line} changed the state");
        }
    }

    #[test]
    fn setters_reply_as_pen() {
        let mut s = pen_state();
        let live = FakeLive::default();
        for (line, want) in [
            ("conn_max 600", "600\n"),
            ("clients_max 100", "2048\n"),
            ("clients_max 3000", "3000\n"),
            ("debug 2", "2\n"),
            ("log /tmp/penlog1", "/tmp/penlog1\n"),
            ("web_stats /tmp/penws1", "/tmp/penws1\n"),
            ("listen 127.0.0.1:18004", "127.0.0.1:18004\n"),
            ("listen", "127.0.0.1:18004\n"),
            ("idle_timeout 7", "Idle timeout: 7 seconds\n"),
            ("blacklist 10", "10\n"),
            ("timeout 5", "5\n"),
            ("tracking 60", "60\n"),
            ("client_acl 3", "3\n"),
            ("control_acl 4", "4\n"),
        ] {
            assert_eq!(cmd(&mut s, line, &live).reply, want, "{line}");
        }
        assert_eq!(s.conn_max, 600);
        assert_eq!(s.clients_max, 3000);
        assert_eq!(s.debug, 2);
        assert_eq!(s.log, Some(LogTarget::File("/tmp/penlog1".into())));
        assert_eq!(s.web_stats, Some("/tmp/penws1".into()));
        assert_eq!(s.listen, inet("127.0.0.1:18004"));
        assert_eq!(
            (
                s.idle_timeout_secs,
                s.blacklist_secs,
                s.connect_timeout_secs,
                s.tracking_secs
            ),
            (7, 10, 5, 60)
        );
        assert_eq!((s.client_acl, s.control_acl), (3, 4));
    }

    #[test]
    fn effects_and_changed() {
        let mut s = pen_state();
        let live = FakeLive::default();
        let out = cmd(&mut s, "debug 3", &live);
        assert_eq!(out.effects, vec![Effect::DebugLevel(3)]);
        assert!(out.changed);
        let out = cmd(&mut s, "debug", &live);
        assert!(out.effects.is_empty() && !out.changed);
        let out = cmd(&mut s, "listen 18005", &live);
        assert_eq!(
            (out.reply.as_str(), out.effects.as_slice()),
            ("0.0.0.0:18005\n", &[Effect::Relisten][..])
        );
        assert_eq!(cmd(&mut s, "listen [::1]:18006", &live).reply, "[::1]:18006\n");
        assert_eq!(cmd(&mut s, "listen ::1:18007", &live).reply, "[::1]:18007\n");
        assert_eq!(
            cmd(&mut s, "listen /run/pen.sock", &live).reply,
            "/run/pen.sock\n"
        );
        assert_eq!(s.listen, Endpoint::Unix("/run/pen.sock".into()));
        assert_eq!(cmd(&mut s, "log", &live).effects, vec![]);
        let out = cmd(&mut s, "log localhost:514", &live);
        assert_eq!(
            (out.reply.as_str(), out.effects.as_slice()),
            ("127.0.0.1:514\n", &[Effect::ReopenLog][..])
        );
        let out = cmd(&mut s, "no log", &live);
        assert_eq!(
            (out.reply.as_str(), out.effects.as_slice()),
            ("", &[Effect::ReopenLog][..])
        );
        assert_eq!(s.log, None);
        let out = cmd(&mut s, "close 7", &live);
        assert_eq!(out.reply, "Forcibly closing connection 7\n");
        assert_eq!(out.effects, vec![Effect::CloseConnection(7)]);
        assert!(!out.changed);
        s.exit_enabled = true;
        let out = cmd(&mut s, "exit", &live);
        assert_eq!(
            (out.reply.as_str(), out.effects.as_slice()),
            ("", &[Effect::Exit][..])
        );
    }

    #[test]
    fn flags_and_their_no_forms() {
        let mut s = pen_state();
        for flag in Flag::ALL {
            for on in [true, false, true] {
                let line = if on {
                    flag.name().to_owned()
                } else {
                    format!("no {}", flag.name())
                };
                assert_eq!(reply(&mut s, &line), "", "{line}");
                assert_eq!(*flag.field(&mut s), on, "{line}");
            }
        }
        assert_eq!(reply(&mut s, "mode"), "hash roundrobin stubborn weight prio\n");
        assert!(s.ascii && s.http && s.keepalive && s.tcp_nodelay);
    }

    #[test]
    fn server_edits_grow_the_table() {
        let mut s = pen_state();
        let out = cmd(
            &mut s,
            "server 4 address 10.0.0.9 port 99 max 5 hard 7 weight 3 prio 2 acl 1",
            &FakeLive::default(),
        );
        assert_eq!(out.reply, "");
        assert!(out.changed);
        // Pen prints "(unknown address family" for the slots in between.
        assert_eq!(
            reply(&mut s, "servers"),
            "0 addr 127.0.0.1 port 18002 conn 0 max 0 hard 0 weight 0 prio 0 sx 0 rx 0\n\
             1 addr 127.0.0.1 port 18003 conn 0 max 0 hard 0 weight 0 prio 0 sx 0 rx 0\n\
             2 addr 0.0.0.0 port 0 conn 0 max 0 hard 0 weight 0 prio 0 sx 0 rx 0\n\
             3 addr 0.0.0.0 port 0 conn 0 max 0 hard 0 weight 0 prio 0 sx 0 rx 0\n\
             4 addr 10.0.0.9 port 99 conn 0 max 5 hard 7 weight 3 prio 2 sx 0 rx 0\n"
        );
        assert_eq!(s.servers[4].acl, 1);
        // A new address keeps the port (checked with Pen: `server 0
        // address 10.0.0.1`, then `address ::1`, still port 18002).
        reply(&mut s, "server 0 address localhost");
        reply(&mut s, "server 0 address ::1");
        assert_eq!(s.servers[0].spec.addr, inet("[::1]:18002"));
        reply(&mut s, "server 1 address /run/db.sock port 5");
        assert_eq!(s.servers[1].spec.addr, Endpoint::Unix("/run/db.sock".into()));
        let listed = reply(&mut s, "servers");
        assert_eq!(
            listed.lines().nth(1),
            Some("1 addr /run/db.sock port 1 conn 0 max 0 hard 0 weight 0 prio 0 sx 0 rx 0")
        );
        assert_eq!(reply(&mut s, "server 7"), "");
        assert_eq!(s.servers.len(), 8);
    }

    #[test]
    fn server_blacklist_is_pens_status_arithmetic() {
        let mut s = pen_state();
        let live = FakeLive::default();
        let now = live.now_epoch();
        cmd(&mut s, "server 1 blacklist 100", &live);
        assert_eq!(s.servers[1].status, now + 100 - 30);
        assert!(s.servers[1].is_blacklisted(now + 99, s.blacklist_secs));
        assert!(!s.servers[1].is_blacklisted(now + 100, s.blacklist_secs));
        cmd(&mut s, "server 1 blacklist 18446744073709551615", &live);
        assert_eq!(s.servers[1].status, u64::MAX - 30);
        cmd(&mut s, "server 1 blacklist 0", &live);
        assert!(!s.servers[1].is_blacklisted(now, s.blacklist_secs));
    }

    #[test]
    fn health_lists_each_server() {
        let mut s = pen_state();
        s.servers[1].health = Health::Drain;
        assert_eq!(
            reply(&mut s, "health"),
            "0 addr 127.0.0.1 port 18002 health unchecked\n1 addr 127.0.0.1 port 18003 health drain\n"
        );
    }

    #[test]
    fn acls() {
        let mut s = pen_state();
        for line in [
            "acl 1 permit 10.0.0.0 255.0.0.0",
            "acl 1 deny 10.1.2.3",
            "acl 2 permit ::1/64",
            "acl 2 deny fd00::",
        ] {
            assert_eq!(reply(&mut s, line), "", "{line}");
        }
        let shown: Vec<String> = s.acls[1]
            .iter()
            .chain(&s.acls[2])
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            shown,
            [
                "permit 10.0.0.0 255.0.0.0",
                "deny 10.1.2.3 255.255.255.255",
                "permit ::1/64",
                "deny fd00::/128"
            ]
        );
        assert_eq!(reply(&mut s, "no acl 1"), "");
        assert!(s.acls[1].is_empty() && s.acls[2].len() == 2);
    }

    #[test]
    fn recent_and_connection_use_live_facts() {
        let mut s = pen_state();
        let mut live = FakeLive::default();
        let client = |ip: &str, last_secs| ClientEntry {
            slot: 0,
            key: ClientKey::Ip(ip.parse().unwrap()),
            last_secs,
            server: Some(0),
            connects: 1,
            sent: 5,
            received: 3,
        };
        live.clients = vec![client("127.0.0.1", 999_990), client("10.0.0.1", 999_000)];
        assert_eq!(
            cmd(&mut s, "recent", &live).reply,
            "127.0.0.1 connects 1 sx 5 rx 3\n"
        );
        assert_eq!(cmd(&mut s, "recent 5", &live).reply, "");
        assert_eq!(cmd(&mut s, "recent 1000", &live).reply.lines().count(), 2);
        live.connections.insert(
            3,
            ConnectionInfo {
                state: 2,
                downfd: 9,
                upfd: 10,
                client: 1,
                server: 0,
                pend: 0,
            },
        );
        assert_eq!(
            cmd(&mut s, "connection 3", &live).reply,
            "Connection 3:\nstate = 2\ndownfd = 9, upfd = 10\nclient = 1, server = 0\npend = 0\n"
        );
    }

    #[test]
    fn status_write_and_web_stats() {
        let mut s = pen_state();
        let live = FakeLive::default();
        assert_eq!(
            cmd(&mut s, "write", &live).reply,
            "write: no file named and no -F configuration file\n"
        );
        s.config_file = Some("/etc/pen.cfg".into());
        let out = cmd(&mut s, "write", &live);
        let Effect::WriteFile { path, contents } = &out.effects[0] else {
            panic!("{:?}", out.effects)
        };
        assert_eq!(path, Path::new("/etc/pen.cfg"));
        assert!(contents.starts_with("# Generated by pen 2026-11-25 20:36:01\n"));
        cmd(&mut s, "web_stats /tmp/ws.html", &live);
        let out = cmd(&mut s, "status", &live);
        assert_eq!(out.reply, "<html>2 servers</html>\n");
        assert_eq!(
            out.effects,
            vec![Effect::WriteFile {
                path: "/tmp/ws.html".into(),
                contents: out.reply.clone()
            }]
        );
        assert_eq!(reply(&mut s, "no web_stats"), "");
        assert_eq!(s.web_stats, None);
    }

    #[test]
    fn source_tcp_fastclose_pending_max() {
        let mut s = pen_state();
        assert_eq!(reply(&mut s, "source 10.0.0.1"), "");
        assert_eq!(s.source, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(reply(&mut s, "source localhost"), "");
        assert_eq!(s.source, Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        for (how, want) in [
            ("up", FastClose::Up),
            ("down", FastClose::Down),
            ("both", FastClose::Both),
            ("off", FastClose::Off),
        ] {
            assert_eq!(reply(&mut s, &format!("tcp_fastclose {how}")), "");
            assert_eq!(s.tcp_fastclose, want);
        }
        assert_eq!(reply(&mut s, "pending_max"), "100\n");
        assert_eq!(reply(&mut s, "pending_max 7"), "");
        assert_eq!(s.pending_max, 7);
    }

    #[test]
    fn include_applies_a_file() {
        let mut s = pen_state();
        let mut live = FakeLive::default();
        live.files
            .insert("/a".into(), "# comment\nhash\ninclude /b\n".into());
        live.files.insert("/b".into(), "\nblacklist 9\ndebug 1\n".into());
        let out = cmd(&mut s, "include /a", &live);
        assert_eq!(out.reply, "");
        assert!(out.changed);
        assert_eq!(out.effects, vec![Effect::DebugLevel(1)]);
        assert!(s.mode.hash);
        assert_eq!(s.blacklist_secs, 9);

        live.files.insert("/bad".into(), "hash\ntimeout x\n".into());
        let before = s.clone();
        assert_eq!(
            cmd(&mut s, "include /bad", &live).reply,
            "include /bad: line 2: timeout: seconds 'x' is not a valid number\n"
        );
        assert_eq!(s, before);
        assert_eq!(
            cmd(&mut s, "include /none", &live).reply,
            format!("include /none: {}\n", io::Error::from(io::ErrorKind::NotFound))
        );
        live.files.insert("/loop".into(), "include /loop\n".into());
        let out = cmd(&mut s, "include /loop", &live).reply;
        assert!(out.ends_with("includes nested more than 8 deep\n"), "{out}");
        assert_eq!(out.matches("line 1: ").count(), INCLUDE_DEPTH_MAX, "{out}");
    }

    #[test]
    fn parse_splits_like_do_cmd() {
        assert_eq!(parse("servers\r\nignored"), Ok(Command::Servers));
        assert_eq!(parse("  timeout   5  \n"), Ok(Command::Timeout(Some(5))));
        assert_eq!(parse(""), Ok(Command::Nothing));
        assert_eq!(parse("   "), Ok(Command::Nothing));
        assert_eq!(parse("# servers"), Ok(Command::Nothing));
        assert_eq!(parse("\tservers"), Err(CommandError::Unknown("\tservers".into())));
        assert_eq!(parse("recent"), Ok(Command::Recent(300)));
        assert_eq!(
            parse("server 1 max 5 blacklist 0"),
            Ok(Command::Server {
                index: 1,
                fields: vec![ServerField::Max(5), ServerField::Blacklist(0)]
            })
        );
        assert_eq!(
            parse("acl 9 deny 2001:db8::/32"),
            Ok(Command::Acl {
                list: 9,
                entry: AclEntry::V6 {
                    permit: false,
                    addr: Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
                    len: 32
                }
            })
        );
        assert_eq!(parse("no hash"), Ok(Command::Set(Flag::Hash, false)));
        assert_eq!(
            parse("log a:b/c"),
            Ok(Command::Log(Some(Place::Path("a:b/c".into()))))
        );
        assert_eq!(parse("abort_on_error"), Ok(Command::NoOp("")));
        assert_eq!(parse("no abort_on_error"), Ok(Command::NoOp("")));
        assert_eq!(parse("idlers 0"), Ok(Command::Idlers));
    }

    #[test]
    fn features_ringpen_lacks_are_explained() {
        let mut s = pen_state();
        for (line, want) in [
            ("epoll", "ringpen always uses io_uring\n"),
            ("poll", "ringpen always uses io_uring\n"),
            ("select", "ringpen always uses io_uring\n"),
            ("kqueue", "ringpen always uses io_uring\n"),
            ("ssl_ciphers HIGH", "TLS is not available in this version\n"),
            ("ssl_option no_sslv3", "TLS is not available in this version\n"),
            ("dsr_if eth0", "direct server return is not supported\n"),
            ("dsr_ip 10.0.0.1", "direct server return is not supported\n"),
            ("tarpit_acl 1", "direct server return is not supported\n"),
            (
                "acl 1 permit country SE",
                "GeoIP country ACLs are not supported\n",
            ),
            (
                "idlers 3",
                "idlers: idle upstream connections are not supported\n",
            ),
            ("no dummy", ""),
            ("no transparent", ""),
            ("no peek", ""),
        ] {
            assert_eq!(reply(&mut s, line), want, "{line}");
        }
        for line in ["dummy", "peek", "transparent", "socket 3"] {
            let out = reply(&mut s, line);
            let word = line.split(' ').next().unwrap();
            assert!(out.starts_with(&format!("{word}: ")), "{line}: {out}");
            assert_eq!(out.matches('\n').count(), 1, "{out}");
        }
        assert_eq!(s, pen_state());
    }

    #[test]
    fn host_names_are_those_a_command_would_look_up() {
        let names = |line: &str| -> Vec<String> {
            parse(line)
                .unwrap()
                .host_names()
                .into_iter()
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(
            names("server 2 address db1.example port 3306 address ::1 address /run/x.sock"),
            ["db1.example"]
        );
        assert_eq!(names("listen db2.example:3306"), ["db2.example"]);
        assert_eq!(names("listen :3306"), Vec::<String>::new());
        assert_eq!(names("log logs.example:514"), ["logs.example"]);
        assert_eq!(names("source 10.0.0.5"), Vec::<String>::new());
        assert_eq!(names("source lb.example"), ["lb.example"]);
        assert_eq!(names("servers"), Vec::<String>::new());
    }

    #[test]
    fn bad_arguments_change_nothing() {
        let mut s = pen_state();
        for (line, want) in [
            ("server 0 max abc", "server 0: max 'abc' is not a valid number"),
            ("server 0 max 5 weight", "server 0: missing the value of weight"),
            (
                "server 0 max 5 colour red",
                "server 0: unknown field 'colour' (acl, address, port, max, hard, blacklist, weight, prio)",
            ),
            (
                "server 0 max 5 address nosuch.invalid",
                "server 0: cannot resolve host 'nosuch.invalid'",
            ),
            (
                "server 0 port 70000",
                "server 0: port '70000' is not a valid number",
            ),
            (
                "server 0 acl 10",
                "server 0: access list '10' is not one of 0 to 9",
            ),
            ("server -1", "server: server number '-1' is not 0 to 4095"),
            ("server 4096", "server: server number '4096' is not 0 to 4095"),
            ("server", "server: missing server number"),
            (
                "acl 12 permit 1.2.3.4",
                "acl: access list '12' is not one of 0 to 9",
            ),
            ("acl 1 allow 1.2.3.4", "acl: expected permit or deny, not 'allow'"),
            ("acl 1 permit 1.2.3", "acl: '1.2.3' is not an IPv4 address"),
            (
                "acl 1 permit 10.1.2.3 255.0.0.0",
                "acl: 10.1.2.3 has bits outside the mask 255.0.0.0, so it would never match",
            ),
            (
                "acl 1 permit 10.0.0.0 255.0.0.0 x",
                "acl: unexpected argument 'x'",
            ),
            ("acl 1 permit ::1/129", "acl: prefix length '129' is not 0 to 128"),
            ("acl 1 permit :::1", "acl: ':::1' is not an IPv6 address"),
            ("acl 1 permit", "acl: missing address"),
            ("no acl", "no acl: missing access list"),
            ("no acl 10", "no acl: access list '10' is not one of 0 to 9"),
            ("no", "no: missing the setting to turn off"),
            ("no such", "no: unknown setting 'such'"),
            ("timeout -1", "timeout: seconds '-1' is not a valid number"),
            ("timeout 0", "timeout: seconds must be at least 1"),
            ("blacklist 1x", "blacklist: seconds '1x' is not a valid number"),
            ("tracking 5 6", "tracking: unexpected argument '6'"),
            ("clients_max 0", "clients_max: size must be at least 1"),
            ("conn_max many", "conn_max: size 'many' is not a valid number"),
            (
                "conn_max 16777217",
                "conn_max: size 16777217 is above the limit of 16777216",
            ),
            (
                "server 1 blacklist 18446744073709551615 max x",
                "server 1: max 'x' is not a valid number",
            ),
            ("pending_max 0", "pending_max: count must be at least 1"),
            (
                "client_acl 10",
                "client_acl: access list '10' is not one of 0 to 9",
            ),
            (
                "control_acl -1",
                "control_acl: access list '-1' is not one of 0 to 9",
            ),
            ("debug 256", "debug: level '256' is not a valid number"),
            (
                "idle_timeout -5",
                "idle_timeout: seconds '-5' is not a valid number",
            ),
            ("close", "close: missing connection number"),
            ("close -1", "close: connection number '-1' is not a valid number"),
            (
                "connection x",
                "connection: connection number 'x' is not a valid number",
            ),
            (
                "tcp_fastclose sideways",
                "tcp_fastclose: expected up, down, both or off, not 'sideways'",
            ),
            ("listen 0", "listen: bad address '0': expected [host:]port"),
            ("listen nosuch.invalid:80", "cannot resolve host 'nosuch.invalid'"),
            ("log :514", "log: bad log server ':514': expected host:port"),
            ("log nosuch.invalid:514", "cannot resolve host 'nosuch.invalid'"),
            ("source", "source: missing address"),
            (
                "source nosuch.invalid",
                "unable to set source address to 'nosuch.invalid'",
            ),
            ("include", "include: missing file name"),
            ("servers all", "servers: unexpected argument 'all'"),
            ("recent -1", "recent: seconds '-1' is not a valid number"),
        ] {
            assert_eq!(reply(&mut s, line), format!("{want}\n"), "{line}");
            assert_eq!(s, pen_state(), "{line} changed the state");
        }
    }

    /// Random command lines, from the grammar's shapes with random arguments
    /// and from random words and junk: none may panic, a line that does not
    /// parse gets one line back and changes nothing, and whatever state the
    /// accepted ones build, `write` turns into a file that restores it.
    #[test]
    fn random_commands_never_panic_and_their_state_writes_back() {
        // Shapes; `N` a number, `A` an address or path, `F` a server field,
        // `V` a field's value, `P` permit or deny, `W` any word.
        #[rustfmt::skip]
        const SHAPES: &[&str] = &[
            "acl N P A", "acl N P A A", "no acl N", "client_acl N", "control_acl N",
            "server N F V", "server N F V F V F V", "blacklist N", "tracking N", "timeout N",
            "clients_max N", "conn_max N", "pending_max N", "idle_timeout N", "debug N",
            "recent N", "close N", "connection N", "log A", "no log", "listen A", "source A",
            "web_stats A", "no web_stats", "include A", "tcp_fastclose W", "idlers N", "W",
            "no W", "W N", "servers", "status", "mode", "health", "write A", "write",
        ];
        #[rustfmt::skip]
        const NUMBERS: &[&str] = &[
            "0", "1", "2", "3", "7", "9", "10", "-1", "00", "+5", "1e3", "255", "256", "4095",
            "4096", "65535", "65536", "16777216", "4294967296", "18446744073709551616",
        ];
        #[rustfmt::skip]
        const ADDRESSES: &[&str] = &[
            "127.0.0.1", "::1", "localhost", "10.0.0.0", "255.0.0.0", "255.255.255.255",
            "10.0.0.0/8", "10.1.2.3/8", "2001:db8::/32", "::/0", "1.2.3", "/run/x.sock",
            "/loop", "/cfg", "a:b", "localhost:80", ":80", "[::1]:80", "localhost:0",
        ];
        #[rustfmt::skip]
        const FIELDS: &[&str] = &["acl", "address", "port", "max", "hard", "blacklist", "weight", "prio"];
        #[rustfmt::skip]
        const WORDS: &[&str] = &[
            "ascii", "hash", "http", "keepalive", "prio", "roundrobin", "stubborn",
            "tcp_nodelay", "weight", "up", "down", "both", "off", "abort_on_error", "block",
            "dummy", "peek", "socket", "ssl_cert", "poll", "exit", "pid", "control", "#", "",
        ];
        let mut rng = crate::test_rng::TestRng::new(0x2545_F491_4F6C_DD1D);
        let mut next = move |below: usize| rng.below(below);
        let mut live = FakeLive::default();
        live.files.insert("/loop".into(), "include /loop\n".into());
        live.files.insert(
            "/cfg".into(),
            "server 2 address ::1 port 81\nhash\nacl 3 deny ::1\n".into(),
        );
        let mut s = pen_state();
        for round in 1..=30_000 {
            let shape = SHAPES[next(SHAPES.len())];
            let mut words = Vec::new();
            for placeholder in shape.split(' ') {
                let pool = match placeholder {
                    "N" => NUMBERS,
                    "A" => ADDRESSES,
                    "F" => FIELDS,
                    "V" if next(2) == 0 => NUMBERS,
                    "V" => ADDRESSES,
                    "P" => &["permit", "deny"],
                    "W" => WORDS,
                    literal => {
                        words.push(literal.to_owned());
                        continue;
                    }
                };
                words.push(if next(12) == 0 {
                    (0..next(5))
                        .map(|_| char::from_u32(next(0x250) as u32).unwrap_or('?'))
                        .collect()
                } else {
                    pool[next(pool.len())].to_owned()
                });
            }
            if next(10) == 0 {
                words.push(ADDRESSES[next(ADDRESSES.len())].to_owned());
            }
            let line = words.join(" ");
            let before = s.clone();
            let refused = parse(&line).is_err();
            let reply = cmd(&mut s, &line, &live).reply;
            assert!(reply.is_empty() || reply.ends_with('\n'), "{line:?} -> {reply:?}");
            if refused {
                assert_eq!(reply.matches('\n').count(), 1, "{line:?} -> {reply:?}");
                assert_eq!(s, before, "{line:?} changed the state but was refused");
            }
            if round % 500 == 0 {
                let text = write_config(&s, Path::new("/etc/pen.cfg"), "2026-11-26 05:00:00");
                // What a restart with the suggested command line and `-F`
                // starts from; blacklisting and health are not written.
                let mut base = pen_state();
                base.listen = s.listen.clone();
                base.servers.resize(s.servers.len(), base.servers[0].clone());
                for (restored, written) in base.servers.iter_mut().zip(&s.servers) {
                    restored.status = written.status;
                    restored.operator_blacklist_until = written.operator_blacklist_until;
                    restored.health = written.health;
                }
                let (restored, _) = configfile::apply(&base, &text, &live)
                    .unwrap_or_else(|e| panic!("the written file does not load: {e}\n{text}"));
                assert_eq!(restored, s, "\n{text}");
                // Start afresh, so that one huge table (`server 4095`) does
                // not slow every later round.
                s = pen_state();
            }
        }
    }
}
