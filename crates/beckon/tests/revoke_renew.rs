//! With real parts in one process (console, broker with the console's tenant file, agents
//! enrolled over HTTP and running their runtime):
//! - removing an agent through the API closes its connection (presence goes offline), its
//!   certificate is refused at CONNECT (v5 0x87, v3.1.1 return code 5), other agents stay
//!   connected and keep being woken, and the id enrolled again is a new identity;
//! - an agent with a short-lived certificate renews it through the console and connects
//!   with the new one after the old one has expired.
//!
//! Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use beckon_agent::enroll::{EnrollOptions, enroll};
use beckon_agent::state::AgentState;
use beckon_agent::{AgentConfig, LadderConnector, WakeUpCheck, run_agent};
use beckon_broker::{BrokerConfig, Listen, Server, ServerHandle};
use beckon_console::{BrokerLink, Console, ConsoleConfig, ConsoleHandle};
use beckon_mqtt::{Connect, Packet, ProtocolVersion, ReasonCode, decode, encode};
use bytes::BytesMut;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use common::{ConsoleApi, free_port};

const LIMIT: Duration = Duration::from_secs(20);
/// Agents reconnect fast here (a fleet waits up to 30 s at start and backs off to 5 min).
const FAST: &str = "[reconnect]\nstart_delay_max = \"0s\"\nbackoff_cap = \"2s\"\n";

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    console: ConsoleHandle,
    api: ConsoleApi,
    broker: Option<ServerHandle>,
    broker_config: BrokerConfig,
    mqtts: SocketAddr,
    stop_agents: watch::Sender<bool>,
}

async fn setup(cert_validity: Duration) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let mqtts: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let tenants = dir.join("broker").join("tenants");
    let mut config = ConsoleConfig::new(dir.join("console"));
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.broker = BrokerLink::Tls {
        host: "localhost".into(),
        port: mqtts.port(),
        ca_file: None,
    };
    config.default_broker_endpoints = vec![format!("localhost:{}", mqtts.port())];
    config.broker_tenant_file = Some(tenants.join("default.toml"));
    config.agent_certificate_validity = cert_validity;
    let console = Console::start(config).await.expect("console starts");
    let api_token = console.create_api_token("test").await.expect("token");
    let api = ConsoleApi::new(&console.url(), &api_token);

    let (cert, key) = (dir.join("broker/server.pem"), dir.join("broker/server.key"));
    console
        .state
        .ca
        .issue_server(
            &["localhost".into(), "127.0.0.1".into()],
            Duration::from_secs(3600),
        )
        .expect("server certificate")
        .save(&cert, &key)
        .expect("saved");
    let mut broker_config = BrokerConfig {
        data_dir: dir.join("broker"),
        tenants_dir: Some(tenants),
        tenants_reload_interval_secs: 1,
        ..BrokerConfig::default()
    };
    broker_config.listeners.mqtts = Listen(Some(mqtts));
    broker_config.tls.cert = Some(cert);
    broker_config.tls.key = Some(key);
    broker_config.tls.client_ca = Some(dir.join("console/tenant-ca.pem"));
    let (_, broker) = Server::bind(broker_config.clone())
        .await
        .expect("broker starts");
    let (stop_agents, _) = watch::channel(false);
    Setup {
        _dir: tmp,
        dir,
        console,
        api,
        broker: Some(broker),
        broker_config,
        mqtts,
        stop_agents,
    }
}

impl Setup {
    /// Enrolls `id` into `<dir>/agents/<id>` (replacing an earlier enrollment there).
    async fn enroll(&self, id: &str) -> AgentConfig {
        let (s, t) = self
            .api
            .call("POST", "/api/v1/enrollment-tokens", Some(json!({})))
            .await;
        assert_eq!(s, 201, "{t}");
        let state = self.dir.join("agents").join(id);
        let mut opts = EnrollOptions::new(
            self.console.url(),
            t["token"].as_str().expect("token"),
            &state,
            state.join("agent.toml"),
        );
        opts.agent_id = Some(id.into());
        opts.extra_config = FAST.into();
        opts.force = true;
        enroll(&opts).await.expect("enrolled").config
    }

    fn run(&self, config: AgentConfig) -> tokio::task::JoinHandle<()> {
        let check: Arc<dyn WakeUpCheck> = Arc::new(
            beckon_agent::wakeup::verifier(
                &config.tenant,
                &config.agent_id,
                &config.wakeup.console_keys,
            )
            .expect("verifier"),
        );
        let connector = LadderConnector::new(&config).expect("connector");
        let shutdown = self.stop_agents.subscribe();
        tokio::spawn(async move {
            let _ = run_agent(config, connector, check, shutdown).await;
        })
    }

    async fn presence(&self, id: &str) -> String {
        let (_, a) = self
            .api
            .call("GET", &format!("/api/v1/agents/{id}"), None)
            .await;
        a["presence"].as_str().unwrap_or_default().to_owned()
    }

    async fn wait_presence(&self, id: &str, want: &str) {
        let start = Instant::now();
        loop {
            let now = self.presence(id).await;
            if now == want {
                return;
            }
            assert!(start.elapsed() < LIMIT, "{id} is {now:?}, not {want:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A wake-up call to `id` that reaches `finished`.
    async fn woken(&self, id: &str) {
        let (s, call) = self
            .api
            .call(
                "POST",
                "/api/v1/calls",
                Some(json!({"target": {"agents": [id]}})),
            )
            .await;
        assert_eq!(s, 201, "{call}");
        let path = format!("/api/v1/calls/{}", call["id"].as_str().expect("id"));
        let start = Instant::now();
        loop {
            let (_, c) = self.api.call("GET", &path, None).await;
            let state = c["deliveries"][0]["state"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if state == "finished" {
                return;
            }
            assert!(start.elapsed() < LIMIT, "call to {id} stuck in {state}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.stop_agents.send(true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(b) = self.broker.take() {
            let _ = b.shutdown().await;
        }
        self.console.shutdown().await;
    }
}

/// CONNECT with the certificate and key files, in `version`; the CONNACK's code (v5 reason
/// code or v3.1.1 return code).
async fn connack_code(
    mqtts: SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
    id: &str,
    version: ProtocolVersion,
) -> u8 {
    let tls = beckon_net::TlsClient::new(&beckon_net::TlsSettings {
        trust: beckon_net::TrustAnchors::CaFile(ca.to_owned()),
        identity: Some(beckon_net::ClientIdentity::Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
        }),
        ..Default::default()
    })
    .expect("tls client");
    let tcp = tokio::net::TcpStream::connect(mqtts).await.expect("tcp");
    let (mut s, _) = tls
        .connect(tcp, "localhost", &["mqtt"], LIMIT)
        .await
        .expect("handshake");
    let mut out = BytesMut::new();
    encode(
        &Packet::Connect(Box::new(Connect::new(version, id, 60))),
        version,
        &mut out,
    )
    .expect("encode");
    s.write_all(&out).await.expect("write");
    let mut buf = BytesMut::new();
    tokio::time::timeout(LIMIT, async {
        loop {
            if version == ProtocolVersion::V311 && buf.len() >= 4 {
                assert_eq!(buf[0], 0x20, "CONNACK");
                return buf[3];
            }
            if version == ProtocolVersion::V5
                && let Some(p) = decode(&mut buf, version, 1 << 20).expect("valid packet")
            {
                let Packet::ConnAck(a) = p else {
                    panic!("not a CONNACK: {p:?}")
                };
                return a.code.0;
            }
            let mut chunk = [0u8; 1024];
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed without CONNACK");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("CONNACK in time")
}

fn files(dir: &Path, id: &str) -> (PathBuf, PathBuf, PathBuf) {
    let d = dir.join("agents").join(id);
    (d.join("ca.pem"), d.join("agent.pem"), d.join("agent.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_agent_is_cut_off_and_refused_while_others_carry_on() {
    let s = setup(Duration::from_secs(3600)).await;
    let pc1 = s.enroll("pc-1").await;
    let pc2 = s.enroll("pc-2").await;
    let pc1_config = pc1.clone();
    let a1 = s.run(pc1);
    let _a2 = s.run(pc2);
    s.wait_presence("pc-1", "online").await;
    s.wait_presence("pc-2", "online").await;
    // Keep the removed agent's credentials to try them afterwards.
    let (ca, cert, key) = files(&s.dir, "pc-1");
    let kept = s.dir.join("kept");
    std::fs::create_dir_all(&kept).expect("dir");
    std::fs::copy(&cert, kept.join("agent.pem")).expect("copy");
    std::fs::copy(&key, kept.join("agent.key")).expect("copy");
    let (old_cert, old_key) = (kept.join("agent.pem"), kept.join("agent.key"));
    // The CONNACK code for the removed pc-1's old certificate.
    let old_pc1_connack =
        |version| connack_code(s.mqtts, &ca, &old_cert, &old_key, "pc-1", version);

    let (status, _) = s.api.call("DELETE", "/api/v1/agents/pc-1", None).await;
    assert_eq!(status, 204);
    // The broker reloads the tenant file, closes pc-1's connection and says so.
    s.wait_presence("pc-1", "offline").await;
    // Its reconnects are refused: v5 Not authorized, v3.1.1 return code 5.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(s.presence("pc-1").await, "offline", "pc-1 must stay out");
    }
    assert_eq!(
        old_pc1_connack(ProtocolVersion::V5).await,
        ReasonCode::NOT_AUTHORIZED.0
    );
    assert_eq!(old_pc1_connack(ProtocolVersion::V311).await, 5);
    // The removed agent cannot renew its way back in; its files stay as they are.
    let before = std::fs::read(&cert).expect("cert");
    match beckon_agent::renew::renew(&pc1_config).await {
        Err(beckon_agent::renew::RenewError::Refused {
            status: 401,
            message,
        }) => {
            assert!(message.contains("pc-1"), "{message}");
        }
        other => panic!("renewal of a removed agent: {other:?}"),
    }
    assert_eq!(std::fs::read(&cert).expect("cert"), before);
    let state = AgentState::read(&s.dir.join("agents/pc-1"))
        .expect("state")
        .expect("written");
    assert!(
        !state.connected,
        "the agent knows it is not connected: {state:?}"
    );
    // The other agent was not touched: still online, still woken.
    assert_eq!(s.presence("pc-2").await, "online");
    s.woken("pc-2").await;
    let (ca2, cert2, key2) = files(&s.dir, "pc-2");
    // (pc-2 is connected, so this takes its session over; it reconnects by itself.)
    assert_eq!(
        connack_code(s.mqtts, &ca2, &cert2, &key2, "pc-2", ProtocolVersion::V5).await,
        0
    );

    // Enrolled again, pc-1 is a new identity: its new certificate connects, the old one
    // stays refused. (The old runtime goes first: it would pick up the new files.)
    a1.abort();
    let again = s.enroll("pc-1").await;
    let _a1 = s.run(again);
    s.wait_presence("pc-1", "online").await;
    s.woken("pc-1").await;
    assert_eq!(
        old_pc1_connack(ProtocolVersion::V5).await,
        ReasonCode::NOT_AUTHORIZED.0
    );
    s.stop().await;
}

fn serial(path: &Path) -> String {
    let certs = beckon_pki::load_certificates(path).expect("certificate");
    beckon_identity::certificate_serial(certs[0].as_ref()).expect("serial")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renews_its_certificate_and_connects_with_the_new_one() {
    // Renewal is due when a third of the lifetime is left: about 10 s after issue here.
    let mut s = setup(Duration::from_secs(24)).await;
    let config = s.enroll("pc-r").await;
    let (_, cert, _) = files(&s.dir, "pc-r");
    let first = serial(&cert);
    let first_end = beckon_agent::renew::certificate_validity(&cert)
        .expect("validity")
        .not_after;
    let _agent = s.run(config);
    s.wait_presence("pc-r", "online").await;
    let start = Instant::now();
    while serial(&cert) == first {
        assert!(start.elapsed() < Duration::from_secs(30), "no renewal");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let renewed = beckon_agent::renew::certificate_validity(&cert).expect("validity");
    assert!(
        renewed.not_after > first_end,
        "{renewed:?} after {first_end}"
    );
    // The key was replaced too (0600), and the pair loads.
    let (ca, cert, key) = files(&s.dir, "pc-r");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).expect("key").permissions().mode() & 0o777,
        0o600
    );

    // Stop the broker until the first certificate has expired, then start it again: the
    // agent can only come back with the renewed certificate.
    if let Some(b) = s.broker.take() {
        b.shutdown().await.expect("broker stops");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let wait = (first_end - now + 2).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let (_, broker) = Server::bind(s.broker_config.clone())
        .await
        .expect("broker again");
    s.broker = Some(broker);
    let start = Instant::now();
    loop {
        let state = AgentState::read(&s.dir.join("agents/pc-r")).expect("state");
        if state.is_some_and(|st| st.connected) {
            break;
        }
        assert!(start.elapsed() < LIMIT, "the agent did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What it holds now is accepted by the broker (the session is taken over, harmlessly).
    assert_eq!(
        connack_code(s.mqtts, &ca, &cert, &key, "pc-r", ProtocolVersion::V5).await,
        0
    );
    s.stop().await;
}
