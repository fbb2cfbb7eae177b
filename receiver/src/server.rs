//! `ctk-receiver serve`: accepts agents over QUIC and merges what they push into their
//! stores. Each allowed agent has a name and a namespace (`<store>/<agent>/<disk>`), so an
//! agent sees and writes only its own disks; names are validated, and no path comes from the
//! wire. A misbehaving peer ends only its own stream or connection.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use ctk::digest::ImageDigest;
use ctk_net::wire::{self, Refusal, Request, Response};
use ctk_net::{Fingerprint, Identity};
use tracing::{Instrument, info, info_span, warn};

use crate::retention::Retention;

mod failback;
mod group;

use crate::store::{self, DiskStore, Ingested, StoreError};

pub struct Config {
    pub store: PathBuf,
    pub listen: SocketAddr,
    /// Allowed agents: fingerprint -> agent name.
    pub agents: HashMap<Fingerprint, String>,
    /// Which points each disk keeps (`retention_for` by disk name, else `retention`).
    pub retention: Retention,
    pub retention_for: HashMap<String, Retention>,
}

impl Config {
    /// A store and listen address with the default retention (`KEEP_DEFAULT` points).
    pub fn new(store: PathBuf, listen: SocketAddr, agents: HashMap<Fingerprint, String>) -> Config {
        Config {
            store,
            listen,
            agents,
            retention: store::KEEP_DEFAULT.into(),
            retention_for: HashMap::new(),
        }
    }

    pub fn retention(&self, disk: &str) -> Retention {
        self.retention_for
            .get(disk)
            .unwrap_or(&self.retention)
            .clone()
    }
}

/// Parses an agents file: one `NAME FINGERPRINT` per line; `#` starts a comment.
pub fn parse_agents(text: &str) -> Result<Vec<(String, Fingerprint)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(name), Some(fp), None) = (parts.next(), parts.next(), parts.next()) else {
            anyhow::bail!("line {}: use NAME FINGERPRINT", n + 1);
        };
        store::validate_agent_name(name)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("line {}", n + 1))?;
        out.push((
            name.to_owned(),
            fp.parse().with_context(|| format!("line {}", n + 1))?,
        ));
    }
    Ok(out)
}

/// Serves until SIGINT or SIGTERM.
pub async fn run(identity: Identity, config: Config) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    // One receiver per store, for as long as it serves (released by the kernel however
    // the process ends).
    let _store_lock = store::lock_root(&config.store)?;
    let endpoint = bind(&identity, &config)?;
    // Tests and scripts wait for this line; a service manager for the notice.
    let ready = format!(
        "listening on {} as {}",
        endpoint.local_addr()?,
        identity.fingerprint()
    );
    println!("ctk-receiver ready: {ready}");
    ctk_net::service::ready(&ready);
    ctk_net::service::spawn_watchdog();
    let stop = async move {
        stop.await;
        ctk_net::service::stopping();
    };
    serve(endpoint, config, stop).await
}

/// The receiver's endpoint, bound and ready to serve.
pub fn bind(identity: &Identity, config: &Config) -> Result<quinn::Endpoint> {
    let allowed: Vec<Fingerprint> = config.agents.keys().copied().collect();
    Ok(ctk_net::server_endpoint(identity, allowed, config.listen)?)
}

/// Serves agents on `endpoint` until `stop` completes.
pub async fn serve(
    endpoint: quinn::Endpoint,
    config: Config,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let addr = endpoint.local_addr()?;
    info!(%addr, agents = config.agents.len(), "serving");
    let config = Arc::new(config);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let config = config.clone();
                let peer = incoming.remote_address();
                tokio::spawn(
                    async move {
                        if let Err(e) = connection(incoming, config).await {
                            info!(error = %e, "connection ended");
                        }
                    }
                    .instrument(info_span!("agent", %peer)),
                );
            }
            () = &mut stop => break,
        }
    }
    info!("shutting down");
    endpoint.close(0u32.into(), b"shutting down");
    Ok(())
}

async fn connection(incoming: quinn::Incoming, config: Arc<Config>) -> Result<()> {
    // The TLS handshake refuses agents that are not on the allow-list.
    let conn = incoming.await.context("handshake")?;
    let fp = ctk_net::peer_fingerprint(&conn).context("no agent certificate")?;
    let agent = config
        .agents
        .get(&fp)
        .context("agent not on the allow-list")?
        .clone();
    info!(%agent, "agent connected");
    let lanes = Arc::new(Lanes::default());
    tokio::spawn(lanes.clone().accept(conn.clone()));
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(quinn::ConnectionError::ApplicationClosed(_))
            | Err(quinn::ConnectionError::LocallyClosed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let config = config.clone();
        let agent = agent.clone();
        let lanes = lanes.clone();
        tokio::spawn(
            async move {
                if let Err(e) = stream(&agent, &config, &lanes, send, recv).await {
                    warn!(error = %e, "request failed");
                }
            }
            .instrument(info_span!("request")),
        );
    }
}

/// The extra lanes of a connection's pushes (`Request::PushLanes`), each parked from the
/// moment its stream's first frame names it until its push takes it: a lane may arrive
/// before or after its push's request is read.
#[derive(Default)]
struct Lanes {
    parked: Mutex<HashMap<(u64, u8), quinn::RecvStream>>,
    arrived: tokio::sync::Notify,
}

/// Most lanes parked on one connection at once: a peer that opens streams and never pushes
/// holds no more than this.
const PARKED_MAX: usize = 64;
/// How long a push waits for all its lanes, and a new stream for its lane frame.
const LANE_WAIT: Duration = Duration::from_secs(10);

impl Lanes {
    fn parked(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u8), quinn::RecvStream>> {
        // The map holds no invariant a panicking holder could break.
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts the connection's unidirectional streams (only lanes use them) until it
    /// closes.
    async fn accept(self: Arc<Self>, conn: quinn::Connection) {
        while let Ok(mut recv) = conn.accept_uni().await {
            let lanes = self.clone();
            tokio::spawn(async move {
                let frame = tokio::time::timeout(LANE_WAIT, ctk_net::read_frame(&mut recv)).await;
                let lane = match frame {
                    Ok(Ok(f)) => wire::Lane::decode(&f).map_err(|e| e.to_string()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no lane frame within {LANE_WAIT:?}")),
                };
                let refused = match lane {
                    Ok(lane) => {
                        let mut parked = lanes.parked();
                        if parked.len() >= PARKED_MAX {
                            Some(format!("{PARKED_MAX} lanes wait for their pushes already"))
                        } else {
                            parked.insert((lane.push, lane.index), recv);
                            None
                        }
                    }
                    Err(why) => Some(why),
                };
                match refused {
                    Some(why) => warn!(%why, "a stream refused as a push's lane"),
                    None => lanes.arrived.notify_waiters(),
                }
            });
        }
    }

    /// Takes lanes 1 to `count - 1` of push `push` (its request stream's id), waiting up to
    /// `LANE_WAIT` for them all.
    async fn take(&self, push: u64, count: u8) -> Result<Vec<quinn::RecvStream>, String> {
        let deadline = tokio::time::Instant::now() + LANE_WAIT;
        let mut got: Vec<Option<quinn::RecvStream>> = (1..count).map(|_| None).collect();
        loop {
            // Registered before looking, so a lane parked in between still wakes us.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut parked = self.parked();
                for (i, slot) in got.iter_mut().enumerate() {
                    if slot.is_none() {
                        *slot = parked.remove(&(push, i as u8 + 1));
                    }
                }
            }
            if let Some(missing) = got.iter().position(Option::is_none) {
                if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                    return Err(format!(
                        "lane {} of {count} did not arrive within {LANE_WAIT:?}",
                        missing + 1
                    ));
                }
            } else {
                return Ok(got.into_iter().flatten().collect());
            }
        }
    }
}

async fn stream(
    agent: &str,
    config: &Config,
    lanes: &Lanes,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<()> {
    let (response, body) = match ctk_net::read_frame(&mut recv).await {
        Err(e) => (Response::refused(Refusal::BadRequest, e.to_string()), None),
        Ok(frame) => match Request::decode(&frame) {
            Err(e) => (Response::refused(Refusal::BadRequest, e.to_string()), None),
            Ok(Request::Digests { disk, unit }) => digests(agent, config, disk, unit).await,
            Ok(Request::FailbackPull {
                disk,
                since,
                known,
                final_pass,
            }) => {
                // Answers with its delta itself; a refusal goes the usual way.
                let response = failback::pull(
                    agent, config, disk, since, known, final_pass, &mut send, &mut recv,
                )
                .await?;
                if let Response::FailbackPass { .. } = response {
                    send.finish()?;
                    let _ = send.stopped().await;
                    return Ok(());
                }
                (response, None)
            }
            Ok(Request::FailbackCommit {
                disk,
                upto,
                point,
                cut_unix_ms,
            }) => (
                failback::commit(agent, config, disk, upto, point, cut_unix_ms).await,
                None,
            ),
            Ok(request) => (handle(agent, config, lanes, request, recv).await, None),
        },
    };
    if let Response::Refused { message, .. } = &response {
        warn!(%agent, %message, "refused");
    }
    ctk_net::write_frame(&mut send, &response.encode()).await?;
    if let Some(body) = body {
        let body = ctk_net::Bytes::from(body);
        for at in (0..body.len()).step_by(wire::CHUNK_MAX) {
            let end = (at + wire::CHUNK_MAX).min(body.len());
            ctk_net::write_chunk(&mut send, body.slice(at..end)).await?;
        }
        ctk_net::end_chunks(&mut send).await?;
    }
    send.finish()?;
    // Wait until the agent has the answer before the stream goes away.
    let _ = send.stopped().await;
    Ok(())
}

fn refusal(e: &StoreError) -> Refusal {
    match e {
        StoreError::BadName(_) | StoreError::NoSuchPoint(_) | StoreError::Protocol(_) => {
            Refusal::BadRequest
        }
        StoreError::Delta(_) | StoreError::DigestMismatch { .. } => Refusal::Damaged,
        StoreError::Mismatch(_) => Refusal::Mismatch,
        StoreError::FailedOver { .. } => Refusal::FailedOver,
        StoreError::NotFailedOver { .. } => Refusal::NotFailedOver,
        StoreError::Io { .. }
        | StoreError::Damaged { .. }
        | StoreError::InUse { .. }
        | StoreError::Exposed { .. } => Refusal::Unavailable,
    }
}

fn describe(e: &StoreError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A resync's question: the hashes of the disk's newest point, unit by unit (the answer,
/// then the hashes as chunks).
async fn digests(
    agent: &str,
    config: &Config,
    disk: String,
    unit: u32,
) -> (Response, Option<Vec<u8>>) {
    let root = config.store.join(agent);
    let span = info_span!("digests", %disk, unit);
    let result = tokio::task::spawn_blocking(move || {
        let _guard = span.enter();
        // Asking never creates a store.
        if store::newest_point(&root, &disk)?.is_none() {
            return Err(StoreError::NoSuchPoint(format!(
                "(any: disk {disk:?} has no point to compare against)"
            )));
        }
        let (s, _) = DiskStore::open_waiting(&root, &disk)?;
        let started = std::time::Instant::now();
        let answer = s.unit_digests(unit)?;
        info!(
            point = %answer.0,
            units = answer.2.len() / 32,
            seconds = started.elapsed().as_secs_f64(),
            "hashed the replica for a resync"
        );
        Ok(answer)
    })
    .await;
    match result {
        Ok(Ok((change_id, disk_size, hashes))) => (
            Response::Digests {
                change_id,
                disk_size,
                unit,
                count: hashes.len() as u64 / 32,
            },
            Some(hashes),
        ),
        Ok(Err(e)) => (Response::refused(refusal(&e), describe(&e)), None),
        Err(e) => (Response::refused(Refusal::Unavailable, e.to_string()), None),
    }
}

async fn handle(
    agent: &str,
    config: &Config,
    lanes: &Lanes,
    request: Request,
    recv: quinn::RecvStream,
) -> Response {
    let root = config.store.join(agent);
    match request {
        Request::GroupCommit {
            group,
            group_cut,
            cut_unix_ms,
            consistency,
            members,
        } => {
            group::commit(
                agent,
                config,
                group,
                group_cut,
                cut_unix_ms,
                consistency,
                members,
            )
            .await
        }
        Request::Newest { disk } => {
            if let Err(e) = store::validate_name(&disk) {
                return Response::refused(Refusal::BadRequest, describe(&e));
            }
            // No lock: a merge in progress (say, of a push whose agent was killed) must not
            // make the agent's next attempt fail. Asking never creates a store.
            // A failed-over disk says so at the first question, before the agent exports.
            let result = tokio::task::spawn_blocking(move || {
                if let Some(fence) = store::failed_over(&root, &disk)? {
                    return Err(StoreError::FailedOver { disk, fence });
                }
                store::newest_point(&root, &disk)
            })
            .await;
            match result {
                Ok(Ok(change_id)) => Response::Newest { change_id },
                Ok(Err(e)) => Response::refused(refusal(&e), describe(&e)),
                Err(e) => Response::refused(Refusal::Unavailable, e.to_string()),
            }
        }
        Request::Digests { .. } => Response::refused(
            Refusal::BadRequest,
            "digests are answered on their own path",
        ),
        Request::Resume { disk } => {
            if let Err(e) = store::validate_name(&disk) {
                return Response::refused(Refusal::BadRequest, describe(&e));
            }
            let result = tokio::task::spawn_blocking(move || {
                // Asking never creates a store; it waits for a push of the disk still
                // running (a cut-off one ends when its connection times out, and then
                // leaves its resume state).
                if !root.join(&disk).join("staging").exists() {
                    return Ok(None);
                }
                let (s, _) = DiskStore::open_waiting(&root, &disk)?;
                Ok::<_, StoreError>(s.partial())
            })
            .await;
            match result {
                Ok(Ok(p)) => Response::Resume {
                    state: p.map(|p| p.state()),
                },
                Ok(Err(e)) => Response::refused(refusal(&e), describe(&e)),
                Err(e) => Response::refused(Refusal::Unavailable, e.to_string()),
            }
        }
        Request::Push { .. } | Request::PushResume { .. } | Request::PushLanes { .. } => {
            push(agent, config, lanes, request, recv).await
        }
        Request::FailbackPull { .. } | Request::FailbackCommit { .. } => {
            Response::refused(Refusal::BadRequest, "failback is answered on its own path")
        }
    }
}

/// A push: its lanes gathered, then staged and merged on a blocking thread; the answer only
/// after the commit.
async fn push(
    agent: &str,
    config: &Config,
    lanes: &Lanes,
    request: Request,
    recv: quinn::RecvStream,
) -> Response {
    let root = config.store.join(agent);
    let (disk, resume, count) = match request {
        Request::PushResume {
            disk,
            resumes,
            next_offset,
        } => (disk, Some((resumes, next_offset)), 1),
        Request::Push { disk } => (disk, None, 1),
        Request::PushLanes {
            disk,
            lanes,
            resumes,
            next_offset,
        } => (disk, resumes.map(|r| (r, next_offset)), lanes),
        _ => unreachable!("matched above"),
    };
    if let Err(e) = store::validate_name(&disk) {
        return Response::refused(Refusal::BadRequest, describe(&e));
    }
    if !(1..=wire::LANES_MAX).contains(&count) {
        return Response::refused(
            Refusal::BadRequest,
            format!("a push over {count} lanes (1 to {})", wire::LANES_MAX),
        );
    }
    let mut streams = vec![];
    let push = u64::from(recv.id());
    streams.push(recv);
    match lanes.take(push, count).await {
        Ok(extra) => streams.extend(extra),
        Err(why) => return Response::refused(Refusal::BadRequest, why),
    }
    let retention = config.retention(&disk);
    let handle = tokio::runtime::Handle::current();
    let span = info_span!("push", %disk);
    let result = tokio::task::spawn_blocking(move || {
        let _guard = span.enter();
        std::fs::create_dir_all(&root).map_err(|source| StoreError::Io {
            doing: "creating the agent's store".into(),
            source,
        })?;
        // A push waits for a merge in progress to finish, then continues from it.
        let (mut s, _) = DiskStore::open_waiting(&root, &disk)?;
        let input = ChunkReader {
            lanes: streams,
            turn: 0,
            left: 0,
            done: false,
            handle,
        };
        let count_only = retention.tiers.is_empty().then_some(retention.keep);
        let result = match resume {
            None => s.ingest(input, retention, |input| input.end()),
            Some((resumes, next_offset)) => {
                s.ingest_resume(input, resumes, next_offset, retention, |input| input.end())
            }
        };
        if let (Ok(Ingested::Committed { .. }), Some(keep)) = (&result, count_only) {
            warn_if_history_is_short(&root, &disk, s.points(), keep);
        }
        result
    })
    .await;
    match result {
        Ok(result) => {
            if let Ok(Ingested::Committed { point, .. }) = &result {
                info!(%agent, point = %point.change_id, "committed");
            }
            push_answer(result)
        }
        Err(e) => Response::refused(Refusal::Unavailable, e.to_string()),
    }
}

/// History shorter than this under count-only retention earns a warning.
const HISTORY_SHORT_MS: u64 = 3_600_000;

/// Warns, once per disk and process, when count-only retention (no tiers) meets pushes so
/// frequent that the kept points span less than an hour: a `--keep 30` under one-second
/// cuts holds half a minute of history. (The newest point of each consistency level is kept
/// anyway; the rest of the history is what goes.)
fn warn_if_history_is_short(
    root: &std::path::Path,
    disk: &str,
    points: &[store::Point],
    keep: usize,
) {
    static WARNED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    let time = |p: &store::Point| p.cut_unix_ms.unwrap_or(p.committed_unix_ms);
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return;
    };
    let span_ms = time(last).saturating_sub(time(first));
    if points.len() < keep || span_ms >= HISTORY_SHORT_MS {
        return;
    }
    let key = root.join(disk);
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if warned.contains(&key) {
        return;
    }
    warned.push(key);
    warn!(
        %disk,
        keep,
        history_s = span_ms / 1000,
        "retention by count alone keeps only {keep} points, {} s of history at this push rate; \
         add --tiers (e.g. 1h:all,24h:1h,30d:1d) to keep older points by age",
        span_ms / 1000
    );
}

/// The answer to a push, from what the store made of it: a commit (or the note that the
/// point was committed before) only when the point is durable, else the refusal and why.
/// `ctk-sim` answers its simulated pushes with it too.
pub fn push_answer(result: Result<Ingested, StoreError>) -> Response {
    match result {
        Ok(Ingested::Committed { point, .. }) => Response::Committed {
            change_id: point.change_id,
            already: false,
        },
        Ok(Ingested::AlreadyCommitted { change_id }) => Response::Committed {
            change_id,
            already: true,
        },
        Err(e) => Response::refused(refusal(&e), describe(&e)),
    }
}

/// The delta of a push, read from its chunks on the push's lanes (one stream, or several
/// taking turns chunk by chunk) on a blocking thread: the bytes of each chunk, then end of
/// input at the zero-length chunk. A chunk length over `CHUNK_MAX` is refused before
/// anything is read into memory.
struct ChunkReader {
    /// Lane 0 is the push's own stream, which also carries its end frame.
    lanes: Vec<quinn::RecvStream>,
    /// The lane the current (or next) chunk is on.
    turn: usize,
    left: usize,
    done: bool,
    handle: tokio::runtime::Handle,
}

impl ChunkReader {
    /// The next chunk's length on the lane whose turn it is.
    fn chunk_len(&mut self) -> std::io::Result<usize> {
        let mut len = [0u8; 4];
        let lane = self.turn;
        self.handle
            .block_on(self.lanes[lane].read_exact(&mut len))
            .map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the delta's chunks ended early on lane {lane}: {e}"),
                )
            })?;
        Ok(u32::from_le_bytes(len) as usize)
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let len = self.chunk_len()?;
            if len == 0 {
                self.done = true;
                return Ok(0);
            }
            if len > wire::CHUNK_MAX {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("a delta chunk of {len} bytes (at most {})", wire::CHUNK_MAX),
                ));
            }
            self.left = len;
        }
        let n = buf.len().min(self.left);
        match self
            .handle
            .block_on(self.lanes[self.turn].read(&mut buf[..n]))
        {
            Ok(Some(k)) => {
                self.left -= k;
                if self.left == 0 {
                    self.turn = (self.turn + 1) % self.lanes.len();
                }
                Ok(k)
            }
            Ok(None) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the agent ended the stream inside a delta chunk",
            )),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

impl ChunkReader {
    /// After the delta: the push's end frame, as the point's metadata.
    fn end(mut self) -> Result<store::PointMeta, StoreError> {
        let bad = |why: String| StoreError::Protocol(why);
        if !self.done {
            return Err(bad("the delta's chunks go on past its trailer".into()));
        }
        // Every other lane ends where the delta did.
        for _ in 1..self.lanes.len() {
            self.turn = (self.turn + 1) % self.lanes.len();
            let len = self
                .chunk_len()
                .map_err(|e| bad(format!("the end of lane {}: {e}", self.turn)))?;
            if len != 0 {
                return Err(bad(format!(
                    "lane {} goes on past the delta's trailer",
                    self.turn
                )));
            }
        }
        let frame = self
            .handle
            .block_on(ctk_net::read_frame(&mut self.lanes[0]))
            .map_err(|e| bad(format!("the push's end frame: {e}")))?;
        let end =
            wire::PushEnd::decode(&frame).map_err(|e| bad(format!("the push's end frame: {e}")))?;
        Ok(store::PointMeta {
            cut_unix_ms: Some(end.cut_unix_ms),
            consistency: Some(end.consistency),
            image_digest: end.image_digest.map(ImageDigest),
        })
    }
}
