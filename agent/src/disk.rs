//! A protected disk: the backing file or block device, its tracker, and the write gate.
//!
//! Write path order (the invariant's): intent durable (`Tracker::intend`) -> data written to
//! the backing -> block recorded (`Tracker::record`) -> reply. Every write holds the gate
//! shared for that whole sequence; a cut or an export holds it exclusively, so a cut waits for
//! writes in flight and holds new ones: every write acknowledged before the cut is in it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock};

use roaring::RoaringBitmap;
use std::time::{Duration, Instant};

use crate::pipeline::{CutPolicy, CutReport};

use ctk::delta::{self, DeltaHeader, DeltaSummary, WriteOptions};
use ctk::{
    ChangeId, Extent, FileStorage, Generation, OpenOutcome, Since, Tracker, TrackerConfig,
    TrackerError,
};
use serde_json::json;

/// Why a disk operation failed; each maps to an NBD error number.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("range at {offset} (+{length}) is outside the {size}-byte disk")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("I/O error on the backing: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error("the disk is shut down")]
    Shutdown,
    #[error("an export of this disk is already running")]
    Busy,
    #[error("delta export failed: {0}")]
    Delta(#[from] delta::DeltaError),
}

impl DiskError {
    /// The errno an NBD reply carries for this error.
    pub fn errno(&self, is_write: bool) -> u32 {
        use crate::nbd::{EINVAL, EIO, ENOSPC, EPERM};
        match self {
            DiskError::OutOfRange { .. } if is_write => ENOSPC,
            DiskError::OutOfRange { .. } => EINVAL,
            DiskError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => ENOSPC,
            DiskError::Shutdown => EPERM,
            _ => EIO,
        }
    }
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    cow_blocks: AtomicU64,
    cow_waits: AtomicU64,
}

/// A point-in-time view for an export in progress.
struct Snapshot {
    shift: u32,
    /// Blocks the export has yet to read.
    pending: RoaringBitmap,
    /// Contents at the cut of pending blocks that writes have since overwritten.
    preserved: BTreeMap<u32, Box<[u8]>>,
    preserved_bytes: u64,
    peak_bytes: u64,
}

/// Where a cut's hold of NBD writes spent its time.
#[derive(Clone, Copy, Debug, Default)]
pub struct HoldTimes {
    /// From asking to hold writes to releasing them: what a writer can be stalled by.
    pub total: Duration,
    /// Waiting for writes in flight to finish.
    pub drain: Duration,
    /// Sealing the epoch in memory and appending its journal record.
    pub seal: Duration,
    /// Syncing the seal's record, after writes were released (not part of `total`).
    pub sync: Duration,
}

/// Most memory preserved copies may take before writers to not-yet-exported blocks wait.
pub const COW_LIMIT_DEFAULT: u64 = 256 << 20;

pub struct ProtectedDisk {
    pub name: String,
    pub path: PathBuf,
    pub journal: PathBuf,
    file: File,
    /// The backing opened a second time for direct reads (no page cache) by exports; `None`
    /// where direct I/O is off or refused. `direct_ok` turns it off for good if a direct
    /// read is refused anyway (an alignment this code does not know of).
    direct: Option<File>,
    direct_ok: AtomicBool,
    size: u64,
    /// This agent's hold on the journal (`owner`): the image's lock lives on `file`.
    _journal_lock: crate::owner::LockFile,
    /// `None` once closed at shutdown.
    tracker: Mutex<Option<Tracker<FileStorage>>>,
    gate: RwLock<()>,
    counters: Counters,
    /// The cut pipeline for this disk.
    pub policy: CutPolicy,
    last_cut: Mutex<Option<serde_json::Value>>,
    snapshot: Mutex<Option<Snapshot>>,
    snapshot_room: Condvar,
    cow_limit: u64,
    /// What was learned about each cursor as it moved (for a replication cursor: when the
    /// receiver last committed, the cut time of that point, the replication rate), with the
    /// point it was learned at. Kept in `<journal>.cursors` so the RPO is known after a
    /// restart (see `load_cursor_meta`).
    cursor_meta: Mutex<std::collections::HashMap<String, (ChangeId, CursorMeta)>>,
}

/// What a cursor's mover told the agent along with the move (see `ProtectedDisk::cursor`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CursorMeta {
    /// When the cursor was last set (unix ms).
    pub set_unix_ms: u64,
    /// When the cut the cursor names was taken (unix ms): the RPO is the age of this.
    pub cut_unix_ms: Option<u64>,
    /// The replication's recent rate (changed bytes per second): the ETA is backlog / rate.
    pub rate_bps: Option<f64>,
}

impl ProtectedDisk {
    /// Opens the backing read-write and the tracker beside it.
    pub fn open(
        name: &str,
        path: &Path,
        journal: &Path,
        block_size: u64,
        policy: CutPolicy,
    ) -> Result<(ProtectedDisk, OpenOutcome), anyhow::Error> {
        use anyhow::Context;
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        // A block device is opened exclusively: the kernel then refuses to mount it or to
        // let another exclusive opener in, either of which would write past the tracker.
        let is_device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(if is_device { libc::O_EXCL } else { 0 })
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EBUSY) => anyhow::anyhow!(
                    "disk {name:?}: the block device {} is in use (mounted, or held by another \
                     program): writes that bypass the agent would not be tracked",
                    path.display()
                ),
                _ => anyhow::Error::new(e)
                    .context(format!("opening disk {name:?} at {}", path.display())),
            })?;
        crate::owner::lock_image(&file, path)?;
        // Before the journal is read: a second agent must not replay or rewrite it.
        let journal_lock = crate::owner::lock_journal(journal)?;
        // Seeking to the end gives the size of a file and of a block device alike.
        let size = file.seek(SeekFrom::End(0))?;
        let mut config = TrackerConfig::new(name, size);
        config.block_size = block_size;
        let (tracker, outcome) =
            Tracker::open(FileStorage::new(journal), config, Generation::random)
                .with_context(|| format!("opening the change journal {}", journal.display()))?;
        let cursor_meta = load_cursor_meta(journal, &tracker);
        let direct = crate::readahead::open_direct(path)
            .with_context(|| {
                format!(
                    "opening disk {name:?} at {} for direct reads",
                    path.display()
                )
            })?
            // The same file, not whatever the path names a moment later.
            .filter(|d| same_file(d, &file));
        tracing::debug!(
            disk = name,
            direct = direct.is_some(),
            "exports read the backing"
        );
        Ok((
            ProtectedDisk {
                name: name.to_owned(),
                path: path.to_owned(),
                journal: journal.to_owned(),
                file,
                direct_ok: AtomicBool::new(direct.is_some()),
                direct,
                size,
                _journal_lock: journal_lock,
                tracker: Mutex::new(Some(tracker)),
                gate: RwLock::new(()),
                counters: Counters::default(),
                policy,
                last_cut: Mutex::new(None),
                snapshot: Mutex::new(None),
                snapshot_room: Condvar::new(),
                cow_limit: COW_LIMIT_DEFAULT,
                cursor_meta: Mutex::new(cursor_meta),
            },
            outcome,
        ))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The backing's device and inode: what a loop device over the image itself would show.
    pub fn image_id(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    fn check(&self, offset: u64, length: u64) -> Result<(), DiskError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                length,
                size: self.size,
            }),
        }
    }

    fn tracker(&self) -> Result<MutexGuard<'_, Option<Tracker<FileStorage>>>, DiskError> {
        // A panic while the tracker was held is a bug; refuse to go on with its state.
        self.tracker
            .lock()
            .map_err(|_| DiskError::Io(io::Error::other("tracker lock poisoned")))
    }

    fn with_tracker<T>(
        &self,
        f: impl FnOnce(&mut Tracker<FileStorage>) -> Result<T, DiskError>,
    ) -> Result<T, DiskError> {
        let mut guard = self.tracker()?;
        let tracker = guard.as_mut().ok_or(DiskError::Shutdown)?;
        f(tracker)
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Changes `[offset, offset + length)` with `apply`, in the order that keeps the
    /// invariant. The block is recorded even if `apply` failed: part of it may have landed.
    fn tracked_change(
        &self,
        offset: u64,
        length: u64,
        apply: impl FnOnce() -> io::Result<()>,
    ) -> Result<(), DiskError> {
        self.check(offset, length)?;
        let _gate = self
            .gate
            .read()
            .map_err(|_| DiskError::Io(io::Error::other("gate poisoned")))?;
        // The intent's fsync (a region's first write) runs without the tracker lock, so
        // writes to regions already live go on meanwhile; concurrent fsyncs of the journal
        // coalesce in the filesystem's own commit.
        let intent = match self.with_tracker(|t| Ok(t.begin_intend(offset, length)?))? {
            ctk::Intend::Ready(intent) => intent,
            ctk::Intend::Sync(mut pending) => {
                pending.sync();
                self.with_tracker(|t| Ok(t.finish_intend(pending)?))?
            }
        };
        // A block an export still has to read is copied aside before it is overwritten. If
        // that fails, the write is refused (the intent is recorded: nothing changed, only an
        // over-report).
        let result = match self.preserve(offset, length) {
            Ok(()) => apply(),
            Err(e) => Err(e),
        };
        self.with_tracker(|t| {
            t.record(intent);
            Ok(())
        })?;
        Ok(result?)
    }

    /// Would a change of this range wait on an fsync (an intent not yet durable, or FUA)?
    /// A scheduling hint for the NBD front: such requests go to a thread of their own.
    pub fn change_would_sync(&self, offset: u64, length: u64, fua: bool) -> bool {
        fua || self
            .tracker()
            .ok()
            .and_then(|g| g.as_ref().map(|t| !t.intent_ready(offset, length)))
            .unwrap_or(false)
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DiskError> {
        self.tracked_change(offset, data.len() as u64, || {
            self.file.write_all_at(data, offset)
        })?;
        if fua {
            self.file.sync_data()?;
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Makes every completed write durable. The tracking of those writes already is: their
    /// intents were synced before the data was written.
    pub fn flush(&self) -> Result<(), DiskError> {
        self.file.sync_data()?;
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Discards a range: it reads as zeros afterwards (a punched hole, or written zeros).
    pub fn trim(&self, offset: u64, length: u64) -> Result<(), DiskError> {
        self.tracked_change(offset, length, || self.zero_range(offset, length, true))?;
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    pub fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.tracked_change(offset, length, || {
            self.zero_range(offset, length, may_punch)
        })?;
        if fua {
            self.file.sync_data()?;
        }
        self.counters.zeroes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn zero_range(&self, offset: u64, length: u64, may_punch: bool) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let mode = if may_punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on an open descriptor with in-range arguments touches no memory.
        let rc =
            unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, length as i64) };
        if rc == 0 {
            return Ok(());
        }
        // Block devices and some filesystems lack these modes: write the zeros.
        let zeros = vec![0u8; (length.min(1 << 20)) as usize];
        let mut pos = offset;
        while pos < offset + length {
            let n = (offset + length - pos).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Holds NBD writes (those in flight finish first), runs `destage` (caches below the
    /// tracking point), seals the epoch, runs `inside` with the new ChangeId while writes are
    /// still held, releases them, then flushes the backing. Returns the ChangeId, where the
    /// hold's time went, and what `inside` returned.
    pub fn hold_and_seal(
        &self,
        destage: impl FnOnce() -> anyhow::Result<()>,
        inside: impl FnOnce(ChangeId) -> anyhow::Result<serde_json::Value>,
    ) -> anyhow::Result<(ChangeId, HoldTimes, serde_json::Value)> {
        // New writes wait from the moment the cut asks for the gate (the lock prefers
        // writers), so the hold is timed from the request, not from when it was granted.
        let asked = Instant::now();
        let (id, times, value) = {
            let hold = self
                .gate
                .write()
                .map_err(|_| DiskError::Io(io::Error::other("gate poisoned")))?;
            let drained = asked.elapsed();
            destage()?;
            let before_seal = Instant::now();
            // Sealed in memory and appended; the fsync waits until writes flow again.
            let mut pending = self.with_tracker(|t| Ok(t.begin_cut()?))?;
            let seal = before_seal.elapsed();
            let value = inside(pending.undurable_id());
            let times = HoldTimes {
                total: asked.elapsed(),
                drain: drained,
                seal,
                sync: Duration::ZERO,
            };
            drop(hold);
            // The seal's fsync runs with no lock held: writes (which need the tracker lock
            // for every intent and record) go on meanwhile. The ChangeId is returned only
            // once it is durable.
            let synced = Instant::now();
            pending.sync();
            let id = self.with_tracker(|t| Ok(t.finish_cut(pending)?))?;
            let times = HoldTimes {
                sync: synced.elapsed(),
                ..times
            };
            (id, times, value?)
        };
        // Make the cut's data durable on the backing. This needs no hold: every write
        // acknowledged before the seal is flushed by it (later ones too, harmlessly), and
        // readers of the cut (exports) read through this host, protected by copy-on-write.
        // Flushing inside the hold made the hold as long as the page cache was dirty (tens of
        // ms under load; see BENCHMARKS.md).
        self.file.sync_data().map_err(DiskError::Io)?;
        Ok((id, times, value))
    }

    pub fn changed(
        &self,
        since: Since,
        upto: Option<ChangeId>,
    ) -> Result<(ChangeId, Vec<Extent>), DiskError> {
        self.with_tracker(|t| {
            let upto = upto.unwrap_or(t.latest());
            Ok((upto, t.changed(since, upto)?))
        })
    }

    /// Whether no write was acknowledged since the cut `since`: nothing in the epochs sealed
    /// after it nor in the open one. A write in flight now is not acknowledged yet, so the
    /// answer holds as of now: the replica at `since` is the disk as of now.
    pub fn unchanged_since(&self, since: ChangeId) -> Result<bool, DiskError> {
        self.with_tracker(|t| {
            let sealed = t.changed_blocks_unconfirmed(Since::Id(since), t.map().latest())?;
            Ok(sealed.is_empty() && t.map().open_blocks().is_empty())
        })
    }

    /// Checks that `since` can be answered now (same generation, not compacted away, not in
    /// the future): what `ctk:changed:<since>` needs before a client may select it.
    pub fn check_answerable(&self, since: ChangeId) -> Result<(), DiskError> {
        // Asking for nothing (from `since` to itself) runs every check on `since` and
        // unions no epoch: cheap enough to do per query under the tracker lock.
        self.with_tracker(|t| {
            t.changed_blocks(Since::Id(since), since)?;
            Ok(())
        })
    }

    /// The newest exactly answerable ChangeIds, newest first, at most `max` of them: the
    /// latest cut and the boundary below each kept epoch.
    pub fn recent_ids(&self, max: usize) -> Vec<ChangeId> {
        self.with_tracker(|t| {
            let latest = t.latest();
            let mut ids = vec![latest];
            let map = t.map();
            let floor = map.floor();
            for epoch in map.epochs().collect::<Vec<_>>().into_iter().rev() {
                if ids.len() >= max || epoch.after < floor {
                    break;
                }
                ids.push(ChangeId::new(latest.generation, epoch.after));
            }
            ids.dedup();
            Ok(ids)
        })
        .unwrap_or_default()
    }

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

    /// Whether an export reads the piece `[offset, offset + len)` directly: only whole
    /// record-sized, aligned pieces (a first full, long runs of changes). Shorter pieces
    /// (scattered small changes) go through the page cache, where `Prefetch` hints let the
    /// kernel read many at once; direct, one read at a time, each would wait out the disk's
    /// latency (2% of 4 GiB in 64 KiB extents staged 1.4x slower that way, BENCHMARKS.md).
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

    /// Copies the blocks of `[offset, offset + length)` that a running export has not read yet,
    /// so it still reads them as of its cut. At the memory cap, waits for the export to move
    /// on (backpressure) rather than grow without bound.
    fn preserve(&self, offset: u64, length: u64) -> io::Result<()> {
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
                let len = ((1u64 << snap.shift).min(self.size - start)) as usize;
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
                ExportPlan::Compare { .. } if self.size == 0 => Vec::new(),
                ExportPlan::Compare { .. } => vec![Extent {
                    offset: 0,
                    length: self.size,
                }],
            };
            Ok((t.geometry().block_size(), extents))
        })?;
        let header = DeltaHeader {
            disk_id: self.name.clone(),
            disk_size: self.size,
            block_size,
            from: match plan {
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
            },
            to,
        };
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
                        read_at, self.size, *unit, theirs, &header, options, out,
                    )?
                }
            }
        };
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        // A FIFO (a streamed replication) has nothing to sync; a file must be durable.
        if file.metadata()?.is_file() {
            file.sync_all()?;
        }
        if let Some(w) = leaves_out {
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        Ok((changed, summary))
    }

    /// Registers, advances or drops a consumer cursor (durable when it returns). `meta`'s
    /// cut time and rate, when given, feed `status` (RPO, ETA).
    pub fn cursor(
        &self,
        op: &str,
        name: &str,
        at: Option<ChangeId>,
        meta: CursorMeta,
    ) -> Result<(), DiskError> {
        let at = self.with_tracker(|t| {
            let at = at.unwrap_or(t.latest());
            match op {
                "register" => t.register_cursor(name, at)?,
                "advance" => t.advance_cursor(name, at)?,
                _ => t.drop_cursor(name)?,
            }
            Ok(at)
        })?;
        if let Ok(mut known) = self.cursor_meta.lock() {
            if op == "drop" {
                known.remove(name);
            } else {
                // A move that says nothing of the rate (a push too small to measure the link)
                // keeps the last one known.
                let before = known.get(name).map(|(_, m)| *m).unwrap_or_default();
                let meta = CursorMeta {
                    set_unix_ms: unix_ms(),
                    rate_bps: meta.rate_bps.or(before.rate_bps),
                    ..meta
                };
                known.insert(name.to_owned(), (at, meta));
            }
            save_cursor_meta(&self.journal, &known);
        }
        Ok(())
    }

    /// Records a cut: in memory for `status`, and appended to `<journal>.cuts` (one JSON
    /// object per line, for whoever audits the cuts after a restart: their time and
    /// consistency level). The log is bounded (`append_bounded`).
    pub fn log_cut(&self, report: &CutReport) {
        let mut entry = report.to_json();
        entry["time_unix_ms"] = json!(unix_ms());
        let mut path = self.journal.clone().into_os_string();
        path.push(".cuts");
        let line = format!("{entry}\n");
        if let Err(e) = append_bounded(Path::new(&path), line.as_bytes(), CUT_LOG_MAX) {
            tracing::warn!(error = %e, "could not append to the cut log");
        }
        if let Ok(mut last) = self.last_cut.lock() {
            *last = Some(entry);
        }
    }

    pub fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        let tracker = self.tracker().ok();
        let t = tracker.as_ref().and_then(|g| g.as_ref());
        json!({
            "name": self.name,
            "path": self.path.display().to_string(),
            "journal": self.journal.display().to_string(),
            "size": self.size,
            "latest": t.map(|t| t.latest().to_string()),
            "open_epoch_blocks": t.map(|t| t.map().open_blocks().len()),
            "block_size": t.map(|t| t.geometry().block_size()),
            "can_quiesce": self.policy.can_quiesce(),
            "cursors": t.map(|t| t.map().cursors().map(|(n, id)| {
                let meta = self
                    .cursor_meta
                    .lock()
                    .ok()
                    .and_then(|m| m.get(n).filter(|(at, _)| *at == id).map(|(_, m)| *m));
                cursor_status(t, n, id, meta)
            }).collect::<Vec<_>>()),
            "journal_syncs": t.map(|t| t.syncs()),
            "reads": c.reads.load(Ordering::Relaxed),
            "writes": c.writes.load(Ordering::Relaxed),
            "bytes_written": c.bytes_written.load(Ordering::Relaxed),
            "flushes": c.flushes.load(Ordering::Relaxed),
            "trims": c.trims.load(Ordering::Relaxed),
            "write_zeroes": c.zeroes.load(Ordering::Relaxed),
            "cow_blocks_preserved": c.cow_blocks.load(Ordering::Relaxed),
            "cow_waits": c.cow_waits.load(Ordering::Relaxed),
            "export_reads": if self.direct_ok.load(Ordering::Relaxed) { "direct" } else { "page cache" },
            "last_cut": self.last_cut.lock().ok().and_then(|l| l.clone()),
        })
    }

    /// Closes the tracker cleanly (after writes in flight finish), so a restart answers
    /// exactly as before. Later operations fail with `Shutdown`.
    pub fn close(&self) -> Result<(), DiskError> {
        let _hold = self
            .gate
            .write()
            .map_err(|_| DiskError::Io(io::Error::other("gate poisoned")))?;
        self.file.sync_data()?;
        let tracker = self.tracker()?.take().ok_or(DiskError::Shutdown)?;
        Ok(tracker.close()?)
    }
}

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

/// One cursor in `status`: where it is, and for a replication cursor the RPO (age of the cut
/// it names), the backlog (bytes written since that cut, cut or not yet) and the ETA to
/// replicate it at the last reported rate.
fn cursor_status(
    t: &Tracker<FileStorage>,
    name: &str,
    at: ChangeId,
    meta: Option<CursorMeta>,
) -> serde_json::Value {
    let now = unix_ms();
    let secs = |ms: u64| now.saturating_sub(ms) as f64 / 1000.0;
    let block_size = t.geometry().block_size() as u64;
    let backlog = t
        .changed_blocks(Since::Id(at), t.latest())
        .ok()
        .map(|mut blocks| {
            blocks |= t.map().open_blocks();
            // The last block may be partial; a block-granular figure is close enough here.
            (blocks.len() * block_size).min(t.geometry().disk_size())
        });
    let rate = meta.and_then(|m| m.rate_bps).filter(|r| *r > 0.0);
    json!({
        "name": name,
        "at": at.to_string(),
        "set_unix_ms": meta.map(|m| m.set_unix_ms),
        "age_s": meta.map(|m| secs(m.set_unix_ms)),
        "cut_unix_ms": meta.and_then(|m| m.cut_unix_ms),
        "rpo_s": meta.and_then(|m| m.cut_unix_ms).map(secs),
        "backlog_bytes": backlog,
        "rate_bytes_per_s": rate,
        "eta_s": match (backlog, rate) {
            (Some(0), _) => Some(0.0),
            (Some(b), Some(r)) => Some(b as f64 / r),
            _ => None,
        },
    })
}

/// Where the cursors' meta is kept: `<journal>.cursors`, a JSON object of
/// `name -> {"at": ChangeId, ...CursorMeta}`.
fn cursor_meta_path(journal: &Path) -> PathBuf {
    let mut path = journal.as_os_str().to_owned();
    path.push(".cursors");
    PathBuf::from(path)
}

/// Longest `<journal>.cursors` read back (a few hundred bytes a cursor).
const CURSOR_META_MAX: u64 = 1 << 20;

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedMeta {
    at: String,
    #[serde(flatten)]
    meta: CursorMeta,
}

/// The cursors' meta as saved, for the cursors the journal still holds at the same point
/// (a cursor moved since, say by a run whose save was lost, gets nothing: its RPO is
/// unknown until it moves again, never the age of another cut). A missing, oversized or
/// unreadable file gives nothing, with a warning for the last two: it only informs.
fn load_cursor_meta(
    journal: &Path,
    tracker: &Tracker<FileStorage>,
) -> std::collections::HashMap<String, (ChangeId, CursorMeta)> {
    let path = cursor_meta_path(journal);
    let mut known = std::collections::HashMap::new();
    let text = match std::fs::metadata(&path) {
        Err(_) => return known,
        Ok(m) if m.len() > CURSOR_META_MAX => {
            tracing::warn!(file = %path.display(), "cursor meta file too large: ignored");
            return known;
        }
        Ok(_) => std::fs::read_to_string(&path),
    };
    let saved: std::collections::HashMap<String, SavedMeta> = match text
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(saved) => saved,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cursor meta file unreadable: ignored");
            return known;
        }
    };
    for (name, at) in tracker.map().cursors() {
        if let Some(s) = saved.get(name)
            && s.at == at.to_string()
        {
            known.insert(name.to_owned(), (at, s.meta));
        }
    }
    known
}

/// Replaces `<journal>.cursors` with `known` (written beside and renamed, so a crash leaves
/// the old or the new file). Not fsynced: losing it only loses the RPO until the next move.
fn save_cursor_meta(
    journal: &Path,
    known: &std::collections::HashMap<String, (ChangeId, CursorMeta)>,
) {
    let saved: std::collections::BTreeMap<&str, SavedMeta> = known
        .iter()
        .map(|(name, (at, meta))| {
            (
                name.as_str(),
                SavedMeta {
                    at: at.to_string(),
                    meta: *meta,
                },
            )
        })
        .collect();
    let path = cursor_meta_path(journal);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let written = serde_json::to_vec(&saved)
        .map_err(io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(file = %path.display(), error = %e, "could not save the cursor meta");
    }
}

/// The size at which the cut log is rotated: about 4,600 cuts of about 230 bytes, 77
/// minutes of one-second cuts. Continuous mode cuts every second forever, and an unbounded
/// log grew by about 20 MB a day.
const CUT_LOG_MAX: u64 = 1 << 20;

/// Appends `line` to the log at `path`; once the log has reached `max` bytes it first
/// becomes `<path>.1` (replacing the one before), so the two hold between `max` and
/// `2 * max` bytes of the newest lines.
fn append_bounded(path: &Path, line: &[u8], max: u64) -> io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= max) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        std::fs::rename(path, &old)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(line)
}

/// Whether two open files are one (device and inode).
fn same_file(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino() && a.rdev() == b.rdev(),
        _ => false,
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_cut_log_is_rotated_and_keeps_the_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("d.img.ctk.cuts");
        for i in 0..1000 {
            super::append_bounded(&log, format!("{i:09}\n").as_bytes(), 1000).unwrap();
        }
        let rotated = dir.path().join("d.img.ctk.cuts.1");
        let (now, before) = (
            std::fs::read_to_string(&log).unwrap(),
            std::fs::read_to_string(&rotated).unwrap(),
        );
        // 10 bytes a line: each file holds 100 lines; the last line written is the newest.
        assert!(
            now.len() <= 1000 && before.len() == 1000,
            "{} {}",
            now.len(),
            before.len()
        );
        assert!(now.ends_with("000000999\n"), "{now}");
        // The two together are the newest lines, in order, with none missing.
        let lines: Vec<u64> = before
            .lines()
            .chain(now.lines())
            .map(|l| l.parse().unwrap())
            .collect();
        assert!(
            lines.windows(2).all(|w| w[1] == w[0] + 1),
            "a gap or reorder"
        );
        assert_eq!(*lines.last().unwrap(), 999);
        // Nothing else was left beside them.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

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
