//! The tokio layer: listeners, the task that owns the [`BrokerCore`], certificate reloads
//! and graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use beckon_mqtt::Connect;
use beckon_pki::{PkiError, ReloadingServerConfig, ServerTlsOptions, TlsFiles};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{BrokerConfig, ConfigError};
use crate::connection::{ActiveGuard, Busy, ListenerKind, Shared, serve};
use crate::core::{Action, BrokerCore, CloseReason, ClusterOut, ConnId, ConnectionInfo};
use crate::fdlimit;
use crate::outbox::{Outbox, Pushed};
use crate::presence::{self, Presence, reason};
use crate::tenancy::Tenancy;
use beckon_identity::Identity;
use beckon_mqtt::Packet;

/// Events queued from connection tasks to the core task. Bounded: a busy core slows the
/// readers down instead of growing memory.
const EVENT_QUEUE: usize = 4096;
/// Listen backlog: room for a reconnect storm.
const BACKLOG: u32 = 4096;
/// How long shutdown waits for connections to flush their last packets.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The core is ticked when its next deadline is due, and at least this often.
const MAX_TICK: Duration = Duration::from_secs(1);

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be opened.
    #[error(
        "cannot listen on {addr} ({listener}): {source}; is another broker running there, or is the port privileged?"
    )]
    Bind {
        /// Which listener.
        listener: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A privileged port could not be opened.
    #[error(
        "cannot listen on {addr} ({listener}): permission denied; ports below 1024 need privilege: use --fallback 127.0.0.1:8443 (listeners.fallback) or grant the binary CAP_NET_BIND_SERVICE"
    )]
    Privileged {
        /// Which listener.
        listener: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Certificates could not be created or loaded.
    #[error("TLS: {0}")]
    Tls(#[from] PkiError),
    /// The cluster link could not start.
    #[error(transparent)]
    Cluster(#[from] beckon_cluster::ClusterError),
    /// The protocol core stopped unexpectedly (a bug); the broker cannot continue.
    #[error("the broker core stopped unexpectedly: {0}")]
    CoreStopped(String),
}

/// From a connection task to the core task.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // packets are not boxed twice; the queue is bounded
pub(crate) enum Event {
    /// An admitted CONNECT.
    Connect {
        conn: ConnId,
        connect: Box<Connect>,
        info: ConnectionInfo,
        outbox: Arc<Outbox>,
        /// The tenant identity, when the connection authenticated as one.
        identity: Option<Box<Identity>>,
        /// Whether the client says it came through an HTTP proxy (CONNECT user property
        /// `beckon-via-proxy`).
        via_proxy: Option<bool>,
    },
    /// A packet after CONNECT.
    Packet { conn: ConnId, packet: Packet },
    /// The connection ended on the client's side or by a protocol error.
    Closed { conn: ConnId, reason: CloseReason },
    /// Tenant files were removed: their connections are closed.
    TenantsRemoved(Vec<String>),
    /// These connections' credentials were revoked (tenant file `[[revoked]]`): closed.
    Revoked(Vec<ConnId>),
}

/// What a started server listens on.
#[derive(Debug, Clone)]
pub struct Bound {
    /// The MQTT-over-TLS address, when that listener is on.
    pub mqtts: Option<SocketAddr>,
    /// The plain MQTT address, when that listener is on.
    pub mqtt: Option<SocketAddr>,
    /// The shared HTTPS port (MQTT, WebSocket, health), when that listener is on.
    pub fallback: Option<SocketAddr>,
    /// The admin HTTP listener (`/metrics`, `/healthz`), when on.
    pub admin: Option<SocketAddr>,
    /// The CA certificate clients must trust, when the broker uses its generated
    /// certificate (in the data folder).
    pub generated_ca: Option<PathBuf>,
    /// The connection limit in force.
    pub max_connections: usize,
    /// The file descriptor limit read at start, if it could be read.
    pub fd_limit: Option<fdlimit::FdLimit>,
    /// This node's name when it is part of a cluster.
    pub cluster_node: Option<String>,
}

/// Controls a running server.
#[derive(Debug)]
pub struct ServerHandle {
    shutdown: watch::Sender<bool>,
    core_task: JoinHandle<Result<(), String>>,
    tasks: Vec<JoinHandle<()>>,
    tls: Option<Arc<ReloadingServerConfig>>,
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// Loads the certificate files again now (as SIGHUP does). Live connections keep theirs;
    /// on error the old certificate stays in use.
    pub fn reload_certificates(&self) -> Result<(), PkiError> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// Connections alive, including those still in TLS or CONNECT.
    pub fn connection_count(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Graceful shutdown: stop accepting, DISCONNECT 0x8B (Server shutting down) to every v5
    /// client, flush, close; waits at most a few seconds for slow clients.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        match self.core_task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServerError::CoreStopped(e)),
            Err(e) => Err(ServerError::CoreStopped(e.to_string())),
        }
    }

    /// Resolves when the core task ends on its own (it only does so after a panic).
    pub async fn stopped(&mut self) -> ServerError {
        match (&mut self.core_task).await {
            Ok(Ok(())) => ServerError::CoreStopped("ended".into()),
            Ok(Err(e)) => ServerError::CoreStopped(e),
            Err(e) => ServerError::CoreStopped(e.to_string()),
        }
    }
}

/// The broker's network server.
#[derive(Debug)]
pub struct Server;

/// The names a generated server certificate carries: localhost, loopback addresses and the
/// host name.
pub fn default_certificate_names() -> Vec<String> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    if !host.is_empty() && !names.contains(&host) && !host.contains(char::is_whitespace) {
        names.push(host);
    }
    names
}

/// Binds and listens on `addr`; returns the listener and the address it got (the port, when
/// `addr` asked for any).
fn bind_listener(
    listener: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), ServerError> {
    let err = |source: io::Error| {
        if source.kind() == io::ErrorKind::PermissionDenied && addr.port() < 1024 {
            ServerError::Privileged {
                listener,
                addr,
                source,
            }
        } else {
            ServerError::Bind {
                listener,
                addr,
                source,
            }
        }
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    let l = socket.listen(BACKLOG).map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    Ok((l, local))
}

impl Server {
    /// Validates the configuration, prepares certificates (creating a CA and server
    /// certificate in the data folder when none is configured), binds the listeners and starts
    /// serving. Use port 0 for ephemeral ports; [`Bound`] tells the real addresses.
    pub async fn bind(config: BrokerConfig) -> Result<(Bound, ServerHandle), ServerError> {
        config.validate()?;

        // File descriptors bound the connections one process holds: raise the soft limit to
        // the hard one and say what that allows.
        let fd_limit = match fdlimit::raise_to_hard().or_else(|_| fdlimit::read()) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the file descriptor limit");
                None
            }
        };
        let room = fd_limit.map_or(usize::MAX, |l| {
            usize::try_from(l.connection_room()).unwrap_or(usize::MAX)
        });
        let max_connections = match config.limits.max_connections {
            0 => room,
            n => n,
        };
        if let Some(l) = fd_limit {
            tracing::info!(
                soft = l.soft,
                hard = l.hard,
                room,
                max_connections,
                "file descriptor limit {} (hard {}): room for about {} connections; max_connections = {}",
                l.soft,
                l.hard,
                room,
                max_connections
            );
            if max_connections > room {
                tracing::warn!(
                    max_connections,
                    room,
                    "limits.max_connections is above what the file descriptor limit allows; accepts will pause when descriptors run out (raise LimitNOFILE)"
                );
            }
        }
        if config.allow_anonymous {
            tracing::warn!(
                "ANONYMOUS ACCESS IS ON (--allow-anonymous): any client may connect, subscribe and publish without authentication. Use it for development and tests only."
            );
        }

        // Certificates.
        let mut generated_ca = None;
        let tls = match config.listeners.mqtts.0.or(config.listeners.fallback.0) {
            None => None,
            Some(_) => {
                let files = match (&config.tls.cert, &config.tls.key) {
                    (Some(cert), Some(key)) => TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        client_ca: config.tls.client_ca.clone(),
                    },
                    _ => {
                        let names = default_certificate_names();
                        let certs = beckon_pki::ensure_broker_certs(&config.data_dir, &names)?;
                        if certs.created_ca {
                            tracing::info!(ca = %certs.ca_cert.display(), "created a certificate authority for this broker");
                        }
                        if certs.issued_server {
                            tracing::info!(cert = %certs.server_cert.display(), names = ?names, "issued the broker's server certificate");
                        }
                        generated_ca = Some(certs.ca_cert.clone());
                        TlsFiles {
                            cert: certs.server_cert,
                            key: certs.server_key,
                            client_ca: Some(config.tls.client_ca.clone().unwrap_or(certs.ca_cert)),
                        }
                    }
                };
                // Tenants bring their own CAs and token keys; only without them is a
                // broker with neither a client CA nor anonymous access closed to everyone.
                if files.client_ca.is_none()
                    && !config.allow_anonymous
                    && config.tenants_dir.is_none()
                {
                    tracing::warn!(
                        "no tls.client_ca, no tenants_dir and anonymous access is off: no client can authenticate yet"
                    );
                }
                let options = ServerTlsOptions {
                    alpn: vec![b"mqtt".to_vec()],
                    min_version: config.min_tls_version().unwrap_or_default(),
                };
                Some(Arc::new(ReloadingServerConfig::new(files, options)?))
            }
        };

        // Listeners.
        let mut listeners = Vec::new();
        let mut bound = Bound {
            mqtts: None,
            mqtt: None,
            fallback: None,
            admin: None,
            generated_ca,
            max_connections,
            fd_limit,
            cluster_node: None,
        };
        if let Some(addr) = config.listeners.mqtts.0 {
            let (l, local) = bind_listener("listeners.mqtts", addr)?;
            tracing::info!(addr = %local, "listening for MQTT over TLS");
            bound.mqtts = Some(local);
            listeners.push((l, ListenerKind::Tls));
        }
        if let Some(addr) = config.listeners.mqtt.0 {
            let (l, local) = bind_listener("listeners.mqtt", addr)?;
            tracing::info!(addr = %local, "listening for plain MQTT (unencrypted)");
            if !local.ip().is_loopback() {
                tracing::warn!(addr = %local, "plain MQTT is reachable beyond loopback: traffic is not encrypted");
            }
            if !config.allow_anonymous {
                tracing::warn!(addr = %local, "on the plain listener clients cannot show a certificate; with anonymous access off they are refused");
            }
            bound.mqtt = Some(local);
            listeners.push((l, ListenerKind::Plain));
        }

        let tenancy = config.tenants_dir.as_deref().map(|folder| {
            Arc::new(Tenancy::load(
                folder,
                config.min_tls_version().unwrap_or_default() == beckon_pki::TlsVersion::Tls13,
            ))
        });

        if let Some(addr) = config.listeners.fallback.0 {
            let (l, local) = bind_listener("listeners.fallback", addr)?;
            tracing::info!(addr = %local, "listening on the shared HTTPS port: MQTT (ALPN mqtt), MQTT over WebSocket (/mqtt), health (/healthz)");
            bound.fallback = Some(local);
            listeners.push((l, ListenerKind::Fallback));
        }

        let admin = match config.listeners.admin.0 {
            None => None,
            Some(addr) => {
                let (l, local) = bind_listener("listeners.admin", addr)?;
                tracing::info!(addr = %local, "admin HTTP: /metrics (Prometheus), /healthz");
                bound.admin = Some(local);
                Some(l)
            }
        };
        let metrics = Arc::new(crate::metrics::Metrics::new());

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            tls: tls.clone(),
            allow_anonymous: config.allow_anonymous,
            tenancy: tenancy.clone(),
            fallback_tls: std::sync::Mutex::new(None),
            proxy_protocol: config
                .listeners
                .proxy_protocol
                .iter()
                .filter_map(|n| match n.as_str() {
                    "mqtts" => Some(ListenerKind::Tls),
                    "fallback" => Some(ListenerKind::Fallback),
                    "mqtt" => Some(ListenerKind::Plain),
                    _ => None,
                })
                .collect(),
            metrics: metrics.clone(),
            connect_timeout: config.connect_timeout(),
            max_packet_size: config.limits.max_packet_size,
            max_outbound_packets: config.limits.max_outbound_packets,
            server_receive_maximum: config.limits.server_receive_maximum,
            server_max_inflight: config.limits.server_max_inflight,
            max_connections,
            connect_limiter: crate::ratelimit::ConnectLimiter::new(
                crate::ratelimit::Rate::new(
                    config.limits.connect_rate,
                    config.limits.connect_burst,
                ),
                crate::ratelimit::Rate::new(
                    config.limits.connect_rate_per_address,
                    config.limits.connect_burst_per_address,
                ),
            ),
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            shutdown: shutdown_rx.clone(),
        });
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let mut core = BrokerCore::new(config.core_config());
        let cluster = match &config.cluster {
            None => None,
            Some(c) => {
                core.enable_cluster(&c.node);
                let options = beckon_cluster::ClusterOptions {
                    servers: c.nats.clone(),
                    node: c.node.clone(),
                    subject_root: c.name.clone(),
                    heartbeat: Duration::from_millis(c.heartbeat_ms),
                    node_timeout: Duration::from_millis(c.node_timeout_ms),
                    flush_timeout: Duration::from_millis(c.flush_timeout_ms),
                };
                let (link, incoming, task) = beckon_cluster::join(options).await?;
                tracing::info!(node = %c.node, nats = ?c.nats, cluster = %c.name, "cluster node: messages, client ids and presence shared through NATS");
                bound.cluster_node = Some(c.node.clone());
                Some(ClusterSide {
                    link,
                    incoming,
                    task,
                    pending: HashMap::new(),
                    next_token: 1,
                })
            }
        };
        let core_task = tokio::spawn(
            core_loop(
                core,
                events_rx,
                shutdown_rx.clone(),
                metrics.clone(),
                cluster,
            )
            .instrument(tracing::info_span!("core")),
        );
        let mut tasks = Vec::new();
        for (listener, kind) in listeners {
            tasks.push(tokio::spawn(accept_loop(
                listener,
                kind,
                shared.clone(),
                events_tx.clone(),
                shutdown_rx.clone(),
            )));
        }
        if let Some(l) = admin {
            tasks.push(tokio::spawn(crate::admin::admin_loop(
                l,
                metrics.clone(),
                shutdown_rx.clone(),
            )));
        }
        if let Some(tenancy) = &tenancy {
            tasks.push(tokio::spawn(tenant_reload_loop(
                tenancy.clone(),
                events_tx.clone(),
                Tenancy::poll_interval(config.tenants_reload_interval_secs),
                shutdown_rx.clone(),
            )));
        }
        drop(events_tx);
        if let Some(tls) = &tls {
            tasks.push(tokio::spawn(reload_loop(
                tls.clone(),
                Duration::from_secs(config.tls.reload_interval_secs),
                register_hangup(),
                shutdown_rx,
            )));
        }
        Ok((
            bound,
            ServerHandle {
                shutdown: shutdown_tx,
                core_task,
                tasks,
                tls,
                shared,
            },
        ))
    }
}

/// Runs a broker until `shutdown` resolves, then shuts it down gracefully.
pub async fn run(
    config: BrokerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<Bound, ServerError> {
    let (bound, mut handle) = Server::bind(config).await?;
    tokio::select! {
        () = shutdown => {
            tracing::info!("shutting down: disconnecting clients");
            handle.shutdown().await?;
            tracing::info!("shut down");
            Ok(bound)
        }
        e = handle.stopped() => Err(e),
    }
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

async fn accept_loop(
    listener: TcpListener,
    kind: ListenerKind,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Above the limit, a few extra sockets are still read so they can be told "busy";
    // beyond this slack they are closed at once.
    let slack = (shared.max_connections / 100).max(16);
    let mut backoff = Duration::ZERO;
    let mut last_warn: Option<Instant> = None;
    let mut suppressed = 0u64;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        match accepted {
            Ok((tcp, remote)) => {
                backoff = Duration::ZERO;
                let active = shared.active.fetch_add(1, Ordering::Relaxed) + 1;
                let guard = ActiveGuard(shared.clone());
                if active > shared.max_connections.saturating_add(slack) {
                    tracing::debug!(%remote, "far above the connection limit; closed at once");
                    drop(tcp);
                    drop(guard);
                    continue;
                }
                let over_limit = if active > shared.max_connections {
                    Some(Busy::Connections)
                } else {
                    shared
                        .connect_limiter
                        .admit(remote.ip(), std::time::Instant::now())
                        .err()
                        .map(Busy::Rate)
                };
                let conn = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let span = tracing::info_span!(
                    "conn",
                    id = conn,
                    remote = %remote,
                    path = kind.path(),
                    client_id = tracing::field::Empty
                );
                let shared = shared.clone();
                let events = events.clone();
                tokio::spawn(
                    async move {
                        let _guard = guard;
                        serve(shared, events, tcp, remote, kind, conn, over_limit).await;
                    }
                    .instrument(span),
                );
            }
            Err(e) if is_fd_exhaustion(&e) => {
                // Out of descriptors (or kernel memory): pause accepting instead of spinning;
                // pending clients wait in the backlog.
                backoff = (backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
                let now = Instant::now();
                if last_warn.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
                    tracing::warn!(
                        error = %e,
                        connections = shared.active.load(Ordering::Relaxed),
                        pause_ms = backoff.as_millis() as u64,
                        suppressed,
                        "cannot accept: out of file descriptors; pausing accepts (raise LimitNOFILE or lower limits.max_connections)"
                    );
                    last_warn = Some(now);
                    suppressed = 0;
                } else {
                    suppressed += 1;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => break,
                }
            }
            Err(e) => {
                // Per-connection failures (reset before accept, ...): go on, without spinning.
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// SIGHUP, registered while binding (before the caller reports ready), so that an early
/// SIGHUP reloads instead of terminating the process.
fn register_hangup() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; certificate files are still watched");
            None
        }
    }
}

async fn tenant_reload_loop(
    tenancy: Arc<Tenancy>,
    events: mpsc::Sender<Event>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                // Reading a folder of small files: off the async threads.
                let t = tenancy.clone();
                let Ok(reloaded) = tokio::task::spawn_blocking(move || t.reload_if_changed()).await else {
                    continue;
                };
                if !reloaded.removed.is_empty()
                    && events.send(Event::TenantsRemoved(reloaded.removed)).await.is_err()
                {
                    break;
                }
                if !reloaded.revoked.is_empty()
                    && events.send(Event::Revoked(reloaded.revoked)).await.is_err()
                {
                    break;
                }
            }
            _ = shutdown.changed() => break,
        }
    }
}

async fn reload_loop(
    tls: Arc<ReloadingServerConfig>,
    interval: Duration,
    mut hangup: Option<tokio::signal::unix::Signal>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = (!interval.is_zero()).then(|| {
        let mut t = tokio::time::interval(interval);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    loop {
        tokio::select! {
            _ = async { match &mut ticker { Some(t) => { t.tick().await; } None => std::future::pending::<()>().await } } => {
                // Errors are logged by the holder; the old certificate stays.
                let _ = tls.reload_if_changed();
            }
            _ = async { match &mut hangup { Some(h) => { h.recv().await; } None => std::future::pending::<()>().await } } => {
                tracing::info!("SIGHUP: reloading certificates");
                let _ = tls.reload();
            }
            _ = shutdown.changed() => break,
        }
    }
}

/// Carries out the core's actions. Slow consumers found on the way are closed and reported
/// back to the core, which may produce more actions; the loop runs until none are left.
fn apply(
    core: &mut BrokerCore,
    conns: &mut HashMap<ConnId, Arc<Outbox>>,
    presence: &mut Presence,
    why: &'static str,
    ended: &mut Vec<(presence::Present, &'static str)>,
    out: &mut Vec<Action>,
) {
    while !out.is_empty() {
        let mut slow = Vec::new();
        for action in out.drain(..) {
            match action {
                Action::Send { conn, packet } => {
                    let Some(outbox) = conns.get(&conn) else {
                        continue;
                    };
                    if outbox.push(packet) == Pushed::Overflow {
                        conns.remove(&conn);
                        slow.push(conn);
                    }
                }
                Action::Close { conn } => {
                    if let Some(outbox) = conns.remove(&conn) {
                        outbox.close();
                    }
                    if let Some(p) = presence.end(conn) {
                        ended.push((p, why));
                    }
                }
            }
        }
        let now = std::time::Instant::now();
        for conn in slow {
            tracing::warn!(
                conn,
                "outbound queue full: closing a client that does not read"
            );
            if let Some(p) = presence.end(conn) {
                ended.push((p, reason::CONNECTION_LOST));
            }
            core.handle_close(now, conn, CloseReason::Transport, out);
        }
    }
}

/// Carries out the core's actions and publishes the disconnected events of the tenant
/// identities whose connections ended on the way (`why` for those the core closed).
fn settle(
    core: &mut BrokerCore,
    conns: &mut HashMap<ConnId, Arc<Outbox>>,
    presence: &mut Presence,
    why: &'static str,
    out: &mut Vec<Action>,
) {
    let mut ended = Vec::new();
    apply(core, conns, presence, why, &mut ended, out);
    while !ended.is_empty() {
        let now = std::time::Instant::now();
        for (p, why) in ended.drain(..) {
            presence::disconnected(core, now, &p, why, out);
        }
        apply(
            core,
            conns,
            presence,
            reason::CONNECTION_LOST,
            &mut ended,
            out,
        );
    }
}

fn close_reason(reason: CloseReason) -> &'static str {
    match reason {
        CloseReason::KeepAliveTimeout => reason::KEEPALIVE_TIMEOUT,
        CloseReason::ProtocolViolation => reason::PROTOCOL_ERROR,
        CloseReason::Transport | CloseReason::Closed => reason::CONNECTION_LOST,
    }
}

/// The core task's side of the cluster link.
struct ClusterSide {
    link: beckon_cluster::ClusterLink,
    incoming: mpsc::Receiver<beckon_cluster::Incoming>,
    task: JoinHandle<()>,
    /// PUBACK/PUBREC packets waiting for their message to leave for NATS, by token.
    pending: HashMap<u64, (ConnId, Packet)>,
    next_token: u64,
}

impl ClusterSide {
    /// Hands what the core produced for the cluster to the link. Returns the connections
    /// whose acknowledgement cannot be kept (the link is not keeping up): they are closed so
    /// that their clients resend.
    fn forward(&mut self, core: &mut BrokerCore) -> Vec<ConnId> {
        use beckon_cluster::Outgoing;
        let mut failed = Vec::new();
        for item in core.take_cluster_out() {
            let command = match item {
                ClusterOut::Publish { publish, ack } => {
                    let token = ack.map(|ack| {
                        let token = self.next_token;
                        self.next_token += 1;
                        self.pending.insert(token, ack);
                        token
                    });
                    Outgoing::Publish { publish, token }
                }
                ClusterOut::Interest { filter, added } => Outgoing::Interest { filter, added },
                ClusterOut::Claim {
                    client_id,
                    clean_start,
                } => Outgoing::Claim {
                    client_id,
                    clean_start,
                },
            };
            if let Err(command) = self.link.send(command) {
                tracing::warn!(
                    "cluster link queue full: a message, subscription or claim did not reach the other nodes"
                );
                if let Outgoing::Publish {
                    token: Some(token), ..
                } = command
                    && let Some((conn, _)) = self.pending.remove(&token)
                {
                    failed.push(conn);
                }
            }
        }
        failed
    }
}

async fn next_incoming(cluster: &mut Option<ClusterSide>) -> Option<beckon_cluster::Incoming> {
    match cluster {
        Some(c) => c.incoming.recv().await,
        None => std::future::pending().await,
    }
}

/// Closes a connection the broker gives up on (its PUBACK cannot be kept): the client
/// reconnects and resends.
fn drop_connection(
    core: &mut BrokerCore,
    conns: &mut HashMap<ConnId, Arc<Outbox>>,
    presence: &mut Presence,
    conn: ConnId,
    out: &mut Vec<Action>,
) {
    if let Some(outbox) = conns.remove(&conn) {
        outbox.close();
        let now = std::time::Instant::now();
        core.handle_close(now, conn, CloseReason::Closed, out);
        if let Some(p) = presence.end(conn) {
            presence::disconnected(core, now, &p, reason::CONNECTION_LOST, out);
        }
    }
}

/// Settles the core's actions and hands the cluster what it must know, until both are done.
fn settle_all(
    core: &mut BrokerCore,
    conns: &mut HashMap<ConnId, Arc<Outbox>>,
    presence: &mut Presence,
    cluster: &mut Option<ClusterSide>,
    out: &mut Vec<Action>,
) {
    settle(core, conns, presence, reason::CONNECTION_LOST, out);
    if let Some(c) = cluster {
        loop {
            let failed = c.forward(core);
            if failed.is_empty() {
                break;
            }
            for conn in failed {
                drop_connection(core, conns, presence, conn, out);
            }
            settle(core, conns, presence, reason::CONNECTION_LOST, out);
        }
    }
}

/// What the cluster link reports.
fn cluster_incoming(
    core: &mut BrokerCore,
    conns: &mut HashMap<ConnId, Arc<Outbox>>,
    presence: &mut Presence,
    cluster: &mut ClusterSide,
    incoming: beckon_cluster::Incoming,
    out: &mut Vec<Action>,
) {
    use beckon_cluster::Incoming;
    let now = std::time::Instant::now();
    match incoming {
        Incoming::Message(publish) => {
            core.handle_remote_publish(now, publish, out);
        }
        Incoming::Claim(claim) => {
            if let Some(conn) = core.connection_of(&claim.client_id) {
                // The node that took the client over publishes the disconnected event.
                presence.end(conn);
                tracing::info!(conn, client_id = %claim.client_id, node = %claim.node, "session taken over on another node");
            }
            core.handle_remote_claim(now, &claim.client_id, claim.clean_start, out);
        }
        Incoming::NodeLost(node) => {
            let released = presence::release_node(core, now, &node, out);
            tracing::warn!(node = %node, identities = released, "cluster node gone: its identities are disconnected");
        }
        Incoming::Flushed { tokens, ok } => {
            for token in tokens {
                let Some((conn, packet)) = cluster.pending.remove(&token) else {
                    continue;
                };
                if ok {
                    core.cluster_ack(conn, packet, out);
                } else {
                    drop_connection(core, conns, presence, conn, out);
                }
            }
        }
        Incoming::Reconnected => presence.republish(core, now, out),
        Incoming::SnapshotRequest { reply } => {
            let retained = core.retained_snapshot(now);
            if cluster
                .link
                .send(beckon_cluster::Outgoing::Snapshot { reply, retained })
                .is_err()
            {
                tracing::warn!(
                    "cluster link queue full: a joining node gets no retained messages from this one"
                );
            }
        }
        Incoming::Retained(publish) => {
            core.store_retained_if_absent(now, publish);
        }
    }
}

async fn core_loop(
    mut core: BrokerCore,
    mut events: mpsc::Receiver<Event>,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<crate::metrics::Metrics>,
    mut cluster: Option<ClusterSide>,
) -> Result<(), String> {
    let mut conns: HashMap<ConnId, Arc<Outbox>> = HashMap::new();
    let mut last_sync = Instant::now();
    let node = cluster.as_ref().map(|c| c.link.node().to_owned());
    let mut presence = Presence::new(node.as_deref());
    let mut out = Vec::new();
    let mut next_tick = Instant::now() + MAX_TICK;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                let now = std::time::Instant::now();
                match ev {
                    Event::Connect { conn, connect, info, outbox, identity, via_proxy } => {
                        conns.insert(conn, outbox);
                        let presence_info = identity.is_some().then(|| info.clone());
                        core.handle_connect(now, conn, *connect, info, &mut out);
                        let accepted = out.iter().any(|a| matches!(a,
                            Action::Send { conn: c, packet: Packet::ConnAck(ack) }
                                if *c == conn && !ack.code.is_error()));
                        // A takeover closes the old connection here: its disconnected event
                        // goes out before the new connected one, which stays retained.
                        settle(&mut core, &mut conns, &mut presence, reason::TAKEN_OVER, &mut out);
                        if let (true, Some(identity), Some(info)) = (accepted, identity, presence_info) {
                            if cluster.is_some() {
                                if identity.role == beckon_identity::Role::Agent {
                                    core.hold_interest(conn, &format!("t/{}/agents/{}/+", identity.tenant.as_str(), identity.id()));
                                }
                                presence::release_elsewhere(&mut core, now, &identity, &mut out);
                            }
                            presence.connected(&mut core, now, conn, identity, &info, via_proxy, &mut out);
                        }
                    }
                    Event::Packet { conn, packet } => {
                        if conns.contains_key(&conn) {
                            let why = if matches!(packet, Packet::Disconnect(_)) {
                                reason::CLIENT_DISCONNECT
                            } else {
                                reason::PROTOCOL_ERROR
                            };
                            core.handle_packet(now, conn, packet, &mut out);
                            settle(&mut core, &mut conns, &mut presence, why, &mut out);
                        }
                    }
                    Event::TenantsRemoved(tenants) => {
                        for conn in presence.conns_of_tenants(&tenants) {
                            if let Some(outbox) = conns.remove(&conn) {
                                outbox.close();
                            }
                            core.handle_close(now, conn, CloseReason::Closed, &mut out);
                            if let Some(p) = presence.end(conn) {
                                presence::disconnected(&mut core, now, &p, reason::TENANT_REMOVED, &mut out);
                            }
                        }
                    }
                    Event::Revoked(revoked) => {
                        for conn in revoked {
                            if let Some(outbox) = conns.remove(&conn) {
                                outbox.close();
                                core.handle_close(now, conn, CloseReason::Closed, &mut out);
                            }
                            if let Some(p) = presence.end(conn) {
                                presence::disconnected(&mut core, now, &p, reason::REVOKED, &mut out);
                            }
                        }
                    }
                    Event::Closed { conn, reason } => {
                        if conns.remove(&conn).is_some() {
                            core.handle_close(now, conn, reason, &mut out);
                            if let Some(p) = presence.end(conn) {
                                presence::disconnected(&mut core, now, &p, close_reason(reason), &mut out);
                            }
                        }
                    }
                }
                settle_all(&mut core, &mut conns, &mut presence, &mut cluster, &mut out);
                // An event may bring timed work forward (a will delay, a session expiry).
                if let Some(due) = core.next_deadline() {
                    next_tick = next_tick.min(Instant::from_std(due));
                }
            }
            incoming = next_incoming(&mut cluster) => {
                let Some(c) = cluster.as_mut() else { continue };
                let Some(incoming) = incoming else {
                    return Err("the cluster link stopped".to_owned());
                };
                cluster_incoming(&mut core, &mut conns, &mut presence, c, incoming, &mut out);
                settle_all(&mut core, &mut conns, &mut presence, &mut cluster, &mut out);
                if let Some(due) = core.next_deadline() {
                    next_tick = next_tick.min(Instant::from_std(due));
                }
            }
            () = tokio::time::sleep_until(next_tick) => {
                let now = std::time::Instant::now();
                let next = core.tick(now, &mut out);
                settle_all(&mut core, &mut conns, &mut presence, &mut cluster, &mut out);
                // Walks every session: at most once a second.
                if last_sync.elapsed() >= Duration::from_secs(1) {
                    metrics.sync_core(&core);
                    last_sync = Instant::now();
                }
                let cap = Instant::now() + MAX_TICK;
                next_tick = next
                    .map(|n| Instant::from_std(n).min(cap))
                    .unwrap_or(cap);
            }
        }
    }

    // Graceful shutdown: the core says goodbye to everyone (DISCONNECT 0x8B to v5 clients).
    // Tenant servers still connected learn that every identity goes away.
    let now = std::time::Instant::now();
    for p in presence.end_all() {
        presence::disconnected(&mut core, now, &p, reason::SERVER_SHUTDOWN, &mut out);
    }
    settle(
        &mut core,
        &mut conns,
        &mut presence,
        reason::SERVER_SHUTDOWN,
        &mut out,
    );
    core.shutdown(&mut out);
    settle(
        &mut core,
        &mut conns,
        &mut presence,
        reason::SERVER_SHUTDOWN,
        &mut out,
    );
    // The last presence events go to the other nodes before the link closes.
    if let Some(mut c) = cluster.take() {
        c.forward(&mut core);
        let ClusterSide { link, task, .. } = c;
        drop(link);
        if tokio::time::timeout(DRAIN_TIMEOUT, task).await.is_err() {
            tracing::warn!("the cluster link did not finish within {DRAIN_TIMEOUT:?}");
        }
    }
    for outbox in conns.values() {
        outbox.close();
    }
    conns.clear();
    // Wait until every connection task has flushed and ended (each holds an event sender),
    // bounded so that a client that does not read cannot hold the exit.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while events.recv().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some connections did not finish within {DRAIN_TIMEOUT:?}; closing them");
    }
    Ok(())
}
