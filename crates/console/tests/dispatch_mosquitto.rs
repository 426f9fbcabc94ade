//! Wake-up calls through a real broker (Debian's Mosquitto, anonymous, started here) to
//! simulated agents that verify the signature and ack: queued -> sent -> delivered ->
//! started -> finished, live events, and several pending calls going out as one when an
//! agent comes online.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use beckon_console::BrokerLink;
use beckon_identity::wakeup::{Ack, AckStatus, ReplayGuard, WakeUpVerifier};
use beckon_identity::{KeyId, PublicKey, TenantId};
use beckon_mqtt::{Packet, Properties, Publish, QoS};
use bytes::Bytes;
use common::{Api, Mosquitto, Peer, TestClient, WAIT, free_port};
use serde_json::{Value, json};

async fn agent_peer(port: u16, id: &str) -> Peer {
    let mut p = Peer::connect(port).await;
    p.connect_as(id).await;
    p.subscribe_wake(id).await;
    p
}

/// `ack` from `agent_id`, on its ack topic with packet id `pid`.
async fn send_ack(p: &mut Peer, agent_id: &str, ack: &Ack, pid: u16) {
    publish(p, format!("agents/{agent_id}/ack"), ack.to_json(), pid).await;
}

async fn publish(p: &mut Peer, topic: String, payload: Vec<u8>, pid: u16) {
    p.send(Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic,
        packet_id: Some(pid),
        payload: Bytes::from(payload),
        properties: Properties::default(),
    }))
    .await;
}

/// The broker's presence event, published here by the test (Mosquitto has none of its own).
async fn announce_online(p: &mut Peer, id: &str, pid: u16) {
    let ev = json!({"state": "connected", "at": beckon_console::model::now_ms(), "remote_addr": "127.0.0.1:5555", "path": "1883", "via_proxy": false});
    publish(
        p,
        format!("agents/{id}/presence"),
        ev.to_string().into_bytes(),
        pid,
    )
    .await;
}

/// The next wake-up PUBLISH (other packets, e.g. PUBACKs of our acks, are skipped).
async fn next_wakeup(p: &mut Peer) -> Publish {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match p.recv_within(left).await {
            Some(Packet::Publish(publish)) => {
                if let Some(id) = publish.packet_id {
                    p.send(Packet::PubAck(beckon_mqtt::Ack::new(id))).await;
                }
                return publish;
            }
            Some(_) => continue,
            None => panic!("no wake-up within {WAIT:?}"),
        }
    }
}

fn verifier(enrolled: &Value, id: &str) -> WakeUpVerifier {
    WakeUpVerifier::new(
        TenantId::new("default").unwrap(),
        id,
        [(
            KeyId::new(enrolled["wakeup_key"]["kid"].as_str().unwrap()).unwrap(),
            PublicKey::from_base64(enrolled["wakeup_key"]["public_key"].as_str().unwrap()).unwrap(),
        )],
    )
}

async fn wait_state(api: &Api, call_id: &str, agent: &str, state: &str) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let call = api.get_call(call_id).await;
        let d = call["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["agent_id"] == agent)
            .cloned()
            .unwrap();
        if d["state"] == state {
            return d;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{agent} never reached {state}: {d}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_connected(api: &Api) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, status) = api.call("GET", "/api/v1/status", None).await;
        if status["push_service"]["connected"] == true {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "console never connected: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_wake_up_goes_out_signed_and_follows_the_agents_acks() {
    let broker = Mosquitto::start();
    let api = common::start_with_plain_broker(broker.port).await;
    let enrolled = api.enroll("pc-1", json!({"hostname": "pc-1"})).await;
    wait_connected(&api).await;
    let mut agent = agent_peer(broker.port, "pc-1").await;
    let mut events = api.handle.state.events.subscribe();

    let (s, call) = api
        .create_call(json!({"target": {"agents": ["pc-1"]}, "reason": "policy-changed", "expires_in_secs": 300}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{call}");
    let call_id = call["id"].as_str().unwrap().to_owned();

    let wake = next_wakeup(&mut agent).await;
    assert_eq!(wake.topic, "agents/pc-1/wake");
    assert_eq!(wake.qos, QoS::AtLeastOnce);
    let expiry = wake
        .properties
        .message_expiry_interval
        .expect("message expiry set");
    assert!((290..=300).contains(&expiry), "{expiry}");
    let now = beckon_console::model::now_ms() / 1000;
    let w = verifier(&enrolled, "pc-1")
        .verify(&wake.payload, now, &mut ReplayGuard::default())
        .expect("signature verifies with the key from enrollment");
    assert_eq!(w.reason, "policy-changed");
    let d = wait_state(&api, &call_id, "pc-1", "sent").await;
    assert_eq!(d["wakeup_id"], w.id.as_str());

    let at = beckon_console::model::now_ms();
    send_ack(&mut agent, "pc-1", &Ack::received(&w.id, at), 10).await;
    wait_state(&api, &call_id, "pc-1", "delivered").await;
    send_ack(&mut agent, "pc-1", &Ack::started(&w.id, at), 11).await;
    send_ack(
        &mut agent,
        "pc-1",
        &Ack::finished(&w.id, AckStatus::Failed, Some(3), 1200, at),
        12,
    )
    .await;
    let d = wait_state(&api, &call_id, "pc-1", "finished").await;
    assert_eq!(
        (
            d["status"].as_str(),
            d["exit_code"].as_i64(),
            d["duration_ms"].as_i64()
        ),
        (Some("failed"), Some(3), Some(1200))
    );

    // Live updates saw every step, in order.
    let mut seen = Vec::new();
    while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(500), events.recv()).await {
        if ev.call_id == call_id {
            seen.push(ev.state.as_str());
        }
    }
    assert_eq!(seen, ["sent", "delivered", "started", "finished"]);
    api.handle.shutdown().await;
}

#[tokio::test]
async fn pending_calls_go_out_as_one_when_the_agent_comes_online() {
    let broker = Mosquitto::start();
    let api = common::start_with_plain_broker(broker.port).await;
    let enrolled = api.enroll("pc-2", json!({"hostname": "pc-2"})).await;
    wait_connected(&api).await;
    // Two calls while the agent is away: the broker takes them (sent) but nobody gets them.
    let mut ids = Vec::new();
    for reason in ["first", "second"] {
        let (_, call) = api
            .create_call(json!({"target": {"agents": ["pc-2"]}, "reason": reason}))
            .await;
        let id = call["id"].as_str().unwrap().to_owned();
        wait_state(&api, &id, "pc-2", "sent").await;
        ids.push(id);
    }
    let mut agent = agent_peer(broker.port, "pc-2").await;
    announce_online(&mut agent, "pc-2", 20).await;
    let wake = next_wakeup(&mut agent).await;
    let now = beckon_console::model::now_ms() / 1000;
    let w = verifier(&enrolled, "pc-2")
        .verify(&wake.payload, now, &mut ReplayGuard::default())
        .unwrap();
    assert_eq!(w.reason, "first, second");
    // Exactly one message for both.
    assert!(
        !matches!(agent.recv_within(Duration::from_millis(700)).await, Some(Packet::Publish(p)) if p.topic.ends_with("/wake")),
        "a second wake-up message was sent"
    );
    send_ack(&mut agent, "pc-2", &Ack::received(&w.id, 1), 21).await;
    for id in &ids {
        wait_state(&api, id, "pc-2", "delivered").await;
    }
    let (_, a) = api.call("GET", "/api/v1/agents/pc-2", None).await;
    assert_eq!(a["presence"], "online");
    let (_, status) = api.call("GET", "/api/v1/status", None).await;
    assert_eq!(status["agents_online"], 1);
    assert_eq!(a["path"], "1883");
    api.handle.shutdown().await;
}

#[tokio::test]
async fn the_status_says_when_the_push_service_is_not_reachable() {
    // A port where nothing listens.
    let port = free_port();
    let api = common::start_with_plain_broker(port).await;
    let status = api
        .wait_for("the TCP connect failure", "/api/v1/status", |s| {
            s["push_service"]["message"]
                .as_str()
                .unwrap()
                .contains("TCP connect")
        })
        .await;
    let msg = status["push_service"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("Push service servers are not reachable"),
        "{msg}"
    );
    assert_eq!(status["push_service"]["connected"], false);
    api.handle.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_tls_broker_gets_the_doctors_diagnosis_in_the_status() {
    let port = free_port();
    let api = common::start_with(|c| {
        c.broker = BrokerLink::Tls {
            host: "127.0.0.1".into(),
            port,
            ca_file: None,
        }
    })
    .await;
    let status = api
        .wait_for("no diagnosis", "/api/v1/status", |s| {
            s["push_service"]["diagnosis"].is_object()
        })
        .await;
    let push = &status["push_service"];
    assert_eq!(push["connected"], false);
    assert_eq!(push["diagnosis"]["ok"], false, "{push}");
    assert!(
        push["message"]
            .as_str()
            .unwrap()
            .starts_with("Push service servers are not reachable"),
        "{push}"
    );
    assert!(
        !push["diagnosis"]["paths"].as_array().unwrap().is_empty(),
        "{push}"
    );
    api.handle.shutdown().await;
}
