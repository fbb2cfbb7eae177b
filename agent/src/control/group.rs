//! The consistency group requests: `group_cut` (every member cut at one instant) and
//! `group_export` (the same, each member's delta written while writes go on).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ctk::{Consistency, GroupCutId, Since};
use serde_json::Value;
use tracing::info;

use super::proto::*;
use crate::disk::{ExportPlan, ProtectedDisk};
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
            dir,
            since,
            consistency,
        } => serde_json::to_value(export(agent, &group, &dir, since, consistency)?)?,
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

/// Cuts the group and writes each member's delta since its `since` (`all` when left out)
/// into `dir/<disk>.ctkd`, the members' exports running side by side after the release.
/// A failure of any member removes every member's file: a group export is whole or absent.
fn export(
    agent: &Agent,
    group: &str,
    dir: &Path,
    mut since: BTreeMap<String, Since>,
    asked: Option<Consistency>,
) -> Result<GroupExportAnswer> {
    let disks = members(agent, group)?;
    let want = wanted(&disks, asked)?;
    if !dir.is_absolute() {
        bail!(
            "export directory {dir:?} must be absolute (the daemon's working directory is not yours)"
        );
    }
    let mut plans = Vec::with_capacity(disks.len());
    let mut paths: Vec<PathBuf> = Vec::with_capacity(disks.len());
    for d in &disks {
        let s = since.remove(&d.name).unwrap_or(Since::All);
        // Refused before cutting, so a bad `since` leaves no cut behind.
        d.changed(s, None)?;
        plans.push(ExportPlan::Changed(s));
        paths.push(dir.join(format!("{}.ctkd", d.name)));
    }
    if let Some(name) = since.keys().next() {
        bail!("\"since\" names {name:?}, which is not a disk of group {group:?}");
    }
    let remove_all = || {
        for p in &paths {
            let _ = std::fs::remove_file(p);
        }
    };
    for p in &paths {
        std::fs::File::create(p)
            .with_context(|| format!("cannot create the export file {}", p.display()))
            .inspect_err(|_| remove_all())?;
    }
    for d in &disks {
        d.wait_export_idle(super::handle::EXPORT_WAIT)
            .inspect_err(|_| remove_all())?;
    }
    let cut_unix_ms = ctk::unix_ms_now();
    let id = GroupCutId::random();
    let mut began = vec![false; disks.len()];
    let mut sizes = vec![0; disks.len()];
    let reports = pipeline::cut_group(&disks, want, id, |i, to| {
        disks[i].begin_snapshot(&plans[i], to)?;
        began[i] = true;
        sizes[i] = disks[i].size();
        Ok(Value::Null)
    });
    let reports = reports.inspect_err(|_| {
        for (d, began) in disks.iter().zip(&began) {
            if *began {
                d.abort_snapshot();
            }
        }
        remove_all();
    })?;
    let exported: Vec<_> = std::thread::scope(|scope| {
        let running: Vec<_> = (0..disks.len())
            .map(|i| {
                let (d, plan, path, to) = (disks[i], &plans[i], &paths[i], reports[i].change_id);
                scope.spawn(move || d.export_snapshot(plan, to, path, None, agent.zstd_level))
            })
            .collect();
        running.into_iter().map(|t| t.join()).collect()
    });
    let mut members = Vec::with_capacity(disks.len());
    for (i, result) in exported.into_iter().enumerate() {
        let (d, report) = (disks[i], &reports[i]);
        let exported = match result {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                remove_all();
                return Err(anyhow::Error::new(e).context(format!(
                    "the export of disk {:?} failed, so the group's export was removed",
                    d.name
                )));
            }
            Err(_) => {
                remove_all();
                bail!("the export of disk {:?} panicked", d.name);
            }
        };
        members.push(super::handle::export_answer(
            d,
            report,
            &paths[i],
            cut_unix_ms,
            sizes[i],
            exported,
        ));
    }
    info!(group, group_cut = %id, "group exported");
    Ok(GroupExportAnswer {
        group: group.to_owned(),
        group_cut: id,
        consistency: reports[0].consistency,
        cut_unix_ms,
        members,
    })
}
