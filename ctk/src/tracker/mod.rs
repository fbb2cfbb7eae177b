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

mod cut;
mod intent;

pub use cut::PendingCut;
pub use intent::{Intend, PendingIntent, WriteIntent};

use std::collections::BTreeMap;
use std::io;

use roaring::RoaringBitmap;
use tracing::{info, warn};

use crate::geometry::{Extent, Geometry, GeometryError};
use crate::id::{ChangeId, Generation};
use crate::journal::record::{self, Header, JOURNAL_VERSION, Record};
use crate::journal::storage::JournalStorage;
use crate::journal::{self, Replay};
use crate::limits::{DISK_ID_LEN_MAX, REGION_SIZE_DEFAULT, REGION_SIZE_MAX, REGION_SIZE_MIN};
use crate::map::{ChangeMap, CursorError, MapOptions, QueryError, Since};
use intent::RegionMap;

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

/// What a journal's replay means for this configuration: the map to go on from (none when
/// a new generation must start) and what open reports. An unclean close reports every
/// block of every region with live intent changed, sealed as a recovery epoch.
fn judge_replay(
    replay: Replay,
    config: &TrackerConfig,
    geometry: &Geometry,
) -> (Option<ChangeMap>, OpenOutcome) {
    let new_generation = |reason| (None, OpenOutcome::NewGeneration { reason });
    match replay {
        Replay::Missing => (None, OpenOutcome::Created),
        Replay::Unusable(reason) => new_generation(reason),
        Replay::Replayed(r) if r.header.disk_id != config.disk_id.as_bytes() => {
            new_generation(format!(
                "the journal belongs to disk {:?}, not {:?}",
                String::from_utf8_lossy(&r.header.disk_id),
                config.disk_id
            ))
        }
        Replay::Replayed(r) if r.map.geometry().block_size() as u64 != config.block_size => {
            new_generation(format!(
                "the journal tracks {}-byte blocks, the configuration asks for {}",
                r.map.geometry().block_size(),
                config.block_size
            ))
        }
        // A disk that only grew while the tracker was closed keeps its history: the new
        // range is reported changed (in open). One that shrank may have lost what a
        // consumer needs of its end: continuity is lost.
        Replay::Replayed(r) if r.map.geometry().disk_size() > config.disk_size => {
            new_generation(format!(
                "the disk is {} bytes but the journal last saw {} bytes: it was shrunk outside ctk",
                config.disk_size,
                r.map.geometry().disk_size()
            ))
        }
        Replay::Replayed(r) if r.clean => (Some(r.map), OpenOutcome::Clean),
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
            let recovered_blocks = map.open_blocks().len();
            let recovery_cut = (recovered_blocks > 0).then(|| map.seal());
            let outcome = OpenOutcome::Recovered {
                recovery_cut,
                recovered_blocks,
                torn_at,
            };
            (Some(map), outcome)
        }
    }
}

/// One log line for how the journal was found.
fn log_outcome(outcome: &OpenOutcome, map: &ChangeMap, disk_id: &str) {
    match outcome {
        OpenOutcome::Created => {
            info!(disk = %disk_id, generation = %map.generation(), "new change journal")
        }
        OpenOutcome::Clean => {
            info!(disk = %disk_id, latest = %map.latest(), "change journal reopened cleanly")
        }
        OpenOutcome::Recovered {
            recovery_cut,
            recovered_blocks,
            torn_at,
        } => warn!(
            disk = %disk_id, ?recovery_cut, recovered_blocks, ?torn_at,
            "change journal was not closed cleanly: regions with write intent are reported as changed"
        ),
        OpenOutcome::NewGeneration { reason } => warn!(
            disk = %disk_id, generation = %map.generation(), %reason,
            "CHANGE TRACKING CONTINUITY LOST: new generation; every consumer needs a full or compare pass"
        ),
    }
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
        let (map, outcome) = judge_replay(replay, &config, &geometry);
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
        log_outcome(&outcome, &map, &config.disk_id);
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
