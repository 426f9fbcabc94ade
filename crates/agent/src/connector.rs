//! How the agent gets a byte stream to the broker. The reconnect loop only knows this trait,
//! so tests drive it with in-memory streams; the production agent uses [`LadderConnector`],
//! the connection ladder of `beckon-net` (8883, 443 ALPN `mqtt`, 443 WebSocket; through the
//! proxy first when one is configured or the system has one; starting from the path that last
//! worked).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use beckon_net::{ClientIdentity, ConnectionLadder, LadderConfig, Path, TlsClient, TlsSettings};

use tokio::net::TcpStream;

pub use beckon_net::{BoxedStream, ByteStream};

/// A stream to the broker and how it was reached.
pub struct Connection {
    /// The stream, ready for MQTT CONNECT.
    pub stream: BoxedStream,
    /// The path, as a string the connector understands again (`direct:8883`, ...).
    pub path: String,
    /// True for paths whose idle connections get cut (443, any proxy): shorter keepalive.
    pub fallback: bool,
    /// True when the stream goes through an HTTP proxy (told to the broker for presence).
    pub via_proxy: bool,
}

/// Why no stream could be opened, in plain words with the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(pub String);

/// Opens streams to the broker.
pub trait Connector: Send + 'static {
    /// Opens a stream, trying the paths in order from the preferred one.
    fn connect(&mut self) -> impl Future<Output = Result<Connection, ConnectError>> + Send;

    /// Start from this path next time (the last one that worked, read from the state folder).
    fn prefer(&mut self, path: &str);

    /// The broker sent "use another server"/"server moved" with this Server Reference
    /// (`host` or `host:port`, possibly several separated by spaces).
    fn redirect(&mut self, server_reference: &str);

    /// The proxy the last attempt used and where it came from (`beckon agent status` shows
    /// it); `None` for connectors that never use one.
    fn proxy_found(&self) -> Option<String> {
        None
    }
}

/// Plain TCP to `host:port`: development brokers on loopback, and tests. No TLS.
pub struct PlainTcpConnector {
    host: String,
    port: u16,
    timeout: Duration,
}

impl PlainTcpConnector {
    /// A connector to `host:port` with a connect timeout.
    pub fn new(host: &str, port: u16, timeout: Duration) -> Self {
        Self {
            host: host.to_owned(),
            port,
            timeout,
        }
    }
}

impl Connector for PlainTcpConnector {
    async fn connect(&mut self) -> Result<Connection, ConnectError> {
        let target = (self.host.as_str(), self.port);
        let label = format!("{}:{}", self.host, self.port);
        match tokio::time::timeout(self.timeout, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => {
                // Small packets, sent at once.
                let _ = stream.set_nodelay(true);
                Ok(Connection {
                    stream: Box::new(stream),
                    path: format!("plain:{}", self.port),
                    fallback: false,
                    via_proxy: false,
                })
            }
            Ok(Err(e)) => Err(ConnectError(format!(
                "TCP connection to {label} failed: {e}; is the broker running and the port open?"
            ))),
            Err(_) => Err(ConnectError(format!(
                "TCP connection to {label} timed out after {:?}; check the host name and firewall",
                self.timeout
            ))),
        }
    }

    fn prefer(&mut self, _path: &str) {}

    fn redirect(&mut self, server_reference: &str) {
        if let Some((host, port)) = parse_server_reference(server_reference, self.port) {
            self.host = host;
            self.port = port;
        }
    }
}

/// The connection ladder of `beckon-net`: TLS to the broker by every path the agent may use.
pub struct LadderConnector {
    ladder: ConnectionLadder,
    tls: Arc<TlsClient>,
    /// What `tls` was built from, to build it again when the certificate is renewed.
    settings: TlsSettings,
    /// Size and modification time of the client certificate file `tls` holds.
    cert_stamp: Option<(std::time::SystemTime, u64)>,
    /// `broker.host` then `broker.more_hosts`: the cluster nodes tried in turn.
    hosts: Vec<String>,
    /// Index in `hosts` of the node the ladder aims at.
    current: usize,
    /// `broker.proxy`: an address, or the system's setting, read again at each attempt.
    proxy_setting: Option<crate::proxy::ProxySetting>,
    /// The proxy the ladder holds and where it came from.
    proxy: crate::proxy::FoundProxy,
}

fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Why the ladder could not be set up (bad CA, certificate or key).
#[derive(Debug, thiserror::Error)]
pub enum LadderSetupError {
    /// The TLS client could not load its CA or identity.
    #[error("TLS setup for the push service: {0}")]
    Tls(#[from] beckon_net::TlsConfigError),
}

impl LadderConnector {
    /// A ladder to `config.broker` with its CA, client certificate and proxy.
    pub fn new(config: &crate::AgentConfig) -> Result<Self, LadderSetupError> {
        let broker = &config.broker;
        crate::renew::complete_interrupted(broker);
        let settings = TlsSettings {
            trust: broker.trust_anchors(),
            identity: match (&broker.client_cert, &broker.client_key) {
                (Some(cert), Some(key)) => Some(ClientIdentity::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
            ..TlsSettings::default()
        };
        let tls = Arc::new(TlsClient::new(&settings)?);
        let cert_stamp = broker.client_cert.as_deref().and_then(file_stamp);
        let mut ladder_config = LadderConfig::new(broker.host.clone());
        ladder_config.server_name = broker.server_name.clone();
        ladder_config.primary_port = broker.port;
        ladder_config.fallback_port = broker.fallback_port;
        let proxy = crate::proxy::find(broker.proxy.as_ref(), &broker.host);
        if broker.proxy.is_some() {
            tracing::info!(proxy = %proxy, "proxy for the push service");
        }
        ladder_config.proxy = proxy.proxy.clone();
        ladder_config.direct_fallback = broker.direct_fallback;
        let hosts = std::iter::once(broker.host.clone())
            .chain(broker.more_hosts.iter().cloned())
            .collect();
        Ok(Self {
            ladder: ConnectionLadder::new(ladder_config, Arc::clone(&tls)),
            tls,
            settings,
            cert_stamp,
            hosts,
            current: 0,
            proxy_setting: broker.proxy.clone(),
            proxy,
        })
    }

    /// The push-service node the next attempt aims at (`broker.host` or one of
    /// `broker.more_hosts`).
    pub fn current_host(&self) -> &str {
        &self.ladder.config().broker_host
    }

    /// Loads the client certificate and key again when the certificate file changed (a
    /// renewal). A pair that does not load (the renewal is between its two writes) keeps
    /// the one in use; the next connect looks again.
    fn refresh_identity(&mut self) {
        let Some(ClientIdentity::Files { cert, .. }) = &self.settings.identity else {
            return;
        };
        let stamp = file_stamp(cert);
        if stamp == self.cert_stamp {
            return;
        }
        match TlsClient::new(&self.settings) {
            Ok(tls) => {
                tracing::info!(certificate = %cert.display(), "client certificate changed: using the new one");
                self.tls = Arc::new(tls);
                self.cert_stamp = stamp;
                let last = self.ladder.last_working().cloned();
                self.rebuild(self.ladder.config().clone(), last);
            }
            Err(e) => {
                tracing::debug!(error = %e, "the changed client certificate does not load yet; keeping the current one");
            }
        }
    }

    /// The paths in the order the next attempt tries them.
    pub fn attempt_order(&self) -> Vec<String> {
        self.ladder
            .attempt_order()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Reads the system's proxy setting again (`broker.proxy = "system"`; it may have changed
    /// since the last attempt) and aims the ladder at the proxy it names, or none.
    fn refresh_proxy(&mut self) {
        let Some(setting @ crate::proxy::ProxySetting::System) = &self.proxy_setting else {
            return;
        };
        let found = crate::proxy::find(Some(setting), self.current_host());
        if found == self.proxy {
            return;
        }
        tracing::info!(proxy = %found, "system proxy setting");
        if found.proxy != self.ladder.config().proxy {
            let mut config = self.ladder.config().clone();
            config.proxy.clone_from(&found.proxy);
            let last = self.ladder.last_working().cloned();
            self.rebuild(config, last);
        }
        self.proxy = found;
    }

    fn rebuild(&mut self, config: LadderConfig, last: Option<Path>) {
        self.ladder = ConnectionLadder::new(config, Arc::clone(&self.tls)).with_last_working(last);
    }
}

impl Connector for LadderConnector {
    async fn connect(&mut self) -> Result<Connection, ConnectError> {
        self.refresh_identity();
        self.refresh_proxy();
        match self.ladder.connect().await {
            Ok(connected) => {
                for failure in &connected.failed_before {
                    tracing::warn!(path = %failure.path.label(), error = %failure.error, "path to the push service failed");
                }
                tracing::debug!(
                    peer = %connected.peer,
                    tls = ?connected.tls,
                    timings = ?connected.timings,
                    "TLS connection to the push service"
                );
                let path = &connected.path;
                Ok(Connection {
                    fallback: path.transport.uses_fallback_port() || path.is_proxied(),
                    via_proxy: path.is_proxied(),
                    path: path.to_string(),
                    stream: connected.stream,
                })
            }
            Err(e) => {
                if self.hosts.len() > 1 {
                    // This node is gone or unreachable by every path: the next attempt (after
                    // the backoff) goes to the next node of the cluster.
                    let failed = self.hosts[self.current].clone();
                    self.current = (self.current + 1) % self.hosts.len();
                    let mut config = self.ladder.config().clone();
                    config.broker_host = self.hosts[self.current].clone();
                    let last = self.ladder.last_working().cloned();
                    self.rebuild(config, last);
                    tracing::warn!(failed = %failed, next = %self.hosts[self.current], "push-service node unreachable; moving to the next");
                }
                Err(ConnectError(format!(
                    "{e}\nrun `beckon doctor` for the fix of each step"
                )))
            }
        }
    }

    fn prefer(&mut self, path: &str) {
        match path.parse::<Path>() {
            Ok(path) => {
                if self.ladder.last_working() != Some(&path) {
                    self.rebuild(self.ladder.config().clone(), Some(path));
                }
            }
            Err(e) => tracing::debug!(error = %e, "stored path not usable; starting from the top"),
        }
    }

    fn redirect(&mut self, server_reference: &str) {
        let mut config = self.ladder.config().clone();
        let Some((host, port)) = parse_server_reference(server_reference, config.primary_port)
        else {
            tracing::warn!(server_reference, "unusable server reference ignored");
            return;
        };
        config.broker_host = host;
        config.server_name = None;
        config.primary_port = port;
        let last = self.ladder.last_working().cloned();
        self.rebuild(config, last);
    }

    fn proxy_found(&self) -> Option<String> {
        Some(self.proxy.to_string())
    }
}

/// The first entry of a Server Reference: `host`, `host:port` or `[v6]:port`.
pub fn parse_server_reference(reference: &str, default_port: u16) -> Option<(String, u16)> {
    let first = reference.split_whitespace().next()?;
    if let Some(v6) = first.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if rest.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match first.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host.to_owned(), port.parse().ok()?)),
        Some(_) => Some((first.to_owned(), default_port)),
        None => Some((first.to_owned(), default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_references() {
        assert_eq!(
            parse_server_reference("b2.example.com", 8883),
            Some(("b2.example.com".into(), 8883))
        );
        assert_eq!(
            parse_server_reference("b2:9000 b3:9000", 8883),
            Some(("b2".into(), 9000))
        );
        assert_eq!(
            parse_server_reference("[::1]:1884", 8883),
            Some(("::1".into(), 1884))
        );
        assert_eq!(parse_server_reference("b2:port", 8883), None);
        assert_eq!(parse_server_reference("  ", 8883), None);
    }

    /// An agent with several nodes moves to the next when every path to its node fails,
    /// and comes round again.
    #[tokio::test]
    async fn an_unreachable_node_sends_the_next_attempt_to_the_next_node() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a port");
        let text = format!(
            "agent_id = \"pc-1\"\ntenant = \"acme\"\n[broker]\nhost = \"127.0.0.1\"\nmore_hosts = [\"127.0.0.2\", \"127.0.0.3\"]\nport = {closed}\nfallback_port = {closed}\nconnect_timeout = \"2s\"\n[wakeup.console_keys]\nk = \"6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw\"\n"
        );
        let config =
            crate::AgentConfig::parse(&text, std::path::Path::new("agent.toml")).expect("config");
        let mut connector = LadderConnector::new(&config).expect("ladder");
        assert_eq!(connector.current_host(), "127.0.0.1");
        for next in ["127.0.0.2", "127.0.0.3", "127.0.0.1"] {
            assert!(connector.connect().await.is_err());
            assert_eq!(connector.current_host(), next);
        }
    }
}
