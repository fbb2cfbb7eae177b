//! The delta format: the blocks changed between two cuts, as one self-describing stream.
//!
//! The same bytes are a file (`export`) and what crosses the network. Layout (docs/format.md):
//! a header (disk identity, size, block size, from and to ChangeId) under a CRC32; extent
//! records, each with a CRC32 of its own head and a CRC32 of its decoded bytes, in ascending
//! non-overlapping order; a trailer with counts, byte totals and a CRC32 over every record
//! byte. The writer and the reader stream: neither ever holds more than one record, and the
//! reader never allocates more than [`DELTA_RECORD_DATA_MAX`] twice, whatever it is fed.

mod file;
mod reader;
mod writer;

pub use file::{DeltaFile, IndexedRecord};
pub use reader::{DeltaReader, DeltaRecord};
pub use writer::{Checkpoint, DeltaWriter};

use crate::vfs::FileAt;
use std::io::{self, Read, Write};

use crate::geometry::{Extent, Geometry};
use crate::id::{ChangeId, Generation};
use crate::limits::{DELTA_RECORD_DATA_MAX, DISK_ID_LEN_MAX};

const MAGIC: [u8; 8] = *b"CTKDELTA";
/// Delta format version.
pub const DELTA_VERSION: u16 = 1;
const TAG_RAW: u8 = 1;
const TAG_ZSTD: u8 = 2;
const TAG_ZERO: u8 = 3;
const TAG_END: u8 = 0xEE;
/// tag u8, offset u64, length u64, encoded length u32, data CRC u32, head CRC u32.
const RECORD_HEAD: usize = 1 + 8 + 8 + 4 + 4 + 4;
/// tag u8, records u64, data bytes u64, zero bytes u64, encoded bytes u64, digest u32, CRC u32.
const TRAILER: usize = 1 + 8 * 4 + 4 + 4;
/// A zstd frame of one record needs no window larger than the record.
const ZSTD_WINDOW_LOG_MAX: u32 = 21;
const _: () = assert!(1 << ZSTD_WINDOW_LOG_MAX >= DELTA_RECORD_DATA_MAX);

/// What a delta is a delta of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaHeader {
    pub disk_id: String,
    /// Size of the disk at the `to` cut; applying a delta sets the target to this size.
    pub disk_size: u64,
    pub block_size: u32,
    /// `None` for a full (every block that may hold data).
    pub from: Option<ChangeId>,
    pub to: ChangeId,
}

/// Totals of a delta, as written in its trailer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeltaSummary {
    pub records: u64,
    /// Decoded bytes carried as data (raw or zstd).
    pub data_bytes: u64,
    /// Bytes described as zeros (nothing carried).
    pub zero_bytes: u64,
    /// Payload bytes on the wire.
    pub encoded_bytes: u64,
    /// The whole stream, header to trailer.
    pub stream_bytes: u64,
}

/// Why a delta was refused. Every variant names where in the stream it went wrong.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("delta is truncated at byte {at}")]
    Truncated { at: u64 },
    #[error("not a ctk delta (bad magic)")]
    BadMagic,
    #[error("delta format version {0} is not supported (this build reads version {DELTA_VERSION})")]
    UnsupportedVersion(u16),
    #[error("delta header is corrupt (checksum mismatch)")]
    HeaderCorrupt,
    #[error("delta header is invalid: {0}")]
    HeaderInvalid(String),
    #[error("record at byte {at} is corrupt (head checksum mismatch)")]
    RecordCorrupt { at: u64 },
    #[error("record at byte {at} is invalid: {why}")]
    RecordInvalid { at: u64, why: &'static str },
    #[error("data of the record at byte {at} (disk offset {offset}) is corrupt: {why}")]
    DataCorrupt {
        at: u64,
        offset: u64,
        why: &'static str,
    },
    #[error("delta trailer does not match the records: {0}")]
    TrailerMismatch(&'static str),
    #[error("bytes follow the delta trailer")]
    TrailingBytes,
    /// The writer was handed something that cannot go into a delta.
    #[error("cannot write extent at {offset} (+{length}): {why}")]
    BadExtent {
        offset: u64,
        length: u64,
        why: &'static str,
    },
    /// The delta is of another disk than the one it is applied to.
    #[error("delta does not fit the target: {0}")]
    Mismatch(String),
}

/// Writer settings.
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    /// zstd level (1..=19 sensible); `None` stores data raw.
    pub zstd_level: Option<i32>,
}

impl Default for WriteOptions {
    fn default() -> WriteOptions {
        WriteOptions {
            zstd_level: Some(1),
        }
    }
}

/// The one definition of a valid extent, shared by writer and reader so they cannot
/// disagree: non-empty, inside the disk, whole blocks (but for a partial last block), and
/// after the previous extent.
fn check_range(
    geometry: &Geometry,
    next_offset: u64,
    offset: u64,
    length: u64,
) -> Result<(), &'static str> {
    let bs = geometry.block_size() as u64;
    let size = geometry.disk_size();
    let end = offset.checked_add(length).ok_or("range overflows")?;
    if length == 0 || end > size {
        return Err("range is empty or past the end of the disk");
    }
    if !offset.is_multiple_of(bs) || (!length.is_multiple_of(bs) && end != size) {
        return Err("range is not aligned to whole blocks");
    }
    if offset < next_offset {
        return Err("extents are not ascending and disjoint");
    }
    Ok(())
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes);
}

/// Whether `bytes` are all zeros. Zero detection runs over every block the agent exports
/// and every leaf either side hashes, so it must not be a byte-at-a-time loop: 256-byte
/// chunks are ORed as words, which the compiler turns into
/// vector instructions, and checked one chunk at a time so data exits at its first chunk.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(256);
    for chunk in &mut chunks {
        let mut acc = 0u64;
        for word in chunk.chunks_exact(8) {
            acc |= u64::from_ne_bytes(word.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// The trailer for records totalling `s` whose heads and payloads have CRC32 `digest`.
fn trailer_bytes(s: &DeltaSummary, digest: u32) -> Vec<u8> {
    let mut t = Vec::with_capacity(TRAILER);
    t.push(TAG_END);
    for v in [s.records, s.data_bytes, s.zero_bytes, s.encoded_bytes] {
        put(&mut t, &v.to_le_bytes());
    }
    put(&mut t, &digest.to_le_bytes());
    let crc = crc32fast::hash(&t);
    put(&mut t, &crc.to_le_bytes());
    t
}

/// Checks a trailer's own CRC and its counts and byte totals against `totals`; returns the
/// record digest it carries.
fn check_trailer(t: &[u8; TRAILER], totals: &DeltaSummary) -> Result<u32, DeltaError> {
    if crc32fast::hash(&t[..TRAILER - 4]).to_le_bytes() != t[TRAILER - 4..] {
        return Err(DeltaError::TrailerMismatch("trailer checksum mismatch"));
    }
    let field = |i: usize| u64::from_le_bytes(t[1 + 8 * i..9 + 8 * i].try_into().expect("8"));
    if [field(0), field(1), field(2), field(3)]
        != [
            totals.records,
            totals.data_bytes,
            totals.zero_bytes,
            totals.encoded_bytes,
        ]
    {
        return Err(DeltaError::TrailerMismatch("counts or byte totals differ"));
    }
    Ok(u32::from_le_bytes(t[33..37].try_into().expect("4")))
}

/// A record head, checked: its own CRC, and a range and payload size that fit the disk and
/// follow the previous record. The one definition the streaming reader and the index share.
struct Head {
    offset: u64,
    length: u64,
    encoded_len: usize,
    data_crc: u32,
}

fn parse_head(
    head: &[u8; RECORD_HEAD],
    at: u64,
    geometry: &Geometry,
    next_offset: u64,
) -> Result<Head, DeltaError> {
    if crc32fast::hash(&head[..RECORD_HEAD - 4]).to_le_bytes() != head[RECORD_HEAD - 4..] {
        return Err(DeltaError::RecordCorrupt { at });
    }
    let offset = u64::from_le_bytes(head[1..9].try_into().expect("8"));
    let length = u64::from_le_bytes(head[9..17].try_into().expect("8"));
    let encoded_len = u32::from_le_bytes(head[17..21].try_into().expect("4")) as usize;
    let data_crc = u32::from_le_bytes(head[21..25].try_into().expect("4"));
    let invalid = |why| Err(DeltaError::RecordInvalid { at, why });
    if let Err(why) = check_range(geometry, next_offset, offset, length) {
        return invalid(why);
    }
    match head[0] {
        TAG_ZERO if encoded_len == 0 && data_crc == 0 => {}
        TAG_ZERO => return invalid("zero record carries data"),
        TAG_RAW if encoded_len as u64 == length && length <= DELTA_RECORD_DATA_MAX as u64 => {}
        TAG_ZSTD
            if encoded_len > 0
                && (encoded_len as u64) < length
                && length <= DELTA_RECORD_DATA_MAX as u64 => {}
        TAG_RAW | TAG_ZSTD => return invalid("payload size does not fit the record length"),
        _ => return invalid("unknown record type"),
    }
    Ok(Head {
        offset,
        length,
        encoded_len,
        data_crc,
    })
}

fn read_exact<R: Read>(
    input: &mut R,
    buf: &mut [u8],
    position: &mut u64,
) -> Result<(), DeltaError> {
    match input.read_exact(buf) {
        Ok(()) => {
            *position += buf.len() as u64;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(DeltaError::Truncated { at: *position })
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads a delta to its end without applying it: every check the apply would make.
pub fn verify<R: Read>(input: R) -> Result<(DeltaHeader, DeltaSummary), DeltaError> {
    let mut reader = DeltaReader::new(input)?;
    while reader.next_record()?.is_some() {}
    Ok((reader.header().clone(), reader.summary()))
}

/// Writes the delta of `extents` of `image` (read at the cut) into `out`.
pub fn export<W: Write, F: FileAt + ?Sized>(
    image: &F,
    extents: &[Extent],
    header: &DeltaHeader,
    options: WriteOptions,
    out: W,
) -> Result<(W, DeltaSummary), DeltaError> {
    export_with(
        |offset, buf| image.read_exact_at(buf, offset),
        extents,
        header,
        options,
        out,
    )
}

/// Writes the delta of `extents` into `out`, reading the data with `read_at(offset, buf)` as
/// [`DeltaWriter::write_read`] does.
pub fn export_with<W: Write>(
    mut read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    extents: impl IntoIterator<Item = impl std::borrow::Borrow<Extent>>,
    header: &DeltaHeader,
    options: WriteOptions,
    out: W,
) -> Result<(W, DeltaSummary), DeltaError> {
    let mut writer = DeltaWriter::new(out, header, options)?;
    let mut buf = Vec::new();
    for extent in extents {
        writer.write_read(*extent.borrow(), &mut buf, &mut read_at)?;
    }
    writer.finish()
}

/// Applies a delta to `target`, checking each record before writing it and the trailer at
/// the end, then sets the target to the delta's disk size. On error the target may be
/// partly updated: apply to a staged copy, or verify first, when that matters.
pub fn apply<R: Read, F: FileAt + ?Sized>(
    input: R,
    target: &F,
    expect_disk_id: Option<&str>,
) -> Result<DeltaSummary, DeltaError> {
    let mut reader = DeltaReader::new(input)?;
    if let Some(id) = expect_disk_id
        && reader.header().disk_id != id
    {
        return Err(DeltaError::Mismatch(format!(
            "delta is of disk {:?}, not {id:?}",
            reader.header().disk_id
        )));
    }
    let disk_size = reader.header().disk_size;
    if target.len()? < disk_size {
        target.set_len(disk_size)?;
    }
    let zeros = vec![0u8; DELTA_RECORD_DATA_MAX];
    while let Some(record) = reader.next_record()? {
        match record {
            DeltaRecord::Data { offset, data } => target.write_all_at(data, offset)?,
            DeltaRecord::Zero { offset, length } => {
                let mut pos = offset;
                while pos < offset + length {
                    let n = (offset + length - pos).min(zeros.len() as u64) as usize;
                    target.write_all_at(&zeros[..n], pos)?;
                    pos += n as u64;
                }
            }
        }
    }
    target.set_len(disk_size)?;
    Ok(reader.summary())
}
