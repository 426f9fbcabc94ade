//! The console honours the broker's Receive Maximum: a call to more agents than the broker
//! allows in flight waits for PUBACKs instead of overrunning it (a broker would disconnect
//! with 0x93). The broker here is a scripted peer on loopback.

mod common;

use std::time::Duration;

use beckon_console::{BrokerLink, ConsoleConfig};
use beckon_mqtt::{ConnAck, Packet, Properties, ReasonCode, SubAck};
use common::{Peer, WAIT};
use serde_json::json;

/// A console (configured further by `configure`) whose broker is a scripted peer on
/// loopback, connected: its CONNACK has `connack` properties, its SUBACK grants every
/// subscription, and the console's barrier after connecting is answered as a broker does.
async fn console_with_scripted_broker(
    connack: Properties,
    configure: impl FnOnce(&mut ConsoleConfig),
) -> (common::Api, Peer) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let api = common::start_with(|c| {
        c.broker = BrokerLink::Anonymous {
            address: format!("127.0.0.1:{port}"),
        };
        configure(c);
    })
    .await;
    let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut broker = Peer::new(tcp);
    assert!(matches!(broker.recv().await, Packet::Connect(_)));
    broker
        .send(Packet::ConnAck(ConnAck {
            session_present: false,
            code: ReasonCode::SUCCESS,
            properties: connack,
        }))
        .await;
    let Packet::Subscribe(sub) = broker.recv().await else {
        panic!("expected SUBSCRIBE")
    };
    broker
        .send(Packet::SubAck(SubAck {
            packet_id: sub.packet_id,
            codes: vec![ReasonCode(1); sub.subscriptions.len()],
            properties: Properties::default(),
        }))
        .await;
    assert!(matches!(broker.recv().await, Packet::PingReq));
    broker.send(Packet::PingResp).await;
    (api, broker)
}

#[tokio::test]
async fn a_large_call_never_has_more_publishes_in_flight_than_the_broker_allows() {
    let (api, mut broker) = console_with_scripted_broker(
        Properties::from(beckon_mqtt::PropertySet {
            receive_maximum: Some(2),
            ..Default::default()
        }),
        |_| {},
    )
    .await;

    for i in 0..6 {
        api.enroll(&format!("pc-{i}"), json!({})).await;
    }
    let (_, call) = api
        .create_call(json!({"target": "all", "reason": "many"}))
        .await;
    assert_eq!(call["agents"], 6);

    let mut unacked: Vec<u16> = Vec::new();
    let mut most_in_flight = 0;
    let mut received = 0;
    while received < 6 {
        match broker.recv_within(Duration::from_millis(300)).await {
            Some(Packet::Publish(p)) => {
                received += 1;
                unacked.push(p.packet_id.unwrap());
                most_in_flight = most_in_flight.max(unacked.len());
            }
            Some(_) => {}
            None => {
                // The console is waiting: release one.
                assert!(
                    !unacked.is_empty(),
                    "the console stopped with nothing in flight"
                );
                let id = unacked.remove(0);
                broker.send(Packet::PubAck(beckon_mqtt::Ack::new(id))).await;
            }
        }
    }
    for id in unacked.drain(..) {
        broker.send(Packet::PubAck(beckon_mqtt::Ack::new(id))).await;
    }
    assert_eq!(
        most_in_flight, 2,
        "the console filled but never overran the window"
    );
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let c = api.get_call(call["id"].as_str().unwrap()).await;
        if c["counts"]["sent"] == 6 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_large_calls_first_wake_ups_go_out_before_the_rest_is_recorded() {
    // One delivery per transaction: the call is recorded in 1,500 chunks, which take
    // PostgreSQL (no pause between chunks there) well over the time the first wake-up needs.
    const AGENTS: usize = 1500;
    let (api, mut broker) =
        console_with_scripted_broker(Properties::default(), |c| c.call_chunk = 1).await;

    let agents: Vec<String> = (0..AGENTS).map(|i| format!("pc-{i:03}")).collect();
    api.handle
        .state
        .store
        .run(move |s| common::enroll_in_store(s, &agents))
        .await
        .unwrap();
    let (_, call) = api
        .create_call(json!({"target": "all", "reason": "many"}))
        .await;
    // The answer comes after the first chunk: it says how many agents the call addresses,
    // and counts what is recorded so far.
    assert_eq!(call["agents"], AGENTS);
    assert_eq!(call["targeted"], AGENTS);
    assert_eq!(call["counts"], json!({"queued": 1}));
    let id = call["id"].as_str().unwrap().to_owned();

    let mut topics = std::collections::BTreeSet::new();
    let mut recorded_at_first = None;
    while topics.len() < AGENTS {
        let Some(packet) = broker.recv_within(WAIT).await else {
            panic!("{} wake-ups of {AGENTS} went out", topics.len());
        };
        let Packet::Publish(p) = packet else { continue };
        if recorded_at_first.is_none() {
            let id = id.clone();
            let now = api
                .handle
                .state
                .store
                .run(move |s| s.call(&id))
                .await
                .unwrap();
            recorded_at_first = Some(now.counts.values().sum::<u32>());
        }
        assert!(topics.insert(p.topic.clone()), "{} twice", p.topic);
        broker
            .send(Packet::PubAck(beckon_mqtt::Ack::new(p.packet_id.unwrap())))
            .await;
    }
    let recorded = recorded_at_first.unwrap();
    assert!(
        (recorded as usize) < AGENTS,
        "the first wake-up went out while {recorded} of {AGENTS} deliveries were recorded"
    );
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let c = api.get_call(&id).await;
        if c["counts"]["sent"] == AGENTS {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
