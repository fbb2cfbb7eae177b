//! Resizing a protected disk while it is served: the tracker records the new size (durable)
//! before the backing changes, so a crash in between reports more than changed, never less.
//! Growing marks the new range changed for every earlier ChangeId (it reads as zeros, and
//! the receiver's replica must grow with it); the next push carries only the blocks written
//! since, the new range's unwritten blocks as zero records, and the receiver's next point
//! has the new size. A backing resized behind the agent's back (a `truncate` while it runs)
//! is noticed at the next cut and recorded the same way.

use std::io::{self, Seek, SeekFrom};
use std::sync::atomic::Ordering;

use super::{DiskError, ProtectedDisk};

/// What a resize did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resized {
    pub old_size: u64,
    pub new_size: u64,
}

impl ProtectedDisk {
    /// Resizes the disk to `new_size` bytes: the file is grown (sparse) or truncated. NBD
    /// clients see the new size when they reconnect; requests of open connections are checked
    /// against it. Refused for a block device (resize the device; the agent follows it at
    /// its next cut) and while an export runs.
    pub fn resize(&self, new_size: u64) -> Result<Resized, DiskError> {
        if new_size == 0 {
            return Err(DiskError::Resize(
                "a disk cannot be resized to 0 bytes".into(),
            ));
        }
        if self.is_block_device() {
            return Err(DiskError::Resize(format!(
                "{} is a block device: resize the device itself (an LV with lvresize, say); \
                 the agent records the new size at its next cut",
                self.path.display()
            )));
        }
        // No write in flight, none admitted until the size is settled.
        let _hold = self
            .gate
            .write()
            .map_err(|_| DiskError::Io(io::Error::other("gate poisoned")))?;
        if self
            .snapshot
            .lock()
            .map_err(|_| DiskError::Io(io::Error::other("snapshot lock poisoned")))?
            .is_some()
        {
            return Err(DiskError::Busy);
        }
        let old_size = self.size();
        if new_size == old_size {
            return Ok(Resized { old_size, new_size });
        }
        // The journal first: a crash before the file changes over-reports (the size the
        // journal names is then found smaller at the reopen: a new generation, a compare).
        self.with_tracker(|t| Ok(t.resize(new_size)?))?;
        self.file.set_len(new_size)?;
        self.file.sync_all()?;
        self.size.store(new_size, Ordering::Release);
        tracing::info!(disk = %self.name, old_size, new_size, "resized");
        Ok(Resized { old_size, new_size })
    }

    /// Records a size change made behind the agent's back (the file truncated or grown, the
    /// device resized), noticed at a cut: called with writes held, before the seal, so the
    /// cut's epoch and its export see the new size.
    pub(super) fn follow_backing_size(&self) -> Result<(), DiskError> {
        // An export in progress reads as of its cut, at its size: follow at a later cut.
        if self.snapshot.lock().map(|s| s.is_some()).unwrap_or(true) {
            return Ok(());
        }
        // A size of 0 is what a vanished device reports: not a size to follow.
        if !self.backing_size_changed()? {
            return Ok(());
        }
        let (known, actual) = (self.size(), (&self.file).seek(SeekFrom::End(0))?);
        tracing::warn!(
            disk = %self.name, known, actual,
            "the backing changed size behind the agent: recorded at this cut (resize through \
             `ctk-agent resize` instead)"
        );
        self.with_tracker(|t| Ok(t.resize(actual)?))?;
        self.size.store(actual, Ordering::Release);
        Ok(())
    }

    /// Whether the backing's size differs from the disk's (see `follow_backing_size`).
    pub(super) fn backing_size_changed(&self) -> Result<bool, DiskError> {
        let actual = (&self.file).seek(SeekFrom::End(0))?;
        Ok(actual != 0 && actual != self.size())
    }

    fn is_block_device(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.file
            .metadata()
            .is_ok_and(|m| m.file_type().is_block_device())
    }
}
