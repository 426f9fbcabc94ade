//! A registry made up for measuring the console at scale (`beckon bench console`): agents
//! with inventory, groups, presence online, offline and stale, and past calls with their
//! finished deliveries. The database makes the rows itself (a recursive `WITH` numbering
//! them, on either backend), a chunk per transaction, so that a million agents and ten
//! million deliveries take minutes, not hours.

use super::sql::{Value, exec, fold_agent_counts, params, query_one};
use super::*;

/// Agents written per transaction.
const AGENT_CHUNK: u64 = 50_000;

/// Agent ids are this prefix and the agent's number.
pub const SEED_AGENT_PREFIX: &str = "seed-agent-";

/// The group every `wake_group_every`-th agent is in: the one the bench calls.
pub const SEED_WAKE_GROUP: &str = "seed-wake";

/// Site groups: agent `i` is in `seed-site-{i % SEED_SITES}`.
pub const SEED_SITES: u64 = 10;

/// What to make.
#[derive(Debug, Clone)]
pub struct SeedPlan {
    /// Agents: 60% online, 30% offline (one in six of them stale: last seen 120 days ago),
    /// 10% of unknown presence.
    pub agents: u64,
    /// Members of [`SEED_WAKE_GROUP`] (at most `agents`), spread evenly over the agents.
    pub wake_group: u64,
    /// Past calls, each expired long ago.
    pub calls: u64,
    /// Deliveries of each call (at most `agents`): 85% finished, 10% expired, 5% failed.
    pub deliveries_per_call: u64,
    /// Now, unix ms: the times written are before it.
    pub now: Millis,
}

/// What was made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedReport {
    /// Agents written.
    pub agents: u64,
    /// Group memberships written.
    pub memberships: u64,
    /// Calls written.
    pub calls: u64,
    /// Deliveries written.
    pub deliveries: u64,
}

/// A day in unix ms.
const DAY: Millis = 24 * 3600 * 1000;

/// The numbers `?1` to `?2` (inclusive), as the rows `n(i)`.
const NUMBERS: &str = "WITH RECURSIVE n(i) AS (SELECT CAST(?1 AS BIGINT) UNION ALL SELECT i + 1 FROM n WHERE i < CAST(?2 AS BIGINT))";

impl SqlStore {
    /// Writes the registry `plan` describes into a store that has no agents, telling
    /// `progress` what it wrote so far (what, how many); then takes the database's
    /// statistics, as a database in use has them.
    pub fn seed_registry(
        &self,
        plan: &SeedPlan,
        progress: &mut dyn FnMut(&'static str, u64),
    ) -> StoreResult<SeedReport> {
        if plan.wake_group > plan.agents || plan.deliveries_per_call > plan.agents {
            return Err(StoreError::Invalid(format!(
                "the wake-up group ({}) and each call ({}) can hold at most the {} agents",
                plan.wake_group, plan.deliveries_per_call, plan.agents
            )));
        }
        let present: i64 =
            self.read(|c| query_one(c, "SELECT COUNT(*) FROM agents", &[], "counting agents"))?;
        if present > 0 {
            return Err(StoreError::Conflict(format!(
                "the database already holds {present} agents: seed an empty database"
            )));
        }
        let now = plan.now;
        let mut report = SeedReport::default();
        self.write(|tx| {
            let mut groups = vec![SEED_WAKE_GROUP.to_owned()];
            groups.extend((0..SEED_SITES).map(|s| format!("seed-site-{s}")));
            for g in groups {
                exec(
                    tx,
                    "INSERT INTO groups (name, description, created_at) VALUES (?1, ?2, ?3)",
                    params![&g, "made up by beckon bench console", now - 365 * DAY],
                    "seeding groups",
                )?;
            }
            Ok(())
        })?;
        let agents_sql = format!(
            "{NUMBERS} INSERT INTO agents (id, name, hostname, os, addresses, macs, enrolled_at, secret_hash, last_checkin, presence, presence_at, path, remote_addr, revoked) SELECT
                '{SEED_AGENT_PREFIX}' || i,
                'ws-' || i,
                'ws-' || i || '.corp.example',
                CASE i % 3 WHEN 0 THEN 'Debian 13' WHEN 1 THEN 'Windows 11' ELSE 'macOS 15' END,
                '[{{\"address\":\"10.' || (i / 65536 % 256) || '.' || (i / 256 % 256) || '.' || (i % 256) || '\",\"prefix_len\":8}}]',
                '[\"02:00:' || (10 + i / 1000000 % 90) || ':' || (10 + i / 10000 % 90) || ':' || (10 + i / 100 % 90) || ':' || (10 + i % 90) || '\"]',
                CASE WHEN i % 20 = 18 THEN CAST(?3 AS BIGINT) - {d300} ELSE CAST(?3 AS BIGINT) - {d200} END + i % 1000,
                ?4,
                CASE WHEN i % 20 = 18 THEN CAST(?3 AS BIGINT) - {d120} ELSE CAST(?3 AS BIGINT) - (i % 86400) * 1000 END,
                CASE WHEN i % 10 < 6 THEN 'online' WHEN i % 10 < 9 THEN 'offline' ELSE 'unknown' END,
                CASE WHEN i % 10 = 9 THEN NULL WHEN i % 20 = 18 THEN CAST(?3 AS BIGINT) - {d120} ELSE CAST(?3 AS BIGINT) - (i % 3600) * 1000 END,
                CASE WHEN i % 10 < 6 THEN 'broker-1' END,
                CASE WHEN i % 10 < 6 THEN '10.' || (i / 65536 % 256) || '.' || (i / 256 % 256) || '.' || (i % 256) || ':40000' END,
                0
            FROM n",
            d300 = 300 * DAY,
            d200 = 200 * DAY,
            d120 = 120 * DAY,
        );
        let spread = (plan.agents / plan.wake_group.max(1)).max(1);
        let groups_sql = format!(
            "{NUMBERS} INSERT INTO agent_groups (agent_id, group_name) SELECT '{SEED_AGENT_PREFIX}' || i, 'seed-site-' || (i % {SEED_SITES}) FROM n"
        );
        let wake_sql = format!(
            "{NUMBERS} INSERT INTO agent_groups (agent_id, group_name) SELECT '{SEED_AGENT_PREFIX}' || (i * {spread}), '{SEED_WAKE_GROUP}' FROM n"
        );
        let mut start = 0;
        while start < plan.agents {
            let end = (start + AGENT_CHUNK).min(plan.agents) - 1;
            let (first, last) = (start as i64, end as i64);
            self.write(|tx| {
                report.agents += exec(
                    tx,
                    &agents_sql,
                    params![first, last, now, &[0u8; 32]],
                    "seeding agents",
                )?;
                report.memberships +=
                    exec(tx, &groups_sql, params![first, last], "seeding groups")?;
                fold_agent_counts(tx)?;
                Ok(())
            })?;
            progress("agents", report.agents);
            start = end + 1;
        }
        if plan.wake_group > 0 {
            let last = plan.wake_group as i64 - 1;
            report.memberships += self
                .write(|tx| exec(tx, &wake_sql, params![0, last], "seeding the wake-up group"))?;
        }
        progress("group memberships", report.memberships);

        // Calls an hour apart, the last an hour ago; each to the next agents along.
        let deliveries_sql = format!(
            "{NUMBERS} INSERT INTO deliveries (wakeup_id, call_id, agent_id, state, queued_at, sent_at, delivered_at, started_at, finished_at, status, exit_code, duration_ms, detail) SELECT
                'seed-w-' || CAST(?3 AS BIGINT) || '-' || i,
                'seed-call-' || CAST(?3 AS BIGINT),
                '{SEED_AGENT_PREFIX}' || ((CAST(?3 AS BIGINT) * CAST(?4 AS BIGINT) + i) % CAST(?5 AS BIGINT)),
                CASE WHEN i % 20 < 17 THEN 'finished' WHEN i % 20 < 19 THEN 'expired' ELSE 'failed' END,
                CAST(?6 AS BIGINT),
                CASE WHEN i % 20 < 17 THEN CAST(?6 AS BIGINT) + 50 + i % 1000 END,
                CASE WHEN i % 20 < 17 THEN CAST(?6 AS BIGINT) + 300 + i % 1000 END,
                CASE WHEN i % 20 < 17 THEN CAST(?6 AS BIGINT) + 400 + i % 1000 END,
                CASE WHEN i % 20 < 17 THEN CAST(?6 AS BIGINT) + 5000 + i % 1000 WHEN i % 20 < 19 THEN CAST(?6 AS BIGINT) + 3600000 ELSE CAST(?6 AS BIGINT) + 1000 END,
                CASE WHEN i % 20 < 17 THEN 'ok' END,
                CASE WHEN i % 20 < 17 THEN 0 END,
                CASE WHEN i % 20 < 17 THEN 4000 + i % 1000 END,
                CASE WHEN i % 20 = 19 THEN 'the agent was revoked' END
            FROM n"
        );
        for k in 0..plan.calls {
            let created = now - (plan.calls - k) as i64 * 3600 * 1000;
            let call_id = format!("seed-call-{k}");
            self.write(|tx| {
                exec(
                    tx,
                    "INSERT INTO calls (id, created_at, created_by, reason, action, target, expires_at, spread, dispatcher) VALUES (?1, ?2, 'token:beckon bench console', 'made up by beckon bench console', NULL, 'all', ?3, 0, 'console')",
                    params![&call_id, created, created + 3_600_000],
                    "seeding calls",
                )?;
                if plan.deliveries_per_call > 0 {
                    let values: Vec<Value> = vec![
                        0i64.into(),
                        (plan.deliveries_per_call as i64 - 1).into(),
                        (k as i64).into(),
                        (plan.deliveries_per_call as i64).into(),
                        (plan.agents as i64).into(),
                        created.into(),
                    ];
                    report.deliveries +=
                        exec(tx, &deliveries_sql, &values, "seeding deliveries")?;
                }
                // The kept counts, as the console keeps them (an index range per state).
                exec(
                    tx,
                    "UPDATE calls SET n_finished = (SELECT COUNT(*) FROM deliveries d WHERE d.call_id = calls.id AND d.state = 'finished'), n_expired = (SELECT COUNT(*) FROM deliveries d WHERE d.call_id = calls.id AND d.state = 'expired'), n_failed = (SELECT COUNT(*) FROM deliveries d WHERE d.call_id = calls.id AND d.state = 'failed'), targeted = (SELECT COUNT(*) FROM deliveries d WHERE d.call_id = calls.id) WHERE id = ?1",
                    params![&call_id],
                    "counting a seeded call",
                )?;
                Ok(())
            })?;
            report.calls += 1;
            progress("deliveries", report.deliveries);
        }
        self.read(|c| exec(c, "ANALYZE", &[], "taking the database's statistics"))?;
        Ok(report)
    }
}

impl SqlStore {
    /// Makes an administrator's API token named `name` and returns its secret, for a
    /// program that measures the console through its API as a client would.
    pub fn make_api_token(&self, name: &str, now: Millis) -> StoreResult<String> {
        let token = crate::secrets::new_token("bkt_");
        self.create_api_token(NewApiToken {
            id: crate::secrets::new_id(),
            hash: crate::secrets::token_hash(&token),
            name: name.to_owned(),
            created_at: now,
            role: Role::Admin,
            created_by: None,
        })?;
        Ok(token)
    }
}
