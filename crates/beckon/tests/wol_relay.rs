//! Wake-on-LAN relayed by an agent, end to end on loopback: Beckon's broker with the
//! console's tenant, the console, and a real agent (the library `beckon agent run` uses,
//! enrolled through the console's API) online on the sleeping machine's subnet. Asking the
//! console to wake the sleeper makes the agent send the magic packet, which arrives byte for
//! byte at a UDP socket of the test (the subnet is 127.0.0.0/30, so its broadcast address is
//! 127.0.0.3: nothing leaves this machine), and the console records the send "via agent
//! relay-1 to 127.0.0.3:port" with the agent's answer. Every wait is bounded.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use beckon_agent::enroll::{EnrollOptions, enroll};
use beckon_agent::inventory::{InterfaceAddress, Inventory};
use beckon_agent::{AgentConfig, LadderConnector, WakeUpCheck, run_agent};
use beckon_broker::{BrokerConfig, Listen, Server};
use beckon_console::{BrokerLink, Console, ConsoleConfig};
use serde_json::json;

use common::ConsoleApi;

const LIMIT: Duration = Duration::from_secs(30);

fn inventory(host: &str, address: &str, mac: &str) -> Inventory {
    Inventory {
        hostname: host.into(),
        os: "test".into(),
        addresses: vec![InterfaceAddress {
            address: address.parse().unwrap(),
            prefix_len: 30,
        }],
        macs: vec![mac.into()],
    }
}

async fn enroll_agent(
    console_url: &str,
    token: &str,
    dir: &Path,
    id: &str,
    inv: Inventory,
    broker_port: u16,
    broker_ca: &Path,
) -> AgentConfig {
    let mut opts = EnrollOptions::new(
        console_url,
        token,
        dir.join(id),
        dir.join(id).join("agent.toml"),
    );
    opts.agent_id = Some(id.into());
    opts.inventory = Some(inv);
    opts.extra_config = "[reconnect]\nstart_delay_max = \"0s\"\n".into();
    let mut config = enroll(&opts).await.expect("enrollment").config;
    config.broker.host = "127.0.0.1".into();
    config.broker.port = broker_port;
    config.broker.ca_file = Some(broker_ca.to_owned());
    config.checkin.console_url = None;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_agent_relays_the_magic_packet_and_the_console_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants");
    std::fs::create_dir_all(&tenants).unwrap();
    let mut broker_config = BrokerConfig {
        data_dir: dir.path().join("broker"),
        tenants_dir: Some(tenants.clone()),
        tenants_reload_interval_secs: 1,
        ..BrokerConfig::default()
    };
    broker_config.listeners.mqtts = Listen(Some("127.0.0.1:0".parse().unwrap()));
    broker_config.listeners.mqtt = Listen(None);
    let (bound, broker) = Server::bind(broker_config).await.expect("broker starts");
    let broker_port = bound.mqtts.unwrap().port();
    let broker_ca: PathBuf = bound.generated_ca.clone().unwrap();

    let mut config = ConsoleConfig::new(dir.path().join("console"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.broker = BrokerLink::Tls {
        host: "127.0.0.1".into(),
        port: broker_port,
        ca_file: Some(broker_ca.clone()),
    };
    // The test's subnet is on loopback (nothing may leave this machine).
    config.wol_relay_loopback = true;
    let console = Console::start(config).await.expect("console starts");
    std::fs::write(tenants.join("default.toml"), console.tenant_file()).unwrap();
    let token = console.create_api_token("test").await.unwrap();
    let api = ConsoleApi::new(&console.url(), &token);
    api.wait("console connects", "/api/v1/status", |s| {
        s["push_service"]["connected"] == true
    })
    .await;

    let (status, token) = api
        .call(
            "POST",
            "/api/v1/enrollment-tokens",
            Some(json!({"max_uses": 2})),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let token = token["token"].as_str().unwrap().to_owned();
    let agents = dir.path().join("agents");
    let relay_config = enroll_agent(
        &console.url(),
        &token,
        &agents,
        "relay-1",
        inventory("relay-1", "127.0.0.1", "02:00:00:00:00:01"),
        broker_port,
        &broker_ca,
    )
    .await;
    // The sleeper is enrolled but never runs: it is the machine to wake.
    enroll_agent(
        &console.url(),
        &token,
        &agents,
        "sleeper",
        inventory("sleeper", "127.0.0.2", "02:00:00:be:ef:01"),
        broker_port,
        &broker_ca,
    )
    .await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let check: Arc<dyn WakeUpCheck> = Arc::new(
        beckon_agent::wakeup::verifier(
            &relay_config.tenant,
            &relay_config.agent_id,
            &relay_config.wakeup.console_keys,
        )
        .unwrap(),
    );
    let connector = LadderConnector::new(&relay_config).unwrap();
    let agent = tokio::spawn(run_agent(relay_config, connector, check, stopped));
    api.wait("relay-1 online", "/api/v1/agents/relay-1", |a| {
        a["presence"] == "online"
    })
    .await;

    // The subnet broadcast of 127.0.0.2/30 is 127.0.0.3: the test listens there.
    let socket = tokio::net::UdpSocket::bind("127.0.0.3:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let (_, mut settings) = api.call("GET", "/api/v1/settings", None).await;
    settings["wol"] = json!({
        "addresses": [],
        "subnet_broadcast": false,
        "port": port,
        "repeats": 2,
        "secureon": "01:02:03:04",
        "relay": true,
    });
    let (status, body) = api.call("PUT", "/api/v1/settings", Some(settings)).await;
    assert_eq!(status, 200, "{body}");

    let (status, sends) = api.call("POST", "/api/v1/agents/sleeper/wol", None).await;
    assert_eq!(status, 200, "{sends}");
    let sends = sends.as_array().unwrap().clone();
    assert_eq!(sends.len(), 1, "one relayed send: {sends:?}");
    assert_eq!(sends[0]["via_agent"], "relay-1");
    assert_eq!(sends[0]["relay_state"], "requested");
    assert_eq!(sends[0]["destination"], format!("127.0.0.3:{port}"));

    // The packet as the specification writes it, built here by hand.
    let mut want = vec![0xFF; 6];
    for _ in 0..16 {
        want.extend_from_slice(&[0x02, 0, 0, 0xbe, 0xef, 0x01]);
    }
    want.extend_from_slice(&[1, 2, 3, 4]);
    let mut buf = [0u8; 512];
    for i in 0..2 {
        let (n, from) = tokio::time::timeout(LIMIT, socket.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("magic packet {} did not arrive", i + 1))
            .unwrap();
        assert!(from.ip().is_loopback(), "{from}");
        assert_eq!(&buf[..n], want.as_slice(), "packet {} byte for byte", i + 1);
    }

    let history = api
        .wait(
            "the relay's answer recorded",
            "/api/v1/agents/sleeper/wol",
            |h| h[0]["relay_state"] == "answered",
        )
        .await;
    let send = &history[0];
    assert_eq!(send["via_agent"], "relay-1", "{send}");
    assert_eq!(send["destination"], format!("127.0.0.3:{port}"), "{send}");
    assert_eq!(send["packets"], 2, "{send}");
    assert_eq!(send["mac"], "02:00:00:be:ef:01", "{send}");
    assert!(send["error"].is_null(), "{send}");

    // With relaying off, no agent is asked (and no destination is left here).
    let (_, mut settings) = api.call("GET", "/api/v1/settings", None).await;
    settings["wol"]["relay"] = json!(false);
    api.call("PUT", "/api/v1/settings", Some(settings)).await;
    let (status, body) = api.call("POST", "/api/v1/agents/sleeper/wol", None).await;
    assert_eq!(status, 422, "{body}");

    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    console.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), broker.shutdown()).await;
}
