//! Which server a new connection goes to: Pen's tracking, round robin, hash,
//! weight, limits, blacklisting, failover, stubborn and emergency servers.
//!
//! Backends reply with their name (S0, S1, ...) so the client sees where it
//! landed; clients connect from 127.0.0.x to act as different client IPs.
//! Round robin's first pick is server 1, as in Pen (its cursor starts at 0).
//! `prio` is not tested: no command-line option sets it yet.

mod common;

use std::net::{Ipv4Addr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Named backends S0..S{n-1}.
fn named(n: usize) -> Vec<Backend> {
    (0..n).map(|i| Backend::named(&format!("S{i}"))).collect()
}

fn specs(backends: &[Backend]) -> Vec<String> {
    backends.iter().map(Backend::spec).collect()
}

/// Asks once from each client octet in turn; returns the replies.
fn ask_all(balancer: &Balancer, octets: &[u8]) -> Vec<String> {
    octets.iter().map(|&o| balancer.ask(o)).collect()
}

/// Pen's hash for an IPv4 client: the address as a raw native-endian int.
fn pen_hash(octet: u8, servers: u32) -> usize {
    let ip = Ipv4Addr::new(127, 0, 0, octet);
    (u32::from_ne_bytes(ip.octets()) % servers) as usize
}

// ---------------------------------------------------------------------------
// Tracking, round robin, hash
// ---------------------------------------------------------------------------

#[test]
fn tracking_sends_a_returning_client_back_while_new_clients_round_robin() {
    let backends = named(3);
    let balancer = Balancer::start(&[], &specs(&backends));
    assert_eq!(
        ask_all(&balancer, &[2, 2, 2, 3, 4, 5, 2, 3, 4]),
        ["S1", "S1", "S1", "S2", "S0", "S1", "S1", "S2", "S0"]
    );
}

#[test]
fn dash_r_round_robins_every_connection_even_from_one_client() {
    let backends = named(3);
    let balancer = Balancer::start(&["-r"], &specs(&backends));
    assert_eq!(
        ask_all(&balancer, &[2, 2, 2, 2, 3]),
        ["S1", "S2", "S0", "S1", "S2"]
    );
}

#[test]
fn dash_h_picks_the_server_from_the_client_address() {
    let backends = named(3);
    let balancer = Balancer::start(&["-h"], &specs(&backends));
    let octets = [2, 3, 4, 5, 6, 7, 2];
    let expected: Vec<String> = octets.iter().map(|&o| format!("S{}", pen_hash(o, 3))).collect();
    assert_eq!(
        expected[..3],
        ["S0", "S1", "S2"],
        "Pen's hash, checked against Pen"
    );
    assert_eq!(ask_all(&balancer, &octets), expected);
}

/// Pen's hash with `-r`: the address XOR the port as stored in
/// `sin_port` (network byte order read as a native integer).
fn pen_hash_with_port(octet: u8, port: u16, servers: u32) -> usize {
    let ip = Ipv4Addr::new(127, 0, 0, octet);
    let sin_port = u16::from_ne_bytes(port.to_be_bytes());
    ((u32::from_ne_bytes(ip.octets()) ^ u32::from(sin_port)) % servers) as usize
}

#[test]
fn dash_h_with_dash_r_mixes_in_the_client_port_as_pen_does() {
    let backends = named(3);
    let balancer = Balancer::start(&["-h", "-r"], &specs(&backends));
    // Without tracking every connection is hashed afresh; Debian's pen
    // 0.34.1 XORs the client's port into the hash then (checked by
    // experiment: 12 of 12 connections from one address matched).
    for _ in 0..12 {
        let mut stream = balancer.connect_from(3);
        let port = stream.local_addr().unwrap().port();
        let expected = format!("S{}", pen_hash_with_port(3, port, 3));
        assert_eq!(read_line(&mut stream).unwrap(), expected, "client port {port}");
    }
}

/// Pen's client table time is in whole seconds, so LRU ties are common.
/// Runs `octets` through a fresh balancer within one second (see
/// [`common::within_one_second`]) and returns the replies.
fn replies_within_one_second(opts: &[&str], servers: &[String], octets: &[u8]) -> Vec<String> {
    within_one_second(format!("{octets:?}"), || {
        let balancer = Balancer::start(opts, servers);
        ask_all(&balancer, octets)
    })
}

#[test]
fn dash_c_evicts_the_least_recently_used_client_ties_to_the_lowest_slot() {
    let backends = named(3);
    // Slots fill with .2 .3 .4; then .5, .6 and .2 each evict slot 0 (all
    // equally old, lowest slot wins) and go round robin; .3 is still known.
    assert_eq!(
        replies_within_one_second(&["-c", "3"], &specs(&backends), &[2, 3, 4, 5, 6, 2, 3]),
        ["S1", "S2", "S0", "S1", "S2", "S0", "S2"]
    );
}

#[test]
fn dash_t_frees_expired_slots_but_does_not_forget_affinity() {
    let backends = named(3);
    let keeps = Balancer::start(&["-c", "2", "-T", "1"], &specs(&backends));
    let frees = Balancer::start(&["-c", "2", "-T", "1"], &specs(&backends));
    assert_eq!(keeps.ask(2), "S1");
    assert_eq!(frees.ask(2), "S1");
    // Time under test: let the entries of .2 expire (last + 1 < now, in
    // whole seconds).
    thread::sleep(Duration::from_millis(2100));
    // An expired entry still matches its client...
    assert_eq!(keeps.ask(2), "S1", "an expired client keeps its server");
    // ...until a new client takes the freed slot: .3 gets slot 0 (the
    // first free one, not the empty slot 1), so .2 is forgotten.
    assert_eq!(frees.ask(3), "S2");
    assert_eq!(
        frees.ask(2),
        "S0",
        "after its slot was reused, .2 is a new client"
    );
}

// ---------------------------------------------------------------------------
// Weight and limits
// ---------------------------------------------------------------------------

#[test]
fn dash_w_is_least_connections_scaled_by_weight_and_weight_0_is_never_first() {
    let s = named(3);
    // h:p:max:hard:weight: S0 weight 1, S1 weight 2, S2 weight 0.
    let servers = [
        format!("{}:0:0:1", s[0].spec()),
        format!("{}:0:0:2", s[1].spec()),
        format!("{}:0:0:0", s[2].spec()),
    ];
    let balancer = Balancer::start(&["-W"], &servers);
    // Load = 256 * connections / weight, lowest wins, ties to the lowest
    // index. Held connections: (S0,S1) loads 0,0 -> S0; 256,0 -> S1;
    // 256,128 -> S1; 256,256 -> S0; 512,256 -> S1; 512,384 -> S1; 512,512 -> S0.
    let mut held: Vec<TcpStream> = Vec::new();
    let mut got = Vec::new();
    for octet in 2..9 {
        let (name, stream) = balancer.hold(octet);
        got.push(name);
        held.push(stream);
    }
    assert_eq!(got, ["S0", "S1", "S1", "S0", "S1", "S1", "S0"]);
    assert_eq!(s[2].accepted(), 0, "weight 0 is never the first choice");
}

#[test]
fn soft_max_sends_new_clients_elsewhere_and_hard_lets_a_tracked_client_exceed_it() {
    let s = named(3);
    // S0 and S1: max 1, hard 2. S2: no limit.
    let servers = [
        format!("{}:1:2", s[0].spec()),
        format!("{}:1:2", s[1].spec()),
        s[2].spec(),
    ];
    let balancer = Balancer::start(&[], &servers);
    let (first, _held_s1) = balancer.hold(2);
    assert_eq!(first, "S1");
    assert_eq!(balancer.ask(3), "S2");
    let (third, _held_s0) = balancer.hold(4);
    assert_eq!(third, "S0");
    // Round robin picks S1 for the new client .5, but S1 is at its max.
    assert_eq!(balancer.ask(5), "S2", "a new client goes past a full server");
    // .2 is tracked to S1: it may go up to hard (2)...
    let (again, _held_s1_again) = balancer.hold(2);
    assert_eq!(again, "S1", "a tracked client may exceed max up to hard");
    // ...but not beyond.
    assert_eq!(balancer.ask(2), "S2", "hard is a limit for tracked clients too");
}

#[test]
fn connects_in_progress_count_against_max() {
    if skip_on_pen("Pen counts a connection against max only once its connect completes") {
        return;
    }
    let s0 = Backend::named("S0");
    let silent = Silent::start();
    // With 2 servers Pen's hash puts every 127.0.0.x client on server 1.
    assert_eq!((pen_hash(2, 2), pen_hash(3, 2)), (1, 1));
    let servers = [s0.spec(), format!("{}:1", silent.spec())];
    let balancer = Balancer::start(&["-h", "-t", "4"], &servers);
    let mut pending = balancer.connect_from(2);
    wait_until("the balancer's connect to the silent server", || {
        connect_in_progress_to(silent.addr)
    });
    // The silent server (max 1) has one connect in flight: it is full.
    assert_eq!(
        balancer.ask(3),
        "S0",
        "a second client must not wait on a full server"
    );
    assert!(
        nothing_received_yet(&pending),
        "the first client is still connecting"
    );
    // Once its connect times out, the first client fails over as well.
    assert_eq!(read_line(&mut pending).unwrap(), "S0");
}

// ---------------------------------------------------------------------------
// Failures: failover, blacklist, stubborn, emergency
// ---------------------------------------------------------------------------

/// How a server is down.
#[derive(Clone, Copy, Debug)]
enum Down {
    /// Nothing listens: the connect is refused at once.
    Refused,
    /// SYNs go unanswered: the connect times out after `-t`.
    Silent,
}

/// An address for a server that is down in the given way; keep the guard
/// alive while the address is used, and drop it to free the address.
fn down_server(how: Down) -> (std::net::SocketAddr, Box<dyn std::any::Any>) {
    match how {
        Down::Refused => {
            let (addr, port) = refused_address();
            (addr, Box::new(port))
        }
        Down::Silent => {
            let silent = Silent::start();
            (silent.addr, Box::new(silent))
        }
    }
}

/// Starts a balancer on [S0, down, S2] with `opts` (and `-t 1`), lets
/// client .2 hit the down server (round robin's first pick), which must fail
/// it over to S2, waits until the balancer says it blacklisted the server,
/// then brings server 1 up as "S1". Returns the balancer, the backends,
/// a moment by which the server was blacklisted, and how long client .2
/// waited for its answer.
fn blacklist_server_1(how: Down, opts: &[&str]) -> (Balancer, Vec<Backend>, Instant, Duration) {
    let (s0, s2) = (Backend::named("S0"), Backend::named("S2"));
    let (down, guard) = down_server(how);
    let opts = [opts, &["-t", "1"]].concat();
    let balancer = Balancer::start(&opts, &[s0.spec(), spec(down), s2.spec()]);
    let asked = Instant::now();
    assert_eq!(balancer.ask(2), "S2", "failover from the {how:?} server 1");
    let failed_at = Instant::now();
    balancer.wait_for_stderr("blacklisting");
    // The control thread blacklists a moment after the failover; by now it has.
    let blacklisted_by = Instant::now();
    drop(guard);
    let s1 = Backend::named_at("S1", down);
    (balancer, vec![s0, s1, s2], blacklisted_by, failed_at - asked)
}

#[test]
fn refused_connect_fails_over_to_the_next_server_and_blacklists_it() {
    if skip_on_pen("Pen closes the client when the connect is refused, and does not blacklist") {
        return;
    }
    let (balancer, backends, _, _) = blacklist_server_1(Down::Refused, &[]);
    // Six new clients would reach server 1 twice if it were not blacklisted
    // (default -b 30).
    let replies = ask_all(&balancer, &[3, 4, 5, 6, 7, 8]);
    assert_eq!(replies, ["S2", "S0", "S2", "S0", "S2", "S0"]);
    assert_eq!(backends[1].accepted(), 0);
    // The failed-over client was tracked to S2.
    assert_eq!(balancer.ask(2), "S2");
}

#[test]
fn silent_server_times_out_after_dash_t_then_fails_over_and_is_blacklisted() {
    let (balancer, backends, _, waited) = blacklist_server_1(Down::Silent, &[]);
    assert!(
        waited >= Duration::from_millis(900),
        "gave up after only {waited:?}: not a timeout"
    );
    // Pen's clock has whole seconds and its loop wakes once a second, so
    // its -t 1 takes 1 to 3 s; ringpen's timer is exact.
    if !is_pen() {
        assert!(
            waited < Duration::from_millis(2500),
            "-t 1 took {waited:?} (the default is 3 s)"
        );
    }
    assert_eq!(ask_all(&balancer, &[3, 4, 5, 6]), ["S2", "S0", "S2", "S0"]);
    assert_eq!(backends[1].accepted(), 0, "server 1 stays blacklisted (-b 30)");
}

#[test]
fn dash_b_blacklisting_expires_and_lets_the_server_back_in() {
    let (balancer, backends, blacklisted_by, _) = blacklist_server_1(Down::Silent, &["-b", "1"]);
    // Time under test: wait out -b 1 (whole seconds, so up to 1 s after
    // the blacklisting, which happened before `blacklisted_by`).
    thread::sleep(Duration::from_millis(1600).saturating_sub(blacklisted_by.elapsed()));
    let replies = ask_all(&balancer, &[3, 4, 5]);
    assert!(
        replies.iter().any(|r| r == "S1"),
        "server 1 is back after -b 1 and round robin covers all 3: {replies:?}"
    );
    assert!(!replies.iter().any(|r| r == CLOSED), "{replies:?}");
    assert_eq!(backends[1].accepted(), 1);
}

#[test]
fn dash_s_stubborn_closes_the_client_when_its_first_choice_fails() {
    let kinds: &[Down] = if is_pen() {
        // Pen closes on a refused connect even without -s.
        &[Down::Silent]
    } else {
        &[Down::Silent, Down::Refused]
    };
    for &how in kinds {
        let (s0, s2) = (Backend::named("S0"), Backend::named("S2"));
        let (down, _guard) = down_server(how);
        let balancer = Balancer::start(&["-s", "-t", "1"], &[s0.spec(), spec(down), s2.spec()]);
        assert_eq!(
            balancer.ask(2),
            CLOSED,
            "stubborn: no failover from the {how:?} server"
        );
        assert_eq!(s0.accepted() + s2.accepted(), 0, "{how:?}");
        // The round-robin cursor has moved past server 1.
        assert_eq!(balancer.ask(3), "S2", "{how:?}");
    }
}

#[test]
fn dash_e_emergency_server_takes_clients_when_every_server_refuses() {
    if skip_on_pen("Pen closes the client when the connect is refused") {
        return;
    }
    let emergency = Backend::named("E");
    let (dead0, _p0) = refused_address();
    let (dead1, _p1) = refused_address();
    let balancer = Balancer::start(&["-e", &emergency.spec()], &[spec(dead0), spec(dead1)]);
    assert_eq!(ask_all(&balancer, &[2, 3, 2]), ["E", "E", "E"]);
}

#[test]
fn dash_e_emergency_server_takes_clients_when_every_server_is_silent() {
    let emergency = Backend::named("E");
    let (q0, q1) = (Silent::start(), Silent::start());
    let balancer = Balancer::start(&["-t", "1", "-e", &emergency.spec()], &[q0.spec(), q1.spec()]);
    assert_eq!(balancer.ask(2), "E", "after both connects timed out");
    // Both are blacklisted now: straight to the emergency server.
    assert_eq!(balancer.ask(3), "E");
    assert_eq!(emergency.accepted(), 2);
}

#[test]
fn the_emergency_server_is_not_used_while_a_server_is_up() {
    let s0 = Backend::named("S0");
    let emergency = Backend::named("E");
    let silent = Silent::start();
    let balancer = Balancer::start(&["-t", "1", "-e", &emergency.spec()], &[s0.spec(), silent.spec()]);
    // Round robin's first pick is the silent server 1: fail over to S0.
    assert_eq!(ask_all(&balancer, &[2, 3, 4]), ["S0", "S0", "S0"]);
    assert_eq!(emergency.accepted(), 0);
}
