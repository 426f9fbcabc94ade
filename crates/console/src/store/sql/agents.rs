//! Agents and groups.

use std::collections::BTreeMap;

use super::auth::{TOKEN_COLUMNS, token_from_row};
use super::*;
use crate::model::*;
use crate::store::*;

/// The tables of agents and groups, for `migrate-store`.
pub(in crate::store) const AGENT_TABLES: &[&Table] = &[
    &Table {
        name: "agents",
        key: "id",
        columns: "id, name, hostname, os, addresses, macs, enrolled_at, enrolled_with, secret_hash, last_checkin, presence, presence_at, path, remote_addr, revoked, revoked_at, previous_inventory, inventory_changed_at, clone_detected_at",
        identity: None,
    },
    &Table {
        name: "groups",
        key: "name",
        columns: "name, description, created_at",
        identity: None,
    },
    &Table {
        name: "agent_groups",
        key: "agent_id, group_name",
        columns: "agent_id, group_name",
        identity: None,
    },
    &Table {
        name: "agent_certificates",
        key: "serial",
        columns: "serial, agent_id, issued_at, not_after, revoked_at",
        identity: None,
    },
    &Table {
        name: "revocation_feed",
        key: "agent_id",
        columns: "agent_id, seq",
        identity: None,
    },
];

/// Continues the revocation feed's counter after the entries `migrate-store` copied
/// (`revocation_seq` is not copied: its one row exists in every migrated database).
pub(in crate::store) fn continue_revocation_feed(conn: &mut dyn Conn) -> StoreResult<()> {
    exec(
        conn,
        "UPDATE revocation_seq SET last_seq = (SELECT COALESCE(MAX(seq), 0) FROM revocation_feed)",
        params![],
        "continuing the revocation feed's numbering",
    )?;
    Ok(())
}

/// Moves `agent` to the end of the revocation feed, after a change of its revoked
/// credentials. The counter row's update locks it until the transaction ends, so that
/// consoles sharing a database commit their feed entries in cursor order.
fn feed_revocation_change(conn: &mut dyn Conn, agent: &str) -> StoreResult<()> {
    exec(
        conn,
        "UPDATE revocation_seq SET last_seq = last_seq + 1",
        params![],
        "advancing the revocation feed",
    )?;
    // `WHERE true`: SQLite needs it to read ON CONFLICT after INSERT ... SELECT.
    exec(
        conn,
        "INSERT INTO revocation_feed (agent_id, seq) SELECT ?1, last_seq FROM revocation_seq WHERE true ON CONFLICT (agent_id) DO UPDATE SET seq = excluded.seq",
        params![agent],
        "recording a revocation feed entry",
    )?;
    Ok(())
}

pub(super) fn insert_certificate(
    conn: &mut dyn Conn,
    agent: &str,
    c: &CertificateRecord,
) -> StoreResult<()> {
    exec(
        conn,
        "INSERT INTO agent_certificates (serial, agent_id, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
        params![&c.serial, agent, c.issued_at, c.not_after],
        "recording an agent certificate",
    )?;
    Ok(())
}

pub(super) const AGENT_COLUMNS: &str = "id, name, hostname, os, addresses, macs, enrolled_at, last_checkin, presence, presence_at, path, remote_addr, revoked, previous_inventory, clone_detected_at";

/// The condition of a stale agent, last seen before `before` (an SQL value): not online,
/// and its enrollment, last check-in and last presence change all before then. Written as
/// the index agents_last_seen is, so that counting and listing stale agents read a range.
fn stale(conn: &dyn Conn, before: &str) -> String {
    format!(
        "presence <> 'online' AND {}(enrolled_at, COALESCE(last_checkin, 0), COALESCE(presence_at, 0)) < {before}",
        conn.greatest()
    )
}

/// Counts the live agents with the presence `?1` (the dashboard, metrics): the kept count
/// and the changes not folded into it yet (a second's worth), not the agents.
pub(super) const COUNT_BY_PRESENCE: &str = "SELECT CAST(COALESCE((SELECT n FROM agent_counts WHERE presence = ?1 AND revoked = 0), 0) + COALESCE((SELECT SUM(delta) FROM agent_count_changes WHERE presence = ?1 AND revoked = 0), 0) AS BIGINT)";

/// Moves the changes of the agents' counts into the counts ([`AgentStore::fold_agent_counts`]).
/// The changes are deleted and returned in one statement: with several consoles folding at
/// once on PostgreSQL, each change is returned to exactly one of them.
pub(in crate::store) fn fold_agent_counts(tx: &mut dyn Conn) -> StoreResult<u64> {
    let changes: Vec<(String, i64, i64)> = query_all(
        tx,
        "DELETE FROM agent_count_changes RETURNING presence, revoked, delta",
        &[],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        "reading the changes of the agents' counts",
    )?;
    let folded = changes.len() as u64;
    let mut sums: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for (presence, revoked, delta) in changes {
        *sums.entry((presence, revoked)).or_default() += delta;
    }
    // In key order: two consoles folding at once lock the count rows in the same order.
    for ((presence, revoked), delta) in sums.into_iter().filter(|(_, d)| *d != 0) {
        exec(
            tx,
            "INSERT INTO agent_counts (presence, revoked, n) VALUES (?1, ?2, ?3) ON CONFLICT (presence, revoked) DO UPDATE SET n = agent_counts.n + excluded.n",
            params![&presence, revoked, delta],
            "keeping the agents' counts",
        )?;
    }
    Ok(folded)
}

/// Counts the live agents last seen before `?1` (the dashboard).
pub(super) fn count_stale_query(conn: &dyn Conn) -> String {
    format!(
        "SELECT COUNT(*) FROM agents WHERE revoked = 0 AND {}",
        stale(conn, "?1")
    )
}

/// From how many members a group is listed by walking the agents in name order.
const LARGE_GROUP: i64 = 10_000;

/// The members of the group `?1`, counted up to `?2` ([`LARGE_GROUP`]) only.
const LARGE_GROUP_MEMBERS: &str =
    "SELECT COUNT(*) FROM (SELECT 1 FROM agent_groups WHERE group_name = ?1 LIMIT ?2) m";

/// From how many characters a search reads the search index (a trigram is three: shorter
/// text has none, and is looked for in every agent).
pub const MIN_INDEXED_SEARCH: usize = 3;

/// From how many agents found by the SQLite search index a search walks the agents in name
/// order instead, each checked, until the page is full (as a large group is listed): many
/// matches fill a page soon, and reading them all from the index to sort them would not.
const LARGE_SEARCH: i64 = 10_000;

/// The agents that the search index finds for the phrase `?1`, counted up to `?2`
/// ([`LARGE_SEARCH`]) only.
const LARGE_SEARCH_MATCHES: &str =
    "SELECT COUNT(*) FROM (SELECT 1 FROM agents_search WHERE agents_search MATCH ?1 LIMIT ?2) m";

/// `text` as a `LIKE` pattern that matches it literally (escape character `\`).
fn like_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Adds to a listing the agents' search: `text` a case-insensitive substring (ASCII letters on
/// SQLite, the server's case rules on PostgreSQL) of the id, name, host name, addresses or
/// MACs. Text of [`MIN_INDEXED_SEARCH`] characters or more is first looked up in the search
/// index (trigrams: it finds a superset, which the `LIKE` then narrows to the same agents as
/// without it); shorter text is looked for in every agent.
///
/// Returns whether the search index's few matches now decide which agents are read.
fn search(
    conn: &mut dyn Conn,
    text: &str,
    where_: &mut Vec<String>,
    args: &mut Vec<Value>,
) -> StoreResult<bool> {
    args.push(format!("%{}%", like_literal(text)).into());
    let (n, like, escape) = (args.len(), conn.like(), conn.like_escape());
    where_.push(format!(
        "(id {like} ?{n}{escape} OR name {like} ?{n}{escape} OR hostname {like} ?{n}{escape} OR addresses {like} ?{n}{escape} OR macs {like} ?{n}{escape})"
    ));
    if text.chars().count() < MIN_INDEXED_SEARCH {
        return Ok(false);
    }
    match conn.text_index() {
        TextIndex::Fts5Trigram => {
            // One FTS5 phrase: the trigrams of the text in a row, in any one column.
            let phrase = format!("\"{}\"", text.replace('"', "\"\""));
            let found: i64 = query_one(
                conn,
                LARGE_SEARCH_MATCHES,
                params![&phrase, LARGE_SEARCH],
                "sizing a search",
            )?;
            if found < LARGE_SEARCH {
                args.push(phrase.into());
                where_.push(format!(
                    "agents.rowid IN (SELECT rowid FROM agents_search WHERE agents_search MATCH ?{})",
                    args.len()
                ));
                return Ok(true);
            }
        }
        // Implied by the condition on the columns: only there for the index.
        TextIndex::PgTrigram => where_.push(format!("{SEARCH_TEXT} {like} ?{n}")),
    }
    Ok(false)
}

/// The query that lists the agents `f` selects, and its values.
pub(super) fn list_query(
    conn: &mut dyn Conn,
    f: &AgentFilter,
) -> StoreResult<(String, Vec<Value>)> {
    let mut where_ = vec!["1 = 1".to_owned()];
    let mut args: Vec<Value> = Vec::new();
    let narrowed = match &f.search {
        Some(s) => search(conn, s, &mut where_, &mut args)?,
        None => false,
    };
    // Once the search index names the few agents to read, SQLite (which has no statistics)
    // must not walk a whole presence's range of agents_presence instead: a unary `+` keeps
    // these columns' indexes out of the plan (only ever written on SQLite).
    let column = |c: &str| {
        if narrowed {
            format!("+{c}")
        } else {
            c.to_owned()
        }
    };
    if !f.include_revoked {
        where_.push(format!("{} = 0", column("revoked")));
    }
    if let Some(g) = &f.group {
        // A small group: its members, then sorted by name. A large one: the agents
        // in name order, each checked, until the page is full (SQLite follows the
        // form written; either costs in proportion to a bounded number of rows).
        let members: i64 = query_one(
            conn,
            LARGE_GROUP_MEMBERS,
            params![g, LARGE_GROUP],
            "sizing a group",
        )?;
        args.push(g.into());
        where_.push(if members >= LARGE_GROUP {
            format!(
                "EXISTS (SELECT 1 FROM agent_groups g WHERE g.agent_id = agents.id AND g.group_name = ?{})",
                args.len()
            )
        } else {
            format!(
                "id IN (SELECT agent_id FROM agent_groups WHERE group_name = ?{})",
                args.len()
            )
        });
    }
    if let Some(p) = f.presence {
        args.push(p.as_str().into());
        where_.push(format!("{} = ?{}", column("presence"), args.len()));
    }
    if let Some(before) = f.stale_before {
        args.push(before.into());
        where_.push(stale(conn, &format!("?{}", args.len())));
    }
    if f.cloned {
        where_.push("clone_detected_at IS NOT NULL".into());
    }
    let limit = if f.limit == 0 { 1000 } else { f.limit };
    let query = format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE {} ORDER BY name, id LIMIT {limit} OFFSET {}",
        where_.join(" AND "),
        f.offset
    );
    Ok((query, args))
}

/// The agents recorded online, read when the console connects to the broker to compare
/// with the broker's presence: a range of agents_presence.
pub(super) const RECORDED_ONLINE: &str = "SELECT id FROM agents WHERE presence = 'online'";

pub(super) fn agent_from_row(row: &Row) -> Result<Agent, DbError> {
    let addresses: String = row.get(4)?;
    let macs: String = row.get(5)?;
    let presence: String = row.get(8)?;
    let inventory = Inventory {
        hostname: row.get(2)?,
        os: row.get(3)?,
        addresses: serde_json::from_str(&addresses).unwrap_or_default(),
        macs: json_list(&macs),
    };
    let previous: Option<String> = row.get(13)?;
    let clone_detected_at: Option<Millis> = row.get(14)?;
    let cloned = clone_detected_at.map(|detected_at| ClonedIdentity {
        detected_at,
        machines: std::iter::once(inventory.clone())
            .chain(previous.and_then(|p| serde_json::from_str(&p).ok()))
            .collect(),
        fix: crate::clones::CLONE_FIX.to_owned(),
    });
    Ok(Agent {
        id: row.get(0)?,
        name: row.get(1)?,
        inventory,
        groups: Vec::new(),
        enrolled_at: row.get(6)?,
        last_checkin: row.get(7)?,
        presence: Presence::parse(&presence).unwrap_or(Presence::Unknown),
        presence_at: row.get(9)?,
        path: row.get(10)?,
        remote_addr: row.get(11)?,
        revoked: row.get(12)?,
        cloned,
    })
}

pub(super) fn fill_groups(conn: &mut dyn Conn, agent: &mut Agent) -> StoreResult<()> {
    agent.groups = query_all(
        conn,
        "SELECT group_name FROM agent_groups WHERE agent_id = ?1 ORDER BY group_name",
        params![&agent.id],
        |r| r.get(0),
        "reading an agent's groups",
    )?;
    Ok(())
}

/// Whether the agent `id` is revoked; `None` when there is no such agent.
pub(super) fn agent_revoked(conn: &mut dyn Conn, id: &str) -> StoreResult<Option<bool>> {
    query_opt(
        conn,
        "SELECT revoked FROM agents WHERE id = ?1",
        params![id],
        |r| r.get(0),
        "checking an agent",
    )
}

pub(super) fn load_agent(conn: &mut dyn Conn, id: &str) -> StoreResult<Agent> {
    let mut agent = query_opt(
        conn,
        &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?1"),
        params![id],
        agent_from_row,
        "reading an agent",
    )?
    .ok_or_else(|| not_found("agent", id))?;
    fill_groups(conn, &mut agent)?;
    Ok(agent)
}

fn group_exists(conn: &mut dyn Conn, name: &str) -> StoreResult<bool> {
    query_one(
        conn,
        "SELECT EXISTS(SELECT 1 FROM groups WHERE name = ?1)",
        params![name],
        "checking a group",
    )
}

pub(super) fn check_groups_exist(conn: &mut dyn Conn, groups: &[String]) -> StoreResult<()> {
    for g in groups {
        if !group_exists(conn, g)? {
            return Err(StoreError::Invalid(format!(
                "group {g:?} does not exist: create it first (POST /api/v1/groups)"
            )));
        }
    }
    Ok(())
}

pub(super) fn set_groups(
    conn: &mut dyn Conn,
    agent_id: &str,
    groups: &[String],
) -> StoreResult<()> {
    check_groups_exist(conn, groups)?;
    exec(
        conn,
        "DELETE FROM agent_groups WHERE agent_id = ?1",
        params![agent_id],
        "updating an agent's groups",
    )?;
    for g in groups {
        exec(
            conn,
            "INSERT INTO agent_groups (agent_id, group_name) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            params![agent_id, g],
            "updating an agent's groups",
        )?;
    }
    Ok(())
}

/// Why an enrollment token is refused at `now`, if it is.
fn token_refusal(token: &EnrollmentToken, now: Millis) -> Option<&'static str> {
    if token.revoked {
        Some("the enrollment token was revoked: ask an administrator for a new one")
    } else if token.expires_at.is_some_and(|e| e <= now) {
        Some("the enrollment token has expired: ask an administrator for a new one")
    } else if token.max_uses.is_some_and(|m| token.uses >= m) {
        Some("the enrollment token has been used up: ask an administrator for a new one")
    } else {
        None
    }
}

/// The enrollment token whose secret hashes to `hash`, refused when unknown, revoked,
/// expired at `now` or used up.
pub(super) fn usable_token(
    conn: &mut dyn Conn,
    hash: &[u8; 32],
    now: Millis,
) -> StoreResult<EnrollmentToken> {
    let token = query_opt(
        conn,
        &format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE hash = ?1"),
        params![hash],
        token_from_row,
        "reading an enrollment token",
    )?
    .ok_or_else(|| {
        StoreError::Refused(
            "the enrollment token is not known: check it, or ask an administrator for a new one"
                .into(),
        )
    })?;
    if let Some(why) = token_refusal(&token, now) {
        return Err(StoreError::Refused(why.into()));
    }
    Ok(token)
}

impl AgentStore for SqlStore {
    fn enroll_agent(
        &self,
        token_hash: &[u8; 32],
        agent: NewAgent,
        now: Millis,
    ) -> StoreResult<Agent> {
        self.write(|tx| {
            let token = usable_token(tx, token_hash, now)?;
            match agent_revoked(tx, &agent.id)? {
                Some(false) => {
                    return Err(StoreError::Conflict(format!(
                        "an agent with id {:?} is already enrolled: delete it first (DELETE /api/v1/agents/{}) or enroll with another id",
                        agent.id, agent.id
                    )));
                }
                Some(true) => {
                    // A revoked agent re-enrolling: start afresh under the same id.
                    exec(
                        tx,
                        "DELETE FROM agents WHERE id = ?1",
                        params![&agent.id],
                        "replacing a revoked agent",
                    )?;
                    // An agent removed before certificates were recorded was revoked whole;
                    // enrolled again, it is not any more: brokers must learn that.
                    feed_revocation_change(tx, &agent.id)?;
                }
                None => {}
            }
            exec(
                tx,
                "INSERT INTO agents (id, name, hostname, os, addresses, macs, enrolled_at, enrolled_with, secret_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    &agent.id,
                    &agent.name,
                    &agent.inventory.hostname,
                    &agent.inventory.os,
                    to_json(&agent.inventory.addresses)?,
                    to_json(&agent.inventory.macs)?,
                    now,
                    &token.id,
                    &agent.secret_hash
                ],
                "recording an agent",
            )?;
            // The use limit is checked again by the UPDATE itself, so that two enrollments
            // at once cannot both take the last use.
            let used = exec(
                tx,
                "UPDATE enrollment_tokens SET uses = uses + 1 WHERE id = ?1 AND (max_uses IS NULL OR uses < max_uses)",
                params![&token.id],
                "using an enrollment token",
            )?;
            if used == 0 {
                return Err(StoreError::Refused(
                    "the enrollment token has been used up: ask an administrator for a new one"
                        .into(),
                ));
            }
            if let Some(c) = &agent.certificate {
                insert_certificate(tx, &agent.id, c)?;
            }
            set_groups(tx, &agent.id, &token.groups)?;
            load_agent(tx, &agent.id)
        })
    }

    fn agent(&self, id: &str) -> StoreResult<Agent> {
        self.read(|conn| load_agent(conn, id))
    }

    fn list_agents(&self, f: &AgentFilter) -> StoreResult<Vec<Agent>> {
        self.read(|conn| {
            let (query, args) = list_query(conn, f)?;
            let mut agents = query_all(conn, &query, &args, agent_from_row, "listing agents")?;
            for a in &mut agents {
                fill_groups(conn, a)?;
            }
            Ok(agents)
        })
    }

    fn agents_not_online(&self, ids: &[String]) -> StoreResult<Vec<Agent>> {
        self.read(|conn| {
            let mut agents = Vec::new();
            for part in ids.chunks(IDS_PER_STATEMENT) {
                let query = format!(
                    "SELECT {AGENT_COLUMNS} FROM agents WHERE revoked = 0 AND presence <> 'online' AND id IN ({}) ORDER BY id",
                    numbered_params(part.len())
                );
                let values: Vec<Value> = part.iter().map(Value::from).collect();
                agents.extend(query_all(
                    conn,
                    &query,
                    &values,
                    agent_from_row,
                    "reading the agents to wake by Wake-on-LAN",
                )?);
            }
            Ok(agents)
        })
    }

    fn count_agents(&self, presence: Presence) -> StoreResult<u64> {
        self.read(|conn| {
            query_one(
                conn,
                COUNT_BY_PRESENCE,
                params![presence.as_str()],
                "counting agents",
            )
        })
    }

    fn fold_agent_counts(&self) -> StoreResult<u64> {
        let pending: i64 = self.read(|conn| {
            query_one(
                conn,
                "SELECT COUNT(*) FROM (SELECT 1 FROM agent_count_changes LIMIT 1) c",
                &[],
                "looking for changes of the agents' counts",
            )
        })?;
        if pending == 0 {
            // Idle: no write transaction every second.
            return Ok(0);
        }
        self.write(|tx| fold_agent_counts(tx))
    }

    fn count_stale_agents(&self, before: Millis) -> StoreResult<u64> {
        self.read(|conn| {
            let query = count_stale_query(conn);
            query_one(conn, &query, params![before], "counting stale agents")
        })
    }

    fn update_agent(
        &self,
        id: &str,
        name: Option<String>,
        groups: Option<Vec<String>>,
    ) -> StoreResult<Agent> {
        self.write(|tx| {
            let current = load_agent(tx, id)?;
            if current.revoked {
                return Err(not_found("agent", id));
            }
            if let Some(name) = name {
                exec(
                    tx,
                    "UPDATE agents SET name = ?1 WHERE id = ?2",
                    params![name, id],
                    "renaming an agent",
                )?;
            }
            if let Some(groups) = groups {
                set_groups(tx, id, &groups)?;
            }
            load_agent(tx, id)
        })
    }

    fn revoke_agent(&self, id: &str, now: Millis) -> StoreResult<()> {
        // An unknown or removed id is refused without waiting for the calls being recorded
        // (a removal of a thousand ids would otherwise hold them up a thousand times).
        let known: Option<i64> = self.read(|conn| {
            query_opt(
                conn,
                "SELECT 1 FROM agents WHERE id = ?1 AND revoked = 0",
                params![id],
                |r| r.get(0),
                "finding an agent to revoke",
            )
        })?;
        if known.is_none() {
            return Err(not_found("agent", id));
        }
        self.write_ordered(RevocationOrder::Exclusive, |tx| {
            let n = exec(
                tx,
                "UPDATE agents SET revoked = 1, revoked_at = ?2 WHERE id = ?1 AND revoked = 0",
                params![id, now],
                "revoking an agent",
            )?;
            touched(n, "agent", id)?;
            exec(
                tx,
                "UPDATE agent_certificates SET revoked_at = ?2 WHERE agent_id = ?1 AND revoked_at IS NULL",
                params![id, now],
                "revoking an agent's certificates",
            )?;
            feed_revocation_change(tx, id)?;
            // Each unfinished delivery on its own, so that its call's counts follow. On
            // PostgreSQL another connection may move one (queued to sent, an ack) between
            // the read and its update, which then changes nothing: read again, until none is
            // left (a delivery moves at most four times before it is finished).
            let mut counts = calls::CountChanges::default();
            for _ in 0..5 {
                let unfinished: Vec<(String, String, String)> = query_all(
                    tx,
                    "SELECT wakeup_id, call_id, state FROM deliveries WHERE agent_id = ?1 AND state IN ('queued', 'sent', 'delivered', 'started') ORDER BY wakeup_id",
                    params![id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    "reading a revoked agent's wake-ups",
                )?;
                if unfinished.is_empty() {
                    break;
                }
                for (wakeup_id, call_id, state) in unfinished {
                    let Some(from) = CallState::parse(&state) else {
                        continue;
                    };
                    let failed = exec(
                        tx,
                        "UPDATE deliveries SET state = 'failed', finished_at = ?1, detail = 'the agent was revoked' WHERE wakeup_id = ?2 AND state = ?3",
                        params![now, &wakeup_id, &state],
                        "failing a revoked agent's wake-ups",
                    )?;
                    if failed == 1 {
                        counts.moved(&call_id, from, CallState::Failed);
                    }
                }
            }
            counts.write(tx)
        })
    }

    fn revocations(&self, now: Millis) -> StoreResult<Vec<RevokedAgent>> {
        self.read(|conn| {
            let mut out: BTreeMap<String, RevokedAgent> = Default::default();
            // Certificates past their end need no listing: the broker refuses them anyway.
            let certs: Vec<(String, String, Millis)> = query_all(
                conn,
                REVOKED_CERTIFICATES,
                params![now],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                "reading revoked certificates",
            )?;
            for (agent, serial, at) in certs {
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
            // Agents revoked without a recorded certificate (enrolled before certificates
            // were recorded): every credential of the id is refused until it enrolls again.
            let bare: Vec<String> = query_all(
                conn,
                "SELECT a.id FROM agents a WHERE a.revoked = 1 AND NOT EXISTS (SELECT 1 FROM agent_certificates c WHERE c.agent_id = a.id) ORDER BY a.id",
                params![],
                |r| r.get(0),
                "reading revoked agents",
            )?;
            for agent in bare {
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
        })
    }

    fn revocation_feed(&self, after: u64, limit: u32, now: Millis) -> StoreResult<RevocationPage> {
        self.read(|conn| {
            type FeedRow = (
                u64,
                String,
                Option<bool>,
                bool,
                Option<String>,
                Option<Millis>,
                Option<Millis>,
            );
            // One more entry than asked: whether more follow. Certificates past their end
            // need no listing, as in the tenant file.
            let rows: Vec<FeedRow> = query_all(
                conn,
                "SELECT f.seq, f.agent_id, a.revoked, EXISTS (SELECT 1 FROM agent_certificates x WHERE x.agent_id = f.agent_id), c.serial, c.not_after, c.revoked_at \
                 FROM (SELECT seq, agent_id FROM revocation_feed WHERE seq > ?1 ORDER BY seq LIMIT ?2) f \
                 LEFT JOIN agents a ON a.id = f.agent_id \
                 LEFT JOIN agent_certificates c ON c.agent_id = f.agent_id AND c.revoked_at IS NOT NULL AND c.not_after > ?3 \
                 ORDER BY f.seq, c.serial",
                params![after, u64::from(limit) + 1, now],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
                "reading the revocation feed",
            )?;
            let mut changes: Vec<RevocationChange> = Vec::new();
            for (cursor, id, revoked, has_certificates, serial, not_after, revoked_at) in rows {
                if changes.last().is_none_or(|c| c.cursor != cursor) {
                    // Removed before certificates were recorded: every credential of the id.
                    let whole = revoked == Some(true) && !has_certificates;
                    changes.push(RevocationChange {
                        cursor,
                        id,
                        revoked: whole.then_some(RevokedCredentials {
                            certificates: None,
                            revoked_at: None,
                        }),
                    });
                }
                let (Some(serial), Some(not_after), Some(at)) = (serial, not_after, revoked_at)
                else {
                    continue;
                };
                let Some(change) = changes.last_mut() else {
                    continue;
                };
                let entry = change.revoked.get_or_insert(RevokedCredentials {
                    certificates: Some(Vec::new()),
                    revoked_at: Some(at),
                });
                if let Some(list) = entry.certificates.as_mut() {
                    list.push((serial, not_after));
                }
                entry.revoked_at = entry.revoked_at.max(Some(at));
            }
            let more = changes.len() > limit as usize;
            changes.truncate(limit as usize);
            let next = changes.last().map_or(after, |c| c.cursor);
            Ok(RevocationPage {
                changes,
                next,
                more,
            })
        })
    }

    fn record_certificate(&self, id: &str, certificate: &CertificateRecord) -> StoreResult<()> {
        self.write(|tx| {
            if agent_revoked(tx, id)? != Some(false) {
                return Err(not_found("agent", id));
            }
            insert_certificate(tx, id, certificate)
        })
    }

    fn agent_by_secret(&self, id: &str, hash: &[u8; 32]) -> StoreResult<Agent> {
        self.read(|conn| {
            let stored: Option<(Vec<u8>, bool)> = query_opt(
                conn,
                "SELECT secret_hash, revoked FROM agents WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
                "checking an agent's secret",
            )?;
            let refused = || {
                StoreError::Refused(format!(
                    "agent {id:?} is not enrolled or its check-in token is wrong: enroll the agent again"
                ))
            };
            let (stored, revoked) = stored.ok_or_else(refused)?;
            if revoked
                || aws_lc_rs::constant_time::verify_slices_are_equal(&stored, &hash[..]).is_err()
            {
                return Err(refused());
            }
            load_agent(conn, id)
        })
    }

    fn record_checkin(
        &self,
        id: &str,
        inventory: Option<Inventory>,
        taken_over: bool,
        now: Millis,
    ) -> StoreResult<Checkin> {
        let Some(inv) = inventory else {
            return self.read(|conn| {
                let n = exec(
                    conn,
                    "UPDATE agents SET last_checkin = ?1 WHERE id = ?2 AND revoked = 0",
                    params![now, id],
                    "recording a check-in",
                )?;
                touched(n, "agent", id)?;
                Ok(Checkin {
                    agent: load_agent(conn, id)?,
                    newly_cloned: false,
                })
            });
        };
        self.write(|tx| {
            let before = load_agent(tx, id)?;
            if before.revoked {
                return Err(not_found("agent", id));
            }
            let history = query_opt(
                tx,
                "SELECT previous_inventory, inventory_changed_at FROM agents WHERE id = ?1",
                params![id],
                |r| {
                    let previous: Option<String> = r.get(0)?;
                    Ok(crate::clones::MachineHistory {
                        previous: previous.and_then(|p| serde_json::from_str(&p).ok()),
                        changed_at: r.get(1)?,
                    })
                },
                "reading an agent's machine history",
            )?
            .unwrap_or_default();
            let verdict =
                crate::clones::judge_checkin(&before.inventory, &history, &inv, taken_over, now);
            let newly_cloned =
                verdict == crate::clones::CheckinVerdict::Cloned && before.cloned.is_none();
            exec(
                tx,
                "UPDATE agents SET last_checkin = ?1, hostname = ?2, os = ?3, addresses = ?4, macs = ?5 WHERE id = ?6",
                params![now, &inv.hostname, &inv.os, to_json(&inv.addresses)?, to_json(&inv.macs)?, id],
                "recording a check-in",
            )?;
            if verdict != crate::clones::CheckinVerdict::SameMachine {
                // The machine recorded so far becomes the previous one: after a clone the
                // two stay side by side, whichever checked in last.
                exec(
                    tx,
                    "UPDATE agents SET previous_inventory = ?1, inventory_changed_at = ?2 WHERE id = ?3",
                    params![to_json(&before.inventory)?, now, id],
                    "recording an agent's machine change",
                )?;
            }
            if newly_cloned {
                exec(
                    tx,
                    "UPDATE agents SET clone_detected_at = ?1 WHERE id = ?2",
                    params![now, id],
                    "flagging a cloned agent",
                )?;
            }
            Ok(Checkin {
                agent: load_agent(tx, id)?,
                newly_cloned,
            })
        })
    }

    fn clear_clone_flag(&self, id: &str) -> StoreResult<Agent> {
        self.write(|tx| {
            let n = exec(
                tx,
                "UPDATE agents SET clone_detected_at = NULL, previous_inventory = NULL, inventory_changed_at = NULL WHERE id = ?1",
                params![id],
                "clearing an agent's cloned flag",
            )?;
            touched(n, "agent", id)?;
            load_agent(tx, id)
        })
    }

    fn reconcile_presence(&self, still_online: &[String], at: Millis) -> StoreResult<Vec<String>> {
        self.write(|tx| {
            let online: Vec<String> = query_all(
                tx,
                RECORDED_ONLINE,
                params![],
                |r| r.get(0),
                "reading presence",
            )?;
            let keep: std::collections::HashSet<&str> =
                still_online.iter().map(String::as_str).collect();
            let mut changed = Vec::new();
            for id in online.into_iter().filter(|id| !keep.contains(id.as_str())) {
                let n = exec(
                    tx,
                    "UPDATE agents SET presence = 'offline', presence_at = ?1 WHERE id = ?2 AND presence = 'online' AND (presence_at IS NULL OR presence_at <= ?1)",
                    params![at, &id],
                    "recording presence",
                )?;
                if n > 0 {
                    changed.push(id);
                }
            }
            Ok(changed)
        })
    }

    fn set_presences(&self, mut updates: Vec<PresenceUpdate>) -> StoreResult<()> {
        // Every console writes the presence it hears: rows in one order (each agent's events
        // in theirs) so that two consoles' transactions wait for each other, not deadlock.
        updates.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        self.write_again_on_deadlock(|tx| {
            // Retained presence may arrive late or twice: an older event never overwrites a
            // newer one.
            for u in &updates {
                exec(
                    tx,
                    "UPDATE agents SET presence = ?1, presence_at = ?2, path = COALESCE(?3, path), remote_addr = COALESCE(?4, remote_addr) WHERE id = ?5 AND (presence_at IS NULL OR presence_at <= ?2)",
                    params![u.presence.as_str(), u.at, &u.path, &u.remote_addr, &u.agent_id],
                    "recording presence",
                )?;
            }
            Ok(())
        })
    }

    fn create_group(&self, name: &str, description: &str, now: Millis) -> StoreResult<Group> {
        self.write(|tx| {
            if group_exists(tx, name)? {
                return Err(StoreError::Conflict(format!(
                    "group {name:?} already exists"
                )));
            }
            exec(
                tx,
                "INSERT INTO groups (name, description, created_at) VALUES (?1, ?2, ?3)",
                params![name, description, now],
                "creating a group",
            )?;
            Ok(Group {
                name: name.to_owned(),
                description: description.to_owned(),
                created_at: now,
                members: 0,
            })
        })
    }

    fn list_groups(&self) -> StoreResult<Vec<Group>> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT g.name, g.description, g.created_at, (SELECT COUNT(*) FROM agent_groups ag JOIN agents a ON a.id = ag.agent_id WHERE ag.group_name = g.name AND a.revoked = 0) FROM groups g ORDER BY g.name",
                params![],
                |r| {
                    Ok(Group {
                        name: r.get(0)?,
                        description: r.get(1)?,
                        created_at: r.get(2)?,
                        members: r.get(3)?,
                    })
                },
                "listing groups",
            )
        })
    }

    fn delete_group(&self, name: &str) -> StoreResult<()> {
        self.change_one(
            "DELETE FROM groups WHERE name = ?1",
            "group",
            name,
            "deleting a group",
        )
    }
}

/// The revoked certificates still valid at `?1`, in the order of agent_certificates_revoked
/// (which holds revoked certificates only: the list does not grow with every one issued).
pub(super) const REVOKED_CERTIFICATES: &str = "SELECT agent_id, serial, revoked_at FROM agent_certificates WHERE revoked_at IS NOT NULL AND not_after > ?1 ORDER BY agent_id, serial";
