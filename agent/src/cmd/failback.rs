//! `failback`: the original disk brought equal to the DR disk, then the cutover.

use anyhow::{Context, Result};
use clap::Args;

use ctk_agent::config::parse_size;
use ctk_agent::{continuous, failback};

use super::replicate::ReceiverArgs;
use super::{Target, control};

#[derive(Args)]
#[command(after_help = "Examples:\n  \
# at the original site, the agent serving the original disk, the original VM stopped:\n  \
ctk-agent failback --identity /etc/ctk/agent --receiver dr.example.net:7420 \\\n    \
--receiver-fingerprint sha256:... --disk vm1 --every 10s\n  \
# minutes later, when the passes are small: the cutover\n  \
ctk-agent failback --identity /etc/ctk/agent --receiver dr.example.net:7420 \\\n    \
--receiver-fingerprint sha256:... --disk vm1 --final\n\n\
From the first pass on, the disk takes no writes but failback's (NBD writes get EPERM) \
until the cutover. The first pass sends what either side changed since the failover's point \
(or, when this disk cannot name its own changes, every unit whose digest differs); each \
later pass what the recovered VM wrote since the one before. --final stops the DR export \
(its NBD clients lose the disk: stop the recovered VM first, or it sees write errors), runs \
the last pass, cuts this disk, and has the receiver commit the DR disk as that cut; the \
digests of both are compared, the replica cursor moves there, the fence is lifted, and the \
next `replicate` is an increment. Killed at any moment, run the same command again.")]
pub struct Failback {
    #[command(flatten)]
    pub to: ReceiverArgs,
    /// A pass every interval (e.g. 10s) while the recovered VM runs, until Ctrl-C or
    /// SIGTERM; without it, one pass.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "INTERVAL")]
    pub every: Option<std::time::Duration>,
    /// The cutover: stop the DR export, the last pass, commit the DR disk as this disk's
    /// cut on the receiver, move the replica cursor there, lift the fences.
    #[arg(long, conflicts_with = "every")]
    pub r#final: bool,
    /// Compare unit hashes on the first pass even though this disk can name its changes
    /// (to check the whole disk against the DR disk; it reads both whole).
    #[arg(long)]
    pub compare: bool,
    /// The unit compared when this disk cannot name its changes (4K to 16M).
    #[arg(long, value_parser = parse_size, default_value = "64K", value_name = "SIZE")]
    pub unit: u64,
    #[command(flatten)]
    pub target: Target,
}

pub fn failback(args: Failback) -> Result<()> {
    let Failback {
        to:
            ReceiverArgs {
                identity,
                receiver,
                receiver_fingerprint,
                cursor,
                work_dir: _,
            },
        every,
        r#final,
        compare,
        unit,
        target,
    } = args;
    let disk = target
        .disk
        .clone()
        .context("name the disk to fail back with --disk")?;
    let f = failback::Failback {
        identity,
        receiver,
        pinned: receiver_fingerprint.parse()?,
        cursor,
        unit: super::digest_unit(unit, "--unit")?,
        control: target.control.clone(),
        compare,
    };
    let call = |req: &ctk_agent::control::Request| control(&target, req);
    continuous::stop_on_signals();
    let mut session = failback::Session::open(&f, &disk, &call)?;
    failback::run(
        &mut session,
        every,
        r#final,
        &continuous::stop_requested,
        &mut |a| {
            if target.json {
                println!("{a}");
            } else {
                println!("{}", text(a));
            }
        },
    )
}

/// One line per report.
fn text(a: &serde_json::Value) -> String {
    let disk = a["disk"].as_str().unwrap_or("");
    if a["not_failed_over"] == true {
        return format!(
            "{disk}: nothing to fail back: {}",
            a["message"].as_str().unwrap_or("")
        );
    }
    if let Some(point) = a["committed"].as_str() {
        return format!(
            "{disk}: cutover done: the receiver committed the DR disk as {point}{} in {:.2} s; \
             this disk equals it{}; replication resumes with an increment",
            if a["already_committed"] == true {
                " (earlier)"
            } else {
                ""
            },
            a["commit_seconds"].as_f64().unwrap_or(0.0),
            if a["digest_checked"] == true {
                " (image digests compared)"
            } else {
                ""
            }
        );
    }
    format!(
        "{disk}: {} pass applied: {} blocks ({} bytes sent) as of the DR overlay's cut {} in \
         {:.2} s",
        if a["final"] == true {
            "final"
        } else if a["first"] == true {
            "first"
        } else {
            "a"
        },
        a["blocks"],
        a["delta_bytes"],
        a["upto"].as_str().unwrap_or(""),
        a["seconds"].as_f64().unwrap_or(0.0)
    )
}
