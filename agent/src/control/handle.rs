//! Serving control requests: one function per command, each returning its typed answer.

use std::path::Path;

use anyhow::{Context, Result, bail};
use ctk::{Consistency, Since};
use serde_json::Value;
use tracing::info;

use super::proto::*;
use crate::disk::{DiskError, ExportPlan, ProtectedDisk};
use crate::pipeline;
use crate::server::Agent;

/// How long an export waits for one already running on the same disk (a killed
/// replication's export finishes on its own) before it is refused as busy.
pub(super) const EXPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs one request; the answer's JSON (the caller adds `"ok": true`).
pub(super) fn handle(agent: &Agent, request: Request) -> Result<Value> {
    if request == Request::Status {
        let disks = agent.disks.iter().map(|d| d.status()).collect();
        return Ok(serde_json::to_value(StatusAnswer { disks })?);
    }
    if let Request::GroupCut { .. } | Request::GroupExport { .. } = request {
        return super::group::handle(agent, request);
    }
    let disk = pick_disk(agent, request.disk())?;
    let want = wanted_consistency(disk, request.consistency())?;
    let answer = match request {
        Request::Status | Request::GroupCut { .. } | Request::GroupExport { .. } => {
            unreachable!("answered above")
        }
        Request::Unchanged { since, .. } => serde_json::to_value(unchanged(disk, since, want)?),
        Request::Failback { op, .. } => serde_json::to_value(FailbackAnswer {
            disk: disk.name.clone(),
            state: disk.failback(op)?,
        }),
        Request::Resize { size, .. } => {
            let r = disk.resize(size)?;
            serde_json::to_value(ResizeAnswer {
                disk: disk.name.clone(),
                old_size: r.old_size,
                new_size: r.new_size,
            })
        }
        Request::Cut { .. } => {
            let report = pipeline::cut(disk, want, |_| Ok(Value::Null))?;
            serde_json::to_value(report.answer(&disk.name))
        }
        Request::Changed { since, to, .. } => {
            let (to, extents) = disk.changed(since, to)?;
            serde_json::to_value(ChangedAnswer {
                disk: disk.name.clone(),
                to,
                changed_bytes: extents.iter().map(|e| e.length).sum(),
                extents: extents.iter().map(|e| (e.offset, e.length)).collect(),
            })
        }
        Request::Answerable { since, .. } => serde_json::to_value(answerable(disk, since)?),
        Request::Export(export) => serde_json::to_value(self::export(agent, disk, export, want)?),
        Request::Cursor {
            op,
            name,
            at,
            cut_unix_ms,
            rate_bytes_per_s,
            ..
        } => {
            // A replication that moves its cursor says when that point was cut and how
            // fast it went, for the RPO and ETA in `status`.
            let meta = crate::disk::CursorMeta {
                cut_unix_ms,
                rate_bps: rate_bytes_per_s,
                ..Default::default()
            };
            disk.cursor(op, &name, at, meta)?;
            serde_json::to_value(CursorAnswer {
                disk: disk.name.clone(),
                op,
                name,
            })
        }
    };
    Ok(answer?)
}

/// A failback pass whose delta is read from `delta` (the rest of its control connection).
pub(super) fn failback_apply(
    agent: &Agent,
    disk: Option<&str>,
    point: ctk::ChangeId,
    upto: ctk::ChangeId,
    delta: impl std::io::Read,
) -> Result<Value> {
    let disk = pick_disk(agent, disk)?;
    let state = disk.failback_apply(delta, point, upto)?;
    Ok(serde_json::to_value(FailbackAnswer {
        disk: disk.name.clone(),
        state: Some(state),
    })?)
}

/// The disk a request names; the only one when it names none.
fn pick_disk<'a>(agent: &'a Agent, name: Option<&str>) -> Result<&'a ProtectedDisk> {
    match (name, agent.disks.len()) {
        (None | Some(""), 1) => Ok(&agent.disks[0]),
        (None | Some(""), _) => bail!("several disks are protected: name one with \"disk\""),
        (Some(n), _) => Ok(agent
            .disk(n)
            .with_context(|| format!("no disk named {n:?}"))?),
    }
}

/// The consistency a cut of `disk` gets: what was asked, by default application when the
/// disk can quiesce. Asking for application on a disk that cannot is refused.
fn wanted_consistency(disk: &ProtectedDisk, asked: Option<Consistency>) -> Result<Consistency> {
    match asked {
        None if !disk.policy.can_quiesce() => Ok(Consistency::Crash),
        None => Ok(Consistency::Application),
        Some(Consistency::Application) if !disk.policy.can_quiesce() => bail!(
            "disk {:?} has no pre_freeze hook and no freeze target, so no cut of it can be \
             application-consistent: configure [disk.cut] for it, or ask for a crash-consistent \
             cut",
            disk.name
        ),
        Some(c) => Ok(c),
    }
}

/// Would a cut now capture nothing since `since`? Only asked for crash cuts: an application
/// cut may write as it quiesces, and its label is itself news.
fn unchanged(
    disk: &ProtectedDisk,
    since: ctk::ChangeId,
    want: Consistency,
) -> Result<UnchangedAnswer> {
    let unchanged = want == Consistency::Crash && disk.unchanged_since(since)?;
    Ok(UnchangedAnswer {
        disk: disk.name.clone(),
        since,
        unchanged,
        as_of_unix_ms: ctk::unix_ms_now(),
    })
}

/// Can this agent export the changes since that point? If not (another generation after a
/// journal loss, compacted away, unknown), a replication resyncs.
fn answerable(disk: &ProtectedDisk, since: Since) -> Result<AnswerableAnswer> {
    let (answerable, why) = match disk.changed(since, None) {
        Ok(_) => (true, None),
        Err(DiskError::Tracker(ctk::TrackerError::Query(e))) => (false, Some(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    Ok(AnswerableAnswer {
        disk: disk.name.clone(),
        answerable,
        why,
    })
}

/// What an export request asks for, checked against the disk.
fn plan(disk: &ProtectedDisk, e: &Export) -> Result<ExportPlan> {
    Ok(match (e.since, e.resume) {
        (ExportSince::Compare, _) => {
            let base = e
                .base
                .context("a compare export needs the receiver's point as \"base\"")?;
            let unit = e
                .unit
                .context("a compare export needs a \"unit\" in bytes")?;
            ctk::digest::unit_count(disk.size(), unit).map_err(anyhow::Error::msg)?;
            let theirs = e
                .digests
                .clone()
                .filter(|p| p.is_absolute())
                .context("a compare export needs an absolute \"digests\" path")?;
            ExportPlan::Compare { base, unit, theirs }
        }
        (ExportSince::Since(since), Some(r)) => {
            // The cut-off push's cut must be one this journal can still answer.
            disk.changed(Since::Id(r.prior), None)?;
            ExportPlan::Resume {
                since,
                prior: r.prior,
                next_offset: r.next_offset,
            }
        }
        (ExportSince::Since(since), None) => ExportPlan::Changed(since),
    })
}

/// Cuts, and writes the delta the request asks for while writes go on (copy-on-write).
fn export(
    agent: &Agent,
    disk: &ProtectedDisk,
    e: Export,
    want: Consistency,
) -> Result<ExportAnswer> {
    let plan = plan(disk, &e)?;
    let path = e.path.as_path();
    if !path.is_absolute() {
        bail!(
            "export path {path:?} must be absolute (the daemon's working directory is not yours)"
        );
    }
    let leaves = match e.leaves.as_deref() {
        Some(p) if p.is_absolute() => Some(p),
        Some(p) => bail!("export leaves path {p:?} must be absolute"),
        None => None,
    };
    // Refuse a bad `since` before cutting, so it leaves no empty cut behind.
    if let ExportPlan::Changed(since) | ExportPlan::Resume { since, .. } = plan {
        disk.changed(since, None)?;
    }
    // A path that cannot be written fails here, before a cut is taken for nothing.
    let to_file = !std::fs::metadata(path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
    if to_file {
        std::fs::File::create(path)
            .with_context(|| format!("cannot create the export file {}", path.display()))?;
    }
    disk.wait_export_idle(EXPORT_WAIT)?;
    let cut_unix_ms = ctk::unix_ms_now();
    // The snapshot is taken inside the hold; NBD writes and the filesystems are released
    // before the data is read, and copy-on-write keeps it as of the cut.
    let mut began = false;
    let mut size_at_cut = 0;
    let report = pipeline::cut(disk, want, |to| {
        disk.begin_snapshot(&plan, to)?;
        began = true;
        // The size cannot change while the snapshot lives (resize waits for it).
        size_at_cut = disk.size();
        Ok(Value::Null)
    });
    // A cut that failed after this export's snapshot began leaves it behind; one refused
    // as busy must not touch the running export's snapshot.
    let report = report.inspect_err(|_| {
        if began {
            disk.abort_snapshot()
        }
        if to_file {
            let _ = std::fs::remove_file(path);
        }
    })?;
    let exported = disk.export_snapshot(&plan, report.change_id, path, leaves, agent.zstd_level);
    let exported = exported.map_err(|err| failed(disk, path, leaves, to_file, err))?;
    info!(disk = %disk.name, to = %report.change_id, "exported");
    Ok(export_answer(
        disk,
        &report,
        path,
        cut_unix_ms,
        size_at_cut,
        exported,
    ))
}

/// An export's answer: its cut, where it went, and what `export_snapshot` reported.
pub(super) fn export_answer(
    disk: &ProtectedDisk,
    report: &pipeline::CutReport,
    path: &Path,
    cut_unix_ms: u64,
    disk_size: u64,
    (changed, s, peak): (u64, ctk::delta::DeltaSummary, u64),
) -> ExportAnswer {
    ExportAnswer {
        cut: report.answer(&disk.name),
        to: report.change_id,
        path: path.to_owned(),
        cut_unix_ms,
        disk_size,
        changed_bytes: changed,
        data_bytes: s.data_bytes,
        zero_bytes: s.zero_bytes,
        delta_bytes: s.stream_bytes,
        records: s.records,
        cow_peak_bytes: peak,
    }
}

/// A failed export: nothing half-written is left to be taken for a delta, and the error
/// names the path.
fn failed(
    disk: &ProtectedDisk,
    path: &Path,
    leaves: Option<&Path>,
    to_file: bool,
    err: DiskError,
) -> anyhow::Error {
    let removed = to_file && std::fs::remove_file(path).is_ok();
    if let Some(l) = leaves {
        let _ = std::fs::remove_file(l);
    }
    anyhow::Error::new(err).context(format!(
        "the export of disk {:?} to {} failed{}",
        disk.name,
        path.display(),
        if removed {
            " (its partial file was removed)"
        } else {
            ""
        }
    ))
}
