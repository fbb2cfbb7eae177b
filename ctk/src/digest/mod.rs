//! The whole-image digest of a restore point, and the per-block leaves it is built from.
//!
//! Each side keeps one 8-byte leaf per block of the image as of the last committed point:
//! the block's XXH3-64 hash, or 0 for a block of zeros (so an empty disk is all-zero leaves,
//! and a hole costs no hashing). The image digest is BLAKE3 over a domain tag, the disk size,
//! the block size and every leaf in order.
//!
//! Why XXH3 for the leaves: every replicated byte is hashed twice (agent and receiver), on
//! the same cores that read, compress, encrypt and write it, and BLAKE3 per 4 KiB block
//! costs more than the whole delta encoding (BENCHMARKS.md has the figures). The check
//! guards against accidents (a wrong block, a lost write, rot), not against an adversary
//! (the link is authenticated): a damaged block goes unnoticed with probability 2^-64. The
//! digest over the leaves stays BLAKE3. A merge changes only
//! the leaves of the blocks it writes, so both sides update their digest from the delta
//! alone: the agent from the blocks it exported, the receiver from the blocks it reads back
//! out of its merged image, and the two must agree before the receiver commits.
//!
//! Leaves are kept in a file ([`LeafFile`]) updated in place: a header marked dirty, the
//! changed leaves written, then the header marked clean with the point they describe. A
//! file that is dirty, damaged or of another point is "unknown", never trusted.
//!
//! Cost: 8 bytes per block (1/512 of the disk at 4 KiB blocks, 1/8192 at 64 KiB), held in
//! memory while a merge runs, and one BLAKE3 pass over them per point. At most
//! [`LEAVES_MAX`] leaves: a disk with more blocks has no digest (a typed error).

use std::io::{self, Write};
use std::path::Path;

use crate::id::{ChangeId, Generation};
use crate::limits::{BLOCK_SIZE_MAX, BLOCK_SIZE_MIN};
use crate::vfs::{Cursor, FileAt, RealFs, Vfs};

/// Most leaves one image digest covers: 512 MiB of leaves (256 GiB at 4 KiB blocks, 4 TiB
/// at 64 KiB).
pub const LEAVES_MAX: u64 = 1 << 26;

/// Most unit hashes one resync compares (64 MiB of hashes): a disk needs a unit of at least
/// its size / 2^21 (2 KiB per GiB).
pub const UNIT_HASHES_MAX: u64 = 1 << 21;
/// Smallest and largest resync unit.
pub const UNIT_MIN: u32 = 4096;
pub const UNIT_MAX: u32 = 16 << 20;

/// The resync hash of one unit of an image: BLAKE3 of its bytes (the last unit of a disk
/// holds only the bytes up to the disk's end). Strong, unlike the leaves: a resync decides
/// from it alone that a unit need not be sent.
pub fn unit_hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// How many unit hashes a disk of `disk_size` bytes has at `unit`, or why that unit does
/// not fit: not a multiple of 4 KiB within [`UNIT_MIN`, `UNIT_MAX`], or too many hashes.
pub fn unit_count(disk_size: u64, unit: u32) -> Result<u64, String> {
    if !(UNIT_MIN..=UNIT_MAX).contains(&unit) || !unit.is_multiple_of(UNIT_MIN) {
        return Err(format!(
            "resync unit {unit}: use a multiple of 4 KiB from 4 KiB to 16 MiB"
        ));
    }
    let count = disk_size.div_ceil(unit as u64);
    if count > UNIT_HASHES_MAX {
        return Err(format!(
            "resync unit {unit} is too small for a disk of {disk_size} bytes: use at least {}",
            disk_size
                .div_ceil(UNIT_HASHES_MAX)
                .next_multiple_of(UNIT_MIN as u64)
        ));
    }
    Ok(count)
}

const DOMAIN: &[u8] = b"ctk image digest v1 (xxh3-64 leaves)";
const MAGIC: [u8; 8] = *b"CTKLEAF1";
const HEADER: u64 = 64;

/// The digest of a whole image as of a point.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageDigest(pub [u8; 32]);

impl std::fmt::Display for ImageDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ImageDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ImageDigest({self})")
    }
}

impl std::str::FromStr for ImageDigest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<ImageDigest, DigestError> {
        let bad = || DigestError::BadText(s.chars().take(80).collect());
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(ImageDigest(out))
    }
}

/// In JSON (the receiver's manifest, `--json` answers) a digest is its 64 hex digits.
impl serde::Serialize for ImageDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ImageDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ImageDigest, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("I/O error on the block digests: {0}")]
    Io(#[from] io::Error),
    #[error("{blocks} blocks is more than the {LEAVES_MAX} a digest covers")]
    TooLarge { blocks: u64 },
    #[error("block size {0} is not a power of two from 4 KiB to 1 MiB")]
    BadBlockSize(u32),
    #[error("{0:?} is not an image digest (64 hex digits)")]
    BadText(String),
    #[error("range {offset}+{length} is not whole blocks of the image")]
    BadRange { offset: u64, length: u64 },
}

/// The leaf of one block's bytes (a whole block, or the partial last one).
pub fn leaf(data: &[u8]) -> u64 {
    if crate::delta::is_zero(data) {
        return 0;
    }
    // 0 means zeros; a data block that hashes to 0 takes 1 instead.
    xxhash_rust::xxh3::xxh3_64(data).max(1)
}

/// The leaves of an image: one per block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaves {
    disk_size: u64,
    block_size: u32,
    leaves: Vec<u64>,
    /// The point these leaves were loaded as, and which leaves changed since (in the order
    /// they were set), so a save can write just those.
    base: Option<ChangeId>,
    changed: Vec<u64>,
}

fn block_count(disk_size: u64, block_size: u32) -> Result<u64, DigestError> {
    if !block_size.is_power_of_two() || !(BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&block_size) {
        return Err(DigestError::BadBlockSize(block_size));
    }
    let blocks = disk_size.div_ceil(block_size as u64);
    if blocks > LEAVES_MAX {
        return Err(DigestError::TooLarge { blocks });
    }
    Ok(blocks)
}

impl Leaves {
    /// The leaves of an image of zeros.
    pub fn zeroed(disk_size: u64, block_size: u32) -> Result<Leaves, DigestError> {
        let blocks = block_count(disk_size, block_size)?;
        Ok(Leaves {
            disk_size,
            block_size,
            leaves: vec![0; blocks as usize],
            base: None,
            changed: Vec::new(),
        })
    }

    /// The leaves of `image`'s first `disk_size` bytes, read whole (holes read as zeros).
    pub fn of_image<F: FileAt + ?Sized>(
        image: &F,
        disk_size: u64,
        block_size: u32,
    ) -> Result<Leaves, DigestError> {
        let mut leaves = Leaves::zeroed(disk_size, block_size)?;
        let bs = block_size as u64;
        // A file shorter than the disk is an error, as reading it whole would find.
        if image.len()? < disk_size {
            return Err(DigestError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let mut buf = vec![0u8; (1 << 20).max(bs as usize)];
        // Only the data is read: a hole reads as zeros, whose leaf is the zeroed one already
        // there (a sparse image of a large, mostly empty disk costs what its data costs).
        // Each data range is widened to whole blocks, so a block part hole, part data is
        // read whole.
        let mut next = 0;
        while next < disk_size {
            let Some(data) = image.next_data(next)? else {
                break;
            };
            let start = data / bs * bs;
            if start >= disk_size {
                break;
            }
            let hole = image.next_hole(data)?.max(data + 1);
            let end = hole.div_ceil(bs).saturating_mul(bs).min(disk_size);
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(buf.len() as u64) as usize;
                image.read_exact_at(&mut buf[..n], pos)?;
                for (i, block) in buf[..n].chunks(bs as usize).enumerate() {
                    leaves.leaves[(pos / bs) as usize + i] = leaf(block);
                }
                pos += n as u64;
            }
            next = end;
        }
        Ok(leaves)
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Changes the size: blocks past the end go, new blocks are zeros. The leaf of a block
    /// the size cuts into or grows out of is not known here: the caller sets it afterwards
    /// (see [`Leaves::edge_block`]).
    pub fn resize(&mut self, disk_size: u64) -> Result<(), DigestError> {
        let blocks = block_count(disk_size, self.block_size)?;
        self.leaves.resize(blocks as usize, 0);
        self.disk_size = disk_size;
        // A resize changes the file's length: the next save writes it whole.
        self.base = None;
        Ok(())
    }

    /// The block whose leaf a resize from `old_size` to the current size leaves unknown: the
    /// last block of the smaller size, if it is partial in either. `None` if there is none.
    pub fn edge_block(&self, old_size: u64) -> Option<u64> {
        let bs = self.block_size as u64;
        let small = old_size.min(self.disk_size);
        (old_size != self.disk_size && !small.is_multiple_of(bs)).then_some(small / bs)
    }

    /// Sets the leaves of the whole blocks in `data`, which starts at block-aligned `offset`
    /// (it may end with the image's partial last block).
    pub fn set_data(&mut self, offset: u64, data: &[u8]) -> Result<(), DigestError> {
        let first = self.check(offset, data.len() as u64)?;
        for (i, block) in data.chunks(self.block_size as usize).enumerate() {
            self.set(first + i as u64, leaf(block));
        }
        Ok(())
    }

    /// Whether the whole blocks of `data`, read at `offset`, have the leaves recorded here (a
    /// read checked against the point it should return). Blocks `data` holds only part of,
    /// and blocks past the end, are not judged.
    pub fn matches(&self, offset: u64, data: &[u8]) -> bool {
        let bs = self.block_size as u64;
        let end = offset + data.len() as u64;
        let mut b = offset.div_ceil(bs);
        while b < self.leaves.len() as u64 {
            let start = b * bs;
            let stop = (start + bs).min(self.disk_size);
            if stop > end {
                break;
            }
            let piece = &data[(start - offset) as usize..(stop - offset) as usize];
            if leaf(piece) != self.leaves[b as usize] {
                return false;
            }
            b += 1;
        }
        true
    }

    /// Sets one block's leaf, as computed elsewhere (the agent's export computes them).
    pub fn set_leaf(&mut self, block: u64, value: u64) -> Result<(), DigestError> {
        if block >= self.leaves.len() as u64 {
            return Err(DigestError::BadRange {
                offset: block.saturating_mul(self.block_size as u64),
                length: self.block_size as u64,
            });
        }
        self.set(block, value);
        Ok(())
    }

    /// Sets the leaves of `length` bytes of zeros at block-aligned `offset`.
    pub fn set_zero(&mut self, offset: u64, length: u64) -> Result<(), DigestError> {
        let first = self.check(offset, length)?;
        for b in first..first + length.div_ceil(self.block_size as u64) {
            self.set(b, 0);
        }
        Ok(())
    }

    fn check(&self, offset: u64, length: u64) -> Result<u64, DigestError> {
        let bs = self.block_size as u64;
        let end = offset.checked_add(length);
        let whole = end.is_some_and(|e| e.is_multiple_of(bs) || e == self.disk_size);
        if !offset.is_multiple_of(bs) || !whole || end.is_none_or(|e| e > self.disk_size) {
            return Err(DigestError::BadRange { offset, length });
        }
        Ok(offset / bs)
    }

    fn set(&mut self, block: u64, value: u64) {
        let slot = &mut self.leaves[block as usize];
        if *slot != value {
            *slot = value;
            // Tracked only for an in-place save (a file to update): a fresh map is written
            // whole, and this list must not grow to the size of the disk for nothing.
            if self.base.is_some() {
                self.changed.push(block);
            }
        }
    }

    /// The digest of the image these leaves describe.
    pub fn digest(&self) -> ImageDigest {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(&self.disk_size.to_le_bytes());
        h.update(&self.block_size.to_le_bytes());
        // In pieces: no second copy of the leaves.
        let mut piece = Vec::with_capacity(64 * 1024);
        for chunk in self.leaves.chunks(8 * 1024) {
            piece.clear();
            for l in chunk {
                piece.extend_from_slice(&l.to_le_bytes());
            }
            h.update(&piece);
        }
        ImageDigest(*h.finalize().as_bytes())
    }

    /// The block numbers whose leaves differ from `other`'s (same geometry), for reports.
    pub fn differing(&self, other: &Leaves) -> Vec<u64> {
        self.leaves
            .iter()
            .zip(&other.leaves)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u64)
            .collect()
    }
}

/// The leaves of the last committed point, in a file of their own.
///
/// Layout: a 64-byte header (magic, version, clean flag, block size, disk size, the point's
/// ChangeId, a CRC32 of the header), then one little-endian `u64` per block.
pub struct LeafFile;

impl LeafFile {
    /// The leaves as of point `at`: the file's, if it holds exactly those (clean, of that
    /// point, whole), or the file's plus the pending changes of a push to `at` (see
    /// [`LeafFile::save_pending`]) if the file holds the point that push started from.
    /// `Ok(None)` if neither: missing, dirty, damaged, or of another point.
    pub fn load(path: &Path, at: ChangeId) -> Result<Option<Leaves>, DigestError> {
        Self::load_in(&RealFs, path, at)
    }

    /// [`LeafFile::load`] through `fs`.
    pub fn load_in(fs: &dyn Vfs, path: &Path, at: ChangeId) -> Result<Option<Leaves>, DigestError> {
        if let Some(leaves) = Self::load_exact(fs, path, at)? {
            return Ok(Some(leaves));
        }
        let Some((base, to, changes)) = read_pending(fs, &pending_path(path, at))? else {
            return Ok(None);
        };
        if to != at {
            return Ok(None);
        }
        // The file holds the point the push started from, or it is part way through being
        // saved as `at` (a kill during `save`): a dirty save only ever writes the leaves the
        // pending changes name, so either way those changes on top give the leaves of `at`.
        let Some(mut leaves) = (match Self::load_exact(fs, path, base)? {
            Some(l) => Some(l),
            None => Self::load_header_is(fs, path, at, true)?,
        }) else {
            return Ok(None);
        };
        for (block, value) in changes {
            if block >= leaves.leaves.len() as u64 {
                return Ok(None);
            }
            leaves.set(block, value);
        }
        Ok(Some(leaves))
    }

    /// Records, beside the leaf file and durably, the leaves a push to `to` makes current
    /// if the receiver commits it: the changed leaves of an increment (small), or the whole
    /// file for a full (nothing older is needed once a full is sent). Called before the
    /// push, so an agent killed after the receiver's commit but before its own `save` still
    /// knows the leaves of the receiver's newest point next time.
    pub fn save_pending(path: &Path, leaves: &Leaves, to: ChangeId) -> Result<(), DigestError> {
        Self::save_pending_in(&RealFs, path, leaves, to)
    }

    /// [`LeafFile::save_pending`] through `fs`.
    pub fn save_pending_in(
        fs: &dyn Vfs,
        path: &Path,
        leaves: &Leaves,
        to: ChangeId,
    ) -> Result<(), DigestError> {
        let Some(base) = leaves.base else {
            let mut whole = leaves.clone();
            return Self::save_in(fs, path, &mut whole, to);
        };
        let mut changes: Vec<(u64, u64)> = leaves
            .changed
            .iter()
            .map(|&b| (b, leaves.leaves[b as usize]))
            .collect();
        changes.sort_unstable();
        changes.dedup_by_key(|c| c.0);
        let mut out = Vec::with_capacity(PENDING_HEAD + changes.len() * 16 + 4);
        out.extend_from_slice(&PENDING_MAGIC);
        for id in [base, to] {
            out.extend_from_slice(&id.generation.0.to_le_bytes());
            out.extend_from_slice(&id.seq.to_le_bytes());
        }
        out.extend_from_slice(&(changes.len() as u64).to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        let body = out.len();
        for (b, v) in &changes {
            out.extend_from_slice(&b.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32fast::hash(&out[body..]);
        out.extend_from_slice(&crc.to_le_bytes());
        let pending = pending_path(path, to);
        let tmp = pending.with_extension("pending-tmp");
        let f = fs.create(&tmp)?;
        f.write_all_at(&out, 0)?;
        f.sync()?;
        fs.rename(&tmp, &pending)?;
        fs.sync_dir(parent_dir(path))?;
        Ok(())
    }

    /// The file's leaves if its header says `at`, and clean (or dirty, when `dirty_ok`).
    fn load_exact(fs: &dyn Vfs, path: &Path, at: ChangeId) -> Result<Option<Leaves>, DigestError> {
        Self::load_header_is(fs, path, at, false)
    }

    fn load_header_is(
        fs: &dyn Vfs,
        path: &Path,
        at: ChangeId,
        dirty_ok: bool,
    ) -> Result<Option<Leaves>, DigestError> {
        let file = match fs.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut h = [0u8; HEADER as usize];
        if file.read_exact_at(&mut h, 0).is_err() {
            return Ok(None);
        }
        let Some((clean, block_size, disk_size, id)) = parse_header(&h) else {
            return Ok(None);
        };
        if !(clean || dirty_ok) || id != at {
            return Ok(None);
        }
        let Ok(blocks) = block_count(disk_size, block_size) else {
            return Ok(None);
        };
        // The length is checked before the leaves are allocated.
        if file.len()? != HEADER + blocks * 8 {
            return Ok(None);
        }
        let mut bytes = vec![0u8; blocks as usize * 8];
        file.read_exact_at(&mut bytes, HEADER)?;
        Ok(Some(Leaves {
            disk_size,
            block_size,
            leaves: bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
                .collect(),
            base: Some(at),
            changed: Vec::new(),
        }))
    }

    /// Makes `leaves` the file's content as of point `at`, durably. Writes only the changed
    /// leaves when the file still holds the point they were loaded as (dirty header first,
    /// so a crash in between leaves a file that `load` refuses); the whole file otherwise.
    pub fn save(path: &Path, leaves: &mut Leaves, at: ChangeId) -> Result<(), DigestError> {
        Self::save_in(&RealFs, path, leaves, at)
    }

    /// [`LeafFile::save`] through `fs`.
    pub fn save_in(
        fs: &dyn Vfs,
        path: &Path,
        leaves: &mut Leaves,
        at: ChangeId,
    ) -> Result<(), DigestError> {
        let in_place = match leaves.base {
            Some(base) => Self::header_of(fs, path)?.is_some_and(|(clean, bs, size, id)| {
                clean && bs == leaves.block_size && size == leaves.disk_size && id == base
            }),
            None => false,
        };
        if in_place {
            let file = fs.open_rw(path)?;
            file.write_all_at(&header(false, leaves, at), 0)?;
            file.sync()?;
            leaves.changed.sort_unstable();
            leaves.changed.dedup();
            let mut run: Vec<u8> = Vec::new();
            let mut i = 0;
            while i < leaves.changed.len() {
                let start = leaves.changed[i];
                run.clear();
                while i < leaves.changed.len()
                    && leaves.changed[i] == start + (run.len() / 8) as u64
                {
                    run.extend_from_slice(&leaves.leaves[leaves.changed[i] as usize].to_le_bytes());
                    i += 1;
                }
                file.write_all_at(&run, HEADER + start * 8)?;
            }
            file.sync()?;
            file.write_all_at(&header(true, leaves, at), 0)?;
            file.sync()?;
        } else {
            let tmp = path.with_extension("tmp");
            let mut w = io::BufWriter::new(Cursor::new(fs.create(&tmp)?));
            w.write_all(&header(true, leaves, at))?;
            for l in &leaves.leaves {
                w.write_all(&l.to_le_bytes())?;
            }
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.file.sync()?;
            fs.rename(&tmp, path)?;
            fs.sync_dir(parent_dir(path))?;
        }
        leaves.base = Some(at);
        leaves.changed.clear();
        // Pending changes are now in the file, or of pushes that were not committed.
        remove_pendings(fs, path);
        Ok(())
    }

    fn header_of(
        fs: &dyn Vfs,
        path: &Path,
    ) -> Result<Option<(bool, u32, u64, ChangeId)>, DigestError> {
        let file = match fs.open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut h = [0u8; HEADER as usize];
        Ok(match file.read_exact_at(&mut h, 0) {
            Ok(()) => parse_header(&h),
            Err(_) => None,
        })
    }
}

const PENDING_MAGIC: [u8; 8] = *b"CTKLPEND";
/// magic, base and to (u128 + u64 each), count u64, CRC32.
const PENDING_HEAD: usize = 8 + 2 * 24 + 8 + 4;

/// One file per push: a push can be overtaken (killed after sending all, its merge still
/// running when the next run asks for the newest point), and the next run's pending
/// changes must not replace the ones of the push the receiver is about to commit.
fn pending_path(path: &Path, to: ChangeId) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".pending-{:032x}-{}", to.generation.0, to.seq));
    p.into()
}

/// The directory a file is in (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

fn remove_pendings(fs: &dyn Vfs, path: &Path) {
    let Some(name) = path.file_name() else {
        return;
    };
    let mut prefix = name.to_owned();
    prefix.push(".pending-");
    let prefix = prefix.to_string_lossy().into_owned();
    let dir = parent_dir(path);
    let Ok(names) = fs.list(dir) else {
        return;
    };
    for n in names {
        if n.starts_with(&prefix) {
            let _ = fs.remove_file(&dir.join(n));
        }
    }
}

/// The pending changes of a push: (from, to, (block, leaf) pairs), if the file is whole.
#[allow(clippy::type_complexity)]
fn read_pending(
    fs: &dyn Vfs,
    path: &Path,
) -> Result<Option<(ChangeId, ChangeId, Vec<(u64, u64)>)>, DigestError> {
    let file = match fs.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut head = [0u8; PENDING_HEAD];
    if file.read_exact_at(&mut head, 0).is_err()
        || head[..8] != PENDING_MAGIC
        || crc32fast::hash(&head[..PENDING_HEAD - 4]).to_le_bytes() != head[PENDING_HEAD - 4..]
    {
        return Ok(None);
    }
    let id = |at: usize| {
        ChangeId::new(
            Generation(u128::from_le_bytes(
                head[at..at + 16].try_into().expect("16"),
            )),
            u64::from_le_bytes(head[at + 16..at + 24].try_into().expect("8")),
        )
    };
    let (base, to) = (id(8), id(32));
    let count = u64::from_le_bytes(head[56..64].try_into().expect("8"));
    // The count is checked against the file's length before anything is allocated.
    if count > LEAVES_MAX || file.len()? != PENDING_HEAD as u64 + count * 16 + 4 {
        return Ok(None);
    }
    let mut body = vec![0u8; count as usize * 16 + 4];
    file.read_exact_at(&mut body, PENDING_HEAD as u64)?;
    let (pairs, crc) = body.split_at(body.len() - 4);
    if crc32fast::hash(pairs).to_le_bytes() != crc {
        return Ok(None);
    }
    let changes = pairs
        .chunks_exact(16)
        .map(|c| {
            (
                u64::from_le_bytes(c[..8].try_into().expect("8")),
                u64::from_le_bytes(c[8..].try_into().expect("8")),
            )
        })
        .collect();
    Ok(Some((base, to, changes)))
}

fn header(clean: bool, leaves: &Leaves, at: ChangeId) -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&1u16.to_le_bytes());
    h[10..12].copy_from_slice(&u16::from(clean).to_le_bytes());
    h[12..16].copy_from_slice(&leaves.block_size.to_le_bytes());
    h[16..24].copy_from_slice(&leaves.disk_size.to_le_bytes());
    h[24..40].copy_from_slice(&at.generation.0.to_le_bytes());
    h[40..48].copy_from_slice(&at.seq.to_le_bytes());
    let crc = crc32fast::hash(&h[..60]);
    h[60..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn parse_header(h: &[u8; HEADER as usize]) -> Option<(bool, u32, u64, ChangeId)> {
    if h[..8] != MAGIC
        || crc32fast::hash(&h[..60]).to_le_bytes() != h[60..]
        || u16::from_le_bytes([h[8], h[9]]) != 1
    {
        return None;
    }
    let clean = u16::from_le_bytes([h[10], h[11]]) == 1;
    let block_size = u32::from_le_bytes(h[12..16].try_into().ok()?);
    let disk_size = u64::from_le_bytes(h[16..24].try_into().ok()?);
    let generation = Generation(u128::from_le_bytes(h[24..40].try_into().ok()?));
    let seq = u64::from_le_bytes(h[40..48].try_into().ok()?);
    Some((clean, block_size, disk_size, ChangeId::new(generation, seq)))
}

#[cfg(test)]
mod tests;
