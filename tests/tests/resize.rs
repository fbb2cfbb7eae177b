//! A protected disk resized through its life, with real processes: grown online across the
//! 2 GiB and 4 GiB boundaries with writes past the old end and across the boundaries, shrunk
//! online to an unaligned size, grown while the agent was stopped, and grown behind a running
//! agent's back. Every push is an increment carrying only what was written (no full copy, no
//! resync), and every point restores exactly to the source as it was at its cut. (Before:
//! a grow meant a restart, a new generation and a full copy of the whole disk; a file grown
//! under a running agent was ignored.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn qemu_io(socket: &Path, commands: &[String]) {
    let uri = format!("nbd+unix:///vm1?socket={}", socket.display());
    let mut cmd = Command::new(tool("qemu-io"));
    cmd.args(["-f", "raw", &uri]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let (ok, out, err) = run(&mut cmd);
    assert!(
        ok && !out.contains("error"),
        "qemu-io {commands:?}: {out}{err}"
    );
}

fn agent(pair: &Pair, args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = run(Command::new(&pair.agent_bin)
        .args(args)
        .arg("--json")
        .arg("--control")
        .arg(pair.d.join("ctl.sock")));
    assert!(ok, "ctk-agent {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// One `replicate`: its answer.
fn replicate(pair: &Pair) -> serde_json::Value {
    let (ok, out, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "replicate: {err}");
    serde_json::from_str(&out).unwrap()
}

/// The source as of a point: a sparse copy.
fn keep(image: &Path, at: PathBuf) -> PathBuf {
    let (ok, _, err) = run(Command::new("cp")
        .arg("--sparse=always")
        .arg(image)
        .arg(&at));
    assert!(ok, "{err}");
    at
}

/// One piece: each resize starts from the disk, journal and replica the one before left, and
/// every point made along the way is restored at the end.
#[test]
fn a_disk_resized_online_and_at_rest_replicates_only_what_was_written() {
    tool("qemu-img");
    let pair = Pair::new(50);
    let d = pair.d.clone();
    let image = d.join("vm1.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1536 * MIB)
        .unwrap();
    let mut served = pair.serve_disk(&image);
    let nbd = d.join("nbd.sock");
    let mut kept: Vec<(String, u64, PathBuf)> = Vec::new();
    // A first full of a 1.5 GiB disk.
    qemu_io(
        &nbd,
        &["write -P 1 0 1M".into(), "write -P 2 1000M 64k".into()],
    );
    let r = replicate(&pair);
    assert!(r["from"].is_null());
    let mut previous: Option<String> = Some(r["committed"].as_str().unwrap().to_string());
    kept.push((
        previous.clone().unwrap(),
        1536 * MIB,
        keep(&image, d.join("full.src")),
    ));
    // A push that is an increment from the point before, carrying about what was written.
    let mut push = |pair: &Pair, label: &str, written: u64, kept: &mut Vec<_>| {
        let r = replicate(pair);
        eprintln!(
            "{label}: {} bytes changed, {} sent, committed {}",
            r["changed_bytes"], r["delta_bytes"], r["committed"]
        );
        assert_eq!(r["resync"], false, "{label}: a resync: {r}");
        if let Some(p) = &previous {
            assert_eq!(
                &r["from"], p,
                "{label}: not an increment from the point before: {r}"
            );
        }
        let sent = r["delta_bytes"].as_u64().unwrap();
        assert!(
            sent <= written + 256 * 1024,
            "{label}: sent {sent} bytes for {written} written"
        );
        let point = r["committed"].as_str().unwrap().to_string();
        previous = Some(point.clone());
        let size = std::fs::metadata(&image).unwrap().len();
        kept.push((point, size, keep(&image, d.join(format!("{label}.src")))));
    };

    // Online across 2 GiB: writes just past the old end and across the boundary.
    let grown = agent(
        &pair,
        &["resize", "--size", &(2 * GIB + 3 * MIB).to_string()],
    );
    assert_eq!(grown["new_size"], 2 * GIB + 3 * MIB, "{grown}");
    qemu_io(
        &nbd,
        &[
            format!("write -P 3 {} 64k", 1536 * MIB),
            format!("write -P 4 {} 2M", 2 * GIB - MIB),
        ],
    );
    push(&pair, "grown-2g", 64 * 1024 + 2 * MIB, &mut kept);

    // Online across 4 GiB.
    agent(
        &pair,
        &["resize", "--size", &(4 * GIB + 5 * MIB).to_string()],
    );
    qemu_io(&nbd, &[format!("write -P 5 {} 2M", 4 * GIB - MIB)]);
    push(&pair, "grown-4g", 2 * MIB, &mut kept);

    // Shrunk online to an unaligned size, with a write in the block the end cuts into.
    let unaligned = 3 * GIB + 12345;
    agent(&pair, &["resize", "--size", &unaligned.to_string()]);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), unaligned);
    qemu_io(&nbd, &[format!("write -P 6 {} 8k", 3 * GIB)]);
    push(&pair, "shrunk", 8192, &mut kept);

    // Grown while the agent was stopped: same generation, an increment.
    let before = agent(&pair, &["status"])["disks"][0]["latest"].clone();
    unsafe { libc::kill(served.0.id() as i32, libc::SIGTERM) };
    assert!(served.0.wait().unwrap().success());
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(unaligned + 64 * MIB)
        .unwrap();
    served = pair.serve_disk(&image);
    let after = agent(&pair, &["status"]);
    assert_eq!(
        after["disks"][0]["latest"]
            .as_str()
            .unwrap()
            .split('/')
            .next(),
        before.as_str().unwrap().split('/').next(),
        "a grow at rest started a new generation"
    );
    assert_eq!(after["disks"][0]["size"], unaligned + 64 * MIB);
    qemu_io(&nbd, &[format!("write -P 7 {} 64k", unaligned + 32 * MIB)]);
    push(&pair, "grown-at-rest", 64 * 1024, &mut kept);

    // Grown behind the running agent's back: followed at the next cut.
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(unaligned + 80 * MIB)
        .unwrap();
    push(&pair, "grown-behind", 0, &mut kept);
    assert_eq!(
        agent(&pair, &["status"])["disks"][0]["size"],
        unaligned + 80 * MIB
    );

    // Every point restores to the source as of its cut, at its size.
    for (point, size, source) in &kept {
        let out = d.join("restored.img");
        let _ = std::fs::remove_file(&out);
        let (ok, _, err) = run(Command::new(&pair.receiver_bin)
            .args([
                "restore", "--force", "--disk", "vm1", "--point", point, "-o",
            ])
            .arg(&out)
            .arg("--store")
            .arg(pair.store()));
        assert!(ok, "restore {point}: {err}");
        assert_eq!(std::fs::metadata(&out).unwrap().len(), *size, "{point}");
        let (same, o, e) = run(Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "raw"])
            .arg(&out)
            .arg(source));
        assert!(
            same,
            "point {point} differs from the source at its cut: {o}{e}"
        );
    }
    drop(served);
}
