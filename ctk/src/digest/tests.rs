use super::*;

fn id(seq: u64) -> ChangeId {
    ChangeId::new(Generation(7), seq)
}

#[test]
fn incremental_leaves_equal_leaves_of_the_whole_image() {
    let dir = tempfile::tempdir().unwrap();
    let bs = 4096u32;
    let size = 37 * bs as u64 + 1000; // a partial last block
    let mut image = vec![0u8; size as usize];
    let mut leaves = Leaves::zeroed(size, bs).unwrap();
    let empty = leaves.digest();
    let mut x = 12345u64;
    for round in 0..50 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let block = (x >> 33) % 38;
        let offset = block * bs as u64;
        let len = (bs as u64).min(size - offset) as usize;
        if round % 4 == 0 {
            image[offset as usize..offset as usize + len].fill(0);
            leaves.set_zero(offset, len as u64).unwrap();
        } else {
            image[offset as usize..offset as usize + len].fill((x >> 20) as u8 | 1);
            leaves
                .set_data(offset, &image[offset as usize..offset as usize + len])
                .unwrap();
        }
    }
    let path = dir.path().join("img");
    std::fs::write(&path, &image).unwrap();
    let whole = Leaves::of_image(&std::fs::File::open(&path).unwrap(), size, bs).unwrap();
    assert_eq!(whole.digest(), leaves.digest());
    assert_ne!(whole.digest(), empty);
    // One byte anywhere changes the digest.
    image[5 * bs as usize + 17] ^= 1;
    std::fs::write(&path, &image).unwrap();
    let changed = Leaves::of_image(&std::fs::File::open(&path).unwrap(), size, bs).unwrap();
    assert_ne!(changed.digest(), leaves.digest());
    assert_eq!(changed.differing(&leaves), vec![5]);
}

#[test]
fn a_leaf_file_saves_in_place_and_refuses_what_it_cannot_vouch_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leaves");
    let mut leaves = Leaves::zeroed(1 << 20, 4096).unwrap();
    leaves.set_data(8192, &[3u8; 4096]).unwrap();
    LeafFile::save(&path, &mut leaves, id(1)).unwrap();
    let mut loaded = LeafFile::load(&path, id(1)).unwrap().unwrap();
    assert_eq!(loaded.digest(), leaves.digest());
    assert!(
        LeafFile::load(&path, id(2)).unwrap().is_none(),
        "another point"
    );
    // In place: only the changed leaf is written.
    loaded.set_data(0, &[9u8; 4096]).unwrap();
    LeafFile::save(&path, &mut loaded, id(2)).unwrap();
    let again = LeafFile::load(&path, id(2)).unwrap().unwrap();
    assert_eq!(again.digest(), loaded.digest());
    // A dirty header (a crash mid-save) or any flipped header byte: unknown.
    let bytes = std::fs::read(&path).unwrap();
    for i in 0..HEADER as usize {
        let mut bad = bytes.clone();
        bad[i] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        assert!(LeafFile::load(&path, id(2)).unwrap().is_none(), "byte {i}");
    }
    let mut short = bytes.clone();
    short.pop();
    std::fs::write(&path, &short).unwrap();
    assert!(LeafFile::load(&path, id(2)).unwrap().is_none());
}

#[test]
fn pending_changes_stand_in_for_a_save_the_agent_did_not_live_to_make() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leaves");
    // A full: saved whole before the push.
    let mut full = Leaves::zeroed(1 << 20, 4096).unwrap();
    full.set_data(0, &[1u8; 8192]).unwrap();
    LeafFile::save_pending(&path, &full, id(1)).unwrap();
    let mut base = LeafFile::load(&path, id(1)).unwrap().unwrap();
    assert_eq!(base.digest(), full.digest());
    // An increment: pending changes only; the file still holds id(1).
    base.set_data(4096, &[2u8; 4096]).unwrap();
    base.set_zero(0, 4096).unwrap();
    LeafFile::save_pending(&path, &base, id(2)).unwrap();
    // Killed here, after the receiver committed id(2): the leaves of id(2) are known...
    let mut next = LeafFile::load(&path, id(2)).unwrap().unwrap();
    assert_eq!(next.digest(), base.digest());
    // ...and so are those of id(1), if the receiver did not commit it after all.
    assert_eq!(
        LeafFile::load(&path, id(1)).unwrap().unwrap().digest(),
        full.digest()
    );
    // A second push from the same point (the first was overtaken) does not hide it.
    let mut other = LeafFile::load(&path, id(1)).unwrap().unwrap();
    other.set_data(12288, &[4u8; 4096]).unwrap();
    LeafFile::save_pending(&path, &other, id(5)).unwrap();
    assert_eq!(
        LeafFile::load(&path, id(2)).unwrap().unwrap().digest(),
        base.digest()
    );
    assert_eq!(
        LeafFile::load(&path, id(5)).unwrap().unwrap().digest(),
        other.digest()
    );
    // Killed part way through saving id(2) in place (dirty header, some leaves written):
    // the pending changes still give id(2).
    let clean = std::fs::read(&path).unwrap();
    let mut dirty = clean.clone();
    dirty[..HEADER as usize].copy_from_slice(&header(false, &base, id(2)));
    std::fs::write(&path, &dirty).unwrap();
    assert_eq!(
        LeafFile::load(&path, id(2)).unwrap().unwrap().digest(),
        base.digest()
    );
    std::fs::write(&path, &clean).unwrap();
    // Saving makes id(2) the file's and drops the pending changes.
    LeafFile::save(&path, &mut next, id(2)).unwrap();
    assert!(!pending_path(&path, id(2)).exists());
    assert_eq!(
        LeafFile::load(&path, id(2)).unwrap().unwrap().digest(),
        base.digest()
    );
    // A damaged pending file is ignored, not trusted.
    next.set_data(8192, &[3u8; 4096]).unwrap();
    LeafFile::save_pending(&path, &next, id(3)).unwrap();
    let mut bytes = std::fs::read(pending_path(&path, id(3))).unwrap();
    let last = bytes.len() - 9;
    bytes[last] ^= 1;
    std::fs::write(pending_path(&path, id(3)), &bytes).unwrap();
    assert!(LeafFile::load(&path, id(3)).unwrap().is_none());
}

#[test]
fn resizing_marks_the_edge_block_and_digests_text_round_trips() {
    let mut l = Leaves::zeroed(10 * 4096 + 5, 4096).unwrap();
    l.resize(12 * 4096).unwrap();
    assert_eq!(l.edge_block(10 * 4096 + 5), Some(10));
    l.resize(8 * 4096).unwrap();
    assert_eq!(l.edge_block(12 * 4096), None);
    let d = l.digest();
    assert_eq!(d.to_string().parse::<ImageDigest>().unwrap(), d);
    assert!("xyz".parse::<ImageDigest>().is_err());
    assert!(Leaves::zeroed(LEAVES_MAX * 4096 + 1, 4096).is_err());
    assert!(l.set_data(4096 + 1, &[1]).is_err());
}

/// A file that reports no holes: `of_image` reads all of it.
struct NoHoles(std::fs::File);

impl FileAt for NoHoles {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        FileAt::read_at(&self.0, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        FileAt::write_all_at(&self.0, buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        FileAt::len(&self.0)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        FileAt::set_len(&self.0, len)
    }
    fn sync(&self) -> std::io::Result<()> {
        FileAt::sync(&self.0)
    }
}

#[test]
fn leaves_of_a_sparse_image_skip_its_holes_and_equal_reading_it_whole() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let bs = 4096u32;
    let size = (10 << 20) + 1000; // a partial last block
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    // Data at block edges, inside blocks, across a block boundary, and in the last block.
    for (at, len) in [
        (0, 100),
        (5 * 4096 + 17, 5000),
        ((8 << 20) - 3, 13),
        (size - 10, 10),
    ] {
        FileExt::write_all_at(&f, &vec![0xa5; len], at).unwrap();
    }
    f.sync_all().unwrap();
    let sparse = std::fs::File::open(&path).unwrap();
    let skipped = Leaves::of_image(&sparse, size, bs).unwrap();
    let whole = Leaves::of_image(&NoHoles(std::fs::File::open(&path).unwrap()), size, bs).unwrap();
    assert_eq!(skipped.digest(), whole.digest());
    assert_ne!(skipped.digest(), Leaves::zeroed(size, bs).unwrap().digest());
    // Shorter than the disk: an error, not zeros.
    assert!(Leaves::of_image(&sparse, size + 4096, bs).is_err());
}
