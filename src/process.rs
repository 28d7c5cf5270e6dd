//! Process-level operations Pen users rely on: daemonizing, the pid file,
//! and giving up root (`-j` chroot, `-u` user) once the sockets are bound.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::unistd::{self, User};

/// Forks into the background, as Pen does without `-f`. Must run before
/// any thread is started.
pub fn daemonize() -> anyhow::Result<()> {
    // Keep the working directory: relative paths were made absolute before,
    // but a chroot given as a relative path is resolved later.
    unistd::daemon(true, false).context("cannot daemonize")
}

/// Writes the pid file; it is removed by [`PidFile`]'s drop.
pub struct PidFile(PathBuf);

impl PidFile {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write pid file {}", path.display()))?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // After -j the path may no longer be reachable; Pen has the same limit.
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `-j`: chroot into `dir`.
pub fn chroot(dir: &Path) -> anyhow::Result<()> {
    unistd::chroot(dir).with_context(|| format!("-j: cannot chroot to {}", dir.display()))?;
    unistd::chdir("/").context("-j: cannot chdir to / after chroot")?;
    Ok(())
}

/// `-u`: looks the user up (before any chroot hides /etc/passwd).
pub fn lookup_user(name: &str) -> anyhow::Result<User> {
    User::from_name(name)
        .with_context(|| format!("-u: cannot look up user '{name}'"))?
        .with_context(|| format!("-u: no such user '{name}'"))
}

/// `-u`: become `user` (its uid, its groups).
pub fn become_user(user: &User) -> anyhow::Result<()> {
    let name = CString::new(user.name.as_str()).context("-u: user name contains a NUL byte")?;
    unistd::initgroups(&name, user.gid)
        .with_context(|| format!("-u: cannot set the groups of '{}'", user.name))?;
    unistd::setgid(user.gid).with_context(|| format!("-u: cannot set group id {}", user.gid))?;
    unistd::setuid(user.uid).with_context(|| format!("-u: cannot set user id {}", user.uid))?;
    Ok(())
}

/// Makes `path` absolute against the current directory, so daemonizing or
/// a later chdir cannot change what it names.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The signals the control thread handles.
fn control_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1] {
        set.add(signal);
    }
    set
}

/// Holds the control signals back in this thread and in every thread it
/// starts, so that one arriving during start-up waits for the control
/// thread instead of killing the process or interrupting a worker.
pub fn hold_control_signals() -> anyhow::Result<()> {
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&control_signals()), None).context("cannot block signals")
}

/// Lets the control signals reach the calling thread (the control thread,
/// once its handlers are in place); any that arrived meanwhile come now.
pub fn release_control_signals() -> anyhow::Result<()> {
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&control_signals()), None).context("cannot unblock signals")
}
