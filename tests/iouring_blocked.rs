//! When io_uring is blocked, as Docker >= 25 and Podman do with their
//! default seccomp profiles, ringpen must say so in one line that names the
//! fix, and exit non-zero, instead of failing obscurely.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SYS_IO_URING_SETUP: u32 = 425;

/// Installs a seccomp filter in the child that fails `io_uring_setup` with
/// `errno`, exactly what a container runtime's default profile does.
fn block_io_uring(command: &mut Command, errno: u32) {
    // SAFETY: runs in the forked child before exec and only makes two
    // prctl calls on data that lives on this stack frame.
    unsafe {
        command.pre_exec(move || {
            let filter = [
                // Load the syscall number.
                libc::sock_filter {
                    code: 0x20,
                    jt: 0,
                    jf: 0,
                    k: 0,
                },
                // io_uring_setup? then fail it, else allow.
                libc::sock_filter {
                    code: 0x15,
                    jt: 0,
                    jf: 1,
                    k: SYS_IO_URING_SETUP,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0x0005_0000 | errno,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0x7fff_0000,
                },
            ];
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const _,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn run_blocked(errno: u32) -> (Option<i32>, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringpen"));
    command
        .args(["-f", &format!("127.0.0.1:{port}"), "127.0.0.1:9"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    block_io_uring(&mut command, errno);
    let mut child = command.spawn().expect("start ringpen");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let output = child.wait_with_output().unwrap();
            return (
                status.code(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            );
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("ringpen kept running although io_uring is blocked");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn blocked_by_seccomp_exits_with_one_line_naming_the_profile() {
    for errno in [libc::EPERM as u32, libc::ENOSYS as u32] {
        let (code, stderr) = run_blocked(errno);
        assert_ne!(code, Some(0), "must fail; stderr: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "exactly one line, got: {stderr}");
        assert!(lines[0].contains("io_uring"), "{stderr}");
        assert!(lines[0].contains("seccomp"), "{stderr}");
    }
}
