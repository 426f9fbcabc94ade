//! One client session: its subscriptions (by name), the outbound in-flight window and queue,
//! the inbound QoS 2 packet identifiers, its will and its expiry.
//!
//! Everything that may grow (queues, alias table, QoS 2 ids) starts empty and allocates only
//! when used, so an idle session costs a few hundred bytes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use beckon_mqtt::{Ack, Packet, ProtocolVersion, Publish, QoS, ReasonCode, Will};

use super::message::{Message, publish_len};
use super::{Action, ConnId, ConnectionInfo, CoreConfig, CoreStats};

/// A message waiting to be sent to one session, with the options of that delivery.
#[derive(Debug)]
pub(crate) struct Pending {
    pub msg: Arc<Message>,
    /// QoS of this delivery: min(published QoS, subscription QoS).
    pub qos: QoS,
    /// RETAIN flag of this delivery.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions.
    pub sub_ids: Vec<u32>,
}

/// A QoS 1/2 PUBLISH sent to the client and not yet acknowledged.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub packet_id: u16,
    pub delivery: Pending,
    /// PUBREC received and PUBREL sent (QoS 2, second half).
    pub released: bool,
}

/// What the core knows of the session's current (or last) network connection.
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// The client's Receive Maximum (65535 when not given).
    pub receive_maximum: u16,
    /// The client's Maximum Packet Size, if it set one.
    pub max_packet_size: Option<u32>,
    /// Inbound topic aliases (v5), per connection.
    pub aliases: HashMap<u16, String>,
    /// Address and path of the connection.
    pub info: Option<ConnectionInfo>,
}

/// A client session.
#[derive(Debug)]
pub(crate) struct Session {
    pub client_id: String,
    pub protocol: ProtocolVersion,
    /// The live connection, `None` while the (persistent) session is offline.
    pub conn: Option<ConnId>,
    pub link: Link,
    /// A server identity's session (set at each CONNECT, kept while offline): the
    /// `server_*` limits apply.
    pub server: bool,
    /// Effective Session Expiry Interval in seconds; `u32::MAX` never expires.
    pub expiry: u32,
    /// The CONNECT asked for expiry 0 (then DISCONNECT may not raise it, [MQTT-3.14.2-2]).
    pub connect_expiry_zero: bool,
    /// The will of the live connection, or a delayed will waiting for `will_at` (boxed: most
    /// sessions have none, and a will with its properties is large).
    pub will: Option<Box<Will>>,
    /// When a delayed will is due (offline sessions only).
    pub will_at: Option<Instant>,
    /// When the offline session ends.
    pub expires_at: Option<Instant>,
    /// The deadline under which the session is registered in the core's timer set.
    pub timer: Option<Instant>,
    /// Filters as subscribed (with any `$share/{group}/` prefix).
    pub subscriptions: Vec<Box<str>>,
    /// Outbound QoS 1/2 messages awaiting acknowledgement, in send order.
    pub inflight: VecDeque<Outgoing>,
    /// Outbound messages waiting for the window or for the client to come back.
    pub queue: VecDeque<Pending>,
    /// Inbound QoS 2 packet ids received and not yet released (PUBREL).
    pub incoming_qos2: HashSet<u16>,
    next_packet_id: u16,
}

impl Session {
    /// An empty session for `client_id`.
    pub fn new(client_id: String, protocol: ProtocolVersion) -> Self {
        Self {
            client_id,
            protocol,
            conn: None,
            link: Link::default(),
            server: false,
            expiry: 0,
            connect_expiry_zero: true,
            will: None,
            will_at: None,
            expires_at: None,
            timer: None,
            subscriptions: Vec::new(),
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            incoming_qos2: HashSet::new(),
            next_packet_id: 1,
        }
    }

    /// How many QoS 1/2 messages may be in flight towards the client.
    fn window(&self, config: &CoreConfig) -> usize {
        usize::from(
            self.link
                .receive_maximum
                .min(config.max_inflight_for(self.server))
                .max(1),
        )
    }

    /// Routes one delivery to this session: sent at once when online and the window has
    /// room, else queued (QoS 1/2 only; QoS 0 for an offline client is dropped, as Mosquitto
    /// does by default), else dropped and counted.
    pub fn deliver(
        &mut self,
        now: Instant,
        delivery: Pending,
        config: &CoreConfig,
        stats: &mut CoreStats,
        out: &mut Vec<Action>,
    ) {
        match self.conn {
            None if delivery.qos == QoS::AtMostOnce => stats.dropped_qos0_offline += 1,
            None => self.enqueue(delivery, config, stats),
            Some(conn) => {
                if delivery.qos == QoS::AtMostOnce
                    || (self.queue.is_empty() && self.inflight.len() < self.window(config))
                {
                    self.send(now, conn, delivery, stats, out);
                } else {
                    self.enqueue(delivery, config, stats);
                }
            }
        }
    }

    fn enqueue(&mut self, delivery: Pending, config: &CoreConfig, stats: &mut CoreStats) {
        if self.queue.len() >= config.max_queued_for(self.server) {
            stats.dropped_queue_full += 1;
        } else {
            self.queue.push_back(delivery);
        }
    }

    fn alloc_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = id.checked_add(1).unwrap_or(1);
            if !self.inflight.iter().any(|o| o.packet_id == id) {
                return id;
            }
        }
    }

    /// Sends one PUBLISH now (unless expired or too large for the client, which drops it).
    fn send(
        &mut self,
        now: Instant,
        conn: ConnId,
        delivery: Pending,
        stats: &mut CoreStats,
        out: &mut Vec<Action>,
    ) {
        let packet_id = (delivery.qos != QoS::AtMostOnce).then(|| self.alloc_packet_id());
        let Some(publish) = self.publish_of(now, &delivery, packet_id, stats) else {
            return;
        };
        if let Some(packet_id) = packet_id {
            self.inflight.push_back(Outgoing {
                packet_id,
                delivery,
                released: false,
            });
        }
        stats.publishes_sent += 1;
        out.push(Action::Send {
            conn,
            packet: Packet::Publish(publish),
        });
    }

    /// Sends queued messages while the in-flight window has room.
    pub fn pump(
        &mut self,
        now: Instant,
        config: &CoreConfig,
        stats: &mut CoreStats,
        out: &mut Vec<Action>,
    ) {
        let Some(conn) = self.conn else {
            return;
        };
        let window = self.window(config);
        while self.inflight.len() < window {
            let Some(delivery) = self.queue.pop_front() else {
                break;
            };
            self.send(now, conn, delivery, stats, out);
        }
    }

    /// The PUBLISH of `delivery` under `packet_id`, or `None` (and counted) when the message
    /// expired or is too large for the client's Maximum Packet Size ([MQTT-3.1.2-25]:
    /// discarded, as if it had been sent).
    fn publish_of(
        &self,
        now: Instant,
        delivery: &Pending,
        packet_id: Option<u16>,
        stats: &mut CoreStats,
    ) -> Option<Publish> {
        let Some(publish) = delivery.msg.to_publish(
            now,
            delivery.qos,
            delivery.retain,
            packet_id,
            &delivery.sub_ids,
        ) else {
            stats.dropped_expired += 1;
            return None;
        };
        if self
            .link
            .max_packet_size
            .is_some_and(|max| publish_len(&publish, self.protocol) > max as usize)
        {
            stats.dropped_too_large += 1;
            return None;
        }
        Some(publish)
    }

    /// On resuming a session, before [`pump`](Self::pump) sends the queue: resends every
    /// unacknowledged PUBLISH with DUP set and every PUBREL, with their original packet ids
    /// ([MQTT-4.4.0-1]). Unreleased messages that expired meanwhile, or are too large for the
    /// new connection, are dropped.
    pub fn resend_inflight(&mut self, now: Instant, stats: &mut CoreStats, out: &mut Vec<Action>) {
        let Some(conn) = self.conn else {
            return;
        };
        let mut inflight = std::mem::take(&mut self.inflight);
        inflight.retain(|o| {
            let packet = if o.released {
                Packet::PubRel(Ack::new(o.packet_id))
            } else {
                let Some(mut publish) = self.publish_of(now, &o.delivery, Some(o.packet_id), stats)
                else {
                    return false;
                };
                publish.dup = true;
                stats.publishes_sent += 1;
                Packet::Publish(publish)
            };
            out.push(Action::Send { conn, packet });
            true
        });
        self.inflight = inflight;
    }

    /// PUBACK from the client: ends a QoS 1 delivery; returns its message, `None` when no
    /// such delivery exists.
    pub fn on_puback(&mut self, packet_id: u16) -> Option<Arc<Message>> {
        self.take_inflight(|o| o.packet_id == packet_id && o.delivery.qos == QoS::AtLeastOnce)
    }

    /// PUBREC from the client; returns the PUBREL to send, if any.
    pub fn on_pubrec(&mut self, packet_id: u16, code: ReasonCode) -> Option<Ack> {
        let position = self
            .inflight
            .iter()
            .position(|o| o.packet_id == packet_id && o.delivery.qos == QoS::ExactlyOnce);
        match position {
            Some(index) if code.is_error() => {
                // The client refused the message: the exchange ends here.
                self.inflight.remove(index);
                None
            }
            Some(index) => {
                self.inflight[index].released = true;
                Some(Ack::new(packet_id))
            }
            None if self.protocol == ProtocolVersion::V5 => Some(Ack {
                code: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
                ..Ack::new(packet_id)
            }),
            None => None,
        }
    }

    /// PUBCOMP from the client: ends a QoS 2 delivery; returns its message.
    pub fn on_pubcomp(&mut self, packet_id: u16) -> Option<Arc<Message>> {
        self.take_inflight(|o| o.packet_id == packet_id && o.released)
    }

    fn take_inflight(&mut self, pred: impl Fn(&Outgoing) -> bool) -> Option<Arc<Message>> {
        let index = self.inflight.iter().position(pred)?;
        self.inflight.remove(index).map(|o| o.delivery.msg)
    }
}
