//! Development probe: boot a kernel + root image to the agent's READY doorbell,
//! snapshot, restore once and run code. `zeroboot template build` is the real path.
//!   cargo run --release --example boot_probe -- VMLINUX ROOT.erofs OUT_DIR

use std::time::{Duration, Instant};

use zeroboot_vmm::snapshot::{write_state, Snapshot, MEMORY_FILE};
use zeroboot_vmm::{BootSpec, Hypervisor, Machine};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let out = std::path::PathBuf::from(&args[3]);
    std::fs::create_dir_all(&out)?;
    let hv = Hypervisor::open()?;
    let spec = BootSpec {
        kernel: args[1].clone().into(),
        cmdline: format!(
            "console=ttyS0 reboot=k panic=1 nokaslr noxsave clearcpuid=smap,popcnt init=/zeroboot/agent.py {}",
            std::env::var("ZB_EXTRA").unwrap_or_default()
        ),
        root_image: Some(args[2].clone().into()),
        initrd: None,
        system_map: None,
        mem_mib: 512,
        root_args: "rootfstype=erofs rootflags=dax ro rootwait".into(),
    };
    let log = std::fs::File::create(out.join("boot.log"))?;
    let t = Instant::now();
    let mut m = Machine::boot(&hv, &spec, Box::new(log))?;
    let bell = m.run_until_doorbell(Duration::from_secs(1800));
    println!("boot: {:?} after {:?}, {} exits", bell, t.elapsed(), m.exits());
    bell?;
    let state = m.save()?;
    write_state(&out, &state)?;
    let mut f = std::fs::File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .open(out.join(MEMORY_FILE))?;
    let n = m.ram().write_sparse(&mut f)?;
    println!("snapshot: {} bytes of memory", n);
    drop(m);
    let snap = Snapshot::open(&out, &zeroboot_vmm::machine::cpu_vendor(&hv))?;
    let t = Instant::now();
    let mut f = Machine::restore(&hv, &snap, Box::new(std::io::stderr()))?;
    println!("restore {:?}", t.elapsed());
    let code = args
        .get(4)
        .cloned()
        .unwrap_or_else(|| "import numpy; print(int(numpy.arange(4).sum()))".into());
    let r = f.exec(
        zeroboot_protocol::Request {
            code: code.as_bytes(),
            stdin: b"",
        },
        Duration::from_secs(600),
    )?;
    println!(
        "exec {:?}: exit {} out {:?} err {:?}",
        t.elapsed(),
        r.exit_code,
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    Ok(())
}
