//! `beckon wake` as a process against `beckon up --demo-agents 2` (a real console with a
//! real broker and two agents): a call to one agent and to all, followed to `finished` with
//! `--wait` (exit 0, the call id and a table); an agent that cannot finish in time (exit 1);
//! and refusals that name the fault (exit 2): a wrong token, an unknown agent, an
//! unreachable console, a token of the wrong kind. Every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const WAIT: Duration = Duration::from_secs(40);

fn beckon_bin() -> String {
    std::env::var("BECKON_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_beckon").to_owned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

struct Up {
    child: Child,
    stdout: Vec<String>,
    console: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    fn start(data: &Path, demo_agents: u16) -> Self {
        let console = format!("127.0.0.1:{}", free_port());
        let mqtts = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(beckon_bin())
            .args(["up", "--data"])
            .arg(data)
            .args([
                "--console",
                &console,
                "--mqtts",
                &mqtts,
                "--fallback",
                "off",
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
        }
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
        (
            status,
            serde_json::from_str(body).unwrap_or(Value::Null),
            head.to_owned(),
        )
    }

    /// Logs in with the printed password and makes an API token.
    fn api_token(&self) -> (String, String) {
        let password = self
            .stdout
            .iter()
            .find_map(|l| {
                l.split("password ")
                    .nth(1)?
                    .split_whitespace()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| panic!("no admin password printed: {:?}", self.stdout));
        let body = format!(r#"{{"user":"admin","password":"{password}"}}"#);
        let (status, _, head) = self.request("POST", "/api/v1/login", "", &body);
        assert_eq!(status, 200, "login refused: {head}");
        let cookie = head
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .and_then(|c| c.split(';').next())
            .expect("a session cookie")
            .to_owned();
        let (status, t, _) =
            self.request("POST", "/api/v1/api-tokens", &cookie, r#"{"name":"wake"}"#);
        assert_eq!(status, 201, "{t}");
        (t["token"].as_str().expect("token").to_owned(), cookie)
    }

    fn wait_online(&self, cookie: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (_, agents, _) = self.request("GET", "/api/v1/agents?presence=online", cookie, "");
            if agents.as_array().is_some_and(|a| a.len() == n) {
                return;
            }
            assert!(Instant::now() < deadline, "agents not online: {agents}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Runs `beckon wake ARGS`, killed if it outlives the limit.
fn wake(args: &[&str]) -> Output {
    let mut child = Command::new(beckon_bin())
        .arg("wake")
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("BECKON_API_TOKEN")
        .env_remove("BECKON_CONSOLE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn beckon wake");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("beckon wake {args:?} did not end within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn wake_calls_follows_and_explains_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(&dir.path().join("data"), 2);
    let (token, cookie) = up.api_token();
    up.wait_online(&cookie, 2);
    let url = format!("http://{}", up.console);

    // One agent, followed to the end.
    let o = wake(&[
        "--console",
        &url,
        "--token",
        &token,
        "demo-01",
        "--reason",
        "cli",
        "--wait",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    let mut lines = out.lines();
    let id = lines.next().expect("the call id");
    assert_eq!(id.len(), 36, "a UUID: {out}");
    assert!(
        lines
            .next()
            .is_some_and(|h| h.starts_with("AGENT") && h.contains("STATE")),
        "{out}"
    );
    let row = lines.next().expect("a row");
    assert!(
        row.starts_with("demo-01") && row.contains("finished") && row.contains("ok"),
        "{out}"
    );
    let (status, call, _) = up.request("GET", &format!("/api/v1/calls/{id}"), &cookie, "");
    assert_eq!(status, 200);
    assert_eq!(call["reason"], "cli", "{call}");

    // All agents, without waiting: just the id.
    let o = wake(&["--console", &url, "--token", &token, "--all"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    // All agents, waiting.
    let o = wake(&["--console", &url, "--token", &token, "--all", "--wait"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout: {out}\nstderr: {err}");
    assert_eq!(
        out.lines().filter(|l| l.contains("finished")).count(),
        2,
        "{out}"
    );

    // A spread window longer than the wait: not final in time, exit 1, the table says where
    // it stands.
    let o = wake(&[
        "--console",
        &url,
        "--token",
        &token,
        "demo-02",
        "--spread",
        "60s",
        "--wait",
        "--timeout",
        "2s",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("demo-02"), "{out}");
    assert!(err.contains("not in a final state"), "{err}");

    // Refusals: exit 2 and the reason; nothing is called.
    let (_, before, _) = up.request("GET", "/api/v1/calls", &cookie, "");
    let cases: [(Vec<&str>, &str); 5] = [
        (vec!["--token", "bkt_wrong", "demo-01"], "401"),
        (vec!["--token", &token, "no-such-agent"], "no-such-agent"),
        (vec!["--token", &token, "--group", "nobody"], "nobody"),
        (
            vec!["--token", "bke_enrollment", "demo-01"],
            "must be an API token",
        ),
        (
            vec!["--token", &token, "demo-01", "--expiry", "soon"],
            "not a duration",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["--console", url.as_str()];
        all.extend(args.iter());
        let o = wake(&all);
        let (out, err) = text(&o);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: stdout {out} stderr {err}"
        );
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
    let (_, after, _) = up.request("GET", "/api/v1/calls", &cookie, "");
    assert_eq!(
        before.as_array().map(Vec::len),
        after.as_array().map(Vec::len),
        "no call was made"
    );

    // No target at all; a console that is not there.
    let o = wake(&["--console", &url, "--token", &token]);
    assert_eq!(o.status.code(), Some(2));
    let closed = format!("http://127.0.0.1:{}", free_port());
    let o = wake(&["--console", &closed, "--token", &token, "--all"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot reach the console") && err.contains(&closed),
        "{err}"
    );
}
