//! zeroboot's engine, a synchronous library: **boot** a guest kernel,
//! **snapshot** it when its agent is ready, and **restore** new VMs from the
//! snapshot, each with copy-on-write guest memory.
//!
//! - [`kvm`]: every KVM ioctl.
//! - [`boot`]: kernel loading and the 64-bit boot protocol.
//! - [`layout`], [`memory`]: guest-physical layout and guest memory.
//! - [`devices`]: the serial console.
//! - [`snapshot`]: the state file format and template files.
//! - [`guest_kernel`]: guest kernel state the host rewrites in each fork.
//! - [`machine`]: a running VM and its exit loop.

pub mod boot;
pub mod devices;
pub mod guest_kernel;
pub mod kvm;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod snapshot;

pub use kvm::Hypervisor;
pub use machine::{BootSpec, Machine, MachineError};
pub use snapshot::Snapshot;
