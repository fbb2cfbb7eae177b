//! The one narrow door between the journal and the media.
//!
//! All journal I/O goes through [`JournalStorage`], so tests can put a storage under it that
//! forgets or tears everything not yet synced, or fails a sync (the redb approach).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An append-only file with atomic replacement.
///
/// Assumptions about the media (documented in docs/format.md): `sync` makes every byte
/// appended before it durable; `replace` is atomic (after a crash the old or the new
/// contents are there, whole) and durable when it returns; bytes appended but not synced may
/// be lost, kept in part, or torn into garbage at a crash.
pub trait JournalStorage {
    /// Length of the journal, or `None` if there is none.
    fn stored_len(&mut self) -> io::Result<Option<u64>>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Appends bytes (not durable until `sync`).
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// Makes every appended byte durable.
    fn sync(&mut self) -> io::Result<()>;
    /// Atomically and durably replaces the whole journal with `data`.
    fn replace(&mut self, data: &[u8]) -> io::Result<()>;
    /// A sync to run later without this storage: when run, it makes durable every byte
    /// appended before it was made (later ones too, perhaps). It lets a caller release its
    /// locks around the fsync. If the journal is replaced in between, the replacement was
    /// durable already and the sync is harmless.
    fn syncer(&mut self) -> io::Result<Syncer>;
}

/// A detached sync made by [`JournalStorage::syncer`].
pub struct Syncer(Box<dyn FnOnce() -> io::Result<()> + Send>);

impl Syncer {
    pub fn new(sync: impl FnOnce() -> io::Result<()> + Send + 'static) -> Syncer {
        Syncer(Box::new(sync))
    }

    /// Runs the sync.
    pub fn run(self) -> io::Result<()> {
        (self.0)()
    }
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Syncer")
    }
}

/// The sidecar file beside a disk (the role of VMware's `-ctk` file).
pub struct FileStorage {
    path: PathBuf,
    file: Option<File>,
}

impl FileStorage {
    /// Storage at `path`; nothing is created until the journal writes.
    pub fn new(path: impl Into<PathBuf>) -> FileStorage {
        FileStorage {
            path: path.into(),
            file: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .append(true)
                .open(&self.path)?;
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    fn sync_dir(&self) -> io::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }
}

impl JournalStorage for FileStorage {
    fn stored_len(&mut self) -> io::Result<Option<u64>> {
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file()?.read_exact_at(buf, offset)
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file()?.write_all(data)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file()?.sync_data()
    }

    fn syncer(&mut self) -> io::Result<Syncer> {
        // fsync on a second descriptor of the same open file flushes the same inode.
        let file = self.file()?.try_clone()?;
        Ok(Syncer::new(move || file.sync_data()))
    }

    fn replace(&mut self, data: &[u8]) -> io::Result<()> {
        let mut tmp_name = self.path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            file.write_all(data)?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        self.sync_dir()?;
        self.file = None;
        Ok(())
    }
}

/// How a simulated crash treats bytes appended since the last sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Everything not synced is gone.
    DropUnsynced,
    /// The first `n` unsynced bytes survive (a partial writeback).
    KeepPrefix(usize),
    /// The first `n` unsynced bytes survive, followed by `garbage` bytes of noise seeded by
    /// `seed` (a torn sector).
    Torn {
        keep: usize,
        garbage: usize,
        seed: u64,
    },
    /// Everything survives (a process kill: the page cache outlives the process).
    KeepAll,
}

#[derive(Debug, Default)]
struct MemDisk {
    /// `None` while no journal exists.
    data: Option<Vec<u8>>,
    synced_len: usize,
    syncs: u64,
    fail_sync_at: Option<u64>,
    fail_append: bool,
    /// Bumped by every replace, so a detached sync made before one knows it is moot.
    replaced: u64,
}

/// An in-memory journal store that knows what is durable, for crash tests and simulation.
/// Clones share the same simulated media.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    disk: Arc<Mutex<MemDisk>>,
}

impl MemStorage {
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    fn disk(&self) -> std::sync::MutexGuard<'_, MemDisk> {
        // A panic elsewhere in a test must not hide the media from the checker.
        self.disk.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Simulates a power loss: unsynced bytes are treated as `mode` says.
    pub fn crash(&self, mode: CrashMode) {
        let mut disk = self.disk();
        let synced = disk.synced_len;
        if let Some(data) = disk.data.as_mut() {
            let unsynced = data.len() - synced;
            match mode {
                CrashMode::DropUnsynced => data.truncate(synced),
                CrashMode::KeepPrefix(n) => data.truncate(synced + n.min(unsynced)),
                CrashMode::Torn {
                    keep,
                    garbage,
                    seed,
                } => {
                    let keep = keep.min(unsynced);
                    let garbage = garbage.min(unsynced - keep);
                    data.truncate(synced + keep + garbage);
                    let mut x = seed | 1;
                    for byte in &mut data[synced + keep..] {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *byte = x as u8;
                    }
                }
                CrashMode::KeepAll => {}
            }
            disk.synced_len = data.len();
        }
        // A sync made before the crash must not vouch for what is written after it.
        disk.replaced += 1;
    }

    /// The `n`th sync from now (0: the next one) fails, and so does every later one.
    pub fn fail_sync_after(&self, n: u64) {
        let mut disk = self.disk();
        disk.fail_sync_at = Some(disk.syncs + n);
    }

    /// Appends fail from now on (a full disk).
    pub fn fail_appends(&self, fail: bool) {
        self.disk().fail_append = fail;
    }

    /// Heals injected failures (the media came back; the journal must still be reopened).
    pub fn heal(&self) {
        let mut disk = self.disk();
        disk.fail_sync_at = None;
        disk.fail_append = false;
    }

    /// The stored bytes, as a reopen after a crash would see them.
    pub fn contents(&self) -> Option<Vec<u8>> {
        self.disk().data.clone()
    }

    /// Overwrites the stored bytes (to corrupt them on purpose); they count as durable.
    pub fn set_contents(&self, data: Option<Vec<u8>>) {
        let mut disk = self.disk();
        disk.synced_len = data.as_ref().map_or(0, Vec::len);
        disk.data = data;
        disk.replaced += 1;
    }

    pub fn syncs(&self) -> u64 {
        self.disk().syncs
    }

    /// Makes the first `len` bytes durable, unless the journal was replaced since `replaced`
    /// (the replacement is durable whole). Counts as a sync for `fail_sync_after`.
    fn sync_upto(&self, len: usize, replaced: u64) -> io::Result<()> {
        let mut disk = self.disk();
        let n = disk.syncs;
        disk.syncs += 1;
        if disk.fail_sync_at.is_some_and(|at| n >= at) {
            // Like Linux after a writeback error: the dirty bytes may or may not be there.
            return Err(io::Error::other("simulated fsync failure"));
        }
        if disk.replaced == replaced {
            let len = len.min(disk.data.as_ref().map_or(0, Vec::len));
            disk.synced_len = disk.synced_len.max(len);
        }
        Ok(())
    }
}

impl JournalStorage for MemStorage {
    fn stored_len(&mut self) -> io::Result<Option<u64>> {
        Ok(self.disk().data.as_ref().map(|d| d.len() as u64))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let disk = self.disk();
        let data = disk
            .data
            .as_ref()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let src = data.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut disk = self.disk();
        if disk.fail_append {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "simulated full disk",
            ));
        }
        disk.data
            .get_or_insert_with(Vec::new)
            .extend_from_slice(bytes);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        let len = self.disk().data.as_ref().map_or(0, Vec::len);
        let replaced = self.disk().replaced;
        self.sync_upto(len, replaced)
    }

    fn syncer(&mut self) -> io::Result<Syncer> {
        let (len, replaced) = {
            let disk = self.disk();
            (disk.data.as_ref().map_or(0, Vec::len), disk.replaced)
        };
        let this = self.clone();
        Ok(Syncer::new(move || this.sync_upto(len, replaced)))
    }

    fn replace(&mut self, data: &[u8]) -> io::Result<()> {
        let mut disk = self.disk();
        let n = disk.syncs;
        disk.syncs += 1;
        if disk.fail_sync_at.is_some_and(|at| n >= at) || disk.fail_append {
            return Err(io::Error::other(
                "simulated failure while replacing the journal",
            ));
        }
        disk.data = Some(data.to_vec());
        disk.synced_len = data.len();
        disk.replaced += 1;
        Ok(())
    }
}
