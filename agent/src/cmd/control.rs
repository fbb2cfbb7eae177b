//! The commands that talk to a running agent over its control socket: `cut`, `changed`,
//! `export`, `resize`, `cursor`, `status`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use ctk::Consistency;
use ctk_agent::config::parse_size;
use ctk_agent::control::{Request, proto};

use super::{Target, control, parse_consistency, parse_cursor_op, parse_since, show};

#[derive(Args)]
pub struct Cut {
    /// crash (hold NBD writes only) or application (hooks and filesystem freeze first).
    /// Default: application if the disk has hooks or freeze targets configured.
    #[arg(long, value_parser = parse_consistency)]
    pub consistency: Option<Consistency>,
    /// Cut every disk of this consistency group at one instant (instead of --disk).
    #[arg(long, conflicts_with = "disk")]
    pub group: Option<String>,
    #[command(flatten)]
    pub target: Target,
}

pub fn cut(args: Cut) -> Result<()> {
    let Cut {
        consistency,
        group,
        target,
    } = args;
    if let Some(group) = group {
        let answer = control(&target, &Request::GroupCut { group, consistency })?;
        let cut: proto::GroupCutAnswer = serde_json::from_value(answer.clone())?;
        for w in cut
            .members
            .first()
            .map(|m| &m.warnings)
            .into_iter()
            .flatten()
        {
            eprintln!("warning: {w}");
        }
        return show(&target, answer, |a: &proto::GroupCutAnswer| {
            let mut out = format!(
                "group {} cut {} ({}, writes held {:.2} ms on every disk)",
                a.group,
                a.group_cut,
                a.consistency.as_str(),
                a.hold_ms
            );
            for m in &a.members {
                out.push_str(&format!("\n  {} {}", m.disk, m.change_id));
            }
            out
        });
    }
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

#[derive(Args)]
pub struct Changed {
    /// A ChangeId printed by `cut`, or "all" for every block that may hold data.
    #[arg(long, value_parser = parse_since)]
    pub since: ctk::Since,
    /// Up to this cut (default: the latest).
    #[arg(long)]
    pub to: Option<ctk::ChangeId>,
    #[command(flatten)]
    pub target: Target,
}

pub fn changed(args: Changed) -> Result<()> {
    let Changed { since, to, target } = args;
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

#[derive(Args)]
pub struct Export {
    /// A ChangeId printed by `cut`, or "all" for a first full. With --group: "all", or
    /// DISK=CHANGEID for a member (repeatable; members not named: "all").
    #[arg(long, required = true)]
    pub since: Vec<String>,
    /// The delta file to write (with --group: the directory, one DISK.ctkd per member).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// As for `cut`.
    #[arg(long, value_parser = parse_consistency)]
    pub consistency: Option<Consistency>,
    /// Export every disk of this consistency group as of one instant (instead of --disk).
    #[arg(long, conflicts_with = "disk")]
    pub group: Option<String>,
    #[command(flatten)]
    pub target: Target,
}

pub fn export(args: Export) -> Result<()> {
    let Export {
        since,
        output,
        consistency,
        group,
        target,
    } = args;
    let output = std::path::absolute(&output)?;
    if let Some(group) = group {
        return export_group(group, since, output, consistency, &target);
    }
    let [since] = since.as_slice() else {
        anyhow::bail!("--since is given once for one disk");
    };
    let since = parse_since(since).map_err(anyhow::Error::msg)?;
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

/// `export --group`: every member's delta as of one group cut, into the directory `dir`.
fn export_group(
    group: String,
    since: Vec<String>,
    dir: PathBuf,
    consistency: Option<Consistency>,
    target: &super::Target,
) -> Result<()> {
    let mut per_disk = std::collections::BTreeMap::new();
    for s in since.iter().filter(|s| s.as_str() != "all") {
        let (disk, id) = s
            .split_once('=')
            .with_context(|| format!("--since {s:?}: with --group use \"all\" or DISK=CHANGEID"))?;
        let id = parse_since(id).map_err(anyhow::Error::msg)?;
        per_disk.insert(disk.to_owned(), id);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let status: proto::StatusAnswer = serde_json::from_value(control(target, &Request::Status)?)?;
    let disks = status
        .groups
        .into_iter()
        .find(|g| g.name == group)
        .map(|g| g.disks)
        .with_context(|| format!("the agent has no group named {group:?}"))?;
    if let Some(stranger) = per_disk.keys().find(|d| !disks.contains(d)) {
        anyhow::bail!("--since names {stranger:?}, which is not a disk of group {group:?}");
    }
    let members = disks
        .iter()
        .map(|d| proto::Export {
            disk: Some(d.clone()),
            since: proto::ExportSince::Since(per_disk.get(d).copied().unwrap_or(ctk::Since::All)),
            path: dir.join(format!("{d}.ctkd")),
            leaves: None,
            consistency: None,
            base: None,
            unit: None,
            digests: None,
            resume: None,
        })
        .collect();
    let request = Request::GroupExport {
        group,
        members,
        consistency,
    };
    let answer = control(target, &request)?;
    show(target, answer, |a: &proto::GroupExportAnswer| {
        let mut out = format!(
            "group {} cut {} ({})",
            a.group,
            a.group_cut,
            a.consistency.as_str()
        );
        for m in &a.members {
            out.push_str(&format!(
                "\n  {}: {} bytes changed -> {} byte delta, up to {}",
                m.path.display(),
                m.changed_bytes,
                m.delta_bytes,
                m.to
            ));
        }
        out
    })
}

#[derive(Args)]
pub struct Resize {
    /// The new size: bytes, or with K, M, G, T (powers of 1024).
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    #[command(flatten)]
    pub target: Target,
}

pub fn resize(args: Resize) -> Result<()> {
    let Resize { size, target } = args;
    let answer = control(&target, &Request::Resize { disk: None, size })?;
    show(&target, answer, |a: &proto::ResizeAnswer| {
        format!(
            "{}: resized from {} to {} bytes; NBD clients see the new size when they \
             reconnect, and the next replicate carries it to the receiver",
            a.disk, a.old_size, a.new_size
        )
    })
}

#[derive(Args)]
pub struct Cursor {
    /// register, advance or drop.
    #[arg(value_parser = parse_cursor_op)]
    pub op: proto::CursorOp,
    /// The consumer's name (A-Z a-z 0-9 . _ -).
    pub name: String,
    /// The ChangeId the consumer has (default: the latest cut).
    #[arg(long)]
    pub at: Option<ctk::ChangeId>,
    #[command(flatten)]
    pub target: Target,
}

pub fn cursor(args: Cursor) -> Result<()> {
    let Cursor {
        op,
        name,
        at,
        target,
    } = args;
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

#[derive(Args)]
pub struct Status {
    #[command(flatten)]
    pub target: Target,
}

pub fn status(args: Status) -> Result<()> {
    let Status { target } = args;
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
            for c in d.cursors.iter().flatten() {
                out.push_str(&cursor_line(c));
            }
            if let Some(f) = &d.failback {
                out.push_str(&failback_line(f));
            }
        }
        for g in &a.groups {
            out.push_str(&format!(
                "group {}: {} (cut together: cut --group, replicate --group)\n",
                g.name,
                g.disks.join(", ")
            ));
        }
        out.trim_end().to_string()
    })
}

/// A failback under way, as people read it: its phase and what it applied.
fn failback_line(f: &ctk_agent::disk::FailbackState) -> String {
    let phase = match (&f.committing, f.passes) {
        (Some(c), _) => format!("cutover: committing {} on the receiver", c.point),
        (None, 0) => "started, no pass applied yet".to_owned(),
        (None, _) => "reverse replication".to_owned(),
    };
    let mut line = format!(
        "  FAILING BACK since {} ({phase}): NBD writes refused until the cutover; {} passes, \
         {} MiB applied",
        ctk::units::local_time(f.started_unix_ms),
        f.passes,
        f.bytes_applied >> 20
    );
    if let (Some(at), Some(upto)) = (f.applied_unix_ms, f.applied_upto) {
        line.push_str(&format!(
            ", the last as of the DR overlay's cut {upto} at {}",
            ctk::units::local_time(at)
        ));
    }
    line.push('\n');
    line
}

/// A cursor as people read it: where it is, the RPO and the cut it stands for in the local
/// zone, and what is left to send.
fn cursor_line(c: &ctk_agent::disk::CursorStatus) -> String {
    let mut line = format!("  cursor {} at {}", c.name, c.at);
    if let Some(rpo) = c.rpo_s {
        line.push_str(&format!(", RPO {rpo:.1} s"));
    }
    if let Some(cut) = c.cut_unix_ms {
        line.push_str(&format!(" (in sync as of {})", ctk::units::local_time(cut)));
    }
    if let Some(b) = c.backlog_bytes {
        line.push_str(&format!(", {} KiB to send", b.div_ceil(1024)));
    }
    if let Some(eta) = c.eta_s.filter(|_| c.backlog_bytes.is_some_and(|b| b > 0)) {
        line.push_str(&format!(", about {eta:.0} s at the last rate"));
    }
    line.push('\n');
    line
}
