//! Guest memory: one contiguous region starting at guest-physical 0.
//!
//! At boot it is anonymous memory. A restored VM maps the template's memory
//! file `MAP_PRIVATE`, so every fork shares the template's pages and gets its
//! own copy of a page only when it writes to it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use crate::layout::PAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot map guest memory: {0}")]
    Mmap(std::io::Error),
    #[error("guest memory region rejected")]
    Region,
    #[error("guest range {gpa:#x}+{len:#x} is outside guest memory ({size:#x} bytes)")]
    OutOfRange { gpa: u64, len: u64, size: u64 },
    #[error("reading into guest memory: {0}")]
    Read(std::io::Error),
    #[error("reading /proc/self/smaps: {0}")]
    Smaps(std::io::Error),
    #[error("writing guest memory to a file: {0}")]
    Write(std::io::Error),
    #[error("reading /proc/self/pagemap: {0}")]
    Pagemap(std::io::Error),
    #[error("dropping copied guest pages: {0}")]
    Discard(std::io::Error),
}

/// Merges ascending page addresses into `(gpa, len)` runs of adjacent pages.
pub fn page_runs(pages: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for gpa in pages {
        match runs.last_mut() {
            Some((start, len)) if *start + *len == gpa => *len += PAGE_SIZE,
            _ => runs.push((gpa, PAGE_SIZE)),
        }
    }
    runs
}

/// The sum of `fields` (in kB) over this process's /proc/self/smaps entries
/// that lie within host addresses `base..end`.
pub(crate) fn smaps_kib(base: u64, end: u64, fields: &[&str]) -> std::io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut in_range = false;
    let mut kib = 0;
    for line in smaps.lines() {
        if !line.ends_with(" kB") && line.contains('-') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
            in_range = match range {
                Some((from, to)) => {
                    let from = u64::from_str_radix(from, 16).unwrap_or(0);
                    let to = u64::from_str_radix(to, 16).unwrap_or(0);
                    from >= base && to <= end
                }
                None => false,
            };
        } else if in_range && fields.iter().any(|f| line.starts_with(f)) {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(kib)
}

/// `PAGEMAP_SCAN`'s argument and result types (linux/fs.h, Linux 6.7).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_HUGE: u64 = 1 << 6;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;

/// The regions of this process's address space within `base..end` whose
/// pages are present and mapped with 4 KiB entries rather than one 2 MiB
/// entry, as `(start, end)` host addresses.
pub(crate) fn present_small_regions(base: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut out = Vec::new();
    let mut regions = vec![PageRegion::default(); 512];
    let mut from = base;
    while from < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: from,
            end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            // Present and not huge.
            category_inverted: PAGE_IS_HUGE,
            category_mask: PAGE_IS_PRESENT | PAGE_IS_HUGE,
            category_anyof_mask: 0,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_HUGE,
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
        // entries into `regions`, which outlives the call, and `walk_end`
        // into `arg`; it only reads this process's page tables.
        let found = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        if found < 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.extend(regions[..found as usize].iter().map(|r| (r.start, r.end)));
        // The scan stops early when `regions` is full; go on from there.
        if arg.walk_end <= from || (found as usize) < regions.len() {
            break;
        }
        from = arg.walk_end;
    }
    Ok(out)
}

/// Huge-page size on x86-64.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// A mapping whose start is aligned to [`HUGE_PAGE_SIZE`], unmapped on drop.
///
/// Why aligned: KVM maps a guest 2 MiB page with one 2 MiB entry only where
/// the memory slot's guest-physical and host-virtual addresses agree modulo
/// 2 MiB and the host maps that range with a 2 MiB page too. Under shadow
/// paging (kvm_pvm) that turns up to 512 first-touch faults of a fork into
/// one (docs/guest-kernel.md, "2 MiB mappings").
pub(crate) struct AlignedMapping {
    reservation: *mut libc::c_void,
    reservation_len: usize,
    start: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; the raw pointers
// are addresses, not borrows of anything thread-bound.
unsafe impl Send for AlignedMapping {}
// SAFETY: as above; this type itself never reads or writes through them.
unsafe impl Sync for AlignedMapping {}

impl AlignedMapping {
    /// Maps `len` bytes of `file` from offset 0 at a 2 MiB-aligned address,
    /// advised so that a fault reads the page cache in 2 MiB folios, which
    /// the host then maps with 2 MiB entries.
    pub(crate) fn new(file: &File, len: usize, prot: libc::c_int, flags: libc::c_int) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let huge = HUGE_PAGE_SIZE as usize;
        let reservation_len = len
            .checked_add(huge)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a fresh PROT_NONE reservation at an address the kernel
        // picks; no existing memory is affected.
        let reservation = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reservation_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reservation == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let aligned = (reservation as usize).next_multiple_of(huge);
        // SAFETY: MAP_FIXED only replaces pages of the reservation made
        // above, which nothing else uses: `aligned + len` is within it.
        let start = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                len,
                prot,
                flags | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        };
        if start == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmapping the reservation this function made.
            unsafe { libc::munmap(reservation, reservation_len) };
            return Err(e);
        }
        // Hints only: without them (or without THP on the host) every page
        // is still mapped, in 4 KiB pieces. MADV_HUGEPAGE makes a page-cache
        // miss read the aligned 2 MiB around it into one folio; MADV_RANDOM
        // turns off the asynchronous readahead that would otherwise follow,
        // whose folios are sized by its window and rarely 2 MiB (measured:
        // 3 of 12 ranges of a template came out split that way).
        for advice in [libc::MADV_HUGEPAGE, libc::MADV_RANDOM] {
            // SAFETY: advice on the mapping just made; it does not change contents.
            unsafe { libc::madvise(start, len, advice) };
        }
        Ok(Self {
            reservation,
            reservation_len,
            start: start.cast(),
            len,
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.start
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes (callers map it
        // readable) and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.start, self.len) }
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        // SAFETY: the whole reservation, including the mapping placed in it,
        // belongs to this value, and nothing borrows it any more (GuestRam
        // drops its vm-memory view first).
        unsafe { libc::munmap(self.reservation, self.reservation_len) };
    }
}

/// A private anonymous 2 MiB page at a 2 MiB-aligned address, to be filled
/// and then moved over part of another mapping; unmapped on drop if it was
/// not moved.
struct HugeStaging {
    start: *mut u8,
}

impl HugeStaging {
    fn new() -> Result<Self, MemoryError> {
        let huge = HUGE_PAGE_SIZE as usize;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks;
        // no existing memory is affected.
        let reservation = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * huge,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reservation == libc::MAP_FAILED {
            return Err(MemoryError::Mmap(std::io::Error::last_os_error()));
        }
        let start = (reservation as usize).next_multiple_of(huge);
        let head = start - reservation as usize;
        // SAFETY: unmapping the parts of the reservation before and after
        // the aligned 2 MiB, which this function just mapped and nothing
        // else uses. The part before is empty when the kernel's address was
        // aligned already (head < huge, so the part after never is).
        unsafe {
            if head > 0 {
                libc::munmap(reservation, head);
            }
            libc::munmap((start + huge) as *mut libc::c_void, huge - head);
        }
        // SAFETY: advice on the page just mapped; it holds nothing yet. A
        // host without a huge page to give makes it 4 KiB pages: correct,
        // only slower.
        unsafe { libc::madvise(start as *mut libc::c_void, huge, libc::MADV_HUGEPAGE) };
        Ok(Self {
            start: start as *mut u8,
        })
    }

    /// Moves the page to `at` (2 MiB-aligned), replacing what was mapped
    /// there; its contents and 2 MiB mapping move with it.
    fn move_to(self, at: *mut u8) -> Result<(), MemoryError> {
        let huge = HUGE_PAGE_SIZE as usize;
        // SAFETY: the source is this value's own page; the destination is a
        // 2 MiB range of guest memory the caller owns mutably, which
        // MREMAP_FIXED replaces whole.
        let moved = unsafe {
            libc::mremap(
                self.start.cast(),
                huge,
                huge,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                at.cast::<libc::c_void>(),
            )
        };
        if moved != at.cast() {
            return Err(MemoryError::Mmap(std::io::Error::last_os_error()));
        }
        // The page now lives at `at`; nothing is left to unmap.
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for HugeStaging {
    fn drop(&mut self) {
        // SAFETY: the page this value mapped and did not move.
        unsafe { libc::munmap(self.start.cast(), HUGE_PAGE_SIZE as usize) };
    }
}

pub struct GuestRam {
    memory: GuestMemoryMmap,
    host_base: *mut u8,
    size: u64,
    /// The 2 MiB ranges replaced by private 2 MiB pages
    /// ([`GuestRam::make_private_huge`]).
    private_huge: Vec<u64>,
    /// Owns the mapping `memory` views, for a restored VM; declared after
    /// `memory` so that it is unmapped after that view is gone.
    _mapping: Option<AlignedMapping>,
}

// SAFETY: `host_base` points into the mapping owned by `memory`, which is
// itself Send + Sync; the raw pointer is only a cached view of it.
unsafe impl Send for GuestRam {}
// SAFETY: as above; shared access goes through `&self` methods that copy.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Fresh zeroed memory for a VM that boots from scratch.
    pub fn anonymous(size: u64) -> Result<Self, MemoryError> {
        let region = MmapRegionBuilder::new(size as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Map { size, source })?;
        // A hint, so that the host may back a booting guest's memory with
        // 2 MiB pages and KVM map it with 2 MiB entries. It did not move
        // the build's cost of faulting in the fresh heap, which was the
        // guest kernel's emulated zeroing (docs/guest-kernel.md).
        // SAFETY: advice on the region just mapped; contents do not change.
        unsafe { libc::madvise(region.as_ptr().cast(), size as usize, libc::MADV_HUGEPAGE) };
        Self::from_region(region, size, None)
    }

    /// A copy-on-write view of a template's memory file, 2 MiB-aligned (see
    /// [`AlignedMapping`]). Costs no time in proportion to `size`: pages are
    /// read (or copied) when first touched.
    pub fn private_file_mapping(file: File, size: u64) -> Result<Self, MemoryError> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
        let mapping = AlignedMapping::new(&file, size as usize, prot, flags).map_err(MemoryError::Mmap)?;
        // SAFETY: `mapping` is a live mapping of exactly `size` bytes, and
        // it is kept in the GuestRam, which drops it after the region.
        let region = unsafe {
            MmapRegionBuilder::new(size as usize)
                .with_file_offset(FileOffset::new(file, 0))
                .with_mmap_prot(prot)
                .with_mmap_flags(flags)
                .with_raw_mmap_pointer(mapping.as_ptr())
        }
        .build()
        .map_err(|source| MemoryError::Map { size, source })?;
        Self::from_region(region, size, Some(mapping))
    }

    fn from_region(
        region: vm_memory::MmapRegion,
        size: u64,
        mapping: Option<AlignedMapping>,
    ) -> Result<Self, MemoryError> {
        let host_base = region.as_ptr();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::Region)?;
        let memory = GuestMemoryMmap::from_regions(vec![region]).map_err(|_| MemoryError::Region)?;
        Ok(Self {
            memory,
            host_base,
            size,
            private_huge: Vec::new(),
            _mapping: mapping,
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host virtual address of guest-physical 0, for the KVM memory slot.
    pub fn host_address(&self) -> u64 {
        self.host_base as u64
    }

    fn check(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(MemoryError::OutOfRange {
                gpa,
                len,
                size: self.size,
            }),
        }
    }

    /// Borrows guest memory as bytes. The caller must not run the vCPU while
    /// holding the slice (the VMM runs the vCPU on the thread that owns this).
    pub fn slice(&self, gpa: u64, len: usize) -> Result<&[u8], MemoryError> {
        self.check(gpa, len as u64)?;
        // SAFETY: the range was bounds-checked against the live mapping, which
        // outlives the borrow of `self`.
        Ok(unsafe { std::slice::from_raw_parts(self.host_base.add(gpa as usize), len) })
    }

    /// Mutable variant of [`GuestRam::slice`].
    pub fn slice_mut(&mut self, gpa: u64, len: usize) -> Result<&mut [u8], MemoryError> {
        self.check(gpa, len as u64)?;
        // SAFETY: bounds-checked as above; `&mut self` makes this the only
        // host-side view for the duration of the borrow.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.host_base.add(gpa as usize), len) })
    }

    /// Copies `len` bytes of `reader` into guest memory at `gpa`.
    pub fn load(&mut self, gpa: u64, reader: &mut impl Read, len: u64) -> Result<(), MemoryError> {
        let dst = self.slice_mut(gpa, len as usize)?;
        reader.read_exact(dst).map_err(MemoryError::Read)
    }

    /// Copies the data of `file` (`len` bytes, holes skipped) into guest
    /// memory at `gpa`, which must be zero there already: a 1 GiB disk
    /// image that is mostly holes costs its data, not a gigabyte.
    pub fn load_sparse(&mut self, gpa: u64, file: &std::fs::File, len: u64) -> Result<(), MemoryError> {
        use std::os::unix::fs::FileExt;
        let dst = self.slice_mut(gpa, len as usize)?;
        for (start, end) in data_runs(file, len).map_err(MemoryError::Read)? {
            file.read_exact_at(&mut dst[start as usize..end as usize], start)
                .map_err(MemoryError::Read)?;
        }
        Ok(())
    }

    /// Bytes of copy-on-write copies this mapping holds: the `Anonymous` field
    /// of its /proc/self/smaps entry. (Its `Private_Clean` also counts
    /// template page-cache pages that only this process maps; those are shared
    /// with every other fork, not owned by this one.)
    pub fn copied_bytes(&self) -> Result<u64, MemoryError> {
        self.smaps_bytes(&["Anonymous:"])
    }

    /// Bytes of this mapping the host maps with 2 MiB pages (`FilePmdMapped`
    /// plus `AnonHugePages` in smaps): where the guest maps 2 MiB pages too,
    /// KVM covers each with one entry (see [`AlignedMapping`]).
    pub fn huge_mapped_bytes(&self) -> Result<u64, MemoryError> {
        self.smaps_bytes(&["FilePmdMapped:", "AnonHugePages:"])
    }

    /// The sum of `fields` over the /proc/self/smaps entries of guest
    /// memory (one mapping, split where [`GuestRam::make_private_huge`]
    /// replaced ranges), in bytes.
    fn smaps_bytes(&self, fields: &[&str]) -> Result<u64, MemoryError> {
        let (base, end) = (self.host_address(), self.host_address() + self.size);
        Ok(smaps_kib(base, end, fields).map_err(MemoryError::Smaps)? * 1024)
    }

    /// The file this memory is a private mapping of, if it is one.
    /// A read-only view of the memory file this memory maps, if any:
    /// through a mapping, not pread, for the page cache's sake (see
    /// make_private_huge).
    fn file_view(&self) -> Result<Option<AlignedMapping>, MemoryError> {
        let Some(source) = self.backing_file() else {
            return Ok(None);
        };
        AlignedMapping::new(source, self.size as usize, libc::PROT_READ, libc::MAP_SHARED)
            .map(Some)
            .map_err(MemoryError::Read)
    }

    fn backing_file(&self) -> Option<&File> {
        use vm_memory::GuestMemoryRegion;
        self.memory.iter().next()?.file_offset().map(FileOffset::file)
    }

    /// Replaces the 2 MiB guest range at `gpa` with a private anonymous
    /// 2 MiB page holding a copy of it from the file this memory maps,
    /// before the guest runs ([`crate::ForkMemory`]). If the host has no
    /// huge page to give, the copy is in 4 KiB pages: correct, only slower.
    pub fn make_private_huge(&mut self, gpa: u64) -> Result<(), MemoryError> {
        let len = HUGE_PAGE_SIZE as usize;
        if !gpa.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(MemoryError::OutOfRange {
                gpa,
                len: HUGE_PAGE_SIZE,
                size: self.size,
            });
        }
        self.check(gpa, HUGE_PAGE_SIZE)?;
        let at = self.host_base.wrapping_add(gpa as usize);
        // The copy is made aside and then moved into place, because it reads
        // the file through this memory's own mapping, not with pread. A
        // page-cache miss there reads the 2 MiB around it into one folio
        // (MADV_HUGEPAGE, see AlignedMapping), which forks that only read the
        // range then map whole. pread's readahead had filled neighbouring
        // ranges with small folios, and they stay cached for every later
        // fork: 20 of 153 ranges of the python template, numpy's code among
        // them, took numpy's first exec from 2.2 to 6.4 ms.
        let staging = HugeStaging::new()?;
        // SAFETY: `at..at + len` is inside this GuestRam's mapping (checked
        // above) and readable; the staging page is `len` writable bytes of
        // our own; they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(at.cast_const(), staging.start, len) };
        staging.move_to(at)?;
        self.private_huge.push(gpa);
        Ok(())
    }

    /// Backs `runs` (guest-physical `(gpa, len)`, 2 MiB-aligned, zero in
    /// the file) with anonymous memory instead of the file, advised huge:
    /// a write to one 2 MiB page of them then costs one host huge page
    /// instead of 512 copy-on-write copies of file pages, and KVM can map
    /// it with one 2 MiB entry ([`zeroboot_protocol::fresh`]). Contents
    /// stay zero. Only before the guest runs.
    pub fn map_fresh(&mut self, runs: &[(u64, u64)]) -> Result<(), MemoryError> {
        for &(gpa, len) in runs {
            if !gpa.is_multiple_of(HUGE_PAGE_SIZE) || !len.is_multiple_of(HUGE_PAGE_SIZE) {
                return Err(MemoryError::OutOfRange {
                    gpa,
                    len,
                    size: self.size,
                });
            }
            self.check(gpa, len)?;
            let at = self.host_base.wrapping_add(gpa as usize).cast::<libc::c_void>();
            // SAFETY: `at..at + len` is inside this GuestRam's own mapping
            // (checked above), which no vCPU runs on yet; MAP_FIXED replaces
            // those pages of it and nothing else.
            let mapped = unsafe {
                libc::mmap(
                    at,
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if mapped == libc::MAP_FAILED {
                return Err(MemoryError::Mmap(std::io::Error::last_os_error()));
            }
            // SAFETY: advice on the pages just mapped. A hint: without it the
            // pages are still zero, only in 4 KiB pieces.
            unsafe { libc::madvise(at, len as usize, libc::MADV_HUGEPAGE) };
        }
        Ok(())
    }

    /// The whole 2 MiB pages of `runs` (guest-physical `(gpa, len)`) that
    /// hold only zeros, coalesced, in order: what a snapshot stores as holes,
    /// and so what a fork may back with fresh anonymous memory
    /// ([`GuestRam::map_fresh`]). Pages outside this memory are left out.
    pub fn zero_huge_pages(&self, runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let huge = HUGE_PAGE_SIZE;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &(gpa, len) in runs {
            let end = gpa.saturating_add(len).min(self.size);
            for block in (gpa.div_ceil(huge)..end / huge).map(|b| b * huge) {
                let zero = self
                    .slice(block, huge as usize)
                    .is_ok_and(|bytes| bytes.iter().all(|&b| b == 0));
                if !zero {
                    continue;
                }
                match out.last_mut() {
                    Some((at, n)) if *at + *n == block => *n += huge,
                    _ => out.push((block, huge)),
                }
            }
        }
        out
    }

    /// Writes the memory file's contents back over `runs` (guest-physical
    /// `(gpa, len)`), which keep being this mapping's own pages: KVM's
    /// mappings of them stay as they are, writable. Where the fresh heap
    /// replaced the file (holes in it), the file reads as the zeros the
    /// heap held.
    pub fn copy_back_from_file(&mut self, runs: &[(u64, u64)]) -> Result<(), MemoryError> {
        self.with_file(runs, |mine, original| mine.copy_from_slice(original))
    }

    /// Whether any byte of `runs` differs from the memory file (read as in
    /// [`GuestRam::copy_back_from_file`]).
    pub fn differs_from_file(&mut self, runs: &[(u64, u64)]) -> Result<bool, MemoryError> {
        let mut differs = false;
        self.with_file(runs, |mine, original| differs |= mine != original)?;
        Ok(differs)
    }

    /// Calls `each` with every run of `runs` in this mapping and in the
    /// memory file (nothing without one).
    fn with_file(&mut self, runs: &[(u64, u64)], mut each: impl FnMut(&mut [u8], &[u8])) -> Result<(), MemoryError> {
        let Some(file) = self.file_view()? else {
            return Ok(());
        };
        let original = file.as_slice();
        for &(gpa, len) in runs {
            let at = gpa as usize;
            let end = at.checked_add(len as usize).filter(|&end| end <= original.len());
            let Some(end) = end else {
                return Err(MemoryError::OutOfRange {
                    gpa,
                    len,
                    size: self.size,
                });
            };
            each(self.slice_mut(gpa, len as usize)?, &original[at..end]);
        }
        Ok(())
    }

    /// Drops this mapping's own copies of the pages in `gpa..gpa+len`
    /// (page-aligned): they read from the memory file again, or as zeros
    /// in the fresh heap's anonymous memory, which the snapshot stored as
    /// holes. KVM drops its mappings of them too (its MMU notifier).
    pub fn discard_copies(&mut self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::Discard(std::io::Error::from_raw_os_error(libc::EINVAL)));
        }
        let bytes = self.slice_mut(gpa, len as usize)?;
        // SAFETY: the range is page-aligned and inside this mapping, which
        // is private: MADV_DONTNEED only drops the process's own copies,
        // and no reference into the range outlives `bytes`.
        if unsafe { libc::madvise(bytes.as_mut_ptr().cast(), bytes.len(), libc::MADV_DONTNEED) } != 0 {
            return Err(MemoryError::Discard(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Makes this mapping hold its own copy of every page in `gpa..gpa+len`
    /// (contents unchanged), as a write would.
    pub fn touch_for_write(&mut self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let bytes = self.slice_mut(gpa, len as usize)?;
        for offset in (0..bytes.len()).step_by(PAGE_SIZE as usize) {
            // A volatile write of the byte already there: the compiler may
            // not drop it, and the kernel copies the page on the write fault.
            let p: *mut u8 = &mut bytes[offset];
            // SAFETY: `p` points into `bytes`, a live mutable slice of this mapping.
            unsafe { std::ptr::write_volatile(p, std::ptr::read_volatile(p)) };
        }
        Ok(())
    }

    /// Guest-physical runs `(gpa, len)` of the pages this mapping holds
    /// copies of (copy-on-write copies, or pages swapped out), from
    /// /proc/self/pagemap; in ranges made private whole, only the pages
    /// that differ from the file. Everything else still reads from the file.
    pub fn private_runs(&self) -> Result<Vec<(u64, u64)>, MemoryError> {
        use std::io::{Read, Seek, SeekFrom};
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE_OR_SHARED: u64 = 1 << 61;
        // Mapped by this process only: what tells a page this mapping wrote
        // from the shared zero page that a read of anonymous memory maps
        // (which has no FILE_OR_SHARED bit either).
        const EXCLUSIVE: u64 = 1 << 56;
        let mut pagemap = File::open("/proc/self/pagemap").map_err(MemoryError::Pagemap)?;
        let pages = self.size / PAGE_SIZE;
        pagemap
            .seek(SeekFrom::Start(self.host_address() / PAGE_SIZE * 8))
            .map_err(MemoryError::Pagemap)?;
        let mut private = Vec::new();
        let mut buf = vec![0u8; 8 * 4096];
        let mut page = 0u64;
        while page < pages {
            let count = (pages - page).min(4096) as usize;
            pagemap
                .read_exact(&mut buf[..count * 8])
                .map_err(MemoryError::Pagemap)?;
            for entry in buf[..count * 8].chunks_exact(8) {
                let mut word = [0u8; 8];
                word.copy_from_slice(entry);
                let bits = u64::from_le_bytes(word);
                let is_private =
                    (bits & PRESENT != 0 && bits & FILE_OR_SHARED == 0 && bits & EXCLUSIVE != 0) || bits & SWAPPED != 0;
                if is_private {
                    private.push(page * PAGE_SIZE);
                }
                page += 1;
            }
        }
        // Ranges made private whole hold copies the guest never changed:
        // keep only the pages that now differ from the file.
        let file = if self.private_huge.is_empty() {
            None
        } else {
            self.file_view()?
        };
        if let Some(file) = file {
            let original = file.as_slice();
            let page = PAGE_SIZE as usize;
            let mut changed = Vec::with_capacity(private.len());
            for gpa in private {
                let whole = self.private_huge.contains(&(gpa / HUGE_PAGE_SIZE * HUGE_PAGE_SIZE));
                let at = gpa as usize;
                if whole && self.slice(gpa, page)? == &original[at..at + page] {
                    continue;
                }
                changed.push(gpa);
            }
            private = changed;
        }
        Ok(page_runs(private))
    }

    /// Writes guest memory to `file` as a sparse file: all-zero pages become
    /// holes, which read back as zeros when the file is mapped.
    pub fn write_sparse(&self, file: &mut File) -> Result<u64, MemoryError> {
        let page = PAGE_SIZE as usize;
        let all = self.slice(0, self.size as usize)?;
        let mut written = 0u64;
        let mut offset = 0usize;
        while offset < all.len() {
            // Write runs of consecutive non-zero pages in one call.
            let start = offset;
            while offset < all.len() && all[offset..offset + page].iter().any(|&b| b != 0) {
                offset += page;
            }
            if offset > start {
                file.write_all_at(&all[start..offset], start as u64)
                    .map_err(MemoryError::Write)?;
                written += (offset - start) as u64;
            } else {
                offset += page;
            }
        }
        file.set_len(self.size).map_err(MemoryError::Write)?;
        file.flush().map_err(MemoryError::Write)?;
        Ok(written)
    }
}

impl GuestRam {
    /// Guest memory as vm-memory's trait object, for the kernel loader.
    pub fn backend(&self) -> &impl GuestMemoryBackend {
        &self.memory
    }
}

/// The ranges of `file` below `size` that hold data (`SEEK_DATA` to
/// `SEEK_HOLE`), as (start, end), in order; holes read as zeros.
pub(crate) fn data_runs(file: &std::fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on an fd this function borrows; no pointers.
        let at = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `offset`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut runs = Vec::new();
    let mut at = 0;
    while at < size {
        let Some(data) = seek(at, libc::SEEK_DATA)? else { break };
        if data >= size {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        runs.push((data, hole));
        at = hole.max(data + 1);
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_runs_merge_adjacent_pages() {
        assert_eq!(
            page_runs([0x1000, 0x2000, 0x3000, 0x8000, 0xa000, 0xb000]),
            vec![(0x1000, 0x3000), (0x8000, 0x1000), (0xa000, 0x2000)]
        );
        assert_eq!(page_runs([]), vec![]);
    }

    /// A new, empty file of this test process's own, readable and writable.
    fn scratch_file(name: &str) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("zeroboot-{name}-{}", std::process::id()));
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    #[test]
    fn sparse_write_round_trips() {
        let mut ram = GuestRam::anonymous(64 * PAGE_SIZE).unwrap();
        ram.slice_mut(PAGE_SIZE * 3, 4).unwrap().copy_from_slice(b"abcd");
        ram.slice_mut(PAGE_SIZE * 40 + 100, 1).unwrap()[0] = 9;
        let (path, mut file) = scratch_file("mem");
        let written = ram.write_sparse(&mut file).unwrap();
        assert_eq!(written, 2 * PAGE_SIZE);
        let copy = GuestRam::private_file_mapping(File::open(&path).unwrap(), 64 * PAGE_SIZE).unwrap();
        assert_eq!(copy.slice(PAGE_SIZE * 3, 4).unwrap(), b"abcd");
        assert_eq!(copy.slice(PAGE_SIZE * 40 + 100, 1).unwrap(), &[9]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn copied_bytes_counts_only_written_pages() {
        let path = std::env::temp_dir().join(format!("zeroboot-cow-{}", std::process::id()));
        std::fs::write(&path, vec![1u8; 16 * PAGE_SIZE as usize]).unwrap();
        let mut ram = GuestRam::private_file_mapping(File::open(&path).unwrap(), 16 * PAGE_SIZE).unwrap();
        assert_eq!(
            ram.slice(0, 16 * PAGE_SIZE as usize)
                .unwrap()
                .iter()
                .map(|&b| b as u64)
                .sum::<u64>(),
            16 * PAGE_SIZE
        );
        assert_eq!(ram.copied_bytes().unwrap(), 0, "reads copy nothing");
        ram.slice_mut(PAGE_SIZE * 2, 1).unwrap()[0] = 9;
        ram.slice_mut(PAGE_SIZE * 7, 1).unwrap()[0] = 9;
        assert_eq!(ram.copied_bytes().unwrap(), 2 * PAGE_SIZE);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn file_mappings_start_on_a_huge_page_boundary() {
        let path = std::env::temp_dir().join(format!("zeroboot-aligned-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 3 * HUGE_PAGE_SIZE as usize]).unwrap();
        for _ in 0..4 {
            let ram = GuestRam::private_file_mapping(File::open(&path).unwrap(), 3 * HUGE_PAGE_SIZE).unwrap();
            assert_eq!(ram.host_address() % HUGE_PAGE_SIZE, 0);
            assert_eq!(ram.slice(3 * HUGE_PAGE_SIZE - 1, 1).unwrap(), &[7]);
        }
        // Each mapping and its reservation are gone once dropped.
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(!maps.contains(path.to_str().unwrap()), "{maps}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_range_made_private_whole_keeps_its_contents_and_reports_only_changes() {
        let path = std::env::temp_dir().join(format!("zeroboot-private-huge-{}", std::process::id()));
        let contents: Vec<u8> = (0..2 * HUGE_PAGE_SIZE).map(|i| (i / PAGE_SIZE) as u8).collect();
        std::fs::write(&path, &contents).unwrap();
        let mut ram = GuestRam::private_file_mapping(File::open(&path).unwrap(), 2 * HUGE_PAGE_SIZE).unwrap();
        assert!(ram.make_private_huge(PAGE_SIZE).is_err(), "unaligned");
        ram.make_private_huge(HUGE_PAGE_SIZE).unwrap();
        assert_eq!(ram.slice(0, contents.len()).unwrap(), contents.as_slice());
        assert_eq!(ram.private_runs().unwrap(), vec![], "a copy is not a change");
        ram.slice_mut(HUGE_PAGE_SIZE + 5 * PAGE_SIZE + 7, 1).unwrap()[0] = 0xee;
        ram.slice_mut(3 * PAGE_SIZE, 1).unwrap()[0] = 0xee;
        assert_eq!(
            ram.private_runs().unwrap(),
            vec![(3 * PAGE_SIZE, PAGE_SIZE), (HUGE_PAGE_SIZE + 5 * PAGE_SIZE, PAGE_SIZE)]
        );
        assert!(ram.copied_bytes().unwrap() >= HUGE_PAGE_SIZE + PAGE_SIZE);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn zero_huge_pages_are_whole_2_mib_pages_of_zeros_coalesced() {
        const M: u64 = 1 << 20;
        let mut ram = GuestRam::anonymous(32 * M).unwrap();
        ram.slice_mut(4 * M + 4096, 1).unwrap()[0] = 1;
        ram.slice_mut(21 * M, 1).unwrap()[0] = 1;
        let runs = [(2 * M, 8 * M), (20 * M, 4 * M), (30 * M, 4 * M), (M, M)];
        assert_eq!(
            ram.zero_huge_pages(&runs),
            vec![(2 * M, 2 * M), (6 * M, 4 * M), (22 * M, 2 * M), (30 * M, 2 * M)]
        );
        assert_eq!(ram.zero_huge_pages(&[]), vec![]);
    }

    #[test]
    fn fresh_memory_reads_zero_and_counts_as_private_once_written() {
        let size = 8 << 20;
        let (path, file) = scratch_file("fresh");
        std::fs::remove_file(&path).unwrap();
        file.set_len(size).unwrap();
        file.write_all_at(&[7u8; 4096], 0).unwrap();
        let mut ram = GuestRam::private_file_mapping(file, size).unwrap();
        ram.map_fresh(&[(2 << 20, 4 << 20)]).unwrap();
        assert_eq!(ram.slice(0, 1).unwrap(), &[7]);
        assert!(ram.slice(2 << 20, 4 << 20).unwrap().iter().all(|&b| b == 0));
        assert_eq!(ram.private_runs().unwrap(), vec![], "reads are not copies");
        ram.slice_mut(3 << 20, 1).unwrap()[0] = 1;
        let runs = ram.private_runs().unwrap();
        assert!(
            runs.iter().any(|&(gpa, len)| gpa <= 3 << 20 && (3 << 20) < gpa + len),
            "{runs:?}"
        );
        assert!(ram.map_fresh(&[(1 << 20, 2 << 20)]).is_err(), "not aligned");
        assert!(ram.map_fresh(&[(6 << 20, 4 << 20)]).is_err(), "past the end");
    }

    #[test]
    fn out_of_range_is_an_error() {
        let ram = GuestRam::anonymous(16 * PAGE_SIZE).unwrap();
        assert!(ram.slice(15 * PAGE_SIZE, PAGE_SIZE as usize + 1).is_err());
        assert!(ram.slice(u64::MAX, 2).is_err());
    }
}
