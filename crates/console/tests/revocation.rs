//! Removing an agent revokes it in the broker's tenant file; agents renew their
//! certificates with their check-in token. Bad input changes nothing.

mod common;

use axum::http::StatusCode;
use beckon_identity::{Credential, Role, TenantDirectory, certificate_serial};
use serde_json::{Value, json};

fn serial_of(pem: &str) -> String {
    use beckon_pki::rustls::pki_types::CertificateDer;
    use beckon_pki::rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    certificate_serial(&der).unwrap()
}

fn error_of(text: &str) -> String {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {text}"))
        .to_owned()
}

#[tokio::test]
async fn removal_revokes_in_the_tenant_file_and_renewal_needs_a_live_agent() {
    let files = tempfile::tempdir().unwrap();
    let tenant_file = files.path().join("tenants").join("default.toml");
    let path = tenant_file.clone();
    let api = common::start_with(move |c| {
        c.broker_tenant_file = Some(path);
        c.agent_certificate_validity = std::time::Duration::from_secs(3600);
    })
    .await;
    // Written at start; loads in the broker's tenant folder, nothing revoked.
    let written = std::fs::read_to_string(&tenant_file).expect("tenant file written at start");
    let directory = TenantDirectory::load(tenant_file.parent().unwrap());
    assert!(directory.errors.is_empty(), "{:?}", directory.errors);
    assert!(
        directory
            .directory
            .get("default")
            .unwrap()
            .revoked
            .is_empty()
    );

    let pc1 = api.enroll("pc-1", json!({})).await;
    let pc2 = api.enroll("pc-2", json!({})).await;
    let enrolled_serial = serial_of(pc1["certificate"].as_str().unwrap());
    let auth1 = format!("Bearer {}", pc1["checkin_token"].as_str().unwrap());
    let auth2 = format!("Bearer {}", pc2["checkin_token"].as_str().unwrap());
    let renew = "/api/v1/agents/pc-1/certificate";
    let good = json!({"csr": common::csr()}).to_string();

    // Bad input: no token, wrong token, another agent's token, bad CSR, bad JSON, unknown
    // field, unknown agent: each a 4xx with a message.
    for (path, auth, body, want) in [
        (renew, None, good.as_str(), StatusCode::UNAUTHORIZED),
        (
            renew,
            Some("Bearer bka_wrong"),
            good.as_str(),
            StatusCode::UNAUTHORIZED,
        ),
        (
            renew,
            Some(auth2.as_str()),
            good.as_str(),
            StatusCode::UNAUTHORIZED,
        ),
        (
            renew,
            Some(auth1.as_str()),
            r#"{"csr":"not a csr"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            renew,
            Some(auth1.as_str()),
            r#"{"csr":"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (renew, Some(auth1.as_str()), "{", StatusCode::BAD_REQUEST),
        (
            renew,
            Some(auth1.as_str()),
            r#"{"csr":"x","days":3}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/api/v1/agents/pc-9/certificate",
            Some(auth1.as_str()),
            good.as_str(),
            StatusCode::UNAUTHORIZED,
        ),
    ] {
        let (s, text) = api.text("POST", path, auth, Some(body)).await;
        assert_eq!(s, want, "{path} {auth:?} {body}: {text}");
        assert!(!error_of(&text).is_empty());
    }

    // A good renewal: a new certificate for the same identity, with another serial.
    let (s, text) = api.text("POST", renew, Some(&auth1), Some(&good)).await;
    assert_eq!(s, StatusCode::OK, "{text}");
    let renewed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(renewed["agent_id"], "pc-1");
    let renewed_serial = serial_of(renewed["certificate"].as_str().unwrap());
    assert_ne!(renewed_serial, enrolled_serial);
    let not_after = renewed["not_after"].as_i64().unwrap();
    let left = not_after - beckon_console::model::now_ms();
    assert!(
        (3_500_000..=3_600_000).contains(&left),
        "validity as configured: {left} ms"
    );
    assert_eq!(renewed["ca"].as_str(), pc1["ca"].as_str());
    // Nothing so far changed the tenant file.
    assert_eq!(std::fs::read_to_string(&tenant_file).unwrap(), written);

    // Remove pc-1: both of its certificates and its tokens up to now are listed.
    let (s, _) = api.call("DELETE", "/api/v1/agents/pc-1", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let loaded = TenantDirectory::load(tenant_file.parent().unwrap());
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let tenant = loaded.directory.get("default").unwrap().clone();
    assert_eq!(tenant.revoked.len(), 1, "only pc-1");
    for serial in [&enrolled_serial, &renewed_serial] {
        assert!(
            tenant
                .revocation(Role::Agent, "pc-1", Credential::Certificate(serial))
                .is_some()
        );
    }
    let pc2_serial = serial_of(pc2["certificate"].as_str().unwrap());
    assert!(
        tenant
            .revocation(Role::Agent, "pc-2", Credential::Certificate(&pc2_serial))
            .is_none()
    );
    let now = beckon_console::model::now_ms() / 1000;
    assert!(
        tenant
            .revocation(Role::Agent, "pc-1", Credential::Token(now - 5))
            .is_some()
    );
    assert!(
        tenant
            .revocation(Role::Agent, "pc-1", Credential::Token(now + 5))
            .is_none()
    );

    // The same text over the API, for a broker on another host; administrators only.
    let admin = format!("Bearer {}", api.token);
    let (s, text) = api
        .text("GET", "/api/v1/tenant-file", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(text, std::fs::read_to_string(&tenant_file).unwrap());
    let (s, text) = api.text("GET", "/api/v1/tenant-file", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(error_of(&text).contains("authentication required"));

    // A removed agent cannot renew; deleting it again is a 404 and changes nothing.
    let (s, text) = api.text("POST", renew, Some(&auth1), Some(&good)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{text}");
    let before = std::fs::read_to_string(&tenant_file).unwrap();
    let (s, _) = api.call("DELETE", "/api/v1/agents/pc-1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(std::fs::read_to_string(&tenant_file).unwrap(), before);

    // Enrolling pc-1 again makes a new identity: its new certificate is not revoked, the
    // old ones stay revoked.
    let again = api.enroll("pc-1", json!({})).await;
    let new_serial = serial_of(again["certificate"].as_str().unwrap());
    let tenant = TenantDirectory::load(tenant_file.parent().unwrap())
        .directory
        .get("default")
        .unwrap()
        .clone();
    assert!(
        tenant
            .revocation(Role::Agent, "pc-1", Credential::Certificate(&new_serial))
            .is_none()
    );
    assert!(
        tenant
            .revocation(
                Role::Agent,
                "pc-1",
                Credential::Certificate(&enrolled_serial)
            )
            .is_some()
    );
    api.handle.shutdown().await;
}

#[tokio::test]
async fn an_unwritable_tenant_file_stops_the_start_with_its_path() {
    let files = tempfile::tempdir().unwrap();
    // A folder where the file should be: cannot be replaced by a file.
    let tenant_file = files.path().join("default.toml");
    std::fs::create_dir(&tenant_file).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = beckon_console::ConsoleConfig::new(dir.path().join("data"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.broker_tenant_file = Some(tenant_file.clone());
    let Err(e) = beckon_console::Console::start(config).await else {
        panic!("the console must not start");
    };
    let text = e.to_string();
    assert!(
        text.contains("default.toml") && text.contains("--broker-tenant-file"),
        "{text}"
    );
}

/// A broker beside the console that learns revocations only from the console's feed: its
/// tenant file is fetched once (`GET /api/v1/tenant-file`, as for a broker on another host)
/// and never again. Returns the broker's MQTT port, its handle, the CA of its certificate,
/// its admin address and the API token file it reads.
async fn feed_broker(
    api: &common::Api,
    dir: &std::path::Path,
    poll_interval_secs: u64,
) -> (
    u16,
    beckon_broker::ServerHandle,
    std::path::PathBuf,
    std::net::SocketAddr,
    std::path::PathBuf,
) {
    let admin = format!("Bearer {}", api.token);
    let (s, text) = api
        .text(
            "GET",
            "/api/v1/tenant-file?revoked=false",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(!text.contains("[[revoked]]"), "{text}");
    std::fs::create_dir_all(dir.join("tenants")).unwrap();
    std::fs::write(dir.join("tenants").join("default.toml"), text).unwrap();
    // The least role that reads the feed.
    let (s, created) = api
        .call(
            "POST",
            "/api/v1/api-tokens",
            Some(json!({"name": "broker", "role": "viewer"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let token_file = dir.join("console-token");
    std::fs::write(&token_file, created["token"].as_str().unwrap()).unwrap();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let console = api.handle.url();
    let feed_token = token_file.clone();
    let (bound, handle, ca) = common::tenant_broker_with(dir, 0, move |c| {
        c.listeners.admin = beckon_broker::Listen(Some(admin_port));
        c.revocation_feed = vec![beckon_broker::config::RevocationFeedConfig {
            tenant: "default".into(),
            console,
            token_file: feed_token,
            ca: None,
            poll_interval_secs,
        }];
    })
    .await;
    (
        bound.mqtts.unwrap().port(),
        handle,
        ca,
        bound.admin.unwrap(),
        token_file,
    )
}

/// The CONNACK code the broker answers to `enrolled`'s certificate.
async fn connack_code(
    port: u16,
    ca: &std::path::Path,
    id: &str,
    enrolled: &Value,
    key: &rcgen::KeyPair,
) -> u8 {
    let mut peer = common::tls_peer(port, ca, enrolled, key).await;
    let connect = beckon_mqtt::Connect::new(beckon_mqtt::ProtocolVersion::V5, id, 60);
    peer.send(beckon_mqtt::Packet::Connect(Box::new(connect)))
        .await;
    match peer.recv().await {
        beckon_mqtt::Packet::ConnAck(a) => a.code.0,
        other => panic!("{other:?} instead of a CONNACK"),
    }
}

/// The value of the broker's metric line starting with `name` (labels included).
async fn broker_metric(admin: std::net::SocketAddr, name: &str) -> Option<f64> {
    use beckon_net::http::{HttpClient, HttpSettings, Request, Url};
    let url = Url::parse(&format!("http://{admin}/metrics")).unwrap();
    let answer = HttpClient::new(HttpSettings::default())
        .request(&url, Request::get(), std::time::Duration::from_secs(5))
        .await
        .ok()?;
    let text = String::from_utf8(answer.body).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_following_the_feed_cuts_a_removed_agent_off_within_ten_seconds() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    // The console's own tenant file (written elsewhere) leaves revocations to the feed.
    let own_file = dir.path().join("console-side").join("default.toml");
    let path = own_file.clone();
    let api = common::start_with(move |c| {
        c.broker_tenant_file = Some(path);
        c.tenant_file_revocations = false;
    })
    .await;
    let (port, broker, ca, _, _) = feed_broker(&api, dir.path(), 5).await;
    let (k1, k2) = (
        rcgen::KeyPair::generate().unwrap(),
        rcgen::KeyPair::generate().unwrap(),
    );
    let pc1 = api.enroll_with_key("pc-1", json!({}), &k1).await;
    let pc2 = api.enroll_with_key("pc-2", json!({}), &k2).await;
    let mut c1 = common::tls_agent(port, &ca, "pc-1", &pc1, &k1).await;
    let mut c2 = common::tls_agent(port, &ca, "pc-2", &pc2, &k2).await;

    let (s, _) = api.call("DELETE", "/api/v1/agents/pc-1", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let removed = Instant::now();
    // The broker closes pc-1's connection (a DISCONNECT may come first).
    let limit = Duration::from_secs(10);
    loop {
        let left = limit.saturating_sub(removed.elapsed());
        match c1.recv_within(left).await {
            Some(beckon_mqtt::Packet::Disconnect(_)) | Some(beckon_mqtt::Packet::PingResp) => {}
            Some(other) => panic!("pc-1 got {other:?}"),
            None => break,
        }
    }
    let cut_off = removed.elapsed();
    assert!(cut_off < limit, "pc-1 still connected after {cut_off:?}");
    eprintln!("removed agent cut off {cut_off:?} after its removal");
    let written = std::fs::read_to_string(&own_file).unwrap();
    assert!(
        written.contains("[[ca]]") && !written.contains("[[revoked]]"),
        "{written}"
    );
    // Its reconnect is refused; pc-2 was not touched and still connects.
    assert_eq!(
        connack_code(port, &ca, "pc-1", &pc1, &k1).await,
        beckon_mqtt::ReasonCode::NOT_AUTHORIZED.0
    );
    c2.send(beckon_mqtt::Packet::PingReq).await;
    assert!(matches!(c2.recv().await, beckon_mqtt::Packet::PingResp));
    // Enrolled again, pc-1 is a new identity and connects.
    let k1b = rcgen::KeyPair::generate().unwrap();
    let again = api.enroll_with_key("pc-1", json!({}), &k1b).await;
    assert_eq!(connack_code(port, &ca, "pc-1", &again, &k1b).await, 0);
    broker.shutdown().await.unwrap();
    api.handle.shutdown().await;
}

/// Removed agents seeded straight into the console's database: `gone-1` to `gone-<n>`, each
/// with one revoked certificate, in the revocation feed in that order.
fn seed_removed_agents(api: &common::Api, n: u32) {
    let postgres = matches!(
        api.handle.state.config.database,
        Some(beckon_console::store::DatabaseUrl::Postgres(_))
    );
    let blob = if postgres { "'\\x00'::bytea" } else { "X'00'" };
    let numbers =
        format!("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n})");
    let far = 4_102_444_800_000i64; // 2100
    for statement in [
        format!(
            "{numbers} INSERT INTO agents (id, name, hostname, os, addresses, macs, enrolled_at, secret_hash, revoked, revoked_at) SELECT 'gone-' || i, 'gone-' || i, '', '', '[]', '[]', 0, {blob}, 1, 1000 FROM n"
        ),
        format!(
            "{numbers} INSERT INTO agent_certificates (serial, agent_id, issued_at, not_after, revoked_at) SELECT 'aa' || i, 'gone-' || i, 0, {far}, 1000 FROM n"
        ),
        format!(
            "{numbers} INSERT INTO revocation_feed (agent_id, seq) SELECT 'gone-' || i, i FROM n"
        ),
        format!("UPDATE revocation_seq SET last_seq = {n}"),
    ] {
        api.execute_sql(&statement);
    }
    if postgres {
        // Statistics of the loaded tables, as autovacuum gathers them soon after a bulk
        // load: without them the planner takes the tables for empty.
        api.execute_sql("ANALYZE");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_takes_in_a_hundred_thousand_revocations_and_keeps_them_when_the_feed_fails() {
    use std::time::{Duration, Instant};
    let n = 100_000;
    let api = common::start_with(|_| {}).await;
    let seeding = Instant::now();
    seed_removed_agents(&api, n);
    eprintln!("seeded {n} removed agents in {:?}", seeding.elapsed());
    // One real agent, removed last: the broker knows it only once it has read every page.
    let key = rcgen::KeyPair::generate().unwrap();
    let last = api.enroll_with_key("last", json!({}), &key).await;
    let (s, _) = api.call("DELETE", "/api/v1/agents/last", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (port, broker, ca, admin, token_file) = feed_broker(&api, dir.path(), 1).await;
    let known = "beckon_broker_revocation_feed_revocations{tenant=\"default\"}";
    loop {
        if broker_metric(admin, known).await == Some(f64::from(n + 1)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the broker knows {:?} revocations",
            broker_metric(admin, known).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "the broker read {} revocations in {:?}",
        n + 1,
        started.elapsed()
    );
    assert_eq!(
        connack_code(port, &ca, "last", &last, &key).await,
        beckon_mqtt::ReasonCode::NOT_AUTHORIZED.0
    );

    // A wrong token: the console refuses the broker, which keeps everything it knows.
    std::fs::write(&token_file, "bkt_wrong").unwrap();
    let failures = "beckon_broker_revocation_feed_failures_total{tenant=\"default\"}";
    let waiting = Instant::now();
    while broker_metric(admin, failures).await.unwrap_or(0.0) < 2.0 {
        assert!(
            waiting.elapsed() < Duration::from_secs(20),
            "no failed poll"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(broker_metric(admin, known).await, Some(f64::from(n + 1)));
    assert_eq!(
        connack_code(port, &ca, "last", &last, &key).await,
        beckon_mqtt::ReasonCode::NOT_AUTHORIZED.0
    );
    broker.shutdown().await.unwrap();
    api.handle.shutdown().await;
}
