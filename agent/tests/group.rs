//! Consistency groups on one agent: every member cut at one instant. The proof is
//! write-order fidelity under load: a writer puts number i on disk A, then i on disk B,
//! each write only after the one before it was acknowledged, so at any consistent instant
//! B's number <= A's <= B's + 1. Group exports always see that; the same disks exported one
//! after the other (separate cuts) must be seen breaking it, or the test proves nothing.

mod common;

use std::io::BufReader;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::nbd::Raw;
use common::{Agent, disk_image};
use ctk::delta::{DeltaReader, DeltaRecord};

/// One control request line; its answer (`ok` checked by the caller).
fn ask(agent: &Agent, request: serde_json::Value) -> serde_json::Value {
    agent.call(&request.to_string())
}

fn ok(agent: &Agent, request: serde_json::Value) -> serde_json::Value {
    let answer = ask(agent, request.clone());
    assert_eq!(answer["ok"], true, "{request}: {answer}");
    answer
}

/// The number at offset 0 of the disk a full delta holds (0 where nothing was written).
fn number(delta: &Path) -> u64 {
    let file = std::fs::File::open(delta).unwrap();
    let mut reader = DeltaReader::new(BufReader::new(file)).unwrap();
    let mut found = 0;
    while let Some(record) = reader.next_record().unwrap() {
        if let DeltaRecord::Data { offset: 0, data } = record {
            found = u64::from_le_bytes(data[..8].try_into().unwrap());
        }
    }
    found
}

/// Writes number i to A then to B, i = 1, 2, ..., each after the last was acknowledged,
/// until `stop`; the last number written to both.
fn writer(dir: &Path, stop: &AtomicBool, written: &AtomicU64) {
    let mut a = Raw::go(dir, "a");
    let mut b = Raw::go(dir, "b");
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let mut block = vec![0u8; 4096];
        block[..8].copy_from_slice(&i.to_le_bytes());
        for disk in [&mut a, &mut b] {
            disk.request(1, i, 0, 4096, &block);
            assert_eq!(disk.reply(0).0, 0, "write {i} failed");
        }
        written.store(i, Ordering::Relaxed);
    }
}

/// `rounds` exports of A and B, as one group or one disk after the other: the (A, B)
/// numbers each saw.
fn exports(agent: &Agent, out: &Path, rounds: usize, group: bool) -> Vec<(u64, u64)> {
    let since = serde_json::json!("all");
    (0..rounds)
        .map(|_| {
            if group {
                let members: Vec<serde_json::Value> = ["a", "b"]
                    .iter()
                    .map(|d| serde_json::json!({"disk": d, "since": since, "path": out.join(format!("{d}.ctkd"))}))
                    .collect();
                ok(
                    agent,
                    serde_json::json!({"cmd": "group_export", "group": "g", "members": members}),
                );
            } else {
                for disk in ["a", "b"] {
                    let path = out.join(format!("{disk}.ctkd"));
                    ok(
                        agent,
                        serde_json::json!({"cmd": "export", "disk": disk, "since": since, "path": path}),
                    );
                }
            }
            (number(&out.join("a.ctkd")), number(&out.join("b.ctkd")))
        })
        .collect()
}

/// Sets the flag when dropped.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn group_cuts_keep_write_order_across_disks_and_separate_cuts_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b, c) = (
        disk_image(d, "a", 1),
        disk_image(d, "b", 1),
        disk_image(d, "c", 1),
    );
    let mut cmd = std::process::Command::new(common::agent_bin());
    cmd.arg("serve");
    for (name, path) in [("a", &a), ("b", &b), ("c", &c)] {
        cmd.arg("--disk").arg(format!("{name}={}", path.display()));
    }
    cmd.args(["--group", "g=b,a"]);
    let agent = Agent::launch_cmd(cmd, d);
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();

    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let (grouped, separate) = std::thread::scope(|s| {
        s.spawn(|| writer(d, &stop, &written));
        // However this ends (a failed export panics), the writer stops, so the scope does.
        let _stop = Stop(&stop);
        while written.load(Ordering::Relaxed) < 100 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let grouped = exports(&agent, &out, 200, true);
        let separate = exports(&agent, &out, 50, false);
        stop.store(true, Ordering::Relaxed);
        (grouped, separate)
    });
    let last = written.load(Ordering::Relaxed);
    // The writer kept going across the cuts: the group exports saw many instants.
    let seen: std::collections::BTreeSet<u64> = grouped.iter().map(|p| p.0).collect();
    assert!(
        seen.len() > 50,
        "only {} instants in {last} writes",
        seen.len()
    );
    for (i, (na, nb)) in grouped.iter().enumerate() {
        assert!(
            nb <= na && *na <= nb + 1,
            "group export {i}: A holds {na}, B holds {nb}: not one instant"
        );
    }
    let broken = separate
        .iter()
        .filter(|(na, nb)| !(nb <= na && *na <= nb + 1))
        .count();
    assert!(
        broken > 0,
        "separate cuts never broke write order in {} tries: the test cannot tell",
        separate.len()
    );
    eprintln!(
        "{} group exports kept write order over {last} writes; {broken} of {} separate pairs broke it",
        grouped.len(),
        separate.len()
    );

    group_requests_answer_for_the_group_or_say_what_is_wrong(&agent, &out);
}

/// The group cut's answer, and group requests that name what the group does not have.
fn group_requests_answer_for_the_group_or_say_what_is_wrong(agent: &Agent, out: &Path) {
    // The group cut's identity is on every member's cut, and the answer lists them in the
    // agent's order whatever order the group was given in.
    let cut = ok(agent, serde_json::json!({"cmd": "group_cut", "group": "g"}));
    let members: Vec<&str> = cut["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["disk"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["a", "b"]);
    for m in cut["members"].as_array().unwrap() {
        assert_eq!(m["group_cut"], cut["group_cut"]);
    }
    assert_eq!(cut["consistency"], "crash");
    // A group the agent does not have, and a since naming a disk outside the group.
    let answer = ask(agent, serde_json::json!({"cmd": "group_cut", "group": "h"}));
    assert!(
        answer["error"].as_str().unwrap().contains("groups: g"),
        "{answer}"
    );
    let export = |d: &str| serde_json::json!({"disk": d, "since": "all", "path": out.join(format!("{d}.ctkd"))});
    let answer = ask(
        agent,
        serde_json::json!({"cmd": "group_export", "group": "g", "members": [export("a"), export("b"), export("c")]}),
    );
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("is not one of group"),
        "{answer}"
    );
    // A member left out: refused before any cut, and no member's file is left behind.
    std::fs::remove_file(out.join("a.ctkd")).unwrap();
    let answer = ask(
        agent,
        serde_json::json!({"cmd": "group_export", "group": "g", "members": [export("b")]}),
    );
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("each of its disks once"),
        "{answer}"
    );
    assert!(!out.join("a.ctkd").exists());
    // The agent's status lists its groups.
    let status = ok(agent, serde_json::json!({"cmd": "status"}));
    assert_eq!(
        status["groups"],
        serde_json::json!([{"name": "g", "disks": ["a", "b"]}])
    );
}

#[test]
fn bad_groups_stop_the_agent_with_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (disk_image(d, "a", 1), disk_image(d, "b", 1));
    let config = |groups: &str| {
        format!(
            "[[disk]]\nname = \"a\"\npath = \"{}\"\n[[disk]]\nname = \"b\"\npath = \"{}\"\n{groups}",
            a.display(),
            b.display()
        )
    };
    for (groups, says) in [
        ("[[group]]\nname = \"g\"\ndisks = []\n", "has no disks"),
        (
            "[[group]]\nname = \"g\"\ndisks = [\"a\", \"x\"]\n",
            "names disk \"x\", which this agent does not protect",
        ),
        (
            "[[group]]\nname = \"g\"\ndisks = [\"a\"]\n[[group]]\nname = \"h\"\ndisks = [\"a\", \"b\"]\n",
            "is in groups \"g\" and \"h\"",
        ),
        ("[[group]]\nname = \"g\"\ndisk = [\"a\"]\n", "unknown field"),
    ] {
        let (out, agent) = Agent::try_start(d, &config(groups));
        assert!(agent.is_none(), "started with {groups}");
        assert!(out.contains(says), "{groups}: {out}");
    }
    // The hooks of every member run for the group's application-consistent cut, once each.
    let log = d.join("hooks.log");
    let hook = |name: &str| {
        format!(
            "[disk.cut]\npre_freeze = [{{ command = \"echo {name} >> {}\" }}]\n",
            log.display()
        )
    };
    let config = format!(
        "[[disk]]\nname = \"a\"\npath = \"{}\"\n{}[[disk]]\nname = \"b\"\npath = \"{}\"\n{}\
         [[group]]\nname = \"g\"\ndisks = [\"a\", \"b\"]\n",
        a.display(),
        hook("a"),
        b.display(),
        hook("b")
    );
    let agent = Agent::start(d, &config);
    let cut = ok(
        &agent,
        serde_json::json!({"cmd": "group_cut", "group": "g"}),
    );
    assert_eq!(cut["consistency"], "application", "{cut}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\nb\n");
}
