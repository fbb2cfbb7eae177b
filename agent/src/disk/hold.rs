//! Holding writes and sealing epochs: one disk's cut, or a consistency group's, where every
//! member's gate is held at once so that one instant is cut across all of them.
//!
//! Write-order fidelity across the members: a write acknowledged on any member before the
//! hold was asked for is in the cut (each gate waits for the writes in flight on its disk),
//! and one that began after the release is in none of it (every gate holds new writes until
//! every epoch is sealed). Gates are taken one after the other, in the order given; a write
//! that lands on a member not yet held can only depend on writes already acknowledged, which
//! the members held before it kept. Callers give members in the agent's disk order, so two
//! group cuts never wait on each other's gates crosswise.

use std::io;
use std::time::{Duration, Instant};

use ctk::ChangeId;
use serde_json::Value;

use super::{DiskError, HoldTimes, ProtectedDisk};

/// What one member's seal gave: its cut, the hold's times, what `inside` returned for it.
pub type Sealed = (ChangeId, HoldTimes, Value);

/// Holds NBD writes on every disk of `disks` (those in flight finish first), runs `destage`
/// once (caches below the tracking point), seals every disk's epoch, runs `inside` with each
/// disk's index and new ChangeId while writes are still held everywhere, releases them all,
/// then makes each seal durable and flushes each backing. A member whose seal fails fails
/// the whole; the members sealed before it keep their cut (an epoch boundary more, which
/// over-sends nothing and loses nothing).
pub fn hold_and_seal_all(
    disks: &[&ProtectedDisk],
    destage: impl FnOnce() -> anyhow::Result<()>,
    mut inside: impl FnMut(usize, ChangeId) -> anyhow::Result<Value>,
) -> anyhow::Result<Vec<Sealed>> {
    // New writes wait from the moment the cut asks for a gate (the lock prefers writers),
    // so the hold is timed from the request, not from when it was granted.
    let asked = Instant::now();
    let mut holds = Vec::with_capacity(disks.len());
    for disk in disks {
        holds.push(
            disk.gate
                .write()
                .map_err(|_| DiskError::Io(io::Error::other("gate poisoned")))?,
        );
    }
    let drained = asked.elapsed();
    for disk in disks {
        disk.follow_backing_size()?;
    }
    destage()?;
    let before_seal = Instant::now();
    // Sealed in memory and appended; the fsyncs wait until writes flow again.
    let mut pending = Vec::with_capacity(disks.len());
    let mut failed = None;
    for disk in disks {
        match disk.with_tracker(|t| Ok(t.begin_cut()?)) {
            Ok(p) => pending.push(p),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let seal = before_seal.elapsed();
    let values: Vec<anyhow::Result<Value>> = match failed {
        None => pending
            .iter()
            .enumerate()
            .map(|(i, p)| inside(i, p.undurable_id()))
            .collect(),
        Some(_) => Vec::new(),
    };
    let times = HoldTimes {
        total: asked.elapsed(),
        drain: drained,
        seal,
        sync: Duration::ZERO,
    };
    drop(holds);
    // The seals' fsyncs run with no gate held: writes (which need the tracker lock for
    // every intent and record) go on meanwhile. A ChangeId is returned only once durable.
    // Every member's seal is finished and every backing flushed even when one fails: a
    // member left half done would keep its cut unconfirmed until its next one. The first
    // failure is the answer.
    let mut ids = Vec::with_capacity(pending.len());
    let mut first_error: Option<anyhow::Error> = failed.map(Into::into);
    for (disk, mut p) in disks.iter().zip(pending) {
        let synced = Instant::now();
        p.sync();
        match disk.with_tracker(|t| Ok(t.finish_cut(p)?)) {
            Ok(id) => ids.push((id, synced.elapsed())),
            Err(e) => {
                first_error.get_or_insert(e.into());
            }
        }
    }
    // Make the cut's data durable on each backing. This needs no hold: every write
    // acknowledged before the seal is flushed by it (later ones too, harmlessly), and
    // readers of the cut (exports) read through this host, protected by copy-on-write.
    // Flushed inside the hold, the hold would last as long as the page cache is dirty.
    for disk in disks {
        if let Err(e) = disk.file.sync_data() {
            first_error.get_or_insert(DiskError::Io(e).into());
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    ids.into_iter()
        .zip(values)
        .map(|((id, sync), value)| Ok((id, HoldTimes { sync, ..times }, value?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CutPolicy;
    use std::path::Path;

    fn disk(dir: &Path, name: &str) -> ProtectedDisk {
        let path = dir.join(format!("{name}.img"));
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let journal = dir.join(format!("{name}.ctk"));
        ProtectedDisk::open(name, &path, &journal, 4096, CutPolicy::default())
            .unwrap()
            .0
    }

    #[test]
    fn every_members_writes_are_held_from_the_first_gate_to_the_last_seal() {
        let dir = tempfile::tempdir().unwrap();
        let disks: Vec<ProtectedDisk> = ["a", "b", "c"]
            .iter()
            .map(|n| disk(dir.path(), n))
            .collect();
        let members: Vec<&ProtectedDisk> = disks.iter().collect();
        for (i, d) in disks.iter().enumerate() {
            d.write(i as u64 * 4096, &[7; 4096], false).unwrap();
        }
        // A writer would wait on a gate exactly when it cannot be read-locked.
        let all_held = || disks.iter().all(|d| d.gate.try_read().is_err());
        let mut seen = Vec::new();
        let sealed = hold_and_seal_all(
            &members,
            || {
                assert!(all_held(), "a member's writes flow during the destage");
                Ok(())
            },
            |i, id| {
                assert!(
                    all_held(),
                    "a member's writes flow while member {i} is sealed"
                );
                seen.push((i, id));
                Ok(Value::from(i))
            },
        )
        .unwrap();
        assert!(!disks.iter().any(|d| d.gate.try_read().is_err()));
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 1, 2]);
        for (i, (id, times, value)) in sealed.iter().enumerate() {
            assert_eq!(
                *id, seen[i].1,
                "the ChangeId made durable is the one sealed"
            );
            assert_eq!(*value, Value::from(i));
            // One hold for all: every member was held for the same span.
            assert_eq!(times.total, sealed[0].1.total);
            // Each member's cut holds its own write, and only it.
            let before = ctk::ChangeId::new(id.generation, id.seq - 1);
            let (_, changed) = disks[i].changed(ctk::Since::Id(before), Some(*id)).unwrap();
            assert_eq!(changed, [ctk::Extent::new(i as u64 * 4096, 4096)]);
        }
    }
}
