//! Development probe: first-exec latency of a fork, with and without the
//! host page tables of its private mapping populated beforehand.
//!   cargo run --release --example fault_probe -- TEMPLATE_DIR
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("TEMPLATE_DIR")?);
    let hv = zeroboot_vmm::Hypervisor::open()?;
    let snap = zeroboot_vmm::Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(&hv))?;
    for populate in [false, true, false, true, false, true] {
        let mut m = zeroboot_vmm::Machine::restore(&hv, &snap, Box::new(std::io::stderr()))?;
        let t = Instant::now();
        if populate {
            // SAFETY: the range is the machine's own guest memory mapping.
            let rc = unsafe { libc::madvise(m.ram().host_address() as *mut libc::c_void, m.ram().size() as usize, 22) };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        }
        let pop = t.elapsed();
        let t = Instant::now();
        let r = m.exec(
            zeroboot_protocol::Request::new(b"print(1+1)", b""),
            Duration::from_secs(60),
        )?;
        let first = t.elapsed();
        let t = Instant::now();
        m.exec(
            zeroboot_protocol::Request::new(b"print(1+1)", b""),
            Duration::from_secs(60),
        )?;
        println!(
            "populate={populate} ({pop:?}): first exec {first:?}, second {:?}, out {:?}",
            t.elapsed(),
            String::from_utf8_lossy(&r.stdout)
        );
    }
    Ok(())
}
