//! The NBD front with real clients (qemu-io, qemu-img, nbdinfo) and a raw client that
//! misbehaves on purpose, against a real `ctk-agent serve` process.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A tool the test needs. Missing means failing, never skipping (CI installs them).
fn tool(name: &str) -> &str {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is required (Debian: qemu-utils, libnbd-bin); .ci/run installs it"
    );
    name
}

struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // A failed assertion must not leave the agent running (it holds the test's pipes).
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Agent {
    fn start(dir: &Path, disks: &[(&str, &Path)]) -> Agent {
        Agent::start_with(dir, disks, &[])
    }

    fn start_with(dir: &Path, disks: &[(&str, &Path)], env: &[(&str, &str)]) -> Agent {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ctk-agent"));
        cmd.envs(env.iter().copied());
        cmd.arg("serve");
        for (name, path) in disks {
            cmd.arg("--disk").arg(format!("{name}={}", path.display()));
        }
        cmd.arg("--listen")
            .arg(format!("unix:{}", dir.join("nbd.sock").display()));
        cmd.arg("--control").arg(dir.join("ctl.sock"));
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(
            line.starts_with("ctk-agent ready"),
            "agent did not start: {line:?}"
        );
        Agent {
            child,
            dir: dir.to_owned(),
        }
    }

    fn uri(&self, export: &str) -> String {
        format!(
            "nbd+unix:///{export}?socket={}",
            self.dir.join("nbd.sock").display()
        )
    }

    fn ctl(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_ctk-agent"))
            .args(args)
            .arg("--control")
            .arg(self.dir.join("ctl.sock"))
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctk-agent {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "agent exited with {status}");
    }
}

fn qemu_io(uri: &str, commands: &[String]) {
    let mut cmd = Command::new(tool("qemu-io"));
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("error"),
        "qemu-io failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Random qemu-io writes: sizes from 512 bytes to 256 KiB at 512-byte aligned offsets, plus
/// zeroing and discards.
fn random_writes(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let len = 512 * (1 + rng.next_u64() % 512);
            let off = 512 * (rng.next_u64() % ((size - len) / 512));
            match rng.next_u64() % 10 {
                0 => format!("write -z {off} {len}"),
                1 => format!("discard {off} {len}"),
                _ => format!("write -P {} {off} {len}", rng.next_u64() % 255 + 1),
            }
        })
        .collect()
}

fn apply(delta: &Path, replica: &Path) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(replica)
        .unwrap();
    ctk::delta::apply(
        std::io::BufReader::new(std::fs::File::open(delta).unwrap()),
        &file,
        None,
    )
    .unwrap();
}

/// Exports read the disk directly (past the page cache) by default; the test machine's
/// filesystem takes O_DIRECT, so this runs that path, right after writes that may still sit
/// dirty in the page cache.
#[test]
fn qemu_io_writes_cut_export_apply_reproduces_the_source_each_cycle() {
    write_cut_export_apply_cycles(&[], "direct");
}

/// The same through the page cache (`CTK_DIRECT_IO=off`, or a filesystem that refuses
/// O_DIRECT).
#[test]
fn exports_through_the_page_cache_reproduce_the_source_each_cycle() {
    write_cut_export_apply_cycles(&[("CTK_DIRECT_IO", "off")], "page cache");
}

fn write_cut_export_apply_cycles(env: &[(&str, &str)], reads: &str) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    // Not a multiple of 4 KiB (but of 512, as QEMU wants): the partial last block is read
    // through the page cache even when the rest is read directly.
    let size = (64u64 << 20) + 512;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let agent = Agent::start_with(dir.path(), &[("d0", &image)], env);
    let status = agent.ctl(&["status"]);
    assert_eq!(status["disks"][0]["export_reads"], reads, "{status}");
    let uri = agent.uri("d0");
    let mut rng = Rng(0x5eed_1234);
    // First full, from the start of tracking.
    qemu_io(&uri, &random_writes(&mut rng, size, 40));
    let full = dir.path().join("full.ctkd");
    let answer = agent.ctl(&["export", "--since", "all", "-o", full.to_str().unwrap()]);
    let mut previous = answer["to"].as_str().unwrap().to_string();
    let replica = dir.path().join("replica.img");
    std::fs::File::create(&replica).unwrap();
    apply(&full, &replica);
    assert!(
        std::fs::read(&replica).unwrap() == std::fs::read(&image).unwrap(),
        "full differs"
    );
    for cycle in 0..4 {
        qemu_io(&uri, &random_writes(&mut rng, size, 60));
        let delta = dir.path().join(format!("d{cycle}.ctkd"));
        let answer = agent.ctl(&[
            "export",
            "--since",
            &previous,
            "-o",
            delta.to_str().unwrap(),
        ]);
        // An incremental carries what changed, not the disk.
        assert!(
            answer["delta_bytes"].as_u64().unwrap() < size / 4,
            "{answer}"
        );
        apply(&delta, &replica);
        assert!(
            std::fs::read(&replica).unwrap() == std::fs::read(&image).unwrap(),
            "cycle {cycle}: replica differs"
        );
        previous = answer["to"].as_str().unwrap().to_string();
    }
    // Other real clients see the export as it is.
    let info = Command::new(tool("nbdinfo")).arg(&uri).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("export-size: 67109376"));
    let img = Command::new(tool("qemu-img"))
        .args(["info", &uri])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&img.stdout).contains("67109376 bytes"));
    // And so does the change map.
    let changed = agent.ctl(&["changed", "--since", &previous]);
    assert_eq!(changed["changed_bytes"], 0);
    agent.stop();
}

/// A raw NBD client speaking just enough protocol to misbehave.
struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(dir: &Path) -> Raw {
        let mut s = UnixStream::connect(dir.join("nbd.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        Raw { s }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    fn option(&mut self, option: u32, data: &[u8]) -> (u32, Vec<u8>) {
        let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
        self.option_reply()
    }

    fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut head = [0u8; 20];
        self.s.read_exact(&mut head).unwrap();
        let reply = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).unwrap();
        (reply, data)
    }

    /// Fixed newstyle, no zeroes, then NBD_OPT_GO for `name`.
    fn go(dir: &Path, name: &str) -> Raw {
        let mut raw = Raw::connect(dir);
        raw.send(&3u32.to_be_bytes());
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        m.extend_from_slice(&7u32.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(&data);
        raw.send(&m);
        loop {
            let (reply, _) = raw.option_reply();
            if reply == 1 {
                return raw;
            }
            assert_eq!(reply, 3, "expected INFO replies before ACK");
        }
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        assert!(
            self.try_request(kind, cookie, offset, length, payload),
            "send failed"
        );
    }

    /// Sends a request; false if the server is gone.
    fn try_request(
        &mut self,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> bool {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&length.to_be_bytes());
        r.extend_from_slice(payload);
        self.s.write_all(&r).is_ok()
    }

    /// Reads a simple reply; returns (error, cookie).
    fn reply(&mut self, data_len: usize) -> (u32, u64) {
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head).unwrap();
        assert_eq!(
            u32::from_be_bytes(head[0..4].try_into().unwrap()),
            0x6744_6698
        );
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
        if error == 0 && data_len > 0 {
            let mut data = vec![0u8; data_len];
            self.s.read_exact(&mut data).unwrap();
        }
        (error, u64::from_be_bytes(head[8..16].try_into().unwrap()))
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn bad_clients_get_protocol_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    let size = 16u64 << 20;
    std::fs::write(&image, vec![0x5au8; size as usize]).unwrap();
    let agent = Agent::start(dir.path(), &[("d0", &image)]);
    let before = std::fs::read(&image).unwrap();

    // Garbage instead of client flags and options: the connection is closed.
    let mut raw = Raw::connect(dir.path());
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(raw.closed());

    // Unknown option: an error reply, and the connection stays usable.
    let mut raw = Raw::connect(dir.path());
    raw.send(&1u32.to_be_bytes());
    assert_eq!(raw.option(99, b"whatever").0, (1 << 31) + 1);
    // An export that does not exist.
    let mut go = 5u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"nope!");
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(raw.option(7, &go).0, (1 << 31) + 6);
    // A GO payload whose name length lies.
    let mut liar = 4000u32.to_be_bytes().to_vec();
    liar.extend_from_slice(b"d0");
    assert_eq!(raw.option(7, &liar).0, (1 << 31) + 3);
    // An option claiming a payload far beyond the limit is discarded and refused.
    let mut big = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    big.extend_from_slice(&6u32.to_be_bytes());
    big.extend_from_slice(&(200_000u32).to_be_bytes());
    raw.send(&big);
    raw.send(&vec![0u8; 200_000]);
    assert_eq!(raw.option_reply().0, (1 << 31) + 9);
    // TLS is refused by policy.
    assert_eq!(raw.option(5, &[]).0, (1 << 31) + 2);
    assert_eq!(raw.option(2, &[]).0, 1); // ABORT is acknowledged

    // Transmission-phase misuse.
    let mut raw = Raw::go(dir.path(), "d0");
    raw.request(0, 1, size - 100, 4096, &[]); // read past the end
    assert_eq!(raw.reply(4096), (22, 1));
    raw.request(1, 2, size - 100, 4096, &[0xee; 4096]); // write past the end
    assert_eq!(raw.reply(0), (28, 2));
    raw.request(1, 3, 0, 64 << 20, &[]); // a write longer than the maximum...
    raw.send(&vec![0xee; 64 << 20]); // ...whose payload is discarded
    assert_eq!(raw.reply(0), (75, 3));
    raw.request(0, 4, 0, u32::MAX, &[]); // an oversized read
    assert_eq!(raw.reply(0), (75, 4));
    raw.request(42, 5, 0, 4096, &[]); // unknown command
    assert_eq!(raw.reply(0), (22, 5));
    raw.request(4, 6, u64::MAX - 10, 4096, &[]); // trim with an overflowing range
    assert_eq!(raw.reply(0), (28, 6));
    // Still in step: a valid read works.
    raw.request(0, 7, 0, 4096, &[]);
    assert_eq!(raw.reply(4096), (0, 7));
    // Bad request magic: the server cannot resync and closes.
    raw.send(&[0xffu8; 28]);
    assert!(raw.closed());

    // A client that disconnects in the middle of a write payload.
    let mut raw = Raw::go(dir.path(), "d0");
    raw.request(1, 8, 0, 65536, &[0xee; 1000]);
    drop(raw);

    std::thread::sleep(Duration::from_millis(200));
    assert!(
        std::fs::read(&image).unwrap() == before,
        "a refused request changed the image"
    );
    // The agent is still up for everyone else, and nothing was tracked.
    qemu_io(&agent.uri("d0"), &["read -P 0x5a 0 64k".to_string()]);
    let answer = agent.ctl(&["status"]);
    assert_eq!(answer["disks"][0]["writes"], 0, "{answer}");
    agent.stop();
}

#[test]
fn control_socket_refuses_bad_requests_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let agent = Agent::start(dir.path(), &[("d0", &image)]);
    let ask = |line: &[u8]| -> serde_json::Value {
        let mut s = UnixStream::connect(dir.path().join("ctl.sock")).unwrap();
        s.write_all(line).unwrap();
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    for (line, expect) in [
        (&b"not json\n"[..], "not JSON"),
        (b"{\"cmd\":\"format-c\"}\n", "unknown command"),
        (
            b"{\"cmd\":\"changed\",\"since\":\"zz/1\"}\n",
            "malformed ChangeId",
        ),
        (b"{\"cmd\":\"cut\",\"disk\":\"../etc\"}\n", "no disk named"),
        (
            b"{\"cmd\":\"export\",\"since\":\"all\",\"path\":\"relative.ctkd\"}\n",
            "must be absolute",
        ),
    ] {
        let answer = ask(line);
        assert_eq!(answer["ok"], false);
        assert!(
            answer["error"].as_str().unwrap().contains(expect),
            "{answer}"
        );
    }
    let other = format!("{{\"cmd\":\"changed\",\"since\":\"{:032x}/1\"}}\n", 7);
    assert!(
        ask(other.as_bytes())["error"]
            .as_str()
            .unwrap()
            .contains("full or compare pass")
    );
    let huge = vec![b'x'; 100_000];
    assert!(ask(&huge)["error"].as_str().unwrap().contains("too long"));
    // The agent still answers.
    assert_eq!(agent.ctl(&["status"])["ok"], true);
    agent.stop();
}

/// SIGKILL with writes in flight: after a restart, `changed --since` the last cut covers every
/// write the client had seen acknowledged.
#[test]
fn sigkill_with_writes_in_flight_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    let size = 32u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let mut rng = Rng(0xdead_beef);
    let trials = 8;
    let mut acked_total = 0;
    for trial in 0..trials {
        let agent = Agent::start(dir.path(), &[("d0", &image)]);
        let cut = agent.ctl(&["cut"])["change_id"]
            .as_str()
            .unwrap()
            .to_string();
        let mut raw = Raw::go(dir.path(), "d0");
        let pid = agent.child.id() as i32;
        let kill_after = 20 + rng.next_u64() % 200;
        let mut acked = Vec::new();
        for i in 0..10_000u64 {
            if i == kill_after {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let len = 4096 * (1 + rng.next_u64() % 16);
            let off = 4096 * (rng.next_u64() % ((size - len) / 4096));
            if !raw.try_request(1, i, off, len as u32, &vec![0x77; len as usize]) {
                break;
            }
            let mut head = [0u8; 16];
            if raw.s.read_exact(&mut head).is_err() {
                break;
            }
            assert_eq!(u32::from_be_bytes(head[4..8].try_into().unwrap()), 0);
            acked.push((off, len));
        }
        let mut agent = agent;
        let _ = agent.child.wait();
        // Restart: the journal recovers; every acknowledged write is reported since the cut.
        let agent = Agent::start(dir.path(), &[("d0", &image)]);
        let changed = agent.ctl(&["changed", "--since", &cut]);
        let extents: Vec<(u64, u64)> = changed["extents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_u64().unwrap(), e[1].as_u64().unwrap()))
            .collect();
        for &(off, len) in &acked {
            let covered = extents.iter().any(|&(o, l)| o <= off && off + len <= o + l);
            assert!(
                covered,
                "trial {trial}: acknowledged write at {off} (+{len}) is missing"
            );
        }
        acked_total += acked.len();
        agent.stop();
    }
    eprintln!("{trials} SIGKILL trials, {acked_total} acknowledged writes checked, none missing");
    assert!(
        acked_total >= trials * 20,
        "too few writes were acknowledged to test anything"
    );
}

/// Regression: a full export of a disk with whole 64 Ki-block chunks (256 MiB at 4 KiB) was
/// answered with no extents at all (roaring 0.12's next_many on full containers), a silent
/// under-report. The delta of "all" must carry the whole disk.
#[test]
fn a_full_export_of_a_large_disk_carries_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.img");
    let size = 320u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let agent = Agent::start(dir.path(), &[("big", &image)]);
    qemu_io(
        &agent.uri("big"),
        &["write -P 0x42 0 1M".into(), "write -P 0x43 300M 1M".into()],
    );
    let full = dir.path().join("full.ctkd");
    let answer = agent.ctl(&["export", "--since", "all", "-o", full.to_str().unwrap()]);
    assert_eq!(answer["changed_bytes"].as_u64(), Some(size), "{answer}");
    let replica = dir.path().join("replica.img");
    std::fs::File::create(&replica).unwrap();
    apply(&full, &replica);
    assert!(std::fs::read(&replica).unwrap() == std::fs::read(&image).unwrap());
    agent.stop();
}

/// fio's nbd engine as a real client: random writes of mixed sizes at iodepth 16, read back
/// and verified by fio (crc32c) through the agent; then the change map must cover every byte
/// fio wrote.
#[test]
fn fio_writes_verify_through_the_agent_and_are_all_tracked() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    let size = 64u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let agent = Agent::start(dir.path(), &[("d0", &image)]);
    let start = agent.ctl(&["cut"])["change_id"]
        .as_str()
        .unwrap()
        .to_string();
    // Only the first 48 MiB is written, so the change map has something to leave out.
    let out = Command::new(tool("fio"))
        .args([
            "--name=verify",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=16",
        ])
        .arg("--size=48M")
        .args([
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=0",
        ])
        .arg(format!("--uri={}", agent.uri("d0")))
        // fio leaves a verify-state file in its working directory: keep it in the test's.
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("err= 0"),
        "fio failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.ctl(&["cut"]);
    let changed = agent.ctl(&["changed", "--since", &start]);
    // fio's random writes with verify cover the whole 48 MiB job region exactly once.
    assert_eq!(
        changed["changed_bytes"].as_u64(),
        Some(48 << 20),
        "{changed}"
    );
    assert_eq!(changed["extents"][0][0], 0);
    agent.stop();
}

/// `nbdinfo --json --map=CONTEXT`: the `(offset, length, type)` rows.
fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let out = Command::new(tool("nbdinfo"))
        .args(["--json", &format!("--map={context}"), uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbdinfo --map={context}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["offset"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                r["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The byte ranges of `rows` whose type has `bit`, merged.
fn ranges_with(rows: &[(u64, u64, u64)], bit: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len, ty) in rows {
        if ty & bit == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

#[test]
fn nbdinfo_maps_allocation_and_the_changed_blocks_of_a_running_disk() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    let size = 32u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let agent = Agent::start(dir.path(), &[("d0", &image)]);
    let uri = agent.uri("d0");
    qemu_io(
        &uri,
        &["write -P 1 1M 64k".into(), "write -P 2 20M 4k".into()],
    );
    // base:allocation: the sparse file's data where it was written, holes elsewhere.
    let alloc = nbdinfo_map(&uri, "base:allocation");
    assert_eq!(alloc.iter().map(|r| r.1).sum::<u64>(), size, "{alloc:?}");
    let data: Vec<(u64, u64)> = alloc
        .iter()
        .filter(|r| r.2 & 1 == 0)
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(data, vec![(1 << 20, 64 << 10), (20 << 20, 4 << 10)]);

    let cut = agent.ctl(&["cut"]);
    let id = cut["change_id"].as_str().unwrap().to_string();
    // Nothing written since the cut: the whole disk is clean.
    let context = format!("ctk:changed:{id}");
    assert_eq!(nbdinfo_map(&uri, &context), vec![(0, size, 0)]);
    // Writes after the cut, not cut yet: reported at block granularity (4 KiB), a
    // sub-block write as its whole block, and exactly those.
    qemu_io(
        &uri,
        &[
            "write -P 3 2M 8k".into(),
            "write -P 4 9000 100".into(),
            "write -z 30M 1M".into(),
        ],
    );
    let expected = vec![(8192, 4096), (2 << 20, 8192), (30 << 20, 1 << 20)];
    let rows = nbdinfo_map(&uri, &context);
    assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), size, "{rows:?}");
    assert_eq!(ranges_with(&rows, 1), expected);
    // After another cut the same ChangeId answers the same, and agrees with `changed`.
    let cut2 = agent.ctl(&["cut"]);
    assert_eq!(ranges_with(&nbdinfo_map(&uri, &context), 1), expected);
    let changed = agent.ctl(&[
        "changed",
        "--since",
        &id,
        "--to",
        cut2["change_id"].as_str().unwrap(),
    ]);
    let from_ctl: Vec<(u64, u64)> = changed["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_u64().unwrap(), e[1].as_u64().unwrap()))
        .collect();
    assert_eq!(from_ctl, expected);
    // The contexts on offer are listed, so a user can discover the ChangeIds to ask for.
    let list = Command::new(tool("nbdinfo"))
        .args(["--list", &uri])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("base:allocation"), "{text}");
    assert!(text.contains(&context), "{text}");
    // A ChangeId of another generation, or one that does not parse, selects nothing.
    for bad in [
        "ctk:changed:00000000000000000000000000000001/1",
        "ctk:changed:zz",
    ] {
        let out = Command::new(tool("nbdinfo"))
            .args([&format!("--map={bad}"), uri.as_str()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} was accepted");
    }
    agent.stop();
}

#[test]
fn nbdcopy_copies_out_and_in_and_every_byte_copied_in_is_tracked() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    let size = 24u64 << 20;
    let mut content = vec![0u8; size as usize];
    let mut rng = Rng(0xc0ffee);
    for chunk in content[..8 << 20].chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    std::fs::write(&image, &content).unwrap();
    let agent = Agent::start(dir.path(), &[("d0", &image)]);
    let uri = agent.uri("d0");
    // Out: the export, copied by nbdcopy (which reads base:allocation to skip holes).
    let out = dir.path().join("out.img");
    let status = Command::new(tool("nbdcopy"))
        .args([uri.as_str(), out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read(&out).unwrap() == content, "copy out differs");

    // In: a different image written over the export, after a cut.
    let id = agent.ctl(&["cut"])["change_id"]
        .as_str()
        .unwrap()
        .to_string();
    let source = dir.path().join("src.img");
    let mut other = vec![0u8; size as usize];
    for chunk in other[4 << 20..12 << 20].chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    std::fs::write(&source, &other).unwrap();
    let status = Command::new(tool("nbdcopy"))
        .args([source.to_str().unwrap(), uri.as_str()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read(&image).unwrap() == other, "copy in differs");
    // Every block whose contents changed is reported at the next cut (nbdcopy may also
    // zero ranges that were zero already: an over-report, which is allowed).
    agent.ctl(&["cut"]);
    let changed = agent.ctl(&["changed", "--since", &id]);
    let extents: Vec<(u64, u64)> = changed["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_u64().unwrap(), e[1].as_u64().unwrap()))
        .collect();
    for block in 0..size / 4096 {
        let at = (block * 4096) as usize;
        if content[at..at + 4096] != other[at..at + 4096] {
            let off = block * 4096;
            assert!(
                extents.iter().any(|&(o, l)| o <= off && off < o + l),
                "block at {off} changed but is not reported"
            );
        }
    }
    agent.stop();
}

impl Raw {
    /// Reads one structured reply chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut head = [0u8; 20];
        self.s.read_exact(&mut head).unwrap();
        assert_eq!(&head[0..4], &0x668e_33efu32.to_be_bytes(), "not a chunk");
        let flags = u16::from_be_bytes(head[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(head[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).unwrap();
        (flags, kind, cookie, payload)
    }
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = (export.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

#[test]
fn meta_context_and_block_status_misuse_gets_errors_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    let size = 8u64 << 20;
    std::fs::write(&image, vec![0x33u8; size as usize]).unwrap();
    let agent = Agent::start(dir.path(), &[("d0", &image)]);
    let before = std::fs::read(&image).unwrap();
    const INVALID: u32 = (1 << 31) + 3;
    const UNKNOWN: u32 = (1 << 31) + 6;
    const TOO_BIG: u32 = (1 << 31) + 9;

    let mut raw = Raw::connect(dir.path());
    raw.send(&3u32.to_be_bytes());
    // SET before structured replies: refused.
    let set = meta_payload("d0", &["base:allocation"]);
    assert_eq!(raw.option(10, &set).0, INVALID);
    // Structured replies take no data.
    assert_eq!(raw.option(8, b"x").0, INVALID);
    assert_eq!(raw.option(8, &[]).0, 1);
    // A query count that claims more queries than bytes; a truncated payload; an unknown
    // export; a malformed ChangeId in ctk's namespace; an unknown ctk context.
    let mut liar = meta_payload("d0", &[]);
    liar[6..10].copy_from_slice(&1_000_000u32.to_be_bytes());
    assert_eq!(raw.option(10, &liar).0, INVALID);
    assert_eq!(raw.option(10, &set[..set.len() - 3]).0, INVALID);
    assert_eq!(raw.option(10, &meta_payload("nope", &[])).0, UNKNOWN);
    let (code, why) = raw.option(10, &meta_payload("d0", &["ctk:changed:12/x"]));
    assert_eq!(code, INVALID);
    assert!(
        String::from_utf8_lossy(&why).contains("ctk:changed:"),
        "no reason given"
    );
    assert_eq!(
        raw.option(9, &meta_payload("d0", &["ctk:bogus"])).0,
        INVALID
    );
    // Too many contexts at once: base:allocation plus the 8 newest cuts (repeats count once).
    let mut latest = String::new();
    for _ in 0..9 {
        latest = agent.ctl(&["cut"])["change_id"]
            .as_str()
            .unwrap()
            .to_string();
    }
    let (generation, seq) = latest.split_once('/').unwrap();
    let seq: u64 = seq.parse().unwrap();
    let mut queries = vec!["base:allocation".to_string(); 2];
    for s in seq - 7..=seq {
        queries.push(format!("ctk:changed:{generation}/{s}"));
        queries.push(format!("ctk:changed:{generation}/{s}"));
    }
    let q: Vec<&str> = queries.iter().map(|s| s.as_str()).collect();
    assert_eq!(raw.option(10, &meta_payload("d0", &q)).0, TOO_BIG);
    // One fewer fits, and every context comes back with its own id.
    let (mut code, mut data) = raw.option(10, &meta_payload("d0", &q[2..]));
    let mut ids = Vec::new();
    while code == 4 {
        ids.push(u32::from_be_bytes(data[0..4].try_into().unwrap()));
        (code, data) = raw.option_reply();
    }
    assert_eq!((code, ids), (1, (1..=8).collect::<Vec<u32>>()));
    drop(raw);

    // Transmission: structured, but no context selected -> BLOCK_STATUS is an error chunk.
    let mut raw = Raw::connect(dir.path());
    raw.send(&3u32.to_be_bytes());
    assert_eq!(raw.option(8, &[]).0, 1);
    let mut go = 2u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"d0");
    go.extend_from_slice(&0u16.to_be_bytes());
    let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&(go.len() as u32).to_be_bytes());
    m.extend_from_slice(&go);
    raw.send(&m);
    while raw.option_reply().0 != 1 {}
    raw.request(7, 1, 0, 4096, &[]);
    let (flags, kind, cookie, payload) = raw.chunk();
    assert_eq!((flags & 1, kind, cookie), (1, (1 << 15) + 1, 1));
    assert_eq!(&payload[0..4], &22u32.to_be_bytes());
    // A structured read: one data chunk carrying the offset, then the bytes.
    raw.request(0, 2, 4096, 512, &[]);
    let (flags, kind, cookie, payload) = raw.chunk();
    assert_eq!((flags & 1, kind, cookie), (1, 1, 2));
    assert_eq!(&payload[0..8], &4096u64.to_be_bytes());
    assert!(payload[8..].iter().all(|&b| b == 0x33));
    // A read past the end: an error chunk (a simple reply is not allowed for READ).
    raw.request(0, 3, size - 10, 512, &[]);
    let (_, kind, cookie, payload) = raw.chunk();
    assert_eq!((kind, cookie), ((1 << 15) + 1, 3));
    assert_eq!(&payload[0..4], &22u32.to_be_bytes());
    drop(raw);

    // With base:allocation selected: out of range and zero-length queries are refused,
    // REQ_ONE answers one descriptor, and the stream stays in step throughout.
    let mut raw = Raw::connect(dir.path());
    raw.send(&3u32.to_be_bytes());
    assert_eq!(raw.option(8, &[]).0, 1);
    let (code, data) = raw.option(10, &meta_payload("d0", &["base:allocation"]));
    assert_eq!(code, 4);
    assert_eq!(&data[0..4], &1u32.to_be_bytes());
    assert_eq!(raw.option_reply().0, 1);
    raw.send(&m);
    while raw.option_reply().0 != 1 {}
    raw.request(7, 4, size - 100, 4096, &[]);
    assert_eq!(raw.chunk().1, (1 << 15) + 1);
    raw.request(7, 5, 0, 0, &[]);
    assert_eq!(raw.chunk().1, (1 << 15) + 1);
    let mut one = 0x2560_9513u32.to_be_bytes().to_vec();
    one.extend_from_slice(&(1u16 << 3).to_be_bytes());
    one.extend_from_slice(&7u16.to_be_bytes());
    one.extend_from_slice(&6u64.to_be_bytes());
    one.extend_from_slice(&0u64.to_be_bytes());
    one.extend_from_slice(&(size as u32).to_be_bytes());
    raw.send(&one);
    let (flags, kind, cookie, payload) = raw.chunk();
    assert_eq!((flags & 1, kind, cookie, payload.len()), (1, 5, 6, 12));
    raw.request(0, 7, 0, 4096, &[]);
    assert_eq!(raw.chunk().2, 7);
    drop(raw);

    std::thread::sleep(Duration::from_millis(100));
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the image changed"
    );
    qemu_io(&agent.uri("d0"), &["read -P 0x33 0 64k".to_string()]);
    agent.stop();
}

/// Many requests pipelined on one connection: writes into fresh regions (each waits on an
/// intent fsync, so they run on threads of their own and finish out of order) between
/// inline reads and a FLUSH. Every request gets exactly one well-formed reply, matched by
/// cookie, and the data is there afterwards.
#[test]
fn pipelined_requests_are_each_answered_once_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    let size = 64u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let agent = Agent::start(dir.path(), &[("d0", &image)]);
    let mut raw = Raw::go(dir.path(), "d0");
    let mut expect_data = std::collections::HashMap::new();
    let mut cookie = 0u64;
    for i in 0..40u64 {
        cookie += 1;
        // One write per 1 MiB region: every one needs its own intent.
        let at = i * (1 << 20) + 4096 * (i % 7);
        raw.request(1, cookie, at, 4096, &[i as u8 + 1; 4096]);
        expect_data.insert(cookie, 0usize);
        cookie += 1;
        raw.request(0, cookie, 0, 512, &[]);
        expect_data.insert(cookie, 512usize);
    }
    cookie += 1;
    raw.request(3, cookie, 0, 0, &[]);
    expect_data.insert(cookie, 0);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..expect_data.len() {
        let mut head = [0u8; 16];
        raw.s.read_exact(&mut head).unwrap();
        assert_eq!(&head[0..4], &0x6744_6698u32.to_be_bytes());
        assert_eq!(&head[4..8], &0u32.to_be_bytes(), "a request failed");
        let c = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let len = *expect_data
            .get(&c)
            .expect("a reply for a cookie never sent");
        assert!(seen.insert(c), "cookie {c} answered twice");
        let mut data = vec![0u8; len];
        raw.s.read_exact(&mut data).unwrap();
    }
    drop(raw);
    let image_bytes = std::fs::read(&image).unwrap();
    for i in 0..40u64 {
        let at = (i * (1 << 20) + 4096 * (i % 7)) as usize;
        assert!(image_bytes[at..at + 4096].iter().all(|&b| b == i as u8 + 1));
    }
    // And every write is tracked.
    agent.ctl(&["cut"]);
    let status = agent.ctl(&["status"]);
    assert_eq!(status["disks"][0]["writes"], 40, "{status}");
    agent.stop();
}
