//! The broker's protocol core: sessions, the topic tree, QoS flows, retained and will
//! messages, and the presence of tenant identities as plain state. Packets and time go in,
//! [`Action`]s come out; no sockets, no async, and no clock but the wall-clock time stamp of
//! presence events (replaceable, [`BrokerCore::set_wall_clock`]), so that every rule is
//! tested deterministically without a network.
//!
//! The tokio layer (`crate::core_task`) owns one [`BrokerCore`] in one task, feeds it the
//! decoded packets of every connection and carries out the actions it returns.

mod cluster;
mod connect;
mod idmap;
mod message;
mod presence;
mod quota;
mod retained;
mod session;
mod subscribe;
mod topic_tree;

#[cfg(test)]
mod tests;

pub use cluster::{ClaimOutcome, ClusterOut, RemoteClaim};
pub use connect::{Accepted, effective_keep_alive};
pub(crate) use idmap::IdMap;
pub use presence::PresenceReason;
pub use quota::{Quota, QuotaCounts};

use cluster::{ClusterState, note_session_interest};

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beckon_mqtt::{
    Ack, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode, Will,
};

use bytes::Bytes;
use message::Message;
use retained::RetainedStore;
use session::{Pending, Session};
use topic_tree::{Hit, SessionKey, TopicTree, parse_filter};

/// Identifies one network connection for the lifetime of the process (never reused).
pub type ConnId = u64;

/// Limits and capabilities of the core, each with the default an operator gets.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Largest packet the broker accepts, announced to v5 clients in CONNACK (default 1 MiB).
    pub max_packet_size: u32,
    /// How many QoS 1/2 publishes a client may have unacknowledged towards the broker
    /// (Receive Maximum announced in CONNACK; default 64).
    pub receive_maximum: u16,
    /// Upper bound of QoS 1/2 messages in flight towards one client, also capped by the
    /// client's own Receive Maximum (default 32).
    pub max_inflight: u16,
    /// [`receive_maximum`](Self::receive_maximum) for server identities (a console publishes
    /// one wake-up per agent of a call; default 1024).
    pub server_receive_maximum: u16,
    /// [`max_inflight`](Self::max_inflight) for server identities (a console receives the
    /// acks and presence of a whole fleet; default 1024).
    pub server_max_inflight: u16,
    /// [`max_queued_messages`](Self::max_queued_messages) for the sessions of server
    /// identities: what a console misses while busy or away, up to three acks per agent of a
    /// call (default 200000).
    pub server_max_queued_messages: usize,
    /// Messages queued for one session while it is offline or its in-flight window is full;
    /// beyond it new messages are dropped and counted (default 1000).
    pub max_queued_messages: usize,
    /// Upper bound of the session expiry a client may ask for, in seconds (default 7 days).
    pub max_session_expiry: u32,
    /// Topic aliases accepted from each v5 client (default 64; 0 turns them off).
    pub topic_alias_maximum: u16,
    /// When set, overrides client keep alive values above it (Server Keep Alive, v5).
    pub max_keep_alive: Option<u16>,
    /// Whether retained messages are supported (default true).
    pub retain_available: bool,
    /// Highest QoS the broker grants (default ExactlyOnce).
    pub max_qos: QoS,
    /// Topic filters one session may hold; a SUBSCRIBE beyond it is refused filter by filter
    /// (default 1000).
    pub max_subscriptions: usize,
    /// Retained messages one tenant (or the plain namespace) may store (default 10000).
    pub max_retained_messages: usize,
    /// Bytes (topics and payloads) of the retained messages one tenant (or the plain
    /// namespace) may store (default 64 MiB).
    pub max_retained_bytes: usize,
    /// Topics are tenant namespaces (`t/{tenant}/...`), each with its own retained quota;
    /// otherwise one quota covers every topic (default false).
    pub tenant_namespaces: bool,
}

impl CoreConfig {
    /// The Receive Maximum announced to a client (`server`: a server identity).
    pub fn receive_maximum_for(&self, server: bool) -> u16 {
        if server {
            self.server_receive_maximum
        } else {
            self.receive_maximum
        }
    }

    /// Messages in flight towards a client at most.
    pub fn max_inflight_for(&self, server: bool) -> u16 {
        if server {
            self.server_max_inflight
        } else {
            self.max_inflight
        }
    }

    /// Messages queued for a session at most.
    pub fn max_queued_for(&self, server: bool) -> usize {
        if server {
            self.server_max_queued_messages
        } else {
            self.max_queued_messages
        }
    }
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            receive_maximum: 64,
            max_inflight: 32,
            server_receive_maximum: 1024,
            server_max_inflight: 1024,
            server_max_queued_messages: 200_000,
            max_queued_messages: 1000,
            max_session_expiry: 7 * 24 * 3600,
            topic_alias_maximum: 64,
            max_keep_alive: None,
            retain_available: true,
            max_qos: QoS::ExactlyOnce,
            max_subscriptions: 1000,
            max_retained_messages: 10_000,
            max_retained_bytes: 64 << 20,
            tenant_namespaces: false,
        }
    }
}

/// What the network layer knows about a connection when its CONNECT arrives.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The client's address (after the PROXY protocol, when in use).
    pub remote_addr: SocketAddr,
    /// The path it came in on, e.g. "8883", "443-mqtt", "443-websocket", "1883".
    pub path: &'static str,
    /// The client authenticated as a server identity (a console): its session gets the
    /// `server_*` limits.
    pub server: bool,
    /// The tenant identity the client authenticated as: its presence is published while it
    /// is connected. Taken by [`BrokerCore::handle_connect`] (not kept in the session).
    pub identity: Option<Box<beckon_identity::Identity>>,
    /// Whether the client says it came through an HTTP proxy (CONNECT user property
    /// `beckon-via-proxy`), for its presence events.
    pub via_proxy: Option<bool>,
}

/// Why a connection ended, as the network layer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed the socket or an I/O error occurred (will is published).
    Transport,
    /// No packet within 1.5 times the keep alive (will is published).
    KeepAliveTimeout,
    /// The peer sent a malformed packet or broke the protocol (will is published).
    ProtocolViolation,
    /// The broker closed it on purpose after an [`Action::Close`] (will decided by the core).
    Closed,
}

/// An instruction from the core to the network layer.
// Boxing the packet would cost an allocation per action on the hot path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Encode and send this packet on the connection (in order of the actions).
    Send {
        /// Target connection.
        conn: ConnId,
        /// The packet.
        packet: Packet,
    },
    /// Flush what was sent before, then close the connection. The core already forgot it:
    /// no `handle_close` call is expected for it, though one is harmless.
    Close {
        /// Target connection.
        conn: ConnId,
    },
}

/// Counters of the core, for metrics. Every field only grows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoreStats {
    /// PUBLISH packets accepted from clients (duplicates of QoS 2 retransmissions excluded).
    pub publishes_received: u64,
    /// PUBLISH packets sent to clients (redeliveries included).
    pub publishes_sent: u64,
    /// Will messages published.
    pub wills_published: u64,
    /// QoS 1/2 deliveries dropped because the session's queue was full.
    pub dropped_queue_full: u64,
    /// Deliveries dropped because they exceeded the client's Maximum Packet Size.
    pub dropped_too_large: u64,
    /// Deliveries dropped because the message expired before it could be sent.
    pub dropped_expired: u64,
    /// QoS 0 deliveries dropped because the persistent session was offline.
    pub dropped_qos0_offline: u64,
    /// Connections closed because another connection took their session over.
    pub sessions_taken_over: u64,
    /// Offline sessions ended by their expiry interval.
    pub sessions_expired: u64,
    /// Connections closed by the core for a protocol error.
    pub protocol_errors: u64,
    /// Refusals by quota, indexed like [`Quota::ALL`].
    pub quotas_reached: QuotaCounts,
}

/// The broker's whole protocol state.
///
/// Choices where the specification leaves room (and how they compare with Mosquitto):
/// - A message matching several subscriptions of one client is sent once, with the highest
///   granted QoS and all their Subscription Identifiers ([MQTT-3.3.4-2], [MQTT-3.3.4-4]);
///   Mosquitto 2.0 sends v5 clients one copy per subscription. A shared subscription that
///   matches gets its own copy.
/// - Inbound QoS 2 messages are forwarded on PUBLISH and only the packet id is kept until
///   PUBREL (the specification's method B); Mosquitto holds the message until PUBREL.
/// - QoS 0 messages are not queued for offline sessions (as Mosquitto by default).
/// - On takeover the old connection's will is published only when its session ends (new
///   clean start, or the old session's expiry was 0), as Mosquitto does: the new connection
///   arrives before any will delay elapsed ([MQTT-3.1.2-8]).
/// - v3.1.1 clients with keep alive 0 or above `max_keep_alive` are refused (return code 2),
///   as Mosquitto does, since v3.1.1 cannot tell them another value.
/// - Unacknowledged QoS 1/2 messages that expired while the client was away are not resent.
/// - On shutdown wills are not published.
#[derive(Debug)]
pub struct BrokerCore {
    config: CoreConfig,
    /// Boxed: a table of inline sessions keeps room for up to twice as many as it holds.
    sessions: IdMap<Box<Session>>,
    by_client_id: HashMap<String, SessionKey>,
    conns: IdMap<SessionKey>,
    tree: TopicTree,
    retained: RetainedStore,
    /// Offline sessions with a delayed will or an expiry, by deadline.
    timers: BTreeSet<(Instant, SessionKey)>,
    next_session: SessionKey,
    next_assigned_id: u64,
    stats: CoreStats,
    /// Reused buffer for the subscriptions matching one publish.
    hits: Vec<Hit>,
    /// Set when the broker is a cluster node.
    cluster: Option<ClusterState>,
    /// The tenant identities connected here.
    presence: presence::Presence,
    /// Unix milliseconds now, for the `at` of presence events.
    wall_clock: fn() -> i64,
    /// When each quota was last logged.
    quota_log: quota::QuotaLog,
}

impl BrokerCore {
    /// A broker with no sessions, subscriptions or retained messages.
    pub fn new(config: CoreConfig) -> Self {
        let retained = RetainedStore::new(retained::RetainedQuota {
            messages: config.max_retained_messages,
            bytes: config.max_retained_bytes,
            per_tenant: config.tenant_namespaces,
        });
        Self {
            config,
            sessions: IdMap::default(),
            by_client_id: HashMap::new(),
            conns: IdMap::default(),
            tree: TopicTree::default(),
            retained,
            timers: BTreeSet::new(),
            next_session: 1,
            next_assigned_id: 1,
            stats: CoreStats::default(),
            hits: Vec::new(),
            cluster: None,
            presence: presence::Presence::default(),
            wall_clock: crate::tenancy::unix_now_ms,
            quota_log: quota::QuotaLog::default(),
        }
    }

    /// Replaces the clock that time-stamps presence events (unix milliseconds; the system
    /// clock by default).
    pub fn set_wall_clock(&mut self, clock: fn() -> i64) {
        self.wall_clock = clock;
    }

    /// Any packet after CONNECT on an established connection.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        conn: ConnId,
        packet: Packet,
        out: &mut Vec<Action>,
    ) {
        let Some(&key) = self.conns.get(&conn) else {
            // Not (or no longer) connected: the network layer will drop the connection.
            return;
        };
        match packet {
            Packet::Publish(publish) => self.on_publish(now, conn, key, publish, out),
            Packet::PubAck(ack) => {
                let mut acked = None;
                self.on_delivery_ack(now, key, out, |session, _| {
                    acked = session.on_puback(ack.packet_id);
                    acked.is_some()
                });
                self.delivered(key, acked);
            }
            Packet::PubRec(ack) => self.on_delivery_ack(now, key, out, |session, out| {
                if let Some(release) = session.on_pubrec(ack.packet_id, ack.code) {
                    out.push(Action::Send {
                        conn,
                        packet: Packet::PubRel(release),
                    });
                }
                true
            }),
            Packet::PubComp(ack) => {
                let mut acked = None;
                self.on_delivery_ack(now, key, out, |session, _| {
                    acked = session.on_pubcomp(ack.packet_id);
                    acked.is_some()
                });
                self.delivered(key, acked);
            }
            Packet::PubRel(ack) => {
                if let Some(session) = self.sessions.get_mut(&key) {
                    let known = session.incoming_qos2.remove(&ack.packet_id);
                    let code = if known || session.protocol == ProtocolVersion::V311 {
                        ReasonCode::SUCCESS
                    } else {
                        ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                    };
                    out.push(Action::Send {
                        conn,
                        packet: Packet::PubComp(Ack {
                            code,
                            ..Ack::new(ack.packet_id)
                        }),
                    });
                }
            }
            Packet::Subscribe(subscribe) => self.on_subscribe(now, conn, key, subscribe, out),
            Packet::Unsubscribe(unsubscribe) => self.on_unsubscribe(conn, key, unsubscribe, out),
            Packet::PingReq => out.push(Action::Send {
                conn,
                packet: Packet::PingResp,
            }),
            Packet::Disconnect(d) => self.on_disconnect(now, conn, key, d, out),
            // A second CONNECT, AUTH without enhanced authentication, or a packet only a
            // server sends.
            Packet::Connect(_)
            | Packet::Auth(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => self.kick(now, conn, ReasonCode::PROTOCOL_ERROR, out),
        }
    }

    fn on_publish(
        &mut self,
        now: Instant,
        conn: ConnId,
        key: SessionKey,
        mut publish: Publish,
        out: &mut Vec<Action>,
    ) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        let v5 = session.protocol == ProtocolVersion::V5;
        if !publish.properties.subscription_identifiers.is_empty() {
            // Only the server sends Subscription Identifiers [MQTT-3.3.4-6].
            self.kick(now, conn, ReasonCode::PROTOCOL_ERROR, out);
            return;
        }
        if let Some(alias) = publish.properties.topic_alias {
            if alias == 0 || alias > self.config.topic_alias_maximum {
                self.kick(now, conn, ReasonCode::TOPIC_ALIAS_INVALID, out);
                return;
            }
            if publish.topic.is_empty() {
                match session.link.aliases.get(&alias) {
                    Some(topic) => publish.topic.clone_from(topic),
                    None => {
                        self.kick(now, conn, ReasonCode::PROTOCOL_ERROR, out);
                        return;
                    }
                }
            } else {
                session.link.aliases.insert(alias, publish.topic.clone());
            }
        }
        if publish.topic.is_empty() || publish.topic.contains(['+', '#', '\0']) {
            self.kick(now, conn, ReasonCode::TOPIC_NAME_INVALID, out);
            return;
        }
        if publish.qos > self.config.max_qos {
            self.kick(now, conn, ReasonCode::QOS_NOT_SUPPORTED, out);
            return;
        }
        if publish.retain && !self.config.retain_available {
            self.kick(now, conn, ReasonCode::RETAIN_NOT_SUPPORTED, out);
            return;
        }
        let packet_id = match (publish.qos, publish.packet_id) {
            (QoS::AtMostOnce, _) => 0,
            (_, Some(id)) if id != 0 => id,
            _ => {
                self.kick(now, conn, ReasonCode::PROTOCOL_ERROR, out);
                return;
            }
        };
        if publish.qos == QoS::ExactlyOnce && session.incoming_qos2.contains(&packet_id) {
            // A retransmission before PUBREL: acknowledge again, deliver nothing.
            out.push(Action::Send {
                conn,
                packet: Packet::PubRec(Ack::new(packet_id)),
            });
            return;
        }
        if publish.qos != QoS::AtMostOnce
            && session.incoming_qos2.len()
                >= usize::from(self.config.receive_maximum_for(session.server).max(1))
        {
            self.kick(now, conn, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED, out);
            return;
        }
        let message = Message::new(
            now,
            publish.topic,
            publish.payload,
            publish.qos,
            publish.retain,
            publish.properties,
        );
        if message.retain
            && let Err(over) = self.retained.admits(&message)
        {
            let client_id = session.client_id.clone();
            self.quota_reached(now, over.into(), &client_id);
            if v5 && message.qos != QoS::AtMostOnce {
                let refused = Ack {
                    code: ReasonCode::QUOTA_EXCEEDED,
                    ..Ack::new(packet_id)
                };
                out.push(Action::Send {
                    conn,
                    packet: match message.qos {
                        QoS::ExactlyOnce => Packet::PubRec(refused),
                        _ => Packet::PubAck(refused),
                    },
                });
            } else {
                // Neither a QoS 0 publish nor MQTT 3.1.1 can be told: the connection ends.
                self.kick(now, conn, ReasonCode::QUOTA_EXCEEDED, out);
            }
            return;
        }
        if message.qos == QoS::ExactlyOnce {
            session.incoming_qos2.insert(packet_id);
        }
        self.stats.publishes_received += 1;
        let qos = message.qos;
        let message = Arc::new(message);
        let matched = self.route(now, Some(key), Arc::clone(&message), out);
        // A cluster node cannot know whether another node's clients match.
        let code = if v5 && !matched && self.cluster.is_none() {
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        let ack = Ack {
            code,
            ..Ack::new(packet_id)
        };
        let ack = match qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce => Some((conn, Packet::PubAck(ack))),
            QoS::ExactlyOnce => Some((conn, Packet::PubRec(ack))),
        };
        // Clustered: the acknowledgement waits until the message left for the other nodes.
        if let Some((conn, packet)) = self.hand_to_cluster(now, &message, ack) {
            out.push(Action::Send { conn, packet });
        }
    }

    /// Stores (if retained) and routes a message to every matching local subscription.
    /// Returns whether at least one subscription received it. In a cluster, shared
    /// subscriptions are left out: NATS gives every message that crosses the cluster to one
    /// node per group ([`BrokerCore::handle_shared_publish`]).
    fn route(
        &mut self,
        now: Instant,
        publisher: Option<SessionKey>,
        message: Arc<Message>,
        out: &mut Vec<Action>,
    ) -> bool {
        let shared = self.cluster.is_none();
        self.route_with(now, publisher, message, shared, out)
    }

    /// [`route`](Self::route), with shared subscriptions served here or not.
    fn route_with(
        &mut self,
        now: Instant,
        publisher: Option<SessionKey>,
        message: Arc<Message>,
        shared: bool,
        out: &mut Vec<Action>,
    ) -> bool {
        if message.retain
            && self.config.retain_available
            && let Err(over) = self.retained.store(&message, publisher.is_some())
        {
            // A will over the quota: not kept, still routed.
            let publisher = publisher.and_then(|k| self.sessions.get(&k));
            let client_id = publisher.map_or_else(|| "-".to_owned(), |s| s.client_id.clone());
            self.quota_reached(now, over.into(), &client_id);
        }
        let mut hits = std::mem::take(&mut self.hits);
        hits.clear();
        let sessions = &self.sessions;
        self.tree.matches(
            &message.topic,
            &|key| sessions.get(&key).is_some_and(|s| s.conn.is_some()),
            &mut hits,
        );
        if !shared {
            hits.retain(|h| !h.shared);
        }
        if hits.len() > 1 {
            // Normal subscriptions of one session next to each other, to merge them.
            hits.sort_unstable_by_key(|h| (h.shared, h.entry.session));
        }
        let mut matched = false;
        let mut i = 0;
        while i < hits.len() {
            let first = hits[i];
            let mut qos = None;
            let mut retain_as_published = false;
            let mut sub_ids = Vec::new();
            let mut j = i;
            while j < hits.len()
                && (j == i || (!first.shared && !hits[j].shared))
                && hits[j].entry.session == first.entry.session
            {
                let entry = hits[j].entry;
                j += 1;
                if entry.no_local && Some(entry.session) == publisher {
                    continue;
                }
                qos = qos.max(Some(entry.qos));
                retain_as_published |= entry.retain_as_published;
                sub_ids.extend(entry.id);
            }
            i = j;
            let Some(qos) = qos else {
                continue;
            };
            let Some(session) = self.sessions.get_mut(&first.entry.session) else {
                continue;
            };
            matched = true;
            let delivery = Pending {
                msg: Arc::clone(&message),
                qos: qos.min(message.qos),
                retain: message.retain && retain_as_published,
                sub_ids,
            };
            session.deliver(now, delivery, &self.config, &mut self.stats, out);
        }
        self.hits = hits;
        matched
    }

    /// An acknowledgement of a delivery to `key`'s session: `apply` hands it to the session
    /// (and sends any answer), returning whether the in-flight window may have room now; if
    /// so, queued messages follow.
    fn on_delivery_ack(
        &mut self,
        now: Instant,
        key: SessionKey,
        out: &mut Vec<Action>,
        apply: impl FnOnce(&mut Session, &mut Vec<Action>) -> bool,
    ) {
        if let Some(session) = self.sessions.get_mut(&key)
            && apply(session, out)
        {
            session.pump(now, &self.config, &mut self.stats, out);
        }
    }

    /// Publishes a message on the broker's own behalf (presence events): stored if retained
    /// and routed to every matching subscription, with no publishing session. Returns whether
    /// at least one subscription received it.
    pub fn publish_from_broker(
        &mut self,
        now: Instant,
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        out: &mut Vec<Action>,
    ) -> bool {
        let message = self.broker_message(now, topic, payload, qos, retain);
        self.hand_to_cluster(now, &message, None);
        self.route(now, None, message, out)
    }

    /// A message the broker publishes on its own behalf (no properties, `qos` capped at the
    /// configured maximum), for [`publish_from_broker`](Self::publish_from_broker) or for
    /// routing on this node only.
    fn broker_message(
        &self,
        now: Instant,
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Arc<Message> {
        let qos = qos.min(self.config.max_qos);
        Arc::new(Message::new(
            now,
            topic,
            payload,
            qos,
            retain,
            Properties::default(),
        ))
    }

    fn publish_will(
        &mut self,
        now: Instant,
        publisher: SessionKey,
        will: Will,
        out: &mut Vec<Action>,
    ) {
        self.stats.wills_published += 1;
        let message = Message::new(
            now,
            will.topic,
            will.payload,
            will.qos,
            will.retain,
            will.properties,
        );
        let message = Arc::new(message);
        self.hand_to_cluster(now, &message, None);
        self.route(now, Some(publisher), message, out);
    }

    fn on_disconnect(
        &mut self,
        now: Instant,
        conn: ConnId,
        key: SessionKey,
        d: Disconnect,
        out: &mut Vec<Action>,
    ) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        if session.protocol == ProtocolVersion::V5
            && let Some(expiry) = d.properties.session_expiry_interval
        {
            if session.connect_expiry_zero && expiry != 0 {
                // [MQTT-3.14.2-2]
                let why = PresenceReason::ClientDisconnect;
                self.kick_as(now, conn, ReasonCode::PROTOCOL_ERROR, why, out);
                return;
            }
            session.expiry = expiry.min(self.config.max_session_expiry);
        }
        // [MQTT-3.14.4-3]: only a normal disconnection (0x00, and every v3.1.1 DISCONNECT)
        // discards the will; 0x04 and the error codes keep it.
        if session.protocol == ProtocolVersion::V311 || d.code == ReasonCode::NORMAL_DISCONNECTION {
            session.will = None;
        }
        self.conns.remove(&conn);
        out.push(Action::Close { conn });
        self.detach(now, key, out);
        self.presence_ended(now, conn, PresenceReason::ClientDisconnect, out);
    }

    /// Closes a connection for a protocol error found by the core: DISCONNECT with `code`
    /// to a v5 client, then Close; the will is published.
    fn kick(&mut self, now: Instant, conn: ConnId, code: ReasonCode, out: &mut Vec<Action>) {
        self.kick_as(now, conn, code, PresenceReason::ProtocolError, out);
    }

    /// [`BrokerCore::kick`], with the reason its identity's disconnected event gives.
    fn kick_as(
        &mut self,
        now: Instant,
        conn: ConnId,
        code: ReasonCode,
        why: PresenceReason,
        out: &mut Vec<Action>,
    ) {
        self.stats.protocol_errors += 1;
        let Some(key) = self.conns.remove(&conn) else {
            out.push(Action::Close { conn });
            self.presence_ended(now, conn, why, out);
            return;
        };
        if self
            .sessions
            .get(&key)
            .is_some_and(|s| s.protocol == ProtocolVersion::V5)
        {
            out.push(disconnect(conn, code));
        }
        out.push(Action::Close { conn });
        self.detach(now, key, out);
        self.presence_ended(now, conn, why, out);
    }

    /// The session's connection is gone (already removed from `conns`): publishes or delays
    /// the will, and ends the session or starts its expiry.
    fn detach(&mut self, now: Instant, key: SessionKey, out: &mut Vec<Action>) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        session.conn = None;
        session.link.aliases = HashMap::new();
        let will = session.will.take();
        if session.expiry == 0 {
            self.end_session(key);
            if let Some(will) = will {
                self.publish_will(now, key, *will, out);
            }
            return;
        }
        let expiry = Duration::from_secs(u64::from(session.expiry));
        session.expires_at = (session.expiry != u32::MAX).then(|| now + expiry);
        if let Some(will) = will {
            let delay = will.properties.will_delay_interval.unwrap_or(0);
            if delay == 0 {
                self.publish_will(now, key, *will, out);
            } else if let Some(session) = self.sessions.get_mut(&key) {
                // Published when the delay elapses or the session ends, whichever is first.
                let delay = Duration::from_secs(u64::from(delay)).min(expiry);
                session.will = Some(will);
                session.will_at = Some(now + delay);
            }
        }
        self.reschedule(key);
    }

    /// Re-registers the session's next deadline (delayed will or expiry) in the timer set.
    fn reschedule(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        if let Some(old) = session.timer.take() {
            self.timers.remove(&(old, key));
        }
        let next = match (session.will_at, session.expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(at) = next {
            self.timers.insert((at, key));
            session.timer = Some(at);
        }
    }

    /// Forgets a session: its subscriptions, queues and timers.
    fn end_session(&mut self, key: SessionKey) {
        let Some(session) = self.sessions.remove(&key) else {
            return;
        };
        if self.by_client_id.get(&session.client_id) == Some(&key) {
            self.by_client_id.remove(&session.client_id);
        }
        if let Some(at) = session.timer {
            self.timers.remove(&(at, key));
        }
        for raw in &session.subscriptions {
            if let Some(filter) = parse_filter(raw) {
                self.tree.remove(filter, key);
            }
            if let Some(cluster) = &mut self.cluster {
                note_session_interest(cluster, key, &session.client_id, raw, false);
            }
        }
        if let Some(cluster) = &mut self.cluster {
            cluster.claims.remove(&key);
            cluster.parked.remove(&key);
        }
    }

    /// The connection is gone. Publishes the will (after its delay) unless the client sent a
    /// normal DISCONNECT, keeps or ends the session by its expiry, then publishes its
    /// identity's disconnected event (the reason follows `reason`).
    pub fn handle_close(
        &mut self,
        now: Instant,
        conn: ConnId,
        reason: CloseReason,
        out: &mut Vec<Action>,
    ) {
        // Every reason publishes the will: a normal DISCONNECT already removed it, and a
        // connection the core closed itself is no longer known here.
        if let Some(key) = self.conns.remove(&conn) {
            self.detach(now, key, out);
        }
        self.presence_ended(now, conn, reason.into(), out);
    }

    /// Advances time: delayed wills, session expiry, message expiry. Returns when it next
    /// needs to be called.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Action>) -> Option<Instant> {
        while let Some(&(at, key)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            let Some(session) = self.sessions.get_mut(&key) else {
                continue;
            };
            session.timer = None;
            if session.conn.is_some() {
                continue;
            }
            if session.will_at.is_some_and(|t| t <= now) {
                session.will_at = None;
                if let Some(will) = session.will.take() {
                    self.publish_will(now, key, *will, out);
                }
            }
            let expired = self
                .sessions
                .get(&key)
                .is_some_and(|s| s.expires_at.is_some_and(|t| t <= now));
            if expired {
                self.stats.sessions_expired += 1;
                self.end_session(key);
            } else {
                self.reschedule(key);
            }
        }
        self.retained.purge(now);
        self.next_deadline()
    }

    /// When [`BrokerCore::tick`] next has work (a delayed will, a session expiry, a retained
    /// message expiry). Handling a packet or a close may bring it forward (a client going
    /// offline starts its session expiry), so a caller can check it after each event.
    pub fn next_deadline(&self) -> Option<Instant> {
        let sessions = self.timers.first().map(|(at, _)| *at);
        match (sessions, self.retained.next_expiry()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Graceful shutdown: every tenant identity is published disconnected
    /// (`server_shutdown`) while its subscribers are still connected, then DISCONNECT 0x8B
    /// (Server shutting down) to every v5 client and Close for every connection.
    pub fn shutdown(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.presence_shutdown(now, out);
        let mut conns: Vec<(ConnId, SessionKey)> = self.conns.drain().collect();
        conns.sort_unstable();
        for (conn, key) in conns {
            let Some(session) = self.sessions.get_mut(&key) else {
                out.push(Action::Close { conn });
                continue;
            };
            if session.protocol == ProtocolVersion::V5 {
                out.push(disconnect(conn, ReasonCode::SERVER_SHUTTING_DOWN));
            }
            out.push(Action::Close { conn });
            session.conn = None;
            session.will = None;
            if session.expiry == 0 {
                self.end_session(key);
            }
        }
    }

    /// Number of live connections the core knows.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Number of sessions, online and offline.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Number of subscriptions (shared group members included).
    pub fn subscription_count(&self) -> usize {
        self.tree.len()
    }

    /// Number of retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Messages waiting in session queues (offline sessions or full windows); walks all
    /// sessions, so call it for a metrics scrape, not per packet.
    pub fn queued_messages(&self) -> usize {
        self.sessions.values().map(|s| s.queue.len()).sum()
    }

    /// QoS 1/2 messages sent and not yet acknowledged, over all sessions; walks all sessions.
    pub fn inflight_messages(&self) -> usize {
        self.sessions.values().map(|s| s.inflight.len()).sum()
    }

    /// The counters since start.
    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// The client id of a live connection (the assigned one for an empty CONNECT id).
    pub fn client_id(&self, conn: ConnId) -> Option<&str> {
        let key = self.conns.get(&conn)?;
        self.sessions.get(key).map(|s| s.client_id.as_str())
    }

    /// Address and path of a live connection, as given to [`BrokerCore::handle_connect`].
    pub fn connection_info(&self, conn: ConnId) -> Option<&ConnectionInfo> {
        let key = self.conns.get(&conn)?;
        self.sessions.get(key)?.link.info.as_ref()
    }

    /// The configuration in force.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }
}

/// A DISCONNECT with `code`, for a v5 connection.
fn disconnect(conn: ConnId, code: ReasonCode) -> Action {
    Action::Send {
        conn,
        packet: Packet::Disconnect(Disconnect {
            code,
            properties: Properties::default(),
        }),
    }
}
