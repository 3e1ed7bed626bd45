//! How many sandboxes fit: the host memory each live sandbox holds, and how
//! long it takes to bring a hundred up, each having run some code (the
//! workload of a published fork benchmark: 100 sandboxes, each after
//! `import numpy; numpy.zeros(5).tolist()`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use zeroboot_sandbox::{IsolatedTemplate, Sandbox};

/// Sandboxes alive at once, and the clients that make them.
pub const LIVE: usize = 100;
pub const CLIENTS: usize = 8;

/// What [`live_sandboxes`] measured.
pub struct Density {
    /// From the first fork to the last sandbox's result, all `LIVE` kept.
    pub wall_ms: f64,
    /// The drop of the host's MemAvailable with all of them alive, per
    /// sandbox: everything a sandbox costs the host (its worker process, its
    /// VM, its copies of guest memory, page tables).
    pub host_kib_per_sandbox: f64,
    /// Where that went: the growth of some of /proc/meminfo's fields, per
    /// sandbox, as ([`BREAKDOWN`] name, KiB).
    pub breakdown: Vec<(&'static str, f64)>,
}

/// The /proc/meminfo fields the breakdown reads: anonymous memory (guest
/// pages copied on write, workers' own heaps), vmalloc (KVM's per-page
/// arrays of each memory slot, among others), slab (KVM's and the
/// processes' kernel objects), the processes' page tables, KVM's shadow
/// page tables (`SecPageTables`), kernel stacks.
pub const BREAKDOWN: [&str; 6] = [
    "AnonPages",
    "VmallocUsed",
    "Slab",
    "PageTables",
    "SecPageTables",
    "KernelStack",
];

/// /proc/meminfo's MemAvailable and the [`BREAKDOWN`] fields, in KiB.
fn meminfo_kib() -> Result<(u64, [u64; BREAKDOWN.len()])> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    // A kernel without one of the fields (SecPageTables came in 6.0) shows
    // it as 0.
    let kinds = BREAKDOWN.map(|name| field(name).unwrap_or(0));
    let available = field("MemAvailable").ok_or_else(|| anyhow!("/proc/meminfo has no MemAvailable"))?;
    Ok((available, kinds))
}

/// Forks `LIVE` sandboxes from `template` on `CLIENTS` threads, each
/// running `code`, and keeps them all alive until both figures are taken.
pub fn live_sandboxes(template: &IsolatedTemplate, code: &str) -> Result<Density> {
    let (before, kinds_before) = meminfo_kib()?;
    let live = Mutex::new(Vec::with_capacity(LIVE));
    let remaining = AtomicUsize::new(LIVE);
    let started = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    while remaining
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1))
                        .is_ok()
                    {
                        let mut sandbox: Sandbox = super::fork(template)?;
                        super::exec(&mut sandbox, code)?;
                        live.lock().map_err(|_| anyhow!("a client panicked"))?.push(sandbox);
                    }
                    Ok(())
                })
            })
            .collect();
        for client in clients {
            client.join().map_err(|_| anyhow!("a client panicked"))??;
        }
        Ok(())
    })?;
    let wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let (after, kinds_after) = meminfo_kib()?;
    let count = live.lock().map_err(|_| anyhow!("a client panicked"))?.len().max(1);
    drop(live);
    let per_sandbox = |before: u64, after: u64| (after as f64 - before as f64) / count as f64;
    Ok(Density {
        wall_ms,
        host_kib_per_sandbox: per_sandbox(after, before).max(0.0),
        breakdown: BREAKDOWN
            .iter()
            .zip(kinds_before.iter().zip(kinds_after))
            .map(|(&name, (&b, a))| (name, per_sandbox(b, a)))
            .collect(),
    })
}
