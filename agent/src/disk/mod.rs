//! A protected disk: the backing file or block device, its tracker, and the write gate.
//!
//! Write path order (the invariant's): intent durable (`Tracker::intend`) -> data written to
//! the backing -> block recorded (`Tracker::record`) -> reply. Every write holds the gate
//! shared for that whole sequence; a cut or an export holds it exclusively, so a cut waits for
//! writes in flight and holds new ones: every write acknowledged before the cut is in it.

mod cursors;
mod export;
mod failback;
mod hold;
mod resize;
mod snapshot;
mod status;

pub use cursors::{CursorMeta, CursorOp, CursorStatus};
pub use export::ExportPlan;
pub use failback::{Committing, FailbackOp, FailbackState};
pub use hold::{Sealed, hold_and_seal_all};
pub use resize::Resized;
pub use snapshot::COW_LIMIT_DEFAULT;

use cursors::{cursor_status, load_cursor_meta};
use snapshot::Snapshot;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock};

use std::time::Duration;

use crate::config::CutPolicy;

use ctk::delta;
use ctk::{
    ChangeId, Extent, FileStorage, Generation, OpenOutcome, Since, Tracker, TrackerConfig,
    TrackerError,
};

/// Why a disk operation failed (the NBD front maps each to an errno).
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("range at {offset} (+{length}) is outside the {size}-byte disk")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error("the disk is shut down")]
    Shutdown,
    #[error("an export of this disk is already running")]
    Busy,
    #[error("delta export failed: {0}")]
    Delta(#[from] delta::DeltaError),
    #[error("resize refused: {0}")]
    Resize(String),
    #[error(
        "a failback is under way: the disk takes only failback's writes until the cutover \
         (`ctk-agent failback --final`)"
    )]
    FailingBack,
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
    /// The disk's size: changed only by `resize`, under the exclusive gate.
    size: AtomicU64,
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
    /// A failback is under way (`<journal>.failback` exists): writes other than its own
    /// are refused.
    failback: AtomicBool,
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
        let failing_back = failback::load(journal)?.is_some();
        if failing_back {
            tracing::warn!(
                disk = name,
                "a failback is under way: NBD writes are refused until its cutover"
            );
        }
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
                size: AtomicU64::new(size),
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
                failback: AtomicBool::new(failing_back),
            },
            outcome,
        ))
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The backing's device and inode: what a loop device over the image itself would show.
    pub fn image_id(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    /// Refuses a range that is not inside the disk.
    pub fn check(&self, offset: u64, length: u64) -> Result<(), DiskError> {
        let size = self.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset,
                length,
                size,
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
        // The proof covers exactly the range written (paired with `record`, which takes it).
        debug_assert!(intent.offset() == offset && intent.length() == length);
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
        self.check_not_failing_back()?;
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
        self.check_not_failing_back()?;
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
        self.check_not_failing_back()?;
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
    /// hold's time went, and what `inside` returned. (A group's cut: `hold_and_seal_all`.)
    pub fn hold_and_seal(
        &self,
        destage: impl FnOnce() -> anyhow::Result<()>,
        inside: impl FnOnce(ChangeId) -> anyhow::Result<serde_json::Value>,
    ) -> anyhow::Result<(ChangeId, HoldTimes, serde_json::Value)> {
        let mut inside = Some(inside);
        let mut sealed = hold_and_seal_all(&[self], destage, |_, id| {
            (inside.take().expect("one disk, one call"))(id)
        })?;
        Ok(sealed.pop().expect("one disk, one seal"))
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
        // A backing resized behind the agent is a change its next cut records.
        if self.backing_size_changed()? {
            return Ok(false);
        }
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

    /// Remembers the last cut's record for `status` (the pipeline writes the cut log).
    pub fn set_last_cut(&self, entry: serde_json::Value) {
        if let Ok(mut last) = self.last_cut.lock() {
            *last = Some(entry);
        }
    }

    pub fn status(&self) -> DiskStatus {
        let c = &self.counters;
        let tracker = self.tracker().ok();
        let t = tracker.as_ref().and_then(|g| g.as_ref());
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DiskStatus {
            name: self.name.clone(),
            path: self.path.clone(),
            journal: self.journal.clone(),
            size: self.size(),
            latest: t.map(|t| t.latest()),
            open_epoch_blocks: t.map(|t| t.map().open_blocks().len()),
            block_size: t.map(|t| t.geometry().block_size()),
            can_quiesce: self.policy.can_quiesce(),
            cursors: t.map(|t| {
                t.map()
                    .cursors()
                    .map(|(n, id)| {
                        let meta =
                            self.cursor_meta.lock().ok().and_then(|m| {
                                m.get(n).filter(|(at, _)| *at == id).map(|(_, m)| *m)
                            });
                        cursor_status(t, n, id, meta)
                    })
                    .collect()
            }),
            journal_syncs: t.map(|t| t.syncs()),
            reads: load(&c.reads),
            writes: load(&c.writes),
            bytes_written: load(&c.bytes_written),
            flushes: load(&c.flushes),
            trims: load(&c.trims),
            write_zeroes: load(&c.zeroes),
            cow_blocks_preserved: load(&c.cow_blocks),
            cow_waits: load(&c.cow_waits),
            export_reads: if self.direct_ok.load(Ordering::Relaxed) {
                "direct"
            } else {
                "page cache"
            }
            .into(),
            last_cut: self.last_cut.lock().ok().and_then(|l| l.clone()),
            failback: self.failback_state(),
        }
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

/// Whether two open files are one (device and inode).
fn same_file(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino() && a.rdev() == b.rdev(),
        _ => false,
    }
}

/// One protected disk in `status`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DiskStatus {
    pub name: String,
    pub path: PathBuf,
    pub journal: PathBuf,
    pub size: u64,
    /// The latest durable cut (none once the disk is shut down).
    pub latest: Option<ChangeId>,
    pub open_epoch_blocks: Option<u64>,
    pub block_size: Option<u32>,
    /// Whether it has quiesce steps (hooks or freezes): only then can a cut be
    /// application-consistent.
    pub can_quiesce: bool,
    pub cursors: Option<Vec<CursorStatus>>,
    pub journal_syncs: Option<u64>,
    pub reads: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    pub cow_blocks_preserved: u64,
    pub cow_waits: u64,
    /// "direct" or "page cache".
    pub export_reads: String,
    /// The last cut's record, as in the cut log.
    pub last_cut: Option<serde_json::Value>,
    /// A failback under way: NBD writes are refused until its cutover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback: Option<FailbackState>,
}
