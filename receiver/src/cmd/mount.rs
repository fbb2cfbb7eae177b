//! `mount` and `umount`: a point's filesystem mounted read-only for as long as it is needed
//! (browse it, copy what you want), the point pinned meanwhile. `mount` stays in the
//! foreground; `umount DIR`, or Ctrl-C, ends it. The state between them is `mount.json` in
//! the mount's work directory (`$TMPDIR/ctk-mount-<pid>`), which also says what to tear down
//! if the mount's process was killed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;

use ctk_receiver::export::{Leftovers, MountedPoint};

use super::PointSel;

#[derive(Args)]
#[command(after_help = "Example:\n  \
ctk-receiver mount --store /srv/ctk/host1 --disk vm1 --point latest /mnt/vm1 &\n  \
ls /mnt/vm1/etc\n  \
ctk-receiver umount /mnt/vm1\n\n\
Needs root, nbdfuse and fusermount3 (libnbd-bin, fuse3). MBR and GPT partitions are found; \
--partition picks one, else the first that mounts.")]
pub struct Mount {
    #[command(flatten)]
    pub sel: PointSel,
    /// Which partition (1-based), on a partitioned disk.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Where to mount it (created if missing).
    pub dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct Umount {
    /// A directory `ctk-receiver mount` mounted.
    pub dir: PathBuf,
}

/// `mount.json`: who holds the mount, and what it left.
#[derive(Serialize, Deserialize)]
struct MountState {
    pid: u32,
    leftovers: Leftovers,
}

const STATE: &str = "mount.json";

pub fn mount(args: Mount) -> Result<()> {
    let Mount {
        sel,
        partition,
        dir,
        json,
    } = args;
    let (_, exposure) = sel.expose("mounting a point of")?;
    let exposure = Arc::new(exposure);
    let change_id = exposure.point().change_id;
    let work = std::env::temp_dir().join(format!("ctk-mount-{}", std::process::id()));
    let mounted = MountedPoint::mount(exposure, &dir, &work, partition)
        .with_context(|| format!("mounting the filesystem of {change_id}"))?;
    let dir = dir.canonicalize()?;
    let state = MountState {
        pid: std::process::id(),
        leftovers: Leftovers {
            dir: dir.clone(),
            ..mounted.leftovers()
        },
    };
    std::fs::write(work.join(STATE), serde_json::to_vec_pretty(&state)?)?;
    if json {
        println!(
            "{}",
            json!({"ready": true, "disk": sel.sel.disk, "point": change_id.to_string(), "dir": dir})
        );
    } else {
        println!(
            "ready: {} as of {change_id} mounted read-only at {}\nundo with `ctk-receiver umount {}` or Ctrl-C",
            sel.sel.disk,
            dir.display(),
            dir.display()
        );
    }
    use std::io::Write;
    std::io::stdout().flush()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    drop(mounted);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// The mounts `mount` holds now: (work directory, state).
fn mounts() -> Vec<(PathBuf, MountState)> {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ctk-mount-"))
        .filter_map(|e| {
            let text = std::fs::read(e.path().join(STATE)).ok()?;
            Some((e.path(), serde_json::from_slice(&text).ok()?))
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks the process; it touches no memory.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Whether `dir` is a mount point now.
fn is_mounted(dir: &Path) -> bool {
    let want = dir.to_string_lossy();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_ref()))
}

pub fn umount(args: Umount) -> Result<()> {
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("{} does not exist", args.dir.display()))?;
    let Some((work, state)) = mounts().into_iter().find(|(_, s)| s.leftovers.dir == dir) else {
        bail!(
            "{} is not mounted by ctk-receiver mount (see /proc/mounts)",
            dir.display()
        );
    };
    if alive(state.pid) && is_mounted(&dir) {
        // SAFETY: kill(2) with SIGTERM on the mount's own process, which its state names.
        unsafe { libc::kill(state.pid as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while is_mounted(&dir) || work.join(STATE).exists() {
            if std::time::Instant::now() > deadline {
                bail!(
                    "the mount (process {}) did not end within 30 s of SIGTERM",
                    state.pid
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    } else {
        // Its process is gone: what it set up is torn down here.
        state.leftovers.tear_down();
        let _ = std::fs::remove_dir_all(&work);
    }
    println!("{} unmounted", dir.display());
    Ok(())
}
