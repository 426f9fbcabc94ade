//! The ways to reach a broker: a transport (MQTT over TLS on the primary port, or on the
//! fallback port with ALPN `mqtt`, or over WebSocket there) crossed with a route (direct, or
//! through an HTTP proxy).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::proxy::{ProxyUrl, ProxyUrlError};

/// How MQTT is carried to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// MQTT over TLS on the primary port (8883).
    Mqtts,
    /// MQTT over TLS with ALPN `mqtt` on the fallback port (443), shared with HTTPS.
    AlpnMqtt,
    /// MQTT over WebSocket (`/mqtt`, subprotocol `mqtt`) over TLS on the fallback port (443).
    WebSocket,
}

impl Transport {
    /// Every transport, in the ladder's order.
    pub const ALL: [Self; 3] = [Self::Mqtts, Self::AlpnMqtt, Self::WebSocket];

    /// The presence label: `8883`, `443-mqtt` or `443-websocket`. The labels name the kind of
    /// path, whatever port numbers are configured.
    pub fn label(self) -> &'static str {
        match self {
            Self::Mqtts => "8883",
            Self::AlpnMqtt => "443-mqtt",
            Self::WebSocket => "443-websocket",
        }
    }

    /// True for the transports that use the fallback port.
    pub fn uses_fallback_port(self) -> bool {
        !matches!(self, Self::Mqtts)
    }

    /// The ALPN protocols to offer in the TLS handshake.
    pub fn alpn(self) -> &'static [&'static str] {
        match self {
            // The broker's 8883 speaks only MQTT; offering `mqtt` is harmless elsewhere.
            Self::Mqtts | Self::AlpnMqtt => &["mqtt"],
            Self::WebSocket => &["http/1.1"],
        }
    }
}

/// Whether the connection goes straight to the broker or through an HTTP proxy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Route {
    /// Straight to the broker.
    Direct,
    /// Through this HTTP proxy (CONNECT tunnel).
    Proxy(ProxyUrl),
}

/// One way to reach the broker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Path {
    /// How MQTT is carried.
    pub transport: Transport,
    /// Direct or through a proxy.
    pub route: Route,
}

impl Path {
    /// A direct path.
    pub fn direct(transport: Transport) -> Self {
        Self {
            transport,
            route: Route::Direct,
        }
    }

    /// A path through `proxy`.
    pub fn via(transport: Transport, proxy: ProxyUrl) -> Self {
        Self {
            transport,
            route: Route::Proxy(proxy),
        }
    }

    /// True when the path goes through a proxy.
    pub fn is_proxied(&self) -> bool {
        matches!(self.route, Route::Proxy(_))
    }

    /// The presence label: `8883`, `443-mqtt`, `443-websocket`, with ` via proxy` appended
    /// for proxied paths.
    pub fn label(&self) -> String {
        match self.route {
            Route::Direct => self.transport.label().to_owned(),
            Route::Proxy(_) => format!("{} via proxy", self.transport.label()),
        }
    }

    /// The MQTT keepalive this path calls for: 60 s on the primary port, 30 s on the fallback
    /// port or through a proxy, whose idle connections get cut.
    pub fn recommended_keepalive(&self) -> Duration {
        if self.transport.uses_fallback_port() || self.is_proxied() {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(60)
        }
    }
}

/// The stored form, which [`FromStr`] reads back: the label, then ` via ` and the proxy's
/// address for proxied paths (`443-mqtt via http://proxy.example:3128`).
impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.route {
            Route::Direct => f.write_str(self.transport.label()),
            Route::Proxy(proxy) => write!(f, "{} via {proxy}", self.transport.label()),
        }
    }
}

/// A stored path that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathParseError {
    /// The transport part is not one of the labels.
    #[error(
        "unknown path {0:?}: expected 8883, 443-mqtt or 443-websocket, optionally followed by \"via http://proxy:port\""
    )]
    UnknownTransport(String),
    /// The proxy part is not a usable proxy address.
    #[error("path with an unusable proxy: {0}")]
    Proxy(#[from] ProxyUrlError),
}

impl FromStr for Path {
    type Err = PathParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (transport, proxy) = match s.split_once(" via ") {
            Some((t, p)) => (t.trim(), Some(p.trim())),
            None => (s, None),
        };
        let transport = Transport::ALL
            .into_iter()
            .find(|t| t.label() == transport)
            .ok_or_else(|| PathParseError::UnknownTransport(s.to_owned()))?;
        Ok(match proxy {
            None => Self::direct(transport),
            Some(p) => Self::via(transport, p.parse()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_match_the_presence_contract() {
        assert_eq!(Path::direct(Transport::Mqtts).label(), "8883");
        assert_eq!(Path::direct(Transport::AlpnMqtt).label(), "443-mqtt");
        assert_eq!(Path::direct(Transport::WebSocket).label(), "443-websocket");
        let proxy = ProxyUrl::new("proxy.example", 3128);
        assert_eq!(
            Path::via(Transport::WebSocket, proxy).label(),
            "443-websocket via proxy"
        );
    }

    #[test]
    fn stored_form_reads_back() {
        let proxy = ProxyUrl::new("proxy.example", 3128);
        for path in [
            Path::direct(Transport::Mqtts),
            Path::direct(Transport::AlpnMqtt),
            Path::direct(Transport::WebSocket),
            Path::via(Transport::Mqtts, proxy.clone()),
            Path::via(Transport::AlpnMqtt, ProxyUrl::new("::1", 8080)),
            Path::via(Transport::WebSocket, proxy),
        ] {
            let stored = path.to_string();
            assert_eq!(stored.parse::<Path>().expect(&stored), path, "{stored}");
        }
        assert_eq!(
            Path::via(Transport::AlpnMqtt, ProxyUrl::new("p", 3128)).to_string(),
            "443-mqtt via http://p:3128"
        );
    }

    #[test]
    fn bad_stored_paths_are_errors() {
        assert!(matches!(
            "1883".parse::<Path>(),
            Err(PathParseError::UnknownTransport(_))
        ));
        assert!(matches!(
            "8883 via https://p:1".parse::<Path>(),
            Err(PathParseError::Proxy(_))
        ));
    }

    #[test]
    fn keepalive_is_shorter_on_fragile_paths() {
        assert_eq!(
            Path::direct(Transport::Mqtts).recommended_keepalive(),
            Duration::from_secs(60)
        );
        assert_eq!(
            Path::direct(Transport::WebSocket).recommended_keepalive(),
            Duration::from_secs(30)
        );
        assert_eq!(
            Path::via(Transport::Mqtts, ProxyUrl::new("p", 1)).recommended_keepalive(),
            Duration::from_secs(30)
        );
    }
}
