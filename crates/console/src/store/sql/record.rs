//! The recording of large calls: a call to more agents than one chunk keeps the agents past
//! its first chunk in `call_unrecorded`, and the recorder
//! ([`dispatch::record`](crate::dispatch::record)) records them a chunk at a time.

use super::calls::{insert_queued, load_call};
use super::*;
use crate::model::*;
use crate::store::*;

/// The calls with chunks left to record that this console records (`?2`): its own, and
/// expired ones of no console or of one whose lease ran out at `?1` (nobody takes those
/// over: they are only recorded). The table holds the calls being recorded only.
pub(super) const CALLS_TO_RECORD: &str = "SELECT c.created_at, c.id FROM calls c LEFT JOIN console_leases l ON l.console_id = c.dispatcher WHERE c.id IN (SELECT call_id FROM call_unrecorded) AND (c.dispatcher = ?2 OR (c.expires_at <= ?1 AND (c.dispatcher IS NULL OR l.expires_at IS NULL OR l.expires_at <= ?1))) ORDER BY c.created_at, c.id";

/// Keeps `rest`, the agents of `call` past its first chunk as resolved now, to be recorded
/// `chunk` at a time after the call's transaction commits ([`record_chunk`]): a row per
/// chunk, a few writes however large the call.
pub(super) fn keep_unrecorded(
    tx: &mut dyn Conn,
    call: &str,
    rest: &[String],
    chunk: usize,
) -> StoreResult<()> {
    for (i, part) in rest.chunks(chunk).enumerate() {
        exec(
            tx,
            "INSERT INTO call_unrecorded (call_id, chunk, agent_ids) VALUES (?1, ?2, ?3)",
            params![call, i as u64 + 1, to_json(&part)?],
            "keeping a call's agents to record",
        )?;
    }
    Ok(())
}

/// [`CallStore::calls_to_record`] of `store`.
pub(super) fn calls_to_record(store: &SqlStore, now: Millis) -> StoreResult<Vec<String>> {
    store.read(|conn| {
        query_all(
            conn,
            CALLS_TO_RECORD,
            params![now, &store.console],
            |r| r.get(1),
            "finding calls to record",
        )
    })
}

/// [`CallStore::record_chunk`] of `store`.
pub(super) fn record_chunk(
    store: &SqlStore,
    call_id: &str,
    now: Millis,
    new_wakeup_id: &mut dyn FnMut() -> String,
) -> StoreResult<Option<RecordedChunk>> {
    store.write_ordered(RevocationOrder::Shared, |tx| {
        let next: Option<(i64, String)> = query_opt(
            tx,
            "SELECT chunk, agent_ids FROM call_unrecorded WHERE call_id = ?1 ORDER BY chunk LIMIT 1",
            params![call_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
            "reading a call's agents to record",
        )?;
        let Some((chunk, agent_ids)) = next else {
            return Ok(None);
        };
        // Only the call's dispatcher records an unexpired call (it sends what it
        // records); the row stays locked until this commits, so that a console taking
        // the call over meanwhile waits, then finds these deliveries to send. An expired
        // call is recorded by whoever looks: nothing of it is sent.
        let ours = exec(
            tx,
            "UPDATE calls SET dispatcher = dispatcher WHERE id = ?1 AND (dispatcher = ?2 OR expires_at <= ?3)",
            params![call_id, &store.console, now],
            "checking a call's dispatcher",
        )?;
        // Taken in the transaction that records it: of two consoles recording at once,
        // one records the chunk, the other finds it gone and goes on to the next.
        let taken = if ours == 1 {
            exec(
                tx,
                "DELETE FROM call_unrecorded WHERE call_id = ?1 AND chunk = ?2",
                params![call_id, chunk],
                "taking a chunk to record",
            )?
        } else {
            0
        };
        let dispatcher: Option<String> = query_opt(
            tx,
            "SELECT dispatcher FROM calls WHERE id = ?1",
            params![call_id],
            |r| r.get::<Option<String>>(0),
            "reading a call's dispatcher",
        )?
        .flatten();
        let mut recorded = RecordedChunk {
            call: load_call(tx, call_id)?,
            queued: Vec::new(),
            failed: Vec::new(),
            dispatched_here: dispatcher.as_deref() == Some(store.console.as_str()),
        };
        if taken == 0 {
            return Ok(Some(recorded));
        }
        let agent_ids: Vec<String> = serde_json::from_str(&agent_ids).map_err(|e| {
            StoreError::Invalid(format!("call {call_id}: unreadable agents to record: {e}"))
        })?;
        // Agents revoked since the call was made get a failed delivery, as their queued
        // one would have become: the call still has one delivery per agent addressed.
        let live = live_agents(tx, &agent_ids)?;
        let (alive, revoked): (Vec<String>, Vec<String>) =
            agent_ids.into_iter().partition(|a| live.contains(a));
        recorded.queued = insert_queued(tx, call_id, &alive, now, new_wakeup_id)?;
        for agent_id in revoked {
            let wakeup_id = new_wakeup_id();
            exec(
                tx,
                "INSERT INTO deliveries (wakeup_id, call_id, agent_id, state, queued_at, finished_at, detail) VALUES (?1, ?2, ?3, 'failed', ?4, ?4, 'the agent was revoked')",
                params![&wakeup_id, call_id, &agent_id, now],
                "recording deliveries",
            )?;
            recorded.failed.push(CallDelivery {
                call_id: call_id.to_owned(),
                agent_id,
                wakeup_id,
                state: CallState::Failed,
                queued_at: now,
                sent_at: None,
                delivered_at: None,
                started_at: None,
                finished_at: Some(now),
                status: None,
                exit_code: None,
                duration_ms: None,
                detail: Some("the agent was revoked".into()),
                carried_by: None,
            });
        }
        exec(
            tx,
            "UPDATE calls SET n_queued = n_queued + ?2, n_failed = n_failed + ?3 WHERE id = ?1",
            params![
                call_id,
                recorded.queued.len() as u64,
                recorded.failed.len() as u64
            ],
            "counting a call's recorded deliveries",
        )?;
        recorded.call = load_call(tx, call_id)?;
        Ok(Some(recorded))
    })
}

/// Of `agent_ids`, those enrolled and not revoked now.
fn live_agents(
    tx: &mut dyn Conn,
    agent_ids: &[String],
) -> StoreResult<std::collections::HashSet<String>> {
    let mut live = std::collections::HashSet::with_capacity(agent_ids.len());
    for part in agent_ids.chunks(IDS_PER_STATEMENT) {
        let list = numbered_params(part.len());
        let values: Vec<Value> = part.iter().map(Value::from).collect();
        let found: Vec<String> = query_all(
            tx,
            &format!("SELECT id FROM agents WHERE revoked = 0 AND id IN ({list})"),
            &values,
            |r| r.get(0),
            "checking a call's agents",
        )?;
        live.extend(found);
    }
    Ok(live)
}
