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

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

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
        Ok(self.metadata()?.len())
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

/// How often SimFs misbehaves, and when it "loses power".
#[derive(Clone, Debug, Default)]
pub struct SimFaults {
    /// Chance, in 1/1000, that a file or directory sync fails (EIO).
    pub sync_fail_per_mille: u32,
    /// Total bytes the files may hold; past it writes fail with ENOSPC.
    pub capacity: Option<u64>,
    /// Chance, in 1/1000, that a read returns wrong bytes without an error: a bit flipped,
    /// or the bytes of another place in the file (a misdirected read). What is stored is
    /// not changed; reading again may give the right bytes.
    pub bad_read_per_mille: u32,
}

/// What SimFs did, for the simulation's report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimFsStats {
    pub crashes: u64,
    /// Reads that returned wrong bytes (`bad_read_per_mille`).
    pub bad_reads: u64,
    pub syncs_failed: u64,
    pub enospc: u64,
    /// Unsynced writes at crashes: kept whole, dropped, torn.
    pub writes_kept: u64,
    pub writes_dropped: u64,
    pub writes_torn: u64,
    /// Unsynced name operations at crashes: kept, lost.
    pub names_kept: u64,
    pub names_lost: u64,
}

/// An in-memory filesystem that loses what was not synced when told to crash. Deterministic:
/// every choice comes from the seed it was made with.
#[derive(Clone)]
pub struct SimFs(Arc<Mutex<SimState>>);

#[derive(Clone, Debug)]
enum DataOp {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Clone, Debug)]
enum NameOp {
    Link { path: PathBuf, ino: u64 },
    Unlink { path: PathBuf },
    Rename { from: PathBuf, to: PathBuf },
}

#[derive(Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Operations since the last sync, in order.
    pending: Vec<DataOp>,
}

struct SimState {
    rng: u64,
    faults: SimFaults,
    inodes: BTreeMap<u64, Inode>,
    next_ino: u64,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    name_log: Vec<NameOp>,
    dirs: BTreeSet<PathBuf>,
    /// Operations left before the power goes (`None`: never).
    ops_left: Option<u64>,
    /// Syncs to fail on purpose: of this path, after this many more that succeed.
    planned_failures: Vec<(PathBuf, u32)>,
    down: bool,
    /// Bumped at each crash: handles from before it fail.
    epoch: u64,
    stats: SimFsStats,
    /// Name and sync operations, when a trace is asked for.
    log: Option<Vec<String>>,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn power_off() -> io::Error {
    io::Error::other("simulated power loss: the filesystem is gone until the crash is applied")
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

fn apply_op(data: &mut Vec<u8>, op: &DataOp) {
    match op {
        DataOp::Write { offset, bytes } => {
            let end = *offset as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*offset as usize..end].copy_from_slice(bytes);
        }
        DataOp::SetLen(len) => data.resize(*len as usize, 0),
    }
}

impl SimState {
    fn note(&mut self, what: impl FnOnce() -> String) {
        if let Some(log) = self.log.as_mut() {
            log.push(what());
        }
    }

    fn path_of(&self, ino: u64) -> String {
        self.names
            .iter()
            .find(|(_, i)| **i == ino)
            .map_or_else(|| format!("inode {ino}"), |(p, _)| p.display().to_string())
    }

    /// Whether the sync of `path` about to run fails: by plan, or by chance.
    fn sync_fails(&mut self, path: &Path) -> bool {
        if let Some(i) = self.planned_failures.iter().position(|(p, _)| p == path) {
            if self.planned_failures[i].1 == 0 {
                self.planned_failures.remove(i);
                return true;
            }
            self.planned_failures[i].1 -= 1;
        }
        let per_mille = self.faults.sync_fail_per_mille;
        self.roll(per_mille)
    }

    fn roll(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && splitmix(&mut self.rng) % 1000 < per_mille as u64
    }

    /// Counts one operation toward the power cut; fails once the power is gone.
    fn step(&mut self) -> io::Result<()> {
        if self.down {
            return Err(power_off());
        }
        if let Some(left) = self.ops_left.as_mut() {
            if *left == 0 {
                self.down = true;
                return Err(power_off());
            }
            *left -= 1;
        }
        Ok(())
    }

    fn used(&self) -> u64 {
        self.inodes.values().map(|i| i.data.len() as u64).sum()
    }

    fn grow_ok(&mut self, ino: u64, new_len: u64) -> io::Result<()> {
        let Some(cap) = self.faults.capacity else {
            return Ok(());
        };
        let old = self.inodes.get(&ino).map_or(0, |i| i.data.len() as u64);
        if new_len > old && self.used() + (new_len - old) > cap {
            self.stats.enospc += 1;
            return Err(enospc());
        }
        Ok(())
    }

    fn data_op(&mut self, ino: u64, op: DataOp) -> io::Result<()> {
        self.step()?;
        let new_len = match &op {
            DataOp::Write { offset, bytes } => {
                let cur = self.inodes.get(&ino).map_or(0, |i| i.data.len() as u64);
                cur.max(offset + bytes.len() as u64)
            }
            DataOp::SetLen(len) => *len,
        };
        self.grow_ok(ino, new_len)?;
        let inode = self.inodes.get_mut(&ino).ok_or_else(power_off)?;
        apply_op(&mut inode.data, &op);
        inode.pending.push(op);
        Ok(())
    }

    fn new_inode(&mut self) -> u64 {
        self.next_ino += 1;
        self.inodes.insert(self.next_ino, Inode::default());
        self.next_ino
    }

    fn parent_exists(&self, path: &Path) -> bool {
        path.parent()
            .is_none_or(|p| p.as_os_str().is_empty() || self.dirs.contains(p))
    }
}

struct SimFile {
    fs: SimFs,
    ino: u64,
    epoch: u64,
    writable: bool,
}

impl SimFile {
    fn state(&self) -> io::Result<MutexGuard<'_, SimState>> {
        let s = self.fs.lock_state();
        if s.epoch != self.epoch {
            return Err(power_off());
        }
        Ok(s)
    }
}

impl FileAt for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut s = self.state()?;
        s.step()?;
        let per_mille = s.faults.bad_read_per_mille;
        let bad = s.roll(per_mille);
        let pick = splitmix(&mut s.rng);
        let data = &s.inodes.get(&self.ino).ok_or_else(power_off)?.data;
        if offset >= data.len() as u64 {
            return Ok(0);
        }
        let n = buf.len().min(data.len() - offset as usize);
        let mut from = offset as usize;
        if bad && pick & 1 == 1 && data.len() > n {
            // Misdirected: the same length from another place in the file.
            from = (pick >> 1) as usize % (data.len() - n + 1);
        }
        buf[..n].copy_from_slice(&data[from..from + n]);
        if bad {
            if from == offset as usize {
                let bit = (pick >> 8) as usize % (n * 8);
                buf[bit / 8] ^= 1 << (bit % 8);
            }
            s.stats.bad_reads += 1;
            let ino = self.ino;
            s.note(|| match from == offset as usize {
                true => format!("bad read: a bit flipped in inode {ino} at {offset} (+{n})"),
                false => {
                    format!("bad read: inode {ino} at {offset} (+{n}) gave the bytes at {from}")
                }
            });
        }
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        let mut s = self.state()?;
        s.data_op(
            self.ino,
            DataOp::Write {
                offset,
                bytes: buf.to_vec(),
            },
        )
    }
    fn len(&self) -> io::Result<u64> {
        let mut s = self.state()?;
        s.step()?;
        Ok(s.inodes.get(&self.ino).ok_or_else(power_off)?.data.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        self.state()?.data_op(self.ino, DataOp::SetLen(len))
    }
    fn sync(&self) -> io::Result<()> {
        let mut s = self.state()?;
        s.step()?;
        let fail = match s.names.iter().find(|(_, i)| **i == self.ino) {
            Some((path, _)) => {
                let path = path.clone();
                s.sync_fails(&path)
            }
            None => {
                let per_mille = s.faults.sync_fail_per_mille;
                s.roll(per_mille)
            }
        };
        if s.log.is_some() {
            let path = s.path_of(self.ino);
            s.note(|| format!("fs: sync {path}{}", if fail { " FAILED (EIO)" } else { "" }));
        }
        let inode = s.inodes.get_mut(&self.ino).ok_or_else(power_off)?;
        if fail {
            // As Linux after a writeback error: the pages are marked clean, so what was not
            // yet on disk never will be, though reads still see it until a crash.
            inode.pending.clear();
            s.stats.syncs_failed += 1;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // What was pending reaches the disk; what a failed sync dropped does not, even
        // though reads still see it.
        for op in std::mem::take(&mut inode.pending) {
            apply_op(&mut inode.durable, &op);
        }
        Ok(())
    }
}

impl SimFs {
    pub fn new(seed: u64, faults: SimFaults) -> SimFs {
        let mut dirs = BTreeSet::new();
        dirs.insert(PathBuf::from("/"));
        SimFs(Arc::new(Mutex::new(SimState {
            rng: seed ^ 0x5eed_f11e_5eed_f11e,
            faults,
            inodes: BTreeMap::new(),
            next_ino: 0,
            names: BTreeMap::new(),
            durable_names: BTreeMap::new(),
            name_log: Vec::new(),
            dirs,
            ops_left: None,
            planned_failures: Vec::new(),
            down: false,
            epoch: 0,
            stats: SimFsStats::default(),
            log: None,
        })))
    }

    fn lock_state(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock cannot leave the state half changed in a way that
        // matters to a crash model, so a poisoned lock is taken as it is.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The power goes after `ops` more operations (reads included): from then on every
    /// operation fails until [`SimFs::crash`].
    pub fn power_cut_after(&self, ops: u64) {
        self.lock_state().ops_left = Some(ops);
    }

    /// Starts or stops recording name and sync operations (see `take_log`).
    pub fn set_trace(&self, on: bool) {
        self.lock_state().log = on.then(Vec::new);
    }

    /// The operations recorded since the last call.
    pub fn take_log(&self) -> Vec<String> {
        self.lock_state()
            .log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The sync of `path` (a file or a directory) after `skip` more that succeed fails
    /// with EIO (a regression test's exact fault). One plan per path.
    pub fn fail_sync_of(&self, path: &Path, skip: u32) {
        let mut s = self.lock_state();
        s.planned_failures.retain(|(p, _)| p != path);
        s.planned_failures.push((path.to_path_buf(), skip));
    }

    /// Calls off a power cut set by `power_cut_after` that has not happened yet.
    pub fn cancel_power_cut(&self) {
        self.lock_state().ops_left = None;
    }

    /// Whether the power has gone (a cut set by `power_cut_after` was reached).
    pub fn is_down(&self) -> bool {
        self.lock_state().down
    }

    pub fn set_faults(&self, faults: SimFaults) {
        self.lock_state().faults = faults;
    }

    pub fn stats(&self) -> SimFsStats {
        self.lock_state().stats.clone()
    }

    /// The power cut: names keep the durable set plus an in-order prefix of the name
    /// operations since (a journal commits them in order); each file keeps its synced
    /// contents plus, of each unsynced write, all, none or some 512-byte pieces. Open handles
    /// die; the filesystem is up again afterwards.
    pub fn crash(&self) {
        let mut s = self.lock_state();
        let s = &mut *s;
        s.stats.crashes += 1;
        let log = std::mem::take(&mut s.name_log);
        let keep = (splitmix(&mut s.rng) % (log.len() as u64 + 1)) as usize;
        let lost = log.len() - keep;
        s.note(|| format!("fs: CRASH: {keep} unsynced name operations kept, {lost} lost"));
        s.stats.names_kept += keep as u64;
        s.stats.names_lost += (log.len() - keep) as u64;
        let mut names = s.durable_names.clone();
        for op in &log[..keep] {
            apply_name(&mut names, op);
        }
        let inos: Vec<u64> = s.inodes.keys().copied().collect();
        for ino in inos {
            let pending = std::mem::take(&mut s.inodes.get_mut(&ino).expect("listed").pending);
            let mut data = s.inodes[&ino].durable.clone();
            for op in pending {
                match splitmix(&mut s.rng) % 8 {
                    0..=3 => {
                        s.stats.writes_kept += 1;
                        apply_op(&mut data, &op);
                    }
                    4..=6 => s.stats.writes_dropped += 1,
                    _ => {
                        s.stats.writes_torn += 1;
                        if let DataOp::Write { offset, bytes } = op {
                            // Some 512-byte pieces of the write made it, some did not.
                            for (i, piece) in bytes.chunks(512).enumerate() {
                                if splitmix(&mut s.rng) & 1 == 0 {
                                    let op = DataOp::Write {
                                        offset: offset + (i * 512) as u64,
                                        bytes: piece.to_vec(),
                                    };
                                    apply_op(&mut data, &op);
                                }
                            }
                        }
                    }
                }
            }
            let inode = s.inodes.get_mut(&ino).expect("listed");
            inode.durable = data.clone();
            inode.data = data;
        }
        let live: BTreeSet<u64> = names.values().copied().collect();
        s.inodes.retain(|ino, _| live.contains(ino));
        s.durable_names = names.clone();
        s.names = names;
        s.ops_left = None;
        s.down = false;
        s.epoch += 1;
    }

    /// A file's current contents (what a read sees), for checkers.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.lock_state();
        let ino = s.names.get(path)?;
        Some(s.inodes[ino].data.clone())
    }

    /// The names under `dir` (recursively), for reports.
    pub fn files_under(&self, dir: &Path) -> Vec<(PathBuf, u64)> {
        let s = self.lock_state();
        s.names
            .iter()
            .filter(|(p, _)| p.starts_with(dir))
            .map(|(p, ino)| (p.clone(), s.inodes[ino].data.len() as u64))
            .collect()
    }

    fn handle(&self, s: &SimState, ino: u64, writable: bool) -> Box<dyn FileAt> {
        Box::new(SimFile {
            fs: self.clone(),
            ino,
            epoch: s.epoch,
            writable,
        })
    }

    /// `open_rw`, or `create` (which truncates) when `truncate`.
    fn open_writable(&self, path: &Path, truncate: bool) -> io::Result<Box<dyn FileAt>> {
        let mut s = self.lock_state();
        s.step()?;
        if truncate {
            s.note(|| format!("fs: create {}", path.display()));
        }
        let ino = match s.names.get(path) {
            Some(&ino) => {
                if truncate {
                    s.data_op(ino, DataOp::SetLen(0))?;
                }
                ino
            }
            None => {
                if !s.parent_exists(path) {
                    return Err(not_found());
                }
                let ino = s.new_inode();
                let path = path.into();
                Self::name_op(&mut s, NameOp::Link { path, ino });
                ino
            }
        };
        Ok(self.handle(&s, ino, true))
    }

    fn name_op(s: &mut SimState, op: NameOp) {
        apply_name(&mut s.names, &op);
        s.name_log.push(op);
    }
}

fn apply_name(names: &mut BTreeMap<PathBuf, u64>, op: &NameOp) {
    match op {
        NameOp::Link { path, ino } => {
            names.insert(path.clone(), *ino);
        }
        NameOp::Unlink { path } => {
            names.remove(path);
        }
        NameOp::Rename { from, to } => {
            if let Some(ino) = names.remove(from) {
                names.insert(to.clone(), ino);
            }
        }
    }
}

fn not_found() -> io::Error {
    io::ErrorKind::NotFound.into()
}

impl Vfs for SimFs {
    fn open(&self, path: &Path) -> io::Result<Box<dyn FileAt>> {
        let mut s = self.lock_state();
        s.step()?;
        let ino = *s.names.get(path).ok_or_else(not_found)?;
        Ok(self.handle(&s, ino, false))
    }
    fn open_rw(&self, path: &Path) -> io::Result<Box<dyn FileAt>> {
        self.open_writable(path, false)
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn FileAt>> {
        self.open_writable(path, true)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock_state();
        s.step()?;
        if !s.names.contains_key(from) {
            return Err(not_found());
        }
        if !s.parent_exists(to) {
            return Err(not_found());
        }
        s.note(|| format!("fs: rename {} -> {}", from.display(), to.display()));
        Self::name_op(
            &mut s,
            NameOp::Rename {
                from: from.into(),
                to: to.into(),
            },
        );
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock_state();
        s.step()?;
        if !s.names.contains_key(path) {
            return Err(not_found());
        }
        s.note(|| format!("fs: remove {}", path.display()));
        Self::name_op(&mut s, NameOp::Unlink { path: path.into() });
        Ok(())
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock_state();
        s.step()?;
        // Directories are taken as durable once made: the store makes its few at open, and
        // a lost one would only fail the next open, not change what it holds.
        for a in path.ancestors() {
            if !a.as_os_str().is_empty() {
                s.dirs.insert(a.to_path_buf());
            }
        }
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut s = self.lock_state();
        s.step()?;
        if !s.dirs.contains(dir) {
            return Err(not_found());
        }
        Ok(s.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock_state();
        s.step()?;
        if !s.dirs.contains(dir) {
            return Err(not_found());
        }
        let fail = s.sync_fails(dir);
        s.note(|| {
            format!(
                "fs: sync dir {}{}",
                dir.display(),
                if fail { " FAILED (EIO)" } else { "" }
            )
        });
        if fail {
            s.stats.syncs_failed += 1;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // A journaling filesystem commits name operations in order: syncing one directory
        // commits every operation logged before (so this is generous only to operations in
        // other directories, which the store syncs itself where it relies on them).
        let log = std::mem::take(&mut s.name_log);
        for op in &log {
            let mut names = std::mem::take(&mut s.durable_names);
            apply_name(&mut names, op);
            s.durable_names = names;
        }
        Ok(())
    }
    fn exists(&self, path: &Path) -> bool {
        let s = self.lock_state();
        !s.down && (s.names.contains_key(path) || s.dirs.contains(path))
    }
    fn lock(&self, _path: &Path, _wait: bool) -> io::Result<LockGuard> {
        // One process: the simulation opens a store at a time.
        self.lock_state().step()?;
        Ok(Box::new(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(fs: &SimFs, path: &str, bytes: &[u8], sync: bool) {
        let f = fs.create(Path::new(path)).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        if sync {
            f.sync().unwrap();
        }
    }

    #[test]
    fn synced_data_and_names_survive_every_crash_unsynced_may_not() {
        let mut lost_unsynced = 0;
        let mut kept_unsynced = 0;
        for seed in 0..200 {
            let fs = SimFs::new(seed, SimFaults::default());
            fs.create_dir_all(Path::new("/d")).unwrap();
            write(&fs, "/d/a", &[1u8; 4096], true);
            fs.sync_dir(Path::new("/d")).unwrap();
            write(&fs, "/d/b", &[2u8; 4096], true); // synced data, unsynced name
            let a = fs.open_rw(Path::new("/d/a")).unwrap();
            a.write_all_at(&[9u8; 2048], 1024).unwrap(); // unsynced overwrite
            fs.crash();
            let got = fs
                .read_file(Path::new("/d/a"))
                .expect("a synced name stays");
            assert_eq!(got.len(), 4096);
            assert!(got[..1024].iter().all(|&b| b == 1), "seed {seed}");
            assert!(got[3072..].iter().all(|&b| b == 1), "seed {seed}");
            if got[1024..3072].iter().all(|&b| b == 1) {
                lost_unsynced += 1;
            } else {
                kept_unsynced += 1;
            }
            // The old handle died with the power.
            assert!(a.read_at(&mut [0u8; 1], 0).is_err());
            if let Some(b) = fs.read_file(Path::new("/d/b")) {
                assert_eq!(
                    b,
                    vec![2u8; 4096],
                    "a name that made it has its synced data"
                );
            }
        }
        assert!(
            lost_unsynced > 20 && kept_unsynced > 20,
            "{lost_unsynced} {kept_unsynced}"
        );
    }

    #[test]
    fn rename_is_atomic_and_durable_after_the_directory_sync() {
        for seed in 0..100 {
            let fs = SimFs::new(seed, SimFaults::default());
            fs.create_dir_all(Path::new("/d")).unwrap();
            write(&fs, "/d/m", b"old", true);
            fs.sync_dir(Path::new("/d")).unwrap();
            write(&fs, "/d/m.tmp", b"new", true);
            fs.rename(Path::new("/d/m.tmp"), Path::new("/d/m")).unwrap();
            let synced = seed % 2 == 0;
            if synced {
                fs.sync_dir(Path::new("/d")).unwrap();
            }
            fs.crash();
            let m = fs.read_file(Path::new("/d/m")).unwrap();
            assert!(m == b"old" || m == b"new", "seed {seed}: {m:?}");
            if synced {
                assert_eq!(m, b"new");
            }
        }
    }

    #[test]
    fn power_cut_fails_everything_until_the_crash_and_space_runs_out() {
        let fs = SimFs::new(
            7,
            SimFaults {
                capacity: Some(8192),
                ..SimFaults::default()
            },
        );
        fs.create_dir_all(Path::new("/d")).unwrap();
        let f = fs.create(Path::new("/d/x")).unwrap();
        f.write_all_at(&[1; 8192], 0).unwrap();
        let e = f.write_all_at(&[1; 1], 8192).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        fs.power_cut_after(2);
        f.read_exact_at(&mut [0; 4], 0).unwrap();
        f.sync().unwrap();
        assert!(f.read_at(&mut [0; 4], 0).is_err());
        assert!(fs.is_down());
        assert!(fs.open(Path::new("/d/x")).is_err());
        fs.crash();
        assert_eq!(
            fs.read_file(Path::new("/d/x")),
            None,
            "its name was never synced"
        );
        assert!(!fs.is_down());
    }

    #[test]
    fn a_failed_sync_loses_the_data_at_the_next_crash_though_reads_saw_it() {
        let fs = SimFs::new(
            1,
            SimFaults {
                sync_fail_per_mille: 1000,
                ..SimFaults::default()
            },
        );
        fs.create_dir_all(Path::new("/d")).unwrap();
        let f = fs.create(Path::new("/d/x")).unwrap();
        f.write_all_at(b"data", 0).unwrap();
        assert!(f.sync().is_err());
        assert_eq!(fs.read_file(Path::new("/d/x")).unwrap(), b"data");
        fs.set_faults(SimFaults::default());
        f.sync().unwrap(); // "succeeds", as after fsyncgate
        assert!(fs.sync_dir(Path::new("/d")).is_ok());
        fs.crash();
        assert_eq!(fs.read_file(Path::new("/d/x")).unwrap(), b"");
    }
}
