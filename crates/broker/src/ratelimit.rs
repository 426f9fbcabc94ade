//! Connect-rate limits: token buckets, one global and one per source address, checked when a
//! connection is accepted. A refused client still gets its CONNACK (0x9F Connection rate
//! exceeded; MQTT 3.1.1: return code 3) so that it backs off instead of retrying at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Per-address buckets kept before full ones are forgotten.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
    }
}

/// A rate (per second) and a burst; rate 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rate {
    per_second: f64,
    burst: f64,
}

impl Rate {
    /// `burst` 0 means "one second's worth".
    pub(crate) fn new(per_second: u32, burst: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            per_second: f64::from(per_second),
            burst: f64::from(if burst == 0 { per_second } else { burst }),
        })
    }
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateExceeded {
    /// The broker-wide rate.
    Global,
    /// The rate of one source address.
    Address,
}

/// The connect-rate limiter.
#[derive(Debug)]
pub(crate) struct ConnectLimiter {
    global: Option<(Rate, Mutex<Bucket>)>,
    per_address: Option<(Rate, Mutex<HashMap<IpAddr, Bucket>>)>,
}

impl ConnectLimiter {
    pub(crate) fn new(global: Option<Rate>, per_address: Option<Rate>) -> Self {
        let now = Instant::now();
        Self {
            global: global.map(|r| (r, Mutex::new(Bucket::full(r.burst, now)))),
            per_address: per_address.map(|r| (r, Mutex::new(HashMap::new()))),
        }
    }

    /// Takes a token for a new connection from `ip`, or says which limit is exceeded. The
    /// address is checked first, so that one noisy address does not use up the global budget.
    pub(crate) fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), RateExceeded> {
        if let Some((rate, buckets)) = &self.per_address
            && let Ok(mut buckets) = buckets.lock()
        {
            if buckets.len() > PRUNE_ABOVE {
                buckets.retain(|_, b| {
                    b.refill(rate.per_second, rate.burst, now);
                    b.tokens < rate.burst
                });
            }
            let b = buckets
                .entry(ip)
                .or_insert_with(|| Bucket::full(rate.burst, now));
            b.refill(rate.per_second, rate.burst, now);
            if b.tokens < 1.0 {
                return Err(RateExceeded::Address);
            }
            b.tokens -= 1.0;
        }
        if let Some((rate, bucket)) = &self.global
            && let Ok(mut b) = bucket.lock()
        {
            b.refill(rate.per_second, rate.burst, now);
            if b.tokens < 1.0 {
                return Err(RateExceeded::Global);
            }
            b.tokens -= 1.0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_the_rate_refills() {
        let limiter = ConnectLimiter::new(Rate::new(10, 5), None);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(limiter.admit(ip, t0), Ok(()));
        }
        assert_eq!(limiter.admit(ip, t0), Err(RateExceeded::Global));
        // 10 per second: one token every 100 ms.
        assert_eq!(limiter.admit(ip, t0 + Duration::from_millis(110)), Ok(()));
        assert_eq!(
            limiter.admit(ip, t0 + Duration::from_millis(120)),
            Err(RateExceeded::Global)
        );
    }

    #[test]
    fn one_address_over_its_rate_does_not_block_another() {
        let limiter = ConnectLimiter::new(None, Rate::new(1, 2));
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let t0 = Instant::now();
        assert!(limiter.admit(a, t0).is_ok());
        assert!(limiter.admit(a, t0).is_ok());
        assert_eq!(limiter.admit(a, t0), Err(RateExceeded::Address));
        assert!(limiter.admit(b, t0).is_ok());
    }

    #[test]
    fn rate_zero_is_no_limit() {
        assert!(Rate::new(0, 100).is_none());
        let limiter = ConnectLimiter::new(None, None);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let t0 = Instant::now();
        for _ in 0..10_000 {
            assert!(limiter.admit(ip, t0).is_ok());
        }
    }
}
