//! `beckon agent enroll` as a process against a console embedded in the test: a refused
//! token and an unreachable console are explained; a good token leaves key (0600),
//! certificate, CA and check-in token in the state folder and a configuration that
//! `beckon agent run` starts with; a one-time token cannot be used twice; an HTTPS console
//! with its own CA needs `--ca`. Every wait is bounded.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use beckon_agent::AgentConfig;
use beckon_agent::http::{self, Url};
use beckon_console::{Console, ConsoleConfig, ConsoleHandle};

const LIMIT: Duration = Duration::from_secs(30);

async fn console(data: &Path, https: bool) -> ConsoleHandle {
    let mut config = ConsoleConfig::new(data);
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.plain_http = !https;
    config.default_broker_endpoints = vec!["localhost:9883".into(), "localhost:9443".into()];
    Console::start(config).await.expect("console starts")
}

/// A fresh one-time enrollment token, made through the API as an administrator would.
async fn enrollment_token(console: &ConsoleHandle, ca_file: Option<&Path>) -> String {
    let api = console.create_api_token("test").await.expect("api token");
    let url = Url::parse(&console.url()).expect("url");
    let client = http::console_client(&url, ca_file).expect("client");
    let r = http::request(
        &client,
        &url.with_path("/api/v1/enrollment-tokens"),
        "POST",
        &[("Authorization", format!("Bearer {api}"))],
        br#"{"label":"test"}"#,
        LIMIT,
    )
    .await
    .expect("token request");
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    v["token"].as_str().expect("token").to_owned()
}

/// Runs `beckon agent enroll ARGS` off the async runtime.
async fn enroll(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_beckon"))
            .args(["agent", "enroll"])
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run beckon agent enroll")
    })
    .await
    .expect("join")
}

fn args(console: &str, token: &str, state: &Path, config: &Path) -> Vec<String> {
    vec![
        "--console".into(),
        console.into(),
        "--token".into(),
        token.into(),
        "--state-dir".into(),
        state.to_string_lossy().into_owned(),
        "--config-out".into(),
        config.to_string_lossy().into_owned(),
        "--name".into(),
        "test laptop".into(),
    ]
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_explains_refusals_and_writes_a_runnable_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let console = console(&dir.path().join("console"), false).await;
    let url = console.url();
    let state = dir.path().join("agent-state");
    let config_file = dir.path().join("etc/agent.toml");

    // A token the console does not know: its own words come back, nothing is written.
    let out = enroll(args(&url, "bke_not_a_real_token", &state, &config_file)).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("refused the enrollment (HTTP 401)") && err.contains("not known"),
        "{err}"
    );
    assert!(!state.join("agent.key").exists() && !config_file.exists());

    // Nobody listens: the person learns what to check.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let out = enroll(args(
        &format!("http://127.0.0.1:{closed}"),
        "bke_x",
        &state,
        &config_file,
    ))
    .await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach the console") && err.contains("console is running"),
        "{err}"
    );

    // A good token.
    let token = enrollment_token(&console, None).await;
    let out = enroll(args(&url, &token, &state, &config_file)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("beckon agent run --config"), "{stdout}");
    let key_mode = std::fs::metadata(state.join("agent.key"))
        .expect("key written")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "the private key is owner-only");
    let token_mode = std::fs::metadata(state.join("checkin.token"))
        .expect("check-in token written")
        .permissions()
        .mode();
    assert_eq!(token_mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(state.join("ca.pem")).expect("ca"),
        console.state.ca.cert_pem(),
        "the console's CA is stored for the broker connection"
    );
    let config = AgentConfig::load(&config_file).expect("the written config is valid");
    assert_eq!(config.broker.host, "localhost");
    assert_eq!(
        (config.broker.port, config.broker.fallback_port),
        (9883, 9443)
    );
    assert_eq!(config.checkin.console_url.as_deref(), Some(url.as_str()));
    assert!(config.wakeup.console_keys.contains_key("console-1"));
    let agent = console
        .state
        .store
        .run({
            let id = config.agent_id.clone();
            move |s| s.agent(&id)
        })
        .await
        .expect("the console knows the agent");
    assert_eq!(agent.name, "test laptop");
    assert!(!agent.inventory.os.is_empty(), "inventory sent");

    // Enrolling over it is refused without --force.
    let token2 = enrollment_token(&console, None).await;
    let out = enroll(args(&url, &token2, &state, &config_file)).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));

    // The one-time token is used up.
    let other = dir.path().join("other");
    let out = enroll(args(&url, &token, &other, &other.join("agent.toml"))).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("used up"), "{}", stderr(&out));

    // `beckon agent run` accepts the configuration: it starts, records itself in the state
    // folder and keeps running (trying to reach a broker that is not there).
    let mut agent = Command::new(env!("CARGO_BIN_EXE_beckon"))
        .args(["agent", "run", "--config"])
        .arg(&config_file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn beckon agent run");
    let deadline = Instant::now() + LIMIT;
    let state_file = state.join("state.json");
    loop {
        if let Some(status) = agent.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut e) = agent.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("beckon agent run exited ({status}): {err}");
        }
        if std::fs::read_to_string(&state_file).is_ok_and(|s| s.contains("\"pid\"")) {
            break;
        }
        assert!(Instant::now() < deadline, "the agent never wrote its state");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(agent.try_wait().expect("wait").is_none(), "still running");
    let _ = agent.kill();
    let _ = agent.wait();
    console.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_console_with_its_own_ca_needs_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("console");
    let console = console(&data, true).await;
    assert_eq!(console.scheme, "https");
    let url = console.url();
    let ca_file = data.join("tenant-ca.pem");
    let token = enrollment_token(&console, Some(&ca_file)).await;
    let state = dir.path().join("state");
    let config_file = state.join("agent.toml");

    let out = enroll(args(&url, &token, &state, &config_file)).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--ca"), "names the flag to use: {err}");

    let mut with_ca = args(&url, &token, &state, &config_file);
    with_ca.extend(["--ca".into(), ca_file.to_string_lossy().into_owned()]);
    let out = enroll(with_ca).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let config = AgentConfig::load(&config_file).expect("valid config");
    assert_eq!(config.checkin.console_url.as_deref(), Some(url.as_str()));
    assert_eq!(
        config.checkin.ca_file.as_deref(),
        Some(state.join("console-ca.pem").as_path()),
        "check-ins trust the console's CA too"
    );
    console.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_with_a_public_broker_certificate_makes_agents_trust_the_system_store_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ConsoleConfig::new(dir.path().join("console"));
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.plain_http = true;
    config.agent_broker_system_roots = true;
    let console = Console::start(config).await.expect("console starts");
    let token = enrollment_token(&console, None).await;
    let state = dir.path().join("state");
    let config_file = state.join("agent.toml");

    let out = enroll(args(&console.url(), &token, &state, &config_file)).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let config = AgentConfig::load(&config_file).expect("valid config");
    assert_eq!(
        config.broker.trust_anchors(),
        beckon_net::TrustAnchors::CaFileAndSystem(state.join("ca.pem")),
        "the tenant CA and the system store"
    );
    console.shutdown().await;
}
