//! The stages of a replication measured alone, for `benches/scripts/replicate_full.sh`:
//!
//!   ctk-stages gen FILE SIZE_MIB   a mixed image (25% zeros, 25% random, 50% text-like)
//!   ctk-stages drop FILE           drop FILE's pages from the page cache (no root needed)
//!   ctk-stages read FILE           cold sequential read, 1 MiB at a time -> bytes/s
//!   ctk-stages read-direct FILE    sequential read past the page cache (O_DIRECT), 1 MiB at
//!                                  a time, one read in flight -> bytes/s
//!   ctk-stages read-write FILE OUT BYTES
//!                                  the one disk doing what a first full on one machine asks
//!                                  of it: FILE read directly while BYTES are written directly
//!                                  into a new OUT (1 MiB at a time each, fsync at the end;
//!                                  OUT removed after; buffered where OUT's filesystem refuses
//!                                  O_DIRECT) -> FILE's bytes/s over the longer of the two
//!   ctk-stages encode FILE         delta encoding alone (zero detection, CRC32, zstd 1) of
//!                                  FILE held in memory -> input bytes/s
//!   ctk-stages write FILE BYTES    sequential write of BYTES into a new FILE, then fsync (the
//!                                  replica's disk); FILE is removed after -> bytes/s
//!   ctk-stages leaves FILE         the image digest alone (a BLAKE3 leaf per 4 KiB block, then
//!                                  the digest over the leaves) of FILE in memory -> bytes/s
//!   ctk-stages quic BYTES          BYTES over QUIC on 127.0.0.1 with ctk's transport (TLS 1.3,
//!                                  pinned certificates), both ends in this process -> bytes/s
//!   ctk-stages scribble SOCKET EXPORT PERCENT SEED
//!                                  rewrite PERCENT% of the disk behind an NBD server (Unix
//!                                  SOCKET, EXPORT) in distinct random 64 KiB extents of mixed
//!                                  data -> JSON: changed bytes, their size compressed with zstd
//!                                  1, the extents' offsets
//!   ctk-stages scribble-file FILE PERCENT SEED
//!                                  the same, written straight into FILE (nothing tracks it)
//!   ctk-stages floor FILE JSON...  the 64 KiB extents of the scribbles (their JSON files), each
//!                                  once, as FILE holds them now, compressed with zstd 1 ->
//!                                  JSON: their bytes, compressed
//!
//! Each prints one number (bytes per second) on stdout, but the scribbles (JSON).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::Instant;

use ctk::delta::{DeltaHeader, DeltaWriter, WriteOptions};
use ctk::{ChangeId, Generation};

fn drop_cache(path: &str) {
    let f = std::fs::File::open(path).expect("open");
    f.sync_all().expect("sync");
    // SAFETY: fadvise on an open descriptor touches no memory.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Reads `path` whole, directly (no page cache: cold by construction), one 1 MiB read after
/// another, as ctk's exports read; returns the bytes read (an unaligned tail, at most 4 KiB,
/// is left out).
fn direct_read_all(path: &str) -> u64 {
    let f = ctk::vfs::open_direct(std::path::Path::new(path), false)
        .expect("open")
        .expect("this filesystem refuses O_DIRECT");
    let len = f.metadata().expect("size").len();
    let mut buf = ctk::vfs::AlignedBuf::new(1 << 20);
    let mut total = 0u64;
    while total < len {
        let n = (len - total).min(1 << 20) as usize;
        if !ctk::vfs::direct_fits(total, &buf[..n]) {
            break;
        }
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf[..n], total).expect("read");
        total += n as u64;
    }
    total
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| {
        args.get(i).map(String::as_str).unwrap_or_else(|| {
            eprintln!("usage: see the comment at the top of ctk-stages.rs");
            std::process::exit(2)
        })
    };
    match arg(0) {
        "gen" => {
            let size_mib: usize = arg(2).parse().expect("SIZE_MIB");
            let mut f = std::io::BufWriter::new(std::fs::File::create(arg(1)).expect("create"));
            for chunk in 0..size_mib.div_ceil(64) {
                let n = (size_mib - chunk * 64).min(64) << 20;
                f.write_all(&ctk_benches::mixed_data(n, chunk as u64 + 1))
                    .expect("write");
            }
            f.into_inner().expect("flush").sync_all().expect("sync");
        }
        "drop" => drop_cache(arg(1)),
        "read" => {
            drop_cache(arg(1));
            let mut f = std::fs::File::open(arg(1)).expect("open");
            let mut buf = vec![0u8; 1 << 20];
            let (started, mut total) = (Instant::now(), 0u64);
            loop {
                let n = f.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            println!("{:.0}", total as f64 / started.elapsed().as_secs_f64());
        }
        "read-direct" => {
            let started = Instant::now();
            let total = direct_read_all(arg(1));
            println!("{:.0}", total as f64 / started.elapsed().as_secs_f64());
        }
        "read-write" => println!(
            "{:.0}",
            read_write(arg(1), arg(2), arg(3).parse().expect("BYTES"))
        ),
        "encode" => println!("{:.0}", encode(arg(1))),
        "write" => println!("{:.0}", write_rate(arg(1), arg(2).parse().expect("BYTES"))),
        "leaves" => {
            let data = std::fs::read(arg(1)).expect("read");
            let started = Instant::now();
            let mut leaves = ctk::digest::Leaves::zeroed(data.len() as u64, 4096).expect("leaves");
            for (i, chunk) in data.chunks(1 << 20).enumerate() {
                leaves.set_data((i as u64) << 20, chunk).expect("leaves");
            }
            std::hint::black_box(leaves.digest());
            println!("{:.0}", data.len() as f64 / started.elapsed().as_secs_f64());
        }
        "scribble" => {
            let (socket, export) = (arg(1), arg(2));
            let mut nbd = ctk_agent::nbd_client::NbdClient::connect(socket.as_ref(), export)
                .expect("NBD connect");
            let size = nbd_size(socket, export);
            let pct: f64 = arg(3).parse().expect("PERCENT");
            let seed: u64 = arg(4).parse().expect("SEED");
            scribble(size, pct, seed, |off, data| {
                nbd.write(off, data).expect("NBD write")
            });
            nbd.flush().expect("NBD flush");
        }
        "scribble-file" => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(arg(1))
                .expect("open");
            let size = f.metadata().expect("size").len();
            let pct: f64 = arg(2).parse().expect("PERCENT");
            let seed: u64 = arg(3).parse().expect("SEED");
            scribble(size, pct, seed, |off, data| {
                f.write_all_at(data, off).expect("write")
            });
            f.sync_all().expect("fsync");
        }
        "floor" => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::File::open(arg(1)).expect("open");
            let mut offsets = std::collections::BTreeSet::new();
            for json in &args[2..] {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(json).expect("read")).expect("JSON");
                offsets.extend(
                    v["offsets"]
                        .as_array()
                        .expect("offsets")
                        .iter()
                        .map(|o| o.as_u64().expect("offset")),
                );
            }
            let mut buf = vec![0u8; 64 << 10];
            let (mut bytes, mut compressed) = (0u64, 0u64);
            for at in offsets {
                f.read_exact_at(&mut buf, at).expect("read");
                bytes += buf.len() as u64;
                compressed += zstd::bulk::compress(&buf, 1)
                    .expect("zstd")
                    .len()
                    .min(buf.len()) as u64;
            }
            println!("{{\"bytes\": {bytes}, \"zstd_bytes\": {compressed}}}");
        }
        "quic" => {
            let bytes: u64 = arg(1).parse().expect("BYTES");
            println!("{:.0}", quic(bytes));
        }
        other => {
            eprintln!("unknown stage {other:?}");
            std::process::exit(2);
        }
    }
}

/// Stage `read-write` (see the top of this file): its rate in bytes per second.
fn read_write(path: &str, out: &str, bytes: u64) -> f64 {
    let (path, out) = (path.to_owned(), out.to_owned());
    let started = Instant::now();
    let reader = std::thread::spawn(move || direct_read_all(&path));
    let w = std::fs::File::create(&out).expect("create");
    drop(w);
    // tmpfs (a STORE_DIR of /dev/shm) refuses O_DIRECT: write through it as ctk's
    // receiver then does.
    let w = match ctk::vfs::open_direct(std::path::Path::new(&out), true).expect("open") {
        Some(w) => w,
        None => std::fs::OpenOptions::new()
            .write(true)
            .open(&out)
            .expect("open"),
    };
    let mut block = ctk::vfs::AlignedBuf::new(1 << 20);
    for (i, b) in block.iter_mut().enumerate() {
        *b = ((i as u32).wrapping_mul(2654435761) >> 13) as u8 | 1;
    }
    let mut done = 0u64;
    while done < bytes {
        // Whole MiBs only: direct writes must stay aligned.
        std::os::unix::fs::FileExt::write_all_at(&w, &block, done).expect("write");
        done += 1 << 20;
    }
    w.sync_all().expect("fsync");
    let read = reader.join().expect("reader");
    let _ = std::fs::remove_file(&out);
    read as f64 / started.elapsed().as_secs_f64()
}

/// Stage `encode` (see the top of this file): its rate in bytes per second.
fn encode(path: &str) -> f64 {
    let data = std::fs::read(path).expect("read");
    let header = DeltaHeader {
        disk_id: "bench".into(),
        disk_size: data.len() as u64,
        block_size: 4096,
        from: None,
        to: ChangeId::new(Generation(1), 1),
    };
    let started = Instant::now();
    let mut w =
        DeltaWriter::new(std::io::sink(), &header, WriteOptions::default()).expect("writer");
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        w.write_extent((i as u64) << 20, chunk).expect("encode");
    }
    w.finish().expect("finish");
    data.len() as f64 / started.elapsed().as_secs_f64()
}

/// Stage `write` (see the top of this file): its rate in bytes per second.
fn write_rate(path: &str, bytes: u64) -> f64 {
    // What the replica's disk takes: BYTES of non-zero data written sequentially in
    // 1 MiB pieces into a new file, then fsync (a first full must be durable).
    let mut f = std::fs::File::create(path).expect("create");
    let block: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 1)
        .collect();
    let started = Instant::now();
    let mut done = 0;
    while done < bytes {
        let n = (bytes - done).min(block.len() as u64) as usize;
        f.write_all(&block[..n]).expect("write");
        done += n as u64;
    }
    f.sync_all().expect("fsync");
    let rate = bytes as f64 / started.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(path);
    rate
}

fn quic(bytes: u64) -> f64 {
    let server_id = ctk_net::Identity::generate("s").unwrap();
    let client_id = ctk_net::Identity::generate("c").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let endpoint = ctk_net::server_endpoint(
            &server_id,
            vec![client_id.fingerprint()],
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let conn = endpoint.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let mut total = 0u64;
            while let Some(chunk) = recv.read_chunk(1 << 20, true).await.unwrap() {
                total += chunk.bytes.len() as u64;
            }
            send.write_all(&total.to_le_bytes()).await.unwrap();
            send.finish().unwrap();
            let _ = send.stopped().await;
        });
        let conn = ctk_net::connect(&client_id, addr, server_id.fingerprint())
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let block = bytes::Bytes::from(vec![0x5au8; 1 << 20]);
        let started = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            send.write_chunk(block.clone()).await.unwrap();
            sent += block.len() as u64;
        }
        send.finish().unwrap();
        let mut ack = [0u8; 8];
        recv.read_exact(&mut ack).await.unwrap();
        let rate = sent as f64 / started.elapsed().as_secs_f64();
        assert_eq!(u64::from_le_bytes(ack), sent);
        server.await.unwrap();
        rate
    })
}

/// Rewrites `pct`% of a `size`-byte disk in distinct random 64 KiB extents of mixed data
/// through `write`, and prints the bytes changed and their zstd-1 size as JSON.
fn scribble(size: u64, pct: f64, seed: u64, mut write: impl FnMut(u64, &[u8])) {
    const EXTENT: u64 = 64 << 10;
    let extents = size / EXTENT;
    let want = ((extents as f64) * pct / 100.0).round() as usize;
    let mut rng = ctk_benches::Rng(seed | 1);
    let mut chosen = std::collections::BTreeSet::new();
    while chosen.len() < want.min(extents as usize) {
        chosen.insert(rng.next() % extents);
    }
    let (mut changed, mut compressed) = (0u64, 0u64);
    let mut offsets = Vec::new();
    for (i, e) in chosen.iter().enumerate() {
        offsets.push((e * EXTENT).to_string());
        let data =
            ctk_benches::mixed_data(EXTENT as usize, seed.wrapping_mul(1_000_003) + i as u64);
        write(e * EXTENT, &data);
        changed += EXTENT;
        compressed += zstd::bulk::compress(&data, 1)
            .expect("zstd")
            .len()
            .min(data.len()) as u64;
    }
    println!(
        "{{\"changed_bytes\": {changed}, \"zstd_bytes\": {compressed}, \"offsets\": [{}]}}",
        offsets.join(",")
    );
}

/// The size of an NBD export, from `nbdinfo --size` (the client here does not ask).
fn nbd_size(socket: &str, export: &str) -> u64 {
    let out = std::process::Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd+unix:///{export}?socket={socket}"))
        .output()
        .expect("nbdinfo (libnbd-bin) is needed");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("nbdinfo --size")
}
