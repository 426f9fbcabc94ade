//! The connection ladder: the agreed order of paths to the broker, tried one after the other
//! with bounded waits, starting from the path that last worked.
//!
//! With a proxy: through the proxy to the primary port, then to the fallback port (ALPN
//! `mqtt`, then WebSocket), then the same three directly (unless the policy forbids going
//! direct). Without: direct primary port, then the fallback port with ALPN `mqtt`, then
//! WebSocket.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::path::{Path, Route, Transport};
use crate::proxy::{PrefixedStream, ProxyError, ProxyUrl, http_connect};
use crate::stream::BoxedStream;
use crate::tcp::{ResolveError, TcpError, TcpOptions, connect_addrs, resolve};
use crate::tls::{TlsClient, TlsError, TlsSessionInfo};
use crate::ws::{WsError, WsSettings, websocket_handshake};

/// How long each step of a connection attempt may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Name resolution. Default 5 s.
    pub resolve: Duration,
    /// TCP connect, per address. Default 10 s.
    pub tcp_connect: Duration,
    /// The proxy's answer to CONNECT. Default 10 s.
    pub proxy_connect: Duration,
    /// The TLS handshake. Default 10 s.
    pub tls_handshake: Duration,
    /// The WebSocket upgrade. Default 10 s.
    pub websocket_handshake: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            resolve: Duration::from_secs(5),
            tcp_connect: Duration::from_secs(10),
            proxy_connect: Duration::from_secs(10),
            tls_handshake: Duration::from_secs(10),
            websocket_handshake: Duration::from_secs(10),
        }
    }
}

/// Where the broker is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LadderConfig {
    /// The broker's host name or IP address.
    pub broker_host: String,
    /// The name checked in the broker's certificate (and sent as SNI and WebSocket `Host`).
    /// Default: `broker_host`.
    pub server_name: Option<String>,
    /// The primary MQTT-over-TLS port. Default 8883.
    pub primary_port: u16,
    /// The fallback port shared with HTTPS (ALPN `mqtt` and WebSocket). Default 443.
    pub fallback_port: u16,
    /// The HTTP proxy to try first, if any. Default none.
    pub proxy: Option<ProxyUrl>,
    /// Whether the direct paths follow the proxy's (default true). False where the network
    /// only lets the proxy out, or policy says all traffic goes through it; without a proxy
    /// the direct paths are the ladder whatever this says.
    pub direct_fallback: bool,
    /// WebSocket path and limits.
    pub websocket: WsSettings,
    /// Local source address for TCP connections. Default: chosen by the system.
    pub local_addr: Option<IpAddr>,
    /// Per-step timeouts.
    pub timeouts: Timeouts,
}

impl LadderConfig {
    /// Defaults for the broker at `broker_host`: ports 8883 and 443, no proxy.
    pub fn new(broker_host: impl Into<String>) -> Self {
        Self {
            broker_host: broker_host.into(),
            server_name: None,
            primary_port: 8883,
            fallback_port: 443,
            proxy: None,
            direct_fallback: true,
            websocket: WsSettings::default(),
            local_addr: None,
            timeouts: Timeouts::default(),
        }
    }

    /// The name checked in the broker's certificate.
    pub fn server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or(&self.broker_host)
    }

    /// The broker port a transport uses.
    pub fn port_for(&self, transport: Transport) -> u16 {
        if transport.uses_fallback_port() {
            self.fallback_port
        } else {
            self.primary_port
        }
    }

    /// Every path, in the ladder's order.
    pub fn rungs(&self) -> Vec<Path> {
        let mut rungs = Vec::with_capacity(6);
        if let Some(proxy) = &self.proxy {
            rungs.extend(
                Transport::ALL
                    .into_iter()
                    .map(|t| Path::via(t, proxy.clone())),
            );
            if !self.direct_fallback {
                return rungs;
            }
        }
        rungs.extend(Transport::ALL.into_iter().map(Path::direct));
        rungs
    }

    fn tcp_options(&self) -> TcpOptions {
        TcpOptions {
            connect_timeout: self.timeouts.tcp_connect,
            local_addr: self.local_addr,
            nodelay: true,
        }
    }
}

/// The step of a connection attempt that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Resolving the broker's or the proxy's name.
    Resolve,
    /// The TCP connection (to the broker, or to the proxy).
    Tcp,
    /// The proxy's CONNECT tunnel.
    Proxy,
    /// The TLS handshake and ALPN.
    Tls,
    /// The WebSocket upgrade.
    WebSocket,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Resolve => "DNS",
            Self::Tcp => "TCP",
            Self::Proxy => "proxy CONNECT",
            Self::Tls => "TLS",
            Self::WebSocket => "WebSocket",
        })
    }
}

/// One path failed.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The broker's name does not resolve.
    #[error(transparent)]
    ResolveBroker(ResolveError),
    /// The proxy's name does not resolve.
    #[error("cannot find the proxy: {0}")]
    ResolveProxy(ResolveError),
    /// TCP to the broker failed.
    #[error(transparent)]
    Tcp(TcpError),
    /// TCP to the proxy failed.
    #[error("cannot reach the proxy {proxy}: {source}")]
    TcpToProxy {
        /// The proxy.
        proxy: ProxyUrl,
        /// What failed.
        source: TcpError,
    },
    /// The proxy did not open the tunnel.
    #[error(transparent)]
    Proxy(ProxyError),
    /// The TLS handshake failed.
    #[error(transparent)]
    Tls(TlsError),
    /// TLS worked but the server did not choose ALPN `mqtt` on the fallback port.
    #[error(
        "{server} port {port} accepted TLS but did not choose the application protocol mqtt (ALPN; it chose {}): it is not a Beckon broker's shared port, or a TLS-terminating device is in the way",
        chosen.as_deref().unwrap_or("none")
    )]
    AlpnNotNegotiated {
        /// The server name.
        server: String,
        /// The port.
        port: u16,
        /// What the server chose, if anything.
        chosen: Option<String>,
    },
    /// The WebSocket upgrade failed.
    #[error(transparent)]
    WebSocket(WsError),
}

impl PathError {
    /// The step that failed.
    pub fn stage(&self) -> Stage {
        match self {
            Self::ResolveBroker(_) | Self::ResolveProxy(_) => Stage::Resolve,
            Self::Tcp(_) | Self::TcpToProxy { .. } => Stage::Tcp,
            Self::Proxy(_) => Stage::Proxy,
            Self::Tls(_) | Self::AlpnNotNegotiated { .. } => Stage::Tls,
            Self::WebSocket(_) => Stage::WebSocket,
        }
    }
}

/// How long each step took on a successful connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    /// Name resolution (of the broker, or of the proxy).
    pub resolve: Duration,
    /// TCP connect.
    pub tcp: Duration,
    /// The proxy's CONNECT, when proxied.
    pub proxy: Option<Duration>,
    /// The TLS handshake.
    pub tls: Duration,
    /// The WebSocket upgrade, on WebSocket paths.
    pub websocket: Option<Duration>,
}

/// A connection ready for MQTT.
pub struct Connected {
    /// The byte stream to speak MQTT on.
    pub stream: BoxedStream,
    /// The path it took.
    pub path: Path,
    /// The TCP peer: the broker, or the proxy on proxied paths.
    pub peer: SocketAddr,
    /// What TLS negotiated.
    pub tls: TlsSessionInfo,
    /// How long each step took.
    pub timings: Timings,
    /// The rungs that failed before this one, in the order tried (empty from
    /// [`connect_path`]); worth logging, and showing in the agent's status.
    pub failed_before: Vec<RungFailure>,
}

impl fmt::Debug for Connected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connected")
            .field("path", &self.path)
            .field("peer", &self.peer)
            .field("tls", &self.tls)
            .field("timings", &self.timings)
            .field("failed_before", &self.failed_before)
            .finish_non_exhaustive()
    }
}

/// Connects over one path: resolve, TCP, (proxy CONNECT), TLS, (ALPN check or WebSocket).
pub async fn connect_path(
    config: &LadderConfig,
    tls: &TlsClient,
    path: &Path,
) -> Result<Connected, PathError> {
    let port = config.port_for(path.transport);
    let timeouts = config.timeouts;
    let mut timings = Timings::default();

    let started = Instant::now();
    let (stream, peer): (PrefixedStream<TcpStream>, SocketAddr) = match &path.route {
        Route::Direct => {
            let addrs = resolve(&config.broker_host, port, timeouts.resolve)
                .await
                .map_err(PathError::ResolveBroker)?;
            timings.resolve = started.elapsed();
            let (tcp, peer) = connect_addrs(&config.broker_host, &addrs, &config.tcp_options())
                .await
                .map_err(PathError::Tcp)?;
            timings.tcp = started.elapsed() - timings.resolve;
            (PrefixedStream::new(Bytes::new(), tcp), peer)
        }
        Route::Proxy(proxy) => {
            let addrs = resolve(proxy.host(), proxy.port(), timeouts.resolve)
                .await
                .map_err(PathError::ResolveProxy)?;
            timings.resolve = started.elapsed();
            let (tcp, peer) = connect_addrs(proxy.host(), &addrs, &config.tcp_options())
                .await
                .map_err(|source| PathError::TcpToProxy {
                    proxy: proxy.clone(),
                    source,
                })?;
            timings.tcp = started.elapsed() - timings.resolve;
            let before = Instant::now();
            let tunnel = http_connect(
                tcp,
                proxy,
                &config.broker_host,
                port,
                timeouts.proxy_connect,
            )
            .await
            .map_err(PathError::Proxy)?;
            timings.proxy = Some(before.elapsed());
            (tunnel, peer)
        }
    };

    let before = Instant::now();
    let server = config.server_name();
    let (tls_stream, info) = tls
        .connect(
            stream,
            server,
            path.transport.alpn(),
            timeouts.tls_handshake,
        )
        .await
        .map_err(PathError::Tls)?;
    timings.tls = before.elapsed();

    let stream: BoxedStream = match path.transport {
        Transport::Mqtts => Box::new(tls_stream),
        Transport::AlpnMqtt => {
            if info.alpn.as_deref() != Some("mqtt") {
                return Err(PathError::AlpnNotNegotiated {
                    server: server.to_owned(),
                    port,
                    chosen: info.alpn,
                });
            }
            Box::new(tls_stream)
        }
        Transport::WebSocket => {
            let before = Instant::now();
            let ws = websocket_handshake(
                tls_stream,
                server,
                port,
                &config.websocket,
                timeouts.websocket_handshake,
            )
            .await
            .map_err(PathError::WebSocket)?;
            timings.websocket = Some(before.elapsed());
            Box::new(ws)
        }
    };
    Ok(Connected {
        stream,
        path: path.clone(),
        peer,
        tls: info,
        timings,
        failed_before: Vec::new(),
    })
}

/// Why one rung of the ladder did not give a connection.
#[derive(Debug, thiserror::Error)]
pub enum RungError {
    /// It was tried and failed.
    #[error(transparent)]
    Failed(PathError),
    /// It was not tried because an earlier rung failed for a reason that applies here too
    /// (the same name, proxy, port or certificate).
    #[error("not tried: it would fail like {earlier} above")]
    Skipped {
        /// The label of the rung whose failure applies.
        earlier: String,
    },
}

/// One rung's failure.
#[derive(Debug)]
pub struct RungFailure {
    /// The path.
    pub path: Path,
    /// What happened.
    pub error: RungError,
}

/// Every rung failed.
#[derive(Debug)]
pub struct LadderError {
    /// The broker that was tried.
    pub broker: String,
    /// Each rung's failure, in the order tried.
    pub failures: Vec<RungFailure>,
}

impl fmt::Display for LadderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no path to the broker {} worked:", self.broker)?;
        for failure in &self.failures {
            write!(f, "\n  - {}: {}", failure.path.label(), failure.error)?;
        }
        Ok(())
    }
}

impl std::error::Error for LadderError {}

/// True when `earlier`'s failure on `earlier_path` would repeat on `next`: same route, and a
/// cause that does not depend on what differs between the two.
fn repeats(config: &LadderConfig, earlier_path: &Path, earlier: &PathError, next: &Path) -> bool {
    if earlier_path.route != next.route {
        return false;
    }
    let same_port = config.port_for(earlier_path.transport) == config.port_for(next.transport);
    match earlier {
        PathError::ResolveBroker(_) | PathError::ResolveProxy(_) | PathError::TcpToProxy { .. } => {
            true
        }
        PathError::Proxy(e) => e.is_proxy_wide() || same_port,
        PathError::Tcp(_) => same_port,
        PathError::Tls(
            TlsError::UntrustedCertificate { .. }
            | TlsError::ExpiredCertificate { .. }
            | TlsError::NotYetValidCertificate { .. }
            | TlsError::WrongHostName { .. }
            | TlsError::BadCertificate { .. },
        ) => same_port,
        PathError::Tls(_) | PathError::AlpnNotNegotiated { .. } | PathError::WebSocket(_) => false,
    }
}

/// The connection ladder. Keeps the path that last worked and starts from it.
#[derive(Debug)]
pub struct ConnectionLadder {
    config: LadderConfig,
    tls: Arc<TlsClient>,
    last_working: Option<Path>,
}

impl ConnectionLadder {
    /// A ladder for `config`, using `tls` for every handshake.
    pub fn new(config: LadderConfig, tls: Arc<TlsClient>) -> Self {
        Self {
            config,
            tls,
            last_working: None,
        }
    }

    /// Starts from `path` (as stored by the caller after an earlier success). A path that is
    /// not one of this ladder's rungs (say the proxy changed) is ignored.
    pub fn with_last_working(mut self, path: Option<Path>) -> Self {
        self.last_working = path;
        self
    }

    /// The path of the last successful connection (store it with `to_string()`).
    pub fn last_working(&self) -> Option<&Path> {
        self.last_working.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &LadderConfig {
        &self.config
    }

    /// The order the next [`connect`](Self::connect) tries: the last working path first, then
    /// the others in the ladder's order.
    pub fn attempt_order(&self) -> Vec<Path> {
        let mut rungs = self.config.rungs();
        if let Some(i) = self
            .last_working
            .as_ref()
            .and_then(|last| rungs.iter().position(|p| p == last))
        {
            let first = rungs.remove(i);
            rungs.insert(0, first);
        }
        rungs
    }

    /// Tries each rung in [`attempt_order`](Self::attempt_order) until one connects. On
    /// success the path is remembered as the last working one.
    pub async fn connect(&mut self) -> Result<Connected, LadderError> {
        let mut failures: Vec<RungFailure> = Vec::new();
        for path in self.attempt_order() {
            let earlier = failures.iter().find_map(|f| match &f.error {
                RungError::Failed(e) if repeats(&self.config, &f.path, e, &path) => {
                    Some(f.path.label())
                }
                _ => None,
            });
            if let Some(earlier) = earlier {
                failures.push(RungFailure {
                    path,
                    error: RungError::Skipped { earlier },
                });
                continue;
            }
            match connect_path(&self.config, &self.tls, &path).await {
                Ok(mut connected) => {
                    tracing::info!(
                        path = %connected.path.label(),
                        peer = %connected.peer,
                        failed_before = failures.len(),
                        "connected to the broker"
                    );
                    self.last_working = Some(connected.path.clone());
                    connected.failed_before = failures;
                    return Ok(connected);
                }
                Err(error) => {
                    tracing::debug!(path = %path.label(), %error, "path failed");
                    failures.push(RungFailure {
                        path,
                        error: RungError::Failed(error),
                    });
                }
            }
        }
        Err(LadderError {
            broker: self.config.broker_host.clone(),
            failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rung_order_without_proxy() {
        let config = LadderConfig::new("broker.example");
        let labels: Vec<String> = config.rungs().iter().map(Path::label).collect();
        assert_eq!(labels, ["8883", "443-mqtt", "443-websocket"]);
    }

    #[test]
    fn rung_order_with_proxy() {
        let mut config = LadderConfig::new("broker.example");
        config.proxy = Some(ProxyUrl::new("proxy.example", 3128));
        let labels: Vec<String> = config.rungs().iter().map(Path::label).collect();
        assert_eq!(
            labels,
            [
                "8883 via proxy",
                "443-mqtt via proxy",
                "443-websocket via proxy",
                "8883",
                "443-mqtt",
                "443-websocket"
            ]
        );
        config.direct_fallback = false;
        let labels: Vec<String> = config.rungs().iter().map(Path::label).collect();
        assert_eq!(
            labels,
            [
                "8883 via proxy",
                "443-mqtt via proxy",
                "443-websocket via proxy"
            ],
            "the policy forbids going direct"
        );
        config.proxy = None;
        let labels: Vec<String> = config.rungs().iter().map(Path::label).collect();
        assert_eq!(
            labels,
            ["8883", "443-mqtt", "443-websocket"],
            "no proxy: direct"
        );
    }
}
