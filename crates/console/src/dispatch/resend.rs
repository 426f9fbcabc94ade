//! Signing and publishing wake-ups: a call's deliveries as they come, and what agents have
//! not received yet (at connect, when they come back), merged into one message per agent and
//! action.

use beckon_identity::wakeup::{MAX_TEXT_LEN, WakeUp, WakeUpError, WakeUpSigner};
use beckon_mqtt::{Properties, Publish, QoS};
use bytes::Bytes;

use super::LinkError;
use super::incoming::advance;
use super::link::{Conn, KEEP_ALIVE};
use crate::AppState;
use crate::model::*;
use crate::store::DeliveryUpdate;

/// One wake-up message to publish, standing for one or more pending deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingWakeUp {
    /// The delivery whose wake-up id the message carries (the newest).
    pub carrier: CallDelivery,
    /// Wake-up ids of the other deliveries the message stands for.
    pub carried: Vec<String>,
    /// The distinct reasons, joined.
    pub reason: String,
    /// The latest expiry, unix ms.
    pub expires_at: Millis,
    /// The smallest spread.
    pub spread: u32,
    /// The shared action.
    pub action: Option<String>,
}

type Pending<'a> = Vec<&'a (WakeCall, CallDelivery)>;

/// The messages to publish for an agent's pending deliveries: one per distinct action (the
/// wake-up format carries one action), each carried by the newest delivery of its group.
pub fn merge_pending(pending: &[(WakeCall, CallDelivery)]) -> Vec<OutgoingWakeUp> {
    let mut groups: Vec<(Option<String>, Pending<'_>)> = Vec::new();
    for p in pending {
        match groups.iter_mut().find(|(a, _)| *a == p.0.action) {
            Some((_, v)) => v.push(p),
            None => groups.push((p.0.action.clone(), vec![p])),
        }
    }
    groups
        .into_iter()
        .filter_map(|(action, items)| {
            let (_, carrier) = items.last()?;
            let mut reasons: Vec<&str> = Vec::new();
            for (c, _) in &items {
                if !c.reason.is_empty() && !reasons.contains(&c.reason.as_str()) {
                    reasons.push(&c.reason);
                }
            }
            let mut reason = reasons.join(", ");
            if reason.len() > MAX_TEXT_LEN {
                reason.truncate(reason.floor_char_boundary(MAX_TEXT_LEN));
            }
            let expires_at = items.iter().map(|(c, _)| c.expires_at).max()?;
            let spread = items.iter().map(|(c, _)| c.spread).min()?;
            let carried: Vec<String> = items
                .iter()
                .filter(|(_, d)| d.wakeup_id != carrier.wakeup_id)
                .map(|(_, d)| d.wakeup_id.clone())
                .collect();
            Some(OutgoingWakeUp {
                carrier: carrier.clone(),
                carried,
                reason,
                expires_at,
                spread,
                action,
            })
        })
        .collect()
}

/// Publishes what `agents` have not received yet (`queued`, and with `include_sent` also
/// `sent`): one store trip for all of them, then one message per agent and distinct action.
pub(super) async fn send_pending(
    st: &AppState,
    conn: &mut Conn,
    mut agents: Vec<String>,
    include_sent: bool,
) -> Result<(), LinkError> {
    if agents.is_empty() {
        return Ok(());
    }
    agents.sort_unstable();
    agents.dedup();
    // The pending list must see the latest states (a `sent` not yet written would go out
    // twice) and the presence just received.
    conn.sync().await;
    let pending = st
        .store
        .run(move |s| s.pending_for_agents(&agents, now_ms()))
        .await;
    let pending = match pending {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "reading pending wake-ups failed");
            return Ok(());
        }
    };
    let mut messages = Vec::new();
    let mut merged: Vec<(Vec<String>, String)> = Vec::new();
    for (agent, list) in pending {
        let list: Vec<_> = list
            .into_iter()
            .filter(|(_, d)| include_sent || d.state == CallState::Queued)
            .collect();
        for out in merge_pending(&list) {
            let now = tokio::time::Instant::now();
            conn.resent.insert(out.carrier.wakeup_id.clone(), now);
            for id in &out.carried {
                conn.resent.insert(id.clone(), now);
            }
            if !out.carried.is_empty() {
                merged.push((out.carried.clone(), out.carrier.wakeup_id.clone()));
            }
            messages.push((agent.clone(), out));
        }
    }
    if !merged.is_empty()
        && let Err(e) = st
            .store
            .run(move |s| {
                for (carried, carrier) in &merged {
                    s.set_carried_by(carried, carrier)?;
                }
                Ok(())
            })
            .await
    {
        tracing::warn!(error = %e, "recording merged wake-ups failed");
    }
    st.metrics.resent(messages.len());
    publish_all(st, conn, messages).await
}

/// Wake-ups signed per batch on the blocking pool.
const SIGN_BATCH: usize = 256;
/// Batches signed ahead of the one being written.
const SIGN_AHEAD: usize = 3;

/// The signed payload of one wake-up.
fn sign_wakeup(
    signer: &WakeUpSigner,
    tenant: &str,
    agent: &str,
    out: &OutgoingWakeUp,
    now: Millis,
) -> Result<Vec<u8>, WakeUpError> {
    let wakeup = WakeUp {
        v: beckon_identity::wakeup::WAKEUP_VERSION,
        id: out.carrier.wakeup_id.clone(),
        tenant: tenant.to_owned(),
        agent: agent.to_owned(),
        reason: out.reason.clone(),
        issued_at: now.div_euclid(1000),
        expires_at: out.expires_at.div_euclid(1000),
        spread: out.spread,
        action: out.action.clone(),
    };
    signer.sign(&wakeup)
}

type Signed = Vec<(String, OutgoingWakeUp, Result<Vec<u8>, WakeUpError>)>;

/// Signs and publishes wake-ups (QoS 1, message expiry = time left), each signed on its own
/// as `wake-up.md` describes. Signing runs on the blocking pool a few batches ahead of the
/// writing, so that it overlaps with the broker's work and uses every core; the writing
/// keeps within the broker's Receive Maximum, reading PUBACKs and acks while it waits.
pub(super) async fn publish_all(
    st: &AppState,
    conn: &mut Conn,
    messages: Vec<(String, OutgoingWakeUp)>,
) -> Result<(), LinkError> {
    let mut batches = Vec::new();
    let mut rest = messages.into_iter().peekable();
    while rest.peek().is_some() {
        batches.push(rest.by_ref().take(SIGN_BATCH).collect::<Vec<_>>());
    }
    let mut batches = batches.into_iter();
    let mut signing: std::collections::VecDeque<tokio::task::JoinHandle<Signed>> =
        std::collections::VecDeque::new();
    let start_signing = |batch: Vec<(String, OutgoingWakeUp)>| {
        let signer = st.signer.clone();
        let tenant = st.tenant.to_string();
        tokio::task::spawn_blocking(move || {
            let now = now_ms();
            batch
                .into_iter()
                .map(|(agent, out)| {
                    let payload = sign_wakeup(&signer, &tenant, &agent, &out, now);
                    (agent, out, payload)
                })
                .collect::<Signed>()
        })
    };
    loop {
        while signing.len() <= SIGN_AHEAD {
            match batches.next() {
                Some(b) => signing.push_back(start_signing(b)),
                None => break,
            }
        }
        let Some(next) = signing.pop_front() else {
            break;
        };
        let signed = next.await?;
        for (agent, out, payload) in signed {
            match payload {
                Ok(payload) => publish_signed(conn, &agent, &out, payload).await?,
                Err(e) => {
                    let update = DeliveryUpdate {
                        detail: Some(format!("the wake-up could not be signed: {e}")),
                        ..Default::default()
                    };
                    advance(
                        conn,
                        &agent,
                        &out.carrier.wakeup_id,
                        CallState::Failed,
                        update,
                    );
                }
            }
        }
        // Between batches: out with what is queued, in with what the broker sent.
        conn.flush().await?;
        conn.drain_events().await;
        conn.acknowledge_written();
        conn.flush().await?;
        conn.hand_over().await;
    }
    conn.flush().await?;
    conn.hand_over().await;
    Ok(())
}

/// Queues one signed wake-up, first waiting (reading PUBACKs and acks) while the broker's
/// Receive Maximum is used up.
async fn publish_signed(
    conn: &mut Conn,
    agent: &str,
    out: &OutgoingWakeUp,
    payload: Vec<u8>,
) -> Result<(), LinkError> {
    wait_for_window(conn).await?;
    let now = now_ms();
    let expiry_secs = ((out.expires_at - now) / 1000).max(1);
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: beckon_identity::acl::wake_topic(agent),
        packet_id: None,
        payload: Bytes::from(payload),
        properties: Properties::from(beckon_mqtt::PropertySet {
            message_expiry_interval: Some(u32::try_from(expiry_secs).unwrap_or(u32::MAX)),
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            ..Default::default()
        }),
    };
    let pid = conn.publish(publish)?;
    conn.inflight
        .insert(pid, (agent.to_owned(), out.carrier.wakeup_id.clone()));
    Ok(())
}

/// Waits (reading PUBACKs and acks, and handing their changes to the writer, which
/// acknowledges the acks) until one more QoS 1 publish fits in the broker's Receive Maximum.
/// The session would queue it in order anyway; waiting here keeps reading while the
/// console publishes a large call, and ends a connection on which no PUBACK comes.
pub(super) async fn wait_for_window(conn: &mut Conn) -> Result<(), LinkError> {
    let full = |conn: &Conn| {
        let session = conn.link.session();
        session.in_flight() + session.queued() >= conn.window
    };
    while full(conn) {
        conn.acknowledge_written();
        let event = tokio::time::timeout(KEEP_ALIVE * 3 / 2, conn.next_event())
            .await
            .map_err(|_| LinkError::NoPubAck)??;
        conn.take(event).await;
        conn.drain_events().await;
        conn.hand_over().await;
    }
    Ok(())
}
