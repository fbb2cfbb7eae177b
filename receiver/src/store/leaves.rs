//! The block digests (leaves) of the newest point, kept beside full.img: used to check pre-
//! images as the undo reads them, and to compute each merge's image digest, which must equal
//! the agent's.

use super::*;

/// The merged image's digest and whether the sender's matched it.
#[derive(Default)]
pub(super) struct Checked {
    pub(super) digest: Option<ImageDigest>,
    pub(super) checked: bool,
}

pub(super) fn read_leaves(
    leaves: &mut Leaves,
    full: &dyn FileAt,
    pos: u64,
    buf: &mut [u8],
    disk: &str,
) -> Result<()> {
    full.read_exact_at(buf, pos)
        .map_err(io_err("reading back the merged image"))?;
    leaves.set_data(pos, buf).map_err(|e| StoreError::Damaged {
        disk: disk.to_string(),
        why: format!("block digests: {e}"),
    })
}

impl DiskStore {
    pub(super) fn leaves_path(&self) -> PathBuf {
        self.dir.join("leaves")
    }

    /// The leaves of the newest point: from the leaf file when it holds them, else read
    /// from full.img (after a crash, or for a store written before digests existed). Zeros
    /// of the delta's size before the first full. `None` for a disk too large to digest.
    pub(super) fn base_leaves(
        &self,
        full: &dyn FileAt,
        header: &DeltaHeader,
    ) -> Result<Option<Leaves>> {
        let result = match self.points().last() {
            None => Leaves::zeroed(header.disk_size, header.block_size),
            Some(newest) => {
                let at = newest.change_id;
                // The leaves must give the digest the point was committed with: the leaf
                // file's body has no checksum of its own, and a misread one (or a misread
                // full.img) would make the pre-image check below pass wrong bytes into the
                // undo (a shifted read of the leaf file, then a misdirected read of zeros
                // that matches its zero leaves).
                let fits = |l: &Leaves| newest.image_digest.is_none_or(|d| l.digest() == d);
                match LeafFile::load_in(&*self.fs, &self.leaves_path(), at) {
                    Ok(Some(l)) if fits(&l) => Ok(l),
                    _ => {
                        tracing::info!(disk = %self.name, "reading full.img to rebuild its block digests");
                        let mut rebuilt =
                            Leaves::of_image(full, newest.disk_size, header.block_size);
                        for _ in 1..READ_ATTEMPTS {
                            match &rebuilt {
                                Ok(l) if !fits(l) => {
                                    rebuilt =
                                        Leaves::of_image(full, newest.disk_size, header.block_size)
                                }
                                _ => break,
                            }
                        }
                        match rebuilt {
                            Ok(l) if !fits(&l) => {
                                return Err(StoreError::Damaged {
                                    disk: self.name.clone(),
                                    why: format!(
                                        "full.img does not read back as point {} (its digest differs, {READ_ATTEMPTS} times): run verify",
                                        newest.change_id
                                    ),
                                });
                            }
                            other => other,
                        }
                    }
                }
            }
        };
        match result {
            Ok(l) => Ok(Some(l)),
            Err(DigestError::Io(e)) => Err(io_err("reading full.img for its digests")(e)),
            Err(e) => {
                tracing::warn!(disk = %self.name, error = %e, "no image digest for this disk");
                Ok(None)
            }
        }
    }

    /// The leaves of the newest point, checked against the digest it was committed with
    /// (`None` before the first point, or for a disk too large to digest): failback's commit
    /// sets the blocks it merges in them, for the digest the merged image must have.
    pub fn newest_leaves(&self) -> Result<Option<Leaves>> {
        let (Some(newest), Some(block_size)) = (self.points().last(), self.manifest.block_size)
        else {
            return Ok(None);
        };
        let header = DeltaHeader {
            disk_id: self.name.clone(),
            disk_size: newest.disk_size,
            block_size,
            from: Some(newest.change_id),
            to: newest.change_id,
        };
        self.base_leaves(&*self.full()?, &header)
    }

    /// Compares the merged image's digest with the agent's. `Ok(true)`: both known and
    /// equal; `Ok(false)`: one side does not know it (the point is recorded unchecked).
    /// Returns the merged image's digest (if its leaves are known) with the verdict, so
    /// the one pass over the leaves serves both the check and the point's record.
    pub(super) fn check_digest(
        &self,
        leaves: Option<&Leaves>,
        meta: &PointMeta,
    ) -> Result<Checked> {
        let Some(leaves) = leaves else {
            return Ok(Checked::default());
        };
        let got = leaves.digest();
        let Some(expected) = meta.image_digest else {
            return Ok(Checked {
                digest: Some(got),
                checked: false,
            });
        };
        if got != expected {
            return Err(StoreError::DigestMismatch { expected, got });
        }
        Ok(Checked {
            digest: Some(got),
            checked: true,
        })
    }

    /// Saves the merged leaves (before the commit: a crash in between is recovered by
    /// `recover`, which rebuilds them) and records the digest in the point.
    pub(super) fn save_leaves(
        &self,
        leaves: Option<Leaves>,
        header: &DeltaHeader,
        point: &mut Point,
        checked: Checked,
    ) -> Result<()> {
        if let Some(mut leaves) = leaves {
            point.image_digest = checked.digest;
            LeafFile::save_in(&*self.fs, &self.leaves_path(), &mut leaves, header.to).map_err(
                |e| StoreError::Io {
                    doing: "saving the block digests".into(),
                    source: match e {
                        DigestError::Io(e) => e,
                        other => io::Error::other(other.to_string()),
                    },
                },
            )?;
        }
        point.digest_checked = checked.checked;
        Ok(())
    }
}
