//! `beckon up` as a process, as a newcomer runs it: the first start creates everything and
//! prints the admin password once; the console reaches its own broker; a second start on the
//! same folder reuses everything and prints no new password. A normal start logs no warning
//! (the console connects to its broker once it listens). The Grafana dashboard asks only
//! for metrics that broker and console export. Every wait is bounded.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Up, beckon_bin, free_port};

#[test]
fn first_start_creates_everything_and_the_second_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("beckon-data");

    let first = Up::start(&data, 0, true);
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

    let second = Up::start(&data, 0, true);
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

/// The Grafana dashboard (`dist/grafana/beckon.json`) names only metrics that a real broker
/// and console export: a metric renamed or removed fails here, not on an operator's screen.
#[test]
fn every_metric_the_dashboard_asks_for_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let up = Up::start_with(
        &beckon_bin(),
        &dir.path().join("beckon-data"),
        0,
        false,
        &["--admin", &admin],
    );
    assert!(
        up.stdout
            .iter()
            .any(|l| l.contains(&format!("http://{admin}/metrics"))),
        "beckon up names the metrics address: {:?}",
        up.stdout
    );
    let cookie = up.login(&up.password().expect("the admin password"));

    let (status, broker) = get(&admin, "/metrics", "");
    assert_eq!(status, 200, "{broker}");
    let (status, refused) = get(&up.console, "/metrics", "");
    assert_eq!(
        status, 401,
        "the console's metrics need a token or a session: {refused}"
    );
    let (status, console) = get(&up.console, "/metrics", &cookie);
    assert_eq!(status, 200, "{console}");
    let exported: BTreeSet<String> = exported_names(&broker)
        .into_iter()
        .chain(exported_names(&console))
        .collect();

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../dist/grafana/beckon.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard"))
            .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("a PromQL expression"));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(q) = variable["definition"].as_str() {
            queries.push(q);
        }
    }
    let used: BTreeSet<&str> = queries
        .iter()
        .flat_map(|q| q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| w.starts_with("beckon_"))
        .collect();
    let missing: Vec<_> = used.iter().filter(|n| !exported.contains(**n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard asks for metrics nobody exports: {missing:?}; exported: {exported:?}"
    );
    for side in ["beckon_broker_", "beckon_console_"] {
        assert!(
            used.iter().filter(|n| n.starts_with(side)).count() >= 8,
            "the dashboard shows {side}*: {used:?}"
        );
    }
}

/// The series names an exposition (OpenMetrics text) can hold: each `# TYPE` with the
/// suffixes of its type, and the name of every sample.
fn exported_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            if !name.is_empty() {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// `GET path` from `addr` over plain HTTP (with the session `cookie` unless empty): the
/// status and the body as text.
fn get(addr: &str, path: &str, cookie: &str) -> (u16, String) {
    let (status, _, body) = common::http_request(addr, "GET", path, cookie, "");
    (status, body)
}
