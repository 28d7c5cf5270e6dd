//! A Prometheus endpoint (an addition; Pen has none): the text exposition
//! format 0.0.4 and a minimal HTTP responder for `GET /metrics`. Pure: the
//! caller gathers a [`MetricsSnapshot`] and does the socket I/O.
//!
//! `ringpen_backend_check_latency_seconds` is **omitted** for a backend
//! without a measurement (health unchecked, or no check finished yet) rather
//! than exported as NaN: an absent series is what PromQL treats as "no
//! data", while NaN would poison aggregations such as `avg` or `max`.

use std::fmt::Write;
use std::time::Duration;

use crate::control::state::Health;

/// One backend's values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BackendMetrics {
    /// The `server` label: the server index ("0", "1", ...); callers may
    /// use "emergency" or "abuse" for Pen's hidden slots.
    pub server: String,
    /// The `address` label, "host:port" (or a Unix socket path).
    pub address: String,
    /// Has an address to connect to (a slot `server N` added without one
    /// has none).
    pub connectable: bool,
    /// Blacklisted after a connect failure (or by `server N blacklist`).
    pub blacklisted: bool,
    pub health: Health,
    pub active_connections: u64,
    pub connections_total: u64,
    pub sent_bytes_total: u64,
    pub received_bytes_total: u64,
    pub connect_failures_total: u64,
    /// Duration of the last finished health check; None = no measurement.
    pub check_latency: Option<Duration>,
}

impl BackendMetrics {
    /// Whether the backend takes new connections now.
    pub fn up(&self) -> bool {
        self.connectable && !self.blacklisted && self.health.accepts_new()
    }
}

/// Everything `/metrics` shows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsSnapshot {
    pub backends: Vec<BackendMetrics>,
    /// Client connections open now.
    pub active_connections: u64,
    pub accepted_connections_total: u64,
    /// Clients refused by the client ACL.
    pub refused_acl_total: u64,
    /// Clients refused because no server could take them.
    pub refused_limit_total: u64,
}

/// The Content-Type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const HEALTH_STATES: [(Health, &str); 4] = [
    (Health::Unchecked, "unchecked"),
    (Health::Up, "up"),
    (Health::Drain, "drain"),
    (Health::Down, "down"),
];

/// A label value escaped per the exposition format: `\` `"` and newline.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn backend_labels(b: &BackendMetrics) -> String {
    format!(
        "server=\"{}\",address=\"{}\"",
        escape_label_value(&b.server),
        escape_label_value(&b.address)
    )
}

/// The exposition text: every family with `# HELP` and `# TYPE`, then its
/// samples, one series per backend in the given order.
pub fn render(m: &MetricsSnapshot) -> String {
    let mut out = String::with_capacity(2048 + 1024 * m.backends.len());
    let labels: Vec<String> = m.backends.iter().map(backend_labels).collect();
    let each = |out: &mut String, name: &str, value: &dyn Fn(&BackendMetrics) -> u64| {
        for (b, l) in m.backends.iter().zip(&labels) {
            let _ = writeln!(out, "{name}{{{l}}} {}", value(b));
        }
    };

    family(
        &mut out,
        "ringpen_backend_up",
        "gauge",
        "Whether the backend takes new connections (1: not blacklisted and health allows).",
    );
    each(&mut out, "ringpen_backend_up", &|b| u64::from(b.up()));

    family(
        &mut out,
        "ringpen_backend_health",
        "gauge",
        "Health check state of the backend, one series per state; 1 marks the current one.",
    );
    for (b, l) in m.backends.iter().zip(&labels) {
        for (state, name) in HEALTH_STATES {
            let _ = writeln!(
                out,
                "ringpen_backend_health{{{l},state=\"{name}\"}} {}",
                u8::from(b.health == state)
            );
        }
    }

    family(
        &mut out,
        "ringpen_backend_active_connections",
        "gauge",
        "Connections to the backend open now, connects in progress included.",
    );
    each(&mut out, "ringpen_backend_active_connections", &|b| {
        b.active_connections
    });

    family(
        &mut out,
        "ringpen_backend_connections_total",
        "counter",
        "Completed connects to the backend.",
    );
    each(&mut out, "ringpen_backend_connections_total", &|b| {
        b.connections_total
    });

    family(
        &mut out,
        "ringpen_backend_sent_bytes_total",
        "counter",
        "Bytes sent to the backend.",
    );
    each(&mut out, "ringpen_backend_sent_bytes_total", &|b| {
        b.sent_bytes_total
    });

    family(
        &mut out,
        "ringpen_backend_received_bytes_total",
        "counter",
        "Bytes received from the backend.",
    );
    each(&mut out, "ringpen_backend_received_bytes_total", &|b| {
        b.received_bytes_total
    });

    family(
        &mut out,
        "ringpen_backend_connect_failures_total",
        "counter",
        "Failed connects to the backend (refused, unreachable or timed out).",
    );
    each(&mut out, "ringpen_backend_connect_failures_total", &|b| {
        b.connect_failures_total
    });

    family(
        &mut out,
        "ringpen_backend_check_latency_seconds",
        "gauge",
        "Duration of the last health check; absent while the backend has no measurement.",
    );
    for (b, l) in m.backends.iter().zip(&labels) {
        if let Some(latency) = b.check_latency {
            let _ = writeln!(
                out,
                "ringpen_backend_check_latency_seconds{{{l}}} {}",
                latency.as_secs_f64()
            );
        }
    }

    family(
        &mut out,
        "ringpen_active_connections",
        "gauge",
        "Client connections open now.",
    );
    let _ = writeln!(out, "ringpen_active_connections {}", m.active_connections);

    family(
        &mut out,
        "ringpen_accepted_connections_total",
        "counter",
        "Client connections accepted.",
    );
    let _ = writeln!(
        out,
        "ringpen_accepted_connections_total {}",
        m.accepted_connections_total
    );

    family(
        &mut out,
        "ringpen_refused_connections_total",
        "counter",
        "Client connections refused, by reason (acl: client ACL; limit: no server could take them).",
    );
    let _ = writeln!(
        out,
        "ringpen_refused_connections_total{{reason=\"acl\"}} {}",
        m.refused_acl_total
    );
    let _ = writeln!(
        out,
        "ringpen_refused_connections_total{{reason=\"limit\"}} {}",
        m.refused_limit_total
    );
    out
}

/// Whether `b` is an HTTP token character (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn reply(version: &str, status: &str, extra: &str, content_type: &str, body: &str) -> Vec<u8> {
    let mut out = format!(
        "{version} {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

fn error(version: &str, status: &str, extra: &str) -> Vec<u8> {
    reply(
        version,
        status,
        extra,
        "text/plain; charset=utf-8",
        &format!("{status}\n"),
    )
}

/// Parses the request line and headers; None on anything malformed.
/// Returns (method, path without query, version).
fn parse_head(head: &[u8]) -> Option<(&str, &str, &'static str)> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next()?;
    let mut parts = request_line.split(|&b| b == b' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return None;
    }
    let version = match version {
        b"HTTP/1.0" => "HTTP/1.0",
        b"HTTP/1.1" => "HTTP/1.1",
        _ => return None,
    };
    if target.first() != Some(&b'/') || !target.iter().all(|&b| b.is_ascii_graphic()) {
        return None;
    }
    for line in lines {
        if line.is_empty() {
            break; // the end of the head; anything after is a body
        }
        let colon = line.iter().position(|&b| b == b':')?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return None;
        }
        if line[colon + 1..]
            .iter()
            .any(|&b| b.is_ascii_control() && b != b'\t')
        {
            return None;
        }
    }
    // All checked bytes are ASCII, so these cannot fail.
    let method = std::str::from_utf8(method).ok()?;
    let target = std::str::from_utf8(target).ok()?;
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Some((method, path, version))
}

/// The whole HTTP response to one request head (the bytes up to the blank
/// line; a missing blank line is tolerated). `GET /metrics` (any query
/// string ignored) → 200 with `body()`; another path → 404; another method
/// on `/metrics` → 405; a malformed head → 400. `body` is called only for
/// the 200. Every response says `Connection: close`.
pub fn respond(request_head: &[u8], body: impl FnOnce() -> String) -> Vec<u8> {
    let Some((method, path, version)) = parse_head(request_head) else {
        return error("HTTP/1.1", "400 Bad Request", "");
    };
    if path != "/metrics" {
        return error(version, "404 Not Found", "");
    }
    if method != "GET" {
        return error(version, "405 Method Not Allowed", "Allow: GET\r\n");
    }
    reply(version, "200 OK", "", CONTENT_TYPE, &body())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MetricsSnapshot {
        MetricsSnapshot {
            backends: vec![
                BackendMetrics {
                    server: "0".into(),
                    address: "10.0.0.1:3306".into(),
                    connectable: true,
                    blacklisted: false,
                    health: Health::Up,
                    active_connections: 3,
                    connections_total: 120,
                    sent_bytes_total: 4096,
                    received_bytes_total: 65536,
                    connect_failures_total: 2,
                    check_latency: Some(Duration::from_micros(1500)),
                },
                BackendMetrics {
                    server: "1".into(),
                    address: "db\"2\\\n:3306".into(),
                    connectable: true,
                    blacklisted: true,
                    health: Health::Unchecked,
                    active_connections: 0,
                    connections_total: 7,
                    sent_bytes_total: 0,
                    received_bytes_total: 0,
                    connect_failures_total: 9,
                    check_latency: None,
                },
            ],
            active_connections: 3,
            accepted_connections_total: 130,
            refused_acl_total: 4,
            refused_limit_total: 5,
        }
    }

    const SAMPLE: &str = r#"# HELP ringpen_backend_up Whether the backend takes new connections (1: not blacklisted and health allows).
# TYPE ringpen_backend_up gauge
ringpen_backend_up{server="0",address="10.0.0.1:3306"} 1
ringpen_backend_up{server="1",address="db\"2\\\n:3306"} 0
# HELP ringpen_backend_health Health check state of the backend, one series per state; 1 marks the current one.
# TYPE ringpen_backend_health gauge
ringpen_backend_health{server="0",address="10.0.0.1:3306",state="unchecked"} 0
ringpen_backend_health{server="0",address="10.0.0.1:3306",state="up"} 1
ringpen_backend_health{server="0",address="10.0.0.1:3306",state="drain"} 0
ringpen_backend_health{server="0",address="10.0.0.1:3306",state="down"} 0
ringpen_backend_health{server="1",address="db\"2\\\n:3306",state="unchecked"} 1
ringpen_backend_health{server="1",address="db\"2\\\n:3306",state="up"} 0
ringpen_backend_health{server="1",address="db\"2\\\n:3306",state="drain"} 0
ringpen_backend_health{server="1",address="db\"2\\\n:3306",state="down"} 0
# HELP ringpen_backend_active_connections Connections to the backend open now, connects in progress included.
# TYPE ringpen_backend_active_connections gauge
ringpen_backend_active_connections{server="0",address="10.0.0.1:3306"} 3
ringpen_backend_active_connections{server="1",address="db\"2\\\n:3306"} 0
# HELP ringpen_backend_connections_total Completed connects to the backend.
# TYPE ringpen_backend_connections_total counter
ringpen_backend_connections_total{server="0",address="10.0.0.1:3306"} 120
ringpen_backend_connections_total{server="1",address="db\"2\\\n:3306"} 7
# HELP ringpen_backend_sent_bytes_total Bytes sent to the backend.
# TYPE ringpen_backend_sent_bytes_total counter
ringpen_backend_sent_bytes_total{server="0",address="10.0.0.1:3306"} 4096
ringpen_backend_sent_bytes_total{server="1",address="db\"2\\\n:3306"} 0
# HELP ringpen_backend_received_bytes_total Bytes received from the backend.
# TYPE ringpen_backend_received_bytes_total counter
ringpen_backend_received_bytes_total{server="0",address="10.0.0.1:3306"} 65536
ringpen_backend_received_bytes_total{server="1",address="db\"2\\\n:3306"} 0
# HELP ringpen_backend_connect_failures_total Failed connects to the backend (refused, unreachable or timed out).
# TYPE ringpen_backend_connect_failures_total counter
ringpen_backend_connect_failures_total{server="0",address="10.0.0.1:3306"} 2
ringpen_backend_connect_failures_total{server="1",address="db\"2\\\n:3306"} 9
# HELP ringpen_backend_check_latency_seconds Duration of the last health check; absent while the backend has no measurement.
# TYPE ringpen_backend_check_latency_seconds gauge
ringpen_backend_check_latency_seconds{server="0",address="10.0.0.1:3306"} 0.0015
# HELP ringpen_active_connections Client connections open now.
# TYPE ringpen_active_connections gauge
ringpen_active_connections 3
# HELP ringpen_accepted_connections_total Client connections accepted.
# TYPE ringpen_accepted_connections_total counter
ringpen_accepted_connections_total 130
# HELP ringpen_refused_connections_total Client connections refused, by reason (acl: client ACL; limit: no server could take them).
# TYPE ringpen_refused_connections_total counter
ringpen_refused_connections_total{reason="acl"} 4
ringpen_refused_connections_total{reason="limit"} 5
"#;

    #[test]
    fn renders_the_sample() {
        assert_eq!(render(&sample()), SAMPLE);
    }

    #[test]
    fn up_needs_an_address_no_blacklist_and_health() {
        let mut b = BackendMetrics::default();
        // `server 3 max 2` with two servers adds slots 2 and 3, no address.
        assert!(!b.up());
        b.connectable = true;
        assert!(b.up());
        for (health, up) in [
            (Health::Unchecked, true),
            (Health::Up, true),
            (Health::Drain, false),
            (Health::Down, false),
        ] {
            b.health = health;
            b.blacklisted = false;
            assert_eq!(b.up(), up);
            b.blacklisted = true;
            assert!(!b.up());
        }
    }

    #[test]
    fn no_backends_still_valid() {
        let text = render(&MetricsSnapshot::default());
        assert!(text.ends_with("ringpen_refused_connections_total{reason=\"limit\"} 0\n"));
        assert_eq!(text.matches("# TYPE ").count(), 11);
        assert!(!text.contains("{server="));
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape_label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_label_value("[::1]:80"), "[::1]:80");
    }

    fn split(resp: &[u8]) -> (String, String) {
        let text = String::from_utf8(resp.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    #[test]
    fn serves_get_metrics() {
        for (req, version) in [
            (
                &b"GET /metrics HTTP/1.1\r\nHost: x:9100\r\nAccept: */*\r\n\r\n"[..],
                "HTTP/1.1",
            ),
            (b"GET /metrics HTTP/1.0\r\n\r\n", "HTTP/1.0"),
            (b"GET /metrics?x=1 HTTP/1.1\nHost: a\n\n", "HTTP/1.1"),
            (b"GET /metrics HTTP/1.1\r\n", "HTTP/1.1"),
        ] {
            let resp = respond(req, || "a 1\n".to_string());
            let (head, body) = split(&resp);
            assert_eq!(
                head,
                format!(
                    "{version} 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
                     Content-Length: 4\r\nConnection: close"
                )
            );
            assert_eq!(body, "a 1\n");
        }
    }

    #[test]
    fn refuses_other_requests() {
        let cases: [(&[u8], &str); 14] = [
            (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (b"GET /metricsx HTTP/1.0\r\n\r\n", "HTTP/1.0 404 Not Found"),
            (
                b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
            ),
            (
                b"HEAD /metrics HTTP/1.1\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
            ),
            (
                b"get /metrics HTTP/1.1\r\n\r\n",
                "HTTP/1.1 405 Method Not Allowed",
            ),
            (b"", "HTTP/1.1 400 Bad Request"),
            (b"\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET /metrics HTTP/2.0\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET /m\xffx HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (
                b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
                "HTTP/1.1 400 Bad Request",
            ),
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                "HTTP/1.1 400 Bad Request",
            ),
        ];
        for (req, status) in cases {
            let resp = respond(req, || panic!("body rendered for {req:?}"));
            let (head, body) = split(&resp);
            assert!(head.starts_with(&format!("{status}\r\n")), "{req:?}: {head}");
            assert!(head.ends_with("\r\nConnection: close"), "{head}");
            assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
            if status.contains("405") {
                assert!(head.contains("\r\nAllow: GET\r\n"));
            }
        }
    }

    #[test]
    fn never_panics_on_random_bytes() {
        let mut rng = crate::test_rng::TestRng::new(0x9E37_79B9_7F4A_7C15);
        let mut next = move || rng.next_u64();
        let good = b"GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n";
        for round in 0..20_000 {
            let len = (next() % 96) as usize;
            let mut req: Vec<u8> = if round % 2 == 0 {
                (0..len).map(|_| next() as u8).collect()
            } else {
                // A valid request with a few bytes flipped or cut short.
                let mut r = good[..len.min(good.len())].to_vec();
                for _ in 0..(next() % 3) {
                    if !r.is_empty() {
                        let i = (next() as usize) % r.len();
                        r[i] = next() as u8;
                    }
                }
                r
            };
            if round % 7 == 0 {
                req.extend_from_slice(b"\r\n\r\n");
            }
            let resp = respond(&req, || "x 1\n".to_string());
            let status = &resp[9..12];
            assert!([&b"200"[..], b"400", b"404", b"405"].contains(&status), "{req:?}");
        }
    }
}
