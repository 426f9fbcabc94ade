//! Where the store lives: `sqlite:PATH` or `postgres://user:password@host:port/database`.

use std::path::PathBuf;
use std::str::FromStr;

use postgres::config::SslMode;

use super::*;

/// The console's database, as `--database` names it.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A SQLite file (`sqlite:PATH`), created when missing.
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://` or `postgresql://` URL); the database must exist.
    Postgres(String),
}

const FORMS: &str = "give sqlite:PATH (a file, created when missing) or postgres://user:password@host:port/database";

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            postgres_config(s).map_err(|e| e.to_string())?;
            return Ok(Self::Postgres(s.to_owned()));
        }
        match s.strip_prefix("sqlite:") {
            Some(path) if !path.is_empty() => Ok(Self::Sqlite(PathBuf::from(path))),
            Some(_) => Err(format!("the SQLite database has no path: {FORMS}")),
            None => Err(format!("{:?} is not a database URL: {FORMS}", redact(s))),
        }
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Self::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

/// As [`Display`](std::fmt::Display): never the password.
impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl DatabaseUrl {
    /// Opens the store (creating a SQLite file when missing) and brings its schema up to
    /// date.
    pub fn open(&self) -> StoreResult<SqlStore> {
        match self {
            Self::Sqlite(path) => SqlStore::open_sqlite(path),
            Self::Postgres(url) => SqlStore::open_postgres(url),
        }
    }
}

/// `url` with its password (if any) replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// The client configuration of a PostgreSQL URL, and the URL to show; refuses what this
/// build cannot honour (TLS).
pub(super) fn postgres_config(url: &str) -> StoreResult<(postgres::Config, String)> {
    let shown = redact(url);
    let mut config = postgres::Config::from_str(url).map_err(|e| {
        StoreError::Invalid(format!(
            "the database URL {shown} is not valid ({e}): {FORMS}"
        ))
    })?;
    if config.get_ssl_mode() == SslMode::Require {
        return Err(StoreError::Invalid(format!(
            "the database URL {shown} asks for TLS (sslmode=require), which this version does not support yet: connect over a private network or the same host with sslmode=disable"
        )));
    }
    if config.get_dbname().is_none() {
        return Err(StoreError::Invalid(format!(
            "the database URL {shown} names no database: add /DATABASE after the host"
        )));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("beckon-console");
    }
    Ok((config, shown))
}
