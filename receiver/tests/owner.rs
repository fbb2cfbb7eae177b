//! One receiver per store: a second `serve` on a store another serves is refused and names
//! it, and a SIGKILLed receiver restarts on its store. (Before the fix both served, each
//! with its own view of the agents' pushes in flight.)

mod common;

use std::process::{Command, Stdio};

use common::{init, start_receiver};

#[test]
fn a_second_receiver_on_a_store_is_refused_and_names_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_ctk-receiver"));
    init(&bin, &d.join("rid"));
    // Any identity can stand for the allowed agent here: the receiver only pins its key.
    let afp = init(&bin, &d.join("aid"));
    let (mut first, _) = start_receiver(&bin, d, &afp);
    let second = Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--identity"])
        .arg(d.join("rid"))
        .arg("--store")
        .arg(d.join("store"))
        .arg("--allow")
        .arg(format!("host1={afp}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        !String::from_utf8_lossy(&second.stdout).contains("ready"),
        "the second receiver started"
    );
    assert!(
        err.contains("served by another ctk-receiver") && err.contains(&first.0.id().to_string()),
        "{err}"
    );
    // An agent's name that could be a path is refused as an agent's name.
    let out = Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--identity"])
        .arg(d.join("rid"))
        .arg("--store")
        .arg(d.join("store2"))
        .arg("--allow")
        .arg(format!("../x={afp}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("agent name \"../x\" is not valid"), "{err}");
    // Killed, the first one's lock goes with it.
    let _ = first.0.kill();
    let _ = first.0.wait();
    let (_again, _) = start_receiver(&bin, d, &afp);
}
