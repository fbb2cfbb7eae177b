//! The durable journal beside each disk (the role of VMware's `-ctk` file).
//!
//! The journal is an append-only file of checksummed records: a header, a snapshot of the
//! change map, then live records (write intents, sealed epochs, cursor moves, resizes, and
//! at a clean close the open epoch). Replaying it rebuilds the map; a torn tail loses only
//! records nobody relied on, because every record that something depends on was synced
//! before that something happened. See docs/format.md for the bytes and the rules.
//!
//! Only this module (through [`record`]) knows the on-disk layout, and only through
//! [`storage::JournalStorage`] does it touch the media.

pub mod record;
pub mod storage;

use std::collections::HashSet;
use std::io;

use roaring::RoaringBitmap;

use crate::geometry::Geometry;
use crate::id::Generation;
use crate::map::{ChangeMap, MapOptions, MapState};
use record::{FRAME_HEAD, FRAME_TAIL, Header, Record};
use storage::JournalStorage;

/// How far a replay got.
pub(crate) enum Replay {
    /// No journal exists.
    Missing,
    /// The journal cannot be trusted to hold every change (unreadable header, damage
    /// followed by valid records, records that contradict each other).
    Unusable(String),
    /// The journal replayed.
    Replayed(Box<Replayed>),
}

pub(crate) struct Replayed {
    pub header: Header,
    pub map: ChangeMap,
    /// Regions with write intent not yet cleared, in the header's region size.
    pub live_intents: HashSet<u32>,
    /// The journal ended with a clean close.
    pub clean: bool,
    /// Where a torn tail started, if there was one.
    pub torn_at: Option<u64>,
}

/// Worst-case serialized size of a roaring bitmap of `blocks` block numbers. A container that
/// was never `optimize()`d can be a run container with up to 32,768 runs (4 bytes each), far
/// larger than the 8 KiB of a bitmap container: the open epoch grows such containers when a
/// large write (a run) is later merged with many single blocks; a tighter bound would reject
/// valid journals and start needless new generations. A bitmap
/// blob longer than this is corruption. The blob only grows with chunks actually read from
/// the file, so this bounds plausibility, not an up-front allocation.
pub(crate) fn bitmap_len_max(blocks: u64) -> u64 {
    const CONTAINER_MAX: u64 = 8 + 2 + 4 * 32_768 + 1;
    let containers = blocks.div_ceil(1 << 16);
    64 + containers * CONTAINER_MAX
}

/// Appends a bitmap as chunk records and returns its serialized length.
pub(crate) fn push_bitmap(out: &mut Vec<u8>, bitmap: &RoaringBitmap) -> u64 {
    let mut bytes = Vec::with_capacity(bitmap.serialized_size());
    bitmap
        .serialize_into(&mut bytes)
        .expect("writing into a Vec cannot fail");
    for chunk in bytes.chunks(record::CHUNK_MAX) {
        record::encode(&Record::Chunk(chunk), out);
    }
    bytes.len() as u64
}

/// Encodes a whole journal: header, map snapshot and live intents.
pub(crate) fn snapshot_bytes(header: &Header, state: &MapState, live_intents: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    record::encode(&Record::Header(header.clone()), &mut out);
    record::encode(
        &Record::SnapshotBegin {
            floor: state.floor,
            latest: state.latest,
        },
        &mut out,
    );
    let len = push_bitmap(&mut out, &state.history);
    record::encode(&Record::History { len }, &mut out);
    for epoch in &state.epochs {
        let len = push_bitmap(&mut out, &epoch.blocks);
        record::encode(
            &Record::Epoch {
                after: epoch.after,
                upto: epoch.upto,
                len,
            },
            &mut out,
        );
    }
    for (name, &seq) in &state.cursors {
        record::encode(&Record::CursorSet { name, seq }, &mut out);
    }
    let len = push_bitmap(&mut out, &state.open);
    record::encode(&Record::Open { len }, &mut out);
    for regions in live_intents.chunks(crate::limits::JOURNAL_REGIONS_PER_RECORD_MAX) {
        record::encode(&Record::Intent(regions.to_vec()), &mut out);
    }
    record::encode(&Record::SnapshotEnd, &mut out);
    record::encode(&Record::Synced, &mut out);
    out
}

/// Reads one frame at `offset`. `Ok(None)` means damage (short, bad head, bad CRC).
fn read_frame<S: JournalStorage>(
    storage: &mut S,
    offset: u64,
    file_len: u64,
    buf: &mut Vec<u8>,
) -> io::Result<Option<u8>> {
    if file_len - offset < (FRAME_HEAD + FRAME_TAIL) as u64 {
        return Ok(None);
    }
    let mut head = [0u8; FRAME_HEAD];
    storage.read_at(offset, &mut head)?;
    let Some((kind, len)) = record::parse_head(&head) else {
        return Ok(None);
    };
    let frame_len = FRAME_HEAD + len + FRAME_TAIL;
    if file_len - offset < frame_len as u64 {
        return Ok(None);
    }
    buf.clear();
    buf.resize(frame_len, 0);
    storage.read_at(offset, buf)?;
    if !record::frame_crc_ok(buf) {
        return Ok(None);
    }
    Ok(Some(kind))
}

/// After damage at `from`, is there any valid record later in the file? If so the damage is
/// not a torn tail, and the journal cannot prove it holds every change.
fn valid_record_after<S: JournalStorage>(
    storage: &mut S,
    from: u64,
    file_len: u64,
) -> io::Result<bool> {
    const WINDOW: u64 = 1 << 20;
    let magic = record::RECORD_MAGIC.to_le_bytes();
    let mut frame = Vec::new();
    let mut window = Vec::new();
    let mut start = from + 1;
    while start + 4 <= file_len {
        let n = (file_len - start).min(WINDOW + 3);
        window.resize(n as usize, 0);
        storage.read_at(start, &mut window)?;
        for (i, w) in window.windows(4).enumerate() {
            if w == magic && read_frame(storage, start + i as u64, file_len, &mut frame)?.is_some()
            {
                return Ok(true);
            }
        }
        start += WINDOW;
    }
    Ok(false)
}

/// Replays a journal.
pub(crate) fn replay<S: JournalStorage>(storage: &mut S) -> io::Result<Replay> {
    let Some(file_len) = storage.stored_len()? else {
        return Ok(Replay::Missing);
    };
    let mut offset = 0u64;
    let mut frame = Vec::new();
    let mut state: Option<Replaying> = None;
    let mut torn_at = None;
    while offset < file_len {
        let Some(kind) = read_frame(storage, offset, file_len, &mut frame)? else {
            if valid_record_after(storage, offset, file_len)? {
                return Ok(Replay::Unusable(format!(
                    "damaged record at byte {offset} is followed by valid records"
                )));
            }
            torn_at = Some(offset);
            break;
        };
        let payload = &frame[FRAME_HEAD..frame.len() - FRAME_TAIL];
        let record = match record::decode(kind, payload) {
            Ok(r) => r,
            Err(why) => {
                return Ok(Replay::Unusable(format!(
                    "record at byte {offset} is malformed: {why}"
                )));
            }
        };
        let this = offset;
        offset += frame.len() as u64;
        // The header comes first, then one snapshot, then live records.
        let step = match state.as_mut() {
            None => Replaying::start(record).map(|s| state = Some(s)),
            Some(s) => s.apply(record, this),
        };
        if let Err(why) = step {
            return Ok(Replay::Unusable(why));
        }
    }
    let Some(Replaying {
        header,
        geometry,
        map,
        live,
        clean,
        ..
    }) = state
    else {
        return Ok(Replay::Unusable("journal has no readable header".into()));
    };
    let Some(mut map) = map else {
        return Ok(Replay::Unusable("journal has no complete snapshot".into()));
    };
    // Resizes in the live records moved the size on from the header's.
    debug_assert_eq!(geometry, map.geometry());
    map.set_options(MapOptions {
        keep_recent: header.keep_recent,
    });
    Ok(Replay::Replayed(Box::new(Replayed {
        header,
        map,
        live_intents: live,
        clean,
        torn_at,
    })))
}

/// What a replay has rebuilt so far, after the header.
struct Replaying {
    header: Header,
    geometry: Geometry,
    /// Bitmap bytes carried by chunk records, taken by the record they precede.
    blob: Vec<u8>,
    /// The snapshot being read, until its end record makes it the map.
    snap: Option<MapState>,
    map: Option<ChangeMap>,
    live: HashSet<u32>,
    clean: bool,
}

impl Replaying {
    /// The first record: a header of a version, geometry and region size this code reads.
    fn start(record: Record) -> Result<Replaying, String> {
        let Record::Header(h) = record else {
            return Err("journal does not start with a header".into());
        };
        if h.version != record::JOURNAL_VERSION {
            return Err(format!(
                "journal format version {} is not supported",
                h.version
            ));
        }
        let geometry = Geometry::new(h.disk_size, h.block_size as u64)
            .map_err(|e| format!("journal header has a bad geometry: {e}"))?;
        let regions = crate::limits::REGION_SIZE_MIN..=crate::limits::REGION_SIZE_MAX;
        if !h.region_size.is_power_of_two() || !regions.contains(&h.region_size) {
            return Err(format!(
                "journal header has an unsupported region size {}",
                h.region_size
            ));
        }
        Ok(Replaying {
            header: h,
            geometry,
            blob: Vec::new(),
            snap: None,
            map: None,
            live: HashSet::new(),
            clean: false,
        })
    }

    /// One record after the header (at byte `this`), or why the journal cannot be trusted.
    ///
    /// One piece: one arm per record kind and the phase it may appear in (snapshot or live
    /// records, docs/format.md), so that every kind out of its place falls to the last arm.
    fn apply(&mut self, record: Record, this: u64) -> Result<(), String> {
        let Replaying {
            header: h,
            geometry: g,
            blob,
            snap,
            map,
            live,
            clean,
        } = self;
        // Only a Close that is the last record (but for its sync marker) makes the journal
        // clean.
        if record != Record::Synced {
            *clean = false;
        }
        match (record, snap.as_mut(), map.as_mut()) {
            (Record::Chunk(bytes), _, _) => {
                if blob.len() as u64 + bytes.len() as u64 > bitmap_len_max(g.blocks()) {
                    return Err(format!(
                        "bitmap at byte {this} is larger than any bitmap of this disk"
                    ));
                }
                blob.extend_from_slice(bytes);
            }
            (Record::SnapshotBegin { floor, latest }, None, None) => {
                *snap = Some(MapState {
                    generation: Generation(h.generation),
                    disk_size: h.disk_size,
                    block_size: h.block_size,
                    floor,
                    latest,
                    baseline_all: h.baseline_all,
                    history: RoaringBitmap::new(),
                    epochs: Vec::new(),
                    cursors: Default::default(),
                    open: RoaringBitmap::new(),
                });
            }
            (Record::History { len }, Some(s), None) => {
                s.history = take_bitmap(blob, len, g)
                    .ok_or(format!("history bitmap at byte {this} is inconsistent"))?;
            }
            (Record::Epoch { after, upto, len }, Some(s), None) => {
                let blocks = take_bitmap(blob, len, g)
                    .ok_or(format!("epoch bitmap at byte {this} is inconsistent"))?;
                s.epochs.push(crate::map::Epoch {
                    after,
                    upto,
                    blocks,
                });
            }
            (Record::CursorSet { name, seq }, Some(s), None) => {
                s.cursors.insert(name.to_owned(), seq);
            }
            (Record::Open { len }, Some(s), None) => {
                s.open = take_bitmap(blob, len, g)
                    .ok_or(format!("open-epoch bitmap at byte {this} is inconsistent"))?;
            }
            // Regions past the current end are legitimate after a shrink (see
            // Tracker::resize); recovery clips them.
            (Record::Intent(regions_list), _, _) => live.extend(regions_list),
            (Record::SnapshotEnd, Some(_), None) => {
                let state = snap.take().expect("matched Some");
                let options = MapOptions {
                    keep_recent: h.keep_recent,
                };
                *map = Some(
                    ChangeMap::from_state(state, options)
                        .map_err(|e| format!("snapshot ending at byte {this}: {e}"))?,
                );
            }
            (Record::Clear(regions_list), None, Some(_)) => {
                for r in regions_list {
                    live.remove(&r);
                }
            }
            (Record::Seal { seq, kind: _, len }, None, Some(m)) => {
                if seq != m.latest().seq + 1 {
                    return Err(format!(
                        "seal at byte {this} is for cut {seq}, expected {}",
                        m.latest().seq + 1
                    ));
                }
                let b = take_bitmap(blob, len, g)
                    .ok_or(format!("sealed bitmap at byte {this} is inconsistent"))?;
                m.replace_open(b);
                m.seal();
            }
            (Record::Resize { disk_size }, None, Some(m)) => {
                m.resize(disk_size)
                    .map_err(|e| format!("resize at byte {this}: {e}"))?;
                *g = m.geometry();
            }
            (Record::CursorSet { name, seq }, None, Some(m)) => {
                let id = crate::id::ChangeId::new(m.generation(), seq);
                let result = if m.cursors().any(|(n, _)| n == name) {
                    m.advance_cursor(name, id)
                } else {
                    m.register_cursor(name, id)
                };
                result.map_err(|e| format!("cursor record at byte {this}: {e}"))?;
            }
            (Record::CursorDrop { name }, None, Some(m)) => {
                m.drop_cursor(name)
                    .map_err(|e| format!("cursor record at byte {this}: {e}"))?;
            }
            (Record::Synced, _, _) => {}
            (Record::Close { len }, None, Some(m)) => {
                let b = take_bitmap(blob, len, g)
                    .ok_or(format!("close record at byte {this} is inconsistent"))?;
                m.replace_open(b);
                // At a clean close every intended write had been recorded.
                live.clear();
                *clean = true;
            }
            (other, _, _) => {
                return Err(format!("record {other:?} at byte {this} is out of place"));
            }
        }
        Ok(())
    }
}

/// The bitmap the chunk records before a record carried, if it is whole, well-formed and
/// names only blocks of the disk.
fn take_bitmap(blob: &mut Vec<u8>, len: u64, g: &Geometry) -> Option<RoaringBitmap> {
    if blob.len() as u64 != len {
        return None;
    }
    let bitmap = RoaringBitmap::deserialize_from(&blob[..]).ok()?;
    blob.clear();
    bitmap
        .max()
        .is_none_or(|m| (m as u64) < g.blocks())
        .then_some(bitmap)
}
