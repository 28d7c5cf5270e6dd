//! Health checks against a real MariaDB (and a one-node Galera cluster)
//! that each test starts itself: its own data directory, port and socket,
//! never the system service. Nothing is skipped: without `mariadbd` or the
//! Galera provider the tests fail and say that `.ci/run` installs them.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ringpen::config::{CheckKind, DonorPolicy, HealthOptions, OnDown};
use ringpen::control::state::Health;
use ringpen::health::{check_once, HealthChecker, Verdict};

use common::{
    connect, nothing_received_yet, output_within, penctl, wait_until, Balancer, Port, TempDir, WAIT,
};

const CHECK_USER: &str = "health";
const CHECK_PASSWORD: &str = "s3cret-Pw";

fn opts(kind: CheckKind) -> HealthOptions {
    HealthOptions {
        kind,
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(3),
        rise: 2,
        fall: 2,
        user: Some(CHECK_USER.into()),
        password: Some(CHECK_PASSWORD.into()),
        donor: DonorPolicy::default(),
        on_down: OnDown::default(),
    }
}

fn find_tool(name: &str) -> PathBuf {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
        "/bin",
    ] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} is not installed: .ci/run installs mariadb-server and galera-4 (apt-get install mariadb-server galera-4)");
}

fn galera_provider() -> PathBuf {
    let listed = Command::new("dpkg").args(["-L", "galera-4"]).output();
    if let Ok(out) = listed {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().find(|l| l.ends_with("/libgalera_smm.so")) {
            return PathBuf::from(line);
        }
    }
    let fallback = PathBuf::from("/usr/lib/galera/libgalera_smm.so");
    assert!(
        fallback.exists(),
        "the Galera provider libgalera_smm.so is not installed: .ci/run installs galera-4"
    );
    fallback
}

/// A private mariadbd: its own data directory, port and socket.
struct Mariadb {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    /// The server's port and Galera's base port, reserved below the
    /// ephemeral range so that nothing takes them while the data directory
    /// is prepared.
    _ports: Vec<Port>,
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

impl Mariadb {
    fn start(galera: bool) -> Mariadb {
        let mariadbd = find_tool("mariadbd");
        let install = find_tool("mariadb-install-db");
        find_tool("mariadb");
        let dir = std::env::temp_dir().join(format!(
            "ringpen-health-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // From here on, Drop removes the directory whatever fails.
        let (server_port, galera_port) = (Port::reserve(), Port::reserve());
        let mut db = Mariadb {
            dir: dir.clone(),
            port: server_port.port,
            child: None,
            _ports: Vec::new(),
        };
        let galera_base_port = galera_port.port;
        db._ports = vec![server_port, galera_port];
        let data = dir.join("data");
        let root = unsafe { libc::geteuid() } == 0;

        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let mut cmd = Command::new(install);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            // Bootstraps running side by side collide in a shared /tmp.
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db");
        if root {
            cmd.arg("--user=root");
        }
        let out = {
            // And serialized all the same: a bootstrap takes half a second.
            static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one_at_a_time = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
            output_within(&mut cmd, Duration::from_secs(120)).expect("cannot run mariadb-install-db")
        };
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );

        let port = db.port;
        let mut cmd = Command::new(mariadbd);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg("--innodb-buffer-pool-size=32M")
            .arg("--skip-log-bin");
        if root {
            cmd.arg("--user=root");
        }
        if galera {
            cmd.arg("--wsrep-on=ON")
                .arg(format!("--wsrep-provider={}", galera_provider().display()))
                .arg("--wsrep-cluster-address=gcomm://")
                .arg("--wsrep-new-cluster")
                .arg("--binlog-format=ROW")
                .arg("--wsrep-node-address=127.0.0.1")
                .arg(format!(
                    "--wsrep-provider-options=base_port={galera_base_port};gcache.size=16M"
                ));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start mariadbd");
        db.child = Some(child);
        db.wait_ready(galera);
        // No anonymous account may shadow the check user or make the
        // default one log in.
        assert_eq!(db.sql("SELECT COUNT(*) FROM mysql.user WHERE user = ''"), "0");
        db.sql(&format!(
            "CREATE USER '{CHECK_USER}'@'%' IDENTIFIED BY '{CHECK_PASSWORD}'; \
             CREATE USER '{CHECK_USER}'@'localhost' IDENTIFIED BY '{CHECK_PASSWORD}'"
        ));
        db
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self, galera: bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe = if galera {
            "SHOW GLOBAL STATUS LIKE 'wsrep_local_state_comment'"
        } else {
            "SELECT 'ready'"
        };
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mariadbd exited ({status}) while starting:\n{}", self.error_log());
            }
            if let Ok(out) = self.try_sql(probe) {
                if out.contains("Synced") || out == "ready" {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd not ready within 30 s:\n{}",
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_sql(&self, statements: &str) -> Result<String, String> {
        let out = output_within(
            Command::new("mariadb")
                .arg("--no-defaults")
                .arg(format!("--socket={}", self.dir.join("sock").display()))
                .args(["-uroot", "-N", "-B", "-e", statements]),
            WAIT,
        )
        .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs SQL as root over the socket (a clean login and quit: it moves
    /// none of the Aborted_* counters).
    fn sql(&self, statements: &str) -> String {
        self.try_sql(statements)
            .unwrap_or_else(|e| panic!("{statements}: {e}"))
    }

    fn aborted(&self) -> BTreeMap<String, u64> {
        self.sql("SHOW GLOBAL STATUS LIKE 'Aborted_%'")
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once('\t')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn down_reason(v: Verdict) -> String {
    match v {
        Verdict::Down(reason) => reason,
        other => panic!("expected Down, got {other:?}"),
    }
}

#[test]
fn mysql_check_up_then_down_when_stopped() {
    let mut db = Mariadb::start(false);
    let addr = db.addr();
    tokio_uring::start(async {
        assert_eq!(
            check_once(CheckKind::Mysql, addr, &opts(CheckKind::Mysql)).await,
            Verdict::Up
        );
        assert_eq!(
            check_once(CheckKind::Tcp, addr, &opts(CheckKind::Tcp)).await,
            Verdict::Up
        );
        // A wrong password is a configuration error, reported as such.
        let mut wrong = opts(CheckKind::Mysql);
        wrong.password = Some("nope".into());
        let reason = down_reason(check_once(CheckKind::Mysql, addr, &wrong).await);
        assert!(reason.contains("1045"), "{reason}");
        // A galera check against a server without wsrep.
        let reason = down_reason(check_once(CheckKind::Galera, addr, &opts(CheckKind::Galera)).await);
        assert!(reason.starts_with("not a Galera node"), "{reason}");
    });
    db.stop();
    tokio_uring::start(async {
        for kind in [CheckKind::Tcp, CheckKind::Mysql, CheckKind::Galera] {
            let reason = down_reason(check_once(kind, addr, &opts(kind)).await);
            assert!(reason.contains("connect"), "{kind:?}: {reason}");
        }
    });
}

/// The balancer's host must never be blocked by `max_connect_errors`, nor
/// fill the server's log with aborted connections: 100 checks leave
/// `Aborted_connects` and `Aborted_clients` where they were. A bare TCP
/// check shows that the counters do see aborted connections.
#[test]
fn checks_leave_aborted_counters_unchanged() {
    let db = Mariadb::start(false);
    let addr = db.addr();
    let before = db.aborted();
    tokio_uring::start(async {
        let o = opts(CheckKind::Mysql);
        for _ in 0..100 {
            assert_eq!(check_once(CheckKind::Mysql, addr, &o).await, Verdict::Up);
        }
    });
    let after = db.aborted();
    assert_eq!(before, after, "mysql checks moved the Aborted_* counters");

    // The control: a TCP connect-and-close is an aborted connect.
    tokio_uring::start(async {
        for _ in 0..5 {
            assert_eq!(
                check_once(CheckKind::Tcp, addr, &opts(CheckKind::Tcp)).await,
                Verdict::Up
            );
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tcp = db.aborted();
    while tcp["Aborted_connects"] < after["Aborted_connects"] + 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        tcp = db.aborted();
    }
    assert_eq!(tcp["Aborted_connects"], after["Aborted_connects"] + 5, "{tcp:?}");
}

/// Without `--check-user` a mysql check logs in as `ringpen_check` with
/// no password: Up on "access denied" (alive, one aborted connect, never a
/// block), and clean once that account exists.
#[test]
fn mysql_check_without_credentials() {
    let db = Mariadb::start(false);
    let addr = db.addr();
    let mut o = opts(CheckKind::Mysql);
    o.user = None;
    o.password = None;
    let before = db.aborted();
    tokio_uring::start(async {
        assert_eq!(check_once(CheckKind::Mysql, addr, &o).await, Verdict::Up);
    });
    // The server counts the aborted connect after it has sent the error.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut denied = db.aborted();
    while denied["Aborted_connects"] == before["Aborted_connects"] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        denied = db.aborted();
    }
    assert_eq!(
        denied["Aborted_connects"],
        before["Aborted_connects"] + 1,
        "{denied:?}"
    );
    assert_eq!(
        denied.get("Aborted_connects_preauth"),
        before.get("Aborted_connects_preauth")
    );

    db.sql("CREATE USER 'ringpen_check'@'%'; CREATE USER 'ringpen_check'@'localhost'");
    tokio_uring::start(async {
        for _ in 0..20 {
            assert_eq!(check_once(CheckKind::Mysql, addr, &o).await, Verdict::Up);
        }
    });
    assert_eq!(db.aborted(), denied);
}

/// Waits (bounded) until the node reports Synced (wsrep_local_state 4).
fn wait_synced(db: &Mariadb) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while db.sql("SHOW GLOBAL STATUS LIKE 'wsrep_local_state'") != "wsrep_local_state\t4" {
        assert!(
            std::time::Instant::now() < deadline,
            "the node did not return to Synced"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn galera_one_node_cluster() {
    let db = Mariadb::start(true);
    let addr = db.addr();
    let galera = opts(CheckKind::Galera);
    let mut donor_down = galera.clone();
    donor_down.donor = DonorPolicy::Down;
    let mut donor_up = galera.clone();
    donor_up.donor = DonorPolicy::Up;
    let check = |o: &HealthOptions| {
        let o = o.clone();
        tokio_uring::start(async move { check_once(CheckKind::Galera, addr, &o).await })
    };

    assert_eq!(check(&galera), Verdict::Up, "Synced");

    // 100 galera checks: no aborted connect, no aborted client.
    let before = db.aborted();
    tokio_uring::start(async {
        for _ in 0..100 {
            assert_eq!(check_once(CheckKind::Galera, addr, &galera).await, Verdict::Up);
        }
    });
    assert_eq!(db.aborted(), before, "galera checks moved the Aborted_* counters");

    db.sql("SET GLOBAL wsrep_desync = ON");
    assert_eq!(
        db.sql("SHOW GLOBAL STATUS LIKE 'wsrep_local_state'"),
        "wsrep_local_state\t2"
    );
    assert_eq!(check(&galera), Verdict::Drain, "Donor/Desynced, default policy");
    let reason = down_reason(check(&donor_down));
    assert!(reason.contains("Donor/Desynced"), "{reason}");
    assert_eq!(check(&donor_up), Verdict::Up);
    db.sql("SET GLOBAL wsrep_desync = OFF");
    // Leaving desync is not instant: the node passes back to Synced.
    wait_synced(&db);
    assert_eq!(check(&galera), Verdict::Up, "Synced again");

    db.sql("SET GLOBAL wsrep_reject_queries = ALL");
    let reason = down_reason(check(&galera));
    assert!(reason.contains("wsrep_reject_queries=ALL"), "{reason}");
    db.sql("SET GLOBAL wsrep_reject_queries = NONE");
    assert_eq!(check(&galera), Verdict::Up, "accepting queries again");

    // The mysql kind only asks whether the server takes logins.
    db.sql("SET GLOBAL wsrep_desync = ON");
    assert_eq!(
        tokio_uring::start(async { check_once(CheckKind::Mysql, addr, &opts(CheckKind::Mysql)).await }),
        Verdict::Up
    );
    db.sql("SET GLOBAL wsrep_desync = OFF");
}

/// The scheduler: every target checked concurrently, every result
/// reported, rise/fall applied, latency kept.
#[test]
fn checker_reports_every_result() {
    let db = Mariadb::start(false);
    let live = db.addr();
    let nothing_there = Port::reserve();
    let dead = SocketAddr::from(([127, 0, 0, 1], nothing_there.port));
    type Report = (usize, Health, Duration, Option<String>);
    let reports: Rc<RefCell<Vec<Report>>> = Rc::default();
    let checker = HealthChecker::new(vec![(0, live), (7, dead)], opts(CheckKind::Mysql));
    let sink = reports.clone();
    tokio_uring::start(async {
        let run = checker.run(move |id, health, latency, reason| {
            sink.borrow_mut().push((id, health, latency, reason));
        });
        // 100 ms interval: about 8 checks of each server.
        let _ = tokio::time::timeout(Duration::from_millis(850), run).await;
    });
    let reports = reports.borrow();
    let of = |id| reports.iter().filter(move |r| r.0 == id).collect::<Vec<_>>();
    let (live_reports, dead_reports) = (of(0), of(7));
    assert!(live_reports.len() >= 5, "{reports:?}");
    assert!(dead_reports.len() >= 5, "{reports:?}");
    assert!(
        live_reports.iter().all(|r| r.1 == Health::Up && r.3.is_none()),
        "{live_reports:?}"
    );
    // fall = 2: the first failure leaves the dead server Unchecked.
    assert_eq!(dead_reports[0].1, Health::Unchecked);
    assert!(dead_reports[0].3.as_deref().unwrap_or("").contains("connect"));
    assert!(
        dead_reports[1..].iter().all(|r| r.1 == Health::Down),
        "{dead_reports:?}"
    );

    let status = checker.status(0).unwrap();
    assert_eq!(status.health, Health::Up);
    assert!(status.checks >= 5);
    let latency = checker.last_latency(0).unwrap();
    assert!(
        latency > Duration::ZERO && latency < Duration::from_secs(1),
        "{latency:?}"
    );
    assert_eq!(checker.status(7).unwrap().health, Health::Down);
    assert_eq!(checker.snapshot().len(), 2);
}

/// Servers that refuse before the handshake (1040 Too many connections,
/// 1129 host blocked) send an ERR packet instead of the greeting.
#[test]
fn error_packet_instead_of_greeting_is_down() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        for (code, message) in [
            (1040u16, "Too many connections"),
            (1129, "Host '127.0.0.1' is blocked"),
        ] {
            let (mut s, _) = listener.accept().unwrap();
            let mut payload = vec![0xff];
            payload.extend_from_slice(&code.to_le_bytes());
            payload.extend_from_slice(message.as_bytes());
            let mut packet = (payload.len() as u32).to_le_bytes()[..3].to_vec();
            packet.push(0);
            packet.extend_from_slice(&payload);
            std::io::Write::write_all(&mut s, &packet).unwrap();
            let _ = s.read(&mut [0; 16]);
        }
    });
    tokio_uring::start(async {
        let o = opts(CheckKind::Mysql);
        let reason = down_reason(check_once(CheckKind::Mysql, addr, &o).await);
        assert!(
            reason.contains("1040") && reason.contains("Too many connections"),
            "{reason}"
        );
        let reason = down_reason(check_once(CheckKind::Galera, addr, &o).await);
        assert!(reason.contains("1129"), "{reason}");
    });
    server.join().unwrap();
}

/// A server that accepts and never speaks: the check ends at the timeout
/// and its socket is closed (the server sees EOF), not left to a read that
/// never completes.
#[test]
fn silent_server_times_out_and_the_socket_is_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut o = opts(CheckKind::Mysql);
    o.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let verdict = tokio_uring::start(async { check_once(CheckKind::Mysql, addr, &o).await });
    let took = started.elapsed();
    let reason = down_reason(verdict);
    assert!(
        reason.contains("timed out") && reason.contains("greeting"),
        "{reason}"
    );
    assert!(
        took >= o.timeout && took < o.timeout + Duration::from_secs(1),
        "{took:?}"
    );
    let (mut accepted, _) = listener.accept().unwrap();
    accepted.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let n = accepted
        .read(&mut [0; 64])
        .expect("the check's socket was not closed");
    assert_eq!(n, 0, "the check sent bytes to a server that never greeted");
}

/// A connect that never completes (the SYN is dropped) ends at the
/// timeout and leaves no socket behind in SYN_SENT.
#[test]
fn unanswered_connect_times_out_without_leaking_the_socket() {
    // A listener with a full backlog drops new SYNs.
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        fillers.push(s);
    }
    std::thread::sleep(Duration::from_millis(100));
    let syn_sent = || {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let remote = format!("0100007F:{:04X}", addr.port());
        table
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[2] == remote && f[3] == "02"
            })
            .count()
    };
    let before = syn_sent();
    assert!(before >= 1, "the backlog trick did not leave a connect pending");

    let mut o = opts(CheckKind::Tcp);
    o.timeout = Duration::from_millis(200);
    tokio_uring::start(async {
        for kind in [CheckKind::Tcp, CheckKind::Mysql] {
            let reason = down_reason(check_once(kind, addr, &o).await);
            assert!(
                reason.contains("timed out") && reason.contains("connecting"),
                "{reason}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    assert_eq!(syn_sent(), before, "a timed-out check left its connect behind");
    drop(fillers);
}

/// A message built only when a wait times out, so it can show the last
/// thing seen.
struct Lazy<F: Fn() -> String>(F);

impl<F: Fn() -> String> fmt::Display for Lazy<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&(self.0)())
    }
}

/// Reads the first MySQL packet; `None` if the connection is closed (EOF
/// or reset) before a whole 4-byte header and payload arrived.
fn read_packet(stream: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    let mut header = [0u8; 4];
    match stream.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => return None,
        Err(e) => panic!("reading a MySQL packet header: {e}"),
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    let mut payload = vec![0u8; len];
    match stream.read_exact(&mut payload) {
        Ok(()) => Some(payload),
        Err(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => None,
        Err(e) => panic!("reading a MySQL packet payload: {e}"),
    }
}

/// The balancer end to end against a one-node Galera cluster: a galera
/// check configured on the command line (password from a file), health
/// read through Debian's `penctl`, and the data path following it: a
/// Donor/Desynced node drains (new clients find no server, clients already
/// connected keep their connection), `wsrep_reject_queries=ALL` takes it
/// down, and both come back up.
#[test]
fn balancer_follows_galera_health_through_penctl() {
    let db = Mariadb::start(true);
    let secrets = TempDir::new();
    let password_file = secrets.join("check-password");
    std::fs::write(&password_file, format!("{CHECK_PASSWORD}\n")).unwrap();
    let control = Port::reserve();
    let control_addr = format!("127.0.0.1:{}", control.port);
    let lb = Balancer::start(
        &[
            "-u",
            "root",
            "-C",
            &control_addr,
            "--check",
            "galera",
            "--check-user",
            CHECK_USER,
            "--check-password-file",
            password_file.to_str().unwrap(),
            "--check-interval",
            "0.2",
            "--rise",
            "1",
            "--fall",
            "1",
        ],
        &[format!("127.0.0.1:{}", db.port)],
    );

    let last = RefCell::new(String::new());
    let wait_health = |want: &str| {
        let expected = format!("0 addr 127.0.0.1 port {} health {want}\n", db.port);
        wait_until(
            Lazy(|| {
                format!(
                    "penctl {control_addr} health to print {expected:?}; last printed {:?}; ringpen stderr:\n{}",
                    last.borrow(),
                    lb.stderr()
                )
            }),
            || {
                *last.borrow_mut() = penctl(&control_addr, "health");
                *last.borrow() == expected
            },
        );
    };
    let greeted = |stream: &mut std::net::TcpStream| {
        let greeting = read_packet(stream).unwrap_or_else(|| {
            panic!(
                "closed without the MariaDB greeting; ringpen stderr:\n{}",
                lb.stderr()
            )
        });
        assert_eq!(
            greeting.first(),
            Some(&10),
            "not a protocol-10 greeting: {greeting:?}"
        );
    };

    wait_health("up");
    let mut before = connect(lb.addr);
    greeted(&mut before);

    db.sql("SET GLOBAL wsrep_desync = ON");
    wait_health("drain");
    let mut refused = connect(lb.addr);
    assert_eq!(
        read_packet(&mut refused),
        None,
        "a new client got a packet from the only server, which drains"
    );
    assert!(
        nothing_received_yet(&before),
        "the client connected before the drain was closed or sent something"
    );
    // COM_QUIT goes through to the server, which ends the connection (a
    // read that timed out would mean it never got there). Mid-handshake
    // the server may first answer with an ERR packet (1156 "Got packets
    // out of order"), which shows all the more that it got the bytes.
    before.write_all(&[1, 0, 0, 0, 1]).expect("send COM_QUIT");
    let mut rest = Vec::new();
    before
        .read_to_end(&mut rest)
        .expect("the server to close the connection after COM_QUIT");
    assert!(
        rest.is_empty() || rest.get(4) == Some(&0xff),
        "unexpected reply to COM_QUIT: {rest:?}"
    );
    drop(before);

    db.sql("SET GLOBAL wsrep_desync = OFF");
    wait_health("up");
    greeted(&mut connect(lb.addr));

    db.sql("SET GLOBAL wsrep_reject_queries = ALL");
    wait_health("down");
    db.sql("SET GLOBAL wsrep_reject_queries = NONE");
    wait_health("up");
    greeted(&mut connect(lb.addr));
}
