//! `ctk-demo`: the README's first command. A receiver on 127.0.0.1 and an agent protecting
//! a generated image, paired by certificate fingerprint, in one process: writes through NBD,
//! cuts replicated over QUIC, and every restore point proven equal to the source as of its
//! cut. `--local` runs the older demo: the tracker and delta files alone, no NBD, no network.

mod local;
mod quickstart;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use ctk_agent::config::parse_size;

/// Exit codes: 0 the demo ran and every point was proven, 1 it failed (the message says
/// what and why), 2 bad command line.
#[derive(Parser)]
#[command(
    name = "ctk-demo",
    version,
    about = "The main job of ctk on a generated image: agent -> QUIC -> receiver, every restore point proven",
    long_about = "Starts a receiver on 127.0.0.1 (QUIC, a store in a new directory) and an agent \
protecting a generated disk image behind its NBD front, pairs them by certificate fingerprint, \
writes a workload through NBD, cuts and replicates (a full, then increments), and ends by restoring \
every restore point from the receiver's store and proving each equals the source as of its cut. It \
prints where everything is and the ctk-receiver commands to run next.\n\n\
Logs go to stderr; set RUST_LOG=info (or debug) for more."
)]
struct Cli {
    /// Working directory (must not already hold demo files). Default: a new directory under
    /// the system temp dir.
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
    /// Run the older in-process demo instead: tracker, delta files and a replica, no NBD and
    /// no network.
    #[arg(long)]
    local: bool,
    /// Print one JSON document instead of progress lines.
    #[arg(long)]
    json: bool,
}

fn run(cli: Cli) -> Result<()> {
    let seed = cli.seed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("operating system random source failed");
        u64::from_le_bytes(b)
    });
    let dir = cli
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ctk-demo-{seed:016x}")));
    let opts = local::DemoOptions {
        dir,
        size: cli.size,
        cycles: cli.cycles,
        writes_per_cycle: cli.writes,
        zstd_level: cli.zstd_level,
        seed,
        json: cli.json,
    };
    if cli.local {
        local::run(opts)
    } else {
        quickstart::run(&opts)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
