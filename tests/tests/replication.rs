//! Replication end to end over real QUIC on 127.0.0.1, with real processes: `ctk-agent
//! serve` tracking a disk that qemu-io writes through NBD, `ctk-agent replicate` pushing to
//! `ctk-receiver serve`; every kept restore point equals the source as of its cut. Then the
//! refusals: unpinned agents, a wrong receiver fingerprint, hostile frames and names, and
//! one agent reaching for another's disk, while the receiver keeps serving.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

use ctk_net::wire::{Refusal, Request, Response};
use ctk_net::{Fingerprint, Identity};

/// One piece: a story of one pairing (a first full, increments, a stranger refused, a
/// restart) in which every step starts from the state the one before left.
#[test]
fn replication_over_quic_keeps_every_point_equal_to_the_source_and_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let receiver_bin = &receiver_bin();
    let agent_bin = agent_bin();
    let rfp = init(receiver_bin, &d.join("rid"));
    let afp = init(&agent_bin, &d.join("aid"));
    let other = Identity::generate("other").unwrap();
    let stranger = Identity::generate("stranger").unwrap();
    let (_receiver, ready) = start(
        Command::new(receiver_bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--keep",
                "3",
                "--identity",
            ])
            .arg(d.join("rid"))
            .arg("--store")
            .arg(d.join("store"))
            .arg("--allow")
            .arg(format!("host1={afp}"))
            .arg("--allow")
            .arg(format!("host2={}", other.fingerprint())),
    );
    let addr: SocketAddr = ready.split_whitespace().nth(4).unwrap().parse().unwrap();
    let pin: Fingerprint = rfp.parse().unwrap();

    let image = d.join("vm1.img");
    let size = 32u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let (_agent, _) = start(
        Command::new(&agent_bin)
            .arg("serve")
            .arg("--disk")
            .arg(format!("vm1={}", image.display()))
            .arg("--listen")
            .arg(format!("unix:{}", d.join("nbd.sock").display()))
            .arg("--control")
            .arg(d.join("ctl.sock")),
    );
    let uri = format!("nbd+unix:///vm1?socket={}", d.join("nbd.sock").display());
    let replicate = |identity: &Path, fp: &str| {
        run(Command::new(&agent_bin)
            .arg("replicate")
            .arg("--identity")
            .arg(identity)
            .arg("--receiver")
            .arg(addr.to_string())
            .arg("--receiver-fingerprint")
            .arg(fp)
            .arg("--control")
            .arg(d.join("ctl.sock"))
            .arg("--work-dir")
            .arg(d)
            .arg("--json"))
    };

    // Cycles of writes through NBD, each replicated; the test keeps the source at each cut.
    let mut rng = Rng(0xfeed);
    let mut expected: HashMap<String, Vec<u8>> = HashMap::new();
    let mut committed = Vec::new();
    for cycle in 0..5 {
        let mut cmd = Command::new(tool("qemu-io"));
        cmd.args(["-f", "raw", &uri]);
        for _ in 0..30 {
            let len = 512 * (1 + rng.next() % 256);
            let off = 512 * (rng.next() % ((size - len) / 512));
            let op = match rng.next() % 8 {
                0 => format!("write -z {off} {len}"),
                _ => format!("write -P {} {off} {len}", rng.next() % 255 + 1),
            };
            cmd.arg("-c").arg(op);
        }
        let (ok, _, err) = run(&mut cmd);
        assert!(ok, "qemu-io: {err}");
        let (ok, out, err) = replicate(&d.join("aid"), &rfp);
        assert!(ok, "cycle {cycle}: replicate failed: {err}");
        let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(answer["already_committed"], false);
        if cycle > 0 {
            // An increment carries the change, not the disk.
            assert!(
                answer["delta_bytes"].as_u64().unwrap() < size / 2,
                "{answer}"
            );
        }
        let id = answer["committed"].as_str().unwrap().to_string();
        expected.insert(id.clone(), std::fs::read(&image).unwrap());
        committed.push(id);
    }
    // Every kept point (the newest 3) restores to the source as of its cut.
    let (ok, out, err) = run(Command::new(receiver_bin)
        .args(["points", "--json", "--store"])
        .arg(d.join("store/host1")));
    assert!(ok, "{err}");
    let points: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kept: Vec<String> = points[0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["change_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept, committed[2..].to_vec());
    // Each point records its cut time and consistency level, as the agent sent them.
    for p in points[0]["points"].as_array().unwrap() {
        assert_eq!(p["consistency"], "crash", "{p}");
        // ...and each was checked end to end: the merged image matched the agent's digest.
        assert_eq!(p["digest_checked"], true, "{p}");
        assert_eq!(p["image_digest"].as_str().map(str::len), Some(64), "{p}");
        assert!(
            p["cut_unix_ms"].as_u64().unwrap() > 1_700_000_000_000,
            "{p}"
        );
    }
    for id in &kept {
        let out = d.join("restored.img");
        let (ok, _, err) = run(Command::new(receiver_bin)
            .args(["restore", "--force", "--disk", "vm1", "--point", id, "-o"])
            .arg(&out)
            .arg("--store")
            .arg(d.join("store/host1")));
        assert!(ok, "{err}");
        assert!(
            std::fs::read(&out).unwrap() == expected[id],
            "point {id} differs from the source"
        );
    }

    // A wrong receiver fingerprint, and an agent the receiver does not know: refused at the
    // handshake, with the reason.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let (ok, _, err) = replicate(&d.join("aid"), &wrong);
    assert!(!ok && err.contains("not the pinned"), "{err}");
    stranger.save(&d.join("stranger")).unwrap();
    let (ok, _, err) = replicate(&d.join("stranger"), &rfp);
    assert!(!ok && err.contains("not on the allow-list"), "{err}");
    // One sentence that says what to do, not the TLS layers' text twice over.
    let stranger_fp = stranger.fingerprint().to_string();
    assert!(
        err.contains(&format!("--allow NAME={stranger_fp}")),
        "{err}"
    );
    assert!(
        !err.contains("broke the protocol") && err.matches("allow-list").count() == 1,
        "{err}"
    );

    // Hostile requests from an allowed agent: each refused, the receiver stays up.
    let refused = |r: Response, want: Refusal| match r {
        Response::Refused { refusal, message } => {
            assert_eq!(refusal, want, "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    for name in ["../x", "a/b", "", &"n".repeat(300)] {
        let frame = Request::Newest { disk: name.into() }.encode();
        refused(
            raw_call(&other, addr, pin, &frame, &[]),
            Refusal::BadRequest,
        );
    }
    refused(
        raw_call(&other, addr, pin, b"\xff\xff\xff\xffgarbage", &[]),
        Refusal::BadRequest,
    );
    // A request kind from a newer (or foreign) peer: refused in a sentence, not in the
    // decoder's Debug text.
    match raw_call(&other, addr, pin, &[99, 0, 0, 0], &[]) {
        Response::Refused { refusal, message } => {
            assert_eq!(refusal, Refusal::BadRequest);
            assert!(message.contains("unknown Request kind 99"), "{message}");
            assert!(!message.contains("UnexpectedVariant"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let push = Request::Push { disk: "vm1".into() }.encode();
    // Garbage where the delta should be, properly chunked.
    let mut body = 4096u32.to_le_bytes().to_vec();
    body.extend_from_slice(&[0x5a; 4096]);
    body.extend_from_slice(&0u32.to_le_bytes());
    refused(raw_call(&other, addr, pin, &push, &body), Refusal::Damaged);
    // A chunk length over the limit: refused before anything is read into memory.
    let mut body = (u32::MAX).to_le_bytes().to_vec();
    body.extend_from_slice(&[0x5a; 64]);
    refused(raw_call(&other, addr, pin, &push, &body), Refusal::Damaged);
    // Another agent's disk of the same name is its own, empty: host1's vm1 is out of reach.
    let frame = Request::Newest { disk: "vm1".into() }.encode();
    assert_eq!(
        raw_call(&other, addr, pin, &frame, &[]),
        Response::Newest { change_id: None }
    );
    assert!(!d.join("store/host1/..").join("x").exists());

    // A push cut short: the stream ends inside an announced chunk (refused, nothing
    // committed), and a connection dropped mid-delta (no answer; nothing committed).
    let push = Request::Push { disk: "vm9".into() }.encode();
    let mut body = (1u32 << 20).to_le_bytes().to_vec();
    body.extend_from_slice(&[0u8; 1000]);
    refused(raw_call(&other, addr, pin, &push, &body), Refusal::Damaged);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = ctk_net::connect(&other, addr, pin).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        ctk_net::write_frame(&mut send, &push).await.unwrap();
        send.write_all(&[7u8; 4096]).await.unwrap();
        conn.close(1u32.into(), b"cable pulled");
    });
    let frame = Request::Newest { disk: "vm9".into() }.encode();
    assert_eq!(
        raw_call(&other, addr, pin, &frame, &[]),
        Response::Newest { change_id: None }
    );

    // And the real agent still replicates, from where it was.
    let (ok, out, err) = replicate(&d.join("aid"), &rfp);
    assert!(ok, "{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["from"], committed.last().unwrap().as_str());
    // The cursor on the agent follows the receiver's commits.
    let (ok, out, _) = run(Command::new(&agent_bin)
        .args(["status", "--json", "--control"])
        .arg(d.join("ctl.sock")));
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cursor = &status["disks"][0]["cursors"][0];
    assert_eq!(cursor["at"], answer["committed"]);
    // ... with the age of the receiver's newest commit.
    let age = cursor["age_s"].as_f64().unwrap();
    assert!((0.0..60.0).contains(&age), "{cursor}");

    // One replication per disk and cursor at a time: while another holds the lock (here,
    // this test), a second is refused with a clear error, and nothing is pushed.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(d.join("vm1.img.ctk.replicate-replica.lock"))
        .unwrap();
    // SAFETY: flock on an open descriptor touches no memory.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(rc, 0);
    let (ok, _, err) = replicate(&d.join("aid"), &rfp);
    assert!(!ok);
    assert!(err.contains("is running"), "{err}");
    drop(lock);
    let (ok, _, err) = replicate(&d.join("aid"), &rfp);
    assert!(ok, "{err}");
}

/// Either side killed at a random moment of a replication, many times: the receiver
/// (SIGKILL, restarted on the same store) or the agent's `replicate` (SIGKILL). Each time a
/// new replication then runs to the end. Every point the receiver ever committed must equal
/// the source as of the attempt that made it; nothing half-merged is ever listed.
///
/// One piece: each trial kills, restarts and checks against what every earlier trial
/// committed.
#[test]
fn replication_survives_either_side_killed_at_random_moments() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let receiver_bin = &receiver_bin();
    let agent_bin = agent_bin();
    let rfp = init(receiver_bin, &d.join("rid"));
    let afp = init(&agent_bin, &d.join("aid"));
    // Every point of every trial is kept, to be checked at the end.
    let trials = trials_wanted(12) as usize;
    let keep = trials * 2 + 10;
    let (mut receiver, mut addr) = start_receiver_keeping(receiver_bin, d, &afp, keep);
    let image = d.join("vm1.img");
    let size = 48u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let (_agent, _) = start(
        Command::new(&agent_bin)
            .arg("serve")
            .arg("--disk")
            .arg(format!("vm1={}", image.display()))
            .arg("--listen")
            .arg(format!("unix:{}", d.join("nbd.sock").display()))
            .arg("--control")
            .arg(d.join("ctl.sock")),
    );
    let uri = format!("nbd+unix:///vm1?socket={}", d.join("nbd.sock").display());
    let replicate = |addr: SocketAddr| {
        let mut c = Command::new(&agent_bin);
        c.arg("replicate")
            .arg("--identity")
            .arg(d.join("aid"))
            .arg("--receiver")
            .arg(addr.to_string())
            .arg("--receiver-fingerprint")
            .arg(&rfp)
            .arg("--control")
            .arg(d.join("ctl.sock"))
            .arg("--work-dir")
            .arg(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let points = || -> Vec<String> {
        if !d.join("store/host1").exists() {
            return Vec::new();
        }
        let (ok, out, err) = run(Command::new(receiver_bin)
            .args(["points", "--json", "--store"])
            .arg(d.join("store/host1")));
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .first()
            .map(|disk| {
                disk["points"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["change_id"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut rng = Rng(0x0dd_ba11);
    let mut content: HashMap<String, u32> = HashMap::new();
    let (mut receiver_kills, mut agent_kills) = (0, 0);
    for trial in 0..trials {
        // Writes through NBD, then the source as this attempt will cut it.
        let mut cmd = Command::new(tool("qemu-io"));
        cmd.args(["-f", "raw", &uri]);
        for _ in 0..20 {
            let len = 4096 * (1 + rng.next() % 64);
            let off = 4096 * (rng.next() % ((size - len) / 4096));
            cmd.arg("-c")
                .arg(format!("write -P {} {off} {len}", rng.next() % 255 + 1));
        }
        let (ok, _, err) = run(&mut cmd);
        assert!(ok, "qemu-io: {err}");
        let now = crc(&std::fs::read(&image).unwrap());
        let mut child = replicate(addr).spawn().unwrap();
        // The first full takes longest; aim the kills into the transfer and the merge.
        std::thread::sleep(std::time::Duration::from_micros(rng.next() % 150_000));
        if trial % 2 == 0 {
            let _ = receiver.0.kill();
            let _ = receiver.0.wait();
            receiver_kills += 1;
            // The orphaned client would wait out QUIC's idle timeout: end it too.
            let _ = child.kill();
            let _ = child.wait();
            (receiver, addr) = start_receiver_keeping(receiver_bin, d, &afp, keep);
        } else {
            let _ = child.kill();
            agent_kills += 1;
            let _ = child.wait();
        }
        // Whatever that attempt committed holds the source as of that attempt.
        for p in points() {
            content.entry(p).or_insert(now);
        }
        // Then a replication that runs to the end, from wherever the receiver stands.
        let out = replicate(addr).stderr(Stdio::piped()).output().unwrap();
        assert!(
            out.status.success(),
            "trial {trial}: the replication after a kill failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for p in points() {
            content.entry(p).or_insert(now);
        }
    }
    // Every point the receiver keeps restores to what the source was when it was cut.
    let kept = points();
    assert!(kept.len() >= trials, "{} points", kept.len());
    // And each was checked against the agent's digest when merged, kills or not: the agent
    // records its next leaves before each push, so one killed after the receiver's commit
    // still knows them on the next run.
    let (ok, out, err) = run(Command::new(receiver_bin)
        .args(["points", "--json", "--store"])
        .arg(d.join("store/host1")));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let unchecked: Vec<&serde_json::Value> = v[0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["digest_checked"] != true)
        .collect();
    assert!(
        unchecked.is_empty(),
        "points merged unchecked: {unchecked:?}"
    );
    for id in &kept {
        let out = d.join("r.img");
        let (ok, _, err) = run(Command::new(receiver_bin)
            .args(["restore", "--force", "--disk", "vm1", "--point", id, "-o"])
            .arg(&out)
            .arg("--store")
            .arg(d.join("store/host1")));
        assert!(ok, "{err}");
        assert_eq!(
            crc(&std::fs::read(&out).unwrap()),
            content[id],
            "point {id} diverged"
        );
    }
    let (ok, _, err) = run(Command::new(receiver_bin)
        .args(["verify", "--store"])
        .arg(d.join("store/host1")));
    assert!(ok, "{err}");
    eprintln!(
        "{trials} trials: receiver SIGKILLed {receiver_kills} times, replicate {agent_kills} times; {} points, none diverged",
        kept.len()
    );
}

/// What the lossy link did.
#[derive(Default)]
struct LinkCounters {
    passed: std::sync::atomic::AtomicU64,
    flipped: std::sync::atomic::AtomicU64,
    dropped: std::sync::atomic::AtomicU64,
    duplicated: std::sync::atomic::AtomicU64,
}

/// A UDP relay between one client and `server` that damages traffic both ways: of every 40
/// datagrams about one has a random byte flipped, one is dropped and one is sent twice.
/// Runs until `stop` is set.
fn lossy_link(
    server: SocketAddr,
    seed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    counters: std::sync::Arc<LinkCounters>,
) -> SocketAddr {
    use std::net::UdpSocket;
    use std::sync::atomic::Ordering::Relaxed;
    let front = UdpSocket::bind("127.0.0.1:0").unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").unwrap();
    back.connect(server).unwrap();
    let addr = front.local_addr().unwrap();
    let client: std::sync::Arc<std::sync::Mutex<Option<SocketAddr>>> = Default::default();
    for direction in 0..2u64 {
        let (front, back) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let (stop, counters, client) = (stop.clone(), counters.clone(), client.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(seed ^ (direction + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut buf = vec![0u8; 65536];
            let timeout = Some(std::time::Duration::from_millis(50));
            front.set_read_timeout(timeout).unwrap();
            back.set_read_timeout(timeout).unwrap();
            while !stop.load(Relaxed) {
                let got = if direction == 0 {
                    front.recv_from(&mut buf).map(|(n, from)| {
                        *client.lock().unwrap() = Some(from);
                        n
                    })
                } else {
                    back.recv(&mut buf)
                };
                let Ok(n) = got else { continue };
                let send = |bytes: &[u8]| {
                    if direction == 0 {
                        let _ = back.send(bytes);
                    } else if let Some(to) = *client.lock().unwrap() {
                        let _ = front.send_to(bytes, to);
                    }
                };
                match rng.next() % 40 {
                    0 => {
                        let at = (rng.next() % n as u64) as usize;
                        buf[at] ^= 1 << (rng.next() % 8);
                        counters.flipped.fetch_add(1, Relaxed);
                        send(&buf[..n]);
                    }
                    1 => {
                        counters.dropped.fetch_add(1, Relaxed);
                    }
                    2 => {
                        counters.duplicated.fetch_add(1, Relaxed);
                        send(&buf[..n]);
                        send(&buf[..n]);
                    }
                    _ => {
                        counters.passed.fetch_add(1, Relaxed);
                        send(&buf[..n]);
                    }
                }
            }
        });
    }
    addr
}

/// Replication through a link that flips bytes in datagrams, drops and duplicates them, in
/// both directions. QUIC's packet protection discards a damaged datagram and the transport
/// recovers; the delta's own CRCs and the image digest stand behind that. Every push must
/// commit, every point must restore to the source as of its cut, and each must have been
/// checked against the agent's digest.
#[test]
fn replication_through_a_link_that_flips_drops_and_duplicates_datagrams() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let receiver_bin = &receiver_bin();
    let agent_bin = agent_bin();
    let rfp = init(receiver_bin, &d.join("rid"));
    let afp = init(&agent_bin, &d.join("aid"));
    let (_receiver, server) = start_receiver(receiver_bin, d, &afp);
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(LinkCounters::default());
    let link = lossy_link(server, 0x11_4e_f1_17, stop.clone(), counters.clone());
    let image = d.join("vm1.img");
    let size = 32u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let (_agent, _) = start(
        Command::new(&agent_bin)
            .arg("serve")
            .arg("--disk")
            .arg(format!("vm1={}", image.display()))
            .arg("--listen")
            .arg(format!("unix:{}", d.join("nbd.sock").display()))
            .arg("--control")
            .arg(d.join("ctl.sock")),
    );
    let uri = format!("nbd+unix:///vm1?socket={}", d.join("nbd.sock").display());
    let mut rng = Rng(0xf11b_f11b);
    let mut content: HashMap<String, u32> = HashMap::new();
    let cycles = 5;
    // Incompressible data, so the deltas take thousands of datagrams.
    let noise = d.join("noise.bin");
    for cycle in 0..cycles {
        let bytes: Vec<u8> = (0..256 << 10).map(|_| rng.next() as u8).collect();
        std::fs::write(&noise, bytes).unwrap();
        let mut cmd = Command::new(tool("qemu-io"));
        cmd.args(["-f", "raw", &uri]);
        for _ in 0..16 {
            let len = 4096 * (1 + rng.next() % 64);
            let off = 4096 * (rng.next() % ((size - len) / 4096));
            cmd.arg("-c")
                .arg(format!("write -s {} {off} {len}", noise.display()));
        }
        let (ok, _, err) = run(&mut cmd);
        assert!(ok, "qemu-io: {err}");
        let now = crc(&std::fs::read(&image).unwrap());
        let (ok, out, err) = run(Command::new(&agent_bin)
            .arg("replicate")
            .arg("--identity")
            .arg(d.join("aid"))
            .arg("--receiver")
            .arg(link.to_string())
            .arg("--receiver-fingerprint")
            .arg(&rfp)
            .arg("--control")
            .arg(d.join("ctl.sock"))
            .arg("--work-dir")
            .arg(d)
            .arg("--json"));
        assert!(
            ok,
            "cycle {cycle}: replication over the lossy link failed: {err}"
        );
        let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
        content.insert(answer["committed"].as_str().unwrap().to_string(), now);
    }
    stop.store(true, Relaxed);
    let (flipped, dropped, duplicated, passed) = (
        counters.flipped.load(Relaxed),
        counters.dropped.load(Relaxed),
        counters.duplicated.load(Relaxed),
        counters.passed.load(Relaxed),
    );
    // The link really did damage traffic (so this is not a clean run in disguise).
    assert!(
        flipped > 20 && dropped > 20 && duplicated > 20,
        "{flipped} flipped, {dropped} dropped, {duplicated} duplicated, {passed} passed"
    );
    let (ok, out, err) = run(Command::new(receiver_bin)
        .args(["points", "--json", "--store"])
        .arg(d.join("store/host1")));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let points = v[0]["points"].as_array().unwrap();
    assert_eq!(points.len(), cycles);
    for p in points {
        assert_eq!(p["digest_checked"], true, "{p}");
        let id = p["change_id"].as_str().unwrap();
        let out = d.join("r.img");
        let (ok, _, err) = run(Command::new(receiver_bin)
            .args(["restore", "--force", "--disk", "vm1", "--point", id, "-o"])
            .arg(&out)
            .arg("--store")
            .arg(d.join("store/host1")));
        assert!(ok, "{err}");
        assert_eq!(
            crc(&std::fs::read(&out).unwrap()),
            content[id],
            "point {id} diverged"
        );
    }
    eprintln!(
        "{cycles} replications through the lossy link: {flipped} datagrams flipped, {dropped} \
         dropped, {duplicated} duplicated, {passed} passed; every point restores exactly"
    );
}

/// Trials per run: `CTK_TRIALS` when set (the crash campaign, tests/campaign.sh), else the
/// default the normal test run uses.
fn trials_wanted(default: u64) -> u64 {
    std::env::var("CTK_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `--receiver` takes a host name: `localhost:PORT` reaches the receiver on 127.0.0.1, and a
/// name that does not resolve is a usage error that says so.
#[test]
fn a_receiver_named_by_its_host_name_is_reached() {
    let pair = Pair::new(3);
    let d = &pair.d;
    let image = d.join("vm1.img");
    random_image(&image, 1 << 20, 5);
    let _agent = pair.serve_disk(&image);
    let by_name = |host: &str| {
        let mut cmd = Command::new(&pair.agent_bin);
        cmd.arg("replicate")
            .arg("--identity")
            .arg(d.join("aid"))
            .arg("--receiver")
            .arg(format!("{host}:{}", pair.addr.port()))
            .arg("--receiver-fingerprint")
            .arg(&pair.rfp)
            .arg("--control")
            .arg(d.join("ctl.sock"))
            .arg("--work-dir")
            .arg(d)
            .arg("--json");
        run(&mut cmd)
    };
    let (ok, _, err) = by_name("localhost");
    assert!(ok, "replicate --receiver localhost:PORT: {err}");
    // The agent's text status shows the replica cursor as people read it.
    let (ok, out, err) = run(Command::new(&pair.agent_bin)
        .args(["status", "--control"])
        .arg(d.join("ctl.sock")));
    assert!(ok, "{err}");
    assert!(
        out.contains("  cursor replica at ")
            && out.contains(", RPO ")
            && out.contains("(in sync as of 20"),
        "{out}"
    );
    let (ok, _, err) = by_name("no-such-host.invalid");
    assert!(!ok && err.contains("cannot resolve"), "{err}");
}

/// A receiver that does not answer (nothing on that UDP port): the error says what to check.
#[test]
fn a_receiver_that_does_not_answer_is_explained() {
    let pair = Pair::new(3);
    let d = &pair.d;
    let image = d.join("vm1.img");
    random_image(&image, 1 << 20, 6);
    let _agent = pair.serve_disk(&image);
    // A port nothing listens on: bound and dropped.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (ok, _, err) = run(Command::new(&pair.agent_bin)
        .arg("replicate")
        .arg("--identity")
        .arg(d.join("aid"))
        .arg("--receiver")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--receiver-fingerprint")
        .arg(&pair.rfp)
        .arg("--control")
        .arg(d.join("ctl.sock"))
        .arg("--work-dir")
        .arg(d)
        .arg("--json"));
    assert!(!ok);
    assert!(
        err.contains("did not answer") && err.contains(&format!("UDP port {port}")),
        "{err}"
    );
}

/// The agent's `init --json`: one JSON line with the fingerprint the receiver allows.
#[test]
fn the_agents_init_answers_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = run(Command::new(agent_bin())
        .args(["init", "--json", "--identity"])
        .arg(dir.path().join("aid")));
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["created"], true);
    assert!(v["fingerprint"].as_str().unwrap().starts_with("sha256:"));
}
