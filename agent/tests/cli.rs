//! The agent binary as a user runs it.

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ctk-agent"))
}

#[test]
fn bad_flags_get_a_usage_error() {
    let out = agent()
        .args(["serve", "--disk", "vm1=/x", "--block-size", "12Q"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown size unit"));
    let out = agent()
        .args(["cut", "--consistency", "mostly"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = agent()
        .args(["changed", "--since", "yesterday"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("all"));
}
