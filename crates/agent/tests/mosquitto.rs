//! The agent against a real broker, Debian's Mosquitto (started on a free loopback port,
//! killed on drop). The test's "server" is a plain MQTT client that publishes wake-ups and
//! reads the acks.

mod common;

use std::path::Path;
use std::time::Duration;

use beckon_agent::PlainTcpConnector;
use beckon_agent::state::AgentState;
use beckon_mqtt::Packet;
use beckon_testkit::TestCa;
use common::*;

fn agent_config(dir: &Path, port: u16) -> beckon_agent::AgentConfig {
    let script = r#"echo "$BECKON_WAKEUP_REASON" >> runs; cat > "stdin-$BECKON_WAKEUP_REASON""#;
    let mut config = test_config(dir, &command_action(dir, script, "10s"));
    config.broker.plain_port = Some(port);
    config
}

fn start_agent(config: beckon_agent::AgentConfig, port: u16) -> RunningAgent {
    let connector = PlainTcpConnector::new("127.0.0.1", port, Duration::from_secs(2));
    RunningAgent::start(config, connector)
}

fn stages(acks: &[serde_json::Value]) -> Vec<&str> {
    acks.iter().filter_map(|a| a["stage"].as_str()).collect()
}

#[tokio::test]
async fn agent_survives_a_broker_restart_through_mosquitto() {
    let port = free_port();
    let mut broker = Mosquitto::start_on(port, "");
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = start_agent(agent_config(dir.path(), port), port);

    eventually("agent connected", || connected(dir.path(), None)).await;
    let mut server = ack_reader(("127.0.0.1", port), "console").await;
    let acks = wake_until_acked(&mut server, "before", 1).await;
    assert_eq!(stages(&acks), ["received", "started", "finished"]);

    // The broker goes away: the agent notices and says so.
    broker.stop();
    eventually("agent noticed the broker is gone", || {
        !connected(dir.path(), None)
    })
    .await;
    let text = beckon_agent::status::status_text(dir.path()).expect("status");
    assert!(text.contains("NOT connected"), "{text}");
    assert!(
        text.contains("Last drop:    broker closed the connection")
            || text.contains("Last drop:    connection failed"),
        "{text}"
    );

    // It comes back: the agent reconnects by itself and wake-ups work again.
    let _broker = Mosquitto::start_on(port, "");
    eventually("agent reconnected", || connected(dir.path(), None)).await;
    let mut server = ack_reader(("127.0.0.1", port), "console-2").await;
    let acks = wake_until_acked(&mut server, "after", 2).await;
    assert_eq!(stages(&acks), ["received", "started", "finished"]);
    let runs = std::fs::read_to_string(dir.path().join("runs")).expect("runs");
    assert_eq!(runs.lines().collect::<Vec<_>>(), ["before", "after"]);

    agent.stop().await;
}

#[tokio::test]
async fn wakeups_sent_while_the_agent_is_offline_wait_in_its_session() {
    let port = free_port();
    let _broker = Mosquitto::start_on(port, "");
    let dir = tempfile::tempdir().expect("tempdir");

    // First run: the persistent session and its subscription are created.
    let agent = start_agent(agent_config(dir.path(), port), port);
    eventually("agent connected", || connected(dir.path(), None)).await;
    let mut server = ack_reader(("127.0.0.1", port), "console").await;
    wake_until_acked(&mut server, "online", 1).await;
    agent.stop().await;

    // While it is away, a wake-up is published (QoS 1): the broker queues it.
    let queued = wakeup("queued", 0);
    let payload = sign(&queued);
    server.send(publish("agents/a1/wake", 2, &payload)).await;

    // Second run: the queued wake-up arrives and runs.
    let agent = start_agent(agent_config(dir.path(), port), port);
    let mut finished = false;
    while !finished {
        match server.recv().await {
            Packet::Publish(p) => {
                if let Some(pid) = p.packet_id {
                    server
                        .send(Packet::PubAck(beckon_mqtt::Ack::new(pid)))
                        .await;
                }
                let ack: serde_json::Value = serde_json::from_slice(&p.payload).expect("json");
                finished = ack["wakeup_id"] == *queued.id && ack["stage"] == "finished";
            }
            Packet::PubAck(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let stdin = std::fs::read(dir.path().join("stdin-queued")).expect("queued wake-up ran");
    let stdin: beckon_identity::wakeup::WakeUp = serde_json::from_slice(&stdin).expect("json");
    assert_eq!(stdin, queued);
    agent.stop().await;
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM files.
fn write_pki(dir: &Path) {
    let ca = TestCa::new("test CA");
    ca.write_pem(dir, "ca.pem");
    let server = ca.server_cert(&["localhost", "127.0.0.1"]);
    std::fs::write(dir.join("server.pem"), server.cert_pem).expect("write");
    std::fs::write(dir.join("server.key"), server.key_pem).expect("write");
    let (cert, key) = ca.client_cert_pem("a1");
    std::fs::write(dir.join("client.pem"), cert).expect("write");
    std::fs::write(dir.join("client.key"), key).expect("write");
}

#[tokio::test]
async fn agent_connects_over_tls_with_a_client_certificate_through_the_ladder() {
    let pki = tempfile::tempdir().expect("tempdir");
    write_pki(pki.path());
    let plain_port = free_port();
    let tls_port = free_port();
    let p = pki.path().display();
    let extra = format!(
        "listener {tls_port} 127.0.0.1\ncafile {p}/ca.pem\ncertfile {p}/server.pem\nkeyfile {p}/server.key\nrequire_certificate true\n"
    );
    let _broker = Mosquitto::start_on(plain_port, &extra);

    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = agent_config(dir.path(), plain_port);
    config.broker.plain_port = None;
    config.broker.port = tls_port;
    // Nothing listens there: the 443 rungs would fail, but the first rung works.
    config.broker.fallback_port = free_port();
    config.broker.server_name = Some("localhost".into());
    config.broker.ca_file = Some(pki.path().join("ca.pem"));
    config.broker.client_cert = Some(pki.path().join("client.pem"));
    config.broker.client_key = Some(pki.path().join("client.key"));
    let connector = beckon_agent::LadderConnector::new(&config).expect("ladder");
    let agent = RunningAgent::start(config, connector);

    eventually("agent connected over TLS", || connected(dir.path(), None)).await;
    let state = AgentState::read(dir.path()).expect("read").expect("state");
    assert_eq!(state.path.as_deref(), Some("8883"), "the primary TLS path");
    assert_eq!(state.last_working_path.as_deref(), Some("8883"));
    let mut server = ack_reader(("127.0.0.1", plain_port), "console").await;
    let acks = wake_until_acked(&mut server, "over-tls", 1).await;
    assert_eq!(stages(&acks), ["received", "started", "finished"]);

    agent.stop().await;
}
