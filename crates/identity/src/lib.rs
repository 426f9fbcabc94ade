//! Who may do what on the Beckon push service, as plain logic (no sockets, no clock reads):
//!
//! - [`Identity`]: `(tenant, role, id)` and its character rules;
//! - [`TenantDirectory`]: tenants loaded from `tenants/<id>.toml`, with their CAs and token keys;
//! - [`Authenticator`]: client certificate and/or token to identity, or a [`Refusal`] with its
//!   MQTT reason code;
//! - [`TokenSigner`] / [`TokenVerifier`]: the signed, expiring token used as MQTT password;
//! - [`acl`]: the tenant topic namespace, publish/subscribe rules and presence events;
//! - [`wakeup`]: the signed wake-up message, its verification and replay guard, and acks;
//! - [`relay`]: the signed Wake-on-LAN relay request and the agent's result.
//!
//! Formats are documented in `docs/tenants.md` and `docs/wake-up.md`.
#![forbid(unsafe_code)]

pub mod acl;
mod auth;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod identity;
mod keys;
pub mod relay;
mod tenant;
mod token;
pub mod wakeup;

pub use acl::{Access, AclDenied, ConnectionPath, PresenceEvent, PresenceState};
pub use auth::{
    AuthMethod, Authenticated, Authenticator, BAD_USER_NAME_OR_PASSWORD,
    CLIENT_IDENTIFIER_NOT_VALID, Credentials, NOT_AUTHORIZED, QUOTA_EXCEEDED, Refusal,
    check_client_id, check_quota, identity_from_certificate, probe_client_id,
};
pub use identity::{
    Identity, IdentityError, MAX_ID_LEN, MAX_TENANT_LEN, Role, TenantId, validate_id,
};
pub use keys::{KeyError, KeyId, PublicKey, SigningKey};
pub use tenant::{
    CaCertificate, CaError, Credential, LoadOutcome, Revocation, Tenant, TenantDirectory,
    TenantFileError, canonical_serial, certificate_serial,
};
pub use token::{
    DEFAULT_CLOCK_SKEW_SECS, MAX_TOKEN_LEN, TOKEN_PREFIX, TokenClaims, TokenIssueError,
    TokenSigner, TokenVerifier, VerifiedToken,
};

/// The test vectors printed in `docs/tenants.md` and `docs/wake-up.md`: they must keep
/// verifying, and the signers must keep producing them byte for byte.
#[cfg(test)]
mod documented_vectors {
    use super::*;
    use wakeup::{ReplayGuard, WakeUp, WakeUpSigner, WakeUpVerifier};

    const PUBLIC_KEY: &str = "6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw";
    const TOKEN: &str = "bkn1.eyJ0ZW5hbnQiOiJhY21lIiwicm9sZSI6ImFnZW50Iiwic3ViIjoicGMtNDIiLCJpYXQiOjE3OTU3Mzc2MDAsImV4cCI6MTc5NTgyNDAwMCwia2lkIjoiY29uc29sZS0yMDI2In0.UI2UUzdh1UmHu0s6gUYONLuEzxXnJYSiNySTGoFYotKtXza8CJyMmkcZA0emYSPPNAD608Pm1hTqI8yLZciMDw";
    const WAKEUP: &str = r#"{"wakeup":"{\"v\":1,\"id\":\"01a21a4d-4000-7a3e-9b1f-2c4d6e8fa0b1\",\"tenant\":\"acme\",\"agent\":\"pc-42\",\"reason\":\"policy-changed\",\"issued_at\":1795737600,\"expires_at\":1795738200,\"spread\":30}","kid":"console-2026","sig":"4Tn9sh2mmNlvxgQOkTq2sbL0eKIXiGrBWPEhaCnWKqxhdEUu41OztAVD_KG9CJnCm098tm6T2dcY_RkM7juJAA"}"#;
    const NOW: i64 = 1_795_737_600;

    fn seeded_key() -> SigningKey {
        SigningKey::from_seed(KeyId::new("console-2026").unwrap(), &[7u8; 32])
    }

    #[test]
    fn the_documented_token_verifies_and_is_reproduced() {
        let mut acme = Tenant::new(TenantId::new("acme").unwrap());
        acme.token_keys.insert(
            KeyId::new("console-2026").unwrap(),
            PublicKey::from_base64(PUBLIC_KEY).unwrap(),
        );
        let directory = TenantDirectory::from_tenants([acme]);
        let verified = TokenVerifier::default()
            .verify(&directory, TOKEN.as_bytes(), NOW + 100)
            .unwrap();
        assert_eq!(verified.identity.to_string(), "acme/agent/pc-42");
        assert_eq!(verified.expires_at, NOW + 86_400);
        let signer = TokenSigner::new(TenantId::new("acme").unwrap(), seeded_key());
        assert_eq!(signer.key().public_key().to_base64(), PUBLIC_KEY);
        assert_eq!(
            signer.issue(Role::Agent, "pc-42", NOW, 86_400).unwrap(),
            TOKEN
        );
    }

    #[test]
    fn the_documented_wake_up_verifies_and_is_reproduced() {
        let verifier = WakeUpVerifier::new(
            TenantId::new("acme").unwrap(),
            "pc-42",
            [(
                KeyId::new("console-2026").unwrap(),
                PublicKey::from_base64(PUBLIC_KEY).unwrap(),
            )],
        );
        let w = verifier
            .verify(WAKEUP.as_bytes(), NOW + 1, &mut ReplayGuard::default())
            .unwrap();
        assert_eq!((w.spread, w.expires_at), (30, NOW + 600));
        let again = WakeUp {
            v: 1,
            id: "01a21a4d-4000-7a3e-9b1f-2c4d6e8fa0b1".into(),
            tenant: "acme".into(),
            agent: "pc-42".into(),
            reason: "policy-changed".into(),
            issued_at: NOW,
            expires_at: NOW + 600,
            spread: 30,
            action: None,
        };
        let signed = WakeUpSigner::new(seeded_key()).sign(&again).unwrap();
        assert_eq!(String::from_utf8(signed).unwrap(), WAKEUP);
    }
}
