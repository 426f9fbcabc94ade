//! `beckon wake` as a process against `beckon up --demo-agents 2` (a real console with a
//! real broker and two agents): a call to one agent and to all, followed to `finished` with
//! `--wait` (exit 0, the call id and a table); an agent that cannot finish in time (exit 1);
//! and refusals that name the fault (exit 2): a wrong token, a viewer's token (403, the
//! operator role needed), an unknown agent, an unreachable console, a token of the wrong
//! kind. Every wait is bounded.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Up, beckon_bin, free_port, output_within};

const WAIT: Duration = Duration::from_secs(40);

/// Logs in with the printed password and makes an API token; returns it and the session
/// cookie.
fn api_token(up: &Up) -> (String, String) {
    let password = up
        .password()
        .unwrap_or_else(|| panic!("no admin password printed: {:?}", up.stdout));
    let cookie = up.login(&password);
    let (status, t, _) = up.request("POST", "/api/v1/api-tokens", &cookie, r#"{"name":"wake"}"#);
    assert_eq!(status, 201, "{t}");
    (t["token"].as_str().expect("token").to_owned(), cookie)
}

fn wait_online(up: &Up, cookie: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, agents, _) = up.request("GET", "/api/v1/agents?presence=online", cookie, "");
        if agents.as_array().is_some_and(|a| a.len() == n) {
            return;
        }
        assert!(Instant::now() < deadline, "agents not online: {agents}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs `beckon wake ARGS`, killed if it outlives the limit.
fn wake(args: &[&str]) -> Output {
    let mut command = Command::new(beckon_bin());
    command
        .arg("wake")
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("BECKON_API_TOKEN")
        .env_remove("BECKON_CONSOLE_URL");
    output_within(command, WAIT)
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
    let up = Up::start(&dir.path().join("data"), 2, false);
    let (token, cookie) = api_token(&up);
    wait_online(&up, &cookie, 2);
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
    let (status, viewer, _) = up.request(
        "POST",
        "/api/v1/api-tokens",
        &cookie,
        r#"{"name":"watch","role":"viewer"}"#,
    );
    assert_eq!(status, 201, "{viewer}");
    let viewer = viewer["token"].as_str().expect("token").to_owned();
    let cases: [(Vec<&str>, &str); 6] = [
        (vec!["--token", "bkt_wrong", "demo-01"], "401"),
        (
            vec!["--token", &viewer, "demo-01"],
            "(HTTP 403): this needs the operator role",
        ),
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
    // Where a token comes from: the refusals and the help name the console's page for them.
    for args in [
        vec!["--console", url.as_str(), "--token", "bkt_wrong", "demo-01"],
        vec![
            "--console",
            url.as_str(),
            "--token",
            "bke_enrollment",
            "demo-01",
        ],
        vec!["--help"],
    ] {
        let (out, err) = text(&wake(&args));
        // --help wraps its lines: compare with the whitespace collapsed.
        let words = format!("{out} {err}")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            words.contains("API tokens page in the console"),
            "{args:?}: stdout {out} stderr {err}"
        );
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
