//! The receiver's store for one disk: a synthetic full and its restore points.
//!
//! Layout of `<store>/<disk>/`:
//! - `full.img`: the newest committed point as a sparse raw image (holes where zeros are).
//! - `undo/<generation>-<seq>.ctkd`: the reverse increment of each point but the oldest kept: the
//!   pre-images its merge overwrote, in the delta format (so every byte is CRC-checked). Its
//!   header names the merge's pair (previous point, this point) and the previous point's
//!   size; applied to this point's image, it gives the previous point's.
//! - `staging/<generation>-<seq>.ctkd`: a delta being merged.
//! - `manifest.json`: the committed points, and the merge in progress if any. Only ever
//!   replaced whole (write, fsync, rename, fsync the directory), so it is either the old or
//!   the new one after a crash. It carries a CRC32 of itself (version 2), checked at every
//!   read: what does not read back as written is refused, never used.
//!
//! Merge (crash-atomic): stage the whole delta and verify every CRC and the trailer -> write
//! the undo and make it durable -> record "applying" in the manifest -> apply to the full and
//! fsync it -> commit the point in the manifest -> drop the staged delta. Opened after a
//! crash with "applying" recorded, the store finishes the merge from the staged delta (it was
//! verified and durable before "applying" was written), or, if that is unreadable, rolls the
//! full back with the undo. Either way the newest committed point is intact, and a delta is
//! never half applied. A delta whose target point is already committed is acknowledged
//! without being applied twice.
//!
//! A first full into an empty store skips the staging: it is written into full.img as it
//! arrives, under an "applying" (direct) record, and anything that fails, or a crash,
//! empties the store again (there is no earlier point to protect).
//!
//! Restore reads each byte of the point once, from the oldest newer undo that holds it or
//! else the full, so its cost does not grow with the chain (see `restore`).
//!
//! Every merge's result is checked against the agent's digest of the image (see
//! `check_digest` and `ctk::digest`) before it is committed.

mod fence;
mod first_full;
pub mod groups;
mod leaves;
mod live;
mod manifest;
mod merge;
mod point_map;
mod recover;
mod restore;
mod resume;
mod retain;
mod stage;
mod undo;
mod write_behind;

pub use fence::{FailedOver, failed_over};
use leaves::{Checked, read_leaves};
pub use live::{Exposure, LiveReader, Pick, exposed, exposed_point};
use manifest::{Applying, MANIFEST_VERSION, Manifest, read_manifest};
pub use manifest::{DrillResult, NOTE_MAX, Point, PointMeta, Tested};
use merge::{Commit, apply_to, zero_range};
pub use point_map::{PointMap, Source};
use restore::Covered;
pub use restore::Verified;
pub use resume::Partial;
use resume::{PARTIAL_DELTA, PARTIAL_JSON};
use stage::{Replayed, Staged, cut_off_error, is_cut_off, peek_header};
use undo::{STAGED_UNDO, StagedUndo, UndoThread, UndoWriter};

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ctk::delta::{
    self, DeltaError, DeltaFile, DeltaHeader, DeltaReader, DeltaRecord, DeltaWriter, WriteOptions,
    is_zero,
};
use ctk::digest::{DigestError, ImageDigest, LeafFile, Leaves};
use ctk::vfs::{self, FileAt, LockGuard, RealFs, Vfs};
use ctk::{ChangeId, Consistency, Extent};
use serde::{Deserialize, Serialize};

use crate::retention::Retention;
use write_behind::WriteBehind;

/// Largest manifest read back (a few hundred bytes per point).
const MANIFEST_LEN_MAX: u64 = 16 << 20;
/// Most points one disk keeps, whatever `keep` says.
pub const POINTS_MAX: usize = 10_000;
/// Default number of restore points kept.
pub const KEEP_DEFAULT: usize = 30;
/// Copy and apply unit.
const CHUNK: usize = 1 << 20;
// The block a size change cuts into is read back in one chunk.
const _: () = assert!(CHUNK >= ctk::limits::BLOCK_SIZE_MAX as usize);
/// Reads of a pre-image tried before its mismatch with the block digests is taken as real.
const READ_ATTEMPTS: usize = 3;

/// Why the store refused or failed. Nothing committed is changed by any of these.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "disk name {0:?} is not valid: use 1-128 of A-Z a-z 0-9 . _ -, not starting with . or -"
    )]
    BadName(String),
    #[error("I/O error while {doing}")]
    Io {
        doing: String,
        #[source]
        source: io::Error,
    },
    #[error("the delta is damaged or malformed")]
    Delta(#[source] DeltaError),
    #[error("the delta does not fit this store: {0}")]
    Mismatch(String),
    #[error("the push is malformed: {0}")]
    Protocol(String),
    #[error("the store for disk {disk:?} is damaged: {why}")]
    Damaged { disk: String, why: String },
    #[error("no restore point {0} is kept")]
    NoSuchPoint(String),
    /// Another `serve` holds the store's root.
    #[error(
        "the store {} is served by another ctk-receiver{}: one receiver per store (stop it, \
         or give this one another --store)",
        root.display(),
        holder.map(|p| format!(" (process {p})")).unwrap_or_default()
    )]
    InUse { root: PathBuf, holder: Option<u32> },
    /// Another process exposes a point of this disk.
    #[error(
        "disk {disk:?} is already exposed by another process (one exposure per disk): stop \
         that one first"
    )]
    Exposed { disk: String },
    /// The disk is failed over (`fence`): no push commits until failback.
    #[error(
        "disk {disk:?} was failed over at the DR site at point {} on {}: its replica is the \
         recovered VM's disk now, so pushes are refused until failback (on the receiver: \
         `ctk-receiver failover status --disk {disk}`)",
        fence.point,
        fence.since_rfc3339()
    )]
    FailedOver { disk: String, fence: FailedOver },
    /// Failback asked for a disk that is not failed over.
    #[error(
        "disk {disk:?} is not failed over at the DR site: there is nothing to fail back \
         (replicate as usual)"
    )]
    NotFailedOver { disk: String },
    #[error(
        "the merged image does not match the agent's digest of it (agent {expected}, merged \
         {got}): nothing committed, the previous point stands"
    )]
    DigestMismatch {
        expected: ImageDigest,
        got: ImageDigest,
    },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<DeltaError> for StoreError {
    /// An I/O error reading or writing a delta file is the store's I/O error (a full or
    /// failing disk), not damage in the delta.
    fn from(e: DeltaError) -> StoreError {
        match e {
            DeltaError::Io(source) if source.kind() != io::ErrorKind::InvalidData => {
                StoreError::Io {
                    doing: "reading or writing a delta file".into(),
                    source,
                }
            }
            // Invalid data (a peer's chunk framing broken, say) is the delta's fault.
            e => StoreError::Delta(e),
        }
    }
}

fn io_err(doing: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    let doing = doing.into();
    move |source| StoreError::Io { doing, source }
}

/// The newest committed point of a disk, read without taking the store's lock: the
/// manifest is only ever replaced whole, so this sees one committed state or another (a
/// merge in progress is not a point yet). `None` for a disk never merged into.
pub fn newest_point(root: &Path, name: &str) -> Result<Option<ChangeId>> {
    Ok(committed_points(root, name)?.pop().map(|p| p.change_id))
}

/// The committed points of a disk, read without the store's lock (see `newest_point`).
pub fn committed_points(root: &Path, name: &str) -> Result<Vec<Point>> {
    committed_points_in(&RealFs, root, name)
}

/// `committed_points` through `fs`.
pub fn committed_points_in(fs: &dyn Vfs, root: &Path, name: &str) -> Result<Vec<Point>> {
    validate_name(name)?;
    let path = root.join(name).join("manifest.json");
    Ok(read_manifest(fs, &path, name)?.map_or_else(Vec::new, |m| m.points))
}

/// The lock a serving receiver holds on its store's root (`.lock`, which no agent's name can
/// be: names never start with a dot), for as long as it serves. The holder's process id is
/// written into it, for the error a second receiver gives.
pub fn lock_root(root: &Path) -> Result<std::fs::File> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let path = root.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(format!("creating {}", path.display())))?;
    // SAFETY: flock on an open descriptor touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse().ok());
            return Err(StoreError::InUse {
                root: root.to_owned(),
                holder,
            });
        }
        return Err(io_err(format!("locking {}", path.display()))(e));
    }
    file.set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(io_err(format!("writing {}", path.display())))?;
    Ok(file)
}

/// Validates an agent's name (`serve --allow NAME=...`): it becomes the directory of the
/// agent's disks, so it follows the rule of disk names.
pub fn validate_agent_name(name: &str) -> std::result::Result<(), String> {
    validate_name(name).map_err(|_| {
        format!(
            "agent name {:?} is not valid: use 1-128 of A-Z a-z 0-9 . _ -, not starting with . or -",
            name.chars().take(80).collect::<String>()
        )
    })
}

/// Validates a disk name: it becomes a directory name, so no path may come from outside.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.chars().take(80).collect()))
    }
}

/// What an ingest did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// Merged and committed as a new point.
    Committed { point: Point, dropped: usize },
    /// The point was committed already: acknowledged, nothing applied.
    AlreadyCommitted { change_id: ChangeId },
}

/// What opening a store found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    Clean,
    /// A merge in progress was finished from its staged delta.
    RolledForward(ChangeId),
    /// A merge in progress was undone; the newest committed point stands.
    RolledBack(ChangeId),
}

/// Test hook: `CTK_FAILPOINT=<name>` aborts the process at that step of a merge, so tests
/// can crash it exactly there (a SIGKILL at a random moment covers the rest).
fn failpoint(name: &str) {
    if std::env::var("CTK_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Where a store reads the time (commit stamps, retention by age).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

pub struct DiskStore {
    name: String,
    dir: PathBuf,
    manifest: Manifest,
    /// Every file operation goes through here: the real filesystem, or the simulation's.
    fs: Arc<dyn Vfs>,
    /// Milliseconds since the epoch: the system clock, or the simulation's.
    clock: Clock,
    /// Held for the store's life: one process merges into a disk's store at a time.
    _lock: LockGuard,
}

impl DiskStore {
    /// Opens (creating if need be) the store of disk `name` under `root`, finishing or
    /// undoing a merge a crash interrupted. Fails at once if another process holds it.
    pub fn open(root: &Path, name: &str) -> Result<(DiskStore, Recovery)> {
        Self::open_in(Arc::new(RealFs), root, name, false)
    }

    /// `open`, waiting for a merge in progress elsewhere to finish instead of failing.
    pub fn open_waiting(root: &Path, name: &str) -> Result<(DiskStore, Recovery)> {
        Self::open_in(Arc::new(RealFs), root, name, true)
    }

    /// `open` (`open_waiting` if `wait`) on the filesystem `fs`.
    pub fn open_in(
        fs: Arc<dyn Vfs>,
        root: &Path,
        name: &str,
        wait: bool,
    ) -> Result<(DiskStore, Recovery)> {
        validate_name(name)?;
        let dir = root.join(name);
        for sub in ["", "undo", "staging"] {
            fs.create_dir_all(&dir.join(sub))
                .map_err(io_err(format!("creating {}", dir.join(sub).display())))?;
        }
        let lock = fs.lock(&dir.join("lock"), wait).map_err(io_err(format!(
            "locking the store of {name:?} (is another ctk-receiver using it?)"
        )))?;
        let manifest =
            read_manifest(&*fs, &dir.join("manifest.json"), name)?.unwrap_or_else(|| Manifest {
                version: MANIFEST_VERSION,
                disk: name.into(),
                block_size: None,
                points: Vec::new(),
                applying: None,
                failed_over: None,
                checksum: None,
            });
        let mut store = DiskStore {
            name: name.into(),
            dir,
            manifest,
            fs,
            clock: Arc::new(ctk::unix_ms_now),
            _lock: lock,
        };
        let recovery = store.recover()?;
        store.salvage_incoming();
        store.remove_orphans();
        Ok((store, recovery))
    }

    /// Reads the time from `clock` from now on (a simulation's clock).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    pub fn points(&self) -> &[Point] {
        &self.manifest.points
    }

    /// The disk's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The block size of the store's points (none before the first).
    pub fn block_size(&self) -> Option<u32> {
        self.manifest.block_size
    }

    pub fn full_path(&self) -> PathBuf {
        self.dir.join("full.img")
    }

    fn full(&self) -> Result<Box<dyn FileAt>> {
        self.fs
            .open_rw(&self.full_path())
            .map_err(io_err("opening full.img"))
    }

    /// Opens an existing file for reading.
    fn open_file(&self, path: &Path, doing: &str) -> Result<Box<dyn FileAt>> {
        self.fs.open(path).map_err(io_err(doing))
    }

    /// A file for reading in sequence.
    fn reader(&self, path: &Path, doing: &str) -> Result<BufReader<vfs::Cursor<Box<dyn FileAt>>>> {
        Ok(BufReader::new(vfs::Cursor::new(
            self.open_file(path, doing)?,
        )))
    }

    /// Creates (or truncates) a file for writing in sequence.
    fn writer(&self, path: &Path, doing: &str) -> Result<BufWriter<vfs::Cursor<Box<dyn FileAt>>>> {
        let f = self.fs.create(path).map_err(io_err(doing))?;
        Ok(BufWriter::new(vfs::Cursor::new(f)))
    }

    /// Writes `bytes` as the whole of `path`, durably, and renames it over `to` (durable
    /// once `to`'s directory is synced).
    fn replace_file(&self, tmp: &Path, to: &Path, bytes: &[u8], doing: &str) -> Result<()> {
        let f = self.fs.create(tmp).map_err(io_err(doing))?;
        f.write_all_at(bytes, 0)
            .and_then(|()| f.sync())
            .map_err(io_err(doing))?;
        self.fs.rename(tmp, to).map_err(io_err(doing))
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        self.fs
            .sync_dir(dir)
            .map_err(io_err(format!("syncing {}", dir.display())))
    }

    fn remove(&self, path: &Path) {
        let _ = self.fs.remove_file(path);
    }
}

/// Flushes a writer and makes its file durable (not its name: `sync_dir`).
fn finish_file(w: BufWriter<vfs::Cursor<Box<dyn FileAt>>>, doing: &str) -> Result<()> {
    w.into_inner()
        .map_err(|e| io_err(doing)(e.into_error()))?
        .file
        .sync()
        .map_err(io_err(doing))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Covered::claim` against a byte map, over random claims.
    #[test]
    fn covered_claims_return_exactly_the_new_bytes() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200 {
            let mut covered = Covered::default();
            let mut model = [false; 300];
            for _ in 0..40 {
                let start = next() % 300;
                let end = (start + next() % 60).min(300);
                let gaps = covered.claim(start, end);
                let mut expect = Vec::new();
                for b in start..end {
                    if !model[b as usize] {
                        match expect.last_mut() {
                            Some((_, e)) if *e == b => *e = b + 1,
                            _ => expect.push((b, b + 1)),
                        }
                        model[b as usize] = true;
                    }
                }
                assert_eq!(gaps, expect, "claim {start}..{end}");
            }
        }
    }

    #[test]
    fn names_that_could_be_paths_are_refused() {
        for bad in [
            "",
            "../x",
            "a/b",
            ".",
            "..",
            ".hidden",
            "-rf",
            "a b",
            "é",
            &"x".repeat(129),
            &"y".repeat(300),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["vm1", "db-01.data", "A_b"] {
            validate_name(good).unwrap();
        }
    }
}
