//! A fleet of 1,000 agents and a broker outage: Beckon's real broker is shut down for a few
//! seconds and started again on the same port; every agent comes back by itself, none gives
//! up, and the reconnects are spread out by the backoff's full jitter instead of arriving as
//! one stampede. The backoff is shortened for the test (base 200 ms, cap 2 s); the spread is
//! checked, never a time.
//!
//! The agents use the broker's plain MQTT listener (no TLS): 1,000 TLS handshakes with client
//! certificates, twice, take too long in a debug build on a small machine; the reconnect
//! pacing under test is the same whatever the transport.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use beckon_agent::{AgentConfig, PlainTcpConnector, run_agent};
use beckon_broker::{BrokerConfig, Listen, Server, ServerHandle};
use common::free_port;
use tokio::sync::watch;
use tokio::time::Instant;

const FLEET: usize = 1_000;
/// Bound on every fleet-wide wait.
const FLEET_WAIT: Duration = Duration::from_secs(30);

async fn start_broker(data: &Path, plain: SocketAddr) -> ServerHandle {
    let mut config = BrokerConfig {
        data_dir: data.to_owned(),
        ..BrokerConfig::default()
    };
    config.listeners.mqtts = Listen(None);
    config.listeners.mqtt = Listen(Some(plain));
    config.allow_anonymous = true;
    let (_bound, handle) = tokio::time::timeout(Duration::from_secs(10), Server::bind(config))
        .await
        .expect("broker starts in time")
        .expect("broker starts");
    handle
}

fn agent_config(state_dir: &Path, id: &str, port: u16) -> AgentConfig {
    let text = format!(
        r#"
agent_id = "{id}"
tenant = "acme"
state_dir = "{}"

[broker]
host = "127.0.0.1"
plain_port = {port}
keepalive_direct = "60s"
connect_timeout = "5s"

[reconnect]
backoff_base = "200ms"
backoff_cap = "2s"
start_delay_max = "1s"
busy_wait_min = "200ms"

[wakeup.console_keys]
console-test = "{}"
"#,
        state_dir.display(),
        common::CONSOLE.key().public_key().to_base64()
    );
    AgentConfig::parse(&text, Path::new("fleet.toml")).expect("fleet config")
}

/// Samples the broker's connection count every 5 ms until it reaches `target`; returns the
/// time (since `start`) of each new connection.
async fn record_connections(handle: &ServerHandle, target: usize, start: Instant) -> Vec<Duration> {
    let deadline = start + FLEET_WAIT;
    let mut seen = handle.connection_count();
    let mut times = vec![Duration::ZERO; seen];
    while seen < target {
        assert!(
            Instant::now() < deadline,
            "only {seen} of {target} agents connected within {FLEET_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = handle.connection_count();
        if now > seen {
            times.extend(std::iter::repeat_n(start.elapsed(), now - seen));
            seen = now;
        }
    }
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_comes_back_after_a_broker_outage_without_a_stampede() {
    let data = tempfile::tempdir().expect("tempdir");
    let states = tempfile::tempdir().expect("tempdir");
    let plain = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let handle = start_broker(data.path(), plain).await;

    let (stop, stop_rx) = watch::channel(false);
    let keys = std::collections::BTreeMap::from([(
        "console-test".to_owned(),
        common::CONSOLE.key().public_key().to_base64(),
    )]);
    let mut agents = Vec::with_capacity(FLEET);
    for i in 0..FLEET {
        let dir = states.path().join(format!("agent-{i}"));
        std::fs::create_dir_all(&dir).expect("state dir");
        let config = agent_config(&dir, &format!("pc-{i}"), plain.port());
        let connector = PlainTcpConnector::new("127.0.0.1", plain.port(), Duration::from_secs(5));
        agents.push(tokio::spawn(run_agent(
            config,
            connector,
            std::sync::Arc::new(
                beckon_agent::wakeup::verifier("acme", &format!("pc-{i}"), &keys)
                    .expect("verifier"),
            ),
            stop_rx.clone(),
        )));
    }
    record_connections(&handle, FLEET, Instant::now()).await;

    // The outage: a graceful shutdown (every agent hears 0x8B), three seconds of nothing on
    // the port (connects are refused), then the broker again on the same port.
    tokio::time::timeout(Duration::from_secs(10), handle.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarted = Instant::now();
    let handle = start_broker(data.path(), plain).await;
    let times = record_connections(&handle, FLEET, restarted).await;

    // Nobody gave up: every agent task still runs.
    let gave_up = agents.iter().filter(|a| a.is_finished()).count();
    assert_eq!(gave_up, 0, "{gave_up} agents stopped trying");

    // The spread: the busiest 100 ms holds at most half of the reconnects (a stampede puts
    // nearly all of them there; the bound leaves room for a busy machine, where the broker
    // accepts in clumps whatever the agents do), and the first and last are well apart.
    let busiest = times
        .iter()
        .map(|&t| {
            times
                .iter()
                .filter(|&&u| u >= t && u < t + Duration::from_millis(100))
                .count()
        })
        .max()
        .unwrap_or(0);
    let first = times.iter().min().copied().unwrap_or_default();
    let last = times.iter().max().copied().unwrap_or_default();
    println!(
        "{FLEET} agents back; first reconnect {first:?}, last {last:?} after the restart; busiest 100 ms: {busiest}"
    );
    assert!(
        busiest * 2 <= FLEET,
        "{busiest} of {FLEET} reconnects within one 100 ms window: a stampede"
    );
    assert!(
        last - first >= Duration::from_millis(1000),
        "reconnects only {:?} apart: not spread",
        last - first
    );

    let _ = stop.send(true);
    for agent in agents {
        tokio::time::timeout(Duration::from_secs(10), agent)
            .await
            .expect("agent stops in time")
            .expect("no panic")
            .expect("agent ends cleanly");
    }
    tokio::time::timeout(Duration::from_secs(10), handle.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
}
