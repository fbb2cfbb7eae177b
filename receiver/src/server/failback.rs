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

/// One pass: built into a file beside the overlay, then streamed as chunks.
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
    let span = info_span!("failback", %disk, final_pass);
    let name = disk.clone();
    let built = tokio::task::spawn_blocking(move || {
        let _guard = span.enter();
        let started = std::time::Instant::now();
        let dir = failback::failover_dir(&root, &name);
        let pass = failback::pass(&root, &name, since, Some(known), final_pass, &dir)?;
        info!(
            upto = %pass.upto,
            blocks = pass.blocks,
            bytes = pass.bytes,
            seconds = started.elapsed().as_secs_f64(),
            "failback pass built"
        );
        Ok::<_, StoreError>(pass)
    })
    .await;
    let pass = match built {
        Ok(Ok(pass)) => pass,
        Ok(Err(e)) => return Ok(Response::refused(refusal(&e), describe(&e))),
        Err(e) => return Ok(Response::refused(Refusal::Unavailable, e.to_string())),
    };
    let response = Response::FailbackPass {
        point: pass.point,
        newest: pass.newest,
        upto: pass.upto,
        disk_size: pass.disk_size,
        blocks: pass.blocks,
        bytes: pass.bytes,
    };
    let sent = send_file(send, &response, &pass.path).await;
    let _ = std::fs::remove_file(&pass.path);
    sent?;
    Ok(response)
}

/// The answer's frame, then the file as chunks and the end.
async fn send_file(
    send: &mut quinn::SendStream,
    response: &Response,
    path: &std::path::Path,
) -> Result<()> {
    ctk_net::write_frame(send, &response.encode()).await?;
    let mut file = tokio::fs::File::open(path).await?;
    loop {
        let mut buf = vec![0u8; wire::CHUNK_MAX];
        let n = read_full(&mut file, &mut buf).await?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        ctk_net::write_chunk(send, ctk_net::Bytes::from(buf)).await?;
    }
    ctk_net::end_chunks(send).await?;
    Ok(())
}

/// Reads until `buf` is full or the file ends: the count.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]).await? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
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
