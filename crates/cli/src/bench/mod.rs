//! `zeroboot bench`: fork and exec latency, throughput, memory per sandbox,
//! pages an exec writes and touches, and density. Every figure says exactly
//! what its timed region contains.

mod density;
mod fresh_memory;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;
use zeroboot_protocol::Request;
use zeroboot_sandbox::{IsolatedTemplate, Sandbox, WorkerCommand};
use zeroboot_template::Runtime;
use zeroboot_vmm::{ForkMemory, ForkMemoryPolicy, Snapshot};

/// The python template's second figure, which the README and the JSON
/// (`exec_numpy_us`) name by its call.
const NUMPY: &str = Runtime::Python.descriptor().bench_code;
const TIMEOUT: Duration = Duration::from_secs(60);
/// The python template's density workload (see [`density`]).
const LIVE_NUMPY: &str = "import numpy; numpy.zeros(5).tolist()";

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value = zeroboot_template::DEFAULT_NAME)]
    pub template: String,
    /// Samples per latency figure.
    #[arg(long, default_value_t = 100)]
    pub iterations: usize,
    /// Fork+exec runs in the throughput figure.
    #[arg(long, default_value_t = 1000)]
    pub throughput_count: usize,
    /// Sandbox processes kept with their VM prepared (0: every fork starts
    /// its own process and VM).
    #[arg(long, default_value_t = 2)]
    pub pool: usize,
    /// Code for the second exec figure (default: numpy.random.rand(3) for
    /// python, crypto.randomBytes for node, `ls /` for bash).
    #[arg(long)]
    pub code: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// How forks back their guest memory.
    #[arg(long, value_enum, default_value = "auto")]
    pub fork_memory: crate::fork_memory::ForkMemoryArg,
}

#[derive(Clone, Copy)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn percentiles(mut us: Vec<f64>) -> Percentiles {
    us.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| {
        let i = ((p * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1;
        us[i]
    };
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    }
}

impl Percentiles {
    fn json(&self) -> serde_json::Value {
        json!({"p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max})
    }
}

fn exec(machine: &mut Sandbox, code: &str) -> Result<()> {
    let r = machine.exec(&Request::new(code.as_bytes(), b""), TIMEOUT)?;
    if r.exit_code != 0 {
        bail!("bench code {code:?} failed: {}", String::from_utf8_lossy(&r.stderr));
    }
    Ok(())
}

/// Code as a figure's label: the numpy probe by its call, anything long cut.
fn short(code: &str) -> String {
    if code == NUMPY {
        return "numpy.random.rand(3)".into();
    }
    let one_line = code.replace('\n', "; ");
    match one_line.char_indices().nth(20) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (nested, no VMX: guest kernel mode emulated)"
    } else if std::path::Path::new("/sys/module/kvm_intel").exists() {
        "kvm_intel"
    } else if std::path::Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd"
    } else {
        "kvm"
    };
    format!("{cpu}, {cores} cores, host kernel {}, {kvm}", kernel.trim())
}

fn fork(template: &IsolatedTemplate) -> Result<Sandbox> {
    Ok(template.fork()?)
}

/// Time for the pool to refill between timed forks, as between requests.
const REFILL: Duration = Duration::from_millis(30);

/// How many forks of a figure had each fork memory.
#[derive(Default)]
struct MemoryCounts {
    shared_pages: usize,
    private_written_ranges: usize,
    /// Of the shared-pages ones, those whose VM ran the template's probes.
    probes_ran: usize,
}

impl MemoryCounts {
    fn add(&mut self, sandbox: &Sandbox) {
        match sandbox.fork_memory() {
            ForkMemory::SharedPages => self.shared_pages += 1,
            ForkMemory::PrivateWrittenRanges => self.private_written_ranges += 1,
        }
        self.probes_ran += usize::from(sandbox.probes_ran());
    }

    fn json(&self) -> serde_json::Value {
        json!({
            ForkMemory::SharedPages.name(): self.shared_pages,
            ForkMemory::PrivateWrittenRanges.name(): self.private_written_ranges,
            "probes_ran": self.probes_ran,
        })
    }

    fn describe(&self) -> String {
        format!(
            "{} {}, {} {} ({} of them after the probes)",
            self.private_written_ranges,
            ForkMemory::PrivateWrittenRanges.name(),
            self.shared_pages,
            ForkMemory::SharedPages.name(),
            self.probes_ran
        )
    }
}

pub fn run(snap: Snapshot, runtime: Runtime, policy: ForkMemoryPolicy, args: &BenchArgs) -> Result<()> {
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let print_code = runtime.descriptor().print_probe;
    let second_code = args.code.as_deref().unwrap_or(runtime.descriptor().bench_code);
    let live_code = if runtime == Runtime::Python {
        LIVE_NUMPY
    } else {
        print_code
    };
    let n = args.iterations;
    let dir = snap.dir.clone();
    // The fresh-memory workloads are Python, and without a fresh heap
    // (heap_mib = 0) they would fault in every page, minutes here.
    let has_fresh_heap = !snap.state.fresh.is_empty();
    let worker = WorkerCommand::current_exe(&["worker"])?;
    let cold_snap = Snapshot::open(&snap.dir, &snap.state.cpu_vendor)?;
    let fork_memory = policy.name();
    let cold = IsolatedTemplate::new(worker.clone(), cold_snap, 0, policy);
    let probes = crate::serve::probe_codes(runtime.descriptor());
    let template = IsolatedTemplate::with_probes(worker, snap, args.pool, policy, probes);
    let mut spawn_cold = Vec::with_capacity(n);
    let mut spawn = Vec::with_capacity(n);
    let mut print = Vec::with_capacity(n);
    let mut second = Vec::with_capacity(n);
    let mut exits = Vec::with_capacity(n);
    let mut private = Vec::with_capacity(n);
    let mut huge = Vec::with_capacity(n);
    let mut cold_memory = MemoryCounts::default();
    let mut print_memory = MemoryCounts::default();
    let mut second_memory = MemoryCounts::default();
    // A loop of its own, so that how long a fork without a pool takes does
    // not change how much time the pool below has to refill.
    for _ in 0..n {
        std::thread::sleep(REFILL);
        let t = Instant::now();
        let m = fork(&cold)?;
        spawn_cold.push(t.elapsed().as_secs_f64() * 1e6);
        cold_memory.add(&m);
    }
    drop(cold);
    for _ in 0..n {
        std::thread::sleep(REFILL);
        let t = Instant::now();
        let m = fork(&template)?;
        spawn.push(t.elapsed().as_secs_f64() * 1e6);
        drop(m);

        std::thread::sleep(REFILL);
        let t = Instant::now();
        let mut m = fork(&template)?;
        exec(&mut m, print_code)?;
        print.push(t.elapsed().as_secs_f64() * 1e6);
        print_memory.add(&m);
        let stats = m.stats()?;
        exits.push(stats.exits as f64);
        private.push(stats.private_bytes as f64 / 1024.0);
        huge.push(stats.huge_mapped_bytes as f64 / 1024.0);
        drop(m);

        std::thread::sleep(REFILL);
        let t = Instant::now();
        let mut m = fork(&template)?;
        exec(&mut m, second_code)?;
        second.push(t.elapsed().as_secs_f64() * 1e6);
        second_memory.add(&m);
    }
    let template = &template;

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let remaining = AtomicUsize::new(args.throughput_count);
    let t = Instant::now();
    let throughput_memory = std::thread::scope(|s| -> Result<MemoryCounts> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<MemoryCounts> {
                    let mut counts = MemoryCounts::default();
                    while remaining
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1))
                        .is_ok()
                    {
                        let mut m = fork(template)?;
                        exec(&mut m, print_code)?;
                        counts.add(&m);
                    }
                    Ok(counts)
                })
            })
            .collect();
        let mut total = MemoryCounts::default();
        for w in workers {
            let counts = w.join().map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
            total.shared_pages += counts.shared_pages;
            total.private_written_ranges += counts.private_written_ranges;
            total.probes_ran += counts.probes_ran;
        }
        Ok(total)
    })?;
    let throughput_s = t.elapsed().as_secs_f64();
    let density = density::live_sandboxes(template, live_code)?;
    let fresh = if has_fresh_heap && runtime == Runtime::Python {
        fresh_memory::measure(template)?
    } else {
        Vec::new()
    };
    // Counted in this process, in forks of their own, after every timed
    // figure: none of it is inside a timed region.
    let hv = zeroboot_vmm::Hypervisor::open()?;
    let print_pages = crate::pages::measure(&hv, &dir, runtime.descriptor(), print_code)?;
    let second_pages = crate::pages::measure(&hv, &dir, runtime.descriptor(), second_code)?;

    let spawn = percentiles(spawn);
    let spawn_cold = percentiles(spawn_cold);
    let print = percentiles(print);
    let second = percentiles(second);
    let exits = percentiles(exits);
    let private = percentiles(private);
    let huge = percentiles(huge);
    let machine = machine_description();
    if args.json {
        let mut out = json!({
            "machine": machine,
            "runtime": runtime.name(),
            "print_code": print_code,
            "code": second_code,
            "iterations": n,
            "pool": args.pool,
            "fork_memory": fork_memory,
            "fork_memory_spawn_cold": cold_memory.json(),
            "fork_memory_exec_print": print_memory.json(),
            "fork_memory_exec_code": second_memory.json(),
            "fork_memory_throughput": throughput_memory.json(),
            "spawn_us": spawn.json(),
            "spawn_cold_us": spawn_cold.json(),
            "exec_print_us": print.json(),
            "exec_code_us": second.json(),
            "throughput_count": args.throughput_count,
            "throughput_threads": threads,
            "throughput_1000_s": throughput_s * 1000.0 / args.throughput_count.max(1) as f64,
            "private_kib_per_sandbox": private.p50,
            "huge_mapped_kib_per_sandbox": huge.p50,
            "exits_per_exec_print": exits.p50,
            "pages_written_print": print_pages.written,
            "pages_touched_print": print_pages.touched,
            "pages_written_code": second_pages.written,
            "pages_touched_code": second_pages.touched,
            "live_sandboxes": density::LIVE,
            "live_clients": density::CLIENTS,
            "live_code": live_code,
            "host_kib_per_live_sandbox": density.host_kib_per_sandbox,
            "host_kib_per_live_sandbox_by_kind": density
                .breakdown
                .iter()
                .map(|&(name, kib)| (name.to_string(), json!(kib)))
                .collect::<serde_json::Map<_, _>>(),
            "live_100_ms": density.wall_ms,
        });
        if second_code == NUMPY {
            out["exec_numpy_us"] = second.json();
            out["pages_written_numpy"] = second_pages.written.into();
        }
        if live_code == LIVE_NUMPY {
            out["live_100_numpy_ms"] = density.wall_ms.into();
        }
        for f in &fresh {
            out[format!("{}_s", f.name)] = f.seconds.into();
            out[format!("{}_guest_page_faults", f.name)] = f.guest_page_faults.into();
            out[format!("{}_fork_to_result_s", f.name)] = f.fork_to_result_s.into();
        }
        println!("{out}");
        return Ok(());
    }
    println!("machine: {machine}");
    println!(
        "template runtime: {}; {n} iterations each; microseconds",
        runtime.name()
    );
    println!(
        "each sandbox is a worker process holding one new VM; forks take one prepared\n\
         ahead of time from a pool of {} ({} ms idle before each timed fork);\n\
         a shared-pages VM the pool prepares while it keeps up has run the\n\
         template's probes, undone, so KVM already maps what they read;\n\
         \"no pool\" starts the process and makes the VM inside the timed region;\n\
         fork memory: {fork_memory} (no pool: {}; print: {}; second: {}; throughput: {})\n",
        args.pool,
        REFILL.as_millis(),
        cold_memory.describe(),
        print_memory.describe(),
        second_memory.describe(),
        throughput_memory.describe(),
    );
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>10}",
        "figure (timed region)", "p50", "p90", "p99", "max"
    );
    for (name, p) in [
        ("spawn, no pool: fork → runnable".to_string(), spawn_cold),
        ("spawn: fork call → VM runnable".to_string(), spawn),
        (format!("{}: fork call → result", short(print_code)), print),
        (format!("{}: fork → result", short(second_code)), second),
    ] {
        println!(
            "{name:<36} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
            p.p50, p.p90, p.p99, p.max
        );
    }
    println!(
        "\nthroughput: {} fork+exec of {print_code} on {threads} threads in {throughput_s:.2} s",
        args.throughput_count
    );
    println!(
        "private memory per finished print sandbox (copy-on-write copies, smaps Anonymous): {:.0} KiB (p50)",
        private.p50
    );
    println!(
        "guest memory the host mapped with 2 MiB pages in a finished print sandbox (smaps FilePmdMapped + AnonHugePages): {:.0} KiB (p50)",
        huge.p50
    );
    println!("VM exits per print exec: {:.0} (p50)", exits.p50);
    for (code, pages) in [(print_code, &print_pages), (second_code, &second_pages)] {
        println!(
            "{}: {} guest pages written, {} page-table leaves touched, in a fork with nothing copied ahead (zeroboot pages -c ... names them)",
            short(code),
            pages.written,
            pages.touched
        );
    }
    println!(
        "{} sandboxes alive, each after {live_code:?}, made by {} clients: {:.0} ms; host memory per live sandbox (MemAvailable drop): {:.0} KiB",
        density::LIVE,
        density::CLIENTS,
        density.wall_ms,
        density.host_kib_per_sandbox
    );
    let kinds: Vec<String> = density
        .breakdown
        .iter()
        .map(|(name, kib)| format!("{name} {kib:.0}"))
        .collect();
    println!(
        "  of which, per live sandbox (growth of /proc/meminfo fields, KiB): {}",
        kinds.join(", ")
    );
    for f in &fresh {
        println!(
            "fresh memory, {} in a new fork: {:.3} s in the guest (the line alone), {} guest page faults; fork call → result {:.3} s",
            f.code, f.seconds, f.guest_page_faults, f.fork_to_result_s
        );
    }
    Ok(())
}
