//! What the agent's process tests share: the agent started from a configuration, its
//! client commands, and filesystems mounted from its NBD export (nbdfuse + loop device).
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod nbd;

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests mount filesystems: run them as root (CI does)"
    );
}

/// Fails (never skips) when a tool the test drives is missing; .ci/run installs them.
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .status()
                .unwrap()
                .success(),
            "{tool} is required; .ci/run installs it"
        );
    }
}

pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Is the filesystem frozen? A write to a frozen filesystem blocks (uninterruptibly) until
/// it is thawed, so the probe runs in a child that we only wait for boundedly.
pub fn frozen(mnt: &Path, wait: Duration) -> bool {
    let mut probe = Command::new("touch")
        .arg(mnt.join(".probe"))
        .spawn()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < wait {
        if probe.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Still blocked: frozen. The probe finishes once something thaws it.
    std::thread::spawn(move || probe.wait());
    true
}

/// How long a small synced write to the mount takes (it waits out any freeze).
pub fn write_time(mnt: &Path) -> Duration {
    let started = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo x > {0}/.timed && sync -f {0}/.timed",
            mnt.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    started.elapsed()
}

pub struct Agent {
    pub child: Child,
    pub control: PathBuf,
    pub nbd: PathBuf,
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

pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ctk-agent")
}

impl Agent {
    /// `ctk-agent serve` with `config` (written to `dir/agent.toml`), control socket
    /// `dir/ctl.sock` and NBD socket `dir/nbd.sock`; waits for its ready line.
    pub fn start(dir: &Path, config: &str) -> Agent {
        let (out, agent) = Agent::try_start(dir, config);
        agent.unwrap_or_else(|| panic!("agent did not start: {out}"))
    }

    /// As `start`, but returns what the agent printed (and its stderr) when it did not
    /// start instead of failing.
    pub fn try_start(dir: &Path, config: &str) -> (String, Option<Agent>) {
        Agent::try_start_bin(dir, config, Path::new(agent_bin()))
    }

    /// `try_start` of the agent binary at `bin`.
    pub fn try_start_bin(dir: &Path, config: &str, bin: &Path) -> (String, Option<Agent>) {
        let config_path = dir.join("agent.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--config"]).arg(&config_path);
        Agent::launch(cmd, dir)
    }

    /// `launch` of `cmd` (a `serve` command line), which must start.
    pub fn launch_cmd(cmd: Command, dir: &Path) -> Agent {
        let (out, agent) = Agent::launch(cmd, dir);
        agent.unwrap_or_else(|| panic!("agent did not start: {out}"))
    }

    /// Runs `cmd` (a `serve` command line) with control socket `dir/ctl.sock` and NBD socket
    /// `dir/nbd.sock`, and waits for its ready line: the agent, or what it printed (and its
    /// stderr) when it did not start.
    fn launch(mut cmd: Command, dir: &Path) -> (String, Option<Agent>) {
        let control = dir.join("ctl.sock");
        let nbd = dir.join("nbd.sock");
        let mut child = cmd
            .arg("--control")
            .arg(&control)
            .arg("--listen")
            .arg(format!("unix:{}", nbd.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if !line.starts_with("ctk-agent ready") {
            let out = child.wait_with_output().unwrap();
            return (
                format!("{line}{}", String::from_utf8_lossy(&out.stderr)),
                None,
            );
        }
        // Keep its logs flowing to the test's stderr.
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::stderr()));
        (
            line,
            Some(Agent {
                child,
                control,
                nbd,
            }),
        )
    }

    /// `ctk-agent serve --disk NAME=PATH ...` with no configuration file, and `env` added to
    /// its environment; control socket `dir/ctl.sock`, NBD socket `dir/nbd.sock`.
    pub fn serve(dir: &Path, disks: &[(&str, &Path)], env: &[(&str, &str)]) -> Agent {
        let mut cmd = Command::new(agent_bin());
        cmd.envs(env.iter().copied()).arg("serve");
        for (name, path) in disks {
            cmd.arg("--disk").arg(format!("{name}={}", path.display()));
        }
        let (out, agent) = Agent::launch(cmd, dir);
        agent.unwrap_or_else(|| panic!("agent did not start: {out}"))
    }

    /// The NBD URI of one of the agent's exports.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd.display())
    }

    pub fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new(agent_bin())
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .arg("--json")
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "ctk-agent {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// One request line on the control socket (JSON, as docs/format.md section 7 says);
    /// the answer's JSON (`ok` left for the caller to check).
    pub fn call(&self, line: &str) -> serde_json::Value {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&self.control).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    }

    pub fn latest(&self, disk: &str) -> String {
        let status = self.ok(&["status"]);
        let d = status["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == disk)
            .unwrap();
        d["latest"].as_str().unwrap().to_string()
    }

    pub fn stop(mut self) {
        self.terminate();
    }

    pub fn terminate(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        assert!(self.child.wait().unwrap().success());
    }

    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// A sparse image of `mib` MiB at `dir/name.img`.
pub fn disk_image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(format!("{name}.img"));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    path
}

/// A filesystem on an agent's disk, the way a host uses one: the agent's NBD export through
/// nbdfuse, a loop device over nbdfuse's file, ext4 on it, mounted. Torn down on drop,
/// whatever state it is in (thawed, lazily unmounted if its device died with the agent).
pub struct Stack {
    pub mnt: PathBuf,
    fuse: PathBuf,
    loopdev: Option<String>,
    nbdfuse: Option<Child>,
}

impl Stack {
    /// Mounts the filesystem on export `disk` of the agent listening on `nbd` at `mnt`
    /// (created), making ext4 on it first if `mkfs`. nbdfuse's mount point is
    /// `<mnt>.fuse`.
    pub fn mount(nbd: &Path, disk: &str, mnt: &Path, mkfs: bool) -> Stack {
        require_tools(&["nbdfuse", "fusermount3", "losetup", "mkfs.ext4"]);
        let fuse = mnt.with_extension("fuse");
        std::fs::create_dir_all(&fuse).unwrap();
        std::fs::create_dir_all(mnt).unwrap();
        let pidfile = mnt.with_extension("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let nbdfuse = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&fuse)
            .arg(format!("nbd+unix:///{disk}?socket={}", nbd.display()))
            .spawn()
            .unwrap();
        let mut stack = Stack {
            mnt: mnt.to_owned(),
            fuse: fuse.clone(),
            loopdev: None,
            nbdfuse: Some(nbdfuse),
        };
        let started = Instant::now();
        while !pidfile.exists() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "nbdfuse did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let dev = sh(&format!("losetup -f --show {}", fuse.join("nbd").display()));
        stack.loopdev = Some(dev.clone());
        if mkfs {
            sh(&format!("mkfs.ext4 -q -F {dev}"));
        }
        sh(&format!("mount {dev} {}", mnt.display()));
        stack
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Whatever went wrong, never leave the host with a frozen filesystem.
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        if let Some(dev) = &self.loopdev {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.fuse)
            .stderr(Stdio::null())
            .status();
        if let Some(mut p) = self.nbdfuse.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}
