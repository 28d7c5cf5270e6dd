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
use ringpen::dataplane::{self, listener, Shared};
use ringpen::routing::{Counters, RoutingTable};
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

fn run(mut config: Config) -> anyhow::Result<()> {
    process::hold_control_signals()?;
    // Daemonizing and -j change what relative paths mean.
    config.pid_file = config.pid_file.as_deref().map(process::absolute);
    if let Some(LogTarget::File(path)) = &mut config.log {
        *path = process::absolute(path);
    }

    let listener = listener::bind(&config.listen, config.backlog)?;
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

    let table = RoutingTable::from_config(&config).context("bad server address")?;
    let (control_tx, control_rx) = control::channel();
    let shared = Arc::new(Shared::new(
        Arc::new(ArcSwap::from_pointee(table)),
        Counters::new(config.servers.len()),
        SharedClientTable::new(ClientTable::new(config.clients_max, config.tracking_secs)),
        AccessLog::new(log_sink),
        control_tx,
        config.workers,
    )?);

    let listener = Arc::new(listener);
    let workers = dataplane::spawn_workers(config.workers, listener.clone(), shared.clone())?;
    let listen_addr = config.listen.clone();
    let control_shared = shared.clone();
    std::thread::Builder::new()
        .name("ringpen-control".into())
        .spawn(move || {
            if let Err(e) = control::run(config, control_shared.clone(), control_rx) {
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
    listener::close(&listener, &listen_addr);
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
