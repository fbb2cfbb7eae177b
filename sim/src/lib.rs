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

use std::collections::{HashMap, HashSet};
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

mod agent_push;
mod check;
mod failback;
mod link;

use link::Push;

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
    /// Per step, in 1/1000: the disk fails over at the DR site (then fails back).
    pub failover: u32,
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
        // The DR roles came later: their rate and their moment come from a stream of their
        // own, so a seed runs as it did before them up to its first failover (the seeds kept
        // as regressions still replay what they found).
        let mut dr = Rng::new(rng.0 ^ 0xd15a_57e6_0000_0000);
        let failover = if dr.below(3) == 0 {
            0
        } else {
            dr.below(61) as u32
        };
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
            failover,
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
    pub failovers: u64,
    /// Writes of the recovered VM at the DR site.
    pub dr_writes: u64,
    pub failback_passes: u64,
    /// First failback passes that compared digests (the agent could not name its writes).
    pub failback_compares: u64,
    /// Failbacks that committed the DR disk as a new point.
    pub cutovers: u64,
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
        self.failovers += o.failovers;
        self.dr_writes += o.dr_writes;
        self.failback_passes += o.failback_passes;
        self.failback_compares += o.failback_compares;
        self.cutovers += o.cutovers;
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
    cuts: HashMap<ChangeId, Vec<u8>>,
    cursor: Option<ChangeId>,
    last_push: Option<Push>,
    /// The simulated clock (ms): stamps cuts, and the store reads it for retention by age.
    clock: Arc<std::sync::atomic::AtomicU64>,
    // Receiver.
    fs: SimFs,
    /// Every point the receiver was seen to hold, in commit order.
    committed: Vec<ChangeId>,
    committed_set: HashSet<ChangeId>,
    /// The newest point the receiver acknowledged to the agent.
    last_acked: Option<ChangeId>,
    /// A deliberate mistake in the agent's push order (the mutant tests), if any.
    mutant: Option<Mutant>,
    // DR.
    /// The failover at the DR site, while the disk is failed over.
    dr: Option<failback::Dr>,
    /// The agent's failback, from its first pass to the cutover.
    failback: Option<failback::Failback>,
    /// The cutover just finished: the failover is over.
    failback_done: bool,
    /// When a failover starts (a stream of its own: see `Swarm::from_seed`).
    dr_rng: Rng,
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
            cuts: HashMap::new(),
            cursor: None,
            last_push: None,
            clock: Arc::new(std::sync::atomic::AtomicU64::new(1_700_000_000_000)),
            fs,
            committed: Vec::new(),
            committed_set: HashSet::new(),
            last_acked: None,
            mutant: None,
            dr: None,
            failback: None,
            failback_done: false,
            dr_rng: Rng::new(seed ^ 0x0fa1_1bac_0000_0000),
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
            if self.dr.is_some() {
                self.failover_step()?;
            } else if self.dr_rng.chance(self.swarm.failover) {
                self.fail_over()?;
            } else if self.rng.chance(self.swarm.resize) {
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
            failover: 0,
            ..self.swarm.clone()
        };
        self.step += 1;
        self.finish_failback()?;
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
