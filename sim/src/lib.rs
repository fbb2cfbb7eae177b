//! Deterministic simulation of ctk, driven by one `u64` seed.
//!
//! One process, one thread. The agent side is the real `ctk::Tracker` over a `MemStorage`
//! journal (which forgets or tears what was not synced at a crash) protecting a simulated
//! disk held in memory; the receiver side is the real `ctk_receiver::store::DiskStore` over
//! a `ctk::vfs::SimFs` (which drops or tears unsynced writes and name operations at a power
//! cut, fails fsyncs, fills up, and returns flipped or misdirected bytes from reads). Between them a simulated link delivers each push's delta
//! and end frame, or cuts it, corrupts it, delivers an old one again, or loses the ack.
//!
//! The agent's push is the real one too: `ctk::push::Session`, the state machine that
//! decides what to ask (newest, answerable, resume, unchanged, digests), what to send and
//! when the cursor may move, is what `agent/src/replicate` drives over QUIC and its control
//! socket; here the same session is driven by the simulated tracker, store and link, and the
//! receiver's answer is `ctk_receiver::server::push_answer`, as the server sends it. What
//! stays outside: the QUIC transport, the agent's NBD front, and its snapshot and export
//! pipeline (a FIFO between two threads). `run_mutant` runs a seed with a deliberate mistake
//! in the session's order, which the checker must catch.
//!
//! The seed picks everything: the disk's size, the workload, and the fault rates
//! themselves (swarm testing: some seeds crash a lot, some never, some fill the disk). The
//! checker runs after every step against a reference model (the source image at every cut):
//! - every write since a point is in the tracker's answer for that point (never under-report);
//! - every point the receiver holds restores to exactly the source as of its cut, and
//!   `verify` passes;
//! - nothing acknowledged is lost: the newest acknowledged point stays until a newer one is
//!   committed;
//! - the agent's cursor never names a point the receiver never committed;
//! - a push that found nothing changed ("in sync") was right: the disk equals that point.
//!
//! A failure reports the seed and the last events; the same seed on the same commit replays
//! it exactly (`ctk-sim --seed N --trace`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;

use ctk::delta::{self, DeltaHeader, WriteOptions};
use ctk::digest::Leaves;
use ctk::push::{self, Action, Mutant, Outcome as PushOutcome, Plan};
use ctk::vfs::{SimFaults, SimFs, SimFsStats, Vfs};
use ctk::wire::Response;
use ctk::{
    ChangeId, CrashMode, Extent, Generation, Geometry, MemStorage, OpenOutcome, Since, Tracker,
    TrackerConfig, TrackerError,
};
use ctk_receiver::store::{DiskStore, Ingested, PointMeta};

const BS: u64 = 4096;
const DISK: &str = "simdisk";
const ROOT: &str = "/store";
const RESTORE_TO: &str = "/out/restore.img";

/// A small, fast, seedable generator (SplitMix64): the simulation must not depend on a
/// crate's generator changing between versions.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.below(1000) < per_mille as u64
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The fault rates and shape of one seed's run (swarm testing: each seed its own mix).
#[derive(Clone, Debug)]
pub struct Swarm {
    pub disk_blocks: u64,
    pub steps: u32,
    pub keep: usize,
    /// Age tiers on top of `keep` (`ctk-receiver serve --tiers`), if any: dropping points
    /// between kept ones folds their undo files.
    pub tiers: Option<&'static str>,
    /// Most simulated milliseconds a step takes.
    pub step_ms_max: u64,
    /// Per step, in 1/1000: a write (else a push).
    pub write_per_mille: u32,
    pub agent_crash: u32,
    pub journal_loss: u32,
    pub journal_sync_fail: u32,
    pub receiver_crash: u32,
    pub fs_sync_fail: u32,
    pub bad_read: u32,
    pub disk_full: bool,
    pub link_cut: u32,
    pub corrupt: u32,
    pub redeliver: u32,
    pub ack_lost: u32,
    pub forced_resync: u32,
    /// Per step, in 1/1000: the disk is grown or shrunk (to any byte size).
    pub resize: u32,
}

impl Swarm {
    pub fn from_seed(rng: &mut Rng) -> Swarm {
        // Each fault is off for about a third of the seeds and otherwise at a rate of its
        // own, so some runs are calm and some are storms of one kind.
        let mut rate = |max: u64| -> u32 {
            if rng.below(3) == 0 {
                0
            } else {
                rng.below(max + 1) as u32
            }
        };
        let agent_crash = rate(150);
        let journal_loss = rate(20);
        let journal_sync_fail = rate(30);
        let receiver_crash = rate(300);
        let fs_sync_fail = rate(40);
        let bad_read = rate(10);
        let link_cut = rate(250);
        let corrupt = rate(100);
        let redeliver = rate(150);
        let ack_lost = rate(150);
        let forced_resync = rate(60);
        let resize = rate(40);
        Swarm {
            disk_blocks: 8 + rng.below(57),
            steps: 20 + rng.below(60) as u32,
            keep: 1 + rng.below(5) as usize,
            tiers: match rng.below(4) {
                0 => None,
                1 => Some("10m:all,2h:10m,1d:1h"),
                2 => Some("1m:all,1h:5m"),
                _ => Some("30s:all,10m:1m,1h:10m,1d:1h"),
            },
            step_ms_max: [1_000, 60_000, 900_000][rng.below(3) as usize],
            write_per_mille: 400 + rng.below(450) as u32,
            agent_crash,
            journal_loss,
            journal_sync_fail,
            receiver_crash,
            fs_sync_fail,
            bad_read,
            disk_full: rng.below(8) == 0,
            link_cut,
            corrupt,
            redeliver,
            ack_lost,
            forced_resync,
            resize,
        }
    }
}

/// What one seed's run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    pub writes: u64,
    pub pushes: u64,
    pub commits: u64,
    pub already_committed: u64,
    pub refused: u64,
    pub fulls: u64,
    pub resyncs: u64,
    pub resumes: u64,
    pub resizes: u64,
    /// Points retention dropped (between kept ones: folded).
    pub points_dropped: u64,
    pub agent_crashes: u64,
    pub journal_losses: u64,
    pub journal_sync_failures: u64,
    pub receiver_crashes: u64,
    pub links_cut: u64,
    pub corrupted: u64,
    pub redelivered: u64,
    pub acks_lost: u64,
    pub points_checked: u64,
    pub fs: SimFsStats,
}

impl Report {
    /// Adds another run's counts into this one (for totals over many seeds).
    pub fn add(&mut self, o: &Report) {
        self.steps += o.steps;
        self.writes += o.writes;
        self.pushes += o.pushes;
        self.commits += o.commits;
        self.already_committed += o.already_committed;
        self.refused += o.refused;
        self.fulls += o.fulls;
        self.resyncs += o.resyncs;
        self.resumes += o.resumes;
        self.resizes += o.resizes;
        self.points_dropped += o.points_dropped;
        self.agent_crashes += o.agent_crashes;
        self.journal_losses += o.journal_losses;
        self.journal_sync_failures += o.journal_sync_failures;
        self.receiver_crashes += o.receiver_crashes;
        self.links_cut += o.links_cut;
        self.corrupted += o.corrupted;
        self.redelivered += o.redelivered;
        self.acks_lost += o.acks_lost;
        self.points_checked += o.points_checked;
        let (a, b) = (&mut self.fs, &o.fs);
        a.crashes += b.crashes;
        a.bad_reads += b.bad_reads;
        a.syncs_failed += b.syncs_failed;
        a.enospc += b.enospc;
        a.writes_kept += b.writes_kept;
        a.writes_dropped += b.writes_dropped;
        a.writes_torn += b.writes_torn;
        a.names_kept += b.names_kept;
        a.names_lost += b.names_lost;
    }
}

/// A broken invariant: the seed, the step, what, and the events that led there.
#[derive(Clone, Debug)]
pub struct Violation {
    pub seed: u64,
    pub step: u32,
    pub what: String,
    pub trace: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} step {}: {}\n  replay: ctk-sim --seed {} --trace\n  last events:",
            self.seed, self.step, self.what, self.seed
        )?;
        let skip = self.trace.len().saturating_sub(40);
        for e in &self.trace[skip..] {
            writeln!(f, "    {e}")?;
        }
        Ok(())
    }
}

/// The delta and end frame of one push, as the link carries them.
#[derive(Clone)]
struct Push {
    bytes: Vec<u8>,
    meta: PointMeta,
    /// `Some((resumes, next_offset))` for a resumed push.
    resume: Option<(String, u64)>,
}

/// The link's view of a push: the bytes up to an optional cut, then a reset.
struct LinkReader {
    bytes: Vec<u8>,
    pos: usize,
    cut_at: Option<usize>,
}

impl Read for LinkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let end = self.cut_at.unwrap_or(self.bytes.len());
        if self.pos >= end {
            if self.cut_at.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "simulated link cut",
                ));
            }
            return Ok(0);
        }
        // Short reads, as a network gives them.
        let n = buf
            .len()
            .min(end - self.pos)
            .min(1 + (self.pos * 7919) % 3000);
        buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

struct Sim {
    seed: u64,
    step: u32,
    rng: Rng,
    swarm: Swarm,
    report: Report,
    trace: Vec<String>,
    // Agent.
    size: u64,
    source: Vec<u8>,
    journal: MemStorage,
    tracker: Option<Tracker<MemStorage>>,
    config: TrackerConfig,
    /// The source as of every cut the agent made (the reference model).
    cuts: BTreeMap<String, Vec<u8>>,
    cursor: Option<ChangeId>,
    last_push: Option<Push>,
    /// The simulated clock (ms): stamps cuts, and the store reads it for retention by age.
    clock: Arc<std::sync::atomic::AtomicU64>,
    // Receiver.
    fs: SimFs,
    /// Every point the receiver was seen to hold, in commit order.
    committed: Vec<String>,
    committed_set: BTreeSet<String>,
    /// The newest point the receiver acknowledged to the agent.
    last_acked: Option<String>,
    /// A deliberate mistake in the agent's push order (the mutant tests), if any.
    mutant: Option<Mutant>,
}

type Outcome = Result<(), Violation>;

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng::new(seed);
        let swarm = Swarm::from_seed(&mut rng);
        let size = swarm.disk_blocks * BS;
        let mut config = TrackerConfig::new(DISK, size);
        config.block_size = BS;
        // Small limits so compaction, intent clearing and journal rewrites happen in a short
        // run, not only in long ones.
        config.intent_linger_cuts = 1 + rng.below(4);
        config.intent_regions_max = 1 + rng.below(2) as usize;
        config.compact_after_bytes = 2048 + rng.below(8192);
        let fs = SimFs::new(rng.next_u64(), SimFaults::default());
        fs.create_dir_all(Path::new("/out")).expect("a fresh SimFs");
        Sim {
            seed,
            step: 0,
            rng,
            swarm,
            report: Report {
                seed,
                ..Report::default()
            },
            trace: Vec::new(),
            size,
            source: vec![0; size as usize],
            journal: MemStorage::new(),
            tracker: None,
            config,
            cuts: BTreeMap::new(),
            cursor: None,
            last_push: None,
            clock: Arc::new(std::sync::atomic::AtomicU64::new(1_700_000_000_000)),
            fs,
            committed: Vec::new(),
            committed_set: BTreeSet::new(),
            last_acked: None,
            mutant: None,
        }
    }

    fn event(&mut self, what: String) {
        for op in self.fs.take_log() {
            self.trace.push(format!("[{}]   {op}", self.step));
        }
        self.trace.push(format!("[{}] {what}", self.step));
    }

    fn violation(&self, what: impl Into<String>) -> Violation {
        Violation {
            seed: self.seed,
            step: self.step,
            what: what.into(),
            trace: self.trace.clone(),
        }
    }

    // ----- agent -----

    fn tracker(&mut self) -> Result<&mut Tracker<MemStorage>, Violation> {
        if self.tracker.is_none() {
            let mut gen_rng = Rng::new(self.rng.next_u64());
            let opened = Tracker::open(self.journal.clone(), self.config.clone(), || {
                Generation(((gen_rng.next_u64() as u128) << 64) | gen_rng.next_u64() as u128)
            });
            let (t, outcome) = match opened {
                Ok(o) => o,
                // An I/O failure while opening (a rewrite's sync failing, say): the agent
                // fails to start, and its supervisor starts it again.
                Err(TrackerError::Io { .. }) if self.journal_faulty() => {
                    self.report.journal_sync_failures += 1;
                    self.crash_agent("the journal failed while opening");
                    return self.tracker();
                }
                Err(e) => return Err(self.violation(format!("the journal does not open: {e}"))),
            };
            let what = match &outcome {
                OpenOutcome::Created => "created".to_string(),
                OpenOutcome::Clean => "clean".to_string(),
                OpenOutcome::Recovered {
                    recovered_blocks, ..
                } => format!("recovered ({recovered_blocks} blocks over-reported)"),
                OpenOutcome::NewGeneration { reason } => format!("new generation: {reason}"),
            };
            // A cursor from before a new generation means nothing to it.
            if self
                .cursor
                .is_some_and(|c| c.generation != t.latest().generation)
            {
                self.cursor = None;
            }
            self.event(format!(
                "agent: journal opened, {what}, latest {}",
                t.latest()
            ));
            self.tracker = Some(t);
        }
        Ok(self.tracker.as_mut().expect("opened above"))
    }

    /// Whether the journal's media was set to fail (then the failure is the fault's, and is
    /// cleared by the restart).
    fn journal_faulty(&self) -> bool {
        self.swarm.journal_sync_fail > 0
    }

    /// The agent process dies: the journal's unsynced bytes go as the seed says (the
    /// source disk keeps every write that completed, as a disk does when only a process
    /// dies; the journal is treated as if the machine lost power, the harder case).
    fn crash_agent(&mut self, why: &str) {
        self.tracker = None;
        let mode = match self.rng.below(4) {
            0 => CrashMode::DropUnsynced,
            1 => CrashMode::KeepPrefix(self.rng.below(64) as usize),
            2 => CrashMode::Torn {
                keep: self.rng.below(32) as usize,
                garbage: 1 + self.rng.below(32) as usize,
                seed: self.rng.next_u64(),
            },
            _ => CrashMode::KeepAll,
        };
        self.journal.crash(mode);
        self.journal.heal();
        self.report.agent_crashes += 1;
        self.event(format!("agent: crashed ({why}), journal {mode:?}"));
    }

    fn write(&mut self) -> Outcome {
        let offset = self.rng.below(self.size);
        let max = (self.size - offset).min(3 * BS);
        let length = 1 + self.rng.below(max);
        let mut data = vec![0u8; length as usize];
        match self.rng.below(4) {
            0 => {} // zeros (a discard, or a zeroed region)
            1 => data.fill((self.step % 251) as u8 + 1),
            _ => self.rng.fill(&mut data),
        }
        let crash_mid = self.rng.chance(self.swarm.agent_crash / 4);
        let intent = match self.tracker()?.intend(offset, length) {
            Ok(i) => i,
            Err(e) => {
                self.report.journal_sync_failures += 1;
                self.crash_agent(&format!("intent failed: {e}"));
                // The write was never issued: nothing to track.
                return Ok(());
            }
        };
        if crash_mid {
            // Killed between the intent and the record: the data may or may not have
            // landed. If it did, the recovered journal must report it.
            let landed = self.rng.below(2) == 0;
            if landed {
                self.source[offset as usize..(offset + length) as usize].copy_from_slice(&data);
            }
            drop(intent);
            self.crash_agent(&format!(
                "mid-write at {offset}+{length}, data landed: {landed}"
            ));
            return Ok(());
        }
        self.source[offset as usize..(offset + length) as usize].copy_from_slice(&data);
        self.tracker()?.record(intent);
        self.report.writes += 1;
        Ok(())
    }

    /// The disk is grown or shrunk, to a size that need not be a whole number of blocks.
    /// The tracker records it first (so a crash in between over-reports), as the agent does.
    fn resize(&mut self) -> Outcome {
        let blocks = 4 + self.rng.below(61);
        let tail = if self.rng.below(2) == 0 {
            0
        } else {
            1 + self.rng.below(BS - 1)
        };
        let size = blocks * BS - tail;
        match self.tracker()?.resize(size) {
            Ok(()) => {}
            Err(e @ (TrackerError::Io { .. } | TrackerError::Poisoned(_))) => {
                self.report.journal_sync_failures += 1;
                self.crash_agent(&format!("resize failed: {e}"));
                return Ok(());
            }
            Err(e) => return Err(self.violation(format!("resize to {size} refused: {e}"))),
        }
        self.event(format!("agent: disk resized {} -> {size}", self.size));
        self.source.resize(size as usize, 0);
        self.size = size;
        self.config.disk_size = size;
        self.report.resizes += 1;
        Ok(())
    }

    // ----- receiver -----

    fn now(&self) -> u64 {
        self.clock.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn retention(&self) -> ctk_receiver::retention::Retention {
        ctk_receiver::retention::Retention {
            keep: self.swarm.keep,
            tiers: self.swarm.tiers.map_or_else(Vec::new, |t| {
                ctk_receiver::retention::parse_tiers(t).expect("the simulation's tiers parse")
            }),
        }
    }

    fn open_store(&mut self) -> Result<DiskStore, ctk_receiver::store::StoreError> {
        let fs: Arc<dyn Vfs> = Arc::new(self.fs.clone());
        let clock = self.clock.clone();
        DiskStore::open_in(fs, Path::new(ROOT), DISK, false).map(|(mut s, recovery)| {
            s.set_clock(Arc::new(move || {
                clock.load(std::sync::atomic::Ordering::Relaxed)
            }));
            if recovery != ctk_receiver::store::Recovery::Clean {
                self.event(format!("receiver: opened after a crash: {recovery:?}"));
            }
            s
        })
    }

    /// A power cut on the receiver: the filesystem loses what was not synced.
    fn power_cut(&mut self) {
        self.fs.crash();
        self.report.receiver_crashes += 1;
        self.event("receiver: power cut applied".into());
    }

    fn faults(&mut self) -> SimFaults {
        SimFaults {
            sync_fail_per_mille: self.swarm.fs_sync_fail,
            bad_read_per_mille: self.swarm.bad_read,
            capacity: if self.swarm.disk_full && self.rng.below(2) == 0 {
                // Room for roughly the image and a little more: some pushes will not fit.
                Some(self.size + self.rng.below(3 * self.size))
            } else {
                None
            },
        }
    }

    /// Delivers one push to the receiver through the faulty link and filesystem; returns
    /// the receiver's answer (`ctk_receiver::server::push_answer`), none when the power went.
    fn deliver(&mut self, push: &Push, may_fault: bool) -> Result<Option<Response>, Violation> {
        let mut bytes = push.bytes.clone();
        let mut meta = push.meta.clone();
        let mut cut_at = None;
        if may_fault && self.rng.chance(self.swarm.link_cut) {
            cut_at = Some(self.rng.below(bytes.len() as u64 + 1) as usize);
            self.report.links_cut += 1;
        }
        if may_fault && self.rng.chance(self.swarm.corrupt) {
            self.report.corrupted += 1;
            if self.rng.below(4) == 0 {
                meta.image_digest = Some(format!("{:064x}", self.rng.next_u64()));
                self.event("link: the end frame's digest is corrupted".into());
            } else {
                let at = self.rng.below(bytes.len() as u64) as usize;
                bytes[at] ^= 1 << self.rng.below(8);
                self.event(format!("link: byte {at} of {} flipped", bytes.len()));
            }
        }
        let power_cut = may_fault && self.rng.chance(self.swarm.receiver_crash);
        if power_cut {
            // Anywhere from opening the store to the last rename of the commit.
            let ops = self.rng.below(400);
            self.fs.power_cut_after(ops);
        }
        let faults = if may_fault {
            self.faults()
        } else {
            SimFaults::default()
        };
        self.fs.set_faults(faults);
        let result = match self.open_store() {
            Ok(mut store) => {
                let input = LinkReader {
                    bytes,
                    pos: 0,
                    cut_at,
                };
                let end = move |_rest: LinkReader| Ok(meta);
                let retention = self.retention();
                let r = match &push.resume {
                    Some((resumes, next)) => {
                        store.ingest_resume(input, resumes, *next, retention, end)
                    }
                    None => store.ingest(input, retention, end),
                };
                drop(store);
                r
            }
            Err(e) => Err(e),
        };
        self.fs.set_faults(SimFaults::default());
        let down = self.fs.is_down();
        self.fs.cancel_power_cut();
        if down {
            self.event(format!("receiver: power lost mid-push ({result:?})"));
            self.power_cut();
            return Ok(None);
        }
        match &result {
            Ok(Ingested::Committed { point, dropped }) => {
                self.report.commits += 1;
                self.report.points_dropped += *dropped as u64;
                self.event(format!(
                    "receiver: committed {} (dropped {dropped})",
                    point.change_id
                ));
            }
            Ok(Ingested::AlreadyCommitted { change_id }) => {
                self.report.already_committed += 1;
                self.event(format!("receiver: {change_id} was committed already"));
            }
            Err(e) => {
                self.report.refused += 1;
                self.event(format!("receiver: refused: {e}"));
            }
        }
        Ok(Some(ctk_receiver::server::push_answer(result)))
    }

    /// The receiver's points (a store that does not open is a violation).
    fn receiver_points(&mut self) -> Result<Vec<ctk_receiver::store::Point>, Violation> {
        match self.open_store() {
            Ok(store) => Ok(store.points().to_vec()),
            Err(e) => Err(self.violation(format!("the store does not open: {e}"))),
        }
    }

    // ----- the push -----

    fn push(&mut self) -> Outcome {
        // Half the pushes are of crash cuts, which make no point when nothing changed.
        let may_skip = self.rng.below(2) == 0;
        self.push_with(may_skip)
    }

    /// One push as the agent makes it: the real `ctk::push::Session` decides what to ask,
    /// what to send and when the cursor moves; this driver answers its questions from the
    /// simulated tracker, store and link.
    fn push_with(&mut self, may_skip: bool) -> Outcome {
        self.report.pushes += 1;
        // Sometimes an old push arrives again first (a retry racing a reconnect, a stale
        // stream): it must be acknowledged as already committed or refused, never merged
        // over newer points.
        if self.rng.chance(self.swarm.redeliver)
            && let Some(old) = self.last_push.clone()
        {
            self.report.redelivered += 1;
            self.event("link: an earlier push delivered again".into());
            self.deliver(&old, true)?;
            self.check_receiver()?;
        }
        let forced = self.rng.chance(self.swarm.forced_resync);
        let mut s = push::Session::new(self.size, true, forced, may_skip);
        if let Some(m) = self.mutant {
            s = s.with_mutant(m);
        }
        // The receiver's hashes of a resync: (unit, replica size, hashes).
        let mut digests: Option<(u32, u64, Vec<u8>)> = None;
        loop {
            for note in s.take_notes() {
                self.event(format!("agent: {note:?}"));
            }
            match s.poll() {
                Action::AskNewest => {
                    let points = self.receiver_points()?;
                    let newest = points
                        .last()
                        .map(|p| p.change_id.parse().expect("a point id"));
                    s.handle_newest(newest);
                }
                Action::AskAnswerable(since) => {
                    let t = self.tracker()?;
                    let latest = t.latest();
                    let answer = match t.changed(Since::Id(since), latest) {
                        Ok(_) => Ok(()),
                        Err(TrackerError::Query(q)) => Err(q.to_string()),
                        Err(e) => {
                            return Err(self.violation(format!("changed({since}) failed: {e}")));
                        }
                    };
                    s.handle_answerable(answer);
                }
                Action::AskResume => {
                    let offered = self
                        .open_store()
                        .ok()
                        .and_then(|store| store.partial())
                        .map(|p| p.state());
                    s.handle_resume(offered);
                }
                Action::AskUnchanged(since) => {
                    let t = self.tracker()?;
                    let unchanged = t
                        .changed_blocks_unconfirmed(Since::Id(since), t.map().latest())
                        .is_ok_and(|b| b.is_empty() && t.map().open_blocks().is_empty());
                    s.handle_unchanged(unchanged);
                }
                Action::FetchDigests(_) => {
                    self.report.resyncs += 1;
                    let unit = (BS as u32) << self.rng.below(3);
                    match self
                        .open_store()
                        .ok()
                        .and_then(|store| store.unit_digests(unit).ok())
                    {
                        Some((of, size, hashes)) => {
                            digests = Some((unit, size, hashes));
                            s.handle_digests(Ok(of.parse().expect("a point id")));
                        }
                        None => s.handle_digests(Err("resync digests unavailable".into())),
                    }
                }
                Action::Push(plan) => {
                    let Some((push, to)) = self.export(&plan, s.newest(), digests.as_ref())? else {
                        // The agent crashed taking the cut: this push is over.
                        return Ok(());
                    };
                    let answer = self.deliver(&push, true)?;
                    self.last_push = Some(push);
                    match answer {
                        Some(_) if self.rng.chance(self.swarm.ack_lost) => {
                            self.report.acks_lost += 1;
                            self.event(format!("link: the answer to the push of {to} is lost"));
                            s.handle_push_lost("the answer was lost".into(), false, Some(to));
                        }
                        Some(answer) => s.handle_pushed(to, &answer),
                        None => s.handle_push_lost("no answer".into(), false, Some(to)),
                    }
                    self.check_receiver()?;
                }
                Action::MoveCursor(point) => {
                    let id = point.to_string();
                    self.last_acked = Some(id.clone());
                    self.committed_seen(&id);
                    self.advance_cursor(&id)?;
                    s.handle_cursor_moved();
                }
                Action::Done(outcome) => {
                    if let PushOutcome::InSync { point } = &outcome
                        && self.cuts.get(&point.to_string()) != Some(&self.source)
                    {
                        return Err(self.violation(format!(
                            "MISSED WRITE: the agent said nothing changed since {point}, but \
                             the disk differs from it"
                        )));
                    }
                    self.event(format!("agent: push done: {outcome:?}"));
                    return self.check_receiver();
                }
            }
        }
    }

    /// Cuts, and exports what `plan` says on top of the receiver's newest point `newest`:
    /// the push's bytes and cut, or `None` when the agent crashed taking the cut.
    fn export(
        &mut self,
        plan: &Plan,
        newest: Option<ChangeId>,
        digests: Option<&(u32, u64, Vec<u8>)>,
    ) -> Result<Option<(Push, ChangeId)>, Violation> {
        let to = match self.tracker()?.cut() {
            Ok(id) => id,
            Err(e) => {
                self.report.journal_sync_failures += 1;
                self.crash_agent(&format!("cut failed: {e}"));
                return Ok(None);
            }
        };
        self.cuts.insert(to.to_string(), self.source.clone());
        let image = self.source.clone();
        let read = |offset: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&image[offset as usize..offset as usize + buf.len()]);
            Ok(())
        };
        let geometry = Geometry::new(self.size, BS).expect("a simulated disk's geometry");
        let header = DeltaHeader {
            disk_id: DISK.into(),
            disk_size: self.size,
            block_size: BS as u32,
            // A resumed push starts where the cut-off one did: the same point.
            from: newest,
            to,
        };
        let options = WriteOptions {
            zstd_level: if self.rng.below(2) == 0 {
                Some(1)
            } else {
                None
            },
        };
        let mut resume = None;
        let exported = match plan {
            Plan::Compare { .. } => {
                let (unit, size, hashes) = digests.expect("a compare follows its digests");
                // A replica of another size has no hash the agent can use: the full copy.
                let theirs: &[u8] = if *size == self.size { hashes } else { &[] };
                let r = push::compare_export(
                    read,
                    self.size,
                    *unit,
                    theirs,
                    &header,
                    options,
                    Vec::new(),
                );
                if let Ok((_, _, differing)) = &r {
                    self.event(format!(
                        "agent: resync by digests, {differing} bytes differ"
                    ));
                }
                r.map(|(w, summary, _)| (w, summary))
            }
            Plan::Since(since) | Plan::Resume { since, .. } => {
                let Some(extents) = self.changed(*since, to)? else {
                    // Answerable a moment ago, not now (a crash in between): a full.
                    self.report.fulls += 1;
                    let whole = [Extent::new(0, self.size)];
                    let (w, _) = delta::export_with(read, whole, &header, options, Vec::new())
                        .map_err(|e| self.violation(format!("export failed: {e}")))?;
                    return Ok(Some((self.pushed(w, None), to)));
                };
                match newest {
                    Some(from) => self.check_reported(&from, to, &extents)?,
                    None => self.report.fulls += 1,
                }
                let mut extents = extents;
                if let Plan::Resume {
                    prior, next_offset, ..
                } = plan
                {
                    let t = self.tracker()?;
                    let all = t.changed_blocks(*since, to);
                    let later = t.changed_blocks(Since::Id(*prior), to);
                    match (all, later) {
                        (Ok(all), Ok(later)) => {
                            let send = push::resume_blocks(&all, &later, *next_offset, &geometry).0;
                            extents = ctk::map::blocks_to_extents(&send, &geometry);
                            resume = Some((prior.to_string(), *next_offset));
                            self.report.resumes += 1;
                        }
                        _ => self.event("agent: the resumed cut is no longer answerable".into()),
                    }
                }
                self.event(format!("agent: {} extents to send", extents.len()));
                delta::export_with(read, &extents, &header, options, Vec::new())
            }
        };
        let (bytes, _) = exported.map_err(|e| self.violation(format!("export failed: {e}")))?;
        self.event(format!(
            "agent: push {:?} -> {to}, {} bytes",
            newest.map(|f| f.to_string()),
            bytes.len()
        ));
        Ok(Some((self.pushed(bytes, resume), to)))
    }

    /// A push of `bytes` with the end frame the agent sends: the cut's time, its
    /// consistency, and the digest of the whole image as of the cut.
    fn pushed(&self, bytes: Vec<u8>, resume: Option<(String, u64)>) -> Push {
        let mut leaves = Leaves::zeroed(self.size, BS as u32).expect("small disk");
        leaves.set_data(0, &self.source).expect("whole image");
        Push {
            bytes,
            meta: PointMeta {
                cut_unix_ms: Some(self.now()),
                consistency: Some("crash".into()),
                image_digest: Some(leaves.digest().to_string()),
            },
            resume,
        }
    }

    /// The tracker's answer for `since` up to `upto`, or `None` if it cannot give one (the
    /// agent then compares digests).
    fn changed(&mut self, since: Since, upto: ChangeId) -> Result<Option<Vec<Extent>>, Violation> {
        match self.tracker()?.changed(since, upto) {
            Ok(e) => Ok(Some(e)),
            Err(TrackerError::Query(q)) => {
                self.event(format!("agent: cannot answer since {since:?}: {q}"));
                Ok(None)
            }
            Err(e) => Err(self.violation(format!("changed({since:?}) failed: {e}"))),
        }
    }

    fn advance_cursor(&mut self, id: &str) -> Outcome {
        let Ok(at) = id.parse::<ChangeId>() else {
            return Ok(());
        };
        let registered = self.cursor.is_some();
        let t = self.tracker()?;
        if at.generation != t.latest().generation {
            return Ok(());
        }
        let r = if registered {
            t.advance_cursor("replica", at)
        } else {
            t.register_cursor("replica", at)
        };
        match r {
            Ok(()) => self.cursor = Some(at),
            Err(TrackerError::Io { .. }) | Err(TrackerError::Poisoned(_)) => {
                self.report.journal_sync_failures += 1;
                self.crash_agent("cursor write failed");
            }
            Err(e) => self.event(format!("agent: cursor not moved: {e}")),
        }
        Ok(())
    }

    fn committed_seen(&mut self, id: &str) {
        if self.committed_set.insert(id.to_string()) {
            self.committed.push(id.to_string());
        }
    }

    // ----- the checker -----

    /// Every block that differs between the point `from` and the cut `to` is in the
    /// tracker's answer.
    fn check_reported(&self, from: &ChangeId, to: ChangeId, extents: &[Extent]) -> Outcome {
        let (Some(before), Some(after)) = (
            self.cuts.get(&from.to_string()),
            self.cuts.get(&to.to_string()),
        ) else {
            return Err(self.violation(format!("no reference image of {from} or {to}")));
        };
        // Blocks of the cut's size; bytes past a smaller image's end are zeros (a grow).
        let block = |image: &[u8], b: u64| -> Vec<u8> {
            let mut v = vec![0u8; BS as usize];
            let start = ((b * BS) as usize).min(image.len());
            let end = (((b + 1) * BS) as usize).min(image.len());
            v[..end - start].copy_from_slice(&image[start..end]);
            v
        };
        for b in 0..(after.len() as u64).div_ceil(BS) {
            if block(before, b) != block(after, b) {
                let end = ((b + 1) * BS).min(after.len() as u64);
                let covered = extents.iter().any(|e| e.offset <= b * BS && e.end() >= end);
                if !covered {
                    return Err(self.violation(format!(
                        "MISSED WRITE: block {b} changed between {from} and {to} but changed_since does not report it"
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_receiver(&mut self) -> Outcome {
        let store = self
            .open_store()
            .map_err(|e| self.violation(format!("the store does not open: {e}")))?;
        let points = store.points().to_vec();
        for p in &points {
            self.committed_seen(&p.change_id);
        }
        // Nothing acknowledged is lost: the newest acknowledged point is kept until a newer
        // point is committed (then retention may drop it).
        if let Some(acked) = &self.last_acked
            && !points.iter().any(|p| &p.change_id == acked)
        {
            let pos = |id: &str| self.committed.iter().position(|c| c == id);
            let newest = points.last().and_then(|p| pos(&p.change_id));
            if newest.is_none_or(|n| Some(n) <= pos(acked)) {
                return Err(self.violation(format!(
                    "LOST: acknowledged point {acked} is gone; the store holds {:?}",
                    points.iter().map(|p| &p.change_id).collect::<Vec<_>>()
                )));
            }
        }
        if let Some(c) = &self.cursor
            && !self.committed_set.contains(&c.to_string())
        {
            return Err(self.violation(format!(
                "the agent's cursor {c} names a point the receiver never committed"
            )));
        }
        for p in &points {
            let Some(expected) = self.cuts.get(&p.change_id) else {
                return Err(self.violation(format!("point {} was never cut", p.change_id)));
            };
            if let Err(e) = store.restore(&p.change_id, Path::new(RESTORE_TO), |_, _| {}) {
                return Err(self.violation(format!(
                    "DIVERGED: point {} does not restore: {e}",
                    p.change_id
                )));
            }
            let got = self.fs.read_file(Path::new(RESTORE_TO)).unwrap_or_default();
            if &got != expected {
                let first = got.iter().zip(expected.iter()).position(|(a, b)| a != b);
                return Err(self.violation(format!(
                    "DIVERGED: point {} restores to a different image (first difference at {first:?}, lengths {} and {})",
                    p.change_id,
                    got.len(),
                    expected.len()
                )));
            }
            self.report.points_checked += 1;
        }
        let _ = self.fs.remove_file(Path::new(RESTORE_TO));
        if let Err(e) = store.verify() {
            return Err(self.violation(format!("verify fails: {e}")));
        }
        Ok(())
    }

    fn run(&mut self) -> Outcome {
        for step in 0..self.swarm.steps {
            self.step = step;
            let dt = 1 + self.rng.below(self.swarm.step_ms_max);
            self.clock
                .fetch_add(dt, std::sync::atomic::Ordering::Relaxed);
            self.report.steps += 1;
            if self.rng.chance(self.swarm.journal_loss) {
                // The journal is lost (deleted, or the disk moved to a host without it):
                // a new generation, and the next push must resync by digests.
                self.tracker = None;
                self.journal.set_contents(None);
                self.report.journal_losses += 1;
                self.event("agent: journal lost".into());
            }
            if self.rng.chance(self.swarm.journal_sync_fail) {
                let n = self.rng.below(3);
                self.journal.fail_sync_after(n);
            }
            if self.rng.chance(self.swarm.agent_crash) {
                self.crash_agent("between operations");
            }
            if self.rng.chance(self.swarm.resize) {
                self.resize()?;
            } else if self.rng.chance(self.swarm.write_per_mille) {
                self.write()?;
            } else {
                self.push()?;
            }
        }
        // Calm at the end: no faults, one last push, and it must commit and restore.
        self.journal.heal();
        self.swarm = Swarm {
            agent_crash: 0,
            journal_loss: 0,
            journal_sync_fail: 0,
            receiver_crash: 0,
            fs_sync_fail: 0,
            bad_read: 0,
            disk_full: false,
            link_cut: 0,
            corrupt: 0,
            redeliver: 0,
            ack_lost: 0,
            forced_resync: 0,
            resize: 0,
            ..self.swarm.clone()
        };
        self.step += 1;
        let before = self.report.commits + self.report.already_committed;
        // A push of a crash cut may skip an unchanged disk; this one must commit.
        self.push_with(false)?;
        if self.report.commits + self.report.already_committed == before {
            return Err(self.violation("STUCK: with every fault off, the last push did not commit"));
        }
        Ok(())
    }
}

/// Runs one seed; `Err` is a broken invariant, with how to replay it.
pub fn run(seed: u64) -> Result<Report, Violation> {
    trace(seed).1
}

/// One seed's run with its trace (for `--trace`): the swarm, then every event.
pub fn trace(seed: u64) -> (Vec<String>, Result<Report, Violation>) {
    trace_with(seed, false)
}

/// `run` with a deliberate mistake in the agent's push order: a seed that finds it is a
/// seed the simulation catches it with.
pub fn run_mutant(seed: u64, mutant: Mutant) -> Result<Report, Violation> {
    let mut sim = Sim::new(seed);
    sim.mutant = Some(mutant);
    let outcome = sim.run();
    outcome.map(|()| sim.report)
}

/// `trace`, with the receiver's filesystem operations in it when `fs_ops`.
pub fn trace_with(seed: u64, fs_ops: bool) -> (Vec<String>, Result<Report, Violation>) {
    let mut sim = Sim::new(seed);
    sim.fs.set_trace(fs_ops);
    let mut events = vec![format!("{:?}", sim.swarm)];
    let outcome = sim.run();
    sim.report.fs = sim.fs.stats();
    events.append(&mut sim.trace);
    (events, outcome.map(|()| sim.report))
}
