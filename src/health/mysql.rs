//! The pieces of the MySQL/MariaDB client protocol that a health check
//! needs, as pure functions over byte slices: no sockets, no clocks.
//!
//! A check speaks this much of the protocol:
//!
//! ```text
//! server: greeting (handshake v10)  or  ERR (1040 too many connections, 1129 host blocked)
//! client: HandshakeResponse41 with mysql_native_password
//! server: OK | ERR | AuthSwitchRequest(mysql_native_password, new seed) -> client: scramble
//! client: COM_QUERY "SHOW ..."          (galera checks only)
//! server: text result set | OK | ERR
//! client: COM_QUIT
//! ```
//!
//! Everything that comes from the server is hostile input: every length is
//! checked and a malformed packet is a [`ProtoError`], never a panic.

use sha1::{Digest, Sha1};

/// Capability flags (`CLIENT_*`) this module knows about.
pub mod caps {
    pub const LONG_PASSWORD: u32 = 1;
    pub const LONG_FLAG: u32 = 1 << 2;
    pub const CONNECT_WITH_DB: u32 = 1 << 3;
    pub const PROTOCOL_41: u32 = 1 << 9;
    pub const TRANSACTIONS: u32 = 1 << 13;
    /// `CLIENT_SECURE_CONNECTION`: the auth response is length-prefixed.
    pub const SECURE_CONNECTION: u32 = 1 << 15;
    pub const PLUGIN_AUTH: u32 = 1 << 19;
    /// Result sets end with an OK packet (header 0xfe) instead of EOF
    /// packets. MariaDB >= 10.2 and MySQL >= 5.7.5 offer it.
    pub const DEPRECATE_EOF: u32 = 1 << 24;

    /// What a check asks for, intersected with what the server offers.
    /// Deliberately absent: `CONNECT_WITH_DB` (no schema needed), `SSL`,
    /// `MULTI_STATEMENTS`/`MULTI_RESULTS` (one statement per query, so a
    /// result never continues), `SESSION_TRACK` (keeps OK packets short).
    pub const WANTED: u32 = LONG_PASSWORD
        | LONG_FLAG
        | PROTOCOL_41
        | TRANSACTIONS
        | SECURE_CONNECTION
        | PLUGIN_AUTH
        | DEPRECATE_EOF;
}

/// The only authentication plugin a check implements.
pub const NATIVE_PASSWORD: &str = "mysql_native_password";

/// The largest payload a check accepts. Every packet of a check is small
/// (a greeting, an OK or ERR, a row of two short values); a server that
/// sends more is broken or hostile, and a packet split over several frames
/// is never needed.
pub const MAX_PAYLOAD: usize = 1 << 16;

/// Rows a result set may hold before a check gives up on it: the check's
/// queries ask for at most four. With [`MAX_PAYLOAD`] this bounds what one
/// response can make a check hold to about a megabyte.
pub const MAX_ROWS: usize = 16;

/// Columns a result set may declare before a check gives up on it (the
/// check's queries return two).
pub const MAX_COLUMNS: usize = 16;

/// `utf8mb3_general_ci`: known to every server version.
const CHARSET_UTF8_GENERAL_CI: u8 = 33;

/// Command bytes.
pub const COM_QUIT: u8 = 0x01;
pub const COM_QUERY: u8 = 0x03;

/// What can be wrong with what the server sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("packet of {0} bytes is larger than a health check accepts")]
    TooLarge(usize),
    #[error("unexpected packet {what} (first byte {byte:#04x})")]
    Unexpected { what: &'static str, byte: u8 },
    #[error("empty packet where {0} was expected")]
    Empty(&'static str),
    #[error("handshake protocol version {0} is not supported (only 10)")]
    Version(u8),
    #[error("the server does not offer {0}")]
    Capability(&'static str),
    #[error("packet sequence number {got}, expected {expected}")]
    Sequence { got: u8, expected: u8 },
    #[error("result set declares {0} columns")]
    Columns(u64),
    #[error("result set has more than {MAX_ROWS} rows")]
    Rows,
    #[error("row has {got} values for {expected} columns")]
    RowWidth { got: usize, expected: usize },
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
}

// ---------------------------------------------------------------------------
// Framing

/// One packet cut out of a receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    pub seq: u8,
    pub payload: &'a [u8],
    /// Bytes of the buffer this packet used (header included).
    pub len: usize,
}

/// Cuts the first packet (3-byte little-endian length, 1-byte sequence
/// number, payload) from `buf`. `Ok(None)` means more bytes are needed.
pub fn split_packet(buf: &[u8]) -> Result<Option<Packet<'_>>, ProtoError> {
    let Some(header) = buf.get(..4) else {
        return Ok(None);
    };
    let payload_len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    if payload_len > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge(payload_len));
    }
    let Some(payload) = buf.get(4..4 + payload_len) else {
        return Ok(None);
    };
    Ok(Some(Packet {
        seq: header[3],
        payload,
        len: 4 + payload_len,
    }))
}

/// Frames `payload` as one packet. Payloads of a check are far below the
/// 16 MiB frame limit; a longer one is an error rather than a split.
pub fn frame(seq: u8, payload: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge(payload.len()));
    }
    let n = payload.len() as u32;
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&n.to_le_bytes()[..3]);
    out.push(seq);
    out.extend_from_slice(payload);
    Ok(out)
}

// ---------------------------------------------------------------------------
// A bounds-checked reader

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, pos: 0, what }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn rest(&mut self) -> &'a [u8] {
        let rest = &self.buf[self.pos..];
        self.pos = self.buf.len();
        rest
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self.pos.checked_add(n).ok_or(ProtoError::Truncated(self.what))?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or(ProtoError::Truncated(self.what))?;
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated string; `None` if there is no NUL.
    fn cstr(&mut self) -> Option<&'a [u8]> {
        let rest = &self.buf[self.pos..];
        let nul = rest.iter().position(|&b| b == 0)?;
        self.pos += nul + 1;
        Some(&rest[..nul])
    }

    /// A length-encoded integer; `Ok(None)` is the NULL marker (0xfb).
    fn lenenc(&mut self) -> Result<Option<u64>, ProtoError> {
        let first = self.u8()?;
        let n = match first {
            0..=0xfa => u64::from(first),
            0xfb => return Ok(None),
            0xfc => u64::from(self.u16()?),
            0xfd => {
                let b = self.take(3)?;
                u64::from(b[0]) | u64::from(b[1]) << 8 | u64::from(b[2]) << 16
            }
            0xfe => {
                let b = self.take(8)?;
                u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
            }
            0xff => {
                return Err(ProtoError::Unexpected {
                    what: self.what,
                    byte: first,
                })
            }
        };
        Ok(Some(n))
    }

    /// A length-encoded string; `Ok(None)` is NULL.
    fn lenenc_bytes(&mut self) -> Result<Option<&'a [u8]>, ProtoError> {
        match self.lenenc()? {
            None => Ok(None),
            Some(n) => {
                let n = usize::try_from(n).map_err(|_| ProtoError::Truncated(self.what))?;
                self.take(n).map(Some)
            }
        }
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------
// ERR and OK

/// An ERR packet: `0xff`, code, optional `#` + SQL state, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrPacket {
    pub code: u16,
    /// Absent in errors sent before the handshake (1040, 1129).
    pub sql_state: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ErrPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sql_state {
            Some(state) => write!(f, "error {} ({}): {}", self.code, state, self.message),
            None => write!(f, "error {}: {}", self.code, self.message),
        }
    }
}

/// Well-known server error codes a check reacts to.
pub mod codes {
    /// `ER_CON_COUNT_ERROR`: Too many connections.
    pub const TOO_MANY_CONNECTIONS: u16 = 1040;
    /// `ER_ACCESS_DENIED_ERROR`.
    pub const ACCESS_DENIED: u16 = 1045;
    /// `ER_UNKNOWN_COM_ERROR`: what a Galera node not ready for queries says.
    pub const UNKNOWN_COM: u16 = 1047;
    /// `ER_HOST_IS_BLOCKED`: `max_connect_errors` was reached.
    pub const HOST_BLOCKED: u16 = 1129;
    /// `ER_HOST_NOT_PRIVILEGED`.
    pub const HOST_NOT_PRIVILEGED: u16 = 1130;
}

/// Parses an ERR packet (the payload starts with 0xff).
pub fn parse_err(payload: &[u8]) -> Result<ErrPacket, ProtoError> {
    let mut c = Cursor::new(payload, "ERR packet");
    let header = c.u8()?;
    if header != 0xff {
        return Err(ProtoError::Unexpected {
            what: "instead of ERR",
            byte: header,
        });
    }
    let code = c.u16()?;
    let mut sql_state = None;
    if c.remaining() >= 6 && payload[c.pos] == b'#' {
        c.take(1)?;
        sql_state = Some(lossy(c.take(5)?));
    }
    Ok(ErrPacket {
        code,
        sql_state,
        message: lossy(c.rest()),
    })
}

/// The interesting part of an OK packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OkPacket {
    pub affected_rows: u64,
    pub status: u16,
}

/// Parses an OK packet (header 0x00, or 0xfe when it ends a result set
/// under `CLIENT_DEPRECATE_EOF`). Fields after the status are ignored.
fn parse_ok(payload: &[u8]) -> Result<OkPacket, ProtoError> {
    let mut c = Cursor::new(payload, "OK packet");
    let header = c.u8()?;
    if header != 0x00 && header != 0xfe {
        return Err(ProtoError::Unexpected {
            what: "instead of OK",
            byte: header,
        });
    }
    let affected_rows = c.lenenc()?.unwrap_or(0);
    let _last_insert_id = c.lenenc()?;
    let status = c.u16()?;
    Ok(OkPacket {
        affected_rows,
        status,
    })
}

// ---------------------------------------------------------------------------
// Greeting

/// The initial handshake packet (protocol version 10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// As sent; MariaDB prefixes `5.5.5-` for old clients (see
    /// [`Greeting::display_version`]).
    pub server_version: String,
    pub connection_id: u32,
    pub capabilities: u32,
    pub charset: u8,
    pub status: u16,
    /// The auth seed: part 1 (8 bytes) + part 2 (12 bytes for
    /// mysql_native_password), without the trailing NUL.
    pub scramble: Vec<u8>,
    /// `None` when the server does not offer `CLIENT_PLUGIN_AUTH`.
    pub auth_plugin: Option<String>,
}

impl Greeting {
    /// The version without MariaDB's `5.5.5-` replication-compatibility
    /// prefix.
    pub fn display_version(&self) -> &str {
        self.server_version
            .strip_prefix("5.5.5-")
            .filter(|v| v.contains("MariaDB"))
            .unwrap_or(&self.server_version)
    }
}

/// What a server says first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    Greeting(Greeting),
    /// The server refuses before any handshake: 1040 Too many connections,
    /// 1129 host blocked by `max_connect_errors`, 1130 host not allowed.
    Error(ErrPacket),
}

/// Parses the first packet a server sends.
pub fn parse_hello(payload: &[u8]) -> Result<Hello, ProtoError> {
    match payload.first() {
        None => Err(ProtoError::Empty("the server greeting")),
        Some(0xff) => parse_err(payload).map(Hello::Error),
        Some(10) => parse_greeting(payload).map(Hello::Greeting),
        Some(&v) => Err(ProtoError::Version(v)),
    }
}

fn parse_greeting(payload: &[u8]) -> Result<Greeting, ProtoError> {
    let mut c = Cursor::new(payload, "server greeting");
    let _protocol = c.u8()?;
    let server_version = lossy(c.cstr().ok_or(ProtoError::Truncated("server version"))?);
    let connection_id = c.u32()?;
    let mut scramble = c.take(8)?.to_vec();
    let _filler = c.u8()?;
    let mut capabilities = u32::from(c.u16()?);
    let mut charset = 0;
    let mut status = 0;
    let mut auth_plugin = None;
    // A pre-4.1 server may stop here.
    if c.remaining() > 0 {
        charset = c.u8()?;
        status = c.u16()?;
        capabilities |= u32::from(c.u16()?) << 16;
        let auth_data_len = c.u8()?;
        // 10 reserved bytes (MariaDB puts its extended capabilities in the
        // last 4; a check needs none of them).
        c.take(10)?;
        if capabilities & caps::SECURE_CONNECTION != 0 {
            // Part 2 is max(13, auth_data_len - 8) bytes, NUL included.
            let part2_len = usize::from(auth_data_len).saturating_sub(8).max(13);
            let part2 = c.take(part2_len.min(c.remaining()))?;
            // Drop the trailing NUL and anything past the 20-byte seed.
            let part2 = match part2.iter().position(|&b| b == 0) {
                Some(nul) => &part2[..nul],
                None => part2,
            };
            scramble.extend_from_slice(&part2[..part2.len().min(12)]);
        }
        if capabilities & caps::PLUGIN_AUTH != 0 {
            // Some 5.5 servers omit the final NUL.
            let name = match c.cstr() {
                Some(name) => name,
                None => c.rest(),
            };
            auth_plugin = Some(lossy(name));
        }
    }
    Ok(Greeting {
        server_version,
        connection_id,
        capabilities,
        charset,
        status,
        scramble,
        auth_plugin,
    })
}

// ---------------------------------------------------------------------------
// Authentication

/// `mysql_native_password`: `SHA1(password) XOR SHA1(seed + SHA1(SHA1(password)))`,
/// with the 20-byte seed. An empty password gives an empty response.
pub fn scramble_native_password(password: &[u8], seed: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let seed = &seed[..seed.len().min(20)];
    let stage1 = Sha1::digest(password);
    let stage2 = Sha1::digest(stage1.as_slice());
    let mut hasher = Sha1::new();
    hasher.update(seed);
    hasher.update(stage2.as_slice());
    let mix = hasher.finalize();
    stage1.iter().zip(mix.iter()).map(|(a, b)| a ^ b).collect()
}

/// The capability flags a check uses with a server offering `server`.
/// `PROTOCOL_41` and `SECURE_CONNECTION` are required (every server since
/// MySQL 4.1 has them).
pub fn client_capabilities(server: u32) -> Result<u32, ProtoError> {
    if server & caps::PROTOCOL_41 == 0 {
        return Err(ProtoError::Capability("CLIENT_PROTOCOL_41"));
    }
    if server & caps::SECURE_CONNECTION == 0 {
        return Err(ProtoError::Capability("CLIENT_SECURE_CONNECTION"));
    }
    Ok(caps::WANTED & server)
}

/// HandshakeResponse41 logging in as `user` with `mysql_native_password`.
/// `caps` comes from [`client_capabilities`].
pub fn handshake_response(caps: u32, user: &str, password: &str, seed: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if user.as_bytes().contains(&0) {
        return Err(ProtoError::Nul("the user name"));
    }
    let auth = scramble_native_password(password.as_bytes(), seed);
    let mut out = Vec::with_capacity(64 + user.len());
    out.extend_from_slice(&caps.to_le_bytes());
    out.extend_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
    out.push(CHARSET_UTF8_GENERAL_CI);
    out.extend_from_slice(&[0; 23]);
    out.extend_from_slice(user.as_bytes());
    out.push(0);
    // A SHA1 response is 20 bytes: the 1-byte length of SECURE_CONNECTION
    // always fits.
    out.push(auth.len() as u8);
    out.extend_from_slice(&auth);
    if caps & caps::PLUGIN_AUTH != 0 {
        out.extend_from_slice(NATIVE_PASSWORD.as_bytes());
        out.push(0);
    }
    Ok(out)
}

/// The server's answer to a HandshakeResponse (or to an auth-switch reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthReply {
    Ok,
    Err(ErrPacket),
    /// AuthSwitchRequest: answer with the plugin's response to `seed`.
    Switch {
        plugin: String,
        seed: Vec<u8>,
    },
    /// The pre-4.1 `mysql_old_password` switch (a lone 0xfe).
    OldPasswordSwitch,
    /// AuthMoreData (0x01), e.g. `caching_sha2_password` steps.
    MoreData(Vec<u8>),
}

/// Parses what follows a HandshakeResponse.
pub fn parse_auth_reply(payload: &[u8]) -> Result<AuthReply, ProtoError> {
    match payload.first() {
        None => Err(ProtoError::Empty("the authentication result")),
        Some(0x00) => parse_ok(payload).map(|_| AuthReply::Ok),
        Some(0xff) => parse_err(payload).map(AuthReply::Err),
        Some(0x01) => Ok(AuthReply::MoreData(payload[1..].to_vec())),
        Some(0xfe) if payload.len() == 1 => Ok(AuthReply::OldPasswordSwitch),
        Some(0xfe) => {
            let mut c = Cursor::new(&payload[1..], "auth switch request");
            let plugin = match c.cstr() {
                Some(name) => lossy(name),
                None => lossy(c.rest()),
            };
            let mut seed = c.rest();
            if let Some((&0, head)) = seed.split_last() {
                seed = head;
            }
            Ok(AuthReply::Switch {
                plugin,
                seed: seed.to_vec(),
            })
        }
        Some(&byte) => Err(ProtoError::Unexpected {
            what: "after the handshake response",
            byte,
        }),
    }
}

// ---------------------------------------------------------------------------
// Commands

/// COM_QUERY payload.
pub fn com_query(sql: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + sql.len());
    out.push(COM_QUERY);
    out.extend_from_slice(sql.as_bytes());
    out
}

/// COM_QUIT payload: the server closes the connection without counting it
/// in `Aborted_clients`.
pub fn com_quit() -> [u8; 1] {
    [COM_QUIT]
}

// ---------------------------------------------------------------------------
// Text result sets

/// A text-protocol result set; values are text, `None` is SQL NULL.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

/// What a COM_QUERY produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryOutcome {
    Rows(ResultSet),
    /// A statement without a result set.
    Ok(OkPacket),
    Err(ErrPacket),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RsState {
    /// Waiting for the first packet: column count, OK or ERR.
    Start,
    /// Reading column definitions; `left` more to come.
    Columns {
        left: usize,
    },
    /// The EOF after the column definitions (without DEPRECATE_EOF).
    ColumnsEof,
    Rows,
    Done,
}

/// Reads the response to one COM_QUERY, one packet at a time:
/// `feed` returns `Some` once the response is complete.
#[derive(Debug, Clone)]
pub struct ResultReader {
    deprecate_eof: bool,
    state: RsState,
    set: ResultSet,
}

impl ResultReader {
    /// `caps` are the capability flags the connection uses.
    pub fn new(caps: u32) -> Self {
        ResultReader {
            deprecate_eof: caps & caps::DEPRECATE_EOF != 0,
            state: RsState::Start,
            set: ResultSet::default(),
        }
    }

    /// Takes the payload of the next packet of the response.
    pub fn feed(&mut self, payload: &[u8]) -> Result<Option<QueryOutcome>, ProtoError> {
        let first = *payload.first().ok_or(ProtoError::Empty("a query response"))?;
        match self.state {
            RsState::Start => match first {
                0x00 => {
                    self.state = RsState::Done;
                    parse_ok(payload).map(|ok| Some(QueryOutcome::Ok(ok)))
                }
                0xff => {
                    self.state = RsState::Done;
                    parse_err(payload).map(|e| Some(QueryOutcome::Err(e)))
                }
                // LOCAL INFILE request: never asked for, never answered.
                0xfb => Err(ProtoError::Unexpected {
                    what: "LOCAL INFILE request",
                    byte: first,
                }),
                _ => {
                    let mut c = Cursor::new(payload, "column count");
                    let n = c.lenenc()?.ok_or(ProtoError::Unexpected {
                        what: "NULL column count",
                        byte: first,
                    })?;
                    if n == 0 || n > MAX_COLUMNS as u64 {
                        return Err(ProtoError::Columns(n));
                    }
                    self.state = RsState::Columns { left: n as usize };
                    Ok(None)
                }
            },
            RsState::Columns { left } => {
                if first == 0xff {
                    return self.fail(payload);
                }
                self.set.columns.push(parse_column_name(payload)?);
                self.state = match (left - 1, self.deprecate_eof) {
                    (0, true) => RsState::Rows,
                    (0, false) => RsState::ColumnsEof,
                    (left, _) => RsState::Columns { left },
                };
                Ok(None)
            }
            RsState::ColumnsEof => {
                if !is_terminator(payload) {
                    return Err(ProtoError::Unexpected {
                        what: "instead of EOF after column definitions",
                        byte: first,
                    });
                }
                self.state = RsState::Rows;
                Ok(None)
            }
            RsState::Rows => {
                if first == 0xff {
                    return self.fail(payload);
                }
                if is_terminator(payload) {
                    self.state = RsState::Done;
                    return Ok(Some(QueryOutcome::Rows(std::mem::take(&mut self.set))));
                }
                if self.set.rows.len() >= MAX_ROWS {
                    return Err(ProtoError::Rows);
                }
                let row = parse_text_row(payload, self.set.columns.len())?;
                self.set.rows.push(row);
                Ok(None)
            }
            RsState::Done => Err(ProtoError::Unexpected {
                what: "after the end of the response",
                byte: first,
            }),
        }
    }

    /// An ERR in the middle of a result set ends the response.
    fn fail(&mut self, payload: &[u8]) -> Result<Option<QueryOutcome>, ProtoError> {
        self.state = RsState::Done;
        parse_err(payload).map(|e| Some(QueryOutcome::Err(e)))
    }
}

/// EOF packet (0xfe, < 9 bytes) or, under DEPRECATE_EOF, the OK packet
/// with header 0xfe that replaces it. A row cannot look like this: a row
/// starting with 0xfe carries an 8-byte length, so it has >= 9 bytes.
fn is_terminator(payload: &[u8]) -> bool {
    payload.first() == Some(&0xfe) && payload.len() < 9
}

/// Column definition (Protocol::ColumnDefinition41): the check needs only
/// the name (`catalog, schema, table, org_table, name, ...`).
fn parse_column_name(payload: &[u8]) -> Result<String, ProtoError> {
    let mut c = Cursor::new(payload, "column definition");
    for _ in 0..4 {
        c.lenenc_bytes()?;
    }
    let name = c.lenenc_bytes()?.ok_or(ProtoError::Truncated("column name"))?;
    Ok(lossy(name))
}

fn parse_text_row(payload: &[u8], columns: usize) -> Result<Vec<Option<String>>, ProtoError> {
    let mut c = Cursor::new(payload, "result row");
    let mut row = Vec::with_capacity(columns);
    while c.remaining() > 0 {
        if row.len() == columns {
            return Err(ProtoError::RowWidth {
                got: row.len() + 1,
                expected: columns,
            });
        }
        row.push(c.lenenc_bytes()?.map(lossy));
    }
    if row.len() != columns {
        return Err(ProtoError::RowWidth {
            got: row.len(),
            expected: columns,
        });
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A greeting as MariaDB 10.11 sends it (captured, scramble replaced).
    fn mariadb_greeting(seed: &[u8; 20]) -> Vec<u8> {
        let mut p = vec![10];
        p.extend_from_slice(b"5.5.5-10.11.19-MariaDB-0+deb12u1\0");
        p.extend_from_slice(&7u32.to_le_bytes());
        p.extend_from_slice(&seed[..8]);
        p.push(0);
        p.extend_from_slice(&0xf7feu16.to_le_bytes());
        p.push(8);
        p.extend_from_slice(&2u16.to_le_bytes());
        p.extend_from_slice(&0x81ffu16.to_le_bytes());
        p.push(21);
        p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0x1d, 0, 0, 0]);
        p.extend_from_slice(&seed[8..]);
        p.push(0);
        p.extend_from_slice(b"mysql_native_password\0");
        p
    }

    const SEED: [u8; 20] = *b"abcdefghijklmnopqrst";

    #[test]
    fn frame_and_split_round_trip() {
        let framed = frame(3, b"hello").unwrap();
        assert_eq!(framed, b"\x05\x00\x00\x03hello");
        let mut buf = framed.clone();
        buf.extend_from_slice(b"\x01\x00");
        let p = split_packet(&buf).unwrap().unwrap();
        assert_eq!((p.seq, p.payload, p.len), (3, &b"hello"[..], 9));
        assert_eq!(split_packet(&buf[9..]).unwrap(), None);
        assert_eq!(split_packet(&framed[..8]).unwrap(), None);
        assert_eq!(split_packet(b"").unwrap(), None);
        let empty = split_packet(b"\0\0\0\x07").unwrap().unwrap();
        assert_eq!((empty.seq, empty.payload.len(), empty.len), (7, 0, 4));
    }

    #[test]
    fn oversized_packets_are_refused() {
        assert_eq!(
            split_packet(b"\xff\xff\xff\x00"),
            Err(ProtoError::TooLarge(0xff_ffff))
        );
        assert!(frame(0, &vec![0; MAX_PAYLOAD + 1]).is_err());
    }

    #[test]
    fn parses_a_mariadb_greeting() {
        let Hello::Greeting(g) = parse_hello(&mariadb_greeting(&SEED)).unwrap() else {
            panic!("not a greeting");
        };
        assert_eq!(g.server_version, "5.5.5-10.11.19-MariaDB-0+deb12u1");
        assert_eq!(g.display_version(), "10.11.19-MariaDB-0+deb12u1");
        assert_eq!(g.connection_id, 7);
        assert_eq!(g.scramble, SEED);
        assert_eq!(g.auth_plugin.as_deref(), Some(NATIVE_PASSWORD));
        assert_ne!(g.capabilities & caps::PLUGIN_AUTH, 0);
        assert_ne!(g.capabilities & caps::DEPRECATE_EOF, 0);
        assert_eq!(g.charset, 8);
    }

    #[test]
    fn greeting_without_final_nul_in_plugin_name() {
        let mut p = mariadb_greeting(&SEED);
        p.pop();
        let Hello::Greeting(g) = parse_hello(&p).unwrap() else {
            panic!()
        };
        assert_eq!(g.auth_plugin.as_deref(), Some(NATIVE_PASSWORD));
    }

    #[test]
    fn parses_errors_before_the_handshake() {
        let mut p = vec![0xff];
        p.extend_from_slice(&1040u16.to_le_bytes());
        p.extend_from_slice(b"Too many connections");
        let Hello::Error(e) = parse_hello(&p).unwrap() else {
            panic!()
        };
        assert_eq!(e.code, codes::TOO_MANY_CONNECTIONS);
        assert_eq!(e.sql_state, None);
        assert_eq!(e.to_string(), "error 1040: Too many connections");

        let mut p = vec![0xff];
        p.extend_from_slice(&1129u16.to_le_bytes());
        p.extend_from_slice(b"#HY000Host '10.0.0.1' is blocked because of many connection errors");
        let e = parse_err(&p).unwrap();
        assert_eq!(e.code, codes::HOST_BLOCKED);
        assert_eq!(e.sql_state.as_deref(), Some("HY000"));
        assert!(e.message.starts_with("Host '10.0.0.1'"));
    }

    #[test]
    fn unsupported_protocol_versions() {
        assert_eq!(parse_hello(&[9, b'x', 0]), Err(ProtoError::Version(9)));
        assert_eq!(parse_hello(&[]), Err(ProtoError::Empty("the server greeting")));
    }

    #[test]
    fn native_password_scramble_matches_known_vector() {
        // Computed independently (Python hashlib): password "secret",
        // seed "abcdefghijklmnopqrst".
        let got = scramble_native_password(b"secret", &SEED);
        assert_eq!(
            got.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "8817c50fa779daef010ee7577825b0847df9842e"
        );
        assert!(scramble_native_password(b"", &SEED).is_empty());
    }

    #[test]
    fn builds_a_handshake_response() {
        let caps = client_capabilities(0x81ff_f7fe).unwrap();
        assert_ne!(caps & caps::DEPRECATE_EOF, 0);
        assert_eq!(caps & caps::CONNECT_WITH_DB, 0);
        let p = handshake_response(caps, "check", "secret", &SEED).unwrap();
        assert_eq!(&p[..4], &caps.to_le_bytes());
        assert_eq!(p[8], CHARSET_UTF8_GENERAL_CI);
        assert_eq!(&p[9..32], &[0; 23]);
        assert_eq!(&p[32..38], b"check\0");
        assert_eq!(p[38], 20);
        assert_eq!(&p[39..59], &scramble_native_password(b"secret", &SEED)[..]);
        assert_eq!(&p[59..], b"mysql_native_password\0");

        let p = handshake_response(caps & !caps::PLUGIN_AUTH, "u", "", &SEED).unwrap();
        assert_eq!(&p[32..], b"u\0\0");
        assert!(handshake_response(caps, "a\0b", "", &SEED).is_err());
    }

    #[test]
    fn old_servers_are_refused() {
        assert_eq!(
            client_capabilities(caps::SECURE_CONNECTION),
            Err(ProtoError::Capability("CLIENT_PROTOCOL_41"))
        );
        assert_eq!(
            client_capabilities(caps::PROTOCOL_41),
            Err(ProtoError::Capability("CLIENT_SECURE_CONNECTION"))
        );
        // Without DEPRECATE_EOF on the server, the client does not ask for it.
        let c = client_capabilities(caps::PROTOCOL_41 | caps::SECURE_CONNECTION).unwrap();
        assert_eq!(c, caps::PROTOCOL_41 | caps::SECURE_CONNECTION);
    }

    #[test]
    fn auth_replies() {
        assert_eq!(
            parse_auth_reply(b"\x00\x00\x00\x02\x00\x00\x00"),
            Ok(AuthReply::Ok)
        );
        let mut denied = vec![0xff];
        denied.extend_from_slice(&1045u16.to_le_bytes());
        denied.extend_from_slice(b"#28000Access denied for user 'x'@'localhost' (using password: YES)");
        let Ok(AuthReply::Err(e)) = parse_auth_reply(&denied) else {
            panic!()
        };
        assert_eq!(e.code, codes::ACCESS_DENIED);
        assert_eq!(e.sql_state.as_deref(), Some("28000"));

        let mut switch = vec![0xfe];
        switch.extend_from_slice(b"mysql_native_password\0");
        switch.extend_from_slice(&SEED);
        switch.push(0);
        assert_eq!(
            parse_auth_reply(&switch),
            Ok(AuthReply::Switch {
                plugin: NATIVE_PASSWORD.into(),
                seed: SEED.to_vec()
            })
        );
        assert_eq!(parse_auth_reply(&[0xfe]), Ok(AuthReply::OldPasswordSwitch));
        assert_eq!(parse_auth_reply(b"\x01\x04"), Ok(AuthReply::MoreData(vec![4])));
        assert!(parse_auth_reply(b"\x07").is_err());
        assert!(parse_auth_reply(b"").is_err());
        let Ok(AuthReply::Switch { plugin, seed }) = parse_auth_reply(b"\xfeclient_ed25519") else {
            panic!()
        };
        assert_eq!((plugin.as_str(), seed.len()), ("client_ed25519", 0));
    }

    #[test]
    fn commands() {
        assert_eq!(com_query("SELECT 1"), b"\x03SELECT 1");
        assert_eq!(com_quit(), [1]);
    }

    fn lenenc_str(s: &[u8]) -> Vec<u8> {
        let mut v = vec![s.len() as u8];
        v.extend_from_slice(s);
        v
    }

    fn column_def(name: &str) -> Vec<u8> {
        let mut p = Vec::new();
        for part in [&b"def"[..], b"", b"", b""] {
            p.extend(lenenc_str(part));
        }
        p.extend(lenenc_str(name.as_bytes()));
        p.extend(lenenc_str(name.as_bytes()));
        p.extend_from_slice(&[0x0c, 8, 0, 0, 1, 0, 0, 0xfd, 1, 0, 0x27, 0, 0]);
        p
    }

    fn row(values: &[Option<&str>]) -> Vec<u8> {
        let mut p = Vec::new();
        for v in values {
            match v {
                Some(s) => p.extend(lenenc_str(s.as_bytes())),
                None => p.push(0xfb),
            }
        }
        p
    }

    const EOF: &[u8] = b"\xfe\x00\x00\x02\x00";
    const OK_EOF: &[u8] = b"\xfe\x00\x00\x02\x00\x00\x00";

    fn feed_all(reader: &mut ResultReader, packets: &[Vec<u8>]) -> Result<QueryOutcome, ProtoError> {
        for (i, p) in packets.iter().enumerate() {
            if let Some(out) = reader.feed(p)? {
                assert_eq!(i, packets.len() - 1, "finished early");
                return Ok(out);
            }
        }
        panic!("not finished");
    }

    fn status_rows() -> Vec<Vec<u8>> {
        vec![
            row(&[Some("wsrep_local_state"), Some("4")]),
            row(&[Some("wsrep_ready"), None]),
        ]
    }

    #[test]
    fn result_set_with_eof_packets() {
        let mut packets = vec![
            vec![2],
            column_def("Variable_name"),
            column_def("Value"),
            EOF.to_vec(),
        ];
        packets.extend(status_rows());
        packets.push(EOF.to_vec());
        let QueryOutcome::Rows(set) = feed_all(&mut ResultReader::new(caps::PROTOCOL_41), &packets).unwrap()
        else {
            panic!()
        };
        assert_eq!(set.columns, ["Variable_name", "Value"]);
        assert_eq!(
            set.rows,
            [
                vec![Some("wsrep_local_state".to_string()), Some("4".to_string())],
                vec![Some("wsrep_ready".to_string()), None],
            ]
        );
    }

    #[test]
    fn result_set_with_deprecate_eof() {
        let mut packets = vec![vec![2], column_def("Variable_name"), column_def("Value")];
        packets.extend(status_rows());
        packets.push(OK_EOF.to_vec());
        let reader = &mut ResultReader::new(caps::PROTOCOL_41 | caps::DEPRECATE_EOF);
        let QueryOutcome::Rows(set) = feed_all(reader, &packets).unwrap() else {
            panic!()
        };
        assert_eq!(set.rows.len(), 2);
        // Nothing may follow the end.
        assert!(reader.feed(OK_EOF).is_err());
    }

    #[test]
    fn empty_result_set() {
        let packets = vec![vec![1], column_def("Value"), OK_EOF.to_vec()];
        let reader = &mut ResultReader::new(caps::DEPRECATE_EOF);
        assert_eq!(
            feed_all(reader, &packets).unwrap(),
            QueryOutcome::Rows(ResultSet {
                columns: vec!["Value".into()],
                rows: vec![]
            })
        );
    }

    #[test]
    fn query_errors_and_ok() {
        let mut err = vec![0xff];
        err.extend_from_slice(&1047u16.to_le_bytes());
        err.extend_from_slice(b"#08S01WSREP has not yet prepared node for application use");
        let Ok(Some(QueryOutcome::Err(e))) = ResultReader::new(0).feed(&err) else {
            panic!()
        };
        assert_eq!(e.code, codes::UNKNOWN_COM);
        assert_eq!(
            ResultReader::new(0).feed(b"\x00\x03\x00\x02\x00\x00\x00"),
            Ok(Some(QueryOutcome::Ok(OkPacket {
                affected_rows: 3,
                status: 2
            })))
        );
        // An ERR in the middle of the rows ends the response.
        let reader = &mut ResultReader::new(caps::DEPRECATE_EOF);
        reader.feed(&[1]).unwrap();
        reader.feed(&column_def("x")).unwrap();
        assert!(matches!(reader.feed(&err), Ok(Some(QueryOutcome::Err(_)))));
    }

    #[test]
    fn a_long_row_starting_with_0xfe_is_a_row() {
        // 0xfe + 8-byte length: a value of 251+ bytes cannot start that
        // way in practice, but a 9-byte packet must not end the set.
        let mut value = vec![0xfe];
        value.extend_from_slice(&3u64.to_le_bytes());
        value.extend_from_slice(b"abc");
        let reader = &mut ResultReader::new(caps::DEPRECATE_EOF);
        reader.feed(&[1]).unwrap();
        reader.feed(&column_def("x")).unwrap();
        assert_eq!(reader.feed(&value), Ok(None));
        let Ok(Some(QueryOutcome::Rows(set))) = reader.feed(OK_EOF) else {
            panic!()
        };
        assert_eq!(set.rows, [vec![Some("abc".to_string())]]);
    }

    #[test]
    fn hostile_result_sets() {
        let deprecate = caps::DEPRECATE_EOF;
        // Absurd column counts.
        assert!(ResultReader::new(deprecate)
            .feed(b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff")
            .is_err());
        assert!(ResultReader::new(deprecate).feed(b"\xfc\x00\x10").is_err());
        assert!(ResultReader::new(deprecate).feed(&[0xfb]).is_err());
        // A value length past the end of the packet.
        let reader = &mut ResultReader::new(deprecate);
        reader.feed(&[1]).unwrap();
        reader.feed(&column_def("x")).unwrap();
        assert!(reader.feed(b"\xfd\xff\xff\xff").is_err());
        assert!(reader.clone().feed(b"\x05ab").is_err());
        // Too many and too few values.
        assert!(reader.clone().feed(&row(&[Some("a"), Some("b")])).is_err());
        // A truncated column definition.
        let reader = &mut ResultReader::new(deprecate);
        reader.feed(&[1]).unwrap();
        assert!(reader.feed(b"\x03de").is_err());
        // Endless rows.
        let reader = &mut ResultReader::new(deprecate);
        reader.feed(&[1]).unwrap();
        reader.feed(&column_def("x")).unwrap();
        for _ in 0..MAX_ROWS {
            reader.feed(&row(&[Some("a")])).unwrap();
        }
        assert_eq!(reader.feed(&row(&[Some("a")])), Err(ProtoError::Rows));
    }

    /// Every prefix and every single-byte corruption of valid packets must
    /// parse or fail cleanly, never panic.
    #[test]
    fn no_panics_on_truncated_or_corrupted_input() {
        let mut samples = vec![
            mariadb_greeting(&SEED),
            column_def("Variable_name"),
            OK_EOF.to_vec(),
        ];
        let mut switch = vec![0xfe];
        switch.extend_from_slice(b"mysql_native_password\0");
        switch.extend_from_slice(&SEED);
        samples.push(switch);
        samples.push(b"\xff\x15\x04#28000Access denied".to_vec());
        samples.push(row(&[Some("wsrep_local_state"), Some("4")]));
        for sample in &samples {
            for end in 0..=sample.len() {
                let mut cases = vec![sample[..end].to_vec()];
                for i in 0..end {
                    for byte in [0x00, 0x01, 0x0a, 0xfb, 0xfc, 0xfd, 0xfe, 0xff] {
                        let mut c = sample[..end].to_vec();
                        c[i] = byte;
                        cases.push(c);
                    }
                }
                for case in cases {
                    let _ = parse_hello(&case);
                    let _ = parse_err(&case);
                    let _ = parse_auth_reply(&case);
                    let _ = split_packet(&case);
                    for caps in [0, caps::DEPRECATE_EOF] {
                        let mut r = ResultReader::new(caps);
                        let _ = r.feed(&case);
                        let mut r = ResultReader::new(caps);
                        let _ = r.feed(&[1]);
                        let _ = r.feed(&case);
                        let _ = r.feed(&case);
                    }
                }
            }
        }
    }
}
