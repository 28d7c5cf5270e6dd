//! The listening socket, set up as Pen does it. Accepted sockets inherit
//! TCP_NODELAY and SO_KEEPALIVE from it, which saves two syscalls per client.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;

use anyhow::Context;
use socket2::{Domain, Socket, Type};

use crate::config::Endpoint;

/// Binds and listens on `addr` with `backlog`.
pub fn bind(addr: &Endpoint, backlog: u32) -> anyhow::Result<OwnedFd> {
    let sockaddr = addr
        .to_sockaddr()
        .with_context(|| format!("bad listen address {addr}"))?;
    let socket = match addr {
        Endpoint::Inet(inet) => {
            let socket = Socket::new(Domain::for_address(*inet), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_keepalive(true)?;
            socket.set_tcp_nodelay(true)?;
            if inet.is_ipv6() {
                // `[::]:port` takes IPv4 clients too, as Pen's listener does.
                socket.set_only_v6(false)?;
            }
            socket
        }
        Endpoint::Unix(path) => {
            // A socket file left behind by an earlier run would make bind
            // fail; anything else at that path is not ours to remove.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
            Socket::new(Domain::UNIX, Type::STREAM, None)?
        }
    };
    socket
        .bind(&sockaddr)
        .with_context(|| format!("cannot listen on {addr}"))?;
    socket
        .listen(backlog.min(i32::MAX as u32) as i32)
        .with_context(|| format!("cannot listen on {addr}"))?;
    Ok(socket.into())
}

/// Stops listening now. The rings' multishot accepts hold references to the
/// socket that the kernel drops only some time after the process exits; a
/// shutdown frees the port at once, so a restart can bind it again.
pub fn shutdown(listener: &OwnedFd) {
    // SAFETY: shutdown on a descriptor we own; no pointers.
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
}

/// At exit: stop listening and remove a Unix socket's file.
pub fn close(listener: &OwnedFd, addr: &Endpoint) {
    shutdown(listener);
    if let Endpoint::Unix(path) = addr {
        let _ = std::fs::remove_file(path);
    }
}
