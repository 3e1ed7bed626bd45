//! Development probe: first-exec latency of a fork, and how much of its
//! guest memory the host maps with 2 MiB pages afterwards. With K, forks
//! use `ForkMemory::PrivateWrittenRanges` for the K 2 MiB ranges holding
//! most of the template's write set (and nothing else of it); without,
//! `SharedPages`.
//!   cargo run --release --example fault_probe -- TEMPLATE_DIR [CODE [RUNS [K]]]
//! With PROBES set (codes separated by lines of `---`), each fork is a
//! shared-pages VM that ran those probes and was rewound before CODE
//! (`Template::prepare`).
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use zeroboot_vmm::ForkMemory;

const HUGE: u64 = 2 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("TEMPLATE_DIR")?);
    let code = std::env::args().nth(2).unwrap_or_else(|| "print(1+1)".into());
    let runs: usize = std::env::args().nth(3).and_then(|n| n.parse().ok()).unwrap_or(5);
    let ranges: Option<usize> = std::env::args().nth(4).and_then(|n| n.parse().ok());
    let hv = zeroboot_vmm::Hypervisor::open()?;
    let mut snap = zeroboot_vmm::Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(&hv))?;
    let mut fork_memory = ForkMemory::SharedPages;
    if let Some(k) = ranges {
        let mut written: BTreeMap<u64, u64> = BTreeMap::new();
        for &(gpa, len) in snap.write_set.runs() {
            for page in (gpa..gpa + len).step_by(4096) {
                *written.entry(page / HUGE).or_default() += 1;
            }
        }
        let mut ranked: Vec<(u64, u64)> = written.into_iter().collect();
        ranked.sort_by_key(|&(_, pages)| std::cmp::Reverse(pages));
        let chosen: Vec<u64> = ranked.iter().take(k).map(|&(range, _)| range).collect();
        let chosen_only = |runs: &mut Vec<(u64, u64)>| runs.retain(|&(gpa, _)| chosen.contains(&(gpa / HUGE)));
        chosen_only(&mut snap.write_set.every);
        chosen_only(&mut snap.write_set.some);
        fork_memory = ForkMemory::PrivateWrittenRanges;
    }
    if let Ok(probes) = std::env::var("PROBES") {
        let probes: Vec<Vec<u8>> = probes.split("\n---\n").map(|c| c.as_bytes().to_vec()).collect();
        let template = zeroboot_vmm::fork::Template::new(hv, snap, zeroboot_vmm::ForkMemoryPolicy::Fixed(fork_memory));
        for _ in 0..runs {
            let t = Instant::now();
            let prepared = template.prepare(fork_memory, &probes)?;
            let prepare = t.elapsed();
            let probes = prepared.probes().clone();
            let mut m = template.start(prepared, Box::new(std::io::stderr()))?;
            let (r, first) = timed(&mut m, &code)?;
            println!(
                "probes {probes:?}: prepare {prepare:?}, first exec {first:?}, out {:?}; copied {} KiB",
                String::from_utf8_lossy(&r.stdout),
                m.ram().copied_bytes()? / 1024,
            );
        }
        return Ok(());
    }
    for _ in 0..runs {
        let t = Instant::now();
        let mut m = zeroboot_vmm::Machine::restore(&hv, &snap, fork_memory, Box::new(std::io::stderr()))?;
        let prepare = t.elapsed();
        let (r, first) = timed(&mut m, &code)?;
        let (_, second) = timed(&mut m, &code)?;
        println!(
            "{}: restore {prepare:?}, first exec {first:?}, second {second:?}, out {:?}; copied {} KiB, on 2 MiB host pages {} KiB",
            fork_memory.name(),
            String::from_utf8_lossy(&r.stdout),
            m.ram().copied_bytes()? / 1024,
            m.ram().huge_mapped_bytes()? / 1024,
        );
    }
    Ok(())
}

/// Runs `code` in `m`: what it answered and how long that took.
fn timed(
    m: &mut zeroboot_vmm::Machine,
    code: &str,
) -> Result<(zeroboot_protocol::Outcome, Duration), Box<dyn std::error::Error>> {
    let t = Instant::now();
    let r = m.exec(
        &zeroboot_protocol::Request::new(code.as_bytes(), b""),
        Duration::from_secs(60),
    )?;
    Ok((r, t.elapsed()))
}
