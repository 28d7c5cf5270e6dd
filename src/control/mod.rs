//! The control thread: owns the authoritative server state, hears what the
//! workers report (connect failures), handles signals, and publishes every
//! change as one new routing table with one atomic swap.

pub mod state;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::accesslog::Sink;
use crate::config::{Config, LogTarget};
use crate::dataplane::Shared;
use crate::routing::RoutingTable;
use crate::select::Target;

/// What workers tell the control thread.
#[derive(Debug, Clone, Copy)]
pub enum ControlEvent {
    /// A connect to `target` failed (refused, unreachable or timed out).
    ConnectFailed { target: Target, at: Instant, errno: i32 },
}

pub type ControlSender = mpsc::UnboundedSender<ControlEvent>;
pub type ControlReceiver = mpsc::UnboundedReceiver<ControlEvent>;

pub fn channel() -> (ControlSender, ControlReceiver) {
    mpsc::unbounded_channel()
}

/// Runs the control thread until SIGTERM or SIGINT; then stops the workers.
pub fn run(config: Config, shared: Arc<Shared>, events: ControlReceiver) -> anyhow::Result<()> {
    tokio_uring::start(serve(config, shared, events))
}

async fn serve(config: Config, shared: Arc<Shared>, mut events: ControlReceiver) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("cannot watch SIGUSR1")?;
    crate::process::release_control_signals()?;
    loop {
        tokio::select! {
            Some(event) = events.recv() => handle_event(&shared, event),
            _ = hangup.recv() => reopen_log(&config, &shared),
            _ = usr1.recv() => print_stats(&shared),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("stopping");
    shared.stop();
    Ok(())
}

fn handle_event(shared: &Shared, event: ControlEvent) {
    match event {
        ControlEvent::ConnectFailed { target, at, errno } => {
            let current = shared.table.load();
            let mut next = RoutingTable::clone(&current);
            next.generation += 1;
            let until = Some(at + next.blacklist);
            let (entry, counters, name) = match target {
                Target::Server(i) => (
                    next.servers.get_mut(i),
                    shared.counters.servers.get(i),
                    format!("server {i}"),
                ),
                Target::Emergency => (
                    next.emergency.as_mut(),
                    Some(&shared.counters.emergency),
                    "the emergency server".to_string(),
                ),
            };
            let (Some(entry), Some(counters)) = (entry, counters) else {
                return;
            };
            counters.failures.fetch_add(1, Ordering::Relaxed);
            // Pen logs this at every debug level.
            tracing::warn!(
                "blacklisting {name} ({}) for {}s because connect error {}",
                entry.spec.addr,
                next.blacklist.as_secs(),
                std::io::Error::from_raw_os_error(errno)
            );
            entry.blacklisted_until = until;
            shared.table.store(Arc::new(next));
        }
    }
}

fn reopen_log(config: &Config, shared: &Shared) {
    // Pen reopens the file log on SIGHUP (for log rotation); the network
    // log needs nothing.
    if let Some(target @ LogTarget::File(path)) = &config.log {
        match Sink::open(target) {
            Ok(sink) => shared.log.replace(Some(sink)),
            Err(e) => tracing::error!("cannot reopen log file {}: {e}", path.display()),
        }
    }
}

/// The tracing target of SIGUSR1's statistics, shown at every `-d` level.
pub const STATS_TARGET: &str = "ringpen::stats";

/// SIGUSR1: per-server statistics, as Pen dumps them to its debug log.
fn print_stats(shared: &Shared) {
    let table = shared.table.load();
    let now = Instant::now();
    let global = &shared.counters.global;
    tracing::info!(
        target: STATS_TARGET,
        "{} servers, {} connections active, {} accepted",
        table.servers.len(),
        global.active.load(Ordering::Relaxed),
        global.accepted.load(Ordering::Relaxed)
    );
    let rows = table
        .servers
        .iter()
        .zip(&shared.counters.servers)
        .enumerate()
        .map(|(i, (s, c))| (i.to_string(), s, c))
        .chain(
            table
                .emergency
                .iter()
                .map(|s| ("emergency".to_string(), s, &shared.counters.emergency)),
        );
    for (name, server, c) in rows {
        tracing::info!(
            target: STATS_TARGET,
            "server {name} {} conn {} total {} failed {} sent {} received {} max {} hard {} weight {} prio {}{}",
            server.spec.addr,
            c.active.load(Ordering::Relaxed),
            c.total.load(Ordering::Relaxed),
            c.failures.load(Ordering::Relaxed),
            c.sent.load(Ordering::Relaxed),
            c.received.load(Ordering::Relaxed),
            server.spec.max,
            server.spec.hard,
            server.spec.weight,
            server.spec.prio,
            if server.is_blacklisted(now) { " blacklisted" } else { "" },
        );
    }
}
