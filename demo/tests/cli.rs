//! The demo binary as a user runs it: the README's first command.

use std::process::Command;

fn demo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ctk-demo"))
}

fn agent() -> Command {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_ctk-demo")).with_file_name("ctk-agent");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    Command::new(path)
}

/// The main job: a receiver and an agent in one process, paired, writes through NBD,
/// replication over QUIC, and every kept point proven equal to the source at its cut.
#[test]
fn demo_replicates_over_quic_and_proves_every_point() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("demo");
    let out = demo()
        .args([
            "--size", "16M", "--cycles", "2", "--writes", "300", "--seed", "9", "--json", "--dir",
        ])
        .arg(&work)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true);
    let cycles = report["cycles"].as_array().unwrap();
    assert_eq!(cycles.len(), 3);
    assert!(
        cycles[0]["from"].is_null(),
        "the first replication is a full"
    );
    for pair in cycles.windows(2) {
        // Each replication starts from the point the one before committed.
        assert_eq!(pair[1]["from"], pair[0]["committed"]);
        let c = &pair[1];
        assert!(c["changed_bytes"].as_u64().unwrap() > 0);
        assert!(c["delta_bytes"].as_u64().unwrap() < 16 << 20, "{c}");
    }
    assert_eq!(report["points"].as_array().unwrap().len(), 3);
    assert_eq!(report["newest"], cycles[2]["committed"]);
    // The restored newest point is the source, byte for byte.
    let restored = std::fs::read(report["restored"].as_str().unwrap()).unwrap();
    assert!(restored == std::fs::read(work.join("source.img")).unwrap());
    // Running again into the same directory is refused.
    let again = demo()
        .args(["--size", "16M", "--dir"])
        .arg(&work)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn demo_proves_the_replica_equals_the_source_at_every_cut() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("demo");
    let out = demo()
        .args([
            "--local", "--size", "16M", "--cycles", "2", "--writes", "300", "--seed", "7",
            "--json", "--dir",
        ])
        .arg(&work)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true);
    let cuts = report["cuts"].as_array().unwrap();
    assert_eq!(cuts.len(), 3);
    assert!(cuts[0]["from"].is_null(), "the first cut is a full");
    for cut in &cuts[1..] {
        assert!(cut["changed_bytes"].as_u64().unwrap() > 0);
        // An incremental carries only what changed, not the disk.
        assert!(cut["delta_file_bytes"].as_u64().unwrap() < 16 << 20);
    }
    // Running again into the same directory is refused, not silently overwritten.
    let again = demo()
        .args(["--local", "--size", "16M", "--dir"])
        .arg(&work)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    // verify-delta accepts the real file and names the problem in a damaged one.
    let delta = work.join("delta-1.ctkd");
    let ok = agent().arg("verify-delta").arg(&delta).output().unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("valid ctk delta"));
    let mut bytes = std::fs::read(&delta).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    let bad = dir.path().join("bad.ctkd");
    std::fs::write(&bad, bytes).unwrap();
    let out = agent().arg("verify-delta").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a valid ctk delta") && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn bad_flags_get_a_usage_error() {
    let out = demo().args(["--size", "12Q"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown size unit"));
    let out = demo().args(["--cycles", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
