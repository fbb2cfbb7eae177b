//! A failover's overlay: the live disk of the recovered VM, over the point it started from.
//! Unlike a drill's, it is kept: every write is tracked by a ctk `Tracker` exactly as the
//! agent tracks its disks, it survives a crash of the receiver with every acknowledged write,
//! and it knows which blocks changed since the point (what failback sends).
//!
//! Two files in the failover's directory: `disk.img`, sparse, the disk's size, and `journal`,
//! the tracker's (docs/format.md section 3). A region (1 MiB, the tracker's intent unit) is
//! either the point's, read through the exposure, or the overlay's, read from `disk.img`. A
//! region becomes the overlay's on its first write, in this order:
//!
//! 1. copy-up: the point's bytes of the whole region are written into `disk.img` and synced;
//! 2. the write's intent is made durable (`Tracker::intend`);
//! 3. the data is written into `disk.img`, recorded, and only then acknowledged.
//!
//! After a crash the tracker reports every region with a durable intent as changed, and each
//! such region was copied up before its intent (step 1 before 2), so "the tracker's change
//! set, taken region by region" is exactly the set of regions `disk.img` holds whole. A
//! region copied up whose intent never became durable holds the point's bytes and is read
//! from the point again: the same bytes. Nothing else is needed to know where a byte lives.
//! `disk.img` is synced on FLUSH and FUA, as a disk's cache is; a SIGKILL loses nothing that
//! reached the kernel, so no acknowledged write.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use ctk::{ChangeId, FileStorage, Generation, OpenOutcome, Since, Tracker, TrackerConfig};
use roaring::RoaringBitmap;
use serde::Serialize;

use super::overlay::{OverlayError, read_runs, runs, write_or_zero};
use crate::store::LiveReader;

/// Copy-up and presence unit: the tracker's smallest intent region.
pub const REGION: u64 = ctk::limits::REGION_SIZE_MIN;
/// The tracker's block: the change set is exact to 4 KiB.
pub const BLOCK: u64 = ctk::limits::BLOCK_SIZE_MIN as u64;
/// The materialization watermark's file in the failover's directory: the count of leading
/// regions copied, as decimal text.
const MATERIALIZED: &str = "materialized";
/// Least time between two cuts of the overlay's tracker (taken at FLUSH): each seals the
/// blocks written since the last one into the journal, so that a crash over-reports less.
const CUT_EVERY: Duration = Duration::from_secs(1);

/// Least time between two `on_flush` reports (the running `failover start` also reports
/// each second the overlay changed, so none is lost for long).
const REPORT_EVERY: Duration = Duration::from_millis(100);

/// What the overlay holds, for `failover status`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Changes {
    /// 4 KiB blocks written since the point.
    pub blocks: u64,
    /// Regions held whole by `disk.img`.
    pub regions: u64,
    /// Leading regions copied by materialization, of `total_regions`.
    pub materialized_regions: u64,
    pub total_regions: u64,
}

pub struct Tracked {
    path: PathBuf,
    file: File,
    size: u64,
    tracker: Mutex<Option<Tracker<FileStorage>>>,
    /// Regions `disk.img` holds whole (copied up, then written).
    present: RwLock<RoaringBitmap>,
    /// The failover's directory (for the materialization watermark).
    dir: PathBuf,
    /// Regions below this are in `disk.img` by materialization (`materialize_step`), whether
    /// or not anything wrote them: kept durable in `materialized`, and not in the change set.
    materialized: AtomicU64,
    /// Orders copy-ups (one at a time; a region is copied once).
    copying: Mutex<()>,
    /// When the tracker was last cut, and whether that cut sealed writes (then one more
    /// cut follows, so that it is not the journal's latest: see `replay`).
    last_cut: Mutex<(Instant, bool)>,
    /// When `on_flush` was last called (it walks the change set: not on every FLUSH of a
    /// client that flushes often).
    last_report: Mutex<Option<Instant>>,
    /// Told what the overlay holds after every FLUSH (`failover status` is exact as of the
    /// client's last flush).
    on_flush: Mutex<Option<OnFlush>>,
}

/// What `Tracked::on_flush` calls.
pub type OnFlush = Box<dyn Fn(&Changes) + Send>;

fn io(path: &Path) -> impl Fn(std::io::Error) -> OverlayError + '_ {
    move |source| OverlayError::Io {
        path: path.to_owned(),
        source,
    }
}

fn tracker_error(path: &Path, e: ctk::TrackerError) -> OverlayError {
    OverlayError::Io {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl Tracked {
    /// Opens the overlay in `dir` (creating it, empty, if it is not there) for a disk of
    /// `size` bytes whose failover started at `origin` (the tracker's disk id, so a journal
    /// of another failover is never taken for this one's). What opening found is returned
    /// too: a journal that cannot prove which regions were written refuses, since the
    /// overlay's bytes could not be told from the point's.
    pub fn open(
        dir: &Path,
        size: u64,
        origin: &str,
    ) -> Result<(Tracked, OpenOutcome), OverlayError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("disk.img");
        let journal = dir.join("journal");
        let journal_exists = journal.exists();
        // A journal without its image: the image was moved or lost. Never start it empty
        // under a journal that says regions of it hold the VM's writes.
        if journal_exists && std::fs::metadata(&path).map_or(true, |m| m.len() == 0) {
            return Err(OverlayError::Io {
                path,
                source: std::io::Error::other(
                    "the failover's journal is there but its image is missing or empty (if \
                     --materialize moved it, start again with the same --materialize PATH)",
                ),
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        let mut len = file.metadata().map_err(io(&path))?.len();
        if !journal_exists {
            // A new overlay starts empty: whatever an earlier one left (a rollback cut
            // short) would otherwise be read as this one's, and so would its watermark.
            file.set_len(0).map_err(io(&path))?;
            len = 0;
            let _ = std::fs::remove_file(dir.join(MATERIALIZED));
        }
        if len != size {
            if len != 0 {
                return Err(OverlayError::Io {
                    path,
                    source: std::io::Error::other(format!(
                        "is {len} bytes, not the failed-over disk's {size}: not this failover's"
                    )),
                });
            }
            file.set_len(size).map_err(io(&path))?;
        }
        let (tracker, outcome) = Tracker::open(
            FileStorage::new(&journal),
            overlay_config(size, origin),
            Generation::random,
        )
        .map_err(|e| tracker_error(&journal, e))?;
        if let OpenOutcome::NewGeneration { reason } = &outcome {
            return Err(OverlayError::Io {
                path: journal,
                source: std::io::Error::other(format!(
                    "cannot prove which regions the failover wrote ({reason}); the overlay \
                     cannot be used: keep {} for inspection",
                    path.display()
                )),
            });
        }
        let blocks = written(&tracker).map_err(|e| tracker_error(&journal, e))?;
        let mut present = RoaringBitmap::new();
        for b in &blocks {
            present.insert((u64::from(b) * BLOCK / REGION) as u32);
        }
        // A watermark that does not read back (or whose CRC does not match) is taken as
        // none: those regions are then read from the point again, which is what they held
        // unless an intent (above) says not. One too high would read zeros for the point.
        let materialized = read_watermark(dir).min(size.div_ceil(REGION));
        present.insert_range(0..materialized as u32);
        Ok((
            Tracked {
                path,
                file,
                size,
                tracker: Mutex::new(Some(tracker)),
                present: RwLock::new(present),
                dir: dir.to_owned(),
                materialized: AtomicU64::new(materialized),
                copying: Mutex::new(()),
                last_cut: Mutex::new((Instant::now(), false)),
                last_report: Mutex::new(None),
                on_flush: Mutex::new(None),
            },
            outcome,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Regions of the disk, and how many leading ones are materialized.
    pub fn materialized(&self) -> (u64, u64) {
        (
            self.materialized.load(Ordering::Acquire),
            self.size.div_ceil(REGION),
        )
    }

    /// Copies the next `n` regions the overlay does not hold yet from the point into
    /// `disk.img` (the write path's copy-up, synced), then moves the durable watermark past
    /// them. Once it reaches the end, `disk.img` is a standalone image of the disk and the
    /// point is never read again. Returns the new watermark.
    pub fn materialize_step(&self, base: &mut LiveReader, n: u64) -> Result<u64, OverlayError> {
        let (done, total) = self.materialized();
        if done >= total {
            return Ok(total);
        }
        let next = (done + n.max(1)).min(total);
        self.copy_up(base, done, next - 1)?;
        let tmp = self.dir.join("materialized.tmp");
        let write = || -> std::io::Result<()> {
            let f = File::create(&tmp)?;
            f.write_all_at(watermark_text(next).as_bytes(), 0)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.dir.join(MATERIALIZED))?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(io(&tmp))?;
        self.materialized.store(next, Ordering::Release);
        Ok(next)
    }

    /// Calls `f` with what the overlay holds after every FLUSH from now on.
    pub fn on_flush(&self, f: OnFlush) {
        *self.on_flush.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// The 4 KiB blocks written since the point (what failback sends): exact after a clean
    /// stop, exact to the region where writes were in flight at a crash.
    pub fn changed_blocks(&self) -> Result<RoaringBitmap, OverlayError> {
        let guard = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        let tracker = guard.as_ref().ok_or_else(|| self.closed())?;
        written(tracker).map_err(|e| tracker_error(&self.path, e))
    }

    /// Cuts the tracker now (durable) and returns the cut with the blocks written after
    /// `since` up to it (`None`, or a cut it cannot answer for: every block written since
    /// the point). Failback's last pass: nothing writes the overlay any more.
    pub fn cut_with_changes(
        &self,
        since: Option<ChangeId>,
    ) -> Result<(ChangeId, RoaringBitmap), OverlayError> {
        self.with_tracker(|t| {
            let upto = t.cut()?;
            Ok((upto, blocks_since(t, since, upto)?))
        })
    }

    /// The latest cut, and the blocks written after it (none once a last pass cut it and
    /// nothing wrote since).
    pub fn after_latest(&self) -> Result<(ChangeId, u64), OverlayError> {
        self.with_tracker(|t| Ok((t.latest(), t.map().open_blocks().len())))
    }

    /// How many blocks and regions were written since the point.
    pub fn changes(&self) -> Result<Changes, OverlayError> {
        let (materialized_regions, total_regions) = self.materialized();
        Ok(Changes {
            blocks: self.changed_blocks()?.len(),
            regions: self.present_read().len(),
            materialized_regions,
            total_regions,
        })
    }

    fn closed(&self) -> OverlayError {
        OverlayError::Io {
            path: self.path.clone(),
            source: std::io::Error::other("the failover's overlay is closed"),
        }
    }

    fn present_read(&self) -> std::sync::RwLockReadGuard<'_, RoaringBitmap> {
        // Only ever inserted into, after the step that makes the insert true.
        self.present.read().unwrap_or_else(|p| p.into_inner())
    }

    fn with_tracker<T>(
        &self,
        f: impl FnOnce(&mut Tracker<FileStorage>) -> Result<T, ctk::TrackerError>,
    ) -> Result<T, OverlayError> {
        let mut guard = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        let tracker = guard.as_mut().ok_or_else(|| self.closed())?;
        f(tracker).map_err(|e| tracker_error(&self.path, e))
    }

    /// Whether any byte of `[offset, end)` is the overlay's.
    pub fn touches(&self, offset: u64, end: u64) -> bool {
        end > offset
            && self
                .present_read()
                .range_cardinality((offset / REGION) as u32..=((end - 1) / REGION) as u32)
                > 0
    }

    /// Reads `buf.len()` bytes at `offset`: the overlay's regions from `disk.img`, the rest
    /// from the point through `base`.
    pub fn read_at(
        &self,
        base: &mut LiveReader,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), OverlayError> {
        let runs = {
            let present = self.present_read();
            runs(offset, buf.len(), REGION, |r| present.contains(r as u32))
        };
        read_runs(&runs, buf, offset, &self.file, base).map_err(|e| match e {
            Ok(source) => io(&self.path)(source),
            Err(e) => e.into(),
        })
    }

    /// Writes `data` at `offset` (zeros when `data` is `None`, `length` bytes), in the order
    /// the module's doc gives. Returns once the write is in `disk.img` and recorded; `fua`
    /// makes it durable first.
    pub fn write_at(
        &self,
        base: &mut LiveReader,
        data: Option<&[u8]>,
        offset: u64,
        length: u64,
        fua: bool,
    ) -> Result<(), OverlayError> {
        let end = offset + length;
        self.copy_up(base, offset / REGION, (end - 1) / REGION)?;
        let intent = match self.with_tracker(|t| t.begin_intend(offset, length))? {
            ctk::Intend::Ready(intent) => intent,
            ctk::Intend::Sync(mut pending) => {
                // The journal's fsync runs without the lock: other writes go on meanwhile.
                pending.sync();
                self.with_tracker(|t| t.finish_intend(pending))?
            }
        };
        let written = write_or_zero(&self.file, data, offset, length).map_err(io(&self.path));
        // Recorded whether or not the write succeeded: part of it may have landed.
        self.with_tracker(|t| {
            t.record(intent);
            Ok(())
        })?;
        written?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Copies the point's bytes of every region in `first..=last` that the overlay does not
    /// hold yet into `disk.img`, and syncs them before any intent for them can be durable.
    fn copy_up(&self, base: &mut LiveReader, first: u64, last: u64) -> Result<(), OverlayError> {
        let missing = |r: u64| !self.present_read().contains(r as u32);
        if !(first..=last).any(missing) {
            return Ok(());
        }
        let _one = self.copying.lock().unwrap_or_else(|p| p.into_inner());
        let mut copied = Vec::new();
        let mut buf = vec![0u8; REGION as usize];
        for region in (first..=last).filter(|&r| missing(r)) {
            let start = region * REGION;
            let len = (self.size - start).min(REGION) as usize;
            base.read_at(&mut buf[..len], start)?;
            // A region of zeros is a hole in `disk.img` already: it only ever held the
            // point's bytes (a copy-up) or bytes written after a durable intent (present).
            if !ctk::delta::is_zero(&buf[..len]) {
                self.file
                    .write_all_at(&buf[..len], start)
                    .map_err(io(&self.path))?;
            }
            copied.push(region as u32);
        }
        self.file.sync_data().map_err(io(&self.path))?;
        self.present
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(copied);
        Ok(())
    }

    /// Seals the blocks written since the last cut, if any and if that was `CUT_EVERY` ago,
    /// and once more after a cut that sealed some: the running failover calls it each
    /// second, so that what failback reads beside it (`Peek`, which trusts every cut but the
    /// journal's latest) is exact to the block for all but the last two seconds' writes,
    /// whether or not the VM flushes. The data is synced first: a pass must never read a
    /// byte that a power cut could take back from the DR disk after the pass.
    pub fn cut_if_written(&self) -> Result<(), OverlayError> {
        let mut last = self.last_cut.lock().unwrap_or_else(|p| p.into_inner());
        if last.0.elapsed() < CUT_EVERY {
            return Ok(());
        }
        let written = self.with_tracker(|t| Ok(!t.map().open_blocks().is_empty()))?;
        if written || last.1 {
            self.file.sync_data().map_err(io(&self.path))?;
            self.with_tracker(|t| t.cut().map(drop))?;
            *last = (Instant::now(), written);
        }
        Ok(())
    }

    /// Makes every acknowledged write durable (FLUSH), and at most once per `CUT_EVERY` seals
    /// the tracker's open epoch so that the exact blocks written are in the journal.
    pub fn flush(&self) -> Result<(), OverlayError> {
        self.file.sync_data().map_err(io(&self.path))?;
        let mut last = self.last_cut.lock().unwrap_or_else(|p| p.into_inner());
        if last.0.elapsed() >= CUT_EVERY {
            let written = self.with_tracker(|t| {
                let written = !t.map().open_blocks().is_empty();
                t.cut().map(|_| written)
            })?;
            *last = (Instant::now(), written);
        }
        drop(last);
        let mut reported = self.last_report.lock().unwrap_or_else(|p| p.into_inner());
        if reported.is_none_or(|t| t.elapsed() >= REPORT_EVERY)
            && let Some(f) = &*self.on_flush.lock().unwrap_or_else(|p| p.into_inner())
        {
            f(&self.changes()?);
            *reported = Some(Instant::now());
        }
        Ok(())
    }
}

/// The overlay tracker's settings, for a disk of `size` bytes failed over at `origin`.
/// The overlay's tracker's configuration for a disk of `size` bytes failed over at `origin`.
pub fn overlay_config(size: u64, origin: &str) -> TrackerConfig {
    let mut config = TrackerConfig::new(format!("failover {origin}"), size);
    config.block_size = BLOCK;
    config.region_size = REGION;
    // A region idle for a few cuts (a cut is taken at a FLUSH, at most once a second)
    // loses its intent: a crash then over-reports only regions written lately, which is
    // what failback would send for nothing.
    config.intent_linger_cuts = 4;
    // Created with its journal: the overlay holds nothing tracking never saw.
    config.existing_data = false;
    config
}

/// A running failover's overlay as its files show it, read without disturbing the process
/// that serves it (failback's passes while the recovered VM runs). The journal is copied and
/// replayed in memory, as a restart after a crash would, and only its durable cuts are used
/// (all but the latest, which may not be: see `replay`): each is exact to the block, every
/// write in one completed before it was sealed (a write is recorded after its data is
/// written), and its data was synced before it. A pass is complete as of that cut (`upto`):
/// whatever was written after it is in a later cut, which the next pass (or the last one,
/// which holds the overlay and cuts it) sends; read early, its data may show old or new
/// bytes, both harmless. The running failover cuts each second it was written and once
/// after, so a pass lags the VM by about two seconds. A write is acknowledged only after its intent is durable, and its
/// region was copied up before that, so `present` (the regions `disk.img` holds whole, an
/// intent's region included) is right for every byte a pass reads.
pub struct Peek {
    tracker: Tracker<ctk::MemStorage>,
    journal: PathBuf,
    /// The latest durable cut in the journal: a pass is complete as of it.
    pub upto: ChangeId,
    /// Regions `disk.img` holds whole.
    pub present: RoaringBitmap,
}

impl Peek {
    pub fn open(dir: &Path, size: u64, origin: &str) -> Result<Peek, OverlayError> {
        let journal = dir.join("journal");
        // A record being appended while it is read looks torn at the end, which replay
        // takes as the crash it would be; a damaged-looking copy is read again.
        let mut last = String::new();
        for _ in 0..8 {
            let bytes = std::fs::read(&journal).map_err(io(&journal))?;
            match replay(bytes, size, origin).map_err(|e| tracker_error(&journal, e))? {
                Replayed::Sealed { tracker, upto } => {
                    let err = |e| tracker_error(&journal, e);
                    let mut present = RoaringBitmap::new();
                    for b in &written(&tracker).map_err(err)? {
                        present.insert((u64::from(b) * BLOCK / REGION) as u32);
                    }
                    present.insert_range(0..read_watermark(dir).min(size.div_ceil(REGION)) as u32);
                    return Ok(Peek {
                        tracker: *tracker,
                        journal,
                        upto,
                        present,
                    });
                }
                Replayed::Unusable(why) => {
                    last = why;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Err(OverlayError::Io {
            path: journal,
            source: std::io::Error::other(format!(
                "the failover's journal does not replay: {last}"
            )),
        })
    }

    /// The blocks written after cut `since` (`None`: since the point) up to `upto`.
    pub fn changes(&self, since: Option<ChangeId>) -> Result<RoaringBitmap, OverlayError> {
        blocks_since(&self.tracker, since, self.upto).map_err(|e| tracker_error(&self.journal, e))
    }
}

/// A copy of a running failover's journal, replayed.
pub enum Replayed {
    /// The tracker as the copy left it, and the latest cut of the running failover's that
    /// is durable (a pass is complete as of it).
    Sealed {
        tracker: Box<Tracker<ctk::MemStorage>>,
        upto: ChangeId,
    },
    /// The copy does not replay (taken mid-append, or no journal yet): why.
    Unusable(String),
}

/// Replays `bytes`, a copy of the journal of an overlay of `size` bytes failed over at
/// `origin`, in memory, as a restart after a crash would; a pass is complete as of the
/// latest cut that is surely durable.
pub fn replay(bytes: Vec<u8>, size: u64, origin: &str) -> Result<Replayed, ctk::TrackerError> {
    let storage = ctk::MemStorage::new();
    storage.set_contents(Some(bytes));
    // The replay's own report of an unclean journal is about this copy, not news.
    let quiet = tracing::Dispatch::none();
    let (tracker, outcome) = tracing::dispatcher::with_default(&quiet, || {
        Tracker::open(storage, overlay_config(size, origin), Generation::random)
    })?;
    // Replay sealed the live intents as a recovery cut of its own, which the running
    // failover never made: the running failover's latest cut is the one before it.
    let (latest, clean) = match outcome {
        OpenOutcome::NewGeneration { reason } => return Ok(Replayed::Unusable(reason)),
        OpenOutcome::Created => return Ok(Replayed::Unusable("no journal".into())),
        OpenOutcome::Recovered {
            recovery_cut: Some(r),
            ..
        } => (ChangeId::new(r.generation, r.seq - 1), false),
        OpenOutcome::Recovered { .. } => (tracker.latest(), false),
        OpenOutcome::Clean => (tracker.latest(), true),
    };
    // The copy is of the page cache: the running failover's latest cut may not be durable
    // yet (its sync in flight, or failed). Lost in a power cut, its number would be given
    // to the recovery cut, and a pass complete as of it would never send what that holds.
    // The cut before it is durable: it was synced before the latest was appended.
    let upto = match clean {
        true => latest,
        false => ChangeId::new(latest.generation, latest.seq.saturating_sub(1)),
    };
    Ok(Replayed::Sealed {
        tracker: Box::new(tracker),
        upto,
    })
}

/// The watermark as its file holds it: the count and a CRC32 of the count's text, in hex.
fn watermark_text(n: u64) -> String {
    let text = n.to_string();
    format!("{text} {:08x}\n", crc32fast::hash(text.as_bytes()))
}

/// The watermark in `dir`, 0 if absent or not exactly as `watermark_text` writes it.
fn read_watermark(dir: &Path) -> u64 {
    use std::io::Read;
    let mut text = String::new();
    let read = File::open(dir.join(MATERIALIZED))
        .and_then(|f| f.take(64).read_to_string(&mut text))
        .is_ok();
    let parsed = text.split_whitespace().next().and_then(|n| n.parse().ok());
    match (read, parsed) {
        (true, Some(n)) if watermark_text(n) == text => n,
        _ => 0,
    }
}

/// The blocks sealed after `since` up to `upto` (every block since the point for `None`,
/// or for a cut the tracker cannot answer for: another generation, or compacted away).
pub fn blocks_since<S: ctk::JournalStorage>(
    tracker: &Tracker<S>,
    since: Option<ChangeId>,
    upto: ChangeId,
) -> Result<RoaringBitmap, ctk::TrackerError> {
    if let Some(id) = since
        && let Ok(blocks) = tracker.changed_blocks(Since::Id(id), upto)
    {
        return Ok(blocks);
    }
    tracker.changed_blocks(Since::All, upto)
}

/// Every block written since the tracker was created: the sealed epochs (and a recovery
/// epoch) and the open one.
pub fn written<S: ctk::JournalStorage>(
    tracker: &Tracker<S>,
) -> Result<RoaringBitmap, ctk::TrackerError> {
    let mut blocks = tracker.changed_blocks(Since::All, tracker.latest())?;
    blocks |= tracker.map().open_blocks();
    Ok(blocks)
}

impl Drop for Tracked {
    /// A clean stop: the data synced, the journal closed, so a reopen finds the change set
    /// exact (a crash instead leaves it exact to the region).
    fn drop(&mut self) {
        if let Err(e) = self.file.sync_data() {
            tracing::error!(path = %self.path.display(), error = %e, "syncing the failover's overlay");
            return;
        }
        let tracker = self
            .tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(Err(e)) = tracker.map(Tracker::close) {
            tracing::warn!(error = %e, "the failover's journal was not closed cleanly: the next start recovers it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass beside a running failover never trusts the journal's latest cut: its record
    /// may be in the page cache only (here its sync failed), and a power cut would give its
    /// number to a recovery cut holding other blocks.
    #[test]
    fn replay_trusts_only_durable_cuts() {
        let size = 4 * REGION;
        let journal = ctk::MemStorage::new();
        let config = overlay_config(size, "origin");
        let (mut t, _) = Tracker::open(journal.clone(), config, Generation::random).unwrap();
        let first = t.intend(0, BLOCK).unwrap();
        t.record(first);
        let durable = t.cut().unwrap();
        let second = t.intend(REGION, BLOCK).unwrap();
        t.record(second);
        journal.fail_sync_after(0);
        assert!(t.cut().is_err(), "the cut's sync fails");
        let copy = journal.contents().unwrap();
        match replay(copy, size, "origin").unwrap() {
            Replayed::Sealed { tracker, upto } => {
                assert_eq!(upto, durable, "the cut whose sync failed is not trusted");
                let blocks = blocks_since(&tracker, None, upto).unwrap();
                assert_eq!(blocks.iter().collect::<Vec<_>>(), vec![0]);
            }
            Replayed::Unusable(why) => panic!("the copy replays: {why}"),
        }
        // Closed cleanly, the latest cut is durable and trusted.
        let journal = ctk::MemStorage::new();
        let config = overlay_config(size, "origin");
        let (mut t, _) = Tracker::open(journal.clone(), config, Generation::random).unwrap();
        let w = t.intend(0, BLOCK).unwrap();
        t.record(w);
        let latest = t.cut().unwrap();
        t.close().unwrap();
        match replay(journal.contents().unwrap(), size, "origin").unwrap() {
            Replayed::Sealed { upto, .. } => assert_eq!(upto, latest),
            Replayed::Unusable(why) => panic!("the copy replays: {why}"),
        }
    }
}
