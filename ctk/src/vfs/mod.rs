//! The narrow door between the receiver's store (and the leaf files) and a filesystem.
//!
//! Everything the store does to its files goes through [`Vfs`] and [`FileAt`], so the same
//! code runs on the real filesystem ([`RealFs`]) and on [`SimFs`], an in-memory filesystem
//! that models what a power cut does: every byte written but not fsynced may be kept,
//! dropped or torn, and every name created, renamed or removed since the last directory sync
//! may or may not have reached the disk (in order, as a journaling filesystem commits them).
//! It also fails fsyncs (and then forgets the unsynced data, as Linux does after a writeback
//! error), runs out of space, and "crashes" after a given number of operations: every later
//! operation fails until [`SimFs::crash`] applies the power cut. The deterministic
//! simulation (`ctk-sim`) runs the receiver's store on it.
//!
//! Assumptions about real media, which SimFs encodes: `sync` of a file makes its data and
//! size durable, not its name; `sync_dir` makes every name operation before it durable;
//! a rename is atomic; unsynced data may reach the disk in any order and in pieces of 512
//! bytes.

mod direct;
mod sim;

pub use direct::{
    AlignedBuf, DIRECT_ALIGN, direct_fits, direct_fits_range, direct_io_allowed, open_direct,
};
pub use sim::{SimFaults, SimFs, SimFsStats};

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A file read and written by position.
#[allow(clippy::len_without_is_empty)] // a file's length, not a collection's
pub trait FileAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes `buf` at `offset` (not durable until `sync`).
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's data and size durable (not its name: see [`Vfs::sync_dir`]).
    fn sync(&self) -> io::Result<()>;

    /// Zeros `[offset, offset + length)` without changing the size (a hole where the
    /// filesystem can punch one).
    fn zero(&self, offset: u64, length: u64) -> io::Result<()> {
        let zeros = vec![0u8; length.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + length {
            let n = (offset + length - pos).min(zeros.len() as u64) as usize;
            self.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// A hint that `[offset, offset + length)` will be read soon: the kernel may start
    /// reading it now, alongside other such ranges, instead of one read at a time when
    /// asked. Only a hint; the default does nothing.
    fn will_need(&self, _offset: u64, _length: u64) {}

    /// A hint that `[offset, offset + length)` is written and will be synced: the kernel may
    /// start writing it back now, so the `sync` after finds less to do. Only a hint (not
    /// durable, errors surface at the `sync`); the default does nothing.
    fn start_writeback(&self, _offset: u64, _length: u64) {}

    /// The first offset at or after `pos` where the file holds data (SEEK_DATA); `None` when
    /// only a hole follows. The default knows no holes: everything before the end is data.
    fn next_data(&self, pos: u64) -> io::Result<Option<u64>> {
        Ok((pos < self.len()?).then_some(pos))
    }

    /// The first offset at or after `pos` where the file has a hole (SEEK_HOLE; the end of
    /// the file counts as one). The default knows no holes but the end.
    fn next_hole(&self, pos: u64) -> io::Result<u64> {
        Ok(self.len()?.max(pos))
    }

    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl FileAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        let m = self.metadata()?;
        if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) {
            // A device's metadata says 0: its size is where its end is (the file position
            // moves, which positional I/O never uses).
            return io::Seek::seek(&mut &*self, io::SeekFrom::End(0));
        }
        Ok(m.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_all()
    }
    fn zero(&self, offset: u64, length: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on an open descriptor with in-range arguments touches no memory.
        let rc = unsafe { libc::fallocate(self.as_raw_fd(), mode, offset as i64, length as i64) };
        if rc == 0 {
            return Ok(());
        }
        // No hole punching here (tmpfs of old, some network filesystems): write the zeros.
        let zeros = vec![0u8; length.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + length {
            let n = (offset + length - pos).min(zeros.len() as u64) as usize;
            FileExt::write_all_at(self, &zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
    fn will_need(&self, offset: u64, length: u64) {
        // SAFETY: fadvise on an open descriptor touches no memory; a failure only loses
        // the hint.
        unsafe {
            libc::posix_fadvise(
                self.as_raw_fd(),
                offset as i64,
                length as i64,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }
    fn start_writeback(&self, offset: u64, length: u64) {
        // SAFETY: sync_file_range on an open descriptor touches no memory; a failure only
        // loses the hint (a write error is reported by the fsync that follows).
        unsafe {
            libc::sync_file_range(
                self.as_raw_fd(),
                offset as i64,
                length as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }
    fn next_data(&self, pos: u64) -> io::Result<Option<u64>> {
        // SAFETY: lseek on an open descriptor touches no memory.
        let r = unsafe { libc::lseek(self.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            // No holes to ask about (a block device): all data up to the end.
            Some(libc::EINVAL) => Ok((pos < FileAt::len(self)?).then_some(pos)),
            _ => Err(e),
        }
    }
    fn next_hole(&self, pos: u64) -> io::Result<u64> {
        // SAFETY: lseek on an open descriptor touches no memory.
        let r = unsafe { libc::lseek(self.as_raw_fd(), pos as i64, libc::SEEK_HOLE) };
        if r >= 0 {
            return Ok(r as u64);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) => Ok(FileAt::len(self)?.max(pos)),
            _ => Err(e),
        }
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl<F: FileAt + ?Sized> FileAt for Box<F> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_all_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn zero(&self, offset: u64, length: u64) -> io::Result<()> {
        (**self).zero(offset, length)
    }
    fn will_need(&self, offset: u64, length: u64) {
        (**self).will_need(offset, length)
    }
    fn start_writeback(&self, offset: u64, length: u64) {
        (**self).start_writeback(offset, length)
    }
    fn next_data(&self, pos: u64) -> io::Result<Option<u64>> {
        (**self).next_data(pos)
    }
    fn next_hole(&self, pos: u64) -> io::Result<u64> {
        (**self).next_hole(pos)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// A file read or written in sequence (for `BufReader` / `BufWriter`), from `position`.
pub struct Cursor<F> {
    pub file: F,
    pub position: u64,
}

impl<F: FileAt> Cursor<F> {
    pub fn new(file: F) -> Cursor<F> {
        Cursor { file, position: 0 }
    }
}

impl<F: FileAt> Read for Cursor<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.position)?;
        self.position += n as u64;
        Ok(n)
    }
}

impl<F: FileAt> Write for Cursor<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all_at(buf, self.position)?;
        self.position += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<F: FileAt> Seek for Cursor<F> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => {
                self.position = p;
                return Ok(p);
            }
            SeekFrom::End(d) => (self.file.len()?, d),
            SeekFrom::Current(d) => (self.position, d),
        };
        self.position = base
            .0
            .checked_add_signed(base.1)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.position)
    }
}

/// Held while a store is locked; dropping it unlocks.
pub type LockGuard = Box<dyn Send + Sync>;

/// The filesystem operations the store uses.
pub trait Vfs: Send + Sync {
    /// Opens an existing file for reading.
    fn open(&self, path: &Path) -> io::Result<Box<dyn FileAt>>;
    /// Opens a file for reading and writing, creating it empty if it does not exist.
    fn open_rw(&self, path: &Path) -> io::Result<Box<dyn FileAt>>;
    /// Creates a file, or truncates an existing one, for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn FileAt>>;
    /// Replaces `to` with `from` atomically (durable after `sync_dir`).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names in a directory, sorted.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Makes every name operation in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// An exclusive lock named by `path` for as long as the guard lives; `wait` to block
    /// rather than fail when another process holds it.
    fn lock(&self, path: &Path, wait: bool) -> io::Result<LockGuard>;
    /// A second, direct-I/O handle on an existing file, for bulk writes that should bypass
    /// the page cache ([`open_direct`]); `None` where there is none (the caller then writes
    /// through its ordinary handle). Its writes are durable only after a `sync` of the file,
    /// like any other.
    fn open_direct(&self, _path: &Path) -> io::Result<Option<Box<dyn FileAt>>> {
        Ok(None)
    }
}

/// The real filesystem.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

impl Vfs for RealFs {
    fn open(&self, path: &Path) -> io::Result<Box<dyn FileAt>> {
        Ok(Box::new(File::open(path)?))
    }
    fn open_rw(&self, path: &Path) -> io::Result<Box<dyn FileAt>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        Ok(Box::new(f))
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn FileAt>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Box::new(f))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn lock(&self, path: &Path, wait: bool) -> io::Result<LockGuard> {
        let lock = File::create(path)?;
        let mode = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        // SAFETY: flock on an open descriptor touches no memory.
        if unsafe { libc::flock(lock.as_raw_fd(), mode) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Box::new(lock))
    }
    fn open_direct(&self, path: &Path) -> io::Result<Option<Box<dyn FileAt>>> {
        Ok(open_direct(path, true)?.map(|f| Box::new(f) as Box<dyn FileAt>))
    }
}
