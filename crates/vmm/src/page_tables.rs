//! The guest's own x86-64 page tables (4-level), read by the host: which
//! guest-virtual page maps which guest-physical page, and whether the guest
//! has accessed or written it since the accessed and dirty bits were last
//! cleared. Under shadow paging KVM sets those bits in the guest's entries
//! as the guest touches a page, so clearing them in a fork before it runs
//! and reading them after tells, per guest mapping, what the fork touched
//! and wrote (`zeroboot pages`). A snapshot's open reads which root-image
//! memory the guest's process maps, and a fork whose instruction KVM could
//! not fetch reads where it lies. Nothing on the exec path uses this.

use crate::memory::{GuestRam, MemoryError};

const PRESENT: u64 = 1 << 0;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
/// In a PDPTE or PDE: maps a 1 GiB or 2 MiB page instead of a table.
const HUGE: u64 = 1 << 7;
/// Bits 12..51 of an entry: the physical address of a table or 4 KiB page.
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
const ENTRIES: u64 = 512;
/// Bytes one entry maps at each level, PML4 first.
const SPAN: [u64; 4] = [1 << 39, 1 << 30, 1 << 21, 1 << 12];

/// One leaf of the guest's page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// Guest-virtual address (canonical).
    pub gva: u64,
    pub gpa: u64,
    /// 4 KiB, 2 MiB or 1 GiB.
    pub size: u64,
    pub user: bool,
    pub accessed: bool,
    pub dirty: bool,
}

/// Sign-extends bit 47, as the CPU does.
fn canonical(gva: u64) -> u64 {
    if gva & (1 << 47) != 0 {
        gva | 0xffff_0000_0000_0000
    } else {
        gva
    }
}

/// Reads entry `index` of the table at `table`, or None where the table
/// is not in guest memory (a hostile or corrupt guest's tables).
fn entry(ram: &GuestRam, table: u64, index: u64) -> Option<u64> {
    let bytes = ram.slice(table + index * 8, 8).ok()?;
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes);
    Some(u64::from_le_bytes(word))
}

/// Every present leaf reachable from `cr3`, in address order. Tables
/// outside guest memory are skipped, not followed, and so is a table
/// reached a second time (see [`walk`]).
pub fn leaves(ram: &GuestRam, cr3: u64) -> Vec<Leaf> {
    let mut out = Vec::new();
    walk(ram, cr3 & ADDRESS, &mut |leaf, _| out.push(leaf));
    out
}

/// The guest-physical pages of every table reachable from `cr3` (the top
/// level included), ascending.
pub fn tables(ram: &GuestRam, cr3: u64) -> Vec<u64> {
    let mut tables: Vec<u64> = walk(ram, cr3 & ADDRESS, &mut |_, _| {}).into_iter().collect();
    tables.sort_unstable();
    tables
}

/// The guest-physical address `gva` maps to through the tables at `cr3`,
/// or None where it maps nothing (or a table lies outside guest memory).
pub fn translate(ram: &GuestRam, cr3: u64, gva: u64) -> Option<u64> {
    let mut table = cr3 & ADDRESS;
    for (level, span) in SPAN.iter().enumerate() {
        let index = (gva / span) % ENTRIES;
        let value = entry(ram, table, index)?;
        if value & PRESENT == 0 {
            return None;
        }
        let leaf = level == 3 || (matches!(level, 1 | 2) && value & HUGE != 0);
        if leaf {
            return Some((value & ADDRESS & !(span - 1)) + gva % span);
        }
        table = value & ADDRESS;
    }
    None
}

/// Clears the accessed and dirty bits of every present leaf reachable from
/// `cr3`; returns how many entries it changed. Tables keep theirs: Linux
/// takes a table entry without both bits for a corrupt one ("bad pmd") and
/// kills the process that faults through it. For a measurement fork only:
/// the guest kernel reads a leaf's bits too (reclaim, writeback), and a
/// fork that goes on serving requests should keep them.
pub fn clear_accessed_dirty(ram: &mut GuestRam, cr3: u64) -> Result<usize, MemoryError> {
    let mut entries = Vec::new();
    walk(ram, cr3 & ADDRESS, &mut |_, at| entries.push(at));
    let mut changed = 0;
    for at in entries {
        let bytes = ram.slice_mut(at, 8)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(bytes);
        let value = u64::from_le_bytes(word);
        if value & (ACCESSED | DIRTY) != 0 {
            bytes.copy_from_slice(&(value & !(ACCESSED | DIRTY)).to_le_bytes());
            changed += 1;
        }
    }
    Ok(changed)
}

/// Calls `visit` with each present leaf below the top-level table `root`
/// and the guest-physical address of its entry. Each table is read once: a
/// table reached again (shared, or a loop such as a top-level entry that
/// points back at its own table, which a guest can write) is not followed,
/// so the walk reads at most every page of guest memory once. A snapshot's
/// tables are the guest's, and the host walks them when it opens one.
/// Returns the tables it read.
fn walk(ram: &GuestRam, root: u64, visit: &mut dyn FnMut(Leaf, u64)) -> std::collections::HashSet<u64> {
    let mut seen = std::collections::HashSet::from([root]);
    walk_table(ram, root, 0, 0, true, &mut seen, visit);
    seen
}

/// [`walk`] of `table`, at `level` (0 for the top), mapping from `base`;
/// `user` is whether every level above allowed user access.
fn walk_table(
    ram: &GuestRam,
    table: u64,
    level: usize,
    base: u64,
    user: bool,
    seen: &mut std::collections::HashSet<u64>,
    visit: &mut dyn FnMut(Leaf, u64),
) {
    for index in 0..ENTRIES {
        let Some(value) = entry(ram, table, index) else { return };
        if value & PRESENT == 0 {
            continue;
        }
        let gva = base + index * SPAN[level];
        let user = user && value & USER != 0;
        let leaf_size = match level {
            3 => Some(SPAN[3]),
            1 | 2 if value & HUGE != 0 => Some(SPAN[level]),
            _ => None,
        };
        match leaf_size {
            Some(size) => visit(
                Leaf {
                    gva: canonical(gva),
                    gpa: value & ADDRESS & !(size - 1),
                    size,
                    user,
                    accessed: value & ACCESSED != 0,
                    dirty: value & DIRTY != 0,
                },
                table + index * 8,
            ),
            None => {
                let next = value & ADDRESS;
                if seen.insert(next) {
                    walk_table(ram, next, level + 1, gva, user, seen, visit);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(ram: &mut GuestRam, at: u64, value: u64) {
        ram.slice_mut(at, 8).unwrap().copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn walks_4k_2m_and_kernel_half_leaves_and_clears_their_bits() {
        let mut ram = GuestRam::anonymous(16 << 20).unwrap();
        let (pml4, pdpt, pd, pt, kpdpt) = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000);
        let table = PRESENT | USER | 2 | ACCESSED;
        put(&mut ram, pml4, pdpt | table);
        put(&mut ram, pml4 + 511 * 8, kpdpt | PRESENT | 2);
        put(&mut ram, pdpt, pd | table);
        // 0x0: a table of 4 KiB pages; 0x20_0000: a 2 MiB page, written.
        put(&mut ram, pd, pt | table);
        put(&mut ram, pd + 8, 0x40_0000 | PRESENT | USER | HUGE | ACCESSED | DIRTY);
        put(&mut ram, pt + 3 * 8, 0x9000 | PRESENT | USER | ACCESSED);
        put(&mut ram, pt + 4 * 8, 0xa000 | PRESENT | USER);
        // The kernel half: a 1 GiB page at the top of the address space.
        put(&mut ram, kpdpt + 511 * 8, PRESENT | 2 | HUGE | ACCESSED);
        // An entry pointing outside guest memory is not followed.
        put(&mut ram, pd + 16, (1 << 40) | table);
        let got = leaves(&ram, pml4);
        let summary: Vec<_> = got
            .iter()
            .map(|l| (l.gva, l.gpa, l.size, l.user, l.accessed, l.dirty))
            .collect();
        assert_eq!(
            summary,
            [
                (0x3000, 0x9000, 4096, true, true, false),
                (0x4000, 0xa000, 4096, true, false, false),
                (0x20_0000, 0x40_0000, 2 << 20, true, true, true),
                (0xffff_ffff_c000_0000, 0, 1 << 30, false, true, false),
            ]
        );
        assert_eq!(translate(&ram, pml4, 0x3123), Some(0x9123));
        assert_eq!(translate(&ram, pml4, 0x20_1234), Some(0x40_1234));
        assert_eq!(translate(&ram, pml4, 0xffff_ffff_c000_0042), Some(0x42));
        assert_eq!(translate(&ram, pml4, 0x5000), None, "not present");
        assert_eq!(translate(&ram, pml4, 0x40_0000), None, "a table outside guest memory");
        let changed = clear_accessed_dirty(&mut ram, pml4).unwrap();
        assert_eq!(changed, 3, "3 leaves had bits set");
        assert!(leaves(&ram, pml4).iter().all(|l| !l.accessed && !l.dirty));
        assert_eq!(entry(&ram, pml4, 0), Some(pdpt | table), "tables keep their bits");
    }

    #[test]
    fn tables_that_point_back_at_themselves_are_read_once() {
        let mut ram = GuestRam::anonymous(16 << 20).unwrap();
        let pml4 = 0x1000;
        // Every top-level entry points at the top-level table: followed each
        // time, that is 512^4 entries; a guest can write such tables.
        for index in 0..ENTRIES {
            put(&mut ram, pml4 + index * 8, pml4 | PRESENT | USER | 2);
        }
        assert!(leaves(&ram, pml4).is_empty());
        // Two top-level entries sharing one table of 4 KiB pages' tables: the
        // shared table's pages are listed once.
        let (pdpt, pd, pt) = (0x2000, 0x3000, 0x4000);
        let table = PRESENT | USER | 2;
        put(&mut ram, pml4, pdpt | table);
        put(&mut ram, pml4 + 8, pdpt | table);
        for index in 2..ENTRIES {
            put(&mut ram, pml4 + index * 8, 0);
        }
        put(&mut ram, pdpt, pd | table);
        put(&mut ram, pd, pt | table);
        put(&mut ram, pt, 0x9000 | table);
        let got: Vec<(u64, u64)> = leaves(&ram, pml4).iter().map(|l| (l.gva, l.gpa)).collect();
        assert_eq!(got, [(0, 0x9000)]);
    }
}
