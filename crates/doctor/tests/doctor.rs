//! One test per failure class the doctor names, each checking the verdict and the fix
//! sentence, plus a fully working path through a real Mosquitto. Peers are real where users
//! have real ones: tinyproxy, Mosquitto; rustls servers with rcgen certificates for TLS.

mod support;

use beckon_doctor::{DoctorArgs, Report, StepName, Verdict, diagnose};
use clap::Parser;
use support::*;

#[tokio::test]
async fn a_name_that_does_not_resolve() {
    let report = diagnose(&config("no-such-broker.invalid", 8883, 443)).await;
    assert!(!report.ok);
    let dns = assert_fails(
        &report,
        "8883",
        StepName::Dns,
        &["broker name no-such-broker.invalid", "DNS"],
    );
    assert_contains(&dns.detail, "no-such-broker.invalid");
    // The other paths would ask the same question: not asked again, still a failure.
    let again = step(path(&report, "443-mqtt"), StepName::Dns);
    assert_eq!(again.verdict, Verdict::Fail);
    assert!(
        again.detail.starts_with("not run again, as on 8883"),
        "{}",
        again.detail
    );
    assert_summary_starts(&report, "No path to no-such-broker.invalid works");
}

#[tokio::test]
async fn a_refused_port() {
    let (primary, fallback) = (refused_port(), refused_port());
    let report = diagnose(&config("127.0.0.1", primary, fallback)).await;
    assert_passes(&report, "8883", StepName::Dns);
    let tcp = assert_fails(
        &report,
        "8883",
        StepName::Tcp,
        &[
            &format!("Nothing accepts TCP port {primary} on 127.0.0.1"),
            &format!("rely on the fallback port {fallback}"),
        ],
    );
    assert_contains(&tcp.detail, "refused");
    assert_fails(
        &report,
        "443-mqtt",
        StepName::Tcp,
        &[&format!("Nothing accepts TCP port {fallback}")],
    );
    assert!(!report.ok);
    assert!(report.path_in_use.is_none());

    // The JSON form carries the same verdicts.
    let json = serde_json::to_value(&report).expect("JSON");
    assert_eq!(json["ok"], false);
    assert_eq!(json["paths"][0]["path"], "8883");
    assert_eq!(json["paths"][0]["steps"][0]["step"], "dns");
    assert_eq!(json["paths"][0]["steps"][0]["verdict"], "pass");
    assert_eq!(json["paths"][0]["steps"][1]["step"], "tcp");
    assert_eq!(json["paths"][0]["steps"][1]["verdict"], "fail");
    assert_eq!(json["paths"][0]["steps"][2]["verdict"], "skipped");
    assert!(json["paths"][0]["steps"][1]["fix"].as_str().is_some());
}

#[tokio::test]
async fn a_filtered_port() {
    // A real "filtered" port: the TCP connect itself gets no answer (see support::filtered_port).
    let filtered = filtered_port().await;
    let report = diagnose(&config("127.0.0.1", filtered.port, refused_port())).await;
    let tcp = assert_fails(
        &report,
        "8883",
        StepName::Tcp,
        &[
            &format!("Open outbound TCP port {} to 127.0.0.1", filtered.port),
            "drops packets",
        ],
    );
    assert_contains(&tcp.detail, "no answer");
}

#[tokio::test]
async fn a_port_that_accepts_but_never_speaks_tls() {
    let (silent, _task) = start_silent_server().await;
    let report = diagnose(&config("127.0.0.1", silent.port(), refused_port())).await;
    assert_passes(&report, "8883", StepName::Tcp);
    let tls = assert_fails(
        &report,
        "8883",
        StepName::Tls,
        &[&format!(
            "Port {} on 127.0.0.1 accepted TCP but never answered the TLS handshake",
            silent.port()
        )],
    );
    assert_contains(&tls.detail, "did not finish within 2 s");
}

#[tokio::test]
async fn a_proxy_that_wants_authentication() {
    let (proxy, _task) = start_scripted_server(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    let mut config = config("127.0.0.1", refused_port(), refused_port());
    config.proxy = Some(beckon_net::ProxyUrl::new("127.0.0.1", proxy.port()));
    let report = diagnose(&config).await;
    // Every path of the agent's ladder, in its order: through the proxy first.
    let labels: Vec<&str> = report.paths.iter().map(|p| p.path.as_str()).collect();
    let mut ladder = beckon_net::LadderConfig::new("127.0.0.1");
    ladder.proxy = config.proxy.clone();
    let ladder_labels: Vec<String> = ladder.rungs().iter().map(beckon_net::Path::label).collect();
    assert_eq!(labels, ladder_labels);
    assert_eq!(labels.len(), 6, "{labels:?}");
    assert_fails(
        &report,
        "8883 via proxy",
        StepName::ProxyConnect,
        &[
            &format!(
                "The proxy http://127.0.0.1:{} requires authentication: put its user name and password in the proxy address",
                proxy.port()
            ),
            "`proxy` under [broker] in the agent's configuration",
        ],
    );
    // A proxy-wide refusal is not asked again on the other proxied paths.
    let again = step(
        path(&report, "443-websocket via proxy"),
        StepName::ProxyConnect,
    );
    assert!(
        again.detail.starts_with("not run again"),
        "{}",
        again.detail
    );
    // The direct paths are checked after the proxied ones.
    assert_eq!(
        step(path(&report, "8883"), StepName::Tcp).verdict,
        Verdict::Fail
    );
}

/// Debian's squid demanding Basic authentication in front of a working broker: the right
/// credentials open the tunnel, wrong ones get a finding that names the user, never the
/// password, and agents go direct meanwhile.
#[tokio::test]
async fn a_squid_proxy_with_basic_authentication() {
    let ca = TestCa::new("Beckon test CA");
    let broker = Mosquitto::start_tls(&ca.server_cert(&["127.0.0.1"]), "u", "p");
    let squid = Squid::start("agent", "right-one", &[broker.port]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_trusting(&ca, dir.path(), broker.port, refused_port());
    set_credentials(&mut config, "u", "p");
    let proxy = beckon_net::ProxyUrl::new("127.0.0.1", squid.port);

    config.proxy = Some(proxy.clone().with_credentials("agent", "right-one"));
    let report = diagnose(&config).await;
    assert_eq!(
        report.path_in_use.as_deref(),
        Some("8883 via proxy"),
        "{}\nsquid:\n{}",
        report.to_human(),
        squid.output()
    );
    assert_passes(&report, "8883 via proxy", StepName::ProxyConnect);

    config.proxy = Some(proxy.with_credentials("agent", "wrong-one"));
    let report = diagnose(&config).await;
    assert_eq!(report.path_in_use.as_deref(), Some("8883"));
    let refused = assert_fails(
        &report,
        "8883 via proxy",
        StepName::ProxyConnect,
        &["The proxy refused the credentials: check the proxy user name (agent) and password"],
    );
    assert_contains(
        &refused.detail,
        "refused the credentials of user \"agent\" (407)",
    );
    let human = report.to_human();
    assert!(!human.contains("wrong-one"), "{human}");
    let json = serde_json::to_string(&report).expect("json");
    assert!(
        !json.contains("wrong-one") && json.contains("agent@127.0.0.1"),
        "{json}"
    );
}

#[tokio::test]
async fn a_proxy_that_forbids_the_port() {
    let proxy = Tinyproxy::start(&[443]);
    // A broker that works directly: agents then bypass the proxy, and the summary says why.
    let ca = TestCa::new("Beckon test CA");
    let broker = Mosquitto::start_tls(&ca.server_cert(&["127.0.0.1"]), "u", "p");
    let primary = broker.port;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_trusting(&ca, dir.path(), primary, refused_port());
    config.proxy = Some(proxy_url(&proxy));
    set_credentials(&mut config, "u", "p");
    let report = diagnose(&config).await;
    assert_eq!(
        report.path_in_use.as_deref(),
        Some("8883"),
        "{}",
        report.to_human()
    );
    assert_contains(
        &report.summary,
        &format!(
            "The proxy {} works for no path, so agents go direct: Allow CONNECT to port {primary}",
            proxy_url(&proxy)
        ),
    );
    let forbidden = assert_fails(
        &report,
        "8883 via proxy",
        StepName::ProxyConnect,
        &[
            &format!(
                "Allow CONNECT to port {primary} on the proxy {}",
                proxy_url(&proxy)
            ),
            &format!("acl SSL_ports port {primary}"),
            &format!("ConnectPort {primary}"),
        ],
    );
    assert!(
        forbidden.detail.contains("403"),
        "{}\ntinyproxy:\n{}",
        forbidden.detail,
        proxy.output()
    );
    assert_passes(&report, "8883 via proxy", StepName::Tcp);
    let dns = step(path(&report, "8883 via proxy"), StepName::Dns);
    assert_contains(
        &dns.detail,
        "the proxy resolves the broker's name 127.0.0.1 itself",
    );
}

/// Diagnoses a TLS server on the primary port that presents `identity`, trusting `ca` (the
/// fallback port is refused).
async fn diagnose_tls_server(ca: &TestCa, identity: ServerIdentity) -> Report {
    let server = start_tls_server(identity).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_trusting(ca, dir.path(), server.addr.port(), refused_port());
    diagnose(&config).await
}

#[tokio::test]
async fn a_certificate_from_another_ca() {
    let ours = TestCa::new("our CA");
    let theirs = TestCa::new("someone else's CA");
    let report = diagnose_tls_server(&ours, theirs.server_cert(&["127.0.0.1"])).await;
    let tls = assert_fails(
        &report,
        "8883",
        StepName::Tls,
        &[
            "The CA file",
            "CN=our CA",
            "does not sign the certificate of 127.0.0.1",
            "issued by CN=someone else's CA",
        ],
    );
    let facts = tls.tls.as_ref().expect("the chain seen is reported");
    assert!(
        facts.chain[0].issuer.contains("someone else's CA"),
        "{facts:?}"
    );
}

#[tokio::test]
async fn an_expired_certificate() {
    let ca = TestCa::new("Beckon test CA");
    let report = diagnose_tls_server(
        &ca,
        ca.server_cert_valid(&["127.0.0.1"], (2019, 1, 1), (2021, 3, 4)),
    )
    .await;
    assert_fails(
        &report,
        "8883",
        StepName::Tls,
        &[
            "Renew the certificate CN=test broker",
            "expired on 2021-03-04",
        ],
    );
}

#[tokio::test]
async fn a_certificate_for_another_name() {
    let ca = TestCa::new("Beckon test CA");
    let report =
        diagnose_tls_server(&ca, ca.server_cert(&["broker.example", "push.example"])).await;
    assert_fails(
        &report,
        "8883",
        StepName::Tls,
        &[
            "names broker.example, push.example, not 127.0.0.1",
            "subject alternative names",
        ],
    );
}

#[tokio::test]
async fn a_broker_that_wants_a_client_certificate() {
    let ca = TestCa::new("Beckon test CA");
    let tenant_ca = TestCa::new("tenant CA");
    let server = start_mtls_server(ca.server_cert(&["127.0.0.1"]), &tenant_ca).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_trusting(&ca, dir.path(), server.addr.port(), refused_port());

    // No certificate: with TLS 1.3 the broker's refusal arrives after the handshake, on the
    // first read, so it is the MQTT CONNECT step that reports it.
    let report = diagnose(&config).await;
    assert_passes(&report, "8883", StepName::Tls);
    assert_fails(
        &report,
        "8883",
        StepName::MqttConnect,
        &["The broker requires a client certificate", "--client-cert"],
    );

    // A certificate from another CA.
    let mut with_cert = config.clone();
    let (cert, key) = TestCa::new("another tenant's CA").write_client_cert(dir.path(), "laptop-42");
    with_cert.tls.identity = Some(beckon_net::ClientIdentity::Files { cert, key });
    let report = diagnose(&with_cert).await;
    assert_fails(
        &report,
        "8883",
        StepName::MqttConnect,
        &[
            "The broker rejected the client certificate",
            "enroll the agent again",
        ],
    );
}

#[tokio::test]
async fn credentials_refused_by_mosquitto() {
    let ca = TestCa::new("Beckon test CA");
    let broker = start_mosquitto(&ca, "agent-7", "right-token");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_trusting(&ca, dir.path(), broker.port, refused_port());
    set_credentials(&mut config, "agent-7", "wrong-token");
    let report = diagnose(&config).await;
    assert_eq!(
        step(path(&report, "8883"), StepName::Tls).verdict,
        Verdict::Pass,
        "{}\nmosquitto:\n{}",
        report.to_human(),
        broker.output()
    );
    let refused = assert_fails(
        &report,
        "8883",
        StepName::MqttConnect,
        &[
            "The broker refused the credentials with reason 0x87 (not authorized)",
            "agent-7",
        ],
    );
    assert_eq!(refused.reason_code, Some(0x87));
    assert!(!report.ok);
}

#[tokio::test]
async fn a_working_path_through_mosquitto() {
    let ca = TestCa::new("Beckon test CA");
    let broker = start_mosquitto(&ca, "agent-7", "right-token");
    let dir = tempfile::tempdir().expect("tempdir");
    // Mosquitto on both ports: its TLS listener is no shared 443-style port (no ALPN mqtt,
    // no WebSocket), which the fallback paths must say.
    let mut config = config_trusting(&ca, dir.path(), broker.port, broker.port);
    set_credentials(&mut config, "agent-7", "right-token");
    let report = diagnose(&config).await;
    let human = report.to_human();
    assert_fails(
        &report,
        "443-mqtt",
        StepName::Tls,
        &[&format!(
            "Serve MQTT with ALPN mqtt on 127.0.0.1:{}",
            broker.port
        )],
    );
    assert_fails(
        &report,
        "443-websocket",
        StepName::WebSocket,
        &[&format!(
            "Make sure 127.0.0.1:{} serves MQTT over WebSocket at /mqtt",
            broker.port
        )],
    );
    let json = serde_json::to_value(&report).expect("JSON");
    let ws_steps: Vec<&str> = json["paths"][2]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["step"].as_str())
        .collect();
    assert_eq!(
        ws_steps,
        [
            "dns",
            "tcp",
            "tls",
            "websocket",
            "mqtt_connect",
            "round_trip"
        ]
    );
    let p = path(&report, "8883");
    assert!(p.ok, "{human}\nmosquitto:\n{}", broker.output());
    assert!(
        p.steps.iter().all(|s| s.verdict == Verdict::Pass),
        "{human}"
    );
    let tls = step(p, StepName::Tls).tls.as_ref().expect("TLS facts");
    assert_eq!(tls.version.as_deref(), Some("TLS 1.3"));
    assert!(tls.chain[0].subject.contains("test broker"), "{tls:?}");
    assert_eq!(step(p, StepName::MqttConnect).reason_code, Some(0));
    let round_trip = &step(p, StepName::RoundTrip).detail;
    assert_contains(round_trip, "PINGRESP");
    assert_contains(round_trip, "received it back");
    assert!(report.ok);
    assert_eq!(report.path_in_use.as_deref(), Some("8883"));
    assert_summary_starts(&report, "Agents will use 8883 (MQTT over TLS to 127.0.0.1:");
    assert_contains(&human, "✓ 8883: MQTT over TLS");
    assert_contains(&human, "✗ 443-mqtt");
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    doctor: DoctorArgs,
}

#[tokio::test]
async fn an_agent_identity_from_its_config_file() {
    let ca = TestCa::new("Beckon test CA");
    let broker = start_mosquitto(&ca, "laptop-42", "t0ken");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = ca.write_pem(dir.path(), "ca.pem");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t0ken\n").expect("token file");
    let agent_config = dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "agent_id = \"laptop-42\"\ntenant = \"acme\"\n[broker]\nhost = \"127.0.0.1\"\nport = {}\nfallback_port = {}\nca_file = \"{}\"\ntoken_file = \"{}\"\n[reconnect]\nbackoff_base = \"1s\"\n[wakeup.console_keys]\nconsole-2026 = \"6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw\"\n",
            broker.port,
            refused_port(),
            ca_file.display(),
            token_file.display()
        ),
    )
    .expect("agent config");
    let cli = Cli::try_parse_from([
        "doctor",
        "--agent-config",
        agent_config.to_str().expect("utf-8 path"),
        "--timeout",
        "2",
    ])
    .expect("arguments");
    let config = cli.doctor.to_config().expect("config");
    assert_eq!(config.client_id.as_deref(), Some("laptop-42/doctor"));
    assert_eq!(config.username.as_deref(), Some("laptop-42"));
    let report = diagnose(&config).await;
    let human = report.to_human();
    assert!(report.ok, "{human}\nmosquitto:\n{}", broker.output());
    assert_eq!(report.client_id, "laptop-42/doctor");
    let round_trip = &step(path(&report, "8883"), StepName::RoundTrip).detail;
    assert_contains(round_trip, "PINGRESP");
    assert_contains(round_trip, "connect and ping only");
    assert!(!round_trip.contains("subscribed"), "{round_trip}");
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let parse = |args: &[&str]| {
        let mut all = vec!["doctor"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|c| c.doctor.to_config())
    };
    let err = parse(&[]).expect("parses").expect_err("no broker");
    assert!(err.to_string().contains("--broker HOST"), "{err}");
    let err = parse(&["--broker", "b", "--proxy", "http://u:p%zz@proxy:3128"])
        .expect("parses")
        .expect_err("a broken escape in the proxy password");
    let text = format!("{err:#}");
    assert!(
        text.contains("--proxy") && text.contains("percent-encoding"),
        "{text}"
    );
    assert!(!text.contains("p%zz"), "{text}");
    let err = parse(&["--broker", "b", "--timeout", "0"])
        .expect("parses")
        .expect_err("zero timeout");
    assert!(err.to_string().contains("--timeout"), "{err}");
    let err = parse(&["--agent-config", "/nonexistent/agent.toml"])
        .expect("parses")
        .expect_err("missing file");
    assert!(
        err.to_string()
            .contains("cannot read /nonexistent/agent.toml"),
        "{err}"
    );
    let config = parse(&["--broker", "b", "--ports", "9883"])
        .expect("parses")
        .expect("config");
    assert_eq!((config.primary_port, config.fallback_port), (9883, None));
    // Three ports: clap refuses them, or the doctor does.
    assert!(parse(&["--broker", "b", "--ports", "1,2,3"]).map_or(true, |c| c.is_err()));
    assert!(
        parse(&["--broker", "b", "--ports", "0,443"])
            .expect("parses")
            .is_err()
    );
}

#[tokio::test]
async fn a_working_path_through_tinyproxy() {
    let ca = TestCa::new("Beckon test CA");
    let broker = start_mosquitto(&ca, "agent-7", "right-token");
    let proxy = Tinyproxy::start(&[broker.port]);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config_trusting(&ca, dir.path(), broker.port, refused_port());
    config.proxy = Some(proxy_url(&proxy));
    set_credentials(&mut config, "agent-7", "right-token");
    let report = diagnose(&config).await;
    let human = report.to_human();
    let first = path(&report, "8883 via proxy");
    assert!(first.ok, "{human}\ntinyproxy:\n{}", proxy.output());
    assert_eq!(step(first, StepName::ProxyConnect).verdict, Verdict::Pass);
    assert_eq!(report.path_in_use.as_deref(), Some("8883 via proxy"));
    assert_summary_starts(&report, "Agents will use 8883 via proxy");
    // The direct 8883 path works too; the 443 ones do not (nothing listens there).
    assert!(path(&report, "8883").ok, "{human}");
    assert_contains(&report.summary, "2 of 6 paths work");
}

/// Diagnoses a fake broker on the fallback port only (8883 is refused), with or without ALPN
/// `mqtt` there; its port and the report.
async fn diagnose_fallback_only(alpn_mqtt: bool) -> (u16, Report) {
    let ca = TestCa::new("Beckon test CA");
    let broker = start_fake_broker(ca.server_cert(&["127.0.0.1"]), alpn_mqtt).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_trusting(&ca, dir.path(), refused_port(), broker.addr.port());
    (broker.addr.port(), diagnose(&config).await)
}

#[tokio::test]
async fn the_fallback_port_with_alpn_mqtt() {
    let (_port, report) = diagnose_fallback_only(true).await;
    let human = report.to_human();
    assert_eq!(report.path_in_use.as_deref(), Some("443-mqtt"), "{human}");
    let tls = step(path(&report, "443-mqtt"), StepName::Tls);
    assert_eq!(
        tls.tls.as_ref().and_then(|t| t.alpn.as_deref()),
        Some("mqtt")
    );
    assert!(path(&report, "443-websocket").ok, "{human}");
    assert!(
        step(path(&report, "443-websocket"), StepName::RoundTrip)
            .detail
            .contains("received it back"),
        "{human}"
    );
    assert_summary_starts(&report, "Agents will use 443-mqtt");
}

#[tokio::test]
async fn a_fallback_port_that_serves_only_websocket() {
    let (port, report) = diagnose_fallback_only(false).await;
    assert_fails(
        &report,
        "443-mqtt",
        StepName::Tls,
        &[&format!(
            "Port {port} on 127.0.0.1 does not accept the application protocol mqtt"
        )],
    );
    assert_eq!(
        report.path_in_use.as_deref(),
        Some("443-websocket"),
        "{}",
        report.to_human()
    );
    let ws = step(path(&report, "443-websocket"), StepName::WebSocket);
    assert_eq!(ws.verdict, Verdict::Pass);
    assert_summary_starts(
        &report,
        "Agents will use 443-websocket (MQTT over WebSocket to wss://127.0.0.1:",
    );
}

#[tokio::test]
async fn an_unreadable_ca_file_stops_before_any_check() {
    let config =
        config("127.0.0.1", refused_port(), refused_port()).with_ca_file("/nonexistent/ca.pem");
    let report = diagnose(&config).await;
    assert!(!report.ok);
    assert!(report.paths.is_empty());
    let fix = report.setup_fix.as_deref().expect("a fix");
    assert_contains(fix, "Check that the CA file /nonexistent/ca.pem exists");
    assert!(report.to_human().contains(&format!("fix: {fix}")));
    assert_summary_starts(&report, "The checks could not start");
}
