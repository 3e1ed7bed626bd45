//! The worker: one process per sandbox, holding one VM.
//!
//! Why a process each: while a vCPU runs, any change another thread makes to
//! the page tables of the same process (an `munmap` of a finished VM's
//! memory, a copy-on-write fault while preparing the next one, an allocator
//! returning memory) sends a TLB-shootdown IPI to the vCPU's CPU. Under
//! `kvm_pvm` each one costs the guest dearly: with one thread mapping,
//! touching and unmapping 1 MiB in a loop, a `print(1+1)` that takes 15 ms
//! took 1.8 s. A process of its own has nobody else changing its mappings.
//!
//! The worker reads [`Command`]s on stdin and writes [`Reply`]s on stdout;
//! nothing else may write to stdout. It ends at the end of its input, and
//! when its parent dies.

use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use zeroboot_protocol::Request;
use zeroboot_vmm::machine::cpu_vendor;
use zeroboot_vmm::{ForkMemory, ForkMemoryPolicy, Hypervisor, Machine, MachineError, Snapshot, Template};

use crate::wire::{read_frame, write_frame, Command, Failure, LiveParts, Reply, Stats, WireError};
use zeroboot_seccomp as seccomp;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the first command must be Prepare, got {0}")]
    NotPrepare(&'static str),
}

/// Runs a worker for the template in `dir` on this process's stdin and
/// stdout, until its input ends. Failures to make the VM go to the host as
/// a [`Reply::Failed`]; only a broken pipe is an error here.
pub fn serve(dir: &Path) -> Result<(), WorkerError> {
    die_with_parent();
    serve_opened(open(dir))
}

/// What a worker opens before it makes its VM: `/dev/kvm` and the template.
/// A zygote ([`crate::zygote`]) opens it once for every worker it clones.
pub(crate) struct Opened {
    hv: Hypervisor,
    snapshot: Snapshot,
}

pub(crate) fn open(dir: &Path) -> Result<Opened, Failure> {
    let other = |e: &dyn std::fmt::Display| Failure::Other(e.to_string());
    let hv = Hypervisor::open().map_err(|e| other(&e))?;
    let snapshot = Snapshot::open(dir, &cpu_vendor(&hv)).map_err(|e| other(&e))?;
    Ok(Opened { hv, snapshot })
}

/// [`serve`] with the template already opened (or not: the failure goes to
/// the host in answer to Prepare).
pub(crate) fn serve_opened(opened: Result<Opened, Failure>) -> Result<(), WorkerError> {
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = BufWriter::new(std::io::stdout().lock());
    let (live, fork_memory, may_network, probes) = match read_frame(&mut input) {
        Ok(Command::Prepare {
            live,
            fork_memory,
            network,
            probes,
        }) => (live, fork_memory, network, probes),
        Ok(other) => return Err(WorkerError::NotPrepare(name(&other))),
        Err(WireError::Closed) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let (template, prepared) = match opened.and_then(|opened| prepare(opened, live, fork_memory, &probes)) {
        Ok(made) => made,
        Err(failure) => return Ok(write_frame(&mut output, &Reply::Failed(failure))?),
    };
    write_frame(
        &mut output,
        &Reply::Prepared {
            probes: prepared.probes().clone(),
        },
    )?;
    // From the guest's first instruction on, the filter holds. Without a
    // network it is installed now, while the worker waits: installing one
    // costs ~140 µs here (the kernel compiles it), which a fork would
    // otherwise wait for. With a network it is installed after Start,
    // once the backend's thread runs (so no filter need allow starting
    // threads) and before the guest next runs. Building a filter
    // allocates, so both are built before the wait.
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    let kind = if may_network {
        seccomp::WorkerNetwork::Backend
    } else {
        seccomp::WorkerNetwork::None
    };
    let filtered = seccomp::worker_filter(pid, kind).and_then(|filter| {
        if !may_network {
            seccomp::install(&filter)?;
        }
        Ok(filter)
    });
    let network = match read_frame(&mut input) {
        Ok(Command::Start { network }) => network,
        Err(WireError::Closed) => return Ok(()),
        Ok(other) => {
            let failure = Failure::Other(format!("expected Start, got {}", name(&other)));
            return Ok(write_frame(&mut output, &Reply::Failed(failure))?);
        }
        Err(e) => return Err(e.into()),
    };
    let filter = match filtered {
        Ok(filter) => filter,
        Err(e) => return Ok(write_frame(&mut output, &Reply::Failed(Failure::Other(e.to_string())))?),
    };
    if network.is_some() && !may_network {
        let failure = Failure::Other("Start brought a network to a worker prepared without one".into());
        return Ok(write_frame(&mut output, &Reply::Failed(failure))?);
    }
    let mut machine = match template.start(prepared, Box::new(std::io::sink())) {
        Ok(m) => m,
        Err(e) => return Ok(write_frame(&mut output, &Reply::Failed(failure(e)))?),
    };
    if let Some(config) = network {
        if let Err(e) = machine.start_network(config) {
            return Ok(write_frame(&mut output, &Reply::Failed(failure(e)))?);
        }
    }
    if may_network {
        if let Err(e) = seccomp::install(&filter) {
            return Ok(write_frame(&mut output, &Reply::Failed(Failure::Other(e.to_string())))?);
        }
    }
    write_frame(&mut output, &Reply::Started)?;
    loop {
        let command = match read_frame(&mut input) {
            Ok(c) => c,
            Err(WireError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let reply = match command {
            Command::Exec { request, timeout } => exec(&mut machine, &request, timeout, &mut output)?,
            Command::SnapshotLive => match machine.snapshot_live() {
                Ok(live) => match LiveParts::from_live(&live) {
                    Ok(parts) => Reply::Live(parts),
                    Err(e) => Reply::Failed(Failure::Other(e.to_string())),
                },
                Err(e) => Reply::Failed(failure(e)),
            },
            Command::Stats => match (machine.ram().copied_bytes(), machine.ram().huge_mapped_bytes()) {
                (Ok(private_bytes), Ok(huge_mapped_bytes)) => Reply::Stats(Stats {
                    private_bytes,
                    huge_mapped_bytes,
                    exits: machine.exits(),
                }),
                (Err(e), _) | (_, Err(e)) => Reply::Failed(Failure::Other(e.to_string())),
            },
            Command::File { request, timeout } => match machine.file_op(&request, timeout) {
                Ok(reply) => Reply::File(reply),
                Err(e) => Reply::Failed(failure(e)),
            },
            Command::WriteDisk { offset, bytes } => match machine.write_disk(offset, &bytes) {
                Ok(()) => Reply::Written,
                Err(e) => Reply::Failed(failure(e)),
            },
            Command::ReadDisk { offset, len } => match machine.read_disk(offset, len as usize) {
                Ok(bytes) => Reply::Bytes(bytes.to_vec()),
                Err(e) => Reply::Failed(failure(e)),
            },
            other @ (Command::Prepare { .. } | Command::Start { .. }) => {
                Reply::Failed(Failure::Other(format!("{} was already done", name(&other))))
            }
        };
        write_frame(&mut output, &reply)?;
    }
}

fn prepare(
    Opened { hv, snapshot }: Opened,
    live: Option<LiveParts>,
    fork_memory: ForkMemory,
    probes: &[Vec<u8>],
) -> Result<(Template, zeroboot_vmm::fork::Prepared), Failure> {
    // This worker's one VM is made here, as the host chose.
    let template = Template::new(hv, snapshot, ForkMemoryPolicy::Fixed(fork_memory));
    let prepared = match live {
        None => template.prepare(fork_memory, probes),
        Some(parts) => template.prepare_live(parts.into_live().map_err(|e| Failure::Other(e.to_string()))?),
    }
    .map_err(failure)?;
    Ok((template, prepared))
}

fn exec(
    machine: &mut Machine,
    request: &Request,
    timeout: Duration,
    output: &mut impl Write,
) -> Result<Reply, WireError> {
    let result = if request.stream {
        // A chunk that cannot be sent means the host is gone; the exec still
        // ends at its deadline and the next write reports the broken pipe.
        machine.exec_streaming(request, timeout, &mut |chunk| {
            let _ = write_frame(output, &Reply::Chunk(chunk));
        })
    } else {
        machine.exec(request, timeout)
    };
    Ok(match result {
        Ok(outcome) => Reply::Done(outcome),
        Err(e) => Reply::Failed(failure(e)),
    })
}

fn failure(e: MachineError) -> Failure {
    match e {
        MachineError::Guest(fault) => Failure::Guest(fault),
        other => Failure::Other(other.to_string()),
    }
}

fn name(command: &Command) -> &'static str {
    match command {
        Command::Prepare { .. } => "Prepare",
        Command::Start { .. } => "Start",
        Command::Exec { .. } => "Exec",
        Command::SnapshotLive => "SnapshotLive",
        Command::Stats => "Stats",
        Command::File { .. } => "File",
        Command::WriteDisk { .. } => "WriteDisk",
        Command::ReadDisk { .. } => "ReadDisk",
    }
}

/// The environment variable in which the host tells a worker its pid.
pub const HOST_PID_ENV: &str = "ZEROBOOT_HOST_PID";

/// Asks the kernel to kill this process when its parent dies, so that a
/// host killed with SIGKILL leaves no VM behind. (The end of stdin would
/// stop an idle worker too, but not one inside a long `KVM_RUN`.) A clone
/// does not inherit it: each process asks for itself.
pub(crate) fn die_with_parent() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and no pointers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    // A parent that died before the prctl left this process to another
    // one (init, or a subreaper): end now. Compared with the pid the host
    // gave, not with 1: in a container the host itself is often pid 1.
    let host = std::env::var(HOST_PID_ENV).ok().and_then(|p| p.parse::<i32>().ok());
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    if host.map_or(parent == 1, |host| parent != host) {
        std::process::exit(0);
    }
}
