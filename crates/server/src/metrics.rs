//! Prometheus metrics for `/v1/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ok` (the code ran, whatever its exit code), `timeout`, `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Memory {
    /// `shared-pages` or `private-written-ranges` (`vmm::ForkMemory`).
    pub fork_memory: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub executions: Family<Outcome, Counter>,
    pub forks: Family<Memory, Counter>,
    pub spawn_seconds: Histogram,
    pub exec_seconds: Histogram,
    pub total_seconds: Histogram,
    pub live_sandboxes: Gauge,
    resident_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("zeroboot");
        let executions = Family::<Outcome, Counter>::default();
        let forks = Family::<Memory, Counter>::default();
        // 100 µs to about 52 s.
        let buckets = || exponential_buckets(0.000_1, 2.0, 20);
        let spawn_seconds = Histogram::new(buckets());
        let exec_seconds = Histogram::new(buckets());
        let total_seconds = Histogram::new(buckets());
        let live_sandboxes = Gauge::default();
        let resident_bytes = Gauge::default();
        registry.register("executions", "Executions by outcome", executions.clone());
        registry.register(
            "forks",
            "Sandboxes forked for one execution, by how their guest memory was backed",
            forks.clone(),
        );
        registry.register(
            "spawn_seconds",
            "Fork call until the sandbox could run",
            spawn_seconds.clone(),
        );
        registry.register("exec_seconds", "Code run until its result", exec_seconds.clone());
        registry.register(
            "total_seconds",
            "Fork call until the result, per execution",
            total_seconds.clone(),
        );
        registry.register("live_sandboxes", "Sandboxes that exist now", live_sandboxes.clone());
        registry.register(
            "server_resident_bytes",
            "Resident memory of the server process",
            resident_bytes.clone(),
        );
        Self {
            registry,
            executions,
            forks,
            spawn_seconds,
            exec_seconds,
            total_seconds,
            live_sandboxes,
            resident_bytes,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        self.resident_bytes.set(resident_bytes() as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}
