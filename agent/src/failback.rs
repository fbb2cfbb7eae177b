//! `ctk-agent failback`: the original disk brought equal to the DR disk, pass by pass, then
//! the cutover that makes the receiver commit the DR disk as this disk's cut, so that
//! replication resumes with an increment.
//!
//! A pass asks the receiver for what the DR disk holds that this disk may not
//! (`Request::FailbackPull`) and has the running agent write it through its tracker
//! (`control` `failback apply`), fenced against every other writer. The first pass names
//! this disk's own changes since the receiver's newest point (its replica cursor's
//! changes), or, when it cannot (journal lost, a new disk), hashes every unit of the disk
//! so the receiver sends only the units that differ; later passes take only what the DR
//! disk's overlay wrote since the previous pass's cut. The final pass stops the DR export
//! first, so nothing changes after it; then this disk is cut, the receiver commits the DR
//! disk as that cut, and the image digests of both are compared before the replica cursor
//! moves to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ctk::digest::{LeafFile, Leaves};
use ctk::wire::{Known, Request, Response};
use ctk::{ChangeId, Consistency, Since};
use ctk_net::{Fingerprint, Identity};
use serde_json::{Value, json};

use crate::control::proto::{self, Committing, FailbackAnswer, FailbackOp, FailbackState};
use crate::control::{Control, ask};

pub struct Failback {
    pub identity: PathBuf,
    pub receiver: SocketAddr,
    pub pinned: Fingerprint,
    /// The replication cursor: its point is the receiver's newest, and it moves to the
    /// cutover's point.
    pub cursor: String,
    /// The unit hashed when this disk cannot name its changes.
    pub unit: u32,
    /// The agent's control socket: a pass's delta streams through it into the agent.
    pub control: PathBuf,
    /// Compare unit hashes on the first pass even when this disk can name its changes.
    pub compare: bool,
}

/// One failback of one disk, with its connection to the receiver.
pub struct Session<'a> {
    f: &'a Failback,
    disk: String,
    control: Control<'a>,
    identity: Identity,
    runtime: tokio::runtime::Runtime,
    conn: Option<quinn::Connection>,
    status: proto::DiskStatus,
    /// When this run began: a cutover's downtime is counted from it.
    started: Instant,
}

impl<'a> Session<'a> {
    /// Fences the disk on the agent (its NBD writes are refused from here to the cutover)
    /// and reads where a failback stands.
    pub fn open(f: &'a Failback, disk: &str, control: Control<'a>) -> Result<Session<'a>> {
        let identity = Identity::load(&f.identity)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let status: proto::StatusAnswer = ask(control, &proto::Request::Status)?;
        let status = status
            .disks
            .into_iter()
            .find(|d| d.name == disk)
            .with_context(|| format!("the agent does not protect a disk named {disk:?}"))?;
        let s = Session {
            f,
            disk: disk.to_owned(),
            control,
            identity,
            runtime,
            conn: None,
            status,
            started: Instant::now(),
        };
        s.step(FailbackOp::Begin)?;
        Ok(s)
    }

    fn step(&self, op: FailbackOp) -> Result<Option<FailbackState>> {
        let answer: FailbackAnswer = ask(
            self.control,
            &proto::Request::Failback {
                disk: Some(self.disk.clone()),
                op,
            },
        )?;
        Ok(answer.state)
    }

    /// Where the failback stands, read from the agent's status (a read: `Begin` would
    /// rewrite and sync the state file each time).
    fn state(&self) -> Result<FailbackState> {
        let status: proto::StatusAnswer = ask(self.control, &proto::Request::Status)?;
        status
            .disks
            .into_iter()
            .find(|d| d.name == self.disk)
            .and_then(|d| d.failback)
            .context("the agent lost the failback's state (its <journal>.failback is gone)")
    }

    fn connection(&mut self) -> Result<quinn::Connection> {
        if let Some(c) = self.conn.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let conn = self
            .runtime
            .block_on(ctk_net::connect(
                &self.identity,
                self.f.receiver,
                self.f.pinned,
            ))
            .with_context(|| format!("reaching the receiver at {}", self.f.receiver))?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// One pass (the last one when `last`): pulled, applied, recorded. Its report.
    pub fn pass(&mut self, last: bool) -> Result<Value> {
        let started = Instant::now();
        let state = self.state()?;
        let since = state.applied_upto;
        let (known, body, cursor_at) = match since {
            Some(_) => (Known::Extents { count: 0 }, Vec::new(), None),
            None => self.known()?,
        };
        let mut pulled = self.pull(since, known, &body, last)?;
        if let Response::Refused { refusal, message } = &pulled.0 {
            if *refusal == ctk::wire::Refusal::NotFailedOver
                && state.passes == 0
                && state.committing.is_none()
            {
                // Nothing to fail back (never failed over, or failed back already): the
                // fence this run set goes again.
                self.step(FailbackOp::End)?;
                return Ok(json!({"disk": self.disk, "not_failed_over": true, "message": message}));
            }
            if *refusal == ctk::wire::Refusal::NotFailedOver {
                bail!(
                    "the receiver says {} is not failed over any more (rolled back at the DR \
                     site?) while this disk holds part of a failback ({} passes applied): it \
                     stays fenced. If the DR site's writes were meant to be thrown away, this \
                     disk is not the original any more either: restore it from the receiver \
                     (ctk-receiver restore) before replicating again",
                    self.disk,
                    state.passes
                );
            }
            bail!("the receiver refused the pass: {message}");
        }
        if let (Some(at), Response::FailbackPass { newest, .. }) = (cursor_at, &pulled.0)
            && *newest != at
        {
            // This disk's changes were named since another point than the receiver's newest
            // (a push it committed whose answer was lost): compare hashes instead.
            tracing::warn!(disk = %self.disk, cursor = %at, newest = %newest,
                "the replica cursor is not at the receiver's newest point: comparing digests");
            drop(pulled);
            let (known, body) = self.hashes()?;
            pulled = self.pull(since, known, &body, last)?;
        }
        let (answer, recv) = pulled;
        let (
            Response::FailbackPass {
                point,
                upto,
                blocks,
                disk_size,
                ..
            },
            Some(recv),
        ) = (&answer, recv)
        else {
            bail!("unexpected answer from the receiver: {answer:?}");
        };
        let (point, upto) = (*point, *upto);
        let request = proto::Request::Failback {
            disk: Some(self.disk.clone()),
            op: FailbackOp::Apply { point, upto },
        };
        // A delta bigger than twice the disk is not a pass (each block once, compressed or
        // raw with a record head per extent).
        let limit = disk_size.saturating_mul(2).saturating_add(1 << 20);
        let (applied, bytes) = self
            .runtime
            .block_on(feed(&self.f.control, &request, recv, limit))
            .context("applying the pass")?;
        let applied: FailbackAnswer = serde_json::from_value(applied)
            .context("the agent's answer is not what this version expects")?;
        let applied = applied
            .state
            .context("the agent lost the failback's state")?;
        Ok(json!({
            "disk": self.disk,
            "final": last,
            "point": point.to_string(),
            "upto": upto.to_string(),
            "first": since.is_none(),
            "blocks": blocks,
            "changed_bytes": blocks * 4096,
            "delta_bytes": bytes,
            "passes": applied.passes,
            "seconds": started.elapsed().as_secs_f64(),
        }))
    }

    /// What this disk knows for the first pass: its changes since its replica cursor (cut
    /// now, so they are sealed), or every unit's hash. With the cursor's point.
    fn known(&self) -> Result<(Known, Vec<u8>, Option<ChangeId>)> {
        let at = self
            .status
            .cursors
            .iter()
            .flatten()
            .find(|c| c.name == self.f.cursor)
            .map(|c| c.at)
            .filter(|_| !self.f.compare);
        if let Some(at) = at {
            let cut = self.cut_now()?;
            let changed = ask::<proto::ChangedAnswer>(
                self.control,
                &proto::Request::Changed {
                    disk: Some(self.disk.clone()),
                    since: Since::Id(at),
                    to: Some(cut.change_id),
                },
            );
            match changed {
                Ok(c) if c.extents.len() as u64 <= ctk::wire::KNOWN_EXTENTS_MAX => {
                    let mut body = Vec::with_capacity(c.extents.len() * 16);
                    for (offset, length) in &c.extents {
                        body.extend_from_slice(&offset.to_le_bytes());
                        body.extend_from_slice(&length.to_le_bytes());
                    }
                    tracing::info!(disk = %self.disk, since = %at, changed_bytes = c.changed_bytes,
                        "this disk's writes since the receiver's newest point are known");
                    let count = c.extents.len() as u64;
                    return Ok((Known::Extents { count }, body, Some(at)));
                }
                Ok(_) => tracing::warn!(disk = %self.disk, "too many changed extents to name"),
                Err(e) => tracing::warn!(disk = %self.disk, error = %format!("{e:#}"),
                    "this disk cannot name its changes since its replica cursor"),
            }
        }
        let (known, body) = self.hashes()?;
        Ok((known, body, None))
    }

    /// A crash-consistent cut of this disk now (its only writer is failback).
    fn cut_now(&self) -> Result<proto::CutAnswer> {
        ask(
            self.control,
            &proto::Request::Cut {
                disk: Some(self.disk.clone()),
                consistency: Some(Consistency::Crash),
            },
        )
    }

    /// Every unit of this disk hashed: the receiver sends the units that differ.
    fn hashes(&self) -> Result<(Known, Vec<u8>)> {
        use std::os::unix::fs::FileExt;
        tracing::info!(disk = %self.disk, unit = self.f.unit,
            "comparing digests: hashing every unit of this disk");
        let file = std::fs::File::open(&self.status.path)
            .with_context(|| format!("reading {}", self.status.path.display()))?;
        let size = self.status.size;
        let unit = u64::from(self.f.unit);
        let count = ctk::digest::unit_count(size, self.f.unit).map_err(anyhow::Error::msg)?;
        let mut body = Vec::with_capacity(count as usize * 32);
        let mut buf = vec![0u8; unit as usize];
        let mut at = 0;
        while at < size {
            let n = (size - at).min(unit) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            body.extend_from_slice(&ctk::digest::unit_hash(&buf[..n]));
            at += n as u64;
        }
        Ok((
            Known::UnitHashes {
                unit: self.f.unit,
                count,
            },
            body,
        ))
    }

    /// Sends a pull with `body` after it; the answer, and for a pass the stream its delta
    /// comes on.
    fn pull(
        &mut self,
        since: Option<ChangeId>,
        known: Known,
        body: &[u8],
        last: bool,
    ) -> Result<(Response, Option<quinn::RecvStream>)> {
        let conn = self.connection()?;
        let request = Request::FailbackPull {
            disk: self.disk.clone(),
            since,
            known,
            final_pass: last,
        };
        self.runtime.block_on(pull(&conn, &request, body))
    }

    /// The cutover after a final pass: this disk cut, the DR disk committed as that cut,
    /// digests compared, the cursor moved, the fence lifted. Its report.
    pub fn cutover(&mut self) -> Result<Value> {
        let state = self.state()?;
        let commit = match state.committing {
            Some(c) => c,
            None => {
                let upto = state
                    .applied_upto
                    .context("no final pass was applied: run the final pass first")?;
                let cut = self.cut_now()?;
                let c = Committing {
                    point: cut.change_id,
                    upto,
                    cut_unix_ms: ctk::unix_ms_now(),
                };
                self.step(FailbackOp::Committing(c))?;
                c
            }
        };
        let started = Instant::now();
        let conn = self.connection()?;
        let request = Request::FailbackCommit {
            disk: self.disk.clone(),
            upto: commit.upto,
            point: commit.point,
            cut_unix_ms: commit.cut_unix_ms,
        };
        let answer = self.runtime.block_on(async {
            let (mut send, mut recv) = conn.open_bi().await?;
            ctk_net::write_frame(&mut send, &request.encode()).await?;
            send.finish()?;
            let frame = ctk_net::read_frame(&mut recv).await?;
            Ok::<_, anyhow::Error>(Response::decode(&frame)?)
        })?;
        let (digest, already) = match answer {
            Response::FailbackCommitted {
                image_digest,
                already,
                ..
            } => (image_digest, already),
            Response::Refused {
                refusal: ctk::wire::Refusal::Mismatch,
                message,
            } => {
                // The DR disk is not as of the final pass any more (its overlay has a cut
                // after it): the cutover starts over, and the next run makes a final pass.
                self.step(FailbackOp::Recut)?;
                bail!("the receiver refused the cutover, run it again: {message}")
            }
            Response::Refused { message, .. } => {
                bail!("the receiver refused the cutover: {message}")
            }
            other => bail!("unexpected answer from the receiver: {other:?}"),
        };
        let commit_seconds = started.elapsed().as_secs_f64();
        let downtime_seconds = self.started.elapsed().as_secs_f64();
        let checked = self.check_and_move(commit, digest)?;
        self.step(FailbackOp::End)?;
        Ok(json!({
            "disk": self.disk,
            "committed": commit.point.to_string(),
            "already_committed": already,
            "commit_seconds": commit_seconds,
            // From the start of this run (the DR export stopped early in it) to the commit.
            "downtime_seconds": downtime_seconds,
            "digest_checked": checked,
        }))
    }

    /// Compares this disk's image digest with the committed point's, then saves the leaves
    /// and moves the replica cursor to the point, so the next push is an increment checked
    /// end to end. A mismatch stops here, fenced: the disk is not what the receiver holds.
    fn check_and_move(&self, commit: Committing, digest: Option<[u8; 32]>) -> Result<bool> {
        let block = self
            .status
            .block_size
            .context("the agent's status: the disk is shut down")?;
        let file = std::fs::File::open(&self.status.path)?;
        let mut leaves = Leaves::of_image(&file, self.status.size, block)?;
        let ours = leaves.digest();
        let checked = match digest {
            Some(theirs) if theirs != ours.0 => bail!(
                "after the cutover this disk's digest ({ours}) is not the committed point's \
                 ({}): the disk stays fenced and the replica cursor unmoved. The point is the DR \
                 disk: write it onto this disk (`ctk-receiver restore --point {}` on the \
                 receiver, copied here), then remove {}.failback and restart the agent",
                ctk::digest::ImageDigest(theirs),
                commit.point,
                self.status.journal.display()
            ),
            Some(_) => true,
            None => false,
        };
        let leaf_path = PathBuf::from(format!(
            "{}.digest-{}",
            self.status.journal.display(),
            self.f.cursor
        ));
        if let Err(e) = LeafFile::save(&leaf_path, &mut leaves, commit.point) {
            tracing::warn!(error = %e, "saving the block digests");
        }
        move_cursor(self.control, &self.disk, &self.f.cursor, commit)?;
        Ok(checked)
    }
}

/// Moves (or registers) the replica cursor to the cutover's point.
fn move_cursor(control: Control, disk: &str, name: &str, commit: Committing) -> Result<()> {
    let request = |op| proto::Request::Cursor {
        disk: Some(disk.to_owned()),
        op,
        name: name.to_owned(),
        at: Some(commit.point),
        cut_unix_ms: Some(commit.cut_unix_ms),
        rate_bytes_per_s: None,
    };
    if control(&request(proto::CursorOp::Advance)).is_err() {
        control(&request(proto::CursorOp::Register)).context("registering the replica cursor")?;
    }
    Ok(())
}

/// A pull on a stream of its own: the request, what the agent knows as chunks, then the
/// answer, and for a pass the stream its delta's chunks follow on.
async fn pull(
    conn: &quinn::Connection,
    request: &Request,
    body: &[u8],
) -> Result<(Response, Option<quinn::RecvStream>)> {
    let (mut send, mut recv) = conn.open_bi().await?;
    ctk_net::write_frame(&mut send, &request.encode()).await?;
    for piece in body.chunks(ctk::wire::CHUNK_MAX) {
        ctk_net::write_chunk(&mut send, ctk_net::Bytes::copy_from_slice(piece)).await?;
    }
    ctk_net::end_chunks(&mut send).await?;
    send.finish()?;
    let frame = ctk_net::read_frame(&mut recv).await?;
    match Response::decode(&frame)? {
        answer @ Response::FailbackPass { .. } => Ok((answer, Some(recv))),
        // Said as it is: the caller decides what a refusal means.
        answer @ Response::Refused { .. } => Ok((answer, None)),
        other => bail!("unexpected answer from the receiver: {other:?}"),
    }
}

/// Streams a pass's delta from `recv` into the agent at `socket`, which applies it as it
/// arrives: the `request` line, the delta's bytes (at most `limit`), the end of what this
/// side writes, then the agent's answer. A delta the receiver cuts short reaches the agent
/// cut short, which it refuses (records written, the pass not recorded). The answer and the
/// delta's length.
async fn feed(
    socket: &Path,
    request: &proto::Request,
    mut recv: quinn::RecvStream,
    limit: u64,
) -> Result<(Value, u64)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to the agent at {}", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let streamed = async {
        let mut got = 0u64;
        loop {
            let mut len = [0u8; 4];
            recv.read_exact(&mut len).await?;
            let len = u32::from_le_bytes(len) as usize;
            if len == 0 {
                return Ok(got);
            }
            if len > ctk::wire::CHUNK_MAX || got + len as u64 > limit {
                bail!("the receiver sent a chunk of {len} bytes after {got} (at most {limit})");
            }
            let mut buf = vec![0u8; len];
            recv.read_exact(&mut buf).await?;
            // Fails when the agent stopped reading: its answer says why.
            write.write_all(&buf).await?;
            got += len as u64;
        }
    }
    .await;
    let _ = write.shutdown().await;
    let mut answer = String::new();
    tokio::io::BufReader::new(read)
        .read_line(&mut answer)
        .await
        .context("reading the agent's answer")?;
    let answer = crate::control::client::answer_of(&answer, socket);
    match (streamed, answer) {
        (Ok(bytes), Ok(answer)) => Ok((answer, bytes)),
        (Err(e), Ok(_)) => Err(e.context("the pass's delta was cut short")),
        (Err(cut), Err(e)) => Err(e.context(format!("the pass's delta: {cut:#}"))),
        (Ok(_), Err(e)) => Err(e),
    }
}

/// Runs passes, one per `every` until `stop` says so (none: one pass), or, when
/// `cutover`, the final pass and the cutover. Each report goes to `report`.
pub fn run(
    s: &mut Session,
    every: Option<Duration>,
    cutover: bool,
    stop: &dyn Fn() -> bool,
    report: &mut dyn FnMut(&Value),
) -> Result<()> {
    if cutover || s.state()?.committing.is_some() {
        // A cutover under way is finished first (the receiver may have committed already).
        // One the receiver refuses as stale starts over once, with a new final pass.
        let mut retried = false;
        loop {
            if s.state()?.committing.is_none() {
                let pass = s.pass(true)?;
                report(&pass);
                if pass["not_failed_over"] == true {
                    return Ok(());
                }
            }
            match s.cutover() {
                Ok(done) => {
                    report(&done);
                    return Ok(());
                }
                Err(e) if !retried && s.state()?.committing.is_none() => {
                    tracing::warn!(error = %format!("{e:#}"), "the cutover starts over");
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }
    loop {
        let pass = s.pass(false)?;
        report(&pass);
        if pass["not_failed_over"] == true {
            return Ok(());
        }
        let Some(every) = every else { return Ok(()) };
        let until = Instant::now() + every;
        while Instant::now() < until {
            if stop() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100).min(every));
        }
    }
}
