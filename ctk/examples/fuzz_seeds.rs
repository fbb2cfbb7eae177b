//! Writes small valid deltas, journals and wire frames as seeds for the fuzz targets:
//! `cargo run -p ctk --example fuzz_seeds -- fuzz/seeds`
//! (random bytes rarely get past a CRC; valid seeds let the fuzzer explore past it).

use std::path::Path;

use ctk::delta::{DeltaHeader, DeltaWriter, WriteOptions};
use ctk::{ChangeId, Generation, MemStorage, Tracker, TrackerConfig};

fn main() -> std::io::Result<()> {
    let root = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/seeds".into());
    let wire = Path::new(&root).join("wire_frame");
    std::fs::create_dir_all(&wire)?;
    {
        use ctk::wire::{Consistency, PushEnd, Refusal, Request, Response};
        let frames = [
            (
                "newest.bin",
                Request::Newest { disk: "vm1".into() }.encode(),
            ),
            ("push.bin", Request::Push { disk: "vm1".into() }.encode()),
            (
                "push-end.bin",
                PushEnd {
                    cut_unix_ms: 1_795_000_000_000,
                    consistency: Consistency::Application,
                    image_digest: Some([0x5c; 32]),
                }
                .encode(),
            ),
            (
                "newest-answer.bin",
                Response::Newest {
                    change_id: Some(ChangeId::new(Generation(9), 4)),
                }
                .encode(),
            ),
            (
                "committed.bin",
                Response::Committed {
                    change_id: ChangeId::new(Generation(9), 5),
                    already: false,
                }
                .encode(),
            ),
            (
                "refused.bin",
                Response::refused(Refusal::Mismatch, "delta starts at x").encode(),
            ),
        ];
        for (name, bytes) in frames {
            std::fs::write(wire.join(name), bytes)?;
        }
    }
    let deltas = Path::new(&root).join("delta_reader");
    let journals = Path::new(&root).join("journal_replay");
    std::fs::create_dir_all(&deltas)?;
    std::fs::create_dir_all(&journals)?;

    let header = |from: Option<ChangeId>| DeltaHeader {
        disk_id: "seed".into(),
        disk_size: 16 * 4096 + 100,
        block_size: 4096,
        from,
        to: ChangeId::new(Generation(9), 4),
    };
    let full = DeltaWriter::new(Vec::new(), &header(None), WriteOptions::default())
        .and_then(|w| w.finish())
        .expect("empty delta");
    std::fs::write(deltas.join("empty-full.ctkd"), full.0)?;
    let mut w = DeltaWriter::new(
        Vec::new(),
        &header(Some(ChangeId::new(Generation(9), 2))),
        WriteOptions::default(),
    )
    .expect("writer");
    w.write_extent(0, &[7u8; 4096]).expect("raw-ish");
    w.write_extent(4096, &b"abcd".repeat(1024)).expect("zstd");
    w.write_zero(3 * 4096, 2 * 4096).expect("zero");
    w.write_extent(16 * 4096, &[1u8; 100])
        .expect("partial last block");
    std::fs::write(deltas.join("mixed.ctkd"), w.finish().expect("finish").0)?;

    let storage = MemStorage::new();
    let mut config = TrackerConfig::new("fuzz-disk", 64 << 20);
    config.existing_data = false;
    let (mut t, _) = Tracker::open(storage.clone(), config, || Generation(1)).expect("open");
    t.register_cursor("r", t.latest()).expect("cursor");
    let intent = t.intend(4096, 8192).expect("intent");
    t.record(intent);
    t.cut().expect("cut");
    let intent = t.intend(40 << 20, 4096).expect("intent");
    t.record(intent);
    std::fs::write(
        journals.join("live.ctk"),
        storage.contents().expect("journal"),
    )?;
    t.close().expect("close");
    std::fs::write(
        journals.join("closed.ctk"),
        storage.contents().expect("journal"),
    )?;
    println!("seeds written under {root}");
    Ok(())
}
