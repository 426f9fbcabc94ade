//! One MQTT client connection as the bench opens it: TCP bound to a chosen source address,
//! optional TLS, and packets through the house codec (`beckon_mqtt`).
//!
//! The agent of the product has its own client (`beckon_net`); the bench keeps its own small
//! one because it needs things an agent does not: a chosen source address per socket, and
//! timings taken at the exact points the report speaks of.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use beckon_mqtt::{
    ConnAck, Connect, DecodeError, EncodeError, Packet, Properties, ProtocolVersion, QoS,
    ReasonCode, Subscribe, Subscription, SubscriptionOptions,
};
use bytes::{Bytes, BytesMut};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
    /// The broker sent bytes the codec rejects.
    #[error("undecodable packet from broker: {0}")]
    Decode(#[from] DecodeError),
    /// A packet could not be encoded (a bench bug or an oversized name).
    #[error("cannot encode packet: {0}")]
    Encode(#[from] EncodeError),
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
        tokio::time::timeout(
            self.target.connect_timeout(),
            self.connect_unbounded(source, client_id),
        )
        .await
        .map_err(|_| ClientError::Timeout("connect (TCP, TLS, CONNECT to CONNACK)"))?
    }

    async fn connect_unbounded(
        &self,
        source: Option<IpAddr>,
        client_id: &str,
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
        let version = self.target.version.protocol();
        let mut conn = MqttConn {
            io,
            buf: BytesMut::with_capacity(128),
            out: BytesMut::new(),
            version,
            receive_maximum: None,
        };
        let connect = Connect {
            username: self.target.username.clone(),
            password: self
                .target
                .password
                .as_ref()
                .map(|p| Bytes::copy_from_slice(p.as_bytes())),
            ..Connect::new(version, client_id.to_owned(), self.target.keep_alive)
        };
        conn.send(&Packet::Connect(Box::new(connect))).await?;
        match conn.recv().await? {
            Packet::ConnAck(ConnAck {
                code, properties, ..
            }) => {
                if code.is_error() || (version == ProtocolVersion::V311 && code.0 != 0) {
                    return Err(ClientError::Refused(code));
                }
                conn.receive_maximum = properties.receive_maximum;
                Ok(conn)
            }
            _ => Err(ClientError::Unexpected("expected CONNACK")),
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

/// An open MQTT connection after a successful CONNACK.
pub struct MqttConn {
    io: Box<dyn Io>,
    buf: BytesMut,
    out: BytesMut,
    version: ProtocolVersion,
    receive_maximum: Option<u16>,
}

impl MqttConn {
    /// The broker's Receive Maximum from CONNACK (v5 only).
    pub fn receive_maximum(&self) -> Option<u16> {
        self.receive_maximum
    }

    /// The connection's protocol version.
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Encodes and writes one packet.
    pub async fn send(&mut self, packet: &Packet) -> Result<(), ClientError> {
        self.out.clear();
        beckon_mqtt::encode(packet, self.version, &mut self.out)?;
        self.io.write_all(&self.out).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// The next whole packet already buffered, without reading.
    pub fn try_next(&mut self) -> Result<Option<Packet>, ClientError> {
        Ok(beckon_mqtt::decode(
            &mut self.buf,
            self.version,
            MAX_PACKET_SIZE,
        )?)
    }

    /// Reads more bytes into the buffer. Cancel safe: when dropped before completion nothing
    /// was read.
    pub async fn fill(&mut self) -> Result<(), ClientError> {
        if self.io.read_buf(&mut self.buf).await? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// Waits for the next packet (no bound: wrap in a timeout).
    pub async fn recv(&mut self) -> Result<Packet, ClientError> {
        loop {
            if let Some(packet) = self.try_next()? {
                return Ok(packet);
            }
            self.fill().await?;
        }
    }

    /// Subscribes to one filter at QoS 1 and waits for a granting SUBACK.
    pub async fn subscribe(&mut self, filter: &str, timeout: Duration) -> Result<(), ClientError> {
        let subscribe = Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: filter.to_owned(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            }],
            properties: Properties::default(),
        };
        self.send(&Packet::Subscribe(subscribe)).await?;
        let wait = async {
            loop {
                match self.recv().await? {
                    Packet::SubAck(ack) if ack.packet_id == 1 => {
                        return match ack.codes.first() {
                            Some(code) if !code.is_error() => Ok(()),
                            Some(code) => Err(ClientError::SubscribeRefused(*code)),
                            None => Err(ClientError::Unexpected("SUBACK without a code")),
                        };
                    }
                    Packet::Disconnect(d) => return Err(ClientError::Disconnected(d.code)),
                    // A retained message or a ping response may come first; keep waiting.
                    _ => {}
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Timeout("SUBSCRIBE to SUBACK"))?
    }

    /// Sends DISCONNECT and closes, ignoring errors: the broker may already be gone.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self
                .send(&Packet::Disconnect(beckon_mqtt::Disconnect::default()))
                .await;
            let _ = self.io.shutdown().await;
        })
        .await;
    }

    /// Splits into the raw stream halves and any bytes already buffered, for a writer and a
    /// reader that run at once (the publisher).
    pub fn into_split(self) -> SplitConn {
        let (read, write) = tokio::io::split(self.io);
        SplitConn {
            read,
            write,
            buf: self.buf,
            version: self.version,
        }
    }
}

/// A connection split for a concurrent reader and writer.
pub struct SplitConn {
    /// The read half.
    pub read: tokio::io::ReadHalf<Box<dyn Io>>,
    /// The write half.
    pub write: tokio::io::WriteHalf<Box<dyn Io>>,
    /// Bytes read but not decoded yet.
    pub buf: BytesMut,
    /// Protocol version.
    pub version: ProtocolVersion,
}

/// Decodes the next packet from a split reader's buffer, reading as needed.
pub async fn recv_split(
    read: &mut tokio::io::ReadHalf<Box<dyn Io>>,
    buf: &mut BytesMut,
    version: ProtocolVersion,
) -> Result<Packet, ClientError> {
    loop {
        if let Some(packet) = beckon_mqtt::decode(buf, version, MAX_PACKET_SIZE)? {
            return Ok(packet);
        }
        if read.read_buf(buf).await? == 0 {
            return Err(ClientError::Closed);
        }
    }
}

/// The topic an agent listens on for its wake-ups.
pub fn wake_topic(agent_id: &str) -> String {
    format!("agents/{agent_id}/wake")
}
