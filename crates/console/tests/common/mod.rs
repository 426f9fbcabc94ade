//! Test helpers: a console with an API client, raw MQTT peers; Mosquitto (killed on drop)
//! from beckon-testkit.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use beckon_broker::{Bound, BrokerConfig, Listen, Server, ServerHandle};
use beckon_console::model::{AgentAddress, Inventory};
use beckon_console::store::{
    DatabaseUrl, NewAgent, NewEnrollmentToken, SqlStore, Store, StoreResult,
};
use beckon_console::{Console, ConsoleConfig, ConsoleHandle};
use beckon_mqtt::{Packet, ProtocolVersion};
use bytes::BytesMut;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

// Not every test program uses every one.
#[allow(unused_imports)]
pub use beckon_testkit::{Mosquitto, TestClient, free_port};

/// Every wait is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

/// Single sign-on with the provider at `issuer`: client `beckon` (secret `secret`), the
/// `groups` claim's `ops` mapped to operator.
pub fn oidc_config(issuer: String) -> beckon_console::oidc::OidcConfig {
    beckon_console::oidc::OidcConfig {
        issuer,
        client_id: "beckon".into(),
        client_secret: beckon_console::oidc::ClientSecret("secret".into()),
        provider_name: "Example ID".into(),
        roles_claim: "groups".into(),
        role_map: vec![("ops".into(), beckon_console::model::Role::Operator)],
        scopes: vec!["openid".into()],
        ca_file: None,
    }
}

/// Runs scripts/test-postgres with `args` (a cluster of a test's own: `start FOLDER [PORT]`,
/// `stop FOLDER`); returns what it printed. The cluster serves TLS from the CA in
/// `FOLDER/ca.pem`.
pub fn cluster(args: &[&str]) -> String {
    let out = cluster_script().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "scripts/test-postgres {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Stops the cluster in the folder when the test ends, however it ends.
pub struct ClusterStop(pub String);

/// A PostgreSQL cluster of a test's own (for tests that stop it or need its files), stopped
/// and removed when dropped.
pub struct OwnCluster {
    /// Its folder (`ca.pem` is the CA of its TLS certificate).
    pub folder: String,
    /// Its URL, for a user that may create databases.
    pub admin: String,
    _stop: ClusterStop,
    _dir: tempfile::TempDir,
}

/// Starts an [`OwnCluster`]; `None`, with a note, when [`POSTGRES_VAR`] is not set (the
/// PostgreSQL binaries may be missing then).
pub fn own_cluster() -> Option<OwnCluster> {
    if std::env::var(POSTGRES_VAR).is_err() {
        eprintln!("{POSTGRES_VAR} is not set: PostgreSQL not tested here");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("cluster").display().to_string();
    let admin = cluster(&["start", &folder]);
    Some(OwnCluster {
        _stop: ClusterStop(folder.clone()),
        folder,
        admin,
        _dir: dir,
    })
}

impl Drop for ClusterStop {
    fn drop(&mut self) {
        let _ = cluster_script().args(["stop", &self.0]).status();
    }
}

fn cluster_script() -> std::process::Command {
    std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-postgres"),
    )
}

pub struct Api {
    pub handle: ConsoleHandle,
    pub router: axum::Router,
    pub token: String,
    pub dir: tempfile::TempDir,
}

/// The variable naming a PostgreSQL server (a URL with a user that may create databases):
/// when set, every console and store of the tests uses a fresh database on it instead of
/// SQLite.
pub const POSTGRES_VAR: &str = "BECKON_TEST_POSTGRES";

/// A fresh, empty database for one test: on the PostgreSQL server of [`POSTGRES_VAR`] when
/// it is set (`CREATE DATABASE test_<random>`), else `None` (the console's SQLite file).
pub fn test_database() -> Option<DatabaseUrl> {
    let admin = std::env::var(POSTGRES_VAR).ok().filter(|v| !v.is_empty())?;
    Some(DatabaseUrl::Postgres(create_postgres_database(&admin)))
}

/// Creates a database with a random name on the server `admin` points at; returns its URL.
pub fn create_postgres_database(admin: &str) -> String {
    let name = format!("test_{}", uuid::Uuid::now_v7().simple());
    let (server, created) = (admin.to_owned(), name.clone());
    // The synchronous client runs its own runtime: keep it off the test's.
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&server, postgres::NoTls)
            .unwrap_or_else(|e| panic!("{POSTGRES_VAR}: cannot connect: {e}"));
        client
            .batch_execute(&format!("CREATE DATABASE {created}"))
            .unwrap();
    })
    .join()
    .unwrap();
    let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
    format!("{base}/{name}")
}

/// A new agent as enrollment records it: `<id>.example`, Debian 13, one address and MAC,
/// check-in secret hash `[9; 32]`, no certificate.
pub fn new_agent(id: &str) -> NewAgent {
    NewAgent {
        id: id.into(),
        name: id.into(),
        inventory: Inventory {
            hostname: format!("{id}.example"),
            os: "Debian 13".into(),
            addresses: vec![AgentAddress {
                address: "192.168.1.23".parse().unwrap(),
                prefix_len: 24,
            }],
            macs: vec!["00:11:22:33:44:55".into()],
        },
        secret_hash: [9; 32],
        certificate: None,
    }
}

/// Enrolls the agents `ids` (each as [`new_agent`] makes it) straight into `store`, with an
/// enrollment token `t` made for them.
pub fn enroll_in_store(store: &dyn Store, ids: &[impl AsRef<str>]) -> StoreResult<()> {
    store.create_enrollment_token(NewEnrollmentToken {
        id: "t".into(),
        hash: [1; 32],
        label: "test".into(),
        created_by: "user:admin".into(),
        expires_at: None,
        max_uses: None,
        groups: vec![],
    })?;
    for id in ids {
        store.enroll_agent(&[1; 32], new_agent(id.as_ref()), 10)?;
    }
    Ok(())
}

/// A fresh store: on PostgreSQL when [`POSTGRES_VAR`] is set, else SQLite in memory.
pub fn store() -> SqlStore {
    match test_database() {
        Some(url) => open_store(&url),
        None => SqlStore::open_in_memory().unwrap(),
    }
}

/// A fresh database that can be opened again (after changes behind the store's back): on
/// PostgreSQL when [`POSTGRES_VAR`] is set, else a SQLite file in `dir`.
pub fn reopenable_database(dir: &Path) -> DatabaseUrl {
    test_database().unwrap_or_else(|| DatabaseUrl::Sqlite(dir.join("console.db")))
}

/// Opens `url` (migrating it) on a thread of its own: the PostgreSQL client runs its own
/// runtime, which may not start on a test runtime's thread.
pub fn open_store(url: &DatabaseUrl) -> SqlStore {
    let url = url.clone();
    std::thread::spawn(move || url.open().unwrap())
        .join()
        .unwrap()
}

pub async fn start_with(f: impl FnOnce(&mut ConsoleConfig)) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ConsoleConfig::new(dir.path().join("data"));
    config.database = test_database();
    config.listen = "127.0.0.1:0".parse().unwrap();
    f(&mut config);
    let handle = Console::start(config).await.unwrap();
    let token = handle.create_api_token("tests").await.unwrap();
    let router = beckon_console::api::router(handle.state.clone());
    Api {
        handle,
        router,
        token,
        dir,
    }
}

/// A console whose push service is a development broker (`mqtt://`, no TLS) listening at
/// 127.0.0.1:`port`.
pub async fn start_with_plain_broker(port: u16) -> Api {
    start_with(|c| {
        c.broker = beckon_console::BrokerLink::Anonymous {
            address: format!("127.0.0.1:{port}"),
        }
    })
    .await
}

/// Runs one SQL statement on `database` behind the store's back; returns the rows it
/// changed.
/// Takes `database` back to the schema before SQLite's version `version` (PostgreSQL's
/// `version - 2` from SQLite's 8 on), undoing what each later version added, behind the
/// store's back: the next open migrates it again, as an older console's database would be.
/// A new schema version must add its undo here.
pub fn step_back_before(database: &DatabaseUrl, version: i64) {
    use beckon_console::store::{POSTGRES_SCHEMA_VERSION, SCHEMA_VERSION};
    assert!(
        version >= 8,
        "the schema before SQLite 8 cannot be stepped back to"
    );
    assert_eq!(
        (SCHEMA_VERSION, POSTGRES_SCHEMA_VERSION),
        (14, 12),
        "a new schema version: add its undo to step_back_before"
    );
    let sqlite = matches!(database, DatabaseUrl::Sqlite(_));
    for v in (version..=SCHEMA_VERSION).rev() {
        let undo: Vec<String> = match v {
            14 => [
                "DROP INDEX calls_created",
                "DROP INDEX wol_sends_agent_id",
                "CREATE INDEX wol_sends_agent ON wol_sends(agent_id, at)",
                "DROP INDEX agent_certificates_revoked",
            ]
            .map(String::from)
            .into(),
            13 => vec![
                "DROP TABLE call_unrecorded".into(),
                "ALTER TABLE calls DROP COLUMN targeted".into(),
            ],
            12 if sqlite => [
                "DROP TRIGGER agents_counted_insert",
                "DROP TRIGGER agents_counted_delete",
                "DROP TRIGGER agents_counted_update",
                "DROP TABLE agent_counts",
                "DROP TABLE agent_count_changes",
            ]
            .map(String::from)
            .into(),
            12 => [
                "DROP FUNCTION agents_counted CASCADE",
                "DROP TABLE agent_counts",
                "DROP TABLE agent_count_changes",
            ]
            .map(String::from)
            .into(),
            11 if sqlite => [
                "DROP TRIGGER agents_search_insert",
                "DROP TRIGGER agents_search_update",
                "DROP TRIGGER agents_search_delete",
                "DROP TABLE agents_search",
            ]
            .map(String::from)
            .into(),
            11 => vec!["DROP INDEX agents_search".into()],
            10 => [
                "DROP INDEX agents_presence",
                "DROP INDEX agents_last_seen",
                "DROP INDEX agents_name",
            ]
            .map(String::from)
            .into(),
            9 => vec![
                "DROP TABLE revocation_feed".into(),
                "DROP TABLE revocation_seq".into(),
            ],
            8 => [
                "DROP INDEX calls_open",
                "DROP INDEX deliveries_call_agent",
                "DROP INDEX deliveries_call_state_agent",
                "CREATE INDEX deliveries_call ON deliveries(call_id)",
            ]
            .into_iter()
            .map(String::from)
            .chain(
                beckon_console::store::CALL_COUNT_COLUMNS
                    .map(|c| format!("ALTER TABLE calls DROP COLUMN {c}")),
            )
            .collect(),
            _ => unreachable!(),
        };
        for statement in undo {
            execute_sql(database, &statement);
        }
    }
    let previous = version - 1;
    execute_sql(
        database,
        &if sqlite {
            format!("PRAGMA user_version = {previous}")
        } else {
            format!("UPDATE schema_version SET version = {}", previous - 2)
        },
    );
}

pub fn execute_sql(database: &DatabaseUrl, statement: &str) -> u64 {
    match database {
        DatabaseUrl::Postgres(url) => {
            let (url, statement) = (url.clone(), statement.to_owned());
            // The synchronous client runs its own runtime: keep it off the test's.
            std::thread::spawn(move || {
                let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
                client.execute(statement.as_str(), &[]).unwrap()
            })
            .join()
            .unwrap()
        }
        DatabaseUrl::Sqlite(path) => sqlite_execute(path, statement),
    }
}

impl Api {
    /// Runs one SQL statement on the console's database behind its back (to age records as
    /// if time had passed); returns the rows it changed.
    pub fn execute_sql(&self, statement: &str) -> u64 {
        match &self.handle.state.config.database {
            Some(database) => execute_sql(database, statement),
            None => sqlite_execute(&self.dir.path().join("data").join("console.db"), statement),
        }
    }

    /// One request through the router: status, headers and the body's bytes.
    pub async fn respond(
        &self,
        req: Request<Body>,
    ) -> (StatusCode, Vec<(String, String)>, Vec<u8>) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, bytes.to_vec())
    }

    /// One request through the router: status, headers and the JSON body (`Null` when
    /// empty; a body that is not JSON fails the test).
    pub async fn raw(&self, req: Request<Body>) -> (StatusCode, Vec<(String, String)>, Value) {
        let (status, headers, bytes) = self.respond(req).await;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
        };
        (status, headers, body)
    }

    /// A request with `auth` as its Authorization header (none: without) and the JSON text
    /// `body`; returns the status and the body as text.
    pub async fn text(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, String) {
        let req = request(method, path, auth, body.map(str::to_owned));
        let (status, _, bytes) = self.respond(req).await;
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// A request with the API token.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let auth = format!("Bearer {}", self.token);
        self.call_as(method, path, body, Some(&auth)).await
    }

    /// A request with `auth` as its Authorization header (none: without).
    pub async fn call_as(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        auth: Option<&str>,
    ) -> (StatusCode, Value) {
        let req = request(method, path, auth, body.map(|v| v.to_string()));
        let (s, _, v) = self.raw(req).await;
        (s, v)
    }

    /// POST /api/v1/calls with `body`: a new wake-up call.
    pub async fn create_call(&self, body: Value) -> (StatusCode, Value) {
        self.call("POST", "/api/v1/calls", Some(body)).await
    }

    /// GET /api/v1/calls/`id`: the call with its deliveries (the test fails unless 200).
    pub async fn get_call(&self, id: &str) -> Value {
        let (s, call) = self.call("GET", &format!("/api/v1/calls/{id}"), None).await;
        assert_eq!(s, StatusCode::OK, "{call}");
        call
    }

    /// Polls GET `path` until `f` holds for its body, and returns it; fails the test with
    /// `what` after 30 s.
    pub async fn wait_for(&self, what: &str, path: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, v) = self.call("GET", path, None).await;
            if f(&v) {
                return v;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// POST /api/v1/enroll with `body`, as an agent does: without the API token.
    pub async fn enroll_unauthenticated(&self, body: Value) -> (StatusCode, Value) {
        self.call_as("POST", "/api/v1/enroll", Some(body), None)
            .await
    }

    /// A new enrollment token made with the options in `body`.
    pub async fn enrollment_token(&self, body: Value) -> String {
        let (s, t) = self
            .call("POST", "/api/v1/enrollment-tokens", Some(body))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{t}");
        t["token"].as_str().expect("the token").to_owned()
    }

    /// Enrolls `id` with inventory `inv`; returns the enrollment response.
    pub async fn enroll(&self, id: &str, inv: Value) -> Value {
        self.enroll_with_key(id, inv, &rcgen::KeyPair::generate().unwrap())
            .await
    }

    /// Like [`Api::enroll`] with the agent's own key pair.
    pub async fn enroll_with_key(&self, id: &str, inv: Value, key: &rcgen::KeyPair) -> Value {
        let token = self.enrollment_token(serde_json::json!({})).await;
        let (s, e) = self
            .call(
                "POST",
                "/api/v1/enroll",
                Some(serde_json::json!({"token": token, "agent_id": id, "csr": csr_for(key), "inventory": inv})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{e}");
        e
    }
}

/// A request with `auth` as its Authorization header (none: without) and the JSON text
/// `body`.
/// A request with `auth` as its Authorization header (none: without) and the JSON text
/// `body` (none: empty).
pub fn request(
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<String>,
) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    match body {
        Some(text) => b
            .header("content-type", "application/json")
            .body(Body::from(text))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

/// `req` as if it came from `ip` (without, the console sees the unspecified address).
pub fn from(ip: [u8; 4], mut req: Request<Body>) -> Request<Body> {
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from((ip, 40000))));
    req
}

/// The Retry-After header's seconds, from an answer's headers.
pub fn retry_after(headers: &[(String, String)]) -> u64 {
    headers
        .iter()
        .find(|(k, _)| k == "retry-after")
        .and_then(|(_, v)| v.parse().ok())
        .expect("a Retry-After header")
}

/// POST /api/v1/login as `user` with `password`.
pub fn login(user: &str, password: &str) -> Request<Body> {
    let body = serde_json::json!({"user": user, "password": password});
    request("POST", "/api/v1/login", None, Some(body.to_string()))
}

/// The session cookie (`name=value`) a login answered with, from its headers.
pub fn session_cookie(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .find(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.split(';').next().unwrap().to_owned())
        .expect("a set-cookie header")
}

/// A request sending the session `cookie`, with the JSON `body` (none: empty).
pub fn with_cookie(method: &str, path: &str, cookie: &str, body: Option<Value>) -> Request<Body> {
    let mut req = request(method, path, None, body.map(|v| v.to_string()));
    req.headers_mut()
        .insert("cookie", cookie.parse().expect("a cookie header value"));
    req
}

pub fn csr() -> String {
    csr_for(&rcgen::KeyPair::generate().unwrap())
}

pub fn csr_for(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

/// A raw MQTT 5 client.
pub struct Peer<S = TcpStream> {
    stream: S,
    buf: BytesMut,
}

impl Peer<TcpStream> {
    pub async fn connect(port: u16) -> Self {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .unwrap()
            .unwrap();
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Peer<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        beckon_mqtt::encode(&p, ProtocolVersion::V5, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn recv_within(&mut self, limit: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(p) =
                beckon_mqtt::decode(&mut self.buf, ProtocolVersion::V5, 1 << 20).unwrap()
            {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    pub async fn recv(&mut self) -> Packet {
        self.recv_within(WAIT)
            .await
            .expect("a packet within the wait")
    }

    /// Subscribes to agent `id`'s wake-ups (QoS 1) and waits for the SUBACK.
    pub async fn subscribe_wake(&mut self, id: &str) {
        self.subscribe_qos1(1, &format!("agents/{id}/wake")).await;
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> TestClient for Peer<S> {
    async fn send_packet(&mut self, packet: Packet) {
        self.send(packet).await;
    }

    async fn recv_packet(&mut self) -> Packet {
        self.recv().await
    }
}

/// An agent enrolled by the console (`enrolled`, with its `key`), connected as `id` over TLS
/// to the broker at 127.0.0.1:`port` (trusting `ca`) with the certificate it got.
pub async fn tls_agent(
    port: u16,
    ca: &Path,
    id: &str,
    enrolled: &Value,
    key: &rcgen::KeyPair,
) -> Peer<beckon_net::BoxedStream> {
    let mut peer = tls_peer(port, ca, enrolled, key).await;
    peer.connect_as(id).await;
    peer
}

/// A TLS connection to the broker at 127.0.0.1:`port` (trusting `ca`) with the certificate
/// of `enrolled` and its `key`, before any MQTT packet.
pub async fn tls_peer(
    port: u16,
    ca: &Path,
    enrolled: &Value,
    key: &rcgen::KeyPair,
) -> Peer<beckon_net::BoxedStream> {
    let tls = beckon_net::TlsClient::new(&beckon_net::TlsSettings {
        trust: beckon_net::TrustAnchors::CaFile(ca.to_owned()),
        identity: Some(beckon_net::ClientIdentity::Pem {
            cert: enrolled["certificate"]
                .as_str()
                .unwrap()
                .as_bytes()
                .to_vec(),
            key: key.serialize_pem().into_bytes(),
        }),
        ..Default::default()
    })
    .unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (stream, _) = tls
        .connect(tcp, "127.0.0.1", &["mqtt"], WAIT)
        .await
        .unwrap();
    Peer::new(Box::new(stream) as beckon_net::BoxedStream)
}

/// Beckon's broker reading tenant files from `dir/tenants` (every second), MQTT over TLS on
/// 127.0.0.1:`port` (0: any) only, with the CA it generates; returns the CA file too.
pub async fn tenant_broker(dir: &Path, port: u16) -> (Bound, ServerHandle, PathBuf) {
    tenant_broker_with(dir, port, |_| {}).await
}

/// [`tenant_broker`] with `f` changing its configuration before it starts.
pub async fn tenant_broker_with(
    dir: &Path,
    port: u16,
    f: impl FnOnce(&mut BrokerConfig),
) -> (Bound, ServerHandle, PathBuf) {
    let tenants = dir.join("tenants");
    std::fs::create_dir_all(&tenants).unwrap();
    let mut config = BrokerConfig {
        data_dir: dir.join("broker"),
        tenants_dir: Some(tenants),
        tenants_reload_interval_secs: 1,
        ..BrokerConfig::default()
    };
    config.listeners.mqtts = Listen(Some(([127, 0, 0, 1], port).into()));
    config.listeners.mqtt = Listen(None);
    f(&mut config);
    let (bound, handle) = Server::bind(config).await.expect("broker starts");
    let ca = bound.generated_ca.clone().unwrap();
    (bound, handle, ca)
}

fn sqlite_execute(path: &Path, statement: &str) -> u64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(WAIT).unwrap();
    conn.execute(statement, []).unwrap() as u64
}
