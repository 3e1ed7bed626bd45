//! `zeroboot pages`: what one exec in a fresh fork writes and touches,
//! counted by the host from the fork's memory and the guest's page tables,
//! and grouped by the guest mapping it falls in (the interpreter, its heap,
//! libc, numpy, the stack, the kernel...). Under shadow paging every page
//! a fork touches is a VM exit, and every page it writes is a copy; on any
//! hardware the same counts set what a fork costs. `zeroboot bench` reports
//! the totals.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use zeroboot_protocol::Request;
use zeroboot_template::RuntimeDescriptor;
use zeroboot_vmm::page_tables::Leaf;
use zeroboot_vmm::{ForkMemory, Hypervisor, Machine, Snapshot};

const TIMEOUT: Duration = Duration::from_secs(60);
const PAGE: u64 = 4096;
/// Guest-virtual addresses from here up are the kernel's.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

#[derive(Args)]
pub struct PagesArgs {
    #[arg(long, default_value = zeroboot_template::DEFAULT_NAME)]
    pub template: String,
    /// The code to measure (default: the runtime's print probe).
    #[arg(short = 'c', long)]
    pub code: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also list every written page: where it is, and which 8-byte words
    /// of it the fork changed (its first few, as template → fork values).
    #[arg(long)]
    pub list: bool,
}

/// How many changed words of a written page `--list` shows.
const WORDS_SHOWN: usize = 4;

/// One guest mapping's share.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Share {
    /// Page-table leaves the guest accessed (4 KiB or 2 MiB pages).
    pub touched: u64,
    /// Of those, leaves the guest wrote through (their dirty bit).
    pub dirtied: u64,
    /// 4 KiB pages the fork holds copies of afterwards.
    pub written: u64,
}

/// What one exec in a fresh fork wrote and touched.
#[derive(Debug, Default, serde::Serialize)]
pub struct PageUse {
    /// 4 KiB guest pages the fork holds its own copy of after the exec, the
    /// host's writes before it (request, entropy, clock) included: nothing
    /// was copied ahead.
    pub written: u64,
    /// Page-table leaves the guest accessed. Under shadow paging each is
    /// one first-touch fault in a new VM where the host maps it whole; a
    /// 2 MiB leaf in a range the fork also writes, which the host then
    /// maps 4 KiB at a time, is one fault per 4 KiB page touched
    /// (docs/guest-kernel.md, "What bounds the rest of issue #20 here").
    pub touched: u64,
    pub touched_4k: u64,
    pub touched_huge: u64,
    /// By guest mapping: a path, `[heap]`, `[stack]`, `[anon START-END]`, `[kernel]`,
    /// or where a written page is mapped by no user page table,
    /// `[unmapped: kernel data or page tables]`.
    pub by_mapping: BTreeMap<String, Share>,
    /// Every written page, in guest-physical order.
    pub pages: Vec<WrittenPage>,
}

/// One page the fork wrote, compared with the template's copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WrittenPage {
    pub gpa: u64,
    /// The guest-virtual address a user page table maps it at, if any.
    pub gva: Option<u64>,
    pub mapping: String,
    /// 8-byte words that differ from the template's page.
    pub words_changed: usize,
    /// The first few: offset in the page, template's value, fork's value.
    pub changes: Vec<(u64, u64, u64)>,
}

/// The words of `fork` that differ from `template` (pages of equal length).
fn changed_words(template: &[u8], fork: &[u8]) -> (usize, Vec<(u64, u64, u64)>) {
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let changed: Vec<(u64, u64, u64)> = template
        .chunks_exact(8)
        .zip(fork.chunks_exact(8))
        .enumerate()
        .filter(|(_, (t, f))| t != f)
        .map(|(i, (t, f))| (8 * i as u64, word(t), word(f)))
        .collect();
    let count = changed.len();
    (count, changed.into_iter().take(WORDS_SHOWN).collect())
}

/// Measures `code` in two fresh forks of the template in `dir`, neither
/// with any page copied ahead: one counts the pages the host copied on
/// write, the other clears the accessed and dirty bits of the guest's page
/// tables first and reads them after (then asks the agent for its
/// mappings, to name them).
pub fn measure(hv: &Hypervisor, dir: &Path, runtime: &RuntimeDescriptor, code: &str) -> Result<PageUse> {
    let vendor = zeroboot_vmm::machine::cpu_vendor(hv);
    let mut snap = Snapshot::open(dir, &vendor)?;
    // What the exec writes, not what forks usually write.
    snap.write_set = Default::default();
    let run = |m: &mut Machine, code: &str| -> Result<Vec<u8>> {
        let outcome = m.exec(&Request::new(code, ""), TIMEOUT)?;
        if outcome.exit_code != 0 {
            bail!(
                "{code:?} exited with {}: {}",
                outcome.exit_code,
                String::from_utf8_lossy(&outcome.stderr)
            );
        }
        Ok(outcome.stdout)
    };

    let mut copies = Machine::restore(hv, &snap, ForkMemory::SharedPages, Box::new(std::io::sink()))?;
    run(&mut copies, code)?;
    let written: Vec<u64> = copies
        .ram()
        .private_runs()?
        .into_iter()
        .flat_map(|(gpa, len)| (gpa..gpa + len).step_by(PAGE as usize))
        .collect();
    let template = snap.memory_file()?;
    let mut diffs = Vec::with_capacity(written.len());
    let mut before = vec![0u8; PAGE as usize];
    for &gpa in &written {
        // A hole past the file's end reads as zeros, as the guest saw it.
        before.fill(0);
        let mut read = 0;
        while read < before.len() {
            match std::os::unix::fs::FileExt::read_at(&template, &mut before[read..], gpa + read as u64)? {
                0 => break,
                n => read += n,
            }
        }
        diffs.push(changed_words(&before, copies.ram().slice(gpa, PAGE as usize)?));
    }
    drop(copies);

    let mut bits = Machine::restore(hv, &snap, ForkMemory::SharedPages, Box::new(std::io::sink()))?;
    bits.clear_page_table_bits()?;
    run(&mut bits, code)?;
    let leaves = bits.page_table_leaves()?;
    let maps = String::from_utf8_lossy(&run(&mut bits, runtime.self_maps)?).into_owned();
    let mappings = parse_maps(&maps);
    if mappings.is_empty() {
        bail!("the agent printed no /proc/self/maps lines: {maps:?}");
    }
    let mut used = tally(&leaves, &written, &mappings);
    for (page, (words_changed, changes)) in used.pages.iter_mut().zip(diffs) {
        page.words_changed = words_changed;
        page.changes = changes;
    }
    Ok(used)
}

/// A guest mapping from /proc/self/maps: start, end, name.
type Mapping = (u64, u64, String);

/// Mappings without a name are told apart by where they are: the agent
/// moved its hot ranges onto anonymous huge pages, so the interpreter's
/// data, its object arenas and malloc's are all anonymous.
fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let range = words.next()?;
            let (start, end) = range.split_once('-')?;
            let name = match words.nth(4) {
                Some(name) => name.to_string(),
                None => format!("[anon {range}]"),
            };
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
                name,
            ))
        })
        .collect()
}

fn name_of(mappings: &[Mapping], gva: u64) -> String {
    if gva >= KERNEL_HALF {
        return "[kernel]".into();
    }
    mappings
        .iter()
        .find(|(start, end, _)| (*start..*end).contains(&gva))
        .map_or_else(|| "[user, not in maps]".into(), |(_, _, name)| name.clone())
}

fn tally(leaves: &[Leaf], written: &[u64], mappings: &[Mapping]) -> PageUse {
    let mut by_mapping: BTreeMap<String, Share> = BTreeMap::new();
    let mut out = PageUse {
        written: written.len() as u64,
        ..Default::default()
    };
    for leaf in leaves.iter().filter(|l| l.accessed) {
        out.touched += 1;
        if leaf.size == PAGE {
            out.touched_4k += 1;
        } else {
            out.touched_huge += 1;
        }
        let share = by_mapping.entry(name_of(mappings, leaf.gva)).or_default();
        share.touched += 1;
        share.dirtied += u64::from(leaf.dirty);
    }
    // A written page takes the name of the user mapping that maps it; the
    // kernel's direct map covers all of RAM, so it only names pages no
    // process maps.
    let mut user: Vec<&Leaf> = leaves.iter().filter(|l| l.gva < KERNEL_HALF).collect();
    user.sort_by_key(|l| l.gpa);
    for &gpa in written {
        let at = user.partition_point(|l| l.gpa + l.size <= gpa);
        let gva = user
            .get(at)
            .filter(|l| l.gpa <= gpa)
            .map(|leaf| leaf.gva + (gpa - leaf.gpa));
        let name = match gva {
            Some(gva) => name_of(mappings, gva),
            None => "[unmapped: kernel data or page tables]".into(),
        };
        by_mapping.entry(name.clone()).or_default().written += 1;
        out.pages.push(WrittenPage {
            gpa,
            gva,
            mapping: name,
            words_changed: 0,
            changes: Vec::new(),
        });
    }
    out.by_mapping = by_mapping;
    out
}

pub fn run(args: &PagesArgs) -> Result<()> {
    let cache = zeroboot_template::Cache::from_env()?;
    let hv = Hypervisor::open()?;
    let snap = zeroboot_template::open(&cache, &hv, &args.template)?;
    let runtime = zeroboot_template::read_info(&snap.dir)?.runtime().descriptor();
    let code = args.code.as_deref().unwrap_or(runtime.print_probe);
    let dir = snap.dir.clone();
    drop(snap);
    let used = measure(&hv, &dir, runtime, code).with_context(|| format!("measuring {code:?}"))?;
    if args.json {
        println!("{}", serde_json::to_string(&used)?);
        return Ok(());
    }
    println!("{code:?} in a fresh fork of {}, nothing copied ahead:", args.template);
    println!(
        "  4 KiB pages written (the fork's own copies after it): {}",
        used.written
    );
    println!(
        "  page-table leaves the guest touched: {} ({} of 4 KiB, {} of 2 MiB or more)",
        used.touched, used.touched_4k, used.touched_huge
    );
    println!(
        "\n{:<48} {:>8} {:>8} {:>8}",
        "guest mapping", "touched", "dirtied", "written"
    );
    let mut rows: Vec<_> = used.by_mapping.iter().collect();
    rows.sort_by_key(|(_, s)| std::cmp::Reverse((s.written, s.touched)));
    for (name, share) in rows {
        println!(
            "{name:<48} {:>8} {:>8} {:>8}",
            share.touched, share.dirtied, share.written
        );
    }
    if args.list {
        println!(
            "\n{:<18} {:<14} {:>5}  {:<40} first changes (offset: template → fork)",
            "guest virtual", "guest physical", "words", "mapping"
        );
        for page in &used.pages {
            let gva = page.gva.map_or_else(|| "-".to_string(), |a| format!("{a:#x}"));
            let changes: Vec<String> = page
                .changes
                .iter()
                .map(|(offset, was, now)| format!("{offset:#05x}: {was:#x} → {now:#x}"))
                .collect();
            println!(
                "{gva:<18} {:<14} {:>5}  {:<40} {}",
                format!("{:#x}", page.gpa),
                page.words_changed,
                page.mapping,
                changes.join(", ")
            );
        }
    }
    println!(
        "\ntouched and dirtied: page-table leaves (accessed and dirty bits, cleared before the exec);\n\
         written: 4 KiB pages copied on write in a second fork, the host's own writes included"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pages_take_the_name_of_the_user_mapping_over_them() {
        let maps = parse_maps(
            "00400000-00600000 r-xp 00000000 fe:00 12 /usr/bin/python3.13\n\
             7f0000000000-7f0000021000 rw-p 00000000 00:00 0 \n\
             7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n",
        );
        assert_eq!(maps[1].2, "[anon 7f0000000000-7f0000021000]");
        let leaf = |gva, gpa, size, accessed, dirty| Leaf {
            gva,
            gpa,
            size,
            user: gva < KERNEL_HALF,
            accessed,
            dirty,
        };
        let leaves = [
            leaf(0x40_0000, 0x20_0000, 2 << 20, true, false),
            leaf(0x7f00_0000_0000, 0x1000, PAGE, true, true),
            leaf(0x7ffd_0000_0000, 0x5000, PAGE, false, false),
            leaf(0xffff_8880_0000_0000, 0, 1 << 30, true, true),
        ];
        let used = tally(&leaves, &[0x1000, 0x5000, 0x9000, 0x20_1000], &maps);
        assert_eq!(
            (used.written, used.touched, used.touched_4k, used.touched_huge),
            (4, 3, 1, 2)
        );
        let share = |name: &str| used.by_mapping.get(name).cloned().unwrap_or_default();
        let anon = share("[anon 7f0000000000-7f0000021000]");
        assert_eq!((anon.touched, anon.dirtied, anon.written), (1, 1, 1));
        assert_eq!(share("[stack]").written, 1);
        assert_eq!(share("/usr/bin/python3.13").written, 1);
        assert_eq!(share("[kernel]").touched, 1);
        assert_eq!(share("[unmapped: kernel data or page tables]").written, 1);
    }
}
