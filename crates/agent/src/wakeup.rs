//! Wake-ups in, acks out: the JSON the agent reads on `agents/{id}/wake` and writes on
//! `agents/{id}/ack`, and the boundary where a wake-up is verified.
//!
//! Verification sits behind [`WakeUpCheck`] so that the signed format of `beckon-identity`
//! plugs in without touching the session or the actions. Replays are refused by the agent's
//! own persisted guard (the state folder), whatever the verifier.

use serde::{Deserialize, Serialize};

use crate::timefmt::{format_rfc3339, parse_rfc3339};

/// A wake-up the agent accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeUp {
    /// Unique id (UUID v7).
    pub id: String,
    /// Why the console sent it.
    pub reason: String,
    /// Issued at, Unix seconds.
    pub issued_at: i64,
    /// Expires at, Unix seconds.
    pub expires_at: i64,
    /// Seconds over which the agent delays its action at random.
    pub spread: u64,
    /// Optional action name chosen by the console.
    pub action: Option<String>,
    /// The payload as received, handed to the command on stdin.
    pub raw: Vec<u8>,
}

/// Why a wake-up was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WakeUpRejected {
    /// The payload is not a wake-up.
    #[error("wake-up is malformed: {0}")]
    Malformed(String),
    /// The signature is missing or does not verify.
    #[error("wake-up signature is not valid: {0}")]
    BadSignature(String),
    /// It expired before it arrived.
    #[error("wake-up {id} expired at {expired}")]
    Expired {
        /// Wake-up id.
        id: String,
        /// Its expiry, RFC 3339.
        expired: String,
    },
    /// It names another agent or tenant.
    #[error("wake-up {id} is addressed to {target}, not to this agent")]
    WrongTarget {
        /// Wake-up id.
        id: String,
        /// Whom it names.
        target: String,
    },
    /// Its id was seen before.
    #[error("wake-up {0} was already received (replay dropped)")]
    Replay(String),
}

/// Verifies a wake-up payload: format, signature, expiry and target. Replays are the
/// caller's business (the guard must survive restarts).
pub trait WakeUpCheck: Send + Sync + 'static {
    /// Checks `payload` at Unix time `now`.
    fn check(&self, payload: &[u8], now: i64) -> Result<WakeUp, WakeUpRejected>;
}

/// The wire form: `issued_at`/`expires_at` may be RFC 3339 text or Unix seconds.
#[derive(Debug, Deserialize)]
struct WireWakeUp {
    #[serde(default)]
    v: Option<u32>,
    id: String,
    #[serde(default)]
    reason: String,
    issued_at: WireTime,
    expires_at: WireTime,
    #[serde(default)]
    spread: u64,
    #[serde(default)]
    action: Option<String>,
    /// The agent the console addressed (optional: the topic already names it).
    #[serde(default, alias = "agent")]
    agent_id: Option<String>,
    /// The tenant the console addressed.
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default, alias = "sig")]
    signature: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WireTime {
    Unix(i64),
    Text(String),
}

impl WireTime {
    fn unix(&self, field: &str) -> Result<i64, WakeUpRejected> {
        match self {
            Self::Unix(t) => Ok(*t),
            Self::Text(t) => parse_rfc3339(t).ok_or_else(|| {
                WakeUpRejected::Malformed(format!("{field} {t:?} is not an RFC 3339 time"))
            }),
        }
    }
}

/// Checks format, expiry and target of the JSON wake-up. It does NOT check signatures: the
/// signed format belongs to `beckon-identity`; until it is wired in, an agent whose config
/// requires signatures refuses to start rather than run unverified wake-ups.
pub struct UnsignedWakeUpCheck {
    agent_id: String,
    tenant: String,
}

impl UnsignedWakeUpCheck {
    /// A check for wake-ups addressed to `agent_id` in `tenant`.
    pub fn new(agent_id: &str, tenant: &str) -> Self {
        Self {
            agent_id: agent_id.to_owned(),
            tenant: tenant.to_owned(),
        }
    }
}

impl WakeUpCheck for UnsignedWakeUpCheck {
    fn check(&self, payload: &[u8], now: i64) -> Result<WakeUp, WakeUpRejected> {
        let wire: WireWakeUp = serde_json::from_slice(payload)
            .map_err(|e| WakeUpRejected::Malformed(e.to_string()))?;
        if let Some(v) = wire.v
            && v != 1
        {
            return Err(WakeUpRejected::Malformed(format!(
                "version {v} is not supported (this agent reads version 1); update the agent"
            )));
        }
        if wire.id.is_empty() || wire.id.len() > 128 {
            return Err(WakeUpRejected::Malformed(
                "id must be 1 to 128 characters".into(),
            ));
        }
        let issued_at = wire.issued_at.unix("issued_at")?;
        let expires_at = wire.expires_at.unix("expires_at")?;
        if expires_at < now {
            return Err(WakeUpRejected::Expired {
                id: wire.id,
                expired: format_rfc3339(expires_at),
            });
        }
        let agent_ok = wire.agent_id.as_deref().is_none_or(|a| a == self.agent_id);
        let tenant_ok = wire.tenant.as_deref().is_none_or(|t| t == self.tenant);
        if !agent_ok || !tenant_ok {
            return Err(WakeUpRejected::WrongTarget {
                id: wire.id,
                target: format!(
                    "{}/{}",
                    wire.tenant.as_deref().unwrap_or("?"),
                    wire.agent_id.as_deref().unwrap_or("?")
                ),
            });
        }
        let _ = wire.signature;
        Ok(WakeUp {
            id: wire.id,
            reason: wire.reason,
            issued_at,
            expires_at,
            spread: wire.spread,
            action: wire.action,
            raw: payload.to_vec(),
        })
    }
}

/// The stage an ack reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStage {
    /// The wake-up arrived and verified.
    Received,
    /// The actions started.
    Started,
    /// The actions ended.
    Finished,
}

/// One ack on `agents/{id}/ack` (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckMessage {
    /// Format version, 1.
    pub v: u32,
    /// The wake-up id.
    pub id: String,
    /// The agent sending it.
    pub agent_id: String,
    /// received, started or finished.
    pub stage: AckStage,
    /// When, RFC 3339.
    pub at: String,
    /// `ok`, `failed`, `timeout` or `error` (finished only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Exit code of the command (finished only, when it exited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Duration of the run in milliseconds (finished only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// What went wrong, in plain words (finished only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// How many wake-ups this run answered when several merged into one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<usize>,
}

impl AckMessage {
    /// An ack without result fields.
    pub fn new(id: &str, agent_id: &str, stage: AckStage, now: i64) -> Self {
        Self {
            v: 1,
            id: id.to_owned(),
            agent_id: agent_id.to_owned(),
            stage,
            at: format_rfc3339(now),
            status: None,
            exit_code: None,
            duration_ms: None,
            detail: None,
            merged: None,
        }
    }

    /// The JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> UnsignedWakeUpCheck {
        UnsignedWakeUpCheck::new("a1", "acme")
    }

    #[test]
    fn accepts_a_valid_wakeup_in_either_time_form() {
        let w = check()
            .check(
                br#"{"v":1,"id":"w1","reason":"policy","issued_at":"2026-11-27T21:00:00Z","expires_at":2000000000,"spread":5,"action":"checkin","agent_id":"a1","tenant":"acme"}"#,
                1_795_814_046,
            )
            .expect("valid");
        assert_eq!(w.id, "w1");
        assert_eq!(w.spread, 5);
        assert_eq!(w.action.as_deref(), Some("checkin"));
    }

    #[test]
    fn refuses_expired_wrong_target_and_garbage() {
        let now = 1_795_814_046;
        let expired = br#"{"id":"w1","issued_at":1,"expires_at":2}"#;
        assert!(matches!(
            check().check(expired, now),
            Err(WakeUpRejected::Expired { .. })
        ));
        let other = br#"{"id":"w1","issued_at":1,"expires_at":2000000000,"agent_id":"a2"}"#;
        assert!(matches!(
            check().check(other, now),
            Err(WakeUpRejected::WrongTarget { .. })
        ));
        let other_tenant = br#"{"id":"w1","issued_at":1,"expires_at":2000000000,"tenant":"evil"}"#;
        assert!(matches!(
            check().check(other_tenant, now),
            Err(WakeUpRejected::WrongTarget { .. })
        ));
        for junk in [
            &b"not json"[..],
            b"{}",
            b"{\"id\":\"\",\"issued_at\":1,\"expires_at\":3000000000}",
        ] {
            assert!(matches!(
                check().check(junk, now),
                Err(WakeUpRejected::Malformed(_))
            ));
        }
        let future = br#"{"v":2,"id":"w1","issued_at":1,"expires_at":2000000000}"#;
        assert!(matches!(
            check().check(future, now),
            Err(WakeUpRejected::Malformed(_))
        ));
    }

    #[test]
    fn ack_json_shape() {
        let mut ack = AckMessage::new("w1", "a1", AckStage::Finished, 0);
        ack.status = Some("ok".into());
        ack.exit_code = Some(0);
        ack.duration_ms = Some(12);
        let v: serde_json::Value = serde_json::from_slice(&ack.to_json()).expect("json");
        assert_eq!(v["stage"], "finished");
        assert_eq!(v["exit_code"], 0);
        assert_eq!(v["at"], "1970-01-01T00:00:00Z");
        let received = AckMessage::new("w1", "a1", AckStage::Received, 0);
        let v: serde_json::Value = serde_json::from_slice(&received.to_json()).expect("json");
        assert!(v.get("status").is_none());
    }
}
