//! Presence after the console restarts: the registry is made current from the broker's
//! retained presence as soon as the console reconnects, not left as it was when the console
//! stopped. Here the broker restarts too (its retained state starts empty): the agent that
//! came back is online, the one that did not is offline.

mod common;

use beckon_console::{BrokerLink, Console, ConsoleConfig};
use common::{WAIT, free_port, tenant_broker, tls_agent};
use serde_json::json;

#[tokio::test]
async fn after_a_restart_the_registry_shows_the_brokers_presence_not_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (_, first_broker, ca) = tenant_broker(dir.path(), port).await;
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
    api.wait_for("console connects", "/api/v1/status", |s| {
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
    let back = tls_agent(port, &ca, "pc-0", &enrolled[0], &keys[0]).await;
    let gone = tls_agent(port, &ca, "pc-1", &enrolled[1], &keys[1]).await;
    for id in ["pc-0", "pc-1"] {
        api.wait_for("online", &format!("/api/v1/agents/{id}"), |a| {
            a["presence"] == "online"
        })
        .await;
    }

    // The console stops; then the broker restarts, and only pc-0 comes back.
    let data = api.handle.state.config.data_dir.clone();
    let database = api.handle.state.config.database.clone();
    let common::Api {
        handle, dir: keep, ..
    } = api;
    handle.shutdown().await;
    drop((back, gone));
    let _ = tokio::time::timeout(WAIT, first_broker.shutdown()).await;
    let (_, second_broker, _) = tenant_broker(dir.path(), port).await;
    let _back = tls_agent(port, &ca, "pc-0", &enrolled[0], &keys[0]).await;

    let mut config = ConsoleConfig::new(&data);
    config.database = database;
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
    api.wait_for("console reconnects", "/api/v1/status", |s| {
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
