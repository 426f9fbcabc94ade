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

/// How the console talks to PostgreSQL.
#[derive(Clone)]
pub(super) enum PostgresTls {
    /// In the clear: no `sslmode`, or `sslmode=disable`.
    Off,
    /// TLS, the server's certificate verified (CA and host name).
    Verified(Arc<beckon_net::TlsClient>),
}

/// The client configuration of a PostgreSQL URL, its TLS, and the URL to show.
///
/// `sslmode` and `sslrootcert` are read here, as libpq names them, and taken out of what the
/// client library parses: Beckon verifies the server whenever it uses TLS (`require`,
/// `verify-ca` and `verify-full` alike), and refuses `prefer` and `allow`, which may fall
/// back to cleartext or accept any certificate.
pub(super) fn postgres_config(url: &str) -> StoreResult<(postgres::Config, PostgresTls, String)> {
    let shown = redact(url);
    let invalid = |why: String| StoreError::Invalid(format!("the database URL {shown} {why}"));
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (mut sslmode, mut rootcert, mut kept) = (None, None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", mode)) => sslmode = Some(mode),
            Some(("sslrootcert", file)) => rootcert = Some(PathBuf::from(file)),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut config = postgres::Config::from_str(&rest)
        .map_err(|e| invalid(format!("is not valid ({e}): {FORMS}")))?;
    let tls = match sslmode {
        None | Some("disable") => {
            if rootcert.is_some() {
                return Err(invalid(String::from(
                    "gives sslrootcert but no sslmode: add sslmode=verify-full to use TLS",
                )));
            }
            config.ssl_mode(SslMode::Disable);
            PostgresTls::Off
        }
        Some("require" | "verify-ca" | "verify-full") => {
            let trust = match rootcert {
                Some(file) => beckon_net::TrustAnchors::CaFile(file),
                None => beckon_net::TrustAnchors::System,
            };
            let client = beckon_net::TlsClient::new(&beckon_net::TlsSettings {
                trust,
                ..beckon_net::TlsSettings::default()
            })
            .map_err(|e| invalid(format!("cannot be used with TLS: {e}")))?;
            config.ssl_mode(SslMode::Require);
            PostgresTls::Verified(Arc::new(client))
        }
        Some(mode @ ("prefer" | "allow")) => {
            return Err(invalid(format!(
                "has sslmode={mode}, which may fall back to cleartext: use sslmode=verify-full (with sslrootcert=CA.pem for a private CA) or sslmode=disable"
            )));
        }
        Some(other) => {
            return Err(invalid(format!(
                "has sslmode={other}: use verify-full (with sslrootcert=CA.pem for a private CA) or disable"
            )));
        }
    };
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
    Ok((config, tls, shown))
}
