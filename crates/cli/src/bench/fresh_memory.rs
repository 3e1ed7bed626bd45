//! Fresh memory in a fork: how long code takes to allocate and fill memory
//! that the template never touched, and how many guest page faults that
//! costs (issue: real data sizes; guest/agent/native/heap.h). Python
//! templates with a fresh heap only: the workloads are Python.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use zeroboot_protocol::Request;
use zeroboot_sandbox::IsolatedTemplate;

/// Forks per workload; the figure is their median.
const SAMPLES: usize = 3;

/// What each workload does, and its label in the JSON.
const WORKLOADS: [(&str, &str); 3] = [
    ("fresh_memory_256mib", "bytearray(256 << 20)"),
    ("numpy_ones_16mib", "numpy.ones((16 << 20) // 8)"),
    ("numpy_ones_256mib_sum", "numpy.ones((256 << 20) // 8).sum()"),
];

/// The guest times the workload alone and counts its own page faults
/// (minor plus major, from /proc/self/stat) around it; both readings are
/// outside the timed region.
fn guest_code(workload: &str) -> String {
    format!(
        "import time, numpy\n\
         def faults():\n    f = open('/proc/self/stat').read().rsplit(')', 1)[1].split()\n    return int(f[7]) + int(f[9])\n\
         before = faults()\n\
         t = time.perf_counter()\n\
         x = {workload}\n\
         took = time.perf_counter() - t\n\
         print(took, faults() - before)\n"
    )
}

pub struct FreshMemory {
    pub name: &'static str,
    pub code: &'static str,
    /// The workload alone, timed in the guest (median of the samples).
    pub seconds: f64,
    /// Fork call to result, timed by the host (median).
    pub fork_to_result_s: f64,
    /// Guest page faults the workload took (median).
    pub guest_page_faults: u64,
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

pub fn measure(template: &IsolatedTemplate) -> Result<Vec<FreshMemory>> {
    let mut out = Vec::new();
    for (name, code) in WORKLOADS {
        let (mut seconds, mut wall, mut faults) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..SAMPLES {
            std::thread::sleep(super::REFILL);
            let t = Instant::now();
            let mut sandbox = template.fork()?;
            let r = sandbox.exec(&Request::new(guest_code(code).as_bytes(), b""), super::TIMEOUT)?;
            wall.push(t.elapsed().as_secs_f64());
            let stdout = String::from_utf8_lossy(&r.stdout);
            if r.exit_code != 0 {
                bail!("{code} failed in a fork: {}", String::from_utf8_lossy(&r.stderr));
            }
            let mut words = stdout.split_whitespace();
            let (Some(s), Some(f)) = (words.next(), words.next()) else {
                bail!("{code}: unexpected output {stdout:?}");
            };
            seconds.push(s.parse::<f64>().with_context(|| format!("{code}: {stdout:?}"))?);
            faults.push(f.parse::<u64>().with_context(|| format!("{code}: {stdout:?}"))?);
        }
        out.push(FreshMemory {
            name,
            code,
            seconds: median(seconds),
            fork_to_result_s: median(wall),
            guest_page_faults: median(faults),
        });
    }
    Ok(out)
}
