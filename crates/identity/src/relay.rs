//! Wake-on-LAN relay: the console asks an online agent to send the magic packet on its own
//! network (`agents/{id}/relay`), and the agent answers with what it sent
//! (`agents/{id}/relay-result`). Documented in `docs/wake-up.md`.
//!
//! A relay request is signed like a wake-up (same key, same envelope shape, its own signing
//! context `beckon.relay.v1.` and envelope field `relay`), checked by the same
//! [`WakeUpVerifier`] (key, signature, tenant, target agent, time) and recorded in the same
//! [`ReplayGuard`], so that a request is acted on once. The result is not signed: the broker
//! lets agent X publish only to `agents/X/relay-result`, so the topic vouches for the sender.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::acl::{RELAY, RELAY_RESULT};
use crate::identity::validate_id;
use crate::keys::b64url;
use crate::wakeup::{
    ReplayGuard, WakeUpError, WakeUpRejected, WakeUpSigner, WakeUpVerifier, check_header,
    check_lifetime, impl_signed, invalid, signed_message, to_signed_json,
};

/// The version written in `v`.
pub const RELAY_VERSION: u32 = 1;
/// Bytes prepended to the inner JSON before signing (apart from wake-ups and tokens).
pub const RELAY_SIGNING_CONTEXT: &[u8] = b"beckon.relay.v1.";
/// Largest relay request payload accepted, in bytes.
pub const MAX_RELAY_LEN: usize = 8 * 1024;
/// Most MAC addresses in one request.
pub const MAX_RELAY_MACS: usize = 16;
/// Most repeats per packet.
pub const MAX_RELAY_REPEATS: u8 = 10;
/// Largest result payload accepted, in bytes.
pub const MAX_RELAY_RESULT_LEN: usize = 8 * 1024;

/// The tenant-relative topic a server publishes relay requests for `agent_id` to.
pub fn relay_topic(agent_id: &str) -> String {
    format!("agents/{agent_id}/{RELAY}")
}

/// The tenant-relative topic an agent publishes its relay results to.
pub fn relay_result_topic(agent_id: &str) -> String {
    format!("agents/{agent_id}/{RELAY_RESULT}")
}

/// "Send these magic packets on your network": from the console to one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRequest {
    /// Format version, [`RELAY_VERSION`].
    pub v: u32,
    /// A UUID v7, unique per request; the result and the replay guard use it.
    pub id: String,
    /// The tenant of the relaying agent.
    pub tenant: String,
    /// The relaying agent (who sends the packets).
    pub agent: String,
    /// The agent being woken (for logs).
    pub target: String,
    /// When the console issued it, unix seconds.
    pub issued_at: i64,
    /// After this (unix seconds) the agent drops it.
    pub expires_at: i64,
    /// The MAC addresses to wake, as text (`00:11:22:33:44:55`), 1 to [`MAX_RELAY_MACS`].
    pub macs: Vec<String>,
    /// SecureOn password as hex (4 or 6 bytes), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secureon: Option<String>,
    /// Where to send: the broadcast address of the subnet agent and target share.
    pub broadcast: IpAddr,
    /// UDP port (9 by default in the console's settings).
    pub port: u16,
    /// How many times each packet goes out, 1 to [`MAX_RELAY_REPEATS`].
    pub repeats: u8,
}

impl RelayRequest {
    /// Checks every field against the format's rules (not the time, not the target).
    pub fn check_fields(&self) -> Result<(), WakeUpError> {
        check_header(self.v, RELAY_VERSION, &self.id, &self.tenant, &self.agent)?;
        validate_id(&self.target).map_err(|e| invalid("target", e.to_string()))?;
        if self.macs.is_empty() || self.macs.len() > MAX_RELAY_MACS {
            return Err(invalid(
                "macs",
                format!("must hold 1 to {MAX_RELAY_MACS} addresses"),
            ));
        }
        if self.macs.iter().any(|m| m.is_empty() || m.len() > 32) {
            return Err(invalid("macs", "each address is 1 to 32 characters"));
        }
        if self.secureon.as_ref().is_some_and(|s| s.len() > 32) {
            return Err(invalid("secureon", "longer than 32 characters"));
        }
        if self.port == 0 {
            return Err(invalid("port", "must be 1 to 65535"));
        }
        if self.repeats == 0 || self.repeats > MAX_RELAY_REPEATS {
            return Err(invalid(
                "repeats",
                format!("must be 1 to {MAX_RELAY_REPEATS}"),
            ));
        }
        check_lifetime(self.issued_at, self.expires_at)?;
        Ok(())
    }
}

impl_signed!(RelayRequest, RELAY_SIGNING_CONTEXT, "relay request");

/// The signed wire form of a relay request.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayEnvelope {
    relay: String,
    kid: String,
    sig: String,
}

impl WakeUpSigner {
    /// Checks the fields and returns the signed payload to publish to `agents/{agent}/relay`.
    pub fn sign_relay(&self, request: &RelayRequest) -> Result<Vec<u8>, WakeUpError> {
        request.check_fields()?;
        let inner = to_signed_json("relay request", request)?;
        let sig = self
            .key()
            .sign(&signed_message(RELAY_SIGNING_CONTEXT, &inner));
        let envelope = RelayEnvelope {
            relay: inner,
            kid: self.key().kid().to_string(),
            sig: b64url(&sig),
        };
        Ok(to_signed_json("relay envelope", &envelope)?.into_bytes())
    }
}

impl WakeUpVerifier {
    /// Verifies a payload received on `agents/{agent}/relay` with the same checks, in the
    /// same order, as a wake-up (`docs/wake-up.md`), and records its id in `replay`.
    pub fn verify_relay(
        &self,
        payload: &[u8],
        now: i64,
        replay: &mut ReplayGuard,
    ) -> Result<RelayRequest, WakeUpRejected> {
        if payload.len() > MAX_RELAY_LEN {
            return Err(WakeUpRejected::TooLarge(payload.len()));
        }
        let envelope: RelayEnvelope = serde_json::from_slice(payload).map_err(|e| {
            WakeUpRejected::Malformed(format!("not the signed relay envelope: {e}"))
        })?;
        self.open(&envelope.relay, &envelope.kid, &envelope.sig, now, replay)
    }
}

/// What the agent did with one MAC address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySend {
    /// The MAC address, as in the request.
    pub mac: String,
    /// Where the packets went, `address:port`.
    pub destination: String,
    /// How many packets were sent.
    pub packets: u32,
    /// Why sending failed (or the MAC was refused), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The agent's answer to a relay request, on `agents/{id}/relay-result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayResult {
    /// The request this answers.
    pub request_id: String,
    /// One entry per MAC address of the request.
    pub sends: Vec<RelaySend>,
    /// When, unix milliseconds.
    pub at: i64,
}

/// Why a relay result payload was refused (console side).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayResultError {
    /// Larger than [`MAX_RELAY_RESULT_LEN`].
    #[error("relay result of {0} bytes is larger than the {MAX_RELAY_RESULT_LEN}-byte limit")]
    TooLarge(usize),
    /// Not the result JSON, or fields out of bounds.
    #[error("relay result is malformed: {0}")]
    Malformed(String),
}

impl RelayResult {
    /// The JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks a result payload.
    pub fn from_json(payload: &[u8]) -> Result<Self, RelayResultError> {
        if payload.len() > MAX_RELAY_RESULT_LEN {
            return Err(RelayResultError::TooLarge(payload.len()));
        }
        let result: RelayResult = serde_json::from_slice(payload)
            .map_err(|e| RelayResultError::Malformed(e.to_string()))?;
        if result.request_id.is_empty() || result.request_id.len() > 64 {
            return Err(RelayResultError::Malformed(
                "request_id must be 1 to 64 bytes".into(),
            ));
        }
        if result.sends.len() > MAX_RELAY_MACS {
            return Err(RelayResultError::Malformed(format!(
                "more than {MAX_RELAY_MACS} sends"
            )));
        }
        if result
            .sends
            .iter()
            .any(|s| s.error.as_ref().is_some_and(|e| e.len() > 512) || s.mac.len() > 32)
        {
            return Err(RelayResultError::Malformed(
                "a send's mac or error is too long".into(),
            ));
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TenantId;
    use crate::keys::{KeyId, SigningKey};
    use crate::wakeup::new_wakeup_id;

    const NOW: i64 = 1_790_000_000;

    fn acme() -> TenantId {
        TenantId::new("acme").unwrap()
    }

    fn request(agent: &str) -> RelayRequest {
        RelayRequest {
            v: RELAY_VERSION,
            id: new_wakeup_id(NOW * 1000).unwrap(),
            tenant: "acme".into(),
            agent: agent.into(),
            target: "pc-off".into(),
            issued_at: NOW,
            expires_at: NOW + 60,
            macs: vec!["00:11:22:33:44:55".into()],
            secureon: None,
            broadcast: "192.168.1.255".parse().unwrap(),
            port: 9,
            repeats: 3,
        }
    }

    fn pair() -> (WakeUpSigner, WakeUpVerifier) {
        let k = SigningKey::generate(KeyId::new("console-1").unwrap()).unwrap();
        let v = WakeUpVerifier::new(acme(), "pc-on", [(k.kid().clone(), k.public_key())]);
        (WakeUpSigner::new(k), v)
    }

    #[test]
    fn a_signed_request_verifies_once_for_its_agent_only() {
        let (signer, verifier) = pair();
        let r = request("pc-on");
        let payload = signer.sign_relay(&r).unwrap();
        let mut guard = ReplayGuard::default();
        assert_eq!(
            verifier.verify_relay(&payload, NOW + 1, &mut guard),
            Ok(r.clone())
        );
        assert_eq!(
            verifier.verify_relay(&payload, NOW + 2, &mut guard),
            Err(WakeUpRejected::Replayed(r.id))
        );
        let other = signer.sign_relay(&request("pc-else")).unwrap();
        assert!(matches!(
            verifier.verify_relay(&other, NOW + 1, &mut guard),
            Err(WakeUpRejected::WrongAgent { .. })
        ));
        let late = signer.sign_relay(&request("pc-on")).unwrap();
        assert!(matches!(
            verifier.verify_relay(&late, NOW + 3600, &mut guard),
            Err(WakeUpRejected::Expired { .. })
        ));
    }

    #[test]
    fn a_wake_up_signature_does_not_pass_as_a_relay_request_or_back() {
        let (signer, verifier) = pair();
        let payload = signer.sign_relay(&request("pc-on")).unwrap();
        let envelope: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        // The relay's inner text and signature, put in a wake-up envelope.
        let as_wakeup = serde_json::json!({"wakeup": envelope["relay"], "kid": envelope["kid"], "sig": envelope["sig"]});
        let mut guard = ReplayGuard::default();
        assert!(
            verifier
                .verify(
                    &serde_json::to_vec(&as_wakeup).unwrap(),
                    NOW + 1,
                    &mut guard
                )
                .is_err()
        );
        let mut tampered = envelope.clone();
        tampered["relay"] = serde_json::Value::String(
            envelope["relay"]
                .as_str()
                .unwrap()
                .replace("192.168.1.255", "10.0.0.255"),
        );
        assert!(matches!(
            verifier.verify_relay(&serde_json::to_vec(&tampered).unwrap(), NOW + 1, &mut guard),
            Err(WakeUpRejected::BadSignature(_))
        ));
    }

    #[test]
    fn bad_fields_are_refused_at_signing() {
        let (signer, _) = pair();
        let mut r = request("pc-on");
        r.macs.clear();
        assert!(signer.sign_relay(&r).is_err());
        let mut r = request("pc-on");
        r.repeats = 0;
        assert!(signer.sign_relay(&r).is_err());
        let mut r = request("pc-on");
        r.port = 0;
        assert!(signer.sign_relay(&r).is_err());
        let mut r = request("pc-on");
        r.macs = vec!["00:11:22:33:44:55".into(); MAX_RELAY_MACS + 1];
        assert!(signer.sign_relay(&r).is_err());
    }

    #[test]
    fn results_round_trip_and_bad_ones_are_refused() {
        let result = RelayResult {
            request_id: "01999999-9999-7999-8999-999999999999".into(),
            sends: vec![RelaySend {
                mac: "00:11:22:33:44:55".into(),
                destination: "192.168.1.255:9".into(),
                packets: 3,
                error: None,
            }],
            at: 5,
        };
        assert_eq!(RelayResult::from_json(&result.to_json()), Ok(result));
        assert!(RelayResult::from_json(b"{}").is_err());
        assert!(RelayResult::from_json(&[b'x'; MAX_RELAY_RESULT_LEN + 1]).is_err());
        assert!(RelayResult::from_json(br#"{"request_id":"","sends":[],"at":1}"#).is_err());
    }
}
