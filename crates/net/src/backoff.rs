//! Reconnect backoff: exponential with full jitter (sleep a random time between zero and
//! `min(cap, base * 2^failures)`), so that a fleet that lost its broker at the same moment
//! does not come back at the same moment.
//!
//! The ceiling is also never longer than the time already spent offline (from the loss of
//! the last connection that reset the backoff): `min(cap, base * 2^failures, max(base,
//! offline))`. Refused connects fail in a millisecond, so during a short outage the failure
//! count runs ahead of the clock: an agent whose first waits happened to be short could find
//! itself, ten seconds into an outage, waiting up to two minutes (seven quick failures) after
//! the broker is back, and a fleet of 19,000 always holds a few such agents. Bounding the
//! ceiling by the time offline keeps the return after an outage of length `T` within about
//! `T` of the broker's return, while the fleet's attempts still spread over that whole time
//! (about `2N/T` per second for `N` agents) and long outages still reach the cap.
//!
//! The model is linkerd2-proxy's `exp-backoff`: bounds validated at construction, and
//! properties tested.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The largest cap, floor or spread accepted: one day. Anything longer is a configuration
/// mistake (an agent that waits days is as good as gone).
pub const MAX_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The ceiling of the first wait; it doubles after each failure. Default 1 s.
    pub base: Duration,
    /// The largest ceiling. Default 5 min.
    pub cap: Duration,
    /// The least wait after the broker said "server busy" or "connection rate exceeded".
    /// Default 30 s.
    pub busy_floor: Duration,
    /// How long a connection must have lasted for its loss to start the backoff afresh.
    /// Default 60 s.
    pub reset_after: Duration,
    /// The largest random delay before the first connection at start. Default 10 s.
    pub startup_spread: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(5 * 60),
            busy_floor: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
            startup_spread: Duration::from_secs(10),
        }
    }
}

/// Backoff settings that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBackoff {
    /// The base is zero: every wait would be zero.
    #[error("backoff base must be more than zero")]
    ZeroBase,
    /// The cap is below the base.
    #[error("backoff cap ({cap:?}) must be at least the base ({base:?})")]
    CapBelowBase {
        /// The base.
        base: Duration,
        /// The cap.
        cap: Duration,
    },
    /// A delay setting is longer than [`MAX_DELAY`].
    #[error("backoff {name} ({value:?}) must be at most one day")]
    TooLong {
        /// Which setting.
        name: &'static str,
        /// Its value.
        value: Duration,
    },
    /// The reset threshold is zero: the backoff would reset after every connection.
    #[error("backoff reset_after must be more than zero")]
    ZeroResetAfter,
}

impl BackoffConfig {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), InvalidBackoff> {
        if self.base.is_zero() {
            return Err(InvalidBackoff::ZeroBase);
        }
        if self.cap < self.base {
            return Err(InvalidBackoff::CapBelowBase {
                base: self.base,
                cap: self.cap,
            });
        }
        for (name, value) in [
            ("cap", self.cap),
            ("busy_floor", self.busy_floor),
            ("reset_after", self.reset_after),
            ("startup_spread", self.startup_spread),
        ] {
            if value > MAX_DELAY {
                return Err(InvalidBackoff::TooLong { name, value });
            }
        }
        if self.reset_after.is_zero() {
            return Err(InvalidBackoff::ZeroResetAfter);
        }
        Ok(())
    }
}

/// The reconnect backoff state of one connection.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    failures: u32,
    connected_at: Option<Instant>,
    /// When the trouble began: the loss of the last connection that reset the backoff (or the
    /// first loss ever). A short connection in between does not move it.
    offline_since: Option<Instant>,
    rng: StdRng,
}

impl Backoff {
    /// A backoff seeded from the operating system.
    pub fn new(config: BackoffConfig) -> Result<Self, InvalidBackoff> {
        config.validate()?;
        Ok(Self::build(config, StdRng::from_os_rng()))
    }

    /// A backoff with a fixed seed: the same seed gives the same waits (for tests and
    /// simulations).
    pub fn with_seed(config: BackoffConfig, seed: u64) -> Result<Self, InvalidBackoff> {
        config.validate()?;
        Ok(Self::build(config, StdRng::seed_from_u64(seed)))
    }

    fn build(config: BackoffConfig, rng: StdRng) -> Self {
        Self {
            config,
            failures: 0,
            connected_at: None,
            offline_since: None,
            rng,
        }
    }

    /// The settings.
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The exponential ceiling of the next wait: `min(cap, base * 2^failures)`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures).unwrap_or(u32::MAX);
        self.config.base.saturating_mul(factor).min(self.config.cap)
    }

    /// The ceiling of the next wait at `now`: the exponential ceiling, and no more than the
    /// time offline since the trouble began (at least `base`), once a connection was lost.
    pub fn ceiling_at(&self, now: Instant) -> Duration {
        let ceiling = self.ceiling();
        match self.offline_since {
            Some(since) => ceiling.min(now.saturating_duration_since(since).max(self.config.base)),
            None => ceiling,
        }
    }

    /// The wait before the next attempt after a failure: uniform in `[0, ceiling_at(now)]`.
    /// Counts the failure.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_at(Instant::now())
    }

    /// [`Backoff::next_delay`] at a given moment (for tests and simulations).
    pub fn next_delay_at(&mut self, now: Instant) -> Duration {
        let delay = self.jitter(self.ceiling_at(now));
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// The wait after the broker refused with "server busy" or "connection rate exceeded":
    /// `busy_floor` plus a uniform wait in `[0, ceiling]`, so that refused clients spread out
    /// beyond the floor. Counts the failure.
    pub fn next_busy_delay(&mut self) -> Duration {
        let delay = self.config.busy_floor + self.jitter(self.ceiling());
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// A random delay before the first connection at start: uniform in
    /// `[0, startup_spread]`.
    pub fn startup_delay(&mut self) -> Duration {
        self.jitter(self.config.startup_spread)
    }

    /// Call when a connection is established (MQTT CONNACK accepted).
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// Call when an established connection is lost. The backoff starts afresh only if the
    /// connection lasted at least `reset_after`, so a broker that accepts and then drops at
    /// once does not get a reconnect flood; for the same reason only such a loss (or the
    /// first) starts the offline time that bounds the ceiling. Returns true when it reset.
    pub fn disconnected(&mut self, now: Instant) -> bool {
        let lasted = self
            .connected_at
            .take()
            .map(|at| now.saturating_duration_since(at));
        let reset = lasted.is_some_and(|d| d >= self.config.reset_after);
        if reset {
            self.failures = 0;
        }
        if reset || self.offline_since.is_none() {
            self.offline_since = Some(now);
        }
        reset
    }

    /// Starts afresh (for example when the network changed).
    pub fn reset(&mut self) {
        self.failures = 0;
        self.connected_at = None;
        self.offline_since = None;
    }

    fn jitter(&mut self, upper: Duration) -> Duration {
        // upper <= MAX_DELAY, so its nanoseconds fit in a u64.
        let nanos = u64::try_from(upper.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.random_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(base_ms: u64, cap_ms: u64) -> BackoffConfig {
        BackoffConfig {
            base: Duration::from_millis(base_ms),
            cap: Duration::from_millis(cap_ms),
            ..BackoffConfig::default()
        }
    }

    #[test]
    fn rejects_impossible_settings() {
        assert_eq!(
            Backoff::new(config(0, 10)).err(),
            Some(InvalidBackoff::ZeroBase)
        );
        assert!(matches!(
            Backoff::new(config(10, 5)).err(),
            Some(InvalidBackoff::CapBelowBase { .. })
        ));
        let too_long = BackoffConfig {
            busy_floor: MAX_DELAY + Duration::from_secs(1),
            ..BackoffConfig::default()
        };
        assert!(matches!(
            Backoff::new(too_long).err(),
            Some(InvalidBackoff::TooLong {
                name: "busy_floor",
                ..
            })
        ));
        let zero_reset = BackoffConfig {
            reset_after: Duration::ZERO,
            ..BackoffConfig::default()
        };
        assert_eq!(
            Backoff::new(zero_reset).err(),
            Some(InvalidBackoff::ZeroResetAfter)
        );
        assert!(Backoff::new(BackoffConfig::default()).is_ok());
    }

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut b = Backoff::with_seed(BackoffConfig::default(), 1).expect("valid");
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            ceilings.push(b.ceiling().as_secs());
            b.next_delay();
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }

    #[test]
    fn same_seed_same_waits() {
        let waits = |seed| {
            let mut b = Backoff::with_seed(BackoffConfig::default(), seed).expect("valid");
            (0..20).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(waits(7), waits(7));
        assert_ne!(waits(7), waits(8));
    }

    #[test]
    fn resets_only_after_a_long_enough_connection() {
        let mut b = Backoff::with_seed(BackoffConfig::default(), 3).expect("valid");
        for _ in 0..5 {
            b.next_delay();
        }
        let t0 = Instant::now();
        b.connected(t0);
        assert!(!b.disconnected(t0 + Duration::from_secs(59)));
        assert_eq!(b.failures(), 5, "a short connection keeps the backoff");
        b.connected(t0);
        assert!(b.disconnected(t0 + Duration::from_secs(60)));
        assert_eq!(b.failures(), 0);
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        // Losing a connection that was never reported as established changes nothing.
        b.next_delay();
        assert!(!b.disconnected(t0 + Duration::from_secs(600)));
        assert_eq!(b.failures(), 1);
    }

    #[test]
    fn the_ceiling_never_exceeds_the_time_offline() {
        let mut b = Backoff::with_seed(BackoffConfig::default(), 5).expect("valid");
        let t0 = Instant::now();
        b.connected(t0);
        assert!(b.disconnected(t0 + Duration::from_secs(3600)));
        let lost = t0 + Duration::from_secs(3600);
        // Ten quick refusals in the first second of an outage: the exponential ceiling is
        // past the cap, the wait is bounded by the time offline (at least the base).
        for _ in 0..10 {
            assert!(b.next_delay_at(lost + Duration::from_millis(100)) <= Duration::from_secs(1));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(300));
        assert_eq!(b.ceiling_at(lost), Duration::from_secs(1));
        assert_eq!(
            b.ceiling_at(lost + Duration::from_secs(10)),
            Duration::from_secs(10)
        );
        assert_eq!(
            b.ceiling_at(lost + Duration::from_secs(3600)),
            Duration::from_secs(300)
        );
        // A connection too short to reset the backoff does not restart the offline time: a
        // broker that accepts and drops at once meets longer and longer waits.
        b.connected(lost + Duration::from_secs(20));
        assert!(!b.disconnected(lost + Duration::from_secs(21)));
        assert_eq!(
            b.ceiling_at(lost + Duration::from_secs(21)),
            Duration::from_secs(21)
        );
        b.reset();
        assert_eq!(b.ceiling_at(lost), Duration::from_secs(1));
    }

    #[test]
    fn a_fleet_returns_within_about_the_outage_after_the_broker_does() {
        // 19,000 agents lose the broker at once; it is back 10 s later; refused connects
        // fail at once. Every agent's first attempt after the return comes within the
        // outage's length of it (with the failure-count ceiling alone, a few waited over a
        // minute).
        let config = BackoffConfig::default();
        let lost = Instant::now();
        let up = lost + Duration::from_secs(10);
        let mut latest = Duration::ZERO;
        for agent in 0..19_000u64 {
            let mut b = Backoff::with_seed(config, agent).expect("valid");
            b.connected(lost - Duration::from_secs(600));
            b.disconnected(lost);
            let mut t = lost;
            loop {
                t += b.next_delay_at(t);
                if t >= up {
                    break;
                }
            }
            latest = latest.max(t - up);
        }
        assert!(latest <= Duration::from_secs(10), "{latest:?}");
    }

    #[test]
    fn never_overflows_after_many_failures() {
        let mut b = Backoff::with_seed(BackoffConfig::default(), 9).expect("valid");
        for _ in 0..10_000 {
            assert!(b.next_delay() <= Duration::from_secs(300));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(300));
    }

    proptest! {
        #[test]
        fn waits_stay_within_bounds(
            base_ms in 1u64..10_000,
            extra_ms in 0u64..600_000,
            seed in any::<u64>(),
            failures in 0usize..80,
        ) {
            let cfg = config(base_ms, base_ms + extra_ms);
            let mut b = Backoff::with_seed(cfg, seed).expect("valid");
            for _ in 0..failures {
                let ceiling = b.ceiling();
                prop_assert!(ceiling >= cfg.base.min(cfg.cap));
                prop_assert!(ceiling <= cfg.cap);
                let d = b.next_delay();
                prop_assert!(d <= ceiling, "{d:?} > {ceiling:?}");
            }
        }

        #[test]
        fn ceiling_grows_then_holds(
            base_ms in 1u64..10_000,
            extra_ms in 0u64..600_000,
            seed in any::<u64>(),
        ) {
            let cfg = config(base_ms, base_ms + extra_ms);
            let mut b = Backoff::with_seed(cfg, seed).expect("valid");
            let mut previous = b.ceiling();
            prop_assert_eq!(previous, cfg.base);
            for _ in 0..64 {
                b.next_delay();
                let now = b.ceiling();
                prop_assert!(now >= previous);
                prop_assert!(now == cfg.cap || now == previous * 2);
                previous = now;
            }
            prop_assert_eq!(previous, cfg.cap);
        }

        #[test]
        fn busy_waits_respect_the_floor(
            floor_s in 0u64..600,
            seed in any::<u64>(),
            failures in 1usize..30,
        ) {
            let cfg = BackoffConfig {
                busy_floor: Duration::from_secs(floor_s),
                ..BackoffConfig::default()
            };
            let mut b = Backoff::with_seed(cfg, seed).expect("valid");
            for _ in 0..failures {
                let ceiling = b.ceiling();
                let d = b.next_busy_delay();
                prop_assert!(d >= cfg.busy_floor);
                prop_assert!(d <= cfg.busy_floor + ceiling);
            }
        }

        #[test]
        fn jitter_spreads_over_the_whole_range(seed in any::<u64>()) {
            // A fleet of 200 agents at the same failure count: their waits must cover the
            // range, not bunch up (the chance that 200 uniform draws all miss a quarter is
            // below 1e-24).
            let cfg = BackoffConfig::default();
            let waits: Vec<Duration> = (0..200u64)
                .map(|agent| {
                    let mut b = Backoff::with_seed(cfg, seed ^ agent.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                        .expect("valid");
                    for _ in 0..5 {
                        b.next_delay();
                    }
                    b.next_delay()
                })
                .collect();
            let ceiling = Duration::from_secs(32);
            let low = waits.iter().filter(|d| **d < ceiling / 4).count();
            let high = waits.iter().filter(|d| **d > ceiling * 3 / 4).count();
            prop_assert!(low > 0 && high > 0, "low {low}, high {high}");
            prop_assert!(waits.iter().all(|d| *d <= ceiling));
        }

        #[test]
        fn startup_delay_within_spread(spread_ms in 0u64..100_000, seed in any::<u64>()) {
            let cfg = BackoffConfig {
                startup_spread: Duration::from_millis(spread_ms),
                ..BackoffConfig::default()
            };
            let mut b = Backoff::with_seed(cfg, seed).expect("valid");
            prop_assert!(b.startup_delay() <= cfg.startup_spread);
        }
    }
}
