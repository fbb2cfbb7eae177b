//! The cut pipeline against real filesystems (root only; CI runs as root): hooks that
//! fail or hang, the application-consistent ext4 scenario through nbdfuse, and exports
//! while writes continue. The freeze watchdog's tests are in `freeze.rs`.

mod common;

use std::io::BufReader;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, Stack, disk_image, frozen, require_root, require_tools, sh};

#[test]
fn hooks_that_fail_or_hang_abort_cleanly_or_fall_back_as_configured() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The filesystem the cuts freeze lives on the agent's disk "fs", as a host's would: only
    // such a filesystem may be frozen for a cut.
    let mnt = d.join("mnt");
    let m = mnt.display();
    let config = format!(
        r#"
[[disk]]
name = "fs"
path = "{fs}"

[[disk]]
name = "ok"
path = "{ok}"
[disk.cut]
pre_freeze = [{{ command = "echo pre > {m}/pre-hook-ran" }}]
freeze = ["{m}"]
post_thaw = [{{ command = "echo post > {m}/post-hook-ran" }}]

[[disk]]
name = "failing"
path = "{failing}"
[disk.cut]
pre_freeze = [{{ command = "echo checkpoint refused >&2; exit 3" }}]
freeze = ["{m}"]

[[disk]]
name = "hanging"
path = "{hanging}"
[disk.cut]
pre_freeze = [{{ command = "sleep 601", timeout_ms = 300 }}]
freeze = ["{m}"]

[[disk]]
name = "fallback"
path = "{fallback}"
[disk.cut]
pre_freeze = [{{ command = "exit 1" }}]
freeze = ["{m}"]
on_failure = "crash-consistent"
"#,
        fs = disk_image(d, "fs", 32).display(),
        ok = disk_image(d, "ok", 8).display(),
        failing = disk_image(d, "failing", 8).display(),
        hanging = disk_image(d, "hanging", 8).display(),
        fallback = disk_image(d, "fallback", 8).display(),
    );
    let agent = Agent::start(d, &config);
    let fs = Stack::mount(&agent.nbd, "fs", &mnt, true);

    // Success: application-consistent, hooks ran around the freeze, thawed afterwards.
    let cut = agent.ok(&["cut", "--disk", "ok"]);
    assert_eq!(cut["consistency"], "application", "{cut}");
    assert!(cut["frozen_ms"].as_f64().unwrap() > 0.0);
    assert!(fs.mnt.join("pre-hook-ran").exists() && fs.mnt.join("post-hook-ran").exists());
    assert!(
        !frozen(&fs.mnt, Duration::from_secs(5)),
        "left frozen after a cut"
    );

    // A failing hook aborts: a clear error, nothing frozen, the epoch still open.
    let before = agent.latest("failing");
    let out = agent.cmd(&["cut", "--disk", "failing"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("cut aborted") && err.contains("checkpoint refused"),
        "{err}"
    );
    assert_eq!(
        agent.latest("failing"),
        before,
        "an aborted cut must not seal"
    );
    assert!(!frozen(&fs.mnt, Duration::from_secs(5)));

    // A hanging hook is killed at its timeout, and the cut aborts.
    let started = Instant::now();
    let out = agent.cmd(&["cut", "--disk", "hanging"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not finish"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!frozen(&fs.mnt, Duration::from_secs(5)));
    let leftover = Command::new("pgrep")
        .args(["-f", "sleep 601"])
        .output()
        .unwrap();
    assert!(leftover.stdout.is_empty(), "the hung hook was not killed");

    // Configured fallback: the cut happens and says it is only crash-consistent.
    let cut = agent.ok(&["cut", "--disk", "fallback"]);
    assert_eq!(cut["consistency"], "crash", "{cut}");
    assert!(!cut["warnings"].as_array().unwrap().is_empty());
    // An explicitly crash-consistent cut skips hooks and freeze altogether.
    let cut = agent.ok(&["cut", "--disk", "failing", "--consistency", "crash"]);
    assert_eq!(cut["consistency"], "crash");
    drop(fs);
    agent.stop();
}

/// The issue's scenario: ext4 on a loop device over nbdfuse over the agent's NBD front.
/// Files are written, an application-consistent cut with fsfreeze is exported, applied to the
/// previous replica, and the replica passes e2fsck and holds the files.
#[test]
fn ext4_through_nbdfuse_application_consistent_cuts_rebuild_a_clean_replica() {
    require_root();
    require_tools(&["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = disk_image(d, "vm", 128);
    let mnt = d.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let config = format!(
        "[[disk]]\nname = \"vm\"\npath = \"{}\"\n[disk.cut]\nfreeze = [\"{}\"]\n",
        image.display(),
        mnt.display()
    );
    let agent = Agent::start(d, &config);
    let stack = Stack::mount(&agent.nbd, "vm", &mnt, true);

    // Generation 1 of the files, then a full.
    let content = |i: usize, version: u8| -> Vec<u8> {
        (0..(4096 * (1 + i % 7) + i))
            .map(|j| (j as u8) ^ version ^ (i as u8))
            .collect()
    };
    for i in 0..40 {
        std::fs::write(mnt.join(format!("f{i}")), content(i, 1)).unwrap();
    }
    let replica = d.join("replica.img");
    std::fs::File::create(&replica).unwrap();
    let apply = |delta: &Path| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&replica)
            .unwrap();
        ctk::delta::apply(
            BufReader::new(std::fs::File::open(delta).unwrap()),
            &file,
            Some("vm"),
        )
        .unwrap();
    };
    let full = d.join("full.ctkd");
    let answer = agent.ok(&["export", "--since", "all", "-o", full.to_str().unwrap()]);
    assert_eq!(answer["consistency"], "application", "{answer}");
    apply(&full);
    let first = answer["to"].as_str().unwrap().to_string();

    // Generation 2: rewrite some, delete some, add some; then an incremental.
    for i in 0..40 {
        match i % 4 {
            0 => std::fs::write(mnt.join(format!("f{i}")), content(i, 2)).unwrap(),
            1 => std::fs::remove_file(mnt.join(format!("f{i}"))).unwrap(),
            _ => {}
        }
    }
    for i in 40..60 {
        std::fs::write(mnt.join(format!("f{i}")), content(i, 2)).unwrap();
    }
    let delta = d.join("inc.ctkd");
    let answer = agent.ok(&["export", "--since", &first, "-o", delta.to_str().unwrap()]);
    assert_eq!(answer["consistency"], "application", "{answer}");
    assert!(
        answer["delta_bytes"].as_u64().unwrap() < 16 << 20,
        "{answer}"
    );
    apply(&delta);

    // Tear the stack down, then check the replica as the DR site would.
    drop(stack);
    agent.stop();
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&replica)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck on the replica: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let check = d.join("check");
    std::fs::create_dir_all(&check).unwrap();
    sh(&format!(
        "mount -o loop,ro {} {}",
        replica.display(),
        check.display()
    ));
    let verify = (|| {
        for i in 0..60 {
            let path = check.join(format!("f{i}"));
            let expect = match (i, i % 4) {
                (0..40, 0) => Some(content(i, 2)),
                (0..40, 1) => None,
                (0..40, _) => Some(content(i, 1)),
                _ => Some(content(i, 2)),
            };
            let found = std::fs::read(&path).ok();
            if found != expect {
                return Err(format!(
                    "{}: expected {:?} bytes, found {:?}",
                    path.display(),
                    expect.map(|b| b.len()),
                    found.map(|b| b.len())
                ));
            }
        }
        Ok(())
    })();
    let _ = Command::new("umount").arg(&check).status();
    verify.unwrap();
}

/// Point in time: writes continue during an export, yet the delta is the disk as of its
/// cut. The destage step copies the image while NBD writes are held, just before the seal:
/// that copy is the source at the cut instant, and replica + delta must equal it.
///
/// One piece: the writer, the cut, the export and the comparison run against one agent
/// at the same time; their interleaving is what is tested.
#[test]
fn export_while_writes_continue_is_the_disk_as_of_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("d0.img");
    let size = 32u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let at_cut = d.join("at-cut.img");
    // zstd level 19 makes the export slow enough for writes to race it.
    let config = format!(
        "zstd_level = 19\n[[disk]]\nname = \"d0\"\npath = \"{img}\"\n[disk.cut]\ndestage = [{{ clean_check = \"cp --sparse=always {img} {cut}\" }}]\n",
        img = image.display(),
        cut = at_cut.display()
    );
    let agent = Agent::start(d, &config);
    let uri = format!("nbd+unix:///d0?socket={}", d.join("nbd.sock").display());
    let qemu_io = |commands: Vec<String>| {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", &uri]);
        for c in &commands {
            cmd.arg("-c").arg(c);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let writes = |seed: u64, n: u64, max_kib: u64| -> Vec<String> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = 4096 * (1 + x % (max_kib / 4));
                let off = 4096 * ((x >> 20) % ((size - len) / 4096));
                format!("write -P {} {off} {len}", (x >> 8) % 250 + 1)
            })
            .collect()
    };
    // Fill most of the disk so the full is large, then export it with nothing racing.
    qemu_io(
        (0..32)
            .map(|i| format!("write -P {} {} 1M", i + 1, i << 20))
            .collect(),
    );
    let replica = d.join("replica.img");
    std::fs::File::create(&replica).unwrap();
    let apply = |delta: &Path| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&replica)
            .unwrap();
        ctk::delta::apply(
            BufReader::new(std::fs::File::open(delta).unwrap()),
            &file,
            Some("d0"),
        )
        .unwrap();
    };
    let full = d.join("full.ctkd");
    let first = agent.ok(&["export", "--since", "all", "-o", full.to_str().unwrap()]);
    apply(&full);
    assert!(std::fs::read(&replica).unwrap() == std::fs::read(&at_cut).unwrap());
    let first = first["to"].as_str().unwrap().to_string();

    // Change everything again, then export while another client keeps writing.
    qemu_io(
        (0..32)
            .map(|i| format!("write -P {} {} 1M", i + 100, i << 20))
            .collect(),
    );
    let racer = {
        let batch = writes(0xabcdef, 3000, 64);
        let uri = uri.clone();
        std::thread::spawn(move || {
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-f", "raw", &uri]);
            for c in &batch {
                cmd.arg("-c").arg(c);
            }
            assert!(cmd.output().unwrap().status.success());
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let delta = d.join("inc.ctkd");
    let answer = agent.ok(&["export", "--since", &first, "-o", delta.to_str().unwrap()]);
    racer.join().unwrap();
    apply(&delta);
    assert!(
        std::fs::read(&replica).unwrap() == std::fs::read(&at_cut).unwrap(),
        "the delta is not the disk as of its cut"
    );
    let status = agent.ok(&["status"]);
    let preserved = status["disks"][0]["cow_blocks_preserved"].as_u64().unwrap();
    eprintln!(
        "copy-on-write preserved {preserved} blocks (peak {} bytes)",
        answer["cow_peak_bytes"]
    );
    assert!(
        preserved > 0,
        "no write raced the export: the test did not exercise copy-on-write"
    );
    // And the writes that raced it are in the next cut.
    let next = agent.ok(&["changed", "--since", answer["to"].as_str().unwrap()]);
    assert_eq!(next["changed_bytes"], 0, "nothing sealed yet");
    let cut = agent.ok(&["cut"]);
    let after = agent.ok(&[
        "changed",
        "--since",
        answer["to"].as_str().unwrap(),
        "--to",
        cut["change_id"].as_str().unwrap(),
    ]);
    assert!(after["changed_bytes"].as_u64().unwrap() > 0);
    agent.stop();
}

/// An export that cannot be written says which path failed and leaves nothing behind: a
/// directory that does not exist is refused before a cut is taken, and a disk that fills up
/// mid-export leaves no partial file. (It said "I/O error on the backing", which reads as the
/// disk image, and left the partial file.)
#[test]
fn a_failed_export_names_its_path_and_leaves_no_partial_file() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = disk_image(d, "d0", 16);
    // Incompressible data, so the delta is about as large as the disk.
    let mut x = 0x9e3779b97f4a7c15u64;
    let bytes: Vec<u8> = (0..(16 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&image, bytes).unwrap();
    let agent = Agent::start(
        d,
        &format!("[[disk]]\nname = \"d0\"\npath = \"{}\"\n", image.display()),
    );
    let before = agent.latest("d0");
    let missing = d.join("no/such/dir/full.ctkd");
    let out = agent.cmd(&["export", "--since", "all", "-o", missing.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains(missing.to_str().unwrap()) && !err.contains("backing"),
        "{err}"
    );
    assert_eq!(
        agent.latest("d0"),
        before,
        "a cut was taken for an export that could not be written"
    );

    let small = d.join("small");
    std::fs::create_dir_all(&small).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=2m tmpfs {}",
        small.display()
    ));
    let full = small.join("full.ctkd");
    let out = agent.cmd(&["export", "--since", "all", "-o", full.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let left = std::fs::read_dir(&small).unwrap().count();
    let _ = Command::new("umount").arg(&small).status();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains(full.to_str().unwrap()) && err.contains("No space left"),
        "{err}"
    );
    assert_eq!(left, 0, "the partial export was left behind");
    agent.stop();
}
