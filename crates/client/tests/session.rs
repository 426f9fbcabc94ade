//! The session driven with no I/O: packets and instants in, bytes and events out.

use std::time::{Duration, Instant};

use beckon_client::{End, Error, Event, Options, Session, VIA_PROXY_PROPERTY, message};
use beckon_mqtt::{
    Ack, ConnAck, Disconnect, Packet, Properties, PropertySet, ProtocolVersion, Publish, QoS,
    ReasonCode, SubAck, Subscription,
};
use bytes::{Bytes, BytesMut};

fn options() -> Options {
    let mut options = Options::new(ProtocolVersion::V5, "laptop-42");
    options.clean_start = false;
    options.session_expiry = 3600;
    options.keep_alive = Duration::from_secs(30);
    options.ping_timeout = Duration::from_secs(5);
    options
}

/// Every packet the session queued, as the server decodes them.
fn sent(session: &mut Session) -> Vec<Packet> {
    let mut bytes = session.take_transmit();
    let mut packets = Vec::new();
    while let Some(p) = beckon_mqtt::decode(&mut bytes, ProtocolVersion::V5, u32::MAX)
        .expect("the session sends valid MQTT 5")
    {
        packets.push(p);
    }
    assert!(bytes.is_empty(), "a partial packet was queued");
    packets
}

fn events(session: &mut Session) -> Vec<Event> {
    std::iter::from_fn(|| session.poll_event()).collect()
}

fn connack(session_present: bool, properties: PropertySet) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        code: ReasonCode::SUCCESS,
        properties: Properties::from(properties),
    })
}

/// A session connected with `properties` in the CONNACK; the CONNECT is checked and dropped.
fn connected(options: Options, properties: PropertySet, t0: Instant) -> Session {
    let mut session = Session::new(options, t0);
    session.connect(t0);
    assert!(matches!(sent(&mut session)[..], [Packet::Connect(_)]));
    session.handle(connack(false, properties), t0);
    assert!(matches!(events(&mut session)[..], [Event::Connected(_)]));
    session
}

fn wake_subscription() -> Subscription {
    Subscription::new("agents/laptop-42/wake", QoS::AtLeastOnce)
}

/// A connected session subscribed to [`wake_subscription`].
fn subscribed_to_wake(t0: Instant) -> Session {
    let mut session = connected(options(), PropertySet::default(), t0);
    session
        .subscribe(vec![wake_subscription()], t0)
        .expect("subscribe");
    session
}

/// Publishes `payload` to `t` at `qos` (1 or 2); its packet id.
fn publish_on_t(session: &mut Session, qos: QoS, payload: &'static str, now: Instant) -> u16 {
    session
        .publish(message("t", qos, payload), now)
        .expect("queued")
        .expect("QoS 1 or 2 gets a packet id")
}

fn publish_ids(packets: &[Packet]) -> Vec<(u16, bool)> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some((p.packet_id.expect("QoS 1"), p.dup)),
            _ => None,
        })
        .collect()
}

#[test]
fn connect_carries_beckons_properties() {
    let t0 = Instant::now();
    let mut options = options();
    options.username = Some("laptop-42".into());
    options.password = Some(Bytes::from_static(b"token"));
    options.set_via_proxy(true);
    options.set_via_proxy(true);
    let mut session = Session::new(options, t0);
    session.connect(t0);
    let [Packet::Connect(connect)] = &sent(&mut session)[..] else {
        panic!("CONNECT alone");
    };
    assert!(!connect.clean_start);
    assert_eq!(connect.keep_alive, 30);
    assert_eq!(connect.client_id, "laptop-42");
    assert_eq!(connect.password.as_deref(), Some(&b"token"[..]));
    assert_eq!(connect.properties.session_expiry_interval, Some(3600));
    assert_eq!(connect.properties.receive_maximum, Some(16));
    assert_eq!(connect.properties.maximum_packet_size, Some(1024 * 1024));
    assert_eq!(
        connect.properties.user_properties,
        vec![(VIA_PROXY_PROPERTY.to_owned(), "true".to_owned())],
        "set twice, said once"
    );
}

#[test]
fn connack_settles_the_servers_keep_alive_and_window() {
    let t0 = Instant::now();
    let mut session = Session::new(options(), t0);
    session.connect(t0);
    sent(&mut session);
    session.handle(
        connack(
            true,
            PropertySet {
                server_keep_alive: Some(120),
                receive_maximum: Some(4),
                reason_string: Some("welcome".into()),
                ..PropertySet::default()
            },
        ),
        t0,
    );
    let [Event::Connected(settled)] = &events(&mut session)[..] else {
        panic!("Connected");
    };
    assert!(settled.session_present);
    assert_eq!(settled.keep_alive, Duration::from_secs(120));
    assert_eq!(settled.window, 4);
    assert_eq!(settled.reason.as_deref(), Some("welcome"));
    assert_eq!(session.poll_timeout(), Some(t0 + Duration::from_secs(120)));
}

#[test]
fn keep_alive_pings_when_idle_and_a_missing_pingresp_ends_the_session() {
    let t0 = Instant::now();
    let mut session = connected(options(), PropertySet::default(), t0);
    let due = t0 + Duration::from_secs(30);
    assert_eq!(session.poll_timeout(), Some(due));
    // Sending something moves the ping back.
    let t1 = t0 + Duration::from_secs(10);
    session
        .publish(message("agents/laptop-42/ack", QoS::AtMostOnce, "{}"), t1)
        .expect("QoS 0");
    sent(&mut session);
    session.handle_timeout(due);
    assert!(sent(&mut session).is_empty(), "not idle for 30 s yet");
    let due = t1 + Duration::from_secs(30);
    assert_eq!(session.poll_timeout(), Some(due));
    session.handle_timeout(due);
    assert_eq!(sent(&mut session), vec![Packet::PingReq]);
    // PINGRESP in time: the next ping is a keep alive later.
    session.handle(Packet::PingResp, due + Duration::from_secs(1));
    assert_eq!(events(&mut session), vec![Event::Pong]);
    let next = due + Duration::from_secs(30);
    assert_eq!(session.poll_timeout(), Some(next));
    session.handle_timeout(next);
    assert_eq!(sent(&mut session), vec![Packet::PingReq]);
    // No PINGRESP within the ping timeout: dead.
    assert_eq!(session.poll_timeout(), Some(next + Duration::from_secs(5)));
    session.handle_timeout(next + Duration::from_secs(4));
    assert!(session.end().is_none());
    session.handle_timeout(next + Duration::from_secs(5));
    assert_eq!(session.end(), Some(&End::PingTimeout));
    assert!(!session.is_connected());
    assert_eq!(session.poll_timeout(), None);
}

#[test]
fn no_connack_in_time_ends_the_attempt() {
    let t0 = Instant::now();
    let mut session = Session::new(options(), t0);
    session.connect(t0);
    assert_eq!(session.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    session.handle_timeout(t0 + Duration::from_secs(10));
    assert_eq!(session.end(), Some(&End::ConnectTimeout));
}

#[test]
fn window_follows_the_servers_receive_maximum() {
    let t0 = Instant::now();
    let mut options = options();
    options.max_inflight = 1000;
    let mut session = connected(
        options,
        PropertySet {
            receive_maximum: Some(2),
            ..PropertySet::default()
        },
        t0,
    );
    let ids: Vec<u16> = (0..5)
        .map(|i| {
            session
                .publish(message("t", QoS::AtLeastOnce, format!("{i}")), t0)
                .expect("queued")
                .expect("QoS 1 id")
        })
        .collect();
    assert_eq!(
        publish_ids(&sent(&mut session)),
        vec![(ids[0], false), (ids[1], false)]
    );
    assert_eq!((session.in_flight(), session.queued()), (2, 3));
    // A PUBACK frees one slot: exactly one more goes out, in order.
    session.handle(Packet::PubAck(Ack::new(ids[1])), t0);
    assert_eq!(publish_ids(&sent(&mut session)), vec![(ids[2], false)]);
    assert_eq!(
        events(&mut session),
        vec![Event::Published {
            packet_id: ids[1],
            code: ReasonCode::SUCCESS,
            reason: None
        }]
    );
    // The local cap wins when it is lower.
    let mut capped = options_with_cap(1);
    capped
        .publish(message("t", QoS::AtLeastOnce, "a"), t0)
        .unwrap();
    capped
        .publish(message("t", QoS::AtLeastOnce, "b"), t0)
        .unwrap();
    assert_eq!(publish_ids(&sent(&mut capped)).len(), 1);
}

fn options_with_cap(cap: usize) -> Session {
    let mut options = options();
    options.max_inflight = cap;
    connected(options, PropertySet::default(), Instant::now())
}

#[test]
fn reconnect_with_session_present_resends_with_dup_and_keeps_subscriptions() {
    let t0 = Instant::now();
    let mut session = subscribed_to_wake(t0);
    let a = publish_on_t(&mut session, QoS::AtLeastOnce, "a", t0);
    let b = publish_on_t(&mut session, QoS::AtLeastOnce, "b", t0);
    let c = publish_on_t(&mut session, QoS::ExactlyOnce, "c", t0);
    sent(&mut session);
    session.handle(Packet::PubAck(Ack::new(a)), t0);
    session.handle(Packet::PubRec(Ack::new(c)), t0);
    assert_eq!(sent(&mut session), vec![Packet::PubRel(Ack::new(c))]);
    session.connection_lost(End::Closed);
    assert_eq!(session.end(), Some(&End::Closed));

    session.connect(t0);
    session.handle(connack(true, PropertySet::default()), t0);
    let packets = sent(&mut session);
    assert!(matches!(packets[0], Packet::Connect(_)));
    // b again with DUP and its id, c's release again; no SUBSCRIBE: the server kept it.
    assert_eq!(publish_ids(&packets), vec![(b, true)]);
    assert!(packets.contains(&Packet::PubRel(Ack::new(c))));
    assert!(!packets.iter().any(|p| matches!(p, Packet::Subscribe(_))));
    session.handle(Packet::PubComp(Ack::new(c)), t0);
    assert!(events(&mut session).contains(&Event::Published {
        packet_id: c,
        code: ReasonCode::SUCCESS,
        reason: None
    }));
}

#[test]
fn reconnect_without_session_subscribes_again_and_resends() {
    let t0 = Instant::now();
    let mut session = subscribed_to_wake(t0);
    let a = publish_on_t(&mut session, QoS::AtLeastOnce, "a", t0);
    sent(&mut session);
    session.connection_lost(End::Io(
        std::io::Error::from(std::io::ErrorKind::ConnectionReset).into(),
    ));

    session.connect(t0);
    session.handle(connack(false, PropertySet::default()), t0);
    let packets = sent(&mut session);
    let subscribes: Vec<_> = packets
        .iter()
        .filter_map(|p| match p {
            Packet::Subscribe(s) => Some(s.subscriptions.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(subscribes, vec![vec![wake_subscription()]]);
    // The server lost the message with the session: sent again, DUP (it may have passed it
    // on before it lost the session).
    assert_eq!(publish_ids(&packets), vec![(a, true)]);
}

#[test]
fn a_subscription_sent_behind_connect_is_not_sent_twice() {
    let t0 = Instant::now();
    let mut session = Session::new(options(), t0);
    session.connect(t0);
    let id = session
        .subscribe(vec![wake_subscription()], t0)
        .expect("pipelined");
    session.handle(connack(false, PropertySet::default()), t0);
    let packets = sent(&mut session);
    assert_eq!(
        packets
            .iter()
            .filter(|p| matches!(p, Packet::Subscribe(_)))
            .count(),
        1
    );
    session.handle(
        Packet::SubAck(SubAck {
            packet_id: id,
            codes: vec![ReasonCode::GRANTED_QOS_1],
            properties: Properties::default(),
        }),
        t0,
    );
    assert!(events(&mut session).contains(&Event::Subscribed {
        packet_id: id,
        codes: vec![ReasonCode::GRANTED_QOS_1],
        reason: None
    }));
}

fn incoming(qos: QoS, id: u16, dup: bool) -> Packet {
    Packet::Publish(Publish {
        dup,
        qos,
        retain: false,
        topic: "agents/laptop-42/wake".into(),
        packet_id: Some(id),
        payload: Bytes::from_static(b"{}"),
        properties: Properties::default(),
    })
}

#[test]
fn qos_2_both_ways() {
    let t0 = Instant::now();
    let mut session = connected(options(), PropertySet::default(), t0);
    // Incoming: handed over once, PUBREC, a DUP before PUBREL is not handed over again.
    session.handle(incoming(QoS::ExactlyOnce, 7, false), t0);
    assert_eq!(sent(&mut session), vec![Packet::PubRec(Ack::new(7))]);
    assert_eq!(events(&mut session).len(), 1);
    session.handle(incoming(QoS::ExactlyOnce, 7, true), t0);
    assert_eq!(sent(&mut session), vec![Packet::PubRec(Ack::new(7))]);
    assert!(
        events(&mut session).is_empty(),
        "a duplicate is not a new message"
    );
    session.handle(Packet::PubRel(Ack::new(7)), t0);
    assert_eq!(sent(&mut session), vec![Packet::PubComp(Ack::new(7))]);
    // After PUBREL the id is free: the same id is a new message.
    session.handle(incoming(QoS::ExactlyOnce, 7, false), t0);
    assert_eq!(events(&mut session).len(), 1);
    sent(&mut session);

    // Outgoing: PUBLISH, PUBREC -> PUBREL, PUBCOMP -> published.
    let id = publish_on_t(&mut session, QoS::ExactlyOnce, "x", t0);
    assert_eq!(publish_ids(&sent(&mut session)), vec![(id, false)]);
    session.handle(Packet::PubRec(Ack::new(id)), t0);
    assert_eq!(sent(&mut session), vec![Packet::PubRel(Ack::new(id))]);
    assert!(events(&mut session).is_empty());
    // A PUBACK is not how QoS 2 ends.
    session.handle(Packet::PubAck(Ack::new(id)), t0);
    assert!(events(&mut session).is_empty());
    session.handle(Packet::PubComp(Ack::new(id)), t0);
    assert_eq!(
        events(&mut session),
        vec![Event::Published {
            packet_id: id,
            code: ReasonCode::SUCCESS,
            reason: None
        }]
    );
    assert_eq!(session.in_flight(), 0);
}

#[test]
fn qos_1_incoming_is_acknowledged_or_left_to_the_caller() {
    let t0 = Instant::now();
    let mut session = connected(options(), PropertySet::default(), t0);
    session.handle(incoming(QoS::AtLeastOnce, 3, false), t0);
    assert_eq!(sent(&mut session), vec![Packet::PubAck(Ack::new(3))]);
    assert!(matches!(events(&mut session)[..], [Event::Message(_)]));

    let mut options = options();
    options.auto_ack = false;
    let mut probe = connected(options, PropertySet::default(), t0);
    probe.handle(incoming(QoS::AtLeastOnce, 3, false), t0);
    probe.handle(incoming(QoS::AtLeastOnce, 4, false), t0);
    assert!(sent(&mut probe).is_empty(), "nothing acknowledged unasked");
    probe.acknowledge(4, t0).expect("connected");
    assert_eq!(sent(&mut probe), vec![Packet::PubAck(Ack::new(4))]);
}

#[test]
fn refusal_and_server_disconnect_say_why() {
    let t0 = Instant::now();
    let mut session = Session::new(options(), t0);
    session.connect(t0);
    session.handle(
        Packet::ConnAck(ConnAck {
            session_present: false,
            code: ReasonCode::USE_ANOTHER_SERVER,
            properties: Properties::from(PropertySet {
                reason_string: Some("draining".into()),
                server_reference: Some("b2.example:8883".into()),
                ..PropertySet::default()
            }),
        }),
        t0,
    );
    let end = End::Refused {
        code: ReasonCode::USE_ANOTHER_SERVER,
        reason: Some("draining".into()),
        server_reference: Some("b2.example:8883".into()),
    };
    assert_eq!(session.end(), Some(&end));
    assert!(
        end.to_string()
            .contains("0x9C (draining), server reference b2.example:8883")
    );
    assert!(events(&mut session).is_empty());

    let mut session = connected(options(), PropertySet::default(), t0);
    session.handle(
        Packet::Disconnect(Disconnect {
            code: ReasonCode::SESSION_TAKEN_OVER,
            properties: Properties::from(PropertySet {
                reason_string: Some("another connection".into()),
                ..PropertySet::default()
            }),
        }),
        t0,
    );
    assert_eq!(
        session.end(),
        Some(&End::Disconnected {
            code: ReasonCode::SESSION_TAKEN_OVER,
            reason: Some("another connection".into()),
            server_reference: None
        })
    );
    assert_eq!(
        session.publish(message("t", QoS::AtMostOnce, "x"), t0),
        Err(Error::NotConnected)
    );
}

#[test]
fn malformed_and_unexpected_packets_end_the_session_with_the_right_code() {
    let t0 = Instant::now();
    // Packet type 0 is reserved: malformed (0x81).
    let mut session = connected(options(), PropertySet::default(), t0);
    session.receive(&mut BytesMut::from(&[0x00, 0x00][..]), t0);
    assert!(matches!(session.end(), Some(End::Protocol(m)) if m.contains("malformed")));
    let Packet::Disconnect(d) = &sent(&mut session)[0] else {
        panic!("DISCONNECT");
    };
    assert_eq!(d.code, ReasonCode::MALFORMED_PACKET);

    // A SUBSCRIBE is never sent to a client: protocol error (0x82).
    let mut session = connected(options(), PropertySet::default(), t0);
    let mut bytes = BytesMut::new();
    beckon_mqtt::encode(
        &Packet::Subscribe(beckon_mqtt::Subscribe {
            packet_id: 1,
            subscriptions: vec![wake_subscription()],
            properties: Properties::default(),
        }),
        ProtocolVersion::V5,
        &mut bytes,
    )
    .unwrap();
    session.receive(&mut bytes, t0);
    assert!(matches!(session.end(), Some(End::Protocol(m)) if m.contains("packet type 8")));
    assert!(
        matches!(&sent(&mut session)[..], [Packet::Disconnect(d)] if d.code == ReasonCode::PROTOCOL_ERROR)
    );

    // Anything but CONNACK first: protocol error.
    let mut session = Session::new(options(), t0);
    session.connect(t0);
    sent(&mut session);
    session.handle(incoming(QoS::AtLeastOnce, 1, false), t0);
    assert!(matches!(session.end(), Some(End::Protocol(m)) if m.contains("before CONNACK")));

    // A server speaking only MQTT 3.1.1 answers with a four-byte CONNACK.
    let mut session = Session::new(options(), t0);
    session.connect(t0);
    session.receive(&mut BytesMut::from(&[0x20, 0x02, 0x00, 0x01][..]), t0);
    assert_eq!(session.end(), Some(&End::OldProtocol { return_code: 1 }));
}

#[test]
fn mqtt_3_connects_without_properties() {
    let t0 = Instant::now();
    let mut options = Options::new(ProtocolVersion::V311, "bench-1");
    options.set_via_proxy(false);
    let mut session = Session::new(options, t0);
    session.connect(t0);
    let mut bytes = session.take_transmit();
    let Some(Packet::Connect(connect)) =
        beckon_mqtt::decode(&mut bytes, ProtocolVersion::V311, u32::MAX).unwrap()
    else {
        panic!("CONNECT");
    };
    assert_eq!(connect.protocol, ProtocolVersion::V311);
    assert!(connect.properties.is_empty());
    // A v3.1.1 refusal (return code 5, not authorized) ends it.
    session.receive(&mut BytesMut::from(&[0x20, 0x02, 0x00, 0x05][..]), t0);
    assert!(matches!(session.end(), Some(End::Refused { code, .. }) if code.0 == 5));
}
