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
//! A named client's session is resumed, not cleaned (clean start off, the agent's session
//! expiry), so the wake-ups queued for the agent stay queued: the doctor never acknowledges a
//! message that is not its own echo, and the broker delivers them again to the agent.

use std::time::{Duration, Instant};

use beckon_mqtt::{
    Connect, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe,
    Subscription, SubscriptionOptions, Unsubscribe,
};
use beckon_net::{TlsError, TlsVersion};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest packet the doctor accepts from the broker.
const MAX_PACKET: u32 = 1024 * 1024;

/// Keepalive announced in CONNECT (the agent's value on fragile paths).
const KEEP_ALIVE_SECS: u16 = 30;

/// Who the doctor connects as.
#[derive(Debug, Clone)]
pub(crate) struct MqttIdentity {
    pub client_id: String,
    /// True for an id given by the operator or an agent's config: resume its session.
    pub named: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub session_expiry: Duration,
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
        source: std::io::Error,
    },
    /// The broker sent bytes that are not MQTT 5.
    #[error("the broker's answer is not valid MQTT 5 ({0})")]
    Decode(beckon_mqtt::DecodeError),
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
        source: beckon_mqtt::EncodeError,
    },
}

/// An MQTT 5 connection to the broker over any stream.
pub(crate) struct MqttProbe<S> {
    stream: S,
    buf: BytesMut,
    timeout: Duration,
    server: String,
    min_tls: TlsVersion,
    next_packet_id: u16,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MqttProbe<S> {
    pub fn new(stream: S, timeout: Duration, server: &str, min_tls: TlsVersion) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(4096),
            timeout,
            server: server.to_owned(),
            min_tls,
            next_packet_id: 1,
        }
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_packet_id;
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        id
    }

    async fn send(&mut self, packet: Packet, what: &'static str) -> Result<(), MqttError> {
        let mut out = BytesMut::new();
        beckon_mqtt::encode(&packet, ProtocolVersion::V5, &mut out)
            .map_err(|source| MqttError::Encode { what, source })?;
        let write = async {
            self.stream.write_all(&out).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Err(_) => Err(MqttError::TimedOut {
                what,
                after: self.timeout,
            }),
            Ok(Err(e)) => Err(self.io_error(what, e)),
            Ok(Ok(())) => Ok(()),
        }
    }

    fn io_error(&self, what: &'static str, error: std::io::Error) -> MqttError {
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

    /// The next packet, waiting until `deadline`.
    async fn recv(&mut self, what: &'static str, deadline: Instant) -> Result<Packet, MqttError> {
        loop {
            if let Some(packet) =
                beckon_mqtt::decode(&mut self.buf, ProtocolVersion::V5, MAX_PACKET)
                    .map_err(MqttError::Decode)?
            {
                if let Packet::Disconnect(d) = &packet {
                    return Err(MqttError::Disconnected(
                        d.code,
                        d.properties.reason_string.clone(),
                    ));
                }
                return Ok(packet);
            }
            self.read_more(what, deadline).await?;
        }
    }

    /// Reads what the broker sent next into the buffer, waiting until `deadline`.
    async fn read_more(&mut self, what: &'static str, deadline: Instant) -> Result<(), MqttError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
            Err(_) => Err(MqttError::TimedOut {
                what,
                after: self.timeout,
            }),
            Ok(Err(e)) => Err(self.io_error(what, e)),
            Ok(Ok(0)) => Err(MqttError::Closed { what }),
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
        }
    }

    /// Waits for a packet that `want` accepts; PUBLISHes that are not the doctor's are left
    /// unacknowledged (they belong to the agent's session), anything else is ignored.
    async fn wait_for<T>(
        &mut self,
        what: &'static str,
        mut want: impl FnMut(&Packet) -> Option<T>,
    ) -> Result<T, MqttError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let packet = self.recv(what, deadline).await?;
            if let Some(found) = want(&packet) {
                return Ok(found);
            }
            tracing::debug!(
                packet = packet.packet_type(),
                "packet ignored by the doctor"
            );
        }
    }

    /// Sends CONNECT and returns the CONNACK.
    pub async fn connect(
        &mut self,
        identity: &MqttIdentity,
    ) -> Result<beckon_mqtt::ConnAck, MqttError> {
        let properties = Properties::from(beckon_mqtt::PropertySet {
            session_expiry_interval: identity
                .named
                .then(|| u32::try_from(identity.session_expiry.as_secs()).unwrap_or(u32::MAX)),
            request_problem_information: Some(1),
            maximum_packet_size: Some(MAX_PACKET),
            ..Default::default()
        });
        let connect = Connect {
            clean_start: !identity.named,
            username: identity.username.clone(),
            password: identity.password.clone().map(Bytes::from),
            properties,
            ..Connect::new(
                ProtocolVersion::V5,
                identity.client_id.clone(),
                KEEP_ALIVE_SECS,
            )
        };
        self.send(Packet::Connect(Box::new(connect)), "CONNACK")
            .await?;
        // A broker that speaks only MQTT 3.1.1 answers a v5 CONNECT with a four-byte v3.1.1
        // CONNACK (remaining length 2; a v5 CONNACK has at least 3): return code 1,
        // unacceptable protocol version. Every CONNACK is at least four bytes long.
        let deadline = Instant::now() + self.timeout;
        while self.buf.len() < 4 {
            self.read_more("CONNACK", deadline).await?;
        }
        if self.buf[0] == 0x20 && self.buf[1] == 0x02 {
            return Err(MqttError::V311(self.buf[3]));
        }
        self.wait_for("CONNACK", |p| match p {
            Packet::ConnAck(ack) => Some(ack.clone()),
            _ => None,
        })
        .await
    }

    /// PINGREQ -> PINGRESP; returns the round-trip time.
    pub async fn ping(&mut self) -> Result<Duration, MqttError> {
        let started = Instant::now();
        self.send(Packet::PingReq, "PINGRESP").await?;
        self.wait_for("PINGRESP", |p| matches!(p, Packet::PingResp).then_some(()))
            .await?;
        Ok(started.elapsed())
    }

    /// SUBSCRIBE at QoS 1; returns the SUBACK's code and reason string.
    pub async fn subscribe(
        &mut self,
        topic: &str,
    ) -> Result<(ReasonCode, Option<String>), MqttError> {
        let packet_id = self.packet_id();
        let subscribe = Subscribe {
            packet_id,
            subscriptions: vec![Subscription {
                filter: topic.to_owned(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
            }],
            properties: Properties::default(),
        };
        self.send(Packet::Subscribe(subscribe), "SUBACK").await?;
        self.wait_for("SUBACK", |p| match p {
            Packet::SubAck(ack) if ack.packet_id == packet_id => Some((
                ack.codes
                    .first()
                    .copied()
                    .unwrap_or(ReasonCode::UNSPECIFIED_ERROR),
                ack.properties.reason_string.clone(),
            )),
            _ => None,
        })
        .await
    }

    /// UNSUBSCRIBE, waiting for UNSUBACK.
    pub async fn unsubscribe(&mut self, topic: &str) -> Result<(), MqttError> {
        let packet_id = self.packet_id();
        let unsubscribe = Unsubscribe {
            packet_id,
            filters: vec![topic.to_owned()],
            properties: Properties::default(),
        };
        self.send(Packet::Unsubscribe(unsubscribe), "UNSUBACK")
            .await?;
        self.wait_for("UNSUBACK", |p| {
            matches!(p, Packet::UnsubAck(a) if a.packet_id == packet_id).then_some(())
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
        let packet_id = self.packet_id();
        let started = Instant::now();
        let publish = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.to_owned(),
            packet_id: Some(packet_id),
            payload: payload.clone(),
            properties: Properties::from(beckon_mqtt::PropertySet {
                message_expiry_interval: Some(60),
                ..Default::default()
            }),
        };
        self.send(Packet::Publish(publish), "PUBACK").await?;
        let mut puback: Option<(ReasonCode, Option<String>)> = None;
        let mut back: Option<(Duration, Option<u16>)> = None;
        let deadline = Instant::now() + self.timeout;
        while puback.is_none() || back.is_none() {
            // A refused message, or one the broker says nobody receives, will not come back.
            if let Some((code, _)) = &puback
                && (code.is_error() || *code == ReasonCode::NO_MATCHING_SUBSCRIBERS)
            {
                break;
            }
            let packet = self.recv("the echoed message", deadline).await?;
            match packet {
                Packet::PubAck(ack) if ack.packet_id == packet_id => {
                    puback = Some((ack.code, ack.properties.reason_string.clone()));
                }
                Packet::Publish(p) if p.topic == topic && p.payload == *payload => {
                    back = Some((started.elapsed(), p.packet_id));
                }
                other => {
                    tracing::debug!(packet = other.packet_type(), "packet ignored by the doctor");
                }
            }
        }
        // Acknowledge the doctor's own message only.
        if let Some((_, Some(id))) = back {
            self.send(Packet::PubAck(beckon_mqtt::Ack::new(id)), "PUBACK")
                .await?;
        }
        let (code, reason) = puback.unwrap_or((ReasonCode::SUCCESS, None));
        Ok((code, reason, back.map(|(t, _)| t)))
    }

    /// Sends DISCONNECT (normal) and closes the stream; errors are of no interest here.
    pub async fn disconnect(mut self) {
        let _ = self
            .send(Packet::Disconnect(Disconnect::default()), "DISCONNECT")
            .await;
        let _ = tokio::time::timeout(self.timeout, self.stream.shutdown()).await;
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
    use beckon_mqtt::{Ack, ConnAck};
    use tokio::io::{DuplexStream, duplex};

    const T: Duration = Duration::from_secs(5);

    fn probe(client: DuplexStream) -> MqttProbe<DuplexStream> {
        MqttProbe::new(client, T, "broker.example", TlsVersion::Tls12)
    }

    fn agent() -> MqttIdentity {
        MqttIdentity {
            client_id: "laptop-42".into(),
            named: true,
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
        async fn recv(&mut self) -> Packet {
            loop {
                if let Some(p) = beckon_mqtt::decode(&mut self.buf, ProtocolVersion::V5, MAX_PACKET)
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
    }

    #[tokio::test]
    async fn an_agent_session_is_resumed_and_its_wake_ups_left_alone() {
        let (client, server) = duplex(64 * 1024);
        let mut broker = Broker {
            stream: server,
            buf: BytesMut::new(),
        };
        let doctor = tokio::spawn(async move {
            let mut probe = probe(client);
            let ack = probe.connect(&agent()).await.expect("CONNACK");
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
    async fn a_broker_that_speaks_only_mqtt_3_is_named() {
        let (client, mut server) = duplex(4096);
        let doctor = tokio::spawn(async move { probe(client).connect(&agent()).await });
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
    async fn a_silent_broker_times_out_and_an_echo_is_acknowledged() {
        let (client, server) = duplex(4096);
        let mut doctor = MqttProbe::new(client, Duration::from_millis(200), "b", TlsVersion::Tls12);
        let err = doctor.ping().await.expect_err("no PINGRESP");
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

        // The echo: PUBACK and the message back; the doctor acknowledges its own message.
        let mut broker = Broker {
            stream: server,
            buf: BytesMut::new(),
        };
        assert_eq!(broker.recv().await, Packet::PingReq);
        let mut doctor = MqttProbe::new(doctor.stream, T, "b", TlsVersion::Tls12);
        let payload = Bytes::from_static(b"echo 1");
        let echo = tokio::spawn(async move {
            let result = doctor.echo("beckon-doctor/x", &payload).await;
            (result, doctor)
        });
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
