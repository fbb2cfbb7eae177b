//! The NBD front: where a block's life begins. Each connection is one task: the handshake
//! (`handshake`, bounded in time), then requests (`transmission`). Disk I/O is synchronous
//! (`block_in_place` or a blocking thread), so a request's reply is sent only after its
//! write, flush or tracking step has completed. A misbehaving client ends only its own
//! connection; what any client can make the agent hold is bounded (`crate::limits`).

mod block_status;
mod handshake;
mod transmission;

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{Instrument, debug, info, info_span};

use crate::limits::REFUSAL_TIMEOUT;
use crate::nbd;
use crate::server::Agent;

/// Serves one accepted connection on a task of its own: with a permit of the listener's cap
/// the whole protocol, without one a polite refusal (at most `refusals` at once; past that
/// the connection is closed at once).
pub(crate) fn spawn_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    agent: Arc<Agent>,
    stream: S,
    peer: String,
    permit: Option<OwnedSemaphorePermit>,
    refusals: Arc<Semaphore>,
) {
    let span = info_span!("nbd", %peer);
    let Some(permit) = permit else {
        let Ok(refusing) = refusals.try_acquire_owned() else {
            debug!(parent: &span, "over the connection cap with refusals busy: closed");
            return;
        };
        let cap = agent.limits.nbd_connections;
        tokio::spawn(
            async move {
                info!(cap, "over the NBD connection cap: refused");
                let _ = tokio::time::timeout(REFUSAL_TIMEOUT, refuse(stream, cap)).await;
                drop(refusing);
            }
            .instrument(span),
        );
        return;
    };
    tokio::spawn(
        async move {
            match handle_connection(agent, stream).await {
                Ok(()) => debug!("connection closed"),
                Err(e) => info!(error = %e, "connection ended"),
            }
            drop(permit);
        }
        .instrument(span),
    );
}

async fn handle_connection<S: AsyncRead + AsyncWrite + Unpin>(
    agent: Arc<Agent>,
    stream: S,
) -> anyhow::Result<()> {
    let (read, write) = tokio::io::split(stream);
    let mut r = BufReader::new(read);
    let mut w = BufWriter::new(write);
    let timeout = agent.limits.nbd_handshake_timeout;
    let negotiated =
        match tokio::time::timeout(timeout, handshake::handshake(&agent, &mut r, &mut w)).await {
            Ok(done) => done?,
            Err(_) => anyhow::bail!("the handshake did not finish within {timeout:?}: closed"),
        };
    let Some(negotiated) = negotiated else {
        return Ok(());
    };
    transmission::transmission(&agent, negotiated, &mut r, &mut w).await
}

/// Tells a client over the connection cap why it cannot be served: the greeting, then an
/// `NBD_REP_ERR_POLICY` reply with a message to its first option (an old-style
/// `EXPORT_NAME`, which has no error reply, is simply closed).
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(stream: S, cap: usize) -> anyhow::Result<()> {
    let (mut r, mut w) = tokio::io::split(stream);
    w.write_all(&nbd::greeting()).await?;
    w.flush().await?;
    let _client_flags = r.read_u32().await?;
    let _magic = r.read_u64().await?;
    let option = r.read_u32().await?;
    let length = r.read_u32().await?;
    if option == nbd::OPT_EXPORT_NAME || length > nbd::OPTION_LEN_MAX {
        return Ok(());
    }
    tokio::io::copy(&mut (&mut r).take(length as u64), &mut tokio::io::sink()).await?;
    let why = format!(
        "the agent serves at most {cap} NBD connections at once: close another one or try again \
         later (nbd_connections_max in its configuration)"
    );
    w.write_all(&nbd::option_error(option, nbd::REP_ERR_POLICY, &why))
        .await?;
    w.flush().await?;
    Ok(())
}
