//! Development probe: private (copy-on-write) memory of a fork at each step.
//!   cargo run --release --example private_probe -- TEMPLATE_DIR

use std::time::{Duration, Instant};

fn private_kib(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let start = format!("{addr:x}-");
    let mut in_vma = false;
    let mut kib = 0;
    for line in smaps.lines() {
        if !line.ends_with(" kB") && line.contains('-') {
            in_vma = line.starts_with(&start);
        } else if in_vma && line.starts_with("Anonymous:") {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("TEMPLATE_DIR")?);
    let hv = zeroboot_vmm::Hypervisor::open()?;
    let snap = zeroboot_vmm::Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(&hv))?;
    let mut m = zeroboot_vmm::Machine::restore(&hv, &snap, Box::new(std::io::stderr()))?;
    let base = m.ram().host_address();
    println!("after restore: {} KiB", private_kib(base));
    for code in [
        "pass",
        "pass",
        "print(1+1)",
        "print(1+1)",
        "import numpy; print(numpy.random.rand(3))",
    ] {
        let t = Instant::now();
        let r = m.exec(
            zeroboot_protocol::Request {
                code: code.as_bytes(),
                stdin: b"",
            },
            Duration::from_secs(60),
        )?;
        println!(
            "{code:?}: {:?} exit {} -> {} KiB private",
            t.elapsed(),
            r.exit_code,
            private_kib(base)
        );
    }
    Ok(())
}
