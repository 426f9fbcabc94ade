//! Signed, expiring tokens used as the MQTT password:
//! `bkn1.<base64url(claims JSON)>.<base64url(Ed25519 signature)>`, the signature covering the
//! ASCII text `bkn1.<base64url(claims JSON)>` (format in `docs/tenants.md`).

use serde::{Deserialize, Serialize};

use crate::auth::Refusal;
use crate::identity::{Identity, IdentityError, Role, TenantId};
use crate::keys::{KeyId, SIGNATURE_LEN, SigningKey, b64url, b64url_decode};
use crate::tenant::TenantDirectory;

/// The first dot-separated part of every token; it names the format version.
pub const TOKEN_PREFIX: &str = "bkn1";
/// Longest token accepted, in bytes (a real one is about 300).
pub const MAX_TOKEN_LEN: usize = 2048;
/// Default tolerance for clocks that disagree, in seconds.
pub const DEFAULT_CLOCK_SKEW_SECS: i64 = 60;

/// What a token says, signed by the console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenClaims {
    /// Tenant id.
    pub tenant: String,
    /// `agent` or `server`.
    pub role: String,
    /// The agent or server id.
    pub sub: String,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Expires at, unix seconds (exclusive).
    pub exp: i64,
    /// Id of the tenant token key that signed it.
    pub kid: String,
}

/// Why a token could not be issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenIssueError {
    /// The id breaks the identity rules.
    #[error("cannot issue a token: {0}")]
    InvalidIdentity(#[from] IdentityError),
    /// A token must live at least one second.
    #[error("cannot issue a token with a lifetime of 0 seconds")]
    ZeroLifetime,
    /// The claims could not be serialized; nothing was signed.
    #[error("cannot issue a token: serializing its claims failed: {0}")]
    Serialize(String),
}

/// Issues tokens for one tenant (console side).
#[derive(Debug)]
pub struct TokenSigner {
    tenant: TenantId,
    key: SigningKey,
}

impl TokenSigner {
    /// A signer for `tenant` with the console's key; the key's public half and key id must be
    /// listed under `[[token_key]]` in the tenant file.
    pub fn new(tenant: TenantId, key: SigningKey) -> Self {
        Self { tenant, key }
    }

    /// The signing key (its public key goes into the tenant file).
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// Issues a token for `(tenant, role, id)`, valid from `issued_at` (unix seconds) for
    /// `lifetime_secs` seconds.
    pub fn issue(
        &self,
        role: Role,
        id: &str,
        issued_at: i64,
        lifetime_secs: u32,
    ) -> Result<String, TokenIssueError> {
        let identity = Identity::new(self.tenant.clone(), role, id)?;
        if lifetime_secs == 0 {
            return Err(TokenIssueError::ZeroLifetime);
        }
        let claims = TokenClaims {
            tenant: identity.tenant.to_string(),
            role: role.as_str().to_owned(),
            sub: identity.id().to_owned(),
            iat: issued_at,
            exp: issued_at.saturating_add(i64::from(lifetime_secs)),
            kid: self.key.kid().to_string(),
        };
        let json =
            serde_json::to_vec(&claims).map_err(|e| TokenIssueError::Serialize(e.to_string()))?;
        let signing_input = format!("{TOKEN_PREFIX}.{}", b64url(&json));
        let signature = self.key.sign(signing_input.as_bytes());
        Ok(format!("{signing_input}.{}", b64url(&signature)))
    }
}

/// A token that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Who it authenticates.
    pub identity: Identity,
    /// The key that signed it.
    pub kid: KeyId,
    /// `iat`, unix seconds.
    pub issued_at: i64,
    /// `exp`, unix seconds.
    pub expires_at: i64,
}

/// Checks tokens against the tenants' token keys (broker side). It never reads the clock:
/// the caller passes `now`.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    /// Seconds of disagreement between console and broker clocks tolerated on `iat` and `exp`.
    pub clock_skew_secs: i64,
}

impl Default for TokenVerifier {
    fn default() -> Self {
        Self {
            clock_skew_secs: DEFAULT_CLOCK_SKEW_SECS,
        }
    }
}

fn malformed(reason: impl Into<String>) -> Refusal {
    Refusal::TokenMalformed(reason.into())
}

impl TokenVerifier {
    /// Verifies `token` (the MQTT password bytes) at `now` (unix seconds): format, tenant, key
    /// id, signature, identity rules, then expiry.
    pub fn verify(
        &self,
        directory: &TenantDirectory,
        token: &[u8],
        now: i64,
    ) -> Result<VerifiedToken, Refusal> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed(format!(
                "{} bytes is longer than the {MAX_TOKEN_LEN}-byte limit",
                token.len()
            )));
        }
        let mut parts = token.split(|&b| b == b'.');
        let (Some(prefix), Some(claims_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed(format!(
                "expected three dot-separated parts: {TOKEN_PREFIX}.<claims>.<signature>"
            )));
        };
        if prefix != TOKEN_PREFIX.as_bytes() {
            return Err(malformed(format!(
                "does not start with \"{TOKEN_PREFIX}.\": is this a Beckon token?"
            )));
        }
        let claims_json =
            b64url_decode(claims_b64).ok_or_else(|| malformed("claims are not base64url"))?;
        let signature =
            b64url_decode(sig_b64).ok_or_else(|| malformed("signature is not base64url"))?;
        if signature.len() != SIGNATURE_LEN {
            return Err(malformed(format!(
                "signature is {} bytes, not {SIGNATURE_LEN}",
                signature.len()
            )));
        }
        let claims: TokenClaims = serde_json::from_slice(&claims_json)
            .map_err(|e| malformed(format!("claims are not valid JSON: {e}")))?;

        let tenant_id = TenantId::new(claims.tenant.as_str()).map_err(Refusal::InvalidIdentity)?;
        let tenant = directory
            .get(tenant_id.as_str())
            .ok_or_else(|| Refusal::TokenUnknownTenant(tenant_id.to_string()))?;
        let unknown_key = || Refusal::TokenUnknownKey {
            tenant: tenant_id.clone(),
            kid: claims.kid.chars().take(64).collect(),
        };
        let kid = KeyId::new(claims.kid.as_str()).map_err(|_| unknown_key())?;
        let key = tenant.token_keys.get(&kid).ok_or_else(unknown_key)?;
        // The signed text is exactly the token up to the second dot.
        let signed_len = prefix.len() + 1 + claims_b64.len();
        if !key.verifies(&token[..signed_len], &signature) {
            return Err(Refusal::TokenBadSignature {
                tenant: tenant_id,
                kid: kid.to_string(),
            });
        }

        let role: Role = claims.role.parse().map_err(Refusal::InvalidIdentity)?;
        let identity =
            Identity::new(tenant_id, role, claims.sub).map_err(Refusal::InvalidIdentity)?;
        if claims.exp <= claims.iat {
            return Err(malformed("exp is not after iat"));
        }
        if claims.iat > now.saturating_add(self.clock_skew_secs) {
            return Err(Refusal::TokenNotYetValid {
                identity,
                issued_at: claims.iat,
                now,
            });
        }
        if now >= claims.exp.saturating_add(self.clock_skew_secs) {
            return Err(Refusal::TokenExpired {
                identity,
                expired_at: claims.exp,
                now,
            });
        }
        Ok(VerifiedToken {
            identity,
            kid,
            issued_at: claims.iat,
            expires_at: claims.exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PublicKey;
    use crate::tenant::Tenant;
    use proptest::prelude::*;

    const NOW: i64 = 1_790_000_000;

    struct Fixture {
        signer: TokenSigner,
        directory: TenantDirectory,
    }

    fn key(kid: &str) -> SigningKey {
        SigningKey::generate(KeyId::new(kid).unwrap()).unwrap()
    }

    fn tenant(id: &str, keys: &[(&str, PublicKey)]) -> Tenant {
        let mut t = Tenant::new(TenantId::new(id).unwrap());
        for (kid, pk) in keys {
            t.token_keys.insert(KeyId::new(*kid).unwrap(), *pk);
        }
        t
    }

    fn fixture() -> Fixture {
        let acme_key = key("acme-1");
        let globex_key = key("globex-1");
        let directory = TenantDirectory::from_tenants([
            tenant("acme", &[("acme-1", acme_key.public_key())]),
            tenant("globex", &[("globex-1", globex_key.public_key())]),
        ]);
        Fixture {
            signer: TokenSigner::new(TenantId::new("acme").unwrap(), acme_key),
            directory,
        }
    }

    /// Assembles a token by hand, exactly as `docs/tenants.md` describes it.
    fn hand_made(claims_json: &str, key: &SigningKey) -> String {
        let signing_input = format!("bkn1.{}", b64url(claims_json.as_bytes()));
        let sig = key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", b64url(&sig))
    }

    fn verify(f: &Fixture, token: &str, now: i64) -> Result<VerifiedToken, Refusal> {
        TokenVerifier::default().verify(&f.directory, token.as_bytes(), now)
    }

    #[test]
    fn an_issued_token_verifies_to_its_identity() {
        let f = fixture();
        let token = f.signer.issue(Role::Agent, "pc-42", NOW, 3600).unwrap();
        assert!(token.starts_with("bkn1."));
        assert!(token.len() < 400, "{}", token.len());
        let v = verify(&f, &token, NOW + 10).unwrap();
        assert_eq!(
            v.identity,
            Identity::parse("acme", "agent", "pc-42").unwrap()
        );
        assert_eq!(v.kid.as_str(), "acme-1");
        assert_eq!((v.issued_at, v.expires_at), (NOW, NOW + 3600));
    }

    #[test]
    fn a_hand_made_token_verifies() {
        let f = fixture();
        let json = format!(
            r#"{{"tenant":"acme","role":"server","sub":"console-1","iat":{NOW},"exp":{},"kid":"acme-1"}}"#,
            NOW + 60
        );
        let token = hand_made(&json, f.signer.key());
        let v = verify(&f, &token, NOW).unwrap();
        assert_eq!(v.identity.to_string(), "acme/server/console-1");
    }

    #[test]
    fn a_tampered_signature_is_bad_credentials() {
        let f = fixture();
        let token = f.signer.issue(Role::Agent, "pc-42", NOW, 3600).unwrap();
        let (head, sig) = token.rsplit_once('.').unwrap();
        let mut sig_bytes = b64url_decode(sig.as_bytes()).unwrap();
        sig_bytes[10] ^= 1;
        let tampered = format!("{head}.{}", b64url(&sig_bytes));
        let err = verify(&f, &tampered, NOW).unwrap_err();
        assert!(matches!(err, Refusal::TokenBadSignature { .. }), "{err}");
        assert_eq!(err.reason_code(), 0x86);
        assert_eq!(err.return_code_v3(), 4);
    }

    #[test]
    fn changed_claims_do_not_verify_with_the_old_signature() {
        let f = fixture();
        let token = f.signer.issue(Role::Agent, "pc-42", NOW, 3600).unwrap();
        let sig = token.rsplit_once('.').unwrap().1;
        let json = format!(
            r#"{{"tenant":"acme","role":"server","sub":"pc-42","iat":{NOW},"exp":{},"kid":"acme-1"}}"#,
            NOW + 3600
        );
        let forged = format!("bkn1.{}.{sig}", b64url(json.as_bytes()));
        assert!(matches!(
            verify(&f, &forged, NOW),
            Err(Refusal::TokenBadSignature { .. })
        ));
    }

    #[test]
    fn a_key_of_another_tenant_cannot_sign_for_this_one() {
        let f = fixture();
        // acme's key signs claims for globex with globex's key id.
        let json = format!(
            r#"{{"tenant":"globex","role":"server","sub":"evil","iat":{NOW},"exp":{},"kid":"globex-1"}}"#,
            NOW + 60
        );
        let token = hand_made(&json, f.signer.key());
        let err = verify(&f, &token, NOW).unwrap_err();
        assert!(matches!(err, Refusal::TokenBadSignature { .. }), "{err}");
        // ... and with its own key id, globex does not know it.
        let json = json.replace("globex-1", "acme-1");
        let err = verify(&f, &hand_made(&json, f.signer.key()), NOW).unwrap_err();
        assert!(matches!(err, Refusal::TokenUnknownKey { .. }), "{err}");
        assert_eq!(err.reason_code(), 0x86);
    }

    #[test]
    fn unknown_kid_and_unknown_tenant_are_refused() {
        let f = fixture();
        let rogue = TokenSigner::new(TenantId::new("acme").unwrap(), key("acme-2"));
        let err = verify(&f, &rogue.issue(Role::Agent, "a", NOW, 60).unwrap(), NOW).unwrap_err();
        assert!(err.to_string().contains("\"acme-2\""), "{err}");
        assert!(matches!(err, Refusal::TokenUnknownKey { .. }));
        let stranger = TokenSigner::new(TenantId::new("initech").unwrap(), key("acme-1"));
        let err = verify(&f, &stranger.issue(Role::Agent, "a", NOW, 60).unwrap(), NOW).unwrap_err();
        assert_eq!(err, Refusal::TokenUnknownTenant("initech".into()));
        assert_eq!(err.reason_code(), 0x86);
    }

    #[test]
    fn expiry_and_issue_time_respect_the_clock_skew() {
        let f = fixture();
        let token = f.signer.issue(Role::Agent, "pc-42", NOW, 600).unwrap();
        let skew = DEFAULT_CLOCK_SKEW_SECS;
        assert!(verify(&f, &token, NOW + 600 + skew - 1).is_ok());
        let err = verify(&f, &token, NOW + 600 + skew).unwrap_err();
        assert!(matches!(err, Refusal::TokenExpired { expired_at, .. } if expired_at == NOW + 600));
        assert_eq!(err.reason_code(), 0x86);
        assert!(err.to_string().contains("issue a new token"), "{err}");
        assert!(verify(&f, &token, NOW - skew).is_ok());
        let err = verify(&f, &token, NOW - skew - 1).unwrap_err();
        assert!(matches!(err, Refusal::TokenNotYetValid { .. }), "{err}");
        let strict = TokenVerifier { clock_skew_secs: 0 };
        assert!(
            strict
                .verify(&f.directory, token.as_bytes(), NOW + 600)
                .is_err()
        );
        assert!(
            strict
                .verify(&f.directory, token.as_bytes(), NOW + 599)
                .is_ok()
        );
    }

    #[test]
    fn signed_claims_with_a_bad_identity_or_times_are_refused() {
        let f = fixture();
        let cases = [
            (
                format!(
                    r#"{{"tenant":"acme","role":"admin","sub":"x","iat":{NOW},"exp":{}}}"#,
                    NOW + 5
                ),
                "role",
            ),
            (
                format!(
                    r#"{{"tenant":"acme","role":"agent","sub":"a/#","iat":{NOW},"exp":{}}}"#,
                    NOW + 5
                ),
                "'/'",
            ),
            (
                format!(r#"{{"tenant":"acme","role":"agent","sub":"x","iat":{NOW},"exp":{NOW}}}"#),
                "exp is not after iat",
            ),
        ];
        for (claims, expected) in cases {
            let claims = claims.replace('}', r#","kid":"acme-1"}"#);
            let err = verify(&f, &hand_made(&claims, f.signer.key()), NOW).unwrap_err();
            assert!(err.to_string().contains(expected), "{claims}: {err}");
            assert_eq!(err.reason_code(), 0x86);
        }
    }

    #[test]
    fn malformed_tokens_are_refused_without_panicking() {
        let f = fixture();
        let good = f.signer.issue(Role::Agent, "pc-42", NOW, 60).unwrap();
        let (head, sig) = good.rsplit_once('.').unwrap();
        let claims = head.strip_prefix("bkn1.").unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"".to_vec(), "three dot-separated"),
            (b"bkn1".to_vec(), "three dot-separated"),
            (b"bkn1..".to_vec(), "signature is 0 bytes"),
            (format!("{good}.x").into_bytes(), "three dot-separated"),
            (format!("bkn2.{claims}.{sig}").into_bytes(), "Beckon token"),
            (
                format!("bkn1.{claims}!.{sig}").into_bytes(),
                "claims are not base64url",
            ),
            (
                format!("bkn1.{claims}.{sig}=").into_bytes(),
                "signature is not base64url",
            ),
            (
                format!("bkn1.{claims}.{}", &sig[..20]).into_bytes(),
                "signature is",
            ),
            (
                format!("bkn1.{}.{sig}", b64url(b"not json")).into_bytes(),
                "not valid JSON",
            ),
            (
                format!("bkn1.{}.{sig}", b64url(br#"{"tenant":"acme","extra":1}"#)).into_bytes(),
                "not valid JSON",
            ),
            (vec![0xff, 0xfe, b'.', b'.'], "Beckon token"),
            (vec![b'a'; MAX_TOKEN_LEN + 1], "limit"),
        ];
        for (token, expected) in cases {
            let err = TokenVerifier::default()
                .verify(&f.directory, &token, NOW)
                .unwrap_err();
            assert!(matches!(err, Refusal::TokenMalformed(_)), "{err}");
            assert!(err.to_string().contains(expected), "{expected}: {err}");
            assert_eq!(err.reason_code(), 0x86);
        }
    }

    #[test]
    fn issuing_checks_id_and_lifetime() {
        let f = fixture();
        assert!(matches!(
            f.signer.issue(Role::Agent, "a b", NOW, 60),
            Err(TokenIssueError::InvalidIdentity(_))
        ));
        assert_eq!(
            f.signer.issue(Role::Agent, "a", NOW, 0),
            Err(TokenIssueError::ZeroLifetime)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_verify_and_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let f = fixture();
            prop_assert!(TokenVerifier::default().verify(&f.directory, &bytes, NOW).is_err());
        }

        #[test]
        fn any_single_byte_change_breaks_a_token(pos in 0usize..1000, byte in any::<u8>()) {
            let f = fixture();
            let token = f.signer.issue(Role::Server, "console", NOW, 60).unwrap().into_bytes();
            let pos = pos % token.len();
            prop_assume!(token[pos] != byte);
            let mut changed = token.clone();
            changed[pos] = byte;
            prop_assert!(TokenVerifier::default().verify(&f.directory, &changed, NOW).is_err());
        }
    }
}
