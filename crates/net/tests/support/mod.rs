//! Test peers: a CA made with rcgen, a TLS server that serves raw MQTT bytes (ALPN `mqtt`) or
//! MQTT over WebSocket (ALPN `http/1.1`), Debian's tinyproxy, and scripted fake proxies.
//! Every wait is bounded; child processes are killed on drop.

#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};

use futures_util::{SinkExt, StreamExt};

/// Every network wait in the tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A loopback port on which nothing listens (bind, read the port, close).
pub fn refused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// A test certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server's certificate chain and key.
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate in PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `dir/name`.
    pub fn write_pem(&self, dir: &FsPath, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.pem()).expect("write CA file");
        path
    }

    /// A server certificate for `names`, valid from `not_before` to `not_after` (y, m, d).
    pub fn server_cert_valid(
        &self,
        names: &[&str],
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> ServerIdentity {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "test broker");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &*self.issuer)
            .expect("server certificate");
        ServerIdentity {
            chain: vec![cert.der().clone(), self.issuer.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// A server certificate for `names`, valid 2020-01-01 to 2099-12-31.
    pub fn server_cert(&self, names: &[&str]) -> ServerIdentity {
        self.server_cert_valid(names, (2020, 1, 1), (2099, 12, 31))
    }

    /// A client certificate and key, in PEM.
    pub fn client_cert_pem(&self, common_name: &str) -> (String, String) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("client key");
        let cert = params
            .signed_by(&key, &*self.issuer)
            .expect("client certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// The CA as a rustls root store (for a server that checks client certificates).
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).expect("add CA");
        roots
    }
}

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

/// A plain TCP server that answers every connection with `answer` and closes.
pub async fn start_scripted_server(
    answer: &'static [u8],
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                // Read the request's first bytes (a ClientHello or a CONNECT) before answering.
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await;
                let _ = tcp.write_all(answer).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A TCP server that accepts and never says anything (holds connections for `WAIT`).
pub async fn start_silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                tokio::time::sleep(WAIT).await;
                drop(tcp);
            });
        }
    });
    (addr, task)
}

/// A plain TCP echo server.
pub async fn start_echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::time::timeout(WAIT, tokio::io::copy(&mut r, &mut w)).await;
            });
        }
    });
    (addr, task)
}

/// Debian's tinyproxy, started on a free loopback port with a generated configuration.
/// Killed on drop.
pub struct Tinyproxy {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_tinyproxy() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("tinyproxy"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push(PathBuf::from("/usr/bin/tinyproxy"));
    candidates.push(PathBuf::from("/usr/sbin/tinyproxy"));
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "tinyproxy is not installed, and the proxy tests need a real HTTP proxy: install it \
             with `apt-get install tinyproxy` (the project's CI script installs it)"
        )
    })
}

impl Tinyproxy {
    /// Starts tinyproxy allowing CONNECT only to `connect_ports`.
    pub async fn start(connect_ports: &[u16]) -> Self {
        let binary = find_tinyproxy();
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = refused_port();
        let mut config = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\nLogLevel Info\n\
             PidFile \"{}\"\nAllow 127.0.0.1\nDisableViaHeader Yes\n",
            dir.path().join("tinyproxy.pid").display()
        );
        for p in connect_ports {
            config.push_str(&format!("ConnectPort {p}\n"));
        }
        let config_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&config_path, config).expect("write tinyproxy config");
        let log = std::fs::File::create(dir.path().join("output.log")).expect("log file");
        let child = Command::new(&binary)
            .arg("-d")
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let proxy = Self { child, port, dir };
        let deadline = Instant::now() + WAIT;
        loop {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return proxy;
            }
            if Instant::now() > deadline {
                panic!(
                    "tinyproxy did not listen on 127.0.0.1:{port} within {WAIT:?}; its output:\n{}",
                    proxy.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What tinyproxy printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("output.log")).unwrap_or_default()
    }

    pub fn url(&self) -> beckon_net::ProxyUrl {
        beckon_net::ProxyUrl::new("127.0.0.1", self.port)
    }
}
