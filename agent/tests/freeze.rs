//! The freeze of an application-consistent cut against real filesystems (root only; CI
//! runs as root): the watchdog when the agent is killed or hangs mid-cut, a destage longer
//! than the freeze, freeze targets that are not the disk's own filesystem, and the label a
//! cut earns.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Agent, Stack, agent_bin, disk_image, frozen, require_root, require_tools, sh, write_time,
};

/// A small ext4 filesystem on a loop device over a plain file: not on any agent disk.
struct PlainFs {
    mnt: PathBuf,
}

impl PlainFs {
    fn new(dir: &Path, name: &str) -> PlainFs {
        require_tools(&["mkfs.ext4"]);
        let image = dir.join(format!("{name}.fs"));
        let mnt = dir.join(name);
        std::fs::create_dir_all(&mnt).unwrap();
        sh(&format!(
            "truncate -s 32M {0} && mkfs.ext4 -q -F {0} && mount -o loop {0} {1}",
            image.display(),
            mnt.display()
        ));
        PlainFs { mnt }
    }
}

impl Drop for PlainFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_watchdog_thaws_when_the_agent_is_killed_or_hangs_mid_cut() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mnt = d.join("mnt");
    let m = mnt.display();
    // The destage step stands in for a cache that never reports clean: the cut sits in the
    // middle, filesystem frozen and NBD writes of the disk being cut held. The filesystem
    // is on the agent's disk "fs".
    let config = format!(
        r#"
[[disk]]
name = "fs"
path = "{fs}"

[[disk]]
name = "stuck"
path = "{stuck}"
[disk.cut]
freeze = ["{m}"]
freeze_timeout_ms = 60000
destage = [{{ clean_check = "sleep 602", timeout_ms = 600000 }}]

[[disk]]
name = "slow"
path = "{slow}"
[disk.cut]
freeze = ["{m}"]
freeze_timeout_ms = 300
destage = [{{ clean_check = "sleep 1" }}]
on_failure = "crash-consistent"

[[disk]]
name = "slow-abort"
path = "{slow_abort}"
[disk.cut]
freeze = ["{m}"]
freeze_timeout_ms = 300
destage = [{{ clean_check = "sleep 1" }}]
"#,
        fs = disk_image(d, "fs", 32).display(),
        stuck = disk_image(d, "stuck", 8).display(),
        slow = disk_image(d, "slow", 8).display(),
        slow_abort = disk_image(d, "slow-abort", 8).display(),
    );

    // The agent hangs past the freeze timeout: the watchdog's deadline ends the destage,
    // writes are released, the filesystem thaws, and the cut is recorded as crash-consistent
    // (the configured fallback) or aborted (the default).
    let agent = Agent::start(d, &config);
    let fs = Stack::mount(&agent.nbd, "fs", &mnt, true);
    let cut = agent.ok(&["cut", "--disk", "slow"]);
    assert_eq!(cut["consistency"], "crash", "{cut}");
    assert!(
        cut["warnings"][0].as_str().unwrap().contains("watchdog"),
        "{cut}"
    );
    assert!(!frozen(&fs.mnt, Duration::from_secs(5)));
    let before = agent.latest("slow-abort");
    let out = agent.cmd(&["cut", "--disk", "slow-abort"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cut aborted") && stderr(&out).contains("watchdog"),
        "{}",
        stderr(&out)
    );
    assert_eq!(agent.latest("slow-abort"), before, "an aborted cut sealed");
    assert!(!frozen(&fs.mnt, Duration::from_secs(5)));

    // The agent is SIGKILLed while the filesystem is frozen: the helper sees its parent go
    // and thaws, long before its own 60 s timeout.
    let cutter = Command::new(agent_bin())
        .args(["cut", "--disk", "stuck", "--control"])
        .arg(&agent.control)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !frozen(&fs.mnt, Duration::from_millis(300)) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the cut never froze the filesystem"
        );
    }
    let mut agent = agent;
    agent.kill();
    let killed_at = Instant::now();
    assert!(
        !frozen(&fs.mnt, Duration::from_secs(10)),
        "still frozen after the agent died"
    );
    eprintln!(
        "thawed {:?} after the agent was killed",
        killed_at.elapsed()
    );
    // The client of the cut says plainly that the agent went away (it once said "the
    // agent's answer is not JSON: EOF while parsing").
    let out = cutter.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("closed the connection without answering"),
        "{}",
        stderr(&out)
    );
    drop(fs);
    // The destage step's process group goes with the agent (checked in its own test); a
    // leftover here would only be this test's noise.
    let _ = Command::new("pkill").args(["-f", "sleep 602"]).status();
}

/// The agent killed at random instants around the freeze: before the helper starts, while it
/// is inside FIFREEZE, before its "frozen" reaches the agent, while frozen. Whatever the
/// instant, the mount is thawed soon after. (CI once caught the helper exiting on a failed
/// "frozen" report without thawing; this campaign aims at that window.) Each trial mounts the
/// filesystem from a new agent's export.
#[test]
fn killing_the_agent_at_random_instants_of_a_freeze_never_leaves_a_mount_frozen() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = disk_image(d, "stuck", 32);
    sh(&format!("mkfs.ext4 -q -F {}", image.display()));
    let mnt = d.join("mnt");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("seed {seed}");
    let mut rng = seed;
    const TRIALS: u64 = 10;
    let mut frozen_when_killed = 0;
    let config = format!(
        r#"
[[disk]]
name = "stuck"
path = "{}"
[disk.cut]
freeze = ["{}"]
freeze_timeout_ms = 60000
destage = [{{ clean_check = "sleep 603", timeout_ms = 600000 }}]
"#,
        image.display(),
        mnt.display()
    );
    for trial in 0..TRIALS {
        // A kill leaves the filesystem unclean: repair it before the agent protects it.
        let _ = Command::new("e2fsck")
            .args(["-fy"])
            .arg(&image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let mut agent = Agent::start(d, &config);
        let fs = Stack::mount(&agent.nbd, "stuck", &mnt, false);
        // Dirty the filesystem so FIFREEZE has a sync to do and the window is wider.
        std::fs::write(fs.mnt.join("dirty"), vec![trial as u8; 4 << 20]).unwrap();
        let mut cutter = Command::new(agent_bin())
            .args(["cut", "--disk", "stuck", "--control"])
            .arg(&agent.control)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(rng % 60_000));
        // Was the helper already running at the kill (in FIFREEZE, reporting, or frozen)?
        // Counted, so the campaign shows that it hit the window it aims at.
        let helper_alive = Command::new("pgrep")
            .args(["-f", "ctk-agent freeze-helper"])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        agent.kill();
        frozen_when_killed += u32::from(helper_alive);
        assert!(
            !frozen(&fs.mnt, Duration::from_secs(10)),
            "trial {trial} (seed {seed}): still frozen 10 s after the agent was killed"
        );
        let _ = cutter.wait();
        drop(fs);
    }
    let _ = Command::new("pkill").args(["-f", "sleep 603"]).status();
    eprintln!(
        "{TRIALS} trials, {frozen_when_killed} killed with the freeze helper running, none left a mount frozen"
    );
}

/// The helper itself, its parent alive but deaf (stdout closed before "frozen" is written):
/// nobody could ever ask for the thaw, so it must thaw at once rather than exit frozen.
#[test]
fn a_freeze_helper_that_cannot_report_thaws_at_once() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let fs = PlainFs::new(dir.path(), "mnt");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut helper = Command::new(agent_bin())
        .args(["freeze-helper", "--timeout-ms", "60000"])
        .arg(&fs.mnt)
        .stdin(Stdio::piped())
        .stdout(writer)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while helper.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the helper waited on a parent that cannot hear it"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !frozen(&fs.mnt, Duration::from_secs(5)),
        "the helper exited and left the mount frozen"
    );
    drop(fs);
}

/// A destage step longer than the freeze timeout, on a disk whose filesystem writes through
/// the agent: the watchdog's deadline bounds how long writers wait. (Before the fix, NBD
/// writes stayed held through the whole destage, the watchdog's thaw blocked on its
/// superblock write, and a write to the filesystem waited out the destage: about 11.7 s
/// here.)
#[test]
fn a_destage_longer_than_the_freeze_never_stalls_writers_past_the_freeze_timeout() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mnt = d.join("mnt");
    let config = format!(
        r#"
[[disk]]
name = "vm"
path = "{}"
[disk.cut]
freeze = ["{}"]
freeze_timeout_ms = 4000
destage = [{{ clean_check = "sleep 12", timeout_ms = 60000 }}]
"#,
        disk_image(d, "vm", 64).display(),
        mnt.display()
    );
    let agent = Agent::start(d, &config);
    let fs = Stack::mount(&agent.nbd, "vm", &mnt, true);
    let before = agent.latest("vm");
    let cutter = {
        let control = agent.control.clone();
        std::thread::spawn(move || {
            Command::new(agent_bin())
                .args(["cut", "--disk", "vm", "--json", "--control"])
                .arg(control)
                .output()
                .unwrap()
        })
    };
    let started = Instant::now();
    while !frozen(&fs.mnt, Duration::from_millis(100)) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the cut never froze the filesystem"
        );
    }
    let frozen_seen = started.elapsed();
    let blocked = write_time(&fs.mnt);
    let out = cutter.join().unwrap();
    eprintln!(
        "frozen seen after {frozen_seen:?}; a write then waited {blocked:?}; cut: {}",
        stderr(&out).trim()
    );
    // The freeze began at most `frozen_seen` before the write; it must end within its 4 s.
    assert!(
        blocked < Duration::from_millis(4500),
        "a write waited {blocked:?} behind a 4 s freeze"
    );
    assert_eq!(out.status.code(), Some(1), "the overrun cut must abort");
    assert!(stderr(&out).contains("freeze watchdog"), "{}", stderr(&out));
    assert_eq!(agent.latest("vm"), before, "an aborted cut sealed");
    // The destage step was killed at the deadline, not left running.
    let leftover = Command::new("pgrep")
        .args(["-f", "sleep 12"])
        .output()
        .unwrap();
    assert!(leftover.stdout.is_empty(), "the destage step still runs");
    assert!(!frozen(&fs.mnt, Duration::from_secs(2)));
    drop(fs);
    agent.stop();
}

/// Freeze targets that are not the disk's own mounted filesystem are refused: a directory
/// that is not a mount point (freezing it would freeze /), / itself, and a filesystem on a
/// loop device over a plain file (it does not write through the agent). Before the fix the
/// first froze the root filesystem and the cut still said "application".
#[test]
fn freeze_targets_that_are_not_the_disks_filesystem_are_refused() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let unmounted = d.join("unmounted");
    std::fs::create_dir_all(&unmounted).unwrap();
    let config = |plain: &Path| {
        format!(
            r#"
[[disk]]
name = "unmounted"
path = "{a}"
[disk.cut]
freeze = ["{u}"]
freeze_timeout_ms = 1000

[[disk]]
name = "elsewhere"
path = "{b}"
[disk.cut]
freeze = ["{p}"]
freeze_timeout_ms = 1000

[[disk]]
name = "fallback"
path = "{c}"
[disk.cut]
freeze = ["{u}"]
freeze_timeout_ms = 1000
on_failure = "crash-consistent"
"#,
            a = d.join("a.img").display(),
            b = d.join("b.img").display(),
            c = d.join("c.img").display(),
            u = unmounted.display(),
            p = plain.display(),
        )
    };
    for n in ["a", "b", "c"] {
        disk_image(d, n, 8);
    }
    // Mounted already, a filesystem that does not write through the agent is refused when
    // the configuration is loaded.
    let plain = PlainFs::new(d, "plain");
    let (out, agent) = Agent::try_start(d, &config(&plain.mnt));
    assert!(agent.is_none(), "started with a foreign freeze target");
    assert!(out.contains("does not go through this agent"), "{out}");
    // Mounted after the agent started (the usual order for the disk's own filesystem), it
    // is refused at the cut.
    let later = d.join("later");
    std::fs::create_dir_all(&later).unwrap();
    let agent = Agent::start(d, &config(&later));
    sh(&format!(
        "mount -o loop {} {}",
        d.join("plain.fs").display(),
        later.display()
    ));
    let later_fs = PlainFs { mnt: later };
    let out = agent.cmd(&["cut", "--disk", "elsewhere"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr(&out).contains("does not go through this agent"),
        "{}",
        stderr(&out)
    );
    assert!(!frozen(&later_fs.mnt, Duration::from_secs(2)));
    let out = agent.cmd(&["cut", "--disk", "unmounted"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr(&out).contains("not a mount point"),
        "{}",
        stderr(&out)
    );
    // With the fallback configured the cut happens, labelled for what it is.
    let cut = agent.ok(&["cut", "--disk", "fallback"]);
    assert_eq!(cut["consistency"], "crash", "{cut}");
    assert!(
        cut["warnings"][0]
            .as_str()
            .unwrap()
            .contains("not a mount point"),
        "{cut}"
    );
    agent.stop();
    drop(later_fs);
    drop(plain);

    // / is refused when the configuration is loaded.
    let root = format!(
        "[[disk]]\nname = \"r\"\npath = \"{}\"\n[disk.cut]\nfreeze = [\"/\"]\n",
        disk_image(d, "r", 8).display()
    );
    let (out, agent) = Agent::try_start(d, &root);
    assert!(agent.is_none(), "an agent that would freeze / started");
    assert!(out.contains("never freeze /"), "{out}");
}

/// "application" is a label a cut earns: with no hook and no freeze target, asking for it is
/// refused, and the default is a crash cut. (Before the fix the cut answered
/// "consistency":"application" and the receiver showed it so.)
#[test]
fn a_cut_with_nothing_to_quiesce_is_never_labelled_application() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = format!(
        "[[disk]]\nname = \"bare\"\npath = \"{}\"\n",
        disk_image(d, "bare", 8).display()
    );
    let agent = Agent::start(d, &config);
    let before = agent.latest("bare");
    let out = agent.cmd(&["cut", "--consistency", "application"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no pre_freeze hook and no freeze target"),
        "{}",
        stderr(&out)
    );
    assert_eq!(agent.latest("bare"), before, "a refused cut sealed");
    let cut = agent.ok(&["cut"]);
    assert_eq!(cut["consistency"], "crash", "{cut}");
    let exported = agent.cmd(&[
        "export",
        "--since",
        "all",
        "--consistency",
        "application",
        "-o",
        d.join("x.ctkd").to_str().unwrap(),
    ]);
    assert_eq!(exported.status.code(), Some(1));
    assert!(!d.join("x.ctkd").exists(), "a refused export left a file");
    agent.stop();
}

/// Hooks and destage steps, and whatever they start, die with a SIGKILLed agent. (Before
/// the fix they ran on in their own process group: here, `sleep`s for ten minutes.)
#[test]
fn hooks_and_destage_steps_die_with_a_killed_agent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = format!(
        r#"
[[disk]]
name = "hooked"
path = "{}"
[disk.cut]
pre_freeze = [{{ command = "sleep 611 & sleep 612", timeout_ms = 600000 }}]

[[disk]]
name = "destaged"
path = "{}"
[disk.cut]
destage = [{{ clean_check = "sleep 613 & sleep 614", timeout_ms = 600000 }}]
"#,
        disk_image(d, "hooked", 8).display(),
        disk_image(d, "destaged", 8).display()
    );
    let mut agent = Agent::start(d, &config);
    let running = |pattern: &str| {
        Command::new("pgrep")
            .args(["-f", pattern])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let cutters: Vec<_> = ["hooked", "destaged"]
        .iter()
        .map(|disk| {
            Command::new(agent_bin())
                .args(["cut", "--disk", disk, "--control"])
                .arg(&agent.control)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    while !["sleep 611", "sleep 612", "sleep 613", "sleep 614"]
        .iter()
        .all(|p| running(p))
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the hooks never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.kill();
    let killed = Instant::now();
    while ["sleep 611", "sleep 612", "sleep 613", "sleep 614"]
        .iter()
        .any(|p| running(p))
    {
        if killed.elapsed() > Duration::from_secs(5) {
            let _ = Command::new("pkill").args(["-f", "sleep 61[1-4]"]).status();
            panic!("hook or destage processes outlived the agent by 5 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "hooks gone {:?} after the agent was killed",
        killed.elapsed()
    );
    for mut c in cutters {
        let _ = c.wait();
    }
}

/// The agent's binary replaced under it (a package upgraded while it runs): its hooks and
/// destage steps still run, through the running binary. (They failed with "No such file or
/// directory" until a restart: the helpers were started from the binary's path.)
#[test]
fn hooks_still_run_after_the_agents_binary_was_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bin = d.join("bin/ctk-agent");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(agent_bin(), &bin).unwrap();
    let ran = d.join("hook-ran");
    let config = format!(
        "[[disk]]\nname = \"vm\"\npath = \"{}\"\n[disk.cut]\npre_freeze = [{{ command = \"echo yes > {}\" }}]\ndestage = [{{ clean_check = \"true\" }}]\n",
        disk_image(d, "vm", 8).display(),
        ran.display()
    );
    let (out, agent) = Agent::try_start_bin(d, &config, &bin);
    let agent = agent.unwrap_or_else(|| panic!("{out}"));
    // The upgrade: the file is replaced by another (here: removed, then a script).
    std::fs::remove_file(&bin).unwrap();
    std::fs::write(&bin, "#!/bin/sh\nexit 99\n").unwrap();
    let cut = agent.ok(&["cut"]);
    assert_eq!(cut["consistency"], "application", "{cut}");
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "yes\n");
    agent.stop();
}
