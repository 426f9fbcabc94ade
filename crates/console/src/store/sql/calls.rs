//! Wake-up calls and deliveries.

use super::agents::{self, agent_revoked, check_groups_exist};
use super::record::{self, CALLS_TO_RECORD};
use super::*;
use super::{auth, wol};
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
    &Table {
        name: "call_unrecorded",
        key: "call_id, chunk",
        columns: "call_id, chunk, agent_ids",
        identity: None,
    },
];

/// A call's columns: what it is, then how many of its deliveries are in each state
/// ([`COUNT_COLUMNS`]).
pub(super) const CALL_COLUMNS: &str = "id, created_at, created_by, reason, action, target, expires_at, spread, dispatcher, n_queued, n_sent, n_delivered, n_started, n_finished, n_expired, n_failed, targeted";

/// The columns of a call's counts, in [`CallState::ALL`]'s order: one per state, so that a
/// new state cannot go without its column. Public for the tests that take a database back
/// before the migration that added them.
pub const COUNT_COLUMNS: [&str; CallState::ALL.len()] = [
    "n_queued",
    "n_sent",
    "n_delivered",
    "n_started",
    "n_finished",
    "n_expired",
    "n_failed",
];

/// The column of [`CALL_COLUMNS`] where the counts start.
const FIRST_COUNT: usize = 9;

/// A call read from [`CALL_COLUMNS`] starting at column `first` (after a join's other
/// columns), with its counts (the states no delivery is in left out).
fn call_at(row: &Row, first: usize) -> Result<WakeCall, DbError> {
    let mut counts = std::collections::BTreeMap::new();
    for (i, state) in CallState::ALL.into_iter().enumerate() {
        let n: u32 = row.get(first + FIRST_COUNT + i)?;
        if n > 0 {
            counts.insert(state, n);
        }
    }
    Ok(WakeCall {
        id: row.get(first)?,
        created_at: row.get(first + 1)?,
        created_by: row.get(first + 2)?,
        reason: row.get(first + 3)?,
        action: row.get(first + 4)?,
        target: row.get(first + 5)?,
        expires_at: row.get(first + 6)?,
        spread: row.get(first + 7)?,
        counts,
        targeted: row.get(first + FIRST_COUNT + COUNT_COLUMNS.len())?,
    })
}

/// Changes to calls' counts, gathered while a transaction moves deliveries and written at
/// its end ([`write`](Self::write)): one update per call, in call id order and after the
/// deliveries' rows, so that consoles writing at once lock rows in one order.
#[derive(Default)]
pub(super) struct CountChanges(std::collections::BTreeMap<String, [i64; 7]>);

impl CountChanges {
    /// One delivery of `call` moved from `from` to `to`.
    pub(super) fn moved(&mut self, call: &str, from: CallState, to: CallState) {
        let change = self.0.entry(call.to_owned()).or_default();
        change[from as usize] -= 1;
        change[to as usize] += 1;
    }

    /// Writes the changes to the calls' counts.
    pub(super) fn write(self, tx: &mut dyn Conn) -> StoreResult<()> {
        let set = COUNT_COLUMNS
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = {c} + ?{}", i + 2))
            .collect::<Vec<_>>()
            .join(", ");
        let statement = format!("UPDATE calls SET {set} WHERE id = ?1");
        for (call, change) in self.0 {
            if change == [0; 7] {
                continue;
            }
            let mut values = vec![Value::from(call)];
            values.extend(change.map(Value::from));
            exec(tx, &statement, &values, "counting a call's states")?;
        }
        Ok(())
    }
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
    query_opt(
        conn,
        &format!("SELECT {CALL_COLUMNS} FROM calls WHERE id = ?1"),
        params![id],
        |r| call_at(r, 0),
        "reading a call",
    )?
    .ok_or_else(|| not_found("wake-up call", id))
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
    counts: &mut CountChanges,
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
        &advance_candidates_query(),
        params![wakeup_id, agent_id],
        delivery_from_row,
        "reading a delivery",
    )?;
    let mut changed = Vec::new();
    for mut d in candidates {
        // Every console writes the acks it hears, so another may move this delivery between
        // the read and the write: the write applies to the state read only, and on a miss
        // the delivery is read again (states only move forward, so this ends).
        let mut attempts = 0;
        loop {
            if !d.state.may_become(state) {
                break;
            }
            let set_time = state_column(state)
                .map(|c| format!(", {c} = ?2"))
                .unwrap_or_default();
            let written = exec(
                tx,
                &format!(
                    "UPDATE deliveries SET state = ?1{set_time}, status = COALESCE(?3, status), exit_code = COALESCE(?4, exit_code), duration_ms = COALESCE(?5, duration_ms), detail = COALESCE(?6, detail) WHERE wakeup_id = ?7 AND state = ?8"
                ),
                params![
                    state.as_str(),
                    at,
                    &update.status,
                    update.exit_code,
                    update.duration_ms,
                    &update.detail,
                    &d.wakeup_id,
                    d.state.as_str()
                ],
                "updating a delivery",
            )?;
            if written == 1 {
                counts.moved(&d.call_id, d.state, state);
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
                break;
            }
            attempts += 1;
            let again = query_opt(
                tx,
                &format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE wakeup_id = ?1"),
                params![&d.wakeup_id],
                delivery_from_row,
                "reading a delivery",
            )?;
            match again {
                Some(now) if attempts < 8 => d = now,
                _ => break,
            }
        }
    }
    Ok(changed)
}

/// The deliveries an ack for the wake-up `?1` of the agent `?2` moves: its own, and those it
/// carried. Two index lookups: written as one `OR`, SQLite (no statistics) walked all of the
/// agent's deliveries from every call it ever had, so each ack cost more as calls piled up.
pub(crate) fn advance_candidates_query() -> String {
    format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE wakeup_id = ?1 AND agent_id = ?2 \
         UNION ALL SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE carried_by = ?1 AND agent_id = ?2 AND wakeup_id <> ?1 \
         ORDER BY wakeup_id"
    )
}

/// The deliveries of the agent `?1` queued or sent, of calls of this console (`?3`)
/// unexpired at `?2`, with their calls (an index range of the agent's deliveries).
fn pending_query() -> String {
    format!(
        "SELECT {}, {} FROM deliveries d JOIN calls c ON c.id = d.call_id WHERE d.agent_id = ?1 AND d.state IN ('queued', 'sent') AND c.expires_at > ?2 AND c.dispatcher = ?3 ORDER BY d.queued_at, d.wakeup_id",
        qualified("d", DELIVERY_COLUMNS),
        qualified("c", CALL_COLUMNS)
    )
}

/// The largest notice payload sent at once (PostgreSQL takes up to 8000 bytes).
const MAX_NOTICE: usize = 7000;

/// Tells the other consoles about `changed` (see [`Conn::notify`]): `{"from": instance,
/// "changes": [[call, agent, state], ...]}`, in as many notices as it takes.
fn notify_changes(tx: &mut dyn Conn, instance: &str, changed: &[CallDelivery]) -> StoreResult<()> {
    let mut batch: Vec<[&str; 3]> = Vec::new();
    let mut size = 0;
    let send = |tx: &mut dyn Conn, batch: &mut Vec<[&str; 3]>| {
        if batch.is_empty() {
            return Ok(());
        }
        let payload = serde_json::json!({"from": instance, "changes": batch}).to_string();
        batch.clear();
        exec_notify(tx, &payload)
    };
    for d in changed {
        let entry = [d.call_id.as_str(), d.agent_id.as_str(), d.state.as_str()];
        let len = entry.iter().map(|e| e.len() + 6).sum::<usize>();
        if size + len > MAX_NOTICE - instance.len() - 32 {
            send(tx, &mut batch)?;
            size = 0;
        }
        size += len;
        batch.push(entry);
    }
    send(tx, &mut batch)
}

fn exec_notify(tx: &mut dyn Conn, payload: &str) -> StoreResult<()> {
    tx.notify(payload)
        .map_err(sql("telling other consoles about delivery changes"))
}

/// The delivery changes of another console's notice (empty for this process's own, and for
/// anything that is not a notice).
pub(in crate::store) fn read_notice(payload: &str, own_instance: &str) -> Vec<DeliveryChange> {
    #[derive(serde::Deserialize)]
    struct Notice {
        from: String,
        changes: Vec<(String, String, String)>,
    }
    let Ok(notice) = serde_json::from_str::<Notice>(payload) else {
        return Vec::new();
    };
    if notice.from == own_instance {
        return Vec::new();
    }
    notice
        .changes
        .into_iter()
        .filter_map(|(call_id, agent_id, state)| {
            Some(DeliveryChange {
                call_id,
                agent_id,
                state: CallState::parse(&state)?,
            })
        })
        .collect()
}

/// The most deliveries written per statement when a call is made (a power of two).
const INSERT_ROWS: usize = 1024;

/// Writes queued deliveries of `call` for `agent_ids`, with fresh wake-up ids.
pub(super) fn insert_queued(
    tx: &mut dyn Conn,
    call: &str,
    agent_ids: &[String],
    now: Millis,
    new_wakeup_id: &mut dyn FnMut() -> String,
) -> StoreResult<Vec<CallDelivery>> {
    let deliveries: Vec<CallDelivery> = agent_ids
        .iter()
        .map(|agent_id| CallDelivery {
            call_id: call.to_owned(),
            agent_id: agent_id.clone(),
            wakeup_id: new_wakeup_id(),
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
        })
        .collect();
    // Many rows per statement: a chunk of 4,096 agents is four round trips to PostgreSQL,
    // not 4,096. Statements of powers of two rows, so that a few statements, each prepared
    // once, serve every size.
    let mut rest = &deliveries[..];
    while !rest.is_empty() {
        let size = INSERT_ROWS.min(1 << rest.len().ilog2());
        let (part, after) = rest.split_at(size);
        rest = after;
        let rows = (0..part.len())
            .map(|r| format!("(?{}, ?1, ?{}, 'queued', ?2)", 3 + 2 * r, 4 + 2 * r))
            .collect::<Vec<_>>()
            .join(", ");
        let mut values = vec![Value::from(call), Value::from(now)];
        for d in part {
            values.push(Value::from(&d.wakeup_id));
            values.push(Value::from(&d.agent_id));
        }
        exec(
            tx,
            &format!(
                "INSERT INTO deliveries (wakeup_id, call_id, agent_id, state, queued_at) VALUES {rows}"
            ),
            &values,
            "recording deliveries",
        )?;
    }
    Ok(deliveries)
}

impl CallStore for SqlStore {
    fn create_call_with_target(
        &self,
        call: NewCall,
        now: Millis,
        new_wakeup_id: &mut dyn FnMut() -> String,
    ) -> StoreResult<(WakeCall, Vec<CallDelivery>, Vec<String>)> {
        let chunk = self.call_chunk;
        self.write_ordered(RevocationOrder::Shared, |tx| {
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
            let (first, rest) = agent_ids.split_at(chunk.min(agent_ids.len()));
            exec(
                tx,
                "INSERT INTO calls (id, created_at, created_by, reason, action, target, expires_at, spread, dispatcher, n_queued, targeted) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    &call.id,
                    now,
                    &call.created_by,
                    &call.reason,
                    &call.action,
                    call.target.describe(),
                    call.expires_at,
                    spread,
                    &self.console,
                    first.len() as u64,
                    agent_ids.len() as u64
                ],
                "recording a call",
            )?;
            let deliveries = insert_queued(tx, &call.id, first, now, new_wakeup_id)?;
            record::keep_unrecorded(tx, &call.id, rest, chunk)?;
            Ok((load_call(tx, &call.id)?, deliveries, agent_ids))
        })
    }

    fn calls_to_record(&self, now: Millis) -> StoreResult<Vec<String>> {
        record::calls_to_record(self, now)
    }

    fn record_chunk(
        &self,
        call_id: &str,
        now: Millis,
        new_wakeup_id: &mut dyn FnMut() -> String,
    ) -> StoreResult<Option<RecordedChunk>> {
        record::record_chunk(self, call_id, now, new_wakeup_id)
    }

    fn shares_one_connection(&self) -> bool {
        self.db.shares_one_connection()
    }

    fn call(&self, id: &str) -> StoreResult<WakeCall> {
        self.read(|conn| load_call(conn, id))
    }

    fn call_deliveries(&self, id: &str, query: &DeliveryQuery) -> StoreResult<DeliveryPage> {
        let limit = query.limit.clamp(1, MAX_DELIVERY_PAGE);
        let mut statement = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE call_id = ?1");
        let mut values = vec![Value::from(id)];
        if let Some(state) = query.state {
            values.push(state.as_str().into());
            statement.push_str(&format!(" AND state = ?{}", values.len()));
        }
        if let Some(after) = &query.after {
            values.push(after.into());
            statement.push_str(&format!(" AND agent_id > ?{}", values.len()));
        }
        // One more than asked: whether there is a next page.
        values.push((limit + 1).into());
        statement.push_str(&format!(" ORDER BY agent_id LIMIT ?{}", values.len()));
        self.read(|conn| {
            load_call(conn, id)?;
            let mut deliveries = query_all(
                conn,
                &statement,
                &values,
                delivery_from_row,
                "reading deliveries",
            )?;
            let next_after = if deliveries.len() > limit as usize {
                deliveries.truncate(limit as usize);
                deliveries.last().map(|d| d.agent_id.clone())
            } else {
                None
            };
            Ok(DeliveryPage {
                deliveries,
                next_after,
            })
        })
    }

    fn list_calls(&self, limit: u32) -> StoreResult<Vec<WakeCall>> {
        self.read(|conn| {
            query_all(
                conn,
                &list_calls_query(),
                params![limit.max(1)],
                |r| call_at(r, 0),
                "listing calls",
            )
        })
    }

    fn advance_deliveries(
        &self,
        mut batch: Vec<DeliveryAdvance>,
    ) -> StoreResult<Vec<CallDelivery>> {
        // Every console writes the acks it hears: rows in one order (each delivery's
        // advances in theirs) so that two consoles' transactions wait for each other.
        batch.sort_by(|a, b| a.wakeup_id.cmp(&b.wakeup_id));
        self.write_again_on_deadlock(|tx| {
            let mut changed = Vec::new();
            let mut counts = CountChanges::default();
            for a in &batch {
                changed.extend(advance_in(tx, a, &mut counts)?);
            }
            counts.write(tx)?;
            notify_changes(tx, &self.instance, &changed)?;
            Ok(changed)
        })
    }

    fn pending_for_agent(
        &self,
        agent_id: &str,
        now: Millis,
    ) -> StoreResult<Vec<(WakeCall, CallDelivery)>> {
        let first_call_column = DELIVERY_COLUMNS.split(", ").count();
        self.read(|conn| {
            query_all(
                conn,
                &pending_query(),
                params![agent_id, now, &self.console],
                |r| Ok((call_at(r, first_call_column)?, delivery_from_row(r)?)),
                "reading pending wake-ups",
            )
        })
    }

    fn agents_with_queued(&self, now: Millis) -> StoreResult<Vec<String>> {
        self.read(|conn| {
            query_all(
                conn,
                AGENTS_WITH_QUEUED,
                params![now, &self.console],
                |r| r.get(0),
                "reading queued wake-ups",
            )
        })
    }

    fn count_deliveries(&self) -> StoreResult<[u64; 7]> {
        let row = self.read(|conn| {
            query_opt(
                conn,
                &count_deliveries_query(),
                params![],
                |r| Ok(r.clone()),
                "counting deliveries",
            )
        })?;
        let mut counts = [0; 7];
        if let Some(row) = row {
            for (i, n) in counts.iter_mut().enumerate() {
                *n = row.get(i).map_err(sql("counting deliveries"))?;
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

    fn hold_lease(&self, now: Millis, lease: Millis) -> StoreResult<bool> {
        self.read(|conn| {
            let held = exec(
                conn,
                "INSERT INTO console_leases (console_id, instance, expires_at) VALUES (?1, ?2, ?3) ON CONFLICT (console_id) DO UPDATE SET instance = excluded.instance, expires_at = excluded.expires_at WHERE console_leases.instance = excluded.instance OR console_leases.expires_at <= ?4",
                params![&self.console, &self.instance, now + lease, now],
                "renewing the console's dispatch lease",
            )?;
            Ok(held == 1)
        })
    }

    fn take_over_calls(&self, now: Millis) -> StoreResult<Takeover> {
        self.write(|tx| {
            // Unexpired calls of no console, or of one whose lease ran out (or that never
            // held one): a few rows, as calls expire.
            let orphans: Vec<(String, Option<String>)> = query_all(
                tx,
                ORPHAN_CALLS,
                params![now, &self.console],
                |r| Ok((r.get(0)?, r.get(1)?)),
                "finding calls whose console stopped",
            )?;
            let mut takeover = Takeover::default();
            for (call, from) in orphans {
                // Only if still where it was read: of two consoles taking over, one wins.
                let taken = exec(
                    tx,
                    "UPDATE calls SET dispatcher = ?1 WHERE id = ?2 AND COALESCE(dispatcher, '') = ?3",
                    params![&self.console, &call, from.clone().unwrap_or_default()],
                    "taking over a call",
                )?;
                if taken == 0 {
                    continue;
                }
                let agents: Vec<(String, String)> = query_all(
                    tx,
                    TAKEN_AGENTS,
                    params![&call],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                    "reading a taken call's pending deliveries",
                )?;
                for (agent, presence) in agents {
                    if presence == Presence::Online.as_str() {
                        takeover.online.push(agent);
                    } else {
                        takeover.offline.push(agent);
                    }
                }
                takeover.calls.push((call, from));
            }
            Ok(takeover)
        })
    }

    fn follow_changes(
        &self,
        on_change: &mut dyn FnMut(Vec<DeliveryChange>),
        stop: &std::sync::atomic::AtomicBool,
    ) -> StoreResult<()> {
        self.db.follow_notices(
            &mut |payload| {
                let changes = read_notice(payload, &self.instance);
                if !changes.is_empty() {
                    on_change(changes);
                }
            },
            stop,
        )
    }

    fn expire_due(&self, now: Millis) -> StoreResult<Vec<CallDelivery>> {
        self.write_again_on_deadlock(|tx| {
            // Only calls with wake-ups still queued or sent (the partial index calls_open):
            // nothing to read once every due call is swept, however many deliveries are kept.
            let calls: Vec<String> = query_all(
                tx,
                DUE_CALLS,
                params![now],
                |r| r.get(0),
                "finding expired calls",
            )?;
            let calls = {
                let mut calls = calls;
                calls.sort_unstable();
                calls
            };
            let mut due = Vec::new();
            for call in &calls {
                due.extend(query_all(
                    tx,
                    &due_deliveries_query(),
                    params![call],
                    delivery_from_row,
                    "finding expired wake-ups",
                )?);
            }
            // Rows in one order, as every console's writes of deliveries.
            due.sort_by(|a, b| a.wakeup_id.cmp(&b.wakeup_id));
            let mut out = Vec::with_capacity(due.len());
            let mut counts = CountChanges::default();
            for mut d in due {
                // Every console sweeps: the one that expires a delivery first tells.
                let expired = exec(
                    tx,
                    "UPDATE deliveries SET state = 'expired', finished_at = ?1 WHERE wakeup_id = ?2 AND state = ?3",
                    params![now, &d.wakeup_id, d.state.as_str()],
                    "expiring wake-ups",
                )?;
                if expired == 1 {
                    counts.moved(&d.call_id, d.state, CallState::Expired);
                    d.state = CallState::Expired;
                    d.finished_at = Some(now);
                    out.push(d);
                }
            }
            counts.write(tx)?;
            notify_changes(tx, &self.instance, &out)?;
            Ok(out)
        })
    }
}

/// The newest `?1` calls (the calls page): from the end of calls_created.
fn list_calls_query() -> String {
    format!("SELECT {CALL_COLUMNS} FROM calls ORDER BY created_at DESC, id DESC LIMIT ?1")
}

/// The calls the expiry sweep looks at every second: expired by `?1` with wake-ups still
/// queued or sent. The condition `n_queued + n_sent > 0` is that of the partial index
/// calls_open, which holds these calls only. No `ORDER BY id`: for it, SQLite walked every
/// call ever made in id order rather than the index (the sweep orders what it found).
pub(super) const DUE_CALLS: &str =
    "SELECT id FROM calls WHERE n_queued + n_sent > 0 AND expires_at <= ?1";

/// The deliveries of the expired call `?1` still queued or sent (an index range).
pub(super) fn due_deliveries_query() -> String {
    format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE call_id = ?1 AND state IN ('queued', 'sent')"
    )
}

/// The agents with wake-ups of this console (`?2`) queued and unexpired at `?1` (read when
/// the console connects to the broker): from the open calls, then each one's queued range.
/// Written as a join, SQLite (no statistics) walked every delivery ever kept in agent order
/// for the `DISTINCT`.
pub(super) const AGENTS_WITH_QUEUED: &str = "SELECT DISTINCT agent_id FROM deliveries WHERE state = 'queued' AND call_id IN (SELECT id FROM calls WHERE n_queued + n_sent > 0 AND n_queued > 0 AND expires_at > ?1 AND dispatcher = ?2)";

/// The unexpired calls (at `?1`) of no console or of one whose lease ran out, other than
/// this console's (`?2`): looked for every second; a range of calls_expires_at.
pub(super) const ORPHAN_CALLS: &str = "SELECT c.id, c.dispatcher FROM calls c LEFT JOIN console_leases l ON l.console_id = c.dispatcher WHERE c.expires_at > ?1 AND (c.dispatcher IS NULL OR (c.dispatcher <> ?2 AND (l.expires_at IS NULL OR l.expires_at <= ?1)))";

/// The agents still waiting for a wake-up of the call `?1` just taken over, with their
/// presence (an index range of the call's queued and sent deliveries).
pub(super) const TAKEN_AGENTS: &str = "SELECT DISTINCT d.agent_id, a.presence FROM deliveries d JOIN agents a ON a.id = d.agent_id WHERE d.call_id = ?1 AND d.state IN ('queued', 'sent')";

/// The totals of every state (metrics), from the calls' counts.
pub(super) fn count_deliveries_query() -> String {
    let sums = COUNT_COLUMNS
        .iter()
        .map(|c| format!("CAST(COALESCE(SUM({c}), 0) AS BIGINT)"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {sums} FROM calls")
}

impl SqlStore {
    /// The plans the database makes now for the queries the console runs periodically or
    /// per event (expiry sweep, takeover, recorder, metrics, the dashboard's counts, connecting to the
    /// broker, an agent coming online, an ack), each
    /// with what it is for: `EXPLAIN QUERY PLAN` on SQLite, `EXPLAIN` on PostgreSQL. At
    /// `now`, with example ids; for the documentation and the tests that no such query reads
    /// the whole deliveries table.
    pub fn periodic_query_plans(&self, now: Millis) -> StoreResult<Vec<(&'static str, String)>> {
        self.read(|conn| {
            let queries: Vec<(&'static str, String, Vec<Value>)> = vec![
                (
                    "expiry sweep, every second: the due calls",
                    DUE_CALLS.into(),
                    vec![now.into()],
                ),
                (
                    "expiry sweep: a due call's queued and sent deliveries",
                    due_deliveries_query(),
                    vec!["call-1".into()],
                ),
                (
                    "takeover, every second: calls of stopped consoles",
                    ORPHAN_CALLS.into(),
                    vec![now.into(), self.console.clone().into()],
                ),
                (
                    "takeover: a taken call's waiting agents",
                    TAKEN_AGENTS.into(),
                    vec!["call-1".into()],
                ),
                (
                    "connecting to the broker: agents with queued wake-ups",
                    AGENTS_WITH_QUEUED.into(),
                    vec![now.into(), self.console.clone().into()],
                ),
                (
                    "an agent coming online: its pending wake-ups",
                    pending_query(),
                    vec!["agent-1".into(), now.into(), self.console.clone().into()],
                ),
                (
                    "an ack or PUBACK: the deliveries it moves",
                    advance_candidates_query(),
                    vec!["w-1".into(), "agent-1".into()],
                ),
                (
                    "recorder, every second: calls with chunks left to record",
                    CALLS_TO_RECORD.into(),
                    vec![now.into(), self.console.clone().into()],
                ),
                (
                    "metrics: deliveries in each state",
                    count_deliveries_query(),
                    vec![],
                ),
                (
                    "dashboard (every 3 s) and metrics: agents online",
                    agents::COUNT_BY_PRESENCE.into(),
                    vec![Presence::Online.as_str().into()],
                ),
                (
                    "dashboard (every 3 s): stale agents",
                    agents::count_stale_query(conn),
                    vec![now.into()],
                ),
                (
                    "connecting to the broker: agents recorded online",
                    agents::RECORDED_ONLINE.into(),
                    vec![],
                ),
            ];
            let mut queries = queries;
            // Reads a person or an API client makes, whose cost must not grow with the
            // calls, sends and certificates the console keeps.
            queries.extend([
                (
                    "calls page: the latest calls",
                    list_calls_query(),
                    vec![50i64.into()],
                ),
                (
                    "an agent's Wake-on-LAN history",
                    wol::wol_sends_query(),
                    vec!["agent-1".into(), 100i64.into()],
                ),
                (
                    "tenant file: revoked certificates",
                    agents::REVOKED_CERTIFICATES.into(),
                    vec![now.into()],
                ),
                (
                    "each API request with a token: the token",
                    auth::API_TOKEN.into(),
                    vec![Value::Blob(vec![0; 32])],
                ),
            ]);
            // The agents page's search (not periodic: each a person's look-up), alone and
            // among one presence.
            for (what, presence) in [
                ("agents page: search", None),
                (
                    "agents page: search among a presence",
                    Some(Presence::Offline),
                ),
            ] {
                let filter = AgentFilter {
                    search: Some("AGENT-1234".into()),
                    presence,
                    limit: 100,
                    ..AgentFilter::default()
                };
                let (query, values) = agents::list_query(conn, &filter)?;
                queries.push((what, query, values));
            }
            let explain = conn.explain();
            let mut out = Vec::new();
            for (what, query, values) in queries {
                let rows = query_all(
                    conn,
                    &format!("{explain} {query}"),
                    &values,
                    // The plan's text: SQLite's detail column (the last), PostgreSQL's one.
                    |r| r.get::<String>(r.0.len().saturating_sub(1)),
                    "explaining a query",
                )?;
                out.push((what, rows.join("\n")));
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
