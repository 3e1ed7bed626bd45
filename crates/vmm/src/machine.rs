//! A running VM: memory, KVM VM and vCPU, and the serial console. Created by
//! booting a kernel ([`Machine::boot`]) or by restoring a snapshot
//! ([`Machine::restore`]); either way the vCPU runs on the caller's thread.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zeroboot_protocol::files::{FileReply, FileRequest};
use zeroboot_protocol::{self as protocol, Chunk, Doorbell, GuestFault, Outcome, ProtocolError, Request};

use crate::boot::{self, BootError};
use crate::devices::serial::{SerialConsole, SerialError, COM1_IRQ, COM1_PORTS};
use crate::devices::zeroing::Zeroing;
use crate::fork::policy::ForkMemory;
use crate::guest_kernel::{KernelSymbols, SymbolError};
use crate::kvm::{Exit, Hypervisor, KvmError, Vcpu, Vm};
use crate::layout::{LayoutError, MemoryLayout};
use crate::memory::{GuestRam, MemoryError};
use crate::network::{Network, NetworkError};
use crate::page_cache::{self, MemoryFileRead};
use crate::page_tables;
use crate::slots::Slots;
use crate::snapshot::state::MachineState;
use crate::snapshot::{self, Snapshot, SnapshotError};

/// i8042 command port: the kernel's `reboot=k` writes 0xfe here.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;
/// CMOS/RTC data port. Reads return 0 so a kernel that reads the RTC never
/// waits on a phantom "update in progress" bit.
const CMOS_DATA: u16 = 0x71;

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("{len} bytes at byte {offset} are outside the sandbox's disk")]
    OutsideDisk { offset: u64, len: usize },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A request or mailbox the host made that the protocol cannot carry
    /// (the guest's own protocol errors are [`GuestFault::Protocol`]).
    #[error(transparent)]
    Protocol(ProtocolError),
    /// The guest did not answer: its code's doing.
    #[error(transparent)]
    Guest(#[from] GuestFault),
    #[error("guest kernel symbols: {0}")]
    Symbols(#[from] SymbolError),
    #[error("cannot read {path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("cannot read root image {path}: {source}")]
    RootImage { path: PathBuf, source: std::io::Error },
    #[error("cannot arm the deadline timer: {0}")]
    Watchdog(std::io::Error),
    #[error("KVM cannot emulate the instruction at rip {rip:#x} (suberror {suberror}, bytes {bytes})")]
    Emulation { rip: u64, suberror: u32, bytes: String },
    #[error("KVM could not enter the guest (hardware reason {0:#x})")]
    FailEntry(u64),
    #[error("a fork that ran its probes cannot be rewound: {0}")]
    NotRewindable(&'static str),
    #[error("unexpected VM exit: {0}")]
    UnexpectedExit(String),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("the agent registered entropy at {gpa:#x} (+{len}), outside guest RAM below the mailbox")]
    EntropyOutsideRam { gpa: u64, len: u64 },
}

/// What to boot.
pub struct BootSpec {
    pub kernel: PathBuf,
    /// Command line without the root and mailbox arguments, which are added here.
    pub cmdline: String,
    /// Read-only root filesystem image, exposed as legacy persistent memory.
    pub root_image: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The kernel's System.map: without it forks cannot be given fresh
    /// kernel entropy.
    pub system_map: Option<PathBuf>,
    pub mem_mib: u64,
    /// Extra arguments for the root image (e.g. `rootfstype=erofs rootflags=dax`).
    pub root_args: String,
    /// The sandbox's disk: a filesystem image (sparse), exposed as a second
    /// persistent-memory region (`/dev/pmem1`) of the image's size. Needs a
    /// root image.
    pub disk_image: Option<PathBuf>,
}

pub struct Machine {
    // Field order is drop order: the network's thread stops first, then the
    // vCPU and VM go, all before the memory they map.
    network: Network,
    vcpu: Vcpu,
    vm: Vm,
    ram: GuestRam,
    serial: SerialConsole,
    zeroing: Zeroing,
    /// Which memory slots exist yet (see [`crate::slots`]).
    slots: Slots,
    layout: MemoryLayout,
    kernel: Option<KernelSymbols>,
    cpu_vendor: String,
    /// The agent's generator-state regions: read from the mailbox when a
    /// booted machine is saved (`None` until then), inherited by forks, whose
    /// guest could have rewritten that table since.
    entropy: Option<Vec<protocol::EntropyRegion>>,
    /// The agent's fresh memory, as for `entropy`.
    fresh: Option<Vec<protocol::fresh::FreshRun>>,
    /// No request has run since this VM was forked: the next one gets
    /// fresh user-space generator state. Only that one, so that a seed user
    /// code sets holds for its later requests.
    fresh_fork: bool,
    exits: u64,
}

/// What [`Machine::write_snapshot`] wrote.
#[derive(Debug, Clone)]
pub struct WrittenSnapshot {
    /// Guest memory saved (non-zero pages), in bytes.
    pub memory_bytes: u64,
    /// How the memory file reads back: its checksum, and how the host's
    /// page cache now holds it.
    pub memory: MemoryFileRead,
}

/// A running sandbox captured between requests: children forked from it
/// start where it was, as copy-on-write views of the template's memory file
/// with the sandbox's own changed pages copied on top.
pub struct LiveSnapshot {
    /// Boxed for the reason [`crate::snapshot::Snapshot::state`] is.
    pub(crate) state: Box<MachineState>,
    pub(crate) pages: Vec<(u64, Vec<u8>)>,
}

impl LiveSnapshot {
    /// A live snapshot from its parts, as [`LiveSnapshot::state`] and
    /// [`LiveSnapshot::pages`] gave them (say, in another process). Forking
    /// from it checks the pages against guest RAM.
    pub fn from_parts(state: Box<MachineState>, pages: Vec<(u64, Vec<u8>)>) -> Self {
        Self { state, pages }
    }

    pub fn state(&self) -> &MachineState {
        &self.state
    }

    /// The changed pages: guest-physical address and contents.
    pub fn pages(&self) -> &[(u64, Vec<u8>)] {
        &self.pages
    }

    /// Bytes of guest memory the sandbox had changed.
    pub fn changed_bytes(&self) -> u64 {
        self.pages.iter().map(|(_, p)| p.len() as u64).sum()
    }
}

/// A VM made from a snapshot that has not run: guest memory mapped and
/// registered, irqchip and PIT created, and the vCPU holding the snapshot's
/// state (its timer disarmed). Nothing in it depends on when it is used, so
/// shells can be made ahead of time ([`crate::fork::Template`]); a fork
/// finishes one in [`Machine::from_shell`].
pub struct Shell {
    // Field order is drop order: the vCPU and VM go before the memory they map.
    vcpu: Vcpu,
    vm: Vm,
    ram: GuestRam,
    timer: Option<Timer>,
    slots: Slots,
}

impl Shell {
    /// A shell over `snapshot`, its guest memory backed as `fork_memory` says.
    pub fn new(hv: &Hypervisor, snapshot: &Snapshot, fork_memory: ForkMemory) -> Result<Self, MachineError> {
        let mut shell = Self::with_state(hv, snapshot, &snapshot.state)?;
        shell.copy_ahead(snapshot, fork_memory)?;
        Ok(shell)
    }

    /// Copies the pages forks usually write now, off the fork's path. A
    /// page the host already holds privately is writable in its page
    /// tables, so the guest's first touch, read or write, maps it writable
    /// at once; otherwise a read-then-write costs two shadow-paging faults
    /// and the copy happens inside the second.
    fn copy_ahead(&mut self, snapshot: &Snapshot, fork_memory: ForkMemory) -> Result<(), MachineError> {
        match fork_memory {
            // Only the pages every probe wrote: copying the rest would hold
            // them in every fork, and split more of the host's 2 MiB
            // mappings, for requests that never write them.
            ForkMemory::SharedPages => {
                for &(gpa, len) in &snapshot.write_set.every {
                    self.ram.touch_for_write(gpa, len)?;
                }
            }
            // Whole 2 MiB ranges instead: the host then maps each with one
            // 2 MiB page, writable, and so can KVM, where the guest does.
            ForkMemory::PrivateWrittenRanges => {
                for gpa in snapshot.write_set.huge_ranges() {
                    self.ram.make_private_huge(gpa)?;
                }
            }
        }
        Ok(())
    }

    /// A shell over `snapshot`'s memory file holding `state`, which may be a
    /// later state of a sandbox forked from it ([`LiveSnapshot`]).
    pub(crate) fn with_state(hv: &Hypervisor, snapshot: &Snapshot, state: &MachineState) -> Result<Self, MachineError> {
        let mut ram = GuestRam::private_file_mapping(
            snapshot
                .memory_file()
                .map_err(|e| MachineError::UnexpectedExit(e.to_string()))?,
            state.layout.total_bytes(),
        )?;
        // Ordering: before the memory slot, so that KVM never saw the file
        // pages these replace.
        ram.map_fresh(&snapshot.fresh)?;
        let vm = hv.create_vm()?;
        // Ordering: memory slots first (see Vm::set_memory), then the
        // in-kernel devices, then the vCPU (its LAPIC needs the irqchip).
        // The disk and the fresh heap only when the guest first touches
        // them (crate::slots). No PIT: the guest stopped using it at boot
        // (see Vm::create_pit); its ports answer as nothing's.
        // Root-image chunks are lazy only where the instructions they hold
        // can register them (Vm::exit_on_emulation_failure).
        let image_lazy = vm.exit_on_emulation_failure().is_ok();
        let slots = Slots::for_fork(&state.layout, ram.size(), &snapshot.lazy_runs(image_lazy));
        slots.register_eager(&vm, &ram)?;
        vm.create_irqchip()?;
        let vcpu = vm.create_vcpu(0)?;
        let (msrs, timer) = fork_msrs(&state.vcpu);
        vcpu.restore_state(&state.vcpu, &msrs)?;
        Ok(Self {
            vcpu,
            vm,
            ram,
            timer,
            slots,
        })
    }

    /// Copies a live sandbox's changed pages over the template's.
    pub(crate) fn overlay(&mut self, pages: &[(u64, Vec<u8>)]) -> Result<(), MachineError> {
        for (gpa, bytes) in pages {
            self.ram.slice_mut(*gpa, bytes.len())?.copy_from_slice(bytes);
        }
        Ok(())
    }
}

/// The CPUID vendor string (leaf 0) from KVM's table.
pub fn cpu_vendor(hv: &Hypervisor) -> String {
    let leaf0 = hv.supported_cpuid().iter().find(|e| e.function == 0);
    let mut bytes = Vec::with_capacity(12);
    if let Some(e) = leaf0 {
        for word in [e.ebx, e.edx, e.ecx] {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

impl MachineError {
    /// The guest's protocol violation `e`.
    fn guest_protocol(e: ProtocolError) -> Self {
        Self::Guest(GuestFault::Protocol(e))
    }

    /// The guest fault behind this error, if the guest caused it.
    pub fn guest_fault(&self) -> Option<&GuestFault> {
        match self {
            Self::Guest(fault) => Some(fault),
            _ => None,
        }
    }
}

impl Machine {
    /// Creates a VM, loads the kernel and root image, and sets up vCPU 0 at the
    /// kernel entry. `console` receives the guest's serial output.
    pub fn boot(hv: &Hypervisor, spec: &BootSpec, console: Box<dyn Write + Send>) -> Result<Self, MachineError> {
        let root = match &spec.root_image {
            Some(path) => Some(open_image(path).map_err(|source| MachineError::RootImage {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        let kernel = match &spec.system_map {
            Some(path) => {
                let map = std::fs::read_to_string(path).map_err(|source| MachineError::File {
                    path: path.clone(),
                    source,
                })?;
                Some(KernelSymbols::from_system_map(&map)?)
            }
            None => None,
        };
        let disk = match &spec.disk_image {
            Some(path) => Some(open_image(path).map_err(|source| MachineError::File {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        let layout = MemoryLayout::new(
            spec.mem_mib,
            root.as_ref().map_or(0, |r| r.1),
            disk.as_ref().map_or(0, |d| d.1),
        )?;
        let mut ram = GuestRam::anonymous(layout.total_bytes())?;
        if let Some((mut file, len)) = root {
            ram.load(layout.pmem_gpa, &mut file, len)?;
        }
        if let Some((file, len)) = disk.filter(|_| layout.disk_bytes > 0) {
            ram.load_sparse(layout.disk_gpa, &file, len)?;
        }
        let mut seed = [0u8; protocol::header::BOOT_SEED_LEN];
        fill_random(&mut seed);
        protocol::init_mailbox(ram.slice_mut(layout.mailbox_gpa, protocol::MAILBOX_SIZE)?, &seed)
            .map_err(MachineError::Protocol)?;

        let mut cmdline = spec.cmdline.clone();
        if layout.pmem_bytes > 0 {
            cmdline.push_str(" root=/dev/pmem0 ");
            cmdline.push_str(&spec.root_args);
        }
        if layout.disk_bytes > 0 {
            // The agent mounts /dev/pmem1 at /home/user when this is set.
            cmdline.push_str(" zeroboot.disk=1");
        }
        cmdline.push_str(&format!(
            " zeroboot.mailbox={:#x} zeroboot.doorbell={:#x} {}",
            layout.mailbox_gpa,
            layout.doorbell_gpa,
            crate::network::kernel_args()
        ));
        let entry = boot::load(&mut ram, &layout, &spec.kernel, cmdline.trim(), spec.initrd.as_deref())?;

        let mut vm = hv.create_vm()?;
        let slots = Slots::all_eager(&ram);
        slots.register_eager(&vm, &ram)?;
        vm.create_irqchip()?;
        vm.create_pit()?;
        let serial = SerialConsole::new(console)?;
        vm.register_irq(serial.irq(), COM1_IRQ)?;
        let vcpu = vm.create_vcpu(0)?;
        boot::configure_vcpu(hv, &vcpu, entry)?;
        Ok(Self {
            network: Network::new(None),
            vcpu,
            vm,
            ram,
            serial,
            zeroing: Zeroing::default(),
            slots,
            layout,
            kernel,
            cpu_vendor: cpu_vendor(hv),
            entropy: None,
            fresh: None,
            fresh_fork: true,
            exits: 0,
        })
    }

    /// Creates a new VM from `snapshot`: guest memory is a private
    /// copy-on-write mapping of the snapshot's memory file, backed as
    /// `fork_memory` says. The same as [`crate::fork::Template::fork`]
    /// without a pool of prepared VMs.
    pub fn restore(
        hv: &Hypervisor,
        snapshot: &Snapshot,
        fork_memory: ForkMemory,
        console: Box<dyn Write + Send>,
    ) -> Result<Self, MachineError> {
        Self::from_shell(Shell::new(hv, snapshot, fork_memory)?, &snapshot.state, console)
    }

    /// Completes a fork from `shell`, which was prepared from `snapshot`.
    /// Everything that depends on when the fork starts happens here.
    pub(crate) fn from_shell(
        shell: Shell,
        state: &MachineState,
        console: Box<dyn Write + Send>,
    ) -> Result<Self, MachineError> {
        let Shell {
            vm,
            vcpu,
            mut ram,
            timer,
            slots,
        } = shell;
        // Every fork must differ from its siblings: fresh kernel CRNG keys
        // before the guest runs an instruction.
        if let Some(kernel) = &state.kernel {
            let mut fresh = [0u8; 64];
            fill_random(&mut fresh);
            kernel.reseed(&mut ram, &fresh)?;
        }
        // Ordering: the VM-wide devices come after the vCPU here (the shell
        // restored the vCPU ahead of time). That is safe because nothing runs
        // in between, and the LAPIC only needs the irqchip to exist. The
        // kvmclock value is set now, not when the shell was made, so a shell
        // that waited in the pool does not start with its clock ahead.
        vm.restore_state(&state.vm)?;
        let serial = SerialConsole::from_state(&state.serial, console)?;
        vm.register_irq(serial.irq(), COM1_IRQ)?;
        // The shell restored the MSRs with the TSC-deadline timer disarmed,
        // because a deadline already in the past fires at once, and where the
        // guest TSC cannot be set back (kvm_pvm) every saved deadline is in the
        // past. Now the clock is re-based to the TSC the guest will read, and
        // only then is the timer armed, relative to that TSC.
        let tsc = vcpu.tsc()?;
        if let Some(kernel) = &state.kernel {
            kernel.rebase_clock(&mut ram, tsc, unix_now())?;
        }
        if let Some(timer) = timer {
            vcpu.set_msrs(&[timer.rearm(tsc)])?;
        }
        Ok(Self {
            network: Network::new(state.net.clone()),
            vcpu,
            vm,
            ram,
            serial,
            zeroing: Zeroing::default(),
            slots,
            layout: state.layout,
            kernel: state.kernel,
            cpu_vendor: state.cpu_vendor.clone(),
            entropy: Some(state.entropy.clone()),
            fresh: Some(state.fresh.clone()),
            fresh_fork: true,
            exits: 0,
        })
    }

    /// Back to a shell of `snapshot` as [`Shell::new`] makes one with
    /// [`ForkMemory::SharedPages`], keeping one thing of what this
    /// machine ran: KVM's shadow page tables, whose entries for the pages
    /// the guest only read stay valid. Of the pages this machine holds a
    /// copy of, those forks copy ahead get the memory file's contents back
    /// and the rest are dropped (they read from the file again, or as the
    /// zeros the fresh heap held); the vCPU gets the snapshot's state, and
    /// the next [`Machine::from_shell`] re-does what depends on when a
    /// fork starts. So a shell can run the template's own probes ahead of
    /// a request, which then meets few of their first touches (see
    /// [`crate::fork::Template::prepare`]).
    ///
    /// Refused ([`MachineError::NotRewindable`]) when this machine left
    /// the VM for more than the doorbells of its `runs` requests (a device
    /// it touched would keep what it did), or wrote a page of its own
    /// page tables: KVM keeps its shadow pages of the guest's tables in
    /// step with the guest's writes, not with pages the host puts back.
    pub(crate) fn into_shell(mut self, snapshot: &Snapshot, runs: u64) -> Result<Shell, MachineError> {
        if self.exits != runs || self.network.backend().is_some() {
            return Err(MachineError::NotRewindable("it did more than answer its requests"));
        }
        let copies = self.ram.private_runs()?;
        let cr3 = self.vcpu.sregs()?.cr3;
        // Tables held as copies (a page copied ahead may be one) are fine
        // as long as nothing in them changed.
        let copied = |table: &u64| copies.iter().any(|&(gpa, len)| gpa <= *table && *table < gpa + len);
        let copied_tables: Vec<(u64, u64)> = page_tables::tables(&self.ram, cr3)
            .into_iter()
            .filter(copied)
            .map(|table| (table, crate::layout::PAGE_SIZE))
            .collect();
        if self.ram.differs_from_file(&copied_tables)? {
            return Err(MachineError::NotRewindable("the guest wrote its page tables"));
        }
        // The pages forks copy ahead get the file's contents back and stay
        // copies, so KVM's writable mappings of them (the pages every
        // request writes) survive; the rest are dropped, as a fork that
        // never wrote them would not hold them.
        let every = &snapshot.write_set.every;
        let (kept, dropped) = split_runs(&copies, every);
        self.ram.copy_back_from_file(&kept)?;
        for &(gpa, len) in &dropped {
            self.ram.discard_copies(gpa, len)?;
        }
        let Self {
            vcpu, vm, ram, slots, ..
        } = self;
        let (msrs, timer) = fork_msrs(&snapshot.state.vcpu);
        vcpu.restore_state(&snapshot.state.vcpu, &msrs)?;
        let mut shell = Shell {
            vcpu,
            vm,
            ram,
            timer,
            slots,
        };
        // Already copies, unless a probe left one untouched: then a no-op.
        shell.copy_ahead(snapshot, ForkMemory::SharedPages)?;
        Ok(shell)
    }

    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// Lets the guest reach what `config` allows from now on (until then
    /// every connection is refused). Once per machine.
    pub fn start_network(&mut self, config: zeroboot_net::NetConfig) -> Result<(), MachineError> {
        Ok(self.network.start(&self.vm, &self.ram, config)?)
    }

    /// What the network backend did, if networking is on.
    pub fn network_stats(&self) -> Option<zeroboot_net::NetStats> {
        self.network.backend().map(zeroboot_net::Backend::stats)
    }

    /// VM exits handled by the VMM so far.
    pub fn exits(&self) -> u64 {
        self.exits
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The `(gpa, len)` runs of guest memory whose slots this VM registers
    /// only at the guest's first touch, each with whether it has been.
    pub fn lazy_slots(&self) -> Vec<((u64, u64), bool)> {
        self.slots.lazy()
    }

    /// The guest's page tables as the vCPU now sees them (its CR3): every
    /// present leaf, with its accessed and dirty bits.
    pub fn page_table_leaves(&self) -> Result<Vec<page_tables::Leaf>, MachineError> {
        let cr3 = self.vcpu.sregs()?.cr3;
        Ok(page_tables::leaves(&self.ram, cr3))
    }

    /// Clears the accessed and dirty bits of the guest's page tables, so
    /// that [`Machine::page_table_leaves`] shows what runs after. For a
    /// measurement fork only (see [`page_tables::clear_accessed_dirty`]).
    pub fn clear_page_table_bits(&mut self) -> Result<usize, MachineError> {
        let cr3 = self.vcpu.sregs()?.cr3;
        Ok(page_tables::clear_accessed_dirty(&mut self.ram, cr3)?)
    }

    /// Runs the guest until the agent rings the doorbell, or `timeout` passes.
    ///
    /// On return the doorbell store has completed (one extra `KVM_RUN` with
    /// `immediate_exit`, as api.rst requires before state is read), so the
    /// vCPU state can be saved or the guest resumed.
    pub fn run_until_doorbell(&mut self, timeout: Duration) -> Result<Doorbell, MachineError> {
        let deadline = Instant::now() + timeout;
        let watchdog = Watchdog::arm(deadline)?;
        let result = self.run_loop(deadline, timeout);
        drop(watchdog);
        self.serial.flush();
        result
    }

    fn run_loop(&mut self, deadline: Instant, timeout: Duration) -> Result<Doorbell, MachineError> {
        let doorbell_gpa = self.layout.doorbell_gpa;
        loop {
            if Instant::now() >= deadline {
                return Err(GuestFault::Timeout(timeout).into());
            }
            let exit = self.vcpu.run()?;
            self.exits += 1;
            let rung = match exit {
                Exit::IoOut { port, data } => {
                    let value = data.first().copied().unwrap_or(0);
                    if COM1_PORTS.contains(&port) {
                        self.serial.write(port, value);
                    } else if Zeroing::handles(port) {
                        self.zeroing.write(port, data, &mut self.ram, &self.layout);
                    } else if port == I8042_COMMAND && value == I8042_RESET {
                        return Err(GuestFault::Reset.into());
                    }
                    None
                }
                Exit::IoIn { port, data } => {
                    if COM1_PORTS.contains(&port) {
                        let value = self.serial.read(port);
                        data.fill(0);
                        if let Some(b) = data.first_mut() {
                            *b = value;
                        }
                    } else if Zeroing::handles(port) {
                        let value = self.zeroing.read(port).to_le_bytes();
                        for (byte, v) in data.iter_mut().zip(value) {
                            *byte = v;
                        }
                    } else if port == CMOS_DATA {
                        data.fill(0);
                    } else {
                        data.fill(0xff);
                    }
                    None
                }
                Exit::MmioWrite { addr, data } if addr == doorbell_gpa => {
                    let code = data.first().copied().unwrap_or(0);
                    let doorbell = Doorbell::from_byte(code)
                        .ok_or(MachineError::guest_protocol(ProtocolError::UnknownDoorbell(code)))?;
                    Some(doorbell)
                }
                Exit::MmioWrite { addr, data } if Network::handles(addr) => {
                    self.network.write(&self.vm, &self.ram, addr, data)?;
                    None
                }
                Exit::MmioRead { addr, data } if Network::handles(addr) => {
                    self.network.read(&self.vm, &self.ram, addr, data)?;
                    None
                }
                Exit::MmioWrite { addr, data } => {
                    if self.slots.register_for(&self.vm, &self.ram, addr, data.len() as u64)? {
                        self.ram.slice_mut(addr, data.len())?.copy_from_slice(data);
                    }
                    None
                }
                Exit::MmioRead { addr, data } => {
                    if self.slots.register_for(&self.vm, &self.ram, addr, data.len() as u64)? {
                        data.copy_from_slice(self.ram.slice(addr, data.len())?);
                    } else {
                        data.fill(0xff);
                    }
                    None
                }
                Exit::Interrupted | Exit::Hlt => None,
                Exit::Shutdown => {
                    let rip = self.vcpu.regs().map(|r| r.rip).unwrap_or(0);
                    return Err(GuestFault::TripleFault { rip }.into());
                }
                // An access to a lazy slot's memory before the slot exists
                // is emulated as MMIO, and an instruction KVM cannot emulate
                // (a vector store from user code, say) fails instead: with
                // the slots it runs natively. So does an instruction in a
                // lazy slot's memory, which KVM cannot fetch: its own slot
                // is enough. Once: a second failure is the guest's, and
                // ends its sandbox (in user mode too: kvm_pvm exits for
                // those as well, and a #UD injected there hung the guest).
                Exit::InternalError => {
                    if !self.register_for_instruction()? && !self.slots.register_all(&self.vm, &self.ram)? {
                        return Err(self.emulation_error());
                    }
                    None
                }
                Exit::FailEntry { reason } => return Err(MachineError::FailEntry(reason)),
                Exit::Other(what) => return Err(MachineError::UnexpectedExit(what)),
            };
            if let Some(doorbell) = rung {
                self.complete_pending_io()?;
                return Ok(doorbell);
            }
        }
    }

    /// Lets KVM finish the instruction that exited, without running further.
    fn complete_pending_io(&mut self) -> Result<(), MachineError> {
        self.vcpu.set_immediate_exit(true);
        let result = self.vcpu.run().map(|exit| match exit {
            Exit::Interrupted => Ok(()),
            other => Err(MachineError::UnexpectedExit(format!("{other:?} while completing I/O"))),
        });
        self.vcpu.set_immediate_exit(false);
        result?
    }

    /// Registers the lazy slot that holds the instruction at the guest's
    /// `rip` (its first byte, or its last possible one, which may be on the
    /// next page); returns whether there was one to register.
    fn register_for_instruction(&mut self) -> Result<bool, MachineError> {
        /// The longest x86 instruction.
        const MAX_INSTRUCTION: u64 = 15;
        let rip = self.vcpu.regs()?.rip;
        let cr3 = self.vcpu.sregs()?.cr3;
        for gva in [rip, rip.wrapping_add(MAX_INSTRUCTION - 1)] {
            if let Some(gpa) = page_tables::translate(&self.ram, cr3, gva) {
                if self.slots.register_for(&self.vm, &self.ram, gpa, 1)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    fn emulation_error(&mut self) -> MachineError {
        let suberror = self.vcpu.internal_error_suberror();
        let rip = self.vcpu.regs().map(|r| r.rip).unwrap_or(0);
        // The kernel runs with its own page tables; the fault address is virtual.
        // Show the bytes if rip happens to be in the kernel's direct map range.
        let phys = rip.checked_sub(0xffff_ffff_8000_0000).unwrap_or(rip);
        let bytes = self
            .ram
            .slice(phys, 16)
            .map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unavailable".into());
        MachineError::Emulation { rip, suberror, bytes }
    }

    /// Captures the whole machine. Call only after [`Machine::run_until_doorbell`]
    /// returned, so that no I/O is pending.
    pub fn save(&self) -> Result<MachineState, MachineError> {
        if let Some(kernel) = &self.kernel {
            kernel.check(&self.ram)?;
        }
        let saved_at_unix_ns = unix_now().as_nanos() as u64;
        let entropy = match &self.entropy {
            Some(inherited) => inherited.clone(),
            None => self.read_entropy_table()?,
        };
        let fresh = match &self.fresh {
            Some(inherited) => inherited.clone(),
            None => self.read_fresh_table()?,
        };
        Ok(MachineState {
            cpu_vendor: self.cpu_vendor.clone(),
            layout: self.layout,
            kernel: self.kernel,
            saved_at_unix_ns,
            entropy,
            fresh,
            vm: self.vm.save_state()?,
            vcpu: self.vcpu.save_state()?,
            serial: self.serial.state(),
            net: self.network.state(),
        })
    }

    /// Writes this machine into `dir` as a snapshot ([`Snapshot::open`]
    /// reads it): the memory file, sparse, then the state file. Call only
    /// after [`Machine::run_until_doorbell`] returned.
    pub fn write_snapshot(&self, dir: &Path) -> Result<WrittenSnapshot, MachineError> {
        let state = self.save()?;
        let path = dir.join(snapshot::MEMORY_FILE);
        let mut file = std::fs::File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(snapshot::io_err(&path))?;
        let memory_bytes = self.ram.write_sparse(&mut file)?;
        // Ordering: the written pages leave the page cache before the
        // checksum reads the file back, so that it is cached in 2 MiB
        // folios, which every fork maps with one exit per range
        // (page_cache::read_memory_file).
        let memory = file
            .sync_all()
            .and_then(|()| page_cache::release_page_cache(&file))
            .and_then(|()| page_cache::read_memory_file(&file))
            .map_err(snapshot::io_err(&path))?;
        // Ordering: the state file last, so that a directory with a state
        // file has its memory file whole.
        snapshot::write_state(dir, &state)?;
        Ok(WrittenSnapshot { memory_bytes, memory })
    }

    /// The agent's entropy table from the mailbox, checked to name only
    /// ordinary RAM: not the boot tables' low page, the mailbox or the root image.
    fn read_entropy_table(&self) -> Result<Vec<protocol::EntropyRegion>, MachineError> {
        let entropy = protocol::read_entropy_table(self.ram.slice(self.layout.mailbox_gpa, protocol::MAILBOX_SIZE)?)
            .map_err(MachineError::guest_protocol)?;
        for r in &entropy {
            if !self.layout.ram_contains(r.gpa, r.write_len()) {
                return Err(MachineError::EntropyOutsideRam {
                    gpa: r.gpa,
                    len: r.write_len(),
                });
            }
        }
        Ok(entropy)
    }

    /// The agent's fresh-memory table from the mailbox, checked to name
    /// only guest RAM below the mailbox, and cut to the 2 MiB pages of it
    /// that hold only zeros (see [`MachineState::fresh`]).
    fn read_fresh_table(&self) -> Result<Vec<protocol::fresh::FreshRun>, MachineError> {
        let fresh = protocol::fresh::read_table(self.ram.slice(self.layout.mailbox_gpa, protocol::MAILBOX_SIZE)?)
            .map_err(MachineError::guest_protocol)?;
        if let Some(r) = fresh.iter().find(|r| !self.layout.ram_contains(r.gpa, r.len)) {
            return Err(MachineError::guest_protocol(ProtocolError::FreshTable(format!(
                "run at {:#x} (+{:#x}) is outside guest RAM below the mailbox",
                r.gpa, r.len
            ))));
        }
        let runs: Vec<(u64, u64)> = fresh.iter().map(|r| (r.gpa, r.len)).collect();
        Ok(self
            .ram
            .zero_huge_pages(&runs)
            .into_iter()
            .map(|(gpa, len)| protocol::fresh::FreshRun { gpa, len })
            .collect())
    }

    /// Captures this sandbox as it is now, to fork children from
    /// ([`crate::fork::Template::fork_live`]): its machine state and the
    /// guest pages it has changed since it was forked from the template. Call
    /// between requests (the vCPU is then stopped with no I/O pending).
    pub fn snapshot_live(&self) -> Result<LiveSnapshot, MachineError> {
        let state = self.save()?;
        let runs = self.ram.private_runs()?;
        let mut pages = Vec::with_capacity(runs.len());
        for (gpa, len) in runs {
            pages.push((gpa, self.ram.slice(gpa, len as usize)?.to_vec()));
        }
        Ok(LiveSnapshot {
            state: Box::new(state),
            pages,
        })
    }

    /// Overwrites the guest's user-space generator states with fresh
    /// randomness (the regions were checked when the snapshot was taken).
    /// A position is written only where it differs: reading a page copies
    /// nothing, and a position usually lies in a page the host does not
    /// otherwise write.
    fn refresh_entropy(&mut self) -> Result<(), MachineError> {
        for r in self.entropy.iter().flatten() {
            if r.len == 0 {
                let value = r.value.to_le_bytes();
                if self.ram.slice(r.gpa, value.len())? != value {
                    self.ram.slice_mut(r.gpa, value.len())?.copy_from_slice(&value);
                }
            } else {
                fill_random(self.ram.slice_mut(r.gpa, r.len as usize)?);
            }
        }
        Ok(())
    }

    /// Hands `request` to the agent and runs until it answers. Output larger
    /// than the mailbox arrives in several chunks, one doorbell each; the
    /// deadline covers them all.
    pub fn exec(&mut self, request: &Request, timeout: Duration) -> Result<Outcome, MachineError> {
        self.run_request(request, timeout, None)
    }

    /// [`Machine::exec`], calling `on_chunk` with each piece of output as it
    /// arrives while the code runs (with `request.stream`; else once, at the end).
    pub fn exec_streaming(
        &mut self,
        request: &Request,
        timeout: Duration,
        on_chunk: &mut dyn FnMut(Chunk),
    ) -> Result<Outcome, MachineError> {
        self.run_request(request, timeout, Some(on_chunk))
    }

    /// Runs a file operation in the agent's native half (no user code
    /// runs, and the fork's first code request still gets fresh generator
    /// state).
    pub fn file_op(&mut self, request: &FileRequest, timeout: Duration) -> Result<FileReply, MachineError> {
        let mailbox_gpa = self.layout.mailbox_gpa;
        let deadline = Instant::now() + timeout;
        let mailbox = self.ram.slice_mut(mailbox_gpa, protocol::MAILBOX_SIZE)?;
        let seq = protocol::write_file_request(mailbox, request).map_err(MachineError::Protocol)?;
        let part = self.next_part(seq, deadline)?;
        Ok(FileReply {
            errno: part.exit_code,
            data: part.stdout.to_vec(),
            message: String::from_utf8_lossy(part.stderr).into_owned(),
        })
    }

    /// Runs the guest until it rings RESULT for request `seq`, and reads
    /// that part of the response from the mailbox.
    fn next_part(&mut self, seq: u32, deadline: Instant) -> Result<protocol::ResponsePart<'_>, MachineError> {
        match self.run_until_doorbell(deadline.saturating_duration_since(Instant::now()))? {
            Doorbell::Result => {}
            got => {
                return Err(MachineError::guest_protocol(ProtocolError::WrongDoorbell {
                    expected: Doorbell::Result,
                    got,
                }))
            }
        }
        protocol::read_chunk(self.ram.slice(self.layout.mailbox_gpa, protocol::MAILBOX_SIZE)?, seq)
            .map_err(MachineError::guest_protocol)
    }

    /// Copies `bytes` to byte `offset` of the disk.
    pub fn write_disk(&mut self, offset: u64, bytes: &[u8]) -> Result<(), MachineError> {
        let gpa = self.disk_gpa(offset, bytes.len())?;
        self.ram.slice_mut(gpa, bytes.len())?.copy_from_slice(bytes);
        Ok(())
    }

    /// Bytes `[offset, offset + len)` of the disk.
    pub fn read_disk(&self, offset: u64, len: usize) -> Result<&[u8], MachineError> {
        let gpa = self.disk_gpa(offset, len)?;
        Ok(self.ram.slice(gpa, len)?)
    }

    fn disk_gpa(&self, offset: u64, len: usize) -> Result<u64, MachineError> {
        let gpa = self.layout.disk_gpa.saturating_add(offset);
        if offset >= self.layout.disk_bytes || !self.layout.disk_contains(gpa, len as u64) {
            return Err(MachineError::OutsideDisk { offset, len });
        }
        Ok(gpa)
    }

    fn run_request(
        &mut self,
        request: &Request,
        timeout: Duration,
        mut on_chunk: Option<&mut dyn FnMut(Chunk)>,
    ) -> Result<Outcome, MachineError> {
        let mailbox_gpa = self.layout.mailbox_gpa;
        let deadline = Instant::now() + timeout;
        // The guest's user-space generators (Python's `random`, numpy's
        // global state) were seeded once in the template: a fork's first
        // request gets them fresh, later ones keep whatever state the code
        // left (a seed it set). The per-request seed is for agents whose
        // generators user code cannot seed or that do not outlive a request.
        let mut seed = [0u8; protocol::header::REQUEST_SEED_LEN];
        fill_random(&mut seed);
        let fresh_fork = std::mem::take(&mut self.fresh_fork);
        if fresh_fork {
            self.refresh_entropy()?;
        }
        let mailbox = self.ram.slice_mut(mailbox_gpa, protocol::MAILBOX_SIZE)?;
        let seq = protocol::write_request(mailbox, request, &seed, fresh_fork).map_err(MachineError::Protocol)?;
        let mut outcome = Outcome::default();
        loop {
            let part = self.next_part(seq, deadline)?;
            outcome
                .append(&part, request.output_limit)
                .map_err(MachineError::guest_protocol)?;
            // Copied out only for a caller that takes chunks: a plain exec
            // copies its output once, into the outcome.
            if let Some(on_chunk) = on_chunk.as_mut() {
                on_chunk(part.chunk());
            }
            if !part.more() {
                return Ok(outcome);
            }
        }
    }
}

/// An image file to load into guest memory, and its length.
fn open_image(path: &Path) -> std::io::Result<(std::fs::File, u64)> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    Ok((file, len))
}

/// How long after resuming a fork the guest's next timer interrupt may be
/// held back. The template was snapshotted with its scheduler tick at most one
/// tick (10 ms) ahead; moving that deadline out means a short execution runs
/// with no interrupt at all, so the guest kernel never runs. A guest timer
/// due sooner (a short `time.sleep`) fires at this point instead.
pub const TIMER_GRACE: Duration = Duration::from_millis(100);

/// The snapshot's TSC-deadline timer, as an interval from the snapshot's TSC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timer {
    /// Cycles from the snapshot's TSC to its deadline (0 if already due).
    due_in: u64,
    /// [`TIMER_GRACE`] in cycles.
    grace: u64,
}

impl Timer {
    /// The deadline MSR for a guest whose TSC now reads `tsc`: the same
    /// interval as at the snapshot, but no sooner than the grace period.
    fn rearm(self, tsc: u64) -> kvm_bindings::kvm_msr_entry {
        kvm_bindings::kvm_msr_entry {
            index: crate::kvm::MSR_IA32_TSC_DEADLINE,
            data: tsc.saturating_add(self.due_in.max(self.grace)),
            ..Default::default()
        }
    }
}

/// The vCPU's MSRs for a fork: the TSC-deadline timer disarmed (and
/// returned, if it was armed), and without the MSRs that make KVM write guest
/// memory as they are set, which would copy a page into every fork:
/// - the wall clock, which the guest reads only as it boots or resumes from
///   suspend; a fork takes the host's time from the vDSO page instead
///   (guest/kernel/patches/0006);
/// - steal time, which the guest adds to its CPU accounting only; a fork's
///   guest reads the template's figure, unchanging, as no time stolen.
fn fork_msrs(vcpu: &crate::snapshot::state::VcpuState) -> (Vec<kvm_bindings::kvm_msr_entry>, Option<Timer>) {
    use crate::kvm::{
        MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, MSR_KVM_STEAL_TIME, MSR_KVM_WALL_CLOCK, MSR_KVM_WALL_CLOCK_NEW,
    };
    let mut msrs = vcpu.msrs.clone();
    msrs.retain(|m| ![MSR_KVM_WALL_CLOCK, MSR_KVM_WALL_CLOCK_NEW, MSR_KVM_STEAL_TIME].contains(&m.index));
    let tsc = msrs.iter().find(|m| m.index == MSR_IA32_TSC).map_or(0, |m| m.data);
    let khz = u64::from(vcpu.tsc_khz.unwrap_or(0));
    let mut timer = None;
    for m in msrs
        .iter_mut()
        .filter(|m| m.index == MSR_IA32_TSC_DEADLINE && m.data != 0)
    {
        timer = Some(Timer {
            due_in: m.data.saturating_sub(tsc),
            grace: khz * TIMER_GRACE.as_millis() as u64,
        });
        m.data = 0;
    }
    (msrs, timer)
}

/// Guest-physical `(gpa, len)` runs of whole pages.
type Runs = Vec<(u64, u64)>;

/// Splits the page runs `runs` into the pages that lie in `within` (also
/// page runs) and the rest, each as page runs.
fn split_runs(runs: &[(u64, u64)], within: &[(u64, u64)]) -> (Runs, Runs) {
    let inside = |page: u64| within.iter().any(|&(gpa, len)| gpa <= page && page < gpa + len);
    let pages = runs
        .iter()
        .flat_map(|&(gpa, len)| (gpa..gpa + len).step_by(crate::layout::PAGE_SIZE as usize));
    let (kept, dropped): (Vec<u64>, Vec<u64>) = pages.partition(|&page| inside(page));
    (crate::memory::page_runs(kept), crate::memory::page_runs(dropped))
}

fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// Fills `buf` from the kernel's CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        }
    }
}

/// Kicks the vCPU thread out of `KVM_RUN` once the deadline has passed: a
/// POSIX timer that signals the vCPU thread at the deadline and every 10 ms
/// after, until disarmed (a signal that lands between two `KVM_RUN` calls is
/// harmless: the loop checks the deadline, and the next kick comes). A timer
/// rather than a thread: nothing is created per run, and a worker's seccomp
/// filter need not allow `clone`.
struct Watchdog {
    timer: libc::timer_t,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // An error here leaves the default action, which would kill the process on
        // a kick; the handler is trivial, so registration only fails on a bad signal number.
        let _ = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler);
    });
}

impl Watchdog {
    fn arm(deadline: Instant) -> Result<Self, MachineError> {
        install_kick_handler();
        // SAFETY: sigevent is plain data; all-zero is a valid start.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `timer` live across the call.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) } != 0 {
            return Err(MachineError::Watchdog(std::io::Error::last_os_error()));
        }
        let watchdog = Self { timer };
        let timespec = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        // A zero it_value would disarm the timer: a deadline already past
        // fires in 1 µs.
        let first = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        let spec = libc::itimerspec {
            it_value: timespec(first),
            it_interval: timespec(Duration::from_millis(10)),
        };
        // SAFETY: `timer` was just created; `spec` lives across the call.
        if unsafe { libc::timer_settime(watchdog.timer, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(MachineError::Watchdog(std::io::Error::last_os_error()));
        }
        Ok(watchdog)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // SAFETY: the timer was created in `arm` and is deleted only here.
        unsafe { libc::timer_delete(self.timer) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, MSR_KVM_STEAL_TIME, MSR_KVM_WALL_CLOCK_NEW};
    use kvm_bindings::kvm_msr_entry;

    fn msr(index: u32, data: u64) -> kvm_msr_entry {
        kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }
    }

    #[test]
    fn a_rewind_splits_copied_pages_into_those_copied_ahead_and_the_rest() {
        const P: u64 = 4096;
        // Copies: pages 1-4 and 10; copied ahead: pages 0-2 and 4, and 10.
        let copies = [(P, 4 * P), (10 * P, P)];
        let every = [(0, 3 * P), (4 * P, P), (10 * P, P)];
        let (kept, dropped) = split_runs(&copies, &every);
        assert_eq!(kept, vec![(P, 2 * P), (4 * P, P), (10 * P, P)]);
        assert_eq!(dropped, vec![(3 * P, P)]);
        assert_eq!(split_runs(&copies, &[]), (vec![], copies.to_vec()));
    }

    #[test]
    fn fork_msrs_disarm_the_timer_and_drop_those_that_make_kvm_write_memory() {
        let mut state = crate::snapshot::tests::sample_state().vcpu;
        state.tsc_khz = Some(1_000_000); // 1 GHz: 1 ms = 1e6 cycles
        state.msrs = vec![
            msr(MSR_IA32_TSC, 5_000_000),
            msr(MSR_IA32_TSC_DEADLINE, 6_000_000),
            msr(MSR_KVM_WALL_CLOCK_NEW, 0x1b6_e000),
            msr(0x1a0, 1),
            msr(MSR_KVM_STEAL_TIME, 0x1a3_6a01),
        ];
        let (msrs, timer) = fork_msrs(&state);
        assert_eq!(
            msrs.len(),
            3,
            "the wall clock and steal time are not restored: {msrs:?}"
        );
        assert_eq!(msrs[1].data, 0, "restored disarmed");
        assert_eq!(
            (msrs[0].data, msrs[2]),
            (5_000_000, msr(0x1a0, 1)),
            "other MSRs untouched"
        );
        let timer = timer.unwrap();
        // Due 1 ms after the snapshot: held back to the grace period.
        assert_eq!(timer.rearm(9_000_000_000).data, 9_000_000_000 + 100 * 1_000_000);
        // Due 1 s after the snapshot: stays 1 s out.
        state.msrs[1].data = 5_000_000 + 1_000_000_000;
        assert_eq!(fork_msrs(&state).1.unwrap().rearm(7).data, 7 + 1_000_000_000);
        // A disarmed timer stays disarmed.
        state.msrs[1].data = 0;
        assert_eq!(fork_msrs(&state).1, None);
    }
}
