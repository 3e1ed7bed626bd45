//! A token bucket limiting the bytes relayed in one direction.

use std::time::{Duration, Instant};

/// The bucket holds this fraction of a second's worth of bytes: small enough
/// that a transfer is paced from its start, large enough that a relay turn
/// moves a useful amount.
const BURST_DIVISOR: u64 = 20;
/// The smallest burst, so that very low rates still move whole segments'
/// worth of bytes per turn rather than a few bytes many times a second.
const MIN_BURST: u64 = 1500;

pub(crate) struct TokenBucket {
    /// Bytes per second; `None` is unlimited.
    rate: Option<u64>,
    capacity: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// `bytes_per_sec` 0 is unlimited. The bucket starts full.
    pub(crate) fn new(bytes_per_sec: u64, now: Instant) -> TokenBucket {
        let rate = (bytes_per_sec > 0).then_some(bytes_per_sec);
        let capacity = (bytes_per_sec / BURST_DIVISOR).max(MIN_BURST) as f64;
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            refilled_at: now,
        }
    }

    /// Bytes that may be relayed now.
    pub(crate) fn available(&mut self, now: Instant) -> usize {
        let Some(rate) = self.rate else {
            return usize::MAX;
        };
        let elapsed = now.saturating_duration_since(self.refilled_at);
        self.refilled_at = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * rate as f64).min(self.capacity);
        self.tokens as usize
    }

    pub(crate) fn consume(&mut self, bytes: usize) {
        if self.rate.is_some() {
            self.tokens = (self.tokens - bytes as f64).max(0.0);
        }
    }

    /// How long until a useful amount (a quarter of the bucket) can be
    /// relayed, for a relay that stopped because the bucket ran dry.
    pub(crate) fn time_until_refilled(&self, now: Instant) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let wanted = self.capacity / 4.0;
        let elapsed = now.saturating_duration_since(self.refilled_at);
        let tokens = self.tokens + elapsed.as_secs_f64() * rate as f64;
        if tokens >= wanted {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((wanted - tokens) / rate as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rate_is_unlimited() {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(0, now);
        assert_eq!(bucket.available(now), usize::MAX);
        bucket.consume(1 << 30);
        assert_eq!(bucket.available(now), usize::MAX);
        assert_eq!(bucket.time_until_refilled(now), Duration::ZERO);
    }

    #[test]
    fn refills_at_the_rate_up_to_the_burst() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(100_000, start);
        assert_eq!(bucket.available(start), 5_000);
        bucket.consume(5_000);
        assert_eq!(bucket.available(start), 0);
        let wait = bucket.time_until_refilled(start);
        assert!(
            wait > Duration::from_millis(12) && wait < Duration::from_millis(13),
            "{wait:?}"
        );
        let after_10ms = bucket.available(start + Duration::from_millis(10));
        assert!((999..=1_000).contains(&after_10ms), "{after_10ms}");
        assert_eq!(bucket.available(start + Duration::from_secs(10)), 5_000);
    }
}
