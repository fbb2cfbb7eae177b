//! Consistency groups end to end: `ctk-agent replicate --group` of two disks while a writer
//! puts number i on disk A, then on disk B, each write only after the one before was
//! acknowledged. Every group point the receiver records must restore (`restore --group`) to
//! images of one instant: B's number <= A's <= B's + 1. The receiver is SIGKILLed in the
//! middle of group pushes: no partial group point is ever recorded, and every recorded one
//! still restores in write order. Group commits that name points the receiver does not have
//! are refused.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Pair, Proc, random_image, raw_call, run, start};
use ctk_agent::nbd_client::NbdClient;

const MIB: u64 = 1 << 20;

/// The agent protecting `a` and `b` of `pair`'s directory as group `g`.
fn serve_group(pair: &Pair) -> Proc {
    let d = &pair.d;
    for (name, seed) in [("a", 1), ("b", 2)] {
        random_image(&d.join(format!("{name}.img")), 8 * MIB, seed);
    }
    let mut cmd = Command::new(&pair.agent_bin);
    cmd.arg("serve")
        .arg("--disk")
        .arg(format!("a={}", d.join("a.img").display()))
        .arg("--disk")
        .arg(format!("b={}", d.join("b.img").display()))
        .args(["--group", "g=a,b"])
        .arg("--listen")
        .arg(format!("unix:{}", d.join("nbd.sock").display()))
        .arg("--control")
        .arg(d.join("ctl.sock"));
    start(&mut cmd).0
}

/// Writes number i to A, then to B (at offset 0, and 64 KiB of data elsewhere), i = 1, 2,
/// ..., each write after the last was acknowledged, until `stop`.
fn writer(sock: &Path, stop: &AtomicBool, written: &AtomicU64) {
    let mut a = NbdClient::connect(sock, "a").unwrap();
    let mut b = NbdClient::connect(sock, "b").unwrap();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let mut block = vec![(i % 251) as u8; 65536];
        block[..8].copy_from_slice(&i.to_le_bytes());
        let spot = MIB + (i * 65536) % (6 * MIB);
        for disk in [&mut a, &mut b] {
            // The agent may be gone at the end of a test: stop quietly then.
            if disk.write(spot, &block).is_err() || disk.write(0, &block[..4096]).is_err() {
                return;
            }
        }
        written.store(i, Ordering::Relaxed);
    }
}

/// Sets the flag when dropped, so a failing test stops its writer.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn number(image: &Path) -> u64 {
    let bytes = std::fs::read(image).unwrap();
    u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

/// The group points of `g` the receiver lists (empty when it has none).
fn group_points(pair: &Pair) -> Vec<serde_json::Value> {
    let (ok, out, _) = run(Command::new(&pair.receiver_bin).args([
        "points",
        "--store",
        pair.store().to_str().unwrap(),
        "--group",
        "g",
        "--json",
    ]));
    if !ok {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["points"].as_array().unwrap().clone()
}

/// `ctk-receiver restore --group g --point POINT -o OUT` (with `--json`): (ok, stdout,
/// stderr).
fn restore_group(pair: &Pair, point: &str, out: &Path) -> (bool, String, String) {
    run(Command::new(&pair.receiver_bin).args([
        "restore",
        "--store",
        pair.store().to_str().unwrap(),
        "--group",
        "g",
        "--point",
        point,
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]))
}

/// Restores group point `cut` into `out` and checks write order across its images; the
/// numbers A and B hold.
fn restore_checked(pair: &Pair, cut: &str, out: &Path) -> (u64, u64) {
    let _ = std::fs::remove_dir_all(out);
    let (ok, stdout, err) = restore_group(pair, cut, out);
    assert!(ok, "restore --group {cut}: {err}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for m in answer["members"].as_array().unwrap() {
        assert_eq!(m["digest_verified"], true, "{m}");
    }
    let (na, nb) = (number(&out.join("a.img")), number(&out.join("b.img")));
    assert!(
        nb <= na && na <= nb + 1,
        "group point {cut}: A holds {na}, B holds {nb}: not one instant"
    );
    (na, nb)
}

#[test]
fn group_points_restore_every_member_as_of_one_instant() {
    let pair = Pair::new(50);
    let _agent = serve_group(&pair);
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let sock = pair.d.join("nbd.sock");
    let reports = std::thread::scope(|s| {
        s.spawn(|| writer(&sock, &stop, &written));
        let _stop = Stop(&stop);
        while written.load(Ordering::Relaxed) < 20 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut reports = Vec::new();
        for _ in 0..6 {
            let (ok, out, err) = run(&mut pair.replicate(&["--group", "g"]));
            assert!(ok, "replicate --group: {err}");
            reports.push(serde_json::from_str::<serde_json::Value>(&out).unwrap());
        }
        reports
    });
    let first = &reports[0];
    assert_eq!(first["members"].as_array().unwrap().len(), 2, "{first}");
    let points = group_points(&pair);
    assert_eq!(
        points.len(),
        reports.len(),
        "one group point per group push"
    );
    let mut seen = std::collections::BTreeSet::new();
    for (report, point) in reports.iter().zip(&points) {
        assert_eq!(report["group_cut"], point["group_cut"]);
        // Each member's point is the one its push committed.
        for m in report["members"].as_array().unwrap() {
            let disk = m["disk"].as_str().unwrap();
            assert_eq!(point["members"][disk], m["committed"], "{point}");
        }
        let cut = point["group_cut"].as_str().unwrap();
        seen.insert(restore_checked(&pair, cut, &pair.d.join("restored")));
    }
    // The writer moved between pushes: the points are of different instants.
    assert!(
        seen.len() > 1,
        "every group point holds the same numbers: {seen:?}"
    );
    // The latest is the newest group point.
    let (ok, _, err) = restore_group(&pair, "latest", &pair.d.join("latest"));
    assert!(ok, "{err}");
    // A group that does not exist, and a group cut that is not one of it.
    let (ok, _, err) = restore_group(&pair, &"0".repeat(32), &pair.d.join("none"));
    assert!(!ok && err.contains("the newest it keeps"), "{err}");
}

#[test]
fn kills_during_group_pushes_never_record_part_of_a_group_point() {
    let mut pair = Pair::new(50);
    let _agent = serve_group(&pair);
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let sock = pair.d.join("nbd.sock");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let trials = 20;
    let mut clean = 0;
    std::thread::scope(|s| {
        s.spawn(|| writer(&sock, &stop, &written));
        let _stop = Stop(&stop);
        for trial in 0..trials {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut push = pair
                .replicate(&["--group", "g"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // Somewhere in the push (the handshake, the deltas, the members' commits, the
            // group's): the receiver, and the agent's replicate with it, SIGKILLed in
            // either order.
            std::thread::sleep(Duration::from_millis(rng % 700));
            if rng & 1 == 0 {
                let _ = push.kill();
                pair.restart_receiver();
            } else {
                pair.restart_receiver();
                let _ = push.kill();
            }
            let _ = push.wait();
            // Now and then a push that runs to its end, so group points accumulate.
            if trial % 4 == 3 {
                let before = group_points(&pair).len();
                let (ok, _, err) = run(&mut pair.replicate(&["--group", "g"]));
                assert!(ok, "after trial {trial}: {err}");
                assert_eq!(group_points(&pair).len(), before + 1);
                clean += 1;
            }
            // Every group point recorded so far restores in write order, whole.
            for p in group_points(&pair) {
                let cut = p["group_cut"].as_str().unwrap();
                restore_checked(&pair, cut, &pair.d.join(format!("r{trial}")));
            }
        }
    });
    let recorded = group_points(&pair).len();
    assert!(
        recorded >= clean,
        "{recorded} group points after {clean} whole pushes"
    );
    eprintln!(
        "{trials} kills of the receiver and replicate during group pushes, {recorded} group \
         points recorded ({clean} by pushes left to finish): every one restored in write order"
    );
}

#[test]
fn group_commits_naming_points_the_receiver_lacks_are_refused() {
    let pair = Pair::new(10);
    let _agent = serve_group(&pair);
    let (ok, out, err) = run(&mut pair.replicate(&["--group", "g"]));
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let a_point: ctk::ChangeId = report["members"][0]["committed"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let identity = ctk_net::Identity::load(&pair.d.join("aid")).unwrap();
    let pin: ctk_net::Fingerprint = pair.rfp.parse().unwrap();
    let commit = |members: Vec<(String, ctk::ChangeId)>| {
        let request = ctk_net::wire::Request::GroupCommit {
            group: "g".into(),
            group_cut: ctk::GroupCutId(7),
            cut_unix_ms: ctk::unix_ms_now(),
            consistency: ctk::Consistency::Crash,
            members,
        };
        raw_call(&identity, pair.addr, pin, &request.encode(), &[])
    };
    let missing = ctk::ChangeId::new(a_point.generation, a_point.seq + 5);
    for (members, says) in [
        (vec![("a".to_owned(), missing)], "push every member"),
        (vec![("nope".to_owned(), a_point)], "nope"),
        (vec![("../a".to_owned(), a_point)], "../a"),
        (vec![], "at least one disk"),
        (
            vec![("a".to_owned(), a_point), ("a".to_owned(), a_point)],
            "named twice",
        ),
    ] {
        match commit(members) {
            ctk_net::wire::Response::Refused { message, .. } => {
                assert!(message.contains(says), "{message}")
            }
            other => panic!("accepted: {other:?}"),
        }
    }
    // Nothing was recorded but the one real group point.
    assert_eq!(group_points(&pair).len(), 1);
}

#[test]
fn retention_keeps_and_drops_group_points_whole() {
    // The receiver keeps 2 points per disk; each member also gets a point of its own
    // between group pushes, which no group point names.
    let pair = Pair::new(2);
    let _agent = serve_group(&pair);
    let sock = pair.d.join("nbd.sock");
    for round in 0..4u8 {
        for disk in ["a", "b"] {
            NbdClient::connect(&sock, disk)
                .unwrap()
                .write(u64::from(round) * 65536, &[round + 1; 65536])
                .unwrap();
        }
        let (ok, _, err) = run(&mut pair.replicate(&["--group", "g"]));
        assert!(ok, "{err}");
        NbdClient::connect(&sock, "a")
            .unwrap()
            .write(7 * MIB, &[round + 9; 4096])
            .unwrap();
        let (ok, out, err) = run(&mut pair.replicate(&["--disk", "a"]));
        assert!(ok && !out.contains("\"unchanged\":true"), "{out}{err}");
    }
    let points = group_points(&pair);
    assert_eq!(points.len(), 2, "the group keeps 2 group points");
    let listed = common::points(&pair.receiver_bin, &pair.store());
    for p in &points {
        for disk in ["a", "b"] {
            let id = p["members"][disk].as_str().unwrap();
            let kept = listed
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["disk"] == disk)
                .unwrap()["points"]
                .as_array()
                .unwrap()
                .iter()
                .any(|q| q["change_id"] == id);
            assert!(
                kept,
                "{disk}'s point {id} of a kept group point was dropped"
            );
        }
        let cut = p["group_cut"].as_str().unwrap();
        let out = pair.d.join("restored");
        let _ = std::fs::remove_dir_all(&out);
        let (ok, _, err) = restore_group(&pair, cut, &out);
        assert!(ok, "{err}");
    }
    // Disk a's own points beyond the group's were dropped to its limit: 2 of its own, and
    // the group points' (pinned), no more.
    let a_points = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["disk"] == "a")
        .unwrap()["points"]
        .as_array()
        .unwrap()
        .len();
    assert!(a_points <= 4, "disk a keeps {a_points} points");
}

#[test]
fn a_group_point_is_exposed_whole_over_nbd() {
    let pair = Pair::new(10);
    let _agent = serve_group(&pair);
    let (ok, _, err) = run(&mut pair.replicate(&["--group", "g"]));
    assert!(ok, "{err}");
    let restored = pair.d.join("restored");
    let (ok, _, err) = restore_group(&pair, "latest", &restored);
    assert!(ok, "{err}");
    let sockets = pair.d.join("exp");
    let mut expose = Command::new(&pair.receiver_bin);
    expose.args([
        "expose",
        "--store",
        pair.store().to_str().unwrap(),
        "--group",
        "g",
        "--listen-dir",
        sockets.to_str().unwrap(),
        "--json",
    ]);
    let (_exposed, line) = start(&mut expose);
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    let members = ready["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{ready}");
    for m in members {
        let disk = m["disk"].as_str().unwrap();
        let copy = pair.d.join(format!("{disk}.copy"));
        let (ok, _, err) = run(Command::new(common::tool("qemu-img")).args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            m["uri"].as_str().unwrap(),
            copy.to_str().unwrap(),
        ]));
        assert!(ok, "{err}");
        assert!(
            std::fs::read(&copy).unwrap()
                == std::fs::read(restored.join(format!("{disk}.img"))).unwrap(),
            "{disk} served over NBD differs from its restored image"
        );
    }
    // Pinned while served: the members' points are named as exposed.
    let listed = common::points(&pair.receiver_bin, &pair.store());
    for d in listed.as_array().unwrap() {
        assert!(d["exposed"].is_string(), "{d}");
    }
}

#[test]
fn continuous_group_replication_records_a_group_point_each_cycle() {
    let pair = Pair::new(50);
    let _agent = serve_group(&pair);
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let sock = pair.d.join("nbd.sock");
    let lines = std::thread::scope(|s| {
        s.spawn(|| writer(&sock, &stop, &written));
        let _stop = Stop(&stop);
        let mut cmd = pair.replicate(&["--group", "g", "--every", "300ms"]);
        let child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(4));
        // SIGTERM: the cycle under way finishes, then it stops.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "replicate --group --every exited badly"
        );
        String::from_utf8(out.stdout).unwrap()
    });
    let cycles: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let committed: Vec<&serde_json::Value> = cycles
        .iter()
        .filter(|c| c["group_cut"].is_string())
        .collect();
    assert!(
        committed.len() >= 3,
        "{} group cycles in 4 s: {lines}",
        committed.len()
    );
    let points = group_points(&pair);
    assert_eq!(points.len(), committed.len(), "one group point per cycle");
    let last = points.last().unwrap()["group_cut"]
        .as_str()
        .unwrap()
        .to_owned();
    restore_checked(&pair, &last, &pair.d.join("restored"));
}

#[test]
fn a_group_point_is_drilled_whole_and_the_result_recorded_on_every_member() {
    let pair = Pair::new(10);
    let _agent = serve_group(&pair);
    let (ok, _, err) = run(&mut pair.replicate(&["--group", "g"]));
    assert!(ok, "{err}");
    let before = pair.d.join("before");
    let (ok, _, err) = restore_group(&pair, "latest", &before);
    assert!(ok, "{err}");
    let store = pair.store();
    let sockets = pair.d.join("drill");
    let mut drill = Command::new(&pair.receiver_bin);
    drill.args([
        "drill",
        "start",
        "--store",
        store.to_str().unwrap(),
        "--group",
        "g",
    ]);
    drill.args(["--listen-dir", sockets.to_str().unwrap(), "--json"]);
    let (_drilled, line) = start(&mut drill);
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ready["writable"], true, "{ready}");
    // Writes go to the drill's overlays; reads see them.
    for m in ready["members"].as_array().unwrap() {
        let uri = m["uri"].as_str().unwrap();
        let (ok, out, err) = run(Command::new(common::tool("qemu-io")).args([
            "-f",
            "raw",
            uri,
            "-c",
            "write -P 0x5c 0 64k",
            "-c",
            "read -P 0x5c 0 64k",
        ]));
        assert!(ok && !out.contains("fail"), "{out}{err}");
    }
    let (ok, out, err) = run(Command::new(&pair.receiver_bin).args([
        "drill",
        "stop",
        "--store",
        store.to_str().unwrap(),
        "--group",
        "g",
        "--result",
        "passed",
        "--note",
        "both disks",
    ]));
    assert!(ok, "{out}{err}");
    // Each member's point carries the result, and is as it was: the drill wrote nothing
    // into it.
    let listed = common::points(&pair.receiver_bin, &store);
    for d in listed.as_array().unwrap() {
        let newest = d["points"].as_array().unwrap().last().unwrap();
        assert_eq!(newest["tested"]["result"], "passed", "{d}");
        assert!(d["exposed"].is_null(), "{d}");
        assert!(
            !store
                .join(d["disk"].as_str().unwrap())
                .join("drill.json")
                .exists()
        );
    }
    let after = pair.d.join("after");
    let (ok, _, err) = restore_group(&pair, "latest", &after);
    assert!(ok, "{err}");
    for disk in ["a", "b"] {
        let image = format!("{disk}.img");
        assert!(
            std::fs::read(before.join(&image)).unwrap()
                == std::fs::read(after.join(&image)).unwrap()
        );
    }
}

#[test]
fn a_group_point_is_failed_over_whole_and_rolled_back_whole() {
    let pair = Pair::new(10);
    let _agent = serve_group(&pair);
    let (ok, _, err) = run(&mut pair.replicate(&["--group", "g"]));
    assert!(ok, "{err}");
    let store = pair.store();
    let sockets = pair.d.join("dr");
    let mut failover = Command::new(&pair.receiver_bin);
    failover.args([
        "failover",
        "start",
        "--store",
        store.to_str().unwrap(),
        "--group",
        "g",
    ]);
    failover.args(["--listen-dir", sockets.to_str().unwrap(), "--json"]);
    let (mut running, line) = start(&mut failover);
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap();
    for m in ready["members"].as_array().unwrap() {
        let (ok, out, err) = run(Command::new(common::tool("qemu-io")).args([
            "-f",
            "raw",
            m["uri"].as_str().unwrap(),
            "-c",
            "write -P 0x6d 1M 64k",
        ]));
        assert!(ok && !out.contains("fail"), "{out}{err}");
    }
    // Every member is fenced: the group's push is refused, nothing commits.
    let (ok, _, err) = run(&mut pair.replicate(&["--group", "g"]));
    assert!(!ok && err.contains("failed over"), "{err}");
    assert_eq!(group_points(&pair).len(), 1);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(running.0.id() as i32, libc::SIGTERM) };
    let _ = running.0.wait();
    let rollback = |discard: bool| {
        let mut cmd = Command::new(&pair.receiver_bin);
        cmd.args([
            "failover",
            "rollback",
            "--store",
            store.to_str().unwrap(),
            "--group",
            "g",
        ]);
        if discard {
            cmd.arg("--discard-writes");
        }
        run(&mut cmd)
    };
    // The VM wrote: rolling back needs --discard-writes.
    let (ok, _, err) = rollback(false);
    assert!(!ok && err.contains("--discard-writes"), "{err}");
    let (ok, out, err) = rollback(true);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = run(&mut pair.replicate(&["--group", "g"]));
    assert!(ok, "after the rollback: {err}");
    assert_eq!(group_points(&pair).len(), 2);
}
