//! The SQLite store.
//!
//! - **Migrations** are numbered SQL scripts applied in order at open, tracked by
//!   `PRAGMA user_version` inside the same transaction as the script; a database with a higher
//!   version than this build knows is refused (never "upgraded down").
//! - **WAL mode**: readers do not block the writer, and a crashed process leaves a database
//!   that SQLite recovers on the next open.
//! - **`synchronous = NORMAL`**: in WAL mode every committed transaction survives the process
//!   being killed (the WAL is written before `COMMIT` returns); only an operating-system crash
//!   or power loss can lose the last few commits, never corrupt the file. `FULL` would add an
//!   `fsync` per commit, which at fleet scale (tens of thousands of acks per call) costs more
//!   than re-sending a wake-up after a power cut.
//! - The file is created with mode 0600 before SQLite opens it; SQLite gives its `-wal` and
//!   `-shm` files the same mode.
//!
//! The statements themselves are the backend-independent [`SqlStore`]'s; this module opens
//! the file, migrates it ([`migrations`]) and runs statements on its one connection.

mod migrations;

use std::path::Path;

use parking_lot::{Mutex, MutexGuard};
use rusqlite::Connection;
use rusqlite::config::DbConfig;
use rusqlite::types::{ToSqlOutput, ValueRef};

use super::sql::{
    Conn, Database, DbError, RevocationOrder, Row, STATEMENT_CACHE, SqlStore, TextIndex, Value,
};
use super::*;
pub use migrations::SCHEMA_VERSION;
use migrations::migrate;

/// The SQLite database (one connection behind a mutex: SQLite serializes writers anyway, and
/// the console's reads are short).
struct Sqlite {
    conn: Mutex<Connection>,
}

fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Database {
        context,
        source: source.into(),
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn value_at(row: &rusqlite::Row<'_>, i: usize) -> Result<Value, DbError> {
    Ok(match row.get_ref(i)? {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        ValueRef::Real(r) => return Err(DbError::Column(format!("a real number {r}"))),
    })
}

/// Statements on one SQLite connection (or transaction: it derefs to its connection).
struct SqliteConn<'a>(&'a Connection);

impl Conn for SqliteConn<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let n = stmt.execute(rusqlite::params_from_iter(params))?;
        Ok(n as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(Row((0..columns)
                .map(|i| value_at(row, i))
                .collect::<Result<_, _>>()?));
        }
        Ok(out)
    }

    fn like(&self) -> &'static str {
        "LIKE"
    }

    fn like_escape(&self) -> &'static str {
        " ESCAPE '\\'"
    }

    fn text_index(&self) -> TextIndex {
        TextIndex::Fts5Trigram
    }

    fn greatest(&self) -> &'static str {
        "max"
    }

    fn explain(&self) -> &'static str {
        "EXPLAIN QUERY PLAN"
    }

    fn continue_identity(&mut self, _table: &str, _column: &str) -> Result<(), DbError> {
        Ok(())
    }

    fn notify(&mut self, _payload: &str) -> Result<(), DbError> {
        Ok(())
    }

    fn order_with_revocations(&mut self, _kind: RevocationOrder) -> Result<(), DbError> {
        Ok(())
    }
}

impl Database for Sqlite {
    fn with_conn(
        &self,
        transaction: bool,
        f: &mut dyn FnMut(&mut dyn Conn) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let mut conn = self.conn();
        if !transaction {
            return f(&mut SqliteConn(&conn));
        }
        let tx = conn.transaction().map_err(sql("starting a transaction"))?;
        f(&mut SqliteConn(&tx))?;
        tx.commit().map_err(sql("committing a transaction"))
    }

    fn schema_version(&self) -> StoreResult<i64> {
        self.conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql("reading the schema version"))
    }

    fn shares_one_connection(&self) -> bool {
        true
    }

    fn follow_notices(
        &self,
        _notice: &mut dyn FnMut(&str),
        _stop: &std::sync::atomic::AtomicBool,
    ) -> StoreResult<()> {
        Ok(())
    }
}

impl Sqlite {
    fn setup(mut conn: Connection, shown_path: &str) -> StoreResult<SqlStore> {
        Self::configure(&mut conn)?;
        migrate(&mut conn, shown_path)?;
        Ok(SqlStore::new(Box::new(Self {
            conn: Mutex::new(conn),
        })))
    }

    /// The connection's settings, before the schema is touched.
    fn configure(conn: &mut Connection) -> StoreResult<()> {
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("setting the busy timeout"))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // Plans that do not depend on the values bound. Without this, SQLite marks a
        // statement whose plan a bound value might change (an equality it does not index
        // on, say `agent_id = ?2` beside the indexed `wakeup_id = ?1`) to be compiled again
        // after its parameters are cleared, which the statement cache does on every return:
        // each use parsed and planned the statement anew (43% of the console's CPU while it
        // recorded a call's acknowledgements). The store's queries are written for their
        // indexes, with literals where a partial index needs one.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
            .map_err(sql("fixing query plans"))?;
        // `journal_mode` returns a row, so it is read rather than executed.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql("switching to WAL mode"))?;
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(sql("setting pragmas"))
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // parking_lot's lock, for its fairness: a lock held long is handed to the thread
        // that waited for it rather than taken again by its holder. With std's, the
        // recorder of a large call, taking the one connection chunk after chunk, kept the
        // state writer (the first `sent`) and every API request out for seconds. A panic
        // while holding it leaves SQLite consistent (the transaction rolls back on drop).
        self.conn.lock()
    }
}

impl SqlStore {
    /// Opens (creating with mode 0600 if missing) and migrates the SQLite database at `path`.
    pub fn open_sqlite(path: &Path) -> StoreResult<Self> {
        create_private_file(path)?;
        let conn = Connection::open(path).map_err(sql("opening the database"))?;
        Sqlite::setup(conn, &path.display().to_string())
    }

    /// An in-memory SQLite database (tests).
    pub fn open_in_memory() -> StoreResult<Self> {
        let conn = Connection::open_in_memory().map_err(sql("opening the database"))?;
        Sqlite::setup(conn, ":memory:")
    }
}

fn create_private_file(path: &Path) -> StoreResult<()> {
    use std::fs::OpenOptions;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    options.mode(0o600);
    options
        .open(path)
        .map(drop)
        .map_err(|source| StoreError::Io {
            context: "cannot create the database file",
            path: path.display().to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::StatementStatus;

    /// A statement taken from the cache again runs as it was compiled, whatever was bound
    /// to it before: recording a call's acknowledgements reads its deliveries this way
    /// thousands of times a second.
    #[test]
    fn a_cached_statement_is_not_compiled_again_for_new_values() {
        let mut conn = Connection::open_in_memory().unwrap();
        Sqlite::configure(&mut conn).unwrap();
        migrate(&mut conn, ":memory:").unwrap();
        let read = "SELECT wakeup_id FROM deliveries WHERE (wakeup_id = ?1 OR carried_by = ?1) AND agent_id = ?2 ORDER BY wakeup_id";
        for i in 0..3 {
            let mut stmt = conn.prepare_cached(read).unwrap();
            let rows: Vec<String> = stmt
                .query_map(rusqlite::params![format!("w{i}"), format!("a{i}")], |r| {
                    r.get(0)
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(rows.is_empty());
        }
        let stmt = conn.prepare_cached(read).unwrap();
        assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0);
    }

    /// The SQLite steps the read of an ack's deliveries takes for an agent that had
    /// `earlier` deliveries before the acknowledged one.
    fn ack_read_steps(earlier: usize) -> i32 {
        let mut conn = Connection::open_in_memory().unwrap();
        Sqlite::configure(&mut conn).unwrap();
        migrate(&mut conn, ":memory:").unwrap();
        conn.execute(
            "INSERT INTO calls (id, created_at, created_by, reason, target, expires_at, spread) VALUES ('c', 0, 'admin', '', 'all', 0, 0)",
            [],
        )
        .unwrap();
        let mut insert = conn
            .prepare("INSERT INTO deliveries (wakeup_id, call_id, agent_id, state, queued_at, carried_by) VALUES (?1, 'c', ?2, ?3, 0, ?4)")
            .unwrap();
        for i in 0..earlier {
            // Other agents' deliveries lie between this agent's in every index.
            for agent in ["a", "b", "c"] {
                let id = format!("w{i:05}-{agent}");
                insert
                    .execute(rusqlite::params![id, agent, "finished", None::<String>])
                    .unwrap();
            }
        }
        insert
            .execute(rusqlite::params!["w99999-b", "b", "sent", None::<String>])
            .unwrap();
        // One earlier wake-up still queued, carried by the acknowledged one.
        insert
            .execute(rusqlite::params![
                "w99998-b",
                "b",
                "queued",
                Some("w99999-b")
            ])
            .unwrap();
        let read = sql::advance_candidates_query();
        let mut stmt = conn.prepare(&read).unwrap();
        let found: Vec<String> = stmt
            .query_map(rusqlite::params!["w99999-b", "b"], |r| r.get("wakeup_id"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(found, ["w99998-b", "w99999-b"]);
        stmt.get_status(StatementStatus::VmStep)
    }

    /// Deliveries are kept: an agent has one from every call it was part of. Recording an
    /// ack must look up its own (and the ones it carried), not walk the agent's history, or
    /// every call costs more than the one before.
    #[test]
    fn an_ack_reads_its_own_deliveries_however_many_calls_the_agent_had() {
        let (few, many) = (ack_read_steps(1), ack_read_steps(500));
        assert_eq!(
            few, many,
            "the read grew with the agent's history: {few} steps after 1 call, {many} after 500"
        );
    }
}
