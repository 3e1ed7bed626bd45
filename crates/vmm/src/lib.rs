//! zeroboot's engine, a synchronous library: **boot** a guest kernel,
//! **snapshot** it when its agent is ready, and **restore** new VMs from the
//! snapshot, each with copy-on-write guest memory.
//!
//! - [`kvm`]: every KVM ioctl.
//! - [`boot`]: kernel loading and the 64-bit boot protocol.
//! - [`layout`], [`memory`]: guest-physical layout and guest memory.
//! - [`devices`]: the serial console, and the virtio-mmio transport and
//!   virtio-net device.
//! - [`network`]: a machine's network device and the backend behind it.
//! - [`snapshot`]: the snapshot's file formats, and an opened snapshot.
//! - [`page_cache`]: how the host caches a memory file, and its repair.
//! - [`page_tables`]: the guest's page tables as the host reads them, for
//!   measuring what a fork touches.
//! - [`guest_kernel`], [`guest_clock`]: guest kernel state the host rewrites
//!   in each fork (CRNG keys, the clock).
//! - [`machine`]: a running VM and its exit loop.
//! - [`fork`]: [`fork::Template`], which forks sandboxes, from a pool of
//!   VMs prepared ahead of time if asked, with each fork's memory backed
//!   as its [`ForkMemoryPolicy`] says.

pub mod boot;
pub mod devices;
pub mod fork;
pub mod guest_clock;
pub mod guest_kernel;
pub mod kvm;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod network;
pub mod page_cache;
pub mod page_tables;
mod slots;
pub mod snapshot;

pub use fork::{ForkMemory, ForkMemoryPolicy, Template};
pub use kvm::Hypervisor;
pub use machine::{BootSpec, LiveSnapshot, Machine, MachineError};
pub use snapshot::Snapshot;
