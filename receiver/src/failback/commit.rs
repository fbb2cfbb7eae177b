//! Failback's cutover on the receiver: the DR disk committed as a new restore point, the
//! fence lifted, the overlay removed (in that order).

use std::path::Path;

use ctk::ChangeId;
use std::io::BufReader;

use ctk::delta::DeltaHeader;
use ctk::digest::Leaves;
use roaring::RoaringBitmap;

use super::DrDisk;
use super::pass::write_blocks;
use super::view::DrView;
use crate::export::TRACKED_BLOCK;
use crate::retention::Retention;
use crate::store::{self, DiskStore, Ingested, PointMeta, StoreError};

/// The cutover's outcome.
#[derive(Debug)]
pub struct Committed {
    pub change_id: ChangeId,
    pub image_digest: Option<[u8; 32]>,
    /// An earlier request had committed it (a rerun after a crash).
    pub already: bool,
}

/// Commits the DR disk of `disk` under `root`, as of overlay cut `upto` (the final pass's),
/// as point `point` (the agent's cut of its disk once the final pass was applied), then
/// lifts the fence and removes the overlay. Refused if the overlay was written after `upto`
/// (the final pass would be stale). Asked again after a crash, it finishes what is left.
pub fn commit(
    root: &Path,
    disk: &str,
    upto: ChangeId,
    point: ChangeId,
    cut_unix_ms: u64,
    retention: Retention,
) -> Result<Committed, StoreError> {
    if store::newest_point(root, disk)? == Some(point) {
        let (mut s, _) = DiskStore::open_waiting(root, disk)?;
        s.unfence()?;
        let digest = s.points().last().and_then(|p| p.image_digest).map(|d| d.0);
        drop(s);
        remove_overlay(root, disk)?;
        return Ok(Committed {
            change_id: point,
            image_digest: digest,
            already: true,
        });
    }
    let started = std::time::Instant::now();
    let mut view = DrView::hold(root, disk, false)?;
    let held = started.elapsed().as_secs_f64();
    match view.after_latest()? {
        Some((latest, 0)) if latest == upto => {}
        Some((latest, open)) => {
            return Err(StoreError::Mismatch(format!(
                "the DR disk changed after the final pass (its overlay is at cut {latest} with \
                 {open} blocks after it, the pass was as of {upto}): run `ctk-agent failback \
                 --final` again"
            )));
        }
        None => return Err(StoreError::Protocol("the overlay is not held".into())),
    }
    let (mut s, _) = DiskStore::open_waiting(root, disk)?;
    let opened = started.elapsed().as_secs_f64();
    let (ingested, blocks) = merge(&mut s, &mut view, point, cut_unix_ms, retention)?;
    let merged = started.elapsed().as_secs_f64();
    let digest = s.points().last().and_then(|p| p.image_digest).map(|d| d.0);
    drop(s);
    // Where the cutover's commit went (the downtime's largest part).
    tracing::info!(
        blocks,
        held_s = held,
        store_opened_s = opened,
        merged_s = merged,
        "failback commit steps"
    );
    // The point is committed and the fence lifted: the overlay goes after the answer (its
    // removal, a large sparse file, would otherwise add to the cutover's downtime), still
    // under its exposure, so that a new `failover start` (which waits for that) never has
    // its own overlay removed. Cut short, what is left is removed by the same request asked
    // again, or emptied by the next `failover start`.
    let (root, disk) = (root.to_owned(), disk.to_owned());
    std::thread::spawn(move || {
        let exposure = view.into_exposure();
        if let Err(e) = remove_overlay(&root, &disk) {
            tracing::warn!(error = %e, "removing the failed-back overlay");
        }
        drop(exposure);
    });
    Ok(Committed {
        change_id: point,
        image_digest: digest,
        already: matches!(ingested, Ingested::AlreadyCommitted { .. }),
    })
}

/// Merges the DR disk `view` into the store `s` as point `point`, cut at `cut_unix_ms`, and
/// lifts the fence: the commit's merge and how many blocks it wrote. The DR disk differs
/// from the newest point where the overlay wrote and where the failover's point itself
/// differs from the newest: those blocks, in the store's size, and nothing else.
pub fn merge<V: DrDisk + Send>(
    s: &mut DiskStore,
    view: &mut V,
    point: ChangeId,
    cut_unix_ms: u64,
    retention: Retention,
) -> Result<(Ingested, u64), StoreError> {
    let newest = s
        .points()
        .last()
        .map(|p| p.change_id)
        .ok_or_else(|| StoreError::NoSuchPoint(format!("of disk {:?}", s.name())))?;
    let block = u64::from(s.block_size().unwrap_or(TRACKED_BLOCK as u32));
    let mut blocks = RoaringBitmap::new();
    for b in &view.written()? {
        let at = u64::from(b) * TRACKED_BLOCK;
        blocks.insert_range((at / block) as u32..(at + TRACKED_BLOCK).div_ceil(block) as u32);
    }
    for (start, end) in view.not_in_newest()? {
        blocks.insert_range((start / block) as u32..end.div_ceil(block) as u32);
    }
    let header = DeltaHeader {
        disk_id: s.name().to_owned(),
        disk_size: view.size(),
        block_size: block as u32,
        from: Some(newest),
        to: point,
    };
    let meta = PointMeta {
        cut_unix_ms: Some(cut_unix_ms),
        consistency: Some(ctk::Consistency::Crash),
        image_digest: None,
    };
    let leaves = dr_leaves(s, view, block)?;
    let mut view = Digesting { view, leaves };
    let ingested = merge_dr_disk(s, &mut view, &header, &blocks, block, retention, meta)?;
    Ok((ingested, blocks.len()))
}

/// The newest point's leaves in the DR disk's size (the leaf of a block a resize cuts into
/// read from the DR disk): the merge's blocks are set in them as they are read.
fn dr_leaves<V: DrDisk>(
    s: &DiskStore,
    view: &mut V,
    block: u64,
) -> Result<Option<Leaves>, StoreError> {
    let digest_error = |e: ctk::digest::DigestError| StoreError::Protocol(e.to_string());
    let Some(mut leaves) = s.newest_leaves()? else {
        return Ok(None);
    };
    let old = leaves.disk_size();
    if old != view.size() {
        leaves.resize(view.size()).map_err(digest_error)?;
        if let Some(b) = leaves.edge_block(old) {
            let start = b * block;
            let mut buf = vec![0u8; ((start + block).min(view.size()) - start) as usize];
            view.read_at(&mut buf, start)?;
            leaves.set_data(start, &buf).map_err(digest_error)?;
        }
    }
    Ok(Some(leaves))
}

/// The DR disk, with the digest of what the merged image must be kept as its blocks are
/// read: the merge checks the image it made against it, as it checks a push against the
/// agent's, so a misread on the receiver's disk never commits a point unnoticed.
struct Digesting<'a, V> {
    view: &'a mut V,
    leaves: Option<Leaves>,
}

impl<V: DrDisk> DrDisk for Digesting<'_, V> {
    fn point(&self) -> ChangeId {
        self.view.point()
    }
    fn size(&self) -> u64 {
        self.view.size()
    }
    fn changes(
        &mut self,
        since: Option<ChangeId>,
    ) -> Result<(ChangeId, RoaringBitmap), StoreError> {
        self.view.changes(since)
    }
    fn written(&mut self) -> Result<RoaringBitmap, StoreError> {
        self.view.written()
    }
    fn not_in_newest(&mut self) -> Result<Vec<(u64, u64)>, StoreError> {
        self.view.not_in_newest()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.view.read_at(buf, offset)?;
        if let Some(leaves) = self.leaves.as_mut() {
            leaves
                .set_data(offset, buf)
                .map_err(|e| StoreError::Protocol(e.to_string()))?;
        }
        Ok(())
    }
}

/// Removes the failover's directory (a materialized image it links to stays: it is the
/// operator's file, and equal to the new point).
fn remove_overlay(root: &Path, disk: &str) -> Result<(), StoreError> {
    let dir = super::failover_dir(root, disk);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io {
            doing: format!("removing {}", dir.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Merges the DR disk's `blocks` (of `block` bytes) as the delta `header` describes,
/// streamed through a pipe into the merge (which stages it durably itself). Raw: it never
/// leaves this machine, and compressing it would lengthen the downtime.
fn merge_dr_disk<V: DrDisk + Send>(
    s: &mut DiskStore,
    view: &mut Digesting<'_, V>,
    header: &DeltaHeader,
    blocks: &RoaringBitmap,
    block: u64,
    retention: Retention,
    meta: PointMeta,
) -> Result<Ingested, StoreError> {
    let (input, output) = std::io::pipe().map_err(|source| StoreError::Io {
        doing: "making a pipe for the failback's commit".into(),
        source,
    })?;
    let raw = ctk::delta::WriteOptions { zstd_level: None };
    let (digest_tx, digest_rx) = std::sync::mpsc::channel();
    let (ingested, produced) = std::thread::scope(|scope| {
        let producer = scope.spawn(|| {
            let out = std::io::BufWriter::with_capacity(1 << 20, output);
            let (mut out, _) = write_blocks(view, header, blocks, block, out, raw)?;
            std::io::Write::flush(&mut out).map_err(|source| StoreError::Io {
                doing: "writing the failback's commit".into(),
                source,
            })?;
            // The pipe's end is dropped here: the merge reads the end of the delta, and then
            // asks for the digest.
            drop(out);
            let _ = digest_tx.send(view.leaves.as_ref().map(Leaves::digest));
            Ok(())
        });
        // A merge that fails drops its input, so the producer's writes fail and it ends.
        let end = |_| match digest_rx.recv() {
            Ok(image_digest) => Ok(PointMeta {
                image_digest,
                ..meta
            }),
            Err(_) => Err(StoreError::Protocol(
                "reading the DR disk for the commit failed".into(),
            )),
        };
        let ingested = s.ingest_failback(BufReader::new(input), retention, end);
        let produced = producer.join().unwrap_or_else(|_| {
            Err(StoreError::Protocol(
                "reading the DR disk for the commit failed".into(),
            ))
        });
        (ingested, produced)
    });
    match (ingested, produced) {
        // The merge stopped reading (its own failure): the producer's broken pipe follows.
        (Err(e), Err(StoreError::Io { source, .. }))
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Err(e)
        }
        (_, Err(e)) => Err(e),
        (ingested, Ok(())) => ingested,
    }
}
