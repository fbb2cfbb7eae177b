//! The control socket: the typed requests of `proto` (`status`, `cut`, `changed`,
//! `unchanged`, `answerable`, `export`, `cursor`, `resize`), one JSON line each way,
//! answered for the owner only (mode 0600): `handle` serves them, `client` sends them.
//! Bounded: a request line is at most `CONTROL_LINE_MAX` bytes, a connection that sends
//! nothing for `CONTROL_IDLE_TIMEOUT` is closed, and connections over the cap get one line
//! saying so. One request takes more than its line: a failback pass (`failback` with the
//! `apply` step) reads its delta from the rest of the connection, and the connection ends
//! with its answer.

pub mod client;
mod export;
mod group;
mod handle;
pub mod proto;

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use crate::limits::CONTROL_IDLE_TIMEOUT;
use crate::server::Agent;

pub use client::{Control, ask, call};
pub use proto::Request;

/// Longest control request line.
const CONTROL_LINE_MAX: u64 = 64 * 1024;

/// Serves one accepted control connection on a task of its own: with a permit of the cap,
/// its requests; without one, a line saying why it is refused.
pub(crate) fn spawn(
    agent: Arc<Agent>,
    stream: tokio::net::UnixStream,
    permit: Option<OwnedSemaphorePermit>,
) {
    tokio::spawn(async move {
        let Some(permit) = permit else {
            let cap = agent.limits.control_connections;
            let line = json!({"ok": false, "error": format!(
                "the agent serves at most {cap} control connections at once: try again")});
            let mut stream = stream;
            let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
            return;
        };
        if let Err(e) = serve_control(agent, stream).await {
            debug!(error = %e, "control connection ended");
        }
        drop(permit);
    });
}

async fn serve_control(agent: Arc<Agent>, stream: tokio::net::UnixStream) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(u64::MAX));
    loop {
        let mut line = String::new();
        let mut limited = (&mut lines).take(CONTROL_LINE_MAX);
        let read = limited.read_line(&mut line);
        let Ok(n) = tokio::time::timeout(CONTROL_IDLE_TIMEOUT, read).await else {
            debug!("control connection idle: closed");
            return Ok(());
        };
        let n = n?;
        if n == 0 {
            return Ok(());
        }
        let too_long = !line.ends_with('\n') && n as u64 >= CONTROL_LINE_MAX;
        let mut body_taken = false;
        let response = if too_long {
            json!({"ok": false, "error": "request line too long"})
        } else {
            let agent = agent.clone();
            let answer = parse(&line).and_then(|request| {
                tokio::task::block_in_place(|| match request {
                    Request::Failback {
                        disk,
                        op: proto::FailbackOp::Apply { point, upto },
                    } => {
                        body_taken = true;
                        let body = Body {
                            input: &mut lines,
                            runtime: tokio::runtime::Handle::current(),
                        };
                        handle::failback_apply(&agent, disk.as_deref(), point, upto, body)
                    }
                    request => handle::handle(&agent, request),
                })
            });
            match answer {
                Ok(mut v) => {
                    v["ok"] = json!(true);
                    v
                }
                Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
            }
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if too_long || body_taken {
            return Ok(());
        }
    }
}

/// The rest of a control connection read as a blocking `Read` (on a thread that may block,
/// inside `block_in_place`), each read bounded by the idle timeout: a sender that stalls is
/// an error, not a handler held forever.
struct Body<'a, R> {
    input: &'a mut R,
    runtime: tokio::runtime::Handle,
}

impl<R: tokio::io::AsyncRead + Unpin> std::io::Read for Body<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = tokio::time::timeout(CONTROL_IDLE_TIMEOUT, self.input.read(buf));
        self.runtime.block_on(read).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the sender of a failback pass stalled",
            )
        })?
    }
}

/// A request line read as a `Request`, with an error that says which part is wrong: not
/// JSON, an unknown command, or a field of a known one.
fn parse(line: &str) -> Result<Request> {
    let value: serde_json::Value = serde_json::from_str(line).context("request is not JSON")?;
    let cmd = value["cmd"].as_str().unwrap_or_default().to_owned();
    if !proto::COMMANDS.contains(&cmd.as_str()) {
        bail!(
            "unknown command {cmd:?}: use {}",
            proto::COMMANDS.join(", ")
        );
    }
    serde_json::from_value(value).with_context(|| format!("the {cmd} request"))
}
