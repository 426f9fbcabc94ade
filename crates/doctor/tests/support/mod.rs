//! Test peers for the doctor: an in-test rustls server, a fake broker and a port whose TCP
//! connects time out; the CA, tinyproxy, Mosquitto and scripted servers come from
//! beckon-testkit. Every wait is bounded.

#![allow(dead_code)] // each test uses a different part

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use beckon_doctor::{DoctorConfig, PathReport, Report, StepName, StepReport, Verdict};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[allow(unused_imports)] // each test file uses a different part
pub use beckon_testkit::{
    Mosquitto, ServerIdentity, Squid, TestCa, Tinyproxy, WAIT, free_port as refused_port,
    start_scripted_server, start_silent_server,
};

/// The proxy URL of a tinyproxy started by the test.
pub fn proxy_url(proxy: &Tinyproxy) -> beckon_net::ProxyUrl {
    beckon_net::ProxyUrl::new("127.0.0.1", proxy.port)
}

/// The doctor's step timeout in tests.
pub const STEP: Duration = Duration::from_secs(2);
/// A doctor configuration for `host` on `primary` and `fallback`, short timeouts.
pub fn config(host: &str, primary: u16, fallback: u16) -> DoctorConfig {
    let mut config = DoctorConfig::new(host);
    config.primary_port = primary;
    config.fallback_port = Some(fallback);
    config.step_timeout = STEP;
    config
}

/// [`config`] for 127.0.0.1 trusting `ca`, whose certificate is written to `dir/ca.pem`.
pub fn config_trusting(ca: &TestCa, dir: &Path, primary: u16, fallback: u16) -> DoctorConfig {
    config("127.0.0.1", primary, fallback).with_ca_file(ca.write_pem(dir, "ca.pem"))
}

/// Mosquitto over TLS, with a certificate from `ca` for localhost and 127.0.0.1, accepting
/// `user` with `password`.
pub fn start_mosquitto(ca: &TestCa, user: &str, password: &str) -> Mosquitto {
    Mosquitto::start_tls(&ca.server_cert(&["localhost", "127.0.0.1"]), user, password)
}

/// Connect as `user` with `password`.
pub fn set_credentials(config: &mut DoctorConfig, user: &str, password: &str) {
    config.username = Some(user.into());
    config.password = Some(password.into());
}

/// Asserts that `text` (a verdict's detail, a summary, a report) contains `part`.
#[track_caller]
pub fn assert_contains(text: &str, part: &str) {
    assert!(text.contains(part), "{part:?} is not in:\n{text}");
}

/// Asserts that the report's summary starts with `prefix`.
pub fn assert_summary_starts(report: &Report, prefix: &str) {
    assert!(report.summary.starts_with(prefix), "{}", report.summary);
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

/// Asserts that `name` passed on `label`.
#[track_caller]
pub fn assert_passes(report: &Report, label: &str, name: StepName) {
    let verdict = step(path(report, label), name).verdict;
    assert_eq!(
        verdict,
        Verdict::Pass,
        "{label} {name}:\n{}",
        report.to_human()
    );
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
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(ca.root_store()),
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
    serve(config, |mut tls| async move {
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(WAIT, tls.read(&mut buf)).await;
    })
    .await
}

/// A TLS server on loopback with `config`: every connection, once its handshake is done
/// (within [`WAIT`]), is handed to `session` on a task of its own.
async fn serve<F, S>(config: rustls::ServerConfig, session: F) -> TlsServer
where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> S + Copy + Send + 'static,
    S: Future<Output = ()> + Send + 'static,
{
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
                if let Ok(Ok(tls)) = tokio::time::timeout(WAIT, acceptor.accept(tcp)).await {
                    session(tls).await;
                }
            });
        }
    });
    TlsServer { addr, task }
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
    serve(config, |tls| async move {
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        if alpn.as_deref() == Some(b"http/1.1") {
            serve_mqtt_websocket(tls).await;
        } else {
            serve_mqtt_raw(tls).await;
        }
    })
    .await
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
