//! Restore and verify: a point materialized by reading each byte once, from the oldest newer
//! undo that holds it or else the full; every stored checksum checked.

use super::*;

/// What `verify` checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    /// Restore points in the manifest.
    pub points: usize,
    /// Files read whole and checked: undo files (every record's CRC and the trailer) and
    /// full.img (against the newest point's image digest).
    pub files: usize,
    /// Bytes of those files read.
    pub bytes: u64,
    /// Whether full.img was checked against a digest (a point without one cannot be).
    pub full_checked: bool,
}

/// The granularity of a restored image's holes: a block of zeros is not written.
pub(super) const SPARSE_BLOCK: u64 = 4096;

/// Writes `data` at `offset` into a target that starts as one hole, leaving out every
/// `SPARSE_BLOCK` (aligned to the image) that holds only zeros, so the restored image is as
/// thin as the source; runs of blocks with data go out as one write.
pub(super) fn write_sparse(target: &dyn FileAt, data: &[u8], offset: u64) -> Result<()> {
    let end = offset + data.len() as u64;
    let mut run: Option<u64> = None;
    let mut pos = offset;
    while pos < end {
        let next = ((pos / SPARSE_BLOCK + 1) * SPARSE_BLOCK).min(end);
        let block = &data[(pos - offset) as usize..(next - offset) as usize];
        match (is_zero(block), run) {
            (false, None) => run = Some(pos),
            (true, Some(from)) => {
                target
                    .write_all_at(
                        &data[(from - offset) as usize..(pos - offset) as usize],
                        from,
                    )
                    .map_err(io_err("writing the restored image"))?;
                run = None;
            }
            _ => {}
        }
        pos = next;
    }
    if let Some(from) = run {
        target
            .write_all_at(&data[(from - offset) as usize..], from)
            .map_err(io_err("writing the restored image"))?;
    }
    Ok(())
}

/// Byte ranges already written by a restore: disjoint, kept as start -> end.
#[derive(Default)]
pub(super) struct Covered(std::collections::BTreeMap<u64, u64>);

impl Covered {
    /// Marks `[start, end)` covered and returns the parts of it that were not yet, ascending.
    pub(super) fn claim(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        if start >= end {
            return gaps;
        }
        // Every covered range that touches [start, end), starting with one that begins
        // before `start` and reaches into it.
        let first = self
            .0
            .range(..=start)
            .next_back()
            .filter(|&(_, &e)| e >= start)
            .map(|(&s, _)| s)
            .unwrap_or(start);
        let touching: Vec<(u64, u64)> = self.0.range(first..=end).map(|(&s, &e)| (s, e)).collect();
        let mut pos = start;
        let (mut lo, mut hi) = (start, end);
        for &(s, e) in &touching {
            if s > pos {
                gaps.push((pos, s.min(end)));
            }
            pos = pos.max(e);
            lo = lo.min(s);
            hi = hi.max(e);
            self.0.remove(&s);
        }
        if pos < end {
            gaps.push((pos, end));
        }
        self.0.insert(lo, hi);
        gaps
    }
}

impl DiskStore {
    /// The resync hashes of the newest point (`ctk::digest::unit_hash` of each `unit` bytes
    /// of full.img, in order): its ChangeId, disk size and the hashes, 32 bytes each. Read
    /// under the store's lock, so no merge changes full.img meanwhile. The unit is checked
    /// before anything is allocated (`ctk::digest::unit_count`).
    pub fn unit_digests(&self, unit: u32) -> Result<(ChangeId, u64, Vec<u8>)> {
        let newest = self
            .points()
            .last()
            .ok_or_else(|| StoreError::NoSuchPoint("(any: the store is empty)".into()))?;
        let size = newest.disk_size;
        let count = ctk::digest::unit_count(size, unit).map_err(StoreError::Protocol)?;
        let full = self.open_file(&self.full_path(), "opening full.img")?;
        let mut hashes = Vec::with_capacity(count as usize * 32);
        let mut buf = vec![0u8; unit as usize];
        for i in 0..count {
            let at = i * unit as u64;
            let n = (size - at).min(unit as u64) as usize;
            full.read_exact_at(&mut buf[..n], at)
                .map_err(io_err("reading full.img for a resync"))?;
            hashes.extend_from_slice(&ctk::digest::unit_hash(&buf[..n]));
        }
        Ok((newest.change_id, size, hashes))
    }

    /// Writes the image of point `change_id` to `out` (sparse), calling `progress` with the
    /// bytes done and the total.
    ///
    /// Each byte is read once, from the first source that holds it as of the point
    /// (`point_map`): the undo of the next newer point (the pre-images its merge overwrote,
    /// that is, this point's bytes), else the undo of the one after, and so on, else the
    /// full. Only record heads are read from undo files whose records are not needed, so the
    /// cost is the image's size plus a few bytes per record of the newer undos, however long
    /// the chain.
    pub fn restore(
        &self,
        change_id: ChangeId,
        out: &Path,
        progress: impl FnMut(u64, u64),
    ) -> Result<Point> {
        let target = self
            .fs
            .create(out)
            .map_err(io_err(format!("creating {}", out.display())))?;
        self.restore_onto(change_id, &*target, true, progress)
    }

    /// Writes the image of point `change_id` onto the block device `device` (an LV, a
    /// `/dev/nbdX`), which must hold at least the point's size: never resized, and every
    /// byte of the point written, zeros too (a device holds old data where a new file holds
    /// a hole; zeros are discarded where the device guarantees they then read as zeros).
    /// Bytes past the point's size are left as they were. Checked like a file restore.
    pub fn restore_to_device(
        &self,
        change_id: ChangeId,
        device: &Path,
        device_size: u64,
        progress: impl FnMut(u64, u64),
    ) -> Result<Point> {
        let size = self.point_map(change_id)?.point().disk_size;
        if device_size < size {
            return Err(StoreError::Mismatch(format!(
                "{} holds {device_size} bytes, point {change_id} is {size}: restore onto a \
                 device at least that large",
                device.display()
            )));
        }
        let target = self
            .fs
            .open_rw(device)
            .map_err(io_err(format!("opening {}", device.display())))?;
        self.restore_onto(change_id, &*target, false, progress)
    }

    /// The restore into `target`: a new file (`sparse`: sized, and zeros left as holes) or
    /// a device (every byte written).
    fn restore_onto(
        &self,
        change_id: ChangeId,
        target: &dyn FileAt,
        sparse: bool,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Point> {
        let mut map = self.point_map(change_id)?;
        let point = map.point().clone();
        let size = point.disk_size;
        if sparse {
            target
                .set_len(size)
                .map_err(io_err("sizing the restored image"))?;
        }
        let zero = |start: u64, len: u64| {
            if sparse || len == 0 {
                return Ok(());
            }
            target
                .zero(start, len)
                .map_err(io_err("zeroing the restored device"))
        };
        let mut buf = vec![0u8; CHUNK];
        let runs = map.runs().to_vec();
        for (start, end, source) in runs {
            // Zeros need nothing written to a new file: it starts as one hole. Nor do the
            // holes of full.img (`allocation` finds them): a sparse disk costs what its data
            // costs.
            if source == Source::Zero {
                zero(start, end - start)?;
            }
            let mut pos = start;
            while source != Source::Zero && pos < end {
                let mut runs = map.allocation(pos, end, 1024);
                if runs.iter().all(|&(len, _)| len == 0) {
                    // Nothing described (never expected): the rest is read as data.
                    runs = vec![(end - pos, false)];
                }
                for (len, hole) in runs {
                    if hole {
                        zero(pos, len)?;
                    } else {
                        let range = (pos, pos + len);
                        copy_range(&mut map, target, &mut buf, range, sparse, |at| {
                            progress(at, size)
                        })?;
                    }
                    pos += len;
                    progress(pos, size);
                }
            }
            progress(end, size);
        }
        progress(size, size);
        target
            .sync()
            .map_err(io_err("syncing the restored image"))?;
        self.check_image(target, &point, "the restored image")?;
        Ok(point)
    }

    /// Reads `image` whole and compares its digest with the one recorded for `point`
    /// (nothing to compare for points merged before digests existed). A mismatch means the
    /// store does not hold what was committed: an error, never a silent wrong image.
    pub(super) fn check_image(&self, image: &dyn FileAt, point: &Point, what: &str) -> Result<()> {
        let (Some(expected), Some(bs)) = (&point.image_digest, self.manifest.block_size) else {
            return Ok(());
        };
        let got = match Leaves::of_image(image, point.disk_size, bs) {
            Ok(l) => l.digest(),
            Err(DigestError::Io(e)) => return Err(io_err(format!("reading {what}"))(e)),
            Err(_) => return Ok(()),
        };
        if got != *expected {
            return Err(StoreError::Damaged {
                disk: self.name.clone(),
                why: format!(
                    "{what} of point {} has digest {got}, the point was committed as {expected}",
                    point.change_id
                ),
            });
        }
        Ok(())
    }

    /// Re-reads every undo file and any staged delta, checking every CRC, and full.img
    /// against the newest point's digest; returns how many files were checked.
    pub fn verify(&self) -> Result<Verified> {
        let mut done = Verified {
            points: self.points().len(),
            ..Verified::default()
        };
        for p in self.points() {
            if let Some(undo) = &p.undo {
                let path = self.dir.join(undo);
                let (h, _) = delta::verify(self.reader(&path, "opening an undo")?)?;
                if h.to != p.change_id || h.from != p.from {
                    return Err(StoreError::Damaged {
                        disk: self.name.clone(),
                        why: format!("{undo} is not the undo of {}", p.change_id),
                    });
                }
                done.files += 1;
                done.bytes += self.fs.open(&path).and_then(|f| f.len()).unwrap_or(0);
            }
        }
        let size = self
            .fs
            .open(&self.full_path())
            .and_then(|f| f.len())
            .unwrap_or(0);
        match self.points().last() {
            Some(p) if p.disk_size != size => Err(StoreError::Damaged {
                disk: self.name.clone(),
                why: format!("full.img is {size} bytes, the newest point {}", p.disk_size),
            }),
            Some(p) if p.image_digest.is_some() => {
                let full = self.open_file(&self.full_path(), "opening full.img")?;
                self.check_image(&full, p, "full.img")?;
                done.files += 1;
                done.bytes += size;
                done.full_checked = true;
                Ok(done)
            }
            _ => Ok(done),
        }
    }
}

/// Copies `[from, to)` of the point through `map` into `target`, in `buf`-sized pieces,
/// telling `progress` how far it got. `sparse`: zero blocks are left as the new file's
/// holes; otherwise every byte is written (a device).
fn copy_range(
    map: &mut PointMap,
    target: &dyn FileAt,
    buf: &mut [u8],
    (from, to): (u64, u64),
    sparse: bool,
    mut progress: impl FnMut(u64),
) -> Result<()> {
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(buf.len() as u64) as usize;
        map.read_at(&mut buf[..n], pos)?;
        if sparse {
            write_sparse(target, &buf[..n], pos)?;
        } else {
            target
                .write_all_at(&buf[..n], pos)
                .map_err(io_err("writing the restored image"))?;
        }
        pos += n as u64;
        progress(pos);
    }
    Ok(())
}
