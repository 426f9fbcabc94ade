//! The fan-out publishers: several connections that together send one QoS 1 wake-up to every
//! agent's topic, each keeping at most a window of unacknowledged messages in flight.
//!
//! One publisher connection is a single stream the broker reads in order, and its own TLS
//! writes and the wait for acknowledgements pace it: with 19,000 agents it was the slowest
//! part of the fan-out for every broker. Several connections, each with a share of the
//! agents (interleaved, so every worker process receives from the start), started at the
//! same moment, let the broker show its own pace; the report keeps the publishers' write time
//! next to the last arrival so that a reader can tell which one bounded the fan-out.

use std::sync::Arc;
use std::time::Duration;

use beckon_client::Event;
use beckon_mqtt::{Properties, Publish, QoS};
use bytes::Bytes;
use tokio::sync::Barrier;

use crate::conn::{ClientError, Connector, wake_topic};
use crate::protocol::unix_ns;

/// A wake-up payload is this prefix followed by the send time in Unix nanoseconds.
pub const WAKE_PREFIX: &str = "wake ";

/// One wake-up as the publishers send it: QoS 1, the send time in the payload.
pub fn wakeup(topic: String, packet_id: u16, sent_unix_ns: u64) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic,
        packet_id: Some(packet_id),
        payload: Bytes::from(format!("{WAKE_PREFIX}{sent_unix_ns}")),
        properties: Properties::default(),
    }
}

/// What the publishers did, together.
#[derive(Debug, Clone)]
pub struct PublishOutcome {
    /// Publisher connections used.
    pub publishers: usize,
    /// Wake-ups written.
    pub sent: usize,
    /// Wake-ups acknowledged by the broker (PUBACK).
    pub acked: usize,
    /// The window of each connection (the smallest, when a broker capped some).
    pub window: usize,
    /// First write of any publisher (Unix ns).
    pub started_unix_ns: u64,
    /// Last write of any publisher (Unix ns).
    pub written_unix_ns: u64,
    /// Why a publisher stopped early, if one did.
    pub error: Option<String>,
}

impl PublishOutcome {
    /// An outcome with nothing sent, for a publisher that could not start.
    pub fn failed(publishers: usize, error: String) -> Self {
        let now = unix_ns();
        Self {
            publishers,
            sent: 0,
            acked: 0,
            window: 0,
            started_unix_ns: now,
            written_unix_ns: now,
            error: Some(error),
        }
    }
}

/// Connects `publishers` connections as `{client_id}-{n}` (or `client_id` alone for one),
/// each with the password `password_for` gives for its client id (the target's when `None`),
/// and once all are connected publishes one wake-up to each agent in `agent_ids`, agent `i`
/// from connection `i % publishers`; waits at most `ack_wait` after the last write for the
/// acknowledgements. `window` bounds each connection's unacknowledged wake-ups.
pub async fn publish_wakeups(
    connector: &Arc<Connector>,
    client_id: &str,
    password_for: impl Fn(&str) -> Option<String>,
    agent_ids: &[String],
    publishers: usize,
    window: usize,
    ack_wait: Duration,
) -> Result<PublishOutcome, ClientError> {
    let publishers = publishers.clamp(1, agent_ids.len().max(1));
    // Connect first, all at once, so that connect time is not publish time.
    let connects: Vec<_> = (0..publishers)
        .map(|n| {
            let connector = connector.clone();
            let id = if publishers == 1 {
                client_id.to_owned()
            } else {
                format!("{client_id}-{n}")
            };
            let password = password_for(&id);
            tokio::spawn(async move { connector.connect_as(None, &id, password.as_deref()).await })
        })
        .collect();
    let mut conns = Vec::with_capacity(publishers);
    for connect in connects {
        match connect.await {
            Ok(result) => conns.push(result?),
            Err(e) => return Err(ClientError::Io(std::io::Error::other(e.to_string()))),
        }
    }
    let start = Arc::new(Barrier::new(publishers));
    let mut tasks = Vec::with_capacity(publishers);
    for (n, conn) in conns.into_iter().enumerate() {
        let topics: Vec<String> = agent_ids
            .iter()
            .skip(n)
            .step_by(publishers)
            .map(|id| wake_topic(id))
            .collect();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            publish_share(conn, topics, window, ack_wait, start).await
        }));
    }
    let mut outcome = PublishOutcome {
        publishers,
        sent: 0,
        acked: 0,
        window: usize::MAX,
        started_unix_ns: u64::MAX,
        written_unix_ns: 0,
        error: None,
    };
    for task in tasks {
        let share = match task.await {
            Ok(share) => share,
            Err(e) => {
                outcome
                    .error
                    .get_or_insert_with(|| format!("a publisher task failed: {e}"));
                continue;
            }
        };
        outcome.sent += share.sent;
        outcome.acked += share.acked;
        outcome.window = outcome.window.min(share.window);
        outcome.started_unix_ns = outcome.started_unix_ns.min(share.started_unix_ns);
        outcome.written_unix_ns = outcome.written_unix_ns.max(share.written_unix_ns);
        if let Some(e) = share.error {
            outcome.error.get_or_insert(e);
        }
    }
    if outcome.started_unix_ns == u64::MAX {
        outcome.started_unix_ns = unix_ns();
    }
    outcome.written_unix_ns = outcome.written_unix_ns.max(outcome.started_unix_ns);
    if outcome.window == usize::MAX {
        outcome.window = 0;
    }
    Ok(outcome)
}

/// One connection's share of the fan-out.
struct Share {
    sent: usize,
    acked: usize,
    window: usize,
    started_unix_ns: u64,
    written_unix_ns: u64,
    error: Option<String>,
}

async fn publish_share(
    mut conn: crate::conn::MqttConn,
    topics: Vec<String>,
    window: usize,
    ack_wait: Duration,
    start: Arc<Barrier>,
) -> Share {
    // The broker's Receive Maximum (v5) bounds the window; never more than 65,535 in flight.
    let window = window.min(conn.window()).clamp(1, 65_535);
    let total = topics.len();
    let mut topics = topics.into_iter();
    start.wait().await;
    let started_unix_ns = unix_ns();
    let mut written_unix_ns = None;
    let (mut sent, mut acked) = (0, 0);
    let mut error = None;
    let mut ack_deadline = None;
    while acked < total {
        // Top the session up to the window; what it queues leaves in one write.
        let session = conn.session_mut();
        while session.in_flight() + session.queued() < window {
            let Some(topic) = topics.next() else {
                break;
            };
            // The session sets the packet id.
            let now = tokio::time::Instant::now().into_std();
            if let Err(e) = session.publish(wakeup(topic, 1, unix_ns()), now) {
                error = Some(e.to_string());
                break;
            }
            sent += 1;
        }
        if error.is_some() {
            break;
        }
        if sent == total && written_unix_ns.is_none() {
            if let Err(e) = conn.flush().await {
                error = Some(e.to_string());
                break;
            }
            written_unix_ns = Some(unix_ns());
            ack_deadline = Some(tokio::time::Instant::now() + ack_wait);
        }
        let event = match ack_deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, conn.next_event()).await {
                Ok(event) => event,
                Err(_) => break,
            },
            None => conn.next_event().await,
        };
        match event {
            Ok(Event::Published { .. }) => acked += 1,
            Ok(_) => {}
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    let written_unix_ns = written_unix_ns.unwrap_or_else(unix_ns);
    conn.close().await;
    Share {
        sent,
        acked,
        window,
        started_unix_ns,
        written_unix_ns,
        error,
    }
}
