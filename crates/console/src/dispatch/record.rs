//! The recorder of large calls: a call to more agents than one chunk
//! ([`CALL_CHUNK`](crate::store::CALL_CHUNK)) is recorded with its first chunk only, and its
//! wake-ups go out at once; this task records the other chunks, one transaction each, and
//! hands each chunk's wake-ups to the dispatcher as soon as it commits. It also finishes
//! what a console cut off mid-recording left (this console after a restart, or one that
//! took the call over), and runs with or without a broker connection: what cannot go out
//! now stays queued, as any call's wake-ups.

use std::time::Duration;

use tokio::sync::watch;

use super::writer::publish_events;
use super::{Command, stopped};
use crate::AppState;
use crate::model::*;

/// How often the recorder looks for calls left to record without being woken (after a
/// restart, a takeover).
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// A fresh wake-up id (UUID v7: time-ordered, so that a call's rows are appended to the
/// deliveries' primary key, and 74 random bits).
pub fn next_wakeup_id() -> String {
    beckon_identity::wakeup::new_wakeup_id(now_ms())
        .unwrap_or_else(|_| uuid::Uuid::now_v7().hyphenated().to_string())
}

/// Runs until `shutdown`: records the chunks left of this console's calls, woken by the
/// API when it made a large call and every [`LOOK_EVERY`].
pub async fn record(st: AppState, mut shutdown: watch::Receiver<bool>) {
    let mut look = tokio::time::interval(LOOK_EVERY);
    loop {
        tokio::select! {
            _ = look.tick() => {}
            () = st.recording.notified() => {}
            () = stopped(&mut shutdown) => return,
        }
        let calls = match st.store.run(|s| s.calls_to_record(now_ms())).await {
            Ok(calls) => calls,
            Err(e) => {
                tracing::warn!(error = %e, "looking for calls left to record failed");
                continue;
            }
        };
        for call in calls {
            if !record_call(&st, &call, &shutdown).await {
                return;
            }
        }
    }
}

/// Records what is left of `call`, a chunk at a time; false when the console stops.
async fn record_call(st: &AppState, call: &str, shutdown: &watch::Receiver<bool>) -> bool {
    let one_connection = st.store.inner().shares_one_connection();
    loop {
        if *shutdown.borrow() {
            return false;
        }
        let id = call.to_owned();
        let started = tokio::time::Instant::now();
        let recorded = st
            .store
            .run(move |s| s.record_chunk(&id, now_ms(), &mut next_wakeup_id))
            .await;
        // At most half of the store's time on SQLite (one connection): the state writer,
        // which records the first chunk's `sent`, and the API would otherwise wait for the
        // whole call to be recorded. The call takes twice as long to record; its first
        // wake-ups are out before. PostgreSQL's pool lets them in meanwhile: no wait there.
        let took = started.elapsed();
        let chunk = match recorded {
            Ok(Some(chunk)) => chunk,
            Ok(None) => return true,
            Err(e) => {
                // Tried again at the next look: the chunk is still there.
                tracing::warn!(call, error = %e, "recording a call's deliveries failed");
                return true;
            }
        };
        if !chunk.dispatched_here && chunk.queued.is_empty() && chunk.failed.is_empty() {
            // Another console's call (taken over meanwhile): it records the rest.
            return true;
        }
        st.metrics.deliveries_queued(chunk.queued.len());
        publish_events(st, &chunk.failed);
        // An expired call's wake-ups would be refused by the agents: the sweep expires them.
        if chunk.dispatched_here && !chunk.queued.is_empty() && chunk.call.expires_at > now_ms() {
            let _ = st
                .dispatch
                .send(Command::Publish(chunk.call, chunk.queued))
                .await;
        }
        if one_connection {
            let mut shutdown = shutdown.clone();
            tokio::select! {
                () = tokio::time::sleep(took) => {}
                () = stopped(&mut shutdown) => return false,
            }
        }
    }
}
