//! Any bytes as a journal: opening gives a typed error or a usable tracker (recovered, or a
//! new generation), never a panic; and the tracker it gives works.
#![no_main]

use ctk::{Generation, MemStorage, Since, Tracker, TrackerConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let storage = MemStorage::new();
    storage.set_contents(Some(data.to_vec()));
    let mut config = TrackerConfig::new("fuzz-disk", 64 << 20);
    config.existing_data = false;
    let Ok((mut tracker, _)) = Tracker::open(storage, config, || Generation(1)) else { return };
    let start = tracker.latest();
    let intent = tracker.intend(4096, 4096).expect("intend on a fresh tracker");
    tracker.record(intent);
    let cut = tracker.cut().expect("cut");
    let changed = tracker.changed_blocks(Since::Id(start), cut).expect("query");
    assert!(changed.contains(1));
});
