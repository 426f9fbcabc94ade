//! Tenants, identities, isolation and presence through the real server on 127.0.0.1:0:
//! clients authenticate with tenant client certificates or tokens, over TLS. Every wait is
//! bounded.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use beckon_broker::{BrokerConfig, Listen};
use beckon_identity::{
    KeyId, PresenceEvent, PresenceState, Role, SigningKey, TenantId, TokenSigner,
};
use beckon_mqtt::{Connect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode};
use beckon_pki::IssuedCertificate;
use beckon_testkit::{RunningBroker, TestTenant};
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use common::{WAIT, client_tls_config, http_get, http_get_over, publish_packet, subscribe_packet};

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

struct TestBroker {
    running: RunningBroker,
    tenants: PathBuf,
}

impl TestBroker {
    /// A broker with a tenant folder holding `names`.
    async fn start(names: &[&'static str]) -> (Self, Vec<TestTenant>) {
        Self::start_with(names, |_| {}).await
    }

    async fn start_with(
        names: &[&'static str],
        tweak: impl FnOnce(&mut BrokerConfig),
    ) -> (Self, Vec<TestTenant>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenants = dir.path().join("tenants");
        std::fs::create_dir_all(&tenants).expect("tenants folder");
        let made = names
            .iter()
            .map(|n| TestTenant::create(&tenants, n))
            .collect();
        let mut config = BrokerConfig {
            data_dir: dir.path().join("data"),
            tenants_dir: Some(tenants.clone()),
            tenants_reload_interval_secs: 1,
            ..BrokerConfig::default()
        };
        config.listeners.mqtts = Listen(Some("127.0.0.1:0".parse().expect("addr")));
        config.listeners.mqtt = Listen(None);
        config.limits.connect_timeout_secs = 5;
        tweak(&mut config);
        (
            Self {
                running: RunningBroker::start(config, dir).await,
                tenants,
            },
            made,
        )
    }

    fn addr(&self) -> SocketAddr {
        self.running.mqtts()
    }

    fn fallback(&self) -> SocketAddr {
        self.running.fallback()
    }

    fn server_ca(&self) -> PathBuf {
        self.running.generated_ca()
    }

    /// Rewrites tenant `id`'s file with `edit` (the broker picks the change up within a poll).
    fn edit_tenant(&self, id: &str, edit: impl FnOnce(String) -> String) {
        let path = self.tenants.join(format!("{id}.toml"));
        let text = std::fs::read_to_string(&path).expect("read tenant file");
        std::fs::write(&path, edit(text)).expect("rewrite tenant file");
    }

    async fn stop(&mut self) {
        self.running.stop().await;
    }
}

/// Any byte stream a test client speaks MQTT over (TLS, WebSocket).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A client of the broker over TLS, plain TCP or WebSocket.
type Client = common::Client<Box<dyn Io>>;

/// TLS to `addr` with the given ALPN list.
async fn tls_to(
    broker: &TestBroker,
    addr: SocketAddr,
    cert: Option<&IssuedCertificate>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    tls_over(broker, tcp, cert, alpn).await.expect("handshake")
}

/// TLS over an open TCP connection.
async fn tls_over(
    broker: &TestBroker,
    tcp: TcpStream,
    cert: Option<&IssuedCertificate>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls_config(
        &broker.server_ca(),
        alpn,
        cert,
    )));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
}

/// How a test client proves who it is.
enum Cred<'a> {
    None,
    Cert(&'a IssuedCertificate),
    Token(String),
}

impl Client {
    async fn open(broker: &TestBroker, cred: &Cred<'_>, version: ProtocolVersion) -> Self {
        let cert = match cred {
            Cred::Cert(c) => Some(*c),
            _ => None,
        };
        let stream = tls_to(broker, broker.addr(), cert, &[b"mqtt"]).await;
        Self::over(Box::new(stream), version)
    }

    fn over(stream: Box<dyn Io>, version: ProtocolVersion) -> Self {
        Self::new(stream, version)
    }

    async fn connect_with(
        &mut self,
        client_id: &str,
        cred: &Cred<'_>,
        keep_alive: u16,
    ) -> beckon_mqtt::ConnAck {
        let password = match cred {
            Cred::Token(t) => Some(Bytes::from(t.clone().into_bytes())),
            _ => None,
        };
        let connect = Packet::Connect(Box::new(Connect {
            username: password.as_ref().map(|_| "beckon".to_owned()),
            password,
            ..Connect::new(self.version, client_id.to_owned(), keep_alive)
        }));
        self.send(&connect).await;
        match self.recv().await {
            Some(Packet::ConnAck(ack)) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects and fails the test unless the broker accepts.
    async fn connect_accepted(&mut self, client_id: &str, cred: &Cred<'_>, keep_alive: u16) {
        let ack = self.connect_with(client_id, cred, keep_alive).await;
        assert_eq!(ack.code, ReasonCode::SUCCESS, "{client_id}: {ack:?}");
    }

    /// Subscribes at QoS 1 and fails the test unless every filter is granted.
    async fn subscribe_granted(&mut self, packet_id: u16, filters: &[&str]) {
        let codes = self.subscribe(packet_id, filters).await;
        assert_eq!(codes, vec![ReasonCode(1); filters.len()], "{filters:?}");
    }

    async fn subscribe(&mut self, packet_id: u16, filters: &[&str]) -> Vec<ReasonCode> {
        self.send(&subscribe_packet(packet_id, filters, QoS::AtLeastOnce))
            .await;
        loop {
            match self.recv().await {
                Some(Packet::SubAck(ack)) if ack.packet_id == packet_id => return ack.codes,
                Some(Packet::Publish(_)) => {} // retained presence may come first
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    /// Publishes at QoS 1 and returns the PUBACK code (publishes received meanwhile are
    /// acknowledged and dropped).
    async fn publish(&mut self, packet_id: u16, topic: &str, payload: &'static [u8]) -> ReasonCode {
        let payload = Bytes::from_static(payload);
        self.send(&publish_packet(topic, QoS::AtLeastOnce, packet_id, payload))
            .await;
        loop {
            match self.recv().await {
                // "No matching subscribers" is a success too.
                Some(Packet::PubAck(ack)) if ack.packet_id == packet_id => {
                    return if ack.code == ReasonCode::NO_MATCHING_SUBSCRIBERS {
                        ReasonCode::SUCCESS
                    } else {
                        ack.code
                    };
                }
                Some(Packet::Publish(p)) => self.ack(&p).await,
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
    }

    /// Publishes at QoS 1 and fails the test unless the broker accepts it.
    async fn publish_accepted(&mut self, packet_id: u16, topic: &str, payload: &'static [u8]) {
        let code = self.publish(packet_id, topic, payload).await;
        assert_eq!(code, ReasonCode::SUCCESS, "publish to {topic}");
    }

    async fn ack(&mut self, p: &Publish) {
        if let Some(id) = p.packet_id {
            self.send(&Packet::PubAck(beckon_mqtt::Ack {
                packet_id: id,
                code: ReasonCode::SUCCESS,
                properties: Properties::default(),
            }))
            .await;
        }
    }

    /// The next PUBLISH (acknowledged).
    async fn next_publish(&mut self) -> Publish {
        loop {
            match self.recv().await {
                Some(Packet::Publish(p)) => {
                    self.ack(&p).await;
                    return p;
                }
                Some(_) => {}
                None => panic!("connection closed while waiting for a PUBLISH"),
            }
        }
    }

    /// Every PUBLISH before the PINGRESP of a ping sent now.
    async fn publishes_until_ping(&mut self) -> Vec<Publish> {
        self.send(&Packet::PingReq).await;
        let mut got = Vec::new();
        loop {
            match self.recv().await {
                Some(Packet::PingResp) => return got,
                Some(Packet::Publish(p)) => {
                    self.ack(&p).await;
                    got.push(p);
                }
                Some(_) => {}
                None => panic!("connection closed"),
            }
        }
    }

    async fn disconnect(mut self) {
        self.send(&Packet::Disconnect(beckon_mqtt::Disconnect {
            code: ReasonCode::SUCCESS,
            properties: Properties::default(),
        }))
        .await;
        let _ = self.recv_within(WAIT).await;
    }
}

async fn connected(broker: &TestBroker, cred: Cred<'_>, client_id: &str) -> Client {
    let mut c = Client::open(broker, &cred, ProtocolVersion::V5).await;
    let ack = c.connect_with(client_id, &cred, 60).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS, "{ack:?}");
    c
}

/// The tenant's console: a server connected with a token, client id `console`.
async fn console(broker: &TestBroker, tenant: &TestTenant) -> Client {
    connected(
        broker,
        Cred::Token(tenant.token(Role::Server, "console")),
        "console",
    )
    .await
}

/// Agent `pc-1` of `tenant`, connected with its certificate and subscribed to its wake-ups,
/// after the tenant's console (returned second) woke it with `payload`.
async fn woken_agent(
    broker: &TestBroker,
    tenant: &TestTenant,
    payload: &'static [u8],
) -> (Client, Client) {
    let cert = tenant.certificate("agent", "pc-1");
    let mut agent = connected(broker, Cred::Cert(&cert), "pc-1").await;
    agent.subscribe_granted(1, &["agents/pc-1/wake"]).await;
    let mut server = console(broker, tenant).await;
    server
        .publish_accepted(1, "agents/pc-1/wake", payload)
        .await;
    assert_eq!(&agent.next_publish().await.payload[..], payload);
    (agent, server)
}

/// The tenant's console, subscribed to every agent's presence.
async fn presence_watcher(broker: &TestBroker, tenant: &TestTenant) -> Client {
    let mut server = console(broker, tenant).await;
    server.subscribe_granted(1, &["agents/+/presence"]).await;
    server
}

/// Waits until the broker closes `client`'s connection; fails the test with `what` after
/// [`WAIT`].
async fn closed_by_the_broker(client: &mut Client, what: &str) {
    loop {
        match client.recv_within(WAIT).await {
            Some(None) => break,
            Some(Some(_)) => {}
            None => panic!("{what} is still connected"),
        }
    }
}

/// Connects with `cred()` (a new credential each attempt) until the CONNACK code is `want`
/// (the broker applies a changed tenant file within a poll); fails the test with `what`
/// after [`WAIT`].
async fn wait_for_connack(
    broker: &TestBroker,
    cred: impl Fn() -> Cred<'static>,
    client_id: &str,
    want: ReasonCode,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let code = connack_code(broker, cred(), client_id, ProtocolVersion::V5).await;
        if code == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {code:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The CONNACK code a client with `cred` gets (v3.1.1: the return code as is).
async fn connack_code(
    broker: &TestBroker,
    cred: Cred<'_>,
    client_id: &str,
    version: ProtocolVersion,
) -> ReasonCode {
    let mut c = Client::open(broker, &cred, version).await;
    c.connect_with(client_id, &cred, 60).await.code
}

#[tokio::test]
async fn a_wake_up_flows_from_a_token_server_to_a_certificate_agent() {
    let (mut broker, tenants) = TestBroker::start(&["acme"]).await;
    let acme = &tenants[0];

    let agent_cert = acme.certificate("agent", "pc-1");
    let mut agent = Client::open(&broker, &Cred::Cert(&agent_cert), ProtocolVersion::V5).await;
    let ack = agent.connect_with("", &Cred::None, 60).await;
    assert_eq!(ack.code, ReasonCode::SUCCESS, "{ack:?}");
    assert_eq!(
        ack.properties.assigned_client_identifier.as_deref(),
        Some("pc-1"),
        "an empty client id becomes the identity's id"
    );
    agent.subscribe_granted(1, &["agents/pc-1/wake"]).await;

    let mut server = console(&broker, acme).await;
    server
        .publish_accepted(1, "agents/pc-1/wake", b"wake up")
        .await;

    let p = agent.next_publish().await;
    assert_eq!(
        p.topic, "agents/pc-1/wake",
        "the tenant prefix is not shown"
    );
    assert_eq!(&p.payload[..], b"wake up");

    // The agent's ack reaches the server.
    server.subscribe_granted(2, &["agents/+/ack"]).await;
    agent
        .publish_accepted(2, "agents/pc-1/ack", b"received")
        .await;
    let p = server.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("agents/pc-1/ack", &b"received"[..])
    );
    broker.stop().await;
}

#[tokio::test]
async fn refused_connects_carry_the_reason_code_of_what_failed() {
    let (mut broker, tenants) = TestBroker::start(&["acme", "globex"]).await;
    let (acme, globex) = (&tenants[0], &tenants[1]);
    let v5 = ProtocolVersion::V5;
    let v3 = ProtocolVersion::V311;

    // No credentials: not authorized (v3.1.1: 5).
    assert_eq!(
        connack_code(&broker, Cred::None, "pc-1", v5).await,
        ReasonCode::NOT_AUTHORIZED
    );
    assert_eq!(
        connack_code(&broker, Cred::None, "pc-1", v3).await,
        ReasonCode(5)
    );

    // A token that does not verify: bad user name or password (v3.1.1: 4).
    let garbage = || Cred::Token("bkn1.garbage.garbage".into());
    assert_eq!(
        connack_code(&broker, garbage(), "pc-1", v5).await,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD
    );
    assert_eq!(
        connack_code(&broker, garbage(), "pc-1", v3).await,
        ReasonCode(4)
    );

    // Tenant A's key cannot sign for tenant B.
    let forged = TokenSigner::new(
        TenantId::new("globex").expect("id"),
        SigningKey::generate(KeyId::new("k1").expect("kid")).expect("key"),
    )
    .issue(Role::Server, "console", now(), 3600)
    .expect("token");
    assert_eq!(
        connack_code(&broker, Cred::Token(forged), "console", v5).await,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD
    );
    let acme_token_as_globex = acme.token(Role::Server, "console");
    let mut c = Client::open(&broker, &Cred::None, v5).await;
    let ack = c
        .connect_with("console", &Cred::Token(acme_token_as_globex), 60)
        .await;
    assert_eq!(ack.code, ReasonCode::SUCCESS, "acme's token opens acme");
    c.disconnect().await;

    // A certificate from tenant B's CA claiming tenant A: not authorized.
    let wrong_ca = globex
        .ca
        .issue_client(
            "pc-1",
            Some("acme"),
            Some("agent"),
            Duration::from_secs(3600),
        )
        .expect("cert");
    assert_eq!(
        connack_code(&broker, Cred::Cert(&wrong_ca), "pc-1", v5).await,
        ReasonCode::NOT_AUTHORIZED
    );

    // A client id other than the identity's: 0x85 (v3.1.1: 2).
    let cert = acme.certificate("agent", "pc-1");
    assert_eq!(
        connack_code(&broker, Cred::Cert(&cert), "pc-2", v5).await,
        ReasonCode::CLIENT_IDENTIFIER_NOT_VALID
    );
    assert_eq!(
        connack_code(&broker, Cred::Cert(&cert), "pc-2", v3).await,
        ReasonCode(2)
    );

    // An expired token.
    let old = acme
        .signer
        .issue(Role::Agent, "pc-1", now() - 7200, 60)
        .expect("token");
    assert_eq!(
        connack_code(&broker, Cred::Token(old), "pc-1", v5).await,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD
    );
    broker.stop().await;
}

#[tokio::test]
async fn tenants_are_isolated_and_agents_reach_only_their_own_topics() {
    let (mut broker, tenants) = TestBroker::start(&["acme", "globex"]).await;
    let (acme, globex) = (&tenants[0], &tenants[1]);

    let mut acme_server = console(&broker, acme).await;
    acme_server.subscribe_granted(1, &["#"]).await;
    let _ = acme_server.publishes_until_ping().await; // retained presence of acme

    // Globex traffic: an agent and a server with the same ids as acme's.
    let (mut gx_agent, _gx_server) = woken_agent(&broker, globex, b"globex-secret").await;
    gx_agent
        .publish_accepted(2, "agents/pc-1/ack", b"globex-ack")
        .await;

    let seen = acme_server.publishes_until_ping().await;
    for p in &seen {
        assert!(
            &p.payload[..] != b"globex-secret" && &p.payload[..] != b"globex-ack",
            "acme's server saw globex traffic: {p:?}"
        );
    }
    // Nothing of globex's agent pc-1 (its presence included) reached acme.
    assert!(
        !seen.iter().any(|p| p.topic.starts_with("agents/pc-1/")),
        "acme saw globex's pc-1: {seen:?}"
    );

    // Agent rules inside one tenant.
    let x_cert = acme.certificate("agent", "x");
    let mut x = connected(&broker, Cred::Cert(&x_cert), "x").await;
    assert_eq!(
        x.subscribe(1, &["agents/y/wake", "agents/x/wake", "agents/+/wake"])
            .await,
        vec![
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode(1),
            ReasonCode::NOT_AUTHORIZED
        ],
        "only its own wake-ups, no wildcards"
    );
    assert_eq!(
        x.publish(1, "agents/y/ack", b"forged ack").await,
        ReasonCode::NOT_AUTHORIZED
    );
    assert_eq!(
        x.publish(2, "agents/x/presence", b"{\"state\":\"connected\"}")
            .await,
        ReasonCode::NOT_AUTHORIZED
    );
    assert_eq!(
        x.publish(3, "agents/y/wake", b"wake y").await,
        ReasonCode::NOT_AUTHORIZED
    );
    x.publish_accepted(4, "agents/x/ack", b"real ack").await;
    let seen = acme_server.publishes_until_ping().await;
    assert!(
        seen.iter().any(|p| &p.payload[..] == b"real ack"),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|p| &p.payload[..] == b"forged ack"
            || &p.payload[..] == b"{\"state\":\"connected\"}"
            || &p.payload[..] == b"wake y"),
        "forged traffic reached the server: {seen:?}"
    );

    // v3.1.1: a refused subscription is 0x80.
    let y_cert = acme.certificate("agent", "y");
    let mut y = Client::open(&broker, &Cred::Cert(&y_cert), ProtocolVersion::V311).await;
    y.connect_accepted("y", &Cred::None, 60).await;
    let codes = y.subscribe(1, &["agents/x/wake"]).await;
    assert!(codes[0].0 >= 0x80, "{codes:?}");
    broker.stop().await;
}

fn presence(p: &Publish) -> PresenceEvent {
    PresenceEvent::from_json(&p.payload).expect("presence JSON")
}

/// The next presence event of `topic`.
async fn next_presence(server: &mut Client, topic: &str) -> PresenceEvent {
    loop {
        let p = server.next_publish().await;
        if p.topic == topic {
            return presence(&p);
        }
    }
}

#[tokio::test]
async fn presence_follows_connect_disconnect_keepalive_and_takeover() {
    let (mut broker, tenants) = TestBroker::start(&["acme"]).await;
    let acme = &tenants[0];
    let mut server = presence_watcher(&broker, acme).await;
    let topic = "agents/pc-1/presence";
    let cert = acme.certificate("agent", "pc-1");

    // Connect, then a clean disconnect.
    let agent = connected(&broker, Cred::Cert(&cert), "pc-1").await;
    let e = connected_event(&mut server, topic).await;
    assert_eq!(serde_json_path(&e), "8883");
    assert!(e.remote_addr.starts_with("127.0.0.1:"), "{e:?}");
    agent.disconnect().await;
    disconnected_event(&mut server, topic, "client_disconnect").await;

    // A keep alive of 1 s and silence: closed after 1.5 s.
    let mut silent = Client::open(&broker, &Cred::Cert(&cert), ProtocolVersion::V5).await;
    silent.connect_accepted("pc-1", &Cred::None, 1).await;
    connected_event(&mut server, topic).await;
    disconnected_event(&mut server, topic, "keepalive_timeout").await;
    drop(silent);

    // Takeover: the old connection's event first, the new one last (and retained).
    let _first = connected(&broker, Cred::Cert(&cert), "pc-1").await;
    connected_event(&mut server, topic).await;
    let _second = connected(&broker, Cred::Cert(&cert), "pc-1").await;
    disconnected_event(&mut server, topic, "taken_over").await;
    connected_event(&mut server, topic).await;

    // A server subscribing later sees the current state: connected.
    let mut late = connected(
        &broker,
        Cred::Token(acme.token(Role::Server, "late")),
        "late",
    )
    .await;
    late.subscribe_granted(1, &[topic]).await;
    connected_event(&mut late, topic).await;

    // Transport closed without DISCONNECT.
    drop(_second);
    disconnected_event(&mut server, topic, "connection_lost").await;
    broker.stop().await;
}

/// Waits for `topic`'s next presence event and fails the test unless it says connected.
async fn connected_event(server: &mut Client, topic: &str) -> PresenceEvent {
    let e = next_presence(server, topic).await;
    assert_eq!(e.state, PresenceState::Connected, "{topic}: {e:?}");
    e
}

/// Waits for `topic`'s next presence event and fails the test unless it says disconnected
/// for `reason`.
async fn disconnected_event(server: &mut Client, topic: &str, reason: &str) {
    let e = next_presence(server, topic).await;
    assert_eq!(
        (e.state, e.reason.as_deref()),
        (PresenceState::Disconnected, Some(reason)),
        "{topic}"
    );
}

fn serde_json_path(e: &PresenceEvent) -> String {
    let json = String::from_utf8(e.to_json()).expect("utf-8");
    let start = json.find("\"path\":\"").expect("path") + 8;
    json[start..].split('"').next().expect("value").to_owned()
}

#[tokio::test]
async fn a_tenant_added_while_running_is_used_without_restart() {
    let (mut broker, _) = TestBroker::start(&["acme"]).await;
    let folder = broker.tenants.clone();
    // Created after start: unknown at first.
    let elsewhere = tempfile::tempdir().expect("tmp");
    let initech = TestTenant::create(elsewhere.path(), "initech");
    let token = initech.token(Role::Server, "console");
    assert_eq!(
        connack_code(
            &broker,
            Cred::Token(token.clone()),
            "console",
            ProtocolVersion::V5
        )
        .await,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD
    );
    let toml = format!(
        "[[token_key]]\nkid = \"k1\"\npublic_key = \"{}\"\n",
        initech.signer.key().public_key().to_base64()
    );
    std::fs::write(folder.join("initech.toml"), toml).expect("write");
    wait_for_connack(
        &broker,
        || Cred::Token(token.clone()),
        "console",
        ReasonCode::SUCCESS,
        "the new tenant was not picked up",
    )
    .await;
    broker.stop().await;
}

#[tokio::test]
async fn quota_full_tenant_refuses_with_0x97() {
    let (mut broker, tenants) = TestBroker::start(&["acme"]).await;
    let acme = &tenants[0];
    broker.edit_tenant("acme", |text| format!("max_connections = 1\n{text}"));
    // Wait until the quota is in force: a second connection gets 0x97.
    let _first = connected(&broker, Cred::Token(acme.token(Role::Agent, "a1")), "a1").await;
    wait_for_connack(
        &broker,
        || Cred::Token(acme.token(Role::Agent, "a2")),
        "a2",
        ReasonCode::QUOTA_EXCEEDED,
        "quota not applied",
    )
    .await;
    broker.stop().await;
}

#[tokio::test]
async fn mosquitto_sub_with_a_tenant_client_certificate_receives_a_wake_up() {
    let mosquitto_sub = Path::new("/usr/bin/mosquitto_sub");
    if !mosquitto_sub.exists() {
        eprintln!("mosquitto_sub not installed; skipped");
        return;
    }
    let (mut broker, tenants) = TestBroker::start(&["acme"]).await;
    let acme = &tenants[0];
    let dir = tempfile::tempdir().expect("tmp");
    let cert = acme.certificate("agent", "pc-9");
    std::fs::write(dir.path().join("c.pem"), &cert.cert_pem).expect("cert");
    std::fs::write(dir.path().join("k.pem"), &cert.key_pem).expect("key");
    let mut child = tokio::process::Command::new(mosquitto_sub)
        .arg("-h")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(broker.addr().port().to_string())
        .arg("--cafile")
        .arg(broker.server_ca())
        .arg("--cert")
        .arg(dir.path().join("c.pem"))
        .arg("--key")
        .arg(dir.path().join("k.pem"))
        .args([
            "-i",
            "pc-9",
            "-t",
            "agents/pc-9/wake",
            "-q",
            "1",
            "-C",
            "1",
            "-V",
            "mqttv311",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub starts");
    let mut server = console(&broker, acme).await;
    // mosquitto_sub subscribes at its own pace: publish until it has one and exits.
    let mut id = 1;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        assert!(id < 50, "mosquitto_sub got nothing");
        server
            .publish_accepted(id, "agents/pc-9/wake", b"wake pc-9")
            .await;
        id += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("exit in time")
        .expect("output");
    assert!(
        status.success(),
        "mosquitto_sub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "wake pc-9");
    broker.stop().await;
}

async fn https_get(broker: &TestBroker, path: &str) -> String {
    let tls = tls_to(broker, broker.fallback(), None, &[b"http/1.1"]).await;
    http_get_over(tls, path).await
}

#[tokio::test]
async fn the_shared_port_carries_mqtt_by_alpn_and_sniffing_websocket_and_https() {
    let (mut broker, tenants) = TestBroker::start_with(&["acme"], |c| {
        c.listeners.fallback = Listen(Some("127.0.0.1:0".parse().expect("addr")));
    })
    .await;
    let acme = &tenants[0];
    let mut server = presence_watcher(&broker, acme).await;

    // 1. ALPN mqtt with a client certificate.
    let cert = acme.certificate("agent", "alpn");
    let tls = tls_to(&broker, broker.fallback(), Some(&cert), &[b"mqtt"]).await;
    let mut alpn = Client::over(Box::new(tls), ProtocolVersion::V5);
    alpn.connect_accepted("alpn", &Cred::None, 60).await;
    alpn.subscribe_granted(1, &["agents/alpn/wake"]).await;
    let e = next_presence(&mut server, "agents/alpn/presence").await;
    assert_eq!(
        (e.state, serde_json_path(&e)),
        (PresenceState::Connected, "443-mqtt".into())
    );

    // 2. No ALPN: the first byte (CONNECT) decides; a token this time.
    let tls = tls_to(&broker, broker.fallback(), None, &[]).await;
    let mut sniffed = Client::over(Box::new(tls), ProtocolVersion::V311);
    let token = Cred::Token(acme.token(Role::Agent, "sniffed"));
    sniffed.connect_accepted("sniffed", &token, 60).await;
    sniffed.subscribe_granted(1, &["agents/sniffed/wake"]).await;

    // 3. WebSocket at /mqtt (subprotocol mqtt) after ALPN http/1.1.
    let tls = tls_to(&broker, broker.fallback(), None, &[b"http/1.1"]).await;
    let ws = beckon_net::websocket_handshake(
        tls,
        "localhost",
        broker.fallback().port(),
        &beckon_net::WsSettings::default(),
        WAIT,
    )
    .await
    .expect("WebSocket upgrade");
    let mut websocket = Client::over(Box::new(ws), ProtocolVersion::V5);
    let token = Cred::Token(acme.token(Role::Agent, "ws"));
    websocket.connect_accepted("ws", &token, 30).await;
    websocket.subscribe_granted(1, &["agents/ws/wake"]).await;
    let e = next_presence(&mut server, "agents/ws/presence").await;
    assert_eq!(serde_json_path(&e), "443-websocket");

    // Each gets its wake-up end to end.
    for (i, (client, id)) in [
        (&mut alpn, "alpn"),
        (&mut sniffed, "sniffed"),
        (&mut websocket, "ws"),
    ]
    .into_iter()
    .enumerate()
    {
        let topic = format!("agents/{id}/wake");
        let packet_id = 10 + i as u16;
        server.publish_accepted(packet_id, &topic, b"wake").await;
        let p = client.next_publish().await;
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            (topic.as_str(), &b"wake"[..])
        );
    }

    // 4. HTTPS on the same port.
    let health = https_get(&broker, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains("\"ok\""), "{health}");
    let ready = https_get(&broker, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let info = https_get(&broker, "/").await;
    assert!(
        info.starts_with("HTTP/1.1 200") && info.contains("Beckon"),
        "{info}"
    );
    let missing = https_get(&broker, "/nothing").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

    // The MQTT clients are still served after the HTTP requests.
    websocket.publishes_until_ping().await;
    broker.stop().await;
}

#[tokio::test]
async fn metrics_count_connections_refusals_wake_ups_and_descriptors() {
    let (mut broker, tenants) = TestBroker::start_with(&["acme"], |c| {
        c.listeners.admin = Listen(Some("127.0.0.1:0".parse().expect("addr")));
    })
    .await;
    let admin = broker.running.bound.admin.expect("admin listener");
    let acme = &tenants[0];
    let (mut agent, _server) = woken_agent(&broker, acme, b"wake").await;
    assert_eq!(
        connack_code(&broker, Cred::None, "x", ProtocolVersion::V5).await,
        ReasonCode::NOT_AUTHORIZED
    );
    assert_eq!(
        agent.publish(2, "agents/other/ack", b"no").await,
        ReasonCode::NOT_AUTHORIZED
    );

    let health = http_get(admin, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    // Core counters are copied about once a second.
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let text = http_get(admin, "/metrics").await;
        if text.contains("beckon_broker_messages_in_total 1") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages_in never 1:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for expected in [
        "HTTP/1.1 200",
        r#"beckon_broker_connections{path="8883",tenant="acme"} 2"#,
        r#"beckon_broker_connects_total{reason="accepted"} 2"#,
        r#"beckon_broker_connects_total{reason="not_authorized"} 1"#,
        r#"beckon_broker_denied_total{access="publish"} 1"#,
        "beckon_broker_wakeups_delivered_total 1",
        "beckon_broker_open_fds ",
        "beckon_broker_fd_limit ",
        "beckon_broker_queued_messages ",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    broker.stop().await;
}

#[tokio::test]
async fn a_proxy_protocol_header_gives_the_client_address_in_presence() {
    let (mut broker, tenants) = TestBroker::start_with(&["acme"], |c| {
        c.listeners.fallback = Listen(Some("127.0.0.1:0".parse().expect("addr")));
        c.listeners.proxy_protocol = vec!["fallback".into()];
    })
    .await;
    let acme = &tenants[0];
    // 8883 does not expect a header.
    let mut server = presence_watcher(&broker, acme).await;

    let mut v2 = Vec::from(*b"\r\n\r\n\0\r\nQUIT\n");
    v2.extend_from_slice(&[
        0x21, 0x11, 0, 12, 198, 51, 100, 9, 127, 0, 0, 1, 0x9C, 0x40, 0x01, 0xBB,
    ]);
    let headers: [(&str, Vec<u8>, &str); 2] = [
        (
            "pc-1",
            b"PROXY TCP4 203.0.113.7 127.0.0.1 50122 443\r\n".to_vec(),
            "203.0.113.7:50122",
        ),
        ("pc-2", v2, "198.51.100.9:40000"),
    ];
    let mut keep = Vec::new();
    for (id, header, expected) in headers {
        let mut tcp = TcpStream::connect(broker.fallback())
            .await
            .expect("connect");
        tcp.write_all(&header).await.expect("header");
        let cert = acme.certificate("agent", id);
        let tls = tls_over(&broker, tcp, Some(&cert), &[b"mqtt"])
            .await
            .expect("TLS");
        let mut agent = Client::over(Box::new(tls), ProtocolVersion::V5);
        agent.connect_accepted(id, &Cred::None, 60).await;
        let e = next_presence(&mut server, &format!("agents/{id}/presence")).await;
        assert_eq!(e.remote_addr, expected);
        assert_eq!(serde_json_path(&e), "443-mqtt");
        keep.push(agent);
    }

    // Without the header the connection is closed before TLS.
    let tcp = TcpStream::connect(broker.fallback())
        .await
        .expect("connect");
    assert!(tls_over(&broker, tcp, None, &[b"mqtt"]).await.is_err());
    broker.stop().await;
}

#[tokio::test]
async fn shutdown_tells_connected_servers_that_every_identity_goes() {
    let (mut broker, tenants) = TestBroker::start(&["acme"]).await;
    let acme = &tenants[0];
    let mut server = presence_watcher(&broker, acme).await;
    let cert = acme.certificate("agent", "pc-1");
    let _agent = connected(&broker, Cred::Cert(&cert), "pc-1").await;
    connected_event(&mut server, "agents/pc-1/presence").await;
    let stop = tokio::spawn(async move {
        broker.stop().await;
    });
    // The event, then DISCONNECT 0x8B to the server itself (nothing is acknowledged: the
    // broker is going away).
    let mut event = None;
    loop {
        match server.recv().await {
            Some(Packet::Publish(p)) if p.topic == "agents/pc-1/presence" => {
                event = Some(presence(&p));
            }
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.code, ReasonCode::SERVER_SHUTTING_DOWN);
                break;
            }
            Some(_) => {}
            None => panic!("closed without DISCONNECT"),
        }
    }
    let e = event.expect("a presence event before the DISCONNECT");
    assert_eq!(
        (e.state, e.reason.as_deref()),
        (PresenceState::Disconnected, Some("server_shutdown"))
    );
    tokio::time::timeout(WAIT, stop)
        .await
        .expect("stopped in time")
        .expect("stop task");
}

#[tokio::test]
async fn anonymous_clients_beside_tenants_see_plain_topics_and_never_a_tenants() {
    let (mut broker, tenants) =
        TestBroker::start_with(&["acme"], |c| c.allow_anonymous = true).await;
    let acme = &tenants[0];
    let mut anon = connected(&broker, Cred::None, "dev-1").await;
    anon.subscribe_granted(1, &["#"]).await;
    let mut anon2 = connected(&broker, Cred::None, "dev-2").await;
    anon2.publish_accepted(1, "demo/topic", b"hello").await;
    let p = anon.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("demo/topic", &b"hello"[..])
    );

    // Tenant traffic never reaches the anonymous namespace.
    let (mut agent, _server) = woken_agent(&broker, acme, b"secret").await;
    let seen = anon.publishes_until_ping().await;
    assert!(
        seen.is_empty(),
        "anonymous client saw tenant traffic: {seen:?}"
    );
    // And an anonymous publish to a tenant-looking topic stays anonymous.
    anon2.publish_accepted(2, "agents/pc-1/wake", b"fake").await;
    let seen = agent.publishes_until_ping().await;
    assert!(
        seen.is_empty(),
        "an anonymous publish reached a tenant agent: {seen:?}"
    );

    // Client ids with '/' are reserved for identities.
    assert_eq!(
        connack_code(&broker, Cred::None, "acme/agent/pc-1", ProtocolVersion::V5).await,
        ReasonCode::CLIENT_IDENTIFIER_NOT_VALID
    );
    broker.stop().await;
}

#[tokio::test]
async fn removing_a_tenant_file_closes_its_connections_and_refuses_new_ones() {
    let (mut broker, tenants) = TestBroker::start(&["acme", "globex"]).await;
    let (acme, globex) = (&tenants[0], &tenants[1]);
    let acme_cert = acme.certificate("agent", "pc-1");
    let mut acme_agent = connected(&broker, Cred::Cert(&acme_cert), "pc-1").await;
    let mut gx_server = console(&broker, globex).await;

    std::fs::remove_file(broker.tenants.join("acme.toml")).expect("remove tenant file");
    // Closed within a few polls (1 s each).
    closed_by_the_broker(&mut acme_agent, "the removed tenant's agent").await;
    let token = acme.token(Role::Agent, "pc-1");
    assert_eq!(
        connack_code(&broker, Cred::Token(token), "pc-1", ProtocolVersion::V5).await,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        "the removed tenant's tokens no longer verify"
    );
    // Other tenants are untouched.
    gx_server.publishes_until_ping().await;
    broker.stop().await;
}

#[tokio::test]
async fn an_agent_that_says_it_came_through_a_proxy_is_shown_so_in_presence() {
    let (mut broker, tenants) = TestBroker::start(&["acme"]).await;
    let acme = &tenants[0];
    let mut server = presence_watcher(&broker, acme).await;
    let cert = acme.certificate("agent", "pc-1");
    let mut agent = Client::open(&broker, &Cred::Cert(&cert), ProtocolVersion::V5).await;
    let mut properties = Properties::default();
    properties.user_properties.push((
        beckon_broker::VIA_PROXY_PROPERTY.to_owned(),
        "true".to_owned(),
    ));
    agent
        .send(&Packet::Connect(Box::new(Connect {
            properties,
            ..Connect::new(ProtocolVersion::V5, "pc-1", 60)
        })))
        .await;
    assert!(
        matches!(agent.recv().await, Some(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS)
    );
    let e = next_presence(&mut server, "agents/pc-1/presence").await;
    assert_eq!(
        (e.state, e.via_proxy),
        (PresenceState::Connected, Some(true))
    );
    broker.stop().await;
}

#[tokio::test]
async fn a_revoked_token_is_cut_off_and_refused_while_newer_ones_and_others_connect() {
    let (mut broker, tenants) = TestBroker::start(&["acme"]).await;
    let acme = &tenants[0];
    let mut server = presence_watcher(&broker, acme).await;
    let old = |id: &str| {
        acme.signer
            .issue(Role::Agent, id, now() - 100, 3600)
            .expect("token")
    };
    let mut pc1 = connected(&broker, Cred::Token(old("pc-1")), "pc-1").await;
    let mut pc2 = connected(&broker, Cred::Token(old("pc-2")), "pc-2").await;
    let topic = "agents/pc-1/presence";
    connected_event(&mut server, topic).await;

    // The console removes pc-1: tokens issued until 50 s ago are revoked.
    let revoked = format!(
        "\n[[revoked]]\nid = \"pc-1\"\ntokens_issued_until = {}\n",
        now() - 50
    );
    broker.edit_tenant("acme", |text| text + &revoked);
    closed_by_the_broker(&mut pc1, "the revoked agent").await;
    disconnected_event(&mut server, topic, "revoked").await;
    for (version, code) in [
        (ProtocolVersion::V5, ReasonCode::NOT_AUTHORIZED),
        (ProtocolVersion::V311, ReasonCode(5)),
    ] {
        assert_eq!(
            connack_code(&broker, Cred::Token(old("pc-1")), "pc-1", version).await,
            code
        );
    }
    // A token issued after the removal is a new credential; pc-2 was never touched.
    let fresh = connected(
        &broker,
        Cred::Token(acme.token(Role::Agent, "pc-1")),
        "pc-1",
    )
    .await;
    pc2.publishes_until_ping().await;
    fresh.disconnect().await;
    broker.stop().await;
}

/// The TLS suite a default rustls client (which lists AES-256-GCM first) gets from `addr`.
async fn negotiated_suite(broker: &TestBroker, addr: SocketAddr) -> rustls::CipherSuite {
    let tls = tls_to(broker, addr, None, &[b"mqtt"]).await;
    tls.get_ref()
        .1
        .negotiated_cipher_suite()
        .expect("a suite after the handshake")
        .suite()
}

#[tokio::test]
async fn a_broker_with_tenants_picks_the_cipher_suite_as_one_without() {
    let (mut plain, _) = TestBroker::start_with(&[], |c| c.tenants_dir = None).await;
    let (mut tenanted, _) = TestBroker::start(&["acme"]).await;
    let without = negotiated_suite(&plain, plain.addr()).await;
    let with = negotiated_suite(&tenanted, tenanted.addr()).await;
    // The broker's order (AES-128-GCM first, see beckon_pki) decides, with tenants or not.
    assert_eq!(without, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert_eq!(with, without, "the tenant listener keeps the suite order");
    plain.stop().await;
    tenanted.stop().await;
}

/// One QoS 2 exchange (PUBLISH, PUBREC, PUBREL, PUBCOMP) and one SUBSCRIBE; returns the
/// longest wait for an answer.
async fn qos2_round(client: &mut Client, id: u16, agent: &str) -> Duration {
    let started = std::time::Instant::now();
    let topic = format!("agents/{agent}/ack");
    client
        .send(&publish_packet(
            &topic,
            QoS::ExactlyOnce,
            id,
            Bytes::from_static(b"{}"),
        ))
        .await;
    match client.recv().await {
        Some(Packet::PubRec(a)) if a.packet_id == id => {}
        other => panic!("{agent}: expected PUBREC {id}, got {other:?}"),
    }
    let mut longest = started.elapsed();
    let started = std::time::Instant::now();
    client
        .send(&Packet::PubRel(beckon_mqtt::Ack::new(id)))
        .await;
    match client.recv().await {
        Some(Packet::PubComp(a)) if a.packet_id == id => {}
        other => panic!("{agent}: expected PUBCOMP {id}, got {other:?}"),
    }
    longest = longest.max(started.elapsed());
    let started = std::time::Instant::now();
    client
        .subscribe_granted(id, &[&format!("agents/{agent}/wake")])
        .await;
    longest.max(started.elapsed())
}

/// The report: "with two clients at a time doing MQTT 5 QoS 2 exchanges, PUBREC or SUBACK
/// sometimes did not come within 1 to 2 s". Two identities at once are answered at once; two
/// connections of one identity (a tenant keys sessions by identity, whatever client id is
/// sent) take each other over, which is what stalled the clients, and are now told so.
#[tokio::test]
async fn concurrent_qos2_exchanges_are_answered_and_a_shared_identity_is_told_it_was_taken_over() {
    let (mut broker, tenants) = TestBroker::start(&["acme"]).await;
    let acme = &tenants[0];
    let exchanges = |agent: &'static str| {
        let cert = acme.certificate("agent", agent);
        let broker = &broker;
        async move {
            let mut client = connected(broker, Cred::Cert(&cert), agent).await;
            let mut longest = Duration::ZERO;
            for id in 1..=100 {
                longest = longest.max(qos2_round(&mut client, id, agent).await);
            }
            client.disconnect().await;
            longest
        }
    };
    let (one, two) = tokio::join!(exchanges("pc-1"), exchanges("pc-2"));
    assert!(
        one.max(two) < Duration::from_millis(500),
        "longest wait for PUBREC, PUBCOMP or SUBACK: {one:?} and {two:?}"
    );

    // Two connections with pc-1's certificate: the second takes the session over.
    let cert = acme.certificate("agent", "pc-1");
    let mut first = connected(&broker, Cred::Cert(&cert), "").await;
    let _second = connected(&broker, Cred::Cert(&cert), "").await;
    match first.recv_within(WAIT).await {
        Some(Some(Packet::Disconnect(d))) => {
            assert_eq!(d.code, ReasonCode::SESSION_TAKEN_OVER);
            let why = d.properties.reason_string.clone().unwrap_or_default();
            assert!(why.contains("one connection at a time"), "{why}");
        }
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    broker.stop().await;
}
