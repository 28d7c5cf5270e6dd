//! The control thread: owns the authoritative server state, hears what the
//! workers report (connect failures), handles signals, and publishes every
//! change as one new routing table with one atomic swap.

pub mod command;
pub mod configfile;
pub mod files;
pub mod live;
pub mod metrics;
pub mod port;
pub mod snapshot;
pub mod state;
pub mod webstats;
pub mod writecfg;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::accesslog::Sink;
use crate::dataplane::Shared;
use crate::routing::{epoch_now, CounterBank, RoutingTable};
use crate::select::client_table::ClientTable;
use crate::select::Target;
use command::Effect;
use port::{ControlRequest, ControlSocket};
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
    /// The last health check's latency per server.
    latencies: Vec<Option<Duration>>,
    /// Changes the diagnostics level (`debug N`).
    set_debug: Box<dyn Fn(u8) + Send>,
    /// `-q`, for a listener that `listen` opens.
    backlog: u32,
    /// Set by `exit`.
    exiting: bool,
    /// `--check` and friends, if active checks run.
    health: Option<crate::config::HealthOptions>,
    /// The `conn_max` the descriptor table has room for.
    descriptors_reserved_for: usize,
}

/// One active health check result, from the checker to the control loop.
struct HealthReport {
    server: usize,
    /// The address checked: a report from a check stopped because the
    /// server moved may still be queued, and must not count.
    addr: std::net::SocketAddr,
    health: state::Health,
    latency: Duration,
    reason: Option<String>,
}

/// The sockets the control thread serves, bound before privileges dropped.
#[derive(Default)]
pub struct Endpoints {
    pub control: Option<ControlSocket>,
    pub metrics: Option<std::net::TcpListener>,
}

impl Control {
    pub fn new(
        state: ControlState,
        counters: CounterBank,
        shared: Arc<Shared>,
        set_debug: Box<dyn Fn(u8) + Send>,
        backlog: u32,
        health: Option<crate::config::HealthOptions>,
    ) -> Self {
        let generation = shared.table.load().generation;
        Control {
            descriptors_reserved_for: state.conn_max,
            state,
            counters,
            shared,
            generation,
            latencies: Vec::new(),
            set_debug,
            backlog,
            exiting: false,
            health,
        }
    }

    /// The servers active checks watch: every server with an IP address
    /// (a Unix-socket backend cannot take a TCP check and stays unchecked).
    fn check_targets(&self) -> Vec<(usize, std::net::SocketAddr)> {
        self.state
            .servers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s.spec.addr {
                crate::config::Endpoint::Inet(addr) if s.spec.addr.is_connectable() => Some((i, addr)),
                _ => None,
            })
            .collect()
    }

    /// A check result: record the latency; a change of health is published
    /// (and, with `--on-down close`, a server going down loses its clients).
    fn on_health(&mut self, report: HealthReport) {
        let Some(conf) = self.state.servers.get_mut(report.server) else {
            return;
        };
        if conf.spec.addr != crate::config::Endpoint::Inet(report.addr) {
            return; // about an address the server no longer has
        }
        if self.latencies.len() <= report.server {
            self.latencies.resize(report.server + 1, None);
        }
        self.latencies[report.server] = Some(report.latency);
        if conf.health == report.health {
            return;
        }
        tracing::warn!(
            "server {} ({}) is now {:?}{}",
            report.server,
            conf.spec.addr,
            report.health,
            report.reason.map(|r| format!(": {r}")).unwrap_or_default()
        );
        conf.health = report.health;
        if report.health == state::Health::Up {
            conf.checked_up(epoch_now());
        }
        self.publish();
        let close = self
            .health
            .as_ref()
            .is_some_and(|h| h.on_down == crate::config::OnDown::Close);
        if close && report.health == state::Health::Down {
            for (_, info) in self.shared.registry.snapshot() {
                if info.target == Some(Target::Server(report.server)) {
                    self.shared.request(
                        info.worker,
                        crate::dataplane::WorkerRequest::Close {
                            local: info.local,
                            serial: info.serial,
                        },
                    );
                }
            }
        }
    }

    /// The checks of these servers stopped: what they found no longer
    /// holds, so the servers are Unchecked (routed, as at start) again.
    fn forget_health(&mut self, servers: &[usize]) {
        let mut changed = false;
        for &server in servers {
            if let Some(latency) = self.latencies.get_mut(server) {
                *latency = None;
            }
            if let Some(conf) = self.state.servers.get_mut(server) {
                if conf.health != state::Health::Unchecked {
                    tracing::warn!(
                        "server {server} ({}) is now Unchecked: its address changed",
                        conf.spec.addr
                    );
                    conf.health = state::Health::Unchecked;
                    changed = true;
                }
            }
        }
        if changed {
            self.publish();
        }
    }

    fn live(&self) -> live::Running<'_> {
        live::Running {
            shared: &self.shared,
            counters: &self.counters,
            latencies: &self.latencies,
            resolved: &NOTHING_RESOLVED,
        }
    }

    /// Whether `control_acl` lets `peer` run commands.
    fn permits(&self, peer: Option<IpAddr>) -> bool {
        let acl = &self.state.acls[usize::from(self.state.control_acl)];
        crate::select::acl::permits(acl, peer)
    }

    /// One control-port command line: Pen's `do_ctrl` and `do_cmd`.
    /// `resolved`: its host names, looked up by the control port's task.
    fn run_command(
        &mut self,
        line: &str,
        peer: Option<IpAddr>,
        resolved: &HashMap<String, Option<IpAddr>>,
    ) -> Option<String> {
        if !self.permits(peer) {
            // Pen closes without a word.
            tracing::info!("control port: {peer:?} denied by control_acl");
            return None;
        }
        let command = match command::parse(line) {
            Ok(command) => command,
            Err(e) => return Some(e.reply()),
        };
        let live = live::Running {
            shared: &self.shared,
            counters: &self.counters,
            latencies: &self.latencies,
            resolved,
        };
        let before = self.state.clone();
        let mut outcome = command::execute(&mut self.state, command, &live);
        // What can fail is had first, and only then swapped in: an address
        // that cannot be bound or a log that cannot be opened (even one
        // after the other, from an `include`) changes nothing.
        let (relisten, reopen) = take_fallible_effects(&mut outcome.effects);
        let listener = match relisten.then(|| self.bind_listener()).transpose() {
            Ok(listener) => listener,
            Err(e) => {
                self.state = before;
                return Some(format!("listen: {e:#}\n"));
            }
        };
        let sink = match reopen.then(|| self.open_sink()).transpose() {
            Ok(sink) => sink,
            Err(e) => {
                self.state = before;
                return Some(format!("log: {e}\n"));
            }
        };
        if let Some(listener) = listener {
            self.install_listener(listener);
        }
        if let Some(sink) = sink {
            self.shared.log.replace(sink);
        }
        if outcome.changed {
            self.changed();
        }
        if let Some((path, e)) = self.apply_effects(outcome.effects) {
            return Some(match outcome.write_failure_reply {
                Some(pen_reply) => pen_reply.to_owned(),
                None => format!("cannot write {}: {e}\n", path.display()),
            });
        }
        Some(outcome.reply)
    }

    /// After any change of the state: the client table follows its
    /// settings, and the workers get a new table.
    fn changed(&mut self) {
        // A bigger client table is made before taking the lock the workers
        // take for every new connection, and the old one freed after it.
        let wanted = self.state.clients_max;
        let capacity = self.shared.clients.lock().capacity();
        let room = (wanted > capacity).then(|| ClientTable::room_for(wanted));
        let unused = {
            let mut clients = self.shared.clients.lock();
            clients.set_tracking_secs(self.state.tracking_secs);
            room.map(|room| clients.grow_into(room))
        };
        drop(unused);
        if self.state.conn_max > self.descriptors_reserved_for {
            self.descriptors_reserved_for = self.state.conn_max;
            crate::process::reserve_descriptors_or_warn(self.state.conn_max);
        }
        self.publish();
        // An idle timeout needs each worker's timer armed.
        self.shared.wake_all();
    }

    /// Carries out what a command asked for; says which file, if any, could
    /// not be written.
    fn apply_effects(&mut self, effects: Vec<Effect>) -> Option<(std::path::PathBuf, std::io::Error)> {
        let mut failed_write = None;
        for effect in effects {
            match effect {
                // Taken out by the callers, which must be able to undo
                // them (see `take_fallible_effects`).
                Effect::ReopenLog | Effect::Relisten => {}
                Effect::CloseConnection(n) => {
                    if let Some(info) = self.shared.registry.get(n) {
                        self.shared.request(
                            info.worker,
                            crate::dataplane::WorkerRequest::Close {
                                local: info.local,
                                serial: info.serial,
                            },
                        );
                    }
                }
                Effect::WriteFile { path, contents } => {
                    if let Err(e) = files::write_text(&path, &contents) {
                        tracing::warn!("cannot write {}: {e}", path.display());
                        failed_write.get_or_insert((path, e));
                    }
                }
                Effect::DebugLevel(level) => (self.set_debug)(level),
                Effect::Exit => self.exiting = true,
            }
        }
        failed_write
    }

    /// `listen`: a new listening socket, handed to the workers.
    fn relisten(&mut self) -> anyhow::Result<()> {
        let listener = self.bind_listener()?;
        self.install_listener(listener);
        Ok(())
    }

    /// A socket listening on `state.listen`, not yet in use.
    fn bind_listener(&self) -> anyhow::Result<OwnedFd> {
        anyhow::ensure!(
            !self.state.udp,
            "the UDP listener cannot be moved; restart ringpen instead"
        );
        crate::dataplane::listener::bind(&self.state.listen, self.backlog)
    }

    /// Makes the workers accept from `listener` instead.
    fn install_listener(&self, listener: OwnedFd) {
        let old = self.shared.listener.swap(Arc::new(listener));
        self.shared.request_all(crate::dataplane::WorkerRequest::Relisten);
        // Free the old port now; the workers drop their handles soon.
        crate::dataplane::listener::shutdown(&old);
    }

    /// SIGHUP: re-read the `-F` file and reopen the log (rotation). A file
    /// with a bad line changes nothing; a `listen` or `log` in it that
    /// cannot be had keeps the old one, as `penctl` would.
    fn reload(&mut self) {
        let before = self.state.clone();
        let mut effects = Vec::new();
        if let Some(path) = self.state.config_file.clone() {
            match files::read_text(&path) {
                Ok(text) => match configfile::apply(&self.state, &text, &self.live()) {
                    Ok((state, more)) => {
                        self.state = state;
                        effects = more;
                        tracing::info!("SIGHUP: {} applied", path.display());
                    }
                    Err(e) => tracing::error!("SIGHUP: {}: {e}; configuration unchanged", path.display()),
                },
                Err(e) => tracing::error!(
                    "SIGHUP: cannot read {}: {e}; configuration unchanged",
                    path.display()
                ),
            }
        }
        // Both done here, once, and only the listener if it moved.
        let _ = take_fallible_effects(&mut effects);
        if let Err(e) = self.open_log() {
            tracing::error!("SIGHUP: {e}");
            if self.state.log != before.log {
                self.state.log = before.log.clone();
                if let Err(e) = self.open_log() {
                    tracing::error!("SIGHUP: {e}");
                }
            }
        }
        if self.state.listen != before.listen {
            if let Err(e) = self.relisten() {
                tracing::error!("SIGHUP: listen: {e:#}; still listening on {}", before.listen);
                self.state.listen = before.listen.clone();
            }
        }
        if self.state != before {
            self.changed();
        }
        let _ = self.apply_effects(effects); // logged; SIGHUP has no one to reply to
    }

    fn metrics_text(&self) -> String {
        metrics::render(&snapshot::metrics(
            &self.state,
            &self.counters,
            &self.latencies,
            &self.shared,
        ))
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
                conf.connect_failed(epoch_now());
                tracing::warn!(
                    "blacklisting {name} ({}) for {blacklist}s because connect error {}",
                    conf.spec.addr,
                    std::io::Error::from_raw_os_error(errno)
                );
                self.publish();
            }
        }
    }

    /// Opens the `-l` / `log` target afresh (SIGHUP rotation, `log FILE`,
    /// `no log`); on failure the old sink stays.
    fn open_log(&self) -> Result<(), String> {
        let sink = self.open_sink()?;
        self.shared.log.replace(sink);
        Ok(())
    }

    /// A sink for `state.log` (None: no log), not yet in use.
    fn open_sink(&self) -> Result<Option<Sink>, String> {
        self.state
            .log
            .as_ref()
            .map(|target| Sink::open(target).map_err(|e| format!("cannot open {target}: {e}")))
            .transpose()
    }

    /// SIGUSR1: Pen writes the `-w` status page, or without one dumps
    /// per-server statistics to its diagnostics.
    fn on_usr1(&self) {
        match &self.state.web_stats {
            Some(path) => {
                let html = webstats::render(&snapshot::stats(
                    &self.state,
                    &self.counters,
                    &self.latencies,
                    &self.shared,
                ));
                if let Err(e) = files::write_text(path, &html) {
                    tracing::warn!("cannot write {}: {e}", path.display());
                }
            }
            None => self.print_stats(),
        }
    }

    /// Per-server statistics in the diagnostics.
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

/// The state the balancer starts with: the command line, then the `-F`
/// file, then the `-O`/`-o` commands. Any bad line stops the start.
pub fn initial_state(config: &crate::config::Config) -> anyhow::Result<ControlState> {
    let mut state = ControlState::from_config(config);
    if let Some(path) = &config.config_file {
        let text =
            files::read_text_at_start(path).with_context(|| format!("-F: cannot read {}", path.display()))?;
        state = configfile::apply(&state, &text, &live::Startup)
            .map_err(|e| anyhow::anyhow!("-F {}: {e}", path.display()))?
            .0;
    }
    for (i, line) in config.startup_commands.iter().enumerate() {
        state = configfile::apply(&state, line, &live::Startup)
            .map_err(|e| anyhow::anyhow!("-o command {} ('{line}'): {}", i + 1, e.message))?
            .0;
    }
    anyhow::ensure!(
        !state.servers.is_empty(),
        "no backend servers given, on the command line or in the -F file"
    );
    Ok(state)
}

/// Takes `Relisten` and `ReopenLog` out of `effects` (an `include` can
/// bring several); says whether each was there.
fn take_fallible_effects(effects: &mut Vec<Effect>) -> (bool, bool) {
    let relisten = effects.contains(&Effect::Relisten);
    let reopen = effects.contains(&Effect::ReopenLog);
    effects.retain(|e| !matches!(e, Effect::Relisten | Effect::ReopenLog));
    (relisten, reopen)
}

/// For the commands that come from elsewhere than the control port (the
/// `-F` file on SIGHUP): their host names are looked up when they run.
static NOTHING_RESOLVED: std::sync::LazyLock<HashMap<String, Option<IpAddr>>> =
    std::sync::LazyLock::new(HashMap::new);

/// The tracing target of SIGUSR1's statistics, shown at every `-d` level.
pub const STATS_TARGET: &str = "ringpen::stats";

/// Runs the control thread until SIGTERM, SIGINT or `exit`; then stops
/// the workers.
pub fn run(control: Control, events: ControlReceiver, endpoints: Endpoints) -> anyhow::Result<()> {
    tokio_uring::start(serve(control, events, endpoints))
}

async fn serve(
    mut control: Control,
    mut events: ControlReceiver,
    endpoints: Endpoints,
) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("cannot watch SIGUSR1")?;
    crate::process::release_control_signals()?;
    let (request_tx, mut requests) = tokio::sync::mpsc::channel(64);
    if let Some(socket) = endpoints.control {
        tokio_uring::spawn(log_failure(
            "control port",
            port::serve(socket, request_tx.clone()),
        ));
    }
    if let Some(listener) = endpoints.metrics {
        tokio_uring::spawn(log_failure(
            "metrics endpoint",
            port::serve_metrics(listener, request_tx.clone()),
        ));
    }
    let (health_tx, mut health_reports) = tokio::sync::mpsc::unbounded_channel();
    let mut checks = HealthTasks::default();
    checks.update(&mut control, &health_tx);
    while !control.exiting {
        tokio::select! {
            Some(report) = health_reports.recv() => control.on_health(report),
            Some(event) = events.recv() => control.on_event(event),
            Some(request) = requests.recv() => match request {
                ControlRequest::Command { line, peer, resolved, reply } => {
                    let _ = reply.send(control.run_command(&line, peer, &resolved));
                    checks.update(&mut control, &health_tx);
                }
                ControlRequest::Permitted { peer, reply } => {
                    let _ = reply.send(control.permits(Some(peer)));
                }
                ControlRequest::Metrics { reply } => {
                    let _ = reply.send(control.metrics_text());
                }
            },
            _ = hangup.recv() => {
                control.reload();
                checks.update(&mut control, &health_tx);
            }
            _ = usr1.recv() => control.on_usr1(),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("stopping");
    control.shared.stop();
    Ok(())
}

async fn log_failure(what: &str, task: impl std::future::Future<Output = anyhow::Result<()>>) {
    if let Err(e) = task.await {
        tracing::error!("{what}: {e:#}");
    }
}

/// The running health checks: one per checked server, so that a change to
/// one server restarts only its own check, and the others keep their
/// rise/fall counts.
#[derive(Default)]
struct HealthTasks {
    running: BTreeMap<usize, (std::net::SocketAddr, tokio::task::JoinHandle<()>)>,
}

impl HealthTasks {
    /// Follows the servers' addresses: stops the checks of servers that
    /// moved or can no longer be checked (their health goes back to
    /// Unchecked: what was known is about an address no longer used) and
    /// starts checks for new or moved ones, spread over one interval.
    fn update(&mut self, control: &mut Control, reports: &tokio::sync::mpsc::UnboundedSender<HealthReport>) {
        let Some(options) = control.health.clone() else {
            return;
        };
        let targets: BTreeMap<_, _> = control.check_targets().into_iter().collect();
        let mut stale = Vec::new();
        self.running.retain(|server, (addr, task)| {
            let keep = targets.get(server) == Some(addr);
            if !keep {
                task.abort();
                stale.push(*server);
            }
            keep
        });
        control.forget_health(&stale);
        let new: Vec<_> = targets
            .into_iter()
            .filter(|(server, _)| !self.running.contains_key(server))
            .collect();
        let options = std::rc::Rc::new(options);
        let interval = options.interval.max(crate::health::MIN_INTERVAL);
        let start = tokio::time::Instant::now();
        for (i, &(server, addr)) in new.iter().enumerate() {
            let first = start + interval / new.len() as u32 * i as u32;
            let reports = reports.clone();
            let report = move |server, health, latency, reason| {
                let _ = reports.send(HealthReport {
                    server,
                    addr,
                    health,
                    latency,
                    reason,
                });
            };
            let task = crate::health::watch(server, addr, options.clone(), first, std::rc::Rc::new(report));
            self.running.insert(server, (addr, task));
        }
    }
}
