//! Does `IORING_OP_SEND_ZC` pay for a proxy on loopback? Sends 4 GiB over a
//! loopback TCP connection in 64 KiB sends (ringpen's buffer size), with plain
//! `SEND` and with `SEND_ZC`, three times each, and prints the sending
//! thread's CPU time per GiB and how many zero-copy notifications said the
//! kernel copied the data after all (`IORING_NOTIF_USAGE_ZC_COPIED`).
//!
//!     taskset -c 0 cargo run --release --example send_zc_loopback

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

use io_uring::{cqueue, opcode, types, IoUring};

const CHUNK: usize = 64 * 1024;
const TOTAL: usize = 4 << 30;
const IN_FLIGHT: usize = 4;
/// From the io_uring uapi (not re-exported by the io-uring crate).
const IORING_SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
const IORING_NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

fn thread_cpu_secs() -> f64 {
    // SAFETY: rusage is plain data, filled in by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn run(zero_copy: bool) -> std::io::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut socket, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut received = 0;
        loop {
            match socket.read(&mut buf)? {
                0 => return Ok(received),
                n => received += n,
            }
        }
    });
    let socket = TcpStream::connect(addr)?;
    let fd = types::Fd(socket.as_raw_fd());
    let mut ring = IoUring::new(64)?;
    let bufs: Vec<Vec<u8>> = (0..IN_FLIGHT as u8).map(|i| vec![i; CHUNK]).collect();
    let (mut queued, mut sent, mut in_flight) = (0usize, 0usize, 0usize);
    let (mut notifications, mut copied) = (0u64, 0u64);
    let (cpu_start, start) = (thread_cpu_secs(), Instant::now());
    while sent < TOTAL || in_flight > 0 {
        while in_flight < IN_FLIGHT && queued < TOTAL {
            let buf = &bufs[(queued / CHUNK) % IN_FLIGHT];
            // MSG_WAITALL: no short sends, so every send is one whole chunk.
            let sqe = if zero_copy {
                opcode::SendZc::new(fd, buf.as_ptr(), CHUNK as u32)
                    .flags(libc::MSG_WAITALL)
                    .zc_flags(IORING_SEND_ZC_REPORT_USAGE)
                    .build()
            } else {
                opcode::Send::new(fd, buf.as_ptr(), CHUNK as u32)
                    .flags(libc::MSG_WAITALL)
                    .build()
            };
            // SAFETY: a buffer is reused only after its send (and, for
            // SEND_ZC, its notification) completed: IN_FLIGHT buffers for at
            // most IN_FLIGHT operations; the socket outlives the ring's use.
            unsafe { ring.submission().push(&sqe) }.expect("queue has room for IN_FLIGHT entries");
            queued += CHUNK;
            in_flight += 1;
        }
        ring.submit_and_wait(1)?;
        for cqe in ring.completion() {
            if cqueue::notif(cqe.flags()) {
                notifications += 1;
                copied += u64::from(cqe.result() as u32 & IORING_NOTIF_USAGE_ZC_COPIED != 0);
                in_flight -= 1;
                continue;
            }
            if cqe.result() < 0 {
                return Err(std::io::Error::from_raw_os_error(-cqe.result()));
            }
            sent += cqe.result() as usize;
            // A zero-copy send's buffer is busy until its notification.
            if !(zero_copy && cqueue::more(cqe.flags())) {
                in_flight -= 1;
            }
        }
    }
    let (cpu, elapsed) = (thread_cpu_secs() - cpu_start, start.elapsed().as_secs_f64());
    drop(socket);
    let received = reader.join().expect("reader thread")?;
    let gib = TOTAL as f64 / f64::from(1 << 30);
    println!(
        "{:7}  {elapsed:.2} s  sender CPU {:.3} s/GiB  notifications {notifications} (copied {copied})  all received: {}",
        if zero_copy { "SEND_ZC" } else { "SEND" },
        cpu / gib,
        received == TOTAL
    );
    Ok(())
}

fn main() -> std::io::Result<()> {
    for _ in 0..3 {
        run(false)?;
        run(true)?;
    }
    Ok(())
}
