//! Write intents: the journal learns a region may change before the write reaches the disk.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::{Tracker, TrackerError};
use crate::journal::record::{self, Record};
use crate::journal::storage::{JournalStorage, Syncer};
use crate::limits::JOURNAL_REGIONS_PER_RECORD_MAX;

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
    syncer: Option<Syncer>,
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
pub(super) struct RegionHasher(u64);

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
pub(super) type RegionMap = HashMap<u32, u64, BuildHasherDefault<RegionHasher>>;

impl<S: JournalStorage> Tracker<S> {
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
    pub(super) fn mark_intents_durable(&mut self, batch: u64) {
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
}
