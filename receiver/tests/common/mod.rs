//! What the receiver's own process tests share: the binary, processes that die with the
//! test, a receiver started, a seeded Rng. (Tests with an agent too are in tests/.)
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub mod chain;
pub mod nbd;

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
