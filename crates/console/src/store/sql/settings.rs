//! Settings and the audit log.

use super::*;
use crate::model::*;
use crate::settings::Settings;
use crate::store::*;

/// The tables of settings and the audit log, for `migrate-store`.
pub(in crate::store) const SETTINGS_TABLES: &[&Table] = &[
    &Table {
        name: "settings",
        key: "key",
        columns: "key, value",
        identity: None,
    },
    &Table {
        name: "audit_log",
        key: "id",
        columns: "id, at, who, what, detail",
        identity: Some("id"),
    },
];

impl SettingsStore for SqlStore {
    fn settings(&self) -> StoreResult<Settings> {
        let rows: Vec<(String, String)> = self.read(|conn| {
            query_all(
                conn,
                "SELECT key, value FROM settings",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
                "reading settings",
            )
        })?;
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
                read_group(&map, "wol", &mut s.wol);
                read_group(&map, "wakeup", &mut s.wakeup);
                read_group(&map, "broker", &mut s.broker);
                read_group(&map, "proxy", &mut s.proxy);
                read_group(&map, "agents", &mut s.agents);
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
        // The audit log shows the proxy's user name, never its password.
        let shown = |s: &Settings| {
            let mut s = s.clone();
            s.proxy = s.proxy.without_password();
            serde_json::to_value(s)
        };
        let (old_shown, new_shown) = (shown(&old).map_err(encode)?, shown(new).map_err(encode)?);
        self.write(|tx| {
            for key in ["wol", "wakeup", "broker", "proxy", "agents"] {
                let (Some(o), Some(n)) = (old_v.get(key), new_v.get(key)) else {
                    continue;
                };
                if o == n {
                    continue;
                }
                exec(
                    tx,
                    "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    params![key, n.to_string()],
                    "writing settings",
                )?;
                let entry = NewAuditEntry {
                    who: who.to_owned(),
                    what: format!("settings.{key}"),
                    detail: serde_json::json!({"old": old_shown[key], "new": new_shown[key]}),
                    at: now,
                };
                write_audit(tx, &entry)?;
            }
            Ok(())
        })?;
        Ok(new.clone())
    }

    fn audit(&self, entry: NewAuditEntry) -> StoreResult<()> {
        self.read(|conn| write_audit(conn, &entry))
    }

    fn audit_log(&self, limit: u32) -> StoreResult<Vec<AuditEntry>> {
        self.read(|conn| {
            query_all(
                conn,
                "SELECT id, at, who, what, detail FROM audit_log ORDER BY id DESC LIMIT ?1",
                params![limit.max(1)],
                |r| {
                    let detail: String = r.get(4)?;
                    Ok(AuditEntry {
                        id: r.get(0)?,
                        at: r.get(1)?,
                        who: r.get(2)?,
                        what: r.get(3)?,
                        detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                    })
                },
                "reading the audit log",
            )
        })
    }
}

/// Appends `entry` to the audit log.
fn write_audit(conn: &mut dyn Conn, entry: &NewAuditEntry) -> StoreResult<()> {
    exec(
        conn,
        "INSERT INTO audit_log (at, who, what, detail) VALUES (?1, ?2, ?3, ?4)",
        params![entry.at, &entry.who, &entry.what, entry.detail.to_string()],
        "writing the audit log",
    )?;
    Ok(())
}

/// Sets `group` to the stored settings group `key` when that parses, and leaves it (its
/// defaults) otherwise.
fn read_group<T: serde::de::DeserializeOwned>(
    map: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    group: &mut T,
) {
    if let Some(v) = map
        .get(key)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
    {
        *group = v;
    }
}
