//! `ctk-agent`: the host-resident half of ctk. Parses and resolves the command line, then
//! calls library code; only this binary uses anyhow.

use ctk::Consistency;
use ctk_agent::config::parse_size;
use ctk_agent::control::{Request, proto};
use ctk_agent::{config, continuous, disk, freeze, limits, pipeline, replicate, server};

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
Start with `ctk-demo` (its own binary): it generates an image, replicates it to a receiver, and proves that \
full + incremental deltas rebuild it byte for byte.\n\nLogs go to stderr; set RUST_LOG=info (or debug) for more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: serve each protected disk over NBD with change tracking, and answer
    /// cut / changed / export / resize / status on the control socket. Stops cleanly on
    /// SIGINT/SIGTERM.
    ///
    /// One agent per disk: the image and its journal are locked for the life of the process
    /// (a second `serve` on either exits naming the holder); a socket left by a killed agent
    /// is replaced, one something still answers on never is. Bounds on what clients can make
    /// it hold (connections, memory, timeouts) are in the configuration (docs/nbd.md).
    ///
    /// Example: ctk-agent serve --disk vm1=/var/lib/images/vm1.img --listen unix:/run/ctk-agent/nbd.sock
    /// then: qemu-io -f raw 'nbd+unix:///vm1?socket=/run/ctk-agent/nbd.sock' -c 'write 0 4k'
    Serve {
        /// A disk to protect, as NAME=PATH (a raw image file or a block device). Repeatable.
        /// The change journal is PATH.ctk unless --journal-dir is given.
        #[arg(long = "disk", value_parser = parse_disk, required_unless_present = "config")]
        disks: Vec<(String, PathBuf)>,
        /// A TOML configuration: disks, hooks, freeze targets, destage steps, listeners
        /// (an example is at the top of agent/src/config.rs).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where journals live (as NAME.ctk); default: beside each disk.
        #[arg(long)]
        journal_dir: Option<PathBuf>,
        /// Where the NBD front listens: unix:PATH or tcp:ADDRESS:PORT (loopback unless you
        /// mean it: NBD has no authentication). Repeatable. Default: unix:/run/ctk-agent/nbd.sock.
        #[arg(long = "listen")]
        listens: Vec<server::Listen>,
        /// The control socket (mode 0600). Default: /run/ctk-agent/control.sock.
        #[arg(long)]
        control: Option<PathBuf>,
        /// Tracking granularity, a power of two from 4K to 1M.
        #[arg(long, default_value = "4K", value_parser = parse_size)]
        block_size: u64,
        /// zstd level for exported deltas (default 1).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: Option<i32>,
    },
    /// (internal) Freeze mount points and thaw them on request, on parent death or at the
    /// timeout; started by the agent for application-consistent cuts.
    #[command(hide = true)]
    FreezeHelper {
        #[arg(long)]
        timeout_ms: u64,
        mounts: Vec<PathBuf>,
    },
    /// (internal) Run a hook or destage command for the agent, killing it and everything it
    /// started if the agent dies first.
    #[command(hide = true)]
    HookRunner {
        #[arg(long)]
        parent: u32,
        #[arg(last = true)]
        command: String,
    },
    /// Cut now: hold NBD writes, let those in flight finish, seal the epoch, release the
    /// writes, then make the seal and the backing durable. With the disk's hooks and freezes
    /// (the default when it has any) the cut is application-consistent. Prints the new
    /// ChangeId.
    Cut {
        /// crash (hold NBD writes only) or application (hooks and filesystem freeze first).
        /// Default: application if the disk has hooks or freeze targets configured.
        #[arg(long, value_parser = parse_consistency)]
        consistency: Option<Consistency>,
        #[command(flatten)]
        target: Target,
    },
    /// List the extents changed since a ChangeId (or "all") up to the latest cut, like
    /// VMware's QueryChangedDiskAreas.
    Changed {
        /// A ChangeId printed by `cut`, or "all" for every block that may hold data.
        #[arg(long, value_parser = parse_since)]
        since: ctk::Since,
        /// Up to this cut (default: the latest).
        #[arg(long)]
        to: Option<ctk::ChangeId>,
        #[command(flatten)]
        target: Target,
    },
    /// Cut, and write the blocks changed since a ChangeId (or "all") up to that cut as a
    /// delta file. Writes are held only for the cut; the delta is the disk as of the cut
    /// while writes go on (copy-on-write). A failed export leaves no partial file.
    Export {
        /// A ChangeId printed by `cut`, or "all" for a first full.
        #[arg(long, value_parser = parse_since)]
        since: ctk::Since,
        /// The delta file to write.
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// As for `cut`.
        #[arg(long, value_parser = parse_consistency)]
        consistency: Option<Consistency>,
        #[command(flatten)]
        target: Target,
    },
    /// Register, advance or drop a consumer cursor: cuts after a registered cursor stay
    /// answerable until it advances (without one, only the newest 8 cuts stay exact).
    Cursor {
        /// register, advance or drop.
        #[arg(value_parser = parse_cursor_op)]
        op: proto::CursorOp,
        /// The consumer's name (A-Z a-z 0-9 . _ -).
        name: String,
        /// The ChangeId the consumer has (default: the latest cut).
        #[arg(long)]
        at: Option<ctk::ChangeId>,
        #[command(flatten)]
        target: Target,
    },
    /// Grow or shrink a protected disk while it is served (a raw image file; resize a block
    /// device itself and the agent follows at its next cut). The change journal records the
    /// new size first, so tracking continues: growing marks the new range changed, and the
    /// next `replicate` sends only the blocks written since, the receiver's replica taking
    /// the new size. NBD clients see the new size when they reconnect (as with qemu-nbd).
    /// Shrinking discards the end of the disk.
    ///
    /// Example: ctk-agent resize --disk vm1 --size 40G
    Resize {
        /// The new size: bytes, or with K, M, G, T (powers of 1024).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Create this agent's identity (key and self-signed certificate) and print its
    /// fingerprint: the receiver allows the agent by it (`ctk-receiver serve --allow`).
    /// Run again, it prints the existing identity's fingerprint (never replaced).
    Init {
        /// Where the identity lives (cert.der, key.der; never overwritten).
        #[arg(long)]
        identity: PathBuf,
    },
    /// Bring a disk's replica on a receiver up to a new cut: export the changes since the
    /// receiver's newest point (a full the first time), push them over QUIC, and advance
    /// this agent's cursor for the receiver once the receiver has committed them.
    ///
    /// Once by default. With --every it keeps going (continuous mode: a crash-consistent
    /// cut every interval, plus application-consistent ones every --app-every); with --at
    /// it cuts at those local times each day (incremental forever). A long-running
    /// replication retries failures with growing pauses and stops on SIGINT/SIGTERM after
    /// the push under way. When the link is slower than the writes, each push carries all
    /// that piled up since the last commit (each block once, newest data): it never falls
    /// back to a full for being behind.
    #[command(verbatim_doc_comment)]
    Replicate {
        /// This agent's identity directory (made by `ctk-agent init`).
        #[arg(long)]
        identity: PathBuf,
        /// The receiver's UDP address.
        #[arg(long)]
        receiver: std::net::SocketAddr,
        /// The receiver's certificate fingerprint, as its `init` printed it.
        #[arg(long)]
        receiver_fingerprint: String,
        /// The cursor that keeps the receiver's point answerable between runs.
        #[arg(long, default_value = "replica")]
        cursor: String,
        /// Where the export's FIFO and block digests are made while a push runs.
        #[arg(long, default_value_os_t = std::env::temp_dir())]
        work_dir: PathBuf,
        /// Continuous mode: a crash-consistent cut and push every interval (e.g. 1s, 500ms,
        /// 5m). A push that takes longer is followed at once by the next.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "INTERVAL")]
        every: Option<std::time::Duration>,
        /// With --every: an application-consistent cut (the disk's hooks and freezes) every
        /// interval instead of a crash-consistent one (e.g. 15m).
        #[arg(long, value_parser = humantime::parse_duration, value_name = "INTERVAL")]
        app_every: Option<std::time::Duration>,
        /// Scheduled mode: cut and push at this local time each day (HH:MM; repeat for
        /// several).
        #[arg(long, value_parser = parse_at, value_name = "HH:MM")]
        at: Vec<u32>,
        /// Send at most this many bytes per second (500K, 10M, 1G: powers of 1024; 0 for
        /// no limit).
        #[arg(long, value_parser = parse_rate, default_value = "0", value_name = "RATE")]
        bwlimit: u64,
        /// Read the limit from this file, re-read once a second while running, so it can be
        /// changed at run time (`echo 10M > FILE`); it overrides --bwlimit once read.
        #[arg(long, value_name = "FILE")]
        bwlimit_file: Option<PathBuf>,
        /// Compare the replica with the disk by digests and send only the units that
        /// differ, even when the changes since the receiver's point are known: checks the
        /// whole replica against the source and repairs it (after a suspected tracking miss,
        /// or to verify). Done without asking when this agent cannot name the changes (its
        /// journal was lost or replaced, or the replica came from elsewhere).
        #[arg(long)]
        resync: bool,
        /// The unit a resync compares: each side hashes every unit (BLAKE3), and a unit that
        /// differs is sent whole (4K to 16M, a multiple of 4K).
        #[arg(long, value_parser = parse_size, default_value = "64K", value_name = "SIZE")]
        resync_unit: u64,
        /// Spread each push over this many QUIC streams (1 to 16). One stream carries at
        /// most its flow-control window (1.25 MB) per round trip, about 12 MB/s on a 100 ms
        /// link; each more stream adds that much. Use 1 with a receiver older than these
        /// multi-stream pushes.
        #[arg(long, default_value_t = replicate::STREAMS_DEFAULT, value_parser = clap::value_parser!(u8).range(1..=16), value_name = "N")]
        streams: u8,
        /// The cut of a one-shot run (or of each --at run): crash (NBD writes held for a
        /// moment, nothing else) or application (the disk's pre-freeze hooks and freezes
        /// first; refused for a disk that has none). Default: application if the disk has
        /// hooks or freeze targets, else crash. Continuous mode takes --every and
        /// --app-every instead.
        #[arg(long, value_parser = parse_consistency)]
        consistency: Option<Consistency>,
        /// Log a warning when the age of the newest committed cut passes this (e.g. 30s), and
        /// again when it recovers.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "AGE")]
        rpo_warn: Option<std::time::Duration>,
        #[command(flatten)]
        target: Target,
    },
    /// Show each protected disk: latest cut, open epoch, journal syncs, I/O counters.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Read a delta file and check every record, checksum and the trailer; print its header
    /// and totals.
    VerifyDelta {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

const DEFAULT_CONTROL: &str = "/run/ctk-agent/control.sock";

/// Which running agent and disk a client command talks to.
#[derive(clap::Args)]
struct Target {
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_CONTROL)]
    control: PathBuf,
    /// The disk (may be left out when the agent protects one disk).
    #[arg(long)]
    disk: Option<String>,
    /// Print the agent's JSON answer.
    #[arg(long)]
    json: bool,
}

fn parse_disk(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = text
        .split_once('=')
        .ok_or("use NAME=PATH, e.g. vm1=/images/vm1.img")?;
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(format!(
            "disk name {name:?}: use 1 to 128 of A-Z a-z 0-9 . _ -, not starting with . or -"
        ));
    }
    if path.is_empty() {
        return Err("the disk path is empty".into());
    }
    Ok((name.to_owned(), PathBuf::from(path)))
}

/// Sends one request to the agent's control socket (naming `--disk` unless the request
/// does) and returns its answer.
fn control(target: &Target, request: &Request) -> Result<serde_json::Value> {
    let request = request.clone().for_disk(target.disk.as_deref());
    ctk_agent::control::call(&target.control, &request)
}

/// Prints an answer: its JSON with --json, else `human` of it read as its type.
fn show<T: serde::de::DeserializeOwned>(
    target: &Target,
    answer: serde_json::Value,
    human: impl Fn(&T) -> String,
) -> Result<()> {
    if target.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        let typed: T = serde_json::from_value(answer)
            .context("the agent's answer is not what this version expects")?;
        println!("{}", human(&typed));
    }
    Ok(())
}

fn parse_consistency(text: &str) -> Result<Consistency, String> {
    text.parse()
}

fn parse_cursor_op(text: &str) -> Result<proto::CursorOp, String> {
    text.parse()
}

fn parse_since(text: &str) -> Result<ctk::Since, String> {
    match text {
        "all" => Ok(ctk::Since::All),
        t => t
            .parse()
            .map(ctk::Since::Id)
            .map_err(|e| format!("{e}; or \"all\"")),
    }
}

fn parse_at(text: &str) -> Result<u32, String> {
    continuous::parse_time_of_day(text).map_err(|e| e.to_string())
}

fn parse_rate(text: &str) -> Result<u64, String> {
    continuous::parse_rate(text).map_err(|e| e.to_string())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve {
            disks,
            config,
            journal_dir,
            listens,
            control,
            block_size,
            zstd_level,
        } => serve(
            disks,
            config,
            journal_dir,
            listens,
            control,
            block_size,
            zstd_level,
        ),
        Command::FreezeHelper { timeout_ms, mounts } => {
            freeze::helper_main(&mounts, std::time::Duration::from_millis(timeout_ms))
        }
        Command::HookRunner { parent, command } => {
            let code = pipeline::hook_runner_main(parent, &command)?;
            std::process::exit(code);
        }
        Command::Cut {
            consistency,
            target,
        } => {
            let answer = control(
                &target,
                &Request::Cut {
                    disk: None,
                    consistency,
                },
            )?;
            let cut: proto::CutAnswer = serde_json::from_value(answer.clone())?;
            for w in &cut.warnings {
                eprintln!("warning: {w}");
            }
            show(&target, answer, |a: &proto::CutAnswer| {
                a.change_id.to_string()
            })
        }
        Command::Changed { since, to, target } => {
            let answer = control(
                &target,
                &Request::Changed {
                    disk: None,
                    since,
                    to,
                },
            )?;
            show(&target, answer, |a: &proto::ChangedAnswer| {
                let mut out = String::new();
                for (offset, length) in &a.extents {
                    out.push_str(&format!("{offset} {length}\n"));
                }
                out.push_str(&format!(
                    "# {} bytes changed, up to {}",
                    a.changed_bytes, a.to
                ));
                out
            })
        }
        Command::Export {
            since,
            output,
            consistency,
            target,
        } => {
            let output = std::path::absolute(&output)?;
            let request = Request::Export(proto::Export {
                disk: None,
                since: proto::ExportSince::Since(since),
                path: output,
                leaves: None,
                consistency,
                base: None,
                unit: None,
                digests: None,
                resume: None,
            });
            let answer = control(&target, &request)?;
            show(&target, answer, |a: &proto::ExportAnswer| {
                format!(
                    "{}: {} bytes changed -> {} byte delta, up to {}",
                    a.path.display(),
                    a.changed_bytes,
                    a.delta_bytes,
                    a.to
                )
            })
        }
        Command::Resize { size, target } => {
            let answer = control(&target, &Request::Resize { disk: None, size })?;
            show(&target, answer, |a: &proto::ResizeAnswer| {
                format!(
                    "{}: resized from {} to {} bytes; NBD clients see the new size when they \
                     reconnect, and the next replicate carries it to the receiver",
                    a.disk, a.old_size, a.new_size
                )
            })
        }
        Command::Init { identity } => {
            // Run again, it prints the existing identity's fingerprint: it is never replaced.
            let (id, created) = ctk_net::Identity::init(&identity, "ctk-agent")?;
            println!("{}", id.fingerprint());
            eprintln!(
                "identity {} {}; allow it on the receiver with --allow NAME=<the fingerprint above>",
                if created { "written to" } else { "already in" },
                identity.display()
            );
            Ok(())
        }
        Command::Replicate {
            identity,
            receiver,
            receiver_fingerprint,
            cursor,
            work_dir,
            every,
            app_every,
            at,
            bwlimit,
            bwlimit_file,
            rpo_warn,
            consistency,
            resync,
            resync_unit,
            streams,
            target,
        } => {
            let disk = match &target.disk {
                Some(d) => d.clone(),
                None => {
                    let status: proto::StatusAnswer =
                        serde_json::from_value(control(&target, &Request::Status)?)?;
                    match &status.disks[..] {
                        [one] => one.name.clone(),
                        disks => anyhow::bail!(
                            "the agent protects {} disks: name one with --disk",
                            disks.len()
                        ),
                    }
                }
            };
            let r = replicate::Replicate {
                identity,
                receiver,
                pinned: receiver_fingerprint.parse()?,
                cursor,
                work_dir,
                resync_unit: u32::try_from(resync_unit)
                    .ok()
                    .filter(|u| ctk::digest::unit_count(0, *u).is_ok())
                    .context("--resync-unit: use a multiple of 4K from 4K to 16M")?,
                streams,
            };
            let schedule = continuous::Schedule {
                every,
                app_every,
                at,
                rpo_warn,
                cut: match consistency {
                    Some(Consistency::Crash) => replicate::Cut::Crash,
                    Some(Consistency::Application) => replicate::Cut::Application,
                    None => replicate::Cut::Default,
                },
            };
            let text = |a: &serde_json::Value| match a["error"].as_str() {
                Some(e) => format!("{}: failed, retrying in {}s: {e}", disk, a["retry_in_s"]),
                None if a["unchanged"] == true => format!(
                    "{}: in sync: nothing written since {}, the receiver's newest point \
                     (nothing pushed)",
                    a["disk"].as_str().unwrap_or(""),
                    a["committed"].as_str().unwrap_or(""),
                ),
                None => format!(
                    "{}: committed {} on the receiver ({} bytes changed, {} sent, {}){}",
                    a["disk"].as_str().unwrap_or(""),
                    a["committed"].as_str().unwrap_or(""),
                    a["changed_bytes"],
                    a["delta_bytes"],
                    a["consistency"].as_str().unwrap_or("crash"),
                    if a["already_committed"] == true {
                        "; it had it already"
                    } else {
                        ""
                    }
                ),
            };
            let call = |req: &Request| control(&target, req);
            if resync && !schedule.is_once() {
                anyhow::bail!("--resync is for one run: leave out --every and --at");
            }
            if schedule.is_once() && bwlimit_file.is_none() && rpo_warn.is_none() {
                let rate = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(bwlimit));
                schedule.check()?;
                let answer =
                    replicate::Session::open(&r, &disk, &call, rate)?.once(schedule.cut, resync)?;
                return print_answer(&target, &answer, text);
            }
            let options = continuous::Options {
                bwlimit,
                bwlimit_file,
            };
            // One line per cycle (JSON lines with --json), as it happens.
            continuous::run(&r, &disk, &call, &schedule, &options, &mut |a| {
                if target.json {
                    println!("{a}");
                } else {
                    println!("{}", text(a));
                }
            })
        }
        Command::Cursor {
            op,
            name,
            at,
            target,
        } => {
            let answer = control(
                &target,
                &Request::Cursor {
                    disk: None,
                    op,
                    name,
                    at,
                    cut_unix_ms: None,
                    rate_bytes_per_s: None,
                },
            )?;
            show(&target, answer, |a: &proto::CursorAnswer| {
                format!("cursor {} of {}: {:?} done", a.name, a.disk, a.op)
            })
        }
        Command::Status { target } => {
            let answer = control(&target, &Request::Status)?;
            show(&target, answer, |a: &proto::StatusAnswer| {
                let mut out = String::new();
                for d in &a.disks {
                    let latest = d.latest.map_or("-".into(), |l| l.to_string());
                    out.push_str(&format!(
                        "{}: {} ({} bytes), latest cut {latest}, {} blocks written since, {} writes, {} journal syncs\n",
                        d.name,
                        d.path.display(),
                        d.size,
                        d.open_epoch_blocks.unwrap_or(0),
                        d.writes,
                        d.journal_syncs.unwrap_or(0)
                    ));
                }
                out.trim_end().to_string()
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

/// Resolves flags and the configuration file into open disks, then runs the daemon.
fn serve(
    disks: Vec<(String, PathBuf)>,
    config: Option<PathBuf>,
    journal_dir: Option<PathBuf>,
    mut listens: Vec<server::Listen>,
    control: Option<PathBuf>,
    block_size: u64,
    zstd_level: Option<i32>,
) -> Result<()> {
    let mut file = match &config {
        Some(path) => config::load(path)?,
        None => config::Config::default(),
    };
    let journal_dir = journal_dir.or(file.journal_dir.clone());
    let mut wanted: Vec<(String, PathBuf, u64, Option<PathBuf>, config::CutPolicy)> = disks
        .into_iter()
        .map(|(name, path)| (name, path, block_size, None, config::CutPolicy::default()))
        .collect();
    for d in std::mem::take(&mut file.disks) {
        parse_disk(&format!("{}={}", d.name, d.path.display())).map_err(anyhow::Error::msg)?;
        let bs = match &d.block_size {
            Some(text) => parse_size(text).map_err(anyhow::Error::msg)?,
            None => block_size,
        };
        wanted.push((d.name, d.path, bs, d.journal, d.cut));
    }
    let mut opened: Vec<std::sync::Arc<disk::ProtectedDisk>> = Vec::new();
    for (name, path, bs, journal, policy) in wanted {
        if opened.iter().any(|d| d.name == name) {
            anyhow::bail!("disk name {name:?} is given twice");
        }
        let journal = match (journal, &journal_dir) {
            (Some(j), _) => j,
            (None, Some(dir)) => dir.join(format!("{name}.ctk")),
            (None, None) => {
                let mut j = path.clone().into_os_string();
                j.push(".ctk");
                PathBuf::from(j)
            }
        };
        let (d, outcome) = disk::ProtectedDisk::open(&name, &path, &journal, bs, policy)?;
        for target in &d.policy.freeze {
            ctk_agent::mounts::check_target_at_load(target, d.image_id())
                .with_context(|| format!("disk {name:?}"))?;
        }
        tracing::info!(disk = %name, ?outcome, size = d.size(), "protecting");
        opened.push(std::sync::Arc::new(d));
    }
    for l in &file.listen {
        listens.push(l.parse().map_err(anyhow::Error::msg)?);
    }
    if listens.is_empty() {
        listens.push(
            "unix:/run/ctk-agent/nbd.sock"
                .parse()
                .map_err(anyhow::Error::msg)?,
        );
    }
    let control = control
        .or(file.control.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL));
    let zstd_level = zstd_level.or(file.zstd_level).unwrap_or(1);
    anyhow::ensure!((1..=19).contains(&zstd_level), "zstd_level must be 1 to 19");
    let limits = resolve_limits(&file)?;
    let agent = std::sync::Arc::new(server::Agent::new(opened, zstd_level, limits));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(server::run(agent, listens, control))
}

/// The daemon's bounds: the configuration's, else the defaults fitted to the descriptors
/// this process may open (its soft limit raised to the hard one first).
fn resolve_limits(file: &config::Config) -> Result<limits::Limits> {
    let mut l = limits::Limits::default();
    if let Some(n) = file.nbd_connections_max {
        anyhow::ensure!(n >= 1, "nbd_connections_max must be at least 1");
        l.nbd_connections = n;
    }
    if let Some(n) = file.control_connections_max {
        anyhow::ensure!(n >= 1, "control_connections_max must be at least 1");
        l.control_connections = n;
    }
    if let Some(text) = &file.nbd_memory_max {
        l.nbd_memory = parse_size(text).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            l.nbd_memory >= u64::from(ctk_agent::nbd::PAYLOAD_MAX),
            "nbd_memory_max must be at least 32M, the largest request the agent accepts"
        );
    }
    if let Some(ms) = file.nbd_handshake_timeout_ms {
        anyhow::ensure!(ms >= 100, "nbd_handshake_timeout_ms must be at least 100");
        l.nbd_handshake_timeout = std::time::Duration::from_millis(ms);
    }
    let fds = limits::raise_descriptor_limit();
    if let Some(warning) = l.fit_to_descriptors(
        fds,
        file.nbd_connections_max.is_some(),
        file.control_connections_max.is_some(),
    ) {
        tracing::warn!("{warning}");
    }
    tracing::debug!(?l, fds, "limits");
    Ok(l)
}

fn print_answer(
    target: &Target,
    answer: &serde_json::Value,
    human: impl Fn(&serde_json::Value) -> String,
) -> Result<()> {
    if target.json {
        println!("{}", serde_json::to_string_pretty(answer)?);
    } else {
        println!("{}", human(answer));
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in a log file.
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
