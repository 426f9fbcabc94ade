//! Reconnect pacing: exponential backoff with full jitter (`random(0, min(cap, base * 2^n))`),
//! reset only after a connection lived long enough, and longer waits when the broker says it
//! is busy. A fleet restarting after an outage spreads itself out instead of stampeding.

use std::time::Duration;

use rand::Rng;

/// Full-jitter exponential backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff from `base` up to `cap` (`base` is raised to 1 ms, `cap` to `base`).
    pub fn new(base: Duration, cap: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The ceiling of the next wait: `min(cap, base * 2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next wait: uniform in `[0, ceiling]`; then the ceiling doubles.
    pub fn next_wait(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        random_up_to(ceiling)
    }

    /// The wait after the broker refused for load (server busy, rate exceeded): at least
    /// `floor` (capped by `cap`), up to twice that, and the backoff climbs a step.
    pub fn busy_wait(&mut self, floor: Duration) -> Duration {
        let floor = floor.min(self.cap);
        let normal = self.next_wait();
        let jittered = floor + random_up_to(floor);
        normal.max(jittered).min(self.cap.max(floor))
    }

    /// The wait after refused credentials: around the cap (half to all of it), so that a
    /// misconfigured fleet retries rarely but keeps trying.
    pub fn at_cap(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.cap / 2 + random_up_to(self.cap / 2)
    }

    /// Forget past failures (after a connection that lived long enough).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Uniform in `[0, max]`.
pub fn random_up_to(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_to_the_cap_and_waits_stay_below() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let c = b.ceiling();
            let w = b.next_wait();
            assert!(w <= c, "{w:?} > {c:?}");
            ceilings.push(c.as_secs());
        }
        assert_eq!(&ceilings[..10], &[1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn waits_are_spread_not_synchronized() {
        // 200 agents at the same attempt: their waits must not bunch up.
        let waits: Vec<Duration> = (0..200)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
                for _ in 0..6 {
                    b.next_wait();
                }
                b.next_wait()
            })
            .collect();
        let below_half = waits
            .iter()
            .filter(|w| **w < Duration::from_secs(32))
            .count();
        assert!(
            (40..=160).contains(&below_half),
            "{below_half} of 200 below half"
        );
    }

    #[test]
    fn busy_and_credential_waits_are_long() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        for _ in 0..50 {
            let w = b.busy_wait(Duration::from_secs(30));
            assert!(
                w >= Duration::from_secs(30) && w <= Duration::from_secs(300),
                "{w:?}"
            );
            let w = b.at_cap();
            assert!(
                w >= Duration::from_secs(150) && w <= Duration::from_secs(300),
                "{w:?}"
            );
        }
        let huge = Backoff::new(Duration::from_secs(1), Duration::from_secs(u64::MAX / 4));
        let mut huge = huge;
        for _ in 0..100 {
            huge.next_wait();
        }
    }
}
