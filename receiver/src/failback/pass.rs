//! One failback pass: the blocks the original disk needs, read from the DR disk as a delta
//! written into whatever the server streams to the agent.

use std::io::Write;
use std::path::Path;

use ctk::delta::{DeltaHeader, DeltaWriter, WriteOptions};
use ctk::{ChangeId, Extent};
use roaring::RoaringBitmap;

use super::DrDisk;
use super::view::DrView;
use crate::export::TRACKED_BLOCK as BLOCK;
use crate::store::{self, StoreError};

/// What the agent said of its own disk for a first pass.
pub enum Known {
    /// Byte ranges written since the receiver's newest point.
    Extents(Vec<(u64, u64)>),
    /// A hash of each `unit` bytes of its disk (`ctk::digest::unit_hash`), in order.
    UnitHashes { unit: u32, hashes: Vec<[u8; 32]> },
}

/// A pass as its answer describes it, known before its delta is written.
#[derive(Clone, Copy, Debug)]
pub struct Pass {
    pub point: ChangeId,
    pub newest: ChangeId,
    /// The overlay's cut the pass is complete as of.
    pub upto: ChangeId,
    pub disk_size: u64,
    pub blocks: u64,
}

fn io(doing: &str) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        doing: doing.to_owned(),
        source,
    }
}

/// Adds the 4 KiB blocks of byte range `[start, end)` to `blocks`.
fn add_range(blocks: &mut RoaringBitmap, start: u64, end: u64) {
    if end > start {
        blocks.insert_range((start / BLOCK) as u32..end.div_ceil(BLOCK) as u32);
    }
}

/// Builds the pass after overlay cut `since` (`None`: the first) of disk `disk` under the
/// agent's store `root` (its progress recorded in the failover's `dir`). `last`: hold the
/// overlay (stopping the export that serves it) and cut it, so the pass is the final one.
/// Once it is planned, `open` is given the pass and makes the sink its delta is written
/// into, as the blocks are read. The pass and its delta's length.
pub fn pass<W: Write>(
    root: &Path,
    disk: &str,
    since: Option<ChangeId>,
    known: Option<Known>,
    last: bool,
    dir: &Path,
    open: impl FnOnce(&Pass) -> Result<W, StoreError>,
) -> Result<(Pass, u64), StoreError> {
    let newest = store::newest_point(root, disk)?
        .ok_or_else(|| StoreError::NoSuchPoint(format!("of disk {disk:?}")))?;
    let mut view = if last {
        DrView::hold(root, disk, true)?
    } else {
        DrView::peek(root, disk)?
    };
    let (upto, blocks) = plan(&mut view, since, known)?;
    let size = view.size;
    let pass = Pass {
        point: view.point,
        newest,
        upto,
        disk_size: size,
        blocks: blocks.len(),
    };
    let header = DeltaHeader {
        disk_id: disk.to_owned(),
        disk_size: size,
        block_size: BLOCK as u32,
        from: Some(view.point),
        to: upto,
    };
    let out = open(&pass)?;
    let (mut out, bytes) = write_blocks(
        &mut view,
        &header,
        &blocks,
        BLOCK,
        out,
        WriteOptions::default(),
    )?;
    out.flush().map_err(io("sending a failback delta"))?;
    super::record(dir, &pass, bytes, last);
    Ok((pass, bytes))
}

/// What a pass sends: the overlay cut it is complete as of, and the 4 KiB blocks of the DR
/// disk the original disk needs (see the module's doc), given what the agent `known` of its
/// own disk for a first pass (`since` is `None`).
pub fn plan<V: DrDisk>(
    view: &mut V,
    since: Option<ChangeId>,
    known: Option<Known>,
) -> Result<(ChangeId, RoaringBitmap), StoreError> {
    let size = view.size();
    let (upto, mut blocks) = view.changes(since)?;
    if since.is_none() {
        match known {
            Some(Known::UnitHashes { unit, hashes }) => {
                // The compare reads the DR disk as it is: exact but for writes landing
                // meanwhile, which are after `upto` (a later pass sends them).
                blocks = differing_units(view, unit, &hashes)?;
            }
            extents => {
                for (start, end) in view.not_in_newest()? {
                    add_range(&mut blocks, start, end);
                }
                if let Some(Known::Extents(extents)) = extents {
                    // Ranges past the disk (a confused or hostile agent) name nothing.
                    for (offset, length) in extents {
                        let end = offset.saturating_add(length).min(size);
                        add_range(&mut blocks, offset.min(size), end);
                    }
                }
            }
        }
    }
    let last_block = size.div_ceil(BLOCK);
    if blocks.max().is_some_and(|b| u64::from(b) >= last_block) {
        blocks.remove_range(last_block as u32..);
    }
    Ok((upto, blocks))
}

/// Writes the blocks (of `block` bytes) in `blocks`, read from `view`, as a delta with
/// `header` into `out`. The sink and the delta's length.
pub fn write_blocks<V: DrDisk, W: Write>(
    view: &mut V,
    header: &DeltaHeader,
    blocks: &RoaringBitmap,
    block: u64,
    out: W,
    options: WriteOptions,
) -> Result<(W, u64), StoreError> {
    let mut writer = DeltaWriter::new(out, header, options)?;
    let mut buf = Vec::new();
    let mut failed = None;
    for (first, count) in block_runs(blocks) {
        let offset = first * block;
        let end = ((first + count) * block).min(header.disk_size);
        let extent = Extent::new(offset, end - offset);
        let wrote = writer.write_read(extent, &mut buf, |at, out| {
            view.read_at(out, at).map_err(|e| {
                let text = e.to_string();
                failed = Some(e);
                std::io::Error::other(text)
            })
        });
        if let Err(e) = wrote {
            return Err(failed.take().unwrap_or_else(|| e.into()));
        }
    }
    let (out, summary) = writer.finish()?;
    Ok((out, summary.stream_bytes))
}

/// Runs of consecutive block numbers: (first, count).
fn block_runs(blocks: &RoaringBitmap) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut iter = blocks.iter().peekable();
    std::iter::from_fn(move || {
        let first = iter.next()?;
        let mut count = 1u64;
        while iter.peek() == Some(&(first + count as u32)) {
            iter.next();
            count += 1;
        }
        Some((u64::from(first), count))
    })
}

/// The 4 KiB blocks of every unit whose bytes on the DR disk hash otherwise than the
/// agent's `hashes` (a unit the agent has no hash for counts as differing).
fn differing_units<V: DrDisk>(
    view: &mut V,
    unit: u32,
    hashes: &[[u8; 32]],
) -> Result<RoaringBitmap, StoreError> {
    let size = view.size();
    let unit = u64::from(unit);
    let mut buf = vec![0u8; unit as usize];
    let mut blocks = RoaringBitmap::new();
    let mut at = 0u64;
    let mut index = 0usize;
    while at < size {
        let n = (size - at).min(unit) as usize;
        view.read_at(&mut buf[..n], at)?;
        if hashes.get(index) != Some(&ctk::digest::unit_hash(&buf[..n])) {
            add_range(&mut blocks, at, at + n as u64);
        }
        at += n as u64;
        index += 1;
    }
    Ok(blocks)
}
