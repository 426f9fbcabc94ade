//! The console's own TLS connection to Beckon's broker: a client certificate from the
//! console's tenant CA (OU=server), the tenant file it writes for the broker, an agent
//! enrolled by the console connecting with its certificate, the broker's presence event,
//! and a wake-up acked end to end.

mod common;

use axum::http::StatusCode;
use beckon_console::BrokerLink;
use beckon_identity::wakeup::{Ack, ReplayGuard, WakeUpVerifier};
use beckon_identity::{KeyId, PublicKey, TenantId};
use beckon_mqtt::{Packet, Properties, Publish, QoS};
use bytes::Bytes;
use common::{WAIT, tenant_broker, tls_agent};
use serde_json::json;

#[tokio::test]
async fn a_wake_up_reaches_an_enrolled_agent_through_beckons_broker_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (bound, broker, broker_ca) = tenant_broker(dir.path(), 0).await;
    let broker_addr = bound.mqtts.unwrap();
    let tenants = dir.path().join("tenants");

    let api = common::start_with(|c| {
        c.broker = BrokerLink::Tls {
            host: "127.0.0.1".into(),
            port: broker_addr.port(),
            ca_file: Some(broker_ca.clone()),
        }
    })
    .await;
    std::fs::write(tenants.join("default.toml"), api.handle.tenant_file()).unwrap();
    api.wait_for("console connects", "/api/v1/status", |s| {
        s["push_service"]["connected"] == true
    })
    .await;

    // An agent enrolls with its own key and connects with the certificate it got.
    let key = rcgen::KeyPair::generate().unwrap();
    let enrolled = api
        .enroll_with_key("pc-7", json!({"hostname": "pc-7"}), &key)
        .await;
    let mut agent = tls_agent(broker_addr.port(), &broker_ca, "pc-7", &enrolled, &key).await;
    agent.subscribe_wake("pc-7").await;
    // The broker's own presence event reaches the console.
    let a = api
        .wait_for("presence online", "/api/v1/agents/pc-7", |a| {
            a["presence"] == "online"
        })
        .await;
    assert_eq!(a["path"], "8883");

    let (s, call) = api
        .create_call(json!({"target": {"agents": ["pc-7"]}, "reason": "tls"}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let call_id = call["id"].as_str().unwrap().to_owned();
    let wake = loop {
        match agent.recv().await {
            Packet::Publish(p) => break p,
            _ => continue,
        }
    };
    if let Some(id) = wake.packet_id {
        agent.send(Packet::PubAck(beckon_mqtt::Ack::new(id))).await;
    }
    let verifier = WakeUpVerifier::new(
        TenantId::new("default").unwrap(),
        "pc-7",
        [(
            KeyId::new(enrolled["wakeup_key"]["kid"].as_str().unwrap()).unwrap(),
            PublicKey::from_base64(enrolled["wakeup_key"]["public_key"].as_str().unwrap()).unwrap(),
        )],
    );
    let w = verifier
        .verify(
            &wake.payload,
            beckon_console::model::now_ms() / 1000,
            &mut ReplayGuard::default(),
        )
        .unwrap();
    agent
        .send(Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "agents/pc-7/ack".into(),
            packet_id: Some(5),
            payload: Bytes::from(Ack::received(&w.id, 1).to_json()),
            properties: Properties::default(),
        }))
        .await;
    api.wait_for("delivered", &format!("/api/v1/calls/{call_id}"), |c| {
        c["deliveries"][0]["state"] == "delivered"
    })
    .await;
    api.handle.shutdown().await;
    let _ = tokio::time::timeout(WAIT, broker.shutdown()).await;
}
