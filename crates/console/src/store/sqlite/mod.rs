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
//! One file per kind of data, as the store's traits: [`agents`], [`calls`], [`auth`],
//! [`wol`] and [`settings`]; [`migrations`] holds the schema.

mod agents;
mod auth;
mod calls;
mod migrations;
mod settings;
mod wol;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension};

use super::*;
pub use migrations::SCHEMA_VERSION;
use migrations::migrate;

/// The SQLite store (one connection behind a mutex: SQLite serializes writers anyway, and the
/// console's reads are short).
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { context, source }
}

/// The error for a record that does not exist: no row read, or none changed.
fn not_found(what: &'static str, id: &str) -> StoreError {
    StoreError::NotFound {
        what,
        id: id.to_owned(),
    }
}

/// Ok when a change touched a row (`rows` > 0); otherwise `what` `id` does not exist.
fn touched(rows: usize, what: &'static str, id: &str) -> StoreResult<()> {
    if rows == 0 {
        return Err(not_found(what, id));
    }
    Ok(())
}

/// The first row `query` selects with `params`, read by `from_row`, if there is one;
/// `context` says what the store was doing in an error.
fn query_opt<T, P: rusqlite::Params>(
    conn: &Connection,
    query: &str,
    params: P,
    from_row: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    context: &'static str,
) -> StoreResult<Option<T>> {
    conn.query_row(query, params, from_row)
        .optional()
        .map_err(sql(context))
}

/// Every row `query` selects with `params`, each read by `from_row`; `context` says what
/// the store was doing in an error.
fn query_all<T, P: rusqlite::Params>(
    conn: &Connection,
    query: &str,
    params: P,
    from_row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    context: &'static str,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare(query).map_err(sql(context))?;
    stmt.query_map(params, from_row)
        .and_then(|rows| rows.collect())
        .map_err(sql(context))
}

/// `columns` (as `"a, b"`) qualified by the table alias `alias` (as `"t.a, t.b"`), for joins.
fn qualified(alias: &str, columns: &str) -> String {
    columns
        .split(", ")
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// A list as stored: JSON text. A value that cannot be encoded fails the write instead of
/// storing an empty list in its place.
fn to_json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|source| StoreError::Encode {
        context: "a list",
        source,
    })
}

impl SqliteStore {
    /// Opens (creating with mode 0600 if missing) and migrates the database at `path`.
    pub fn open(path: &Path) -> StoreResult<Self> {
        create_private_file(path)?;
        let conn = Connection::open(path).map_err(sql("opening the database"))?;
        Self::setup(conn, &path.display().to_string())
    }

    /// An in-memory database (tests).
    pub fn open_in_memory() -> StoreResult<Self> {
        let conn = Connection::open_in_memory().map_err(sql("opening the database"))?;
        Self::setup(conn, ":memory:")
    }

    fn setup(mut conn: Connection, shown_path: &str) -> StoreResult<Self> {
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql("setting the busy timeout"))?;
        // `journal_mode` returns a row, so it is read rather than executed.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql("switching to WAL mode"))?;
        conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
            .map_err(sql("setting pragmas"))?;
        migrate(&mut conn, shown_path)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the transaction rolls back
        // on drop), so the poisoned connection is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> StoreResult<i64> {
        self.conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql("reading the schema version"))
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
