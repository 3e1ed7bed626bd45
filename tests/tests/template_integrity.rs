//! A damaged template is refused with a clear error, and rebuilt when asked.
//! Works on a copy of the template in a cache of its own (the real cache's
//! kernel and root image linked in), so other tests keep theirs.

// Helpers here are test code too; clippy only exempts #[test] functions.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use zeroboot_e2e::{output_text as text, template_dir, zeroboot_in as zeroboot};

/// Flips one bit of the first non-zero byte at or after 1 MiB.
fn damage(memory: &Path) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::options().read(true).write(true).open(memory).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 1u64 << 20;
    loop {
        file.read_exact_at(&mut buf, at).unwrap();
        if let Some(i) = buf.iter().position(|&b| b != 0) {
            file.write_all_at(&[buf[i] ^ 0x10], at + i as u64).unwrap();
            return;
        }
        at += buf.len() as u64;
    }
}

/// A copy of the python template in a cache of its own under the temporary
/// directory: (cache, template directory).
fn private_copy(tag: &str) -> (PathBuf, PathBuf) {
    let real = template_dir();
    let real_cache = real.parent().and_then(Path::parent).unwrap();
    let cache = std::env::temp_dir().join(format!("zeroboot-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(cache.join("templates")).unwrap();
    for artifact in ["kernel", "root-image", "rootfs-base"] {
        std::os::unix::fs::symlink(real_cache.join(artifact), cache.join(artifact)).unwrap();
    }
    let copy = cache.join("templates/python");
    let cp = Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(&real)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(cp.success());
    (cache, copy)
}

#[test]
fn an_open_reads_a_spoilt_page_cache_back_into_2_mib_folios() {
    use std::os::unix::fs::FileExt;
    use zeroboot_vmm::page_cache::{read_memory_file, release_page_cache};
    let (cache, copy) = private_copy("folios");
    let file = std::fs::File::open(copy.join("memory.bin")).unwrap();
    // Written pages cannot be dropped until they are on disk.
    std::fs::File::options()
        .write(true)
        .open(copy.join("memory.bin"))
        .unwrap()
        .sync_all()
        .unwrap();
    release_page_cache(&file).unwrap();
    // Most of the file read as forks read it, then a few ranges with pread,
    // as a backup or `cp` of an uncached file would: readahead caches them
    // and their neighbours in small folios.
    let before = read_memory_file(&file).unwrap();
    assert!(
        before.huge_ranges > 0,
        "this host caches the file in 2 MiB folios: {before:?}"
    );
    let spoilt_ranges = [68u64, 112, 118, 128].map(|mib| mib << 20);
    for &offset in &spoilt_ranges {
        zeroboot_vmm::page_cache::release_page_cache_range(&file, offset, 2 << 20).unwrap();
    }
    let mut buf = vec![0u8; 2 << 20];
    for &offset in &spoilt_ranges {
        file.read_exact_at(&mut buf, offset).unwrap();
    }
    let spoilt = read_memory_file(&file).unwrap().small_ranges.unwrap();
    assert!(
        spoilt.len() >= spoilt_ranges.len(),
        "pread left its ranges in small folios: {spoilt:x?}"
    );

    let out = zeroboot(&cache, &["run", "-c", "print(1)"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        read_memory_file(&file).unwrap().small_ranges,
        Some(Vec::new()),
        "opening the template read those ranges back into 2 MiB folios"
    );
    assert_eq!(read_memory_file(&file).unwrap().huge_ranges, before.huge_ranges);
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn a_damaged_template_is_refused_then_rebuilt_on_request() {
    let (cache, copy) = private_copy("integrity");

    // The undamaged copy opens and runs.
    let out = zeroboot(&cache, &["run", "-c", "print(1)"]);
    assert!(out.status.success(), "{}", text(&out));

    damage(&copy.join("memory.bin"));
    for args in [&["run", "-c", "print(1)"][..], &["serve", "--listen", "127.0.0.1:0"]] {
        let out = zeroboot(&cache, args);
        assert!(
            !out.status.success(),
            "{args:?} must refuse a damaged template: {}",
            text(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("memory.bin is damaged") && stderr.contains("zeroboot template build --name python"),
            "{args:?}: {}",
            text(&out)
        );
    }

    // Asked to build, zeroboot sees the damage and rebuilds (a guest boot).
    let out = zeroboot(&cache, &["template", "build"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = zeroboot(&cache, &["run", "-c", "print(6*7)"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n", "{}", text(&out));
    std::fs::remove_dir_all(&cache).unwrap();
}
