//! `-U`: UDP balancing, black box. Backends are UDP threads answering each
//! datagram with `<name>:<payload>`; clients bind 127.0.0.x to act as
//! different client IPs.
//!
//! The harness's `Balancer` waits for a TCP LISTEN socket, which a UDP
//! balancer never has, so [`UdpBalancer`] waits instead for the balancer's
//! own bound sockets in /proc/net/udp{,6} (state 07, one per worker).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------
// /proc/net/udp
// ---------------------------------------------------------------------------

/// (local port, state, inode) of every UDP socket, IPv4 and IPv6.
fn udp_sockets() -> Vec<(u16, String, u64)> {
    proc_sockets(&["/proc/net/udp", "/proc/net/udp6"])
        .into_iter()
        .map(|s| (s.addr.port(), s.state, s.inode))
        .collect()
}

/// Whether `pid` owns `workers` sockets bound (state 07) to UDP `port` (one
/// per worker, SO_REUSEPORT), and nobody else has one there.
fn udp_bound_alone(pid: u32, port: u16, workers: usize) -> bool {
    let bound: Vec<u64> = udp_sockets()
        .into_iter()
        .filter(|(p, state, _)| *p == port && state == "07")
        .map(|(_, _, inode)| inode)
        .collect();
    let owned = socket_inodes_of(pid);
    bound.len() == workers && bound.iter().all(|i| owned.contains(i))
}

fn udp_port_free(port: u16) -> bool {
    // Where IPv6 is off nothing can hold the port on it.
    let v6 = match UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        Err(e) => matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)),
    };
    UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
        && v6
        && !udp_sockets().iter().any(|(p, _, _)| *p == port)
}

/// A [`Port`] free for TCP (the reservation) and for UDP.
fn reserve_udp_port() -> Port {
    for _ in 0..100 {
        let port = Port::reserve();
        if udp_port_free(port.port) {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP in 100 tries");
}

// ---------------------------------------------------------------------------
// The balancer
// ---------------------------------------------------------------------------

/// How to start a [`UdpBalancer`].
#[derive(Clone, Copy)]
struct Setup {
    /// The listen address (the port is reserved at start).
    ip: IpAddr,
    workers: usize,
    /// `-u root -w status.html -C 127.0.0.1:PORT`, waiting for the control
    /// port too.
    control: bool,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            ip: Ipv4Addr::LOCALHOST.into(),
            workers: 2,
            control: false,
        }
    }
}

impl Setup {
    fn with_control() -> Setup {
        Setup {
            control: true,
            ..Setup::default()
        }
    }
}

/// `ringpen -U opts... -f --workers N LISTEN servers...`, stopped on drop.
struct UdpBalancer {
    addr: SocketAddr,
    args: Vec<String>,
    dir: TempDir,
    child: Child,
    _port: Port,
    /// The reserved control port, with [`Setup::with_control`].
    control: Option<Port>,
}

impl UdpBalancer {
    fn start(opts: &[&str], servers: &[String]) -> UdpBalancer {
        UdpBalancer::launch(Setup::default(), opts, servers)
    }

    fn on_workers(workers: usize, opts: &[&str], servers: &[String]) -> UdpBalancer {
        UdpBalancer::launch(
            Setup {
                workers,
                ..Setup::default()
            },
            opts,
            servers,
        )
    }

    fn launch(setup: Setup, opts: &[&str], servers: &[String]) -> UdpBalancer {
        for attempt in 1..=3 {
            let port = reserve_udp_port();
            let ctl = setup.control.then(Port::reserve);
            let mut args: Vec<String> = vec!["-U".into()];
            if let Some(ctl) = &ctl {
                // `-w` so that `penctl status` has a page to answer with.
                args.extend(["-u", "root", "-w", "status.html", "-C"].map(String::from));
                args.push(format!("127.0.0.1:{}", ctl.port));
            }
            args.extend(opts.iter().map(|s| s.to_string()));
            args.extend(["-f".into(), "--workers".into(), setup.workers.to_string()]);
            let addr = SocketAddr::new(setup.ip, port.port);
            args.push(spec(addr));
            args.extend(servers.iter().cloned());
            let dir = TempDir::new();
            let mut child = spawn_in(&dir, &args);
            let deadline = Instant::now() + WAIT;
            let exited = loop {
                let ready = udp_bound_alone(child.id(), port.port, setup.workers)
                    && ctl.as_ref().is_none_or(|c| listens_alone(child.id(), c.port));
                if ready {
                    return UdpBalancer {
                        addr,
                        args,
                        dir,
                        child,
                        _port: port,
                        control: ctl,
                    };
                }
                if let Some(status) = child.try_wait().expect("poll the balancer") {
                    break status;
                }
                if Instant::now() > deadline {
                    stop_child(&mut child);
                    panic!(
                        "{args:?} did not bind UDP port {} within {WAIT:?}; stderr:\n{}",
                        port.port,
                        read_lossy(&dir.join("stderr"))
                    );
                }
                thread::sleep(Duration::from_millis(5));
            };
            let stderr = read_lossy(&dir.join("stderr"));
            if attempt < 3 && stderr.to_lowercase().contains("in use") {
                continue;
            }
            panic!("{args:?} exited ({exited}) instead of serving; stderr:\n{stderr}");
        }
        unreachable!()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        read_lossy(&self.dir.join("stderr"))
    }

    fn fds(&self) -> usize {
        fd_count(self.pid())
    }

    fn settled_fds(&self) -> usize {
        settled_fd_count(self.pid())
    }

    fn penctl(&self, command: &str) -> String {
        let ctl = self.control.as_ref().expect("started without a control port");
        common::penctl(&format!("127.0.0.1:{}", ctl.port), command)
    }

    /// A client socket on 127.0.0.`octet` (or ::1 for an IPv6 balancer).
    fn client(&self, octet: u8) -> Client {
        let ip = match self.addr {
            SocketAddr::V4(_) => client_ip(octet),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        Client::new(ip, self.addr)
    }
}

impl Drop for UdpBalancer {
    fn drop(&mut self) {
        stop_child(&mut self.child);
        if thread::panicking() {
            eprintln!("balancer {:?} stderr:\n{}", self.args, self.stderr());
        }
    }
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// A UDP backend thread: answers each datagram with `<name>:<payload>`, or
/// with `replies` datagrams `<name>:<payload>#1`, `#2`... Dropping (or
/// [`UdpBackend::close`]) closes its socket.
struct UdpBackend {
    name: String,
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpBackend {
    fn named(name: &str) -> UdpBackend {
        UdpBackend::start(name, Ipv4Addr::LOCALHOST.into(), 1)
    }

    fn start(name: &str, ip: IpAddr, replies: usize) -> UdpBackend {
        let socket = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind backend {name} on {ip}: {e}"));
        socket.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = socket.local_addr().unwrap();
        let received = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop, prefix) = (received.clone(), stop.clone(), format!("{name}:"));
            thread::Builder::new()
                .name(format!("udp backend {name}"))
                .spawn(move || {
                    let mut buf = vec![0u8; 70_000];
                    while !stop.load(Ordering::SeqCst) {
                        let Ok((n, from)) = socket.recv_from(&mut buf) else {
                            continue;
                        };
                        received.fetch_add(1, Ordering::SeqCst);
                        for i in 1..=replies {
                            let mut out = prefix.clone().into_bytes();
                            out.extend_from_slice(&buf[..n]);
                            if replies > 1 {
                                out.extend_from_slice(format!("#{i}").as_bytes());
                            }
                            socket.send_to(&out, from).unwrap_or_else(|e| {
                                panic!("backend reply of {} bytes to {from}: {e}", out.len())
                            });
                        }
                    }
                })
                .expect("start a backend thread")
        };
        UdpBackend {
            name: name.to_owned(),
            addr,
            received,
            stop,
            thread: Some(thread),
        }
    }

    fn spec(&self) -> String {
        spec(self.addr)
    }

    fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }

    /// Closes the socket: datagrams to its port now draw ICMP port
    /// unreachable.
    fn close(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("backend thread");
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.close();
    }
}

/// Named backends S0..S{n-1}.
fn named(n: usize) -> Vec<UdpBackend> {
    (0..n).map(|i| UdpBackend::named(&format!("S{i}"))).collect()
}

fn specs(backends: &[UdpBackend]) -> Vec<String> {
    backends.iter().map(UdpBackend::spec).collect()
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

struct Client {
    socket: UdpSocket,
    to: SocketAddr,
}

impl Client {
    fn new(ip: IpAddr, to: SocketAddr) -> Client {
        let socket = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind a client on {ip}: {e}"));
        Client { socket, to }
    }

    fn send(&self, payload: &[u8]) {
        let sent = self
            .socket
            .send_to(payload, self.to)
            .unwrap_or_else(|e| panic!("send {} bytes to {}: {e}", payload.len(), self.to));
        assert_eq!(sent, payload.len());
    }

    /// The next datagram within `bound`, which must come from the balancer.
    fn recv_within(&self, bound: Duration) -> Option<Vec<u8>> {
        self.socket.set_read_timeout(Some(bound)).unwrap();
        let mut buf = vec![0u8; 70_000];
        match self.socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                assert_eq!(from, self.to, "a datagram to {} from elsewhere", self.local());
                buf.truncate(n);
                Some(buf)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
            Err(e) => panic!("client {} receiving: {e}", self.local()),
        }
    }

    fn recv(&self) -> Vec<u8> {
        self.recv_within(WAIT)
            .unwrap_or_else(|| panic!("client {} got no reply within {WAIT:?}", self.local()))
    }

    /// Sends `payload` once and returns the name of the backend that
    /// answered it (checking the answer is `<name>:<payload>`).
    fn ask(&self, payload: &str) -> String {
        self.send(payload.as_bytes());
        let reply = String::from_utf8(self.recv()).expect("a text reply");
        let (name, echoed) = reply
            .split_once(':')
            .unwrap_or_else(|| panic!("reply {reply:?} to {payload:?}"));
        assert_eq!(echoed, payload, "client {} got another's reply", self.local());
        name.to_owned()
    }

    fn local(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }
}

// ---------------------------------------------------------------------------
// 1. Many clients, every reply to its asker
// ---------------------------------------------------------------------------

/// What one client of [`fifty_clients_each_get_exactly_their_own_replies`]
/// saw.
#[derive(Debug, Default)]
struct ClientReport {
    answered: usize,
    resent: usize,
    errors: Vec<String>,
    backends: HashSet<String>,
}

/// Sends `count` unique datagrams with at most `window` unanswered; a
/// datagram unanswered for 1 s is sent again (counted in `resent`), until
/// `bound` runs out.
fn run_client(client: Client, id: usize, count: usize, window: usize, bound: Duration) -> ClientReport {
    let mut report = ClientReport::default();
    let mut outstanding: HashMap<usize, Instant> = HashMap::new();
    let mut answered = vec![false; count];
    let mut next = 0;
    let deadline = Instant::now() + bound;
    while report.answered < count && Instant::now() < deadline {
        while next < count && outstanding.len() < window {
            client.send(format!("c{id}-{next}").as_bytes());
            outstanding.insert(next, Instant::now());
            next += 1;
        }
        let Some(reply) = client.recv_within(Duration::from_millis(100)) else {
            for (&seq, sent) in outstanding.iter_mut() {
                if sent.elapsed() > Duration::from_secs(1) {
                    client.send(format!("c{id}-{seq}").as_bytes());
                    *sent = Instant::now();
                    report.resent += 1;
                }
            }
            continue;
        };
        let reply = String::from_utf8_lossy(&reply).into_owned();
        let parsed = reply.split_once(':').and_then(|(name, payload)| {
            let (client, seq) = payload.strip_prefix('c')?.split_once('-')?;
            Some((
                name.to_owned(),
                client.parse::<usize>().ok()?,
                seq.parse::<usize>().ok()?,
            ))
        });
        match parsed {
            Some((name, who, seq)) if who == id && seq < count => {
                if answered[seq] {
                    report.errors.push(format!("{reply:?} twice"));
                    continue;
                }
                answered[seq] = true;
                outstanding.remove(&seq);
                report.answered += 1;
                report.backends.insert(name);
            }
            _ => report.errors.push(format!("someone else's reply {reply:?}")),
        }
    }
    report
}

#[test]
fn fifty_clients_each_get_exactly_their_own_replies() {
    const CLIENTS: usize = 50;
    const EACH: usize = 200;
    let backends = named(3);
    let balancer = UdpBalancer::start(&[], &specs(&backends));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let client = balancer.client(100 + id as u8);
            thread::spawn(move || run_client(client, id, EACH, 4, Duration::from_secs(60)))
        })
        .collect();
    let reports: Vec<ClientReport> = threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    for (id, report) in reports.iter().enumerate() {
        assert!(report.errors.is_empty(), "client {id}: {:?}", report.errors);
        assert_eq!(report.answered, EACH, "client {id}: {report:?}");
        assert_eq!(
            report.backends.len(),
            1,
            "client {id} tracked to one backend: {report:?}"
        );
    }
    let resent: usize = reports.iter().map(|r| r.resent).sum();
    assert_eq!(resent, 0, "datagrams lost on loopback and sent again");
    let received: usize = backends.iter().map(UdpBackend::received).sum();
    assert_eq!(received, CLIENTS * EACH, "datagrams the backends received");
    // 50 new clients in round robin: every backend has some.
    for backend in &backends {
        assert!(
            reports.iter().any(|r| r.backends.contains(&backend.name)),
            "no client reached {}",
            backend.name
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Tracking and round robin
// ---------------------------------------------------------------------------

#[test]
fn a_client_ip_keeps_its_backend_across_source_ports_while_new_ips_round_robin() {
    let backends = named(3);
    let balancer = UdpBalancer::start(&[], &specs(&backends));
    let a1 = balancer.client(160);
    let b = balancer.client(161);
    let a2 = balancer.client(160);
    let c = balancer.client(162);
    assert_ne!(a1.local().port(), a2.local().port());
    let order: Vec<String> = [&a1, &b, &a2, &c].iter().map(|cl| cl.ask("hello")).collect();
    // Round robin's first pick is server 1, as in Pen; .160's second port is
    // tracked to its first choice.
    assert_eq!(order, ["S1", "S2", "S1", "S0"]);
    for i in 0..50 {
        assert_eq!(a1.ask(&format!("a1-{i}")), "S1");
        assert_eq!(a2.ask(&format!("a2-{i}")), "S1");
        assert_eq!(b.ask(&format!("b-{i}")), "S2");
        assert_eq!(c.ask(&format!("c-{i}")), "S0");
    }
    // A third port from .160 long after: still tracked.
    assert_eq!(balancer.client(160).ask("again"), "S1");
}

#[test]
fn dash_r_round_robins_new_flows_and_each_flow_keeps_its_backend() {
    let backends = named(3);
    let balancer = UdpBalancer::start(&["-r"], &specs(&backends));
    let clients: Vec<Client> = (0..3).map(|_| balancer.client(163)).collect();
    let first: Vec<String> = clients.iter().map(|c| c.ask("first")).collect();
    assert_eq!(first, ["S1", "S2", "S0"], "three ports of one IP, Pen's order");
    for i in 0..20 {
        let again: Vec<String> = clients.iter().map(|c| c.ask(&format!("more-{i}"))).collect();
        assert_eq!(again, first, "a flow stays on its backend");
    }
    assert_eq!(balancer.client(163).ask("fourth"), "S1");
}

// ---------------------------------------------------------------------------
// 3. Failover
// ---------------------------------------------------------------------------

/// The status column of server `index` (at `port`) on `penctl status`.
fn status_of(page: &str, index: usize, port: u16) -> u64 {
    for row in page.split("<tr>").skip(1) {
        let cells: Vec<&str> = row
            .split("<td>")
            .skip(1)
            .filter_map(|c| c.split_once("</td>").map(|(v, _)| v))
            .collect();
        if cells.len() >= 4 && cells[0] == index.to_string() && cells[3] == port.to_string() {
            return cells[2]
                .parse()
                .unwrap_or_else(|_| panic!("status {:?} in {page}", cells[2]));
        }
    }
    panic!("no row for server {index} (port {port}) in:\n{page}");
}

#[test]
fn penctl_blacklist_sends_new_clients_elsewhere() {
    let backends = named(3);
    let balancer = UdpBalancer::launch(Setup::with_control(), &[], &specs(&backends));
    balancer.penctl("server 1 blacklist 30");
    assert_ne!(
        status_of(&balancer.penctl("status"), 1, backends[1].addr.port()),
        0,
        "server 1 blacklisted"
    );
    let replies: Vec<String> = (165..171).map(|o| balancer.client(o).ask("hi")).collect();
    // Round robin's picks 1, 2, 0, 1, 2, 0 with server 1 skipped.
    assert_eq!(replies, ["S2", "S0", "S2", "S0", "S2", "S0"]);
    assert_eq!(backends[1].received(), 0);
    // Lifting it lets server 1 back in.
    balancer.penctl("server 1 blacklist 0");
    let replies: Vec<String> = (171..174).map(|o| balancer.client(o).ask("hi")).collect();
    assert!(replies.iter().any(|r| r == "S1"), "{replies:?}");
}

#[test]
fn a_closed_backend_port_is_blacklisted_and_its_clients_move_on() {
    let mut backends = named(3);
    let balancer = UdpBalancer::launch(Setup::with_control(), &[], &specs(&backends));
    let client = balancer.client(175);
    assert_eq!(client.ask("before"), "S1");
    let s1_port = backends[1].addr.port();
    assert_eq!(status_of(&balancer.penctl("status"), 1, s1_port), 0);
    backends[1].close();
    // The next datagram draws ICMP port unreachable, which ends the flow and
    // blacklists server 1 (that datagram is lost); a later one opens a new
    // flow to another server.
    let deadline = Instant::now() + WAIT;
    let mut attempts = 0;
    let answer = loop {
        assert!(
            Instant::now() < deadline,
            "no answer after server 1 closed ({attempts} tries)"
        );
        attempts += 1;
        let payload = format!("after-{attempts}");
        client.send(payload.as_bytes());
        if let Some(reply) = client.recv_within(Duration::from_millis(300)) {
            let reply = String::from_utf8(reply).unwrap();
            let (name, echoed) = reply.split_once(':').unwrap();
            assert_eq!(echoed, payload);
            break name.to_owned();
        }
    };
    assert!(answer == "S0" || answer == "S2", "answered by {answer}");
    assert!(attempts >= 2, "the first datagram went to the closed port");
    assert!(
        balancer.stderr().contains("blacklisting server 1"),
        "stderr:\n{}",
        balancer.stderr()
    );
    assert_ne!(
        status_of(&balancer.penctl("status"), 1, s1_port),
        0,
        "server 1's status"
    );
    // New clients never try server 1: each first datagram is answered.
    for octet in 176..180 {
        let name = balancer.client(octet).ask("new");
        assert!(name == "S0" || name == "S2", "client {octet} answered by {name}");
    }
    // The moved client stays where it went.
    assert_eq!(client.ask("later"), answer);
}

// ---------------------------------------------------------------------------
// 4. Descriptors: idle expiry and -x
// ---------------------------------------------------------------------------

#[test]
fn idle_flows_end_after_udp_idle_and_free_their_descriptors() {
    let backends = named(2);
    let balancer = UdpBalancer::start(&["--udp-idle", "1"], &specs(&backends));
    let baseline = balancer.settled_fds();
    let clients: Vec<Client> = (120..140).map(|o| balancer.client(o)).collect();
    for round in 0..2 {
        let started = Instant::now();
        for client in &clients {
            client.ask(&format!("round-{round}"));
        }
        let last_sent = Instant::now();
        let live = balancer.fds();
        // A flow lives at least 1 s after its last datagram, so all 20 are
        // still open if the round took less than that.
        if started.elapsed() < Duration::from_millis(900) {
            assert_eq!(
                live,
                baseline + clients.len(),
                "one descriptor per flow (round {round})"
            );
        } else {
            eprintln!(
                "round {round} took {:?}: flow count not checked",
                started.elapsed()
            );
        }
        wait_until_for(
            Duration::from_secs(6),
            format!("descriptors back to {baseline} after --udp-idle 1 (round {round})"),
            || balancer.fds() == baseline,
        );
        let idle = last_sent.elapsed();
        assert!(
            idle >= Duration::from_millis(950),
            "flows ended after {idle:?}, before --udp-idle 1"
        );
    }
}

/// Samples the descriptor count of `pid` as fast as it can until dropped;
/// [`FdSampler::most`] is the highest count seen.
struct FdSampler {
    most: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FdSampler {
    fn start(pid: u32) -> FdSampler {
        let most = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let (most, done) = (most.clone(), done.clone());
            thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    most.fetch_max(fd_count(pid), Ordering::SeqCst);
                }
            })
        };
        FdSampler {
            most,
            done,
            thread: Some(thread),
        }
    }

    fn most(mut self) -> usize {
        self.stop();
        self.most.load(Ordering::SeqCst)
    }

    fn stop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for FdSampler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// 20 clients in turn, three rounds, on two workers: at `-x 5` and `-x 1`
/// every datagram is answered (the least recently used flow makes room)
/// and the flows' descriptors never pass the limit.
#[test]
fn dash_x_bounds_the_flows_and_evicts_the_least_recently_used() {
    let backends = named(2);
    for max in [5, 1] {
        let max_arg = max.to_string();
        let balancer = UdpBalancer::start(&["-x", &max_arg], &specs(&backends));
        let baseline = balancer.settled_fds();
        let clients: Vec<Client> = (140..160).map(|o| balancer.client(o)).collect();
        for round in 0..3 {
            for (i, client) in clients.iter().enumerate() {
                let payload = format!("round-{round}");
                client.send(payload.as_bytes());
                let reply = client.recv_within(Duration::from_secs(2)).unwrap_or_else(|| {
                    panic!(
                        "-x {max}: client {} ({i} of round {round}) unanswered: no flow was evicted for it",
                        client.local()
                    )
                });
                assert!(reply.ends_with(payload.as_bytes()));
                let fds = balancer.fds();
                assert!(
                    fds <= baseline + max,
                    "-x {max}: {fds} descriptors after client {i} of round {round}, baseline {baseline}"
                );
            }
        }
        assert_eq!(
            balancer.fds(),
            baseline + max,
            "-x {max}: the latest flows stay open"
        );
    }
}

/// Evicting a flow for a new one must not hold both descriptors: `-x` is
/// the bound on the flows' descriptors at every moment. One worker, so
/// that every new client can evict.
#[test]
fn dash_x_holds_no_more_descriptors_than_flows_even_while_evicting() {
    let backends = named(2);
    let balancer = UdpBalancer::on_workers(1, &["-x", "5"], &specs(&backends));
    let baseline = balancer.settled_fds();
    let clients: Vec<Client> = (100..180).map(|o| balancer.client(o)).collect();
    let sampler = FdSampler::start(balancer.pid());
    for client in &clients {
        client.ask("one by one");
    }
    // A burst of new clients: many evictions per batch of completions.
    for client in &clients {
        client.send(b"burst");
    }
    // The last five flows survive the burst and are answered: by then the
    // worker has handled every datagram of it.
    for client in clients.iter().rev().take(5) {
        let reply = client.recv_within(WAIT);
        assert!(
            reply.is_some_and(|r| r.ends_with(b"burst")),
            "{} unanswered",
            client.local()
        );
    }
    let most = sampler.most();
    assert!(
        most <= baseline + 5,
        "{most} descriptors at some point: more than {baseline} + -x 5"
    );
}

/// At `-x 1` on three workers the one flow can sit on a worker that is
/// not next to the one a new client reaches: the request for a slot must
/// travel on to it rather than bounce between two empty workers.
#[test]
fn dash_x_finds_the_flow_to_evict_on_any_worker() {
    let backends = named(2);
    let balancer = UdpBalancer::on_workers(3, &["-x", "1"], &specs(&backends));
    for octet in 160..184 {
        let client = balancer.client(octet);
        client.send(b"any slot");
        let reply = client.recv_within(Duration::from_secs(2));
        assert!(
            reply.is_some_and(|r| r.ends_with(b"any slot")),
            "client {} unanswered: no flow was evicted for it",
            client.local()
        );
    }
}

/// Two clients taking turns at `-x 1` on one worker: every new datagram
/// evicts the other client's flow, often with its datagram still queued
/// for sending. Every reply must still reach the client that asked, never
/// the other one (the evicted flow's send must not go out on the socket of
/// the flow that replaced it).
#[test]
fn evicting_a_flow_with_a_send_queued_never_crosses_replies() {
    let backends = named(2);
    let balancer = UdpBalancer::on_workers(1, &["-x", "1"], &specs(&backends));
    let threads: Vec<_> = [0, 1]
        .map(|id| {
            let client = balancer.client(120 + id as u8);
            thread::spawn(move || run_client(client, id, 400, 4, Duration::from_secs(4)))
        })
        .into_iter()
        .collect();
    for (id, thread) in threads.into_iter().enumerate() {
        let report = thread.join().expect("client thread");
        assert!(report.errors.is_empty(), "client {id}: {:?}", report.errors);
        assert!(report.answered > 0, "client {id} got no reply at all");
    }
}

// ---------------------------------------------------------------------------
// 5. IPv6
// ---------------------------------------------------------------------------

#[test]
fn ipv6_listen_address_to_an_ipv4_backend() {
    if skip_without_ipv6() {
        return;
    }
    let backend = UdpBackend::named("V4");
    let balancer = UdpBalancer::launch(
        Setup {
            ip: Ipv6Addr::LOCALHOST.into(),
            ..Setup::default()
        },
        &[],
        &[backend.spec()],
    );
    let client = balancer.client(0);
    assert!(client.local().is_ipv6());
    for i in 0..20 {
        assert_eq!(client.ask(&format!("six-to-four-{i}")), "V4");
    }
}

#[test]
fn ipv4_listen_address_to_an_ipv6_backend() {
    if skip_without_ipv6() {
        return;
    }
    let backend = UdpBackend::start("V6", Ipv6Addr::LOCALHOST.into(), 1);
    assert_eq!(backend.spec(), format!("[::1]:{}", backend.addr.port()));
    let balancer = UdpBalancer::start(&[], &[backend.spec()]);
    let client = balancer.client(181);
    for i in 0..20 {
        assert_eq!(client.ask(&format!("four-to-six-{i}")), "V6");
    }
}

// ---------------------------------------------------------------------------
// 6. Datagram boundaries
// ---------------------------------------------------------------------------

#[test]
fn a_65000_byte_datagram_arrives_intact_both_ways() {
    let backend = UdpBackend::named("B");
    let balancer = UdpBalancer::start(&[], &[backend.spec()]);
    let client = balancer.client(182);
    for seed in 0..3 {
        let payload = Data::bytes(seed, 65_000);
        client.send(&payload);
        let reply = client.recv();
        assert_eq!(reply.len(), 2 + payload.len(), "reply size (seed {seed})");
        assert!(
            reply[..2] == *b"B:" && reply[2..] == payload[..],
            "reply content (seed {seed})"
        );
    }
    // Small datagrams still work after the big ones.
    assert_eq!(client.ask("small"), "B");
}

// ---------------------------------------------------------------------------
// Access lists
// ---------------------------------------------------------------------------

#[test]
fn a_client_the_client_acl_denies_goes_to_the_abuse_server_or_nowhere() {
    let backend = UdpBackend::named("S0");
    let abuse = UdpBackend::named("B");
    let abuse_spec = format!("-B{}", abuse.spec());
    let deny = ["-o", "acl 1 deny 127.0.0.190", "-o", "client_acl 1"];
    let with_abuse: Vec<&str> = deny.iter().copied().chain([abuse_spec.as_str()]).collect();
    let balancer = UdpBalancer::start(&with_abuse, &[backend.spec()]);
    assert_eq!(balancer.client(190).ask("denied"), "B");
    assert_eq!(balancer.client(191).ask("permitted"), "S0");
    assert_eq!(backend.received(), 1, "only the permitted client reached S0");
    drop(balancer);

    let balancer = UdpBalancer::start(&deny, &[backend.spec()]);
    let denied = balancer.client(190);
    denied.send(b"denied");
    assert_eq!(denied.recv_within(Duration::from_millis(300)), None);
    assert_eq!(balancer.client(191).ask("permitted"), "S0");
    assert_eq!(backend.received(), 2, "the denied client's datagram was dropped");
    assert_eq!(abuse.received(), 1);
}

#[test]
fn dash_l_logs_every_datagram_a_client_sends() {
    let backend = UdpBackend::named("S0");
    let dir = TempDir::new();
    let log = dir.join("udp.log");
    let log_arg = log.display().to_string();
    let balancer = UdpBalancer::start(&["-l", &log_arg], &[backend.spec()]);
    let client = balancer.client(192);
    for payload in ["first", "second\r\nrest"] {
        client.ask(payload);
    }
    wait_until("two log lines", || read_lossy(&log).lines().count() == 2);
    let text = read_lossy(&log);
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.splitn(4, ' ').collect()).collect();
    for (fields, first_bytes) in lines.iter().zip(["first", "second"]) {
        assert_eq!(
            fields.len(),
            4,
            "client_ip unix_time server_ip first_bytes:\n{text}"
        );
        assert_eq!(
            (fields[0], fields[2], fields[3]),
            ("127.0.0.192", "127.0.0.1", first_bytes),
            "{text}"
        );
    }
}

#[test]
fn three_datagrams_answering_one_arrive_all_and_in_order() {
    let backend = UdpBackend::start("M", Ipv4Addr::LOCALHOST.into(), 3);
    let balancer = UdpBalancer::start(&[], &[backend.spec()]);
    let client = balancer.client(183);
    for i in 0..30 {
        let payload = format!("req-{i}");
        client.send(payload.as_bytes());
        let got: Vec<String> = (0..3)
            .map(|_| String::from_utf8(client.recv()).unwrap())
            .collect();
        let want: Vec<String> = (1..=3).map(|n| format!("M:{payload}#{n}")).collect();
        assert_eq!(got, want);
    }
    assert!(
        client.recv_within(Duration::from_millis(200)).is_none(),
        "nothing more"
    );
}
