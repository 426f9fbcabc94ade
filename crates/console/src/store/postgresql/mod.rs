//! The PostgreSQL store: the backend-independent [`SqlStore`] over a small pool of
//! connections made with the synchronous `postgres` crate (the store's traits are
//! synchronous and run on tokio's blocking pool, so a blocking client fits them directly).
//!
//! - **Pool**: at most [`MAX_CONNECTIONS`] connections, opened as needed and kept for reuse;
//!   a connection found broken (the server restarted, the network dropped it) is dropped and
//!   the next call opens a fresh one, so the console recovers by itself once the server is
//!   back.
//! - **Migrations** ([`migrations`]) run at open, in one transaction, under an advisory
//!   lock so that consoles starting together do not race.
//! - **TLS** with `sslmode=verify-full` (or `require`, `verify-ca`: verified just as fully)
//!   and `sslrootcert=CA.pem` for a private CA ([`tls`]); without `sslmode`, or with
//!   `disable`, in the clear. `prefer` and `allow` are refused: they may fall back to
//!   cleartext.

mod migrations;
mod tls;

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, GenericClient, NoTls, Statement};

use super::sql::{
    CHANGES_CHANNEL, Conn, Database, DbError, RevocationOrder, Row, STATEMENT_CACHE, SqlStore,
    TextIndex, Value,
};
use super::*;
pub use migrations::SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION;

/// The most connections one console opens to the server.
pub const MAX_CONNECTIONS: usize = 16;

/// The advisory lock of [`Conn::order_with_revocations`] (any number fixed for this schema,
/// other than the migrations' lock).
const REVOCATION_LOCK: i64 = 0x7265_766f_6b65;

/// How long a store call waits for a free connection before failing.
const POOL_WAIT: Duration = Duration::from_secs(30);

pub(super) fn pg(context: &'static str) -> impl FnOnce(postgres::Error) -> StoreError {
    move |source| StoreError::Database {
        context,
        source: source.into(),
    }
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => Err(format!("an integer given for a {ty} parameter").into()),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn value_at(row: &::postgres::Row, i: usize) -> Result<Value, DbError> {
    let ty = row.columns()[i].type_().clone();
    let v = match ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(Value::Int),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)?
            .map(|v| Value::Int(v.into())),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)?
            .map(|v| Value::Int(v.into())),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)?
            .map(|v| Value::Int(v.into())),
        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
        _ => row.try_get::<_, Option<String>>(i)?.map(Value::Text),
    };
    Ok(v.unwrap_or(Value::Null))
}

/// Statements on one connection or transaction. The store's `?N` placeholders become
/// PostgreSQL's `$N`.
struct PgConn<'a, C> {
    client: &'a mut C,
    statements: &'a mut Statements,
}

/// The statements prepared on one connection, by the store's SQL text: a cached statement
/// runs in one round trip instead of two (prepare, then execute).
type Statements = std::collections::HashMap<String, Statement>;

impl<C: GenericClient> PgConn<'_, C> {
    fn statement(&mut self, sql: &str) -> Result<Statement, DbError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let prepared = self.client.prepare(&placeholders(sql))?;
        if self.statements.len() < STATEMENT_CACHE {
            self.statements.insert(sql.to_owned(), prepared.clone());
        }
        Ok(prepared)
    }
}

fn placeholders(sql: &str) -> String {
    sql.replace('?', "$")
}

fn param_refs(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
}

impl<C: GenericClient> Conn for PgConn<'_, C> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let statement = self.statement(sql)?;
        Ok(self.client.execute(&statement, &param_refs(params))?)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let statement = self.statement(sql)?;
        let rows = self.client.query(&statement, &param_refs(params))?;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| value_at(r, i))
                    .collect::<Result<_, _>>()
                    .map(Row)
            })
            .collect()
    }

    fn like(&self) -> &'static str {
        "ILIKE"
    }

    fn like_escape(&self) -> &'static str {
        ""
    }

    fn text_index(&self) -> TextIndex {
        TextIndex::PgTrigram
    }

    fn greatest(&self) -> &'static str {
        "GREATEST"
    }

    fn explain(&self) -> &'static str {
        "EXPLAIN"
    }

    fn notify(&mut self, payload: &str) -> Result<(), DbError> {
        let statement = self.statement("SELECT pg_notify(?1, ?2)")?;
        self.client
            .execute(&statement, &[&CHANGES_CHANNEL, &payload])?;
        Ok(())
    }

    fn order_with_revocations(&mut self, kind: RevocationOrder) -> Result<(), DbError> {
        let statement = self.statement(match kind {
            RevocationOrder::Shared => "SELECT pg_advisory_xact_lock_shared(?1)",
            RevocationOrder::Exclusive => "SELECT pg_advisory_xact_lock(?1)",
        })?;
        self.client.execute(&statement, &[&REVOCATION_LOCK])?;
        Ok(())
    }

    fn continue_identity(&mut self, table: &str, column: &str) -> Result<(), DbError> {
        self.client.execute(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{table}', '{column}'), COALESCE(MAX({column}), 0) + 1, false) FROM {table}"
            ),
            &[],
        )?;
        Ok(())
    }
}

/// A connection with the statements prepared on it.
struct Pooled {
    client: Client,
    statements: Statements,
}

impl Pooled {
    fn new(client: Client) -> Self {
        Self {
            client,
            statements: Statements::new(),
        }
    }
}

/// The connections: idle ones kept for reuse, and how many are open in all.
struct Pool {
    idle: Vec<Pooled>,
    open: usize,
}

/// The PostgreSQL database.
struct Postgres {
    config: postgres::Config,
    tls: url::PostgresTls,
    /// The URL without its password, for messages.
    shown: String,
    pool: Mutex<Pool>,
    freed: Condvar,
}

impl Postgres {
    fn connect(&self) -> StoreResult<Client> {
        match &self.tls {
            url::PostgresTls::Off => self.config.connect(NoTls),
            url::PostgresTls::Verified(client) => self.config.connect(tls::Verified {
                client: client.clone(),
                timeout: self
                    .config
                    .get_connect_timeout()
                    .copied()
                    .unwrap_or(Duration::from_secs(10)),
            }),
        }
        .map_err(|e| StoreError::Unavailable {
            database: self.shown.clone(),
            reason: DbError::from(e).to_string(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection: an idle one, a new one while fewer than [`MAX_CONNECTIONS`] are open,
    /// or the next one given back.
    fn take(&self) -> StoreResult<Pooled> {
        let mut pool = self.lock();
        loop {
            if let Some(c) = pool.idle.pop() {
                if !c.client.is_closed() {
                    return Ok(c);
                }
                pool.open -= 1;
                continue;
            }
            if pool.open < MAX_CONNECTIONS {
                pool.open += 1;
                drop(pool);
                return self.connect().map(Pooled::new).inspect_err(|_| {
                    self.lock().open -= 1;
                    self.freed.notify_one();
                });
            }
            let (next, timeout) = self
                .freed
                .wait_timeout(pool, POOL_WAIT)
                .unwrap_or_else(|p| p.into_inner());
            pool = next;
            if timeout.timed_out() && pool.idle.is_empty() && pool.open >= MAX_CONNECTIONS {
                return Err(StoreError::Unavailable {
                    database: self.shown.clone(),
                    reason: format!(
                        "all {MAX_CONNECTIONS} connections stayed busy for {} s",
                        POOL_WAIT.as_secs()
                    ),
                });
            }
        }
    }

    /// Gives a connection back; a broken one is dropped, to be opened afresh when needed.
    fn give_back(&self, client: Pooled) {
        let mut pool = self.lock();
        if client.client.is_closed() {
            pool.open -= 1;
        } else {
            pool.idle.push(client);
        }
        drop(pool);
        self.freed.notify_one();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Closing a connection runs the client's own runtime, which may not start inside
        // another (the last handle may be dropped on an async task): close them elsewhere.
        let idle = std::mem::take(&mut self.lock().idle);
        if !idle.is_empty() {
            let _ = std::thread::Builder::new()
                .name("beckon-db-close".into())
                .spawn(move || drop(idle));
        }
    }
}

impl Database for Postgres {
    fn with_conn(
        &self,
        transaction: bool,
        f: &mut dyn FnMut(&mut dyn Conn) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let mut pooled = self.take()?;
        let Pooled { client, statements } = &mut pooled;
        let result = if transaction {
            match client.transaction() {
                Ok(mut tx) => f(&mut PgConn {
                    client: &mut tx,
                    statements,
                })
                .and_then(|()| tx.commit().map_err(pg("committing a transaction"))),
                Err(e) => Err(pg("starting a transaction")(e)),
            }
        } else {
            f(&mut PgConn { client, statements })
        };
        self.give_back(pooled);
        result
    }

    fn schema_version(&self) -> StoreResult<i64> {
        let mut client = self.take()?;
        let v = migrations::version(&mut client.client);
        self.give_back(client);
        v
    }

    fn shares_one_connection(&self) -> bool {
        false
    }

    /// One connection of its own (outside the pool) that `LISTEN`s; a lost connection is
    /// opened again after a second. Notices sent while it was lost are not replayed: live
    /// views miss those changes (the stored states are right; a reload shows them).
    fn follow_notices(
        &self,
        notice: &mut dyn FnMut(&str),
        stop: &std::sync::atomic::AtomicBool,
    ) -> StoreResult<()> {
        use postgres::fallible_iterator::FallibleIterator;
        use std::sync::atomic::Ordering;
        let mut failures = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let listened = self.connect().and_then(|mut client| {
                client
                    .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
                    .map_err(pg("listening for other consoles' changes"))?;
                tracing::info!("following other consoles' delivery changes");
                failures = 0;
                while !stop.load(Ordering::Relaxed) {
                    // A fresh wait each time: the iterator's timer is not restarted after
                    // it ran out.
                    let next = client
                        .notifications()
                        .timeout_iter(Duration::from_millis(500))
                        .next();
                    match next {
                        Ok(Some(n)) => notice(n.payload()),
                        Ok(None) if client.is_closed() => {
                            return Err(StoreError::Unavailable {
                                database: self.shown.clone(),
                                reason: "the connection closed".into(),
                            });
                        }
                        Ok(None) => {}
                        Err(e) => return Err(pg("following other consoles' changes")(e)),
                    }
                }
                Ok(())
            });
            if let Err(e) = listened {
                if failures == 0 {
                    tracing::warn!(error = %e, "following other consoles' changes failed; live views miss their changes until it works again (retrying every second)");
                }
                failures += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Ok(())
    }
}

impl SqlStore {
    /// Connects to the PostgreSQL database at `url` (`postgres://user:password@host:port/db`)
    /// and migrates it.
    pub fn open_postgres(url: &str) -> StoreResult<Self> {
        let (config, tls, shown) = url::postgres_config(url)?;
        let db = Postgres {
            config,
            tls,
            shown,
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 1,
            }),
            freed: Condvar::new(),
        };
        let mut client = db.connect()?;
        migrations::migrate(&mut client, &db.shown)?;
        db.give_back(Pooled::new(client));
        Ok(SqlStore::new(Box::new(db)))
    }
}
