//! Serving control requests: one function per command, each returning its typed answer.

use anyhow::{Context, Result, bail};
use ctk::{Consistency, Since};
use serde_json::Value;

use super::proto::*;
use crate::disk::{DiskError, ProtectedDisk};
use crate::pipeline;
use crate::server::Agent;

/// Runs one request; the answer's JSON (the caller adds `"ok": true`).
pub(super) fn handle(agent: &Agent, request: Request) -> Result<Value> {
    if request == Request::Status {
        let disks = agent.disks.iter().map(|d| d.status()).collect();
        let groups = agent
            .groups
            .iter()
            .map(|g| GroupStatus {
                name: g.name.clone(),
                disks: g
                    .members
                    .iter()
                    .map(|&i| agent.disks[i].name.clone())
                    .collect(),
            })
            .collect();
        return Ok(serde_json::to_value(StatusAnswer { disks, groups })?);
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
        Request::Export(export) => {
            serde_json::to_value(super::export::export(agent, disk, export, want)?)
        }
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
