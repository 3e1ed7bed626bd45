//! Sandboxes in their own processes.
//!
//! The engine ([`zeroboot_vmm`]) runs a VM on the calling thread. This crate
//! runs each sandbox's VM in a worker process of its own ([`worker`]) and
//! gives the host a handle to it ([`Sandbox`]), forked from an
//! [`IsolatedTemplate`] that can keep workers prepared ahead of time and
//! clones them from a [`zygote`]. The server and the benchmark use it; why
//! one process per VM is in [`worker`]'s documentation.

pub mod host;
mod process;
pub mod wire;
pub mod worker;
pub mod zygote;

pub use host::{IsolatedTemplate, Sandbox, SandboxError};
pub use process::{SpawnError, WorkerCommand};
pub use wire::Stats;
