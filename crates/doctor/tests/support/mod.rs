//! Test peers for the doctor: rcgen certificates, an in-test rustls server, scripted servers,
//! a port whose TCP connects time out, Debian's tinyproxy and Mosquitto (started on free
//! loopback ports, killed on drop). Every wait is bounded.

#![allow(dead_code)] // each test uses a different part

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beckon_doctor::{DoctorConfig, PathReport, Report, StepName, StepReport, Verdict};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The doctor's step timeout in tests.
pub const STEP: Duration = Duration::from_secs(2);
/// Any other wait in tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A loopback port on which nothing listens (bind, read the port, close).
pub fn refused_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}

/// A doctor configuration for `host` on `primary` and `fallback`, short timeouts.
pub fn config(host: &str, primary: u16, fallback: u16) -> DoctorConfig {
    let mut config = DoctorConfig::new(host);
    config.primary_port = primary;
    config.fallback_port = Some(fallback);
    config.step_timeout = STEP;
    config
}

/// The path with this label.
pub fn path<'a>(report: &'a Report, label: &str) -> &'a PathReport {
    report
        .paths
        .iter()
        .find(|p| p.path == label)
        .unwrap_or_else(|| panic!("no path {label} in\n{}", report.to_human()))
}

/// The step of a path.
pub fn step(path: &PathReport, name: StepName) -> &StepReport {
    path.steps
        .iter()
        .find(|s| s.step == name)
        .unwrap_or_else(|| panic!("no step {name} in {path:?}"))
}

/// Asserts that `name` failed on `label`, that its fix holds every one of `fix_words`, that
/// the steps after it were skipped, and returns the step.
pub fn assert_fails<'a>(
    report: &'a Report,
    label: &str,
    name: StepName,
    fix_words: &[&str],
) -> &'a StepReport {
    let human = report.to_human();
    let p = path(report, label);
    assert!(!p.ok, "{label} should fail:\n{human}");
    let s = step(p, name);
    assert_eq!(s.verdict, Verdict::Fail, "{label} {name}:\n{human}");
    let fix = s
        .fix
        .as_deref()
        .unwrap_or_else(|| panic!("no fix:\n{human}"));
    for word in fix_words {
        assert!(
            fix.contains(word),
            "fix of {label} {name} lacks {word:?}: {fix}\n{human}"
        );
    }
    assert!(
        human.contains(&format!("fix: {fix}")),
        "the human report shows the fix:\n{human}"
    );
    let index = p.steps.iter().position(|x| x.step == name).expect("step");
    for later in &p.steps[index + 1..] {
        assert_eq!(later.verdict, Verdict::Skipped, "{label}: {later:?}");
    }
    s
}

/// A test certificate authority.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate chain and key.
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
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

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `dir/ca.pem`.
    pub fn write(&self, dir: &FsPath) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.pem()).expect("write CA file");
        path
    }

    /// A server certificate for `names`, valid between the given dates (y, m, d).
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
            cert_pem: format!("{}{}", cert.pem(), self.issuer.pem()),
            key_pem: key.serialize_pem(),
        }
    }

    /// A client certificate and key in PEM, written to `dir/{name}.pem` and `dir/{name}.key`.
    pub fn write_client_cert(&self, dir: &FsPath, name: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("client key");
        let cert = params
            .signed_by(&key, &*self.issuer)
            .expect("client certificate");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write client certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write client key");
        (cert_path, key_path)
    }

    /// A server certificate for `names`, valid 2020 to 2099.
    pub fn server_cert(&self, names: &[&str]) -> ServerIdentity {
        self.server_cert_valid(names, (2020, 1, 1), (2099, 12, 31))
    }
}

/// A TLS server on a loopback port that completes handshakes (ALPN `mqtt`) and then holds the
/// connection without speaking MQTT. Stops on drop.
pub struct TlsServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_tls_server(identity: ServerIdentity) -> TlsServer {
    serve_tls(identity, None).await
}

/// Like [`start_tls_server`], requiring a client certificate issued by `client_ca`.
pub async fn start_mtls_server(identity: ServerIdentity, client_ca: &TestCa) -> TlsServer {
    serve_tls(identity, Some(client_ca)).await
}

async fn serve_tls(identity: ServerIdentity, client_ca: Option<&TestCa>) -> TlsServer {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.issuer.der().clone()).expect("client CA");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(identity.chain, identity.key)
        .expect("server certificate");
    config.alpn_protocols = vec![b"mqtt".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(Ok(mut tls)) = tokio::time::timeout(WAIT, acceptor.accept(tcp)).await {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::time::timeout(WAIT, tls.read(&mut buf)).await;
                }
            });
        }
    });
    TlsServer { addr, task }
}

/// A TCP server that answers every connection with `answer` (after reading the request's
/// first bytes) and closes.
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
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await;
                let _ = tcp.write_all(answer).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A TCP server that accepts and never says anything.
pub async fn start_silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            held.push(tcp);
        }
    });
    (addr, task)
}

/// A loopback port where TCP connects time out, as they do behind a firewall that drops
/// packets: a listener with a backlog of 0 that never accepts, its queue filled by a first
/// connection. Linux then drops further SYNs, so a connect gets no answer at all.
pub struct FilteredPort {
    pub port: u16,
    _listener: socket2::Socket,
    _held: Vec<TcpStream>,
}

pub async fn filtered_port() -> FilteredPort {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&any.into()).expect("bind");
    socket.listen(0).expect("listen");
    let port = socket
        .local_addr()
        .expect("address")
        .as_socket()
        .expect("inet")
        .port();
    let mut held = Vec::new();
    // Fill the accept queue until a connect times out (a few connections at most).
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(500),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            Ok(Ok(stream)) => held.push(stream),
            Ok(Err(e)) => panic!("filling the accept queue of port {port}: {e}"),
            Err(_) => {
                return FilteredPort {
                    port,
                    _listener: socket,
                    _held: held,
                };
            }
        }
    }
    panic!(
        "connects to a full accept queue on port {port} kept succeeding: cannot make a filtered port here"
    );
}

fn find_binary(name: &str, places: &[&str], package: &str) -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    candidates.extend(places.iter().map(PathBuf::from));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed, and this test needs the real one: install it with \
             `apt-get install {package}` (the project's scripts/test installs it)"
            )
        })
}

async fn wait_listening(port: u16, what: &str, output: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on 127.0.0.1:{port} within {WAIT:?}; its output:\n{}",
            output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Debian's tinyproxy allowing CONNECT only to `connect_ports`. Killed on drop.
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

impl Tinyproxy {
    pub async fn start(connect_ports: &[u16]) -> Self {
        let binary = find_binary(
            "tinyproxy",
            &["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"],
            "tinyproxy",
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = refused_port();
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 50\nLogLevel Info\n\
             PidFile \"{}\"\nAllow 127.0.0.1\nDisableViaHeader Yes\n",
            dir.path().join("tinyproxy.pid").display()
        );
        for p in connect_ports {
            conf.push_str(&format!("ConnectPort {p}\n"));
        }
        let conf_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).expect("write tinyproxy config");
        let log = std::fs::File::create(dir.path().join("output.log")).expect("log file");
        let child = Command::new(&binary)
            .arg("-d")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let proxy = Self { child, port, dir };
        wait_listening(port, "tinyproxy", || proxy.output()).await;
        proxy
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("output.log")).unwrap_or_default()
    }

    pub fn url(&self) -> beckon_net::ProxyUrl {
        beckon_net::ProxyUrl::new("127.0.0.1", self.port)
    }
}

/// Debian's Mosquitto with one TLS listener, no anonymous access, and one user in a password
/// file made with `mosquitto_passwd -b`. Killed on drop.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mosquitto {
    /// Starts Mosquitto with `identity` on a TLS listener and the user `user`/`password`.
    pub async fn start_tls(identity: &ServerIdentity, user: &str, password: &str) -> Self {
        let mosquitto = find_binary("mosquitto", &["/usr/sbin/mosquitto"], "mosquitto");
        let passwd = find_binary(
            "mosquitto_passwd",
            &["/usr/bin/mosquitto_passwd"],
            "mosquitto",
        );
        let dir = tempfile::tempdir().expect("temporary directory");
        // Mosquitto started as root drops to its own user: it must be able to read the files.
        set_mode(dir.path(), 0o755);
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write a Mosquitto file");
            set_mode(&path, 0o644);
            path
        };
        let cert = file("server.pem", &identity.cert_pem);
        let key = file("server.key", &identity.key_pem);
        let pwfile = file("passwords", "");
        let status = Command::new(&passwd)
            .arg("-b")
            .arg(&pwfile)
            .arg(user)
            .arg(password)
            .stdin(Stdio::null())
            .status()
            .expect("run mosquitto_passwd");
        assert!(status.success(), "mosquitto_passwd failed: {status}");
        set_mode(&pwfile, 0o644);
        let port = refused_port();
        let conf = file(
            "mosquitto.conf",
            &format!(
                "listener {port} 127.0.0.1\ncertfile {}\nkeyfile {}\nallow_anonymous false\n\
                 password_file {}\npersistence false\nlog_dest stderr\nlog_type all\n",
                cert.display(),
                key.display(),
                pwfile.display()
            ),
        );
        let log = std::fs::File::create(dir.path().join("output.log")).expect("log file");
        let child = Command::new(&mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", mosquitto.display()));
        let broker = Self { child, port, dir };
        wait_listening(port, "mosquitto", || broker.output()).await;
        broker
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("output.log")).unwrap_or_default()
    }
}

fn set_mode(path: &FsPath, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A stand-in for a Beckon broker's shared 443 port: TLS with ALPN `mqtt` (raw MQTT 5) and
/// `http/1.1` (MQTT over WebSocket at `/mqtt`), answering CONNECT, PINGREQ, SUBSCRIBE,
/// UNSUBSCRIBE and QoS 1 PUBLISH (echoed to a matching subscription). With `alpn_mqtt`
/// false it offers only `http/1.1`, like a port that serves WebSocket alone.
pub async fn start_fake_broker(identity: ServerIdentity, alpn_mqtt: bool) -> TlsServer {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .expect("server certificate");
    config.alpn_protocols = if alpn_mqtt {
        vec![b"mqtt".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(Ok(tls)) = tokio::time::timeout(WAIT, acceptor.accept(tcp)).await else {
                    return;
                };
                let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                if alpn.as_deref() == Some(b"http/1.1") {
                    serve_mqtt_websocket(tls).await;
                } else {
                    serve_mqtt_raw(tls).await;
                }
            });
        }
    });
    TlsServer { addr, task }
}

/// The fake broker's answers to one packet.
struct FakeSession {
    subscriptions: Vec<String>,
}

impl FakeSession {
    fn answer(&mut self, packet: beckon_mqtt::Packet) -> Option<Vec<beckon_mqtt::Packet>> {
        use beckon_mqtt::{Ack, ConnAck, Packet, ReasonCode, SubAck, UnsubAck};
        Some(match packet {
            Packet::Connect(_) => vec![Packet::ConnAck(ConnAck::default())],
            Packet::PingReq => vec![Packet::PingResp],
            Packet::Subscribe(s) => {
                let codes = s
                    .subscriptions
                    .iter()
                    .map(|_| ReasonCode::GRANTED_QOS_1)
                    .collect();
                self.subscriptions
                    .extend(s.subscriptions.into_iter().map(|x| x.filter));
                vec![Packet::SubAck(SubAck {
                    packet_id: s.packet_id,
                    codes,
                    properties: Default::default(),
                })]
            }
            Packet::Unsubscribe(u) => {
                self.subscriptions.retain(|f| !u.filters.contains(f));
                vec![Packet::UnsubAck(UnsubAck {
                    packet_id: u.packet_id,
                    codes: vec![ReasonCode::SUCCESS; u.filters.len()],
                    properties: Default::default(),
                })]
            }
            Packet::Publish(p) => {
                let mut out = Vec::new();
                if let Some(id) = p.packet_id {
                    out.push(Packet::PubAck(Ack::new(id)));
                }
                if self.subscriptions.contains(&p.topic) {
                    out.push(Packet::Publish(beckon_mqtt::Publish {
                        packet_id: Some(1),
                        qos: beckon_mqtt::QoS::AtLeastOnce,
                        ..p
                    }));
                }
                out
            }
            Packet::Disconnect(_) => return None,
            _ => Vec::new(),
        })
    }
}

fn encode_all(packets: &[beckon_mqtt::Packet]) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    for p in packets {
        beckon_mqtt::encode(p, beckon_mqtt::ProtocolVersion::V5, &mut out).expect("encode");
    }
    out.to_vec()
}

async fn serve_mqtt_raw(mut tls: tokio_rustls::server::TlsStream<TcpStream>) {
    let mut session = FakeSession {
        subscriptions: Vec::new(),
    };
    let mut buf = bytes::BytesMut::new();
    loop {
        while let Ok(Some(packet)) =
            beckon_mqtt::decode(&mut buf, beckon_mqtt::ProtocolVersion::V5, 1 << 20)
        {
            let Some(answers) = session.answer(packet) else {
                return;
            };
            if tls.write_all(&encode_all(&answers)).await.is_err() {
                return;
            }
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(WAIT, tls.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
}

// The callback's error type is tungstenite's, not ours to shrink.
#[allow(clippy::result_large_err)]
async fn serve_mqtt_websocket(tls: tokio_rustls::server::TlsStream<TcpStream>) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};

    let callback = |request: &Request, mut response: Response| {
        if request.uri().path() != "/mqtt" {
            let mut refusal = ErrorResponse::new(Some("no such endpoint".into()));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            return Err(refusal);
        }
        response
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        Ok(response)
    };
    let Ok(Ok(mut ws)) =
        tokio::time::timeout(WAIT, tokio_tungstenite::accept_hdr_async(tls, callback)).await
    else {
        return;
    };
    let mut session = FakeSession {
        subscriptions: Vec::new(),
    };
    let mut buf = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Binary(data)))) => buf.extend_from_slice(&data),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            _ => return,
        }
        while let Ok(Some(packet)) =
            beckon_mqtt::decode(&mut buf, beckon_mqtt::ProtocolVersion::V5, 1 << 20)
        {
            let Some(answers) = session.answer(packet) else {
                return;
            };
            if !answers.is_empty()
                && ws
                    .send(Message::Binary(encode_all(&answers).into()))
                    .await
                    .is_err()
            {
                return;
            }
        }
    }
}
