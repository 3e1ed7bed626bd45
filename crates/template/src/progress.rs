//! How long-running phases report to the user. The CLI draws them with
//! indicatif; tests use [`Silent`].

use std::time::Duration;

pub trait Progress: Send + Sync {
    /// A phase starts (e.g. "kernel", "boot").
    fn start(&self, phase: &str);
    /// A line of output from the current phase.
    fn line(&self, text: &str);
    /// The phase finished; `cached` when nothing had to be done.
    fn finish(&self, phase: &str, took: Duration, cached: bool);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str) {}
    fn line(&self, _: &str) {}
    fn finish(&self, _: &str, _: Duration, _: bool) {}
}
