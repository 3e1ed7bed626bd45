//! Devices the VMM emulates in user space. Everything else (PIC, IOAPIC,
//! LAPIC, PIT) is KVM's.

pub mod serial;
pub mod virtio;
pub mod zeroing;
