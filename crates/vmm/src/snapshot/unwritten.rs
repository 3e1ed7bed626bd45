//! Guest memory forks of a template do not write, in chunks that forks
//! give KVM slots only when the guest first touches them (`crate::slots`):
//! KVM's shadow MMU allocates about 10 bytes of host memory per 4 KiB page
//! of every slot when the slot is made, touched or not.
//!
//! Which memory a fork writes is known from the template's write set (the
//! pages its probe requests wrote). A chunk without such a page is mostly
//! memory the guest holds but a request does not reach: free memory, the
//! root image (the hot code in it was copied onto 2 MiB pages before the
//! snapshot), the page cache. A `print(1+1)` and the numpy probe touch no
//! chunk outside the write set's (one exit each, as with a single slot);
//! code that does pays one exit per chunk, the first time.

use crate::layout::{align_up, MemoryLayout, HIMEM_START};

/// The unit such memory is cut into, one lazy slot each: once the guest
/// touches it, its slot costs ~40 KiB of host memory and one exit.
pub const CHUNK: u64 = 16 << 20;

/// The [`CHUNK`]-aligned chunks of guest memory from the first one above
/// the boot tables' low megabyte up to the disk (or the end of guest
/// memory), ascending, leaving out any that meets the mailbox, a run of
/// `write_set` or one of `own_slots` (runs that have lazy slots of their
/// own). Without a write set, none: nothing says what forks touch.
pub fn unwritten_chunks(layout: &MemoryLayout, write_set: &[(u64, u64)], own_slots: &[(u64, u64)]) -> Vec<(u64, u64)> {
    if write_set.is_empty() {
        return Vec::new();
    }
    let end = if layout.disk_bytes > 0 {
        layout.disk_gpa
    } else {
        layout.total_bytes()
    };
    let mailbox = (layout.mailbox_gpa, layout.ram_bytes - layout.mailbox_gpa);
    let meets = |chunk: u64| {
        std::iter::once(&mailbox)
            .chain(write_set)
            .chain(own_slots)
            .any(|&(gpa, len)| gpa < chunk + CHUNK && chunk < gpa.saturating_add(len))
    };
    (align_up(HIMEM_START, CHUNK)..end.saturating_sub(CHUNK - 1))
        .step_by(CHUNK as usize)
        .filter(|&chunk| !meets(chunk))
        .map(|chunk| (chunk, CHUNK))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn whole_chunks_below_the_disk_without_a_written_page() {
        let layout = MemoryLayout::new(256, 64 * M, 256 * M).unwrap();
        // A written page in chunk 3, one straddling chunks 5 and 6, a fresh
        // run over chunks 8 and 9.
        let write_set = [(3 * CHUNK + 4096, 4096), (6 * CHUNK - 4096, 8192)];
        let fresh = [(8 * CHUNK, 2 * CHUNK)];
        let chunks = unwritten_chunks(&layout, &write_set, &fresh);
        let starts: Vec<u64> = chunks.iter().map(|&(gpa, _)| gpa / CHUNK).collect();
        // RAM is chunks 0..16 (the low megabyte in chunk 0, the mailbox at
        // the top of chunk 15); the root image and the empty section after
        // it run up to the disk.
        let below_disk = layout.disk_gpa / CHUNK;
        let expected: Vec<u64> = (1..below_disk).filter(|c| ![3, 5, 6, 8, 9, 15].contains(c)).collect();
        assert_eq!(starts, expected);
        assert!(chunks.iter().all(|&(_, len)| len == CHUNK));
    }

    #[test]
    fn without_a_write_set_nothing_is_unwritten_and_a_partial_chunk_stays() {
        let layout = MemoryLayout::new(100, 0, 0).unwrap();
        assert!(unwritten_chunks(&layout, &[], &[]).is_empty());
        // 100 MiB of RAM: chunks 1..6 end at 96 MiB; the mailbox is in the
        // last 4 MiB, which is not a whole chunk anyway.
        let chunks = unwritten_chunks(&layout, &[(0, 4096)], &[]);
        assert_eq!(chunks.first(), Some(&(CHUNK, CHUNK)));
        assert_eq!(chunks.last(), Some(&(5 * CHUNK, CHUNK)));
    }
}
