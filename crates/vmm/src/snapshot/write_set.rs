//! The template's write set (`write-set.txt`): the guest pages that forks
//! wrote when the template was built, one fork per write-set probe (a
//! print, and for python a numpy exec), in two parts: the pages every
//! probe's fork wrote and the pages only some did.
//!
//! Each line is `0x<gpa> <bytes> <part>`, `<part>` being `every` or
//! `some`. A line without a part is `every`: templates built before the
//! parts were recorded copied every page ahead, and still do.

use crate::layout::PAGE_SIZE;
use crate::memory::HUGE_PAGE_SIZE;

/// `write-set.txt`, in a template's directory.
pub const WRITE_SET_FILE: &str = "write-set.txt";

/// Guest-physical `(gpa, len)` runs, page-aligned and ascending in each part.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteSet {
    /// Pages every probe's fork wrote, which any request is likely to write
    /// too (python's: a print's 28 pages). `SharedPages` forks copy these
    /// ahead, so their first touch maps them writable at once.
    pub every: Vec<(u64, u64)>,
    /// Pages only some probes' forks wrote (python's: what the numpy exec
    /// wrote besides). A fork that needs them copies them on write, which
    /// keeps them out of the memory of a fork that does not.
    pub some: Vec<(u64, u64)>,
}

impl WriteSet {
    /// The parts of the pages each probe's fork wrote.
    pub fn from_probes(probes: &[std::collections::BTreeSet<u64>]) -> Self {
        let mut probes = probes.iter();
        let Some(first) = probes.next() else {
            return Self::default();
        };
        let mut every = first.clone();
        let mut all = first.clone();
        for pages in probes {
            every.retain(|page| pages.contains(page));
            all.extend(pages);
        }
        let some = all.difference(&every).copied();
        Self {
            every: crate::memory::page_runs(every.iter().copied()),
            some: crate::memory::page_runs(some),
        }
    }

    /// Every run of both parts, each part's in order.
    pub fn runs(&self) -> impl Iterator<Item = &(u64, u64)> {
        self.every.iter().chain(&self.some)
    }

    pub fn is_empty(&self) -> bool {
        self.every.is_empty() && self.some.is_empty()
    }

    /// Bytes in both parts.
    pub fn bytes(&self) -> u64 {
        self.runs().map(|run| run.1).sum()
    }

    /// The 2 MiB-aligned guest-physical ranges that hold a page of either
    /// part, ascending, each once.
    pub fn huge_ranges(&self) -> Vec<u64> {
        let huge = HUGE_PAGE_SIZE;
        let mut ranges: Vec<u64> = self
            .runs()
            .flat_map(|&(gpa, len)| (gpa / huge..(gpa + len).div_ceil(huge)).map(move |r| r * huge))
            .collect();
        ranges.sort_unstable();
        ranges.dedup();
        ranges
    }

    /// Parses a write-set file; runs must be page-aligned and inside `size`,
    /// and a part, where given, `every` or `some`.
    pub fn parse(text: &str, size: u64) -> Option<Self> {
        let mut set = Self::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let mut words = line.split_whitespace();
            let gpa = u64::from_str_radix(words.next()?.strip_prefix("0x")?, 16).ok()?;
            let len: u64 = words.next()?.parse().ok()?;
            if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || gpa.checked_add(len)? > size {
                return None;
            }
            let part = match words.next() {
                None | Some("every") => &mut set.every,
                Some("some") => &mut set.some,
                Some(_) => return None,
            };
            if words.next().is_some() {
                return None;
            }
            part.push((gpa, len));
        }
        Some(set)
    }

    /// The file [`WriteSet::parse`] reads.
    pub fn format(&self) -> String {
        let lines = |runs: &[(u64, u64)], part: &str| -> String {
            runs.iter()
                .map(|(gpa, len)| format!("{gpa:#x} {len} {part}\n"))
                .collect()
        };
        lines(&self.every, "every") + &lines(&self.some, "some")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const P: u64 = PAGE_SIZE;

    #[test]
    fn every_part_holds_the_pages_all_probes_wrote() {
        let print: BTreeSet<u64> = [P, 2 * P, 9 * P].into();
        let numpy: BTreeSet<u64> = [P, 2 * P, 3 * P, 4 * P, 7 * P].into();
        let set = WriteSet::from_probes(&[print.clone(), numpy]);
        assert_eq!(set.every, vec![(P, 2 * P)]);
        assert_eq!(set.some, vec![(3 * P, 2 * P), (7 * P, P), (9 * P, P)]);
        assert_eq!(set.bytes(), 6 * P);
        // One probe (bash's): all of it is every request's.
        let alone = WriteSet::from_probes(&[print]);
        assert_eq!(alone.every, vec![(P, 2 * P), (9 * P, P)]);
        assert!(alone.some.is_empty());
        assert!(WriteSet::from_probes(&[]).is_empty());
    }

    #[test]
    fn huge_ranges_cover_each_2_mib_range_of_both_parts_once() {
        let set = WriteSet {
            every: vec![(0x60_0000, 0x1000), (0x1f_f000, 0x2000)],
            some: vec![(0x1000, 0x2000), (0x60_1000, 0x1000)],
        };
        assert_eq!(set.huge_ranges(), vec![0, 0x20_0000, 0x60_0000]);
        assert_eq!(WriteSet::default().huge_ranges(), Vec::<u64>::new());
    }

    #[test]
    fn round_trips_and_rejects_bad_runs() {
        let set = WriteSet {
            every: vec![(0x1000, 0x3000), (0x20_0000, 0x1000)],
            some: vec![(0x5000, 0x1000)],
        };
        assert_eq!(WriteSet::parse(&set.format(), 1 << 30), Some(set));
        assert_eq!(WriteSet::parse("0x1001 4096\n", 1 << 30), None, "unaligned");
        assert_eq!(WriteSet::parse("0x1000 4096\n", 0x1800), None, "past the end");
        assert_eq!(WriteSet::parse("4096 4096\n", 1 << 30), None, "not hex");
        assert_eq!(WriteSet::parse("0x1000 4096 most\n", 1 << 30), None, "no such part");
        assert_eq!(
            WriteSet::parse("0x1000 4096 some x\n", 1 << 30),
            None,
            "a word too many"
        );
        assert_eq!(WriteSet::parse("", 1 << 30), Some(WriteSet::default()));
    }

    #[test]
    fn a_file_without_parts_is_all_every() {
        let old = "0x1000 8192\n0x9000 4096\n";
        let set = WriteSet::parse(old, 1 << 30).unwrap();
        assert_eq!(set.every, vec![(0x1000, 0x2000), (0x9000, 0x1000)]);
        assert!(set.some.is_empty());
    }
}
