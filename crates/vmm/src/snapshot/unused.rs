//! Guest memory a template never wrote: where its sparse memory file has
//! holes. Forks give it KVM slots only when the guest first touches it
//! (`crate::slots`), because KVM's shadow MMU allocates about 10 bytes of
//! host memory per 4 KiB page of every slot when the slot is made.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::layout::{align_up, MemoryLayout, HIMEM_START};

/// The unit unused memory is cut into, one lazy slot each: its slot costs
/// ~40 KiB of host memory once the guest touches it, and registering it
/// costs one exit.
pub const UNUSED_CHUNK: u64 = 16 << 20;

/// The [`UNUSED_CHUNK`]-aligned chunks of `memory` below the disk (or the
/// end of the file) that are holes, leaving out the boot tables' low
/// megabyte, the mailbox and any chunk that meets one of `keep` (runs that
/// have a use or slots of their own), ascending. A file without holes (one
/// copied without keeping them) has none.
pub fn unused_chunks(memory: &File, layout: &MemoryLayout, keep: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let end = if layout.disk_bytes > 0 {
        layout.disk_gpa
    } else {
        layout.total_bytes()
    };
    let mailbox = (layout.mailbox_gpa, layout.ram_bytes - layout.mailbox_gpa);
    let meets = |gpa: u64| {
        let chunk_end = gpa + UNUSED_CHUNK;
        std::iter::once(&mailbox)
            .chain(keep)
            .any(|&(start, len)| start < chunk_end && gpa < start.saturating_add(len))
    };
    let mut chunks = Vec::new();
    let mut at = HIMEM_START;
    while at < end {
        // A hole runs from `at` to the next data (or to the end).
        let data = seek(memory, at, libc::SEEK_DATA).unwrap_or(end).min(end);
        let mut chunk = align_up(at, UNUSED_CHUNK);
        while chunk + UNUSED_CHUNK <= data {
            if !meets(chunk) {
                chunks.push((chunk, UNUSED_CHUNK));
            }
            chunk += UNUSED_CHUNK;
        }
        if data >= end {
            break;
        }
        // Every file ends in a hole, so this always finds one past `data`.
        match seek(memory, data, libc::SEEK_HOLE) {
            Some(hole) if hole > data => at = hole,
            _ => break,
        }
    }
    chunks
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA` or `SEEK_HOLE`: `None` when
/// there is no such place (ENXIO: no data past `offset`) or the file system
/// cannot say.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> Option<u64> {
    let offset = libc::off_t::try_from(offset).ok()?;
    // SAFETY: lseek on an open descriptor; it reads no memory of ours.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    u64::try_from(found).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const M: u64 = 1 << 20;

    /// A sparse file of `layout`'s size with data at each of `data`.
    fn sparse(layout: &MemoryLayout, data: &[u64]) -> File {
        let file = tempfile();
        file.set_len(layout.total_bytes()).unwrap();
        for &at in data {
            file.write_all_at(&[1u8; 4096], at).unwrap();
        }
        file
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!(
            "zeroboot-unused-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn whole_chunks_of_holes_below_the_disk_outside_what_is_kept() {
        let layout = MemoryLayout::new(256, 64 * M, 256 * M).unwrap();
        // Data in chunks 0 and 3 (and a page of the disk); chunk 5 is kept.
        let file = sparse(&layout, &[0, 3 * UNUSED_CHUNK + 4096, layout.disk_gpa]);
        let chunks = unused_chunks(&file, &layout, &[(5 * UNUSED_CHUNK + 8192, 4096)]);
        let starts: Vec<u64> = chunks.iter().map(|&(gpa, _)| gpa / UNUSED_CHUNK).collect();
        // RAM is chunks 0..16 (the mailbox at its top is in chunk 15); the
        // root image and the empty section after it run up to the disk.
        let below_disk = layout.disk_gpa / UNUSED_CHUNK;
        let expected: Vec<u64> = (1..below_disk).filter(|c| ![3, 5, 15].contains(c)).collect();
        assert_eq!(starts, expected);
        assert!(chunks.iter().all(|&(_, len)| len == UNUSED_CHUNK));
    }

    #[test]
    fn a_file_without_holes_has_no_unused_chunks() {
        let layout = MemoryLayout::new(64, 0, 0).unwrap();
        let file = tempfile();
        file.write_all_at(&vec![1u8; layout.total_bytes() as usize], 0).unwrap();
        assert!(unused_chunks(&file, &layout, &[]).is_empty());
    }
}
