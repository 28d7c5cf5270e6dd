//! The command line: every bad one is refused with a non-zero exit status
//! and exactly one line on stderr that names the offending argument, and
//! nothing is left listening. (Pen prints its usage and exits 0 instead, so
//! those tests are skipped against Pen.)

mod common;

use common::*;

/// Runs `args` (without `-f`: an error must come before daemonizing),
/// where "LISTEN" stands for a reserved port, and checks the refusal.
/// Returns the one stderr line.
fn refused(args: &[&str], names: &str) -> String {
    let port = Port::reserve();
    let listen = format!("127.0.0.1:{}", port.port);
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if *a == "LISTEN" {
                listen.clone()
            } else {
                a.to_string()
            }
        })
        .collect();
    let outcome = run_to_exit(&args);
    let listening = is_listening(port.port);
    let daemons = processes_with_arg(&listen);
    kill_listeners_on(port.port);
    for &pid in &daemons {
        send_signal(pid, "KILL");
    }
    assert!(!listening, "{args:?} left something listening on {listen}");
    assert!(daemons.is_empty(), "{args:?} left processes {daemons:?} running");
    assert!(
        !outcome.status.success(),
        "{args:?} exited with {}",
        outcome.status
    );
    let lines: Vec<&str> = outcome.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: exactly one line on stderr, got:\n{}",
        outcome.stderr
    );
    assert!(
        lines[0].contains(names),
        "{args:?}: the message must name {names:?}: {}",
        lines[0]
    );
    lines[0].to_owned()
}

#[test]
fn unknown_option_is_refused() {
    if skip_on_pen("Pen prints its usage and exits 0") {
        return;
    }
    refused(&["-k", "LISTEN", "127.0.0.1:80"], "-k");
}

#[test]
fn malformed_server_spec_is_refused() {
    if skip_on_pen("Pen prints its usage and exits 0") {
        return;
    }
    refused(&["LISTEN", "127.0.0.1:80:x"], "127.0.0.1:80:x");
}

#[test]
fn server_port_out_of_range_is_refused() {
    if skip_on_pen("Pen prints its usage and exits 0") {
        return;
    }
    refused(&["LISTEN", "127.0.0.1:99999"], "127.0.0.1:99999");
}

#[test]
fn listen_port_out_of_range_is_refused() {
    if skip_on_pen("Pen prints its usage and exits 0") {
        return;
    }
    refused(&["70000", "127.0.0.1:80"], "70000");
}

#[test]
fn unresolvable_host_is_refused() {
    if skip_on_pen("Pen prints its usage and exits 0") {
        return;
    }
    refused(&["LISTEN", "nosuch.invalid:80"], "nosuch.invalid");
}

#[test]
fn no_backend_is_refused() {
    if skip_on_pen("Pen prints its usage and exits 0") {
        return;
    }
    refused(&["LISTEN"], "");
}

#[test]
fn a_line_break_inside_an_argument_still_gives_one_line() {
    if skip_on_pen("Pen prints its usage and exits 0") {
        return;
    }
    refused(&["-b", "1\n2", "LISTEN", "127.0.0.1:80"], "-b");
    refused(&["LISTEN", "127.0.0.1:80:a\nb"], "127.0.0.1:80:a\\nb");
    refused(&["-o", "blacklist 5\nbogus", "LISTEN", "127.0.0.1:80"], "-o");
}

#[test]
fn an_endless_dash_f_file_is_refused_without_reading_it_all() {
    if skip_on_pen("Pen reads -F line by line and runs on") {
        return;
    }
    let line = refused(&["-F", "/dev/zero", "LISTEN", "127.0.0.1:80"], "/dev/zero");
    assert!(line.contains("larger than"), "{line}");
}

#[test]
fn options_not_built_yet_are_refused_as_not_available() {
    if skip_on_pen("Pen has these options") {
        return;
    }
    let cases: [&[&str]; 2] = [&["-a"], &["-E", "cert"]];
    for option in cases {
        let args = [option, &["LISTEN", "127.0.0.1:80"]].concat();
        let line = refused(&args, option[0]);
        assert!(line.contains("not available"), "{option:?}: {line}");
    }
}

#[test]
fn dash_dash_help_prints_the_usage_and_exits_0() {
    let outcome = run_to_exit(&["--help".to_owned()]);
    assert!(outcome.status.success(), "--help exited with {}", outcome.status);
    let text = format!("{}{}", outcome.stdout, outcome.stderr).to_lowercase();
    assert!(text.contains("usage"), "no usage text:\n{text}");
    if !is_pen() {
        assert!(
            outcome.stdout.to_lowercase().contains("usage"),
            "help goes to stdout"
        );
        assert_eq!(outcome.stderr, "", "nothing on stderr");
    }
}

#[test]
fn dash_p_poll_is_accepted_with_a_one_line_notice() {
    let s0 = Backend::named("S0");
    let balancer = Balancer::start(&["-P"], &[s0.spec()]);
    assert_eq!(balancer.ask(2), "S0", "-P still proxies");
    if !is_pen() {
        let stderr = balancer.stderr();
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one notice line, got:\n{stderr}");
        assert!(lines[0].contains("-P"), "the notice names -P: {}", lines[0]);
    }
}
