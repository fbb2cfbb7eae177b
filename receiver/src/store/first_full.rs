//! A first full into an empty store: written into full.img as it arrives (no staging: there is
//! no earlier point to protect); any failure empties the store again.

use super::*;

impl DiskStore {
    /// Can this filesystem hold an image of `disk_size` bytes? Probed on a scratch file,
    /// before anything is recorded: a size it cannot hold would otherwise fail the apply
    /// after "applying" is written, and every reopen would retry it and fail again.
    pub(super) fn probe_size(&self, disk_size: u64) -> Result<()> {
        let probe = self.dir.join("staging").join("size-probe");
        let fits = self.fs.create(&probe).and_then(|f| f.set_len(disk_size));
        self.remove(&probe);
        fits.map_err(|e| {
            StoreError::Mismatch(format!(
                "the delta's disk size {disk_size} cannot be stored here: {e}"
            ))
        })
    }

    /// A first full into an empty store, written into full.img as it arrives: no staged
    /// copy, no second decode. There is no earlier point to protect, so the merge is
    /// recorded ("applying", direct) before the first byte lands, and anything that fails
    /// (a check of the delta, the trailer, the digest, a crash) empties the store again.
    /// The leaves are computed from the data as it is written rather than read back: the
    /// digest check covers the agent, the transport and this merge; `verify` and every
    /// restore read the image back.
    pub(super) fn ingest_first_full<R: Read>(
        &mut self,
        header: DeltaHeader,
        input: Replayed<R>,
        end: impl FnOnce(R) -> Result<PointMeta>,
        resume: Option<Partial>,
    ) -> Result<Ingested> {
        let started = std::time::Instant::now();
        let full = self.full()?;
        match &resume {
            None => {
                self.check_fits(&header)?;
                self.probe_size(header.disk_size)?;
                // Whatever an earlier cut-off full left in full.img goes now.
                self.drop_partial();
                full.set_len(0)
                    .and_then(|()| full.set_len(header.disk_size))
                    .map_err(io_err("sizing full.img"))?;
            }
            // Resumed: full.img holds the received part, at the disk's size.
            Some(_) => {
                let len = full.len().map_err(io_err("reading a size"))?;
                if len != header.disk_size {
                    self.drop_partial();
                    return Err(StoreError::Mismatch(format!(
                        "full.img is {len} bytes, not the {} the resumed full needs: push from the start",
                        header.disk_size
                    )));
                }
            }
        }
        let mut m = self.manifest.clone();
        m.block_size = Some(header.block_size);
        m.applying = Some(Applying::Direct {
            change_id: header.to,
            meta: PointMeta::default(),
        });
        self.write_manifest(m)?;
        failpoint("applying_recorded");
        let mut reached = None;
        match self.first_full_inner(&full, &header, input, end, resume.is_some(), &mut reached) {
            Ok(point) => {
                self.drop_partial();
                tracing::info!(
                    disk = %self.name,
                    point = %point.change_id,
                    seconds = started.elapsed().as_secs_f64(),
                    resumed = resume.is_some(),
                    "first full written in place"
                );
                Ok(Ingested::Committed { point, dropped: 0 })
            }
            // Cut off on the way: full.img holds every record below `reached` as of this
            // cut, which is kept as the resume state (unless an earlier one reached further:
            // what this one wrote below it is newer and changed since it, so a resume from
            // it sends those blocks again anyway).
            Err(e) if reached.is_some() => {
                let reached = reached.unwrap_or(0);
                full.sync().map_err(io_err("syncing full.img"))?;
                let mut m = self.manifest.clone();
                m.applying = None;
                self.write_manifest(m)?;
                if resume.as_ref().is_none_or(|p| reached > p.next_offset) {
                    self.save_partial(&Partial {
                        from: None,
                        to: header.to,
                        next_offset: reached,
                        disk_size: header.disk_size,
                        block_size: header.block_size,
                        direct: true,
                    })?;
                    tracing::info!(
                        disk = %self.name, to = %header.to, next_offset = reached,
                        "a first full was cut off: the received part is kept for a resume"
                    );
                }
                Err(e)
            }
            Err(e) => {
                if let Some(applying) = self.manifest.applying.clone() {
                    self.roll_back(&full, &applying)?;
                }
                self.drop_partial();
                Err(e)
            }
        }
    }

    /// Writes a first full's records into full.img as they arrive. Cut off (the input
    /// failed) after at least one record, it sets `reached` to the disk offset every record
    /// below which was written. A `resumed` full has records of an earlier push already in
    /// full.img, so its leaves are read back whole instead of computed from the data.
    pub(super) fn first_full_inner<R: Read>(
        &mut self,
        full: &dyn FileAt,
        header: &DeltaHeader,
        mut input: Replayed<R>,
        end: impl FnOnce(R) -> Result<PointMeta>,
        resumed: bool,
        reached: &mut Option<u64>,
    ) -> Result<Point> {
        let mut leaves = if resumed {
            None
        } else {
            Leaves::zeroed(header.disk_size, header.block_size).ok()
        };
        // Past the page cache where the filesystem allows (see `write_behind`); on any early
        // return it is dropped, which waits for its queued writes. A fresh full.img is one
        // hole; a resumed one holds the received part between this push's records.
        let direct = self
            .fs
            .open_direct(&self.full_path())
            .map_err(io_err("opening full.img for direct writes"))?;
        let mut out = WriteBehind::new(full, direct, !resumed);
        let mut reader = DeltaReader::new(&mut input)?;
        loop {
            let record = match reader.next_record() {
                Ok(Some(record)) => record,
                Ok(None) => break,
                // The input ended or failed part way: a push cut off.
                Err(e) if is_cut_off(&e) => {
                    let at = reader.checkpoint().next_offset;
                    // Every record below `at` must be in the file before the caller syncs
                    // it as the resume state; if one failed to land, this is no cut-off.
                    out.finish().map_err(io_err("writing full.img"))?;
                    if at > 0 {
                        *reached = Some(at);
                    }
                    return Err(cut_off_error(e));
                }
                Err(e) => return Err(e.into()),
            };
            match record {
                DeltaRecord::Data { offset, data } => {
                    out.write(offset, data)
                        .map_err(io_err("writing full.img"))?;
                    if let Some(l) = leaves.as_mut() {
                        let _ = l.set_data(offset, data);
                    }
                }
                // A fresh image starts as one hole: zeros need nothing written. A resumed
                // one may hold the received part's data there.
                DeltaRecord::Zero { offset, length } => {
                    if resumed {
                        zero_range(full, offset, length)?;
                    }
                    if let Some(l) = leaves.as_mut() {
                        let _ = l.set_zero(offset, length);
                    }
                }
            }
        }
        out.finish().map_err(io_err("writing full.img"))?;
        let delta_bytes = reader.summary().stream_bytes;
        drop(reader);
        let mut extra = [0u8; 1];
        if input
            .read(&mut extra)
            .map_err(io_err("reading the delta"))?
            != 0
        {
            return Err(StoreError::Mismatch(
                "bytes after the delta's trailer".into(),
            ));
        }
        let meta = end(input.into_inner().1)?;
        full.sync().map_err(io_err("syncing full.img"))?;
        failpoint("applied");
        if resumed {
            leaves = Leaves::of_image(full, header.disk_size, header.block_size).ok();
        }
        let checked = self.check_digest(leaves.as_ref(), &meta)?;
        let point = Point {
            change_id: header.to,
            from: None,
            disk_size: header.disk_size,
            committed_unix_ms: (self.clock)(),
            undo: None,
            delta_bytes,
            cut_unix_ms: meta.cut_unix_ms,
            consistency: meta.consistency,
            image_digest: None,
            digest_checked: false,
            tested: None,
        };
        self.commit_point(point, leaves, header, checked, Commit::First, true)
    }

    /// Refuses a delta that does not continue this store's newest point.
    pub(super) fn check_fits(&self, h: &DeltaHeader) -> Result<()> {
        if h.disk_id != self.name {
            return Err(StoreError::Mismatch(format!(
                "delta is of disk {:?}, this store holds {:?}",
                h.disk_id, self.name
            )));
        }
        if let Some(bs) = self.manifest.block_size
            && bs != h.block_size
        {
            return Err(StoreError::Mismatch(format!(
                "delta has {}-byte blocks, the store {bs}",
                h.block_size
            )));
        }
        if self.points().iter().any(|p| p.change_id == h.to) {
            return Ok(()); // a re-delivery: acknowledged by the caller
        }
        match (self.points().last(), h.from) {
            (None, None) => Ok(()),
            (None, Some(from)) => Err(StoreError::Mismatch(format!(
                "the store is empty: it needs a full first, not an increment from {from}"
            ))),
            (Some(newest), None) => Err(StoreError::Mismatch(format!(
                "the store already holds points up to {}; a new full needs resync (not built yet) or a new store",
                newest.change_id
            ))),
            (Some(newest), Some(from)) if from != newest.change_id => {
                Err(StoreError::Mismatch(format!(
                    "delta starts at {from}, the newest point is {}",
                    newest.change_id
                )))
            }
            _ => Ok(()),
        }
    }
}
