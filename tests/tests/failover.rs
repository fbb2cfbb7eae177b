//! A failover at the DR site while the agent at the original site is still replicating: its
//! pushes are refused with the fenced error (at the first question and at a push itself),
//! nothing is committed, the agent's cursor stays, and after a rollback pushes commit again.

mod common;

use std::process::Command;

use common::*;

use ctk_net::wire::{Refusal, Request, Response};

fn write(d: &std::path::Path, pattern: u8, offset: u64) {
    let uri = format!("nbd+unix:///vm1?socket={}", d.join("nbd.sock").display());
    let (ok, out, err) = run(Command::new(tool("qemu-io")).args([
        "-f",
        "raw",
        &uri,
        "-c",
        &format!("write -P {pattern} {offset} 64k"),
    ]));
    assert!(ok && !out.contains("error"), "qemu-io: {out}{err}");
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

    let sock = d.join("failover.sock");
    let (failover, ready) = start(
        Command::new(&pair.receiver_bin)
            .args(["failover", "start", "--disk", "vm1", "--json", "--store"])
            .arg(&store)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display())),
    );
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
