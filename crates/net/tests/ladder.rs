//! The connection ladder end to end: order, fallback, starting from the last working path,
//! proxies (a real tinyproxy and a scripted one) and the error that lists every rung.

mod support;

use std::sync::Arc;
use std::time::Duration;

use beckon_net::{
    ConnectionLadder, LadderConfig, Path, PathError, ProxyError, RungError, Stage, TlsClient,
    TlsError, TlsSettings, Transport, TrustAnchors,
};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tls_client(ca: &TestCa) -> Arc<TlsClient> {
    Arc::new(
        TlsClient::new(&TlsSettings {
            trust: TrustAnchors::CaPem(ca.pem().into_bytes()),
            ..TlsSettings::default()
        })
        .expect("client"),
    )
}

fn config(host: &str, primary: u16, fallback: u16) -> LadderConfig {
    let mut config = LadderConfig::new(host);
    config.primary_port = primary;
    config.fallback_port = fallback;
    // Bounded waits, short enough for tests.
    config.timeouts.tcp_connect = Duration::from_secs(5);
    config.timeouts.proxy_connect = Duration::from_secs(5);
    config.timeouts.tls_handshake = Duration::from_secs(5);
    config.timeouts.websocket_handshake = Duration::from_secs(5);
    config
}

/// A broker stand-in: TLS with ALPN `mqtt` and `http/1.1` (WebSocket), echoing bytes.
async fn broker(ca: &TestCa) -> TlsServer {
    start_tls_server(server_config(
        ca.server_cert(&["localhost", "127.0.0.1"]),
        &["mqtt", "http/1.1"],
    ))
    .await
}

/// Proves the stream carries MQTT bytes to the server and back.
async fn round_trip(connected: &mut beckon_net::Connected) {
    let packet = b"\xc0\x00"; // PINGREQ
    connected.stream.write_all(packet).await.expect("write");
    connected.stream.flush().await.expect("flush");
    let mut back = [0u8; 2];
    tokio::time::timeout(WAIT, connected.stream.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&back, packet);
}

fn labels(failures: &[beckon_net::RungFailure]) -> Vec<String> {
    failures.iter().map(|f| f.path.label()).collect()
}

/// The first failure's message contains `expected`.
#[track_caller]
fn assert_first_says(failures: &[beckon_net::RungFailure], expected: &str) {
    let first = failures[0].error.to_string();
    assert!(first.contains(expected), "{first}");
}

/// Every rung after the first was skipped: the first one's failure applied to them all, so
/// they were not tried.
#[track_caller]
fn assert_rest_skipped(failures: &[beckon_net::RungFailure]) {
    assert!(
        failures[1..]
            .iter()
            .all(|f| matches!(f.error, RungError::Skipped { .. })),
        "{failures:?}"
    );
}

#[tokio::test]
async fn primary_port_first_when_it_works() {
    let ca = TestCa::new("CA");
    let mut primary = broker(&ca).await;
    let fallback = broker(&ca).await;
    let mut ladder = ConnectionLadder::new(
        config("127.0.0.1", primary.port(), fallback.port()),
        tls_client(&ca),
    );
    let mut connected = ladder.connect().await.expect("connects");
    assert_eq!(connected.path, Path::direct(Transport::Mqtts));
    assert_eq!(connected.path.label(), "8883");
    assert!(connected.failed_before.is_empty());
    assert_eq!(connected.peer, primary.addr);
    assert_eq!(connected.tls.alpn.as_deref(), Some("mqtt"));
    round_trip(&mut connected).await;
    drop(connected);
    assert!(matches!(primary.next_served().await, Served::Raw { .. }));
    assert_eq!(ladder.last_working(), Some(&Path::direct(Transport::Mqtts)));
}

#[tokio::test]
async fn refused_primary_falls_back_to_alpn_mqtt() {
    let ca = TestCa::new("CA");
    let mut fallback = broker(&ca).await;
    let refused = refused_port();
    // "localhost" may resolve to ::1 first, where nothing listens: the next address is tried.
    let mut ladder = ConnectionLadder::new(
        config("localhost", refused, fallback.port()),
        tls_client(&ca),
    );
    let mut connected = ladder
        .connect()
        .await
        .expect("connects on the fallback port");
    assert_eq!(connected.path.label(), "443-mqtt");
    assert_eq!(labels(&connected.failed_before), ["8883"]);
    let failure = connected.failed_before[0].error.to_string();
    assert!(
        failure.contains(&format!("port {refused} refused")),
        "{failure}"
    );
    round_trip(&mut connected).await;
    drop(connected);
    assert_eq!(
        fallback.next_served().await,
        Served::Raw {
            alpn: Some("mqtt".into()),
            client_cert: false
        }
    );
}

#[tokio::test]
async fn falls_back_to_websocket_when_alpn_mqtt_is_refused() {
    let ca = TestCa::new("CA");
    // A fallback port that speaks only HTTP (a web server in front, say).
    let mut web_only =
        start_tls_server(server_config(ca.server_cert(&["localhost"]), &["http/1.1"])).await;
    let mut ladder = ConnectionLadder::new(
        config("localhost", refused_port(), web_only.port()),
        tls_client(&ca),
    );
    let mut connected = ladder.connect().await.expect("connects over WebSocket");
    assert_eq!(connected.path.label(), "443-websocket");
    assert_eq!(labels(&connected.failed_before), ["8883", "443-mqtt"]);
    assert!(matches!(
        connected.failed_before[1].error,
        RungError::Failed(PathError::Tls(TlsError::AlpnRefused { .. }))
    ));
    assert!(connected.timings.websocket.is_some());
    round_trip(&mut connected).await;
    // The server's first connection was the refused ALPN attempt.
    assert!(matches!(
        web_only.next_served().await,
        Served::HandshakeFailed(_)
    ));
    drop(connected);
    assert_eq!(web_only.next_served().await, Served::WebSocket);
}

#[tokio::test]
async fn starts_from_the_last_working_path() {
    let ca = TestCa::new("CA");
    let primary = broker(&ca).await;
    let mut fallback = broker(&ca).await;
    let stored = Path::direct(Transport::WebSocket).to_string();
    assert_eq!(stored, "443-websocket");
    let mut ladder = ConnectionLadder::new(
        config("127.0.0.1", primary.port(), fallback.port()),
        tls_client(&ca),
    )
    .with_last_working(Some(stored.parse().expect("stored path")));
    let order: Vec<String> = ladder.attempt_order().iter().map(Path::label).collect();
    assert_eq!(order, ["443-websocket", "8883", "443-mqtt"]);
    let mut connected = ladder.connect().await.expect("connects");
    assert_eq!(connected.path.label(), "443-websocket");
    round_trip(&mut connected).await;
    drop(connected);
    assert_eq!(fallback.next_served().await, Served::WebSocket);
}

#[tokio::test]
async fn a_stale_last_path_falls_back_to_the_normal_order() {
    let ca = TestCa::new("CA");
    let ladder = ConnectionLadder::new(config("127.0.0.1", 1, 2), tls_client(&ca))
        // A proxy that is no longer configured.
        .with_last_working(Some(
            "8883 via http://old-proxy:3128".parse().expect("path"),
        ));
    let order: Vec<String> = ladder.attempt_order().iter().map(Path::label).collect();
    assert_eq!(order, ["8883", "443-mqtt", "443-websocket"]);
}

#[tokio::test]
async fn every_rung_failing_lists_each_in_plain_words() {
    let ca = TestCa::new("CA");
    let (primary, fallback) = (refused_port(), refused_port());
    let mut ladder = ConnectionLadder::new(config("127.0.0.1", primary, fallback), tls_client(&ca));
    let err = ladder.connect().await.expect_err("nothing listens");
    assert_eq!(labels(&err.failures), ["8883", "443-mqtt", "443-websocket"]);
    // The WebSocket rung uses the same refused port: not tried again.
    assert!(matches!(err.failures[2].error, RungError::Skipped { .. }));
    let text = err.to_string();
    eprintln!("{text}");
    assert!(
        text.starts_with("no path to the broker 127.0.0.1 worked:"),
        "{text}"
    );
    assert!(
        text.contains(&format!("- 8883: port {primary} refused by 127.0.0.1")),
        "{text}"
    );
    assert!(
        text.contains(&format!("- 443-mqtt: port {fallback} refused by 127.0.0.1")),
        "{text}"
    );
    assert!(
        text.contains("- 443-websocket: not tried: it would fail like 443-mqtt above"),
        "{text}"
    );
    assert_eq!(ladder.last_working(), None);
}

#[tokio::test]
async fn an_unresolvable_broker_is_one_finding() {
    let ca = TestCa::new("CA");
    let mut ladder =
        ConnectionLadder::new(config("no-such-broker.invalid", 8883, 443), tls_client(&ca));
    let err = ladder.connect().await.expect_err("does not resolve");
    match &err.failures[0].error {
        RungError::Failed(e) => assert_eq!(e.stage(), Stage::Resolve, "{e}"),
        other => panic!("first rung was tried: {other}"),
    }
    assert_rest_skipped(&err.failures);
    assert!(err.to_string().contains("no-such-broker.invalid"), "{err}");
}

#[tokio::test]
async fn proxy_forbidding_8883_is_passed_on_443_like_squid() {
    let ca = TestCa::new("CA");
    let primary = broker(&ca).await;
    let mut fallback = broker(&ca).await;
    // The proxy allows CONNECT only to the fallback port, as squid's default allows only 443.
    let proxy = Tinyproxy::start(&[fallback.port()]);
    let mut cfg = config("127.0.0.1", primary.port(), fallback.port());
    cfg.proxy = Some(proxy_url(&proxy));
    cfg.server_name = Some("localhost".into());
    let mut ladder = ConnectionLadder::new(cfg, tls_client(&ca));
    let mut connected = ladder
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}\ntinyproxy said:\n{}", proxy.output()));
    assert_eq!(connected.path.label(), "443-mqtt via proxy");
    assert_eq!(
        connected.path,
        Path::via(Transport::AlpnMqtt, proxy_url(&proxy))
    );
    assert_eq!(
        connected.peer.port(),
        proxy.port,
        "the TCP peer is the proxy"
    );
    assert!(connected.timings.proxy.is_some());
    assert_eq!(labels(&connected.failed_before), ["8883 via proxy"]);
    match &connected.failed_before[0].error {
        RungError::Failed(PathError::Proxy(e @ ProxyError::Forbidden { .. })) => {
            assert!(
                e.to_string()
                    .contains(&format!("allow CONNECT to port {}", primary.port()))
            );
        }
        other => panic!("expected a 403 from tinyproxy, got {other}"),
    }
    round_trip(&mut connected).await;
    drop(connected);
    assert!(matches!(fallback.next_served().await, Served::Raw { .. }));

    // The stored path names the proxy and brings the ladder back to it first.
    let stored = ladder.last_working().expect("remembered").to_string();
    assert_eq!(
        stored,
        format!("443-mqtt via http://127.0.0.1:{}", proxy.port)
    );
    let again = ConnectionLadder::new(ladder.config().clone(), tls_client(&ca))
        .with_last_working(Some(stored.parse().expect("stored path")));
    assert_eq!(again.attempt_order()[0].label(), "443-mqtt via proxy");
}

#[tokio::test]
async fn websocket_through_tinyproxy() {
    let ca = TestCa::new("CA");
    let mut web_only =
        start_tls_server(server_config(ca.server_cert(&["localhost"]), &["http/1.1"])).await;
    let proxy = Tinyproxy::start(&[web_only.port()]);
    let mut cfg = config("127.0.0.1", refused_port(), web_only.port());
    cfg.proxy = Some(proxy_url(&proxy));
    cfg.server_name = Some("localhost".into());
    let mut ladder = ConnectionLadder::new(cfg, tls_client(&ca))
        .with_last_working(Some(Path::via(Transport::WebSocket, proxy_url(&proxy))));
    let mut connected = ladder
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}\ntinyproxy said:\n{}", proxy.output()));
    assert_eq!(connected.path.label(), "443-websocket via proxy");
    round_trip(&mut connected).await;
    drop(connected);
    assert_eq!(web_only.next_served().await, Served::WebSocket);
}

#[tokio::test]
async fn an_unreachable_proxy_means_direct() {
    let ca = TestCa::new("CA");
    let primary = broker(&ca).await;
    let mut cfg = config("127.0.0.1", primary.port(), refused_port());
    cfg.proxy = Some(beckon_net::ProxyUrl::new("127.0.0.1", refused_port()));
    let mut ladder = ConnectionLadder::new(cfg, tls_client(&ca));
    let mut connected = ladder.connect().await.expect("direct works");
    assert_eq!(connected.path.label(), "8883");
    assert_eq!(
        labels(&connected.failed_before),
        [
            "8883 via proxy",
            "443-mqtt via proxy",
            "443-websocket via proxy"
        ]
    );
    assert_first_says(
        &connected.failed_before,
        "cannot reach the proxy http://127.0.0.1:",
    );
    // The proxy's failure applies to every proxied rung: tried once.
    assert_rest_skipped(&connected.failed_before);
    round_trip(&mut connected).await;
}

#[tokio::test]
async fn a_proxy_asking_for_credentials_means_direct() {
    let ca = TestCa::new("CA");
    let primary = broker(&ca).await;
    let (proxy_addr, _task) = start_scripted_server(
        b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate\r\n\r\n",
    )
    .await;
    let mut cfg = config("127.0.0.1", primary.port(), refused_port());
    cfg.proxy = Some(beckon_net::ProxyUrl::new("127.0.0.1", proxy_addr.port()));
    let mut ladder = ConnectionLadder::new(cfg, tls_client(&ca));
    let connected = ladder.connect().await.expect("direct works");
    assert_eq!(connected.path.label(), "8883");
    assert_first_says(
        &connected.failed_before,
        "accepts only Negotiate authentication, which Beckon does not speak",
    );
    assert_rest_skipped(&connected.failed_before);
}

#[tokio::test]
async fn a_bad_certificate_is_not_retried_on_the_same_port() {
    let ca = TestCa::new("CA");
    let other = TestCa::new("other CA");
    let untrusted = start_tls_server(server_config(
        other.server_cert(&["localhost"]),
        &["mqtt", "http/1.1"],
    ))
    .await;
    let mut ladder = ConnectionLadder::new(
        config("127.0.0.1", refused_port(), untrusted.port()),
        tls_client(&ca),
    );
    let err = ladder.connect().await.expect_err("untrusted");
    assert!(matches!(
        err.failures[1].error,
        RungError::Failed(PathError::Tls(TlsError::UntrustedCertificate { .. }))
    ));
    assert!(matches!(err.failures[2].error, RungError::Skipped { .. }));
}

#[tokio::test]
async fn connects_from_a_chosen_source_address() {
    let ca = TestCa::new("CA");
    let primary = broker(&ca).await;
    let mut cfg = config("127.0.0.1", primary.port(), refused_port());
    cfg.local_addr = Some("127.0.0.9".parse().expect("ip"));
    let mut ladder = ConnectionLadder::new(cfg, tls_client(&ca));
    let mut connected = ladder.connect().await.expect("connects");
    round_trip(&mut connected).await;
}

#[tokio::test]
async fn one_path_at_a_time_for_the_doctor() {
    let ca = TestCa::new("CA");
    // A TLS server that chooses no ALPN at all and echoes whatever it gets.
    let plain_tls = start_tls_server(server_config(
        ca.server_cert(&["localhost", "127.0.0.1"]),
        &[],
    ))
    .await;
    let cfg = config("127.0.0.1", refused_port(), plain_tls.port());
    let tls = tls_client(&ca);

    let err = beckon_net::connect_path(&cfg, &tls, &Path::direct(Transport::Mqtts))
        .await
        .expect_err("refused");
    assert_eq!(err.stage(), Stage::Tcp);

    let err = beckon_net::connect_path(&cfg, &tls, &Path::direct(Transport::AlpnMqtt))
        .await
        .expect_err("no ALPN chosen");
    assert_eq!(err.stage(), Stage::Tls);
    assert!(
        matches!(err, PathError::AlpnNotNegotiated { chosen: None, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("it chose none"), "{err}");

    let err = beckon_net::connect_path(&cfg, &tls, &Path::direct(Transport::WebSocket))
        .await
        .expect_err("an echo is no WebSocket upgrade");
    assert_eq!(err.stage(), Stage::WebSocket, "{err}");
}

#[tokio::test]
async fn proxy_allowing_8883_is_the_first_choice() {
    let ca = TestCa::new("CA");
    let mut primary = broker(&ca).await;
    let fallback = broker(&ca).await;
    let proxy = Tinyproxy::start(&[primary.port(), fallback.port()]);
    let mut cfg = config("127.0.0.1", primary.port(), fallback.port());
    cfg.proxy = Some(proxy_url(&proxy));
    let mut ladder = ConnectionLadder::new(cfg, tls_client(&ca));
    let mut connected = ladder
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{e}\ntinyproxy said:\n{}", proxy.output()));
    assert_eq!(connected.path.label(), "8883 via proxy");
    assert!(connected.failed_before.is_empty());
    assert_eq!(
        connected.path.recommended_keepalive(),
        Duration::from_secs(30)
    );
    round_trip(&mut connected).await;
    drop(connected);
    assert!(matches!(primary.next_served().await, Served::Raw { .. }));
}
