//! `replicate`: one push, or the continuous and scheduled modes, to a receiver over QUIC.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use ctk::Consistency;
use ctk_agent::config::parse_size;
use ctk_agent::control::{Request, proto};
use ctk_agent::{continuous, replicate};

use super::{Target, control, parse_at, parse_consistency, parse_rate, print_answer};

/// The receiver and this agent's side of the link: shared by `replicate` and `failback`.
#[derive(Args)]
pub struct ReceiverArgs {
    /// This agent's identity directory (made by `ctk-agent init`).
    #[arg(long)]
    pub identity: PathBuf,
    /// The receiver: HOST:PORT (a name such as dr.example.net:7420, resolved once at the
    /// start, or an address; QUIC over UDP, so that port must pass UDP).
    #[arg(long, value_parser = parse_receiver, value_name = "HOST:PORT")]
    pub receiver: std::net::SocketAddr,
    /// The receiver's certificate fingerprint, as its `init` printed it.
    #[arg(long)]
    pub receiver_fingerprint: String,
    /// The cursor that keeps the receiver's point answerable between runs.
    #[arg(long, default_value = "replica")]
    pub cursor: String,
    /// Where work files are made (a push's FIFO and block digests; failback makes none).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    pub work_dir: PathBuf,
}

#[derive(Args)]
pub struct Replicate {
    #[command(flatten)]
    pub to: ReceiverArgs,
    /// Continuous mode: a crash-consistent cut and push every interval (e.g. 1s, 500ms,
    /// 5m). A push that takes longer is followed at once by the next.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "INTERVAL")]
    pub every: Option<std::time::Duration>,
    /// With --every: an application-consistent cut (the disk's hooks and freezes) every
    /// interval instead of a crash-consistent one (e.g. 15m).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "INTERVAL")]
    pub app_every: Option<std::time::Duration>,
    /// Scheduled mode: cut and push at this local time each day (HH:MM; repeat for
    /// several).
    #[arg(long, value_parser = parse_at, value_name = "HH:MM")]
    pub at: Vec<u32>,
    /// Send at most this many bytes per second (500K, 10M, 1G: powers of 1024; 0 for
    /// no limit).
    #[arg(long, value_parser = parse_rate, default_value = "0", value_name = "RATE")]
    pub bwlimit: u64,
    /// Read the limit from this file, re-read once a second while running, so it can be
    /// changed at run time (`echo 10M > FILE`); it overrides --bwlimit once read.
    #[arg(long, value_name = "FILE")]
    pub bwlimit_file: Option<PathBuf>,
    /// Compare the replica with the disk by digests and send only the units that
    /// differ, even when the changes since the receiver's point are known: checks the
    /// whole replica against the source and repairs it (after a suspected tracking miss,
    /// or to verify). Done without asking when this agent cannot name the changes (its
    /// journal was lost or replaced, or the replica came from elsewhere).
    #[arg(long)]
    pub resync: bool,
    /// The unit a resync compares: each side hashes every unit (BLAKE3), and a unit that
    /// differs is sent whole (4K to 16M, a multiple of 4K).
    #[arg(long, value_parser = parse_size, default_value = "64K", value_name = "SIZE")]
    pub resync_unit: u64,
    /// Spread each push over this many QUIC streams (1 to 16). One stream carries at
    /// most its flow-control window (1.25 MB) per round trip, about 12 MB/s on a 100 ms
    /// link; each more stream adds that much. Use 1 with a receiver older than these
    /// multi-stream pushes.
    #[arg(long, default_value_t = replicate::STREAMS_DEFAULT, value_parser = clap::value_parser!(u8).range(1..=16), value_name = "N")]
    pub streams: u8,
    /// The cut of a one-shot run (or of each --at run): crash (NBD writes held for a
    /// moment, nothing else) or application (the disk's pre-freeze hooks and freezes
    /// first; refused for a disk that has none). Default: application if the disk has
    /// hooks or freeze targets, else crash. Continuous mode takes --every and
    /// --app-every instead.
    #[arg(long, value_parser = parse_consistency)]
    pub consistency: Option<Consistency>,
    /// Log a warning when the age of the newest committed cut passes this (e.g. 30s), and
    /// again when it recovers.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "AGE")]
    pub rpo_warn: Option<std::time::Duration>,
    /// Replicate a consistency group (instead of --disk): one cut of every member at one
    /// instant, each member's delta pushed side by side, then the group point recorded on
    /// the receiver once all are committed (`ctk-receiver points --group`). With --bwlimit,
    /// each member's push is paced on its own.
    #[arg(long, conflicts_with_all = ["disk", "resync"])]
    pub group: Option<String>,
    #[command(flatten)]
    pub target: Target,
}

pub fn replicate(args: Replicate) -> Result<()> {
    let Replicate {
        to:
            ReceiverArgs {
                identity,
                receiver,
                receiver_fingerprint,
                cursor,
                work_dir,
            },
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
        group,
        target,
    } = args;
    let disk = match (&target.disk, &group) {
        (_, Some(g)) => g.clone(),
        (Some(d), None) => d.clone(),
        (None, None) => {
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
        resync_unit: super::digest_unit(resync_unit, "--resync-unit")?,
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
        None if a["group"].is_string() => group_text(a),
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
        let answer = match &group {
            Some(g) => replicate::GroupSession::open(&r, g, &call, rate)?.once(schedule.cut)?,
            None => replicate::Session::open(&r, &disk, &call, rate)?.once(schedule.cut, resync)?,
        };
        return print_answer(&target, &answer, text);
    }
    let options = continuous::Options {
        bwlimit,
        bwlimit_file,
    };
    // One line per cycle (JSON lines with --json), as it happens.
    let subject = match &group {
        Some(g) => continuous::Subject::Group(g),
        None => continuous::Subject::Disk(&disk),
    };
    continuous::run(&r, subject, &call, &schedule, &options, &mut |a| {
        if target.json {
            println!("{a}");
        } else {
            println!("{}", text(a));
        }
    })
}

/// A committed group replication, for people: the group point and each member's point.
fn group_text(a: &serde_json::Value) -> String {
    let mut out = format!(
        "group {}: committed group point {} on the receiver ({}){}",
        a["group"].as_str().unwrap_or(""),
        a["group_cut"].as_str().unwrap_or(""),
        a["consistency"].as_str().unwrap_or("crash"),
        if a["already_committed"] == true {
            "; it had it already"
        } else {
            ""
        }
    );
    for m in a["members"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n  {}: {} ({} bytes changed, {} sent)",
            m["disk"].as_str().unwrap_or(""),
            m["committed"].as_str().unwrap_or(""),
            m["changed_bytes"],
            m["delta_bytes"]
        ));
    }
    out
}

/// `--receiver`: a host name or an address, with its port.
pub(crate) fn parse_receiver(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let bad = || format!("{text:?} is not HOST:PORT (e.g. dr.example.net:7420 or 192.0.2.7:7420)");
    let (_, port) = text.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let found: Vec<_> = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?
        .collect();
    // IPv4 first where a name has both (a receiver listening on 0.0.0.0 has no IPv6).
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}
