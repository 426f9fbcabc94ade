//! Uniform random waits. The reconnect backoff itself is `beckon_net::Backoff`; the agent
//! draws from here for the wake-up spread, the check-in schedule and the wait after refused
//! credentials.

use std::time::Duration;

use rand::Rng;

/// Uniform in `[0, max]`.
pub fn random_up_to(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

/// The wait after refused credentials: half the cap to all of it, so that a misconfigured
/// fleet retries rarely, spread out, and never gives up.
pub fn near_cap(cap: Duration) -> Duration {
    cap / 2 + random_up_to(cap / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_in_bounds_and_spread_out() {
        let max = Duration::from_secs(10);
        let waits: Vec<Duration> = (0..400).map(|_| random_up_to(max)).collect();
        assert!(waits.iter().all(|w| *w <= max));
        let low = waits
            .iter()
            .filter(|w| **w < Duration::from_secs(5))
            .count();
        assert!((120..=280).contains(&low), "{low} of 400 in the lower half");
        assert_eq!(random_up_to(Duration::ZERO), Duration::ZERO);
        for _ in 0..100 {
            let w = near_cap(Duration::from_secs(300));
            assert!(w >= Duration::from_secs(150) && w <= Duration::from_secs(300));
        }
    }
}
