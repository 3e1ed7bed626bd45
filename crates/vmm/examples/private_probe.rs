//! Development probe: private (copy-on-write) memory of a fork at each step.
//!   cargo run --release --example private_probe -- TEMPLATE_DIR

use std::time::{Duration, Instant};

fn kib(m: &zeroboot_vmm::Machine) -> u64 {
    m.ram().copied_bytes().unwrap_or(0) / 1024
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("TEMPLATE_DIR")?);
    let hv = zeroboot_vmm::Hypervisor::open()?;
    let snap = zeroboot_vmm::Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(&hv))?;
    let mut m = zeroboot_vmm::Machine::restore(
        &hv,
        &snap,
        zeroboot_vmm::ForkMemory::SharedPages,
        Box::new(std::io::stderr()),
    )?;
    println!("after restore: {} KiB", kib(&m));
    for code in [
        "pass",
        "pass",
        "print(1+1)",
        "print(1+1)",
        "import numpy; print(numpy.random.rand(3))",
    ] {
        let t = Instant::now();
        let r = m.exec(
            &zeroboot_protocol::Request::new(code.as_bytes(), b""),
            Duration::from_secs(60),
        )?;
        println!(
            "{code:?}: {:?} exit {} -> {} KiB private",
            t.elapsed(),
            r.exit_code,
            kib(&m)
        );
    }
    Ok(())
}
