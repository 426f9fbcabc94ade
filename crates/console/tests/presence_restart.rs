//! Presence after the console restarts: the registry is made current from the broker's
//! retained presence as soon as the console reconnects, not left as it was when the console
//! stopped. Here the broker restarts too (its retained state starts empty): the agent that
//! came back is online, the one that did not is offline.

mod common;

use std::path::Path;
use std::time::Duration;

use beckon_broker::{BrokerConfig, Listen, Server, ServerHandle};
use beckon_console::{BrokerLink, Console, ConsoleConfig};
use beckon_mqtt::{Connect, Packet, Properties, ProtocolVersion};
use common::{Peer, WAIT};
use serde_json::{Value, json};

async fn broker(dir: &Path, port: u16) -> (ServerHandle, std::path::PathBuf) {
    let tenants = dir.join("tenants");
    std::fs::create_dir_all(&tenants).unwrap();
    let mut config = BrokerConfig {
        data_dir: dir.join("broker"),
        tenants_dir: Some(tenants),
        tenants_reload_interval_secs: 1,
        ..BrokerConfig::default()
    };
    config.listeners.mqtts = Listen(Some(([127, 0, 0, 1], port).into()));
    config.listeners.mqtt = Listen(None);
    let (bound, handle) = Server::bind(config).await.expect("broker starts");
    (handle, bound.generated_ca.clone().unwrap())
}

async fn wait_for(api: &common::Api, what: &str, path: &str, f: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = api.call("GET", path, None).await;
        if f(&v) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An agent connected with the certificate the console issued it.
async fn agent(
    port: u16,
    ca: &Path,
    id: &str,
    enrolled: &Value,
    key: &rcgen::KeyPair,
) -> Peer<beckon_net::BoxedStream> {
    let tls = beckon_net::TlsClient::new(&beckon_net::TlsSettings {
        trust: beckon_net::TrustAnchors::CaFile(ca.to_owned()),
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
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (stream, _) = tls
        .connect(tcp, "127.0.0.1", &["mqtt"], WAIT)
        .await
        .unwrap();
    let mut peer = Peer::new(Box::new(stream) as beckon_net::BoxedStream);
    peer.send(Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: true,
        keep_alive: 60,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    })))
    .await;
    match peer.recv().await {
        Packet::ConnAck(a) => assert!(!a.code.is_error(), "{id} refused: {a:?}"),
        other => panic!("{other:?}"),
    }
    peer
}

#[tokio::test]
async fn after_a_restart_the_registry_shows_the_brokers_presence_not_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (first_broker, ca) = broker(dir.path(), port).await;
    let link = BrokerLink::Tls {
        host: "127.0.0.1".into(),
        port,
        ca_file: Some(ca.clone()),
    };
    let link2 = link.clone();
    let api = common::start_with(|c| c.broker = link2).await;
    std::fs::write(
        dir.path().join("tenants/default.toml"),
        api.handle.tenant_file(),
    )
    .unwrap();
    wait_for(&api, "console connects", "/api/v1/status", |s| {
        s["push_service"]["connected"] == true
    })
    .await;

    let keys: Vec<rcgen::KeyPair> = (0..2)
        .map(|_| rcgen::KeyPair::generate().unwrap())
        .collect();
    let mut enrolled = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let id = format!("pc-{i}");
        enrolled.push(api.enroll_with_key(&id, json!({"hostname": id}), key).await);
    }
    let back = agent(port, &ca, "pc-0", &enrolled[0], &keys[0]).await;
    let gone = agent(port, &ca, "pc-1", &enrolled[1], &keys[1]).await;
    for id in ["pc-0", "pc-1"] {
        wait_for(&api, "online", &format!("/api/v1/agents/{id}"), |a| {
            a["presence"] == "online"
        })
        .await;
    }

    // The console stops; then the broker restarts, and only pc-0 comes back.
    let data = api.handle.state.config.data_dir.clone();
    let common::Api {
        handle, dir: keep, ..
    } = api;
    handle.shutdown().await;
    drop((back, gone));
    let _ = tokio::time::timeout(WAIT, first_broker.shutdown()).await;
    let (second_broker, _) = broker(dir.path(), port).await;
    let _back = agent(port, &ca, "pc-0", &enrolled[0], &keys[0]).await;

    let mut config = ConsoleConfig::new(&data);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.broker = link;
    let handle = Console::start(config).await.unwrap();
    let token = handle.create_api_token("again").await.unwrap();
    let router = beckon_console::api::router(handle.state.clone());
    let api = common::Api {
        handle,
        router,
        token,
        dir: keep,
    };
    wait_for(&api, "console reconnects", "/api/v1/status", |s| {
        s["push_service"]["connected"] == true
    })
    .await;
    // Right after connecting, without any new event about pc-1.
    let (_, a) = api.call("GET", "/api/v1/agents/pc-1", None).await;
    assert_eq!(a["presence"], "offline", "pc-1 is not connected: {a}");
    let (_, a) = api.call("GET", "/api/v1/agents/pc-0", None).await;
    assert_eq!(a["presence"], "online", "{a}");
    let (_, status) = api.call("GET", "/api/v1/status", None).await;
    assert_eq!(status["agents_online"], 1, "{status}");
    api.handle.shutdown().await;
    let _ = tokio::time::timeout(WAIT, second_broker.shutdown()).await;
}
