//! Where each byte of a restore point lives, and reads through that map: the first undo
//! newer than the point that holds the byte (the pre-image a later merge overwrote, which is
//! the point's byte), else full.img. A restore walks the map once from start to end; an
//! export of the point (the failover issue) reads any range of it, each read going to the
//! sources of just that range.

use super::*;

/// Where one run of a point's bytes comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A data record of a newer point's undo file (`undo` indexes the map's undo files, in
    /// the order of their points; `record` that file's records).
    Undo { undo: usize, record: usize },
    /// Zeros: a zero record of an undo, or past the end of full.img.
    Zero,
    /// full.img at the same offset.
    Full,
}

/// Decoded undo records kept for reads that come back to them (a restore meets a record
/// again after a closer undo covered part of it; an export's reader reads on in order).
const DECODED_KEPT: usize = 8;

/// The map of one point: disjoint runs covering `[0, size)`, ascending, each with its source.
pub struct PointMap {
    point: Point,
    undos: Vec<DeltaFile<Box<dyn FileAt>>>,
    full: Box<dyn FileAt>,
    runs: Vec<(u64, u64, Source)>,
    /// (undo, record) -> its data, most recently used last.
    decoded: Vec<((usize, usize), Vec<u8>)>,
}

impl DiskStore {
    /// The map of point `change_id`, kept in this store.
    pub fn point_map(&self, change_id: ChangeId) -> Result<PointMap> {
        PointMap::build(&*self.fs, &self.dir, &self.manifest, change_id)
    }
}

/// Undo files opened and indexed, in the order given, `OPENERS` at a time.
fn open_all(fs: &dyn Vfs, dir: &Path, undos: &[&str]) -> Result<Vec<DeltaFile<Box<dyn FileAt>>>> {
    const OPENERS: usize = 8;
    let open = |undo: &str| -> Result<DeltaFile<Box<dyn FileAt>>> {
        let path = dir.join(undo);
        let file = fs
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        Ok(DeltaFile::open(file)?)
    };
    let mut out = Vec::with_capacity(undos.len());
    for batch in undos.chunks(OPENERS) {
        let opened: Vec<Result<_>> = std::thread::scope(|s| {
            let handles: Vec<_> = batch.iter().map(|u| s.spawn(|| open(u))).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("opening an undo does not panic"))
                .collect()
        });
        for file in opened {
            out.push(file?);
        }
    }
    Ok(out)
}

impl PointMap {
    /// The map of point `change_id` as `manifest` (read from `dir`) describes the store:
    /// the undo files of its newer points opened and indexed (record heads only), and
    /// full.img. A merge in progress counts as the newest point: its undo (durable before
    /// the manifest recorded it, and before full.img is touched) holds whatever the apply
    /// overwrites, so reads are right however far the apply has gone.
    pub(super) fn build(
        fs: &dyn Vfs,
        dir: &Path,
        manifest: &Manifest,
        change_id: ChangeId,
    ) -> Result<PointMap> {
        let name = &manifest.disk;
        let index = manifest
            .points
            .iter()
            .position(|p| p.change_id == change_id)
            .ok_or_else(|| manifest.no_such_point(change_id))?;
        let point = manifest.points[index].clone();
        let size = point.disk_size;
        let damaged = |why: String| StoreError::Damaged {
            disk: name.clone(),
            why,
        };
        let mut newer: Vec<&str> = Vec::new();
        for p in &manifest.points[index + 1..] {
            let undo = p.undo.as_deref();
            newer.push(undo.ok_or_else(|| damaged(format!("point {} has no undo", p.change_id)))?);
        }
        match &manifest.applying {
            None => {}
            Some(Applying::Direct { .. }) => {
                return Err(damaged(
                    "a first full is being written into full.img: no point can be read now".into(),
                ));
            }
            Some(a) => {
                newer.push(a.undo().ok_or_else(|| {
                    damaged(format!("the merge of {} has no undo", a.change_id()))
                })?)
            }
        }
        let mut covered = Covered::default();
        let mut runs = Vec::new();
        // The undo files' indexes are read apart (a seek per record head): cold, one at a
        // time, the reads of a point far back add up, so a few are read at once.
        let opened = open_all(fs, dir, &newer)?;
        let mut undos = Vec::new();
        for file in opened {
            for (i, r) in file.records().iter().enumerate() {
                for (start, end) in covered.claim(r.offset, r.end().min(size)) {
                    let source = if r.zero {
                        Source::Zero
                    } else {
                        Source::Undo {
                            undo: undos.len(),
                            record: i,
                        }
                    };
                    runs.push((start, end, source));
                }
            }
            undos.push(file);
        }
        // Everything no newer merge overwrote is as the full holds it; past its end, zeros.
        let full = fs
            .open(&dir.join("full.img"))
            .map_err(io_err("opening full.img"))?;
        let full_len = full.len().map_err(io_err("reading a size"))?;
        for (start, end) in covered.claim(0, size) {
            if start < full_len {
                runs.push((start, end.min(full_len), Source::Full));
            }
            if end > full_len {
                runs.push((start.max(full_len), end, Source::Zero));
            }
        }
        runs.sort_unstable_by_key(|&(start, _, _)| start);
        debug_assert!(
            runs.windows(2).all(|w| w[0].1 == w[1].0)
                && runs.first().is_none_or(|r| r.0 == 0)
                && runs.last().is_none_or(|r| r.1 == size),
            "the runs of a point cover it exactly once"
        );
        Ok(PointMap {
            point,
            undos,
            full,
            runs,
            decoded: Vec::new(),
        })
    }
    pub fn point(&self) -> &Point {
        &self.point
    }

    pub fn size(&self) -> u64 {
        self.point.disk_size
    }

    /// The runs, ascending: `(start, end, source)`.
    pub fn runs(&self) -> &[(u64, u64, Source)] {
        &self.runs
    }

    /// Reads `buf.len()` bytes of the point at `offset` (within its size).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.size() => end,
            _ => {
                return Err(StoreError::Protocol(format!(
                    "a read of {} bytes at {offset}, past the point's {} bytes",
                    buf.len(),
                    self.size()
                )));
            }
        };
        // The first run that ends after `offset`.
        let first = self.runs.partition_point(|&(_, e, _)| e <= offset);
        for i in first..self.runs.len() {
            let (start, stop, source) = self.runs[i];
            if start >= end {
                break;
            }
            let (from, to) = (start.max(offset), stop.min(end));
            let out = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match source {
                Source::Zero => out.fill(0),
                Source::Full => self
                    .full
                    .read_exact_at(out, from)
                    .map_err(io_err("reading full.img"))?,
                Source::Undo { undo, record } => {
                    let r = self.undos[undo].records()[record];
                    let data = self.decoded(undo, record)?;
                    out.copy_from_slice(
                        &data[(from - r.offset) as usize..(to - r.offset) as usize],
                    );
                }
            }
        }
        Ok(())
    }

    /// `base:allocation` of `[offset, end)`: runs of `(length, hole)` where a hole reads as
    /// zeros and holds nothing (a zero record, past full.img's end, or a hole in full.img,
    /// found with SEEK_DATA / SEEK_HOLE). At most about `max` runs, from `offset` on; a
    /// filesystem that cannot tell reports full.img's ranges as data, which NBD allows.
    pub fn allocation(&self, offset: u64, end: u64, max: usize) -> Vec<(u64, bool)> {
        let end = end.min(self.size());
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |len: u64, hole: bool| match out.last_mut() {
            Some((l, h)) if *h == hole => *l += len,
            _ => out.push((len, hole)),
        };
        let first = self.runs.partition_point(|&(_, e, _)| e <= offset);
        let mut count = 0;
        for &(start, stop, source) in &self.runs[first..] {
            let (from, to) = (start.max(offset), stop.min(end));
            if from >= to || count >= max {
                break;
            }
            match source {
                Source::Zero => push(to - from, true),
                Source::Undo { .. } => push(to - from, false),
                Source::Full => {
                    let mut pos = from;
                    while pos < to && count < max {
                        let (len, hole) = match self.full.next_data(pos) {
                            Ok(Some(d)) if d <= pos => {
                                let h = self.full.next_hole(pos).unwrap_or(to).min(to);
                                if h <= pos {
                                    (to - pos, false)
                                } else {
                                    (h - pos, false)
                                }
                            }
                            Ok(Some(d)) => (d.min(to) - pos, true),
                            Ok(None) => (to - pos, true),
                            Err(_) => (to - pos, false),
                        };
                        push(len, hole);
                        pos += len;
                        count += 1;
                    }
                }
            }
            count += 1;
        }
        out
    }

    /// The data of an undo record, decoded once and kept among the last few.
    fn decoded(&mut self, undo: usize, record: usize) -> Result<&[u8]> {
        let key = (undo, record);
        match self.decoded.iter().position(|(k, _)| *k == key) {
            Some(i) => {
                let entry = self.decoded.remove(i);
                self.decoded.push(entry);
            }
            None => {
                let r = self.undos[undo].records()[record];
                let data = self.undos[undo].read(&r)?.to_vec();
                if self.decoded.len() == DECODED_KEPT {
                    self.decoded.remove(0);
                }
                self.decoded.push((key, data));
            }
        }
        Ok(&self.decoded.last().expect("pushed above").1)
    }
}
