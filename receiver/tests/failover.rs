//! `ctk-receiver failover`: the fence (ingests refused, nothing committed), the tracked overlay
//! (every acknowledged write there after SIGKILLs of the receiver, the change set covering
//! every block written, the point's bytes everywhere else), `status`, `rollback`, and the
//! refusals around them.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::chain::{chain, ok, points, restored};
use common::nbd::{Client, Failed};
use common::{Proc, Rng, run, start};

const BIN: &str = env!("CARGO_BIN_EXE_ctk-receiver");

fn failover_start(store: &str, point: Option<&str>, sock: &Path) -> (Proc, serde_json::Value) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "failover", "start", "--store", store, "--disk", "vm1", "--json",
    ])
    .arg("--listen")
    .arg(format!("unix:{}", sock.display()));
    if let Some(p) = point {
        cmd.args(["--point", p]);
    }
    let (p, line) = start(&mut cmd);
    (p, serde_json::from_str(&line).unwrap())
}

fn kill9(p: &mut Proc) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGKILL) };
    let _ = p.0.wait();
}

/// The writes a client got acknowledged, applied to a model of the disk, and the one in
/// flight when the connection broke (its bytes may be old or new).
struct Acked {
    model: Vec<u8>,
    blocks: std::collections::BTreeSet<u64>,
    in_flight: Option<(u64, u64)>,
    count: u64,
}

/// How far the writers write: the regions past it stay the point's.
const WRITTEN_END: u64 = 6 << 20;

/// Writes until the connection breaks: random 512-byte-aligned writes below `WRITTEN_END`
/// (partial 4 KiB blocks, partial and whole regions), zeroing, FUA and FLUSH.
fn write_until_broken(sock: &Path, seed: u64, acked: &Mutex<Acked>) {
    let mut c = Client::connect(sock, "vm1").unwrap();
    let mut rng = Rng(seed);
    loop {
        let len = 512 * (1 + rng.next() % 256);
        let off = 512 * (rng.next() % ((WRITTEN_END - len) / 512));
        let kind = rng.next() % 10;
        let fill = (rng.next() % 255) as u8 + 1;
        acked.lock().unwrap().in_flight = Some((off, len));
        let result = match kind {
            0 => c.zero(off, len as u32),
            1 => c.flush(),
            _ => {
                let data: Vec<u8> = (0..len).map(|i| fill ^ (i as u8)).collect();
                c.write(off, &data, kind == 2)
            }
        };
        match result {
            Ok(()) => {
                let mut a = acked.lock().unwrap();
                a.in_flight = None;
                a.count += 1;
                if kind == 1 {
                    continue;
                }
                for i in off..off + len {
                    a.model[i as usize] = if kind == 0 {
                        0
                    } else {
                        fill ^ ((i - off) as u8)
                    };
                }
                a.blocks.extend(off / 4096..=(off + len - 1) / 4096);
            }
            Err(Failed::Errno(e)) => panic!("write at {off} (+{len}) failed: errno {e}"),
            Err(Failed::Io(_)) => return,
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn every_acknowledged_write_survives_sigkills_of_the_failover() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    // Eight regions of 1 MiB and a tail; the failover is of an older point, read through
    // its undo, so copy-ups come from the chain, not full.img alone.
    let c = chain(dir.path(), "vm1", 4, (8 << 20) + 12288, 31);
    for d in &c.deltas {
        common::chain::ingest(s, "vm1", d);
    }
    let ids = points(s, "vm1");
    // The chain grows and shrinks the disk in its middle: the point's own state is the model.
    let point = ids[1].clone();
    let acked = Arc::new(Mutex::new(Acked {
        model: c.states[1].clone(),
        blocks: Default::default(),
        in_flight: None,
        count: 0,
    }));
    let sock = dir.path().join("f.sock");
    let mut rng = Rng(77);
    const TRIALS: u64 = 10;
    for trial in 0..TRIALS {
        let (mut p, ready) = failover_start(s, Some(&point), &sock);
        assert_eq!(ready["mode"], "failover");
        assert_eq!(ready["point"], point.as_str());
        // What the last trial's killed writer left: every acknowledged byte, the point's
        // bytes everywhere nothing was written (the copy-ups), whatever in the one write
        // in flight.
        let got = Client::connect(&sock, "vm1").unwrap().read_all().unwrap();
        {
            let mut a = acked.lock().unwrap();
            let mut want = a.model.clone();
            if let Some((off, len)) = a.in_flight.take() {
                let r = off as usize..(off + len) as usize;
                want[r.clone()].copy_from_slice(&got[r]);
            }
            assert!(
                got == want,
                "trial {trial}: the disk differs from what was acknowledged"
            );
            a.model = got.clone();
        }
        let writer = std::thread::spawn({
            let (sock, acked) = (sock.clone(), acked.clone());
            move || write_until_broken(&sock, 1000 + trial, &acked)
        });
        std::thread::sleep(Duration::from_millis(30 + rng.next() % 300));
        kill9(&mut p);
        writer.join().unwrap();
    }
    // A clean stop, then the change set: every block written is in it.
    let (mut p, _) = failover_start(s, None, &sock);
    let got = Client::connect(&sock, "vm1").unwrap().read_all().unwrap();
    let a = acked.lock().unwrap();
    let mut want = a.model.clone();
    if let Some((off, len)) = a.in_flight {
        let r = off as usize..(off + len) as usize;
        want[r.clone()].copy_from_slice(&got[r]);
    }
    assert!(got == want, "after the last kill");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    assert!(p.0.wait().unwrap().success());
    let status = ok(&[
        "failover", "status", "--store", s, "--disk", "vm1", "--json",
    ]);
    assert_eq!(status[0]["failed_over"], true);
    assert_eq!(status[0]["served"], false);
    let (t, outcome) = ctk_receiver::export::Tracked::open(
        &store.join("vm1").join("failover"),
        want.len() as u64,
        &point,
    )
    .unwrap();
    assert_eq!(outcome, ctk::OpenOutcome::Clean, "stopped cleanly");
    let changed = t.changed_blocks().unwrap();
    let missing: Vec<_> = a
        .blocks
        .iter()
        .filter(|&&b| !changed.contains(b as u32))
        .collect();
    assert!(
        missing.is_empty(),
        "blocks written but not in the change set: {missing:?}"
    );
    // Exact to the region at worst: nothing past the regions written, which read as the
    // point's.
    assert!(
        changed
            .max()
            .is_some_and(|m| u64::from(m) < WRITTEN_END / 4096),
        "the change set reaches past the regions written"
    );
    assert!(got[WRITTEN_END as usize..] == c.states[1][WRITTEN_END as usize..]);
    assert_eq!(status[0]["changed_blocks"], changed.len());
    // The point itself was never written.
    let r = restored(s, "vm1", &point, &dir.path().join("r.img"));
    assert!(r == c.states[1], "the failover wrote into its point");
    eprintln!(
        "{TRIALS} SIGKILLs of the failover under writes: {} acknowledged requests, none lost; \
         {} blocks written, {} in the change set",
        a.count,
        a.blocks.len(),
        changed.len()
    );
}

#[test]
fn a_failed_over_disk_refuses_merges_drills_and_a_second_point() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let c = chain(dir.path(), "vm1", 4, 2 << 20, 8);
    for d in &c.deltas[..3] {
        common::chain::ingest(s, "vm1", d);
    }
    let before = points(s, "vm1");
    let sock = dir.path().join("f.sock");
    let (mut p, ready) = failover_start(s, None, &sock);
    assert_eq!(ready["point"], before[2].as_str(), "the newest by default");
    // A merge is refused, naming the failover and what to look at; nothing is committed.
    let (merged, _, err) = run(Command::new(BIN)
        .args(["ingest", "--store", s, "--disk", "vm1"])
        .arg(&c.deltas[3]));
    assert!(
        !merged && err.contains("failed over") && err.contains("failover status"),
        "{err}"
    );
    assert_eq!(points(s, "vm1"), before);
    // Served: no other exposure, no drill, no rollback.
    let other = dir.path().join("o.sock");
    for args in [
        &["expose", "--store", s, "--disk", "vm1", "--listen"][..],
        &["drill", "start", "--store", s, "--disk", "vm1", "--listen"][..],
    ] {
        let (done, _, err) = run(Command::new(BIN)
            .args(args)
            .arg(format!("unix:{}", other.display())));
        assert!(!done && err.contains("already exposed"), "{args:?}: {err}");
    }
    let (done, _, err) = run(Command::new(BIN).args([
        "failover",
        "rollback",
        "--store",
        s,
        "--disk",
        "vm1",
        "--discard-writes",
    ]));
    assert!(!done && err.contains("being served"), "{err}");
    let (shown, out, _) = run(Command::new(BIN).args(["failover", "status", "--store", s]));
    assert!(
        shown && out.contains("FAILED OVER at") && out.contains("served by process"),
        "{out}"
    );
    let (shown, out, _) = run(Command::new(BIN).args(["points", "--store", s, "--disk", "vm1"]));
    assert!(shown && out.contains("FAILED OVER at"), "{out}");
    // The VM writes; then it stops.
    Client::connect(&sock, "vm1")
        .unwrap()
        .write(4096, &[7u8; 8192], true)
        .unwrap();
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    assert!(p.0.wait().unwrap().success());
    // Not served now: a drill is still refused (the disk is the VM's), another point too.
    let (done, _, err) = run(Command::new(BIN)
        .args(["drill", "start", "--store", s, "--disk", "vm1", "--listen"])
        .arg(format!("unix:{}", other.display())));
    assert!(!done && err.contains("failed over"), "{err}");
    let (done, _, err) = run(Command::new(BIN)
        .args([
            "failover", "start", "--store", s, "--disk", "vm1", "--point",
        ])
        .arg(&before[0])
        .arg("--listen")
        .arg(format!("unix:{}", other.display())));
    assert!(!done && err.contains("already failed over"), "{err}");
    let status = ok(&[
        "failover", "status", "--store", s, "--disk", "vm1", "--json",
    ]);
    assert_eq!(status[0]["changed_blocks"], 2);
    assert_eq!(status[0]["served"], false);
    // Rolling back what the VM wrote needs saying so.
    let (done, _, err) =
        run(Command::new(BIN).args(["failover", "rollback", "--store", s, "--disk", "vm1"]));
    assert!(
        !done && err.contains("--discard-writes") && err.contains("2 blocks"),
        "{err}"
    );
    let done = ok(&[
        "failover",
        "rollback",
        "--store",
        s,
        "--disk",
        "vm1",
        "--discard-writes",
        "--json",
    ]);
    assert_eq!(done["discarded_blocks"], 2);
    assert!(!store.join("vm1").join("failover").exists());
    // Merges commit again, onto the point as it was (the overlay never touched the store).
    common::chain::ingest(s, "vm1", &c.deltas[3]);
    ok(&["verify", "--store", s, "--disk", "vm1"]);
    let r = restored(s, "vm1", "latest", &dir.path().join("r.img"));
    assert!(r == c.states[3]);
    let (done, _, err) =
        run(Command::new(BIN).args(["failover", "rollback", "--store", s, "--disk", "vm1"]));
    assert!(!done && err.contains("not failed over"), "{err}");
}

/// `--materialize`: the point copied into a standalone image while the VM writes, SIGKILLed
/// part way and taken up again; at the end the image alone is the disk, and the change set
/// is only what the VM wrote.
#[test]
fn a_materialized_failover_ends_as_a_standalone_image_of_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let c = chain(dir.path(), "vm1", 3, 64 << 20, 41);
    for d in &c.deltas {
        common::chain::ingest(s, "vm1", d);
    }
    let point = points(s, "vm1")[1].clone();
    let mut model = c.states[1].clone();
    let image = dir.path().join("vm1-dr.img");
    let sock = dir.path().join("m.sock");
    let materialize = |p: &str| {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "failover", "start", "--store", s, "--disk", "vm1", "--json", "--point", p,
        ])
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--materialize")
        .arg(&image)
        .args(["--materialize-rate", "40M"]);
        start(&mut cmd).0
    };
    let mut written = std::collections::BTreeSet::new();
    let mut rng = Rng(5);
    let mut write = |c: &mut Client, model: &mut Vec<u8>| {
        let block = rng.next() % (model.len() as u64 / 4096);
        let fill = (rng.next() % 250) as u8 + 1;
        c.write(block * 4096, &[fill; 4096], false).unwrap();
        model[block as usize * 4096..(block as usize + 1) * 4096].fill(fill);
        written.insert(block);
    };
    let mut p = materialize(&point);
    {
        let mut client = Client::connect(&sock, "vm1").unwrap();
        for _ in 0..20 {
            write(&mut client, &mut model);
        }
        client.flush().unwrap();
    }
    // 65 MiB at 40 MiB/s: killed part way.
    std::thread::sleep(Duration::from_millis(300 + Rng(9).next() % 300));
    kill9(&mut p);
    let at_kill =
        std::fs::read_to_string(store.join("vm1/failover/materialized")).unwrap_or_default();
    // Taken up again: the same image, the watermark where it was.
    let mut p = materialize(&point);
    let mut client = Client::connect(&sock, "vm1").unwrap();
    for _ in 0..20 {
        write(&mut client, &mut model);
    }
    client.flush().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = ok(&[
            "failover", "status", "--store", s, "--disk", "vm1", "--json",
        ]);
        if st[0]["materialized_percent"].as_f64() == Some(100.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not materialized: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        client.read_all().unwrap() == model,
        "the export while materialized"
    );
    drop(client);
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    assert!(p.0.wait().unwrap().success());
    // The image alone is the disk: the point's bytes and the VM's writes.
    assert!(
        std::fs::read(&image).unwrap() == model,
        "the materialized image"
    );
    let (t, _) = ctk_receiver::export::Tracked::open(
        &store.join("vm1").join("failover"),
        model.len() as u64,
        &point,
    )
    .unwrap();
    check_change_set(&t.changed_blocks().unwrap(), &written);
    drop(t);
    let (shown, out, _) = run(Command::new(BIN).args(["failover", "status", "--store", s]));
    assert!(
        shown && out.contains("is a standalone image of the disk"),
        "{out}"
    );
    // Rolled back, the image goes with the overlay.
    ok(&[
        "failover",
        "rollback",
        "--store",
        s,
        "--disk",
        "vm1",
        "--discard-writes",
    ]);
    assert!(!image.exists());
    eprintln!(
        "materialization SIGKILLed at watermark {:?}, then finished",
        at_kill.trim()
    );
}

/// `--materialize` onto a filesystem that fills up: the VM's writes that need room fail with
/// ENOSPC, the export stays up and readable, the store is untouched, and rollback cleans up.
#[test]
fn a_materialized_image_on_a_full_filesystem_fails_writes_not_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let c = chain(dir.path(), "vm1", 2, 8 << 20, 12);
    for d in &c.deltas {
        common::chain::ingest(s, "vm1", d);
    }
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let (mounted, _, err) = run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&small));
    assert!(mounted, "mount tmpfs: {err}");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(small.clone());
    let sock = dir.path().join("f.sock");
    let (mut p, _) = start(
        Command::new(BIN)
            .args([
                "failover", "start", "--store", s, "--disk", "vm1", "--json", "--listen",
            ])
            .arg(format!("unix:{}", sock.display()))
            .arg("--materialize")
            .arg(small.join("vm1.img")),
    );
    let mut client = Client::connect(&sock, "vm1").unwrap();
    let mut refused = 0;
    for region in 0..8u64 {
        match client.write((region << 20) + 4096, &[9u8; 4096], false) {
            Ok(()) => {}
            Err(Failed::Errno(e)) => {
                assert_eq!(e, 28, "ENOSPC");
                refused += 1;
            }
            Err(Failed::Io(e)) => panic!("the export went away: {e}"),
        }
    }
    assert!(refused > 0, "a 2 MiB filesystem took 8 regions");
    let mut buf = vec![0u8; 4096];
    client.read(7 << 20, &mut buf).unwrap();
    drop(client);
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    assert!(p.0.wait().unwrap().success());
    ok(&["verify", "--store", s, "--disk", "vm1"]);
    let r = restored(s, "vm1", "latest", &dir.path().join("r.img"));
    assert!(r == c.states[1], "the store was touched");
    ok(&[
        "failover",
        "rollback",
        "--store",
        s,
        "--disk",
        "vm1",
        "--discard-writes",
    ]);
    assert!(!small.join("vm1.img").exists());
}

/// Every block written is in the change set; past those, only the rest of a region written
/// before a SIGKILL (a crash leaves it exact to the region); nothing materialized.
fn check_change_set(changed: &roaring::RoaringBitmap, written: &std::collections::BTreeSet<u64>) {
    let regions: std::collections::BTreeSet<u64> = written.iter().map(|b| b / 256).collect();
    assert!(
        written.iter().all(|&b| changed.contains(b as u32)),
        "a written block missing"
    );
    let extra: Vec<u32> = changed
        .iter()
        .filter(|&b| !regions.contains(&(u64::from(b) / 256)))
        .collect();
    assert!(
        extra.is_empty(),
        "blocks in the change set the VM never came near: {extra:?}"
    );
    assert!(changed.len() <= 256 * regions.len() as u64);
}

/// What an earlier overlay left is never read as this one's: a stale `disk.img` and a
/// watermark with no journal (a rollback cut short) are reset; a watermark whose CRC does
/// not match counts for nothing; a journal whose image is gone is refused, not read as zeros;
/// and an overlay that cannot be read is still rolled back with --discard-writes.
#[test]
fn leftovers_of_an_earlier_overlay_are_never_read_as_this_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let c = chain(dir.path(), "vm1", 2, 4 << 20, 21);
    for d in &c.deltas {
        common::chain::ingest(s, "vm1", d);
    }
    let want = c.states[1].clone();
    let fo = store.join("vm1").join("failover");
    std::fs::create_dir_all(&fo).unwrap();
    std::fs::write(fo.join("disk.img"), vec![0xeeu8; want.len()]).unwrap();
    // A well-formed watermark claiming all 4 regions: if it counted, 0xee would be read.
    let valid = format!("4 {:08x}\n", crc32fast::hash(b"4"));
    std::fs::write(fo.join("materialized"), &valid).unwrap();
    let sock = dir.path().join("l.sock");
    let (mut p, _) = failover_start(s, None, &sock);
    let mut client = Client::connect(&sock, "vm1").unwrap();
    // A write into region 1 copies it up; the rest of it must be the point's, not 0xee.
    client.write((1 << 20) + 512, &[7u8; 512], true).unwrap();
    let mut model = want.clone();
    model[(1 << 20) + 512..(1 << 20) + 1024].fill(7);
    assert!(
        client.read_all().unwrap() == model,
        "an earlier overlay's bytes were read"
    );
    drop(client);
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    assert!(p.0.wait().unwrap().success());
    // A bad watermark (CRC) claiming every region: ignored.
    std::fs::write(fo.join("materialized"), "4 12345678\n").unwrap();
    let (mut p, _) = failover_start(s, None, &sock);
    assert!(Client::connect(&sock, "vm1").unwrap().read_all().unwrap() == model);
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    assert!(p.0.wait().unwrap().success());
    // The image gone under its journal: refused with what to do.
    std::fs::remove_file(fo.join("disk.img")).unwrap();
    let (done, _, err) = run(Command::new(BIN)
        .args([
            "failover", "start", "--store", s, "--disk", "vm1", "--listen",
        ])
        .arg(format!("unix:{}", sock.display())));
    assert!(!done && err.contains("image is missing"), "{err}");
    // Unreadable, it still rolls back when told to throw it away, and only then.
    let (done, _, err) =
        run(Command::new(BIN).args(["failover", "rollback", "--store", s, "--disk", "vm1"]));
    assert!(!done && err.contains("--discard-writes"), "{err}");
    ok(&[
        "failover",
        "rollback",
        "--store",
        s,
        "--disk",
        "vm1",
        "--discard-writes",
    ]);
    assert!(!fo.exists());
    assert_eq!(points(s, "vm1").len(), 2);
}
