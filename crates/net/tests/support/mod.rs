//! Test peers: a TLS server that serves raw MQTT bytes (ALPN `mqtt`) or MQTT over WebSocket
//! (ALPN `http/1.1`) and scripted fake proxies; the CA, tinyproxy and scripted servers come
//! from beckon-testkit. Every wait is bounded.

#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};

use futures_util::{SinkExt, StreamExt};

#[allow(unused_imports)] // each test file uses a different part
pub use beckon_testkit::{
    ServerIdentity, Squid, TestCa, Tinyproxy, WAIT, free_port as refused_port, start_echo_server,
    start_scripted_server, start_silent_server,
};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server config with `alpn`, TLS 1.3 and 1.2, no client authentication.
pub fn server_config(identity: ServerIdentity, alpn: &[&str]) -> rustls::ServerConfig {
    server_config_versions(
        identity,
        alpn,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
    )
}

/// A server config with `alpn` and the given versions.
pub fn server_config_versions(
    identity: ServerIdentity,
    alpn: &[&str],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ServerConfig {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .expect("server certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config
}

/// A server config that requires a client certificate issued by `client_ca`.
pub fn mtls_server_config(
    identity: ServerIdentity,
    client_ca: &TestCa,
    alpn: &[&str],
) -> rustls::ServerConfig {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(client_ca.root_store()), provider())
            .build()
            .expect("client verifier");
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .expect("server certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config
}

/// What the test server did with one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// Echoed raw bytes; the ALPN chosen, and whether the client showed a certificate.
    Raw {
        alpn: Option<String>,
        client_cert: bool,
    },
    /// Echoed binary WebSocket messages on `/mqtt` with subprotocol `mqtt`.
    WebSocket,
    /// The TLS handshake failed on the server side.
    HandshakeFailed(String),
    /// The WebSocket upgrade was refused.
    UpgradeRefused(String),
}

/// How the WebSocket side of the test server behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsBehaviour {
    /// Accept `/mqtt` with subprotocol `mqtt`; echo binary messages.
    Echo,
    /// Accept, but without choosing a subprotocol.
    NoSubprotocol,
    /// Accept, then send a text message.
    SendText,
    /// Accept, then close at once.
    Close,
}

/// A TLS server on a loopback port, reporting each connection it served.
pub struct TlsServer {
    pub addr: SocketAddr,
    pub served: mpsc::UnboundedReceiver<Served>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsServer {
    /// The next connection's report, within [`WAIT`].
    pub async fn next_served(&mut self) -> Served {
        tokio::time::timeout(WAIT, self.served.recv())
            .await
            .expect("the test server reports in time")
            .expect("the test server is running")
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// Starts a TLS server: ALPN `http/1.1` leads to WebSocket, anything else to a raw echo.
pub async fn start_tls_server(config: rustls::ServerConfig) -> TlsServer {
    start_tls_server_with(config, WsBehaviour::Echo).await
}

/// Like [`start_tls_server`], with a chosen WebSocket behaviour.
pub async fn start_tls_server_with(config: rustls::ServerConfig, ws: WsBehaviour) -> TlsServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (tx, served) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let report = serve_one(acceptor, tcp, ws, &tx).await;
                let _ = tx.send(report);
            });
        }
    });
    TlsServer { addr, served, task }
}

async fn serve_one(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    ws: WsBehaviour,
    _tx: &mpsc::UnboundedSender<Served>,
) -> Served {
    let mut tls = match tokio::time::timeout(WAIT, acceptor.accept(tcp)).await {
        Err(_) => return Served::HandshakeFailed("timed out".into()),
        Ok(Err(e)) => return Served::HandshakeFailed(e.to_string()),
        Ok(Ok(tls)) => tls,
    };
    let (alpn, client_cert) = {
        let conn = tls.get_ref().1;
        (
            conn.alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            conn.peer_certificates().is_some_and(|c| !c.is_empty()),
        )
    };
    if alpn.as_deref() == Some("http/1.1") {
        return serve_websocket(tls, ws).await;
    }
    // Raw echo until the client closes (bounded by WAIT per read).
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(WAIT, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                if tls.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    Served::Raw { alpn, client_cert }
}

// The callback's error type is tungstenite's, not ours to shrink.
#[allow(clippy::result_large_err)]
async fn serve_websocket(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    behaviour: WsBehaviour,
) -> Served {
    let callback = move |request: &Request, mut response: Response| {
        if request.uri().path() != "/mqtt" {
            let mut refusal = ErrorResponse::new(Some("no such endpoint".into()));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            return Err(refusal);
        }
        let offered = request
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if behaviour != WsBehaviour::NoSubprotocol && offered.split(',').any(|p| p.trim() == "mqtt")
        {
            response
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        }
        Ok(response)
    };
    let mut ws = match tokio::time::timeout(
        WAIT,
        tokio_tungstenite::accept_hdr_async(tls, callback),
    )
    .await
    {
        Err(_) => return Served::UpgradeRefused("timed out".into()),
        Ok(Err(e)) => return Served::UpgradeRefused(e.to_string()),
        Ok(Ok(ws)) => ws,
    };
    match behaviour {
        WsBehaviour::SendText => {
            let _ = ws.send(Message::text("hello")).await;
            let _ = tokio::time::timeout(WAIT, ws.next()).await;
        }
        WsBehaviour::Close => {
            let _ = ws.close(None).await;
            let _ = tokio::time::timeout(WAIT, ws.next()).await;
        }
        WsBehaviour::Echo | WsBehaviour::NoSubprotocol => loop {
            match tokio::time::timeout(WAIT, ws.next()).await {
                Ok(Some(Ok(Message::Binary(data)))) => {
                    if ws.send(Message::Binary(data)).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                _ => break,
            }
        },
    }
    Served::WebSocket
}

/// The proxy URL of a tinyproxy started by the test.
pub fn proxy_url(proxy: &Tinyproxy) -> beckon_net::ProxyUrl {
    beckon_net::ProxyUrl::new("127.0.0.1", proxy.port)
}
