//! Reading and writing the files that commands name (`include`, `write`,
//! `status`, the `-F` file on SIGHUP) without ever blocking the control
//! thread: only regular files are taken, opened non-blocking, so a FIFO or
//! a device named by mistake is refused instead of waited on.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Configuration files are a few kilobytes; this much is surely a mistake.
pub const READ_MAX: u64 = 1 << 20;

/// The text of the regular file at `path`, at most [`READ_MAX`] bytes.
pub fn read_text(path: &Path) -> io::Result<String> {
    read_limited(open_regular(path, OpenOptions::new().read(true))?)
}

/// The text of the `-F` file at start, at most [`READ_MAX`] bytes. Any kind
/// of file will do (`-F <(generate)` is a pipe): nothing runs yet that a
/// wait could hold up.
pub fn read_text_at_start(path: &Path) -> io::Result<String> {
    read_limited(File::open(path)?)
}

fn read_limited(file: File) -> io::Result<String> {
    let mut text = String::new();
    file.take(READ_MAX + 1).read_to_string(&mut text)?;
    if text.len() as u64 > READ_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {} KiB", READ_MAX / 1024),
        ));
    }
    Ok(text)
}

/// Replaces the contents of the regular file at `path` (created if
/// missing) with `contents`.
pub fn write_text(path: &Path, contents: &str) -> io::Result<()> {
    // Truncated only once it is known to be a regular file.
    let mut file = open_regular(path, OpenOptions::new().write(true).create(true).mode(0o644))?;
    file.set_len(0)?;
    file.write_all(contents.as_bytes())
}

fn open_regular(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    // O_NONBLOCK: opening a FIFO would otherwise wait for its other end.
    let file = options.custom_flags(libc::O_NONBLOCK).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ringpen-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn regular_files_round_trip_and_others_are_refused_at_once() {
        let dir = temp_dir();
        let file = dir.join("pen.cfg");
        write_text(&file, "timeout 5\nhash\n").unwrap();
        write_text(&file, "hash\n").unwrap();
        assert_eq!(read_text(&file).unwrap(), "hash\n");

        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Neither waits for the FIFO's other end.
        assert!(read_text(&fifo)
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));
        assert!(write_text(&fifo, "x").is_err());
        assert!(read_text(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string()
            .contains("not a regular file"));

        let big = dir.join("big");
        std::fs::write(&big, vec![b'#'; READ_MAX as usize + 1]).unwrap();
        assert!(read_text(&big).unwrap_err().to_string().contains("larger than"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
