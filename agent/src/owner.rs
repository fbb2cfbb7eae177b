//! One owner per disk: the locks a running agent holds on what it protects.
//!
//! Two trackers on one journal can lose the one promise: each replays the other's records as
//! an unclean shutdown, rewrites the journal under it, and seals epochs the other never saw.
//! So `serve` takes, for the life of the process, an exclusive `flock` on each protected
//! image (the open file the NBD front writes through) and on `<journal>.lock` beside its
//! journal (the journal itself is replaced by renames, which would drop a lock held on it).
//! A second agent on either fails at once, naming the process that holds it. The kernel
//! drops the locks when the holder dies, however it dies, so a SIGKILLed agent never stops
//! a restart.
//!
//! Unix sockets are the other shared thing: a stale socket file must be removed before
//! `bind`, but a live one belongs to a running agent. `ctk_net::local::bind_unix` (shared
//! with the receiver's exports) connects first and removes the file only if nothing answers.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Why a disk or a socket could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// Another process holds the lock on the image or the journal.
    #[error("{what} {} is in use by {holder}: one agent per disk (stop it first, or protect another disk)", path.display())]
    Held {
        what: &'static str,
        path: PathBuf,
        holder: Holder,
    },
    /// A Unix socket could not be taken (a live one is never taken over).
    #[error(transparent)]
    Bind(#[from] ctk_net::local::BindError),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Who holds a lock, as far as the system tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Process { pid: u32, command: Option<String> },
    Unknown,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Process {
                pid,
                command: Some(c),
            } => write!(f, "process {pid} ({c})"),
            Holder::Process { pid, command: None } => write!(f, "process {pid}"),
            Holder::Unknown => write!(f, "another process"),
        }
    }
}

/// A lock file held for the life of this value (`<journal>.lock`).
#[derive(Debug)]
pub struct LockFile {
    _file: File,
}

/// Takes an exclusive lock on the open image `file` (held as long as `file` is open).
pub fn lock_image(file: &File, path: &Path) -> Result<(), OwnerError> {
    try_flock(file).map_err(|e| match e {
        Some(e) => OwnerError::Io {
            what: "locking the disk image",
            path: path.to_owned(),
            source: e,
        },
        None => OwnerError::Held {
            what: "the disk image",
            path: path.to_owned(),
            holder: holder_of(file),
        },
    })
}

/// The lock file beside a journal.
pub fn journal_lock_path(journal: &Path) -> PathBuf {
    let mut p = journal.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Takes the exclusive lock beside `journal` and writes this process's id into it (only
/// for people; the holder is found through the kernel's lock table).
pub fn lock_journal(journal: &Path) -> Result<LockFile, OwnerError> {
    let path = journal_lock_path(journal);
    let io = |what, source| OwnerError::Io {
        what,
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the journal's directory", e))?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io("creating the journal's lock file", e))?;
    match try_flock(&file) {
        Ok(()) => {}
        Err(Some(e)) => return Err(io("locking the journal", e)),
        Err(None) => {
            return Err(OwnerError::Held {
                what: "the change journal",
                path: journal.to_owned(),
                holder: holder_of(&file),
            });
        }
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all(pid.as_bytes()))
        .map_err(|e| io("writing the journal's lock file", e))?;
    Ok(LockFile { _file: file })
}

/// `flock(LOCK_EX | LOCK_NB)`: `Err(None)` when another holds it.
fn try_flock(file: &File) -> Result<(), Option<io::Error>> {
    // SAFETY: flock on an open descriptor touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(None)
    } else {
        Err(Some(e))
    }
}

/// Finds the holder of a `flock` on `file` in `/proc/locks`.
fn holder_of(file: &File) -> Holder {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = file.metadata() else {
        return Holder::Unknown;
    };
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    match flock_holder(&text, meta.dev(), meta.ino()) {
        Some(pid) if pid != std::process::id() => Holder::Process {
            pid,
            command: std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .ok()
                .map(|c| c.split('\0').take(3).collect::<Vec<_>>().join(" "))
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty()),
        },
        _ => Holder::Unknown,
    }
}

/// The pid holding a FLOCK on the file with device `dev` and inode `ino`, from the text of
/// `/proc/locks` (lines such as `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`, the
/// device as hexadecimal major:minor).
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line starts with "->"; only holders are wanted.
        if fields.first() == Some(&"->") || fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        (fields.get(5) == Some(&want.as_str()))
            .then(|| fields.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 77 fd:01:99 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 5151 fd:01:1234 0 EOF\n";
        let dev = libc::makedev(0xfd, 0x01);
        assert_eq!(flock_holder(text, dev, 1234), Some(4242));
        // A POSIX lock on another file, or no line at all: unknown.
        assert_eq!(flock_holder(text, dev, 99), None);
        assert_eq!(flock_holder(text, dev, 5), None);
    }

    #[test]
    fn a_second_lock_is_refused_and_names_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("d.ctk");
        let held = lock_journal(&journal).unwrap();
        // flock locks belong to the open file description: a second open conflicts, even
        // in the same process.
        let err = lock_journal(&journal).unwrap_err();
        assert!(matches!(err, OwnerError::Held { .. }), "{err}");
        assert!(err.to_string().contains("one agent per disk"), "{err}");
        drop(held);
        lock_journal(&journal).unwrap();
    }
}
