//! Presence: the broker's own retained events on `t/{tenant}/agents/{id}/presence` (and
//! `servers/{id}/presence`) when a tenant identity connects or disconnects. Kept by the core
//! task, which sees every connect, close and takeover in order, so that the last retained
//! event of an identity is always its current state.

use std::collections::HashMap;
use std::net::SocketAddr;
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
}

/// A connected tenant identity.
#[derive(Debug)]
pub(crate) struct Present {
    identity: Box<Identity>,
    remote: SocketAddr,
    path: ConnectionPath,
    via_proxy: Option<bool>,
}

/// The connected identities, by connection and by session key.
#[derive(Debug, Default)]
pub(crate) struct Presence {
    by_conn: HashMap<ConnId, Present>,
    by_key: HashMap<String, ConnId>,
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
        node: None,
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
