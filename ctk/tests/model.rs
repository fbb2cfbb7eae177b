//! Model-based property test of the tracker against the simplest possible reference: one
//! "last written at" time per block.
//!
//! Random sequences of writes of any size and alignment, writes left in flight, cuts, cursor
//! registrations, advances and drops, resizes, clean reopens, crashes that drop or tear what
//! was not synced, and fsync failures. After every step, for every registered cursor and for
//! `Since::All`:
//! - every block written after the cursor's cut is reported (the invariant), and
//! - every reported block was written after it, or lies in a region whose intent was
//!   recovered after it (the bounded over-report).
//!
//! `PROPTEST_CASES` raises the number of cases (the default run does 256).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ctk::{
    ChangeId, CrashMode, Generation, Intend, MemStorage, OpenOutcome, Since, Tracker,
    TrackerConfig, WriteIntent,
};
use proptest::prelude::*;

const REGION: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Op {
    Write {
        at: u64,
        len: u64,
    },
    InFlight {
        at: u64,
        len: u64,
    },
    Settle,
    Cut,
    Register(u8),
    Advance(u8),
    Drop(u8),
    Resize(u64),
    CleanReopen,
    Crash(u8, u64),
    FailingWrite {
        at: u64,
        len: u64,
        crash: u8,
    },
    FailingCut {
        crash: u8,
    },
    /// A cut in two halves with writes between them (as the agent does: seal under the
    /// hold, release, sync): `end` 0 syncs and finishes, 1 crashes before the sync, 2 has
    /// the sync fail and then crashes.
    SplitCut {
        between: Vec<(u64, u64)>,
        end: u8,
        crash: u8,
    },
    /// Concurrent writers (as the agent's): every intent begun, then each synced, finished
    /// and recorded in order or in reverse; a crash after `crash_after` of them (none if it
    /// is past the end). A writer not finished at the crash never issued its data write.
    Overlapping {
        writes: Vec<(u64, u64)>,
        reverse: bool,
        crash_after: u8,
        mode: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![
        6 => 1u64..=12_288,
        2 => 1u64..=300_000,
        1 => 1u64..=3 * REGION,
    ];
    prop_oneof![
        30 => (any::<u64>(), len.clone()).prop_map(|(at, len)| Op::Write { at, len }),
        5 => (any::<u64>(), len.clone()).prop_map(|(at, len)| Op::InFlight { at, len }),
        5 => Just(Op::Settle),
        15 => Just(Op::Cut),
        5 => (0u8..3).prop_map(Op::Register),
        8 => (0u8..3).prop_map(Op::Advance),
        3 => (0u8..3).prop_map(Op::Drop),
        3 => (REGION / 2..12 * REGION).prop_map(Op::Resize),
        4 => Just(Op::CleanReopen),
        5 => (0u8..4, any::<u64>()).prop_map(|(m, s)| Op::Crash(m, s)),
        2 => (any::<u64>(), len.clone(), 0u8..4).prop_map(|(at, len, crash)| Op::FailingWrite { at, len, crash }),
        2 => (0u8..4).prop_map(|crash| Op::FailingCut { crash }),
        6 => (prop::collection::vec((any::<u64>(), len.clone()), 0..4), 0u8..3, 0u8..4)
            .prop_map(|(between, end, crash)| Op::SplitCut { between, end, crash }),
        6 => (prop::collection::vec((any::<u64>(), len), 1..5), any::<bool>(), 0u8..8, 0u8..4)
            .prop_map(|(writes, reverse, crash_after, mode)| Op::Overlapping {
                writes, reverse, crash_after, mode,
            }),
    ]
}

fn crash_mode(kind: u8, seed: u64) -> CrashMode {
    match kind {
        0 => CrashMode::DropUnsynced,
        1 => CrashMode::KeepPrefix((seed % 97) as usize),
        2 => CrashMode::Torn {
            keep: (seed % 50) as usize,
            garbage: (seed % 13) as usize + 1,
            seed,
        },
        _ => CrashMode::KeepAll,
    }
}

struct Harness {
    storage: MemStorage,
    config: TrackerConfig,
    tracker: Option<Tracker<MemStorage>>,
    generation: Generation,
    now: u64,
    /// Per block: the times of its writes, oldest first.
    writes: Vec<Vec<u64>>,
    /// Time of each cut the model knows of, by sequence number.
    cut_time: HashMap<u64, u64>,
    cursors: BTreeMap<String, ChangeId>,
    /// Blocks allowed as over-report, with the time of the recovery that reported them.
    recoveries: Vec<(u64, Vec<bool>)>,
    /// Regions intended since the last (re)open, and blocks that were in the open epoch
    /// without an intent (carried over a reopen, or grown by a resize): the bound on what a
    /// recovery may report.
    session_regions: BTreeSet<u64>,
    session_blocks: BTreeSet<u64>,
    pending: Vec<WriteIntent>,
    /// A cut that failed: its sequence number and time, in case it became durable anyway.
    failed_cut: Option<(u64, u64)>,
}

impl Harness {
    fn with_intents(disk_size: u64, block_size: u64, linger: u64, regions_max: usize) -> Harness {
        let storage = MemStorage::new();
        let mut config = TrackerConfig::new("model-disk", disk_size);
        config.block_size = block_size;
        config.existing_data = false;
        config.map.keep_recent = 2;
        // Small threshold so journal rewrites happen during the run.
        config.compact_after_bytes = 4096;
        // Small intent limits, so both ways of clearing happen often.
        config.intent_linger_cuts = linger;
        config.intent_regions_max = regions_max;
        let (tracker, outcome) =
            Tracker::open(storage.clone(), config.clone(), || Generation(0x5eed)).unwrap();
        assert_eq!(outcome, OpenOutcome::Created);
        let blocks = tracker.geometry().blocks() as usize;
        let mut cut_time = HashMap::new();
        cut_time.insert(0, 0);
        Harness {
            storage,
            config,
            generation: tracker.latest().generation,
            tracker: Some(tracker),
            now: 1,
            writes: vec![Vec::new(); blocks],
            cut_time,
            cursors: BTreeMap::new(),
            recoveries: Vec::new(),
            session_regions: BTreeSet::new(),
            session_blocks: BTreeSet::new(),
            pending: Vec::new(),
            failed_cut: None,
        }
    }

    fn t(&mut self) -> &mut Tracker<MemStorage> {
        self.tracker.as_mut().expect("tracker is open")
    }

    fn block_shift(&self) -> u32 {
        self.config.block_size.trailing_zeros()
    }

    fn range(&self, at: u64, len: u64) -> (u64, u64) {
        let size = self.config.disk_size;
        let offset = at % size;
        (offset, len.min(size - offset).max(1).min(size - offset))
    }

    fn mark_written(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.config.disk_size {
            return;
        }
        let end = (offset + len).min(self.config.disk_size);
        let shift = self.block_shift();
        for b in offset >> shift..=(end - 1) >> shift {
            self.writes[b as usize].push(self.now);
        }
    }

    fn note_regions(&mut self, offset: u64, len: u64) {
        if len > 0 {
            for r in offset / REGION..=(offset + len - 1) / REGION {
                self.session_regions.insert(r);
            }
        }
    }

    fn new_session(&mut self) {
        self.session_regions.clear();
        self.session_blocks = self.t().map().open_blocks().iter().map(u64::from).collect();
    }

    fn settle(&mut self) {
        for intent in std::mem::take(&mut self.pending) {
            let (o, l) = (intent.offset(), intent.length());
            self.t().record(intent);
            self.mark_written(o, l);
        }
    }

    fn reopen_after_crash(&mut self, mode: CrashMode) {
        // Writes in flight may have reached the disk.
        for intent in std::mem::take(&mut self.pending) {
            self.mark_written(intent.offset(), intent.length());
        }
        let known_latest = self.tracker.take().map(|t| t.latest().seq).unwrap_or(0);
        self.storage.crash(mode);
        self.storage.heal();
        let (tracker, outcome) = Tracker::open(self.storage.clone(), self.config.clone(), || {
            Generation(0xbad)
        })
        .unwrap();
        let OpenOutcome::Recovered {
            recovery_cut,
            recovered_blocks,
            ..
        } = outcome
        else {
            panic!("a crash must be recovered, not {outcome:?}");
        };
        assert_eq!(
            tracker.latest().generation,
            self.generation,
            "generation lost"
        );
        // The recovery reports at most the regions intended in the session that crashed.
        let shift = self.block_shift();
        let per_region = REGION >> shift;
        let mut allowed = vec![false; self.writes.len()];
        for &r in &self.session_regions {
            for b in r * per_region..(r + 1) * per_region {
                if let Some(slot) = allowed.get_mut(b as usize) {
                    *slot = true;
                }
            }
        }
        for &b in &self.session_blocks {
            if let Some(slot) = allowed.get_mut(b as usize) {
                *slot = true;
            }
        }
        let bound = allowed.iter().filter(|&&a| a).count() as u64;
        assert!(
            recovered_blocks <= bound,
            "recovered {recovered_blocks} > bound {bound}"
        );
        self.now += 1;
        for seq in known_latest + 1..=tracker.latest().seq {
            let time = match (recovery_cut, self.failed_cut) {
                (Some(rc), _) if rc.seq == seq => self.now,
                (_, Some((fs, ft))) if fs == seq => ft,
                _ => panic!("unexpected cut {seq} after reopen"),
            };
            self.cut_time.insert(seq, time);
        }
        if recovery_cut.is_some() {
            self.recoveries.push((self.now, allowed));
        }
        self.failed_cut = None;
        self.tracker = Some(tracker);
        self.new_session();
        self.now += 1;
    }

    /// One piece: one arm per operation of the model, each checking the real tracker against
    /// the model in the same step.
    fn apply(&mut self, op: &Op) {
        self.now += 1;
        match *op {
            Op::Overlapping {
                ref writes,
                reverse,
                crash_after,
                mode,
            } => {
                let mut begun = Vec::new();
                for &(at, len) in writes {
                    let (o, l) = self.range(at, len);
                    self.note_regions(o, l);
                    begun.push((o, l, self.t().begin_intend(o, l).unwrap()));
                }
                if reverse {
                    begun.reverse();
                }
                for (i, (o, l, begun)) in begun.into_iter().enumerate() {
                    if i == crash_after as usize {
                        self.reopen_after_crash(crash_mode(mode, o));
                        return;
                    }
                    let intent = match begun {
                        Intend::Ready(intent) => intent,
                        Intend::Sync(mut pending) => {
                            pending.sync();
                            self.t().finish_intend(pending).unwrap()
                        }
                    };
                    self.t().record(intent);
                    self.mark_written(o, l);
                }
            }
            Op::SplitCut {
                ref between,
                end,
                crash,
            } => {
                let mut pending = self.t().begin_cut().unwrap();
                let seq = pending.undurable_id().seq;
                let cut_at = self.now;
                // Writes after the seal belong to the next epoch.
                self.now += 1;
                for &(at, len) in between {
                    let (o, l) = self.range(at, len);
                    self.note_regions(o, l);
                    let intent = self.t().intend(o, l).unwrap();
                    self.t().record(intent);
                    self.mark_written(o, l);
                }
                match end {
                    0 => {
                        pending.sync();
                        let id = self.t().finish_cut(pending).unwrap();
                        assert_eq!(id.seq, seq);
                        self.cut_time.insert(id.seq, cut_at);
                    }
                    1 => {
                        // The seal may have become durable through a write's intent sync.
                        drop(pending);
                        self.failed_cut = Some((seq, cut_at));
                        self.reopen_after_crash(crash_mode(crash, seq));
                    }
                    _ => {
                        self.storage.fail_sync_after(0);
                        pending.sync();
                        assert!(self.t().finish_cut(pending).is_err());
                        self.failed_cut = Some((seq, cut_at));
                        self.reopen_after_crash(crash_mode(crash, seq));
                    }
                }
            }
            Op::Write { at, len } => {
                let (o, l) = self.range(at, len);
                self.note_regions(o, l);
                let intent = self.t().intend(o, l).unwrap();
                self.t().record(intent);
                self.mark_written(o, l);
            }
            Op::InFlight { at, len } => {
                let (o, l) = self.range(at, len);
                self.note_regions(o, l);
                let intent = self.t().intend(o, l).unwrap();
                self.pending.push(intent);
            }
            Op::Settle => self.settle(),
            Op::Cut => {
                let id = self.t().cut().unwrap();
                self.cut_time.insert(id.seq, self.now);
            }
            Op::Register(k) => {
                let name = format!("c{k}");
                let at = self.t().latest();
                if !self.cursors.contains_key(&name) {
                    self.t().register_cursor(&name, at).unwrap();
                    self.cursors.insert(name, at);
                }
            }
            Op::Advance(k) => {
                let name = format!("c{k}");
                let to = self.t().latest();
                if self.cursors.contains_key(&name) {
                    self.t().advance_cursor(&name, to).unwrap();
                    self.cursors.insert(name, to);
                }
            }
            Op::Drop(k) => {
                let name = format!("c{k}");
                if self.cursors.remove(&name).is_some() {
                    self.t().drop_cursor(&name).unwrap();
                }
            }
            Op::Resize(size) => {
                let old = self.config.disk_size;
                self.t().resize(size).unwrap();
                self.config.disk_size = size;
                let shift = self.block_shift();
                let blocks = size.div_ceil(1 << shift) as usize;
                self.writes.truncate(blocks);
                self.writes.resize(blocks, Vec::new());
                for (_, allowed) in &mut self.recoveries {
                    allowed.resize(blocks, false);
                }
                // New space reads as zeros, a partial last block changed its tail; a shrink
                // to a block boundary is reported by the new last block.
                let first = (old.min(size) >> shift) as usize;
                let first = if first >= blocks && size != old && blocks > 0 {
                    blocks - 1
                } else {
                    first
                };
                for b in first..blocks {
                    self.writes[b].push(self.now);
                    self.session_blocks.insert(b as u64);
                }
            }
            Op::CleanReopen => {
                self.settle();
                let tracker = self.tracker.take().unwrap();
                let before = tracker.map().state();
                tracker.close().unwrap();
                let (tracker, outcome) =
                    Tracker::open(self.storage.clone(), self.config.clone(), || Generation(1))
                        .unwrap();
                assert_eq!(outcome, OpenOutcome::Clean);
                assert_eq!(
                    tracker.map().state(),
                    before,
                    "clean reopen changed the map"
                );
                self.tracker = Some(tracker);
                self.new_session();
            }
            Op::Crash(kind, seed) => self.reopen_after_crash(crash_mode(kind, seed)),
            Op::FailingWrite { at, len, crash } => {
                let (o, l) = self.range(at, len);
                self.note_regions(o, l);
                self.storage.fail_sync_after(0);
                match self.t().intend(o, l) {
                    Ok(intent) => {
                        // No sync was needed: the write goes ahead.
                        self.storage.heal();
                        self.t().record(intent);
                        self.mark_written(o, l);
                    }
                    Err(_) => self.reopen_after_crash(crash_mode(crash, o)),
                }
            }
            Op::FailingCut { crash } => {
                self.storage.fail_sync_after(0);
                let seq = self.t().latest().seq + 1;
                assert!(self.t().cut().is_err());
                self.failed_cut = Some((seq, self.now));
                self.reopen_after_crash(crash_mode(crash, seq));
            }
        }
    }

    fn check(&mut self, step: usize) {
        let latest = self.t().latest();
        let upto = *self.cut_time.get(&latest.seq).unwrap_or_else(|| {
            panic!("step {step}: latest() names cut {latest}, never confirmed durable")
        });
        let queries: Vec<(String, Since, u64)> = self
            .cursors
            .iter()
            .map(|(n, id)| (n.clone(), Since::Id(*id), self.cut_time[&id.seq]))
            .chain(std::iter::once(("all".to_string(), Since::All, 0)))
            .collect();
        for (name, since, after) in queries {
            let reported = self
                .t()
                .changed_blocks(since, latest)
                .unwrap_or_else(|e| panic!("step {step}: query {name} failed: {e}"));
            let extra_ok = |b: usize| {
                self.recoveries
                    .iter()
                    .any(|(t, a)| *t > after && *t <= upto && a[b])
            };
            for (b, times) in self.writes.iter().enumerate() {
                // A block is owed if it was written in (after, upto]; writes still in the open
                // epoch belong to the next cut.
                let must = times.iter().any(|&w| w > after && w <= upto);
                let got = reported.contains(b as u32);
                assert!(
                    !must || got,
                    "step {step}: {name}: block {b} written at {times:?}, in ({after}, {upto}], is MISSING"
                );
                assert!(
                    !got || must || extra_ok(b),
                    "step {step}: {name}: block {b} written at {times:?} reported but not written in ({after}, {upto}]"
                );
            }
            assert!(
                reported
                    .max()
                    .is_none_or(|m| (m as usize) < self.writes.len()),
                "step {step}: {name}: a block past the end"
            );
        }
    }
}

fn run(disk_size: u64, block_size: u64, ops: &[Op]) {
    run_with(disk_size, block_size, 2, 2, ops)
}

fn run_with(disk_size: u64, block_size: u64, linger: u64, regions_max: usize, ops: &[Op]) {
    let mut h = Harness::with_intents(disk_size, block_size, linger, regions_max);
    for (step, op) in ops.iter().enumerate() {
        h.apply(op);
        h.check(step);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn tracker_never_misses_a_write(
        disk_size in REGION / 2..10 * REGION,
        block_size in prop_oneof![3 => Just(4096u64), 1 => Just(65536u64)],
        linger in 1u64..6,
        regions_max in 0usize..6,
        ops in prop::collection::vec(op(), 1..120),
    ) {
        run_with(disk_size, block_size, linger, regions_max, &ops);
    }
}

/// A write whose intent was taken three cuts before the crash and never recorded: its region
/// must not be cleared while the intent is outstanding, however idle it looks.
#[test]
fn regression_write_in_flight_across_a_cut_survives_a_crash() {
    run(
        3 * REGION,
        4096,
        &[
            Op::InFlight { at: 5, len: 4096 },
            Op::Cut,
            Op::Cut,
            Op::Cut,
            Op::Register(0),
            Op::Crash(0, 0),
        ],
    );
}

/// Found by this test (20,000 cases): a shrink dropped the intents of regions past the new
/// end while a write into them was in flight; the disk grew back, the late write landed in
/// the regrown range after the next cut, and a crash lost it.
#[test]
fn regression_shrink_keeps_intents_of_writes_in_flight() {
    run(
        524_288,
        4096,
        &[
            Op::Resize(3_149_712),
            Op::InFlight {
                at: 7_477_336_257_952_420,
                len: 2_161_101,
            },
            Op::Resize(524_288),
            Op::Resize(1_048_577),
            Op::Register(1),
            Op::Cut,
            Op::Register(0),
            Op::Crash(0, 0),
            Op::Write { at: 0, len: 1 },
        ],
    );
}

/// The two halves of a cut: until `finish_cut`, the new cut's ChangeId is nowhere to be seen
/// (`latest`, queries and cursors stay below it), and a crash before its sync loses nothing.
#[test]
fn a_split_cut_is_invisible_until_durable_and_a_crash_in_between_loses_nothing() {
    let storage = MemStorage::new();
    let mut config = TrackerConfig::new("split", 8 * REGION);
    config.existing_data = false;
    let (mut t, _) = Tracker::open(storage.clone(), config.clone(), || Generation(9)).unwrap();
    let w = t.intend(0, 4096).unwrap();
    t.record(w);
    let first = t.cut().unwrap();
    let w = t.intend(3 * REGION, 4096).unwrap();
    t.record(w);
    let pending = t.begin_cut().unwrap();
    let hidden = pending.undurable_id();
    assert_eq!(t.latest(), first, "an unsynced cut showed in latest()");
    assert!(t.changed(Since::Id(first), hidden).is_err());
    assert!(t.register_cursor("early", hidden).is_err());
    // The caller holding the cut may address it (an export's snapshot).
    let blocks = t
        .changed_blocks_unconfirmed(Since::Id(first), hidden)
        .unwrap();
    assert!(blocks.contains((3 * REGION / 4096) as u32));
    // A write after the seal, then a power loss before the seal's sync.
    let w = t.intend(5 * REGION, 4096).unwrap();
    t.record(w);
    drop(pending);
    drop(t);
    storage.crash(CrashMode::DropUnsynced);
    let (t, outcome) = Tracker::open(storage, config, || Generation(10)).unwrap();
    assert!(
        matches!(outcome, OpenOutcome::Recovered { .. }),
        "{outcome:?}"
    );
    let after = t.changed_blocks(Since::Id(first), t.latest()).unwrap();
    for at in [3 * REGION, 5 * REGION] {
        assert!(after.contains((at / 4096) as u32), "write at {at} lost");
    }
}
