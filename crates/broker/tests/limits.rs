//! Limits through the real server on 127.0.0.1:0 (plain listener, anonymous clients): a
//! burst over the connect rate gets 0x9F; a client subscribing to 100,000 filters, one
//! announcing a 256 MB packet, a flood of retained messages and a client that never reads
//! each hit their limit, which the metrics count, and cost that one client only: another
//! client on the same broker is served all along. Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use beckon_broker::{BrokerConfig, Listen};
use beckon_mqtt::{
    Connect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe,
    Subscription, SubscriptionOptions, encode,
};
use beckon_testkit::RunningBroker;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{Client, WAIT, client_tls_config, http_get, publish_packet, subscribe_packet};

impl Client<TcpStream> {
    async fn open(addr: SocketAddr, version: ProtocolVersion) -> Self {
        let tcp = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        Self::new(tcp, version)
    }

    async fn connect(&mut self, id: &str) -> ReasonCode {
        self.send(&Packet::Connect(Box::new(Connect::new(
            self.version,
            id,
            60,
        ))))
        .await;
        match self.recv().await {
            Some(Packet::ConnAck(ack)) => ack.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_connect_burst_over_the_rate_gets_0x9f_and_connected_clients_are_still_served() {
    let mut broker = broker(|c| {
        c.limits.connect_rate = 2;
        c.limits.connect_burst = 5;
    })
    .await;
    let addr = broker.plain();

    let mut settled = Client::open(addr, ProtocolVersion::V5).await;
    assert_eq!(settled.connect("settled").await, ReasonCode::SUCCESS);

    let mut codes = Vec::new();
    for i in 0..20 {
        let version = if i % 2 == 0 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        };
        let mut c = Client::open(addr, version).await;
        codes.push((version, c.connect(&format!("burst-{i}")).await));
    }
    let refused: Vec<_> = codes
        .iter()
        .filter(|(_, c)| *c != ReasonCode::SUCCESS)
        .collect();
    assert!(
        refused.len() >= 10,
        "a burst of 20 over a burst allowance of 5 is mostly refused: {codes:?}"
    );
    for (version, code) in &refused {
        match version {
            ProtocolVersion::V5 => assert_eq!(*code, ReasonCode::CONNECTION_RATE_EXCEEDED),
            // v3.1.1 return code 3, server unavailable.
            ProtocolVersion::V311 => assert_eq!(*code, ReasonCode(3)),
        }
    }

    // The client connected before the burst is still served.
    settled.send(&Packet::PingReq).await;
    assert_eq!(settled.recv().await, Some(Packet::PingResp));

    // After a pause the rate admits connections again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut later = Client::open(addr, ProtocolVersion::V5).await;
    assert_eq!(later.connect("later").await, ReasonCode::SUCCESS);

    broker.stop().await;
}

/// A broker with the plain listener and the admin listener (for the metrics), anonymous
/// access and the limits `tweak` sets.
async fn broker(tweak: impl FnOnce(&mut BrokerConfig)) -> RunningBroker {
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = BrokerConfig {
        data_dir: dir.path().join("data"),
        allow_anonymous: true,
        ..BrokerConfig::default()
    };
    config.listeners.mqtts = Listen(None);
    config.listeners.mqtt = Listen(Some("127.0.0.1:0".parse().expect("addr")));
    config.listeners.admin = Listen(Some("127.0.0.1:0".parse().expect("addr")));
    tweak(&mut config);
    RunningBroker::start(config, dir).await
}

/// A connected v5 client.
async fn connected(broker: &RunningBroker, id: &str) -> Client<TcpStream> {
    let mut c = Client::open(broker.plain(), ProtocolVersion::V5).await;
    assert_eq!(c.connect(id).await, ReasonCode::SUCCESS);
    c
}

/// Waits until the metrics count `limit` reached at least once (core counters are copied
/// about once a second).
async fn limit_counted(broker: &RunningBroker, limit: &str) {
    let admin = broker.bound.admin.expect("admin listener");
    let line = format!("beckon_broker_limits_reached_total{{limit=\"{limit}\"}} ");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = http_get(admin, "/metrics").await;
        if text
            .lines()
            .any(|l| l.starts_with(&line) && !l.ends_with(" 0"))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{limit} never counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A bystander on the same broker: subscribed to its own topic, it publishes to it and
/// receives the message back.
async fn bystander_is_served(c: &mut Client<TcpStream>, topic: &str) {
    c.send(&subscribe_packet(7, &[topic], QoS::AtLeastOnce))
        .await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    c.send(&publish_packet(
        topic,
        QoS::AtMostOnce,
        0,
        Bytes::from_static(b"still here"),
    ))
    .await;
    match c.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"still here"),
        other => panic!("the bystander expected its message, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_subscribing_to_100000_filters_is_refused_beyond_the_quota_with_0x97() {
    // The default quota: 1000 filters per client.
    let mut broker = broker(|_| {}).await;
    let mut bystander = connected(&broker, "bystander").await;
    let mut greedy = connected(&broker, "greedy").await;
    let (mut granted, mut refused) = (0, 0);
    for packet in 0..100u16 {
        let subscriptions = (0..1000)
            .map(|i| Subscription {
                filter: format!("greedy/{packet}/{i}"),
                options: SubscriptionOptions::default(),
            })
            .collect();
        let subscribe = Subscribe {
            packet_id: packet + 1,
            subscriptions,
            properties: Properties::default(),
        };
        greedy.send(&Packet::Subscribe(subscribe)).await;
        let Some(Packet::SubAck(ack)) = greedy.recv().await else {
            panic!("no SUBACK for SUBSCRIBE {packet}");
        };
        for code in ack.codes {
            match code {
                ReasonCode::SUCCESS => granted += 1,
                ReasonCode::QUOTA_EXCEEDED => refused += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!((granted, refused), (1000, 99_000));
    // The greedy client keeps its connection and its first 1000 filters.
    greedy
        .send(&publish_packet(
            "greedy/0/5",
            QoS::AtMostOnce,
            0,
            Bytes::from_static(b"x"),
        ))
        .await;
    assert!(matches!(greedy.recv().await, Some(Packet::Publish(_))));
    bystander_is_served(&mut bystander, "bystander/subs").await;
    limit_counted(&broker, "max_subscriptions").await;
    broker.stop().await;
}

/// A fixed header announcing the largest packet MQTT allows (256 MB - 1), then a little.
fn announce_256_mb(packet_type: u8) -> Vec<u8> {
    let mut bytes = vec![packet_type, 0xFF, 0xFF, 0xFF, 0x7F];
    bytes.extend_from_slice(&[0u8; 1024]);
    bytes
}

#[tokio::test]
async fn a_packet_announcing_256_mb_is_refused_from_its_header_with_0x95() {
    let mut broker = broker(|_| {}).await;
    let mut bystander = connected(&broker, "bystander").await;

    // After CONNECT: DISCONNECT 0x95 Packet too large, then the close.
    let mut big = connected(&broker, "big").await;
    big.send_raw(&announce_256_mb(0x30)).await;
    match big.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, ReasonCode::PACKET_TOO_LARGE),
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }
    assert!(big.read_to_close().await.is_empty());

    // As the first packet, a CONNECT of 256 MB naming MQTT 5: CONNACK 0x95.
    let mut first = Client::open(broker.plain(), ProtocolVersion::V5).await;
    let mut connect = announce_256_mb(0x10);
    connect[5..12].copy_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 5]);
    first.send_raw(&connect).await;
    match first.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ReasonCode::PACKET_TOO_LARGE),
        other => panic!("expected CONNACK 0x95, got {other:?}"),
    }

    bystander_is_served(&mut bystander, "bystander/big").await;
    limit_counted(&broker, "max_packet_size").await;
    broker.stop().await;
}

/// A client's binary WebSocket frame header announcing `len` bytes, masked with a zero key
/// (so the payload goes as it is).
fn ws_frame_header(len: usize) -> Vec<u8> {
    let mut header = vec![0x82];
    match len {
        0..126 => header.push(0x80 | len as u8),
        126..65536 => {
            header.push(0x80 | 126);
            header.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            header.push(0x80 | 127);
            header.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    header.extend_from_slice(&[0; 4]);
    header
}

#[tokio::test]
async fn a_websocket_frame_announcing_more_than_twice_the_packet_size_ends_the_connection() {
    let mut broker = broker(|c| {
        c.listeners.fallback = Listen(Some("127.0.0.1:0".parse().expect("addr")));
    })
    .await;
    let mut bystander = connected(&broker, "bystander").await;
    let tcp = TcpStream::connect(broker.fallback())
        .await
        .expect("connect");
    let config = client_tls_config(&broker.generated_ca(), &[b"http/1.1"], None);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut ws = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("TLS in time")
        .expect("TLS");
    ws.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .await
    .expect("upgrade request");
    let mut connect = BytesMut::new();
    let packet = Packet::Connect(Box::new(Connect::new(ProtocolVersion::V5, "ws", 60)));
    encode(&packet, ProtocolVersion::V5, &mut connect).expect("encode");
    let mut frame = ws_frame_header(connect.len());
    frame.extend_from_slice(&connect);
    ws.write_all(&frame).await.expect("CONNECT");
    // The 101 answer, then the CONNACK in a frame.
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = ws.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before the CONNACK: {seen:?}");
            seen.extend_from_slice(&chunk[..n]);
            let head_end = seen.windows(4).position(|w| w == b"\r\n\r\n");
            if head_end.is_some_and(|end| seen.len() > end + 4) {
                break;
            }
        }
    })
    .await
    .expect("upgrade and CONNACK in time");
    assert!(
        seen.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&seen)
    );

    // 8 MiB announced with the maximum packet size at 1 MiB: closed from the frame header,
    // without waiting for the body.
    let mut big = ws_frame_header(8 << 20);
    big.extend_from_slice(&[0x30; 1024]);
    ws.write_all(&big).await.expect("frame header");
    let closed = tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = ws.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection is closed from the frame header"
    );
    bystander_is_served(&mut bystander, "bystander/ws").await;
    limit_counted(&broker, "max_packet_size").await;
    broker.stop().await;
}

fn retained_bytes(topic: &str, packet_id: u16) -> Vec<u8> {
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: topic.into(),
        packet_id: Some(packet_id),
        payload: Bytes::from(vec![b'r'; 100]),
        properties: Properties::default(),
    };
    let mut buf = BytesMut::new();
    encode(&Packet::Publish(publish), ProtocolVersion::V5, &mut buf).expect("encode");
    buf.to_vec()
}

#[tokio::test]
async fn a_flood_of_retained_messages_stops_at_the_quota_with_0x97() {
    let mut broker = broker(|c| c.limits.max_retained_messages = 500).await;
    let mut bystander = connected(&broker, "bystander").await;
    let mut flooder = connected(&broker, "flooder").await;
    // 2000 retained topics, in windows of the Receive Maximum (64).
    let (mut stored, mut refused) = (0, 0);
    for window in 0..2000u16 / 50 {
        let mut burst = Vec::new();
        for i in 1..=50 {
            let id = window * 50 + i;
            burst.extend(retained_bytes(&format!("flood/{id}"), id));
        }
        flooder.send_raw(&burst).await;
        for _ in 0..50 {
            match flooder.recv().await {
                Some(Packet::PubAck(a)) if a.code == ReasonCode::QUOTA_EXCEEDED => refused += 1,
                Some(Packet::PubAck(a)) if !a.code.is_error() => stored += 1,
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
    }
    assert_eq!((stored, refused), (500, 1500));
    // The broker kept 500: a subscriber to everything gets exactly those.
    let mut reader = connected(&broker, "reader").await;
    reader
        .send(&subscribe_packet(1, &["flood/#"], QoS::AtMostOnce))
        .await;
    assert!(matches!(reader.recv().await, Some(Packet::SubAck(_))));
    let mut received = 0;
    while let Some(Some(Packet::Publish(p))) = reader.recv_within(Duration::from_millis(500)).await
    {
        assert!(p.retain);
        received += 1;
    }
    assert_eq!(received, 500);
    // The flooder is still connected and may still publish without retaining.
    flooder.send(&Packet::PingReq).await;
    assert_eq!(flooder.recv().await, Some(Packet::PingResp));
    bystander_is_served(&mut bystander, "bystander/retained").await;
    limit_counted(&broker, "max_retained_messages").await;
    broker.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_at_the_outbound_cap() {
    let mut broker = broker(|c| {
        c.limits.max_outbound_packets = 100;
        c.limits.receive_maximum = 10_000;
        // A window wide enough for QoS 1 messages to back up in the outbound queue (the
        // default, 32, would hold them in the session instead).
        c.limits.max_inflight = 20_000;
    })
    .await;
    let mut bystander = connected(&broker, "bystander").await;
    let mut deaf = connected(&broker, "deaf").await;
    deaf.send(&subscribe_packet(1, &["deaf"], QoS::AtLeastOnce))
        .await;
    assert!(matches!(deaf.recv().await, Some(Packet::SubAck(_))));
    // 20 MB for a client that reads nothing: more than the socket buffers hold.
    let mut sender = connected(&broker, "sender").await;
    let payload = Bytes::from(vec![b'x'; 1024]);
    let mut flood = BytesMut::new();
    for i in 1..=20_000u16 {
        let packet = publish_packet("deaf", QoS::AtLeastOnce, i, payload.clone());
        encode(&packet, ProtocolVersion::V5, &mut flood).expect("encode");
    }
    sender.send_raw(&flood).await;
    // What the socket buffers held, then the close (within WAIT).
    deaf.read_to_close().await;
    // The sender got every acknowledgement.
    sender.send(&Packet::PingReq).await;
    let mut acks = 0;
    loop {
        match sender.recv().await {
            Some(Packet::PubAck(_)) => acks += 1,
            Some(Packet::PingResp) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acks, 20_000);
    bystander_is_served(&mut bystander, "bystander/slow").await;
    limit_counted(&broker, "max_outbound_packets").await;
    broker.stop().await;
}

#[tokio::test]
async fn qos0_messages_to_a_client_that_never_reads_are_dropped_and_counted() {
    let mut broker = broker(|c| c.limits.max_outbound_packets = 100).await;
    let mut bystander = connected(&broker, "bystander").await;
    let mut deaf = connected(&broker, "deaf").await;
    deaf.send(&subscribe_packet(1, &["deaf"], QoS::AtMostOnce))
        .await;
    assert!(matches!(deaf.recv().await, Some(Packet::SubAck(_))));
    // 20 MB at QoS 0 for a client that reads nothing: more than the socket buffers hold.
    let mut sender = connected(&broker, "sender").await;
    let payload = Bytes::from(vec![b'x'; 1024]);
    let mut flood = BytesMut::new();
    for _ in 0..20_000 {
        let packet = publish_packet("deaf", QoS::AtMostOnce, 0, payload.clone());
        encode(&packet, ProtocolVersion::V5, &mut flood).expect("encode");
    }
    sender.send_raw(&flood).await;
    sender.send(&Packet::PingReq).await;
    assert_eq!(sender.recv().await, Some(Packet::PingResp));

    let admin = broker.bound.admin.expect("admin listener");
    let counted = |text: &str, prefix: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let text = http_get(admin, "/metrics").await;
        if counted(&text, "beckon_broker_slow_consumer_dropped_total ") > 0 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no drop counted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Dropping QoS 0 is the whole penalty: the client is not closed as a slow consumer.
    assert!(
        !text.lines().any(|l| l
            .starts_with("beckon_broker_limits_reached_total{limit=\"max_outbound_packets\"}")
            && !l.ends_with(" 0")),
        "{text}"
    );
    bystander_is_served(&mut bystander, "bystander/qos0").await;
    broker.stop().await;
}
