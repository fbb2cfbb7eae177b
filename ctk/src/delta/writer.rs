//! Writing a delta: records streamed out one at a time, checkpoints a cut-off push resumes
//! from, and the trailer.

use std::io::{self, Write};

use super::*;

/// Streams a delta into `W`.
pub struct DeltaWriter<W: Write> {
    out: W,
    geometry: Geometry,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    pub(super) digest: crc32fast::Hasher,
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
    pub(super) digest: crc32fast::Hasher,
}

impl Checkpoint {
    /// The trailer that makes the first `position` bytes of the stream a complete delta.
    pub fn trailer(&self) -> Vec<u8> {
        trailer_bytes(&self.summary, self.digest.clone().finalize())
    }
}
