//! Development probe: the first request of a fork whose K most-written
//! 2 MiB ranges (by the template's write set) are replaced, before it runs,
//! by private anonymous 2 MiB pages holding a copy: what it saves in time,
//! and costs in memory.
//!   cargo run --release --example huge_private_probe -- TEMPLATE_DIR K [CODE]
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const HUGE: u64 = 2 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("TEMPLATE_DIR")?);
    let k: usize = std::env::args().nth(2).ok_or("K")?.parse()?;
    let code = std::env::args().nth(3).unwrap_or_else(|| "print(1+1)".into());
    let hv = zeroboot_vmm::Hypervisor::open()?;
    let snap = zeroboot_vmm::Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(&hv))?;
    let mut written: BTreeMap<u64, u64> = BTreeMap::new();
    for &(gpa, len) in &snap.write_set {
        for page in (gpa..gpa + len).step_by(4096) {
            *written.entry(page / HUGE * HUGE).or_default() += 1;
        }
    }
    let mut ranked: Vec<(u64, u64)> = written.into_iter().collect();
    ranked.sort_by_key(|&(_, pages)| std::cmp::Reverse(pages));
    let chosen: Vec<u64> = ranked.iter().take(k).map(|&(gpa, _)| gpa).collect();
    let file = snap.memory_file()?;
    for _ in 0..4 {
        let mut m = zeroboot_vmm::Machine::restore(&hv, &snap, Box::new(std::io::stderr()))?;
        let t = Instant::now();
        for &gpa in &chosen {
            let at = (m.ram().host_address() + gpa) as *mut libc::c_void;
            // SAFETY: replaces 2 MiB of this machine's own guest mapping,
            // before its vCPU runs, with a copy of the same contents.
            unsafe {
                let p = libc::mmap(
                    at,
                    HUGE as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                );
                assert_eq!(p, at);
                libc::madvise(p, HUGE as usize, libc::MADV_HUGEPAGE);
                file.read_exact_at(std::slice::from_raw_parts_mut(p.cast(), HUGE as usize), gpa)?;
            }
        }
        let prep = t.elapsed();
        let t = Instant::now();
        let r = m.exec(
            zeroboot_protocol::Request::new(code.as_bytes(), b""),
            Duration::from_secs(60),
        )?;
        let first = t.elapsed();
        let rollup = std::fs::read_to_string("/proc/self/smaps_rollup")?;
        let field = |name: &str| {
            rollup
                .lines()
                .find(|l| l.starts_with(name))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
                .unwrap_or_default()
        };
        println!(
            "K={k}: copy {prep:?}, first exec {first:?}, out {:?}, AnonHugePages {} kB, Anonymous {} kB",
            String::from_utf8_lossy(&r.stdout),
            field("AnonHugePages:"),
            field("Anonymous:")
        );
    }
    Ok(())
}
