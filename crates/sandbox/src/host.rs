//! The host's side: a template whose forks each run in a worker process
//! ([`crate::worker`]), optionally from a pool of workers whose VMs are
//! already prepared.

use std::fs::File;
use std::io::{BufWriter, Read};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use zeroboot_protocol::files::{FileReply, FileRequest};
use zeroboot_protocol::{Chunk, GuestFault, Outcome, Request};
use zeroboot_vmm::fork::{Demand, Probes, ReadyPool, Refill};
use zeroboot_vmm::{ForkMemory, ForkMemoryPolicy, LiveSnapshot, Snapshot};

use zeroboot_net::NetConfig;

use crate::process::{self, SpawnError, Started, WorkerCommand, WorkerProcess, Zygote};
use crate::wire::{self, Command, Failure, LiveParts, Reply, Stats, WireError};

/// How long a worker may take to prepare or start a VM, or to capture one.
const SETUP_DEADLINE: Duration = Duration::from_secs(60);
/// How long past an exec's own timeout the host waits for its reply. The
/// worker enforces the timeout itself; this only catches a stuck worker.
const EXEC_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The guest timed out, crashed or broke the protocol: the code's doing.
    #[error(transparent)]
    Guest(GuestFault),
    #[error("in the sandbox process: {0}")]
    Worker(String),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("the sandbox process did not answer within {0:?}; it was killed")]
    Unresponsive(Duration),
    #[error("the sandbox process ended ({status}) mid-{during}")]
    Died { status: String, during: &'static str },
    #[error("talking to the sandbox process: {0}")]
    Wire(#[from] WireError),
    #[error("the sandbox process sent {got} where {expected} belongs")]
    Unexpected { expected: &'static str, got: &'static str },
}

impl From<Failure> for SandboxError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Guest(fault) => Self::Guest(fault),
            Failure::Other(message) => Self::Worker(message),
        }
    }
}

struct Spec {
    command: WorkerCommand,
    dir: PathBuf,
    policy: ForkMemoryPolicy,
    /// Code the template answers (its runtime's print probe), which workers
    /// prepared ahead with shared pages run and rewind (see
    /// [`IsolatedTemplate::with_probes`]).
    probes: Vec<Vec<u8>>,
    /// Set once a worker could not run them and be rewound: the template
    /// would refuse them every time, and each try costs a preparation.
    probes_refused: std::sync::atomic::AtomicBool,
    health: Health,
    /// Clones workers; `None` once it has failed, after which workers are
    /// spawned with `execve` as they were before it.
    zygote: Mutex<Option<Zygote>>,
}

impl Spec {
    /// The probes for a worker prepared under `demand`: none while requests
    /// wait (its preparation is on their clock), or once refused.
    fn probes_for(&self, demand: Demand) -> bool {
        demand == Demand::KeptUp && !self.probes_refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn refuse_probes(&self, why: &str) {
        // Relaxed: a flag that orders nothing else; a race costs one more try.
        if !self.probes_refused.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(template = %self.dir.display(), reason = why, "VMs prepared ahead run no probes");
        }
    }

    /// A new worker: cloned from the zygote, or spawned if there is none.
    fn start_worker(&self) -> Result<Started, SandboxError> {
        if let Ok(mut zygote) = self.zygote.lock() {
            if let Some(z) = zygote.as_mut() {
                match z.clone_worker() {
                    Ok(started) => return Ok(started),
                    Err(e) => {
                        tracing::warn!(error = %e, "the zygote failed; workers are spawned from now on");
                        *zygote = None;
                    }
                }
            }
        }
        Ok(process::spawn(&self.command, &self.dir)?)
    }
}

/// A template whose forks are each a worker process holding one VM.
pub struct IsolatedTemplate {
    // Field order is drop order: the pools (and their threads) go first.
    pool: Option<Pool>,
    /// Workers prepared for sandboxes with a network (their filter goes on
    /// after Start), kept from the first such fork on: a server whose
    /// sandboxes never ask for a network never has them.
    network_pool: OnceLock<Option<Pool>>,
    pool_size: usize,
    spec: std::sync::Arc<Spec>,
    snapshot: Snapshot,
}

type Pool = ReadyPool<Result<Sandbox, SandboxError>>;

/// Whether the last worker prepared from a template came up.
#[derive(Default)]
struct Health(std::sync::atomic::AtomicBool);

impl Health {
    fn record<T>(&self, prepared: &Result<T, SandboxError>) {
        // A failure sets it, a success clears it: `Relaxed` is enough for
        // a flag that orders nothing else.
        self.0.store(prepared.is_err(), std::sync::atomic::Ordering::Relaxed);
    }

    fn failing(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl IsolatedTemplate {
    /// Forks of the template `snapshot` was opened from, keeping up to `pool`
    /// workers with their VM prepared, each VM's memory backed as `policy`
    /// says. Its zygote starts now, on this thread, which must live as long
    /// as the template: the workers cloned from the zygote take this
    /// thread as their parent, and die with it. If it cannot start, workers
    /// are spawned.
    pub fn new(command: WorkerCommand, snapshot: Snapshot, pool: usize, policy: ForkMemoryPolicy) -> Self {
        Self::with_probes(command, snapshot, pool, policy, Vec::new())
    }

    /// [`IsolatedTemplate::new`], where each worker the pool prepares with
    /// [`ForkMemory::SharedPages`] while it keeps up with requests also runs
    /// `probes` (code the template answers, such as its runtime's print
    /// probe, which the host knows) and is rewound to the snapshot, keeping
    /// only KVM's shadow page tables of what they read (vmm's
    /// `Template::prepare`).
    /// A request like a probe then starts with few first touches left. A
    /// worker made while a request waits never runs them.
    pub fn with_probes(
        command: WorkerCommand,
        snapshot: Snapshot,
        pool: usize,
        policy: ForkMemoryPolicy,
        probes: Vec<Vec<u8>>,
    ) -> Self {
        let zygote = Zygote::start(&command, &snapshot.dir)
            .inspect_err(|e| tracing::warn!(error = %e, "no zygote; workers are spawned"))
            .ok();
        let spec = std::sync::Arc::new(Spec {
            command,
            dir: snapshot.dir.clone(),
            policy,
            probes,
            probes_refused: Default::default(),
            health: Health::default(),
            zygote: Mutex::new(zygote),
        });
        Self {
            pool: start_pool(&spec, pool, false),
            network_pool: OnceLock::new(),
            pool_size: pool,
            spec,
            snapshot,
        }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The process id of the zygote workers are cloned from, while there
    /// is one.
    pub fn zygote_pid(&self) -> Option<u32> {
        self.spec.zygote.lock().ok()?.as_ref()?.pid()
    }

    /// Whether the last worker prepared from this template, for the pool or
    /// for a request, came up: false after a failure (the template's files
    /// changed under the server, a resource ran out) until one succeeds.
    pub fn can_fork(&self) -> bool {
        !self.spec.health.failing()
    }

    /// A new sandbox: a worker process with a new VM, started now, with no
    /// network.
    pub fn fork(&self) -> Result<Sandbox, SandboxError> {
        self.fork_with(None)
    }

    /// [`IsolatedTemplate::fork`], reaching what `network` allows.
    pub fn fork_with(&self, network: Option<NetConfig>) -> Result<Sandbox, SandboxError> {
        let with_network = network.is_some();
        let pool = if with_network {
            self.network_pool
                .get_or_init(|| start_pool(&self.spec, self.pool_size, true))
                .as_ref()
        } else {
            self.pool.as_ref()
        };
        let (mut sandbox, refill) = match pool.and_then(ReadyPool::take) {
            Some((prepared, refill)) => (prepared?, Some(refill)),
            // Empty pool (or none): prepare one here rather than wait. The
            // request waits for it, hence Behind.
            None => {
                let policy = self.spec.policy.for_fork(Demand::Behind);
                let prepared = Sandbox::prepare(&self.spec, None, policy, with_network, false);
                self.spec.health.record(&prepared);
                (prepared?, None)
            }
        };
        sandbox.start(network)?;
        // The pool prepares the next worker once this one has answered its
        // first request (see `Sandbox::refill`).
        sandbox.refill = refill;
        Ok(sandbox)
    }

    /// A new sandbox that starts where `live` (captured from a fork of this
    /// template) was, reaching what `network` allows. It inherits none of
    /// its parent's connections.
    pub fn fork_live(&self, live: &LiveSnapshot, network: Option<NetConfig>) -> Result<Sandbox, SandboxError> {
        let parts = LiveParts::from_live(live).map_err(|e| SandboxError::Worker(e.to_string()))?;
        let policy = self.spec.policy.for_fork(Demand::Behind);
        let mut sandbox = Sandbox::prepare(&self.spec, Some(parts), policy, network.is_some(), false)?;
        sandbox.start(network)?;
        Ok(sandbox)
    }
}

/// Keeps up to `size` workers prepared from `spec`'s template, for
/// sandboxes with a network or without.
fn start_pool(spec: &std::sync::Arc<Spec>, size: usize, network: bool) -> Option<Pool> {
    let source = spec.clone();
    let make = move |demand| {
        let started = Instant::now();
        let fork_memory = source.policy.for_fork(demand);
        let probes = source.probes_for(demand);
        let prepared = Sandbox::prepare(&source, None, fork_memory, network, probes);
        source.health.record(&prepared);
        tracing::debug!(
            ?demand,
            network,
            fork_memory = fork_memory.name(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "pool prepared a worker"
        );
        prepared
    };
    let name = if network {
        "zeroboot-net-workers"
    } else {
        "zeroboot-workers"
    };
    ReadyPool::start(name, size, make, Result::is_err)
}

/// One sandbox: a worker process and the VM inside it. Dropping it kills
/// the process, which frees the VM.
pub struct Sandbox {
    process: Option<WorkerProcess>,
    to: BufWriter<File>,
    from: FrameReader,
    fork_memory: ForkMemory,
    /// What became of the template's probes in its VM.
    probes: Probes,
    /// Held from a pool until the first request after the start is
    /// answered: the replacement's preparation (51 MiB copied for
    /// private-written-ranges) overlapping that request took a pooled
    /// `print(1+1)` from about 1.7–2.0 ms to 2.1–2.4 ms at p50 here, once
    /// workers were cloned from a zygote and reached it within a
    /// millisecond. Dropped after the process is killed (field order).
    refill: Option<Refill>,
}

impl Sandbox {
    fn prepare(
        spec: &Spec,
        live: Option<LiveParts>,
        fork_memory: ForkMemory,
        network: bool,
        probes: bool,
    ) -> Result<Self, SandboxError> {
        let Started { process, to, from } = spec.start_worker()?;
        let mut sandbox = Self {
            process: Some(process),
            to: BufWriter::new(to),
            from: FrameReader::new(from),
            fork_memory,
            probes: Probes::NotRun,
            refill: None,
        };
        match sandbox.call(
            &Command::Prepare {
                live,
                fork_memory,
                network,
                probes: if probes { spec.probes.clone() } else { Vec::new() },
            },
            SETUP_DEADLINE,
            "Prepare",
        )? {
            Reply::Prepared { probes } => {
                if let Probes::Refused(why) = &probes {
                    spec.refuse_probes(why);
                }
                sandbox.probes = probes;
                Ok(sandbox)
            }
            other => Err(unexpected("Prepared", &other)),
        }
    }

    fn start(&mut self, network: Option<NetConfig>) -> Result<(), SandboxError> {
        match self.call(&Command::Start { network }, SETUP_DEADLINE, "Start")? {
            Reply::Started => Ok(()),
            other => Err(unexpected("Started", &other)),
        }
    }

    pub fn exec(&mut self, request: &Request, timeout: Duration) -> Result<Outcome, SandboxError> {
        self.exec_streaming(request, timeout, &mut |_| {})
    }

    /// Runs `request`, calling `on_chunk` with output as it arrives when
    /// `request.stream` is set.
    pub fn exec_streaming(
        &mut self,
        request: &Request,
        timeout: Duration,
        on_chunk: &mut dyn FnMut(Chunk),
    ) -> Result<Outcome, SandboxError> {
        let command = Command::Exec {
            request: request.clone(),
            timeout,
        };
        self.send(&command, "Exec")?;
        let outcome = self.exec_replies(Instant::now() + timeout + EXEC_GRACE, on_chunk);
        self.refill = None;
        outcome
    }

    fn exec_replies(&mut self, deadline: Instant, on_chunk: &mut dyn FnMut(Chunk)) -> Result<Outcome, SandboxError> {
        loop {
            match self.receive(deadline, "Exec")? {
                Reply::Chunk(chunk) => on_chunk(chunk),
                Reply::Done(outcome) => return Ok(outcome),
                Reply::Failed(f) => return Err(f.into()),
                other => return Err(unexpected("Done", &other)),
            }
        }
    }

    /// Captures the sandbox where it is, for [`IsolatedTemplate::fork_live`].
    pub fn snapshot_live(&mut self) -> Result<LiveSnapshot, SandboxError> {
        match self.call(&Command::SnapshotLive, SETUP_DEADLINE, "SnapshotLive")? {
            Reply::Live(parts) => parts.into_live().map_err(|e| SandboxError::Worker(e.to_string())),
            other => Err(unexpected("Live", &other)),
        }
    }

    /// Private memory and VM exits so far.
    pub fn stats(&mut self) -> Result<Stats, SandboxError> {
        match self.call(&Command::Stats, SETUP_DEADLINE, "Stats")? {
            Reply::Stats(s) => Ok(s),
            other => Err(unexpected("Stats", &other)),
        }
    }

    /// Runs a files-API operation in the guest (see
    /// [`zeroboot_protocol::files`]).
    pub fn file_op(&mut self, request: &FileRequest, timeout: Duration) -> Result<FileReply, SandboxError> {
        let command = Command::File {
            request: request.clone(),
            timeout,
        };
        match self.call(&command, timeout + EXEC_GRACE, "File")? {
            Reply::File(reply) => Ok(reply),
            other => Err(unexpected("File", &other)),
        }
    }

    /// Writes `bytes` at byte `offset` of the sandbox's disk (where a
    /// [`zeroboot_protocol::files::FileOp::WriteMap`] put a file's blocks).
    pub fn write_disk(&mut self, offset: u64, bytes: Vec<u8>) -> Result<(), SandboxError> {
        match self.call(&Command::WriteDisk { offset, bytes }, SETUP_DEADLINE, "WriteDisk")? {
            Reply::Written => Ok(()),
            other => Err(unexpected("Written", &other)),
        }
    }

    /// Bytes `[offset, offset + len)` of the sandbox's disk.
    pub fn read_disk(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, SandboxError> {
        match self.call(&Command::ReadDisk { offset, len }, SETUP_DEADLINE, "ReadDisk")? {
            Reply::Bytes(bytes) => Ok(bytes),
            other => Err(unexpected("Bytes", &other)),
        }
    }

    /// How this sandbox's guest memory was backed when its VM was prepared.
    pub fn fork_memory(&self) -> ForkMemory {
        self.fork_memory
    }

    /// Whether its VM ran the template's probes, undone, before it started
    /// ([`IsolatedTemplate::with_probes`]).
    pub fn probes_ran(&self) -> bool {
        self.probes == Probes::Ran
    }

    /// What became of the template's probes in its VM.
    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    /// The worker's process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(WorkerProcess::id)
    }

    fn call(&mut self, command: &Command, within: Duration, during: &'static str) -> Result<Reply, SandboxError> {
        self.send(command, during)?;
        let reply = self.receive(Instant::now() + within, during);
        self.refill = None;
        match reply? {
            Reply::Failed(f) => Err(f.into()),
            reply => Ok(reply),
        }
    }

    fn send(&mut self, command: &Command, during: &'static str) -> Result<(), SandboxError> {
        wire::write_frame(&mut self.to, command).map_err(|e| self.broken(e, during))
    }

    fn receive(&mut self, deadline: Instant, during: &'static str) -> Result<Reply, SandboxError> {
        match self.from.read(deadline) {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => {
                self.kill();
                Err(SandboxError::Unresponsive(
                    deadline.saturating_duration_since(Instant::now()),
                ))
            }
            Err(e) => Err(self.broken(e, during)),
        }
    }

    /// A pipe error: if the worker has died, say how. (A socket to a cloned
    /// worker that died says "connection reset" where a pipe says "broken
    /// pipe".)
    fn broken(&mut self, e: WireError, during: &'static str) -> SandboxError {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        let pipe_gone = matches!(&e, WireError::Closed)
            || matches!(&e, WireError::Io(io) if matches!(io.kind(), BrokenPipe | ConnectionReset));
        if !pipe_gone {
            self.kill();
            return e.into();
        }
        let status = self
            .process
            .as_mut()
            .and_then(|p| p.wait().ok())
            .map_or_else(|| "status unknown".to_string(), |s| s.to_string());
        SandboxError::Died { status, during }
    }

    fn kill(&mut self) {
        if let Some(process) = &mut self.process {
            process.kill();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
            // The process takes its VM down as it exits, off the caller's
            // path.
            process::reap(process);
        }
    }
}

fn unexpected(expected: &'static str, got: &Reply) -> SandboxError {
    let got = match got {
        Reply::Prepared { .. } => "Prepared",
        Reply::Started => "Started",
        Reply::Chunk(_) => "Chunk",
        Reply::Done(_) => "Done",
        Reply::Live(_) => "Live",
        Reply::Stats(_) => "Stats",
        Reply::File(_) => "File",
        Reply::Written => "Written",
        Reply::Bytes(_) => "Bytes",
        Reply::Failed(_) => "Failed",
    };
    SandboxError::Unexpected { expected, got }
}

/// Bytes asked of the pipe per read (a Linux pipe holds 64 KiB).
const READ_CHUNK: usize = 64 * 1024;

/// Reads frames from a worker's stdout, giving up at a deadline.
struct FrameReader {
    pipe: File,
    buf: Vec<u8>,
}

impl FrameReader {
    fn new(pipe: File) -> Self {
        Self {
            pipe,
            buf: Vec::with_capacity(READ_CHUNK),
        }
    }

    /// The next frame, or `None` at the deadline.
    fn read(&mut self, deadline: Instant) -> Result<Option<Reply>, WireError> {
        loop {
            if let Some(header) = self.buf.first_chunk::<4>() {
                let end = 4 + wire::frame_len(*header)?;
                if self.buf.len() >= end {
                    let reply = wire::decode(&self.buf[4..end]);
                    self.buf.drain(..end);
                    return reply.map(Some);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !readable(&self.pipe, left)? {
                return Ok(None);
            }
            // Room for one pipe's worth more: zero-filling the whole spare
            // capacity on every read would cost quadratic time on the
            // megabytes of a live snapshot.
            let start = self.buf.len();
            self.buf.resize(start + READ_CHUNK, 0);
            let read = self.pipe.read(&mut self.buf[start..]);
            self.buf.truncate(start + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) => return Err(WireError::Closed),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Waits up to `within` for `pipe` to have data (or be closed).
fn readable(pipe: &impl AsRawFd, within: Duration) -> Result<bool, WireError> {
    let mut fd = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = within.as_millis().clamp(1, i32::MAX as u128) as i32;
    loop {
        // SAFETY: one pollfd that lives across the call.
        let rc = unsafe { libc::poll(&mut fd, 1, ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}
