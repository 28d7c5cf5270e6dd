//! `-H`: Pen's X-Forwarded-For insertion, done in place in the receive
//! buffer so the forward path stays copy-free.
//!
//! Pen rewrites a chunk read from the client when it starts with `GET `,
//! `POST ` or `HEAD ` and holds the end of the headers; it inserts
//! `X-Forwarded-Proto: http` and `X-Forwarded-For: <client>` just before the
//! blank line. Anything else passes untouched.

use std::io::Write;
use std::net::IpAddr;

/// Room the client-side receive leaves free in every buffer so the insert
/// always fits: the two header lines with the longest IPv6 address.
pub const HEADROOM: u32 = 96;

const METHODS: [&[u8]; 3] = [b"GET ", b"POST ", b"HEAD "];

/// Rewrites `buf[..len]` in place; returns the new length. `buf` must have
/// at least `len + HEADROOM` bytes.
pub fn add_forwarded_for(buf: &mut [u8], len: usize, client: Option<IpAddr>) -> usize {
    let data = &buf[..len];
    if !METHODS.iter().any(|m| data.starts_with(m)) {
        return len;
    }
    let Some(end) = find(data, b"\r\n\r\n") else {
        return len;
    };
    // Insert after the last header's CRLF, before the blank line's CRLF.
    let at = end + 2;
    let mut line = [0u8; HEADROOM as usize];
    let mut cursor = std::io::Cursor::new(&mut line[..]);
    let written = match client {
        Some(ip) => write!(cursor, "X-Forwarded-Proto: http\r\nX-Forwarded-For: {ip}\r\n"),
        // A Unix-socket client has no address to forward.
        None => write!(cursor, "X-Forwarded-Proto: http\r\nX-Forwarded-For: unknown\r\n"),
    };
    if written.is_err() {
        return len;
    }
    let extra = cursor.position() as usize;
    if len + extra > buf.len() {
        return len;
    }
    buf.copy_within(at..len, at + extra);
    buf[at..at + extra].copy_from_slice(&line[..extra]);
    len + extra
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(input: &[u8], ip: &str) -> Vec<u8> {
        let mut buf = input.to_vec();
        buf.resize(input.len() + HEADROOM as usize, 0);
        let n = add_forwarded_for(&mut buf, input.len(), Some(ip.parse().unwrap()));
        buf.truncate(n);
        buf
    }

    #[test]
    fn inserts_before_the_blank_line_like_pen() {
        assert_eq!(
            rewrite(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", "127.0.0.1"),
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: http\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n"
        );
    }

    #[test]
    fn keeps_the_body() {
        assert_eq!(
            rewrite(b"POST /y HTTP/1.0\r\n\r\nbody", "::1"),
            b"POST /y HTTP/1.0\r\nX-Forwarded-Proto: http\r\nX-Forwarded-For: ::1\r\n\r\nbody"
        );
    }

    #[test]
    fn leaves_other_traffic_alone() {
        for input in [
            &b"PUT /x HTTP/1.1\r\n\r\n"[..],
            b"GET /no-end HTTP/1.1\r\nHost: a\r\n",
            b"\x0a\x00\x00\x00binary",
        ] {
            assert_eq!(rewrite(input, "10.0.0.1"), input);
        }
    }

    #[test]
    fn the_longest_address_fits_the_headroom() {
        let ip = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let out = rewrite(b"HEAD / HTTP/1.1\r\n\r\n", ip);
        assert!(out.ends_with(format!("X-Forwarded-For: {ip}\r\n\r\n").as_bytes()));
    }
}
