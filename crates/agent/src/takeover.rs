//! Cloned identities: two machines that present one agent identity (a copied state folder or
//! disk image) take the broker session from each other over and over, each reconnecting as
//! soon as the other one took it. The guard counts takeovers (DISCONNECT 0x8E) in a window;
//! past the limit the agent stops fighting and waits a long pause, so that the other machine
//! keeps a working connection and the operator can re-enroll one of them. A restart or a
//! network blip is not a takeover and never counts.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The limits, from `[reconnect]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakeoverLimits {
    /// Takeovers within `window` that make the agent pause; 0: never pause.
    pub limit: u32,
    /// The window the takeovers are counted in.
    pub window: Duration,
    /// How long the agent waits before it connects again.
    pub pause: Duration,
}

/// What to do after the session was taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterTakeover {
    /// Reconnect with the usual backoff (a one-off: `beckon doctor --client-id`, a restart
    /// elsewhere).
    Reconnect,
    /// Another machine uses this identity: wait `pause` before connecting again.
    Pause {
        /// Takeovers counted within the window (1 when a paused agent was taken over again).
        takeovers: u32,
        /// The wait.
        pause: Duration,
    },
}

/// Counts takeovers; plain state, time passed in.
#[derive(Debug)]
pub struct TakeoverGuard {
    limits: TakeoverLimits,
    recent: VecDeque<Instant>,
    /// Set when the limit was reached; until a connection lives a whole window, one more
    /// takeover pauses again at once (the other machine is still there).
    suspected: bool,
}

impl TakeoverGuard {
    /// A guard with nothing counted.
    pub fn new(limits: TakeoverLimits) -> Self {
        Self {
            limits,
            recent: VecDeque::new(),
            suspected: false,
        }
    }

    /// Whether the agent believes another machine uses its identity.
    pub fn suspected(&self) -> bool {
        self.suspected
    }

    /// A connection ended after living `lived`: one that lived a whole window without being
    /// taken over clears the suspicion (the other machine is gone). Returns true when it did.
    pub fn session_lived(&mut self, lived: Duration) -> bool {
        if self.suspected && lived >= self.limits.window {
            self.suspected = false;
            self.recent.clear();
            return true;
        }
        false
    }

    /// The session was taken over at `now`.
    pub fn taken_over(&mut self, now: Instant) -> AfterTakeover {
        if self.limits.limit == 0 {
            return AfterTakeover::Reconnect;
        }
        while let Some(first) = self.recent.front() {
            if now.saturating_duration_since(*first) >= self.limits.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.recent.push_back(now);
        let takeovers = self.recent.len() as u32;
        if self.suspected || takeovers >= self.limits.limit {
            self.suspected = true;
            self.recent.clear();
            return AfterTakeover::Pause {
                takeovers,
                pause: self.limits.pause,
            };
        }
        AfterTakeover::Reconnect
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: TakeoverLimits = TakeoverLimits {
        limit: 3,
        window: Duration::from_secs(600),
        pause: Duration::from_secs(3600),
    };

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    #[test]
    fn three_takeovers_in_the_window_pause() {
        let t0 = Instant::now();
        let mut guard = TakeoverGuard::new(LIMITS);
        assert_eq!(guard.taken_over(at(t0, 0)), AfterTakeover::Reconnect);
        assert_eq!(guard.taken_over(at(t0, 2)), AfterTakeover::Reconnect);
        assert_eq!(
            guard.taken_over(at(t0, 5)),
            AfterTakeover::Pause {
                takeovers: 3,
                pause: Duration::from_secs(3600)
            }
        );
        assert!(guard.suspected());
    }

    #[test]
    fn takeovers_spread_wider_than_the_window_never_pause() {
        // `beckon doctor --client-id` now and then, a restart elsewhere: one-offs.
        let t0 = Instant::now();
        let mut guard = TakeoverGuard::new(LIMITS);
        for i in 0..10 {
            assert_eq!(guard.taken_over(at(t0, i * 301)), AfterTakeover::Reconnect);
        }
        assert!(!guard.suspected());
    }

    #[test]
    fn a_suspected_agent_pauses_at_the_next_takeover_until_a_connection_lives_a_window() {
        let t0 = Instant::now();
        let mut guard = TakeoverGuard::new(LIMITS);
        for s in [0, 1, 2] {
            guard.taken_over(at(t0, s));
        }
        // Back after the pause, taken over again at once: the other machine is still there.
        assert!(!guard.session_lived(Duration::from_secs(3)));
        assert_eq!(
            guard.taken_over(at(t0, 3700)),
            AfterTakeover::Pause {
                takeovers: 1,
                pause: Duration::from_secs(3600)
            }
        );
        // A connection that lived a whole window: the other machine is gone.
        assert!(guard.session_lived(Duration::from_secs(600)));
        assert!(!guard.suspected());
        assert_eq!(guard.taken_over(at(t0, 9000)), AfterTakeover::Reconnect);
    }

    #[test]
    fn limit_zero_never_pauses() {
        let t0 = Instant::now();
        let mut guard = TakeoverGuard::new(TakeoverLimits { limit: 0, ..LIMITS });
        for s in 0..20 {
            assert_eq!(guard.taken_over(at(t0, s)), AfterTakeover::Reconnect);
        }
    }
}
