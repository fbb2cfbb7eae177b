//! `ctk-agent replicate`: bring a disk's replica on a receiver up to a new cut, once.
//!
//! Ask the receiver for its newest committed point of the disk; export (through the running
//! agent, copy-on-write, point in time) the delta since that point, or a full when there is
//! none; push it over QUIC; and only when the receiver acknowledges the commit, move this
//! agent's cursor for the receiver to the new point, so it stays answerable next time.
//!
//! With each push goes the agent's digest of the whole image as of the cut (`ctk::digest`):
//! the leaves of the receiver's newest point, kept beside the journal as
//! `<journal>.digest-<cursor>`, updated with the exported blocks. The receiver refuses to
//! commit a merged image that differs. The leaves move to the new point only on the commit
//! ack, like the cursor.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

mod group;
mod leaves;
mod stream;

pub use group::GroupSession;
use stream::Limiter;

use anyhow::{Context, Result, bail};
use ctk::digest::LeafFile;
use ctk::push::{self, Action, Note, Outcome, Plan};
use ctk::{ChangeId, Since};
use ctk_net::wire::{Request, Response};
use ctk_net::{Fingerprint, Identity};
use serde_json::{Value, json};

use crate::control::proto;
use crate::control::{Control, ask};

pub struct Replicate {
    pub identity: PathBuf,
    pub receiver: SocketAddr,
    pub pinned: Fingerprint,
    pub cursor: String,
    pub work_dir: PathBuf,
    /// The unit a resync compares (bytes; `ctk::digest::unit_count` says what fits).
    pub resync_unit: u32,
    /// How many QUIC streams a push's delta is spread over (1 to `wire::LANES_MAX`).
    pub streams: u8,
}

/// Default number of streams per push: one stream's flow-control window (quinn's default,
/// 1.25 MB) caps it at that much per round trip, about 12 MB/s at 100 ms.
pub const STREAMS_DEFAULT: u8 = 4;

/// Default resync unit: 64 KiB, the size of the extents a typical guest rewrites.
pub const RESYNC_UNIT_DEFAULT: u32 = 64 << 10;

/// The agent's status of `disk`.
fn disk_status(control: Control, disk: &str) -> Result<proto::DiskStatus> {
    let status: proto::StatusAnswer = ask(control, &proto::Request::Status)?;
    status
        .disks
        .into_iter()
        .find(|d| d.name == disk)
        .with_context(|| format!("the agent does not protect a disk named {disk:?}"))
}

/// Removes what replications of `disk` killed before they could clean up left in the work
/// directory (their FIFO and leaves files name their process, which is gone).
fn remove_stale(work_dir: &Path, disk: &str) {
    let prefix = format!("ctk-replicate-{disk}-");
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Exactly <prefix><pid>.{fifo,leaves,theirs}: another disk whose name starts with
        // this one's never matches.
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|rest| {
                rest.strip_suffix(".fifo")
                    .or_else(|| rest.strip_suffix(".leaves"))
                    .or_else(|| rest.strip_suffix(".theirs"))
            })
            .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only asks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Takes an exclusive lock on `path` (created if need be) without waiting.
fn lock_exclusive(path: &Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on an open descriptor touches no memory.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(file)
}

/// Which kind of cut a push asks the agent for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cut {
    /// The disk's own default: application-consistent when it has hooks or freezes.
    #[default]
    Default,
    /// Crash-consistent: no hooks, no freeze (the frequent cuts of continuous mode).
    Crash,
    /// Application-consistent: the disk's hooks and freezes.
    Application,
}

impl Cut {
    fn consistency(self) -> Option<ctk::Consistency> {
        match self {
            Cut::Default => None,
            Cut::Crash => Some(ctk::Consistency::Crash),
            Cut::Application => Some(ctk::Consistency::Application),
        }
    }
}

/// A replication of one disk: the agent's geometry for it, its lock, and a connection to the
/// receiver that is made when needed and dropped after any failure.
pub struct Session<'a> {
    r: &'a Replicate,
    disk: String,
    control: Control<'a>,
    identity: Identity,
    runtime: tokio::runtime::Runtime,
    geometry: (u64, u32),
    leaf_path: PathBuf,
    limiter: Limiter,
    conn: Option<quinn::Connection>,
    /// Streams per push: `r.streams`, or 1 once a receiver turned multi-stream pushes down.
    streams: u8,
    /// Whether the next push asks the receiver for a resume state: at the start and after a
    /// failed push, not after a commit (a commit drops the receiver's resume state of the
    /// disk, and this session holds the disk's lock). Saves a round trip per cycle; a
    /// question skipped wrongly would only cost a push from the beginning.
    ask_resume: bool,
    /// Whether the disk has quiesce steps (hooks or freezes), as the agent said at the start.
    can_quiesce: bool,
    _lock: std::fs::File,
}

impl<'a> Session<'a> {
    /// Checks that the agent protects `disk` and takes the one lock per disk and cursor.
    /// `control` calls the running agent; `bwlimit` is read before each chunk is sent (bytes
    /// per second, 0 for none), so it can change while a push runs.
    pub fn open(
        r: &'a Replicate,
        disk: &str,
        control: Control<'a>,
        bwlimit: Arc<AtomicU64>,
    ) -> Result<Session<'a>> {
        let identity = Identity::load(&r.identity)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let entry = disk_status(control, disk)?;
        let journal = entry.journal.display().to_string();
        let geometry = (
            entry.size,
            entry
                .block_size
                .context("the agent's status: the disk is shut down")?,
        );
        let leaf_path = PathBuf::from(format!("{journal}.digest-{}", r.cursor));
        // One replication per disk and cursor at a time: two would race on the leaf files
        // and the cursor. The lock goes with the process, however it ends.
        let lock_path = PathBuf::from(format!("{journal}.replicate-{}.lock", r.cursor));
        let lock = lock_exclusive(&lock_path).with_context(|| {
            format!(
                "another `ctk-agent replicate` of disk {disk:?} to cursor {:?} is running ({})",
                r.cursor,
                lock_path.display()
            )
        })?;
        Ok(Session {
            r,
            disk: disk.to_owned(),
            control,
            identity,
            runtime,
            geometry,
            leaf_path,
            limiter: Limiter::new(bwlimit),
            conn: None,
            streams: r.streams,
            ask_resume: true,
            can_quiesce: entry.can_quiesce,
            _lock: lock,
        })
    }

    /// Whether a cut of this disk can be application-consistent (see `CutPolicy`).
    pub fn can_quiesce(&self) -> bool {
        self.can_quiesce
    }

    /// One replication: a new cut of the kind `cut` asks for, pushed and committed. On any
    /// failure the connection is dropped (the next call makes a new one).
    /// With `resync`, the push compares digests with the receiver even when a delta could
    /// be sent (it checks the whole replica against the source and repairs what differs).
    pub fn once(&mut self, cut: Cut, resync: bool) -> Result<Value> {
        let result = self.once_inner(cut, resync).map_err(|e| self.explain(e));
        self.ask_resume = result.is_err();
        if result.is_err()
            && let Some(conn) = self.conn.take()
        {
            conn.close(1u32.into(), b"failed");
        }
        result
    }

    /// One clear sentence for failures whose cause is buried in the TLS and QUIC layers'
    /// text: a receiver that does not know this agent's certificate, or does not answer.
    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        let text = format!("{e:#}");
        if text.contains("reaching the receiver") && text.contains("timed out") {
            let at = self.r.receiver;
            return anyhow::anyhow!(
                "the receiver at {at} did not answer: is `ctk-receiver serve` running there \
                 (listening on that address), and does UDP port {} pass every firewall between? \
                 (QUIC runs over UDP; a TCP check of the port says nothing) ({text})",
                at.port()
            );
        }
        if text.contains("is not on the allow-list") {
            let fp = self.identity.fingerprint();
            return anyhow::anyhow!(
                "the receiver at {} does not allow this agent: its certificate {fp} is not on \
                 the allow-list; on the receiver, add --allow NAME={fp} to `ctk-receiver serve` \
                 (or a line \"NAME {fp}\" to its --agents file)",
                self.r.receiver
            );
        }
        e
    }

    fn connection(&mut self) -> Result<quinn::Connection> {
        if let Some(c) = &self.conn
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let conn = self
            .runtime
            .block_on(ctk_net::connect(
                &self.identity,
                self.r.receiver,
                self.r.pinned,
            ))
            .context("reaching the receiver")?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// A file of this push in the work directory (named after the process, so a later run
    /// can tell a dead one's leftovers).
    fn work_file(&self, suffix: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.r.work_dir)?;
        remove_stale(&self.r.work_dir, &self.disk);
        let name = format!(
            "ctk-replicate-{}-{}.{suffix}",
            self.disk,
            std::process::id()
        );
        Ok(std::path::absolute(self.r.work_dir.join(name))?)
    }

    /// Fetches the receiver's hashes, per resync unit, of its newest point into a work file.
    /// A replica of another size has none that can be used: the file is left empty, so every
    /// unit is sent (a full copy, the last resort, logged as such). Returns the point the
    /// hashes are of (the receiver may have moved on) and the file.
    fn fetch_digests(&self, conn: &quinn::Connection) -> Result<(ChangeId, PathBuf)> {
        let unit = self.r.resync_unit;
        let request = Request::Digests {
            disk: self.disk.clone(),
            unit,
        };
        let (change_id, disk_size, hashes) = self.runtime.block_on(async {
            let (answer, mut recv) = stream::call_then(conn, &request).await?;
            match answer {
                Response::Digests {
                    change_id,
                    disk_size,
                    unit: u,
                    count,
                } => {
                    // The count is checked against the unit's bound before anything is read.
                    let expected = ctk::digest::unit_count(disk_size, u)
                        .map_err(anyhow::Error::msg)
                        .context("the receiver's digests")?;
                    if u != unit || count != expected {
                        bail!(
                            "the receiver sent {count} hashes of {u} bytes for {disk_size} bytes"
                        );
                    }
                    let hashes = ctk_net::read_chunks(&mut recv, expected as usize * 32).await?;
                    Ok::<_, anyhow::Error>((change_id, disk_size, hashes))
                }
                Response::Refused { message, .. } => {
                    bail!("the receiver refused to send its digests: {message}")
                }
                other => bail!("unexpected answer from the receiver: {other:?}"),
            }
        })?;
        let of = change_id;
        let theirs = self.work_file("theirs")?;
        if disk_size == self.geometry.0 {
            std::fs::write(&theirs, &hashes)?;
        } else {
            tracing::warn!(
                disk = %self.disk, replica_bytes = disk_size, disk_bytes = self.geometry.0,
                "the replica is of another size than the disk: sending a full copy, the last resort"
            );
            std::fs::write(&theirs, [])?;
        }
        Ok((of, theirs))
    }

    /// Reads the disk's size again: it may have been resized since the last push.
    fn refresh_geometry(&mut self) -> Result<()> {
        let size = disk_status(self.control, &self.disk)?.size;
        if size != self.geometry.0 {
            tracing::info!(disk = %self.disk, from = self.geometry.0, to = size, "the disk was resized");
            self.geometry.0 = size;
        }
        Ok(())
    }

    /// The receiver's newest committed point of the disk (none before a first full).
    fn ask_newest(&self, conn: &quinn::Connection) -> Result<Option<ChangeId>> {
        let request = Request::Newest {
            disk: self.disk.clone(),
        };
        match self.runtime.block_on(stream::call(conn, &request))? {
            Response::Newest { change_id } => Ok(change_id),
            // The receiver's own words say what happened and where to look.
            Response::Refused {
                refusal: ctk::wire::Refusal::FailedOver,
                message,
            } => bail!("{message}"),
            Response::Refused { message, .. } => bail!("the receiver refused: {message}"),
            other => bail!("unexpected answer from the receiver: {other:?}"),
        }
    }

    /// One push, driven: `ctk::push::Session` decides what to ask and what to send, in which
    /// order, and when the cursor may move; this function only carries the questions to
    /// the receiver (QUIC) and the agent (its control socket) and the delta between them.
    fn once_inner(&mut self, cut: Cut, force_resync: bool) -> Result<Value> {
        self.refresh_geometry()?;
        let conn = self.connection()?;
        let started = std::time::Instant::now();
        // The agent's own default decides a `Default` cut: application when it can quiesce.
        let may_skip = match cut {
            Cut::Crash => true,
            Cut::Application => false,
            Cut::Default => !self.can_quiesce,
        };
        let mut s = push::Session::new(self.geometry.0, self.ask_resume, force_resync, may_skip);
        let mut theirs: Option<PathBuf> = None;
        let mut pushed: Option<stream::Pushed> = None;
        let mut unchanged: Option<proto::UnchangedAnswer> = None;
        loop {
            self.log_notes(s.take_notes());
            let action = s.poll();
            let Some(action) =
                self.answer(&mut s, action, &conn, cut, &mut theirs, &mut unchanged)?
            else {
                continue;
            };
            match action {
                Action::Push(plan) => {
                    let result =
                        stream::push(self, &conn, s.newest(), cut, &plan, theirs.as_deref());
                    // A receiver from before multi-stream pushes does not know the request:
                    // it says so in the refusal (as the answer, or as the reason the stream
                    // was cut). Push again on one stream, the way it knows.
                    let refusal = match &result {
                        Ok(p) => format!("{:?}", p.answer),
                        Err(e) => format!("{e:#}"),
                    };
                    let old_receiver = refusal.contains("UnexpectedVariant")
                        || refusal.contains("unknown Request kind");
                    if self.streams > 1 && old_receiver {
                        tracing::warn!(
                            receiver = %self.r.receiver, streams = self.streams,
                            "the receiver does not know multi-stream pushes (it is older than \
                             this agent): pushing on one stream; upgrade it, or pass --streams 1"
                        );
                        self.streams = 1;
                        let exported = result.as_ref().ok().map(|p| p.exported.to);
                        s.handle_push_lost(refusal, true, exported);
                        continue;
                    }
                    let p = result?;
                    s.handle_pushed(p.exported.to, &p.answer);
                    pushed = Some(p);
                }
                Action::MoveCursor(point) => {
                    let p = pushed.as_mut().context("a cursor move before a push")?;
                    self.committed(point, p, started)?;
                    s.handle_cursor_moved();
                }
                Action::Done(Outcome::Committed { point, already }) => {
                    let p = pushed.context("a commit without a push")?;
                    tracing::info!(disk = %self.disk, point = %point, already,
                        changed_bytes = p.exported.changed_bytes, delta_bytes = p.sent,
                        seconds = started.elapsed().as_secs_f64(), "committed");
                    return Ok(self.report(&s, point, already, &p, started));
                }
                Action::Done(Outcome::InSync { point }) => {
                    let a = unchanged.context("in sync without an answer")?;
                    self.move_cursor(point, a.as_of_unix_ms, None)?;
                    return Ok(self.in_sync(point, &a, s.resume_asked(), started));
                }
                Action::Done(Outcome::Failed(why)) => bail!("{why}"),
                question => bail!("{question:?} was not answered"),
            }
        }
    }

    /// Answers the push session's questions (of the receiver, or of the running agent);
    /// hands back any other action for the caller to carry out.
    fn answer(
        &mut self,
        s: &mut push::Session,
        action: Action,
        conn: &quinn::Connection,
        cut: Cut,
        theirs: &mut Option<PathBuf>,
        unchanged: &mut Option<proto::UnchangedAnswer>,
    ) -> Result<Option<Action>> {
        match action {
            Action::AskNewest => s.handle_newest(self.ask_newest(conn)?),
            Action::AskAnswerable(since) => {
                let request = proto::Request::Answerable {
                    disk: Some(self.disk.clone()),
                    since: Since::Id(since),
                };
                let a: proto::AnswerableAnswer = ask(self.control, &request)?;
                s.handle_answerable(if a.answerable {
                    Ok(())
                } else {
                    Err(a.why.unwrap_or_default())
                });
            }
            Action::AskResume => {
                let request = Request::Resume {
                    disk: self.disk.clone(),
                };
                let state = match self.runtime.block_on(stream::call(conn, &request))? {
                    Response::Resume { state } => state,
                    // A receiver from before resumes: push from the start.
                    Response::Refused { .. } => None,
                    other => bail!("unexpected answer from the receiver: {other:?}"),
                };
                s.handle_resume(state);
            }
            Action::AskUnchanged(since) => {
                let request = proto::Request::Unchanged {
                    disk: Some(self.disk.clone()),
                    since,
                    consistency: cut.consistency(),
                };
                let a: proto::UnchangedAnswer = ask(self.control, &request)?;
                s.handle_unchanged(a.unchanged);
                *unchanged = Some(a);
            }
            // The session checks that the hashes are of the point it asked for.
            Action::FetchDigests(_) => match self.fetch_digests(conn) {
                Ok((of, path)) => {
                    *theirs = Some(path);
                    s.handle_digests(Ok(of));
                }
                Err(e) => s.handle_digests(Err(format!("{e:#}"))),
            },
            other => return Ok(Some(other)),
        }
        Ok(None)
    }

    /// Logs what the push session decided.
    fn log_notes(&self, notes: Vec<Note>) {
        for note in notes {
            match note {
                Note::NotAnswerable { point, why } => tracing::warn!(
                    disk = %self.disk, %point, %why,
                    "this agent cannot name the changes since the receiver's newest point: \
                     comparing digests with the receiver instead of sending everything"
                ),
                Note::ResumeRefused(why) => tracing::warn!(
                    disk = %self.disk, %why,
                    "not resuming: the receiver's resume state does not fit this agent; \
                     sending from the start"
                ),
                Note::Resuming { prior, next_offset } => tracing::info!(
                    disk = %self.disk, %prior, next_offset, "resuming a cut-off push"
                ),
                Note::Again(why) => {
                    tracing::info!(%why, "the receiver moved on meanwhile: trying again")
                }
            }
        }
    }

    /// The receiver committed the pushed cut `point`: only now do the leaves and the cursor
    /// move. Leaves that fail to save only cost the next push its check (it finds them of
    /// another point), so that is a warning, not a failed replication.
    fn committed(
        &self,
        point: ChangeId,
        p: &mut stream::Pushed,
        started: std::time::Instant,
    ) -> Result<()> {
        if let Some(leaves) = p.leaves.as_mut()
            && let Err(e) = LeafFile::save(&self.leaf_path, leaves, point)
        {
            tracing::warn!(error = %e, leaves = %self.leaf_path.display(), "saving the block digests");
        }
        let changed = p.exported.changed_bytes;
        let seconds = started.elapsed().as_secs_f64();
        // The rate only from pushes big enough to say something about the link.
        let rate = (changed >= 1 << 20).then(|| changed as f64 / seconds.max(1e-3));
        self.move_cursor(point, p.exported.cut_unix_ms, rate)
    }

    /// The answer of a committed push, as `replicate --json` prints it.
    fn report(
        &self,
        s: &push::Session,
        point: ChangeId,
        already: bool,
        p: &stream::Pushed,
        started: std::time::Instant,
    ) -> Value {
        let exported = &p.exported;
        json!({
            "disk": self.disk,
            "from": s.newest().map(|n| n.to_string()),
            "committed": point.to_string(),
            "already_committed": already,
            "changed_bytes": exported.changed_bytes,
            "delta_bytes": p.sent,
            "consistency": exported.cut.consistency,
            "cut_unix_ms": exported.cut_unix_ms,
            "hold_ms": exported.cut.hold_ms,
            "image_digest": p.digest.map(|d| d.to_string()),
            "seconds": started.elapsed().as_secs_f64(),
            "committed_unix_ms": ctk::unix_ms_now(),
            "resync": matches!(s.plan(), Some(Plan::Compare { .. })),
            "resume_asked": s.resume_asked(),
            "resumed_at": match s.plan() {
                Some(Plan::Resume { next_offset, .. }) => Some(*next_offset),
                _ => None,
            },
        })
    }

    /// A cycle with nothing to push: the cursor stays at `point`, and has learned that the
    /// replica holds the disk as of the agent's `as_of_unix_ms` (its RPO clock restarts).
    fn in_sync(
        &self,
        point: ChangeId,
        answer: &proto::UnchangedAnswer,
        resume_asked: bool,
        started: std::time::Instant,
    ) -> Value {
        let as_of = answer.as_of_unix_ms;
        json!({
            "disk": self.disk,
            "from": point.to_string(),
            "committed": point.to_string(),
            "unchanged": true,
            "already_committed": true,
            "in_sync_unix_ms": as_of,
            "cut_unix_ms": as_of,
            "changed_bytes": 0,
            "delta_bytes": 0,
            "consistency": "crash",
            "seconds": started.elapsed().as_secs_f64(),
            "resync": false,
            "resume_asked": resume_asked,
            "resumed_at": null,
        })
    }
}

impl Session<'_> {
    /// Moves the replication cursor to `at` (registering it the first time), telling the
    /// agent when that point was cut (or found in sync: the RPO) and the recent rate.
    fn move_cursor(&self, at: ChangeId, cut_unix_ms: u64, rate: Option<f64>) -> Result<()> {
        let request = |op| proto::Request::Cursor {
            disk: Some(self.disk.clone()),
            op,
            name: self.r.cursor.clone(),
            at: Some(at),
            cut_unix_ms: Some(cut_unix_ms),
            rate_bytes_per_s: rate,
        };
        if (self.control)(&request(proto::CursorOp::Advance)).is_err() {
            (self.control)(&request(proto::CursorOp::Register))
                .context("registering the replication cursor")?;
        }
        Ok(())
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.close(0u32.into(), b"done");
        }
    }
}

/// Runs one replication of `disk`. `control` calls the running agent.
pub fn run(r: &Replicate, disk: &str, control: Control) -> Result<Value> {
    Session::open(r, disk, control, Arc::new(AtomicU64::new(0)))?.once(Cut::Default, false)
}
