//! Failback after a failover, with real processes: an agent replicating, writes at the
//! original site that never reached the receiver (S), a failover whose recovered VM writes
//! through the DR export (D), failback passes while it runs, the cutover, and replication
//! resuming with an increment. Every point, old and new, restores exactly.

mod common;

use std::process::Command;

use common::*;

fn patch(image: &mut [u8], pattern: u8, offset: u64) {
    image[offset as usize..offset as usize + (64 << 10)].fill(pattern);
}

fn failback(pair: &Pair, extra: &[&str]) -> (bool, String, String) {
    run(&mut pair.failback(extra))
}

const MIB: u64 = 1 << 20;

/// Long enough for the running failover to seal a write in a durable cut of its overlay
/// (it cuts each second it was written and once after, or at a FLUSH a second after the
/// last cut; a pass trusts every cut but the latest).
const SEALED: std::time::Duration = std::time::Duration::from_millis(3500);

/// The region fio writes at the DR site.
const FIO_OFFSET: u64 = 6 << 20;
const FIO_SIZE: u64 = 2 << 20;

/// fio's nbd engine on export `vm1` at `sock`: random writes of 4 to 64 KiB at iodepth 16
/// over the fio region, each block once, with crc32c verify headers, checked right after
/// (`verify_only`: only read and checked, the same fixed random sequence).
fn fio(sock: &std::path::Path, dir: &std::path::Path, verify_only: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new(tool("fio"))
        .args([
            "--name=dr",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randseed=21",
        ])
        .arg(format!("--offset={FIO_OFFSET}"))
        .arg(format!("--size={FIO_SIZE}"))
        .arg(if verify_only {
            "--verify_only=1"
        } else {
            "--do_verify=1"
        })
        .arg(format!("--uri=nbd+unix:///vm1?socket={}", sock.display()))
        // fio leaves a verify-state file in its working directory: keep it in the test's.
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("err= 0"),
        "fio (verify_only {verify_only}) failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 16 MiB disk served and replicated twice (a write between): the agent, the newest
/// point's bytes and the points as listed.
fn two_points(pair: &Pair, image: &std::path::Path) -> (Proc, Vec<u8>, serde_json::Value) {
    random_image(image, 16 << 20, 7);
    let agent = pair.serve_disk(image);
    let (ok, _, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "first push: {err}");
    nbd_write(&pair.d.join("nbd.sock"), 0x11, 2 << 20).unwrap();
    let (ok, _, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "second push: {err}");
    let store = pair.store();
    let p2 = restore(
        &pair.receiver_bin,
        &store,
        "vm1",
        "latest",
        &pair.d.join("p2.img"),
    );
    let listed = points(&pair.receiver_bin, &store)[0]["points"].clone();
    (agent, p2, listed)
}

/// `failover status` says vm1 is not failed over any more.
fn assert_not_failed_over(pair: &Pair) {
    let (ok, out, _) = run(Command::new(&pair.receiver_bin)
        .args(["failover", "status", "--disk", "vm1", "--json", "--store"])
        .arg(pair.store()));
    assert!(ok && out.contains("\"failed_over\":false"), "{out}");
}

/// `ctk-receiver failover start` of vm1, running (see `Pair::failover_start`).
fn start_failover(pair: &Pair, point: Option<&str>) -> Proc {
    start(&mut pair.failover_start(point)).0
}

/// fio at the DR site, and its bytes taken into `dr` (read back through the export).
fn fio_at_dr(pair: &Pair, dr: &mut [u8]) {
    let sock = pair.d.join("failover.sock");
    fio(&sock, &pair.d.join("fio"), false);
    let copy = pair.d.join("dr-now.img");
    let (ok, _, err) = run(Command::new(tool("nbdcopy"))
        .arg(format!("nbd+unix:///vm1?socket={}", sock.display()))
        .arg(&copy));
    assert!(ok, "nbdcopy: {err}");
    let now = std::fs::read(&copy).unwrap();
    let region = (FIO_OFFSET as usize)..((FIO_OFFSET + FIO_SIZE) as usize);
    dr[region.clone()].copy_from_slice(&now[region]);
}

/// Later passes, a cut of the overlay apart, until they sent `want` blocks in all (at most
/// five): the blocks they sent.
fn passes_until(pair: &Pair, want: u64) -> u64 {
    let mut sent = 0;
    for _ in 0..5 {
        let (ok, out, err) = failback(pair, &[]);
        assert!(ok, "a later pass: {err}");
        let pass = &json_lines(&out)[0];
        assert_eq!(pass["first"], false, "{pass}");
        sent += pass["blocks"].as_u64().unwrap();
        if sent >= want {
            break;
        }
        std::thread::sleep(SEALED);
    }
    sent
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn failback_sends_what_either_side_changed_and_replication_resumes_with_an_increment() {
    let pair = Pair::new(10);
    let d = &pair.d;
    let (image, nbd, store) = (d.join("vm1.img"), d.join("nbd.sock"), pair.store());
    let (agent, p2, points_before) = two_points(&pair, &image);

    // S: written at the original site after the last push, never replicated.
    nbd_write(&nbd, 0x31, MIB).unwrap();
    nbd_write(&nbd, 0x32, 5 * MIB).unwrap();

    let sock = d.join("failover.sock");
    let mut failover = start_failover(&pair, None);
    // D: the recovered VM's writes (one over part of an S extent).
    let mut dr = p2.clone();
    for (pattern, offset) in [(0x41, MIB + (32 << 10)), (0x42, 9 * MIB)] {
        nbd_write(&sock, pattern, offset).unwrap();
        patch(&mut dr, pattern, offset);
    }

    // A pass while the recovered VM runs (after the overlay sealed its writes in a cut:
    // the running failover cuts each second); from then on the original disk takes no
    // other writes.
    std::thread::sleep(SEALED);
    let (ok, out, err) = failback(&pair, &[]);
    assert!(ok, "failback pass: {err}");
    let first = &json_lines(&out)[0];
    assert_eq!(first["first"], true, "{first}");
    // D ∪ S: 2 + 2 extents of 64 KiB, one overlapping (about 3.5 extents of 16 blocks),
    // and nothing more than that.
    let blocks = first["blocks"].as_u64().unwrap();
    assert!(
        (56..=64).contains(&blocks),
        "the first pass sent {blocks} blocks: {first}"
    );
    let refused = nbd_write(&nbd, 0x99, 0).unwrap_err();
    assert!(refused.contains("Operation not permitted"), "{refused}");

    // The VM goes on writing, fio among it (random sizes at iodepth 16, verified by fio as
    // it goes); the passes follow.
    fio_at_dr(&pair, &mut dr);
    std::thread::sleep(SEALED);
    let (ok, _, err) = failback(&pair, &[]);
    assert!(ok, "a pass after fio: {err}");
    // The next pass takes only what was written since.
    nbd_write(&sock, 0x43, 12 * MIB).unwrap();
    patch(&mut dr, 0x43, 12 * MIB);
    // Asked at once, before the overlay's next cut, the pass may not hold the write yet:
    // the next one does.
    assert_eq!(
        passes_until(&pair, 16),
        16,
        "the write after the first pass, once"
    );

    // The cutover: the DR export is stopped, the last write before it is carried.
    nbd_write(&sock, 0x44, 14 * MIB).unwrap();
    patch(&mut dr, 0x44, 14 * MIB);
    let (ok, out, err) = failback(&pair, &["--final"]);
    assert!(ok, "cutover: {err}");
    let lines = json_lines(&out);
    assert_eq!(lines[0]["final"], true, "{out}");
    let cut = &lines[1];
    assert_eq!(cut["digest_checked"], true, "{cut}");
    assert!(
        failover.0.wait().unwrap().success(),
        "the DR export ended cleanly"
    );
    assert!(
        std::fs::read(&image).unwrap() == dr,
        "the original disk equals the DR disk"
    );
    assert_not_failed_over(&pair);

    // fio's own check, on the original disk: every block it wrote at the DR site is there.
    fio(&nbd, &d.join("fio"), true);

    // Replication resumes: the NBD front takes writes again, and the next push is an
    // increment from the failback's point.
    nbd_write(&nbd, 0x51, 3 * MIB).unwrap();
    patch(&mut dr, 0x51, 3 * MIB);
    let (ok, out, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "push after failback: {err}");
    let pushed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pushed["from"], cut["committed"], "{pushed}");
    assert_eq!(pushed["resync"], false, "{pushed}");
    assert!(
        pushed["changed_bytes"].as_u64().unwrap() <= 64 << 10,
        "{pushed}"
    );

    // Failback run again once it is done (or for a disk never failed over) says there is
    // nothing to do and leaves the disk writable (it used to leave it fenced).
    let (ok, out, err) = failback(&pair, &["--final"]);
    assert!(ok, "failback of a disk not failed over: {err}");
    assert_eq!(json_lines(&out)[0]["not_failed_over"], true, "{out}");
    nbd_write(&nbd, 0x51, 3 * MIB).unwrap();

    let mut failed_back = dr.clone();
    failed_back[(3 * MIB) as usize..(3 * MIB + (64 << 10)) as usize]
        .copy_from_slice(&p2[(3 * MIB) as usize..(3 * MIB + (64 << 10)) as usize]);
    check_every_point(
        &pair,
        &points_before,
        &failed_back,
        &std::fs::read(&image).unwrap(),
    );
    let r = d.join("r.img");
    assert_eq!(
        restore(
            &pair.receiver_bin,
            &store,
            "vm1",
            points_before[1]["change_id"].as_str().unwrap(),
            &r
        ),
        p2
    );
    drop(agent);
}

/// Every point restores: the ones from before failback listed as they were, the failback's
/// as `failed_back`, the newest (the push after it) as `newest`.
fn check_every_point(pair: &Pair, before: &serde_json::Value, failed_back: &[u8], newest: &[u8]) {
    let store = pair.store();
    let listed = points(&pair.receiver_bin, &store)[0]["points"].clone();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), before.as_array().unwrap().len() + 2);
    let r = pair.d.join("r.img");
    for (i, p) in listed.iter().enumerate() {
        let id = p["change_id"].as_str().unwrap();
        let bytes = restore(&pair.receiver_bin, &store, "vm1", id, &r);
        if i + 2 < listed.len() {
            assert_eq!(p, &before[i], "an older point is unchanged");
        } else if i + 2 == listed.len() {
            assert!(bytes == failed_back, "the failback's point is the DR disk");
        } else {
            assert!(bytes == newest, "the newest point");
        }
    }
}

/// What the original site has when failback starts, when it cannot name its own changes.
#[derive(Clone, Copy, Debug)]
enum Original {
    /// The disk survived, its journal did not (and with it the replica cursor).
    JournalLost,
    /// A new, empty disk of the same size.
    Blank,
}

/// Failback straight to the cutover when this disk cannot name its changes: the receiver
/// compares unit hashes and sends only the units that differ (a blank disk: every unit with
/// data); the disk ends equal to the DR disk and the next push is an increment.
fn failback_without_history(original: Original) {
    let pair = Pair::new(10);
    let d = &pair.d;
    let image = d.join("vm1.img");
    random_image(&image, 16 * MIB, 11);
    // A quarter of the disk is holes: a blank disk needs none of them sent.
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
    std::fs::write(&image, &bytes).unwrap();
    let mut agent = pair.serve_disk(&image);
    let nbd = d.join("nbd.sock");
    let (ok, _, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "first push: {err}");
    nbd_write(&nbd, 0x31, MIB).unwrap();
    let store = pair.store();
    let p1 = restore(
        &pair.receiver_bin,
        &store,
        "vm1",
        "latest",
        &d.join("p1.img"),
    );

    let sock = d.join("failover.sock");
    let _failover = start_failover(&pair, None);
    let mut dr = p1.clone();
    nbd_write(&sock, 0x42, 6 * MIB).unwrap();
    patch(&mut dr, 0x42, 6 * MIB);

    drop(agent);
    let disk = match original {
        Original::JournalLost => {
            for entry in std::fs::read_dir(d).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("vm1.img.ctk") {
                    std::fs::remove_file(entry.path()).unwrap();
                }
            }
            image.clone()
        }
        Original::Blank => {
            let blank = d.join("blank.img");
            std::fs::File::create(&blank)
                .unwrap()
                .set_len(16 * MIB)
                .unwrap();
            blank
        }
    };
    agent = pair.serve_disk(&disk);
    let (ok, out, err) = failback(&pair, &["--final"]);
    assert!(ok, "{original:?}: cutover: {err}");
    let lines = json_lines(&out);
    let (pass, cut) = (&lines[0], &lines[1]);
    assert_eq!(pass["first"], true, "{pass}");
    let sent = pass["blocks"].as_u64().unwrap() * 4096;
    match original {
        // Two 64 KiB units differ: the source's write after the push, the VM's write.
        Original::JournalLost => assert_eq!(sent, 2 * (64 << 10), "{pass}"),
        // Every unit with data, none of the 4 MiB of zeros.
        Original::Blank => assert_eq!(sent, 12 * MIB, "{pass}"),
    }
    assert_eq!(cut["digest_checked"], true, "{cut}");
    assert!(
        std::fs::read(&disk).unwrap() == dr,
        "{original:?}: the original disk equals the DR disk"
    );
    nbd_write(&nbd, 0x51, 3 * MIB).unwrap();
    let (ok, out, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "push after failback: {err}");
    let pushed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pushed["from"], cut["committed"], "an increment: {pushed}");
    assert_eq!(pushed["resync"], false, "{pushed}");
    let newest = restore(
        &pair.receiver_bin,
        &store,
        "vm1",
        "latest",
        &d.join("r.img"),
    );
    assert!(
        newest == std::fs::read(&disk).unwrap(),
        "{original:?}: newest"
    );
    drop(agent);
}

#[test]
fn failback_without_the_journal_compares_digests_and_sends_only_what_differs() {
    failback_without_history(Original::JournalLost);
}

#[test]
fn failback_onto_a_blank_disk_sends_every_unit_with_data_and_no_zeros() {
    failback_without_history(Original::Blank);
}

/// A failover at an older point (before ransomware, say): the DR disk is that point plus the
/// VM's writes, so failback also sends every block where that point differs from the newest
/// one (which the original disk holds), and nothing else; the points between stay intact.
#[test]
fn failback_from_an_older_point_also_sends_what_differs_from_the_newest() {
    let pair = Pair::new(10);
    let d = &pair.d;
    let image = d.join("vm1.img");
    random_image(&image, 16 * MIB, 13);
    let agent = pair.serve_disk(&image);
    let nbd = d.join("nbd.sock");
    let store = pair.store();
    let mut ids = Vec::new();
    for (pattern, offset) in [(0, 0), (0x11, 2 * MIB), (0x12, 4 * MIB)] {
        if pattern != 0 {
            nbd_write(&nbd, pattern, offset).unwrap();
        }
        let (ok, out, err) = run(&mut pair.replicate(&[]));
        assert!(ok, "push: {err}");
        let pushed: serde_json::Value = serde_json::from_str(&out).unwrap();
        ids.push(pushed["committed"].as_str().unwrap().to_owned());
    }
    let r = d.join("r.img");
    let before: Vec<Vec<u8>> = ids
        .iter()
        .map(|id| restore(&pair.receiver_bin, &store, "vm1", id, &r))
        .collect();
    nbd_write(&nbd, 0x31, 7 * MIB).unwrap();

    let sock = d.join("failover.sock");
    let _failover = start_failover(&pair, Some(&ids[0]));
    let mut dr = before[0].clone();
    nbd_write(&sock, 0x41, 10 * MIB).unwrap();
    patch(&mut dr, 0x41, 10 * MIB);

    let (ok, out, err) = failback(&pair, &["--final"]);
    assert!(ok, "cutover: {err}");
    let lines = json_lines(&out);
    // D, S, and the two extents the newer points changed: four 64 KiB extents.
    assert_eq!(lines[0]["blocks"], 64, "{out}");
    assert!(
        std::fs::read(&image).unwrap() == dr,
        "the original disk is the DR disk"
    );
    let committed = lines[1]["committed"].as_str().unwrap().to_owned();
    let (ok, out, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "push after failback: {err}");
    let pushed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        pushed["from"].as_str(),
        Some(committed.as_str()),
        "{pushed}"
    );
    for (id, bytes) in ids.iter().zip(&before) {
        assert!(
            &restore(&pair.receiver_bin, &store, "vm1", id, &r) == bytes,
            "point {id} unchanged"
        );
    }
    assert!(restore(&pair.receiver_bin, &store, "vm1", &committed, &r) == dr);
    drop(agent);
}

/// Failback requests from an agent that sends nonsense: refused plainly or answered without
/// effect, never a panic, and nothing read for a disk that is not failed over.
#[test]
fn hostile_failback_requests_are_refused_or_name_nothing() {
    use ctk_net::wire::{KNOWN_EXTENTS_MAX, Known, Refusal, Request, Response};
    let pair = Pair::new(5);
    let image = pair.d.join("vm1.img");
    random_image(&image, 16 * MIB, 17);
    let _agent = pair.serve_disk(&image);
    let (ok, _, err) = run(&mut pair.replicate(&[]));
    assert!(ok, "push: {err}");
    let identity = ctk_net::Identity::load(&pair.d.join("aid")).unwrap();
    let pin = pair.rfp.parse().unwrap();
    let pull = |disk: &str, known: Known, body: &[u8]| {
        let frame = Request::FailbackPull {
            disk: disk.into(),
            since: None,
            known,
            final_pass: false,
        }
        .encode();
        let mut chunked = Vec::new();
        for piece in body.chunks(1 << 20) {
            chunked.extend_from_slice(&(piece.len() as u32).to_le_bytes());
            chunked.extend_from_slice(piece);
        }
        chunked.extend_from_slice(&0u32.to_le_bytes());
        raw_call(&identity, pair.addr, pin, &frame, &chunked)
    };
    let refused = |r: Response, want: Refusal| match r {
        Response::Refused { refusal, message } => assert_eq!(refusal, want, "{message}"),
        other => panic!("answered {other:?}"),
    };
    // Not failed over: refused before the body is read.
    refused(
        pull("vm1", Known::Extents { count: 1 << 40 }, &[]),
        Refusal::NotFailedOver,
    );
    refused(
        pull("../x", Known::Extents { count: 0 }, &[]),
        Refusal::BadRequest,
    );
    let _failover = start_failover(&pair, None);
    refused(
        pull(
            "vm1",
            Known::Extents {
                count: KNOWN_EXTENTS_MAX + 1,
            },
            &[],
        ),
        Refusal::BadRequest,
    );
    refused(
        pull(
            "vm1",
            Known::UnitHashes {
                unit: 1000,
                count: 1,
            },
            &[0; 32],
        ),
        Refusal::BadRequest,
    );
    // Ranges past the disk name nothing (one whose block number would wrap to block 5).
    let mut body = Vec::new();
    for (offset, length) in [((1u64 << 44) + 5 * 4096, 4096u64), (u64::MAX - 5, 100)] {
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&length.to_le_bytes());
    }
    match pull("vm1", Known::Extents { count: 2 }, &body) {
        Response::FailbackPass { blocks, .. } => assert_eq!(blocks, 0),
        other => panic!("answered {other:?}"),
    }
}
