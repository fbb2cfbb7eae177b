//! Reading a delta as a stream: every record and the trailer checked, every length bounded
//! before anything is allocated.

use std::io::{self, Read};

use super::*;

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
    pub(super) input: R,
    pub(super) header: DeltaHeader,
    pub(super) geometry: Geometry,
    pub(super) position: u64,
    pub(super) digest: crc32fast::Hasher,
    pub(super) summary: DeltaSummary,
    pub(super) next_offset: u64,
    pub(super) encoded: Vec<u8>,
    pub(super) decoded: Vec<u8>,
    pub(super) decompressor: zstd::bulk::Decompressor<'static>,
    pub(super) finished: bool,
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
