//! Process-level operations Pen users rely on: daemonizing, the pid file,
//! giving up root (`-j` chroot, `-u` user) once the sockets are bound, and
//! room for the descriptors `-x` connections need.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::fcntl::{fcntl, FcntlArg};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::unistd::{self, User};

/// Forks into the background, as Pen does without `-f`. Must run before
/// any thread is started.
pub fn daemonize() -> anyhow::Result<()> {
    // Keep the working directory: relative paths were made absolute before,
    // but a chroot given as a relative path is resolved later.
    unistd::daemon(true, false).context("cannot daemonize")
}

/// `-p`: the pid file, removed by its drop. Opened before going to the
/// background, so that a path that cannot be written stops the start
/// where the error can be seen; the pid is written once it is the
/// daemon's.
pub struct PidFile {
    /// Where the file is reached now (removed from there at exit).
    path: PathBuf,
    file: std::fs::File,
    /// With `-j`: its path once inside the jail.
    path_in_jail: Option<PathBuf>,
}

impl PidFile {
    /// Creates the pid file. With `-j` the path names a file inside the
    /// jail, as in Pen (which opens it after chroot); it is created now, from
    /// outside, so that a mistake is reported before going to the background.
    pub fn open(path: &Path, jail: Option<&Path>) -> anyhow::Result<Self> {
        let at = jail.map_or_else(|| path.to_path_buf(), |jail| in_jail(jail, path));
        let file =
            std::fs::File::create(&at).with_context(|| format!("cannot write pid file {}", at.display()))?;
        Ok(PidFile {
            path: at,
            file,
            path_in_jail: jail.map(|_| path.to_path_buf()),
        })
    }

    /// After the chroot: from now on the file is reached by its path inside.
    pub fn entered_jail(&mut self) {
        if let Some(path) = self.path_in_jail.take() {
            self.path = path;
        }
    }

    /// Writes this process's pid.
    pub fn write_pid(&mut self) -> anyhow::Result<()> {
        use std::io::Write;
        writeln!(self.file, "{}", std::process::id())
            .with_context(|| format!("cannot write pid file {}", self.path.display()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // After -u the directory may not be writable; Pen has the same limit.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `-j`: checks before going to the background that `dir` can be the new
/// root, so that the likely mistakes are reported where they can be seen.
pub fn check_chroot(dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(unistd::geteuid().is_root(), "-j: only root can chroot");
    let meta = std::fs::metadata(dir).with_context(|| format!("-j: cannot use {}", dir.display()))?;
    anyhow::ensure!(meta.is_dir(), "-j: {} is not a directory", dir.display());
    Ok(())
}

/// Where `path` inside the jail `jail` is, seen from outside (a relative
/// path is taken from the jail's root).
pub fn in_jail(jail: &Path, path: &Path) -> PathBuf {
    jail.join(path.strip_prefix("/").unwrap_or(path))
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

/// `-u`: become `user` (its uid, its groups). Without root there is nothing
/// to change when the process already runs as that user, as when a service
/// manager starts it so; any other user is refused.
pub fn become_user(user: &User) -> anyhow::Result<()> {
    if !unistd::geteuid().is_root() {
        let already = unistd::getuid() == user.uid && unistd::getgid() == user.gid;
        anyhow::ensure!(already, "-u: only root can become user '{}'", user.name);
        return Ok(());
    }
    let name = CString::new(user.name.as_str()).context("-u: user name contains a NUL byte")?;
    unistd::initgroups(&name, user.gid)
        .with_context(|| format!("-u: cannot set the groups of '{}'", user.name))?;
    unistd::setgid(user.gid).with_context(|| format!("-u: cannot set group id {}", user.gid))?;
    unistd::setuid(user.uid).with_context(|| format!("-u: cannot set user id {}", user.uid))?;
    Ok(())
}

/// Descriptors beyond the connections': listeners, rings, health checks, logs.
const DESCRIPTOR_MARGIN: u64 = 256;

/// Descriptors the data plane may hold with `conn_max` connections: two
/// per proxied connection, plus the margin.
fn descriptors_for(conn_max: usize) -> u64 {
    2 * conn_max as u64 + DESCRIPTOR_MARGIN
}

/// Makes room for `-x` connections' descriptors now, and returns how many
/// the process may open.
///
/// The open-files soft limit is raised towards what `-x` needs (never past
/// the hard limit), as HAProxy does, so `-x` means what it says.
///
/// The descriptor table is grown now, once, rather than by accepts under
/// load: the kernel grows a multi-threaded process's table behind an RCU
/// grace period (10–20 ms on a small VM), no accept completes meanwhile, a
/// burst of connects overflows the listen queue and every dropped SYN waits
/// a whole second for its retransmission.
fn reserve_descriptors(conn_max: usize) -> anyhow::Result<u64> {
    let needed = descriptors_for(conn_max);
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("cannot read the open-files limit")?;
    let limit = needed.min(hard).max(soft);
    if limit > soft {
        setrlimit(Resource::RLIMIT_NOFILE, limit, hard)
            .with_context(|| format!("cannot raise the open-files limit from {soft} to {limit}"))?;
    }
    let usable = needed.min(limit);
    // The lowest free descriptor at or above `usable - 1`: the table grows
    // to hold it and never shrinks.
    let probe = UnixDatagram::unbound().context("cannot open a socket to grow the descriptor table")?;
    let top = fcntl(probe.as_raw_fd(), FcntlArg::F_DUPFD_CLOEXEC(usable as i32 - 1))
        .with_context(|| format!("cannot grow the descriptor table to {usable}"))?;
    let _ = unistd::close(top);
    Ok(limit)
}

/// [`reserve_descriptors`], saying in the log when the hard limit leaves
/// less than `-x` needs or the reservation fails.
pub fn reserve_descriptors_or_warn(conn_max: usize) {
    match reserve_descriptors(conn_max) {
        Ok(limit) if limit < descriptors_for(conn_max) => tracing::warn!(
            "the open-files hard limit {limit} allows about {} connections, fewer than -x {conn_max}; raise it (ulimit -Hn) to use them all",
            limit.saturating_sub(DESCRIPTOR_MARGIN) / 2
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("{e:#}"),
    }
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
