//! Failback's requests (`FailbackPull`, `FailbackCommit`): the work is in `crate::failback`,
//! on a blocking thread; this is the stream around it.

use anyhow::Result;
use ctk::ChangeId;
use ctk_net::wire::{self, Known, Refusal, Response};
use tracing::{info, info_span};

use super::{Config, describe, refusal};
use crate::failback;
use crate::store::{self, StoreError};

/// Failback pulls built at once in this process.
static PULLS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Reads what the agent knows (the chunks after the request), bounded before anything is
/// allocated.
async fn read_known(recv: &mut quinn::RecvStream, known: Known) -> Result<failback::Known, String> {
    match known {
        Known::Extents { count } => {
            if count > wire::KNOWN_EXTENTS_MAX {
                return Err(format!(
                    "{count} extents (at most {})",
                    wire::KNOWN_EXTENTS_MAX
                ));
            }
            let bytes = ctk_net::read_chunks(recv, count as usize * 16)
                .await
                .map_err(|e| e.to_string())?;
            let pairs = bytes
                .chunks_exact(16)
                .map(|p| {
                    let offset = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
                    let length = u64::from_le_bytes(p[8..].try_into().expect("8 bytes"));
                    (offset, length)
                })
                .collect();
            Ok(failback::Known::Extents(pairs))
        }
        Known::UnitHashes { unit, count } => {
            if !(ctk::digest::UNIT_MIN..=ctk::digest::UNIT_MAX).contains(&unit)
                || count > ctk::digest::UNIT_HASHES_MAX
            {
                return Err(format!("{count} hashes of {unit}-byte units"));
            }
            let bytes = ctk_net::read_chunks(recv, count as usize * 32)
                .await
                .map_err(|e| e.to_string())?;
            let hashes = bytes
                .chunks_exact(32)
                .map(|h| h.try_into().expect("32 bytes"))
                .collect();
            Ok(failback::Known::UnitHashes { unit, hashes })
        }
    }
}

/// One pass, streamed as it is built: the blocks are read from the DR disk and encoded on a
/// blocking thread, which hands the delta over chunk by chunk (at most `PASS_CHUNKS_AHEAD`
/// ahead of the stream), so reading, compressing, sending and the agent's writes overlap.
#[allow(clippy::too_many_arguments)]
pub(super) async fn pull(
    agent: &str,
    config: &Config,
    disk: String,
    since: Option<ChangeId>,
    known: Known,
    final_pass: bool,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<Response> {
    if let Err(e) = store::validate_name(&disk) {
        return Ok(Response::refused(Refusal::BadRequest, describe(&e)));
    }
    let root = config.store.join(agent);
    // Nothing is read, or held, for a disk that is not failed over.
    match store::failed_over(&root, &disk) {
        Ok(Some(_)) => {}
        Ok(None) => {
            let e = StoreError::NotFailedOver { disk };
            return Ok(Response::refused(refusal(&e), describe(&e)));
        }
        Err(e) => return Ok(Response::refused(refusal(&e), describe(&e))),
    }
    // What the agent knows may be tens of MiB (bounded per request): a few pulls at a time
    // per receiver keep that, and the passes' reads of the DR disk, bounded.
    let _permit = PULLS.acquire().await?;
    let known = match read_known(recv, known).await {
        Ok(k) => k,
        Err(why) => return Ok(Response::refused(Refusal::BadRequest, why)),
    };
    let (planned_tx, planned_rx) = tokio::sync::oneshot::channel();
    let (chunks_tx, mut chunks) = tokio::sync::mpsc::channel(PASS_CHUNKS_AHEAD);
    let span = info_span!("failback", %disk, final_pass);
    let name = disk.clone();
    let task = tokio::task::spawn_blocking(move || {
        let _guard = span.enter();
        let started = std::time::Instant::now();
        let dir = failback::failover_dir(&root, &name);
        let sink = |pass: &failback::Pass| {
            let _ = planned_tx.send(*pass);
            Ok(ChunkSink {
                tx: chunks_tx,
                buf: Vec::with_capacity(wire::CHUNK_MAX),
            })
        };
        let (pass, bytes) =
            failback::pass(&root, &name, since, Some(known), final_pass, &dir, sink)?;
        info!(
            upto = %pass.upto,
            blocks = pass.blocks,
            bytes,
            seconds = started.elapsed().as_secs_f64(),
            "failback pass sent"
        );
        Ok::<_, StoreError>(pass)
    });
    let Ok(pass) = planned_rx.await else {
        // Ended before its plan: nothing was sent, so the refusal goes the usual way.
        return Ok(match task.await {
            Ok(Err(e)) => Response::refused(refusal(&e), describe(&e)),
            Ok(Ok(_)) => Response::refused(Refusal::Unavailable, "the pass had no plan"),
            Err(e) => Response::refused(Refusal::Unavailable, e.to_string()),
        });
    };
    let response = Response::FailbackPass {
        point: pass.point,
        newest: pass.newest,
        upto: pass.upto,
        disk_size: pass.disk_size,
        blocks: pass.blocks,
        // Not known ahead: the chunks end with a zero length.
        bytes: 0,
    };
    let streamed = async {
        ctk_net::write_frame(send, &response.encode()).await?;
        while let Some(chunk) = chunks.recv().await {
            ctk_net::write_chunk(send, chunk).await?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    // The builder stops at its next chunk once nobody takes them.
    drop(chunks);
    let built = task.await;
    let failed = match (streamed, built) {
        (Ok(()), Ok(Ok(_))) => {
            ctk_net::end_chunks(send).await?;
            return Ok(response);
        }
        (Err(e), _) => e,
        (Ok(()), Ok(Err(e))) => anyhow::anyhow!(describe(&e)),
        (Ok(()), Err(e)) => e.into(),
    };
    // Reset, not finished: the agent must not take a pass cut short for a whole one (its
    // delta's trailer would tell it too).
    let _ = send.reset(quinn::VarInt::from_u32(1));
    Err(failed.context("streaming a failback pass"))
}

/// Chunks of a pass's delta queued ahead of the stream: the memory a pull holds for them.
const PASS_CHUNKS_AHEAD: usize = 8;

/// The delta's bytes, written on the blocking thread, handed to the stream in chunks of
/// `wire::CHUNK_MAX`.
struct ChunkSink {
    tx: tokio::sync::mpsc::Sender<ctk_net::Bytes>,
    buf: Vec<u8>,
}

impl ChunkSink {
    fn hand_over(&mut self) -> std::io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(wire::CHUNK_MAX));
        self.tx
            .blocking_send(ctk_net::Bytes::from(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the stream ended"))
    }
}

impl std::io::Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(wire::CHUNK_MAX - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == wire::CHUNK_MAX {
            self.hand_over()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.hand_over()
    }
}

/// The cutover's commit.
pub(super) async fn commit(
    agent: &str,
    config: &Config,
    disk: String,
    upto: ChangeId,
    point: ChangeId,
    cut_unix_ms: u64,
) -> Response {
    if let Err(e) = store::validate_name(&disk) {
        return Response::refused(Refusal::BadRequest, describe(&e));
    }
    let root = config.store.join(agent);
    let retention = config.retention(&disk);
    let span = info_span!("failback_commit", %disk, %point);
    let result = tokio::task::spawn_blocking(move || {
        let _guard = span.enter();
        let c = failback::commit(&root, &disk, upto, point, cut_unix_ms, retention)?;
        info!(
            already = c.already,
            "failback committed: the DR disk is point {point}, the fence lifted"
        );
        Ok::<_, StoreError>(c)
    })
    .await;
    match result {
        Ok(Ok(c)) => Response::FailbackCommitted {
            change_id: c.change_id,
            image_digest: c.image_digest,
            already: c.already,
        },
        Ok(Err(e)) => Response::refused(refusal(&e), describe(&e)),
        Err(e) => Response::refused(Refusal::Unavailable, e.to_string()),
    }
}
