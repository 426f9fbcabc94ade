//! The console's own broker connection: publishes signed wake-ups (QoS 1, with message
//! expiry) to `agents/{id}/wake`, marks them `sent` on PUBACK, follows `agents/+/ack` and
//! `agents/+/presence`, resends what is still pending when an agent comes online (several
//! pending wake-ups for one agent go out as one message), and expires what is overdue.
//!
//! - [`link`]: the MQTT connection to the broker (the socket, and `beckon-client`'s session
//!   over it);
//! - [`incoming`]: what the broker's events change (PUBACKs, acks, presence, relay answers);
//! - [`writer`]: the state writer, which records those changes and then acknowledges them;
//! - [`resend`]: signing and publishing wake-ups, and resending what agents have not received;
//! - [`relay`]: Wake-on-LAN, sent by the console or relayed by an agent on the target's subnet;
//! - [`status`]: the push service status shown in the console;
//! - [`lease`]: the dispatch lease, by which consoles on one database take over the calls
//!   of one that stopped;
//! - [`record`]: the recorder of large calls' later chunks, each sent as it commits.

mod error;
mod incoming;
mod lease;
mod link;
mod record;
mod relay;
mod resend;
mod status;
mod writer;

use std::time::Duration;

use beckon_client::{Connection, Event};
use beckon_mqtt::{QoS, Subscription};
use tokio::sync::{mpsc, watch};

use crate::model::*;
use crate::{AppState, BrokerLink};

pub use error::LinkError;
use lease::Lease;
use link::{ACKED_BATCHES, Conn, SUBSCRIPTION};
use link::{connect, new_session, now};
pub use record::{next_wakeup_id, record};
pub use relay::{RELAY_LIFETIME_SECS, Relays, wake_on_lan};
use relay::{publish_relay, relay_not_sent};
pub use resend::{OutgoingWakeUp, merge_pending};
use resend::{publish_all, send_pending};
use status::{DIAGNOSIS_EVERY, diagnose, set_status};
use writer::{WRITE_JOBS, expire, tidy, write_states};

#[derive(Debug)]
pub enum Command {
    /// A new call: publish one wake-up per delivery.
    Publish(WakeCall, Vec<CallDelivery>),
    /// Publish a signed Wake-on-LAN relay request to `agents/{agent}/relay`.
    Relay {
        /// The relaying agent.
        agent: String,
        /// The request id (the sends recorded for it are updated on failure or answer).
        request_id: String,
        /// The signed request.
        payload: Vec<u8>,
        /// Message expiry, seconds.
        expiry_secs: u32,
    },
    /// The broker is listening now (see [`ConsoleConfig::broker_starts_later`](crate::ConsoleConfig::broker_starts_later)).
    BrokerReady,
}

/// Commands waiting for the dispatcher (calls and relay requests from the API). When full,
/// the API's handlers wait to hand theirs over: the backpressure lands on the HTTP callers,
/// whose calls are already recorded.
pub const COMMANDS: usize = 1024;

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(drop);
}

/// Runs until `shutdown`: keeps the broker connection (reconnecting with backoff) and the
/// expiry sweep.
pub async fn run(
    st: AppState,
    mut commands: mpsc::Receiver<Command>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = beckon_net::Backoff::new(beckon_net::BackoffConfig {
        base: Duration::from_millis(500),
        cap: Duration::from_secs(30),
        ..Default::default()
    })
    .ok();
    let mut last_diagnosis = None;
    if st.config.broker_starts_later && st.config.broker != BrokerLink::None {
        // `beckon up` starts the broker after the console (the broker needs the console's
        // CA): trying before it listens would only log a failure at every start.
        loop {
            tokio::select! {
                c = commands.recv() => match c {
                    Some(Command::BrokerReady) => break,
                    // Calls stay queued; they go out when the connection comes up.
                    Some(Command::Publish(..)) => {}
                    Some(Command::Relay { request_id, .. }) => relay_not_sent(&st, request_id).await,
                    None => return,
                },
                () = stopped(&mut shutdown) => return,
            }
        }
    }
    loop {
        if *shutdown.borrow() {
            return;
        }
        let result = match &st.config.broker {
            BrokerLink::None => idle(&st, &mut commands, &mut shutdown).await,
            link => session(&st, link, &mut commands, &mut shutdown).await,
        };
        if *shutdown.borrow() {
            return;
        }
        let error = match result {
            Ok(()) => "the connection closed".to_owned(),
            Err(e) => e.to_string(),
        };
        set_status(&st, false, Some(error.clone()));
        tracing::warn!(%error, "push service connection lost");
        // Not only while connected: the login throttles' old rows go away, and the agents'
        // counts are kept, without a broker.
        tidy(&st).await;
        if let BrokerLink::Tls { .. } = &st.config.broker
            && last_diagnosis.is_none_or(|t: tokio::time::Instant| t.elapsed() > DIAGNOSIS_EVERY)
        {
            last_diagnosis = Some(tokio::time::Instant::now());
            let report = tokio::select! {
                r = diagnose(&st) => r,
                () = stopped(&mut shutdown) => return,
            };
            if let Ok(mut p) = st.push.lock()
                && !p.connected
                && let Some((summary, value)) = report
            {
                p.message = format!("Push service servers are not reachable: {summary}");
                p.diagnosis = Some(value);
            }
        }
        let wait = backoff
            .as_mut()
            .map_or(Duration::from_secs(1), |b| b.next_delay());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

/// Without a broker: keep expiring calls, drop send requests (they stay queued).
async fn idle(
    st: &AppState,
    commands: &mut mpsc::Receiver<Command>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    set_status(st, false, Some("no broker connection is configured".into()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                expire(st).await;
                tidy(st).await;
            }
            c = commands.recv() => match c {
                None => return Ok(()),
                Some(Command::Relay { request_id, .. }) => relay_not_sent(st, request_id).await,
                Some(_) => {}
            },
            _ = stopped(shutdown) => return Ok(()),
        }
    }
}

async fn session(
    st: &AppState,
    link: &BrokerLink,
    commands: &mut mpsc::Receiver<Command>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let stream = connect(st, link).await?;
    let (writer, jobs) = mpsc::channel(WRITE_JOBS);
    let (acked_tx, acked) = mpsc::channel(ACKED_BATCHES);
    let storing = tokio::spawn(write_states(st.clone(), jobs, acked_tx));
    let session = new_session(&st.config.console_id);
    let mut conn = Conn::new(Connection::start(stream, session), acked, writer);
    let result = connected(st, &mut conn, commands, shutdown).await;
    // What was acknowledged before the connection ended is still written.
    conn.sync().await;
    drop(conn);
    // The state writer ends with the dispatcher's sender (everything was written above).
    let _ = storing.await;
    result
}

/// The conversation with the broker, from CONNECT until the connection ends.
async fn connected(
    st: &AppState,
    conn: &mut Conn,
    commands: &mut mpsc::Receiver<Command>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    conn.open_session().await?;
    take_in_held(st, conn).await?;
    set_status(st, true, None);
    tracing::info!("connected to the push service");

    // Everything still queued goes out now: this console's calls, and those it takes over
    // from consoles that stopped.
    let mut lease = Lease::default();
    let taken = lease.keep(st).await;
    let mut queued = st.store.run(|s| s.agents_with_queued(now_ms())).await?;
    queued.extend(taken.offline);
    queued.retain(|a| !taken.online.contains(a));
    send_pending(st, conn, taken.online, true).await?;
    send_pending(st, conn, queued, false).await?;

    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        if !conn.came_online.is_empty() {
            // The agents are back: what they have not received yet goes out again, as one.
            let agents = std::mem::take(&mut conn.came_online);
            send_pending(st, conn, agents, true).await?;
        }
        tokio::select! {
            event = conn.link.next_event() => {
                conn.take(event?).await;
                conn.drain_events().await;
                conn.hand_over().await;
                conn.acknowledge_written();
                conn.flush().await?;
            }
            // The state writer wrote these messages' changes: the PUBACKs go out. (Should the
            // writer be gone, the branch stays off instead of firing with nothing.)
            Some(ids) = conn.acked.recv() => {
                conn.acknowledge(ids);
                conn.acknowledge_written();
                conn.flush().await?;
            }
            c = commands.recv() => match c {
                Some(Command::Publish(call, deliveries)) => {
                    let messages = deliveries
                        .into_iter()
                        // Already out with a resend (queued at connect, an agent coming back).
                        .filter(|d| conn.resent.remove(&d.wakeup_id).is_none())
                        .map(|d| {
                            let agent = d.agent_id.clone();
                            let out = OutgoingWakeUp {
                                carrier: d,
                                carried: Vec::new(),
                                reason: call.reason.clone(),
                                expires_at: call.expires_at,
                                spread: call.spread,
                                action: call.action.clone(),
                            };
                            (agent, out)
                        })
                        .collect();
                    publish_all(st, conn, messages).await?;
                }
                Some(Command::Relay { agent, request_id, payload, expiry_secs }) => {
                    publish_relay(conn, &agent, request_id, payload, expiry_secs).await?;
                }
                Some(Command::BrokerReady) => {}
                None => return Ok(()),
            },
            _ = sweep.tick() => {
                conn.sync().await;
                conn.flush().await?;
                expire(st).await;
                tidy(st).await;
                let taken = lease.keep(st).await;
                // Agents online may have had their wake-ups from the stopped console (or
                // not): theirs go out again, the agent drops what it already has.
                send_pending(st, conn, taken.online, true).await?;
                send_pending(st, conn, taken.offline, false).await?;
                if commands.is_empty() {
                    // Every command made before now has been handled (the API sends it
                    // right after recording the call).
                    conn.resent
                        .retain(|_, at| at.elapsed() < Duration::from_secs(10));
                }
            }
            _ = stopped(shutdown) => {
                // What was read is written and acknowledged before the DISCONNECT.
                conn.drain_events().await;
                conn.sync().await;
                let _ = conn.flush().await;
                conn.link.disconnect().await;
                return Ok(());
            }
        }
    }
}

/// Before sending anything, takes in what the broker holds for the console: the acks
/// queued in its session while it was away (so that nothing an agent already received goes
/// out again) and the retained presence of every agent (the registry's presence is then
/// current, not what it was when the console stopped). The barrier: with Beckon's broker
/// (TLS link), a second SUBSCRIBE to the console's own retained presence, which the broker
/// queues behind everything above (QoS 1 deliveries to a session are in order); with a
/// development broker, which has no presence, PINGREQ (answered at once, so only what fits
/// in the broker's in-flight window is sure to come before it).
async fn take_in_held(st: &AppState, conn: &mut Conn) -> Result<(), LinkError> {
    let own_presence = format!("servers/{}/presence", st.config.console_id);
    let tls = matches!(st.config.broker, BrokerLink::Tls { .. });
    if tls {
        let barrier = vec![Subscription {
            filter: own_presence.clone(),
            options: SUBSCRIPTION,
        }];
        conn.link.session_mut().subscribe(barrier, now())?;
    } else {
        conn.link.session_mut().ping(now())?;
    }
    conn.flush().await?;
    conn.snapshot = Some(Vec::new());
    let mut barrier_reached = true;
    loop {
        let ready = conn.link.session_mut().poll_event();
        let event = if let Some(event) = ready {
            event
        } else {
            // All read is handled: have it written and acknowledged (one PUBACK batch), so
            // that the broker's in-flight window keeps moving.
            conn.hand_over().await;
            conn.acknowledge_written();
            match tokio::time::timeout(Duration::from_secs(10), conn.next_event()).await {
                Ok(event) => event?,
                Err(_) => {
                    // A TLS broker without tenants publishes no presence: go on without.
                    tracing::warn!(
                        "the broker sent nothing for 10 s after the console connected, not even the console's own presence (is it Beckon's broker with this tenant's file?); the registry's presence is not checked against it"
                    );
                    barrier_reached = false;
                    break;
                }
            }
        };
        match event {
            Event::Pong if !tls => break,
            // Retained: sent for this SUBSCRIBE (the live event of this very connection comes
            // first when the session kept the subscription from an earlier run).
            Event::Message(p) if tls && p.retain && p.topic == own_presence => {
                if let (QoS::AtLeastOnce, Some(id)) = (p.qos, p.packet_id) {
                    conn.changes.pubacks.push(id);
                }
                break;
            }
            other => conn.take(other).await,
        }
    }
    // The presence read is written before it is compared.
    conn.sync().await;
    let seen_online = conn.snapshot.take().unwrap_or_default();
    tracing::info!(
        agents_connected = seen_online.len(),
        "read the broker's presence after connecting"
    );
    // Only Beckon's broker with tenants (the TLS link) publishes presence; a development
    // broker has none, so its silence says nothing.
    if barrier_reached && tls {
        let at = now_ms();
        match st
            .store
            .run(move |s| s.reconcile_presence(&seen_online, at))
            .await
        {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(
                    agents = gone.len(),
                    "agents recorded online have no presence at the broker: marked offline"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconciling presence failed"),
        }
    }
    Ok(())
}
