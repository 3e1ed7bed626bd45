//! Building a template: the guest artifacts, a boot to the agent's READY
//! doorbell, the snapshot, and the write set and smoke test from forks of
//! it, written through a [`Staging`] directory.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use zeroboot_protocol::{Doorbell, GuestFault, ProtocolError, Request};
use zeroboot_vmm::snapshot::{self, Snapshot};
use zeroboot_vmm::{BootSpec, ForkMemory, Hypervisor, Machine, MachineError};

use crate::artifacts;
use crate::cache::{io_err, Cache, InputHash};
use crate::error::TemplateError;
use crate::progress::Progress;
use crate::runtime::{Runtime, PRINT_PROBE_OUTPUT};
use crate::spec::TemplateSpec;
use crate::store::{open, read_info, rewrite_info, template_dir, PhaseTimes, Staging, TemplateInfo, BOOT_LOG};

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
    "console=ttyS0 reboot=k panic=1 nokaslr noxsave clearcpuid=smap,popcnt,clwb,erms,fsrm tsc=reliable no-kvmapf";
pub const ROOT_ARGS: &str = "rootfstype=erofs rootflags=dax ro rootwait";
fn kernel_cmdline(runtime: Runtime) -> String {
    format!("{KERNEL_CMDLINE} init={}", runtime.descriptor().init)
}

/// Forks the freshly written template once per write-set probe and records
/// the pages each fork wrote, in two parts: those every fork wrote, which
/// shared-pages VMs copy ahead, and the rest, whose 2 MiB ranges (with the
/// first part's) private-written-ranges VMs copy (see vmm's `Shell::new`).
/// A probe that fails, or a print probe that does not print
/// `PRINT_PROBE_OUTPUT`, means the agent cannot serve: the build fails.
fn record_write_set(hv: &Hypervisor, staging: &Staging, runtime: Runtime) -> Result<(), TemplateError> {
    let vendor = zeroboot_vmm::machine::cpu_vendor(hv);
    let snap = Snapshot::open(staging.path(), &vendor)?;
    let mut probes = Vec::new();
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
        let mut pages = std::collections::BTreeSet::new();
        for (gpa, len) in fork.ram().private_runs().map_err(MachineError::from)? {
            pages.extend((gpa..gpa + len).step_by(zeroboot_vmm::layout::PAGE_SIZE as usize));
        }
        probes.push(pages);
    }
    staging.write_write_set(&snapshot::WriteSet::from_probes(&probes))
}

/// Boot-to-ready limit. A boot here takes about a minute; minutes mean trouble.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20 * 60);

fn inputs_hash(spec: &TemplateSpec, kernel: &str, root: &str) -> String {
    let mut h = InputHash::new("template");
    h.add(b"kernel", kernel.as_bytes())
        .add(b"root", root.as_bytes())
        .add(b"mem_mib", &spec.mem_mib.to_le_bytes())
        .add(b"disk", artifacts::disk_hash(spec.disk_mib).as_bytes())
        .add(b"cmdline", kernel_cmdline(spec.runtime).as_bytes())
        .add(b"root_args", ROOT_ARGS.as_bytes())
        .add(b"state_format", &snapshot::codec::FORMAT_VERSION.to_le_bytes())
        .add(
            b"write_set_probes",
            spec.runtime.descriptor().all_write_set_probes().join("\0").as_bytes(),
        )
        // The write set's parts (every probe's pages, and the rest): a
        // template from before them copies all of it ahead.
        .add(b"write_set_parts", b"every some")
        .add(b"engine", env!("CARGO_PKG_VERSION").as_bytes());
    h.finish()
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
    let disk = artifacts::ensure_disk_image(cache, spec.disk_mib, progress.as_ref())?;
    let artifacts_s = started.elapsed().as_secs_f64();
    let inputs = inputs_hash(spec, &kernel.hash, &root.hash);

    let _lock = cache.lock(&format!("template-{}", spec.name))?;
    let hv = Hypervisor::open().map_err(MachineError::from)?;
    if !force {
        if let Ok(info) = read_info(&dir) {
            if info.inputs == inputs && open(cache, &hv, &spec.name).is_ok() {
                // What is not a build input (the network policy) is taken
                // from the spec as it is now.
                if info.spec.as_ref() == Some(spec) {
                    return Ok((dir, info, true));
                }
                let info = TemplateInfo {
                    spec: Some(spec.clone()),
                    ..info
                };
                rewrite_info(&dir, &info)?;
                return Ok((dir, info, true));
            }
        }
    }
    let staging = Staging::new(&dir)?;

    // From here the template's guest runs, inside a root process: on a
    // thread of its own, under a seccomp filter that lets it run the VM and
    // write the template's files, and nothing like exec, sockets or mounts.
    let boot_and_snapshot = || -> Result<(TemplateInfo, Instant), TemplateError> {
        for filter in zeroboot_seccomp::builder_filters()? {
            zeroboot_seccomp::install_on_this_thread(&filter)?;
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
            disk_image: disk.clone(),
        };
        let log_path = staging.path().join(BOOT_LOG);
        let console = Console {
            file: File::create(&log_path).map_err(io_err(&log_path))?,
            line: Vec::new(),
            progress: progress.clone(),
        };
        let boot_err = |source: MachineError| TemplateError::Boot {
            source,
            log: staging.dir().join(BOOT_LOG),
        };
        let mut machine = Machine::boot(&hv, &boot_spec, Box::new(console)).map_err(boot_err)?;
        let rung = machine.run_until_doorbell(BOOT_TIMEOUT);
        // Keep the console log where the error message points, even on failure.
        let rung = match rung {
            Ok(r) => r,
            Err(e) => {
                staging.keep_boot_log();
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
        let exits_to_ready = machine.exits();
        let written = staging.write_snapshot(&machine)?;
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
            memory_bytes: written.memory_bytes,
            exits_to_ready,
            memory_crc32: Some(written.memory.crc32),
            memory_huge_ranges: Some(written.memory.huge_ranges),
            spec: Some(spec.clone()),
        };
        staging.write_info(&info)?;
        Ok((info, snap_started))
    };
    let (info, snap_started) =
        std::thread::scope(|s| s.spawn(boot_and_snapshot).join()).map_err(|_| TemplateError::BootPanicked)??;
    let dir = staging.commit()?;
    progress.finish("snapshot", snap_started.elapsed(), false);
    Ok((dir, info, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_hash_tracks_memory_size() {
        let a = inputs_hash(&TemplateSpec::default(), "k", "r");
        let b = inputs_hash(
            &TemplateSpec {
                mem_mib: 2048,
                ..Default::default()
            },
            "k",
            "r",
        );
        assert_ne!(a, b);
    }
}
