//! Cuts: sealing the open epoch, durable before its ChangeId is handed out.

use super::{Tracker, TrackerError};
use crate::id::ChangeId;
use crate::journal;
use crate::journal::record::{self, Record, SealKind};
use crate::journal::storage::{JournalStorage, Syncer};
use crate::limits::JOURNAL_REGIONS_PER_RECORD_MAX;

/// A cut sealed in memory whose journal record is appended but not yet known durable. Its
/// ChangeId is reachable only through `Tracker::finish_cut`, after `sync`.
#[must_use = "a cut's ChangeId comes only from finish_cut"]
#[derive(Debug)]
pub struct PendingCut {
    id: ChangeId,
    tracker: u64,
    syncer: Option<Syncer>,
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

impl<S: JournalStorage> Tracker<S> {
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
}
