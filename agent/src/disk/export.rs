//! An export: the snapshot begun at a cut written as a delta (to a file, or a FIFO a
//! replication streams from), read directly or through the page cache with read-ahead.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ctk::delta::{DeltaHeader, DeltaSummary, WriteOptions};
use ctk::{ChangeId, Extent, Since};

use super::{DiskError, ProtectedDisk};

/// What an export sends.
#[derive(Clone, Debug)]
pub enum ExportPlan {
    /// The blocks written since `Since` (everything written, for a first full).
    Changed(Since),
    /// The rest of a cut-off push of `Changed(since)` up to cut `prior`, of which the
    /// receiver holds every record below `next_offset`: the blocks changed since `since` at
    /// or after `next_offset`, and below it those changed since `prior` (the others there are
    /// read for their leaves, not sent: they are as the receiver holds them).
    Resume {
        since: Since,
        prior: ChangeId,
        next_offset: u64,
    },
    /// A resync: every unit of the disk whose hash (`ctk::digest::unit_hash`) differs from
    /// the receiver's, as a delta from the receiver's newest point `base`. `theirs` holds the
    /// receiver's hashes, 32 bytes per unit in disk order; a unit without one (a replica of
    /// another size, or an empty file: the last-resort full copy) is sent.
    Compare {
        base: ChangeId,
        unit: u32,
        theirs: PathBuf,
    },
}

/// Asks the kernel to read ahead along an export's extents, so the disk works while the
/// export compresses what it already has (the export reads one piece at a time, and the
/// kernel's own readahead does not follow scattered extents). It walks the export's pieces
/// as `DeltaWriter::write_read` cuts them and hints every one that `skip` does not claim
/// (those are read directly, past the cache).
struct Prefetch<'a, S: Fn(u64, usize) -> bool> {
    fd: std::os::fd::RawFd,
    extents: &'a [ctk::Extent],
    /// The extent the next piece is in, and where in it.
    next: usize,
    pos: u64,
    /// Bytes walked and bytes read so far, in extent order.
    issued: u64,
    consumed: u64,
    skip: S,
}

impl<S: Fn(u64, usize) -> bool> Prefetch<'_, S> {
    /// How far ahead of the export the hints run.
    const WINDOW: u64 = 32 << 20;

    fn consumed(&mut self, n: u64) {
        self.consumed += n;
        while self.issued < self.consumed + Self::WINDOW && self.next < self.extents.len() {
            let e = self.extents[self.next];
            let start = self.pos.max(e.offset);
            let len = (e.end() - start).min(ctk::limits::DELTA_RECORD_DATA_MAX as u64);
            if !(self.skip)(start, len as usize) {
                // SAFETY: fadvise on an open descriptor touches no memory; it is only a hint.
                unsafe {
                    libc::posix_fadvise(
                        self.fd,
                        start as i64,
                        len as i64,
                        libc::POSIX_FADV_WILLNEED,
                    )
                };
            }
            self.issued += len;
            self.pos = start + len;
            if self.pos >= e.end() {
                self.next += 1;
            }
        }
    }
}

/// How long an export into a FIFO waits for its reader to open it.
const FIFO_OPEN_WAIT: Duration = Duration::from_secs(30);

/// Opens an export's output: a new file, or an existing FIFO (a streamed replication). A
/// FIFO is opened without blocking, retried until its reader is there: a blocking open
/// would wait forever for a reader that was killed before it opened its end, and hold the
/// disk's one export slot with it.
fn open_output(out: &Path) -> io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let is_fifo = std::fs::metadata(out).is_ok_and(|m| m.file_type().is_fifo());
    if !is_fifo {
        return File::create(out);
    }
    let deadline = Instant::now() + FIFO_OPEN_WAIT;
    loop {
        match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(out)
        {
            Ok(f) => {
                // Writes then block while the reader is behind, as they should.
                // SAFETY: fcntl on an open descriptor with integer flags touches no memory.
                let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
                if flags < 0
                    || unsafe {
                        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK)
                    } < 0
                {
                    return Err(io::Error::last_os_error());
                }
                return Ok(f);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "nobody opened the FIFO {} to read the export",
                        out.display()
                    ),
                ));
            }
            Err(e) => return Err(e),
        }
    }
}

impl ProtectedDisk {
    /// Whether an export reads the piece `[offset, offset + len)` directly: only whole
    /// record-sized, aligned pieces (a first full, long runs of changes). Shorter pieces
    /// (scattered small changes) go through the page cache, where `Prefetch` hints let the
    /// kernel read many at once; direct, one read at a time, each would wait out the disk's
    /// latency.
    fn reads_directly(&self, offset: u64, len: usize) -> bool {
        self.direct.is_some()
            && self.direct_ok.load(Ordering::Relaxed)
            && len == ctk::limits::DELTA_RECORD_DATA_MAX
            && offset.is_multiple_of(crate::readahead::DIRECT_ALIGN as u64)
    }

    /// Reads the backing for an export: directly (past the page cache) where
    /// `reads_directly` says so and the buffer is aligned, else through the cache. Either
    /// way the bytes are the file's: a direct read first writes back any dirty cached pages
    /// of its range.
    fn read_for_export(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = &self.direct
            && self.reads_directly(offset, buf.len())
            && crate::readahead::direct_fits(offset, buf)
        {
            match direct.read_exact_at(buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_ok.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        disk = %self.name, error = %e,
                        "a direct read was refused: exports of this disk read through the page cache from now on"
                    );
                }
                done => return done,
            }
        }
        self.file.read_exact_at(buf, offset)
    }

    /// Writes the snapshot begun for `to` as a delta into `out` while writes continue, then
    /// drops the snapshot. Returns the changed bytes, the delta's totals and the most memory
    /// preserved copies took. `out` may be a FIFO (a replication streaming the export). With
    /// `leaves`, also writes there, for every block of the delta, its leaf of the image digest
    /// (`ctk::digest`) as a pair of little-endian u64s (block, leaf): computed here, from the
    /// data in hand, so the replication does not decode the delta again.
    pub fn export_snapshot(
        &self,
        plan: &ExportPlan,
        to: ChangeId,
        out: &Path,
        leaves: Option<&Path>,
        zstd_level: i32,
    ) -> Result<(u64, DeltaSummary, u64), DiskError> {
        let result = self.export_snapshot_inner(plan, to, out, leaves, zstd_level);
        let peak = match self.snapshot.lock() {
            Ok(mut guard) => guard.take().map_or(0, |s| s.peak_bytes),
            Err(_) => 0,
        };
        self.snapshot_room.notify_all();
        result.map(|(changed, summary)| (changed, summary, peak))
    }

    fn export_snapshot_inner(
        &self,
        plan: &ExportPlan,
        to: ChangeId,
        out: &Path,
        leaves: Option<&Path>,
        zstd_level: i32,
    ) -> Result<(u64, DeltaSummary), DiskError> {
        let mut leaves_out = match leaves {
            Some(p) => Some(BufWriter::new(File::create(p)?)),
            None => None,
        };
        let (block_size, extents, leaves_only) = self.plan_extents(plan, to)?;
        let header = self.header_for(plan, block_size, to);
        let changed: u64 = extents.iter().map(|e| e.length).sum();
        // Read-ahead hints, for the pieces read through the page cache (a compare reads
        // into plain buffers: all of them); direct reads are read ahead by
        // `readahead::export`'s thread, and a hint would only read them twice.
        let may_direct = !matches!(plan, ExportPlan::Compare { .. });
        let mut prefetch = Prefetch {
            fd: self.file.as_raw_fd(),
            extents: &extents,
            next: 0,
            pos: 0,
            issued: 0,
            consumed: 0,
            skip: |offset, len| may_direct && self.reads_directly(offset, len),
        };
        // The piece as of the cut. Kept apart from the leaves below so that a read-ahead
        // thread does only this (the disk's wait and the snapshot's bookkeeping) and the
        // hashing runs on the encoder's thread: with both on the reader, the reader was the
        // pace of a first full (never idle, a third of its time hashing).
        let mut read_piece = |offset: u64, buf: &mut [u8]| -> io::Result<()> {
            prefetch.consumed(buf.len() as u64);
            self.read_as_of_cut(offset, buf)
        };
        let mut leaves_of = |offset: u64, buf: &[u8]| -> io::Result<()> {
            // Pieces start on a block boundary and hold whole blocks (but for the disk's
            // partial last block), so each chunk is one block.
            if let Some(w) = leaves_out.as_mut() {
                let first = offset / block_size as u64;
                for (i, block) in buf.chunks(block_size as usize).enumerate() {
                    w.write_all(&(first + i as u64).to_le_bytes())?;
                    w.write_all(&ctk::digest::leaf(block).to_le_bytes())?;
                }
            }
            Ok(())
        };
        let file = open_output(out)?;
        let options = WriteOptions {
            zstd_level: Some(zstd_level),
        };
        // Large writes: into a FIFO each one is a wake-up of the reader on the far side.
        let out = BufWriter::with_capacity(1 << 20, file);
        let (writer, summary, changed) = match plan {
            ExportPlan::Changed(_) => {
                let (w, s) = crate::readahead::export(
                    read_piece, leaves_of, &extents, &header, options, out,
                )?;
                (w, s, changed)
            }
            ExportPlan::Resume { .. } => {
                // The blocks the receiver already holds: read (as of the cut) only for their
                // leaves, so the image digest still covers the whole image.
                if leaves.is_some() {
                    // Aligned, so these reads can be direct too.
                    let mut buf =
                        crate::readahead::AlignedBuf::new(ctk::limits::DELTA_RECORD_DATA_MAX);
                    for e in &leaves_only {
                        let mut pos = e.offset;
                        while pos < e.end() {
                            let n = (e.end() - pos).min(buf.len() as u64) as usize;
                            read_piece(pos, &mut buf[..n])?;
                            leaves_of(pos, &buf[..n])?;
                            pos += n as u64;
                        }
                    }
                }
                let (w, s) = crate::readahead::export(
                    &mut read_piece,
                    &mut leaves_of,
                    &extents,
                    &header,
                    options,
                    out,
                )?;
                (w, s, changed)
            }
            ExportPlan::Compare { unit, theirs, .. } => {
                if *unit % block_size != 0 {
                    return Err(DiskError::Io(io::Error::other(format!(
                        "resync unit {unit} is not a multiple of the disk's {block_size}-byte blocks"
                    ))));
                }
                {
                    let theirs = io::BufReader::new(File::open(theirs)?);
                    let read_at = |offset: u64, buf: &mut [u8]| {
                        read_piece(offset, buf)?;
                        leaves_of(offset, buf)
                    };
                    ctk::push::compare_export(
                        read_at,
                        self.size(),
                        *unit,
                        theirs,
                        &header,
                        options,
                        out,
                    )?
                }
            }
        };
        finish_export(writer, leaves_out)?;
        Ok((changed, summary))
    }

    /// The extents an export sends, and for a resumed push the ones the receiver already
    /// holds (read only for their leaves).
    fn plan_extents(
        &self,
        plan: &ExportPlan,
        to: ChangeId,
    ) -> Result<(u32, Vec<Extent>, Vec<Extent>), DiskError> {
        let mut leaves_only = Vec::new();
        let (block_size, extents) = self.with_tracker(|t| {
            let extents = match plan {
                ExportPlan::Changed(since) => t.changed(*since, to)?,
                ExportPlan::Resume {
                    since,
                    prior,
                    next_offset,
                } => {
                    let geometry = t.geometry();
                    let all = t.changed_blocks(*since, to)?;
                    let later = t.changed_blocks(Since::Id(*prior), to)?;
                    let (send, kept) =
                        ctk::push::resume_blocks(&all, &later, *next_offset, &geometry);
                    leaves_only = ctk::map::blocks_to_extents(&kept, &geometry);
                    ctk::map::blocks_to_extents(&send, &geometry)
                }
                ExportPlan::Compare { .. } if self.size() == 0 => Vec::new(),
                ExportPlan::Compare { .. } => vec![Extent {
                    offset: 0,
                    length: self.size(),
                }],
            };
            Ok((t.geometry().block_size(), extents))
        })?;
        Ok((block_size, extents, leaves_only))
    }

    /// The header of an export's delta: this disk now, from the plan's base to `to`.
    fn header_for(&self, plan: &ExportPlan, block_size: u32, to: ChangeId) -> DeltaHeader {
        DeltaHeader {
            disk_id: self.name.clone(),
            disk_size: self.size(),
            block_size,
            from: plan_base(plan),
            to,
        }
    }

    /// Reads a piece of the disk as of the export's cut: the backing, with the blocks
    /// writers preserved since the cut put back.
    fn read_as_of_cut(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut guard = self
            .snapshot
            .lock()
            .map_err(|_| io::Error::other("snapshot lock poisoned"))?;
        let snap = guard
            .as_mut()
            .ok_or_else(|| io::Error::other("the export's snapshot is gone"))?;
        // Under the lock no writer can overwrite a pending block of this piece: it has to
        // preserve it first, and it cannot until we are done.
        self.read_for_export(buf, offset)?;
        let (first, last) = (
            (offset >> snap.shift) as u32,
            ((offset + buf.len() as u64 - 1) >> snap.shift) as u32,
        );
        let copies: Vec<u32> = snap
            .preserved
            .range(first..=last)
            .map(|(&b, _)| b)
            .collect();
        for block in copies {
            let data = snap.preserved.remove(&block).expect("listed above");
            let at = (((block as u64) << snap.shift) - offset) as usize;
            buf[at..at + data.len()].copy_from_slice(&data);
            snap.preserved_bytes -= data.len() as u64;
        }
        snap.pending.remove_range(first..=last);
        drop(guard);
        self.snapshot_room.notify_all();
        Ok(())
    }
}

/// Flushes an export and its leaves. A FIFO (a streamed replication) has nothing to sync;
/// a file must be durable.
fn finish_export(delta: BufWriter<File>, leaves: Option<BufWriter<File>>) -> io::Result<()> {
    let file = delta.into_inner().map_err(|e| e.into_error())?;
    if file.metadata()?.is_file() {
        file.sync_all()?;
    }
    if let Some(w) = leaves {
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    Ok(())
}

/// The point an export's delta is based on: none for a first full.
fn plan_base(plan: &ExportPlan) -> Option<ChangeId> {
    match plan {
        ExportPlan::Changed(Since::All)
        | ExportPlan::Resume {
            since: Since::All, ..
        } => None,
        ExportPlan::Changed(Since::Id(id))
        | ExportPlan::Resume {
            since: Since::Id(id),
            ..
        } => Some(*id),
        ExportPlan::Compare { base, .. } => Some(*base),
    }
}
