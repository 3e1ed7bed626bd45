//! Every guest-physical address the VMM uses, in one place.
//!
//! ```text
//! 0x0000_0500  GDT                 0x0000_9000  PML4
//! 0x0000_0520  IDT (empty)         0x0000_a000  PDPT
//! 0x0000_7000  boot_params         0x0000_b000  PD (1 GiB of 2 MiB pages)
//! 0x0000_8ff0  boot stack          0x0002_0000  kernel command line
//! 0x0010_0000  high memory: the kernel loads at its ELF p_paddr (16 MiB)
//! ram - 2 MiB  mailbox (e820 reserved), shared with the guest agent
//! ram          legacy persistent memory (e820 type 12): the root filesystem
//! + 128 MiB    legacy persistent memory: the sandbox's disk (/home/user)
//! 0xd000_0000  doorbell: no memory slot, so a store exits to the VMM
//! ```

use zeroboot_protocol::MAILBOX_SIZE;

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of conventional memory below 1 MiB that e820 reports as RAM ends here
/// (the EBDA and BIOS area follow).
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x10_0000;
/// Guest-physical page with no memory slot: a store here is the doorbell.
pub const DOORBELL_GPA: u64 = 0xd000_0000;
/// Guest RAM plus the root image must end below the doorbell and the
/// 32-bit device hole (IOAPIC, LAPIC).
pub const MAX_GUEST_MEMORY: u64 = 0xc000_0000;
/// Persistent-memory regions are mapped in whole memory sections.
pub const PMEM_ALIGN: u64 = 128 << 20;
pub const PAGE_SIZE: u64 = 4096;

/// Where everything goes for a guest of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryLayout {
    /// Bytes of guest RAM, including the mailbox at its top.
    pub ram_bytes: u64,
    /// Guest-physical start of the mailbox.
    pub mailbox_gpa: u64,
    /// Guest-physical start and length of the persistent-memory root image
    /// (length 0 when the guest boots from an initramfs).
    pub pmem_gpa: u64,
    pub pmem_bytes: u64,
    /// Guest-physical start and length of the disk, a second persistent-
    /// memory region (length 0 for none). One empty section lies between it
    /// and the root image: the kernel merges adjacent e820 ranges of one
    /// type, and the two must stay two devices.
    pub disk_gpa: u64,
    pub disk_bytes: u64,
    pub doorbell_gpa: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("guest RAM of {0} MiB is too small (at least 64 MiB)")]
    TooSmall(u64),
    #[error("guest RAM plus root image and disk ({0} MiB) must stay below {max} MiB", max = MAX_GUEST_MEMORY >> 20)]
    TooLarge(u64),
}

pub const fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

impl MemoryLayout {
    /// A disk needs a root image: without one there is no pmem region
    /// for it to follow.
    pub fn new(ram_mib: u64, pmem_image_bytes: u64, disk_bytes: u64) -> Result<Self, LayoutError> {
        if ram_mib < 64 {
            return Err(LayoutError::TooSmall(ram_mib));
        }
        let ram_bytes = ram_mib << 20;
        let pmem_gpa = align_up(ram_bytes, PMEM_ALIGN);
        let pmem_bytes = align_up(pmem_image_bytes, PMEM_ALIGN);
        let (disk_gpa, disk_bytes) = if disk_bytes == 0 || pmem_bytes == 0 {
            (0, 0)
        } else {
            (pmem_gpa + pmem_bytes + PMEM_ALIGN, align_up(disk_bytes, PMEM_ALIGN))
        };
        let layout = Self {
            ram_bytes,
            mailbox_gpa: ram_bytes - MAILBOX_SIZE as u64,
            pmem_gpa,
            pmem_bytes,
            disk_gpa,
            disk_bytes,
            doorbell_gpa: DOORBELL_GPA,
        };
        if layout.total_bytes() > MAX_GUEST_MEMORY {
            return Err(LayoutError::TooLarge(layout.total_bytes() >> 20));
        }
        Ok(layout)
    }

    /// Size of the one memory slot (and of the snapshot's memory file).
    pub fn total_bytes(&self) -> u64 {
        if self.disk_bytes > 0 {
            self.disk_gpa + self.disk_bytes
        } else if self.pmem_bytes > 0 {
            self.pmem_gpa + self.pmem_bytes
        } else {
            self.ram_bytes
        }
    }

    /// Whether `[gpa, gpa + len)` lies in ordinary guest RAM: above the boot
    /// tables' low megabyte and below the mailbox (so not in the root image
    /// or the disk either). What the agent may register at READY.
    pub fn ram_contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= HIMEM_START && gpa.saturating_add(len) <= self.mailbox_gpa
    }

    /// Whether `[gpa, gpa + len)` lies inside the disk.
    pub fn disk_contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.disk_gpa
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= self.disk_gpa + self.disk_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout() {
        let l = MemoryLayout::new(512, 100 << 20, 0).unwrap();
        assert_eq!(l.ram_bytes, 512 << 20);
        assert_eq!(l.mailbox_gpa, (512 << 20) - (2 << 20));
        assert_eq!(l.pmem_gpa, 512 << 20);
        assert_eq!(l.pmem_bytes, 128 << 20);
        assert_eq!(l.total_bytes(), 640 << 20);
    }

    #[test]
    fn unaligned_ram_puts_pmem_on_a_section() {
        let l = MemoryLayout::new(300, 1, 0).unwrap();
        assert_eq!(l.pmem_gpa, 384 << 20);
        assert_eq!(l.pmem_gpa % PMEM_ALIGN, 0);
    }

    #[test]
    fn limits() {
        assert_eq!(MemoryLayout::new(16, 0, 0), Err(LayoutError::TooSmall(16)));
        assert!(matches!(
            MemoryLayout::new(3072, 1 << 20, 0),
            Err(LayoutError::TooLarge(_))
        ));
        assert!(matches!(
            MemoryLayout::new(1024, 256 << 20, 2 << 30),
            Err(LayoutError::TooLarge(_))
        ));
        assert_eq!(MemoryLayout::new(512, 0, 0).unwrap().total_bytes(), 512 << 20);
        assert_eq!(
            MemoryLayout::new(512, 0, 1 << 30).unwrap().disk_bytes,
            0,
            "no disk without a root image"
        );
    }

    #[test]
    fn disk_follows_the_root_image_after_an_empty_section() {
        let l = MemoryLayout::new(512, 100 << 20, 1 << 30).unwrap();
        assert_eq!(l.disk_gpa, (512 + 128 + 128) << 20);
        assert_eq!(l.total_bytes(), l.disk_gpa + (1 << 30));
        assert!(l.disk_contains(l.disk_gpa, 1 << 30));
        assert!(!l.disk_contains(l.disk_gpa - 4096, 8192));
        assert!(!l.disk_contains(l.disk_gpa + (1 << 30) - 4096, 8192));
        assert!(!l.disk_contains(u64::MAX - 10, 100));
    }

    #[test]
    fn ram_is_above_the_low_megabyte_and_below_the_mailbox() {
        let l = MemoryLayout::new(512, 100 << 20, 1 << 30).unwrap();
        assert!(l.ram_contains(HIMEM_START, l.mailbox_gpa - HIMEM_START));
        assert!(!l.ram_contains(HIMEM_START - 4096, 4096));
        assert!(!l.ram_contains(l.mailbox_gpa - 4096, 8192));
        assert!(!l.ram_contains(l.disk_gpa, 4096));
        assert!(!l.ram_contains(u64::MAX - 10, 100));
    }
}
