//! Every KVM ioctl zeroboot makes lives here.
//!
//! The rest of the engine sees [`Hypervisor`], [`Vm`] and [`Vcpu`], which own
//! the file descriptors, and the plain state structures in
//! [`crate::snapshot::state`].

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_enable_cap, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_msr_entry,
    kvm_pit_config, kvm_regs, kvm_sregs, kvm_userspace_memory_region, CpuId, Msrs, KVM_CAP_EXIT_ON_EMULATION_FAILURE,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;
use crate::snapshot::state::{VcpuState, VmState};

/// `MSR_IA32_TSC`: restored first so that MSRs relative to it (TSC deadline)
/// land after it.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `MSR_IA32_TSC_DEADLINE`: the LAPIC timer's next expiry in TSC-deadline mode.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// kvmclock's wall clock, old and new numbers: setting either makes KVM write
/// the host's wall clock into the guest page it names.
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// Steal time: while set, KVM writes the guest page it names on vCPU entries.
pub const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
/// Identity-map and TSS pages that VMX needs below 4 GiB, out of the guest's way.
const TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error(
        "cannot open /dev/kvm ({0}); zeroboot needs KVM: check that /dev/kvm exists and that you may read and write it"
    )]
    Open(kvm_ioctls::Error),
    #[error("KVM lacks a capability zeroboot needs: {0}")]
    MissingCap(&'static str),
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused MSR {index:#x} on restore")]
    Msr { index: u32 },
}

fn ioctl<T>(what: &'static str, result: Result<T, kvm_ioctls::Error>) -> Result<T, KvmError> {
    result.map_err(|source| KvmError::Ioctl { what, source })
}

/// The open `/dev/kvm` plus what it told us about the host.
pub struct Hypervisor {
    kvm: Kvm,
    msr_indices: Vec<u32>,
    supported_cpuid: Vec<kvm_cpuid_entry2>,
}

impl Hypervisor {
    pub fn open() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let list = ioctl("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list())?;
        let mut msr_indices = vec![MSR_IA32_TSC];
        msr_indices.extend(list.as_slice().iter().copied().filter(|&i| i != MSR_IA32_TSC));
        let cpuid = ioctl(
            "KVM_GET_SUPPORTED_CPUID",
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        Ok(Self {
            kvm,
            msr_indices,
            supported_cpuid: cpuid.as_slice().to_vec(),
        })
    }

    pub fn supported_cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.supported_cpuid
    }

    pub fn create_vm(&self) -> Result<Vm, KvmError> {
        let fd = ioctl("KVM_CREATE_VM", self.kvm.create_vm())?;
        // Only needed by VMX; harmless elsewhere.
        ioctl("KVM_SET_TSS_ADDR", fd.set_tss_address(TSS_ADDRESS))?;
        Ok(Vm {
            fd,
            msr_indices: self.msr_indices.clone(),
            has_pit: false,
        })
    }
}

pub struct Vm {
    fd: VmFd,
    msr_indices: Vec<u32>,
    /// Whether [`Vm::create_pit`] made one.
    has_pit: bool,
}

impl Vm {
    /// Registers all of `ram` as memory slot 0.
    ///
    /// Ordering: register memory *before* creating the irqchip and PIT. On
    /// this host the same slot costs about 8 ms after KVM_CREATE_IRQCHIP and
    /// well under 1 ms before it (shared/docs/host-kvm.md).
    pub fn set_memory(&self, ram: &GuestRam) -> Result<(), KvmError> {
        self.set_memory_slot(0, ram, 0, ram.size())
    }

    /// Registers `[gpa, gpa + len)` of `ram` as memory slot `slot`.
    pub fn set_memory_slot(&self, slot: u32, ram: &GuestRam, gpa: u64, len: u64) -> Result<(), KvmError> {
        if gpa.checked_add(len).is_none_or(|end| end > ram.size()) {
            return Err(KvmError::Ioctl {
                what: "KVM_SET_USER_MEMORY_REGION",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: ram.host_address() + gpa,
        };
        // SAFETY: the region lies inside `ram`'s mapping (checked above), and
        // the caller keeps `ram` alive as long as this VM (Machine owns both,
        // VM dropped first).
        ioctl("KVM_SET_USER_MEMORY_REGION", unsafe {
            self.fd.set_user_memory_region(region)
        })
    }

    /// Makes KVM leave the VM (`KVM_EXIT_INTERNAL_ERROR`) on every
    /// instruction it fails to emulate. By default it does so only in guest
    /// kernel mode, and in user mode injects #UD: an instruction fetched
    /// from memory that has no slot yet is such a failure (KVM cannot read
    /// its bytes), and a lazy slot must be registered for it to run. (On
    /// kvm_pvm such failures exit in user mode anyway.)
    pub fn exit_on_emulation_failure(&self) -> Result<(), KvmError> {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE,
            args: [1, 0, 0, 0],
            ..Default::default()
        };
        ioctl("KVM_ENABLE_CAP", self.fd.enable_cap(&cap))
    }

    /// Creates the in-kernel PIC, IOAPIC and LAPIC support.
    pub fn create_irqchip(&self) -> Result<(), KvmError> {
        ioctl("KVM_CREATE_IRQCHIP", self.fd.create_irq_chip())
    }

    /// Creates the in-kernel PIT. Call after [`Vm::create_irqchip`]. Only
    /// a booting guest needs one (it calibrates against it and ticks on it
    /// until the LAPIC timer takes over): each costs a kernel thread
    /// (`kvm-pit/<pid>`), whose start waits for kthreadd.
    pub fn create_pit(&mut self) -> Result<(), KvmError> {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        ioctl("KVM_CREATE_PIT2", self.fd.create_pit2(pit))?;
        self.has_pit = true;
        Ok(())
    }

    /// Routes `event` to interrupt line `gsi` (an ISA IRQ on the PIC/IOAPIC).
    pub fn register_irq(&self, event: &EventFd, gsi: u32) -> Result<(), KvmError> {
        ioctl("KVM_IRQFD", self.fd.register_irqfd(event, gsi))
    }

    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, KvmError> {
        let fd = ioctl("KVM_CREATE_VCPU", self.fd.create_vcpu(id))?;
        Ok(Vcpu {
            fd,
            msr_indices: self.msr_indices.clone(),
        })
    }

    fn get_chip(&self, chip_id: u32) -> Result<kvm_irqchip, KvmError> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        ioctl("KVM_GET_IRQCHIP", self.fd.get_irqchip(&mut chip))?;
        Ok(chip)
    }

    pub fn save_state(&self) -> Result<VmState, KvmError> {
        Ok(VmState {
            pic_master: self.get_chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.get_chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.get_chip(KVM_IRQCHIP_IOAPIC)?,
            pit: if self.has_pit {
                ioctl("KVM_GET_PIT2", self.fd.get_pit2())?
            } else {
                Default::default()
            },
            clock: ioctl("KVM_GET_CLOCK", self.fd.get_clock())?,
        })
    }

    /// The PIT's state is restored only where [`Vm::create_pit`] made one.
    ///
    /// Ordering: call after [`Vm::create_irqchip`] and before the
    /// vCPU's LAPIC is restored, so that interrupts pending in the PIC/IOAPIC
    /// are routed to a LAPIC that already exists.
    pub fn restore_state(&self, state: &VmState) -> Result<(), KvmError> {
        ioctl("KVM_SET_IRQCHIP(pic master)", self.fd.set_irqchip(&state.pic_master))?;
        ioctl("KVM_SET_IRQCHIP(pic slave)", self.fd.set_irqchip(&state.pic_slave))?;
        ioctl("KVM_SET_IRQCHIP(ioapic)", self.fd.set_irqchip(&state.ioapic))?;
        if self.has_pit {
            ioctl("KVM_SET_PIT2", self.fd.set_pit2(&state.pit))?;
        }
        // KVM_SET_CLOCK accepts only KVM_CLOCK_REALTIME (and ignores the
        // read-only flags); we restore kvmclock exactly as it was, so the guest's
        // monotonic clock continues from the snapshot.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        ioctl("KVM_SET_CLOCK", self.fd.set_clock(&clock))
    }
}

/// Why `KVM_RUN` returned.
#[derive(Debug)]
pub enum Exit<'a> {
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// `immediate_exit` was set or a signal arrived: the vCPU stopped cleanly.
    Interrupted,
    Hlt,
    Shutdown,
    /// KVM failed to emulate an instruction; see [`Vcpu::internal_error_suberror`].
    InternalError,
    FailEntry {
        reason: u64,
    },
    Other(String),
}

pub struct Vcpu {
    fd: VcpuFd,
    msr_indices: Vec<u32>,
}

impl Vcpu {
    pub fn run(&mut self) -> Result<Exit<'_>, KvmError> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Ok(Exit::Interrupted),
            Err(source) => {
                return Err(KvmError::Ioctl {
                    what: "KVM_RUN",
                    source,
                })
            }
        };
        Ok(match exit {
            VcpuExit::IoOut(port, data) => Exit::IoOut { port, data },
            VcpuExit::IoIn(port, data) => Exit::IoIn { port, data },
            VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
            VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
            VcpuExit::Intr => Exit::Interrupted,
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::FailEntry(reason, _) => Exit::FailEntry { reason },
            VcpuExit::InternalError => Exit::InternalError,
            other => Exit::Other(format!("{other:?}")),
        })
    }

    /// The suberror of the last `KVM_EXIT_INTERNAL_ERROR`.
    pub fn internal_error_suberror(&mut self) -> u32 {
        // SAFETY: read right after KVM_EXIT_INTERNAL_ERROR, which fills the
        // `internal` member of the exit union.
        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror }
    }

    /// With `true`, the next `KVM_RUN` returns at once after completing any
    /// pending I/O (api.rst, `immediate_exit`).
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }

    pub fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<(), KvmError> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| KvmError::MissingCap("CPUID table too large"))?;
        ioctl("KVM_SET_CPUID2", self.fd.set_cpuid2(&cpuid))
    }

    /// The guest's TSC as KVM computes it now. Where KVM cannot offset the
    /// guest's RDTSC (kvm_pvm), this is the host's TSC whatever was restored.
    pub fn tsc(&self) -> Result<u64, KvmError> {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .map_err(|_| KvmError::MissingCap("too many MSRs"))?;
        match ioctl("KVM_GET_MSRS", self.fd.get_msrs(&mut msrs))? {
            1 => Ok(msrs.as_slice()[0].data),
            _ => Err(KvmError::Msr { index: MSR_IA32_TSC }),
        }
    }

    pub fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), KvmError> {
        let mut rest = entries;
        while !rest.is_empty() {
            let msrs = Msrs::from_entries(rest).map_err(|_| KvmError::MissingCap("too many MSRs"))?;
            let done = ioctl("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
            if done < rest.len() {
                return Err(KvmError::Msr {
                    index: rest[done].index,
                });
            }
            rest = &rest[done..];
        }
        Ok(())
    }

    pub fn regs(&self) -> Result<kvm_regs, KvmError> {
        ioctl("KVM_GET_REGS", self.fd.get_regs())
    }

    pub fn set_regs(&self, regs: &kvm_regs) -> Result<(), KvmError> {
        ioctl("KVM_SET_REGS", self.fd.set_regs(regs))
    }

    pub fn sregs(&self) -> Result<kvm_sregs, KvmError> {
        ioctl("KVM_GET_SREGS", self.fd.get_sregs())
    }

    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), KvmError> {
        ioctl("KVM_SET_SREGS", self.fd.set_sregs(sregs))
    }

    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), KvmError> {
        ioctl("KVM_SET_FPU", self.fd.set_fpu(fpu))
    }

    pub fn lapic(&self) -> Result<kvm_lapic_state, KvmError> {
        ioctl("KVM_GET_LAPIC", self.fd.get_lapic())
    }

    pub fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<(), KvmError> {
        ioctl("KVM_SET_LAPIC", self.fd.set_lapic(lapic))
    }

    /// Reads every MSR KVM offers. KVM_GET_MSRS stops at the first MSR it
    /// cannot read, so on a short read we skip that one and carry on.
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>, KvmError> {
        let mut out = Vec::with_capacity(self.msr_indices.len());
        let mut rest: &[u32] = &self.msr_indices;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> = rest
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::MissingCap("too many MSRs"))?;
            let read = ioctl("KVM_GET_MSRS", self.fd.get_msrs(&mut msrs))?;
            out.extend_from_slice(&msrs.as_slice()[..read]);
            rest = rest.get(read + 1..).unwrap_or(&[]);
        }
        Ok(out)
    }

    /// Reads all vCPU state. The vCPU must be stopped with no I/O pending:
    /// after an I/O or MMIO exit, run once with `immediate_exit` first.
    pub fn save_state(&self) -> Result<VcpuState, KvmError> {
        let cpuid = ioctl("KVM_GET_CPUID2", self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?;
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            regs: self.regs()?,
            sregs: self.sregs()?,
            fpu: (&ioctl("KVM_GET_FPU", self.fd.get_fpu())?).into(),
            xsave: self.fd.get_xsave().ok(),
            xcrs: self.fd.get_xcrs().ok(),
            lapic: self.lapic()?,
            msrs: self.read_msrs()?,
            vcpu_events: ioctl("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events())?,
            mp_state: ioctl("KVM_GET_MP_STATE", self.fd.get_mp_state())?,
            debug_regs: ioctl("KVM_GET_DEBUGREGS", self.fd.get_debug_regs())?,
            tsc_khz: self.fd.get_tsc_khz().ok(),
        })
    }

    /// Restores everything [`Vcpu::save_state`] read. The order is KVM's:
    /// - CPUID first: KVM derives which MSRs and XSAVE features exist from it.
    /// - SREGS before LAPIC: SREGS carries APIC_BASE, which enables the LAPIC.
    /// - XSAVE/XCRS after SREGS: CR4.OSXSAVE decides whether XCR0 is writable.
    /// - MSRs after SREGS and LAPIC: EFER and the TSC-deadline timer depend on
    ///   both; the TSC is first in the list so the deadline lands after it.
    /// - vCPU events last: they may carry a pending exception or interrupt that
    ///   must be injected into the fully restored state.
    ///
    /// `msrs` replaces `state.msrs`, so the caller can adjust timers.
    pub fn restore_state(&self, state: &VcpuState, msrs: &[kvm_msr_entry]) -> Result<(), KvmError> {
        self.set_cpuid(&state.cpuid)?;
        if let Some(khz) = state.tsc_khz {
            // A host with another TSC rate cannot always scale; the guest's
            // kvmclock copes with a different rate, so this is best effort.
            if self.fd.get_tsc_khz().ok() != Some(khz) {
                let _ = self.fd.set_tsc_khz(khz);
            }
        }
        ioctl("KVM_SET_MP_STATE", self.fd.set_mp_state(state.mp_state))?;
        self.set_sregs(&state.sregs)?;
        self.set_regs(&state.regs)?;
        match &state.xsave {
            // SAFETY: the buffer is a kvm_xsave read from KVM_GET_XSAVE on this
            // vendor (checked when the snapshot was opened).
            Some(xsave) => ioctl("KVM_SET_XSAVE", unsafe { self.fd.set_xsave(xsave) })?,
            None => self.set_fpu(&(&state.fpu).into())?,
        }
        if let Some(xcrs) = &state.xcrs {
            ioctl("KVM_SET_XCRS", self.fd.set_xcrs(xcrs))?;
        }
        self.set_lapic(&state.lapic)?;
        self.set_msrs(msrs)?;
        ioctl("KVM_SET_DEBUGREGS", self.fd.set_debug_regs(&state.debug_regs))?;
        ioctl("KVM_SET_VCPU_EVENTS", self.fd.set_vcpu_events(&state.vcpu_events))
    }
}
