//! What the broker's events change: PUBACKs of wake-ups and relay requests, agents' acks,
//! presence and relay answers, collected in [`Conn`]'s changes for the state writer.

use beckon_client::Event;
use beckon_identity::acl::PresenceEvent;
use beckon_identity::wakeup::{Ack, AckStage, AckStatus};
use beckon_identity::{ConnectionPath, PresenceState};
use beckon_mqtt::{Publish, QoS, ReasonCode};

use super::link::Conn;
use crate::model::*;
use crate::store::{DeliveryAdvance, DeliveryUpdate, PresenceUpdate};

/// PUBACK: the broker took the wake-up (`sent`), or refused it (`failed`).
fn handle_puback(conn: &mut Conn, packet_id: u16, code: ReasonCode) {
    if let Some(request_id) = conn.relay_inflight.remove(&packet_id) {
        if code.is_error() {
            conn.changes.relay_failures.push((
                request_id,
                format!(
                    "the broker refused the relay request (reason 0x{:02X}); check the console's permissions on the broker",
                    code.0
                ),
            ));
        }
        return;
    }
    let Some((agent, wakeup_id)) = conn.inflight.remove(&packet_id) else {
        return;
    };
    let (state, detail) = if code.is_error() {
        let detail = format!(
            "the broker refused the wake-up (reason 0x{:02X}); check the console's permissions on the broker",
            code.0
        );
        (CallState::Failed, Some(detail))
    } else {
        (CallState::Sent, None)
    };
    let update = DeliveryUpdate {
        detail,
        ..Default::default()
    };
    advance(conn, &agent, &wakeup_id, state, update);
}

/// Handles one event from the broker without waiting for anything: state changes and the
/// PUBACKs that wait for them are queued for the writer, agents that came online for
/// [`send_pending`](super::resend::send_pending). The end of the connection (a DISCONNECT
/// among them) comes from the session as its [`End`](beckon_client::End).
pub(super) fn handle_event(conn: &mut Conn, event: Event) {
    match event {
        Event::Published {
            packet_id, code, ..
        } => handle_puback(conn, packet_id, code),
        Event::Message(p) => {
            handle_publish(conn, &p);
            if let (QoS::AtLeastOnce, Some(id)) = (p.qos, p.packet_id) {
                // Acknowledged once what it changed is written (by `write_states`): if the
                // console dies before, the broker delivers it again on the next connection.
                conn.changes.pubacks.push(id);
            }
        }
        // QoS 2 is never subscribed to; CONNACK, PINGRESP and SUBACK need nothing here.
        _ => {}
    }
}

fn handle_publish(conn: &mut Conn, p: &Publish) {
    let mut levels = p.topic.split('/');
    let (Some("agents"), Some(agent), Some(kind), None) =
        (levels.next(), levels.next(), levels.next(), levels.next())
    else {
        return;
    };
    let agent = agent.to_owned();
    match kind {
        "ack" => {
            let Some(ack) = well_formed(&agent, "ack", Ack::from_json(&p.payload)) else {
                return;
            };
            let state = match ack.stage {
                AckStage::Received => CallState::Delivered,
                AckStage::Started => CallState::Started,
                AckStage::Finished => CallState::Finished,
            };
            let update = DeliveryUpdate {
                status: ack.status.map(|s| {
                    match s {
                        AckStatus::Ok => "ok",
                        AckStatus::Failed => "failed",
                        AckStatus::TimedOut => "timed_out",
                    }
                    .to_owned()
                }),
                exit_code: ack.exit_code,
                duration_ms: ack.duration_ms,
                detail: ack.detail,
            };
            advance(conn, &agent, &ack.wakeup_id, state, update);
        }
        "relay-result" => {
            let parsed = beckon_identity::relay::RelayResult::from_json(&p.payload);
            let Some(result) = well_formed(&agent, "relay result", parsed) else {
                return;
            };
            let sends = result
                .sends
                .into_iter()
                .map(|s| (s.mac, s.destination, s.packets, s.error))
                .collect();
            conn.changes
                .relay_results
                .push((agent, result.request_id, sends));
        }
        "presence" => {
            if p.payload.is_empty() {
                return;
            }
            let parsed = PresenceEvent::from_json(&p.payload);
            let Some(ev) = well_formed(&agent, "presence event", parsed) else {
                return;
            };
            let presence = match ev.state {
                PresenceState::Connected => Presence::Online,
                PresenceState::Disconnected => Presence::Offline,
            };
            let path = match ev.path {
                ConnectionPath::Mqtts => "8883",
                ConnectionPath::SharedMqtt => "443-mqtt",
                ConnectionPath::SharedWebSocket => "443-websocket",
                ConnectionPath::Plain => "1883",
            };
            let path = if ev.via_proxy == Some(true) {
                format!("{path} via proxy")
            } else {
                path.to_owned()
            };
            if presence == Presence::Online {
                // While the console takes in the broker's presence after connecting, an agent
                // online by the retained state or by a live event in the meantime is online:
                // the reconciliation must not mark it offline.
                if let Some(seen) = &mut conn.snapshot {
                    seen.push(agent.clone());
                }
                // Only a live event says the agent just came (back): what it was sent goes
                // out again. With the retained state it waits in its session at the broker.
                if !p.retain && !conn.came_online.contains(&agent) {
                    conn.came_online.push(agent.clone());
                }
            }
            conn.changes.presence.push(PresenceUpdate {
                agent_id: agent,
                presence,
                at: ev.at,
                path: Some(path),
                remote_addr: Some(ev.remote_addr),
            });
        }
        _ => {}
    }
}

/// Queues a state change for the writer.
pub(super) fn advance(
    conn: &mut Conn,
    agent: &str,
    wakeup_id: &str,
    state: CallState,
    update: DeliveryUpdate,
) {
    conn.changes.advances.push(DeliveryAdvance {
        agent_id: agent.to_owned(),
        wakeup_id: wakeup_id.to_owned(),
        state,
        update,
        at: now_ms(),
    });
}

/// The message an agent sent, when it parsed; a malformed one is logged (as a malformed
/// `what`) and ignored.
fn well_formed<T, E: std::fmt::Display>(
    agent: &str,
    what: &str,
    parsed: Result<T, E>,
) -> Option<T> {
    parsed
        .map_err(|e| tracing::warn!(%agent, error = %e, "ignoring a malformed {what}"))
        .ok()
}

#[cfg(test)]
mod tests {
    use beckon_client::Connection;
    use beckon_mqtt::{ConnAck, Packet, Properties, ProtocolVersion};
    use bytes::{Bytes, BytesMut};
    use tokio::io::{AsyncWriteExt, DuplexStream};
    use tokio::sync::mpsc;

    use super::*;
    use crate::dispatch::link::new_session;
    use crate::dispatch::writer::WriteJob;

    /// A connection's dispatcher state over our end of an in-memory stream (the broker's
    /// end is the other), with the state writer's queue and acknowledgement channel.
    fn conn_over(
        stream: DuplexStream,
        writer: mpsc::Sender<WriteJob>,
        acked: mpsc::Receiver<Vec<u16>>,
    ) -> Conn {
        Conn::new(
            Connection::start(
                Box::new(stream),
                new_session(crate::store::DEFAULT_CONSOLE_ID),
            ),
            acked,
            writer,
        )
    }

    /// A connection's dispatcher state with nothing behind it.
    fn conn() -> Conn {
        let (ours, _broker) = tokio::io::duplex(1024);
        let (writer, _) = mpsc::channel(1);
        let (_, acked) = mpsc::channel(1);
        conn_over(ours, writer, acked)
    }

    /// An agent's `received` ack of `wakeup_id`, as the broker delivers it (QoS 1).
    fn ack(agent: &str, wakeup_id: &str, packet_id: u16) -> Publish {
        let ack = Ack {
            wakeup_id: wakeup_id.into(),
            stage: AckStage::Received,
            status: None,
            exit_code: None,
            duration_ms: None,
            at: 1_000,
            detail: None,
        };
        Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: format!("agents/{agent}/ack"),
            packet_id: Some(packet_id),
            payload: Bytes::from(ack.to_json()),
            properties: Properties::default(),
        }
    }

    fn encoded(packet: &Packet) -> BytesMut {
        let mut bytes = BytesMut::new();
        beckon_mqtt::encode(packet, ProtocolVersion::V5, &mut bytes).unwrap();
        bytes
    }

    #[tokio::test]
    async fn a_flood_of_acks_waits_in_bounded_queues_while_the_state_writer_is_slow() {
        use std::collections::HashSet;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        use crate::dispatch::writer::{MAX_WRITE_BATCH, WRITE_JOBS};

        // What the console holds at most: the bytes in the stream's buffer and in the
        // session's read buffer (at most two of its largest reads), the writer's queue
        // (batches of at most MAX_WRITE_BATCH), and the one batch the dispatcher waits to
        // hand over.
        const STREAM_BUFFER: usize = 64 * 1024;
        const LARGEST_READ: usize = 64 * 1024;
        let packet_len = encoded(&Packet::Publish(ack("a99", "w99999", 65_535))).len();
        let in_transit = (STREAM_BUFFER + 2 * LARGEST_READ) / packet_len + 1;
        let queued = (WRITE_JOBS + 1) * MAX_WRITE_BATCH;
        let bound = in_transit + queued;
        let total = 3 * bound;
        let (ours, broker) = tokio::io::duplex(STREAM_BUFFER);
        let (writer, mut jobs) = mpsc::channel(WRITE_JOBS);
        let (written, acked) = mpsc::channel(1);
        let mut conn = conn_over(ours, writer, acked);

        // The broker: takes in what the console writes, accepts its CONNECT and sends acks
        // as fast as the console reads them.
        let (mut from_console, mut to_console) = tokio::io::split(broker);
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_console, &mut tokio::io::sink()).await;
        });
        let taken = Arc::new(AtomicUsize::new(0));
        let counter = taken.clone();
        let sender = tokio::spawn(async move {
            let connack = encoded(&Packet::ConnAck(ConnAck::default()));
            to_console.write_all(&connack).await.unwrap();
            for i in 0..total {
                let id = u16::try_from(i % 65_535 + 1).unwrap();
                let packet = ack(&format!("a{}", i % 100), &format!("w{i}"), id);
                to_console
                    .write_all(&encoded(&Packet::Publish(packet)))
                    .await
                    .unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
            }
            to_console.shutdown().await.unwrap();
        });
        // The dispatcher's reading loop (as in `connected`), until the broker is done.
        let dispatcher = tokio::spawn(async move {
            while let Ok(event) = conn.next_event().await {
                conn.take(event).await;
                conn.drain_events().await;
                conn.hand_over().await;
            }
            conn.hand_over().await;
        });

        // The state writer is stalled: the flood stops at the bound and stays there.
        let mut last = usize::MAX;
        for _ in 0..200 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let now = taken.load(Ordering::SeqCst);
            if now == last {
                break;
            }
            last = now;
        }
        let held = taken.load(Ordering::SeqCst);
        assert!(held <= bound, "{held} acks taken in, more than {bound}");
        assert_eq!(jobs.len(), WRITE_JOBS, "the writer's queue is full");
        assert!(
            held >= STREAM_BUFFER / packet_len,
            "{held} acks taken in: the stream is not full"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(taken.load(Ordering::SeqCst), held, "no more taken in");
        assert_eq!(jobs.len(), WRITE_JOBS);
        assert!(!sender.is_finished());
        drop(written);

        // The writer catches up: every ack arrives once, with its PUBACK.
        let mut wakeups = HashSet::new();
        let mut pubacks = 0;
        while let Some(job) = jobs.recv().await {
            if let WriteJob::Changes(c) = job {
                assert!(c.advances.len() <= MAX_WRITE_BATCH);
                pubacks += c.pubacks.len();
                for a in c.advances {
                    assert_eq!(a.state, CallState::Delivered);
                    assert!(wakeups.insert(a.wakeup_id), "delivered twice");
                }
            }
        }
        sender.await.unwrap();
        dispatcher.await.unwrap();
        assert_eq!(wakeups.len(), total);
        assert_eq!(pubacks, total);
    }

    fn presence(agent: &str, state: PresenceState, retain: bool, packet_id: u16) -> Event {
        let event = PresenceEvent {
            state,
            at: 1_000,
            reason: None,
            remote_addr: "127.0.0.1:40000".into(),
            path: ConnectionPath::Mqtts,
            via_proxy: Some(false),
            node: None,
        };
        Event::Message(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain,
            topic: format!("agents/{agent}/presence"),
            packet_id: Some(packet_id),
            payload: Bytes::from(event.to_json()),
            properties: Properties::default(),
        })
    }

    #[tokio::test]
    async fn agents_coming_online_while_presence_is_taken_in_count_as_online() {
        let mut conn = conn();
        conn.snapshot = Some(Vec::new());
        // Retained state: online before the console connected.
        handle_event(&mut conn, presence("a1", PresenceState::Connected, true, 1));
        // Live, during the take-in: connected just now.
        handle_event(
            &mut conn,
            presence("a2", PresenceState::Connected, false, 2),
        );
        // Live, during the take-in: gone.
        handle_event(
            &mut conn,
            presence("a3", PresenceState::Disconnected, false, 3),
        );
        assert_eq!(
            conn.snapshot.as_deref(),
            Some(&["a1".to_owned(), "a2".to_owned()][..])
        );
        // Only the live arrival gets what it was sent again.
        assert_eq!(conn.came_online, ["a2".to_owned()]);
        let recorded: Vec<(&str, Presence)> = conn
            .changes
            .presence
            .iter()
            .map(|p| (p.agent_id.as_str(), p.presence))
            .collect();
        assert_eq!(
            recorded,
            [
                ("a1", Presence::Online),
                ("a2", Presence::Online),
                ("a3", Presence::Offline)
            ]
        );
        assert_eq!(conn.changes.pubacks, [1, 2, 3]);
    }

    #[tokio::test]
    async fn outside_the_take_in_a_live_arrival_is_only_a_comeback() {
        let mut conn = conn();
        handle_event(
            &mut conn,
            presence("a2", PresenceState::Connected, false, 7),
        );
        assert!(conn.snapshot.is_none());
        assert_eq!(conn.came_online, ["a2".to_owned()]);
    }
}
