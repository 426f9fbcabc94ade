//! What the broker's test programs share: a client speaking raw MQTT over any stream, the
//! packets they send most, and a TLS client configuration for the broker. Every wait is bounded by [`WAIT`].

// Each test program uses its own part.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use beckon_mqtt::{
    Packet, Properties, ProtocolVersion, Publish, QoS, Subscribe, Subscription,
    SubscriptionOptions, decode, encode,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls;

/// Every wait in the broker's tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A client speaking raw MQTT over any stream, through Beckon's codec.
pub struct Client<S> {
    /// The connection.
    pub stream: S,
    /// Bytes read and not decoded yet.
    pub buf: BytesMut,
    /// The protocol version packets are encoded and decoded in.
    pub version: ProtocolVersion,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A client on `stream`, speaking `version`.
    pub fn new(stream: S, version: ProtocolVersion) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            version,
        }
    }

    /// Sends `packet` (encoded in the client's version).
    pub async fn send(&mut self, packet: &Packet) {
        let mut b = BytesMut::new();
        encode(packet, self.version, &mut b).expect("encode");
        self.send_raw(&b).await;
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        tokio::time::timeout(WAIT, self.stream.write_all(bytes))
            .await
            .expect("write in time")
            .expect("write");
    }

    /// The next packet within `wait`: `None` when none came in time, `Some(None)` when the
    /// server closed the connection.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Option<Packet>> {
        tokio::time::timeout(wait, async {
            loop {
                if let Some(p) =
                    decode(&mut self.buf, self.version, 1 << 24).expect("valid from server")
                {
                    return Some(p);
                }
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .ok()
    }

    /// The next packet, or `None` when the server closed the connection; fails the test
    /// after [`WAIT`].
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT)
            .await
            .expect("server answered in time")
    }

    /// Raw bytes until the server closes.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let mut all = self.buf.to_vec();
        tokio::time::timeout(WAIT, async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => all.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("server closed in time");
        all
    }
}

/// A client configuration of the TLS policy trusting the CA in `ca_pem`, offering the `alpn`
/// protocols, with the client certificate `identity` when given.
pub fn client_tls_config(
    ca_pem: &Path,
    alpn: &[&[u8]],
    identity: Option<&beckon_pki::IssuedCertificate>,
) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in beckon_pki::load_certificates(ca_pem).expect("ca") {
        roots.add(c).expect("root");
    }
    let identity = identity.map(|id| {
        (
            vec![id.cert_der().expect("der")],
            rustls::pki_types::PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).expect("key"),
        )
    });
    let options = beckon_pki::ClientTlsOptions {
        alpn: alpn.iter().map(|p| p.to_vec()).collect(),
        ..beckon_pki::ClientTlsOptions::default()
    };
    beckon_pki::client_config(
        beckon_pki::ServerVerification::Roots(roots),
        identity,
        &options,
    )
    .expect("client config")
}

/// A SUBSCRIBE of `filters`, each at `qos`.
pub fn subscribe_packet(packet_id: u16, filters: &[&str], qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        subscriptions: filters
            .iter()
            .map(|filter| Subscription {
                filter: (*filter).to_owned(),
                options: SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
            })
            .collect(),
        properties: Properties::default(),
    })
}

/// A PUBLISH of `payload` to `topic` at `qos`, not retained; `packet_id` is used at QoS 1
/// and 2.
pub fn publish_packet(topic: &str, qos: QoS, packet_id: u16, payload: Bytes) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: (qos != QoS::AtMostOnce).then_some(packet_id),
        payload,
        properties: Properties::default(),
    })
}

/// The whole answer to `GET path` (HTTP/1.1, the server closes) from the server at `addr`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let tcp = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    http_get_over(tcp, path).await
}

/// The whole answer to `GET path` over `stream` (plain or TLS), until the server closes; a
/// close without TLS close_notify still ends the answer.
pub async fn http_get_over<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .ok();
    String::from_utf8_lossy(&response).into_owned()
}
