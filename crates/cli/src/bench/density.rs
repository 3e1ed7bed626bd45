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
}

fn mem_available_kib() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("/proc/meminfo has no MemAvailable"))
}

/// Forks `LIVE` sandboxes from `template` on `CLIENTS` threads, each
/// running `code`, and keeps them all alive until both figures are taken.
pub fn live_sandboxes(template: &IsolatedTemplate, code: &str) -> Result<Density> {
    let before = mem_available_kib()?;
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
    let after = mem_available_kib()?;
    let count = live.lock().map_err(|_| anyhow!("a client panicked"))?.len().max(1);
    drop(live);
    Ok(Density {
        wall_ms,
        host_kib_per_sandbox: before.saturating_sub(after) as f64 / count as f64,
    })
}
