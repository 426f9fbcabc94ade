//! The deployment of docs/deployment.md, command by command, as separate processes on
//! loopback: the console serving HTTPS with its generated certificate, the broker with a
//! certificate from `beckon console issue-broker-cert` and the console's tenant file, one agent
//! enrolled over HTTPS with `--ca` and running, and `beckon wake --wait` that ends with the
//! agent finished.
//!
//! This test mirrors the walkthrough of docs/deployment.md: change one, change the other. The
//! doc's host names (console.example.com, push.example.com) are 127.0.0.1 here, its
//! folders are under a temporary folder, and its `curl` calls go through the agent's HTTP
//! client. Children are killed on drop; every wait is bounded.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use beckon_agent::http::{HttpClient, Url, console_client, request};
use serde_json::{Value, json};

use common::{Process, beckon_command, free_port, succeeded};

const LIMIT: Duration = Duration::from_secs(60);

/// `beckon ARGS` as a service (console, broker, agent), its output collected.
fn service(name: &str, args: &[&str]) -> Process {
    let mut command = beckon_command(args);
    command.env("RUST_LOG", "info").stderr(Stdio::piped());
    Process::spawn(name, command)
}

/// `beckon ARGS` that ends (issue-broker-cert, enroll, wake): its output, after checking that
/// it succeeded. Killed if it outlives the limit.
fn command(args: &[&str]) -> Output {
    let mut command = beckon_command(args);
    command
        .env("RUST_LOG", "warn")
        .env_remove("BECKON_API_TOKEN")
        .env_remove("BECKON_CONSOLE_URL")
        .env_remove("BECKON_CONSOLE_DATA")
        .env_remove("BECKON_ENROLL_TOKEN");
    succeeded(command, LIMIT)
}

/// The console's API over HTTPS, trusting only the console's CA file (what `curl --cacert`
/// does in the doc).
struct Api {
    base: Url,
    client: HttpClient,
    auth: (&'static str, String),
}

impl Api {
    fn new(url: &str, ca: &Path) -> Self {
        let base = Url::parse(url).expect("the console's URL");
        let client = console_client(&base, Some(ca)).expect("client");
        Self {
            base,
            client,
            auth: ("Authorization", String::new()),
        }
    }

    /// One request with the API token or session cookie set so far; status, JSON and the
    /// `set-cookie` value.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value, String) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let headers: Vec<(&str, String)> = if self.auth.1.is_empty() {
            Vec::new()
        } else {
            vec![self.auth.clone()]
        };
        let r = request(
            &self.client,
            &self.base.with_path(path),
            method,
            &headers,
            body.as_bytes(),
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let cookie = r
            .header("set-cookie")
            .and_then(|c| c.split(';').next())
            .unwrap_or_default()
            .to_owned();
        let json = serde_json::from_slice(&r.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.body).into_owned()));
        (r.status, json, cookie)
    }

    /// Polls GET `path` until `f` holds, and returns the body.
    async fn wait(&self, what: &str, path: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + LIMIT;
        loop {
            let (_, v, _) = self.call("GET", path, None).await;
            if f(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: {v}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployment_walkthrough_ends_with_a_woken_agent() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    // Three "hosts": their folders.
    let console_data = tmp.path().join("console-host/var/lib/beckon-console");
    let console_out = tmp.path().join("console-host/broker-cert");
    let broker_etc = tmp.path().join("broker-host/etc/beckon");
    let broker_data = tmp.path().join("broker-host/var/lib/beckon");
    let agent_host = tmp.path().join("agent-host");
    std::fs::create_dir_all(broker_etc.join("tenants")).expect("tenants folder");
    std::fs::create_dir_all(&agent_host).expect("agent host");
    let console_port = free_port();
    let broker_port = free_port();
    let console_url = format!("https://127.0.0.1:{console_port}");
    let broker_endpoint = format!("127.0.0.1:{broker_port}");

    // Step 2: the console, HTTPS for its public name, pointed at the broker.
    let console = service(
        "console",
        &[
            "console",
            "--data-dir",
            &path(&console_data),
            "--listen",
            &format!("127.0.0.1:{console_port}"),
            "--server-name",
            "127.0.0.1",
            "--public-url",
            &console_url,
            "--broker",
            &format!("mqtts://{broker_endpoint}"),
            "--agent-broker-endpoint",
            &broker_endpoint,
        ],
    );
    let line = console.wait_output("password ", LIMIT).await;
    let password = line
        .split("password ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the admin password")
        .to_owned();
    console
        .wait_output("Beckon console at https://", LIMIT)
        .await;

    // Step 3: the broker's certificate from the tenant CA, copied to the broker host.
    command(&[
        "console",
        "issue-broker-cert",
        "--data-dir",
        &path(&console_data),
        "--name",
        "127.0.0.1",
        "--out",
        &path(&console_out),
    ]);
    for file in ["broker.pem", "broker.key"] {
        std::fs::copy(console_out.join(file), broker_etc.join(file)).expect("copy");
    }
    // The CA file the operator's machine, the agents and the broker host trust.
    let ca = agent_host.join("console-ca.pem");
    std::fs::copy(console_data.join("tenant-ca.pem"), &ca).expect("copy the CA");

    // Step 4: an API token (login, then POST /api/v1/api-tokens), and the tenant file
    // fetched with it into the broker's tenants folder.
    let mut api = Api::new(&console_url, &ca);
    let (status, v, cookie) = api
        .call(
            "POST",
            "/api/v1/login",
            Some(json!({"user": "admin", "password": password})),
        )
        .await;
    assert_eq!(status, 200, "login: {v}");
    api.auth = ("Cookie", cookie);
    let (status, token, _) = api
        .call("POST", "/api/v1/api-tokens", Some(json!({"name": "ops"})))
        .await;
    assert_eq!(status, 201, "{token}");
    let api_token = token["token"].as_str().expect("token").to_owned();
    api.auth = ("Authorization", format!("Bearer {api_token}"));
    let (status, tenant_file, _) = api.call("GET", "/api/v1/tenant-file", None).await;
    assert_eq!(status, 200, "{tenant_file}");
    std::fs::write(
        broker_etc.join("tenants/default.toml"),
        tenant_file.as_str().expect("TOML text"),
    )
    .expect("tenant file");

    // Step 5: the broker with that certificate and tenants folder; the console connects.
    let broker = service(
        "broker",
        &[
            "broker",
            "--data",
            &path(&broker_data),
            "--mqtts",
            &format!("127.0.0.1:{broker_port}"),
            "--cert",
            &path(&broker_etc.join("broker.pem")),
            "--key",
            &path(&broker_etc.join("broker.key")),
            "--tenants-dir",
            &path(&broker_etc.join("tenants")),
        ],
    );
    broker.wait_output("beckon broker: ready", LIMIT).await;
    api.wait("the console reaches the broker", "/api/v1/status", |s| {
        s["push_service"]["connected"] == true
    })
    .await;

    // Step 6: an enrollment token; the agent enrolls over HTTPS with --ca, then runs.
    let (status, t, _) = api
        .call(
            "POST",
            "/api/v1/enrollment-tokens",
            Some(json!({"max_uses": 1})),
        )
        .await;
    assert_eq!(status, 201, "{t}");
    let config = agent_host.join("etc/beckon-agent/agent.toml");
    command(&[
        "agent",
        "enroll",
        "--console",
        &console_url,
        "--ca",
        &path(&ca),
        "--token",
        t["token"].as_str().expect("enrollment token"),
        "--state-dir",
        &path(&agent_host.join("var/lib/beckon-agent")),
        "--config-out",
        &path(&config),
        "--name",
        "host-1",
    ]);
    let _agent = service("agent", &["agent", "run", "--config", &path(&config)]);
    let agents = api
        .wait("the agent online", "/api/v1/agents", |a| {
            a.as_array()
                .is_some_and(|a| a.len() == 1 && a[0]["presence"] == "online")
        })
        .await;
    let agent_id = agents[0]["id"].as_str().expect("agent id").to_owned();

    // Step 7: wake it and wait until it has finished.
    let out = command(&[
        "wake",
        "--console",
        &console_url,
        "--ca",
        &path(&ca),
        "--token",
        &api_token,
        &agent_id,
        "--reason",
        "deployment walkthrough",
        "--wait",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&agent_id) && stdout.contains("finished"),
        "{stdout}"
    );
    let status = api.wait("status", "/api/v1/status", |_| true).await;
    assert_eq!(status["certificate_warnings"], json!([]), "{status}");
    eprintln!("walkthrough took {:?}", started.elapsed());
    drop(broker);
    drop(console);
}
