//! The map of where each byte of a restore point lives (`DiskStore::point_map`): reads of
//! any range of any kept point equal the point's image, and `restore`, which walks the same
//! map, writes exactly that image. On `SimFs`, with multi-block records, zero records and
//! retention folding undo files.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use ctk::delta::{self, DeltaHeader, WriteOptions};
use ctk::seeded::XorShift64;
use ctk::vfs::{SimFaults, SimFs, Vfs};
use ctk::{ChangeId, Extent, Generation};
use ctk_receiver::store::{DiskStore, PointMeta, Source};

const BS: u64 = 4096;
const BLOCKS: u64 = 96;
const SIZE: u64 = BLOCKS * BS;

fn id(seq: u64) -> ChangeId {
    ChangeId::new(Generation(0x9a9), seq)
}

fn open(fs: &SimFs) -> DiskStore {
    let vfs: Arc<dyn Vfs> = Arc::new(fs.clone());
    DiskStore::open_in(vfs, Path::new("/s"), "d", false)
        .expect("the store opens")
        .0
}

/// The delta from point `from` to `to` carrying `extents` of `img`.
fn delta(img: &[u8], from: Option<u64>, to: u64, extents: &[Extent]) -> Vec<u8> {
    let header = DeltaHeader {
        disk_id: "d".into(),
        disk_size: SIZE,
        block_size: BS as u32,
        from: from.map(id),
        to: id(to),
    };
    let read = |offset: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&img[offset as usize..offset as usize + buf.len()]);
        Ok(())
    };
    delta::export_with(read, extents, &header, WriteOptions::default(), Vec::new())
        .unwrap()
        .0
}

/// Changes a few runs of blocks of `img`: some to noise, some to zeros (zero records).
fn scribble(img: &mut [u8], rng: &mut XorShift64) -> Vec<Extent> {
    let mut starts: Vec<u64> = (0..5).map(|_| rng.below(BLOCKS - 8)).collect();
    starts.sort_unstable();
    starts.dedup();
    let mut extents: Vec<Extent> = Vec::new();
    for b in starts {
        let blocks = 1 + rng.below(8);
        let (from, to) = ((b * BS) as usize, ((b + blocks) * BS) as usize);
        if rng.below(4) == 0 {
            img[from..to].fill(0);
        } else {
            for chunk in img[from..to].chunks_mut(8) {
                chunk.copy_from_slice(&rng.next().to_le_bytes());
            }
        }
        match extents.last_mut() {
            Some(last) if last.end() >= from as u64 => {
                last.length = last.length.max(to as u64 - last.offset)
            }
            _ => extents.push(Extent::new(from as u64, to as u64 - from as u64)),
        }
    }
    extents
}

#[test]
fn reads_of_every_kept_point_and_its_restore_equal_the_image_it_was_committed_as() {
    let fs = SimFs::new(7, SimFaults::default());
    let mut rng = XorShift64(0x5eed_0f9a9);
    let mut store = open(&fs);
    let mut img = vec![0u8; SIZE as usize];
    for chunk in img.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    let mut images = vec![(1, img.clone())];
    let full = delta(&img, None, 1, &[Extent::new(0, SIZE)]);
    store
        .ingest(Cursor::new(full), 5usize, |_| Ok(PointMeta::default()))
        .unwrap();
    for seq in 2..=12 {
        let extents = scribble(&mut img, &mut rng);
        let d = delta(&img, Some(seq - 1), seq, &extents);
        store
            .ingest(Cursor::new(d), 5usize, |_| Ok(PointMeta::default()))
            .unwrap();
        images.push((seq, img.clone()));
    }
    let kept: Vec<ChangeId> = store.points().iter().map(|p| p.change_id).collect();
    assert_eq!(
        kept.len(),
        5,
        "retention kept the newest 5 (older ones folded)"
    );
    fs.create_dir_all(Path::new("/out")).unwrap();
    let mut reads = 0;
    for point in kept {
        let want = &images.iter().find(|(s, _)| id(*s) == point).unwrap().1;
        let mut map = store.point_map(point).unwrap();
        assert_eq!(map.size(), SIZE);
        let runs = map.runs().to_vec();
        assert!(runs.iter().any(|r| matches!(r.2, Source::Full)));
        // Whole, then random ranges of any alignment.
        let mut got = vec![0u8; SIZE as usize];
        map.read_at(&mut got, 0).unwrap();
        assert!(got == *want, "point {point} read whole differs");
        for _ in 0..300 {
            let offset = rng.below(SIZE);
            let len = 1 + rng.below((SIZE - offset).min(5 * BS)) as usize;
            let mut buf = vec![0xeeu8; len];
            map.read_at(&mut buf, offset).unwrap();
            assert_eq!(
                buf,
                want[offset as usize..offset as usize + len],
                "point {point}, {len} bytes at {offset}"
            );
            reads += 1;
        }
        assert!(map.read_at(&mut [0u8; 2], SIZE - 1).is_err());
        assert!(map.read_at(&mut [0u8; 2], u64::MAX).is_err());
        store
            .restore(point, Path::new("/out/img"), |_, _| {})
            .unwrap();
        assert!(
            fs.read_file(Path::new("/out/img")).unwrap_or_default() == *want,
            "restore of {point} differs"
        );
    }
    assert_eq!(reads, 5 * 300);
    // The newest point has no newer undo: all of it is the full.
    let newest = store.points().last().unwrap().change_id;
    let map = store.point_map(newest).unwrap();
    assert!(map.runs().iter().all(|r| r.2 == Source::Full));
    assert!(
        store.point_map(id(1)).is_err(),
        "a dropped point has no map"
    );
}
