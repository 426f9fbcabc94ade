//! `beckon console migrate-store`: copies a whole store (agents, certificates, calls with
//! their deliveries, users, sessions, API and enrollment tokens, settings, the audit log and
//! Wake-on-LAN sends, the revocation feed) from one database into another, e.g. from SQLite
//! to PostgreSQL. Left behind, as they only matter while consoles run: the consoles'
//! dispatch leases and the failed logins and enrollments the throttles count (the last five
//! minutes'). The revocation feed's counter is not copied but continued after the copied
//! entries.
//!
//! Both stores are opened (and so migrated to this build's schema) first; the target must
//! be empty. Rows are read from the source in one transaction and written to the target in
//! one transaction, page by page: a failure leaves the target as empty as it was, and the
//! source is only read.

use super::sql::{Conn, Row, SqlStore, Table, exec, query_all, query_one, tables};
use super::*;

/// Rows read and written at a time.
const PAGE: usize = 500;

/// How many rows of each table were copied, in copy order.
pub type CopyReport = Vec<(&'static str, u64)>;

/// Copies every row of `from` into `to`, which must hold no rows.
pub fn copy_store(from: &SqlStore, to: &SqlStore) -> StoreResult<CopyReport> {
    to.write(|target| {
        for table in tables() {
            let n: i64 = query_one(
                target,
                &format!("SELECT COUNT(*) FROM {}", table.name),
                &[],
                "checking that the target is empty",
            )?;
            if n > 0 {
                return Err(StoreError::Conflict(format!(
                    "the target database already holds {n} rows in {}: migrate into a new, empty database (nothing was copied)",
                    table.name
                )));
            }
        }
        let report = from.write(|source| {
            tables()
                .into_iter()
                .map(|table| Ok((table.name, copy_table(source, target, table)?)))
                .collect()
        })?;
        // Brokers following the revocation feed keep their cursors across the move.
        sql::continue_revocation_feed(target)?;
        // The agents' counts, from the copied agents (not copied: the target's triggers
        // counted them).
        sql::fold_agent_counts(target)?;
        Ok(report)
    })
}

fn copy_table(source: &mut dyn Conn, target: &mut dyn Conn, table: &Table) -> StoreResult<u64> {
    let columns = table.columns.split(", ").count();
    let mut copied = 0u64;
    loop {
        let rows: Vec<Row> = query_all(
            source,
            &format!(
                "SELECT {} FROM {} ORDER BY {} LIMIT {PAGE} OFFSET {copied}",
                table.columns, table.name, table.key
            ),
            &[],
            |r| Ok(r.clone()),
            "reading the source database",
        )?;
        if rows.is_empty() {
            break;
        }
        let values: Vec<String> = (0..rows.len())
            .map(|r| {
                let row: Vec<String> = (1..=columns)
                    .map(|c| format!("?{}", r * columns + c))
                    .collect();
                format!("({})", row.join(", "))
            })
            .collect();
        let params: Vec<_> = rows.iter().flat_map(|r| r.0.iter().cloned()).collect();
        exec(
            target,
            &format!(
                "INSERT INTO {} ({}) VALUES {}",
                table.name,
                table.columns,
                values.join(", ")
            ),
            &params,
            "writing the target database",
        )?;
        copied += rows.len() as u64;
        if rows.len() < PAGE {
            break;
        }
    }
    if let Some(column) = table.identity {
        target
            .continue_identity(table.name, column)
            .map_err(sql::sql("continuing the target's numbering"))?;
    }
    Ok(copied)
}
