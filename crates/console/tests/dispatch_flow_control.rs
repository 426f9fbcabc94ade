//! The console honours the broker's Receive Maximum: a call to more agents than the broker
//! allows in flight waits for PUBACKs instead of overrunning it (a broker would disconnect
//! with 0x93). The broker here is a scripted peer on loopback.

mod common;

use std::time::Duration;

use beckon_mqtt::{ConnAck, Packet, Properties, ReasonCode, SubAck};
use common::{Peer, WAIT};
use serde_json::json;

#[tokio::test]
async fn a_large_call_never_has_more_publishes_in_flight_than_the_broker_allows() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let api = common::start_with_plain_broker(port).await;
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
            properties: Properties::from(beckon_mqtt::PropertySet {
                receive_maximum: Some(2),
                ..Default::default()
            }),
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
    // The console's barrier after connecting: answered as a broker does.
    assert!(matches!(broker.recv().await, Packet::PingReq));
    broker.send(Packet::PingResp).await;

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
