//! A failover at the DR site while the agent at the original site is still replicating: its
//! pushes are refused with the fenced error (at the first question and at a push itself),
//! nothing is committed, the agent's cursor stays, and after a rollback pushes commit again.

mod common;

use std::process::Command;

use common::*;

use ctk_net::wire::{Refusal, Request, Response};

fn write(d: &std::path::Path, pattern: u8, offset: u64) {
    if let Err(e) = nbd_write(&d.join("nbd.sock"), pattern, offset) {
        panic!("qemu-io: {e}");
    }
}

#[test]
fn pushes_of_a_failed_over_disk_are_refused_and_never_commit() {
    let pair = Pair::new(5);
    let d = &pair.d;
    let image = d.join("vm1.img");
    random_image(&image, 8 << 20, 3);
    let _agent = pair.serve_disk(&image);
    let (ok, _, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "first push: {err}");
    write(d, 0x21, 1 << 20);
    let (ok, _, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "second push: {err}");
    let store = pair.store();
    let listed = |store| points(&pair.receiver_bin, store)[0]["points"].clone();
    let before = listed(&store);
    let cursor = pair.cursor();

    let (failover, ready) = start(&mut pair.failover_start(None));
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["mode"], "failover");

    // The original VM goes on writing; its agent goes on replicating: refused, plainly.
    write(d, 0x22, 2 << 20);
    for _ in 0..3 {
        let (ok, out, err) = run(&mut pair.replicate(&[]));
        assert!(!ok, "a push of a failed-over disk succeeded: {out}");
        assert!(
            err.contains("was failed over at the DR site at point")
                && err.contains("pushes are refused until failback"),
            "{err}"
        );
    }
    // A push that comes anyway (an agent that asked before the fence) is refused as such.
    let identity = ctk_net::Identity::load(&d.join("aid")).unwrap();
    let pin = pair.rfp.parse().unwrap();
    let frame = Request::Push { disk: "vm1".into() }.encode();
    match raw_call(&identity, pair.addr, pin, &frame, &[]) {
        Response::Refused {
            refusal: Refusal::FailedOver,
            message,
        } => assert!(message.contains("failover status --disk vm1"), "{message}"),
        other => panic!("a push into a failed-over disk was answered {other:?}"),
    }
    assert_eq!(listed(&store), before, "nothing committed");
    assert_eq!(
        pair.cursor()["at"],
        cursor["at"],
        "the agent's cursor did not move"
    );

    // Rolled back (the DR copy thrown away), the agent's next push commits, from its cursor.
    drop(failover);
    let (ok, _, err) = run(Command::new(&pair.receiver_bin)
        .args([
            "failover",
            "rollback",
            "--disk",
            "vm1",
            "--discard-writes",
            "--store",
        ])
        .arg(&store));
    assert!(ok, "rollback: {err}");
    let (ok, out, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "the push after rollback: {err}");
    let pushed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        pushed["from"], cursor["at"],
        "an increment from the cursor: {pushed}"
    );
    assert_eq!(listed(&store).as_array().unwrap().len(), 3);
    let restored = restore(
        &pair.receiver_bin,
        &store,
        "vm1",
        "latest",
        &d.join("r.img"),
    );
    assert!(
        restored == std::fs::read(&image).unwrap(),
        "the replica after rollback"
    );
}

/// README.md's "Failing over" block, run as written (its paths moved into a temporary
/// directory) after a real agent replicated an ext4 disk to a real receiver.
#[test]
fn the_readme_failing_over_block_runs_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = &readme[readme.find("\n## Failing over\n").expect("the section")..];
    let open = section.find("```sh\n").unwrap() + "```sh\n".len();
    let block = &section[open..open + section[open..].find("```").unwrap()];

    let pair = Pair::new(5);
    let d = &pair.d;
    let tree = d.join("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hosts"), "10.0.0.7 db.dr.example\n").unwrap();
    let image = d.join("vm1.img");
    let (ok, _, err) = run(Command::new(tool("mkfs.ext4"))
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("16M"));
    assert!(ok, "mkfs.ext4: {err}");
    let _agent = pair.serve_disk(&image);
    let (ok, _, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "the replication the section starts from: {err}");

    let store = pair.store();
    let run_dir = d.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let script = block
        .replace("/srv/ctk/host1", store.to_str().unwrap())
        .replace("/run/ctk", run_dir.to_str().unwrap());
    // What a person leaves running, the test stops.
    let script = format!("set -e\n{script}\nkill $! 2>/dev/null || true\nwait || true\n");
    let bins = pair.receiver_bin.parent().unwrap().to_owned();
    let path = format!("{}:{}", bins.display(), std::env::var("PATH").unwrap());
    let (ok, out, err) = run(Command::new("timeout")
        .args(["300", "sh", "-c"])
        .arg(&script)
        .current_dir(d)
        .env("PATH", path));
    assert!(ok, "the README's block failed:\n{out}\n{err}");
    assert!(
        out.contains("FAILED OVER at") && out.contains("served by process"),
        "{out}"
    );
    assert!(out.contains("64 KiB (16 blocks of 4 KiB)"), "{out}");
    assert!(
        out.contains("drill on vm1 at") && out.contains("recorded: passed"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("hosts")).unwrap(),
        "10.0.0.7 db.dr.example\n"
    );
    // The agent at the original site is told, and nothing commits.
    let (ok, _, err) = run(&mut pair.replicate(&[]));
    assert!(
        !ok && err.contains("was failed over at the DR site"),
        "{err}"
    );
}
