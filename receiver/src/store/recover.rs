//! Opening after a crash: an interrupted merge is finished from its staged delta or rolled back
//! with its undo, and files no point names are removed.

use super::*;

impl DiskStore {
    pub(super) fn recover(&mut self) -> Result<Recovery> {
        let Some(applying) = self.manifest.applying.clone() else {
            return Ok(Recovery::Clean);
        };
        // A reader that started after the crash may have mapped the newest point before
        // "applying" was written: it must rebuild before full.img changes again.
        self.bump_generation()?;
        let Some(staged) = applying.staged() else {
            // A first full written in place: there is no staged copy to finish it from.
            tracing::warn!(disk = %self.name, "an interrupted first full: emptying the store");
            let full = self.full()?;
            self.roll_back(&full, &applying)?;
            // A resume state of a first full lived in full.img, now emptied.
            self.drop_partial();
            return Ok(Recovery::RolledBack(applying.change_id()));
        };
        let staged = self.dir.join(staged);
        let forward = self
            .fs
            .open(&staged)
            .map_err(DeltaError::from)
            .and_then(|f| delta::verify(BufReader::new(vfs::Cursor::new(f))).map(|_| ()));
        let full = self.full()?;
        let outcome = match forward {
            Ok(()) => {
                apply_to(self.reader(&staged, "opening the staged delta")?, &full)?;
                full.sync().map_err(io_err("syncing full.img"))?;
                // The leaves of the point before may be gone (the crash may have been in
                // the middle of saving the new ones), so they are read from the merged
                // image whole: a full read, once, after a crash.
                let header = DeltaFile::open(self.open_file(&staged, "opening the staged delta")?)?
                    .header()
                    .clone();
                let leaves = match Leaves::of_image(&full, header.disk_size, header.block_size) {
                    Ok(l) => Some(l),
                    Err(DigestError::Io(e)) => return Err(io_err("reading full.img")(e)),
                    Err(_) => None,
                };
                match self.check_digest(leaves.as_ref(), applying.meta()) {
                    Ok(checked) => {
                        let undo = applying.undo().map(str::to_owned);
                        let point = self.point_for(&staged, undo, applying.meta().clone())?;
                        self.commit_point(point, leaves, &header, checked, Commit::Onto, false)?;
                        Recovery::RolledForward(applying.change_id())
                    }
                    Err(e) => {
                        tracing::warn!(disk = %self.name, error = %e, "rolling back");
                        self.roll_back(&full, &applying)?;
                        Recovery::RolledBack(applying.change_id())
                    }
                }
            }
            Err(why) => {
                // The staged delta was durable and verified before "applying" was written;
                // unreadable now means the media lied. Put back what the merge may have
                // overwritten.
                tracing::warn!(disk = %self.name, error = %why, "staged delta unreadable: rolling back");
                self.roll_back(&full, &applying)?;
                Recovery::RolledBack(applying.change_id())
            }
        };
        Ok(outcome)
    }

    /// Puts back what an interrupted or refused merge may have overwritten, and forgets it.
    pub(super) fn roll_back(&mut self, full: &dyn FileAt, applying: &Applying) -> Result<()> {
        match applying.undo() {
            Some(undo) => {
                apply_to(self.reader(&self.dir.join(undo), "opening the undo")?, full)?;
            }
            // A first full: no point is committed, so nothing needs putting back; the partial
            // image is dropped and the store is empty again (refusing to open would wedge the
            // disk's store for good).
            None if self.manifest.points.is_empty() => {
                full.set_len(0).map_err(io_err("emptying full.img"))?
            }
            None => {
                return Err(StoreError::Damaged {
                    disk: self.name.clone(),
                    why: "an interrupted merge has no undo to roll back with".into(),
                });
            }
        }
        full.sync().map_err(io_err("syncing full.img"))?;
        let mut m = self.manifest.clone();
        m.applying = None;
        self.write_manifest(m)?;
        if let Some(staged) = applying.staged() {
            self.remove(&self.dir.join(staged));
        }
        Ok(())
    }

    /// Deletes staged deltas and undo files no point or merge refers to (left by a crash).
    pub(super) fn remove_orphans(&self) {
        let mut keep: Vec<String> = self
            .manifest
            .points
            .iter()
            .filter_map(|p| p.undo.clone())
            .collect();
        if let Some(a) = &self.manifest.applying {
            keep.extend(a.staged().map(str::to_owned));
            keep.extend(a.undo().map(str::to_owned));
        }
        // The resume state has its own life (`drop_partial`).
        keep.extend([PARTIAL_JSON.to_owned(), PARTIAL_DELTA.to_owned()]);
        for sub in ["undo", "staging"] {
            let Ok(names) = self.fs.list(&self.dir.join(sub)) else {
                continue;
            };
            for name in names {
                let rel = format!("{sub}/{name}");
                if !keep.contains(&rel) {
                    self.remove(&self.dir.join(rel));
                }
            }
        }
    }
}
