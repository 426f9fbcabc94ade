//! The Windows agent end to end: `beckon.exe` (cross-built for x86_64-pc-windows-gnu) runs
//! under Wine against a Linux `beckon up`. It enrolls (its inventory says Windows), connects on
//! the MQTT port, takes a signed wake-up, runs a `cmd.exe` action with the wake-up in its
//! environment and reports `finished`; `agent status` reads its state. Then, with the MQTT
//! port refused, it falls back to the fallback port, and with a proxy configured it goes
//! through tinyproxy; with `proxy = "system"` it reads the machine's WinHTTP default proxy (set
//! where `netsh winhttp set proxy` stores it), goes direct when its bypass list names the
//! broker and through that tinyproxy otherwise. Last, registered as a Windows service, started
//! by Wine's service manager (online again), and removed (offline).
//!
//! Needs the Windows build (`scripts/windows/build`, which `scripts/test` runs) and Wine with
//! the prefix `scripts/windows/prepare-wine` makes. Without them the test fails and says so;
//! it is skipped only when `BECKON_WINDOWS=skip` says that the Windows build is not part of
//! this run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use beckon_testkit::Tinyproxy;
use common::{Process, Up, beckon_bin, free_port};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Windows `beckon.exe`: `BECKON_WINDOWS_BIN`, else the debug build in the target folder.
fn windows_bin() -> Option<PathBuf> {
    if std::env::var("BECKON_WINDOWS").is_ok_and(|v| v == "skip") {
        eprintln!("BECKON_WINDOWS=skip: the Windows build is not part of this run");
        return None;
    }
    let bin = std::env::var_os("BECKON_WINDOWS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| repo_root().join("target"), PathBuf::from);
            target.join("x86_64-pc-windows-gnu/debug/beckon.exe")
        });
    assert!(
        bin.is_file(),
        "no Windows build at {}: run scripts/windows/build (it needs the rustup target \
         x86_64-pc-windows-gnu and the Debian packages mingw-w64 wine64 wine), or set \
         BECKON_WINDOWS=skip when this run leaves Windows out",
        bin.display()
    );
    Some(bin)
}

/// `beckon.exe ARGS` under Wine (through the prefix-preparing runner).
fn windows_command(bin: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(repo_root().join("scripts/windows/wine-run"));
    command
        .arg(bin)
        .args(args)
        .env("RUST_LOG", "info")
        // Wine's WinHTTP takes the Unix `http_proxy` as the machine's default proxy when the
        // registry holds none: the system proxy steps set the registry only.
        .env_remove("http_proxy")
        .stdin(Stdio::null())
        // Wine's own processes (wineserver, services.exe, ...) inherit the first program's
        // stderr and outlive the test by seconds: never the test's own.
        .stderr(Stdio::piped());
    command
}

fn run_windows(bin: &Path, args: &[&str]) -> Output {
    let output = windows_command(bin, args)
        .output()
        .expect("run beckon.exe under Wine");
    assert!(
        output.status.success(),
        "beckon.exe {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The same file as Wine's Windows programs name it (the Linux root is drive Z:).
fn wine_path(path: &Path) -> String {
    format!("Z:{}", path.display()).replace('/', "\\")
}

/// Polls the agent's record in the console until `f` holds; fails after `WAIT`.
fn wait_agent(up: &Up, cookie: &str, id: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, agent, _) = up.request("GET", &format!("/api/v1/agents/{id}"), cookie, "");
        if f(&agent) {
            return agent;
        }
        assert!(Instant::now() < deadline, "{what}: {agent}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Replaces the line starting with `key = ` in the agent's configuration (or adds it after
/// `[broker]`).
fn set_broker_key(config: &Path, key: &str, value: &str) {
    let text = std::fs::read_to_string(config).expect("read agent config");
    let prefix = format!("{key} = ");
    let line = format!("{key} = {value}");
    let text = if text.lines().any(|l| l.starts_with(&prefix)) {
        text.lines()
            .map(|l| {
                if l.starts_with(&prefix) {
                    line.as_str()
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    } else {
        text.replacen("[broker]\n", &format!("[broker]\n{line}\n"), 1)
    };
    std::fs::write(config, text).expect("write agent config");
}

fn broker_key(config: &Path, key: &str) -> String {
    let prefix = format!("{key} = ");
    std::fs::read_to_string(config)
        .expect("read agent config")
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
        .unwrap_or_else(|| panic!("no {key} in the agent config"))
}

/// Starts `beckon.exe agent run`, waits until the console shows it online on `path`, stops it.
fn connects_on(up: &Up, cookie: &str, bin: &Path, config: &str, id: &str, path: &str) {
    let agent = Process::spawn(
        "beckon.exe agent run",
        windows_command(bin, &["agent", "run", "--config", config]),
    );
    let seen = wait_agent(up, cookie, id, &format!("online on {path}"), |a| {
        a["presence"] == "online" && a["path"] == path
    });
    drop(agent);
    wait_agent(up, cookie, id, "offline after the stop", |a| {
        a["presence"] != "online"
    });
    assert_eq!(seen["path"], path, "{seen}");
}

#[test]
fn windows_agent_under_wine_enrolls_connects_and_runs_a_cmd_action() {
    let Some(bin) = windows_bin() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Up::start(&dir.path().join("data"), 0, true);
    let password = up.password().expect("the admin password");
    let cookie = up.login(&password);
    let (status, t, _) = up.request("POST", "/api/v1/api-tokens", &cookie, r#"{"name":"win"}"#);
    assert_eq!(status, 201, "{t}");
    let api_token = t["token"].as_str().expect("api token").to_owned();
    let (status, t, _) = up.request(
        "POST",
        "/api/v1/enrollment-tokens",
        &cookie,
        r#"{"label":"windows"}"#,
    );
    assert_eq!(status, 201, "{t}");
    let enroll_token = t["token"].as_str().expect("enrollment token").to_owned();

    // Enroll as Windows does it, with Windows paths.
    let state = dir.path().join("state");
    let config = dir.path().join("agent.toml");
    let marker = dir.path().join("ran.txt");
    let console = format!("http://{}", up.console);
    let out = run_windows(
        &bin,
        &[
            "agent",
            "enroll",
            "--console",
            &console,
            "--token",
            &enroll_token,
            "--state-dir",
            &wine_path(&state),
            "--config-out",
            &wine_path(&config),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("enrolled as agent "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no agent id in {stdout}"))
        .to_owned();
    assert!(state.join("agent.key").is_file(), "key in the state folder");
    let (_, agent, _) = up.request("GET", &format!("/api/v1/agents/{id}"), &cookie, "");
    assert!(
        agent["os"]
            .as_str()
            .is_some_and(|os| os.contains("Windows")),
        "the inventory comes from Windows: {agent}"
    );
    assert!(
        agent["hostname"].as_str().is_some_and(|h| !h.is_empty()),
        "{agent}"
    );

    // The action: cmd.exe writes the wake-up id it was given into a file.
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!(
        "\n[actions.command]\nshell = \"cmd\"\nargv = [\"echo\", \"%BECKON_WAKEUP_ID%>\", '{}']\n",
        wine_path(&marker)
    ));
    std::fs::write(&config, text).expect("config");
    let config_arg = wine_path(&config);

    let mut agent = Process::spawn(
        "beckon.exe agent run",
        windows_command(&bin, &["agent", "run", "--config", &config_arg]),
    );
    let online = wait_agent(&up, &cookie, &id, "online on 8883", |a| {
        a["presence"] == "online"
    });
    assert_eq!(online["path"], "8883", "{online}");

    // A signed wake-up, followed to `finished` by `beckon wake --wait`.
    let wake = Command::new(beckon_bin())
        .args([
            "wake",
            "--console",
            &console,
            "--token",
            &api_token,
            &id,
            "--reason",
            "windows",
            "--wait",
            "--timeout",
            "60s",
        ])
        .env("RUST_LOG", "warn")
        .env_remove("BECKON_API_TOKEN")
        .env_remove("BECKON_CONSOLE_URL")
        .stdin(Stdio::null())
        .output()
        .expect("beckon wake");
    let wake_out = String::from_utf8_lossy(&wake.stdout);
    assert_eq!(
        wake.status.code(),
        Some(0),
        "{wake_out}\n{}\nagent:\n{}",
        String::from_utf8_lossy(&wake.stderr),
        agent.text()
    );
    let row = wake_out
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("no row for {id}: {wake_out}"));
    assert!(row.contains("finished") && row.contains("ok"), "{wake_out}");
    let ran = std::fs::read_to_string(&marker).expect("cmd.exe wrote its file");
    let wakeup_id = ran.trim();
    assert_eq!(wakeup_id.len(), 36, "a wake-up id, not {ran:?}");

    // `agent status` reads the state the running agent keeps.
    let status = run_windows(
        &bin,
        &["agent", "status", "--state-dir", &wine_path(&state)],
    );
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!("{id}, running (pid")) && status.contains("connected via 8883"),
        "{status}"
    );
    assert!(status.contains(wakeup_id), "the last wake-up: {status}");
    agent.kill();
    wait_agent(&up, &cookie, &id, "offline after the stop", |a| {
        a["presence"] != "online"
    });

    // The MQTT port refused: the fallback port.
    let fallback_port = broker_key(&config, "fallback_port");
    set_broker_key(&config, "port", &free_port().to_string());
    connects_on(&up, &cookie, &bin, &config_arg, &id, "443-mqtt");

    // A proxy configured (and the remembered path forgotten): through tinyproxy.
    let proxy = Tinyproxy::start(&[fallback_port.parse().expect("port")]);
    set_broker_key(
        &config,
        "proxy",
        &format!("\"http://127.0.0.1:{}\"", proxy.port),
    );
    std::fs::remove_file(state.join("state.json")).expect("forget the last path");
    connects_on(&up, &cookie, &bin, &config_arg, &id, "443-mqtt via proxy");
    assert!(
        tunnels(&proxy) > 0,
        "tinyproxy carried the connection: {}",
        proxy.output()
    );

    // `proxy = "system"`: the machine's WinHTTP default proxy, a second tinyproxy. With the
    // broker in its bypass list the agent goes direct (8883 is still refused: 443).
    let winhttp_proxy = Tinyproxy::start(&[fallback_port.parse().expect("port")]);
    let winhttp_address = format!("127.0.0.1:{}", winhttp_proxy.port);
    set_broker_key(&config, "proxy", "\"system\"");
    let bypassed = WinHttpProxy::set(
        &winhttp_address,
        &format!(
            "*.corp.example;{}",
            broker_key(&config, "host").trim_matches('"')
        ),
    );
    std::fs::remove_file(state.join("state.json")).expect("forget the last path");
    connects_on(&up, &cookie, &bin, &config_arg, &id, "443-mqtt");
    assert!(
        tunnels(&winhttp_proxy) == 0,
        "the bypass list kept the agent off the proxy: {}",
        winhttp_proxy.output()
    );
    drop(bypassed);
    let _winhttp = WinHttpProxy::set(&format!("https={winhttp_address}"), "*.corp.example");
    std::fs::remove_file(state.join("state.json")).expect("forget the last path");
    connects_on(&up, &cookie, &bin, &config_arg, &id, "443-mqtt via proxy");
    assert!(
        tunnels(&winhttp_proxy) > 0,
        "the WinHTTP proxy carried the connection: {}",
        winhttp_proxy.output()
    );
    let status = run_windows(
        &bin,
        &["agent", "status", "--state-dir", &wine_path(&state)],
    );
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!(
            "Proxy:        http://{winhttp_address} (system proxy: WinHTTP default proxy)"
        )),
        "status names the proxy and where it came from: {status}"
    );

    // Registered as a Windows service (automatic start, this program with `agent service`
    // and the configuration), started by the service manager, connected, then removed.
    let _ = windows_command(&bin, &["agent", "uninstall-service"]).output();
    let _removed = ServiceRemoval(bin.clone());
    let out = run_windows(&bin, &["agent", "install-service", "--config", &config_arg]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("installed the service BeckonAgent"),
        "{out:?}"
    );
    let registered = wine_tool(
        "reg",
        &[
            "query",
            r"HKLM\System\CurrentControlSet\Services\BeckonAgent",
        ],
    );
    let value = |name: &str| {
        registered
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(value("Start"), "0x2", "automatic start: {registered}");
    assert_eq!(value("ObjectName"), "LocalSystem", "{registered}");
    assert!(
        value("ImagePath").ends_with(&format!("beckon.exe agent service --config {config_arg}")),
        "{registered}"
    );
    // Wine ends its service manager, and the services it runs, when the last ordinary Wine
    // program ends: `sc start` alone would stop the agent again within a second or two, still
    // in its start delay. So `sc start` runs in a session kept open by a waiting `ping`
    // (ended with the service, below).
    let _session = Process::spawn(
        "sc start BeckonAgent",
        windows_command(
            Path::new("cmd"),
            &["/c", "sc start BeckonAgent & ping -n 120 127.0.0.1 >nul"],
        ),
    );
    wait_agent(&up, &cookie, &id, "online as a service", |a| {
        a["presence"] == "online"
    });
    let out = run_windows(&bin, &["agent", "uninstall-service"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed the service"),
        "{out:?}"
    );
    wait_agent(
        &up,
        &cookie,
        &id,
        "offline once the service is removed",
        |a| a["presence"] != "online",
    );
    assert!(
        !windows_command(&bin, &["agent", "uninstall-service"])
            .output()
            .expect("uninstall again")
            .status
            .success(),
        "the service is gone"
    );
}

/// A Windows tool (`reg`, `sc`...) in the same Wine prefix; its output.
fn wine_tool(tool: &str, args: &[&str]) -> String {
    let out = Command::new(repo_root().join("scripts/windows/wine-run"))
        .arg(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run a Windows tool under Wine");
    assert!(out.status.success(), "{tool} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).replace('\r', "")
}

/// How many tunnels tinyproxy was asked for (its log line `Request (file descriptor N): CONNECT
/// host:port HTTP/1.1`; its start-up lines name CONNECT too).
fn tunnels(proxy: &Tinyproxy) -> usize {
    proxy.output().matches("): CONNECT ").count()
}

/// Where WinHTTP keeps the machine's default proxy.
const WINHTTP_KEY: &str =
    r"HKLM\Software\Microsoft\Windows\CurrentVersion\Internet Settings\Connections";

/// The machine's WinHTTP default proxy in the Wine prefix, stored as `netsh winhttp set proxy
/// PROXY BYPASS` stores it (Wine's netsh has no `winhttp`); direct access again when dropped,
/// passed or not: the Wine prefix outlives the test.
struct WinHttpProxy;

impl WinHttpProxy {
    fn set(proxy: &str, bypass: &str) -> Self {
        // The value `WinHttpSettings`: a header (0x18, 0, flags 2 = named proxy), then the
        // proxy list and the bypass list, each as a little-endian length and its bytes.
        let mut value = Vec::new();
        for word in [0x18u32, 0, 2] {
            value.extend(word.to_le_bytes());
        }
        for text in [proxy, bypass] {
            value.extend(u32::try_from(text.len()).expect("short").to_le_bytes());
            value.extend(text.as_bytes());
        }
        let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
        wine_tool(
            "reg",
            &[
                "add",
                WINHTTP_KEY,
                "/v",
                "WinHttpSettings",
                "/t",
                "REG_BINARY",
                "/d",
                &hex,
                "/f",
            ],
        );
        Self
    }
}

impl Drop for WinHttpProxy {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/windows/wine-run"))
            .args(["reg", "delete", WINHTTP_KEY, "/v", "WinHttpSettings", "/f"])
            .stdin(Stdio::null())
            .output();
    }
}

/// Removes the service when the test ends, passed or not: the Wine prefix outlives the test.
/// Also ends the `ping` that kept the service's Wine session open, and so the session (its
/// processes would otherwise hold the test's output open for up to two minutes).
struct ServiceRemoval(PathBuf);

impl Drop for ServiceRemoval {
    fn drop(&mut self) {
        let _ = windows_command(&self.0, &["agent", "uninstall-service"]).output();
        let _ = windows_command(Path::new("taskkill"), &["/f", "/im", "ping.exe"]).output();
    }
}
