//! `ctk-demo --local`: tracking and delta export on a generated image, in one process
//! with no network: a source image is written through the tracker (real journal, real
//! fsync), cut several times, each delta exported to a file, verified, applied to a replica,
//! and the replica compared with the source at every cut. The main job (`demo` without
//! `--local`) is `quickstart.rs`.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use ctk::delta::{self, DeltaHeader, WriteOptions};
use ctk::{ChangeId, FileStorage, Generation, Since, Tracker, TrackerConfig};
use serde_json::json;

pub struct DemoOptions {
    pub dir: PathBuf,
    pub size: u64,
    pub cycles: u32,
    pub writes_per_cycle: u32,
    pub zstd_level: i32,
    pub seed: u64,
    pub json: bool,
}

pub(crate) use ctk::seeded::XorShift64 as Rng;

/// Fills `buf` with disk-like content: a third zeros, a third noise, a third text.
pub(crate) fn fill(rng: &mut Rng, buf: &mut [u8]) {
    const TEXT: &[u8] =
        b"INSERT INTO orders VALUES (42, 'widget', 3.50, '2026-11-22'); -- ctk demo\n";
    match rng.below(3) {
        0 => buf.fill(0),
        1 => {
            for chunk in buf.chunks_mut(8) {
                let v = rng.next().to_le_bytes();
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
        }
        _ => {
            let start = rng.below(TEXT.len() as u64) as usize;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = TEXT[(start + i) % TEXT.len()];
            }
        }
    }
}

/// Creates `path` (which must not exist) with `size` bytes of disk-like content; zero
/// stretches stay holes.
pub(crate) fn generate_image(path: &Path, size: u64, rng: &mut Rng) -> Result<File> {
    let source = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    source.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        fill(rng, &mut buf[..n]);
        if buf[..n].iter().any(|&b| b != 0) {
            source.write_all_at(&buf[..n], pos)?;
        }
        pos += n as u64;
    }
    source.sync_all()?;
    Ok(source)
}

pub(crate) fn say(opts: &DemoOptions, line: impl AsRef<str>) {
    if !opts.json {
        println!("{}", line.as_ref());
    }
}

fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

fn export_and_apply(
    opts: &DemoOptions,
    tracker: &Tracker<FileStorage>,
    source: &File,
    since: Since,
    to: ChangeId,
    path: &Path,
    replica: &File,
) -> Result<serde_json::Value> {
    let extents = tracker.changed(since, to)?;
    let changed: u64 = extents.iter().map(|e| e.length).sum();
    let header = DeltaHeader {
        disk_id: "demo-disk".into(),
        disk_size: tracker.geometry().disk_size(),
        block_size: tracker.geometry().block_size(),
        from: match since {
            Since::All => None,
            Since::Id(id) => Some(id),
        },
        to,
    };
    let started = Instant::now();
    let out =
        BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    let options = WriteOptions {
        zstd_level: Some(opts.zstd_level),
    };
    let (out, summary) = delta::export(source, &extents, &header, options, out)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let export_s = started.elapsed().as_secs_f64();
    // Verify the file as a receiver would, then apply it.
    let (read_header, verified) = delta::verify(std::io::BufReader::new(File::open(path)?))?;
    ensure!(
        read_header == header && verified == summary,
        "delta did not read back as written"
    );
    delta::apply(
        std::io::BufReader::new(File::open(path)?),
        replica,
        Some("demo-disk"),
    )?;
    replica.sync_all()?;
    Ok(json!({
        "to": to.to_string(),
        "from": header.from.map(|f| f.to_string()),
        "extents": extents.len(),
        "changed_bytes": changed,
        "zero_bytes": summary.zero_bytes,
        "data_bytes": summary.data_bytes,
        "delta_file_bytes": summary.stream_bytes,
        "export_seconds": export_s,
        "delta": path.display().to_string(),
    }))
}

pub fn run(opts: DemoOptions) -> Result<()> {
    ensure!(opts.size >= 1 << 20, "--size must be at least 1 MiB");
    ensure!(
        opts.size.is_multiple_of(4096),
        "--size must be a multiple of 4096 bytes"
    );
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let source_path = opts.dir.join("source.img");
    let replica_path = opts.dir.join("replica.img");
    let journal_path = opts.dir.join("source.img.ctk");
    for p in [&source_path, &replica_path, &journal_path] {
        if p.exists() {
            bail!("{} already exists: give an empty --dir", p.display());
        }
    }
    let mut rng = Rng(opts.seed | 1);
    say(&opts, format!("ctk demo in {}", opts.dir.display()));

    // A source image with existing data that tracking never saw.
    let started = Instant::now();
    let source = generate_image(&source_path, opts.size, &mut rng)?;
    say(
        &opts,
        format!(
            "  generated {} MiB source image (zeros, noise, text) in {:.1} s",
            opts.size >> 20,
            started.elapsed().as_secs_f64()
        ),
    );

    let config = TrackerConfig::new("demo-disk", opts.size);
    let (mut tracker, outcome) =
        Tracker::open(FileStorage::new(&journal_path), config, Generation::random)?;
    say(
        &opts,
        format!(
            "  change journal {} opened: {outcome:?}",
            journal_path.display()
        ),
    );
    let replica = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&replica_path)?;

    // First full: every block that may hold data.
    let first = tracker.cut()?;
    tracker.register_cursor("demo-replica", first)?;
    let full = export_and_apply(
        &opts,
        &tracker,
        &source,
        Since::All,
        first,
        &opts.dir.join("full.ctkd"),
        &replica,
    )?;
    ensure!(
        files_equal(&source_path, &replica_path)?,
        "replica differs from source after the full"
    );
    say(
        &opts,
        format!(
            "  full   {first}: {} MiB of data, {} MiB zeros -> {} MiB delta; replica == source",
            full["data_bytes"].as_u64().unwrap_or(0) >> 20,
            full["zero_bytes"].as_u64().unwrap_or(0) >> 20,
            full["delta_file_bytes"].as_u64().unwrap_or(0) >> 20,
        ),
    );

    let mut cycles = vec![full];
    let mut previous = first;
    let mut data = vec![0u8; 256 * 1024];
    for cycle in 1..=opts.cycles {
        let written = write_workload(&opts, &mut rng, &mut tracker, &source, &mut data)?;
        source.sync_data()?;
        // The demo holds writes during export (point-in-time copy-on-write is the agent's).
        let cut = tracker.cut()?;
        let path = opts.dir.join(format!("delta-{cycle}.ctkd"));
        let mut report = export_and_apply(
            &opts,
            &tracker,
            &source,
            Since::Id(previous),
            cut,
            &path,
            &replica,
        )?;
        ensure!(
            files_equal(&source_path, &replica_path)?,
            "replica differs from source at cut {cut}"
        );
        tracker.advance_cursor("demo-replica", cut)?;
        say(
            &opts,
            format!(
                "  cycle {cycle} {cut}: {} writes ({} KiB) -> {} extents, {} KiB changed -> {} KiB delta; replica == source",
                opts.writes_per_cycle,
                written >> 10,
                report["extents"],
                report["changed_bytes"].as_u64().unwrap_or(0) >> 10,
                report["delta_file_bytes"].as_u64().unwrap_or(0) >> 10,
            ),
        );
        report["written_bytes"] = json!(written);
        cycles.push(report);
        previous = cut;
    }
    tracker.close()?;
    print_result(&opts, &source_path, &replica_path, &journal_path, &cycles)
}

/// One cycle's writes through the tracker: small database-like writes and a few large ones.
/// Returns the bytes written.
fn write_workload(
    opts: &DemoOptions,
    rng: &mut Rng,
    tracker: &mut Tracker<FileStorage>,
    source: &File,
    data: &mut [u8],
) -> Result<u64> {
    let mut written = 0u64;
    for _ in 0..opts.writes_per_cycle {
        let len = match rng.below(10) {
            0 => 4096 * (1 + rng.below(64)),
            _ => 4096 * (1 + rng.below(4)),
        };
        let offset = rng.below((opts.size - len) / 4096) * 4096;
        fill(rng, &mut data[..len as usize]);
        let intent = tracker.intend(offset, len)?;
        source.write_all_at(&data[..len as usize], offset)?;
        tracker.record(intent);
        written += len;
    }
    Ok(written)
}

/// The demo's answer: JSON with --json, else a line and what to try next.
fn print_result(
    opts: &DemoOptions,
    source_path: &Path,
    replica_path: &Path,
    journal_path: &Path,
    cycles: &[serde_json::Value],
) -> Result<()> {
    if opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "dir": opts.dir.display().to_string(),
                "source": source_path.display().to_string(),
                "replica": replica_path.display().to_string(),
                "journal": journal_path.display().to_string(),
                "verified": true,
                "cuts": cycles,
            }))?
        );
    } else {
        println!(
            "ok: the replica equals the source at every cut ({} cuts).",
            opts.cycles + 1
        );
        println!(
            "next: ctk-agent verify-delta {}   (check a delta file)",
            opts.dir.join("delta-1.ctkd").display()
        );
    }
    Ok(())
}
