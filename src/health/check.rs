//! One health check of one server: connect, speak as much MySQL as the
//! check kind needs, quit cleanly, and give a [`Verdict`]. Runs on the
//! control thread's `tokio-uring` runtime.
//!
//! # Never get the balancer's host blocked
//!
//! MariaDB counts every connection that ends before a successful login in
//! `Aborted_connects`, and those that end before the authentication step
//! (no handshake response, or a malformed one) also in its host cache:
//! `max_connect_errors` (default 100) of them in a row and the server
//! refuses the balancer's host with error 1129 until `FLUSH HOSTS`. A
//! successful login resets that count. Measured against MariaDB 10.11.19
//! (Debian 12), 20 connections each, deltas of `Aborted_connects` /
//! `Aborted_connects_preauth` / `Aborted_clients`:
//!
//! | what the client does                                   | connects | preauth | clients | host blocked |
//! |--------------------------------------------------------|----------|---------|---------|--------------|
//! | connect, close (a bare TCP check)                      | +20      | +20     | 0       | yes          |
//! | read the greeting, close (HAProxy `mysql-check`)       | +20      | +20     | 0       | yes          |
//! | read the greeting, send COM_QUIT as the response       | +20      | +20     | 0       | yes          |
//! | `PROXY UNKNOWN\r\n` (no `proxy-protocol-networks`)     | +20      | +20     | 0       | yes          |
//! | log in as an unknown user (1045 access denied)         | +20      | 0       | 0       | no           |
//! | log in, close without COM_QUIT                         | 0        | 0       | +20     | no           |
//! | log in, COM_QUIT                                       | 0        | 0       | 0       | no           |
//!
//! ("host blocked": with `max_connect_errors=3`, from a non-loopback
//! address; MariaDB never blocks loopback clients.) So the only check that
//! leaves every counter alone is a real login followed by COM_QUIT, and
//! that is what the `mysql` and `galera` kinds do: as `--check-user` with
//! its password, or without one as [`DEFAULT_USER`] with an empty password.
//! That account needs no privileges at all (`CREATE USER
//! 'ringpen_check'@'<balancer host>'`; `SHOW GLOBAL STATUS` needs none).
//! When it does not exist, a `mysql` check still counts the server Up on
//! the "access denied" answer (the server is alive and authenticating),
//! which costs one `Aborted_connects` and an error-log warning per check
//! but never blocks the host. A `tcp` check against MariaDB is the first
//! row: use `mysql` or `galera` for databases.
//!
//! # Timeouts
//!
//! The whole check runs under one `tokio::time::timeout(opts.timeout)`.
//! Dropping a `tokio-uring` future does not cancel its io_uring operation:
//! the operation keeps the socket open until it completes, which for a
//! connect to a silent host or a read from a silent server is minutes or
//! never (measured: one leaked descriptor per timed-out check). So the
//! connection lives in [`Conn`], whose `Drop` shuts the socket down, which
//! completes any operation still in flight (a pending connect included:
//! `shutdown` aborts a SYN_SENT socket) and lets the descriptor close. For
//! the same reason the connect is a plain non-blocking `connect(2)` whose
//! completion is awaited with a zero-length write, rather than
//! `TcpStream::connect`, which would own the socket until the kernel gives
//! up.

use std::cell::Cell;
use std::net::{Shutdown, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio_uring::net::TcpStream;

use crate::config::{CheckKind, DonorPolicy, HealthOptions};

use super::mysql::{self, AuthReply, ErrPacket, Hello, QueryOutcome, ResultReader};

/// What one check concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Up,
    /// Alive, but should take no new connections (Galera Donor/Desynced
    /// under `--donor drain`).
    Drain,
    Down(String),
}

impl Verdict {
    /// Why the server is not plainly Up.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Verdict::Up => None,
            Verdict::Drain => Some("Donor/Desynced: draining"),
            Verdict::Down(reason) => Some(reason),
        }
    }
}

/// The account a `mysql` or `galera` check logs in as without
/// `--check-user`, with an empty password.
pub const DEFAULT_USER: &str = "ringpen_check";

/// What a `galera` check asks. `SHOW` needs no privilege, and `SHOW
/// VARIABLES` returns no row rather than an error for a variable that a
/// server does not have.
pub const GALERA_STATUS_QUERY: &str = "SHOW GLOBAL STATUS WHERE Variable_name IN \
     ('wsrep_local_state','wsrep_local_state_comment','wsrep_ready','wsrep_cluster_status')";
pub const GALERA_VARIABLES_QUERY: &str =
    "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('wsrep_reject_queries')";

/// Runs one check of `kind` against `addr`, all of it within `opts.timeout`.
pub async fn check_once(kind: CheckKind, addr: SocketAddr, opts: &HealthOptions) -> Verdict {
    let step = Cell::new("connecting");
    match tokio::time::timeout(opts.timeout, run(kind, addr, opts, &step)).await {
        Ok(Verdict::Down(reason)) => Verdict::Down(crate::text::one_line(&reason, REASON_MAX)),
        Ok(verdict) => verdict,
        Err(_) => Verdict::Down(format!("timed out after {:?} {}", opts.timeout, step.get())),
    }
}

/// Longest reason kept, in characters: a reason may quote what the server
/// sent (an error message, a status value).
const REASON_MAX: usize = 200;

async fn run(kind: CheckKind, addr: SocketAddr, opts: &HealthOptions, step: &Cell<&'static str>) -> Verdict {
    let mut conn = match Conn::connect(addr).await {
        Ok(conn) => conn,
        Err(e) => return Verdict::Down(format!("connect: {e}")),
    };
    if kind == CheckKind::Tcp {
        return Verdict::Up;
    }
    match mysql_check(&mut conn, kind, opts, step).await {
        Ok(verdict) => verdict,
        Err(reason) => Verdict::Down(reason),
    }
}

async fn mysql_check(
    conn: &mut Conn,
    kind: CheckKind,
    opts: &HealthOptions,
    step: &Cell<&'static str>,
) -> Result<Verdict, String> {
    step.set("waiting for the server greeting");
    let payload = conn.read_packet().await?;
    let greeting = match mysql::parse_hello(&payload).map_err(|e| format!("bad greeting: {e}"))? {
        Hello::Greeting(g) => g,
        Hello::Error(e) => return Ok(Verdict::Down(format!("server refuses connections: {e}"))),
    };
    let caps = mysql::client_capabilities(greeting.capabilities).map_err(|e| format!("greeting: {e}"))?;

    step.set("logging in");
    let user = opts.user.as_deref().unwrap_or(DEFAULT_USER);
    let password = opts.password.as_deref().unwrap_or("");
    match login(conn, caps, &greeting.scramble, user, password).await? {
        Login::Ok => {}
        // No account configured and the default one does not exist: the
        // server answered a complete authentication, so it is up (see the
        // module comment for what this costs).
        Login::Denied(e)
            if kind == CheckKind::Mysql && opts.user.is_none() && e.code == mysql::codes::ACCESS_DENIED =>
        {
            return Ok(Verdict::Up);
        }
        Login::Denied(e) => return Ok(Verdict::Down(format!("login as '{user}' failed: {e}"))),
    }

    let verdict = match kind {
        CheckKind::Galera => {
            step.set("reading the wsrep status");
            let status = conn.query(caps, GALERA_STATUS_QUERY).await?;
            step.set("reading wsrep_reject_queries");
            let variables = conn.query(caps, GALERA_VARIABLES_QUERY).await?;
            match (status, variables) {
                (QueryOutcome::Err(e), _) | (_, QueryOutcome::Err(e)) => {
                    Verdict::Down(format!("wsrep status query failed: {e}"))
                }
                (status, variables) => {
                    let mut galera = GaleraStatus::default();
                    galera.absorb(&status);
                    galera.absorb(&variables);
                    galera_verdict(&galera, opts.donor)
                }
            }
        }
        _ => Verdict::Up,
    };

    step.set("quitting");
    conn.start_command();
    conn.write_packet(&mysql::com_quit()).await?;
    Ok(verdict)
}

enum Login {
    Ok,
    Denied(ErrPacket),
}

/// HandshakeResponse41 with mysql_native_password, following at most a few
/// AuthSwitchRequests back to mysql_native_password.
async fn login(conn: &mut Conn, caps: u32, seed: &[u8], user: &str, password: &str) -> Result<Login, String> {
    let response = mysql::handshake_response(caps, user, password, seed).map_err(|e| e.to_string())?;
    conn.write_packet(&response).await?;
    for _ in 0..3 {
        let payload = conn.read_packet().await?;
        match mysql::parse_auth_reply(&payload).map_err(|e| format!("login: {e}"))? {
            AuthReply::Ok => return Ok(Login::Ok),
            AuthReply::Err(e) => return Ok(Login::Denied(e)),
            AuthReply::Switch { plugin, seed } if plugin == mysql::NATIVE_PASSWORD => {
                let auth = mysql::scramble_native_password(password.as_bytes(), &seed);
                conn.write_packet(&auth).await?;
            }
            AuthReply::Switch { plugin, .. } => {
                return Err(format!(
                    "the server wants auth plugin {plugin} for '{user}'; checks support only {}",
                    mysql::NATIVE_PASSWORD
                ))
            }
            AuthReply::OldPasswordSwitch => {
                return Err(format!(
                    "the server wants mysql_old_password for '{user}'; not supported"
                ))
            }
            AuthReply::MoreData(_) => {
                return Err(format!("unexpected extra authentication step for '{user}'"))
            }
        }
    }
    Err("too many authentication switches".into())
}

// ---------------------------------------------------------------------------
// Galera

/// The `wsrep_*` values a `galera` check reads; `None` when the server did
/// not report the variable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GaleraStatus {
    pub local_state: Option<String>,
    pub local_state_comment: Option<String>,
    pub ready: Option<String>,
    pub cluster_status: Option<String>,
    pub reject_queries: Option<String>,
}

impl GaleraStatus {
    /// Takes the `(Variable_name, Value)` rows of a `SHOW` statement.
    pub fn absorb(&mut self, outcome: &QueryOutcome) {
        let QueryOutcome::Rows(set) = outcome else {
            return;
        };
        for row in &set.rows {
            let (Some(Some(name)), Some(value)) = (row.first(), row.get(1)) else {
                continue;
            };
            let slot = match name.to_ascii_lowercase().as_str() {
                "wsrep_local_state" => &mut self.local_state,
                "wsrep_local_state_comment" => &mut self.local_state_comment,
                "wsrep_ready" => &mut self.ready,
                "wsrep_cluster_status" => &mut self.cluster_status,
                "wsrep_reject_queries" => &mut self.reject_queries,
                _ => continue,
            };
            *slot = value.clone();
        }
    }
}

/// The Galera rules: Synced (4), in the Primary component, `wsrep_ready`
/// ON and not rejecting queries is Up; Donor/Desynced (2) is what `donor`
/// says; everything else is Down with the reason.
pub fn galera_verdict(status: &GaleraStatus, donor: DonorPolicy) -> Verdict {
    let Some(state) = status.local_state.as_deref() else {
        return Verdict::Down("not a Galera node: no wsrep_local_state (wsrep_on=OFF or no provider)".into());
    };
    let Ok(state) = state.trim().parse::<u32>() else {
        return Verdict::Down(format!("unreadable wsrep_local_state '{state}'"));
    };
    let cluster = status.cluster_status.as_deref().unwrap_or("missing");
    if !cluster.eq_ignore_ascii_case("Primary") {
        return Verdict::Down(format!(
            "not in the Primary component (wsrep_cluster_status={cluster})"
        ));
    }
    let ready = status.ready.as_deref().unwrap_or("missing");
    if !ready.eq_ignore_ascii_case("ON") {
        return Verdict::Down(format!("not ready (wsrep_ready={ready})"));
    }
    if let Some(reject) = status.reject_queries.as_deref() {
        if !reject.eq_ignore_ascii_case("NONE") {
            return Verdict::Down(format!("rejecting queries (wsrep_reject_queries={reject})"));
        }
    }
    let name = status
        .local_state_comment
        .clone()
        .unwrap_or_else(|| state_name(state).to_string());
    match state {
        4 => Verdict::Up,
        2 => match donor {
            DonorPolicy::Drain => Verdict::Drain,
            DonorPolicy::Up => Verdict::Up,
            DonorPolicy::Down => Verdict::Down(format!("{name} (wsrep_local_state=2) and --donor down")),
        },
        _ => Verdict::Down(format!("{name} (wsrep_local_state={state})")),
    }
}

fn state_name(state: u32) -> &'static str {
    match state {
        0 => "Initialized",
        1 => "Joining",
        2 => "Donor/Desynced",
        3 => "Joined",
        4 => "Synced",
        _ => "unknown state",
    }
}

// ---------------------------------------------------------------------------
// The connection

/// A check's connection: a receive buffer, the packet sequence number, and
/// a `Drop` that shuts the socket down (see "Timeouts" above).
struct Conn {
    stream: TcpStream,
    /// Received bytes not yet consumed as packets.
    buf: Vec<u8>,
    /// The read buffer handed to io_uring, kept between reads.
    scratch: Option<Vec<u8>>,
    /// Sequence number of the next packet, either way.
    seq: u8,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // ENOTCONN after a failed connect is expected and harmless.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Result<Conn, String> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| e.to_string())?;
        socket.set_nonblocking(true).map_err(|e| e.to_string())?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e.to_string()),
        }
        // io_uring parks a blocking socket's operations on poll; leave the
        // descriptor in the mode tokio-uring creates its own sockets in.
        socket.set_nonblocking(false).map_err(|e| e.to_string())?;
        let _ = socket.set_tcp_nodelay(true);
        let conn = Conn {
            stream: TcpStream::from_std(socket.into()),
            buf: Vec::new(),
            scratch: None,
            seq: 0,
        };
        // A zero-length write completes when the connect does (with its
        // error if it fails), and sends nothing.
        let (res, _) = conn.stream.write(Vec::new()).submit().await;
        res.map_err(|e| e.to_string())?;
        Ok(conn)
    }

    /// A new command: sequence numbers start again at 0.
    fn start_command(&mut self) {
        self.seq = 0;
    }

    async fn read_packet(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(packet) = mysql::split_packet(&self.buf).map_err(|e| e.to_string())? {
                // An ERR is read whatever its number: its message says more
                // than a sequence error would.
                if packet.seq != self.seq && packet.payload.first() != Some(&0xff) {
                    let e = mysql::ProtoError::Sequence {
                        got: packet.seq,
                        expected: self.seq,
                    };
                    return Err(e.to_string());
                }
                self.seq = self.seq.wrapping_add(1);
                let payload = packet.payload.to_vec();
                let used = packet.len;
                self.buf.drain(..used);
                return Ok(payload);
            }
            let mut chunk = self.scratch.take().unwrap_or_else(|| Vec::with_capacity(4096));
            chunk.clear();
            let (res, chunk) = self.stream.read(chunk).await;
            let n = res.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("the server closed the connection".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
            self.scratch = Some(chunk);
        }
    }

    async fn write_packet(&mut self, payload: &[u8]) -> Result<(), String> {
        let framed = mysql::frame(self.seq, payload).map_err(|e| e.to_string())?;
        self.seq = self.seq.wrapping_add(1);
        let (res, _) = self.stream.write_all(framed).await;
        res.map_err(|e| format!("write: {e}"))
    }

    async fn query(&mut self, caps: u32, sql: &str) -> Result<QueryOutcome, String> {
        self.start_command();
        self.write_packet(&mysql::com_query(sql)).await?;
        let mut reader = ResultReader::new(caps);
        loop {
            let payload = self.read_packet().await?;
            if let Some(outcome) = reader
                .feed(&payload)
                .map_err(|e| format!("query response: {e}"))?
            {
                return Ok(outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced() -> GaleraStatus {
        GaleraStatus {
            local_state: Some("4".into()),
            local_state_comment: Some("Synced".into()),
            ready: Some("ON".into()),
            cluster_status: Some("Primary".into()),
            reject_queries: Some("NONE".into()),
        }
    }

    fn reason(v: Verdict) -> String {
        match v {
            Verdict::Down(r) => r,
            other => panic!("expected Down, got {other:?}"),
        }
    }

    #[test]
    fn synced_primary_ready_is_up() {
        assert_eq!(galera_verdict(&synced(), DonorPolicy::Drain), Verdict::Up);
        // A server without wsrep_reject_queries (older Galera) is not rejecting.
        let s = GaleraStatus {
            reject_queries: None,
            ..synced()
        };
        assert_eq!(galera_verdict(&s, DonorPolicy::Drain), Verdict::Up);
    }

    #[test]
    fn donor_follows_the_policy() {
        let s = GaleraStatus {
            local_state: Some("2".into()),
            local_state_comment: Some("Donor/Desynced".into()),
            ..synced()
        };
        assert_eq!(galera_verdict(&s, DonorPolicy::Drain), Verdict::Drain);
        assert_eq!(galera_verdict(&s, DonorPolicy::Up), Verdict::Up);
        let r = reason(galera_verdict(&s, DonorPolicy::Down));
        assert!(r.contains("Donor/Desynced"), "{r}");
    }

    #[test]
    fn other_states_are_down_with_their_name() {
        for (state, comment) in [("1", "Joining"), ("3", "Joined"), ("0", "Initialized")] {
            let s = GaleraStatus {
                local_state: Some(state.into()),
                local_state_comment: None,
                ..synced()
            };
            let r = reason(galera_verdict(&s, DonorPolicy::Up));
            assert!(r.starts_with(comment), "{r}");
        }
    }

    #[test]
    fn non_primary_not_ready_rejecting_are_down() {
        let s = GaleraStatus {
            cluster_status: Some("non-Primary".into()),
            ..synced()
        };
        assert!(reason(galera_verdict(&s, DonorPolicy::Drain)).contains("non-Primary"));
        let s = GaleraStatus {
            ready: Some("OFF".into()),
            ..synced()
        };
        assert!(reason(galera_verdict(&s, DonorPolicy::Drain)).contains("wsrep_ready=OFF"));
        for reject in ["ALL", "ALL_KILL"] {
            let s = GaleraStatus {
                reject_queries: Some(reject.into()),
                ..synced()
            };
            assert!(reason(galera_verdict(&s, DonorPolicy::Up)).contains(reject));
        }
        // The policy never rescues a rejecting donor.
        let s = GaleraStatus {
            local_state: Some("2".into()),
            reject_queries: Some("ALL".into()),
            ..synced()
        };
        assert!(reason(galera_verdict(&s, DonorPolicy::Up)).contains("rejecting"));
    }

    #[test]
    fn plain_mariadb_is_not_a_galera_node() {
        // What MariaDB without wsrep answers.
        let s = GaleraStatus {
            ready: Some("OFF".into()),
            cluster_status: Some("Disconnected".into()),
            reject_queries: Some("NONE".into()),
            ..GaleraStatus::default()
        };
        assert!(reason(galera_verdict(&s, DonorPolicy::Drain)).starts_with("not a Galera node"));
        let s = GaleraStatus {
            local_state: Some("x".into()),
            ..synced()
        };
        assert!(reason(galera_verdict(&s, DonorPolicy::Drain)).contains("unreadable"));
    }

    #[test]
    fn absorbs_show_rows() {
        let set = mysql::ResultSet {
            columns: vec!["Variable_name".into(), "Value".into()],
            rows: vec![
                vec![Some("wsrep_local_state".into()), Some("4".into())],
                vec![Some("WSREP_READY".into()), Some("ON".into())],
                vec![Some("wsrep_cluster_status".into()), Some("Primary".into())],
                vec![Some("something_else".into()), Some("x".into())],
                vec![None, Some("x".into())],
                vec![Some("wsrep_reject_queries".into())],
            ],
        };
        let mut s = GaleraStatus::default();
        s.absorb(&QueryOutcome::Rows(set));
        assert_eq!(s.local_state.as_deref(), Some("4"));
        assert_eq!(s.ready.as_deref(), Some("ON"));
        assert_eq!(s.cluster_status.as_deref(), Some("Primary"));
        assert_eq!(s.reject_queries, None);
    }

    #[test]
    fn verdict_reasons() {
        assert_eq!(Verdict::Up.reason(), None);
        assert!(Verdict::Drain.reason().is_some());
        assert_eq!(Verdict::Down("x".into()).reason(), Some("x"));
    }
}
