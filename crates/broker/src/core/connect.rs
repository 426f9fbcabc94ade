//! CONNECT: refusal, takeover of an existing session, the CONNACK and what it accepted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use beckon_mqtt::{ConnAck, Connect, Packet, Properties, ProtocolVersion, QoS, ReasonCode};

use super::cluster::ClusterOut;
use super::session::{Link, Session};
use super::topic_tree::SessionKey;
use super::{Action, BrokerCore, ConnId, ConnectionInfo, disconnect};

impl BrokerCore {
    /// A CONNECT arrived on a new connection (already authenticated by the network layer).
    /// Emits the CONNACK (with assigned client id, server keep alive, limits for v5), resumes
    /// or discards the session, takes over an existing connection of the same client id
    /// (DISCONNECT 0x8E to a v5 client, then Close) and redelivers in-flight messages.
    pub fn handle_connect(
        &mut self,
        now: Instant,
        conn: ConnId,
        connect: Connect,
        info: ConnectionInfo,
        out: &mut Vec<Action>,
    ) {
        if self.conns.contains_key(&conn) {
            // A second CONNECT on one connection is a protocol error [MQTT-3.1.0-2].
            self.kick(now, conn, ReasonCode::PROTOCOL_ERROR, out);
            return;
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
            return;
        }
        let mut connect = connect;
        let v5 = connect.protocol == ProtocolVersion::V5;
        let assigned = connect.client_id.is_empty();
        let client_id = if assigned {
            self.assign_client_id()
        } else {
            std::mem::take(&mut connect.client_id)
        };
        let requested_expiry = if v5 {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            // A v3.1.1 persistent session lasts as long as the broker allows.
            u32::MAX
        };
        let expiry = requested_expiry.min(self.config.max_session_expiry);

        let mut session_present = false;
        let existing = self.by_client_id.get(&client_id).copied();
        let key = match existing.and_then(|key| self.take_over(now, key, connect.clean_start, out))
        {
            Some(key) => {
                session_present = true;
                key
            }
            None => {
                let key = self.next_session;
                self.next_session += 1;
                self.sessions.insert(
                    key,
                    Box::new(Session::new(client_id.clone(), connect.protocol)),
                );
                self.by_client_id.insert(client_id.clone(), key);
                key
            }
        };

        let config = &self.config;
        let Some(session) = self.sessions.get_mut(&key) else {
            return;
        };
        session.protocol = connect.protocol;
        let info_server = info.server;
        session.server = info_server;
        session.conn = Some(conn);
        session.expiry = expiry;
        session.connect_expiry_zero = requested_expiry == 0;
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
            info: Some(info),
        };
        session.will = connect.will.take().map(|mut will| {
            // Only v3.1.1 gets here with these (v5 was refused): downgrade silently.
            will.qos = will.qos.min(config.max_qos);
            will.retain &= config.retain_available;
            Box::new(will)
        });
        self.conns.insert(conn, key);
        if let Some(cluster) = &mut self.cluster {
            cluster.out.push(ClusterOut::Claim {
                client_id: session.client_id.clone(),
                clean_start: connect.clean_start,
            });
        }

        let mut properties = Properties::default();
        if v5 {
            if assigned {
                properties.assigned_client_identifier = Some(client_id);
            }
            if expiry != requested_expiry {
                properties.session_expiry_interval = Some(expiry);
            }
            properties.receive_maximum = Some(config.receive_maximum_for(info_server).max(1));
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
        out.push(Action::Send {
            conn,
            packet: Packet::ConnAck(ConnAck {
                session_present,
                code: ReasonCode::SUCCESS,
                properties,
            }),
        });
        if session_present {
            session.resume(now, config, &mut self.stats, out);
        }
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

    /// A new connection claims the session `key`: closes its old connection, if any, and
    /// either ends the session (returns `None`; the old will is published) or keeps it for the
    /// new connection (returns `Some(key)`; the old will is discarded).
    pub(super) fn take_over(
        &mut self,
        now: Instant,
        key: SessionKey,
        clean_start: bool,
        out: &mut Vec<Action>,
    ) -> Option<SessionKey> {
        let session = self.sessions.get_mut(&key)?;
        if let Some(old) = session.conn.take() {
            self.conns.remove(&old);
            if session.protocol == ProtocolVersion::V5 {
                out.push(disconnect(old, ReasonCode::SESSION_TAKEN_OVER));
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

/// Effective keep alive of a connection, as announced in the CONNACK that the core sent:
/// the Server Keep Alive property if present, else the client's value. `None` when 0 (off).
pub fn effective_keep_alive(connect: &Connect, connack: &ConnAck) -> Option<Duration> {
    let secs = connack
        .properties
        .server_keep_alive
        .unwrap_or(connect.keep_alive);
    (secs != 0).then(|| Duration::from_secs(u64::from(secs)))
}
