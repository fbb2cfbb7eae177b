//! What BLOCK_STATUS reports of a disk: allocation (the backing's holes) and the blocks
//! changed since a ChangeId, as `(length, status)` runs of a byte range.

use std::os::fd::AsRawFd;

use ctk::{ChangeId, Since};
use roaring::RoaringBitmap;

use super::{DiskError, ProtectedDisk};

/// Turns a set of blocks into `(length, status)` runs covering `[offset, offset + length)`
/// exactly: `status` where a block is in the set, 0 elsewhere. Stops after about `max` runs.
fn block_runs(
    blocks: &RoaringBitmap,
    shift: u32,
    offset: u64,
    length: u64,
    max: usize,
    status: u32,
) -> Vec<(u64, u32)> {
    let end = offset + length;
    let mut runs = Vec::new();
    let mut pos = offset;
    let mut iter = blocks.iter().peekable();
    let mut complete = true;
    while let Some(block) = iter.next() {
        if runs.len() + 2 > max {
            // Stopped early: what follows is unknown, and must not be reported clean.
            complete = false;
            break;
        }
        // Extend over consecutive blocks.
        let mut last = block;
        while iter.peek() == Some(&(last + 1)) {
            last = iter.next().expect("peeked");
        }
        let start = ((block as u64) << shift).max(offset);
        let stop = (((last as u64) + 1) << shift).min(end);
        if start > pos {
            runs.push((start - pos, 0));
        }
        runs.push((stop - start, status));
        pos = stop;
    }
    if complete && pos < end {
        runs.push((end - pos, 0));
    }
    runs
}

impl ProtectedDisk {
    /// `base:allocation` for `[offset, offset + length)`: `(length, status)` runs from the
    /// backing's holes (SEEK_DATA / SEEK_HOLE), at most about `max` of them. A backing that
    /// cannot tell (a block device, an old filesystem) is reported allocated, which the spec
    /// allows.
    pub fn allocation_runs(
        &self,
        offset: u64,
        length: u64,
        max: usize,
    ) -> Result<Vec<(u64, u32)>, DiskError> {
        use crate::nbd::{STATE_HOLE, STATE_ZERO};
        self.check(offset, length)?;
        let fd = self.file.as_raw_fd();
        let seek = |pos: u64, whence: i32| -> Option<u64> {
            // SAFETY: lseek on an open descriptor touches no memory.
            let r = unsafe { libc::lseek(fd, pos as i64, whence) };
            (r >= 0).then_some(r as u64)
        };
        let end = offset + length;
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < max {
            // ENXIO (no data after pos) means a hole to the end of the file.
            let data = seek(pos, libc::SEEK_DATA);
            match data {
                Some(d) if d <= pos => {
                    let hole = seek(pos, libc::SEEK_HOLE).unwrap_or(end).min(end);
                    if hole <= pos {
                        // Cannot make progress: report the rest as allocated.
                        runs.push((end - pos, 0));
                        break;
                    }
                    runs.push((hole - pos, 0));
                    pos = hole;
                }
                Some(d) => {
                    let d = d.min(end);
                    runs.push((d - pos, STATE_HOLE | STATE_ZERO));
                    pos = d;
                }
                None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => {
                    runs.push((end - pos, STATE_HOLE | STATE_ZERO));
                    pos = end;
                }
                None => {
                    runs.push((end - pos, 0));
                    pos = end;
                }
            }
        }
        Ok(runs)
    }

    /// `ctk:changed:<since>` for `[offset, offset + length)`: `(length, status)` runs where
    /// `STATE_CHANGED` marks blocks written after `since` (in later cuts or not yet cut).
    /// Block granular, like every answer of the map; at most about `max` runs.
    pub fn changed_runs(
        &self,
        since: ChangeId,
        offset: u64,
        length: u64,
        max: usize,
    ) -> Result<Vec<(u64, u32)>, DiskError> {
        self.check(offset, length)?;
        if length == 0 {
            return Ok(Vec::new());
        }
        let (shift, first, last) = self.with_tracker(|t| {
            let shift = t.geometry().block_shift();
            Ok((
                shift,
                (offset >> shift) as u32,
                ((offset + length - 1) >> shift) as u32,
            ))
        })?;
        // Only the requested window is kept, so the answer's memory follows the request.
        let blocks = self.with_tracker(|t| {
            // Up to the newest seal, durable or not, plus the open epoch: every write since.
            let mut all = t.changed_blocks_unconfirmed(Since::Id(since), t.map().latest())?;
            all |= t.map().open_blocks();
            let mut window = RoaringBitmap::new();
            window.insert_range(first..=last);
            Ok(all & window)
        })?;
        Ok(block_runs(
            &blocks,
            shift,
            offset,
            length,
            max,
            crate::nbd::STATE_CHANGED,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_runs_cover_the_window_exactly() {
        let mut b = RoaringBitmap::new();
        b.insert_range(2..4); // bytes 8192..16384 with 4 KiB blocks
        b.insert(6);
        // An unaligned window from inside block 1 to inside block 6.
        let runs = block_runs(&b, 12, 5000, 26000, 100, 1);
        assert_eq!(
            runs,
            vec![(3192, 0), (8192, 1), (8192, 0), (4096, 1), (2328, 0)]
        );
        assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), 26000);
        // Nothing changed: one clean run; everything: one changed run.
        assert_eq!(
            block_runs(&RoaringBitmap::new(), 12, 0, 10, 100, 1),
            vec![(10, 0)]
        );
        let mut all = RoaringBitmap::new();
        all.insert_range(0..10);
        assert_eq!(block_runs(&all, 12, 100, 4000, 100, 1), vec![(4000, 1)]);
        // The bound stops the answer early, never past the window, and never claims the
        // unvisited rest is clean (that would be an under-report).
        let mut sparse = RoaringBitmap::new();
        for i in 0..1000 {
            sparse.insert(i * 2);
        }
        let runs = block_runs(&sparse, 12, 0, 2000 << 12, 10, 1);
        assert!(runs.len() <= 10);
        assert!(runs.iter().map(|r| r.0).sum::<u64>() < 2000 << 12);
        assert_eq!(runs.last().unwrap().1, 1, "{runs:?}");
    }
}
