//! Running the balancer: the connection limit, the pid file, daemonizing,
//! the request log and its rotation, signals, and dropping root.

mod common;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

use common::*;

#[test]
fn dash_x_holds_back_a_third_concurrent_client_until_one_closes() {
    let s0 = Backend::named("S0");
    let balancer = Balancer::start(&["-x", "2"], &[s0.spec()]);
    let (first, held_first) = balancer.hold(2);
    let (second, _held_second) = balancer.hold(3);
    assert_eq!((first.as_str(), second.as_str()), ("S0", "S0"));

    let mut third = balancer.connect_from(4);
    // Time under test: for a while, the third client gets nothing.
    third.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut byte = [0u8];
    match third.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("a third connection was served beyond -x 2: {other:?}"),
    }
    assert_eq!(s0.accepted(), 2);

    drop(held_first);
    third.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(read_line(&mut third).unwrap(), "S0", "served once a slot is free");
}

/// The soft and hard open-files limits of `pid` ("self" for the tests,
/// whose hard limit the balancer inherits).
fn open_files_limits(pid: &str) -> (u64, u64) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .expect("Max open files in /proc/PID/limits");
    let mut numbers = line.split_whitespace().map(|n| n.parse().expect("a number"));
    (numbers.next().unwrap(), numbers.next().unwrap())
}

/// The soft open-files limit and the descriptor table size of `pid`.
fn descriptor_room(pid: &str) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let table = status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("FDSize in /proc/PID/status");
    (open_files_limits(pid).0, table)
}

/// `-x` has its descriptors from the start: two per connection, within the
/// hard limit. Growing the table later, under a burst of accepts, would
/// stall every accept for an RCU grace period and overflow the listen queue.
#[test]
fn dash_x_and_conn_max_reserve_two_descriptors_per_connection() {
    if skip_on_pen("Pen leaves the open-files limit as it finds it") {
        return;
    }
    let s0 = Backend::named("S0");
    let ctl = Port::reserve();
    let ctl_addr = format!("127.0.0.1:{}", ctl.port);
    let balancer = Balancer::start(&["-x", "3000", "-u", "root", "-C", &ctl_addr], &[s0.spec()]);
    let pid = balancer.pid().to_string();
    let (_, hard) = open_files_limits("self");
    let (soft, table) = descriptor_room(&pid);
    let wanted = (2 * 3000).min(hard);
    assert!(
        soft >= wanted,
        "open-files soft limit {soft} for -x 3000 (hard {hard})"
    );
    assert!(
        table >= wanted,
        "descriptor table of {table} for -x 3000 (hard {hard})"
    );

    assert_eq!(penctl(&ctl_addr, "conn_max 6000"), "6000\n");
    let wanted = (2 * 6000).min(hard);
    wait_until(
        format!("room for {wanted} descriptors after conn_max 6000 (hard {hard})"),
        || {
            let (soft, table) = descriptor_room(&pid);
            soft >= wanted && table >= wanted
        },
    );
    assert_eq!(balancer.ask(2), "S0");
}

#[test]
fn dash_p_writes_the_pid_file_and_sigterm_removes_it_and_exits_0() {
    let s0 = Backend::named("S0");
    let mut balancer = Balancer::start(&["-p", "ringpen.pid"], &[s0.spec()]);
    let pid_file = balancer.dir.join("ringpen.pid");
    let pid = balancer.pid();
    wait_until("the pid file", || {
        fs::read_to_string(&pid_file).is_ok_and(|text| text.trim() == pid.to_string())
    });
    assert_eq!(balancer.ask(2), "S0");
    let status = balancer.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(!pid_file.exists(), "pid file left behind");
}

/// Without `-f`, what can stop the start is checked before going to the
/// background, where the error can still be seen: exit 1 and one line.
#[test]
fn without_dash_f_a_bad_pid_file_or_chroot_fails_in_the_foreground() {
    if skip_on_pen("Pen reports these from the daemon, after the launcher exited") {
        return;
    }
    for (option, value, names) in [
        (
            "-p",
            "/nonexistent/ringpen.pid",
            "pid file /nonexistent/ringpen.pid",
        ),
        ("-j", "/nonexistent", "-j: cannot use /nonexistent"),
    ] {
        let port = Port::reserve();
        let args: Vec<String> = [option, value, &port.port.to_string(), "127.0.0.1:1"]
            .map(String::from)
            .to_vec();
        let outcome = run_to_exit(&args);
        assert_eq!(outcome.status.code(), Some(1), "{option}: {}", outcome.stderr);
        assert_eq!(outcome.stderr.lines().count(), 1, "{option}: {}", outcome.stderr);
        assert!(outcome.stderr.contains(names), "{option}: {}", outcome.stderr);
    }
}

#[test]
fn without_dash_f_it_daemonizes_and_the_pid_file_names_the_daemon() {
    let s0 = Backend::named("S0");
    let launch = Launch::new(&["-p", "daemon.pid"], &[s0.spec()]).background();
    let mut balancer = Balancer::launch(launch);
    let pid_file = balancer.dir.join("daemon.pid");
    let daemon = balancer.pid();
    // The daemon can be ready (pid file, listener) a moment before the
    // process that launched it has exited.
    let mut launcher = None;
    wait_until("the launching process to exit", || {
        launcher = balancer.launcher_exit();
        launcher.is_some()
    });
    let launcher = launcher.expect("checked by the wait");
    assert!(launcher.success(), "the launching process exited with {launcher}");
    assert!(
        process_alive(daemon),
        "the daemon {daemon} named in the pid file is not running"
    );
    assert_eq!(balancer.ask(2), "S0", "the daemon proxies");

    balancer.signal("TERM");
    wait_until(format!("daemon {daemon} to exit after SIGTERM"), || {
        !process_alive(daemon)
    });
    wait_until("the daemon's pid file to go", || !pid_file.exists());
    assert!(!is_listening(balancer.port()));
}

/// Sends `data` in one write from 127.0.0.`octet` and waits for its echo,
/// so the balancer has read it (and logged it) before this returns.
fn send_through(balancer: &Balancer, octet: u8, data: &[u8]) {
    let mut stream = balancer.connect_from(octet);
    stream.write_all(data).unwrap();
    let mut echoed = vec![0u8; data.len()];
    stream.read_exact(&mut echoed).expect("the echo");
    assert_eq!(echoed, data);
}

/// The log's line for client `client` (Pen buffers its log until SIGHUP or
/// exit, so read it after one of those).
fn log_line_of<'a>(log: &'a str, client: &str) -> &'a str {
    let prefix = format!("{client} ");
    let mut lines = log.lines().filter(|l| l.starts_with(&prefix));
    let line = lines
        .next()
        .unwrap_or_else(|| panic!("no line for {client} in the log:\n{log}"));
    assert!(lines.next().is_none(), "one line per read chunk:\n{log}");
    line
}

fn check_log_line(line: &str, client: &str, times: (u64, u64), first_bytes: &str) {
    let fields: Vec<&str> = line.splitn(4, ' ').collect();
    assert_eq!(
        fields.len(),
        4,
        "client_ip unix_time server_ip first_bytes: {line:?}"
    );
    assert_eq!(fields[0], client, "{line:?}");
    let time: u64 = fields[1]
        .parse()
        .unwrap_or_else(|_| panic!("unix time in {line:?}"));
    assert!(
        (times.0..=times.1).contains(&time),
        "{time} not in {times:?}: {line:?}"
    );
    assert_eq!(fields[2], "127.0.0.1", "server address without port: {line:?}");
    assert_eq!(fields[3], first_bytes, "{line:?}");
}

#[test]
fn dash_l_logs_client_time_server_and_first_bytes_in_pens_format() {
    let echo = Backend::echo();
    let mut balancer = Balancer::start(&["-l", "access.log"], &[echo.spec()]);
    let before = unix_now();
    send_through(&balancer, 5, b"GET /a b\r\nHost: x\r\n\r\n");
    send_through(&balancer, 6, &[b'a'; 150]);
    send_through(&balancer, 7, b"caf\xc3\xa9 ok\nmore");
    let after = unix_now();
    assert!(balancer.terminate().success());

    let log = read_lossy(&balancer.dir.join("access.log"));
    assert_eq!(log.lines().count(), 3, "{log}");
    check_log_line(
        log_line_of(&log, "127.0.0.5"),
        "127.0.0.5",
        (before, after),
        "GET /a b",
    );
    let hundred = "a".repeat(100);
    check_log_line(
        log_line_of(&log, "127.0.0.6"),
        "127.0.0.6",
        (before, after),
        &hundred,
    );
    check_log_line(
        log_line_of(&log, "127.0.0.7"),
        "127.0.0.7",
        (before, after),
        "caf.. ok",
    );
}

#[test]
fn sighup_reopens_the_log_so_it_can_be_rotated() {
    let echo = Backend::echo();
    let mut balancer = Balancer::start(&["-l", "access.log"], &[echo.spec()]);
    let log = balancer.dir.join("access.log");
    let rotated = balancer.dir.join("access.log.1");

    send_through(&balancer, 5, b"before rotation");
    fs::rename(&log, &rotated).unwrap();
    balancer.signal("HUP");
    wait_until("the log file to be reopened after SIGHUP", || log.exists());
    send_through(&balancer, 6, b"after rotation");
    assert!(balancer.terminate().success());

    let old = read_lossy(&rotated);
    assert!(
        log_line_of(&old, "127.0.0.5").ends_with(" before rotation"),
        "{old}"
    );
    assert_eq!(old.lines().count(), 1, "the rotated file got new lines:\n{old}");
    let new = read_lossy(&log);
    assert!(
        log_line_of(&new, "127.0.0.6").ends_with(" after rotation"),
        "{new}"
    );
    assert_eq!(new.lines().count(), 1, "{new}");
}

#[test]
fn sigusr1_prints_per_server_stats_on_stderr_and_keeps_running() {
    let (s0, s1) = (Backend::named("S0"), Backend::named("S1"));
    let mut balancer = Balancer::start(&["-r"], &[s0.spec(), s1.spec()]);
    assert_eq!(balancer.ask(2), "S1");
    let before = balancer.stderr().len();
    balancer.signal("USR1");
    let ports = [s0.addr.port().to_string(), s1.addr.port().to_string()];
    wait_until("stats naming both servers' ports on stderr", || {
        let stderr = balancer.stderr();
        let new = stderr.get(before..).unwrap_or_default();
        ports.iter().all(|p| new.contains(p.as_str()))
    });
    assert!(balancer.alive(), "SIGUSR1 stopped the balancer");
    assert_eq!(balancer.ask(3), "S0", "still proxying after SIGUSR1");
}

fn uid_of(user: &str) -> Option<u32> {
    ids_of(user).map(|(uid, _)| uid)
}

/// (uid, gid) of `user` in /etc/passwd.
fn ids_of(user: &str) -> Option<(u32, u32)> {
    fs::read_to_string("/etc/passwd").ok()?.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() != Some(&user) {
            return None;
        }
        Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
    })
}

fn uids_of_process(pid: u32) -> Vec<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace()
        .skip(1)
        .map(|u| u.parse().unwrap())
        .collect()
}

#[test]
fn dash_u_nobody_gives_up_root_and_still_proxies() {
    if uids_of_process(std::process::id())[0] != 0 {
        eprintln!("skipped: -u needs the tests to run as root");
        return;
    }
    let nobody = uid_of("nobody").expect("a 'nobody' user in /etc/passwd");
    let s0 = Backend::named("S0");
    let balancer = Balancer::start(&["-u", "nobody"], &[s0.spec()]);
    assert_eq!(balancer.ask(2), "S0");
    assert_eq!(
        uids_of_process(balancer.pid()),
        [nobody; 4],
        "real, effective, saved, fs uid"
    );
}

#[test]
fn dash_u_without_root_runs_as_that_user_and_refuses_another() {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    if uids_of_process(std::process::id())[0] != 0 {
        eprintln!("skipped: starting a process as nobody needs the tests to run as root");
        return;
    }
    let (uid, gid) = ids_of("nobody").expect("a 'nobody' user in /etc/passwd");
    // A copy nobody can run: a clean clone's target directory may be private.
    let dir = TempDir::new();
    let binary = dir.join("ringpen");
    fs::copy(bin(), &binary).expect("copy the binary");
    let port = Port::reserve();
    let listen = format!("127.0.0.1:{}", port.port);
    let s0 = Backend::named("S0");
    let as_nobody = |user: &str| {
        let mut command = Command::new(&binary);
        command
            .args(["-f", "-u", user, &listen, &s0.spec()])
            .current_dir(dir.path())
            .uid(uid)
            .gid(gid);
        command
    };

    if !skip_on_pen("Pen's refusal is not one line") {
        let refused = output_within(&mut as_nobody("root"), WAIT).expect("run ringpen as nobody");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "-u root as nobody: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("-u: only root can become user 'root'"),
            "{stderr}"
        );
    }

    let mut child = ChildGuard(
        as_nobody("nobody")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .expect("start ringpen as nobody"),
    );
    wait_until("ringpen running as nobody to listen", || {
        listens_alone(child.0.id(), port.port) || child.0.try_wait().ok().flatten().is_some()
    });
    let mut client = connect_from(client_ip(2), listen.parse().unwrap());
    let reply = read_line(&mut client);
    drop(child);
    assert_eq!(
        reply.ok().as_deref(),
        Some("S0"),
        "stderr: {}",
        read_lossy(&dir.join("stderr"))
    );
}

#[test]
fn dash_j_keeps_the_log_and_pid_file_inside_the_jail_and_sighup_reopens_the_log_there() {
    if uids_of_process(std::process::id())[0] != 0 {
        eprintln!("skipped: -j needs the tests to run as root");
        return;
    }
    if skip_on_pen("Pen buffers its log lines until exit") {
        return;
    }
    let echo = Backend::echo();
    // Absolute paths name files in the jail; relative ones too, taken from
    // the jail's root.
    for (log_arg, pid_arg) in [("/requests.log", "/ringpen.pid"), ("requests.log", "ringpen.pid")] {
        let jail = TempDir::new();
        let jail_arg = jail.path().display().to_string();
        let mut balancer = Balancer::start(&["-j", &jail_arg, "-l", log_arg, "-p", pid_arg], &[echo.spec()]);
        // As in Pen, which opens both after chroot: the paths are the jail's.
        let pid_file = jail.join("ringpen.pid");
        let pid = balancer.pid();
        wait_until(format!("the pid file {pid_arg} inside the jail"), || {
            fs::read_to_string(&pid_file).is_ok_and(|text| text.trim() == pid.to_string())
        });
        let log = jail.join("requests.log");
        send_through(&balancer, 2, b"first");
        wait_until(format!("the request logged in {log_arg} inside the jail"), || {
            fs::read_to_string(&log).is_ok_and(|text| text.contains("127.0.0.2"))
        });
        // Rotation: move the log away; SIGHUP opens a new one by the same path.
        fs::rename(&log, jail.join("requests.log.1")).unwrap();
        balancer.signal("HUP");
        wait_until("the log reopened inside the jail", || log.exists());
        send_through(&balancer, 3, b"second");
        wait_until("the next request in the new log", || {
            fs::read_to_string(&log).is_ok_and(|text| text.contains("127.0.0.3"))
        });
        let status = balancer.terminate();
        assert!(status.success(), "exit status after SIGTERM: {status}");
        assert!(!pid_file.exists(), "pid file {pid_arg} left behind in the jail");
    }
}

#[test]
fn dash_dd_logs_each_connection() {
    if skip_on_pen("Pen's debug lines differ") {
        return;
    }
    let echo = Backend::echo();
    let balancer = Balancer::start(&["-d", "-d"], &[echo.spec()]);
    send_through(&balancer, 4, b"hello");
    balancer.wait_for_stderr("connection 0: 127.0.0.4 connected to Server(0) (127.0.0.1)");
    balancer.wait_for_stderr("connection 0: closed, 5 bytes from the client, 5 to it");
}
