//! One MQTT client connection as the bench opens it: TCP bound to a chosen source address,
//! optional TLS, and the shared client session (`beckon_client`) over it, as the agent and
//! the doctor use it: the bench adds only the source address per socket and timings taken
//! at the exact points the report speaks of.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use beckon_client::{Connection, End, Event, Options, Session};
use beckon_mqtt::{ProtocolVersion, QoS, ReasonCode, Subscription};
use bytes::Bytes;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

/// Largest packet the bench accepts from a broker; wake-ups are tiny.
const MAX_PACKET_SIZE: u32 = 64 * 1024;

/// A byte stream the bench can speak MQTT over: plain TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// MQTT protocol version spoken by the simulated agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum MqttVersion {
    /// MQTT 3.1.1.
    #[value(name = "3.1.1")]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.0.
    #[value(name = "5")]
    #[serde(rename = "5")]
    V5,
}

impl MqttVersion {
    /// The codec's name for this version.
    pub fn protocol(self) -> ProtocolVersion {
        match self {
            Self::V311 => ProtocolVersion::V311,
            Self::V5 => ProtocolVersion::V5,
        }
    }
}

/// The TLS key exchange the agents offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
pub enum KeyExchange {
    /// X25519 only: the same handshake for every broker, whatever its TLS library supports.
    #[default]
    #[value(name = "x25519")]
    #[serde(rename = "x25519")]
    X25519,
    /// The TLS provider's default preference (post-quantum hybrid X25519MLKEM768 first, then
    /// X25519, ...), as the agent offers; a broker that supports the hybrid then does more work.
    #[value(name = "provider-default")]
    #[serde(rename = "provider-default")]
    ProviderDefault,
}

/// TLS settings of a target broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsSettings {
    /// PEM file with the CA certificate(s) that sign the broker's certificate.
    pub ca_file: PathBuf,
    /// Name checked against the broker's certificate; defaults to the host.
    pub server_name: Option<String>,
    /// PEM certificate chain presented to the broker, if it asks for client certificates.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// Key exchange groups offered.
    #[serde(default)]
    pub key_exchange: KeyExchange,
}

/// Where and how to reach the broker under test.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// Host name or IP address of the broker.
    pub host: String,
    /// TCP port of the broker's MQTT listener.
    pub port: u16,
    /// TLS settings; `None` for plain MQTT.
    pub tls: Option<TlsSettings>,
    /// Protocol version.
    pub version: MqttVersion,
    /// User name sent in CONNECT.
    pub username: Option<String>,
    /// Password sent in CONNECT.
    pub password: Option<String>,
    /// Keep alive sent in CONNECT, in seconds.
    pub keep_alive: u16,
    /// Bound on one connection attempt (TCP, TLS, CONNECT to CONNACK), in milliseconds.
    pub connect_timeout_ms: u64,
}

impl Target {
    /// Bound on one connection attempt.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

/// Why a connection, or a step on one, failed. The message is what the report shows as the
/// first error of a phase.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker's host name did not resolve.
    #[error("cannot resolve broker host {host}: {reason}")]
    Resolve {
        /// The host as given.
        host: String,
        /// Why.
        reason: String,
    },
    /// The TLS settings could not be loaded (CA, certificate or key file).
    #[error("TLS settings: {0}")]
    TlsConfig(String),
    /// TCP connect failed.
    #[error("TCP connect to {addr} from {source_addr}: {error}")]
    Tcp {
        /// Broker address.
        addr: SocketAddr,
        /// Source address the socket was bound to ("any" when unbound).
        source_addr: String,
        /// The socket error.
        error: io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    /// A step did not finish within its bound.
    #[error("timed out during {0}")]
    Timeout(&'static str),
    /// The broker refused the CONNECT.
    #[error("broker refused CONNECT with reason code 0x{:02x}", .0.0)]
    Refused(ReasonCode),
    /// The broker refused the subscription.
    #[error("broker refused SUBSCRIBE with reason code 0x{:02x}", .0.0)]
    SubscribeRefused(ReasonCode),
    /// The broker sent bytes the codec rejects, or broke the protocol.
    #[error("the broker broke the MQTT protocol: {0}")]
    Protocol(String),
    /// The session could not send a packet (a bench bug or an oversized name).
    #[error("cannot send: {0}")]
    Send(#[from] beckon_client::Error),
    /// The broker closed the connection.
    #[error("connection closed by broker")]
    Closed,
    /// The broker sent DISCONNECT.
    #[error("broker sent DISCONNECT with reason code 0x{:02x}", .0.0)]
    Disconnected(ReasonCode),
    /// The broker sent a packet that makes no sense at this point.
    #[error("unexpected packet from broker: {0}")]
    Unexpected(&'static str),
    /// A socket read or write failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

/// Opens connections to one target; built once per process and shared by all its agents.
pub struct Connector {
    addr: SocketAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    target: Target,
}

impl Connector {
    /// Resolves the target's host and loads its TLS settings.
    pub async fn new(target: &Target) -> Result<Self, ClientError> {
        let resolve_error = |reason: String| ClientError::Resolve {
            host: target.host.clone(),
            reason,
        };
        let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| resolve_error(e.to_string()))?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| resolve_error("no IPv4 address".to_owned()))?;
        let tls = match &target.tls {
            None => None,
            Some(settings) => Some(tls_connector(settings, &target.host)?),
        };
        Ok(Self {
            addr,
            tls,
            target: target.clone(),
        })
    }

    /// The broker's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Opens TCP (bound to `source` when given), TLS when configured, sends CONNECT and waits
    /// for a successful CONNACK, all within the target's connect timeout.
    pub async fn connect(
        &self,
        source: Option<IpAddr>,
        client_id: &str,
    ) -> Result<MqttConn, ClientError> {
        self.connect_as(source, client_id, None).await
    }

    /// As [`connect`](Self::connect), with `password` (a tenant identity's token) instead of
    /// the target's when given; the user name is then the target's, else the client id.
    pub async fn connect_as(
        &self,
        source: Option<IpAddr>,
        client_id: &str,
        password: Option<&str>,
    ) -> Result<MqttConn, ClientError> {
        tokio::time::timeout(
            self.target.connect_timeout(),
            self.connect_unbounded(source, client_id, password),
        )
        .await
        .map_err(|_| ClientError::Timeout("connect (TCP, TLS, CONNECT to CONNACK)"))?
    }

    async fn connect_unbounded(
        &self,
        source: Option<IpAddr>,
        client_id: &str,
        password: Option<&str>,
    ) -> Result<MqttConn, ClientError> {
        let tcp_error = |error: io::Error| ClientError::Tcp {
            addr: self.addr,
            source_addr: source.map_or_else(|| "any".to_owned(), |s| s.to_string()),
            error,
        };
        let socket = TcpSocket::new_v4().map_err(tcp_error)?;
        if let Some(source) = source {
            socket.bind(SocketAddr::new(source, 0)).map_err(tcp_error)?;
        }
        let tcp = socket.connect(self.addr).await.map_err(tcp_error)?;
        tcp.set_nodelay(true).map_err(tcp_error)?;
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(ClientError::Tls)?,
            ),
        };
        let mut options = Options::new(self.target.version.protocol(), client_id);
        options.keep_alive = Duration::from_secs(u64::from(self.target.keep_alive));
        // MQTT 3.1.1 carries no password without a user name; a tenant identity's user name
        // is its id, as the agent sends it (the broker reads only the token).
        options.username = self
            .target
            .username
            .clone()
            .or_else(|| password.map(|_| client_id.to_owned()));
        options.password = password
            .or(self.target.password.as_deref())
            .map(|p| Bytes::copy_from_slice(p.as_bytes()));
        options.max_packet_size = MAX_PACKET_SIZE;
        options.connect_timeout = self.target.connect_timeout();
        // The publishers' window is their own (`--window`) within the broker's Receive
        // Maximum; the session adds no lower cap.
        options.max_inflight = usize::from(u16::MAX);
        let now = tokio::time::Instant::now().into_std();
        let mut connection = Connection::start(io, Session::new(options, now));
        loop {
            match connection.next_event().await {
                Ok(Event::Connected(_)) => return Ok(MqttConn { connection }),
                Ok(_) => {}
                Err(end) => return Err(end.into()),
            }
        }
    }
}

impl From<End> for ClientError {
    fn from(end: End) -> Self {
        match end {
            End::Refused { code, .. } => Self::Refused(code),
            End::OldProtocol { .. } => Self::Refused(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
            End::Disconnected { code, .. } => Self::Disconnected(code),
            End::ConnectTimeout => Self::Timeout("CONNECT to CONNACK"),
            End::PingTimeout => Self::Timeout("PINGREQ to PINGRESP"),
            End::Closed | End::Shutdown => Self::Closed,
            End::Io(e) => Self::Io(io::Error::new(e.0.kind(), e.to_string())),
            End::Protocol(message) => Self::Protocol(message),
        }
    }
}

fn tls_connector(
    settings: &TlsSettings,
    host: &str,
) -> Result<(TlsConnector, ServerName<'static>), ClientError> {
    let config_error = |what: String| ClientError::TlsConfig(what);
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&settings.ca_file)
        .map_err(|e| config_error(format!("CA file {}: {e}", settings.ca_file.display())))?;
    for ca in cas {
        let ca =
            ca.map_err(|e| config_error(format!("CA file {}: {e}", settings.ca_file.display())))?;
        roots
            .add(ca)
            .map_err(|e| config_error(format!("CA file {}: {e}", settings.ca_file.display())))?;
    }
    if roots.is_empty() {
        return Err(config_error(format!(
            "CA file {} holds no certificate",
            settings.ca_file.display()
        )));
    }
    let identity = match (&settings.client_cert, &settings.client_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| config_error(format!("client certificate {}: {e}", cert.display())))?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| config_error(format!("client key {}: {e}", key.display())))?;
            Some((chain, key_der))
        }
        _ => {
            return Err(config_error(
                "a client certificate needs both --client-cert and --client-key".to_owned(),
            ));
        }
    };
    let options = beckon_pki::ClientTlsOptions {
        key_exchange: match settings.key_exchange {
            KeyExchange::X25519 => beckon_pki::KeyExchange::X25519,
            KeyExchange::ProviderDefault => beckon_pki::KeyExchange::Default,
        },
        // Every connect is a full handshake, as for an agent that just restarted: the figures
        // then speak of the expensive case, and a shared session cache between simulated
        // agents (which real agents do not have) cannot flatter one broker.
        full_handshakes: true,
        ..Default::default()
    };
    let config = beckon_pki::client_config(
        beckon_pki::ServerVerification::Roots(roots),
        identity,
        &options,
    )
    .map_err(|e| config_error(format!("TLS client configuration: {e}")))?;
    let name = settings.server_name.as_deref().unwrap_or(host);
    let server_name = ServerName::try_from(name.to_owned())
        .map_err(|e| config_error(format!("server name {name:?}: {e}")))?;
    Ok((TlsConnector::from(Arc::new(config)), server_name))
}

/// An open MQTT connection after a successful CONNACK: the shared client session over the
/// bench's socket.
pub struct MqttConn {
    connection: Connection<Box<dyn Io>>,
}

impl MqttConn {
    /// How many QoS 1 publishes may be in flight: the broker's Receive Maximum (v5), else
    /// 65,535.
    pub fn window(&self) -> usize {
        self.connection
            .session()
            .settled()
            .map_or(1, |settled| settled.window)
    }

    /// The connection's protocol version.
    pub fn version(&self) -> ProtocolVersion {
        self.connection.session().options().protocol
    }

    /// The client session, to publish or read the window; what it queues leaves on the next
    /// [`next_event`](Self::next_event) or [`flush`](Self::flush), in one write.
    pub fn session_mut(&mut self) -> &mut Session {
        self.connection.session_mut()
    }

    /// The next event (no bound: wrap in a timeout). Incoming QoS 1 messages are
    /// acknowledged by the session. Cancel safe.
    pub async fn next_event(&mut self) -> Result<Event, ClientError> {
        Ok(self.connection.next_event().await?)
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        Ok(self.connection.flush().await?)
    }

    /// Subscribes to one filter at QoS 1 and waits for a granting SUBACK.
    pub async fn subscribe(&mut self, filter: &str, timeout: Duration) -> Result<(), ClientError> {
        let subscription = Subscription::new(filter, QoS::AtLeastOnce);
        let now = tokio::time::Instant::now().into_std();
        let id = self.session_mut().subscribe(vec![subscription], now)?;
        let wait = async {
            loop {
                // A retained message or a ping response may come first; keep waiting.
                if let Event::Subscribed {
                    packet_id, codes, ..
                } = self.next_event().await?
                    && packet_id == id
                {
                    return match codes.first() {
                        Some(code) if !code.is_error() => Ok(()),
                        Some(code) => Err(ClientError::SubscribeRefused(*code)),
                        None => Err(ClientError::Unexpected("SUBACK without a code")),
                    };
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout("SUBSCRIBE to SUBACK"))?
    }

    /// Sends DISCONNECT and closes, ignoring errors: the broker may already be gone.
    pub async fn close(mut self) {
        self.connection.disconnect().await;
    }
}

/// The topic an agent listens on for its wake-ups.
pub fn wake_topic(agent_id: &str) -> String {
    format!("agents/{agent_id}/wake")
}
