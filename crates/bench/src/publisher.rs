//! The fan-out publisher: one connection that sends one QoS 1 wake-up to every agent's topic,
//! keeping at most a window of unacknowledged messages in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use beckon_mqtt::{Packet, Properties, Publish, QoS};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, Semaphore};

use crate::conn::{ClientError, Connector, recv_split, wake_topic};
use crate::protocol::unix_ns;

/// A wake-up payload is this prefix followed by the send time in Unix nanoseconds.
pub const WAKE_PREFIX: &str = "wake ";

/// Flush the write buffer once it holds this much.
const WRITE_BATCH: usize = 32 * 1024;

/// What the publisher did.
#[derive(Debug, Clone)]
pub struct PublishOutcome {
    /// Wake-ups written.
    pub sent: usize,
    /// Wake-ups acknowledged by the broker (PUBACK).
    pub acked: usize,
    /// The window used.
    pub window: usize,
    /// First write (Unix ns).
    pub started_unix_ns: u64,
    /// Last write (Unix ns).
    pub written_unix_ns: u64,
    /// Why the publisher stopped early, if it did.
    pub error: Option<String>,
}

/// Connects as `client_id` and publishes one wake-up to each agent in `agent_ids`, waiting at
/// most `ack_wait` after the last write for the acknowledgements.
pub async fn publish_wakeups(
    connector: &Connector,
    client_id: &str,
    agent_ids: &[String],
    window: usize,
    ack_wait: Duration,
) -> Result<PublishOutcome, ClientError> {
    let conn = connector.connect(None, client_id).await?;
    // Honour the broker's Receive Maximum (v5); never more than 65,535 in flight.
    let window = window
        .min(conn.receive_maximum().map_or(usize::MAX, usize::from))
        .clamp(1, 65_535);
    let crate::conn::SplitConn {
        mut read,
        mut write,
        mut buf,
        version,
    } = conn.into_split();

    let permits = Arc::new(Semaphore::new(window));
    let acked = Arc::new(AtomicUsize::new(0));
    let all_acked = Arc::new(Notify::new());
    let total = agent_ids.len();
    let reader = {
        let permits = permits.clone();
        let acked = acked.clone();
        let all_acked = all_acked.clone();
        tokio::spawn(async move {
            loop {
                match recv_split(&mut read, &mut buf, version).await {
                    Ok(Packet::PubAck(_)) => {
                        permits.add_permits(1);
                        if acked.fetch_add(1, Ordering::Relaxed) + 1 >= total {
                            all_acked.notify_one();
                        }
                    }
                    Ok(Packet::Disconnect(d)) => {
                        all_acked.notify_one();
                        return Some(ClientError::Disconnected(d.code));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        all_acked.notify_one();
                        // Unblock the writer, which would otherwise wait for permits forever.
                        permits.close();
                        return Some(e);
                    }
                }
            }
        })
    };

    let mut out = BytesMut::with_capacity(WRITE_BATCH * 2);
    let started_unix_ns = unix_ns();
    let mut sent = 0;
    let mut error = None;
    for (n, agent_id) in agent_ids.iter().enumerate() {
        let permit = match permits.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                // Out of window: write what is buffered, then wait for an acknowledgement.
                if let Err(e) = flush(&mut write, &mut out).await {
                    error = Some(e.to_string());
                    break;
                }
                match permits.acquire().await {
                    Ok(p) => p,
                    Err(_) => break,
                }
            }
        };
        permit.forget();
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: wake_topic(agent_id),
            // Identifiers cycle through 1..=65535; with at most `window` (<= 65,535) in
            // flight, an identifier comes back only after its acknowledgement.
            packet_id: Some(u16::try_from(n % 65_535 + 1).unwrap_or(1)),
            payload: Bytes::from(format!("{WAKE_PREFIX}{}", unix_ns())),
            properties: Properties::default(),
        };
        if let Err(e) = beckon_mqtt::encode(&Packet::Publish(publish), version, &mut out) {
            error = Some(e.to_string());
            break;
        }
        sent += 1;
        if out.len() >= WRITE_BATCH
            && let Err(e) = flush(&mut write, &mut out).await
        {
            error = Some(e.to_string());
            break;
        }
    }
    if error.is_none()
        && let Err(e) = flush(&mut write, &mut out).await
    {
        error = Some(e.to_string());
    }
    let written_unix_ns = unix_ns();
    if acked.load(Ordering::Relaxed) < sent {
        let _ = tokio::time::timeout(ack_wait, all_acked.notified()).await;
    }
    reader.abort();
    if let Ok(Some(e)) = reader.await
        && error.is_none()
        && acked.load(Ordering::Relaxed) < sent
    {
        error = Some(e.to_string());
    }
    let _ = write.shutdown().await;
    Ok(PublishOutcome {
        sent,
        acked: acked.load(Ordering::Relaxed),
        window,
        started_unix_ns,
        written_unix_ns,
        error,
    })
}

async fn flush(
    write: &mut tokio::io::WriteHalf<Box<dyn crate::conn::Io>>,
    out: &mut BytesMut,
) -> Result<(), ClientError> {
    if !out.is_empty() {
        write.write_all(out).await?;
        write.flush().await?;
        out.clear();
    }
    Ok(())
}
