//! The client session as plain state: packets and time in, bytes to send and events out.
//!
//! One `Session` lives across connections: packet ids, publishes waiting for their
//! acknowledgement and the subscriptions stay, so that after a reconnect the session resends
//! what the server did not acknowledge (DUP, same packet id) and subscribes again when the
//! server did not keep the session.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beckon_mqtt::{
    Ack, ConnAck, DecodeError, Disconnect, EncodeError, Packet, Properties, ProtocolVersion,
    Publish, QoS, ReasonCode, Subscribe, Subscription, Unsubscribe,
};
use bytes::{Bytes, BytesMut};

use crate::Options;

/// What CONNACK settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The server still had the session: its subscriptions stand. (Unacknowledged publishes
    /// are sent again with DUP either way; without the session the subscriptions are too.)
    pub session_present: bool,
    /// The keep alive in force (the server's Server Keep Alive wins).
    pub keep_alive: Duration,
    /// How many of our QoS 1 and 2 publishes may be in flight: the server's Receive Maximum
    /// within the local cap.
    pub window: usize,
    /// The largest packet the server accepts, if it said.
    pub max_packet_size: Option<u32>,
    /// The client identifier the server assigned, if it did.
    pub assigned_client_id: Option<String>,
    /// The CONNACK's Reason String, if any.
    pub reason: Option<String>,
}

/// What happened on the connection, for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The server accepted CONNECT.
    Connected(Settled),
    /// A message arrived. With `auto_ack` its acknowledgement is already queued; without,
    /// the caller acknowledges it with [`Session::acknowledge`]. A QoS 2 message that comes
    /// again before its PUBREL is not handed over twice.
    Message(Publish),
    /// The server acknowledged one of our QoS 1 or 2 publishes (PUBACK, PUBCOMP, or a PUBREC
    /// with a failure code).
    Published {
        /// The packet id [`Session::publish`] returned.
        packet_id: u16,
        /// The server's reason code (failure codes 0x80 and above: the message was refused).
        code: ReasonCode,
        /// Reason String, if sent.
        reason: Option<String>,
    },
    /// SUBACK.
    Subscribed {
        /// The packet id [`Session::subscribe`] returned.
        packet_id: u16,
        /// One code per filter: the granted QoS or a failure.
        codes: Vec<ReasonCode>,
        /// Reason String, if sent.
        reason: Option<String>,
    },
    /// UNSUBACK.
    Unsubscribed {
        /// The packet id [`Session::unsubscribe`] returned.
        packet_id: u16,
    },
    /// PINGRESP.
    Pong,
}

/// Why a connection ended. The session may connect again afterwards.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum End {
    /// The server refused CONNECT.
    #[error("the server refused the connection with reason code 0x{:02X}{}", code.0, reason_suffix(reason, server_reference))]
    Refused {
        /// CONNACK reason code (v5) or return code (v3.1.1).
        code: ReasonCode,
        /// Reason String, if sent.
        reason: Option<String>,
        /// Server Reference (0x9C, 0x9D), if sent.
        server_reference: Option<String>,
    },
    /// The server sent DISCONNECT.
    #[error("the server closed the session with reason code 0x{:02X}{}", code.0, reason_suffix(reason, server_reference))]
    Disconnected {
        /// DISCONNECT reason code.
        code: ReasonCode,
        /// Reason String, if sent.
        reason: Option<String>,
        /// Server Reference (0x9C, 0x9D), if sent.
        server_reference: Option<String>,
    },
    /// A v5 CONNECT was answered with an MQTT 3.1.1 CONNACK: the server speaks only 3.1.1.
    #[error("the server speaks only MQTT 3.1.1 (CONNACK return code {return_code})")]
    OldProtocol {
        /// The v3.1.1 return code (1: unacceptable protocol version).
        return_code: u8,
    },
    /// No CONNACK within the connect timeout.
    #[error("no CONNACK within the connect timeout")]
    ConnectTimeout,
    /// No PINGRESP within the ping timeout: the connection is dead.
    #[error("no PINGRESP within the ping timeout; the connection is dead")]
    PingTimeout,
    /// The server closed the stream.
    #[error("the server closed the connection")]
    Closed,
    /// Reading or writing failed.
    #[error("reading or writing failed: {0}")]
    Io(IoError),
    /// The server broke the protocol; a v5 session told it why in a DISCONNECT.
    #[error("the server broke the MQTT protocol: {0}")]
    Protocol(String),
    /// We disconnected.
    #[error("the client disconnected")]
    Shutdown,
}

/// The I/O error that ended a connection, shared by the clones of an [`End`] (a TLS alert
/// inside it still tells what went wrong).
#[derive(Debug, Clone)]
pub struct IoError(pub Arc<std::io::Error>);

impl From<std::io::Error> for IoError {
    fn from(error: std::io::Error) -> Self {
        Self(Arc::new(error))
    }
}

impl PartialEq for IoError {
    fn eq(&self, other: &Self) -> bool {
        self.0.kind() == other.0.kind() && self.0.to_string() == other.0.to_string()
    }
}

impl Eq for IoError {}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

fn reason_suffix(reason: &Option<String>, reference: &Option<String>) -> String {
    let mut s = String::new();
    if let Some(r) = reason {
        s.push_str(&format!(" ({r})"));
    }
    if let Some(r) = reference {
        s.push_str(&format!(", server reference {r}"));
    }
    s
}

/// A request the session cannot carry out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// QoS 0 publishes, pings and acknowledgements need a live connection.
    #[error("not connected; connect first")]
    NotConnected,
    /// All 65,535 packet ids are taken by messages not yet acknowledged.
    #[error("every packet id is in use; wait for acknowledgements before publishing more")]
    NoPacketId,
    /// The packet is larger than the server accepts.
    #[error("a packet of {size} bytes exceeds the server's maximum packet size of {max} bytes")]
    TooLarge {
        /// Size of the encoded packet.
        size: usize,
        /// The server's maximum.
        max: u32,
    },
    /// The packet cannot be encoded (a topic or property too long, an empty filter list).
    #[error("cannot encode the packet: {0}")]
    Encode(#[from] EncodeError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No connection, or the last one ended.
    Idle,
    /// CONNECT sent at this instant, no CONNACK yet.
    Connecting(Instant),
    /// CONNACK accepted.
    Connected,
}

/// Where one of our QoS 1 or 2 publishes stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Sent; PUBACK (QoS 1) or PUBREC (QoS 2) awaited.
    Published,
    /// PUBREL sent; PUBCOMP awaited.
    Released,
}

struct InFlight {
    /// Order of first sending, for resending in order after a reconnect.
    seq: u64,
    publish: Publish,
    stage: Stage,
    /// Sent (or resent) on the current connection.
    sent_here: bool,
}

struct Remembered {
    subscription: Subscription,
    sent_here: bool,
}

/// The client session. See the crate documentation for how it is driven.
pub struct Session {
    options: Options,
    state: State,
    settled: Option<Settled>,
    transmit: BytesMut,
    events: VecDeque<Event>,
    end: Option<End>,
    last_sent: Instant,
    ping_sent: Option<Instant>,
    next_id: u16,
    used_ids: HashSet<u16>,
    next_seq: u64,
    inflight: HashMap<u16, InFlight>,
    queued: VecDeque<Publish>,
    subscriptions: Vec<Remembered>,
    pending_subscribe: HashMap<u16, Vec<String>>,
    pending_unsubscribe: HashSet<u16>,
    incoming_qos2: HashSet<u16>,
    unacked_incoming: HashMap<u16, QoS>,
}

impl Session {
    /// A session that has not connected yet.
    pub fn new(options: Options, now: Instant) -> Self {
        Self {
            options,
            state: State::Idle,
            settled: None,
            transmit: BytesMut::with_capacity(256),
            events: VecDeque::new(),
            end: None,
            last_sent: now,
            ping_sent: None,
            next_id: 1,
            used_ids: HashSet::new(),
            next_seq: 0,
            inflight: HashMap::new(),
            queued: VecDeque::new(),
            subscriptions: Vec::new(),
            pending_subscribe: HashMap::new(),
            pending_unsubscribe: HashSet::new(),
            incoming_qos2: HashSet::new(),
            unacked_incoming: HashMap::new(),
        }
    }

    /// The options; change them between connections (keep alive, credentials, proxy).
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The options, to change before the next [`connect`](Self::connect).
    pub fn options_mut(&mut self) -> &mut Options {
        &mut self.options
    }

    /// What the current connection's CONNACK settled; `None` before it.
    pub fn settled(&self) -> Option<&Settled> {
        self.settled.as_ref()
    }

    /// True between an accepted CONNACK and the end of the connection.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Why the last connection ended, until the next [`connect`](Self::connect).
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Our QoS 1 and 2 publishes sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Our QoS 1 and 2 publishes waiting for room in the window.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Starts a connection on a fresh stream: queues CONNECT. Subscriptions and publishes
    /// asked for before the CONNACK follow it; what the last connection left unacknowledged
    /// is sent again once the CONNACK says whether the server kept the session.
    pub fn connect(&mut self, now: Instant) {
        self.transmit.clear();
        self.events.clear();
        self.end = None;
        self.settled = None;
        self.ping_sent = None;
        for entry in self.inflight.values_mut() {
            entry.sent_here = false;
        }
        for remembered in &mut self.subscriptions {
            remembered.sent_here = false;
        }
        // Unanswered SUBSCRIBEs and UNSUBSCRIBEs of the old connection are not resent; the
        // remembered subscriptions are, when the server lost them.
        for id in self.pending_subscribe.drain().map(|(id, _)| id) {
            self.used_ids.remove(&id);
        }
        for id in self.pending_unsubscribe.drain() {
            self.used_ids.remove(&id);
        }
        self.unacked_incoming.clear();
        let connect = Packet::Connect(Box::new(self.options.connect_packet()));
        self.state = State::Connecting(now);
        if let Err(e) = self.encode(&connect, now) {
            self.fail(End::Protocol(format!("cannot encode CONNECT: {e}")));
        }
    }

    /// Bytes to write to the stream: every packet queued since the last call, in order, so
    /// that one write carries them all.
    pub fn take_transmit(&mut self) -> BytesMut {
        self.transmit.split()
    }

    /// True when bytes wait in [`take_transmit`](Self::take_transmit).
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next: CONNACK overdue,
    /// a ping due, or a PINGRESP overdue.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::Connecting(sent) => Some(sent + self.options.connect_timeout),
            State::Connected => match self.ping_sent {
                Some(sent) => Some(sent + self.options.ping_timeout),
                None => {
                    let keep_alive = self.settled.as_ref()?.keep_alive;
                    (!keep_alive.is_zero()).then(|| self.last_sent + keep_alive)
                }
            },
        }
    }

    /// Acts on the clock: ends the connection when CONNACK or PINGRESP is overdue, sends
    /// PINGREQ when nothing was sent for the keep alive.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(due) = self.poll_timeout() else {
            return;
        };
        if now < due {
            return;
        }
        match self.state {
            State::Idle => {}
            State::Connecting(_) => self.fail(End::ConnectTimeout),
            State::Connected if self.ping_sent.is_some() => self.fail(End::PingTimeout),
            State::Connected => {
                let _ = self.encode(&Packet::PingReq, now);
                self.ping_sent = Some(now);
            }
        }
    }

    /// Sends PINGREQ now (a probe measuring the round trip); [`Event::Pong`] follows.
    pub fn ping(&mut self, now: Instant) -> Result<(), Error> {
        if self.state != State::Connected {
            return Err(Error::NotConnected);
        }
        self.encode(&Packet::PingReq, now)?;
        self.ping_sent.get_or_insert(now);
        Ok(())
    }

    /// The stream ended (closed, failed) without a word from the session: records why.
    pub fn connection_lost(&mut self, end: End) {
        if self.state != State::Idle {
            self.close(end);
        }
    }

    /// Queues a normal DISCONNECT (the server keeps the session for its expiry) and ends the
    /// connection; write what [`take_transmit`](Self::take_transmit) holds, then close.
    pub fn disconnect(&mut self, now: Instant) {
        if self.state != State::Idle {
            let _ = self.encode(&Packet::Disconnect(Disconnect::default()), now);
            self.close(End::Shutdown);
        }
    }

    /// Publishes a message (`packet_id` and `dup` are the session's to set). QoS 0 goes out
    /// at once and needs a connection. QoS 1 and 2 get a packet id, returned, and go out
    /// while the window has room, else wait in order; they survive reconnects until
    /// acknowledged ([`Event::Published`]).
    pub fn publish(&mut self, mut publish: Publish, now: Instant) -> Result<Option<u16>, Error> {
        publish.dup = false;
        publish.packet_id = None;
        if publish.qos == QoS::AtMostOnce {
            if self.state != State::Connected {
                return Err(Error::NotConnected);
            }
            self.check_size(&Packet::Publish(publish.clone()))?;
            self.encode(&Packet::Publish(publish), now)?;
            return Ok(None);
        }
        let id = self.allocate_id()?;
        publish.packet_id = Some(id);
        let packet = Packet::Publish(publish);
        if let Err(e) = self.check_size(&packet) {
            self.used_ids.remove(&id);
            return Err(e);
        }
        let Packet::Publish(publish) = packet else {
            unreachable!("built as a PUBLISH above")
        };
        self.queued.push_back(publish);
        self.fill_window(now);
        Ok(Some(id))
    }

    /// Subscribes; the subscriptions are remembered and sent again after a reconnect when
    /// the server lost the session. Sent at once, also before the CONNACK (right behind
    /// CONNECT), so that a fresh session is subscribed when the first messages come; needs a
    /// connection started with [`connect`](Self::connect).
    pub fn subscribe(
        &mut self,
        subscriptions: Vec<Subscription>,
        now: Instant,
    ) -> Result<u16, Error> {
        if self.state == State::Idle {
            return Err(Error::NotConnected);
        }
        let id = self.allocate_id()?;
        let filters = subscriptions.iter().map(|s| s.filter.clone()).collect();
        let packet = Packet::Subscribe(Subscribe {
            packet_id: id,
            subscriptions,
            properties: Properties::default(),
        });
        if let Err(e) = self.encode(&packet, now) {
            self.used_ids.remove(&id);
            return Err(e);
        }
        let Packet::Subscribe(subscribe) = packet else {
            unreachable!("built as a SUBSCRIBE above")
        };
        for s in subscribe.subscriptions {
            self.subscriptions
                .retain(|r| r.subscription.filter != s.filter);
            self.subscriptions.push(Remembered {
                subscription: s,
                sent_here: true,
            });
        }
        self.pending_subscribe.insert(id, filters);
        Ok(id)
    }

    /// Unsubscribes and forgets the filters.
    pub fn unsubscribe(&mut self, filters: Vec<String>, now: Instant) -> Result<u16, Error> {
        if self.state == State::Idle {
            return Err(Error::NotConnected);
        }
        self.subscriptions
            .retain(|r| !filters.contains(&r.subscription.filter));
        let id = self.allocate_id()?;
        let packet = Packet::Unsubscribe(Unsubscribe {
            packet_id: id,
            filters,
            properties: Properties::default(),
        });
        if let Err(e) = self.encode(&packet, now) {
            self.used_ids.remove(&id);
            return Err(e);
        }
        self.pending_unsubscribe.insert(id);
        Ok(id)
    }

    /// Acknowledges an incoming QoS 1 or 2 message (without `auto_ack`). Unknown ids are
    /// ignored.
    pub fn acknowledge(&mut self, packet_id: u16, now: Instant) -> Result<(), Error> {
        if self.state != State::Connected {
            return Err(Error::NotConnected);
        }
        match self.unacked_incoming.remove(&packet_id) {
            Some(QoS::AtLeastOnce) => self.encode(&Packet::PubAck(Ack::new(packet_id)), now),
            Some(QoS::ExactlyOnce) => self.encode(&Packet::PubRec(Ack::new(packet_id)), now),
            _ => Ok(()),
        }
    }

    /// Feeds bytes read from the stream: decodes every whole packet (the rest stays in
    /// `buf`) and acts on it. A packet that cannot be decoded ends the connection with the
    /// decoder's reason code.
    pub fn receive(&mut self, buf: &mut BytesMut, now: Instant) {
        while self.state != State::Idle {
            if matches!(self.state, State::Connecting(_))
                && self.options.protocol == ProtocolVersion::V5
                && buf.len() >= 4
                && buf[0] == 0x20
                && buf[1] == 0x02
            {
                // A v5 CONNACK is at least 3 bytes long after its fixed header: this is a
                // v3.1.1 CONNACK refusing our protocol level.
                let return_code = buf[3];
                buf.clear();
                self.close(End::OldProtocol { return_code });
                return;
            }
            match beckon_mqtt::decode(buf, self.options.protocol, self.options.max_packet_size) {
                Ok(Some(packet)) => self.handle(packet, now),
                Ok(None) => return,
                Err(e) => {
                    buf.clear();
                    self.violation(&e.reason_code(), undecodable(&e), now);
                    return;
                }
            }
        }
    }

    /// Acts on one packet from the server.
    pub fn handle(&mut self, packet: Packet, now: Instant) {
        match (self.state, packet) {
            (State::Idle, _) => {}
            (State::Connecting(_), Packet::ConnAck(connack)) => self.connack(connack, now),
            (State::Connecting(_), Packet::Disconnect(d)) => self.disconnected(d),
            (State::Connecting(_), other) => self.violation(
                &ReasonCode::PROTOCOL_ERROR,
                format!("packet type {} before CONNACK", other.packet_type()),
                now,
            ),
            (State::Connected, Packet::PingResp) => {
                self.ping_sent = None;
                self.events.push_back(Event::Pong);
            }
            (State::Connected, Packet::Publish(publish)) => self.incoming(publish, now),
            (State::Connected, Packet::PubRel(rel)) => {
                self.incoming_qos2.remove(&rel.packet_id);
                let _ = self.encode(&Packet::PubComp(Ack::new(rel.packet_id)), now);
            }
            (State::Connected, Packet::PubAck(ack)) => self.acked(ack, QoS::AtLeastOnce, now),
            (State::Connected, Packet::PubRec(ack)) => self.received(ack, now),
            (State::Connected, Packet::PubComp(ack)) => self.acked(ack, QoS::ExactlyOnce, now),
            (State::Connected, Packet::SubAck(suback)) => {
                if let Some(filters) = self.pending_subscribe.remove(&suback.packet_id) {
                    self.used_ids.remove(&suback.packet_id);
                    // A refused filter is not subscribed: nothing to send again later.
                    for (filter, code) in filters.iter().zip(&suback.codes) {
                        if code.is_error() {
                            self.subscriptions
                                .retain(|r| &r.subscription.filter != filter);
                        }
                    }
                    self.events.push_back(Event::Subscribed {
                        packet_id: suback.packet_id,
                        codes: suback.codes,
                        reason: suback.properties.into_set().reason_string,
                    });
                }
            }
            (State::Connected, Packet::UnsubAck(unsuback)) => {
                if self.pending_unsubscribe.remove(&unsuback.packet_id) {
                    self.used_ids.remove(&unsuback.packet_id);
                    self.events.push_back(Event::Unsubscribed {
                        packet_id: unsuback.packet_id,
                    });
                }
            }
            (State::Connected, Packet::Disconnect(d)) => self.disconnected(d),
            (State::Connected, Packet::Auth(_)) => self.violation(
                &ReasonCode::PROTOCOL_ERROR,
                "AUTH without an authentication method".into(),
                now,
            ),
            (State::Connected, other) => self.violation(
                &ReasonCode::PROTOCOL_ERROR,
                format!(
                    "packet type {} is never sent to a client",
                    other.packet_type()
                ),
                now,
            ),
        }
    }

    fn connack(&mut self, connack: ConnAck, now: Instant) {
        let properties = connack.properties.into_set();
        if connack.code.0 != 0 {
            self.close(End::Refused {
                code: connack.code,
                reason: properties.reason_string,
                server_reference: properties.server_reference,
            });
            return;
        }
        let keep_alive = match properties.server_keep_alive {
            Some(secs) => Duration::from_secs(u64::from(secs)),
            None => Duration::from_secs(u64::from(self.options.keep_alive_secs())),
        };
        let server_window = properties.receive_maximum.map_or(65_535, usize::from);
        let settled = Settled {
            session_present: connack.session_present,
            keep_alive,
            window: server_window.min(self.options.max_inflight).max(1),
            max_packet_size: properties.maximum_packet_size,
            assigned_client_id: properties.assigned_client_identifier,
            reason: properties.reason_string,
        };
        self.state = State::Connected;
        self.settled = Some(settled.clone());
        if !connack.session_present {
            self.incoming_qos2.clear();
            self.resubscribe(now);
        }
        self.resend(connack.session_present, now);
        self.fill_window(now);
        self.events.push_back(Event::Connected(settled));
    }

    /// Sends the remembered subscriptions not yet sent on this connection.
    fn resubscribe(&mut self, now: Instant) {
        let subscriptions: Vec<Subscription> = self
            .subscriptions
            .iter_mut()
            .filter(|r| !r.sent_here)
            .map(|r| {
                r.sent_here = true;
                r.subscription.clone()
            })
            .collect();
        if subscriptions.is_empty() {
            return;
        }
        let Ok(id) = self.allocate_id() else {
            return;
        };
        self.pending_subscribe
            .insert(id, subscriptions.iter().map(|s| s.filter.clone()).collect());
        let packet = Packet::Subscribe(Subscribe {
            packet_id: id,
            subscriptions,
            properties: Properties::default(),
        });
        let _ = self.encode(&packet, now);
    }

    /// Sends again, in their first order, our publishes the last connection left
    /// unacknowledged, with DUP and their packet ids: a QoS 2 release as PUBREL when the
    /// server kept the session, as the PUBLISH again when it did not. DUP stays set on a
    /// fresh session too: the server may have passed the message on before it lost the
    /// session, so a subscriber may see it twice.
    fn resend(&mut self, session_present: bool, now: Instant) {
        let mut ids: Vec<(u64, u16)> = self
            .inflight
            .iter()
            .filter(|(_, e)| !e.sent_here)
            .map(|(id, e)| (e.seq, *id))
            .collect();
        ids.sort_unstable();
        for (_, id) in ids {
            let Some(entry) = self.inflight.get_mut(&id) else {
                continue;
            };
            entry.sent_here = true;
            if !session_present {
                entry.stage = Stage::Published;
            }
            let packet = match entry.stage {
                Stage::Released => Packet::PubRel(Ack::new(id)),
                Stage::Published => Packet::Publish(Publish {
                    dup: true,
                    ..entry.publish.clone()
                }),
            };
            let _ = self.encode(&packet, now);
        }
    }

    /// Sends queued publishes while the window has room.
    fn fill_window(&mut self, now: Instant) {
        if self.state != State::Connected {
            return;
        }
        let window = self.settled.as_ref().map_or(1, |s| s.window);
        while self.inflight.len() < window {
            let Some(publish) = self.queued.pop_front() else {
                return;
            };
            let Some(id) = publish.packet_id else {
                continue;
            };
            let packet = Packet::Publish(publish);
            let _ = self.encode(&packet, now);
            let Packet::Publish(publish) = packet else {
                unreachable!("built as a PUBLISH above")
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            self.inflight.insert(
                id,
                InFlight {
                    seq,
                    publish,
                    stage: Stage::Published,
                    sent_here: true,
                },
            );
        }
    }

    fn incoming(&mut self, publish: Publish, now: Instant) {
        match (publish.qos, publish.packet_id) {
            (QoS::AtMostOnce, _) => self.events.push_back(Event::Message(publish)),
            (QoS::AtLeastOnce, Some(id)) => {
                if self.options.auto_ack {
                    let _ = self.encode(&Packet::PubAck(Ack::new(id)), now);
                } else {
                    self.unacked_incoming.insert(id, QoS::AtLeastOnce);
                }
                self.events.push_back(Event::Message(publish));
            }
            (QoS::ExactlyOnce, Some(id)) => {
                // Seen before its PUBREL: already handed over, only the PUBREC was lost.
                let new = self.incoming_qos2.insert(id);
                if self.options.auto_ack || (!new && !self.unacked_incoming.contains_key(&id)) {
                    let _ = self.encode(&Packet::PubRec(Ack::new(id)), now);
                } else if new {
                    self.unacked_incoming.insert(id, QoS::ExactlyOnce);
                }
                if new {
                    self.events.push_back(Event::Message(publish));
                }
            }
            (_, None) => self.violation(
                &ReasonCode::PROTOCOL_ERROR,
                "QoS 1 or 2 PUBLISH without a packet id".into(),
                now,
            ),
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2): the exchange is over.
    fn acked(&mut self, ack: Ack, qos: QoS, now: Instant) {
        let known = self
            .inflight
            .get(&ack.packet_id)
            .is_some_and(|e| e.publish.qos == qos);
        if !known {
            // A late acknowledgement of a message resent after a reconnect: nothing to do.
            return;
        }
        self.finish(ack, now);
    }

    /// PUBREC: release (or, with a failure code, the exchange is over).
    fn received(&mut self, ack: Ack, now: Instant) {
        let Some(entry) = self.inflight.get_mut(&ack.packet_id) else {
            return;
        };
        if entry.publish.qos != QoS::ExactlyOnce {
            return;
        }
        if ack.code.is_error() {
            self.finish(ack, now);
            return;
        }
        entry.stage = Stage::Released;
        let _ = self.encode(&Packet::PubRel(Ack::new(ack.packet_id)), now);
    }

    fn finish(&mut self, ack: Ack, now: Instant) {
        self.inflight.remove(&ack.packet_id);
        self.used_ids.remove(&ack.packet_id);
        self.events.push_back(Event::Published {
            packet_id: ack.packet_id,
            code: ack.code,
            reason: ack.properties.into_set().reason_string,
        });
        self.fill_window(now);
    }

    fn disconnected(&mut self, d: Disconnect) {
        let properties = d.properties.into_set();
        self.close(End::Disconnected {
            code: d.code,
            reason: properties.reason_string,
            server_reference: properties.server_reference,
        });
    }

    /// The server broke the protocol: a v5 DISCONNECT says why, then the connection ends.
    fn violation(&mut self, code: &ReasonCode, message: String, now: Instant) {
        if self.options.protocol == ProtocolVersion::V5 {
            let packet = Packet::Disconnect(Disconnect {
                code: *code,
                properties: Properties::default(),
            });
            let _ = self.encode(&packet, now);
        }
        self.close(End::Protocol(message));
    }

    /// Ends the connection, keeping what is already queued to write (a DISCONNECT).
    fn close(&mut self, end: End) {
        self.state = State::Idle;
        self.ping_sent = None;
        self.end = Some(end);
    }

    /// Ends the connection and drops what was not written yet.
    fn fail(&mut self, end: End) {
        self.transmit.clear();
        self.close(end);
    }

    fn check_size(&self, packet: &Packet) -> Result<(), Error> {
        let size = beckon_mqtt::encoded_len(packet, self.options.protocol)?;
        match self.settled.as_ref().and_then(|s| s.max_packet_size) {
            Some(max) if size > max as usize => Err(Error::TooLarge { size, max }),
            _ => Ok(()),
        }
    }

    fn encode(&mut self, packet: &Packet, now: Instant) -> Result<(), Error> {
        beckon_mqtt::encode(packet, self.options.protocol, &mut self.transmit)?;
        self.last_sent = now;
        Ok(())
    }

    fn allocate_id(&mut self) -> Result<u16, Error> {
        if self.used_ids.len() >= usize::from(u16::MAX) {
            return Err(Error::NoPacketId);
        }
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if self.used_ids.insert(id) {
                return Ok(id);
            }
        }
    }
}

fn undecodable(e: &DecodeError) -> String {
    format!("undecodable packet: {e}")
}

/// A message to hand to [`Session::publish`]: no retain, no properties.
pub fn message(topic: impl Into<String>, qos: QoS, payload: impl Into<Bytes>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        payload: payload.into(),
        properties: Properties::default(),
    }
}
