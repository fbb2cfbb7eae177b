//! The copy-on-write snapshot of an export in progress: blocks the export has yet to read
//! are copied aside before a write overwrites them, so the export reads the disk as of its
//! cut while writes go on. Its memory is bounded: at the cap, writers to not-yet-exported
//! blocks wait for the export to move on.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use ctk::ChangeId;
use roaring::RoaringBitmap;

use super::{DiskError, ExportPlan, ProtectedDisk};

/// A point-in-time view for an export in progress.
pub(super) struct Snapshot {
    pub(super) shift: u32,
    /// Blocks the export has yet to read.
    pub(super) pending: RoaringBitmap,
    /// Contents at the cut of pending blocks that writes have since overwritten.
    pub(super) preserved: BTreeMap<u32, Box<[u8]>>,
    pub(super) preserved_bytes: u64,
    pub(super) peak_bytes: u64,
}

/// Most memory preserved copies may take before writers to not-yet-exported blocks wait.
pub const COW_LIMIT_DEFAULT: u64 = 256 << 20;

impl ProtectedDisk {
    /// Copies the blocks of `[offset, offset + length)` that a running export has not read yet,
    /// so it still reads them as of its cut. At the memory cap, waits for the export to move
    /// on (backpressure) rather than grow without bound.
    pub(super) fn preserve(&self, offset: u64, length: u64) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let mut guard = self
            .snapshot
            .lock()
            .map_err(|_| io::Error::other("snapshot lock poisoned"))?;
        loop {
            let Some(snap) = guard.as_mut() else {
                return Ok(());
            };
            let (first, last) = (
                (offset >> snap.shift) as u32,
                ((offset + length - 1) >> snap.shift) as u32,
            );
            let hits: Vec<u32> = snap.pending.range(first..=last).collect();
            if hits.is_empty() {
                return Ok(());
            }
            let need = hits.len() as u64 * (1 << snap.shift);
            // Always let one write through when nothing is held, so a huge write still moves.
            if snap.preserved_bytes > 0 && snap.preserved_bytes + need > self.cow_limit {
                self.counters.cow_waits.fetch_add(1, Ordering::Relaxed);
                guard = self
                    .snapshot_room
                    .wait(guard)
                    .map_err(|_| io::Error::other("snapshot lock poisoned"))?;
                continue;
            }
            for block in hits {
                let start = (block as u64) << snap.shift;
                let len = ((1u64 << snap.shift).min(self.size() - start)) as usize;
                let mut data = vec![0u8; len].into_boxed_slice();
                self.file.read_exact_at(&mut data, start)?;
                snap.preserved_bytes += len as u64;
                snap.preserved.insert(block, data);
                snap.pending.remove(block);
            }
            snap.peak_bytes = snap.peak_bytes.max(snap.preserved_bytes);
            self.counters
                .cow_blocks
                .fetch_add(need >> snap.shift, Ordering::Relaxed);
            return Ok(());
        }
    }

    /// Starts a point-in-time export of the blocks changed from `since` to `to`. Call it
    /// inside `hold_and_seal` (no write can slip in between the seal and the snapshot).
    pub fn begin_snapshot(&self, plan: &ExportPlan, to: ChangeId) -> Result<(), DiskError> {
        // `to` is the cut being made, not yet durable: this runs inside its hold.
        let (shift, pending) = self.with_tracker(|t| {
            let pending = match plan {
                ExportPlan::Changed(since) | ExportPlan::Resume { since, .. } => {
                    t.changed_blocks_unconfirmed(*since, to)?
                }
                // A compare reads every block, written or not: all are kept as of the cut.
                ExportPlan::Compare { .. } => {
                    let mut all = RoaringBitmap::new();
                    if t.geometry().blocks() > 0 {
                        all.insert_range(0..t.geometry().blocks() as u32);
                    }
                    all
                }
            };
            Ok((t.geometry().block_shift(), pending))
        })?;
        let mut guard = self
            .snapshot
            .lock()
            .map_err(|_| DiskError::Io(io::Error::other("snapshot lock poisoned")))?;
        if guard.is_some() {
            return Err(DiskError::Busy);
        }
        *guard = Some(Snapshot {
            shift,
            pending,
            preserved: BTreeMap::new(),
            preserved_bytes: 0,
            peak_bytes: 0,
        });
        Ok(())
    }

    /// Waits (up to `timeout`) until no export of this disk is running. An export goes on
    /// after the client that asked for it dies (its replication was killed, say), and the
    /// next replication must wait for it rather than fail; waiting here, before the cut,
    /// keeps the wait out of the cut's hold.
    pub fn wait_export_idle(&self, timeout: std::time::Duration) -> Result<(), DiskError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut guard = self
            .snapshot
            .lock()
            .map_err(|_| DiskError::Io(io::Error::other("snapshot lock poisoned")))?;
        while guard.is_some() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(DiskError::Busy);
            }
            guard = self
                .snapshot_room
                .wait_timeout(guard, left)
                .map_err(|_| DiskError::Io(io::Error::other("snapshot lock poisoned")))?
                .0;
        }
        Ok(())
    }

    /// Drops a snapshot begun inside a cut that then failed, so later exports are not
    /// refused as busy and writers stop preserving blocks for it.
    pub fn abort_snapshot(&self) {
        if let Ok(mut guard) = self.snapshot.lock() {
            guard.take();
        }
        self.snapshot_room.notify_all();
    }
}
