//! One owner per disk: a second agent on the same image, journal or socket is refused and
//! names the holder, the first keeps working, and a SIGKILLed agent restarts over its own
//! leftovers. (Before the fix the second agent printed "ready", removed the first one's
//! live control socket and replayed its journal as an unclean shutdown.)

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{agent_bin, disk_image};

/// `ctk-agent serve --disk vm1=IMAGE` with the given journal directory, control and NBD
/// sockets: the child and its first stdout line (its ready line, when it started).
fn serve(image: &Path, journal_dir: &Path, control: &Path, nbd: &Path) -> (Child, String) {
    let mut child = Command::new(agent_bin())
        .arg("serve")
        .arg("--disk")
        .arg(format!("vm1={}", image.display()))
        .arg("--journal-dir")
        .arg(journal_dir)
        .arg("--control")
        .arg(control)
        .arg("--listen")
        .arg(format!("unix:{}", nbd.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

/// Waits for a refused agent and returns its stderr.
fn refused(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the second agent was not refused"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn status(control: &Path) -> serde_json::Value {
    let out = Command::new(agent_bin())
        .args(["status", "--json", "--control"])
        .arg(control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the first agent no longer answers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_second_agent_on_a_disk_journal_or_socket_is_refused_and_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = disk_image(d, "vm1", 8);
    let other = disk_image(d, "other", 8);
    let (j1, j2) = (d.join("j1"), d.join("j2"));
    let (c1, n1) = (d.join("c1.sock"), d.join("n1.sock"));
    let (c2, n2) = (d.join("c2.sock"), d.join("n2.sock"));
    let (mut first, ready) = serve(&image, &j1, &c1, &n1);
    assert!(ready.starts_with("ctk-agent ready"), "{ready}");
    let pid = first.id().to_string();

    // The same image, everything else its own: refused by the image's lock.
    let (second, line) = serve(&image, &j2, &c2, &n2);
    assert!(
        !line.contains("ready"),
        "a second agent on the image started"
    );
    let err = refused(second);
    assert!(
        err.contains("is in use by process") && err.contains(&pid),
        "{err}"
    );
    assert!(err.contains("one agent per disk"), "{err}");
    assert!(!c2.exists(), "the refused agent left a socket");

    // Another image with the same journal: refused by the journal's lock, before the
    // journal is read (no "not closed cleanly" replay of a live journal).
    let (second, line) = serve(&other, &j1, &c2, &n2);
    assert!(
        !line.contains("ready"),
        "a second agent on the journal started"
    );
    let err = refused(second);
    assert!(
        err.contains("change journal") && err.contains(&pid),
        "{err}"
    );
    assert!(!err.contains("not closed cleanly"), "{err}");

    // Another disk and journal, the first agent's control socket: refused, socket kept.
    let (second, line) = serve(&other, &j2, &c1, &n2);
    assert!(
        !line.contains("ready"),
        "a second agent on the socket started"
    );
    let err = refused(second);
    assert!(err.contains("is in use"), "{err}");

    // The first agent answered through all of it, on its own journal.
    let s = status(&c1);
    assert_eq!(s["disks"][0]["name"], "vm1");
    assert!(c1.exists() && n1.exists());

    // Killed, it leaves its sockets behind; a restart removes them (nothing answers) and
    // takes the disk again.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(c1.exists(), "the kill was expected to leave the socket");
    let (mut again, ready) = serve(&image, &j1, &c1, &n1);
    assert!(
        ready.starts_with("ctk-agent ready"),
        "restart refused: {ready}"
    );
    status(&c1);
    again.kill().unwrap();
    again.wait().unwrap();
}
