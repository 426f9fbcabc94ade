//! The Beckon console: the management server's agent registry, enrollment, wake-up calls,
//! Wake-on-LAN, settings and its HTTP API (`/api/v1`, described in `docs/api.md` and served
//! as OpenAPI at `/api/v1/openapi.json`).
//!
//! - [`store`]: the [`Store`](store::Store) trait and its SQLite implementation;
//! - [`api`]: the axum router;
//! - [`dispatch`]: the console's own MQTT connection that publishes signed wake-ups and
//!   follows acks and presence;
//! - [`wol`]: the Wake-on-LAN magic packet and its sender;
//! - [`metrics`]: the Prometheus metrics at `/metrics`;
//! - [`ui`]: the web console (embedded HTML, CSS, JavaScript) at `/`;
//! - [`Console::start`]: everything together, for `beckon console` and `beckon up`.
#![forbid(unsafe_code)]

pub mod api;
mod cli;
pub mod clones;
pub mod dispatch;
pub mod guard;
mod http;
pub mod metrics;
pub mod model;
pub mod oidc;
mod secrets;
pub mod settings;
pub mod store;
pub mod tenant_file;
mod tls;
pub mod ui;
pub mod wol;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beckon_identity::wakeup::WakeUpSigner;
use beckon_identity::{KeyId, SigningKey, TenantId};
use beckon_pki::CertificateAuthority;
use tokio::sync::{broadcast, mpsc, watch};

pub use cli::{
    ConsoleArgs, ConsoleCommand, ConsoleCommandLine, ISSUED_BROKER_CERT, IssueBrokerCertArgs,
    MigrateStoreArgs, OidcArgs, issue_broker_certificate, main, migrate_store, run,
};

pub use http::HttpLimits;

use crate::model::CallEvent;
use crate::store::{DatabaseUrl, StoreHandle};

/// How the console reaches the broker for its own connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerLink {
    /// No broker connection: calls stay queued (tests, or a console without a broker yet).
    None,
    /// Plain MQTT without authentication (`mqtt://host:port`): development brokers only.
    Anonymous {
        /// `host:port`.
        address: String,
    },
    /// MQTT over TLS (`mqtts://host[:port]`) with a client certificate issued by the
    /// console's CA (OU=server): the connection ladder 8883, then 443.
    Tls {
        /// Broker host name.
        host: String,
        /// Primary port (8883).
        port: u16,
        /// The broker's CA (PEM file); default: the console's own CA.
        ca_file: Option<PathBuf>,
    },
}

/// Why a `--broker` value is not a broker URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    /// The address after the scheme is not `host:port`.
    #[error(transparent)]
    Address(#[from] settings::HostPortError),
    /// Neither `mqtts://` nor `mqtt://` nor `none`.
    #[error(
        "{0:?} is not a broker URL: use mqtts://host[:port] (TLS, certificate from the console's CA) or mqtt://host:port (plain, development only)"
    )]
    Scheme(String),
}

impl std::str::FromStr for BrokerLink {
    type Err = BrokerUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() || text == "none" {
            return Ok(BrokerLink::None);
        }
        if let Some(rest) = text.strip_prefix("mqtt://") {
            settings::parse_host_port(rest)?;
            return Ok(BrokerLink::Anonymous {
                address: rest.to_owned(),
            });
        }
        if let Some(rest) = text.strip_prefix("mqtts://") {
            let (host, port) = if rest.contains(':') {
                settings::parse_host_port(rest)?
            } else {
                (rest.to_owned(), 8883)
            };
            return Ok(BrokerLink::Tls {
                host,
                port,
                ca_file: None,
            });
        }
        Err(BrokerUrlError::Scheme(text.to_owned()))
    }
}

/// The console's configuration.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Folder for the tenant CA, the signing key, the HTTPS certificate and (unless
    /// `database` names another) the SQLite database `console.db`.
    pub data_dir: PathBuf,
    /// The store: `None` is the SQLite file `console.db` in `data_dir`.
    pub database: Option<DatabaseUrl>,
    /// This console's id (default [`store::DEFAULT_CONSOLE_ID`]): its MQTT client id and
    /// server identity at the broker, and the dispatcher named on the calls it makes.
    /// Consoles sharing one database each need their own.
    pub console_id: String,
    /// HTTP(S) listen address.
    pub listen: SocketAddr,
    /// The HTTPS certificate and key (PEM); default: issued by the console's CA for
    /// `server_names` on first start.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Serve plain HTTP. Refused unless `listen` is a loopback address.
    pub plain_http: bool,
    /// Names for the generated HTTPS certificate: a certificate with other names is issued
    /// again at start.
    pub server_names: Vec<String>,
    /// Validity of a newly generated HTTPS certificate (two years). The console issues it
    /// again when it ends within 30 days (at start and every hour).
    pub https_certificate_validity: Duration,
    /// The broker certificate the console knows of, whose end its status warns about 30 days
    /// ahead: `beckon up`'s broker certificate, else the copy that `beckon console
    /// issue-broker-cert` keeps in the data folder ([`ISSUED_BROKER_CERT`]) when there is one.
    pub broker_certificate: Option<PathBuf>,
    /// The tenant this console manages.
    pub tenant: String,
    /// The console's broker connection.
    pub broker: BrokerLink,
    /// Broker endpoints handed to agents while the settings name none.
    pub default_broker_endpoints: Vec<String>,
    /// Enrolled agents trust the system's CA store for the broker too (a public certificate).
    pub agent_broker_system_roots: bool,
    /// Largest request body accepted, in bytes, on routes without a smaller limit of their
    /// own (login and user routes take 4 KiB; see docs/api.md).
    pub max_body_bytes: usize,
    /// The HTTP server's timeouts and connection limit.
    pub http: HttpLimits,
    /// The console's URL as agents reach it (`--public-url`), e.g.
    /// `https://console.example.com:8080`: the check-in URL in enrollment answers and the
    /// enrollment command the web console shows. `None`: taken from each request's `Host`.
    pub public_url: Option<String>,
    /// A login session ends this long after the login (12 hours).
    pub session_lifetime: Duration,
    /// A login session not used for this long ends (30 minutes).
    pub session_idle_timeout: Duration,
    /// Name of the first user, created with a random password when there is none.
    pub admin_user: String,
    /// The broker's tenant file for this tenant (`<broker tenants folder>/<tenant>.toml`):
    /// written at start and whenever an agent is removed, so that the broker refuses removed
    /// agents. `None`: the operator copies it (`GET /api/v1/tenant-file`).
    pub broker_tenant_file: Option<PathBuf>,
    /// Whether that tenant file lists the removed agents' credentials (`[[revoked]]`). Off
    /// when the broker follows the revocation feed instead (`GET /api/v1/revocations`), which
    /// has no size limit: the file then holds the CA and the token key only.
    pub tenant_file_revocations: bool,
    /// Validity of agent certificates (enrollment and renewal).
    pub agent_certificate_validity: Duration,
    /// The broker starts after the console (`beckon up`, where the broker needs the
    /// console's CA): the broker connection waits for [`ConsoleHandle::broker_ready`].
    pub broker_starts_later: bool,
    /// Development and tests only: loopback addresses count as a subnet when choosing a
    /// Wake-on-LAN relay agent. Every machine has 127.0.0.1, so in production they never
    /// say that two agents share a network.
    pub wol_relay_loopback: bool,
    /// Single sign-on with an OpenID provider beside local users; `None`: local users only.
    pub oidc: Option<oidc::OidcConfig>,
    /// The most deliveries of a call recorded in one transaction ([`store::CALL_CHUNK`]);
    /// tests lower it to record large calls with few agents.
    pub call_chunk: usize,
}

impl ConsoleConfig {
    /// Defaults for a console in `data_dir`: loopback port 8080 over plain HTTP, tenant
    /// `default`, no broker.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            database: None,
            console_id: store::DEFAULT_CONSOLE_ID.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_files: None,
            plain_http: true,
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            https_certificate_validity: tls::HTTPS_CERT_VALIDITY,
            broker_certificate: None,
            tenant: "default".into(),
            broker: BrokerLink::None,
            default_broker_endpoints: vec!["localhost:8883".into(), "localhost:8443".into()],
            agent_broker_system_roots: false,
            max_body_bytes: 64 * 1024,
            http: HttpLimits::default(),
            public_url: None,
            session_lifetime: Duration::from_secs(12 * 3600),
            session_idle_timeout: Duration::from_secs(30 * 60),
            admin_user: "admin".into(),
            broker_tenant_file: None,
            tenant_file_revocations: true,
            agent_certificate_validity: Duration::from_secs(365 * 24 * 3600),
            broker_starts_later: false,
            wol_relay_loopback: false,
            oidc: None,
            call_chunk: store::CALL_CHUNK,
        }
    }
}

impl ConsoleConfig {
    /// The store this configuration names: `database`, else `console.db` in the data folder.
    pub fn database(&self) -> DatabaseUrl {
        self.database
            .clone()
            .unwrap_or_else(|| DatabaseUrl::Sqlite(self.data_dir.join("console.db")))
    }
}

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The configuration is not usable.
    #[error("console configuration: {0}")]
    Config(String),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Certificates could not be made or read.
    #[error(transparent)]
    Pki(#[from] beckon_pki::PkiError),
    /// A file could not be read or written.
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Which file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}; choose another port with --listen")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// The console's push-service connection as last seen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct PushStatus {
    /// Connected to the broker.
    pub connected: bool,
    /// `Push service servers are not reachable` and why, when down.
    pub message: String,
    /// The last error.
    pub last_error: Option<String>,
    /// Since when (unix ms).
    pub since: model::Millis,
    /// The doctor's report on the broker paths, made when a TLS connection failed (at most
    /// once a minute while down); `None` while connected.
    pub diagnosis: Option<serde_json::Value>,
}

/// What the HTTP handlers and the dispatcher share.
#[derive(Clone)]
pub struct AppState {
    /// The store.
    pub store: StoreHandle,
    /// The tenant CA that signs agent certificates.
    pub ca: Arc<CertificateAuthority>,
    /// Signs wake-ups.
    pub signer: Arc<WakeUpSigner>,
    /// The tenant.
    pub tenant: TenantId,
    /// Live call updates.
    pub events: broadcast::Sender<CallEvent>,
    /// Wakes the dispatcher when calls are created.
    pub dispatch: mpsc::Sender<dispatch::Command>,
    /// Wakes the recorder of large calls' later chunks ([`dispatch::record`]).
    pub recording: Arc<tokio::sync::Notify>,
    /// The agents Wake-on-LAN may relay through, read at most every 30 s for every call and
    /// request: one machine's Wake-on-LAN does not read the whole fleet each time.
    pub relays: Arc<dispatch::Relays>,
    /// The push-service status.
    pub push: Arc<Mutex<PushStatus>>,
    /// Configuration.
    pub config: Arc<ConsoleConfig>,
    /// Becomes true when the console stops: ends the live event streams, which would
    /// otherwise hold the HTTP server's graceful shutdown open.
    pub shutdown: watch::Receiver<bool>,
    /// Session idle expiry (the login and enrollment throttles are in the store).
    pub sessions: Arc<guard::SessionActivity>,
    /// The Prometheus metrics (`/metrics`).
    pub metrics: Arc<metrics::ConsoleMetrics>,
    /// Single sign-on, when configured.
    pub oidc: Option<Arc<oidc::Oidc>>,
}

/// A running console.
pub struct ConsoleHandle {
    /// The bound HTTP(S) address.
    pub local_addr: SocketAddr,
    /// `https` or `http`.
    pub scheme: &'static str,
    /// The first user's password when this start created it (print it once).
    pub initial_admin_password: Option<String>,
    /// Shared state (for embedding and tests).
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ConsoleHandle {
    /// The base URL, e.g. `https://127.0.0.1:8080`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.local_addr)
    }

    /// Creates an admin API token named `name` and returns its secret (shown once).
    pub async fn create_api_token(&self, name: &str) -> Result<String, store::StoreError> {
        self.create_api_token_with_role(name, model::Role::Admin)
            .await
    }

    /// Creates an API token named `name` with `role` and returns its secret (shown once).
    pub async fn create_api_token_with_role(
        &self,
        name: &str,
        role: model::Role,
    ) -> Result<String, store::StoreError> {
        api::create_api_token(&self.state.store, name, role, None).await
    }

    /// The broker's tenant file for this console's tenant (`tenants/<tenant>.toml`, see the
    /// identity crate's documentation) without revocations: the tenant CA inline, so that
    /// agent and console certificates authenticate, and the wake-up key as a token key.
    /// [`tenant_file::current`] adds the `[[revoked]]` entries of removed agents.
    pub fn tenant_file(&self) -> String {
        tenant_file::render(&self.state, &[])
    }

    /// Tells the console that its broker listens now (with
    /// [`ConsoleConfig::broker_starts_later`]): the broker connection starts.
    pub fn broker_ready(&self) {
        match self.state.dispatch.try_send(dispatch::Command::BrokerReady) {
            // The queue is full of calls (they wait for this very connection): the signal
            // waits its turn behind them.
            Err(mpsc::error::TrySendError::Full(command)) => {
                let dispatch = self.state.dispatch.clone();
                tokio::spawn(async move { dispatch.send(command).await });
            }
            // Sent, or the dispatcher is gone (the console is stopping).
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Stops serving and waits (at most 5 s) for the tasks to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    /// Waits until the console stops (it stops only on shutdown or a fatal error).
    pub async fn wait(&mut self) {
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

/// The console.
pub struct Console;

impl Console {
    /// Opens the data folder (creating the CA, signing key, HTTPS certificate, database and
    /// first user as needed), then serves the API and runs the broker connection.
    pub async fn start(config: ConsoleConfig) -> Result<ConsoleHandle, ConsoleError> {
        if config.plain_http && config.tls_files.is_none() && !config.listen.ip().is_loopback() {
            return Err(ConsoleError::Config(format!(
                "plain HTTP is only allowed on a loopback address, not {}: drop --plain-http to serve HTTPS",
                config.listen
            )));
        }
        let tenant = TenantId::new(config.tenant.as_str())
            .map_err(|e| ConsoleError::Config(format!("tenant: {e}")))?;
        beckon_identity::validate_id(&config.console_id)
            .map_err(|e| ConsoleError::Config(format!("console id: {e}")))?;
        let oidc = config
            .oidc
            .clone()
            .map(|c| oidc::Oidc::new(c, config.public_url.as_deref()).map(Arc::new))
            .transpose()?;
        create_private_dir(&config.data_dir)?;
        let ca = load_or_create_ca(&config.data_dir)?;
        let signer = WakeUpSigner::new(load_or_create_signing_key(&config.data_dir)?);
        let database = config.database();
        let opened = tokio::task::spawn_blocking(move || database.open())
            .await
            .map_err(|e| ConsoleError::Config(format!("opening the database: {e}")))??
            .for_console(&config.console_id)
            .with_call_chunk(config.call_chunk);
        let metrics = Arc::new(metrics::ConsoleMetrics::new());
        let store = StoreHandle::new(Arc::new(opened), metrics.clone());
        let initial_admin_password = api::ensure_first_user(&store, &config.admin_user).await?;

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ConsoleError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ConsoleError::Bind {
            addr: config.listen,
            source,
        })?;
        let tls = if config.plain_http && config.tls_files.is_none() {
            None
        } else {
            Some(tls::server_config(&config, &ca)?)
        };
        for warning in tls::certificate_warnings(&config) {
            tracing::warn!("{warning}");
        }

        let (events, _) = broadcast::channel(4096);
        let (dispatch_tx, dispatch_rx) = mpsc::channel(dispatch::COMMANDS);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let state = AppState {
            store,
            ca: Arc::new(ca),
            signer: Arc::new(signer),
            tenant,
            events,
            dispatch: dispatch_tx,
            recording: Arc::new(tokio::sync::Notify::new()),
            relays: Arc::default(),
            push: Arc::new(Mutex::new(PushStatus {
                connected: false,
                message:
                    "Push service servers are not reachable: the console has not connected yet"
                        .into(),
                last_error: None,
                since: model::now_ms(),
                diagnosis: None,
            })),
            sessions: Arc::new(guard::SessionActivity::new(
                config.session_idle_timeout,
                config.session_lifetime,
            )),
            config: Arc::new(config),
            shutdown: shutdown_rx.clone(),
            metrics,
            oidc,
        };
        if let Err(e) = tenant_file::publish(&state).await {
            return Err(ConsoleError::Config(format!(
                "{e}; check --broker-tenant-file"
            )));
        }
        let router = api::router(state.clone()).merge(ui::router());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut tasks = Vec::new();
        if let Some(tls) = &tls {
            tasks.push(tokio::spawn(tls::renew(
                state.clone(),
                tls.clone(),
                shutdown_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(http::serve(
            listener,
            tls,
            router,
            state.config.http,
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(dispatch::run(
            state.clone(),
            dispatch_rx,
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(dispatch::record(
            state.clone(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(follow_other_consoles(
            state.clone(),
            shutdown_rx,
        )));
        tracing::info!(%local_addr, scheme, "console listening");
        Ok(ConsoleHandle {
            local_addr,
            scheme,
            initial_admin_password,
            state,
            shutdown,
            tasks,
        })
    }
}

/// Hands the delivery changes other consoles on the database write to this console's live
/// event streams (PostgreSQL's notices, on a thread of its own; nothing on SQLite), so that
/// a call's states show on whichever console a browser follows it.
async fn follow_other_consoles(st: AppState, mut shutdown: watch::Receiver<bool>) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (store, events, stopping) = (st.store.inner().clone(), st.events.clone(), stop.clone());
    let follower = std::thread::Builder::new()
        .name("beckon-changes".into())
        .spawn(move || {
            let result = store.follow_changes(
                &mut |changes| {
                    let at = model::now_ms();
                    for c in changes {
                        let _ = events.send(CallEvent {
                            call_id: c.call_id,
                            agent_id: c.agent_id,
                            state: c.state,
                            at,
                        });
                    }
                },
                &stopping,
            );
            if let Err(e) = result {
                tracing::warn!(error = %e, "following other consoles' changes stopped");
            }
        });
    if let Err(e) = follower {
        tracing::warn!(error = %e, "could not start following other consoles' changes");
        return;
    }
    dispatch::stopped(&mut shutdown).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), ConsoleError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|source| ConsoleError::Io {
        context: "cannot create the data folder",
        path: dir.to_owned(),
        source,
    })
}

/// The tenant CA's files in the data folder: `tenant-ca.pem` and `tenant-ca.key` (0600).
pub(crate) fn tenant_ca_files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("tenant-ca.pem"), dir.join("tenant-ca.key"))
}

/// The tenant CA, created on first start.
fn load_or_create_ca(dir: &Path) -> Result<CertificateAuthority, ConsoleError> {
    let (cert, key) = tenant_ca_files(dir);
    if cert.exists() || key.exists() {
        return Ok(CertificateAuthority::load(&cert, &key)?);
    }
    let ca = CertificateAuthority::generate(
        "Beckon tenant CA",
        Duration::from_secs(10 * 365 * 24 * 3600),
    )?;
    ca.save(&cert, &key)?;
    Ok(ca)
}

/// The wake-up signing key: `wakeup-signing.key` (PKCS#8, 0600) with key id `console-1`.
fn load_or_create_signing_key(dir: &Path) -> Result<SigningKey, ConsoleError> {
    let path = dir.join("wakeup-signing.key");
    let kid = KeyId::new("console-1").map_err(|e| ConsoleError::Config(e.to_string()))?;
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let doc =
                SigningKey::generate_pkcs8().map_err(|e| ConsoleError::Config(e.to_string()))?;
            beckon_pki::write_atomic(&path, &doc, 0o600)?;
            doc
        }
        Err(source) => {
            return Err(ConsoleError::Io {
                context: "cannot read the wake-up signing key",
                path,
                source,
            });
        }
    };
    SigningKey::from_pkcs8(kid, &bytes).map_err(|e| {
        ConsoleError::Config(format!(
            "{}: {e}; restore it from a backup (agents trust this key)",
            path.display()
        ))
    })
}
