//! The console's own TLS connection to Beckon's broker: a client certificate from the
//! console's tenant CA (OU=server), the tenant file it writes for the broker, an agent
//! enrolled by the console connecting with its certificate, the broker's presence event,
//! and a wake-up acked end to end.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use beckon_broker::{BrokerConfig, Listen, Server};
use beckon_console::BrokerLink;
use beckon_identity::wakeup::{Ack, ReplayGuard, WakeUpVerifier};
use beckon_identity::{KeyId, PublicKey, TenantId};
use beckon_mqtt::{
    Connect, Packet, Properties, ProtocolVersion, Publish, QoS, RetainHandling, Subscribe,
    Subscription, SubscriptionOptions,
};
use bytes::Bytes;
use common::{Peer, WAIT};
use serde_json::{Value, json};

async fn wait_for(
    api: &common::Api,
    what: &str,
    mut f: impl FnMut(&Value) -> bool,
    path: &str,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = api.call("GET", path, None).await;
        if f(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_wake_up_reaches_an_enrolled_agent_through_beckons_broker_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants");
    std::fs::create_dir_all(&tenants).unwrap();
    let mut config = BrokerConfig {
        data_dir: dir.path().join("broker"),
        tenants_dir: Some(tenants.clone()),
        tenants_reload_interval_secs: 1,
        ..BrokerConfig::default()
    };
    config.listeners.mqtts = Listen(Some("127.0.0.1:0".parse().unwrap()));
    config.listeners.mqtt = Listen(None);
    let (bound, broker) = Server::bind(config).await.expect("broker starts");
    let broker_addr = bound.mqtts.unwrap();
    let broker_ca = bound.generated_ca.clone().unwrap();

    let api = common::start_with(|c| {
        c.broker = BrokerLink::Tls {
            host: "127.0.0.1".into(),
            port: broker_addr.port(),
            ca_file: Some(broker_ca.clone()),
        }
    })
    .await;
    std::fs::write(tenants.join("default.toml"), api.handle.tenant_file()).unwrap();
    wait_for(
        &api,
        "console connects",
        |s| s["push_service"]["connected"] == true,
        "/api/v1/status",
    )
    .await;

    // An agent enrolls with its own key and connects with the certificate it got.
    let key = rcgen::KeyPair::generate().unwrap();
    let enrolled = api
        .enroll_with_key("pc-7", json!({"hostname": "pc-7"}), &key)
        .await;
    let tls = beckon_net::TlsClient::new(&beckon_net::TlsSettings {
        trust: beckon_net::TrustAnchors::CaFile(broker_ca.clone()),
        identity: Some(beckon_net::ClientIdentity::Pem {
            cert: enrolled["certificate"]
                .as_str()
                .unwrap()
                .as_bytes()
                .to_vec(),
            key: key.serialize_pem().into_bytes(),
        }),
        ..Default::default()
    })
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(broker_addr).await.unwrap();
    let (stream, _) = tls
        .connect(tcp, "127.0.0.1", &["mqtt"], WAIT)
        .await
        .unwrap();
    let mut agent = Peer::new(stream);
    agent
        .send(Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 60,
            client_id: "pc-7".into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        })))
        .await;
    match agent.recv().await {
        Packet::ConnAck(a) => assert!(!a.code.is_error(), "agent refused: {a:?}"),
        other => panic!("{other:?}"),
    }
    agent
        .send(Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: "agents/pc-7/wake".into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: RetainHandling::SendAtSubscribe,
                },
            }],
            properties: Properties::default(),
        }))
        .await;
    assert!(matches!(agent.recv().await, Packet::SubAck(_)));
    // The broker's own presence event reaches the console.
    let a = wait_for(
        &api,
        "presence online",
        |a| a["presence"] == "online",
        "/api/v1/agents/pc-7",
    )
    .await;
    assert_eq!(a["path"], "8883");

    let (s, call) = api
        .call(
            "POST",
            "/api/v1/calls",
            Some(json!({"target": {"agents": ["pc-7"]}, "reason": "tls"})),
        )
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
    wait_for(
        &api,
        "delivered",
        |c| c["deliveries"][0]["state"] == "delivered",
        &format!("/api/v1/calls/{call_id}"),
    )
    .await;
    api.handle.shutdown().await;
    let _ = tokio::time::timeout(WAIT, broker.shutdown()).await;
}
