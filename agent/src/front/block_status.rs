//! NBD_CMD_BLOCK_STATUS: for each selected meta context, `(length, status)` runs of the
//! asked range: `base:allocation` from the backing's holes, `ctk:changed:<ChangeId>` from
//! the change map. Bounded: at most `DESCRIPTORS_MAX` runs a chunk (one with REQ_ONE).

use roaring::RoaringBitmap;
use tracing::debug;

use super::handshake::MetaContext;
use super::transmission::{errno, error_bytes};
use crate::disk::{DiskError, ProtectedDisk};
use crate::nbd::{self, Request};

/// The whole reply to a BLOCK_STATUS request: one chunk per selected context, the last one
/// final, or an error.
pub(super) fn answer(
    disk: &ProtectedDisk,
    contexts: &[(u32, MetaContext)],
    structured: bool,
    req: Request,
) -> Vec<u8> {
    let answer = if !structured || contexts.is_empty() {
        Err((nbd::EINVAL, "no meta context was negotiated".to_string()))
    } else if req.length == 0 {
        Err((nbd::EINVAL, "BLOCK_STATUS of zero bytes".to_string()))
    } else {
        let one = req.flags & nbd::CMD_FLAG_REQ_ONE != 0;
        let max = if one { 1 } else { nbd::DESCRIPTORS_MAX };
        contexts
            .iter()
            .map(|(id, context)| {
                let runs = match context {
                    MetaContext::Allocation => {
                        allocation_runs(disk, req.offset, req.length as u64, max + 1)
                    }
                    MetaContext::Changed(since) => {
                        changed_runs(disk, *since, req.offset, req.length as u64, max + 1)
                    }
                };
                runs.map(|runs| (*id, nbd::descriptors(runs, max)))
                    .map_err(|e| (errno(&e, false), format!("{}: {e}", context.name())))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    match answer {
        Ok(chunks) => {
            let last = chunks.len() - 1;
            let mut out = Vec::new();
            for (i, (id, runs)) in chunks.iter().enumerate() {
                out.extend_from_slice(&nbd::block_status_chunk(req.cookie, i == last, *id, runs));
            }
            out
        }
        Err((errno, why)) => {
            debug!(%why, "BLOCK_STATUS refused");
            error_bytes(structured, req.cookie, errno, &why)
        }
    }
}

/// `base:allocation` for `[offset, offset + length)`: runs from the backing's holes
/// (SEEK_DATA / SEEK_HOLE), at most about `max` of them. A backing that cannot tell (a block
/// device, an old filesystem) is reported allocated, which the spec allows.
fn allocation_runs(
    disk: &ProtectedDisk,
    offset: u64,
    length: u64,
    max: usize,
) -> Result<Vec<(u64, u32)>, DiskError> {
    disk.check(offset, length)?;
    let end = offset + length;
    let mut runs = Vec::new();
    let mut pos = offset;
    while pos < end && runs.len() < max {
        match disk.next_data(pos) {
            Ok(Some(d)) if d <= pos => {
                let hole = disk.next_hole(pos).unwrap_or(end).min(end);
                if hole <= pos {
                    // Cannot make progress: report the rest as allocated.
                    runs.push((end - pos, 0));
                    break;
                }
                runs.push((hole - pos, 0));
                pos = hole;
            }
            Ok(Some(d)) => {
                let d = d.min(end);
                runs.push((d - pos, nbd::STATE_HOLE | nbd::STATE_ZERO));
                pos = d;
            }
            // No data after `pos`: a hole to the end of the file.
            Ok(None) => {
                runs.push((end - pos, nbd::STATE_HOLE | nbd::STATE_ZERO));
                pos = end;
            }
            Err(_) => {
                runs.push((end - pos, 0));
                pos = end;
            }
        }
    }
    Ok(runs)
}

/// `ctk:changed:<since>` for `[offset, offset + length)`: runs where `STATE_CHANGED` marks
/// blocks written after `since` (in later cuts or not yet cut). Block granular, like every
/// answer of the map; at most about `max` runs.
fn changed_runs(
    disk: &ProtectedDisk,
    since: ctk::ChangeId,
    offset: u64,
    length: u64,
    max: usize,
) -> Result<Vec<(u64, u32)>, DiskError> {
    if length == 0 {
        disk.check(offset, length)?;
        return Ok(Vec::new());
    }
    let (shift, blocks) = disk.changed_window(since, offset, length)?;
    Ok(block_runs(
        &blocks,
        shift,
        offset,
        length,
        max,
        nbd::STATE_CHANGED,
    ))
}

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
