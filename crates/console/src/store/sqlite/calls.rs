//! Wake-up calls and deliveries in SQLite.

use rusqlite::{Connection, Row, Transaction, params};

use super::agents::{agent_revoked, check_groups_exist};
use super::*;
use crate::model::*;
use crate::store::*;

pub(super) const CALL_COLUMNS: &str =
    "id, created_at, created_by, reason, action, target, expires_at, spread";

pub(super) fn call_from_row(row: &Row<'_>) -> rusqlite::Result<WakeCall> {
    call_at(row, 0)
}

/// A call read from [`CALL_COLUMNS`] starting at column `first` (after a join's other
/// columns), without its counts.
fn call_at(row: &Row<'_>, first: usize) -> rusqlite::Result<WakeCall> {
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

pub(super) fn fill_counts(conn: &Connection, call: &mut WakeCall) -> rusqlite::Result<()> {
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

pub(super) const DELIVERY_COLUMNS: &str = "call_id, agent_id, wakeup_id, state, queued_at, sent_at, delivered_at, started_at, finished_at, status, exit_code, duration_ms, detail, carried_by";

pub(super) fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<CallDelivery> {
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

pub(super) fn load_call(conn: &Connection, id: &str) -> StoreResult<WakeCall> {
    let mut call = query_opt(
        conn,
        &format!("SELECT {CALL_COLUMNS} FROM calls WHERE id = ?1"),
        [id],
        call_from_row,
        "reading a call",
    )?
    .ok_or_else(|| not_found("wake-up call", id))?;
    fill_counts(conn, &mut call).map_err(sql("counting a call's states"))?;
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
    tx: &Transaction<'_>,
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

impl CallStore for SqliteStore {
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
                    let live = agent_revoked(&tx, id)?;
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
                query_all(
                    &tx,
                    "SELECT a.id FROM agents a JOIN agent_groups ag ON ag.agent_id = a.id WHERE ag.group_name = ?1 AND a.revoked = 0 ORDER BY a.id",
                    [g],
                    |r| r.get(0),
                    "resolving a group",
                )?
            }
            CallTarget::All => query_all(
                &tx,
                "SELECT id FROM agents WHERE revoked = 0 ORDER BY id",
                [],
                |r| r.get(0),
                "listing agents",
            )?,
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
        let deliveries = query_all(
            &conn,
            &format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE call_id = ?1 ORDER BY agent_id"
            ),
            [id],
            delivery_from_row,
            "reading deliveries",
        )?;
        Ok((call, deliveries))
    }

    fn list_calls(&self, limit: u32) -> StoreResult<Vec<WakeCall>> {
        let conn = self.conn();
        let mut calls: Vec<WakeCall> = query_all(
            &conn,
            &format!("SELECT {CALL_COLUMNS} FROM calls ORDER BY created_at DESC, id DESC LIMIT ?1"),
            [limit.max(1)],
            call_from_row,
            "listing calls",
        )?;
        for c in &mut calls {
            fill_counts(&conn, c).map_err(sql("counting a call's states"))?;
        }
        Ok(calls)
    }

    fn advance_deliveries(&self, batch: Vec<DeliveryAdvance>) -> StoreResult<Vec<CallDelivery>> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        let mut changed = Vec::new();
        for a in &batch {
            changed.extend(advance_in(&tx, a)?);
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
        let cols = qualified("d", DELIVERY_COLUMNS);
        let call_cols = qualified("c", CALL_COLUMNS);
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {cols}, {call_cols} FROM deliveries d JOIN calls c ON c.id = d.call_id WHERE d.agent_id = ?1 AND d.state IN ('queued', 'sent') AND c.expires_at > ?2 ORDER BY d.queued_at, d.wakeup_id"
            ))
            .map_err(sql("reading pending wake-ups"))?;
        let first_call_column = DELIVERY_COLUMNS.split(", ").count();
        stmt.query_map(params![agent_id, now], |r| {
            Ok((call_at(r, first_call_column)?, delivery_from_row(r)?))
        })
        .and_then(|rows| rows.collect())
        .map_err(sql("reading pending wake-ups"))
    }

    fn agents_with_queued(&self, now: Millis) -> StoreResult<Vec<String>> {
        let conn = self.conn();
        query_all(
            &conn,
            "SELECT DISTINCT d.agent_id FROM deliveries d JOIN calls c ON c.id = d.call_id WHERE d.state = 'queued' AND c.expires_at > ?1",
            [now],
            |r| r.get(0),
            "reading queued wake-ups",
        )
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
            let cols = qualified("d", DELIVERY_COLUMNS);
            query_all(
                &tx,
                &format!(
                    "SELECT {cols} FROM deliveries d JOIN calls c ON c.id = d.call_id WHERE d.state IN ('queued', 'sent') AND c.expires_at <= ?1"
                ),
                [now],
                delivery_from_row,
                "finding expired wake-ups",
            )?
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
}
