//! Crash test with real processes: a child writing through the tracker to a real journal
//! file is killed with SIGKILL at random moments; after reopening, every write the child had
//! announced (its intent was durable, its data write about to be issued) is reported as
//! changed since every cut the child had announced before it.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use ctk::{ChangeId, FileStorage, Generation, OpenOutcome, Since, Tracker, TrackerConfig};

const DISK_SIZE: u64 = 256 << 20;

enum Event {
    Write(u64, u64),
    Cut(ChangeId),
}

/// One piece: each trial kills the child, replays its journal and checks it against every
/// write the child announced in that and earlier trials.
#[test]
fn sigkill_at_random_moments_loses_no_announced_write() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("disk.ctk");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
    let mut seed = ctk_tests::seed("CTK_CRASH_SEED");
    eprintln!("seed {seed} (set CTK_CRASH_SEED to replay)");
    let (mut writes_checked, mut cuts_checked, mut recoveries) = (0u64, 0u64, 0u64);
    let mut generation: Option<Generation> = None;
    let trials_n = trials_wanted(40);
    for trial in 0..trials_n {
        seed = ctk_tests::next(seed);
        let mut child = Command::new(env!("CARGO_BIN_EXE_ctk-crash-child"))
            .args([journal.to_str().unwrap(), image.to_str().unwrap()])
            .arg(DISK_SIZE.to_string())
            .arg(seed.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Drain the pipe continuously so the child never blocks on it.
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => lines.push(l),
                    Err(_) => break,
                }
            }
            lines
        });
        std::thread::sleep(Duration::from_millis(5 + seed % 120));
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "trial {trial}: the child must have been killed"
        );
        let lines = reader.join().unwrap();

        let mut events = Vec::new();
        for line in &lines {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("G"), Some(id), None) | (Some("C"), Some(id), None) => {
                    events.push(Event::Cut(id.parse().unwrap()))
                }
                (Some("W"), Some(o), Some(l)) => {
                    events.push(Event::Write(o.parse().unwrap(), l.parse().unwrap()))
                }
                _ => panic!("trial {trial}: unexpected line {line:?}"),
            }
        }

        // Killed before it created the journal (it happens on a loaded machine): nothing
        // was announced, so there is nothing to check, and opening here would create it.
        if !journal.exists() {
            assert!(
                events.is_empty(),
                "trial {trial}: writes announced, no journal"
            );
            continue;
        }
        let config = TrackerConfig::new("crash-disk", DISK_SIZE);
        let (tracker, outcome) = Tracker::open(FileStorage::new(&journal), config, || {
            panic!("generation lost")
        })
        .unwrap();
        match &outcome {
            OpenOutcome::Recovered { .. } => recoveries += 1,
            OpenOutcome::Created if trial == 0 => {}
            // Killed before its open rewrote the journal: the previous trial's clean close is
            // still the last record, and the child announced nothing.
            OpenOutcome::Clean if events.is_empty() => {}
            other => panic!("trial {trial}: unexpected outcome {other:?}"),
        }
        let latest = tracker.latest();
        if std::env::var("CTK_CRASH_DEBUG").is_ok() {
            let first = events.iter().find_map(|e| {
                if let Event::Cut(c) = e {
                    Some(*c)
                } else {
                    None
                }
            });
            eprintln!(
                "trial {trial}: parent {outcome:?} latest {latest}, child's first id {first:?}, {} events",
                events.len()
            );
        }
        if let Some(g) = generation {
            assert_eq!(
                latest.generation,
                g,
                "trial {trial}: generation changed ({outcome:?}, {} events)",
                events.len()
            );
        }
        generation = Some(latest.generation);
        // For each announced cut, every write announced after it must be reported.
        let geometry = tracker.geometry();
        for (i, event) in events.iter().enumerate() {
            let Event::Cut(cut) = event else { continue };
            let reported = tracker.changed_blocks(Since::Id(*cut), latest).unwrap();
            let mut owed = HashSet::new();
            for later in &events[i + 1..] {
                if let Event::Write(o, l) = later {
                    let (first, last) = geometry.blocks_of(*o, *l).unwrap().unwrap();
                    owed.extend(first..=last);
                    writes_checked += 1;
                }
            }
            for block in owed {
                assert!(
                    reported.contains(block),
                    "trial {trial}: block {block} missing since {cut}"
                );
            }
            cuts_checked += 1;
        }
        // Close cleanly so the next trial starts from a consistent journal with this
        // trial's recovery sealed.
        tracker.close().unwrap();
    }
    eprintln!(
        "{trials_n} SIGKILL trials, {recoveries} recoveries, {cuts_checked} cuts and {writes_checked} write checks: no write missing"
    );
    assert!(
        writes_checked > trials_n,
        "the children wrote too little to test anything"
    );
}

/// Trials per run: `CTK_TRIALS` when set (the crash campaign, tests/campaign.sh), else the
/// default the normal test run uses.
fn trials_wanted(default: u64) -> u64 {
    std::env::var("CTK_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
