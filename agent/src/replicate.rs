//! `ctk-agent replicate`: bring a disk's replica on a receiver up to a new cut, once.
//!
//! Ask the receiver for its newest committed point of the disk; export (through the running
//! agent, copy-on-write, point in time) the delta since that point, or a full when there is
//! none; push it over QUIC; and only when the receiver acknowledges the commit, move this
//! agent's cursor for the receiver to the new point, so it stays answerable next time.
//!
//! With each push goes the agent's digest of the whole image as of the cut (`ctk::digest`):
//! the leaves of the receiver's newest point, kept beside the journal as
//! `<journal>.digest-<cursor>`, updated with the exported blocks. The receiver refuses to
//! commit a merged image that differs. The leaves move to the new point only on the commit
//! ack, like the cursor.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ctk::delta::{DeltaReader, DeltaRecord};
use ctk::digest::{LeafFile, Leaves};
use ctk_net::wire::{Consistency, Refusal, Request, Response};
use ctk_net::{Fingerprint, Identity};
use serde_json::{Value, json};

pub struct Replicate {
    pub identity: PathBuf,
    pub receiver: SocketAddr,
    pub pinned: Fingerprint,
    pub cursor: String,
    pub work_dir: PathBuf,
}

/// Sends one request (and for a push, the delta file after it) and reads the answer.
async fn call(
    conn: &quinn::Connection,
    request: &Request,
    delta: Option<&std::path::Path>,
) -> Result<Response> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| closed(conn, e.into()))?;
    ctk_net::write_frame(&mut send, &request.encode()).await?;
    if let Some(path) = delta {
        let mut file = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            send.write_all(&buf[..n])
                .await
                .map_err(|e| closed(conn, anyhow::Error::from(e).context("sending the delta")))?;
        }
    }
    send.finish()?;
    let frame = ctk_net::read_frame(&mut recv)
        .await
        .map_err(|e| closed(conn, e.into()))?;
    Ok(Response::decode(&frame)?)
}

/// Says why the receiver closed the connection, when it did (a refused agent learns it
/// only after its own side of the handshake is done).
fn closed(conn: &quinn::Connection, e: anyhow::Error) -> anyhow::Error {
    match conn.close_reason() {
        Some(reason) => e.context(format!("the receiver closed the connection: {reason}")),
        None => e,
    }
}

/// The leaves of the image as of the exported delta's cut: those of the receiver's newest
/// point (`newest`, from `leaf_path`) updated with every block of the delta. `None`, with a
/// warning, when they cannot be known: the leaf file is missing or of another point (it
/// was lost, or another cursor wrote to the receiver), the disk changed size, or the disk
/// is too large to digest. The point is then committed unchecked.
fn leaves_after(
    leaf_path: &std::path::Path,
    newest: Option<&str>,
    delta: &std::path::Path,
) -> Result<Option<Leaves>> {
    let mut reader = DeltaReader::new(std::io::BufReader::new(std::fs::File::open(delta)?))?;
    let h = reader.header().clone();
    let base = match newest {
        None => Some(Leaves::zeroed(h.disk_size, h.block_size)),
        Some(id) => {
            let at = id.parse().context("the receiver's newest point")?;
            LeafFile::load(leaf_path, at)?.map(Ok)
        }
    };
    let mut leaves = match base {
        Some(Ok(l)) if l.disk_size() == h.disk_size && l.block_size() == h.block_size => l,
        Some(Err(e)) => {
            tracing::warn!(error = %e, "no image digest for this push");
            return Ok(None);
        }
        _ => {
            tracing::warn!(
                leaves = %leaf_path.display(),
                "the block digests of the receiver's newest point are not known here (lost, \
                 or the disk changed size): this point is committed without the end-to-end \
                 check"
            );
            return Ok(None);
        }
    };
    while let Some(record) = reader.next_record()? {
        match record {
            DeltaRecord::Data { offset, data } => leaves.set_data(offset, data)?,
            DeltaRecord::Zero { offset, length } => leaves.set_zero(offset, length)?,
        }
    }
    Ok(Some(leaves))
}

/// Runs one replication of `disk`. `control` calls the running agent.
pub fn run(r: &Replicate, disk: &str, control: &dyn Fn(Value) -> Result<Value>) -> Result<Value> {
    let identity = Identity::load(&r.identity)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = control(json!({"cmd": "status"}))?;
    let journal = status["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["name"] == disk)
        .and_then(|d| d["journal"].as_str())
        .with_context(|| format!("the agent does not protect a disk named {disk:?}"))?;
    let leaf_path = PathBuf::from(format!("{journal}.digest-{}", r.cursor));
    runtime.block_on(async {
        let conn = ctk_net::connect(&identity, r.receiver, r.pinned)
            .await
            .context("reaching the receiver")?;
        // A push that does not fit is retried from where the receiver then stands: another
        // push of this disk (say, of an earlier attempt that was killed after sending it all)
        // may have committed between our question and our push. Each try is a new cut.
        let mut tries = 0;
        let (newest, exported, sent, committed, already, leaves) = loop {
            tries += 1;
            let newest = match call(&conn, &Request::Newest { disk: disk.into() }, None).await? {
                Response::Newest { change_id } => change_id,
                Response::Refused { message, .. } => bail!("the receiver refused: {message}"),
                other => bail!("unexpected answer from the receiver: {other:?}"),
            };
            let since = newest.clone().unwrap_or_else(|| "all".into());
            std::fs::create_dir_all(&r.work_dir)?;
            let path = std::path::absolute(
                r.work_dir
                    .join(format!("ctk-replicate-{disk}-{}.ctkd", std::process::id())),
            )?;
            let exported = control(json!({"cmd": "export", "since": since, "path": path}))
                .with_context(|| match &newest {
                    Some(id) => format!(
                        "exporting the changes since the receiver's newest point {id} (if this \
                         agent cannot answer it, e.g. after its journal was lost, the replica \
                         needs a resync, which is not built yet)"
                    ),
                    None => "exporting a first full".into(),
                })?;
            let sent = std::fs::metadata(&path)?.len();
            let leaves = match leaves_after(&leaf_path, newest.as_deref(), &path) {
                Ok(l) => l,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e.context("digesting the exported delta"));
                }
            };
            // Before the push: were this process killed after the receiver's commit, the
            // next run must still know the leaves of what is then the receiver's newest.
            if let (Some(l), Some(to)) = (&leaves, exported["to"].as_str())
                && let Err(e) = to
                    .parse()
                    .map_err(anyhow::Error::from)
                    .and_then(|to| Ok(LeafFile::save_pending(&leaf_path, l, to)?))
            {
                tracing::warn!(error = %e, "recording the pending block digests");
            }
            let answer = call(
                &conn,
                &Request::Push {
                    disk: disk.into(),
                    delta_len: sent,
                    cut_unix_ms: exported["cut_unix_ms"].as_u64().unwrap_or(0),
                    consistency: if exported["consistency"] == "application" {
                        Consistency::Application
                    } else {
                        Consistency::Crash
                    },
                    image_digest: leaves.as_ref().map(|l| l.digest().0),
                },
                Some(&path),
            )
            .await;
            let _ = std::fs::remove_file(&path);
            match answer? {
                Response::Committed { change_id, already } => {
                    break (newest, exported, sent, change_id, already, leaves);
                }
                Response::Refused {
                    refusal: Refusal::Mismatch,
                    message,
                } if tries < 3 => {
                    tracing::info!(%message, "the receiver moved on meanwhile: trying again");
                }
                Response::Refused { refusal, message } => {
                    bail!("the receiver refused the delta ({refusal:?}): {message}")
                }
                other => bail!("unexpected answer from the receiver: {other:?}"),
            }
        };
        if committed != exported["to"] {
            bail!(
                "the receiver committed {committed}, not the exported {}",
                exported["to"]
            );
        }
        // Only now, with the commit acknowledged, do the leaves and the cursor move. Leaves
        // that fail to save only cost the next push its check (it finds them of another
        // point), so that is a warning, not a failed replication.
        let digest = leaves.as_ref().map(|l| l.digest().to_string());
        if let (Some(mut leaves), Ok(at)) = (leaves, committed.parse())
            && let Err(e) = LeafFile::save(&leaf_path, &mut leaves, at)
        {
            tracing::warn!(error = %e, leaves = %leaf_path.display(), "saving the block digests");
        }
        let moved =
            control(json!({"cmd": "cursor", "op": "advance", "name": r.cursor, "at": committed}));
        if moved.is_err() {
            control(json!({"cmd": "cursor", "op": "register", "name": r.cursor, "at": committed}))
                .context("registering the replication cursor")?;
        }
        conn.close(0u32.into(), b"done");
        Ok(json!({
            "disk": disk,
            "from": newest,
            "committed": committed,
            "already_committed": already,
            "changed_bytes": exported["changed_bytes"],
            "delta_bytes": sent,
            "consistency": exported["consistency"],
            "hold_ms": exported["hold_ms"],
            "image_digest": digest,
        }))
    })
}

/// Sends one request to an agent's control socket and returns its answer (an error if the
/// agent refused it).
pub fn control_call(socket: &std::path::Path, request: &Value) -> Result<Value> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is `ctk-agent serve` running? see --control)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream).read_line(&mut answer)?;
    let answer: Value = serde_json::from_str(&answer).context("the agent's answer is not JSON")?;
    if answer["ok"] != true {
        bail!(
            "{}",
            answer["error"]
                .as_str()
                .unwrap_or("the agent refused the request")
        );
    }
    Ok(answer)
}
