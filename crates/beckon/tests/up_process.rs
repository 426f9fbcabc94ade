//! `beckon up` as a process, as a newcomer runs it: the first start creates everything and
//! prints the admin password once; the console reaches its own broker; a second start on the
//! same folder reuses everything and prints no new password. A normal start logs no warning
//! (the console connects to its broker once it listens). Every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

struct Up {
    child: Child,
    stdout: Vec<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    console: String,
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
    fn start(data: &Path) -> Self {
        let console = format!("127.0.0.1:{}", free_port());
        let mqtts = format!("127.0.0.1:{}", free_port());
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
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn beckon up");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("stderr");
        let lines = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
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
            stderr,
            console,
        }
    }

    /// The warnings and errors logged so far.
    fn warnings(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .cloned()
            .collect()
    }

    fn password(&self) -> Option<String> {
        self.stdout.iter().find_map(|l| {
            let rest = l.split("password ").nth(1)?;
            rest.split_whitespace().next().map(str::to_owned)
        })
    }

    /// A plain HTTP/1.1 request to the console; returns (status line, headers+body).
    fn http(&self, request: &str) -> String {
        let mut s = TcpStream::connect(&self.console).expect("connect to the console");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).expect("send request");
        let mut response = String::new();
        let _ = s.read_to_string(&mut response);
        response
    }

    fn login(&self, password: &str) -> String {
        let body = format!(r#"{{"user":"admin","password":"{password}"}}"#);
        let response = self.http(&format!(
            "POST /api/v1/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "login refused: {response}"
        );
        response
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .and_then(|c| c.split(';').next())
            .expect("a session cookie")
            .to_owned()
    }

    /// Polls the console's status until its broker connection is up.
    fn wait_push_connected(&self, cookie: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let response = self.http(&format!(
                "GET /api/v1/status HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
            ));
            if response.contains(r#""connected":true"#) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the console never reached its broker: {response}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn first_start_creates_everything_and_the_second_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("beckon-data");

    let first = Up::start(&data);
    let password = first
        .password()
        .unwrap_or_else(|| panic!("no admin password printed: {:?}", first.stdout));
    let cookie = first.login(&password);
    first.wait_push_connected(&cookie);
    // A moment for anything that would still be logged about the start.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        first.warnings(),
        Vec::<String>::new(),
        "a normal start logs no warning"
    );
    assert!(data.join("console/tenant-ca.pem").exists());
    let server_cert = std::fs::read(data.join("broker/server.pem")).unwrap();
    drop(first);

    let second = Up::start(&data);
    assert_eq!(
        second.password(),
        None,
        "a second start must not print a new password: {:?}",
        second.stdout
    );
    assert_eq!(
        std::fs::read(data.join("broker/server.pem")).unwrap(),
        server_cert,
        "the broker certificate is reused"
    );
    let cookie = second.login(&password);
    second.wait_push_connected(&cookie);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        second.warnings(),
        Vec::<String>::new(),
        "a second start logs no warning"
    );
}
