//! The store written once in SQL, for every backend: SQLite and PostgreSQL run the same
//! statements through a [`Conn`], with values as [`Value`]s and rows as [`Row`]s.
//!
//! Statements are written with `?N` placeholders (PostgreSQL's connection turns them into
//! `$N`) in the SQL both databases understand: `ON CONFLICT`, integer flags (`revoked = 0`),
//! `EXISTS`; the differences left are case-insensitive matching ([`Conn::like`]) and the largest of
//! several values ([`Conn::greatest`]).
//!
//! One file per kind of data, as the store's traits: [`agents`], [`calls`], [`auth`],
//! [`wol`] and [`settings`]; large calls' chunks recorded after the call in [`record`].

mod agents;
mod auth;
mod calls;
mod record;
mod settings;
mod wol;

use crate::store::*;

pub(super) use agents::{AGENT_TABLES, continue_revocation_feed, fold_agent_counts};
pub(super) use auth::AUTH_TABLES;
pub(super) use calls::CALL_TABLES;
pub use calls::COUNT_COLUMNS as CALL_COUNT_COLUMNS;
#[cfg(test)]
pub(crate) use calls::advance_candidates_query;
pub(super) use settings::SETTINGS_TABLES;
pub(super) use wol::WOL_TABLES;

/// A value passed to or read from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL `NULL`.
    Null,
    /// An integer (flags are 0 or 1).
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

macro_rules! value_from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Int(i64::from(v))
            }
        }
    )*};
}
value_from_int!(i64, i32, u32, bool);

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}

impl From<&[u8; 32]> for Value {
    fn from(v: &[u8; 32]) -> Self {
        Value::Blob(v.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

impl<T: Clone + Into<Value>> From<&Option<T>> for Value {
    fn from(v: &Option<T>) -> Self {
        v.clone().map_or(Value::Null, Into::into)
    }
}

/// The parameters of a statement: `params![a, b]`.
macro_rules! params {
    ($($v:expr),* $(,)?) => {
        &[$($crate::store::sql::Value::from($v)),*][..]
    };
}
pub(crate) use params;

/// A row read from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// Column `i` as `T`.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, DbError> {
        let v = self.0.get(i).unwrap_or(&Value::Null);
        // The kind only: a value may be a secret's hash.
        T::from_value(v).ok_or_else(|| {
            let kind = match v {
                Value::Null => "NULL",
                Value::Int(_) => "an integer",
                Value::Text(_) => "text",
                Value::Blob(_) => "bytes",
            };
            DbError::Column(format!(
                "column {i} holds {kind}, not a {}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// A type read from a [`Value`].
pub trait FromValue: Sized {
    /// `None` when the value does not fit.
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

macro_rules! from_int_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> Option<Self> {
                i64::from_value(v).and_then(|i| <$t>::try_from(i).ok())
            }
        }
    )*};
}
from_int_value!(i32, u32, u64);

impl FromValue for bool {
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).map(|i| i != 0)
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// A database error, of either backend.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (the server's message when it sent one).
    #[error("{}", postgres_message(.0))]
    Postgres(#[from] postgres::Error),
    /// A column did not hold what the store expected.
    #[error("unexpected value: {0}")]
    Column(String),
}

/// The server's message when it sent one, else the client's error with its causes
/// ("error connecting to server: Connection refused").
fn postgres_message(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.to_string();
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// One connection (or transaction on it) of a backend.
pub trait Conn {
    /// Runs a statement; returns the rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError>;

    /// Runs a query; returns its rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError>;

    /// The statement prefix that shows a query's plan: `EXPLAIN QUERY PLAN` (SQLite),
    /// `EXPLAIN` (PostgreSQL).
    fn explain(&self) -> &'static str;

    /// The case-insensitive `LIKE` of the backend (SQLite's `LIKE` is; PostgreSQL's
    /// `ILIKE`).
    fn like(&self) -> &'static str;

    /// The clause that makes `\` the escape character of a `LIKE` pattern (SQLite has none
    /// by default; PostgreSQL's default is `\`, written nowhere so that pg_trgm reads the
    /// pattern).
    fn like_escape(&self) -> &'static str;

    /// The index that serves the agents' search.
    fn text_index(&self) -> TextIndex;

    /// The function that takes the largest of its arguments: SQLite's `max`, PostgreSQL's
    /// `GREATEST` (an index on such an expression is used by queries written alike).
    fn greatest(&self) -> &'static str;

    /// After rows were inserted with explicit values in the identity column `column` of
    /// `table`: new rows continue after the highest (PostgreSQL's sequence; SQLite's
    /// `AUTOINCREMENT` does so by itself).
    fn continue_identity(&mut self, table: &str, column: &str) -> Result<(), DbError>;

    /// Tells the other consoles on this database about delivery changes: `payload` goes out
    /// when the transaction commits (PostgreSQL's `NOTIFY` on [`CHANGES_CHANNEL`]); nothing on
    /// SQLite, which one console uses alone.
    fn notify(&mut self, payload: &str) -> Result<(), DbError>;

    /// Orders this transaction against agents' revocations until it ends: `Shared` for one
    /// that writes queued deliveries for agents it read as not revoked, `Exclusive` for a
    /// revocation, which fails the agent's unfinished deliveries. Without it, on PostgreSQL
    /// (several connections, READ COMMITTED), a call could read an agent as live while its
    /// revocation, not yet committed, reads the deliveries before the call's commit: the
    /// revoked agent would keep a queued delivery. PostgreSQL's transaction-level advisory
    /// lock; taken first in the transaction, before any row lock, so it adds no deadlock.
    /// Nothing on SQLite, whose one connection writes one transaction at a time.
    fn order_with_revocations(&mut self, kind: RevocationOrder) -> Result<(), DbError>;
}

/// How a transaction takes [`Conn::order_with_revocations`].
#[derive(Debug, Clone, Copy)]
pub enum RevocationOrder {
    /// Writes deliveries for agents read as live: any number at once.
    Shared,
    /// Revokes an agent: alone.
    Exclusive,
}

/// The index of the agents' search: a substring of the id, name, host name, addresses or MACs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextIndex {
    /// SQLite's FTS5 table `agents_search` (trigram tokenizer), by the agents' rowid.
    Fts5Trigram,
    /// PostgreSQL's GIN trigram index `agents_search` on [`SEARCH_TEXT`].
    PgTrigram,
}

/// The expression PostgreSQL's `agents_search` indexes (written as in its migration): the five
/// searched columns, joined by a line feed.
pub const SEARCH_TEXT: &str =
    "(id || E'\\n' || name || E'\\n' || hostname || E'\\n' || addresses || E'\\n' || macs)";

/// The PostgreSQL notification channel of delivery changes (see [`Conn::notify`]).
pub const CHANGES_CHANNEL: &str = "beckon_delivery_changes";

/// Prepared statements kept per connection, by SQL text. The store runs a few dozen distinct
/// statements (some with a varying column list); a cache smaller than that evicts each one
/// before its next use and every statement is parsed again (rusqlite keeps 16 by default).
/// Past this, listing queries that vary by filter are prepared each time.
pub const STATEMENT_CACHE: usize = 200;

/// A backend: where connections come from.
pub trait Database: Send + Sync {
    /// Runs `f` on a connection, inside one transaction (committed when `f` succeeds, rolled
    /// back otherwise) when `transaction`.
    fn with_conn(
        &self,
        transaction: bool,
        f: &mut dyn FnMut(&mut dyn Conn) -> StoreResult<()>,
    ) -> StoreResult<()>;

    /// The schema version of the database.
    fn schema_version(&self) -> StoreResult<i64>;

    /// Whether every store call goes through one connection (SQLite), rather than a pool
    /// (PostgreSQL).
    fn shares_one_connection(&self) -> bool;

    /// Follows the change notices of other consoles (see [`Conn::notify`]) until `stop`,
    /// handing each payload to `notice`; returns at once on a database no other console
    /// shares (SQLite).
    fn follow_notices(
        &self,
        notice: &mut dyn FnMut(&str),
        stop: &std::sync::atomic::AtomicBool,
    ) -> StoreResult<()>;
}

/// The store over a [`Database`]: every trait of the store, written once.
pub struct SqlStore {
    db: Box<dyn Database>,
    /// The console this store works for: the dispatcher of the calls it creates, whose
    /// lease it holds (see [`CallStore::hold_lease`]).
    console: String,
    /// This process (random): tells its own change notices from other consoles', and a
    /// second process started with the same console id from this one.
    instance: String,
    /// The most deliveries of a call recorded in one transaction (see [`CALL_CHUNK`]).
    call_chunk: usize,
}

impl SqlStore {
    /// The store over `db` (already migrated).
    pub(crate) fn new(db: Box<dyn Database>) -> Self {
        Self {
            db,
            console: DEFAULT_CONSOLE_ID.to_owned(),
            instance: uuid::Uuid::now_v7().simple().to_string(),
            call_chunk: CALL_CHUNK,
        }
    }

    /// The store recording calls `rows` deliveries per transaction (at least 1) instead of
    /// [`CALL_CHUNK`]: for tests that record large calls without enrolling thousands of
    /// agents.
    pub fn with_call_chunk(mut self, rows: usize) -> Self {
        self.call_chunk = rows.max(1);
        self
    }

    /// The store as used by the console `id` (default [`DEFAULT_CONSOLE_ID`]): several
    /// consoles on one database each have their own id.
    pub fn for_console(mut self, id: &str) -> Self {
        id.clone_into(&mut self.console);
        self
    }

    /// The console this store works for.
    pub fn console_id(&self) -> &str {
        &self.console
    }

    /// The schema version of the open database (each backend numbers its own migrations).
    pub fn schema_version(&self) -> StoreResult<i64> {
        self.db.schema_version()
    }

    fn with<T>(
        &self,
        transaction: bool,
        f: impl FnOnce(&mut dyn Conn) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut f = Some(f);
        let mut out = None;
        self.db.with_conn(transaction, &mut |conn| {
            if let Some(f) = f.take() {
                out = Some(f(conn)?);
            }
            Ok(())
        })?;
        out.ok_or_else(|| StoreError::Task("the database call did not run".into()))
    }

    /// Runs `f` on a connection outside of a transaction (reads, single statements).
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&mut dyn Conn) -> StoreResult<T>,
    ) -> StoreResult<T> {
        self.with(false, f)
    }

    /// Runs `query`, whose one parameter `?1` is the id of the record `what` it changes;
    /// fails with "does not exist" when it changed none.
    pub(crate) fn change_one(
        &self,
        query: &str,
        what: &'static str,
        id: &str,
        context: &'static str,
    ) -> StoreResult<()> {
        self.read(|conn| touched(exec(conn, query, params![id], context)?, what, id))
    }

    /// [`write`](Self::write), run again (up to 3 times) when PostgreSQL ended it to break
    /// a deadlock: consoles sharing the database write the same rows.
    pub(crate) fn write_again_on_deadlock<T>(
        &self,
        mut f: impl FnMut(&mut dyn Conn) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut attempts = 0;
        loop {
            match self.write(&mut f) {
                Err(StoreError::Database {
                    source: DbError::Postgres(e),
                    ..
                }) if attempts < 3
                    && e.code() == Some(&postgres::error::SqlState::T_R_DEADLOCK_DETECTED) =>
                {
                    attempts += 1;
                }
                result => return result,
            }
        }
    }

    /// [`write`](Self::write), ordered against agents' revocations: takes
    /// [`Conn::order_with_revocations`] as the transaction's first statement, then runs `f`.
    pub(crate) fn write_ordered<T>(
        &self,
        order: RevocationOrder,
        f: impl FnOnce(&mut dyn Conn) -> StoreResult<T>,
    ) -> StoreResult<T> {
        self.write(|tx| {
            tx.order_with_revocations(order).map_err(sql(match order {
                RevocationOrder::Shared => "waiting for an agent's revocation",
                RevocationOrder::Exclusive => "waiting for wake-ups being recorded",
            }))?;
            f(tx)
        })
    }

    /// Runs `f` in one transaction: all of its changes or none.
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&mut dyn Conn) -> StoreResult<T>,
    ) -> StoreResult<T> {
        self.with(true, f)
    }
}

/// Maps a database error to a [`StoreError`] saying what the store was doing.
pub(crate) fn sql(context: &'static str) -> impl FnOnce(DbError) -> StoreError {
    move |source| StoreError::Database { context, source }
}

/// The error for a record that does not exist: no row read, or none changed.
pub(crate) fn not_found(what: &'static str, id: &str) -> StoreError {
    StoreError::NotFound {
        what,
        id: id.to_owned(),
    }
}

/// Ok when a change touched a row (`rows` > 0); otherwise `what` `id` does not exist.
pub(crate) fn touched(rows: u64, what: &'static str, id: &str) -> StoreResult<()> {
    if rows == 0 {
        return Err(not_found(what, id));
    }
    Ok(())
}

/// Runs a statement; `context` says what the store was doing in an error.
pub(crate) fn exec(
    conn: &mut dyn Conn,
    query: &str,
    params: &[Value],
    context: &'static str,
) -> StoreResult<u64> {
    conn.execute(query, params).map_err(sql(context))
}

/// The first row `query` selects with `params`, read by `from_row`, if there is one;
/// `context` says what the store was doing in an error.
pub(crate) fn query_opt<T>(
    conn: &mut dyn Conn,
    query: &str,
    params: &[Value],
    from_row: impl FnOnce(&Row) -> Result<T, DbError>,
    context: &'static str,
) -> StoreResult<Option<T>> {
    let rows = conn.query(query, params).map_err(sql(context))?;
    rows.first().map(from_row).transpose().map_err(sql(context))
}

/// Every row `query` selects with `params`, each read by `from_row`; `context` says what
/// the store was doing in an error.
pub(crate) fn query_all<T>(
    conn: &mut dyn Conn,
    query: &str,
    params: &[Value],
    from_row: impl FnMut(&Row) -> Result<T, DbError>,
    context: &'static str,
) -> StoreResult<Vec<T>> {
    let rows = conn.query(query, params).map_err(sql(context))?;
    rows.iter()
        .map(from_row)
        .collect::<Result<_, _>>()
        .map_err(sql(context))
}

/// The first column of the first row of `query` (a count, `EXISTS`, one field).
pub(crate) fn query_one<T: FromValue>(
    conn: &mut dyn Conn,
    query: &str,
    params: &[Value],
    context: &'static str,
) -> StoreResult<T> {
    query_opt(conn, query, params, |r| r.get(0), context)?.ok_or_else(|| StoreError::Database {
        context,
        source: DbError::Column("no row".into()),
    })
}

/// `columns` (as `"a, b"`) qualified by the table alias `alias` (as `"t.a, t.b"`), for joins.
pub(crate) fn qualified(alias: &str, columns: &str) -> String {
    columns
        .split(", ")
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The most ids one statement takes as parameters (`id IN (?1, ..., ?n)`).
pub(crate) const IDS_PER_STATEMENT: usize = 1024;

/// `?1, ?2, ..., ?n`: the parameters of an `IN` list of `n` values.
pub(crate) fn numbered_params(n: usize) -> String {
    (1..=n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// A list as stored: JSON text. A value that cannot be encoded fails the write instead of
/// storing an empty list in its place.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|source| StoreError::Encode {
        context: "a list",
        source,
    })
}

/// A table as `migrate-store` copies it: its name and columns, in the order rows are copied
/// (parents before the rows referring to them).
pub(crate) struct Table {
    /// Table name.
    pub name: &'static str,
    /// Its columns, as `"a, b, c"`.
    pub columns: &'static str,
    /// The columns that order its rows (its primary key), for copying page by page.
    pub key: &'static str,
    /// An identity column whose sequence continues after the copied rows (PostgreSQL).
    pub identity: Option<&'static str>,
}

/// Every table of the store, in an order that inserts parents first.
pub(crate) fn tables() -> Vec<&'static Table> {
    AUTH_TABLES
        .iter()
        .chain(AGENT_TABLES)
        .chain(CALL_TABLES)
        .chain(SETTINGS_TABLES)
        .chain(WOL_TABLES)
        .copied()
        .collect()
}
