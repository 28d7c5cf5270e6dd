//! Wiring only: parse the command line, bind, drop privileges, start the
//! workers and the control thread, and map failures to exit codes.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use syslog_tracing::{Facility, Options};

use ringpen::accesslog::{AccessLog, Sink};
use ringpen::cli::{self, Command};
use ringpen::config::{Config, Endpoint, LogTarget};
use ringpen::control::Control;
use ringpen::dataplane::{self, listener, Shared};
use ringpen::routing::{CounterBank, RoutingTable};
use ringpen::select::client_table::{ClientTable, SharedClientTable};
use ringpen::{control, process};

fn main() -> ExitCode {
    let parsed = match cli::parse(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("ringpen: {}", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    for notice in &parsed.notices {
        eprintln!("ringpen: {}", one_line(notice));
    }
    match parsed.command {
        Command::Help(text) | Command::Version(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Command::Run(config) => {
            let background = !config.foreground;
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Once in the background stderr is /dev/null and syslog
                    // is where this can be read (before, no log is set up
                    // yet and this goes nowhere).
                    if background {
                        tracing::error!("{e:#}");
                    }
                    eprintln!("ringpen: {}", one_line(&format!("{e:#}")));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A message as one line: an argument it quotes may hold a line break
/// (`-b $'1\n2'`), which is shown escaped instead.
fn one_line(text: &str) -> String {
    ringpen::text::one_line(text, usize::MAX)
}

/// Diagnostics go to stderr in the foreground and to syslog (facility
/// user, as Pen's) once daemonized. `-d` (or penctl's `debug N`, through the
/// returned setter) sets the level; SIGUSR1's statistics always show.
fn init_tracing(debug: u8, foreground: bool) -> Box<dyn Fn(u8) + Send> {
    use tracing_subscriber::prelude::*;
    let filter = |debug: u8| {
        let level = match debug {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        };
        tracing_subscriber::EnvFilter::new(format!("{level},{}=info", control::STATS_TARGET))
    };
    let (filter_layer, handle) = tracing_subscriber::reload::Layer::new(filter(debug));
    let format = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_target(false);
    let syslog = (!foreground)
        .then(|| syslog_tracing::Syslog::new(c"ringpen", Options::LOG_PID, Facility::User))
        .flatten();
    let registry = tracing_subscriber::registry().with(filter_layer);
    match syslog {
        Some(syslog) => registry
            .with(format.with_writer(syslog).without_time().with_level(false))
            .init(),
        None => registry.with(format.with_writer(std::io::stderr)).init(),
    }
    Box::new(move |debug| {
        let _ = handle.reload(filter(debug));
    })
}

fn run(mut config: Config) -> anyhow::Result<()> {
    process::hold_control_signals()?;
    // Daemonizing and -j change what relative paths mean. With -j the pid
    // file and the log are the jail's (see below): a relative one is taken
    // from the jail's root, where the process stands after the chroot.
    let jailed = config.chroot.is_some();
    let pid_file = config.pid_file.as_mut().filter(|_| !jailed);
    let log_file = match &mut config.log {
        Some(LogTarget::File(path)) if !jailed => Some(path),
        _ => None,
    };
    for path in [
        pid_file,
        config.config_file.as_mut(),
        config.web_stats.as_mut(),
        log_file,
    ]
    .into_iter()
    .flatten()
    {
        *path = process::absolute(path);
    }
    // -F and -o may change anything, the listen address included.
    let state = control::initial_state(&config)?;

    // -U: one SO_REUSEPORT socket per worker; the first also stands in as
    // "the listener" the control thread closes at exit.
    let udp_sockets = match (&state.listen, config.udp) {
        (_, false) => Vec::new(),
        (Endpoint::Inet(addr), true) => (0..config.workers)
            .map(|_| dataplane::udp::bind(*addr))
            .collect::<anyhow::Result<Vec<_>>>()?,
        (Endpoint::Unix(_), true) => anyhow::bail!("-U needs an IP listen address, not a Unix socket path"),
    };
    let listener = match udp_sockets.first() {
        Some(first) => first.try_clone().context("cannot duplicate the UDP socket")?,
        None => listener::bind(&state.listen, config.backlog)?,
    };
    let endpoints = control::Endpoints {
        control: match &state.control {
            // Pen's rule: as root, a control port only with an explicit -u.
            Some(_) if nix::unistd::geteuid().is_root() && config.user.is_none() => {
                eprintln!("ringpen: not opening the control port: running as root without -u (add -u root to allow it)");
                None
            }
            Some(addr) => Some(control::port::ControlSocket::bind(addr)?),
            None => None,
        },
        metrics: config
            .metrics
            .map(|addr| std::net::TcpListener::bind(addr).with_context(|| format!("--metrics {addr}")))
            .transpose()?,
    };
    dataplane::probe()?;
    // With -j, Pen opens the log and the pid file after chroot, so their
    // paths name files inside the jail; SIGHUP reopens the log by that path.
    let jail = config.chroot.as_deref();
    if let Some(dir) = jail {
        process::check_chroot(dir)?;
    }
    let log_sink = state
        .log
        .as_ref()
        .map(|target| {
            let target = match (target, jail) {
                (LogTarget::File(path), Some(jail)) => LogTarget::File(process::in_jail(jail, path)),
                _ => target.clone(),
            };
            Sink::open(&target).with_context(|| format!("-l: cannot open the log {target}"))
        })
        .transpose()?;

    let user = config.user.as_deref().map(process::lookup_user).transpose()?;
    let mut pid_file = config
        .pid_file
        .as_deref()
        .map(|path| process::PidFile::open(path, jail))
        .transpose()?;

    if !config.foreground {
        process::daemonize()?;
    }
    let set_debug = init_tracing(state.debug, config.foreground);
    if let Some(pid_file) = &mut pid_file {
        pid_file.write_pid()?;
    }
    if let Some(dir) = &config.chroot {
        process::chroot(dir)?;
        if let Some(pid_file) = &mut pid_file {
            pid_file.entered_jail();
        }
    }
    if let Some(user) = &user {
        process::become_user(user)?;
    }

    // After daemonizing (a fork copies only the descriptors in use) and
    // before the threads start.
    process::reserve_descriptors_or_warn(state.conn_max);

    let mut counters = CounterBank::default();
    let table = RoutingTable::build(&state, &mut counters, 0);
    let (control_tx, control_rx) = control::channel();
    let shared = Arc::new(Shared::new(
        Arc::new(ArcSwap::from_pointee(table)),
        counters.global.clone(),
        listener,
        SharedClientTable::new(ClientTable::new(state.clients_max, state.tracking_secs)),
        AccessLog::new(log_sink),
        control_tx,
        config.workers,
    )?);

    let workers = dataplane::spawn_workers(config.workers, udp_sockets, shared.clone())?;
    let listen_addr = state.listen.clone();
    let control = Control::new(
        state,
        counters,
        shared.clone(),
        set_debug,
        config.backlog,
        config.health.clone(),
    );
    let control_shared = shared.clone();
    std::thread::Builder::new()
        .name("ringpen-control".into())
        .spawn(move || {
            // Without the control thread nothing would hear SIGTERM: if it
            // fails or panics, the workers stop too and the process exits.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                control::run(control, control_rx, endpoints)
            }));
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("control thread: {e:#}"),
                Err(_) => tracing::error!("control thread panicked"),
            }
            control_shared.stop();
        })
        .context("cannot start the control thread")?;

    let mut failure = None;
    for worker in workers {
        let result = worker
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("a worker panicked")));
        if let Err(e) = result {
            // One worker failing takes the balancer down rather than leaving
            // it running at reduced capacity unnoticed.
            shared.stop();
            failure.get_or_insert(e);
        }
    }
    listener::close(&shared.listener.load(), &listen_addr);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
