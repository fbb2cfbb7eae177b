//! Filesystem freeze with a watchdog that does not depend on the agent staying alive.
//!
//! Linux keeps a frozen filesystem frozen after the process that froze it dies, and has no
//! freeze timeout: an agent killed or hung mid-cut would hang every writer on the host. So the
//! freeze is done by a helper process (`ctk-agent freeze-helper`) in its own session. It
//! freezes the mounts (FIFREEZE), says `frozen`, and thaws them (FITHAW) on the first of:
//! the agent writing `thaw`, its stdin closing (the agent died), or its timeout. It then says
//! why it thawed, so the agent can tell whether the freeze really covered the seal.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

// _IOWR('X', 119, int) and _IOWR('X', 120, int) from <linux/fs.h>.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

fn ioctl_mount(path: &Path, request: libc::c_ulong) -> std::io::Result<()> {
    let dir = std::fs::File::open(path)?;
    // SAFETY: FIFREEZE/FITHAW take an int argument that the kernel ignores; no memory is passed.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The helper's main: freeze, report, wait, thaw, report. Never leaves a mount frozen that it
/// froze, whatever happens to its parent: once a mount is frozen, every path out of this
/// function goes through the thaw, including a failed report. (A `?` on the "frozen" line
/// once returned early when the agent died mid-freeze, leaving the mount frozen for good.)
pub fn helper_main(mounts: &[PathBuf], timeout: Duration) -> Result<()> {
    let mut frozen: Vec<&Path> = Vec::new();
    let mut freeze_error = None;
    // The agent checks its targets; this is the last line: freezing / would stop the host.
    if let Some(root) = mounts
        .iter()
        .find(|m| std::fs::canonicalize(m).is_ok_and(|r| r == Path::new("/")))
    {
        freeze_error = Some(format!(
            "refusing to freeze {} (the root filesystem)",
            root.display()
        ));
    }
    if freeze_error.is_none() {
        for mount in mounts {
            match ioctl_mount(mount, FIFREEZE) {
                Ok(()) => frozen.push(mount),
                Err(e) => {
                    freeze_error = Some(format!("error freezing {}: {e}", mount.display()));
                    break;
                }
            }
        }
    }
    let why = match freeze_error {
        // Partly frozen: undo at once, then say why.
        Some(_) => "error",
        // The parent cannot hear us (it died mid-freeze, or stopped reading): nobody could
        // ever ask for the thaw, so thaw now.
        None if report("frozen").is_err() => "unheard",
        None => wait_for_release(timeout),
    };
    let failed = thaw_all(&frozen);
    // Best effort: after a parent death nobody reads this; the thaw is what mattered.
    let _ = match (freeze_error, failed.is_empty()) {
        (Some(e), _) => report(&e),
        (None, true) => report(&format!("thawed {why}")),
        (None, false) => report(&format!("thaw failed {why}: {}", failed.join("; "))),
    };
    Ok(())
}

fn report(line: &str) -> std::io::Result<()> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{line}")?;
    o.flush()
}

/// Waits for "thaw", EOF (the parent died), or the deadline, and says which came first.
/// stdin is read on a thread so the deadline holds even if the parent is alive but silent.
fn wait_for_release(timeout: Duration) -> &'static str {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let n = BufReader::new(std::io::stdin())
            .read_line(&mut line)
            .unwrap_or(0);
        let _ = tx.send(if n == 0 { "eof" } else { "asked" });
    });
    rx.recv_timeout(timeout).unwrap_or("timeout")
}

/// Thaws in reverse order; returns the mounts that would not thaw.
fn thaw_all(frozen: &[&Path]) -> Vec<String> {
    let mut failed = Vec::new();
    for m in frozen.iter().rev() {
        if let Err(e) = ioctl_mount(m, FITHAW) {
            failed.push(format!("{}: {e}", m.display()));
        }
    }
    failed
}

/// Why the helper thawed.
#[derive(Debug, PartialEq, Eq)]
pub enum Thawed {
    /// When the agent asked: the freeze covered everything in between.
    OnRequest,
    /// The watchdog fired first: the freeze may have ended before the seal.
    Timeout,
}

/// A freeze held by a helper process.
pub struct Freeze {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    started: Instant,
}

impl Freeze {
    /// Freezes `mounts` through a helper that thaws by itself after `timeout`.
    pub fn start(mounts: &[PathBuf], timeout: Duration) -> Result<Freeze> {
        let mut cmd = crate::pipeline::this_executable();
        cmd.arg("freeze-helper")
            .arg("--timeout-ms")
            .arg(timeout.as_millis().to_string());
        for m in mounts {
            cmd.arg(m);
        }
        // Its own session: a signal to the agent's process group does not reach it.
        cmd.process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting the freeze helper")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut freeze = Freeze {
            child,
            stdin,
            lines,
            started: Instant::now(),
        };
        match freeze.lines.recv_timeout(timeout + Duration::from_secs(5)) {
            Ok(line) if line == "frozen" => Ok(freeze),
            Ok(line) => {
                let _ = freeze.child.wait();
                bail!("freeze failed: {line}")
            }
            Err(_) => {
                // The helper never answered, most likely stuck in FIFREEZE behind a slow
                // sync. Killing it could land between its freeze and its thaw and leave the
                // mount frozen for good; closing its stdin instead makes it thaw as soon as
                // the freeze returns (Drop closes stdin and reaps it, boundedly).
                bail!("the freeze helper did not answer within {timeout:?}")
            }
        }
    }

    /// Thaws, and says whether the freeze lasted until now.
    pub fn thaw(mut self) -> Result<Thawed> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"thaw\n");
        }
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .context("the freeze helper did not confirm the thaw")?;
        match line.as_str() {
            "thawed asked" => Ok(Thawed::OnRequest),
            "thawed timeout" => Ok(Thawed::Timeout),
            other => bail!("{other}"),
        }
    }

    /// When the freeze was asked for: the helper's watchdog fires no earlier than its
    /// timeout after this.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn held_for(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        // Closing stdin makes the helper thaw. Reap it, but never wait forever: a helper
        // stuck in the kernel finishes on its own once its I/O completes.
        self.stdin = None;
        for _ in 0..500 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(
            pid = self.child.id(),
            "the freeze helper has not exited; it will thaw on its own"
        );
    }
}
