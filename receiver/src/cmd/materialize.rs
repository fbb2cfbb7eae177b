//! `failover start --materialize PATH`: the failed-over disk copied from its point into a
//! standalone image at PATH, in the background, while the VM runs on it (Proxmox's
//! live-restore, `virsh blockpull`). PATH is the failover's overlay itself (`failover/disk.img`
//! is a link to it), so reads and writes are served from it throughout and nothing switches:
//! once every region is in it, the point is simply never read again. The watermark is durable
//! (`export::Tracked::materialize_step`), so a restart goes on where it stopped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use ctk_receiver::export::{TRACKED_REGION as REGION, Tracked};
use ctk_receiver::store::Exposure;

/// Regions copied per step (the VM's first writes to other regions wait for at most one).
const STEP_REGIONS: u64 = 16;
/// Time between progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Makes `dir/disk.img` a link to `image`: a new file, or the overlay the failover already
/// has, moved there (same filesystem only: moving across would copy it with the VM stopped).
/// Returns the image's absolute path.
pub(super) fn prepare(dir: &Path, image: &Path) -> Result<PathBuf> {
    let image = std::path::absolute(image)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let link = dir.join("disk.img");
    match std::fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => {
            let to = std::fs::read_link(&link)?;
            if to != image {
                bail!(
                    "this failover materializes into {} already, not {}",
                    to.display(),
                    image.display()
                );
            }
            return Ok(image);
        }
        Ok(_) => {
            if image.exists() {
                bail!("{} exists: give --materialize a new path", image.display());
            }
            std::fs::rename(&link, &image).map_err(|e| match e.raw_os_error() {
                Some(libc::EXDEV) => anyhow::anyhow!(
                    "{} is on another filesystem than the failover's overlay ({}): give a path \
                     on the store's filesystem, or --materialize when the failover starts",
                    image.display(),
                    link.display()
                ),
                _ => anyhow::Error::new(e)
                    .context(format!("moving the overlay to {}", image.display())),
            })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if image.exists() {
                bail!("{} exists: give --materialize a new path", image.display());
            }
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", link.display())),
    }
    std::os::unix::fs::symlink(&image, &link)
        .with_context(|| format!("linking {} to {}", link.display(), image.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(image)
}

/// The image a failover materializes into, if it does (its overlay is a link).
pub(super) fn target(dir: &Path) -> Option<PathBuf> {
    std::fs::read_link(dir.join("disk.img")).ok()
}

/// What to materialize: the disk, its image, and the most bytes per second (0: no limit).
pub(super) struct Job {
    pub disk: String,
    pub image: PathBuf,
    pub rate: u64,
}

/// Copies region after region until the image is whole or `done` is set.
pub(super) fn run(
    job: Job,
    tracked: Weak<Tracked>,
    exposure: Arc<Exposure>,
    done: Arc<AtomicBool>,
) {
    let Job { disk, image, rate } = job;
    // A step's size in bytes, and the regions per step under the rate: a step every
    // quarter second at most, so the limit holds over short spans too.
    let step = match rate {
        0 => STEP_REGIONS,
        r => (r / 4 / REGION).clamp(1, STEP_REGIONS),
    };
    let mut reader = match exposure.reader() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(disk, error = %e, "materializing: the point cannot be read");
            return;
        }
    };
    let started = Instant::now();
    let mut shown = Instant::now();
    let first = tracked.upgrade().map_or(0, |t| t.materialized().0);
    while !done.load(Ordering::Acquire) {
        let Some(t) = tracked.upgrade() else { return };
        let (at, total) = match t.materialize_step(&mut reader, step) {
            Ok(at) => (at, t.materialized().1),
            Err(e) => {
                tracing::error!(disk, error = %e, "materializing failed: retrying in 5 s");
                drop(t);
                // In short naps, so that a stop is not held up.
                for _ in 0..50 {
                    if done.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        drop(t);
        if rate > 0 {
            // Ahead of the rate: wait until the bytes copied so far are due.
            let due = Duration::from_secs_f64((at - first) as f64 * REGION as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait.min(Duration::from_secs(1)));
            }
        }
        if at >= total {
            tracing::info!(disk, image = %image.display(), "materialized");
            eprintln!(
                "{disk}: materialized: {} is a standalone image of the disk (the point is no \
                 longer read)",
                image.display()
            );
            return;
        }
        if shown.elapsed() >= PROGRESS_EVERY {
            shown = Instant::now();
            let rate = (at - first) as f64 / started.elapsed().as_secs_f64().max(0.001);
            let eta_s = (total - at) as f64 / rate.max(0.001);
            tracing::info!(
                disk,
                percent = format!("{:.1}", 100.0 * at as f64 / total as f64),
                rate_mib_per_s = format!("{rate:.1}"),
                eta_s = format!("{eta_s:.0}"),
                "materializing"
            );
        }
    }
}
