//! Authentication under abuse: failure throttles for login and enrollment, and the idle
//! expiry of login sessions. All of it is kept in memory: a restart forgets failures and
//! restarts the idle clock of live sessions (their absolute lifetime is in the store).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures that throttle a user name or a source address.
pub const FAILURES: usize = 10;
/// Within this window (5 minutes).
pub const WINDOW: Duration = Duration::from_secs(300);
/// Keys one throttle remembers; beyond, the stalest are forgotten (memory stays bounded
/// whatever names or addresses an attacker makes up).
const MAX_KEYS: usize = 10_000;

/// Counts failures per key; a key with [`FAILURES`] within [`WINDOW`] is refused until the
/// oldest of them leaves the window.
pub struct Throttle<K> {
    failures: Mutex<HashMap<K, VecDeque<Instant>>>,
}

impl<K: Eq + Hash + Clone> Default for Throttle<K> {
    fn default() -> Self {
        Self {
            failures: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone> Throttle<K> {
    /// `Err(retry after)` while `key` is throttled.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some(times) if recent(times, now) >= FAILURES => {
                let oldest = times[times.len() - FAILURES];
                Err((oldest + WINDOW).saturating_duration_since(now))
            }
            _ => Ok(()),
        }
    }

    /// Records a failure of `key`; true when it made the key throttled.
    pub fn fail(&self, key: &K, now: Instant) -> bool {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(key) && map.len() >= MAX_KEYS {
            map.retain(|_, t| recent(t, now) > 0);
            if map.len() >= MAX_KEYS {
                let stalest = map
                    .iter()
                    .min_by_key(|(_, t)| t.back().copied())
                    .map(|(k, _)| k.clone());
                if let Some(k) = stalest {
                    map.remove(&k);
                }
            }
        }
        let times = map.entry(key.clone()).or_default();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            times.pop_front();
        }
        times.push_back(now);
        // Only the last FAILURES matter.
        if times.len() > FAILURES {
            times.pop_front();
        }
        times.len() == FAILURES
    }

    /// Forgets the failures of `key` (after a success).
    pub fn clear(&self, key: &K) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// Failures of `times` within the window before `now`.
fn recent(times: &VecDeque<Instant>, now: Instant) -> usize {
    times
        .iter()
        .filter(|t| now.duration_since(**t) < WINDOW)
        .count()
}

/// When each live login session was last used, for the idle expiry.
pub struct SessionActivity {
    idle: Duration,
    lifetime: Duration,
    last_use: Mutex<HashMap<[u8; 32], Instant>>,
}

impl SessionActivity {
    /// Sessions that end after `idle` without use; none lives longer than `lifetime`.
    pub fn new(idle: Duration, lifetime: Duration) -> Self {
        Self {
            idle,
            lifetime,
            last_use: Mutex::new(HashMap::new()),
        }
    }

    /// Records a use of the session `hash` (a live one in the store); false when it has
    /// been idle too long, and is forgotten.
    pub fn touch(&self, hash: &[u8; 32], now: Instant) -> bool {
        let mut map = self.last_use.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = map.get(hash)
            && now.duration_since(*last) >= self.idle
        {
            map.remove(hash);
            return false;
        }
        if !map.contains_key(hash) && map.len() >= 1024 {
            // Sessions older than their lifetime have ended in the store too.
            let lifetime = self.lifetime;
            map.retain(|_, t| now.duration_since(*t) < lifetime);
        }
        map.insert(*hash, now);
        true
    }

    /// Forgets a session (logout).
    pub fn end(&self, hash: &[u8; 32]) {
        self.last_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(hash);
    }
}

/// The throttles and session activity the API shares.
pub struct Guards {
    /// Failed logins per user name.
    pub login_user: Throttle<String>,
    /// Failed logins per source address.
    pub login_address: Throttle<IpAddr>,
    /// Failed enrollments (unknown, used-up, expired or revoked tokens) per source address.
    pub enroll_address: Throttle<IpAddr>,
    /// Session idle expiry.
    pub sessions: SessionActivity,
}

impl Guards {
    /// Guards for sessions that end after `idle` without use and `lifetime` after login.
    pub fn new(idle: Duration, lifetime: Duration) -> Self {
        Self {
            login_user: Throttle::default(),
            login_address: Throttle::default(),
            enroll_address: Throttle::default(),
            sessions: SessionActivity::new(idle, lifetime),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_failures_in_the_window_throttle_until_the_oldest_leaves_it() {
        let t = Throttle::<String>::default();
        let key = "admin".to_owned();
        let start = Instant::now();
        for i in 0..FAILURES {
            assert!(t.check(&key, start).is_ok());
            let now = start + Duration::from_secs(i as u64);
            assert_eq!(t.fail(&key, now), i == FAILURES - 1);
        }
        let later = start + Duration::from_secs(20);
        let wait = t.check(&key, later).unwrap_err();
        assert_eq!(wait, WINDOW - Duration::from_secs(20));
        // The first failure left the window: nine remain.
        assert!(t.check(&key, start + WINDOW).is_ok());
        t.clear(&key);
        assert!(t.check(&key, later).is_ok());
        // Failures spread wider than the window never throttle.
        for i in 0..30 {
            assert!(!t.fail(&key, start + WINDOW / 5 * i));
        }
    }

    #[test]
    fn memory_stays_bounded_and_stale_keys_go_first() {
        let t = Throttle::<u32>::default();
        let start = Instant::now();
        for _ in 0..FAILURES {
            t.fail(&0, start);
        }
        for k in 1..=(MAX_KEYS as u32 + 10) {
            t.fail(&k, start + Duration::from_secs(1));
        }
        assert!(t.failures.lock().unwrap().len() <= MAX_KEYS);
        assert!(t.check(&0, start).is_ok(), "the stalest key was forgotten");
    }

    #[test]
    fn a_session_unused_for_the_idle_time_ends() {
        let s = SessionActivity::new(Duration::from_secs(60), Duration::from_secs(3600));
        let (a, now) = ([1u8; 32], Instant::now());
        assert!(s.touch(&a, now));
        assert!(s.touch(&a, now + Duration::from_secs(59)));
        assert!(s.touch(&a, now + Duration::from_secs(118)));
        assert!(!s.touch(&a, now + Duration::from_secs(178)));
    }
}
