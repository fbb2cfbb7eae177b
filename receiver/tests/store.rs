//! The receiver's store through the real `ctk-receiver` binary: chains of deltas merged and
//! every kept point restored byte for byte; bad input refused with nothing changed; and the
//! merge killed at every step and at random moments, never leaving a diverged replica.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ctk::delta::{DeltaHeader, DeltaWriter, WriteOptions};
use ctk::{ChangeId, Generation};

const BS: usize = 4096;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn id(seq: u64) -> ChangeId {
    ChangeId::new(Generation(0x5eed_cafe), seq)
}

/// A chain of disk states and the deltas between them (`deltas[0]` is the full).
struct Chain {
    states: Vec<Vec<u8>>,
    deltas: Vec<PathBuf>,
}

/// Writes the delta from `old` to `new`: every block that differs (zeros as zero records),
/// plus some that do not (an over-report the store must take in its stride).
fn write_delta(
    path: &Path,
    disk: &str,
    old: Option<&[u8]>,
    new: &[u8],
    from: Option<ChangeId>,
    to: ChangeId,
    rng: &mut Rng,
) {
    let header = DeltaHeader {
        disk_id: disk.into(),
        disk_size: new.len() as u64,
        block_size: BS as u32,
        from,
        to,
    };
    let file = std::fs::File::create(path).unwrap();
    let mut w = DeltaWriter::new(
        std::io::BufWriter::new(file),
        &header,
        WriteOptions::default(),
    )
    .unwrap();
    let blocks = new.len().div_ceil(BS);
    for b in 0..blocks {
        let range = b * BS..((b + 1) * BS).min(new.len());
        let differs = match old {
            None => true,
            Some(old) => old.get(range.clone()) != Some(&new[range.clone()]),
        };
        if differs || rng.next().is_multiple_of(50) {
            let data = &new[range.clone()];
            if data.iter().all(|&x| x == 0) {
                w.write_zero(range.start as u64, data.len() as u64).unwrap();
            } else {
                w.write_extent(range.start as u64, data).unwrap();
            }
        }
    }
    let (out, _) = w.finish().unwrap();
    out.into_inner().unwrap().sync_all().unwrap();
}

/// `n` states of a disk: random writes, zeroed ranges, one grow and one shrink.
fn chain(dir: &Path, disk: &str, n: usize, size: usize, seed: u64) -> Chain {
    let mut rng = Rng(seed);
    let mut state = vec![0u8; size];
    for b in state.chunks_mut(BS).step_by(3) {
        b.fill((rng.next() % 250) as u8 + 1);
    }
    let mut states = vec![state.clone()];
    let mut deltas = Vec::new();
    let full = dir.join(format!("{disk}-0.ctkd"));
    write_delta(&full, disk, None, &state, None, id(1), &mut rng);
    deltas.push(full);
    for k in 1..n {
        if k == n / 2 {
            state.resize(state.len() + 5 * BS + 100, 0x11);
        } else if k == n / 2 + 1 {
            let len = state.len() - 3 * BS - 700;
            state.truncate(len);
        }
        for _ in 0..20 {
            let len = BS * (1 + (rng.next() % 16) as usize);
            let at = (rng.next() as usize % (state.len() / BS)) * BS;
            let end = (at + len).min(state.len());
            let fill = if rng.next().is_multiple_of(5) {
                0
            } else {
                (rng.next() % 255) as u8 + 1
            };
            state[at..end].fill(fill);
        }
        let path = dir.join(format!("{disk}-{k}.ctkd"));
        let prev = states.last().unwrap().clone();
        write_delta(
            &path,
            disk,
            Some(&prev),
            &state,
            Some(id(k as u64)),
            id(k as u64 + 1),
            &mut rng,
        );
        states.push(state.clone());
        deltas.push(path);
    }
    Chain { states, deltas }
}

fn receiver(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ctk-receiver"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> serde_json::Value {
    let out = receiver(args);
    assert!(
        out.status.success(),
        "ctk-receiver {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With --json the last line is the answer; without, there is no JSON to return.
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("null")).unwrap_or(serde_json::Value::Null)
}

fn points(store: &str, disk: &str) -> Vec<String> {
    let v = ok(&["points", "--store", store, "--disk", disk, "--json"]);
    v[0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["change_id"].as_str().unwrap().to_string())
        .collect()
}

/// `ingest --json` of one delta, which must succeed.
fn ingest(store: &str, disk: &str, delta: &Path) -> serde_json::Value {
    ok(&[
        "ingest",
        "--store",
        store,
        "--disk",
        disk,
        "--json",
        delta.to_str().unwrap(),
    ])
}

fn restored(store: &str, disk: &str, point: &str, out: &Path) -> Vec<u8> {
    ok(&[
        "restore",
        "--store",
        store,
        "--disk",
        disk,
        "--point",
        point,
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    std::fs::read(out).unwrap()
}

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
        "no restore point",
    );
}

/// After a crash: the newest committed point is the one before the delta or the delta's
/// own, and it restores exactly; so does every other kept point.
fn check_consistent(s: &str, c: &Chain, dir: &Path, upto: usize) -> usize {
    // Opening the store (verify does) finishes or undoes the interrupted merge.
    ok(&["verify", "--store", s]);
    let kept = points(s, "vm1");
    let newest = kept.last().unwrap();
    let k = (0..c.states.len())
        .find(|&k| id(k as u64 + 1).to_string() == *newest)
        .unwrap();
    assert!(
        k == upto || k + 1 == upto,
        "newest point {k} after merging {upto}"
    );
    for point in &kept {
        let k = (0..c.states.len())
            .find(|&k| id(k as u64 + 1).to_string() == *point)
            .unwrap();
        let image = restored(s, "vm1", point, &dir.join("check.img"));
        assert!(image == c.states[k], "point {k} diverged after a crash");
    }
    k
}

#[test]
fn a_merge_killed_at_any_step_or_moment_leaves_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let c = chain(dir.path(), "vm1", 6, 8 << 20, 99);
    let mut trials = 0;
    // Every failpoint, on the full and on an increment.
    for failpoint in [
        "staged",
        "undo_written",
        "applying_recorded",
        "applied",
        "leaves_saved",
        "committed",
    ] {
        for target in [0usize, 3] {
            // A first full is written in place: it has no staging and no undo steps.
            if target == 0 && ["staged", "undo_written"].contains(&failpoint) {
                continue;
            }
            let store = dir.path().join(format!("fp-{failpoint}-{target}"));
            let s = store.to_str().unwrap();
            for delta in &c.deltas[..target] {
                ingest_keep3(s, delta);
            }
            let out = Command::new(env!("CARGO_BIN_EXE_ctk-receiver"))
                .args(["ingest", "--store", s, "--disk", "vm1", "--keep", "3"])
                .arg(&c.deltas[target])
                .env("CTK_FAILPOINT", failpoint)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{failpoint}: did not crash");
            trials += 1;
            if target == 0 && points_or_empty(s).is_empty() {
                // A first full that never committed: the store is empty and takes it again.
            } else {
                check_consistent(s, &c, dir.path(), target);
            }
            // The same delta again finishes the job (or is acknowledged), then the rest.
            for delta in &c.deltas[target..] {
                ingest_keep3(s, delta);
            }
            assert_eq!(
                check_consistent(s, &c, dir.path(), c.deltas.len() - 1),
                c.deltas.len() - 1
            );
        }
    }
    // SIGKILL at random moments while merging the whole chain, aimed inside the time an
    // uninterrupted merge takes (measured here, on this machine).
    let timing = dir.path().join("timing");
    let t = timing.to_str().unwrap();
    let started = std::time::Instant::now();
    ok(&[
        "ingest",
        "--store",
        t,
        "--disk",
        "vm1",
        c.deltas[0].to_str().unwrap(),
    ]);
    let window_us = (started.elapsed().as_micros() as u64 * 6 / 5).max(1000);
    let mut rng = Rng(0xdead_beef);
    let mut kills = 0;
    // Rounds until enough kills landed mid-merge (later deltas merge faster than the timed
    // full, so a round may see few): at least 4 rounds, and a cap.
    let want = trials_wanted(8);
    for round in 0..(want * 2 + 8) {
        if round >= 4 && kills >= want {
            break;
        }
        let store = dir.path().join(format!("random-{round}"));
        let s = store.to_str().unwrap();
        let mut next = 0;
        while next < c.deltas.len() {
            let mut child = Command::new(env!("CARGO_BIN_EXE_ctk-receiver"))
                .args(["ingest", "--store", s, "--disk", "vm1", "--keep", "3"])
                .arg(&c.deltas[next])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_micros(rng.next() % window_us));
            let _ = child.kill();
            let status = child.wait().unwrap();
            trials += 1;
            if !status.success() {
                kills += 1;
            }
            if points_or_empty(s).is_empty() {
                continue;
            }
            next = check_consistent(s, &c, dir.path(), next) + 1;
        }
    }
    eprintln!("{trials} crash trials ({kills} SIGKILLs landed mid-merge), no divergence");
    assert!(
        kills >= 8,
        "too few random kills landed mid-merge ({kills}): the test proves little"
    );
}

fn ingest_keep3(s: &str, delta: &Path) {
    ok(&[
        "ingest",
        "--store",
        s,
        "--disk",
        "vm1",
        "--keep",
        "3",
        delta.to_str().unwrap(),
    ]);
}

fn points_or_empty(s: &str) -> Vec<String> {
    // A kill before the disk's store existed leaves nothing to recover or list.
    if !Path::new(s).join("vm1").exists() {
        return Vec::new();
    }
    // Recovery first (verify opens the store), then the committed points.
    let v = receiver(&["verify", "--store", s]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let out = receiver(&["points", "--store", s, "--disk", "vm1", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["change_id"].as_str().unwrap().to_string())
        .collect()
}

/// The roll-back path: a merge crashed after it began overwriting the full, and its staged
/// copy is then found damaged (the media lied). The undo puts the newest committed point
/// back, exactly; the delta can then be sent again.
#[test]
fn an_interrupted_merge_with_a_damaged_staged_copy_is_rolled_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let c = chain(dir.path(), "vm1", 4, 4 << 20, 5);
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    for delta in &c.deltas[..2] {
        ok(&[
            "ingest",
            "--store",
            s,
            "--disk",
            "vm1",
            delta.to_str().unwrap(),
        ]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ctk-receiver"))
        .args(["ingest", "--store", s, "--disk", "vm1"])
        .arg(&c.deltas[2])
        .env("CTK_FAILPOINT", "applied")
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The full now holds point 2's data, but point 2 is not committed.
    assert!(std::fs::read(store.join("vm1/full.img")).unwrap() == c.states[2]);
    let staged = std::fs::read_dir(store.join("vm1/staging"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&staged).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&staged, &bytes).unwrap();
    let out = receiver(&["verify", "--store", s, "--disk", "vm1"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("undone"),
        "no warning of the roll-back"
    );
    assert_eq!(points(s, "vm1").last().unwrap(), &id(2).to_string());
    assert!(
        std::fs::read(store.join("vm1/full.img")).unwrap() == c.states[1],
        "roll-back inexact"
    );
    ok(&[
        "ingest",
        "--store",
        s,
        "--disk",
        "vm1",
        c.deltas[2].to_str().unwrap(),
    ]);
    assert!(restored(s, "vm1", "latest", &dir.path().join("r.img")) == c.states[2]);
}

/// A first full is written in place (no staged copy): interrupted after it was written but
/// before its commit, there is no undo and no committed point to protect. The partial image
/// is dropped, the store is empty again, and the full can be sent again.
#[test]
fn an_interrupted_first_full_leaves_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let c = chain(dir.path(), "vm1", 2, 2 << 20, 11);
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ctk-receiver"))
        .args(["ingest", "--store", s, "--disk", "vm1"])
        .arg(&c.deltas[0])
        .env("CTK_FAILPOINT", "applied")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        std::fs::metadata(store.join("vm1/full.img")).unwrap().len() > 0,
        "the crash came after the full was written"
    );
    let out = receiver(&["verify", "--store", s, "--disk", "vm1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(points(s, "vm1").is_empty());
    assert_eq!(
        std::fs::metadata(store.join("vm1/full.img")).unwrap().len(),
        0
    );
    for delta in &c.deltas {
        ok(&[
            "ingest",
            "--store",
            s,
            "--disk",
            "vm1",
            delta.to_str().unwrap(),
        ]);
    }
    assert!(restored(s, "vm1", "latest", &dir.path().join("r.img")) == c.states[1]);
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

/// Trials per run: `CTK_TRIALS` when set (the crash campaign, tests/campaign.sh), else the
/// default the normal test run uses.
fn trials_wanted(default: u64) -> u64 {
    std::env::var("CTK_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A manifest that does not read back as written (a bad read, or damage) is refused, never
/// used: a flipped digit of a ChangeId would otherwise be written back by the next merge as
/// the truth (found by the simulation's bad reads).
#[test]
fn a_manifest_changed_by_one_byte_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let c = chain(dir.path(), "vm1", 2, 1 << 20, 11);
    for d in &c.deltas {
        ok(&["ingest", "--store", s, "--disk", "vm1", d.to_str().unwrap()]);
    }
    let before = points(s, "vm1");
    let path = store.join("vm1/manifest.json");
    let good = std::fs::read(&path).unwrap();
    let text = String::from_utf8(good.clone()).unwrap();
    // The last digit of the newest point's sequence number, one up: still valid JSON, still
    // a well-formed ChangeId.
    let newest = before.last().unwrap();
    let at = text.rfind(newest.as_str()).unwrap() + newest.len() - 1;
    let mut bad = good.clone();
    bad[at] = if bad[at] == b'9' { b'0' } else { bad[at] + 1 };
    std::fs::write(&path, &bad).unwrap();
    for args in [
        vec!["verify", "--store", s, "--disk", "vm1"],
        vec![
            "ingest",
            "--store",
            s,
            "--disk",
            "vm1",
            c.deltas[1].to_str().unwrap(),
        ],
    ] {
        let out = receiver(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{args:?} used a changed manifest");
        assert!(err.contains("checksum"), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bad,
        "nothing was written over it"
    );
    std::fs::write(&path, &good).unwrap();
    assert_eq!(points(s, "vm1"), before);
}

#[test]
fn a_leaf_file_that_lies_is_not_trusted_to_check_pre_images() {
    // The leaf file's body has no checksum of its own: the leaves are checked against the
    // newest point's recorded digest before the undo's pre-images are checked against them.
    // Here every leaf reads as "zero block": trusted, the real pre-images would all be
    // refused (and a misdirected read of zeros accepted, which is how the simulation found
    // it, seed 81427); checked, the leaves are rebuilt from full.img and the merge goes on.
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let c = chain(dir.path(), "vm1", 3, 1 << 20, 23);
    for d in &c.deltas[..2] {
        ok(&["ingest", "--store", s, "--disk", "vm1", d.to_str().unwrap()]);
    }
    let leaves = store.join("vm1/leaves");
    let mut bytes = std::fs::read(&leaves).unwrap();
    assert!(
        bytes[64..].iter().any(|&b| b != 0),
        "a disk with data has non-zero leaves"
    );
    bytes[64..].fill(0);
    std::fs::write(&leaves, &bytes).unwrap();
    ok(&[
        "ingest",
        "--store",
        s,
        "--disk",
        "vm1",
        c.deltas[2].to_str().unwrap(),
    ]);
    let kept = points(s, "vm1");
    assert_eq!(kept.len(), 3);
    for (i, p) in kept.iter().enumerate() {
        let out = dir.path().join(format!("r{i}.img"));
        assert!(restored(s, "vm1", p, &out) == c.states[i], "point {p}");
    }
    ok(&["verify", "--store", s, "--disk", "vm1"]);
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
