//! Pen's `web_stats` HTML status page (`-w`, SIGUSR1, `penctl status`),
//! rendered byte for byte as Pen 0.34's `webstats()` writes it. Pure: the
//! caller gathers a [`StatsSnapshot`]; [`render`] only formats it.

use std::fmt::Write;

/// One row of the server table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerRow {
    pub index: usize,
    /// The address without the port, as Pen's `pen_ntoa` prints it.
    pub address: String,
    /// Pen's `status`: epoch second of the last failure, or 0.
    pub status: u64,
    pub port: u16,
    /// Connections now.
    pub conns: u32,
    /// Soft limit (`max soft`), 0 = none.
    pub max: u32,
    /// Hard limit (`max hard`).
    pub hard: u32,
    /// Bytes sent to the server.
    pub sent: u64,
    /// Bytes received from the server.
    pub received: u64,
    pub weight: u32,
    pub prio: u32,
}

/// One row of the client table (Pen shows only slots in use).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientRow {
    pub index: usize,
    pub address: String,
    /// Seconds since the client last connected.
    pub age_secs: i64,
    /// The server the client last went to (Pen's `clients[i].server`;
    /// negative for the emergency/abuse slots).
    pub last_server: i64,
    pub connects: u64,
    /// Bytes sent to the client.
    pub sent: u64,
    /// Bytes received from the client.
    pub received: u64,
}

/// One row of the connection table (Pen shows only slots in use).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectionRow {
    pub index: usize,
    pub downfd: i32,
    /// -1 while there is no upstream socket.
    pub upfd: i32,
    /// Bytes waiting to go to the client.
    pub pending_down: usize,
    /// Bytes waiting to go to the server.
    pub pending_up: usize,
    /// Index into the client table.
    pub client: i64,
    /// Server index (negative for the emergency/abuse slots).
    pub server: i64,
}

/// Everything the status page shows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Local time, "YYYY-MM-DD HH:MM:SS" (see [`local_time`]).
    pub now_local: String,
    /// Index of the last server chosen, as Pen's `current`.
    pub current: i64,
    pub servers: Vec<ServerRow>,
    pub clients_max: usize,
    /// Only the client slots in use, in slot order.
    pub clients: Vec<ClientRow>,
    pub conn_max: usize,
    pub connections_used: usize,
    /// Pen's `connections_last`: the slot the last connection took.
    pub last_connection: usize,
    /// Only the connection slots in use, in slot order.
    pub connections: Vec<ConnectionRow>,
    /// ringpen's own: active health-check results per server. Empty
    /// without `--check`, and then the page is exactly Pen's.
    pub health: Vec<HealthRow>,
}

/// One server's active health check, for the section Pen's page lacks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthRow {
    pub index: usize,
    pub address: String,
    /// `unchecked`, `up`, `drain` or `down`.
    pub health: String,
    /// The last check's latency in milliseconds, if a check has ended.
    pub latency_ms: Option<u64>,
}

const HEADER_CELL_OPEN: &str = "<td bgcolor=\"#80f080\">";
const TABLE_OPEN: &str = "<table bgcolor=\"#c0c0c0\">\n";

fn header_row(out: &mut String, names: &[&str]) {
    out.push_str(TABLE_OPEN);
    out.push_str("<tr>\n");
    for name in names {
        out.push_str(HEADER_CELL_OPEN);
        out.push_str(name);
        out.push_str("</td>\n");
    }
    out.push_str("</tr>\n");
}

fn data_row(out: &mut String, cells: &[&dyn std::fmt::Display]) {
    out.push_str("<tr>\n");
    for cell in cells {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "<td>{cell}</td>");
    }
    out.push_str("</tr>\n");
}

/// The page exactly as Pen writes it. Addresses are inserted as given,
/// without HTML escaping, as Pen does.
pub fn render(s: &StatsSnapshot) -> String {
    let mut out =
        String::with_capacity(2048 + 200 * (s.servers.len() + s.clients.len() + s.connections.len()));
    out.push_str(
        "<html>\n<head>\n<title>Pen status page</title>\n</head>\n\
         <body bgcolor=\"#ffffff\"><h1>Pen status page</h1>\n",
    );
    let _ = writeln!(
        out,
        "Time {}, {} servers, {} current<p>",
        s.now_local,
        s.servers.len(),
        s.current
    );
    header_row(
        &mut out,
        &[
            "server",
            "address",
            "status",
            "port",
            "connections",
            "max soft",
            "max hard",
            "sent",
            "received",
            "weight",
            "prio",
        ],
    );
    for r in &s.servers {
        data_row(
            &mut out,
            &[
                &r.index,
                &r.address,
                &r.status,
                &r.port,
                &r.conns,
                &r.max,
                &r.hard,
                &r.sent,
                &r.received,
                &r.weight,
                &r.prio,
            ],
        );
    }
    out.push_str("</table>\n");
    if !s.health.is_empty() {
        out.push_str("<h2>Health checks</h2>");
        header_row(&mut out, &["server", "address", "health", "last check (ms)"]);
        for r in &s.health {
            let latency = r.latency_ms.map_or_else(|| "-".to_string(), |ms| ms.to_string());
            data_row(&mut out, &[&r.index, &r.address, &r.health, &latency]);
        }
        out.push_str("</table>\n");
    }

    let _ = write!(
        out,
        "<h2>Active clients</h2>Max number of clients: {}<p>",
        s.clients_max
    );
    header_row(
        &mut out,
        &[
            "client",
            "address",
            "age(secs)",
            "last server",
            "connects",
            "sent",
            "received",
        ],
    );
    for r in &s.clients {
        data_row(
            &mut out,
            &[
                &r.index,
                &r.address,
                &r.age_secs,
                &r.last_server,
                &r.connects,
                &r.sent,
                &r.received,
            ],
        );
    }
    out.push_str("</table>\n");

    let _ = write!(
        out,
        "<h2>Active connections</h2>Number of connections: {} max, {} used, {} last<p>",
        s.conn_max, s.connections_used, s.last_connection
    );
    header_row(
        &mut out,
        &[
            "connection",
            "downfd",
            "upfd",
            "pending data down",
            "pending data up",
            "client",
            "server",
        ],
    );
    for r in &s.connections {
        data_row(
            &mut out,
            &[
                &r.index,
                &r.downfd,
                &r.upfd,
                &r.pending_down,
                &r.pending_up,
                &r.client,
                &r.server,
            ],
        );
    }
    out.push_str("</table>\n</body>\n</html>\n");
    out
}

/// `epoch` (seconds) as local time "YYYY-MM-DD HH:MM:SS", like Pen's
/// `strftime("%Y-%m-%d %H:%M:%S", localtime(&now))`. A time the C library
/// cannot represent gives "0000-00-00 00:00:00".
pub fn local_time(epoch: u64) -> String {
    let t = libc::time_t::try_from(epoch).unwrap_or(libc::time_t::MAX);
    // SAFETY: `tm` is plain old data, so all-zero is a valid value;
    // localtime_r only reads `t` and writes into `tm`, both live locals,
    // and is the thread-safe variant (no shared static buffer).
    let (ok, tm) = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        let ok = !libc::localtime_r(&t, &mut tm).is_null();
        (ok, tm)
    };
    if !ok {
        return "0000-00-00 00:00:00".to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `penctl 127.0.0.1:18501 status` from Debian's pen 0.34.1, run as
    /// `pen -f -u root -C 127.0.0.1:18501 -w /tmp/ws.html 127.0.0.1:18500
    /// 127.0.0.1:18502:10:20:3:4 127.0.0.1:18503`, after five connections
    /// from one client (one still open) and `server 0 blacklist 30`.
    const REAL_PEN: &str = r##"<html>
<head>
<title>Pen status page</title>
</head>
<body bgcolor="#ffffff"><h1>Pen status page</h1>
Time 2026-11-25 20:36:05, 2 servers, 1 current<p>
<table bgcolor="#c0c0c0">
<tr>
<td bgcolor="#80f080">server</td>
<td bgcolor="#80f080">address</td>
<td bgcolor="#80f080">status</td>
<td bgcolor="#80f080">port</td>
<td bgcolor="#80f080">connections</td>
<td bgcolor="#80f080">max soft</td>
<td bgcolor="#80f080">max hard</td>
<td bgcolor="#80f080">sent</td>
<td bgcolor="#80f080">received</td>
<td bgcolor="#80f080">weight</td>
<td bgcolor="#80f080">prio</td>
</tr>
<tr>
<td>0</td>
<td>127.0.0.1</td>
<td>1795638963</td>
<td>18502</td>
<td>0</td>
<td>10</td>
<td>20</td>
<td>0</td>
<td>0</td>
<td>3</td>
<td>4</td>
</tr>
<tr>
<td>1</td>
<td>127.0.0.1</td>
<td>0</td>
<td>18503</td>
<td>1</td>
<td>0</td>
<td>0</td>
<td>24</td>
<td>29</td>
<td>0</td>
<td>0</td>
</tr>
</table>
<h2>Active clients</h2>Max number of clients: 2048<p><table bgcolor="#c0c0c0">
<tr>
<td bgcolor="#80f080">client</td>
<td bgcolor="#80f080">address</td>
<td bgcolor="#80f080">age(secs)</td>
<td bgcolor="#80f080">last server</td>
<td bgcolor="#80f080">connects</td>
<td bgcolor="#80f080">sent</td>
<td bgcolor="#80f080">received</td>
</tr>
<tr>
<td>0</td>
<td>127.0.0.1</td>
<td>2</td>
<td>1</td>
<td>5</td>
<td>29</td>
<td>24</td>
</tr>
</table>
<h2>Active connections</h2>Number of connections: 500 max, 1 used, 3 last<p><table bgcolor="#c0c0c0">
<tr>
<td bgcolor="#80f080">connection</td>
<td bgcolor="#80f080">downfd</td>
<td bgcolor="#80f080">upfd</td>
<td bgcolor="#80f080">pending data down</td>
<td bgcolor="#80f080">pending data up</td>
<td bgcolor="#80f080">client</td>
<td bgcolor="#80f080">server</td>
</tr>
<tr>
<td>3</td>
<td>11</td>
<td>12</td>
<td>0</td>
<td>0</td>
<td>0</td>
<td>1</td>
</tr>
</table>
</body>
</html>
"##;

    #[test]
    fn the_health_section_appears_only_with_checks() {
        let mut snapshot = real_snapshot();
        assert!(!render(&snapshot).contains("Health checks"));
        snapshot.health = vec![HealthRow {
            index: 0,
            address: "127.0.0.1:3306".into(),
            health: "drain".into(),
            latency_ms: Some(3),
        }];
        let page = render(&snapshot);
        let at = page.find("<h2>Health checks</h2>").expect("a health section");
        assert!(at > page.find("</table>").unwrap() && at < page.find("Active clients").unwrap());
        assert!(page.contains("<td>127.0.0.1:3306</td>\n<td>drain</td>\n<td>3</td>"));
    }

    fn real_snapshot() -> StatsSnapshot {
        StatsSnapshot {
            health: Vec::new(),
            now_local: "2026-11-25 20:36:05".into(),
            current: 1,
            servers: vec![
                ServerRow {
                    index: 0,
                    address: "127.0.0.1".into(),
                    status: 1795638963,
                    port: 18502,
                    conns: 0,
                    max: 10,
                    hard: 20,
                    sent: 0,
                    received: 0,
                    weight: 3,
                    prio: 4,
                },
                ServerRow {
                    index: 1,
                    address: "127.0.0.1".into(),
                    status: 0,
                    port: 18503,
                    conns: 1,
                    max: 0,
                    hard: 0,
                    sent: 24,
                    received: 29,
                    weight: 0,
                    prio: 0,
                },
            ],
            clients_max: 2048,
            clients: vec![ClientRow {
                index: 0,
                address: "127.0.0.1".into(),
                age_secs: 2,
                last_server: 1,
                connects: 5,
                sent: 29,
                received: 24,
            }],
            conn_max: 500,
            connections_used: 1,
            last_connection: 3,
            connections: vec![ConnectionRow {
                index: 3,
                downfd: 11,
                upfd: 12,
                pending_down: 0,
                pending_up: 0,
                client: 0,
                server: 1,
            }],
        }
    }

    #[test]
    fn matches_real_pen_byte_for_byte() {
        assert_eq!(render(&real_snapshot()), REAL_PEN);
    }

    #[test]
    fn empty_tables_keep_the_layout() {
        let s = StatsSnapshot {
            now_local: "2024-01-02 03:04:05".into(),
            current: -1,
            clients_max: 2048,
            conn_max: 500,
            ..Default::default()
        };
        let page = render(&s);
        assert!(page.contains("Time 2024-01-02 03:04:05, 0 servers, -1 current<p>\n"));
        assert!(page
            .contains("<h2>Active clients</h2>Max number of clients: 2048<p><table bgcolor=\"#c0c0c0\">\n"));
        assert!(page.contains("Number of connections: 500 max, 0 used, 0 last<p><table"));
        assert!(page.ends_with("</tr>\n</table>\n</body>\n</html>\n"));
        assert_eq!(page.matches("<tr>").count(), 3);
    }

    #[test]
    fn local_time_has_pens_shape() {
        for epoch in [0, 1, 86_399, 1_795_638_965, 4_102_444_800] {
            let t = local_time(epoch);
            let b = t.as_bytes();
            assert_eq!(b.len(), 19, "{t}");
            for (i, c) in b.iter().enumerate() {
                match i {
                    4 | 7 => assert_eq!(*c, b'-', "{t}"),
                    10 => assert_eq!(*c, b' ', "{t}"),
                    13 | 16 => assert_eq!(*c, b':', "{t}"),
                    _ => assert!(c.is_ascii_digit(), "{t}"),
                }
            }
        }
        // No time zone offset changes the seconds.
        assert!(local_time(1_795_638_965).ends_with(":05"));
        assert_eq!(local_time(u64::MAX), "0000-00-00 00:00:00");
    }
}
