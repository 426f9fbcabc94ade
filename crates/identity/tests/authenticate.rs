//! CONNECT authentication: certificate, token, both, client id and quota.

mod common;

use beckon_identity::{
    AuthMethod, Authenticator, CaCertificate, Credentials, KeyId, Refusal, Role, SigningKey,
    Tenant, TenantDirectory, TenantId, TokenSigner, check_quota,
};
use common::{NOW, TestCa};

struct Setup {
    ca: TestCa,
    signer: TokenSigner,
    directory: TenantDirectory,
}

fn setup() -> Setup {
    let ca = TestCa::new("acme", "acme CA");
    let key = SigningKey::generate(KeyId::new("console-1").unwrap()).unwrap();
    let mut acme = Tenant::new(TenantId::new("acme").unwrap());
    acme.ca_certificates
        .push(CaCertificate::from_der(ca.der.clone()).unwrap());
    acme.token_keys.insert(key.kid().clone(), key.public_key());
    acme.max_connections = Some(2);
    Setup {
        ca,
        signer: TokenSigner::new(TenantId::new("acme").unwrap(), key),
        directory: TenantDirectory::from_tenants([acme]),
    }
}

fn auth(
    s: &Setup,
    cert: Option<&[u8]>,
    password: Option<&[u8]>,
    client_id: &str,
) -> Result<beckon_identity::Authenticated, Refusal> {
    Authenticator::default().authenticate(
        &s.directory,
        &Credentials {
            client_certificate: cert,
            password,
            client_id,
        },
        NOW,
    )
}

#[test]
fn a_certificate_alone_authenticates() {
    let s = setup();
    let leaf = s.ca.agent("acme", "pc-1");
    let ok = auth(&s, Some(&leaf), None, "pc-1").unwrap();
    assert_eq!(ok.identity.to_string(), "acme/agent/pc-1");
    assert_eq!(ok.method, AuthMethod::Certificate);
    assert_eq!(ok.token_expires_at, None);
    assert!(!ok.client_id_assigned);
    // An empty password (some clients always send one) is no password.
    assert!(auth(&s, Some(&leaf), Some(b""), "pc-1").is_ok());
}

#[test]
fn a_token_alone_authenticates() {
    let s = setup();
    let token = s.signer.issue(Role::Server, "console", NOW, 3600).unwrap();
    let ok = auth(&s, None, Some(token.as_bytes()), "console").unwrap();
    assert_eq!(ok.identity.to_string(), "acme/server/console");
    assert_eq!(ok.method, AuthMethod::Token);
    assert_eq!(ok.token_expires_at, Some(NOW + 3600));
}

#[test]
fn certificate_and_token_must_agree() {
    let s = setup();
    let leaf = s.ca.agent("acme", "pc-1");
    let same = s.signer.issue(Role::Agent, "pc-1", NOW, 60).unwrap();
    let ok = auth(&s, Some(&leaf), Some(same.as_bytes()), "pc-1").unwrap();
    assert_eq!(ok.method, AuthMethod::CertificateAndToken);
    let other = s.signer.issue(Role::Agent, "pc-2", NOW, 60).unwrap();
    let err = auth(&s, Some(&leaf), Some(other.as_bytes()), "pc-1").unwrap_err();
    assert!(matches!(err, Refusal::CredentialsDisagree { .. }), "{err}");
    assert_eq!(err.reason_code(), 0x87);
    // A bad token next to a good certificate is still refused.
    let err = auth(&s, Some(&leaf), Some(b"hunter2"), "pc-1").unwrap_err();
    assert_eq!(err.reason_code(), 0x86);
}

#[test]
fn no_credentials_is_not_authorized() {
    let s = setup();
    let err = auth(&s, None, None, "pc-1").unwrap_err();
    assert_eq!(err, Refusal::NoCredentials);
    assert_eq!((err.reason_code(), err.return_code_v3()), (0x87, 5));
}

#[test]
fn the_client_id_must_be_the_identity() {
    let s = setup();
    let token = s.signer.issue(Role::Agent, "pc-1", NOW, 60).unwrap();
    let err = auth(&s, None, Some(token.as_bytes()), "pc-2").unwrap_err();
    assert!(matches!(err, Refusal::WrongClientId { .. }), "{err}");
    assert_eq!((err.reason_code(), err.return_code_v3()), (0x85, 2));
    assert!(err.to_string().contains("use client id \"pc-1\""), "{err}");
    let assigned = auth(&s, None, Some(token.as_bytes()), "").unwrap();
    assert!(assigned.client_id_assigned);
    assert_eq!(assigned.client_id, "pc-1");
}

#[test]
fn the_identity_may_probe_under_its_doctor_client_id_only() {
    let s = setup();
    let token = s.signer.issue(Role::Agent, "pc-1", NOW, 60).unwrap();
    let probe = auth(&s, None, Some(token.as_bytes()), "pc-1/doctor").unwrap();
    assert!(probe.probe && !probe.client_id_assigned);
    assert_eq!(probe.identity.id(), "pc-1");
    assert!(
        !auth(&s, None, Some(token.as_bytes()), "pc-1")
            .unwrap()
            .probe
    );
    for other in ["pc-2/doctor", "pc-1/doctor/x", "pc-1/Doctor"] {
        let err = auth(&s, None, Some(token.as_bytes()), other).unwrap_err();
        assert!(
            matches!(err, Refusal::WrongClientId { .. }),
            "{other}: {err}"
        );
    }
}

#[test]
fn the_tenant_quota_is_enforced() {
    let s = setup();
    let acme = s.directory.get("acme").unwrap();
    assert!(check_quota(acme, 1).is_ok());
    let err = check_quota(acme, 2).unwrap_err();
    assert_eq!((err.reason_code(), err.return_code_v3()), (0x97, 3));
    assert!(err.to_string().contains("quota of 2"), "{err}");
    let mut unlimited = acme.clone();
    unlimited.max_connections = None;
    assert!(check_quota(&unlimited, 1_000_000).is_ok());
}
