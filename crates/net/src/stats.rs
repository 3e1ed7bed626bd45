//! Counters one backend keeps, readable from any thread while it runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of one backend's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetStats {
    /// Guest TCP connections whose host connection was made.
    pub connections_opened: u64,
    /// Guest TCP connections refused by the policy, the never-reachable
    /// addresses or `max_connections`.
    pub connections_refused: u64,
    /// Allowed guest TCP connections whose host connect failed.
    pub connections_failed: u64,
    /// Payload bytes relayed from the guest to host sockets.
    pub bytes_to_host: u64,
    /// Payload bytes relayed from host sockets to the guest.
    pub bytes_to_guest: u64,
    /// DNS queries answered with the upstream's answer.
    pub dns_answered: u64,
    /// DNS queries the policy refused (answered REFUSED or NXDOMAIN without
    /// asking anyone).
    pub dns_refused: u64,
    /// DNS queries answered SERVFAIL or FORMERR (upstream silent, malformed
    /// query, too many queries in flight).
    pub dns_failed: u64,
    /// Guest frames dropped unprocessed: too many were waiting, or longer
    /// than the link's largest frame.
    pub guest_frames_dropped: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections_opened: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) connections_failed: AtomicU64,
    pub(crate) bytes_to_host: AtomicU64,
    pub(crate) bytes_to_guest: AtomicU64,
    pub(crate) dns_answered: AtomicU64,
    pub(crate) dns_refused: AtomicU64,
    pub(crate) dns_failed: AtomicU64,
    pub(crate) guest_frames_dropped: AtomicU64,
}

impl Counters {
    // Relaxed is enough: each counter is independent and only read for
    // reporting; nothing is ordered against them.
    pub(crate) fn add(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> NetStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        NetStats {
            connections_opened: read(&self.connections_opened),
            connections_refused: read(&self.connections_refused),
            connections_failed: read(&self.connections_failed),
            bytes_to_host: read(&self.bytes_to_host),
            bytes_to_guest: read(&self.bytes_to_guest),
            dns_answered: read(&self.dns_answered),
            dns_refused: read(&self.dns_refused),
            dns_failed: read(&self.dns_failed),
            guest_frames_dropped: read(&self.guest_frames_dropped),
        }
    }
}
