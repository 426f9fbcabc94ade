//! What a client asks for in CONNECT, and the CONNECT built from it.

use std::time::Duration;

use beckon_mqtt::{Connect, Properties, PropertySet, ProtocolVersion};
use bytes::Bytes;

/// CONNECT user property telling the broker the connection came through an HTTP proxy (the
/// broker cannot see it; its presence events carry it). The broker's `VIA_PROXY_PROPERTY`.
pub const VIA_PROXY_PROPERTY: &str = "beckon-via-proxy";

/// How a session connects and how far it lets the server go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// MQTT 3.1.1 or 5.
    pub protocol: ProtocolVersion,
    /// Client identifier.
    pub client_id: String,
    /// User name, if any.
    pub username: Option<String>,
    /// Password (or signed token), if any.
    pub password: Option<Bytes>,
    /// Keep alive asked for in CONNECT (whole seconds; the server's Server Keep Alive wins).
    /// Zero turns pings off.
    pub keep_alive: Duration,
    /// How long a PINGREQ may wait for its PINGRESP before the connection counts as dead.
    pub ping_timeout: Duration,
    /// How long CONNECT may wait for its CONNACK.
    pub connect_timeout: Duration,
    /// Clean Start (v5) or Clean Session (v3.1.1).
    pub clean_start: bool,
    /// Session Expiry Interval in seconds (v5; 0 ends the session with the connection).
    pub session_expiry: u32,
    /// Receive Maximum: how many QoS 1 and 2 messages the server may have in flight to us.
    pub receive_maximum: u16,
    /// Maximum Packet Size we accept; larger packets end the session (0x95).
    pub max_packet_size: u32,
    /// Local cap on our own QoS 1 and 2 publishes in flight, below the server's Receive
    /// Maximum; publishes beyond the window wait in the session's queue.
    pub max_inflight: usize,
    /// CONNECT user properties (v5), such as [`VIA_PROXY_PROPERTY`].
    pub user_properties: Vec<(String, String)>,
    /// True: incoming QoS 1 and 2 messages are acknowledged as they are handed over. False:
    /// the caller acknowledges each with [`Session::acknowledge`](crate::Session::acknowledge)
    /// (a probe that must leave other messages queued for their owner).
    pub auto_ack: bool,
}

impl Options {
    /// Options for `client_id`: clean start, 60 s keep alive, 10 s timeouts, a window of 16
    /// both ways, packets up to 1 MiB, incoming messages acknowledged on hand-over.
    pub fn new(protocol: ProtocolVersion, client_id: impl Into<String>) -> Self {
        Self {
            protocol,
            client_id: client_id.into(),
            username: None,
            password: None,
            keep_alive: Duration::from_secs(60),
            ping_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            clean_start: true,
            session_expiry: 0,
            receive_maximum: 16,
            max_packet_size: 1024 * 1024,
            max_inflight: 16,
            user_properties: Vec::new(),
            auto_ack: true,
        }
    }

    /// Says in CONNECT whether the stream goes through an HTTP proxy (replaces an earlier
    /// value).
    pub fn set_via_proxy(&mut self, via_proxy: bool) {
        self.user_properties
            .retain(|(k, _)| k != VIA_PROXY_PROPERTY);
        self.user_properties
            .push((VIA_PROXY_PROPERTY.to_owned(), via_proxy.to_string()));
    }

    /// Keep alive in whole seconds as CONNECT carries it.
    pub(crate) fn keep_alive_secs(&self) -> u16 {
        u16::try_from(self.keep_alive.as_secs()).unwrap_or(u16::MAX)
    }

    /// The CONNECT these options ask for. MQTT 3.1.1 has no properties: session expiry,
    /// receive maximum, packet size and user properties are v5 only.
    pub fn connect_packet(&self) -> Connect {
        let properties = if self.protocol == ProtocolVersion::V5 {
            Properties::from(PropertySet {
                session_expiry_interval: (self.session_expiry > 0).then_some(self.session_expiry),
                receive_maximum: Some(self.receive_maximum.max(1)),
                maximum_packet_size: Some(self.max_packet_size),
                request_problem_information: Some(1),
                user_properties: self.user_properties.clone(),
                ..PropertySet::default()
            })
        } else {
            Properties::default()
        };
        Connect {
            clean_start: self.clean_start,
            username: self.username.clone(),
            password: self.password.clone(),
            properties,
            ..Connect::new(
                self.protocol,
                self.client_id.clone(),
                self.keep_alive_secs(),
            )
        }
    }
}
