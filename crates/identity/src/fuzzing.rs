//! Entry points of the fuzz targets in `fuzz/` (feature "fuzzing"); not part of the API.
//!
//! Everything an agent or the console reads from MQTT goes through here: the signed wake-up
//! and relay request (as received, or signed with the verifier's key so that the checks after
//! the signature are reached), acks, relay results, the saved replay guard and tokens.

use std::path::Path;

use crate::keys::b64url;
use crate::relay::RelayResult;
use crate::wakeup::{Ack, ReplayGuard, SIGNING_CONTEXT, WakeUpRejected, WakeUpVerifier};
use crate::{KeyId, SigningKey, Tenant, TenantDirectory, TenantId, TokenVerifier};

/// The time of the documented vectors (`docs/wake-up.md`), so that seeds made from them are
/// within their lifetime.
const NOW: i64 = 1_795_737_600;

fn key() -> SigningKey {
    SigningKey::from_seed(KeyId::new("console-2026").expect("kid"), &[7u8; 32])
}

/// The envelope `field` (`wakeup` or `relay`) holding `inner`, signed with `key`.
fn sealed(key: &SigningKey, context: &[u8], field: &str, inner: &str) -> Vec<u8> {
    let sig = key.sign(&crate::wakeup::signed_message(context, inner));
    let mut envelope = serde_json::Map::new();
    envelope.insert(field.into(), inner.into());
    envelope.insert("kid".into(), key.kid().as_str().into());
    envelope.insert("sig".into(), b64url(&sig).into());
    serde_json::Value::Object(envelope).to_string().into_bytes()
}

/// The first byte picks what reads the rest (low 3 bits) and the clock (minutes after the
/// documented vectors' time, high 5 bits).
pub fn signed_messages(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let now = NOW + i64::from(mode >> 3) * 60;
    let key = key();
    let acme = TenantId::new("acme").expect("tenant");
    let verifier = WakeUpVerifier::new(
        acme.clone(),
        "pc-42",
        [(key.kid().clone(), key.public_key())],
    );
    let mut replay = ReplayGuard::new(4);
    let text = String::from_utf8_lossy(rest);
    match mode & 7 {
        0 | 1 => {
            let payload = match mode & 7 {
                0 => rest.to_vec(),
                _ => sealed(&key, SIGNING_CONTEXT, "wakeup", &text),
            };
            if let Ok(wakeup) = verifier.verify(&payload, now, &mut replay) {
                assert!(wakeup.check_fields().is_ok(), "{wakeup:?}");
                assert_eq!(wakeup.tenant, "acme");
                assert_eq!(wakeup.agent, "pc-42");
                let again = verifier.verify(&payload, now, &mut replay);
                assert!(
                    matches!(again, Err(WakeUpRejected::Replayed(_))),
                    "a replay got {again:?}"
                );
            }
        }
        2 | 3 => {
            let payload = match mode & 7 {
                2 => rest.to_vec(),
                _ => sealed(&key, crate::relay::RELAY_SIGNING_CONTEXT, "relay", &text),
            };
            if let Ok(request) = verifier.verify_relay(&payload, now, &mut replay) {
                assert!(request.check_fields().is_ok(), "{request:?}");
                let again = verifier.verify_relay(&payload, now, &mut replay);
                assert!(
                    matches!(again, Err(WakeUpRejected::Replayed(_))),
                    "a replay got {again:?}"
                );
            }
        }
        4 => {
            if let Ok(ack) = Ack::from_json(rest) {
                assert_eq!(Ack::from_json(&ack.to_json()), Ok(ack));
            }
        }
        5 => {
            if let Ok(result) = RelayResult::from_json(rest) {
                assert_eq!(RelayResult::from_json(&result.to_json()), Ok(result));
            }
        }
        6 => {
            if let Ok(mut guard) = ReplayGuard::from_json(rest) {
                let saved = guard.to_json();
                assert_eq!(ReplayGuard::from_json(&saved).ok(), Some(guard.clone()));
                let _ = guard.admit("01a21a4d-4000-7a3e-9b1f-2c4d6e8fa0b1", now + 600, now);
            }
        }
        _ => {
            let mut tenant = Tenant::new(acme);
            tenant
                .token_keys
                .insert(key.kid().clone(), key.public_key());
            let directory = TenantDirectory::from_tenants([tenant]);
            if let Ok(verified) = TokenVerifier::default().verify(&directory, rest, now) {
                assert_eq!(verified.identity.tenant.as_str(), "acme");
                assert!(verified.expires_at > now - crate::DEFAULT_CLOCK_SKEW_SECS);
            }
        }
    }
}

/// A tenant file's text (`tenants/acme.toml`), read as the tenant directory reads it; `file`
/// keys resolve under `folder`.
pub fn tenant_file(text: &str, folder: &Path) {
    let id = TenantId::new("acme").expect("tenant");
    let mut fingerprint = Default::default();
    let file = folder.join("acme.toml");
    if let Ok(tenant) = crate::tenant::parse_tenant_file(text, &file, folder, id, &mut fingerprint)
    {
        assert_eq!(tenant.id.as_str(), "acme");
        assert_ne!(tenant.max_connections, Some(0));
    }
}
