//! The data path: bytes arrive intact and in order, in both directions,
//! through half-closes and many concurrent connections, over IPv4 and IPv6,
//! and `-H` adds exactly Pen's two headers to HTTP requests.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::sync::{Arc, Barrier};
use std::thread;

use common::*;

const MIB: u64 = 1024 * 1024;

#[test]
fn sixteen_mib_each_way_arrive_intact_over_one_connection() {
    let (up_seed, down_seed, len) = (11, 12, 16 * MIB);
    let (backend, checked) = Backend::bulk(up_seed, len, down_seed, len);
    let balancer = Balancer::start(&[], &[backend.spec()]);

    let mut stream = balancer.connect_from(2);
    stream.set_read_timeout(Some(BULK_WAIT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || write_data(&mut writer, up_seed, len).expect("client send"));
    let received = check_data(&mut stream, down_seed, len);
    sender.join().unwrap();
    assert_eq!(received, Ok(()), "backend -> client stream");
    let at_backend = checked
        .recv_timeout(BULK_WAIT)
        .expect("the backend never finished reading the client's stream");
    assert_eq!(at_backend, Ok(()), "client -> backend stream");
}

#[test]
fn client_half_close_after_sending_still_gets_every_echoed_byte() {
    if skip_on_pen("Pen drops data still buffered when the backend closes after the client half-closed") {
        return;
    }
    let backend = Backend::echo();
    let balancer = Balancer::start(&[], &[backend.spec()]);
    let len = 4 * MIB;

    let mut stream = balancer.connect_from(2);
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        write_data(&mut writer, 21, len).expect("client send");
        // Half-close: no more data from us, but keep reading the echo.
        writer.shutdown(Shutdown::Write).expect("client half-close");
    });
    let echoed = check_data_then_eof(&mut stream, 21, len);
    sender.join().unwrap();
    assert_eq!(echoed, Ok(()));
}

#[test]
fn backend_closing_right_after_the_client_half_closed_loses_no_byte() {
    if skip_on_pen("Pen drops data still buffered when the backend closes after the client half-closed") {
        return;
    }
    // The backend answers only after the client's EOF, with more than the
    // socket buffers hold, and closes as soon as the last byte is written.
    let len = 8 * MIB;
    let backend = Backend::reply_after_eof(31, len);
    let balancer = Balancer::start(&[], &[backend.spec()]);

    let mut stream = balancer.connect_from(2);
    stream.write_all(b"request").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(check_data_then_eof(&mut stream, 31, len), Ok(()));
}

/// With `tcp_fastclose both` an EOF from either side closes both. When
/// both EOFs come at nearly the same moment (the client half-closes at
/// once, the backend answers and closes), the second one arrives while the
/// first is still tearing the connection down: every connection must
/// still end and give its descriptors back.
#[test]
fn fast_close_with_both_sides_ending_at_once_frees_every_connection() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = Backend::start(
        "bye",
        listener,
        Arc::new(|mut stream: std::net::TcpStream| {
            let _ = stream.write_all(b"bye\n");
        }),
    );
    let lb = Balancer::start(&["-o", "tcp_fastclose both"], &[backend.spec()]);
    let baseline = settled_fd_count(lb.pid());
    for _ in 0..200 {
        let mut client = std::net::TcpStream::connect(lb.addr).expect("connect to the balancer");
        client.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest);
    }
    wait_until(format!("descriptors back to {baseline}"), || {
        fd_count(lb.pid()) <= baseline
    });
}

/// `tcp_fastclose` closes both sides at an EOF, but only after what came
/// before the EOF was passed on, as in Pen: a backend that answers and
/// closes at once, and a client that sends and half-closes at once.
#[test]
fn fast_close_still_delivers_what_came_before_the_eof() {
    const ANSWER: usize = 2000;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let answers_and_closes = Backend::start(
        "answer",
        listener,
        Arc::new(|mut stream: std::net::TcpStream| {
            let _ = stream.write_all(&[b'a'; ANSWER]);
        }),
    );
    let lb = Balancer::start(&["-o", "tcp_fastclose up"], &[answers_and_closes.spec()]);
    for round in 0..100 {
        let mut client = std::net::TcpStream::connect(lb.addr).expect("connect to the balancer");
        client.set_read_timeout(Some(WAIT)).unwrap();
        let mut answer = Vec::new();
        let _ = client.read_to_end(&mut answer);
        assert_eq!(
            answer.len(),
            ANSWER,
            "round {round}: the answer before the backend's EOF"
        );
    }
    drop(lb);

    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = received.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let counts = Backend::start(
        "count",
        listener,
        Arc::new(move |mut stream: std::net::TcpStream| {
            let mut request = Vec::new();
            let _ = stream.read_to_end(&mut request);
            counted.fetch_add(request.len(), std::sync::atomic::Ordering::SeqCst);
        }),
    );
    let lb = Balancer::start(&["-o", "tcp_fastclose down"], &[counts.spec()]);
    for _ in 0..100 {
        let mut client = std::net::TcpStream::connect(lb.addr).expect("connect to the balancer");
        client.set_read_timeout(Some(WAIT)).unwrap();
        client.write_all(b"request").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest);
    }
    wait_until("every request at the backend", || {
        received.load(std::sync::atomic::Ordering::SeqCst) == 100 * b"request".len()
    });
}

#[test]
fn two_hundred_concurrent_clients_each_get_their_own_echo() {
    const CLIENTS: usize = 200;
    let backend = Backend::echo();
    let balancer = Arc::new(Balancer::start(&[], &[backend.spec()]));
    // Everyone connects first, then everyone talks at once.
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (balancer, barrier) = (balancer.clone(), barrier.clone());
            thread::spawn(move || {
                let mut stream = connect(balancer.addr);
                barrier.wait();
                let mut message = format!("client {i}:").into_bytes();
                message.extend(Data::bytes(1000 + i as u64, 3000));
                stream.write_all(&message).unwrap();
                let mut echoed = vec![0u8; message.len()];
                stream
                    .read_exact(&mut echoed)
                    .unwrap_or_else(|e| panic!("client {i}: no full echo: {e}"));
                assert!(echoed == message, "client {i} got someone else's bytes");
                stream.shutdown(Shutdown::Write).unwrap();
                assert_eq!(read_to_end(&mut stream), b"", "client {i}: bytes after the echo");
            })
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        client.join().unwrap_or_else(|_| panic!("client {i} failed"));
    }
    assert_eq!(backend.accepted(), CLIENTS, "one backend connection per client");
}

/// Echoes, unless the first line is "flood": then writes until the peer
/// stops reading (and the write times out) or goes away.
fn flood_or_echo() -> Backend {
    Backend::start(
        "flood-or-echo",
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
        Arc::new(|mut stream: std::net::TcpStream| {
            let mut first = [0u8; 6];
            if stream.read_exact(&mut first).is_err() {
                return;
            }
            if &first == b"flood\n" {
                let chunk = vec![0u8; 64 * 1024];
                while stream.write_all(&chunk).is_ok() {}
                return;
            }
            let mut buf = first.to_vec();
            loop {
                if stream.write_all(&buf).is_err() {
                    return;
                }
                buf.resize(4096, 0);
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.truncate(n),
                }
            }
        }),
    )
}

#[test]
fn clients_that_never_read_do_not_stall_the_others() {
    // Each client that does not read pins at least two buffers of the
    // worker's ring of 256 (one being sent, the next one received): the ring
    // runs dry and the last ones receive into spares.
    const FLOODED: usize = 140;
    let backend = flood_or_echo();
    let balancer = Balancer::start(&["--workers", "1"], &[backend.spec()]);
    let flooded: Vec<_> = (0..FLOODED)
        .map(|_| {
            let mut stream = balancer.connect_from(2);
            stream.write_all(b"flood\n").expect("ask for a flood");
            stream
        })
        .collect();
    let flooded_addrs: Vec<SocketAddr> = flooded.iter().map(|s| s.local_addr().unwrap()).collect();
    // Stuck end to end: every client has unread bytes, and every flood
    // writer at the backend has bytes the balancer no longer takes.
    wait_until_for(BULK_WAIT, "every flood to back up to its backend", || {
        let sockets = tcp_sockets();
        let clients_full = flooded_addrs.iter().all(|a| {
            sockets
                .iter()
                .any(|s| s.addr == *a && s.state == "01" && s.rx_queue > 0)
        });
        let writers_blocked = sockets
            .iter()
            .filter(|s| s.addr == backend.addr && s.state == "01" && s.tx_queue > 0)
            .count();
        clients_full && writers_blocked >= FLOODED
    });

    let mut stream = balancer.connect_from(3);
    stream.set_read_timeout(Some(WAIT)).unwrap();
    for i in 0..20u8 {
        let message = [b'a' + i; 6];
        stream.write_all(&message).unwrap();
        let mut echoed = [0u8; 6];
        stream
            .read_exact(&mut echoed)
            .unwrap_or_else(|e| panic!("echo {i} while {FLOODED} clients do not read: {e}"));
        assert_eq!(echoed, message);
    }
    drop(flooded);
}

fn ping(from: IpAddr, to: SocketAddr) {
    let message = b"ping over another family";
    let mut stream = connect_from(from, to);
    stream.write_all(message).unwrap();
    let mut echoed = [0u8; 24];
    stream.read_exact(&mut echoed).expect("the echo");
    assert_eq!(&echoed, message);
}

#[test]
fn ipv6_listener_forwards_to_an_ipv4_backend() {
    if skip_without_ipv6() {
        return;
    }
    let backend = Backend::echo_on(Ipv4Addr::LOCALHOST.into());
    let balancer =
        Balancer::launch(Launch::new(&[], &[backend.spec()]).listen_on(Ipv6Addr::LOCALHOST.into()));
    ping(Ipv6Addr::LOCALHOST.into(), balancer.addr);
}

#[test]
fn ipv4_listener_forwards_to_an_ipv6_backend() {
    if skip_without_ipv6() {
        return;
    }
    let backend = Backend::echo_on(Ipv6Addr::LOCALHOST.into());
    assert!(backend.spec().starts_with("[::1]:"));
    let balancer = Balancer::start(&[], &[backend.spec()]);
    ping(client_ip(2), balancer.addr);
}

/// Sends `request` in one write from 127.0.0.`octet` through a balancer
/// with `-H` and returns what the backend received.
fn through_dash_h(octet: u8, request: &[u8]) -> Vec<u8> {
    let backend = Backend::recorder();
    let balancer = Balancer::start(&["-H"], &[backend.spec()]);
    let mut stream = balancer.connect_from(octet);
    stream.write_all(request).unwrap();
    read_to_end(&mut stream)
}

#[test]
fn dash_h_adds_forwarded_proto_and_for_before_the_blank_line_of_a_get() {
    let got = through_dash_h(9, b"GET /x HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n");
    assert_eq!(
        String::from_utf8_lossy(&got),
        "GET /x HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\
         X-Forwarded-Proto: http\r\nX-Forwarded-For: 127.0.0.9\r\n\r\n"
    );
}

#[test]
fn dash_h_leaves_non_http_data_untouched() {
    let data = b"HELO mail.example\r\nX: y\r\n\r\n";
    let got = through_dash_h(10, data);
    assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(data));
}

/// Out of descriptors, an accepted client whose backend socket cannot be
/// made waits for descriptors to come back instead of being dropped.
#[test]
fn out_of_descriptors_a_client_waits_for_a_socket_instead_of_being_dropped() {
    if skip_on_pen("Pen drops such a client") {
        return;
    }
    let echo = Backend::echo();
    let lb = Balancer::start(&[], &[echo.spec()]);
    let base = settled_fd_count(lb.pid());
    let echoed = |stream: &mut std::net::TcpStream, text: &[u8]| {
        stream.write_all(text).unwrap();
        let mut back = vec![0u8; text.len()];
        stream.read_exact(&mut back).map(|_| back)
    };
    let mut held: Vec<std::net::TcpStream> = (2..5).map(|octet| lb.connect_from(octet)).collect();
    for stream in &mut held {
        assert_eq!(echoed(stream, b"held").expect("an echo"), b"held");
    }
    wait_until("two descriptors per held connection", || {
        fd_count(lb.pid()) == base + 6
    });
    // Room for exactly one more descriptor: the next client's accept takes
    // it, and its backend socket finds none. The limit bounds descriptor
    // numbers, and the table has gaps: the lowest free number is the one.
    let used: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{}/fd", lb.pid()))
        .expect("the balancer's descriptors")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !used.contains(n)).expect("a free number");
    let limit = format!("--nofile={0}:{0}", lowest_free + 1);
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &lb.pid().to_string(), &limit])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit {limit}");
    let mut late = lb.connect_from(9);
    late.write_all(b"late").unwrap();
    lb.wait_for_stderr("Too many open files");
    // A connection closes: its descriptors serve the one that waited.
    drop(held.pop());
    let mut back = [0u8; 4];
    late.read_exact(&mut back).expect("the late client's echo");
    assert_eq!(&back, b"late");
}
