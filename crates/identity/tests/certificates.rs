//! Certificate identity: subject O/OU/CN to identity, bound to the tenant's own CA.

mod common;

use beckon_identity::{
    CaCertificate, Identity, Refusal, Tenant, TenantDirectory, TenantId, identity_from_certificate,
};
use common::{NOW, TestCa};

struct Setup {
    acme_ca: TestCa,
    globex_ca: TestCa,
    directory: TenantDirectory,
}

fn tenant(id: &str, cas: &[&TestCa]) -> Tenant {
    let mut t = Tenant::new(TenantId::new(id).unwrap());
    for ca in cas {
        t.ca_certificates
            .push(CaCertificate::from_der(ca.der.clone()).unwrap());
    }
    t
}

fn setup() -> Setup {
    let acme_ca = TestCa::new("acme", "acme agents CA");
    let globex_ca = TestCa::new("globex", "globex agents CA");
    let directory = TenantDirectory::from_tenants([
        tenant("acme", &[&acme_ca]),
        tenant("globex", &[&globex_ca]),
    ]);
    Setup {
        acme_ca,
        globex_ca,
        directory,
    }
}

#[test]
fn a_certificate_from_the_tenants_ca_gives_its_identity() {
    let s = setup();
    let leaf = s.acme_ca.agent("acme", "pc-42");
    assert_eq!(
        identity_from_certificate(&s.directory, &leaf, NOW),
        Ok(Identity::parse("acme", "agent", "pc-42").unwrap())
    );
    let leaf = s
        .acme_ca
        .issue(Some("acme"), Some("server"), Some("console"));
    assert_eq!(
        identity_from_certificate(&s.directory, &leaf, NOW)
            .unwrap()
            .to_string(),
        "acme/server/console"
    );
}

#[test]
fn one_tenants_ca_cannot_issue_for_another_tenant() {
    let s = setup();
    let leaf = s.acme_ca.agent("globex", "pc-1");
    let err = identity_from_certificate(&s.directory, &leaf, NOW).unwrap_err();
    assert!(matches!(err, Refusal::CertificateUnknownCa { .. }), "{err}");
    assert_eq!(err.reason_code(), 0x87);
    assert_eq!(err.return_code_v3(), 5);
    assert!(
        err.to_string().contains("not a CA of tenant globex"),
        "{err}"
    );
}

#[test]
fn a_ca_with_the_same_name_but_another_key_is_a_bad_signature() {
    let s = setup();
    let lookalike = TestCa::new("acme", "acme agents CA");
    let leaf = lookalike.agent("acme", "pc-42");
    let err = identity_from_certificate(&s.directory, &leaf, NOW).unwrap_err();
    assert!(
        matches!(err, Refusal::CertificateBadSignature { .. }),
        "{err}"
    );
    assert_eq!(err.reason_code(), 0x86);
}

#[test]
fn an_unknown_tenant_is_not_authorized() {
    let s = setup();
    let leaf = s.acme_ca.agent("initech", "pc-1");
    let err = identity_from_certificate(&s.directory, &leaf, NOW).unwrap_err();
    assert_eq!(err, Refusal::CertificateUnknownTenant("initech".into()));
    assert_eq!(err.reason_code(), 0x87);
}

#[test]
fn validity_is_checked_against_the_given_clock() {
    let s = setup();
    let leaf = s
        .acme_ca
        .issue_valid(Some("acme"), Some("agent"), Some("old"), (2021, 2022));
    let err = identity_from_certificate(&s.directory, &leaf, NOW).unwrap_err();
    assert!(matches!(err, Refusal::CertificateExpired { .. }), "{err}");
    assert_eq!(err.reason_code(), 0x86);
    assert!(err.to_string().contains("renew"), "{err}");
    // 2021-06-01 is inside its period.
    assert!(identity_from_certificate(&s.directory, &leaf, 1_622_505_600).is_ok());

    let expired_ca = TestCa::with_validity("acme", "old acme CA", (2019, 2024));
    let directory = TenantDirectory::from_tenants([tenant("acme", &[&expired_ca])]);
    let leaf = expired_ca.agent("acme", "pc-1");
    let err = identity_from_certificate(&directory, &leaf, NOW).unwrap_err();
    assert!(matches!(err, Refusal::CaExpired { .. }), "{err}");
}

#[test]
fn rotated_cas_both_work() {
    let s = setup();
    let next = TestCa::new("acme", "acme agents CA 2027");
    let directory = TenantDirectory::from_tenants([tenant("acme", &[&s.acme_ca, &next])]);
    for ca in [&s.acme_ca, &next] {
        assert!(identity_from_certificate(&directory, &ca.agent("acme", "pc-1"), NOW).is_ok());
    }
    assert!(identity_from_certificate(&directory, &s.globex_ca.agent("acme", "x"), NOW).is_err());
}

#[test]
fn subjects_without_a_clear_identity_are_refused() {
    let s = setup();
    let ca = &s.acme_ca;
    // (O, OU, CN) of the certificate's subject, what the refusal says, its reason code.
    let cases = [
        (None, Some("agent"), Some("pc"), "O is missing", 0x87),
        (Some("acme"), None, Some("pc"), "OU is missing", 0x87),
        (Some("acme"), Some("agent"), None, "CN is missing", 0x87),
        (Some("acme"), Some("admin"), Some("pc"), "OU: role", 0x87),
        (Some("acme"), Some("agent"), Some("pc/1"), "'/'", 0x86),
        (Some("ACME"), Some("agent"), Some("pc"), "lowercase", 0x86),
        (Some("acme"), Some("agent"), Some("a#"), "wildcards", 0x86),
    ];
    for (o, ou, cn, expected, code) in cases {
        let err = identity_from_certificate(&s.directory, &ca.issue(o, ou, cn), NOW).unwrap_err();
        assert!(err.to_string().contains(expected), "{expected}: {err}");
        assert_eq!(err.reason_code(), code, "{err}");
    }
}

#[test]
fn garbage_certificates_are_refused_without_panicking() {
    let s = setup();
    let leaf = s.acme_ca.agent("acme", "pc-1");
    for bad in [
        Vec::new(),
        vec![0x30],
        vec![0xff; 100],
        leaf[..leaf.len() / 2].to_vec(),
    ] {
        let err = identity_from_certificate(&s.directory, &bad, NOW).unwrap_err();
        assert!(matches!(err, Refusal::CertificateMalformed(_)), "{err}");
    }
    // A flipped byte in the signed part.
    let mut tampered = leaf.clone();
    let i = tampered.len() / 2;
    tampered[i] ^= 0x01;
    assert!(identity_from_certificate(&s.directory, &tampered, NOW).is_err());
}

#[test]
fn ca_certificates_are_checked_when_loaded() {
    let s = setup();
    let leaf = s.acme_ca.agent("acme", "pc-1");
    let err = CaCertificate::from_der(leaf).unwrap_err();
    assert!(err.to_string().contains("not a CA certificate"), "{err}");
    assert!(CaCertificate::from_der(vec![1, 2, 3]).is_err());
    let two = format!("{}{}", s.acme_ca.pem, s.globex_ca.pem);
    assert_eq!(CaCertificate::from_pem(&two).unwrap().len(), 2);
    assert!(CaCertificate::from_pem("hello").is_err());
    assert_eq!(
        s.directory.client_ca_certificates(),
        vec![s.acme_ca.der.as_slice(), s.globex_ca.der.as_slice()]
    );
}
