//! The undo of a merge: the pre-images its delta overwrites, written as the delta is staged (on
//! a thread of its own), in the delta format.

use super::*;

/// An undo written (and synced) while its delta was staged, in `staging/undo.ctkd`, with the
/// newest point's leaves it was checked against (the merge needs them again).
pub(super) struct StagedUndo {
    pub(super) base: Option<Leaves>,
}

pub(super) const STAGED_UNDO: &str = "staging/undo.ctkd";

pub(super) type FileWriter = BufWriter<vfs::Cursor<Box<dyn FileAt>>>;

/// The pre-images of a merge, written as the ranges it will overwrite come, in ascending
/// order: while the delta is staged, or from its ranges after. The undo names the same pair
/// as the merge (previous point -> this one), since the format orders from before to; its
/// size is the previous point's, which applying it restores.
pub(super) struct UndoWriter {
    pub(super) full: Box<dyn FileAt>,
    /// The newest point's leaves, each pre-image is checked against.
    pub(super) leaves: Option<Leaves>,
    pub(super) old_size: u64,
    /// Where the ranges of records stop being taken: the old size, or for a shrink the
    /// start of the block the new end falls in (from there the whole tail is taken at the
    /// end, so no range ends inside a block).
    pub(super) limit: u64,
    pub(super) writer: DeltaWriter<FileWriter>,
    pub(super) buf: Vec<u8>,
    /// Pre-images are written up to here (two ranges can share a block's edge).
    pub(super) done: u64,
    /// Ranges added but not yet read, oldest first, and their bytes: each is hinted to the
    /// kernel when added and read once [`UNDO_AHEAD`] bytes (or [`UNDO_AHEAD_RANGES`]
    /// ranges) are queued behind it, so the disk fetches many at once instead of one cold
    /// read at a time while the push waits.
    pub(super) pending: std::collections::VecDeque<(u64, u64)>,
    pub(super) pending_bytes: u64,
}

/// How far the undo's reads of pre-images trail the ranges they were hinted for.
pub(super) const UNDO_AHEAD: u64 = 8 << 20;

pub(super) const UNDO_AHEAD_RANGES: usize = 1024;

impl UndoWriter {
    pub(super) fn create(
        store: &DiskStore,
        full: Box<dyn FileAt>,
        leaves: Option<Leaves>,
        newest: &Point,
        header: &DeltaHeader,
        path: &Path,
    ) -> Result<UndoWriter> {
        let from = newest.change_id;
        let undo_header = DeltaHeader {
            disk_id: store.name.clone(),
            disk_size: newest.disk_size,
            block_size: header.block_size,
            from: Some(from),
            to: header.to,
        };
        let out = store.writer(path, "creating the undo")?;
        let options = WriteOptions {
            zstd_level: Some(1),
        };
        let new_size = header.disk_size;
        let limit = if new_size < newest.disk_size {
            new_size - new_size % header.block_size as u64
        } else {
            newest.disk_size
        };
        Ok(UndoWriter {
            full,
            leaves,
            old_size: newest.disk_size,
            limit,
            writer: DeltaWriter::new(out, &undo_header, options)?,
            buf: Vec::new(),
            done: 0,
            pending: std::collections::VecDeque::new(),
            pending_bytes: 0,
        })
    }

    /// Adds the pre-image of `[offset, offset + length)` (the part inside the old size and
    /// not already added). Read a little later, in order: see `pending`.
    pub(super) fn add(&mut self, offset: u64, length: u64) -> Result<()> {
        let end = offset.saturating_add(length).min(self.limit);
        if offset >= end {
            return Ok(());
        }
        // Ranges come in the delta's order (the reader enforces it; the pre-images are
        // written in that order).
        debug_assert!(
            self.pending.back().is_none_or(|&(_, e)| e <= offset),
            "undo ranges out of order at {offset}"
        );
        // A long range (a large zero record) is hinted only as far as the queue reaches:
        // the rest is read in its turn, with the kernel's own read-ahead.
        self.full.will_need(offset, (end - offset).min(UNDO_AHEAD));
        self.pending.push_back((offset, end));
        self.pending_bytes += end - offset;
        while self.pending_bytes > UNDO_AHEAD || self.pending.len() > UNDO_AHEAD_RANGES {
            self.take_oldest()?;
        }
        Ok(())
    }

    pub(super) fn take_oldest(&mut self) -> Result<()> {
        if let Some((offset, end)) = self.pending.pop_front() {
            self.pending_bytes -= end - offset;
            self.take(offset, end)?;
        }
        Ok(())
    }

    pub(super) fn take(&mut self, offset: u64, end: u64) -> Result<()> {
        let start = offset.max(self.done);
        if start >= end {
            return Ok(());
        }
        let (full, leaves) = (&self.full, self.leaves.as_ref());
        // Each pre-image is checked against the newest point's block digests as it is read:
        // an undo is only read back when a restore needs it, by then too late to fetch the
        // bytes again, so a bad read (a flipped bit, a misdirected read) must be caught here.
        // A transient one is read again; one that persists refuses the merge before
        // anything is recorded.
        let read = |offset: u64, buf: &mut [u8]| -> io::Result<()> {
            for _ in 0..READ_ATTEMPTS {
                full.read_exact_at(buf, offset)?;
                if leaves.is_none_or(|l| l.matches(offset, buf)) {
                    return Ok(());
                }
            }
            Err(io::Error::other(format!(
                "full.img at offset {offset} does not read back as the newest point's block \
                 digests say, {READ_ATTEMPTS} times (bad reads or rot: run verify)"
            )))
        };
        self.writer
            .write_read(Extent::new(start, end - start), &mut self.buf, read)?;
        self.done = end;
        Ok(())
    }

    /// Adds the tail a shrink cuts (from the block the new end falls in) and ends the undo;
    /// returns its writer (not yet synced) and the leaves.
    pub(super) fn finish(mut self) -> Result<(FileWriter, Option<Leaves>)> {
        while !self.pending.is_empty() {
            self.take_oldest()?;
        }
        self.take(self.limit, self.old_size)?;
        let (w, _) = self.writer.finish()?;
        Ok((w, self.leaves))
    }
}

/// An [`UndoWriter`] on a thread of its own, fed the ranges of a push as they are staged:
/// reading the pre-images (cold: full.img was mostly written past the page cache), checking
/// their leaves and compressing them is work of the order of the staging itself, and on the
/// staging's thread it would add to it.
pub(super) struct UndoThread {
    pub(super) ranges: Option<std::sync::mpsc::SyncSender<UndoMsg>>,
    pub(super) thread: Option<std::thread::JoinHandle<Result<Option<Leaves>>>>,
}

pub(super) enum UndoMsg {
    Range(u64, u64),
    /// The push is whole: write the rest and sync. (A channel closed without it is a push
    /// abandoned: the thread stops and the caller removes the file.)
    End,
}

impl UndoThread {
    pub(super) fn spawn(mut undo: UndoWriter) -> Result<UndoThread> {
        // Bounded: a push of many small records waits for the undo rather than queueing.
        let (tx, rx) = std::sync::mpsc::sync_channel(UNDO_AHEAD_RANGES);
        let thread = std::thread::Builder::new()
            .name("ctk-undo".into())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        UndoMsg::Range(offset, length) => undo.add(offset, length)?,
                        UndoMsg::End => {
                            let (w, leaves) = undo.finish()?;
                            finish_file(w, "writing the undo")?;
                            return Ok(leaves);
                        }
                    }
                }
                Err(io_err("writing the undo")(io::Error::other(
                    "the push was abandoned",
                )))
            })
            .map_err(io_err("starting the undo's thread"))?;
        Ok(UndoThread {
            ranges: Some(tx),
            thread: Some(thread),
        })
    }

    /// Adds the pre-image of `[offset, offset + length)`; an error of the undo's (a bad
    /// read, a full disk) is returned here as soon as it is known.
    pub(super) fn add(&mut self, offset: u64, length: u64) -> Result<()> {
        let sent = match &self.ranges {
            Some(tx) => tx.send(UndoMsg::Range(offset, length)).is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The thread stopped: its error says why.
        self.ranges = None;
        match self.wait() {
            Err(e) => Err(e),
            Ok(_) => Err(io_err("writing the undo")(io::Error::other(
                "the undo ended early",
            ))),
        }
    }

    /// The push is whole: the undo finishes and syncs on its thread.
    pub(super) fn end(&mut self) {
        if let Some(tx) = self.ranges.take() {
            // A thread already stopped reports its error at `join`.
            let _ = tx.send(UndoMsg::End);
        }
    }

    /// Waits for the undo to be written and synced; returns the newest point's leaves.
    pub(super) fn join(mut self) -> Result<Option<Leaves>> {
        self.end();
        self.wait()
    }

    pub(super) fn wait(&mut self) -> Result<Option<Leaves>> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            None => Err(io_err("writing the undo")(io::Error::other(
                "the undo's thread was already joined",
            ))),
        }
    }
}

impl Drop for UndoThread {
    /// An abandoned push: the thread is stopped and waited for, so the caller may remove the
    /// file it wrote.
    fn drop(&mut self) {
        self.ranges = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl DiskStore {
    /// Writes, durably, the pre-images of everything the staged delta will overwrite: the
    /// ranges of its records inside the current size, and the tail a shrink would cut.
    /// Takes the newest point's leaves to check them against and gives them back.
    pub(super) fn write_undo(
        &self,
        base: Option<Leaves>,
        newest: &Point,
        header: &DeltaHeader,
        touched: &[Extent],
        rel: &str,
    ) -> Result<Option<Leaves>> {
        let full = self.full()?;
        let mut undo = UndoWriter::create(self, full, base, newest, header, &self.dir.join(rel))?;
        for e in touched {
            undo.add(e.offset, e.length)?;
        }
        let (w, base) = undo.finish()?;
        finish_file(w, "writing the undo")?;
        self.sync_dir(&self.dir.join("undo"))?;
        Ok(base)
    }
}
