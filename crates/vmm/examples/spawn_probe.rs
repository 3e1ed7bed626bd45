//! Development probe: where a fork's spawn time goes, step by step.
//!   cargo run --release --example spawn_probe -- TEMPLATE_DIR
use std::time::Instant;
use zeroboot_vmm::devices::serial::{SerialConsole, COM1_IRQ};
use zeroboot_vmm::memory::GuestRam;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).ok_or("TEMPLATE_DIR")?);
    let hv = zeroboot_vmm::Hypervisor::open()?;
    let snap = zeroboot_vmm::Snapshot::open(&dir, &zeroboot_vmm::machine::cpu_vendor(&hv))?;
    let st = &snap.state;
    let names = [
        "mmap",
        "create_vm",
        "set_memory",
        "irqchip",
        "vm state",
        "serial",
        "create_vcpu",
        "vcpu state",
        "tsc",
        "total",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..200 {
        let mut t = Instant::now();
        let t0 = t;
        let mut lap = |i: usize, samples: &mut Vec<Vec<f64>>| {
            samples[i].push(t.elapsed().as_secs_f64() * 1e6);
            t = Instant::now();
        };
        let ram = GuestRam::private_file_mapping(snap.memory_file()?, st.layout.total_bytes())?;
        lap(0, &mut samples);
        let vm = hv.create_vm()?;
        lap(1, &mut samples);
        vm.set_memory(&ram)?;
        lap(2, &mut samples);
        vm.create_irqchip()?;
        lap(3, &mut samples);
        vm.restore_state(&st.vm)?;
        lap(4, &mut samples);
        let serial = SerialConsole::from_state(&st.serial, Box::new(std::io::sink()))?;
        vm.register_irq(serial.irq(), COM1_IRQ)?;
        lap(5, &mut samples);
        let vcpu = vm.create_vcpu(0)?;
        lap(6, &mut samples);
        vcpu.restore_state(&st.vcpu, &st.vcpu.msrs)?;
        lap(7, &mut samples);
        vcpu.tsc()?;
        lap(8, &mut samples);
        samples[9].push(t0.elapsed().as_secs_f64() * 1e6);
    }
    for (name, s) in names.iter().zip(samples.iter_mut()) {
        s.sort_by(f64::total_cmp);
        println!(
            "{name:12} p50 {:8.1} us  p90 {:8.1} us",
            s[s.len() / 2],
            s[s.len() * 9 / 10]
        );
    }
    Ok(())
}
