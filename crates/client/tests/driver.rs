//! The tokio driver over an in-memory stream, on tokio's paused clock.

use std::time::Duration;

use beckon_client::{Connection, End, Event, Options, Session, message};
use beckon_mqtt::{
    Ack, ConnAck, Packet, Properties, PropertySet, ProtocolVersion, QoS, ReasonCode,
};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

/// The server's side of the stream.
struct Server {
    stream: DuplexStream,
    buf: BytesMut,
}

impl Server {
    async fn recv(&mut self) -> Packet {
        loop {
            if let Some(p) = beckon_mqtt::decode(&mut self.buf, ProtocolVersion::V5, u32::MAX)
                .expect("valid MQTT 5")
            {
                return p;
            }
            let n = self.stream.read_buf(&mut self.buf).await.expect("read");
            assert!(n > 0, "the client closed the stream");
        }
    }

    async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        beckon_mqtt::encode(&packet, ProtocolVersion::V5, &mut out).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    /// How many bytes arrive in one read (the writes the client batched).
    async fn read_chunk(&mut self) -> usize {
        self.buf.reserve(1 << 20);
        self.stream.read_buf(&mut self.buf).await.expect("read")
    }
}

fn pair(keep_alive: u64) -> (Connection<DuplexStream>, Server) {
    let (client, server) = duplex(1 << 20);
    let mut options = Options::new(ProtocolVersion::V5, "bench-1");
    options.keep_alive = Duration::from_secs(keep_alive);
    options.ping_timeout = Duration::from_secs(5);
    options.max_inflight = 1000;
    let session = Session::new(options, tokio::time::Instant::now().into_std());
    let connection = Connection::start(client, session);
    (
        connection,
        Server {
            stream: server,
            buf: BytesMut::new(),
        },
    )
}

async fn accept(server: &mut Server, properties: PropertySet) {
    assert!(matches!(server.recv().await, Packet::Connect(_)));
    server
        .send(Packet::ConnAck(ConnAck {
            properties: Properties::from(properties),
            ..ConnAck::default()
        }))
        .await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_pings_when_idle_and_an_answer_keeps_the_connection() {
    let (mut client, mut server) = pair(30);
    let driver = tokio::spawn(async move {
        let connected = client.next_event().await;
        let pong = client.next_event().await;
        (connected, pong, client)
    });
    accept(&mut server, PropertySet::default()).await;
    // Idle for the keep alive: PINGREQ.
    let before = tokio::time::Instant::now();
    assert_eq!(server.recv().await, Packet::PingReq);
    assert_eq!(before.elapsed(), Duration::from_secs(30));
    server.send(Packet::PingResp).await;
    let (connected, pong, mut client) = driver.await.expect("driver");
    assert!(matches!(connected, Ok(Event::Connected(_))));
    assert_eq!(pong, Ok(Event::Pong));
    // Answered: the next ping is a keep alive later, not a dead connection.
    let driver = tokio::spawn(async move { client.next_event().await });
    let before = tokio::time::Instant::now();
    assert_eq!(server.recv().await, Packet::PingReq);
    assert_eq!(before.elapsed(), Duration::from_secs(30));
    server.send(Packet::PingResp).await;
    assert_eq!(driver.await.expect("driver"), Ok(Event::Pong));
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_ping_ends_the_connection() {
    let (mut client, mut server) = pair(30);
    let driver = tokio::spawn(async move {
        let _ = client.next_event().await;
        let started = tokio::time::Instant::now();
        let end = client.next_event().await;
        (end, started.elapsed())
    });
    accept(&mut server, PropertySet::default()).await;
    assert_eq!(server.recv().await, Packet::PingReq);
    let (end, lived) = driver.await.expect("driver");
    assert_eq!(end, Err(End::PingTimeout));
    assert_eq!(lived, Duration::from_secs(35));
}

#[tokio::test(start_paused = true)]
async fn many_publishes_leave_in_one_write_within_the_servers_window() {
    let (mut client, mut server) = pair(0);
    let driver = tokio::spawn(async move {
        assert!(matches!(client.next_event().await, Ok(Event::Connected(s)) if s.window == 100));
        let now = tokio::time::Instant::now().into_std();
        for i in 0..300 {
            let wake = message(format!("agents/a{i}/wake"), QoS::AtLeastOnce, "{}");
            client.session_mut().publish(wake, now).expect("queued");
        }
        client.flush().await.expect("written");
        let mut acked = 0;
        while acked < 300 {
            match client.next_event().await {
                Ok(Event::Published { code, .. }) => {
                    assert_eq!(code, ReasonCode::SUCCESS);
                    acked += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        client
    });
    accept(
        &mut server,
        PropertySet {
            receive_maximum: Some(100),
            ..PropertySet::default()
        },
    )
    .await;
    // The first 100 (the server's Receive Maximum) come in one write, no more.
    let n = server.read_chunk().await;
    let mut ids = Vec::new();
    while let Some(p) =
        beckon_mqtt::decode(&mut server.buf, ProtocolVersion::V5, u32::MAX).expect("valid")
    {
        let Packet::Publish(p) = p else {
            panic!("PUBLISH");
        };
        ids.push(p.packet_id.expect("QoS 1"));
    }
    assert!(n > 100 * 20, "one write of {n} bytes");
    assert_eq!(ids.len(), 100);
    // Each PUBACK lets one more through until all 300 are acknowledged.
    let mut outstanding = ids;
    let mut done = 0;
    while done < 300 {
        let id = outstanding.remove(0);
        server.send(Packet::PubAck(Ack::new(id))).await;
        done += 1;
        if done <= 200 {
            let Packet::Publish(p) = server.recv().await else {
                panic!("PUBLISH");
            };
            outstanding.push(p.packet_id.expect("QoS 1"));
        }
    }
    let client = driver.await.expect("driver");
    assert_eq!(client.session().in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_server_disconnect_is_the_end_and_the_session_connects_again() {
    let (mut client, mut server) = pair(60);
    let driver = tokio::spawn(async move {
        let _ = client.next_event().await;
        let now = tokio::time::Instant::now().into_std();
        let id = client
            .session_mut()
            .publish(message("t", QoS::AtLeastOnce, "x"), now)
            .unwrap()
            .unwrap();
        let end = client.next_event().await;
        let (_, session) = client.into_parts();
        (id, end, session)
    });
    accept(&mut server, PropertySet::default()).await;
    let Packet::Publish(first) = server.recv().await else {
        panic!("PUBLISH");
    };
    server
        .send(Packet::Disconnect(beckon_mqtt::Disconnect {
            code: ReasonCode::SERVER_SHUTTING_DOWN,
            properties: Properties::default(),
        }))
        .await;
    let (id, end, session) = driver.await.expect("driver");
    assert_eq!(
        end,
        Err(End::Disconnected {
            code: ReasonCode::SERVER_SHUTTING_DOWN,
            reason: None,
            server_reference: None
        })
    );
    // A new stream: the unacknowledged message goes again with DUP.
    let (stream, server_side) = duplex(4096);
    let mut server = Server {
        stream: server_side,
        buf: BytesMut::new(),
    };
    let mut client = Connection::start(stream, session);
    let driver = tokio::spawn(async move {
        let event = client.next_event().await;
        // Events come before the writes they caused; flush sends the resent message.
        client.flush().await.expect("written");
        event
    });
    assert!(matches!(server.recv().await, Packet::Connect(_)));
    server
        .send(Packet::ConnAck(ConnAck {
            session_present: true,
            ..ConnAck::default()
        }))
        .await;
    let Packet::Publish(again) = server.recv().await else {
        panic!("PUBLISH");
    };
    assert_eq!(again.packet_id, Some(id));
    assert!(again.dup && !first.dup);
    assert!(matches!(driver.await.expect("driver"), Ok(Event::Connected(s)) if s.session_present));
}
