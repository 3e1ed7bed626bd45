//! Snapshots on disk: `state.bin` (the [`MachineState`], see [`codec`]) and
//! `memory.bin` (guest memory, a sparse file mapped `MAP_PRIVATE` by forks).

pub mod codec;
pub mod live;
pub mod state;
pub mod unwritten;
pub mod write_set;

use crate::memory::{GuestRam, HUGE_PAGE_SIZE};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use codec::CodecError;
pub use state::MachineState;
pub use write_set::{WriteSet, WRITE_SET_FILE};

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
    #[error(
        "{path}: its agent speaks mailbox protocol {found} (magic {magic:#x}), this zeroboot speaks {expected}: \
         the template was built by another zeroboot; rebuild it (zeroboot template build --name NAME --force)",
        expected = zeroboot_protocol::VERSION
    )]
    Protocol { path: PathBuf, magic: u32, found: u32 },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
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

/// A template opened for forking: the decoded state and the memory file.
pub struct Snapshot {
    pub dir: PathBuf,
    /// Boxed, like every copy of a [`MachineState`] a fork moves: it is
    /// about 8 KiB (the xsave area, the LAPIC, the irqchips), and a worker
    /// cloned from its zygote copies each stack page it touches, so a
    /// by-value move through a few frames costs private pages per sandbox.
    pub state: Box<MachineState>,
    memory: File,
    /// Guest pages forks usually write ([`WRITE_SET_FILE`]); empty if none.
    pub write_set: WriteSet,
    /// The agent's fresh memory ([`MachineState::fresh`]) as `(gpa, len)`
    /// runs of whole 2 MiB pages: forks back them with anonymous memory of
    /// their own ([`crate::memory::GuestRam::map_fresh`]).
    pub fresh: Vec<(u64, u64)>,
    /// Guest memory the template never wrote and forks do not write
    /// ([`unwritten::unwritten_chunks`]): forks register its KVM slots only
    /// when the guest touches it.
    pub unwritten: Vec<(u64, u64)>,
    /// Root-image memory the snapshot's process does not map
    /// ([`unwritten::unmapped_image_chunks`]): registered lazily too.
    pub unmapped_image: Vec<(u64, u64)>,
}

/// The guest-physical runs that user-mode pages of the snapshot's process
/// map, read from its page tables through a mapping of `memory`; None if
/// the file cannot be mapped (then no image chunk is lazy).
fn user_mapped(memory: &File, state: &MachineState) -> Option<Vec<(u64, u64)>> {
    let ram = GuestRam::private_file_mapping(memory.try_clone().ok()?, state.layout.total_bytes()).ok()?;
    let leaves = crate::page_tables::leaves(&ram, state.vcpu.sregs.cr3);
    Some(
        leaves
            .iter()
            .filter(|leaf| leaf.user)
            .map(|leaf| (leaf.gpa, leaf.size))
            .collect(),
    )
}

/// Checks the mailbox header the host wrote at boot: a fork's agent reads
/// requests where the protocol of the zeroboot that built it put them, so a
/// template of another protocol would misread every request.
fn check_mailbox(memory: &File, path: &Path, mailbox_gpa: u64) -> Result<(), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let mut start = [0u8; zeroboot_protocol::HEADER_ID_LEN];
    memory.read_exact_at(&mut start, mailbox_gpa).map_err(io_err(path))?;
    let (magic, found) = zeroboot_protocol::header_id(&start);
    if magic != zeroboot_protocol::MAGIC || found != zeroboot_protocol::VERSION {
        return Err(SnapshotError::Protocol {
            path: path.to_path_buf(),
            magic,
            found,
        });
    }
    Ok(())
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
        check_mailbox(&memory, &mem_path, state.layout.mailbox_gpa)?;
        // An unreadable or malformed write set only costs speed: ignore it.
        let write_set = std::fs::read_to_string(dir.join(WRITE_SET_FILE))
            .ok()
            .and_then(|text| WriteSet::parse(&text, expected))
            .unwrap_or_default();
        // Only whole 2 MiB pages of guest RAM below the mailbox may be
        // fresh; anything else in a state file is left out, which only
        // costs speed.
        let fresh: Vec<(u64, u64)> = state
            .fresh
            .iter()
            .filter(|r| {
                state.layout.ram_contains(r.gpa, r.len)
                    && r.gpa.is_multiple_of(HUGE_PAGE_SIZE)
                    && r.len.is_multiple_of(HUGE_PAGE_SIZE)
            })
            .map(|r| (r.gpa, r.len))
            .collect();
        let written: Vec<(u64, u64)> = write_set.runs().copied().collect();
        let unwritten = unwritten::unwritten_chunks(&memory, &state.layout, &written, &fresh);
        let unmapped_image = user_mapped(&memory, &state)
            .map(|mapped| unwritten::unmapped_image_chunks(&state.layout, &mapped, &written))
            .unwrap_or_default();
        Ok(Self {
            dir: dir.to_path_buf(),
            state: Box::new(state),
            memory,
            write_set,
            fresh,
            unwritten,
            unmapped_image,
        })
    }

    /// The runs of guest memory a fork registers lazily, besides the disk:
    /// the fresh runs, the unwritten chunks and, with `image`, the root
    /// image's unmapped chunks; ascending.
    pub fn lazy_runs(&self, image: bool) -> Vec<(u64, u64)> {
        let image = if image { &self.unmapped_image[..] } else { &[] };
        let mut runs: Vec<(u64, u64)> = (self.fresh.iter())
            .chain(&self.unwritten)
            .chain(image)
            .copied()
            .collect();
        runs.sort_unstable();
        // An image chunk that is a hole is unwritten as well.
        runs.dedup();
        runs
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
            layout: MemoryLayout::new(512, 1 << 20, 0).unwrap(),
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
            fresh: vec![zeroboot_protocol::fresh::FreshRun {
                gpa: 0x1000_0000,
                len: 64 << 20,
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
            net: None,
        }
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
        assert!(matches!(
            codec::decode(&bad),
            Err(CodecError::Version { found: 99, .. })
        ));
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
        assert!(matches!(codec::decode(&bad), Err(CodecError::TooLarge { .. })));
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
        // A memory file of the right size whose mailbox header is another
        // protocol's, then this one's.
        let layout = sample_state().layout;
        let memory = File::create(dir.join(MEMORY_FILE)).unwrap();
        memory.set_len(layout.total_bytes()).unwrap();
        let mut header = zeroboot_protocol::MAGIC.to_le_bytes().to_vec();
        header.extend_from_slice(&(zeroboot_protocol::VERSION - 1).to_le_bytes());
        use std::os::unix::fs::FileExt;
        memory.write_all_at(&header, layout.mailbox_gpa).unwrap();
        let err = Snapshot::open(&dir, "GenuineIntel").err().unwrap().to_string();
        let old = zeroboot_protocol::VERSION - 1;
        assert!(err.contains(&format!("mailbox protocol {old}")), "{err}");
        assert!(err.contains("rebuild it"), "{err}");
        memory
            .write_all_at(&zeroboot_protocol::VERSION.to_le_bytes(), layout.mailbox_gpa + 4)
            .unwrap();
        assert!(Snapshot::open(&dir, "GenuineIntel").is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
