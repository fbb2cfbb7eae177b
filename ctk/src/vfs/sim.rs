//! `SimFs`: the in-memory filesystem of the simulation, with the power cut model of the
//! module above (unsynced bytes kept, dropped or torn; unsynced name operations kept as an
//! in-order prefix; failed fsyncs that forget; ENOSPC; misread bytes).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{FileAt, LockGuard, Vfs};

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
