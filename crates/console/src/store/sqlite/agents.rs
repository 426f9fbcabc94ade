//! Agents and groups in SQLite.

use rusqlite::{Connection, Row, Transaction, params};

use super::auth::{TOKEN_COLUMNS, token_from_row};
use super::*;
use crate::model::*;
use crate::store::*;

pub(super) fn insert_certificate(
    tx: &Transaction<'_>,
    agent: &str,
    c: &CertificateRecord,
) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO agent_certificates (serial, agent_id, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
        params![c.serial, agent, c.issued_at, c.not_after],
    )
    .map_err(sql("recording an agent certificate"))?;
    Ok(())
}

pub(super) const AGENT_COLUMNS: &str = "id, name, hostname, os, addresses, macs, enrolled_at, last_checkin, presence, presence_at, path, remote_addr, revoked";

/// The condition of a stale agent, last seen before `before` (an SQL value): not online,
/// and its enrollment, last check-in and last presence change all before then.
fn stale(before: &str) -> String {
    format!(
        "presence <> 'online' AND enrolled_at < {before} AND COALESCE(last_checkin, 0) < {before} AND COALESCE(presence_at, 0) < {before}"
    )
}

pub(super) fn agent_from_row(row: &Row<'_>) -> rusqlite::Result<Agent> {
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

pub(super) fn fill_groups(conn: &Connection, agent: &mut Agent) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "SELECT group_name FROM agent_groups WHERE agent_id = ?1 ORDER BY group_name",
    )?;
    agent.groups = stmt
        .query_map([&agent.id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(())
}

/// Whether the agent `id` is revoked; `None` when there is no such agent.
pub(super) fn agent_revoked(conn: &Connection, id: &str) -> StoreResult<Option<bool>> {
    query_opt(
        conn,
        "SELECT revoked FROM agents WHERE id = ?1",
        [id],
        |r| r.get(0),
        "checking an agent",
    )
}

pub(super) fn load_agent(conn: &Connection, id: &str) -> StoreResult<Agent> {
    let mut agent = query_opt(
        conn,
        &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = ?1"),
        [id],
        agent_from_row,
        "reading an agent",
    )?
    .ok_or_else(|| not_found("agent", id))?;
    fill_groups(conn, &mut agent).map_err(sql("reading an agent's groups"))?;
    Ok(agent)
}

fn group_exists(conn: &Connection, name: &str) -> StoreResult<bool> {
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM groups WHERE name = ?1)",
        [name],
        |r| r.get(0),
    )
    .map_err(sql("checking a group"))
}

pub(super) fn check_groups_exist(conn: &Connection, groups: &[String]) -> StoreResult<()> {
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
    tx: &Transaction<'_>,
    agent_id: &str,
    groups: &[String],
) -> StoreResult<()> {
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

impl AgentStore for SqliteStore {
    fn enroll_agent(
        &self,
        token_hash: &[u8; 32],
        agent: NewAgent,
        now: Millis,
    ) -> StoreResult<Agent> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let token = query_opt(
            &tx,
            &format!("SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE hash = ?1"),
            [&token_hash[..]],
            token_from_row,
            "reading an enrollment token",
        )?
        .ok_or_else(|| {
            StoreError::Refused(
                "the enrollment token is not known: check it, or ask an administrator for a new one"
                    .into(),
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
        let existing = agent_revoked(&tx, &agent.id)?;
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
        if let Some(before) = f.stale_before {
            where_.push(stale(&before.to_string()));
        }
        let limit = if f.limit == 0 { 1000 } else { f.limit };
        let query = format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE {} ORDER BY name, id LIMIT {limit} OFFSET {}",
            where_.join(" AND "),
            f.offset
        );
        let mut agents: Vec<Agent> = query_all(
            &conn,
            &query,
            rusqlite::params_from_iter(args.iter()),
            agent_from_row,
            "listing agents",
        )?;
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

    fn count_stale_agents(&self, before: Millis) -> StoreResult<u64> {
        self.conn()
            .query_row(
                &format!(
                    "SELECT COUNT(*) FROM agents WHERE revoked = 0 AND {}",
                    stale("?1")
                ),
                [before],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n.max(0) as u64)
            .map_err(sql("counting stale agents"))
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
            return Err(not_found("agent", id));
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
        touched(n, "agent", id)?;
        tx.execute(
            "UPDATE agent_certificates SET revoked_at = ?2 WHERE agent_id = ?1 AND revoked_at IS NULL",
            params![id, now],
        )
        .map_err(sql("revoking an agent's certificates"))?;
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
        let revoked = agent_revoked(&tx, id)?;
        if revoked != Some(false) {
            return Err(not_found("agent", id));
        }
        insert_certificate(&tx, id, certificate)?;
        tx.commit().map_err(sql("recording a certificate"))?;
        Ok(())
    }

    fn agent_by_secret(&self, id: &str, hash: &[u8; 32]) -> StoreResult<Agent> {
        let conn = self.conn();
        let stored: Option<(Vec<u8>, bool)> = query_opt(
            &conn,
            "SELECT secret_hash, revoked FROM agents WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
            "checking an agent's secret",
        )?;
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
        touched(n, "agent", id)?;
        load_agent(&conn, id)
    }

    fn reconcile_presence(&self, still_online: &[String], at: Millis) -> StoreResult<Vec<String>> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let online: Vec<String> = query_all(
            &tx,
            "SELECT id FROM agents WHERE presence = 'online'",
            [],
            |r| r.get(0),
            "reading presence",
        )?;
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

    fn set_presences(&self, updates: Vec<PresenceUpdate>) -> StoreResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        {
            // Retained presence may arrive late or twice: an older event never overwrites a
            // newer one.
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
        if group_exists(&conn, name)? {
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
        query_all(
            &conn,
            "SELECT g.name, g.description, g.created_at, (SELECT COUNT(*) FROM agent_groups ag JOIN agents a ON a.id = ag.agent_id WHERE ag.group_name = g.name AND a.revoked = 0) FROM groups g ORDER BY g.name",
            [],
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
    }

    fn delete_group(&self, name: &str) -> StoreResult<()> {
        let n = self
            .conn()
            .execute("DELETE FROM groups WHERE name = ?1", [name])
            .map_err(sql("deleting a group"))?;
        touched(n, "group", name)
    }
}
