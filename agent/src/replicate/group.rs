//! `replicate --group`: one cut of every member of a consistency group, each member's delta
//! pushed as any push is (its own push session, connection and lanes, the members side by
//! side), and once the receiver has committed every member's point, the group point
//! (`GroupCommit`), which is what makes them one.
//!
//! Each member's cursor moves when its own point is committed, as for any push: the next
//! push of that disk is since it, whether or not the group point was recorded. A group push
//! cut off after some members committed leaves them as ordinary points of their disks and no
//! group point; the next group push records one for its own cut.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use ctk::ChangeId;
use ctk::push::{self, Action, Outcome, Plan};
use ctk_net::wire::{Request, Response};
use serde_json::{Value, json};

use super::stream::{self, PushFiles};
use super::{Cut, Replicate, Session};
use crate::control::proto::{self, ExportAnswer};
use crate::control::{Control, ask};

/// A replication of a consistency group: one `Session` per member, in the agent's order.
pub struct GroupSession<'a> {
    group: String,
    control: Control<'a>,
    members: Vec<Session<'a>>,
}

/// One member, ready for the group's export: its push session and plan, its connection,
/// its work files and the export it asks for.
struct Ready {
    machine: push::Session,
    plan: Plan,
    conn: quinn::Connection,
    files: PushFiles,
    spec: proto::Export,
}

/// How many times a group cycle starts over when a member's replica moved on under it.
const MOVED_ON_RETRIES: usize = 2;

/// A member's push was refused because the receiver's newest point of the disk is not the
/// one its delta starts from any more.
#[derive(Debug, thiserror::Error)]
#[error("the receiver's newest point moved on meanwhile: {0}")]
struct MovedOn(String);

/// What a member's push ended with.
struct Done {
    point: ChangeId,
    report: Value,
}

impl<'a> GroupSession<'a> {
    /// Opens a session for every member of `group` (as the running agent names them), each
    /// with its lock per disk and cursor. `bwlimit` paces each member's push (bytes per second, 0 for none): a group's pushes
    /// run side by side, so together they may send that much times the members.
    pub fn open(
        r: &'a Replicate,
        group: &str,
        control: Control<'a>,
        bwlimit: Arc<AtomicU64>,
    ) -> Result<GroupSession<'a>> {
        let status: proto::StatusAnswer = ask(control, &proto::Request::Status)?;
        let disks = status
            .groups
            .into_iter()
            .find(|g| g.name == group)
            .map(|g| g.disks)
            .with_context(|| {
                format!(
                    "the agent has no group named {group:?} (serve --group NAME=DISK,... or \
                     [[group]] in its configuration)"
                )
            })?;
        let members = disks
            .iter()
            .map(|d| Session::open(r, d, control, bwlimit.clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(GroupSession {
            group: group.to_owned(),
            control,
            members,
        })
    }

    /// Whether a cut of the group can be application-consistent: some member has hooks or
    /// freezes (they run for the whole group).
    pub fn can_quiesce(&self) -> bool {
        self.members.iter().any(|s| s.can_quiesce())
    }

    /// One group replication: a group cut of the kind `cut` asks for, every member pushed
    /// and committed, then the group point. On any failure every connection is dropped.
    pub fn once(&mut self, cut: Cut) -> Result<Value> {
        let mut result = self.once_inner(cut);
        for _ in 0..MOVED_ON_RETRIES {
            match &result {
                Err(e) if e.chain().any(|c| c.is::<MovedOn>()) => {
                    tracing::info!(group = %self.group, error = %format!("{e:#}"),
                        "a member's replica moved on meanwhile: the group cut is taken again");
                    result = self.once_inner(cut);
                }
                _ => break,
            }
        }
        if result.is_err() {
            for s in &mut self.members {
                if let Some(conn) = s.conn.take() {
                    conn.close(1u32.into(), b"failed");
                }
            }
        }
        result
    }

    fn once_inner(&mut self, cut: Cut) -> Result<Value> {
        let started = Instant::now();
        let mut ready = Vec::with_capacity(self.members.len());
        for s in &mut self.members {
            ready.push(prepare(s, cut).with_context(|| format!("disk {:?}", s.disk))?);
        }
        let specs: Vec<proto::Export> = ready.iter().map(|r| r.spec.clone()).collect();
        let request = proto::Request::GroupExport {
            group: self.group.clone(),
            members: specs,
            consistency: cut.consistency(),
        };
        let control = self.control;
        let names: Vec<String> = self.members.iter().map(|s| s.disk.clone()).collect();
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..ready.len())
            .map(|_| std::sync::mpsc::channel::<Result<ExportAnswer, String>>())
            .unzip();
        let (exported, pushed) = std::thread::scope(|scope| {
            // The group's one export; each member's push waits for its part of the answer.
            let exporter = scope.spawn(move || {
                let answer = ask::<proto::GroupExportAnswer>(control, &request);
                for (name, tx) in names.iter().zip(&senders) {
                    let part = match &answer {
                        Ok(a) => a
                            .members
                            .iter()
                            .find(|m| m.cut.disk == *name)
                            .cloned()
                            .ok_or_else(|| format!("the group's export has no {name:?}")),
                        Err(e) => Err(format!("the group's export failed: {e:#}")),
                    };
                    let _ = tx.send(part);
                }
                answer
            });
            let pushes: Vec<_> = self
                .members
                .iter_mut()
                .zip(ready)
                .zip(receivers)
                .map(|((s, r), rx)| {
                    scope.spawn(move || {
                        let disk = s.disk.clone();
                        push_member(s, r, rx, started)
                            .with_context(|| format!("pushing {disk:?} for the group"))
                    })
                })
                .collect();
            let exported = exporter.join();
            let pushed: Vec<_> = pushes.into_iter().map(|p| p.join()).collect();
            (exported, pushed)
        });
        let exported = exported
            .map_err(|_| anyhow::anyhow!("the group export panicked"))?
            .context("exporting the group")?;
        let mut done = Vec::with_capacity(pushed.len());
        for p in pushed {
            done.push(p.map_err(|_| anyhow::anyhow!("a member's push panicked"))??);
        }
        let members: Vec<(String, ChangeId)> = self
            .members
            .iter()
            .zip(&done)
            .map(|(s, d)| (s.disk.clone(), d.point))
            .collect();
        let already = self.commit_group(&exported, members)?;
        tracing::info!(group = %self.group, group_cut = %exported.group_cut, already,
            seconds = started.elapsed().as_secs_f64(), "group point committed");
        Ok(json!({
            "group": self.group,
            "group_cut": exported.group_cut,
            "consistency": exported.consistency,
            "cut_unix_ms": exported.cut_unix_ms,
            "already_committed": already,
            "members": done.into_iter().map(|d| d.report).collect::<Vec<_>>(),
            "seconds": started.elapsed().as_secs_f64(),
            "committed_unix_ms": ctk::unix_ms_now(),
        }))
    }

    /// Asks the receiver to record the group point; `already` if it had.
    fn commit_group(
        &mut self,
        exported: &proto::GroupExportAnswer,
        members: Vec<(String, ChangeId)>,
    ) -> Result<bool> {
        let request = Request::GroupCommit {
            group: self.group.clone(),
            group_cut: exported.group_cut,
            cut_unix_ms: exported.cut_unix_ms,
            consistency: exported.consistency,
            members,
        };
        let s = &mut self.members[0];
        let conn = s.connection()?;
        match s.runtime.block_on(stream::call(&conn, &request))? {
            Response::GroupCommitted { already } => Ok(already),
            Response::Refused { message, .. } => {
                bail!("the receiver refused the group point: {message}")
            }
            other => bail!("unexpected answer from the receiver: {other:?}"),
        }
    }
}

/// Drives a member's push session to its push: the receiver's newest point, whether this
/// agent can name the changes since it (else the receiver's digests, for a resync). Never a
/// resume (a group cut is new) and never skipped (every member is cut with the group).
fn prepare(s: &mut Session, cut: Cut) -> Result<Ready> {
    s.refresh_geometry()?;
    let conn = s.connection()?;
    let mut machine = push::Session::new(s.geometry.0, false, false, false);
    let (mut theirs, mut unchanged): (Option<PathBuf>, _) = (None, None);
    let plan = loop {
        s.log_notes(machine.take_notes());
        let action = machine.poll();
        match s.answer(
            &mut machine,
            action,
            &conn,
            cut,
            &mut theirs,
            &mut unchanged,
        )? {
            None => continue,
            Some(Action::Push(plan)) => break plan,
            Some(Action::Done(Outcome::Failed(why))) => bail!("{why}"),
            Some(other) => bail!("{other:?} before the group's push"),
        }
    };
    let files = PushFiles::new(s, theirs.as_deref())?;
    let spec = stream::export_request(
        s,
        machine.newest(),
        cut,
        &plan,
        theirs.as_deref(),
        &files.fifo,
        &files.pairs,
    );
    Ok(Ready {
        machine,
        plan,
        conn,
        files,
        spec,
    })
}

/// A member's push: its FIFO streamed while the group's export writes it, the end frame,
/// the commit, then its cursor and leaves moved as for any push.
fn push_member(
    s: &mut Session,
    r: Ready,
    exported: std::sync::mpsc::Receiver<Result<ExportAnswer, String>>,
    started: Instant,
) -> Result<Done> {
    let Ready {
        mut machine,
        plan,
        conn,
        files,
        ..
    } = r;
    let newest = machine.newest();
    let mut p = stream::stream_export(s, &conn, newest, &plan, &files, move || {
        match exported.recv() {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(why)) => bail!("{why}"),
            Err(_) => bail!("the group's export ended without an answer"),
        }
    })?;
    machine.handle_pushed(p.exported.to, &p.answer);
    loop {
        match machine.poll() {
            Action::MoveCursor(point) => {
                s.committed(point, &mut p, started)?;
                machine.handle_cursor_moved();
            }
            Action::Done(Outcome::Committed { point, already }) => {
                let report = s.report(&machine, point, already, &p, started);
                return Ok(Done { point, report });
            }
            Action::Done(Outcome::Failed(why)) => bail!("{why}"),
            // A push the receiver did not commit as this cut: the group's cut is lost for
            // this member; the next group push starts over.
            // The receiver's newest point moved on while the member's delta was made (a
            // merge a restart left was finished meanwhile): this group cut cannot be
            // committed for it; the group's cycle starts over with a new cut.
            Action::AskNewest => {
                return Err(anyhow::Error::new(MovedOn(format!("{:?}", p.answer))));
            }
            other => bail!(
                "the receiver did not commit the member's push ({:?}; then {other:?})",
                p.answer
            ),
        }
    }
}
