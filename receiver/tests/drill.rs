//! `ctk-receiver drill`: a point served writable through a throwaway overlay while pushes
//! commit and retention runs; fio writes and verifies through it, the point's own bytes stay
//! the point's, the result is recorded on the point, and nothing of the drill stays behind.

mod common;

use std::path::Path;
use std::process::Command;

use common::chain::{chain, ok, points, restored};
use common::{run, start, tool};

const BIN: &str = env!("CARGO_BIN_EXE_ctk-receiver");

fn drill_start(
    store: &str,
    point: &str,
    sock: &Path,
    overlay: Option<&Path>,
) -> (common::Proc, serde_json::Value) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "drill", "start", "--store", store, "--disk", "vm1", "--point", point,
    ])
    .arg("--listen")
    .arg(format!("unix:{}", sock.display()))
    .arg("--json");
    if let Some(o) = overlay {
        cmd.arg("--overlay").arg(o);
    }
    let (p, line) = start(&mut cmd);
    (p, serde_json::from_str(&line).unwrap())
}

#[test]
fn a_drill_writes_through_its_overlay_while_pushes_commit_and_retention_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let size = 4 << 20;
    let c = chain(dir.path(), "vm1", 14, size, 11);
    for d in &c.deltas[..4] {
        common::chain::ingest(s, "vm1", d);
    }
    let ids = points(s, "vm1");
    let drilled = ids[1].clone();
    let want = &c.states[1];
    let sock = dir.path().join("drill.sock");
    let (mut proc, ready) = drill_start(s, &drilled, &sock, None);
    assert_eq!(ready["writable"], true);
    let uri = ready["uri"].as_str().unwrap().to_owned();
    // fio writes the first half through the overlay and verifies what it wrote, while ten
    // pushes commit with retention keeping three.
    let half = want.len() / 2;
    let fio = std::thread::spawn({
        let uri = uri.clone();
        move || {
            run(Command::new(tool("fio")).args([
                "--name=drill",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                &format!("--size={half}"),
                "--verify=crc32c",
                "--do_verify=1",
                "--loops=4",
            ]))
        }
    });
    let copy = dir.path().join("copy.img");
    let mut copies = 0;
    for d in &c.deltas[4..] {
        ok(&[
            "ingest",
            "--store",
            s,
            "--disk",
            "vm1",
            "--keep",
            "3",
            d.to_str().unwrap(),
        ]);
        // The half fio does not touch reads as the point, push after push.
        let (done, _, err) =
            run(Command::new(tool("nbdcopy")).args([uri.as_str(), copy.to_str().unwrap()]));
        assert!(done, "nbdcopy: {err}");
        let got = std::fs::read(&copy).unwrap();
        assert!(
            got[half..] == want[half..],
            "the drill saw other bytes after a push"
        );
        copies += 1;
    }
    let (fio_ok, out, err) = fio.join().unwrap();
    assert!(
        fio_ok && !out.contains("verify:"),
        "fio through the overlay: {out}{err}"
    );
    // The point itself was never written: restoring it gives its image.
    let r = restored(s, "vm1", &drilled, &dir.path().join("r.img"));
    assert!(r == *want, "the drill wrote into its point");
    let stopped = ok(&[
        "drill",
        "stop",
        "--store",
        s,
        "--disk",
        "vm1",
        "--result",
        "passed",
        "--note",
        "fio verified",
        "--json",
    ]);
    assert_eq!(stopped["tested"]["result"], "passed");
    assert!(
        proc.0.wait().unwrap().success(),
        "the drill ended cleanly on SIGTERM"
    );
    let disk_dir = store.join("vm1");
    for gone in ["drill.json", "expose.pin", "drill/overlay.img"] {
        assert!(!disk_dir.join(gone).exists(), "{gone} stayed behind");
    }
    assert!(!sock.exists());
    // The drilled point was pinned through ten pushes; `points` shows how it was tested.
    let listed = ok(&["points", "--store", s, "--disk", "vm1", "--json"]);
    let listed = listed[0]["points"].as_array().unwrap();
    assert_eq!(listed.len(), 4, "three by retention and the drilled one");
    let p = listed
        .iter()
        .find(|p| p["change_id"] == drilled.as_str())
        .expect("pinned");
    assert_eq!(p["tested"]["result"], "passed");
    assert_eq!(p["tested"]["note"], "fio verified");
    let (shown, out, err) = run(Command::new(BIN).args(["points", "--store", s, "--disk", "vm1"]));
    assert!(
        shown && out.contains("drill passed at ") && out.contains(": fio verified"),
        "{out}{err}"
    );
    ok(&["verify", "--store", s, "--disk", "vm1"]);
    for p in listed {
        let id = p["change_id"].as_str().unwrap();
        let k = ids_index(&c, id);
        let r = restored(s, "vm1", id, &dir.path().join("k.img"));
        assert!(r == c.states[k], "restore of {id}");
    }
    eprintln!("{copies} whole copies through the drill beside 10 pushes, each the point's");
}

/// The state index of a point of `chain` (its ChangeIds are seq 1..).
fn ids_index(_c: &common::chain::Chain, id: &str) -> usize {
    let seq: u64 = id.rsplit('/').next().unwrap().parse().unwrap();
    (seq - 1) as usize
}

#[test]
fn drills_refuse_what_they_cannot_do_and_leave_the_store_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let c = chain(dir.path(), "vm1", 3, 1 << 20, 5);
    for d in &c.deltas {
        common::chain::ingest(s, "vm1", d);
    }
    let newest = c.states.last().unwrap();
    let (ok_, _, err) = run(Command::new(BIN).args([
        "drill", "stop", "--store", s, "--disk", "vm1", "--result", "passed",
    ]));
    assert!(!ok_ && err.contains("no drill"), "{err}");
    let (ok_, _, err) = run(Command::new(BIN).args([
        "drill", "stop", "--store", s, "--disk", "vm1", "--result", "maybe",
    ]));
    assert!(!ok_ && err.contains("passed or failed"), "{err}");
    // An overlay path that exists is never taken over.
    let taken = dir.path().join("taken.img");
    std::fs::write(&taken, b"mine").unwrap();
    let sock = dir.path().join("d.sock");
    let (ok_, _, err) = run(Command::new(BIN)
        .args(["drill", "start", "--store", s, "--disk", "vm1", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--overlay")
        .arg(&taken));
    assert!(!ok_ && err.contains("overlay"), "{err}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"mine");
    // One drill or exposure per disk.
    let (_drill, ready) = drill_start(s, "latest", &sock, None);
    let other = dir.path().join("e.sock");
    let (ok_, _, err) = run(Command::new(BIN)
        .args(["expose", "--store", s, "--disk", "vm1", "--listen"])
        .arg(format!("unix:{}", other.display())));
    assert!(!ok_ && err.contains("already exposed"), "{err}");
    drop(_drill);
    // An overlay on a filesystem that fills up: the writes fail, the store does not notice.
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let (mounted, _, err) = run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&small));
    assert!(mounted, "mount tmpfs: {err}");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&small);
    let (drill, ready2) = drill_start(
        s,
        "latest",
        &dir.path().join("f.sock"),
        Some(&small.join("ov.img")),
    );
    let uri = ready2["uri"].as_str().unwrap();
    let (wrote, out, err) =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 7 0 1M", uri]));
    let said = format!("{out}{err}");
    assert!(
        !said.contains("wrote 1048576") && (!wrote || said.contains("failed")),
        "a 1 MiB write fit in 256 KiB: {said}"
    );
    drop(drill);
    let _ = ready;
    ok(&["verify", "--store", s, "--disk", "vm1"]);
    let ids = points(s, "vm1");
    let r = restored(s, "vm1", ids.last().unwrap(), &dir.path().join("r.img"));
    assert!(r == *newest, "the store changed under a drill");
}
