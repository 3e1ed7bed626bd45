//! Snapshots on disk: `state.bin` (the [`MachineState`], see [`codec`]) and
//! `memory.bin` (guest memory, a sparse file mapped `MAP_PRIVATE` by forks).

pub mod codec;
pub mod state;

use crate::memory::{AlignedMapping, HUGE_PAGE_SIZE};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use codec::CodecError;
pub use state::MachineState;

pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.bin";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Codec { path: PathBuf, source: CodecError },
    #[error("{path}: memory file is {actual} bytes, the state expects {expected}: truncated or from another template")]
    MemorySize { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path}: taken on a {found} CPU, this host is {host}: snapshots only restore on the same CPU vendor")]
    Vendor { path: PathBuf, found: String, host: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

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
    use std::os::fd::AsRawFd;
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
    let mut data_ranges = std::collections::BTreeSet::new();
    let mut at = 0;
    while at < size {
        let Some(data) = seek(at, libc::SEEK_DATA)? else { break };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        // Extents need not be page-aligned; whole pages are read either way.
        let first = data / PAGE * PAGE;
        let end = (hole.div_ceil(PAGE) * PAGE).min(size);
        data_ranges.extend(first / HUGE_PAGE_SIZE..end.div_ceil(HUGE_PAGE_SIZE));
        for (i, chunk) in bytes[first as usize..end as usize].chunks(PAGE as usize).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                crc.update(&(first / PAGE + i as u64).to_le_bytes());
                crc.update(chunk);
            }
        }
        at = end.max(hole);
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

/// Writes the state file atomically (temporary file, then rename).
pub fn write_state(dir: &Path, state: &MachineState) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = codec::encode(state).map_err(|source| SnapshotError::Codec {
        path: path.clone(),
        source,
    })?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Reads and checks a state file. Reads at most the size limit, so a huge
/// file is rejected without being loaded.
pub fn read_state(path: &Path) -> Result<MachineState, SnapshotError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut bytes = Vec::new();
    file.take(codec::MAX_PAYLOAD + codec::HEADER_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    codec::decode(&bytes).map_err(|source| SnapshotError::Codec {
        path: path.to_path_buf(),
        source,
    })
}

/// How a fork's guest memory is backed, beyond the copy-on-write mapping
/// of the template's memory file that every fork starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ForkMemory {
    /// The pages of the template's write set are copied ahead, 4 KiB each;
    /// everything else stays shared until written (about 1.5 MiB per python
    /// fork).
    SharedPages,
    /// Every 2 MiB range that holds a page of the write set becomes a
    /// private 2 MiB page with a copy of the range, before the fork runs.
    /// Under shadow paging, where each first touch of a page is a VM exit,
    /// KVM then maps each such range with one exit instead of one per page
    /// touched; it costs 2 MiB of memory per range and fork (54 MiB for
    /// python) and the copy (docs/guest-kernel.md).
    PrivateWrittenRanges,
}

impl ForkMemory {
    /// [`ForkMemory::PrivateWrittenRanges`] where KVM shadow-pages guest
    /// memory (neither EPT nor NPT is on, e.g. `kvm_pvm`), whose first
    /// touches are expensive; [`ForkMemory::SharedPages`] otherwise.
    /// Read from sysfs once per process: every [`Snapshot::open`] (one in
    /// each worker) asks.
    pub fn for_this_host() -> Self {
        static HOST: std::sync::OnceLock<ForkMemory> = std::sync::OnceLock::new();
        *HOST.get_or_init(|| {
            let on = |path: &str| {
                std::fs::read_to_string(path)
                    .map(|v| matches!(v.trim(), "Y" | "1"))
                    .unwrap_or(false)
            };
            if on("/sys/module/kvm_intel/parameters/ept") || on("/sys/module/kvm_amd/parameters/npt") {
                Self::SharedPages
            } else {
                Self::PrivateWrittenRanges
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::SharedPages => "shared-pages",
            Self::PrivateWrittenRanges => "private-written-ranges",
        }
    }
}

/// Which [`ForkMemory`] a fork gets, where forks are prepared ahead by a
/// pool ([`crate::fork::ReadyPool`]) or made on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForkMemoryPolicy {
    /// Every fork gets this one.
    Fixed(ForkMemory),
    /// [`ForkMemory::PrivateWrittenRanges`] for a VM prepared while the
    /// pool keeps up with requests: its copy is paid before any request
    /// arrives, and its first exec is several times faster.
    /// [`ForkMemory::SharedPages`] for a VM made while requests wait (none
    /// was ready, or recently one was not): its preparation is on a
    /// request's clock or competes with running ones, and preparation plus
    /// first exec cost less CPU in all, which is what throughput under load
    /// is made of.
    Adaptive,
}

impl ForkMemoryPolicy {
    /// [`ForkMemoryPolicy::Adaptive`] where [`ForkMemory::for_this_host`]
    /// is `PrivateWrittenRanges`, else that mode, fixed.
    pub fn for_this_host() -> Self {
        match ForkMemory::for_this_host() {
            ForkMemory::PrivateWrittenRanges => Self::Adaptive,
            fixed => Self::Fixed(fixed),
        }
    }

    /// The mode for a VM made under `demand`.
    pub fn for_fork(self, demand: crate::fork::Demand) -> ForkMemory {
        match (self, demand) {
            (Self::Fixed(mode), _) => mode,
            (Self::Adaptive, crate::fork::Demand::KeptUp) => ForkMemory::PrivateWrittenRanges,
            (Self::Adaptive, crate::fork::Demand::Behind) => ForkMemory::SharedPages,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fixed(mode) => mode.name(),
            Self::Adaptive => "adaptive",
        }
    }
}

/// A template opened for forking: the decoded state and the memory file.
pub struct Snapshot {
    pub dir: PathBuf,
    pub state: MachineState,
    memory: File,
    /// Guest pages forks usually write ([`WRITE_SET_FILE`]); empty if none.
    pub write_set: Vec<(u64, u64)>,
    /// How forks back their memory; [`ForkMemory::for_this_host`] unless
    /// the caller sets it before making a [`crate::Template`].
    pub fork_memory: ForkMemory,
}

/// Guest-physical runs (`0x<gpa> <bytes>` a line) that forks of this
/// template usually write, recorded when it was built. Prepared VMs copy
/// them ahead of time, so the fork maps them writable at the first touch
/// instead of faulting twice (see `Shell::new`).
pub const WRITE_SET_FILE: &str = "write-set.txt";

/// Parses a write-set file; runs must be page-aligned and inside `size`.
pub fn parse_write_set(text: &str, size: u64) -> Option<Vec<(u64, u64)>> {
    let mut runs = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        let gpa = u64::from_str_radix(words.next()?.strip_prefix("0x")?, 16).ok()?;
        let len: u64 = words.next()?.parse().ok()?;
        let page = crate::layout::PAGE_SIZE;
        if !gpa.is_multiple_of(page) || !len.is_multiple_of(page) || gpa.checked_add(len)? > size {
            return None;
        }
        runs.push((gpa, len));
    }
    Some(runs)
}

/// Writes `runs` in the format [`parse_write_set`] reads.
pub fn format_write_set(runs: &[(u64, u64)]) -> String {
    runs.iter().map(|(gpa, len)| format!("{gpa:#x} {len}\n")).collect()
}

impl Snapshot {
    /// Opens `dir`, checking the state file and that the memory file matches it.
    /// `host_vendor` is the host's CPUID vendor string.
    pub fn open(dir: &Path, host_vendor: &str) -> Result<Self, SnapshotError> {
        let state = read_state(&dir.join(STATE_FILE))?;
        if state.cpu_vendor != host_vendor {
            return Err(SnapshotError::Vendor {
                path: dir.join(STATE_FILE),
                found: state.cpu_vendor.clone(),
                host: host_vendor.to_string(),
            });
        }
        let mem_path = dir.join(MEMORY_FILE);
        let memory = File::open(&mem_path).map_err(io_err(&mem_path))?;
        let actual = memory.metadata().map_err(io_err(&mem_path))?.len();
        let expected = state.layout.total_bytes();
        if actual != expected {
            return Err(SnapshotError::MemorySize {
                path: mem_path,
                expected,
                actual,
            });
        }
        // An unreadable or malformed write set only costs speed: ignore it.
        let write_set = std::fs::read_to_string(dir.join(WRITE_SET_FILE))
            .ok()
            .and_then(|text| parse_write_set(&text, expected))
            .unwrap_or_default();
        Ok(Self {
            dir: dir.to_path_buf(),
            state,
            memory,
            write_set,
            fork_memory: ForkMemory::for_this_host(),
        })
    }

    /// The 2 MiB-aligned guest-physical ranges that hold a page of the
    /// write set, ascending.
    pub fn written_ranges(&self) -> Vec<u64> {
        let huge = HUGE_PAGE_SIZE;
        let mut ranges: Vec<u64> = self
            .write_set
            .iter()
            .flat_map(|&(gpa, len)| (gpa / huge..(gpa + len).div_ceil(huge)).map(move |r| r * huge))
            .collect();
        ranges.dedup();
        ranges
    }

    pub fn memory_file(&self) -> Result<File, SnapshotError> {
        self.memory.try_clone().map_err(io_err(&self.dir.join(MEMORY_FILE)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::state::*;
    use super::*;
    use crate::layout::MemoryLayout;
    use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry};

    #[test]
    fn adaptive_fork_memory_copies_ranges_only_for_vms_made_ahead() {
        use crate::fork::Demand::{Behind, KeptUp};
        let adaptive = ForkMemoryPolicy::Adaptive;
        assert_eq!(adaptive.for_fork(KeptUp), ForkMemory::PrivateWrittenRanges);
        assert_eq!(adaptive.for_fork(Behind), ForkMemory::SharedPages);
        for mode in [ForkMemory::SharedPages, ForkMemory::PrivateWrittenRanges] {
            let fixed = ForkMemoryPolicy::Fixed(mode);
            assert_eq!((fixed.for_fork(KeptUp), fixed.for_fork(Behind)), (mode, mode));
        }
    }

    pub fn sample_state() -> MachineState {
        let mut vcpu = VcpuState {
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            }],
            regs: Default::default(),
            sregs: Default::default(),
            fpu: Default::default(),
            xsave: Some(Default::default()),
            xcrs: None,
            lapic: Default::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 123,
                ..Default::default()
            }],
            vcpu_events: Default::default(),
            mp_state: Default::default(),
            debug_regs: Default::default(),
            tsc_khz: Some(2_000_000),
        };
        vcpu.regs.rip = 0xdead_beef;
        MachineState {
            cpu_vendor: "GenuineIntel".into(),
            layout: MemoryLayout::new(512, 1 << 20).unwrap(),
            kernel: Some(crate::guest_kernel::KernelSymbols {
                base_crng: 0x1b9_df80,
                input_pool: 0x1ab_aba0,
                vdso_data: 0x1ad_4080,
                clock_rebased: 0x1b9_e000,
            }),
            saved_at_unix_ns: 1_700_000_000_000_000_000,
            entropy: vec![zeroboot_protocol::EntropyRegion {
                gpa: 0x20_0014,
                len: 2496,
                value: 0,
            }],
            vm: VmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpu,
            serial: SerialState {
                scratch: 7,
                ..Default::default()
            },
        }
    }

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

    #[test]
    fn written_ranges_cover_each_2_mib_range_of_the_write_set_once() {
        let mut snapshot = Snapshot {
            dir: PathBuf::new(),
            state: sample_state(),
            memory: File::open("/dev/null").unwrap(),
            write_set: vec![(0x1000, 0x2000), (0x1f_f000, 0x2000), (0x60_0000, 0x1000)],
            fork_memory: ForkMemory::SharedPages,
        };
        assert_eq!(snapshot.written_ranges(), vec![0, 0x20_0000, 0x60_0000]);
        snapshot.write_set.clear();
        assert_eq!(snapshot.written_ranges(), Vec::<u64>::new());
    }

    #[test]
    fn write_set_round_trips_and_rejects_bad_runs() {
        let runs = vec![(0x1000, 0x3000), (0x20_0000, 0x1000)];
        assert_eq!(parse_write_set(&format_write_set(&runs), 1 << 30), Some(runs));
        assert_eq!(parse_write_set("0x1001 4096\n", 1 << 30), None, "unaligned");
        assert_eq!(parse_write_set("0x1000 4096\n", 0x1800), None, "past the end");
        assert_eq!(parse_write_set("4096 4096\n", 1 << 30), None, "not hex");
        assert_eq!(parse_write_set("", 1 << 30), Some(vec![]));
    }

    #[test]
    fn codec_round_trip() {
        let bytes = codec::encode(&sample_state()).unwrap();
        let back = codec::decode(&bytes).unwrap();
        assert_eq!(back.vcpu.regs.rip, 0xdead_beef);
        assert_eq!(back.vcpu.msrs[0].data, 123);
        assert_eq!(back.vcpu.cpuid[0].eax, 0x806f8);
        assert_eq!(back.serial.scratch, 7);
        assert_eq!(back.layout, sample_state().layout);
        assert_eq!(back.vcpu.tsc_khz, Some(2_000_000));
        assert_eq!(back.kernel, sample_state().kernel);
        assert_eq!(back.saved_at_unix_ns, 1_700_000_000_000_000_000);
    }

    #[test]
    fn codec_rejects_corruption() {
        let good = codec::encode(&sample_state()).unwrap();
        assert!(matches!(codec::decode(&good[..10]), Err(CodecError::TooShort(10))));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(codec::decode(&bad), Err(CodecError::BadMagic)));
        let mut bad = good.clone();
        bad[8] = 99;
        assert!(matches!(codec::decode(&bad), Err(CodecError::Version { found: 99 })));
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(matches!(codec::decode(&bad), Err(CodecError::Checksum { .. })));
        assert!(matches!(
            codec::decode(&good[..good.len() - 1]),
            Err(CodecError::Truncated { .. })
        ));
        let mut bad = good.clone();
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(codec::decode(&bad), Err(CodecError::TooLarge(_))));
    }

    #[test]
    fn valid_crc_but_garbage_payload_is_a_decode_error() {
        let payload = vec![0xffu8; 64];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&codec::MAGIC);
        bytes.extend_from_slice(&codec::FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&payload);
        assert!(matches!(codec::decode(&bytes), Err(CodecError::Decode(_))));
    }

    #[test]
    fn open_names_the_file() {
        let dir = std::env::temp_dir().join(format!("zeroboot-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(STATE_FILE), b"garbage").unwrap();
        let err = Snapshot::open(&dir, "GenuineIntel").err().unwrap().to_string();
        assert!(err.contains("state.bin"), "{err}");
        assert!(err.contains("truncated"), "{err}");
        write_state(&dir, &sample_state()).unwrap();
        let err = Snapshot::open(&dir, "AuthenticAMD").err().unwrap().to_string();
        assert!(err.contains("vendor"), "{err}");
        let err = Snapshot::open(&dir, "GenuineIntel").err().unwrap().to_string();
        assert!(err.contains("memory.bin"), "{err}");
        std::fs::write(dir.join(MEMORY_FILE), b"short").unwrap();
        let err = Snapshot::open(&dir, "GenuineIntel").err().unwrap().to_string();
        assert!(err.contains("truncated or from another template"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
