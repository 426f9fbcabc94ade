//! CONNECT: refusal, takeover of an existing session, the CONNACK and what it accepted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use beckon_mqtt::{
    ConnAck, Connect, Disconnect, Packet, Properties, ProtocolVersion, QoS, ReasonCode,
};

use super::cluster::{Claim, ClusterOut};
use super::presence::{Arrival, PresenceReason};
use super::session::{Link, Session};
use super::topic_tree::SessionKey;
use super::{Action, BrokerCore, ConnId, ConnectionInfo, CoreConfig};

/// The reason string of the DISCONNECT 0x8E a v5 client gets when it is taken over.
pub(crate) const TAKEN_OVER: &str = "another connection with this client id took the session over; a client id, and in a tenant an identity, has one connection at a time";

impl BrokerCore {
    /// A CONNECT arrived on a new connection (already authenticated by the network layer).
    /// Emits the CONNACK (with assigned client id, server keep alive, limits for v5), resumes
    /// or discards the session, takes over an existing connection of the same client id
    /// (DISCONNECT 0x8E to a v5 client, then Close; its identity's disconnected event
    /// `taken_over`), redelivers in-flight messages and publishes the connected event of a
    /// tenant identity. Returns what was accepted, or the refusal's reason code.
    pub fn handle_connect(
        &mut self,
        now: Instant,
        conn: ConnId,
        connect: Connect,
        info: ConnectionInfo,
        out: &mut Vec<Action>,
    ) -> Result<Accepted, ReasonCode> {
        if self.conns.contains_key(&conn) {
            // A second CONNECT on one connection is a protocol error [MQTT-3.1.0-2].
            self.kick(now, conn, ReasonCode::PROTOCOL_ERROR, out);
            return Err(ReasonCode::PROTOCOL_ERROR);
        }
        if let Some(code) = self.refusal(&connect) {
            out.push(Action::Send {
                conn,
                packet: Packet::ConnAck(ConnAck {
                    session_present: false,
                    code,
                    properties: Properties::default(),
                }),
            });
            out.push(Action::Close { conn });
            return Err(code);
        }
        let mut connect = connect;
        let mut info = info;
        let identity = info.identity.take();
        let arrival = Arrival {
            remote: info.remote_addr,
            path: info.path,
            via_proxy: info.via_proxy,
        };
        let assigned = connect.client_id.is_empty();
        let client_id = if assigned {
            self.assign_client_id()
        } else {
            std::mem::take(&mut connect.client_id)
        };
        let requested_expiry = if connect.protocol == ProtocolVersion::V5 {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            // A v3.1.1 persistent session lasts as long as the broker allows.
            u32::MAX
        };
        let existing = self.by_client_id.get(&client_id).copied();
        let taken_over = existing.and_then(|key| self.sessions.get(&key)?.conn);
        let (key, session_present) = match existing.and_then(|key| {
            let by = format!("a new connection from {}", arrival.remote);
            self.take_over(now, key, connect.clean_start, &by, out)
        }) {
            Some(key) => (key, true),
            None => {
                let key = self.next_session;
                self.next_session += 1;
                let session = Session::new(client_id.clone(), connect.protocol);
                self.sessions.insert(key, Box::new(session));
                self.by_client_id.insert(client_id.clone(), key);
                (key, false)
            }
        };
        let terms = Terms {
            info,
            requested_expiry,
            expiry: requested_expiry.min(self.config.max_session_expiry),
            assigned: assigned.then_some(client_id),
            session_present,
        };
        let Some(accepted) = self.open_session(now, conn, key, &mut connect, terms, out) else {
            return Err(ReasonCode::UNSPECIFIED_ERROR);
        };
        if let Some(old) = taken_over {
            self.presence_ended(now, old, PresenceReason::TakenOver, out);
        }
        if let Some(identity) = identity {
            self.presence_connected(now, conn, identity, arrival, out);
        }
        Ok(accepted)
    }

    /// Binds session `key` to `conn` with the terms of this CONNECT, sends the CONNACK and
    /// resumes the session when it was present.
    fn open_session(
        &mut self,
        now: Instant,
        conn: ConnId,
        key: SessionKey,
        connect: &mut Connect,
        terms: Terms,
        out: &mut Vec<Action>,
    ) -> Option<Accepted> {
        let config = &self.config;
        let v5 = connect.protocol == ProtocolVersion::V5;
        let server = terms.info.server;
        let receive_maximum = config.receive_maximum_for(server).max(1);
        let session = self.sessions.get_mut(&key)?;
        session.protocol = connect.protocol;
        session.server = server;
        session.conn = Some(conn);
        session.expiry = terms.expiry;
        session.connect_expiry_zero = terms.requested_expiry == 0;
        session.link = Link {
            receive_maximum: if v5 {
                connect.properties.receive_maximum.unwrap_or(u16::MAX)
            } else {
                u16::MAX
            },
            max_packet_size: if v5 {
                connect.properties.maximum_packet_size
            } else {
                None
            },
            aliases: HashMap::new(),
            info: Some(terms.info.clone()),
        };
        session.will = connect.will.take().map(|mut will| {
            // Only v3.1.1 gets here with these (v5 was refused): downgrade silently.
            will.qos = will.qos.min(config.max_qos);
            will.retain &= config.retain_available;
            Box::new(will)
        });
        self.conns.insert(conn, key);
        if let Some(cluster) = &mut self.cluster {
            let at_ms = (self.wall_clock)();
            let claim = Claim {
                at_ms,
                clean_start: connect.clean_start,
                holds_own: false,
            };
            cluster.claims.insert(key, claim);
            cluster.out.push(ClusterOut::Claim {
                client_id: session.client_id.clone(),
                clean_start: connect.clean_start,
                at_ms,
            });
        }
        let mut properties = Properties::default();
        if v5 {
            connack_properties(config, connect, &terms, receive_maximum, &mut properties);
        }
        let keep_alive = properties.server_keep_alive.unwrap_or(connect.keep_alive);
        out.push(Action::Send {
            conn,
            packet: Packet::ConnAck(ConnAck {
                session_present: terms.session_present,
                code: ReasonCode::SUCCESS,
                properties,
            }),
        });
        if terms.session_present {
            // What was in flight goes again first, then the queue.
            session.resend_inflight(now, &mut self.stats, out);
            session.pump(now, config, &mut self.stats, out);
        }
        Some(Accepted {
            session_present: terms.session_present,
            keep_alive: (keep_alive != 0).then(|| Duration::from_secs(u64::from(keep_alive))),
            assigned_client_id: terms.assigned.is_some(),
            session_expiry: terms.expiry,
            receive_maximum,
        })
    }

    /// Why a CONNECT is refused before any session state is touched, if it is.
    fn refusal(&self, connect: &Connect) -> Option<ReasonCode> {
        let config = &self.config;
        match connect.protocol {
            ProtocolVersion::V5 => {
                if connect.properties.authentication_method.is_some() {
                    // No enhanced authentication is offered.
                    return Some(ReasonCode::BAD_AUTHENTICATION_METHOD);
                }
                if let Some(will) = &connect.will {
                    if will.qos > config.max_qos {
                        return Some(ReasonCode::QOS_NOT_SUPPORTED);
                    }
                    if will.retain && !config.retain_available {
                        return Some(ReasonCode::RETAIN_NOT_SUPPORTED);
                    }
                }
                None
            }
            ProtocolVersion::V311 => {
                if connect.client_id.is_empty() && !connect.clean_start {
                    // [MQTT-3.1.3-8]: return code 2, identifier rejected.
                    return Some(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
                }
                if let Some(max) = config.max_keep_alive
                    && (connect.keep_alive == 0 || connect.keep_alive > max)
                {
                    return Some(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
                }
                None
            }
        }
    }

    /// A new connection (`by` says which, for the log) claims the session `key`: closes its
    /// old connection, if any, and either ends the session (returns `None`; the old will is
    /// published) or keeps it for the new connection (returns `Some(key)`; the old will is
    /// discarded).
    ///
    /// Two clients that share a client id (in a tenant: one identity, whatever client id
    /// they send) take each other over at every reconnect, and each waits for its
    /// acknowledgements in between; the old one is told why and the broker logs it, since
    /// from either client alone it looks like a broker that stalls.
    pub(super) fn take_over(
        &mut self,
        now: Instant,
        key: SessionKey,
        clean_start: bool,
        by: &str,
        out: &mut Vec<Action>,
    ) -> Option<SessionKey> {
        let session = self.sessions.get_mut(&key)?;
        if let Some(old) = session.conn.take() {
            self.conns.remove(&old);
            tracing::info!(
                client_id = %session.client_id,
                conn = old,
                by,
                "session taken over: a client id (in a tenant, an identity) has one connection at a time"
            );
            if session.protocol == ProtocolVersion::V5 {
                let mut properties = Properties::default();
                properties.reason_string = Some(TAKEN_OVER.to_owned());
                out.push(Action::Send {
                    conn: old,
                    packet: Packet::Disconnect(Disconnect {
                        code: ReasonCode::SESSION_TAKEN_OVER,
                        properties,
                    }),
                });
            }
            out.push(Action::Close { conn: old });
            self.stats.sessions_taken_over += 1;
        }
        let will = session.will.take();
        session.will_at = None;
        session.expires_at = None;
        let ends = clean_start || session.expiry == 0;
        self.reschedule(key);
        if ends {
            self.end_session(key);
            if let Some(will) = will {
                self.publish_will(now, key, *will, out);
            }
            None
        } else {
            Some(key)
        }
    }

    fn assign_client_id(&mut self) -> String {
        loop {
            let id = match &self.cluster {
                Some(c) => format!("beckon-auto-{}-{:08x}", c.node, self.next_assigned_id),
                None => format!("beckon-auto-{:08x}", self.next_assigned_id),
            };
            self.next_assigned_id += 1;
            if !self.by_client_id.contains_key(&id) {
                return id;
            }
        }
    }
}

/// The terms [`BrokerCore::handle_connect`] settled before the session is bound.
struct Terms {
    /// Address, path and kind of the connection (its identity already taken).
    info: ConnectionInfo,
    /// The Session Expiry Interval the client asked for (u32::MAX: a v3.1.1 persistent session).
    requested_expiry: u32,
    /// The one in force.
    expiry: u32,
    /// The client id the broker assigned, when the CONNECT's was empty.
    assigned: Option<String>,
    /// A session of this client id was resumed.
    session_present: bool,
}

/// What [`BrokerCore::handle_connect`] accepted: the terms of the connection as its CONNACK
/// announced them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// A session of this client id was resumed.
    pub session_present: bool,
    /// The keep alive in force (the Server Keep Alive when the broker set one); `None` when
    /// off.
    pub keep_alive: Option<Duration>,
    /// The broker assigned the client id (the CONNECT's was empty).
    pub assigned_client_id: bool,
    /// The Session Expiry Interval in force, in seconds (u32::MAX: never expires).
    pub session_expiry: u32,
    /// How many QoS 1/2 messages the client may send before their acknowledgement.
    pub receive_maximum: u16,
}

/// The v5 CONNACK properties: assigned id, reduced expiry, limits and capabilities.
fn connack_properties(
    config: &CoreConfig,
    connect: &Connect,
    terms: &Terms,
    receive_maximum: u16,
    properties: &mut Properties,
) {
    properties.assigned_client_identifier = terms.assigned.clone();
    if terms.expiry != terms.requested_expiry {
        properties.session_expiry_interval = Some(terms.expiry);
    }
    properties.receive_maximum = Some(receive_maximum);
    if config.max_qos < QoS::ExactlyOnce {
        properties.maximum_qos = Some(config.max_qos as u8);
    }
    if !config.retain_available {
        properties.retain_available = Some(0);
    }
    properties.maximum_packet_size = Some(config.max_packet_size);
    if config.topic_alias_maximum > 0 {
        properties.topic_alias_maximum = Some(config.topic_alias_maximum);
    }
    if let Some(max) = config.max_keep_alive
        && (connect.keep_alive == 0 || connect.keep_alive > max)
    {
        properties.server_keep_alive = Some(max);
    }
    properties.wildcard_subscription_available = Some(1);
    properties.subscription_identifier_available = Some(1);
    properties.shared_subscription_available = Some(1);
}

/// Effective keep alive of a connection, as announced in the CONNACK that the core sent:
/// the Server Keep Alive property if present, else the client's value. `None` when 0 (off).
pub fn effective_keep_alive(connect: &Connect, connack: &ConnAck) -> Option<Duration> {
    let secs = connack
        .properties
        .server_keep_alive
        .unwrap_or(connect.keep_alive);
    (secs != 0).then(|| Duration::from_secs(u64::from(secs)))
}
