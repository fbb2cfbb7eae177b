//! Resuming cut-off pushes: what was received of a push kept as a complete delta (`Partial`),
//! and the rest composed under it.

use super::*;

/// What was received of a push that was cut off (the connection dropped, the agent was
/// killed): every record below `next_offset`, checked, kept so that the agent can resume
/// from there (`DiskStore::ingest_resume`) instead of sending it all again. Valid only while
/// `from` is the store's newest point (none: an empty store); anything committed drops it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Partial {
    /// The point the push started from (none: a first full).
    pub from: Option<ChangeId>,
    /// The cut the push was of.
    pub to: ChangeId,
    /// Every record of the push below this disk offset was received.
    pub next_offset: u64,
    pub disk_size: u64,
    pub block_size: u32,
    /// A first full: the records are in full.img; else in `staging/partial.ctkd` (a
    /// complete delta: the records received and a trailer made for them).
    pub direct: bool,
}

impl Partial {
    /// What the agent is told of it (`Response::Resume`).
    pub fn state(&self) -> ctk::wire::ResumeState {
        ctk::wire::ResumeState {
            from: self.from,
            to: self.to,
            disk_size: self.disk_size,
            next_offset: self.next_offset,
        }
    }
}

pub(super) const PARTIAL_JSON: &str = "staging/partial.json";

pub(super) const PARTIAL_DELTA: &str = "staging/partial.ctkd";

/// Longest resume state read back.
pub(super) const PARTIAL_LEN_MAX: u64 = 64 << 10;

impl DiskStore {
    /// The resume state a cut-off push left, if it still continues the newest point.
    pub fn partial(&self) -> Option<Partial> {
        let f = self.fs.open(&self.dir.join(PARTIAL_JSON)).ok()?;
        let mut text = String::new();
        vfs::Cursor::new(f)
            .take(PARTIAL_LEN_MAX)
            .read_to_string(&mut text)
            .ok()?;
        let p: Partial = serde_json::from_str(&text).ok()?;
        let newest = self.points().last().map(|n| n.change_id);
        // The kept delta's record heads and trailer must read back, and a first full's
        // records must still be in a full.img of the disk's size (a rolled-back resume
        // empties it): a resume state that does not fit is refused when used, and offering
        // it costs the agent a push.
        let usable = p.from == newest
            && self.manifest.applying.is_none()
            && if p.direct {
                self.fs
                    .open(&self.full_path())
                    .and_then(|f| f.len())
                    .is_ok_and(|len| len == p.disk_size)
            } else {
                self.fs
                    .open(&self.dir.join(PARTIAL_DELTA))
                    .ok()
                    .is_some_and(|f| DeltaFile::open(f).is_ok())
            };
        usable.then_some(p)
    }

    pub(super) fn save_partial(&self, p: &Partial) -> Result<()> {
        let text = serde_json::to_vec(p).expect("a resume state serialises");
        self.replace_file(
            &self.dir.join("staging").join("partial.json.tmp"),
            &self.dir.join(PARTIAL_JSON),
            &text,
            "writing the resume state",
        )?;
        self.sync_dir(&self.dir.join("staging"))
    }

    /// A receiver stopped while staging a push (killed, or the machine went down) left
    /// `staging/incoming.ctkd`: its whole records, each checked against its CRC again here,
    /// become the resume state, as for a push cut off. (A first full written in place
    /// cannot be salvaged: how far it got is not recorded, and the store is emptied.)
    pub(super) fn salvage_incoming(&self) {
        let path = self.dir.join("staging").join("incoming.ctkd");
        if self.manifest.applying.is_some() || !self.fs.exists(&path) {
            return;
        }
        let salvage = || -> Result<bool> {
            let mut reader = DeltaReader::new(self.reader(&path, "opening a staged delta")?)?;
            let header = reader.header().clone();
            if self.check_fits(&header).is_err() {
                return Ok(false);
            }
            let mut checkpoint = None;
            while let Ok(Some(_)) = reader.next_record() {
                checkpoint = Some(reader.checkpoint());
            }
            let Some(cp) = checkpoint else {
                return Ok(false);
            };
            drop(reader);
            let f = self
                .fs
                .open_rw(&path)
                .map_err(io_err("opening a staged delta"))?;
            self.keep_staged_partial(f, &path, &header, &cp)?;
            Ok(true)
        };
        match salvage() {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(disk = %self.name, "a staged push from before a restart holds nothing to resume from")
            }
            Err(e) => {
                tracing::warn!(disk = %self.name, error = %e, "could not keep a staged push from before a restart")
            }
        }
    }

    pub(super) fn drop_partial(&self) {
        self.remove(&self.dir.join(PARTIAL_JSON));
        self.remove(&self.dir.join(PARTIAL_DELTA));
    }

    /// Keeps the records received of a staged push cut off after checkpoint `cp`: the
    /// staged bytes are cut there and ended with a trailer made for them, which makes them a
    /// complete delta of the received part, then recorded as the resume state.
    pub(super) fn keep_staged_partial(
        &self,
        f: Box<dyn FileAt>,
        staging: &Path,
        header: &DeltaHeader,
        cp: &delta::Checkpoint,
    ) -> Result<()> {
        if let Err(e) = f
            .set_len(cp.position)
            .and_then(|()| f.write_all_at(&cp.trailer(), cp.position))
            .and_then(|()| f.sync())
        {
            // Not kept after a failed fsync (see `stage`).
            self.remove(staging);
            return Err(io_err("keeping the received part")(e));
        }
        self.drop_partial();
        self.fs
            .rename(staging, &self.dir.join(PARTIAL_DELTA))
            .map_err(io_err("keeping the received part"))?;
        self.save_partial(&Partial {
            from: header.from,
            to: header.to,
            next_offset: cp.next_offset,
            disk_size: header.disk_size,
            block_size: header.block_size,
            direct: false,
        })?;
        tracing::info!(
            disk = %self.name, to = %header.to, next_offset = cp.next_offset,
            "a push was cut off: the received part is kept for a resume"
        );
        Ok(())
    }

    /// Merges a push that resumes the cut-off push `resumes` from disk offset `next_offset`
    /// (both as `partial` reported them). The resumed push is a delta from the same point
    /// to a later cut of the same journal, carrying the blocks changed since that point at
    /// or after `next_offset` and those changed since the cut-off push's cut below it; with
    /// the received part underneath, that is the whole change. A resume that does not
    /// match the resume state here is refused (`Mismatch`) before anything is merged.
    pub fn ingest_resume<R: Read>(
        &mut self,
        input: R,
        resumes: ChangeId,
        next_offset: u64,
        retention: impl Into<Retention>,
        end: impl FnOnce(R) -> Result<PointMeta>,
    ) -> Result<Ingested> {
        let started = std::time::Instant::now();
        self.check_not_fenced()?;
        let p = self.partial().ok_or_else(|| {
            StoreError::Mismatch(
                "no resume state here (a newer point was committed, or it was used): push \
                 from the start"
                    .into(),
            )
        })?;
        if p.to != resumes || p.next_offset != next_offset {
            return Err(StoreError::Mismatch(format!(
                "the resume state here is of {} at offset {}; the push resumes {resumes} at \
                 {next_offset}",
                p.to, p.next_offset
            )));
        }
        let (header, input) = peek_header(input)?;
        self.check_fits(&header)?;
        let prior = p.to;
        let fits = header.from == p.from
            && header.disk_size == p.disk_size
            && header.block_size == p.block_size
            && header.to.generation == prior.generation
            && header.to.seq > prior.seq;
        if !fits {
            return Err(StoreError::Mismatch(format!(
                "the resumed delta ({:?} -> {}, {} bytes) does not continue the resume state \
                 ({:?} -> {}, {} bytes): it must start where that did and be a later cut of \
                 the same journal",
                header.from, header.to, header.disk_size, p.from, p.to, p.disk_size
            )));
        }
        if p.direct {
            return self.ingest_first_full(header, input, end, Some(p));
        }
        let (touched, meta) = match self.stage(input, end, false)? {
            Staged::Already(change_id) => return Ok(Ingested::AlreadyCommitted { change_id }),
            Staged::Delta { meta, .. } => {
                // The received part underneath the resumed delta: one delta of the whole
                // change (where both hold a block, the resumed one's is newer).
                let resumed = self.dir.join("staging").join("resumed.ctkd");
                let incoming = self.dir.join("staging").join("incoming.ctkd");
                let composed = self.dir.join("staging").join("composed.ctkd");
                let sources = [resumed.clone(), self.dir.join(PARTIAL_DELTA)];
                let touched = match self.compose(&sources, &header, &composed) {
                    Ok(t) => t,
                    Err(e) => {
                        // A resume state that does not read back whole is dropped, so the
                        // next push starts from the beginning instead of failing the same
                        // way forever.
                        if matches!(e, StoreError::Delta(_)) {
                            tracing::warn!(disk = %self.name, error = %e, "the resume state is damaged: dropping it");
                            self.drop_partial();
                        }
                        return Err(e);
                    }
                };
                // The composed delta is the whole change: from here it may be salvaged.
                self.fs
                    .rename(&composed, &incoming)
                    .map_err(io_err("staging"))?;
                self.remove(&resumed);
                // Its records are in the composed delta now; its space is needed for the
                // undo. (Should this merge fail, the next push starts from the beginning.)
                self.drop_partial();
                (touched, meta)
            }
        };
        tracing::info!(disk = %self.name, to = %header.to, resumed_at = next_offset, "resuming a push");
        let incoming = self.dir.join("staging").join("incoming.ctkd");
        self.merge_staged(&incoming, touched, meta, None, retention.into(), started)
    }

    /// Writes to `out` (synced) one delta with `header` made of the records of the delta
    /// files `sources`, clipped to the header's disk size; where several hold a byte, the
    /// first source that does wins. Returns the ranges it writes, merged.
    pub(super) fn compose(
        &self,
        sources: &[PathBuf],
        header: &DeltaHeader,
        out: &Path,
    ) -> Result<Vec<Extent>> {
        let mut files = Vec::with_capacity(sources.len());
        for path in sources {
            files.push(DeltaFile::open(
                self.open_file(path, "opening a delta to compose")?,
            )?);
        }
        let size = header.disk_size;
        // Which file and record each byte range comes from.
        let mut covered = Covered::default();
        let mut pieces: Vec<(u64, u64, usize, usize)> = Vec::new();
        for (fi, f) in files.iter().enumerate() {
            for (ri, r) in f.records().iter().enumerate() {
                for (start, end) in covered.claim(r.offset, r.end().min(size)) {
                    pieces.push((start, end, fi, ri));
                }
            }
        }
        pieces.sort_unstable_by_key(|p| p.0);
        let file = self.writer(out, "creating a composed delta")?;
        let mut w = delta::DeltaWriter::new(
            file,
            header,
            WriteOptions {
                zstd_level: Some(1),
            },
        )?;
        let mut touched: Vec<Extent> = Vec::new();
        for (start, end, fi, ri) in pieces {
            let r = files[fi].records()[ri];
            if r.zero {
                w.write_zero(start, end - start)?;
            } else {
                let data = files[fi].read(&r)?;
                w.write_extent(
                    start,
                    &data[(start - r.offset) as usize..(end - r.offset) as usize],
                )?;
            }
            match touched.last_mut() {
                Some(last) if last.end() == start => last.length = end - last.offset,
                _ => touched.push(Extent::new(start, end - start)),
            }
        }
        let (file, _) = w.finish()?;
        finish_file(file, "writing a composed delta")?;
        Ok(touched)
    }
}
