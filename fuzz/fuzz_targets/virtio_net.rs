//! A hostile guest driving the virtio-net device: register writes it
//! chooses, then descriptor tables, rings and indirect tables it wrote into
//! its memory, which the device walks when the guest sends frames and when
//! the backend delivers some. Nothing it writes may panic the host or make
//! it touch memory outside the guest's.
//!   cargo +nightly fuzz run virtio_net
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zeroboot_net::GuestLink;
use zeroboot_vmm::devices::virtio::net::NetDevice;

/// Guest memory the fuzzer's rings live in: small, so that addresses the
/// input picks land in it often, and past its end otherwise.
const GUEST_BYTES: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_BYTES)]) else {
        return;
    };
    // First byte: how many register writes (6 bytes each: offset, value)
    // come before the guest memory contents.
    let Some((&writes, rest)) = data.split_first() else { return };
    let split = (usize::from(writes % 64) * 6).min(rest.len());
    let (registers, memory) = rest.split_at(split);
    let _ = mem.write_slice(&memory[..memory.len().min(GUEST_BYTES)], GuestAddress(0));
    let Ok(device) = NetDevice::new(mem) else { return };
    // A driver's setup, so that the input's bytes are walked as rings
    // (RX rings at 0, 4 and 8 KiB, TX at 16, 20 and 24 KiB), then the
    // input's own register writes on top.
    let reg = |offset: u64, value: u32| {
        device.write(offset, &value.to_le_bytes());
    };
    reg(0x70, 3);
    reg(0x24, 1);
    reg(0x20, 1); // VERSION_1
    reg(0x24, 0);
    reg(0x20, 1 << 5 | 1 << 3 | 1 << 28);
    reg(0x70, 8);
    for (queue, base) in [(0u32, 0u32), (1, 0x4000)] {
        reg(0x30, queue);
        reg(0x38, 32);
        reg(0x80, base);
        reg(0x90, base + 0x1000);
        reg(0xa0, base + 0x2000);
        reg(0x44, 1);
    }
    reg(0x70, 4);
    for write in registers.chunks_exact(6) {
        let offset = u64::from(u16::from_le_bytes([write[0], write[1]]) & 0x1ff);
        device.write(offset, &write[2..6]);
        let mut value = [0u8; 4];
        device.read(offset, &mut value);
    }
    let mut link = device.link();
    let mut frames = 0usize;
    link.drain_sent(&mut |frame| {
        assert!(frame.len() <= zeroboot_net::link::MAX_FRAME_LEN);
        frames += 1;
    });
    for len in [0usize, 60, 1514, 65_534] {
        let _ = link.deliver(&vec![0xa5; len]);
    }
    let _ = device.state();
});
