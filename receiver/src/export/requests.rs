//! Requests to an exposed point, answered in order: READ through the connection's
//! `LiveReader` (and a drill's or a failover's overlay), BLOCK_STATUS for `base:allocation`,
//! FLUSH (a failover's overlay synced; nothing for a drill's, which is thrown away), DISC. Without an overlay anything
//! that would write is refused with EPERM, a WRITE's payload read and dropped so the stream
//! stays in step. Replies are flushed when no further request is already buffered, so a
//! client that queues many requests gets its replies in few writes.

use anyhow::{Result, bail};
use ctk_nbd::{self as nbd, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tracing::debug;

use super::Writes;
use super::handshake::Negotiated;
use super::overlay::OverlayError;
use crate::store::LiveReader;

/// What a connection reads from and writes to.
pub(super) struct Target {
    pub(super) reader: LiveReader,
    pub(super) overlay: Option<Writes>,
}

impl Target {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), OverlayError> {
        match &self.overlay {
            Some(o) => o.read_at(&mut self.reader, buf, offset),
            None => Ok(self.reader.read_at(buf, offset)?),
        }
    }
}

/// Most `base:allocation` descriptors in one reply.
const DESCRIPTORS_MAX: usize = 1024;

pub(super) async fn serve<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut target: Target,
    negotiated: Negotiated,
    r: &mut BufReader<R>,
    w: &mut W,
) -> Result<()> {
    let structured = negotiated.structured;
    loop {
        if r.buffer().is_empty() {
            w.flush().await?;
        }
        let mut header = [0u8; 28];
        match r.read_exact(&mut header).await {
            Ok(_) => {}
            // The client went away without DISC: nothing to finish for a read-only export.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let Some(req) = nbd::parse_request(&header) else {
            bail!("bad request magic: closing")
        };
        let reply = match req.kind {
            nbd::CMD_DISC => {
                w.flush().await?;
                return Ok(());
            }
            nbd::CMD_WRITE if target.overlay.is_none() || req.length > nbd::PAYLOAD_MAX => {
                // Its payload follows whatever we think of it.
                let mut rest = (&mut *r).take(req.length as u64);
                tokio::io::copy(&mut rest, &mut tokio::io::sink()).await?;
                match target.overlay {
                    None => refuse_write(structured, req.cookie),
                    Some(_) => {
                        let why = "write longer than the advertised maximum";
                        error_bytes(structured, req.cookie, nbd::EOVERFLOW, why)
                    }
                }
            }
            nbd::CMD_WRITE => {
                let mut payload = vec![0u8; req.length as usize];
                r.read_exact(&mut payload).await?;
                tokio::task::block_in_place(|| write(&mut target, structured, req, Some(&payload)))
            }
            nbd::CMD_TRIM | nbd::CMD_WRITE_ZEROES if target.overlay.is_none() => {
                refuse_write(structured, req.cookie)
            }
            nbd::CMD_TRIM | nbd::CMD_WRITE_ZEROES => {
                tokio::task::block_in_place(|| write(&mut target, structured, req, None))
            }
            _ => tokio::task::block_in_place(|| answer(&mut target, &negotiated, req)),
        };
        w.write_all(&reply).await?;
    }
}

/// A write into the overlay (zeros for TRIM and WRITE_ZEROES).
fn write(target: &mut Target, structured: bool, req: Request, data: Option<&[u8]>) -> Vec<u8> {
    let overlay = target.overlay.as_ref().expect("only with an overlay");
    let known = nbd::CMD_FLAG_FUA | nbd::CMD_FLAG_NO_HOLE;
    if req.flags & !known != 0 {
        return error_bytes(structured, req.cookie, nbd::EINVAL, "unknown command flag");
    }
    let length = req.length as u64;
    if req
        .offset
        .checked_add(length)
        .is_none_or(|end| end > target.reader.size())
    {
        let why = format!("past the end of the disk ({} bytes)", target.reader.size());
        return error_bytes(structured, req.cookie, nbd::ENOSPC, &why);
    }
    if length == 0 {
        return nbd::simple_reply(0, req.cookie).to_vec();
    }
    let fua = req.flags & nbd::CMD_FLAG_FUA != 0;
    match overlay.write_at(&mut target.reader, data, req.offset, length, fua) {
        Ok(()) => nbd::simple_reply(0, req.cookie).to_vec(),
        Err(e) => failed(structured, req.cookie, &e),
    }
}

fn refuse_write(structured: bool, cookie: u64) -> Vec<u8> {
    let why = "a restore point is read-only (a drill gives a writable overlay)";
    error_bytes(structured, cookie, nbd::EPERM, why)
}

/// READ, BLOCK_STATUS, FLUSH and the unknown: the whole reply.
fn answer(target: &mut Target, negotiated: &Negotiated, req: Request) -> Vec<u8> {
    let structured = negotiated.structured;
    let Request {
        flags,
        kind,
        cookie,
        offset,
        length,
    } = req;
    let known = nbd::CMD_FLAG_FUA | nbd::CMD_FLAG_NO_HOLE | nbd::CMD_FLAG_REQ_ONE;
    if flags & !known != 0 {
        return error_bytes(structured, cookie, nbd::EINVAL, "unknown command flag");
    }
    let in_range = offset
        .checked_add(length as u64)
        .is_some_and(|end| end <= target.reader.size());
    match kind {
        nbd::CMD_FLUSH => match target.overlay.as_ref().map_or(Ok(()), Writes::flush) {
            Ok(()) => nbd::simple_reply(0, cookie).to_vec(),
            Err(e) => failed(structured, cookie, &e),
        },
        nbd::CMD_READ if length > nbd::PAYLOAD_MAX => {
            let why = "read longer than the advertised maximum";
            error_bytes(structured, cookie, nbd::EOVERFLOW, why)
        }
        nbd::CMD_READ | nbd::CMD_BLOCK_STATUS if !in_range => {
            let why = format!("past the end of the point ({} bytes)", target.reader.size());
            error_bytes(structured, cookie, nbd::EINVAL, &why)
        }
        nbd::CMD_READ => read(target, structured, cookie, offset, length),
        nbd::CMD_BLOCK_STATUS => match negotiated.allocation {
            Some(context) if structured => {
                let one = flags & nbd::CMD_FLAG_REQ_ONE != 0;
                let end = offset + length as u64;
                let allocation = match &target.overlay {
                    // Blocks a drill wrote hold data whatever the point has there.
                    Some(o) if o.touches(offset, end) => Ok(vec![(length as u64, false)]),
                    _ => target
                        .reader
                        .allocation(offset, length as u64, DESCRIPTORS_MAX),
                };
                match allocation {
                    Ok(runs) => {
                        let status = |hole: bool| {
                            if hole {
                                nbd::STATE_HOLE | nbd::STATE_ZERO
                            } else {
                                0
                            }
                        };
                        let runs = runs.into_iter().map(|(len, hole)| (len, status(hole)));
                        let descs = nbd::descriptors(runs, if one { 1 } else { DESCRIPTORS_MAX });
                        if descs.is_empty() {
                            // A zero-length request: nothing to describe.
                            let why = "BLOCK_STATUS of zero length";
                            return error_bytes(structured, cookie, nbd::EINVAL, why);
                        }
                        nbd::block_status_chunk(cookie, true, context, &descs)
                    }
                    Err(e) => failed(structured, cookie, &OverlayError::from(e)),
                }
            }
            _ => {
                let why = "select base:allocation (SET_META_CONTEXT) first";
                error_bytes(structured, cookie, nbd::EINVAL, why)
            }
        },
        _ => error_bytes(structured, cookie, nbd::EINVAL, "unknown command"),
    }
}

/// The reply to a READ: its header and the data in one buffer, read in place.
fn read(target: &mut Target, structured: bool, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut out = nbd::read_reply_head(structured, cookie, offset, length);
    let at = out.len();
    out.resize(at + length as usize, 0);
    match target.read_at(&mut out[at..], offset) {
        Ok(()) => out,
        Err(e) => failed(structured, cookie, &e),
    }
}

fn failed(structured: bool, cookie: u64, e: &OverlayError) -> Vec<u8> {
    debug!(error = %e, "request failed");
    let errno = match e {
        OverlayError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            nbd::ENOSPC
        }
        _ => nbd::EIO,
    };
    error_bytes(structured, cookie, errno, &e.to_string())
}

fn error_bytes(structured: bool, cookie: u64, error: u32, why: &str) -> Vec<u8> {
    nbd::error_reply(structured, cookie, error, why)
}
