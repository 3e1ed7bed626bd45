//! A hostile guest kernel (tests/guests/hostile-kernel.S), booted by our
//! VMM: it writes pseudo-random data to every I/O port, to random unbacked
//! guest-physical addresses, and over the mailbox, and rings the doorbell,
//! again and again. The VMM must answer each with an error or a result for
//! that VM only: no panic, no hang, and other sandboxes carry on.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use zeroboot_e2e::{fork, hypervisor};
use zeroboot_protocol::{Doorbell, GuestFault, Request};
use zeroboot_vmm::{BootSpec, Machine, MachineError};

/// Assembles and links the hostile kernel with binutils (installed with
/// build-essential by scripts/install-deps.sh).
fn hostile_kernel() -> PathBuf {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guests/hostile-kernel.S");
    let dir = std::env::temp_dir().join(format!("zeroboot-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (object, elf) = (dir.join("k.o"), dir.join("k.elf"));
    let run = |cmd: &mut Command| {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}; install binutils (scripts/install-deps.sh)"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("as").arg("--64").arg(&source).arg("-o").arg(&object));
    run(Command::new("ld")
        .args(["-N", "-Ttext=0x200000", "-e", "_start"])
        .arg(&object)
        .arg("-o")
        .arg(&elf));
    elf
}

#[test]
fn a_hostile_guest_kernel_writing_garbage_everywhere_fails_only_itself() {
    let hv = hypervisor();
    let spec = BootSpec {
        kernel: hostile_kernel(),
        cmdline: String::new(),
        root_image: None,
        initrd: None,
        system_map: None,
        mem_mib: 64,
        root_args: String::new(),
        disk_image: None,
    };
    let mut m = Machine::boot(&hv, &spec, Box::new(std::io::sink())).expect("boot the hostile kernel");
    assert_eq!(
        m.layout().mailbox_gpa,
        0x3e0_0000,
        "the layout hostile-kernel.S assumes"
    );

    // Every port and 20,000 MMIO stores, emulated in guest kernel mode,
    // then its first RESULT with a mailbox of garbage.
    let started = Instant::now();
    let first = m.run_until_doorbell(Duration::from_secs(240));
    eprintln!(
        "ports and MMIO: {:?} after {:?}, {} exits",
        first,
        started.elapsed(),
        m.exits()
    );
    assert!(matches!(first, Ok(Doorbell::Result)), "{first:?}");

    // Each request gets garbage back: an error or a (meaningless) response,
    // never a panic, and quickly.
    let mut refused = 0;
    for _ in 0..20 {
        let started = Instant::now();
        match m.exec(&Request::new(b"print(1)", b""), Duration::from_secs(60)) {
            Ok(_) => {}
            Err(MachineError::Guest(GuestFault::Protocol(_))) => refused += 1,
            Err(e) => panic!("garbage in the mailbox must be a protocol error, got {e}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "answered in {:?}",
            started.elapsed()
        );
    }
    assert!(refused > 0, "random mailboxes were refused");

    // The host and real sandboxes carry on.
    drop(m);
    let mut sandbox = fork();
    let r = sandbox
        .exec(&Request::new(b"print('fine')", b""), Duration::from_secs(60))
        .unwrap();
    assert_eq!(r.stdout, b"fine\n");
}
