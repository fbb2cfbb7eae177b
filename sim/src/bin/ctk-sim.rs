//! `ctk-sim`: runs the deterministic simulation over a range of seeds, or replays one.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

/// Deterministic simulation of ctk: the agent's tracker and the receiver's store under
/// crashes, power cuts (unsynced writes dropped or torn), fsync failures, a full disk, bad
/// reads, disk resizes and retention folds, and a link that cuts, corrupts, re-delivers and
/// loses acks, each seed its own mix of faults. After every push every point the receiver
/// holds is restored and compared with the source at its cut. Exits non-zero on any
/// violation, printing its seed and the events that led there.
///
/// Examples:
///   ctk-sim --seeds 0..100000 --budget 30m     the long run (stops at the budget)
///   ctk-sim --seed 4242 --trace --fs-ops       replay one seed, printing every event
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Seeds to run, as START..END (END excluded).
    #[arg(long, default_value = "0..1000", value_parser = parse_range)]
    seeds: (u64, u64),
    /// Run only this seed (overrides --seeds).
    #[arg(long)]
    seed: Option<u64>,
    /// Print every event of the run (with --seed).
    #[arg(long)]
    trace: bool,
    /// With --trace, also the receiver's file operations (creates, syncs, renames, removes).
    #[arg(long)]
    fs_ops: bool,
    /// Stop starting new seeds after this long (e.g. 10m, 1h).
    #[arg(long, value_parser = humantime::parse_duration)]
    budget: Option<Duration>,
    /// Print the totals as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?}: expected START..END, e.g. 0..1000"))?;
    let a: u64 = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u64 = b.parse().map_err(|e| format!("{b:?}: {e}"))?;
    if b <= a {
        return Err(format!("{s:?}: END must be greater than START"));
    }
    Ok((a, b))
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Output cut short (`| head`) is not an error worth a panic.
    let mut out = std::io::stdout().lock();
    let (start, end) = match args.seed {
        Some(s) => (s, s + 1),
        None => args.seeds,
    };
    if args.trace {
        let (events, outcome) = ctk_sim::trace_with(start, args.fs_ops);
        for e in events {
            let _ = writeln!(out, "{e}");
        }
        return match outcome {
            Ok(r) => {
                let _ = writeln!(out, "ok: {r:?}");
                ExitCode::SUCCESS
            }
            Err(v) => {
                eprintln!("VIOLATION {v}");
                ExitCode::FAILURE
            }
        };
    }
    let started = Instant::now();
    let mut total = ctk_sim::Report::default();
    let mut ran = 0u64;
    let mut failures = Vec::new();
    let mut last_note = Instant::now();
    for seed in start..end {
        if args.budget.is_some_and(|b| started.elapsed() >= b) {
            break;
        }
        match ctk_sim::run(seed) {
            Ok(r) => total.add(&r),
            Err(v) => {
                eprintln!("VIOLATION {v}");
                failures.push(seed);
            }
        }
        ran += 1;
        if last_note.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "{ran} seeds ({}..{}), {} violations, {:.0} s",
                start,
                seed + 1,
                failures.len(),
                started.elapsed().as_secs_f64()
            );
            last_note = Instant::now();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        let j = serde_json::json!({
            "seeds_run": ran,
            "first_seed": start,
            "last_seed": start + ran.saturating_sub(1),
            "violations": failures.len(),
            "failing_seeds": failures,
            "seconds": secs,
            "totals": format!("{total:?}"),
        });
        let _ = writeln!(out, "{j}");
    } else {
        let _ = writeln!(
            out,
            "{ran} seeds ({start}..{}) in {secs:.1} s, {} violations",
            start + ran,
            failures.len()
        );
        let _ = writeln!(out, "{total:#?}");
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
