//! `zeroboot`: build templates and run code in fresh VM sandboxes.

mod bench;
mod client;
mod context_args;
mod files;
mod fork_memory;
mod pages;
mod progress;
mod results;
mod serve;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use zeroboot_template::Cache;
use zeroboot_template::TemplateSpec;
use zeroboot_vmm::fork::Demand;
use zeroboot_vmm::snapshot::MEMORY_FILE;
use zeroboot_vmm::{ForkMemoryPolicy, Hypervisor, Machine};

#[derive(Parser)]
#[command(
    name = "zeroboot",
    version,
    about = "Sub-millisecond KVM sandboxes forked from a warmed-up template"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build, list and inspect templates.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Run code in a fresh sandbox restored from a template (Python by
    /// default; `--template node` or `--template bash` for the others).
    Run(RunArgs),
    /// Measure fork and exec latency, throughput and memory per sandbox.
    Bench(bench::BenchArgs),
    /// What one exec in a fresh fork writes and touches, by guest mapping.
    Pages(pages::PagesArgs),
    /// Serve the HTTP API.
    Serve(serve::ServeArgs),
    /// Run code through a zeroboot server (streams output).
    Exec(client::ExecArgs),
    /// Long-lived sandboxes on a zeroboot server.
    #[command(subcommand)]
    Sandbox(client::SandboxCommand),
    /// Files in a long-lived sandbox: put, get, ls, stat, mkdir, rm, mv.
    #[command(subcommand)]
    Files(files::FilesCommand),
    /// One sandbox's worker process, driven over stdin and stdout by
    /// `serve` and `bench` (see zeroboot_sandbox::worker); with `--zygote`,
    /// the process they clone workers from (zeroboot_sandbox::zygote).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        zygote: bool,
        template_dir: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Build a template (kernel, root image, boot, snapshot), reusing cached
    /// artifacts: a built-in one by name (python, node, bash) or one from a
    /// spec file (see templates/*.toml).
    Build {
        /// Built-in template to build, or the name to give a spec's template.
        #[arg(long)]
        name: Option<String>,
        /// Template spec (TOML).
        #[arg(short = 'f', long = "file", value_name = "SPEC")]
        file: Option<PathBuf>,
        /// Guest RAM in MiB (overrides the spec's memory_mib).
        #[arg(long)]
        mem_mib: Option<u64>,
        /// Rebuild even if the template is up to date.
        #[arg(long)]
        force: bool,
    },
    /// Write a template as one archive (its files' data, checksummed), to
    /// ship it to hosts that then need not build it.
    Export {
        name: String,
        /// The archive to write, or - for standard output.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: PathBuf,
    },
    /// Install a template from an archive `export` wrote, replacing one of
    /// the same name; refused, leaving nothing, if the archive is damaged or
    /// this host cannot run it.
    Import {
        /// The archive: a file, an http:// or https:// URL, or - for
        /// standard input.
        file: PathBuf,
        /// Install it under this name instead of the one it carries.
        #[arg(long)]
        name: Option<String>,
    },
    /// List templates.
    Ls,
    /// Print a summary of a template's saved machine state.
    Inspect { name: String },
}

#[derive(Args)]
struct RunArgs {
    #[arg(long, default_value = zeroboot_template::DEFAULT_NAME)]
    template: String,
    /// Seconds the guest may run.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Code to run.
    #[arg(short = 'c', conflicts_with = "file")]
    code: Option<String>,
    /// File with code to run, or - for standard input.
    file: Option<PathBuf>,
    /// Print timings to stderr.
    #[arg(long)]
    timings: bool,
    /// File whose contents the code reads as standard input.
    #[arg(long, value_name = "FILE")]
    stdin: Option<PathBuf>,
    /// Copy the guest kernel's console output to stderr.
    #[arg(long)]
    console: bool,
    /// Most bytes of stdout, and of stderr, to keep; the rest is dropped
    /// with a note on stderr.
    #[arg(long, value_name = "BYTES", default_value_t = zeroboot_protocol::DEFAULT_OUTPUT_LIMIT)]
    max_output: u32,
    #[command(flatten)]
    context: context_args::ContextArgs,
    /// Write rich results (images, HTML) into DIR, and print one line per
    /// result after the output.
    #[arg(long, value_name = "DIR")]
    results: Option<PathBuf>,
}

fn main() -> ExitCode {
    // ZEROBOOT_LOG sets the filter (e.g. `info`); ZEROBOOT_LOG_FORMAT=json
    // writes one JSON object a line.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("ZEROBOOT_LOG"))
        .with_writer(std::io::stderr);
    if std::env::var("ZEROBOOT_LOG_FORMAT").as_deref() == Ok("json") {
        logs.json().init();
    } else {
        logs.init();
    }
    let cli = Cli::parse();
    // Commands that only print (and run no child process they talk to over
    // a pipe) end quietly when their reader goes away, as `ls | head` does,
    // instead of panicking in println!. The rest keep Rust's default of
    // ignoring SIGPIPE: a worker that died must be an error, not the end of
    // the server or the bench that wrote to it.
    if matches!(cli.command, Command::Template(_) | Command::Run(_) | Command::Pages(_)) {
        // SAFETY: restores the default action of one signal, before any
        // thread exists; no handler is installed.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Template(cmd) => template_command(cmd).map(|()| ExitCode::SUCCESS),
        Command::Run(args) => run(args),
        Command::Bench(args) => bench_command(&args).map(|()| ExitCode::SUCCESS),
        Command::Pages(args) => pages::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => serve::run(&args, open_or_build).map(|()| ExitCode::SUCCESS),
        Command::Exec(args) => read_code(args.code(), args.file()).and_then(|code| client::exec(&args, code)),
        Command::Sandbox(cmd) => client::sandbox(&cmd).map(|()| ExitCode::SUCCESS),
        Command::Files(cmd) => files::run(&cmd).map(|()| ExitCode::SUCCESS),
        Command::Worker { zygote, template_dir } => {
            let served: Result<()> = if zygote {
                zeroboot_sandbox::zygote::serve(&template_dir).map_err(Into::into)
            } else {
                zeroboot_sandbox::worker::serve(&template_dir).map_err(Into::into)
            };
            served.map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("zeroboot: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn template_command(cmd: TemplateCommand) -> Result<()> {
    let cache = Cache::from_env()?;
    match cmd {
        TemplateCommand::Build {
            name,
            file,
            mem_mib,
            force,
        } => {
            let mut spec = match &file {
                Some(path) => {
                    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                    let mut spec = TemplateSpec::from_toml(&text).with_context(|| format!("{}", path.display()))?;
                    if let Some(name) = name {
                        spec.name = name;
                    }
                    spec
                }
                None => known_spec(&cache, name.as_deref().unwrap_or(zeroboot_template::DEFAULT_NAME))?,
            };
            if let Some(mem_mib) = mem_mib {
                spec.mem_mib = mem_mib;
            }
            // zeroboot_template::build checks the spec again, with these overrides.
            build(&cache, &spec, force)?;
        }
        TemplateCommand::Ls => {
            let all = zeroboot_template::list(&cache)?;
            if all.is_empty() {
                println!("no templates in {}", cache.templates_dir().display());
            }
            println!(
                "{:<16} {:<7} {:>8} {:>9} {:>10} {:>9} {:<20}",
                "NAME", "RUNTIME", "MEM", "HOME", "ON DISK", "BUILD", "CREATED"
            );
            for t in all {
                match t.info {
                    Some(info) => println!(
                        "{:<16} {:<7} {:>5}MiB {:>9} {:>7}MiB {:>8.1}s {:<20}",
                        t.name,
                        info.runtime().name(),
                        info.mem_mib,
                        // The sandbox's disk at /home/user, from the spec it was built from.
                        match info.spec.as_ref().map(|s| s.disk_mib) {
                            Some(0) => "tmpfs".to_string(),
                            Some(mib) => format!("{mib}MiB"),
                            None => "-".to_string(),
                        },
                        t.disk_bytes >> 20,
                        info.phases.artifacts_s + info.phases.boot_s + info.phases.snapshot_s,
                        utc_time(info.created_unix)
                    ),
                    None => println!("{:<16} (incomplete or unreadable)", t.name),
                }
            }
        }
        TemplateCommand::Inspect { name } => inspect(&cache, &name)?,
        TemplateCommand::Export { name, output } => export(&cache, &name, &output)?,
        TemplateCommand::Import { file, name } => import(&cache, &file, name.as_deref())?,
    }
    Ok(())
}

fn build(cache: &Cache, spec: &TemplateSpec, force: bool) -> Result<PathBuf> {
    eprintln!("building template {:?} in {}", spec.name, cache.root().display());
    let started = Instant::now();
    let (dir, info, cached) = zeroboot_template::build(cache, spec, Arc::new(progress::Spinners::new()), force)?;
    if cached {
        eprintln!(
            "template {:?} is up to date ({:.2}s)",
            spec.name,
            started.elapsed().as_secs_f64()
        );
    } else {
        eprintln!(
            "template {:?} built: artifacts {:.1}s, boot to ready {:.1}s, snapshot {:.1}s; {} MiB of guest memory saved",
            spec.name,
            info.phases.artifacts_s,
            info.phases.boot_s,
            info.phases.snapshot_s,
            info.memory_bytes >> 20
        );
    }
    println!("{}", dir.display());
    Ok(dir)
}

fn export(cache: &Cache, name: &str, output: &std::path::Path) -> Result<()> {
    let started = Instant::now();
    let exported = if output.as_os_str() == "-" {
        zeroboot_template::archive::export(cache, name, std::io::BufWriter::new(std::io::stdout().lock()))?
    } else {
        // Written beside the target and renamed: a failed export leaves no
        // file that looks whole.
        let partial = output.with_extension("partial");
        let file = std::fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        let exported = zeroboot_template::archive::export(cache, name, std::io::BufWriter::new(file));
        match exported {
            Ok(e) => {
                std::fs::rename(&partial, output).with_context(|| format!("writing {}", output.display()))?;
                e
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e.into());
            }
        }
    };
    eprintln!(
        "template {name:?} exported: {} MiB in {:.1}s, sha256 {}",
        exported.bytes >> 20,
        started.elapsed().as_secs_f64(),
        exported.sha256
    );
    Ok(())
}

fn import(cache: &Cache, file: &std::path::Path, name: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let hv = Hypervisor::open()?;
    let host = zeroboot_template::archive::Host {
        cpu_vendor: zeroboot_vmm::machine::cpu_vendor(&hv),
        cpuid: zeroboot_vmm::boot::cpuid::host_features(hv.supported_cpuid()),
    };
    let source = file.to_string_lossy();
    let imported = if file.as_os_str() == "-" {
        zeroboot_template::archive::import(cache, &host, std::io::BufReader::new(std::io::stdin().lock()), name)?
    } else if source.starts_with("http://") || source.starts_with("https://") {
        // Streamed from the response: nothing is stored but the template.
        let response = ureq::get(source.as_ref())
            .call()
            .with_context(|| format!("fetching {source}"))?;
        let body = response.into_body().into_with_config().limit(u64::MAX).reader();
        zeroboot_template::archive::import(cache, &host, std::io::BufReader::with_capacity(1 << 20, body), name)?
    } else {
        let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        zeroboot_template::archive::import(cache, &host, std::io::BufReader::with_capacity(1 << 20, input), name)?
    };
    eprintln!(
        "template {:?} imported: {} MiB in {:.1}s, sha256 {}",
        imported.name,
        imported.bytes >> 20,
        started.elapsed().as_secs_f64(),
        imported.sha256
    );
    println!("{}", imported.dir.display());
    Ok(())
}

fn inspect(cache: &Cache, name: &str) -> Result<()> {
    let hv = Hypervisor::open()?;
    let snap = zeroboot_template::open(cache, &hv, name)?;
    let info = zeroboot_template::read_info(&snap.dir)?;
    let s = &snap.state;
    let l = &s.layout;
    let mem = std::fs::metadata(snap.dir.join(MEMORY_FILE))?;
    println!("template      {} ({})", info.name, snap.dir.display());
    println!(
        "built         kernel {}, root image {}, inputs {}",
        info.kernel, info.root_image, info.inputs
    );
    println!(
        "phases        artifacts {:.1}s, boot to ready {:.1}s ({} exits), snapshot {:.1}s",
        info.phases.artifacts_s, info.phases.boot_s, info.exits_to_ready, info.phases.snapshot_s
    );
    println!("cpu vendor    {}", s.cpu_vendor);
    println!(
        "memory        {} MiB RAM, mailbox at {:#x}, root image at {:#x} ({} MiB), doorbell at {:#x}",
        l.ram_bytes >> 20,
        l.mailbox_gpa,
        l.pmem_gpa,
        l.pmem_bytes >> 20,
        l.doorbell_gpa
    );
    println!(
        "memory file   {} MiB logical, {} MiB on disk (sparse)",
        mem.len() >> 20,
        (mem.blocks() * 512) >> 20
    );
    println!(
        "write set     {} KiB in {} runs; {} KiB that every probe wrote, copied ahead by prepared shared-pages VMs",
        snap.write_set.bytes() / 1024,
        snap.write_set.runs().count(),
        snap.write_set.every.iter().map(|r| r.1).sum::<u64>() / 1024
    );
    let r = &s.vcpu.regs;
    let sr = &s.vcpu.sregs;
    println!(
        "vcpu          rip {:#x} rsp {:#x} rflags {:#x}, CPL {}, cs {:#x}",
        r.rip,
        r.rsp,
        r.rflags,
        sr.cs.selector & 3,
        sr.cs.selector
    );
    println!(
        "              cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} apic_base {:#x}",
        sr.cr0, sr.cr3, sr.cr4, sr.efer, sr.apic_base
    );
    println!(
        "              {} MSRs, {} CPUID leaves, xsave {}, xcrs {}, tsc {} kHz, mp_state {}",
        s.vcpu.msrs.len(),
        s.vcpu.cpuid.len(),
        if s.vcpu.xsave.is_some() { "yes" } else { "no (fpu only)" },
        s.vcpu.xcrs.as_ref().map_or(0, |x| x.nr_xcrs),
        s.vcpu.tsc_khz.map_or("?".to_string(), |k| k.to_string()),
        s.vcpu.mp_state.mp_state
    );
    let ch0 = &s.vm.pit.channels[0];
    println!("pit           channel 0 mode {} count {}", ch0.mode, ch0.count);
    println!("kvmclock      {} ns", s.vm.clock.clock);
    println!(
        "serial        lcr {:#x} ier {:#x} mcr {:#x}, {} bytes queued",
        s.serial.line_control,
        s.serial.interrupt_enable,
        s.serial.modem_control,
        s.serial.in_buffer.len()
    );
    Ok(())
}

fn bench_command(args: &bench::BenchArgs) -> Result<()> {
    let cache = Cache::from_env()?;
    let hv = Hypervisor::open()?;
    let snap = zeroboot_template::open(&cache, &hv, &args.template)?;
    let runtime = zeroboot_template::read_info(&snap.dir)?.runtime();
    bench::run(snap, runtime, args.fork_memory.resolve(), args)
}

/// The code from `-c CODE`, a FILE, or `-` (standard input).
pub(crate) fn read_code(code: &Option<String>, file: &Option<PathBuf>) -> Result<String> {
    if let Some(code) = code {
        return Ok(code.clone());
    }
    match file {
        Some(path) if path.as_os_str() == "-" => {
            let mut code = String::new();
            std::io::stdin()
                .read_to_string(&mut code)
                .context("reading code from standard input")?;
            Ok(code)
        }
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display())),
        None => bail!("give code with -c CODE, a FILE, or - for standard input"),
    }
}

/// The spec template `name` was built from (recorded in its template.json),
/// else the built-in spec of that name. A recorded spec that is a built-in
/// one but for its memory (an older zeroboot's built-in, or one built with
/// `--mem-mib`) gives way to today's built-in, so that a rebuild picks up
/// the new defaults.
fn known_spec(cache: &Cache, name: &str) -> Result<TemplateSpec> {
    let builtin = TemplateSpec::builtin(name);
    let recorded = zeroboot_template::template_dir(cache, name)
        .ok()
        .and_then(|dir| zeroboot_template::read_info(&dir).ok())
        .and_then(|info| info.spec)
        .filter(|spec| match &builtin {
            Some(b) => {
                *spec
                    != TemplateSpec {
                        mem_mib: b.mem_mib,
                        heap_mib: b.heap_mib,
                        ..spec.clone()
                    }
            }
            None => true,
        });
    match recorded.or(builtin) {
        Some(spec) => Ok(spec),
        None => bail!(
            "no template named {name:?} and no built-in spec of that name (built-in: {}); \
             build one from a spec with `zeroboot template build -f SPEC.toml`",
            TemplateSpec::builtin_names().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// `YYYY-MM-DD HH:MM` (UTC) of a Unix time.
fn utc_time(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60
    )
}

/// Opens template `name`, building it first if it is missing or an older
/// zeroboot made it (from its recorded spec, or the built-in one).
fn open_or_build(cache: &Cache, hv: &Hypervisor, name: &str) -> Result<zeroboot_vmm::Snapshot> {
    match zeroboot_template::open(cache, hv, name) {
        Ok(s) => Ok(s),
        Err(e) if e.needs_build() => {
            let spec = known_spec(cache, name).with_context(|| e.to_string())?;
            eprintln!("zeroboot: {e}\nzeroboot: building template {name:?} now");
            build(cache, &spec, false)?;
            Ok(zeroboot_template::open(cache, hv, name)?)
        }
        Err(e) => Err(e.into()),
    }
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let code = read_code(&args.code, &args.file)?;
    let stdin = match &args.stdin {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => Vec::new(),
    };
    if !(args.timeout > 0.0 && args.timeout <= 86_400.0) {
        bail!("--timeout must be between 0 and 86400 seconds");
    }
    let cache = Cache::from_env()?;
    let hv = Hypervisor::open()?;
    let snap = open_or_build(&cache, &hv, &args.template)?;
    // One fork, made while its request waits.
    let fork_memory = ForkMemoryPolicy::for_this_host().for_fork(Demand::Behind);
    let started = Instant::now();
    let console: Box<dyn Write + Send> = if args.console {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::sink())
    };
    let mut machine = Machine::restore(&hv, &snap, fork_memory, console)?;
    let restored = started.elapsed();
    let timeout = Duration::from_secs_f64(args.timeout);
    // Output is streamed: it appears as the guest writes each line.
    let mut show = |chunk: zeroboot_protocol::Chunk| {
        let _ = std::io::stdout()
            .write_all(&chunk.stdout)
            .and_then(|()| std::io::stdout().flush());
        let _ = std::io::stderr().write_all(&chunk.stderr);
    };
    let request = zeroboot_protocol::Request {
        output_limit: args.max_output,
        stream: true,
        context: args.context.context()?,
        ..zeroboot_protocol::Request::new(code, stdin)
    };
    let response = match machine.exec_streaming(&request, timeout, &mut show) {
        Ok(r) => r,
        Err(zeroboot_vmm::MachineError::Guest(zeroboot_protocol::GuestFault::Timeout(_))) => {
            eprintln!("zeroboot: timed out after {:.1}s", args.timeout);
            return Ok(ExitCode::from(124));
        }
        Err(e) => return Err(e.into()),
    };
    let total = started.elapsed();
    if let Some(dir) = &args.results {
        results::write(dir, &response.results)?;
    }
    for (name, truncated) in [
        ("stdout", response.stdout_truncated),
        ("stderr", response.stderr_truncated),
        ("results", response.results_truncated),
    ] {
        if truncated {
            eprintln!("zeroboot: {name} truncated at {} bytes (--max-output)", args.max_output);
        }
    }
    if args.timings {
        eprintln!(
            "zeroboot: restore {:.3} ms, restore+exec {:.3} ms, {} exits",
            restored.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            machine.exits()
        );
    }
    Ok(ExitCode::from((response.exit_code & 0xff) as u8))
}
