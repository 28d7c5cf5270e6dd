//! Black-box harness: starts the balancer as a child process, runs small
//! backends as threads in the test process, and connects clients from chosen
//! loopback addresses.
//!
//! The binary is `$RINGPEN_BIN` when set (e.g. `RINGPEN_BIN=/usr/bin/pen` to
//! check the tests against Debian's Pen), else the `ringpen` built by Cargo.
//!
//! Rules that keep these tests from ever being flaky:
//! - every wait polls against a deadline and panics with what it waited for;
//! - readiness is read from /proc/net/tcp{,6} (a LISTEN socket owned by the
//!   balancer), never probed through the balancer, which would move its
//!   round-robin cursor;
//! - balancer ports come from below the kernel's ephemeral range, are locked
//!   across processes with flock(2) and never handed out twice in a process,
//!   so neither another test's balancer nor an outgoing connection takes them;
//! - every process started is stopped by pid when its handle drops.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The bound on every wait for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);
/// The bound on a bulk transfer (16 MiB through a debug build).
pub const BULK_WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Which binary
// ---------------------------------------------------------------------------

/// The balancer under test.
pub fn bin() -> PathBuf {
    match std::env::var_os("RINGPEN_BIN") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_ringpen")),
    }
}

/// Whether the binary under test is Debian's Pen rather than ringpen: Pen
/// has no `--workers`, and has bugs that ringpen fixes.
pub fn is_pen() -> bool {
    let path = bin();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    !name.unwrap_or_default().contains("ringpen")
}

/// For tests of behaviour where ringpen deliberately differs from Pen (a
/// Pen bug that ringpen fixes): true, with a note, when testing Pen.
/// `RINGPEN_NO_SKIP=1` runs them anyway, to see them fail against Pen.
pub fn skip_on_pen(why: &str) -> bool {
    if std::env::var_os("RINGPEN_NO_SKIP").is_some() {
        return false;
    }
    if is_pen() {
        eprintln!("skipped against Pen ({}): {why}", bin().display());
    }
    is_pen()
}

/// True (and says so) where the host has no IPv6 loopback, as in some
/// containers: the IPv6 tests then have nothing to test.
pub fn skip_without_ipv6() -> bool {
    let missing = std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_err();
    if missing {
        eprintln!("skipped: this host has no IPv6 loopback (::1)");
    }
    missing
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Polls `cond` until it holds; panics after [`WAIT`] naming `what`.
pub fn wait_until(what: impl Display, cond: impl FnMut() -> bool) {
    wait_until_for(WAIT, what, cond)
}

pub fn wait_until_for(bound: Duration, what: impl Display, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {bound:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// A TCP port reserved for this test: free when picked, below the ephemeral
/// range (so no outgoing connection gets it as a source port), never given
/// to another test of this process, and flock(2)ed against concurrent test
/// processes (Pen and ringpen set SO_REUSEPORT, so two balancers could
/// otherwise share a port silently). Dropping it releases the reservation.
pub struct Port {
    pub port: u16,
    _lock: File,
}

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
static NEXT_PORT: AtomicU64 = AtomicU64::new(0);

impl Port {
    pub fn reserve() -> Port {
        const FIRST: u64 = 20_000;
        let end = ephemeral_start().clamp(FIRST as u16 + 1000, u16::MAX) as u64;
        let span = end - FIRST;
        let dir = std::env::temp_dir().join("ringpen-test-ports");
        fs::create_dir_all(&dir).expect("create the port lock directory");
        // Start somewhere that depends on the pid, so concurrent test
        // processes rarely contend for the same locks.
        let _ = NEXT_PORT.compare_exchange(
            0,
            (u64::from(std::process::id()) * 7919) % span + 1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        for _ in 0..span {
            let port = (FIRST + NEXT_PORT.fetch_add(1, Ordering::SeqCst) % span) as u16;
            {
                let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
                if !handed.get_or_insert_with(HashSet::new).insert(port) {
                    continue;
                }
            }
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(port.to_string()))
                .expect("open a port lock file");
            // SAFETY: flock on a descriptor we own; no memory is involved.
            let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
            if locked && port_is_free(port) {
                return Port { port, _lock: lock };
            }
        }
        panic!("no free TCP port between {FIRST} and {end}");
    }
}

fn ephemeral_start() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768)
}

fn port_is_free(port: u16) -> bool {
    let v4 = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok();
    // Where IPv6 is off nothing can hold the port on it.
    let v6 = match TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(_) => true,
        Err(e) => matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)),
    };
    v4 && v6 && !listening_sockets().iter().any(|s| s.addr.port() == port)
}

/// An address nothing listens on, so a connect is refused: a reserved port
/// that is not bound. Keep the returned [`Port`] alive while it is used.
pub fn refused_address() -> (SocketAddr, Port) {
    let port = Port::reserve();
    (SocketAddr::from((Ipv4Addr::LOCALHOST, port.port)), port)
}

// ---------------------------------------------------------------------------
// /proc/net/tcp
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct ProcSocket {
    pub addr: SocketAddr,
    pub remote: SocketAddr,
    /// The state as the kernel prints it: 0A LISTEN, 02 SYN_SENT, 01 ESTABLISHED.
    pub state: String,
    /// Bytes waiting in the send and receive queues.
    pub tx_queue: u64,
    pub rx_queue: u64,
    pub inode: u64,
}

fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::from(u32::from_str_radix(ip, 16).ok()?.to_ne_bytes()),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::from(bytes)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Every socket in the given /proc/net tables (`tcp`, `tcp6`, `udp`, `udp6`).
pub fn proc_sockets(files: &[&str]) -> Vec<ProcSocket> {
    let mut out = Vec::new();
    for file in files {
        let Ok(text) = fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let queues = f[4].split_once(':').and_then(|(tx, rx)| {
                Some((
                    u64::from_str_radix(tx, 16).ok()?,
                    u64::from_str_radix(rx, 16).ok()?,
                ))
            });
            let (Some(addr), Some(remote), Some((tx_queue, rx_queue)), Ok(inode)) =
                (parse_proc_addr(f[1]), parse_proc_addr(f[2]), queues, f[9].parse())
            else {
                continue;
            };
            out.push(ProcSocket {
                addr,
                remote,
                state: f[3].to_owned(),
                tx_queue,
                rx_queue,
                inode,
            });
        }
    }
    out
}

/// Every TCP socket of the network namespace, IPv4 and IPv6.
pub fn tcp_sockets() -> Vec<ProcSocket> {
    proc_sockets(&["/proc/net/tcp", "/proc/net/tcp6"])
}

pub fn listening_sockets() -> Vec<ProcSocket> {
    tcp_sockets().into_iter().filter(|s| s.state == "0A").collect()
}

/// Whether anything listens on TCP `port` (any address).
pub fn is_listening(port: u16) -> bool {
    listening_sockets().iter().any(|s| s.addr.port() == port)
}

/// The socket inodes among the open files of process `pid`.
pub fn socket_inodes_of(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for entry in dir.flatten() {
        if let Ok(target) = fs::read_link(entry.path()) {
            let target = target.to_string_lossy();
            if let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) {
                if let Ok(inode) = inode.parse() {
                    out.insert(inode);
                }
            }
        }
    }
    out
}

/// Whether process `pid` owns a socket listening on `port`, and nobody else
/// does.
pub fn listens_alone(pid: u32, port: u16) -> bool {
    let listening: Vec<u64> = listening_sockets()
        .into_iter()
        .filter(|s| s.addr.port() == port)
        .map(|s| s.inode)
        .collect();
    let owned = socket_inodes_of(pid);
    !listening.is_empty() && listening.iter().all(|i| owned.contains(i))
}

/// Kills (SIGKILL) every process that listens on `port`: cleanup after a
/// test found something there that should not be.
pub fn kill_listeners_on(port: u16) {
    let inodes: HashSet<u64> = listening_sockets()
        .into_iter()
        .filter(|s| s.addr.port() == port)
        .map(|s| s.inode)
        .collect();
    let Ok(procs) = fs::read_dir("/proc") else { return };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !socket_inodes_of(pid).is_disjoint(&inodes) {
            send_signal(pid, "KILL");
        }
    }
}

/// Live processes other than this one with `arg` among their arguments.
pub fn processes_with_arg(arg: &str) -> Vec<u32> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id() && process_alive(pid))
        .filter(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.split(|&b| b == 0).any(|a| a == arg.as_bytes())
        })
        .collect()
}

/// Whether some socket is in SYN_SENT towards `to` (a connect in progress).
pub fn connect_in_progress_to(to: SocketAddr) -> bool {
    tcp_sockets().iter().any(|s| s.state == "02" && s.remote == to)
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Runs `scenario` until one run fits in one second of both clocks a
/// balancer may count client-table time in (Pen's wall-clock seconds, or
/// seconds since its start, which is after the run begins): each run starts
/// just after a wall-clock second begins. Returns that run's result.
pub fn within_one_second<T>(what: impl Display, mut scenario: impl FnMut() -> T) -> T {
    for _ in 0..5 {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        thread::sleep(Duration::from_millis(1010) - Duration::from_nanos(since_epoch.subsec_nanos().into()));
        let second = unix_now();
        let started = Instant::now();
        let result = scenario();
        if started.elapsed() < Duration::from_millis(950) && unix_now() == second {
            return result;
        }
        eprintln!(
            "{what}: the run took {:?}, across a second boundary: again",
            started.elapsed()
        );
    }
    panic!("could not run {what} within one second in 5 tries");
}

/// Open descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
        .count()
}

/// Process `pid`'s descriptor count once it has not changed for 500 ms (a
/// balancer's workers set up their rings after its sockets are bound).
pub fn settled_fd_count(pid: u32) -> usize {
    let mut last = fd_count(pid);
    let mut since = Instant::now();
    wait_until("the balancer's descriptor count to settle", || {
        let now = fd_count(pid);
        if now != last {
            last = now;
            since = Instant::now();
        }
        since.elapsed() >= Duration::from_millis(500)
    });
    last
}

/// Runs Debian's `penctl ADDR words...` and returns what it printed.
/// penctl itself waits forever for a reply; a control port that never
/// answers fails the test after [`WAIT`] instead of hanging it.
pub fn penctl(addr: &str, command: &str) -> String {
    let output = output_within(Command::new("penctl").arg(addr).args(command.split(' ')), WAIT)
        .unwrap_or_else(|e| panic!("cannot run penctl ({e}); .ci/run installs Debian's pen package"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `cmd.output()`, but a command still running after `bound` is killed and
/// fails the test. Its output is read while it runs, so a long one cannot
/// fill a pipe and stall.
pub fn output_within(cmd: &mut Command, bound: Duration) -> std::io::Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            out
        })
    }
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let Some(status) = wait_exit(&mut child, bound) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} still ran after {bound:?}");
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    })
}

/// Sends `signal` (e.g. "TERM", "HUP") to `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .expect("run kill(1)");
    assert!(
        status.success() || !process_alive(pid),
        "kill -{signal} {pid} failed"
    );
}

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

pub struct TempDir(PathBuf);

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TempDir {
    pub fn new() -> TempDir {
        let n = DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("ringpen-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// The balancer
// ---------------------------------------------------------------------------

/// How to start the balancer. `opts` come first, then `-f` and
/// `--workers N` (ringpen only), then the listen address and the servers.
#[derive(Clone, Debug)]
pub struct Launch {
    pub opts: Vec<String>,
    pub servers: Vec<String>,
    pub listen_ip: IpAddr,
    pub foreground: bool,
    /// `--workers` for ringpen; never passed to Pen.
    pub workers: Option<u32>,
}

impl Launch {
    pub fn new<S: ToString>(opts: &[&str], servers: &[S]) -> Launch {
        Launch {
            opts: opts.iter().map(|s| s.to_string()).collect(),
            servers: servers.iter().map(|s| s.to_string()).collect(),
            listen_ip: Ipv4Addr::LOCALHOST.into(),
            foreground: true,
            workers: Some(2),
        }
    }

    pub fn listen_on(mut self, ip: IpAddr) -> Launch {
        self.listen_ip = ip;
        self
    }

    pub fn background(mut self) -> Launch {
        self.foreground = false;
        self
    }

    fn listen_arg(&self, port: u16) -> String {
        match self.listen_ip {
            IpAddr::V4(ip) => format!("{ip}:{port}"),
            // Pen splits at the last ':' and has no brackets.
            IpAddr::V6(ip) if is_pen() => format!("{ip}:{port}"),
            IpAddr::V6(ip) => format!("[{ip}]:{port}"),
        }
    }

    /// The full argument list for a balancer listening on `port`.
    pub fn args(&self, port: u16) -> Vec<String> {
        let mut args = self.opts.clone();
        if self.foreground {
            args.push("-f".into());
        }
        if let (Some(n), false) = (self.workers, is_pen()) {
            args.push("--workers".into());
            args.push(n.to_string());
        }
        args.push(self.listen_arg(port));
        args.extend(self.servers.iter().cloned());
        args
    }
}

/// A running balancer; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Balancer {
    pub addr: SocketAddr,
    pub dir: TempDir,
    pub args: Vec<String>,
    child: Option<Child>,
    /// The process that serves: the child, or the daemon it forked.
    pid: u32,
    _port: Port,
}

impl Balancer {
    /// Starts `opts... -f [--workers 2] 127.0.0.1:PORT servers...` and
    /// waits until it listens.
    pub fn start<S: ToString>(opts: &[&str], servers: &[S]) -> Balancer {
        Balancer::launch(Launch::new(opts, servers))
    }

    pub fn launch(launch: Launch) -> Balancer {
        let dir = TempDir::new();
        Balancer::launch_in(launch, dir)
    }

    /// Starts in `dir` (where stderr and stdout are captured). Options may
    /// name files in `dir`. Without `-f` the daemon's pid is read from the
    /// `-p` file, which the launch must then name.
    pub fn launch_in(launch: Launch, dir: TempDir) -> Balancer {
        for attempt in 1..=3 {
            let port = Port::reserve();
            let args = launch.args(port.port);
            let mut child = spawn_in(&dir, &args);
            let deadline = Instant::now() + WAIT;
            let mut exited = None;
            loop {
                let serving = if launch.foreground {
                    Some(child.id())
                } else {
                    pid_from_opts(&launch.opts, &dir)
                };
                if let Some(pid) = serving.filter(|&pid| listens_alone(pid, port.port)) {
                    return Balancer {
                        addr: SocketAddr::new(launch.listen_ip, port.port),
                        dir,
                        args,
                        child: Some(child),
                        pid,
                        _port: port,
                    };
                }
                if exited.is_none() {
                    exited = child.try_wait().expect("poll the balancer");
                }
                // Without -f the first process exits 0 once it has forked.
                if exited.is_some_and(|status| launch.foreground || !status.success()) {
                    break;
                }
                if Instant::now() > deadline {
                    stop_child(&mut child);
                    if let Some(pid) = serving.filter(|&pid| pid != child.id()) {
                        send_signal(pid, "KILL");
                    }
                    panic!(
                        "{} {:?} did not listen on port {} within {WAIT:?} (exit: {exited:?}); stderr:\n{}",
                        bin().display(),
                        args,
                        port.port,
                        read_lossy(&dir.join("stderr"))
                    );
                }
                thread::sleep(Duration::from_millis(5));
            }
            // Already reaped by try_wait; this only returns the status.
            let _ = child.wait();
            let stderr = read_lossy(&dir.join("stderr"));
            if attempt < 3 && stderr.to_lowercase().contains("in use") {
                continue;
            }
            panic!(
                "{} {:?} exited ({:?}) instead of listening; stderr:\n{stderr}",
                bin().display(),
                args,
                exited
            );
        }
        unreachable!()
    }

    /// The pid of the serving process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.join("stderr"))
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.pid, signal);
    }

    /// Waits until stderr contains `text`.
    pub fn wait_for_stderr(&self, text: &str) {
        wait_until(format!("{text:?} on the balancer's stderr"), || {
            self.stderr().contains(text)
        });
    }

    /// The exit status of the process we started, if it has exited (without
    /// `-f`, the launcher that forks the daemon).
    pub fn launcher_exit(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("poll the balancer")
    }

    /// Whether the serving process still runs.
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(child) if child.id() == self.pid => child.try_wait().expect("poll the balancer").is_none(),
            _ => process_alive(self.pid),
        }
    }

    /// Sends SIGTERM to the foreground balancer and returns its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("balancer already stopped");
        assert_eq!(child.id(), self.pid, "terminate() is for a foreground balancer");
        send_signal(self.pid, "TERM");
        wait_exit(&mut child, WAIT).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!("balancer did not exit within {WAIT:?} of SIGTERM");
        })
    }

    /// Connects from 127.0.0.`octet`.
    pub fn connect_from(&self, octet: u8) -> TcpStream {
        connect_from(client_ip(octet), self.addr)
    }

    /// Connects from 127.0.0.`octet` and reads the backend's one-line reply:
    /// its name, or [`CLOSED`] if the balancer closed the connection.
    pub fn ask(&self, octet: u8) -> String {
        self.hold(octet).0
    }

    /// Like [`Balancer::ask`], but keeps the connection open.
    pub fn hold(&self, octet: u8) -> (String, TcpStream) {
        let mut stream = self.connect_from(octet);
        let reply =
            read_line(&mut stream).unwrap_or_else(|e| panic!("client 127.0.0.{octet} got no reply: {e}"));
        (reply, stream)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
        if process_alive(self.pid) {
            send_signal(self.pid, "TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while process_alive(self.pid) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if process_alive(self.pid) {
                send_signal(self.pid, "KILL");
            }
        }
    }
}

fn pid_from_opts(opts: &[String], dir: &TempDir) -> Option<u32> {
    let i = opts.iter().position(|o| o == "-p")?;
    let path = dir.path().join(opts.get(i + 1)?);
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A child process stopped by [`stop_child`] when this goes out of scope,
/// also when a test panics.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        stop_child(&mut self.0);
    }
}

/// SIGTERM, then SIGKILL after 5 s.
pub fn stop_child(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    send_signal(child.id(), "TERM");
    if wait_exit(child, Duration::from_secs(5)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

pub fn wait_exit(child: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(status) = child.try_wait().expect("poll a child") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

pub fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned()
}

/// The result of running the binary to completion.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Starts the binary with `args` in `dir`, where its stdout and stderr go.
/// Host names that must fail to resolve (`nosuch.invalid`) fail within a
/// second or two even where the resolver drops queries instead of answering.
pub fn spawn_in(dir: &TempDir, args: &[String]) -> Child {
    Command::new(bin())
        .args(args)
        .env("RES_OPTIONS", "timeout:1 attempts:1")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(File::create(dir.join("stdout")).expect("create stdout file"))
        .stderr(File::create(dir.join("stderr")).expect("create stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin().display()))
}

/// Runs the binary with `args` and waits (bounded) for it to exit.
pub fn run_to_exit(args: &[String]) -> Outcome {
    let dir = TempDir::new();
    let mut child = spawn_in(&dir, args);
    let status = wait_exit(&mut child, WAIT);
    let stderr = read_lossy(&dir.join("stderr"));
    let Some(status) = status else {
        stop_child(&mut child);
        panic!(
            "{} {args:?} still ran after {WAIT:?}; stderr:\n{stderr}",
            bin().display()
        );
    };
    Outcome {
        status,
        stdout: read_lossy(&dir.join("stdout")),
        stderr,
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// The reply [`Balancer::ask`] reports when the connection was closed
/// without a byte.
pub const CLOSED: &str = "<closed>";

pub fn client_ip(octet: u8) -> IpAddr {
    Ipv4Addr::new(127, 0, 0, octet).into()
}

/// A TCP connection from `from` (port chosen by the kernel) to `to`, with
/// read and write timeouts of [`WAIT`].
pub fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))
        .expect("create a client socket");
    socket
        .bind(&SockAddr::from(SocketAddr::new(from, 0)))
        .unwrap_or_else(|e| panic!("bind the client to {from}: {e}"));
    socket
        .connect_timeout(&SockAddr::from(to), WAIT)
        .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream
}

/// A connection to `to` from the kernel's choice of address.
pub fn connect(to: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&to, WAIT).unwrap_or_else(|e| panic!("connect to {to}: {e}"));
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    stream
}

/// Reads up to '\n' (excluded). EOF or a reset before any byte gives
/// [`CLOSED`]; a timeout is an error.
pub fn read_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset && line.is_empty() => break,
            Err(e) => return Err(e),
        }
    }
    if line.is_empty() {
        return Ok(CLOSED.to_owned());
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Reads until EOF; panics on a timeout or error.
pub fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    stream
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("reading to EOF after {} bytes: {e}", out.len()));
    out
}

/// Whether the peer has sent nothing yet and the connection is still open
/// (a non-blocking peek).
pub fn nothing_received_yet(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8];
    let result = stream.peek(&mut byte);
    stream.set_nonblocking(false).unwrap();
    matches!(result, Err(e) if e.kind() == ErrorKind::WouldBlock)
}

// ---------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------

/// A reproducible pseudo-random byte stream (splitmix64 of the position), so
/// a receiver can check every byte without keeping a copy.
pub struct Data {
    seed: u64,
    pos: u64,
}

impl Data {
    pub fn new(seed: u64) -> Data {
        Data { seed, pos: 0 }
    }

    fn word(&self, index: u64) -> [u8; 8] {
        let mut z = self.seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).to_le_bytes()
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() {
            let word = self.word(self.pos / 8);
            let offset = (self.pos % 8) as usize;
            let n = (8 - offset).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&word[offset..offset + n]);
            i += n;
            self.pos += n as u64;
        }
    }

    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        Data::new(seed).fill(&mut out);
        out
    }
}

/// Writes `len` bytes of [`Data`] `seed`.
pub fn write_data(stream: &mut impl Write, seed: u64, len: u64) -> std::io::Result<()> {
    let mut data = Data::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        data.fill(&mut buf[..n]);
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads exactly `len` bytes and checks that they are [`Data`] `seed`; the
/// error says where the stream first went wrong.
pub fn check_data(stream: &mut impl Read, seed: u64, len: u64) -> Result<(), String> {
    let mut data = Data::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut expected = vec![0u8; 64 * 1024];
    let mut got: u64 = 0;
    while got < len {
        let want = (len - got).min(buf.len() as u64) as usize;
        let n = match stream.read(&mut buf[..want]) {
            Ok(0) => return Err(format!("only {got} of {len} bytes arrived before EOF")),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read error after {got} of {len} bytes: {e}")),
        };
        data.fill(&mut expected[..n]);
        if let Some(i) = (0..n).find(|&i| buf[i] != expected[i]) {
            return Err(format!("byte {} of {len} differs", got + i as u64));
        }
        got += n as u64;
    }
    Ok(())
}

/// [`check_data`], then EOF must follow.
pub fn check_data_then_eof(stream: &mut impl Read, seed: u64, len: u64) -> Result<(), String> {
    check_data(stream, seed, len)?;
    let mut extra = [0u8; 1];
    loop {
        return match stream.read(&mut extra) {
            Ok(0) => Ok(()),
            Ok(_) => Err(format!("more than the {len} bytes sent arrived")),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => Err(format!("no EOF after the {len} bytes: {e}")),
        };
    }
}

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

type Handler = Arc<dyn Fn(TcpStream) + Send + Sync>;

/// A backend server: a listener served by a thread, one more thread per
/// connection. Dropping it closes the listener (connections already
/// accepted run on until their peer closes).
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    live: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<()>,
}

struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Backend {
    pub fn start(name: &str, listener: TcpListener, handler: Handler) -> Backend {
        let addr = listener.local_addr().expect("backend address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let live = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = mpsc::channel();
        {
            let (accepted, live, stop) = (accepted.clone(), live.clone(), stop.clone());
            thread::Builder::new()
                .name(format!("backend {name}"))
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        accepted.fetch_add(1, Ordering::SeqCst);
                        live.fetch_add(1, Ordering::SeqCst);
                        let guard = LiveGuard(live.clone());
                        let handler = handler.clone();
                        thread::spawn(move || {
                            let _guard = guard;
                            let _ = stream.set_read_timeout(Some(BULK_WAIT));
                            let _ = stream.set_write_timeout(Some(BULK_WAIT));
                            handler(stream);
                        });
                    }
                    drop(listener);
                    let _ = done_tx.send(());
                })
                .expect("start a backend thread");
        }
        Backend {
            name: name.to_owned(),
            addr,
            accepted,
            live,
            stop,
            done,
        }
    }

    fn bind(ip: IpAddr) -> TcpListener {
        TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind a backend on {ip}: {e}"))
    }

    /// Replies with its name and a newline, then holds the connection open
    /// until the peer closes it.
    pub fn named(name: &str) -> Backend {
        Backend::named_on(name, Backend::bind(Ipv4Addr::LOCALHOST.into()))
    }

    /// A named backend on a given address, e.g. one that was refused before.
    pub fn named_at(name: &str, addr: SocketAddr) -> Backend {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind backend {name} on {addr}: {e}"));
        Backend::named_on(name, listener)
    }

    fn named_on(name: &str, listener: TcpListener) -> Backend {
        let reply = format!("{name}\n");
        Backend::start(
            name,
            listener,
            Arc::new(move |mut stream: TcpStream| {
                if stream.write_all(reply.as_bytes()).is_ok() {
                    drain(&mut stream);
                }
            }),
        )
    }

    /// Sends back everything it receives; after the client's EOF it closes.
    pub fn echo() -> Backend {
        Backend::echo_on(Ipv4Addr::LOCALHOST.into())
    }

    pub fn echo_on(ip: IpAddr) -> Backend {
        Backend::start(
            "echo",
            Backend::bind(ip),
            Arc::new(|mut stream: TcpStream| {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = stream.shutdown(Shutdown::Write);
            }),
        )
    }

    /// Reads until the end of an HTTP header block ("\r\n\r\n") or EOF,
    /// sends back exactly what it received, and closes.
    pub fn recorder() -> Backend {
        Backend::start(
            "recorder",
            Backend::bind(Ipv4Addr::LOCALHOST.into()),
            Arc::new(|mut stream: TcpStream| {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(&got);
                let _ = stream.shutdown(Shutdown::Write);
                drain(&mut stream);
            }),
        )
    }

    /// Sends `down_len` bytes of [`Data`] `down_seed` while checking that
    /// the client sends `up_len` bytes of `up_seed`, then waits for the
    /// client to close. No side half-closes while data is in flight. Each
    /// check result goes to the returned receiver.
    pub fn bulk(
        up_seed: u64,
        up_len: u64,
        down_seed: u64,
        down_len: u64,
    ) -> (Backend, mpsc::Receiver<Result<(), String>>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let backend = Backend::start(
            "bulk",
            Backend::bind(Ipv4Addr::LOCALHOST.into()),
            Arc::new(move |mut stream: TcpStream| {
                let mut writer = stream.try_clone().expect("clone a backend stream");
                let sender = thread::spawn(move || write_data(&mut writer, down_seed, down_len));
                let checked = check_data(&mut stream, up_seed, up_len);
                let sent = sender.join().expect("backend sender thread");
                let result = checked.and(sent.map_err(|e| format!("backend send failed: {e}")));
                let _ = tx.lock().unwrap().send(result);
                drain(&mut stream);
            }),
        );
        (backend, rx)
    }

    /// Reads the request to EOF (the client's half-close), then at once
    /// sends `len` bytes of [`Data`] `seed` and closes.
    pub fn reply_after_eof(seed: u64, len: u64) -> Backend {
        Backend::start(
            "reply-after-eof",
            Backend::bind(Ipv4Addr::LOCALHOST.into()),
            Arc::new(move |mut stream: TcpStream| {
                drain(&mut stream);
                let _ = write_data(&mut stream, seed, len);
                // Dropping closes the socket right away.
            }),
        )
    }

    /// The server spec for the balancer's command line: `host:port`.
    pub fn spec(&self) -> String {
        spec(self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections accepted and not yet finished.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees `stop` and closes the listener.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let _ = self.done.recv_timeout(Duration::from_secs(5));
    }
}

/// `host:port` as Pen reads it, with brackets for IPv6.
pub fn spec(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

/// A backend that never answers a SYN: a listening socket with a backlog
/// of 0 whose accept queue is already full, so the kernel drops new SYNs
/// and a connect to it hangs until the connector gives up. Verified on
/// creation by a probe connect that must time out.
pub struct Silent {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<TcpStream>,
}

impl Silent {
    pub fn start() -> Silent {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        listener
            .bind(&SockAddr::from(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        // Connections that complete fill the accept queue; once one times
        // out, SYNs are being dropped.
        for _ in 0..8 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(stream) => fillers.push(stream),
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                    return Silent {
                        addr,
                        _listener: listener,
                        _fillers: fillers,
                    };
                }
                Err(e) => panic!("probing the silent backend {addr}: {e}"),
            }
        }
        panic!("could not make {addr} silent: connects still complete with a full accept queue");
    }

    pub fn spec(&self) -> String {
        spec(self.addr)
    }
}
