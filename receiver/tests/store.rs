//! The receiver's store through the real `ctk-receiver` binary: chains of deltas merged and
//! every kept point restored byte for byte; bad input refused with nothing changed; merges
//! checked against the sender's digest; retention by age tiers. (Crashes: store_crash.rs.)

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use ctk::delta::{DeltaHeader, DeltaWriter, WriteOptions};

use ctk::{ChangeId, Generation};

use common::Rng;
use common::chain::*;

#[test]
fn chains_merge_and_every_kept_point_restores_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let c = chain(dir.path(), "vm1", 14, 3 << 20, 42);
    let keep = 10;
    for (k, delta) in c.deltas.iter().enumerate() {
        let a = ok(&[
            "ingest",
            "--store",
            s,
            "--disk",
            "vm1",
            "--keep",
            &keep.to_string(),
            "--json",
            delta.to_str().unwrap(),
        ]);
        assert_eq!(a["committed"], id(k as u64 + 1).to_string());
    }
    let kept = points(s, "vm1");
    let first_kept = c.states.len() - keep;
    assert_eq!(kept.len(), keep);
    for (i, point) in kept.iter().enumerate() {
        let state = &c.states[first_kept + i];
        assert_eq!(point, &id((first_kept + i) as u64 + 1).to_string());
        let image = restored(s, "vm1", point, &dir.path().join("r.img"));
        assert!(
            image == *state,
            "point {point} restores wrong ({} vs {} bytes)",
            image.len(),
            state.len()
        );
    }
    assert_eq!(ok(&["verify", "--store", s, "--json"])["ok"], true);
    // A re-delivery of the newest point is acknowledged, not applied again.
    let again = ok(&[
        "ingest",
        "--store",
        s,
        "--disk",
        "vm1",
        "--json",
        c.deltas.last().unwrap().to_str().unwrap(),
    ]);
    assert_eq!(again["already_committed"], true);
    assert_eq!(points(s, "vm1"), kept);
}

/// One piece: every bad input is tried against the same store, and after each one the
/// store must still be exactly what it was: the shared state is the point of the test.
#[test]
fn bad_deltas_and_names_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let c = chain(dir.path(), "vm1", 4, 1 << 20, 7);
    ok(&[
        "ingest",
        "--store",
        s,
        "--disk",
        "vm1",
        c.deltas[0].to_str().unwrap(),
    ]);
    ok(&[
        "ingest",
        "--store",
        s,
        "--disk",
        "vm1",
        c.deltas[1].to_str().unwrap(),
    ]);
    let before_points = points(s, "vm1");
    let before_full = std::fs::read(store.join("vm1/full.img")).unwrap();
    let refuse = |args: &[&str], why: &str| {
        let out = receiver(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(why), "{args:?}: expected {why:?} in {err}");
    };
    // Out of order: skips a point.
    refuse(
        &[
            "ingest",
            "--store",
            s,
            "--disk",
            "vm1",
            c.deltas[3].to_str().unwrap(),
        ],
        "newest point is",
    );
    // Another disk's delta.
    let other = chain(dir.path(), "vm2", 1, 1 << 20, 8);
    refuse(
        &[
            "ingest",
            "--store",
            s,
            "--disk",
            "vm1",
            other.deltas[0].to_str().unwrap(),
        ],
        "vm2",
    );
    // The first full again is a re-delivery (acknowledged); another full is refused.
    let again = ok(&[
        "ingest",
        "--store",
        s,
        "--disk",
        "vm1",
        "--json",
        c.deltas[0].to_str().unwrap(),
    ]);
    assert_eq!(again["already_committed"], true);
    let other_full = dir.path().join("other-full.ctkd");
    write_delta(
        &other_full,
        "vm1",
        None,
        &c.states[1],
        None,
        id(50),
        &mut Rng(3),
    );
    refuse(
        &[
            "ingest",
            "--store",
            s,
            "--disk",
            "vm1",
            other_full.to_str().unwrap(),
        ],
        "already holds",
    );
    // Damaged deltas: a flipped byte at several places, a truncation, trailing junk.
    let good = std::fs::read(&c.deltas[2]).unwrap();
    for at in [10, 100, good.len() / 2, good.len() - 5] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        let p = dir.path().join("bad.ctkd");
        std::fs::write(&p, &bad).unwrap();
        refuse(
            &["ingest", "--store", s, "--disk", "vm1", p.to_str().unwrap()],
            "damaged",
        );
        // The pre-images written while it was staged went with it.
        assert!(
            !store.join("vm1/staging/undo.ctkd").exists(),
            "a refused push left its undo behind (flip at {at})"
        );
    }
    let p = dir.path().join("short.ctkd");
    std::fs::write(&p, &good[..good.len() - 1]).unwrap();
    refuse(
        &["ingest", "--store", s, "--disk", "vm1", p.to_str().unwrap()],
        "truncated",
    );
    let mut junk = good.clone();
    junk.extend_from_slice(b"more");
    std::fs::File::create(&p).unwrap().write_all(&junk).unwrap();
    refuse(
        &["ingest", "--store", s, "--disk", "vm1", p.to_str().unwrap()],
        "follow the delta trailer",
    );
    // A valid full whose disk is larger than this filesystem can hold (4 KiB blocks allow
    // 2^32 blocks = 16 TiB; ext4 files stop one block short): refused before anything is
    // recorded, in a store of its own so the checks below are unaffected.
    let huge = dir.path().join("huge.ctkd");
    {
        let header = DeltaHeader {
            disk_id: "vm1".into(),
            disk_size: 1 << 44,
            block_size: BS as u32,
            from: None,
            to: id(1),
        };
        let f = std::fs::File::create(&huge).unwrap();
        let mut w = DeltaWriter::new(f, &header, WriteOptions::default()).unwrap();
        w.write_extent(0, &[7u8; BS]).unwrap();
        w.finish().unwrap();
    }
    let huge_store = dir.path().join("huge-store");
    let hs = huge_store.to_str().unwrap();
    let out = receiver(&[
        "ingest",
        "--store",
        hs,
        "--disk",
        "vm1",
        huge.to_str().unwrap(),
    ]);
    if out.status.success() {
        // This filesystem holds it (not ext4): nothing to refuse, and nothing wedged.
        assert_eq!(points(hs, "vm1").len(), 1);
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot be stored here"), "{err}");
        assert!(points(hs, "vm1").is_empty());
        // Nothing half-done is left to wedge the store: a normal full goes in next.
        ok(&[
            "ingest",
            "--store",
            hs,
            "--disk",
            "vm1",
            c.deltas[0].to_str().unwrap(),
        ]);
    }
    // Names that could be paths.
    for name in ["../x", "a/b", "", ".", &"n".repeat(300)] {
        refuse(
            &[
                "ingest",
                "--store",
                s,
                "--disk",
                name,
                c.deltas[2].to_str().unwrap(),
            ],
            "not valid",
        );
    }
    assert!(!dir.path().join("x").exists());
    // Nothing committed changed, and the good delta still goes in.
    assert_eq!(points(s, "vm1"), before_points);
    assert!(std::fs::read(store.join("vm1/full.img")).unwrap() == before_full);
    ok(&[
        "ingest",
        "--store",
        s,
        "--disk",
        "vm1",
        c.deltas[2].to_str().unwrap(),
    ]);
    let image = restored(s, "vm1", "latest", &dir.path().join("r.img"));
    assert!(image == c.states[2]);
    restore_onto_a_block_device(s, &dir.path().join("dev.img"), &c.states[2]);
    // A restore of a point that is not kept.
    refuse(
        &[
            "restore",
            "--store",
            s,
            "--disk",
            "vm1",
            "--point",
            "nope",
            "-o",
            "/dev/null",
        ],
        "malformed ChangeId",
    );
    let missing = ChangeId::new(Generation(0x5eed_cafe), 99).to_string();
    // Refused, and the error says which points are kept.
    let kept = points(s, "vm1").last().cloned().unwrap();
    refuse(
        &[
            "restore",
            "--store",
            s,
            "--disk",
            "vm1",
            "--point",
            &missing,
            "-o",
            dir.path().join("missing.img").to_str().unwrap(),
        ],
        &format!("the newest it keeps: {kept}"),
    );
}

/// The digest of an image as a sender computes it (`ctk::digest`).
fn digest_of(dir: &Path, state: &[u8]) -> String {
    let path = dir.join("digest-input.img");
    std::fs::write(&path, state).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    ctk::digest::Leaves::of_image(&f, state.len() as u64, BS as u32)
        .unwrap()
        .digest()
        .to_string()
}

#[test]
fn merges_are_checked_against_the_senders_digest_and_rot_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let c = chain(dir.path(), "vm1", 4, 2 << 20, 5);
    let delta = |k: usize| c.deltas[k].to_str().unwrap().to_string();
    let ingest = |k: usize, digest: &str, failpoint: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ctk-receiver"));
        cmd.args(["ingest", "--store", s, "--disk", "vm1", "--json"])
            .args(["--image-digest", digest, &delta(k)]);
        if let Some(f) = failpoint {
            cmd.env("CTK_FAILPOINT", f);
        }
        cmd.output().unwrap()
    };
    let answer = |out: &Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // The full and an increment, each with the sender's digest: committed, and checked.
    for k in 0..2 {
        let a = answer(&ingest(k, &digest_of(dir.path(), &c.states[k]), None));
        assert_eq!(a["digest_checked"], true, "{a}");
        assert_eq!(a["image_digest"], digest_of(dir.path(), &c.states[k]));
    }
    let unchanged = |why: &str| {
        assert_eq!(points(s, "vm1").len(), 2, "{why}");
        let image = restored(s, "vm1", "latest", &dir.path().join("r.img"));
        assert!(image == c.states[1], "{why}: the newest point changed");
        assert_eq!(ok(&["verify", "--store", s, "--json"])["ok"], true, "{why}");
    };
    // A digest of another image: refused, and the store is exactly as before.
    let out = ingest(2, &digest_of(dir.path(), &c.states[3]), None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match the agent's digest"), "{err}");
    unchanged("wrong digest");
    // A byte of the merged image goes bad after the apply: the check refuses it and the
    // merge is rolled back.
    let out = ingest(2, &digest_of(dir.path(), &c.states[2]), Some("flip_merged"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match the agent's digest"), "{err}");
    unchanged("flipped merged byte");
    // The right digest: committed and checked.
    let a = answer(&ingest(2, &digest_of(dir.path(), &c.states[2]), None));
    assert_eq!(a["digest_checked"], true, "{a}");
    // Rot in full.img (one byte of a block no merge touches again): `verify` and `restore`
    // both find it instead of handing out a wrong image.
    let full = store.join("vm1/full.img");
    let mut bytes = std::fs::read(&full).unwrap();
    let at = bytes.iter().rposition(|&b| b != 0).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(&full, &bytes).unwrap();
    let out = receiver(&["verify", "--store", s]);
    assert!(!out.status.success(), "verify missed the rot");
    let out = receiver(&[
        "restore",
        "--store",
        s,
        "--disk",
        "vm1",
        "--point",
        "latest",
        "-o",
        dir.path().join("rot.img").to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "restore handed out a rotten image");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("digest"), "{err}");
    // Nothing is left under the name asked for, nor beside it.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("rot.img"))
        .collect();
    assert!(left.is_empty(), "a failed restore left {left:?}");
}

/// Age tiers drop points between kept ones; their pre-images fold into the next kept point's
/// undo. Along a chain of 40 points cut 30 minutes apart (with a grow and a shrink to a
/// size that is not a whole number of blocks), the kept set is what the policy says and every
/// kept point restores byte for byte, also when the merge is killed after a fold was written
/// but before the manifest that uses it, and after it.
#[test]
fn age_tiers_fold_dropped_points_and_every_kept_point_restores_exactly() {
    use ctk_receiver::retention::{self, Retention};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let n = 40;
    let c = chain(dir.path(), "vm1", n, 48 * BS + 123, 0x7135);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let half_hour = 1_800_000u64;
    // A quarter hour off every boundary, so the few ms between here and the store's clock
    // cannot move a point across a tier's edge.
    let times: Vec<u64> = (0..n as u64)
        .map(|k| now - (n as u64 - k) * half_hour + half_hour / 2)
        .collect();
    let tiers = "3h:all,24h:2h";
    let policy = Retention {
        keep: 2,
        tiers: retention::parse_tiers(tiers).unwrap(),
    };
    let ids: Vec<String> = (1..=n as u64).map(|k| id(k).to_string()).collect();
    let mut folds = 0;
    let mut kept_before: Vec<String> = Vec::new();
    let mut folded_at = None;
    for k in 0..n {
        let cut = times[k].to_string();
        let args = [
            "ingest",
            "--store",
            s,
            "--disk",
            "vm1",
            "--keep",
            "2",
            "--tiers",
            tiers,
            "--cut-unix-ms",
            &cut,
            c.deltas[k].to_str().unwrap(),
        ];
        // Two merges are killed in retention: once with its drops (and folds) written but
        // not yet in the manifest, once right after. The next open must find a consistent
        // store. Which merge drops something depends on the time of day (periods are
        // aligned to the epoch), so it is found with the policy itself.
        let expected_now: Vec<String> = retention::select(&times[..=k], now, &policy)
            .iter()
            .enumerate()
            .filter(|(_, keep)| **keep)
            .map(|(i, _)| ids[i].clone())
            .collect();
        let drops = kept_before.iter().any(|id| !expected_now.contains(id));
        let failpoint = if folded_at.is_none() && k >= 10 && drops {
            folded_at = Some(k);
            Some("folded")
        } else if folded_at.is_some_and(|f| k == f + 6) {
            Some("retained")
        } else {
            None
        };
        if let Some(fp) = failpoint {
            let out = Command::new(env!("CARGO_BIN_EXE_ctk-receiver"))
                .args(args)
                .env("CTK_FAILPOINT", fp)
                .output()
                .unwrap();
            assert!(!out.status.success(), "failpoint {fp} did not fire");
        } else {
            ok(&args);
        }
        let kept = points(s, "vm1");
        kept_before = kept.clone();
        assert_eq!(kept.last(), Some(&ids[k]), "the newest point is committed");
        if failpoint != Some("folded") {
            let expected: Vec<String> = retention::select(&times[..=k], now, &policy)
                .iter()
                .enumerate()
                .filter(|(_, keep)| **keep)
                .map(|(i, _)| ids[i].clone())
                .collect();
            assert_eq!(kept, expected, "after merge {k}");
        }
        let listed = ok(&["points", "--store", s, "--disk", "vm1", "--json"]);
        folds += listed[0]["points"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["undo"].as_str().is_some_and(|u| u.contains("-back-to-")))
            .count();
        if k % 8 == 7 || failpoint.is_some() {
            for p in &kept {
                let i = ids.iter().position(|x| x == p).unwrap();
                let got = restored(s, "vm1", p, &dir.path().join("r.img"));
                assert!(got == c.states[i], "point {p} (state {i}) after merge {k}");
            }
            ok(&["verify", "--store", s, "--disk", "vm1", "--json"]);
        }
    }
    assert!(
        folds > 0,
        "no point was ever folded: the test tests nothing"
    );
    assert!(
        folded_at.is_some_and(|f| f + 6 < n),
        "no merge was killed in retention"
    );
    // Fewer points than merges, more than --keep: the tiers chose.
    let kept = points(s, "vm1");
    assert!(kept.len() > 2 && kept.len() < n / 2, "{} kept", kept.len());
}

/// A merge whose pre-images are many (more ranges and more bytes than the undo queues
/// ahead of its reads) keeps every one of them: the point before it restores exactly.
#[test]
fn a_merge_of_many_scattered_ranges_keeps_every_pre_image() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let mut rng = Rng(7);
    let size = 24 << 20;
    let before: Vec<u8> = (0..size)
        .map(|i| (i / BS) as u8 ^ (i % 251) as u8)
        .collect();
    // Every other block changed: 3,072 ranges of one block (past the 1,024 the undo queues)
    // and 12 MiB (past its 8 MiB); then one long run, for the byte bound alone.
    let mut after = before.clone();
    for b in after.chunks_mut(BS).step_by(2) {
        b.fill((rng.next() % 255) as u8 + 1);
    }
    let mut last = after.clone();
    last[2 << 20..14 << 20].fill(0x5a);
    let d0 = dir.path().join("d0.ctkd");
    let d1 = dir.path().join("d1.ctkd");
    let d2 = dir.path().join("d2.ctkd");
    write_delta(&d0, "vm1", None, &before, None, id(1), &mut rng);
    write_delta(
        &d1,
        "vm1",
        Some(&before),
        &after,
        Some(id(1)),
        id(2),
        &mut rng,
    );
    write_delta(
        &d2,
        "vm1",
        Some(&after),
        &last,
        Some(id(2)),
        id(3),
        &mut rng,
    );
    for d in [&d0, &d1, &d2] {
        ingest(s, "vm1", d);
    }
    let kept = points(s, "vm1");
    assert_eq!(kept.len(), 3);
    for (point, state) in kept.iter().zip([&before, &after, &last]) {
        let image = restored(s, "vm1", point, &dir.path().join("r.img"));
        assert!(image == *state, "point {point} restores wrong");
    }
}

/// Zero records: a long one (a trimmed file) becomes a hole, so the replica stays thin; a
/// short one is written as zeros (cheaper for ext4 than a hole punched per record). Both
/// read back as zeros, and the point before still restores.
#[test]
fn a_long_zero_range_becomes_a_hole_and_a_short_one_reads_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let size = 4usize << 20;
    let before: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
    let full = dir.path().join("full.ctkd");
    write_delta(&full, "vm1", None, &before, None, id(1), &mut Rng(7));
    let header = DeltaHeader {
        disk_id: "vm1".into(),
        disk_size: size as u64,
        block_size: BS as u32,
        from: Some(id(1)),
        to: id(2),
    };
    let (long_at, long_len) = (1usize << 20, 1usize << 20);
    let (short_at, short_len) = (3usize << 20, 16 * BS);
    let inc = dir.path().join("inc.ctkd");
    let mut w = DeltaWriter::new(
        std::io::BufWriter::new(std::fs::File::create(&inc).unwrap()),
        &header,
        WriteOptions::default(),
    )
    .unwrap();
    w.write_zero(long_at as u64, long_len as u64).unwrap();
    w.write_zero(short_at as u64, short_len as u64).unwrap();
    w.finish()
        .unwrap()
        .0
        .into_inner()
        .unwrap()
        .sync_all()
        .unwrap();
    let mut after = before.clone();
    after[long_at..long_at + long_len].fill(0);
    after[short_at..short_at + short_len].fill(0);

    for delta in [&full, &inc] {
        ingest(s, "vm1", delta);
    }
    let full_img = store.join("vm1/full.img");
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&full_img).unwrap()) * 512;
    assert!(
        allocated <= (size - long_len) as u64,
        "the long zero range is not a hole: {allocated} bytes allocated of {size}"
    );
    assert!(
        allocated >= (size - long_len) as u64 - BS as u64,
        "only the long zero range is a hole: {allocated} bytes allocated of {size}"
    );
    assert!(
        std::fs::read(&full_img).unwrap() == after,
        "the merged image differs"
    );
    let r = dir.path().join("r.img");
    assert!(
        restored(s, "vm1", &id(1).to_string(), &r) == before,
        "the point before restores wrong"
    );
    assert_eq!(ok(&["verify", "--store", s, "--json"])["ok"], true);
}

/// Detaches a loop device when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// The newest point of vm1 (`want`) restored onto a loop device over `backing`, larger than
/// the point and full of 0xEE: refused without --force; with it, the point in place and the
/// bytes past it untouched (the device is never resized).
fn restore_onto_a_block_device(s: &str, backing: &Path, want: &[u8]) {
    let tail = 1 << 20;
    std::fs::write(backing, vec![0xEE; want.len() + tail]).unwrap();
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(backing)
        .output()
        .unwrap();
    assert!(out.status.success(), "losetup (run as root): {out:?}");
    let dev = Loop(String::from_utf8(out.stdout).unwrap().trim().to_owned());
    let args = |force: bool| {
        let mut a = vec![
            "restore", "--store", s, "--disk", "vm1", "--point", "latest", "-o", &dev.0,
        ];
        if force {
            a.push("--force");
        }
        a
    };
    let refused = receiver(&args(false));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("only with --force"));
    ok(&args(true));
    let got = std::fs::read(backing).unwrap();
    assert_eq!(got.len(), want.len() + tail, "the device was resized");
    assert!(
        got[..want.len()] == *want,
        "the device does not hold the point"
    );
    assert!(
        got[want.len()..].iter().all(|&b| b == 0xEE),
        "bytes past the point changed"
    );
}
