//! The cut pipeline: pre-freeze hooks -> freeze -> hold NBD writes -> destage -> seal ->
//! (export) -> release NBD writes -> thaw -> post-thaw hooks, bounded everywhere.
//!
//! Release comes before thaw: thawing writes the filesystem's superblock, and for a
//! filesystem on a protected disk that write goes through the NBD front; the other way round
//! deadlocks.
//!
//! The filesystem freeze comes before NBD writes are held: freezing flushes the filesystem,
//! and that flush travels down through the NBD front. Destaging a write-back cache below the
//! tracking point happens while writes are held, so what lies below holds every acknowledged
//! write when the epoch is sealed. The backing file itself is flushed right after the
//! release (it is read through this host, so only durability depends on that flush).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::config::{CutPolicy, Destage, OnFailure};
use crate::disk::{ProtectedDisk, hold_and_seal_all};
use crate::freeze::Freeze;

/// How consistent a cut is: one type from the cut to the receiver's manifest.
pub use ctk::Consistency;

/// Runs a hook, killing it and its children at the timeout. The hook runs under
/// `hook-runner` (this executable) in a process group of its own: the runner kills the
/// whole group if the agent dies, so no hook or destage step outlives a killed agent.
pub fn run_hook(what: &str, command: &str, timeout: Duration) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let mut child = this_executable()
        .arg("hook-runner")
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg("--")
        .arg(command)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: starting {command:?}"))?;
    let started = Instant::now();
    loop {
        if exited(child.id()) {
            // Whatever the hook left running in its group (a `cmd &`) goes with it. Done
            // before the runner is reaped, so its id cannot name another group yet.
            // SAFETY: signalling the hook's own process group, which its runner leads.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let status = child.wait()?;
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
            // SAFETY: signalling the hook's own process group, which its runner leads.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            bail!("{what} {command:?} did not finish within {timeout:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A command running this very executable (the freeze helper, the hook runner): through
/// `/proc/self/exe`, which names the running binary even after its file was replaced (a
/// package upgraded under a running agent) or deleted; the path it was started from may no
/// longer exist or may be another version. Its argv[0] stays `ctk-agent`.
pub fn this_executable() -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("ctk-agent");
    cmd
}

/// Whether the child `pid` has exited, without reaping it.
fn exited(pid: u32) -> bool {
    // SAFETY: waitid writes only into the zeroed siginfo we own.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is valid to read for a WEXITED answer; zero when nothing changed.
    rc == 0 && unsafe { info.si_pid() } != 0
}

/// The hook runner's main (`ctk-agent hook-runner --parent PID -- COMMAND`): runs `sh -c
/// COMMAND` in its own process group and exits as it does; if the agent `parent` goes away
/// first (this process is handed to another parent), kills the whole group, itself
/// included. Returns the exit code to pass on.
pub fn hook_runner_main(parent: u32, command: &str) -> Result<i32> {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
        }
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } as u32 != parent {
            // SAFETY: signalling our own process group: the hook and all it started.
            unsafe {
                libc::kill(0, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the destage steps, each within its own timeout and all before `deadline` (the
/// freeze's, when a filesystem is frozen): a step still running then is killed and the cut
/// fails, so that NBD writes are released before the freeze watchdog thaws. (The thaw writes
/// the filesystem's superblock through the NBD front: with writes still held, the watchdog's
/// thaw would block until the destage ended, and every writer of the filesystem with it.)
fn destage(steps: &[Destage], deadline: Option<Instant>) -> Result<()> {
    let left_before =
        |deadline: Option<Instant>| deadline.map(|d| d.saturating_duration_since(Instant::now()));
    for step in steps {
        let own = Duration::from_millis(step.timeout_ms);
        let started = Instant::now();
        // Whichever comes first: the step's timeout or the freeze's deadline.
        let timeout = left_before(deadline).map_or(own, |left| left.min(own));
        let overran = || {
            anyhow::Error::new(DestageOverran {
                check: step.clean_check.clone(),
            })
        };
        if let Some(command) = &step.command {
            run_hook("destage command", command, timeout).map_err(|e| {
                if left_before(deadline).is_some_and(|l| l.is_zero()) {
                    overran()
                } else {
                    e
                }
            })?;
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
                if timeout < own {
                    return Err(overran());
                }
                bail!(
                    "the cache did not report clean within {timeout:?} ({:?})",
                    step.clean_check
                );
            }
            std::thread::sleep(Duration::from_millis(step.poll_ms.max(1)).min(left));
        }
    }
    Ok(())
}

/// A destage step still running when the freeze had to end.
#[derive(Debug, thiserror::Error)]
#[error(
    "the destage step {check:?} did not finish before the freeze watchdog's deadline: it was \
     stopped and NBD writes released so the frozen filesystems thaw on time (raise \
     freeze_timeout_ms above the destage's time, or make the cache destage faster)"
)]
pub struct DestageOverran {
    pub check: String,
}

/// How long before the freeze watchdog fires the agent must have released NBD writes: the
/// release, and the thaw's superblock write through the NBD front, happen in this margin.
fn release_margin(freeze_timeout: Duration) -> Duration {
    (freeze_timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// What a cut did.
pub struct CutReport {
    pub change_id: ctk::ChangeId,
    pub consistency: Consistency,
    /// The consistency group's cut this is one member of, if any.
    pub group_cut: Option<ctk::GroupCutId>,
    /// From asking to hold NBD writes to releasing them, and its parts.
    pub hold: crate::disk::HoldTimes,
    /// From freeze to thaw, if a filesystem was frozen.
    pub frozen: Option<Duration>,
    pub warnings: Vec<String>,
    /// Whatever the step run inside the hold returned (an export's report).
    pub inside: Value,
}

impl CutReport {
    /// What a cut did, as `cut` answers it and the cut log records it.
    pub fn answer(&self, disk: &str) -> CutAnswer {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        CutAnswer {
            disk: disk.to_owned(),
            change_id: self.change_id,
            consistency: self.consistency,
            group_cut: self.group_cut,
            hold_ms: ms(self.hold.total),
            drain_ms: ms(self.hold.drain),
            seal_ms: ms(self.hold.seal),
            seal_sync_ms: ms(self.hold.sync),
            frozen_ms: self.frozen.map(ms),
            warnings: self.warnings.clone(),
        }
    }
}

/// A cut as the control protocol answers it (`cut`, the cut part of `export`) and the cut
/// log records it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CutAnswer {
    pub disk: String,
    pub change_id: ctk::ChangeId,
    pub consistency: Consistency,
    /// The consistency group's cut this is one member of (`cut --group`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_cut: Option<ctk::GroupCutId>,
    /// From asking to hold NBD writes to releasing them, and its parts.
    pub hold_ms: f64,
    pub drain_ms: f64,
    pub seal_ms: f64,
    /// Syncing the seal, after writes were released.
    pub seal_sync_ms: f64,
    /// From freeze to thaw, if a filesystem was frozen.
    pub frozen_ms: Option<f64>,
    pub warnings: Vec<String>,
}

/// Runs the pipeline for `disk` under its own policy. `inside` runs right after the seal
/// while NBD writes are still held and the filesystems still frozen: keep it short (an
/// export only installs its copy-on-write snapshot there, and reads the data after
/// everything is released).
pub fn cut(
    disk: &ProtectedDisk,
    want: Consistency,
    inside: impl FnOnce(ctk::ChangeId) -> Result<Value>,
) -> Result<CutReport> {
    let mut inside = Some(inside);
    let mut reports = cut_all(&[disk], &disk.policy, want, None, |_, id| {
        (inside.take().expect("one disk, one call"))(id)
    })?;
    Ok(reports.pop().expect("one disk, one report"))
}

/// Runs the pipeline once for every disk of a consistency group (`disks`, in the agent's
/// order): every member's pre-freeze hooks, one freeze of all their filesystems, one hold of
/// all their writes (`hold_and_seal_all`: one instant across the group), every member's
/// destage steps, then release, thaw and every member's post-thaw hooks. `inside` runs per
/// member, with its index, inside the hold. One report per member, all with the group's
/// consistency and `group_cut`.
pub fn cut_group(
    disks: &[&ProtectedDisk],
    want: Consistency,
    group_cut: ctk::GroupCutId,
    inside: impl FnMut(usize, ctk::ChangeId) -> Result<Value>,
) -> Result<Vec<CutReport>> {
    cut_all(disks, &group_policy(disks), want, Some(group_cut), inside)
}

/// A group's steps as one policy: each member's hooks, freeze targets and destage steps in
/// member order (a target two members name, once), the shortest freeze timeout (no member's
/// filesystem stays frozen longer than it allows), and abort on failure if any member says
/// so (an application cut of the group is only as good as its strictest member asks).
fn group_policy(disks: &[&ProtectedDisk]) -> CutPolicy {
    let crash_on_failure = disks
        .iter()
        .all(|d| d.policy.on_failure == OnFailure::CrashConsistent);
    let mut p = CutPolicy {
        freeze_timeout_ms: disks
            .iter()
            .map(|d| d.policy.freeze_timeout_ms)
            .min()
            .unwrap_or_default(),
        on_failure: if crash_on_failure {
            OnFailure::CrashConsistent
        } else {
            OnFailure::Abort
        },
        ..CutPolicy::default()
    };
    for d in disks {
        p.pre_freeze.extend(d.policy.pre_freeze.iter().cloned());
        for target in &d.policy.freeze {
            if !p.freeze.contains(target) {
                p.freeze.push(target.clone());
            }
        }
        p.destage.extend(d.policy.destage.iter().cloned());
        p.post_thaw.extend(d.policy.post_thaw.iter().cloned());
    }
    p
}

/// The pipeline over `disks` (one, or a group's members) with the steps of `policy`.
/// One piece: the steps' order and the fallbacks between them are the pipeline's contract
/// (see the module's doc), easier to check read top to bottom than split.
fn cut_all(
    disks: &[&ProtectedDisk],
    policy: &CutPolicy,
    want: Consistency,
    group_cut: Option<ctk::GroupCutId>,
    mut inside: impl FnMut(usize, ctk::ChangeId) -> Result<Value>,
) -> Result<Vec<CutReport>> {
    let names: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
    let mut warnings = Vec::new();
    let mut consistency = want;
    // The label is earned, not asked for: with nothing to quiesce, the cut is a crash cut.
    if want == Consistency::Application && !policy.can_quiesce() {
        warnings
            .push("no pre-freeze hook and no freeze target: recorded as crash-consistent".into());
        consistency = Consistency::Crash;
    }
    let degrade = |consistency: &mut Consistency, warnings: &mut Vec<String>, e| {
        degrade(&names, policy, consistency, warnings, e)
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
        // A target that is not its disk's own mounted filesystem would freeze the wrong one
        // (often /) and quiesce nothing the cut captures.
        let checked = disks.iter().try_for_each(|d| {
            crate::mounts::check_targets(&d.policy.freeze, d.image_id())
                .map_err(anyhow::Error::from)
        });
        match checked.and_then(|()| {
            Freeze::start(
                &policy.freeze,
                Duration::from_millis(policy.freeze_timeout_ms),
            )
        }) {
            Ok(f) => freeze = Some(f),
            Err(e) => degrade(&mut consistency, &mut warnings, e)?,
        }
    }
    // Did the freeze still hold when the epochs were sealed? The watchdog cannot fire before
    // its timeout, so a seal inside that window was covered by the freeze.
    let freeze_timeout = Duration::from_millis(policy.freeze_timeout_ms);
    let mut covered = None;
    // While a filesystem is frozen, NBD writes must be released before its watchdog thaws.
    let deadline = freeze
        .as_ref()
        .map(|f| f.started() + freeze_timeout.saturating_sub(release_margin(freeze_timeout)));
    let mut held = hold_and_seal_all(
        disks,
        || destage(&policy.destage, deadline),
        |i, id| {
            covered = freeze.as_ref().map(|f| f.held_for() < freeze_timeout);
            inside(i, id)
        },
    );
    // Thaw only now that NBD writes flow again: thawing writes the filesystem's superblock,
    // which for a filesystem on a protected disk travels through the NBD front. Thawing
    // while writes are held would deadlock.
    let frozen = freeze.as_ref().map(|f| f.held_for());
    let thaw = freeze.take().map(Freeze::thaw);
    if let Err(e) = &held
        && e.is::<DestageOverran>()
    {
        // The freeze could not cover the destage: the cut is no longer application
        // consistent. Fall back (writes held again, the destage with its own timeout, no
        // filesystem frozen) or abort, as configured.
        let e = held.expect_err("an error");
        degrade(&mut consistency, &mut warnings, e)?;
        covered = None;
        held = hold_and_seal_all(disks, || destage(&policy.destage, None), &mut inside);
    }
    let sealed = held?;
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
        post_thaw(policy, &mut warnings);
    }
    let reports: Vec<CutReport> = sealed
        .into_iter()
        .map(|(change_id, hold, inside)| CutReport {
            change_id,
            consistency,
            group_cut,
            hold,
            frozen,
            warnings: warnings.clone(),
            inside,
        })
        .collect();
    for (disk, report) in disks.iter().zip(&reports) {
        log_cut(disk, report);
        let hold = report.hold;
        info!(disk = %disk.name, cut = %report.change_id, consistency = consistency.as_str(), hold_us = hold.total.as_micros() as u64, drain_us = hold.drain.as_micros() as u64, seal_us = hold.seal.as_micros() as u64, "cut");
    }
    Ok(reports)
}

/// A quiesce step failed: abort the cut, or go on crash-consistent with a warning, as the
/// policy says.
fn degrade(
    disks: &[&str],
    policy: &CutPolicy,
    consistency: &mut Consistency,
    warnings: &mut Vec<String>,
    e: anyhow::Error,
) -> Result<()> {
    match policy.on_failure {
        OnFailure::Abort => {
            Err(e.context("cut aborted: nothing is frozen and the epoch is still open"))
        }
        OnFailure::CrashConsistent => {
            warn!(disks = ?disks, error = %format!("{e:#}"), "falling back to a crash-consistent cut");
            warnings.push(format!("{e:#}"));
            *consistency = Consistency::Crash;
            Ok(())
        }
    }
}

/// The post-thaw hooks: each runs whatever the others did; a failure is a warning (the cut
/// is taken).
fn post_thaw(policy: &CutPolicy, warnings: &mut Vec<String>) {
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

/// Records a cut: appended to `<journal>.cuts` (one JSON object per line, for whoever
/// audits the cuts after a restart: their time and consistency level; bounded by
/// `append_bounded`), and kept by the disk for `status`.
fn log_cut(disk: &ProtectedDisk, report: &CutReport) {
    let mut entry = serde_json::to_value(report.answer(&disk.name)).unwrap_or_default();
    entry["time_unix_ms"] = json!(ctk::unix_ms_now());
    let mut path = disk.journal.clone().into_os_string();
    path.push(".cuts");
    let line = format!("{entry}\n");
    if let Err(e) = append_bounded(Path::new(&path), line.as_bytes(), CUT_LOG_MAX) {
        warn!(error = %e, "could not append to the cut log");
    }
    disk.set_last_cut(entry);
}

/// The size at which the cut log is rotated: about 4,600 cuts of about 230 bytes, 77
/// minutes of one-second cuts. Continuous mode cuts every second forever, and an unbounded
/// log grew by about 20 MB a day.
const CUT_LOG_MAX: u64 = 1 << 20;

/// Appends `line` to the log at `path`; once the log has reached `max` bytes it first
/// becomes `<path>.1` (replacing the one before), so the two hold between `max` and
/// `2 * max` bytes of the newest lines.
fn append_bounded(path: &Path, line: &[u8], max: u64) -> io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= max) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(path, &old)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(line)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cut_log_is_rotated_and_keeps_the_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("d.img.ctk.cuts");
        for i in 0..1000 {
            super::append_bounded(&log, format!("{i:09}\n").as_bytes(), 1000).unwrap();
        }
        let rotated = dir.path().join("d.img.ctk.cuts.1");
        let (now, before) = (
            std::fs::read_to_string(&log).unwrap(),
            std::fs::read_to_string(&rotated).unwrap(),
        );
        // 10 bytes a line: each file holds 100 lines; the last line written is the newest.
        assert!(
            now.len() <= 1000 && before.len() == 1000,
            "{} {}",
            now.len(),
            before.len()
        );
        assert!(now.ends_with("000000999\n"), "{now}");
        // The two together are the newest lines, in order, with none missing.
        let lines: Vec<u64> = before
            .lines()
            .chain(now.lines())
            .map(|l| l.parse().unwrap())
            .collect();
        assert!(
            lines.windows(2).all(|w| w[1] == w[0] + 1),
            "a gap or reorder"
        );
        assert_eq!(*lines.last().unwrap(), 999);
        // Nothing else was left beside them.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
