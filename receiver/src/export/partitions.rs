//! The partitions of a disk image, read from its MBR or GPT (the kernel's own partition scan
//! of loop devices is not always there: a kernel built without the parsers, `max_part=0`).
//! Only what a read-only mount needs: each partition's byte range. Every field is checked
//! against the disk's size; a table that does not hold together is no table (the whole disk
//! is then tried as one filesystem).

/// A partition: its number (1-based, as the table numbers it), start and length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub length: u64,
}

/// Most GPT entries read (the usual table has 128).
const GPT_ENTRIES_MAX: u64 = 1024;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The partitions of a disk of `size` bytes, reading with `read(offset, buf)`. Empty when
/// there is no table (a filesystem on the whole disk).
pub fn partitions(
    size: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<Vec<Partition>> {
    if size < 1024 {
        return Ok(Vec::new());
    }
    let mut mbr = [0u8; 512];
    read(0, &mut mbr)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Ok(Vec::new());
    }
    let entries: Vec<(u8, u64, u64)> = (0..4)
        .map(|i| {
            let e = &mbr[446 + 16 * i..446 + 16 * (i + 1)];
            (e[4], le32(e, 8) as u64, le32(e, 12) as u64)
        })
        .collect();
    if entries.iter().any(|e| e.0 == 0xee) {
        for sector in [512u64, 4096] {
            if let Some(found) = gpt(size, sector, &mut read)? {
                return Ok(found);
            }
        }
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (i, &(kind, first, count)) in entries.iter().enumerate() {
        // Empty slots, and extended partitions (their logical ones are not read here).
        if kind == 0 || matches!(kind, 0x05 | 0x0f | 0x85) || count == 0 {
            continue;
        }
        let (start, length) = (first * 512, count * 512);
        if start.checked_add(length).is_some_and(|end| end <= size) {
            out.push(Partition {
                number: i as u32 + 1,
                start,
                length,
            });
        }
    }
    Ok(out)
}

/// A GPT with `sector`-byte sectors, if its header is there.
fn gpt(
    size: u64,
    sector: u64,
    read: &mut impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<Option<Vec<Partition>>> {
    if size < 2 * sector + 92 {
        return Ok(None);
    }
    let mut header = [0u8; 92];
    read(sector, &mut header)?;
    if &header[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let (table, count, entry) = (
        le64(&header, 72),
        le32(&header, 80) as u64,
        le32(&header, 84) as u64,
    );
    if !(128..=4096).contains(&entry) || count > GPT_ENTRIES_MAX {
        return Ok(None);
    }
    let Some(bytes) = table
        .checked_mul(sector)
        .filter(|&b| b.saturating_add(count * entry) <= size)
    else {
        return Ok(None);
    };
    let mut entries = vec![0u8; (count * entry) as usize];
    read(bytes, &mut entries)?;
    let mut out = Vec::new();
    for (i, e) in entries.chunks(entry as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        let start = first.checked_mul(sector);
        let end = last.checked_add(1).and_then(|l| l.checked_mul(sector));
        if let (Some(start), Some(end)) = (start, end)
            && start < end
            && end <= size
        {
            out.push(Partition {
                number: i as u32 + 1,
                start,
                length: end - start,
            });
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(disk: &[u8]) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<()> + '_ {
        |offset, buf| {
            buf.copy_from_slice(&disk[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn mbr_and_gpt_tables_are_read_and_lies_are_ignored() {
        let size = 64 << 20;
        // MBR: two Linux partitions, one extended (skipped), one past the end (dropped).
        let mut disk = vec![0u8; size];
        disk[510] = 0x55;
        disk[511] = 0xaa;
        for (i, (kind, first, count)) in [
            (0x83u8, 2048u32, 4096u32),
            (0x05, 8192, 100),
            (0x83, 10240, 2048),
            (0x83, 200_000, 10),
        ]
        .into_iter()
        .enumerate()
        {
            let e = 446 + 16 * i;
            disk[e + 4] = kind;
            disk[e + 8..e + 12].copy_from_slice(&first.to_le_bytes());
            disk[e + 12..e + 16].copy_from_slice(&count.to_le_bytes());
        }
        let found = partitions(size as u64, reader(&disk)).unwrap();
        assert_eq!(
            found,
            vec![
                Partition {
                    number: 1,
                    start: 1 << 20,
                    length: 2 << 20
                },
                Partition {
                    number: 3,
                    start: 5 << 20,
                    length: 1 << 20
                },
            ]
        );
        // GPT: protective MBR, header at LBA 1, 4 entries of 128 bytes at LBA 2.
        let mut disk = vec![0u8; size];
        disk[510] = 0x55;
        disk[511] = 0xaa;
        disk[446 + 4] = 0xee;
        disk[512..520].copy_from_slice(b"EFI PART");
        disk[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        disk[512 + 80..512 + 84].copy_from_slice(&4u32.to_le_bytes());
        disk[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        for (i, (first, last)) in [(2048u64, 6143u64), (0, 0), (6144, 10239)]
            .into_iter()
            .enumerate()
        {
            let e = 1024 + 128 * i;
            if first != 0 {
                disk[e] = 1;
            }
            disk[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
            disk[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
        }
        let found = partitions(size as u64, reader(&disk)).unwrap();
        assert_eq!(
            found,
            vec![
                Partition {
                    number: 1,
                    start: 1 << 20,
                    length: 2 << 20
                },
                Partition {
                    number: 3,
                    start: 3 << 20,
                    length: 2 << 20
                },
            ]
        );
        // A header that claims a table past the end is no table.
        disk[512 + 72..512 + 80].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(partitions(size as u64, reader(&disk)).unwrap().is_empty());
        // No signature: a filesystem on the whole disk.
        assert!(
            partitions(size as u64, reader(&vec![0u8; 4096]))
                .unwrap()
                .is_empty()
        );
    }
}
