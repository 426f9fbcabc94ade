//! The state writer: records the delivery states, presence and relay answers the dispatcher
//! collects, in batches beside the broker connection, then acknowledges the broker's messages
//! they came from and tells live listeners.

use tokio::sync::{mpsc, oneshot};

use crate::AppState;
use crate::model::*;
use crate::store::{DeliveryAdvance, PresenceUpdate};

pub(super) async fn expire(st: &AppState) {
    match st.store.run(|s| s.expire_due(now_ms())).await {
        Ok(changed) => publish_events(st, &changed),
        Err(e) => tracing::warn!(error = %e, "expiring wake-ups failed"),
    }
}

/// Every second, with or without a broker: deletes the failed logins and enrollments that
/// left the throttles' window ([`crate::guard::sweep`]), those of every console on the
/// database, and folds the changes of the agents' counts into the counts.
pub(super) async fn tidy(st: &AppState) {
    if let Err(e) = st.store.run(|s| crate::guard::sweep(s, now_ms())).await {
        tracing::warn!(error = %e, "deleting old failed logins and enrollments failed");
    }
    if let Err(e) = st.store.run(|s| s.fold_agent_counts()).await {
        tracing::warn!(error = %e, "folding the changes of the agents' counts failed");
    }
}

pub(super) fn publish_events(st: &AppState, changed: &[CallDelivery]) {
    for d in changed {
        st.metrics.delivery_changed(d.state);
        let _ = st.events.send(CallEvent {
            call_id: d.call_id.clone(),
            agent_id: d.agent_id.clone(),
            state: d.state,
            at: now_ms(),
        });
    }
}

/// What the dispatcher collected since it last handed over to [`write_states`].
#[derive(Default)]
pub(super) struct Changes {
    /// State changes from PUBACKs and acks.
    pub(super) advances: Vec<DeliveryAdvance>,
    /// Presence changes.
    pub(super) presence: Vec<PresenceUpdate>,
    /// Answers of relaying agents: (agent, request id, (MAC, destination, packets, error)).
    pub(super) relay_results: Vec<RelayAnswer>,
    /// Relay requests the broker refused: (request id, why).
    pub(super) relay_failures: Vec<(String, String)>,
    /// Packet ids of the QoS 1 messages (acks, presence, relay results) these changes come
    /// from: acknowledged once the changes are written, so that a console killed before
    /// gets them again from its session at the broker.
    pub(super) pubacks: Vec<u16>,
}

pub(super) type RelayAnswer = (String, String, Vec<(String, String, u32, Option<String>)>);

impl Changes {
    pub(super) fn is_empty(&self) -> bool {
        self.advances.is_empty()
            && self.presence.is_empty()
            && self.relay_results.is_empty()
            && self.relay_failures.is_empty()
            && self.pubacks.is_empty()
    }

    /// Whether the batch should go to the writer now: [`MAX_WRITE_BATCH`] rows, or as many
    /// PUBACKs waiting.
    pub(super) fn is_full(&self) -> bool {
        self.len() >= MAX_WRITE_BATCH || self.pubacks.len() >= MAX_WRITE_BATCH
    }

    /// Rows to write.
    pub(super) fn len(&self) -> usize {
        self.advances.len()
            + self.presence.len()
            + self.relay_results.len()
            + self.relay_failures.len()
    }

    pub(super) fn append(&mut self, mut other: Changes) {
        self.advances.append(&mut other.advances);
        self.presence.append(&mut other.presence);
        self.relay_results.append(&mut other.relay_results);
        self.relay_failures.append(&mut other.relay_failures);
        self.pubacks.append(&mut other.pubacks);
    }
}

/// Work for [`write_states`].
pub(super) enum WriteJob {
    Changes(Changes),
    /// Answered once everything sent before it is written.
    Sync(oneshot::Sender<()>),
}

/// Batches waiting for the state writer. When the store is slow and this is full, the
/// dispatcher waits before handing over more and stops reading the broker's stream (see
/// [`INCOMING_WINDOW`](super::link::INCOMING_WINDOW)).
pub(super) const WRITE_JOBS: usize = 4;

/// Most state changes written in one transaction (below the live-event channel's 4096, so
/// that one transaction's events never overrun a listener that keeps up).
pub(super) const MAX_WRITE_BATCH: usize = 2048;

/// Writes state changes and presence beside the broker connection, so that reading acks and
/// publishing never wait for the database: whatever arrived while one transaction ran goes
/// into the next (group commit). Live listeners hear of a change once it is written, and the
/// broker gets the PUBACKs of the messages a batch came from once it is written (their ids
/// go back to the dispatcher in one message on `acked`, which acknowledges them in the
/// session, so that its in-flight window towards the console keeps moving).
pub(super) async fn write_states(
    st: AppState,
    mut jobs: mpsc::Receiver<WriteJob>,
    acked: mpsc::Sender<Vec<u16>>,
) {
    while let Some(first) = jobs.recv().await {
        let mut batch = Changes::default();
        let mut syncs = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                WriteJob::Changes(c) => batch.append(c),
                WriteJob::Sync(s) => syncs.push(s),
            }
            if batch.len() < MAX_WRITE_BATCH {
                next = jobs.try_recv().ok();
            }
        }
        let Changes {
            advances,
            presence,
            relay_results,
            relay_failures,
            pubacks,
        } = batch;
        let mut written = true;
        if !advances.is_empty()
            || !presence.is_empty()
            || !relay_results.is_empty()
            || !relay_failures.is_empty()
        {
            let result = st
                .store
                .run(move |s| {
                    // Relay records are kept apart: one that cannot be written is logged
                    // and does not hold back the acks of everything else.
                    for (request_id, error) in &relay_failures {
                        if let Err(e) = s.fail_relay(request_id, error) {
                            tracing::warn!(error = %e, "recording a relay failure failed");
                        }
                    }
                    for (via, request_id, sends) in &relay_results {
                        match s.record_relay_result(via, request_id, sends) {
                            Ok(recorded) => {
                                for r in &recorded {
                                    tracing::info!(via = %via, target = %r.agent_id, mac = %r.mac, destination = %r.destination, packets = r.packets, error = ?r.error, "Wake-on-LAN relayed");
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "recording a relay result failed"),
                        }
                    }
                    if !presence.is_empty() {
                        s.set_presences(presence)?;
                    }
                    if advances.is_empty() {
                        return Ok(Vec::new());
                    }
                    s.advance_deliveries(advances)
                })
                .await;
            match result {
                Ok(changed) => publish_events(&st, &changed),
                Err(e) => {
                    // Not acknowledged: the broker delivers these messages again after the
                    // next reconnect.
                    tracing::warn!(
                        error = %e,
                        "recording delivery states and presence failed; the broker delivers the messages again after the next reconnect"
                    );
                    written = false;
                }
            }
        }
        if written && !pubacks.is_empty() {
            // A closed connection shows up on the dispatcher's side.
            let _ = acked.send(pubacks).await;
        }
        for s in syncs {
            let _ = s.send(());
        }
    }
}
