//! The connection ladder against Beckon's real broker with tenants: an agent with a tenant
//! client certificate (O=tenant, OU=agent, CN=id) finds its path (8883, the shared fallback
//! port with ALPN mqtt, through tinyproxy, or direct when the proxy is down or asks for
//! credentials), a wake-up published by a server identity reaches it, and
//! `beckon agent status` names the path. Every wait is bounded.
//!
//! Not produced here: "fallback port without ALPN mqtt, WebSocket only". Beckon's broker
//! always accepts ALPN mqtt on its shared port, so the WebSocket rung is never reached against
//! it; that rung is tested against a scripted server in `beckon-net`'s ladder tests.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use beckon_agent::state::AgentState;
use beckon_agent::{Connector, LadderConnector};
use beckon_broker::{BrokerConfig, Listen};
use beckon_identity::Role;
use beckon_mqtt::{Connect, Packet, ProtocolVersion};
use beckon_testkit::{RunningBroker, Squid, TestTenant};
use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A broker with tenant `acme` on 8883-like and fallback listeners, and what the agent needs.
struct TenantBroker {
    broker: RunningBroker,
    acme: TestTenant,
    agent_cert: PathBuf,
    agent_key: PathBuf,
}

impl TenantBroker {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let tenants = dir.path().join("tenants");
        std::fs::create_dir_all(&tenants).expect("tenants folder");
        let acme = TestTenant::create(&tenants, "acme");

        // The agent's certificate: O=acme OU=agent CN=a1.
        let issued = acme.certificate("agent", "a1");
        let agent_cert = dir.path().join("agent.pem");
        let agent_key = dir.path().join("agent.key");
        std::fs::write(&agent_cert, &issued.cert_pem).expect("write cert");
        std::fs::write(&agent_key, &issued.key_pem).expect("write key");

        let mut config = BrokerConfig {
            data_dir: dir.path().join("data"),
            tenants_dir: Some(tenants),
            ..BrokerConfig::default()
        };
        config.listeners.mqtts = Listen(Some("127.0.0.1:0".parse().expect("addr")));
        config.listeners.fallback = Listen(Some("127.0.0.1:0".parse().expect("addr")));
        config.listeners.mqtt = Listen(None);
        config.limits.connect_timeout_secs = 5;
        Self {
            broker: RunningBroker::start(config, dir).await,
            acme,
            agent_cert,
            agent_key,
        }
    }

    fn mqtts(&self) -> SocketAddr {
        self.broker.mqtts()
    }

    fn fallback(&self) -> SocketAddr {
        self.broker.fallback()
    }

    /// The agent's `[broker]` pointing at this broker's ports, with its certificate.
    fn agent_config(
        &self,
        state_dir: &Path,
        primary: u16,
        proxy: Option<String>,
    ) -> beckon_agent::AgentConfig {
        let mut config = test_config(
            state_dir,
            &command_action(state_dir, r#"echo "$BECKON_WAKEUP_REASON" >> runs"#, "10s"),
        );
        config.broker.port = primary;
        config.broker.fallback_port = self.fallback().port();
        config.broker.server_name = Some("localhost".into());
        config.broker.ca_file = Some(self.broker.generated_ca());
        config.broker.client_cert = Some(self.agent_cert.clone());
        config.broker.client_key = Some(self.agent_key.clone());
        config.broker.proxy = proxy.map(|p| p.parse().expect("proxy address"));
        config
    }

    /// A server identity (token, role server) over TLS on 8883, subscribed to the acks.
    async fn server_client(&self) -> Peer<beckon_agent::connector::BoxedStream> {
        let state = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(state.path(), "");
        config.broker.port = self.mqtts().port();
        config.broker.fallback_port = free_port();
        config.broker.server_name = Some("localhost".into());
        config.broker.ca_file = Some(self.broker.generated_ca());
        let mut connector = LadderConnector::new(&config).expect("ladder");
        let connection = tokio::time::timeout(WAIT, connector.connect())
            .await
            .expect("server connects in time")
            .expect("server connects");
        let mut peer = Peer::new(connection.stream);
        let token = self.acme.token(Role::Server, "console");
        peer.send(Packet::Connect(Box::new(Connect {
            username: Some("beckon".into()),
            password: Some(Bytes::from(token.into_bytes())),
            ..Connect::new(ProtocolVersion::V5, "console", 60)
        })))
        .await;
        match peer.recv().await {
            Packet::ConnAck(c) if !c.code.is_error() => {}
            other => panic!("server identity not accepted: {other:?}"),
        }
        peer.subscribe_qos1(1, "agents/a1/ack").await;
        peer
    }

    async fn stop(&mut self) {
        self.broker.stop().await;
    }
}

/// An agent of `acme` on a [`TenantBroker`], with its state folder.
struct LadderAgent {
    state: tempfile::TempDir,
    running: RunningAgent,
}

impl LadderAgent {
    /// Starts the agent with `primary` as its 8883 port and `proxy`, waits until it is
    /// connected via `path`, has the server wake it there (its command runs, the server sees
    /// `finished` with status ok), and checks that `beckon agent status` names the path.
    async fn woken_via(
        broker: &TenantBroker,
        primary: u16,
        proxy: Option<String>,
        path: &str,
        reason: &str,
    ) -> Self {
        let state = tempfile::tempdir().expect("tempdir");
        let config = broker.agent_config(state.path(), primary, proxy);
        let connector = LadderConnector::new(&config).expect("ladder");
        let agent = Self {
            state,
            running: RunningAgent::start(config, connector),
        };
        agent.connected_via(path).await;
        agent.wake_and_check_it_ran(broker, reason).await;
        let text = beckon_agent::status::status_text(agent.dir()).expect("status");
        assert!(
            text.contains(&format!("connected via {path} since")),
            "{text}"
        );
        agent
    }

    fn dir(&self) -> &Path {
        self.state.path()
    }

    /// Waits until the agent is connected by `path`.
    async fn connected_via(&self, path: &str) {
        let dir = self.dir();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let state = AgentState::read(dir).ok().flatten();
            if state
                .as_ref()
                .is_some_and(|s| s.connected && s.path.as_deref() == Some(path))
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent not connected via {path}; state: {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The server wakes `a1`; the agent's command runs (its reason lands in `runs`), and the
    /// server sees `finished` with status ok.
    async fn wake_and_check_it_ran(&self, broker: &TenantBroker, reason: &str) {
        let mut server = broker.server_client().await;
        let acks = wake_until_acked(&mut server, reason, 1).await;
        let finished = acks.last().expect("acks");
        assert_eq!(finished["stage"], "finished");
        assert_eq!(finished["status"], "ok", "{finished}");
        let runs = std::fs::read_to_string(self.dir().join("runs")).expect("the command ran");
        assert!(runs.lines().any(|l| l == reason), "{runs}");
    }

    async fn stop(self) {
        self.running.stop().await;
    }
}

/// The retained presence event the broker holds for `a1`, as a server sees it.
async fn presence_of_a1(broker: &TenantBroker) -> serde_json::Value {
    let mut server = broker.server_client().await;
    server.subscribe_qos1(2, "agents/a1/presence").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match server.recv_within(left).await {
            Some(Packet::Publish(p)) if p.topic == "agents/a1/presence" => {
                return serde_json::from_slice(&p.payload).expect("presence is JSON");
            }
            Some(_) => {}
            None => panic!("no retained presence event for a1"),
        }
    }
}

#[tokio::test]
async fn with_8883_refused_the_agent_lands_on_443_mqtt_and_is_woken_there() {
    let mut broker = TenantBroker::start().await;
    // Nothing listens on the primary port: the ladder's next rung is ALPN mqtt on the
    // broker's shared fallback port.
    let agent = LadderAgent::woken_via(
        &broker,
        free_port(),
        None,
        "443-mqtt",
        "via the fallback port",
    )
    .await;
    agent.stop().await;
    broker.stop().await;
}

#[tokio::test]
async fn with_8883_open_the_agent_uses_it_and_status_says_so() {
    let mut broker = TenantBroker::start().await;
    let agent =
        LadderAgent::woken_via(&broker, broker.mqtts().port(), None, "8883", "direct").await;
    let presence = presence_of_a1(&broker).await;
    assert_eq!(presence["state"], "connected", "{presence}");
    assert_eq!(presence["via_proxy"], false, "{presence}");
    agent.stop().await;
    broker.stop().await;
}

/// [`LadderAgent::woken_via`] through tinyproxy allowing CONNECT to the port `allowed` only,
/// where the agent must land on `rung`; the proxy runs as long as the test keeps it.
async fn woken_through_tinyproxy(
    broker: &TenantBroker,
    allowed: u16,
    rung: &str,
    reason: &str,
) -> (LadderAgent, Tinyproxy) {
    let proxy = Tinyproxy::start(&[allowed]);
    let url = format!("http://127.0.0.1:{}", proxy.port);
    let path = format!("{rung} via {url}");
    let reason = format!("through the proxy {reason}");
    let primary = broker.mqtts().port();
    let agent = LadderAgent::woken_via(broker, primary, Some(url), &path, &reason).await;
    (agent, proxy)
}

#[tokio::test]
async fn tinyproxy_allowing_the_mqtts_port_carries_8883() {
    let mut broker = TenantBroker::start().await;
    let (agent, _proxy) =
        woken_through_tinyproxy(&broker, broker.mqtts().port(), "8883", "to 8883").await;
    let presence = presence_of_a1(&broker).await;
    assert_eq!(
        presence["via_proxy"], true,
        "the broker's presence says proxied: {presence}"
    );
    agent.stop().await;
    broker.stop().await;
}

#[tokio::test]
async fn tinyproxy_allowing_only_the_fallback_port_carries_443_mqtt() {
    let mut broker = TenantBroker::start().await;
    // Squid's default: CONNECT to 443 (here: the fallback port) only.
    let (agent, _proxy) =
        woken_through_tinyproxy(&broker, broker.fallback().port(), "443-mqtt", "to 443").await;
    agent.stop().await;
    broker.stop().await;
}

#[tokio::test]
async fn a_proxy_that_is_down_means_direct_8883() {
    let mut broker = TenantBroker::start().await;
    let url = format!("http://127.0.0.1:{}", free_port());
    let reason = "proxy down, direct";
    let agent =
        LadderAgent::woken_via(&broker, broker.mqtts().port(), Some(url), "8883", reason).await;
    agent.stop().await;
    broker.stop().await;
}

/// The console's policy forbids going direct (`direct_fallback = false`): with a proxy that
/// refuses every broker port the agent stays away, though 8883 is open to it directly, and
/// says why; through a proxy that lets it out it connects.
#[tokio::test]
async fn with_direct_forbidden_the_agent_goes_only_through_the_proxy() {
    let mut broker = TenantBroker::start().await;
    let closed = Tinyproxy::start(&[free_port()]);
    let state = tempfile::tempdir().expect("tempdir");
    let url = format!("http://127.0.0.1:{}", closed.port);
    let mut config = broker.agent_config(state.path(), broker.mqtts().port(), Some(url));
    config.broker.direct_fallback = false;
    let connector = LadderConnector::new(&config).expect("ladder");
    let running = RunningAgent::start(config.clone(), connector);
    // One pass over the ladder (three refusals by the proxy), then a second one.
    let deadline = tokio::time::Instant::now() + WAIT;
    let error = loop {
        let state = AgentState::read(state.path()).ok().flatten();
        if let Some(s) = &state {
            assert!(!s.connected, "went direct against the policy: {s:?}");
        }
        if let Some(e) = state.and_then(|s| s.last_error) {
            break e.message;
        }
        assert!(tokio::time::Instant::now() < deadline, "no error recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(error.contains("proxy"), "{error}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = AgentState::read(state.path())
        .ok()
        .flatten()
        .expect("state");
    assert!(!s.connected, "went direct against the policy: {s:?}");
    running.stop().await;

    let open = Tinyproxy::start(&[broker.mqtts().port()]);
    let url = format!("http://127.0.0.1:{}", open.port);
    config.broker.proxy = Some(url.parse().expect("proxy address"));
    let connector = LadderConnector::new(&config).expect("ladder");
    let agent = LadderAgent {
        state,
        running: RunningAgent::start(config, connector),
    };
    agent.connected_via(&format!("8883 via {url}")).await;
    agent
        .wake_and_check_it_ran(&broker, "only through the proxy")
        .await;
    agent.stop().await;
    broker.stop().await;
}

/// A proxy that answers every request with 407 (authentication), which Beckon does not do.
async fn proxy_asking_for_credentials() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = tokio::time::timeout(WAIT, stream.read(&mut buf)).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate\r\nContent-Length: 0\r\n\r\n",
                    )
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_proxy_asking_for_credentials_means_direct_8883() {
    let mut broker = TenantBroker::start().await;
    let (proxy, proxy_task) = proxy_asking_for_credentials().await;
    let url = format!("http://{proxy}");
    let reason = "proxy wants credentials, direct";
    let agent =
        LadderAgent::woken_via(&broker, broker.mqtts().port(), Some(url), "8883", reason).await;
    agent.stop().await;
    proxy_task.abort();
    broker.stop().await;
}

/// Debian's squid demanding Basic authentication, allowing CONNECT to 8883: the agent with the
/// right credentials in its proxy address goes through it (its path names the user, never the
/// password).
#[tokio::test]
async fn squid_with_the_agents_credentials_carries_8883() {
    let mut broker = TenantBroker::start().await;
    let squid = Squid::start("agents", "s3cret:pw", &[broker.mqtts().port()]);
    let url = format!("http://agents:s3cret%3Apw@127.0.0.1:{}", squid.port);
    let path = format!("8883 via http://agents@127.0.0.1:{}", squid.port);
    let agent = LadderAgent::woken_via(
        &broker,
        broker.mqtts().port(),
        Some(url),
        &path,
        "through squid",
    )
    .await;
    let status = beckon_agent::status::status_text(agent.dir()).expect("status");
    assert!(!status.contains("s3cret"), "{status}");
    agent.stop().await;
    broker.stop().await;
}

/// `beckon doctor --agent-config` beside the running agent probes as `a1/doctor`: the agent
/// keeps its connection (no takeover, no reconnect) and a wake-up sent while the doctor runs
/// reaches the agent, whose command runs exactly once.
#[tokio::test]
async fn the_doctor_beside_a_running_agent_leaves_it_alone() {
    let mut broker = TenantBroker::start().await;
    let primary = broker.mqtts().port();
    let agent = LadderAgent::woken_via(&broker, primary, None, "8883", "before the doctor").await;
    let before = AgentState::read(agent.dir())
        .expect("state")
        .expect("state");

    let agent_config = broker.agent_config(agent.dir(), primary, None);
    let mut config =
        beckon_doctor::DoctorConfig::from_agent_config(&agent_config).expect("doctor config");
    config.step_timeout = Duration::from_secs(3);
    let doctor = tokio::spawn(async move { beckon_doctor::diagnose(&config).await });
    let mut server = broker.server_client().await;
    let acks = wake_until_acked(&mut server, "while the doctor runs", 7).await;
    assert_eq!(acks.last().expect("acks")["status"], "ok");
    let report = tokio::time::timeout(Duration::from_secs(60), doctor)
        .await
        .expect("the doctor finishes in time")
        .expect("the doctor ran");
    assert!(report.ok, "{}", report.to_human());
    assert_eq!(report.client_id, "a1/doctor");
    assert_eq!(report.path_in_use.as_deref(), Some("8883"));

    // A late redelivery would show up as a second run.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let runs = std::fs::read_to_string(agent.dir().join("runs")).expect("runs");
    let meanwhile = runs
        .lines()
        .filter(|l| *l == "while the doctor runs")
        .count();
    assert_eq!(meanwhile, 1, "{runs}");
    let after = AgentState::read(agent.dir())
        .expect("state")
        .expect("state");
    assert!(after.connected, "{after:?}");
    assert_eq!(after.since, before.since, "the agent did not reconnect");
    assert!(
        after.last_disconnect.is_none(),
        "the agent was not disconnected: {:?}",
        after.last_disconnect
    );
    let presence = presence_of_a1(&broker).await;
    assert_eq!(presence["state"], "connected", "{presence}");
    agent.stop().await;
    broker.stop().await;
}
