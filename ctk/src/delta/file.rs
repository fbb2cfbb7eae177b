//! A delta file read by position: an index of its records' heads, for readers that fetch
//! only the records they need (restore).

use std::fs::File;
use std::io::{self, Read};

use super::*;

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
