//! Virtio devices on the virtio-mmio transport. The guest kernel finds them
//! on its command line (`virtio_mmio.device=`): there is no PCI or ACPI.

pub mod mmio;
pub mod net;
