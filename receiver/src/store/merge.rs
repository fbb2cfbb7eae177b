//! The merge of a staged delta: undo durable, "applying" recorded, applied to full.img with the
//! merged blocks read back for the digest, committed.

use super::*;

/// Applies a (verified) delta to `target`: data written, zero ranges up to
/// [`ZERO_WRITE_MAX`] written as zeros, longer ones punched as holes.
pub(super) fn apply_to(input: impl Read, target: &dyn FileAt) -> Result<()> {
    apply_reporting(input, target, |_| Ok(()))
}

/// [`apply_to`], calling `written(end)` after each record (an error from it stops the
/// apply): every byte of the delta's records below `end` is then written (records are
/// ascending and disjoint, which the reader enforces), so a reader may follow that far.
pub(super) fn apply_reporting(
    input: impl Read,
    target: &dyn FileAt,
    mut written: impl FnMut(u64) -> Result<()>,
) -> Result<()> {
    let mut reader = DeltaReader::new(input)?;
    let size = reader.header().disk_size;
    let len = target.len().map_err(io_err("reading a size"))?;
    if len < size {
        target.set_len(size).map_err(io_err("growing the image"))?;
    }
    // Paired with the reader's own check: records ascend and never overlap.
    let mut last_end = 0u64;
    while let Some(record) = reader.next_record()? {
        let start = match &record {
            DeltaRecord::Data { offset, .. } | DeltaRecord::Zero { offset, .. } => *offset,
        };
        debug_assert!(start >= last_end, "records out of order at {start}");
        let end = match record {
            DeltaRecord::Data { offset, data } => {
                target
                    .write_all_at(data, offset)
                    .map_err(io_err("writing the image"))?;
                offset + data.len() as u64
            }
            // A short zero range is written as its zeros: punching a hole costs ext4 an
            // extent-tree change in the journal per call, and the blocks are allocated again
            // by the next write there. Long ones (a trimmed file) become holes, as the
            // replica is thin.
            DeltaRecord::Zero { offset, length } if length <= ZERO_WRITE_MAX as u64 => {
                target
                    .write_all_at(&ZEROS[..length as usize], offset)
                    .map_err(io_err("writing the image"))?;
                offset + length
            }
            DeltaRecord::Zero { offset, length } => {
                zero_range(target, offset, length)?;
                offset + length
            }
        };
        debug_assert!(end <= size, "a record past the disk's end: {end} > {size}");
        last_end = end;
        written(end)?;
    }
    target.set_len(size).map_err(io_err("sizing the image"))?;
    Ok(())
}

/// Applies the verified delta `input` to `full` and syncs it, while a second thread reads
/// the merged blocks back a record behind the apply and brings `base` (the leaves of the
/// point before) to the merged image: the blocks the delta wrote, as full.img really holds
/// them (not as they were sent), and the block a size change cuts into. The read-back was a
/// pass of its own after the sync (about a tenth of an incremental merge); it reads the same
/// pages either way, and the agent's image digest checks the result: a read-back ahead of
/// the apply fails the e2e resume tests with a digest mismatch. `Ok(None)` when there are no leaves to bring along.
pub(super) fn apply_and_read_back(
    input: impl Read,
    full: &dyn FileAt,
    base: Option<Leaves>,
    header: &DeltaHeader,
    touched: &[Extent],
    disk: &str,
) -> Result<Option<Leaves>> {
    // Test hook: a byte of the merged image goes bad as it is written (a misdirected or torn
    // write, media rot); the digest check must catch it.
    let mut flip = std::env::var("CTK_FAILPOINT").is_ok_and(|v| v == "flip_merged");
    let mut flip_first = |end: u64| -> Result<()> {
        if std::mem::take(&mut flip)
            && let Some(first) = touched.first()
            && first.offset < end
        {
            let mut b = [0u8; 1];
            full.read_exact_at(&mut b, first.offset)
                .and_then(|()| full.write_all_at(&[b[0] ^ 0x20], first.offset))
                .map_err(io_err("flipping a byte (test hook)"))?;
        }
        Ok(())
    };
    let Some(base) = base else {
        apply_reporting(input, full, &mut flip_first)?;
        full.sync().map_err(io_err("syncing full.img"))?;
        return Ok(None);
    };
    // Bounded: the apply waits rather than queueing an unbounded count of small records.
    let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(1024);
    std::thread::scope(|scope| {
        let reading = scope.spawn(move || read_back(base, full, header, touched, disk, rx));
        let mut sent = 0;
        let applied = apply_reporting(input, full, |end| {
            flip_first(end)?;
            // In steps of READ_BACK_STEP: woken for every small record, the reader cost the
            // apply about as much as it saved (probe, 64 KiB records), so it runs in a few
            // long bursts.
            if end >= sent + READ_BACK_STEP {
                // A reader that stopped (on an error of its own, returned below) needs no
                // more.
                let _ = tx.send(end);
                // And the disk, idle while the apply runs in the page cache, starts on
                // what the sync will need (probe: the apply step with its sync about 0.75
                // of its time without the hint).
                full.start_writeback(sent, end - sent);
                sent = end;
            }
            Ok(())
        });
        // The reader takes the end of the channel as the end of the apply.
        drop(tx);
        let synced = applied.and_then(|()| full.sync().map_err(io_err("syncing full.img")));
        let leaves = reading
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        synced?;
        leaves
    })
}

/// The longest zero range an apply writes as zeros rather than punching a hole: the gap a
/// first full bridges with zeros, so both leave the same kind of file.
pub(super) const ZERO_WRITE_MAX: usize = write_behind::GAP_FILL_MAX as usize;

pub(super) static ZEROS: [u8; ZERO_WRITE_MAX] = [0; ZERO_WRITE_MAX];

/// How far the apply runs between wake-ups of its read-back.
pub(super) const READ_BACK_STEP: u64 = 8 << 20;

/// The read-back half of [`apply_and_read_back`]: each chunk is read once `written` says the
/// apply has passed the end of its last block (records are ascending, so nothing below that
/// is written again), the block a size change cuts into once the apply has ended.
pub(super) fn read_back(
    mut leaves: Leaves,
    full: &dyn FileAt,
    header: &DeltaHeader,
    touched: &[Extent],
    disk: &str,
    written: std::sync::mpsc::Receiver<u64>,
) -> Result<Option<Leaves>> {
    let old_size = leaves.disk_size();
    if leaves.resize(header.disk_size).is_err() {
        return Ok(None);
    }
    let bs = header.block_size as u64;
    let edge = leaves
        .edge_block(old_size)
        .map(|b| Extent::new(b * bs, bs.min(header.disk_size - b * bs)));
    let mut applied_to = 0u64;
    let mut wait_for = |end: u64| {
        while applied_to < end {
            // A closed channel: the apply ended (its outcome is the caller's to judge).
            applied_to = written.recv().unwrap_or(u64::MAX);
        }
    };
    let mut buf = vec![0u8; CHUNK];
    for e in touched {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = (e.end() - pos).min(CHUNK as u64) as usize;
            wait_for((pos + n as u64).next_multiple_of(bs));
            read_leaves(&mut leaves, full, pos, &mut buf[..n], disk)?;
            pos += n as u64;
        }
    }
    if let Some(e) = edge {
        wait_for(u64::MAX);
        read_leaves(
            &mut leaves,
            full,
            e.offset,
            &mut buf[..e.length as usize],
            disk,
        )?;
    }
    Ok(Some(leaves))
}

pub(super) fn zero_range(target: &dyn FileAt, offset: u64, length: u64) -> Result<()> {
    target
        .zero(offset, length)
        .map_err(io_err("zeroing the image"))
}

impl DiskStore {
    /// Merges the delta read from `input` as a new restore point, crash-atomically, and
    /// applies `retention`. `end` is given the input once the delta is read and says what
    /// the sender knows about the point (a streamed push sends it after the delta). Returns
    /// once the point is committed (durable). A push cut off on the way (the input fails)
    /// leaves what was received as a resume state (`partial`) when it continues the newest
    /// point, so the agent can go on from there (`ingest_resume`).
    pub fn ingest<R: Read>(
        &mut self,
        input: R,
        retention: impl Into<Retention>,
        end: impl FnOnce(R) -> Result<PointMeta>,
    ) -> Result<Ingested> {
        self.check_not_fenced()?;
        self.ingest_fenced_or_not(input, retention, end)
    }

    /// `ingest` without the fence's check: for failback's commit (`ingest_failback`), the
    /// one merge a failed-over disk takes.
    pub(super) fn ingest_fenced_or_not<R: Read>(
        &mut self,
        input: R,
        retention: impl Into<Retention>,
        end: impl FnOnce(R) -> Result<PointMeta>,
    ) -> Result<Ingested> {
        let started = std::time::Instant::now();
        // The header decides the path: a first full into an empty store is written straight
        // into full.img (nothing to protect, so nothing to stage); anything else is staged.
        let (peeked, input) = peek_header(input)?;
        if peeked.from.is_none() && self.points().is_empty() && self.manifest.applying.is_none() {
            return self.ingest_first_full(peeked, input, end, None);
        }
        match self.stage(input, end, true)? {
            Staged::Already(change_id) => Ok(Ingested::AlreadyCommitted { change_id }),
            Staged::Delta {
                touched,
                meta,
                undo,
            } => {
                let staging = self.dir.join("staging").join("incoming.ctkd");
                self.merge_staged(&staging, touched, meta, undo, retention.into(), started)
            }
        }
    }

    /// Merges the verified delta staged at `staging` (writing `touched`) as a new point.
    pub(super) fn merge_staged(
        &mut self,
        staging: &Path,
        touched: Vec<Extent>,
        meta: PointMeta,
        staged_undo: Option<StagedUndo>,
        retention: Retention,
        started: std::time::Instant,
    ) -> Result<Ingested> {
        let mut retention = retention;
        retention.keep = retention.keep.clamp(1, POINTS_MAX);
        // Where a merge's time goes, for the log (a first full is long work).
        let mut steps: Vec<(&str, f64)> = Vec::new();
        let mut lap = started;
        let mut step = |name, steps: &mut Vec<(&str, f64)>| {
            steps.push((name, lap.elapsed().as_secs_f64()));
            lap = std::time::Instant::now();
        };
        step("staged", &mut steps);
        failpoint("staged");
        let header = DeltaReader::new(self.reader(staging, "opening the staged delta")?)?
            .header()
            .clone();
        // Files are named after the whole ChangeId: after a resync the sequence numbers of
        // a new generation start again, and an older point's undo must not be overwritten.
        let name = format!("{}-{}", header.to.generation, header.to.seq);
        let staged_rel = format!("staging/{name}.ctkd");
        self.fs
            .rename(staging, &self.dir.join(&staged_rel))
            .map_err(io_err("staging"))?;
        self.sync_dir(&self.dir.join("staging"))?;

        // Can this filesystem hold the size the delta asks for? Probed on a scratch file,
        // before anything is recorded: a size it cannot hold would otherwise fail the apply
        // after "applying" is written, and every reopen would retry it and fail again.
        if let Err(e) = self.probe_size(header.disk_size) {
            self.remove(&self.dir.join(&staged_rel));
            return Err(e);
        }

        // 2. The undo: what this merge will overwrite, as of the newest point. (And the
        // block digests of the newest point, while full.img still holds it.) Written while
        // the delta was staged, or now.
        let full = self.full()?;
        let (base, undo_rel) = self.place_undo(&*full, staged_undo, &header, &touched, &name)?;
        failpoint("undo_written");
        step("undo", &mut steps);

        // 3. Record the merge before touching the full.
        let mut m = self.manifest.clone();
        m.block_size = Some(header.block_size);
        m.applying = Some(Applying::Staged {
            change_id: header.to,
            staged: staged_rel.clone(),
            undo: undo_rel.clone(),
            meta: meta.clone(),
        });
        self.write_manifest(m)?;
        failpoint("applying_recorded");

        // 4. Apply, durably, and 5. read the merged blocks back for their leaves: a thread
        // follows the apply a record behind and keeps reading while full.img is synced (the
        // pages it reads are the ones just written, as they would be after the sync).
        let leaves = apply_and_read_back(
            self.reader(&self.dir.join(&staged_rel), "opening the staged delta")?,
            &full,
            base,
            &header,
            &touched,
            &self.name,
        )?;
        failpoint("applied");
        step("applied", &mut steps);

        // The merged image must be the one the agent digested: if not, put the previous
        // point back and refuse.
        let checked = match self.check_digest(leaves.as_ref(), &meta) {
            Ok(checked) => checked,
            Err(e) => {
                let applying = self.manifest.applying.clone().expect("recorded above");
                self.roll_back(&full, &applying)?;
                self.remove_orphans();
                return Err(e);
            }
        };
        let point = self.point_for(&self.dir.join(&staged_rel), undo_rel, meta)?;
        step("digest", &mut steps);

        // 6. Commit the point.
        let point = self.commit_point(point, leaves, &header, checked, Commit::Onto, true)?;
        // What a cut-off push left no longer continues the newest point.
        self.drop_partial();
        step("committed", &mut steps);
        // 7. Retention, after the commit: a failure here only keeps points longer.
        let dropped = match self.retain(&retention) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(disk = %self.name, error = %e, "retention failed: the points stay");
                0
            }
        };
        failpoint("retained");
        step("retention", &mut steps);
        tracing::info!(
            disk = %self.name,
            point = %point.change_id,
            seconds = started.elapsed().as_secs_f64(),
            steps = ?steps,
            "merged"
        );
        Ok(Ingested::Committed { point, dropped })
    }

    /// Step 2 of a merge: the undo file in `undo/` (the one written while the push was
    /// staged, moved in place, or written now), and the newest point's leaves it checked
    /// pre-images against. A first full has none.
    fn place_undo(
        &self,
        full: &dyn FileAt,
        staged_undo: Option<StagedUndo>,
        header: &DeltaHeader,
        touched: &[Extent],
        name: &str,
    ) -> Result<(Option<Leaves>, Option<String>)> {
        Ok(match (staged_undo, self.points().last().cloned()) {
            (_, None) => (self.base_leaves(full, header)?, None),
            (Some(staged), Some(_)) => {
                let rel = format!("undo/{name}.ctkd");
                self.fs
                    .rename(&self.dir.join(STAGED_UNDO), &self.dir.join(&rel))
                    .map_err(io_err("moving the undo in place"))?;
                self.sync_dir(&self.dir.join("undo"))?;
                (staged.base, Some(rel))
            }
            (None, Some(newest)) => {
                let base = self.base_leaves(full, header)?;
                let rel = format!("undo/{name}.ctkd");
                let base = self.write_undo(base, &newest, header, touched, &rel)?;
                (base, Some(rel))
            }
        })
    }

    /// The last steps of every merge, whichever way it came (a staged delta, a first full
    /// written in place, a merge finished after a crash): the point's leaves saved, then the
    /// manifest naming it replaced (the commit), then what no point names removed. With
    /// `failpoints`, the crash tests can abort between the steps.
    pub(super) fn commit_point(
        &mut self,
        mut point: Point,
        leaves: Option<Leaves>,
        header: &DeltaHeader,
        checked: Checked,
        how: Commit,
        failpoints: bool,
    ) -> Result<Point> {
        self.save_leaves(leaves, header, &mut point, checked)?;
        if failpoints {
            failpoint("leaves_saved");
        }
        let mut m = self.manifest.clone();
        match how {
            Commit::Onto => m.points.push(point.clone()),
            Commit::First => m.points = vec![point.clone()],
        }
        m.applying = None;
        self.write_manifest(m)?;
        if failpoints {
            failpoint("committed");
        }
        self.remove_orphans();
        Ok(point)
    }
}

/// Where a committed point goes in the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Commit {
    /// Onto the points there (a merge of an increment).
    Onto,
    /// As the only point (a first full into an empty store).
    First,
}
