//! `beckon up --demo-agents 3` as a process, as a newcomer runs it: three agents enroll
//! through the console's API, come online, and a wake-up sent through the API to one of them
//! ends `finished` (its check-in reached the console). A second start reuses the three.
//! Every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

struct Up {
    child: Child,
    stdout: Vec<String>,
    console: String,
    /// Unix ms when this process was started: presence older than that is from an earlier run.
    started_ms: u64,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Up {
    fn start(data: &Path, demo_agents: u16) -> Self {
        let console = format!("127.0.0.1:{}", free_port());
        let mqtts = format!("127.0.0.1:{}", free_port());
        let started_ms = unix_ms();
        let fallback = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(env!("CARGO_BIN_EXE_beckon"))
            .args(["up", "--data"])
            .arg(data)
            .args([
                "--console",
                &console,
                "--mqtts",
                &mqtts,
                "--fallback",
                &fallback,
            ])
            .args(["--demo-agents", &demo_agents.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn beckon up");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut stdout = Vec::new();
        while !stdout
            .iter()
            .any(|l: &String| l.contains("beckon up: ready"))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => stdout.push(line),
                Err(_) => panic!("beckon up did not report ready; stdout: {stdout:?}"),
            }
        }
        Self {
            child,
            stdout,
            console,
            started_ms,
        }
    }

    fn password(&self) -> Option<String> {
        self.stdout.iter().find_map(|l| {
            let rest = l.split("password ").nth(1)?;
            rest.split_whitespace().next().map(str::to_owned)
        })
    }

    /// One HTTP/1.1 request; returns (status, JSON body, raw head).
    fn request(&self, method: &str, path: &str, cookie: &str, body: &str) -> (u16, Value, String) {
        let mut s = TcpStream::connect(&self.console).expect("connect to the console");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let cookie = if cookie.is_empty() {
            String::new()
        } else {
            format!("Cookie: {cookie}\r\n")
        };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{cookie}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(request.as_bytes()).expect("send request");
        let mut response = String::new();
        let _ = s.read_to_string(&mut response);
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let json = serde_json::from_str(body).unwrap_or(Value::Null);
        (status, json, head.to_owned())
    }

    fn login(&self, password: &str) -> String {
        let body = format!(r#"{{"user":"admin","password":"{password}"}}"#);
        let (status, _, head) = self.request("POST", "/api/v1/login", "", &body);
        assert_eq!(status, 200, "login refused: {head}");
        head.lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .and_then(|c| c.split(';').next())
            .expect("a session cookie")
            .to_owned()
    }

    /// Polls the agent list until `n` agents came online since this start; returns their ids.
    fn wait_online(&self, cookie: &str, n: usize) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, agents, _) = self.request("GET", "/api/v1/agents", cookie, "");
            assert_eq!(status, 200, "{agents}");
            let online: Vec<String> = agents
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|a| {
                            a["presence"] == "online"
                                && a["presence_at"].as_u64() >= Some(self.started_ms)
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
    fn wake_and_wait_finished(&self, cookie: &str, agent: &str) -> Value {
        let body = serde_json::json!({"target": {"agents": [agent]}, "reason": "test"}).to_string();
        let (status, call, _) = self.request("POST", "/api/v1/calls", cookie, &body);
        assert_eq!(status, 201, "call refused: {call}");
        let id = call["id"].as_str().expect("call id").to_owned();
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, call, _) = self.request("GET", &format!("/api/v1/calls/{id}"), cookie, "");
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
}

#[test]
fn demo_agents_enroll_come_online_answer_a_wake_up_and_are_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("beckon-data");

    let first = Up::start(&data, 3);
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
    let mut online = first.wait_online(&cookie, 3);
    online.sort();
    assert_eq!(online, ["demo-01", "demo-02", "demo-03"]);

    let delivery = first.wake_and_wait_finished(&cookie, "demo-02");
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

    let second = Up::start(&data, 3);
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
    let delivery = second.wake_and_wait_finished(&cookie, "demo-01");
    assert_eq!(delivery["status"], "ok", "{delivery}");
    second.wait_online(&cookie, 3);
    let delivery = second.wake_and_wait_finished(&cookie, "demo-03");
    assert_eq!(delivery["status"], "ok", "{delivery}");
}
