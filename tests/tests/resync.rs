//! Resync by digest compare, end to end with real processes over real QUIC on 127.0.0.1:
//! after the agent lost its journal, after a write the tracking never saw, and when seeding a
//! replica from an offline copy. Each time only the units that differ cross the link, and the
//! replica ends identical to the source.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

const SIZE: u64 = 64 << 20;
const UNIT: u64 = 64 << 10;

struct Setup {
    pair: Pair,
    image: PathBuf,
}

impl std::ops::Deref for Setup {
    type Target = Pair;
    fn deref(&self) -> &Pair {
        &self.pair
    }
}

/// A receiver, both identities, and a 64 MiB image of random bytes (not yet protected).
fn setup() -> Setup {
    let pair = Pair::new(50);
    let image = pair.d.join("vm1.img");
    random_image(&image, SIZE, 0xd15c);
    Setup { pair, image }
}

impl Setup {
    fn serve(&self) -> Proc {
        self.serve_disk(&self.image)
    }

    fn replicate(&self, extra: &[&str]) -> Value {
        let (ok, out, err) = run(&mut self.pair.replicate(extra));
        assert!(ok, "replicate failed: {err}");
        serde_json::from_str(&out).unwrap()
    }

    /// The newest point restored equals the image as it is now (nothing writes to it).
    fn assert_replica_equals_source(&self) {
        let listed = points(&self.receiver_bin, &self.store());
        let newest = listed[0]["points"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        assert_eq!(newest["digest_checked"], true, "{newest}");
        let id = newest["change_id"].as_str().unwrap();
        let restored = restore(
            &self.receiver_bin,
            &self.store(),
            "vm1",
            id,
            &self.d.join("r.img"),
        );
        assert!(
            restored == std::fs::read(&self.image).unwrap(),
            "the replica differs from the source"
        );
    }
}

/// Overwrites `units` random whole units of `image` (outside the agent: nothing tracks it)
/// with random bytes; returns how many bytes changed.
fn scribble(image: &Path, units: usize, seed: u64) -> u64 {
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    let mut rng = Rng(seed);
    let mut chosen = std::collections::BTreeSet::new();
    while chosen.len() < units {
        chosen.insert(rng.next() % (SIZE / UNIT));
    }
    for u in &chosen {
        let data: Vec<u8> = (0..UNIT / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        f.write_all_at(&data, u * UNIT).unwrap();
    }
    f.sync_all().unwrap();
    chosen.len() as u64 * UNIT
}

fn stop(mut p: Proc) {
    // SAFETY: kill with a pid we spawned and still own; SIGTERM closes the journal cleanly.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    p.0.wait().unwrap();
}

/// Writes through the agent's NBD front (tracked), then replicates; returns the answer and
/// records the source as of that cut.
fn write_and_replicate(s: &Setup, seed: u64, sources: &mut Vec<(String, u32)>) -> Value {
    let uri = format!("nbd+unix:///vm1?socket={}", s.d.join("nbd.sock").display());
    let mut rng = Rng(seed);
    let mut cmd = Command::new(tool("qemu-io"));
    cmd.args(["-f", "raw", &uri]);
    for _ in 0..8 {
        let off = 4096 * (rng.next() % (SIZE / 4096 - 16));
        cmd.arg("-c")
            .arg(format!("write -P {} {off} 64k", rng.next() % 255 + 1));
    }
    let (ok, _, err) = run(&mut cmd);
    assert!(ok, "qemu-io: {err}");
    let answer = s.replicate(&[]);
    let id = answer["committed"].as_str().unwrap().to_owned();
    sources.push((id, crc(&std::fs::read(&s.image).unwrap())));
    answer
}

#[test]
fn after_the_agent_lost_its_journal_a_resync_sends_about_what_changed() {
    let s = setup();
    let agent = s.serve();
    let full = s.replicate(&[]);
    assert_eq!(full["resync"], false);
    assert!(
        full["delta_bytes"].as_u64().unwrap() > SIZE * 9 / 10,
        "{full}"
    );
    let mut sources = vec![(
        full["committed"].as_str().unwrap().to_owned(),
        crc(&std::fs::read(&s.image).unwrap()),
    )];
    // Increments before the loss: sequence numbers the new journal will use again.
    for seed in 1..=3 {
        write_and_replicate(&s, seed, &mut sources);
    }
    let before = sources.last().unwrap().0.clone();
    stop(agent);
    // The journal is lost, and 1% of the disk changes while nothing tracks it.
    let journal = PathBuf::from(format!("{}.ctk", s.image.display()));
    assert!(
        journal.exists(),
        "the journal is not where the test expects"
    );
    std::fs::remove_file(&journal).unwrap();
    let changed = scribble(&s.image, (SIZE / UNIT / 100) as usize, 7);
    let _agent = s.serve();
    let resynced = s.replicate(&[]);
    eprintln!("resync after journal loss: {resynced}");
    assert_eq!(resynced["resync"], true, "{resynced}");
    assert_eq!(resynced["from"], before, "{resynced}");
    sources.push((
        resynced["committed"].as_str().unwrap().to_owned(),
        crc(&std::fs::read(&s.image).unwrap()),
    ));
    // Only the units that differ: the changed data plus the delta's framing.
    assert_eq!(resynced["changed_bytes"], changed, "{resynced}");
    let sent = resynced["delta_bytes"].as_u64().unwrap();
    assert!(
        sent >= changed && sent < changed + changed / 20,
        "sent {sent} for {changed} changed"
    );
    s.assert_replica_equals_source();
    // And increments again from there, in the new generation.
    let next = write_and_replicate(&s, 10, &mut sources);
    assert_eq!(next["resync"], false, "{next}");
    assert_eq!(next["from"], resynced["committed"], "{next}");
    for seed in 11..=12 {
        write_and_replicate(&s, seed, &mut sources);
    }
    // Every point of both generations still restores to the source as of its cut.
    for (id, expected) in &sources {
        let image = restore(&s.receiver_bin, &s.store(), "vm1", id, &s.d.join("r.img"));
        assert_eq!(
            crc(&image),
            *expected,
            "point {id} does not restore to its source"
        );
    }
}

#[test]
fn a_write_the_tracking_missed_is_found_and_repaired_by_resync() {
    let s = setup();
    let _agent = s.serve();
    s.replicate(&[]);
    // A write behind the agent's back: a tracking miss, as a bug would make one.
    let missed = scribble(&s.image, 3, 11);
    let blind = s.replicate(&[]);
    // The end-to-end digest cannot see it (the agent builds it from what it exports)...
    assert_eq!(blind["changed_bytes"], 0, "{blind}");
    let listed = points(&s.receiver_bin, &s.store());
    let newest = listed[0]["points"].as_array().unwrap().last().unwrap();
    assert_eq!(newest["digest_checked"], true);
    let id = newest["change_id"].as_str().unwrap().to_owned();
    let restored = restore(&s.receiver_bin, &s.store(), "vm1", &id, &s.d.join("r.img"));
    assert!(restored != std::fs::read(&s.image).unwrap());
    // ...a resync does, and sends just those units.
    let repaired = s.replicate(&["--resync"]);
    eprintln!("resync after a tracking miss: {repaired}");
    assert_eq!(repaired["resync"], true);
    assert_eq!(repaired["changed_bytes"], missed, "{repaired}");
    s.assert_replica_equals_source();
}

#[test]
fn a_replica_seeded_from_an_offline_copy_gets_only_the_difference() {
    let s = setup();
    // The copy shipped offsite, adopted by the receiver; the source moves on meanwhile.
    let offline = s.d.join("shipped.img");
    std::fs::copy(&s.image, &offline).unwrap();
    let (ok, out, err) = run(Command::new(&s.receiver_bin)
        .args(["adopt", "--disk", "vm1", "--json", "--store"])
        .arg(s.store())
        .arg("--image")
        .arg(&offline));
    assert!(ok, "adopt: {err}");
    let adopted: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(adopted["digest_checked"], true, "{adopted}");
    // A second adopt onto a store with points is refused.
    let (ok, _, err) = run(Command::new(&s.receiver_bin)
        .args(["adopt", "--disk", "vm1", "--store"])
        .arg(s.store())
        .arg("--image")
        .arg(&offline));
    assert!(!ok && err.contains("already has points"), "{err}");
    let changed = scribble(&s.image, 20, 13);
    let _agent = s.serve();
    let first = s.replicate(&[]);
    eprintln!("first replication onto an adopted copy: {first}");
    assert_eq!(first["resync"], true);
    assert_eq!(first["from"], adopted["point"]);
    assert_eq!(first["changed_bytes"], changed, "{first}");
    assert!(first["delta_bytes"].as_u64().unwrap() < changed + changed / 20);
    s.assert_replica_equals_source();
    // A unit the receiver cannot use is refused before anything is sent.
    let (ok, _, err) = run(Command::new(&s.agent_bin)
        .args(["replicate", "--resync-unit", "1000", "--identity"])
        .arg(s.d.join("aid"))
        .arg("--receiver")
        .arg(s.addr.to_string())
        .arg("--receiver-fingerprint")
        .arg(&s.rfp)
        .arg("--control")
        .arg(s.d.join("ctl.sock")));
    assert!(!ok && err.contains("--resync-unit"), "{err}");
}
