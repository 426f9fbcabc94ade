//! testssl.sh (Debian package `testssl.sh`) against a `beckon broker`'s MQTT-over-TLS port
//! and its shared HTTPS port on loopback: protocols, cipher categories, forward secrecy,
//! server preferences, the certificate and every known vulnerability. A finding of severity
//! MEDIUM or above fails, except those a private CA always has (docs/security.md lists them).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Process, beckon_command, find_program};
use serde_json::Value;

/// How long one scan may take (it takes well under a minute on an idle machine).
const SCAN_LIMIT: Duration = Duration::from_secs(300);

/// Findings a broker whose certificate comes from its own (private) CA has by design, with why;
/// keep this list and docs/security.md ("Accepted TLS findings") the same.
const ACCEPTED: &[(&str, &str)] = &[
    (
        "cert_chain_of_trust",
        "agents trust the broker's private CA, which no public trust store holds",
    ),
    (
        "cert_revocation",
        "a private CA publishes no revocation URI: the tenant files revoke agents",
    ),
];

/// Severities that fail the test; FATAL means the scan itself failed.
const FAILING: &[&str] = &["MEDIUM", "HIGH", "CRITICAL", "FATAL"];

/// One testssl.sh run against `127.0.0.1:port`, writing its findings to `json`.
fn start_scan(testssl: &Path, port: u16, json: &Path, http: bool) -> Child {
    let mut command = Command::new(testssl);
    command.args([
        "--quiet",
        "--color",
        "0",
        "--warnings",
        "off",
        // Loopback only: no DNS, and the broker's generated certificate names 127.0.0.1.
        "--nodns",
        "none",
        "--jsonfile",
    ]);
    command.arg(json);
    // Protocols, cipher categories, forward secrecy, server preference, server defaults
    // (the certificate), vulnerabilities; HTTP headers where HTTP is served.
    command.args(["-p", "-s", "-f", "-P", "-S", "-U"]);
    if http {
        command.arg("-h");
    }
    command
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start testssl")
}

/// Waits for `scan` within [`SCAN_LIMIT`] (killed after it) and returns its findings.
fn findings(mut scan: Child, json: &Path, started: Instant) -> Vec<Value> {
    while scan.try_wait().expect("wait").is_none() {
        if started.elapsed() > SCAN_LIMIT {
            let _ = scan.kill();
            let _ = scan.wait();
            panic!("testssl did not finish within {SCAN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = std::fs::read_to_string(json).expect("testssl wrote its JSON file");
    match serde_json::from_str(&text).expect("testssl's JSON") {
        Value::Array(findings) => findings,
        other => panic!("not a list of findings: {other}"),
    }
}

fn field<'a>(finding: &'a Value, name: &str) -> &'a str {
    finding.get(name).and_then(Value::as_str).unwrap_or("")
}

/// The findings of severity MEDIUM or above that are not accepted, as `id: severity finding`;
/// and checks that the scan reached the port (TLS 1.3 offered, TLS 1.0 not).
fn unaccepted(what: &str, findings: &[Value]) -> Vec<String> {
    let by_id: BTreeMap<&str, &str> = findings
        .iter()
        .map(|f| (field(f, "id"), field(f, "finding")))
        .collect();
    assert!(
        by_id
            .get("TLS1_3")
            .is_some_and(|f| f.starts_with("offered")),
        "{what}: testssl did not see TLS 1.3 offered: {by_id:?}"
    );
    assert!(
        by_id
            .get("TLS1")
            .is_some_and(|f| f.starts_with("not offered")),
        "{what}: TLS 1.0 is offered or was not tested: {by_id:?}"
    );
    for f in findings {
        if !matches!(field(f, "severity"), "OK" | "INFO" | "DEBUG") {
            eprintln!(
                "{what}: {} {}: {}",
                field(f, "severity"),
                field(f, "id"),
                field(f, "finding")
            );
        }
    }
    findings
        .iter()
        .filter(|f| FAILING.contains(&field(f, "severity")))
        .filter(|f| {
            let id = field(f, "id");
            // Per-certificate ids carry a suffix when several certificates are served.
            !ACCEPTED
                .iter()
                .any(|(accepted, _)| id == *accepted || id.starts_with(&format!("{accepted} ")))
        })
        .map(|f| {
            format!(
                "{what}: {}: {} {}",
                field(f, "id"),
                field(f, "severity"),
                field(f, "finding")
            )
        })
        .collect()
}

#[test]
fn testssl_finds_nothing_of_medium_severity_or_above_on_either_tls_port() {
    let testssl = find_program("testssl", &["/usr/bin/testssl.sh"], "testssl.sh");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut command = beckon_command(["broker", "--data"]);
    command
        .arg(&data)
        .args(["--mqtts", "127.0.0.1:0", "--fallback", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null());
    let broker = Process::spawn("beckon broker", command);
    broker.wait_stdout("beckon broker: ready", Duration::from_secs(30));
    let port = |prefix: &str| -> u16 {
        let stdout = broker.stdout();
        let addr = stdout
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in {stdout:?}"));
        let addr: std::net::SocketAddr = addr.trim().parse().expect("address");
        addr.port()
    };
    let mqtts = port("beckon broker: MQTT over TLS on ");
    let shared = port("beckon broker: shared HTTPS port (MQTT, WebSocket /mqtt, /healthz) on ");

    // Both ports at once: the scans mostly wait on the network and on openssl.
    let started = Instant::now();
    let (json_mqtts, json_shared) = (dir.path().join("8883.json"), dir.path().join("443.json"));
    let scan_mqtts = start_scan(&testssl, mqtts, &json_mqtts, false);
    let scan_shared = start_scan(&testssl, shared, &json_shared, true);
    let mut problems = unaccepted("MQTT over TLS", &findings(scan_mqtts, &json_mqtts, started));
    problems.extend(unaccepted(
        "shared HTTPS port",
        &findings(scan_shared, &json_shared, started),
    ));
    eprintln!("testssl: both ports scanned in {:?}", started.elapsed());
    assert!(problems.is_empty(), "{problems:#?}");
}
