//! Revoked credentials: `[[revoked]]` entries of a tenant file refuse certificates by serial
//! and tokens by issue time (0x87, v3.1.1 return code 5), and leave every other credential
//! alone, including a new certificate for the same id.

mod common;

use std::fs;

use beckon_identity::{
    Authenticator, Credentials, KeyId, Refusal, Role, SigningKey, TenantDirectory, TenantId,
    TokenSigner, canonical_serial, certificate_serial,
};
use common::{NOW, TestCa};

fn tenant_text(ca: &TestCa, public_key: &str, revoked: &str) -> String {
    format!(
        "[[ca]]\npem = \"\"\"\n{}\"\"\"\n\n[[token_key]]\nkid = \"console-1\"\npublic_key = \"{public_key}\"\n\n{revoked}",
        ca.pem
    )
}

fn authenticate(
    directory: &TenantDirectory,
    cert: Option<&[u8]>,
    password: Option<&[u8]>,
) -> Result<beckon_identity::Authenticated, Refusal> {
    Authenticator::default().authenticate(
        directory,
        &Credentials {
            client_certificate: cert,
            password,
            client_id: "",
        },
        NOW,
    )
}

#[test]
fn serials_are_written_one_way() {
    assert_eq!(canonical_serial("0A:1b:FF").as_deref(), Some("0a1bff"));
    assert_eq!(canonical_serial("00:00:7f").as_deref(), Some("7f"));
    assert_eq!(canonical_serial("0x123").as_deref(), Some("0123"));
    assert_eq!(canonical_serial("0").as_deref(), Some("00"));
    assert_eq!(canonical_serial("xyz"), None);
    assert_eq!(canonical_serial(""), None);
    assert_eq!(canonical_serial(&"ab".repeat(21)), None);
}

#[test]
fn a_revoked_certificate_and_old_tokens_are_refused_and_the_rest_is_not() {
    let ca = TestCa::new("acme", "acme CA");
    let key = SigningKey::generate(KeyId::new("console-1").unwrap()).unwrap();
    let public_key = key.public_key().to_base64();
    let signer = TokenSigner::new(TenantId::new("acme").unwrap(), key);
    let old = ca.agent("acme", "pc-1");
    let renewed = ca.agent("acme", "pc-1");
    let other = ca.agent("acme", "pc-2");
    let old_serial = certificate_serial(&old).unwrap();
    assert_ne!(old_serial, certificate_serial(&renewed).unwrap());
    // Written as an operator might paste it: upper case with colons.
    let pasted: Vec<String> = old_serial
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect();
    let revoked = format!(
        "[[revoked]]\nid = \"pc-1\"\nserials = [\"{}\"]\ntokens_issued_until = {}\n",
        pasted.join(":"),
        NOW - 100
    );
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("acme.toml"),
        tenant_text(&ca, &public_key, &revoked),
    )
    .unwrap();
    let loaded = TenantDirectory::load(dir.path());
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let directory = loaded.directory;

    let refused = authenticate(&directory, Some(&old), None).unwrap_err();
    assert!(matches!(refused, Refusal::Revoked { .. }), "{refused}");
    assert_eq!(refused.reason_code(), 0x87);
    assert_eq!(refused.return_code_v3(), 5);
    let line = refused.to_string();
    assert!(
        line.contains("acme/agent/pc-1")
            && line.contains("tenant acme")
            && line.contains(&old_serial),
        "{line}"
    );
    // A new certificate for the same id (re-enrolled or renewed) and other agents connect.
    let ok = authenticate(&directory, Some(&renewed), None).unwrap();
    assert_eq!(ok.certificate_serial, certificate_serial(&renewed));
    assert!(authenticate(&directory, Some(&other), None).is_ok());
    // Tokens: issued until the revocation refused, later ones accepted.
    let stale = signer.issue(Role::Agent, "pc-1", NOW - 200, 3600).unwrap();
    let fresh = signer.issue(Role::Agent, "pc-1", NOW - 50, 3600).unwrap();
    let refused = authenticate(&directory, None, Some(stale.as_bytes())).unwrap_err();
    assert!(matches!(refused, Refusal::Revoked { .. }), "{refused}");
    assert!(refused.to_string().contains("token issued at"), "{refused}");
    let ok = authenticate(&directory, None, Some(fresh.as_bytes())).unwrap();
    assert_eq!(ok.token_issued_at, Some(NOW - 50));
    // The renewed certificate with a stale token: the token's revocation counts.
    assert!(matches!(
        authenticate(&directory, Some(&renewed), Some(stale.as_bytes())),
        Err(Refusal::Revoked { .. })
    ));
    // A server with the same id is another identity.
    let server = signer.issue(Role::Server, "pc-1", NOW - 200, 3600).unwrap();
    assert!(authenticate(&directory, None, Some(server.as_bytes())).is_ok());
}

#[test]
fn an_entry_without_serials_or_time_revokes_every_credential_of_the_id() {
    let ca = TestCa::new("acme", "acme CA");
    let key = SigningKey::generate(KeyId::new("console-1").unwrap()).unwrap();
    let public_key = key.public_key().to_base64();
    let signer = TokenSigner::new(TenantId::new("acme").unwrap(), key);
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("acme.toml"),
        tenant_text(&ca, &public_key, "[[revoked]]\nid = \"pc-1\"\n"),
    )
    .unwrap();
    let directory = TenantDirectory::load(dir.path()).directory;
    let cert = ca.agent("acme", "pc-1");
    let token = signer.issue(Role::Agent, "pc-1", NOW, 3600).unwrap();
    assert!(matches!(
        authenticate(&directory, Some(&cert), None),
        Err(Refusal::Revoked { .. })
    ));
    assert!(matches!(
        authenticate(&directory, None, Some(token.as_bytes())),
        Err(Refusal::Revoked { .. })
    ));
}

#[test]
fn bad_revoked_entries_name_file_and_key_and_keep_the_previous_version() {
    let ca = TestCa::new("acme", "acme CA");
    let key = SigningKey::generate(KeyId::new("console-1").unwrap()).unwrap();
    let public_key = key.public_key().to_base64();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acme.toml");
    fs::write(&file, tenant_text(&ca, &public_key, "")).unwrap();
    let loaded = TenantDirectory::load(dir.path());
    assert!(loaded.errors.is_empty());
    let cases = [
        (
            "[[revoked]]\nid = \"pc-1\"\nserials = [\"zz\"]\n",
            "revoked[0].serials[0]",
            "not a certificate serial",
        ),
        ("[[revoked]]\nid = \"pc/1\"\n", "revoked[0].id", "'/'"),
        (
            "[[revoked]]\nid = \"pc-1\"\nrole = \"admin\"\n",
            "revoked[0].role",
            "admin",
        ),
        (
            "[[revoked]]\nid = \"pc-1\"\n\n[[revoked]]\nid = \"pc-1\"\n",
            "revoked[1].id",
            "appears twice",
        ),
        (
            "[[revoked]]\nid = \"pc-1\"\nserial = \"0a\"\n",
            "",
            "unknown field `serial`",
        ),
    ];
    let mut directory = loaded.directory;
    for (i, (entry, key, reason)) in cases.iter().enumerate() {
        // Bigger each time, so that the poller sees a change even within one second.
        let text = format!(
            "{}{}# {i}\n",
            tenant_text(&ca, &public_key, entry),
            "#".repeat(i)
        );
        fs::write(&file, text).unwrap();
        let outcome = directory.reload();
        assert_eq!(outcome.errors.len(), 1, "{entry}");
        let line = outcome.errors[0].to_string();
        assert!(line.contains("acme.toml"), "{line}");
        assert!(line.contains(key), "{entry}: {line}");
        assert!(line.contains(reason), "{entry}: {line}");
        assert!(line.contains("previous version"), "{line}");
        // The tenant stays, without revocations.
        let acme = outcome
            .directory
            .get("acme")
            .expect("previous version kept");
        assert!(acme.revoked.is_empty());
        directory = outcome.directory;
    }
}
