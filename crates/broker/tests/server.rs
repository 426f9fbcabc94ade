//! The real server on 127.0.0.1:0, spoken to with raw bytes (and TLS with the generated CA).
//! Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use beckon_broker::{BrokerConfig, Listen, ServerHandle};
use beckon_mqtt::{Connect, Packet, Properties, ProtocolVersion, QoS, ReasonCode, encode};
use beckon_pki::IssuedCertificate;
use beckon_testkit::RunningBroker;
use bytes::{Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use common::{Client, WAIT, client_tls_config, publish_packet, subscribe_packet};

struct TestServer {
    running: RunningBroker,
}

impl TestServer {
    async fn start(tweak: impl FnOnce(&mut BrokerConfig)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = BrokerConfig {
            data_dir: dir.path().join("data"),
            ..BrokerConfig::default()
        };
        config.listeners.mqtts = Listen(Some("127.0.0.1:0".parse().expect("addr")));
        config.listeners.mqtt = Listen(Some("127.0.0.1:0".parse().expect("addr")));
        config.allow_anonymous = true;
        config.limits.connect_timeout_secs = 2;
        tweak(&mut config);
        Self {
            running: RunningBroker::start(config, dir).await,
        }
    }

    fn plain(&self) -> SocketAddr {
        self.running.plain()
    }

    fn tls(&self) -> SocketAddr {
        self.running.mqtts()
    }

    fn handle(&self) -> &ServerHandle {
        self.running.handle()
    }

    async fn stop(&mut self) {
        self.running.stop().await;
    }
}

fn connect_packet(version: ProtocolVersion, client_id: &str, keep_alive: u16) -> Packet {
    Packet::Connect(Box::new(Connect::new(
        version,
        client_id.to_owned(),
        keep_alive,
    )))
}

/// A CONNECT (keep alive 60 s) as bytes, to be sent raw or altered first.
fn connect_bytes(version: ProtocolVersion, client_id: &str) -> Vec<u8> {
    bytes_of(&connect_packet(version, client_id, 60), version)
}

fn bytes_of(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(packet, version, &mut b).expect("encode");
    b.to_vec()
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn connect(&mut self, client_id: &str, keep_alive: u16) -> beckon_mqtt::ConnAck {
        self.send(&connect_packet(self.version, client_id, keep_alive))
            .await;
        match self.recv().await {
            Some(Packet::ConnAck(ack)) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// The next packet, which must be a DISCONNECT with `code`.
    async fn expect_disconnect(&mut self, code: ReasonCode) {
        match self.recv().await {
            Some(Packet::Disconnect(d)) => assert_eq!(d.code, code),
            other => panic!("expected DISCONNECT {code:?}, got {other:?}"),
        }
    }

    /// Subscribes to `filter` at `qos` and waits for the SUBACK.
    async fn subscribed(&mut self, filter: &str, qos: QoS) {
        self.send(&subscribe_packet(1, &[filter], qos)).await;
        assert!(matches!(self.recv().await, Some(Packet::SubAck(_))));
    }

    async fn ping(&mut self) {
        self.send(&Packet::PingReq).await;
        assert_eq!(self.recv().await, Some(Packet::PingResp));
    }
}

async fn plain_client(addr: SocketAddr, version: ProtocolVersion) -> Client<TcpStream> {
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    Client::new(tcp, version)
}

async fn connected(addr: SocketAddr, version: ProtocolVersion, id: &str) -> Client<TcpStream> {
    let mut c = plain_client(addr, version).await;
    let ack = c.connect(id, 60).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS, "{ack:?}");
    c
}

/// A client over TLS to the server's TLS listener, trusting the CA in `ca`, offering the
/// `alpn` protocols and showing `identity` when given.
async fn tls_client(
    server: &TestServer,
    ca: &Path,
    alpn: &[&[u8]],
    identity: Option<&IssuedCertificate>,
    version: ProtocolVersion,
) -> std::io::Result<Client<tokio_rustls::client::TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect(server.tls()).await?;
    let config = client_tls_config(ca, alpn, identity);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")?;
    Ok(Client::new(tls, version))
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// Fails the test unless `elapsed` lies in `range`; `what` is what happened after it.
fn assert_took(elapsed: Duration, range: std::ops::Range<Duration>, what: &str) {
    assert!(
        range.contains(&elapsed),
        "{what} after {elapsed:?}, expected within {range:?}"
    );
}

fn generated_ca(server: &TestServer) -> std::path::PathBuf {
    server.running.generated_ca()
}

#[tokio::test]
async fn silent_socket_is_closed_at_the_connect_timeout() {
    let mut server = TestServer::start(|_| {}).await;
    let mut c = plain_client(server.plain(), ProtocolVersion::V5).await;
    let start = Instant::now();
    let bytes = c.read_to_close().await;
    let elapsed = start.elapsed();
    assert!(
        bytes.is_empty(),
        "nothing is sent to a silent socket: {bytes:?}"
    );
    assert_took(elapsed, ms(1500)..ms(6000), "closed (timeout 2 s)");
    server.stop().await;
}

#[tokio::test]
async fn connect_dribbled_one_byte_per_second_is_closed_at_the_timeout() {
    let mut server = TestServer::start(|c| c.limits.connect_timeout_secs = 3).await;
    let mut c = plain_client(server.plain(), ProtocolVersion::V5).await;
    let bytes = connect_bytes(ProtocolVersion::V5, "slow");
    assert!(
        bytes.len() > 6,
        "CONNECT longer than the timeout in seconds"
    );
    let start = Instant::now();
    let mut closed_at = None;
    for b in bytes {
        if c.stream.write_all(&[b]).await.is_err() {
            closed_at = Some(start.elapsed());
            break;
        }
        // A closed socket shows as EOF on read; poll it briefly between bytes.
        let mut probe = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(1), c.stream.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_at = Some(start.elapsed());
                break;
            }
            Ok(Ok(n)) => panic!("unexpected {n} bytes from the server"),
            Err(_) => {}
        }
        if start.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    let closed_at = closed_at.expect("the server closed the dribbling client");
    assert_took(closed_at, ms(2500)..ms(6000), "closed (timeout 3 s)");
    server.stop().await;
}

#[tokio::test]
async fn malformed_v5_packet_gets_disconnect_0x81_while_others_are_served() {
    let mut server = TestServer::start(|_| {}).await;
    let mut healthy = connected(server.plain(), ProtocolVersion::V5, "healthy").await;
    let mut bad = connected(server.plain(), ProtocolVersion::V5, "bad").await;
    // PUBLISH with QoS 3 is malformed.
    bad.send_raw(&[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01])
        .await;
    bad.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
    assert_eq!(bad.recv().await, None, "then closed");
    healthy.ping().await;
    server.stop().await;
}

#[tokio::test]
async fn oversized_remaining_length_gets_disconnect_0x95_before_the_body() {
    let mut server = TestServer::start(|c| c.limits.max_packet_size = 1024).await;
    let mut healthy = connected(server.plain(), ProtocolVersion::V5, "healthy").await;
    let mut big = connected(server.plain(), ProtocolVersion::V5, "big").await;
    // PUBLISH announcing 2 MiB; only the fixed header is sent.
    big.send_raw(&[0x30, 0x80, 0x80, 0x80, 0x01]).await;
    big.expect_disconnect(ReasonCode::PACKET_TOO_LARGE).await;
    assert_eq!(big.recv().await, None);
    healthy.ping().await;
    server.stop().await;
}

#[tokio::test]
async fn malformed_connect_v5_gets_connack_with_the_reason_and_v311_is_just_closed() {
    let mut server = TestServer::start(|_| {}).await;
    // v5 CONNECT with the reserved connect flag set (malformed).
    let mut good = connect_bytes(ProtocolVersion::V5, "x");
    good[9] |= 0x01;
    let mut c = plain_client(server.plain(), ProtocolVersion::V5).await;
    c.send_raw(&good).await;
    match c.recv().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, ReasonCode::MALFORMED_PACKET),
        other => panic!("expected CONNACK 0x81, got {other:?}"),
    }
    assert_eq!(c.recv().await, None);

    let mut bad311 = connect_bytes(ProtocolVersion::V311, "x");
    bad311[9] |= 0x01;
    let mut c = plain_client(server.plain(), ProtocolVersion::V311).await;
    c.send_raw(&bad311).await;
    assert!(
        c.read_to_close().await.is_empty(),
        "v3.1.1: closed without an answer"
    );

    // Protocol level 3 (MQIsdp era) is answered with return code 1.
    let mut level3 = connect_bytes(ProtocolVersion::V311, "x");
    level3[8] = 3;
    let mut c = plain_client(server.plain(), ProtocolVersion::V311).await;
    c.send_raw(&level3).await;
    assert_eq!(c.read_to_close().await, vec![0x20, 0x02, 0x00, 0x01]);
    server.stop().await;
}

#[tokio::test]
async fn thousands_of_random_byte_strings_never_take_the_server_down() {
    let mut server = TestServer::start(|c| c.limits.connect_timeout_secs = 1).await;
    let mut healthy = connected(server.plain(), ProtocolVersion::V5, "healthy").await;
    let connect = connect_bytes(ProtocolVersion::V5, "");
    let addr = server.plain();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_bec0);
    let mut cases = Vec::new();
    for i in 0..3000u32 {
        let len = rng.random_range(0..96);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 2 == 0 {
            // Half start with a valid CONNECT so the established path is fuzzed too.
            let mut c = connect.clone();
            c.extend_from_slice(&bytes);
            bytes = c;
        }
        cases.push(bytes);
    }
    let started = Instant::now();
    for chunk in cases.chunks(100) {
        let mut tasks = tokio::task::JoinSet::new();
        for bytes in chunk {
            let bytes = bytes.clone();
            tasks.spawn(async move {
                let Ok(mut tcp) = TcpStream::connect(addr).await else {
                    return;
                };
                let _ = tcp.write_all(&bytes).await;
                let mut sink = [0u8; 1024];
                // Read until the server closes or a short while passes.
                let _ = tokio::time::timeout(Duration::from_millis(300), async {
                    while let Ok(n) = tcp.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
            });
        }
        while tasks.join_next().await.is_some() {}
        healthy.ping().await;
    }
    println!("3000 random inputs in {:?}", started.elapsed());
    healthy.ping().await;
    let mut fresh = connected(server.plain(), ProtocolVersion::V311, "fresh").await;
    fresh.ping().await;
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_as_busy() {
    let mut server = TestServer::start(|c| c.limits.max_connections = 2).await;
    let mut a = connected(server.plain(), ProtocolVersion::V5, "a").await;
    let _b = connected(server.plain(), ProtocolVersion::V311, "b").await;
    let mut c = plain_client(server.plain(), ProtocolVersion::V5).await;
    let ack = c.connect("c", 60).await;
    assert_eq!(ack.code, ReasonCode::SERVER_BUSY);
    assert_eq!(c.recv().await, None);
    let mut d = plain_client(server.plain(), ProtocolVersion::V311).await;
    d.send(&connect_packet(ProtocolVersion::V311, "d", 60))
        .await;
    assert_eq!(d.read_to_close().await, vec![0x20, 0x02, 0x00, 0x03]);
    a.ping().await;
    // Room again once one leaves.
    drop(a);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut e = plain_client(server.plain(), ProtocolVersion::V5).await;
        let ack = e.connect("e", 60).await;
        if ack.code == ReasonCode::SUCCESS {
            break;
        }
        assert!(Instant::now() < deadline, "a freed slot is never reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn keep_alive_is_enforced_at_one_and_a_half_times() {
    let mut server = TestServer::start(|_| {}).await;
    let mut c = plain_client(server.plain(), ProtocolVersion::V5).await;
    let ack = c.connect("sleepy", 1).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS);
    let start = Instant::now();
    c.expect_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT).await;
    let elapsed = start.elapsed();
    assert_took(elapsed, ms(1300)..ms(4000), "closed (keep alive 1 s)");
    // A client that pings in time stays.
    let mut p = plain_client(server.plain(), ProtocolVersion::V311).await;
    p.connect("pinger", 1).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        p.ping().await;
    }
    server.stop().await;
}

#[tokio::test]
async fn messages_flow_between_clients() {
    let mut server = TestServer::start(|_| {}).await;
    let mut sub = connected(server.plain(), ProtocolVersion::V5, "sub").await;
    sub.subscribed("agents/+/wake", QoS::AtLeastOnce).await;
    let mut publisher = connected(server.plain(), ProtocolVersion::V311, "pub").await;
    let payload = Bytes::from_static(b"{\"v\":1}");
    publisher
        .send(&publish_packet(
            "agents/a1/wake",
            QoS::AtLeastOnce,
            7,
            payload,
        ))
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.packet_id == 7));
    match sub.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(p.topic, "agents/a1/wake");
            assert_eq!(&p.payload[..], b"{\"v\":1}");
        }
        other => panic!("expected the PUBLISH, got {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn tls_works_with_and_without_alpn_mqtt() {
    let mut server = TestServer::start(|_| {}).await;
    let ca = generated_ca(&server);
    let mut with = tls_client(&server, &ca, &[b"mqtt"], None, ProtocolVersion::V5)
        .await
        .expect("TLS with ALPN mqtt");
    assert_eq!(with.stream.get_ref().1.alpn_protocol(), Some(&b"mqtt"[..]));
    assert_eq!(with.connect("alpn", 60).await.code, ReasonCode::SUCCESS);
    with.ping().await;
    let mut without = tls_client(&server, &ca, &[], None, ProtocolVersion::V311)
        .await
        .expect("TLS without ALPN");
    assert_eq!(without.stream.get_ref().1.alpn_protocol(), None);
    assert_eq!(
        without.connect("no-alpn", 60).await.code,
        ReasonCode::SUCCESS
    );
    without.ping().await;
    server.stop().await;
}

#[tokio::test]
async fn without_anonymous_access_a_ca_issued_certificate_is_the_identity() {
    let mut server = TestServer::start(|c| c.allow_anonymous = false).await;
    let ca_path = generated_ca(&server);
    let ca = beckon_pki::CertificateAuthority::load(&ca_path, &ca_path.with_file_name("ca.key"))
        .expect("load CA");
    let agent = ca
        .issue_client(
            "agent-1",
            Some("tenant-a"),
            Some("agent"),
            Duration::from_secs(3600),
        )
        .expect("client cert");

    // With the certificate and an empty client id: accepted as agent-1.
    let mut ok = tls_client(
        &server,
        &ca_path,
        &[b"mqtt"],
        Some(&agent),
        ProtocolVersion::V5,
    )
    .await
    .expect("mTLS");
    let ack = ok.connect("", 60).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS, "{ack:?}");
    ok.ping().await;

    // With the certificate but another client id: refused.
    let mut other = tls_client(&server, &ca_path, &[], Some(&agent), ProtocolVersion::V5)
        .await
        .expect("mTLS");
    assert_eq!(
        other.connect("agent-2", 60).await.code,
        ReasonCode::NOT_AUTHORIZED
    );

    // Without a certificate: v5 0x87, v3.1.1 return code 5; plain TCP likewise.
    let mut none = tls_client(&server, &ca_path, &[], None, ProtocolVersion::V5)
        .await
        .expect("TLS");
    assert_eq!(none.connect("x", 60).await.code, ReasonCode::NOT_AUTHORIZED);
    let mut none3 = tls_client(&server, &ca_path, &[], None, ProtocolVersion::V311)
        .await
        .expect("TLS");
    none3
        .send(&connect_packet(ProtocolVersion::V311, "x", 60))
        .await;
    assert_eq!(none3.read_to_close().await, vec![0x20, 0x02, 0x00, 0x05]);
    let mut plain = plain_client(server.plain(), ProtocolVersion::V5).await;
    assert_eq!(
        plain.connect("x", 60).await.code,
        ReasonCode::NOT_AUTHORIZED
    );

    // A certificate from another CA fails the handshake itself.
    let stranger =
        beckon_pki::CertificateAuthority::generate("stranger", Duration::from_secs(3600))
            .expect("CA");
    let foreign = stranger
        .issue_client("agent-1", None, None, Duration::from_secs(3600))
        .expect("cert");
    let refused = async {
        let mut c = tls_client(&server, &ca_path, &[], Some(&foreign), ProtocolVersion::V5).await?;
        // TLS 1.3: the client learns of the refusal on its first read.
        c.send(&connect_packet(ProtocolVersion::V5, "agent-1", 60))
            .await;
        let mut b = [0u8; 8];
        match c.stream.read(&mut b).await {
            Ok(0) => Err(std::io::Error::other("closed")),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }
    .await;
    assert!(
        refused.is_err(),
        "a foreign certificate must not be accepted"
    );
    ok.ping().await;
    server.stop().await;
}

#[tokio::test]
async fn new_certificate_is_used_for_new_connections_and_live_ones_stay() {
    let mut server = TestServer::start(|c| c.tls.reload_interval_secs = 1).await;
    let old_ca = generated_ca(&server);
    let mut live = tls_client(&server, &old_ca, &[b"mqtt"], None, ProtocolVersion::V5)
        .await
        .expect("TLS");
    assert_eq!(live.connect("live", 60).await.code, ReasonCode::SUCCESS);

    // Replace the server certificate with one from a new CA; the file watcher picks it up.
    let new_ca = beckon_pki::CertificateAuthority::generate("rotated", Duration::from_secs(3600))
        .expect("CA");
    let new_ca_path = server.running.dir().join("new-ca.pem");
    std::fs::write(&new_ca_path, new_ca.cert_pem()).expect("write CA");
    let data = server.running.dir().join("data");
    new_ca
        .issue_server(&["localhost".to_owned()], Duration::from_secs(3600))
        .expect("issue")
        .save(&data.join("server.pem"), &data.join("server.key"))
        .expect("save");
    let deadline = Instant::now() + WAIT;
    loop {
        let attempt =
            tls_client(&server, &new_ca_path, &[b"mqtt"], None, ProtocolVersion::V5).await;
        if attempt.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "new certificate never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        tls_client(&server, &old_ca, &[b"mqtt"], None, ProtocolVersion::V5)
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
    live.ping().await;

    // A broken file keeps the current certificate.
    std::fs::write(data.join("server.pem"), "not a certificate").expect("write");
    assert!(server.handle().reload_certificates().is_err());
    let mut after = tls_client(&server, &new_ca_path, &[b"mqtt"], None, ProtocolVersion::V5)
        .await
        .expect("still served");
    assert_eq!(after.connect("after", 60).await.code, ReasonCode::SUCCESS);
    live.ping().await;
    server.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_sends_0x8b_to_v5_clients() {
    let mut server = TestServer::start(|_| {}).await;
    let mut v5 = connected(server.plain(), ProtocolVersion::V5, "five").await;
    let mut v3 = connected(server.plain(), ProtocolVersion::V311, "three").await;
    let ca = generated_ca(&server);
    let mut tls5 = tls_client(&server, &ca, &[b"mqtt"], None, ProtocolVersion::V5)
        .await
        .expect("TLS");
    assert_eq!(tls5.connect("tls-five", 60).await.code, ReasonCode::SUCCESS);
    let silent = plain_client(server.plain(), ProtocolVersion::V5).await;
    server.stop().await;
    v5.expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN).await;
    assert_eq!(v5.recv().await, None);
    tls5.expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN)
        .await;
    assert!(
        v3.read_to_close().await.is_empty(),
        "v3.1.1 clients are just closed"
    );
    let mut silent = silent;
    assert!(silent.read_to_close().await.is_empty());
    // The port is free again.
    assert!(TcpStream::connect(server.plain()).await.is_err());
}

/// Publishes `count` messages of 1 KiB without waiting for acknowledgements.
async fn flood(publisher: &mut Client<TcpStream>, topic: &str, qos: QoS, count: u16) {
    let payload = Bytes::from(vec![b'x'; 1024]);
    let mut all = Vec::new();
    for i in 1..=count {
        let packet = publish_packet(topic, qos, i, payload.clone());
        all.extend(bytes_of(&packet, ProtocolVersion::V5));
    }
    publisher.send_raw(&all).await;
}

#[tokio::test]
async fn slow_consumer_loses_qos0_but_stays_and_is_closed_when_qos1_backs_up_but_a_pipelining_publisher_is_served()
 {
    let mut server = TestServer::start(|c| {
        c.limits.max_outbound_packets = 8;
        c.limits.receive_maximum = 10_000;
        // A window wide enough for QoS 1 messages to back up behind a client that does not
        // read (the default, 32, would hold them in the session instead).
        c.limits.max_inflight = 20_000;
    })
    .await;
    // A QoS 0 subscriber that does not read while 20 MB are published.
    let mut lazy = connected(server.plain(), ProtocolVersion::V5, "lazy").await;
    lazy.subscribed("bulk", QoS::AtMostOnce).await;
    let mut publisher = connected(server.plain(), ProtocolVersion::V5, "pub").await;
    flood(&mut publisher, "bulk", QoS::AtMostOnce, 20_000).await;
    publisher.ping().await;
    // The broker kept serving; the lazy client is still connected and gets what was kept.
    let mut received = 0u32;
    loop {
        match tokio::time::timeout(Duration::from_millis(500), lazy.recv()).await {
            Ok(Some(Packet::Publish(_))) => received += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    assert!(
        received > 0 && received < 20_000,
        "received {received} of 20000"
    );
    lazy.ping().await;

    // A client that pipelines thousands of QoS 1 messages gets every acknowledgement, far
    // beyond the outbound queue (8 here): it reads them, it is no slow consumer.
    let mut pipelining = connected(server.plain(), ProtocolVersion::V5, "pipelining").await;
    flood(&mut pipelining, "nobody", QoS::AtLeastOnce, 5000).await;
    for n in 0..5000 {
        match pipelining.recv().await {
            Some(Packet::PubAck(_)) => {}
            other => panic!("expected PUBACK {n} of 5000, got {other:?}"),
        }
    }
    pipelining.ping().await;

    // A QoS 1 subscriber that does not read: its messages may not be dropped, so once they
    // back up beyond the outbound queue (20 MB sent to it, more than the socket buffers
    // hold), the broker closes it rather than wait for it.
    let mut deaf = connected(server.plain(), ProtocolVersion::V5, "deaf").await;
    deaf.subscribed("deaf", QoS::AtLeastOnce).await;
    let mut sender = connected(server.plain(), ProtocolVersion::V5, "sender").await;
    flood(&mut sender, "deaf", QoS::AtLeastOnce, 20_000).await;
    // What the socket buffers held, then the close (within WAIT).
    deaf.read_to_close().await;
    // The sender was served all along: its acknowledgements, then a ping.
    sender.send(&Packet::PingReq).await;
    loop {
        match sender.recv().await {
            Some(Packet::PubAck(_)) => {}
            Some(Packet::PingResp) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    lazy.ping().await;
    publisher.ping().await;
    server.stop().await;
}

#[tokio::test]
async fn will_is_published_when_a_client_vanishes_and_after_its_delay() {
    let mut server = TestServer::start(|_| {}).await;
    let mut watcher = connected(server.plain(), ProtocolVersion::V5, "watcher").await;
    watcher.subscribed("presence/+", QoS::AtLeastOnce).await;
    for (id, delay) in [("gone-now", None), ("gone-later", Some(1u32))] {
        let mut c = plain_client(server.plain(), ProtocolVersion::V5).await;
        let will_props = Properties::from(beckon_mqtt::PropertySet {
            will_delay_interval: delay,
            ..Default::default()
        });
        let connect_props = Properties::from(beckon_mqtt::PropertySet {
            session_expiry_interval: Some(60),
            ..Default::default()
        });
        c.send(&Packet::Connect(Box::new(Connect {
            will: Some(beckon_mqtt::Will {
                topic: format!("presence/{id}"),
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: will_props,
            }),
            properties: connect_props,
            ..Connect::new(ProtocolVersion::V5, id.to_owned(), 60)
        })))
        .await;
        assert!(
            matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS)
        );
        let start = Instant::now();
        drop(c); // the socket closes without DISCONNECT
        match watcher.recv().await {
            Some(Packet::Publish(p)) => {
                assert_eq!(p.topic, format!("presence/{id}"));
                if let Some(id) = p.packet_id {
                    watcher
                        .send(&Packet::PubAck(beckon_mqtt::Ack::new(id)))
                        .await;
                }
            }
            other => panic!("expected the will of {id}, got {other:?}"),
        }
        let earliest = if delay.is_some() { ms(900) } else { ms(0) };
        assert_took(start.elapsed(), earliest..ms(4000), &format!("{id}: will"));
    }
    server.stop().await;
}

/// A client that breaks Receive Maximum gets DISCONNECT 0x93 and reads it, even while it is
/// still writing: the broker keeps reading (and dropping) after its DISCONNECT for a moment
/// instead of closing at once, which would reset the connection under the client's writes.
#[tokio::test]
async fn a_client_still_writing_reads_the_disconnect_for_receive_maximum_exceeded() {
    let mut server = TestServer::start(|c| c.limits.receive_maximum = 2).await;
    let mut eager = connected(server.plain(), ProtocolVersion::V5, "eager").await;
    let mut three = Vec::new();
    for id in 1..=3 {
        three.extend(bytes_of(
            &publish_packet("t", QoS::ExactlyOnce, id, Bytes::from_static(b"x")),
            ProtocolVersion::V5,
        ));
    }
    eager.send_raw(&three).await;
    // PUBRELs keep coming for a while, as from a client that has not read yet.
    let pubrel = bytes_of(
        &Packet::PubRel(beckon_mqtt::Ack {
            packet_id: 1,
            code: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }),
        ProtocolVersion::V5,
    );
    for n in 0..15 {
        tokio::time::sleep(ms(20)).await;
        if let Err(e) = eager.stream.write_all(&pubrel).await {
            panic!("write {n} after the violation failed ({e}): the broker closed without reading");
        }
    }
    loop {
        match eager.recv().await {
            Some(Packet::PubRec(_) | Packet::PubComp(_)) => {}
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.code, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
                break;
            }
            other => panic!("expected DISCONNECT 0x93, got {other:?}"),
        }
    }
    server.stop().await;
}
