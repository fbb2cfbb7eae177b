//! The NBD front with real clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against a
//! real `ctk-agent serve` process: every byte they write is tracked, exported and applied.

mod common;

use std::io::Read;
use std::process::Command;

use common::Agent;
use common::nbd::{Raw, Rng, apply, qemu_io, random_writes, tool};

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
    let agent = Agent::serve(dir.path(), &[("d0", &image)], env);
    let status = agent.ok(&["status"]);
    assert_eq!(status["disks"][0]["export_reads"], reads, "{status}");
    let uri = agent.uri("d0");
    let mut rng = Rng(0x5eed_1234);
    // First full, from the start of tracking.
    qemu_io(&uri, &random_writes(&mut rng, size, 40));
    let full = dir.path().join("full.ctkd");
    let answer = agent.ok(&["export", "--since", "all", "-o", full.to_str().unwrap()]);
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
        let answer = agent.ok(&[
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
    let changed = agent.ok(&["changed", "--since", &previous]);
    assert_eq!(changed["changed_bytes"], 0);
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
        let agent = Agent::serve(dir.path(), &[("d0", &image)], &[]);
        let cut = agent.ok(&["cut"])["change_id"]
            .as_str()
            .unwrap()
            .to_string();
        let mut raw = Raw::go(dir.path(), "d0");
        let pid = agent.child.id() as i32;
        let kill_after = 20 + rng.next() % 200;
        let mut acked = Vec::new();
        for i in 0..10_000u64 {
            if i == kill_after {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let len = 4096 * (1 + rng.next() % 16);
            let off = 4096 * (rng.next() % ((size - len) / 4096));
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
        let agent = Agent::serve(dir.path(), &[("d0", &image)], &[]);
        let changed = agent.ok(&["changed", "--since", &cut]);
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
    let agent = Agent::serve(dir.path(), &[("big", &image)], &[]);
    qemu_io(
        &agent.uri("big"),
        &["write -P 0x42 0 1M".into(), "write -P 0x43 300M 1M".into()],
    );
    let full = dir.path().join("full.ctkd");
    let answer = agent.ok(&["export", "--since", "all", "-o", full.to_str().unwrap()]);
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
    let agent = Agent::serve(dir.path(), &[("d0", &image)], &[]);
    let start = agent.ok(&["cut"])["change_id"]
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
    agent.ok(&["cut"]);
    let changed = agent.ok(&["changed", "--since", &start]);
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
    let agent = Agent::serve(dir.path(), &[("d0", &image)], &[]);
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

    let cut = agent.ok(&["cut"]);
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
    let cut2 = agent.ok(&["cut"]);
    assert_eq!(ranges_with(&nbdinfo_map(&uri, &context), 1), expected);
    let changed = agent.ok(&[
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
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    std::fs::write(&image, &content).unwrap();
    let agent = Agent::serve(dir.path(), &[("d0", &image)], &[]);
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
    let id = agent.ok(&["cut"])["change_id"]
        .as_str()
        .unwrap()
        .to_string();
    let source = dir.path().join("src.img");
    let mut other = vec![0u8; size as usize];
    for chunk in other[4 << 20..12 << 20].chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
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
    agent.ok(&["cut"]);
    let changed = agent.ok(&["changed", "--since", &id]);
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
