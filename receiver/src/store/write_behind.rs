//! A first full's writes into the synthetic full, past the page cache, on a thread of
//! their own.
//!
//! A first full writes most of a disk into `full.img`. Through the page cache that costs
//! the kernel a copy into pages it must first find, and the data reaches the disk only at the
//! final fsync, after the transfer. Written directly (`O_DIRECT`), it goes to the disk while
//! the rest still arrives, and a receiver holding many replicas keeps its page cache for
//! other work.
//!
//! Direct writes that allocate blocks are serialized by the filesystem (ext4 holds the
//! inode lock across an allocating direct write), so each should be large: the records of a
//! first full arrive in ascending order and are gathered into runs of up to [`RUN_MAX`];
//! into a file that is one hole (a fresh first full, not a resumed one, whose gaps hold the
//! received part), a gap between two records of at most [`GAP_FILL_MAX`] bytes is written
//! as the zeros it reads as rather than breaking the run, so `full.img` may hold such short
//! zero runs allocated where it would otherwise have had holes. Where the filesystem gives no direct handle (or `CTK_DIRECT_IO=off`, or
//! the simulation's `SimFs`), every write goes inline through the ordinary handle, as before.
//!
//! Durability is unchanged: nothing written here counts until the caller syncs the file,
//! and [`WriteBehind::finish`] (which waits for every queued write and reports the first
//! failure) must come before that sync.

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use ctk::vfs::{AlignedBuf, FileAt, direct_fits_range};

/// The longest run gathered into one direct write.
pub const RUN_MAX: usize = 4 << 20;
/// The longest gap between two records that a run bridges with zeros.
pub const GAP_FILL_MAX: u64 = 64 << 10;
/// Runs queued at most: with the one being written and the one being gathered, at most
/// `(DEPTH + 2) * RUN_MAX` bytes of buffers.
pub const DEPTH: usize = 4;

struct Job {
    offset: u64,
    buf: AlignedBuf,
    len: usize,
}

struct Behind {
    jobs: mpsc::SyncSender<Job>,
    free: mpsc::Receiver<AlignedBuf>,
    thread: JoinHandle<io::Result<()>>,
    /// The run being gathered: where it starts and its buffer (`len` bytes used).
    run: Option<(u64, AlignedBuf, usize)>,
}

/// Writes into one file: aligned records gathered into runs and written directly on a
/// thread, anything else inline.
pub struct WriteBehind<'a> {
    file: &'a dyn FileAt,
    behind: Option<Behind>,
    /// Whatever was not written reads as zeros: gaps may be bridged.
    bridge_gaps: bool,
}

impl<'a> WriteBehind<'a> {
    /// Writes into `file`, through `direct` (a direct handle on the same file) where given.
    /// `hole` says that every byte of `file` not written through this reads as zeros (a
    /// fresh image), so short gaps between writes may be filled with zeros.
    pub fn new(
        file: &'a dyn FileAt,
        direct: Option<Box<dyn FileAt>>,
        hole: bool,
    ) -> WriteBehind<'a> {
        let behind = direct.and_then(|direct| {
            let (jobs, queue) = mpsc::sync_channel::<Job>(DEPTH);
            let (done, free) = mpsc::channel();
            let spawned = std::thread::Builder::new()
                .name("ctk-write-behind".into())
                .spawn(move || {
                    for job in queue {
                        // The first failure ends the thread: `write` then finds the queue
                        // closed, and `finish` returns this error.
                        direct.write_all_at(&job.buf[..job.len], job.offset)?;
                        let _ = done.send(job.buf);
                    }
                    Ok(())
                });
            match spawned {
                Ok(thread) => Some(Behind {
                    jobs,
                    free,
                    thread,
                    run: None,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "no write-behind thread: writing through the page cache");
                    None
                }
            }
        });
        WriteBehind {
            file,
            behind,
            bridge_gaps: hole,
        }
    }

    /// Whether writes go past the page cache.
    #[cfg(test)]
    pub fn is_direct(&self) -> bool {
        self.behind.is_some()
    }

    /// Writes `data` at `offset`, which must not overlap an earlier write and must lie above
    /// every earlier write that was gathered (a first full's records do both). Aligned data
    /// joins the run being gathered (or starts one); anything else is written inline once
    /// every earlier write is done.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let Some(b) = self.behind.as_mut() else {
            return self.file.write_all_at(data, offset);
        };
        if !direct_fits_range(offset, data.len()) {
            self.drain()?;
            return self.file.write_all_at(data, offset);
        }
        let mut rest = data;
        let mut at = offset;
        while !rest.is_empty() {
            // Extend the run if this piece follows it closely enough, else send it off.
            let gap_max = if self.bridge_gaps { GAP_FILL_MAX } else { 0 };
            let joins = match &b.run {
                Some((start, _, len)) => {
                    let end = start + *len as u64;
                    at >= end && at - end <= gap_max && (at - start) < RUN_MAX as u64
                }
                None => false,
            };
            if !joins {
                if let Some(run) = b.run.take()
                    && Self::send(b, run).is_err()
                {
                    return self.drain();
                }
                let buf = b
                    .free
                    .try_recv()
                    .unwrap_or_else(|_| AlignedBuf::new(RUN_MAX));
                b.run = Some((at, buf, 0));
            }
            let (start, buf, len) = b.run.as_mut().expect("a run was started above");
            let from = (at - *start) as usize;
            // The gap since the run's end reads as zeros (the buffer is reused: zero it).
            buf[*len..from].fill(0);
            let n = rest.len().min(RUN_MAX - from);
            buf[from..from + n].copy_from_slice(&rest[..n]);
            *len = from + n;
            rest = &rest[n..];
            at += n as u64;
        }
        Ok(())
    }

    fn send(b: &Behind, (offset, buf, len): (u64, AlignedBuf, usize)) -> Result<(), ()> {
        b.jobs.send(Job { offset, buf, len }).map_err(|_| ())
    }

    /// Sends the run being gathered, waits for every queued write and returns the first
    /// failure. Later writes go inline.
    fn drain(&mut self) -> io::Result<()> {
        let Some(mut b) = self.behind.take() else {
            return Ok(());
        };
        if let Some(run) = b.run.take() {
            // A closed queue means the thread failed: its error is the one to report.
            let _ = Self::send(&b, run);
        }
        drop(b.jobs);
        b.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the write-behind thread panicked")))
    }

    /// Waits for every write; the first failure, if any. Sync the file after this.
    pub fn finish(mut self) -> io::Result<()> {
        self.drain()
    }
}

impl Drop for WriteBehind<'_> {
    fn drop(&mut self) {
        // Never leave a thread writing into a file the caller may be truncating or
        // removing: wait for it (its result goes unread here: an error is already on its
        // way up whenever this drops without `finish`).
        let _ = self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctk::vfs::{RealFs, SimFaults, SimFs, Vfs};
    use std::path::Path;

    fn pattern(offset: u64, len: usize, tag: u8) -> Vec<u8> {
        (0..len)
            .map(|i| ((offset as usize + i) / 512) as u8 ^ tag | 1)
            .collect()
    }

    /// Writes (offset, length) pieces of `tag`'s pattern through a WriteBehind on a real
    /// file (direct where the test machine's filesystem allows), and into `model`.
    fn write_all(path: &Path, hole: bool, pieces: &[(u64, usize)], model: &mut [u8], tag: u8) {
        let fs = RealFs;
        let file = fs.open_rw(path).unwrap();
        let direct = fs.open_direct(path).unwrap();
        assert!(
            direct.is_some(),
            "the test machine's filesystem takes O_DIRECT"
        );
        let mut out = WriteBehind::new(&*file, direct, hole);
        assert!(out.is_direct());
        for &(offset, len) in pieces {
            let data = pattern(offset, len, tag);
            out.write(offset, &data).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
        }
        out.finish().unwrap();
        file.sync().unwrap();
    }

    /// Pieces of every kind: adjacent, with short gaps (bridged in a hole), with long gaps,
    /// longer than a run, and an unaligned last piece.
    fn pieces(size: u64) -> Vec<(u64, usize)> {
        vec![
            (0, 4096),
            (4096, 8192),
            (16384 + 4096, 4096),
            (40960, 65536),
            (40960 + 65536 + GAP_FILL_MAX, 4096),
            (1 << 20, RUN_MAX + (3 << 20)),
            (
                (1 << 20) + RUN_MAX as u64 + (3 << 20) + GAP_FILL_MAX + 4096,
                12288,
            ),
        ]
        .into_iter()
        // Many runs with short gaps: buffers come back and are reused, and what a reused
        // buffer held before must not show through a gap.
        .chain((0..48u64).map(|i| ((32 << 20) + i * (256 << 10), (256 << 10) - 16384)))
        .chain([(size - 1000, 1000)])
        .collect()
    }

    #[test]
    fn a_fresh_image_gets_every_piece_and_zeros_between() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.img");
        let size = 48u64 << 20;
        RealFs.create(&path).unwrap().set_len(size).unwrap();
        let mut model = vec![0u8; size as usize];
        write_all(&path, true, &pieces(size), &mut model, 0x11);
        assert!(std::fs::read(&path).unwrap() == model, "the image differs");
    }

    /// A resumed full: what lies between this push's pieces is the received part and must
    /// stay as it is (no gap is bridged with zeros).
    #[test]
    fn gaps_of_an_image_with_data_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.img");
        let size = 48u64 << 20;
        let mut model = pattern(0, size as usize, 0x77);
        std::fs::write(&path, &model).unwrap();
        write_all(&path, false, &pieces(size), &mut model, 0x11);
        assert!(std::fs::read(&path).unwrap() == model, "the image differs");
    }

    /// A direct handle whose writes fail (a full disk): the failure comes back from a
    /// later `write` or from `finish`, never lost.
    #[test]
    fn a_failed_direct_write_is_reported() {
        let sim = SimFs::new(
            1,
            SimFaults {
                capacity: Some(1 << 20),
                ..SimFaults::default()
            },
        );
        let path = Path::new("/full.img");
        let file = sim.open_rw(path).unwrap();
        let direct = sim.open_rw(path).unwrap();
        let mut out = WriteBehind::new(&*file, Some(direct), true);
        let data = vec![7u8; 1 << 20];
        let mut failed = None;
        for i in 0..16u64 {
            if let Err(e) = out.write(i << 20, &data) {
                failed = Some(e);
                break;
            }
        }
        let err = match failed {
            Some(e) => e,
            None => out
                .finish()
                .expect_err("4 MiB runs into a 1 MiB disk must fail"),
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    }
}
