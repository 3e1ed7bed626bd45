//! The host's page cache of a template's memory file. Every fork maps that
//! file, and KVM can map a 2 MiB range with one shadow-paging fault only
//! where the page cache holds it in a 2 MiB folio; how the file was last
//! read decides that (docs/guest-kernel.md). This module reads the file so
//! that it is cached that way, says how it is cached, and repairs a cache
//! that something else spoilt.

use std::fs::File;

use crate::memory::{AlignedMapping, HUGE_PAGE_SIZE};

/// A checksum of guest memory in a memory file that does not depend on how
/// its zero pages are stored (holes or written zeros): CRC32 over the page
/// number and contents of every non-zero 4 KiB page. Only the file's data
/// extents are read (`SEEK_DATA`), so a sparse template takes a fraction of
/// a second.
///
/// The file is read through a 2 MiB-aligned `MADV_HUGEPAGE` mapping rather
/// than `read`: what this reads into the page cache then sits in 2 MiB
/// folios, which every fork's mapping can map with 2 MiB entries (see
/// [`crate::memory::AlignedMapping`]). Call [`release_page_cache`] first for
/// a file just written.
pub fn memory_checksum(file: &File) -> std::io::Result<u32> {
    read_memory_file(file).map(|read| read.crc32)
}

/// What [`read_memory_file`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryFileRead {
    /// As [`memory_checksum`].
    pub crc32: u32,
    /// 2 MiB ranges of the file that hold data.
    pub data_ranges: u64,
    /// Of those, how many the page cache held in 2 MiB folios after the
    /// read (mapped with one 2 MiB entry each). Fewer than `data_ranges`
    /// means something read the file another way first (a `read` or
    /// `pread`, whose readahead caches small folios), and every fork pays
    /// for it in first-touch exits (docs/guest-kernel.md).
    pub huge_ranges: u64,
    /// Offsets of the whole 2 MiB ranges holding data that the page cache
    /// held in smaller folios (mapped with 4 KiB entries), ascending. From
    /// `PAGEMAP_SCAN` (Linux 6.7); None where the kernel cannot say.
    pub small_ranges: Option<Vec<u64>>,
}

/// Reads the memory file as [`memory_checksum`] does, and reports how it
/// now sits in the page cache.
pub fn read_memory_file(file: &File) -> std::io::Result<MemoryFileRead> {
    const PAGE: u64 = 4096;
    let size = file.metadata()?.len();
    let mut crc = crc32fast::Hasher::new();
    if size == 0 {
        return Ok(MemoryFileRead {
            crc32: crc.finalize(),
            data_ranges: 0,
            huge_ranges: 0,
            small_ranges: Some(Vec::new()),
        });
    }
    let mapping = AlignedMapping::new(file, size as usize, libc::PROT_READ, libc::MAP_SHARED)?;
    let bytes = mapping.as_slice();
    let mut data_ranges = std::collections::BTreeSet::new();
    let mut done = 0;
    for (data, hole) in crate::memory::data_runs(file, size)? {
        // Extents need not be page-aligned; whole pages are read either way,
        // each once.
        let first = (data / PAGE * PAGE).max(done);
        let end = (hole.div_ceil(PAGE) * PAGE).min(size);
        if first >= end {
            continue;
        }
        data_ranges.extend(first / HUGE_PAGE_SIZE..end.div_ceil(HUGE_PAGE_SIZE));
        for (i, chunk) in bytes[first as usize..end as usize].chunks(PAGE as usize).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                crc.update(&(first / PAGE + i as u64).to_le_bytes());
                crc.update(chunk);
            }
        }
        done = end;
    }
    // Every data page has been read through the mapping, so each data range
    // is mapped now: with one 2 MiB entry where its folio is 2 MiB.
    let base = mapping.as_ptr() as u64;
    let pmd_kib = crate::memory::smaps_kib(base, base + size, &["FilePmdMapped:"])?;
    let whole_ranges = size / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE;
    let small_ranges = crate::memory::present_small_regions(base, base + whole_ranges)
        .ok()
        .map(|regions| {
            let mut ranges: Vec<u64> = regions
                .into_iter()
                .flat_map(|(start, end)| (start - base) / HUGE_PAGE_SIZE..(end - base).div_ceil(HUGE_PAGE_SIZE))
                .map(|range| range * HUGE_PAGE_SIZE)
                .collect();
            ranges.dedup();
            ranges
        });
    Ok(MemoryFileRead {
        crc32: crc.finalize(),
        data_ranges: data_ranges.len() as u64,
        huge_ranges: pmd_kib * 1024 / HUGE_PAGE_SIZE,
        small_ranges,
    })
}

/// Drops `file`'s clean, unmapped pages in `offset..offset + len` from the
/// host page cache ([`release_page_cache`] for part of it).
pub fn release_page_cache_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: advice on an fd this function borrows; no memory is passed.
    let rc = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Drops `file`'s clean, unmapped pages from the host page cache. The write
/// path caches a new memory file in folios of whatever size; once dropped,
/// the next read ([`memory_checksum`], or a fork's fault) caches it in 2 MiB
/// folios.
pub fn release_page_cache(file: &File) -> std::io::Result<()> {
    // A length of 0 means to the end of the file.
    release_page_cache_range(file, 0, 0)
}

/// Reads the memory file as [`read_memory_file`] does and, where fewer than
/// `possible` of its 2 MiB ranges are cached in 2 MiB folios, drops the
/// ranges held in small folios (where nothing maps them) and reads them
/// again. Returns what the last read found.
///
/// Why: pages that something read first with `read` or `pread` (a backup, a
/// `cp`, an older zeroboot) stay in small folios, and every fork then maps
/// them with up to 512 exits each (numpy's first exec took 6.4 ms instead
/// of 2.0).
pub fn read_and_repair(file: &File, possible: u64) -> std::io::Result<MemoryFileRead> {
    let mut read = read_memory_file(file)?;
    if read.huge_ranges >= possible {
        return Ok(read);
    }
    match read.small_ranges.take() {
        Some(small) if !small.is_empty() => {
            tracing::info!(
                huge_ranges = read.huge_ranges,
                possible,
                small_ranges = small.len(),
                "the page cache held part of the memory file in small folios; reading it again"
            );
            for &offset in &small {
                release_page_cache_range(file, offset, HUGE_PAGE_SIZE)?;
            }
            read_memory_file(file)
        }
        Some(_) => Ok(read),
        None => {
            tracing::debug!("cannot tell which ranges are in small folios (PAGEMAP_SCAN)");
            Ok(read)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_checksum_ignores_how_zeros_are_stored_and_sees_one_flipped_bit() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = std::env::temp_dir().join(format!("zeroboot-checksum-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, sparse: bool, flip: bool| {
            let path = dir.join(name);
            let mut f = File::create(&path).unwrap();
            let mut page = vec![0u8; 4096];
            page[100] = 7;
            if sparse {
                f.set_len(64 * 4096).unwrap();
            } else {
                f.write_all(&vec![0u8; 64 * 4096]).unwrap();
            }
            for n in [3u64, 40] {
                f.seek(SeekFrom::Start(n * 4096)).unwrap();
                f.write_all(&page).unwrap();
            }
            if flip {
                f.seek(SeekFrom::Start(40 * 4096 + 5)).unwrap();
                f.write_all(&[1]).unwrap();
            }
            File::open(&path).unwrap()
        };
        let sparse = memory_checksum(&write("sparse", true, false)).unwrap();
        let dense = memory_checksum(&write("dense", false, false)).unwrap();
        let flipped = memory_checksum(&write("flipped", true, true)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(sparse, dense);
        assert_ne!(sparse, flipped);
    }
}
