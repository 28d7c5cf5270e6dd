//! The same command line must send the same clients to the same servers as
//! Debian's `pen`. Each case runs one client sequence through real `pen`
//! and through ringpen and compares which backend answered each client.
//! (`.ci/run` installs pen; without it these tests fail and say so.)

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// Backends that answer every connection with their name and keep it open
/// until the client closes, so held connections count as active.
struct Backends {
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backends {
    fn start(count: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut ports = Vec::new();
        let mut threads = Vec::new();
        for index in 0..count {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            ports.push(listener.local_addr().unwrap().port());
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.write_all(format!("S{index}\n").as_bytes());
                            std::thread::spawn(move || {
                                let _ = stream.set_read_timeout(Some(WAIT));
                                let _ = stream.read(&mut [0u8; 16]);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
        }
        Backends { ports, stop, threads }
    }

    fn specs(&self, extra: &[&str]) -> Vec<String> {
        self.ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("127.0.0.1:{p}{}", extra.get(i).copied().unwrap_or("")))
            .collect()
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// True when /proc shows a TCP socket listening on `port` (checking by
/// connecting would itself be a client and disturb round robin).
fn listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                cols.len() > 3
                    && cols[3] == "0A"
                    && cols[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
    })
}

struct Balancer(Child);

impl Balancer {
    fn start(program: &str, args: &[String], port: u16) -> Self {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e} (install Debian's pen; .ci/run does)"));
        let balancer = Balancer(child);
        let deadline = Instant::now() + WAIT;
        while !listening(port) {
            assert!(Instant::now() < deadline, "{program} did not listen on {port}");
            std::thread::sleep(Duration::from_millis(10));
        }
        balancer
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One client, from 127.0.0.`host` (and `source_port`, 0 = any): reads the
/// backend's name and keeps the connection open when `hold` (in `held`).
fn visit(port: u16, (host, source_port, hold): Client, held: &mut Vec<TcpStream>) -> String {
    let source = SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), source_port));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    // The pen run left this source port in TIME_WAIT towards another port.
    socket.set_reuse_address(true).unwrap();
    socket.bind(&source.into()).unwrap();
    socket
        .connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())
        .unwrap();
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut name = [0u8; 3];
    let answer = match stream.read_exact(&mut name) {
        Ok(()) => String::from_utf8_lossy(&name).into_owned(),
        Err(_) => "closed".to_string(),
    };
    if hold {
        held.push(stream);
    }
    answer
}

/// A client: source host 127.0.0.x, source port (0 = any), hold open.
type Client = (u8, u16, bool);

/// Runs `clients` through `program` started with
/// `options`, the listen port and the backends; returns who answered.
fn run(
    program: &str,
    options: &[&str],
    backends: &Backends,
    extra: &[&str],
    clients: &[Client],
) -> Vec<String> {
    // Reserved: below the ephemeral range, never the same for the pen and
    // the ringpen run, locked against other test processes.
    let reserved = common::Port::reserve();
    let port = reserved.port;
    let mut args: Vec<String> = vec!["-f".into()];
    args.extend(options.iter().map(|s| s.to_string()));
    args.push(format!("127.0.0.1:{port}"));
    args.extend(backends.specs(extra));
    let _balancer = Balancer::start(program, &args, port);
    let mut held = Vec::new();
    let answers = clients
        .iter()
        .map(|&client| visit(port, client, &mut held))
        .collect();
    drop(held);
    answers
}

fn assert_same_as_pen(options: &[&str], extra: &[&str], clients: &[Client]) {
    let backends = Backends::start(3);
    let pen = run("pen", options, &backends, extra, clients);
    let ours = run(env!("CARGO_BIN_EXE_ringpen"), options, &backends, extra, clients);
    assert_eq!(ours, pen, "options {options:?} {extra:?}: ringpen vs pen");
}

/// [`assert_same_as_pen`] for cases where the client table's clock matters:
/// it counts whole seconds (Pen wall-clock seconds, ringpen seconds since
/// its start), so a run crossing a second boundary can evict another
/// client. Each run starts just after a wall-clock second begins and is
/// repeated if it did not end within that second.
fn assert_same_as_pen_within_one_second(options: &[&str], clients: &[Client]) {
    let backends = Backends::start(3);
    let within_one_second =
        |program: &str| common::within_one_second(program, || run(program, options, &backends, &[], clients));
    let pen = within_one_second("pen");
    let ours = within_one_second(env!("CARGO_BIN_EXE_ringpen"));
    assert_eq!(ours, pen, "options {options:?}: ringpen vs pen");
}

fn short(hosts: &[u8]) -> Vec<Client> {
    hosts.iter().map(|&h| (h, 0, false)).collect()
}

#[test]
fn default_round_robin_with_tracking() {
    assert_same_as_pen(&[], &[], &short(&[2, 3, 4, 5, 6, 2, 3, 7, 4]));
}

#[test]
fn roundrobin_without_tracking() {
    assert_same_as_pen(&["-r"], &[], &short(&[2, 2, 2, 3, 3, 4, 2]));
}

#[test]
fn hash_on_client_address() {
    assert_same_as_pen(&["-h"], &[], &short(&[2, 3, 4, 5, 6, 7, 2, 9]));
}

#[test]
fn hash_without_tracking_mixes_in_the_source_port() {
    // Fixed source ports, on addresses no other test uses.
    let clients: Vec<Client> = [
        (60, 40000),
        (60, 40001),
        (60, 40002),
        (61, 40000),
        (61, 40007),
        (62, 40003),
    ]
    .iter()
    .map(|&(host, port)| (host, port, false))
    .collect();
    assert_same_as_pen(&["-r", "-h"], &[], &clients);
}

#[test]
fn small_client_table_evicts_like_pen() {
    assert_same_as_pen_within_one_second(&["-c", "3"], &short(&[2, 3, 4, 5, 6, 2, 3, 4]));
}

#[test]
fn weighted_least_connections() {
    // Held connections make the load differ; weights 1:2:3.
    let clients: Vec<Client> = (2..14).map(|h| (h, 0, true)).collect();
    assert_same_as_pen(&["-W", "-r"], &[":0:0:1", ":0:0:2", ":0:0:3"], &clients);
}

#[test]
fn soft_and_hard_limits() {
    // Server 0 takes one client (two for a client it already had), server 1 two.
    let clients = [
        (2, 0, true),
        (3, 0, true),
        (2, 0, true),
        (4, 0, true),
        (5, 0, true),
        (2, 0, true),
    ];
    assert_same_as_pen(&[], &[":1:2", ":2", ""], &clients);
}
