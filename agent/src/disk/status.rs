//! What the disk tells about ranges of itself, for BLOCK_STATUS (the NBD front builds the
//! runs): where the backing has holes, and which blocks changed since a ChangeId.

use std::io;

use ctk::vfs::FileAt;
use ctk::{ChangeId, Since};
use roaring::RoaringBitmap;

use super::{DiskError, ProtectedDisk};

impl ProtectedDisk {
    /// The first offset at or after `pos` where the backing holds data (SEEK_DATA); `None`
    /// when only a hole follows. An error for a backing that cannot tell.
    pub fn next_data(&self, pos: u64) -> io::Result<Option<u64>> {
        FileAt::next_data(&self.file, pos)
    }

    /// The first offset at or after `pos` where the backing has a hole (SEEK_HOLE; the end
    /// of the file counts as one).
    pub fn next_hole(&self, pos: u64) -> io::Result<u64> {
        FileAt::next_hole(&self.file, pos)
    }

    /// The blocks of `[offset, offset + length)` written after `since`, in later cuts (durable
    /// or not) or not cut yet, and the block shift. Only that window is kept, so the answer's
    /// memory follows the request.
    pub fn changed_window(
        &self,
        since: ChangeId,
        offset: u64,
        length: u64,
    ) -> Result<(u32, RoaringBitmap), DiskError> {
        self.check(offset, length)?;
        self.with_tracker(|t| {
            let shift = t.geometry().block_shift();
            if length == 0 {
                return Ok((shift, RoaringBitmap::new()));
            }
            let (first, last) = (
                (offset >> shift) as u32,
                ((offset + length - 1) >> shift) as u32,
            );
            let mut all = t.changed_blocks_unconfirmed(Since::Id(since), t.map().latest())?;
            all |= t.map().open_blocks();
            let mut window = RoaringBitmap::new();
            window.insert_range(first..=last);
            Ok((shift, all & window))
        })
    }
}
