//! The agent against an in-memory broker peer: the test plays the broker through the codec
//! over `tokio::io::duplex` streams handed out by a test connector.

mod common;

use std::time::Duration;

use beckon_agent::state::AgentState;
use beckon_mqtt::{ConnAck, Disconnect, Packet, Properties, ReasonCode};
use common::*;
use tokio::io::DuplexStream;

/// Answers the agent's CONNECT on `broker` with a CONNACK refusing it with `code`; returns
/// the agent's next connection and how long the agent waited before opening it.
async fn refuse_and_await_retry(
    broker: &mut Peer<DuplexStream>,
    conns: &mut tokio::sync::mpsc::UnboundedReceiver<DuplexStream>,
    code: ReasonCode,
) -> (Peer<DuplexStream>, Duration) {
    assert!(matches!(broker.recv().await, Packet::Connect(_)));
    broker
        .send(Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: Properties::default(),
        }))
        .await;
    let refused_at = tokio::time::Instant::now();
    let next = next_connection(conns).await;
    (next, refused_at.elapsed())
}

/// Starts the agent and accepts its first connection, playing the broker; the receiver hands
/// out the agent's later connections.
async fn start_connected(
    config: beckon_agent::AgentConfig,
) -> (
    RunningAgent,
    Peer<DuplexStream>,
    tokio::sync::mpsc::UnboundedReceiver<DuplexStream>,
) {
    let (connector, mut conns, _log) = channel_connector();
    let agent = RunningAgent::start(config, connector);
    let mut broker = next_connection(&mut conns).await;
    broker.accept_agent().await;
    (agent, broker, conns)
}

fn state(dir: &std::path::Path) -> AgentState {
    AgentState::read(dir)
        .expect("read state")
        .expect("state written")
}

/// Reads acks until each id in `ids` has `finished`; returns them in arrival order.
async fn acks_until_finished(
    broker: &mut Peer<DuplexStream>,
    ids: &[&str],
) -> Vec<serde_json::Value> {
    let mut acks = Vec::new();
    while !ids.iter().all(|id| {
        acks.iter()
            .any(|a: &serde_json::Value| a["wakeup_id"] == *id && a["stage"] == "finished")
    }) {
        let (ack, publish) = broker.next_ack().await;
        assert_eq!(publish.topic, "agents/a1/ack");
        acks.push(ack);
    }
    acks
}

fn stages_of(acks: &[serde_json::Value], id: &str) -> Vec<String> {
    acks.iter()
        .filter(|a| a["wakeup_id"] == id)
        .map(|a| a["stage"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test]
async fn wakeup_runs_the_command_once_with_environment_and_stdin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"env | grep '^BECKON_' | sort > "env-$BECKON_WAKEUP_ID"; cat > "stdin-$BECKON_WAKEUP_ID"; echo run >> runs"#;
    let config = test_config(dir.path(), &command_action(dir.path(), script, "10s"));
    let (connector, mut conns, log) = channel_connector();
    let agent = RunningAgent::start(config, connector);

    let mut broker = next_connection(&mut conns).await;
    let connect = broker.accept_agent().await;
    assert_eq!(connect.client_id, "a1");
    assert!(
        !connect.clean_start,
        "persistent session so wake-ups queue while offline"
    );
    assert_eq!(connect.properties.session_expiry_interval, Some(86_400));
    assert_eq!(connect.keep_alive, 60);

    let first = wakeup("policy changed", 0);
    let w1 = first.id.clone();
    broker.send_wakeup(7, "a1", &sign(&first)).await;
    let acks = acks_until_finished(&mut broker, &[&w1]).await;
    assert_eq!(stages_of(&acks, &w1), ["received", "started", "finished"]);
    let finished = &acks[2];
    assert_eq!(finished["status"], "ok");
    assert_eq!(finished["exit_code"], 0);
    assert!(finished["duration_ms"].is_u64());

    let runs = std::fs::read_to_string(dir.path().join("runs")).expect("command ran");
    assert_eq!(runs.lines().count(), 1, "exactly one run");
    let env = std::fs::read_to_string(dir.path().join(format!("env-{w1}"))).expect("env written");
    for line in [
        &format!("BECKON_WAKEUP_ID={w1}"),
        "BECKON_WAKEUP_REASON=policy changed",
        "BECKON_WAKEUP_ACTION=checkin",
        "BECKON_WAKEUP_COUNT=1",
        "BECKON_AGENT_ID=a1",
        "BECKON_TENANT=acme",
    ] {
        assert!(env.lines().any(|l| l == line), "missing {line:?} in\n{env}");
    }
    let stdin = std::fs::read(dir.path().join(format!("stdin-{w1}"))).expect("stdin written");
    let stdin: beckon_identity::wakeup::WakeUp =
        serde_json::from_slice(&stdin).expect("the wake-up JSON on stdin");
    assert_eq!(stdin, first);

    // The same wake-up again (a replay) is acknowledged at MQTT level and otherwise dropped.
    broker.send_wakeup(8, "a1", &sign(&first)).await;
    let (w2, again) = signed_wakeup("second", 0);
    broker.send_wakeup(9, "a1", &again).await;
    let acks = acks_until_finished(&mut broker, &[&w2]).await;
    assert!(
        acks.iter().all(|a| a["wakeup_id"] == *w2),
        "no ack for the replay: {acks:?}"
    );
    let runs = std::fs::read_to_string(dir.path().join("runs")).expect("runs");
    assert_eq!(runs.lines().count(), 2);

    let s = state(dir.path());
    assert!(s.connected);
    assert_eq!(s.path.as_deref(), Some("memory"));
    assert_eq!(
        s.last_wakeup.as_ref().map(|w| w.id.as_str()),
        Some(w2.as_str())
    );
    assert_eq!(
        s.last_result.as_ref().map(|r| r.status.as_str()),
        Some("ok")
    );
    let text = beckon_agent::status::status_text(dir.path()).expect("status");
    assert!(text.contains("connected via memory"), "{text}");
    assert!(text.contains(&format!("{w2} (second)")), "{text}");
    assert!(
        log.lock()
            .expect("log")
            .preferred
            .contains(&"memory".to_owned())
    );

    agent.stop().await;
    assert!(
        matches!(broker.try_recv().await, Some(Packet::Disconnect(_))),
        "agent says DISCONNECT when it stops"
    );
    let text = beckon_agent::status::status_text(dir.path()).expect("status");
    assert!(text.contains("NOT running"), "{text}");
}

#[tokio::test]
async fn wakeups_during_a_run_merge_into_one_follow_up_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Records how many wake-ups each run answers, and is slow enough to overlap.
    let script = r#"echo "$BECKON_WAKEUP_COUNT $BECKON_WAKEUP_IDS" >> runs; sleep 1"#;
    let config = test_config(dir.path(), &command_action(dir.path(), script, "10s"));
    let (agent, mut broker, _conns) = start_connected(config).await;

    let (first, payload) = signed_wakeup("r", 0);
    broker.send_wakeup(1, "a1", &payload).await;
    let (received, _) = broker.next_ack().await;
    assert_eq!(
        (received["wakeup_id"].as_str(), received["stage"].as_str()),
        (Some(first.as_str()), Some("received"))
    );
    let (started, _) = broker.next_ack().await;
    assert_eq!(started["stage"], "started", "the first run is going on");

    let mut later = Vec::new();
    for i in 0..5u16 {
        let (id, payload) = signed_wakeup("r", 0);
        broker.send_wakeup(10 + i, "a1", &payload).await;
        later.push(id);
    }
    let mut all = vec![first.as_str()];
    all.extend(later.iter().map(String::as_str));
    let acks = acks_until_finished(&mut broker, &all).await;
    let runs = std::fs::read_to_string(dir.path().join("runs")).expect("runs");
    let runs: Vec<&str> = runs.lines().collect();
    assert_eq!(
        runs,
        [format!("1 {first}"), format!("5 {}", later.join(","))],
        "one run, then ONE follow-up run"
    );
    for id in &later {
        assert_eq!(
            stages_of(&acks, id),
            ["received", "started", "finished"],
            "{id}"
        );
        let finished = acks
            .iter()
            .find(|a| a["wakeup_id"] == **id && a["stage"] == "finished")
            .expect("finished");
        assert_eq!(finished["status"], "ok");
    }
    let last = state(dir.path()).last_result.expect("result");
    assert_eq!(last.wakeup_ids.len(), 5);
    agent.stop().await;
}

#[tokio::test]
async fn failing_and_hanging_commands_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = r#"if [ "$BECKON_WAKEUP_REASON" = fail ]; then exit 3; fi; sleep 30"#;
    let config = test_config(dir.path(), &command_action(dir.path(), script, "500ms"));
    let (agent, mut broker, _conns) = start_connected(config).await;

    let (fail, payload) = signed_wakeup("fail", 0);
    broker.send_wakeup(1, "a1", &payload).await;
    let acks = acks_until_finished(&mut broker, &[&fail]).await;
    let finished = acks.last().expect("finished");
    assert_eq!(finished["status"], "failed");
    assert_eq!(finished["exit_code"], 3);

    let (hang, payload) = signed_wakeup("hang", 0);
    broker.send_wakeup(2, "a1", &payload).await;
    let acks = acks_until_finished(&mut broker, &[&hang]).await;
    let finished = acks.last().expect("finished");
    assert_eq!(finished["status"], "timed_out", "{finished}");
    assert!(
        finished["detail"]
            .as_str()
            .is_some_and(|d| d.contains("killed"))
    );
    let s = state(dir.path());
    assert!(s.last_error.expect("error").message.contains("killed"));
    agent.stop().await;
}

#[tokio::test]
async fn refused_wakeups_get_no_ack_and_do_not_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(
        dir.path(),
        &command_action(dir.path(), "echo run >> runs", "5s"),
    );
    let (agent, mut broker, _conns) = start_connected(config).await;

    // Expired an hour ago.
    let mut expired = wakeup("old", 0);
    expired.issued_at -= 3600;
    expired.expires_at -= 3600;
    // For another agent of the tenant.
    let tenant = beckon_identity::TenantId::new("acme").expect("tenant");
    let other = beckon_identity::wakeup::WakeUp::new(
        &tenant,
        "a2",
        "not yours",
        beckon_agent::timefmt::unix_now_ms(),
        600,
        0,
    )
    .expect("wake-up");
    // Signed by a key the agent does not trust.
    let stranger = beckon_identity::wakeup::WakeUpSigner::new(
        beckon_identity::SigningKey::generate(
            beckon_identity::KeyId::new("console-test").expect("kid"),
        )
        .expect("key"),
    );
    let forged = stranger.sign(&wakeup("forged", 0)).expect("sign");
    // Altered after signing.
    let altered = String::from_utf8(sign(&wakeup("tampered", 0)))
        .expect("utf8")
        .replace("tampered", "tampere2");
    let cases: [(&str, Vec<u8>); 5] = [
        ("expired", sign(&expired)),
        ("malformed", b"not json at all".to_vec()),
        ("does not verify", forged),
        ("does not verify", altered.into_bytes()),
        ("is for agent \"a2\"", sign(&other)),
    ];
    for (i, (why, payload)) in cases.iter().enumerate() {
        // The PUBACK comes after the wake-up was checked and the refusal recorded.
        broker.send_wakeup(1 + i as u16, "a1", payload).await;
        let recorded = state(dir.path()).last_error.map(|e| e.message);
        assert!(
            recorded.as_deref().is_some_and(|m| m.contains(why)),
            "expected a refusal naming {why:?}, recorded {recorded:?}"
        );
    }
    // A valid one afterwards proves that nothing else was acked or queued before it.
    let (ok, payload) = signed_wakeup("r", 0);
    broker.send_wakeup(10, "a1", &payload).await;
    let acks = acks_until_finished(&mut broker, &[&ok]).await;
    assert!(acks.iter().all(|a| a["wakeup_id"] == *ok), "{acks:?}");
    let runs = std::fs::read_to_string(dir.path().join("runs")).expect("runs");
    assert_eq!(runs.lines().count(), 1);
    agent.stop().await;
}

#[tokio::test]
async fn missing_pingresp_means_dead_connection_and_the_agent_reconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path(), "");
    config.broker.keepalive_direct = Duration::from_secs(1);
    let (connector, mut conns, log) = channel_connector();
    let agent = RunningAgent::start(config, connector);

    let mut broker = next_connection(&mut conns).await;
    let connect = broker.accept_agent().await;
    assert_eq!(connect.keep_alive, 1);
    // The agent pings within its keepalive; the broker keeps silent.
    assert_eq!(broker.recv().await, Packet::PingReq);
    let mut second = next_connection(&mut conns).await;
    second.accept_agent().await;
    assert_eq!(log.lock().expect("log").connects, 2);
    let error = state(dir.path()).last_error.expect("error").message;
    assert!(error.contains("keepalive ping"), "{error}");
    // The new connection is healthy: pings answered, no third connection.
    assert_eq!(second.recv().await, Packet::PingReq);
    second.send(Packet::PingResp).await;
    assert_eq!(second.recv().await, Packet::PingReq);
    second.send(Packet::PingResp).await;
    assert!(
        conns.try_recv().is_err(),
        "no reconnect while pings are answered"
    );
    // The first stream was dropped by the agent.
    assert!(broker.try_recv().await.is_none());
    agent.stop().await;
}

#[tokio::test]
async fn server_busy_redirect_and_refused_credentials_are_handled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (connector, mut conns, log) = channel_connector();
    let agent = RunningAgent::start(test_config(dir.path(), ""), connector);

    // 1. Use another server: the connector is told where.
    let mut b = next_connection(&mut conns).await;
    assert!(matches!(b.recv().await, Packet::Connect(_)));
    b.send(Packet::ConnAck(ConnAck {
        session_present: false,
        code: ReasonCode::USE_ANOTHER_SERVER,
        properties: Properties::from(beckon_mqtt::PropertySet {
            server_reference: Some("b2.example.com:8883".into()),
            ..Default::default()
        }),
    }))
    .await;

    // 2. Server busy: the agent waits at least busy_wait_min (100 ms) before coming back.
    let mut b = next_connection(&mut conns).await;
    assert_eq!(log.lock().expect("log").redirects, ["b2.example.com:8883"]);
    let (mut b, waited) = refuse_and_await_retry(&mut b, &mut conns, ReasonCode::SERVER_BUSY).await;
    assert!(
        waited >= Duration::from_millis(100),
        "busy wait was only {waited:?}"
    );
    let error = state(dir.path()).last_error.expect("error").message;
    assert!(error.contains("server busy"), "{error}");

    // 3. Bad credentials: logged clearly, retried near the cap (200 ms), not given up.
    let (mut b, waited) =
        refuse_and_await_retry(&mut b, &mut conns, ReasonCode::BAD_USER_NAME_OR_PASSWORD).await;
    assert!(
        waited >= Duration::from_millis(100),
        "credential wait was only {waited:?}"
    );
    let error = state(dir.path()).last_error.expect("error").message;
    assert!(error.contains("bad credentials"), "{error}");

    // 4. A server DISCONNECT with "server moved" mid-session is followed too.
    b.accept_agent().await;
    b.send(Packet::Disconnect(Disconnect {
        code: ReasonCode::SERVER_MOVED,
        properties: Properties::from(beckon_mqtt::PropertySet {
            server_reference: Some("b3.example.com".into()),
            ..Default::default()
        }),
    }))
    .await;
    let mut b = next_connection(&mut conns).await;
    assert_eq!(
        log.lock().expect("log").redirects,
        ["b2.example.com:8883", "b3.example.com"]
    );
    b.accept_agent().await;
    agent.stop().await;
}

#[tokio::test]
async fn unacknowledged_acks_are_resent_after_a_reconnect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path(), &command_action(dir.path(), "true", "5s"));
    let (agent, mut broker, mut conns) = start_connected(config).await;
    let (_, payload) = signed_wakeup("r", 0);
    broker.send_wakeup(1, "a1", &payload).await;
    // Read the three acks without PUBACKing them, then cut the connection.
    let mut first = Vec::new();
    while first.len() < 3 {
        match broker.recv_answering_pings().await {
            Packet::Publish(p) => first.push(p),
            other => panic!("expected ack, got {other:?}"),
        }
    }
    drop(broker);
    let mut broker = next_connection(&mut conns).await;
    broker.accept_agent().await;
    let mut again = Vec::new();
    for _ in 0..3 {
        let (json, p) = broker.next_ack().await;
        assert!(p.dup, "resent with DUP");
        again.push((
            json["stage"].as_str().unwrap_or("?").to_owned(),
            p.packet_id,
        ));
    }
    let ids: Vec<_> = first.iter().map(|p| p.packet_id).collect();
    assert_eq!(
        again,
        vec![
            ("received".to_owned(), ids[0]),
            ("started".to_owned(), ids[1]),
            ("finished".to_owned(), ids[2])
        ],
        "same order, same packet ids"
    );
    agent.stop().await;
}

/// A one-request-per-connection HTTP server on loopback that answers `status` and hands each
/// request (head and body) to the test.
async fn http_server(status: u16) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            // Head, then as many body bytes as Content-Length says.
            let request = loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let length = text[..head_end]
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= head_end + 4 + length {
                        break Some(text);
                    }
                }
            };
            let reply = format!("HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\n\r\n");
            let _ = stream.write_all(reply.as_bytes()).await;
            if let Some(request) = request {
                let _ = tx.send(request);
            }
        }
    });
    (port, rx)
}

#[tokio::test]
async fn wakeup_checks_in_and_calls_the_local_http_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, mut requests) = http_server(200).await;
    let extra = format!(
        "[actions.http]\nurl = \"http://127.0.0.1:{port}/hook\"\ntimeout = \"5s\"\n\n[checkin]\nconsole_url = \"http://127.0.0.1:{port}\"\n"
    );
    let config = test_config(dir.path(), &extra);
    let (agent, mut broker, _conns) = start_connected(config).await;

    let w = wakeup("inventory", 0);
    broker.send_wakeup(1, "a1", &sign(&w)).await;
    let acks = acks_until_finished(&mut broker, &[&w.id]).await;
    assert_eq!(acks.last().expect("finished")["status"], "ok");

    let mut seen = Vec::new();
    for _ in 0..2 {
        let request = tokio::time::timeout(WAIT, requests.recv())
            .await
            .expect("request in time")
            .expect("server running");
        seen.push(request);
    }
    let checkin = seen
        .iter()
        .find(|r| r.starts_with("POST /api/v1/agents/a1/checkin HTTP/1.1\r\n"))
        .expect("built-in check-in with the console");
    assert!(
        checkin.contains(&format!("\"wakeup_id\":\"{}\"", w.id)),
        "{checkin}"
    );
    let hook = seen
        .iter()
        .find(|r| r.starts_with("POST /hook HTTP/1.1\r\n"))
        .expect("the local HTTP action");
    assert!(
        hook.contains(&format!("X-Beckon-Wakeup-Id: {}\r\n", w.id)),
        "{hook}"
    );
    let body = &hook[hook.find("\r\n\r\n").expect("head end") + 4..];
    let sent: beckon_identity::wakeup::WakeUp =
        serde_json::from_str(body).expect("wake-up JSON body");
    assert_eq!(sent, w);
    agent.stop().await;
}

#[tokio::test]
async fn http_error_answers_fail_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, _requests) = http_server(503).await;
    let extra = format!("[actions.http]\nurl = \"http://127.0.0.1:{port}/hook\"\n");
    let (agent, mut broker, _conns) = start_connected(test_config(dir.path(), &extra)).await;
    let (id, payload) = signed_wakeup("r", 0);
    broker.send_wakeup(1, "a1", &payload).await;
    let acks = acks_until_finished(&mut broker, &[&id]).await;
    let finished = acks.last().expect("finished");
    assert_eq!(finished["status"], "failed");
    assert!(
        finished["detail"]
            .as_str()
            .is_some_and(|d| d.contains("HTTP 503")),
        "{finished}"
    );
    let text = beckon_agent::status::status_text(dir.path()).expect("status");
    assert!(text.contains("Last result:  failed"), "{text}");
    agent.stop().await;
}

#[tokio::test]
async fn keepalive_follows_the_path_and_the_brokers_server_keep_alive() {
    // Via 443 or a proxy the agent asks for the shorter keepalive.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut connector, mut conns, _log) = channel_connector();
    connector.fallback = true;
    let agent = RunningAgent::start(test_config(dir.path(), ""), connector);
    let mut broker = next_connection(&mut conns).await;
    let connect = broker.accept_agent().await;
    assert_eq!(connect.keep_alive, 30);
    agent.stop().await;

    // The broker's Server Keep Alive wins: 1 s here, so a ping comes well before 60 s.
    let dir = tempfile::tempdir().expect("tempdir");
    let (connector, mut conns, _log) = channel_connector();
    let agent = RunningAgent::start(test_config(dir.path(), ""), connector);
    let mut broker = next_connection(&mut conns).await;
    let Packet::Connect(connect) = broker.recv().await else {
        panic!("CONNECT expected");
    };
    assert_eq!(connect.keep_alive, 60);
    broker
        .send(Packet::ConnAck(ConnAck {
            session_present: false,
            code: ReasonCode::SUCCESS,
            properties: Properties::from(beckon_mqtt::PropertySet {
                server_keep_alive: Some(1),
                ..Default::default()
            }),
        }))
        .await;
    assert!(matches!(broker.recv().await, Packet::Subscribe(_)));
    assert_eq!(
        broker.recv().await,
        Packet::PingReq,
        "pinged at the broker's pace"
    );
    agent.stop().await;
}

#[tokio::test]
async fn acks_beyond_the_in_flight_limit_follow_as_soon_as_slots_free_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path(), &command_action(dir.path(), "true", "5s"));
    let (agent, mut broker, _conns) = start_connected(config).await;
    // Six wake-ups make 18 acks; the broker acknowledges none of them for now.
    for i in 0..6u16 {
        let (_, payload) = signed_wakeup("r", 0);
        broker.send_wakeup(1 + i, "a1", &payload).await;
    }
    let mut unacked = Vec::new();
    let mut total = 0;
    while unacked.len() < 16 {
        match broker.held_or_recv().await {
            Packet::Publish(p) => unacked.push(p.packet_id.expect("QoS 1")),
            Packet::PingReq => broker.send(Packet::PingResp).await,
            other => panic!("unexpected {other:?}"),
        }
    }
    total += unacked.len();
    // At most 16 in flight: nothing more until the broker acknowledges.
    assert!(
        broker
            .recv_within(Duration::from_millis(300))
            .await
            .is_none(),
        "more than 16 acks in flight"
    );
    for id in unacked {
        broker.send(Packet::PubAck(beckon_mqtt::Ack::new(id))).await;
    }
    // The rest follows at once (well before the 60 s keepalive would wake the session).
    while total < 18 {
        let (_, _) = broker.next_ack().await;
        total += 1;
    }
    agent.stop().await;
}

#[tokio::test]
async fn an_undecodable_packet_gets_a_disconnect_with_its_reason_and_a_reconnect() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (agent, broker, mut conns) = start_connected(test_config(dir.path(), "")).await;
    // A PUBLISH announcing 100 KiB: beyond the 64 KiB the agent accepts.
    let mut stream = broker.into_inner();
    stream
        .write_all(&[0x30, 0x80, 0x80, 0x06])
        .await
        .expect("write");
    let mut broker = Peer::new(stream);
    match broker.recv().await {
        Packet::Disconnect(d) => assert_eq!(d.code, ReasonCode::PACKET_TOO_LARGE),
        other => panic!("expected DISCONNECT 0x95, got {other:?}"),
    }
    let mut again = next_connection(&mut conns).await;
    again.accept_agent().await;
    let error = state(dir.path()).last_error.expect("error").message;
    assert!(error.contains("undecodable packet"), "{error}");
    agent.stop().await;
}
