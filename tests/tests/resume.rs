//! Resuming cut-off pushes, end to end with real processes over real QUIC on 127.0.0.1:
//! `ctk-agent replicate` SIGKILLed in the middle of a first full and of an increment (with
//! writes going on meanwhile, below and above where the push was cut); the next run goes on
//! from what the receiver kept, sends only the rest, and every point restores exactly. A
//! resume state that does not fit is refused, on either side, with a clear message.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const SIZE: u64 = 64 << 20;

struct Setup {
    pair: Pair,
    image: PathBuf,
    _agent: Proc,
}

impl std::ops::Deref for Setup {
    type Target = Pair;
    fn deref(&self) -> &Pair {
        &self.pair
    }
}

/// A receiver and an agent protecting a 64 MiB disk of random bytes (incompressible, so a
/// bandwidth limit paces a push predictably).
fn setup() -> Setup {
    let pair = Pair::new(50);
    let image = pair.d.join("vm1.img");
    random_image(&image, SIZE, 0x2e5 << 20 | 7);
    let agent = pair.serve_disk(&image);
    Setup {
        pair,
        image,
        _agent: agent,
    }
}

impl Setup {
    /// A replication paced at 16 MiB/s, SIGKILLed after `after`.
    fn killed_after(&self, after: Duration) {
        let mut child = self
            .replicate(&["--bwlimit", "16M"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(after);
        assert!(
            child.try_wait().unwrap().is_none(),
            "the push ended before it could be cut off"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn completed(&self) -> Value {
        let (ok, out, err) = run(&mut self.replicate(&[]));
        assert!(ok, "replicate: {err}");
        serde_json::from_str(&out).unwrap()
    }

    /// Writes 64 KiB of random bytes (seeded by `seed`: incompressible, so the link limit
    /// holds the push back) at each of `offsets` through NBD.
    fn write(&self, offsets: &[u64], seed: u64) {
        let mut nbd =
            ctk_agent::nbd_client::NbdClient::connect(&self.d.join("nbd.sock"), "vm1").unwrap();
        let mut rng = Rng(seed | 1);
        for off in offsets {
            let data: Vec<u8> = (0..8192).flat_map(|_| rng.next().to_le_bytes()).collect();
            nbd.write(*off, &data).unwrap();
        }
        nbd.flush().unwrap();
    }

    fn partial_json(&self) -> PathBuf {
        self.d.join("store/host1/vm1/staging/partial.json")
    }
}

#[test]
fn killed_pushes_resume_from_what_the_receiver_kept() {
    let s = setup();
    let receiver_bin = s.receiver_bin.clone();
    let store = s.d.join("store/host1");
    let mut sources = Vec::new();

    // A first full, killed twice part way (the second time while resuming the first).
    let mut rng = Rng(0x4e5);
    for trial in 0..2 {
        let after = Duration::from_millis(1200 + rng.next() % 1500);
        s.killed_after(after);
        eprintln!("first full, trial {trial}: killed after {after:?}");
    }
    let started = Instant::now();
    let first = s.completed();
    eprintln!("first full resumed in {:?}: {first}", started.elapsed());
    let at = first["resumed_at"]
        .as_u64()
        .expect("the first full did not resume");
    assert!(at > 0 && at < SIZE, "{first}");
    // Only the rest went over the link (the disk is random bytes: no compression).
    let sent = first["delta_bytes"].as_u64().unwrap();
    assert!(
        sent < SIZE - at + SIZE / 50,
        "sent {sent} after resuming at {at} of {SIZE}"
    );
    sources.push((
        first["committed"].as_str().unwrap().to_owned(),
        std::fs::read(&s.image).unwrap(),
    ));

    // An increment of 16 MiB, killed part way; meanwhile writes land below and above the
    // point where it was cut, and over blocks it had already sent.
    let spread: Vec<u64> = (0..256).map(|i| i * (SIZE / 256)).collect();
    s.write(&spread, 0x51);
    s.killed_after(Duration::from_millis(400));
    let mut later: Vec<u64> = (0..32).map(|i| i * (SIZE / 32) + 4096).collect();
    later.extend(&spread[..8]);
    s.write(&later, 0x52);
    // The receiver kept what arrived as a resume state, and dropped the pre-images it had
    // written as the push came (they are written again for the whole change when it merges).
    // A SIGKILLed agent sends no close: the receiver learns of it by the 10 s idle timeout.
    let waited = Instant::now();
    while !s.partial_json().exists() && waited.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s.partial_json().exists(), "no resume state kept");
    let staged_undo = s.d.join("store/host1/vm1/staging/undo.ctkd");
    assert!(!staged_undo.exists(), "a cut-off push left its undo behind");
    let inc = s.completed();
    eprintln!("increment resumed: {inc}");
    assert!(
        inc["resumed_at"].as_u64().is_some(),
        "the increment did not resume: {inc}"
    );
    assert_eq!(inc["from"], first["committed"]);
    sources.push((
        inc["committed"].as_str().unwrap().to_owned(),
        std::fs::read(&s.image).unwrap(),
    ));
    // The resume state is used up.
    assert!(!s.partial_json().exists());

    // Every point restores to the source as of its cut, checked end to end.
    let listed = points(&receiver_bin, &store);
    for p in listed[0]["points"].as_array().unwrap() {
        assert_eq!(p["digest_checked"], true, "{p}");
    }
    for (id, expected) in &sources {
        let got = restore(&receiver_bin, &store, "vm1", id, &s.d.join("r.img"));
        assert!(
            got == *expected,
            "point {id} does not restore to its source"
        );
    }
}

#[test]
fn a_resume_state_that_does_not_fit_is_refused_with_a_clear_message() {
    let s = setup();
    s.completed();
    // An increment cut off: the receiver keeps a resume state.
    let spread: Vec<u64> = (0..256).map(|i| i * (SIZE / 256)).collect();
    s.write(&spread, 0x61);
    s.killed_after(Duration::from_millis(400));
    // Wait for the receiver to notice (QUIC's idle timeout) and keep what it received.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !s.partial_json().exists() {
        assert!(Instant::now() < deadline, "no resume state was kept");
        std::thread::sleep(Duration::from_millis(200));
    }
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(s.partial_json()).unwrap()).unwrap();

    // The receiver refuses a resume of another cut, or from another offset.
    let id = ctk_net::Identity::load(&s.d.join("aid")).unwrap();
    let pin: ctk_net::Fingerprint = s.rfp.parse().unwrap();
    for (resumes, at, says) in [
        (
            "00000000000000000000000000000001/9",
            state["next_offset"].as_u64().unwrap(),
            "resume state here is of",
        ),
        (
            state["to"].as_str().unwrap(),
            4096,
            "resume state here is of",
        ),
    ] {
        let frame = ctk_net::wire::Request::PushResume {
            disk: "vm1".into(),
            resumes: resumes.parse().unwrap(),
            next_offset: at,
        }
        .encode();
        match raw_call(&id, s.addr, pin, &frame, &0u32.to_le_bytes()) {
            ctk_net::wire::Response::Refused { refusal, message } => {
                assert_eq!(refusal, ctk_net::wire::Refusal::Mismatch);
                assert!(message.contains(says), "{message}");
            }
            other => panic!("a mismatched resume was not refused: {other:?}"),
        }
    }

    // A state naming a cut of another journal (forged, or of a lost one): the agent does
    // not trust it, says so, and pushes from the start.
    let mut forged = state.clone();
    forged["to"] = Value::from("0123456789abcdef0123456789abcdef/2");
    std::fs::write(s.partial_json(), forged.to_string()).unwrap();
    let (ok, out, err) = run(&mut s.replicate(&[]));
    assert!(ok, "{err}");
    assert!(
        err.contains("not resuming"),
        "no warning about the state: {err}"
    );
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert!(answer["resumed_at"].is_null(), "{answer}");
    let store = s.d.join("store/host1");
    let newest = answer["committed"].as_str().unwrap();
    let got = restore(&s.receiver_bin, &store, "vm1", newest, &s.d.join("r.img"));
    assert!(got == std::fs::read(&s.image).unwrap());
}

#[test]
fn a_push_cut_off_by_a_receiver_restart_resumes_from_what_was_staged() {
    let mut s = setup();
    let first = s.completed();
    let spread: Vec<u64> = (0..256).map(|i| i * (SIZE / 256)).collect();
    s.write(&spread, 0x71);
    // A push paced at 16 MiB/s; 700 ms in, the receiver is SIGKILLed and started again on
    // the same store and port.
    let mut child = s
        .replicate(&["--bwlimit", "16M"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    s.pair.restart_receiver();
    assert!(
        !child.wait().unwrap().success(),
        "the push survived its receiver"
    );
    let inc = s.completed();
    eprintln!("after a receiver restart: {inc}");
    let at = inc["resumed_at"].as_u64().expect("the push did not resume");
    assert!(at > 0, "{inc}");
    assert_eq!(inc["from"], first["committed"]);
    let store = s.store();
    let newest = inc["committed"].as_str().unwrap();
    let got = restore(&s.receiver_bin, &store, "vm1", newest, &s.d.join("r.img"));
    assert!(got == std::fs::read(&s.image).unwrap());
}

#[test]
fn a_long_running_replicate_asks_for_a_resume_state_after_a_failed_push_only() {
    let mut s = setup();
    s.completed();
    let spread: Vec<u64> = (0..256).map(|i| i * (SIZE / 256)).collect();
    s.write(&spread, 0x73);
    // A cut every second, paced at 16 MiB/s: the first push (16 MiB) is cut off 700 ms in by
    // a receiver restart; the cycles after it go on in the same process.
    let mut child = s
        .replicate(&["--every", "1s", "--bwlimit", "16M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
            let Ok(line) = line else { break };
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(700));
    s.pair.restart_receiver();
    // Gather cycles until two commits came after the failure (or a minute passed).
    let mut lines: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            lines.push(l);
        }
        let failed = lines.iter().position(|l| l["error"].is_string());
        if failed.is_some_and(|f| {
            lines[f..]
                .iter()
                .filter(|l| l["committed"].is_string())
                .count()
                >= 2
        }) {
            break;
        }
    }
    // SAFETY: kill with a pid we spawned and still own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    reader.join().unwrap();
    eprintln!("cycles: {lines:?}");
    let failed = lines
        .iter()
        .position(|l| l["error"].is_string())
        .expect("the push cut off by the restart did not fail");
    let commits: Vec<&Value> = lines[failed..]
        .iter()
        .filter(|l| l["committed"].is_string())
        .collect();
    assert!(
        commits.len() >= 2,
        "fewer than two commits after the failure: {lines:?}"
    );
    // The push after the failure asked, and went on from what the receiver had kept.
    assert_eq!(commits[0]["resume_asked"], true, "{}", commits[0]);
    assert!(
        commits[0]["resumed_at"].as_u64().is_some_and(|at| at > 0),
        "the push after the failure did not resume: {}",
        commits[0]
    );
    // The one after a commit did not ask.
    assert_eq!(commits[1]["resume_asked"], false, "{}", commits[1]);
    let store = s.store();
    let newest = commits.last().unwrap()["committed"].as_str().unwrap();
    let got = restore(&s.receiver_bin, &store, "vm1", newest, &s.d.join("r.img"));
    assert!(
        got == std::fs::read(&s.image).unwrap(),
        "the newest point differs from the source"
    );
}
