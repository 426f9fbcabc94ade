//! Wake-on-LAN sends.

use super::*;
use crate::model::*;
use crate::store::*;

/// The table of Wake-on-LAN sends, for `migrate-store`.
pub(in crate::store) const WOL_TABLES: &[&Table] = &[&Table {
    name: "wol_sends",
    key: "id",
    columns: "id, agent_id, call_id, mac, destination, at, packets, error, via_agent, relay_id, relay_state",
    identity: Some("id"),
}];

impl WolStore for SqlStore {
    fn record_wol_send(&self, s: &WolSend) -> StoreResult<()> {
        self.read(|conn| {
            exec(
                conn,
                "INSERT INTO wol_sends (agent_id, call_id, mac, destination, at, packets, error, via_agent, relay_id, relay_state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![&s.agent_id, &s.call_id, &s.mac, &s.destination, s.at, s.packets, &s.error, &s.via_agent, &s.relay_id, &s.relay_state],
                "recording a Wake-on-LAN send",
            )?;
            Ok(())
        })
    }

    fn record_relay_result(
        &self,
        via_agent: &str,
        relay_id: &str,
        sends: &[(String, String, u32, Option<String>)],
    ) -> StoreResult<Vec<WolSend>> {
        self.write(|tx| {
            for (mac, destination, packets, error) in sends {
                exec(
                    tx,
                    "UPDATE wol_sends SET destination = ?1, packets = ?2, error = ?3, relay_state = 'answered' WHERE relay_id = ?4 AND via_agent = ?5 AND mac = ?6",
                    params![destination, *packets, error, relay_id, via_agent, mac],
                    "recording a Wake-on-LAN relay result",
                )?;
            }
            query_all(
                tx,
                &format!(
                    "{WOL_SELECT} WHERE relay_id = ?1 AND via_agent = ?2 AND relay_state = 'answered' ORDER BY id"
                ),
                params![relay_id, via_agent],
                wol_row,
                "reading Wake-on-LAN sends",
            )
        })
    }

    fn relay_candidates(&self) -> StoreResult<Vec<RelayCandidate>> {
        self.read(|conn| {
            query_all(
                conn,
                // Literals, not parameters: the plan may use agents_presence's range.
                "SELECT id, addresses, presence_at FROM agents WHERE presence = 'online' AND revoked = 0",
                &[],
                |row| {
                    let addresses: String = row.get(1)?;
                    Ok(RelayCandidate {
                        id: row.get(0)?,
                        addresses: serde_json::from_str(&addresses).unwrap_or_default(),
                        presence_at: row.get(2)?,
                    })
                },
                "reading the agents that may relay Wake-on-LAN",
            )
        })
    }

    fn fail_relay(&self, relay_id: &str, error: &str) -> StoreResult<()> {
        self.read(|conn| {
            exec(
                conn,
                "UPDATE wol_sends SET error = ?1, relay_state = 'failed' WHERE relay_id = ?2 AND relay_state = 'requested'",
                params![error, relay_id],
                "recording a Wake-on-LAN relay failure",
            )?;
            Ok(())
        })
    }

    fn wol_sends(&self, agent_id: &str, limit: u32) -> StoreResult<Vec<WolSend>> {
        self.read(|conn| {
            query_all(
                conn,
                &wol_sends_query(),
                params![agent_id, limit.max(1)],
                wol_row,
                "reading Wake-on-LAN sends",
            )
        })
    }
}

/// The latest `?2` sends to the agent `?1`: from the end of its range of wol_sends_agent_id.
pub(super) fn wol_sends_query() -> String {
    format!("{WOL_SELECT} WHERE agent_id = ?1 ORDER BY id DESC LIMIT ?2")
}

pub(super) const WOL_SELECT: &str = "SELECT agent_id, call_id, mac, destination, at, packets, error, via_agent, relay_id, relay_state FROM wol_sends";

pub(super) fn wol_row(r: &Row) -> Result<WolSend, DbError> {
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
