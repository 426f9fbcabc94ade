//! The MQTT part of a path check: CONNECT (MQTT 5, as the agent speaks it), then a round trip
//! through the broker.
//!
//! What the round trip checks:
//! 1. PINGREQ -> PINGRESP: the broker answers on this path after CONNECT (some devices cut a
//!    connection once it carries more than a TLS handshake).
//! 2. For an agent's identity (`DoctorConfig::wake_topic`): SUBSCRIBE to `agents/{id}/wake`
//!    at QoS 1 must be granted; without it the agent never receives a wake-up.
//! 3. The echo: SUBSCRIBE to the echo topic, PUBLISH a random payload there at QoS 1 (PUBACK
//!    reason code checked), wait for it to come back, then UNSUBSCRIBE. The echo topic is
//!    `--echo-topic`, or `beckon-doctor/{client id}` for the doctor's own throw-away client. A
//!    named agent client gets no echo unless asked: an agent may only publish its acks, which
//!    the console reads, so an echo there would be noise at best.
//!
//! With an agent's configuration the doctor connects as the agent's probe client `<id>/doctor`
//! (same certificate or token): the broker keeps it apart from the agent's own session, so a
//! running agent is not taken over and its queued wake-ups stay its own. The probe does
//! CONNECT and PINGREQ only (step 1); the broker refuses it any SUBSCRIBE or PUBLISH.
//!
//! A client named by `--client-id` has its session resumed, not cleaned (clean start off, the agent's session
//! expiry), so the wake-ups queued for the agent stay queued: the doctor never acknowledges a
//! message that is not its own echo, and the broker delivers them again to the agent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use beckon_client::{Connection, End, Event, Options, Session};
use beckon_mqtt::{ConnAck, Properties, PropertySet, Publish, QoS, ReasonCode, Subscription};
use beckon_net::{TlsError, TlsVersion};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

/// Keepalive announced in CONNECT (the agent's value on fragile paths).
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Who the doctor connects as.
#[derive(Debug, Clone)]
pub(crate) struct MqttIdentity {
    pub client_id: String,
    /// True for an id given by the operator: resume its session.
    pub named: bool,
    /// True for an agent's doctor client (`<id>/doctor`): a clean session, CONNECT and
    /// PINGREQ only (the broker allows nothing else to it).
    pub probe: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub session_expiry: Duration,
}

impl MqttIdentity {
    /// The agent's client options for this identity on a path through a proxy or not. A
    /// throw-away id starts clean and leaves no session behind.
    fn options(&self, via_proxy: bool, timeout: Duration) -> Options {
        let mut options = beckon_agent::session::connect_options(
            self.client_id.clone(),
            self.username.clone(),
            self.password.clone().map(Bytes::from),
            KEEP_ALIVE,
            u32::try_from(self.session_expiry.as_secs()).unwrap_or(u32::MAX),
            via_proxy,
        );
        if !self.named {
            options.clean_start = true;
            options.session_expiry = 0;
        }
        options.connect_timeout = timeout;
        options.ping_timeout = timeout;
        // The doctor acknowledges its own echo only: an agent's queued wake-ups stay queued.
        options.auto_ack = false;
        options
    }
}

/// An MQTT exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MqttError {
    /// No answer in time.
    #[error("no {what} from the broker within {} s", after.as_secs_f32())]
    TimedOut { what: &'static str, after: Duration },
    /// The connection closed while waiting.
    #[error("the broker closed the connection while the doctor waited for {what}")]
    Closed { what: &'static str },
    /// The TLS layer reported an error after the handshake (TLS 1.3 client certificate checks).
    #[error(transparent)]
    Tls(TlsError),
    /// A socket error.
    #[error("reading {what} failed: {source}")]
    Io {
        what: &'static str,
        source: Arc<std::io::Error>,
    },
    /// The broker sent bytes that are not MQTT 5, or broke the protocol.
    #[error("the broker's answer is not valid MQTT 5 ({0})")]
    Decode(String),
    /// The broker answered with an MQTT 3.1.1 CONNACK.
    #[error("the broker answered in MQTT 3.1.1 with return code {0}")]
    V311(u8),
    /// The broker disconnected with a reason code.
    #[error("the broker sent DISCONNECT {}", describe_code(*.0))]
    Disconnected(ReasonCode, Option<String>),
    /// The packet could not be encoded (a client id or topic that is too long).
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: beckon_client::Error,
    },
}

/// The stream before CONNECT, the client connection after.
enum Link<S> {
    Idle(S),
    Connected(Box<Connection<S>>),
    Gone,
}

/// An MQTT 5 connection to the broker over any stream, on the shared client session.
pub(crate) struct MqttProbe<S> {
    link: Link<S>,
    timeout: Duration,
    server: String,
    min_tls: TlsVersion,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MqttProbe<S> {
    pub fn new(stream: S, timeout: Duration, server: &str, min_tls: TlsVersion) -> Self {
        Self {
            link: Link::Idle(stream),
            timeout,
            server: server.to_owned(),
            min_tls,
        }
    }

    fn connection(&mut self) -> Result<&mut Connection<S>, MqttError> {
        match &mut self.link {
            Link::Connected(connection) => Ok(connection),
            _ => Err(MqttError::Closed { what: "CONNECT" }),
        }
    }

    /// Why the connection ended, as the doctor reports it.
    fn ended(&self, what: &'static str, end: End) -> MqttError {
        match end {
            End::ConnectTimeout | End::PingTimeout => MqttError::TimedOut {
                what,
                after: self.timeout,
            },
            End::Closed | End::Shutdown => MqttError::Closed { what },
            End::Io(error) => self.io_error(what, error.0),
            End::Protocol(message) => MqttError::Decode(message),
            End::OldProtocol { return_code } => MqttError::V311(return_code),
            End::Disconnected { code, reason, .. } | End::Refused { code, reason, .. } => {
                MqttError::Disconnected(code, reason)
            }
        }
    }

    fn io_error(&self, what: &'static str, error: Arc<std::io::Error>) -> MqttError {
        if let Some(tls) = TlsError::from_stream_error(&self.server, &error, self.min_tls) {
            return MqttError::Tls(tls);
        }
        match error.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => MqttError::Closed { what },
            _ => MqttError::Io {
                what,
                source: error,
            },
        }
    }

    /// Waits for an event that `want` accepts, until the step's timeout; messages that are
    /// not the doctor's are left unacknowledged (they belong to the agent's session).
    async fn wait_for<T>(
        &mut self,
        what: &'static str,
        mut want: impl FnMut(&mut Connection<S>, Event) -> Option<T>,
    ) -> Result<T, MqttError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let connection = self.connection()?;
            let event = match tokio::time::timeout_at(deadline, connection.next_event()).await {
                Err(_) => {
                    return Err(MqttError::TimedOut {
                        what,
                        after: self.timeout,
                    });
                }
                Ok(Err(end)) => return Err(self.ended(what, end)),
                Ok(Ok(event)) => event,
            };
            let described = format!("{event:?}");
            if let Some(found) = want(connection, event) {
                return Ok(found);
            }
            tracing::debug!(event = %described, "event ignored by the doctor");
        }
    }

    /// Sends the agent's CONNECT (`via_proxy`: the path goes through an HTTP proxy) and
    /// returns the CONNACK: accepted, or refused with its reason code.
    pub async fn connect(
        &mut self,
        identity: &MqttIdentity,
        via_proxy: bool,
    ) -> Result<ConnAck, MqttError> {
        let Link::Idle(stream) = std::mem::replace(&mut self.link, Link::Gone) else {
            return Err(MqttError::Closed { what: "CONNACK" });
        };
        let session = Session::new(
            identity.options(via_proxy, self.timeout),
            tokio::time::Instant::now().into_std(),
        );
        self.link = Link::Connected(Box::new(Connection::start(stream, session)));
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let connection = self.connection()?;
            match tokio::time::timeout_at(deadline, connection.next_event()).await {
                Err(_) => {
                    return Err(MqttError::TimedOut {
                        what: "CONNACK",
                        after: self.timeout,
                    });
                }
                Ok(Ok(Event::Connected(settled))) => {
                    return Ok(ConnAck {
                        session_present: settled.session_present,
                        code: ReasonCode::SUCCESS,
                        properties: Properties::from(PropertySet {
                            reason_string: settled.reason,
                            ..PropertySet::default()
                        }),
                    });
                }
                Ok(Ok(_)) => {}
                Ok(Err(End::Refused {
                    code,
                    reason,
                    server_reference,
                })) => {
                    return Ok(ConnAck {
                        session_present: false,
                        code,
                        properties: Properties::from(PropertySet {
                            reason_string: reason,
                            server_reference,
                            ..PropertySet::default()
                        }),
                    });
                }
                Ok(Err(end)) => return Err(self.ended("CONNACK", end)),
            }
        }
    }

    /// PINGREQ -> PINGRESP; returns the round-trip time.
    pub async fn ping(&mut self) -> Result<Duration, MqttError> {
        let started = Instant::now();
        let now = tokio::time::Instant::now().into_std();
        self.connection()?
            .session_mut()
            .ping(now)
            .map_err(|source| MqttError::Encode {
                what: "PINGREQ",
                source,
            })?;
        self.wait_for("PINGRESP", |_, event| {
            matches!(event, Event::Pong).then_some(())
        })
        .await?;
        Ok(started.elapsed())
    }

    /// SUBSCRIBE at QoS 1; returns the SUBACK's code and reason string.
    pub async fn subscribe(
        &mut self,
        topic: &str,
    ) -> Result<(ReasonCode, Option<String>), MqttError> {
        let subscription = Subscription::new(topic, QoS::AtLeastOnce);
        let now = tokio::time::Instant::now().into_std();
        let packet_id = self
            .connection()?
            .session_mut()
            .subscribe(vec![subscription], now)
            .map_err(|source| MqttError::Encode {
                what: "SUBSCRIBE",
                source,
            })?;
        self.wait_for("SUBACK", |_, event| match event {
            Event::Subscribed {
                packet_id: id,
                codes,
                reason,
            } if id == packet_id => Some((
                codes
                    .first()
                    .copied()
                    .unwrap_or(ReasonCode::UNSPECIFIED_ERROR),
                reason,
            )),
            _ => None,
        })
        .await
    }

    /// UNSUBSCRIBE, waiting for UNSUBACK.
    pub async fn unsubscribe(&mut self, topic: &str) -> Result<(), MqttError> {
        let now = tokio::time::Instant::now().into_std();
        let packet_id = self
            .connection()?
            .session_mut()
            .unsubscribe(vec![topic.to_owned()], now)
            .map_err(|source| MqttError::Encode {
                what: "UNSUBSCRIBE",
                source,
            })?;
        self.wait_for("UNSUBACK", |_, event| {
            matches!(event, Event::Unsubscribed { packet_id: id } if id == packet_id).then_some(())
        })
        .await
    }

    /// Publishes `payload` to `topic` at QoS 1 and waits for the PUBACK and for the message to
    /// come back through the subscription. Returns the PUBACK's code, and the time until the
    /// message came back (`None` when the PUBACK refused it).
    pub async fn echo(
        &mut self,
        topic: &str,
        payload: &Bytes,
    ) -> Result<(ReasonCode, Option<String>, Option<Duration>), MqttError> {
        let started = Instant::now();
        let publish = Publish {
            properties: Properties::from(PropertySet {
                message_expiry_interval: Some(60),
                ..PropertySet::default()
            }),
            ..beckon_client::message(topic, QoS::AtLeastOnce, payload.clone())
        };
        let now = tokio::time::Instant::now().into_std();
        let packet_id = self
            .connection()?
            .session_mut()
            .publish(publish, now)
            .map_err(|source| MqttError::Encode {
                what: "PUBLISH",
                source,
            })?;
        let mut puback: Option<(ReasonCode, Option<String>)> = None;
        let mut back: Option<Duration> = None;
        self.wait_for("the echoed message", |connection, event| {
            match event {
                Event::Published {
                    packet_id: id,
                    code,
                    reason,
                } if Some(id) == packet_id => puback = Some((code, reason)),
                Event::Message(p) if p.topic == topic && p.payload == *payload => {
                    back = Some(started.elapsed());
                    // Acknowledge the doctor's own message only.
                    if let Some(id) = p.packet_id {
                        let now = tokio::time::Instant::now().into_std();
                        let _ = connection.session_mut().acknowledge(id, now);
                    }
                }
                _ => return None,
            }
            // A refused message, or one the broker says nobody receives, will not come back.
            let refused = puback.as_ref().is_some_and(|(code, _)| {
                code.is_error() || *code == ReasonCode::NO_MATCHING_SUBSCRIBERS
            });
            (puback.is_some() && (back.is_some() || refused)).then_some(())
        })
        .await?;
        // The acknowledgement of the echo leaves before the step ends.
        let _ = self.connection()?.flush().await;
        let (code, reason) = puback.unwrap_or((ReasonCode::SUCCESS, None));
        Ok((code, reason, back))
    }

    /// Sends DISCONNECT (normal) and closes the stream; errors are of no interest here.
    pub async fn disconnect(mut self) {
        if let Link::Connected(connection) = &mut self.link {
            connection.disconnect().await;
        }
    }
}

/// A reason code's name, as the MQTT 5 specification gives it.
pub(crate) fn reason_name(code: ReasonCode) -> &'static str {
    match code.0 {
        0x00 => "success",
        0x01 => "granted QoS 1",
        0x02 => "granted QoS 2",
        0x10 => "no matching subscribers",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8B => "server shutting down",
        0x8C => "bad authentication method",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x8F => "topic filter invalid",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x93 => "receive maximum exceeded",
        0x95 => "packet too large",
        0x96 => "message rate too high",
        0x97 => "quota exceeded",
        0x98 => "administrative action",
        0x99 => "payload format invalid",
        0x9A => "retain not supported",
        0x9B => "QoS not supported",
        0x9C => "use another server",
        0x9D => "server moved",
        0x9E => "shared subscriptions not supported",
        0x9F => "connection rate exceeded",
        0xA0 => "maximum connect time",
        0xA1 => "subscription identifiers not supported",
        0xA2 => "wildcard subscriptions not supported",
        _ => "unknown reason code",
    }
}

/// `0x86 (bad user name or password)`.
pub(crate) fn describe_code(code: ReasonCode) -> String {
    format!("0x{:02X} ({})", code.0, reason_name(code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use beckon_mqtt::{Ack, Connect, Packet, ProtocolVersion};
    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    const T: Duration = Duration::from_secs(5);

    fn probe(client: DuplexStream) -> MqttProbe<DuplexStream> {
        MqttProbe::new(client, T, "broker.example", TlsVersion::Tls12)
    }

    fn agent() -> MqttIdentity {
        MqttIdentity {
            client_id: "laptop-42".into(),
            named: true,
            probe: false,
            username: Some("laptop-42".into()),
            password: Some("token".into()),
            session_expiry: Duration::from_secs(3600),
        }
    }

    /// The broker side: reads packets the doctor sent.
    struct Broker {
        stream: DuplexStream,
        buf: BytesMut,
    }

    impl Broker {
        fn new(stream: DuplexStream) -> Self {
            Self {
                stream,
                buf: BytesMut::new(),
            }
        }

        async fn recv(&mut self) -> Packet {
            loop {
                if let Some(p) = beckon_mqtt::decode(&mut self.buf, ProtocolVersion::V5, u32::MAX)
                    .expect("the doctor sends valid MQTT 5")
                {
                    return p;
                }
                let mut chunk = [0u8; 1024];
                let n = tokio::time::timeout(T, self.stream.read(&mut chunk))
                    .await
                    .expect("in time")
                    .expect("read");
                assert!(n > 0, "the doctor closed the stream");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        async fn send(&mut self, packet: Packet) {
            let mut out = BytesMut::new();
            beckon_mqtt::encode(&packet, ProtocolVersion::V5, &mut out).expect("encode");
            self.stream.write_all(&out).await.expect("write");
        }

        /// Takes the CONNECT and accepts it.
        async fn accept(&mut self) -> Box<Connect> {
            let Packet::Connect(connect) = self.recv().await else {
                panic!("CONNECT first");
            };
            self.send(Packet::ConnAck(ConnAck::default())).await;
            connect
        }
    }

    #[tokio::test]
    async fn the_doctor_connects_as_the_agent_does() {
        for via_proxy in [false, true] {
            let (client, server) = duplex(64 * 1024);
            let mut broker = Broker::new(server);
            let doctor = tokio::spawn(async move {
                let mut probe = probe(client);
                let ack = probe.connect(&agent(), via_proxy).await;
                probe.disconnect().await;
                ack
            });
            let connect = broker.accept().await;
            doctor.await.expect("doctor task").expect("CONNACK");
            // What the agent sends for the same identity on the same path.
            let identity = agent();
            let agent_connect = beckon_agent::session::connect_options(
                identity.client_id,
                identity.username,
                identity.password.map(Bytes::from),
                KEEP_ALIVE,
                3600,
                via_proxy,
            )
            .connect_packet();
            assert_eq!(*connect, agent_connect);
            assert!(connect.properties.receive_maximum.is_some());
            assert_eq!(
                connect.properties.user_properties,
                vec![(
                    beckon_client::VIA_PROXY_PROPERTY.to_owned(),
                    via_proxy.to_string()
                )]
            );
        }
    }

    #[tokio::test]
    async fn an_agent_session_is_resumed_and_its_wake_ups_left_alone() {
        let (client, server) = duplex(64 * 1024);
        let mut broker = Broker::new(server);
        let doctor = tokio::spawn(async move {
            let mut probe = probe(client);
            let ack = probe.connect(&agent(), false).await.expect("CONNACK");
            let rtt = probe.ping().await.expect("PINGRESP");
            probe.disconnect().await;
            (ack, rtt)
        });
        let Packet::Connect(connect) = broker.recv().await else {
            panic!("CONNECT first");
        };
        assert!(
            !connect.clean_start,
            "an agent's session must not be cleaned"
        );
        assert_eq!(connect.properties.session_expiry_interval, Some(3600));
        assert_eq!(connect.client_id, "laptop-42");
        assert_eq!(connect.username.as_deref(), Some("laptop-42"));
        broker
            .send(Packet::ConnAck(ConnAck {
                session_present: true,
                ..ConnAck::default()
            }))
            .await;
        // A wake-up queued in the agent's session arrives before the PINGRESP.
        assert_eq!(broker.recv().await, Packet::PingReq);
        broker
            .send(Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "agents/laptop-42/wake".into(),
                packet_id: Some(7),
                payload: Bytes::from_static(b"{}"),
                properties: Properties::default(),
            }))
            .await;
        broker.send(Packet::PingResp).await;
        // The doctor's next packet is its DISCONNECT: no PUBACK for the agent's wake-up.
        match broker.recv().await {
            Packet::Disconnect(d) => assert_eq!(d.code, ReasonCode::NORMAL_DISCONNECTION),
            other => panic!("expected DISCONNECT, got {other:?}"),
        }
        let (ack, _) = doctor.await.expect("doctor task");
        assert!(ack.session_present);
    }

    #[tokio::test]
    async fn a_throw_away_client_starts_clean_and_a_refusal_is_a_connack() {
        let (client, server) = duplex(64 * 1024);
        let mut broker = Broker::new(server);
        let identity = MqttIdentity {
            client_id: "beckon-doctor-1".into(),
            named: false,
            probe: false,
            session_expiry: Duration::ZERO,
            ..agent()
        };
        let doctor = tokio::spawn(async move { probe(client).connect(&identity, false).await });
        let Packet::Connect(connect) = broker.recv().await else {
            panic!("CONNECT first");
        };
        assert!(connect.clean_start);
        assert_eq!(connect.properties.session_expiry_interval, None);
        broker
            .send(Packet::ConnAck(ConnAck {
                session_present: false,
                code: ReasonCode::NOT_AUTHORIZED,
                properties: Properties::from(PropertySet {
                    reason_string: Some("no such user".into()),
                    ..PropertySet::default()
                }),
            }))
            .await;
        let ack = doctor.await.expect("task").expect("a refusal is an answer");
        assert_eq!(ack.code, ReasonCode::NOT_AUTHORIZED);
        assert_eq!(
            ack.properties.reason_string.as_deref(),
            Some("no such user")
        );
    }

    #[tokio::test]
    async fn a_broker_that_speaks_only_mqtt_3_is_named() {
        let (client, mut server) = duplex(4096);
        let doctor = tokio::spawn(async move { probe(client).connect(&agent(), false).await });
        let mut buf = [0u8; 512];
        let _ = server.read(&mut buf).await.expect("CONNECT");
        // v3.1.1 CONNACK, return code 1: unacceptable protocol version.
        server
            .write_all(&[0x20, 0x02, 0x00, 0x01])
            .await
            .expect("write");
        let err = doctor.await.expect("task").expect_err("v3 only");
        assert!(matches!(err, MqttError::V311(1)), "{err}");
    }

    #[tokio::test]
    async fn a_silent_broker_times_out() {
        let (client, server) = duplex(4096);
        let mut broker = Broker::new(server);
        let doctor = tokio::spawn(async move {
            let mut doctor =
                MqttProbe::new(client, Duration::from_millis(200), "b", TlsVersion::Tls12);
            doctor.connect(&agent(), false).await.expect("CONNACK");
            doctor.ping().await
        });
        broker.accept().await;
        assert_eq!(broker.recv().await, Packet::PingReq);
        let err = doctor.await.expect("task").expect_err("no PINGRESP");
        assert!(
            matches!(
                err,
                MqttError::TimedOut {
                    what: "PINGRESP",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_echo_is_acknowledged() {
        // The echo: PUBACK and the message back; the doctor acknowledges its own message.
        let (client, server) = duplex(4096);
        let mut broker = Broker::new(server);
        let payload = Bytes::from_static(b"echo 1");
        let echo = tokio::spawn(async move {
            let mut doctor = probe(client);
            doctor.connect(&agent(), false).await.expect("CONNACK");
            let result = doctor.echo("beckon-doctor/x", &payload).await;
            (result, doctor)
        });
        broker.accept().await;
        let Packet::Publish(p) = broker.recv().await else {
            panic!("PUBLISH");
        };
        let id = p.packet_id.expect("QoS 1");
        broker.send(Packet::PubAck(Ack::new(id))).await;
        broker
            .send(Packet::Publish(Publish {
                packet_id: Some(99),
                ..p
            }))
            .await;
        assert_eq!(broker.recv().await, Packet::PubAck(Ack::new(99)));
        let (result, _doctor) = echo.await.expect("task");
        let (code, _, back) = result.expect("echo");
        assert_eq!(code, ReasonCode::SUCCESS);
        assert!(back.is_some());
    }
}
