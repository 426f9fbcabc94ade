//! The agent's MQTT 5 session, on the shared client (`beckon-client`): the agent's CONNECT
//! options (persistent session, so QoS 1 wake-ups queue at the broker while the agent is
//! away), SUBSCRIBE to its wake topic, wake-ups handed over and acknowledged, QoS 1 acks from
//! the [`Outbox`] in order, and keepalive pings whose missing answer means the connection is
//! dead. Packet ids, the window and resending live in the client session, which outlives
//! each connection.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use beckon_client::{Connection, End, Event, Session};
use beckon_mqtt::{
    Properties, PropertySet, ProtocolVersion, Publish, QoS, ReasonCode, RetainHandling,
    Subscription, SubscriptionOptions,
};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, watch};

/// Largest packet the agent accepts (wake-ups are a few hundred bytes).
pub const MAX_INCOMING_PACKET: u32 = 64 * 1024;
/// Most acks in flight at once, whatever the broker's receive maximum.
const MAX_INFLIGHT: usize = 16;

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

/// What the session hands each message on the wake-up or relay topic to.
pub trait OnIncoming: Sync {
    /// Handles one message; the session sends its PUBACK once the returned future is done.
    fn on_incoming(&self, incoming: Incoming) -> impl Future<Output = ()> + Send;
}

/// Where an outbox entry goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutTopic {
    Ack,
    RelayResult,
}

/// QoS 1 acks waiting for the session, in order. Bounded: when the agent is offline long
/// enough to fill it, the oldest ack is dropped (the console times the wake-up out instead).
/// Entries move into the client session as its window has room; there they stay until the
/// broker's PUBACK, across reconnects.
pub struct Outbox {
    entries: Mutex<VecDeque<(OutTopic, Bytes)>>,
    notify: Notify,
    capacity: usize,
}

impl Outbox {
    /// An outbox holding at most `capacity` acks (the oldest are dropped).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(VecDeque::new()),
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
            let mut entries = self.lock();
            if entries.len() >= self.capacity {
                entries.pop_front();
                tracing::warn!(
                    capacity = self.capacity,
                    "ack queue full while offline; oldest ack dropped"
                );
            }
            entries.push_back((topic, Bytes::from(payload)));
        }
        self.notify.notify_one();
    }

    /// How many acks wait for the session.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no ack waits for the session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn pop(&self) -> Option<(OutTopic, Bytes)> {
        self.lock().pop_front()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(OutTopic, Bytes)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A new client session for the agent (made once, kept across connections).
pub fn new_client(opts: &SessionOptions) -> Session {
    Session::new(client_options(opts), std::time::Instant::now())
}

fn client_options(opts: &SessionOptions) -> beckon_client::Options {
    let mut options = connect_options(
        opts.client_id.clone(),
        opts.username.clone(),
        opts.password.clone(),
        opts.keepalive,
        opts.session_expiry,
        opts.via_proxy,
    );
    options.ping_timeout = opts.ping_timeout;
    options.connect_timeout = opts.connect_timeout;
    options
}

impl From<End> for SessionEnd {
    fn from(end: End) -> Self {
        match end {
            End::Refused {
                code,
                reason,
                server_reference,
            } => Self::Refused {
                code,
                reason,
                server_reference,
            },
            End::Disconnected {
                code,
                reason,
                server_reference,
            } => Self::Disconnected {
                code,
                reason,
                server_reference,
            },
            End::OldProtocol { .. } => Self::Refused {
                code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                reason: None,
                server_reference: None,
            },
            End::ConnectTimeout => Self::ConnectTimeout,
            End::PingTimeout => Self::PingTimeout,
            End::Closed => Self::Closed,
            End::Io(e) => Self::Io(e.to_string()),
            End::Protocol(e) => Self::Protocol(e),
            End::Shutdown => Self::Shutdown,
        }
    }
}

/// A connected MQTT session.
pub struct MqttSession<S> {
    connection: Connection<S>,
    opts: SessionOptions,
    subscribe_id: u16,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MqttSession<S> {
    /// Sends CONNECT and the wake-topic SUBSCRIBE, then waits for CONNACK. `client` is the
    /// agent's client session (its options are brought up to date with `opts`); it comes
    /// back with the end when the connection fails.
    pub async fn establish(
        stream: S,
        mut client: Session,
        opts: SessionOptions,
    ) -> Result<(Self, Established), (Session, SessionEnd)> {
        *client.options_mut() = client_options(&opts);
        let mut connection = Connection::start(stream, client);
        let options = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::DoNotSend,
        };
        let mut subscriptions = vec![Subscription {
            filter: opts.wake_topic.clone(),
            options,
        }];
        if let Some((relay, _)) = &opts.relay_topics {
            subscriptions.push(Subscription {
                filter: relay.clone(),
                options,
            });
        }
        // SUBSCRIBE goes right behind CONNECT, without waiting for CONNACK (MQTT allows
        // it; a refused CONNECT makes the broker ignore it). The broker announces the agent
        // online when it accepts CONNECT, and the console then resends pending wake-ups: on a
        // fresh session the subscription must already be in place when they arrive.
        let now = tokio::time::Instant::now().into_std();
        let subscribe_id = match connection.session_mut().subscribe(subscriptions, now) {
            Ok(id) => id,
            Err(e) => {
                let (_, client) = connection.into_parts();
                return Err((
                    client,
                    SessionEnd::Protocol(format!("cannot encode the wake-up SUBSCRIBE: {e}")),
                ));
            }
        };
        let settled = loop {
            match connection.next_event().await {
                Ok(Event::Connected(settled)) => break settled,
                Ok(_) => {}
                Err(end) => {
                    let (_, client) = connection.into_parts();
                    return Err((client, end.into()));
                }
            }
        };
        let established = Established {
            session_present: settled.session_present,
            keepalive: settled.keep_alive,
            inflight_limit: settled.window,
        };
        let session = Self {
            connection,
            opts,
            subscribe_id,
        };
        Ok((session, established))
    }

    /// Runs until the connection ends: hands wake-ups and relay requests to `on_wake`
    /// (PUBACK follows once it is done), publishes the outbox, pings. Returns the client
    /// session for the next connection and why this one ended.
    pub async fn run(
        mut self,
        outbox: &Outbox,
        on_wake: &impl OnIncoming,
        shutdown: &mut watch::Receiver<bool>,
    ) -> (Session, SessionEnd) {
        let end = match self.run_inner(outbox, on_wake, shutdown).await {
            Ok(()) => {
                // Keep the session (expiry unchanged) so that wake-ups queue while we are away.
                self.connection.disconnect().await;
                SessionEnd::Shutdown
            }
            Err(end) => end,
        };
        let (_, client) = self.connection.into_parts();
        (client, end)
    }

    async fn run_inner(
        &mut self,
        outbox: &Outbox,
        on_wake: &impl OnIncoming,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionEnd> {
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            self.take_from(outbox)?;
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        return Ok(());
                    }
                }
                event = self.connection.next_event() => match event {
                    Ok(event) => self.handle(event, on_wake).await?,
                    Err(end) => return Err(end.into()),
                },
                () = outbox.notify.notified() => {}
            }
        }
    }

    /// Moves acks from the outbox into the client session while its window has room; the
    /// rest wait in the (bounded) outbox.
    fn take_from(&mut self, outbox: &Outbox) -> Result<(), SessionEnd> {
        let session = self.connection.session_mut();
        let window = session.settled().map_or(1, |s| s.window);
        while session.in_flight() + session.queued() < window {
            let Some((topic, payload)) = outbox.pop() else {
                return Ok(());
            };
            let publish = Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: match (topic, &self.opts.relay_topics) {
                    (OutTopic::RelayResult, Some((_, result))) => result.clone(),
                    _ => self.opts.ack_topic.clone(),
                },
                packet_id: None,
                payload,
                properties: Properties::from(PropertySet {
                    payload_format_indicator: Some(1),
                    content_type: Some("application/json".into()),
                    ..PropertySet::default()
                }),
            };
            let now = tokio::time::Instant::now().into_std();
            session
                .publish(publish, now)
                .map_err(|e| SessionEnd::Protocol(format!("cannot send an ack: {e}")))?;
        }
        Ok(())
    }

    async fn handle(&mut self, event: Event, on_wake: &impl OnIncoming) -> Result<(), SessionEnd> {
        match event {
            Event::Message(publish) => {
                if publish.topic == self.opts.wake_topic {
                    on_wake.on_incoming(Incoming::WakeUp(publish.payload)).await;
                } else if self
                    .opts
                    .relay_topics
                    .as_ref()
                    .is_some_and(|(relay, _)| publish.topic == *relay)
                {
                    on_wake.on_incoming(Incoming::Relay(publish.payload)).await;
                } else {
                    tracing::warn!(topic = %publish.topic, "message on an unexpected topic ignored");
                }
            }
            Event::Published { code, .. } if code.is_error() => {
                tracing::warn!(code = %describe_code(code), "broker refused an ack publish");
            }
            Event::Subscribed {
                packet_id, codes, ..
            } if packet_id == self.subscribe_id => {
                // The wake topic comes first: without it the agent is useless.
                if let Some(code) = codes.first().filter(|c| c.is_error()) {
                    return Err(SessionEnd::SubscribeRefused(*code));
                }
                // Without relay the agent still does its main job.
                if let Some(code) = codes.get(1).filter(|c| c.is_error()) {
                    tracing::warn!(code = %describe_code(*code), "the broker refused the Wake-on-LAN relay subscription; this agent will not relay");
                }
            }
            _ => {}
        }
        Ok(())
    }
}
