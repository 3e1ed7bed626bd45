//! What a snapshot holds. Plain data: the KVM structures come from
//! kvm-bindings (which serialize them as raw bytes), the rest is ours.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use crate::guest_kernel::KernelSymbols;
use crate::layout::MemoryLayout;

/// x87/SSE state as KVM_GET_FPU reports it (used where XSAVE is unavailable).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM keeps for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// `None` where the host has no KVM_GET_XSAVE.
    pub xsave: Option<kvm_xsave>,
    pub xcrs: Option<kvm_xcrs>,
    pub lapic: kvm_lapic_state,
    /// Every MSR in KVM_GET_MSR_INDEX_LIST that KVM let us read; the TSC first.
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debug_regs: kvm_debugregs,
    pub tsc_khz: Option<u32>,
}

/// In-kernel devices of the VM.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The 16550 UART, as vm-superio models it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// A whole machine, minus its memory (which lives in its own file).
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    /// CPUID vendor string of the host that took the snapshot; a snapshot is
    /// only restored on the same vendor.
    pub cpu_vendor: String,
    pub layout: MemoryLayout,
    /// Where the guest kernel keeps the state each fork rewrites (`None` for
    /// a kernel booted without its System.map).
    pub kernel: Option<KernelSymbols>,
    /// Host wall-clock time of the snapshot, in nanoseconds since the epoch.
    pub saved_at_unix_ns: u64,
    /// Guest memory holding user-space random generator state, which the
    /// host overwrites before every request (registered by the agent).
    pub entropy: Vec<zeroboot_protocol::EntropyRegion>,
    /// Guest RAM the agent mapped ahead for the code's allocations
    /// (registered by the agent; see [`zeroboot_protocol::fresh`]): the whole
    /// 2 MiB pages of it that held only zeros when the snapshot was taken,
    /// which the memory file stores as holes. Worked out once, at the
    /// snapshot, so that a fork need not look for the holes.
    pub fresh: Vec<zeroboot_protocol::fresh::FreshRun>,
    pub vm: VmState,
    pub vcpu: VcpuState,
    pub serial: SerialState,
    /// The virtio-net device (`None`: as at power-on, never touched).
    pub net: Option<crate::devices::virtio::net::NetState>,
}
