//! The daemon: NBD listeners (Unix socket and TCP), the control socket, and shutdown.
//!
//! Each NBD connection is one task: handshake, then requests handled in order. Disk I/O is
//! synchronous (`block_in_place`), so a request's reply is sent only after its write,
//! flush or tracking step has completed. A misbehaving client ends only its own connection.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ctk::{ChangeId, Since};
use serde_json::{Value, json};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::{TcpListener, UnixListener};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::disk::{DiskError, ExportPlan, ProtectedDisk};
use crate::nbd::{self, Request};
use crate::pipeline::{self, Consistency};

pub struct Agent {
    pub disks: Vec<Arc<ProtectedDisk>>,
    pub zstd_level: i32,
}

impl Agent {
    fn disk(&self, name: &str) -> Option<&Arc<ProtectedDisk>> {
        // The empty name is the default export: the first disk.
        if name.is_empty() {
            self.disks.first()
        } else {
            self.disks.iter().find(|d| d.name == name)
        }
    }
}

/// Where the NBD front listens.
#[derive(Clone, Debug)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/ctk-agent/nbd.sock".into());
            }
            Ok(Listen::Unix(path.into()))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse()
                .map(Listen::Tcp)
                .map_err(|_| format!("{addr:?} is not an address such as 127.0.0.1:10809"))
        } else {
            Err(format!("{s:?}: use unix:PATH or tcp:ADDRESS:PORT"))
        }
    }
}

fn bind_unix(path: &std::path::Path) -> Result<UnixListener> {
    let listener = crate::owner::bind_unix(path)?;
    listener.set_nonblocking(true)?;
    Ok(UnixListener::from_std(listener)?)
}

/// Runs the daemon until SIGINT or SIGTERM, then closes every tracker cleanly.
pub async fn run(agent: Arc<Agent>, listens: Vec<Listen>, control: PathBuf) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    run_until(agent, listens, control, stop, true).await
}

/// Runs the daemon until `stop` completes, then closes every tracker cleanly.
pub async fn run_until(
    agent: Arc<Agent>,
    listens: Vec<Listen>,
    control: PathBuf,
    stop: impl std::future::Future<Output = ()>,
    announce: bool,
) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for listen in listens {
        match listen {
            Listen::Unix(path) => {
                let listener = bind_unix(&path)?;
                info!(socket = %path.display(), "NBD listening");
                let agent = agent.clone();
                tasks.spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((stream, _)) => {
                                spawn_connection(agent.clone(), stream, "unix".into())
                            }
                            Err(e) => warn!(error = %e, "accept failed"),
                        }
                    }
                });
            }
            Listen::Tcp(addr) => {
                if !addr.ip().is_loopback() {
                    warn!(%addr, "NBD has no authentication: listening beyond loopback exposes the disks");
                }
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                info!(%addr, "NBD listening");
                let agent = agent.clone();
                tasks.spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((stream, peer)) => {
                                let _ = stream.set_nodelay(true);
                                spawn_connection(agent.clone(), stream, peer.to_string())
                            }
                            Err(e) => warn!(error = %e, "accept failed"),
                        }
                    }
                });
            }
        }
    }
    let control_listener = bind_unix(&control)?;
    // Only the owner may cut or export.
    std::fs::set_permissions(
        &control,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    info!(socket = %control.display(), "control socket listening");
    let control_agent = agent.clone();
    tasks.spawn(async move {
        loop {
            if let Ok((stream, _)) = control_listener.accept().await {
                let agent = control_agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_control(agent, stream).await {
                        debug!(error = %e, "control connection ended");
                    }
                });
            }
        }
    });
    // Tell whoever started us that we are ready (tests and scripts wait for this line).
    if announce {
        println!("ctk-agent ready: control {}", control.display());
    }

    stop.await;
    info!("shutting down");
    tasks.abort_all();
    for disk in &agent.disks {
        match tokio::task::block_in_place(|| disk.close()) {
            Ok(()) => info!(disk = %disk.name, "change journal closed cleanly"),
            Err(e) => {
                warn!(disk = %disk.name, error = %e, "change journal left unclean; the next start recovers")
            }
        }
    }
    let _ = std::fs::remove_file(&control);
    Ok(())
}

fn spawn_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    agent: Arc<Agent>,
    stream: S,
    peer: String,
) {
    let span = info_span!("nbd", %peer);
    tokio::spawn(
        async move {
            match handle_connection(agent, stream).await {
                Ok(()) => debug!("connection closed"),
                Err(e) => info!(error = %e, "connection ended"),
            }
        }
        .instrument(span),
    );
}

/// A meta context a client selected: what BLOCK_STATUS reports for it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum MetaContext {
    /// `base:allocation`: holes in the backing.
    Allocation,
    /// `ctk:changed:<ChangeId>`: blocks written after that cut.
    Changed(ChangeId),
}

impl MetaContext {
    fn name(&self) -> String {
        match self {
            MetaContext::Allocation => nbd::CONTEXT_ALLOCATION.to_owned(),
            MetaContext::Changed(id) => format!("{}{id}", nbd::CONTEXT_CHANGED_PREFIX),
        }
    }
}

/// What the handshake settled on.
struct Negotiated {
    disk: Arc<ProtectedDisk>,
    structured: bool,
    /// Selected meta contexts with the ids the client knows them by.
    contexts: Vec<(u32, MetaContext)>,
}

/// Resolves meta context queries against a disk: the distinct contexts they name, in order.
/// `list` is NBD_OPT_LIST_META_CONTEXT, where a namespace alone (`base:`, `ctk:`) lists what
/// is there and no query at all lists everything. A query in ctk's namespace that does not
/// parse is an error (the spec's "syntactically invalid"); one naming a ChangeId the map
/// cannot answer selects nothing, with the reason logged. Work is bounded: a SET naming more
/// than `CONTEXTS_MAX` contexts stops at the first one too many; a LIST answer is cut at
/// `LIST_MAX`.
fn resolve_queries(
    disk: &ProtectedDisk,
    queries: &[String],
    list: bool,
) -> Result<Vec<MetaContext>, (u32, String)> {
    const LIST_MAX: usize = 64;
    let mut out: Vec<MetaContext> = Vec::new();
    let add = |out: &mut Vec<MetaContext>, c: MetaContext| -> Result<(), (u32, String)> {
        if out.contains(&c) {
            return Ok(());
        }
        if list {
            if out.len() < LIST_MAX {
                out.push(c);
            }
            return Ok(());
        }
        if out.len() == nbd::CONTEXTS_MAX {
            let why = format!("at most {} meta contexts", nbd::CONTEXTS_MAX);
            return Err((nbd::REP_ERR_TOO_BIG, why));
        }
        out.push(c);
        Ok(())
    };
    let recent = disk.recent_ids(16);
    if list && queries.is_empty() {
        add(&mut out, MetaContext::Allocation)?;
        for id in &recent {
            add(&mut out, MetaContext::Changed(*id))?;
        }
        return Ok(out);
    }
    for q in queries {
        match q.as_str() {
            "base:allocation" => add(&mut out, MetaContext::Allocation)?,
            "base:" if list => add(&mut out, MetaContext::Allocation)?,
            "ctk:" | "ctk:changed:" if list => {
                for id in &recent {
                    add(&mut out, MetaContext::Changed(*id))?;
                }
            }
            q => {
                if let Some(id) = q.strip_prefix(nbd::CONTEXT_CHANGED_PREFIX) {
                    let id: ChangeId = id.parse().map_err(|e| {
                        let why = format!(
                            "{q:?}: {e}; use ctk:changed:<ChangeId> (see ctk-agent status)"
                        );
                        (nbd::REP_ERR_INVALID, why)
                    })?;
                    match disk.check_answerable(id) {
                        Ok(()) => add(&mut out, MetaContext::Changed(id))?,
                        Err(e) => info!(query = %q, error = %e, "meta context not selected"),
                    }
                } else if q.starts_with("ctk:") {
                    let why = format!("{q:?}: ctk offers ctk:changed:<ChangeId> only");
                    return Err((nbd::REP_ERR_INVALID, why));
                }
                // Other namespaces are not ours: they select nothing.
            }
        }
    }
    Ok(out)
}

const TRANSMISSION_FLAGS: u16 = nbd::TFLAG_HAS_FLAGS
    | nbd::TFLAG_SEND_FLUSH
    | nbd::TFLAG_SEND_FUA
    | nbd::TFLAG_SEND_TRIM
    | nbd::TFLAG_SEND_WRITE_ZEROES
    | nbd::TFLAG_CAN_MULTI_CONN;

async fn handle_connection<S: AsyncRead + AsyncWrite + Unpin>(
    agent: Arc<Agent>,
    stream: S,
) -> Result<()> {
    let (read, write) = tokio::io::split(stream);
    let mut r = BufReader::new(read);
    let mut w = BufWriter::new(write);
    let Some(negotiated) = handshake(&agent, &mut r, &mut w).await? else {
        return Ok(());
    };
    transmission(negotiated, &mut r, &mut w).await
}

async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    agent: &Agent,
    r: &mut R,
    w: &mut W,
) -> Result<Option<Negotiated>> {
    w.write_all(&nbd::NBD_MAGIC.to_be_bytes()).await?;
    w.write_all(&nbd::IHAVEOPT.to_be_bytes()).await?;
    w.write_all(&(nbd::FLAG_FIXED_NEWSTYLE | nbd::FLAG_NO_ZEROES).to_be_bytes())
        .await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(nbd::CLIENT_FLAG_FIXED_NEWSTYLE | nbd::CLIENT_FLAG_NO_ZEROES) != 0 {
        bail!("client sent unknown handshake flags {client_flags:#x}");
    }
    let no_zeroes = client_flags & nbd::CLIENT_FLAG_NO_ZEROES != 0;
    let mut structured = false;
    // The contexts of the last SET_META_CONTEXT and the export it named: GO for another
    // export drops them (the spec ties contexts to an export).
    let mut selected: Option<(String, Vec<(u32, MetaContext)>)> = None;
    loop {
        let magic = r.read_u64().await?;
        if magic != nbd::IHAVEOPT {
            bail!("bad option magic {magic:#x}");
        }
        let option = r.read_u32().await?;
        let length = r.read_u32().await?;
        if length > nbd::OPTION_LEN_MAX {
            // Discard it without holding it, then refuse.
            tokio::io::copy(&mut (&mut *r).take(length as u64), &mut tokio::io::sink()).await?;
            w.write_all(&nbd::option_error(
                option,
                nbd::REP_ERR_TOO_BIG,
                "option payload too large",
            ))
            .await?;
            w.flush().await?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        r.read_exact(&mut data).await?;
        match option {
            nbd::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                // This old option has no error reply: an unknown export closes the connection.
                let Some(disk) = agent.disk(&name) else {
                    bail!("unknown export {name:?}")
                };
                w.write_all(&disk.size().to_be_bytes()).await?;
                w.write_all(&TRANSMISSION_FLAGS.to_be_bytes()).await?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).await?;
                }
                w.flush().await?;
                let contexts = take_contexts(&mut selected, &disk.name, &name);
                return Ok(Some(Negotiated {
                    disk: disk.clone(),
                    structured,
                    contexts,
                }));
            }
            nbd::OPT_ABORT => {
                w.write_all(&nbd::option_reply(option, nbd::REP_ACK, &[]))
                    .await?;
                w.flush().await?;
                return Ok(None);
            }
            nbd::OPT_LIST => {
                if !data.is_empty() {
                    w.write_all(&nbd::option_error(
                        option,
                        nbd::REP_ERR_INVALID,
                        "LIST takes no data",
                    ))
                    .await?;
                } else {
                    for disk in &agent.disks {
                        w.write_all(&nbd::option_reply(
                            option,
                            nbd::REP_SERVER,
                            &nbd::list_entry(&disk.name),
                        ))
                        .await?;
                    }
                    w.write_all(&nbd::option_reply(option, nbd::REP_ACK, &[]))
                        .await?;
                }
            }
            nbd::OPT_STARTTLS => {
                w.write_all(&nbd::option_error(
                    option,
                    nbd::REP_ERR_POLICY,
                    "TLS is not offered: use the Unix socket or loopback",
                ))
                .await?;
            }
            nbd::OPT_INFO | nbd::OPT_GO => match nbd::parse_info_request(&data) {
                Err(why) => {
                    w.write_all(&nbd::option_error(option, nbd::REP_ERR_INVALID, why))
                        .await?
                }
                Ok(request) => match agent.disk(&request.name) {
                    None => {
                        let msg = format!("no export named {:?}", request.name);
                        w.write_all(&nbd::option_error(option, nbd::REP_ERR_UNKNOWN, &msg))
                            .await?;
                    }
                    Some(disk) => {
                        w.write_all(&nbd::option_reply(
                            option,
                            nbd::REP_INFO,
                            &nbd::info_export(disk.size(), TRANSMISSION_FLAGS),
                        ))
                        .await?;
                        w.write_all(&nbd::option_reply(
                            option,
                            nbd::REP_INFO,
                            &nbd::info_name(&disk.name),
                        ))
                        .await?;
                        let block = nbd::info_block_size(1, 4096, nbd::PAYLOAD_MAX);
                        w.write_all(&nbd::option_reply(option, nbd::REP_INFO, &block))
                            .await?;
                        w.write_all(&nbd::option_reply(option, nbd::REP_ACK, &[]))
                            .await?;
                        if option == nbd::OPT_GO {
                            w.flush().await?;
                            let contexts = take_contexts(&mut selected, &disk.name, &request.name);
                            return Ok(Some(Negotiated {
                                disk: disk.clone(),
                                structured,
                                contexts,
                            }));
                        }
                    }
                },
            },
            nbd::OPT_STRUCTURED_REPLY => {
                let reply = if data.is_empty() {
                    structured = true;
                    nbd::option_reply(option, nbd::REP_ACK, &[])
                } else {
                    nbd::option_error(option, nbd::REP_ERR_INVALID, "takes no data")
                };
                w.write_all(&reply).await?;
            }
            nbd::OPT_LIST_META_CONTEXT | nbd::OPT_SET_META_CONTEXT => {
                let set = option == nbd::OPT_SET_META_CONTEXT;
                let resolved = if set && !structured {
                    Err((
                        nbd::REP_ERR_INVALID,
                        "negotiate structured replies first".to_owned(),
                    ))
                } else {
                    nbd::parse_meta_request(&data)
                        .map_err(|why| (nbd::REP_ERR_INVALID, why.to_owned()))
                        .and_then(|req| match agent.disk(&req.export) {
                            None => Err((
                                nbd::REP_ERR_UNKNOWN,
                                format!("no export named {:?}", req.export),
                            )),
                            Some(disk) => resolve_queries(disk, &req.queries, !set)
                                .map(|c| (disk.name.clone(), c)),
                        })
                };
                match resolved {
                    Err((code, why)) => {
                        if set {
                            // A failed SET leaves nothing selected.
                            selected = None;
                        }
                        w.write_all(&nbd::option_error(option, code, &why)).await?;
                    }
                    Ok((export, contexts)) => {
                        // Ids start at 1; LIST replies carry 0, as the spec asks.
                        let mut numbered = Vec::with_capacity(contexts.len());
                        for (i, context) in contexts.into_iter().enumerate() {
                            let id = if set { i as u32 + 1 } else { 0 };
                            w.write_all(&nbd::option_reply(
                                option,
                                nbd::REP_META_CONTEXT,
                                &nbd::meta_context(id, &context.name()),
                            ))
                            .await?;
                            numbered.push((id, context));
                        }
                        w.write_all(&nbd::option_reply(option, nbd::REP_ACK, &[]))
                            .await?;
                        if set {
                            selected = Some((export, numbered));
                        }
                    }
                }
            }
            _ => {
                w.write_all(&nbd::option_error(
                    option,
                    nbd::REP_ERR_UNSUP,
                    "option not supported",
                ))
                .await?;
            }
        }
        w.flush().await?;
    }
}

/// The contexts selected for the export a client finally chose: none if it selected them
/// for another one (or the empty default name resolved elsewhere).
fn take_contexts(
    selected: &mut Option<(String, Vec<(u32, MetaContext)>)>,
    disk: &str,
    asked: &str,
) -> Vec<(u32, MetaContext)> {
    match selected.take() {
        Some((export, contexts)) if export == disk => contexts,
        Some((export, _)) => {
            debug!(%export, chosen = %asked, "meta contexts were set for another export: dropped");
            Vec::new()
        }
        None => Vec::new(),
    }
}

/// Most requests of one connection handled at once.
const INFLIGHT_MAX: usize = 16;
/// Most payload bytes (WRITE data, READ buffers) one connection's requests in flight hold,
/// in KiB: the reader waits for room before it reads a payload or passes on a READ.
const INFLIGHT_KIB_MAX: u32 = 64 << 10;
const _: () = assert!(nbd::PAYLOAD_MAX / 1024 <= INFLIGHT_KIB_MAX);

/// A request as read off the wire, with its payload (WRITE only) and the room it holds.
struct Incoming {
    req: Request,
    payload: Vec<u8>,
    /// A WRITE longer than the maximum: its payload was discarded, the reply is an error.
    oversized: bool,
    room: Vec<tokio::sync::OwnedSemaphorePermit>,
}

/// Reads requests and hands them over until DISC or an error (also handed over). A WRITE's
/// payload follows its header whatever we think of it, so it is read (or discarded) here to
/// keep the stream in step. Waits for a free slot and payload room before each request.
async fn read_requests<R: AsyncRead + Unpin>(
    r: &mut R,
    to: tokio::sync::mpsc::Sender<Result<Incoming>>,
    slots: Arc<tokio::sync::Semaphore>,
    kib: Arc<tokio::sync::Semaphore>,
) {
    loop {
        let next = async {
            let slot = slots.clone().acquire_owned().await?;
            let mut header = [0u8; 28];
            r.read_exact(&mut header).await?;
            let Some(req) = nbd::parse_request(&header) else {
                bail!("bad request magic: closing")
            };
            let mut room = vec![slot];
            let mut payload = Vec::new();
            let mut oversized = false;
            let held = match req.kind {
                nbd::CMD_WRITE | nbd::CMD_READ if req.length <= nbd::PAYLOAD_MAX => {
                    req.length.div_ceil(1024)
                }
                _ => 0,
            };
            if held > 0 {
                room.push(kib.clone().acquire_many_owned(held).await?);
            }
            if req.kind == nbd::CMD_WRITE {
                if req.length > nbd::PAYLOAD_MAX {
                    let mut rest = (&mut *r).take(req.length as u64);
                    tokio::io::copy(&mut rest, &mut tokio::io::sink()).await?;
                    oversized = true;
                } else {
                    payload.resize(req.length as usize, 0);
                    r.read_exact(&mut payload).await?;
                }
            }
            Ok(Incoming {
                req,
                payload,
                oversized,
                room,
            })
        }
        .await;
        let last = match &next {
            Ok(incoming) => incoming.req.kind == nbd::CMD_DISC,
            Err(_) => true,
        };
        if to.send(next).await.is_err() || last {
            return;
        }
    }
}

/// What a connection knows while serving requests.
#[derive(Clone)]
struct Session {
    disk: Arc<ProtectedDisk>,
    structured: bool,
    contexts: Arc<Vec<(u32, MetaContext)>>,
}

/// Serves requests until DISC or the connection ends. Requests that will wait on an fsync
/// (FLUSH, FUA, a write whose intent is not durable yet) run on blocking threads, up to
/// `INFLIGHT_MAX` at once, and are answered as they complete, in any order, as NBD allows;
/// so one slow write does not stall the queue behind it. The rest run inline.
/// FLUSH is correct under this: it syncs every write completed before it, which includes
/// every write already answered.
async fn transmission<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    negotiated: Negotiated,
    r: &mut R,
    w: &mut W,
) -> Result<()> {
    let session = Session {
        disk: negotiated.disk,
        structured: negotiated.structured,
        contexts: Arc::new(negotiated.contexts),
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(INFLIGHT_MAX));
    let kib = Arc::new(tokio::sync::Semaphore::new(INFLIGHT_KIB_MAX as usize));
    let (tx, mut rx) = tokio::sync::mpsc::channel(INFLIGHT_MAX);
    let reader = async {
        read_requests(r, tx, slots, kib).await;
        // Done reading: the other side decides when the connection ends.
        std::future::pending::<()>().await
    };
    let serve = async {
        let mut running = tokio::task::JoinSet::new();
        let mut ending: Option<Result<()>> = None;
        let mut disc = false;
        loop {
            if ending.is_some() && running.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some(done) = running.join_next(), if !running.is_empty() => {
                    let (reply, room): (Vec<u8>, Vec<_>) =
                        done.context("a request's task failed")?;
                    w.write_all(&reply).await?;
                    w.flush().await?;
                    // The slot and payload room come back once the reply is out.
                    drop(room);
                }
                next = rx.recv(), if ending.is_none() => {
                    let incoming: Incoming = match next {
                        Some(Ok(incoming)) => incoming,
                        // The client is gone or broke the protocol: finish what is running.
                        Some(Err(e)) => { ending = Some(Err(e)); continue; }
                        None => { ending = Some(Ok(())); continue; }
                    };
                    let req = incoming.req;
                    if req.kind == nbd::CMD_DISC {
                        // Everything before it is answered first (the loop drains), then
                        // flushed below.
                        ending = Some(Ok(()));
                        disc = true;
                        continue;
                    }
                    if incoming.oversized {
                        let why = "write longer than the advertised maximum";
                        let reply = error_bytes(session.structured, req.cookie, nbd::EOVERFLOW, why);
                        w.write_all(&reply).await?;
                        w.flush().await?;
                        continue;
                    }
                    let room = incoming.room;
                    let payload = incoming.payload;
                    if may_block(&session.disk, &req) {
                        let session = session.clone();
                        running.spawn_blocking(move || (execute(&session, req, payload), room));
                    } else {
                        // Most requests finish in microseconds (the page cache, a live
                        // intent): inline is cheaper than a hand-off to another thread.
                        let reply = tokio::task::block_in_place(|| execute(&session, req, payload));
                        w.write_all(&reply).await?;
                        w.flush().await?;
                        drop(room);
                    }
                }
            }
        }
        if disc {
            let disk = session.disk.clone();
            let _ = tokio::task::spawn_blocking(move || disk.flush()).await;
        }
        ending.unwrap_or(Ok(()))
    };
    tokio::select! {
        result = serve => result,
        () = reader => unreachable!("the reader never ends by itself"),
    }
}

/// Will this request wait on an fsync? Those run on a thread of their own so the requests
/// behind them go on; the rest run inline.
fn may_block(disk: &ProtectedDisk, req: &Request) -> bool {
    let fua = req.flags & nbd::CMD_FLAG_FUA != 0;
    match req.kind {
        nbd::CMD_FLUSH => true,
        nbd::CMD_WRITE | nbd::CMD_TRIM | nbd::CMD_WRITE_ZEROES => {
            disk.change_would_sync(req.offset, req.length as u64, fua)
        }
        _ => false,
    }
}

/// Runs one request against the disk (blocking I/O) and returns its whole reply.
fn execute(session: &Session, req: Request, payload: Vec<u8>) -> Vec<u8> {
    let Session {
        disk, structured, ..
    } = session;
    let structured = *structured;
    let Request {
        flags,
        kind,
        cookie,
        offset,
        length,
    } = req;
    let known_flags = nbd::CMD_FLAG_FUA | nbd::CMD_FLAG_NO_HOLE | nbd::CMD_FLAG_REQ_ONE;
    if flags & !known_flags != 0 {
        return error_bytes(structured, cookie, nbd::EINVAL, "unknown command flag");
    }
    let fua = flags & nbd::CMD_FLAG_FUA != 0;
    let result = match kind {
        nbd::CMD_READ => {
            if length > nbd::PAYLOAD_MAX {
                let why = "read longer than the advertised maximum";
                return error_bytes(structured, cookie, nbd::EOVERFLOW, why);
            }
            // The reply's header and the data in one buffer, read in place.
            let head = if structured {
                let mut head = nbd::chunk_header(
                    nbd::REPLY_FLAG_DONE,
                    nbd::REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    8 + length,
                )
                .to_vec();
                head.extend_from_slice(&offset.to_be_bytes());
                head
            } else {
                nbd::simple_reply(0, cookie).to_vec()
            };
            let at = head.len();
            let mut out = head;
            out.resize(at + length as usize, 0);
            match disk.read(offset, &mut out[at..]) {
                Ok(()) => return out,
                Err(e) => Err((e, false)),
            }
        }
        nbd::CMD_BLOCK_STATUS => return block_status(session, req),
        nbd::CMD_WRITE => disk.write(offset, &payload, fua).map_err(|e| (e, true)),
        nbd::CMD_FLUSH => disk.flush().map_err(|e| (e, true)),
        nbd::CMD_TRIM => disk.trim(offset, length as u64).map_err(|e| (e, true)),
        nbd::CMD_WRITE_ZEROES => {
            let may_punch = flags & nbd::CMD_FLAG_NO_HOLE == 0;
            disk.write_zeroes(offset, length as u64, may_punch, fua)
                .map_err(|e| (e, true))
        }
        _ => return error_bytes(structured, cookie, nbd::EINVAL, "unknown command"),
    };
    match result {
        Ok(()) => nbd::simple_reply(0, cookie).to_vec(),
        Err((e, is_write)) => {
            debug!(error = %e, kind, offset, length, "request failed");
            error_bytes(structured, cookie, e.errno(is_write), &e.to_string())
        }
    }
}

/// Answers NBD_CMD_BLOCK_STATUS: one chunk per selected meta context, the last one final.
fn block_status(session: &Session, req: Request) -> Vec<u8> {
    let Session {
        disk,
        structured,
        contexts,
    } = session;
    let answer = if !*structured || contexts.is_empty() {
        Err((nbd::EINVAL, "no meta context was negotiated".to_string()))
    } else if req.length == 0 {
        Err((nbd::EINVAL, "BLOCK_STATUS of zero bytes".to_string()))
    } else {
        let one = req.flags & nbd::CMD_FLAG_REQ_ONE != 0;
        let max = if one { 1 } else { nbd::DESCRIPTORS_MAX };
        contexts
            .iter()
            .map(|(id, context)| {
                let runs = match context {
                    MetaContext::Allocation => {
                        disk.allocation_runs(req.offset, req.length as u64, max + 1)
                    }
                    MetaContext::Changed(since) => {
                        disk.changed_runs(*since, req.offset, req.length as u64, max + 1)
                    }
                };
                runs.map(|runs| (*id, nbd::descriptors(runs, max)))
                    .map_err(|e| (e.errno(false), format!("{}: {e}", context.name())))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    match answer {
        Ok(chunks) => {
            let last = chunks.len() - 1;
            let mut out = Vec::new();
            for (i, (id, runs)) in chunks.iter().enumerate() {
                out.extend_from_slice(&nbd::block_status_chunk(req.cookie, i == last, *id, runs));
            }
            out
        }
        Err((errno, why)) => {
            debug!(%why, "BLOCK_STATUS refused");
            error_bytes(*structured, req.cookie, errno, &why)
        }
    }
}

/// A failed request's reply: an error chunk with a message once structured replies are on
/// (required for READ, and it tells the client why), a simple reply otherwise.
fn error_bytes(structured: bool, cookie: u64, error: u32, why: &str) -> Vec<u8> {
    debug_assert!(error != 0);
    if structured {
        nbd::error_chunk(cookie, error, why)
    } else {
        nbd::simple_reply(error, cookie).to_vec()
    }
}

// ---- control socket: one JSON object per line each way ----

/// Longest control request line.
const CONTROL_LINE_MAX: u64 = 64 * 1024;
/// How long an export waits for one already running on the same disk (a killed
/// replication's export finishes on its own) before it is refused as busy.
const EXPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

async fn serve_control(agent: Arc<Agent>, stream: tokio::net::UnixStream) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(u64::MAX));
    loop {
        let mut line = String::new();
        let n = (&mut lines)
            .take(CONTROL_LINE_MAX)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let response = if !line.ends_with('\n') && n as u64 >= CONTROL_LINE_MAX {
            json!({"ok": false, "error": "request line too long"})
        } else {
            let agent = agent.clone();
            tokio::task::block_in_place(|| match control_request(&agent, &line) {
                Ok(v) => v,
                Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
            })
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if response["error"] == "request line too long" {
            return Ok(());
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn parse_since(v: &Value) -> Result<Since> {
    match v.as_str() {
        Some("all") => Ok(Since::All),
        Some(text) => Ok(Since::Id(text.parse::<ChangeId>()?)),
        None => bail!("\"since\" must be a ChangeId or \"all\""),
    }
}

fn control_request(agent: &Agent, line: &str) -> Result<Value> {
    let request: Value = serde_json::from_str(line).context("request is not JSON")?;
    let cmd = request["cmd"].as_str().context("request has no \"cmd\"")?;
    if cmd == "status" {
        return Ok(
            json!({"ok": true, "disks": agent.disks.iter().map(|d| d.status()).collect::<Vec<_>>()}),
        );
    }
    let name = request["disk"].as_str().unwrap_or("");
    let disk = match (name, agent.disks.len()) {
        ("", 1) => &agent.disks[0],
        ("", _) => bail!("several disks are protected: name one with \"disk\""),
        (n, _) => agent
            .disk(n)
            .with_context(|| format!("no disk named {n:?}"))?,
    };
    let want = match request["consistency"].as_str() {
        None if !disk.policy.can_quiesce() => Consistency::Crash,
        None => Consistency::Application,
        Some("application") if !disk.policy.can_quiesce() => bail!(
            "disk {:?} has no pre_freeze hook and no freeze target, so no cut of it can be \
             application-consistent: configure [disk.cut] for it, or ask for a crash-consistent \
             cut",
            disk.name
        ),
        Some("application") => Consistency::Application,
        Some("crash") => Consistency::Crash,
        Some(other) => bail!("consistency {other:?}: use \"crash\" or \"application\""),
    };
    match cmd {
        "unchanged" => {
            // Would a cut now capture nothing since `since`? Only asked for crash cuts: an
            // application cut may write as it quiesces, and its label is itself news.
            let since = parse_since(&request["since"])?;
            let Since::Id(since) = since else {
                bail!("\"unchanged\" needs a ChangeId in \"since\"")
            };
            let unchanged = want == Consistency::Crash && disk.unchanged_since(since)?;
            Ok(json!({
                "ok": true, "disk": disk.name, "since": since.to_string(),
                "unchanged": unchanged, "as_of_unix_ms": unix_ms(),
            }))
        }
        "cut" => {
            let report = pipeline::cut(disk, &disk.policy, want, |_| Ok(Value::Null))?;
            let mut answer = report.to_json();
            answer["ok"] = json!(true);
            answer["disk"] = json!(disk.name);
            Ok(answer)
        }
        "changed" => {
            let since = parse_since(&request["since"])?;
            let upto = match request["to"].as_str() {
                Some(t) => Some(t.parse::<ChangeId>()?),
                None => None,
            };
            let (upto, extents) = disk.changed(since, upto)?;
            let bytes: u64 = extents.iter().map(|e| e.length).sum();
            Ok(json!({
                "ok": true, "disk": disk.name, "to": upto.to_string(), "changed_bytes": bytes,
                "extents": extents.iter().map(|e| json!([e.offset, e.length])).collect::<Vec<_>>(),
            }))
        }
        "answerable" => {
            // Can this agent export the changes since that point? If not (another generation
            // after a journal loss, compacted away, unknown), a replication resyncs.
            let since = parse_since(&request["since"])?;
            let (answerable, why) = match disk.changed(since, None) {
                Ok(_) => (true, None),
                Err(DiskError::Tracker(ctk::TrackerError::Query(e))) => {
                    (false, Some(e.to_string()))
                }
                Err(e) => return Err(e.into()),
            };
            Ok(json!({"ok": true, "disk": disk.name, "answerable": answerable, "why": why}))
        }
        "export" => {
            let plan = match request["since"].as_str() {
                Some("compare") => {
                    let base = request["base"]
                        .as_str()
                        .context("a compare export needs the receiver's point as \"base\"")?
                        .parse::<ChangeId>()?;
                    let unit = request["unit"]
                        .as_u64()
                        .and_then(|u| u32::try_from(u).ok())
                        .context("a compare export needs a \"unit\" in bytes")?;
                    ctk::digest::unit_count(disk.size(), unit).map_err(anyhow::Error::msg)?;
                    let theirs = request["digests"]
                        .as_str()
                        .map(std::path::PathBuf::from)
                        .filter(|p| p.is_absolute())
                        .context("a compare export needs an absolute \"digests\" path")?;
                    ExportPlan::Compare { base, unit, theirs }
                }
                _ if request["resume"].is_object() => {
                    let r = &request["resume"];
                    let prior = r["prior"]
                        .as_str()
                        .context("a resumed export needs \"resume\".\"prior\", a ChangeId")?
                        .parse::<ChangeId>()?;
                    let next_offset = r["next_offset"]
                        .as_u64()
                        .context("a resumed export needs \"resume\".\"next_offset\"")?;
                    // The cut-off push's cut must be one this journal can still answer.
                    disk.changed(Since::Id(prior), None)?;
                    ExportPlan::Resume {
                        since: parse_since(&request["since"])?,
                        prior,
                        next_offset,
                    }
                }
                _ => ExportPlan::Changed(parse_since(&request["since"])?),
            };
            let path = request["path"]
                .as_str()
                .context("export needs an absolute \"path\"")?;
            let path = std::path::Path::new(path);
            if !path.is_absolute() {
                bail!(
                    "export path {path:?} must be absolute (the daemon's working directory is not yours)"
                );
            }
            let leaves = match request["leaves"].as_str() {
                Some(p) if std::path::Path::new(p).is_absolute() => Some(std::path::Path::new(p)),
                Some(p) => bail!("export leaves path {p:?} must be absolute"),
                None => None,
            };
            // Refuse a bad `since` before cutting, so it leaves no empty cut behind.
            if let ExportPlan::Changed(since) | ExportPlan::Resume { since, .. } = plan {
                disk.changed(since, None)?;
            }
            disk.wait_export_idle(EXPORT_WAIT)?;
            let cut_unix_ms = unix_ms();
            // The snapshot is taken inside the hold; NBD writes and the filesystems are
            // released before the data is read, and copy-on-write keeps it as of the cut.
            let mut began = false;
            let report = pipeline::cut(disk, &disk.policy, want, |to| {
                disk.begin_snapshot(&plan, to)?;
                began = true;
                Ok(Value::Null)
            });
            // A cut that failed after this export's snapshot began leaves it behind; one
            // refused as busy must not touch the running export's snapshot.
            let report = report.inspect_err(|_| {
                if began {
                    disk.abort_snapshot()
                }
            })?;
            let (changed, s, peak) =
                disk.export_snapshot(&plan, report.change_id, path, leaves, agent.zstd_level)?;
            let mut report = report;
            report.inside = json!({
                "changed_bytes": changed, "data_bytes": s.data_bytes, "zero_bytes": s.zero_bytes,
                "delta_bytes": s.stream_bytes, "records": s.records, "cow_peak_bytes": peak,
            });
            info!(disk = %disk.name, to = %report.change_id, "exported");
            let mut answer = report.to_json();
            for (k, v) in report.inside.as_object().into_iter().flatten() {
                answer[k] = v.clone();
            }
            answer["ok"] = json!(true);
            answer["disk"] = json!(disk.name);
            answer["to"] = json!(report.change_id.to_string());
            answer["path"] = json!(path.display().to_string());
            answer["cut_unix_ms"] = json!(cut_unix_ms);
            Ok(answer)
        }
        "cursor" => {
            let op = request["op"].as_str().unwrap_or("");
            if !["register", "advance", "drop"].contains(&op) {
                bail!("cursor \"op\" must be register, advance or drop");
            }
            let name = request["name"]
                .as_str()
                .context("cursor needs a \"name\"")?;
            let at = match request["at"].as_str() {
                Some(t) => Some(t.parse::<ChangeId>()?),
                None => None,
            };
            // A replication that moves its cursor says when that point was cut and how
            // fast it went, for the RPO and ETA in `status`.
            let meta = crate::disk::CursorMeta {
                cut_unix_ms: request["cut_unix_ms"].as_u64(),
                rate_bps: request["rate_bytes_per_s"].as_f64(),
                ..Default::default()
            };
            disk.cursor(op, name, at, meta)?;
            Ok(json!({"ok": true, "disk": disk.name, "op": op, "name": name}))
        }
        other => bail!(
            "unknown command {other:?}: use status, cut, changed, unchanged, answerable, export \
             or cursor"
        ),
    }
}
