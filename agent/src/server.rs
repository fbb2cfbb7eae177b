//! The daemon: the listeners (NBD on Unix sockets and TCP, the control socket), their
//! connection caps and accept loops, and shutdown. What a connection then does lives in
//! `front` (NBD) and `control`.
//!
//! An accept loop never spins: a failed accept (out of descriptors, say) pauses it with a
//! doubling backoff and is logged once per episode, and a connection over the listener's cap
//! is refused politely rather than left to exhaust the process (`limits`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use crate::disk::ProtectedDisk;
use crate::limits::{ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN, Limits, REFUSALS_MAX};

pub struct Agent {
    pub disks: Vec<Arc<ProtectedDisk>>,
    /// Consistency groups over `disks` (checked when the agent starts).
    pub groups: Vec<crate::group::Group>,
    pub zstd_level: i32,
    pub limits: Limits,
    /// The shared pool of NBD payload memory, in KiB (`limits`).
    pub(crate) nbd_memory: Arc<Semaphore>,
}

impl Agent {
    pub fn new(disks: Vec<Arc<ProtectedDisk>>, zstd_level: i32, limits: Limits) -> Agent {
        let kib = (limits.nbd_memory / 1024).max(crate::nbd::PAYLOAD_MAX as u64 / 1024);
        Agent {
            disks,
            groups: Vec::new(),
            zstd_level,
            limits,
            nbd_memory: Arc::new(Semaphore::new(kib as usize)),
        }
    }

    /// The agent with consistency groups over its disks (see `group::resolve`).
    pub fn with_groups(mut self, groups: Vec<crate::group::Group>) -> Agent {
        self.groups = groups;
        self
    }

    pub(crate) fn disk(&self, name: &str) -> Option<&Arc<ProtectedDisk>> {
        // The empty name is the default export: the first disk.
        if name.is_empty() {
            self.disks.first()
        } else {
            self.disks.iter().find(|d| d.name == name)
        }
    }
}

/// Where the NBD front listens.
pub use ctk_net::local::Listen;

fn bind_unix(path: &std::path::Path) -> Result<UnixListener> {
    let listener = ctk_net::local::bind_unix(path)?;
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

/// A listener the accept loop can take connections from.
trait Accept: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_one(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Accept for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (s, _) = self.accept().await?;
        Ok((s, "unix".into()))
    }
}

impl Accept for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, String)> {
        let (s, peer) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok((s, peer.to_string()))
    }
}

/// Accepts connections for ever, each with a permit of `cap` (`None` when the listener is
/// at its cap: `serve` then refuses it politely). A failed accept pauses the loop, the pause
/// doubling up to `ACCEPT_BACKOFF_MAX`, and is logged once until accepting works again.
async fn accept_loop<L: Accept>(
    what: &'static str,
    listener: L,
    cap: Arc<Semaphore>,
    serve: impl Fn(L::Stream, String, Option<OwnedSemaphorePermit>),
) {
    let mut pause = std::time::Duration::ZERO;
    let mut failed = 0u64;
    loop {
        match listener.accept_one().await {
            Ok((stream, peer)) => {
                if failed > 0 {
                    info!(listener = what, failed, "accepting connections again");
                    failed = 0;
                    pause = std::time::Duration::ZERO;
                }
                serve(stream, peer, cap.clone().try_acquire_owned().ok());
            }
            Err(e) => {
                if failed == 0 {
                    warn!(
                        listener = what, error = %e,
                        "accepting a connection failed (out of file descriptors?): pausing and \
                         retrying; logged once until it works again"
                    );
                }
                failed += 1;
                pause = (pause * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// What an NBD listener does with a connection (a permit of the cap, or none: refused).
fn nbd_front<S>(
    agent: Arc<Agent>,
    refusals: Arc<Semaphore>,
) -> impl Fn(S, String, Option<OwnedSemaphorePermit>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    move |stream, peer, permit| {
        crate::front::spawn_connection(agent.clone(), stream, peer, permit, refusals.clone())
    }
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
    // One cap over every NBD listener: it bounds the agent, not a socket.
    let nbd_cap = Arc::new(Semaphore::new(agent.limits.nbd_connections));
    let refusals = Arc::new(Semaphore::new(REFUSALS_MAX));
    for listen in listens {
        let cap = nbd_cap.clone();
        match listen {
            Listen::Unix(path) => {
                let listener = bind_unix(&path)?;
                info!(socket = %path.display(), "NBD listening");
                let front = nbd_front(agent.clone(), refusals.clone());
                tasks.spawn(accept_loop("nbd", listener, cap, front));
            }
            Listen::Tcp(addr) => {
                if !addr.ip().is_loopback() {
                    warn!(%addr, "NBD has no authentication: listening beyond loopback exposes the disks");
                }
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                info!(%addr, "NBD listening");
                let front = nbd_front(agent.clone(), refusals.clone());
                tasks.spawn(accept_loop("nbd", listener, cap, front));
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
    let control_cap = Arc::new(Semaphore::new(agent.limits.control_connections));
    let control_agent = agent.clone();
    tasks.spawn(accept_loop(
        "control",
        control_listener,
        control_cap,
        move |stream, _, permit| crate::control::spawn(control_agent.clone(), stream, permit),
    ));
    // Tell whoever started us that we are ready (tests and scripts wait for this line).
    if announce {
        println!("ctk-agent ready: control {}", control.display());
    }
    let names: Vec<&str> = agent.disks.iter().map(|d| d.name.as_str()).collect();
    ctk_net::service::ready(&format!("serving {}", names.join(", ")));
    ctk_net::service::spawn_watchdog();

    stop.await;
    ctk_net::service::stopping();
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
