//! The SQLite store.
//!
//! - **Migrations** are numbered SQL scripts applied in order at open, tracked by
//!   `PRAGMA user_version` inside the same transaction as the script; a database with a higher
//!   version than this build knows is refused (never "upgraded down").
//! - **WAL mode**: readers do not block the writer, and a crashed process leaves a database
//!   that SQLite recovers on the next open.
//! - **`synchronous = NORMAL`**: in WAL mode every committed transaction survives the process
//!   being killed (the WAL is written before `COMMIT` returns); only an operating-system crash
//!   or power loss can lose the last few commits, never corrupt the file. `FULL` would add an
//!   `fsync` per commit, which at fleet scale (tens of thousands of acks per call) costs more
//!   than re-sending a wake-up after a power cut.
//! - The file is created with mode 0600 before SQLite opens it; SQLite gives its `-wal` and
//!   `-shm` files the same mode.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

use super::*;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 3;

/// Schema scripts: `MIGRATIONS[n]` moves version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    label TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    expires_at INTEGER,
    max_uses INTEGER,
    uses INTEGER NOT NULL DEFAULT 0,
    groups TEXT NOT NULL DEFAULT '[]',
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hostname TEXT NOT NULL,
    os TEXT NOT NULL,
    addresses TEXT NOT NULL,
    macs TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    enrolled_with TEXT,
    secret_hash BLOB NOT NULL,
    last_checkin INTEGER,
    presence TEXT NOT NULL DEFAULT 'unknown',
    presence_at INTEGER,
    path TEXT,
    remote_addr TEXT,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE groups (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE agent_groups (
    agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    group_name TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    PRIMARY KEY (agent_id, group_name)
);
CREATE INDEX agent_groups_group ON agent_groups(group_name);
CREATE TABLE calls (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    action TEXT,
    target TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    spread INTEGER NOT NULL
);
CREATE TABLE deliveries (
    wakeup_id TEXT PRIMARY KEY,
    call_id TEXT NOT NULL REFERENCES calls(id) ON DELETE CASCADE,
    agent_id TEXT NOT NULL,
    state TEXT NOT NULL,
    queued_at INTEGER NOT NULL,
    sent_at INTEGER,
    delivered_at INTEGER,
    started_at INTEGER,
    finished_at INTEGER,
    status TEXT,
    exit_code INTEGER,
    duration_ms INTEGER,
    detail TEXT,
    carried_by TEXT
);
CREATE INDEX deliveries_call ON deliveries(call_id);
CREATE INDEX deliveries_agent_state ON deliveries(agent_id, state);
CREATE INDEX deliveries_carried_by ON deliveries(carried_by);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    who TEXT NOT NULL,
    what TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE sessions (
    hash BLOB PRIMARY KEY,
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE wol_sends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL,
    call_id TEXT,
    mac TEXT NOT NULL,
    destination TEXT NOT NULL,
    at INTEGER NOT NULL,
    packets INTEGER NOT NULL,
    error TEXT
);
CREATE INDEX wol_sends_agent ON wol_sends(agent_id, at);
"#,
    r#"
-- Version 2: the certificates issued to agents, so that removing an agent revokes them by
-- serial (the broker's tenant file lists them) while the id may enroll again afresh.
CREATE TABLE agent_certificates (
    serial TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    issued_at INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX agent_certificates_by_agent ON agent_certificates (agent_id);
ALTER TABLE agents ADD COLUMN revoked_at INTEGER;
"#,
    r#"
-- Version 3: Wake-on-LAN sends relayed by an agent.
ALTER TABLE wol_sends ADD COLUMN via_agent TEXT;
ALTER TABLE wol_sends ADD COLUMN relay_id TEXT;
ALTER TABLE wol_sends ADD COLUMN relay_state TEXT;
CREATE INDEX wol_sends_relay ON wol_sends(relay_id);
"#,
];

/// The SQLite store (one connection behind a mutex: SQLite serializes writers anyway, and the
/// console's reads are short).
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { context, source }
}

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// A list as stored: JSON text. A value that cannot be encoded fails the write instead of
/// storing an empty list in its place.
fn to_json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|source| StoreError::Encode {
        context: "a list",
        source,
    })
}

impl SqliteStore {
    /// Opens (creating with mode 0600 if missing) and migrates the database at `path`.
    pub fn open(path: &Path) -> StoreResult<Self> {
        create_private_file(path)?;
        let conn = Connection::open(path).map_err(sql("opening the database"))?;
        Self::setup(conn, &path.display().to_string())
    }

    /// An in-memory database (tests).
    pub fn open_in_memory() -> StoreResult<Self> {
        let conn = Connection::open_in_memory().map_err(sql("opening the database"))?;
        Self::setup(conn, ":memory:")
    }

    fn setup(mut conn: Connection, shown_path: &str) -> StoreResult<Self> {
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("setting the busy timeout"))?;
        // `journal_mode` returns a row, so it is read rather than executed.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql("switching to WAL mode"))?;
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(sql("setting pragmas"))?;
        migrate(&mut conn, shown_path)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the transaction rolls back
        // on drop), so the poisoned connection is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> StoreResult<i64> {
        self.conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql("reading the schema version"))
    }
}

fn create_private_file(path: &Path) -> StoreResult<()> {
    use std::fs::OpenOptions;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    options.mode(0o600);
    options
        .open(path)
        .map(drop)
        .map_err(|source| StoreError::Io {
            context: "cannot create the database file",
            path: path.display().to_string(),
            source,
        })
}

fn migrate(conn: &mut Connection, shown_path: &str) -> StoreResult<()> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql("reading the schema version"))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: shown_path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (version, script) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let tx = conn
            .transaction()
            .map_err(sql("starting a schema migration"))?;
        tx.execute_batch(script)
            .map_err(sql("applying a schema migration"))?;
        tx.pragma_update(None, "user_version", version as i64 + 1)
            .map_err(sql("recording the schema version"))?;
        tx.commit().map_err(sql("committing a schema migration"))?;
    }
    Ok(())
}

fn insert_certificate(tx: &Transaction<'_>, agent: &str, c: &CertificateRecord) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO agent_certificates (serial, agent_id, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
        params![c.serial, agent, c.issued_at, c.not_after],
    )
    .map_err(sql("recording an agent certificate"))?;
    Ok(())
}

const AGENT_COLUMNS: &str = "id, name, hostname, os, addresses, macs, enrolled_at, last_checkin, presence, presence_at, path, remote_addr, revoked";

fn agent_from_row(row: &Row<'_>) -> rusqlite::Result<Agent> {
    let addresses: String = row.get(4)?;
    let macs: String = row.get(5)?;
    let presence: String = row.get(8)?;
    Ok(Agent {
        id: row.get(0)?,
        name: row.get(1)?,
        inventory: Inventory {
            hostname: row.get(2)?,
            os: row.get(3)?,
            addresses: serde_json::from_str(&addresses).unwrap_or_default(),
            macs: json_list(&macs),
        },
        groups: Vec::new(),
        enrolled_at: row.get(6)?,
        last_checkin: row.get(7)?,
        presence: Presence::parse(&presence).unwrap_or(Presence::Unknown),
        presence_at: row.get(9)?,
        path: row.get(10)?,
        remote_addr: row.get(11)?,
        revoked: row.get(12)?,
    })
}

fn fill_groups(conn: &Connection, agent: &mut Agent) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "SELECT group_name FROM agent_groups WHERE agent_id = ?1 ORDER BY group_name",
    )?;
    agent.groups = stmt
        .query_map([&agent.id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(())
}

fn load_agent(conn: &Connection, id: &str) -> StoreResult<Agent> {
    let mut agent = conn
        .query_row(
            &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?1"),
            [id],
            agent_from_row,
        )
        .optional()
        .map_err(sql("reading an agent"))?
        .ok_or_else(|| StoreError::NotFound {
            what: "agent",
            id: id.to_owned(),
        })?;
    fill_groups(conn, &mut agent).map_err(sql("reading an agent's groups"))?;
    Ok(agent)
}

fn check_groups_exist(conn: &Connection, groups: &[String]) -> StoreResult<()> {
    for g in groups {
        let exists: bool = conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM groups WHERE name = ?1)",
                [g],
                |r| r.get(0),
            )
            .map_err(sql("checking a group"))?;
        if !exists {
            return Err(StoreError::Invalid(format!(
                "group {g:?} does not exist: create it first (POST /api/v1/groups)"
            )));
        }
    }
    Ok(())
}

fn set_groups(tx: &Transaction<'_>, agent_id: &str, groups: &[String]) -> StoreResult<()> {
    check_groups_exist(tx, groups)?;
    tx.execute("DELETE FROM agent_groups WHERE agent_id = ?1", [agent_id])
        .map_err(sql("updating an agent's groups"))?;
    for g in groups {
        tx.execute(
            "INSERT OR IGNORE INTO agent_groups (agent_id, group_name) VALUES (?1, ?2)",
            params![agent_id, g],
        )
        .map_err(sql("updating an agent's groups"))?;
    }
    Ok(())
}

fn token_from_row(row: &Row<'_>) -> rusqlite::Result<EnrollmentToken> {
    let groups: String = row.get(7)?;
    Ok(EnrollmentToken {
        id: row.get(0)?,
        label: row.get(1)?,
        created_at: row.get(2)?,
        created_by: row.get(3)?,
        expires_at: row.get(4)?,
        max_uses: row.get(5)?,
        uses: row.get(6)?,
        groups: json_list(&groups),
        revoked: row.get(8)?,
    })
}

const TOKEN_COLUMNS: &str =
    "id, label, created_at, created_by, expires_at, max_uses, uses, groups, revoked";

const CALL_COLUMNS: &str = "id, created_at, created_by, reason, action, target, expires_at, spread";

fn call_from_row(row: &Row<'_>) -> rusqlite::Result<WakeCall> {
    Ok(WakeCall {
        id: row.get(0)?,
        created_at: row.get(1)?,
        created_by: row.get(2)?,
        reason: row.get(3)?,
        action: row.get(4)?,
        target: row.get(5)?,
        expires_at: row.get(6)?,
        spread: row.get(7)?,
        counts: Default::default(),
    })
}

fn fill_counts(conn: &Connection, call: &mut WakeCall) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "SELECT state, COUNT(*) FROM deliveries WHERE call_id = ?1 GROUP BY state",
    )?;
    let rows = stmt.query_map([&call.id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?))
    })?;
    for row in rows {
        let (state, n) = row?;
        if let Some(state) = CallState::parse(&state) {
            call.counts.insert(state, n);
        }
    }
    Ok(())
}

const DELIVERY_COLUMNS: &str = "call_id, agent_id, wakeup_id, state, queued_at, sent_at, delivered_at, started_at, finished_at, status, exit_code, duration_ms, detail, carried_by";

fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<CallDelivery> {
    let state: String = row.get(3)?;
    Ok(CallDelivery {
        call_id: row.get(0)?,
        agent_id: row.get(1)?,
        wakeup_id: row.get(2)?,
        state: CallState::parse(&state).unwrap_or(CallState::Failed),
        queued_at: row.get(4)?,
        sent_at: row.get(5)?,
        delivered_at: row.get(6)?,
        started_at: row.get(7)?,
        finished_at: row.get(8)?,
        status: row.get(9)?,
        exit_code: row.get(10)?,
        duration_ms: row.get::<_, Option<i64>>(11)?.map(|d| d.max(0) as u64),
        detail: row.get(12)?,
        carried_by: row.get(13)?,
    })
}

fn load_call(conn: &Connection, id: &str) -> StoreResult<WakeCall> {
    let mut call = conn
        .query_row(
            &format!("SELECT {CALL_COLUMNS} FROM calls WHERE id = ?1"),
            [id],
            call_from_row,
        )
        .optional()
        .map_err(sql("reading a call"))?
        .ok_or_else(|| StoreError::NotFound {
            what: "wake-up call",
            id: id.to_owned(),
        })?;
    fill_counts(conn, &mut call).map_err(sql("counting a call's states"))?;
    Ok(call)
}

fn state_column(state: CallState) -> Option<&'static str> {
    match state {
        CallState::Queued => None,
        CallState::Sent => Some("sent_at"),
        CallState::Delivered => Some("delivered_at"),
        CallState::Started => Some("started_at"),
        CallState::Finished | CallState::Expired | CallState::Failed => Some("finished_at"),
    }
}

fn advance_in(
    tx: &Transaction<'_>,
    agent_id: &str,
    wakeup_id: &str,
    state: CallState,
    update: &DeliveryUpdate,
    at: Millis,
) -> StoreResult<Vec<CallDelivery>> {
    let candidates: Vec<CallDelivery> = {
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE (wakeup_id = ?1 OR carried_by = ?1) AND agent_id = ?2"
            ))
            .map_err(sql("reading a delivery"))?;
        stmt.query_map([wakeup_id, agent_id], delivery_from_row)
            .and_then(|rows| rows.collect::<rusqlite::Result<_>>())
            .map_err(sql("reading a delivery"))?
    };
    let mut changed = Vec::new();
    for mut d in candidates {
        if !d.state.may_become(state) {
            continue;
        }
        let set_time = state_column(state)
            .map(|c| format!(", {c} = ?2"))
            .unwrap_or_default();
        tx.prepare_cached(&format!(
            "UPDATE deliveries SET state = ?1{set_time}, status = COALESCE(?3, status), exit_code = COALESCE(?4, exit_code), duration_ms = COALESCE(?5, duration_ms), detail = COALESCE(?6, detail) WHERE wakeup_id = ?7"
        ))
        .and_then(|mut stmt| {
            stmt.execute(params![
                state.as_str(),
                at,
                update.status,
                update.exit_code,
                update.duration_ms.map(|d| i64::try_from(d).unwrap_or(i64::MAX)),
                update.detail,
                d.wakeup_id
            ])
        })
        .map_err(sql("updating a delivery"))?;
        d.state = state;
        match state {
            CallState::Sent => d.sent_at = Some(at),
            CallState::Delivered => d.delivered_at = Some(at),
            CallState::Started => d.started_at = Some(at),
            CallState::Finished | CallState::Expired | CallState::Failed => {
                d.finished_at = Some(at)
            }
            CallState::Queued => {}
        }
        changed.push(d);
    }
    Ok(changed)
}

impl Store for SqliteStore {
    fn create_enrollment_token(&self, t: NewEnrollmentToken) -> StoreResult<EnrollmentToken> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        check_groups_exist(&tx, &t.groups)?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO enrollment_tokens (id, hash, label, created_at, created_by, expires_at, max_uses, groups) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![t.id, &t.hash[..], t.label, now, t.created_by, t.expires_at, t.max_uses, to_json(&t.groups)?],
        )
        .map_err(sql("recording an enrollment token"))?;
        tx.commit().map_err(sql("recording an enrollment token"))?;
        Ok(EnrollmentToken {
            id: t.id,
            label: t.label,
            created_at: now,
            created_by: t.created_by,
            expires_at: t.expires_at,
            max_uses: t.max_uses,
            uses: 0,
            groups: t.groups,
            revoked: false,
        })
    }

    fn list_enrollment_tokens(&self) -> StoreResult<Vec<EnrollmentToken>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {TOKEN_COLUMNS} FROM enrollment_tokens ORDER BY created_at DESC, id"
            ))
            .map_err(sql("listing enrollment tokens"))?;
        stmt.query_map([], token_from_row)
            .and_then(|rows| rows.collect())
            .map_err(sql("listing enrollment tokens"))
    }

    fn revoke_enrollment_token(&self, id: &str) -> StoreResult<()> {
        let n = self
            .conn()
            .execute(
                "UPDATE enrollment_tokens SET revoked = 1 WHERE id = ?1",
                [id],
            )
            .map_err(sql("revoking an enrollment token"))?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "enrollment token",
                id: id.to_owned(),
            });
        }
        Ok(())
    }

    fn enroll_agent(
        &self,
        token_hash: &[u8; 32],
        agent: NewAgent,
        now: Millis,
    ) -> StoreResult<Agent> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let token = tx
            .query_row(
                &format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE hash = ?1"),
                [&token_hash[..]],
                token_from_row,
            )
            .optional()
            .map_err(sql("reading an enrollment token"))?
            .ok_or_else(|| {
                StoreError::Refused(
                    "the enrollment token is not known: check it, or ask an administrator for a new one".into(),
                )
            })?;
        if token.revoked {
            return Err(StoreError::Refused(
                "the enrollment token was revoked: ask an administrator for a new one".into(),
            ));
        }
        if token.expires_at.is_some_and(|e| e <= now) {
            return Err(StoreError::Refused(
                "the enrollment token has expired: ask an administrator for a new one".into(),
            ));
        }
        if token.max_uses.is_some_and(|m| token.uses >= m) {
            return Err(StoreError::Refused(
                "the enrollment token has been used up: ask an administrator for a new one".into(),
            ));
        }
        let existing: Option<bool> = tx
            .query_row(
                "SELECT revoked FROM agents WHERE id = ?1",
                [&agent.id],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("checking an agent id"))?;
        match existing {
            Some(false) => {
                return Err(StoreError::Conflict(format!(
                    "an agent with id {:?} is already enrolled: delete it first (DELETE /api/v1/agents/{}) or enroll with another id",
                    agent.id, agent.id
                )));
            }
            Some(true) => {
                // A revoked agent re-enrolling: start afresh under the same id.
                tx.execute("DELETE FROM agents WHERE id = ?1", [&agent.id])
                    .map_err(sql("replacing a revoked agent"))?;
            }
            None => {}
        }
        tx.execute(
            "INSERT INTO agents (id, name, hostname, os, addresses, macs, enrolled_at, enrolled_with, secret_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                agent.id,
                agent.name,
                agent.inventory.hostname,
                agent.inventory.os,
                to_json(&agent.inventory.addresses)?,
                to_json(&agent.inventory.macs)?,
                now,
                token.id,
                &agent.secret_hash[..]
            ],
        )
        .map_err(sql("recording an agent"))?;
        tx.execute(
            "UPDATE enrollment_tokens SET uses = uses + 1 WHERE id = ?1",
            [&token.id],
        )
        .map_err(sql("using an enrollment token"))?;
        if let Some(c) = &agent.certificate {
            insert_certificate(&tx, &agent.id, c)?;
        }
        set_groups(&tx, &agent.id, &token.groups)?;
        let stored = load_agent(&tx, &agent.id)?;
        tx.commit().map_err(sql("committing an enrollment"))?;
        Ok(stored)
    }

    fn agent(&self, id: &str) -> StoreResult<Agent> {
        load_agent(&self.conn(), id)
    }

    fn list_agents(&self, f: &AgentFilter) -> StoreResult<Vec<Agent>> {
        let conn = self.conn();
        let mut where_ = vec!["1 = 1".to_owned()];
        let mut args: Vec<String> = Vec::new();
        if !f.include_revoked {
            where_.push("revoked = 0".into());
        }
        if let Some(s) = &f.search {
            args.push(format!("%{}%", s.replace(['%', '_'], "")));
            let n = args.len();
            where_.push(format!(
                "(id LIKE ?{n} OR name LIKE ?{n} OR hostname LIKE ?{n} OR addresses LIKE ?{n} OR macs LIKE ?{n})"
            ));
        }
        if let Some(g) = &f.group {
            args.push(g.clone());
            where_.push(format!(
                "id IN (SELECT agent_id FROM agent_groups WHERE group_name = ?{})",
                args.len()
            ));
        }
        if let Some(p) = f.presence {
            args.push(p.as_str().to_owned());
            where_.push(format!("presence = ?{}", args.len()));
        }
        let limit = if f.limit == 0 { 1000 } else { f.limit };
        let query = format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE {} ORDER BY name, id LIMIT {limit} OFFSET {}",
            where_.join(" AND "),
            f.offset
        );
        let mut stmt = conn.prepare(&query).map_err(sql("listing agents"))?;
        let mut agents: Vec<Agent> = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), agent_from_row)
            .and_then(|rows| rows.collect())
            .map_err(sql("listing agents"))?;
        for a in &mut agents {
            fill_groups(&conn, a).map_err(sql("reading an agent's groups"))?;
        }
        Ok(agents)
    }

    fn count_agents(&self, presence: Presence) -> StoreResult<u64> {
        self.conn()
            .query_row(
                "SELECT COUNT(*) FROM agents WHERE revoked = 0 AND presence = ?1",
                [presence.as_str()],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(sql("counting agents"))
    }

    fn update_agent(
        &self,
        id: &str,
        name: Option<String>,
        groups: Option<Vec<String>>,
    ) -> StoreResult<Agent> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let current = load_agent(&tx, id)?;
        if current.revoked {
            return Err(StoreError::NotFound {
                what: "agent",
                id: id.to_owned(),
            });
        }
        if let Some(name) = name {
            tx.execute(
                "UPDATE agents SET name = ?1 WHERE id = ?2",
                params![name, id],
            )
            .map_err(sql("renaming an agent"))?;
        }
        if let Some(groups) = groups {
            set_groups(&tx, id, &groups)?;
        }
        let agent = load_agent(&tx, id)?;
        tx.commit().map_err(sql("updating an agent"))?;
        Ok(agent)
    }

    fn revoke_agent(&self, id: &str, now: Millis) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let n = tx
            .execute(
                "UPDATE agents SET revoked = 1, revoked_at = ?2 WHERE id = ?1 AND revoked = 0",
                params![id, now],
            )
            .map_err(sql("revoking an agent"))?;
        if n > 0 {
            tx.execute(
                "UPDATE agent_certificates SET revoked_at = ?2 WHERE agent_id = ?1 AND revoked_at IS NULL",
                params![id, now],
            )
            .map_err(sql("revoking an agent's certificates"))?;
        }
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "agent",
                id: id.to_owned(),
            });
        }
        tx.execute(
            "UPDATE deliveries SET state = 'failed', finished_at = ?1, detail = 'the agent was revoked' WHERE agent_id = ?2 AND state IN ('queued', 'sent', 'delivered', 'started')",
            params![now, id],
        )
        .map_err(sql("failing a revoked agent's wake-ups"))?;
        tx.commit().map_err(sql("revoking an agent"))?;
        Ok(())
    }

    fn revocations(&self, now: Millis) -> StoreResult<Vec<RevokedAgent>> {
        let conn = self.conn();
        let mut out: std::collections::BTreeMap<String, RevokedAgent> = Default::default();
        // Certificates past their end need no listing: the broker refuses them anyway.
        let mut stmt = conn
            .prepare(
                "SELECT agent_id, serial, revoked_at FROM agent_certificates WHERE revoked_at IS NOT NULL AND not_after > ?1 ORDER BY agent_id, serial",
            )
            .map_err(sql("reading revoked certificates"))?;
        let rows = stmt
            .query_map([now], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Millis>(2)?,
                ))
            })
            .map_err(sql("reading revoked certificates"))?;
        for row in rows {
            let (agent, serial, at) = row.map_err(sql("reading revoked certificates"))?;
            let entry = out.entry(agent.clone()).or_insert_with(|| RevokedAgent {
                id: agent,
                serials: Some(Vec::new()),
                revoked_at: Some(at),
            });
            if let Some(s) = entry.serials.as_mut() {
                s.push(serial);
            }
            entry.revoked_at = entry.revoked_at.max(Some(at));
        }
        // Agents revoked without a recorded certificate (enrolled before certificates were
        // recorded): every credential of the id is refused until it enrolls again.
        let mut stmt = conn
            .prepare(
                "SELECT a.id, a.revoked_at FROM agents a WHERE a.revoked = 1 AND NOT EXISTS (SELECT 1 FROM agent_certificates c WHERE c.agent_id = a.id) ORDER BY a.id",
            )
            .map_err(sql("reading revoked agents"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<Millis>>(1)?))
            })
            .map_err(sql("reading revoked agents"))?;
        for row in rows {
            let (agent, _) = row.map_err(sql("reading revoked agents"))?;
            out.insert(
                agent.clone(),
                RevokedAgent {
                    id: agent,
                    serials: None,
                    revoked_at: None,
                },
            );
        }
        Ok(out.into_values().collect())
    }

    fn record_certificate(&self, id: &str, certificate: &CertificateRecord) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let revoked: Option<bool> = tx
            .query_row("SELECT revoked FROM agents WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql("checking an agent"))?;
        if revoked != Some(false) {
            return Err(StoreError::NotFound {
                what: "agent",
                id: id.to_owned(),
            });
        }
        insert_certificate(&tx, id, certificate)?;
        tx.commit().map_err(sql("recording a certificate"))?;
        Ok(())
    }

    fn agent_by_secret(&self, id: &str, hash: &[u8; 32]) -> StoreResult<Agent> {
        let conn = self.conn();
        let stored: Option<(Vec<u8>, bool)> = conn
            .query_row(
                "SELECT secret_hash, revoked FROM agents WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("checking an agent's secret"))?;
        let refused = || {
            StoreError::Refused(format!(
                "agent {id:?} is not enrolled or its check-in token is wrong: enroll the agent again"
            ))
        };
        let (stored, revoked) = stored.ok_or_else(refused)?;
        if revoked || aws_lc_rs::constant_time::verify_slices_are_equal(&stored, &hash[..]).is_err()
        {
            return Err(refused());
        }
        load_agent(&conn, id)
    }

    fn record_checkin(
        &self,
        id: &str,
        inventory: Option<Inventory>,
        now: Millis,
    ) -> StoreResult<Agent> {
        let conn = self.conn();
        let n = match inventory {
            Some(inv) => conn.execute(
                "UPDATE agents SET last_checkin = ?1, hostname = ?2, os = ?3, addresses = ?4, macs = ?5 WHERE id = ?6 AND revoked = 0",
                params![now, inv.hostname, inv.os, to_json(&inv.addresses)?, to_json(&inv.macs)?, id],
            ),
            None => conn.execute(
                "UPDATE agents SET last_checkin = ?1 WHERE id = ?2 AND revoked = 0",
                params![now, id],
            ),
        }
        .map_err(sql("recording a check-in"))?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "agent",
                id: id.to_owned(),
            });
        }
        load_agent(&conn, id)
    }

    fn reconcile_presence(&self, still_online: &[String], at: Millis) -> StoreResult<Vec<String>> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let online: Vec<String> = {
            let mut stmt = tx
                .prepare("SELECT id FROM agents WHERE presence = 'online'")
                .map_err(sql("reading presence"))?;
            stmt.query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
                .map_err(sql("reading presence"))?
        };
        let keep: std::collections::HashSet<&str> =
            still_online.iter().map(String::as_str).collect();
        let mut changed = Vec::new();
        for id in online.into_iter().filter(|id| !keep.contains(id.as_str())) {
            let n = tx
                .execute(
                    "UPDATE agents SET presence = 'offline', presence_at = ?1 WHERE id = ?2 AND presence = 'online' AND (presence_at IS NULL OR presence_at <= ?1)",
                    params![at, id],
                )
                .map_err(sql("recording presence"))?;
            if n > 0 {
                changed.push(id);
            }
        }
        tx.commit().map_err(sql("recording presence"))?;
        Ok(changed)
    }

    fn set_presence(
        &self,
        id: &str,
        presence: Presence,
        at: Millis,
        path: Option<String>,
        remote_addr: Option<String>,
    ) -> StoreResult<()> {
        // Retained presence may arrive late or twice: an older event never overwrites a newer.
        self.conn()
            .execute(
                "UPDATE agents SET presence = ?1, presence_at = ?2, path = COALESCE(?3, path), remote_addr = COALESCE(?4, remote_addr) WHERE id = ?5 AND (presence_at IS NULL OR presence_at <= ?2)",
                params![presence.as_str(), at, path, remote_addr, id],
            )
            .map_err(sql("recording presence"))?;
        Ok(())
    }

    fn set_presences(&self, updates: Vec<PresenceUpdate>) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE agents SET presence = ?1, presence_at = ?2, path = COALESCE(?3, path), remote_addr = COALESCE(?4, remote_addr) WHERE id = ?5 AND (presence_at IS NULL OR presence_at <= ?2)",
                )
                .map_err(sql("recording presence"))?;
            for u in updates {
                stmt.execute(params![
                    u.presence.as_str(),
                    u.at,
                    u.path,
                    u.remote_addr,
                    u.agent_id
                ])
                .map_err(sql("recording presence"))?;
            }
        }
        tx.commit().map_err(sql("recording presence"))
    }

    fn create_group(&self, name: &str, description: &str, now: Millis) -> StoreResult<Group> {
        let conn = self.conn();
        let exists: bool = conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM groups WHERE name = ?1)",
                [name],
                |r| r.get(0),
            )
            .map_err(sql("checking a group"))?;
        if exists {
            return Err(StoreError::Conflict(format!(
                "group {name:?} already exists"
            )));
        }
        conn.execute(
            "INSERT INTO groups (name, description, created_at) VALUES (?1, ?2, ?3)",
            params![name, description, now],
        )
        .map_err(sql("creating a group"))?;
        Ok(Group {
            name: name.to_owned(),
            description: description.to_owned(),
            created_at: now,
            members: 0,
        })
    }

    fn list_groups(&self) -> StoreResult<Vec<Group>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT g.name, g.description, g.created_at, (SELECT COUNT(*) FROM agent_groups ag JOIN agents a ON a.id = ag.agent_id WHERE ag.group_name = g.name AND a.revoked = 0) FROM groups g ORDER BY g.name",
            )
            .map_err(sql("listing groups"))?;
        stmt.query_map([], |r| {
            Ok(Group {
                name: r.get(0)?,
                description: r.get(1)?,
                created_at: r.get(2)?,
                members: r.get(3)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(sql("listing groups"))
    }

    fn delete_group(&self, name: &str) -> StoreResult<()> {
        let n = self
            .conn()
            .execute("DELETE FROM groups WHERE name = ?1", [name])
            .map_err(sql("deleting a group"))?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "group",
                id: name.to_owned(),
            });
        }
        Ok(())
    }

    fn create_call(
        &self,
        call: NewCall,
        now: Millis,
        new_wakeup_id: &mut dyn FnMut() -> String,
    ) -> StoreResult<(WakeCall, Vec<CallDelivery>)> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let agent_ids: Vec<String> = match &call.target {
            CallTarget::Agents(ids) => {
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    let live: Option<bool> = tx
                        .query_row("SELECT revoked FROM agents WHERE id = ?1", [id], |r| {
                            r.get(0)
                        })
                        .optional()
                        .map_err(sql("checking an agent"))?;
                    if live != Some(false) {
                        return Err(StoreError::Invalid(format!(
                            "agent {id:?} is not enrolled: check the id (GET /api/v1/agents)"
                        )));
                    }
                    if !out.contains(id) {
                        out.push(id.clone());
                    }
                }
                out
            }
            CallTarget::Group(g) => {
                check_groups_exist(&tx, std::slice::from_ref(g))?;
                let mut stmt = tx
                    .prepare(
                        "SELECT a.id FROM agents a JOIN agent_groups ag ON ag.agent_id = a.id WHERE ag.group_name = ?1 AND a.revoked = 0 ORDER BY a.id",
                    )
                    .map_err(sql("resolving a group"))?;
                stmt.query_map([g], |r| r.get(0))
                    .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>())
                    .map_err(sql("resolving a group"))?
            }
            CallTarget::All => {
                let mut stmt = tx
                    .prepare("SELECT id FROM agents WHERE revoked = 0 ORDER BY id")
                    .map_err(sql("listing agents"))?;
                stmt.query_map([], |r| r.get(0))
                    .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>())
                    .map_err(sql("listing agents"))?
            }
        };
        if agent_ids.is_empty() {
            return Err(StoreError::Invalid(format!(
                "{} has no enrolled agents: nothing to wake",
                call.target.describe()
            )));
        }
        let (threshold, default_secs) = call.default_spread;
        let many = u32::try_from(agent_ids.len()).unwrap_or(u32::MAX) >= threshold;
        let spread = call.spread.unwrap_or(if many { default_secs } else { 0 });
        tx.execute(
            &format!("INSERT INTO calls ({CALL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
            params![
                call.id,
                now,
                call.created_by,
                call.reason,
                call.action,
                call.target.describe(),
                call.expires_at,
                spread
            ],
        )
        .map_err(sql("recording a call"))?;
        let mut deliveries = Vec::with_capacity(agent_ids.len());
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO deliveries (wakeup_id, call_id, agent_id, state, queued_at) VALUES (?1, ?2, ?3, 'queued', ?4)",
                )
                .map_err(sql("recording deliveries"))?;
            for agent_id in agent_ids {
                let wakeup_id = new_wakeup_id();
                insert
                    .execute(params![wakeup_id, call.id, agent_id, now])
                    .map_err(sql("recording deliveries"))?;
                deliveries.push(CallDelivery {
                    call_id: call.id.clone(),
                    agent_id,
                    wakeup_id,
                    state: CallState::Queued,
                    queued_at: now,
                    sent_at: None,
                    delivered_at: None,
                    started_at: None,
                    finished_at: None,
                    status: None,
                    exit_code: None,
                    duration_ms: None,
                    detail: None,
                    carried_by: None,
                });
            }
        }
        let stored = load_call(&tx, &call.id)?;
        tx.commit().map_err(sql("committing a call"))?;
        Ok((stored, deliveries))
    }

    fn call(&self, id: &str) -> StoreResult<(WakeCall, Vec<CallDelivery>)> {
        let conn = self.conn();
        let call = load_call(&conn, id)?;
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE call_id = ?1 ORDER BY agent_id"
            ))
            .map_err(sql("reading deliveries"))?;
        let deliveries = stmt
            .query_map([id], delivery_from_row)
            .and_then(|rows| rows.collect())
            .map_err(sql("reading deliveries"))?;
        Ok((call, deliveries))
    }

    fn list_calls(&self, limit: u32) -> StoreResult<Vec<WakeCall>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {CALL_COLUMNS} FROM calls ORDER BY created_at DESC, id DESC LIMIT ?1"
            ))
            .map_err(sql("listing calls"))?;
        let mut calls: Vec<WakeCall> = stmt
            .query_map([limit.max(1)], call_from_row)
            .and_then(|rows| rows.collect())
            .map_err(sql("listing calls"))?;
        for c in &mut calls {
            fill_counts(&conn, c).map_err(sql("counting a call's states"))?;
        }
        Ok(calls)
    }

    fn advance_delivery(
        &self,
        agent_id: &str,
        wakeup_id: &str,
        state: CallState,
        update: DeliveryUpdate,
        at: Millis,
    ) -> StoreResult<Vec<CallDelivery>> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let changed = advance_in(&tx, agent_id, wakeup_id, state, &update, at)?;
        tx.commit().map_err(sql("updating a delivery"))?;
        Ok(changed)
    }

    fn advance_deliveries(&self, batch: Vec<DeliveryAdvance>) -> StoreResult<Vec<CallDelivery>> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let mut changed = Vec::new();
        for a in &batch {
            changed.extend(advance_in(
                &tx,
                &a.agent_id,
                &a.wakeup_id,
                a.state,
                &a.update,
                a.at,
            )?);
        }
        tx.commit().map_err(sql("updating deliveries"))?;
        Ok(changed)
    }

    fn pending_for_agent(
        &self,
        agent_id: &str,
        now: Millis,
    ) -> StoreResult<Vec<(WakeCall, CallDelivery)>> {
        let conn = self.conn();
        let cols: String = DELIVERY_COLUMNS
            .split(", ")
            .map(|c| format!("d.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {cols}, c.id, c.created_at, c.created_by, c.reason, c.action, c.target, c.expires_at, c.spread FROM deliveries d JOIN calls c ON c.id = d.call_id WHERE d.agent_id = ?1 AND d.state IN ('queued', 'sent') AND c.expires_at > ?2 ORDER BY d.queued_at, d.wakeup_id"
            ))
            .map_err(sql("reading pending wake-ups"))?;
        stmt.query_map(params![agent_id, now], |r| {
            let d = delivery_from_row(r)?;
            let c = WakeCall {
                id: r.get(14)?,
                created_at: r.get(15)?,
                created_by: r.get(16)?,
                reason: r.get(17)?,
                action: r.get(18)?,
                target: r.get(19)?,
                expires_at: r.get(20)?,
                spread: r.get(21)?,
                counts: Default::default(),
            };
            Ok((c, d))
        })
        .and_then(|rows| rows.collect())
        .map_err(sql("reading pending wake-ups"))
    }

    fn agents_with_queued(&self, now: Millis) -> StoreResult<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT DISTINCT d.agent_id FROM deliveries d JOIN calls c ON c.id = d.call_id WHERE d.state = 'queued' AND c.expires_at > ?1",
            )
            .map_err(sql("reading queued wake-ups"))?;
        stmt.query_map([now], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(sql("reading queued wake-ups"))
    }

    fn set_carried_by(&self, carried: &[String], carrier: &str) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        for id in carried {
            tx.execute(
                "UPDATE deliveries SET carried_by = ?1 WHERE wakeup_id = ?2",
                params![carrier, id],
            )
            .map_err(sql("merging wake-ups"))?;
        }
        tx.commit().map_err(sql("merging wake-ups"))
    }

    fn expire_due(&self, now: Millis) -> StoreResult<Vec<CallDelivery>> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let due: Vec<CallDelivery> = {
            let cols: String = DELIVERY_COLUMNS
                .split(", ")
                .map(|c| format!("d.{c}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT {cols} FROM deliveries d JOIN calls c ON c.id = d.call_id WHERE d.state IN ('queued', 'sent') AND c.expires_at <= ?1"
                ))
                .map_err(sql("finding expired wake-ups"))?;
            stmt.query_map([now], delivery_from_row)
                .and_then(|rows| rows.collect::<rusqlite::Result<_>>())
                .map_err(sql("finding expired wake-ups"))?
        };
        let mut out = Vec::with_capacity(due.len());
        for mut d in due {
            tx.execute(
                "UPDATE deliveries SET state = 'expired', finished_at = ?1 WHERE wakeup_id = ?2",
                params![now, d.wakeup_id],
            )
            .map_err(sql("expiring wake-ups"))?;
            d.state = CallState::Expired;
            d.finished_at = Some(now);
            out.push(d);
        }
        tx.commit().map_err(sql("expiring wake-ups"))?;
        Ok(out)
    }

    fn settings(&self) -> StoreResult<Settings> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT key, value FROM settings")
            .map_err(sql("reading settings"))?;
        let rows: Vec<(String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(sql("reading settings"))?;
        let mut map = serde_json::Map::new();
        for (k, v) in rows {
            // A group that no longer parses falls back to its defaults rather than failing
            // the console (only validated values are ever written).
            if let Ok(v) = serde_json::from_str(&v) {
                map.insert(k, v);
            }
        }
        Ok(
            serde_json::from_value(serde_json::Value::Object(map.clone())).unwrap_or_else(|_| {
                let mut s = Settings::default();
                if let Some(v) = map
                    .get("wol")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                {
                    s.wol = v;
                }
                if let Some(v) = map
                    .get("wakeup")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                {
                    s.wakeup = v;
                }
                if let Some(v) = map
                    .get("broker")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                {
                    s.broker = v;
                }
                if let Some(v) = map
                    .get("proxy")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                {
                    s.proxy = v;
                }
                s
            }),
        )
    }

    fn put_settings(&self, new: &Settings, who: &str, now: Millis) -> StoreResult<Settings> {
        new.validate()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let old = self.settings()?;
        // Both sides are compared to audit each change: a failed encoding must not pass
        // for "nothing changed".
        let encode = |source| StoreError::Encode {
            context: "the settings",
            source,
        };
        let old_v = serde_json::to_value(&old).map_err(encode)?;
        let new_v = serde_json::to_value(new).map_err(encode)?;
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        for key in ["wol", "wakeup", "broker", "proxy"] {
            let (Some(o), Some(n)) = (old_v.get(key), new_v.get(key)) else {
                continue;
            };
            if o == n {
                continue;
            }
            tx.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, n.to_string()],
            )
            .map_err(sql("writing settings"))?;
            tx.execute(
                "INSERT INTO audit_log (at, who, what, detail) VALUES (?1, ?2, ?3, ?4)",
                params![
                    now,
                    who,
                    format!("settings.{key}"),
                    serde_json::json!({"old": o, "new": n}).to_string()
                ],
            )
            .map_err(sql("writing the audit log"))?;
        }
        tx.commit().map_err(sql("writing settings"))?;
        Ok(new.clone())
    }

    fn audit(
        &self,
        who: &str,
        what: &str,
        detail: serde_json::Value,
        now: Millis,
    ) -> StoreResult<()> {
        self.conn()
            .execute(
                "INSERT INTO audit_log (at, who, what, detail) VALUES (?1, ?2, ?3, ?4)",
                params![now, who, what, detail.to_string()],
            )
            .map_err(sql("writing the audit log"))?;
        Ok(())
    }

    fn audit_log(&self, limit: u32) -> StoreResult<Vec<AuditEntry>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, at, who, what, detail FROM audit_log ORDER BY id DESC LIMIT ?1")
            .map_err(sql("reading the audit log"))?;
        stmt.query_map([limit.max(1)], |r| {
            let detail: String = r.get(4)?;
            Ok(AuditEntry {
                id: r.get(0)?,
                at: r.get(1)?,
                who: r.get(2)?,
                what: r.get(3)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(sql("reading the audit log"))
    }

    fn create_user(&self, name: &str, password_hash: &str, now: Millis) -> StoreResult<()> {
        let conn = self.conn();
        let exists: bool = conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM users WHERE name = ?1)",
                [name],
                |r| r.get(0),
            )
            .map_err(sql("checking a user"))?;
        if exists {
            return Err(StoreError::Conflict(format!(
                "user {name:?} already exists"
            )));
        }
        conn.execute(
            "INSERT INTO users (name, password_hash, created_at) VALUES (?1, ?2, ?3)",
            params![name, password_hash, now],
        )
        .map_err(sql("creating a user"))?;
        Ok(())
    }

    fn set_password(&self, name: &str, password_hash: &str) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let n = tx
            .execute(
                "UPDATE users SET password_hash = ?1 WHERE name = ?2",
                params![password_hash, name],
            )
            .map_err(sql("changing a password"))?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "user",
                id: name.to_owned(),
            });
        }
        tx.execute("DELETE FROM sessions WHERE user_name = ?1", [name])
            .map_err(sql("ending a user's sessions"))?;
        tx.commit().map_err(sql("changing a password"))
    }

    fn user_count(&self) -> StoreResult<u64> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM users", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(sql("counting users"))
    }

    fn password_hash(&self, name: &str) -> StoreResult<String> {
        self.conn()
            .query_row(
                "SELECT password_hash FROM users WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("reading a user"))?
            .ok_or_else(|| StoreError::NotFound {
                what: "user",
                id: name.to_owned(),
            })
    }

    fn upgrade_password_hash(
        &self,
        name: &str,
        current: &str,
        upgraded: &str,
    ) -> StoreResult<bool> {
        self.conn()
            .execute(
                "UPDATE users SET password_hash = ?1 WHERE name = ?2 AND password_hash = ?3",
                params![upgraded, name, current],
            )
            .map(|n| n > 0)
            .map_err(sql("upgrading a password hash"))
    }

    fn create_session(
        &self,
        hash: &[u8; 32],
        user: &str,
        now: Millis,
        expires_at: Millis,
    ) -> StoreResult<()> {
        let conn = self.conn();
        // Old sessions are cleared as new ones are made, so the table stays small.
        conn.execute("DELETE FROM sessions WHERE expires_at <= ?1", [now])
            .map_err(sql("clearing old sessions"))?;
        conn.execute(
            "INSERT INTO sessions (hash, user_name, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![&hash[..], user, now, expires_at],
        )
        .map_err(sql("recording a session"))?;
        Ok(())
    }

    fn session(&self, hash: &[u8; 32], now: Millis) -> StoreResult<Principal> {
        let user: Option<String> = self
            .conn()
            .query_row(
                "SELECT user_name FROM sessions WHERE hash = ?1 AND expires_at > ?2",
                params![&hash[..], now],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("reading a session"))?;
        user.map(|u| Principal {
            name: format!("user:{u}"),
        })
        .ok_or_else(|| StoreError::Refused("the session has ended: log in again".into()))
    }

    fn delete_session(&self, hash: &[u8; 32]) -> StoreResult<()> {
        self.conn()
            .execute("DELETE FROM sessions WHERE hash = ?1", [&hash[..]])
            .map_err(sql("ending a session"))?;
        Ok(())
    }

    fn create_api_token(
        &self,
        id: &str,
        hash: &[u8; 32],
        name: &str,
        now: Millis,
    ) -> StoreResult<ApiToken> {
        self.conn()
            .execute(
                "INSERT INTO api_tokens (id, hash, name, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, &hash[..], name, now],
            )
            .map_err(sql("recording an API token"))?;
        Ok(ApiToken {
            id: id.to_owned(),
            name: name.to_owned(),
            created_at: now,
            revoked: false,
        })
    }

    fn api_token(&self, hash: &[u8; 32]) -> StoreResult<Principal> {
        let name: Option<String> = self
            .conn()
            .query_row(
                "SELECT name FROM api_tokens WHERE hash = ?1 AND revoked = 0",
                [&hash[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("reading an API token"))?;
        name.map(|n| Principal {
            name: format!("token:{n}"),
        })
        .ok_or_else(|| {
            StoreError::Refused(
                "the API token is not valid (unknown or revoked): create a new one".into(),
            )
        })
    }

    fn list_api_tokens(&self) -> StoreResult<Vec<ApiToken>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, name, created_at, revoked FROM api_tokens ORDER BY created_at DESC",
            )
            .map_err(sql("listing API tokens"))?;
        stmt.query_map([], |r| {
            Ok(ApiToken {
                id: r.get(0)?,
                name: r.get(1)?,
                created_at: r.get(2)?,
                revoked: r.get(3)?,
            })
        })
        .and_then(|rows| rows.collect())
        .map_err(sql("listing API tokens"))
    }

    fn revoke_api_token(&self, id: &str) -> StoreResult<()> {
        let n = self
            .conn()
            .execute("UPDATE api_tokens SET revoked = 1 WHERE id = ?1", [id])
            .map_err(sql("revoking an API token"))?;
        if n == 0 {
            return Err(StoreError::NotFound {
                what: "API token",
                id: id.to_owned(),
            });
        }
        Ok(())
    }

    fn record_wol_send(&self, s: &WolSend) -> StoreResult<()> {
        self.conn()
            .execute(
                "INSERT INTO wol_sends (agent_id, call_id, mac, destination, at, packets, error, via_agent, relay_id, relay_state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![s.agent_id, s.call_id, s.mac, s.destination, s.at, s.packets, s.error, s.via_agent, s.relay_id, s.relay_state],
            )
            .map_err(sql("recording a Wake-on-LAN send"))?;
        Ok(())
    }

    fn record_relay_result(
        &self,
        via_agent: &str,
        relay_id: &str,
        sends: &[(String, String, u32, Option<String>)],
    ) -> StoreResult<Vec<WolSend>> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let mut changed = Vec::new();
        for (mac, destination, packets, error) in sends {
            tx.execute(
                "UPDATE wol_sends SET destination = ?1, packets = ?2, error = ?3, relay_state = 'answered' WHERE relay_id = ?4 AND via_agent = ?5 AND mac = ?6",
                params![destination, packets, error, relay_id, via_agent, mac],
            )
            .map_err(sql("recording a Wake-on-LAN relay result"))?;
        }
        {
            let mut stmt = tx
                .prepare(&format!("{WOL_SELECT} WHERE relay_id = ?1 AND via_agent = ?2 AND relay_state = 'answered' ORDER BY id"))
                .map_err(sql("reading Wake-on-LAN sends"))?;
            let rows = stmt
                .query_map(params![relay_id, via_agent], wol_row)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(sql("reading Wake-on-LAN sends"))?;
            changed.extend(rows);
        }
        tx.commit()
            .map_err(sql("recording a Wake-on-LAN relay result"))?;
        Ok(changed)
    }

    fn fail_relay(&self, relay_id: &str, error: &str) -> StoreResult<()> {
        self.conn()
            .execute(
                "UPDATE wol_sends SET error = ?1, relay_state = 'failed' WHERE relay_id = ?2 AND relay_state = 'requested'",
                params![error, relay_id],
            )
            .map_err(sql("recording a Wake-on-LAN relay failure"))?;
        Ok(())
    }

    fn wol_sends(&self, agent_id: &str, limit: u32) -> StoreResult<Vec<WolSend>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "{WOL_SELECT} WHERE agent_id = ?1 ORDER BY id DESC LIMIT ?2"
            ))
            .map_err(sql("reading Wake-on-LAN sends"))?;
        stmt.query_map(params![agent_id, limit.max(1)], wol_row)
            .and_then(|rows| rows.collect())
            .map_err(sql("reading Wake-on-LAN sends"))
    }
}

const WOL_SELECT: &str = "SELECT agent_id, call_id, mac, destination, at, packets, error, via_agent, relay_id, relay_state FROM wol_sends";

fn wol_row(r: &Row<'_>) -> rusqlite::Result<WolSend> {
    Ok(WolSend {
        agent_id: r.get(0)?,
        call_id: r.get(1)?,
        mac: r.get(2)?,
        destination: r.get(3)?,
        at: r.get(4)?,
        packets: r.get(5)?,
        error: r.get(6)?,
        via_agent: r.get(7)?,
        relay_id: r.get(8)?,
        relay_state: r.get(9)?,
    })
}
