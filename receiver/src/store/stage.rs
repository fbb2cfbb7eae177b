//! Staging: a pushed delta written to `staging/` and verified whole (every CRC, the trailer)
//! before it may touch the replica.

use super::*;

/// What staging a delta found.
pub(super) enum Staged {
    /// A point already committed: acknowledged, nothing to merge.
    Already(ChangeId),
    /// Staged and verified in `staging/incoming.ctkd`.
    Delta {
        touched: Vec<Extent>,
        meta: PointMeta,
        /// The undo, when it was written as the delta arrived.
        undo: Option<StagedUndo>,
    },
}

/// The error of a push cut off: an I/O error on the way (the connection, or the store's
/// own disk: full, failing) is the store's I/O error, not damage in the delta.
pub(super) fn cut_off_error(e: DeltaError) -> StoreError {
    match e {
        DeltaError::Io(source) if source.kind() != io::ErrorKind::InvalidData => StoreError::Io {
            doing: "receiving and staging the delta".into(),
            source,
        },
        e => e.into(),
    }
}

/// Did the input end or fail part way (a push cut off), rather than carry bad bytes?
pub(super) fn is_cut_off(e: &DeltaError) -> bool {
    match e {
        DeltaError::Io(source) => source.kind() != io::ErrorKind::InvalidData,
        DeltaError::Truncated { .. } => true,
        _ => false,
    }
}

/// An input with bytes already read from it put back in front.
pub(super) type Replayed<R> = io::Chain<io::Cursor<Vec<u8>>, R>;

/// Reads a delta's header from `input` and gives it back with the input, the header's
/// bytes put in front again.
pub(super) fn peek_header<R: Read>(mut input: R) -> Result<(DeltaHeader, Replayed<R>)> {
    let mut head = Vec::new();
    let header = DeltaReader::new(Tee {
        input: &mut input,
        copy: &mut head,
    })?
    .header()
    .clone();
    Ok((header, io::Cursor::new(head).chain(input)))
}

/// Copies what a reader reads into a file as it goes.
pub(super) struct Tee<'a, R: Read, W: Write> {
    pub(super) input: R,
    pub(super) copy: &'a mut W,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

impl DiskStore {
    /// Stages a delta whole into `staging/incoming.ctkd`, durably, verifying every check
    /// while copying and collecting the ranges it writes (the undo needs them). When the
    /// input fails on the way and `keep_partial`, the complete records received are kept as
    /// the resume state.
    ///
    /// A resumed push (`keep_partial` false) is staged into `staging/resumed.ctkd` instead:
    /// it holds only the rest of a change, so what it received must never become a resume
    /// state of its own, as `incoming.ctkd` does when a restart finds it (`salvage_incoming`):
    /// salvaged, it would pass for every block below its checkpoint, and the next resume
    /// would lose the blocks the first part had carried.
    pub(super) fn stage<R: Read>(
        &mut self,
        input: Replayed<R>,
        end: impl FnOnce(R) -> Result<PointMeta>,
        keep_partial: bool,
    ) -> Result<Staged> {
        let staged = self.stage_inner(input, end, keep_partial);
        // Whatever failed (a cut-off or damaged push, a bad pre-image read, a full disk), the
        // undo written so far is of no use: its space goes back now, not at the next commit.
        if staged.is_err() {
            self.remove(&self.dir.join(STAGED_UNDO));
        }
        staged
    }

    pub(super) fn stage_inner<R: Read>(
        &mut self,
        input: Replayed<R>,
        end: impl FnOnce(R) -> Result<PointMeta>,
        keep_partial: bool,
    ) -> Result<Staged> {
        let name = if keep_partial {
            "incoming.ctkd"
        } else {
            "resumed.ctkd"
        };
        let staging = self.dir.join("staging").join(name);
        let mut touched: Vec<Extent> = Vec::new();
        let mut w = self.writer(&staging, "creating the staged delta")?;
        let mut tee = Tee {
            input,
            copy: &mut w,
        };
        let mut cut_off = None;
        let mut checkpoint = None;
        let mut undo = None;
        let header = {
            let mut reader = DeltaReader::new(&mut tee)?;
            if keep_partial {
                undo = self.start_undo(reader.header())?;
            }
            loop {
                let (offset, length) = match reader.next_record() {
                    Ok(Some(DeltaRecord::Data { offset, data })) => (offset, data.len() as u64),
                    Ok(Some(DeltaRecord::Zero { offset, length })) => (offset, length),
                    Ok(None) => break,
                    // The input ended or failed part way: a push cut off.
                    Err(e) if is_cut_off(&e) => {
                        cut_off = Some(e);
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                match touched.last_mut() {
                    Some(last) if last.end() == offset => last.length += length,
                    _ => touched.push(Extent::new(offset, length)),
                }
                if let Some(u) = undo.as_mut() {
                    u.add(offset, length)?;
                }
                checkpoint = Some(reader.checkpoint());
            }
            reader.header().clone()
        };
        if let Some(e) = cut_off {
            drop(tee);
            drop(undo);
            // Gone before the resume state appears (`stage` would remove it after): whoever
            // sees a resume state sees no stale undo beside it.
            self.remove(&self.dir.join(STAGED_UNDO));
            if keep_partial
                && let Some(cp) = checkpoint
                && self.check_fits(&header).is_ok()
                && let Err(k) = w
                    .into_inner()
                    .map_err(|e| io_err("staging")(e.into_error()))
                    .and_then(|f| self.keep_staged_partial(f.file, &staging, &header, &cp))
            {
                tracing::warn!(disk = %self.name, error = %k, "could not keep the received part");
            }
            return Err(cut_off_error(e));
        }
        // Nothing may follow the trailer.
        let mut extra = [0u8; 1];
        if tee
            .input
            .read(&mut extra)
            .map_err(io_err("reading the delta"))?
            != 0
        {
            return Err(StoreError::Mismatch(
                "bytes after the delta's trailer".into(),
            ));
        }
        let meta = end(tee.input.into_inner().1)?;
        // The undo's last reads and its fsync run while the staged delta is synced.
        if let Some(u) = undo.as_mut() {
            u.end();
        }
        if let Err(e) = finish_file(w, "syncing the staged delta") {
            // A file whose fsync failed is never trusted again (after a writeback error Linux
            // may drop the pages while reads still return them): not even as a resume state.
            self.remove(&staging);
            return Err(e);
        }
        let undo = match undo {
            None => None,
            Some(u) => Some(StagedUndo { base: u.join()? }),
        };
        self.check_fits(&header)?;
        if self.points().iter().any(|p| p.change_id == header.to) {
            self.remove(&staging);
            self.remove(&self.dir.join(STAGED_UNDO));
            return Ok(Staged::Already(header.to));
        }
        Ok(Staged::Delta {
            touched,
            meta,
            undo,
        })
    }

    /// The pre-images are read and written while the push arrives (the ranges come in
    /// order), instead of in a pass of their own after it: the merge's longest step after
    /// the apply. Not for a first full (nothing to undo) nor a resumed push (its delta is only
    /// the rest of the change; the composed one is undone after, in `merge_staged`), nor
    /// one that does not fit.
    fn start_undo(&self, header: &DeltaHeader) -> Result<Option<UndoThread>> {
        let Some(newest) = self.points().last() else {
            return Ok(None);
        };
        if self.check_fits(header).is_err() {
            return Ok(None);
        }
        let full = self.full()?;
        let base = self.base_leaves(&full, header)?;
        let path = self.dir.join(STAGED_UNDO);
        Ok(Some(UndoThread::spawn(UndoWriter::create(
            self, full, base, newest, header, &path,
        )?)?))
    }
}
