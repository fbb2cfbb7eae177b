//! Restore points served over NBD (`ctk-receiver expose`, `drill`): a point readable by any
//! NBD client (qemu, nbdcopy, nbdfuse + a loop device) in the time it takes to open its
//! files, with nothing copied. Each connection reads through its own `LiveReader`, so the
//! bytes stay the point's while a running `serve` merges newer points (see `store::live`).
//! Read-only, or (a drill) writable through a throwaway `Overlay` the point never sees.
//!
//! Bounded like the agent's front: at most `CONNECTIONS_MAX` clients at once (more are
//! closed at once), a handshake deadline, option payloads and reads capped by the NBD codec's
//! limits, one request in flight per connection (so one read buffer each).

mod handshake;
mod mount;
mod overlay;
mod partitions;
mod requests;
mod tracked;

pub use mount::{Leftovers, MountedPoint};
pub use overlay::{Overlay, OverlayError};
pub(crate) use overlay::{read_runs, runs};
pub use tracked::{
    BLOCK as TRACKED_BLOCK, Changes, Peek, REGION as TRACKED_REGION, Replayed, Tracked,
    blocks_since, overlay_config, replay, written,
};

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ctk_net::local::Listen;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::store::Exposure;

/// Clients served at once.
pub const CONNECTIONS_MAX: usize = 8;
/// Time a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound listener for `listen`: a stale Unix socket is replaced, a live one never.
pub async fn bind(listen: &Listen) -> Result<Listener> {
    Ok(match listen {
        Listen::Unix(path) => {
            let l = ctk_net::local::bind_unix(path)?;
            l.set_nonblocking(true)?;
            Listener::Unix(UnixListener::from_std(l)?, path.clone())
        }
        Listen::Tcp(addr) => Listener::Tcp(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?,
        ),
    })
}

pub enum Listener {
    Unix(UnixListener, std::path::PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// The NBD URI a client connects with (qemu, nbdinfo, nbdcopy all take it).
    pub fn uri(&self, export: &str) -> Result<String> {
        Ok(match self {
            Listener::Unix(_, path) => format!("nbd+unix:///{export}?socket={}", path.display()),
            Listener::Tcp(l) => format!("nbd://{}/{export}", l.local_addr()?),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What an export serves: a pinned point, and where writes go if it is writable.
#[derive(Clone)]
pub struct Served {
    pub exposure: Arc<Exposure>,
    pub overlay: Option<Writes>,
}

/// Where a writable export's writes go.
#[derive(Clone)]
pub enum Writes {
    /// A drill's throwaway overlay.
    Drill(Arc<Overlay>),
    /// A failover's tracked, durable overlay.
    Failover(Arc<Tracked>),
}

impl Writes {
    fn read_at(
        &self,
        base: &mut crate::store::LiveReader,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), OverlayError> {
        match self {
            Writes::Drill(o) => o.read_at(base, buf, offset),
            Writes::Failover(t) => t.read_at(base, buf, offset),
        }
    }

    fn write_at(
        &self,
        base: &mut crate::store::LiveReader,
        data: Option<&[u8]>,
        offset: u64,
        length: u64,
        fua: bool,
    ) -> Result<(), OverlayError> {
        match self {
            // A drill's writes are thrown away: nothing to make durable.
            Writes::Drill(o) => o.write_at(base, data, offset, length),
            Writes::Failover(t) => t.write_at(base, data, offset, length, fua),
        }
    }

    fn touches(&self, offset: u64, end: u64) -> bool {
        match self {
            Writes::Drill(o) => o.touches(offset, end),
            Writes::Failover(t) => t.touches(offset, end),
        }
    }

    fn flush(&self) -> Result<(), OverlayError> {
        match self {
            Writes::Drill(_) => Ok(()),
            Writes::Failover(t) => t.flush(),
        }
    }
}

/// Serves `served` on `listener` until `stop` completes.
pub async fn serve(
    served: Served,
    listener: Listener,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let accept = async {
        loop {
            let accepted = match &listener {
                Listener::Unix(l, _) => l.accept().await.map(|(s, _)| {
                    let s: Box<dyn Stream> = Box::new(s);
                    (s, "unix".to_owned())
                }),
                Listener::Tcp(l) => l.accept().await.map(|(s, peer)| {
                    let _ = s.set_nodelay(true);
                    let s: Box<dyn Stream> = Box::new(s);
                    (s, peer.to_string())
                }),
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let span = info_span!("nbd", %peer);
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                info!(parent: &span, cap = CONNECTIONS_MAX, "over the connection cap: closed");
                continue;
            };
            let served = served.clone();
            tokio::spawn(
                async move {
                    match connection(&served, stream).await {
                        Ok(()) => debug!("connection closed"),
                        Err(e) => info!(error = %format!("{e:#}"), "connection ended"),
                    }
                    drop(permit);
                }
                .instrument(span),
            );
        }
    };
    tokio::select! {
        () = accept => unreachable!("the accept loop never ends by itself"),
        () = stop => Ok(()),
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connection(served: &Served, stream: Box<dyn Stream>) -> Result<()> {
    let exposure = &served.exposure;
    let writable = served.overlay.is_some();
    let (read, write) = tokio::io::split(stream);
    let mut r = BufReader::new(read);
    let mut w = BufWriter::new(write);
    let negotiated = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake::handshake(exposure, writable, &mut r, &mut w),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!("the handshake did not finish within {HANDSHAKE_TIMEOUT:?}: closed")
    })??;
    let Some(negotiated) = negotiated else {
        return Ok(());
    };
    let reader = tokio::task::block_in_place(|| exposure.reader())?;
    let target = requests::Target {
        reader,
        overlay: served.overlay.clone(),
    };
    requests::serve(target, negotiated, &mut r, &mut w).await
}
