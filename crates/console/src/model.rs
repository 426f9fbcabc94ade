//! The console's records: what the store keeps and the API shows.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Unix time in milliseconds, the unit of every timestamp the console stores.
pub type Millis = i64;

/// The current time in unix milliseconds.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// An enrollment token as listed (the secret itself is only shown once, at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct EnrollmentToken {
    /// Public id, used to revoke it.
    pub id: String,
    /// What it is for, e.g. "laptops, Berlin office".
    pub label: String,
    /// When it was made.
    pub created_at: Millis,
    /// Who made it.
    pub created_by: String,
    /// After this it no longer enrolls anybody; `None`: never expires.
    pub expires_at: Option<Millis>,
    /// How many enrollments it allows in total; `None`: unlimited.
    pub max_uses: Option<u32>,
    /// How many agents enrolled with it.
    pub uses: u32,
    /// Groups every agent enrolled with it joins.
    pub groups: Vec<String>,
    /// Revoked by an administrator.
    pub revoked: bool,
}

/// One IP address of an agent with its prefix length (so that the subnet broadcast can be
/// computed for Wake-on-LAN).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentAddress {
    /// The address, e.g. `192.168.1.23` or `fe80::1`.
    pub address: std::net::IpAddr,
    /// Prefix length, e.g. 24.
    pub prefix_len: u8,
}

/// Whether an agent holds a push connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    /// No presence event seen yet.
    Unknown,
    /// Connected to the broker.
    Online,
    /// Disconnected.
    Offline,
}

impl Presence {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Unknown => "unknown",
            Presence::Online => "online",
            Presence::Offline => "offline",
        }
    }

    /// Parses the stored text.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "unknown" => Some(Presence::Unknown),
            "online" => Some(Presence::Online),
            "offline" => Some(Presence::Offline),
            _ => None,
        }
    }
}

/// What a user or API token may do; each role may do what the one before it may.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything: agents, groups, calls, settings, the audit log.
    Viewer,
    /// Also makes wake-up calls and sends Wake-on-LAN.
    Operator,
    /// Also changes settings, users, API tokens, enrollment tokens, agents and groups.
    Admin,
}

impl Role {
    /// Every role, least first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Parses the stored text.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

/// A console user as listed (never the password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct User {
    /// Login name.
    pub name: String,
    /// What the user may do.
    pub role: Role,
    /// When the user was made.
    pub created_at: Millis,
    /// Signs in through the OpenID provider (no password here; the role comes from the
    /// provider's claim at each sign-in).
    #[serde(default)]
    pub sso: bool,
}

/// What an agent reports about its machine (at enrollment and at each check-in).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Host name.
    #[serde(default)]
    pub hostname: String,
    /// Operating system, e.g. "Debian 13".
    #[serde(default)]
    pub os: String,
    /// IP addresses with prefix lengths.
    #[serde(default)]
    pub addresses: Vec<AgentAddress>,
    /// MAC addresses, `aa:bb:cc:dd:ee:ff`.
    #[serde(default)]
    pub macs: Vec<String>,
}

/// An enrolled agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Agent {
    /// The identity id (certificate CN, MQTT client id).
    pub id: String,
    /// Display name (defaults to the host name).
    pub name: String,
    /// What the machine reported last.
    #[serde(flatten)]
    pub inventory: Inventory,
    /// Group names.
    pub groups: Vec<String>,
    /// When it enrolled.
    pub enrolled_at: Millis,
    /// Its last check-in with the console.
    pub last_checkin: Option<Millis>,
    /// Push connection state.
    pub presence: Presence,
    /// When the presence last changed.
    pub presence_at: Option<Millis>,
    /// The path of the push connection (`8883`, `443-mqtt`, `443-websocket`, ...).
    pub path: Option<String>,
    /// The address the broker saw.
    pub remote_addr: Option<String>,
    /// Revoked (deleted): it may no longer check in and gets no wake-ups.
    pub revoked: bool,
    /// Set when two machines use this identity ([`crate::clones`]).
    #[serde(default)]
    pub cloned: Option<ClonedIdentity>,
}

/// An identity in use on two machines: both machines as they last checked in, and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClonedIdentity {
    /// When the console noticed.
    pub detected_at: Millis,
    /// The machine that checked in last, then the one before it.
    pub machines: Vec<Inventory>,
    /// What to do, in plain words.
    pub fix: String,
}

/// A group of agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Group {
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// When it was made.
    pub created_at: Millis,
    /// How many (non-revoked) agents are in it.
    pub members: u32,
}

/// Where a wake-up call stands for one agent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum CallState {
    /// Recorded, not yet accepted by the broker.
    Queued,
    /// The broker acknowledged the publish (PUBACK).
    Sent,
    /// The agent acknowledged it (`received`).
    Delivered,
    /// The agent's action started.
    Started,
    /// The agent's action ended (see status).
    Finished,
    /// It expired before the agent received it.
    Expired,
    /// It could not be sent (see detail).
    Failed,
}

impl CallState {
    /// All states, in order.
    pub const ALL: [CallState; 7] = [
        CallState::Queued,
        CallState::Sent,
        CallState::Delivered,
        CallState::Started,
        CallState::Finished,
        CallState::Expired,
        CallState::Failed,
    ];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            CallState::Queued => "queued",
            CallState::Sent => "sent",
            CallState::Delivered => "delivered",
            CallState::Started => "started",
            CallState::Finished => "finished",
            CallState::Expired => "expired",
            CallState::Failed => "failed",
        }
    }

    /// Parses the stored text.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// No further change is expected.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CallState::Finished | CallState::Expired | CallState::Failed
        )
    }

    /// Whether moving from `self` to `next` is progress. States only move forward, so a late
    /// or duplicated ack (QoS 1 may deliver twice) never moves a call back.
    pub fn may_become(self, next: CallState) -> bool {
        if self.is_final() {
            return false;
        }
        match next {
            CallState::Expired => matches!(self, CallState::Queued | CallState::Sent),
            CallState::Failed => true,
            _ => next > self,
        }
    }
}

/// What a wake-up call was addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CallTarget {
    /// These agent ids.
    Agents(Vec<String>),
    /// Every agent of this group.
    Group(String),
    /// Every (non-revoked) agent.
    All,
}

impl CallTarget {
    /// In words, for lists and logs.
    pub fn describe(&self) -> String {
        match self {
            CallTarget::Agents(ids) if ids.len() == 1 => format!("agent {}", ids[0]),
            CallTarget::Agents(ids) => format!("{} agents", ids.len()),
            CallTarget::Group(g) => format!("group {g}"),
            CallTarget::All => "all agents".into(),
        }
    }
}

/// A wake-up call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WakeCall {
    /// Call id (UUID v7).
    pub id: String,
    /// When it was made.
    pub created_at: Millis,
    /// Who made it (user or API token name).
    pub created_by: String,
    /// Why (carried in the wake-up).
    pub reason: String,
    /// The action the agents should run; `None`: check in.
    pub action: Option<String>,
    /// What it was addressed to, in words.
    pub target: String,
    /// When the wake-ups expire.
    pub expires_at: Millis,
    /// Spread window in seconds.
    pub spread: u32,
    /// How many agents are in each state.
    pub counts: std::collections::BTreeMap<CallState, u32>,
    /// How many agents the call addressed when it was made. A large call is recorded in
    /// chunks after the request: until then its counts add up to less, and grow.
    #[serde(default)]
    pub targeted: u32,
}

/// A call's state for one agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CallDelivery {
    /// The call.
    pub call_id: String,
    /// The agent.
    pub agent_id: String,
    /// The id of the wake-up message for this agent (acks carry it).
    pub wakeup_id: String,
    /// Where it stands.
    pub state: CallState,
    /// When it entered each state it went through.
    pub queued_at: Millis,
    /// PUBACK from the broker.
    pub sent_at: Option<Millis>,
    /// `received` ack.
    pub delivered_at: Option<Millis>,
    /// `started` ack.
    pub started_at: Option<Millis>,
    /// `finished` ack, expiry or failure.
    pub finished_at: Option<Millis>,
    /// `ok`, `failed`, `timed_out` for finished ones.
    pub status: Option<String>,
    /// The command's exit code.
    pub exit_code: Option<i32>,
    /// How long the action ran.
    pub duration_ms: Option<u64>,
    /// Error text (failed) or the agent's note.
    pub detail: Option<String>,
    /// When several pending wake-ups went out as one message, the wake-up id that carried this
    /// one.
    pub carried_by: Option<String>,
}

/// A state change for one agent of a call, as pushed to live listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CallEvent {
    /// The call.
    pub call_id: String,
    /// The agent.
    pub agent_id: String,
    /// The new state.
    pub state: CallState,
    /// When.
    pub at: Millis,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditEntry {
    /// Sequence number.
    pub id: i64,
    /// When.
    pub at: Millis,
    /// Who.
    pub who: String,
    /// What, e.g. `settings.wol`.
    pub what: String,
    /// Details (old and new values).
    pub detail: serde_json::Value,
}

/// An API token as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ApiToken {
    /// Public id.
    pub id: String,
    /// Name, shown as the author of what it does.
    pub name: String,
    /// When it was made.
    pub created_at: Millis,
    /// Revoked.
    pub revoked: bool,
    /// What it may do (at most its creator's role).
    pub role: Role,
    /// Who made it (`user:alice`, `token:ci`); `None` for tokens made before roles.
    pub created_by: Option<String>,
}

/// An online agent that may relay Wake-on-LAN to its subnets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayCandidate {
    /// Its identity id.
    pub id: String,
    /// Its addresses as it reported them last.
    pub addresses: Vec<AgentAddress>,
    /// When it came online.
    pub presence_at: Option<Millis>,
}

/// One Wake-on-LAN packet burst sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct WolSend {
    /// The agent.
    pub agent_id: String,
    /// The call it was part of, if any.
    pub call_id: Option<String>,
    /// The MAC woken.
    pub mac: String,
    /// `address:port`.
    pub destination: String,
    /// When.
    pub at: Millis,
    /// How many packets went out.
    pub packets: u32,
    /// The send error, if it failed.
    pub error: Option<String>,
    /// When relayed: the agent asked to send the packets on its network (`None`: the
    /// console sent them itself).
    #[serde(default)]
    pub via_agent: Option<String>,
    /// When relayed: the relay request's id.
    #[serde(default)]
    pub relay_id: Option<String>,
    /// When relayed: `requested` (published to the agent, no answer yet), `answered` (the
    /// agent's result is recorded in `packets` and `error`) or `failed` (the request could
    /// not be sent; `error` says why).
    #[serde(default)]
    pub relay_state: Option<String>,
}
