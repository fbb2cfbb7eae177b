//! NBD transmission: requests read, run against the protected disk and answered, several
//! at once. The reader waits for a free slot and payload room before each request; payload
//! memory comes from the connection's reserve or the agent's shared pool (`crate::limits`):
//! a WRITE's from when its data is read until it is written, a READ's from when its buffer
//! is filled until its reply is sent.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use super::handshake::{MetaContext, Negotiated};
use crate::disk::{DiskError, ProtectedDisk};
use crate::limits::{NBD_CONNECTION_KIB_MAX, NBD_INFLIGHT_MAX, NBD_RESERVE_KIB};
use crate::nbd::{self, Request};
use crate::server::Agent;

/// A request as read off the wire, with its payload (WRITE only) and the room it holds.
struct Incoming {
    req: Request,
    payload: Vec<u8>,
    /// A WRITE longer than the maximum: its payload was discarded, the reply is an error.
    oversized: bool,
    /// Its slot and its share of the connection's payload bound, until the reply is out.
    room: Vec<OwnedSemaphorePermit>,
    /// The memory its payload takes (a WRITE's), until the payload is written.
    memory: Option<OwnedSemaphorePermit>,
}

/// Where a connection's payload memory comes from: its own reserve while that has room,
/// else the agent's shared pool (waiting for room there).
#[derive(Clone)]
struct Memory {
    reserve: Arc<Semaphore>,
    shared: Arc<Semaphore>,
}

impl Memory {
    async fn take(&self, kib: u32) -> Result<OwnedSemaphorePermit> {
        if let Ok(p) = self.reserve.clone().try_acquire_many_owned(kib) {
            return Ok(p);
        }
        Ok(self.shared.clone().acquire_many_owned(kib).await?)
    }
}

/// The KiB of payload memory a READ or WRITE of `length` bytes takes.
fn payload_kib(req: &Request) -> u32 {
    match req.kind {
        nbd::CMD_WRITE | nbd::CMD_READ if req.length <= nbd::PAYLOAD_MAX => {
            req.length.div_ceil(1024)
        }
        _ => 0,
    }
}

/// Reads requests and hands them over until DISC or an error (also handed over). A WRITE's
/// payload follows its header whatever we think of it, so it is read (or discarded) here to
/// keep the stream in step. Waits for a free slot and payload room before each request.
async fn read_requests<R: AsyncRead + Unpin>(
    r: &mut R,
    to: tokio::sync::mpsc::Sender<Result<Incoming>>,
    slots: Arc<Semaphore>,
    kib: Arc<Semaphore>,
    memory: Memory,
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
            let mut taken = None;
            let held = payload_kib(&req);
            if held > 0 {
                room.push(kib.clone().acquire_many_owned(held).await?);
            }
            if req.kind == nbd::CMD_WRITE {
                if req.length > nbd::PAYLOAD_MAX {
                    let mut rest = (&mut *r).take(req.length as u64);
                    tokio::io::copy(&mut rest, &mut tokio::io::sink()).await?;
                    oversized = true;
                } else {
                    taken = Some(memory.take(held).await?);
                    payload.resize(req.length as usize, 0);
                    r.read_exact(&mut payload).await?;
                }
            }
            Ok(Incoming {
                req,
                payload,
                oversized,
                room,
                memory: taken,
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
/// `NBD_INFLIGHT_MAX` at once, and are answered as they complete, in any order, as NBD allows;
/// so one slow write does not stall the queue behind it. The rest run inline.
/// FLUSH is correct under this: it syncs every write completed before it, which includes
/// every write already answered.
pub(super) async fn transmission<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    agent: &Agent,
    negotiated: Negotiated,
    r: &mut R,
    w: &mut W,
) -> Result<()> {
    let session = Session {
        disk: negotiated.disk,
        structured: negotiated.structured,
        contexts: Arc::new(negotiated.contexts),
    };
    let slots = Arc::new(Semaphore::new(NBD_INFLIGHT_MAX));
    let kib = Arc::new(Semaphore::new(NBD_CONNECTION_KIB_MAX as usize));
    let memory = Memory {
        reserve: Arc::new(Semaphore::new(NBD_RESERVE_KIB as usize)),
        shared: agent.nbd_memory.clone(),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(NBD_INFLIGHT_MAX);
    let reader = async {
        read_requests(r, tx, slots, kib, memory.clone()).await;
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
                    // A WRITE's memory goes as soon as it is written; a READ's buffer is
                    // taken here and held until its reply is out. (Never wait for memory
                    // while holding memory only this loop can give back: no cycle.)
                    let mut memory_held = incoming.memory;
                    if req.kind == nbd::CMD_READ && payload_kib(&req) > 0 {
                        memory_held = Some(memory.take(payload_kib(&req)).await?);
                    }
                    if may_block(&session.disk, &req) {
                        let session = session.clone();
                        running.spawn_blocking(move || {
                            let reply = execute(&session, req, payload);
                            drop(memory_held);
                            (reply, room)
                        });
                    } else {
                        // Most requests finish in microseconds (the page cache, a live
                        // intent): inline is cheaper than a hand-off to another thread.
                        let reply = tokio::task::block_in_place(|| execute(&session, req, payload));
                        w.write_all(&reply).await?;
                        w.flush().await?;
                        drop(memory_held);
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
        disk,
        structured,
        contexts,
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
            let head = nbd::read_reply_head(structured, cookie, offset, length);
            let at = head.len();
            let mut out = head;
            out.resize(at + length as usize, 0);
            match disk.read(offset, &mut out[at..]) {
                Ok(()) => return out,
                Err(e) => Err((e, false)),
            }
        }
        nbd::CMD_BLOCK_STATUS => {
            return super::block_status::answer(disk, contexts, structured, req);
        }
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
            error_bytes(structured, cookie, errno(&e, is_write), &e.to_string())
        }
    }
}

/// A failed request's reply (`nbd::error_reply`).
pub(super) fn error_bytes(structured: bool, cookie: u64, error: u32, why: &str) -> Vec<u8> {
    nbd::error_reply(structured, cookie, error, why)
}

/// The errno an NBD reply carries for a failed request.
pub(super) fn errno(e: &DiskError, is_write: bool) -> u32 {
    match e {
        DiskError::OutOfRange { .. } if is_write => nbd::ENOSPC,
        DiskError::OutOfRange { .. } => nbd::EINVAL,
        DiskError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => nbd::ENOSPC,
        DiskError::Shutdown | DiskError::FailingBack => nbd::EPERM,
        _ => nbd::EIO,
    }
}
