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
