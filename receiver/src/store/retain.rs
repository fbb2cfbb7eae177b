//! Retention: dropping points, folding the undo files of those between kept ones into the next
//! kept point's.

use super::*;

impl DiskStore {
    /// Drops the points `retention` does not keep; returns how many. Dropping the oldest
    /// points only forgets their way back. Dropping points between two kept ones folds their
    /// undo files into the newer kept point's: one new undo taking it straight back to the
    /// older kept point (where several hold a byte, the oldest undo wins: it holds the older
    /// point's byte). The fold is written and synced before the manifest that uses it, and
    /// the files it replaces are removed after, so a crash anywhere leaves either the old or
    /// the new set of points, each restoring exactly.
    pub(super) fn retain(&mut self, retention: &Retention) -> Result<usize> {
        let points = self.manifest.points.clone();
        let times: Vec<u64> = points
            .iter()
            .map(|p| p.cut_unix_ms.unwrap_or(p.committed_unix_ms))
            .collect();
        let mut keep = crate::retention::select(&times, (self.clock)(), retention);
        let levels: Vec<Option<Consistency>> = points.iter().map(|p| p.consistency).collect();
        crate::retention::keep_newest_of_each(&levels, &mut keep);
        // An exposed point stays (its reads go on through the undo files of the newer ones).
        match self.pinned() {
            Ok(None) => {}
            Ok(Some(id)) => {
                if let Some(i) = points.iter().position(|p| p.change_id == id) {
                    keep[i] = true;
                }
            }
            Err(()) => {
                tracing::debug!(disk = %self.name, "an exposure is being set up: nothing dropped this time");
                return Ok(0);
            }
        }
        // A point a group point names stays as long as the group point does (groups.rs).
        let root = self.dir.parent().unwrap_or(Path::new("."));
        match groups::pinned(&*self.fs, root, &self.name) {
            Ok(ids) => {
                for (p, keep) in points.iter().zip(keep.iter_mut()) {
                    *keep |= ids.contains(&p.change_id);
                }
            }
            Err(e) => {
                tracing::warn!(disk = %self.name, error = %e,
                    "the group catalogs cannot be read: nothing dropped this time");
                return Ok(0);
            }
        }
        let dropped = keep.iter().filter(|k| !**k).count();
        if dropped == 0 {
            return Ok(0);
        }
        let mut kept: Vec<Point> = Vec::new();
        let mut run: Vec<&Point> = Vec::new();
        for (p, keep) in points.iter().zip(keep) {
            if !keep {
                run.push(p);
                continue;
            }
            let mut p = p.clone();
            match kept.last() {
                // Nothing older is kept: its way back is not needed.
                None => p.undo = None,
                Some(prev) if !run.is_empty() => {
                    let undos: Vec<String> = run
                        .iter()
                        .copied()
                        .chain([&p])
                        .map(|q| {
                            q.undo.clone().ok_or_else(|| StoreError::Damaged {
                                disk: self.name.clone(),
                                why: format!("point {} has no undo", q.change_id),
                            })
                        })
                        .collect::<Result<_>>()?;
                    let rel = format!(
                        "undo/{}-back-to-{}.ctkd",
                        p.change_id.to_string().replace('/', "-"),
                        prev.change_id.to_string().replace('/', "-")
                    );
                    self.fold_undos(&undos, prev, &p, &rel)?;
                    p.undo = Some(rel);
                    p.from = Some(prev.change_id);
                }
                Some(_) => {}
            }
            run.clear();
            kept.push(p);
        }
        failpoint("folded");
        let mut m = self.manifest.clone();
        m.points = kept;
        self.write_manifest(m)?;
        self.remove_orphans();
        Ok(dropped)
    }

    /// Writes undo file `rel` taking point `to` back to `prev`, from the undo files `undos`
    /// (those of the points between them and of `to`, oldest first: the oldest holder of a
    /// byte wins).
    pub(super) fn fold_undos(
        &self,
        undos: &[String],
        prev: &Point,
        to: &Point,
        rel: &str,
    ) -> Result<()> {
        let sources: Vec<PathBuf> = undos.iter().map(|u| self.dir.join(u)).collect();
        let block_size = self
            .manifest
            .block_size
            .unwrap_or(ctk::limits::BLOCK_SIZE_DEFAULT);
        let header = DeltaHeader {
            disk_id: self.name.clone(),
            disk_size: prev.disk_size,
            block_size,
            from: Some(prev.change_id),
            to: to.change_id,
        };
        self.compose(&sources, &header, &self.dir.join(rel))?;
        self.sync_dir(&self.dir.join("undo"))
    }
}
