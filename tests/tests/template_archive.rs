//! Templates built once and shipped: `zeroboot template export` and
//! `import` against the real python template. An imported template forks
//! and runs code; a truncated, tampered or foreign archive, or one this
//! host cannot run, is refused with the reason and leaves nothing behind;
//! an import over a template of the same name replaces it whole. Imports go
//! to a cache of their own, so other tests keep theirs.

// Helpers here are test code too; clippy only exempts #[test] functions.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use zeroboot_e2e::{output_text as text, template_dir, zeroboot_bin, zeroboot_in as zeroboot};
use zeroboot_template::archive::{self, ArchiveError, Host};
use zeroboot_template::Cache;

/// An empty cache of its own, with the real one's build artifacts linked
/// in (a run checks that its template is up to date with them).
fn private_cache(tag: &str) -> PathBuf {
    let real = template_dir();
    let real_cache = real.parent().and_then(Path::parent).unwrap();
    let cache = std::env::temp_dir().join(format!("zeroboot-archive-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(cache.join("templates")).unwrap();
    for artifact in ["kernel", "root-image", "rootfs-base", "disk"] {
        if real_cache.join(artifact).exists() {
            std::os::unix::fs::symlink(real_cache.join(artifact), cache.join(artifact)).unwrap();
        }
    }
    cache
}

/// What the templates directory holds, staging leftovers included.
fn entries(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache.join("templates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn an_exported_template_imports_and_runs_and_bad_archives_leave_nothing() {
    let real = template_dir();
    let real_cache = real.parent().and_then(Path::parent).unwrap();
    let cache = private_cache("cli");
    let archive = cache.join("python.zbt");
    let out = zeroboot(
        real_cache,
        &["template", "export", "python", "-o", archive.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sha256"),
        "{}",
        text(&out)
    );
    let bytes = std::fs::read(&archive).unwrap();
    // Only data travels: far less than the memory file's length.
    let memory_len = std::fs::metadata(real.join("memory.bin")).unwrap().len();
    assert!((bytes.len() as u64) < memory_len / 2, "{} bytes", bytes.len());

    let out = zeroboot(&cache, &["template", "import", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let run = zeroboot(
        &cache,
        &[
            "run",
            "--template",
            "python",
            "-c",
            "import numpy; print(numpy.arange(7).sum() * 2)",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&run.stdout), "42\n", "{}", text(&run));
    // The memory file is sparse again.
    use std::os::unix::fs::MetadataExt;
    let imported = std::fs::metadata(cache.join("templates/python/memory.bin")).unwrap();
    assert!(imported.blocks() * 512 < imported.len() / 2);

    // Over the same name, from a pipe: replaced whole.
    let mut child = Command::new(zeroboot_bin())
        .args(["template", "import", "-"])
        .env("ZEROBOOT_CACHE", &cache)
        .stdin(std::fs::File::open(&archive).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    let again = std::fs::metadata(cache.join("templates/python/memory.bin")).unwrap();
    assert_ne!(again.ino(), imported.ino(), "the template was replaced");
    assert_eq!(entries(&cache), ["python"]);
    let run = zeroboot(&cache, &["run", "--template", "python", "-c", "print('again')"]);
    assert_eq!(String::from_utf8_lossy(&run.stdout), "again\n", "{}", text(&run));

    // Damaged archives: refused with the reason, nothing left, the
    // installed template untouched.
    let mut tampered = bytes.clone();
    let middle = bytes.len() / 2;
    tampered[middle] ^= 0x01;
    let mut bad_magic = bytes.clone();
    bad_magic[0] = b'X';
    for (name, damaged, reason) in [
        ("truncated", bytes[..middle].to_vec(), "truncated"),
        ("headless", bytes[..10].to_vec(), "truncated"),
        ("tampered", tampered, "checksum"),
        ("magic", bad_magic, "not a zeroboot template archive"),
        (
            "trailing",
            [bytes.as_slice(), b"x"].concat(),
            "continues after its checksum",
        ),
    ] {
        let path = cache.join(format!("{name}.zbt"));
        std::fs::write(&path, &damaged).unwrap();
        let out = zeroboot(&cache, &["template", "import", path.to_str().unwrap(), "--name", name]);
        assert!(!out.status.success(), "{name}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(reason),
            "{name}: {}",
            text(&out)
        );
        assert_eq!(entries(&cache), ["python"], "{name} left something");
        std::fs::remove_file(&path).unwrap();
    }
    let run = zeroboot(&cache, &["run", "--template", "python", "-c", "print('still')"]);
    assert_eq!(String::from_utf8_lossy(&run.stdout), "still\n", "{}", text(&run));

    // From a URL, streamed: a real HTTP server (Python's) serves the file.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut http = Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
        .current_dir(&cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/python.zbt");
    let ready = zeroboot_e2e::eventually(std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(ready, "the test's HTTP server did not start");
    let out = zeroboot(&cache, &["template", "import", &url, "--name", "fromurl"]);
    let _ = http.kill();
    let _ = http.wait();
    assert!(out.status.success(), "{}", text(&out));
    let run = zeroboot(&cache, &["run", "--template", "fromurl", "-c", "print('fetched')"]);
    assert_eq!(String::from_utf8_lossy(&run.stdout), "fetched\n", "{}", text(&run));
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn a_host_that_cannot_run_the_template_refuses_it_and_keeps_nothing() {
    let real = template_dir();
    let real_cache = Cache::at(real.parent().and_then(Path::parent).unwrap());
    let mut bytes = Vec::new();
    archive::export(&real_cache, "python", &mut bytes).unwrap();
    let cache_dir = private_cache("host");
    let cache = Cache::at(&cache_dir);
    let hv = zeroboot_e2e::hypervisor();
    let here = Host {
        cpu_vendor: zeroboot_vmm::machine::cpu_vendor(&hv),
        cpuid: zeroboot_vmm::boot::cpuid::host_features(hv.supported_cpuid()),
    };
    let other_vendor = Host {
        cpu_vendor: if here.cpu_vendor == "AuthenticAMD" {
            "GenuineIntel"
        } else {
            "AuthenticAMD"
        }
        .into(),
        cpuid: here.cpuid.clone(),
    };
    match archive::import(&cache, &other_vendor, bytes.as_slice(), None) {
        Err(ArchiveError::Incompatible { why, .. }) => assert!(why.contains(&other_vendor.cpu_vendor), "{why}"),
        other => panic!("{other:?}"),
    }
    let older_cpu = Host {
        cpu_vendor: here.cpu_vendor.clone(),
        cpuid: Vec::new(),
    };
    match archive::import(&cache, &older_cpu, bytes.as_slice(), None) {
        Err(ArchiveError::Incompatible { why, .. }) => assert!(why.contains("CPUID leaf"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(entries(&cache_dir), Vec::<String>::new());
    let imported = archive::import(&cache, &here, bytes.as_slice(), Some("renamed")).unwrap();
    assert_eq!(imported.name, "renamed");
    let info = zeroboot_template::read_info(&imported.dir).unwrap();
    assert_eq!(info.name, "renamed");
    std::fs::remove_dir_all(&cache_dir).unwrap();
}
