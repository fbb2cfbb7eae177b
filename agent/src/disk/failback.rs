//! Failback on the agent: the original disk brought equal to the DR disk by deltas the
//! receiver reads from it, written through the tracker like any write, while every other
//! writer is fenced off.
//!
//! The fence and where failback stands live in `<journal>.failback` (JSON, replaced whole
//! and synced): while it exists, writes through the NBD front are refused (EPERM), so the
//! only writes are failback's own, and a restart of the agent keeps the fence. A pass is
//! applied as its delta arrives (each record checked before it is written) and the backing
//! synced before the file names its overlay cut as applied: cut off or killed before that,
//! the pass is simply done again (the writes are idempotent, and tracked, so a first pass
//! that names this disk's changes names these too).

use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ctk::ChangeId;
use ctk::delta::{DeltaReader, DeltaRecord};
use serde::{Deserialize, Serialize};

use super::{DiskError, ProtectedDisk};

/// Where a failback of this disk stands (`<journal>.failback`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackState {
    pub started_unix_ms: u64,
    /// The receiver's failover point the DR disk grew from (known after the first pass).
    #[serde(default)]
    pub point: Option<ChangeId>,
    /// The overlay cut the last applied pass was complete as of: the next pass's start.
    #[serde(default)]
    pub applied_upto: Option<ChangeId>,
    #[serde(default)]
    pub passes: u64,
    #[serde(default)]
    pub bytes_applied: u64,
    #[serde(default)]
    pub applied_unix_ms: Option<u64>,
    /// The cutover under way: this disk's cut that the receiver commits as the DR disk.
    #[serde(default)]
    pub committing: Option<Committing>,
}

/// The cutover's commit, recorded before it is asked for, so a rerun asks for the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committing {
    /// This disk's cut after the final pass.
    pub point: ChangeId,
    /// The final pass's overlay cut.
    pub upto: ChangeId,
    pub cut_unix_ms: u64,
}

/// A step of failback, asked over the control socket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum FailbackOp {
    /// Fence the disk (NBD writes refused) and start, or go on with, a failback.
    Begin,
    /// Apply the pass whose delta follows this request on the same control connection (from
    /// the failover at `point`, complete as of overlay cut `upto`; the sender closes its
    /// writing half after the delta), sync it, then record it as applied.
    Apply { point: ChangeId, upto: ChangeId },
    /// Record the cutover's commit before asking the receiver for it.
    Committing(Committing),
    /// Forget the recorded commit: the receiver refused it (the DR disk changed after the
    /// final pass, or its overlay's journal was recovered after a crash with a cut of its
    /// own), so the cutover starts over with another final pass.
    Recut,
    /// Failback is over (the receiver committed, the cursor moved): lift the fence.
    End,
}

fn state_path(journal: &Path) -> PathBuf {
    let mut p = journal.as_os_str().to_owned();
    p.push(".failback");
    PathBuf::from(p)
}

/// The state beside `journal`, if a failback is under way.
pub(super) fn load(journal: &Path) -> Result<Option<FailbackState>, DiskError> {
    match std::fs::read(state_path(journal)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            DiskError::Io(std::io::Error::other(format!(
                "{} is not a failback state ({e}): failback cannot tell where it stands; \
                 remove it only once the disk is known to equal the DR disk",
                state_path(journal).display()
            )))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Replaces the state whole, durably.
fn save(journal: &Path, state: &FailbackState) -> Result<(), DiskError> {
    let path = state_path(journal);
    let tmp = path.with_extension("failback.tmp");
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut &f, &bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl ProtectedDisk {
    /// Refuses a write from anyone but failback while a failback is under way.
    pub(super) fn check_not_failing_back(&self) -> Result<(), DiskError> {
        if self.failback.load(std::sync::atomic::Ordering::Acquire) {
            return Err(DiskError::FailingBack);
        }
        Ok(())
    }

    /// The failback under way, if any.
    pub fn failback_state(&self) -> Option<FailbackState> {
        load(&self.journal).ok().flatten()
    }

    /// One step of failback (see `FailbackOp`); the state after it.
    pub fn failback(&self, op: FailbackOp) -> Result<Option<FailbackState>, DiskError> {
        use std::sync::atomic::Ordering;
        let state = load(&self.journal)?;
        let mut state = match (op, state) {
            (FailbackOp::End, _) => {
                match std::fs::remove_file(state_path(&self.journal)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
                self.failback.store(false, Ordering::Release);
                return Ok(None);
            }
            (FailbackOp::Begin, state) => {
                // Fenced before the state says so: no write slips in between.
                self.failback.store(true, Ordering::Release);
                let state = state.unwrap_or_else(|| FailbackState {
                    started_unix_ms: ctk::unix_ms_now(),
                    ..FailbackState::default()
                });
                save(&self.journal, &state)?;
                return Ok(Some(state));
            }
            (_, None) => {
                return Err(DiskError::Io(std::io::Error::other(
                    "no failback is under way for this disk (begin one first)",
                )));
            }
            (op, Some(state)) => (op, state),
        };
        match state.0 {
            FailbackOp::Apply { .. } => {
                return Err(DiskError::Io(std::io::Error::other(
                    "a failback pass's delta comes on the control connection after the request \
                     (`ctk-agent failback` sends it)",
                )));
            }
            FailbackOp::Committing(c) => state.1.committing = Some(c),
            FailbackOp::Recut => state.1.committing = None,
            FailbackOp::Begin | FailbackOp::End => unreachable!("handled above"),
        }
        save(&self.journal, &state.1)?;
        Ok(Some(state.1))
    }

    /// Applies a pass (`FailbackOp::Apply`) whose delta is read from `delta` as it arrives,
    /// syncs it, then records it as applied. The state after it.
    pub fn failback_apply(
        &self,
        delta: impl Read,
        point: ChangeId,
        upto: ChangeId,
    ) -> Result<FailbackState, DiskError> {
        let Some(mut state) = load(&self.journal)? else {
            return Err(DiskError::Io(std::io::Error::other(
                "no failback is under way for this disk (begin one first)",
            )));
        };
        let bytes = self.apply_pass(delta)?;
        state.point = Some(point);
        state.applied_upto = Some(upto);
        state.passes += 1;
        state.bytes_applied += bytes;
        state.applied_unix_ms = Some(ctk::unix_ms_now());
        save(&self.journal, &state)?;
        Ok(state)
    }

    /// Writes every record of the delta read from `delta` through the tracker, then syncs
    /// the backing. The bytes written (zeros counted). Records go in batches whose intents
    /// one journal sync makes durable: a pass touches regions all over the disk, and a sync
    /// per record would be most of its time. A record is written only once its checksum
    /// holds; a delta that ends early or fails its trailer leaves the records before it
    /// written and the pass unrecorded.
    fn apply_pass(&self, delta: impl Read) -> Result<u64, DiskError> {
        let mut reader = DeltaReader::new(BufReader::with_capacity(1 << 20, delta))?;
        if reader.header().disk_size != self.size() {
            return Err(DiskError::Io(std::io::Error::other(format!(
                "the DR disk is {} bytes, this disk {}: resize this disk to the DR disk's size \
                 (ctk-agent resize) and run failback again",
                reader.header().disk_size,
                self.size()
            ))));
        }
        let (mut bytes, mut batch, mut held) = (0u64, Vec::new(), 0usize);
        loop {
            let record = reader.next_record()?;
            let end = record.is_none();
            match record {
                Some(DeltaRecord::Data { offset, data }) => {
                    held += data.len();
                    batch.push(Piece {
                        offset,
                        length: data.len() as u64,
                        data: Some(data.to_vec()),
                    });
                }
                Some(DeltaRecord::Zero { offset, length }) => batch.push(Piece {
                    offset,
                    length,
                    data: None,
                }),
                None => {}
            }
            if end || held >= BATCH_BYTES || batch.len() >= BATCH_RECORDS {
                bytes += batch.iter().map(|p| p.length).sum::<u64>();
                self.apply_batch(&batch)?;
                batch.clear();
                held = 0;
            }
            if end {
                break;
            }
        }
        self.file.sync_data()?;
        Ok(bytes)
    }

    /// The write path (`tracked_change`) for several pieces at once: every intent first,
    /// made durable by one sync, then the data, each piece recorded after its write.
    fn apply_batch(&self, batch: &[Piece]) -> Result<(), DiskError> {
        for p in batch {
            self.check(p.offset, p.length)?;
        }
        let _gate = self
            .gate
            .read()
            .map_err(|_| DiskError::Io(std::io::Error::other("gate poisoned")))?;
        let mut begun = Vec::with_capacity(batch.len());
        for p in batch {
            begun.push(self.with_tracker(|t| Ok(t.begin_intend(p.offset, p.length)?))?);
        }
        // The last intent's sync covers every record appended before it.
        if let Some(ctk::Intend::Sync(last)) = begun
            .iter_mut()
            .rev()
            .find(|b| matches!(b, ctk::Intend::Sync(_)))
        {
            last.sync();
        }
        let mut intents = Vec::with_capacity(batch.len());
        for b in begun {
            intents.push(match b {
                ctk::Intend::Ready(intent) => intent,
                ctk::Intend::Sync(pending) => {
                    self.with_tracker(|t| Ok(t.finish_intend(pending)?))?
                }
            });
        }
        let mut failed = None;
        for (p, intent) in batch.iter().zip(intents) {
            let written = self
                .preserve(p.offset, p.length)
                .and_then(|()| match &p.data {
                    Some(data) => self.file.write_all_at(data, p.offset),
                    None => self.zero_range(p.offset, p.length, true),
                });
            // Recorded whether or not the write succeeded: part of it may have landed.
            self.with_tracker(|t| {
                t.record(intent);
                Ok(())
            })?;
            if let Err(e) = written {
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// Most bytes and records a batch holds.
const BATCH_BYTES: usize = 16 << 20;
const BATCH_RECORDS: usize = 512;

/// One record of a pass, held for its batch (`None`: zeros).
struct Piece {
    offset: u64,
    length: u64,
    data: Option<Vec<u8>>,
}
