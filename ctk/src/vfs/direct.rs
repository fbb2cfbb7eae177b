//! Direct I/O (`O_DIRECT`): what it asks of memory, offsets and lengths, and opening a file
//! for it where the filesystem allows (the agent's export reads, the receiver's first full).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// What direct I/O (`O_DIRECT`) asks of a buffer's address, a file offset and a length,
/// rounded up to cover the devices here: 4 KiB suits both 512-byte and 4 KiB logical
/// sectors.
pub const DIRECT_ALIGN: usize = 4096;

/// Whether `len` bytes at `offset` meet [`DIRECT_ALIGN`] (the memory must come from an
/// [`AlignedBuf`] too).
pub fn direct_fits_range(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64) && len.is_multiple_of(DIRECT_ALIGN) && len > 0
}

/// Whether a direct read or write of `buf` at `offset` meets [`DIRECT_ALIGN`]: the offset,
/// the length and the buffer's address.
pub fn direct_fits(offset: u64, buf: &[u8]) -> bool {
    direct_fits_range(offset, buf.len()) && buf.as_ptr().align_offset(DIRECT_ALIGN) == 0
}

/// A zeroed heap buffer whose first byte sits on a [`DIRECT_ALIGN`] boundary, for direct
/// I/O. Safe code: it over-allocates by one alignment and hands out the aligned window.
pub struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let bytes = vec![0u8; len + DIRECT_ALIGN];
        // Always below DIRECT_ALIGN for a byte pointer; `min` only keeps the slice in range
        // should that ever not hold (the buffer is then merely unaligned: I/O goes buffered).
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBuf { bytes, start, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// Whether direct I/O may be used: yes unless the environment says `CTK_DIRECT_IO=off`
/// (for a filesystem that accepts `O_DIRECT` but misbehaves with it, and for tests of the
/// buffered paths).
pub fn direct_io_allowed() -> bool {
    !matches!(
        std::env::var("CTK_DIRECT_IO").as_deref(),
        Ok("off" | "0" | "no" | "false")
    )
}

/// Opens `path` for direct I/O, read-only or read-write: `None` where that is turned off
/// ([`direct_io_allowed`]) or the filesystem refuses `O_DIRECT` (EINVAL). I/O on it needs
/// [`direct_fits`]. Mixing it with a buffered descriptor of the same file is coherent: a
/// direct read first writes back the dirty cached pages of its range, and a direct write
/// drops the cached pages it covers.
pub fn open_direct(path: &Path, write: bool) -> io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    if !direct_io_allowed() {
        return Ok(None);
    }
    match OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}
