//! Development probe: first-exec latency of a fork, and how much of its
//! guest memory the host maps with 2 MiB pages afterwards.
//!   cargo run --release --example fault_probe -- TEMPLATE_DIR [CODE [RUNS]]
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("TEMPLATE_DIR")?);
    let code = std::env::args().nth(2).unwrap_or_else(|| "print(1+1)".into());
    let hv = zeroboot_vmm::Hypervisor::open()?;
    let snap = zeroboot_vmm::Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(&hv))?;
    let runs: usize = std::env::args().nth(3).and_then(|n| n.parse().ok()).unwrap_or(5);
    for _ in 0..runs {
        let mut m = zeroboot_vmm::Machine::restore(&hv, &snap, Box::new(std::io::stderr()))?;
        let t = Instant::now();
        let r = m.exec(
            zeroboot_protocol::Request::new(code.as_bytes(), b""),
            Duration::from_secs(60),
        )?;
        let first = t.elapsed();
        let t = Instant::now();
        m.exec(
            zeroboot_protocol::Request::new(code.as_bytes(), b""),
            Duration::from_secs(60),
        )?;
        let second = t.elapsed();
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let start = format!("{:x}-", m.ram().host_address());
        let mut fields = Vec::new();
        let mut inside = false;
        for line in smaps.lines() {
            if !line.ends_with(" kB") && line.contains('-') {
                inside = line.starts_with(&start);
            } else if inside
                && ["Rss:", "FilePmdMapped:", "Anonymous:"]
                    .iter()
                    .any(|f| line.starts_with(f))
            {
                fields.push(line.split_whitespace().take(2).collect::<Vec<_>>().join(" "));
            }
        }
        println!(
            "first exec {first:?}, second {second:?}, out {:?}; {}",
            String::from_utf8_lossy(&r.stdout),
            fields.join(", ")
        );
    }
    Ok(())
}
