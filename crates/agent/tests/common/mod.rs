//! Test support: an MQTT peer speaking through the codec (the broker side of an in-memory
//! stream, or a server client of a real broker), a connector that hands out in-memory
//! streams, and agent configs. Mosquitto, tinyproxy and free ports come from beckon-testkit.
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beckon_agent::{AgentConfig, ConnectError, Connection, Connector};
use beckon_identity::wakeup::{WakeUp, WakeUpSigner};
use beckon_identity::{KeyId, SigningKey, TenantId};
use beckon_mqtt::{
    Ack, ConnAck, Connect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode, SubAck,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

// Not every test program uses every one.
#[allow(unused_imports)]
pub use beckon_testkit::{Mosquitto, TestClient, Tinyproxy, free_port};

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

/// One end of an MQTT conversation, packets in and out through the codec.
pub struct Peer<S> {
    stream: S,
    buf: BytesMut,
    /// Ack publishes that arrived while waiting for something else.
    held: std::collections::VecDeque<Publish>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Peer<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
            held: std::collections::VecDeque::new(),
        }
    }

    pub async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        beckon_mqtt::encode(&packet, ProtocolVersion::V5, &mut out).expect("encode");
        self.stream.write_all(&out).await.expect("write to agent");
        self.stream.flush().await.expect("flush");
    }

    /// The next packet, `None` on end of stream; panics after `WAIT`.
    pub async fn try_recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(p) = beckon_mqtt::decode(&mut self.buf, ProtocolVersion::V5, 1 << 20)
                    .expect("decode")
                {
                    return Some(p);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("no packet within the test's wait")
    }

    /// The next packet within `limit`, `None` on timeout or end of stream.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<Packet> {
        tokio::time::timeout(limit, self.try_recv())
            .await
            .ok()
            .flatten()
    }

    pub async fn recv(&mut self) -> Packet {
        self.try_recv()
            .await
            .expect("stream closed while a packet was expected")
    }

    /// The next packet that is not a PINGREQ (answered).
    pub async fn recv_answering_pings(&mut self) -> Packet {
        loop {
            match self.recv().await {
                Packet::PingReq => self.send(Packet::PingResp).await,
                other => return other,
            }
        }
    }

    /// Broker side: reads CONNECT, answers CONNACK success, reads SUBSCRIBE, answers SUBACK.
    pub async fn accept_agent(&mut self) -> Connect {
        let Packet::Connect(connect) = self.recv().await else {
            panic!("agent did not start with CONNECT");
        };
        self.send(Packet::ConnAck(ConnAck::default())).await;
        let Packet::Subscribe(sub) = self.recv().await else {
            panic!("agent did not SUBSCRIBE after CONNACK");
        };
        self.send(Packet::SubAck(SubAck {
            packet_id: sub.packet_id,
            codes: vec![ReasonCode::GRANTED_QOS_1],
            properties: Properties::default(),
        }))
        .await;
        *connect
    }

    /// Broker side: a QoS 1 wake-up; waits for its PUBACK.
    pub async fn send_wakeup(&mut self, packet_id: u16, agent_id: &str, payload: &[u8]) {
        self.send(publish(
            &format!("agents/{agent_id}/wake"),
            packet_id,
            payload,
        ))
        .await;
        loop {
            match self.recv_answering_pings().await {
                Packet::PubAck(ack) if ack.packet_id == packet_id => return,
                Packet::Publish(p) => self.held.push_back(p),
                other => panic!("expected PUBACK {packet_id}, got {other:?}"),
            }
        }
    }

    /// The next packet, held publishes first.
    pub async fn held_or_recv(&mut self) -> Packet {
        match self.held.pop_front() {
            Some(p) => Packet::Publish(p),
            None => self.recv().await,
        }
    }

    /// Broker side: the next ack publish (PUBACKed), as JSON.
    pub async fn next_ack(&mut self) -> (serde_json::Value, Publish) {
        let next = match self.held.pop_front() {
            Some(p) => Packet::Publish(p),
            None => self.recv_answering_pings().await,
        };
        match next {
            Packet::Publish(p) => {
                if let Some(id) = p.packet_id {
                    self.send(Packet::PubAck(Ack::new(id))).await;
                }
                let json = serde_json::from_slice(&p.payload).expect("ack is JSON");
                (json, p)
            }
            other => panic!("expected an ack PUBLISH, got {other:?}"),
        }
    }

    pub fn into_inner(self) -> S {
        self.stream
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TestClient for Peer<S> {
    async fn send_packet(&mut self, packet: Packet) {
        self.send(packet).await;
    }

    async fn recv_packet(&mut self) -> Packet {
        self.recv().await
    }
}

pub fn publish(topic: &str, packet_id: u16, payload: &[u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: Some(packet_id),
        payload: Bytes::copy_from_slice(payload),
        properties: Properties::default(),
    })
}

/// The console's signing key for these tests.
pub static CONSOLE: std::sync::LazyLock<WakeUpSigner> = std::sync::LazyLock::new(|| {
    WakeUpSigner::new(SigningKey::generate(KeyId::new("console-test").expect("kid")).expect("key"))
});

/// A wake-up for agent `a1` of `acme`, valid for ten minutes.
pub fn wakeup(reason: &str, spread: u32) -> WakeUp {
    let tenant = TenantId::new("acme").expect("tenant");
    WakeUp::new(
        &tenant,
        "a1",
        reason,
        beckon_agent::timefmt::unix_now_ms(),
        600,
        spread,
    )
    .expect("wake-up")
    .with_action("checkin")
}

/// Signs a wake-up with the test console key.
pub fn sign(wakeup: &WakeUp) -> Vec<u8> {
    CONSOLE.sign(wakeup).expect("sign")
}

/// A signed wake-up: its id and its payload.
pub fn signed_wakeup(reason: &str, spread: u32) -> (String, Vec<u8>) {
    let w = wakeup(reason, spread);
    (w.id.clone(), sign(&w))
}

/// The verifier an agent configured by [`test_config`] uses.
pub fn test_check() -> Arc<dyn beckon_agent::WakeUpCheck> {
    let keys = std::collections::BTreeMap::from([(
        "console-test".to_owned(),
        CONSOLE.key().public_key().to_base64(),
    )]);
    Arc::new(beckon_agent::wakeup::verifier("acme", "a1", &keys).expect("verifier"))
}

/// What the in-memory connector was asked to do.
#[derive(Default)]
pub struct ConnectorLog {
    pub connects: usize,
    pub redirects: Vec<String>,
    pub preferred: Vec<String>,
}

/// Hands the agent one end of a fresh in-memory stream per connect; the test gets the other.
pub struct ChannelConnector {
    pub to_test: mpsc::UnboundedSender<DuplexStream>,
    pub log: Arc<Mutex<ConnectorLog>>,
    /// Report the path as one through 443 or a proxy.
    pub fallback: bool,
}

pub fn channel_connector() -> (
    ChannelConnector,
    mpsc::UnboundedReceiver<DuplexStream>,
    Arc<Mutex<ConnectorLog>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let log = Arc::new(Mutex::new(ConnectorLog::default()));
    (
        ChannelConnector {
            to_test: tx,
            log: Arc::clone(&log),
            fallback: false,
        },
        rx,
        log,
    )
}

impl Connector for ChannelConnector {
    async fn connect(&mut self) -> Result<Connection, ConnectError> {
        let (agent_end, broker_end) = tokio::io::duplex(64 * 1024);
        self.log.lock().expect("log").connects += 1;
        self.to_test
            .send(broker_end)
            .map_err(|_| ConnectError("test broker gone".into()))?;
        Ok(Connection {
            stream: Box::new(agent_end),
            path: "memory".into(),
            fallback: self.fallback,
            via_proxy: false,
        })
    }

    fn prefer(&mut self, path: &str) {
        self.log.lock().expect("log").preferred.push(path.into());
    }

    fn redirect(&mut self, server_reference: &str) {
        self.log
            .lock()
            .expect("log")
            .redirects
            .push(server_reference.into());
    }
}

/// The next connection the agent opens, as the broker's peer.
pub async fn next_connection(rx: &mut mpsc::UnboundedReceiver<DuplexStream>) -> Peer<DuplexStream> {
    let stream = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("agent did not connect in time")
        .expect("connector dropped");
    Peer::new(stream)
}

/// An agent config for tests: fast backoff, no start delay, the test console's key.
pub fn test_config(state_dir: &Path, extra: &str) -> AgentConfig {
    let text = format!(
        r#"
agent_id = "a1"
tenant = "acme"
state_dir = "{}"

[broker]
host = "127.0.0.1"
keepalive_direct = "60s"
ping_timeout = "1s"
connect_timeout = "5s"

[reconnect]
backoff_base = "20ms"
backoff_cap = "200ms"
start_delay_max = "0s"
busy_wait_min = "100ms"

[wakeup.console_keys]
console-test = "{}"

{extra}
"#,
        state_dir.display(),
        CONSOLE.key().public_key().to_base64()
    );
    AgentConfig::parse(&text, Path::new("test.toml")).expect("test config")
}

/// `[actions.command]` running `script` with `/bin/sh -c` in `dir`. (The agent never uses a
/// shell itself; the test's program happens to be one.)
pub fn command_action(dir: &Path, script: &str, timeout: &str) -> String {
    let argv = serde_json::to_string(&vec!["/bin/sh", "-c", script]).expect("json");
    format!(
        "[actions.command]\nargv = {argv}\ntimeout = \"{timeout}\"\nworking_dir = \"{}\"\n",
        dir.display()
    )
}

/// Tells an agent started with `run_agent` to stop, and fails the test unless its task ends
/// cleanly within `WAIT`.
pub async fn stop_agent(
    stop: &tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), beckon_agent::AgentError>>,
) {
    let _ = stop.send(true);
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the agent did not stop in time")
        .expect("the agent task panicked")
        .expect("the agent ended with an error");
}

/// The agent running `run_agent` on a task of its own, with the test's wake-up key.
pub struct RunningAgent {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), beckon_agent::AgentError>>,
}

impl RunningAgent {
    pub fn start(config: AgentConfig, connector: impl Connector + 'static) -> Self {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(beckon_agent::run_agent(
            config,
            connector,
            test_check(),
            stop_rx,
        ));
        Self { stop, task }
    }

    /// Stops the agent; fails the test unless it ends cleanly within `WAIT`.
    pub async fn stop(self) {
        stop_agent(&self.stop, self.task).await;
    }
}

/// Whether the agent with state folder `dir` says it is connected (by `path`, if given).
pub fn connected(dir: &Path, path: Option<&str>) -> bool {
    beckon_agent::state::AgentState::read(dir)
        .ok()
        .flatten()
        .is_some_and(|s| s.connected && path.is_none_or(|p| s.path.as_deref() == Some(p)))
}

/// The test's console: a server client over plain TCP to the broker at `addr`, connected as
/// `name` and subscribed to `a1`'s acks.
pub async fn ack_reader(addr: impl tokio::net::ToSocketAddrs, name: &str) -> Peer<TcpStream> {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect to the broker");
    let mut peer = Peer::new(stream);
    peer.connect_as(name).await;
    peer.subscribe_qos1(1, "agents/a1/ack").await;
    peer
}

/// Polls `cond` every 20 ms until it holds; panics after `WAIT`.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes the wake-up until the agent acknowledges receiving it (the agent's subscription
/// may not be in place the very first moment), then returns every ack up to `finished`.
/// `server` is a server client over any stream (plain TCP, or TLS to a broker with tenants).
pub async fn wake_until_acked<S: AsyncRead + AsyncWrite + Unpin>(
    server: &mut Peer<S>,
    reason: &str,
    packet_id: u16,
) -> Vec<serde_json::Value> {
    let (id, payload) = signed_wakeup(reason, 0);
    let id = id.as_str();
    let mut acks: Vec<serde_json::Value> = Vec::new();
    'publish: for _ in 0..5 {
        server
            .send(publish("agents/a1/wake", packet_id, &payload))
            .await;
        loop {
            match server.recv_within(Duration::from_secs(2)).await {
                None => continue 'publish,
                Some(Packet::PubAck(_)) => {}
                Some(Packet::Publish(p)) => {
                    if let Some(pid) = p.packet_id {
                        server.send(Packet::PubAck(Ack::new(pid))).await;
                    }
                    let ack: serde_json::Value = serde_json::from_slice(&p.payload).expect("json");
                    let done = ack["wakeup_id"] == id && ack["stage"] == "finished";
                    acks.push(ack);
                    if done {
                        return acks;
                    }
                }
                Some(other) => panic!("unexpected {other:?}"),
            }
        }
    }
    panic!("the agent never acknowledged wake-up {id}");
}
