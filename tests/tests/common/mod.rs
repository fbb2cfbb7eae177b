//! What the end-to-end tests of agent and receiver together share: the binaries, processes that die with the
//! test, a receiver and an agent started and paired, a seeded Rng.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A binary of this workspace, beside the test's own (`target/<profile>/`): `cargo test
/// --workspace` builds them all; a test binary run alone needs them built first.
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // target/<profile>/deps/<test>-<hash>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a test binary under target/<profile>/deps")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

pub fn agent_bin() -> PathBuf {
    workspace_bin("ctk-agent")
}

pub fn receiver_bin() -> PathBuf {
    workspace_bin("ctk-receiver")
}

pub fn tool(name: &str) -> &str {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .status()
        .unwrap();
    assert!(found.success(), "{name} is required; .ci/run installs it");
    name
}

pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a daemon and waits for its ready line; returns it and the line.
pub fn start(cmd: &mut Command) -> (Proc, String) {
    start_with(cmd, Stdio::inherit())
}

/// `start`, its stderr (its log) going to `stderr`.
pub fn start_with(cmd: &mut Command, stderr: Stdio) -> (Proc, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(stderr).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("ready"), "did not start: {line:?}");
    (Proc(child), line)
}

pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn init(bin: &Path, dir: &Path) -> String {
    let (ok, out, err) = run(Command::new(bin).arg("init").arg("--identity").arg(dir));
    assert!(ok, "init: {err}");
    out.trim().to_string()
}

pub use ctk::seeded::XorShift64 as Rng;

pub fn start_receiver(bin: &Path, d: &Path, afp: &str) -> (Proc, SocketAddr) {
    start_receiver_keeping(bin, d, afp, 50)
}

/// A receiver on 127.0.0.1 with its identity in `d/rid` and store in `d/store`, allowing
/// the agent `afp` as `host1`, keeping `keep` points per disk.
pub fn start_receiver_keeping(bin: &Path, d: &Path, afp: &str, keep: usize) -> (Proc, SocketAddr) {
    start_receiver_at(bin, d, afp, keep, "127.0.0.1:0".parse().unwrap())
}

/// `start_receiver_keeping` on a given address (a restart on the port agents know).
pub fn start_receiver_at(
    bin: &Path,
    d: &Path,
    afp: &str,
    keep: usize,
    listen: SocketAddr,
) -> (Proc, SocketAddr) {
    // The log goes to the test's stderr, and to `d/receiver.log` when that file exists
    // (tests that check what the receiver logs create it).
    let log = d.join("receiver.log");
    let stderr = match std::fs::OpenOptions::new().append(true).open(&log) {
        Ok(f) => Stdio::from(f),
        Err(_) => Stdio::inherit(),
    };
    let (p, ready) = start_with(
        Command::new(bin)
            .args(["serve", "--listen", &listen.to_string(), "--keep"])
            .arg(keep.to_string())
            .arg("--identity")
            .arg(d.join("rid"))
            .arg("--store")
            .arg(d.join("store"))
            .arg("--allow")
            .arg(format!("host1={afp}")),
        stderr,
    );
    (p, ready.split_whitespace().nth(4).unwrap().parse().unwrap())
}

pub fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// The points of every disk in a store, as `ctk-receiver points --json` lists them.
pub fn points(receiver_bin: &Path, store: &Path) -> serde_json::Value {
    let (ok, out, err) = run(Command::new(receiver_bin)
        .args(["points", "--json", "--store"])
        .arg(store));
    assert!(ok, "points: {err}");
    serde_json::from_str(&out).unwrap()
}

/// A restore point materialized and read back.
pub fn restore(receiver_bin: &Path, store: &Path, disk: &str, point: &str, out: &Path) -> Vec<u8> {
    let (ok, _, err) = run(Command::new(receiver_bin)
        .args(["restore", "--force", "--disk", disk, "--point", point, "-o"])
        .arg(out)
        .arg("--store")
        .arg(store));
    assert!(ok, "restore {point}: {err}");
    std::fs::read(out).unwrap()
}

/// `ctk-agent replicate --json` to the receiver at `addr`, with the agent's identity in
/// `d/aid`, its control socket `d/ctl.sock` and `d` as work directory.
pub fn replicate_cmd(agent_bin: &Path, d: &Path, addr: SocketAddr, rfp: &str) -> Command {
    let mut cmd = Command::new(agent_bin);
    cmd.arg("replicate")
        .arg("--identity")
        .arg(d.join("aid"))
        .arg("--receiver")
        .arg(addr.to_string())
        .arg("--receiver-fingerprint")
        .arg(rfp)
        .arg("--control")
        .arg(d.join("ctl.sock"))
        .arg("--work-dir")
        .arg(d)
        .arg("--json");
    cmd
}

/// One request over a raw connection, as a misbehaving agent would send it.
pub fn raw_call(
    identity: &ctk_net::Identity,
    addr: SocketAddr,
    pin: ctk_net::Fingerprint,
    frame: &[u8],
    body: &[u8],
) -> ctk_net::wire::Response {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = ctk_net::connect(identity, addr, pin).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&(frame.len() as u32).to_le_bytes())
            .await
            .unwrap();
        send.write_all(frame).await.unwrap();
        send.write_all(body).await.unwrap();
        send.finish().unwrap();
        let answer = ctk_net::read_frame(&mut recv).await.unwrap();
        ctk_net::wire::Response::decode(&answer).unwrap()
    })
}

/// `ctk-agent serve` protecting `image` as vm1 (NBD `d/nbd.sock`, control `d/ctl.sock`).
pub fn serve_cmd(agent_bin: &Path, d: &Path, image: &Path) -> Command {
    let mut cmd = Command::new(agent_bin);
    cmd.arg("serve")
        .arg("--disk")
        .arg(format!("vm1={}", image.display()))
        .arg("--listen")
        .arg(format!("unix:{}", d.join("nbd.sock").display()))
        .arg("--control")
        .arg(d.join("ctl.sock"));
    cmd
}

/// A receiver on 127.0.0.1 and both identities in a temporary directory `d`, paired (the
/// agent as `host1`, its store `d/store/host1`); each test starts the agent it needs.
pub struct Pair {
    pub _dir: tempfile::TempDir,
    pub d: PathBuf,
    pub receiver_bin: PathBuf,
    pub agent_bin: PathBuf,
    pub rfp: String,
    pub afp: String,
    pub keep: usize,
    pub addr: SocketAddr,
    pub receiver: Proc,
}

impl Pair {
    pub fn new(keep: usize) -> Pair {
        Pair::new_in(tempfile::tempdir().unwrap(), keep)
    }

    /// `new` in a directory the caller prepared (say, with `store` on a filesystem of its
    /// own).
    pub fn new_in(dir: tempfile::TempDir, keep: usize) -> Pair {
        Pair::new_in_logged(dir, keep, false)
    }

    /// `new`, the receiver's log kept in `d/receiver.log` (for tests of what it logs).
    pub fn new_logged(keep: usize) -> Pair {
        Pair::new_in_logged(tempfile::tempdir().unwrap(), keep, true)
    }

    fn new_in_logged(dir: tempfile::TempDir, keep: usize, logged: bool) -> Pair {
        let d = dir.path().to_owned();
        if logged {
            std::fs::File::create(d.join("receiver.log")).unwrap();
        }
        let receiver_bin = receiver_bin();
        let agent_bin = agent_bin();
        let rfp = init(&receiver_bin, &d.join("rid"));
        let afp = init(&agent_bin, &d.join("aid"));
        let (receiver, addr) = start_receiver_keeping(&receiver_bin, &d, &afp, keep);
        Pair {
            _dir: dir,
            d,
            receiver_bin,
            agent_bin,
            rfp,
            afp,
            keep,
            addr,
            receiver,
        }
    }

    /// SIGKILLs the receiver and starts it again on the same store and address.
    pub fn restart_receiver(&mut self) {
        let _ = self.receiver.0.kill();
        let _ = self.receiver.0.wait();
        let (p, _) =
            start_receiver_at(&self.receiver_bin, &self.d, &self.afp, self.keep, self.addr);
        self.receiver = p;
    }

    /// `ctk-agent serve` protecting `image` as vm1 (NBD `d/nbd.sock`, control `d/ctl.sock`).
    pub fn serve_disk(&self, image: &Path) -> Proc {
        start(&mut serve_cmd(&self.agent_bin, &self.d, image)).0
    }

    /// `ctk-agent replicate --json <extra>` to this receiver.
    pub fn replicate(&self, extra: &[&str]) -> Command {
        let mut cmd = replicate_cmd(&self.agent_bin, &self.d, self.addr, &self.rfp);
        cmd.args(extra);
        cmd
    }

    pub fn store(&self) -> PathBuf {
        self.d.join("store/host1")
    }

    /// `ctk-agent failback --json --disk vm1 <extra>` to this receiver.
    pub fn failback(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(&self.agent_bin);
        cmd.arg("failback")
            .arg("--identity")
            .arg(self.d.join("aid"))
            .arg("--receiver")
            .arg(self.addr.to_string())
            .arg("--receiver-fingerprint")
            .arg(&self.rfp)
            .arg("--control")
            .arg(self.d.join("ctl.sock"))
            .arg("--work-dir")
            .arg(&self.d)
            .args(["--disk", "vm1", "--json"])
            .args(extra);
        cmd
    }

    /// `ctk-receiver failover start --json` of vm1 (at `point`, else the newest), served on
    /// `d/failover.sock`.
    pub fn failover_start(&self, point: Option<&str>) -> Command {
        let mut cmd = Command::new(&self.receiver_bin);
        cmd.args(["failover", "start", "--disk", "vm1", "--json", "--store"])
            .arg(self.store())
            .arg("--listen")
            .arg(format!("unix:{}", self.d.join("failover.sock").display()));
        if let Some(p) = point {
            cmd.args(["--point", p]);
        }
        cmd
    }

    /// The `replica` cursor of the first disk, as `ctk-agent status --json` shows it.
    pub fn cursor(&self) -> serde_json::Value {
        let (ok, out, err) = run(Command::new(&self.agent_bin)
            .args(["status", "--json", "--control"])
            .arg(self.d.join("ctl.sock")));
        assert!(ok, "status: {err}");
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        status["disks"][0]["cursors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "replica")
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

/// Writes `size` seeded random bytes to `path` (incompressible: a bandwidth limit holds a
/// push of it back, and every unit differs from every other).
pub fn random_image(path: &Path, size: u64, seed: u64) {
    let mut rng = Rng(seed | 1);
    let bytes: Vec<u8> = (0..size / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    std::fs::write(path, bytes).unwrap();
}

/// `write -P pattern offset 64k` through the NBD export `vm1` at `sock` (qemu-io); the
/// error text if it failed.
pub fn nbd_write(sock: &Path, pattern: u8, offset: u64) -> Result<(), String> {
    let uri = format!("nbd+unix:///vm1?socket={}", sock.display());
    let (ok, out, err) = run(Command::new(tool("qemu-io")).args([
        "-f",
        "raw",
        &uri,
        "-c",
        &format!("write -P {pattern} {offset} 64k"),
    ]));
    if ok && !out.contains("error") && !out.contains("failed") {
        Ok(())
    } else {
        Err(format!("{out}{err}"))
    }
}
