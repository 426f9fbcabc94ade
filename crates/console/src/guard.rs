//! Authentication under abuse: failure throttles for login and enrollment, and the idle
//! expiry of login sessions. The throttles are kept in memory, per console: a restart
//! forgets failures, and consoles sharing a database each count their own. A session's last
//! use is kept in memory and, now and then, in the store, which every console reads.

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

/// When each login session was last used on this console, for the idle expiry. The store
/// keeps each session's last use too (written at most every [`SessionActivity::record_every`]),
/// so that a session used on one console stays alive on the others and one idle too long
/// ends on all.
pub struct SessionActivity {
    idle: Duration,
    lifetime: Duration,
    last_use: Mutex<HashMap<[u8; 32], Seen>>,
}

/// A session's last use on this console, and its last use written to the store.
#[derive(Clone, Copy)]
struct Seen {
    used: Instant,
    recorded: Instant,
}

/// What a use of a session needs from the store (see [`SessionActivity::check`]).
#[derive(Debug, PartialEq, Eq)]
pub enum SessionUse {
    /// Used here within the idle time, and recorded in the store lately: nothing.
    Live,
    /// Used here within the idle time: record this use in the store.
    Record,
    /// Not used here within the idle time (or never): the store says whether it was used
    /// within it on any console, and records this use if so.
    Ask,
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

    /// How often a session in use has its use recorded in the store: every minute, or a
    /// quarter of a shorter idle time. Another console sees a session's last use this late
    /// at most, so a session used on one console and then on another can end that much
    /// before its idle time.
    pub fn record_every(&self) -> Duration {
        (self.idle / 4).min(Duration::from_secs(60))
    }

    /// A use of the session `hash` (a live one in the store) at `now`: what the store must
    /// do about it. Remembered as used unless the store is to be asked.
    pub fn check(&self, hash: &[u8; 32], now: Instant) -> SessionUse {
        let mut map = self.last_use.lock().unwrap_or_else(|e| e.into_inner());
        let Some(seen) = map.get_mut(hash) else {
            return SessionUse::Ask;
        };
        if now.duration_since(seen.used) >= self.idle {
            return SessionUse::Ask;
        }
        seen.used = now;
        if now.duration_since(seen.recorded) >= self.record_every() {
            SessionUse::Record
        } else {
            SessionUse::Live
        }
    }

    /// The store recorded a use of the session at `now`.
    pub fn recorded(&self, hash: &[u8; 32], now: Instant) {
        let mut map = self.last_use.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(hash) && map.len() >= 1024 {
            // Sessions older than their lifetime have ended in the store too.
            let lifetime = self.lifetime;
            map.retain(|_, s| now.duration_since(s.used) < lifetime);
        }
        map.insert(
            *hash,
            Seen {
                used: now,
                recorded: now,
            },
        );
    }

    /// Forgets a session (logout, or idle too long).
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
    fn a_session_in_use_is_recorded_now_and_then_and_one_idle_here_is_asked_about() {
        let s = SessionActivity::new(Duration::from_secs(600), Duration::from_secs(3600));
        assert_eq!(s.record_every(), Duration::from_secs(60));
        let (a, now) = ([1u8; 32], Instant::now());
        let at = |secs| now + Duration::from_secs(secs);
        // Never seen here (made on another console, or before a restart): the store knows.
        assert_eq!(s.check(&a, now), SessionUse::Ask);
        s.recorded(&a, now);
        assert_eq!(s.check(&a, at(59)), SessionUse::Live);
        assert_eq!(s.check(&a, at(60)), SessionUse::Record);
        s.recorded(&a, at(60));
        // Used every 9 minutes it stays live here, recorded each time.
        assert_eq!(s.check(&a, at(600)), SessionUse::Record);
        assert_eq!(s.check(&a, at(1140)), SessionUse::Record);
        // Idle here for the idle time: maybe used on another console meanwhile; ask.
        assert_eq!(s.check(&a, at(1740)), SessionUse::Ask);
        assert_eq!(
            s.check(&a, at(1741)),
            SessionUse::Ask,
            "until the store answers"
        );
        s.end(&a);
        assert_eq!(s.check(&a, at(1742)), SessionUse::Ask);

        let short = SessionActivity::new(Duration::from_millis(1500), Duration::from_secs(4));
        assert_eq!(short.record_every(), Duration::from_millis(375));
    }
}
