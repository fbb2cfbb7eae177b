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

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ctk::delta::{
    self, DeltaError, DeltaFile, DeltaHeader, DeltaReader, DeltaRecord, DeltaWriter, WriteOptions,
    is_zero,
};
use ctk::digest::{DigestError, LeafFile, Leaves};
use ctk::vfs::{self, FileAt, LockGuard, RealFs, Vfs};
use ctk::{ChangeId, Extent};
use serde::{Deserialize, Serialize};

use crate::retention::Retention;
use crate::write_behind::WriteBehind;

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
    #[error(
        "the merged image does not match the agent's digest of it (agent {expected}, merged \
         {got}): nothing committed, the previous point stands"
    )]
    DigestMismatch { expected: String, got: String },
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
pub fn newest_point(root: &Path, name: &str) -> Result<Option<String>> {
    Ok(committed_points(root, name)?.pop().map(|p| p.change_id))
}

/// The committed points of a disk, read without the store's lock (see `newest_point`).
pub fn committed_points(root: &Path, name: &str) -> Result<Vec<Point>> {
    validate_name(name)?;
    let path = root.join(name).join("manifest.json");
    Ok(read_manifest(&RealFs, &path, name)?.map_or_else(Vec::new, |m| m.points))
}

/// Reads a manifest (`None`: there is none) and checks it is of this disk and version.
fn read_manifest(fs: &dyn Vfs, path: &Path, name: &str) -> Result<Option<Manifest>> {
    let f = match fs.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("opening the manifest")(e)),
    };
    let mut text = String::new();
    vfs::Cursor::new(f)
        .take(MANIFEST_LEN_MAX)
        .read_to_string(&mut text)
        .map_err(io_err("reading the manifest"))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| StoreError::Damaged {
        disk: name.into(),
        why: format!("manifest.json: {e}"),
    })?;
    if !(1..=MANIFEST_VERSION).contains(&m.version) || m.disk != name || m.points.len() > POINTS_MAX
    {
        return Err(StoreError::Damaged {
            disk: name.into(),
            why: "manifest.json is of another version or disk".into(),
        });
    }
    // Every byte of what the store commits to is checked before it is used: a bad read of
    // the manifest (a flipped digit in a ChangeId or an undo's name) would otherwise be
    // written back by the next merge as the truth. (Found by the simulation's bad reads.)
    if m.version >= 2 && m.checksum.as_deref() != Some(m.checksum().as_str()) {
        return Err(StoreError::Damaged {
            disk: name.into(),
            why: "manifest.json does not match its checksum (a bad read, or damage)".into(),
        });
    }
    Ok(Some(m))
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

/// One committed restore point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Point {
    pub change_id: String,
    /// The point this one was merged onto (none for the first full).
    pub from: Option<String>,
    pub disk_size: u64,
    pub committed_unix_ms: u64,
    /// Undo file (relative to the disk directory) back to the previous point, if kept.
    pub undo: Option<String>,
    pub delta_bytes: u64,
    /// When the agent cut it (unix ms), if the agent said.
    #[serde(default)]
    pub cut_unix_ms: Option<u64>,
    /// "crash" or "application", if the agent said.
    #[serde(default)]
    pub consistency: Option<String>,
    /// The digest of the whole image as of this point (`ctk::digest`), as merged here.
    #[serde(default)]
    pub image_digest: Option<String>,
    /// The agent sent its own digest of the image and it matched: the point is checked end
    /// to end. False for points the agent could not vouch for.
    #[serde(default)]
    pub digest_checked: bool,
}

/// What the sender says about a point: when it was cut and how consistent it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointMeta {
    pub cut_unix_ms: Option<u64>,
    pub consistency: Option<String>,
    /// The agent's digest of the whole image as of the cut, if it sent one.
    #[serde(default)]
    pub image_digest: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Applying {
    change_id: String,
    staged: String,
    undo: Option<String>,
    #[serde(default)]
    meta: PointMeta,
    /// A first full written straight into full.img as it arrived (no staged copy): after a
    /// crash it can only be rolled back, which empties the store.
    #[serde(default)]
    direct: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Manifest {
    version: u32,
    disk: String,
    block_size: Option<u32>,
    points: Vec<Point>,
    applying: Option<Applying>,
    /// CRC32 (hex) of the manifest's compact JSON with this field absent. Version 2 on; a
    /// manifest of version 1 has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checksum: Option<String>,
}

/// The manifest version this code writes: 2 adds the checksum.
const MANIFEST_VERSION: u32 = 2;

impl Manifest {
    fn checksum(&self) -> String {
        let mut bare = self.clone();
        bare.checksum = None;
        let text = serde_json::to_vec(&bare).expect("a manifest serialises");
        format!("{:08x}", crc32fast::hash(&text))
    }
}

/// The merged image's digest and whether the sender's matched it.
#[derive(Default)]
struct Checked {
    digest: Option<String>,
    checked: bool,
}

/// What was received of a push that was cut off (the connection dropped, the agent was
/// killed): every record below `next_offset`, checked, kept so that the agent can resume
/// from there (`DiskStore::ingest_resume`) instead of sending it all again. Valid only while
/// `from` is the store's newest point (none: an empty store); anything committed drops it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Partial {
    /// The point the push started from (none: a first full).
    pub from: Option<String>,
    /// The cut the push was of.
    pub to: String,
    /// Every record of the push below this disk offset was received.
    pub next_offset: u64,
    pub disk_size: u64,
    pub block_size: u32,
    /// A first full: the records are in full.img; else in `staging/partial.ctkd` (a
    /// complete delta: the records received and a trailer made for them).
    pub direct: bool,
}

impl Partial {
    /// What the agent is told of it (`Response::Resume`).
    pub fn state(&self) -> ctk::wire::ResumeState {
        ctk::wire::ResumeState {
            from: self.from.clone(),
            to: self.to.clone(),
            disk_size: self.disk_size,
            next_offset: self.next_offset,
        }
    }
}

const PARTIAL_JSON: &str = "staging/partial.json";
const PARTIAL_DELTA: &str = "staging/partial.ctkd";
/// Longest resume state read back.
const PARTIAL_LEN_MAX: u64 = 64 << 10;

/// What staging a delta found.
enum Staged {
    /// A point already committed: acknowledged, nothing to merge.
    Already(String),
    /// Staged and verified in `staging/incoming.ctkd`.
    Delta {
        touched: Vec<Extent>,
        meta: PointMeta,
        /// The undo, when it was written as the delta arrived.
        undo: Option<StagedUndo>,
    },
}

/// An undo written (and synced) while its delta was staged, in `staging/undo.ctkd`, with the
/// newest point's leaves it was checked against (the merge needs them again).
struct StagedUndo {
    base: Option<Leaves>,
}

const STAGED_UNDO: &str = "staging/undo.ctkd";

/// The error of a push cut off: an I/O error on the way (the connection, or the store's
/// own disk: full, failing) is the store's I/O error, not damage in the delta.
fn cut_off_error(e: DeltaError) -> StoreError {
    match e {
        DeltaError::Io(source) if source.kind() != io::ErrorKind::InvalidData => StoreError::Io {
            doing: "receiving and staging the delta".into(),
            source,
        },
        e => e.into(),
    }
}

/// Did the input end or fail part way (a push cut off), rather than carry bad bytes?
fn is_cut_off(e: &DeltaError) -> bool {
    match e {
        DeltaError::Io(source) => source.kind() != io::ErrorKind::InvalidData,
        DeltaError::Truncated { .. } => true,
        _ => false,
    }
}

/// An input with bytes already read from it put back in front.
type Replayed<R> = io::Chain<io::Cursor<Vec<u8>>, R>;

/// Reads a delta's header from `input` and gives it back with the input, the header's
/// bytes put in front again.
fn peek_header<R: Read>(mut input: R) -> Result<(DeltaHeader, Replayed<R>)> {
    let mut head = Vec::new();
    let header = DeltaReader::new(Tee {
        input: &mut input,
        copy: &mut head,
    })?
    .header()
    .clone();
    Ok((header, io::Cursor::new(head).chain(input)))
}

/// What an ingest did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// Merged and committed as a new point.
    Committed { point: Point, dropped: usize },
    /// The point was committed already: acknowledged, nothing applied.
    AlreadyCommitted { change_id: String },
}

/// What opening a store found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    Clean,
    /// A merge in progress was finished from its staged delta.
    RolledForward(String),
    /// A merge in progress was undone; the newest committed point stands.
    RolledBack(String),
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
                checksum: None,
            });
        let mut store = DiskStore {
            name: name.into(),
            dir,
            manifest,
            fs,
            clock: Arc::new(now_ms),
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

    /// The resync hashes of the newest point (`ctk::digest::unit_hash` of each `unit` bytes
    /// of full.img, in order): its ChangeId, disk size and the hashes, 32 bytes each. Read
    /// under the store's lock, so no merge changes full.img meanwhile. The unit is checked
    /// before anything is allocated (`ctk::digest::unit_count`).
    pub fn unit_digests(&self, unit: u32) -> Result<(String, u64, Vec<u8>)> {
        let newest = self
            .points()
            .last()
            .ok_or_else(|| StoreError::NoSuchPoint("(any: the store is empty)".into()))?;
        let size = newest.disk_size;
        let count = ctk::digest::unit_count(size, unit).map_err(StoreError::Protocol)?;
        let full = self.open_file(&self.full_path(), "opening full.img")?;
        let mut hashes = Vec::with_capacity(count as usize * 32);
        let mut buf = vec![0u8; unit as usize];
        for i in 0..count {
            let at = i * unit as u64;
            let n = (size - at).min(unit as u64) as usize;
            full.read_exact_at(&mut buf[..n], at)
                .map_err(io_err("reading full.img for a resync"))?;
            hashes.extend_from_slice(&ctk::digest::unit_hash(&buf[..n]));
        }
        Ok((newest.change_id.clone(), size, hashes))
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

    fn write_manifest(&mut self, mut manifest: Manifest) -> Result<()> {
        manifest.version = MANIFEST_VERSION;
        manifest.checksum = None;
        manifest.checksum = Some(manifest.checksum());
        let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        self.replace_file(
            &self.dir.join("manifest.json.tmp"),
            &self.dir.join("manifest.json"),
            &text,
            "writing the manifest",
        )?;
        // From the rename on, the new manifest is what readers see and may be what a crash
        // leaves, so everything after builds on it even if the directory sync fails: rolling
        // back a merge the visible manifest already calls committed would destroy the point
        // (found by the simulation: a first full emptied under its own committed manifest).
        self.manifest = manifest;
        self.sync_dir(&self.dir)
    }

    fn recover(&mut self) -> Result<Recovery> {
        let Some(applying) = self.manifest.applying.clone() else {
            return Ok(Recovery::Clean);
        };
        if applying.direct {
            // A first full written in place: there is no staged copy to finish it from.
            tracing::warn!(disk = %self.name, "an interrupted first full: emptying the store");
            let full = self.full()?;
            self.roll_back(&full, &applying)?;
            // A resume state of a first full lived in full.img, now emptied.
            self.drop_partial();
            return Ok(Recovery::RolledBack(applying.change_id));
        }
        let staged = self.dir.join(&applying.staged);
        let forward = self
            .fs
            .open(&staged)
            .map_err(DeltaError::from)
            .and_then(|f| delta::verify(BufReader::new(vfs::Cursor::new(f))).map(|_| ()));
        let full = self.full()?;
        let outcome = match forward {
            Ok(()) => {
                apply_to(self.reader(&staged, "opening the staged delta")?, &full)?;
                full.sync().map_err(io_err("syncing full.img"))?;
                // The leaves of the point before may be gone (the crash may have been in
                // the middle of saving the new ones), so they are read from the merged
                // image whole: a full read, once, after a crash.
                let header = DeltaFile::open(self.open_file(&staged, "opening the staged delta")?)?
                    .header()
                    .clone();
                let leaves = match Leaves::of_image(&full, header.disk_size, header.block_size) {
                    Ok(l) => Some(l),
                    Err(DigestError::Io(e)) => return Err(io_err("reading full.img")(e)),
                    Err(_) => None,
                };
                match self.check_digest(leaves.as_ref(), &applying.meta) {
                    Ok(checked) => {
                        let mut point =
                            self.point_for(&staged, applying.undo.clone(), applying.meta.clone())?;
                        self.save_leaves(leaves, &header, &mut point, checked)?;
                        let mut m = self.manifest.clone();
                        m.points.push(point);
                        m.applying = None;
                        self.write_manifest(m)?;
                        Recovery::RolledForward(applying.change_id)
                    }
                    Err(e) => {
                        tracing::warn!(disk = %self.name, error = %e, "rolling back");
                        self.roll_back(&full, &applying)?;
                        Recovery::RolledBack(applying.change_id)
                    }
                }
            }
            Err(why) => {
                // The staged delta was durable and verified before "applying" was written;
                // unreadable now means the media lied. Put back what the merge may have
                // overwritten.
                tracing::warn!(disk = %self.name, error = %why, "staged delta unreadable: rolling back");
                self.roll_back(&full, &applying)?;
                Recovery::RolledBack(applying.change_id)
            }
        };
        Ok(outcome)
    }

    /// Puts back what an interrupted or refused merge may have overwritten, and forgets it.
    fn roll_back(&mut self, full: &dyn FileAt, applying: &Applying) -> Result<()> {
        match &applying.undo {
            Some(undo) => {
                apply_to(self.reader(&self.dir.join(undo), "opening the undo")?, full)?;
            }
            // A first full: no point is committed, so nothing needs putting back; the partial
            // image is dropped and the store is empty again (refusing to open would wedge the
            // disk's store for good).
            None if self.manifest.points.is_empty() => {
                full.set_len(0).map_err(io_err("emptying full.img"))?
            }
            None => {
                return Err(StoreError::Damaged {
                    disk: self.name.clone(),
                    why: "an interrupted merge has no undo to roll back with".into(),
                });
            }
        }
        full.sync().map_err(io_err("syncing full.img"))?;
        let mut m = self.manifest.clone();
        m.applying = None;
        self.write_manifest(m)?;
        self.remove(&self.dir.join(&applying.staged));
        Ok(())
    }

    /// A point's ChangeId as the manifest records it.
    fn point_id(&self, id: &str) -> Result<ChangeId> {
        id.parse().map_err(|e| StoreError::Damaged {
            disk: self.name.clone(),
            why: format!("manifest point id: {e}"),
        })
    }

    fn leaves_path(&self) -> PathBuf {
        self.dir.join("leaves")
    }

    /// The leaves of the newest point: from the leaf file when it holds them, else read
    /// from full.img (after a crash, or for a store written before digests existed). Zeros
    /// of the delta's size before the first full. `None` for a disk too large to digest.
    fn base_leaves(&self, full: &dyn FileAt, header: &DeltaHeader) -> Result<Option<Leaves>> {
        let result = match self.points().last() {
            None => Leaves::zeroed(header.disk_size, header.block_size),
            Some(newest) => {
                let at = self.point_id(&newest.change_id)?;
                // The leaves must give the digest the point was committed with: the leaf
                // file's body has no checksum of its own, and a misread one (or a misread
                // full.img) would make the pre-image check below pass wrong bytes into the
                // undo. (Found by the simulation, seed 81427: a shifted read of the leaf
                // file, then a misdirected read of zeros that matched its zero leaves.)
                let fits = |l: &Leaves| {
                    newest
                        .image_digest
                        .as_deref()
                        .is_none_or(|d| l.digest().to_string() == d)
                };
                match LeafFile::load_in(&*self.fs, &self.leaves_path(), at) {
                    Ok(Some(l)) if fits(&l) => Ok(l),
                    _ => {
                        tracing::info!(disk = %self.name, "reading full.img to rebuild its block digests");
                        let mut rebuilt =
                            Leaves::of_image(full, newest.disk_size, header.block_size);
                        for _ in 1..READ_ATTEMPTS {
                            match &rebuilt {
                                Ok(l) if !fits(l) => {
                                    rebuilt =
                                        Leaves::of_image(full, newest.disk_size, header.block_size)
                                }
                                _ => break,
                            }
                        }
                        match rebuilt {
                            Ok(l) if !fits(&l) => {
                                return Err(StoreError::Damaged {
                                    disk: self.name.clone(),
                                    why: format!(
                                        "full.img does not read back as point {} (its digest differs, {READ_ATTEMPTS} times): run verify",
                                        newest.change_id
                                    ),
                                });
                            }
                            other => other,
                        }
                    }
                }
            }
        };
        match result {
            Ok(l) => Ok(Some(l)),
            Err(DigestError::Io(e)) => Err(io_err("reading full.img for its digests")(e)),
            Err(e) => {
                tracing::warn!(disk = %self.name, error = %e, "no image digest for this disk");
                Ok(None)
            }
        }
    }

    /// Compares the merged image's digest with the agent's. `Ok(true)`: both known and
    /// equal; `Ok(false)`: one side does not know it (the point is recorded unchecked).
    /// Returns the merged image's digest (if its leaves are known) with the verdict, so
    /// the one pass over the leaves serves both the check and the point's record.
    fn check_digest(&self, leaves: Option<&Leaves>, meta: &PointMeta) -> Result<Checked> {
        let Some(leaves) = leaves else {
            return Ok(Checked::default());
        };
        let got = leaves.digest().to_string();
        let Some(expected) = meta.image_digest.as_deref() else {
            return Ok(Checked {
                digest: Some(got),
                checked: false,
            });
        };
        if got != expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.into(),
                got,
            });
        }
        Ok(Checked {
            digest: Some(got),
            checked: true,
        })
    }

    /// Saves the merged leaves (before the commit: a crash in between is recovered by
    /// `recover`, which rebuilds them) and records the digest in the point.
    fn save_leaves(
        &self,
        leaves: Option<Leaves>,
        header: &DeltaHeader,
        point: &mut Point,
        checked: Checked,
    ) -> Result<()> {
        if let Some(mut leaves) = leaves {
            point.image_digest = checked.digest;
            LeafFile::save_in(&*self.fs, &self.leaves_path(), &mut leaves, header.to).map_err(
                |e| StoreError::Io {
                    doing: "saving the block digests".into(),
                    source: match e {
                        DigestError::Io(e) => e,
                        other => io::Error::other(other.to_string()),
                    },
                },
            )?;
        }
        point.digest_checked = checked.checked;
        Ok(())
    }

    /// Deletes staged deltas and undo files no point or merge refers to (left by a crash).
    fn remove_orphans(&self) {
        let mut keep: Vec<String> = self
            .manifest
            .points
            .iter()
            .filter_map(|p| p.undo.clone())
            .collect();
        if let Some(a) = &self.manifest.applying {
            keep.push(a.staged.clone());
            keep.extend(a.undo.clone());
        }
        // The resume state has its own life (`drop_partial`).
        keep.extend([PARTIAL_JSON.to_owned(), PARTIAL_DELTA.to_owned()]);
        for sub in ["undo", "staging"] {
            let Ok(names) = self.fs.list(&self.dir.join(sub)) else {
                continue;
            };
            for name in names {
                let rel = format!("{sub}/{name}");
                if !keep.contains(&rel) {
                    self.remove(&self.dir.join(rel));
                }
            }
        }
    }

    fn point_for(&self, staged: &Path, undo: Option<String>, meta: PointMeta) -> Result<Point> {
        let reader = DeltaReader::new(self.reader(staged, "opening the staged delta")?)?;
        let h = reader.header().clone();
        let delta_bytes = self.fs.open(staged).and_then(|f| f.len()).unwrap_or(0);
        Ok(Point {
            change_id: h.to.to_string(),
            from: h.from.map(|f| f.to_string()),
            disk_size: h.disk_size,
            committed_unix_ms: (self.clock)(),
            undo,
            delta_bytes,
            cut_unix_ms: meta.cut_unix_ms,
            consistency: meta.consistency,
            image_digest: None,
            digest_checked: false,
        })
    }

    /// Merges the delta read from `input` as a new restore point, crash-atomically, and
    /// applies `retention`. `end` is given the input once the delta is read and says what
    /// the sender knows about the point (a streamed push sends it after the delta). Returns
    /// once the point is committed (durable). A push cut off on the way (the input fails)
    /// leaves what was received as a resume state (`partial`) when it continues the newest
    /// point, so the agent can go on from there (`ingest_resume`).
    pub fn ingest<R: Read>(
        &mut self,
        input: R,
        retention: impl Into<Retention>,
        end: impl FnOnce(R) -> Result<PointMeta>,
    ) -> Result<Ingested> {
        let started = std::time::Instant::now();
        // The header decides the path: a first full into an empty store is written straight
        // into full.img (nothing to protect, so nothing to stage); anything else is staged.
        let (peeked, input) = peek_header(input)?;
        if peeked.from.is_none() && self.points().is_empty() && self.manifest.applying.is_none() {
            return self.ingest_first_full(peeked, input, end, None);
        }
        match self.stage(input, end, true)? {
            Staged::Already(change_id) => Ok(Ingested::AlreadyCommitted { change_id }),
            Staged::Delta {
                touched,
                meta,
                undo,
            } => {
                let staging = self.dir.join("staging").join("incoming.ctkd");
                self.merge_staged(&staging, touched, meta, undo, retention.into(), started)
            }
        }
    }

    /// Stages a delta whole into `staging/incoming.ctkd`, durably, verifying every check
    /// while copying and collecting the ranges it writes (the undo needs them). When the
    /// input fails on the way and `keep_partial`, the complete records received are kept as
    /// the resume state.
    ///
    /// A resumed push (`keep_partial` false) is staged into `staging/resumed.ctkd` instead:
    /// it holds only the rest of a change, so what it received must never become a resume
    /// state of its own, as `incoming.ctkd` does when a restart finds it (`salvage_incoming`).
    /// Found by the simulation: a receiver restarted while staging a resumed push salvaged it
    /// as if every block below its checkpoint were there, and the next resume lost the
    /// blocks the first part had carried.
    fn stage<R: Read>(
        &mut self,
        input: Replayed<R>,
        end: impl FnOnce(R) -> Result<PointMeta>,
        keep_partial: bool,
    ) -> Result<Staged> {
        let staged = self.stage_inner(input, end, keep_partial);
        // Whatever failed (a cut-off or damaged push, a bad pre-image read, a full disk), the
        // undo written so far is of no use: its space goes back now, not at the next commit.
        if staged.is_err() {
            self.remove(&self.dir.join(STAGED_UNDO));
        }
        staged
    }

    fn stage_inner<R: Read>(
        &mut self,
        input: Replayed<R>,
        end: impl FnOnce(R) -> Result<PointMeta>,
        keep_partial: bool,
    ) -> Result<Staged> {
        let name = if keep_partial {
            "incoming.ctkd"
        } else {
            "resumed.ctkd"
        };
        let staging = self.dir.join("staging").join(name);
        let mut touched: Vec<Extent> = Vec::new();
        let mut w = self.writer(&staging, "creating the staged delta")?;
        let mut tee = Tee {
            input,
            copy: &mut w,
        };
        let mut cut_off = None;
        let mut checkpoint = None;
        let mut undo = None;
        let header = {
            let mut reader = DeltaReader::new(&mut tee)?;
            // The pre-images are read and written while the push arrives (the ranges come in
            // order), instead of in a pass of their own after it: the merge's longest step
            // after the apply. Not for a resumed push: its delta is only the rest of the
            // change, and the composed one is undone after (`merge_staged`).
            if keep_partial
                && let Some(newest) = self.points().last()
                && self.check_fits(reader.header()).is_ok()
            {
                let full = self.full()?;
                let base = self.base_leaves(&full, reader.header())?;
                let path = self.dir.join(STAGED_UNDO);
                undo = Some(UndoThread::spawn(UndoWriter::create(
                    self,
                    full,
                    base,
                    newest,
                    reader.header(),
                    &path,
                )?)?);
            }
            loop {
                let (offset, length) = match reader.next_record() {
                    Ok(Some(DeltaRecord::Data { offset, data })) => (offset, data.len() as u64),
                    Ok(Some(DeltaRecord::Zero { offset, length })) => (offset, length),
                    Ok(None) => break,
                    // The input ended or failed part way: a push cut off.
                    Err(e) if is_cut_off(&e) => {
                        cut_off = Some(e);
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                match touched.last_mut() {
                    Some(last) if last.end() == offset => last.length += length,
                    _ => touched.push(Extent::new(offset, length)),
                }
                if let Some(u) = undo.as_mut() {
                    u.add(offset, length)?;
                }
                checkpoint = Some(reader.checkpoint());
            }
            reader.header().clone()
        };
        if let Some(e) = cut_off {
            drop(tee);
            drop(undo);
            // Gone before the resume state appears (`stage` would remove it after): whoever
            // sees a resume state sees no stale undo beside it.
            self.remove(&self.dir.join(STAGED_UNDO));
            if keep_partial
                && let Some(cp) = checkpoint
                && self.check_fits(&header).is_ok()
                && let Err(k) = w
                    .into_inner()
                    .map_err(|e| io_err("staging")(e.into_error()))
                    .and_then(|f| self.keep_staged_partial(f.file, &staging, &header, &cp))
            {
                tracing::warn!(disk = %self.name, error = %k, "could not keep the received part");
            }
            return Err(cut_off_error(e));
        }
        // Nothing may follow the trailer.
        let mut extra = [0u8; 1];
        if tee
            .input
            .read(&mut extra)
            .map_err(io_err("reading the delta"))?
            != 0
        {
            return Err(StoreError::Mismatch(
                "bytes after the delta's trailer".into(),
            ));
        }
        let meta = end(tee.input.into_inner().1)?;
        // The undo's last reads and its fsync run while the staged delta is synced.
        if let Some(u) = undo.as_mut() {
            u.end();
        }
        if let Err(e) = finish_file(w, "syncing the staged delta") {
            // A file whose fsync failed is never trusted again (after a writeback error Linux
            // may drop the pages while reads still return them): not even as a resume state.
            self.remove(&staging);
            return Err(e);
        }
        let undo = match undo {
            None => None,
            Some(u) => Some(StagedUndo { base: u.join()? }),
        };
        self.check_fits(&header)?;
        if self
            .points()
            .iter()
            .any(|p| p.change_id == header.to.to_string())
        {
            self.remove(&staging);
            self.remove(&self.dir.join(STAGED_UNDO));
            return Ok(Staged::Already(header.to.to_string()));
        }
        Ok(Staged::Delta {
            touched,
            meta,
            undo,
        })
    }

    /// Merges the verified delta staged at `staging` (writing `touched`) as a new point.
    fn merge_staged(
        &mut self,
        staging: &Path,
        touched: Vec<Extent>,
        meta: PointMeta,
        staged_undo: Option<StagedUndo>,
        retention: Retention,
        started: std::time::Instant,
    ) -> Result<Ingested> {
        let mut retention = retention;
        retention.keep = retention.keep.clamp(1, POINTS_MAX);
        // Where a merge's time goes, for the log (a first full is long work).
        let mut steps: Vec<(&str, f64)> = Vec::new();
        let mut lap = started;
        let mut step = |name, steps: &mut Vec<(&str, f64)>| {
            steps.push((name, lap.elapsed().as_secs_f64()));
            lap = std::time::Instant::now();
        };
        step("staged", &mut steps);
        failpoint("staged");
        let header = DeltaReader::new(self.reader(staging, "opening the staged delta")?)?
            .header()
            .clone();
        // Files are named after the whole ChangeId: after a resync the sequence numbers of
        // a new generation start again, and an older point's undo must not be overwritten.
        let name = format!("{}-{}", header.to.generation, header.to.seq);
        let staged_rel = format!("staging/{name}.ctkd");
        self.fs
            .rename(staging, &self.dir.join(&staged_rel))
            .map_err(io_err("staging"))?;
        self.sync_dir(&self.dir.join("staging"))?;

        // Can this filesystem hold the size the delta asks for? Probed on a scratch file,
        // before anything is recorded: a size it cannot hold would otherwise fail the apply
        // after "applying" is written, and every reopen would retry it and fail again.
        if let Err(e) = self.probe_size(header.disk_size) {
            self.remove(&self.dir.join(&staged_rel));
            return Err(e);
        }

        // 2. The undo: what this merge will overwrite, as of the newest point. (And the
        // block digests of the newest point, while full.img still holds it.) Written while
        // the delta was staged, or now.
        let full = self.full()?;
        let (base, undo_rel) = match (staged_undo, self.points().last()) {
            (_, None) => (self.base_leaves(&full, &header)?, None),
            (Some(staged), Some(_)) => {
                let rel = format!("undo/{name}.ctkd");
                self.fs
                    .rename(&self.dir.join(STAGED_UNDO), &self.dir.join(&rel))
                    .map_err(io_err("moving the undo in place"))?;
                self.sync_dir(&self.dir.join("undo"))?;
                (staged.base, Some(rel))
            }
            (None, Some(newest)) => {
                let base = self.base_leaves(&full, &header)?;
                let rel = format!("undo/{name}.ctkd");
                let base = self.write_undo(base, newest, &header, &touched, &rel)?;
                (base, Some(rel))
            }
        };
        failpoint("undo_written");
        step("undo", &mut steps);

        // 3. Record the merge before touching the full.
        let mut m = self.manifest.clone();
        m.block_size = Some(header.block_size);
        m.applying = Some(Applying {
            change_id: header.to.to_string(),
            staged: staged_rel.clone(),
            undo: undo_rel.clone(),
            meta: meta.clone(),
            direct: false,
        });
        self.write_manifest(m)?;
        failpoint("applying_recorded");

        // 4. Apply, durably, and 5. read the merged blocks back for their leaves: a thread
        // follows the apply a record behind and keeps reading while full.img is synced (the
        // pages it reads are the ones just written, as they would be after the sync).
        let leaves = apply_and_read_back(
            self.reader(&self.dir.join(&staged_rel), "opening the staged delta")?,
            &full,
            base,
            &header,
            &touched,
            &self.name,
        )?;
        failpoint("applied");
        step("applied", &mut steps);

        // The merged image must be the one the agent digested: if not, put the previous
        // point back and refuse.
        let checked = match self.check_digest(leaves.as_ref(), &meta) {
            Ok(checked) => checked,
            Err(e) => {
                let applying = self.manifest.applying.clone().expect("recorded above");
                self.roll_back(&full, &applying)?;
                self.remove_orphans();
                return Err(e);
            }
        };
        let mut point = self.point_for(&self.dir.join(&staged_rel), undo_rel, meta)?;
        self.save_leaves(leaves, &header, &mut point, checked)?;
        failpoint("leaves_saved");
        step("digest", &mut steps);

        // 6. Commit the point.
        let mut m = self.manifest.clone();
        m.points.push(point.clone());
        m.applying = None;
        self.write_manifest(m)?;
        failpoint("committed");
        // What a cut-off push left no longer continues the newest point.
        self.drop_partial();
        self.remove_orphans();
        step("committed", &mut steps);
        // 7. Retention, after the commit: a failure here only keeps points longer.
        let dropped = match self.retain(&retention) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(disk = %self.name, error = %e, "retention failed: the points stay");
                0
            }
        };
        failpoint("retained");
        step("retention", &mut steps);
        tracing::info!(
            disk = %self.name,
            point = %point.change_id,
            seconds = started.elapsed().as_secs_f64(),
            steps = ?steps,
            "merged"
        );
        Ok(Ingested::Committed { point, dropped })
    }

    /// The resume state a cut-off push left, if it still continues the newest point.
    pub fn partial(&self) -> Option<Partial> {
        let f = self.fs.open(&self.dir.join(PARTIAL_JSON)).ok()?;
        let mut text = String::new();
        vfs::Cursor::new(f)
            .take(PARTIAL_LEN_MAX)
            .read_to_string(&mut text)
            .ok()?;
        let p: Partial = serde_json::from_str(&text).ok()?;
        let newest = self.points().last().map(|n| n.change_id.clone());
        // The kept delta's record heads and trailer must read back, and a first full's
        // records must still be in a full.img of the disk's size (a rolled-back resume
        // empties it): a resume state that does not fit is refused when used, and offering
        // it costs the agent a push.
        let usable = p.from == newest
            && self.manifest.applying.is_none()
            && if p.direct {
                self.fs
                    .open(&self.full_path())
                    .and_then(|f| f.len())
                    .is_ok_and(|len| len == p.disk_size)
            } else {
                self.fs
                    .open(&self.dir.join(PARTIAL_DELTA))
                    .ok()
                    .is_some_and(|f| DeltaFile::open(f).is_ok())
            };
        usable.then_some(p)
    }

    fn save_partial(&self, p: &Partial) -> Result<()> {
        let text = serde_json::to_vec(p).expect("a resume state serialises");
        self.replace_file(
            &self.dir.join("staging").join("partial.json.tmp"),
            &self.dir.join(PARTIAL_JSON),
            &text,
            "writing the resume state",
        )?;
        self.sync_dir(&self.dir.join("staging"))
    }

    /// A receiver stopped while staging a push (killed, or the machine went down) left
    /// `staging/incoming.ctkd`: its whole records, each checked against its CRC again here,
    /// become the resume state, as for a push cut off. (A first full written in place
    /// cannot be salvaged: how far it got is not recorded, and the store is emptied.)
    fn salvage_incoming(&self) {
        let path = self.dir.join("staging").join("incoming.ctkd");
        if self.manifest.applying.is_some() || !self.fs.exists(&path) {
            return;
        }
        let salvage = || -> Result<bool> {
            let mut reader = DeltaReader::new(self.reader(&path, "opening a staged delta")?)?;
            let header = reader.header().clone();
            if self.check_fits(&header).is_err() {
                return Ok(false);
            }
            let mut checkpoint = None;
            while let Ok(Some(_)) = reader.next_record() {
                checkpoint = Some(reader.checkpoint());
            }
            let Some(cp) = checkpoint else {
                return Ok(false);
            };
            drop(reader);
            let f = self
                .fs
                .open_rw(&path)
                .map_err(io_err("opening a staged delta"))?;
            self.keep_staged_partial(f, &path, &header, &cp)?;
            Ok(true)
        };
        match salvage() {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(disk = %self.name, "a staged push from before a restart holds nothing to resume from")
            }
            Err(e) => {
                tracing::warn!(disk = %self.name, error = %e, "could not keep a staged push from before a restart")
            }
        }
    }

    fn drop_partial(&self) {
        self.remove(&self.dir.join(PARTIAL_JSON));
        self.remove(&self.dir.join(PARTIAL_DELTA));
    }

    /// Keeps the records received of a staged push cut off after checkpoint `cp`: the
    /// staged bytes are cut there and ended with a trailer made for them, which makes them a
    /// complete delta of the received part, then recorded as the resume state.
    fn keep_staged_partial(
        &self,
        f: Box<dyn FileAt>,
        staging: &Path,
        header: &DeltaHeader,
        cp: &delta::Checkpoint,
    ) -> Result<()> {
        if let Err(e) = f
            .set_len(cp.position)
            .and_then(|()| f.write_all_at(&cp.trailer(), cp.position))
            .and_then(|()| f.sync())
        {
            // Not kept after a failed fsync (see `stage`).
            self.remove(staging);
            return Err(io_err("keeping the received part")(e));
        }
        self.drop_partial();
        self.fs
            .rename(staging, &self.dir.join(PARTIAL_DELTA))
            .map_err(io_err("keeping the received part"))?;
        self.save_partial(&Partial {
            from: header.from.map(|f| f.to_string()),
            to: header.to.to_string(),
            next_offset: cp.next_offset,
            disk_size: header.disk_size,
            block_size: header.block_size,
            direct: false,
        })?;
        tracing::info!(
            disk = %self.name, to = %header.to, next_offset = cp.next_offset,
            "a push was cut off: the received part is kept for a resume"
        );
        Ok(())
    }

    /// Merges a push that resumes the cut-off push `resumes` from disk offset `next_offset`
    /// (both as `partial` reported them). The resumed push is a delta from the same point
    /// to a later cut of the same journal, carrying the blocks changed since that point at
    /// or after `next_offset` and those changed since the cut-off push's cut below it; with
    /// the received part underneath, that is the whole change. A resume that does not
    /// match the resume state here is refused (`Mismatch`) before anything is merged.
    pub fn ingest_resume<R: Read>(
        &mut self,
        input: R,
        resumes: &str,
        next_offset: u64,
        retention: impl Into<Retention>,
        end: impl FnOnce(R) -> Result<PointMeta>,
    ) -> Result<Ingested> {
        let started = std::time::Instant::now();
        let p = self.partial().ok_or_else(|| {
            StoreError::Mismatch(
                "no resume state here (a newer point was committed, or it was used): push \
                 from the start"
                    .into(),
            )
        })?;
        if p.to != resumes || p.next_offset != next_offset {
            return Err(StoreError::Mismatch(format!(
                "the resume state here is of {} at offset {}; the push resumes {resumes} at \
                 {next_offset}",
                p.to, p.next_offset
            )));
        }
        let (header, input) = peek_header(input)?;
        self.check_fits(&header)?;
        let prior: ChangeId = p.to.parse().map_err(|e| StoreError::Damaged {
            disk: self.name.clone(),
            why: format!("resume state: {e}"),
        })?;
        let fits = header.from.map(|f| f.to_string()) == p.from
            && header.disk_size == p.disk_size
            && header.block_size == p.block_size
            && header.to.generation == prior.generation
            && header.to.seq > prior.seq;
        if !fits {
            return Err(StoreError::Mismatch(format!(
                "the resumed delta ({:?} -> {}, {} bytes) does not continue the resume state \
                 ({:?} -> {}, {} bytes): it must start where that did and be a later cut of \
                 the same journal",
                header.from.map(|f| f.to_string()),
                header.to,
                header.disk_size,
                p.from,
                p.to,
                p.disk_size
            )));
        }
        if p.direct {
            return self.ingest_first_full(header, input, end, Some(p));
        }
        let (touched, meta) = match self.stage(input, end, false)? {
            Staged::Already(change_id) => return Ok(Ingested::AlreadyCommitted { change_id }),
            Staged::Delta { meta, .. } => {
                // The received part underneath the resumed delta: one delta of the whole
                // change (where both hold a block, the resumed one's is newer).
                let resumed = self.dir.join("staging").join("resumed.ctkd");
                let incoming = self.dir.join("staging").join("incoming.ctkd");
                let composed = self.dir.join("staging").join("composed.ctkd");
                let sources = [resumed.clone(), self.dir.join(PARTIAL_DELTA)];
                let touched = match self.compose(&sources, &header, &composed) {
                    Ok(t) => t,
                    Err(e) => {
                        // A resume state that does not read back whole is dropped, so the
                        // next push starts from the beginning instead of failing the same
                        // way forever (found by the simulation).
                        if matches!(e, StoreError::Delta(_)) {
                            tracing::warn!(disk = %self.name, error = %e, "the resume state is damaged: dropping it");
                            self.drop_partial();
                        }
                        return Err(e);
                    }
                };
                // The composed delta is the whole change: from here it may be salvaged.
                self.fs
                    .rename(&composed, &incoming)
                    .map_err(io_err("staging"))?;
                self.remove(&resumed);
                // Its records are in the composed delta now; its space is needed for the
                // undo. (Should this merge fail, the next push starts from the beginning.)
                self.drop_partial();
                (touched, meta)
            }
        };
        tracing::info!(disk = %self.name, to = %header.to, resumed_at = next_offset, "resuming a push");
        let incoming = self.dir.join("staging").join("incoming.ctkd");
        self.merge_staged(&incoming, touched, meta, None, retention.into(), started)
    }

    /// Drops the points `retention` does not keep; returns how many. Dropping the oldest
    /// points only forgets their way back. Dropping points between two kept ones folds their
    /// undo files into the newer kept point's: one new undo taking it straight back to the
    /// older kept point (where several hold a byte, the oldest undo wins: it holds the older
    /// point's byte). The fold is written and synced before the manifest that uses it, and
    /// the files it replaces are removed after, so a crash anywhere leaves either the old or
    /// the new set of points, each restoring exactly.
    fn retain(&mut self, retention: &Retention) -> Result<usize> {
        let points = self.manifest.points.clone();
        let times: Vec<u64> = points
            .iter()
            .map(|p| p.cut_unix_ms.unwrap_or(p.committed_unix_ms))
            .collect();
        let mut keep = crate::retention::select(&times, (self.clock)(), retention);
        let levels: Vec<Option<&str>> = points.iter().map(|p| p.consistency.as_deref()).collect();
        crate::retention::keep_newest_of_each(&levels, &mut keep);
        let dropped = keep.iter().filter(|k| !**k).count();
        if dropped == 0 {
            return Ok(0);
        }
        let mut kept: Vec<Point> = Vec::new();
        let mut run: Vec<&Point> = Vec::new();
        for (p, keep) in points.iter().zip(keep) {
            if !keep {
                run.push(p);
                continue;
            }
            let mut p = p.clone();
            match kept.last() {
                // Nothing older is kept: its way back is not needed.
                None => p.undo = None,
                Some(prev) if !run.is_empty() => {
                    let undos: Vec<String> = run
                        .iter()
                        .copied()
                        .chain([&p])
                        .map(|q| {
                            q.undo.clone().ok_or_else(|| StoreError::Damaged {
                                disk: self.name.clone(),
                                why: format!("point {} has no undo", q.change_id),
                            })
                        })
                        .collect::<Result<_>>()?;
                    let rel = format!(
                        "undo/{}-back-to-{}.ctkd",
                        p.change_id.replace('/', "-"),
                        prev.change_id.replace('/', "-")
                    );
                    self.fold_undos(&undos, prev, &p, &rel)?;
                    p.undo = Some(rel);
                    p.from = Some(prev.change_id.clone());
                }
                Some(_) => {}
            }
            run.clear();
            kept.push(p);
        }
        failpoint("folded");
        let mut m = self.manifest.clone();
        m.points = kept;
        self.write_manifest(m)?;
        self.remove_orphans();
        Ok(dropped)
    }

    /// Writes undo file `rel` taking point `to` back to `prev`, from the undo files `undos`
    /// (those of the points between them and of `to`, oldest first: the oldest holder of a
    /// byte wins).
    fn fold_undos(&self, undos: &[String], prev: &Point, to: &Point, rel: &str) -> Result<()> {
        let sources: Vec<PathBuf> = undos.iter().map(|u| self.dir.join(u)).collect();
        let block_size = self
            .manifest
            .block_size
            .unwrap_or(ctk::limits::BLOCK_SIZE_DEFAULT);
        let header = DeltaHeader {
            disk_id: self.name.clone(),
            disk_size: prev.disk_size,
            block_size,
            from: Some(self.point_id(&prev.change_id)?),
            to: self.point_id(&to.change_id)?,
        };
        self.compose(&sources, &header, &self.dir.join(rel))?;
        self.sync_dir(&self.dir.join("undo"))
    }

    /// Writes to `out` (synced) one delta with `header` made of the records of the delta
    /// files `sources`, clipped to the header's disk size; where several hold a byte, the
    /// first source that does wins. Returns the ranges it writes, merged.
    fn compose(
        &self,
        sources: &[PathBuf],
        header: &DeltaHeader,
        out: &Path,
    ) -> Result<Vec<Extent>> {
        let mut files = Vec::with_capacity(sources.len());
        for path in sources {
            files.push(DeltaFile::open(
                self.open_file(path, "opening a delta to compose")?,
            )?);
        }
        let size = header.disk_size;
        // Which file and record each byte range comes from.
        let mut covered = Covered::default();
        let mut pieces: Vec<(u64, u64, usize, usize)> = Vec::new();
        for (fi, f) in files.iter().enumerate() {
            for (ri, r) in f.records().iter().enumerate() {
                for (start, end) in covered.claim(r.offset, r.end().min(size)) {
                    pieces.push((start, end, fi, ri));
                }
            }
        }
        pieces.sort_unstable_by_key(|p| p.0);
        let file = self.writer(out, "creating a composed delta")?;
        let mut w = delta::DeltaWriter::new(
            file,
            header,
            WriteOptions {
                zstd_level: Some(1),
            },
        )?;
        let mut touched: Vec<Extent> = Vec::new();
        for (start, end, fi, ri) in pieces {
            let r = files[fi].records()[ri];
            if r.zero {
                w.write_zero(start, end - start)?;
            } else {
                let data = files[fi].read(&r)?;
                w.write_extent(
                    start,
                    &data[(start - r.offset) as usize..(end - r.offset) as usize],
                )?;
            }
            match touched.last_mut() {
                Some(last) if last.end() == start => last.length = end - last.offset,
                _ => touched.push(Extent::new(start, end - start)),
            }
        }
        let (file, _) = w.finish()?;
        finish_file(file, "writing a composed delta")?;
        Ok(touched)
    }

    /// Can this filesystem hold an image of `disk_size` bytes? Probed on a scratch file,
    /// before anything is recorded: a size it cannot hold would otherwise fail the apply
    /// after "applying" is written, and every reopen would retry it and fail again.
    fn probe_size(&self, disk_size: u64) -> Result<()> {
        let probe = self.dir.join("staging").join("size-probe");
        let fits = self.fs.create(&probe).and_then(|f| f.set_len(disk_size));
        self.remove(&probe);
        fits.map_err(|e| {
            StoreError::Mismatch(format!(
                "the delta's disk size {disk_size} cannot be stored here: {e}"
            ))
        })
    }

    /// A first full into an empty store, written into full.img as it arrives: no staged
    /// copy, no second decode. There is no earlier point to protect, so the merge is
    /// recorded ("applying", direct) before the first byte lands, and anything that fails
    /// (a check of the delta, the trailer, the digest, a crash) empties the store again.
    /// The leaves are computed from the data as it is written rather than read back: the
    /// digest check covers the agent, the transport and this merge; `verify` and every
    /// restore read the image back.
    fn ingest_first_full<R: Read>(
        &mut self,
        header: DeltaHeader,
        input: Replayed<R>,
        end: impl FnOnce(R) -> Result<PointMeta>,
        resume: Option<Partial>,
    ) -> Result<Ingested> {
        let started = std::time::Instant::now();
        let full = self.full()?;
        match &resume {
            None => {
                self.check_fits(&header)?;
                self.probe_size(header.disk_size)?;
                // Whatever an earlier cut-off full left in full.img goes now.
                self.drop_partial();
                full.set_len(0)
                    .and_then(|()| full.set_len(header.disk_size))
                    .map_err(io_err("sizing full.img"))?;
            }
            // Resumed: full.img holds the received part, at the disk's size.
            Some(_) => {
                let len = full.len().map_err(io_err("reading a size"))?;
                if len != header.disk_size {
                    self.drop_partial();
                    return Err(StoreError::Mismatch(format!(
                        "full.img is {len} bytes, not the {} the resumed full needs: push from the start",
                        header.disk_size
                    )));
                }
            }
        }
        let mut m = self.manifest.clone();
        m.block_size = Some(header.block_size);
        m.applying = Some(Applying {
            change_id: header.to.to_string(),
            staged: String::new(),
            undo: None,
            meta: PointMeta::default(),
            direct: true,
        });
        self.write_manifest(m)?;
        failpoint("applying_recorded");
        let mut reached = None;
        match self.first_full_inner(&full, &header, input, end, resume.is_some(), &mut reached) {
            Ok(point) => {
                self.drop_partial();
                tracing::info!(
                    disk = %self.name,
                    point = %point.change_id,
                    seconds = started.elapsed().as_secs_f64(),
                    resumed = resume.is_some(),
                    "first full written in place"
                );
                Ok(Ingested::Committed { point, dropped: 0 })
            }
            // Cut off on the way: full.img holds every record below `reached` as of this
            // cut, which is kept as the resume state (unless an earlier one reached further:
            // what this one wrote below it is newer and changed since it, so a resume from
            // it sends those blocks again anyway).
            Err(e) if reached.is_some() => {
                let reached = reached.unwrap_or(0);
                full.sync().map_err(io_err("syncing full.img"))?;
                let mut m = self.manifest.clone();
                m.applying = None;
                self.write_manifest(m)?;
                if resume.as_ref().is_none_or(|p| reached > p.next_offset) {
                    self.save_partial(&Partial {
                        from: None,
                        to: header.to.to_string(),
                        next_offset: reached,
                        disk_size: header.disk_size,
                        block_size: header.block_size,
                        direct: true,
                    })?;
                    tracing::info!(
                        disk = %self.name, to = %header.to, next_offset = reached,
                        "a first full was cut off: the received part is kept for a resume"
                    );
                }
                Err(e)
            }
            Err(e) => {
                if let Some(applying) = self.manifest.applying.clone() {
                    self.roll_back(&full, &applying)?;
                }
                self.drop_partial();
                Err(e)
            }
        }
    }

    /// Writes a first full's records into full.img as they arrive. Cut off (the input
    /// failed) after at least one record, it sets `reached` to the disk offset every record
    /// below which was written. A `resumed` full has records of an earlier push already in
    /// full.img, so its leaves are read back whole instead of computed from the data.
    fn first_full_inner<R: Read>(
        &mut self,
        full: &dyn FileAt,
        header: &DeltaHeader,
        mut input: Replayed<R>,
        end: impl FnOnce(R) -> Result<PointMeta>,
        resumed: bool,
        reached: &mut Option<u64>,
    ) -> Result<Point> {
        let mut leaves = if resumed {
            None
        } else {
            Leaves::zeroed(header.disk_size, header.block_size).ok()
        };
        // Past the page cache where the filesystem allows (see `write_behind`); on any early
        // return it is dropped, which waits for its queued writes. A fresh full.img is one
        // hole; a resumed one holds the received part between this push's records.
        let direct = self
            .fs
            .open_direct(&self.full_path())
            .map_err(io_err("opening full.img for direct writes"))?;
        let mut out = WriteBehind::new(full, direct, !resumed);
        let mut reader = DeltaReader::new(&mut input)?;
        loop {
            let record = match reader.next_record() {
                Ok(Some(record)) => record,
                Ok(None) => break,
                // The input ended or failed part way: a push cut off.
                Err(e) if is_cut_off(&e) => {
                    let at = reader.checkpoint().next_offset;
                    // Every record below `at` must be in the file before the caller syncs
                    // it as the resume state; if one failed to land, this is no cut-off.
                    out.finish().map_err(io_err("writing full.img"))?;
                    if at > 0 {
                        *reached = Some(at);
                    }
                    return Err(cut_off_error(e));
                }
                Err(e) => return Err(e.into()),
            };
            match record {
                DeltaRecord::Data { offset, data } => {
                    out.write(offset, data)
                        .map_err(io_err("writing full.img"))?;
                    if let Some(l) = leaves.as_mut() {
                        let _ = l.set_data(offset, data);
                    }
                }
                // A fresh image starts as one hole: zeros need nothing written. A resumed
                // one may hold the received part's data there.
                DeltaRecord::Zero { offset, length } => {
                    if resumed {
                        zero_range(full, offset, length)?;
                    }
                    if let Some(l) = leaves.as_mut() {
                        let _ = l.set_zero(offset, length);
                    }
                }
            }
        }
        out.finish().map_err(io_err("writing full.img"))?;
        let delta_bytes = reader.summary().stream_bytes;
        drop(reader);
        let mut extra = [0u8; 1];
        if input
            .read(&mut extra)
            .map_err(io_err("reading the delta"))?
            != 0
        {
            return Err(StoreError::Mismatch(
                "bytes after the delta's trailer".into(),
            ));
        }
        let meta = end(input.into_inner().1)?;
        full.sync().map_err(io_err("syncing full.img"))?;
        failpoint("applied");
        if resumed {
            leaves = Leaves::of_image(full, header.disk_size, header.block_size).ok();
        }
        let checked = self.check_digest(leaves.as_ref(), &meta)?;
        let mut point = Point {
            change_id: header.to.to_string(),
            from: None,
            disk_size: header.disk_size,
            committed_unix_ms: (self.clock)(),
            undo: None,
            delta_bytes,
            cut_unix_ms: meta.cut_unix_ms,
            consistency: meta.consistency.clone(),
            image_digest: None,
            digest_checked: false,
        };
        self.save_leaves(leaves, header, &mut point, checked)?;
        failpoint("leaves_saved");
        let mut m = self.manifest.clone();
        m.points = vec![point.clone()];
        m.applying = None;
        self.write_manifest(m)?;
        failpoint("committed");
        self.remove_orphans();
        Ok(point)
    }

    /// Refuses a delta that does not continue this store's newest point.
    fn check_fits(&self, h: &DeltaHeader) -> Result<()> {
        if h.disk_id != self.name {
            return Err(StoreError::Mismatch(format!(
                "delta is of disk {:?}, this store holds {:?}",
                h.disk_id, self.name
            )));
        }
        if let Some(bs) = self.manifest.block_size
            && bs != h.block_size
        {
            return Err(StoreError::Mismatch(format!(
                "delta has {}-byte blocks, the store {bs}",
                h.block_size
            )));
        }
        if self
            .points()
            .iter()
            .any(|p| p.change_id == h.to.to_string())
        {
            return Ok(()); // a re-delivery: acknowledged by the caller
        }
        match (self.points().last(), h.from) {
            (None, None) => Ok(()),
            (None, Some(from)) => Err(StoreError::Mismatch(format!(
                "the store is empty: it needs a full first, not an increment from {from}"
            ))),
            (Some(newest), None) => Err(StoreError::Mismatch(format!(
                "the store already holds points up to {}; a new full needs resync (not built yet) or a new store",
                newest.change_id
            ))),
            (Some(newest), Some(from)) if from.to_string() != newest.change_id => {
                Err(StoreError::Mismatch(format!(
                    "delta starts at {from}, the newest point is {}",
                    newest.change_id
                )))
            }
            _ => Ok(()),
        }
    }

    /// Writes, durably, the pre-images of everything the staged delta will overwrite: the
    /// ranges of its records inside the current size, and the tail a shrink would cut.
    /// Takes the newest point's leaves to check them against and gives them back.
    fn write_undo(
        &self,
        base: Option<Leaves>,
        newest: &Point,
        header: &DeltaHeader,
        touched: &[Extent],
        rel: &str,
    ) -> Result<Option<Leaves>> {
        let full = self.full()?;
        let mut undo = UndoWriter::create(self, full, base, newest, header, &self.dir.join(rel))?;
        for e in touched {
            undo.add(e.offset, e.length)?;
        }
        let (w, base) = undo.finish()?;
        finish_file(w, "writing the undo")?;
        self.sync_dir(&self.dir.join("undo"))?;
        Ok(base)
    }

    /// Writes the image of point `change_id` to `out` (sparse), calling `progress` with the
    /// bytes done and the total.
    ///
    /// Each byte is read once, from the first source that holds it as of the point: the undo
    /// of the next newer point (the pre-images its merge overwrote, that is, this point's
    /// bytes), else the undo of the one after, and so on, else the full. Only record heads
    /// are read from undo files whose records are not needed, so the cost is the image's
    /// size plus a few bytes per record of the newer undos, however long the chain. (It was
    /// a full copy plus every newer undo applied in turn, each byte written once per point.)
    pub fn restore(
        &self,
        change_id: &str,
        out: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Point> {
        let index = self
            .points()
            .iter()
            .position(|p| p.change_id == change_id)
            .ok_or_else(|| StoreError::NoSuchPoint(change_id.into()))?;
        let point = self.points()[index].clone();
        let size = point.disk_size;
        let target = self
            .fs
            .create(out)
            .map_err(io_err(format!("creating {}", out.display())))?;
        target
            .set_len(size)
            .map_err(io_err("sizing the restored image"))?;
        let mut covered = Covered::default();
        let mut done = 0u64;
        for p in &self.points()[index + 1..] {
            let undo = p.undo.as_ref().ok_or_else(|| StoreError::Damaged {
                disk: self.name.clone(),
                why: format!("point {} has no undo", p.change_id),
            })?;
            let mut undo_file =
                DeltaFile::open(self.open_file(&self.dir.join(undo), "opening an undo")?)?;
            let records = undo_file.records().to_vec();
            for r in records {
                let gaps = covered.claim(r.offset, r.end().min(size));
                if gaps.is_empty() {
                    continue;
                }
                // A zero record needs nothing written: the target starts as one hole.
                let data = if r.zero {
                    None
                } else {
                    Some(undo_file.read(&r)?)
                };
                for (start, end) in gaps {
                    if let Some(data) = data {
                        let piece = &data[(start - r.offset) as usize..(end - r.offset) as usize];
                        write_sparse(&*target, piece, start)?;
                    }
                    done += end - start;
                }
                progress(done, size);
            }
        }
        // Everything no newer merge overwrote is as the full holds it.
        let full = self.open_file(&self.full_path(), "opening full.img")?;
        let full_len = full.len().map_err(io_err("reading a size"))?;
        let mut buf = vec![0u8; CHUNK];
        for (start, end) in covered.claim(0, size.min(full_len)) {
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(CHUNK as u64) as usize;
                full.read_exact_at(&mut buf[..n], pos)
                    .map_err(io_err("reading full.img"))?;
                write_sparse(&*target, &buf[..n], pos)?;
                pos += n as u64;
                done += n as u64;
                progress(done, size);
            }
        }
        progress(size, size);
        target
            .sync()
            .map_err(io_err("syncing the restored image"))?;
        self.check_image(&target, &point, "the restored image")?;
        Ok(point)
    }

    /// Reads `image` whole and compares its digest with the one recorded for `point`
    /// (nothing to compare for points merged before digests existed). A mismatch means the
    /// store does not hold what was committed: an error, never a silent wrong image.
    fn check_image(&self, image: &dyn FileAt, point: &Point, what: &str) -> Result<()> {
        let (Some(expected), Some(bs)) = (&point.image_digest, self.manifest.block_size) else {
            return Ok(());
        };
        let got = match Leaves::of_image(image, point.disk_size, bs) {
            Ok(l) => l.digest(),
            Err(DigestError::Io(e)) => return Err(io_err(format!("reading {what}"))(e)),
            Err(_) => return Ok(()),
        };
        if got.to_string() != *expected {
            return Err(StoreError::Damaged {
                disk: self.name.clone(),
                why: format!(
                    "{what} of point {} has digest {got}, the point was committed as {expected}",
                    point.change_id
                ),
            });
        }
        Ok(())
    }

    /// Re-reads every undo file and any staged delta, checking every CRC, and full.img
    /// against the newest point's digest; returns how many files were checked.
    pub fn verify(&self) -> Result<Verified> {
        let mut done = Verified {
            points: self.points().len(),
            ..Verified::default()
        };
        for p in self.points() {
            if let Some(undo) = &p.undo {
                let path = self.dir.join(undo);
                let (h, _) = delta::verify(self.reader(&path, "opening an undo")?)?;
                if h.to.to_string() != p.change_id || h.from.map(|f| f.to_string()) != p.from {
                    return Err(StoreError::Damaged {
                        disk: self.name.clone(),
                        why: format!("{undo} is not the undo of {}", p.change_id),
                    });
                }
                done.files += 1;
                done.bytes += self.fs.open(&path).and_then(|f| f.len()).unwrap_or(0);
            }
        }
        let size = self
            .fs
            .open(&self.full_path())
            .and_then(|f| f.len())
            .unwrap_or(0);
        match self.points().last() {
            Some(p) if p.disk_size != size => Err(StoreError::Damaged {
                disk: self.name.clone(),
                why: format!("full.img is {size} bytes, the newest point {}", p.disk_size),
            }),
            Some(p) if p.image_digest.is_some() => {
                let full = self.open_file(&self.full_path(), "opening full.img")?;
                self.check_image(&full, p, "full.img")?;
                done.files += 1;
                done.bytes += size;
                done.full_checked = true;
                Ok(done)
            }
            _ => Ok(done),
        }
    }
}

/// What `verify` checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    /// Restore points in the manifest.
    pub points: usize,
    /// Files read whole and checked: undo files (every record's CRC and the trailer) and
    /// full.img (against the newest point's image digest).
    pub files: usize,
    /// Bytes of those files read.
    pub bytes: u64,
    /// Whether full.img was checked against a digest (a point without one cannot be).
    pub full_checked: bool,
}

/// The granularity of a restored image's holes: a block of zeros is not written.
const SPARSE_BLOCK: u64 = 4096;

/// Writes `data` at `offset` into a target that starts as one hole, leaving out every
/// `SPARSE_BLOCK` (aligned to the image) that holds only zeros, so the restored image is as
/// thin as the source; runs of blocks with data go out as one write.
fn write_sparse(target: &dyn FileAt, data: &[u8], offset: u64) -> Result<()> {
    let end = offset + data.len() as u64;
    let mut run: Option<u64> = None;
    let mut pos = offset;
    while pos < end {
        let next = ((pos / SPARSE_BLOCK + 1) * SPARSE_BLOCK).min(end);
        let block = &data[(pos - offset) as usize..(next - offset) as usize];
        match (is_zero(block), run) {
            (false, None) => run = Some(pos),
            (true, Some(from)) => {
                target
                    .write_all_at(
                        &data[(from - offset) as usize..(pos - offset) as usize],
                        from,
                    )
                    .map_err(io_err("writing the restored image"))?;
                run = None;
            }
            _ => {}
        }
        pos = next;
    }
    if let Some(from) = run {
        target
            .write_all_at(&data[(from - offset) as usize..], from)
            .map_err(io_err("writing the restored image"))?;
    }
    Ok(())
}

/// Copies what a reader reads into a file as it goes.
struct Tee<'a, R: Read, W: Write> {
    input: R,
    copy: &'a mut W,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Applies a (verified) delta to `target`: data written, zero ranges up to
/// [`ZERO_WRITE_MAX`] written as zeros, longer ones punched as holes.
fn apply_to(input: impl Read, target: &dyn FileAt) -> Result<()> {
    apply_reporting(input, target, |_| Ok(()))
}

/// [`apply_to`], calling `written(end)` after each record (an error from it stops the
/// apply): every byte of the delta's records below `end` is then written (records are
/// ascending and disjoint, which the reader enforces), so a reader may follow that far.
fn apply_reporting(
    input: impl Read,
    target: &dyn FileAt,
    mut written: impl FnMut(u64) -> Result<()>,
) -> Result<()> {
    let mut reader = DeltaReader::new(input)?;
    let size = reader.header().disk_size;
    let len = target.len().map_err(io_err("reading a size"))?;
    if len < size {
        target.set_len(size).map_err(io_err("growing the image"))?;
    }
    while let Some(record) = reader.next_record()? {
        let end = match record {
            DeltaRecord::Data { offset, data } => {
                target
                    .write_all_at(data, offset)
                    .map_err(io_err("writing the image"))?;
                offset + data.len() as u64
            }
            // A short zero range is written as its zeros: punching a hole costs ext4 an
            // extent-tree change in the journal per call (40% of an incremental apply's time
            // went to 64 KiB punches), and the blocks are allocated again by the next write
            // there. Long ones (a trimmed file) become holes, as the replica is thin.
            DeltaRecord::Zero { offset, length } if length <= ZERO_WRITE_MAX as u64 => {
                target
                    .write_all_at(&ZEROS[..length as usize], offset)
                    .map_err(io_err("writing the image"))?;
                offset + length
            }
            DeltaRecord::Zero { offset, length } => {
                zero_range(target, offset, length)?;
                offset + length
            }
        };
        written(end)?;
    }
    target.set_len(size).map_err(io_err("sizing the image"))?;
    Ok(())
}

/// Applies the verified delta `input` to `full` and syncs it, while a second thread reads
/// the merged blocks back a record behind the apply and brings `base` (the leaves of the
/// point before) to the merged image: the blocks the delta wrote, as full.img really holds
/// them (not as they were sent), and the block a size change cuts into. The read-back was a
/// pass of its own after the sync (about a tenth of an incremental merge); it reads the same
/// pages either way, and the agent's image digest checks the result: a read-back ahead of
/// the apply fails the e2e resume tests with a digest mismatch. `Ok(None)` when there are no leaves to bring along.
fn apply_and_read_back(
    input: impl Read,
    full: &dyn FileAt,
    base: Option<Leaves>,
    header: &DeltaHeader,
    touched: &[Extent],
    disk: &str,
) -> Result<Option<Leaves>> {
    // Test hook: a byte of the merged image goes bad as it is written (a misdirected or torn
    // write, media rot); the digest check must catch it.
    let mut flip = std::env::var("CTK_FAILPOINT").is_ok_and(|v| v == "flip_merged");
    let mut flip_first = |end: u64| -> Result<()> {
        if std::mem::take(&mut flip)
            && let Some(first) = touched.first()
            && first.offset < end
        {
            let mut b = [0u8; 1];
            full.read_exact_at(&mut b, first.offset)
                .and_then(|()| full.write_all_at(&[b[0] ^ 0x20], first.offset))
                .map_err(io_err("flipping a byte (test hook)"))?;
        }
        Ok(())
    };
    let Some(base) = base else {
        apply_reporting(input, full, &mut flip_first)?;
        full.sync().map_err(io_err("syncing full.img"))?;
        return Ok(None);
    };
    // Bounded: the apply waits rather than queueing an unbounded count of small records.
    let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(1024);
    std::thread::scope(|scope| {
        let reading = scope.spawn(move || read_back(base, full, header, touched, disk, rx));
        let mut sent = 0;
        let applied = apply_reporting(input, full, |end| {
            flip_first(end)?;
            // In steps of READ_BACK_STEP: woken for every small record, the reader cost the
            // apply about as much as it saved (probe, 64 KiB records), so it runs in a few
            // long bursts.
            if end >= sent + READ_BACK_STEP {
                // A reader that stopped (on an error of its own, returned below) needs no
                // more.
                let _ = tx.send(end);
                // And the disk, idle while the apply runs in the page cache, starts on
                // what the sync will need (probe: the apply step with its sync about 0.75
                // of its time without the hint).
                full.start_writeback(sent, end - sent);
                sent = end;
            }
            Ok(())
        });
        // The reader takes the end of the channel as the end of the apply.
        drop(tx);
        let synced = applied.and_then(|()| full.sync().map_err(io_err("syncing full.img")));
        let leaves = reading
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        synced?;
        leaves
    })
}

/// The longest zero range an apply writes as zeros rather than punching a hole: the gap a
/// first full bridges with zeros, so both leave the same kind of file.
const ZERO_WRITE_MAX: usize = crate::write_behind::GAP_FILL_MAX as usize;
static ZEROS: [u8; ZERO_WRITE_MAX] = [0; ZERO_WRITE_MAX];

/// How far the apply runs between wake-ups of its read-back.
const READ_BACK_STEP: u64 = 8 << 20;

/// The read-back half of [`apply_and_read_back`]: each chunk is read once `written` says the
/// apply has passed the end of its last block (records are ascending, so nothing below that
/// is written again), the block a size change cuts into once the apply has ended.
fn read_back(
    mut leaves: Leaves,
    full: &dyn FileAt,
    header: &DeltaHeader,
    touched: &[Extent],
    disk: &str,
    written: std::sync::mpsc::Receiver<u64>,
) -> Result<Option<Leaves>> {
    let old_size = leaves.disk_size();
    if leaves.resize(header.disk_size).is_err() {
        return Ok(None);
    }
    let bs = header.block_size as u64;
    let edge = leaves
        .edge_block(old_size)
        .map(|b| Extent::new(b * bs, bs.min(header.disk_size - b * bs)));
    let mut applied_to = 0u64;
    let mut wait_for = |end: u64| {
        while applied_to < end {
            // A closed channel: the apply ended (its outcome is the caller's to judge).
            applied_to = written.recv().unwrap_or(u64::MAX);
        }
    };
    let mut buf = vec![0u8; CHUNK];
    for e in touched {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = (e.end() - pos).min(CHUNK as u64) as usize;
            wait_for((pos + n as u64).next_multiple_of(bs));
            read_leaves(&mut leaves, full, pos, &mut buf[..n], disk)?;
            pos += n as u64;
        }
    }
    if let Some(e) = edge {
        wait_for(u64::MAX);
        read_leaves(
            &mut leaves,
            full,
            e.offset,
            &mut buf[..e.length as usize],
            disk,
        )?;
    }
    Ok(Some(leaves))
}

fn read_leaves(
    leaves: &mut Leaves,
    full: &dyn FileAt,
    pos: u64,
    buf: &mut [u8],
    disk: &str,
) -> Result<()> {
    full.read_exact_at(buf, pos)
        .map_err(io_err("reading back the merged image"))?;
    leaves.set_data(pos, buf).map_err(|e| StoreError::Damaged {
        disk: disk.to_string(),
        why: format!("block digests: {e}"),
    })
}

type FileWriter = BufWriter<vfs::Cursor<Box<dyn FileAt>>>;

/// The pre-images of a merge, written as the ranges it will overwrite come, in ascending
/// order: while the delta is staged, or from its ranges after. The undo names the same pair
/// as the merge (previous point -> this one), since the format orders from before to; its
/// size is the previous point's, which applying it restores.
struct UndoWriter {
    full: Box<dyn FileAt>,
    /// The newest point's leaves, each pre-image is checked against.
    leaves: Option<Leaves>,
    old_size: u64,
    /// Where the ranges of records stop being taken: the old size, or for a shrink the
    /// start of the block the new end falls in (from there the whole tail is taken at the
    /// end, so no range ends inside a block).
    limit: u64,
    writer: DeltaWriter<FileWriter>,
    buf: Vec<u8>,
    /// Pre-images are written up to here (two ranges can share a block's edge).
    done: u64,
    /// Ranges added but not yet read, oldest first, and their bytes: each is hinted to the
    /// kernel when added and read once [`UNDO_AHEAD`] bytes (or [`UNDO_AHEAD_RANGES`]
    /// ranges) are queued behind it, so the disk fetches many at once instead of one cold
    /// read at a time while the push waits (2% of a 4 GiB replica in 64 KiB extents: the
    /// staging took 0.45-0.69 s with the reads one by one, BENCHMARKS.md).
    pending: std::collections::VecDeque<(u64, u64)>,
    pending_bytes: u64,
}

/// How far the undo's reads of pre-images trail the ranges they were hinted for.
const UNDO_AHEAD: u64 = 8 << 20;
const UNDO_AHEAD_RANGES: usize = 1024;

impl UndoWriter {
    fn create(
        store: &DiskStore,
        full: Box<dyn FileAt>,
        leaves: Option<Leaves>,
        newest: &Point,
        header: &DeltaHeader,
        path: &Path,
    ) -> Result<UndoWriter> {
        let from = store.point_id(&newest.change_id)?;
        let undo_header = DeltaHeader {
            disk_id: store.name.clone(),
            disk_size: newest.disk_size,
            block_size: header.block_size,
            from: Some(from),
            to: header.to,
        };
        let out = store.writer(path, "creating the undo")?;
        let options = WriteOptions {
            zstd_level: Some(1),
        };
        let new_size = header.disk_size;
        let limit = if new_size < newest.disk_size {
            new_size - new_size % header.block_size as u64
        } else {
            newest.disk_size
        };
        Ok(UndoWriter {
            full,
            leaves,
            old_size: newest.disk_size,
            limit,
            writer: DeltaWriter::new(out, &undo_header, options)?,
            buf: Vec::new(),
            done: 0,
            pending: std::collections::VecDeque::new(),
            pending_bytes: 0,
        })
    }

    /// Adds the pre-image of `[offset, offset + length)` (the part inside the old size and
    /// not already added). Read a little later, in order: see `pending`.
    fn add(&mut self, offset: u64, length: u64) -> Result<()> {
        let end = offset.saturating_add(length).min(self.limit);
        if offset >= end {
            return Ok(());
        }
        // A long range (a large zero record) is hinted only as far as the queue reaches:
        // the rest is read in its turn, with the kernel's own read-ahead.
        self.full.will_need(offset, (end - offset).min(UNDO_AHEAD));
        self.pending.push_back((offset, end));
        self.pending_bytes += end - offset;
        while self.pending_bytes > UNDO_AHEAD || self.pending.len() > UNDO_AHEAD_RANGES {
            self.take_oldest()?;
        }
        Ok(())
    }

    fn take_oldest(&mut self) -> Result<()> {
        if let Some((offset, end)) = self.pending.pop_front() {
            self.pending_bytes -= end - offset;
            self.take(offset, end)?;
        }
        Ok(())
    }

    fn take(&mut self, offset: u64, end: u64) -> Result<()> {
        let start = offset.max(self.done);
        if start >= end {
            return Ok(());
        }
        let (full, leaves) = (&self.full, self.leaves.as_ref());
        // Each pre-image is checked against the newest point's block digests as it is read:
        // an undo is only read back when a restore needs it, by then too late to fetch the
        // bytes again, so a bad read (a flipped bit, a misdirected read) must be caught here.
        // A transient one is read again; one that persists refuses the merge before
        // anything is recorded. (Found by the simulation's bad reads: the undo kept a
        // flipped bit, and the older point no longer restored.)
        let read = |offset: u64, buf: &mut [u8]| -> io::Result<()> {
            for _ in 0..READ_ATTEMPTS {
                full.read_exact_at(buf, offset)?;
                if leaves.is_none_or(|l| l.matches(offset, buf)) {
                    return Ok(());
                }
            }
            Err(io::Error::other(format!(
                "full.img at offset {offset} does not read back as the newest point's block \
                 digests say, {READ_ATTEMPTS} times (bad reads or rot: run verify)"
            )))
        };
        self.writer
            .write_read(Extent::new(start, end - start), &mut self.buf, read)?;
        self.done = end;
        Ok(())
    }

    /// Adds the tail a shrink cuts (from the block the new end falls in) and ends the undo;
    /// returns its writer (not yet synced) and the leaves.
    fn finish(mut self) -> Result<(FileWriter, Option<Leaves>)> {
        while !self.pending.is_empty() {
            self.take_oldest()?;
        }
        self.take(self.limit, self.old_size)?;
        let (w, _) = self.writer.finish()?;
        Ok((w, self.leaves))
    }
}

/// An [`UndoWriter`] on a thread of its own, fed the ranges of a push as they are staged:
/// reading the pre-images (cold: full.img was mostly written past the page cache), checking
/// their leaves and compressing them took about two thirds as long as the rest of the
/// staging (probe: 0.09-0.10 s against 0.14 s), and on the staging's thread it added to it.
struct UndoThread {
    ranges: Option<std::sync::mpsc::SyncSender<UndoMsg>>,
    thread: Option<std::thread::JoinHandle<Result<Option<Leaves>>>>,
}

enum UndoMsg {
    Range(u64, u64),
    /// The push is whole: write the rest and sync. (A channel closed without it is a push
    /// abandoned: the thread stops and the caller removes the file.)
    End,
}

impl UndoThread {
    fn spawn(mut undo: UndoWriter) -> Result<UndoThread> {
        // Bounded: a push of many small records waits for the undo rather than queueing.
        let (tx, rx) = std::sync::mpsc::sync_channel(UNDO_AHEAD_RANGES);
        let thread = std::thread::Builder::new()
            .name("ctk-undo".into())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        UndoMsg::Range(offset, length) => undo.add(offset, length)?,
                        UndoMsg::End => {
                            let (w, leaves) = undo.finish()?;
                            finish_file(w, "writing the undo")?;
                            return Ok(leaves);
                        }
                    }
                }
                Err(io_err("writing the undo")(io::Error::other(
                    "the push was abandoned",
                )))
            })
            .map_err(io_err("starting the undo's thread"))?;
        Ok(UndoThread {
            ranges: Some(tx),
            thread: Some(thread),
        })
    }

    /// Adds the pre-image of `[offset, offset + length)`; an error of the undo's (a bad
    /// read, a full disk) is returned here as soon as it is known.
    fn add(&mut self, offset: u64, length: u64) -> Result<()> {
        let sent = match &self.ranges {
            Some(tx) => tx.send(UndoMsg::Range(offset, length)).is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The thread stopped: its error says why.
        self.ranges = None;
        match self.wait() {
            Err(e) => Err(e),
            Ok(_) => Err(io_err("writing the undo")(io::Error::other(
                "the undo ended early",
            ))),
        }
    }

    /// The push is whole: the undo finishes and syncs on its thread.
    fn end(&mut self) {
        if let Some(tx) = self.ranges.take() {
            // A thread already stopped reports its error at `join`.
            let _ = tx.send(UndoMsg::End);
        }
    }

    /// Waits for the undo to be written and synced; returns the newest point's leaves.
    fn join(mut self) -> Result<Option<Leaves>> {
        self.end();
        self.wait()
    }

    fn wait(&mut self) -> Result<Option<Leaves>> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => Err(io_err("writing the undo")(io::Error::other(
                "the undo's thread was already joined",
            ))),
        }
    }
}

impl Drop for UndoThread {
    /// An abandoned push: the thread is stopped and waited for, so the caller may remove the
    /// file it wrote.
    fn drop(&mut self) {
        self.ranges = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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

fn zero_range(target: &dyn FileAt, offset: u64, length: u64) -> Result<()> {
    target
        .zero(offset, length)
        .map_err(io_err("zeroing the image"))
}

/// Byte ranges already written by a restore: disjoint, kept as start -> end.
#[derive(Default)]
struct Covered(std::collections::BTreeMap<u64, u64>);

impl Covered {
    /// Marks `[start, end)` covered and returns the parts of it that were not yet, ascending.
    fn claim(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        if start >= end {
            return gaps;
        }
        // Every covered range that touches [start, end), starting with one that begins
        // before `start` and reaches into it.
        let first = self
            .0
            .range(..=start)
            .next_back()
            .filter(|&(_, &e)| e >= start)
            .map(|(&s, _)| s)
            .unwrap_or(start);
        let touching: Vec<(u64, u64)> = self.0.range(first..=end).map(|(&s, &e)| (s, e)).collect();
        let mut pos = start;
        let (mut lo, mut hi) = (start, end);
        for &(s, e) in &touching {
            if s > pos {
                gaps.push((pos, s.min(end)));
            }
            pos = pos.max(e);
            lo = lo.min(s);
            hi = hi.max(e);
            self.0.remove(&s);
        }
        if pos < end {
            gaps.push((pos, end));
        }
        self.0.insert(lo, hi);
        gaps
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
