//! `ctk-agent`: the host-resident half of ctk. Parses and resolves the command line, then
//! calls library code; only this binary uses anyhow.

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

/// Exit codes: 0 success, 1 an operation failed (the message says what and why), 2 bad
/// command line (clap's own).
#[derive(Parser)]
#[command(
    name = "ctk-agent",
    version,
    about = "Changed-block tracking agent: tracks writes to protected disks, cuts consistent points, exports deltas",
    long_about = "ctk-agent keeps, for every protected disk, a change map in which each block carries the \
sequence number of the cut in which it was last written, durable in a journal beside the disk. At a cut \
it can export exactly the blocks changed since any earlier cut (a ChangeId) as a self-checking delta.\n\n\
Start with `ctk-agent demo`: it generates an image, writes to it through the tracker, and proves that \
full + incremental deltas rebuild it byte for byte.\n\nLogs go to stderr; set RUST_LOG=info (or debug) for more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Track a generated disk image through several cuts, export each delta, apply it to a
    /// replica, and check the replica equals the source at every cut.
    Demo {
        /// Working directory (must not already hold demo files). Default: a new directory
        /// under the system temp dir.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Image size, e.g. 256M, 1G (multiple of 4 KiB).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        size: u64,
        /// Incremental cuts after the first full.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
        cycles: u32,
        /// Random writes between two cuts.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
        writes: u32,
        /// zstd level for delta data (1 is fastest; 3 is about 4% smaller and slower).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: i32,
        /// Seed of the generated content and workload (random if not given).
        #[arg(long)]
        seed: Option<u64>,
        /// Print one JSON document instead of progress lines.
        #[arg(long)]
        json: bool,
    },
    /// Read a delta file and check every record, checksum and the trailer; print its header
    /// and totals.
    VerifyDelta {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// Parses sizes such as `4096`, `64K`, `256M`, `2G`, `1T` (binary units).
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size unit {c:?}: use K, M, G or T")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 256M"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("operating system random source failed");
    u64::from_le_bytes(b)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo {
            dir,
            size,
            cycles,
            writes,
            zstd_level,
            seed,
            json,
        } => {
            let seed = seed.unwrap_or_else(random_seed);
            let dir = match dir {
                Some(d) => d,
                None => std::env::temp_dir().join(format!("ctk-demo-{seed:016x}")),
            };
            demo::run(demo::DemoOptions {
                dir,
                size,
                cycles,
                writes_per_cycle: writes,
                zstd_level,
                seed,
                json,
            })
        }
        Command::VerifyDelta { file, json } => {
            let f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let (h, s) = ctk::delta::verify(std::io::BufReader::new(f))
                .with_context(|| format!("{} is not a valid ctk delta", file.display()))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "file": file.display().to_string(),
                        "disk_id": h.disk_id, "disk_size": h.disk_size, "block_size": h.block_size,
                        "from": h.from.map(|f| f.to_string()), "to": h.to.to_string(),
                        "records": s.records, "data_bytes": s.data_bytes, "zero_bytes": s.zero_bytes,
                        "encoded_bytes": s.encoded_bytes, "stream_bytes": s.stream_bytes,
                    }))?
                );
            } else {
                let from = h.from.map_or("(full)".to_string(), |f| f.to_string());
                println!(
                    "{}: valid ctk delta of disk {:?} ({} bytes, {}-byte blocks)",
                    file.display(),
                    h.disk_id,
                    h.disk_size,
                    h.block_size
                );
                println!("  from {from}\n  to   {}", h.to);
                println!(
                    "  {} records: {} data bytes ({} encoded), {} zero bytes",
                    s.records, s.data_bytes, s.encoded_bytes, s.zero_bytes
                );
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units_and_refuse_garbage() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
