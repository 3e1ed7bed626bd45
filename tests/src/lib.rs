//! Shared setup for the real-guest tests: KVM, the (cached) template, and
//! the `zeroboot` binary.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use zeroboot_template::template::{self, TemplateSpec};
use zeroboot_template::{Cache, Progress};
use zeroboot_vmm::{Hypervisor, Snapshot};

/// Opens /dev/kvm or fails the test with the reason. Never skips.
pub fn hypervisor() -> Hypervisor {
    match Hypervisor::open() {
        Ok(hv) => hv,
        Err(e) => panic!("these tests boot real guests and need KVM: {e}"),
    }
}

/// Prints build phases to stderr so a slow first build is visible in CI logs.
struct PhaseLog;

impl Progress for PhaseLog {
    fn start(&self, phase: &str) {
        eprintln!("[template] {phase} ...");
    }
    fn line(&self, _: &str) {}
    fn finish(&self, phase: &str, took: std::time::Duration, cached: bool) {
        eprintln!(
            "[template] {phase} {} in {:.1}s",
            if cached { "cached" } else { "built" },
            took.as_secs_f64()
        );
    }
}

/// The default template, built once per test process (and reused from the
/// cache across runs).
pub fn template_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        hypervisor();
        let cache = Cache::from_env().expect("cache directory");
        match template::build(&cache, &TemplateSpec::default(), Arc::new(PhaseLog), false) {
            Ok((dir, _, _)) => dir,
            Err(e) => panic!("building the template failed: {e}"),
        }
    })
    .clone()
}

pub fn snapshot(hv: &Hypervisor) -> Snapshot {
    let dir = template_dir();
    Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(hv)).expect("open template")
}

/// The default template, opened once per test process, with a small pool of
/// prepared VMs so that the tests exercise the pooled fork path.
pub fn template() -> &'static zeroboot_vmm::Template {
    static OPENED: OnceLock<zeroboot_vmm::Template> = OnceLock::new();
    OPENED.get_or_init(|| {
        let hv = hypervisor();
        let snap = snapshot(&hv);
        zeroboot_vmm::Template::with_pool(hv, snap, 2)
    })
}

/// A new sandbox forked from the default template.
pub fn fork() -> zeroboot_vmm::Machine {
    template()
        .fork(Box::new(std::io::sink()))
        .expect("fork from the template")
}

/// The `zeroboot` binary built next to this test (scripts/test.sh builds it first).
pub fn zeroboot_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/zeroboot
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("zeroboot"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` (scripts/test.sh does) before the tests",
        bin.display()
    );
    bin
}
