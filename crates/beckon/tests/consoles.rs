//! Two `beckon console` processes on one PostgreSQL database, one broker, simulated agents:
//! a session made on one console works on the other; the other's live events show the
//! states of a call the first dispatches; the first SIGKILLed while its call waits for an
//! offline agent, the second takes the call over within 10 s and the agent gets its wake-up,
//! once. Needs `BECKON_TEST_POSTGRES` (scripts/test sets it for its PostgreSQL run); skipped
//! with a note without it. Children are killed on drop; every wait is bounded.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::fleet::{Identity, Received, enrollment_request, http, sim_agent};
use common::{Process, beckon_command, free_port};

const LIMIT: Duration = Duration::from_secs(60);

/// A fresh database on the server `BECKON_TEST_POSTGRES` names; `None` when unset.
fn postgres_database() -> Option<String> {
    let admin = std::env::var("BECKON_TEST_POSTGRES")
        .ok()
        .filter(|v| !v.is_empty())?;
    let name = format!("consoles_{}", std::process::id());
    let create = name.clone();
    // The synchronous client runs its own runtime: keep it off the test's.
    let admin_url = admin.clone();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&admin_url, postgres::NoTls)
            .expect("BECKON_TEST_POSTGRES: cannot connect");
        // One statement each: neither may run inside a transaction.
        for statement in [
            format!("DROP DATABASE IF EXISTS {create}"),
            format!("CREATE DATABASE {create}"),
        ] {
            client.batch_execute(&statement).unwrap();
        }
    })
    .join()
    .unwrap();
    let (base, _) = admin.rsplit_once('/').expect("a URL with a database");
    Some(format!("{base}/{name}"))
}

/// One console process of the pair.
struct Console {
    name: &'static str,
    data: PathBuf,
    port: u16,
}

impl Console {
    fn start(&self, database: &str, broker_port: u16) -> Process {
        let mut command = beckon_command([
            "console".to_owned(),
            "--data-dir".into(),
            self.data.display().to_string(),
            "--database".into(),
            database.into(),
            "--console-id".into(),
            self.name.into(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.port),
            "--plain-http".into(),
            "--broker".into(),
            format!("mqtts://127.0.0.1:{broker_port}"),
            "--agent-broker-endpoint".into(),
            format!("127.0.0.1:{broker_port}"),
        ]);
        command.env("RUST_LOG", "info").stderr(Stdio::piped());
        Process::spawn(self.name, command)
    }

    async fn api(&self, auth: &str, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v, _) = http(self.port, method, path, auth, body).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }

    async fn wait(&self, auth: &str, what: &str, path: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + LIMIT;
        loop {
            let (_, v, _) = http(self.port, "GET", path, auth, None).await;
            if f(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what} on {}: {v}", self.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The events of `GET /api/v1/events` on `port` as they come, parsed.
fn follow_events(port: u16, cookie: &str) -> Arc<Mutex<Vec<Value>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let (seen, request) = (
        events.clone(),
        format!(
            "GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
        ),
    );
    tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("the event stream");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut text = String::new();
        let mut buf = vec![0; 16 * 1024];
        loop {
            let n = match s.read(&mut buf).await {
                Ok(n) if n > 0 => n,
                _ => return,
            };
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            // Chunked framing aside, each event's data is one JSON line.
            while let Some(end) = text.find('\n') {
                let line: String = text.drain(..=end).collect();
                if let Some(data) = line.trim().strip_prefix("data:")
                    && let Ok(v) = serde_json::from_str::<Value>(data.trim())
                {
                    seen.lock().unwrap().push(v);
                }
            }
        }
    });
    events
}

fn copy_keys(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in ["tenant-ca.pem", "tenant-ca.key", "wakeup-signing.key"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

fn start_agent(
    who: Identity,
    ca: &Path,
    broker_port: u16,
    received: &Received,
) -> tokio::sync::watch::Sender<bool> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(sim_agent(
        who,
        ca.to_owned(),
        broker_port,
        received.clone(),
        stopped,
    ));
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_console_serves_the_session_shows_the_states_and_takes_over_a_killed_ones_call() {
    let Some(database) = postgres_database() else {
        println!(
            "skipped: several consoles share a PostgreSQL database; set BECKON_TEST_POSTGRES (scripts/test-postgres start DIR) to run this test"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let broker_port = free_port();
    let a = Console {
        name: "console-a",
        data: dir.path().join("a"),
        port: free_port(),
    };
    let b = Console {
        name: "console-b",
        data: dir.path().join("b"),
        port: free_port(),
    };

    // Console a makes the tenant CA, the signing key and the first user; b gets a copy of
    // the keys (as docs/console.md says), and the database has the rest.
    let mut console_a = a.start(&database, broker_port);
    let line = console_a.wait_output("password ", LIMIT).await;
    let password = line
        .split("password ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the admin password")
        .to_owned();
    let login = json!({"user": "admin", "password": password});
    let deadline = Instant::now() + LIMIT;
    let cookie = loop {
        let (status, v, cookie) =
            http(a.port, "POST", "/api/v1/login", "", Some(login.clone())).await;
        if status == 200 {
            break cookie.expect("a session cookie");
        }
        assert!(Instant::now() < deadline, "login on a: {status} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let auth = format!("Cookie: {cookie}\r\n");
    copy_keys(&a.data, &b.data);

    // Agents enroll through a; the broker trusts the tenant CA.
    let token = a
        .api(
            &auth,
            "POST",
            "/api/v1/enrollment-tokens",
            Some(json!({"max_uses": 3})),
        )
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut agents = Vec::new();
    let mut wakeup_key = Value::Null;
    for i in 0..3 {
        let id = format!("pc-{i:03}");
        let (key, request) = enrollment_request(&id, &token);
        let e = a.api(&auth, "POST", "/api/v1/enroll", Some(request)).await;
        wakeup_key = e["wakeup_key"].clone();
        agents.push(Identity::enrolled(id, key, &e));
    }
    let ca = beckon_pki::CertificateAuthority::load(
        &a.data.join("tenant-ca.pem"),
        &a.data.join("tenant-ca.key"),
    )
    .unwrap();
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir_all(&broker_dir).unwrap();
    ca.issue_server(&["127.0.0.1".into()], Duration::from_secs(3600))
        .unwrap()
        .save(
            &broker_dir.join("server.pem"),
            &broker_dir.join("server.key"),
        )
        .unwrap();
    let tenants = dir.path().join("tenants");
    std::fs::create_dir_all(&tenants).unwrap();
    std::fs::write(
        tenants.join("default.toml"),
        format!(
            "[[ca]]\npem = \"\"\"\n{}\"\"\"\n\n[[token_key]]\nkid = \"{}\"\npublic_key = \"{}\"\n",
            std::fs::read_to_string(a.data.join("tenant-ca.pem")).unwrap(),
            wakeup_key["kid"].as_str().unwrap(),
            wakeup_key["public_key"].as_str().unwrap(),
        ),
    )
    .unwrap();
    let mut broker = beckon_command([
        "broker".to_owned(),
        "--data".into(),
        broker_dir.display().to_string(),
        "--mqtts".into(),
        format!("127.0.0.1:{broker_port}"),
        "--tenants-dir".into(),
        tenants.display().to_string(),
        "--cert".into(),
        broker_dir.join("server.pem").display().to_string(),
        "--key".into(),
        broker_dir.join("server.key").display().to_string(),
    ]);
    broker.stderr(Stdio::piped());
    let broker = Process::spawn("broker", broker);
    broker.wait_output("beckon broker: ready", LIMIT).await;
    let console_b = b.start(&database, broker_port);

    // The session made on a works on b.
    let connected = |s: &Value| s["push_service"]["connected"] == true;
    b.wait(
        &auth,
        "the session of a, and the broker",
        "/api/v1/status",
        connected,
    )
    .await;
    a.wait(&auth, "connected", "/api/v1/status", connected)
        .await;

    let received: Received = Arc::default();
    let ca_file = a.data.join("tenant-ca.pem");
    let mut agents = agents.into_iter();
    let _online: Vec<_> = (&mut agents)
        .take(2)
        .map(|who| start_agent(who, &ca_file, broker_port, &received))
        .collect();
    let late = agents.next().unwrap();
    b.wait(&auth, "two agents online", "/api/v1/status", |s| {
        s["agents_online"] == 2
    })
    .await;

    // A call made and dispatched on a: b's live events show its states.
    let events = follow_events(b.port, &cookie);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let call = a
        .api(
            &auth,
            "POST",
            "/api/v1/calls",
            Some(json!({"target": "all", "reason": "two consoles"})),
        )
        .await;
    let call_id = call["id"].as_str().unwrap().to_owned();
    let call_path = format!("/api/v1/calls/{call_id}");
    let state_of = |c: &Value, agent: &str| {
        c["deliveries"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["agent_id"] == agent))
            .map(|d| d["state"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    let c = a
        .wait(
            &auth,
            "online agents finished, the offline one sent",
            &call_path,
            |c| {
                state_of(c, "pc-000") == "finished"
                    && state_of(c, "pc-001") == "finished"
                    && state_of(c, "pc-002") == "sent"
            },
        )
        .await;
    let shown = |agent: &str, state: &str| {
        events.lock().unwrap().iter().any(|e| {
            e["call_id"] == call_id.as_str() && e["agent_id"] == agent && e["state"] == state
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    // `sent` comes from a's PUBACK only: b shows it because a told it. (Acks reach both
    // consoles, and whichever writes one first tells the other.)
    while !(shown("pc-002", "sent") && shown("pc-000", "finished") && shown("pc-001", "finished")) {
        assert!(
            Instant::now() < deadline,
            "b's live events: {:?}\n{}",
            events.lock().unwrap(),
            console_b.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // a killed while pc-002 is offline; pc-002 comes online. b takes the call over and
    // pc-002 gets its wake-up.
    console_a.kill();
    let killed = Instant::now();
    let _late = start_agent(late, &ca_file, broker_port, &received);
    let done = b
        .wait(
            &auth,
            "pc-002 finished after the takeover",
            &call_path,
            |c| state_of(c, "pc-002") == "finished",
        )
        .await;
    let takeover = killed.elapsed();
    println!("a killed: b finished its call in {takeover:?}");
    assert!(takeover < Duration::from_secs(10), "{takeover:?}");

    // Late duplicates would come within moments.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = received.lock().unwrap().clone();
    for d in done["deliveries"].as_array().unwrap() {
        let agent = d["agent_id"].as_str().unwrap();
        let counts = got.get(agent).cloned().unwrap_or_default();
        assert_eq!(d["state"], "finished", "{done}");
        assert_eq!(
            counts.get(d["wakeup_id"].as_str().unwrap()),
            Some(&1),
            "{agent} got its wake-up once: {counts:?}"
        );
        assert_eq!(counts.len(), 1, "{agent}: {counts:?}");
    }
    assert_eq!(c["deliveries"].as_array().unwrap().len(), 3);
}
