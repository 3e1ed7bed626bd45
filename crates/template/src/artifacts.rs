//! The guest artifacts: kernel, Debian base, and root image. Each is built by
//! a script from `guest/` into a cache directory named by the hash of its
//! inputs, and reused from there.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use zeroboot_protocol::guest_layout;

use crate::cache::{io_err, Cache, CacheError, InputHash};
use crate::progress::Progress;
use crate::runtime::RuntimeDescriptor;
use crate::sources;
use crate::spec::TemplateSpec;

/// Written last into an artifact directory: its presence means "complete".
const DONE: &str = "done";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot run {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("{what} failed ({status}); last lines of {log}:\n{tail}")]
    Failed {
        what: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
}

pub struct Kernel {
    pub hash: String,
    pub vmlinux: PathBuf,
    pub system_map: PathBuf,
}

pub struct RootImage {
    pub hash: String,
    pub path: PathBuf,
}

/// Version of Debian's linux-source-6.1, which is part of the kernel's inputs.
fn linux_source_version() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "linux-source-6.1"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|| "unknown".into())
}

pub fn kernel_hash() -> String {
    let mut h = InputHash::new("kernel");
    h.add_files(sources::KERNEL)
        .add(b"linux-source-6.1", linux_source_version().as_bytes());
    h.finish()
}

/// The lines build-base.sh reads from its output directory.
fn base_inputs(spec: &TemplateSpec) -> (String, String) {
    let lines = |items: &[String]| items.iter().map(|i| format!("{i}\n")).collect::<String>();
    (lines(&spec.all_packages()), lines(&spec.wheels))
}

pub fn rootfs_base_hash(spec: &TemplateSpec) -> String {
    let (packages, wheels) = base_inputs(spec);
    let mut h = InputHash::new("rootfs-base");
    h.add_files(sources::ROOTFS_BASE)
        .add(b"packages", packages.as_bytes())
        .add(b"wheels", wheels.as_bytes());
    h.finish()
}

/// Files the root-image step writes under /zeroboot besides the agent.
fn image_config(spec: &TemplateSpec) -> Vec<(&'static str, String)> {
    vec![
        ("config.json", spec.agent_config().to_string()),
        ("env.sh", spec.env_script()),
    ]
}

pub fn root_image_hash(spec: &TemplateSpec, base_hash: &str) -> String {
    let mut h = InputHash::new("root-image");
    h.add(b"base", base_hash.as_bytes())
        .add(b"runtime", spec.runtime.name().as_bytes())
        .add_files(spec.runtime.descriptor().agent_sources)
        .add(b"mkfs", MKFS_ARGS.join(" ").as_bytes())
        .add(b"cc", CC_ARGS.join(" ").as_bytes());
    for (file, line) in USER_ACCOUNT {
        h.add(file.as_bytes(), line.as_bytes());
    }
    for (file, contents) in network_files() {
        h.add(file.as_bytes(), contents.as_bytes());
    }
    // Not in the agent sources, yet the agents are built from them.
    for (name, render) in guest_layout::FILES {
        h.add(name.as_bytes(), render().as_bytes());
    }
    for (name, contents) in image_config(spec) {
        h.add(name.as_bytes(), contents.as_bytes());
    }
    h.finish()
}

/// The account code runs as by default (ZB_USER_UID in
/// guest/agent/native/guest.h): lines added to the base's account files.
/// Its home, /home/user, is a tmpfs the agents mount over the image's
/// empty directory.
const USER_ACCOUNT: [(&str, &str); 3] = [
    (
        "etc/passwd",
        "user:x:1000:1000:zeroboot sandbox user:/home/user:/bin/bash\n",
    ),
    ("etc/group", "user:x:1000:\n"),
    ("etc/shadow", "user:!:20000:0:99999:7:::\n"),
];

/// The guest's resolver and host names: names go to the gateway of the
/// sandbox's private link, where the network backend answers them as the
/// sandbox's policy allows (zeroboot_net). The address is set by the
/// kernel itself (vmm::network::kernel_args).
fn network_files() -> [(&'static str, String); 2] {
    [
        (
            "etc/resolv.conf",
            format!(
                "nameserver {}\noptions timeout:2 attempts:2\n",
                zeroboot_net::link::GATEWAY_IP
            ),
        ),
        (
            "etc/hosts",
            format!("127.0.0.1\tlocalhost\n{}\tzeroboot\n", zeroboot_net::link::GUEST_IP),
        ),
    ]
}

/// Writes [`network_files`] into the image staged at `stage`.
fn add_network_files(stage: &Path) -> Result<(), CacheError> {
    for (file, contents) in network_files() {
        let path = stage.join(file);
        // A symlink (Debian's resolv.conf may be one) is replaced, not followed.
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, contents).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Adds [`USER_ACCOUNT`] to the image staged at `stage`, and its home.
fn add_user_account(stage: &Path) -> Result<(), CacheError> {
    use std::io::Write;
    for (file, line) in USER_ACCOUNT {
        let path = stage.join(file);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        if text.lines().any(|l| l.starts_with("user:")) {
            continue;
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.write_all(line.as_bytes()).map_err(io_err(&path))?;
    }
    let home = stage.join("home/user");
    std::fs::create_dir_all(&home).map_err(io_err(&home))
}

/// How the native halves of the agents are compiled: a
/// shared object. C11 keeps newer compilers from binding C23 symbol
/// versions (`__isoc23_strtoull`) that the guest's glibc lacks.
const CC_ARGS: &[&str] = &["-std=gnu11", "-O2", "-Wall", "-shared", "-fPIC"];

/// Uncompressed, no tail packing (DAX maps every file block directly),
/// root-owned, fixed timestamps so the image is reproducible.
const MKFS_ARGS: &[&str] = &["--quiet", "-E", "noinline_data", "--all-root", "-T0"];

/// Runs `program args`, streaming its combined output to `log` and `progress`.
fn run_logged(
    what: &str,
    program: &Path,
    args: &[&Path],
    log: &Path,
    progress: &dyn Progress,
) -> Result<(), ArtifactError> {
    let mut log_file = std::fs::File::create(log).map_err(io_err(log))?;
    let mut child = Command::new("bash")
        .arg("-c")
        .arg("exec \"$0\" \"$@\" 2>&1")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| ArtifactError::Spawn {
            what: what.into(),
            source,
        })?;
    let mut tail: std::collections::VecDeque<String> = Default::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line).into_owned();
            let _ = writeln!(log_file, "{text}");
            progress.line(&text);
            if tail.len() == 30 {
                tail.pop_front();
            }
            tail.push_back(text);
        }
    }
    let status = child.wait().map_err(|source| ArtifactError::Spawn {
        what: what.into(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(ArtifactError::Failed {
            what: what.into(),
            status: status.to_string(),
            log: log.into(),
            tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
        })
    }
}

/// Builds (or finds) one artifact: `build` runs only when `dir/done` is missing.
fn ensure(
    cache: &Cache,
    kind: &str,
    hash: &str,
    progress: &dyn Progress,
    build: impl FnOnce(&Path) -> Result<(), ArtifactError>,
) -> Result<PathBuf, ArtifactError> {
    let started = Instant::now();
    progress.start(kind);
    let dir = cache.artifact_dir(kind, hash)?;
    if dir.join(DONE).exists() {
        progress.finish(kind, started.elapsed(), true);
        return Ok(dir);
    }
    let _lock = cache.lock(&format!("{kind}-{hash}"))?;
    // Another process may have finished it while we waited for the lock.
    if !dir.join(DONE).exists() {
        build(&dir)?;
        std::fs::write(dir.join(DONE), b"").map_err(io_err(&dir))?;
    }
    progress.finish(kind, started.elapsed(), false);
    Ok(dir)
}

/// Writes `files` under `dir/sources` and runs `script` (one of them) with
/// `dir` as its output directory, logging to `dir/build.log`.
fn run_guest_script(
    files: &[sources::SourceFile],
    script: &str,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<(), ArtifactError> {
    let src = dir.join("sources");
    sources::materialize(files, &src).map_err(io_err(&src))?;
    run_logged(
        &format!("guest/{script}"),
        &src.join(script),
        &[dir],
        &dir.join("build.log"),
        progress,
    )
}

pub fn ensure_kernel(cache: &Cache, progress: &dyn Progress) -> Result<Kernel, ArtifactError> {
    let hash = kernel_hash();
    let dir = ensure(cache, "kernel", &hash, progress, |dir| {
        run_guest_script(sources::KERNEL, "kernel/build.sh", dir, progress)
    })?;
    Ok(Kernel {
        hash,
        vmlinux: dir.join("vmlinux"),
        system_map: dir.join("System.map"),
    })
}

/// How the disk at /home/user is made: ext4 without a journal or metadata
/// checksums (less emulated kernel work per write), owned by the sandbox
/// user, inode tables written now (no lazy initialisation thread in every
/// fork), and a 2 MiB stripe so that ext4 allocates 2 MiB-aligned extents,
/// which DAX maps with one page-table entry each.
const DISK_MKFS_ARGS: &[&str] = &[
    "-q",
    "-F",
    "-t",
    "ext4",
    "-b",
    "4096",
    "-m",
    "0",
    "-L",
    "home",
    "-O",
    "^has_journal,^metadata_csum,^resize_inode",
    "-E",
    "root_owner=1000:1000,lazy_itable_init=0,stride=512,stripe_width=512",
];

pub fn disk_hash(disk_mib: u64) -> String {
    let mut h = InputHash::new("disk");
    h.add(b"disk_mib", &disk_mib.to_le_bytes())
        .add(b"mkfs", DISK_MKFS_ARGS.join(" ").as_bytes());
    h.finish()
}

/// The empty disk image (sparse) for a template with `disk_mib` of disk,
/// made by Debian's mke2fs; None for no disk.
pub fn ensure_disk_image(
    cache: &Cache,
    disk_mib: u64,
    progress: &dyn Progress,
) -> Result<Option<PathBuf>, ArtifactError> {
    if disk_mib == 0 {
        return Ok(None);
    }
    let hash = disk_hash(disk_mib);
    let dir = ensure(cache, "disk", &hash, progress, |dir| {
        let image = dir.join(DISK_IMAGE);
        let size = format!("{disk_mib}M");
        let mut args: Vec<&Path> = DISK_MKFS_ARGS.iter().map(Path::new).collect();
        args.push(&image);
        args.push(Path::new(&size));
        run_logged(
            "mkfs.ext4",
            // Debian keeps it in /usr/sbin, which a user's PATH may lack.
            [Path::new("/usr/sbin/mkfs.ext4"), Path::new("/sbin/mkfs.ext4")]
                .into_iter()
                .find(|p| p.exists())
                .unwrap_or(Path::new("mkfs.ext4")),
            &args,
            &dir.join("build.log"),
            progress,
        )
    })?;
    Ok(Some(dir.join(DISK_IMAGE)))
}

const DISK_IMAGE: &str = "disk.ext4";

pub fn ensure_root_image(
    cache: &Cache,
    spec: &TemplateSpec,
    progress: &dyn Progress,
) -> Result<RootImage, ArtifactError> {
    let base_hash = rootfs_base_hash(spec);
    let base_dir = ensure(cache, "rootfs-base", &base_hash, progress, |dir| {
        let (packages, wheels) = base_inputs(spec);
        for (name, text) in [("packages", packages), ("wheels", wheels)] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(io_err(&path))?;
        }
        run_guest_script(sources::ROOTFS_BASE, "rootfs/build-base.sh", dir, progress)
    })?;
    let hash = root_image_hash(spec, &base_hash);
    let dir = ensure(cache, "root-image", &hash, progress, |dir| {
        let stage = dir.join("stage");
        if stage.exists() {
            std::fs::remove_dir_all(&stage).map_err(io_err(&stage))?;
        }
        std::fs::create_dir_all(&stage).map_err(io_err(&stage))?;
        let log = dir.join("build.log");
        run_logged(
            "tar",
            Path::new("tar"),
            &[Path::new("-C"), &stage, Path::new("-xf"), &base_dir.join("base.tar")],
            &log,
            progress,
        )?;
        add_user_account(&stage)?;
        add_network_files(&stage)?;
        install_agent(spec, dir, &stage.join("zeroboot"), progress)?;
        let image = dir.join("root.erofs");
        let mut args: Vec<&Path> = MKFS_ARGS.iter().map(Path::new).collect();
        args.push(&image);
        args.push(&stage);
        run_logged(
            "mkfs.erofs",
            Path::new("mkfs.erofs"),
            &args,
            &dir.join("mkfs.log"),
            progress,
        )?;
        Ok(std::fs::remove_dir_all(&stage).map_err(io_err(&stage))?)
    })?;
    Ok(RootImage {
        hash,
        path: dir.join("root.erofs"),
    })
}

/// Writes the mailbox layout generated from zeroboot-protocol where the
/// runtime's agent loads it: the C header beside guest.h in `native_dir`,
/// for the native half, and the script's module into `zeroboot_dir`.
fn write_layout(runtime: &RuntimeDescriptor, native_dir: &Path, zeroboot_dir: &Path) -> Result<(), CacheError> {
    let mut files = vec![(native_dir.join(guest_layout::C_HEADER), guest_layout::c_header())];
    let module = guest_layout::FILES
        .iter()
        .find(|(name, _)| Some(*name) == runtime.mailbox_module);
    if let Some((name, render)) = module {
        files.push((zeroboot_dir.join(name), render()));
    }
    for (path, contents) in files {
        std::fs::write(&path, contents).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Writes the runtime's agent into `zeroboot_dir` (the image's /zeroboot):
/// its scripts and their layout module, its native half compiled from C,
/// and the spec's config.
fn install_agent(
    spec: &TemplateSpec,
    dir: &Path,
    zeroboot_dir: &Path,
    progress: &dyn Progress,
) -> Result<(), ArtifactError> {
    let runtime = spec.runtime.descriptor();
    let src = dir.join("agent-sources");
    sources::materialize(runtime.agent_sources, &src).map_err(io_err(&src))?;
    std::fs::create_dir_all(zeroboot_dir).map_err(io_err(zeroboot_dir))?;
    let agent = src.join("agent");
    for name in runtime.agent_scripts {
        let to = zeroboot_dir.join(name);
        std::fs::copy(agent.join(name), &to).map_err(io_err(&to))?;
    }
    write_layout(runtime, &agent.join("native"), zeroboot_dir)?;
    let source = agent.join("native").join(runtime.native.source);
    let object = zeroboot_dir.join(runtime.native.object);
    let mut args: Vec<&Path> = CC_ARGS.iter().map(Path::new).collect();
    args.extend([Path::new("-o"), &object, &source]);
    run_logged("cc", Path::new("cc"), &args, &dir.join("cc.log"), progress)?;
    for (name, contents) in image_config(spec) {
        let path = zeroboot_dir.join(name);
        std::fs::write(&path, contents).map_err(io_err(&path))?;
    }
    Ok(std::fs::remove_dir_all(&src).map_err(io_err(&src))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Runtime;

    /// Checks, with the real tools, that each agent finds every layout
    /// constant it uses in the files `write_layout` writes.
    #[test]
    fn agents_build_against_the_generated_layout() {
        for runtime in [Runtime::Python, Runtime::Node, Runtime::Shell] {
            let dir = std::env::temp_dir().join(format!("zeroboot-agent-{}-{}", runtime.name(), std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let src = dir.join("sources");
            let zeroboot = dir.join("zeroboot");
            sources::materialize(runtime.descriptor().agent_sources, &src).unwrap();
            std::fs::create_dir_all(&zeroboot).unwrap();
            let native = src.join("agent/native");
            write_layout(runtime.descriptor(), &native, &zeroboot).unwrap();
            for entry in std::fs::read_dir(&native).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|x| x == "c") {
                    let mut cc = Command::new("cc");
                    cc.args(CC_ARGS).arg("-fsyntax-only").arg(&path);
                    run(&format!("cc {}", path.display()), cc);
                }
            }
            match runtime {
                Runtime::Python => {
                    let agent = zeroboot.join("agent.py");
                    std::fs::copy(src.join("agent/agent.py"), &agent).unwrap();
                    let mut python = Command::new("python3");
                    python.args(["-I", "-B", "-c", PYTHON_GLOBALS_RESOLVE]).arg(&agent);
                    run("python3 (agent.py's globals)", python);
                }
                Runtime::Node => {
                    let agent = zeroboot.join("agent.js");
                    std::fs::copy(src.join("agent/agent.js"), &agent).unwrap();
                    let mut node = Command::new("node");
                    node.arg("--check").arg(&agent);
                    run("node --check agent.js", node);
                    javascript_names_resolve(&std::fs::read_to_string(&agent).unwrap());
                }
                Runtime::Shell => {}
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    fn run(what: &str, mut command: Command) {
        let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs the agent's module level (the layout import among it, under the
    /// agent's own `-I`) and fails if a global it reads anywhere is undefined.
    const PYTHON_GLOBALS_RESOLVE: &str = r#"
import builtins, dis, runpy, sys
path = sys.argv[1]
defined = runpy.run_path(path)
def loads(code):
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            yield ins.argval
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            yield from loads(const)
with open(path) as f:
    code = compile(f.read(), path, "exec")
# Module-level code that did not run here (the `__main__` block) defines some.
defined = set(defined) | {i.argval for i in dis.get_instructions(code) if i.opname == "STORE_NAME"}
missing = sorted({n for n in loads(code) if n not in defined and not hasattr(builtins, n)})
if missing:
    sys.exit(f"{path} reads undefined globals: {missing}")
"#;

    /// agent.js takes the layout apart in one destructuring `require`: every
    /// layout name it uses must be in it, and every `H.<field>` in `H`.
    fn javascript_names_resolve(agent: &str) {
        let require = format!(
            "}} = require(path.join(__dirname, '{}'));",
            guest_layout::JAVASCRIPT_MODULE
        );
        let end = agent.find(&require).expect("agent.js requires the layout module");
        let start = agent[..end]
            .rfind("const {")
            .expect("agent.js destructures the layout module");
        let imported: Vec<&str> = agent[start + "const {".len()..end]
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        let body = format!("{}{}", &agent[..start], &agent[end + require.len()..]);
        let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '$';
        let words: Vec<(char, &str)> = body
            .split(|c: char| !is_ident(c) && c != '.')
            .flat_map(|chunk| {
                let mut prev = ' ';
                chunk.split('.').map(move |w| {
                    let item = (prev, w);
                    prev = '.';
                    item
                })
            })
            .collect();
        let mut h_fields = Vec::new();
        for pair in words.windows(2) {
            if pair[0] == (' ', "H") && pair[1].0 == '.' {
                h_fields.push(pair[1].1);
            }
        }
        for field in &h_fields {
            assert!(
                guest_layout::LAYOUT
                    .iter()
                    .any(|c| c.kind == guest_layout::Kind::Header && c.name == *field),
                "agent.js reads H.{field}, which the layout does not have"
            );
        }
        assert!(
            h_fields.is_empty() || imported.contains(&"H"),
            "agent.js uses H without importing it"
        );
        for c in guest_layout::LAYOUT
            .iter()
            .filter(|c| c.kind != guest_layout::Kind::Header)
        {
            let used = words.iter().any(|&(prev, w)| prev == ' ' && w == c.name);
            assert!(
                !used || imported.contains(&c.name),
                "agent.js uses {} without importing it",
                c.name
            );
        }
        for name in &imported {
            assert!(
                *name == "H"
                    || guest_layout::LAYOUT
                        .iter()
                        .any(|c| c.kind != guest_layout::Kind::Header && c.name == *name),
                "agent.js imports {name}, which the layout module does not export"
            );
        }
    }
}
