//! Shared helpers for the benchmarks: deterministic workloads and mixed disk-like data.

/// A xorshift generator: the same workload on every run.
pub use ctk::seeded::XorShift64 as Rng;

pub const TIB: u64 = 1 << 40;
pub const BLOCK: u64 = 4096;

/// `n` random block numbers below `blocks`.
pub fn random_blocks(n: usize, blocks: u64, seed: u64) -> Vec<u64> {
    let mut rng = Rng(seed | 1);
    (0..n).map(|_| rng.next() % blocks).collect()
}

/// Mixed disk data as in BASELINES.md: 25% zeros, 25% random, 50% text-like, in runs of
/// 4 KiB to 64 KiB.
pub fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    const TEXT: &[u8] = b"2026-11-22 13:54:40 INFO request id=4711 user=alice path=/api/v1/orders status=200 bytes=5120\n";
    let mut rng = Rng(seed | 1);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let run = 4096 * (1 + (rng.next() % 16) as usize);
        match rng.next() % 4 {
            0 => out.resize(out.len() + run, 0),
            1 => {
                for _ in 0..run / 8 {
                    out.extend_from_slice(&rng.next().to_le_bytes());
                }
            }
            _ => {
                let start = (rng.next() % TEXT.len() as u64) as usize;
                out.extend(TEXT.iter().cycle().skip(start).take(run));
            }
        }
    }
    out.truncate(len);
    out
}
