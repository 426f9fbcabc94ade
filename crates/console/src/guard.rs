//! Authentication under abuse: failure throttles for login and enrollment, and the idle
//! expiry of login sessions.
//!
//! The throttles count failures in the store (see
//! [`AuthStore::record_auth_failure`](crate::store::AuthStore::record_auth_failure)), so
//! every console on one database counts the failures of all (an attacker gains nothing from
//! a load balancer spreading guesses over several consoles) and a restarted console still
//! refuses. Only the last [`WINDOW`] of failures is kept: a key's older failures are deleted
//! as its new ones come, and all of them by [`sweep`], which the dispatcher runs every
//! second (and at each attempt to reach the push service while it cannot); so the rows stay
//! bounded by what failures arrive within the window, whatever names or addresses an
//! attacker makes up.
//!
//! A session's last use is kept in memory and, now and then, in the store, which every
//! console reads.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::Millis;
use crate::store::{FailureKind, Store, StoreResult};

/// Failures that throttle a user name or a source address.
pub const FAILURES: u32 = 10;
/// Within this window (5 minutes).
pub const WINDOW: Duration = Duration::from_secs(300);
/// [`WINDOW`] in the store's milliseconds.
const WINDOW_MS: Millis = WINDOW.as_secs() as Millis * 1000;
/// Failures [`sweep`] deletes per statement...
const SWEEP_BATCH: u32 = 1000;
/// ...and statements per sweep at most (a sweep runs every second).
const SWEEP_BATCHES: u32 = 20;

/// `Err(retry after)` while `key` is throttled at `now`: it has [`FAILURES`] within the
/// [`WINDOW`] before `now` (on any console), until the oldest of them leaves the window.
pub fn check(
    store: &dyn Store,
    kind: FailureKind,
    key: &str,
    now: Millis,
) -> StoreResult<Result<(), Duration>> {
    let times = store.recent_auth_failures(kind, key, now - WINDOW_MS, FAILURES)?;
    Ok(match times.get(FAILURES as usize - 1) {
        Some(&oldest) => Err(Duration::from_millis(
            u64::try_from(oldest + WINDOW_MS - now).unwrap_or(0),
        )),
        None => Ok(()),
    })
}

/// Records a failure of `key` at `now`; true when `key` is throttled after it.
pub fn fail(store: &dyn Store, kind: FailureKind, key: &str, now: Millis) -> StoreResult<bool> {
    Ok(store.record_auth_failure(kind, key, now, now - WINDOW_MS)? >= u64::from(FAILURES))
}

/// Deletes the failures that left the window by `now` (a bounded number per call: a
/// later sweep goes on); returns how many it deleted.
pub fn sweep(store: &dyn Store, now: Millis) -> StoreResult<u64> {
    let mut deleted = 0;
    for _ in 0..SWEEP_BATCHES {
        let n = store.prune_auth_failures(now - WINDOW_MS, SWEEP_BATCH)?;
        deleted += n;
        if n < u64::from(SWEEP_BATCH) {
            break;
        }
    }
    Ok(deleted)
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

#[cfg(test)]
mod tests {
    use super::*;

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
