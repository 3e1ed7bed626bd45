//! Templates: a booted, warmed-up guest captured at the agent's READY
//! doorbell. A template directory holds `state.bin`, `memory.bin` (see
//! zeroboot_vmm::snapshot), the guest's `boot.log`, and `template.json`.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use zeroboot_protocol::{Doorbell, GuestFault, ProtocolError, Request};
use zeroboot_vmm::snapshot::{self, Snapshot, SnapshotError, MEMORY_FILE};
use zeroboot_vmm::{page_cache, BootSpec, ForkMemory, Hypervisor, Machine, MachineError};

use crate::artifacts::{self, ArtifactError};
use crate::cache::{io_err, Cache, CacheError, InputHash};
use crate::progress::Progress;
use crate::runtime::{Runtime, PRINT_PROBE_OUTPUT};
use crate::spec::{is_valid_name, TemplateSpec};

pub const METADATA_FILE: &str = "template.json";
pub const BOOT_LOG: &str = "boot.log";

/// The kernel command line, and why each switch is there:
/// - `noxsave`, `clearcpuid=smap,popcnt`: keep the guest kernel off XRSTOR,
///   CLAC/STAC and POPCNT, which nested KVM without VMX cannot emulate
///   (shared/docs/host-kvm.md); on real hardware they only cost a little speed.
/// - `nokaslr`: the host reads kernel symbols from System.map.
/// - `reboot=k panic=1`: a panic resets through the i8042, which the VMM sees.
/// - `rootwait`: libnvdimm probes /dev/pmem0 asynchronously.
/// - `tsc=reliable`: no clocksource watchdog. A fork's TSC has moved on since
///   the snapshot while kvmclock has not, which the watchdog would take for
///   an unstable TSC (see vmm::guest_clock).
/// - `no-kvmapf`: no asynchronous page faults. A fork's first touch of a
///   template page would otherwise interrupt the guest twice ("page not
///   present", "page ready") and run its scheduler, all in the guest kernel.
///
/// `init=` follows, naming the runtime's agent (`RuntimeDescriptor::init`).
pub const KERNEL_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 nokaslr noxsave clearcpuid=smap,popcnt tsc=reliable no-kvmapf";
pub const ROOT_ARGS: &str = "rootfstype=erofs rootflags=dax ro rootwait";
fn kernel_cmdline(runtime: Runtime) -> String {
    format!("{KERNEL_CMDLINE} init={}", runtime.descriptor().init)
}

/// Forks the freshly written template once per write-set probe (requests
/// whose writes a prepared VM copies ahead of time; see vmm's
/// `Shell::new`) and records the union of the pages each fork wrote. A
/// probe that fails, or a print probe that does not print
/// `PRINT_PROBE_OUTPUT`, means the agent cannot serve: the build fails.
fn record_write_set(hv: &Hypervisor, dir: &Path, runtime: Runtime) -> Result<(), TemplateError> {
    let vendor = zeroboot_vmm::machine::cpu_vendor(hv);
    let snap = Snapshot::open(dir, &vendor)?;
    let mut pages = std::collections::BTreeSet::new();
    let runtime = runtime.descriptor();
    for code in runtime.all_write_set_probes() {
        // Shared pages: the copy-on-write of each written page is what
        // shows the write set.
        let mut fork = Machine::restore(hv, &snap, ForkMemory::SharedPages, Box::new(std::io::sink()))?;
        let response = fork.exec(&Request::new(code.as_bytes(), b""), BOOT_TIMEOUT)?;
        let stdout = String::from_utf8_lossy(&response.stdout);
        if response.exit_code != 0 || (code == runtime.print_probe && stdout != PRINT_PROBE_OUTPUT) {
            return Err(TemplateError::SmokeTest {
                code: code.to_string(),
                exit_code: response.exit_code,
                output: format!("{stdout}{}", String::from_utf8_lossy(&response.stderr)),
            });
        }
        for (gpa, len) in fork.ram().private_runs().map_err(MachineError::from)? {
            pages.extend((gpa..gpa + len).step_by(zeroboot_vmm::layout::PAGE_SIZE as usize));
        }
    }
    let runs = zeroboot_vmm::memory::page_runs(pages);
    let path = dir.join(snapshot::WRITE_SET_FILE);
    std::fs::write(&path, snapshot::format_write_set(&runs)).map_err(io_err(&path))?;
    Ok(())
}

/// Boot-to-ready limit. A boot here takes about a minute; minutes mean trouble.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20 * 60);

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("booting the template failed: {source}; the guest console is in {log}")]
    Boot { source: MachineError, log: PathBuf },
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("template name {0:?} must be 1-64 characters of a-z, 0-9, '-' or '_'")]
    BadName(String),
    #[error("no template named {name:?} in {dir}; build it with `zeroboot template build --name {name}`")]
    NotFound { name: String, dir: PathBuf },
    #[error("{path}: {message}")]
    Metadata { path: PathBuf, message: String },
    #[error(
        "{path} is damaged: its checksum is {actual:#010x}, the template recorded {expected:#010x}; \
         rebuild it with `zeroboot template build --name {name}`"
    )]
    Corrupt {
        name: String,
        path: PathBuf,
        expected: u32,
        actual: u32,
    },
    #[error(transparent)]
    Seccomp(#[from] zeroboot_sandbox::seccomp::SeccompError),
    #[error("the template's boot thread panicked")]
    BootPanicked,
    #[error("the new template does not serve: `{code}` exited with {exit_code}, printing:\n{output}")]
    SmokeTest {
        code: String,
        exit_code: i32,
        output: String,
    },
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error("template {name:?} has no memory checksum (an older zeroboot made it); rebuild it with `zeroboot template build --name {name}`")]
    Unverified { name: String },
}

impl TemplateError {
    /// The template does not exist, or an older zeroboot made it (a state
    /// format this one does not read, no checksum): `template build` makes a
    /// usable one. A damaged template is not in this list: it is refused
    /// until someone asks for a rebuild.
    pub fn needs_build(&self) -> bool {
        matches!(
            self,
            Self::NotFound { .. }
                | Self::Unverified { .. }
                | Self::Snapshot(SnapshotError::Codec {
                    source: zeroboot_vmm::snapshot::codec::CodecError::Version { .. },
                    ..
                })
        )
    }
}

/// Seconds spent in each build phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseTimes {
    pub artifacts_s: f64,
    pub boot_s: f64,
    pub snapshot_s: f64,
}

/// `template.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub name: String,
    pub mem_mib: u64,
    /// Hash of everything the template was built from; a different value
    /// means the template is stale.
    pub inputs: String,
    pub kernel: String,
    pub root_image: String,
    pub created_unix: u64,
    pub phases: PhaseTimes,
    /// Guest memory the snapshot holds (non-zero pages), in bytes.
    pub memory_bytes: u64,
    pub exits_to_ready: u64,
    /// `page_cache::memory_checksum` of the memory file when it was written;
    /// checked on open. None in templates made before it existed.
    #[serde(default)]
    pub memory_crc32: Option<u32>,
    /// 2 MiB ranges of the memory file that the page cache held in 2 MiB
    /// folios when it was written (`page_cache::MemoryFileRead`): what an
    /// open restores if the cache has since been spoilt. None in templates
    /// made before it existed.
    #[serde(default)]
    pub memory_huge_ranges: Option<u64>,
    /// What it was built from. None in templates made before specs existed
    /// (which were all the python template).
    #[serde(default)]
    pub spec: Option<TemplateSpec>,
}

impl TemplateInfo {
    pub fn runtime(&self) -> Runtime {
        self.spec.as_ref().map_or(Runtime::Python, |s| s.runtime)
    }
}

pub fn validate_name(name: &str) -> Result<(), TemplateError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(TemplateError::BadName(name.into()))
    }
}

pub fn template_dir(cache: &Cache, name: &str) -> Result<PathBuf, TemplateError> {
    validate_name(name)?;
    Ok(cache.templates_dir().join(name))
}

fn inputs_hash(spec: &TemplateSpec, kernel: &str, root: &str) -> String {
    let mut h = InputHash::new("template");
    h.add(b"kernel", kernel.as_bytes())
        .add(b"root", root.as_bytes())
        .add(b"mem_mib", &spec.mem_mib.to_le_bytes())
        .add(b"cmdline", kernel_cmdline(spec.runtime).as_bytes())
        .add(b"root_args", ROOT_ARGS.as_bytes())
        .add(b"state_format", &snapshot::codec::FORMAT_VERSION.to_le_bytes())
        .add(
            b"write_set_probes",
            spec.runtime.descriptor().all_write_set_probes().join("\0").as_bytes(),
        )
        .add(b"engine", env!("CARGO_PKG_VERSION").as_bytes());
    h.finish()
}

pub fn read_info(dir: &Path) -> Result<TemplateInfo, TemplateError> {
    let path = dir.join(METADATA_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| TemplateError::Metadata {
        path,
        message: e.to_string(),
    })
}

/// Serial console sink for the template boot: writes `boot.log` and passes
/// whole lines to the progress display.
struct Console {
    file: File,
    line: Vec<u8>,
    progress: Arc<dyn Progress>,
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write_all(buf)?;
        for &b in buf {
            if b == b'\n' {
                let text = String::from_utf8_lossy(&self.line).trim_end().to_string();
                self.progress.line(&text);
                self.line.clear();
            } else if self.line.len() < 512 {
                self.line.push(b);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Builds template `spec.name`, or returns the existing one if it is up to
/// date and opens cleanly. `force` rebuilds regardless.
pub fn build(
    cache: &Cache,
    spec: &TemplateSpec,
    progress: Arc<dyn Progress>,
    force: bool,
) -> Result<(PathBuf, TemplateInfo, bool), TemplateError> {
    spec.validate()?;
    let dir = template_dir(cache, &spec.name)?;
    let started = Instant::now();
    let kernel = artifacts::ensure_kernel(cache, progress.as_ref())?;
    let root = artifacts::ensure_root_image(cache, spec, progress.as_ref())?;
    let artifacts_s = started.elapsed().as_secs_f64();
    let inputs = inputs_hash(spec, &kernel.hash, &root.hash);

    let _lock = cache.lock(&format!("template-{}", spec.name))?;
    let hv = Hypervisor::open().map_err(MachineError::from)?;
    if !force {
        if let Ok(info) = read_info(&dir) {
            let vendor = zeroboot_vmm::machine::cpu_vendor(&hv);
            if info.inputs == inputs && Snapshot::open(&dir, &vendor).is_ok() && verify(&dir, &info).is_ok() {
                return Ok((dir, info, true));
            }
        }
    }

    // Build into a sibling directory and swap it in, so a failed or
    // interrupted build never leaves a half-written template behind.
    let staging = dir.with_extension("building");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_err(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io_err(&staging))?;

    // From here the template's guest runs, inside a root process: on a
    // thread of its own, under a seccomp filter that lets it run the VM and
    // write the template's files, and nothing like exec, sockets or mounts.
    let boot_and_snapshot = || -> Result<(TemplateInfo, Instant), TemplateError> {
        for filter in zeroboot_sandbox::seccomp::builder_filters()? {
            zeroboot_sandbox::seccomp::install_on_this_thread(&filter)?;
        }
        progress.start("boot");
        let boot_started = Instant::now();
        let boot_spec = BootSpec {
            kernel: kernel.vmlinux.clone(),
            cmdline: kernel_cmdline(spec.runtime),
            root_image: Some(root.path.clone()),
            initrd: None,
            system_map: Some(kernel.system_map.clone()),
            mem_mib: spec.mem_mib,
            root_args: ROOT_ARGS.into(),
        };
        let log_path = staging.join(BOOT_LOG);
        let console = Console {
            file: File::create(&log_path).map_err(io_err(&log_path))?,
            line: Vec::new(),
            progress: progress.clone(),
        };
        let boot_err = |source: MachineError| TemplateError::Boot {
            source,
            log: dir.join(BOOT_LOG),
        };
        let mut machine = Machine::boot(&hv, &boot_spec, Box::new(console)).map_err(boot_err)?;
        let rung = machine.run_until_doorbell(BOOT_TIMEOUT);
        // Keep the console log where the error message points, even on failure.
        let rung = match rung {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::copy(&log_path, dir.join(BOOT_LOG));
                return Err(boot_err(e));
            }
        };
        if rung != Doorbell::Ready {
            return Err(boot_err(
                GuestFault::Protocol(ProtocolError::WrongDoorbell {
                    expected: Doorbell::Ready,
                    got: rung,
                })
                .into(),
            ));
        }
        let boot_s = boot_started.elapsed().as_secs_f64();
        progress.finish("boot", boot_started.elapsed(), false);

        progress.start("snapshot");
        let snap_started = Instant::now();
        let state = machine.save()?;
        let exits_to_ready = machine.exits();
        let mem_path = staging.join(MEMORY_FILE);
        let mut mem_file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&mem_path)
            .map_err(io_err(&mem_path))?;
        let memory_bytes = machine.ram().write_sparse(&mut mem_file).map_err(MachineError::from)?;
        mem_file.sync_all().map_err(io_err(&mem_path))?;
        // Ordering: drop the written pages from the page cache before the
        // checksum reads the file back, so that it is cached in 2 MiB folios
        // (page_cache::memory_checksum).
        page_cache::release_page_cache(&mem_file).map_err(io_err(&mem_path))?;
        let memory_read = page_cache::read_memory_file(&mem_file).map_err(io_err(&mem_path))?;
        snapshot::write_state(&staging, &state)?;
        drop(machine);
        record_write_set(&hv, &staging, spec.runtime)?;
        let info = TemplateInfo {
            name: spec.name.clone(),
            mem_mib: spec.mem_mib,
            inputs,
            kernel: kernel.hash.clone(),
            root_image: root.hash.clone(),
            created_unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            phases: PhaseTimes {
                artifacts_s,
                boot_s,
                snapshot_s: snap_started.elapsed().as_secs_f64(),
            },
            memory_bytes,
            exits_to_ready,
            memory_crc32: Some(memory_read.crc32),
            memory_huge_ranges: Some(memory_read.huge_ranges),
            spec: Some(spec.clone()),
        };
        let meta = staging.join(METADATA_FILE);
        let json = serde_json::to_string_pretty(&info).map_err(|e| TemplateError::Metadata {
            path: meta.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&meta, json).map_err(io_err(&meta))?;
        Ok((info, snap_started))
    };
    let (info, snap_started) =
        std::thread::scope(|s| s.spawn(boot_and_snapshot).join()).map_err(|_| TemplateError::BootPanicked)??;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    std::fs::rename(&staging, &dir).map_err(io_err(&dir))?;
    progress.finish("snapshot", snap_started.elapsed(), false);
    Ok((dir, info, false))
}

/// Opens template `name` for restoring.
pub fn open(cache: &Cache, hv: &Hypervisor, name: &str) -> Result<Snapshot, TemplateError> {
    let dir = template_dir(cache, name)?;
    if !dir.join(METADATA_FILE).exists() {
        return Err(TemplateError::NotFound {
            name: name.into(),
            dir: cache.templates_dir(),
        });
    }
    let snapshot = Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(hv))?;
    verify(&dir, &read_info(&dir)?)?;
    Ok(snapshot)
}

/// Checks the memory file against the checksum recorded when it was
/// written. (The state file carries its own CRC, checked as it is read.)
pub fn verify(dir: &Path, info: &TemplateInfo) -> Result<(), TemplateError> {
    let expected = info.memory_crc32.ok_or_else(|| TemplateError::Unverified {
        name: info.name.clone(),
    })?;
    let path = dir.join(snapshot::MEMORY_FILE);
    let file = File::open(&path).map_err(io_err(&path))?;
    // Templates from before `memory_huge_ranges` was recorded get the
    // repair only where some range is already in a 2 MiB folio.
    let possible = match info.memory_huge_ranges {
        Some(ranges) => ranges,
        None => {
            let read = page_cache::read_memory_file(&file).map_err(io_err(&path))?;
            if read.huge_ranges > 0 {
                read.data_ranges
            } else {
                0
            }
        }
    };
    let read = page_cache::read_and_repair(&file, possible).map_err(io_err(&path))?;
    let actual = read.crc32;
    if actual != expected {
        return Err(TemplateError::Corrupt {
            name: info.name.clone(),
            path,
            expected,
            actual,
        });
    }
    Ok(())
}

/// One line of `zeroboot template ls`.
pub struct Listed {
    pub name: String,
    pub info: Option<TemplateInfo>,
    /// Disk blocks the template's files occupy (the memory file is sparse).
    pub disk_bytes: u64,
}

pub fn list(cache: &Cache) -> Result<Vec<Listed>, TemplateError> {
    let dir = cache.templates_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir)(e).into()),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !path.is_dir() || validate_name(&name).is_err() {
            continue;
        }
        let disk_bytes = std::fs::read_dir(&path)
            .map(|files| {
                files
                    .flatten()
                    .filter_map(|f| f.metadata().ok())
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0);
        out.push(Listed {
            info: read_info(&path).ok(),
            name,
            disk_bytes,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("python").is_ok());
        assert!(validate_name("py-3_x").is_ok());
        for bad in ["", "../x", "Py", "a/b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inputs_hash_tracks_memory_size() {
        let a = inputs_hash(&TemplateSpec::default(), "k", "r");
        let b = inputs_hash(
            &TemplateSpec {
                mem_mib: 1024,
                ..Default::default()
            },
            "k",
            "r",
        );
        assert_ne!(a, b);
    }

    #[test]
    fn missing_template_is_a_clear_error() {
        let cache = Cache::at(std::env::temp_dir().join(format!("zeroboot-empty-{}", std::process::id())));
        assert!(list(&cache).unwrap().is_empty());
        if let Ok(hv) = Hypervisor::open() {
            let err = open(&cache, &hv, "nope").err().unwrap().to_string();
            assert!(err.contains("zeroboot template build --name nope"), "{err}");
        }
    }
}
