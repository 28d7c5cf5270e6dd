//! The penctl control port, Pen's wire protocol: a client connects, writes
//! one command line, gets the reply text and the connection closes.
//!
//! Unlike Pen, which reads the command with a blocking recv on its only
//! thread (so a silent client freezes all traffic), every control client
//! here is its own task with read and write deadlines, on the control
//! thread, away from the data plane, and at most [`CLIENTS_MAX`] at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::config::Endpoint;

/// Pen reads at most this much of a command (one recv of 4095 bytes).
const COMMAND_MAX: usize = 4095;
/// How long a client may take to send its command line.
const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long a host name a command names may take to resolve.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a client may take to read its reply.
const WRITE_DEADLINE: Duration = Duration::from_secs(5);
/// Control (and, apart, metrics) clients served at once; more are closed at
/// once, so that a flood of idle connections cannot take the descriptors
/// the data plane needs.
const CLIENTS_MAX: usize = 64;

/// What the control port and the metrics endpoint ask of the control loop,
/// which alone owns the state.
pub enum ControlRequest {
    /// A command line from a control client.
    Command {
        line: String,
        /// The client's address (None for a Unix socket client).
        peer: Option<IpAddr>,
        /// The host names the command names, already looked up.
        resolved: HashMap<String, Option<IpAddr>>,
        /// Where the reply goes; `None` closes without a reply (ACL denial).
        reply: oneshot::Sender<Option<String>>,
    },
    /// Whether `control_acl` lets this client in, asked at accept.
    Permitted {
        peer: IpAddr,
        reply: oneshot::Sender<bool>,
    },
    /// The Prometheus text for `GET /metrics`.
    Metrics { reply: oneshot::Sender<String> },
}

/// A bound control socket, made before privileges are dropped.
pub enum ControlSocket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl ControlSocket {
    pub fn bind(addr: &Endpoint) -> anyhow::Result<Self> {
        let fd: OwnedFd = crate::dataplane::listener::bind(addr, 16).with_context(|| format!("-C {addr}"))?;
        Ok(match addr {
            Endpoint::Inet(_) => ControlSocket::Tcp(fd.into()),
            Endpoint::Unix(_) => ControlSocket::Unix(fd.into()),
        })
    }
}

/// Accepts control clients forever, one task each.
pub async fn serve(socket: ControlSocket, requests: mpsc::Sender<ControlRequest>) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(CLIENTS_MAX));
    match socket {
        ControlSocket::Tcp(std) => {
            std.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(std)?;
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let ip = crate::dataplane::canonical_ip(peer.ip());
                        // Before it takes a slot: a denied host must not be
                        // able to crowd out the permitted ones. Pen closes
                        // it without a word.
                        if permitted(&requests, ip).await {
                            spawn_bounded(&slots, client(stream, Some(ip), requests.clone()));
                        }
                    }
                    Err(e) => pause_after_accept_error(e).await,
                }
            }
        }
        ControlSocket::Unix(std) => {
            std.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(std)?;
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        spawn_bounded(&slots, client(stream, None, requests.clone()));
                    }
                    Err(e) => pause_after_accept_error(e).await,
                }
            }
        }
    }
}

/// Whether `control_acl` lets `peer` in, as the control loop sees it now.
async fn permitted(requests: &mpsc::Sender<ControlRequest>, peer: IpAddr) -> bool {
    let (reply, answer) = oneshot::channel();
    let asked = ControlRequest::Permitted { peer, reply };
    requests.send(asked).await.is_ok() && answer.await == Ok(true)
}

/// Runs a client's task if fewer than [`CLIENTS_MAX`] are running; else
/// drops it, which closes its connection.
fn spawn_bounded(slots: &Arc<Semaphore>, task: impl std::future::Future<Output = ()> + 'static) {
    match slots.clone().try_acquire_owned() {
        Ok(slot) => {
            tokio_uring::spawn(async move {
                task.await;
                drop(slot);
            });
        }
        Err(_) => tracing::debug!("control thread: {CLIENTS_MAX} clients already, closing another"),
    }
}

/// Out of descriptors, say: wait a little instead of spinning.
async fn pause_after_accept_error(e: std::io::Error) {
    tracing::warn!("control port: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// One control client: read one line (bounded in size and time), have the
/// control loop run it, write the reply, close.
async fn client<S>(mut stream: S, peer: Option<IpAddr>, requests: mpsc::Sender<ControlRequest>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(Some(line)) = tokio::time::timeout(READ_DEADLINE, read_command(&mut stream)).await else {
        return; // silent, too slow or gone: drop it, nothing else waits
    };
    let Some(line) = line else {
        // A path in other bytes would silently become another path.
        let reply = "the command is not valid UTF-8\n";
        let _ = tokio::time::timeout(WRITE_DEADLINE, stream.write_all(reply.as_bytes())).await;
        let _ = tokio::time::timeout(WRITE_DEADLINE, stream.shutdown()).await;
        return;
    };
    let resolved = resolve_ahead(&line).await;
    let (reply, answer) = oneshot::channel();
    if requests
        .send(ControlRequest::Command {
            line,
            peer,
            resolved,
            reply,
        })
        .await
        .is_err()
    {
        return;
    }
    if let Ok(Some(text)) = answer.await {
        let _ = tokio::time::timeout(WRITE_DEADLINE, stream.write_all(text.as_bytes())).await;
    }
    let _ = tokio::time::timeout(WRITE_DEADLINE, stream.shutdown()).await;
}

/// Looks up the host names the command names on tokio's blocking pool, so
/// that a slow resolver delays only this client, never the control thread
/// (health checks, metrics, other clients).
/// Only clients `control_acl` permitted at accept get this far.
async fn resolve_ahead(line: &str) -> HashMap<String, Option<IpAddr>> {
    let mut resolved = HashMap::new();
    let Ok(command) = super::command::parse(line) else {
        return resolved;
    };
    for name in command.host_names() {
        let answer = tokio::time::timeout(RESOLVE_DEADLINE, tokio::net::lookup_host((name, 0))).await;
        let ip = match answer {
            Ok(Ok(mut addresses)) => addresses.next().map(|a| a.ip()),
            _ => None,
        };
        resolved.insert(name.to_owned(), ip);
    }
    resolved
}

/// Reads until a newline, EOF or `COMMAND_MAX` bytes: penctl sends the
/// whole line in one write, but a line split over several segments still
/// arrives whole here (Pen would truncate it). `Some(None)`: the command
/// line is not UTF-8.
async fn read_command<S: AsyncRead + Unpin>(stream: &mut S) -> Option<Option<String>> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    while buf.len() < COMMAND_MAX && !buf.contains(&b'\n') {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.truncate(COMMAND_MAX);
    if buf.is_empty() {
        return None;
    }
    let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
    // What follows the line is never read, and the cut at COMMAND_MAX may
    // split a character: only the line itself must be UTF-8.
    Some(
        std::str::from_utf8(&buf[..line_end])
            .is_ok()
            .then(|| String::from_utf8_lossy(&buf).into_owned()),
    )
}

/// How much of an HTTP request head the metrics endpoint reads.
const HTTP_HEAD_MAX: usize = 8192;

/// `--metrics`: answers `GET /metrics` with the Prometheus text, one
/// request per connection (`Connection: close`).
pub async fn serve_metrics(
    listener: std::net::TcpListener,
    requests: mpsc::Sender<ControlRequest>,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(CLIENTS_MAX));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_bounded(&slots, scrape(stream, requests.clone())),
            Err(e) => pause_after_accept_error(e).await,
        }
    }
}

async fn scrape(mut stream: tokio::net::TcpStream, requests: mpsc::Sender<ControlRequest>) {
    let head = tokio::time::timeout(READ_DEADLINE, async {
        let mut head = Vec::with_capacity(512);
        let mut chunk = [0u8; 1024];
        // The head ends at a blank line, CRLF or (as `respond` accepts) bare LF.
        let ended =
            |head: &[u8]| head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n");
        while head.len() < HTTP_HEAD_MAX && !ended(&head) {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        head
    })
    .await;
    let Ok(head) = head else { return };
    let (reply, answer) = oneshot::channel();
    let body = if head.starts_with(b"GET ") && requests.send(ControlRequest::Metrics { reply }).await.is_ok()
    {
        answer.await.unwrap_or_default()
    } else {
        String::new()
    };
    let response = super::metrics::respond(&head, || body);
    let _ = tokio::time::timeout(WRITE_DEADLINE, async {
        let _ = stream.write_all(&response).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
