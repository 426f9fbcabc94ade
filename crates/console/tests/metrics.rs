//! The console's Prometheus metrics, scraped over HTTP as Prometheus does: a failed login,
//! refused and throttled enrollments, an enrollment, a wake-up call that Beckon's broker
//! accepts, and the API requests, database calls and backlog they make, each move their
//! figure. Every wait is bounded.

mod common;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use beckon_broker::{BrokerConfig, Listen, Server};
use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET /metrics` over a real socket with the bearer `token` (none: without): the status
/// and the body.
async fn scrape(addr: SocketAddr, token: Option<&str>) -> (u16, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let req =
            format!("GET /metrics HTTP/1.1\r\nHost: console\r\n{auth}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("send");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.expect("read");
        String::from_utf8(answer).expect("text")
    };
    let text = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("answered in time");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head[9..12].parse().expect("a status");
    (status, body.to_owned())
}

/// The value of the sample `series` (name and labels as exposed).
fn value(text: &str, series: &str) -> f64 {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// `req` as if it came from `ip`.
fn from(ip: [u8; 4], mut req: Request<Body>) -> Request<Body> {
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((ip, 40000))));
    req
}

#[tokio::test]
async fn logins_enrollments_calls_requests_and_the_database_move_their_figures() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = BrokerConfig {
        data_dir: dir.path().join("broker"),
        allow_anonymous: true,
        ..BrokerConfig::default()
    };
    config.listeners.mqtts = Listen(None);
    config.listeners.mqtt = Listen(Some(([127, 0, 0, 1], 0).into()));
    let (bound, broker) = Server::bind(config).await.expect("broker starts");
    let api = start_with_plain_broker(bound.mqtt.expect("plain listener").port()).await;
    let addr = api.handle.local_addr;

    let (status, body) = scrape(addr, None).await;
    assert_eq!(status, 401, "the metrics need a token: {body}");
    let viewer = api
        .handle
        .create_api_token_with_role("prometheus", beckon_console::model::Role::Viewer)
        .await
        .unwrap();
    // Not scraped with the token before the end: the database figures are then read at
    // most every 10 s.

    let (s, _, _) = api.raw(login("admin", "not the password")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Ten wrong tokens from one address, then that address is throttled.
    let enroll = |ip, token: &str| {
        from(
            ip,
            request(
                "POST",
                "/api/v1/enroll",
                None,
                Some(json!({"token": token, "csr": csr()}).to_string()),
            ),
        )
    };
    for _ in 0..10 {
        let (s, _, _) = api.raw(enroll([198, 51, 100, 1], "bke_guess")).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, _, _) = api.raw(enroll([198, 51, 100, 1], "bke_guess")).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    api.enroll("pc-1", json!({"hostname": "pc-1"})).await;

    let (s, call) = api
        .create_call(json!({"target": {"agents": ["pc-1"]}, "reason": "metrics"}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{call}");
    let id = call["id"].as_str().unwrap().to_owned();
    // The broker accepts it for the offline agent's session: sent.
    api.wait_for("the call is sent", &format!("/api/v1/calls/{id}"), |c| {
        c["deliveries"][0]["state"] == "sent"
    })
    .await;

    let (status, text) = scrape(addr, Some(&viewer)).await;
    assert_eq!(status, 200, "{text}");
    for (series, expected) in [
        ("beckon_console_logins_total{outcome=\"refused\"}", 1.0),
        ("beckon_console_logins_total{outcome=\"accepted\"}", 0.0),
        (
            "beckon_console_enrollments_total{outcome=\"refused\"}",
            10.0,
        ),
        (
            "beckon_console_enrollments_total{outcome=\"throttled\"}",
            1.0,
        ),
        (
            "beckon_console_enrollments_total{outcome=\"accepted\"}",
            1.0,
        ),
        ("beckon_console_calls_total", 1.0),
        (
            "beckon_console_delivery_changes_total{state=\"queued\"}",
            1.0,
        ),
        ("beckon_console_delivery_changes_total{state=\"sent\"}", 1.0),
        ("beckon_console_deliveries{state=\"sent\"}", 1.0),
        ("beckon_console_deliveries{state=\"queued\"}", 0.0),
        ("beckon_console_agents{presence=\"unknown\"}", 1.0),
        ("beckon_console_broker_connected", 1.0),
        ("beckon_console_dispatch_queue", 0.0),
        (
            "beckon_console_http_requests_total{route=\"/api/v1/calls\",method=\"POST\",status=\"2xx\"}",
            1.0,
        ),
        (
            "beckon_console_http_requests_total{route=\"/api/v1/enroll\",method=\"POST\",status=\"4xx\"}",
            11.0,
        ),
        (
            "beckon_console_http_request_duration_seconds_count{route=\"/api/v1/calls\",method=\"POST\"}",
            1.0,
        ),
        (
            "beckon_console_database_errors_total{kind=\"failure\"}",
            0.0,
        ),
    ] {
        assert_eq!(value(&text, series), expected, "{series} in:\n{text}");
    }
    // The route's template, never the path asked for.
    assert!(
        text.contains("route=\"/api/v1/calls/{id}\"") && !text.contains(&id),
        "{text}"
    );
    assert!(value(&text, "beckon_console_database_duration_seconds_count") > 10.0);

    api.handle.shutdown().await;
    broker.shutdown().await.ok();
}
