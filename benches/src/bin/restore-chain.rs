//! Does restoring a point get slower as the chain of points grows? (Issue 4: it must not.)
//!
//!   restore-chain [SIZE_MIB] [POINTS] [RUNS]      defaults: 512 32 5
//!
//! Builds a receiver store of one disk (half of it allocated with mixed data), then POINTS-1
//! increments each rewriting 3% of the disk in random 64 KiB extents, through the store's
//! own ingest. Then, RUNS times each, in rotation so drift hits all alike: restore the newest
//! point, the one before it, and the oldest (POINTS-1 undo files newer than it), and, as the
//! limit, copy the synthetic full with `cp --sparse=always` and fsync it. Everything is in
//! the page cache (the machine has far more RAM than the store), so this measures the work
//! restore does, not the disk. Prints the medians and the ratios.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ctk::delta::{DeltaHeader, DeltaWriter, WriteOptions};
use ctk::{ChangeId, Generation};
use ctk_receiver::store::{DiskStore, PointMeta};

const BS: usize = 64 << 10;

use ctk_benches::Rng;

/// One block of mixed content: half noise, half text-like (zstd halves it).
fn mixed_block(rng: &mut Rng, out: &mut [u8]) {
    let seed = rng.next();
    let (noise, text) = out.split_at_mut(BS / 2);
    let mut x = Rng(seed | 1);
    for b in noise.chunks_mut(8) {
        b.copy_from_slice(&x.next().to_le_bytes()[..b.len()]);
    }
    for (i, b) in text.iter_mut().enumerate() {
        *b = b"restore points of a synthetic full "[(i + seed as usize) % 35];
    }
}

fn id(seq: u64) -> ChangeId {
    ChangeId::new(Generation(0xbe_4c4), seq)
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: SIZE_MIB POINTS RUNS"))
        .collect();
    let size_mib = args.first().copied().unwrap_or(512);
    let points = args.get(1).copied().unwrap_or(32).max(2);
    let runs = args.get(2).copied().unwrap_or(5).max(1);
    let size = size_mib << 20;
    let blocks = size / BS as u64;
    let dir = tempfile::tempdir_in(std::env::var("TMPDIR").unwrap_or("/var/tmp".into()))
        .expect("tempdir");
    let store_root = dir.path().join("store");
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut buf = vec![0u8; BS];

    let ingest = |store: &mut DiskStore, path: &Path| {
        let f = std::fs::File::open(path).expect("delta");
        store
            .ingest(std::io::BufReader::new(f), points as usize, |_| {
                Ok(PointMeta::default())
            })
            .expect("ingest");
    };
    let (mut store, _) = DiskStore::open(&store_root, "bench").expect("store");
    let delta_path = dir.path().join("d.ctkd");
    let t = Instant::now();
    for k in 0..points {
        let header = DeltaHeader {
            disk_id: "bench".into(),
            disk_size: size,
            block_size: BS as u32,
            from: (k > 0).then(|| id(k)),
            to: id(k + 1),
        };
        let out = std::io::BufWriter::new(std::fs::File::create(&delta_path).expect("create"));
        let mut w = DeltaWriter::new(out, &header, WriteOptions::default()).expect("writer");
        let mut chosen: Vec<u64> = if k == 0 {
            (0..blocks).filter(|b| b % 2 == 0).collect()
        } else {
            (0..blocks * 3 / 100).map(|_| rng.next() % blocks).collect()
        };
        chosen.sort_unstable();
        chosen.dedup();
        for b in chosen {
            mixed_block(&mut rng, &mut buf);
            w.write_extent(b * BS as u64, &buf).expect("extent");
        }
        w.finish().expect("finish");
        ingest(&mut store, &delta_path);
    }
    eprintln!(
        "built {points} points of a {size_mib} MiB disk in {:.1?}",
        t.elapsed()
    );

    let ids: Vec<ctk::ChangeId> = store.points().iter().map(|p| p.change_id).collect();
    let out = dir.path().join("restored.img");
    let oldest = format!("oldest point ({} undos)", ids.len() - 1);
    let eighth = "8 undos newer than it";
    let cases: [(&str, Option<&ctk::ChangeId>); 5] = [
        ("newest point (full only)", ids.last()),
        ("second newest (1 undo)", ids.get(ids.len() - 2)),
        (eighth, ids.get(ids.len().saturating_sub(9))),
        (&oldest, ids.first()),
        ("cp --sparse=always + fsync", None),
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for _ in 0..runs {
        for (i, (_, point)) in cases.iter().enumerate() {
            let _ = std::fs::remove_file(&out);
            let t = Instant::now();
            match point {
                Some(p) => {
                    store.restore(**p, &out, |_, _| {}).expect("restore");
                }
                None => {
                    let ok = Command::new("cp")
                        .arg("--sparse=always")
                        .arg(store.full_path())
                        .arg(&out)
                        .status()
                        .expect("cp")
                        .success()
                        && Command::new("sync")
                            .arg(&out)
                            .status()
                            .expect("sync")
                            .success();
                    assert!(ok, "cp failed");
                }
            }
            times[i].push(t.elapsed());
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let medians: Vec<Duration> = times.iter_mut().map(median).collect();
    let limit = medians[4].as_secs_f64();
    println!(
        "{size_mib} MiB disk, {points} points (3% rewritten per point), {runs} runs, medians:"
    );
    for ((name, _), m) in cases.iter().zip(&medians) {
        println!(
            "  {name:<30} {:>8.1} ms   {:.2}x cp",
            m.as_secs_f64() * 1e3,
            m.as_secs_f64() / limit
        );
    }
    println!(
        "oldest / newest: {:.2}x; oldest / 8 undos back: {:.2}x",
        medians[3].as_secs_f64() / medians[0].as_secs_f64(),
        medians[3].as_secs_f64() / medians[2].as_secs_f64()
    );
}
