//! A fork's KVM memory slots: which guest memory is registered when the VM
//! is made, and which only when the guest first touches it.
//!
//! KVM's shadow MMU (`tdp_mmu=N`, as where guest memory is shadow-paged)
//! allocates per-page arrays for every page of a slot when the slot is
//! made: about 10 bytes per 4 KiB, roughly 2.5 MiB of host memory per GiB,
//! whether the guest uses the memory or not. So the memory most sandboxes
//! never touch gets slots of its own, registered lazily: the disk, the
//! agent's fresh heap ([`zeroboot_protocol::fresh`]), and the memory the
//! template never wrote ([`crate::snapshot::unwritten`]), in chunks. Until then a guest
//! access there leaves the VM as MMIO (or, for an instruction KVM cannot
//! emulate, as an internal error); the host registers the slot and completes
//! the access, and every later access is ordinary memory.

use crate::kvm::{KvmError, Vm};
use crate::layout::MemoryLayout;
use crate::memory::GuestRam;

/// One guest-physical range with a slot of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    gpa: u64,
    len: u64,
}

impl Range {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa && gpa.saturating_add(len) <= self.gpa + self.len
    }
}

/// The slots of one VM: those registered up front, and the lazy ones with
/// whether each is registered yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Slots {
    eager: Vec<Range>,
    lazy: Vec<(Range, bool)>,
}

impl Slots {
    /// Everything in one slot: a VM that boots runs once and is not kept.
    pub(crate) fn all_eager(ram: &GuestRam) -> Self {
        Self {
            eager: vec![Range {
                gpa: 0,
                len: ram.size(),
            }],
            lazy: Vec::new(),
        }
    }

    /// A fork's slots: the disk and the `lazy` runs (`(gpa, len)`, 2 MiB
    /// aligned, ascending, below the disk) lazily, everything else eagerly.
    pub(crate) fn for_fork(layout: &MemoryLayout, ram_size: u64, lazy_runs: &[(u64, u64)]) -> Self {
        let end = if layout.disk_bytes > 0 {
            layout.disk_gpa
        } else {
            ram_size
        };
        let mut eager = Vec::new();
        let mut lazy = Vec::new();
        let mut at = 0;
        for &(gpa, len) in lazy_runs {
            if gpa < at || gpa.saturating_add(len) > end {
                continue;
            }
            if gpa > at {
                eager.push(Range { gpa: at, len: gpa - at });
            }
            lazy.push((Range { gpa, len }, false));
            at = gpa + len;
        }
        if end > at {
            eager.push(Range { gpa: at, len: end - at });
        }
        if layout.disk_bytes > 0 {
            lazy.push((
                Range {
                    gpa: layout.disk_gpa,
                    len: layout.disk_bytes,
                },
                false,
            ));
        }
        Self { eager, lazy }
    }

    /// The lazy runs, each with whether its slot is registered yet.
    pub(crate) fn lazy(&self) -> Vec<((u64, u64), bool)> {
        self.lazy.iter().map(|(r, done)| ((r.gpa, r.len), *done)).collect()
    }

    /// Registers the eager slots. Ordering: before the irqchip (see
    /// `Vm::set_memory`).
    pub(crate) fn register_eager(&self, vm: &Vm, ram: &GuestRam) -> Result<(), KvmError> {
        for (id, r) in self.eager.iter().enumerate() {
            vm.set_memory_slot(id as u32, ram, r.gpa, r.len)?;
        }
        Ok(())
    }

    /// Registers the lazy slot holding `gpa..gpa + len` if it is not yet;
    /// returns whether it did (the access was to memory, not a device).
    pub(crate) fn register_for(&mut self, vm: &Vm, ram: &GuestRam, gpa: u64, len: u64) -> Result<bool, KvmError> {
        match self.lazy.iter().position(|(r, done)| !done && r.contains(gpa, len)) {
            Some(i) => self.register(vm, ram, i).map(|()| true),
            None => Ok(false),
        }
    }

    /// Registers every lazy slot not registered yet; returns whether there
    /// was one. For an access the host cannot place (an instruction KVM
    /// could not emulate).
    pub(crate) fn register_all(&mut self, vm: &Vm, ram: &GuestRam) -> Result<bool, KvmError> {
        let mut any = false;
        for i in 0..self.lazy.len() {
            if !self.lazy[i].1 {
                self.register(vm, ram, i)?;
                any = true;
            }
        }
        Ok(any)
    }

    fn register(&mut self, vm: &Vm, ram: &GuestRam, i: usize) -> Result<(), KvmError> {
        let (r, done) = &mut self.lazy[i];
        vm.set_memory_slot((self.eager.len() + i) as u32, ram, r.gpa, r.len)?;
        *done = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    #[test]
    fn fresh_runs_and_the_disk_are_lazy_and_the_rest_is_covered_once() {
        let layout = MemoryLayout::new(1024, 64 * M, 256 * M).unwrap();
        let size = layout.total_bytes();
        let slots = Slots::for_fork(&layout, size, &[(100 * M, 50 * M), (300 * M, 2 * M)]);
        let eager: Vec<(u64, u64)> = slots.eager.iter().map(|r| (r.gpa, r.len)).collect();
        assert_eq!(
            eager,
            vec![(0, 100 * M), (150 * M, 150 * M), (302 * M, layout.disk_gpa - 302 * M)]
        );
        let lazy: Vec<(u64, u64)> = slots.lazy.iter().map(|(r, _)| (r.gpa, r.len)).collect();
        assert_eq!(
            lazy,
            vec![
                (100 * M, 50 * M),
                (300 * M, 2 * M),
                (layout.disk_gpa, layout.disk_bytes)
            ]
        );
        assert!(slots.lazy[0].0.contains(149 * M, 4096) && !slots.lazy[0].0.contains(150 * M - 1, 2));
    }

    #[test]
    fn runs_out_of_order_or_past_the_end_are_left_eager() {
        let layout = MemoryLayout::new(512, 64 * M, 0).unwrap();
        let size = layout.total_bytes();
        let slots = Slots::for_fork(&layout, size, &[(100 * M, 2 * M), (50 * M, 2 * M), (size, 2 * M)]);
        let eager: Vec<(u64, u64)> = slots.eager.iter().map(|r| (r.gpa, r.len)).collect();
        assert_eq!(eager, vec![(0, 100 * M), (102 * M, size - 102 * M)]);
        assert_eq!(slots.lazy.len(), 1);
    }
}
