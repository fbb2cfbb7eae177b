//! Delta encode and decode throughput on mixed data, beside the zstd and CRC32 throughput
//! on the same data in the same run.
//!
//! cargo bench -p ctk-benches --bench delta

use std::hint::black_box;
use std::io::Cursor;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ctk::delta::{DeltaHeader, DeltaReader, DeltaWriter, WriteOptions};
use ctk::{ChangeId, Generation};
use ctk_benches::mixed_data;

const LEN: usize = 64 << 20;
const RECORD: usize = 1 << 20;

fn header() -> DeltaHeader {
    DeltaHeader {
        disk_id: "bench".into(),
        disk_size: LEN as u64,
        block_size: 4096,
        from: Some(ChangeId::new(Generation(1), 1)),
        to: ChangeId::new(Generation(1), 2),
    }
}

/// Encodes into `out`, reusing its memory as a socket or file buffer would be reused.
fn encode_into(data: &[u8], level: i32, out: &mut Vec<u8>) -> usize {
    out.clear();
    let options = WriteOptions {
        zstd_level: Some(level),
    };
    let mut w = DeltaWriter::new(&mut *out, &header(), options).unwrap();
    for (i, chunk) in data.chunks(RECORD).enumerate() {
        w.write_extent((i * RECORD) as u64, chunk).unwrap();
    }
    w.finish().unwrap();
    out.len()
}

fn encode(data: &[u8], level: i32) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(data, level, &mut out);
    out
}

fn bench(c: &mut Criterion) {
    let data = mixed_data(LEN, 5);
    let mut g = c.benchmark_group("delta_mixed_64MiB");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    let mut out = Vec::with_capacity(LEN);
    g.bench_function("ctk_encode_zstd1", |b| {
        b.iter(|| black_box(encode_into(&data, 1, &mut out)))
    });
    let encoded = encode(&data, 1);
    eprintln!(
        "delta of {} MiB mixed data: {} bytes (ratio {:.2})",
        LEN >> 20,
        encoded.len(),
        LEN as f64 / encoded.len() as f64
    );
    g.bench_function("ctk_decode", |b| {
        b.iter(|| {
            let mut r = DeltaReader::new(Cursor::new(&encoded)).unwrap();
            let mut n = 0usize;
            while let Some(rec) = r.next_record().unwrap() {
                if let ctk::delta::DeltaRecord::Data { data, .. } = rec {
                    n += data.len();
                }
            }
            black_box(n)
        })
    });
    let mut compressor = zstd::bulk::Compressor::new(1).unwrap();
    g.bench_function("peer_zstd1_compress_1MiB_chunks", |b| {
        b.iter(|| {
            let mut n = 0;
            for chunk in data.chunks(RECORD) {
                n += compressor.compress(chunk).unwrap().len();
            }
            black_box(n)
        })
    });
    let frames: Vec<(Vec<u8>, usize)> = data
        .chunks(RECORD)
        .map(|c| (zstd::bulk::compress(c, 1).unwrap(), c.len()))
        .collect();
    let mut decompressor = zstd::bulk::Decompressor::new().unwrap();
    let mut out = vec![0u8; RECORD];
    g.bench_function("peer_zstd_decompress_1MiB_chunks", |b| {
        b.iter(|| {
            for (frame, _) in &frames {
                black_box(
                    decompressor
                        .decompress_to_buffer(&frame[..], &mut out[..])
                        .unwrap(),
                );
            }
        })
    });
    g.bench_function("peer_crc32", |b| {
        b.iter(|| black_box(crc32fast::hash(&data)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
