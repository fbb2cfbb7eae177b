//! The tracker: a change map kept durable by its journal.
//!
//! The order that keeps the invariant is enforced by types. A data write needs a
//! [`WriteIntent`], which only [`Tracker::intend`] makes, and only after the intent for every
//! region the write touches is durable. Recording the write consumes the intent. So a write
//! can reach the disk only after the journal knows its region might change, and after a crash
//! every such region is reported as changed.
//!
//! Intents are kept across cuts (like md's write-intent bitmap and DRBD's activity log): a
//! hot region costs one fsync, not one per cut. At a cut, once the sealed epoch that holds
//! their writes is durable, regions idle for `intent_linger_cuts` cuts are cleared, and so are
//! the least recently written beyond `intent_regions_max`; never a region written in the
//! epoch being sealed or one with an intent not yet recorded.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::io;

use roaring::RoaringBitmap;
use tracing::{info, warn};

use crate::geometry::{Extent, Geometry, GeometryError};
use crate::id::{ChangeId, Generation};
use crate::journal::record::{self, Header, JOURNAL_VERSION, Record, SealKind};
use crate::journal::storage::JournalStorage;
use crate::journal::{self, Replay};
use crate::limits::{
    DISK_ID_LEN_MAX, JOURNAL_REGIONS_PER_RECORD_MAX, REGION_SIZE_DEFAULT, REGION_SIZE_MAX,
    REGION_SIZE_MIN,
};
use crate::map::{ChangeMap, CursorError, MapOptions, QueryError, Since};

/// How a tracker is set up for one disk.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    /// Identity of the disk (a name or UUID). A journal written for another id is not used.
    pub disk_id: String,
    pub disk_size: u64,
    /// Tracking granularity: a power of two from 4 KiB to 1 MiB.
    pub block_size: u64,
    /// Write-intent region: a power of two from 1 MiB to 1 GiB. Larger regions mean fewer
    /// fsyncs and more over-reporting after a crash.
    pub region_size: u64,
    pub map: MapOptions,
    /// Cuts a region's intent outlives its last write, however few regions are live.
    pub intent_linger_cuts: u64,
    /// Most live intent regions kept after a cut (like DRBD's activity-log extents): beyond
    /// it the least recently written are cleared. This bounds the over-report after a crash
    /// to `intent_regions_max * region_size` bytes, and a hot set smaller than that costs no
    /// intent fsync at all once warm.
    pub intent_regions_max: usize,
    /// When a new generation starts, may the disk already hold data tracking never saw?
    /// Only a disk created empty together with its journal may say `false`.
    pub existing_data: bool,
    /// The journal is rewritten (compacted) once it exceeds this many bytes and four times
    /// its last snapshot.
    pub compact_after_bytes: u64,
}

impl TrackerConfig {
    pub fn new(disk_id: impl Into<String>, disk_size: u64) -> TrackerConfig {
        TrackerConfig {
            disk_id: disk_id.into(),
            disk_size,
            block_size: crate::limits::BLOCK_SIZE_DEFAULT as u64,
            region_size: REGION_SIZE_DEFAULT,
            map: MapOptions::default(),
            intent_linger_cuts: 256,
            intent_regions_max: 16 * 1024,
            existing_data: true,
            compact_after_bytes: 8 << 20,
        }
    }
}

/// Why a tracker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// Reading or writing the journal failed. After a failed write or sync the journal is
    /// poisoned.
    #[error("journal I/O failed while {doing}: {source}")]
    Io {
        doing: &'static str,
        source: io::Error,
    },
    /// An earlier write or fsync of the journal failed. An fsync error is never retried and
    /// forgotten: reopen the tracker (which replays what is durable) to go on.
    #[error("the journal failed earlier ({0}); it refuses further work until it is reopened")]
    Poisoned(String),
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error(
        "region size {0} is not supported: it must be a power of two from {REGION_SIZE_MIN} to {REGION_SIZE_MAX} bytes"
    )]
    BadRegionSize(u64),
    #[error("disk id must be 1 to {DISK_ID_LEN_MAX} bytes")]
    BadDiskId,
    /// `close` was called while intents were not yet recorded.
    #[error(
        "{0} write(s) still in flight: record them before closing (the journal was left unclean, so a reopen recovers them)"
    )]
    WritesInFlight(u64),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Cursor(#[from] CursorError),
}

/// What opening found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpenOutcome {
    /// No journal existed: a new generation starts.
    Created,
    /// The journal was closed cleanly: the map is exactly as it was.
    Clean,
    /// The journal was not closed cleanly. Every region with write intent was sealed as a
    /// recovery epoch (if there were any), so no write can be missing.
    Recovered {
        recovery_cut: Option<ChangeId>,
        recovered_blocks: u64,
        torn_at: Option<u64>,
    },
    /// The journal could not prove continuity: a new generation starts, and every earlier
    /// ChangeId is refused (consumers fall back to a full or compare pass).
    NewGeneration { reason: String },
}

/// What `Tracker::begin_intend` says about a write.
#[derive(Debug)]
pub enum Intend {
    /// Every region's intent is durable: the write may go ahead.
    Ready(WriteIntent),
    /// Intent records were appended (by this writer or another); they must be synced first.
    Sync(PendingIntent),
}

/// A write intent whose records are appended but not yet known durable. Only
/// `Tracker::finish_intend`, after `sync`, turns it into a `WriteIntent`.
#[must_use = "the write may go ahead only with the WriteIntent from finish_intend"]
#[derive(Debug)]
pub struct PendingIntent {
    intent: WriteIntent,
    /// Intent batches appended when the syncer was made: all durable once it succeeds.
    covers: u64,
    syncer: Option<crate::journal::storage::Syncer>,
    synced: Option<std::io::Result<()>>,
}

impl PendingIntent {
    /// Makes the intent durable. Needs no access to the tracker, so a caller can run it
    /// with every lock released.
    pub fn sync(&mut self) {
        if let Some(syncer) = self.syncer.take() {
            self.synced = Some(syncer.run());
        }
    }
}

/// A cut sealed in memory whose journal record is appended but not yet known durable. Its
/// ChangeId is reachable only through `Tracker::finish_cut`, after `sync`.
#[must_use = "a cut's ChangeId comes only from finish_cut"]
#[derive(Debug)]
pub struct PendingCut {
    id: ChangeId,
    tracker: u64,
    syncer: Option<crate::journal::storage::Syncer>,
    synced: Option<std::io::Result<()>>,
}

impl PendingCut {
    /// Makes the cut's record durable. Needs no access to the tracker, so a caller can run
    /// it with every lock released.
    pub fn sync(&mut self) {
        if let Some(syncer) = self.syncer.take() {
            self.synced = Some(syncer.run());
        }
    }

    /// The cut's ChangeId before it is durable, to address the sealed epoch while writes
    /// are still held (an export's snapshot). Never hand it out: only `finish_cut` may.
    pub fn undurable_id(&self) -> ChangeId {
        self.id
    }
}

/// Proof that the intent for a range is durable. Only [`Tracker::intend`] makes one;
/// [`Tracker::record`] consumes it after the data write. Dropping one without recording
/// keeps its regions' intent forever (safe: it only over-reports after a crash).
#[must_use = "record the write with Tracker::record after the data write"]
#[derive(Debug)]
pub struct WriteIntent {
    offset: u64,
    length: u64,
    /// The open epoch's sequence number when the intent was taken.
    stamp: u64,
    /// Which tracker instance made it durable: an intent is proof only for its own journal.
    tracker: u64,
}

impl WriteIntent {
    pub fn offset(&self) -> u64 {
        self.offset
    }
    pub fn length(&self) -> u64 {
        self.length
    }
}

/// A multiplicative hash for region numbers: the hot path looks one up per write.
#[derive(Default, Clone, Copy)]
struct RegionHasher(u64);

impl Hasher for RegionHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type RegionMap = HashMap<u32, u64, BuildHasherDefault<RegionHasher>>;

static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Change tracking for one disk, durable across crashes.
pub struct Tracker<S: JournalStorage> {
    map: ChangeMap,
    storage: S,
    config: TrackerConfig,
    header: Header,
    region_shift: u32,
    /// Regions whose intent is durable, and the open-epoch stamp of their newest intent.
    live: RegionMap,
    /// Intents taken in the open epoch and not yet recorded.
    outstanding_open: u64,
    /// Intents taken in earlier epochs and not yet recorded, by stamp.
    outstanding_older: BTreeMap<u64, u64>,
    poisoned: Option<String>,
    /// Distinguishes this instance's intents from any other's.
    instance: u64,
    /// Cuts begun and not yet finished: sealed in memory, not known durable. `latest` and
    /// every query stay below the oldest of them.
    unconfirmed: std::collections::BTreeSet<u64>,
    /// Batches of intent records appended, and the newest known durable; regions whose
    /// intent is in a batch not yet durable, with that batch. A writer touching one of them
    /// must sync before its write, even though the region already counts as live.
    intent_batches: u64,
    intent_batches_durable: u64,
    unsynced_regions: BTreeMap<u32, u64>,
    journal_len: u64,
    snapshot_len: u64,
    scratch: Vec<u8>,
    syncs: u64,
    /// The size the journal last saw, when the disk was found larger at open.
    grown_from: Option<u64>,
}

impl<S: JournalStorage> Tracker<S> {
    /// Opens (or creates) the journal in `storage` and rebuilds the map.
    /// `new_generation` is called only if a new generation must start.
    pub fn open(
        mut storage: S,
        config: TrackerConfig,
        new_generation: impl FnOnce() -> Generation,
    ) -> Result<(Tracker<S>, OpenOutcome), TrackerError> {
        let geometry = Geometry::new(config.disk_size, config.block_size)?;
        if !config.region_size.is_power_of_two()
            || !(REGION_SIZE_MIN..=REGION_SIZE_MAX).contains(&config.region_size)
        {
            return Err(TrackerError::BadRegionSize(config.region_size));
        }
        if config.disk_id.is_empty() || config.disk_id.len() > DISK_ID_LEN_MAX {
            return Err(TrackerError::BadDiskId);
        }
        let io = |doing| move |source| TrackerError::Io { doing, source };
        let replay = journal::replay(&mut storage).map_err(io("reading the journal"))?;
        let disk_id = config.disk_id.as_bytes();
        let (mut map, outcome, recovery) = match replay {
            Replay::Missing => (None, OpenOutcome::Created, None),
            Replay::Unusable(reason) => (None, OpenOutcome::NewGeneration { reason }, None),
            Replay::Replayed(r) if r.header.disk_id != disk_id => {
                let reason = format!(
                    "the journal belongs to disk {:?}, not {:?}",
                    String::from_utf8_lossy(&r.header.disk_id),
                    config.disk_id
                );
                (None, OpenOutcome::NewGeneration { reason }, None)
            }
            Replay::Replayed(r) if r.map.geometry().block_size() as u64 != config.block_size => {
                let reason = format!(
                    "the journal tracks {}-byte blocks, the configuration asks for {}",
                    r.map.geometry().block_size(),
                    config.block_size
                );
                (None, OpenOutcome::NewGeneration { reason }, None)
            }
            // A disk that only grew while the tracker was closed keeps its history: the new
            // range is reported changed (below). One that shrank may have lost what a
            // consumer needs of its end: continuity is lost.
            Replay::Replayed(r) if r.map.geometry().disk_size() > config.disk_size => {
                let reason = format!(
                    "the disk is {} bytes but the journal last saw {} bytes: it was shrunk outside ctk",
                    config.disk_size,
                    r.map.geometry().disk_size()
                );
                (None, OpenOutcome::NewGeneration { reason }, None)
            }
            Replay::Replayed(r) if r.clean => (Some(r.map), OpenOutcome::Clean, None),
            Replay::Replayed(r) => {
                let torn_at = r.torn_at;
                let mut map = r.map;
                // Every block of every region that had intent may have been written.
                let blocks_per_region = r.header.region_size / geometry.block_size() as u64;
                for &region in &r.live_intents {
                    let first = region as u64 * blocks_per_region;
                    if first >= map.geometry().blocks() {
                        continue; // Past a shrunk end: nothing there to report.
                    }
                    map.record_blocks(
                        first as u32,
                        (first + blocks_per_region - 1).min(u32::MAX as u64) as u32,
                    );
                }
                let recovered = map.open_blocks().len();
                (
                    Some(map),
                    OpenOutcome::Recovered {
                        recovery_cut: None,
                        recovered_blocks: recovered,
                        torn_at,
                    },
                    Some(()),
                )
            }
        };
        let outcome = match (&mut map, outcome, recovery) {
            (
                Some(m),
                OpenOutcome::Recovered {
                    recovered_blocks,
                    torn_at,
                    ..
                },
                Some(()),
            ) => {
                let recovery_cut = (recovered_blocks > 0).then(|| m.seal());
                OpenOutcome::Recovered {
                    recovery_cut,
                    recovered_blocks,
                    torn_at,
                }
            }
            (_, outcome, _) => outcome,
        };
        let mut grown_from = None;
        let map = match map {
            Some(mut m) => {
                m.set_options(config.map);
                let old = m.geometry().disk_size();
                if old < config.disk_size {
                    // Every block from the old end on is reported changed for every earlier
                    // ChangeId; the snapshot written below makes that durable.
                    m.resize(config.disk_size)?;
                    grown_from = Some(old);
                    info!(
                        disk = %config.disk_id, from = old, to = config.disk_size,
                        "the disk grew while the tracker was closed: the new range is reported changed"
                    );
                }
                m
            }
            None => {
                let generation = new_generation();
                let baseline_all = config.existing_data || !matches!(outcome, OpenOutcome::Created);
                ChangeMap::new(geometry, generation, baseline_all, config.map)
            }
        };
        match &outcome {
            OpenOutcome::Created => {
                info!(disk = %config.disk_id, generation = %map.generation(), "new change journal")
            }
            OpenOutcome::Clean => {
                info!(disk = %config.disk_id, latest = %map.latest(), "change journal reopened cleanly")
            }
            OpenOutcome::Recovered {
                recovery_cut,
                recovered_blocks,
                torn_at,
            } => warn!(
                disk = %config.disk_id, ?recovery_cut, recovered_blocks, ?torn_at,
                "change journal was not closed cleanly: regions with write intent are reported as changed"
            ),
            OpenOutcome::NewGeneration { reason } => warn!(
                disk = %config.disk_id, generation = %map.generation(), %reason,
                "CHANGE TRACKING CONTINUITY LOST: new generation; every consumer needs a full or compare pass"
            ),
        }
        let header = Header {
            version: JOURNAL_VERSION,
            disk_id: disk_id.to_vec(),
            disk_size: config.disk_size,
            block_size: config.block_size as u32,
            region_size: config.region_size,
            generation: map.generation().0,
            baseline_all: map.baseline_all(),
            keep_recent: map.options().keep_recent,
        };
        let mut tracker = Tracker {
            map,
            storage,
            region_shift: config.region_size.trailing_zeros(),
            config,
            header,
            live: RegionMap::default(),
            outstanding_open: 0,
            outstanding_older: BTreeMap::new(),
            poisoned: None,
            instance: NEXT_INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            unconfirmed: std::collections::BTreeSet::new(),
            intent_batches: 0,
            intent_batches_durable: 0,
            unsynced_regions: BTreeMap::new(),
            journal_len: 0,
            snapshot_len: 0,
            scratch: Vec::new(),
            syncs: 0,
            grown_from,
        };
        // Start every session from a fresh snapshot: a torn tail is never appended to, and a
        // recovery epoch is durable before any new write is accepted.
        tracker.rewrite()?;
        Ok((tracker, outcome))
    }

    /// The size the journal last saw, if the disk was found larger when it was opened (the
    /// new range is reported changed since every earlier ChangeId).
    pub fn grown_at_open(&self) -> Option<u64> {
        self.grown_from
    }

    /// The change map, for queries.
    pub fn map(&self) -> &ChangeMap {
        &self.map
    }

    pub fn geometry(&self) -> Geometry {
        self.map.geometry()
    }

    /// The latest cut known durable. A cut begun and not finished does not count: its
    /// ChangeId must not be handed out before its record is synced.
    pub fn latest(&self) -> ChangeId {
        match self.unconfirmed.first() {
            Some(&seq) => ChangeId::new(self.map.generation(), seq - 1),
            None => self.map.latest(),
        }
    }

    /// Refuses a ChangeId of this generation past the latest durable cut.
    fn check_confirmed(&self, id: ChangeId) -> Result<(), TrackerError> {
        let latest = self.latest();
        if id.generation == latest.generation && id.seq > latest.seq {
            return Err(QueryError::Future {
                id,
                latest: latest.seq,
            }
            .into());
        }
        Ok(())
    }

    /// Journal syncs issued by this tracker (for benchmarks and tests).
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    pub fn journal_len(&self) -> u64 {
        self.journal_len
    }

    fn check_healthy(&self) -> Result<(), TrackerError> {
        match &self.poisoned {
            Some(why) => Err(TrackerError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Appends `self.scratch` and syncs it. Any failure poisons the journal.
    fn append_synced(&mut self, doing: &'static str) -> Result<(), TrackerError> {
        record::encode(&Record::Synced, &mut self.scratch);
        let result = self
            .storage
            .append(&self.scratch)
            .and_then(|()| self.storage.sync());
        self.syncs += 1;
        self.journal_len += self.scratch.len() as u64;
        self.scratch.clear();
        result.map_err(|source| {
            self.poisoned = Some(format!("{doing}: {source}"));
            TrackerError::Io { doing, source }
        })?;
        // That sync covered every intent appended before it.
        self.mark_intents_durable(self.intent_batches);
        Ok(())
    }

    /// Makes the intent for `[offset, offset + length)` durable and returns the token that
    /// allows the data write. Costs no I/O when every region touched already has intent.
    pub fn intend(&mut self, offset: u64, length: u64) -> Result<WriteIntent, TrackerError> {
        match self.begin_intend(offset, length)? {
            Intend::Ready(intent) => Ok(intent),
            Intend::Sync(mut pending) => {
                pending.sync();
                self.finish_intend(pending)
            }
        }
    }

    /// Would `intend` for this range need no I/O now (every region's intent durable)? A hint
    /// for scheduling (a caller may run such writes inline and hand the others to a thread);
    /// `intend` decides for itself either way.
    pub fn intent_ready(&self, offset: u64, length: u64) -> bool {
        if length == 0 {
            return true;
        }
        let Some(last_byte) = offset.checked_add(length - 1) else {
            return false;
        };
        let first = offset >> self.region_shift;
        let last = last_byte >> self.region_shift;
        // A huge range is answered no without walking it.
        last - first < 64
            && (first..=last).all(|r| {
                let r = r as u32;
                self.live.contains_key(&r) && !self.unsynced_regions.contains_key(&r)
            })
    }

    /// `intend` in halves, so the fsync can run with the caller's lock on this tracker
    /// released and other writers (to live regions) go on meanwhile: appends the intent
    /// records a range needs and returns `Intend::Sync` if a sync must come before the write,
    /// `Intend::Ready` if every region's intent is durable already.
    pub fn begin_intend(&mut self, offset: u64, length: u64) -> Result<Intend, TrackerError> {
        self.check_healthy()?;
        let stamp = self.map.latest().seq + 1;
        // The newest intent batch this write depends on.
        let mut needs = 0u64;
        if self.map.geometry().blocks_of(offset, length)?.is_some() {
            let first = (offset >> self.region_shift) as u32;
            let last = ((offset + length - 1) >> self.region_shift) as u32;
            let mut missing = Vec::new();
            for region in first..=last {
                match self.live.get_mut(&region) {
                    Some(s) => {
                        *s = stamp;
                        if let Some(&batch) = self.unsynced_regions.get(&region) {
                            needs = needs.max(batch);
                        }
                    }
                    None => missing.push(region),
                }
            }
            if !missing.is_empty() {
                for regions in missing.chunks(JOURNAL_REGIONS_PER_RECORD_MAX) {
                    record::encode(&Record::Intent(regions.to_vec()), &mut self.scratch);
                }
                record::encode(&Record::Synced, &mut self.scratch);
                let appended = self.storage.append(&self.scratch);
                self.journal_len += self.scratch.len() as u64;
                self.scratch.clear();
                if let Err(source) = appended {
                    self.poisoned = Some(format!("writing a write intent: {source}"));
                    return Err(TrackerError::Io {
                        doing: "writing a write intent",
                        source,
                    });
                }
                self.intent_batches += 1;
                needs = self.intent_batches;
                for region in missing {
                    self.live.insert(region, stamp);
                    self.unsynced_regions.insert(region, self.intent_batches);
                }
            }
        }
        self.outstanding_open += 1;
        let intent = WriteIntent {
            offset,
            length,
            stamp,
            tracker: self.instance,
        };
        if needs <= self.intent_batches_durable {
            return Ok(Intend::Ready(intent));
        }
        let syncer = match self.storage.syncer() {
            Ok(s) => s,
            Err(source) => {
                self.poisoned = Some(format!("syncing a write intent: {source}"));
                return Err(TrackerError::Io {
                    doing: "syncing a write intent",
                    source,
                });
            }
        };
        Ok(Intend::Sync(PendingIntent {
            intent,
            covers: self.intent_batches,
            syncer: Some(syncer),
            synced: None,
        }))
    }

    /// Completes `begin_intend` after `PendingIntent::sync`: the write may go ahead if the
    /// sync succeeded and no journal failure happened meanwhile (any failure poisons).
    pub fn finish_intend(&mut self, pending: PendingIntent) -> Result<WriteIntent, TrackerError> {
        assert_eq!(
            pending.intent.tracker, self.instance,
            "PendingIntent finished on a tracker that did not begin it"
        );
        self.syncs += 1;
        let synced = match pending.synced {
            Some(result) => result,
            None => self.storage.sync(),
        };
        if let Err(source) = synced {
            self.poisoned = Some(format!("writing a write intent: {source}"));
            return Err(TrackerError::Io {
                doing: "writing a write intent",
                source,
            });
        }
        self.check_healthy()?;
        self.mark_intents_durable(pending.covers);
        Ok(pending.intent)
    }

    /// Every intent batch up to `batch` is durable.
    fn mark_intents_durable(&mut self, batch: u64) {
        if batch > self.intent_batches_durable {
            self.intent_batches_durable = batch;
            self.unsynced_regions.retain(|_, &mut b| b > batch);
        }
    }

    /// Records a completed data write (or trim, or write-zeroes) in the open epoch. Call it
    /// after the data write, whether or not that write succeeded: a failed write may still
    /// have changed some of the range.
    ///
    /// Panics if the intent was made by another tracker (another disk, or this disk before
    /// a reopen): its durability says nothing about this journal. That is a bug in the
    /// caller, not bad input, and continuing would risk an unreported write.
    pub fn record(&mut self, intent: WriteIntent) {
        assert_eq!(
            intent.tracker, self.instance,
            "WriteIntent recorded on a tracker that did not make it durable"
        );
        self.map.record_clipped(intent.offset, intent.length);
        if intent.stamp == self.map.latest().seq + 1 {
            self.outstanding_open -= 1;
        } else if let Some(n) = self.outstanding_older.get_mut(&intent.stamp) {
            *n -= 1;
            if *n == 0 {
                self.outstanding_older.remove(&intent.stamp);
            }
        }
    }

    /// Seals the open epoch: a cut. The sealed epoch is durable before its ChangeId is
    /// returned. The caller must have quiesced writes it wants inside this cut; writes still
    /// in flight land in the next epoch.
    pub fn cut(&mut self) -> Result<ChangeId, TrackerError> {
        let mut pending = self.begin_cut()?;
        pending.sync();
        self.finish_cut(pending)
    }

    /// The first half of a cut, for callers that hold writes while cutting: seals the open
    /// epoch in memory and appends its record, but does not sync. Writes may resume at once
    /// (they land in the next epoch); then `PendingCut::sync` (no lock on this tracker
    /// needed) and `finish_cut`, which is the only way to the ChangeId.
    ///
    /// Why this is safe: until the seal record is durable, a crash replays the journal
    /// without it, and the epoch's writes are still covered by their durable intents (the
    /// regions this cut clears are cleared only by the same unsynced record). A write after
    /// the seal to a region this cut cleared appends a new intent after the seal record and
    /// syncs it, which makes the seal durable too.
    pub fn begin_cut(&mut self) -> Result<PendingCut, TrackerError> {
        self.check_healthy()?;
        let sealing = self.map.latest().seq + 1;
        let oldest_outstanding = self
            .outstanding_older
            .keys()
            .next()
            .copied()
            .unwrap_or(u64::MAX)
            .min(if self.outstanding_open > 0 {
                sealing
            } else {
                u64::MAX
            });
        let linger = self.config.intent_linger_cuts.max(1);
        // A region may be cleared only if every write under its intents is recorded (so it is
        // in this seal or an earlier one) and it was not written in the epoch being sealed.
        let mut idle: Vec<(u64, u32)> = self
            .live
            .iter()
            .filter(|&(_, &stamp)| stamp < sealing && stamp < oldest_outstanding)
            // An intent not yet durable is never cleared (a caller that holds writes across
            // cuts cannot get here with one, but the journal must not rely on that).
            .filter(|&(r, _)| !self.unsynced_regions.contains_key(r))
            .map(|(&r, &stamp)| (stamp, r))
            .collect();
        // Long idle regions go; then the least recently written, down to the cap.
        idle.sort_unstable();
        let long_idle = idle.partition_point(|&(stamp, _)| stamp + linger <= sealing);
        let over_cap = self
            .live
            .len()
            .saturating_sub(self.config.intent_regions_max);
        let mut clear: Vec<u32> = idle[..long_idle.max(over_cap).min(idle.len())]
            .iter()
            .map(|&(_, r)| r)
            .collect();
        clear.sort_unstable();
        let Tracker {
            map,
            scratch,
            storage,
            ..
        } = self;
        let mut syncer = None;
        let result = map.seal_with(|blocks, seq| {
            let len = journal::push_bitmap(scratch, blocks);
            record::encode(
                &Record::Seal {
                    seq,
                    kind: SealKind::Cut,
                    len,
                },
                scratch,
            );
            for regions in clear.chunks(JOURNAL_REGIONS_PER_RECORD_MAX) {
                record::encode(&Record::Clear(regions.to_vec()), scratch);
            }
            record::encode(&Record::Synced, scratch);
            storage.append(scratch)?;
            syncer = Some(storage.syncer()?);
            Ok::<(), std::io::Error>(())
        });
        self.journal_len += self.scratch.len() as u64;
        self.scratch.clear();
        let id = result.map_err(|source| {
            // The record may be partly appended: nothing after it can be trusted.
            self.poisoned = Some(format!("sealing a cut: {source}"));
            TrackerError::Io {
                doing: "sealing a cut",
                source,
            }
        })?;
        for region in clear {
            self.live.remove(&region);
        }
        if self.outstanding_open > 0 {
            self.outstanding_older
                .insert(sealing, self.outstanding_open);
            self.outstanding_open = 0;
        }
        self.unconfirmed.insert(id.seq);
        Ok(PendingCut {
            id,
            tracker: self.instance,
            syncer,
            synced: None,
        })
    }

    /// The second half of a cut: returns its ChangeId if its record was synced and no
    /// journal failure happened since (after a failed fsync nothing appended before it can
    /// be trusted, whatever a later fsync says). Any failure poisons the tracker.
    ///
    /// Panics if `pending` was begun on another tracker (a caller bug, like a foreign
    /// `WriteIntent`).
    pub fn finish_cut(&mut self, pending: PendingCut) -> Result<ChangeId, TrackerError> {
        assert_eq!(
            pending.tracker, self.instance,
            "PendingCut finished on a tracker that did not begin it"
        );
        self.syncs += 1;
        // Not synced by the caller: sync here, under whatever lock guards this tracker.
        let synced = match pending.synced {
            Some(result) => result,
            None => self.storage.sync(),
        };
        if let Err(source) = synced {
            self.poisoned = Some(format!("syncing a cut: {source}"));
            return Err(TrackerError::Io {
                doing: "syncing a cut",
                source,
            });
        }
        self.check_healthy()?;
        // The sync covered every record appended before it: earlier cuts begun and never
        // finished are durable too. A failed one stays unconfirmed (latest stays below it).
        self.unconfirmed.retain(|&seq| seq > pending.id.seq);
        self.maybe_compact()?;
        Ok(pending.id)
    }

    /// Blocks changed after `since` up to cut `upto`, as sorted merged extents.
    pub fn changed(&self, since: Since, upto: ChangeId) -> Result<Vec<Extent>, TrackerError> {
        self.check_query(since, upto)?;
        Ok(self.map.changed(since, upto)?)
    }

    fn check_query(&self, since: Since, upto: ChangeId) -> Result<(), TrackerError> {
        if let Since::Id(id) = since {
            self.check_confirmed(id)?;
        }
        self.check_confirmed(upto)
    }

    /// `changed_blocks` that may also name a cut begun and not yet finished. For the
    /// caller's own use while it holds that cut (an export's snapshot taken inside the
    /// hold), and for maps that include writes not cut yet; never to hand out a ChangeId.
    pub fn changed_blocks_unconfirmed(
        &self,
        since: Since,
        upto: ChangeId,
    ) -> Result<RoaringBitmap, TrackerError> {
        Ok(self.map.changed_blocks(since, upto)?)
    }

    /// The same answer as a set of block numbers.
    pub fn changed_blocks(
        &self,
        since: Since,
        upto: ChangeId,
    ) -> Result<RoaringBitmap, TrackerError> {
        self.check_query(since, upto)?;
        Ok(self.map.changed_blocks(since, upto)?)
    }

    /// Registers a consumer cursor at `at` (durable before it returns).
    pub fn register_cursor(&mut self, name: &str, at: ChangeId) -> Result<(), TrackerError> {
        self.check_healthy()?;
        self.check_confirmed(at)?;
        self.map.register_cursor(name, at)?;
        record::encode(&Record::CursorSet { name, seq: at.seq }, &mut self.scratch);
        self.append_synced("registering a cursor")
    }

    /// Moves a consumer cursor forward (durable before it returns).
    pub fn advance_cursor(&mut self, name: &str, to: ChangeId) -> Result<(), TrackerError> {
        self.check_healthy()?;
        self.check_confirmed(to)?;
        self.map.advance_cursor(name, to)?;
        record::encode(&Record::CursorSet { name, seq: to.seq }, &mut self.scratch);
        self.append_synced("advancing a cursor")?;
        self.maybe_compact()
    }

    pub fn drop_cursor(&mut self, name: &str) -> Result<(), TrackerError> {
        self.check_healthy()?;
        self.map.drop_cursor(name)?;
        record::encode(&Record::CursorDrop { name }, &mut self.scratch);
        self.append_synced("dropping a cursor")?;
        self.maybe_compact()
    }

    /// Records a resize of the disk. Call it before growing the backing (a crash in between
    /// then over-reports) and before shrinking it.
    pub fn resize(&mut self, disk_size: u64) -> Result<(), TrackerError> {
        self.check_healthy()?;
        self.map.geometry().resized(disk_size)?;
        record::encode(&Record::Resize { disk_size }, &mut self.scratch);
        self.append_synced("recording a resize")?;
        self.map.resize(disk_size)?;
        // Intents past a shrunk end are kept: a write in flight may still land there, and a
        // later grow makes it visible again. Recovery clips them to the size it finds.
        self.config.disk_size = disk_size;
        self.header.disk_size = disk_size;
        Ok(())
    }

    /// Closes cleanly: the open epoch is persisted, so a reopen answers exactly the same.
    /// Every intent must have been recorded.
    pub fn close(mut self) -> Result<(), TrackerError> {
        self.check_healthy()?;
        // A Close clears every intent on replay; with a write still in flight that write
        // could land untracked. Leave the journal unclean instead: recovery covers it.
        let in_flight = self.outstanding_open + self.outstanding_older.values().sum::<u64>();
        if in_flight > 0 {
            return Err(TrackerError::WritesInFlight(in_flight));
        }
        let open = self.map.open_blocks();
        let len = journal::push_bitmap(&mut self.scratch, &open);
        record::encode(&Record::Close { len }, &mut self.scratch);
        self.append_synced("closing the journal")
    }

    fn maybe_compact(&mut self) -> Result<(), TrackerError> {
        if self.journal_len > self.config.compact_after_bytes
            && self.journal_len > 4 * self.snapshot_len
        {
            self.rewrite()?;
        }
        Ok(())
    }

    /// Atomically replaces the journal with a snapshot of the current state.
    fn rewrite(&mut self) -> Result<(), TrackerError> {
        self.header.generation = self.map.generation().0;
        self.header.keep_recent = self.map.options().keep_recent;
        let mut live: Vec<u32> = self.live.keys().copied().collect();
        live.sort_unstable();
        let bytes = journal::snapshot_bytes(&self.header, &self.map.state(), &live);
        self.syncs += 1;
        self.storage.replace(&bytes).map_err(|source| {
            self.poisoned = Some(format!("rewriting the journal: {source}"));
            TrackerError::Io {
                doing: "rewriting the journal",
                source,
            }
        })?;
        self.journal_len = bytes.len() as u64;
        self.snapshot_len = bytes.len() as u64;
        // The snapshot holds every live region, durably.
        self.mark_intents_durable(self.intent_batches);
        Ok(())
    }

    /// Hands back the storage (tests use this to crash it and reopen).
    pub fn into_storage(self) -> S {
        self.storage
    }
}
