//! Presence: the broker's own retained events on `t/{tenant}/agents/{id}/presence` (and
//! `servers/{id}/presence`) when a tenant identity connects or disconnects. Decided here, in
//! the core, which sees every connect, close and takeover in order, so that the last retained
//! event of an identity is always its current state; the network layer only carries out the
//! publications like any other action.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use beckon_identity::{ConnectionPath, Identity, PresenceEvent, PresenceState, Role, acl};
use beckon_mqtt::QoS;
use bytes::Bytes;

use super::cluster::Claim;
use super::{Action, BrokerCore, CloseReason, ClusterOut, ConnId};

/// Why a tenant identity went away, as written into its disconnected event (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// No packet within 1.5 times the keep alive.
    KeepaliveTimeout,
    /// Another connection of the same identity took the session over.
    TakenOver,
    /// The socket closed or failed, or the client stopped reading.
    ConnectionLost,
    /// The client broke the protocol.
    ProtocolError,
    /// The broker shut down.
    ServerShutdown,
    /// The identity's tenant file was removed.
    TenantRemoved,
    /// The identity's credentials were revoked.
    Revoked,
    /// The cluster node that held the connection went silent (crashed or cut off).
    NodeLost,
}

impl PresenceReason {
    const ALL: [Self; 9] = [
        Self::ClientDisconnect,
        Self::KeepaliveTimeout,
        Self::TakenOver,
        Self::ConnectionLost,
        Self::ProtocolError,
        Self::ServerShutdown,
        Self::TenantRemoved,
        Self::Revoked,
        Self::NodeLost,
    ];

    /// The reason whose `reason` field value is `value`.
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == value)
    }

    /// The value in the event's `reason` field (see `docs/tenants.md`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientDisconnect => "client_disconnect",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::TakenOver => "taken_over",
            Self::ConnectionLost => "connection_lost",
            Self::ProtocolError => "protocol_error",
            Self::ServerShutdown => "server_shutdown",
            Self::TenantRemoved => "tenant_removed",
            Self::Revoked => "revoked",
            Self::NodeLost => "node_lost",
        }
    }
}

impl From<CloseReason> for PresenceReason {
    fn from(reason: CloseReason) -> Self {
        match reason {
            CloseReason::KeepAliveTimeout => Self::KeepaliveTimeout,
            CloseReason::ProtocolViolation => Self::ProtocolError,
            CloseReason::Transport | CloseReason::Closed => Self::ConnectionLost,
        }
    }
}

/// A connected tenant identity.
#[derive(Debug)]
pub(super) struct Present {
    identity: Box<Identity>,
    remote: SocketAddr,
    path: ConnectionPath,
    via_proxy: Option<bool>,
}

/// The connected identities, by connection and by session key.
#[derive(Debug, Default)]
pub(super) struct Presence {
    by_conn: HashMap<ConnId, Present>,
    by_key: HashMap<String, ConnId>,
    /// This node's name when clustered: written into every event.
    node: Option<Arc<str>>,
}

fn path_of(path: &str) -> ConnectionPath {
    match path {
        "8883" => ConnectionPath::Mqtts,
        "443-mqtt" => ConnectionPath::SharedMqtt,
        "443-websocket" => ConnectionPath::SharedWebSocket,
        _ => ConnectionPath::Plain,
    }
}

impl Presence {
    /// Events from now on name cluster node `node`.
    pub(super) fn set_node(&mut self, node: &str) {
        self.node = Some(Arc::from(node));
    }

    fn start(&mut self, conn: ConnId, present: Present) {
        let key = present.identity.session_key();
        if let Some(old) = self.by_key.insert(key, conn) {
            // Normally ended already by the takeover.
            self.by_conn.remove(&old);
        }
        self.by_conn.insert(conn, present);
    }

    /// The connection ended; returns its identity's record, if it had one.
    pub(super) fn end(&mut self, conn: ConnId) -> Option<Present> {
        let present = self.by_conn.remove(&conn)?;
        let key = present.identity.session_key();
        if self.by_key.get(&key) == Some(&conn) {
            self.by_key.remove(&key);
        }
        Some(present)
    }
}

/// The tenant identity a connection authenticated as, given with its CONNECT.
#[derive(Debug, Clone, Copy)]
pub(super) struct Arrival {
    pub(super) remote: SocketAddr,
    pub(super) path: &'static str,
    pub(super) via_proxy: Option<bool>,
}

impl BrokerCore {
    /// `identity` was accepted on `conn`: in a cluster its agent topics are held and a
    /// connected event another node left retained is ended first; then its connected event.
    pub(super) fn presence_connected(
        &mut self,
        now: Instant,
        conn: ConnId,
        identity: Box<Identity>,
        arrival: Arrival,
        out: &mut Vec<Action>,
    ) {
        if self.cluster.is_some() {
            if identity.role == Role::Agent {
                self.hold_own_topics(conn);
            }
            self.release_elsewhere(now, &identity, out);
        }
        let present = Present {
            identity,
            remote: arrival.remote,
            path: path_of(arrival.path),
            via_proxy: arrival.via_proxy,
        };
        self.publish_presence(now, &present, PresenceState::Connected, None, out);
        self.presence.start(conn, present);
    }

    /// The connection `conn` is gone: the disconnected event of its identity, if it had one.
    pub(super) fn presence_ended(
        &mut self,
        now: Instant,
        conn: ConnId,
        why: PresenceReason,
        out: &mut Vec<Action>,
    ) {
        if let Some(present) = self.presence.end(conn) {
            let state = PresenceState::Disconnected;
            self.publish_presence(now, &present, state, Some(why), out);
        }
    }

    /// Shutdown: every identity held here is published disconnected (`server_shutdown`).
    pub(super) fn presence_shutdown(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.presence.by_key.clear();
        let mut ended: Vec<(ConnId, Present)> = self.presence.by_conn.drain().collect();
        ended.sort_unstable_by_key(|(conn, _)| *conn);
        for (_, present) in ended {
            let (state, why) = (PresenceState::Disconnected, PresenceReason::ServerShutdown);
            self.publish_presence(now, &present, state, Some(why), out);
        }
    }

    /// Tenant files were removed: the connections of their identities are closed
    /// (`tenant_removed`).
    pub fn close_tenants(&mut self, now: Instant, tenants: &[String], out: &mut Vec<Action>) {
        let mut conns: Vec<ConnId> = (self.presence.by_conn.iter())
            .filter(|(_, p)| tenants.iter().any(|t| t == p.identity.tenant.as_str()))
            .map(|(c, _)| *c)
            .collect();
        conns.sort_unstable();
        for conn in conns {
            self.close_as(now, conn, PresenceReason::TenantRemoved, out);
        }
    }

    /// These connections' credentials were revoked: they are closed (`revoked`).
    pub fn revoke(&mut self, now: Instant, conns: &[ConnId], out: &mut Vec<Action>) {
        for &conn in conns {
            self.close_as(now, conn, PresenceReason::Revoked, out);
        }
    }

    /// Closes `conn` on the broker's side (flush, then close; the will is published) and
    /// publishes its identity's disconnected event with `why`.
    fn close_as(&mut self, now: Instant, conn: ConnId, why: PresenceReason, out: &mut Vec<Action>) {
        out.push(Action::Close { conn });
        if let Some(key) = self.conns.remove(&conn) {
            self.detach(now, key, out);
        }
        self.presence_ended(now, conn, why, out);
    }

    /// Publishes the connected event of every identity held here again (after this node was
    /// cut off from the cluster, whose other nodes may have declared it gone).
    pub fn republish_presence(&mut self, now: Instant, out: &mut Vec<Action>) {
        let node = self.presence.node.as_deref();
        let at = (self.wall_clock)();
        let mut events: Vec<(ConnId, String, Bytes)> = (self.presence.by_conn.iter())
            .map(|(conn, p)| {
                let (topic, payload) = event_of(node, at, p, PresenceState::Connected, None);
                (*conn, topic, payload)
            })
            .collect();
        events.sort_unstable_by_key(|(conn, ..)| *conn);
        for (_, topic, payload) in events {
            self.publish_from_broker(now, topic, payload, QoS::AtLeastOnce, true, out);
        }
    }

    fn publish_presence(
        &mut self,
        now: Instant,
        present: &Present,
        state: PresenceState,
        why: Option<PresenceReason>,
        out: &mut Vec<Action>,
    ) {
        let node = self.presence.node.as_deref();
        let (topic, payload) = event_of(node, (self.wall_clock)(), present, state, why);
        self.publish_from_broker(now, topic, payload, QoS::AtLeastOnce, true, out);
    }

    /// Cluster: before `identity` is announced connected here, the retained presence this
    /// node has for it may still say connected on another node (a takeover across nodes, or a
    /// move from a node that died): publish that node's disconnected event first, so that
    /// every subscriber sees disconnected, then connected, and the retained state ends
    /// connected.
    fn release_elsewhere(&mut self, now: Instant, identity: &Identity, out: &mut Vec<Action>) {
        let topic = acl::presence_topic(identity);
        let retained = self.retained_payload(&topic, now);
        let Some(event) = retained.as_deref().and_then(connected_event) else {
            return;
        };
        let payload = self.ended(event, PresenceReason::TakenOver);
        self.publish_from_broker(now, topic, payload, QoS::AtLeastOnce, true, out);
    }

    /// Cluster: another node says an identity connected there (`payload`, on `topic`) while
    /// this node holds a connection of it: the two were accepted at about the same moment and
    /// their claims crossed in NATS. This node claims the client id again, so that the nodes
    /// settle on one connection, and answers like a takeover: that node's disconnected event
    /// (`taken_over`), then this node's connected event again. If this node's connection is
    /// the one that goes, the other node answers in turn, and in every case the retained
    /// presence ends with the connection that stayed.
    pub(super) fn answer_presence_conflict(
        &mut self,
        now: Instant,
        topic: String,
        payload: &[u8],
        out: &mut Vec<Action>,
    ) {
        let Some(event) = connected_event(payload) else {
            return;
        };
        if event.node.is_none() || event.node.as_deref() == self.presence.node.as_deref() {
            return;
        }
        let Some(client_id) = client_id_of_presence(&topic) else {
            return;
        };
        let Some(&conn) = self.presence.by_key.get(&client_id) else {
            return;
        };
        if let (Some(&key), Some(cluster)) = (self.by_client_id.get(&client_id), &mut self.cluster)
            && let Some(&Claim {
                at_ms, clean_start, ..
            }) = cluster.claims.get(&key)
        {
            cluster.out.push(ClusterOut::Claim {
                client_id,
                clean_start,
                at_ms,
            });
        }
        let Some(present) = self.presence.by_conn.remove(&conn) else {
            return;
        };
        let payload = self.ended(event, PresenceReason::TakenOver);
        self.publish_from_broker(now, topic, payload, QoS::AtLeastOnce, true, out);
        self.publish_presence(now, &present, PresenceState::Connected, None, out);
        self.presence.by_conn.insert(conn, present);
    }

    /// Cluster: node `lost` went silent. Every identity this node's retained presence shows
    /// connected on it is published disconnected (`node_lost`) to this node's subscribers and
    /// retained store; every surviving node does the same on its own, so nothing crosses
    /// NATS. Returns how many identities were released.
    pub fn handle_node_lost(&mut self, now: Instant, lost: &str, out: &mut Vec<Action>) -> usize {
        let mut released = 0;
        for filter in ["t/+/agents/+/presence", "t/+/servers/+/presence"] {
            for message in self.retained.connected_on_node(filter, lost, now) {
                let Some(event) =
                    connected_event(&message.payload).filter(|e| e.node.as_deref() == Some(lost))
                else {
                    continue;
                };
                let topic = message.topic.clone();
                let payload = self.ended(event, PresenceReason::NodeLost);
                // To this node's subscribers and retained store only: not handed to the
                // cluster.
                let message = self.broker_message(now, topic, payload, QoS::AtLeastOnce, true);
                // Shared subscriptions too: nothing of this crosses NATS.
                self.route_with(now, None, message, true, out);
                released += 1;
            }
        }
        released
    }

    /// The disconnected event for `why`, now, that ends the connected `event`.
    fn ended(&self, mut event: PresenceEvent, why: PresenceReason) -> Bytes {
        event.state = PresenceState::Disconnected;
        event.at = (self.wall_clock)();
        event.reason = Some(why.as_str().to_owned());
        Bytes::from(event.to_json())
    }
}

/// The client id (`{tenant}/{role}/{id}`) whose presence `topic` is
/// (`t/{tenant}/agents/{id}/presence` or `.../servers/...`).
fn client_id_of_presence(topic: &str) -> Option<String> {
    let rest = topic.strip_prefix("t/")?.strip_suffix("/presence")?;
    let (tenant, rest) = rest.split_once('/')?;
    let (kind, id) = rest.split_once('/')?;
    let role = match kind {
        "agents" => Role::Agent,
        "servers" => Role::Server,
        _ => return None,
    };
    Some(format!("{tenant}/{}/{id}", role.as_str()))
}

/// The event in a retained presence `payload` when it says connected.
fn connected_event(payload: &[u8]) -> Option<PresenceEvent> {
    PresenceEvent::from_json(payload)
        .ok()
        .filter(|event| event.state == PresenceState::Connected)
}

/// The topic and payload of `present`'s event.
fn event_of(
    node: Option<&str>,
    at: i64,
    present: &Present,
    state: PresenceState,
    why: Option<PresenceReason>,
) -> (String, Bytes) {
    let event = PresenceEvent {
        state,
        at,
        reason: why.map(|w| w.as_str().to_owned()),
        remote_addr: present.remote.to_string(),
        path: present.path,
        via_proxy: present.via_proxy,
        node: node.map(str::to_owned),
    };
    let why = why.map_or("", PresenceReason::as_str);
    tracing::debug!(identity = %present.identity, ?state, reason = why, "presence");
    let topic = acl::presence_topic(&present.identity);
    (topic, Bytes::from(event.to_json()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_read_back_from_its_field_value() {
        // A reason missing from ALL would keep its events as messages (larger, not wrong);
        // a new one fails to compile here until it has its place.
        let listed = |reason| match reason {
            PresenceReason::ClientDisconnect
            | PresenceReason::KeepaliveTimeout
            | PresenceReason::TakenOver
            | PresenceReason::ConnectionLost
            | PresenceReason::ProtocolError
            | PresenceReason::ServerShutdown
            | PresenceReason::TenantRemoved
            | PresenceReason::Revoked
            | PresenceReason::NodeLost => PresenceReason::ALL.contains(&reason),
        };
        assert!(listed(PresenceReason::ClientDisconnect));
        for reason in PresenceReason::ALL {
            assert_eq!(PresenceReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(PresenceReason::parse("meteor"), None);
    }
}
