//! The dispatch lease. Several consoles may share one database; each call's wake-ups are
//! sent by one of them, its dispatcher (the console that made it). A console connected to
//! the broker holds a lease in the database and renews it every [`RENEW_EVERY`]; once a
//! console's lease has run out ([`LEASE`] after its last renewal: it was killed, lost the
//! database or the broker), the next console to look takes its unexpired calls over and
//! sends what their agents have not acknowledged. Only a console connected to the broker
//! holds a lease or takes calls over: it is the one that can send them.

use std::time::Duration;

use tokio::time::Instant;

use crate::AppState;
use crate::model::now_ms;
use crate::store::Takeover;

/// How long a renewal holds the lease. With the look every second, another console takes
/// over within `LEASE` + 1 s of the last renewal.
pub(super) const LEASE: Duration = Duration::from_secs(6);
/// How often the lease is renewed: a lease survives two renewals missed in a row.
pub(super) const RENEW_EVERY: Duration = Duration::from_secs(2);

/// This console's side of the lease.
#[derive(Debug, Default)]
pub(super) struct Lease {
    /// The last renewal that held.
    renewed: Option<Instant>,
    /// Since when another process has held the lease of this console id.
    refused_since: Option<Instant>,
    /// The refusal was logged.
    refusal_logged: bool,
}

/// What [`Lease::renewal`] says to do.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Renewal {
    /// Not due yet: the lease holds.
    Held,
    /// Renew it now.
    Due,
}

impl Lease {
    /// Whether the lease is due for renewal at `now`.
    pub(super) fn renewal(&self, now: Instant) -> Renewal {
        match self.renewed {
            Some(at) if now.duration_since(at) < RENEW_EVERY => Renewal::Held,
            _ => Renewal::Due,
        }
    }

    /// The renewal at `now` held (`true`) or found another process holding the lease of
    /// this console id; returns whether that process has held it past a lease's length (a
    /// console that merely stopped would have lost it by then: a second console runs with
    /// this console id), once.
    pub(super) fn renewed(&mut self, now: Instant, held: bool) -> bool {
        if held {
            self.renewed = Some(now);
            self.refused_since = None;
            self.refusal_logged = false;
            return false;
        }
        self.renewed = None;
        let since = *self.refused_since.get_or_insert(now);
        if !self.refusal_logged && now.duration_since(since) > LEASE + RENEW_EVERY {
            self.refusal_logged = true;
            return true;
        }
        false
    }

    /// Renews the lease when due, then takes over the calls of consoles whose lease ran
    /// out. A store that fails is logged and tried again at the next tick (meanwhile this
    /// console's lease may run out too, and another console take its calls over).
    pub(super) async fn keep(&mut self, st: &AppState) -> Takeover {
        let now = Instant::now();
        if self.renewal(now) == Renewal::Due {
            let lease_ms = i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
            match st
                .store
                .run(move |s| s.hold_lease(now_ms(), lease_ms))
                .await
            {
                Ok(held) => {
                    if self.renewed(now, held) {
                        tracing::error!(
                            console_id = %st.config.console_id,
                            "another running console uses this console id: it holds the dispatch lease, so this console takes over no calls and the two take each other's broker session over; give each console its own --console-id"
                        );
                    }
                    if !held {
                        return Takeover::default();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the dispatch lease failed");
                    return Takeover::default();
                }
            }
        }
        match st.store.run(|s| s.take_over_calls(now_ms())).await {
            Ok(taken) => {
                for (call, from) in &taken.calls {
                    tracing::info!(
                        call = %call,
                        from = from.as_deref().unwrap_or("none"),
                        "took over a call whose console stopped renewing its dispatch lease"
                    );
                }
                taken
            }
            Err(e) => {
                tracing::warn!(error = %e, "looking for calls of stopped consoles failed");
                Takeover::default()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_is_renewed_every_two_seconds_and_a_second_holder_is_reported_once() {
        let mut lease = Lease::default();
        let start = Instant::now();
        assert_eq!(lease.renewal(start), Renewal::Due, "nothing held yet");
        assert!(!lease.renewed(start, true));
        assert_eq!(
            lease.renewal(start + Duration::from_millis(1999)),
            Renewal::Held
        );
        assert_eq!(lease.renewal(start + RENEW_EVERY), Renewal::Due);

        // Held by another process: a console restarted at once waits out its old lease
        // quietly; past a lease's length, a second console with this id is reported, once.
        let refused = start + RENEW_EVERY;
        assert!(!lease.renewed(refused, false));
        assert_eq!(
            lease.renewal(refused),
            Renewal::Due,
            "tried again each tick"
        );
        assert!(!lease.renewed(refused + LEASE, false));
        assert!(lease.renewed(
            refused + LEASE + RENEW_EVERY + Duration::from_millis(1),
            false
        ));
        assert!(!lease.renewed(refused + LEASE * 3, false), "reported once");
        // Held again: a later refusal is reported afresh.
        assert!(!lease.renewed(refused + LEASE * 4, true));
        let again = refused + LEASE * 5;
        assert!(!lease.renewed(again, false));
        assert!(lease.renewed(again + LEASE * 2, false));
    }
}
