//! Backoff for transient failures, shared by every stage that retries: the
//! sink when the database is unreachable, the source when the broker
//! connection drops.

use std::time::{Duration, Instant};

use crate::config::RetryConfig;

/// Exponential backoff with jitter. Each delay is a random point between
/// half and all of `initial * 2^attempts`, capped at `max`, so that several
/// weir processes that lost the same server do not come back in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Delays handed out so far; 0 until the first failure.
    pub attempts: u32,
    cfg: RetryConfig,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(RetryConfig::default())
    }
}

impl Backoff {
    pub fn new(cfg: RetryConfig) -> Backoff {
        Backoff { attempts: 0, cfg }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .cfg
            .initial
            .saturating_mul(1u32 << self.attempts.min(20))
            .min(self.cfg.max);
        self.attempts = self.attempts.saturating_add(1);
        let nanos = ceiling.as_nanos() as u64;
        Duration::from_nanos(nanos / 2 + (nanos as f64 / 2.0 * jitter_fraction()) as u64)
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// A number in [0, 1) that differs between calls and processes.
fn jitter_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_within_bounds() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
        assert!(b.next_delay() >= Duration::from_secs(15));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
