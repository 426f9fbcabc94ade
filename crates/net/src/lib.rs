//! beckon-net: the client side of Beckon's wire.
//!
//! Every program that connects to a broker (the agent, the doctor, the bench, the console's own
//! broker connection) builds its connection from the same parts, so that what the doctor tests
//! is exactly what the agent does:
//!
//! - [`tcp`]: name resolution (reported on its own, so "the name does not resolve" is a
//!   separate finding) and TCP connect with timeouts and an optional local source address;
//! - [`http`]: the HTTP/1.1 client (hyper) over these connectors, for talking to the console;
//! - [`proxy`]: HTTP `CONNECT` through a proxy, with Basic authentication;
//! - [`tls`]: the TLS client (rustls with aws-lc-rs), ALPN, certificate checks with plain-words
//!   errors, and what was negotiated;
//! - [`ws`]: MQTT over WebSocket as a plain byte stream;
//! - [`path`]: the ways to reach a broker (transport x route) and their presence labels;
//! - [`ladder`]: the connection ladder that tries those paths in the agreed order;
//! - [`backoff`]: exponential reconnect backoff with full jitter;
//! - [`wol`]: the Wake-on-LAN magic packet and its UDP sender (console and relaying agent).
//!
//! All waits are bounded by explicit timeouts; all errors say what failed, where, and the
//! likely fix.
//!
//! An agent's connection loop, in short:
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Instant;
//! use beckon_net::{Backoff, BackoffConfig, ConnectionLadder, LadderConfig, TlsClient};
//! use beckon_net::{TlsSettings, TrustAnchors};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = Arc::new(TlsClient::new(&TlsSettings {
//!     trust: TrustAnchors::CaFile("state/ca.pem".into()),
//!     ..TlsSettings::default()
//! })?);
//! let mut config = LadderConfig::new("broker.example");
//! config.proxy = Some("http://proxy.example:3128".parse()?);
//! let stored: Option<String> = None; // the path that worked last time, from the state folder
//! let mut ladder = ConnectionLadder::new(config, tls)
//!     .with_last_working(stored.and_then(|s| s.parse().ok()));
//! let mut backoff = Backoff::new(BackoffConfig::default())?;
//! tokio::time::sleep(backoff.startup_delay()).await;
//! let connected = loop {
//!     match ladder.connect().await {
//!         Ok(connected) => break connected,
//!         Err(every_rung) => {
//!             eprintln!("{every_rung}");
//!             tokio::time::sleep(backoff.next_delay()).await;
//!         }
//!     }
//! };
//! // Store `connected.path.to_string()`; speak MQTT on `connected.stream` with keepalive
//! // `connected.path.recommended_keepalive()`; after CONNACK:
//! backoff.connected(Instant::now());
//! // ... and when the connection drops:
//! backoff.disconnected(Instant::now());
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod backoff;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod ladder;
pub mod path;
pub mod proxy;
pub mod slots;
pub mod stream;
pub mod tcp;
pub mod time;
pub mod tls;
pub mod wol;
pub mod ws;

pub use backoff::{Backoff, BackoffConfig, InvalidBackoff};
pub use ladder::{
    Connected, ConnectionLadder, LadderConfig, LadderError, PathError, RungError, RungFailure,
    Stage, Timeouts, Timings, connect_path,
};
pub use path::{Path, PathParseError, Route, Transport};
pub use proxy::{PrefixedStream, ProxyError, ProxyUrl, ProxyUrlError, SYSTEM_PROXY, http_connect};
pub use slots::{ConnectionSlots, LogEvery};
pub use stream::{BoxedStream, ByteStream};
pub use tcp::{ResolveError, TcpError, TcpOptions, connect_addrs, resolve};
pub use tls::{
    ClientIdentity, PeerCertificate, TlsClient, TlsConfigError, TlsError, TlsSessionInfo,
    TlsSettings, TlsStream, TlsVersion, TrustAnchors,
};
pub use ws::{WsByteStream, WsError, WsSettings, websocket_handshake};

#[cfg(test)]
mod test_support {
    /// A loopback port on which nothing listens: bind, read the port, close.
    pub(crate) fn refused_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener.local_addr().expect("local address").port()
    }
}
