//! The receiver's disk fills up mid-push (its store on a small ext4 filesystem on a loop
//! device): the push is refused with a clear error, nothing committed is damaged, and
//! replication goes on once space is freed. Needs root (mount) and e2fsprogs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

const SIZE: u64 = 16 << 20;

/// Unmounts (lazily: a receiver may still hold a file) when dropped.
struct Mounted(PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn sh(cmd: &mut Command) {
    let (ok, _, err) = run(cmd);
    assert!(ok, "{cmd:?}: {err}");
}

fn avail(path: &Path) -> u64 {
    // SAFETY: statvfs writes into the struct we own, from a NUL-terminated path.
    unsafe {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut st), 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

#[test]
fn a_full_receiver_disk_refuses_clearly_damages_nothing_and_recovers_once_freed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    // A 64 MiB ext4 for the store: room for the full (16 MiB) and a 12 MiB merge (staged,
    // composed with what a cut-off push left, and its undo), once the filler is gone.
    let fs_img = d.join("store.ext4");
    std::fs::File::create(&fs_img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    sh(Command::new(tool("mkfs.ext4"))
        .args(["-q", "-F"])
        .arg(&fs_img));
    std::fs::create_dir(d.join("store")).unwrap();
    sh(Command::new(tool("mount"))
        .args(["-o", "loop"])
        .arg(&fs_img)
        .arg(d.join("store")));
    let pair = Pair::new_in(dir, 50);
    let _mounted = Mounted(d.join("store"));
    let image = d.join("vm1.img");
    random_image(&image, SIZE, 0xf11);
    let _agent = pair.serve_disk(&image);
    let replicate = || {
        let (ok, out, err) = run(&mut pair.replicate(&[]));
        (
            ok,
            serde_json::from_str::<Value>(&out).unwrap_or(Value::Null),
            err,
        )
    };
    let (ok, first, err) = replicate();
    assert!(ok, "{err}");
    let before = std::fs::read(&image).unwrap();

    // Fill the store's filesystem but for 4 MiB, then change 12 MiB of the disk.
    let free = avail(&d.join("store"));
    let filler = d.join("store/filler");
    let f = std::fs::File::create(&filler).unwrap();
    // SAFETY: fallocate on an open descriptor we own.
    let rc = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            (free - (4 << 20)) as i64,
        )
    };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    drop(f);
    let mut nbd = ctk_agent::nbd_client::NbdClient::connect(&d.join("nbd.sock"), "vm1").unwrap();
    let mut rng = Rng(0xf12);
    for i in 0..192u64 {
        let data: Vec<u8> = (0..8192).flat_map(|_| rng.next().to_le_bytes()).collect();
        nbd.write(i * (SIZE / 192) / 65536 * 65536, &data).unwrap();
    }
    nbd.flush().unwrap();

    // Refused, and says why.
    let (ok, _, err) = replicate();
    assert!(!ok, "a push into a full disk succeeded");
    assert!(
        err.contains("No space left on device"),
        "unclear error: {err}"
    );
    // Nothing committed changed: one point, restoring to the source as it was; verify passes.
    let store = pair.store();
    let listed = points(&pair.receiver_bin, &store);
    let kept = listed[0]["points"].as_array().unwrap();
    assert_eq!(kept.len(), 1, "{listed}");
    assert_eq!(kept[0]["change_id"], first["committed"]);
    let id = first["committed"].as_str().unwrap();
    assert!(restore(&pair.receiver_bin, &store, "vm1", id, &d.join("r.img")) == before);
    let (ok, _, err) = run(Command::new(&pair.receiver_bin)
        .args(["verify", "--store"])
        .arg(&store));
    assert!(ok, "verify after the failed push: {err}");

    // Space freed: replication goes on, and the replica equals the source.
    std::fs::remove_file(&filler).unwrap();
    let (ok, next, err) = replicate();
    assert!(ok, "after freeing space: {err}");
    eprintln!("after freeing space: {next}");
    let id = next["committed"].as_str().unwrap();
    assert!(
        restore(&pair.receiver_bin, &store, "vm1", id, &d.join("r.img"))
            == std::fs::read(&image).unwrap()
    );
}
