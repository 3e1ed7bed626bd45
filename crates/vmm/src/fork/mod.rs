//! Forking sandboxes from a template, optionally from a pool of VMs made
//! ahead of time.
//!
//! Most of a fork's setup does not depend on when it starts: creating the VM,
//! mapping and registering guest memory, the irqchip and PIT, the vCPU and the
//! snapshot's vCPU state. A [`Template`] with a pool does that on a background
//! thread and keeps a few such [`Shell`]s ready. [`Template::fork`] then only
//! does what must happen at the start: fresh CRNG keys, the VM's device and
//! clock state, the console, the clock re-base and the timer. Each shell is
//! used once, so every sandbox is still a new VM that nothing else has run in.

pub(crate) mod policy;
pub(crate) mod pool;

pub use policy::{ForkMemory, ForkMemoryPolicy};
pub use pool::{Demand, ReadyPool, Refill};

use std::io::Write;
use std::sync::Arc;

use crate::kvm::Hypervisor;
use crate::machine::{LiveSnapshot, Machine, MachineError, Shell};
use crate::snapshot::{MachineState, Snapshot};
use zeroboot_protocol::Request;

/// How long a template's probe may run in a VM prepared ahead: well past
/// the tens of milliseconds one takes, short of a stuck pool.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

struct Shared {
    hv: Hypervisor,
    snapshot: Snapshot,
    policy: ForkMemoryPolicy,
}

/// An opened template: the decoded state and the memory file, opened once
/// and shared by every fork, and how each fork's memory is backed.
pub struct Template {
    // Field order is drop order: the pool (and its thread) goes first.
    pool: Option<ReadyPool<Result<Shell, MachineError>>>,
    shared: Arc<Shared>,
}

impl Template {
    /// Forks without a pool: each fork makes its shell itself, while its
    /// request waits (so `policy` sees [`Demand::Behind`]).
    pub fn new(hv: Hypervisor, snapshot: Snapshot, policy: ForkMemoryPolicy) -> Self {
        Self {
            pool: None,
            shared: Arc::new(Shared { hv, snapshot, policy }),
        }
    }

    /// Keeps up to `shells` VMs ready on a background thread, each backed
    /// as `policy` says for the demand the pool sees. Each costs a KVM VM
    /// and vCPU (a few file descriptors) and the page tables of its memory
    /// mapping while it waits.
    pub fn with_pool(hv: Hypervisor, snapshot: Snapshot, shells: usize, policy: ForkMemoryPolicy) -> Self {
        let shared = Arc::new(Shared { hv, snapshot, policy });
        let source = shared.clone();
        let make = move |demand| {
            lower_priority();
            Shell::new(&source.hv, &source.snapshot, source.policy.for_fork(demand))
        };
        let pool = ReadyPool::start("zeroboot-shells", shells, make, Result::is_err);
        Self { pool, shared }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.shared.snapshot
    }

    /// A new sandbox: a new KVM VM whose memory is a private copy-on-write
    /// mapping of the template's, ready to run from the snapshot.
    pub fn fork(&self, console: Box<dyn Write + Send>) -> Result<Machine, MachineError> {
        // The pool makes the next shell once this fork has started (`_refill`).
        let (shell, _refill) = match self.pool.as_ref().and_then(ReadyPool::take) {
            Some((shell, refill)) => (shell?, Some(refill)),
            // Empty pool (or none): make one here rather than wait.
            None => (self.shell_on_demand()?, None),
        };
        Machine::from_shell(shell, &self.shared.snapshot.state, console)
    }

    fn shell_on_demand(&self) -> Result<Shell, MachineError> {
        let fork_memory = self.shared.policy.for_fork(Demand::Behind);
        Shell::new(&self.shared.hv, &self.shared.snapshot, fork_memory)
    }

    /// The part of a fork that may happen ahead of time: a [`Shell`] over
    /// the template, its memory backed as `fork_memory` says.
    /// [`Template::start`] finishes it.
    ///
    /// With [`ForkMemory::SharedPages`] and `probes` (code the template
    /// answers, such as its runtime's print probe, which the host knows),
    /// the VM also runs each probe and is rewound
    /// ([`Machine::into_shell`]): its memory and vCPU are the snapshot's
    /// again, but KVM's shadow page tables keep the pages the probes read.
    /// Under shadow paging a fork's first exec is mostly first touches of
    /// pages it only reads, one fault each (a `print(1+1)`: about 110, in
    /// 2 MiB ranges the fork also writes, which the host maps 4 KiB at a
    /// time); a request like a probe then meets few of them. Costs the
    /// probes' run and the rewind, here, before any request. A probe that
    /// fails, or a VM that cannot be rewound, leaves a VM made without
    /// them ([`Probes::Refused`] says why).
    pub fn prepare(&self, fork_memory: ForkMemory, probes: &[Vec<u8>]) -> Result<Prepared, MachineError> {
        let shell = Shell::new(&self.shared.hv, &self.shared.snapshot, fork_memory)?;
        if fork_memory != ForkMemory::SharedPages || probes.is_empty() {
            return Ok(Prepared {
                shell,
                live_state: None,
                probes: Probes::NotRun,
            });
        }
        Ok(match self.run_and_rewind(shell, probes) {
            Ok(shell) => Prepared {
                shell,
                live_state: None,
                probes: Probes::Ran,
            },
            Err(e) => Prepared {
                shell: Shell::new(&self.shared.hv, &self.shared.snapshot, fork_memory)?,
                live_state: None,
                probes: Probes::Refused(e.to_string()),
            },
        })
    }

    fn run_and_rewind(&self, shell: Shell, probes: &[Vec<u8>]) -> Result<Shell, MachineError> {
        let snapshot = &self.shared.snapshot;
        let mut machine = Machine::from_shell(shell, &snapshot.state, Box::new(std::io::sink()))?;
        for code in probes {
            let outcome = machine.exec(&Request::new(code.as_slice(), b""), PROBE_TIMEOUT)?;
            if outcome.exit_code != 0 {
                return Err(MachineError::NotRewindable("a probe failed"));
            }
        }
        machine.into_shell(snapshot, probes.len() as u64)
    }

    /// [`Template::prepare`] for a fork of `live`.
    pub fn prepare_live(&self, live: LiveSnapshot) -> Result<Prepared, MachineError> {
        Ok(Prepared {
            shell: self.live_shell(&live)?,
            live_state: Some(live.state),
            probes: Probes::NotRun,
        })
    }

    fn live_shell(&self, live: &LiveSnapshot) -> Result<Shell, MachineError> {
        let mut shell = Shell::with_state(&self.shared.hv, &self.shared.snapshot, &live.state)?;
        shell.overlay(&live.pages)?;
        Ok(shell)
    }

    /// Finishes a prepared fork; the sandbox starts now.
    pub fn start(&self, prepared: Prepared, console: Box<dyn Write + Send>) -> Result<Machine, MachineError> {
        let state = prepared.live_state.as_deref().unwrap_or(&self.shared.snapshot.state);
        Machine::from_shell(prepared.shell, state, console)
    }

    /// A new sandbox that starts where `live` (a sandbox forked from this
    /// template) was when it was captured. Like any fork it is a new VM with
    /// fresh CRNG keys and the clock re-based to now.
    pub fn fork_live(&self, live: &LiveSnapshot, console: Box<dyn Write + Send>) -> Result<Machine, MachineError> {
        Machine::from_shell(self.live_shell(live)?, &live.state, console)
    }
}

/// A fork prepared ahead of its start ([`Template::prepare`]): a VM that has
/// run nothing of a request (at most the template's probes, rewound), and
/// the state it starts from if that is not the template's.
pub struct Prepared {
    shell: Shell,
    live_state: Option<Box<MachineState>>,
    probes: Probes,
}

impl Prepared {
    /// What became of the probes it was given ([`Template::prepare`]).
    pub fn probes(&self) -> &Probes {
        &self.probes
    }
}

/// What became of the probes a VM prepared ahead was given.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Probes {
    /// None were given, or the VM's memory is not shared pages.
    NotRun,
    /// They ran, and the VM was rewound to the snapshot.
    Ran,
    /// They could not be run and undone (why); the VM was made again
    /// without them. The same template will refuse them again.
    Refused(String),
}

/// Runs the calling thread at a lower CPU priority, so that preparing VMs
/// gives way to sandboxes that are running code.
fn lower_priority() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on this thread's own id; a failure leaves the
    // priority as it was, which is harmless.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10) };
}
