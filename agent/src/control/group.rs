//! The consistency group requests: `group_cut` (every member cut at one instant) and
//! `group_export` (the same, each member's delta written while writes go on).

use anyhow::{Context, Result, bail};
use ctk::{Consistency, GroupCutId};
use serde_json::Value;
use tracing::info;

use super::export::{self, Prepared};
use super::proto::*;
use crate::disk::ProtectedDisk;
use crate::pipeline;
use crate::server::Agent;

/// Runs a group request (`GroupCut`, `GroupExport`); the answer's JSON.
pub(super) fn handle(agent: &Agent, request: Request) -> Result<Value> {
    Ok(match request {
        Request::GroupCut { group, consistency } => {
            serde_json::to_value(cut(agent, &group, consistency)?)?
        }
        Request::GroupExport {
            group,
            members,
            consistency,
        } => serde_json::to_value(self::export(agent, &group, members, consistency)?)?,
        other => bail!("not a group request: {other:?}"),
    })
}

/// The members of group `name`, in the agent's disk order.
fn members<'a>(agent: &'a Agent, name: &str) -> Result<Vec<&'a ProtectedDisk>> {
    let group = agent.groups.iter().find(|g| g.name == name).with_context(|| {
        let known: Vec<&str> = agent.groups.iter().map(|g| g.name.as_str()).collect();
        if known.is_empty() {
            format!(
                "no group named {name:?}: this agent has no groups (serve --group NAME=DISK,DISK \
                 or [[group]] in its configuration)"
            )
        } else {
            format!("no group named {name:?} (groups: {})", known.join(", "))
        }
    })?;
    Ok(group
        .members
        .iter()
        .map(|&i| agent.disks[i].as_ref())
        .collect())
}

/// The consistency a group's cut gets: what was asked, by default application when any
/// member can quiesce (its hooks and freezes then run for the group).
fn wanted(disks: &[&ProtectedDisk], asked: Option<Consistency>) -> Result<Consistency> {
    let can = disks.iter().any(|d| d.policy.can_quiesce());
    match asked {
        None if !can => Ok(Consistency::Crash),
        None => Ok(Consistency::Application),
        Some(Consistency::Application) if !can => bail!(
            "no disk of the group has a pre_freeze hook or a freeze target, so no cut of it can \
             be application-consistent: configure [disk.cut] for a member, or ask for a \
             crash-consistent cut"
        ),
        Some(c) => Ok(c),
    }
}

fn cut(agent: &Agent, group: &str, asked: Option<Consistency>) -> Result<GroupCutAnswer> {
    let disks = members(agent, group)?;
    let want = wanted(&disks, asked)?;
    let id = GroupCutId::random();
    let reports = pipeline::cut_group(&disks, want, id, |_, _| Ok(Value::Null))?;
    info!(group, group_cut = %id, members = disks.len(), "group cut");
    Ok(GroupCutAnswer {
        group: group.to_owned(),
        group_cut: id,
        consistency: reports[0].consistency,
        hold_ms: reports[0].hold.total.as_secs_f64() * 1000.0,
        members: disks
            .iter()
            .zip(&reports)
            .map(|(d, r)| r.answer(&d.name))
            .collect(),
    })
}

/// Cuts the group and writes each member's delta as its `Export` says, the members'
/// exports running side by side after the release (each member's output may be a FIFO a
/// replication streams). A failure of any member removes every member's file: a group export
/// is whole or absent.
fn export(
    agent: &Agent,
    group: &str,
    specs: Vec<Export>,
    asked: Option<Consistency>,
) -> Result<GroupExportAnswer> {
    let disks = members(agent, group)?;
    let want = wanted(&disks, asked)?;
    if let Some(stranger) = specs.iter().find(|e| {
        !disks
            .iter()
            .any(|d| e.disk.as_deref() == Some(d.name.as_str()))
    }) {
        bail!(
            "the export of {:?} is not one of group {group:?}'s disks ({})",
            stranger.disk.as_deref().unwrap_or(""),
            names(&disks)
        );
    }
    let mut prepared: Vec<Prepared> = Vec::with_capacity(disks.len());
    for d in &disks {
        let mut mine = specs
            .iter()
            .filter(|e| e.disk.as_deref() == Some(d.name.as_str()));
        let (Some(e), None) = (mine.next(), mine.next()) else {
            prepared.iter().for_each(Prepared::abandon);
            bail!(
                "a group export names each of its disks once ({} in group {group:?})",
                d.name
            );
        };
        match export::prepare(d, e) {
            Ok(p) => prepared.push(p),
            Err(err) => {
                prepared.iter().for_each(Prepared::abandon);
                return Err(err.context(format!("disk {:?}", d.name)));
            }
        }
    }
    let cut_unix_ms = ctk::unix_ms_now();
    let id = GroupCutId::random();
    let reports = pipeline::cut_group(&disks, want, id, |i, to| prepared[i].begin(to));
    let reports = reports.inspect_err(|_| prepared.iter().for_each(Prepared::abandon))?;
    let written: Vec<Result<ExportAnswer>> = std::thread::scope(|scope| {
        let running: Vec<_> = prepared
            .iter()
            .zip(&reports)
            .map(|(p, r)| scope.spawn(move || p.write(r, cut_unix_ms, agent.zstd_level)))
            .collect();
        running
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an export panicked")))
            })
            .collect()
    });
    if written.iter().any(|w| w.is_err()) {
        prepared.iter().for_each(Prepared::discard);
        let first = written.into_iter().find_map(|w| w.err());
        return Err(first.expect("one failed").context(format!(
            "group {group:?}: the whole group's export was removed"
        )));
    }
    info!(group, group_cut = %id, "group exported");
    Ok(GroupExportAnswer {
        group: group.to_owned(),
        group_cut: id,
        consistency: reports[0].consistency,
        cut_unix_ms,
        members: written.into_iter().map(|w| w.expect("checked")).collect(),
    })
}

fn names(disks: &[&ProtectedDisk]) -> String {
    disks
        .iter()
        .map(|d| d.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
