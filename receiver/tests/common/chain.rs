//! Chains of deltas for the store tests: disk states made from a seed and the deltas
//! between them, and the `ctk-receiver` commands that merge, list and restore them.
#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ctk::delta::{DeltaHeader, DeltaWriter, WriteOptions};
use ctk::{ChangeId, Generation};

use super::Rng;

pub const BS: usize = 4096;

pub fn id(seq: u64) -> ChangeId {
    ChangeId::new(Generation(0x5eed_cafe), seq)
}

/// A chain of disk states and the deltas between them (`deltas[0]` is the full).
pub struct Chain {
    pub states: Vec<Vec<u8>>,
    pub deltas: Vec<PathBuf>,
}

/// Writes the delta from `old` to `new`: every block that differs (zeros as zero records),
/// plus some that do not (an over-report the store must take in its stride).
pub fn write_delta(
    path: &Path,
    disk: &str,
    old: Option<&[u8]>,
    new: &[u8],
    from: Option<ChangeId>,
    to: ChangeId,
    rng: &mut Rng,
) {
    let header = DeltaHeader {
        disk_id: disk.into(),
        disk_size: new.len() as u64,
        block_size: BS as u32,
        from,
        to,
    };
    let file = std::fs::File::create(path).unwrap();
    let mut w = DeltaWriter::new(
        std::io::BufWriter::new(file),
        &header,
        WriteOptions::default(),
    )
    .unwrap();
    let blocks = new.len().div_ceil(BS);
    for b in 0..blocks {
        let range = b * BS..((b + 1) * BS).min(new.len());
        let differs = match old {
            None => true,
            Some(old) => old.get(range.clone()) != Some(&new[range.clone()]),
        };
        if differs || rng.next().is_multiple_of(50) {
            let data = &new[range.clone()];
            if data.iter().all(|&x| x == 0) {
                w.write_zero(range.start as u64, data.len() as u64).unwrap();
            } else {
                w.write_extent(range.start as u64, data).unwrap();
            }
        }
    }
    let (out, _) = w.finish().unwrap();
    out.into_inner().unwrap().sync_all().unwrap();
}

/// `n` states of a disk: random writes, zeroed ranges, one grow and one shrink.
pub fn chain(dir: &Path, disk: &str, n: usize, size: usize, seed: u64) -> Chain {
    let mut rng = Rng(seed);
    let mut state = vec![0u8; size];
    for b in state.chunks_mut(BS).step_by(3) {
        b.fill((rng.next() % 250) as u8 + 1);
    }
    let mut states = vec![state.clone()];
    let mut deltas = Vec::new();
    let full = dir.join(format!("{disk}-0.ctkd"));
    write_delta(&full, disk, None, &state, None, id(1), &mut rng);
    deltas.push(full);
    for k in 1..n {
        if k == n / 2 {
            state.resize(state.len() + 5 * BS + 100, 0x11);
        } else if k == n / 2 + 1 {
            let len = state.len() - 3 * BS - 700;
            state.truncate(len);
        }
        for _ in 0..20 {
            let len = BS * (1 + (rng.next() % 16) as usize);
            let at = (rng.next() as usize % (state.len() / BS)) * BS;
            let end = (at + len).min(state.len());
            let fill = if rng.next().is_multiple_of(5) {
                0
            } else {
                (rng.next() % 255) as u8 + 1
            };
            state[at..end].fill(fill);
        }
        let path = dir.join(format!("{disk}-{k}.ctkd"));
        let prev = states.last().unwrap().clone();
        write_delta(
            &path,
            disk,
            Some(&prev),
            &state,
            Some(id(k as u64)),
            id(k as u64 + 1),
            &mut rng,
        );
        states.push(state.clone());
        deltas.push(path);
    }
    Chain { states, deltas }
}

pub fn receiver(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ctk-receiver"))
        .args(args)
        .output()
        .unwrap()
}

pub fn ok(args: &[&str]) -> serde_json::Value {
    let out = receiver(args);
    assert!(
        out.status.success(),
        "ctk-receiver {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With --json the last line is the answer; without, there is no JSON to return.
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("null")).unwrap_or(serde_json::Value::Null)
}

pub fn points(store: &str, disk: &str) -> Vec<String> {
    let v = ok(&["points", "--store", store, "--disk", disk, "--json"]);
    v[0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["change_id"].as_str().unwrap().to_string())
        .collect()
}

/// `ingest --json` of one delta, which must succeed.
pub fn ingest(store: &str, disk: &str, delta: &Path) -> serde_json::Value {
    ok(&[
        "ingest",
        "--store",
        store,
        "--disk",
        disk,
        "--json",
        delta.to_str().unwrap(),
    ])
}

pub fn restored(store: &str, disk: &str, point: &str, out: &Path) -> Vec<u8> {
    ok(&[
        "restore",
        "--force",
        "--store",
        store,
        "--disk",
        disk,
        "--point",
        point,
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    std::fs::read(out).unwrap()
}
