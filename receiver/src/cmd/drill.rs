//! `drill start` and `drill stop`: a restore point booted and tested while replication goes
//! on. `start` serves the point writable through a throwaway overlay (the point is never
//! written) and pins it; `stop` ends that process, removes the overlay and records on the
//! point when it was tested and how (`points` shows it).
//!
//! `start` runs in the foreground, like `expose`, and leaves `drill.json` in the disk's
//! directory (docs/format.md section 5) so that `stop`, run from anywhere, finds it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ctk::ChangeId;
use serde::{Deserialize, Serialize};
use serde_json::json;

use ctk_receiver::export::{self, Overlay};
use ctk_receiver::store::{self, DrillResult, Tested};

use super::expose::run_export;
use super::group::Target;
use super::open;

#[derive(Subcommand)]
pub enum Drill {
    /// Serve a point writable through a throwaway overlay (boot it, test it) until `drill
    /// stop` or Ctrl-C; pushes keep committing meanwhile.
    Start(Start),
    /// End the disk's drill, discard its overlay, and record the result on its point.
    Stop(Stop),
}

#[derive(Args)]
#[command(after_help = "Example:\n  \
ctk-receiver drill start --store /srv/ctk/host1 --disk vm1 --listen unix:/run/ctk/vm1-drill.sock &\n  \
qemu-system-x86_64 -m 2G -drive file=nbd+unix:///vm1?socket=/run/ctk/vm1-drill.sock,format=raw ...\n  \
ctk-receiver drill stop --store /srv/ctk/host1 --disk vm1 --result passed --note \"boots, db answers\"")]
pub struct Start {
    #[command(flatten)]
    pub served: super::group::ServeSel,
    /// The overlay file, created new and removed at the end (default: drill/overlay.img in
    /// the disk's directory). Its filesystem takes every block the drill writes.
    #[arg(long, conflicts_with = "group")]
    pub overlay: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct Stop {
    #[command(flatten)]
    pub subject: super::group::Subject,
    /// How the drill went: passed or failed.
    #[arg(long)]
    pub result: DrillResult,
    /// What was tested, or what failed (kept with the point, at most 1 KiB).
    #[arg(long)]
    pub note: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// The running drill, as `start` leaves it for `stop` (`<disk>/drill.json`).
#[derive(Serialize, Deserialize)]
struct DrillState {
    pid: u32,
    point: ChangeId,
    started_unix_ms: u64,
    overlay: PathBuf,
}

fn state_path(store: &Path, disk: &str) -> PathBuf {
    store.join(disk).join("drill.json")
}

pub fn drill(cmd: Drill) -> Result<()> {
    match cmd {
        Drill::Start(args) => start(args),
        Drill::Stop(args) => stop(args),
    }
}

fn start(args: Start) -> Result<()> {
    let Start {
        served,
        overlay,
        json,
    } = args;
    let (sel, listen) = match served.target()? {
        Target::Disk(sel, listen) => (sel, listen),
        Target::Group(_) if overlay.is_some() => {
            bail!(
                "--overlay names one disk's overlay: a group's members keep theirs in their disks' directories"
            )
        }
        Target::Group(g) => return start_group(&g, json),
    };
    let (store, exposure) = sel.expose("starting a drill on")?;
    let disk = sel.sel.disk;
    let served = begin(&store, &disk, exposure, overlay)?;
    // `stop` reads the state before it signals us and removes it after recording; an end
    // by Ctrl-C leaves it for a later `stop` to record the result.
    run_export(&disk, served, &listen, json)
}

/// `drill start --group`: every member of the group point drilled in this one process.
fn start_group(g: &super::group::GroupTarget, json: bool) -> Result<()> {
    let (root, gp, pinned) = super::group::pin_members(g)?;
    let mut served = Vec::new();
    for (disk, exposure) in pinned {
        let s = begin(&root, &disk, exposure, None).with_context(|| format!("disk {disk:?}"))?;
        served.push((disk, s));
    }
    super::group::serve_members(&g.group, &gp, served, &g.dir, json)
}

/// A drill of `disk` begun on its pinned point: refused on a failed-over disk; the overlay
/// made and `drill.json` written (naming this process), so `stop` finds it.
fn begin(
    store: &Path,
    disk: &str,
    exposure: store::Exposure,
    overlay: Option<PathBuf>,
) -> Result<export::Served> {
    if let Some(f) = store::failed_over(store, disk)? {
        bail!(
            "{disk:?} is failed over (at {} since {}): its replica is the recovered VM's disk,              so there is nothing to drill; `failover status` says more",
            f.point,
            f.since_rfc3339()
        );
    }
    // The pin is ours: a default overlay or state left by a killed drill is stale.
    let default = store.join(disk).join("drill").join("overlay.img");
    let path = match overlay {
        Some(p) => p,
        None => {
            let _ = std::fs::remove_file(&default);
            default
        }
    };
    let size = exposure.point().disk_size;
    let overlay = Overlay::create(&path, size).context(
        "creating the drill's overlay (give --overlay a new path on a filesystem with room)",
    )?;
    let state = DrillState {
        pid: std::process::id(),
        point: exposure.point().change_id,
        started_unix_ms: ctk::unix_ms_now(),
        overlay: path,
    };
    let state_file = state_path(store, disk);
    std::fs::write(&state_file, serde_json::to_vec_pretty(&state)?)
        .with_context(|| format!("writing {}", state_file.display()))?;
    Ok(export::Served {
        exposure: Arc::new(exposure),
        overlay: Some(export::Writes::Drill(Arc::new(overlay))),
    })
}

fn stop(args: Stop) -> Result<()> {
    let Stop {
        subject,
        result,
        note,
        json,
    } = args;
    if note.as_ref().is_some_and(|n| n.len() > store::NOTE_MAX) {
        bail!("--note is longer than {} bytes", store::NOTE_MAX);
    }
    let (store, disks) = match &subject.group {
        Some(g) => {
            let dir = super::disks(&subject.store, subject.agent.as_deref(), None)?.0;
            let members: Vec<String> = store::groups::member_disks(&ctk::vfs::RealFs, &dir, g)?
                .into_iter()
                .filter(|d| state_path(&dir, d).exists())
                .collect();
            if members.is_empty() {
                bail!("no drill on group {g:?} to stop (start one with `drill start --group`)");
            }
            (dir, members)
        }
        None => {
            let sel = subject.disk_sel()?;
            (sel.dir()?, vec![sel.disk])
        }
    };
    for disk in disks {
        stop_disk(&store, &disk, result, note.clone(), json)?;
    }
    Ok(())
}

/// Ends the drill of `disk` (its process signalled if it still runs), discards its overlay
/// and records the result on its point.
fn stop_disk(
    store: &Path,
    disk: &str,
    result: DrillResult,
    note: Option<String>,
    json: bool,
) -> Result<()> {
    let state_file = state_path(store, disk);
    let text = match std::fs::read(&state_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no drill on {disk:?} to stop (start one with `ctk-receiver drill start`)")
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", state_file.display())),
    };
    let state: DrillState = serde_json::from_slice(&text)
        .with_context(|| format!("{} is damaged: remove it", state_file.display()))?;
    let pin = std::fs::read_to_string(store.join(disk).join("expose.pin")).unwrap_or_default();
    let ours = pin.split_whitespace().nth(1) == Some(state.pid.to_string().as_str());
    if ours && store::exposed(store, disk)? {
        // SAFETY: kill(2) with SIGTERM on the drill's own process id (its pin names it).
        unsafe { libc::kill(state.pid as i32, libc::SIGTERM) };
        // Stopped once its pin's lock is free: the kernel drops it as the process exits.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while store::exposed(store, disk)? {
            if std::time::Instant::now() > deadline {
                bail!(
                    "the drill (process {}) did not stop within 30 s of SIGTERM",
                    state.pid
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // A drill that was killed leaves its overlay: it goes now, whatever happened.
    let _ = std::fs::remove_file(&state.overlay);
    let tested = Tested {
        started_unix_ms: state.started_unix_ms,
        stopped_unix_ms: ctk::unix_ms_now(),
        result,
        note,
    };
    let mut s = open(store, disk)?;
    s.record_drill(state.point, tested.clone())
        .with_context(|| format!("recording the drill on {}", state.point))?;
    std::fs::remove_file(&state_file)
        .with_context(|| format!("removing {}", state_file.display()))?;
    if json {
        println!(
            "{}",
            json!({"disk": disk, "point": state.point.to_string(), "tested": tested})
        );
    } else {
        println!(
            "drill on {disk} at {} recorded: {}",
            state.point,
            match result {
                DrillResult::Passed => "passed",
                DrillResult::Failed => "failed",
            }
        );
    }
    Ok(())
}
