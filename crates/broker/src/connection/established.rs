//! The established phase of a connection: frames from the client become events for the
//! core, and what the core queues in the outbox is written, until either side ends it.

use std::time::Duration;

use beckon_mqtt::{
    Connect, Disconnect, Packet, Properties, ProtocolVersion, ReasonCode, encode, frame_len,
};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, sleep_until, timeout};

use super::{
    CLOSE_TIMEOUT, ConnectionContext, LINGER, log_decode_error, log_read_error, next_packet,
    read_some, send_final,
};
use crate::core::{CloseReason, ConnId, effective_keep_alive};
use crate::core_task::Event;
use crate::outbox::{Outbox, OutboxState};
use crate::tenancy::{Inbound, TopicMap};

/// An established connection: what its reading and writing share. Lives on the
/// connection task's stack for the connection's lifetime, so it only borrows.
pub(super) struct Link<'a> {
    pub(super) context: &'a ConnectionContext,
    pub(super) outbox: &'a Outbox,
    pub(super) conn: ConnId,
    pub(super) version: ProtocolVersion,
    /// The keep alive the CONNECT asked for (the CONNACK may set another).
    pub(super) client_keep_alive: u16,
}

fn disconnect(code: ReasonCode) -> Packet {
    Packet::Disconnect(Disconnect {
        code,
        properties: Properties::default(),
    })
}

impl Link<'_> {
    /// The established phase. Returns why the connection ended, or `None` when the broker
    /// closed it (after `Action::Close`, a slow-consumer abort, or shutdown).
    pub(super) async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        map: &mut TopicMap,
        rbuf: &mut BytesMut,
    ) -> Option<CloseReason> {
        let (metrics, events, outbox) = (&self.context.metrics, &self.context.events, self.outbox);
        let (conn, version, max) = (self.conn, self.version, self.context.max_packet_size);
        // Until the CONNACK sets it, no keep-alive deadline applies.
        let mut keep_alive: Option<Duration> = None;
        let far = Duration::from_secs(100 * 365 * 24 * 3600);
        let ka_sleep = sleep_until(Instant::now() + far);
        tokio::pin!(ka_sleep);
        loop {
            // Whole packets already buffered (e.g. sent right behind CONNECT) first.
            loop {
                // Take a slot in the core's queue before decoding, so that no decoded packet is
                // held across an await (it would enlarge every connection's state).
                let whole = matches!(frame_len(rbuf, max), Ok(Some(n)) if rbuf.len() >= n);
                let permit = if whole {
                    // While the core's queue is full, keep writing what the core sends: a client
                    // that pipelines many QoS 1 messages would otherwise see its acknowledgements
                    // pile up unwritten until the outbound limit took it for a slow consumer.
                    loop {
                        tokio::select! {
                            biased;
                            p = events.reserve() => match p {
                                Ok(p) => break Some(p),
                                Err(_) => return None,
                            },
                            () = outbox.changed() => {
                                match Box::pin(self.flush(stream, map, &mut keep_alive)).await {
                                    Flushed::Open => {}
                                    Flushed::ClosedByBroker => return None,
                                    Flushed::WriteFailed => return Some(CloseReason::Transport),
                                }
                            }
                        }
                    }
                } else {
                    None
                };
                match next_packet(rbuf, version, max) {
                    Ok(Some(packet)) => {
                        if let Some(ka) = keep_alive {
                            ka_sleep.as_mut().reset(Instant::now() + ka * 3 / 2);
                        }
                        match map.inbound(packet) {
                            Inbound::Forward(packet) => {
                                if let Some(permit) = permit {
                                    permit.send(Event::Packet { conn, packet });
                                }
                            }
                            Inbound::Reply(packet) => {
                                metrics.denied(match packet {
                                    Packet::SubAck(_) | Packet::UnsubAck(_) => "subscribe",
                                    _ => "publish",
                                });
                                // Refusals are few and small; a full queue means the client
                                // does not read, which the core's next push notices.
                                let _ = outbox.push(packet);
                            }
                            Inbound::Drop => metrics.denied("publish"),
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log_decode_error(self.context, &e, "a packet");
                        if version == ProtocolVersion::V5 {
                            Box::pin(send_final(stream, disconnect(e.reason_code()), version))
                                .await;
                        }
                        return Some(CloseReason::ProtocolViolation);
                    }
                }
            }
            if rbuf.is_empty() {
                // Release the read buffer while idle. Once a packet was split off, an empty
                // buffer may show no capacity and still keep the whole read alive.
                *rbuf = BytesMut::new();
            }
            tokio::select! {
                biased;
                () = outbox.changed() => {
                    match Box::pin(self.flush(stream, map, &mut keep_alive)).await {
                        Flushed::Open => {
                            // The first CONNACK starts the keep-alive clock.
                            if let Some(ka) = keep_alive
                                && ka_sleep.deadline() > Instant::now() + ka * 3 / 2
                            {
                                ka_sleep.as_mut().reset(Instant::now() + ka * 3 / 2);
                            }
                        }
                        Flushed::ClosedByBroker => return None,
                        Flushed::WriteFailed => return Some(CloseReason::Transport),
                    }
                }
                r = read_some(stream, rbuf) => match r {
                    Ok(0) => return Some(CloseReason::Transport),
                    Ok(_) => {}
                    Err(e) => {
                        log_read_error(self.context, &e);
                        return Some(CloseReason::Transport);
                    }
                },
                () = &mut ka_sleep, if keep_alive.is_some() => {
                    tracing::info!(
                        keep_alive_secs = keep_alive.map(|k| k.as_secs()),
                        "no packet within 1.5 times the keep alive; closing"
                    );
                    if version == ProtocolVersion::V5 {
                        Box::pin(send_final(stream, disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT), version)).await;
                    }
                    return Some(CloseReason::KeepAliveTimeout);
                }
            }
        }
    }
}

enum Flushed {
    Open,
    ClosedByBroker,
    WriteFailed,
}

impl Link<'_> {
    /// Writes everything queued; handles the close and abort states.
    async fn flush<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        map: &mut TopicMap,
        keep_alive: &mut Option<Duration>,
    ) -> Flushed {
        let (metrics, outbox, version) = (&self.context.metrics, self.outbox, self.version);
        let client_keep_alive = self.client_keep_alive;
        loop {
            let (mut packets, state, dropped) = outbox.take();
            packets.retain_mut(|p| map.outbound(p));
            if dropped > 0 {
                tracing::debug!(
                    dropped,
                    "QoS 0 messages dropped: the client reads too slowly"
                );
            }
            if state == OutboxState::Aborted {
                tracing::warn!("closing: the client does not read (outbound queue full)");
                return Flushed::ClosedByBroker;
            }
            if packets.is_empty() {
                if state == OutboxState::Closing {
                    let _ = timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
                    Box::pin(linger(stream)).await;
                    return Flushed::ClosedByBroker;
                }
                return Flushed::Open;
            }
            let mut wbuf = BytesMut::new();
            for packet in &packets {
                match packet {
                    Packet::ConnAck(ack) => metrics.connack(ack.code),
                    Packet::Publish(p)
                        if p.topic.starts_with("agents/") && p.topic.ends_with("/wake") =>
                    {
                        metrics.wakeup_delivered();
                    }
                    _ => {}
                }
                if let Packet::ConnAck(ack) = packet
                    && !ack.code.is_error()
                {
                    // Only the keep alive matters to effective_keep_alive; the rest is filler.
                    let probe = Connect::new(version, "", client_keep_alive);
                    *keep_alive = effective_keep_alive(&probe, ack);
                }
                if let Err(e) = encode(packet, version, &mut wbuf) {
                    tracing::warn!(error = %e, packet_type = packet.packet_type(), "packet cannot be encoded; skipped");
                }
            }
            drop(packets);
            let write = async {
                stream.write_all(&wbuf).await?;
                stream.flush().await
            };
            tokio::pin!(write);
            // A client that stops reading blocks this write; an abort from the core ends it.
            let result = loop {
                tokio::select! {
                    r = &mut write => break r,
                    () = outbox.changed() => {
                        if outbox.state() == OutboxState::Aborted {
                            tracing::warn!("closing: the client does not read (outbound queue full)");
                            return Flushed::ClosedByBroker;
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "write failed");
                return if state == OutboxState::Open {
                    Flushed::WriteFailed
                } else {
                    Flushed::ClosedByBroker
                };
            }
            if state == OutboxState::Closing {
                // Anything queued after the close is not sent.
                let _ = timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
                Box::pin(linger(stream)).await;
                return Flushed::ClosedByBroker;
            }
        }
    }
}

/// After the broker's last packet (a DISCONNECT with its reason): reads and drops what the
/// client still sends until it closes, or for [`LINGER`] at most. Closing a socket with unread
/// input resets the connection, and a client still writing (PUBRELs behind the publish that
/// broke Receive Maximum, say) would see a broken pipe instead of reading the reason.
async fn linger<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut sink = [0u8; 4096];
    let _ = timeout(LINGER, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}
