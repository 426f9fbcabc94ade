//! `beckon up --demo-agents 3` as a process, as a newcomer runs it: three agents enroll
//! through the console's API, come online, and a wake-up sent through the API to one of them
//! ends `finished` (its check-in reached the console). A second start reuses the three.
//! Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::Up;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Polls the agent list until `n` agents came online since this start; returns their ids.
fn wait_online(up: &Up, cookie: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, agents, _) = up.request("GET", "/api/v1/agents", cookie, "");
        assert_eq!(status, 200, "{agents}");
        let online: Vec<String> = agents
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|a| {
                        a["presence"] == "online"
                            && a["presence_at"].as_u64() >= Some(up.started_ms)
                    })
                    .filter_map(|a| a["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if online.len() == n {
            return online;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} agents online after {WAIT:?}: {agents}",
            online.len()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Sends a wake-up to `agent` and waits until its delivery is finished; returns it.
fn wake_and_wait_finished(up: &Up, cookie: &str, agent: &str) -> Value {
    let body = serde_json::json!({"target": {"agents": [agent]}, "reason": "test"}).to_string();
    let (status, call, _) = up.request("POST", "/api/v1/calls", cookie, &body);
    assert_eq!(status, 201, "call refused: {call}");
    let id = call["id"].as_str().expect("call id").to_owned();
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, call, _) = up.request("GET", &format!("/api/v1/calls/{id}"), cookie, "");
        assert_eq!(status, 200, "{call}");
        let delivery = &call["deliveries"][0];
        if delivery["state"] == "finished" {
            return delivery.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the wake-up did not finish within {WAIT:?}: {call}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn demo_agents_enroll_come_online_answer_a_wake_up_and_are_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("beckon-data");

    let first = Up::start(&data, 3, true);
    assert!(
        first
            .stdout
            .iter()
            .any(|l| l.contains("3 demo agents running (3 enrolled now")),
        "{:?}",
        first.stdout
    );
    let password = first
        .password()
        .unwrap_or_else(|| panic!("no admin password printed: {:?}", first.stdout));
    let cookie = first.login(&password);
    let mut online = wait_online(&first, &cookie, 3);
    online.sort();
    assert_eq!(online, ["demo-01", "demo-02", "demo-03"]);

    let delivery = wake_and_wait_finished(&first, &cookie, "demo-02");
    assert_eq!(
        delivery["status"], "ok",
        "the check-in action failed: {delivery}"
    );
    let (_, agent, _) = first.request("GET", "/api/v1/agents/demo-02", &cookie, "");
    assert!(
        agent["last_checkin"].is_number(),
        "the woken agent checked in with the console: {agent}"
    );
    let key = data.join("demo-agents/demo-02/agent.key");
    let mode = std::fs::metadata(&key).expect("demo key").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let cert = std::fs::read(data.join("demo-agents/demo-02/agent.pem")).expect("cert");
    drop(first);

    let second = Up::start(&data, 3, true);
    assert!(
        second
            .stdout
            .iter()
            .any(|l| l.contains("3 demo agents running (0 enrolled now")),
        "a second start reuses the demo agents: {:?}",
        second.stdout
    );
    assert_eq!(
        std::fs::read(data.join("demo-agents/demo-02/agent.pem")).expect("cert"),
        cert,
        "not enrolled again"
    );
    // A wake-up sent at once, before the agents have reconnected to the restarted broker
    // (which lost their sessions): the console resends it when the agent comes online, and
    // the agent's subscription is in place by then.
    let cookie = second.login(&password);
    let delivery = wake_and_wait_finished(&second, &cookie, "demo-01");
    assert_eq!(delivery["status"], "ok", "{delivery}");
    wait_online(&second, &cookie, 3);
    let delivery = wake_and_wait_finished(&second, &cookie, "demo-03");
    assert_eq!(delivery["status"], "ok", "{delivery}");
}
