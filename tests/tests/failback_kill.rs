//! Failback under SIGKILL: each trial is a whole DR cycle (writes at the original site that
//! never reached the receiver, a failover, the recovered VM's writes, failback) in which the
//! agent (its daemon and the failback command) and the receiver are each killed once, at a
//! random instant of a pass or of the cutover; the command is then run again. Every trial must end
//! with the original disk equal to the DR disk, a push after it that is an increment, and a
//! store whose every point verifies.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// Runs `failback <extra>` until it succeeds (a rerun after a kill finishes the work).
fn until_done(pair: &Pair, extra: &[&str]) -> String {
    for attempt in 0..5 {
        let (ok, out, err) = run(&mut pair.failback(extra));
        if ok {
            return out;
        }
        eprintln!("failback {extra:?} attempt {attempt}: {err}");
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("failback {extra:?} did not complete");
}

/// The 64 KiB extent `n` of 256, from seed `x`.
fn offset(x: u64) -> u64 {
    (x % (SIZE / (64 << 10))) * (64 << 10)
}

/// One piece: each trial runs a DR cycle and checks it, with the victims restarted.
#[test]
fn sigkill_of_agent_or_receiver_during_failback_converges_with_nothing_lost() {
    let trials = std::env::var("CTK_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20u64);
    let mut seed = ctk_tests::seed("CTK_FAILBACK_SEED");
    eprintln!("seed {seed} (set CTK_FAILBACK_SEED to replay)");
    let mut pair = Pair::new(100);
    let d = pair.d.clone();
    let image = d.join("vm1.img");
    random_image(&image, SIZE, seed);
    let mut agent = pair.serve_disk(&image);
    let nbd = d.join("nbd.sock");
    let (ok, _, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "first push: {err}");
    let store = pair.store();
    let mut killed = [0u64; 2];
    for trial in 0..trials {
        seed = ctk_tests::next(seed);
        // The last cycle's overlay is removed after the cutover's answer, under its exposure:
        // the next failover starts once it is gone.
        let overlay = store.join("vm1/failover");
        for _ in 0..200 {
            if !overlay.exists() && !store.join("vm1/expose.pin").exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // (The exposure's lock goes a moment after its pin.)
        std::thread::sleep(Duration::from_millis(100));
        // S: the original VM writes after the last push.
        for k in 0..2 {
            nbd_write(&nbd, 0x10 + (trial % 200) as u8, offset(seed >> (8 * k))).unwrap();
        }
        let mut dr = restore(
            &pair.receiver_bin,
            &store,
            "vm1",
            "latest",
            &d.join("p.img"),
        );
        let sock = d.join("failover.sock");
        let (failover, _) = start(&mut pair.failover_start(None));
        // D: the recovered VM writes.
        for k in 2..5 {
            let (pattern, at) = (0x80 + (trial % 100) as u8, offset(seed >> (8 * k)));
            nbd_write(&sock, pattern, at).unwrap();
            dr[at as usize..(at + (64 << 10)) as usize].fill(pattern);
        }
        // Two kills per cycle: one in a pass (while the VM runs), one in the cutover; the
        // agent first in even cycles, the receiver first in odd ones; each after a random
        // delay.
        for (step, extra) in [&[][..], &["--final"][..]].into_iter().enumerate() {
            let kill_agent = (trial + step as u64).is_multiple_of(2);
            let delay = Duration::from_millis((seed >> (20 + 10 * step)) % 400);
            let mut child = pair
                .failback(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(delay);
            if kill_agent {
                let _ = child.kill();
                drop(agent);
                agent = pair.serve_disk(&image);
            } else {
                pair.restart_receiver();
            }
            let _ = child.wait();
            killed[usize::from(!kill_agent)] += 1;
            if step == 0 {
                until_done(&pair, &[]);
            }
        }
        // (A kill that came after the cutover finished leaves nothing to do: the rerun says
        // so and lifts the fence it set.)
        until_done(&pair, &["--final"]);
        let committed = points(&pair.receiver_bin, &store)[0]["points"]
            .as_array()
            .and_then(|p| p.last())
            .and_then(|p| p["change_id"].as_str())
            .map(str::to_owned)
            .unwrap();
        drop(failover);
        assert!(
            std::fs::read(&image).unwrap() == dr,
            "trial {trial} (seed {seed}): the original disk is not the DR disk"
        );
        // Replication resumes with an increment from the failback's point.
        nbd_write(&nbd, 0x55, offset(seed >> 48)).unwrap();
        let (ok, out, err) = run(&mut pair.replicate(&[]));
        assert!(ok, "trial {trial}: push after failback: {err}");
        let pushed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            pushed["from"].as_str(),
            Some(committed.as_str()),
            "trial {trial}: {pushed}"
        );
        assert_eq!(pushed["resync"], false, "trial {trial}: {pushed}");
    }
    let (ok, out, err) = run(Command::new(&pair.receiver_bin)
        .args(["verify", "--store"])
        .arg(&store));
    assert!(ok, "every point verifies: {out}{err}");
    let newest = restore(
        &pair.receiver_bin,
        &store,
        "vm1",
        "latest",
        &d.join("r.img"),
    );
    assert!(
        newest == std::fs::read(&image).unwrap(),
        "the newest point is the disk"
    );
    eprintln!(
        "{trials} DR cycles, the agent killed {} times, the receiver {}: none lost a write",
        killed[0], killed[1]
    );
    drop(agent);
}
