//! The delta format: the blocks changed between two cuts, as one self-describing stream.
//!
//! The same bytes are a file (`export`) and what crosses the network. Layout (docs/format.md):
//! a header (disk identity, size, block size, from and to ChangeId) under a CRC32; extent
//! records, each with a CRC32 of its own head and a CRC32 of its decoded bytes, in ascending
//! non-overlapping order; a trailer with counts, byte totals and a CRC32 over every record
//! byte. The writer and the reader stream: neither ever holds more than one record, and the
//! reader never allocates more than [`DELTA_RECORD_DATA_MAX`] twice, whatever it is fed.

use crate::vfs::FileAt;
use std::fs::File;
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

/// Streams a delta into `W`.
pub struct DeltaWriter<W: Write> {
    out: W,
    geometry: Geometry,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    digest: crc32fast::Hasher,
    summary: DeltaSummary,
    next_offset: u64,
    head: Vec<u8>,
    encoded: Vec<u8>,
}

impl<W: Write> DeltaWriter<W> {
    pub fn new(
        mut out: W,
        header: &DeltaHeader,
        options: WriteOptions,
    ) -> Result<Self, DeltaError> {
        let geometry = Geometry::new(header.disk_size, header.block_size as u64)
            .map_err(|e| DeltaError::HeaderInvalid(e.to_string()))?;
        if header.disk_id.is_empty() || header.disk_id.len() > DISK_ID_LEN_MAX {
            return Err(DeltaError::HeaderInvalid(format!(
                "disk id must be 1 to {DISK_ID_LEN_MAX} bytes"
            )));
        }
        let mut bytes = Vec::with_capacity(128);
        put(&mut bytes, &MAGIC);
        put(&mut bytes, &DELTA_VERSION.to_le_bytes());
        put(&mut bytes, &(header.from.is_some() as u16).to_le_bytes());
        put(&mut bytes, &(header.disk_id.len() as u16).to_le_bytes());
        put(&mut bytes, header.disk_id.as_bytes());
        put(&mut bytes, &header.disk_size.to_le_bytes());
        put(&mut bytes, &header.block_size.to_le_bytes());
        let from = header.from.unwrap_or(ChangeId::new(Generation(0), 0));
        for id in [from, header.to] {
            put(&mut bytes, &id.generation.0.to_le_bytes());
            put(&mut bytes, &id.seq.to_le_bytes());
        }
        let crc = crc32fast::hash(&bytes);
        put(&mut bytes, &crc.to_le_bytes());
        out.write_all(&bytes)?;
        let compressor = match options.zstd_level {
            Some(level) => Some(zstd::bulk::Compressor::new(level)?),
            None => None,
        };
        Ok(DeltaWriter {
            out,
            geometry,
            compressor,
            digest: crc32fast::Hasher::new(),
            summary: DeltaSummary {
                stream_bytes: bytes.len() as u64,
                ..DeltaSummary::default()
            },
            next_offset: 0,
            head: Vec::with_capacity(RECORD_HEAD),
            encoded: Vec::with_capacity(DELTA_RECORD_DATA_MAX),
        })
    }

    fn check_extent(&self, offset: u64, length: u64) -> Result<(), DeltaError> {
        check_range(&self.geometry, self.next_offset, offset, length).map_err(|why| {
            DeltaError::BadExtent {
                offset,
                length,
                why,
            }
        })
    }

    fn emit(
        &mut self,
        tag: u8,
        offset: u64,
        length: u64,
        data_crc: u32,
        payload: &[u8],
    ) -> Result<(), DeltaError> {
        self.head.clear();
        self.head.push(tag);
        put(&mut self.head, &offset.to_le_bytes());
        put(&mut self.head, &length.to_le_bytes());
        put(&mut self.head, &(payload.len() as u32).to_le_bytes());
        put(&mut self.head, &data_crc.to_le_bytes());
        let head_crc = crc32fast::hash(&self.head);
        put(&mut self.head, &head_crc.to_le_bytes());
        self.out.write_all(&self.head)?;
        self.out.write_all(payload)?;
        self.digest.update(&self.head);
        self.digest.update(payload);
        self.summary.records += 1;
        self.summary.encoded_bytes += payload.len() as u64;
        self.summary.stream_bytes += (self.head.len() + payload.len()) as u64;
        self.next_offset = offset + length;
        Ok(())
    }

    /// Adds a range known to read as zeros (a trim, a write-zeroes), carrying no data.
    pub fn write_zero(&mut self, offset: u64, length: u64) -> Result<(), DeltaError> {
        self.check_extent(offset, length)?;
        self.emit(TAG_ZERO, offset, length, 0, &[])?;
        self.summary.zero_bytes += length;
        Ok(())
    }

    /// Adds the contents of `[offset, offset + data.len())`. Runs of all-zero blocks become
    /// zero records; data is compressed when that makes it smaller.
    pub fn write_extent(&mut self, offset: u64, data: &[u8]) -> Result<(), DeltaError> {
        self.check_extent(offset, data.len() as u64)?;
        let bs = self.geometry.block_size() as usize;
        let block_zero = |at: usize| is_zero(&data[at..(at + bs).min(data.len())]);
        let mut pos = 0usize;
        // The class of the block at `pos`, when the previous run already scanned it.
        let mut known: Option<bool> = None;
        while pos < data.len() {
            let zero = known.take().unwrap_or_else(|| block_zero(pos));
            // Extend a run of blocks that are all zero or all not, up to one record's worth.
            let mut end = (pos + bs).min(data.len());
            while end < data.len() && end - pos < DELTA_RECORD_DATA_MAX {
                let next = block_zero(end);
                if next != zero {
                    known = Some(next);
                    break;
                }
                end = (end + bs).min(data.len());
            }
            let at = offset + pos as u64;
            if zero {
                self.emit(TAG_ZERO, at, (end - pos) as u64, 0, &[])?;
                self.summary.zero_bytes += (end - pos) as u64;
            } else {
                self.write_data(at, &data[pos..end])?;
            }
            pos = end;
        }
        Ok(())
    }

    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<(), DeltaError> {
        let crc = crc32fast::hash(data);
        self.summary.data_bytes += data.len() as u64;
        let mut encoded = std::mem::take(&mut self.encoded);
        encoded.clear();
        // zstd writes into the spare capacity (no zero-fill); the data is stored compressed
        // only if that made it smaller.
        let compressed = match self.compressor.as_mut() {
            Some(c) => {
                encoded.reserve(data.len());
                matches!(c.compress_to_buffer(data, &mut encoded), Ok(n) if n < data.len())
            }
            None => false,
        };
        let result = if compressed {
            self.emit(TAG_ZSTD, offset, data.len() as u64, crc, &encoded)
        } else {
            self.emit(TAG_RAW, offset, data.len() as u64, crc, data)
        };
        self.encoded = encoded;
        result
    }

    /// Adds `extent`, its contents read with `read_at(offset, buf)` into `buf` in pieces of at
    /// most [`DELTA_RECORD_DATA_MAX`] bytes that never cross the extent's end (a
    /// point-in-time reader can serve each piece from the live image or from preserved
    /// copies). `buf` is grown to one piece once and reused.
    pub fn write_read(
        &mut self,
        extent: Extent,
        buf: &mut Vec<u8>,
        mut read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<(), DeltaError> {
        buf.resize(DELTA_RECORD_DATA_MAX, 0);
        let mut pos = extent.offset;
        while pos < extent.end() {
            let n = (extent.end() - pos).min(DELTA_RECORD_DATA_MAX as u64) as usize;
            read_at(pos, &mut buf[..n])?;
            self.write_extent(pos, &buf[..n])?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Writes the trailer and returns the sink and the totals.
    pub fn finish(mut self) -> Result<(W, DeltaSummary), DeltaError> {
        let t = trailer_bytes(&self.summary, self.digest.clone().finalize());
        self.out.write_all(&t)?;
        self.out.flush()?;
        self.summary.stream_bytes += t.len() as u64;
        Ok((self.out, self.summary))
    }
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

/// Where a reader stood after a complete, validated record: enough to cut the stream there
/// and end it with a valid trailer (what was received of a push that was cut off).
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Stream bytes up to the end of the last complete record.
    pub position: u64,
    /// The disk offset the records so far reach: every record of the delta below it has
    /// been read (records are ascending and disjoint).
    pub next_offset: u64,
    pub summary: DeltaSummary,
    digest: crc32fast::Hasher,
}

impl Checkpoint {
    /// The trailer that makes the first `position` bytes of the stream a complete delta.
    pub fn trailer(&self) -> Vec<u8> {
        trailer_bytes(&self.summary, self.digest.clone().finalize())
    }
}

/// One extent read from a delta.
#[derive(Debug, PartialEq, Eq)]
pub enum DeltaRecord<'a> {
    /// These bytes at this disk offset.
    Data { offset: u64, data: &'a [u8] },
    /// This range reads as zeros.
    Zero { offset: u64, length: u64 },
}

/// Streams a delta out of `R`, validating everything before handing it out.
pub struct DeltaReader<R: Read> {
    input: R,
    header: DeltaHeader,
    geometry: Geometry,
    position: u64,
    digest: crc32fast::Hasher,
    summary: DeltaSummary,
    next_offset: u64,
    encoded: Vec<u8>,
    decoded: Vec<u8>,
    decompressor: zstd::bulk::Decompressor<'static>,
    finished: bool,
}

impl<R: Read> DeltaReader<R> {
    /// Reads and validates the header.
    pub fn new(mut input: R) -> Result<Self, DeltaError> {
        let mut position = 0u64;
        let mut raw = Vec::with_capacity(128);
        let mut fixed = [0u8; 8 + 2 + 2 + 2];
        read_exact(&mut input, &mut fixed, &mut position)?;
        raw.extend_from_slice(&fixed);
        if fixed[0..8] != MAGIC {
            return Err(DeltaError::BadMagic);
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        let flags = u16::from_le_bytes([fixed[10], fixed[11]]);
        let id_len = u16::from_le_bytes([fixed[12], fixed[13]]) as usize;
        // The length is checked before the CRC can be, so it is bounded before it is used.
        if id_len == 0 || id_len > DISK_ID_LEN_MAX {
            return Err(DeltaError::HeaderInvalid(format!(
                "disk id length {id_len} is out of range"
            )));
        }
        let mut rest = vec![0u8; id_len + 8 + 4 + 2 * (16 + 8) + 4];
        read_exact(&mut input, &mut rest, &mut position)?;
        raw.extend_from_slice(&rest);
        let (body, crc) = raw.split_at(raw.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(DeltaError::HeaderCorrupt);
        }
        if version != DELTA_VERSION {
            return Err(DeltaError::UnsupportedVersion(version));
        }
        if flags > 1 {
            return Err(DeltaError::HeaderInvalid(format!(
                "unknown flags {flags:#x}"
            )));
        }
        let disk_id = String::from_utf8(rest[..id_len].to_vec())
            .map_err(|_| DeltaError::HeaderInvalid("disk id is not UTF-8".into()))?;
        let mut r = &rest[id_len..];
        let mut take = |n: usize| {
            let (a, b) = r.split_at(n);
            r = b;
            a
        };
        let disk_size = u64::from_le_bytes(take(8).try_into().expect("8"));
        let block_size = u32::from_le_bytes(take(4).try_into().expect("4"));
        let mut ids = [ChangeId::new(Generation(0), 0); 2];
        for id in &mut ids {
            let g = u128::from_le_bytes(take(16).try_into().expect("16"));
            let s = u64::from_le_bytes(take(8).try_into().expect("8"));
            *id = ChangeId::new(Generation(g), s);
        }
        let geometry = Geometry::new(disk_size, block_size as u64)
            .map_err(|e| DeltaError::HeaderInvalid(e.to_string()))?;
        let from = (flags & 1 == 1).then_some(ids[0]);
        // Within a generation a delta goes forward. Across generations (a resync: the
        // receiver's point is of a journal the agent no longer has) there is no order to
        // check; the receiver's own check that `from` is its newest point is what counts.
        if let Some(from) = from
            && from.generation == ids[1].generation
            && from.seq > ids[1].seq
        {
            return Err(DeltaError::HeaderInvalid(format!(
                "from {from} does not precede to {}",
                ids[1]
            )));
        }
        let mut decompressor = zstd::bulk::Decompressor::new()?;
        decompressor.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
            ZSTD_WINDOW_LOG_MAX,
        ))?;
        Ok(DeltaReader {
            input,
            header: DeltaHeader {
                disk_id,
                disk_size,
                block_size,
                from,
                to: ids[1],
            },
            geometry,
            position,
            digest: crc32fast::Hasher::new(),
            summary: DeltaSummary {
                stream_bytes: position,
                ..DeltaSummary::default()
            },
            next_offset: 0,
            encoded: Vec::new(),
            decoded: Vec::new(),
            decompressor,
            finished: false,
        })
    }

    pub fn header(&self) -> &DeltaHeader {
        &self.header
    }

    /// Totals so far (all of them once `next_record` has returned `None`).
    pub fn summary(&self) -> DeltaSummary {
        self.summary
    }

    /// Where the reader stands: meaningful right after `next_record` returned a record (or
    /// right after `new`: no record yet).
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            position: self.position,
            next_offset: self.next_offset,
            summary: self.summary,
            digest: self.digest.clone(),
        }
    }

    /// The next validated extent, or `None` after a valid trailer and the end of input.
    pub fn next_record(&mut self) -> Result<Option<DeltaRecord<'_>>, DeltaError> {
        if self.finished {
            return Ok(None);
        }
        let at = self.position;
        let mut tag = [0u8; 1];
        read_exact(&mut self.input, &mut tag, &mut self.position)?;
        if tag[0] == TAG_END {
            self.read_trailer()?;
            return Ok(None);
        }
        let mut head = [0u8; RECORD_HEAD];
        head[0] = tag[0];
        read_exact(&mut self.input, &mut head[1..], &mut self.position)?;
        let Head {
            offset,
            length,
            encoded_len,
            data_crc,
        } = parse_head(&head, at, &self.geometry, self.next_offset)?;
        let end = offset + length;
        self.digest.update(&head);
        self.encoded.resize(encoded_len, 0);
        read_exact(&mut self.input, &mut self.encoded, &mut self.position)?;
        self.digest.update(&self.encoded);
        self.summary.records += 1;
        self.summary.encoded_bytes += encoded_len as u64;
        self.summary.stream_bytes = self.position;
        self.next_offset = end;
        let corrupt = |why| Err(DeltaError::DataCorrupt { at, offset, why });
        let data: &[u8] = match tag[0] {
            TAG_ZERO => {
                self.summary.zero_bytes += length;
                return Ok(Some(DeltaRecord::Zero { offset, length }));
            }
            TAG_RAW => &self.encoded,
            _ => {
                self.decoded.resize(length as usize, 0);
                match self
                    .decompressor
                    .decompress_to_buffer(&self.encoded[..], &mut self.decoded[..])
                {
                    Ok(n) if n as u64 == length => {}
                    Ok(_) => return corrupt("decompressed to the wrong length"),
                    Err(_) => return corrupt("zstd data does not decode"),
                }
                &self.decoded
            }
        };
        if crc32fast::hash(data) != data_crc {
            return corrupt("checksum mismatch");
        }
        self.summary.data_bytes += length;
        Ok(Some(DeltaRecord::Data { offset, data }))
    }

    fn read_trailer(&mut self) -> Result<(), DeltaError> {
        let mut t = [0u8; TRAILER];
        t[0] = TAG_END;
        read_exact(&mut self.input, &mut t[1..], &mut self.position)?;
        let digest = check_trailer(&t, &self.summary)?;
        if digest != self.digest.clone().finalize() {
            return Err(DeltaError::TrailerMismatch("record digest differs"));
        }
        let mut more = [0u8; 1];
        loop {
            match self.input.read(&mut more) {
                Ok(0) => break,
                Ok(_) => return Err(DeltaError::TrailingBytes),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        self.summary.stream_bytes = self.position;
        self.finished = true;
        Ok(())
    }
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

/// Reads a `File` by position, so several readers can share one open file.
struct ReadAt<'a, F: FileAt + ?Sized> {
    file: &'a F,
    position: u64,
}

impl<F: FileAt + ?Sized> Read for ReadAt<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.position)?;
        self.position += n as u64;
        Ok(n)
    }
}

/// One record of an indexed delta file: what it covers, and where its payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexedRecord {
    pub offset: u64,
    pub length: u64,
    /// True for a zero record (nothing to read).
    pub zero: bool,
    at: u64,
    tag: u8,
    encoded_len: u32,
    data_crc: u32,
}

impl IndexedRecord {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// A delta file read by position: an index of its records built from their heads alone, so
/// a reader fetches only the records it needs (a restore through a long chain of undo files
/// reads each needed byte once, not every file whole). Every head is checked, the trailer's
/// counts and byte totals are checked against the heads, and each fetched record's data is
/// checked against its CRC; the trailer's digest over all payload bytes is not, since that
/// would mean reading them all (`verify` does).
pub struct DeltaFile<F: FileAt = File> {
    file: F,
    header: DeltaHeader,
    records: Vec<IndexedRecord>,
    encoded: Vec<u8>,
    decoded: Vec<u8>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl<F: FileAt> DeltaFile<F> {
    pub fn open(file: F) -> Result<DeltaFile<F>, DeltaError> {
        let file_len = file.len()?;
        let reader = DeltaReader::new(ReadAt {
            file: &file,
            position: 0,
        })?;
        let header = reader.header.clone();
        let geometry = reader.geometry;
        let mut position = reader.position;
        drop(reader);
        let mut records = Vec::new();
        let mut totals = DeltaSummary::default();
        let mut next_offset = 0;
        loop {
            let at = position;
            let mut input = ReadAt {
                file: &file,
                position,
            };
            let mut tag = [0u8; 1];
            read_exact(&mut input, &mut tag, &mut position)?;
            if tag[0] == TAG_END {
                let mut t = [0u8; TRAILER];
                t[0] = TAG_END;
                read_exact(&mut input, &mut t[1..], &mut position)?;
                check_trailer(&t, &totals)?;
                if position != file_len {
                    return Err(DeltaError::TrailingBytes);
                }
                break;
            }
            let mut head = [0u8; RECORD_HEAD];
            head[0] = tag[0];
            read_exact(&mut input, &mut head[1..], &mut position)?;
            let h = parse_head(&head, at, &geometry, next_offset)?;
            let payload_end = position + h.encoded_len as u64;
            if payload_end > file_len {
                return Err(DeltaError::Truncated { at: file_len });
            }
            totals.records += 1;
            totals.encoded_bytes += h.encoded_len as u64;
            if head[0] == TAG_ZERO {
                totals.zero_bytes += h.length;
            } else {
                totals.data_bytes += h.length;
            }
            records.push(IndexedRecord {
                offset: h.offset,
                length: h.length,
                zero: head[0] == TAG_ZERO,
                at: position,
                tag: head[0],
                encoded_len: h.encoded_len as u32,
                data_crc: h.data_crc,
            });
            next_offset = h.offset + h.length;
            position = payload_end;
        }
        let mut decompressor = zstd::bulk::Decompressor::new()?;
        decompressor.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(
            ZSTD_WINDOW_LOG_MAX,
        ))?;
        Ok(DeltaFile {
            file,
            header,
            records,
            encoded: Vec::new(),
            decoded: Vec::new(),
            decompressor,
        })
    }

    pub fn header(&self) -> &DeltaHeader {
        &self.header
    }

    /// The records, ascending and disjoint.
    pub fn records(&self) -> &[IndexedRecord] {
        &self.records
    }

    /// Reads, decodes and checks the data of a (non-zero) record of this file.
    pub fn read(&mut self, record: &IndexedRecord) -> Result<&[u8], DeltaError> {
        let corrupt = |why| {
            Err(DeltaError::DataCorrupt {
                at: record.at,
                offset: record.offset,
                why,
            })
        };
        if record.zero {
            return corrupt("a zero record has no data to read");
        }
        self.encoded.resize(record.encoded_len as usize, 0);
        let mut position = record.at;
        read_exact(
            &mut ReadAt {
                file: &self.file,
                position,
            },
            &mut self.encoded,
            &mut position,
        )?;
        let data: &[u8] = if record.tag == TAG_RAW {
            &self.encoded
        } else {
            self.decoded.resize(record.length as usize, 0);
            match self
                .decompressor
                .decompress_to_buffer(&self.encoded[..], &mut self.decoded[..])
            {
                Ok(n) if n as u64 == record.length => {}
                Ok(_) => return corrupt("decompressed to the wrong length"),
                Err(_) => return corrupt("zstd data does not decode"),
            }
            &self.decoded
        };
        if crc32fast::hash(data) != record.data_crc {
            return corrupt("checksum mismatch");
        }
        Ok(data)
    }
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
