//! The fixed-newstyle handshake of an exposed point: one export, named after the disk (the
//! empty default name selects it too), read-only (or writable, a drill's overlay), with
//! `base:allocation` as its only meta context. The agent's `ctk:changed:` is not here.

use anyhow::{Result, bail};
use ctk_nbd as nbd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::store::Exposure;

/// Read-only unless `writable`; every connection sees the same bytes (one overlay).
fn transmission_flags(writable: bool) -> u16 {
    let base = nbd::TFLAG_HAS_FLAGS | nbd::TFLAG_SEND_FLUSH | nbd::TFLAG_CAN_MULTI_CONN;
    if writable {
        base | nbd::TFLAG_SEND_TRIM | nbd::TFLAG_SEND_WRITE_ZEROES | nbd::TFLAG_SEND_FUA
    } else {
        base | nbd::TFLAG_READ_ONLY
    }
}

/// What the handshake settled on.
pub(super) struct Negotiated {
    pub(super) structured: bool,
    /// The id the client knows `base:allocation` by, if it selected it.
    pub(super) allocation: Option<u32>,
}

fn is_ours(exposure: &Exposure, name: &str) -> bool {
    name.is_empty() || name == exposure.disk()
}

/// Options until EXPORT_NAME, GO or ABORT.
///
/// One piece: a loop over options with one arm each, because the options share the
/// negotiation's state (structured replies, the context selected) and their order is the
/// protocol; the longer arms are functions of their own.
pub(super) async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    exposure: &Exposure,
    writable: bool,
    r: &mut R,
    w: &mut W,
) -> Result<Option<Negotiated>> {
    let flags = transmission_flags(writable);
    w.write_all(&nbd::greeting()).await?;
    w.flush().await?;
    let no_zeroes = nbd::client_flags(r.read_u32().await?).map_err(anyhow::Error::msg)?;
    let mut structured = false;
    let mut allocation = None;
    let size = exposure.point().disk_size;
    loop {
        let magic = r.read_u64().await?;
        if magic != nbd::IHAVEOPT {
            bail!("bad option magic {magic:#x}");
        }
        let option = r.read_u32().await?;
        let length = r.read_u32().await?;
        if length > nbd::OPTION_LEN_MAX {
            tokio::io::copy(&mut (&mut *r).take(length as u64), &mut tokio::io::sink()).await?;
            let e = nbd::option_error(option, nbd::REP_ERR_TOO_BIG, "option payload too large");
            w.write_all(&e).await?;
            w.flush().await?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        r.read_exact(&mut data).await?;
        let reply = match option {
            nbd::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                // This old option has no error reply: another name closes the connection.
                if !is_ours(exposure, &name) {
                    bail!("unknown export {name:?}");
                }
                w.write_all(&size.to_be_bytes()).await?;
                w.write_all(&flags.to_be_bytes()).await?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).await?;
                }
                w.flush().await?;
                return Ok(Some(Negotiated {
                    structured,
                    allocation,
                }));
            }
            nbd::OPT_ABORT => {
                w.write_all(&nbd::option_reply(option, nbd::REP_ACK, &[]))
                    .await?;
                w.flush().await?;
                return Ok(None);
            }
            nbd::OPT_LIST => {
                let mut out = Vec::new();
                if data.is_empty() {
                    let entry = nbd::list_entry(exposure.disk());
                    out.extend(nbd::option_reply(option, nbd::REP_SERVER, &entry));
                    out.extend(nbd::option_reply(option, nbd::REP_ACK, &[]));
                } else {
                    out = nbd::option_error(option, nbd::REP_ERR_INVALID, "LIST takes no data");
                }
                out
            }
            nbd::OPT_STARTTLS => nbd::option_error(
                option,
                nbd::REP_ERR_POLICY,
                "TLS is not offered: use the Unix socket or loopback",
            ),
            nbd::OPT_INFO | nbd::OPT_GO => match nbd::parse_info_request(&data) {
                Err(why) => nbd::option_error(option, nbd::REP_ERR_INVALID, why),
                Ok(request) if !is_ours(exposure, &request.name) => {
                    let msg = format!(
                        "no export named {:?}: this one is {:?}",
                        request.name,
                        exposure.disk()
                    );
                    nbd::option_error(option, nbd::REP_ERR_UNKNOWN, &msg)
                }
                Ok(_) => {
                    w.write_all(&info_replies(exposure, flags, option)).await?;
                    if option == nbd::OPT_GO {
                        w.flush().await?;
                        return Ok(Some(Negotiated {
                            structured,
                            allocation,
                        }));
                    }
                    Vec::new()
                }
            },
            nbd::OPT_STRUCTURED_REPLY if data.is_empty() => {
                structured = true;
                nbd::option_reply(option, nbd::REP_ACK, &[])
            }
            nbd::OPT_STRUCTURED_REPLY => {
                nbd::option_error(option, nbd::REP_ERR_INVALID, "takes no data")
            }
            nbd::OPT_LIST_META_CONTEXT | nbd::OPT_SET_META_CONTEXT => {
                meta_contexts(exposure, option, &data, structured, &mut allocation)
            }
            _ => nbd::option_error(option, nbd::REP_ERR_UNSUP, "option not supported"),
        };
        w.write_all(&reply).await?;
        w.flush().await?;
    }
}

/// The replies to OPT_INFO or OPT_GO: size and flags, name, block sizes, then the ACK.
fn info_replies(exposure: &Exposure, flags: u16, option: u32) -> Vec<u8> {
    let size = exposure.point().disk_size;
    let mut out = nbd::option_reply(option, nbd::REP_INFO, &nbd::info_export(size, flags));
    out.extend(nbd::option_reply(
        option,
        nbd::REP_INFO,
        &nbd::info_name(exposure.disk()),
    ));
    let block = nbd::info_block_size(1, 4096, nbd::PAYLOAD_MAX);
    out.extend(nbd::option_reply(option, nbd::REP_INFO, &block));
    out.extend(nbd::option_reply(option, nbd::REP_ACK, &[]));
    out
}

/// OPT_LIST_META_CONTEXT and OPT_SET_META_CONTEXT: `base:allocation` is the one context (id
/// 1 once SET; LIST replies carry 0, as the spec asks). A failed SET leaves nothing selected.
fn meta_contexts(
    exposure: &Exposure,
    option: u32,
    data: &[u8],
    structured: bool,
    allocation: &mut Option<u32>,
) -> Vec<u8> {
    let set = option == nbd::OPT_SET_META_CONTEXT;
    let resolved = if set && !structured {
        Err((
            nbd::REP_ERR_INVALID,
            "negotiate structured replies first".to_owned(),
        ))
    } else {
        match nbd::parse_meta_request(data) {
            Err(why) => Err((nbd::REP_ERR_INVALID, why.to_owned())),
            Ok(req) if !is_ours(exposure, &req.export) => Err((
                nbd::REP_ERR_UNKNOWN,
                format!("no export named {:?}", req.export),
            )),
            Ok(req) if req.queries.len() > nbd::CONTEXTS_MAX => Err((
                nbd::REP_ERR_TOO_BIG,
                format!("at most {} meta contexts", nbd::CONTEXTS_MAX),
            )),
            Ok(req) => Ok(req
                .queries
                .iter()
                .any(|q| q == nbd::CONTEXT_ALLOCATION || (!set && q == "base:"))
                || (!set && req.queries.is_empty())),
        }
    };
    match resolved {
        Err((code, why)) => {
            if set {
                *allocation = None;
            }
            nbd::option_error(option, code, &why)
        }
        Ok(selected) => {
            let id = if set { 1 } else { 0 };
            let mut out = Vec::new();
            if selected {
                let context = nbd::meta_context(id, nbd::CONTEXT_ALLOCATION);
                out.extend(nbd::option_reply(option, nbd::REP_META_CONTEXT, &context));
            }
            out.extend(nbd::option_reply(option, nbd::REP_ACK, &[]));
            if set {
                *allocation = selected.then_some(id);
            }
            out
        }
    }
}
