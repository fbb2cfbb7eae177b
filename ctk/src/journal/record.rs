//! Journal records: framing, checksums and bounded decoding. The byte layout is specified in
//! docs/format.md; this module is the only code that knows it.

use crate::limits::{
    CURSOR_NAME_LEN_MAX, DISK_ID_LEN_MAX, JOURNAL_RECORD_MAX, JOURNAL_REGIONS_PER_RECORD_MAX,
};

/// Every record starts with these bytes ("CTKr" little-endian), so a scan after damage can
/// find later records.
pub(crate) const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"CTKr");
/// magic u32, kind u8, reserved [u8; 3], payload length u32.
pub(crate) const FRAME_HEAD: usize = 12;
/// CRC32 of head and payload.
pub(crate) const FRAME_TAIL: usize = 4;
/// Journal format version written in the header.
pub const JOURNAL_VERSION: u32 = 1;

/// What a seal record says about how its epoch came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealKind {
    /// A cut asked for by the user of the tracker.
    Cut,
    /// Made at an unclean reopen from the regions that had write intent.
    Recovery,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: u32,
    pub disk_id: Vec<u8>,
    pub disk_size: u64,
    pub block_size: u32,
    pub region_size: u64,
    pub generation: u128,
    pub baseline_all: bool,
    /// How many recent cuts the writer kept exact, so that replay compacts as it did.
    pub keep_recent: u64,
}

/// One journal record. Bitmaps travel as `Chunk`s of roaring's portable serialization,
/// consumed by the next record that names a bitmap length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Record<'a> {
    Header(Header),
    Chunk(&'a [u8]),
    SnapshotBegin {
        floor: u64,
        latest: u64,
    },
    History {
        len: u64,
    },
    Epoch {
        after: u64,
        upto: u64,
        len: u64,
    },
    Open {
        len: u64,
    },
    SnapshotEnd,
    Intent(Vec<u32>),
    Clear(Vec<u32>),
    Seal {
        seq: u64,
        kind: SealKind,
        len: u64,
    },
    Resize {
        disk_size: u64,
    },
    CursorSet {
        name: &'a str,
        seq: u64,
    },
    CursorDrop {
        name: &'a str,
    },
    Close {
        len: u64,
    },
    /// Ends every synced batch. Because of it, a record anything depends on is never the
    /// last in the file once synced: damage to it is followed by a valid record and cannot
    /// pass for a torn tail.
    Synced,
}

mod kind {
    pub const HEADER: u8 = 1;
    pub const CHUNK: u8 = 2;
    pub const SNAPSHOT_BEGIN: u8 = 3;
    pub const HISTORY: u8 = 4;
    pub const EPOCH: u8 = 5;
    pub const OPEN: u8 = 6;
    pub const SNAPSHOT_END: u8 = 7;
    pub const INTENT: u8 = 8;
    pub const CLEAR: u8 = 9;
    pub const SEAL: u8 = 10;
    pub const RESIZE: u8 = 11;
    pub const CURSOR_SET: u8 = 12;
    pub const CURSOR_DROP: u8 = 13;
    pub const CLOSE: u8 = 14;
    pub const SYNCED: u8 = 15;
}

/// Bytes of a chunk payload, so a chunk record stays under `JOURNAL_RECORD_MAX`.
pub(crate) const CHUNK_MAX: usize = JOURNAL_RECORD_MAX - 64;

/// Appends `record`, framed and checksummed, to `out`.
pub(crate) fn encode(record: &Record<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.extend_from_slice(&[0; 8]); // kind, reserved, length: filled below
    let payload_start = out.len();
    let kind = match record {
        Record::Header(h) => {
            put_u32(out, h.version);
            put_u16(out, h.disk_id.len() as u16);
            out.extend_from_slice(&h.disk_id);
            put_u64(out, h.disk_size);
            put_u32(out, h.block_size);
            put_u64(out, h.region_size);
            out.extend_from_slice(&h.generation.to_le_bytes());
            out.push(h.baseline_all as u8);
            put_u64(out, h.keep_recent);
            kind::HEADER
        }
        Record::Chunk(bytes) => {
            out.extend_from_slice(bytes);
            kind::CHUNK
        }
        Record::SnapshotBegin { floor, latest } => {
            put_u64(out, *floor);
            put_u64(out, *latest);
            kind::SNAPSHOT_BEGIN
        }
        Record::History { len } => {
            put_u64(out, *len);
            kind::HISTORY
        }
        Record::Epoch { after, upto, len } => {
            put_u64(out, *after);
            put_u64(out, *upto);
            put_u64(out, *len);
            kind::EPOCH
        }
        Record::Open { len } => {
            put_u64(out, *len);
            kind::OPEN
        }
        Record::SnapshotEnd => kind::SNAPSHOT_END,
        Record::Intent(regions) | Record::Clear(regions) => {
            put_u32(out, regions.len() as u32);
            for r in regions {
                put_u32(out, *r);
            }
            if matches!(record, Record::Intent(_)) {
                kind::INTENT
            } else {
                kind::CLEAR
            }
        }
        Record::Seal {
            seq,
            kind: seal_kind,
            len,
        } => {
            put_u64(out, *seq);
            out.push(match seal_kind {
                SealKind::Cut => 1,
                SealKind::Recovery => 2,
            });
            put_u64(out, *len);
            kind::SEAL
        }
        Record::Resize { disk_size } => {
            put_u64(out, *disk_size);
            kind::RESIZE
        }
        Record::CursorSet { name, seq } => {
            put_u16(out, name.len() as u16);
            out.extend_from_slice(name.as_bytes());
            put_u64(out, *seq);
            kind::CURSOR_SET
        }
        Record::CursorDrop { name } => {
            put_u16(out, name.len() as u16);
            out.extend_from_slice(name.as_bytes());
            kind::CURSOR_DROP
        }
        Record::Close { len } => {
            put_u64(out, *len);
            kind::CLOSE
        }
        Record::Synced => kind::SYNCED,
    };
    let payload_len = out.len() - payload_start;
    debug_assert!(payload_len + FRAME_HEAD + FRAME_TAIL <= JOURNAL_RECORD_MAX);
    out[start + 4] = kind;
    out[start + 8..start + 12].copy_from_slice(&(payload_len as u32).to_le_bytes());
    let crc = crc32fast::hash(&out[start..]);
    put_u32(out, crc);
}

/// Frame head check: returns (kind, payload length) if the head is plausible.
pub(crate) fn parse_head(head: &[u8; FRAME_HEAD]) -> Option<(u8, usize)> {
    let magic = u32::from_le_bytes(head[0..4].try_into().ok()?);
    let len = u32::from_le_bytes(head[8..12].try_into().ok()?) as usize;
    if magic != RECORD_MAGIC || head[5..8] != [0, 0, 0] {
        return None;
    }
    if len + FRAME_HEAD + FRAME_TAIL > JOURNAL_RECORD_MAX {
        return None;
    }
    Some((head[4], len))
}

/// Checks the CRC of a whole frame (head, payload, tail).
pub(crate) fn frame_crc_ok(frame: &[u8]) -> bool {
    let (body, tail) = frame.split_at(frame.len() - FRAME_TAIL);
    crc32fast::hash(body).to_le_bytes() == tail
}

/// Decodes a payload whose frame already passed its CRC check. A well-checksummed record
/// that does not parse is corruption or a foreign writer, never a torn write.
pub(crate) fn decode(kind: u8, payload: &[u8]) -> Result<Record<'_>, &'static str> {
    let mut r = Reader { buf: payload };
    let record = match kind {
        kind::HEADER => {
            let version = r.u32()?;
            let id_len = r.u16()? as usize;
            if id_len > DISK_ID_LEN_MAX {
                return Err("disk id too long");
            }
            let disk_id = r.bytes(id_len)?.to_vec();
            Record::Header(Header {
                version,
                disk_id,
                disk_size: r.u64()?,
                block_size: r.u32()?,
                region_size: r.u64()?,
                generation: u128::from_le_bytes(r.bytes(16)?.try_into().expect("16 bytes")),
                baseline_all: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err("bad flag"),
                },
                keep_recent: r.u64()?,
            })
        }
        kind::CHUNK => {
            let rest = r.buf;
            r.buf = &[];
            Record::Chunk(rest)
        }
        kind::SNAPSHOT_BEGIN => Record::SnapshotBegin {
            floor: r.u64()?,
            latest: r.u64()?,
        },
        kind::HISTORY => Record::History { len: r.u64()? },
        kind::EPOCH => Record::Epoch {
            after: r.u64()?,
            upto: r.u64()?,
            len: r.u64()?,
        },
        kind::OPEN => Record::Open { len: r.u64()? },
        kind::SNAPSHOT_END => Record::SnapshotEnd,
        kind::INTENT | kind::CLEAR => {
            let n = r.u32()? as usize;
            if n > JOURNAL_REGIONS_PER_RECORD_MAX {
                return Err("too many regions in one record");
            }
            let mut regions = Vec::with_capacity(n);
            for _ in 0..n {
                regions.push(r.u32()?);
            }
            if kind == kind::INTENT {
                Record::Intent(regions)
            } else {
                Record::Clear(regions)
            }
        }
        kind::SEAL => Record::Seal {
            seq: r.u64()?,
            kind: match r.u8()? {
                1 => SealKind::Cut,
                2 => SealKind::Recovery,
                _ => return Err("unknown seal kind"),
            },
            len: r.u64()?,
        },
        kind::RESIZE => Record::Resize {
            disk_size: r.u64()?,
        },
        kind::CURSOR_SET => {
            let name = r.name()?;
            Record::CursorSet {
                name,
                seq: r.u64()?,
            }
        }
        kind::CURSOR_DROP => Record::CursorDrop { name: r.name()? },
        kind::CLOSE => Record::Close { len: r.u64()? },
        kind::SYNCED => Record::Synced,
        _ => return Err("unknown record kind"),
    };
    if !r.buf.is_empty() {
        return Err("trailing bytes in record");
    }
    Ok(record)
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.buf.len() < n {
            return Err("record too short");
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_le_bytes(
            self.bytes(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn name(&mut self) -> Result<&'a str, &'static str> {
        let n = self.u16()? as usize;
        if n > CURSOR_NAME_LEN_MAX {
            return Err("cursor name too long");
        }
        std::str::from_utf8(self.bytes(n)?).map_err(|_| "cursor name is not UTF-8")
    }
}
