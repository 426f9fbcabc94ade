//! Why the console's broker connection ended or could not start. The message is shown in
//! the push service status and logged; the dispatcher reconnects with backoff after any.

/// Why the console's broker connection ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No broker is configured (`--broker none`).
    #[error("no broker configured: start the console with --broker mqtts://host[:port]")]
    NotConfigured,
    /// The TCP connection to a development broker (`mqtt://`) did not open within 10 s.
    #[error("TCP connect to {address} timed out: check that the broker runs and listens there")]
    ConnectTimeout {
        /// `host:port`.
        address: String,
    },
    /// The TCP connection to a development broker (`mqtt://`) failed.
    #[error("TCP connect to {address} failed: {source}")]
    Connect {
        /// `host:port`.
        address: String,
        /// The error.
        source: std::io::Error,
    },
    /// The console could not issue its own client certificate from its CA.
    #[error("cannot issue the console's client certificate: {0}")]
    Identity(#[from] beckon_pki::PkiError),
    /// The TLS client configuration could not be built (e.g. an unreadable --broker-ca).
    #[error("cannot set up TLS towards the broker: {0}")]
    Tls(#[from] beckon_net::tls::TlsConfigError),
    /// No path to the broker worked (TCP, TLS, proxy and WebSocket rungs).
    #[error(transparent)]
    Ladder(#[from] beckon_net::LadderError),
    /// The broker closed the connection.
    #[error("the broker closed the connection")]
    Closed,
    /// Reading the socket failed.
    #[error("reading from the broker failed: {0}")]
    Read(std::io::Error),
    /// Writing the socket failed.
    #[error("writing to the broker failed: {0}")]
    Write(std::io::Error),
    /// The socket writer is gone (the connection closed while the dispatcher wrote).
    #[error("writing to the broker failed: the connection is closed")]
    WriterGone,
    /// The socket reader is gone.
    #[error("the broker connection's reader stopped")]
    ReaderGone,
    /// The broker sent bytes that are not an MQTT 5 packet.
    #[error("the broker sent a malformed packet: {0}")]
    Malformed(#[from] beckon_mqtt::DecodeError),
    /// A packet could not be encoded (a wake-up larger than MQTT allows).
    #[error("cannot encode a packet: {0}")]
    Encode(#[from] beckon_mqtt::EncodeError),
    /// No CONNACK within 10 s.
    #[error("the broker did not answer CONNECT within 10 s")]
    NoConnAck,
    /// The broker refused the console's CONNECT.
    #[error("the broker refused the console's connection (reason 0x{code:02X}{})", reason_suffix(.reason))]
    Refused {
        /// The CONNACK reason code.
        code: u8,
        /// The broker's reason string.
        reason: Option<String>,
    },
    /// The broker answered CONNECT with something else than CONNACK.
    #[error("the broker answered CONNECT with packet type {0}")]
    NotConnAck(u8),
    /// The broker sent DISCONNECT.
    #[error("the broker disconnected the console (reason 0x{code:02X}{})", reason_suffix(.reason))]
    Disconnected {
        /// The DISCONNECT reason code.
        code: u8,
        /// The broker's reason string.
        reason: Option<String>,
    },
    /// Neither PINGRESP nor anything else for one and a half keep-alive periods.
    #[error("the broker stopped answering (no PINGRESP)")]
    NoPingResp,
    /// The broker's Receive Maximum stayed used up for one and a half keep-alive periods.
    #[error("the broker stopped acknowledging wake-ups (no PUBACK)")]
    NoPubAck,
    /// A signing task on the blocking pool failed.
    #[error("signing wake-ups stopped: {0}")]
    SigningStopped(#[from] tokio::task::JoinError),
    /// The store could not list what is queued.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn reason_suffix(reason: &Option<String>) -> String {
    reason
        .as_ref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default()
}
