//! The console's store: one trait per kind of data ([`AgentStore`], [`CallStore`],
//! [`AuthStore`], [`WolStore`], [`SettingsStore`]), together the [`Store`] a backend provides,
//! and their one implementation in SQL ([`SqlStore`]) over either backend: SQLite (a file,
//! the default) or PostgreSQL, chosen by a [`DatabaseUrl`].
//!
//! Every operation that changes more than one row runs in one transaction, so that a crash
//! (or `kill -9`) leaves either all of it or none of it. The store is synchronous: async code
//! calls it through [`StoreHandle`], which runs each call on tokio's blocking pool.

mod copy;
mod postgresql;
mod seed;
mod sql;
mod sqlite;
mod url;

use std::sync::Arc;

pub use copy::{CopyReport, copy_store};
pub use postgresql::POSTGRES_SCHEMA_VERSION;
pub use seed::{SEED_AGENT_PREFIX, SEED_SITES, SEED_WAKE_GROUP, SeedPlan, SeedReport};
pub use sql::{CALL_COUNT_COLUMNS, DbError, SqlStore};
pub use sqlite::SCHEMA_VERSION;
pub use url::DatabaseUrl;

/// The console id of a console that is given none (`--console-id`): its MQTT client id at
/// the broker and the name under which it dispatches calls. Several consoles on one
/// database each need their own.
pub const DEFAULT_CONSOLE_ID: &str = "console";

use crate::model::*;
use crate::settings::Settings;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record does not exist.
    #[error("{what} {id:?} does not exist")]
    NotFound {
        /// Kind of record, e.g. "agent".
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The change conflicts with what is stored (a duplicate name, ...).
    #[error("{0}")]
    Conflict(String),
    /// An enrollment token, API token or session was refused.
    #[error("{0}")]
    Refused(String),
    /// The request is not valid.
    #[error("{0}")]
    Invalid(String),
    /// The database was written by a newer Beckon.
    #[error(
        "the database {path} has schema version {found}, newer than this Beckon supports ({supported}): run the newer Beckon, or restore a backup made for this version"
    )]
    NewerSchema {
        /// The database (file, or PostgreSQL URL without its password).
        path: String,
        /// Its schema version.
        found: i64,
        /// What this build knows.
        supported: i64,
    },
    /// A record could not be turned into JSON for storing; nothing was written.
    #[error("cannot encode {context} as JSON: {source}; nothing was written, report this as a bug")]
    Encode {
        /// What was being encoded.
        context: &'static str,
        /// The error.
        source: serde_json::Error,
    },
    /// The database failed.
    #[error("database error while {context}: {source}")]
    Database {
        /// What the store was doing.
        context: &'static str,
        /// The error.
        source: DbError,
    },
    /// The database server cannot be reached (or gave no free connection in time).
    #[error(
        "cannot reach the database {database}: {reason}; check that the server runs and accepts this console's connections (a running console retries on every request)"
    )]
    Unavailable {
        /// The database URL, without its password.
        database: String,
        /// Why.
        reason: String,
    },
    /// The database server lacks something the schema needs (a PostgreSQL extension).
    #[error("{0}")]
    Setup(String),
    /// A file operation failed.
    #[error("{context} {path}: {source}")]
    Io {
        /// What the store was doing.
        context: &'static str,
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The blocking task running the store call died.
    #[error("the database task stopped unexpectedly: {0}")]
    Task(String),
}

/// Result of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// The schema scripts (`scripts[n]` moves version `n` to `n + 1`) still to apply to the
/// database `shown` at version `found`, each with the version it brings; a database newer
/// than the scripts is refused.
fn pending_migrations<'a>(
    scripts: &'a [&'a str],
    found: i64,
    shown: &str,
) -> StoreResult<impl Iterator<Item = (i64, &'a str)>> {
    let supported = scripts.len() as i64;
    if found > supported {
        return Err(StoreError::NewerSchema {
            path: shown.to_owned(),
            found,
            supported,
        });
    }
    Ok(scripts
        .iter()
        .enumerate()
        .skip(found.max(0) as usize)
        .map(|(n, script)| (n as i64 + 1, *script)))
}

/// A new enrollment token.
#[derive(Debug, Clone)]
pub struct NewEnrollmentToken {
    /// Public id.
    pub id: String,
    /// SHA-256 of the secret.
    pub hash: [u8; 32],
    /// Label.
    pub label: String,
    /// Author.
    pub created_by: String,
    /// Expiry.
    pub expires_at: Option<Millis>,
    /// Use limit.
    pub max_uses: Option<u32>,
    /// Groups for agents enrolled with it.
    pub groups: Vec<String>,
}

/// A new login session.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// SHA-256 of the session cookie's secret.
    pub hash: [u8; 32],
    /// The user logged in.
    pub user: String,
    /// When the user logged in.
    pub created_at: Millis,
    /// When the session ends.
    pub expires_at: Millis,
}

/// A new API token.
#[derive(Debug, Clone)]
pub struct NewApiToken {
    /// Public id.
    pub id: String,
    /// SHA-256 of the secret.
    pub hash: [u8; 32],
    /// Name, shown as `token:<name>` in the audit log.
    pub name: String,
    /// When it was made.
    pub created_at: Millis,
    /// What it may do.
    pub role: Role,
    /// Who made it (`user:alice`); a token made by a user is held to that user's role.
    pub created_by: Option<String>,
}

/// An audit log entry to append.
#[derive(Debug, Clone)]
pub struct NewAuditEntry {
    /// The principal's name (`user:alice`, `token:ci`).
    pub who: String,
    /// What was done, e.g. `agent.revoke`.
    pub what: String,
    /// The details as JSON.
    pub detail: serde_json::Value,
    /// When.
    pub at: Millis,
}

/// A new agent, as enrollment records it.
#[derive(Debug, Clone)]
pub struct NewAgent {
    /// Identity id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Reported inventory.
    pub inventory: Inventory,
    /// SHA-256 of the agent's check-in secret.
    pub secret_hash: [u8; 32],
    /// The certificate issued at enrollment (recorded so that removing the agent revokes it).
    pub certificate: Option<CertificateRecord>,
}

/// A certificate issued to an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRecord {
    /// Serial number, canonical hex (`beckon_identity::certificate_serial`).
    pub serial: String,
    /// When it was issued.
    pub issued_at: Millis,
    /// End of its validity.
    pub not_after: Millis,
}

/// A removed agent's revoked credentials, as the broker's tenant file lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedAgent {
    /// The agent id.
    pub id: String,
    /// Serials of its revoked certificates still within their validity; `None`: every
    /// certificate of the id (agents enrolled before certificates were recorded).
    pub serials: Option<Vec<String>>,
    /// When it was revoked: tokens issued until then are refused; `None`: every token.
    pub revoked_at: Option<Millis>,
}

/// One entry of the revocation feed: the revoked credentials of one agent id as they are
/// now, replacing whatever an earlier entry said of that id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationChange {
    /// Feed position of the id's last change; entries are read in this order.
    pub cursor: u64,
    /// The agent id.
    pub id: String,
    /// Its revoked credentials; `None`: nothing of the id is refused any more (an agent
    /// removed before certificates were recorded that enrolled again, or whose revoked
    /// certificates have all expired).
    pub revoked: Option<RevokedCredentials>,
}

/// What a revocation refuses of one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedCredentials {
    /// The revoked certificates still valid, by serial (canonical hex) with their end of
    /// validity; `None`: every certificate of the id.
    pub certificates: Option<Vec<(String, Millis)>>,
    /// Tokens issued until then are refused; `None`: every token.
    pub revoked_at: Option<Millis>,
}

/// A page of the revocation feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationPage {
    /// The entries after the asked cursor, in cursor order.
    pub changes: Vec<RevocationChange>,
    /// The cursor to ask from next: the last entry's, or the asked one when there is none.
    pub next: u64,
    /// Whether more entries follow.
    pub more: bool,
}

/// What a check-in recorded.
#[derive(Debug, Clone)]
pub struct Checkin {
    /// The agent as it is now.
    pub agent: Agent,
    /// This check-in made the console flag the agent as cloned.
    pub newly_cloned: bool,
}

/// Filters for listing agents.
#[derive(Debug, Clone, Default)]
pub struct AgentFilter {
    /// Case-insensitive substring of the id, name, host name, addresses or MACs (literal).
    pub search: Option<String>,
    /// Member of this group.
    pub group: Option<String>,
    /// With this presence.
    pub presence: Option<Presence>,
    /// Only stale agents: not online and last seen (enrolled, checked in, presence change)
    /// before this time.
    pub stale_before: Option<Millis>,
    /// Only agents flagged as cloned (one identity on two machines).
    pub cloned: bool,
    /// Include revoked agents.
    pub include_revoked: bool,
    /// At most this many.
    pub limit: u32,
    /// Skip this many.
    pub offset: u32,
}

/// A new wake-up call with one delivery per agent.
#[derive(Debug, Clone)]
pub struct NewCall {
    /// Call id.
    pub id: String,
    /// Author.
    pub created_by: String,
    /// Reason.
    pub reason: String,
    /// Action.
    pub action: Option<String>,
    /// Who it addresses.
    pub target: CallTarget,
    /// Expiry.
    pub expires_at: Millis,
    /// Spread window in seconds; `None`: [`NewCall::default_spread`] decides.
    pub spread: Option<u32>,
    /// Without an explicit spread: calls to at least `.0` agents get `.1` seconds, smaller
    /// calls none (settings `wakeup.spread_from_agents` and `wakeup.spread_secs`).
    pub default_spread: (u32, u32),
}

/// The most deliveries of a call recorded in one transaction. A larger call's first chunk
/// is recorded with the call, and its wake-ups go out as soon as that commits; the other
/// chunks follow in transactions of their own. 4,096 rows take about 0.1 s to write into a
/// deliveries table of 10 million rows (five indexes), so the first wake-up of a call to
/// 100,000 agents goes out well within 2 s, while the chunks are large enough that a
/// transaction's commit is a small part of its cost; calls to fewer agents (the usual) are
/// one transaction, as before.
pub const CALL_CHUNK: usize = 4096;

/// A chunk of a call's deliveries just recorded ([`CallStore::record_chunk`]).
#[derive(Debug, Clone)]
pub struct RecordedChunk {
    /// The call, with its counts after the chunk.
    pub call: WakeCall,
    /// Deliveries recorded queued: their wake-ups are to go out.
    pub queued: Vec<CallDelivery>,
    /// Deliveries recorded failed: their agents were revoked after the call was made.
    pub failed: Vec<CallDelivery>,
    /// The call is dispatched by this console (else another console sends its wake-ups).
    pub dispatched_here: bool,
}

/// An ack or broker event that moves a delivery forward.
#[derive(Debug, Clone, Default)]
pub struct DeliveryUpdate {
    /// `finished` status.
    pub status: Option<String>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Duration.
    pub duration_ms: Option<u64>,
    /// Note.
    pub detail: Option<String>,
}

/// One queued state change for [`Store::advance_deliveries`].
#[derive(Debug, Clone)]
pub struct DeliveryAdvance {
    /// The agent the ack or PUBACK is about.
    pub agent_id: String,
    /// The wake-up id.
    pub wakeup_id: String,
    /// The new state.
    pub state: CallState,
    /// Ack details.
    pub update: DeliveryUpdate,
    /// When.
    pub at: Millis,
}

/// Which of a call's deliveries to read (see [`CallStore::call_deliveries`]): a page of them
/// in agent id order, those of one state only when `state` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryQuery {
    /// Only deliveries in this state.
    pub state: Option<CallState>,
    /// Only agents whose id sorts after this one (the `next_after` of the page before).
    pub after: Option<String>,
    /// At most this many, clamped to 1 to [`MAX_DELIVERY_PAGE`].
    pub limit: u32,
}

/// The most deliveries one page holds.
pub const MAX_DELIVERY_PAGE: u32 = 5_000;

/// The deliveries of a page when the request names no limit.
pub const DEFAULT_DELIVERY_PAGE: u32 = 500;

/// A page of a call's deliveries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct DeliveryPage {
    /// In agent id order.
    pub deliveries: Vec<CallDelivery>,
    /// The agent id to pass as `after` for the next page; `null` on the last page.
    pub next_after: Option<String>,
}

/// One agent's pending wake-ups: its id, then each call and delivery.
pub type AgentPending = (String, Vec<(WakeCall, CallDelivery)>);

/// A presence change to record (see [`Store::set_presence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceUpdate {
    /// The agent.
    pub agent_id: String,
    /// Online or offline.
    pub presence: Presence,
    /// When the broker saw it (unix ms).
    pub at: Millis,
    /// The connection path.
    pub path: Option<String>,
    /// The remote address.
    pub remote_addr: Option<String>,
}

/// What a failed authentication is counted against, for the throttles of
/// [`crate::guard`]: each kind counts per key of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A failed login, per user name.
    LoginUser,
    /// A failed login, per source address.
    LoginAddress,
    /// A failed enrollment (a token unknown, used up, expired or revoked), per source
    /// address.
    EnrollAddress,
}

impl FailureKind {
    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoginUser => "login_user",
            Self::LoginAddress => "login_address",
            Self::EnrollAddress => "enroll_address",
        }
    }
}

/// What a session or bearer token resolves to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Principal {
    /// Shown as `created_by` and in the audit log: `user:alice` or `token:ci`.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

/// The console's persistent state.
///
/// Made of one trait per kind of data, so that a backend implements them one by one and a
/// caller names what it uses; every backend implements all of them.
pub trait Store:
    AgentStore + CallStore + AuthStore + WolStore + SettingsStore + Send + Sync
{
}

impl<T> Store for T where
    T: AgentStore + CallStore + AuthStore + WolStore + SettingsStore + Send + Sync
{
}

/// Agents and groups: enrollment of agents, the registry, certificates, check-ins and presence.
pub trait AgentStore {
    /// Checks the token with `token_hash` and, in the same transaction, uses it once and
    /// records the agent (joining the token's groups). Refused tokens change nothing.
    fn enroll_agent(
        &self,
        token_hash: &[u8; 32],
        agent: NewAgent,
        now: Millis,
    ) -> StoreResult<Agent>;

    /// One agent (revoked ones included).
    fn agent(&self, id: &str) -> StoreResult<Agent>;

    /// Agents matching the filter, by name.
    fn list_agents(&self, filter: &AgentFilter) -> StoreResult<Vec<Agent>>;

    /// Of `ids`, the agents enrolled, not removed and not online, without their groups: the
    /// machines a call's Wake-on-LAN is for. Any number of ids, read a thousand per statement.
    fn agents_not_online(&self, ids: &[String]) -> StoreResult<Vec<Agent>>;

    /// How many non-revoked agents have this presence.
    fn count_agents(&self, presence: Presence) -> StoreResult<u64>;

    /// Folds the changes of the agents' counts by presence into the kept counts (every
    /// second, and after writing many agents at once); returns how many changes it folded.
    /// Counting reads the counts and the changes, so this only keeps the changes few.
    fn fold_agent_counts(&self) -> StoreResult<u64>;

    /// How many non-revoked agents are stale (see [`AgentFilter::stale_before`]).
    fn count_stale_agents(&self, before: Millis) -> StoreResult<u64>;

    /// Renames and/or sets the groups of an agent (groups must exist).
    fn update_agent(
        &self,
        id: &str,
        name: Option<String>,
        groups: Option<Vec<String>>,
    ) -> StoreResult<Agent>;

    /// Revokes an agent: it may no longer check in and pending deliveries fail.
    fn revoke_agent(&self, id: &str, now: Millis) -> StoreResult<()>;

    /// The revoked agents' credentials for the broker's tenant file: certificates revoked and
    /// not yet expired at `now`, and agents revoked without a recorded certificate.
    fn revocations(&self, now: Millis) -> StoreResult<Vec<RevokedAgent>>;

    /// The revocation feed after `after`: at most `limit` entries in cursor order, their
    /// certificates as valid at `now`. Every change of an id's revoked credentials (a
    /// removal, a removed id enrolling again) moves the id to a new cursor, higher than any
    /// committed before, so that a reader following `next` misses none.
    fn revocation_feed(&self, after: u64, limit: u32, now: Millis) -> StoreResult<RevocationPage>;

    /// Records a certificate issued to an enrolled, not revoked agent (renewal).
    fn record_certificate(&self, id: &str, certificate: &CertificateRecord) -> StoreResult<()>;

    /// The agent whose check-in secret hashes to `hash`, if not revoked.
    fn agent_by_secret(&self, id: &str, hash: &[u8; 32]) -> StoreResult<Agent>;

    /// Records a check-in, with the inventory if the agent sent one; `taken_over` says that
    /// the agent checks in because its push session was just taken over. Flags the agent
    /// as cloned when two machines check in by turns ([`crate::clones::judge_checkin`]).
    fn record_checkin(
        &self,
        id: &str,
        inventory: Option<Inventory>,
        taken_over: bool,
        now: Millis,
    ) -> StoreResult<Checkin>;

    /// Clears an agent's cloned flag and the machine history behind it, after one of the
    /// machines enrolled again.
    fn clear_clone_flag(&self, id: &str) -> StoreResult<Agent>;

    /// Records a presence change.
    fn set_presence(&self, update: PresenceUpdate) -> StoreResult<()> {
        self.set_presences(vec![update])
    }

    /// Marks every agent recorded `online` that is not in `still_online` as `offline` at
    /// `at` (unless a newer event is recorded): the broker's retained presence, read after
    /// the console (re)connects, is the whole truth. Returns the agents changed.
    fn reconcile_presence(&self, still_online: &[String], at: Millis) -> StoreResult<Vec<String>>;

    /// Records several presence changes in one transaction. An event older than the
    /// agent's recorded presence changes nothing.
    fn set_presences(&self, updates: Vec<PresenceUpdate>) -> StoreResult<()>;

    /// Creates a group.
    fn create_group(&self, name: &str, description: &str, now: Millis) -> StoreResult<Group>;

    /// Lists groups.
    fn list_groups(&self) -> StoreResult<Vec<Group>>;

    /// Deletes a group (agents leave it).
    fn delete_group(&self, name: &str) -> StoreResult<()>;
}

/// Wake-up calls and their per-agent deliveries.
pub trait CallStore {
    /// Records a call and one queued delivery per addressed, non-revoked agent, with fresh
    /// wake-up ids from `new_wakeup_id`; returns the deliveries recorded. Fails when the
    /// target resolves to no agent. A call to more agents than one chunk ([`CALL_CHUNK`])
    /// records its first chunk only, and keeps the other agents addressed for
    /// [`record_chunk`](Self::record_chunk).
    fn create_call(
        &self,
        call: NewCall,
        now: Millis,
        new_wakeup_id: &mut dyn FnMut() -> String,
    ) -> StoreResult<(WakeCall, Vec<CallDelivery>)> {
        let (call, deliveries, _) = self.create_call_with_target(call, now, new_wakeup_id)?;
        Ok((call, deliveries))
    }

    /// [`create_call`](Self::create_call), also returning every agent addressed (those of
    /// the chunks still to record too).
    fn create_call_with_target(
        &self,
        call: NewCall,
        now: Millis,
        new_wakeup_id: &mut dyn FnMut() -> String,
    ) -> StoreResult<(WakeCall, Vec<CallDelivery>, Vec<String>)>;

    /// The calls with agents left to record that this console records at `now`: its own
    /// (made here, or taken over), and expired calls of consoles that stopped.
    fn calls_to_record(&self, now: Millis) -> StoreResult<Vec<String>>;

    /// Records the next chunk of a call's agents (one transaction: the deliveries, the
    /// call's counts, and the chunk taken off what is left to record), each agent once
    /// however many consoles record at once or how often one is cut off. `None` once
    /// nothing is left. Comes back empty (nothing recorded) for a chunk another console
    /// recorded meanwhile, and for an unexpired call another console dispatches
    /// (`dispatched_here` false): only the dispatcher records those, as it sends them.
    fn record_chunk(
        &self,
        call_id: &str,
        now: Millis,
        new_wakeup_id: &mut dyn FnMut() -> String,
    ) -> StoreResult<Option<RecordedChunk>>;

    /// Whether every store call goes through one connection (SQLite): recording a large
    /// call chunk after chunk there keeps everything else out meanwhile, unlike on a pool of
    /// connections (PostgreSQL).
    fn shares_one_connection(&self) -> bool;

    /// One call, with its counts.
    fn call(&self, id: &str) -> StoreResult<WakeCall>;

    /// A page of a call's deliveries (an index range however many the call has).
    fn call_deliveries(&self, id: &str, query: &DeliveryQuery) -> StoreResult<DeliveryPage>;

    /// Calls, newest first.
    fn list_calls(&self, limit: u32) -> StoreResult<Vec<WakeCall>>;

    /// Moves the agent's delivery with the advance's wake-up id (and those it carried) to the
    /// advance's state if that is progress; returns the deliveries that changed.
    fn advance_delivery(&self, advance: DeliveryAdvance) -> StoreResult<Vec<CallDelivery>> {
        self.advance_deliveries(vec![advance])
    }

    /// Several [`advance_delivery`](Self::advance_delivery) in one transaction (one commit
    /// for a burst of PUBACKs or acks); returns every delivery that changed.
    fn advance_deliveries(&self, batch: Vec<DeliveryAdvance>) -> StoreResult<Vec<CallDelivery>>;

    /// Deliveries of an agent not yet delivered (queued or sent) and not expired at `now`,
    /// with their calls, oldest first.
    fn pending_for_agent(
        &self,
        agent_id: &str,
        now: Millis,
    ) -> StoreResult<Vec<(WakeCall, CallDelivery)>>;

    /// Every agent with a queued delivery not expired at `now`.
    /// [`pending_for_agent`](Self::pending_for_agent) for several agents at once (one trip
    /// to the store for a batch of agents coming online).
    fn pending_for_agents(
        &self,
        agent_ids: &[String],
        now: Millis,
    ) -> StoreResult<Vec<AgentPending>> {
        let mut out = Vec::with_capacity(agent_ids.len());
        for id in agent_ids {
            let pending = self.pending_for_agent(id, now)?;
            if !pending.is_empty() {
                out.push((id.clone(), pending));
            }
        }
        Ok(out)
    }

    fn agents_with_queued(&self, now: Millis) -> StoreResult<Vec<String>>;

    /// Records that the deliveries `carried` went out inside the message of `carrier`.
    fn set_carried_by(&self, carried: &[String], carrier: &str) -> StoreResult<()>;

    /// Marks queued or sent deliveries whose call expired by `now` as expired.
    fn expire_due(&self, now: Millis) -> StoreResult<Vec<CallDelivery>>;

    /// How many deliveries are in each state, in [`CallState::ALL`]'s order (the metrics),
    /// from the counts each call keeps.
    fn count_deliveries(&self) -> StoreResult<[u64; 7]>;

    /// Holds or renews this console's dispatch lease until `now + lease`: true while it is
    /// this process's, false while another process with the same console id holds it
    /// unexpired. A console whose lease runs out loses its unfinished calls to
    /// [`take_over_calls`](Self::take_over_calls) of another.
    fn hold_lease(&self, now: Millis, lease: Millis) -> StoreResult<bool>;

    /// Makes this console the dispatcher of the unexpired calls of consoles whose lease ran
    /// out by `now` (and of calls no console dispatches, from before several consoles); of
    /// consoles taking over at once, each call goes to one. Says which, and the agents that
    /// still wait for their wake-ups (queued or sent), by presence.
    fn take_over_calls(&self, now: Millis) -> StoreResult<Takeover>;

    /// Hands `on_change` the delivery changes other consoles on this database write, as
    /// they commit, until `stop` (blocking; returns at once on SQLite, which one console uses
    /// alone).
    fn follow_changes(
        &self,
        on_change: &mut dyn FnMut(Vec<DeliveryChange>),
        stop: &std::sync::atomic::AtomicBool,
    ) -> StoreResult<()>;
}

/// What [`CallStore::take_over_calls`] took over.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Takeover {
    /// The calls, each with the console it was taken from (`None`: no console had it).
    pub calls: Vec<(String, Option<String>)>,
    /// Online agents with wake-ups of these calls still queued or sent.
    pub online: Vec<String>,
    /// The other agents with wake-ups of these calls still queued or sent.
    pub offline: Vec<String>,
}

/// A delivery's new state, as another console wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryChange {
    /// The call.
    pub call_id: String,
    /// The agent.
    pub agent_id: String,
    /// The new state.
    pub state: CallState,
}

/// Who may do what: users and their sessions, API tokens and enrollment tokens.
pub trait AuthStore {
    /// Records a new enrollment token; its groups must exist.
    fn create_enrollment_token(&self, token: NewEnrollmentToken) -> StoreResult<EnrollmentToken>;

    /// Lists tokens, newest first.
    fn list_enrollment_tokens(&self) -> StoreResult<Vec<EnrollmentToken>>;

    /// Revokes a token.
    fn revoke_enrollment_token(&self, id: &str) -> StoreResult<()>;

    /// Refuses (like [`enroll_agent`](AgentStore::enroll_agent)) an enrollment token that is
    /// unknown, revoked, expired at `now` or used up; uses nothing up. Checked before the CA
    /// signs anything.
    fn check_enrollment_token(&self, token_hash: &[u8; 32], now: Millis) -> StoreResult<()>;

    /// Creates a user with a password hash (PHC string) and a role.
    fn create_user(
        &self,
        name: &str,
        password_hash: &str,
        role: Role,
        now: Millis,
    ) -> StoreResult<()>;

    /// Lists users by name.
    fn list_users(&self) -> StoreResult<Vec<User>>;

    /// Changes a user's role; refuses (conflict) to leave the console without an admin.
    /// Returns the role before.
    fn set_user_role(&self, name: &str, role: Role) -> StoreResult<Role>;

    /// Records a user who signed in through single sign-on with the role their claim maps
    /// to: made on first sign-in, the role replaced on each. Refuses (conflict) a name a
    /// local user has. Returns the role before, `None` for a new user.
    fn sign_in_sso_user(&self, name: &str, role: Role, now: Millis) -> StoreResult<Option<Role>>;

    /// Replaces a user's password hash and ends all of the user's sessions.
    fn set_password(&self, name: &str, password_hash: &str) -> StoreResult<()>;

    /// How many users exist.
    fn user_count(&self) -> StoreResult<u64>;

    /// A user's password hash.
    fn password_hash(&self, name: &str) -> StoreResult<String>;

    /// Replaces a user's password hash by a new hash of the same password (a stored format
    /// upgrade), only while the stored hash is still `current`; the sessions stay. Returns
    /// whether it was replaced.
    fn upgrade_password_hash(&self, name: &str, current: &str, upgraded: &str)
    -> StoreResult<bool>;

    /// Records a login session (and clears the sessions ended by its creation time).
    fn create_session(&self, session: NewSession) -> StoreResult<()>;

    /// The user of a live session.
    fn session(&self, hash: &[u8; 32], now: Millis) -> StoreResult<Principal>;

    /// Records a use of the session `hash` at `now` (whatever its last use was).
    fn record_session_use(&self, hash: &[u8; 32], now: Millis) -> StoreResult<()>;

    /// A use of the session `hash` at `now`: recorded, and true, if its recorded last use
    /// (on any console) is within `idle` of `now`; false if it has been idle longer.
    fn resume_session(&self, hash: &[u8; 32], now: Millis, idle: Millis) -> StoreResult<bool>;

    /// Ends a session.
    fn delete_session(&self, hash: &[u8; 32]) -> StoreResult<()>;

    /// Records an API token.
    fn create_api_token(&self, token: NewApiToken) -> StoreResult<ApiToken>;

    /// The principal of a live API token, its role held to its creating user's current one.
    fn api_token(&self, hash: &[u8; 32]) -> StoreResult<Principal>;

    /// Lists API tokens.
    fn list_api_tokens(&self) -> StoreResult<Vec<ApiToken>>;

    /// Revokes an API token.
    fn revoke_api_token(&self, id: &str) -> StoreResult<()>;

    /// Records a failed authentication of `key` at `at` and returns how many failures of
    /// it are after `since` (this one included), in one transaction that also deletes its
    /// failures at or before `since`. Every console on the database counts the same rows.
    fn record_auth_failure(
        &self,
        kind: FailureKind,
        key: &str,
        at: Millis,
        since: Millis,
    ) -> StoreResult<u64>;

    /// The times of the newest `limit` failures of `key` after `since`, newest first: fewer
    /// than `limit` while `key` has fewer; else the last one is the failure whose leaving
    /// the window brings `key` below `limit`.
    fn recent_auth_failures(
        &self,
        kind: FailureKind,
        key: &str,
        since: Millis,
        limit: u32,
    ) -> StoreResult<Vec<Millis>>;

    /// Forgets the failures of `key` (after a success).
    fn clear_auth_failures(&self, kind: FailureKind, key: &str) -> StoreResult<()>;

    /// Deletes up to `limit` failures (of any key) at or before `before`, found by their
    /// time's index; returns how many it deleted.
    fn prune_auth_failures(&self, before: Millis, limit: u32) -> StoreResult<u64>;
}

/// Wake-on-LAN sends, by the console and relayed by agents.
pub trait WolStore {
    /// Records a Wake-on-LAN send.
    fn record_wol_send(&self, send: &WolSend) -> StoreResult<()>;

    /// Records an agent's answer to relay request `relay_id`: each (MAC, destination,
    /// packets, error) on the send recorded for that MAC. Only the agent the request went
    /// to can answer it. Returns the sends updated.
    fn record_relay_result(
        &self,
        via_agent: &str,
        relay_id: &str,
        sends: &[(String, String, u32, Option<String>)],
    ) -> StoreResult<Vec<WolSend>>;

    /// Marks the sends of relay request `relay_id` as failed with `error`.
    fn fail_relay(&self, relay_id: &str, error: &str) -> StoreResult<()>;

    /// Wake-on-LAN sends for an agent, newest first.
    fn wol_sends(&self, agent_id: &str, limit: u32) -> StoreResult<Vec<WolSend>>;

    /// Every online, not revoked agent with its addresses and when it came online: the agents
    /// a relay can be chosen from ([`crate::wol::RelayIndex`]). One read for the whole fleet,
    /// without groups, so that a call waking thousands of machines reads it once.
    fn relay_candidates(&self) -> StoreResult<Vec<RelayCandidate>>;
}

/// Settings and the audit log.
pub trait SettingsStore {
    /// Current settings (defaults for groups never set).
    fn settings(&self) -> StoreResult<Settings>;

    /// Replaces settings, writing one audit entry per changed group, in one transaction.
    fn put_settings(&self, settings: &Settings, who: &str, now: Millis) -> StoreResult<Settings>;

    /// Appends an audit entry.
    fn audit(&self, entry: NewAuditEntry) -> StoreResult<()>;

    /// Audit entries, newest first.
    fn audit_log(&self, limit: u32) -> StoreResult<Vec<AuditEntry>>;
}

/// A shared store for async code: each call runs on the blocking pool, so SQLite's
/// `fsync` never stalls the runtime's worker threads.
#[derive(Clone)]
pub struct StoreHandle {
    store: Arc<dyn Store>,
    metrics: Arc<crate::metrics::ConsoleMetrics>,
}

impl StoreHandle {
    /// Wraps a store; every [`run`](Self::run) is timed into `metrics`.
    pub fn new(store: Arc<dyn Store>, metrics: Arc<crate::metrics::ConsoleMetrics>) -> Self {
        Self { store, metrics }
    }

    /// The store itself, for synchronous callers.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Runs `f` with the store on the blocking pool.
    pub async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> StoreResult<T> + Send + 'static,
    {
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = f(store.as_ref());
            metrics.database_call(started.elapsed(), result.as_ref().err());
            result
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}
