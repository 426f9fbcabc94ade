//! One agent identity on two machines, as processes: `beckon up`, one `beckon agent enroll`,
//! then the enrolled folder copied to a second "machine" (a UTS namespace of its own, so its
//! host name differs) and both agents run. They take the push session from each other until
//! one of them stops fighting: it says why in its log and in `beckon agent status`, the
//! other keeps its connection, and the console flags the agent with both machines and the
//! fix; an administrator clears the flag, and both steps are in the audit log. The second
//! machine is `unshare --user --map-root-user --uts` (util-linux), which needs no root.
//! Every wait is bounded.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Process, Up, beckon_bin, beckon_command, succeeded};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(40);
const PAUSED: &str = "another machine uses this agent's identity";
const TAKEN_OVER: &str = "session taken over";

/// `beckon agent run` on a machine named `hostname`: the same binary in a UTS namespace of
/// its own (inside a user namespace, so that no root is needed to name it), whose host name
/// is all that differs from the test's machine.
fn agent_on(hostname: &str, config: &Path) -> Process {
    let mut command = Command::new("unshare");
    command
        .args(["--user", "--map-root-user", "--uts", "--", "sh", "-c"])
        .arg(format!(
            "hostname {hostname} && exec \"$0\" agent run --config \"$1\""
        ))
        .arg(beckon_bin())
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("BECKON_MQTTS")
        .env_remove("BECKON_MQTT")
        .stderr(Stdio::piped());
    Process::spawn(hostname, command)
}

fn status(state_dir: &Path) -> String {
    let out = succeeded(
        {
            let mut c = beckon_command(["agent", "status", "--state-dir"]);
            c.arg(state_dir);
            c
        },
        Duration::from_secs(10),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn count(p: &Process, needle: &str) -> usize {
    p.stderr().iter().filter(|l| l.contains(needle)).count()
}

/// Polls GET `path` until `f` holds; fails after `WAIT`.
fn wait_api(up: &Up, cookie: &str, what: &str, path: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, v, _) = up.request("GET", path, cookie, "");
        if f(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn two_machines_with_one_identity_are_flagged_and_stop_fighting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(&dir.path().join("beckon-data"), 0, false);
    let cookie = up.login(&up.password().expect("admin password printed"));
    let (status_code, token, _) = up.request(
        "POST",
        "/api/v1/enrollment-tokens",
        &cookie,
        r#"{"label":"twin"}"#,
    );
    assert_eq!(status_code, 201, "{token}");

    let (a, b) = (dir.path().join("pc-a"), dir.path().join("pc-b"));
    let mut enroll = beckon_command(["agent", "enroll", "--agent-id", "twin", "--console"]);
    enroll
        .arg(format!("http://{}", up.console))
        .arg("--token")
        .arg(token["token"].as_str().expect("token"))
        .arg("--state-dir")
        .arg(&a)
        .arg("--config-out")
        .arg(a.join("agent.toml"));
    succeeded(enroll, WAIT);
    // The clone: the whole folder copied to another machine, as a disk image would carry it.
    std::fs::create_dir_all(&b).expect("mkdir");
    for entry in std::fs::read_dir(&a).expect("read pc-a") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), b.join(entry.file_name())).expect("copy");
    }
    let config = std::fs::read_to_string(b.join("agent.toml")).expect("config");
    let config = config.replace(&a.display().to_string(), &b.display().to_string());
    std::fs::write(b.join("agent.toml"), config).expect("write config");

    let pc_a = agent_on("pc-a", &a.join("agent.toml"));
    let deadline = Instant::now() + WAIT;
    while !status(&a).contains("Push service: connected") {
        assert!(
            Instant::now() < deadline,
            "pc-a never connected:\n{}",
            pc_a.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pc_b = agent_on("pc-b", &b.join("agent.toml"));

    // One of them stops fighting, says why, and keeps away; the other keeps the session.
    let deadline = Instant::now() + WAIT;
    let (paused, paused_dir, kept_dir) = loop {
        if count(&pc_a, PAUSED) > 0 {
            break (&pc_a, &a, &b);
        }
        if count(&pc_b, PAUSED) > 0 {
            break (&pc_b, &b, &a);
        }
        assert!(
            Instant::now() < deadline,
            "neither agent stopped fighting:\n{}\n{}",
            pc_a.text(),
            pc_b.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let line = paused
        .stderr()
        .into_iter()
        .find(|l| l.contains(PAUSED))
        .expect("the line");
    assert!(
        line.contains("ERROR")
            && line.contains("taken over 3 times")
            && line.contains("beckon agent enroll --force"),
        "{line}"
    );
    let text = status(paused_dir);
    assert!(
        text.contains("Identity:     IN USE ON ANOTHER MACHINE")
            && text.contains("not reconnecting until")
            && text.contains("beckon agent enroll --force"),
        "{text}"
    );
    assert_eq!(count(paused, PAUSED), 1, "said once:\n{}", paused.text());

    // The fight is over: no more takeovers for a while, the other machine stays connected.
    std::thread::sleep(Duration::from_secs(2));
    let before = (count(&pc_a, TAKEN_OVER), count(&pc_b, TAKEN_OVER));
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        (count(&pc_a, TAKEN_OVER), count(&pc_b, TAKEN_OVER)),
        before,
        "takeovers went on:\n{}\n{}",
        pc_a.text(),
        pc_b.text()
    );
    let kept = status(kept_dir);
    assert!(kept.contains("Push service: connected"), "{kept}");
    assert!(!kept.contains("Identity:"), "{kept}");
    assert!(status(paused_dir).contains("Push service: NOT connected"));

    // The console shows both machines and the fix, and lists the agent under `cloned`.
    let agent = wait_api(
        &up,
        &cookie,
        "the agent flagged as cloned",
        "/api/v1/agents/twin",
        |v| v["cloned"].is_object(),
    );
    let mut machines: Vec<&str> = agent["cloned"]["machines"]
        .as_array()
        .expect("machines")
        .iter()
        .map(|m| m["hostname"].as_str().unwrap_or_default())
        .collect();
    machines.sort_unstable();
    assert_eq!(machines, ["pc-a", "pc-b"], "{agent}");
    assert!(
        agent["cloned"]["fix"]
            .as_str()
            .is_some_and(|f| f.contains("beckon agent enroll --force")),
        "{agent}"
    );
    let (_, listed, _) = up.request("GET", "/api/v1/agents?cloned=true", &cookie, "");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"], "twin");

    // Once one machine enrolled again, an administrator clears the flag.
    let (code, cleared, _) = up.request("DELETE", "/api/v1/agents/twin/clone", &cookie, "");
    assert_eq!(code, 200, "{cleared}");
    assert!(cleared["cloned"].is_null(), "{cleared}");
    let (_, listed, _) = up.request("GET", "/api/v1/agents?cloned=true", &cookie, "");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let audit = wait_api(&up, &cookie, "both steps audited", "/api/v1/audit", |v| {
        let whats: Vec<&str> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["what"].as_str())
            .collect();
        whats.contains(&"agent.cloned") && whats.contains(&"agent.clone_cleared")
    });
    assert!(audit.to_string().contains("pc-a"), "{audit}");
}
