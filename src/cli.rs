//! The Pen command line, turned into a [`Config`].
//!
//! Pen reads its options with getopt(3), so `-fr`, `-b10` and `-b 10` all
//! work, options may follow the addresses, and `-h` is the hash flag, not
//! help. We accept every letter of Pen's optstring
//! (`B:C:F:O:S:T:b:c:e:i:j:l:m:o:p:q:t:u:w:x:DHNPQWXUadfhnrs`, plus the TLS
//! `E:K:G:A:ZRL:`) so that a working Pen command line never fails with
//! "unknown option": the options we build take effect, the ones Pen itself
//! ignores are ignored with a notice, and the ones we do not build are refused
//! with one clear line rather than silently dropped.
//!
//! Host names are resolved here, once, as Pen does at startup; the first
//! answer is kept.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches};

use crate::config::{
    defaults, CheckKind, Config, DonorPolicy, Endpoint, HealthOptions, LogTarget, Mode, OnDown, ServerSpec,
};

/// What the command line asks for.
// Made once per process, so the size of `Config` inline does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start balancing with this configuration.
    Run(Config),
    /// `--help`: this text goes to stdout, exit status 0.
    Help(String),
    /// `--version`: this text goes to stdout, exit status 0.
    Version(String),
}

/// A command line that parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub command: Command,
    /// One-line messages for stderr about options that were ignored or
    /// adjusted, as Pen prints them, without a "ringpen:" prefix.
    pub notices: Vec<String>,
}

/// A bad command line. Its text is one line that names the offending
/// argument, without a "ringpen:" prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CliError(String);

/// Pen options this version does not build: letter, whether getopt takes a
/// value for it, and what it is. Refusing beats ignoring: a user who asks for
/// a control port or TLS must not get a balancer without one.
#[rustfmt::skip]
const REFUSED: &[(&str, bool, &str)] = &[
    ("a", false, "ASCII dumps"),
    ("i", true, "Windows service"),
    // Listed in Pen's usage() but missing from its switch: Pen rejects it too.
    ("N", false, "hash without saving the server, which Pen never implemented"),
    ("E", true, "TLS"),
    ("K", true, "TLS"),
    ("G", true, "TLS"),
    ("A", true, "TLS"),
    ("Z", false, "TLS"),
    ("R", false, "TLS"),
    ("L", true, "TLS"),
];

/// Pen options that change nothing here: letter, whether getopt takes a value
/// for it, and the rest of the notice. `-D -Q -S -n` are obsolete in Pen
/// itself, which prints a message and carries on; we do the same.
#[rustfmt::skip]
const IGNORED: &[(&str, bool, &str)] = &[
    ("P", false, "(poll) ignored: the event backend is always io_uring"),
    ("D", false, "ignored: obsolete since Pen 0.26.0 removed delayed forwarding"),
    ("Q", false, "ignored: obsolete since Pen 0.26.0 picks kqueue by itself"),
    ("S", true, "ignored: obsolete since Pen 0.28.1 grows the server table as needed"),
    ("n", false, "ignored: obsolete since Pen 0.26.0 uses only nonblocking sockets"),
];

/// Parses the command line; `args` starts with the program name.
pub fn parse<I, T>(args: I) -> Result<Parsed, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    parse_with_env(args, |name| std::env::var(name).ok())
}

/// [`parse`] with the environment given, so tests do not depend on it.
pub fn parse_with_env<I, T>(args: I, env: impl Fn(&str) -> Option<String>) -> Result<Parsed, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = clap_command().try_get_matches_from(args).map_err(from_clap)?;
    let mut notices = Vec::new();
    let command = if matches.get_flag("help") {
        Command::Help(usage())
    } else if matches.get_flag("version") {
        Command::Version(format!("ringpen {}\n", env!("CARGO_PKG_VERSION")))
    } else {
        refuse(&matches)?;
        for &(id, _, rest) in IGNORED {
            if given(&matches, id) {
                notices.push(format!("-{id} {rest}"));
            }
        }
        Command::Run(build_config(&matches, &env, &mut notices)?)
    };
    Ok(Parsed { command, notices })
}

// ---------------------------------------------------------------------------
// The clap definition
// ---------------------------------------------------------------------------

// Option ids are the letters themselves, as `&'static str` because clap's
// `string` feature (owned ids) is not enabled.

/// Pen's options that take a value and that we build.
const BUILT_VALUED: &[&str] = &[
    "B", "b", "C", "c", "e", "F", "j", "l", "m", "p", "q", "t", "T", "u", "w", "x",
];
/// Pen's flags that we build (`-d` counts, so it is defined on its own).
const BUILT_FLAGS: &[&str] = &["f", "h", "H", "r", "s", "U", "W", "X"];
/// ringpen's own long options with a value (health checks, metrics).
const LONG_VALUED: &[&str] = &["workers", "metrics", "check", "udp-idle"];
/// The long options that only mean something with `--check` (and take a value).
const CHECK_TUNING: &[&str] = &[
    "check-interval",
    "check-timeout",
    "rise",
    "fall",
    "check-user",
    "check-password-file",
    "donor",
    "on-down",
];
/// Where `--check galera` reads its password when no file is given.
pub const PASSWORD_ENV: &str = "RINGPEN_CHECK_PASSWORD";

fn clap_command() -> clap::Command {
    let mut cmd = clap::Command::new("ringpen")
        // `-h` is Pen's hash flag, and we print our own usage text.
        .disable_help_flag(true)
        .disable_version_flag(true)
        // getopt: when an option is repeated, the last value wins.
        .args_override_self(true)
        .arg(Arg::new("d").short('d').action(ArgAction::Count))
        // -O and -o may repeat; each is one penctl command, in order.
        .arg(valued_short("O").action(ArgAction::Append))
        .arg(valued_short("o").action(ArgAction::Append))
        .arg(flag_long("help"))
        .arg(flag_long("version"))
        .arg(
            Arg::new("address")
                .num_args(0..)
                .action(ArgAction::Append)
                .value_parser(clap::value_parser!(OsString)),
        );
    let table = REFUSED.iter().chain(IGNORED);
    let valued = BUILT_VALUED
        .iter()
        .chain(table.clone().filter(|e| e.1).map(|e| &e.0));
    let flags = BUILT_FLAGS.iter().chain(table.filter(|e| !e.1).map(|e| &e.0));
    for &id in valued {
        cmd = cmd.arg(valued_short(id));
    }
    for &name in LONG_VALUED.iter().chain(CHECK_TUNING) {
        cmd = cmd.arg(valued_long(name));
    }
    for &id in flags {
        cmd = cmd.arg(Arg::new(id).short(letter(id)).action(ArgAction::SetTrue));
    }
    cmd
}

/// A short option with a value. Like getopt, the next word is the value even
/// when it starts with '-', so `-x -5` reaches our number check.
fn valued_short(id: &'static str) -> Arg {
    Arg::new(id)
        .short(letter(id))
        .num_args(1)
        .allow_hyphen_values(true)
        .value_parser(clap::value_parser!(OsString))
}

fn valued_long(name: &'static str) -> Arg {
    Arg::new(name)
        .long(name)
        .num_args(1)
        .allow_hyphen_values(true)
        .value_parser(clap::value_parser!(OsString))
}

fn flag_long(name: &'static str) -> Arg {
    Arg::new(name).long(name).action(ArgAction::SetTrue)
}

fn letter(id: &str) -> char {
    id.chars().next().expect("option ids are not empty")
}

/// Whether the option appeared on the command line (flags have a default of
/// `false`, so being in the matches would not tell).
fn given(m: &ArgMatches, id: &str) -> bool {
    m.value_source(id) == Some(ValueSource::CommandLine)
}

/// clap's errors are multi-line and styled; ours are one line.
fn from_clap(e: clap::Error) -> CliError {
    // clap names the argument with its value placeholder, e.g. "-b <b>".
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.split(' ').next().map(str::to_owned),
        _ => None,
    };
    let text = match (e.kind(), arg) {
        (ErrorKind::UnknownArgument, Some(arg)) => format!("unknown option '{arg}'"),
        (ErrorKind::InvalidValue | ErrorKind::WrongNumberOfValues, Some(arg)) => {
            format!("option {arg} needs a value")
        }
        _ => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or_default();
            first.trim_start_matches("error: ").to_owned()
        }
    };
    CliError(text)
}

/// Fails on the first refused option, in command-line order.
fn refuse(m: &ArgMatches) -> Result<(), CliError> {
    let first = REFUSED
        .iter()
        .filter(|e| given(m, e.0))
        .min_by_key(|e| m.index_of(e.0));
    match first {
        Some((id, _, what)) => Err(CliError(format!(
            "-{id} ({what}) is not available in this version"
        ))),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Building the Config
// ---------------------------------------------------------------------------

fn build_config(
    m: &ArgMatches,
    env: &dyn Fn(&str) -> Option<String>,
    notices: &mut Vec<String>,
) -> Result<Config, CliError> {
    // Options before addresses: a typo in an option should not wait on DNS.
    // Pen bumps a too small -m or -q and says so; it refuses -t 0.
    let mut accepts_per_wakeup = number(m, "m")?.unwrap_or(defaults::ACCEPTS_PER_WAKEUP);
    if accepts_per_wakeup < 1 {
        notices.push("-m 0 raised to 1".into());
        accepts_per_wakeup = 1;
    }
    let mut backlog = number(m, "q")?.unwrap_or(defaults::BACKLOG);
    if backlog < defaults::BACKLOG_MIN {
        notices.push(format!("-q {backlog} raised to {}", defaults::BACKLOG_MIN));
        backlog = defaults::BACKLOG_MIN;
    }
    let blacklist_secs = number(m, "b")?.unwrap_or(defaults::BLACKLIST_SECS);
    // Pen silently keeps its defaults for -c 0 and -x 0 (its tables only
    // grow); we refuse them instead.
    let clients_max = at_most(m, "c", defaults::TABLE_MAX)?.unwrap_or(defaults::CLIENTS_MAX);
    let tracking_secs = number(m, "T")?.unwrap_or(0);
    let conn_max = at_most(m, "x", defaults::TABLE_MAX)?.unwrap_or(defaults::CONN_MAX);
    let connect_timeout_secs = positive(m, "t")?.unwrap_or(defaults::CONNECT_TIMEOUT_SECS);
    let available = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let workers =
        at_most(m, "workers", defaults::WORKERS_MAX)?.unwrap_or(available.min(defaults::WORKERS_MAX));
    let pid_file = path(m, "p")?;
    let chroot = path(m, "j")?;
    let user = match value(m, "u") {
        Some(v) => Some(utf8(non_empty(v, "u")?, "-u")?.to_owned()),
        None => None,
    };
    let log = match value(m, "l") {
        Some(v) => Some(parse_log(non_empty(v, "l")?)?),
        None => None,
    };
    let control = match value(m, "C") {
        Some(v) => {
            Some(parse_listen(utf8(non_empty(v, "C")?, "-C")?, c"tcp").map_err(|e| prefixed("-C", e))?)
        }
        None => None,
    };
    let health = health_options(m, env)?;
    let udp = given(m, "U");
    if udp && health.is_some() {
        // The checks speak TCP (a connect, a MySQL login): they would judge a
        // UDP backend by a port it does not serve.
        return Err(CliError(
            "--check cannot be used with -U: the checks are TCP, the backends UDP".into(),
        ));
    }
    if !udp && given(m, "udp-idle") {
        return Err(CliError("--udp-idle needs -U".into()));
    }
    let udp_idle_secs = positive(m, "udp-idle")?.unwrap_or(60);
    let metrics = match value(m, "metrics") {
        Some(v) => Some(parse_metrics(utf8(v, "--metrics")?)?),
        None => None,
    };
    let startup_commands = ["O", "o"]
        .iter()
        .flat_map(|id| {
            let indices = m.indices_of(id).into_iter().flatten();
            let values = m.get_many::<OsString>(id).into_iter().flatten();
            indices.zip(values)
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_values()
        .map(|v| utf8(v, "-o").map(str::to_owned))
        .collect::<Result<Vec<_>, _>>()?;
    // Service names are looked up for the protocol balanced, as Pen does.
    let proto = if udp { c"udp" } else { c"tcp" };
    let (listen, servers, emergency) = addresses(m, proto)?;
    let abuse = match value(m, "B") {
        Some(v) => {
            let text = utf8(non_empty(v, "B")?, "-B")?;
            let listen_port = match &listen {
                Endpoint::Inet(addr) => Some(addr.port()),
                Endpoint::Unix(_) => None,
            };
            Some(parse_server(text, "abuse server (-B)", listen_port, proto)?)
        }
        None => None,
    };
    Ok(Config {
        listen,
        servers,
        emergency,
        mode: Mode {
            roundrobin: given(m, "r"),
            hash: given(m, "h"),
            stubborn: given(m, "s"),
            weight: given(m, "W"),
            // Only penctl's `prio` sets it.
            prio: false,
        },
        blacklist_secs,
        clients_max,
        tracking_secs,
        conn_max,
        connect_timeout_secs,
        accepts_per_wakeup,
        backlog,
        http: given(m, "H"),
        debug: m.get_count("d"),
        foreground: given(m, "f"),
        log,
        pid_file,
        user,
        chroot,
        workers,
        control,
        config_file: path(m, "F")?,
        startup_commands,
        web_stats: path(m, "w")?,
        exit_enabled: given(m, "X"),
        abuse,
        metrics,
        health,
        udp,
        udp_idle_secs,
    })
}

/// `CliError` for a value of option `opt`.
fn prefixed(opt: &str, e: CliError) -> CliError {
    CliError(format!("{opt}: {}", e.0))
}

/// `--metrics [host:]port`; the host defaults to 127.0.0.1, so the
/// endpoint is not public unless asked for.
fn parse_metrics(text: &str) -> Result<SocketAddr, CliError> {
    let bad = |why: String| CliError(format!("bad --metrics '{text}': {why}"));
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host.trim_start_matches('[').trim_end_matches(']'), port),
        None => ("127.0.0.1", text),
    };
    let port = nonzero_port(port, c"tcp").map_err(bad)?;
    resolve(if host.is_empty() { "0.0.0.0" } else { host }, port)
}

/// `--check` and its tuning options.
fn health_options(
    m: &ArgMatches,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<HealthOptions>, CliError> {
    let Some(kind) = value(m, "check") else {
        return match CHECK_TUNING.iter().find(|id| given(m, id)) {
            Some(id) => Err(CliError(format!("--{id} needs --check tcp|mysql|galera"))),
            None => Ok(None),
        };
    };
    let kind = match utf8(kind, "--check")? {
        "tcp" => CheckKind::Tcp,
        "mysql" => CheckKind::Mysql,
        "galera" => CheckKind::Galera,
        other => {
            return Err(CliError(format!(
                "--check must be tcp, mysql or galera, not '{other}'"
            )))
        }
    };
    let seconds = |id: &str, default: f64| -> Result<Duration, CliError> {
        match value(m, id) {
            None => Ok(Duration::from_secs_f64(default)),
            Some(v) => {
                let text = utf8(v, id)?;
                text.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s < 86_400.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| {
                        CliError(format!("--{id} needs a positive number of seconds, got '{text}'"))
                    })
            }
        }
    };
    let count = |id: &str| -> Result<u32, CliError> { Ok(positive(m, id)?.unwrap_or(2)) };
    let choice = |id: &str, names: &[&str]| -> Result<usize, CliError> {
        match value(m, id) {
            None => Ok(0),
            Some(v) => {
                let text = utf8(v, id)?;
                names
                    .iter()
                    .position(|n| *n == text)
                    .ok_or_else(|| CliError(format!("--{id} must be {}, not '{text}'", names.join(" or "))))
            }
        }
    };
    // Options the chosen check would not use are refused, not ignored.
    let needs = |id: &str, kinds: &[CheckKind], names: &str| match given(m, id) && !kinds.contains(&kind) {
        true => Err(CliError(format!("--{id} needs --check {names}"))),
        false => Ok(()),
    };
    for id in ["check-user", "check-password-file"] {
        needs(id, &[CheckKind::Mysql, CheckKind::Galera], "mysql or galera")?;
    }
    needs("donor", &[CheckKind::Galera], "galera")?;
    let user = match value(m, "check-user") {
        Some(v) => Some(utf8(non_empty(v, "check-user")?, "--check-user")?.to_owned()),
        None => None,
    };
    let password = match value(m, "check-password-file") {
        Some(file) => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                CliError(format!(
                    "cannot read --check-password-file '{}': {e}",
                    file.to_string_lossy()
                ))
            })?;
            // A trailing newline is how editors save files, not part of the password.
            Some(text.trim_end_matches(['\r', '\n']).to_owned())
        }
        None => env(PASSWORD_ENV),
    };
    if kind == CheckKind::Galera {
        if user.is_none() {
            return Err(CliError("--check galera needs --check-user USER".into()));
        }
        if password.is_none() {
            return Err(CliError(format!(
                "--check galera needs a password: --check-password-file FILE or the {PASSWORD_ENV} environment variable"
            )));
        }
    }
    Ok(Some(HealthOptions {
        kind,
        interval: seconds("check-interval", 1.0)?,
        timeout: seconds("check-timeout", 1.0)?,
        rise: count("rise")?,
        fall: count("fall")?,
        user,
        password,
        donor: [DonorPolicy::Drain, DonorPolicy::Down, DonorPolicy::Up]
            [choice("donor", &["drain", "down", "up"])?],
        on_down: [OnDown::Keep, OnDown::Close][choice("on-down", &["keep", "close"])?],
    }))
}

/// The listen address, the backends and the `-e` server, which defaults to
/// the listen port like the backends.
fn addresses(
    m: &ArgMatches,
    proto: &CStr,
) -> Result<(Endpoint, Vec<ServerSpec>, Option<ServerSpec>), CliError> {
    let mut args = m
        .get_many::<OsString>("address")
        .into_iter()
        .flatten()
        .map(|a| utf8(a, "address"));
    let listen = match args.next() {
        Some(arg) => parse_listen(arg?, proto)?,
        None => return Err(CliError("no listen address given".into())),
    };
    let listen_port = match &listen {
        Endpoint::Inet(addr) => Some(addr.port()),
        Endpoint::Unix(_) => None,
    };
    let servers = args
        .map(|arg| parse_server(arg?, "backend", listen_port, proto))
        .collect::<Result<Vec<_>, _>>()?;
    // With -F the servers may all come from the file (Pen's `write` output
    // names none on its command line); the start checks there are some.
    if servers.is_empty() && value(m, "F").is_none() {
        return Err(CliError("no backend servers given".into()));
    }
    let emergency = match value(m, "e") {
        Some(arg) => Some(parse_server(
            utf8(arg, "-e")?,
            "emergency server (-e)",
            listen_port,
            proto,
        )?),
        None => None,
    };
    Ok((listen, servers, emergency))
}

fn value<'a>(m: &'a ArgMatches, id: &str) -> Option<&'a OsString> {
    m.get_one::<OsString>(id)
}

/// How an option is written on the command line, from its clap id.
fn spelling(id: &str) -> String {
    if id.len() == 1 {
        format!("-{id}")
    } else {
        format!("--{id}")
    }
}

fn utf8<'a>(value: &'a OsStr, what: &str) -> Result<&'a str, CliError> {
    value
        .to_str()
        .ok_or_else(|| CliError(format!("{what} '{}' is not valid UTF-8", value.to_string_lossy())))
}

/// A non-negative decimal integer. Pen uses atoi(3) and sscanf("%d"), which
/// read garbage as 0 and accept signs; we refuse both.
fn decimal<T: FromStr>(text: &str) -> Option<T> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

/// The option's value as a number, if the option was given.
fn number<T: FromStr>(m: &ArgMatches, id: &str) -> Result<Option<T>, CliError> {
    let Some(raw) = value(m, id) else {
        return Ok(None);
    };
    let (option, text) = (spelling(id), raw.to_string_lossy());
    match decimal(&text) {
        Some(n) => Ok(Some(n)),
        None if decimal::<u128>(&text).is_some() => Err(CliError(format!(
            "option {option} value '{text}' is out of range"
        ))),
        None => Err(CliError(format!("option {option} needs a number, got '{text}'"))),
    }
}

/// Like [`number`], for options where 0 makes no sense.
fn positive<T: FromStr + Default + PartialEq>(m: &ArgMatches, id: &str) -> Result<Option<T>, CliError> {
    let n = number(m, id)?;
    if n == Some(T::default()) {
        let text = value(m, id).map(|v| v.to_string_lossy()).unwrap_or_default();
        return Err(CliError(format!(
            "option {} must be at least 1, got '{text}'",
            spelling(id)
        )));
    }
    Ok(n)
}

/// Like [`positive`], up to `max`: `-c` and `-x` (as `penctl` allows),
/// `--workers`.
fn at_most(m: &ArgMatches, id: &str, max: usize) -> Result<Option<usize>, CliError> {
    match positive(m, id)? {
        Some(n) if n > max => Err(CliError(format!(
            "option {} value {n} is above the limit of {max}",
            spelling(id)
        ))),
        n => Ok(n),
    }
}

fn non_empty<'a>(value: &'a OsStr, id: &str) -> Result<&'a OsStr, CliError> {
    if value.is_empty() {
        return Err(CliError(format!(
            "option {} needs a non-empty value",
            spelling(id)
        )));
    }
    Ok(value)
}

fn path(m: &ArgMatches, id: &str) -> Result<Option<PathBuf>, CliError> {
    value(m, id)
        .map(|v| non_empty(v, id).map(PathBuf::from))
        .transpose()
}

// ---------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------

/// The listen address: `port`, `host:port`, `[ipv6]:port` or a Unix socket
/// path (anything with a '/', as in Pen's `open_listener`). A service name
/// is looked up for `proto`.
fn parse_listen(arg: &str, proto: &CStr) -> Result<Endpoint, CliError> {
    if arg.contains('/') {
        return Ok(Endpoint::Unix(arg.into()));
    }
    let bad = |why: String| CliError(format!("bad listen address '{arg}': {why}"));
    let (host, port_text) = split_host_port(arg).map_err(bad)?;
    let port = nonzero_port(port_text, proto).map_err(bad)?;
    // Pen defaults to 0.0.0.0; it would fail on an empty host (":8080"),
    // which we read as "no host" too.
    if host.is_empty() {
        return Ok(Endpoint::Inet(SocketAddr::new(
            Ipv4Addr::UNSPECIFIED.into(),
            port,
        )));
    }
    resolve(host, port).map(Endpoint::Inet)
}

/// Splits `[host:]port` at the LAST ':', as Pen does, so `:::2222` is `::`
/// port 2222; also takes `[ipv6]:port`, which Pen does not. No ':' means the
/// whole argument is the port.
fn split_host_port(arg: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = arg.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("missing ']'")?;
        let port = after.strip_prefix(':').ok_or("expected ':port' after ']'")?;
        return Ok((host, port));
    }
    Ok(match arg.rfind(':') {
        Some(i) => (&arg[..i], &arg[i + 1..]),
        None => ("", arg),
    })
}

/// A backend (or `-e` server): `host[:port[:max[:hard[:weight[:prio]]]]]` or
/// `[ipv6][:port...]`, Pen's `setaddress`. Fields left out are 0; a missing
/// or empty port is the listen port. Pen's sscanf would stop at an empty
/// field (`host::10` loses the 10); we read on.
///
/// A host with a '/' is a Unix socket (Pen's `pen_aton`). It has no port,
/// but the port field keeps its place so that Pen's layout still holds
/// (`/run/app.sock::10` has max 10); a port given there is checked and
/// ignored, as Pen ignores it.
fn parse_server(
    arg: &str,
    what: &str,
    default_port: Option<u16>,
    proto: &CStr,
) -> Result<ServerSpec, CliError> {
    let bad = |why: &str| CliError(format!("bad {what} '{arg}': {why}"));
    let (host, fields) = match arg.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or_else(|| bad("missing ']'"))?;
            let fields = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad("expected ':' after ']'"))?,
                ),
            };
            (host, fields)
        }
        None => match arg.split_once(':') {
            Some((host, fields)) => (host, Some(fields)),
            None => (arg, None),
        },
    };
    if host.is_empty() {
        // Pen's format splits at the first ':', so a bare IPv6 address
        // (`::1`) reads as an empty host.
        let hint = match arg.matches(':').count() {
            0 | 1 => "",
            _ => " (an IPv6 address goes in brackets: [::1]:80)",
        };
        return Err(bad(&format!("empty host{hint}")));
    }
    let fields: Vec<&str> = fields.map_or_else(Vec::new, |f| f.split(':').collect());
    if fields.len() > 5 {
        return Err(bad("too many fields"));
    }
    let limit = |index: usize, name: &str| match fields.get(index) {
        None => Ok(0),
        Some(text) => decimal(text).ok_or_else(|| bad(&format!("{name} '{text}' is not a number"))),
    };
    let (max, hard, weight, prio) = (
        limit(1, "max")?,
        limit(2, "hard")?,
        limit(3, "weight")?,
        limit(4, "prio")?,
    );
    // Port 0 is allowed: Pen keeps such a server but never uses it.
    let port = match fields.first().filter(|p| !p.is_empty()) {
        Some(text) => Some(parse_port(text, proto).map_err(|why| bad(&why))?),
        None => default_port,
    };
    let addr = if host.contains('/') {
        let addr = Endpoint::Unix(host.into());
        // The listen address gets this check from bind; a backend's would
        // only fail at every connect.
        addr.to_sockaddr().map_err(|e| bad(&e.to_string()))?;
        addr
    } else {
        let port = port.ok_or_else(|| bad("no port, and a Unix listen address has none to lend"))?;
        Endpoint::Inet(resolve(host, port)?)
    };
    Ok(ServerSpec {
        addr,
        max,
        hard,
        weight,
        prio,
    })
}

/// `-l`: Pen's `open_log` sends the log over UDP when the argument has a ':'
/// and does not start with '/', else appends to a file. We make any '/' mean
/// a file, so `logs/a:b` is a file rather than an unresolvable host
/// `logs/a`. Pen resolves only IPv4 (gethostbyname); we take IPv6 as well,
/// as `[ipv6]:port` or split at the last ':' like the listen address.
fn parse_log(arg: &OsStr) -> Result<LogTarget, CliError> {
    let Some(text) = arg.to_str().filter(|t| t.contains(':') && !t.contains('/')) else {
        return Ok(LogTarget::File(arg.into()));
    };
    let bad = |why: String| CliError(format!("bad log server (-l) '{text}': {why}"));
    let (host, port_text) = split_host_port(text).map_err(bad)?;
    if host.is_empty() {
        return Err(bad("empty host".into()));
    }
    let port = nonzero_port(port_text, c"udp").map_err(bad)?;
    resolve(host, port).map(LogTarget::Udp)
}

/// A port number or a service name (Pen's `getport`); the error is the
/// reason, for the caller to put in context.
fn parse_port(text: &str, proto: &CStr) -> Result<u16, String> {
    if text.is_empty() {
        return Err("missing port".into());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return decimal(text).ok_or_else(|| "port out of range".into());
    }
    service_port(text, proto).ok_or_else(|| format!("unknown port or service '{text}'"))
}

/// A port to listen on or send to, where 0 would mean nothing.
fn nonzero_port(text: &str, proto: &CStr) -> Result<u16, String> {
    match parse_port(text, proto)? {
        0 => Err("port out of range".into()),
        n => Ok(n),
    }
}

/// Looks a service name up in the services database (/etc/services or
/// whatever NSS says), as Pen does with getservbyname(3).
fn service_port(name: &str, proto: &CStr) -> Option<u16> {
    // getservbyname returns static storage that the next call overwrites;
    // the lock keeps our callers (tests run in parallel) from racing on it.
    static LOCK: Mutex<()> = Mutex::new(());
    let name = CString::new(name).ok()?;
    let _guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    // SAFETY: both arguments are NUL-terminated strings that outlive the
    // call; the result is NULL or points to a valid servent, read before the
    // lock is released.
    let raw = unsafe {
        let entry = libc::getservbyname(name.as_ptr(), proto.as_ptr());
        entry.as_ref().map(|e| e.s_port)
    }?;
    // s_port holds the port in network byte order in its low 16 bits.
    Some(u16::from_be(raw as u16))
}

/// Pen's `pen_aton`: an address literal, or else the first answer from the
/// resolver, looked up once now.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, CliError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut answers| answers.next())
        .ok_or_else(|| CliError(format!("cannot resolve host '{host}'")))
}

// ---------------------------------------------------------------------------
// Usage
// ---------------------------------------------------------------------------

fn usage() -> String {
    format!(
        "\
usage: ringpen [options] [host:]port|/path h1[:p1[:maxc1[:hard1[:weight1[:prio1]]]]] ...

A Pen-compatible TCP load balancer. Options are Pen's, getopt style:
-fr, -b10 and -b 10 all work.

Options:
  -b sec        blacklist time in seconds [{blacklist}]
  -c N          max number of clients [{clients}]
  -d            debugging on (repeat -d for more)
  -e host:port  emergency server of last resort
  -f            stay in foreground
  -h            use hash for initial server selection
  -H            add X-Forwarded-For header in http requests
  -j dir        run in chroot
  -l file|host:port  log requests to a file, or over UDP to host:port
  -m N          accept up to N connections per wakeup [{accepts}]
  -p file       write pid to file
  -q N          listen backlog [{backlog}, at least {backlog_min}]
  -r            bypass client tracking in server selection
  -s            stubborn selection, i.e. don't fail over
  -t sec        connect timeout in seconds [{timeout}]
  -T sec        tracking time in seconds (0 = forever) [0]
  -u user       run as alternative user
  -W            use weight for server selection
  -x N          max number of simultaneous connections [{conns}]
  -B host:port  abuse server for clients the client ACL denies
  -C [host:]port|/path  control port for penctl (as root only with -u)
  -F file       configuration file of penctl commands (re-read on SIGHUP)
  -O cmd, -o cmd  penctl command to run at startup (repeatable)
  -w file       HTML status file (written on SIGUSR1 and by `status`)
  -X            enable the penctl `exit` command
  -U            balance UDP: one flow per client address:port
  --udp-idle sec  a UDP flow ends after this long without traffic [60]
  --workers N   data-plane threads [number of CPUs]
  --metrics [host:]port  Prometheus text at GET /metrics [host 127.0.0.1]
  --help        print this text
  --version     print the version

Active health checks (ringpen's own; without --check, Pen's passive blacklisting):
  --check tcp|mysql|galera  what to check
  --check-interval sec      between checks [1]
  --check-timeout sec       per check [1]
  --rise N, --fall N        successes to come back, failures to go out [2]
  --check-user user         MariaDB user (needed by galera)
  --check-password-file f   its password (or env RINGPEN_CHECK_PASSWORD)
  --donor drain|down|up     what a Galera Donor/Desynced node gets [drain]
  --on-down keep|close      existing connections of a node going down [keep]

Accepted and ignored:
  -P            poll(): the event backend is always io_uring
  -D -Q -n -S N obsolete in Pen itself

Not available in this version (refused with an error):
  -a            ASCII dumps
  -i name       Windows service
  -N            hash without saving the server (never implemented by Pen)
  -E -K -G -A -Z -R -L  TLS

example:
  ringpen smtp mailhost1:smtp mailhost2:25 mailhost3
",
        blacklist = defaults::BLACKLIST_SECS,
        clients = defaults::CLIENTS_MAX,
        accepts = defaults::ACCEPTS_PER_WAKEUP,
        backlog = defaults::BACKLOG,
        backlog_min = defaults::BACKLOG_MIN,
        timeout = defaults::CONNECT_TIMEOUT_SECS,
        conns = defaults::CONN_MAX,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_args(args: &[&str]) -> Result<Parsed, CliError> {
        parse(std::iter::once("ringpen").chain(args.iter().copied()))
    }

    fn run(args: &[&str]) -> Config {
        match parse_args(args) {
            Ok(Parsed {
                command: Command::Run(config),
                ..
            }) => config,
            other => panic!("{args:?}: expected a config, got {other:?}"),
        }
    }

    fn notices(args: &[&str]) -> Vec<String> {
        parse_args(args).expect("parses").notices
    }

    fn error(args: &[&str]) -> String {
        let text = match parse_args(args) {
            Err(e) => e.to_string(),
            Ok(parsed) => panic!("{args:?}: expected an error, got {parsed:?}"),
        };
        assert!(!text.contains('\n'), "not one line: {text:?}");
        assert!(!text.starts_with("ringpen:"), "prefixed: {text:?}");
        text
    }

    fn inet(s: &str) -> Endpoint {
        Endpoint::Inet(s.parse().unwrap())
    }

    fn server(s: &str) -> ServerSpec {
        ServerSpec::new(inet(s))
    }

    #[test]
    fn defaults_are_pens() {
        let config = run(&["8080", "127.0.0.1"]);
        let expected = Config {
            listen: inet("0.0.0.0:8080"),
            servers: vec![server("127.0.0.1:8080")],
            emergency: None,
            mode: Mode::default(),
            blacklist_secs: 30,
            clients_max: 2048,
            tracking_secs: 0,
            conn_max: 500,
            connect_timeout_secs: 3,
            accepts_per_wakeup: 100,
            backlog: 500,
            http: false,
            debug: 0,
            foreground: false,
            log: None,
            pid_file: None,
            user: None,
            chroot: None,
            workers: std::thread::available_parallelism().unwrap().get(),
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
        };
        assert_eq!(config, expected);
        assert!(notices(&["8080", "127.0.0.1"]).is_empty());
    }

    #[test]
    fn every_built_option() {
        let config = run(&[
            "-b",
            "7",
            "-c",
            "99",
            "-d",
            "-d",
            "-e",
            "10.0.0.9",
            "-f",
            "-h",
            "-H",
            "-j",
            "/var/empty",
            "-l",
            "/tmp/pen.log",
            "-m",
            "5",
            "-p",
            "/run/pen.pid",
            "-q",
            "64",
            "-r",
            "-s",
            "-t",
            "9",
            "-T",
            "60",
            "-u",
            "nobody",
            "-W",
            "-x",
            "1000",
            "--workers",
            "3",
            "8080",
            "10.0.0.1",
        ]);
        assert_eq!(config.blacklist_secs, 7);
        assert_eq!(config.clients_max, 99);
        assert_eq!(config.debug, 2);
        assert_eq!(config.emergency, Some(server("10.0.0.9:8080")));
        assert!(config.foreground);
        let mode = Mode {
            roundrobin: true,
            hash: true,
            stubborn: true,
            weight: true,
            prio: false,
        };
        assert_eq!(config.mode, mode);
        assert!(config.http);
        assert_eq!(config.chroot, Some(PathBuf::from("/var/empty")));
        assert_eq!(config.log, Some(LogTarget::File("/tmp/pen.log".into())));
        assert_eq!(config.accepts_per_wakeup, 5);
        assert_eq!(config.pid_file, Some(PathBuf::from("/run/pen.pid")));
        assert_eq!(config.backlog, 64);
        assert_eq!(config.connect_timeout_secs, 9);
        assert_eq!(config.tracking_secs, 60);
        assert_eq!(config.user.as_deref(), Some("nobody"));
        assert_eq!(config.conn_max, 1000);
        assert_eq!(config.workers, 3);
    }

    #[test]
    fn getopt_style_short_options() {
        let combined = run(&["-frdd", "-b10", "-x", "20", "8080", "127.0.0.1:1", "-sW"]);
        assert!(combined.foreground && combined.mode.roundrobin);
        assert!(combined.mode.stubborn && combined.mode.weight);
        assert_eq!(combined.debug, 2);
        assert_eq!(combined.blacklist_secs, 10);
        assert_eq!(combined.conn_max, 20);
        // A value glued to a flag cluster, and the last of repeated options.
        let glued = run(&["-fb10", "-t", "4", "-t5", "8080", "127.0.0.1"]);
        assert_eq!(glued.blacklist_secs, 10);
        assert_eq!(glued.connect_timeout_secs, 5);
        assert_eq!(run(&["--workers=2", "80", "127.0.0.1"]).workers, 2);
    }

    #[test]
    fn h_is_hash_not_help() {
        assert!(run(&["-h", "80", "127.0.0.1"]).mode.hash);
        assert!(error(&["-V", "80", "127.0.0.1"]).contains("'-V'"));
    }

    #[test]
    fn help_and_version() {
        match parse_args(&["--help"]).unwrap().command {
            Command::Help(text) => {
                assert!(text.starts_with("usage: ringpen"));
                assert!(text.contains("-C [host:]port|/path"));
                assert!(text.contains("--check tcp|mysql|galera"));
            }
            other => panic!("{other:?}"),
        }
        match parse_args(&["--version"]).unwrap().command {
            Command::Version(text) => {
                assert_eq!(text, format!("ringpen {}\n", env!("CARGO_PKG_VERSION")))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn usage_lists_every_option() {
        let text = usage();
        let built = BUILT_VALUED.iter().chain(BUILT_FLAGS).chain(&["d"]).copied();
        for letter in built.chain(REFUSED.iter().chain(IGNORED).map(|e| e.0)) {
            assert!(text.contains(&format!("-{letter}")), "usage lacks -{letter}");
        }
    }

    #[test]
    fn clamped_values_like_pen() {
        let args = ["-m", "0", "-q", "10", "80", "127.0.0.1"];
        let config = run(&args);
        assert_eq!(config.accepts_per_wakeup, 1);
        assert_eq!(config.backlog, 50);
        assert_eq!(notices(&args), ["-m 0 raised to 1", "-q 10 raised to 50"]);
    }

    #[test]
    fn poll_and_obsolete_options_are_notices() {
        let args = ["-P", "-D", "-Q", "-S", "8", "-n", "80", "127.0.0.1"];
        let config = run(&args);
        // -S took "8" as its value, so the addresses are still in place.
        assert_eq!(config.listen, inet("0.0.0.0:80"));
        let notices = notices(&args);
        assert_eq!(notices.len(), 5);
        assert!(notices[0].starts_with("-P (poll) ignored"));
        for (notice, letter) in notices[1..].iter().zip(["-D", "-Q", "-S", "-n"]) {
            assert!(
                notice.starts_with(letter) && notice.contains("obsolete"),
                "{notice}"
            );
        }
    }

    #[test]
    fn refused_options_name_themselves() {
        for &(letter, takes_value, _) in REFUSED {
            let option = format!("-{letter}");
            let mut args = vec![option.as_str()];
            if takes_value {
                args.push("x");
            }
            args.extend(["80", "127.0.0.1"]);
            let text = error(&args);
            assert!(text.starts_with(&format!("{option} (")), "{text}");
            assert!(text.contains("not available in this version"), "{text}");
        }
        assert_eq!(
            error(&["-U", "--check", "tcp", "80", "127.0.0.1"]),
            "--check cannot be used with -U: the checks are TCP, the backends UDP"
        );
        assert_eq!(
            error(&["--udp-idle", "5", "80", "127.0.0.1"]),
            "--udp-idle needs -U"
        );
        assert!(error(&["-E", "cert.pem", "80", "127.0.0.1"]).starts_with("-E (TLS)"));
        // The first refused option on the command line is the one reported.
        assert!(error(&["-f", "-a", "-E", "x", "80", "127.0.0.1"]).starts_with("-a"));
    }

    #[test]
    fn control_plane_options() {
        let config = run(&[
            "-C",
            "127.0.0.1:8888",
            "-F",
            "pen.cfg",
            "-o",
            "prio",
            "-w",
            "stats.html",
            "-X",
            "-O",
            "hash",
            "-B",
            "127.0.0.1:81",
            "80",
            "127.0.0.1",
        ]);
        assert_eq!(config.control, Some(inet("127.0.0.1:8888")));
        assert_eq!(config.config_file, Some(PathBuf::from("pen.cfg")));
        assert_eq!(config.startup_commands, ["prio", "hash"], "in command-line order");
        assert_eq!(config.web_stats, Some(PathBuf::from("stats.html")));
        assert!(config.exit_enabled);
        assert_eq!(config.abuse, Some(server("127.0.0.1:81")));
        assert_eq!(
            run(&["-C", "/run/pen.ctl", "80", "127.0.0.1"]).control,
            Some(Endpoint::Unix("/run/pen.ctl".into()))
        );
    }

    #[test]
    fn health_check_options() {
        let parse_env = |args: &[&str], password: Option<&str>| {
            let argv = std::iter::once("ringpen").chain(args.iter().copied());
            parse_with_env(argv, |_| password.map(str::to_owned))
        };
        let health = |args: &[&str]| match parse_env(args, None).map(|p| p.command) {
            Ok(Command::Run(config)) => config.health,
            other => panic!("{args:?}: {other:?}"),
        };
        assert_eq!(health(&["80", "127.0.0.1"]), None);
        let tcp = health(&[
            "--check",
            "tcp",
            "--check-interval",
            "0.5",
            "--rise",
            "3",
            "80",
            "127.0.0.1",
        ])
        .unwrap();
        assert_eq!(
            (tcp.kind, tcp.interval, tcp.rise, tcp.fall),
            (CheckKind::Tcp, Duration::from_millis(500), 3, 2)
        );
        assert_eq!(tcp.timeout, Duration::from_secs(1));
        let galera = [
            "--check",
            "galera",
            "--check-user",
            "lb",
            "--donor",
            "down",
            "80",
            "127.0.0.1",
        ];
        let with_env = parse_env(&galera, Some("secret")).unwrap();
        let Command::Run(config) = with_env.command else {
            panic!()
        };
        let opts = config.health.unwrap();
        assert_eq!(
            (opts.password.as_deref(), opts.donor),
            (Some("secret"), DonorPolicy::Down)
        );
        assert!(
            !format!("{opts:?}").contains("secret"),
            "Debug must hide the password"
        );
        let err = |args: &[&str]| parse_env(args, None).unwrap_err().to_string();
        assert!(err(&galera).contains("RINGPEN_CHECK_PASSWORD"));
        assert!(err(&["--check", "galera", "80", "127.0.0.1"]).contains("--check-user"));
        assert!(err(&["--rise", "3", "80", "127.0.0.1"]).contains("--rise needs --check"));
        assert!(err(&["--check", "icmp", "80", "127.0.0.1"]).contains("'icmp'"));
        assert!(
            err(&["--check", "tcp", "--check-interval", "0", "80", "127.0.0.1"]).contains("--check-interval")
        );
        assert!(err(&[
            "--check",
            "mysql",
            "--check-password-file",
            "/nonexistent/pw",
            "80",
            "127.0.0.1"
        ])
        .contains("/nonexistent/pw"));
        assert!(err(&["--check", "tcp", "--on-down", "kill", "80", "127.0.0.1"]).contains("--on-down"));
        // What the chosen check would not use is refused, not ignored.
        let unused = |opts: &[&str]| err(&[opts, &["80", "127.0.0.1"]].concat());
        assert_eq!(
            unused(&["--check", "tcp", "--check-user", "lb"]),
            "--check-user needs --check mysql or galera"
        );
        assert!(unused(&["--check", "tcp", "--check-password-file", "/x"])
            .starts_with("--check-password-file needs"));
        assert_eq!(
            unused(&["--check", "mysql", "--donor", "up"]),
            "--donor needs --check galera"
        );
        assert!(err(&["--metrics", "99999", "80", "127.0.0.1"]).contains("--metrics"));
    }

    #[test]
    fn bad_numbers() {
        assert_eq!(
            error(&["-b", "abc", "80", "127.0.0.1"]),
            "option -b needs a number, got 'abc'"
        );
        assert_eq!(
            error(&["-x", "-5", "80", "127.0.0.1"]),
            "option -x needs a number, got '-5'"
        );
        assert!(error(&["-c", "+5", "80", "127.0.0.1"]).contains("-c"));
        assert_eq!(
            error(&["-m", "99999999999", "80", "127.0.0.1"]),
            "option -m value '99999999999' is out of range"
        );
        assert_eq!(
            error(&["-t", "0", "80", "127.0.0.1"]),
            "option -t must be at least 1, got '0'"
        );
        assert!(error(&["-x", "00", "80", "127.0.0.1"]).contains("-x must be at least 1, got '00'"));
        assert_eq!(
            error(&["-c", "100000000000", "80", "127.0.0.1"]),
            "option -c value 100000000000 is above the limit of 16777216"
        );
        assert_eq!(
            error(&["-x", "16777217", "80", "127.0.0.1"]),
            "option -x value 16777217 is above the limit of 16777216"
        );
        assert!(error(&["-c", "5000000000000000000", "80", "127.0.0.1"]).contains("above the limit"));
        assert!(error(&["-c", "0", "80", "127.0.0.1"]).contains("-c"));
        assert!(error(&["--workers", "0", "80", "127.0.0.1"]).contains("--workers"));
        assert!(error(&["--workers", "many", "80", "127.0.0.1"]).contains("--workers"));
        assert_eq!(
            error(&["--workers", "65", "80", "127.0.0.1"]),
            "option --workers value 65 is above the limit of 64"
        );
        assert!(error(&["-p", "", "80", "127.0.0.1"]).contains("-p"));
    }

    #[test]
    fn bad_options() {
        assert_eq!(error(&["-k", "80", "127.0.0.1"]), "unknown option '-k'");
        assert_eq!(error(&["-fk", "80", "127.0.0.1"]), "unknown option '-k'");
        assert_eq!(
            error(&["--frobnicate", "80", "127.0.0.1"]),
            "unknown option '--frobnicate'"
        );
        assert_eq!(error(&["80", "127.0.0.1", "-b"]), "option -b needs a value");
        assert_eq!(
            error(&["80", "127.0.0.1", "--workers"]),
            "option --workers needs a value"
        );
    }

    #[test]
    fn missing_addresses() {
        assert_eq!(error(&[]), "no listen address given");
        assert_eq!(error(&["-f", "8080"]), "no backend servers given");
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(run(&["127.0.0.1:81", "127.0.0.1"]).listen, inet("127.0.0.1:81"));
        assert_eq!(run(&[":::2222", "[::1]"]).listen, inet("[::]:2222"));
        assert_eq!(run(&["[::1]:2222", "[::1]"]).listen, inet("[::1]:2222"));
        assert_eq!(run(&[":2222", "127.0.0.1"]).listen, inet("0.0.0.0:2222"));
        assert_eq!(run(&["localhost:81", "127.0.0.1"]).listen.port(), 81);
        let unix = run(&["/tmp/ringpen.sock", "/tmp/backend.sock"]);
        assert_eq!(unix.listen, Endpoint::Unix("/tmp/ringpen.sock".into()));
        assert_eq!(
            unix.servers,
            [ServerSpec::new(Endpoint::Unix("/tmp/backend.sock".into()))]
        );
    }

    #[test]
    fn service_names() {
        let config = run(&["mysql", "127.0.0.1", "10.0.0.2:mysql"]);
        assert_eq!(config.listen, inet("0.0.0.0:3306"));
        assert_eq!(
            config.servers,
            [server("127.0.0.1:3306"), server("10.0.0.2:3306")]
        );
        assert_eq!(
            run(&["127.0.0.1:mysql", "127.0.0.1"]).listen,
            inet("127.0.0.1:3306")
        );
        assert!(error(&["nosuchservice", "127.0.0.1"]).contains("'nosuchservice'"));
        // Under -U names are UDP services, as in Pen; tftp is UDP only.
        let udp = run(&[
            "-U",
            "-e",
            "10.0.0.3:tftp",
            "-B",
            "10.0.0.4:tftp",
            "127.0.0.1:tftp",
            "10.0.0.2:tftp",
        ]);
        assert_eq!(udp.listen, inet("127.0.0.1:69"));
        assert_eq!(udp.servers, [server("10.0.0.2:69")]);
        assert_eq!(udp.emergency, Some(server("10.0.0.3:69")));
        assert_eq!(udp.abuse, Some(server("10.0.0.4:69")));
        assert!(error(&["127.0.0.1:tftp", "127.0.0.1"]).contains("'tftp'"));
    }

    #[test]
    fn bad_listen_addresses() {
        assert_eq!(
            error(&["0", "127.0.0.1"]),
            "bad listen address '0': port out of range"
        );
        assert_eq!(
            error(&["65536", "127.0.0.1"]),
            "bad listen address '65536': port out of range"
        );
        assert!(error(&["1.2.3.4:", "127.0.0.1"]).contains("'1.2.3.4:'"));
        assert!(error(&["[::1]", "127.0.0.1"]).contains("'[::1]'"));
        assert_eq!(
            error(&["nosuch.invalid:80", "127.0.0.1"]),
            "cannot resolve host 'nosuch.invalid'"
        );
    }

    #[test]
    fn backend_specs() {
        let config = run(&[
            "8080",
            "10.0.0.1:81:10:20:3:4",
            "10.0.0.2::5",
            "[::1]",
            "[2001:db8::1]:82:7",
            "localhost:83",
            "10.0.0.3:0",
        ]);
        let full = ServerSpec {
            max: 10,
            hard: 20,
            weight: 3,
            prio: 4,
            ..server("10.0.0.1:81")
        };
        let empty_port = ServerSpec {
            max: 5,
            ..server("10.0.0.2:8080")
        };
        let v6 = ServerSpec {
            max: 7,
            ..server("[2001:db8::1]:82")
        };
        assert_eq!(config.servers[..4], [full, empty_port, server("[::1]:8080"), v6]);
        assert_eq!(config.servers[4].addr.port(), 83);
        assert!(!config.servers[5].addr.is_connectable());
        let unix = run(&["8080", "/run/app.sock::10"]).servers;
        let expected = ServerSpec {
            max: 10,
            ..ServerSpec::new(Endpoint::Unix("/run/app.sock".into()))
        };
        assert_eq!(unix, [expected]);
    }

    #[test]
    fn bad_backend_specs() {
        assert_eq!(
            error(&["80", "127.0.0.1:99999"]),
            "bad backend '127.0.0.1:99999': port out of range"
        );
        assert_eq!(
            error(&["80", "127.0.0.1:80:x"]),
            "bad backend '127.0.0.1:80:x': max 'x' is not a number"
        );
        assert!(error(&["80", "127.0.0.1:80:1:2:3:-4"]).contains("'127.0.0.1:80:1:2:3:-4'"));
        let long = format!("/run/{}.sock", "a".repeat(110));
        assert!(
            error(&["80", &long]).contains("SUN_LEN"),
            "a Unix path the kernel cannot take"
        );
        assert_eq!(
            error(&["80", "h:1:2:3:4:5:6"]),
            "bad backend 'h:1:2:3:4:5:6': too many fields"
        );
        assert_eq!(error(&["80", ":81"]), "bad backend ':81': empty host");
        assert!(error(&["80", "::1"]).contains("in brackets"));
        assert!(error(&["80", "[::1"]).contains("'[::1'"));
        assert!(error(&["80", "[::1]81"]).contains("'[::1]81'"));
        assert!(error(&["80", "127.0.0.1:nosuchservice"]).contains("'127.0.0.1:nosuchservice'"));
        assert_eq!(
            error(&["80", "nosuch.invalid"]),
            "cannot resolve host 'nosuch.invalid'"
        );
        // A Unix listen address has no port for a backend to default to.
        assert!(error(&["/tmp/l.sock", "127.0.0.1"]).contains("'127.0.0.1'"));
        assert_eq!(
            run(&["/tmp/l.sock", "127.0.0.1:81"]).servers,
            [server("127.0.0.1:81")]
        );
    }

    #[test]
    fn emergency_server() {
        let config = run(&["-e", "[::1]:99:5", "8080", "127.0.0.1"]);
        assert_eq!(
            config.emergency,
            Some(ServerSpec {
                max: 5,
                ..server("[::1]:99")
            })
        );
        assert_eq!(
            error(&["-e", "127.0.0.1:x", "80", "127.0.0.1"]),
            "bad emergency server (-e) '127.0.0.1:x': unknown port or service 'x'"
        );
    }

    #[test]
    fn log_targets() {
        let log = |arg: &str| run(&["-l", arg, "80", "127.0.0.1"]).log.unwrap();
        assert_eq!(log("pen.log"), LogTarget::File("pen.log".into()));
        assert_eq!(log("logs/a:b"), LogTarget::File("logs/a:b".into()));
        assert_eq!(
            log("127.0.0.1:514"),
            LogTarget::Udp("127.0.0.1:514".parse().unwrap())
        );
        assert_eq!(log("[::1]:514"), LogTarget::Udp("[::1]:514".parse().unwrap()));
        assert_eq!(log("::1:514"), LogTarget::Udp("[::1]:514".parse().unwrap()));
        assert_eq!(
            error(&["-l", "127.0.0.1:0", "80", "127.0.0.1"]),
            "bad log server (-l) '127.0.0.1:0': port out of range"
        );
        assert!(error(&["-l", ":514", "80", "127.0.0.1"]).contains("-l"));
        assert_eq!(
            error(&["-l", "nosuch.invalid:514", "80", "127.0.0.1"]),
            "cannot resolve host 'nosuch.invalid'"
        );
    }
}
