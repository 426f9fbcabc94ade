//! The console and the broker as real processes (`beckon console`, `beckon broker`), with
//! agents that hold their own certificates from the console's enrollment API (simulated MQTT
//! clients here, each counting the wake-ups it receives):
//!
//! - the broker stopped: the console's status says "Push service servers are not reachable"
//!   with the failing step; a call made meanwhile stays queued; the broker started again:
//!   reachable, and the call reaches the agent (delivered, started, finished);
//! - the console SIGKILLed while it sends a call to a few hundred agents, then restarted on
//!   the same data folder: the call is there with a state for every agent, every agent gets
//!   its wake-up, and none gets it twice.
//!
//! Children are killed on drop; every wait is bounded.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::fleet::{Identity, Received, enrollment_request, http, sim_agent};
use common::{Process, beckon_command, free_port};

const LIMIT: Duration = Duration::from_secs(60);

/// `beckon ARGS` with its output (both streams) collected; killed on drop.
fn spawn(name: &str, args: &[String]) -> Process {
    let mut command = beckon_command(args);
    command.env("RUST_LOG", "info").stderr(Stdio::piped());
    Process::spawn(name, command)
}

/// Broker and console processes on one folder, and the console's API.
struct Installation {
    dir: tempfile::TempDir,
    broker_port: u16,
    console_port: u16,
    auth: String,
    password: String,
}

impl Installation {
    fn console_data(&self) -> PathBuf {
        self.dir.path().join("console")
    }

    fn start_console(&self) -> Process {
        spawn(
            "console",
            &[
                "console".into(),
                "--data-dir".into(),
                self.console_data().display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{}", self.console_port),
                "--plain-http".into(),
                "--broker".into(),
                format!("mqtts://127.0.0.1:{}", self.broker_port),
                "--agent-broker-endpoint".into(),
                format!("127.0.0.1:{}", self.broker_port),
            ],
        )
    }

    fn start_broker(&self) -> Process {
        let broker = self.dir.path().join("broker");
        spawn(
            "broker",
            &[
                "broker".into(),
                "--data".into(),
                broker.display().to_string(),
                "--mqtts".into(),
                format!("127.0.0.1:{}", self.broker_port),
                "--tenants-dir".into(),
                self.dir.path().join("tenants").display().to_string(),
                "--cert".into(),
                broker.join("server.pem").display().to_string(),
                "--key".into(),
                broker.join("server.key").display().to_string(),
            ],
        )
    }

    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, v, _) = http(self.console_port, method, path, &self.auth, body).await;
        assert_ne!(status, 0, "{v}");
        (status, v)
    }

    async fn wait(&self, what: &str, path: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + LIMIT;
        loop {
            let (_, v, _) = http(self.console_port, "GET", path, &self.auth, None).await;
            if f(&v) {
                return v;
            }
            // A call is summarised by its counts (hundreds of deliveries say nothing more).
            let shown = if v["counts"].is_object() {
                &v["counts"]
            } else {
                &v
            };
            assert!(Instant::now() < deadline, "{what}: {shown}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the console answers HTTP, then logs in and makes an API token.
    async fn login(&mut self) {
        let deadline = Instant::now() + LIMIT;
        let body = json!({"user": "admin", "password": self.password});
        let cookie = loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.console_port)).is_ok() {
                let (status, v, cookie) = http(
                    self.console_port,
                    "POST",
                    "/api/v1/login",
                    "",
                    Some(body.clone()),
                )
                .await;
                assert_eq!(status, 200, "login: {v}");
                break cookie.expect("a session cookie");
            }
            assert!(Instant::now() < deadline, "the console never listened");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (status, token, _) = http(
            self.console_port,
            "POST",
            "/api/v1/api-tokens",
            &format!("Cookie: {cookie}\r\n"),
            Some(json!({"name": "test"})),
        )
        .await;
        assert_eq!(status, 201, "{token}");
        self.auth = format!(
            "Authorization: Bearer {}\r\n",
            token["token"].as_str().expect("token")
        );
    }
}

/// Starts the console (first start: CA, keys, password), issues the broker's certificate
/// from its CA, enrolls `n` agents, writes the broker's tenant file and starts the broker.
async fn install(n: usize) -> (Installation, Process, Process, Vec<Identity>) {
    let mut inst = Installation {
        dir: tempfile::tempdir().expect("tempdir"),
        broker_port: free_port(),
        console_port: free_port(),
        auth: String::new(),
        password: String::new(),
    };
    let console = inst.start_console();
    let line = console.wait_output("password ", LIMIT).await;
    inst.password = line
        .split("password ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the admin password")
        .to_owned();
    inst.login().await;

    let data = inst.console_data();
    let ca = beckon_pki::CertificateAuthority::load(
        &data.join("tenant-ca.pem"),
        &data.join("tenant-ca.key"),
    )
    .expect("the console's CA");
    let broker_dir = inst.dir.path().join("broker");
    std::fs::create_dir_all(&broker_dir).unwrap();
    ca.issue_server(
        &["localhost".into(), "127.0.0.1".into()],
        Duration::from_secs(24 * 3600),
    )
    .unwrap()
    .save(
        &broker_dir.join("server.pem"),
        &broker_dir.join("server.key"),
    )
    .unwrap();

    let (status, token) = inst
        .api(
            "POST",
            "/api/v1/enrollment-tokens",
            Some(json!({"max_uses": n})),
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let token = token["token"].as_str().unwrap().to_owned();
    let mut agents = Vec::new();
    let mut wakeup_key = Value::Null;
    for i in 0..n {
        let id = format!("pc-{i:03}");
        // Each agent makes its own key pair, as `beckon agent enroll` does.
        let (key, request) = enrollment_request(&id, &token);
        let (status, e) = inst.api("POST", "/api/v1/enroll", Some(request)).await;
        assert_eq!(status, 201, "{e}");
        wakeup_key = e["wakeup_key"].clone();
        agents.push(Identity::enrolled(id, key, &e));
    }
    let tenants = inst.dir.path().join("tenants");
    std::fs::create_dir_all(&tenants).unwrap();
    std::fs::write(
        tenants.join("default.toml"),
        format!(
            "[[ca]]\npem = \"\"\"\n{}\"\"\"\n\n[[token_key]]\nkid = \"{}\"\npublic_key = \"{}\"\n",
            std::fs::read_to_string(data.join("tenant-ca.pem")).unwrap(),
            wakeup_key["kid"].as_str().unwrap(),
            wakeup_key["public_key"].as_str().unwrap(),
        ),
    )
    .unwrap();
    let broker = inst.start_broker();
    broker.wait_output("beckon broker: ready", LIMIT).await;
    (inst, console, broker, agents)
}

fn start_agents(
    inst: &Installation,
    agents: Vec<Identity>,
) -> (Received, tokio::sync::watch::Sender<bool>) {
    let received: Received = Arc::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let ca = inst.console_data().join("tenant-ca.pem");
    for who in agents {
        tokio::spawn(sim_agent(
            who,
            ca.clone(),
            inst.broker_port,
            Arc::clone(&received),
            stopped.clone(),
        ));
    }
    (received, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_stopped_is_reported_and_a_call_made_meanwhile_goes_out_when_it_is_back() {
    let (inst, _console, mut broker, agents) = install(1).await;
    let (received, _stop) = start_agents(&inst, agents);
    inst.wait("reachable with the agent online", "/api/v1/status", |s| {
        s["push_service"]["connected"] == true && s["agents_online"] == 1
    })
    .await;

    broker.kill();
    let status = inst
        .wait("not reachable", "/api/v1/status", |s| {
            s["push_service"]["connected"] == false
        })
        .await;
    let message = status["push_service"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.starts_with("Push service servers are not reachable: "),
        "{status}"
    );
    // The failing step is named, by the connection's error or the doctor's summary.
    let diagnosed = inst
        .wait("the failing step", "/api/v1/status", |s| {
            let m = s["push_service"]["message"].as_str().unwrap_or_default();
            m.contains("refused") || m.contains("TCP")
        })
        .await;
    let m = diagnosed["push_service"]["message"].as_str().unwrap();
    println!("status while the broker is down: {m}");
    assert!(
        m.contains(&inst.broker_port.to_string()),
        "names the broker port: {m}"
    );

    let (status, call) = inst
        .api(
            "POST",
            "/api/v1/calls",
            Some(json!({"target": {"agents": ["pc-000"]}, "reason": "while down"})),
        )
        .await;
    assert_eq!(status, 201, "{call}");
    let call_path = format!("/api/v1/calls/{}", call["id"].as_str().unwrap());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, c) = inst.api("GET", &call_path, None).await;
    assert_eq!(c["deliveries"][0]["state"], "queued", "{c}");

    let broker = inst.start_broker();
    broker.wait_output("beckon broker: ready", LIMIT).await;
    inst.wait("reachable again", "/api/v1/status", |s| {
        s["push_service"]["connected"] == true
            && s["push_service"]["message"] == "Push service servers are reachable"
    })
    .await;
    let c = inst
        .wait("the queued call reaches the agent", &call_path, |c| {
            c["deliveries"][0]["state"] == "finished"
        })
        .await;
    assert!(c["deliveries"][0]["sent_at"].is_i64(), "{c}");
    assert!(c["deliveries"][0]["delivered_at"].is_i64(), "{c}");
    assert!(c["deliveries"][0]["started_at"].is_i64(), "{c}");
    let wakeup_id = c["deliveries"][0]["wakeup_id"].as_str().unwrap().to_owned();
    let got = received.lock().unwrap().clone();
    assert_eq!(got["pc-000"].get(&wakeup_id), Some(&1), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_killed_during_a_large_call_loses_nothing_and_wakes_no_agent_twice() {
    const AGENTS: usize = 300;
    let (inst, mut console, _broker, agents) = install(AGENTS).await;
    let (received, _stop) = start_agents(&inst, agents);
    inst.wait("all agents online", "/api/v1/status", |s| {
        s["push_service"]["connected"] == true && s["agents_online"] == AGENTS
    })
    .await;

    // Killed while the wake-ups go out: as soon as the first agent has one. The console
    // sends a whole signing batch in one write, so on a busy machine the call may be all out
    // before the kill lands: then that call counts as a plain one (it must not go out again
    // either), and another call is made, up to a few times.
    let woken = || -> usize { received.lock().unwrap().values().map(|m| m.len()).sum() };
    let mut calls = Vec::new();
    let mut console_now;
    loop {
        let before = woken();
        let (status, call) = inst
            .api(
                "POST",
                "/api/v1/calls",
                Some(json!({"target": "all", "reason": "large"})),
            )
            .await;
        assert_eq!(status, 201, "{call}");
        calls.push(call["id"].as_str().unwrap().to_owned());
        let deadline = Instant::now() + LIMIT;
        while woken() == before {
            assert!(Instant::now() < deadline, "no agent was woken");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        console.kill();
        let at_kill = woken() - before;
        println!("agents woken when the console was killed: {at_kill} of {AGENTS}");
        console_now = inst.start_console();
        inst.wait("the console reconnects", "/api/v1/status", |s| {
            s["push_service"]["connected"] == true
        })
        .await;
        if at_kill < AGENTS {
            break;
        }
        assert!(
            calls.len() < 5,
            "the console was killed only after each of {} calls was all sent",
            calls.len()
        );
        console = console_now;
    }
    let _console = console_now;
    let mut deliveries = Vec::new();
    for id in &calls {
        let call_path = format!("/api/v1/calls/{id}");
        let c = inst
            .wait("every agent's wake-up acknowledged", &call_path, |c| {
                c["deliveries"].as_array().is_some_and(|d| {
                    d.len() == AGENTS
                        && d.iter().all(|d| {
                            ["delivered", "started", "finished"]
                                .contains(&d["state"].as_str().unwrap_or_default())
                        })
                })
            })
            .await;
        deliveries.extend(c["deliveries"].as_array().unwrap().iter().cloned());
    }
    // Late duplicates would arrive within moments.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = received.lock().unwrap().clone();
    assert_eq!(
        deliveries.len(),
        AGENTS * calls.len(),
        "a state for every agent"
    );
    for d in &deliveries {
        let agent = d["agent_id"].as_str().unwrap();
        let wakeup_id = d["wakeup_id"].as_str().unwrap();
        let counts = got.get(agent).cloned().unwrap_or_default();
        assert_eq!(
            counts.get(wakeup_id),
            Some(&1),
            "{agent} got its wake-up exactly once: {counts:?}"
        );
        assert_eq!(
            counts.values().sum::<u32>() as usize,
            calls.len(),
            "{agent} was woken once for each call: {counts:?}"
        );
    }
}
