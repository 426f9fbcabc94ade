//! The agent against Beckon's own broker: TLS through the connection ladder with the broker's
//! generated CA, wake-ups and acks, and a graceful broker shutdown (DISCONNECT 0x8B) followed
//! by a restart on the same ports.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use beckon_agent::state::AgentState;
use beckon_agent::{LadderConnector, run_agent};
use beckon_broker::{Bound, BrokerConfig, Listen, Server, ServerHandle};
use common::*;
use tokio::net::TcpStream;
use tokio::sync::watch;

async fn start_broker(data: &Path, tls: SocketAddr, plain: SocketAddr) -> (Bound, ServerHandle) {
    let mut config = BrokerConfig {
        data_dir: data.to_owned(),
        ..BrokerConfig::default()
    };
    config.listeners.mqtts = Listen(Some(tls));
    config.listeners.mqtt = Listen(Some(plain));
    // Identity checks are the broker's business and tested there; here: the wire.
    config.allow_anonymous = true;
    tokio::time::timeout(WAIT, Server::bind(config))
        .await
        .expect("broker starts in time")
        .expect("broker starts")
}

fn connected(dir: &Path) -> bool {
    AgentState::read(dir)
        .ok()
        .flatten()
        .is_some_and(|s| s.connected)
}

/// A console-like client on the plain listener: publishes a wake-up, returns its acks.
async fn wake(plain: SocketAddr, name: &str, reason: &str) -> Vec<serde_json::Value> {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(plain))
        .await
        .expect("connect in time")
        .expect("connect");
    let mut server = Peer::new(stream);
    server.client_connect(name).await;
    server.client_subscribe("agents/a1/ack").await;
    wake_until_acked(&mut server, reason, 1).await
}

#[tokio::test]
async fn agent_works_with_the_beckon_broker_and_survives_its_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let (tls, plain) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let (bound, handle) = start_broker(data.path(), tls, plain).await;
    let ca = bound.generated_ca.clone().expect("the broker made its CA");

    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"echo "$BECKON_WAKEUP_REASON" >> runs"#;
    let mut config = test_config(dir.path(), &command_action(dir.path(), script, "10s"));
    config.broker.port = tls.port();
    config.broker.fallback_port = free_port();
    config.broker.server_name = Some("localhost".into());
    config.broker.ca_file = Some(ca);
    let connector = LadderConnector::new(&config).expect("ladder");
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_agent(config, connector, test_check(), stop_rx));

    eventually("agent connected over TLS", || connected(dir.path())).await;
    let acks = wake(plain, "console", "first").await;
    let stages: Vec<_> = acks.iter().filter_map(|a| a["stage"].as_str()).collect();
    assert_eq!(stages, ["received", "started", "finished"]);
    assert_eq!(acks[2]["status"], "ok");
    let state = AgentState::read(dir.path()).expect("read").expect("state");
    assert_eq!(state.path.as_deref(), Some("8883"));

    // Graceful shutdown: the broker says 0x8B, the agent records it and keeps trying.
    tokio::time::timeout(WAIT, handle.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
    eventually("agent noticed the shutdown", || !connected(dir.path())).await;
    let dropped = AgentState::read(dir.path())
        .expect("read")
        .and_then(|s| s.last_disconnect)
        .expect("the drop is recorded")
        .message;
    assert!(dropped.contains("server shutting down (0x8B)"), "{dropped}");
    let text = beckon_agent::status::status_text(dir.path()).expect("status");
    assert!(
        text.contains("Last drop:    broker closed the session: server shutting down"),
        "{text}"
    );

    // The broker comes back on the same ports: the agent reconnects by itself.
    let (_bound, handle) = start_broker(data.path(), tls, plain).await;
    eventually("agent reconnected", || connected(dir.path())).await;
    let acks = wake(plain, "console-2", "second").await;
    assert_eq!(acks.last().expect("finished")["status"], "ok");
    let runs = std::fs::read_to_string(dir.path().join("runs")).expect("runs");
    assert_eq!(runs.lines().collect::<Vec<_>>(), ["first", "second"]);

    stop_agent(&stop, task).await;
    tokio::time::timeout(WAIT, handle.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
}

#[tokio::test]
async fn agent_goes_through_the_proxy_and_direct_when_the_proxy_is_gone() {
    let data = tempfile::tempdir().expect("tempdir");
    let (tls, plain) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let (bound, handle) = start_broker(data.path(), tls, plain).await;
    let mut proxy = Tinyproxy::start(&[tls.port()]);

    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path(), &command_action(dir.path(), "true", "10s"));
    config.broker.port = tls.port();
    config.broker.fallback_port = free_port();
    config.broker.server_name = Some("localhost".into());
    config.broker.ca_file = bound.generated_ca.clone();
    config.broker.proxy = Some(format!("http://127.0.0.1:{}", proxy.port));
    let connector = LadderConnector::new(&config).expect("ladder");
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_agent(config, connector, test_check(), stop_rx));

    let via_proxy = format!("8883 via http://127.0.0.1:{}", proxy.port);
    eventually("agent connected through the proxy", || {
        AgentState::read(dir.path())
            .ok()
            .flatten()
            .is_some_and(|s| s.connected && s.path.as_deref() == Some(via_proxy.as_str()))
    })
    .await;
    let acks = wake(plain, "console", "through the proxy").await;
    assert_eq!(acks.last().expect("finished")["status"], "ok");

    // The proxy dies (and with it the tunnel): the agent goes direct.
    proxy.stop();
    eventually("agent reconnected directly", || {
        AgentState::read(dir.path())
            .ok()
            .flatten()
            .is_some_and(|s| s.connected && s.path.as_deref() == Some("8883"))
    })
    .await;
    let acks = wake(plain, "console-2", "direct").await;
    assert_eq!(acks.last().expect("finished")["status"], "ok");

    stop_agent(&stop, task).await;
    tokio::time::timeout(WAIT, handle.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
}
