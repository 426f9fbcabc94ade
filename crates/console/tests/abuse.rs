//! The console under abuse: slow and idle connections, too many connections, big bodies,
//! password guessing, enrollment token guessing, forgotten sessions.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One `GET path` with the API token over a real socket, `Connection: close`: the status,
/// or `None` when no answer came within `limit`.
async fn get_over_tcp(addr: SocketAddr, path: &str, token: &str, limit: Duration) -> Option<u16> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: console\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.ok()?;
        let text = String::from_utf8_lossy(&answer).into_owned();
        text.get(9..12)?.parse().ok()
    };
    tokio::time::timeout(limit, exchange).await.ok().flatten()
}

/// A client that sent a request line and one header, then nothing.
async fn slow_client(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /api/v1/status HTTP/1.1\r\nHost: console\r\n")
        .await
        .expect("write");
    s
}

/// Whether the server closed `s` within `limit`.
async fn closed_within(mut s: TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let wait = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, wait).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_slow_connections_neither_starve_the_api_nor_stay_open() {
    // A shorter header timeout than the default (10 s) keeps the test short.
    let api = start_with(|c| c.http.header_timeout = Duration::from_secs(4)).await;
    let addr = api.handle.local_addr;
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..2000 {
        slow.push(slow_client(addr).await);
    }
    let call = Instant::now();
    let status = get_over_tcp(addr, "/api/v1/status", &api.token, Duration::from_secs(1)).await;
    assert_eq!(
        status,
        Some(200),
        "answered within 1 s despite 2,000 slow connections"
    );
    eprintln!(
        "API answered in {:?} next to 2,000 slow connections",
        call.elapsed()
    );
    let closing: Vec<_> = slow
        .into_iter()
        .map(|s| tokio::spawn(closed_within(s, Duration::from_secs(30))))
        .collect();
    let mut open = 0;
    for c in closing {
        if !c.await.expect("task") {
            open += 1;
        }
    }
    assert_eq!(open, 0, "slow connections still open after 30 s");
    let all_closed = started.elapsed();
    eprintln!("2,000 slow connections closed within {all_closed:?}");
    assert!(
        all_closed >= Duration::from_secs(3),
        "not closed before the header timeout: {all_closed:?}"
    );
}

#[tokio::test]
async fn at_the_connection_limit_new_connections_wait_and_are_then_served() {
    let api = start_with(|c| c.http.max_connections = 16).await;
    let addr = api.handle.local_addr;
    let mut slow = Vec::new();
    for _ in 0..16 {
        slow.push(slow_client(addr).await);
    }
    let token = api.token.clone();
    let call = tokio::spawn(async move {
        get_over_tcp(addr, "/api/v1/status", &token, Duration::from_secs(10)).await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!call.is_finished(), "served beyond the connection limit");
    let freed = Instant::now();
    drop(slow);
    assert_eq!(call.await.expect("task"), Some(200));
    assert!(
        freed.elapsed() < Duration::from_secs(2),
        "{:?}",
        freed.elapsed()
    );
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed() {
    let api = start_with(|c| c.http.idle_timeout = Duration::from_secs(1)).await;
    let mut s = TcpStream::connect(api.handle.local_addr).await.unwrap();
    let req = format!(
        "GET /api/v1/status HTTP/1.1\r\nHost: console\r\nAuthorization: Bearer {}\r\n\r\n",
        api.token
    );
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..2 {
        // Kept alive: a second request within the idle time is answered.
        s.write_all(req.as_bytes()).await.unwrap();
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let idle = Instant::now();
    assert!(closed_within(s, Duration::from_secs(5)).await);
    let after = idle.elapsed();
    assert!(
        after >= Duration::from_millis(500) && after < Duration::from_secs(3),
        "{after:?}"
    );
}

#[tokio::test]
async fn bodies_are_limited_per_route() {
    let api = start_with(|_| {}).await;
    let login = |size: usize| {
        let body = json!({"user": "admin", "password": "x".repeat(size)}).to_string();
        request("POST", "/api/v1/login", None, Some(body))
    };
    let (s, _, body) = api.raw(login(5 * 1024)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["error"].as_str().unwrap().contains("too large"));
    let (s, _, _) = api.raw(login(2 * 1024)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Enrollment takes a CSR and an inventory: 32 KiB is fine, 100 KiB is not.
    let enroll = |size: usize| {
        let body = json!({"token": "bke_x", "csr": "c".repeat(size)}).to_string();
        request("POST", "/api/v1/enroll", None, Some(body))
    };
    let (s, _, _) = api.raw(enroll(32 * 1024)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = api.raw(enroll(100 * 1024)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    // Over a real connection too: a body larger than the head's buffer is read in full.
    let body = json!({"token": "bke_x", "csr": "c".repeat(48 * 1024)}).to_string();
    let mut s = TcpStream::connect(api.handle.local_addr).await.unwrap();
    let head = format!(
        "POST /api/v1/enroll HTTP/1.1\r\nHost: console\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// The audit log's entries of kind `what`.
async fn audited(api: &Api, what: &str) -> Vec<Value> {
    let (s, log) = api.call("GET", "/api/v1/audit?limit=100", None).await;
    assert_eq!(s, StatusCode::OK);
    log.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == what)
        .cloned()
        .collect()
}

#[tokio::test]
async fn failed_logins_are_throttled_per_user_and_per_address_and_audited() {
    let api = start_with(|_| {}).await;
    let password = api.handle.initial_admin_password.clone().unwrap();
    let (s, _) = api
        .call(
            "POST",
            "/api/v1/users",
            Some(json!({"name": "bob", "password": "bob's long password"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // Ten wrong passwords for admin, from ten addresses.
    for i in 0..10 {
        let (s, _, _) = api.raw(from([10, 0, 0, i], login("admin", "wrong"))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // Then even the right password waits, from anywhere.
    let (s, headers, body) = api
        .raw(from([10, 0, 1, 1], login("admin", &password)))
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let wait = retry_after(&headers);
    assert!((250..=300).contains(&wait), "{wait}");
    assert!(body["error"].as_str().unwrap().contains("try again in"));
    // Other users are not held up.
    let (s, _, _) = api
        .raw(from([10, 0, 1, 1], login("bob", "bob's long password")))
        .await;
    assert_eq!(s, StatusCode::OK);
    let entries = audited(&api, "login.throttled").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["detail"]["user"], "admin");
    assert_eq!(entries[0]["detail"]["by_user"], true);

    // Ten failures from one address, each for another name: that address waits, for bob too.
    for i in 0..10 {
        let (s, _, _) = api
            .raw(from([192, 0, 2, 9], login(&format!("guess{i}"), "wrong")))
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let (s, headers, _) = api
        .raw(from([192, 0, 2, 9], login("bob", "bob's long password")))
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(&headers) > 0);
    let (s, _, _) = api
        .raw(from([192, 0, 2, 10], login("bob", "bob's long password")))
        .await;
    assert_eq!(s, StatusCode::OK, "other addresses are not held up");
    let entries = audited(&api, "login.throttled").await;
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0]["who"], "address:192.0.2.9");
    assert_eq!(entries[0]["detail"]["by_address"], true);
}

#[tokio::test]
async fn enrollment_checks_the_token_before_signing_and_throttles_guessers() {
    let api = start_with(|_| {}).await;
    let enroll = |ip: [u8; 4], body: Value| {
        from(
            ip,
            request("POST", "/api/v1/enroll", None, Some(body.to_string())),
        )
    };
    // A CSR the CA cannot sign with a token that is not valid: refused for the token, so
    // the CA never looked at the CSR.
    let bad_csr = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
    let (s, _, body) = api
        .raw(enroll(
            [198, 51, 100, 1],
            json!({"token": "bke_guess", "csr": bad_csr}),
        ))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not known"),
        "{body}"
    );
    // With a valid token the same CSR is refused for what it is, and the token stays.
    let token = api.enrollment_token(json!({})).await;
    let (s, _, body) = api
        .raw(enroll(
            [198, 51, 100, 2],
            json!({"token": token, "csr": bad_csr}),
        ))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    for _ in 0..9 {
        let (s, _, _) = api
            .raw(enroll(
                [198, 51, 100, 1],
                json!({"token": "bke_guess", "csr": csr()}),
            ))
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    // Ten failures: this address waits, even with a valid token.
    let (s, headers, body) = api
        .raw(enroll(
            [198, 51, 100, 1],
            json!({"token": token, "csr": csr()}),
        ))
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(retry_after(&headers) > 0);
    let entries = audited(&api, "enroll.throttled").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["who"], "address:198.51.100.1");
    // Another address enrolls with it.
    let (s, _, body) = api
        .raw(enroll(
            [198, 51, 100, 2],
            json!({"token": token, "csr": csr()}),
        ))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn sessions_end_after_their_idle_time_and_their_lifetime() {
    let api = start_with(|c| {
        c.session_idle_timeout = Duration::from_millis(1500);
        c.session_lifetime = Duration::from_secs(4);
    })
    .await;
    let password = api.handle.initial_admin_password.clone().unwrap();
    let status = |cookie: &str| with_cookie("GET", "/api/v1/status", cookie, None);

    let (s, headers, _) = api.raw(login("admin", &password)).await;
    assert_eq!(s, StatusCode::OK);
    let set = headers.iter().find(|(k, _)| k == "set-cookie").unwrap();
    assert!(set.1.contains("Max-Age=4"), "{set:?}");
    let cookie = session_cookie(&headers);
    assert_eq!(api.raw(status(&cookie)).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let (s, _, body) = api.raw(status(&cookie)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "idle too long");
    assert!(
        body["error"].as_str().unwrap().contains("without use"),
        "{body}"
    );
    assert_eq!(
        api.raw(status(&cookie)).await.0,
        StatusCode::UNAUTHORIZED,
        "and it stays ended"
    );

    // Used every half second, it still ends at its lifetime.
    let (_, headers, _) = api.raw(login("admin", &password)).await;
    let cookie = session_cookie(&headers);
    let logged_in = Instant::now();
    let ended = loop {
        let (s, _, body) = api.raw(status(&cookie)).await;
        if s != StatusCode::OK {
            assert_eq!(s, StatusCode::UNAUTHORIZED);
            assert!(
                body["error"].as_str().unwrap().contains("has ended"),
                "{body}"
            );
            break logged_in.elapsed();
        }
        assert!(logged_in.elapsed() < WAIT, "the session never ended");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        ended >= Duration::from_millis(3500) && ended < Duration::from_secs(6),
        "{ended:?}"
    );
}

#[tokio::test]
async fn enrollment_hands_out_the_public_url_when_configured_and_the_host_otherwise() {
    for public in [Some("https://console.example.com:8443"), None] {
        let api = start_with(|c| c.public_url = public.map(str::to_owned)).await;
        let token = api.enrollment_token(json!({})).await;
        let mut req = request(
            "POST",
            "/api/v1/enroll",
            None,
            Some(json!({"token": token, "csr": csr()}).to_string()),
        );
        req.headers_mut()
            .insert("host", "10.1.2.3:8080".parse().unwrap());
        let (s, _, e) = api.raw(req).await;
        assert_eq!(s, StatusCode::CREATED, "{e}");
        let expected = public.unwrap_or("http://10.1.2.3:8080");
        assert_eq!(e["checkin_url"], expected);
        // The Enrollment page builds its command from the status.
        let (_, status) = api.call("GET", "/api/v1/status", None).await;
        assert_eq!(
            status["enrollment"]["console_url"],
            json!(public),
            "{status}"
        );
    }
}

#[tokio::test]
async fn an_event_stream_outlives_the_header_and_idle_timeouts() {
    let api = start_with(|c| {
        c.http.header_timeout = Duration::from_secs(1);
        c.http.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let mut s = TcpStream::connect(api.handle.local_addr).await.unwrap();
    let req = format!(
        "GET /api/v1/events HTTP/1.1\r\nHost: console\r\nAuthorization: Bearer {}\r\n\r\n",
        api.token
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert!(
        !closed_within(s, Duration::from_secs(3)).await,
        "a live event stream was cut"
    );
}
