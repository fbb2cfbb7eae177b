//! The change map: for every block, in which epoch it was last written.
//!
//! Writes go into the *open* epoch. A cut seals it and gives it the next sequence number.
//! Sealed epochs are roaring bitmaps of block numbers, each covering the sequence range
//! `(after, upto]`. `changed(since, upto)` is the union of the epochs that overlap
//! `(since, upto]`: sorted and merged, it is exactly the set of blocks written after cut
//! `since` and up to cut `upto` (VMware's `QueryChangedDiskAreas`).
//!
//! Consumers register cursors. Epochs between two retained boundaries (a cursor, or one of
//! the newest `keep_recent` cuts) are merged, and epochs below the oldest boundary are folded
//! into `history`, so memory does not grow with the number of cuts. A query from inside a
//! merged span gets a superset (never a subset); a query from below the floor is a typed
//! error that tells the caller to fall back to a full or compare pass.
//!
//! This module does no I/O. Durability is the journal's job (`crate::journal`), and the
//! `Tracker` ties both together so that no write can be recorded without its intent.

use std::collections::{BTreeMap, VecDeque};

use roaring::{MultiOps, RoaringBitmap};

use crate::geometry::{Extent, Geometry, GeometryError};
use crate::id::{ChangeId, Generation};
use crate::limits::{CURSOR_NAME_LEN_MAX, CURSORS_MAX};

/// Blocks per open-epoch chunk buffer (one roaring container).
const CHUNK_SHIFT: u32 = 16;
/// Buffered block numbers per chunk before they are sorted and merged into the bitmap.
/// Small enough that the buffers of a 16 TiB disk stay under a few MiB, large enough that
/// the merge cost (one container binary search + one sorted merge) is spread thin.
const CHUNK_FLUSH: usize = 128;
/// Ranges of at least this many blocks go straight into the bitmap as a run.
const RANGE_DIRECT: u32 = 64;

/// Where a query starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// Every block that may hold data (for a first full): every block written in this
    /// generation, plus the whole disk if tracking started on a disk with unknown contents.
    All,
    /// Blocks written after this cut.
    Id(ChangeId),
}

/// In JSON, `"all"` or a ChangeId's text.
impl serde::Serialize for Since {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Since::All => s.serialize_str("all"),
            Since::Id(id) => s.collect_str(id),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Since {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Since, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        match &*text {
            "all" => Ok(Since::All),
            t => t
                .parse()
                .map(Since::Id)
                .map_err(|e| serde::de::Error::custom(format!("{e}; or \"all\""))),
        }
    }
}

/// Why a query was refused. Every variant means "the answer would not be complete": the
/// caller must fall back to a full copy or a digest compare, never use a short answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The ChangeId belongs to another tracking generation (tracking continuity was lost, or
    /// it is another disk's id).
    #[error(
        "ChangeId {id} is from generation {}, but tracking is at generation {current}: continuity was lost, a full or compare pass is needed",
        id.generation
    )]
    OtherGeneration { id: ChangeId, current: Generation },
    /// The ChangeId is older than the oldest epoch compaction kept.
    #[error(
        "ChangeId {id} is older than the oldest kept cut ({floor}): register a cursor to keep it, or do a full or compare pass"
    )]
    TooOld { id: ChangeId, floor: u64 },
    /// The ChangeId names a cut that has not happened.
    #[error("ChangeId {id} is newer than the latest cut ({latest})")]
    Future { id: ChangeId, latest: u64 },
    /// `since` is after `upto`.
    #[error("query from {since} to {upto} runs backwards")]
    Backwards { since: ChangeId, upto: ChangeId },
}

/// Why a cursor operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Names are 1 to 128 bytes of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
    #[error(
        "cursor name {0:?} is invalid: use 1 to {CURSOR_NAME_LEN_MAX} characters from A-Z a-z 0-9 . _ -, not starting with . or -"
    )]
    BadName(String),
    #[error("cursor {0:?} is already registered")]
    Exists(String),
    #[error("no cursor named {0:?} is registered")]
    Unknown(String),
    #[error("at most {CURSORS_MAX} cursors can be registered per disk")]
    TooMany,
    /// Cursors only move forward; moving one back could need epochs already compacted.
    #[error("cursor {name:?} is at {at}; it cannot move back to {to}")]
    Backwards { name: String, at: u64, to: u64 },
    /// The position itself is not answerable.
    #[error(transparent)]
    Position(#[from] QueryError),
}

/// Checks a cursor name: it ends up in logs, file names and CLIs, so it is kept plain.
pub fn validate_cursor_name(name: &str) -> Result<(), CursorError> {
    let ok = !name.is_empty()
        && name.len() <= CURSOR_NAME_LEN_MAX
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CursorError::BadName(
            name.chars().take(CURSOR_NAME_LEN_MAX + 8).collect(),
        ))
    }
}

/// Tunables of the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOptions {
    /// The newest this many cuts stay exact query points even with no cursor on them
    /// (at least 1: the latest cut is always a valid starting point).
    pub keep_recent: u64,
}

/// Most cuts `keep_recent` may keep exact (registered cursors have no such limit).
pub const KEEP_RECENT_MAX: u64 = 4096;
/// Highest sequence number: far beyond any real use (a cut per millisecond for 146 million
/// years), and low enough that nothing near it overflows.
pub const SEQ_MAX: u64 = 1 << 62;

impl Default for MapOptions {
    fn default() -> MapOptions {
        MapOptions { keep_recent: 8 }
    }
}

/// A sealed epoch, or several merged: the blocks written in cuts `(after, upto]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Epoch {
    pub after: u64,
    pub upto: u64,
    pub blocks: RoaringBitmap,
}

/// The writes of the epoch that is still open.
#[derive(Clone, Debug, Default)]
struct OpenEpoch {
    /// Unsorted low halves of recently written block numbers, one buffer per 2^16 blocks.
    pending: Vec<Vec<u16>>,
    /// Everything already merged.
    blocks: RoaringBitmap,
    /// The block recorded last (u64::MAX: none), to skip repeats cheaply.
    last: u64,
}

impl OpenEpoch {
    fn new(blocks: u64) -> OpenEpoch {
        let mut open = OpenEpoch {
            last: u64::MAX,
            ..OpenEpoch::default()
        };
        open.resize(blocks);
        open
    }

    fn resize(&mut self, blocks: u64) {
        let chunks = blocks.div_ceil(1 << CHUNK_SHIFT) as usize;
        self.flush_all();
        self.pending.resize_with(chunks, Vec::new);
        self.pending.shrink_to_fit();
    }

    #[inline]
    fn insert(&mut self, block: u32) {
        if self.last == block as u64 {
            return;
        }
        self.last = block as u64;
        let chunk = (block >> CHUNK_SHIFT) as usize;
        let buffer = &mut self.pending[chunk];
        buffer.push(block as u16);
        if buffer.len() >= CHUNK_FLUSH {
            self.flush(chunk);
        }
    }

    fn insert_range(&mut self, first: u32, last: u32) {
        if last - first >= RANGE_DIRECT {
            self.blocks.insert_range(first..=last);
        } else {
            for block in first..=last {
                self.insert(block);
            }
        }
    }

    fn flush(&mut self, chunk: usize) {
        let buffer = &mut self.pending[chunk];
        if buffer.is_empty() {
            return;
        }
        buffer.sort_unstable();
        buffer.dedup();
        let base = (chunk as u32) << CHUNK_SHIFT;
        let piece = RoaringBitmap::from_sorted_iter(buffer.iter().map(|&low| base | low as u32))
            .expect("sorted and deduplicated above");
        self.blocks |= &piece;
        buffer.clear();
    }

    fn flush_all(&mut self) {
        for chunk in 0..self.pending.len() {
            self.flush(chunk);
        }
    }

    /// All blocks written so far, without changing the epoch.
    fn snapshot(&self) -> RoaringBitmap {
        let mut all = self.blocks.clone();
        for (chunk, buffer) in self.pending.iter().enumerate() {
            let base = (chunk as u32) << CHUNK_SHIFT;
            all.extend(buffer.iter().map(|&low| base | low as u32));
        }
        all
    }

    fn take(&mut self) -> RoaringBitmap {
        self.flush_all();
        self.last = u64::MAX;
        std::mem::take(&mut self.blocks)
    }

    fn put_back(&mut self, blocks: RoaringBitmap) {
        self.blocks |= blocks;
    }

    fn remove_from(&mut self, first_block: u64) {
        self.flush_all();
        remove_from(&mut self.blocks, first_block);
        self.last = u64::MAX;
    }

    fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.pending.iter().all(Vec::is_empty)
    }
}

/// The change map of one disk in one tracking generation.
#[derive(Clone, Debug)]
pub struct ChangeMap {
    geometry: Geometry,
    generation: Generation,
    options: MapOptions,
    open: OpenEpoch,
    /// Contiguous: `epochs[0].after == floor`, each `upto` is the next `after`, and the last
    /// `upto == latest`. Empty when `floor == latest`.
    epochs: VecDeque<Epoch>,
    /// Blocks written in epochs at or below the floor (kept for `Since::All`).
    history: RoaringBitmap,
    floor: u64,
    latest: u64,
    cursors: BTreeMap<String, u64>,
    /// Tracking started on a disk whose earlier contents are unknown: `Since::All` must
    /// answer the whole disk.
    baseline_all: bool,
}

/// Everything a map holds, for persisting and restoring it.
#[derive(Clone, Debug, PartialEq)]
pub struct MapState {
    pub generation: Generation,
    pub disk_size: u64,
    pub block_size: u32,
    pub floor: u64,
    pub latest: u64,
    pub baseline_all: bool,
    pub history: RoaringBitmap,
    pub epochs: Vec<Epoch>,
    pub cursors: BTreeMap<String, u64>,
    pub open: RoaringBitmap,
}

/// A persisted map state that does not hold together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inconsistent change map state: {0}")]
pub struct StateError(pub &'static str);

impl ChangeMap {
    /// A new generation. `baseline_all` says the disk may already hold data that tracking
    /// never saw (true for any existing disk; false only for a disk created empty).
    pub fn new(
        geometry: Geometry,
        generation: Generation,
        baseline_all: bool,
        options: MapOptions,
    ) -> ChangeMap {
        ChangeMap {
            geometry,
            generation,
            options: MapOptions {
                keep_recent: options.keep_recent.clamp(1, KEEP_RECENT_MAX),
            },
            open: OpenEpoch::new(geometry.blocks()),
            epochs: VecDeque::new(),
            history: RoaringBitmap::new(),
            floor: 0,
            latest: 0,
            cursors: BTreeMap::new(),
            baseline_all,
        }
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Whether `Since::All` answers the whole disk (tracking began on existing data).
    pub fn baseline_all(&self) -> bool {
        self.baseline_all
    }

    /// The latest cut (sequence 0 before the first cut).
    pub fn latest(&self) -> ChangeId {
        ChangeId::new(self.generation, self.latest)
    }

    /// The oldest sequence number still answerable.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Sealed epochs (after compaction), oldest first.
    pub fn epochs(&self) -> impl Iterator<Item = &Epoch> {
        self.epochs.iter()
    }

    /// Records a write, trim or write-zeroes of `[offset, offset + length)` in the open epoch.
    ///
    /// This is the raw map operation. Through a `Tracker` it is only reachable with a
    /// durable write intent for the range.
    #[inline]
    pub fn record(&mut self, offset: u64, length: u64) -> Result<(), GeometryError> {
        if let Some((first, last)) = self.geometry.blocks_of(offset, length)? {
            if first == last {
                self.open.insert(first);
            } else {
                self.open.insert_range(first, last);
            }
        }
        Ok(())
    }

    /// Marks blocks `[first, last]` written in the open epoch (used by journal recovery).
    pub(crate) fn record_blocks(&mut self, first: u32, last: u32) {
        let last = last.min((self.geometry.blocks().max(1) - 1) as u32);
        if self.geometry.blocks() > 0 && first <= last {
            self.open.insert_range(first, last);
        }
    }

    /// True if nothing was recorded since the last cut.
    pub fn open_is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// The blocks of the open epoch, without sealing it.
    pub fn open_blocks(&self) -> RoaringBitmap {
        self.open.snapshot()
    }

    /// Replaces the open epoch's blocks (journal replay: a sealed record holds the whole
    /// epoch, including blocks an earlier snapshot had as open).
    pub(crate) fn replace_open(&mut self, blocks: RoaringBitmap) {
        self.open.take();
        self.open.put_back(blocks);
    }

    /// Changes the tunables; compaction follows the new ones from the next operation on.
    pub fn set_options(&mut self, options: MapOptions) {
        self.options = MapOptions {
            keep_recent: options.keep_recent.clamp(1, KEEP_RECENT_MAX),
        };
    }

    pub fn options(&self) -> MapOptions {
        self.options
    }

    /// Records a range, clipping whatever lies past the end of the disk (a write whose
    /// intent was taken before the disk shrank).
    pub(crate) fn record_clipped(&mut self, offset: u64, length: u64) {
        let size = self.geometry.disk_size();
        if offset < size {
            let length = length.min(size - offset);
            self.record(offset, length).expect("clipped to the disk");
        }
    }

    /// Seals the open epoch as the next cut. `persist` sees the epoch's blocks and its
    /// sequence number before the cut exists; if it fails, the writes go back into the open
    /// epoch and no cut is made. Returns the new cut's ChangeId.
    pub fn seal_with<E>(
        &mut self,
        persist: impl FnOnce(&RoaringBitmap, u64) -> Result<(), E>,
    ) -> Result<ChangeId, E> {
        let mut blocks = self.open.take();
        let seq = self.latest + 1;
        if let Err(e) = persist(&blocks, seq) {
            self.open.put_back(blocks);
            return Err(e);
        }
        blocks.optimize();
        self.latest = seq;
        self.epochs.push_back(Epoch {
            after: seq - 1,
            upto: seq,
            blocks,
        });
        self.compact();
        Ok(self.latest())
    }

    /// Seals the open epoch with no persistence step (an in-memory map).
    pub fn seal(&mut self) -> ChangeId {
        self.seal_with(|_, _| Ok::<(), std::convert::Infallible>(()))
            .unwrap_or_else(|e| match e {})
    }

    fn check_id(&self, id: ChangeId) -> Result<(), QueryError> {
        if id.generation != self.generation {
            return Err(QueryError::OtherGeneration {
                id,
                current: self.generation,
            });
        }
        if id.seq > self.latest {
            return Err(QueryError::Future {
                id,
                latest: self.latest,
            });
        }
        Ok(())
    }

    /// Blocks written after `since` and up to cut `upto`. Exact when `since` is a retained
    /// boundary (a cursor, or one of the newest cuts); a superset otherwise.
    pub fn changed_blocks(
        &self,
        since: Since,
        upto: ChangeId,
    ) -> Result<RoaringBitmap, QueryError> {
        self.check_id(upto)?;
        let after = match since {
            Since::Id(id) => {
                self.check_id(id)?;
                if id.seq > upto.seq {
                    return Err(QueryError::Backwards { since: id, upto });
                }
                if id.seq < self.floor {
                    return Err(QueryError::TooOld {
                        id,
                        floor: self.floor,
                    });
                }
                id.seq
            }
            Since::All => 0,
        };
        let mut blocks = self
            .epochs
            .iter()
            .filter(|e| e.upto > after && e.after < upto.seq)
            .map(|e| &e.blocks)
            .union();
        if since == Since::All {
            blocks |= &self.history;
            if self.baseline_all && self.geometry.blocks() > 0 {
                blocks.insert_range(0..=(self.geometry.blocks() - 1) as u32);
            }
        }
        Ok(blocks)
    }

    /// `changed_blocks` as sorted, merged byte extents (the last one clipped to the disk).
    pub fn changed(&self, since: Since, upto: ChangeId) -> Result<Vec<Extent>, QueryError> {
        Ok(self.changed_extents(since, upto)?.collect())
    }

    /// The same answer as a lazy stream of extents, for answers too large to materialise.
    pub fn changed_extents(&self, since: Since, upto: ChangeId) -> Result<Extents, QueryError> {
        Ok(Extents::new(
            self.changed_blocks(since, upto)?,
            self.geometry,
        ))
    }

    // ---- cursors ----

    /// Registers a consumer at `at`: epochs after it are kept until it advances or drops.
    pub fn register_cursor(&mut self, name: &str, at: ChangeId) -> Result<(), CursorError> {
        validate_cursor_name(name)?;
        if self.cursors.contains_key(name) {
            return Err(CursorError::Exists(name.to_owned()));
        }
        if self.cursors.len() >= CURSORS_MAX {
            return Err(CursorError::TooMany);
        }
        self.check_position(at)?;
        self.cursors.insert(name.to_owned(), at.seq);
        Ok(())
    }

    /// Moves a cursor forward (its consumer has what it needs up to `to`).
    pub fn advance_cursor(&mut self, name: &str, to: ChangeId) -> Result<(), CursorError> {
        let at = *self
            .cursors
            .get(name)
            .ok_or_else(|| CursorError::Unknown(name.to_owned()))?;
        self.check_position(to)?;
        if to.seq < at {
            return Err(CursorError::Backwards {
                name: name.to_owned(),
                at,
                to: to.seq,
            });
        }
        self.cursors.insert(name.to_owned(), to.seq);
        self.compact();
        Ok(())
    }

    pub fn drop_cursor(&mut self, name: &str) -> Result<(), CursorError> {
        self.cursors
            .remove(name)
            .ok_or_else(|| CursorError::Unknown(name.to_owned()))?;
        self.compact();
        Ok(())
    }

    /// The registered cursors and their positions.
    pub fn cursors(&self) -> impl Iterator<Item = (&str, ChangeId)> {
        self.cursors
            .iter()
            .map(|(n, &s)| (n.as_str(), ChangeId::new(self.generation, s)))
    }

    fn check_position(&self, at: ChangeId) -> Result<(), QueryError> {
        self.check_id(at)?;
        if at.seq < self.floor {
            return Err(QueryError::TooOld {
                id: at,
                floor: self.floor,
            });
        }
        Ok(())
    }

    /// Is `seq` a point that must stay an exact query point (a cursor, or one of the newest
    /// `keep_recent` cuts)? Computed, never materialised: `keep_recent` and `latest` may be
    /// large.
    fn is_boundary(cursors: &BTreeMap<String, u64>, seq: u64, recent_from: u64) -> bool {
        seq >= recent_from || cursors.values().any(|&c| c == seq)
    }

    /// Merges epochs that no boundary separates and folds those below the oldest boundary
    /// into history. Deterministic in the sequence of operations, so a replayed journal
    /// compacts exactly as the live map did.
    fn compact(&mut self) {
        let recent_from = self.latest.saturating_sub(self.options.keep_recent - 1);
        let oldest = self.cursors.values().copied().fold(recent_from, u64::min);
        let new_floor = self.floor.max(oldest);
        while self.epochs.front().is_some_and(|e| e.upto <= new_floor) {
            let epoch = self.epochs.pop_front().expect("checked non-empty");
            self.history |= epoch.blocks;
        }
        self.floor = new_floor;
        let mut merged: VecDeque<Epoch> = VecDeque::with_capacity(self.epochs.len());
        for epoch in self.epochs.drain(..) {
            match merged.back_mut() {
                Some(prev) if !Self::is_boundary(&self.cursors, epoch.after, recent_from) => {
                    prev.blocks |= epoch.blocks;
                    prev.upto = epoch.upto;
                }
                _ => merged.push_back(epoch),
            }
        }
        self.epochs = merged;
    }

    // ---- resize ----

    /// Changes the disk size. Growing reports the new range (and a formerly partial last
    /// block) as changed to every earlier ChangeId; shrinking forgets blocks past the end.
    pub fn resize(&mut self, disk_size: u64) -> Result<(), GeometryError> {
        let new = self.geometry.resized(disk_size)?;
        let old_size = self.geometry.disk_size();
        let old_blocks = self.geometry.blocks();
        let new_blocks = new.blocks();
        if new_blocks < old_blocks {
            self.open.remove_from(new_blocks);
            for epoch in &mut self.epochs {
                remove_from(&mut epoch.blocks, new_blocks);
            }
            remove_from(&mut self.history, new_blocks);
        }
        self.open.resize(new_blocks);
        self.geometry = new;
        // Every block from the shorter end onwards changed content: new space reads as
        // zeros, and a partial last block gained or lost its tail. A shrink to a block
        // boundary changes no remaining block, but the disk changed all the same: its last
        // block is reported, so that "nothing changed since" always means "the same disk"
        // (an idle push must not skip a shrink).
        let first_block = old_size.min(disk_size) >> new.block_shift();
        if first_block < new_blocks {
            self.record_blocks(first_block as u32, (new_blocks - 1) as u32);
        } else if disk_size != old_size && new_blocks > 0 {
            self.record_blocks((new_blocks - 1) as u32, (new_blocks - 1) as u32);
        }
        Ok(())
    }

    // ---- persistence support ----

    /// Everything needed to rebuild this map exactly.
    pub fn state(&self) -> MapState {
        MapState {
            generation: self.generation,
            disk_size: self.geometry.disk_size(),
            block_size: self.geometry.block_size(),
            floor: self.floor,
            latest: self.latest,
            baseline_all: self.baseline_all,
            history: self.history.clone(),
            epochs: self.epochs.iter().cloned().collect(),
            cursors: self.cursors.clone(),
            open: self.open.snapshot(),
        }
    }

    /// Rebuilds a map from a persisted state, checking that it holds together.
    pub fn from_state(state: MapState, options: MapOptions) -> Result<ChangeMap, StateError> {
        let geometry = Geometry::new(state.disk_size, state.block_size as u64)
            .map_err(|_| StateError("bad geometry"))?;
        let blocks = geometry.blocks();
        let in_range = |bm: &RoaringBitmap| bm.max().is_none_or(|m| (m as u64) < blocks);
        if state.floor > state.latest {
            return Err(StateError("floor above latest cut"));
        }
        if state.latest > SEQ_MAX {
            return Err(StateError("sequence number out of range"));
        }
        let mut expect = state.floor;
        for epoch in &state.epochs {
            if epoch.after != expect || epoch.upto <= epoch.after {
                return Err(StateError("epochs are not contiguous"));
            }
            if !in_range(&epoch.blocks) {
                return Err(StateError("epoch names a block past the end of the disk"));
            }
            expect = epoch.upto;
        }
        if expect != state.latest {
            return Err(StateError("epochs do not reach the latest cut"));
        }
        if !in_range(&state.history) || !in_range(&state.open) {
            return Err(StateError("a block past the end of the disk"));
        }
        if state.cursors.len() > CURSORS_MAX {
            return Err(StateError("too many cursors"));
        }
        for (name, &seq) in &state.cursors {
            if validate_cursor_name(name).is_err() || seq < state.floor || seq > state.latest {
                return Err(StateError("bad cursor"));
            }
        }
        let mut map = ChangeMap::new(geometry, state.generation, state.baseline_all, options);
        map.floor = state.floor;
        map.latest = state.latest;
        map.history = state.history;
        map.epochs = state.epochs.into();
        map.cursors = state.cursors;
        map.open.put_back(state.open);
        Ok(map)
    }
}

/// Removes every block numbered `first` or above.
fn remove_from(blocks: &mut RoaringBitmap, first: u64) {
    if let Ok(first) = u32::try_from(first) {
        blocks.remove_range(first..);
    }
}

/// Converts a set of blocks into sorted, merged byte extents clipped to the disk.
pub fn blocks_to_extents(blocks: &RoaringBitmap, geometry: &Geometry) -> Vec<Extent> {
    Extents::new(blocks.clone(), *geometry).collect()
}

/// The answer to a query as a stream of sorted, merged byte extents, produced lazily from
/// the block set (a large answer need not be materialised: 1% of a 1 TiB disk in random
/// blocks is 2.7 million extents).
pub struct Extents {
    values: roaring::bitmap::IntoIter,
    shift: u32,
    disk_size: u64,
    /// The run being built: blocks `[start, end)`.
    run: Option<(u64, u64)>,
}

impl Extents {
    pub fn new(blocks: RoaringBitmap, geometry: Geometry) -> Extents {
        Extents {
            values: blocks.into_iter(),
            shift: geometry.block_shift(),
            disk_size: geometry.disk_size(),
            run: None,
        }
    }

    fn extent(&self, start: u64, end: u64) -> Extent {
        let offset = start << self.shift;
        // Only a run reaching the last block can be clipped.
        Extent {
            offset,
            length: (end << self.shift).min(self.disk_size) - offset,
        }
    }
}

impl Iterator for Extents {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        // Value by value, with run detection. Not roaring 0.12's `next_many`: on a full
        // container (all 65,536 blocks) it overflows a u16 and returns an empty batch, which
        // reads as the end of the answer: a silent under-report (regression tests below).
        for block in self.values.by_ref() {
            let block = block as u64;
            match self.run {
                Some((start, end)) if block == end => self.run = Some((start, end + 1)),
                Some((start, end)) => {
                    self.run = Some((block, block + 1));
                    return Some(self.extent(start, end));
                }
                None => self.run = Some((block, block + 1)),
            }
        }
        let (start, end) = self.run.take()?;
        Some(self.extent(start, end))
    }
}

#[cfg(test)]
mod tests;
