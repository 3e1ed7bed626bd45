//! Development probe: does copying a fork's known write set ahead of time
//! (host-side, before the vCPU runs) make its first request faster?
use std::time::{Duration, Instant};
use zeroboot_protocol::Request;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("TEMPLATE_DIR")?);
    let hv = zeroboot_vmm::Hypervisor::open()?;
    let snap = zeroboot_vmm::Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(&hv))?;
    let shared = zeroboot_vmm::ForkMemoryPolicy::Fixed(zeroboot_vmm::ForkMemory::SharedPages);
    let t = zeroboot_vmm::Template::new(hv, snap, shared);
    let mut learn = t.fork(Box::new(std::io::sink()))?;
    learn.exec(&Request::new(b"print(1+1)", b""), Duration::from_secs(60))?;
    let runs = learn.ram().private_runs()?;
    println!(
        "write set: {} runs, {} KiB",
        runs.len(),
        runs.iter().map(|r| r.1).sum::<u64>() / 1024
    );
    for precow in [false, true, false, true, false, true, false, true] {
        let mut m = t.fork(Box::new(std::io::sink()))?;
        let t0 = Instant::now();
        if precow {
            for &(gpa, len) in &runs {
                let base = m.ram().host_address() + gpa;
                for off in (0..len).step_by(4096) {
                    // SAFETY: inside this machine's own guest mapping; rewriting a byte with itself.
                    unsafe {
                        let p = (base + off) as *mut u8;
                        std::ptr::write_volatile(p, std::ptr::read_volatile(p));
                    }
                }
            }
        }
        let prep = t0.elapsed();
        let t1 = Instant::now();
        m.exec(&Request::new(b"print(1+1)", b""), Duration::from_secs(60))?;
        println!("precow={precow} prep {prep:?} first exec {:?}", t1.elapsed());
    }
    Ok(())
}
