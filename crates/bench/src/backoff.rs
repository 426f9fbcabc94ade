//! The agent's reconnect backoff: exponential with full jitter.
//!
//! To be replaced by `beckon_net`'s backoff once that crate has landed, so that the storm
//! phase always runs the agent's real schedule. Until then this is the same rule: before
//! attempt `n` (0-based) wait a uniformly random time in `[0, min(cap, base * 2^n)]`.

use std::time::Duration;

use rand::Rng;

/// Full-jitter exponential backoff.
#[derive(Debug, Clone, Copy)]
pub struct FullJitter {
    base: Duration,
    cap: Duration,
}

impl FullJitter {
    /// A backoff from `base` doubling up to `cap`; `None` when `base` is zero or above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Option<Self> {
        (!base.is_zero() && base <= cap).then_some(Self { base, cap })
    }

    /// The upper bound of the wait before attempt `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A random wait before attempt `attempt` (0-based).
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_from_base_up_to_cap() {
        let backoff = FullJitter::new(Duration::from_secs(1), Duration::from_secs(300))
            .expect("valid backoff");
        assert_eq!(backoff.ceiling(0), Duration::from_secs(1));
        assert_eq!(backoff.ceiling(3), Duration::from_secs(8));
        assert_eq!(backoff.ceiling(8), Duration::from_secs(256));
        assert_eq!(backoff.ceiling(9), Duration::from_secs(300));
        assert_eq!(backoff.ceiling(1000), Duration::from_secs(300));
    }

    #[test]
    fn delays_stay_within_the_ceiling() {
        let backoff = FullJitter::new(Duration::from_secs(1), Duration::from_secs(300))
            .expect("valid backoff");
        let mut rng = rand::rng();
        for attempt in 0..40 {
            for _ in 0..50 {
                assert!(backoff.delay(attempt, &mut rng) <= backoff.ceiling(attempt));
            }
        }
    }

    #[test]
    fn rejects_a_zero_base_or_a_base_above_the_cap() {
        assert!(FullJitter::new(Duration::ZERO, Duration::from_secs(1)).is_none());
        assert!(FullJitter::new(Duration::from_secs(2), Duration::from_secs(1)).is_none());
    }
}
