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

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ctk::digest::{LeafFile, Leaves};
use ctk::push::AfterPush;
use ctk::{ChangeId, Since};
use ctk_net::wire::{PushEnd, Refusal, Request, Response};
use ctk_net::{Fingerprint, Identity};
use serde_json::{Value, json};

use crate::control::proto::{self, ExportAnswer, ExportSince};
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

/// What a push sends.
enum Plan {
    /// The changes since the receiver's newest point (or a full when it has none).
    Since,
    /// A resync: the units whose hash differs from the receiver's (in `theirs`).
    Compare { theirs: PathBuf },
    /// The rest of a cut-off push of cut `prior` of which the receiver holds every record
    /// below `next_offset`.
    Resume { prior: String, next_offset: u64 },
}

/// Sends one request and reads the answer.
async fn call(conn: &quinn::Connection, request: &Request) -> Result<Response> {
    Ok(call_then(conn, request).await?.0)
}

/// Sends one request and reads the answer frame, returning the stream for what follows it
/// (the hashes after a `Digests` answer).
async fn call_then(
    conn: &quinn::Connection,
    request: &Request,
) -> Result<(Response, quinn::RecvStream)> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| closed(conn, e.into()))?;
    ctk_net::write_frame(&mut send, &request.encode()).await?;
    send.finish()?;
    let frame = ctk_net::read_frame(&mut recv)
        .await
        .map_err(|e| closed(conn, e.into()))?;
    Ok((Response::decode(&frame)?, recv))
}

/// Says why the receiver closed the connection, when it did (a refused agent learns it
/// only after its own side of the handshake is done).
fn closed(conn: &quinn::Connection, e: anyhow::Error) -> anyhow::Error {
    match conn.close_reason() {
        Some(reason) => e.context(format!("the receiver closed the connection: {reason}")),
        None => e,
    }
}

/// The leaves of the image as of the export's cut: those of the receiver's newest point
/// (`newest`, from `leaf_path`; zeros before a first full) with the (block, leaf) pairs the
/// export computed. `None`, with a warning, when they cannot be known: the leaf file is
/// missing or of another point (it was lost, or another cursor wrote to the receiver), the
/// disk changed size, or the disk is too large to digest. The point is then committed
/// unchecked.
fn leaves_after(
    leaf_path: &Path,
    newest: Option<&str>,
    disk_size: u64,
    block_size: u32,
    pairs: &Path,
) -> Result<Option<Leaves>> {
    let base = match newest {
        None => Some(Leaves::zeroed(disk_size, block_size)),
        Some(id) => {
            let at = id.parse().context("the receiver's newest point")?;
            LeafFile::load(leaf_path, at)?.map(Ok)
        }
    };
    let mut leaves = match base {
        Some(Ok(l)) if l.disk_size() == disk_size && l.block_size() == block_size => l,
        // The disk was resized since that point: the export carries every block from the
        // smaller end on (the tracker reports them changed), so the pairs below complete
        // the leaves of the new size.
        Some(Ok(mut l)) if l.block_size() == block_size => {
            l.resize(disk_size)?;
            l
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "no image digest for this push");
            return Ok(None);
        }
        _ => {
            tracing::warn!(
                leaves = %leaf_path.display(),
                "the block digests of the receiver's newest point are not known here (lost, \
                 or the disk changed size): this point is committed without the end-to-end \
                 check"
            );
            return Ok(None);
        }
    };
    let mut input = std::io::BufReader::new(std::fs::File::open(pairs)?);
    let mut pair = [0u8; 16];
    loop {
        match input.read_exact(&mut pair) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let block = u64::from_le_bytes(pair[..8].try_into().expect("8"));
        let leaf = u64::from_le_bytes(pair[8..].try_into().expect("8"));
        leaves.set_leaf(block, leaf)?;
    }
    Ok(Some(leaves))
}

/// Makes a FIFO (mode 0600) for the export to stream through.
fn mkfifo(path: &Path) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: mkfifo reads a NUL-terminated path that lives across the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating the FIFO {}", path.display()));
    }
    Ok(())
}

/// What one streamed push did.
struct Pushed {
    exported: ExportAnswer,
    sent: u64,
    answer: Response,
    leaves: Option<Leaves>,
    digest: Option<ctk::digest::ImageDigest>,
}

/// One push, streamed: the running agent exports into a FIFO while this process reads it
/// and sends it on, chunk by chunk, so reading, encoding and sending overlap and no copy of
/// the delta lands on disk. The end frame (cut time, consistency, image digest) follows.
fn push(
    s: &Session,
    conn: &quinn::Connection,
    newest: Option<&str>,
    cut: Cut,
    plan: &Plan,
) -> Result<Pushed> {
    let (runtime, r, disk, control) = (&s.runtime, s.r, s.disk.as_str(), s.control);
    let (geometry, leaf_path) = (s.geometry, s.leaf_path.as_path());
    let newest_id: Option<ChangeId> = newest
        .map(|n| n.parse())
        .transpose()
        .context("the receiver's newest point")?;
    let fifo = s.work_file("fifo")?;
    let pairs = s.work_file("leaves")?;
    mkfifo(&fifo)?;
    let mut cleanup = Cleanup(vec![fifo.clone(), pairs.clone()]);
    if let Plan::Compare { theirs } = plan {
        cleanup.0.push(theirs.clone());
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let (exported, streamed) = std::thread::scope(|scope| {
        let exporter = scope.spawn(|| {
            let mut request = proto::Export {
                disk: Some(disk.to_owned()),
                since: ExportSince::Since(newest_id.map_or(Since::All, Since::Id)),
                path: fifo.clone(),
                leaves: Some(pairs.clone()),
                consistency: cut.consistency(),
                base: None,
                unit: None,
                digests: None,
                resume: None,
            };
            match plan {
                Plan::Compare { theirs } => {
                    request.since = ExportSince::Compare;
                    request.base = newest_id;
                    request.unit = Some(r.resync_unit);
                    request.digests = Some(theirs.clone());
                }
                Plan::Resume { prior, next_offset } => {
                    request.resume = Some(proto::Resume {
                        prior: prior.parse()?,
                        next_offset: *next_offset,
                    });
                }
                Plan::Since => {}
            }
            let answer = ask::<ExportAnswer>(control, &proto::Request::Export(request));
            if answer.is_err() {
                // The agent may have failed before opening the FIFO, and the reader below
                // waits in open() until a writer comes: be that writer, and go.
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&fifo);
            }
            answer
        });
        // The reader owns the sender: the channel closes, and the send loop below ends,
        // when the reader does.
        let reader_fifo = fifo.clone();
        let reader = scope.spawn(move || -> Result<()> {
            let mut input = std::fs::File::open(&reader_fifo)?;
            // A 1 MiB pipe instead of 64 KiB: the export and this reader wake each other
            // 16 times less often. Best effort (the system's pipe-max-size may be lower).
            // SAFETY: fcntl on an open descriptor with an integer argument touches no memory.
            unsafe {
                libc::fcntl(
                    std::os::fd::AsRawFd::as_raw_fd(&input),
                    libc::F_SETPIPE_SZ,
                    1 << 20,
                )
            };
            loop {
                let mut buf = vec![0u8; ctk_net::wire::CHUNK_MAX];
                let mut filled = 0;
                // Whole chunks where the export is quick enough: fewer, larger writes.
                while filled < buf.len() {
                    match input.read(&mut buf[filled..])? {
                        0 => break,
                        n => filled += n,
                    }
                }
                if filled == 0 {
                    return Ok(());
                }
                buf.truncate(filled);
                if tx.blocking_send(bytes::Bytes::from(buf)).is_err() {
                    return Ok(());
                }
            }
        });
        let streamed = runtime.block_on(async {
            let (mut send, recv) = conn.open_bi().await.map_err(|e| closed(conn, e.into()))?;
            let (resumes, next_offset) = match plan {
                Plan::Resume { prior, next_offset } => (Some(prior.clone()), *next_offset),
                _ => (None, 0),
            };
            // One stream: the requests every receiver of `ctk/2` knows.
            let request = match (s.streams, resumes) {
                (1, Some(resumes)) => Request::PushResume {
                    disk: disk.into(),
                    resumes,
                    next_offset,
                },
                (1, None) => Request::Push { disk: disk.into() },
                (lanes, resumes) => Request::PushLanes {
                    disk: disk.into(),
                    lanes,
                    resumes,
                    next_offset,
                },
            };
            ctk_net::write_frame(&mut send, &request.encode()).await?;
            let push = u64::from(send.id());
            let mut lanes = vec![send];
            for index in 1..s.streams {
                let mut lane = conn.open_uni().await.map_err(|e| closed(conn, e.into()))?;
                let frame = ctk_net::wire::Lane { push, index }.encode();
                ctk_net::write_frame(&mut lane, &frame).await?;
                lanes.push(lane);
            }
            // Chunk i goes on lane i % lanes: the receiver reads them back in that order.
            let mut turn = 0;
            let mut sent = 0u64;
            let mut failed = None;
            while let Some(chunk) = rx.recv().await {
                if failed.is_some() {
                    continue; // keep draining: the agent must be able to finish its export
                }
                sent += chunk.len() as u64;
                // Under a limit, in pieces of about an eighth of a second's worth, so the
                // rate holds over short spans too, not only on average.
                let piece = s.limiter.piece(chunk.len());
                let mut at = 0;
                while at < chunk.len() && failed.is_none() {
                    let end = (at + piece).min(chunk.len());
                    s.limiter.pace(end - at).await;
                    let lane = turn;
                    turn = (turn + 1) % lanes.len();
                    if let Err(e) =
                        ctk_net::write_chunk(&mut lanes[lane], chunk.slice(at..end)).await
                    {
                        failed = Some(closed(conn, e.into()));
                    }
                    at = end;
                }
            }
            match failed {
                // The receiver stops reading when it refuses a push early (a bad header, say);
                // its answer says why, which beats "stopped by peer".
                Some(e) => {
                    let mut recv = recv;
                    let answer = tokio::time::timeout(
                        Duration::from_secs(5),
                        ctk_net::read_frame(&mut recv),
                    )
                    .await;
                    match answer
                        .ok()
                        .and_then(|f| f.ok())
                        .map(|f| Response::decode(&f))
                    {
                        Some(Ok(Response::Refused { message, .. })) => {
                            Err(anyhow::anyhow!("the receiver refused the delta: {message}"))
                        }
                        _ => Err(e),
                    }
                }
                None => Ok::<_, anyhow::Error>((lanes, recv, sent)),
            }
        });
        let exported = exporter
            .join()
            .map_err(|_| anyhow::anyhow!("the export thread panicked"))?;
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("the FIFO reader panicked"))?
            .context("reading the export")?;
        Ok::<_, anyhow::Error>((exported, streamed))
    })?;
    let exported = exported.with_context(|| match newest {
        Some(id) if matches!(plan, Plan::Compare { .. }) => {
            format!("exporting a resync against the receiver's newest point {id}")
        }
        Some(id) => format!("exporting the changes since the receiver's newest point {id}"),
        None => "exporting a first full".into(),
    })?;
    let (mut lanes, mut recv, sent) = streamed?;
    // A resync read every block: its pairs are the whole image's leaves.
    let base = match plan {
        Plan::Since | Plan::Resume { .. } => newest,
        Plan::Compare { .. } => None,
    };
    let leaves = leaves_after(leaf_path, base, exported.disk_size, geometry.1, &pairs)
        .context("digesting the exported delta")?;
    // Before the end frame: were this process killed after the receiver's commit, the next
    // run must still know the leaves of what is then the receiver's newest point.
    if let Some(l) = &leaves
        && let Err(e) = LeafFile::save_pending(leaf_path, l, exported.to)
    {
        tracing::warn!(error = %e, "recording the pending block digests");
    }
    let digest = leaves.as_ref().map(|l| l.digest());
    let end = PushEnd {
        cut_unix_ms: exported.cut_unix_ms,
        consistency: exported.cut.consistency,
        image_digest: digest.map(|d| d.0),
    };
    let answer = runtime.block_on(async {
        for lane in &mut lanes {
            ctk_net::end_chunks(lane).await?;
        }
        let mut extra = lanes.split_off(1);
        for lane in &mut extra {
            lane.finish()?;
        }
        let send = &mut lanes[0];
        ctk_net::write_frame(send, &end.encode()).await?;
        send.finish()?;
        let frame = ctk_net::read_frame(&mut recv)
            .await
            .map_err(|e| closed(conn, e.into()))?;
        Ok::<_, anyhow::Error>(Response::decode(&frame)?)
    })?;
    Ok(Pushed {
        exported,
        sent,
        answer,
        leaves,
        digest,
    })
}

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

/// Removes files when dropped (the FIFO and the leaves of a push, whatever happened).
struct Cleanup(Vec<PathBuf>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
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
    /// text: a receiver that does not know this agent's certificate.
    fn explain(&self, e: anyhow::Error) -> anyhow::Error {
        if format!("{e:#}").contains("is not on the allow-list") {
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

    /// Decides what to send on top of the receiver's newest point: the changes since it when
    /// this agent can name them, else (or when asked) a resync by digests. A resync fetches
    /// the receiver's unit hashes into a work file; a replica of another size has none that
    /// can be used, and gets a full copy, the last resort, logged as such.
    fn plan(&self, conn: &quinn::Connection, newest: Option<&str>, force: bool) -> Result<Plan> {
        let Some(id) = newest else {
            return Ok(Plan::Since);
        };
        if !force {
            let a: proto::AnswerableAnswer = ask(
                self.control,
                &proto::Request::Answerable {
                    disk: Some(self.disk.clone()),
                    since: Since::Id(id.parse().context("the receiver's newest point")?),
                },
            )?;
            if a.answerable {
                return Ok(Plan::Since);
            }
            tracing::warn!(
                disk = %self.disk, point = id, why = %a.why.unwrap_or_default(),
                "this agent cannot name the changes since the receiver's newest point: \
                 comparing digests with the receiver instead of sending everything"
            );
        }
        let unit = self.r.resync_unit;
        let request = Request::Digests {
            disk: self.disk.clone(),
            unit,
        };
        let (change_id, disk_size, hashes) = self.runtime.block_on(async {
            let (answer, mut recv) = call_then(conn, &request).await?;
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
        if change_id != id {
            bail!("the receiver moved from {id} to {change_id} while asked for its digests");
        }
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
        Ok(Plan::Compare { theirs })
    }

    /// The receiver's resume state of a cut-off push of this disk, if it has one this agent
    /// can continue: from the receiver's newest point, of this disk's size, and a cut of
    /// this agent's journal that it can still name the changes since. Anything else (a
    /// state of another generation, a forged or stale one) is not trusted: logged, and the
    /// push starts from the beginning.
    fn resume_plan(&self, conn: &quinn::Connection, newest: Option<&str>) -> Result<Option<Plan>> {
        let request = Request::Resume {
            disk: self.disk.clone(),
        };
        let state = match self.runtime.block_on(call(conn, &request))? {
            Response::Resume { state: None } => return Ok(None),
            Response::Resume { state: Some(state) } => state,
            // A receiver from before resumes: push from the start.
            Response::Refused { .. } => return Ok(None),
            other => bail!("unexpected answer from the receiver: {other:?}"),
        };
        // The agent's own journal answers "can you still name the changes since that cut";
        // a failure to ask is an error of this run, not a reason to distrust the state.
        let mut asked = Ok(());
        let judged = ctk::push::judge_resume(&state, newest, self.geometry.0, |since| {
            let since: ChangeId = since.parse().map_err(|e| format!("{since:?}: {e}"))?;
            let request = proto::Request::Answerable {
                disk: Some(self.disk.clone()),
                since: Since::Id(since),
            };
            match ask::<proto::AnswerableAnswer>(self.control, &request) {
                Ok(a) if a.answerable => Ok(()),
                Ok(a) => Err(a.why.unwrap_or_default()),
                Err(e) => {
                    let why = format!("{e:#}");
                    asked = Err(e);
                    Err(why)
                }
            }
        });
        asked?;
        match judged {
            Err(why) => {
                tracing::warn!(
                    disk = %self.disk, resume = ?state, %why,
                    "not resuming: the receiver's resume state does not fit this agent; sending from the start"
                );
                Ok(None)
            }
            Ok(prior) => {
                tracing::info!(
                    disk = %self.disk, %prior, next_offset = state.next_offset,
                    "resuming a cut-off push"
                );
                Ok(Some(Plan::Resume {
                    prior: state.to,
                    next_offset: state.next_offset,
                }))
            }
        }
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

    fn once_inner(&mut self, cut: Cut, force_resync: bool) -> Result<Value> {
        self.refresh_geometry()?;
        let conn = self.connection()?;
        let (disk, control) = (self.disk.clone(), self.control);
        let started = std::time::Instant::now();
        // A push that does not fit is retried from where the receiver then stands: another
        // push of this disk (say, of an earlier attempt that was killed after sending it
        // all) may have committed between our question and our push. Each try is a new cut.
        let mut tries = 0;
        let mut resume_asked = false;
        let (newest, pushed, committed, already, resync, resumed_at) = loop {
            tries += 1;
            let request = Request::Newest { disk: disk.clone() };
            let newest = match self.runtime.block_on(call(&conn, &request))? {
                Response::Newest { change_id } => change_id,
                Response::Refused { message, .. } => bail!("the receiver refused: {message}"),
                other => bail!("unexpected answer from the receiver: {other:?}"),
            };
            let plan = match self.plan(&conn, newest.as_deref(), force_resync)? {
                Plan::Since if self.ask_resume => {
                    resume_asked = true;
                    self.resume_plan(&conn, newest.as_deref())?
                        .unwrap_or(Plan::Since)
                }
                other => other,
            };
            // Nothing written since the receiver's point: no cut, no point, only the news
            // that the replica is the disk as of now (the RPO then reads "in sync as of").
            if let (Plan::Since, Some(point)) = (&plan, newest.as_deref()) {
                let request = proto::Request::Unchanged {
                    disk: Some(disk.clone()),
                    since: point.parse().context("the receiver's newest point")?,
                    consistency: cut.consistency(),
                };
                let answer: proto::UnchangedAnswer = ask(control, &request)?;
                if answer.unchanged {
                    return self.in_sync(point, &answer, resume_asked, started);
                }
            }
            let resync = matches!(plan, Plan::Compare { .. });
            let resumed_at = match &plan {
                Plan::Resume { next_offset, .. } => Some(*next_offset),
                _ => None,
            };
            let pushed = push(self, &conn, newest.as_deref(), cut, &plan);
            // A receiver from before multi-stream pushes does not know the request: it says
            // so in the refusal (either as the answer or as the reason the stream was cut).
            // Push again on one stream, the way it knows, rather than failing.
            let refusal = match &pushed {
                Ok(p) => format!("{:?}", p.answer),
                Err(e) => format!("{e:#}"),
            };
            // Older receivers said it in bincode's words, newer ones in a sentence.
            let unknown =
                refusal.contains("UnexpectedVariant") || refusal.contains("unknown Request kind");
            if self.streams > 1 && unknown && tries < 3 {
                tracing::warn!(
                    receiver = %self.r.receiver, streams = self.streams,
                    "the receiver does not know multi-stream pushes (it is older than this agent): \
                     pushing on one stream; upgrade it, or pass --streams 1"
                );
                self.streams = 1;
                continue;
            }
            let pushed = pushed?;
            let to = pushed.exported.to.to_string();
            let to = to.as_str();
            match ctk::push::after_push(&pushed.answer, to) {
                AfterPush::Committed { change_id, already } => {
                    break (newest, pushed, change_id, already, resync, resumed_at);
                }
                AfterPush::Retry(message) if tries < 3 => {
                    tracing::info!(%message, "the receiver moved on meanwhile: trying again");
                }
                AfterPush::Retry(message) => {
                    bail!(
                        "the receiver refused the delta ({}): {message}",
                        Refusal::Mismatch
                    )
                }
                AfterPush::Failed(why) => bail!("{why}"),
            }
        };
        let exported = &pushed.exported;
        // Only now, with the commit acknowledged, do the leaves and the cursor move. Leaves
        // that fail to save only cost the next push its check (it finds them of another
        // point), so that is a warning, not a failed replication.
        let digest = pushed.digest.map(|d| d.to_string());
        if let (Some(mut leaves), Ok(at)) = (pushed.leaves, committed.parse())
            && let Err(e) = LeafFile::save(&self.leaf_path, &mut leaves, at)
        {
            tracing::warn!(error = %e, leaves = %self.leaf_path.display(), "saving the block digests");
        }
        let seconds = started.elapsed().as_secs_f64();
        let changed = exported.changed_bytes;
        // The rate only from pushes big enough to say something about the link.
        let rate = (changed >= 1 << 20).then(|| changed as f64 / seconds.max(1e-3));
        let at = committed
            .parse()
            .context("the receiver's committed point")?;
        self.move_cursor(at, exported.cut_unix_ms, rate)?;
        Ok(json!({
            "disk": disk,
            "from": newest,
            "committed": committed,
            "already_committed": already,
            "changed_bytes": exported.changed_bytes,
            "delta_bytes": pushed.sent,
            "consistency": exported.cut.consistency,
            "cut_unix_ms": exported.cut_unix_ms,
            "hold_ms": exported.cut.hold_ms,
            "image_digest": digest,
            "seconds": seconds,
            "committed_unix_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            "resync": resync,
            "resume_asked": resume_asked,
            "resumed_at": resumed_at,
        }))
    }
}

impl Session<'_> {
    /// A cycle with nothing to push: the cursor stays at `point`, and learns that the
    /// replica holds the disk as of the agent's `as_of_unix_ms` (its RPO clock restarts).
    fn in_sync(
        &self,
        point: &str,
        answer: &proto::UnchangedAnswer,
        resume_asked: bool,
        started: std::time::Instant,
    ) -> Result<Value> {
        let as_of = answer.as_of_unix_ms;
        self.move_cursor(answer.since, as_of, None)?;
        Ok(json!({
            "disk": self.disk,
            "from": point,
            "committed": point,
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
        }))
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

/// Paces sending to a rate read from a shared value before every chunk, so a limit changed
/// at run time applies to the push under way. At most one chunk goes out ahead of the rate.
struct Limiter {
    rate: Arc<AtomicU64>,
    next: std::cell::Cell<Option<tokio::time::Instant>>,
}

impl Limiter {
    fn new(rate: Arc<AtomicU64>) -> Limiter {
        Limiter {
            rate,
            next: std::cell::Cell::new(None),
        }
    }

    /// How much to send at a time: a whole chunk without a limit, else about an eighth of a
    /// second's worth (at least 4 KiB).
    fn piece(&self, chunk: usize) -> usize {
        match self.rate.load(Ordering::Relaxed) {
            0 => chunk,
            rate => ((rate / 8) as usize).clamp(4096, chunk.max(4096)),
        }
    }

    async fn pace(&self, bytes: usize) {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            self.next.set(None);
            return;
        }
        let now = tokio::time::Instant::now();
        let start = self.next.get().map_or(now, |n| n.max(now));
        self.next.set(Some(
            start + Duration::from_secs_f64(bytes as f64 / rate as f64),
        ));
        if start > now {
            tokio::time::sleep_until(start).await;
        }
    }
}
