//! What the disk tells about ranges of itself, for BLOCK_STATUS (the NBD front builds the
//! runs): where the backing has holes, and which blocks changed since a ChangeId.

use std::io;
use std::os::fd::AsRawFd;

use ctk::{ChangeId, Since};
use roaring::RoaringBitmap;

use super::{DiskError, ProtectedDisk};

impl ProtectedDisk {
    /// The first offset at or after `pos` where the backing holds data (SEEK_DATA); `None`
    /// when only a hole follows. An error for a backing that cannot tell.
    pub fn next_data(&self, pos: u64) -> io::Result<Option<u64>> {
        // SAFETY: lseek on an open descriptor touches no memory.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// The first offset at or after `pos` where the backing has a hole (SEEK_HOLE; the end
    /// of the file counts as one).
    pub fn next_hole(&self, pos: u64) -> io::Result<u64> {
        // SAFETY: lseek on an open descriptor touches no memory.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), pos as i64, libc::SEEK_HOLE) };
        if r >= 0 {
            Ok(r as u64)
        } else {
            Err(io::Error::last_os_error())
        }
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
