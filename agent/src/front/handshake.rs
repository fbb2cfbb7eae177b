//! The NBD handshake: fixed newstyle options, the export a client chooses, and the meta
//! contexts it selects (`base:allocation`, `ctk:changed:<ChangeId>`). Bounded: an option's
//! payload, the contexts one SET selects and a LIST answer all have limits (docs/nbd.md),
//! and the whole handshake has a deadline (`front::handle_connection`).

use std::sync::Arc;

use anyhow::{Result, bail};
use ctk::ChangeId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use crate::disk::ProtectedDisk;
use crate::nbd;
use crate::server::Agent;

/// A meta context a client selected: what BLOCK_STATUS reports for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum MetaContext {
    /// `base:allocation`: holes in the backing.
    Allocation,
    /// `ctk:changed:<ChangeId>`: blocks written after that cut.
    Changed(ChangeId),
}

impl MetaContext {
    pub(super) fn name(&self) -> String {
        match self {
            MetaContext::Allocation => nbd::CONTEXT_ALLOCATION.to_owned(),
            MetaContext::Changed(id) => format!("{}{id}", nbd::CONTEXT_CHANGED_PREFIX),
        }
    }
}

/// What the handshake settled on.
pub(super) struct Negotiated {
    pub(super) disk: Arc<ProtectedDisk>,
    pub(super) structured: bool,
    /// Selected meta contexts with the ids the client knows them by.
    pub(super) contexts: Vec<(u32, MetaContext)>,
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

pub(super) const TRANSMISSION_FLAGS: u16 = nbd::TFLAG_HAS_FLAGS
    | nbd::TFLAG_SEND_FLUSH
    | nbd::TFLAG_SEND_FUA
    | nbd::TFLAG_SEND_TRIM
    | nbd::TFLAG_SEND_WRITE_ZEROES
    | nbd::TFLAG_CAN_MULTI_CONN;

/// The fixed-newstyle handshake: options until EXPORT_NAME, GO or ABORT.
///
/// One piece: a loop over options with one arm each, because the options share the
/// negotiation's state (structured replies, the contexts selected for which export) and
/// their order is the protocol; the longer arms are functions of their own.
pub(super) async fn handshake<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    agent: &Agent,
    r: &mut R,
    w: &mut W,
) -> Result<Option<Negotiated>> {
    w.write_all(&nbd::greeting()).await?;
    w.flush().await?;
    let no_zeroes = nbd::client_flags(r.read_u32().await?).map_err(anyhow::Error::msg)?;
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
            nbd::OPT_LIST => list_exports(agent, w, &data).await?,
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
                        info_replies(w, option, disk).await?;
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
                meta_contexts(agent, w, option, &data, structured, &mut selected).await?
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

/// OPT_LIST: every export's name.
async fn list_exports<W: AsyncWrite + Unpin>(agent: &Agent, w: &mut W, data: &[u8]) -> Result<()> {
    let option = nbd::OPT_LIST;
    if !data.is_empty() {
        w.write_all(&nbd::option_error(
            option,
            nbd::REP_ERR_INVALID,
            "LIST takes no data",
        ))
        .await?;
        return Ok(());
    }
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
    Ok(())
}

/// The replies to OPT_INFO or OPT_GO for an export: its size and flags, its name, its
/// block sizes, then the ACK.
async fn info_replies<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    disk: &ProtectedDisk,
) -> Result<()> {
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
    Ok(())
}

/// OPT_LIST_META_CONTEXT and OPT_SET_META_CONTEXT: the contexts a query resolves to, each
/// numbered (from 1 for SET, 0 for LIST as the spec asks); a SET remembers them for the
/// export it named, a failed SET leaves nothing selected.
async fn meta_contexts<W: AsyncWrite + Unpin>(
    agent: &Agent,
    w: &mut W,
    option: u32,
    data: &[u8],
    structured: bool,
    selected: &mut Option<(String, Vec<(u32, MetaContext)>)>,
) -> Result<()> {
    let set = option == nbd::OPT_SET_META_CONTEXT;
    let resolved = if set && !structured {
        Err((
            nbd::REP_ERR_INVALID,
            "negotiate structured replies first".to_owned(),
        ))
    } else {
        nbd::parse_meta_request(data)
            .map_err(|why| (nbd::REP_ERR_INVALID, why.to_owned()))
            .and_then(|req| match agent.disk(&req.export) {
                None => Err((
                    nbd::REP_ERR_UNKNOWN,
                    format!("no export named {:?}", req.export),
                )),
                Some(disk) => {
                    resolve_queries(disk, &req.queries, !set).map(|c| (disk.name.clone(), c))
                }
            })
    };
    match resolved {
        Err((code, why)) => {
            if set {
                // A failed SET leaves nothing selected.
                *selected = None;
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
                *selected = Some((export, numbered));
            }
        }
    }
    Ok(())
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
