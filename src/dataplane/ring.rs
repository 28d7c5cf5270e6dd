//! Creating a worker's io_uring, and turning the ways that can fail on real
//! hosts (container seccomp profiles, the RHEL/sysctl switch, memlock) into
//! one clear message that names the fix.

use std::io;

use io_uring::{opcode, squeue, types, IoUring, Probe};

/// Submission queue size; the completion queue is larger because multishot
/// accept and receive post many completions per submission.
const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 8 * SQ_ENTRIES;

/// Why the data plane cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error(
        "io_uring is disabled on this host (sysctl kernel.io_uring_disabled={0}); \
         enable it with: sysctl -w kernel.io_uring_disabled=0"
    )]
    DisabledBySysctl(u8),
    #[error(
        "io_uring is blocked ({0}): most likely a container seccomp profile \
         (Docker >= 25, containerd >= 2.0 and Podman block it by default); run the \
         container with --security-opt seccomp=deploy/seccomp-io_uring.json"
    )]
    Blocked(io::Error),
    #[error(
        "io_uring could not allocate its rings ({0}); the locked-memory limit \
         (ulimit -l, {1}) may be too low for this kernel: raise it (systemd \
         LimitMEMLOCK=, docker --ulimit memlock=)"
    )]
    NoMemory(io::Error, String),
    #[error("this kernel's io_uring lacks {0}; ringpen needs Linux 6.1 or later")]
    MissingFeature(&'static str),
    #[error("io_uring setup failed: {0}")]
    Other(io::Error),
}

/// Creates a ring for the calling thread: single issuer and deferred task
/// running where the kernel has them (6.1+), plain otherwise.
pub fn new_ring() -> Result<IoUring, RingError> {
    let tuned = IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .setup_submit_all()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(SQ_ENTRIES);
    let ring = match tuned {
        Ok(ring) => ring,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)
            .map_err(classify)?,
        Err(e) => return Err(classify(e)),
    };
    check_opcodes(&ring)?;
    Ok(ring)
}

/// Queues one submission, flushing the queue to the kernel when it is full.
///
/// # Safety
/// Every pointer in `sqe` must stay valid until its completion arrives (or,
/// for data the kernel copies at submission, until the submit returns).
pub unsafe fn push(ring: &mut IoUring, sqe: &squeue::Entry) {
    loop {
        // SAFETY: forwarded from the caller.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return;
        }
        if let Err(e) = ring.submit() {
            tracing::error!("io_uring submit failed: {e}");
        }
    }
}

/// Queues linked submissions together: the link ends at a submission
/// batch's end, so a pair split across two submits would lose its link (a
/// connect without its timeout).
///
/// # Safety
/// As for [`push`], for every entry.
pub unsafe fn push_linked(ring: &mut IoUring, sqes: &[squeue::Entry]) {
    loop {
        let free = {
            let sq = ring.submission();
            sq.capacity() - sq.len()
        };
        if free >= sqes.len() {
            break;
        }
        if let Err(e) = ring.submit() {
            tracing::error!("io_uring submit failed: {e}");
        }
    }
    for sqe in sqes {
        // SAFETY: forwarded from the caller.
        unsafe { push(ring, sqe) };
    }
}

/// The read that wakes a worker when its eventfd is written.
pub fn waker_read(eventfd: std::os::fd::RawFd, counter: &mut u64, user_data: u64) -> squeue::Entry {
    opcode::Read::new(types::Fd(eventfd), (counter as *mut u64).cast(), 8)
        .build()
        .user_data(user_data)
}

fn check_opcodes(ring: &IoUring) -> Result<(), RingError> {
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|_| RingError::MissingFeature("the opcode probe (Linux 5.6)"))?;
    let needed = [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::Connect::CODE, "connect"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::LinkTimeout::CODE, "linked timeouts"),
        (opcode::AsyncCancel::CODE, "cancel"),
        (opcode::Read::CODE, "read"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(RingError::MissingFeature(name));
        }
    }
    Ok(())
}

fn classify(e: io::Error) -> RingError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => match sysctl_disabled() {
            Some(level) if level > 0 => RingError::DisabledBySysctl(level),
            _ => RingError::Blocked(e),
        },
        Some(libc::ENOSYS) => RingError::Blocked(e),
        Some(libc::ENOMEM) => RingError::NoMemory(e, memlock_limit()),
        _ => RingError::Other(e),
    }
}

fn sysctl_disabled() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn memlock_limit() -> String {
    match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft == libc::RLIM_INFINITY => "unlimited".to_string(),
        Ok((soft, _)) => format!("{} KiB", soft / 1024),
        Err(_) => "unknown".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_fix() {
        let blocked = classify(io::Error::from_raw_os_error(libc::ENOSYS)).to_string();
        assert!(blocked.contains("seccomp"), "{blocked}");
        let nomem = classify(io::Error::from_raw_os_error(libc::ENOMEM)).to_string();
        assert!(nomem.contains("ulimit -l"), "{nomem}");
        assert_eq!(RingError::DisabledBySysctl(2).to_string().lines().count(), 1);
    }
}
