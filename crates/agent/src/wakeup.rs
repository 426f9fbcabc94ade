//! Wake-ups in, acks out. The format is `beckon-identity`'s (`docs/wake-up.md`): a wake-up
//! signed by the console's Ed25519 key, checked here for signature, format, target, time and
//! replay; acks as `beckon_identity::wakeup::Ack` JSON.
//!
//! Verification sits behind [`WakeUpCheck`] so that the session and the actions never depend
//! on how a payload is trusted.

use std::collections::BTreeMap;

use beckon_identity::relay::RelayRequest;
pub use beckon_identity::wakeup::{
    Ack, AckStage, AckStatus, MergedWakeUp, ReplayGuard, WakeUp, WakeUpRejected, WakeUpVerifier,
};
use beckon_identity::{KeyId, PublicKey, TenantId};

use crate::actions::ActionOutcome;

/// Longest `detail` an ack may carry (the console refuses longer ones).
const MAX_DETAIL: usize = 1024;

/// Verifies a wake-up payload and records its id in the replay guard.
pub trait WakeUpCheck: Send + Sync + 'static {
    /// Checks `payload` at Unix time `now` (seconds); on success the id is in `replay`.
    fn check(
        &self,
        payload: &[u8],
        now: i64,
        replay: &mut ReplayGuard,
    ) -> Result<WakeUp, WakeUpRejected>;

    /// Checks a Wake-on-LAN relay request the same way; on success its id is in `replay`.
    /// By default relay requests are refused (a check that cannot verify them).
    fn check_relay(
        &self,
        payload: &[u8],
        now: i64,
        replay: &mut ReplayGuard,
    ) -> Result<RelayRequest, WakeUpRejected> {
        let _ = (payload, now, replay);
        Err(WakeUpRejected::Malformed(
            "this agent cannot verify Wake-on-LAN relay requests".into(),
        ))
    }
}

impl WakeUpCheck for WakeUpVerifier {
    fn check(
        &self,
        payload: &[u8],
        now: i64,
        replay: &mut ReplayGuard,
    ) -> Result<WakeUp, WakeUpRejected> {
        self.verify(payload, now, replay)
    }

    fn check_relay(
        &self,
        payload: &[u8],
        now: i64,
        replay: &mut ReplayGuard,
    ) -> Result<RelayRequest, WakeUpRejected> {
        self.verify_relay(payload, now, replay)
    }
}

/// Why the console keys in the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyConfigError {
    /// No key configured: no wake-up could ever verify.
    #[error(
        "no console key configured: set [wakeup.console_keys] (key id = public key, as the console shows them) so that wake-ups can be verified"
    )]
    NoKeys,
    /// A key id or public key is malformed.
    #[error("console key {kid:?}: {reason}")]
    BadKey {
        /// The key id as written.
        kid: String,
        /// What is wrong.
        reason: String,
    },
    /// The agent id or tenant breaks the identity rules.
    #[error("{0}")]
    Identity(String),
}

/// The verifier for `agent_id` of `tenant`, trusting `keys` (key id to base64 public key).
pub fn verifier(
    tenant: &str,
    agent_id: &str,
    keys: &BTreeMap<String, String>,
) -> Result<WakeUpVerifier, KeyConfigError> {
    if keys.is_empty() {
        return Err(KeyConfigError::NoKeys);
    }
    let tenant = TenantId::new(tenant).map_err(|e| KeyConfigError::Identity(e.to_string()))?;
    let mut trusted = Vec::with_capacity(keys.len());
    for (kid, key) in keys {
        let bad = |reason: String| KeyConfigError::BadKey {
            kid: kid.clone(),
            reason,
        };
        let id = KeyId::new(kid.as_str()).map_err(|e| bad(e.to_string()))?;
        let key = PublicKey::from_base64(key).map_err(|e| bad(e.to_string()))?;
        trusted.push((id, key));
    }
    Ok(WakeUpVerifier::new(tenant, agent_id, trusted))
}

/// The `received` ack.
pub fn received_ack(id: &str, at_ms: i64) -> Vec<u8> {
    Ack::received(id, at_ms).to_json()
}

/// The `started` ack.
pub fn started_ack(id: &str, at_ms: i64) -> Vec<u8> {
    Ack::started(id, at_ms).to_json()
}

/// The `finished` ack for one run's outcome.
pub fn finished_ack(id: &str, outcome: &ActionOutcome, at_ms: i64) -> Vec<u8> {
    let status = match outcome.status {
        "ok" => AckStatus::Ok,
        "timeout" => AckStatus::TimedOut,
        _ => AckStatus::Failed,
    };
    let mut ack = Ack::finished(
        id,
        status,
        outcome.exit_code,
        u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
        at_ms,
    );
    ack.detail = outcome.detail.as_deref().map(|d| truncate(d, MAX_DETAIL));
    ack.to_json()
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn finished_acks_parse_on_the_console_side() {
        let outcome = ActionOutcome {
            status: "timeout",
            exit_code: None,
            detail: Some("é".repeat(700)),
            duration: Duration::from_millis(1500),
        };
        let json = finished_ack("0190d6e0-0000-7000-8000-000000000000", &outcome, 5);
        let ack = Ack::from_json(&json).expect("the console accepts it");
        assert_eq!(ack.stage, AckStage::Finished);
        assert_eq!(ack.status, Some(AckStatus::TimedOut));
        assert_eq!(ack.duration_ms, Some(1500));
        assert!(ack.detail.is_some_and(|d| d.len() <= MAX_DETAIL));
        let received = Ack::from_json(&received_ack("x", 1)).expect("received");
        assert_eq!(received.stage, AckStage::Received);
    }

    #[test]
    fn key_configuration_errors_are_named() {
        let none = BTreeMap::new();
        assert!(matches!(
            verifier("acme", "a1", &none),
            Err(KeyConfigError::NoKeys)
        ));
        let bad = BTreeMap::from([("console-1".to_owned(), "not a key".to_owned())]);
        let err = verifier("acme", "a1", &bad).expect_err("bad key");
        assert!(err.to_string().contains("console-1"), "{err}");
        let tenant = BTreeMap::from([(
            "console-1".to_owned(),
            "6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw".to_owned(),
        )]);
        assert!(verifier("Acme!", "a1", &tenant).is_err());
        assert!(verifier("acme", "a1", &tenant).is_ok());
    }
}
