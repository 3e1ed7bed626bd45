//! Booting a kernel from scratch: load the ELF `vmlinux`, write the command
//! line, zero page, GDT and page tables, and set up the vCPU for the 64-bit
//! boot protocol.

pub mod cpuid;
pub mod params;
pub mod regs;

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::kvm_msr_entry;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{elf::Elf, load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::kvm::{Hypervisor, KvmError, Vcpu};
use crate::layout::{
    MemoryLayout, CMDLINE_MAX_SIZE, CMDLINE_START, GDT_START, HIMEM_START, PAGE_SIZE, ZERO_PAGE_START,
};
use crate::memory::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot load kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("writing boot tables to guest memory: {0}")]
    GuestMemory(String),
    #[error("initramfs {path} ({size} bytes) does not fit below the mailbox")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
}

/// Loads the kernel, initramfs and boot tables into `ram`. Returns the entry point.
pub fn load(
    ram: &mut GuestRam,
    layout: &MemoryLayout,
    kernel: &Path,
    cmdline: &str,
    initrd: Option<&Path>,
) -> Result<u64, BootError> {
    let open = |path: &Path| {
        File::open(path).map_err(|source| BootError::Open {
            path: path.into(),
            source,
        })
    };
    let mut kernel_file = open(kernel)?;
    let loaded =
        Elf::load(ram.memory(), None, &mut kernel_file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::Kernel {
                path: kernel.into(),
                source,
            }
        })?;

    let mut line = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    line.insert_str(cmdline).map_err(BootError::Cmdline)?;
    load_cmdline(ram.memory(), GuestAddress(CMDLINE_START), &line)
        .map_err(|e| BootError::GuestMemory(e.to_string()))?;

    let initrd_range = match initrd {
        None => None,
        Some(path) => {
            let mut file = open(path)?;
            let size = file
                .metadata()
                .map_err(|source| BootError::Open {
                    path: path.into(),
                    source,
                })?
                .len();
            // Highest page-aligned spot below the mailbox, above the kernel.
            let addr = (layout.mailbox_gpa.saturating_sub(size)) & !(PAGE_SIZE - 1);
            if addr < loaded.kernel_end {
                return Err(BootError::InitrdTooLarge {
                    path: path.into(),
                    size,
                });
            }
            ram.load(addr, &mut file, size)?;
            Some((addr, size))
        }
    };

    let mem_err = |e: vm_memory::GuestMemoryError| BootError::GuestMemory(e.to_string());
    let zero_page = params::zero_page(layout, cmdline.len(), initrd_range);
    ram.memory()
        .write_obj(zero_page, GuestAddress(ZERO_PAGE_START))
        .map_err(mem_err)?;
    for (i, entry) in regs::GDT.iter().enumerate() {
        ram.memory()
            .write_obj(*entry, GuestAddress(GDT_START + i as u64 * 8))
            .map_err(mem_err)?;
    }
    for (addr, value) in regs::identity_page_tables() {
        ram.memory().write_obj(value, GuestAddress(addr)).map_err(mem_err)?;
    }
    Ok(loaded.kernel_load.0)
}

/// MSRs as the kernel expects them at entry: syscall MSRs clear, fast strings on.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (crate::kvm::MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets up vCPU 0 to enter the kernel at `entry`.
///
/// Ordering: CPUID first (KVM sizes MSRs and XSAVE from it), then MSRs,
/// registers, FPU, and the LAPIC last because it needs APIC_BASE from SREGS.
pub fn configure_vcpu(hv: &Hypervisor, vcpu: &Vcpu, entry: u64) -> Result<(), BootError> {
    vcpu.set_cpuid(&cpuid::filter(hv.supported_cpuid(), 0))?;
    vcpu.set_msrs(&boot_msrs())?;
    vcpu.set_regs(&regs::boot_regs(entry))?;
    vcpu.set_fpu(&regs::boot_fpu())?;
    vcpu.set_sregs(&regs::boot_sregs(vcpu.sregs()?))?;
    // Virtual-wire mode: LINT0 takes the PIC's interrupts (ExtINT), LINT1 is NMI.
    // Without ACPI or MP tables the kernel keeps the legacy PIC path.
    let mut lapic = vcpu.lapic()?;
    set_lvt(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic)?;
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut word = [0u8; 4];
    for (i, b) in word.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(word) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_mode() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0 + 1] = 0x07; // some mode bits set, to be replaced
        regs[APIC_LVT0] = 0x30u8 as std::os::raw::c_char; // vector, kept
        set_lvt(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0] as u8, 0x30);
        set_lvt(&mut regs, APIC_LVT1, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT1 + 1] as u8, 0x04);
    }

    #[test]
    fn boot_msrs_have_tsc_and_fast_strings() {
        let msrs = boot_msrs();
        assert!(msrs.iter().any(|m| m.index == 0x1a0 && m.data == 1));
        assert!(msrs.iter().any(|m| m.index == crate::kvm::MSR_IA32_TSC));
    }
}
