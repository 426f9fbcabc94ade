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
    DialTimeout {
        /// `host:port`.
        address: String,
    },
    /// The TCP connection to a development broker (`mqtt://`) failed.
    #[error("TCP connect to {address} failed: {source}")]
    Dial {
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
    /// The connection to the broker ended (reading or writing failed, or the broker broke
    /// the protocol).
    #[error("the broker connection ended: {0}")]
    Ended(beckon_client::End),
    /// The client session could not queue a packet (a wake-up larger than the broker
    /// accepts, say).
    #[error("cannot send to the broker: {0}")]
    Session(#[from] beckon_client::Error),
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
    /// The broker sent DISCONNECT.
    #[error("the broker disconnected the console (reason 0x{code:02X}{})", reason_suffix(.reason))]
    Disconnected {
        /// The DISCONNECT reason code.
        code: u8,
        /// The broker's reason string.
        reason: Option<String>,
    },
    /// No PINGRESP within the session's ping timeout.
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

impl From<beckon_client::End> for LinkError {
    fn from(end: beckon_client::End) -> Self {
        use beckon_client::End;
        match end {
            End::Refused { code, reason, .. } => Self::Refused {
                code: code.0,
                reason,
            },
            End::Disconnected { code, reason, .. } => Self::Disconnected {
                code: code.0,
                reason,
            },
            End::ConnectTimeout => Self::NoConnAck,
            End::PingTimeout => Self::NoPingResp,
            End::Closed => Self::Closed,
            other => Self::Ended(other),
        }
    }
}

fn reason_suffix(reason: &Option<String>) -> String {
    reason
        .as_ref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default()
}
