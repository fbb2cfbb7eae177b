//! A drill's throwaway overlay: writes to an exposed point land in a sparse scratch file, never
//! in the store. Block granular (4 KiB): a block once written is read from the overlay, every
//! other byte from the point. Nothing here is made durable (a drill's writes are discarded
//! when it stops), and the file is removed when the overlay is dropped.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use roaring::RoaringTreemap;

use crate::store::{LiveReader, StoreError};

/// The overlay's unit.
pub const BLOCK: u64 = 4096;

/// Why an overlay read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("reading the exposed point")]
    Point(#[from] StoreError),
    #[error("the drill's overlay {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Overlay {
    path: PathBuf,
    file: File,
    size: u64,
    /// The blocks written, under the lock that also orders their read-modify-writes.
    written: Mutex<RoaringTreemap>,
}

impl Overlay {
    /// A new, empty overlay of `size` bytes at `path` (which must not exist: an overlay is
    /// never shared or reused).
    pub fn create(path: &Path, size: u64) -> Result<Overlay, OverlayError> {
        let io = |source| OverlayError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io)?;
        if let Err(e) = file.set_len(size) {
            let _ = std::fs::remove_file(path);
            return Err(io(e));
        }
        Ok(Overlay {
            path: path.to_owned(),
            file,
            size,
            written: Mutex::new(RoaringTreemap::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self) -> impl Fn(std::io::Error) -> OverlayError + '_ {
        |source| OverlayError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn written(&self) -> std::sync::MutexGuard<'_, RoaringTreemap> {
        // A panic under the lock leaves at worst a block marked before its data landed,
        // in a scratch file: taken as it is.
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether any block of `[offset, end)` was written.
    pub fn touches(&self, offset: u64, end: u64) -> bool {
        end > offset
            && self
                .written()
                .range_cardinality(offset / BLOCK..=(end - 1) / BLOCK)
                > 0
    }

    /// Reads `buf.len()` bytes at `offset`: written blocks from the overlay, the rest from
    /// the point through `base`.
    pub fn read_at(
        &self,
        base: &mut LiveReader,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), OverlayError> {
        // The runs of blocks with one source, decided under the lock; the reads after it
        // (a write racing a read of the same block is the client's own race, as on a disk).
        let runs = {
            let written = self.written();
            runs(offset, buf.len(), BLOCK, |block| written.contains(block))
        };
        read_runs(&runs, buf, offset, &self.file, base).map_err(|e| match e {
            Ok(source) => self.io()(source),
            Err(e) => e.into(),
        })
    }

    /// Writes `data` at `offset` (zeros when `data` is `None`, `length` bytes): a block not
    /// yet in the overlay is first copied up from the point where the write covers it only
    /// in part.
    pub fn write_at(
        &self,
        base: &mut LiveReader,
        data: Option<&[u8]>,
        offset: u64,
        length: u64,
    ) -> Result<(), OverlayError> {
        let end = offset + length;
        let mut written = self.written();
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        for block in [first, last] {
            let (start, stop) = (block * BLOCK, ((block + 1) * BLOCK).min(self.size));
            let partial = offset > start || end < stop;
            if partial && !written.contains(block) {
                let mut copy = vec![0u8; (stop - start) as usize];
                base.read_at(&mut copy, start)?;
                self.file.write_all_at(&copy, start).map_err(self.io())?;
                written.insert(block);
            }
        }
        write_or_zero(&self.file, data, offset, length).map_err(self.io())?;
        written.insert_range(first..=last);
        Ok(())
    }
}

/// Splits `[offset, offset + len)` into runs of one source: `(start, end, mine)`, where
/// `mine(unit)` says whether unit number `unit` (of `unit` bytes) is the overlay's.
pub(crate) fn runs(
    offset: u64,
    len: usize,
    unit: u64,
    mine: impl Fn(u64) -> bool,
) -> Vec<(u64, u64, bool)> {
    let end = offset + len as u64;
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        let n = pos / unit;
        let stop = ((n + 1) * unit).min(end);
        let m = mine(n);
        match runs.last_mut() {
            Some((_, e, last)) if *last == m => *e = stop,
            _ => runs.push((pos, stop, m)),
        }
        pos = stop;
    }
    runs
}

/// Reads `runs` (from `runs`) into `buf`, which starts at disk offset `offset`: the
/// overlay's from `file`, the rest from the point. An error is the overlay file's
/// (`Ok(io::Error)`) or the point's.
pub(crate) fn read_runs(
    runs: &[(u64, u64, bool)],
    buf: &mut [u8],
    offset: u64,
    file: &File,
    base: &mut LiveReader,
) -> Result<(), Result<std::io::Error, StoreError>> {
    for &(start, stop, mine) in runs {
        let out = &mut buf[(start - offset) as usize..(stop - offset) as usize];
        if mine {
            file.read_exact_at(out, start).map_err(Ok)?;
        } else {
            base.read_at(out, start).map_err(Err)?;
        }
    }
    Ok(())
}

/// Writes `data` at `offset`, or `length` zeros when `data` is `None` (TRIM, WRITE_ZEROES).
pub(super) fn write_or_zero(
    file: &File,
    data: Option<&[u8]>,
    offset: u64,
    length: u64,
) -> std::io::Result<()> {
    match data {
        Some(data) => file.write_all_at(data, offset),
        None => {
            let zeros = vec![0u8; length.min(1 << 20) as usize];
            let end = offset + length;
            let mut pos = offset;
            while pos < end {
                let n = (end - pos).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], pos)?;
                pos += n as u64;
            }
            Ok(())
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
