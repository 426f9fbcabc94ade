//! What the cluster tests share: nats-server processes, `beckon broker` nodes, a tenant with
//! a token key and an MQTT 5 test client. Every wait is bounded.

// Each test program uses its own part of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use beckon_identity::{KeyId, Role, SigningKey, TenantId, TokenSigner};
use beckon_mqtt::{
    Ack, Connect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode, decode, encode,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{Process, beckon_command, find_program, free_port, output_within};
use beckon_testkit::TestClient;
/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The nats-server binary: on the PATH, or where Debian puts it.
pub fn nats_server_binary() -> PathBuf {
    find_program(
        "nats-server",
        &["/usr/sbin/nats-server", "/usr/bin/nats-server"],
        "nats-server",
    )
}

pub fn wait_for_port(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A nats-server on a free loopback port.
pub fn start_nats() -> (Process, String) {
    let port = free_port();
    (start_nats_on(port), format!("nats://127.0.0.1:{port}"))
}

/// A nats-server on a free loopback port with its monitoring port (`/varz`) on another.
pub fn start_nats_monitored() -> (Process, String, u16) {
    let (port, monitor) = (free_port(), free_port());
    let mut command = Command::new(nats_server_binary());
    command
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .args(["-m", &monitor.to_string()])
        .stderr(Stdio::null());
    let nats = Process::spawn("nats-server", command);
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), "nats-server");
    wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], monitor)),
        "nats-server monitoring",
    );
    (nats, format!("nats://127.0.0.1:{port}"), monitor)
}

/// The number of subscriptions nats-server holds (its `/varz` on `monitor`).
pub fn nats_subscriptions(monitor: u16) -> u64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", monitor)).expect("nats monitoring");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream
        .write_all(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("request /varz");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read /varz");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let varz: serde_json::Value = serde_json::from_str(body).expect("/varz is JSON");
    varz["subscriptions"].as_u64().expect("/varz subscriptions")
}

/// nats-server's subscriptions once they stopped changing for half a second (a node
/// subscribes in the background after its client's SUBACK).
pub fn settled_nats_subscriptions(monitor: u16) -> u64 {
    let deadline = Instant::now() + WAIT;
    let mut last = nats_subscriptions(monitor);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = nats_subscriptions(monitor);
        if now == last {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "NATS subscriptions still changing: {now}"
        );
        last = now;
    }
}

/// A nats-server on `port` of loopback, once it listens.
pub fn start_nats_on(port: u16) -> Process {
    let mut command = Command::new(nats_server_binary());
    command
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stderr(Stdio::null());
    let nats = Process::spawn("nats-server", command);
    wait_for_port(SocketAddr::from(([127, 0, 0, 1], port)), "nats-server");
    nats
}

/// The tenant `acme` with a token key: agents and the test's server authenticate with tokens.
pub struct Tenant {
    pub dir: tempfile::TempDir,
    signer: TokenSigner,
}

impl Tenant {
    pub fn create() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = SigningKey::generate(KeyId::new("k1").expect("kid")).expect("key");
        let toml = format!(
            "name = \"acme\"\n[[token_key]]\nkid = \"k1\"\npublic_key = \"{}\"\n",
            key.public_key().to_base64()
        );
        std::fs::write(dir.path().join("acme.toml"), toml).expect("tenant file");
        Self {
            dir,
            signer: TokenSigner::new(TenantId::new("acme").expect("tenant"), key),
        }
    }

    pub fn token(&self, role: Role, id: &str) -> String {
        self.signer
            .issue(role, id, unix_now(), 3600)
            .expect("token")
    }
}

/// One `beckon broker` process, a cluster node with a plain MQTT listener on loopback.
pub struct Node {
    pub name: String,
    pub addr: SocketAddr,
    process: Option<Process>,
    _dir: tempfile::TempDir,
}

/// A node's `beckon broker` command, its configuration written in a fresh folder: `cluster`
/// holds extra lines of its `[cluster]` section.
fn node_command(
    name: &str,
    nats: &str,
    tenants: &Path,
    cluster: &str,
) -> (Command, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\ntenants_dir = {tenants:?}\n\n[listeners]\nmqtts = \"off\"\nmqtt = \"{addr}\"\n\n[cluster]\nnats = [\"{nats}\"]\nnode = \"{name}\"\nheartbeat_ms = 200\nnode_timeout_ms = 1500\n{cluster}\n",
            data = dir.path().join("data"),
        ),
    )
    .expect("config");
    let mut command = beckon_command(["broker", "--config"]);
    command.arg(&config).env("RUST_LOG", "warn");
    (command, addr, dir)
}

impl Node {
    pub fn start(name: &str, nats: &str, tenants: &Path) -> Self {
        Self::start_with(name, nats, tenants, "")
    }

    /// A node with extra lines in its `[cluster]` section.
    pub fn start_with(name: &str, nats: &str, tenants: &Path, cluster: &str) -> Self {
        let (mut command, addr, dir) = node_command(name, nats, tenants, cluster);
        command.stderr(Stdio::null());
        let process = Process::spawn(&format!("node {name}"), command);
        process.wait_stdout("beckon broker: ready", WAIT);
        let seen = process.stdout();
        assert!(
            seen.iter()
                .any(|l| l.contains(&format!("cluster node {name}"))),
            "node {name} did not say it joined the cluster: {seen:?}"
        );
        Self {
            name: name.to_owned(),
            addr,
            process: Some(process),
            _dir: dir,
        }
    }

    /// Runs a node that must refuse to start; returns what it printed (stdout and stderr).
    pub fn refused(name: &str, nats: &str, tenants: &Path, cluster: &str) -> String {
        let (command, _, _dir) = node_command(name, nats, tenants, cluster);
        let out = output_within(command, WAIT);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "node {name} started: {text}");
        assert!(
            !text.contains("beckon broker: ready"),
            "node {name} said ready: {text}"
        );
        eprintln!("node {name} refused to start:\n{text}");
        text
    }

    /// SIGKILL: the node dies without saying goodbye to anyone.
    pub fn kill(&mut self) {
        drop(self.process.take());
    }
}

/// What ended a read.
#[derive(Debug)]
pub enum ReadEnd {
    TimedOut,
    Closed,
}

/// An MQTT 5 client on a plain TCP connection, through Beckon's codec.
pub struct Client {
    stream: TcpStream,
    buf: BytesMut,
    next_id: u16,
    /// Packets that arrived while waiting for an acknowledgement.
    held: std::collections::VecDeque<Packet>,
}

impl TestClient for Client {
    async fn send_packet(&mut self, packet: Packet) {
        self.send(&packet).await.expect("send to the broker");
    }

    async fn recv_packet(&mut self) -> Packet {
        match self.read(WAIT).await {
            Ok(packet) => packet,
            Err(e) => panic!("no packet from the broker: {e:?}"),
        }
    }

    fn hold(&mut self, packet: Packet) {
        self.held.push_back(packet);
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr, token: &str) -> Result<Self, String> {
        let stream = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect to {addr} timed out"))?
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let mut client = Self {
            stream,
            buf: BytesMut::new(),
            next_id: 1,
            held: Default::default(),
        };
        client
            .send(&Packet::Connect(Box::new(Connect {
                username: Some("beckon".into()),
                password: Some(Bytes::from(token.to_owned())),
                ..Connect::new(ProtocolVersion::V5, "", 30)
            })))
            .await
            .map_err(|e| format!("send CONNECT: {e}"))?;
        match client.read(Duration::from_secs(5)).await {
            Ok(Packet::ConnAck(a)) if a.code == ReasonCode::SUCCESS => Ok(client),
            other => Err(format!("CONNECT to {addr} not accepted: {other:?}")),
        }
    }

    pub async fn send(&mut self, packet: &Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        encode(packet, ProtocolVersion::V5, &mut out).expect("encode");
        self.stream.write_all(&out).await
    }

    /// The next packet from the network (not the held ones).
    pub async fn read(&mut self, limit: Duration) -> Result<Packet, ReadEnd> {
        tokio::time::timeout(limit, async {
            loop {
                match decode(&mut self.buf, ProtocolVersion::V5, 1 << 20) {
                    Ok(Some(p)) => return Ok(p),
                    Ok(None) => {}
                    Err(_) => return Err(ReadEnd::Closed),
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return Err(ReadEnd::Closed),
                    Ok(_) => {}
                }
            }
        })
        .await
        .unwrap_or(Err(ReadEnd::TimedOut))
    }

    /// The next packet, held ones first.
    pub async fn next(&mut self, limit: Duration) -> Result<Packet, ReadEnd> {
        match self.held.pop_front() {
            Some(p) => Ok(p),
            None => self.read(limit).await,
        }
    }

    pub fn packet_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    pub async fn subscribe(&mut self, filter: &str) {
        let packet_id = self.packet_id();
        self.subscribe_qos1(packet_id, filter).await;
    }

    /// QoS 1 PUBLISH; returns once the broker acknowledged it.
    pub async fn publish(&mut self, topic: &str, payload: &str, expiry: Option<u32>) {
        let packet_id = self.packet_id();
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: Some(packet_id),
            payload: Bytes::from(payload.to_owned()),
            properties: Properties::from(beckon_mqtt::PropertySet {
                message_expiry_interval: expiry,
                ..Default::default()
            }),
        }))
        .await
        .expect("send PUBLISH");
        loop {
            match self.read(WAIT).await {
                Ok(Packet::PubAck(a)) if a.packet_id == packet_id => {
                    assert!(!a.code.is_error(), "{topic}: {a:?}");
                    return;
                }
                Ok(other) => self.held.push_back(other),
                Err(e) => panic!("no PUBACK for {topic}: {e:?}"),
            }
        }
    }

    /// The next application message (PUBACKed), answering nothing else.
    pub async fn message(&mut self, limit: Duration) -> Result<Publish, ReadEnd> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await? {
                Packet::Publish(p) => {
                    if let Some(id) = p.packet_id {
                        let _ = self.send(&Packet::PubAck(Ack::new(id))).await;
                    }
                    return Ok(p);
                }
                Packet::PingResp | Packet::PubAck(_) => {}
                other => self.held.push_back(other),
            }
        }
    }
}
