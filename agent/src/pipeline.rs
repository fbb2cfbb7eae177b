//! The cut pipeline: pre-freeze hooks -> freeze -> hold NBD writes -> destage -> seal ->
//! (export) -> release NBD writes -> thaw -> post-thaw hooks, bounded everywhere.
//!
//! Release comes before thaw: thawing writes the filesystem's superblock, and for a
//! filesystem on a protected disk that write goes through the NBD front (found by the
//! ext4-over-nbdfuse test, which deadlocked the other way round).
//!
//! The filesystem freeze comes before NBD writes are held: freezing flushes the filesystem,
//! and that flush travels down through the NBD front. Destaging a write-back cache below the
//! tracking point happens while writes are held, so what lies below holds every acknowledged
//! write when the epoch is sealed. The backing file itself is flushed right after the
//! release (it is read through this host, so only durability depends on that flush).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::disk::ProtectedDisk;
use crate::freeze::Freeze;

/// A command run with `sh -c`, killed (with its whole process group) at its timeout.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub command: String,
    #[serde(default = "default_hook_timeout_ms")]
    pub timeout_ms: u64,
}

/// Flushing a write-back cache below the tracking point: run `command` (if any), then poll
/// `clean_check` until it exits 0, within `timeout_ms`. Real cases: bcache (`echo 0 >
/// .../bcache/writeback_percent`, check `.../bcache/dirty_data` is 0), dm-writecache
/// (`dmsetup message DEV 0 flush`, check the status line's dirty count), lvmcache (switch to
/// the cleaner policy, check `lvs -o cache_dirty_blocks` is 0).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destage {
    #[serde(default)]
    pub command: Option<String>,
    pub clean_check: String,
    #[serde(default = "default_destage_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

/// What to do when a hook or the freeze fails.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Abort the cut: everything thawed, the epoch still open, an error returned.
    #[default]
    Abort,
    /// Go on without the application's cooperation; the cut is recorded as crash-consistent.
    CrashConsistent,
}

/// The cut pipeline of one disk.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutPolicy {
    #[serde(default)]
    pub pre_freeze: Vec<Hook>,
    /// Mount points to freeze (filesystems that live on this disk).
    #[serde(default)]
    pub freeze: Vec<PathBuf>,
    /// The watchdog thaws after this long, whatever happens to the agent.
    #[serde(default = "default_freeze_timeout_ms")]
    pub freeze_timeout_ms: u64,
    #[serde(default)]
    pub destage: Vec<Destage>,
    #[serde(default)]
    pub post_thaw: Vec<Hook>,
    #[serde(default)]
    pub on_failure: OnFailure,
}

fn default_hook_timeout_ms() -> u64 {
    30_000
}
fn default_destage_timeout_ms() -> u64 {
    60_000
}
fn default_poll_ms() -> u64 {
    100
}
fn default_freeze_timeout_ms() -> u64 {
    10_000
}

/// How consistent a cut is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    /// Every write acknowledged before the cut is in it, none after.
    Crash,
    /// And applications were quiesced (hooks ran, filesystems were frozen).
    Application,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::Application => "application",
        }
    }
}

/// Runs a hook, killing it and its children at the timeout.
pub fn run_hook(what: &str, command: &str, timeout: Duration) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: starting {command:?}"))?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = (&mut e).take(4096).read_to_string(&mut err);
            }
            bail!("{what} {command:?} failed ({status}): {}", err.trim());
        }
        if started.elapsed() >= timeout {
            // SAFETY: signalling the hook's own process group, which it leads.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            bail!("{what} {command:?} did not finish within {timeout:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn destage(steps: &[Destage]) -> Result<()> {
    for step in steps {
        let timeout = Duration::from_millis(step.timeout_ms);
        let started = Instant::now();
        if let Some(command) = &step.command {
            run_hook("destage command", command, timeout)?;
        }
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if run_hook(
                "destage check",
                &step.clean_check,
                left.max(Duration::from_millis(1)),
            )
            .is_ok()
            {
                break;
            }
            if started.elapsed() >= timeout {
                bail!(
                    "the cache did not report clean within {timeout:?} ({:?})",
                    step.clean_check
                );
            }
            std::thread::sleep(Duration::from_millis(step.poll_ms.max(1)));
        }
    }
    Ok(())
}

/// What a cut did.
pub struct CutReport {
    pub change_id: ctk::ChangeId,
    pub consistency: Consistency,
    /// From asking to hold NBD writes to releasing them, and its parts.
    pub hold: crate::disk::HoldTimes,
    /// From freeze to thaw, if a filesystem was frozen.
    pub frozen: Option<Duration>,
    pub warnings: Vec<String>,
    /// Whatever the step run inside the hold returned (an export's report).
    pub inside: Value,
}

impl CutReport {
    pub fn to_json(&self) -> Value {
        json!({
            "change_id": self.change_id.to_string(),
            "consistency": self.consistency.as_str(),
            "hold_ms": self.hold.total.as_secs_f64() * 1000.0,
            "drain_ms": self.hold.drain.as_secs_f64() * 1000.0,
            "seal_ms": self.hold.seal.as_secs_f64() * 1000.0,
            "seal_sync_ms": self.hold.sync.as_secs_f64() * 1000.0,
            "frozen_ms": self.frozen.map(|d| d.as_secs_f64() * 1000.0),
            "warnings": self.warnings,
        })
    }
}

/// Runs the pipeline for `disk`. `inside` runs right after the seal while NBD writes are still
/// held and the filesystems still frozen: keep it short (an export only installs its
/// copy-on-write snapshot there, and reads the data after everything is released).
pub fn cut(
    disk: &ProtectedDisk,
    policy: &CutPolicy,
    want: Consistency,
    inside: impl FnOnce(ctk::ChangeId) -> Result<Value>,
) -> Result<CutReport> {
    let mut warnings = Vec::new();
    let mut consistency = want;
    let degrade = |consistency: &mut Consistency,
                   warnings: &mut Vec<String>,
                   e: anyhow::Error|
     -> Result<()> {
        match policy.on_failure {
            OnFailure::Abort => {
                Err(e.context("cut aborted: nothing is frozen and the epoch is still open"))
            }
            OnFailure::CrashConsistent => {
                warn!(disk = %disk.name, error = %format!("{e:#}"), "falling back to a crash-consistent cut");
                warnings.push(format!("{e:#}"));
                *consistency = Consistency::Crash;
                Ok(())
            }
        }
    };
    if want == Consistency::Application {
        for hook in &policy.pre_freeze {
            if let Err(e) = run_hook(
                "pre-freeze hook",
                &hook.command,
                Duration::from_millis(hook.timeout_ms),
            ) {
                degrade(&mut consistency, &mut warnings, e)?;
                break;
            }
        }
    }
    let mut freeze = None;
    if consistency == Consistency::Application && !policy.freeze.is_empty() {
        match Freeze::start(
            &policy.freeze,
            Duration::from_millis(policy.freeze_timeout_ms),
        ) {
            Ok(f) => freeze = Some(f),
            Err(e) => degrade(&mut consistency, &mut warnings, e)?,
        }
    }
    // Did the freeze still hold when the epoch was sealed? The watchdog cannot fire before
    // its timeout, so a seal inside that window was covered by the freeze.
    let freeze_timeout = Duration::from_millis(policy.freeze_timeout_ms);
    let mut covered = None;
    let held = disk.hold_and_seal(
        || destage(&policy.destage),
        |id| {
            covered = freeze.as_ref().map(|f| f.held_for() < freeze_timeout);
            inside(id)
        },
    );
    // Thaw only now that NBD writes flow again: thawing writes the filesystem's superblock,
    // which for a filesystem on this disk travels through the NBD front. Thawing while
    // writes are held would deadlock.
    let frozen = freeze.as_ref().map(|f| f.held_for());
    let thaw = freeze.take().map(Freeze::thaw);
    let (change_id, hold, inside_value) = held?;
    match (covered, thaw) {
        (None, _) => {}
        (Some(true), Some(Ok(_))) => {}
        (Some(false), _) => {
            warnings.push(
                "the freeze watchdog thawed before the seal: recorded as crash-consistent".into(),
            );
            consistency = Consistency::Crash;
        }
        (Some(true), Some(Err(e))) => warnings.push(format!("thaw: {e:#}")),
        (Some(true), None) => {}
    }
    if want == Consistency::Application {
        for hook in &policy.post_thaw {
            if let Err(e) = run_hook(
                "post-thaw hook",
                &hook.command,
                Duration::from_millis(hook.timeout_ms),
            ) {
                warnings.push(format!("{e:#}"));
            }
        }
    }
    let report = CutReport {
        change_id,
        consistency,
        hold,
        frozen,
        warnings,
        inside: inside_value,
    };
    disk.log_cut(&report);
    info!(disk = %disk.name, cut = %change_id, consistency = consistency.as_str(), hold_us = hold.total.as_micros() as u64, drain_us = hold.drain.as_micros() as u64, seal_us = hold.seal.as_micros() as u64, "cut");
    Ok(report)
}
