//! `ctk-receiver files`: single files copied out of a point's filesystem: a whole-disk
//! ext4 and a GPT disk with two filesystems, an old point and the newest; paths that leave
//! the filesystem refused; nothing left mounted.

mod common;

use std::path::Path;
use std::process::Command;

use common::chain::{id, ok, write_delta};
use common::{Rng, run, tool};

const BIN: &str = env!("CARGO_BIN_EXE_ctk-receiver");

/// The tests here count the host's ctk mounts: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn sh(cmd: &str) {
    let (done, out, err) = run(Command::new("sh").arg("-c").arg(cmd));
    assert!(done, "{cmd}: {out}{err}");
}

/// Merges `images` (oldest first) into the store as points 1, 2, ...
fn store_of(dir: &Path, images: &[Vec<u8>]) -> String {
    let store = dir.join("store");
    let s = store.to_str().unwrap().to_owned();
    let mut rng = Rng(5);
    for (k, img) in images.iter().enumerate() {
        let delta = dir.join(format!("{k}.ctkd"));
        let old = k.checked_sub(1).map(|j| images[j].as_slice());
        let from = k.checked_sub(1).map(|j| id(j as u64 + 1));
        write_delta(&delta, "vm1", old, img, from, id(k as u64 + 1), &mut rng);
        common::chain::ingest(&s, "vm1", &delta);
    }
    s
}

fn files(
    store: &str,
    point: &str,
    path: &str,
    out: &Path,
    partition: Option<&str>,
) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "files", "--store", store, "--disk", "vm1", "--point", point, "--path", path, "-o",
    ])
    .arg(out);
    if let Some(p) = partition {
        cmd.args(["--partition", p]);
    }
    run(&mut cmd)
}

fn mounts_left() -> usize {
    std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains("ctk-files-") || l.contains("ctk-mount-"))
        .count()
}

#[test]
fn single_files_come_out_of_whole_disk_and_partitioned_points() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tool("nbdfuse");
    tool("sfdisk");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Point 1: ext4 on the whole disk; point 2: the same with the file changed.
    std::fs::create_dir_all(d.join("src/etc")).unwrap();
    std::fs::write(d.join("src/etc/hosts"), b"127.0.0.1 old\n").unwrap();
    std::fs::write(d.join("src/etc/big"), vec![7u8; 300_000]).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", d.join("src/etc/escape")).unwrap();
    let img = d.join("v.img");
    sh(&format!(
        "mkfs.ext4 -q -F -d {} {} 24M",
        d.join("src").display(),
        img.display()
    ));
    let v1 = std::fs::read(&img).unwrap();
    std::fs::write(d.join("src/etc/hosts"), b"127.0.0.1 new\n").unwrap();
    sh(&format!(
        "mkfs.ext4 -q -F -d {} {} 24M",
        d.join("src").display(),
        img.display()
    ));
    let v2 = std::fs::read(&img).unwrap();
    // Point 3: a GPT disk, a filesystem on each of two partitions.
    let gpt = d.join("g.img");
    std::fs::create_dir_all(d.join("a")).unwrap();
    std::fs::create_dir_all(d.join("b/data")).unwrap();
    std::fs::write(d.join("a/a.txt"), b"first partition\n").unwrap();
    std::fs::write(d.join("b/data/b.txt"), b"second partition\n").unwrap();
    sh(&format!(
        "truncate -s 24M {g} && printf 'label: gpt\\n,8M,L\\n,8M,L\\n' | sfdisk -q {g} && \
         mkfs.ext4 -q -F -E offset=1048576 -d {a} {g} 8M && \
         mkfs.ext4 -q -F -E offset=9437184 -d {b} {g} 8M",
        g = gpt.display(),
        a = d.join("a").display(),
        b = d.join("b").display()
    ));
    let mut v3 = std::fs::read(&gpt).unwrap();
    v3.resize(v2.len(), 0);
    let s = store_of(d, &[v1, v2, v3]);
    let points = common::chain::points(&s, "vm1");
    let out = |name: &str| d.join(name);
    let (done, _, err) = files(&s, &points[0], "/etc/hosts", &out("h1"), None);
    assert!(done, "{err}");
    assert_eq!(std::fs::read(out("h1")).unwrap(), b"127.0.0.1 old\n");
    let (done, _, err) = files(&s, &points[1], "etc/hosts", &out("h2"), None);
    assert!(done, "{err}");
    assert_eq!(std::fs::read(out("h2")).unwrap(), b"127.0.0.1 new\n");
    let (done, _, err) = files(&s, &points[1], "/etc/big", &out("big"), None);
    assert!(done, "{err}");
    assert_eq!(std::fs::read(out("big")).unwrap(), vec![7u8; 300_000]);
    // GPT: the first partition that mounts by default, the second by number.
    let (done, _, err) = files(&s, "latest", "/a.txt", &out("out-a"), None);
    assert!(done, "{err}");
    assert_eq!(std::fs::read(out("out-a")).unwrap(), b"first partition\n");
    let (done, _, err) = files(&s, "latest", "/data/b.txt", &out("out-b"), Some("2"));
    assert!(done, "{err}");
    assert_eq!(std::fs::read(out("out-b")).unwrap(), b"second partition\n");
    // Refused, each with its reason, and nothing left mounted.
    let (done, _, err) = files(&s, &points[1], "/etc/escape", &out("x1"), None);
    assert!(!done && err.contains("symbolic link out of"), "{err}");
    assert!(!out("x1").exists());
    let (done, _, err) = files(&s, &points[1], "/etc/nothere", &out("x2"), None);
    assert!(!done && err.contains("not in the point"), "{err}");
    let (done, _, err) = files(&s, &points[1], "/etc", &out("x3"), None);
    assert!(!done && err.contains("not a regular file"), "{err}");
    let (done, _, err) = files(&s, &points[1], "/../etc/passwd", &out("x4"), None);
    assert!(!done && err.contains(".."), "{err}");
    let (done, _, err) = files(&s, "latest", "/a.txt", &out("x5"), Some("3"));
    assert!(!done && err.contains("no partition 3"), "{err}");
    let (done, _, err) = files(&s, &points[0], "/etc/hosts", &out("h1"), None);
    assert!(!done && err.contains("exists"), "{err}");
    assert_eq!(mounts_left(), 0, "a mount was left behind");
    ok(&["verify", "--store", &s, "--disk", "vm1"]);
}

/// XFS (the other filesystem the issue names; the kernel here mounts it, read-only, with
/// `norecovery` if its log is dirty): the point's file comes out.
#[test]
fn a_file_comes_out_of_an_xfs_point() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tool("nbdfuse");
    tool("mkfs.xfs");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("x.img");
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // 300 MiB: the smallest filesystem mkfs.xfs makes.
    sh(&format!(
        "truncate -s 300M {i} && mkfs.xfs -q -f {i} && mount -o loop {i} {m} && \
         mkdir {m}/etc && printf '10.1.2.3 xfs\\n' > {m}/etc/hosts && umount {m}",
        i = img.display(),
        m = mnt.display()
    ));
    let s = store_of(d, &[std::fs::read(&img).unwrap()]);
    let out = d.join("hosts");
    let (done, _, err) = files(&s, "latest", "/etc/hosts", &out, None);
    assert!(done, "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"10.1.2.3 xfs\n");
    assert_eq!(mounts_left(), 0, "nothing left mounted");
}

#[test]
fn a_mount_stays_until_umount_and_a_killed_one_is_torn_down_by_umount() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tool("nbdfuse");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("src/etc")).unwrap();
    std::fs::write(d.join("src/etc/hosts"), b"127.0.0.1 kept\n").unwrap();
    let img = d.join("v.img");
    sh(&format!(
        "mkfs.ext4 -q -F -d {} {} 16M",
        d.join("src").display(),
        img.display()
    ));
    let s = store_of(d, &[std::fs::read(&img).unwrap()]);
    let mnt = d.join("mnt");
    let mount = |mnt: &Path| {
        common::start(
            Command::new(BIN)
                .args(["mount", "--store", &s, "--disk", "vm1", "--json"])
                .arg(mnt),
        )
    };
    // Mounted, pinned (an exposure is refused), browsable, then undone by umount.
    let (mut proc, _) = mount(&mnt);
    assert_eq!(
        std::fs::read(mnt.join("etc/hosts")).unwrap(),
        b"127.0.0.1 kept\n"
    );
    let (exposed, _, err) = run(Command::new(BIN)
        .args(["expose", "--store", &s, "--disk", "vm1", "--listen"])
        .arg(format!("unix:{}", d.join("x.sock").display())));
    assert!(!exposed && err.contains("already exposed"), "{err}");
    let (done, out, err) = run(Command::new(BIN).arg("umount").arg(&mnt));
    assert!(done, "umount: {out}{err}");
    assert!(proc.0.wait().unwrap().success());
    assert!(!mnt.join("etc/hosts").exists(), "still mounted");
    let (done, _, err) = run(Command::new(BIN).arg("umount").arg(&mnt));
    assert!(
        !done && err.contains("not mounted by ctk-receiver"),
        "{err}"
    );
    // Killed: umount tears down what it left, and the disk can be mounted again.
    let (proc, _) = mount(&mnt);
    drop(proc);
    let (done, out, err) = run(Command::new(BIN).arg("umount").arg(&mnt));
    assert!(done, "umount after a kill: {out}{err}");
    assert!(
        !mnt.join("etc/hosts").exists(),
        "still mounted after a kill"
    );
    let (mut again, _) = mount(&mnt);
    assert_eq!(
        std::fs::read(mnt.join("etc/hosts")).unwrap(),
        b"127.0.0.1 kept\n"
    );
    let (done, _, err) = run(Command::new(BIN).arg("umount").arg(&mnt));
    assert!(done, "{err}");
    assert!(again.0.wait().unwrap().success());
    assert_eq!(mounts_left(), 0);
}
