//! What the tests that run `beckon up` as a child process share: the process itself (started
//! on free loopback ports, waited for until it reports ready, killed on drop) and plain
//! HTTP/1.1 requests to its console. Every wait is bounded.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// Not every test program uses every one.
#[allow(unused_imports)]
pub use beckon_testkit::{find_program, free_port};
use serde_json::Value;

pub mod fleet;

/// How long one API request may take.
const API_WAIT: Duration = Duration::from_secs(20);

/// How long `beckon up` may take to report ready.
const READY_WAIT: Duration = Duration::from_secs(40);

/// The `beckon` binary: `BECKON_BIN` when set (the project's test script sets it), else the
/// one cargo built for this test.
pub fn beckon_bin() -> String {
    std::env::var("BECKON_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_beckon").to_owned())
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The output lines of a child process, shared with the threads that read its pipes.
type Lines = Arc<Mutex<Vec<String>>>;

fn locked(lines: &Lines) -> std::sync::MutexGuard<'_, Vec<String>> {
    lines.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `beckon` command with `args`, the environment's broker listener settings removed (a
/// test names its own ports).
pub fn beckon_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    command_of(&beckon_bin(), args)
}

/// [`beckon_command`] for the `beckon` binary at `bin` (an installed one, say).
pub fn command_of<I, S>(bin: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(bin);
    command
        .args(args)
        .env_remove("BECKON_MQTTS")
        .env_remove("BECKON_MQTT");
    command
}

/// Runs `command` to its end with its output captured (stdin closed); kills it and fails the
/// test if it outlives `limit`.
pub fn output_within(mut command: Command, limit: Duration) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{command:?} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// A child process (a `beckon` command, mostly) whose output lines are collected as they
/// come; killed (SIGKILL) and reaped on drop.
pub struct Process {
    name: String,
    child: Child,
    stdout: Lines,
    stderr: Lines,
    /// Both streams, in the order the lines were read.
    output: Lines,
}

impl Process {
    /// Starts `command` with its stdout piped and collected. Its stderr is collected too when
    /// the caller piped it (else it goes where the caller sent it).
    pub fn spawn(name: &str, mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (stdout, stderr, output) = Default::default();
        let out = child.stdout.take().expect("stdout");
        collect(out, [Arc::clone(&stdout), Arc::clone(&output)]);
        if let Some(err) = child.stderr.take() {
            collect(err, [Arc::clone(&stderr), Arc::clone(&output)]);
        }
        Self {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            output,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// What it printed on stdout so far.
    pub fn stdout(&self) -> Vec<String> {
        locked(&self.stdout).clone()
    }

    /// What it printed on stderr so far (when the caller piped it).
    pub fn stderr(&self) -> Vec<String> {
        locked(&self.stderr).clone()
    }

    /// Its last 40 lines of output, for a failure message.
    pub fn text(&self) -> String {
        let lines = locked(&self.output);
        let start = lines.len().saturating_sub(40);
        lines[start..].join("\n")
    }

    /// Waits until a line on stdout contains `needle`; fails the test after `wait`.
    pub fn wait_stdout(&self, needle: &str, wait: Duration) {
        let deadline = Instant::now() + wait;
        while !locked(&self.stdout).iter().any(|l| l.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "{}: no {needle:?} on stdout within {wait:?}; got {:?}\nstderr: {:?}",
                self.name,
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits, without blocking the runtime, until a line of its output (either stream)
    /// contains `needle`, and returns it; fails the test after `wait`.
    pub async fn wait_output(&self, needle: &str, wait: Duration) -> String {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(l) = locked(&self.output).iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{}: no line with {needle:?} within {wait:?}:\n{}",
                self.name,
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether it has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Sends the signal `name` (TERM, HUP...) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// Waits until it exits; fails the test after `wait`.
    pub fn wait_exit(&mut self, wait: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {wait:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `stream` line by line into each of `into`, on a thread of its own.
fn collect<const N: usize>(stream: impl Read + Send + 'static, into: [Lines; N]) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            for lines in &into {
                locked(lines).push(line.clone());
            }
        }
    });
}

/// Runs `command` to its end within `limit` ([`output_within`]); its output, after checking
/// that it succeeded.
pub fn succeeded(command: Command, limit: Duration) -> std::process::Output {
    let what = format!("{command:?}");
    let out = output_within(command, limit);
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `beckon up` as a child process, killed on drop.
pub struct Up {
    process: Process,
    /// What it printed on stdout until it reported ready.
    pub stdout: Vec<String>,
    /// The console's address (`127.0.0.1:port`).
    pub console: String,
    /// Unix ms when this process was started: presence older than that is from an earlier run.
    pub started_ms: u64,
}

impl Up {
    /// Starts `beckon up --data <data>` with its console and MQTT over TLS on free loopback
    /// ports, the 443 fallback on one too (or off when `fallback` is false), and
    /// `demo_agents` demo agents (none: the flag is not given); waits until it reports ready.
    pub fn start(data: &Path, demo_agents: u16, fallback: bool) -> Self {
        Self::start_bin(&beckon_bin(), data, demo_agents, fallback)
    }

    /// [`Up::start`] with the `beckon` binary at `bin`.
    pub fn start_bin(bin: &str, data: &Path, demo_agents: u16, fallback: bool) -> Self {
        Self::start_with(bin, data, demo_agents, fallback, &[])
    }

    /// [`Up::start_bin`] with more flags of `beckon up`.
    pub fn start_with(
        bin: &str,
        data: &Path,
        demo_agents: u16,
        fallback: bool,
        flags: &[&str],
    ) -> Self {
        let console = format!("127.0.0.1:{}", free_port());
        let mqtts = format!("127.0.0.1:{}", free_port());
        let fallback = if fallback {
            format!("127.0.0.1:{}", free_port())
        } else {
            "off".to_owned()
        };
        let started_ms = unix_ms();
        let mut command = command_of(bin, ["up", "--data"]);
        command.arg(data).args([
            "--console",
            &console,
            "--mqtts",
            &mqtts,
            "--fallback",
            &fallback,
        ]);
        command.args(flags);
        if demo_agents > 0 {
            command.args(["--demo-agents", &demo_agents.to_string()]);
        }
        command.env("RUST_LOG", "warn").stderr(Stdio::piped());
        let process = Process::spawn("beckon up", command);
        process.wait_stdout("beckon up: ready", READY_WAIT);
        Self {
            stdout: process.stdout(),
            process,
            console,
            started_ms,
        }
    }

    /// Polls the console's status (logged in with `cookie`) until its broker connection is up.
    pub fn wait_push_connected(&self, cookie: &str) {
        let deadline = Instant::now() + READY_WAIT;
        loop {
            let (_, status, _) = self.request("GET", "/api/v1/status", cookie, "");
            if status["push_service"]["connected"] == true {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the console never reached its broker: {status}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The warnings and errors logged so far.
    pub fn warnings(&self) -> Vec<String> {
        self.process
            .stderr()
            .into_iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect()
    }

    /// The admin password printed on the first start.
    pub fn password(&self) -> Option<String> {
        self.stdout.iter().find_map(|l| {
            let rest = l.split("password ").nth(1)?;
            rest.split_whitespace().next().map(str::to_owned)
        })
    }

    /// One HTTP/1.1 request to the console (with the session `cookie` unless empty); returns
    /// (status, JSON body, raw head).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        cookie: &str,
        body: &str,
    ) -> (u16, Value, String) {
        let (status, head, body) = http_request(&self.console, method, path, cookie, body);
        let json = serde_json::from_str(&body).unwrap_or(Value::Null);
        (status, json, head)
    }

    /// Logs in as admin with `password`; returns the session cookie.
    pub fn login(&self, password: &str) -> String {
        let body = format!(r#"{{"user":"admin","password":"{password}"}}"#);
        let (status, _, head) = self.request("POST", "/api/v1/login", "", &body);
        assert_eq!(status, 200, "login refused: {head}");
        head.lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .and_then(|c| c.split(';').next())
            .expect("a session cookie")
            .to_owned()
    }
}

/// The console's API called with an API token, through the agent's own HTTP client.
pub struct ConsoleApi {
    base: beckon_agent::http::Url,
    token: String,
}

impl ConsoleApi {
    /// The API of the console at `url` (`http://127.0.0.1:port`), with the API `token`.
    pub fn new(url: &str, token: &str) -> Self {
        Self {
            base: beckon_agent::http::Url::parse(url).expect("the console's URL"),
            token: token.to_owned(),
        }
    }

    /// One request; returns the status and the JSON body (`Null` when it is not JSON).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut headers = vec![("Authorization", format!("Bearer {}", self.token))];
        if !body.is_empty() {
            headers.push(("Content-Type", "application/json".into()));
        }
        let client = beckon_agent::http::console_client(&self.base, None).expect("client");
        let r = beckon_agent::http::request(
            &client,
            &self.base.with_path(path),
            method,
            &headers,
            body.as_bytes(),
            API_WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    }

    /// Polls GET `path` until `f` holds for its body, and returns it; fails the test with
    /// `what` after 30 s.
    pub async fn wait(&self, what: &str, path: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = self.call("GET", path, None).await;
            if f(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One HTTP/1.1 request to `addr` over plain TCP (with the session `cookie` unless empty,
/// and a JSON `body` unless empty); returns (status, raw head, body text). A connection that
/// fails mid-answer gives status 0.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    cookie: &str,
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
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
    (status, head.to_owned(), body.to_owned())
}
