//! The wake-up message (server to agent) and its ack (agent to server), as in `docs/wake-up.md`.
//!
//! A wake-up is small JSON signed end to end by the console's Ed25519 key, so that the agent
//! can trust it whoever runs the broker. On the wire:
//!
//! ```json
//! {"wakeup":"{\"v\":1,\"id\":\"…\",…}","kid":"console-1","sig":"<base64url>"}
//! ```
//!
//! `wakeup` carries the inner object as a JSON *string*: the signature covers
//! `beckon.wakeup.v1.` followed by exactly those bytes, so nobody has to re-serialize JSON the
//! same way to check it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::identity::{TenantId, validate_id};
use crate::keys::{KeyId, PublicKey, SIGNATURE_LEN, SigningKey, b64url, b64url_decode};

/// The version written in `v`.
pub const WAKEUP_VERSION: u32 = 1;
/// Bytes prepended to the inner JSON before signing (domain separation from tokens).
pub const SIGNING_CONTEXT: &[u8] = b"beckon.wakeup.v1.";
/// Largest wake-up payload accepted, in bytes.
pub const MAX_WAKEUP_LEN: usize = 8 * 1024;
/// Longest `reason` or `action`, in bytes.
pub const MAX_TEXT_LEN: usize = 256;
/// Longest lifetime (`expires_at - issued_at`) a wake-up may have: 7 days.
pub const MAX_LIFETIME_SECS: i64 = 7 * 24 * 3600;
/// Longest spread window: 24 hours.
pub const MAX_SPREAD_SECS: u32 = 24 * 3600;
/// Default expiry of a wake-up (the SPEC's 10 minutes), in seconds.
pub const DEFAULT_LIFETIME_SECS: u32 = 600;
/// Default number of wake-up ids an agent's [`ReplayGuard`] remembers.
pub const DEFAULT_REPLAY_CAPACITY: usize = 4096;
/// Largest ack payload accepted, in bytes.
pub const MAX_ACK_LEN: usize = 4096;

/// A wake-up call for one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeUp {
    /// Format version, [`WAKEUP_VERSION`].
    pub v: u32,
    /// A UUID v7, unique per wake-up and per agent; acks and the replay guard use it.
    pub id: String,
    /// The tenant of the agent.
    pub tenant: String,
    /// The target agent id.
    pub agent: String,
    /// Why, for logs and the agent's status (e.g. `policy-changed`).
    pub reason: String,
    /// When the console issued it, unix seconds.
    pub issued_at: i64,
    /// After this (unix seconds) the agent drops it.
    pub expires_at: i64,
    /// Seconds over which the agent delays its action at random (0: act at once).
    pub spread: u32,
    /// What to run; absent: the default action (check in with the console).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

/// Why a wake-up could not be built or signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WakeUpError {
    /// A field breaks the format's rules.
    #[error("wake-up field `{field}` is not valid: {reason}")]
    InvalidField {
        /// The field name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The system random generator failed while making the id.
    #[error("could not make a wake-up id: the system random generator failed")]
    Random,
    /// The message could not be serialized for signing; nothing was signed.
    #[error("could not serialize the {what} for signing: {reason}")]
    Serialize {
        /// What was being serialized ("wake-up", "relay request", "envelope").
        what: &'static str,
        /// serde_json's error.
        reason: String,
    },
}

/// Serializes `value` for a signing path: an error instead of signing an empty body.
pub(crate) fn to_signed_json<T: Serialize + ?Sized>(
    what: &'static str,
    value: &T,
) -> Result<String, WakeUpError> {
    serde_json::to_string(value).map_err(|e| WakeUpError::Serialize {
        what,
        reason: e.to_string(),
    })
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> WakeUpError {
    WakeUpError::InvalidField {
        field,
        reason: reason.into(),
    }
}

/// The first checks of every signed message of this format (wake-up, relay request):
/// version, id (a hyphenated UUID v7), tenant and agent.
pub(crate) fn check_header(
    v: u32,
    supported: u32,
    id: &str,
    tenant: &str,
    agent: &str,
) -> Result<(), WakeUpError> {
    if v != supported {
        return Err(invalid("v", format!("version {v} is not supported")));
    }
    match uuid::Uuid::try_parse(id) {
        Ok(u) if u.get_version_num() == 7 && id.len() == 36 => {}
        _ => return Err(invalid("id", "not a hyphenated UUID v7")),
    }
    TenantId::new(tenant).map_err(|e| invalid("tenant", e.to_string()))?;
    validate_id(agent).map_err(|e| invalid("agent", e.to_string()))
}

/// The lifetime rule of every signed message: expires 1 s to [`MAX_LIFETIME_SECS`] after
/// it was issued.
pub(crate) fn check_lifetime(issued_at: i64, expires_at: i64) -> Result<(), WakeUpError> {
    let lifetime = expires_at.saturating_sub(issued_at);
    if lifetime <= 0 || lifetime > MAX_LIFETIME_SECS {
        return Err(invalid(
            "expires_at",
            format!("must be 1 s to {MAX_LIFETIME_SECS} s after issued_at"),
        ));
    }
    Ok(())
}

/// What is signed: the context (which kind of message), then the inner JSON.
pub(crate) fn signed_message(context: &[u8], inner: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(context.len() + inner.len());
    message.extend_from_slice(context);
    message.extend_from_slice(inner.as_bytes());
    message
}

/// A new UUID v7 for the wake-up issued at `now_ms` (unix milliseconds).
pub fn new_wakeup_id(now_ms: i64) -> Result<String, WakeUpError> {
    let mut random = [0u8; 10];
    aws_lc_rs::rand::fill(&mut random).map_err(|_| WakeUpError::Random)?;
    let millis = u64::try_from(now_ms).unwrap_or(0);
    Ok(uuid::Builder::from_unix_timestamp_millis(millis, &random)
        .into_uuid()
        .hyphenated()
        .to_string())
}

impl WakeUp {
    /// A wake-up for `agent` of `tenant`, issued at `now_ms` (unix milliseconds), expiring
    /// `lifetime_secs` later, with a fresh UUID v7 id.
    pub fn new(
        tenant: &TenantId,
        agent: &str,
        reason: &str,
        now_ms: i64,
        lifetime_secs: u32,
        spread: u32,
    ) -> Result<Self, WakeUpError> {
        let issued_at = now_ms.div_euclid(1000);
        let wakeup = Self {
            v: WAKEUP_VERSION,
            id: new_wakeup_id(now_ms)?,
            tenant: tenant.to_string(),
            agent: agent.to_owned(),
            reason: reason.to_owned(),
            issued_at,
            expires_at: issued_at.saturating_add(i64::from(lifetime_secs)),
            spread,
            action: None,
        };
        wakeup.check_fields()?;
        Ok(wakeup)
    }

    /// Sets the action.
    pub fn with_action(mut self, action: impl Into<String>) -> Self {
        self.action = Some(action.into());
        self
    }

    /// Checks every field against the format's rules (not the time, not the target).
    pub fn check_fields(&self) -> Result<(), WakeUpError> {
        check_header(self.v, WAKEUP_VERSION, &self.id, &self.tenant, &self.agent)?;
        if self.reason.len() > MAX_TEXT_LEN {
            return Err(invalid(
                "reason",
                format!("longer than {MAX_TEXT_LEN} bytes"),
            ));
        }
        if let Some(action) = &self.action
            && (action.is_empty() || action.len() > MAX_TEXT_LEN)
        {
            return Err(invalid(
                "action",
                format!("must be 1 to {MAX_TEXT_LEN} bytes (omit it for the default action)"),
            ));
        }
        check_lifetime(self.issued_at, self.expires_at)?;
        if self.spread > MAX_SPREAD_SECS {
            return Err(invalid(
                "spread",
                format!("at most {MAX_SPREAD_SECS} seconds"),
            ));
        }
        Ok(())
    }

    /// Folds several pending wake-ups for one agent into one run (agent side): wake-ups that
    /// arrive during the spread delay or while an action runs become one follow-up run. Returns
    /// `None` for an empty list.
    pub fn merge(pending: &[WakeUp]) -> Option<MergedWakeUp> {
        let first = pending.first()?;
        let mut merged = MergedWakeUp {
            ids: Vec::new(),
            reasons: Vec::new(),
            actions: Vec::new(),
            spread: first.spread,
            expires_at: first.expires_at,
        };
        for w in pending {
            merged.ids.push(w.id.clone());
            if !merged.reasons.contains(&w.reason) {
                merged.reasons.push(w.reason.clone());
            }
            if !merged.actions.contains(&w.action) {
                merged.actions.push(w.action.clone());
            }
            // The most urgent call sets the pace; the latest expiry bounds the run.
            merged.spread = merged.spread.min(w.spread);
            merged.expires_at = merged.expires_at.max(w.expires_at);
        }
        Some(merged)
    }
}

/// Several wake-ups run as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedWakeUp {
    /// Every merged wake-up id, in arrival order: each gets its acks.
    pub ids: Vec<String>,
    /// The distinct reasons, in arrival order.
    pub reasons: Vec<String>,
    /// The distinct actions to run once each, in arrival order (`None`: the default action).
    pub actions: Vec<Option<String>>,
    /// The smallest spread of the batch.
    pub spread: u32,
    /// The latest expiry of the batch.
    pub expires_at: i64,
}

/// The signed wire form.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    wakeup: String,
    kid: String,
    sig: String,
}

/// Signs wake-ups with the console's key (console side).
#[derive(Debug)]
pub struct WakeUpSigner {
    key: SigningKey,
}

impl WakeUpSigner {
    /// A signer with the console's key; agents get its public key and key id at enrollment.
    pub fn new(key: SigningKey) -> Self {
        Self { key }
    }

    /// The signing key.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// Checks the fields and returns the signed payload to publish to `agents/{agent}/wake`.
    pub fn sign(&self, wakeup: &WakeUp) -> Result<Vec<u8>, WakeUpError> {
        wakeup.check_fields()?;
        let inner = to_signed_json("wake-up", wakeup)?;
        let sig = self.key.sign(&signed_message(SIGNING_CONTEXT, &inner));
        let envelope = Envelope {
            wakeup: inner,
            kid: self.key.kid().to_string(),
            sig: b64url(&sig),
        };
        Ok(to_signed_json("wake-up envelope", &envelope)?.into_bytes())
    }
}

/// Why an agent dropped a wake-up. None of these is acked: the id of a payload that failed
/// its checks cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WakeUpRejected {
    /// The payload is larger than [`MAX_WAKEUP_LEN`].
    #[error("wake-up payload of {0} bytes is larger than the {MAX_WAKEUP_LEN}-byte limit")]
    TooLarge(usize),
    /// The payload is not the signed JSON envelope.
    #[error("wake-up payload is malformed: {0}")]
    Malformed(String),
    /// The key id is not one this agent trusts.
    #[error(
        "wake-up is signed with key {0:?}, which this agent does not know: re-enroll or update the console keys"
    )]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("wake-up signature does not verify with key {0:?}: the payload was altered or forged")]
    BadSignature(String),
    /// A signed field breaks the format's rules.
    #[error("wake-up is invalid: {0}")]
    Invalid(WakeUpError),
    /// Signed for another tenant.
    #[error("wake-up is for tenant {got:?}, this agent belongs to {expected:?}")]
    WrongTenant {
        /// This agent's tenant.
        expected: String,
        /// The wake-up's tenant.
        got: String,
    },
    /// Signed for another agent.
    #[error("wake-up is for agent {got:?}, this agent is {expected:?}")]
    WrongAgent {
        /// This agent's id.
        expected: String,
        /// The wake-up's target.
        got: String,
    },
    /// Issued in the future beyond the clock-skew allowance.
    #[error(
        "wake-up {id} is issued at unix time {issued_at}, after now ({now}): check this machine's clock"
    )]
    NotYetValid {
        /// The wake-up id.
        id: String,
        /// Its `issued_at`.
        issued_at: i64,
        /// The agent's clock.
        now: i64,
    },
    /// Expired.
    #[error("wake-up {id} expired at unix time {expires_at} (now {now})")]
    Expired {
        /// The wake-up id.
        id: String,
        /// Its `expires_at`.
        expires_at: i64,
        /// The agent's clock.
        now: i64,
    },
    /// Already seen.
    #[error("wake-up {0} was already received (replay dropped)")]
    Replayed(String),
    /// Older than what the full replay guard can still tell apart.
    #[error(
        "wake-up {0} is older than the replay window (more wake-ups than the guard remembers arrived since)"
    )]
    OutsideReplayWindow(String),
}

/// Whom a signed message is for and when it is valid: what the verifier holds against this
/// agent and its clock once the signature and the fields are good.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Addressing<'a> {
    /// The tenant it is signed for.
    pub(crate) tenant: &'a str,
    /// The agent it is signed for.
    pub(crate) agent: &'a str,
    /// Its id (a UUID v7), remembered against replays.
    pub(crate) id: &'a str,
    /// When it was issued, unix seconds.
    pub(crate) issued_at: i64,
    /// When it expires, unix seconds.
    pub(crate) expires_at: i64,
}

/// A message the console signs for one agent (a wake-up, a relay request): the agent checks
/// each kind the same way, in the same order ([`WakeUpVerifier::open`]).
pub(crate) trait Signed: serde::de::DeserializeOwned {
    /// Bytes prepended to the inner JSON before signing, one per kind of message.
    const SIGNING_CONTEXT: &'static [u8];
    /// What the message is called in errors.
    const NAME: &'static str;
    /// Checks every field against the format's rules (not the time, not the target).
    fn check_fields(&self) -> Result<(), WakeUpError>;
    /// Whom it is for and when it is valid.
    fn addressing(&self) -> Addressing<'_>;
}

/// Implements [`Signed`] for a message type that has the addressing fields (`tenant`,
/// `agent`, `id`, `issued_at`, `expires_at`) and an inherent `check_fields`.
macro_rules! impl_signed {
    ($message:ty, $context:expr, $name:literal) => {
        impl $crate::wakeup::Signed for $message {
            const SIGNING_CONTEXT: &'static [u8] = $context;
            const NAME: &'static str = $name;

            fn check_fields(&self) -> Result<(), $crate::wakeup::WakeUpError> {
                <$message>::check_fields(self)
            }

            fn addressing(&self) -> $crate::wakeup::Addressing<'_> {
                $crate::wakeup::Addressing {
                    tenant: &self.tenant,
                    agent: &self.agent,
                    id: &self.id,
                    issued_at: self.issued_at,
                    expires_at: self.expires_at,
                }
            }
        }
    };
}
pub(crate) use impl_signed;

impl_signed!(WakeUp, SIGNING_CONTEXT, "wake-up");

/// Checks wake-ups for one agent (agent side): signature, format, target, time, replay. Never
/// reads the clock: the caller passes `now` (unix seconds).
#[derive(Debug, Clone)]
pub struct WakeUpVerifier {
    tenant: TenantId,
    agent: String,
    keys: BTreeMap<KeyId, PublicKey>,
    /// Seconds of disagreement between console and agent clocks tolerated.
    pub clock_skew_secs: i64,
}

impl WakeUpVerifier {
    /// A verifier for agent `agent` of `tenant`, trusting the console keys `keys`.
    pub fn new(
        tenant: TenantId,
        agent: impl Into<String>,
        keys: impl IntoIterator<Item = (KeyId, PublicKey)>,
    ) -> Self {
        Self {
            tenant,
            agent: agent.into(),
            keys: keys.into_iter().collect(),
            clock_skew_secs: crate::token::DEFAULT_CLOCK_SKEW_SECS,
        }
    }

    /// Verifies a payload received on `agents/{agent}/wake` and records its id in `replay`.
    pub fn verify(
        &self,
        payload: &[u8],
        now: i64,
        replay: &mut ReplayGuard,
    ) -> Result<WakeUp, WakeUpRejected> {
        if payload.len() > MAX_WAKEUP_LEN {
            return Err(WakeUpRejected::TooLarge(payload.len()));
        }
        let envelope: Envelope = serde_json::from_slice(payload)
            .map_err(|e| WakeUpRejected::Malformed(format!("not the signed envelope: {e}")))?;
        self.open(&envelope.wakeup, &envelope.kid, &envelope.sig, now, replay)
    }

    /// The checks every signed message goes through, in the order `docs/wake-up.md` gives:
    /// the signature by key `kid` (`sig`, base64url) over `inner`, then `inner` read as a `T`,
    /// its fields, its target and its time; its id is then recorded in `replay`.
    pub(crate) fn open<T: Signed>(
        &self,
        inner: &str,
        kid: &str,
        sig: &str,
        now: i64,
        replay: &mut ReplayGuard,
    ) -> Result<T, WakeUpRejected> {
        self.check_signature(kid, sig, &signed_message(T::SIGNING_CONTEXT, inner))?;
        let message: T = serde_json::from_str(inner).map_err(|e| {
            WakeUpRejected::Malformed(format!("signed {} is not valid: {e}", T::NAME))
        })?;
        message.check_fields().map_err(WakeUpRejected::Invalid)?;
        self.check_target_and_time(&message.addressing(), now, replay)?;
        Ok(message)
    }

    /// A trusted key id, then the signature (base64url) over `message` verifies with it.
    pub(crate) fn check_signature(
        &self,
        kid: &str,
        sig: &str,
        message: &[u8],
    ) -> Result<(), WakeUpRejected> {
        let key = KeyId::new(kid)
            .ok()
            .and_then(|kid| self.keys.get(&kid))
            .ok_or_else(|| WakeUpRejected::UnknownKey(kid.chars().take(64).collect()))?;
        let sig = b64url_decode(sig.as_bytes())
            .filter(|s| s.len() == SIGNATURE_LEN)
            .ok_or_else(|| WakeUpRejected::Malformed("sig is not base64url of 64 bytes".into()))?;
        if !key.verifies(message, &sig) {
            return Err(WakeUpRejected::BadSignature(kid.to_owned()));
        }
        Ok(())
    }

    /// For this agent of this tenant, not issued in the future, not expired, not a replay
    /// (then remembered in `replay`).
    pub(crate) fn check_target_and_time(
        &self,
        addressing: &Addressing<'_>,
        now: i64,
        replay: &mut ReplayGuard,
    ) -> Result<(), WakeUpRejected> {
        let Addressing {
            tenant,
            agent,
            id,
            issued_at,
            expires_at,
        } = *addressing;
        if tenant != self.tenant.as_str() {
            return Err(WakeUpRejected::WrongTenant {
                expected: self.tenant.to_string(),
                got: tenant.to_owned(),
            });
        }
        if agent != self.agent {
            return Err(WakeUpRejected::WrongAgent {
                expected: self.agent.clone(),
                got: agent.to_owned(),
            });
        }
        if issued_at > now.saturating_add(self.clock_skew_secs) {
            return Err(WakeUpRejected::NotYetValid {
                id: id.to_owned(),
                issued_at,
                now,
            });
        }
        let accepted_until = expires_at.saturating_add(self.clock_skew_secs);
        if now >= accepted_until {
            return Err(WakeUpRejected::Expired {
                id: id.to_owned(),
                expires_at,
                now,
            });
        }
        replay.admit(id, accepted_until, now)
    }
}

/// Remembers the ids of accepted wake-ups until they expire, so that a replayed one is dropped.
/// Bounded: when full, the entry that expires first is forgotten and every wake-up expiring no
/// later than it is refused from then on (`floor`), so a replay can never slip through.
/// Serializable (JSON) so that the agent keeps it across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ReplayGuardState")]
pub struct ReplayGuard {
    capacity: usize,
    floor: i64,
    seen: BTreeMap<String, i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayGuardState {
    capacity: usize,
    floor: i64,
    seen: BTreeMap<String, i64>,
}

impl From<ReplayGuardState> for ReplayGuard {
    fn from(state: ReplayGuardState) -> Self {
        let mut guard = ReplayGuard {
            capacity: state.capacity.max(1),
            floor: state.floor,
            seen: state.seen,
        };
        while guard.seen.len() > guard.capacity {
            guard.evict_earliest();
        }
        guard
    }
}

impl Default for ReplayGuard {
    fn default() -> Self {
        Self::new(DEFAULT_REPLAY_CAPACITY)
    }
}

impl ReplayGuard {
    /// A guard remembering at most `capacity` ids (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            floor: i64::MIN,
            seen: BTreeMap::new(),
        }
    }

    /// How many ids are remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn evict_earliest(&mut self) {
        let earliest = self
            .seen
            .iter()
            .min_by_key(|(_, until)| **until)
            .map(|(id, until)| (id.clone(), *until));
        if let Some((id, until)) = earliest {
            self.seen.remove(&id);
            self.floor = self.floor.max(until);
        }
    }

    /// Records `id`, to be remembered until `keep_until` (unix seconds), or refuses it as a
    /// replay. Forgets ids whose time has passed (`now`).
    pub fn admit(&mut self, id: &str, keep_until: i64, now: i64) -> Result<(), WakeUpRejected> {
        self.seen.retain(|_, until| *until > now);
        if self.seen.contains_key(id) {
            return Err(WakeUpRejected::Replayed(id.to_owned()));
        }
        if keep_until <= self.floor {
            return Err(WakeUpRejected::OutsideReplayWindow(id.to_owned()));
        }
        if self.seen.len() >= self.capacity {
            let earliest = self.seen.values().min().copied().unwrap_or(i64::MAX);
            if keep_until <= earliest {
                // Remembering it would push out a later one: raise the floor past it instead.
                self.floor = self.floor.max(keep_until);
                return Ok(());
            }
            self.evict_earliest();
        }
        self.seen.insert(id.to_owned(), keep_until);
        Ok(())
    }

    /// The guard as JSON, for the agent's state folder.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Restores a guard saved with [`to_json`](Self::to_json).
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// How far the agent got with a wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStage {
    /// Verified and accepted; the action is scheduled (after the spread delay).
    Received,
    /// The action started.
    Started,
    /// The action ended (`status` says how).
    Finished,
}

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// It succeeded (exit code 0, HTTP 2xx, check-in done).
    Ok,
    /// It failed (non-zero exit code, HTTP error, check-in refused).
    Failed,
    /// It ran past its timeout and was stopped.
    TimedOut,
}

/// An ack, published by the agent to `agents/{id}/ack`. Acks are not signed: the broker only
/// lets agent X publish to `agents/X/ack`, so the topic vouches for the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// The wake-up this is about.
    pub wakeup_id: String,
    /// Received, started or finished.
    pub stage: AckStage,
    /// How the action ended (`finished` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<AckStatus>,
    /// The command's exit code, when the action ran a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// How long the action ran, in milliseconds (`finished` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// When, in unix milliseconds.
    pub at: i64,
    /// A short human note (an error message), at most 1024 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Why an ack payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// Larger than [`MAX_ACK_LEN`].
    #[error("ack payload of {0} bytes is larger than the {MAX_ACK_LEN}-byte limit")]
    TooLarge(usize),
    /// Not the ack JSON.
    #[error("ack payload is malformed: {0}")]
    Malformed(String),
    /// Fields that do not fit together.
    #[error("ack is inconsistent: {0}")]
    Inconsistent(&'static str),
}

impl Ack {
    /// `received`: the wake-up was accepted.
    pub fn received(wakeup_id: &str, at_ms: i64) -> Self {
        Self::at_stage(wakeup_id, AckStage::Received, at_ms)
    }

    /// `started`: the action began.
    pub fn started(wakeup_id: &str, at_ms: i64) -> Self {
        Self::at_stage(wakeup_id, AckStage::Started, at_ms)
    }

    /// `finished`: the action ended.
    pub fn finished(
        wakeup_id: &str,
        status: AckStatus,
        exit_code: Option<i32>,
        duration_ms: u64,
        at_ms: i64,
    ) -> Self {
        Self {
            status: Some(status),
            exit_code,
            duration_ms: Some(duration_ms),
            ..Self::at_stage(wakeup_id, AckStage::Finished, at_ms)
        }
    }

    fn at_stage(wakeup_id: &str, stage: AckStage, at: i64) -> Self {
        Self {
            wakeup_id: wakeup_id.to_owned(),
            stage,
            status: None,
            exit_code: None,
            duration_ms: None,
            at,
            detail: None,
        }
    }

    /// The JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks an ack payload (console side).
    pub fn from_json(payload: &[u8]) -> Result<Self, AckError> {
        if payload.len() > MAX_ACK_LEN {
            return Err(AckError::TooLarge(payload.len()));
        }
        let ack: Ack =
            serde_json::from_slice(payload).map_err(|e| AckError::Malformed(e.to_string()))?;
        if ack.wakeup_id.is_empty() || ack.wakeup_id.len() > 64 {
            return Err(AckError::Inconsistent("wakeup_id must be 1 to 64 bytes"));
        }
        if ack.detail.as_ref().is_some_and(|d| d.len() > 1024) {
            return Err(AckError::Inconsistent("detail is longer than 1024 bytes"));
        }
        match (ack.stage, ack.status) {
            (AckStage::Finished, None) => {
                return Err(AckError::Inconsistent("a finished ack carries a status"));
            }
            (AckStage::Received | AckStage::Started, Some(_)) => {
                return Err(AckError::Inconsistent(
                    "only a finished ack carries a status",
                ));
            }
            _ => {}
        }
        Ok(ack)
    }
}

#[cfg(test)]
mod tests;
