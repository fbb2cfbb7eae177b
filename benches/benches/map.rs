//! Change-map benchmarks on a 1 TiB disk at 4 KiB granularity (2^28 blocks).
//!
//! cargo bench -p ctk-benches --bench map

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ctk::{ChangeMap, Generation, Geometry, MapOptions, MemStorage, Since, Tracker, TrackerConfig};
use ctk_benches::{BLOCK, TIB, random_blocks};
use roaring::RoaringBitmap;

const BLOCKS: u64 = TIB / BLOCK;
/// 1% of the disk's blocks.
const ONE_PERCENT: usize = (BLOCKS / 100) as usize;

fn new_map() -> ChangeMap {
    ChangeMap::new(
        Geometry::new(TIB, BLOCK).unwrap(),
        Generation(1),
        true,
        MapOptions::default(),
    )
}

fn record(c: &mut Criterion) {
    let blocks = random_blocks(ONE_PERCENT, BLOCKS, 42);
    let mut g = c.benchmark_group("record_random_4k_writes_1TiB");
    g.throughput(Throughput::Elements(blocks.len() as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("ctk_map", |b| {
        b.iter_batched(
            new_map,
            |mut map| {
                for &blk in &blocks {
                    map.record(blk * BLOCK, BLOCK).unwrap();
                }
                map
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("peer_roaring_insert_one_at_a_time", |b| {
        b.iter_batched(
            RoaringBitmap::new,
            |mut bm| {
                for &blk in &blocks {
                    bm.insert(blk as u32);
                }
                bm
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();

    // The whole write path with durable intents already live (a 10 GiB hot set).
    let hot_blocks = (10u64 << 30) / BLOCK;
    let hot = random_blocks(1 << 20, hot_blocks, 7);
    let mut config = TrackerConfig::new("bench", TIB);
    config.existing_data = true;
    let (mut tracker, _) = Tracker::open(MemStorage::new(), config, || Generation(1)).unwrap();
    for region in 0..(10u64 << 30) >> 20 {
        let intent = tracker.intend(region << 20, BLOCK).unwrap();
        tracker.record(intent);
    }
    let mut g = c.benchmark_group("tracker_intend_record_4k_hot_10GiB");
    g.throughput(Throughput::Elements(hot.len() as u64));
    g.sample_size(10);
    g.bench_function("ctk_tracker", |b| {
        b.iter(|| {
            for &blk in &hot {
                let intent = tracker.intend(blk * BLOCK, BLOCK).unwrap();
                tracker.record(intent);
            }
        })
    });
    g.finish();
}

fn query(c: &mut Criterion) {
    let mut map = new_map();
    let start = map.seal();
    map.register_cursor("consumer", start).unwrap();
    for blk in random_blocks(ONE_PERCENT, BLOCKS, 9) {
        map.record(blk * BLOCK, BLOCK).unwrap();
    }
    let to = map.seal();
    let mut g = c.benchmark_group("changed_since_1TiB_1pct_random");
    g.sample_size(20);
    g.bench_function("extents_vec", |b| {
        b.iter(|| black_box(map.changed(Since::Id(start), to).unwrap()))
    });
    // The whole answer, streamed: the union and every extent produced and consumed.
    g.bench_function("extents_streamed", |b| {
        b.iter(|| {
            let extents = map.changed_extents(Since::Id(start), to).unwrap();
            black_box(extents.map(|e| e.length).sum::<u64>())
        })
    });
    g.bench_function("blocks", |b| {
        b.iter(|| black_box(map.changed_blocks(Since::Id(start), to).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, record, query);
criterion_main!(benches);
