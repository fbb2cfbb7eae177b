//! A restore point read while the store goes on merging (`expose`): pinned against retention,
//! and read through a map that follows every merge.
//!
//! Two files beside the manifest make that safe across processes:
//! - `generation`: a counter (8 bytes, little-endian) every manifest write increments after
//!   its rename, and recovery increments before it touches full.img. A reader checks it
//!   before and after each read, seqlock-style: a merge records "applying" (with its
//!   durable undo) and only then increments and writes full.img, so a read that saw any
//!   byte of an apply sees a new generation afterwards and is done again, through a map
//!   rebuilt from the new manifest, whose undo holds what the apply overwrote.
//! - `expose.lock` and `expose.pin`: the process exposing a point holds `expose.lock`
//!   (flock) for as long as it serves and names the point in `expose.pin` (replaced whole).
//!   Retention keeps the named point while the lock is held; a pin whose lock is free is
//!   stale (its process is gone) and ignored. One exposure per disk.
//!
//! Undo files never change once written, and a retention fold writes new ones: a reader's
//! open files stay right until its next rebuild, even if a fold removed their names.

use super::*;

/// The counter file readers check around each read.
const GENERATION: &str = "generation";
const EXPOSE_LOCK: &str = "expose.lock";
const EXPOSE_PIN: &str = "expose.pin";
/// How long an exposure waits for the probes of its lock (retention, `points`, `drill stop`
/// hold it for microseconds) before it takes a held lock as another exposure.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
/// Reads tried before giving up on a store that merges faster than a read completes.
const READ_TRIES: usize = 64;

/// The generation counter as the file holds it (0 before any write).
fn read_generation(file: &dyn FileAt) -> Result<u64> {
    let mut bytes = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match file.read_at(&mut bytes[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("reading the store's generation")(e)),
        }
    }
    Ok(if got == 8 {
        u64::from_le_bytes(bytes)
    } else {
        0
    })
}

impl DiskStore {
    /// Tells live readers that what the manifest says, or full.img, is about to change or
    /// has changed: they rebuild their maps before their next read. Not synced: only
    /// running readers care, and they do not outlive the machine.
    pub(super) fn bump_generation(&self) -> Result<()> {
        let path = self.dir.join(GENERATION);
        let file = self
            .fs
            .open_rw(&path)
            .map_err(io_err("opening the store's generation"))?;
        let next = read_generation(&*file)?.wrapping_add(1);
        file.write_all_at(&next.to_le_bytes(), 0)
            .map_err(io_err("writing the store's generation"))
    }

    /// The point an exposure pins, if one is live: `Ok(None)` when nothing is exposed,
    /// `Err(())` when an exposure holds the lock but its pin cannot be read yet (it is being
    /// written): then retention drops nothing this time.
    pub(super) fn pinned(&self) -> std::result::Result<Option<ChangeId>, ()> {
        match self.fs.lock(&self.dir.join(EXPOSE_LOCK), false) {
            // Nobody holds it: no exposure (a pin file left by a killed one is stale).
            Ok(_free) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let pin = self.fs.open(&self.dir.join(EXPOSE_PIN)).ok();
                let mut text = String::new();
                let read = pin.is_some_and(|f| {
                    vfs::Cursor::new(f)
                        .take(256)
                        .read_to_string(&mut text)
                        .is_ok()
                });
                match text.split_whitespace().next().map(str::parse::<ChangeId>) {
                    Some(Ok(id)) if read => Ok(Some(id)),
                    _ => Err(()),
                }
            }
            // The lock cannot even be tried (a read-only store?): keep everything.
            Err(_) => Err(()),
        }
    }
}

/// Whether a process exposes a point of disk `name` under `root` now (holds `expose.lock`):
/// the kernel releases the lock as the holder exits, however it exits. Creates nothing (a
/// read command may look at a store it cannot write).
pub fn exposed(root: &Path, name: &str) -> Result<bool> {
    use std::os::fd::AsRawFd;
    validate_name(name)?;
    let path = root.join(name).join(EXPOSE_LOCK);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("probing expose.lock")(e)),
    };
    // SAFETY: flock on an open descriptor touches no memory. Shared: two probes never
    // conflict; an exposure starting meanwhile waits them out (`LOCK_WAIT`).
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        return Ok(false);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(true)
    } else {
        Err(io_err("probing expose.lock")(e))
    }
}

/// The point a live exposure of disk `name` pins, if there is one (read without the store's
/// lock, for `points`).
pub fn exposed_point(root: &Path, name: &str) -> Result<Option<ChangeId>> {
    if !exposed(root, name)? {
        return Ok(None);
    }
    let text = std::fs::read_to_string(root.join(name).join(EXPOSE_PIN)).unwrap_or_default();
    Ok(text.split_whitespace().next().and_then(|t| t.parse().ok()))
}

/// Takes `expose.lock` for an exposure: held by someone for longer than `LOCK_WAIT`, it is
/// another exposure's.
fn take_expose_lock(fs: &dyn Vfs, dir: &Path, name: &str) -> Result<LockGuard> {
    let started = std::time::Instant::now();
    loop {
        match fs.lock(&dir.join(EXPOSE_LOCK), false) {
            Ok(lock) => return Ok(lock),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && started.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(StoreError::Exposed {
                    disk: name.to_owned(),
                });
            }
            // No store there: say so rather than name the lock file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NoSuchPoint(format!(
                    "of disk {name:?} (it has no store here)"
                )));
            }
            Err(e) => return Err(io_err("locking expose.lock")(e)),
        }
    }
}

/// A point held exposed: pinned against retention for the life of this value.
pub struct Exposure {
    fs: Arc<dyn Vfs>,
    dir: PathBuf,
    name: String,
    point: Point,
    _lock: LockGuard,
}

/// Which point to expose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    Latest,
    Id(ChangeId),
}

impl Exposure {
    /// Pins point `pick` of disk `name` under `root` for exposing it, without taking the
    /// store's own lock (a running `serve` goes on merging). Fails at once if the disk is
    /// already exposed, or the point is not kept.
    pub fn open(root: &Path, name: &str, pick: Pick) -> Result<Exposure> {
        Self::open_in(Arc::new(RealFs), root, name, pick)
    }

    pub fn open_in(fs: Arc<dyn Vfs>, root: &Path, name: &str, pick: Pick) -> Result<Exposure> {
        validate_name(name)?;
        let dir = root.join(name);
        let manifest_path = dir.join("manifest.json");
        let lock = take_expose_lock(&*fs, &dir, name)?;
        // Resolve the point now that the pin's lock is held, then name it: a retention that
        // decided before the name was written may still drop it, and the first read after
        // (a new generation) then fails cleanly, never with another point's bytes.
        let manifest = read_manifest(&*fs, &manifest_path, name)?.ok_or_else(|| {
            StoreError::NoSuchPoint(format!("of disk {name:?} (its store holds no point yet)"))
        })?;
        let point = match pick {
            Pick::Latest => manifest.points.last().cloned(),
            Pick::Id(id) => manifest.points.iter().find(|p| p.change_id == id).cloned(),
        };
        let point = point.ok_or_else(|| match pick {
            Pick::Latest => StoreError::NoSuchPoint(format!("of disk {name:?} (none kept)")),
            Pick::Id(id) => manifest.no_such_point(id),
        })?;
        let pin = format!("{} {}\n", point.change_id, std::process::id());
        let tmp = dir.join("expose.pin.tmp");
        let f = fs.create(&tmp).map_err(io_err("writing expose.pin"))?;
        f.write_all_at(pin.as_bytes(), 0)
            .map_err(io_err("writing expose.pin"))?;
        fs.rename(&tmp, &dir.join(EXPOSE_PIN))
            .map_err(io_err("writing expose.pin"))?;
        Ok(Exposure {
            fs,
            dir,
            name: name.to_owned(),
            point,
            _lock: lock,
        })
    }

    pub fn point(&self) -> &Point {
        &self.point
    }

    pub fn disk(&self) -> &str {
        &self.name
    }

    /// A reader of the exposed point (one per client: each keeps its own map and cache).
    pub fn reader(&self) -> Result<LiveReader> {
        let generation = self
            .fs
            .open_rw(&self.dir.join(GENERATION))
            .map_err(io_err("opening the store's generation"))?;
        let mut reader = LiveReader {
            fs: self.fs.clone(),
            dir: self.dir.clone(),
            name: self.name.clone(),
            change_id: self.point.change_id,
            size: self.point.disk_size,
            generation,
            built: None,
        };
        let now = read_generation(&*reader.generation)?;
        reader.rebuild(now)?;
        Ok(reader)
    }
}

impl Drop for Exposure {
    fn drop(&mut self) {
        // The lock goes with the value; the pin's name goes first so nothing reads it stale.
        let _ = self.fs.remove_file(&self.dir.join(EXPOSE_PIN));
    }
}

impl LiveReader {
    /// A reader of point `change_id` of disk `name` under `root` without an exposure of its
    /// own: for failback, which reads a failed-over disk's point while its `failover start`
    /// holds the exposure (and pins the point), or after it stopped (no merge commits into a
    /// fenced disk, so nothing retires the point either).
    pub fn of_fenced(root: &Path, name: &str, change_id: ChangeId) -> Result<LiveReader> {
        validate_name(name)?;
        let fs: Arc<dyn Vfs> = Arc::new(RealFs);
        let dir = root.join(name);
        let manifest = read_manifest(&*fs, &dir.join("manifest.json"), name)?
            .ok_or_else(|| StoreError::NoSuchPoint(change_id.to_string()))?;
        let point = manifest
            .points
            .iter()
            .find(|p| p.change_id == change_id)
            .ok_or_else(|| StoreError::NoSuchPoint(change_id.to_string()))?;
        let generation = fs
            .open_rw(&dir.join(GENERATION))
            .map_err(io_err("opening the store's generation"))?;
        let mut reader = LiveReader {
            fs,
            dir,
            name: name.to_owned(),
            change_id,
            size: point.disk_size,
            generation,
            built: None,
        };
        let now = read_generation(&*reader.generation)?;
        reader.rebuild(now)?;
        Ok(reader)
    }

    /// The byte ranges where the point may differ from the newest point: those read from a
    /// newer point's undo (or zeros past a newer point's end), not from full.img. Empty for
    /// the newest point.
    pub fn not_in_full(&mut self) -> Result<Vec<(u64, u64)>> {
        self.consistent(|map| {
            Ok(map
                .runs()
                .iter()
                .filter(|(_, _, source)| *source != Source::Full)
                .map(|&(start, end, _)| (start, end))
                .collect())
        })
    }
}

/// Reads of an exposed point that stay right while merges commit newer points.
pub struct LiveReader {
    fs: Arc<dyn Vfs>,
    dir: PathBuf,
    name: String,
    change_id: ChangeId,
    size: u64,
    generation: Box<dyn FileAt>,
    /// The map and the generation it was built at.
    built: Option<(u64, PointMap)>,
}

impl LiveReader {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// (Re)builds the map from the manifest as of generation `now`. A file the manifest
    /// names may be gone by the time it is opened (a later commit removed it): then the
    /// generation has moved on, and the caller tries again.
    fn rebuild(&mut self, now: u64) -> Result<()> {
        self.built = None;
        let manifest = read_manifest(&*self.fs, &self.dir.join("manifest.json"), &self.name)?
            .ok_or_else(|| StoreError::NoSuchPoint(self.change_id.to_string()))?;
        let map = PointMap::build(&*self.fs, &self.dir, &manifest, self.change_id)?;
        self.built = Some((now, map));
        Ok(())
    }

    /// Runs `f` on a map current at a generation that did not move while it ran; `f` must
    /// have no effect outside `out` (it runs again if the store changed underneath).
    fn consistent<T>(&mut self, mut f: impl FnMut(&mut PointMap) -> Result<T>) -> Result<T> {
        let mut last_error = None;
        for _ in 0..READ_TRIES {
            let before = read_generation(&*self.generation)?;
            let stale = self.built.as_ref().is_none_or(|(g, _)| *g != before);
            if stale && let Err(e) = self.rebuild(before) {
                // A file removed under the rebuild: the generation has moved; retry.
                if read_generation(&*self.generation)? != before {
                    last_error = Some(e);
                    continue;
                }
                return Err(e);
            }
            let (_, map) = self.built.as_mut().expect("built above");
            let result = f(map);
            if read_generation(&*self.generation)? == before {
                return result;
            }
            last_error = result.err();
        }
        Err(last_error.unwrap_or_else(|| StoreError::Io {
            doing: format!("reading point {}", self.change_id),
            source: io::Error::other("the store changed under every try"),
        }))
    }

    /// Reads `buf.len()` bytes of the point at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.consistent(|map| map.read_at(buf, offset))
    }

    /// `base:allocation` of `[offset, offset + length)` (see `PointMap::allocation`).
    pub fn allocation(&mut self, offset: u64, length: u64, max: usize) -> Result<Vec<(u64, bool)>> {
        let end = offset.saturating_add(length);
        self.consistent(|map| Ok(map.allocation(offset, end, max)))
    }
}
