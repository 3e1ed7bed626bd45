//! Development probe: does this host's KVM map a guest user-mode 2 MiB page
//! with one shadow-paging fault? Boots a bare guest (hugepage_probe.S, built
//! as its header says) that reads one word of each of 8192 pages through
//! 2 MiB guest pages, then 8192 other pages through 4 KiB guest pages. With
//! `thp` the host backs them with transparent huge pages.
//!   cargo run --release --example hugepage_probe -- PROBE_ELF [thp]
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let kernel = std::path::PathBuf::from(std::env::args().nth(1).ok_or("PROBE_ELF")?);
    let thp = std::env::args().nth(2).as_deref() == Some("thp");
    let hv = zeroboot_vmm::Hypervisor::open()?;
    let spec = zeroboot_vmm::BootSpec {
        kernel,
        cmdline: String::new(),
        root_image: None,
        initrd: None,
        system_map: None,
        mem_mib: 256,
        root_args: String::new(),
        disk_image: None,
    };
    let mut m = zeroboot_vmm::Machine::boot(&hv, &spec, Box::new(std::io::stderr()))?;
    let t = Instant::now();
    let ready = m.run_until_doorbell(Duration::from_secs(600))?;
    println!("kernel-mode setup: {ready:?} after {:?}", t.elapsed());
    let base = m.ram().host_address();
    println!("host mapping at {base:#x} (2 MiB aligned: {})", base % (2 << 20) == 0);
    let region = (base + (64 << 20)) as *mut u8;
    if thp {
        // SAFETY: the range lies inside the machine's own guest memory mapping.
        let rc = unsafe { libc::madvise(region.cast(), 64 << 20, libc::MADV_HUGEPAGE) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
    for page in 0..(64 << 20) / 4096 {
        // SAFETY: as above; the guest is stopped.
        unsafe { region.add(page * 4096).write_volatile(1) };
    }
    let smaps = std::fs::read_to_string("/proc/self/smaps_rollup")?;
    for line in smaps.lines().filter(|l| l.contains("AnonHuge")) {
        println!("{line}");
    }
    for pass in ["2 MiB guest pages", "4 KiB guest pages", "both again"] {
        let t = Instant::now();
        let e0 = m.exits();
        let rung = m.run_until_doorbell(Duration::from_secs(600))?;
        println!("{pass}: {rung:?} after {:?}, {} exits", t.elapsed(), m.exits() - e0);
    }
    Ok(())
}
