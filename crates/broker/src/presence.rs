//! Presence: the broker's own retained events on `t/{tenant}/agents/{id}/presence` (and
//! `servers/{id}/presence`) when a tenant identity connects or disconnects. Kept by the core
//! task, which sees every connect, close and takeover in order, so that the last retained
//! event of an identity is always its current state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use beckon_identity::{ConnectionPath, Identity, PresenceEvent, PresenceState, acl};
use beckon_mqtt::QoS;
use bytes::Bytes;

use crate::core::{Action, BrokerCore, ConnId, ConnectionInfo};
use crate::tenancy::unix_now_ms;

/// Reasons written into disconnected events.
pub(crate) mod reason {
    pub(crate) const CLIENT_DISCONNECT: &str = "client_disconnect";
    pub(crate) const KEEPALIVE_TIMEOUT: &str = "keepalive_timeout";
    pub(crate) const TAKEN_OVER: &str = "taken_over";
    pub(crate) const CONNECTION_LOST: &str = "connection_lost";
    pub(crate) const PROTOCOL_ERROR: &str = "protocol_error";
    pub(crate) const SERVER_SHUTDOWN: &str = "server_shutdown";
    pub(crate) const TENANT_REMOVED: &str = "tenant_removed";
    pub(crate) const REVOKED: &str = "revoked";
    /// The cluster node that held the connection went silent (crashed or cut off).
    pub(crate) const NODE_LOST: &str = "node_lost";
}

/// A connected tenant identity.
#[derive(Debug)]
pub(crate) struct Present {
    identity: Box<Identity>,
    remote: SocketAddr,
    path: ConnectionPath,
    via_proxy: Option<bool>,
    node: Option<Arc<str>>,
}

/// The connected identities, by connection and by session key.
#[derive(Debug, Default)]
pub(crate) struct Presence {
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
    /// Presence of a cluster node named `node` (or of a single broker with `None`).
    pub(crate) fn new(node: Option<&str>) -> Self {
        Self {
            node: node.map(Arc::from),
            ..Self::default()
        }
    }

    /// Publishes the connected event of every identity held here again (after this node was
    /// cut off from the cluster, whose other nodes may have declared it gone).
    pub(crate) fn republish(&self, core: &mut BrokerCore, now: Instant, out: &mut Vec<Action>) {
        for present in self.by_conn.values() {
            publish(core, now, present, PresenceState::Connected, None, out);
        }
    }

    /// `identity` completed CONNECT on `conn`; publishes its connected event.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn connected(
        &mut self,
        core: &mut BrokerCore,
        now: Instant,
        conn: ConnId,
        identity: Box<Identity>,
        info: &ConnectionInfo,
        via_proxy: Option<bool>,
        out: &mut Vec<Action>,
    ) {
        let present = Present {
            identity,
            remote: info.remote_addr,
            path: path_of(info.path),
            via_proxy,
            node: self.node.clone(),
        };
        publish(core, now, &present, PresenceState::Connected, None, out);
        let key = present.identity.session_key();
        if let Some(old) = self.by_key.insert(key, conn) {
            // Normally ended already through the takeover's Close.
            self.by_conn.remove(&old);
        }
        self.by_conn.insert(conn, present);
    }

    /// The connection ended; returns its identity's record to publish the event with.
    pub(crate) fn end(&mut self, conn: ConnId) -> Option<Present> {
        let present = self.by_conn.remove(&conn)?;
        let key = present.identity.session_key();
        if self.by_key.get(&key) == Some(&conn) {
            self.by_key.remove(&key);
        }
        Some(present)
    }

    /// Connections of identities of the given tenants.
    pub(crate) fn conns_of_tenants(&self, tenants: &[String]) -> Vec<ConnId> {
        self.by_conn
            .iter()
            .filter(|(_, p)| tenants.iter().any(|t| t == p.identity.tenant.as_str()))
            .map(|(c, _)| *c)
            .collect()
    }

    /// Every connection, ended (shutdown).
    pub(crate) fn end_all(&mut self) -> Vec<Present> {
        self.by_key.clear();
        self.by_conn.drain().map(|(_, p)| p).collect()
    }
}

/// Publishes the disconnected event of `present`.
pub(crate) fn disconnected(
    core: &mut BrokerCore,
    now: Instant,
    present: &Present,
    why: &str,
    out: &mut Vec<Action>,
) {
    publish(
        core,
        now,
        present,
        PresenceState::Disconnected,
        Some(why),
        out,
    );
}

fn publish(
    core: &mut BrokerCore,
    now: Instant,
    present: &Present,
    state: PresenceState,
    why: Option<&str>,
    out: &mut Vec<Action>,
) {
    let event = PresenceEvent {
        state,
        at: unix_now_ms(),
        reason: why.map(str::to_owned),
        remote_addr: present.remote.to_string(),
        path: present.path,
        via_proxy: present.via_proxy,
        node: present.node.as_deref().map(str::to_owned),
    };
    tracing::debug!(identity = %present.identity, ?state, reason = why.unwrap_or(""), "presence");
    core.publish_from_broker(
        now,
        acl::presence_topic(&present.identity),
        Bytes::from(event.to_json()),
        QoS::AtLeastOnce,
        true,
        out,
    );
}

/// Cluster: before `identity` is announced connected here, the retained presence this node
/// has for it may still say connected on another node (a takeover across nodes, or a move
/// from a node that died): publish that node's disconnected event first, so that every
/// subscriber sees disconnected, then connected, and the retained state ends connected.
pub(crate) fn release_elsewhere(
    core: &mut BrokerCore,
    now: Instant,
    identity: &Identity,
    out: &mut Vec<Action>,
) {
    let topic = acl::presence_topic(identity);
    let Some(payload) = core.retained_payload(&topic, now) else {
        return;
    };
    let Ok(mut event) = PresenceEvent::from_json(&payload) else {
        return;
    };
    if event.state != PresenceState::Connected {
        return;
    }
    event.state = PresenceState::Disconnected;
    event.at = unix_now_ms();
    event.reason = Some(reason::TAKEN_OVER.to_owned());
    core.publish_from_broker(
        now,
        topic,
        Bytes::from(event.to_json()),
        QoS::AtLeastOnce,
        true,
        out,
    );
}

/// Cluster: node `lost` went silent. Every identity this node's retained presence shows
/// connected on it is published disconnected (`node_lost`) to this node's subscribers and
/// retained store; every surviving node does the same on its own, so nothing crosses NATS.
pub(crate) fn release_node(
    core: &mut BrokerCore,
    now: Instant,
    lost: &str,
    out: &mut Vec<Action>,
) -> usize {
    let mut released = 0;
    for filter in ["t/+/agents/+/presence", "t/+/servers/+/presence"] {
        for (topic, payload) in core.retained_matching(filter, now) {
            let Ok(mut event) = PresenceEvent::from_json(&payload) else {
                continue;
            };
            if event.state != PresenceState::Connected || event.node.as_deref() != Some(lost) {
                continue;
            }
            event.state = PresenceState::Disconnected;
            event.at = unix_now_ms();
            event.reason = Some(reason::NODE_LOST.to_owned());
            core.publish_from_broker_local(
                now,
                topic,
                Bytes::from(event.to_json()),
                QoS::AtLeastOnce,
                true,
                out,
            );
            released += 1;
        }
    }
    released
}
