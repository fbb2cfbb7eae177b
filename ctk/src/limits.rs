//! Every bound ctk enforces, in one place, with its worst-case memory.
//!
//! Lengths read from a file or the network are checked against these before anything is
//! allocated. Relations between limits are checked at compile time.

/// Smallest tracking granularity (bytes). 4 KiB: one database page on the wire, not 64.
pub const BLOCK_SIZE_MIN: u32 = 4 * 1024;
/// Largest tracking granularity (bytes).
pub const BLOCK_SIZE_MAX: u32 = 1024 * 1024;
/// Default tracking granularity (bytes).
pub const BLOCK_SIZE_DEFAULT: u32 = BLOCK_SIZE_MIN;

/// Block numbers are `u32`, so a disk holds at most 2^32 blocks (16 TiB at 4 KiB, 4 PiB at
/// 1 MiB). A larger disk needs a coarser block size; opening it finer is a typed error.
pub const BLOCKS_PER_DISK_MAX: u64 = 1 << 32;

/// Smallest write-intent region of the journal (bytes): a region holds whole blocks of any
/// supported size.
pub const REGION_SIZE_MIN: u64 = 1024 * 1024;
/// Largest write-intent region of the journal (bytes).
pub const REGION_SIZE_MAX: u64 = 1 << 30;
/// Default write-intent region (bytes): one fsync covers the next 1 MiB of writes.
pub const REGION_SIZE_DEFAULT: u64 = 1024 * 1024;

/// Disk identity (an opaque name or UUID chosen by the caller) in journal and delta headers.
pub const DISK_ID_LEN_MAX: usize = 256;

/// Largest journal record payload. A sealed epoch is written as pieces of at most
/// `JOURNAL_PIECE_BLOCKS` blocks; a roaring piece of 2^20 blocks is at most 128 KiB of
/// bitmap containers plus 16 container headers, so 256 KiB bounds every record with room.
/// Worst case while reading a journal: one record buffer of this size.
pub const JOURNAL_RECORD_MAX: usize = 256 * 1024;
/// Blocks covered by one persisted piece of an epoch bitmap.
pub const JOURNAL_PIECE_BLOCKS: u64 = 1 << 20;
/// Regions named in one intent or clear record (4 bytes each).
pub const JOURNAL_REGIONS_PER_RECORD_MAX: usize = 16 * 1024;
/// Length of a consumer cursor name.
pub const CURSOR_NAME_LEN_MAX: usize = 128;
/// Registered consumer cursors per disk.
pub const CURSORS_MAX: usize = 64;

/// Largest decoded payload of one delta record. Reader memory is bounded by two buffers of
/// this size (encoded and decoded) plus the zstd context, whatever the input claims.
pub const DELTA_RECORD_DATA_MAX: usize = 1024 * 1024;

const _: () = assert!(BLOCK_SIZE_MIN.is_power_of_two() && BLOCK_SIZE_MAX.is_power_of_two());
const _: () = assert!(BLOCK_SIZE_DEFAULT >= BLOCK_SIZE_MIN && BLOCK_SIZE_DEFAULT <= BLOCK_SIZE_MAX);
const _: () = assert!(REGION_SIZE_MIN >= BLOCK_SIZE_MAX as u64);
const _: () = assert!(REGION_SIZE_DEFAULT.is_power_of_two());
// A delta record holds at least one whole block of the largest size.
const _: () = assert!(DELTA_RECORD_DATA_MAX >= BLOCK_SIZE_MAX as usize);
// A piece bitmap (2^20 bits = 128 KiB) plus headers fits one journal record.
const _: () = assert!((JOURNAL_PIECE_BLOCKS / 8) as usize + 16 * 1024 <= JOURNAL_RECORD_MAX);
const _: () = assert!(JOURNAL_REGIONS_PER_RECORD_MAX * 4 + 64 <= JOURNAL_RECORD_MAX);
