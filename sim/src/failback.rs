//! The DR roles: a failover at a point the receiver holds, the recovered VM writing through
//! the failover's tracked overlay, and failback, the agent's passes and the cutover that
//! commits the DR disk as a new point, under the same faults as the rest.
//!
//! The receiver's half is the real code: the fence (`DiskStore::fence`), the overlay's
//! tracker (`ctk::Tracker` with `export::overlay_config`), a pass's replay of the running
//! overlay's journal (`export::replay`, what `Peek` does), what a pass sends
//! (`failback::plan`, `failback::write_blocks`), and the commit (`failback::merge` into
//! `DiskStore::ingest_failback`). Here the DR disk is held in memory (`SimDr`), and every
//! write of the recovered VM is kept across a power cut, as if written through (its journal
//! loses what was not synced). The agent's half follows `agent/src/failback.rs`: its disk
//! fenced from the first pass, what it knows of its own writes (its changes since its replica
//! cursor, or a hash per unit), each pass applied through its tracker and recorded only once
//! applied, the cutover's cut, and its cursor moved to the committed point.
//!
//! The checker: after each pass the original disk equals the DR disk as of the pass's
//! overlay cut, but for blocks the overlay wrote after it; after the cutover it equals the
//! DR disk byte for byte, and the new point restores to it (`check_receiver`).

use ctk_receiver::export::{self, Replayed};
use ctk_receiver::failback::{self, DrDisk, Known};
use ctk_receiver::store::StoreError;
use roaring::RoaringBitmap;

use super::*;

/// The failover at the DR site.
pub(crate) struct Dr {
    point: ChangeId,
    size: u64,
    /// The DR disk's bytes: the point under the overlay's writes.
    image: Vec<u8>,
    /// The overlay's journal, on the receiver's media.
    journal: MemStorage,
    /// The running failover's tracker (`None` while its process is down).
    tracker: Option<Tracker<MemStorage>>,
    /// Where the point differs from the newest point (nothing commits while fenced).
    not_in_newest: Vec<(u64, u64)>,
    /// How many writes of the recovered VM touched each block (the reference's clock).
    writes: Vec<u64>,
    /// The DR disk and its blocks' write counts as of every overlay cut (the reference).
    cuts: HashMap<ChangeId, (Vec<u8>, Vec<u64>)>,
    /// The final pass's cut: the export is stopped, nothing writes the DR disk any more.
    held: Option<ChangeId>,
}

impl Dr {
    fn snapshot(&self) -> (Vec<u8>, Vec<u64>) {
        (self.image.clone(), self.writes.clone())
    }

    /// The reference for the cut about to be taken: its record may reach the journal even
    /// if the cut fails (its sync did), and a restart then finds it.
    fn before_cut(&mut self) {
        if let Some(latest) = self.tracker.as_ref().map(|t| t.latest()) {
            let next = ChangeId::new(latest.generation, latest.seq + 1);
            self.cuts.insert(next, self.snapshot());
        }
    }
}

/// The agent's failback, as `<journal>.failback` keeps it (durable: it survives a crash).
#[derive(Clone, Debug, Default)]
pub(crate) struct Failback {
    /// The overlay cut the last applied pass was complete as of.
    since: Option<ChangeId>,
    /// The cutover asked to commit (overlay cut, the agent's cut).
    committing: Option<(ChangeId, ChangeId)>,
}

/// The DR disk as a pass or the commit reads it.
struct SimDr<'a> {
    point: ChangeId,
    image: &'a [u8],
    not_in_newest: &'a [(u64, u64)],
    source: Source<'a>,
}

enum Source<'a> {
    /// A copy of the running overlay's journal, replayed, and its latest sealed cut.
    Peeked {
        tracker: Box<Tracker<MemStorage>>,
        upto: ChangeId,
    },
    /// The overlay held: nothing else writes it.
    Held(&'a mut Tracker<MemStorage>),
}

fn tracker_error(e: TrackerError) -> StoreError {
    StoreError::Protocol(format!("the overlay's tracker: {e}"))
}

impl DrDisk for SimDr<'_> {
    fn point(&self) -> ChangeId {
        self.point
    }
    fn size(&self) -> u64 {
        self.image.len() as u64
    }
    fn changes(
        &mut self,
        since: Option<ChangeId>,
    ) -> Result<(ChangeId, RoaringBitmap), StoreError> {
        match &mut self.source {
            Source::Peeked { tracker, upto } => export::blocks_since(tracker, since, *upto)
                .map(|b| (*upto, b))
                .map_err(tracker_error),
            Source::Held(tracker) => {
                let upto = tracker.cut().map_err(tracker_error)?;
                export::blocks_since(tracker, since, upto)
                    .map(|b| (upto, b))
                    .map_err(tracker_error)
            }
        }
    }
    fn written(&mut self) -> Result<RoaringBitmap, StoreError> {
        match &self.source {
            Source::Peeked { tracker, upto } => {
                export::blocks_since(tracker, None, *upto).map_err(tracker_error)
            }
            Source::Held(tracker) => export::written(tracker).map_err(tracker_error),
        }
    }
    fn not_in_newest(&mut self) -> Result<Vec<(u64, u64)>, StoreError> {
        Ok(self.not_in_newest.to_vec())
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        buf.copy_from_slice(&self.image[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

impl Sim {
    /// Fails the disk over at a point the receiver holds (the newest, or sometimes an older
    /// one): the fence, then the DR disk read through an exposure of the point.
    pub(crate) fn fail_over(&mut self) -> Outcome {
        let Ok(mut store) = self.open_store() else {
            return Ok(());
        };
        let points = store.points().to_vec();
        let Some(newest) = points.last() else {
            return Ok(());
        };
        let point = if self.rng.below(3) == 0 {
            points[self.rng.below(points.len() as u64) as usize].change_id
        } else {
            newest.change_id
        };
        if let Err(e) = store.fence(point) {
            self.event(format!("receiver: failover at {point} refused: {e}"));
            return Ok(());
        }
        drop(store);
        let fs: Arc<dyn Vfs> = Arc::new(self.fs.clone());
        let exposure = ctk_receiver::store::Exposure::open_in(
            fs,
            Path::new(ROOT),
            DISK,
            ctk_receiver::store::Pick::Id(point),
        );
        let read = exposure.and_then(|e| {
            let mut reader = e.reader()?;
            let mut image = vec![0u8; reader.size() as usize];
            reader.read_at(&mut image, 0)?;
            Ok((image, reader.not_in_full()?))
        });
        let (image, not_in_newest) =
            read.map_err(|e| self.violation(format!("the fenced point {point} reads: {e}")))?;
        if self.cuts.get(&point) != Some(&image) {
            return Err(self.violation(format!(
                "DIVERGED: the failed-over point {point} does not read as it was cut"
            )));
        }
        let size = image.len() as u64;
        let journal = MemStorage::new();
        let mut dr = Dr {
            point,
            size,
            image,
            journal,
            tracker: None,
            not_in_newest,
            writes: vec![0; size.div_ceil(BS) as usize],
            cuts: HashMap::new(),
            held: None,
        };
        self.report.failovers += 1;
        self.event(format!("receiver: failed over at {point} ({size} bytes)"));
        self.open_overlay(&mut dr)?;
        self.dr = Some(dr);
        Ok(())
    }

    /// Starts the failover's process again (or for the first time): its tracker reopened.
    fn open_overlay(&mut self, dr: &mut Dr) -> Outcome {
        if dr.tracker.is_some() {
            return Ok(());
        }
        let mut gen_rng = Rng::new(self.rng.next_u64());
        let config = export::overlay_config(dr.size, &dr.point.to_string());
        let opened = Tracker::open(dr.journal.clone(), config, || {
            Generation(((gen_rng.next_u64() as u128) << 64) | gen_rng.next_u64() as u128)
        });
        match opened {
            Ok((t, OpenOutcome::NewGeneration { reason })) if dr.tracker.is_none() => {
                if !dr.cuts.is_empty() {
                    return Err(self.violation(format!(
                        "LOST: the overlay's journal lost its generation ({reason})"
                    )));
                }
                // Created now (or its creation never became durable): the point, unwritten.
                dr.cuts.insert(t.latest(), dr.snapshot());
                dr.tracker = Some(t);
            }
            Ok((t, outcome)) => {
                // Cuts that did not survive are no cuts; the recovery cut (if any) holds
                // what the DR disk held at the crash.
                let latest = t.latest();
                dr.cuts
                    .retain(|id, _| id.generation != latest.generation || id.seq < latest.seq);
                dr.cuts.insert(latest, dr.snapshot());
                self.event(format!("receiver: overlay opened: {outcome:?}"));
                dr.tracker = Some(t);
            }
            Err(e) => {
                dr.journal.heal();
                self.event(format!("receiver: overlay does not open yet: {e}"));
            }
        }
        Ok(())
    }

    /// One step while failed over.
    pub(crate) fn failover_step(&mut self) -> Outcome {
        let mut dr = self.dr.take().expect("failed over");
        let outcome = self.failover_step_with(&mut dr);
        if self.failback_done {
            self.failback_done = false;
        } else {
            self.dr = Some(dr);
        }
        outcome
    }

    fn failover_step_with(&mut self, dr: &mut Dr) -> Outcome {
        if self.rng.chance(self.swarm.receiver_crash / 2) {
            self.dr_power_cut(dr);
        }
        if self.rng.chance(self.swarm.journal_sync_fail) {
            dr.journal.fail_sync_after(self.rng.below(3));
        }
        if dr.held.is_some()
            || self
                .failback
                .as_ref()
                .is_some_and(|f| f.committing.is_some())
        {
            return self.cutover(dr);
        }
        match self.rng.below(100) {
            0..40 => self.dr_write(dr),
            40..50 => {
                // The running failover's cut each second.
                if dr.tracker.is_some() {
                    dr.before_cut();
                    let cut = dr.tracker.as_mut().map(|t| t.cut());
                    if let Some(Err(e)) = cut {
                        self.dr_process_crash(dr, &format!("cut failed: {e}"));
                    }
                }
                Ok(())
            }
            50..68 if self.failback.is_none() => self.write(),
            68..74 if self.failback.is_none() => self.fenced_push(),
            74..93 => self.failback_pass(dr, false),
            _ => self.cutover(dr),
        }
    }

    /// A push while the disk is failed over: refused, nothing committed.
    fn fenced_push(&mut self) -> Outcome {
        let before = self.receiver_points()?.last().map(|p| p.change_id);
        self.push()?;
        let after = self.receiver_points()?.last().map(|p| p.change_id);
        if before != after {
            return Err(self.violation(format!(
                "FENCE BROKEN: a push committed {after:?} into a failed-over disk"
            )));
        }
        Ok(())
    }

    /// The recovered VM writes through the overlay: intent durable, data, record.
    fn dr_write(&mut self, dr: &mut Dr) -> Outcome {
        self.open_overlay(dr)?;
        let Some(t) = dr.tracker.as_mut() else {
            return Ok(());
        };
        let offset = self.rng.below(dr.size);
        let length = 1 + self.rng.below((dr.size - offset).min(3 * BS));
        let mut data = vec![0u8; length as usize];
        if self.rng.below(4) != 0 {
            self.rng.fill(&mut data);
        }
        match t.intend(offset, length) {
            Ok(intent) => {
                dr.image[offset as usize..(offset + length) as usize].copy_from_slice(&data);
                for b in offset / BS..(offset + length).div_ceil(BS) {
                    dr.writes[b as usize] += 1;
                }
                t.record(intent);
                self.report.dr_writes += 1;
            }
            Err(e) => self.dr_process_crash(dr, &format!("intent failed: {e}")),
        }
        Ok(())
    }

    /// The failover's process dies (its journal keeps what reached the kernel).
    fn dr_process_crash(&mut self, dr: &mut Dr, why: &str) {
        dr.tracker = None;
        dr.journal.heal();
        self.event(format!("receiver: failover process died ({why})"));
    }

    /// A power cut at the DR site: the store's and the overlay journal's unsynced bytes go.
    fn dr_power_cut(&mut self, dr: &mut Dr) {
        dr.tracker = None;
        let mode = match self.rng.below(3) {
            0 => CrashMode::DropUnsynced,
            1 => CrashMode::KeepPrefix(self.rng.below(64) as usize),
            _ => CrashMode::KeepAll,
        };
        dr.journal.crash(mode);
        dr.journal.heal();
        self.power_cut();
        self.event(format!("receiver: DR power cut, overlay journal {mode:?}"));
    }
}

/// The receiver's answer to a cutover's commit, as the agent sees it.
enum Commit {
    Committed {
        already: bool,
        digest: Option<ctk::digest::ImageDigest>,
    },
    /// The DR disk changed after the final pass: the agent runs it again.
    Mismatch,
    /// No answer (lost, refused for now, or the power went).
    None,
}

impl Sim {
    /// One failback pass: the agent (fenced from its first pass on) asks, the receiver
    /// builds it from the DR disk, the link carries it, the agent applies it through its
    /// tracker and records it. `last`: the final pass, which holds the overlay.
    pub(crate) fn failback_pass(&mut self, dr: &mut Dr, last: bool) -> Outcome {
        let since = self.failback.get_or_insert_with(Failback::default).since;
        if self.size != dr.size {
            // The agent refuses a DR disk of another size; its operator resizes the disk.
            match self.tracker()?.resize(dr.size) {
                Ok(()) => {
                    self.source.resize(dr.size as usize, 0);
                    self.size = dr.size;
                    self.config.disk_size = dr.size;
                    self.event(format!("agent: resized to the DR disk's {} bytes", dr.size));
                }
                Err(e) => {
                    self.crash_agent(&format!("resize failed: {e}"));
                    return Ok(());
                }
            }
        }
        let known = match since {
            None => match self.known()? {
                Some(k) => Some(k),
                None => return Ok(()),
            },
            Some(_) => None,
        };
        let Some((upto, mut bytes)) = self.build_pass(dr, since, known, last)? else {
            return Ok(());
        };
        if self.rng.chance(self.swarm.link_cut) {
            self.report.links_cut += 1;
            let keep = self.rng.below(bytes.len() as u64) as usize;
            bytes.truncate(keep);
            self.event(format!("link: the pass is cut after {keep} bytes"));
        } else if self.rng.chance(self.swarm.corrupt) {
            self.report.corrupted += 1;
            let at = self.rng.below(bytes.len() as u64) as usize;
            bytes[at] ^= 1 << self.rng.below(8);
            self.event(format!("link: byte {at} of the pass flipped"));
        }
        if !self.apply_pass(&bytes)? {
            return Ok(());
        }
        if let Some(f) = self.failback.as_mut() {
            f.since = Some(upto);
        }
        self.report.failback_passes += 1;
        self.event(format!(
            "agent: failback pass to overlay cut {upto} applied"
        ));
        self.check_pass(dr, upto)
    }

    /// What the agent knows of its own disk for a first pass: its changes since its
    /// replica cursor (cut first), else a hash per unit. `None`: it crashed.
    fn known(&mut self) -> Result<Option<Known>, Violation> {
        let compare = self.rng.chance(self.swarm.forced_resync);
        if let (Some(at), false) = (self.cursor, compare) {
            let cut = match self.tracker()?.cut() {
                Ok(id) => id,
                Err(e) => {
                    self.report.journal_sync_failures += 1;
                    self.crash_agent(&format!("cut failed: {e}"));
                    return Ok(None);
                }
            };
            self.cuts.insert(cut, self.source.clone());
            if let Some(extents) = self.changed(Since::Id(at), cut)? {
                let named = extents.iter().map(|e| (e.offset, e.length)).collect();
                return Ok(Some(Known::Extents(named)));
            }
        }
        let unit = (BS as u32) << self.rng.below(3);
        let hashes = self
            .source
            .chunks(unit as usize)
            .map(ctk::digest::unit_hash)
            .collect();
        self.report.failback_compares += 1;
        self.event(format!("agent: failback by digests ({unit}-byte units)"));
        Ok(Some(Known::UnitHashes { unit, hashes }))
    }

    /// The receiver's pass: the overlay cut it is complete as of and its delta, or `None`
    /// when the DR side cannot build it now.
    fn build_pass(
        &mut self,
        dr: &mut Dr,
        since: Option<ChangeId>,
        known: Option<Known>,
        last: bool,
    ) -> Result<Option<(ChangeId, Vec<u8>)>, Violation> {
        let source = if last {
            self.open_overlay(dr)?;
            dr.before_cut();
            match dr.tracker.as_mut() {
                Some(t) => Source::Held(t),
                None => return Ok(None),
            }
        } else {
            let bytes = dr.journal.contents().unwrap_or_default();
            match export::replay(bytes, dr.size, &dr.point.to_string()) {
                Ok(Replayed::Sealed { tracker, upto }) => Source::Peeked { tracker, upto },
                Ok(Replayed::Unusable(why)) => {
                    self.event(format!("receiver: no pass: the overlay's journal: {why}"));
                    return Ok(None);
                }
                Err(e) => return Err(self.violation(format!("the overlay does not replay: {e}"))),
            }
        };
        let mut view = SimDr {
            point: dr.point,
            image: &dr.image,
            not_in_newest: &dr.not_in_newest,
            source,
        };
        let (upto, blocks) = match failback::plan(&mut view, since, known) {
            Ok(p) => p,
            Err(e) => {
                drop(view);
                self.dr_process_crash(dr, &format!("the final pass's cut failed: {e}"));
                return Ok(None);
            }
        };
        let header = DeltaHeader {
            disk_id: DISK.into(),
            disk_size: dr.size,
            block_size: BS as u32,
            from: Some(dr.point),
            to: upto,
        };
        let options = WriteOptions {
            zstd_level: Some(1).filter(|_| self.rng.below(2) == 0),
        };
        let written = failback::write_blocks(&mut view, &header, &blocks, BS, Vec::new(), options);
        drop(view);
        let (bytes, _) = written.map_err(|e| self.violation(format!("a pass fails: {e}")))?;
        if last {
            dr.held = Some(upto);
        }
        self.event(format!(
            "receiver: {} pass since {since:?} to {upto}: {} blocks",
            if last { "final" } else { "a" },
            blocks.len()
        ));
        Ok(Some((upto, bytes)))
    }

    /// The agent writes a pass into its disk through its tracker: whether all of it landed
    /// (a pass that does not read, or a crash, leaves it to be asked again).
    fn apply_pass(&mut self, bytes: &[u8]) -> Result<bool, Violation> {
        let mut reader = match delta::DeltaReader::new(bytes) {
            Ok(r) if r.header().disk_size == self.size => r,
            Ok(_) => return Err(self.violation("a pass of another size than the disk")),
            Err(e) => {
                self.event(format!("agent: the pass does not read: {e}"));
                return Ok(false);
            }
        };
        loop {
            let (offset, data) = match reader.next_record() {
                Ok(Some(delta::DeltaRecord::Data { offset, data })) => (offset, data.to_vec()),
                Ok(Some(delta::DeltaRecord::Zero { offset, length })) => {
                    (offset, vec![0; length as usize])
                }
                Ok(None) => return Ok(true),
                Err(e) => {
                    self.event(format!("agent: the pass fails part way: {e}"));
                    return Ok(false);
                }
            };
            let range = offset as usize..offset as usize + data.len();
            let crash_mid = self.rng.chance(self.swarm.agent_crash / 8);
            let intent = match self.tracker()?.intend(offset, data.len() as u64) {
                Ok(i) => i,
                Err(e) => {
                    self.report.journal_sync_failures += 1;
                    self.crash_agent(&format!("a pass's intent failed: {e}"));
                    return Ok(false);
                }
            };
            if crash_mid {
                if self.rng.below(2) == 0 {
                    self.source[range].copy_from_slice(&data);
                }
                drop(intent);
                self.crash_agent("mid-pass");
                return Ok(false);
            }
            self.source[range].copy_from_slice(&data);
            self.tracker()?.record(intent);
        }
    }

    /// After a pass to overlay cut `upto`: every block of the original disk that the
    /// recovered VM has not written since holds the DR disk's bytes as of `upto` (one it
    /// wrote since may hold any of its later bytes: a later pass sends it).
    fn check_pass(&self, dr: &Dr, upto: ChangeId) -> Outcome {
        let Some((then, writes)) = dr.cuts.get(&upto) else {
            return Err(self.violation(format!("a pass to {upto}, no such overlay cut")));
        };
        for (b, mine) in self.source.chunks(BS as usize).enumerate() {
            let at = b * BS as usize..(b * BS as usize + mine.len());
            if writes[b] == dr.writes[b] && mine != &then[at] {
                return Err(self.violation(format!(
                    "MISSED WRITE: after the failback pass to {upto}, block {b} of the \
                     original disk is not the DR disk's as of that cut"
                )));
            }
        }
        Ok(())
    }

    /// The cutover: the final pass, the agent's cut, the receiver's commit of the DR disk as
    /// that point, the agent's check and its cursor moved. Each step may fail and be retried.
    pub(crate) fn cutover(&mut self, dr: &mut Dr) -> Outcome {
        let committing = self.failback.as_ref().and_then(|f| f.committing);
        let (upto, point) = match committing {
            Some(c) => c,
            None => {
                self.failback_pass(dr, true)?;
                let since = self.failback.as_ref().and_then(|f| f.since);
                let Some(upto) = dr.held.filter(|h| since == Some(*h)) else {
                    return Ok(());
                };
                let point = match self.tracker()?.cut() {
                    Ok(id) => id,
                    Err(e) => {
                        self.report.journal_sync_failures += 1;
                        self.crash_agent(&format!("the cutover's cut failed: {e}"));
                        return Ok(());
                    }
                };
                self.cuts.insert(point, self.source.clone());
                if let Some(f) = self.failback.as_mut() {
                    f.committing = Some((upto, point));
                }
                (upto, point)
            }
        };
        match self.commit_failback(dr, upto, point)? {
            Commit::None => Ok(()),
            Commit::Mismatch => {
                if let Some(f) = self.failback.as_mut() {
                    f.committing = None;
                }
                Ok(())
            }
            Commit::Committed { already, digest } => self.failed_back(dr, point, already, digest),
        }
    }

    /// The receiver's side of the cutover (`failback::commit`, over the simulated store and
    /// DR disk), through the faulty link and filesystem.
    fn commit_failback(
        &mut self,
        dr: &mut Dr,
        upto: ChangeId,
        point: ChangeId,
    ) -> Result<Commit, Violation> {
        if self.rng.chance(self.swarm.link_cut) {
            self.report.links_cut += 1;
            self.event("link: the cutover's commit request is lost".into());
            return Ok(Commit::None);
        }
        if self.rng.chance(self.swarm.receiver_crash) {
            let ops = self.rng.below(400);
            self.fs.power_cut_after(ops);
        }
        let faults = self.faults();
        self.fs.set_faults(faults);
        self.open_overlay(dr)?;
        let now = self.now();
        let retention = self.retention();
        let result = match self.open_store() {
            Err(e) => Err(e),
            Ok(mut s) if s.points().last().map(|p| p.change_id) == Some(point) => s
                .unfence()
                .map(|_| (true, s.points().last().and_then(|p| p.image_digest))),
            Ok(mut s) => match dr.tracker.as_mut() {
                None => Err(StoreError::Protocol("the overlay does not open".into())),
                Some(t) if (t.latest(), t.map().open_blocks().len()) != (upto, 0) => {
                    Err(StoreError::Mismatch(format!(
                        "the DR disk changed after the final pass (its overlay is at {})",
                        t.latest()
                    )))
                }
                Some(t) => {
                    let mut view = SimDr {
                        point: dr.point,
                        image: &dr.image,
                        not_in_newest: &dr.not_in_newest,
                        source: Source::Held(t),
                    };
                    failback::merge(&mut s, &mut view, point, now, retention).map(|(i, _)| {
                        let already = matches!(i, Ingested::AlreadyCommitted { .. });
                        (already, s.points().last().and_then(|p| p.image_digest))
                    })
                }
            },
        };
        self.fs.set_faults(SimFaults::default());
        let down = self.fs.is_down();
        self.fs.cancel_power_cut();
        if down {
            self.event(format!("receiver: power lost mid-commit ({result:?})"));
            self.dr_power_cut(dr);
            return Ok(Commit::None);
        }
        match result {
            Ok((already, digest)) if self.rng.chance(self.swarm.ack_lost) => {
                self.report.acks_lost += 1;
                self.event(format!(
                    "link: the commit's answer is lost (already: {already}, digest: {})",
                    digest.is_some()
                ));
                Ok(Commit::None)
            }
            Ok((already, digest)) => Ok(Commit::Committed { already, digest }),
            Err(StoreError::Mismatch(why)) => {
                self.event(format!("receiver: commit refused: {why}"));
                Ok(Commit::Mismatch)
            }
            Err(e) => {
                self.event(format!("receiver: commit failed: {e}"));
                Ok(Commit::None)
            }
        }
    }

    /// The agent's end of the cutover: its disk is the DR disk (the digests agree), its
    /// cursor names the new point, the fence goes, and the overlay with it.
    fn failed_back(
        &mut self,
        dr: &mut Dr,
        point: ChangeId,
        already: bool,
        digest: Option<ctk::digest::ImageDigest>,
    ) -> Outcome {
        if self.source != dr.image {
            return Err(self.violation(format!(
                "DIVERGED: failed back as {point}, but the original disk differs from the DR disk"
            )));
        }
        self.check_receiver()?;
        if let Some(d) = digest {
            let mut leaves = Leaves::zeroed(self.size, BS as u32).expect("small disk");
            leaves.set_data(0, &self.source).expect("whole image");
            if leaves.digest() != d {
                return Err(self.violation(format!(
                    "DIVERGED: the committed point {point}'s digest is not the disk's"
                )));
            }
        }
        self.last_acked = Some(point);
        self.committed_seen(point);
        self.advance_cursor(point)?;
        self.failback = None;
        self.failback_done = true;
        self.report.cutovers += 1;
        self.event(format!(
            "agent: failed back as {point} (already committed: {already})"
        ));
        self.check_receiver()
    }

    /// With every fault off, a failover in progress must fail back.
    pub(crate) fn finish_failback(&mut self) -> Outcome {
        for _ in 0..8 {
            let Some(mut dr) = self.dr.take() else {
                return Ok(());
            };
            self.cutover(&mut dr)?;
            if self.failback_done {
                self.failback_done = false;
            } else {
                self.dr = Some(dr);
            }
        }
        match self.dr {
            Some(_) => Err(self.violation("STUCK: with every fault off, failback did not finish")),
            None => Ok(()),
        }
    }
}
