//! The schema: numbered SQL scripts, applied in order at open.

use rusqlite::Connection;

use super::sql;
use crate::store::*;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Schema scripts: `MIGRATIONS[n]` moves version `n` to `n + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[
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
    r#"
-- Version 4: roles (viewer, operator, admin) of users and API tokens. Everyone was an
-- administrator before, so existing users and tokens stay admins. A token records who made
-- it: a token made by a user is held to that user's current role.
ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE api_tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE api_tokens ADD COLUMN created_by TEXT;
"#,
    r#"
-- Version 5: cloned identities. The machine an agent reported before its last change of
-- machine (JSON inventory) and when it changed, so that two machines checking in by turns
-- are told apart; when the console flagged the agent as cloned.
ALTER TABLE agents ADD COLUMN previous_inventory TEXT;
ALTER TABLE agents ADD COLUMN inventory_changed_at INTEGER;
ALTER TABLE agents ADD COLUMN clone_detected_at INTEGER;
"#,
    r#"
-- Version 6: several consoles on one database. Each call has one dispatcher, the console
-- that sends its wake-ups (NULL: any console may take it on); a running console holds a
-- lease that it renews, and another takes over the calls of a console whose lease ran out.
-- Sessions record their last use, so that the idle expiry holds on every console.
ALTER TABLE calls ADD COLUMN dispatcher TEXT;
CREATE INDEX calls_expires_at ON calls(expires_at);
CREATE TABLE console_leases (
    console_id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
ALTER TABLE sessions ADD COLUMN last_used_at INTEGER;
UPDATE sessions SET last_used_at = created_at;
"#,
    r#"
-- Version 7: the failed logins and enrollments that the throttles count (kind: login_user,
-- login_address or enroll_address; key: the user name or address), so that every console
-- on the database counts them all and a restart forgets none. Only the last five minutes
-- matter: older rows are deleted as failures of their key come, and by a periodic sweep.
CREATE TABLE auth_failures (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX auth_failures_key ON auth_failures (kind, key, at);
CREATE INDEX auth_failures_at ON auth_failures (at);
"#,
    r#"
-- Version 8: a console at scale. Each call keeps how many of its deliveries are in each
-- state, changed in the transaction that changes a delivery's state, so that lists and
-- dashboards read them instead of counting deliveries. The expiry sweep looks only at calls
-- with wake-ups still queued or sent (calls_open, a partial index), and a call's deliveries
-- are read a page at a time, by agent and by state and agent (index ranges).
ALTER TABLE calls ADD COLUMN n_queued INTEGER NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN n_sent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN n_delivered INTEGER NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN n_started INTEGER NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN n_finished INTEGER NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN n_expired INTEGER NOT NULL DEFAULT 0;
ALTER TABLE calls ADD COLUMN n_failed INTEGER NOT NULL DEFAULT 0;
CREATE INDEX deliveries_call_agent ON deliveries(call_id, agent_id);
CREATE INDEX deliveries_call_state_agent ON deliveries(call_id, state, agent_id);
DROP INDEX deliveries_call;
UPDATE calls SET
    n_queued = (SELECT COUNT(*) FROM deliveries d WHERE d.call_id = calls.id AND d.state = 'queued'),
    n_sent = (SELECT COUNT(*) FROM deliveries d WHERE d.call_id = calls.id AND d.state = 'sent'),
    n_delivered = (SELECT COUNT(*) FROM deliveries d WHERE d.call_id = calls.id AND d.state = 'delivered'),
    n_started = (SELECT COUNT(*) FROM deliveries d WHERE d.call_id = calls.id AND d.state = 'started'),
    n_finished = (SELECT COUNT(*) FROM deliveries d WHERE d.call_id = calls.id AND d.state = 'finished'),
    n_expired = (SELECT COUNT(*) FROM deliveries d WHERE d.call_id = calls.id AND d.state = 'expired'),
    n_failed = (SELECT COUNT(*) FROM deliveries d WHERE d.call_id = calls.id AND d.state = 'failed');
CREATE INDEX calls_open ON calls(expires_at) WHERE n_queued + n_sent > 0;
"#,
    r#"
-- Version 9: the revocation feed brokers poll (GET /api/v1/revocations). One row per
-- agent id whose revoked credentials changed, with the feed position of its last change;
-- the credentials themselves are read from agents and agent_certificates. seq comes from
-- the single row of revocation_seq, updated in the transaction that revokes: its row lock
-- orders the transactions of every console, so commit order is seq order and a reader
-- never skips an entry committed later with a smaller seq.
CREATE TABLE revocation_feed (
    agent_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE
);
CREATE TABLE revocation_seq (last_seq INTEGER NOT NULL);
INSERT INTO revocation_feed (agent_id, seq)
    SELECT id, ROW_NUMBER() OVER (ORDER BY id) FROM (
        SELECT id FROM agents WHERE revoked = 1
        UNION SELECT agent_id FROM agent_certificates WHERE revoked_at IS NOT NULL
    ) r;
INSERT INTO revocation_seq (last_seq) SELECT COUNT(*) FROM revocation_feed;
"#,
    r#"
-- Version 10: the registry at scale. The dashboard counts the agents online and the stale
-- ones, and the console reads the agents recorded online when it connects to the broker:
-- index ranges instead of reading every agent. agents_presence by presence (then
-- name: the agents page filtered by presence reads its page in order);
-- agents_last_seen by when an agent not online was last seen (the latest of enrolment,
-- check-in and presence change, as the stale condition writes it); agents_name for the
-- agents page, listed by name a page at a time.
CREATE INDEX agents_presence ON agents(presence, revoked, name, id);
CREATE INDEX agents_last_seen ON agents(revoked, max(enrolled_at, COALESCE(last_checkin, 0), COALESCE(presence_at, 0))) WHERE presence <> 'online';
CREATE INDEX agents_name ON agents(name, id);
"#,
    r#"
-- Version 11: the agents page's search (a substring of the id, name, host name, addresses or
-- MACs) from an index: agents_search, an FTS5 index of those columns with the trigram
-- tokenizer (case-insensitive), whose text stays in agents (external content, by rowid).
-- Triggers keep it in step with every insert, change of those columns and delete; it is
-- filled here for the agents already stored.
CREATE VIRTUAL TABLE agents_search USING fts5(
    id, name, hostname, addresses, macs,
    content = 'agents', tokenize = 'trigram'
);
INSERT INTO agents_search (agents_search) VALUES ('rebuild');
CREATE TRIGGER agents_search_insert AFTER INSERT ON agents BEGIN
    INSERT INTO agents_search (rowid, id, name, hostname, addresses, macs)
        VALUES (new.rowid, new.id, new.name, new.hostname, new.addresses, new.macs);
END;
CREATE TRIGGER agents_search_delete AFTER DELETE ON agents BEGIN
    INSERT INTO agents_search (agents_search, rowid, id, name, hostname, addresses, macs)
        VALUES ('delete', old.rowid, old.id, old.name, old.hostname, old.addresses, old.macs);
END;
-- Only when one of them changed: a check-in that reports the same machine writes them again.
CREATE TRIGGER agents_search_update AFTER UPDATE OF id, name, hostname, addresses, macs ON agents
WHEN old.id IS NOT new.id OR old.name IS NOT new.name OR old.hostname IS NOT new.hostname
    OR old.addresses IS NOT new.addresses OR old.macs IS NOT new.macs
BEGIN
    INSERT INTO agents_search (agents_search, rowid, id, name, hostname, addresses, macs)
        VALUES ('delete', old.rowid, old.id, old.name, old.hostname, old.addresses, old.macs);
    INSERT INTO agents_search (rowid, id, name, hostname, addresses, macs)
        VALUES (new.rowid, new.id, new.name, new.hostname, new.addresses, new.macs);
END;
"#,
    r#"
-- Version 12: the agents by presence, kept instead of counted (the dashboard every 3 s, the
-- metrics): counting the online agents of a million read 600,000 index entries. Each
-- change of an agent's presence or revocation appends to agent_count_changes (triggers, so
-- that every way of writing agents counts: enrolment, presence, removal, migrate-store);
-- a count is agent_counts' row plus the changes not yet folded into it, which the console
-- does every second. Appending instead of updating one row: consoles writing presence at
-- once never wait for each other's count.
CREATE TABLE agent_counts (
    presence TEXT NOT NULL,
    revoked INTEGER NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (presence, revoked)
);
CREATE TABLE agent_count_changes (
    presence TEXT NOT NULL,
    revoked INTEGER NOT NULL,
    delta INTEGER NOT NULL
);
INSERT INTO agent_counts (presence, revoked, n)
    SELECT presence, revoked, COUNT(*) FROM agents GROUP BY presence, revoked;
CREATE TRIGGER agents_counted_insert AFTER INSERT ON agents BEGIN
    INSERT INTO agent_count_changes (presence, revoked, delta) VALUES (new.presence, new.revoked, 1);
END;
CREATE TRIGGER agents_counted_delete AFTER DELETE ON agents BEGIN
    INSERT INTO agent_count_changes (presence, revoked, delta) VALUES (old.presence, old.revoked, -1);
END;
CREATE TRIGGER agents_counted_update AFTER UPDATE OF presence, revoked ON agents
    WHEN old.presence IS NOT new.presence OR old.revoked IS NOT new.revoked
BEGIN
    INSERT INTO agent_count_changes (presence, revoked, delta)
        VALUES (old.presence, old.revoked, -1), (new.presence, new.revoked, 1);
END;
"#,
    r#"
-- Version 13: a large call is recorded in chunks, each chunk's wake-ups sent as soon as it
-- commits. targeted: how many agents the call addressed when it was made (its counts add
-- up to it once recorded). call_unrecorded: the agents of the chunks not recorded yet, one
-- row per chunk (a JSON array of agent ids), written with the call and deleted in the
-- transaction that records the chunk: a console restarted or taking over finishes the
-- recording with each agent recorded once.
ALTER TABLE calls ADD COLUMN targeted INTEGER NOT NULL DEFAULT 0;
UPDATE calls SET targeted = n_queued + n_sent + n_delivered + n_started + n_finished + n_expired + n_failed;
CREATE TABLE call_unrecorded (
    call_id TEXT NOT NULL REFERENCES calls(id) ON DELETE CASCADE,
    chunk INTEGER NOT NULL,
    agent_ids TEXT NOT NULL,
    PRIMARY KEY (call_id, chunk)
);
"#,
    r#"
-- Version 14: reads that stop at what they need however long the console has been in use
-- (calls, deliveries and Wake-on-LAN sends are kept): the calls page takes the newest calls
-- from calls_created instead of sorting every call; an agent's Wake-on-LAN history its
-- newest sends from wol_sends_agent_id (it replaces wol_sends_agent, by time, which no
-- read used in order); the tenant file its revoked certificates only.
CREATE INDEX calls_created ON calls(created_at, id);
CREATE INDEX wol_sends_agent_id ON wol_sends(agent_id, id);
DROP INDEX wol_sends_agent;
CREATE INDEX agent_certificates_revoked ON agent_certificates(agent_id, serial) WHERE revoked_at IS NOT NULL;
"#,
];

pub(super) fn migrate(conn: &mut Connection, shown_path: &str) -> StoreResult<()> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql("reading the schema version"))?;
    for (version, script) in pending_migrations(MIGRATIONS, found, shown_path)? {
        let tx = conn
            .transaction()
            .map_err(sql("starting a schema migration"))?;
        tx.execute_batch(script)
            .map_err(sql("applying a schema migration"))?;
        tx.pragma_update(None, "user_version", version)
            .map_err(sql("recording the schema version"))?;
        tx.commit().map_err(sql("committing a schema migration"))?;
    }
    Ok(())
}
