//! One push, streamed: the running agent exports into a FIFO while this process reads it
//! and deals it out as chunks over the push's QUIC streams; then the end frame, and the
//! receiver's answer. Also the requests to the receiver and the bandwidth limit.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use ctk::digest::{LeafFile, Leaves};
use ctk::push::Plan;
use ctk::{ChangeId, Since};
use ctk_net::wire::{PushEnd, Request, Response};

use super::leaves::leaves_after;
use super::{Cut, Session};
use crate::control::ask;
use crate::control::proto::{self, ExportAnswer, ExportSince};

/// Sends one request and reads the answer.
pub(super) async fn call(conn: &quinn::Connection, request: &Request) -> Result<Response> {
    Ok(call_then(conn, request).await?.0)
}

/// Sends one request and reads the answer frame, returning the stream for what follows it
/// (the hashes after a `Digests` answer).
pub(super) async fn call_then(
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
pub(super) fn closed(conn: &quinn::Connection, e: anyhow::Error) -> anyhow::Error {
    match conn.close_reason() {
        Some(reason) => e.context(format!("the receiver closed the connection: {reason}")),
        None => e,
    }
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
pub(super) struct Pushed {
    pub(super) exported: ExportAnswer,
    pub(super) sent: u64,
    pub(super) answer: Response,
    pub(super) leaves: Option<Leaves>,
    pub(super) digest: Option<ctk::digest::ImageDigest>,
}

/// One push, streamed: the running agent exports into a FIFO while this process reads it
/// and sends it on, chunk by chunk, so reading, encoding and sending overlap and no copy of
/// the delta lands on disk. The end frame (cut time, consistency, image digest) follows.
pub(super) fn push(
    s: &Session,
    conn: &quinn::Connection,
    newest: Option<ChangeId>,
    cut: Cut,
    plan: &Plan,
    theirs: Option<&Path>,
) -> Result<Pushed> {
    let files = PushFiles::new(s, theirs)?;
    let request = export_request(s, newest, cut, plan, theirs, &files.fifo, &files.pairs);
    stream_export(s, conn, newest, plan, &files, || {
        ask::<ExportAnswer>(s.control, &proto::Request::Export(request))
    })
}

/// A push's work files: the FIFO the export streams through and its leaves' side file
/// (and the receiver's digests, for a resync), removed whatever happens.
pub(super) struct PushFiles {
    pub(super) fifo: PathBuf,
    pub(super) pairs: PathBuf,
    _cleanup: Cleanup,
}

impl PushFiles {
    pub(super) fn new(s: &Session, theirs: Option<&Path>) -> Result<PushFiles> {
        let fifo = s.work_file("fifo")?;
        let pairs = s.work_file("leaves")?;
        mkfifo(&fifo)?;
        let mut cleanup = Cleanup(vec![fifo.clone(), pairs.clone()]);
        if let Some(theirs) = theirs {
            cleanup.0.push(theirs.to_owned());
        }
        Ok(PushFiles {
            fifo,
            pairs,
            _cleanup: cleanup,
        })
    }
}

/// The streaming half of a push: `export` asks the running agent for the export into
/// `files.fifo` (on a thread of its own; for a group's member it waits for the group's
/// export) while this thread reads the FIFO and sends it on; then the leaves of the cut, the
/// end frame, and the receiver's answer.
pub(super) fn stream_export(
    s: &Session,
    conn: &quinn::Connection,
    newest: Option<ChangeId>,
    plan: &Plan,
    files: &PushFiles,
    export: impl FnOnce() -> Result<ExportAnswer> + Send,
) -> Result<Pushed> {
    let fifo = &files.fifo;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
    let (exported, streamed) = std::thread::scope(|scope| {
        let exporter = scope.spawn(|| {
            let answer = export();
            if answer.is_err() {
                // The agent may have failed before opening the FIFO, and the reader below
                // waits in open() until a writer comes: be that writer, and go.
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(fifo);
            }
            answer
        });
        // The reader owns the sender: the channel closes, and the send loop ends, when the
        // reader does.
        let reader = scope.spawn(|| read_fifo(fifo, tx));
        let streamed = s.runtime.block_on(send_chunks(s, conn, plan, rx));
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
    let (lanes, recv, sent) = streamed?;
    // A resync read every block: its pairs are the whole image's leaves.
    let base = match plan {
        Plan::Since(_) | Plan::Resume { .. } => newest,
        Plan::Compare { .. } => None,
    };
    let leaves = leaves_after(
        &s.leaf_path,
        base,
        exported.disk_size,
        s.geometry.1,
        &files.pairs,
    )
    .context("digesting the exported delta")?;
    // Before the end frame: were this process killed after the receiver's commit, the next
    // run must still know the leaves of what is then the receiver's newest point.
    if let Some(l) = &leaves
        && let Err(e) = LeafFile::save_pending(&s.leaf_path, l, exported.to)
    {
        tracing::warn!(error = %e, "recording the pending block digests");
    }
    let digest = leaves.as_ref().map(|l| l.digest());
    let end = PushEnd {
        cut_unix_ms: exported.cut_unix_ms,
        consistency: exported.cut.consistency,
        image_digest: digest.map(|d| d.0),
    };
    let answer = s.runtime.block_on(end_push(conn, lanes, recv, &end))?;
    Ok(Pushed {
        exported,
        sent,
        answer,
        leaves,
        digest,
    })
}

/// The export the running agent is asked for: since the receiver's newest point, the rest
/// of a cut-off push, or every unit that differs from the receiver's digests.
pub(super) fn export_request(
    s: &Session,
    newest: Option<ChangeId>,
    cut: Cut,
    plan: &Plan,
    theirs: Option<&Path>,
    fifo: &Path,
    pairs: &Path,
) -> proto::Export {
    let mut request = proto::Export {
        disk: Some(s.disk.clone()),
        since: ExportSince::Since(newest.map_or(Since::All, Since::Id)),
        path: fifo.to_owned(),
        leaves: Some(pairs.to_owned()),
        consistency: cut.consistency(),
        base: None,
        unit: None,
        digests: None,
        resume: None,
    };
    match plan {
        Plan::Compare { base } => {
            request.since = ExportSince::Compare;
            request.base = Some(*base);
            request.unit = Some(s.r.resync_unit);
            request.digests = theirs.map(Path::to_owned);
        }
        Plan::Resume {
            since,
            prior,
            next_offset,
        } => {
            request.since = ExportSince::Since(*since);
            request.resume = Some(proto::Resume {
                prior: *prior,
                next_offset: *next_offset,
            });
        }
        Plan::Since(since) => request.since = ExportSince::Since(*since),
    }
    request
}

/// Reads the export from its FIFO in whole chunks where the export is quick enough (fewer,
/// larger writes) and hands them to the send loop, until the export ends or the loop goes.
fn read_fifo(fifo: &Path, tx: tokio::sync::mpsc::Sender<bytes::Bytes>) -> Result<()> {
    let mut input = std::fs::File::open(fifo)?;
    // A 1 MiB pipe instead of 64 KiB: the export and this reader wake each other 16 times
    // less often. Best effort (the system's pipe-max-size may be lower).
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
}

/// A push's lanes (the request's stream first), the stream its answer comes on, and the
/// bytes sent.
type Streamed = (Vec<quinn::SendStream>, quinn::RecvStream, u64);

/// Opens the push's streams (the request on a bidirectional stream, then the extra lanes)
/// and deals every chunk the reader hands over round robin over them, under the bandwidth
/// limit. On a failed send it keeps draining (the agent must be able to finish its export) and returns the
/// receiver's refusal if it gave one.
async fn send_chunks(
    s: &Session<'_>,
    conn: &quinn::Connection,
    plan: &Plan,
    mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> Result<Streamed> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| closed(conn, e.into()))?;
    let (resumes, next_offset) = match plan {
        Plan::Resume {
            prior, next_offset, ..
        } => (Some(*prior), *next_offset),
        _ => (None, 0),
    };
    let disk = s.disk.as_str();
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
        // Under a limit, in pieces of about an eighth of a second's worth, so the rate
        // holds over short spans too, not only on average.
        let piece = s.limiter.piece(chunk.len());
        let mut at = 0;
        while at < chunk.len() && failed.is_none() {
            let end = (at + piece).min(chunk.len());
            s.limiter.pace(end - at).await;
            let lane = turn;
            turn = (turn + 1) % lanes.len();
            if let Err(e) = ctk_net::write_chunk(&mut lanes[lane], chunk.slice(at..end)).await {
                failed = Some(closed(conn, e.into()));
            }
            at = end;
        }
    }
    match failed {
        Some(e) => Err(refusal_or(recv, e).await),
        None => Ok((lanes, recv, sent)),
    }
}

/// The receiver stops reading when it refuses a push early (a bad header, say); its answer
/// says why, which beats "stopped by peer".
async fn refusal_or(mut recv: quinn::RecvStream, e: anyhow::Error) -> anyhow::Error {
    let answer = tokio::time::timeout(Duration::from_secs(5), ctk_net::read_frame(&mut recv)).await;
    match answer
        .ok()
        .and_then(|f| f.ok())
        .map(|f| Response::decode(&f))
    {
        Some(Ok(Response::Refused { message, .. })) => {
            anyhow::anyhow!("the receiver refused the delta: {message}")
        }
        _ => e,
    }
}

/// Ends every lane's chunks, sends the end frame on the first, and reads the answer (which
/// the receiver gives only after the commit).
async fn end_push(
    conn: &quinn::Connection,
    mut lanes: Vec<quinn::SendStream>,
    mut recv: quinn::RecvStream,
    end: &PushEnd,
) -> Result<Response> {
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
    Ok(Response::decode(&frame)?)
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

/// Paces sending to a rate read from a shared value before every chunk, so a limit changed
/// at run time applies to the push under way. At most one chunk goes out ahead of the rate.
pub(super) struct Limiter {
    rate: Arc<AtomicU64>,
    next: std::cell::Cell<Option<tokio::time::Instant>>,
}

impl Limiter {
    pub(super) fn new(rate: Arc<AtomicU64>) -> Limiter {
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
