//! Guest memory the template never wrote, and root-image memory its
//! process does not map, in chunks that forks give KVM slots only when the
//! guest first touches them (`crate::slots`): KVM's
//! shadow MMU allocates about 10 bytes of host memory per 4 KiB page of
//! every slot when the slot is made, touched or not.
//!
//! A chunk qualifies when the memory file holds no data for any of it (the
//! snapshot writes zero pages as holes): memory the guest has not written
//! since it booted, so free memory. Nothing in it is read before the guest
//! writes it (a page table, a clock page KVM updates, a descriptor table
//! all hold data), and the guest's first write there leaves the VM as MMIO,
//! which registers the chunk. Memory the guest holds but a request does
//! not write is not enough: KVM itself reads the guest's page tables and
//! the pages its MSRs name, and fails, without an exit, where no slot is.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::layout::{align_up, MemoryLayout, HIMEM_START};

/// The unit such memory is cut into, one lazy slot each: once the guest
/// touches it, its slot costs ~40 KiB of host memory and one exit.
pub const CHUNK: u64 = 16 << 20;

/// The [`CHUNK`]-aligned chunks of `memory` from the first one above the
/// boot tables' low megabyte up to the disk (or the end of guest memory)
/// that are holes in the file, ascending, leaving out any that meets the
/// mailbox, a run of `write_set` (forks write there, so they would pay its
/// exit every time) or one of `own_slots` (runs with lazy slots of their
/// own). A file without holes (one copied without keeping them) has none.
pub fn unwritten_chunks(
    memory: &File,
    layout: &MemoryLayout,
    write_set: &[(u64, u64)],
    own_slots: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    let end = if layout.disk_bytes > 0 {
        layout.disk_gpa
    } else {
        layout.total_bytes()
    };
    let mailbox = (layout.mailbox_gpa, layout.ram_bytes - layout.mailbox_gpa);
    let meets = |chunk: u64| meets(chunk, std::iter::once(&mailbox).chain(write_set).chain(own_slots));
    // A hole when the next data is past the chunk's end (or there is none).
    let hole = |chunk: u64| data_from(memory, chunk).is_none_or(|data| data >= chunk + CHUNK);
    (align_up(HIMEM_START, CHUNK)..end.saturating_sub(CHUNK - 1))
        .step_by(CHUNK as usize)
        .filter(|&chunk| !meets(chunk) && hole(chunk))
        .map(|chunk| (chunk, CHUNK))
        .collect()
}

/// The [`CHUNK`]-aligned chunks of the root image that no user-mode page
/// of the snapshot's guest maps (`user_mapped`: `(gpa, len)` runs, from its
/// page tables) and that meet no run of `write_set`, ascending. The guest
/// only reads the image (a read-only file system), and nothing of KVM's
/// own lies there (page tables, the pages MSRs name, descriptor tables
/// are all in RAM), so the first touch of such a chunk is the guest's: a
/// read or a write leaves the VM as MMIO, and an instruction fetched from
/// it is an emulation failure (`Vm::exit_on_emulation_failure`); either
/// registers the chunk. What the snapshot's process maps stays eager:
/// forks run and read it (python: one chunk of the image's ten).
pub fn unmapped_image_chunks(
    layout: &MemoryLayout,
    user_mapped: &[(u64, u64)],
    write_set: &[(u64, u64)],
) -> Vec<(u64, u64)> {
    let meets = |chunk: u64| meets(chunk, user_mapped.iter().chain(write_set));
    let end = layout.pmem_gpa + layout.pmem_bytes;
    (align_up(layout.pmem_gpa, CHUNK)..end.saturating_sub(CHUNK - 1))
        .step_by(CHUNK as usize)
        .filter(|&chunk| !meets(chunk))
        .map(|chunk| (chunk, CHUNK))
        .collect()
}

/// Whether any of the `(gpa, len)` runs overlaps the chunk at `chunk`.
fn meets<'a>(chunk: u64, mut runs: impl Iterator<Item = &'a (u64, u64)>) -> bool {
    runs.any(|&(gpa, len)| gpa < chunk + CHUNK && chunk < gpa.saturating_add(len))
}

/// Where the file's next data at or after `offset` starts (`SEEK_DATA`):
/// `None` when there is none. A file system that cannot say reports all of
/// the file as data.
fn data_from(file: &File, offset: u64) -> Option<u64> {
    let offset = libc::off_t::try_from(offset).ok()?;
    // SAFETY: lseek on an open descriptor; it reads no memory of ours.
    let found = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) };
    u64::try_from(found).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const M: u64 = 1 << 20;

    /// A sparse file of `layout`'s size with a page of data at each of `data`.
    fn sparse(layout: &MemoryLayout, data: &[u64]) -> File {
        let path = std::env::temp_dir().join(format!(
            "zeroboot-unwritten-{}-{:?}",
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
        file.set_len(layout.total_bytes()).unwrap();
        for &at in data {
            file.write_all_at(&[1u8; 4096], at).unwrap();
        }
        file
    }

    #[test]
    fn whole_chunks_of_holes_below_the_disk_that_no_fork_writes() {
        let layout = MemoryLayout::new(256, 64 * M, 256 * M).unwrap();
        // Data in chunks 0 and 3 and in the disk; a written page in chunk
        // 5, one straddling chunks 6 and 7; a fresh run over chunks 9, 10.
        let file = sparse(&layout, &[0, 3 * CHUNK + 4096, layout.disk_gpa]);
        let write_set = [(5 * CHUNK + 4096, 4096), (7 * CHUNK - 4096, 8192)];
        let fresh = [(9 * CHUNK, 2 * CHUNK)];
        let chunks = unwritten_chunks(&file, &layout, &write_set, &fresh);
        let starts: Vec<u64> = chunks.iter().map(|&(gpa, _)| gpa / CHUNK).collect();
        // RAM is chunks 0..16 (the low megabyte in chunk 0, the mailbox at
        // the top of chunk 15); the root image and the empty section after
        // it run up to the disk.
        let below_disk = layout.disk_gpa / CHUNK;
        let expected: Vec<u64> = (1..below_disk)
            .filter(|c| ![3, 5, 6, 7, 9, 10, 15].contains(c))
            .collect();
        assert_eq!(starts, expected);
        assert!(chunks.iter().all(|&(_, len)| len == CHUNK));
    }

    #[test]
    fn image_chunks_that_no_user_page_maps_and_no_fork_writes() {
        let layout = MemoryLayout::new(256, 128 * M, 256 * M).unwrap();
        let image = layout.pmem_gpa / CHUNK;
        // A user page in the image's chunk 1, a 2 MiB one across chunks 3
        // and 4, a written page in chunk 6, and RAM's pages, which the
        // image's chunks never take.
        let user = [
            ((image + 1) * CHUNK + 4096, 4096),
            ((image + 4) * CHUNK - M, 2 * M),
            (5 * CHUNK, 4096),
        ];
        let write_set = [((image + 6) * CHUNK, 4096)];
        let chunks = unmapped_image_chunks(&layout, &user, &write_set);
        let starts: Vec<u64> = chunks.iter().map(|&(gpa, _)| gpa / CHUNK - image).collect();
        assert_eq!(starts, vec![0, 2, 5, 7]);
        assert!(chunks.iter().all(|&(_, len)| len == CHUNK));
        let no_image = MemoryLayout::new(256, 0, 0).unwrap();
        assert!(unmapped_image_chunks(&no_image, &[], &[]).is_empty());
    }

    #[test]
    fn a_file_without_holes_has_no_unwritten_chunk() {
        let layout = MemoryLayout::new(64, 0, 0).unwrap();
        let file = sparse(&layout, &[]);
        file.write_all_at(&vec![1u8; layout.total_bytes() as usize], 0).unwrap();
        assert!(unwritten_chunks(&file, &layout, &[], &[]).is_empty());
    }
}
