//! Wake-up calls and deliveries.

use super::agents::{agent_revoked, check_groups_exist};
use super::*;
use crate::model::*;
use crate::store::*;

/// The tables of calls, for `migrate-store`.
pub(in crate::store) const CALL_TABLES: &[&Table] = &[
    &Table {
        name: "calls",
        key: "id",
        columns: CALL_COLUMNS,
        identity: None,
    },
    &Table {
        name: "deliveries",
        key: "wakeup_id",
        columns: DELIVERY_COLUMNS,
        identity: None,
    },
];

pub(super) const CALL_COLUMNS: &str =
    "id, created_at, created_by, reason, action, target, expires_at, spread";

/// A call read from [`CALL_COLUMNS`] starting at column `first` (after a join's other
/// columns), without its counts.
fn call_at(row: &Row, first: usize) -> Result<WakeCall, DbError> {
    Ok(WakeCall {
        id: row.get(first)?,
        created_at: row.get(first + 1)?,
        created_by: row.get(first + 2)?,
        reason: row.get(first + 3)?,
        action: row.get(first + 4)?,
        target: row.get(first + 5)?,
        expires_at: row.get(first + 6)?,
        spread: row.get(first + 7)?,
        counts: Default::default(),
    })
}

pub(super) fn fill_counts(conn: &mut dyn Conn, call: &mut WakeCall) -> StoreResult<()> {
    let rows: Vec<(String, u32)> = query_all(
        conn,
        "SELECT state, COUNT(*) FROM deliveries WHERE call_id = ?1 GROUP BY state",
        params![&call.id],
        |r| Ok((r.get(0)?, r.get(1)?)),
        "counting a call's states",
    )?;
    for (state, n) in rows {
        if let Some(state) = CallState::parse(&state) {
            call.counts.insert(state, n);
        }
    }
    Ok(())
}

pub(super) const DELIVERY_COLUMNS: &str = "call_id, agent_id, wakeup_id, state, queued_at, sent_at, delivered_at, started_at, finished_at, status, exit_code, duration_ms, detail, carried_by";

pub(super) fn delivery_from_row(row: &Row) -> Result<CallDelivery, DbError> {
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
        duration_ms: row.get::<Option<i64>>(11)?.map(|d| d.max(0) as u64),
        detail: row.get(12)?,
        carried_by: row.get(13)?,
    })
}

pub(super) fn load_call(conn: &mut dyn Conn, id: &str) -> StoreResult<WakeCall> {
    let mut call = query_opt(
        conn,
        &format!("SELECT {CALL_COLUMNS} FROM calls WHERE id = ?1"),
        params![id],
        |r| call_at(r, 0),
        "reading a call",
    )?
    .ok_or_else(|| not_found("wake-up call", id))?;
    fill_counts(conn, &mut call)?;
    Ok(call)
}

pub(super) fn state_column(state: CallState) -> Option<&'static str> {
    match state {
        CallState::Queued => None,
        CallState::Sent => Some("sent_at"),
        CallState::Delivered => Some("delivered_at"),
        CallState::Started => Some("started_at"),
        CallState::Finished | CallState::Expired | CallState::Failed => Some("finished_at"),
    }
}

pub(super) fn advance_in(
    tx: &mut dyn Conn,
    advance: &DeliveryAdvance,
) -> StoreResult<Vec<CallDelivery>> {
    let DeliveryAdvance {
        agent_id,
        wakeup_id,
        state,
        update,
        at,
    } = advance;
    let (state, at) = (*state, *at);
    let candidates: Vec<CallDelivery> = query_all(
        tx,
        &format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE (wakeup_id = ?1 OR carried_by = ?1) AND agent_id = ?2"
        ),
        params![wakeup_id, agent_id],
        delivery_from_row,
        "reading a delivery",
    )?;
    let mut changed = Vec::new();
    for mut d in candidates {
        if !d.state.may_become(state) {
            continue;
        }
        let set_time = state_column(state)
            .map(|c| format!(", {c} = ?2"))
            .unwrap_or_default();
        exec(
            tx,
            &format!(
                "UPDATE deliveries SET state = ?1{set_time}, status = COALESCE(?3, status), exit_code = COALESCE(?4, exit_code), duration_ms = COALESCE(?5, duration_ms), detail = COALESCE(?6, detail) WHERE wakeup_id = ?7"
            ),
            params![
                state.as_str(),
                at,
                &update.status,
                update.exit_code,
                update.duration_ms,
                &update.detail,
                &d.wakeup_id
            ],
            "updating a delivery",
        )?;
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

impl CallStore for SqlStore {
    fn create_call(
        &self,
        call: NewCall,
        now: Millis,
        new_wakeup_id: &mut dyn FnMut() -> String,
    ) -> StoreResult<(WakeCall, Vec<CallDelivery>)> {
        self.write(|tx| {
            let agent_ids = resolve_target(tx, &call.target)?;
            if agent_ids.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "{} has no enrolled agents: nothing to wake",
                    call.target.describe()
                )));
            }
            let (threshold, default_secs) = call.default_spread;
            let many = u32::try_from(agent_ids.len()).unwrap_or(u32::MAX) >= threshold;
            let spread = call.spread.unwrap_or(if many { default_secs } else { 0 });
            exec(
                tx,
                &format!(
                    "INSERT INTO calls ({CALL_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ),
                params![
                    &call.id,
                    now,
                    &call.created_by,
                    &call.reason,
                    &call.action,
                    call.target.describe(),
                    call.expires_at,
                    spread
                ],
                "recording a call",
            )?;
            let mut deliveries = Vec::with_capacity(agent_ids.len());
            for agent_id in agent_ids {
                let wakeup_id = new_wakeup_id();
                exec(
                    tx,
                    "INSERT INTO deliveries (wakeup_id, call_id, agent_id, state, queued_at) VALUES (?1, ?2, ?3, 'queued', ?4)",
                    params![&wakeup_id, &call.id, &agent_id, now],
                    "recording deliveries",
                )?;
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
            Ok((load_call(tx, &call.id)?, deliveries))
        })
    }

    fn call(&self, id: &str) -> StoreResult<(WakeCall, Vec<CallDelivery>)> {
        self.read(|conn| {
            let call = load_call(conn, id)?;
            let deliveries = query_all(
                conn,
                &format!(
                    "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE call_id = ?1 ORDER BY agent_id"
                ),
                params![id],
                delivery_from_row,
                "reading deliveries",
            )?;
            Ok((call, deliveries))
        })
    }

    fn list_calls(&self, limit: u32) -> StoreResult<Vec<WakeCall>> {
        self.read(|conn| {
            let mut calls = query_all(
                conn,
                &format!(
                    "SELECT {CALL_COLUMNS} FROM calls ORDER BY created_at DESC, id DESC LIMIT ?1"
                ),
                params![limit.max(1)],
                |r| call_at(r, 0),
                "listing calls",
            )?;
            for c in &mut calls {
                fill_counts(conn, c)?;
            }
            Ok(calls)
        })
    }

    fn advance_deliveries(&self, batch: Vec<DeliveryAdvance>) -> StoreResult<Vec<CallDelivery>> {
        self.write(|tx| {
            let mut changed = Vec::new();
            for a in &batch {
                changed.extend(advance_in(tx, a)?);
            }
            Ok(changed)
        })
    }

    fn pending_for_agent(
        &self,
        agent_id: &str,
        now: Millis,
    ) -> StoreResult<Vec<(WakeCall, CallDelivery)>> {
        let cols = qualified("d", DELIVERY_COLUMNS);
        let call_cols = qualified("c", CALL_COLUMNS);
        let first_call_column = DELIVERY_COLUMNS.split(", ").count();
        self.read(|conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {cols}, {call_cols} FROM deliveries d JOIN calls c ON c.id = d.call_id WHERE d.agent_id = ?1 AND d.state IN ('queued', 'sent') AND c.expires_at > ?2 ORDER BY d.queued_at, d.wakeup_id"
                ),
                params![agent_id, now],
                |r| Ok((call_at(r, first_call_column)?, delivery_from_row(r)?)),
                "reading pending wake-ups",
            )
        })
    }

    fn agents_with_queued(&self, now: Millis) -> StoreResult<Vec<String>> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT DISTINCT d.agent_id FROM deliveries d JOIN calls c ON c.id = d.call_id WHERE d.state = 'queued' AND c.expires_at > ?1",
                params![now],
                |r| r.get(0),
                "reading queued wake-ups",
            )
        })
    }

    fn count_deliveries(&self) -> StoreResult<[u64; 7]> {
        let rows = self.read(|conn| {
            query_all(
                conn,
                "SELECT state, COUNT(*) FROM deliveries GROUP BY state",
                params![],
                |r| Ok((r.get::<String>(0)?, r.get::<u64>(1)?)),
                "counting deliveries",
            )
        })?;
        let mut counts = [0; 7];
        for (state, n) in rows {
            if let Some(i) = CallState::ALL.iter().position(|s| s.as_str() == state) {
                counts[i] = n;
            }
        }
        Ok(counts)
    }

    fn set_carried_by(&self, carried: &[String], carrier: &str) -> StoreResult<()> {
        self.write(|tx| {
            for id in carried {
                exec(
                    tx,
                    "UPDATE deliveries SET carried_by = ?1 WHERE wakeup_id = ?2",
                    params![carrier, id],
                    "merging wake-ups",
                )?;
            }
            Ok(())
        })
    }

    fn expire_due(&self, now: Millis) -> StoreResult<Vec<CallDelivery>> {
        let cols = qualified("d", DELIVERY_COLUMNS);
        self.write(|tx| {
            let due: Vec<CallDelivery> = query_all(
                tx,
                &format!(
                    "SELECT {cols} FROM deliveries d JOIN calls c ON c.id = d.call_id WHERE d.state IN ('queued', 'sent') AND c.expires_at <= ?1"
                ),
                params![now],
                delivery_from_row,
                "finding expired wake-ups",
            )?;
            let mut out = Vec::with_capacity(due.len());
            for mut d in due {
                exec(
                    tx,
                    "UPDATE deliveries SET state = 'expired', finished_at = ?1 WHERE wakeup_id = ?2",
                    params![now, &d.wakeup_id],
                    "expiring wake-ups",
                )?;
                d.state = CallState::Expired;
                d.finished_at = Some(now);
                out.push(d);
            }
            Ok(out)
        })
    }
}

/// The live agents a call's target addresses, each once; a named agent that is not
/// enrolled fails the call.
fn resolve_target(tx: &mut dyn Conn, target: &CallTarget) -> StoreResult<Vec<String>> {
    match target {
        CallTarget::Agents(ids) => {
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if agent_revoked(tx, id)? != Some(false) {
                    return Err(StoreError::Invalid(format!(
                        "agent {id:?} is not enrolled: check the id (GET /api/v1/agents)"
                    )));
                }
                if !out.contains(id) {
                    out.push(id.clone());
                }
            }
            Ok(out)
        }
        CallTarget::Group(g) => {
            check_groups_exist(tx, std::slice::from_ref(g))?;
            query_all(
                tx,
                "SELECT a.id FROM agents a JOIN agent_groups ag ON ag.agent_id = a.id WHERE ag.group_name = ?1 AND a.revoked = 0 ORDER BY a.id",
                params![g],
                |r| r.get(0),
                "resolving a group",
            )
        }
        CallTarget::All => query_all(
            tx,
            "SELECT id FROM agents WHERE revoked = 0 ORDER BY id",
            params![],
            |r| r.get(0),
            "listing agents",
        ),
    }
}
