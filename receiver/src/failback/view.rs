//! The DR disk as failback reads it: the failover's point, with the regions the overlay
//! holds read from its `disk.img`.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use ctk::ChangeId;
use roaring::RoaringBitmap;

use super::DrDisk;
use crate::export::{OverlayError, Peek, TRACKED_REGION, Tracked, read_runs, runs};
use crate::store::{self, Exposure, LiveReader, Pick, StoreError};

/// How long the last pass waits for a `failover start` it asked to stop.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// The DR disk of a failed-over disk.
pub struct DrView {
    pub point: ChangeId,
    pub size: u64,
    base: LiveReader,
    source: Source,
}

enum Source {
    /// Read beside the process serving it (or none): its files, replayed.
    Peeked { peek: Box<Peek>, file: File },
    /// Held by this process: nothing else writes it.
    Held {
        tracked: Box<Tracked>,
        _exposure: Box<Exposure>,
    },
}

fn overlay_error(e: OverlayError) -> StoreError {
    match e {
        OverlayError::Point(e) => e,
        OverlayError::Io { path, source } => StoreError::Io {
            doing: format!("reading the failover's overlay {}", path.display()),
            source,
        },
    }
}

/// The fence of `disk`: failback needs one.
fn fence(root: &Path, disk: &str) -> Result<store::FailedOver, StoreError> {
    store::failed_over(root, disk)?.ok_or_else(|| StoreError::NotFailedOver {
        disk: disk.to_owned(),
    })
}

impl DrView {
    /// The DR disk read beside a running `failover start` (or a stopped one), without
    /// disturbing it.
    pub fn peek(root: &Path, disk: &str) -> Result<DrView, StoreError> {
        let fence = fence(root, disk)?;
        let base = LiveReader::of_fenced(root, disk, fence.point)?;
        let dir = super::failover_dir(root, disk);
        let peek =
            Peek::open(&dir, base.size(), &fence.point.to_string()).map_err(overlay_error)?;
        let path = dir.join("disk.img");
        let file = File::open(&path).map_err(|source| StoreError::Io {
            doing: format!("opening {}", path.display()),
            source,
        })?;
        Ok(DrView {
            point: fence.point,
            size: base.size(),
            base,
            source: Source::Peeked {
                peek: Box::new(peek),
                file,
            },
        })
    }

    /// The DR disk held here: its exposure taken, so no `failover start` serves it. One
    /// that does is asked to stop (SIGTERM: its NBD clients see the export go away, and no
    /// write is acknowledged after) when `stop_served`, else refused.
    pub fn hold(root: &Path, disk: &str, stop_served: bool) -> Result<DrView, StoreError> {
        let fence = fence(root, disk)?;
        let started = Instant::now();
        let mut asked = false;
        let exposure = loop {
            match Exposure::open(root, disk, Pick::Id(fence.point)) {
                Ok(e) => break e,
                Err(StoreError::Exposed { .. }) if stop_served => {
                    if !asked {
                        asked = stop_exposer(root, disk);
                    }
                    if started.elapsed() > STOP_WAIT {
                        return Err(served_error(disk, "did not stop within a minute"));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(StoreError::Exposed { .. }) => {
                    return Err(served_error(disk, "serves it again since the last pass"));
                }
                Err(e) => return Err(e),
            }
        };
        let base = exposure.reader()?;
        let dir = super::failover_dir(root, disk);
        // Never a new, empty overlay under a fence: that would pass the point alone for the
        // DR disk.
        if !dir.join("journal").exists() {
            return Err(StoreError::Damaged {
                disk: disk.to_owned(),
                why: format!(
                    "it is failed over but its overlay's journal {} is missing: the DR disk's \
                     writes cannot be found",
                    dir.join("journal").display()
                ),
            });
        }
        let (tracked, _) =
            Tracked::open(&dir, base.size(), &fence.point.to_string()).map_err(overlay_error)?;
        Ok(DrView {
            point: fence.point,
            size: base.size(),
            base,
            source: Source::Held {
                tracked: Box::new(tracked),
                _exposure: Box::new(exposure),
            },
        })
    }

    /// Closes the overlay (its journal cleanly) and gives back the exposure that keeps a new
    /// `failover start` out, if this view held one.
    pub fn into_exposure(self) -> Option<Box<Exposure>> {
        match self.source {
            Source::Held { tracked, _exposure } => {
                drop(tracked);
                Some(_exposure)
            }
            Source::Peeked { .. } => None,
        }
    }

    /// The held overlay's latest cut and the count of blocks written after it.
    pub fn after_latest(&self) -> Result<Option<(ChangeId, u64)>, StoreError> {
        match &self.source {
            Source::Held { tracked, .. } => tracked.after_latest().map(Some).map_err(overlay_error),
            Source::Peeked { .. } => Ok(None),
        }
    }
}

impl DrDisk for DrView {
    fn point(&self) -> ChangeId {
        self.point
    }

    fn size(&self) -> u64 {
        self.size
    }

    // Held, the overlay is cut now; peeked, its latest sealed cut (see `Peek`).
    fn changes(
        &mut self,
        since: Option<ChangeId>,
    ) -> Result<(ChangeId, RoaringBitmap), StoreError> {
        match &self.source {
            Source::Held { tracked, .. } => tracked.cut_with_changes(since).map_err(overlay_error),
            Source::Peeked { peek, .. } => {
                Ok((peek.upto, peek.changes(since).map_err(overlay_error)?))
            }
        }
    }

    fn written(&mut self) -> Result<RoaringBitmap, StoreError> {
        match &self.source {
            Source::Held { tracked, .. } => tracked.changed_blocks().map_err(overlay_error),
            Source::Peeked { peek, .. } => peek.changes(None).map_err(overlay_error),
        }
    }

    fn not_in_newest(&mut self) -> Result<Vec<(u64, u64)>, StoreError> {
        self.base.not_in_full()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        match &self.source {
            Source::Held { tracked, .. } => tracked
                .read_at(&mut self.base, buf, offset)
                .map_err(overlay_error),
            Source::Peeked { peek, file } => {
                let runs = runs(offset, buf.len(), TRACKED_REGION, |r| {
                    peek.present.contains(r as u32)
                });
                read_runs(&runs, buf, offset, file, &mut self.base).map_err(|e| match e {
                    Ok(source) => StoreError::Io {
                        doing: "reading the failover's disk.img".into(),
                        source,
                    },
                    Err(e) => e,
                })
            }
        }
    }
}

fn served_error(disk: &str, what: &str) -> StoreError {
    StoreError::Io {
        doing: format!("holding the failover of {disk:?}"),
        source: std::io::Error::other(format!(
            "the `ctk-receiver failover start` serving it {what}: stop it (Ctrl-C or SIGTERM \
             to its process) and run the final pass again"
        )),
    }
}

/// Sends SIGTERM to the process that exposes `disk` (named in its `expose.pin`). Whether
/// one was found.
fn stop_exposer(root: &Path, disk: &str) -> bool {
    let pin = std::fs::read_to_string(root.join(disk).join("expose.pin")).unwrap_or_default();
    let Some(pid) = pin
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return false;
    };
    if pid <= 1 || pid as u32 == std::process::id() {
        return false;
    }
    // A pin whose process died names a pid the system may have given to anything since:
    // only a `failover start` of this disk is asked to stop.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let is_failover = args
        .windows(2)
        .any(|w| w == [&b"failover"[..], &b"start"[..]])
        && (args.contains(&disk.as_bytes()) || args.contains(&format!("--disk={disk}").as_bytes()));
    if !is_failover {
        return false;
    }
    tracing::info!(
        disk,
        pid,
        "stopping the failover's export for the last pass"
    );
    // SAFETY: kill(2) with a valid signal has no memory effects here.
    unsafe { libc::kill(pid, libc::SIGTERM) == 0 }
}
