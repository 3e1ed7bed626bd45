//! The zero page (`struct boot_params`) and the e820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::ByteValued;

use crate::layout::{MemoryLayout, CMDLINE_START, EBDA_START, HIMEM_START};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
/// Legacy persistent memory ("PRAM"); Linux's nd_e820 driver makes it /dev/pmem0.
pub const E820_PMEM: u32 = 12;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// "Undefined" boot loader id, as boot.rst asks of loaders without one.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// boot_params as guest-memory bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct ZeroPage(pub boot_params);

// SAFETY: boot_params is a repr(C) struct of integers and arrays of integers
// (bindgen output), so every byte pattern is a valid value.
unsafe impl ByteValued for ZeroPage {}

/// One e820 entry: start, length, type.
pub type E820Entry = (u64, u64, u32);

pub fn e820_map(layout: &MemoryLayout) -> Vec<E820Entry> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (HIMEM_START, layout.mailbox_gpa - HIMEM_START, E820_RAM),
        (layout.mailbox_gpa, layout.ram_bytes - layout.mailbox_gpa, E820_RESERVED),
    ];
    if layout.pmem_bytes > 0 {
        map.push((layout.pmem_gpa, layout.pmem_bytes, E820_PMEM));
    }
    if layout.disk_bytes > 0 {
        map.push((layout.disk_gpa, layout.disk_bytes, E820_PMEM));
    }
    map
}

/// Builds the zero page. `initrd` is (guest address, length).
pub fn zero_page(layout: &MemoryLayout, cmdline_len: usize, initrd: Option<(u64, u64)>) -> ZeroPage {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, len)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = len as u32;
    }
    let map = e820_map(layout);
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = map.len() as u8;
    ZeroPage(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_page_fields() {
        let layout = MemoryLayout::new(512, 10 << 20, 0).unwrap();
        let zp = zero_page(&layout, 42, Some((0x1000_0000, 0x2000))).0;
        assert_eq!({ zp.hdr.boot_flag }, 0xaa55);
        assert_eq!({ zp.hdr.header }, 0x5372_6448);
        assert_eq!({ zp.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ zp.hdr.cmdline_size }, 42);
        assert_eq!({ zp.hdr.ramdisk_image }, 0x1000_0000);
        assert_eq!({ zp.hdr.ramdisk_size }, 0x2000);
        assert_eq!(zp.e820_entries, 4);
        let pmem = zp.e820_table[3];
        assert_eq!(
            ({ pmem.addr }, { pmem.size }, { pmem.r#type }),
            (512 << 20, 128 << 20, E820_PMEM)
        );
    }

    #[test]
    fn e820_covers_ram_and_reserves_mailbox() {
        let layout = MemoryLayout::new(256, 0, 0).unwrap();
        let map = e820_map(&layout);
        assert_eq!(map.len(), 3, "no pmem entry without an image");
        let with_disk = e820_map(&MemoryLayout::new(256, 1 << 20, 1 << 30).unwrap());
        assert_eq!(with_disk.len(), 5);
        let (root, disk) = (with_disk[3], with_disk[4]);
        assert!(
            root.0 + root.1 < disk.0,
            "adjacent pmem ranges would merge into one device"
        );
        assert_eq!(disk.2, E820_PMEM);
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, EBDA_START + (layout.mailbox_gpa - HIMEM_START));
        assert_eq!(map[2], (layout.mailbox_gpa, 2 << 20, E820_RESERVED));
        // Entries are sorted and do not overlap.
        for pair in map.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0);
        }
    }
}
