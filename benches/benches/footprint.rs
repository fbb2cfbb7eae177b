//! Figures that are counts, not times: the change map's memory (measured with a counting
//! allocator) and the journal's fsyncs per 1,000 writes.
//!
//! cargo bench -p ctk-benches --bench footprint

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use ctk::{ChangeMap, Generation, Geometry, MapOptions, MemStorage, Tracker, TrackerConfig};
use ctk_benches::{BLOCK, Rng, TIB, random_blocks};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MIB: f64 = (1 << 20) as f64;

fn map_memory(label: &str, fill: impl FnOnce(&mut ChangeMap)) {
    let before = LIVE.load(Ordering::Relaxed);
    let mut map = ChangeMap::new(
        Geometry::new(TIB, BLOCK).unwrap(),
        Generation(1),
        true,
        MapOptions::default(),
    );
    let start = map.seal();
    map.register_cursor("c", start).unwrap();
    fill(&mut map);
    let open = LIVE.load(Ordering::Relaxed) - before;
    map.seal();
    let sealed = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "| 1 TiB map, {label} | {:.2} MiB while open | {:.2} MiB sealed |",
        open as f64 / MIB,
        sealed as f64 / MIB
    );
    drop(map);
}

/// Fsyncs per 1,000 writes: the first 200,000 writes (cold: every region's first intent)
/// and the next 200,000 (warm).
fn syncs_per_1000(label: &str, mut offset: impl FnMut() -> u64, cut_every: u64) {
    let config = TrackerConfig::new("bench", TIB);
    let (mut tracker, _) = Tracker::open(MemStorage::new(), config, || Generation(1)).unwrap();
    let writes = 200_000u64;
    let mut phase = |tracker: &mut Tracker<MemStorage>| {
        let before = tracker.syncs();
        for i in 0..writes {
            let intent = tracker.intend(offset(), BLOCK).unwrap();
            tracker.record(intent);
            if i % cut_every == cut_every - 1 {
                tracker.cut().unwrap();
            }
        }
        (tracker.syncs() - before) as f64 * 1000.0 / writes as f64
    };
    let cold = phase(&mut tracker);
    let warm = phase(&mut tracker);
    println!("| {label}, a cut every {cut_every} writes | {cold:.2} | {warm:.2} |");
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo bench --no-run / criterion's probing
    }
    let blocks = TIB / BLOCK;
    println!("## Memory (counting allocator)\n");
    map_memory("1% random 4 KiB blocks changed", |m| {
        for b in random_blocks((blocks / 100) as usize, blocks, 3) {
            m.record(b * BLOCK, BLOCK).unwrap();
        }
    });
    map_memory("100% changed (sequential 1 MiB writes)", |m| {
        for i in 0..TIB >> 20 {
            m.record(i << 20, 1 << 20).unwrap();
        }
    });
    map_memory("100% changed (random 4 KiB writes, every block)", |m| {
        // Every block once, in a scattered order.
        let step = (2_654_435_761u64 % blocks) | 1;
        let mut b = 0u64;
        for _ in 0..blocks {
            m.record(b * BLOCK, BLOCK).unwrap();
            b = (b + step) % blocks;
        }
    });
    println!(
        "\n## Journal fsyncs per 1,000 writes (defaults: 1 MiB regions, 16,384 live, linger 256 cuts; cuts included)\n"
    );
    println!("| workload | first 200,000 writes | next 200,000 writes |\n|---|---|---|");
    let hot = (10u64 << 30) / BLOCK;
    let mut rng = Rng(11);
    syncs_per_1000(
        "random 4 KiB in a 10 GiB hot set",
        move || (rng.next() % hot) * BLOCK,
        1000,
    );
    let mut rng = Rng(12);
    syncs_per_1000(
        "random 4 KiB in a 10 GiB hot set",
        move || (rng.next() % hot) * BLOCK,
        100_000,
    );
    let mut next = 0u64;
    syncs_per_1000(
        "sequential 4 KiB",
        move || {
            next += BLOCK;
            next - BLOCK
        },
        1000,
    );
}
