//! An export's reads: direct (past the page cache) where the filesystem allows, and on a
//! thread of their own, running ahead of its encoder.
//!
//! With direct I/O there is no kernel read-ahead: a read returns only once the device has
//! delivered it, so an export that read, then compressed, then read again would leave the
//! disk idle while it compresses and the CPU idle while it reads. Here one thread reads the
//! export's pieces in order into a few aligned buffers while the caller's thread encodes the
//! pieces already read. The reads are exactly those an inline export makes (same function,
//! same order, same pieces); only their timing moves earlier, so the point-in-time rules of
//! the caller's `read_at` (the copy-on-write snapshot) hold unchanged.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::mpsc;

use ctk::Extent;
use ctk::delta::{DeltaError, DeltaHeader, DeltaSummary, DeltaWriter, WriteOptions};
use ctk::limits::DELTA_RECORD_DATA_MAX;

// Direct reads need aligned memory and ranges; the helpers live beside the store's `Vfs`.
// Exports read directly because a cold read through the page cache costs the kernel a copy
// into pages it must first find (CPU the export needs for zstd and CRC), and because a
// backup's reads should not evict the host's own cache.
pub use ctk::vfs::{AlignedBuf, DIRECT_ALIGN, direct_fits};

/// Opens `path` read-only for direct reads (`ctk::vfs::open_direct`): `None` where that is
/// turned off (`CTK_DIRECT_IO=off`) or the filesystem refuses `O_DIRECT`. Mixing it with a
/// buffered descriptor of the same file (the NBD front's) is coherent: a direct read first
/// writes back the dirty cached pages of its range.
pub fn open_direct(path: &Path) -> io::Result<Option<File>> {
    ctk::vfs::open_direct(path, false)
}

/// Pieces read ahead of the encoder at most (each up to [`DELTA_RECORD_DATA_MAX`]): with
/// the one being read and the one being encoded, at most `DEPTH + 2` MiB of buffers.
pub const DEPTH: usize = 8;

/// Writes the delta of `extents` into `out` as [`ctk::delta::export_with`] does, reading
/// each piece (at most [`DELTA_RECORD_DATA_MAX`] bytes, never across an extent's end) with
/// `read_at` on another thread, up to [`DEPTH`] pieces ahead. Each piece, once read, is
/// shown to `on_piece` on the caller's thread, in order, before it is encoded (work on the
/// data that should not hold up the reads). A failed read or `on_piece` ends the export
/// with its error; a failed write stops the reads.
pub fn export<W: Write>(
    read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()> + Send,
    mut on_piece: impl FnMut(u64, &[u8]) -> io::Result<()>,
    extents: &[Extent],
    header: &DeltaHeader,
    options: WriteOptions,
    out: W,
) -> Result<(W, DeltaSummary), DeltaError> {
    let mut writer = DeltaWriter::new(out, header, options)?;
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<(u64, AlignedBuf, usize)>>(DEPTH);
        let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
        scope.spawn(move || {
            let mut read_at = read_at;
            for e in extents {
                let mut pos = e.offset;
                while pos < e.end() {
                    let n = (e.end() - pos).min(DELTA_RECORD_DATA_MAX as u64) as usize;
                    // Buffers come back once encoded; a new one only while fewer than the
                    // channel's depth are out.
                    let mut buf = free_rx
                        .try_recv()
                        .unwrap_or_else(|_| AlignedBuf::new(DELTA_RECORD_DATA_MAX));
                    let read = read_at(pos, &mut buf[..n]).map(|()| (pos, buf, n));
                    let failed = read.is_err();
                    // The encoder hung up (its output failed): nothing more to read for.
                    if full_tx.send(read).is_err() || failed {
                        return;
                    }
                    pos += n as u64;
                }
            }
        });
        // Ends when the reader has sent its last piece (or an error) and hung up; returning
        // early drops `full_rx`, which stops the reader at its next piece.
        for piece in full_rx {
            let (offset, buf, n) = piece?;
            on_piece(offset, &buf[..n])?;
            writer.write_extent(offset, &buf[..n])?;
            let _ = free_tx.send(buf);
        }
        Ok::<(), DeltaError>(())
    })?;
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctk::delta::{DeltaReader, DeltaRecord};
    use ctk::id::{ChangeId, Generation};

    fn header(size: u64) -> DeltaHeader {
        DeltaHeader {
            disk_id: "d".into(),
            disk_size: size,
            block_size: 4096,
            from: None,
            to: ChangeId::new(Generation(7), 1),
        }
    }

    fn image(size: usize) -> Vec<u8> {
        (0..size)
            .map(|i| (i / 4096 % 251) as u8 ^ (i as u8))
            .collect()
    }

    /// Every byte of every extent arrives, in order, as an inline export writes it; and
    /// the reads are the same pieces an inline export makes.
    #[test]
    fn the_same_delta_as_an_inline_export() {
        let size = 9 << 20;
        let img = image(size + 1000);
        let extents = [
            Extent {
                offset: 0,
                length: 4096,
            },
            Extent {
                offset: 1 << 20,
                length: (3 << 20) + 8192,
            },
            Extent {
                offset: 6 << 20,
                length: (3 << 20) + 1000,
            },
        ];
        let h = header(size as u64 + 1000);
        let opts = WriteOptions::default();
        let mut ahead_reads = vec![];
        let mut shown = vec![];
        let (a, _) = export(
            |off, buf: &mut [u8]| {
                ahead_reads.push((off, buf.len()));
                buf.copy_from_slice(&img[off as usize..off as usize + buf.len()]);
                Ok(())
            },
            |off, data: &[u8]| {
                assert_eq!(data, &img[off as usize..off as usize + data.len()]);
                shown.push((off, data.len()));
                Ok(())
            },
            &extents,
            &h,
            opts,
            Vec::new(),
        )
        .expect("read-ahead export");
        let mut inline_reads = vec![];
        let (b, _) = ctk::delta::export_with(
            |off, buf: &mut [u8]| {
                inline_reads.push((off, buf.len()));
                buf.copy_from_slice(&img[off as usize..off as usize + buf.len()]);
                Ok(())
            },
            extents,
            &h,
            opts,
            Vec::new(),
        )
        .expect("inline export");
        assert_eq!(a, b, "the two exports differ");
        assert_eq!(ahead_reads, inline_reads);
        assert_eq!(
            shown, inline_reads,
            "on_piece saw other pieces than were read"
        );
        let mut r = DeltaReader::new(&a[..]).expect("header");
        let mut covered = 0u64;
        while let Some(rec) = r.next_record().expect("record") {
            if let DeltaRecord::Data { offset, data } = rec {
                assert_eq!(data, &img[offset as usize..offset as usize + data.len()]);
                covered += data.len() as u64;
            }
        }
        assert_eq!(covered, extents.iter().map(|e| e.length).sum::<u64>());
    }

    /// A read that fails ends the export with that error, and nothing is read after it.
    #[test]
    fn a_failed_read_ends_the_export() {
        let extents = [Extent {
            offset: 0,
            length: 32 << 20,
        }];
        let mut reads = 0;
        let err = export(
            |off, _buf: &mut [u8]| {
                reads += 1;
                if off == 3 << 20 {
                    return Err(io::Error::other("bad sector"));
                }
                Ok(())
            },
            |_, _: &[u8]| Ok(()),
            &extents,
            &header(32 << 20),
            WriteOptions::default(),
            Vec::new(),
        )
        .expect_err("must fail");
        assert!(err.to_string().contains("bad sector"), "{err}");
        assert_eq!(reads, 4, "reads went on past the failure");
    }

    /// An output that fails stops the reader (the scope would hang otherwise) and the
    /// error is the output's.
    #[test]
    fn a_failed_output_stops_the_reads() {
        /// Takes the header and a few records, then fails as a FIFO whose reader died.
        #[derive(Debug)]
        struct Broken(usize);
        impl Write for Broken {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 < b.len() {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "reader gone"));
                }
                self.0 -= b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let extents = [Extent {
            offset: 0,
            length: 256 << 20,
        }];
        let mut reads = 0usize;
        let err = export(
            |_, buf: &mut [u8]| {
                reads += 1;
                buf.fill(1);
                Ok(())
            },
            |_, _: &[u8]| Ok(()),
            &extents,
            &header(256 << 20),
            WriteOptions { zstd_level: None },
            Broken(3 << 20),
        )
        .expect_err("must fail");
        assert!(err.to_string().contains("reader gone"), "{err}");
        // 3 pieces went out whole; the reader may be a channel's depth (and the piece in
        // its hands) ahead of the failure, never more.
        assert!(reads >= 3, "only {reads} reads");
        assert!(
            reads <= 4 + DEPTH + 1,
            "{reads} reads after the output failed"
        );
    }

    /// A piece that `on_piece` refuses ends the export with that error: nothing of it or
    /// after it is encoded.
    #[test]
    fn a_refused_piece_ends_the_export() {
        let extents = [Extent {
            offset: 0,
            length: 8 << 20,
        }];
        let mut out = Vec::new();
        let err = export(
            |_, buf: &mut [u8]| {
                buf.fill(7);
                Ok(())
            },
            |off, _: &[u8]| {
                if off == 2 << 20 {
                    return Err(io::Error::other("leaves file full"));
                }
                Ok(())
            },
            &extents,
            &header(8 << 20),
            WriteOptions { zstd_level: None },
            &mut out,
        )
        .expect_err("must fail");
        assert!(err.to_string().contains("leaves file full"), "{err}");
        // Two records of 1 MiB at most, plus the header: the third piece never went out.
        assert!(out.len() < (2 << 20) + 4096, "{} bytes written", out.len());
    }
}
