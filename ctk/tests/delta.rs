//! The delta format: round trips, and every corruption and truncation refused.

use std::io::Cursor;

use ctk::delta::{
    self, DeltaError, DeltaFile, DeltaHeader, DeltaReader, DeltaRecord, DeltaWriter, WriteOptions,
};
use ctk::{ChangeId, Generation};
use proptest::prelude::*;

const BS: u64 = 4096;

fn header(disk_size: u64) -> DeltaHeader {
    DeltaHeader {
        disk_id: "vm-01/disk0".into(),
        disk_size,
        block_size: BS as u32,
        from: Some(ChangeId::new(Generation(0xabc), 3)),
        to: ChangeId::new(Generation(0xabc), 7),
    }
}

/// Deterministic mixed content: zeros, noise, and text-like runs.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let run = (x % 9000) as usize + 1;
        match x % 3 {
            0 => out.extend(std::iter::repeat_n(0u8, run)),
            1 => out.extend((0..run).map(|i| (x >> (i % 56)) as u8 ^ i as u8)),
            _ => out.extend(
                b"the quick brown fox jumps over the lazy dog "
                    .iter()
                    .cycle()
                    .take(run),
            ),
        }
    }
    out.truncate(len);
    out
}

/// Reads a delta back into (offset, bytes) pairs, zeros expanded.
fn read_all(bytes: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, DeltaError> {
    let mut reader = DeltaReader::new(Cursor::new(bytes))?;
    let mut out = Vec::new();
    while let Some(record) = reader.next_record()? {
        match record {
            DeltaRecord::Data { offset, data } => out.push((offset, data.to_vec())),
            DeltaRecord::Zero { offset, length } => out.push((offset, vec![0; length as usize])),
        }
    }
    Ok(out)
}

/// Joins adjacent pieces so two readings of the same bytes compare equal.
fn coalesce(pieces: Vec<(u64, Vec<u8>)>) -> Vec<(u64, Vec<u8>)> {
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for (offset, data) in pieces {
        match out.last_mut() {
            Some((o, d)) if *o + d.len() as u64 == offset => d.extend(data),
            _ => out.push((offset, data)),
        }
    }
    out
}

fn sample() -> Vec<u8> {
    let disk = 64 * BS + 100;
    let mut w = DeltaWriter::new(Vec::new(), &header(disk), WriteOptions::default()).unwrap();
    w.write_extent(0, &content(1, 3 * BS as usize)).unwrap(); // mixed
    w.write_extent(5 * BS, &[0u8; 2 * BS as usize]).unwrap(); // all zero
    w.write_zero(10 * BS, 4 * BS).unwrap();
    let compressible = b"abcd".repeat(BS as usize / 4);
    w.write_extent(20 * BS, &compressible).unwrap(); // zstd
    let noise: Vec<u8> = (0..BS).map(|i| ((i * 2654435761) >> 13) as u8).collect();
    w.write_extent(30 * BS, &noise).unwrap(); // raw
    w.write_extent(64 * BS, &[7u8; 100]).unwrap(); // partial last block
    w.finish().unwrap().0
}

#[test]
fn sample_uses_every_record_type_and_round_trips() {
    let bytes = sample();
    let (h, summary) = delta::verify(Cursor::new(&bytes)).unwrap();
    assert_eq!(h, header(64 * BS + 100));
    assert!(summary.zero_bytes >= 6 * BS);
    assert!(summary.encoded_bytes < summary.data_bytes, "{summary:?}");
    assert_eq!(summary.stream_bytes, bytes.len() as u64);
    let got = read_all(&bytes).unwrap();
    assert!(
        got.iter()
            .any(|(o, d)| *o == 64 * BS && d == &vec![7u8; 100])
    );
}

#[test]
fn every_single_byte_corruption_is_rejected() {
    let bytes = sample();
    let mut checked = 0u64;
    for i in 0..bytes.len() {
        for flip in 1..=255u8 {
            let mut bad = bytes.clone();
            bad[i] ^= flip;
            assert!(
                read_all(&bad).is_err(),
                "flip {flip:#x} at byte {i} was accepted"
            );
            checked += 1;
        }
    }
    eprintln!("{checked} corrupted deltas, all rejected");
}

#[test]
fn every_truncation_and_any_trailing_byte_is_rejected() {
    let bytes = sample();
    for len in 0..bytes.len() {
        assert!(
            read_all(&bytes[..len]).is_err(),
            "truncation to {len} bytes was accepted"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(read_all(&longer), Err(DeltaError::TrailingBytes)));
}

/// Reads a delta file through its index, every record fetched by position.
fn read_indexed(bytes: &[u8]) -> Result<Vec<(u64, Vec<u8>)>, DeltaError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.ctkd");
    std::fs::write(&path, bytes).unwrap();
    let mut file = DeltaFile::open(std::fs::File::open(&path).unwrap())?;
    let records = file.records().to_vec();
    let mut out = Vec::new();
    for r in records {
        if r.zero {
            out.push((r.offset, vec![0; r.length as usize]));
        } else {
            out.push((r.offset, file.read(&r)?.to_vec()));
        }
    }
    Ok(out)
}

#[test]
fn an_indexed_delta_file_reads_the_same_records_and_refuses_damage() {
    let bytes = sample();
    assert_eq!(read_indexed(&bytes).unwrap(), read_all(&bytes).unwrap());
    // The index skips payloads, so it cannot check the trailer's digest over them
    // (documented). It checks everything else: each flip is refused when the file is opened
    // or the record is read, or it is harmless, i.e. it changed no decoded byte (zstd has
    // a few bits that decoding ignores, which only the streaming reader's digest sees).
    let good = read_all(&bytes).unwrap();
    let (mut refused, mut harmless) = (0, 0);
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = bytes.clone();
            bad[i] ^= flip;
            match read_indexed(&bad) {
                Err(_) => refused += 1,
                Ok(got) => {
                    assert!(got == good, "flip {flip:#x} at byte {i} changed the data");
                    harmless += 1;
                }
            }
        }
    }
    assert!(harmless < refused / 20, "{harmless} harmless of {refused}");
    for len in 0..bytes.len() {
        assert!(read_indexed(&bytes[..len]).is_err(), "truncated to {len}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(read_indexed(&longer).is_err());
    eprintln!("{refused} damaged indexed deltas refused, {harmless} flips changed no data");
}

#[test]
fn the_writer_refuses_what_a_reader_would_refuse() {
    let mut w = DeltaWriter::new(Vec::new(), &header(16 * BS), WriteOptions::default()).unwrap();
    assert!(w.write_extent(1, &[1u8; 4096]).is_err(), "unaligned");
    assert!(
        w.write_extent(15 * BS, &[1u8; 8192]).is_err(),
        "past the end"
    );
    assert!(w.write_extent(0, &[]).is_err(), "empty");
    w.write_extent(4 * BS, &[1u8; 4096]).unwrap();
    assert!(w.write_extent(4 * BS, &[1u8; 4096]).is_err(), "overlap");
    assert!(w.write_extent(0, &[1u8; 4096]).is_err(), "descending");
    let mut h = header(16 * BS);
    h.block_size = 1000;
    assert!(DeltaWriter::new(Vec::new(), &h, WriteOptions::default()).is_err());
}

#[test]
fn a_lying_length_is_refused_before_anything_is_allocated() {
    // A record head claiming a 4 GiB raw payload, with a correct head CRC: the reader must
    // refuse it by the limit, not try to read it.
    let disk = 1u64 << 40;
    let w = DeltaWriter::new(
        Vec::new(),
        &DeltaHeader {
            disk_size: disk,
            ..header(disk)
        },
        WriteOptions::default(),
    )
    .unwrap();
    let mut bytes = w.finish().unwrap().0;
    bytes.truncate(bytes.len() - 41); // drop the trailer
    let mut head = vec![1u8];
    head.extend_from_slice(&0u64.to_le_bytes());
    head.extend_from_slice(&(4u64 << 30).to_le_bytes());
    head.extend_from_slice(&u32::MAX.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    let crc = crc32fast::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(&head);
    assert!(matches!(
        read_all(&bytes),
        Err(DeltaError::RecordInvalid { .. })
    ));
}

#[test]
fn export_then_apply_reproduces_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let size = 300 * BS + 1234;
    let source_bytes = content(42, size as usize);
    let source = dir.path().join("source.img");
    std::fs::write(&source, &source_bytes).unwrap();
    let mut target_bytes = content(7, (200 * BS) as usize);
    // The target is an older copy: equal except in the changed extents, and shorter.
    target_bytes[..(200 * BS) as usize].copy_from_slice(&source_bytes[..(200 * BS) as usize]);
    target_bytes[(10 * BS) as usize..(12 * BS) as usize].fill(0x55);
    let target = dir.path().join("target.img");
    std::fs::write(&target, &target_bytes).unwrap();
    let extents = vec![
        ctk::Extent::new(10 * BS, 2 * BS),
        ctk::Extent::new(200 * BS, size - 200 * BS),
    ];
    let image = std::fs::File::open(&source).unwrap();
    let (bytes, _) = delta::export(
        &image,
        &extents,
        &header(size),
        WriteOptions::default(),
        Vec::new(),
    )
    .unwrap();
    let target_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&target)
        .unwrap();
    delta::apply(Cursor::new(&bytes), &target_file, Some("vm-01/disk0")).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), source_bytes);
    assert!(matches!(
        delta::apply(Cursor::new(&bytes), &target_file, Some("other")),
        Err(DeltaError::Mismatch(_))
    ));
}

/// Runs longer than one record (1 MiB) must keep their class at the record boundary: a data
/// block right after a full record of zeros is data (a rewrite of the run loop once got this
/// wrong before it was committed).
#[test]
fn runs_longer_than_one_record_keep_their_class_at_the_boundary() {
    const MIB: usize = 1 << 20;
    let layouts: [&[(bool, usize)]; 4] = [
        &[(true, MIB), (false, 4096), (true, 4096)],
        &[(false, MIB), (true, 4096), (false, 4096)],
        &[(true, 2 * MIB + 8192), (false, MIB + 4096)],
        &[(false, 3 * MIB), (true, 3 * MIB), (false, 4096)],
    ];
    for layout in layouts {
        let mut image = Vec::new();
        for (i, &(zero, len)) in layout.iter().enumerate() {
            if zero {
                image.resize(image.len() + len, 0);
            } else {
                image.extend(content(i as u64 + 3, len).iter().map(|b| b | 1));
            }
        }
        let disk = image.len() as u64;
        let mut w = DeltaWriter::new(Vec::new(), &header(disk), WriteOptions::default()).unwrap();
        w.write_extent(0, &image).unwrap();
        let (bytes, summary) = w.finish().unwrap();
        let zeros: usize = layout.iter().filter(|l| l.0).map(|l| l.1).sum();
        assert_eq!(summary.zero_bytes, zeros as u64, "{layout:?}");
        assert_eq!(
            coalesce(read_all(&bytes).unwrap()),
            vec![(0, image)],
            "{layout:?}"
        );
    }
}

proptest! {
    #[test]
    fn random_extents_round_trip(
        seed in any::<u64>(),
        level in prop_oneof![Just(None), Just(Some(1)), Just(Some(3))],
        raw_extents in prop::collection::vec((0u64..200, 1u64..80), 0..12),
    ) {
        let disk = 256 * BS + 777;
        let blocks = disk.div_ceil(BS);
        // Make the extents ascending and disjoint.
        let mut extents: Vec<(u64, u64)> = Vec::new();
        let mut next = 0;
        for (gap, len) in raw_extents {
            let first = next + gap % 20;
            if first >= blocks { break; }
            let len = len.min(blocks - first);
            extents.push((first, len));
            next = first + len;
        }
        let image = content(seed, disk as usize);
        let mut w = DeltaWriter::new(Vec::new(), &header(disk), WriteOptions { zstd_level: level }).unwrap();
        let mut expect = Vec::new();
        for &(first, len) in &extents {
            let start = (first * BS) as usize;
            let end = ((first + len) * BS).min(disk) as usize;
            w.write_extent(start as u64, &image[start..end]).unwrap();
            expect.push((start as u64, image[start..end].to_vec()));
        }
        let (bytes, summary) = w.finish().unwrap();
        prop_assert_eq!(summary.stream_bytes, bytes.len() as u64);
        prop_assert_eq!(coalesce(read_all(&bytes).unwrap()), coalesce(expect));
    }
}

/// The committed fuzz seeds stay valid deltas as the format evolves (regenerate them with
/// `cargo run -p ctk --example fuzz_seeds -- fuzz/seeds`).
#[test]
fn fuzz_seeds_are_valid_deltas() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/delta_reader");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        delta::verify(Cursor::new(&bytes)).unwrap();
        n += 1;
    }
    assert!(n >= 2, "seeds missing in {}", dir.display());
}

/// Zero detection is word-wise in 256-byte chunks: every length around the chunk and word
/// edges, with one non-zero byte at every position, must still be seen.
#[test]
fn zero_detection_sees_any_single_nonzero_byte() {
    for len in [
        0usize, 1, 7, 8, 15, 16, 255, 256, 257, 511, 512, 520, 4096, 4099,
    ] {
        let mut buf = vec![0u8; len];
        assert!(ctk::delta::is_zero(&buf), "{len} zeros");
        for at in 0..len {
            buf[at] = 0x80;
            assert!(!ctk::delta::is_zero(&buf), "len {len}, byte {at}");
            buf[at] = 0;
        }
    }
}
