//! The image digest of a push: the leaves of the receiver's newest point, kept beside the
//! journal, completed with the exported blocks' leaves.

use std::io::Read;
use std::path::Path;

use anyhow::Result;
use ctk::ChangeId;
use ctk::digest::{LeafFile, Leaves};

/// The leaves of the image as of the export's cut: those of the receiver's newest point
/// (`newest`, from `leaf_path`; zeros before a first full) with the (block, leaf) pairs the
/// export computed. `None`, with a warning, when they cannot be known: the leaf file is
/// missing or of another point (it was lost, or another cursor wrote to the receiver), the
/// disk changed size, or the disk is too large to digest. The point is then committed
/// unchecked.
pub(super) fn leaves_after(
    leaf_path: &Path,
    newest: Option<ChangeId>,
    disk_size: u64,
    block_size: u32,
    pairs: &Path,
) -> Result<Option<Leaves>> {
    let base = match newest {
        None => Some(Leaves::zeroed(disk_size, block_size)),
        Some(at) => LeafFile::load(leaf_path, at)?.map(Ok),
    };
    let mut leaves = match base {
        Some(Ok(l)) if l.disk_size() == disk_size && l.block_size() == block_size => l,
        // The disk was resized since that point: the export carries every block from the
        // smaller end on (the tracker reports them changed), so the pairs below complete
        // the leaves of the new size.
        Some(Ok(mut l)) if l.block_size() == block_size => {
            l.resize(disk_size)?;
            l
        }
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
    let mut input = std::io::BufReader::new(std::fs::File::open(pairs)?);
    let mut pair = [0u8; 16];
    loop {
        match input.read_exact(&mut pair) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let block = u64::from_le_bytes(pair[..8].try_into().expect("8"));
        let leaf = u64::from_le_bytes(pair[8..].try_into().expect("8"));
        leaves.set_leaf(block, leaf)?;
    }
    Ok(Some(leaves))
}
