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
use crate::config::LogTarget;
use crate::dataplane::Shared;
use crate::routing::{epoch_now, CounterBank, RoutingTable};
use crate::select::Target;
use state::ControlState;

/// What workers tell the control thread.
#[derive(Debug, Clone, Copy)]
pub enum ControlEvent {
    /// A connect to `target` failed (refused, unreachable or timed out).
    ConnectFailed { target: Target, errno: i32 },
}

pub type ControlSender = mpsc::UnboundedSender<ControlEvent>;
pub type ControlReceiver = mpsc::UnboundedReceiver<ControlEvent>;

pub fn channel() -> (ControlSender, ControlReceiver) {
    mpsc::unbounded_channel()
}

/// The control thread's own data: the authoritative state and what it
/// needs to publish it.
pub struct Control {
    pub state: ControlState,
    pub counters: CounterBank,
    shared: Arc<Shared>,
    generation: u64,
}

impl Control {
    pub fn new(state: ControlState, counters: CounterBank, shared: Arc<Shared>) -> Self {
        let generation = shared.table.load().generation;
        Control {
            state,
            counters,
            shared,
            generation,
        }
    }

    /// Makes the workers see the current state: one new table, one swap.
    pub fn publish(&mut self) {
        self.generation += 1;
        let table = RoutingTable::build(&self.state, &mut self.counters, self.generation);
        self.shared.table.store(Arc::new(table));
    }

    fn on_event(&mut self, event: ControlEvent) {
        match event {
            ControlEvent::ConnectFailed { target, errno } => {
                let blacklist = self.state.blacklist_secs;
                let (conf, name) = match target {
                    Target::Server(i) => (self.state.servers.get_mut(i), format!("server {i}")),
                    Target::Emergency => (self.state.emergency.as_mut(), "the emergency server".into()),
                    Target::Abuse => (self.state.abuse.as_mut(), "the abuse server".into()),
                };
                let Some(conf) = conf else { return };
                // Pen's blacklist_server, and its message, logged at every -d level.
                conf.status = epoch_now();
                tracing::warn!(
                    "blacklisting {name} ({}) for {blacklist}s because connect error {}",
                    conf.spec.addr,
                    std::io::Error::from_raw_os_error(errno)
                );
                self.publish();
            }
        }
    }

    fn reopen_log(&self) {
        // Pen reopens the file log on SIGHUP (for log rotation); the network
        // log needs nothing.
        if let Some(target @ LogTarget::File(path)) = &self.state.log {
            match Sink::open(target) {
                Ok(sink) => self.shared.log.replace(Some(sink)),
                Err(e) => tracing::error!("cannot reopen log file {}: {e}", path.display()),
            }
        }
    }

    /// SIGUSR1: per-server statistics, as Pen dumps them to its debug log.
    fn print_stats(&self) {
        let table = self.shared.table.load();
        let now = Instant::now();
        let global = &self.shared.global;
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
            .enumerate()
            .map(|(i, s)| (i.to_string(), s))
            .chain(table.emergency.iter().map(|s| ("emergency".to_string(), s)));
        for (name, server) in rows {
            let c = &server.counters;
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
}

/// The tracing target of SIGUSR1's statistics, shown at every `-d` level.
pub const STATS_TARGET: &str = "ringpen::stats";

/// Runs the control thread until SIGTERM or SIGINT; then stops the workers.
pub fn run(control: Control, events: ControlReceiver) -> anyhow::Result<()> {
    tokio_uring::start(serve(control, events))
}

async fn serve(mut control: Control, mut events: ControlReceiver) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("cannot watch SIGUSR1")?;
    crate::process::release_control_signals()?;
    loop {
        tokio::select! {
            Some(event) = events.recv() => control.on_event(event),
            _ = hangup.recv() => control.reopen_log(),
            _ = usr1.recv() => control.print_stats(),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("stopping");
    control.shared.stop();
    Ok(())
}
