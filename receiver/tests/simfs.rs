//! The store on `SimFs`, one exact fault each: regression tests for the bugs the
//! deterministic simulation found (ctk-sim), written out so they do not depend on which seed
//! happens to reach them. Each fails on the code before its fix.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use ctk::delta::{self, DeltaHeader, WriteOptions};
use ctk::digest::Leaves;
use ctk::vfs::{SimFaults, SimFs, Vfs};
use ctk::{ChangeId, Extent, Generation};
use ctk_receiver::store::{DiskStore, Ingested, PointMeta, StoreError};

const BS: u64 = 4096;
const SIZE: u64 = 16 * BS;

fn id(seq: u64) -> ChangeId {
    ChangeId::new(Generation(0x5eed), seq)
}

fn open(fs: &SimFs) -> DiskStore {
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    DiskStore::open_in(vfs, Path::new("/s"), "d", false)
        .expect("the store opens")
        .0
}

/// An image whose block `b` is filled with `fill + b`.
fn image(fill: u8) -> Vec<u8> {
    (0..SIZE)
        .map(|i| fill.wrapping_add((i / BS) as u8))
        .collect()
}

/// The delta of `blocks` of `img` (each its own record), from `from` to `to`.
fn delta(img: &[u8], from: Option<u64>, to: u64, blocks: &[u64]) -> Vec<u8> {
    let header = DeltaHeader {
        disk_id: "d".into(),
        disk_size: SIZE,
        block_size: BS as u32,
        from: from.map(id),
        to: id(to),
    };
    let extents: Vec<Extent> = blocks.iter().map(|b| Extent::new(b * BS, BS)).collect();
    let read = |offset: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&img[offset as usize..offset as usize + buf.len()]);
        Ok(())
    };
    delta::export_with(read, &extents, &header, WriteOptions::default(), Vec::new())
        .unwrap()
        .0
}

fn meta(img: &[u8]) -> PointMeta {
    let mut leaves = Leaves::zeroed(SIZE, BS as u32).unwrap();
    leaves.set_data(0, img).unwrap();
    PointMeta {
        image_digest: Some(leaves.digest()),
        ..PointMeta::default()
    }
}

/// The first `records` records of a delta whose records are each one block (and no more).
fn cut_after(bytes: &[u8], records: usize) -> Vec<u8> {
    // Header, then per record a head and its (raw, incompressible here or not) payload: find
    // the cut by decoding, not by arithmetic on the format.
    let mut reader = delta::DeltaReader::new(bytes).unwrap();
    for _ in 0..records {
        reader.next_record().unwrap().unwrap();
    }
    let at = reader.checkpoint().position as usize;
    // A few bytes into the next record: cut mid-record.
    bytes[..at + 3].to_vec()
}

/// A store on `fs` holding point 1 = `v1`, pushed as a full.
fn with_first_full(fs: &SimFs, v1: &[u8]) -> DiskStore {
    let mut store = open(fs);
    let all: Vec<u64> = (0..SIZE / BS).collect();
    ingest(&mut store, &delta(v1, None, 1, &all), v1).unwrap();
    store
}

fn ingest(store: &mut DiskStore, bytes: &[u8], img: &[u8]) -> Result<Ingested, StoreError> {
    let m = meta(img);
    store.ingest(Cursor::new(bytes.to_vec()), 10usize, move |_| Ok(m))
}

fn restore(fs: &SimFs, store: &DiskStore, point: ChangeId) -> Vec<u8> {
    fs.create_dir_all(Path::new("/out")).unwrap();
    store
        .restore(point, Path::new("/out/img"), |_, _| {})
        .unwrap();
    fs.read_file(Path::new("/out/img")).unwrap()
}

/// Every point the store holds restores to the image it was committed as.
fn check(fs: &SimFs, images: &[(u64, Vec<u8>)]) {
    let store = open(fs);
    store.verify().expect("verify passes");
    for p in store.points() {
        let (_, img) = images
            .iter()
            .find(|(seq, _)| id(*seq) == p.change_id)
            .expect("a point that was pushed");
        assert!(
            restore(fs, &store, p.change_id) == *img,
            "{} diverged",
            p.change_id
        );
    }
}

/// The directory sync after the first full's commit rename fails, and so does the next
/// manifest write. The store used to roll the merge back under the manifest the rename had
/// already made current: full.img emptied, the point still listed (simulation seed 891).
#[test]
fn a_failed_directory_sync_after_the_commit_rename_never_undoes_the_point() {
    let fs = SimFs::new(1, SimFaults::default());
    let full = image(1);
    // Syncs of the disk's directory: "applying" recorded, leaves saved, commit (fails).
    fs.fail_sync_of(Path::new("/s/d"), 2);
    // Manifest writes: "applying", commit, and the roll back that must not happen.
    fs.fail_sync_of(Path::new("/s/d/manifest.json.tmp"), 2);
    let mut store = open(&fs);
    let bytes = delta(&full, None, 1, &(0..16).collect::<Vec<_>>());
    let err = ingest(&mut store, &bytes, &full).expect_err("the directory sync failed");
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    drop(store);
    check(&fs, &[(1, full.clone())]);
    // And after a power cut, whichever manifest survived. The planned fault belonged to the
    // life before the cut: a rename the cut lost brings back "applying", whose roll back
    // writes the manifest again, and must be able to.
    fs.fail_sync_of(Path::new("/s/d/manifest.json.tmp"), u32::MAX);
    fs.crash();
    check(&fs, &[(1, full)]);
}

/// A push cut off leaves a resume state; the resumed push is cut off too, and the receiver
/// restarts. The resumed push's records (only the rest of the change) used to be salvaged as
/// a resume state of their own, and the next resume lost the blocks only the first part
/// carried (simulation seed 372).
#[test]
fn a_cut_off_resumed_push_never_becomes_a_resume_state() {
    let fs = SimFs::new(2, SimFaults::default());
    let v1 = image(1);
    let mut store = with_first_full(&fs, &v1);
    // Push A (1 -> 2) of blocks 0, 2, 4, 6, 8, cut after its first two records.
    let v2 = {
        let mut v = v1.clone();
        for b in [0u64, 2, 4, 6, 8] {
            v[(b * BS) as usize..((b + 1) * BS) as usize].fill(0x20 + b as u8);
        }
        v
    };
    let a = delta(&v2, Some(1), 2, &[0, 2, 4, 6, 8]);
    assert!(ingest(&mut store, &cut_after(&a, 2), &v2).is_err());
    let p = store.partial().expect("A's received part is kept");
    assert_eq!((p.to, p.next_offset), (id(2), 3 * BS));
    // Block 0 is written again; push B (1 -> 3) resumes A: what changed since 2 below A's
    // offset, everything since 1 from it on. It is cut after two records (blocks 0 and 4).
    let mut v3 = v2.clone();
    v3[..BS as usize].fill(0x77);
    let b = delta(&v3, Some(1), 3, &[0, 4, 6, 8]);
    let m = meta(&v3);
    let r = store.ingest_resume(
        Cursor::new(cut_after(&b, 2)),
        p.to,
        p.next_offset,
        10usize,
        move |_| Ok(m),
    );
    assert!(r.is_err());
    drop(store);
    // The receiver restarts. The resume state must still be A's: B's records say nothing
    // of block 2, which only A carried.
    let mut store = open(&fs);
    let p = store.partial().expect("A's state is still there");
    assert_eq!(
        p.to,
        id(2),
        "the resume state is A's, not the resumed push's"
    );
    // Resume again from what the receiver reports, as the agent does, and commit.
    let rest: Vec<u64> = (0..16)
        .filter(|&blk| {
            let changed_since_1 = [0, 2, 4, 6, 8].contains(&blk);
            let changed_since_2 = blk == 0;
            if blk * BS >= p.next_offset {
                changed_since_1
            } else {
                changed_since_2
            }
        })
        .collect();
    let c = delta(&v3, Some(1), 3, &rest);
    let m = meta(&v3);
    store
        .ingest_resume(Cursor::new(c), p.to, p.next_offset, 10usize, move |_| Ok(m))
        .expect("the resumed push commits");
    drop(store);
    check(&fs, &[(1, v1), (3, v3)]);
}

/// The fsync of a staged push fails. Its file used to stay, be salvaged as a resume state at
/// the next open (from reads that still saw the data), and after a power cut (the data never
/// reached the disk) every resume from it was refused: replication stuck (seed 996).
#[test]
fn a_staged_push_whose_fsync_failed_is_never_resumed_from() {
    let fs = SimFs::new(3, SimFaults::default());
    let v1 = image(1);
    let mut store = with_first_full(&fs, &v1);
    let mut v2 = v1.clone();
    v2[..(4 * BS) as usize].fill(0x42);
    fs.fail_sync_of(Path::new("/s/d/staging/incoming.ctkd"), 0);
    let err = ingest(&mut store, &delta(&v2, Some(1), 2, &[0, 1, 2, 3]), &v2).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    drop(store);
    let _ = open(&fs); // an open between (it salvages what it finds)
    fs.crash();
    let mut store = open(&fs);
    // Whatever the store offers now must work: a resume if it keeps a state, else a push
    // from the beginning.
    let m = meta(&v2);
    let r = match store.partial() {
        Some(p) => {
            let rest: Vec<u64> = (0..4).filter(|b| b * BS >= p.next_offset).collect();
            let bytes = delta(&v2, Some(1), 2, &rest);
            store.ingest_resume(
                Cursor::new(bytes),
                p.to,
                p.next_offset,
                10usize,
                move |_| Ok(m),
            )
        }
        None => ingest(&mut store, &delta(&v2, Some(1), 2, &[0, 1, 2, 3]), &v2),
    };
    r.expect("the next push commits");
    drop(store);
    check(&fs, &[(1, v1), (2, v2)]);
}
