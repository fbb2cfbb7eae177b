//! Disk geometry: size and tracking granularity, and the mapping from byte ranges to blocks.

use crate::limits::{BLOCK_SIZE_MAX, BLOCK_SIZE_MIN, BLOCKS_PER_DISK_MAX};

/// A byte range of a disk, `[offset, offset + length)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl Extent {
    pub fn new(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    /// One past the last byte. Extents handed out by ctk never overflow.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Why a geometry or a range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// The tracking block size is not a power of two in the supported range.
    #[error(
        "block size {0} is not supported: it must be a power of two from {BLOCK_SIZE_MIN} to {BLOCK_SIZE_MAX} bytes"
    )]
    BadBlockSize(u64),
    /// The disk has more blocks than block numbers can name at this granularity.
    #[error(
        "a disk of {disk_size} bytes has more than 2^32 blocks of {block_size} bytes: use a larger block size"
    )]
    TooManyBlocks { disk_size: u64, block_size: u32 },
    /// A range reaches past the end of the disk (or overflows u64).
    #[error(
        "range at offset {offset} of {length} bytes reaches past the end of the {disk_size}-byte disk"
    )]
    RangePastEnd {
        offset: u64,
        length: u64,
        disk_size: u64,
    },
}

/// Size and granularity of a tracked disk. The last block may be partial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    disk_size: u64,
    block_shift: u32,
}

impl Geometry {
    pub fn new(disk_size: u64, block_size: u64) -> Result<Geometry, GeometryError> {
        if !block_size.is_power_of_two()
            || block_size < BLOCK_SIZE_MIN as u64
            || block_size > BLOCK_SIZE_MAX as u64
        {
            return Err(GeometryError::BadBlockSize(block_size));
        }
        let g = Geometry {
            disk_size,
            block_shift: block_size.trailing_zeros(),
        };
        if g.blocks() > BLOCKS_PER_DISK_MAX {
            return Err(GeometryError::TooManyBlocks {
                disk_size,
                block_size: block_size as u32,
            });
        }
        Ok(g)
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    pub fn block_size(&self) -> u32 {
        1 << self.block_shift
    }

    pub fn block_shift(&self) -> u32 {
        self.block_shift
    }

    /// Number of blocks, counting a partial last block.
    pub fn blocks(&self) -> u64 {
        self.disk_size.div_ceil(self.block_size() as u64)
    }

    /// The same disk at another size.
    pub fn resized(&self, disk_size: u64) -> Result<Geometry, GeometryError> {
        Geometry::new(disk_size, self.block_size() as u64)
    }

    /// Blocks `[first, end)` touched by a byte range; `None` for an empty range. An unaligned
    /// range touches every block it overlaps.
    pub fn blocks_of(&self, offset: u64, length: u64) -> Result<Option<(u32, u32)>, GeometryError> {
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= self.disk_size)
            .ok_or(GeometryError::RangePastEnd {
                offset,
                length,
                disk_size: self.disk_size,
            })?;
        if length == 0 {
            return Ok(None);
        }
        let first = offset >> self.block_shift;
        let last = (end - 1) >> self.block_shift;
        // Both fit: blocks() <= 2^32 was checked at construction, and last < blocks().
        Ok(Some((first as u32, last as u32)))
    }

    /// The byte extent of blocks `[first, first + count)`, clipped to the disk size.
    pub fn extent_of_blocks(&self, first: u64, count: u64) -> Extent {
        let offset = first << self.block_shift;
        let end = ((first + count) << self.block_shift).min(self.disk_size);
        Extent {
            offset,
            length: end.saturating_sub(offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_must_be_a_supported_power_of_two() {
        for bad in [0, 512, 3000, 4095, 4097, 2 << 20, 6 * 1024] {
            assert_eq!(
                Geometry::new(1 << 30, bad),
                Err(GeometryError::BadBlockSize(bad))
            );
        }
        for good in [4096u64, 8192, 65536, 1 << 20] {
            assert_eq!(
                Geometry::new(1 << 30, good).unwrap().block_size() as u64,
                good
            );
        }
    }

    #[test]
    fn too_many_blocks_is_refused() {
        assert!(Geometry::new(16 << 40, 4096).is_ok());
        assert!(matches!(
            Geometry::new((16 << 40) + 1, 4096),
            Err(GeometryError::TooManyBlocks { .. })
        ));
        assert!(Geometry::new((16 << 40) + 1, 8192).is_ok());
    }

    #[test]
    fn unaligned_ranges_touch_every_overlapped_block() {
        let g = Geometry::new(10 * 4096 + 100, 4096).unwrap();
        assert_eq!(g.blocks(), 11);
        assert_eq!(g.blocks_of(0, 1).unwrap(), Some((0, 0)));
        assert_eq!(g.blocks_of(4095, 2).unwrap(), Some((0, 1)));
        assert_eq!(g.blocks_of(4096, 4096).unwrap(), Some((1, 1)));
        assert_eq!(g.blocks_of(5, 0).unwrap(), None);
        assert_eq!(g.blocks_of(10 * 4096, 100).unwrap(), Some((10, 10)));
        assert!(g.blocks_of(10 * 4096, 101).is_err());
        assert!(g.blocks_of(u64::MAX, 2).is_err());
        assert_eq!(g.extent_of_blocks(9, 2), Extent::new(9 * 4096, 4096 + 100));
    }
}
