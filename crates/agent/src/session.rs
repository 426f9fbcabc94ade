//! The agent's MQTT 5 client session over any byte stream: CONNECT (persistent session, so
//! QoS 1 wake-ups queue at the broker while the agent is away), SUBSCRIBE to its wake topic,
//! PUBACK for wake-ups, QoS 1 acks from the [`Outbox`] in order, and keepalive pings whose
//! missing answer means the connection is dead.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use beckon_mqtt::{
    Ack, DecodeError, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode,
    RetainHandling, Subscribe, Subscription, SubscriptionOptions,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, sleep_until, timeout};

/// Largest packet the agent accepts (wake-ups are a few hundred bytes).
pub const MAX_INCOMING_PACKET: u32 = 64 * 1024;
/// Most acks in flight at once, whatever the broker's receive maximum.
const MAX_INFLIGHT: usize = 16;
/// The packet id of the SUBSCRIBE; the outbox never uses it.
const SUBSCRIBE_PACKET_ID: u16 = u16::MAX;

/// The client options of an agent's connection: MQTT 5, a persistent session (so QoS 1
/// wake-ups queue at the broker while the agent is away), the agent's Receive Maximum and
/// packet size, and whether the stream goes through a proxy. `beckon doctor` connects with
/// the same options, so that what it checks is what the agent sends.
pub fn connect_options(
    client_id: impl Into<String>,
    username: Option<String>,
    password: Option<Bytes>,
    keep_alive: Duration,
    session_expiry: u32,
    via_proxy: bool,
) -> beckon_client::Options {
    let mut options = beckon_client::Options::new(ProtocolVersion::V5, client_id);
    options.username = username;
    options.password = password;
    options.keep_alive = keep_alive.max(Duration::from_secs(1));
    options.clean_start = false;
    options.session_expiry = session_expiry;
    options.receive_maximum = MAX_INFLIGHT as u16;
    options.max_inflight = MAX_INFLIGHT;
    options.max_packet_size = MAX_INCOMING_PACKET;
    options.set_via_proxy(via_proxy);
    options
}

/// What the session needs to know.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// MQTT client id: the agent id.
    pub client_id: String,
    /// User name (sent with a token password).
    pub username: Option<String>,
    /// Password: the signed token, if the agent authenticates by token.
    pub password: Option<Bytes>,
    /// Keepalive asked for in CONNECT (the broker may override it).
    pub keepalive: Duration,
    /// How long to wait for PINGRESP.
    pub ping_timeout: Duration,
    /// How long CONNECT to CONNACK may take; also bounds every write.
    pub connect_timeout: Duration,
    /// Session expiry interval, seconds.
    pub session_expiry: u32,
    /// `agents/{id}/wake`.
    pub wake_topic: String,
    /// `agents/{id}/ack`.
    pub ack_topic: String,
    /// `agents/{id}/relay` and `agents/{id}/relay-result`: Wake-on-LAN relay requests in,
    /// results out. `None`: the agent does not relay.
    pub relay_topics: Option<(String, String)>,
    /// The stream goes through an HTTP proxy: told to the broker in CONNECT, which cannot
    /// see it, so that the agent's presence says so.
    pub via_proxy: bool,
}

/// What CONNACK settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Established {
    /// The broker still had the session (queued wake-ups follow).
    pub session_present: bool,
    /// The keepalive in force (the broker's Server Keep Alive wins).
    pub keepalive: Duration,
    /// How many acks may be in flight.
    pub inflight_limit: usize,
}

/// Why a session ended. Each variant reads as a sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The broker refused the CONNECT.
    Refused {
        /// CONNACK reason code.
        code: ReasonCode,
        /// Reason String, if sent.
        reason: Option<String>,
        /// Server Reference, if sent (0x9C/0x9D).
        server_reference: Option<String>,
    },
    /// The broker sent DISCONNECT.
    Disconnected {
        /// DISCONNECT reason code.
        code: ReasonCode,
        /// Reason String, if sent.
        reason: Option<String>,
        /// Server Reference, if sent (0x9C/0x9D).
        server_reference: Option<String>,
    },
    /// No CONNACK in time.
    ConnectTimeout,
    /// No PINGRESP in time: the connection is dead.
    PingTimeout,
    /// The broker closed the stream.
    Closed,
    /// Reading or writing failed.
    Io(String),
    /// The broker broke the protocol.
    Protocol(String),
    /// The broker refused the wake topic subscription.
    SubscribeRefused(ReasonCode),
    /// The agent is stopping.
    Shutdown,
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra = |reason: &Option<String>, reference: &Option<String>| {
            let mut s = String::new();
            if let Some(r) = reason {
                s.push_str(&format!(" ({r})"));
            }
            if let Some(r) = reference {
                s.push_str(&format!(", server reference {r}"));
            }
            s
        };
        match self {
            Self::Refused {
                code,
                reason,
                server_reference,
            } => write!(
                f,
                "broker refused the connection: {}{}",
                describe_code(*code),
                extra(reason, server_reference)
            ),
            Self::Disconnected {
                code,
                reason,
                server_reference,
            } => write!(
                f,
                "broker closed the session: {}{}",
                describe_code(*code),
                extra(reason, server_reference)
            ),
            Self::ConnectTimeout => write!(f, "broker did not answer CONNECT in time"),
            Self::PingTimeout => write!(
                f,
                "broker did not answer a keepalive ping in time; the connection is dead (a firewall or proxy may drop idle connections)"
            ),
            Self::Closed => write!(f, "broker closed the connection"),
            Self::Io(e) => write!(f, "connection failed: {e}"),
            Self::Protocol(e) => write!(f, "broker broke the MQTT protocol: {e}"),
            Self::SubscribeRefused(code) => write!(
                f,
                "broker refused the wake-up subscription: {}; check that the agent's identity matches its agent_id",
                describe_code(*code)
            ),
            Self::Shutdown => write!(f, "agent stopping"),
        }
    }
}

/// A reason code in plain words, with the fix where there is one.
pub fn describe_code(code: ReasonCode) -> String {
    let text = match code {
        ReasonCode::SUCCESS => "normal disconnection",
        ReasonCode::UNSPECIFIED_ERROR => "unspecified error",
        ReasonCode::MALFORMED_PACKET => "malformed packet",
        ReasonCode::PROTOCOL_ERROR => "protocol error",
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION => {
            "MQTT 5 not supported by this broker; point the agent at a Beckon broker"
        }
        ReasonCode::CLIENT_IDENTIFIER_NOT_VALID => {
            "client id not valid; check agent_id against the identity the console issued"
        }
        ReasonCode::BAD_USER_NAME_OR_PASSWORD => {
            "bad credentials; the token is wrong or expired: enroll the agent again"
        }
        ReasonCode::NOT_AUTHORIZED => {
            "not authorized; the certificate or token does not allow this agent id: enroll the agent again"
        }
        ReasonCode::SERVER_UNAVAILABLE => "server unavailable",
        ReasonCode::SERVER_BUSY => "server busy; waiting longer before the next attempt",
        ReasonCode::BANNED => "this agent is banned by the broker; ask the administrator",
        ReasonCode::SERVER_SHUTTING_DOWN => "server shutting down",
        ReasonCode::BAD_AUTHENTICATION_METHOD => "bad authentication method",
        ReasonCode::KEEP_ALIVE_TIMEOUT => "keepalive timeout",
        ReasonCode::SESSION_TAKEN_OVER => {
            "session taken over: another process connected with the same agent id"
        }
        ReasonCode::USE_ANOTHER_SERVER => "use another server",
        ReasonCode::SERVER_MOVED => "server moved",
        ReasonCode::CONNECTION_RATE_EXCEEDED => {
            "connection rate exceeded; waiting longer before the next attempt"
        }
        ReasonCode::QUOTA_EXCEEDED => "quota exceeded",
        ReasonCode::ADMINISTRATIVE_ACTION => "administrative action",
        ReasonCode::PACKET_TOO_LARGE => "packet too large",
        _ => "",
    };
    if text.is_empty() {
        format!("reason code 0x{:02X}", code.0)
    } else {
        format!("{text} (0x{:02X})", code.0)
    }
}

/// A message the broker delivered on one of the agent's topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// On `agents/{id}/wake`.
    WakeUp(Bytes),
    /// On `agents/{id}/relay`.
    Relay(Bytes),
}

/// Where an outbox entry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutTopic {
    Ack,
    RelayResult,
}

/// QoS 1 acks waiting to be published, in order. Survives reconnects: entries stay until
/// the broker's PUBACK, and are resent (DUP, same packet id) on the next session.
pub struct Outbox {
    inner: Mutex<OutboxInner>,
    notify: Notify,
    capacity: usize,
}

struct OutboxInner {
    entries: VecDeque<OutEntry>,
    next_id: u16,
}

struct OutEntry {
    topic: OutTopic,
    payload: Bytes,
    packet_id: Option<u16>,
    sent_this_session: bool,
}

/// One PUBLISH to send.
struct Outgoing {
    topic: OutTopic,
    packet_id: u16,
    payload: Bytes,
    dup: bool,
}

impl Outbox {
    /// An outbox holding at most `capacity` unacknowledged acks (the oldest are dropped).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(OutboxInner {
                entries: VecDeque::new(),
                next_id: 1,
            }),
            notify: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues a payload for the ack topic.
    pub fn push(&self, payload: Vec<u8>) {
        self.push_to(OutTopic::Ack, payload);
    }

    /// Queues a payload for the relay-result topic.
    pub fn push_relay_result(&self, payload: Vec<u8>) {
        self.push_to(OutTopic::RelayResult, payload);
    }

    fn push_to(&self, topic: OutTopic, payload: Vec<u8>) {
        {
            let mut inner = self.lock();
            if inner.entries.len() >= self.capacity {
                inner.entries.pop_front();
                tracing::warn!(
                    capacity = self.capacity,
                    "ack queue full while offline; oldest ack dropped"
                );
            }
            inner.entries.push_back(OutEntry {
                topic,
                payload: Bytes::from(payload),
                packet_id: None,
                sent_this_session: false,
            });
        }
        self.notify.notify_one();
    }

    /// How many acks are not yet acknowledged by the broker.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when every ack reached the broker.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn new_session(&self) {
        for e in &mut self.lock().entries {
            e.sent_this_session = false;
        }
    }

    /// The next acks to send, in order, within `limit` in flight.
    fn take_sendable(&self, limit: usize) -> Vec<Outgoing> {
        let mut inner = self.lock();
        let mut in_flight = inner.entries.iter().filter(|e| e.sent_this_session).count();
        let mut out = Vec::new();
        for i in 0..inner.entries.len() {
            if in_flight >= limit {
                break;
            }
            if inner.entries[i].sent_this_session {
                continue;
            }
            let dup = inner.entries[i].packet_id.is_some();
            let packet_id = match inner.entries[i].packet_id {
                Some(id) => id,
                None => {
                    let id = inner.allocate_id();
                    inner.entries[i].packet_id = Some(id);
                    id
                }
            };
            inner.entries[i].sent_this_session = true;
            in_flight += 1;
            out.push(Outgoing {
                topic: inner.entries[i].topic,
                packet_id,
                payload: inner.entries[i].payload.clone(),
                dup,
            });
        }
        out
    }

    fn acked(&self, packet_id: u16) -> bool {
        let mut inner = self.lock();
        match inner
            .entries
            .iter()
            .position(|e| e.packet_id == Some(packet_id))
        {
            Some(i) => {
                inner.entries.remove(i);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl OutboxInner {
    fn allocate_id(&mut self) -> u16 {
        loop {
            let id = self.next_id;
            self.next_id = if self.next_id >= SUBSCRIBE_PACKET_ID - 1 {
                1
            } else {
                self.next_id + 1
            };
            if !self.entries.iter().any(|e| e.packet_id == Some(id)) {
                return id;
            }
        }
    }
}

/// A connected MQTT session.
pub struct MqttSession<S> {
    stream: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
    opts: SessionOptions,
    keepalive: Duration,
    inflight_limit: usize,
    last_sent: Instant,
    ping_sent: Option<Instant>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MqttSession<S> {
    /// Sends CONNECT and the wake-topic SUBSCRIBE, then waits for CONNACK.
    pub async fn establish(
        stream: S,
        opts: SessionOptions,
    ) -> Result<(Self, Established), SessionEnd> {
        let keepalive_secs = u16::try_from(opts.keepalive.as_secs().max(1)).unwrap_or(u16::MAX);
        let mut session = Self {
            stream,
            read_buf: BytesMut::with_capacity(1024),
            write_buf: BytesMut::with_capacity(256),
            keepalive: Duration::from_secs(u64::from(keepalive_secs)),
            inflight_limit: MAX_INFLIGHT,
            last_sent: Instant::now(),
            ping_sent: None,
            opts,
        };
        let connect = Packet::Connect(Box::new(
            connect_options(
                session.opts.client_id.clone(),
                session.opts.username.clone(),
                session.opts.password.clone(),
                session.keepalive,
                session.opts.session_expiry,
                session.opts.via_proxy,
            )
            .connect_packet(),
        ));
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::DoNotSend,
        };
        let mut subscriptions = vec![Subscription {
            filter: session.opts.wake_topic.clone(),
            options,
        }];
        if let Some((relay, _)) = &session.opts.relay_topics {
            subscriptions.push(Subscription {
                filter: relay.clone(),
                options,
            });
        }
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id: SUBSCRIBE_PACKET_ID,
            subscriptions,
            properties: Properties::default(),
        });
        session.send(&connect).await?;
        // SUBSCRIBE goes right behind CONNECT, without waiting for CONNACK (MQTT allows
        // it; a refused CONNECT makes the broker ignore it). The broker announces the agent
        // online when it accepts CONNECT, and the console then resends pending wake-ups: on a
        // fresh session the subscription must already be in place when they arrive. A write
        // error here is reported after the CONNACK, which may say why the broker closed.
        let subscribed = session.send(&subscribe).await;
        let deadline = Instant::now() + session.opts.connect_timeout;
        let connack = loop {
            if let Some(packet) = session.decode_one().await? {
                break packet;
            }
            match tokio::time::timeout_at(deadline, session.stream.read_buf(&mut session.read_buf))
                .await
            {
                Err(_) => return Err(SessionEnd::ConnectTimeout),
                Ok(Ok(0)) => return Err(SessionEnd::Closed),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(SessionEnd::Io(e.to_string())),
            }
        };
        let Packet::ConnAck(connack) = connack else {
            return Err(SessionEnd::Protocol(format!(
                "expected CONNACK, got packet type {}",
                connack.packet_type()
            )));
        };
        if connack.code.is_error() {
            let properties = connack.properties.into_set();
            return Err(SessionEnd::Refused {
                code: connack.code,
                reason: properties.reason_string,
                server_reference: properties.server_reference,
            });
        }
        subscribed?;
        if let Some(server_keepalive) = connack.properties.server_keep_alive
            && server_keepalive > 0
        {
            session.keepalive = Duration::from_secs(u64::from(server_keepalive));
        }
        if let Some(receive_max) = connack.properties.receive_maximum {
            session.inflight_limit = usize::from(receive_max).clamp(1, MAX_INFLIGHT);
        }
        let established = Established {
            session_present: connack.session_present,
            keepalive: session.keepalive,
            inflight_limit: session.inflight_limit,
        };
        Ok((session, established))
    }

    /// Runs until the connection ends: hands wake-ups and relay requests to `on_wake`
    /// (PUBACK follows its return), publishes the outbox, pings. Returns why it ended.
    pub async fn run(
        mut self,
        outbox: &Outbox,
        on_wake: &mut (dyn FnMut(Incoming) + Send),
        shutdown: &mut watch::Receiver<bool>,
    ) -> SessionEnd {
        outbox.new_session();
        let end = self.run_inner(outbox, on_wake, shutdown).await;
        let end = match end {
            Ok(()) => SessionEnd::Shutdown,
            Err(end) => end,
        };
        if end == SessionEnd::Shutdown {
            // Keep the session (expiry unchanged) so that wake-ups queue while we are away.
            let bye = Packet::Disconnect(Disconnect::default());
            let _ = self.send(&bye).await;
            let _ = timeout(Duration::from_secs(2), self.stream.shutdown()).await;
        }
        end
    }

    async fn run_inner(
        &mut self,
        outbox: &Outbox,
        on_wake: &mut (dyn FnMut(Incoming) + Send),
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionEnd> {
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            // Packets first: PUBACKs free in-flight slots for the acks sent next.
            while let Some(packet) = self.decode_one().await? {
                self.handle(packet, outbox, on_wake).await?;
            }
            for out in outbox.take_sendable(self.inflight_limit) {
                let publish = Packet::Publish(Publish {
                    dup: out.dup,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: match (out.topic, &self.opts.relay_topics) {
                        (OutTopic::RelayResult, Some((_, result))) => result.clone(),
                        _ => self.opts.ack_topic.clone(),
                    },
                    packet_id: Some(out.packet_id),
                    payload: out.payload,
                    properties: Properties::from(beckon_mqtt::PropertySet {
                        payload_format_indicator: Some(1),
                        content_type: Some("application/json".into()),
                        ..Default::default()
                    }),
                });
                self.send(&publish).await?;
            }
            let timer = match self.ping_sent {
                Some(sent) => sent + self.opts.ping_timeout,
                None => self.last_sent + self.keepalive,
            };
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return Ok(());
                    }
                }
                read = self.stream.read_buf(&mut self.read_buf) => match read {
                    Ok(0) => return Err(SessionEnd::Closed),
                    Ok(_) => {}
                    Err(e) => return Err(SessionEnd::Io(e.to_string())),
                },
                () = outbox.notify.notified() => {}
                () = sleep_until(timer) => {
                    if self.ping_sent.is_some() {
                        return Err(SessionEnd::PingTimeout);
                    }
                    self.send(&Packet::PingReq).await?;
                    self.ping_sent = Some(Instant::now());
                }
            }
        }
    }

    async fn handle(
        &mut self,
        packet: Packet,
        outbox: &Outbox,
        on_wake: &mut (dyn FnMut(Incoming) + Send),
    ) -> Result<(), SessionEnd> {
        match packet {
            Packet::PingResp => self.ping_sent = None,
            Packet::Publish(publish) => {
                if publish.topic == self.opts.wake_topic {
                    on_wake(Incoming::WakeUp(publish.payload));
                } else if self
                    .opts
                    .relay_topics
                    .as_ref()
                    .is_some_and(|(relay, _)| publish.topic == *relay)
                {
                    on_wake(Incoming::Relay(publish.payload));
                } else {
                    tracing::warn!(topic = %publish.topic, "message on an unexpected topic ignored");
                }
                match (publish.qos, publish.packet_id) {
                    (QoS::AtLeastOnce, Some(id)) => {
                        self.send(&Packet::PubAck(Ack::new(id))).await?
                    }
                    (QoS::ExactlyOnce, Some(id)) => {
                        self.send(&Packet::PubRec(Ack::new(id))).await?
                    }
                    _ => {}
                }
            }
            Packet::PubRel(rel) => self.send(&Packet::PubComp(Ack::new(rel.packet_id))).await?,
            Packet::PubAck(ack) => {
                if ack.code.is_error() {
                    tracing::warn!(code = %describe_code(ack.code), "broker refused an ack publish");
                }
                if !outbox.acked(ack.packet_id) {
                    tracing::debug!(packet_id = ack.packet_id, "PUBACK for an unknown packet id");
                }
            }
            Packet::SubAck(suback) if suback.packet_id == SUBSCRIBE_PACKET_ID => {
                // The wake topic comes first: without it the agent is useless.
                if let Some(code) = suback.codes.first().filter(|c| c.is_error()) {
                    return Err(SessionEnd::SubscribeRefused(*code));
                }
                // Without relay the agent still does its main job.
                if let Some(code) = suback.codes.get(1).filter(|c| c.is_error()) {
                    tracing::warn!(code = %describe_code(*code), "the broker refused the Wake-on-LAN relay subscription; this agent will not relay");
                }
            }
            Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Disconnect(d) => {
                let properties = d.properties.into_set();
                return Err(SessionEnd::Disconnected {
                    code: d.code,
                    reason: properties.reason_string,
                    server_reference: properties.server_reference,
                });
            }
            other => {
                let message = format!(
                    "unexpected packet type {} from the broker",
                    other.packet_type()
                );
                self.protocol_disconnect(ReasonCode::PROTOCOL_ERROR).await;
                return Err(SessionEnd::Protocol(message));
            }
        }
        Ok(())
    }

    /// The next whole packet in the buffer. A packet that cannot be decoded ends the session
    /// with a DISCONNECT naming the reason (malformed, too large, ...), as MQTT 5 asks.
    async fn decode_one(&mut self) -> Result<Option<Packet>, SessionEnd> {
        match beckon_mqtt::decode(&mut self.read_buf, ProtocolVersion::V5, MAX_INCOMING_PACKET) {
            Ok(packet) => Ok(packet),
            Err(e) => {
                self.protocol_disconnect(e.reason_code()).await;
                Err(decode_failure(&e))
            }
        }
    }

    async fn protocol_disconnect(&mut self, code: ReasonCode) {
        let packet = Packet::Disconnect(Disconnect {
            code,
            properties: Properties::default(),
        });
        let _ = self.send(&packet).await;
    }

    async fn send(&mut self, packet: &Packet) -> Result<(), SessionEnd> {
        self.write_buf.clear();
        beckon_mqtt::encode(packet, ProtocolVersion::V5, &mut self.write_buf)
            .map_err(|e| SessionEnd::Protocol(format!("cannot encode a packet: {e}")))?;
        let write = async {
            self.stream.write_all(&self.write_buf).await?;
            self.stream.flush().await
        };
        match timeout(self.opts.connect_timeout, write).await {
            Ok(Ok(())) => {
                self.last_sent = Instant::now();
                Ok(())
            }
            Ok(Err(e)) => Err(SessionEnd::Io(e.to_string())),
            Err(_) => Err(SessionEnd::Io(
                "writing to the broker stalled; the connection is dead".into(),
            )),
        }
    }
}

fn decode_failure(e: &DecodeError) -> SessionEnd {
    SessionEnd::Protocol(format!("undecodable packet from the broker: {e}"))
}
