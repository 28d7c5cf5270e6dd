//! `-l`: Pen's access log, one line per chunk read from a client.
//!
//! File format (Pen's `log_request`): `client_ip unix_time server_ip first_bytes\n`,
//! where `first_bytes` is at most 100 bytes of the chunk, cut at the first CR
//! or LF, with bytes >= 0x80 shown as `.`.
//! Network format (`-l host:port`, one UDP datagram per line):
//! `+ client_ip server_ip request\n`, the request cut at CR/LF, at most 1 KiB
//! per datagram.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::config::LogTarget;

/// Longest request excerpt in a file log line (Pen's `KEEP_MAX`).
const FILE_EXCERPT_MAX: usize = 100;
/// Longest network log datagram.
const NET_LINE_MAX: usize = 1024;

/// Appends one file-format line to `out`.
pub fn format_file_line(out: &mut Vec<u8>, client: &str, unix_time: u64, server: &str, chunk: &[u8]) {
    let _ = write!(out, "{client} {unix_time} {server} ");
    for &b in chunk.iter().take(FILE_EXCERPT_MAX) {
        if b == b'\r' || b == b'\n' {
            break;
        }
        out.push(if b >= 0x80 { b'.' } else { b });
    }
    out.push(b'\n');
}

/// Appends one network-format line to `out`.
pub fn format_net_line(out: &mut Vec<u8>, client: &str, server: &str, chunk: &[u8]) {
    let _ = write!(out, "+ {client} {server} ");
    let room = NET_LINE_MAX.saturating_sub(out.len() + 1);
    let end = chunk
        .iter()
        .take(room)
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(room.min(chunk.len()));
    out.extend_from_slice(&chunk[..end]);
    out.push(b'\n');
}

/// An open log destination.
#[derive(Debug)]
pub enum Sink {
    File(File),
    Udp(UdpSocket, SocketAddr),
}

impl Sink {
    pub fn open(target: &LogTarget) -> io::Result<Self> {
        match target {
            LogTarget::File(path) => Ok(Sink::File(open_append(path)?)),
            LogTarget::Udp(addr) => {
                let bind: SocketAddr = if addr.is_ipv4() {
                    "0.0.0.0:0".parse().expect("valid literal")
                } else {
                    "[::]:0".parse().expect("valid literal")
                };
                let socket = UdpSocket::bind(bind)?;
                socket.set_nonblocking(true)?;
                Ok(Sink::Udp(socket, *addr))
            }
        }
    }
}

/// Non-blocking, which changes nothing for a regular file: a FIFO without
/// a reader is refused at once (ENXIO) instead of stalling the control
/// thread in `open`, and one whose reader falls behind loses lines instead
/// of stalling the workers that write them.
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// The log as workers see it: swapped whole when SIGHUP reopens it.
#[derive(Debug, Default)]
pub struct AccessLog {
    sink: ArcSwapOption<Sink>,
}

impl AccessLog {
    pub fn new(sink: Option<Sink>) -> Self {
        AccessLog {
            sink: ArcSwapOption::from(sink.map(Arc::new)),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.sink.load().is_some()
    }

    /// Replaces the sink (SIGHUP reopens the file so log rotation works).
    pub fn replace(&self, sink: Option<Sink>) {
        self.sink.store(sink.map(Arc::new));
    }

    /// Logs one chunk; `scratch` is the caller's reusable line buffer.
    pub fn log(&self, scratch: &mut Vec<u8>, client: &str, server: &str, chunk: &[u8]) {
        let guard = self.sink.load();
        let Some(sink) = guard.as_deref() else { return };
        scratch.clear();
        // A full disk or an unreachable log host must not stop traffic:
        // losing a log line is the lesser harm.
        match sink {
            Sink::File(file) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                format_file_line(scratch, client, now, server, chunk);
                let _ = (&*file).write_all(scratch);
            }
            Sink::Udp(socket, addr) => {
                format_net_line(scratch, client, server, chunk);
                let _ = socket.send_to(scratch, addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_without_reader_is_refused_at_once() {
        let dir = std::env::temp_dir().join(format!("ringpen-accesslog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("log.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = Sink::open(&LogTarget::File(fifo)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENXIO));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_line_is_pens_format() {
        let mut out = Vec::new();
        format_file_line(
            &mut out,
            "127.0.0.2",
            1700000000,
            "127.0.0.1",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        assert_eq!(out, b"127.0.0.2 1700000000 127.0.0.1 GET / HTTP/1.1\n");
    }

    #[test]
    fn file_line_masks_high_bytes_and_caps_at_100() {
        let mut out = Vec::new();
        let mut chunk = vec![0xffu8, b'a'];
        chunk.extend(std::iter::repeat_n(b'x', 200));
        format_file_line(&mut out, "c", 1, "s", &chunk);
        let excerpt = &out[b"c 1 s ".len()..out.len() - 1];
        assert_eq!(excerpt.len(), 100);
        assert!(excerpt.starts_with(b".a"));
    }

    #[test]
    fn net_line_is_pens_format_and_bounded() {
        let mut out = Vec::new();
        format_net_line(&mut out, "::1", "10.0.0.1", b"SELECT 1\nmore");
        assert_eq!(out, b"+ ::1 10.0.0.1 SELECT 1\n");
        out.clear();
        format_net_line(&mut out, "c", "s", &[b'y'; 5000]);
        assert_eq!(out.len(), NET_LINE_MAX);
    }
}
