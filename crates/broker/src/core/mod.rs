//! The broker's protocol core: sessions, the topic tree, QoS flows, retained and will messages
//! as plain state. Packets and time go in, [`Action`]s come out; no sockets, no clock, no
//! async, so that every rule is tested deterministically without a network.
//!
//! The tokio layer (`crate::server`) owns one [`BrokerCore`] in one task, feeds it the decoded
//! packets of every connection and carries out the actions it returns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use beckon_mqtt::{Connect, Packet, QoS};

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
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            receive_maximum: 64,
            max_inflight: 32,
            max_queued_messages: 1000,
            max_session_expiry: 7 * 24 * 3600,
            topic_alias_maximum: 64,
            max_keep_alive: None,
            retain_available: true,
            max_qos: QoS::ExactlyOnce,
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

/// The broker's whole protocol state.
#[derive(Debug)]
pub struct BrokerCore {
    _config: CoreConfig,
}

impl BrokerCore {
    /// A broker with no sessions, subscriptions or retained messages.
    pub fn new(config: CoreConfig) -> Self {
        Self { _config: config }
    }

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
        let _ = (now, conn, connect, info, out);
        todo!("broker core")
    }

    /// Any packet after CONNECT on an established connection.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        conn: ConnId,
        packet: Packet,
        out: &mut Vec<Action>,
    ) {
        let _ = (now, conn, packet, out);
        todo!("broker core")
    }

    /// The connection is gone. Publishes the will (after its delay) unless the client sent a
    /// normal DISCONNECT, and keeps or ends the session by its expiry.
    pub fn handle_close(
        &mut self,
        now: Instant,
        conn: ConnId,
        reason: CloseReason,
        out: &mut Vec<Action>,
    ) {
        let _ = (now, conn, reason, out);
        todo!("broker core")
    }

    /// Advances time: delayed wills, session expiry, message expiry. Returns when it next
    /// needs to be called.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Action>) -> Option<Instant> {
        let _ = (now, out);
        todo!("broker core")
    }

    /// Graceful shutdown: DISCONNECT 0x8B (Server shutting down) to every v5 client, then
    /// Close for every connection.
    pub fn shutdown(&mut self, out: &mut Vec<Action>) {
        let _ = out;
        todo!("broker core")
    }

    /// Number of live connections the core knows.
    pub fn connection_count(&self) -> usize {
        todo!("broker core")
    }
}

/// Effective keep alive of a connection, as announced in the CONNACK that the core sent:
/// the Server Keep Alive property if present, else the client's value. `None` when 0 (off).
pub fn effective_keep_alive(connect: &Connect, connack: &beckon_mqtt::ConnAck) -> Option<Duration> {
    let secs = connack
        .properties
        .server_keep_alive
        .unwrap_or(connect.keep_alive);
    (secs != 0).then(|| Duration::from_secs(u64::from(secs)))
}
