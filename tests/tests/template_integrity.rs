//! A damaged template is refused with a clear error, and rebuilt when asked.
//! Works on a copy of the template in a cache of its own (the real cache's
//! kernel and root image linked in), so other tests keep theirs.

// Helpers here are test code too; clippy only exempts #[test] functions.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use zeroboot_e2e::{template_dir, zeroboot_bin};

fn zeroboot(cache: &Path, args: &[&str]) -> Output {
    Command::new(zeroboot_bin())
        .args(args)
        .env("ZEROBOOT_CACHE", cache)
        .output()
        .expect("run zeroboot")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

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

#[test]
fn a_damaged_template_is_refused_then_rebuilt_on_request() {
    let real = template_dir();
    let real_cache = real.parent().and_then(Path::parent).unwrap();
    let cache = std::env::temp_dir().join(format!("zeroboot-integrity-{}", std::process::id()));
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
