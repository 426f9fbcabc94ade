//! The agent against Beckon's own broker: TLS through the connection ladder with the broker's
//! generated CA, wake-ups and acks, and a graceful broker shutdown (DISCONNECT 0x8B) followed
//! by a restart on the same ports.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use beckon_agent::LadderConnector;
use beckon_agent::state::AgentState;
use beckon_broker::{Bound, BrokerConfig, Listen, Server, ServerHandle};
use common::*;

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

/// Loopback addresses for the broker's TLS and plain listeners, kept across its restarts.
fn broker_addrs() -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    )
}

async fn shutdown(broker: ServerHandle) {
    tokio::time::timeout(WAIT, broker.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
}

/// The agent on the broker's TLS listener at `tls` (trusting the broker's generated `ca`;
/// nothing on the 443 rungs), running `script` for each wake-up.
fn start_agent(
    dir: &Path,
    script: &str,
    tls: SocketAddr,
    ca: Option<PathBuf>,
    proxy: Option<String>,
) -> RunningAgent {
    let mut config = test_config(dir, &command_action(dir, script, "10s"));
    config.broker.port = tls.port();
    config.broker.fallback_port = free_port();
    config.broker.server_name = Some("localhost".into());
    config.broker.ca_file = ca;
    config.broker.proxy = proxy.map(|p| p.parse().expect("proxy address"));
    let connector = LadderConnector::new(&config).expect("ladder");
    RunningAgent::start(config, connector)
}

/// A console-like client on the plain listener: publishes a wake-up, returns its acks.
async fn wake(plain: SocketAddr, name: &str, reason: &str) -> Vec<serde_json::Value> {
    let mut server = ack_reader(plain, name).await;
    wake_until_acked(&mut server, reason, 1).await
}

#[tokio::test]
async fn agent_works_with_the_beckon_broker_and_survives_its_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let (tls, plain) = broker_addrs();
    let (bound, handle) = start_broker(data.path(), tls, plain).await;
    let ca = bound.generated_ca.clone().expect("the broker made its CA");

    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"echo "$BECKON_WAKEUP_REASON" >> runs"#;
    let agent = start_agent(dir.path(), script, tls, Some(ca), None);

    eventually("agent connected over TLS", || connected(dir.path(), None)).await;
    let acks = wake(plain, "console", "first").await;
    let stages: Vec<_> = acks.iter().filter_map(|a| a["stage"].as_str()).collect();
    assert_eq!(stages, ["received", "started", "finished"]);
    assert_eq!(acks[2]["status"], "ok");
    let state = AgentState::read(dir.path()).expect("read").expect("state");
    assert_eq!(state.path.as_deref(), Some("8883"));

    // Graceful shutdown: the broker says 0x8B, the agent records it and keeps trying.
    shutdown(handle).await;
    eventually("agent noticed the shutdown", || {
        !connected(dir.path(), None)
    })
    .await;
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
    eventually("agent reconnected", || connected(dir.path(), None)).await;
    let acks = wake(plain, "console-2", "second").await;
    assert_eq!(acks.last().expect("finished")["status"], "ok");
    let runs = std::fs::read_to_string(dir.path().join("runs")).expect("runs");
    assert_eq!(runs.lines().collect::<Vec<_>>(), ["first", "second"]);

    agent.stop().await;
    shutdown(handle).await;
}

#[tokio::test]
async fn agent_goes_through_the_proxy_and_direct_when_the_proxy_is_gone() {
    let data = tempfile::tempdir().expect("tempdir");
    let (tls, plain) = broker_addrs();
    let (bound, handle) = start_broker(data.path(), tls, plain).await;
    let mut proxy = Tinyproxy::start(&[tls.port()]);

    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("http://127.0.0.1:{}", proxy.port);
    let agent = start_agent(
        dir.path(),
        "true",
        tls,
        bound.generated_ca.clone(),
        Some(url.clone()),
    );

    let via_proxy = format!("8883 via {url}");
    eventually("agent connected through the proxy", || {
        connected(dir.path(), Some(&via_proxy))
    })
    .await;
    let acks = wake(plain, "console", "through the proxy").await;
    assert_eq!(acks.last().expect("finished")["status"], "ok");

    // The proxy dies (and with it the tunnel): the agent goes direct.
    proxy.stop();
    eventually("agent reconnected directly", || {
        connected(dir.path(), Some("8883"))
    })
    .await;
    let acks = wake(plain, "console-2", "direct").await;
    assert_eq!(acks.last().expect("finished")["status"], "ok");

    agent.stop().await;
    shutdown(handle).await;
}
