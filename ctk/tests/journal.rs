//! The journal's promises, one test each: clean reopen is exact, crashes lose nothing,
//! a journal that cannot prove continuity starts a new generation, an fsync error poisons.

use ctk::{
    ChangeId, CrashMode, Generation, MemStorage, OpenOutcome, Since, Tracker, TrackerConfig,
    TrackerError,
};

const MIB: u64 = 1 << 20;

fn config() -> TrackerConfig {
    let mut c = TrackerConfig::new("disk-a", 64 * MIB);
    c.existing_data = false;
    c.intent_linger_cuts = 2;
    c
}

fn open(storage: &MemStorage, config: TrackerConfig) -> (Tracker<MemStorage>, OpenOutcome) {
    Tracker::open(storage.clone(), config, || Generation(0xfeed)).unwrap()
}

fn write(t: &mut Tracker<MemStorage>, offset: u64, length: u64) {
    let intent = t.intend(offset, length).unwrap();
    t.record(intent);
}

fn blocks(t: &Tracker<MemStorage>, since: ChangeId) -> Vec<u32> {
    t.changed_blocks(Since::Id(since), t.latest())
        .unwrap()
        .iter()
        .collect()
}

#[test]
fn clean_close_then_reopen_gives_exactly_the_same_answers() {
    let storage = MemStorage::new();
    let (mut t, outcome) = open(&storage, config());
    assert_eq!(outcome, OpenOutcome::Created);
    let start = t.latest();
    t.register_cursor("r1", start).unwrap();
    write(&mut t, 0, 4096);
    write(&mut t, 10 * MIB + 3, 9000);
    let c1 = t.cut().unwrap();
    t.register_cursor("r2", c1).unwrap();
    write(&mut t, 63 * MIB, MIB);
    // Unsealed writes must survive a clean close too.
    write(&mut t, 5 * MIB, 4096);
    let before = t.map().state();
    t.close().unwrap();

    let (mut t, outcome) = open(&storage, config());
    assert_eq!(outcome, OpenOutcome::Clean);
    assert_eq!(t.map().state(), before);
    let c2 = t.cut().unwrap();
    assert_eq!(c2.seq, c1.seq + 1);
    assert!(blocks(&t, c1).contains(&(5 * 256)));
    assert_eq!(blocks(&t, start).len(), 1 + 3 + 256 + 1);
}

#[test]
fn power_loss_after_writes_reports_every_intended_region() {
    for mode in [
        CrashMode::DropUnsynced,
        CrashMode::KeepPrefix(7),
        CrashMode::Torn {
            keep: 3,
            garbage: 40,
            seed: 9,
        },
        CrashMode::KeepAll,
    ] {
        let storage = MemStorage::new();
        let (mut t, _) = open(&storage, config());
        let c0 = t.cut().unwrap();
        write(&mut t, 3 * MIB + 4096, 4096);
        write(&mut t, 40 * MIB, 2 * 4096);
        // In flight at the crash: intent durable, never recorded.
        let _in_flight = t.intend(20 * MIB, 4096).unwrap();
        drop(t);
        storage.crash(mode);
        let (t, outcome) = open(&storage, config());
        let OpenOutcome::Recovered {
            recovery_cut: Some(rc),
            recovered_blocks,
            ..
        } = outcome
        else {
            panic!("{mode:?}: expected a recovery, got {outcome:?}");
        };
        assert_eq!(t.latest(), rc);
        assert_eq!(
            rc.generation, c0.generation,
            "{mode:?}: generation must be kept"
        );
        let got = blocks(&t, c0);
        for b in [3 * 256 + 1, 40 * 256, 40 * 256 + 1, 20 * 256] {
            assert!(got.contains(&b), "{mode:?}: block {b} missing");
        }
        // Over-reporting is bounded by the three intent regions.
        assert_eq!(recovered_blocks, 3 * 256, "{mode:?}");
    }
}

#[test]
fn a_hot_region_costs_one_sync_not_one_per_write() {
    let storage = MemStorage::new();
    let (mut t, _) = open(&storage, config());
    let before = storage.syncs();
    for i in 0..1000u64 {
        write(&mut t, (i % 256) * 4096, 4096);
    }
    assert_eq!(storage.syncs() - before, 1);
    // Intent lingers across cuts while the region stays hot.
    for _ in 0..5 {
        t.cut().unwrap();
        write(&mut t, 0, 4096);
    }
    assert_eq!(storage.syncs() - before, 1 + 5);
}

#[test]
fn intents_beyond_the_cap_are_cleared_least_recently_written_first() {
    let storage = MemStorage::new();
    let mut c = config();
    c.intent_linger_cuts = 1000;
    c.intent_regions_max = 4;
    let (mut t, _) = open(&storage, c.clone());
    for region in 0..10 {
        write(&mut t, region * MIB, 4096);
        t.cut().unwrap();
    }
    // Ten regions written, the cap is four: the six oldest were cleared, so a crash
    // re-reports only the four newest.
    drop(t);
    storage.crash(CrashMode::KeepAll);
    let (_, outcome) = open(&storage, c);
    let OpenOutcome::Recovered {
        recovered_blocks, ..
    } = outcome
    else {
        panic!("{outcome:?}")
    };
    assert_eq!(recovered_blocks, 4 * 256);
}

#[test]
fn a_failed_fsync_poisons_the_journal_until_reopen() {
    let storage = MemStorage::new();
    let (mut t, _) = open(&storage, config());
    let c0 = t.cut().unwrap();
    write(&mut t, 0, 4096);
    storage.fail_sync_after(0);
    let err = t.intend(30 * MIB, 4096).unwrap_err();
    assert!(matches!(err, TrackerError::Io { .. }), "{err}");
    storage.heal();
    // Healed media does not un-poison: the failed sync is never retried and forgotten.
    assert!(matches!(t.intend(0, 4096), Err(TrackerError::Poisoned(_))));
    assert!(matches!(t.cut(), Err(TrackerError::Poisoned(_))));
    assert!(matches!(
        t.register_cursor("x", c0),
        Err(TrackerError::Poisoned(_))
    ));
    drop(t);
    storage.crash(CrashMode::DropUnsynced);
    let (mut t, outcome) = open(&storage, config());
    assert!(
        matches!(outcome, OpenOutcome::Recovered { .. }),
        "{outcome:?}"
    );
    assert!(blocks(&t, c0).contains(&0));
    write(&mut t, 30 * MIB, 4096);
    t.cut().unwrap();
}

#[test]
fn a_failed_cut_keeps_its_writes_for_the_next_cut() {
    let storage = MemStorage::new();
    let (mut t, _) = open(&storage, config());
    let c0 = t.cut().unwrap();
    write(&mut t, 8 * MIB, 4096);
    storage.fail_sync_after(0);
    assert!(t.cut().is_err());
    storage.heal();
    drop(t);
    storage.crash(CrashMode::KeepAll);
    let (t, _) = open(&storage, config());
    assert!(blocks(&t, c0).contains(&(8 * 256)));
}

#[test]
fn another_disks_journal_starts_a_new_generation() {
    let storage = MemStorage::new();
    let (t, _) = open(&storage, config());
    let old = t.latest();
    t.close().unwrap();
    let mut other = config();
    other.disk_id = "disk-b".into();
    let (t, outcome) = Tracker::open(storage.clone(), other, || Generation(2)).unwrap();
    assert!(matches!(&outcome, OpenOutcome::NewGeneration { reason } if reason.contains("disk-a")));
    assert_eq!(t.latest().generation, Generation(2));
    assert!(t.changed(Since::Id(old), t.latest()).is_err());
    // After a lost continuity "all" is the whole disk: nothing is known about its contents.
    assert_eq!(
        t.changed(Since::All, t.latest()).unwrap(),
        vec![ctk::Extent::new(0, 64 * MIB)]
    );
}

#[test]
fn a_disk_shrunk_outside_ctk_or_a_new_block_size_starts_a_new_generation() {
    for change in [
        |c: &mut TrackerConfig| c.disk_size -= MIB,
        |c: &mut TrackerConfig| c.disk_size -= 1,
        |c: &mut TrackerConfig| c.block_size = 8192,
    ] {
        let storage = MemStorage::new();
        let (t, _) = open(&storage, config());
        t.close().unwrap();
        let mut changed = config();
        change(&mut changed);
        let (_, outcome) = Tracker::open(storage.clone(), changed, || Generation(3)).unwrap();
        assert!(
            matches!(outcome, OpenOutcome::NewGeneration { .. }),
            "{outcome:?}"
        );
    }
}

/// A disk grown while its tracker was closed (the usual way to grow a VM's disk: stop,
/// `truncate`, start) keeps its history, and every earlier ChangeId answers with the new
/// range as changed: no full copy, and no block of the new range unreported. Holds after a
/// clean close and after a crash, and survives a further reopen.
#[test]
fn a_disk_grown_while_closed_keeps_its_generation_and_reports_the_new_range() {
    for clean in [true, false] {
        let storage = MemStorage::new();
        let (mut t, _) = open(&storage, config());
        write(&mut t, 4096, 4096);
        let c1 = t.cut().unwrap();
        write(&mut t, 8 * MIB, 4096);
        if clean {
            t.close().unwrap();
        } else {
            drop(t);
        }
        let mut grown = config();
        grown.disk_size = 64 * MIB + 3 * MIB + 512;
        let (t, outcome) = Tracker::open(storage.clone(), grown.clone(), || Generation(9)).unwrap();
        assert!(
            !matches!(outcome, OpenOutcome::NewGeneration { .. }),
            "{outcome:?}"
        );
        assert_eq!(t.grown_at_open(), Some(64 * MIB));
        assert_eq!(t.latest().generation, c1.generation);
        // The write after c1 (in a recovery epoch, or still in the open epoch after a clean
        // close) and the new range, once cut.
        let mut t = t;
        let c2 = t.cut().unwrap();
        let changed_c2 = t.changed(Since::Id(c1), c2).unwrap();
        let covers = |extents: &[ctk::Extent], offset: u64, len: u64| {
            extents
                .iter()
                .any(|e| e.offset <= offset && offset + len <= e.offset + e.length)
        };
        assert!(
            covers(&changed_c2, 64 * MIB, 3 * MIB + 512),
            "{changed_c2:?}"
        );
        assert!(covers(&changed_c2, 8 * MIB, 4096), "{changed_c2:?}");
        // And after another reopen, from the snapshot written at open.
        t.close().unwrap();
        let (t, outcome) = Tracker::open(storage.clone(), grown, || Generation(10)).unwrap();
        assert_eq!(outcome, OpenOutcome::Clean, "clean={clean}");
        assert_eq!(t.grown_at_open(), None);
        let again = t.changed(Since::Id(c1), c2).unwrap();
        assert_eq!(again, changed_c2);
    }
}

#[test]
fn damage_followed_by_valid_records_is_not_mistaken_for_a_torn_tail() {
    let storage = MemStorage::new();
    let (mut t, _) = open(&storage, config());
    for i in 0..10 {
        write(&mut t, i * 5 * MIB, 4096);
        t.cut().unwrap();
    }
    drop(t);
    let mut bytes = storage.contents().unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    storage.set_contents(Some(bytes));
    let (_, outcome) = open(&storage, config());
    assert!(
        matches!(outcome, OpenOutcome::NewGeneration { .. }),
        "{outcome:?}"
    );
}

/// Fault model (docs/format.md): synced bytes read back as written or detectably damaged.
/// Every synced batch ends with a sync marker, so damage to any record something depends on
/// is followed by a valid record: a new generation, never a short answer. Damage to the final
/// marker itself loses nothing.
#[test]
fn every_single_byte_flip_is_recovered_safely_or_starts_a_new_generation() {
    let storage = MemStorage::new();
    let (mut t, _) = open(&storage, config());
    let c0 = t.cut().unwrap();
    write(&mut t, 4096, 4096);
    let c1 = t.cut().unwrap();
    write(&mut t, 33 * MIB, 4096);
    drop(t);
    let pristine = storage.contents().unwrap();
    let (mut kept, mut fresh) = (0, 0);
    for i in 0..pristine.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bytes = pristine.clone();
            bytes[i] ^= flip;
            let s = MemStorage::new();
            s.set_contents(Some(bytes));
            let (t, outcome) = Tracker::open(s, config(), || Generation(5)).unwrap();
            if let OpenOutcome::NewGeneration { .. } = outcome {
                fresh += 1;
                continue;
            }
            kept += 1;
            let got = blocks(&t, c0);
            assert!(got.contains(&1), "flip {flip:#x} at {i}: {outcome:?}");
            assert!(
                got.contains(&(33 * 256)),
                "flip {flip:#x} at {i}: {outcome:?}"
            );
            assert!(
                blocks(&t, c1).contains(&(33 * 256)),
                "flip {flip:#x} at {i}"
            );
        }
    }
    eprintln!(
        "{} byte flips: {fresh} started a new generation, {kept} kept the generation with every write",
        3 * pristine.len()
    );
    // Only flips inside the final sync marker (16 bytes) can pass for a torn tail.
    assert_eq!(kept, 3 * 16);
}

#[test]
fn bad_configuration_is_a_typed_error() {
    let mut c = config();
    c.block_size = 3000;
    assert!(matches!(
        Tracker::open(MemStorage::new(), c, || Generation(1)),
        Err(TrackerError::Geometry(_))
    ));
    let mut c = config();
    c.region_size = 4096;
    assert!(matches!(
        Tracker::open(MemStorage::new(), c, || Generation(1)),
        Err(TrackerError::BadRegionSize(_))
    ));
    let mut c = config();
    c.disk_id = String::new();
    assert!(matches!(
        Tracker::open(MemStorage::new(), c, || Generation(1)),
        Err(TrackerError::BadDiskId)
    ));
    let (mut t, _) = open(&MemStorage::new(), config());
    assert!(matches!(
        t.intend(64 * MIB - 1, 2),
        Err(TrackerError::Geometry(_))
    ));
}

#[test]
fn closing_with_a_write_in_flight_is_refused_and_the_reopen_recovers_it() {
    let storage = MemStorage::new();
    let (mut t, _) = open(&storage, config());
    let c0 = t.cut().unwrap();
    let in_flight = t.intend(12 * MIB, 4096).unwrap();
    let err = {
        // Keep the intent alive across the close attempt, as a real caller's would be.
        let e = t.close().unwrap_err();
        drop(in_flight);
        e
    };
    assert!(matches!(err, TrackerError::WritesInFlight(1)), "{err}");
    let (t, outcome) = open(&storage, config());
    assert!(
        matches!(outcome, OpenOutcome::Recovered { .. }),
        "{outcome:?}"
    );
    assert!(blocks(&t, c0).contains(&(12 * 256)));
}

#[test]
fn an_intent_is_proof_only_for_the_tracker_that_made_it() {
    let (mut a, _) = open(&MemStorage::new(), config());
    let (mut b, _) = open(&MemStorage::new(), config());
    let intent = a.intend(0, 4096).unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| b.record(intent)));
    assert!(
        result.is_err(),
        "recording another tracker's intent must not pass silently"
    );
}

/// Hand-made journals with well-formed records and hostile values: each must give a typed
/// outcome promptly (here: a new generation), never a panic, a hang or a huge allocation.
#[test]
fn hostile_but_well_checksummed_journals_start_a_new_generation() {
    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = b"CTKr".to_vec();
        f.push(kind);
        f.extend_from_slice(&[0, 0, 0]);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(payload);
        let crc = crc32fast::hash(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        f
    }
    fn header(region_size: u64, keep_recent: u64) -> Vec<u8> {
        let mut p = 1u32.to_le_bytes().to_vec();
        p.extend_from_slice(&6u16.to_le_bytes());
        p.extend_from_slice(b"disk-a");
        p.extend_from_slice(&(64 * MIB).to_le_bytes());
        p.extend_from_slice(&4096u32.to_le_bytes());
        p.extend_from_slice(&region_size.to_le_bytes());
        p.extend_from_slice(&7u128.to_le_bytes());
        p.push(0);
        p.extend_from_slice(&keep_recent.to_le_bytes());
        frame(1, &p)
    }
    fn snapshot(floor: u64, latest: u64) -> Vec<u8> {
        let mut p = floor.to_le_bytes().to_vec();
        p.extend_from_slice(&latest.to_le_bytes());
        let mut out = frame(3, &p);
        // Empty history and open bitmaps, then the end of the snapshot.
        let mut empty = Vec::new();
        roaring::RoaringBitmap::new()
            .serialize_into(&mut empty)
            .unwrap();
        out.extend(frame(2, &empty));
        out.extend(frame(4, &(empty.len() as u64).to_le_bytes()));
        out.extend(frame(2, &empty));
        out.extend(frame(6, &(empty.len() as u64).to_le_bytes()));
        out.extend(frame(8, &[1, 0, 0, 0, 0, 0, 0, 0]));
        out.extend(frame(7, &[]));
        out
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zero region size", [header(0, 8), snapshot(0, 0)].concat()),
        (
            "region smaller than a block",
            [header(1024, 8), snapshot(0, 0)].concat(),
        ),
        (
            "huge keep-recent and latest",
            [header(MIB, u64::MAX), snapshot(u64::MAX - 1, u64::MAX - 1)].concat(),
        ),
        (
            "floor above latest",
            [header(MIB, 8), snapshot(9, 3)].concat(),
        ),
    ];
    for (what, bytes) in cases {
        let storage = MemStorage::new();
        storage.set_contents(Some(bytes));
        let started = std::time::Instant::now();
        let (_, outcome) = Tracker::open(storage, config(), || Generation(3)).unwrap();
        assert!(
            matches!(outcome, OpenOutcome::NewGeneration { .. }),
            "{what}: {outcome:?}"
        );
        assert!(
            started.elapsed().as_secs() < 5,
            "{what}: open took too long"
        );
    }
    // The same shape with sane values replays: the test's journals are well formed.
    let storage = MemStorage::new();
    storage.set_contents(Some([header(MIB, 8), snapshot(0, 0)].concat()));
    let (_, outcome) = Tracker::open(storage, config(), || Generation(3)).unwrap();
    assert!(
        matches!(outcome, OpenOutcome::Recovered { .. }),
        "{outcome:?}"
    );
}

/// Regression (found by the SIGKILL crash test): an unoptimised run container (a large write,
/// then many single blocks merged into it) serialises beyond 8 KiB; replay refused it as "larger
/// than any bitmap of this disk" and started a new generation on a healthy journal.
#[test]
fn many_runs_in_one_container_replay_without_losing_the_generation() {
    let storage = MemStorage::new();
    let mut c = config();
    c.disk_size = 256 * MIB;
    c.map.keep_recent = 1;
    let (mut t, _) = open(&storage, c.clone());
    let generation = t.latest().generation;
    // Epochs of short scattered runs seal (optimised) as run containers; folded into the
    // history one after another (keep_recent 1), their union stays a run container whose
    // intervals add up past 8 KiB.
    let mut x = 99u64;
    for _ in 0..20 {
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            write(&mut t, (x % 65_000) * 4096, 4 * 4096);
        }
        t.cut().unwrap();
    }
    let before = t.map().state();
    t.close().unwrap();
    let (t, outcome) = open(&storage, c.clone());
    assert_eq!(outcome, OpenOutcome::Clean);
    assert_eq!(t.latest().generation, generation);
    assert_eq!(t.map().state(), before);
    // The same content sealed and reopened after a crash.
    let mut t = t;
    t.cut().unwrap();
    drop(t);
    storage.crash(CrashMode::KeepAll);
    let (t, outcome) = open(&storage, c);
    assert!(
        matches!(outcome, OpenOutcome::Recovered { .. }),
        "{outcome:?}"
    );
    assert_eq!(t.latest().generation, generation);
}
