//! The control plane through Debian's real `penctl`: replies byte for byte
//! as Pen's, config files and SIGHUP, `write`, ACLs, the root rule, a
//! silent control client, metrics. (`.ci/run` installs pen and penctl.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A control address for a test: a reserved port on 127.0.0.1.
struct ControlPort {
    port: Port,
}

impl ControlPort {
    fn new() -> Self {
        ControlPort {
            port: Port::reserve(),
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port.port)
    }
}

/// Debian's pen started by hand, for side-by-side comparison.
struct RealPen {
    child: Child,
    _port: Port,
}

impl RealPen {
    /// `pen -f OPTIONS... 127.0.0.1:PORT SERVERS...`
    fn start(options: &[String], servers: &[String]) -> Self {
        let port = Port::reserve();
        let mut full = vec!["-f".to_string()];
        full.extend_from_slice(options);
        full.push(format!("127.0.0.1:{}", port.port));
        full.extend_from_slice(servers);
        let child = Command::new("pen")
            .args(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run pen; .ci/run installs Debian's pen package");
        wait_until("pen to listen", || is_listening(port.port));
        RealPen { child, _port: port }
    }
}

impl Drop for RealPen {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

#[test]
fn penctl_replies_match_pens_byte_for_byte() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let servers = [a.spec(), b.spec()];
    let pen_ctl = ControlPort::new();
    let ours_ctl = ControlPort::new();
    let _pen = RealPen::start(
        &["-u".into(), "root".into(), "-C".into(), pen_ctl.addr()],
        &servers,
    );
    let _ours = Balancer::start(&["-u", "root", "-C", &ours_ctl.addr()], &servers);
    // Not compared: pid, listen and control (Pen echoes its argument text,
    // ringpen the resolved address), time-dependent output.
    let script = [
        "servers",
        "mode",
        "blacklist",
        "blacklist 12",
        "blacklist",
        "timeout",
        "timeout 7",
        "tracking",
        "clients_max",
        "conn_max",
        "debug",
        "server 1 weight 3",
        "server 0 max 10 hard 20",
        "servers",
        "hash",
        "mode",
        "no hash",
        "roundrobin",
        "stubborn",
        "mode",
        "bogus command",
        "exit",
        "status",
        "connection 0",
        "close 600",
        "client_acl",
        "control_acl",
        "idle_timeout",
        "log",
        "tcp_fastclose",
        "recent",
    ];
    let mut answered = 0;
    for command in script {
        let theirs = penctl(&pen_ctl.addr(), command);
        let ours = penctl(&ours_ctl.addr(), command);
        assert_eq!(ours, theirs, "reply to {command:?}");
        answered += usize::from(!ours.is_empty());
    }
    // Two control ports that never answered would agree on every line.
    assert!(answered > script.len() / 2, "only {answered} replies");
}

/// Backend "A" behind a balancer with a control port (`-u root -C`).
fn backend_a_behind_control() -> (Backend, ControlPort, Balancer) {
    let a = Backend::named("A");
    let ctl = ControlPort::new();
    let lb = Balancer::start(&["-u", "root", "-C", &ctl.addr()], &[a.spec()]);
    (a, ctl, lb)
}

#[test]
fn a_bad_command_gets_an_error_and_changes_nothing() {
    let (_a, ctl, lb) = backend_a_behind_control();
    let before = penctl(&ctl.addr(), "servers");
    for bad in [
        "server 0 max abc",
        "acl 12 permit 1.2.3.4",
        "timeout -1",
        "server 0 address nosuch.invalid",
    ] {
        let reply = penctl(&ctl.addr(), bad);
        assert_eq!(reply.lines().count(), 1, "{bad:?} -> {reply:?}");
        assert!(!reply.is_empty());
    }
    assert_eq!(penctl(&ctl.addr(), "servers"), before);
    assert_eq!(lb.ask(2), "A", "still balancing");
}

#[test]
fn a_silent_control_client_does_not_slow_traffic() {
    let (_a, ctl, lb) = backend_a_behind_control();
    // Pen reads its control socket in blocking mode: this would freeze it.
    let silent = TcpStream::connect(ctl.addr()).expect("connect to the control port");
    let mut trickle = TcpStream::connect(ctl.addr()).expect("connect to the control port");
    trickle.write_all(b"ser").unwrap();
    let started = Instant::now();
    for octet in 2..22 {
        assert_eq!(lb.ask(octet), "A");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "traffic waited for the control clients"
    );
    // And the control port still answers others.
    assert!(penctl(&ctl.addr(), "servers").starts_with("0 addr"));
    drop((silent, trickle));
}

#[test]
fn a_command_that_is_not_utf8_is_refused_not_mangled() {
    let (_a, ctl, lb) = backend_a_behind_control();
    let dir = TempDir::new();
    let mut stream = TcpStream::connect(ctl.addr()).expect("connect to the control port");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut command = format!("write {}/caf", dir.path().display()).into_bytes();
    command.extend_from_slice(b"\xe9.cfg\n");
    stream.write_all(&command).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "the command is not valid UTF-8\n");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing was written"
    );
    assert_eq!(lb.ask(2), "A");
}

/// Connections waiting in the accept queue of the listener on
/// 127.0.0.1:`port` (`rx_queue` of a listening socket in /proc/net/tcp).
fn accept_queue(port: u16) -> Option<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let listening = fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A");
        let rx = fields.get(4)?.split(':').nth(1)?;
        listening.then(|| usize::from_str_radix(rx, 16).ok()).flatten()
    })
}

/// A flood of connections that never send a command holds at most a
/// bounded number of descriptors (the rest are closed at once), traffic
/// keeps flowing, and the control port answers again once they are gone.
#[test]
fn a_flood_of_silent_control_clients_is_bounded() {
    let (_a, ctl, lb) = backend_a_behind_control();
    assert_eq!(lb.ask(2), "A");
    let baseline = fd_count(lb.pid());
    let silent: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(ctl.addr()).expect("connect to the control port"))
        .collect();
    wait_until("ringpen to accept every connection", || {
        accept_queue(ctl.port.port) == Some(0)
    });
    let held = fd_count(lb.pid());
    assert!(
        held <= baseline + 64,
        "{held} descriptors, {baseline} before the flood"
    );
    assert_eq!(lb.ask(3), "A");
    drop(silent);
    wait_until("the control port answers again", || {
        penctl(&ctl.addr(), "pid") == format!("{}\n", lb.pid())
    });
}

#[test]
fn as_root_without_u_no_control_port_is_opened() {
    if !nix_is_root() {
        return;
    }
    let a = Backend::named("A");
    let ctl = ControlPort::new();
    let lb = Balancer::start(&["-C", &ctl.addr()], &[a.spec()]);
    lb.wait_for_stderr("not opening the control port");
    assert!(!is_listening(ctl.port.port));
    assert_eq!(lb.ask(2), "A");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn sighup_rereads_the_config_file_and_a_bad_file_changes_nothing() {
    let a = Backend::named("A");
    let dir = TempDir::new();
    let file = dir.join("pen.cfg");
    std::fs::write(&file, "# weights\nserver 0 weight 5\n").unwrap();
    let ctl = ControlPort::new();
    let file_arg = file.display().to_string();
    let lb = Balancer::start(&["-u", "root", "-C", &ctl.addr(), "-F", &file_arg], &[a.spec()]);
    let weight = || penctl(&ctl.addr(), "servers");
    assert!(weight().contains("weight 5"), "{}", weight());

    std::fs::write(&file, "server 0 weight 9\nno_such_command\n").unwrap();
    lb.signal("HUP");
    lb.wait_for_stderr("line 2");
    assert!(
        weight().contains("weight 5"),
        "a bad file must change nothing: {}",
        weight()
    );

    std::fs::write(&file, "server 0 weight 9\n").unwrap();
    lb.signal("HUP");
    wait_until("the reloaded weight", || weight().contains("weight 9"));
}

/// A `log` that cannot be opened, or a `listen` address that cannot be
/// had, changes nothing: from penctl, and in a file reloaded by SIGHUP
/// (where a `listen` of the address in use is no change at all).
#[test]
fn a_log_or_listen_that_cannot_be_had_changes_nothing() {
    let a = Backend::named("A");
    let dir = TempDir::new();
    let file = dir.join("pen.cfg");
    std::fs::write(&file, "").unwrap();
    let log = dir.join("access.log").display().to_string();
    let ctl = ControlPort::new();
    let file_arg = file.display().to_string();
    let lb = Balancer::start(
        &["-u", "root", "-C", &ctl.addr(), "-F", &file_arg, "-l", &log],
        &[a.spec()],
    );
    let reply = penctl(&ctl.addr(), "log /nonexistent/dir/x.log");
    assert!(
        reply.starts_with("log: cannot open /nonexistent/dir/x.log: "),
        "{reply:?}"
    );
    assert_eq!(penctl(&ctl.addr(), "log"), format!("{log}\n"));
    // A good listen and then a bad log in one include: neither happens.
    let elsewhere = Port::reserve();
    let include = dir.join("move.cfg");
    let moved = format!(
        "listen 127.0.0.1:{}\nlog /nonexistent/dir/z.log\n",
        elsewhere.port
    );
    std::fs::write(&include, moved).unwrap();
    let reply = penctl(&ctl.addr(), &format!("include {}", include.display()));
    assert!(
        reply.starts_with("log: cannot open /nonexistent/dir/z.log: "),
        "{reply:?}"
    );
    assert_eq!(penctl(&ctl.addr(), "listen"), format!("{}\n", lb.addr));
    assert!(!is_listening(elsewhere.port), "the include's listen was bound");
    assert_eq!(lb.ask(4), "A");

    std::fs::write(&file, format!("listen {}\nlog /nonexistent/dir/y.log\n", lb.addr)).unwrap();
    lb.signal("HUP");
    lb.wait_for_stderr("cannot open /nonexistent/dir/y.log");
    assert_eq!(penctl(&ctl.addr(), "log"), format!("{log}\n"));
    assert_eq!(lb.ask(2), "A");

    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std::fs::write(&file, format!("listen {}\n", holder.local_addr().unwrap())).unwrap();
    lb.signal("HUP");
    lb.wait_for_stderr("still listening on");
    assert_eq!(penctl(&ctl.addr(), "listen"), format!("{}\n", lb.addr));
    assert_eq!(lb.ask(3), "A");
}

#[test]
fn a_bad_config_file_stops_the_start_with_its_line_number() {
    let dir = TempDir::new();
    let file = dir.join("bad.cfg");
    std::fs::write(&file, "blacklist 10\nserver 0 max lots\n").unwrap();
    let outcome = run_to_exit(&[
        "-f".into(),
        "-F".into(),
        file.display().to_string(),
        "127.0.0.1:1".into(),
        "127.0.0.1:2".into(),
    ]);
    assert!(!outcome.status.success());
    assert_eq!(outcome.stderr.lines().count(), 1, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("line 2"), "{}", outcome.stderr);
}

#[test]
fn write_produces_a_file_that_restarts_into_the_same_state() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let ctl = ControlPort::new();
    let servers = [a.spec(), b.spec()];
    let first = Balancer::start(&["-u", "root", "-C", &ctl.addr()], &servers);
    for command in [
        "server 0 weight 4",
        "server 1 max 3 hard 6",
        "hash",
        "blacklist 17",
        "acl 3 deny 10.0.0.0 255.0.0.0",
    ] {
        penctl(&ctl.addr(), command);
    }
    let saved = first.dir.join("saved.cfg");
    penctl(&ctl.addr(), &format!("write {}", saved.display()));
    wait_until("the written file", || saved.exists());
    let queries = ["servers", "mode", "blacklist"];
    let expected: Vec<String> = queries.iter().map(|q| penctl(&ctl.addr(), q)).collect();
    assert!(
        expected[0].contains("weight 4") && expected[0].contains("max 3 hard 6"),
        "{expected:?}"
    );
    assert!(
        expected[1].contains("hash") && expected[2] == "17\n",
        "{expected:?}"
    );

    let ctl2 = ControlPort::new();
    let saved_arg = saved.display().to_string();
    let _second = Balancer::start(&["-u", "root", "-C", &ctl2.addr(), "-F", &saved_arg], &servers);
    let got: Vec<String> = queries.iter().map(|q| penctl(&ctl2.addr(), q)).collect();
    assert_eq!(got, expected);
}

#[test]
fn startup_commands_apply_in_order() {
    let a = Backend::named("A");
    let ctl = ControlPort::new();
    let _lb = Balancer::start(
        &[
            "-u",
            "root",
            "-C",
            &ctl.addr(),
            "-o",
            "server 0 weight 2",
            "-O",
            "server 0 weight 8",
        ],
        &[a.spec()],
    );
    assert!(penctl(&ctl.addr(), "servers").contains("weight 8"));
}

#[test]
fn the_client_acl_turns_clients_away_or_to_the_abuse_server() {
    let a = Backend::named("A");
    let abuse = Backend::named("ABUSE");
    let ctl = ControlPort::new();
    let abuse_spec = abuse.spec();
    let lb = Balancer::start(&["-u", "root", "-C", &ctl.addr(), "-B", &abuse_spec], &[a.spec()]);
    penctl(&ctl.addr(), "acl 1 permit 127.0.0.2");
    penctl(&ctl.addr(), "client_acl 1");
    assert_eq!(lb.ask(2), "A");
    // No match: the opposite of the last entry (permit) is deny.
    assert_eq!(lb.ask(3), "ABUSE");

    let ctl2 = ControlPort::new();
    let closed = Balancer::start(&["-u", "root", "-C", &ctl2.addr()], &[a.spec()]);
    penctl(&ctl2.addr(), "acl 1 deny 127.0.0.4");
    penctl(&ctl2.addr(), "client_acl 1");
    assert_eq!(closed.ask(4), CLOSED);
    assert_eq!(closed.ask(5), "A");
}

#[test]
fn the_control_acl_closes_without_a_reply() {
    let (_a, ctl, lb) = backend_a_behind_control();
    penctl(&ctl.addr(), "acl 2 deny 127.0.0.1");
    assert_eq!(penctl(&ctl.addr(), "control_acl 2"), "2\n");
    // penctl prints nothing for a refused connection too: read the socket.
    let mut denied = TcpStream::connect(ctl.addr()).expect("the control port accepts");
    denied.set_read_timeout(Some(WAIT)).unwrap();
    let _ = denied.write_all(b"servers\n");
    let mut reply = Vec::new();
    let end = denied.read_to_end(&mut reply);
    // Closed (EOF, or a reset when the command arrived after the close),
    // not left open until the read timed out.
    let closed = end
        .as_ref()
        .map_or_else(|e| e.kind() == std::io::ErrorKind::ConnectionReset, |_| true);
    assert!(
        reply.is_empty() && closed,
        "a denied client got {reply:?} ({end:?})"
    );
    assert_eq!(lb.ask(2), "A", "still balancing");
}

/// Hosts `control_acl` denies are closed at accept, before they take one
/// of the control port's client slots: a flood of them cannot lock out a
/// permitted operator.
#[test]
fn denied_hosts_cannot_crowd_out_the_control_port() {
    let (_a, ctl, _lb) = backend_a_behind_control();
    penctl(&ctl.addr(), "acl 2 deny 127.0.0.2");
    penctl(&ctl.addr(), "acl 2 permit 0.0.0.0 0.0.0.0");
    penctl(&ctl.addr(), "control_acl 2");
    let control: std::net::SocketAddr = ctl.addr().parse().unwrap();
    let denied: Vec<TcpStream> = (0..100).map(|_| connect_from(client_ip(2), control)).collect();
    wait_until("ringpen to accept every connection", || {
        accept_queue(ctl.port.port) == Some(0)
    });
    assert!(penctl(&ctl.addr(), "servers").starts_with("0 addr"));
    drop(denied);
}

#[test]
fn metrics_are_served_over_http() {
    let a = Backend::named("A");
    let metrics = Port::reserve();
    let metrics_arg = format!("127.0.0.1:{}", metrics.port);
    let metrics_port = metrics.port;
    drop(metrics);
    let lb = Balancer::start(&["--metrics", &metrics_arg], &[a.spec()]);
    let (_, _held) = lb.hold(2);
    let request = |head: &[u8]| {
        let mut stream = TcpStream::connect(("127.0.0.1", metrics_port)).expect("connect to --metrics");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(head).unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    };
    let scrape = || request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    wait_until("one active connection in the metrics", || {
        scrape().contains("ringpen_backend_active_connections{server=\"0\"")
            && scrape().contains("ringpen_active_connections 1")
    });
    let text = scrape();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("ringpen_backend_up{server=\"0\""), "{text}");
    // Lines may end in a bare LF too, as some scripts send them.
    let text = request(b"GET /metrics HTTP/1.0\n\n");
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text:?}");
}

#[test]
fn exit_stops_the_balancer_only_with_x() {
    let (a, ctl, mut lb) = backend_a_behind_control();
    assert_eq!(
        penctl(&ctl.addr(), "exit"),
        "Exit is not enabled; restart with -X flag\n"
    );
    assert!(lb.alive());

    let ctl2 = ControlPort::new();
    let mut lb2 = Balancer::start(&["-u", "root", "-X", "-C", &ctl2.addr()], &[a.spec()]);
    penctl(&ctl2.addr(), "exit");
    wait_until("the balancer to exit", || !lb2.alive());
    assert!(lb2.terminate().success());
    assert!(lb.terminate().success());
}

#[test]
fn close_and_idle_timeout_end_connections() {
    let (_a, ctl, lb) = backend_a_behind_control();
    let (_, mut held) = lb.hold(2);
    assert!(penctl(&ctl.addr(), "connection 0").contains("state = 2"));
    assert_eq!(penctl(&ctl.addr(), "close 0"), "Forcibly closing connection 0\n");
    assert_eq!(read_to_end(&mut held), b"", "closed by `close 0`");

    penctl(&ctl.addr(), "idle_timeout 1");
    let (_, mut idle) = lb.hold(3);
    let started = Instant::now();
    assert_eq!(read_to_end(&mut idle), b"", "closed for idleness");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// Starts the backend `name` again at `addr` and waits until the checks
/// see both servers up.
fn restart_checked_up(ctl: &ControlPort, name: &str, addr: std::net::SocketAddr) -> Backend {
    let backend = Backend::named_at(name, addr);
    wait_until(format!("{name} back up"), || {
        penctl(&ctl.addr(), "health").matches("health up").count() == 2
    });
    backend
}

/// A balancer over `a` and `b` with fast TCP checks (every 0.2 s, rise and
/// fall 2) and a control port, once both servers are checked up.
fn tcp_checked(a: &Backend, b: &Backend, extra: &[&str]) -> (Balancer, ControlPort) {
    let ctl = ControlPort::new();
    let ctl_addr = ctl.addr();
    let mut opts = vec![
        "-u",
        "root",
        "-r",
        "-C",
        &ctl_addr,
        "--check",
        "tcp",
        "--check-interval",
        "0.2",
        "--rise",
        "2",
        "--fall",
        "2",
    ];
    opts.extend_from_slice(extra);
    let lb = Balancer::start(&opts, &[a.spec(), b.spec()]);
    wait_until("both servers up", || {
        penctl(&ctl_addr, "health").matches("health up").count() == 2
    });
    (lb, ctl)
}

fn server_1_down(ctl: &ControlPort) -> bool {
    penctl(&ctl.addr(), "health")
        .lines()
        .nth(1)
        .is_some_and(|l| l.ends_with("health down"))
}

#[test]
fn a_dead_backend_leaves_the_rotation_and_returns_after_rise() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let b_addr = b.addr;
    let (lb, ctl) = tcp_checked(&a, &b, &[]);

    drop(b);
    let gone = Instant::now();
    wait_until("server 1 down", || server_1_down(&ctl));
    // interval x fall, plus a check timeout's worth of slack.
    assert!(
        gone.elapsed() < Duration::from_secs(3),
        "took {:?}",
        gone.elapsed()
    );
    for octet in 2..8 {
        assert_eq!(lb.ask(octet), "A", "a down server gets no new clients");
    }

    let _b_again = restart_checked_up(&ctl, "B", b_addr);
    let answers: Vec<String> = (10..14).map(|octet| lb.ask(octet)).collect();
    assert!(
        answers.iter().any(|a| a == "B"),
        "round robin reaches B again: {answers:?}"
    );
}

/// Editing one server restarts only that server's check: a dead server
/// stays down while another moves, and a server that moves or can no
/// longer be checked (a Unix socket) forgets what was checked at its old
/// address.
#[test]
fn editing_servers_keeps_what_the_checks_know() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let (lb, ctl) = tcp_checked(&a, &b, &[]);
    drop(b);
    wait_until("server 1 down", || server_1_down(&ctl));

    let c = Backend::named("C");
    assert_eq!(
        penctl(&ctl.addr(), &format!("server 0 port {}", c.addr.port())),
        ""
    );
    // Five check intervals: a restarted check of server 1 would report it
    // unchecked after its first failure.
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(1) {
        assert!(
            server_1_down(&ctl),
            "server 1 left down: {}",
            penctl(&ctl.addr(), "health")
        );
    }
    wait_until("server 0 up at its new port", || {
        penctl(&ctl.addr(), "health")
            .starts_with(&format!("0 addr 127.0.0.1 port {} health up\n", c.addr.port()))
    });
    assert_eq!(lb.ask(2), "C");

    assert_eq!(penctl(&ctl.addr(), "server 1 address /nonexistent.sock"), "");
    let health = penctl(&ctl.addr(), "health");
    assert!(
        health
            .lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("1 addr /nonexistent.sock ") && l.ends_with(" health unchecked")),
        "{health}"
    );
}

#[test]
fn a_server_checked_up_again_is_no_longer_blacklisted() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let b_addr = b.addr;
    let (lb, ctl) = tcp_checked(&a, &b, &["-b", "60"]);

    // A client sent to the dead server fails over and blacklists it for 60 s.
    drop(b);
    for octet in 2..4 {
        assert_eq!(lb.ask(octet), "A");
    }
    lb.wait_for_stderr("blacklisting");
    wait_until("server 1 down", || server_1_down(&ctl));

    // Back, and checked up: the check is newer news than the failed connect.
    let _b_again = restart_checked_up(&ctl, "B", b_addr);
    let answers: Vec<String> = (10..14).map(|octet| lb.ask(octet)).collect();
    assert!(
        answers.iter().any(|a| a == "B"),
        "B takes clients again well before its 60 s blacklist ends: {answers:?}"
    );
}

#[test]
fn a_log_opened_at_run_time_names_connections_that_were_already_open() {
    let echo = Backend::echo();
    let ctl = ControlPort::new();
    let lb = Balancer::start(&["-u", "root", "-C", &ctl.addr()], &[echo.spec()]);
    let mut early = lb.connect_from(7);
    early.write_all(b"before\n").unwrap();
    let mut echoed = [0u8; 7];
    early.read_exact(&mut echoed).expect("the echo");
    let dir = TempDir::new();
    let log = dir.join("late.log");
    let reply = penctl(&ctl.addr(), &format!("log {}", log.display()));
    assert_eq!(reply, format!("{}\n", log.display()));
    early.write_all(b"after\n").unwrap();
    let mut echoed = [0u8; 6];
    early.read_exact(&mut echoed).expect("the echo");
    wait_until("the line for the early connection", || {
        read_lossy(&log).contains("after")
    });
    let line = read_lossy(&log);
    let fields: Vec<&str> = line.trim_end().splitn(4, ' ').collect();
    assert_eq!(
        (fields[0], fields[2], fields[3]),
        ("127.0.0.7", "127.0.0.1", "after"),
        "{line:?}"
    );
}

#[test]
fn a_blacklist_the_operator_set_outlives_a_restart_that_the_checks_see() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let b_addr = b.addr;
    let (lb, ctl) = tcp_checked(&a, &b, &[]);
    penctl(&ctl.addr(), "server 1 blacklist 3600");
    // Maintenance: B goes down and comes back, checked up again.
    drop(b);
    wait_until("server 1 down", || server_1_down(&ctl));
    let _b_again = restart_checked_up(&ctl, "B", b_addr);
    let answers: Vec<String> = (10..14).map(|octet| lb.ask(octet)).collect();
    assert!(
        answers.iter().all(|a| a == "A"),
        "B is still blacklisted: {answers:?}"
    );
}

#[test]
fn server_blacklist_holds_with_passive_blacklisting_off() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let ctl = ControlPort::new();
    // `-b 0`: no passive blacklisting; penctl alone takes servers out.
    let lb = Balancer::start(
        &["-u", "root", "-C", &ctl.addr(), "-b", "0", "-r"],
        &[a.spec(), b.spec()],
    );
    penctl(&ctl.addr(), "server 0 blacklist 60");
    let answers: Vec<String> = (2..6).map(|octet| lb.ask(octet)).collect();
    assert_eq!(answers, ["B"; 4]);
}

#[test]
fn status_and_write_say_so_when_their_file_cannot_be_written() {
    let (_a, ctl, _lb) = backend_a_behind_control();
    penctl(&ctl.addr(), "web_stats /nonexistent/dir/status.html");
    // Pen's reply, rather than a page the file never got.
    assert_eq!(penctl(&ctl.addr(), "status"), "Unable to create webstats\n");
    let reply = penctl(&ctl.addr(), "write /nonexistent/dir/pen.cfg");
    assert!(
        reply.starts_with("cannot write /nonexistent/dir/pen.cfg: "),
        "{reply:?}"
    );
}

#[test]
fn the_status_page_shows_pens_values_for_a_unix_server_and_a_client_without_a_server() {
    let (_a, ctl, lb) = backend_a_behind_control();
    let dir = TempDir::new();
    penctl(
        &ctl.addr(),
        &format!("web_stats {}", dir.join("status.html").display()),
    );
    penctl(&ctl.addr(), "server 1 address /nonexistent.sock");
    penctl(&ctl.addr(), "acl 1 deny 127.0.0.9");
    penctl(&ctl.addr(), "client_acl 1");
    assert_eq!(lb.ask(9), CLOSED, "denied by the client ACL");
    let page = penctl(&ctl.addr(), "status");
    // Pen's port for a Unix socket is 1 (as in `servers`).
    assert!(
        page.contains("<td>1</td>\n<td>/nonexistent.sock</td>\n<td>0</td>\n<td>1</td>\n"),
        "{page}"
    );
    // A client that never got a server: Pen's NO_SERVER, -3 (after the
    // address and the age).
    let row = page
        .split("<td>127.0.0.9</td>\n")
        .nth(1)
        .expect("the client's row");
    let cells: Vec<&str> = row.lines().take(2).collect();
    assert_eq!(cells[1], "<td>-3</td>", "{page}");
}

#[test]
fn the_status_page_is_written_on_sigusr1_and_returned_by_status() {
    let a = Backend::named("A");
    let dir = TempDir::new();
    let page = dir.join("status.html");
    let socket = dir.join("ctl.sock");
    let (page_arg, socket_arg) = (page.display().to_string(), socket.display().to_string());
    // A Unix-socket control port this time: `penctl /path`.
    let lb = Balancer::start(&["-u", "root", "-C", &socket_arg, "-w", &page_arg], &[a.spec()]);
    let (_, _held) = lb.hold(2);
    lb.signal("USR1");
    wait_until("the -w page", || read_lossy(&page).contains("</html>"));
    let written = read_lossy(&page);
    assert!(
        written.starts_with("<html>\n<head>\n<title>Pen status page</title>"),
        "{written}"
    );
    assert!(
        written.contains("<td>127.0.0.2</td>"),
        "the client is listed: {written}"
    );
    let replied = penctl(&socket_arg, "status");
    assert!(
        replied.starts_with("<html>") && replied.contains("Active connections"),
        "{replied}"
    );
}

#[test]
fn listen_moves_the_listener_and_a_taken_address_changes_nothing() {
    let (_a, ctl, lb) = backend_a_behind_control();
    let before = penctl(&ctl.addr(), "listen");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let reply = penctl(&ctl.addr(), &format!("listen 127.0.0.1:{taken_port}"));
    assert!(reply.starts_with("listen: "), "{reply}");
    assert_eq!(penctl(&ctl.addr(), "listen"), before);
    assert_eq!(lb.ask(2), "A", "still on the old port");

    let new = Port::reserve();
    let new_port = new.port;
    drop(new);
    penctl(&ctl.addr(), &format!("listen 127.0.0.1:{new_port}"));
    wait_until("the old port to close", || !is_listening(lb.port()));
    let mut stream = connect(std::net::SocketAddr::from(([127, 0, 0, 1], new_port)));
    assert_eq!(read_line(&mut stream).unwrap(), "A");
}

#[test]
fn the_servers_may_all_come_from_the_config_file() {
    let a = Backend::named("A");
    let dir = TempDir::new();
    let file = dir.join("servers.cfg");
    let port = a.addr.port();
    std::fs::write(&file, format!("server 0 address 127.0.0.1 port {port}\n")).unwrap();
    let file_arg = file.display().to_string();
    let lb = Balancer::start(&["-F", &file_arg], &[] as &[String]);
    assert_eq!(lb.ask(2), "A");

    let empty = dir.join("empty.cfg");
    std::fs::write(&empty, "# nothing\n").unwrap();
    let outcome = run_to_exit(&[
        "-f".into(),
        "-F".into(),
        empty.display().to_string(),
        "127.0.0.1:1".into(),
    ]);
    assert!(!outcome.status.success());
    assert!(
        outcome.stderr.contains("no backend servers"),
        "{}",
        outcome.stderr
    );
}
