//! Continuous replication end to end, with real processes over real QUIC on 127.0.0.1:
//! `ctk-agent replicate --every` under a steady NBD write load, then on a throttled link.
//!
//! Checking "every kept point equals the source at its cut" when the cuts happen on their
//! own needs to know where each cut fell. One writer writes in sequence, each write's blocks
//! stamped with the write's number; a cut falls between two writes (it holds NBD writes), so
//! the highest stamp in a restored point names the last write before its cut, and the point
//! must equal the replay of exactly the writes up to that one.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use ctk_agent::nbd_client::NbdClient;
use serde_json::Value;

const BS: usize = 4096;
const SIZE: u64 = 16 << 20;

/// The tests here measure RPOs: one at a time, not competing for the 2 cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Block `block` as write number `index` leaves it: the stamp, the block, then bytes that
/// depend on both (incompressible, so the link limit is tested with real bytes).
fn stamped(index: u64, block: u64) -> Vec<u8> {
    let mut data = vec![0u8; BS];
    data[..8].copy_from_slice(&index.to_le_bytes());
    data[8..16].copy_from_slice(&(block + 1).to_le_bytes());
    let mut x = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block.wrapping_add(1);
    for chunk in data[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data
}

/// The write number a block of a restored image carries (0: never written).
fn stamp_of(image: &[u8], block: usize) -> u64 {
    let b = &image[block * BS..(block + 1) * BS];
    if b[8..16] == (block as u64 + 1).to_le_bytes() {
        u64::from_le_bytes(b[..8].try_into().unwrap())
    } else {
        0
    }
}

/// One write: its number, first block, block count.
type Write = (u64, u64, u64);

/// Writes through NBD in sequence until `stop`, to blocks `0..hot`, 1-4 blocks at a time,
/// pausing `pause` between writes. Returns the writes in order.
fn writer(
    socket: PathBuf,
    hot: u64,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Write>> {
    std::thread::spawn(move || {
        let mut nbd = NbdClient::connect(&socket, "vm1").unwrap();
        let mut rng = Rng(0x5eed_1234);
        let mut log = Vec::new();
        let mut index = 0u64;
        while !stop.load(Ordering::Relaxed) {
            index += 1;
            let count = 1 + rng.next() % 4;
            let first = rng.next() % (hot - count + 1);
            let mut data = Vec::with_capacity(count as usize * BS);
            for b in first..first + count {
                data.extend_from_slice(&stamped(index, b));
            }
            nbd.write(first * BS as u64, &data).unwrap();
            log.push((index, first, count));
            std::thread::sleep(pause);
        }
        nbd.flush().unwrap();
        log
    })
}

/// Restores every kept point of vm1 and checks each equals the replay of the writes up to
/// the last one before its cut, and that the points, in commit order, follow the writes.
/// Returns the highest write number in the newest point.
fn check_points(receiver_bin: &Path, d: &Path, log: &[Write]) -> (usize, u64) {
    let store = d.join("store/host1");
    let listed = points(receiver_bin, &store);
    let kept = listed[0]["points"].as_array().unwrap().clone();
    let blocks = (SIZE as usize) / BS;
    let mut restored = Vec::new();
    for p in &kept {
        let id = p["change_id"].as_str().unwrap();
        assert_eq!(p["digest_checked"], true, "{p}");
        let image = restore(receiver_bin, &store, "vm1", id, &d.join("restored.img"));
        let last = (0..blocks).map(|b| stamp_of(&image, b)).max().unwrap();
        restored.push((last, id.to_owned(), image));
    }
    // Commit order is cut order, and cuts follow the writes.
    for pair in restored.windows(2) {
        assert!(
            pair[0].0 <= pair[1].0,
            "point {} holds write {} but the later point {} only {}",
            pair[0].1,
            pair[0].0,
            pair[1].1,
            pair[1].0
        );
    }
    let mut model = vec![0u8; SIZE as usize];
    let mut next = 0;
    for (last, id, image) in &restored {
        while next < log.len() && log[next].0 <= *last {
            let (index, first, count) = log[next];
            for b in first..first + count {
                let at = b as usize * BS;
                model[at..at + BS].copy_from_slice(&stamped(index, b));
            }
            next += 1;
        }
        if model != *image {
            let bad = (0..blocks)
                .find(|&b| model[b * BS..(b + 1) * BS] != image[b * BS..(b + 1) * BS])
                .unwrap();
            panic!(
                "point {id} (cut after write {last}) differs from the source at its cut: block \
                 {bad} holds write {} where the source had write {}",
                stamp_of(image, bad),
                stamp_of(&model, bad)
            );
        }
    }
    (kept.len(), restored.last().map_or(0, |r| r.0))
}

struct Setup {
    pair: Pair,
    _agent: Proc,
}

impl std::ops::Deref for Setup {
    type Target = Pair;
    fn deref(&self) -> &Pair {
        &self.pair
    }
}

/// A receiver keeping `keep` points and an agent protecting a 16 MiB disk whose
/// application-consistent cuts run a hook that logs to `d/hooks.log`.
fn setup(keep: usize) -> Setup {
    setup_with(Pair::new(keep))
}

fn setup_with(pair: Pair) -> Setup {
    let d = &pair.d;
    let image = d.join("vm1.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let config = format!(
        "control = {:?}\nlisten = [{:?}]\n\n[[disk]]\nname = \"vm1\"\npath = {:?}\n\n\
         [disk.cut]\npre_freeze = [{{ command = \"echo cut >> {}\" }}]\n",
        d.join("ctl.sock"),
        format!("unix:{}", d.join("nbd.sock").display()),
        image,
        d.join("hooks.log").display(),
    );
    std::fs::write(d.join("agent.toml"), config).unwrap();
    let (agent, _) = start(
        Command::new(&pair.agent_bin)
            .arg("serve")
            .arg("--config")
            .arg(d.join("agent.toml")),
    );
    Setup {
        pair,
        _agent: agent,
    }
}

impl Setup {
    /// `ctk-agent replicate ... --json <extra>` started in the background; its JSON lines
    /// are gathered by a thread.
    fn replicate_background(&self, extra: &[&str]) -> (Proc, std::thread::JoinHandle<Vec<Value>>) {
        let mut child = self
            .pair
            .replicate(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = std::thread::spawn(move || {
            BufReader::new(out)
                .lines()
                .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
                .collect()
        });
        (Proc(child), lines)
    }
}

/// Asks a background `replicate` to stop (SIGTERM: after the push under way) and waits.
fn stop(mut p: Proc) {
    // SAFETY: kill with a pid we spawned and still own.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            assert!(status.success(), "replicate ended with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replicate did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn continuous_mode_under_a_steady_write_load_keeps_every_point_equal_to_the_source() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup(20);
    let halt = Arc::new(AtomicBool::new(false));
    let load = writer(
        s.d.join("nbd.sock"),
        (SIZE / BS as u64) / 2,
        Duration::from_millis(2),
        halt.clone(),
    );
    let (repl, lines) =
        s.replicate_background(&["--every", "1s", "--app-every", "10s", "--rpo-warn", "30s"]);
    // A minute in the normal run; `CTK_SOAK_SECS` makes it a soak (tests/campaign.sh).
    let secs = std::env::var("CTK_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60u64);
    std::thread::sleep(Duration::from_secs(secs));
    halt.store(true, Ordering::Relaxed);
    let log = load.join().unwrap();
    // Two more cycles after the last write: the newest point must hold every write.
    std::thread::sleep(Duration::from_millis(2500));
    stop(repl);
    let lines = lines.join().unwrap();

    let errors: Vec<_> = lines.iter().filter(|l| l["error"].is_string()).collect();
    assert!(errors.is_empty(), "cycles failed: {errors:?}");
    let commits = lines.len();
    let application = lines
        .iter()
        .filter(|l| l["consistency"] == "application")
        .count();
    eprintln!(
        "{} writes; {commits} commits, {application} application-consistent",
        log.len()
    );
    assert!(
        commits as u64 >= secs / 3,
        "only {commits} cycles in {secs} s at --every 1s"
    );
    assert!(
        (secs / 20..=secs / 10 + 2).contains(&(application as u64)),
        "{application} application-consistent cuts in {secs} s at --app-every 10s"
    );
    // The hooks ran for exactly those cuts, and never for the crash-consistent ones.
    let hooks = std::fs::read_to_string(s.d.join("hooks.log")).unwrap();
    assert_eq!(hooks.lines().count(), application);
    // Incremental from the second cycle on: never a full again. The receiver is asked for
    // a resume state only by the first push (none failed after it).
    assert!(lines[0]["from"].is_null());
    assert_eq!(lines[0]["resume_asked"], true, "{}", lines[0]);
    for l in &lines[1..] {
        assert!(l["from"].is_string(), "a later cycle sent a full: {l}");
        assert_eq!(l["resume_asked"], false, "asked again after a commit: {l}");
    }
    let (kept, newest) = check_points(&s.receiver_bin, &s.d, &log);
    assert_eq!(kept, 20, "retention keeps the newest 20");
    assert_eq!(
        newest,
        log.last().unwrap().0,
        "the newest point misses writes"
    );
    // The points say which kind of cut they are, as the cycles reported.
    let listed = points(&s.receiver_bin, &s.d.join("store/host1"));
    // The receiver's view of the RPO: the age of its newest cut.
    let rpo = listed[0]["rpo_s"].as_f64().unwrap();
    assert!((0.0..30.0).contains(&rpo), "{}", listed[0]["rpo_s"]);
    for p in listed[0]["points"].as_array().unwrap() {
        let line = lines
            .iter()
            .find(|l| l["committed"] == p["change_id"])
            .unwrap();
        assert_eq!(p["consistency"], line["consistency"], "{p}");
    }
    // Caught up: nothing left to send, and the RPO is the age of the last cut.
    let cursor = s.cursor();
    assert_eq!(cursor["backlog_bytes"], 0, "{cursor}");
    assert_eq!(cursor["eta_s"], 0.0, "{cursor}");
    assert!(cursor["rpo_s"].as_f64().unwrap() < 30.0, "{cursor}");
}

#[test]
fn a_throttled_link_coalesces_then_recovers_without_a_full_resync() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup(50);
    let limit_file = s.d.join("bwlimit");
    let limit = 256u64 << 10;
    std::fs::write(&limit_file, "256K\n").unwrap();
    let (repl, lines) = s.replicate_background(&[
        "--every",
        "1s",
        "--bwlimit-file",
        limit_file.to_str().unwrap(),
    ]);
    // A hot set of 2 MiB rewritten at about 2 MB/s: eight times what the link carries.
    let halt = Arc::new(AtomicBool::new(false));
    let load = writer(
        s.d.join("nbd.sock"),
        512,
        Duration::from_millis(4),
        halt.clone(),
    );
    let throttled = Instant::now();
    let mut worst_rpo = 0.0f64;
    let mut worst_backlog = 0u64;
    while throttled.elapsed() < Duration::from_secs(20) {
        let c = s.cursor();
        worst_rpo = worst_rpo.max(c["rpo_s"].as_f64().unwrap_or(0.0));
        worst_backlog = worst_backlog.max(c["backlog_bytes"].as_u64().unwrap_or(0));
        std::thread::sleep(Duration::from_millis(500));
    }
    // Lift the limit at run time; the writer stops a little later.
    let lifted_ms = unix_ms();
    std::fs::write(&limit_file, "0\n").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    halt.store(true, Ordering::Relaxed);
    let log = load.join().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let recovered = s.cursor();
    stop(repl);
    let lines = lines.join().unwrap();
    let written = log.iter().map(|w| w.2).sum::<u64>() * BS as u64;
    let sent: u64 = lines.iter().filter_map(|l| l["delta_bytes"].as_u64()).sum();
    eprintln!(
        "throttled: worst RPO {worst_rpo:.1}s, worst backlog {worst_backlog}; {} commits, \
         {written} bytes written, {sent} sent; after: {recovered}",
        lines.len()
    );
    let errors: Vec<_> = lines.iter().filter(|l| l["error"].is_string()).collect();
    assert!(errors.is_empty(), "cycles failed: {errors:?}");
    // Behind: the RPO grew well past the 1 s interval, the backlog reached the hot set.
    assert!(worst_rpo > 4.0, "RPO never grew: {worst_rpo}");
    assert!(
        worst_backlog >= 1 << 20,
        "backlog never grew: {worst_backlog}"
    );
    // Coalesced: each push carried each block once, with its newest data, so far less went
    // over the link than was written; and never a full after the first.
    assert!(
        sent < written / 3,
        "sent {sent} of {written} written: no coalescing"
    );
    assert!(lines[0]["from"].is_null());
    for l in &lines[1..] {
        assert!(l["from"].is_string(), "a later cycle sent a full: {l}");
    }
    // The limit held while it was set: no throttled push ran faster than it (plus the one
    // piece allowed ahead).
    let mut checked = 0;
    for l in &lines {
        let (bytes, secs) = (
            l["delta_bytes"].as_u64().unwrap(),
            l["seconds"].as_f64().unwrap(),
        );
        let ended_ms = l["cut_unix_ms"].as_u64().unwrap() + (secs * 1000.0) as u64;
        if bytes >= 512 << 10 && ended_ms < lifted_ms {
            checked += 1;
            let rate = bytes as f64 / secs;
            assert!(
                rate < limit as f64 * 1.3,
                "a push ran at {rate:.0} B/s under a {limit} limit"
            );
        }
    }
    assert!(checked >= 1, "no push ended while the limit was set");
    // Recovered: caught up once the limit was lifted, every point still exact.
    assert_eq!(recovered["backlog_bytes"], 0, "{recovered}");
    assert!(recovered["rpo_s"].as_f64().unwrap() < 4.0, "{recovered}");
    let (_, newest) = check_points(&s.receiver_bin, &s.d, &log);
    assert_eq!(
        newest,
        log.last().unwrap().0,
        "the newest point misses writes"
    );
}

/// An idle disk makes no new points: a cycle with nothing written since the receiver's
/// newest point pushes nothing and says the replica is in sync as of then. And count-only
/// retention under frequent crash points keeps the newest application-consistent point,
/// with a warning on the receiver that its history is short. (Before the fix each idle
/// second became a point, and `--keep` pushed the application point out.)
#[test]
fn idle_cycles_make_no_points_and_count_retention_keeps_the_application_point() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup_with(Pair::new_logged(3));
    let uri = format!("nbd+unix:///vm1?socket={}", s.d.join("nbd.sock").display());
    let write = |i: u64| {
        let (ok, _, err) = run(Command::new(tool("qemu-io"))
            .args(["-f", "raw", &uri, "-c"])
            .arg(format!("write -P {} {} 4k", i % 250 + 1, i * 8192)));
        assert!(ok, "{err}");
    };
    let once = |consistency: &str| -> Value {
        let (ok, out, err) = run(&mut s.replicate(&["--consistency", consistency]));
        assert!(ok, "replicate: {err}");
        serde_json::from_str(&out).unwrap()
    };
    write(0);
    let app = once("application");
    assert_eq!(app["consistency"], "application", "{app}");
    for i in 1..=6 {
        write(i);
        let c = once("crash");
        assert_eq!(c["consistency"], "crash", "{c}");
    }
    let listed = points(&s.receiver_bin, &s.store());
    let kept: Vec<&Value> = listed[0]["points"].as_array().unwrap().iter().collect();
    assert!(
        kept.iter().any(|p| p["change_id"] == app["committed"]),
        "the application-consistent point was dropped by count: {kept:?}"
    );
    assert_eq!(kept.len(), 4, "the newest 3, and the application point");

    // Idle: cycles every 200 ms for 2 s commit nothing new.
    let (repl, lines) = s.replicate_background(&["--every", "200ms"]);
    std::thread::sleep(Duration::from_secs(2));
    stop(repl);
    let lines = lines.join().unwrap();
    assert!(lines.len() >= 3, "{lines:?}");
    let newest = kept.last().unwrap()["change_id"].clone();
    for l in &lines {
        assert_eq!(l["unchanged"], true, "an idle cycle pushed: {l}");
        assert_eq!(l["committed"], newest, "{l}");
        assert_eq!(l["delta_bytes"], 0, "{l}");
    }
    let after = points(&s.receiver_bin, &s.store());
    assert_eq!(
        after[0]["points"].as_array().unwrap().len(),
        4,
        "idle cycles became points"
    );
    // The RPO reads "in sync as of the last cycle", not the age of the last point.
    let cursor = s.cursor();
    assert!(cursor["rpo_s"].as_f64().unwrap() < 1.5, "{cursor}");
    assert_eq!(cursor["at"], newest, "{cursor}");
    let log = std::fs::read_to_string(s.d.join("receiver.log")).unwrap();
    assert!(log.contains("retention by count alone"), "{log}");
}
