//! Any bytes fed to the delta reader: a typed error or a valid delta, never a panic, and never
//! an allocation beyond the reader's fixed bounds (libFuzzer's -rss_limit_mb catches those).
#![no_main]

use ctk::delta::{DeltaReader, DeltaRecord};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut reader) = DeltaReader::new(data) else { return };
    let disk_size = reader.header().disk_size;
    let mut last_end = 0u64;
    loop {
        match reader.next_record() {
            Ok(Some(DeltaRecord::Data { offset, data })) => {
                // What the reader hands out obeys the format's rules.
                assert!(offset >= last_end && offset + data.len() as u64 <= disk_size);
                last_end = offset + data.len() as u64;
            }
            Ok(Some(DeltaRecord::Zero { offset, length })) => {
                assert!(offset >= last_end && offset + length <= disk_size);
                last_end = offset + length;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
