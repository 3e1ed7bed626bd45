//! The zeroing device: the guest kernel's pmem driver (patch 0007) has the
//! host zero pages of the sandbox's disk through two I/O ports
//! ([`zeroboot_protocol::zeroing`]). The guest is untrusted: a range outside
//! the disk is refused and nothing is written.

use zeroboot_protocol::zeroing::{COUNT_PORT, MAGIC, START_PORT};

use crate::layout::{MemoryLayout, PAGE_SIZE};
use crate::memory::GuestRam;

/// What the guest wrote so far. Not part of a snapshot: the guest kernel
/// writes the count and the start within one call, and a snapshot is taken
/// only while the agent waits at the doorbell.
#[derive(Debug, Default)]
pub struct Zeroing {
    pages: u32,
    refused: bool,
}

impl Zeroing {
    pub fn handles(port: u16) -> bool {
        port == COUNT_PORT || port == START_PORT
    }

    pub fn read(&self, port: u16) -> u32 {
        match port {
            COUNT_PORT => MAGIC,
            _ => u32::from(self.refused),
        }
    }

    /// A write of `data` (1, 2 or 4 bytes) to `port`.
    pub fn write(&mut self, port: u16, data: &[u8], ram: &mut GuestRam, layout: &MemoryLayout) {
        let mut value = [0u8; 4];
        let n = data.len().min(4);
        value[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(value);
        if port == COUNT_PORT {
            self.pages = value;
            return;
        }
        let gpa = u64::from(value) * PAGE_SIZE;
        let len = u64::from(self.pages) * PAGE_SIZE;
        self.refused = !layout.disk_contains(gpa, len) || ram.slice_mut(gpa, len as usize).map(zero_pages).is_err();
    }
}

/// Zeroes `bytes` page by page, writing only pages that are not zero
/// already: reading a page of the template leaves it shared, and a disk's
/// free blocks are mostly holes in the template's memory file.
fn zero_pages(bytes: &mut [u8]) {
    for page in bytes.chunks_mut(PAGE_SIZE as usize) {
        let zero = page
            .chunks_exact(16)
            .all(|word| u128::from_ne_bytes(word.try_into().unwrap_or([1; 16])) == 0);
        if !zero {
            page.fill(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroes_inside_the_disk_and_refuses_anything_else() {
        let layout = MemoryLayout::new(64, 1, 128 << 20).unwrap();
        let mut ram = GuestRam::anonymous(layout.total_bytes()).unwrap();
        let first_pfn = (layout.disk_gpa / PAGE_SIZE) as u32;
        ram.slice_mut(layout.disk_gpa, 3 * PAGE_SIZE as usize)
            .unwrap()
            .fill(0xaa);
        let mut device = Zeroing::default();
        assert_eq!(device.read(COUNT_PORT), MAGIC);

        device.write(COUNT_PORT, &2u32.to_le_bytes(), &mut ram, &layout);
        device.write(START_PORT, &first_pfn.to_le_bytes(), &mut ram, &layout);
        assert_eq!(device.read(START_PORT), 0);
        let bytes = ram.slice(layout.disk_gpa, 3 * PAGE_SIZE as usize).unwrap();
        assert!(bytes[..2 * PAGE_SIZE as usize].iter().all(|&b| b == 0));
        assert!(bytes[2 * PAGE_SIZE as usize..].iter().all(|&b| b == 0xaa));

        // RAM, the root image, past the end, and a count that overflows.
        ram.slice_mut(0x10_0000, 4096).unwrap().fill(0xbb);
        for (pages, pfn) in [
            (1, 0x100),
            (1, (layout.pmem_gpa / PAGE_SIZE) as u32),
            (2, ((layout.disk_gpa + layout.disk_bytes) / PAGE_SIZE) as u32 - 1),
            (u32::MAX, first_pfn),
        ] {
            device.write(COUNT_PORT, &pages.to_le_bytes(), &mut ram, &layout);
            device.write(START_PORT, &pfn.to_le_bytes(), &mut ram, &layout);
            assert_eq!(device.read(START_PORT), 1, "{pages} pages at frame {pfn:#x}");
        }
        assert!(ram.slice(0x10_0000, 4096).unwrap().iter().all(|&b| b == 0xbb));
    }
}
