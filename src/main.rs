//! Wiring only: parse the command line, bind, drop privileges, start the
//! workers and the control thread, and map failures to exit codes.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use syslog_tracing::{Facility, Options};

use ringpen::accesslog::{AccessLog, Sink};
use ringpen::cli::{self, Command};
use ringpen::config::{Config, LogTarget};
use ringpen::control::state::ControlState;
use ringpen::control::Control;
use ringpen::dataplane::{self, listener, Shared};
use ringpen::routing::{CounterBank, RoutingTable};
use ringpen::select::client_table::{ClientTable, SharedClientTable};
use ringpen::{control, process};

fn main() -> ExitCode {
    let parsed = match cli::parse(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("ringpen: {e}");
            return ExitCode::from(2);
        }
    };
    for notice in &parsed.notices {
        eprintln!("ringpen: {notice}");
    }
    match parsed.command {
        Command::Help(text) | Command::Version(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Command::Run(config) => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringpen: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Diagnostics go to stderr in the foreground and to syslog (facility
/// user, as Pen's) once daemonized. `-d` raises the level; SIGUSR1's
/// statistics are always shown.
fn init_tracing(debug: u8, foreground: bool) {
    let level = match debug {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::new(format!("{level},{}=info", control::STATS_TARGET));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let syslog = (!foreground)
        .then(|| syslog_tracing::Syslog::new(c"ringpen", Options::LOG_PID, Facility::User))
        .flatten();
    match syslog {
        Some(syslog) => builder
            .with_writer(syslog)
            .without_time()
            .with_level(false)
            .init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}

/// Options the command line takes whose machinery this build has not
/// wired in yet: refused with one line rather than silently ignored.
fn refuse_unwired(config: &Config) -> anyhow::Result<()> {
    let unwired = [
        (config.control.is_some(), "-C (control port)"),
        (config.config_file.is_some(), "-F (configuration file)"),
        (!config.startup_commands.is_empty(), "-O/-o (penctl command)"),
        (config.web_stats.is_some(), "-w (HTML status file)"),
        (config.metrics.is_some(), "--metrics"),
        (config.health.is_some(), "--check"),
    ];
    match unwired.iter().find(|(given, _)| *given) {
        Some((_, what)) => anyhow::bail!("{what} is not available in this version"),
        None => Ok(()),
    }
}

fn run(mut config: Config) -> anyhow::Result<()> {
    refuse_unwired(&config)?;
    process::hold_control_signals()?;
    // Daemonizing and -j change what relative paths mean.
    config.pid_file = config.pid_file.as_deref().map(process::absolute);
    if let Some(LogTarget::File(path)) = &mut config.log {
        *path = process::absolute(path);
    }

    let listener = listener::bind(&config.listen, config.backlog)?;
    let config_listen = config.listen.clone();
    dataplane::probe()?;
    let log_sink = config
        .log
        .as_ref()
        .map(|target| Sink::open(target).with_context(|| format!("-l: cannot open the log {target:?}")))
        .transpose()?;

    let user = config.user.as_deref().map(process::lookup_user).transpose()?;

    if !config.foreground {
        process::daemonize()?;
    }
    init_tracing(config.debug, config.foreground);
    let _pid_file = config
        .pid_file
        .as_deref()
        .map(process::PidFile::create)
        .transpose()?;
    if let Some(dir) = &config.chroot {
        process::chroot(dir)?;
    }
    if let Some(user) = &user {
        process::become_user(user)?;
    }

    let state = ControlState::from_config(&config);
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

    let workers = dataplane::spawn_workers(config.workers, shared.clone())?;
    let control = Control::new(state, counters, shared.clone());
    let control_shared = shared.clone();
    std::thread::Builder::new()
        .name("ringpen-control".into())
        .spawn(move || {
            if let Err(e) = control::run(control, control_rx) {
                tracing::error!("control thread: {e:#}");
                control_shared.stop();
            }
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
    listener::close(&shared.listener.load(), &config_listen);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
