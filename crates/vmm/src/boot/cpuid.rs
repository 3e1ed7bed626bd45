//! The CPUID table we give the guest.
//!
//! On real KVM this is what the guest sees. On this machine's kvm_pvm the
//! guest reads the host's CPUID regardless (shared/docs/host-kvm.md), so the
//! kernel command line and config keep the guest away from what it cannot
//! run; the table is still set so the same build is right on real hardware.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;

/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: MONITOR/MWAIT. The guest must idle with HLT, which KVM handles
/// in the kernel, not spin in MWAIT.
const ECX_MONITOR: u32 = 1 << 3;
/// Leaf 1 ECX: perfmon and debug capability MSR, which KVM does not model fully.
const ECX_PDCM: u32 = 1 << 15;
/// Leaf 1 ECX: TSC-deadline LAPIC timer, which KVM emulates.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: the guest has an APIC.
const EDX_APIC: u32 = 1 << 9;
/// Leaf 6 ECX: APERF/MPERF, meaningless for a vCPU.
const ECX_APERFMPERF: u32 = 1 << 0;

/// Adjusts KVM's supported CPUID for vCPU `apic_id` of a one-vCPU guest.
pub fn filter(supported: &[kvm_cpuid_entry2], apic_id: u8) -> Vec<kvm_cpuid_entry2> {
    let mut out = supported.to_vec();
    for entry in &mut out {
        match entry.function {
            LEAF_FEATURES => {
                entry.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                entry.ecx &= !(ECX_MONITOR | ECX_PDCM);
                entry.edx |= EDX_APIC;
                // EBX[31:24] initial APIC id, [23:16] logical processors.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(apic_id) << 24) | (1 << 16);
            }
            LEAF_THERMAL_POWER => entry.ecx &= !ECX_APERFMPERF,
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                // One thread per core, one core: every level holds one logical CPU.
                entry.edx = u32::from(apic_id);
                entry.ebx = if entry.index <= 1 { 1 } else { 0 };
            }
            _ => {}
        }
    }
    out
}

/// Feature registers a snapshot's guest may have relied on: (leaf, subleaf,
/// register name, bits that change at run time and say nothing of the CPU).
const FEATURE_REGISTERS: [(u32, u32, Register, u32); 9] = [
    // OSXSAVE follows the guest's CR4.
    (0x1, 0, Register::Ecx, 1 << 27),
    (0x1, 0, Register::Edx, 0),
    (0x7, 0, Register::Ebx, 0),
    // OSPKE follows the guest's CR4.
    (0x7, 0, Register::Ecx, 1 << 4),
    (0x7, 0, Register::Edx, 0),
    (0x7, 1, Register::Eax, 0),
    (0xd, 1, Register::Eax, 0),
    (0x8000_0001, 0, Register::Ecx, 0),
    (0x8000_0001, 0, Register::Edx, 0),
];

#[derive(Debug, Clone, Copy)]
enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Register {
    fn name(self) -> &'static str {
        match self {
            Self::Eax => "eax",
            Self::Ebx => "ebx",
            Self::Ecx => "ecx",
            Self::Edx => "edx",
        }
    }

    fn of(self, entry: &mut kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Self::Eax => &mut entry.eax,
            Self::Ebx => &mut entry.ebx,
            Self::Ecx => &mut entry.ecx,
            Self::Edx => &mut entry.edx,
        }
    }

    fn read(self, mut entry: kvm_cpuid_entry2) -> u32 {
        *self.of(&mut entry)
    }
}

/// `entry` answers leaf `leaf`, subleaf `sub`. A subleaf counts only where
/// the entry says so: KVM leaves `index` unset in leaves without subleaves.
fn answers(entry: &kvm_cpuid_entry2, leaf: u32, sub: u32) -> bool {
    entry.function == leaf && (entry.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || entry.index == sub)
}

/// The CPUID table a guest restored here may see: the one this host gives a
/// new guest ([`filter`]), with the host's own feature bits added. Where
/// guest user mode runs natively (kvm_pvm, shared/docs/host-kvm.md) the
/// `cpuid` instruction answers from the host, not from the table, and a
/// snapshot's saved table holds those bits; on real KVM the two agree.
pub fn host_features(supported: &[kvm_cpuid_entry2]) -> Vec<kvm_cpuid_entry2> {
    let mut table = filter(supported, 0);
    for (leaf, sub, register, _) in FEATURE_REGISTERS {
        let native = std::arch::x86_64::__cpuid_count(leaf, sub);
        let native = kvm_cpuid_entry2 {
            eax: native.eax,
            ebx: native.ebx,
            ecx: native.ecx,
            edx: native.edx,
            ..Default::default()
        };
        if let Some(entry) = table.iter_mut().find(|e| answers(e, leaf, sub)) {
            *register.of(entry) |= register.read(native);
        }
    }
    table
}

/// The CPU features a snapshot's table (`saved`) has that this host's
/// (`host`, as [`host_features`] makes it) lacks, one line per register:
/// code restored from the snapshot may already have chosen to use them
/// (numpy picks its kernels when it is imported).
pub fn missing_features(saved: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<String> {
    let find = |table: &[kvm_cpuid_entry2], leaf: u32, sub: u32| table.iter().find(|e| answers(e, leaf, sub)).copied();
    let mut missing = Vec::new();
    for (leaf, sub, register, dynamic) in FEATURE_REGISTERS {
        let Some(saved) = find(saved, leaf, sub) else { continue };
        let had = register.read(saved) & !dynamic;
        let has = find(host, leaf, sub).map_or(0, |e| register.read(e));
        let lacking = had & !has;
        if lacking != 0 {
            let name = register.name();
            missing.push(format!("CPUID leaf {leaf:#x}.{sub} {name} bits {lacking:#010x}"));
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_the_host_lacks_are_named_and_run_time_bits_are_not() {
        let saved = [
            entry(0x7, 0, 1 << 16 | 1 << 5, 1 << 4, 0),
            entry(0x1, 0, 0, 1 << 27 | 1, 0),
        ];
        let host = [entry(0x7, 0, 1 << 5, 0, 0), entry(0x1, 0, 0, 1, 0)];
        assert_eq!(
            missing_features(&saved, &host),
            ["CPUID leaf 0x7.0 ebx bits 0x00010000"]
        );
        assert!(missing_features(&saved, &saved).is_empty());
    }

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_is_adjusted() {
        let host = [entry(1, 0, 0xff08_0800, ECX_MONITOR | ECX_PDCM | 1, 0)];
        let out = filter(&host, 0);
        assert_eq!(out[0].ecx & ECX_HYPERVISOR, ECX_HYPERVISOR);
        assert_eq!(out[0].ecx & (ECX_MONITOR | ECX_PDCM), 0);
        assert_eq!(out[0].ecx & 1, 1, "unrelated bits are kept");
        assert_eq!(out[0].edx & EDX_APIC, EDX_APIC);
        assert_eq!(out[0].ebx >> 24, 0);
        assert_eq!((out[0].ebx >> 16) & 0xff, 1);
        assert_eq!(out[0].ebx & 0xffff, 0x0800, "CLFLUSH size and brand are kept");
    }

    #[test]
    fn topology_reports_one_cpu() {
        let host = [
            entry(0xb, 0, 2, 0x100, 7),
            entry(0xb, 1, 64, 0x201, 7),
            entry(0xb, 2, 0, 2, 7),
        ];
        let out = filter(&host, 0);
        assert_eq!(
            out.iter().map(|e| (e.ebx, e.edx)).collect::<Vec<_>>(),
            vec![(1, 0), (1, 0), (0, 0)]
        );
    }

    #[test]
    fn thermal_and_others() {
        let host = [entry(6, 0, 0, 1 | 8, 0), entry(0x4000_0000, 0, 0x4b4d_564b, 0, 0)];
        let out = filter(&host, 0);
        assert_eq!(out[0].ecx, 8);
        assert_eq!(out[1], host[1], "leaves we do not know pass through");
    }
}
