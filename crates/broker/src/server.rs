//! The tokio layer: listeners, the task that owns the [`BrokerCore`], certificate reloads
//! and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use beckon_pki::{PkiError, ReloadingServerConfig, ServerTlsOptions, TlsFiles};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::{BrokerConfig, ConfigError};
use crate::connection::{ActiveGuard, Busy, ConnectionContext, ListenerKind, Peer, serve};
use crate::core::BrokerCore;
use crate::core_task::{ClusterSide, CoreTask, EVENT_QUEUE, Event};
use crate::fdlimit;
use crate::os::Hangup;
use crate::tenancy::Tenancy;

/// Listen backlog: room for a reconnect storm.
const BACKLOG: u32 = 4096;

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
    /// Also holds the core task's event queue: dropped at shutdown, so that the core sees
    /// the queue close once the last connection ended.
    context: Arc<ConnectionContext>,
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
        self.context.active.load(Ordering::Relaxed)
    }

    /// Graceful shutdown: stop accepting, DISCONNECT 0x8B (Server shutting down) to every v5
    /// client, flush, close; waits at most a few seconds for slow clients.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let Self {
            shutdown,
            core_task,
            tasks,
            context,
            ..
        } = self;
        let _ = shutdown.send(true);
        drop(context);
        for t in tasks {
            let _ = t.await;
        }
        match core_task.await {
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
        // Before anything starts: a CA file that cannot be read stops the start.
        let feeds = feed_sources(&config)?;

        let (fd_limit, max_connections) = connection_limit(&config);
        if config.allow_anonymous {
            tracing::warn!(
                "ANONYMOUS ACCESS IS ON (--allow-anonymous): any client may connect, subscribe and publish without authentication. Use it for development and tests only."
            );
        }

        let (tls, generated_ca) = server_tls(&config)?;

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
        let listeners = bind_listeners(&config, &mut bound)?;
        let tenancy = config.tenants_dir.as_deref().map(|folder| {
            Arc::new(Tenancy::load(
                folder,
                config.min_tls_version().unwrap_or_default() == beckon_pki::TlsVersion::Tls13,
            ))
        });
        let metrics = Arc::new(crate::metrics::Metrics::new());

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let context = Arc::new(connection_context(
            &config,
            tls.clone(),
            tenancy.clone(),
            max_connections,
            metrics.clone(),
            shutdown_rx.clone(),
            events_tx.clone(),
        ));
        let mut core = BrokerCore::new(config.core_config());
        let cluster = join_cluster(&config, &mut core, &mut bound).await?;
        let core_task = CoreTask::new(
            core,
            events_rx,
            shutdown_rx.clone(),
            metrics.clone(),
            cluster,
        );
        let core_task = tokio::spawn(core_task.run().instrument(tracing::info_span!("core")));
        let mut tasks = Vec::new();
        for (listener, kind) in listeners.mqtt {
            tasks.push(tokio::spawn(accept_loop(
                listener,
                kind,
                context.clone(),
                shutdown_rx.clone(),
            )));
        }
        if let Some(l) = listeners.admin {
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
            for source in feeds {
                let span = tracing::info_span!("revocation_feed", tenant = %source.tenant);
                tasks.push(tokio::spawn(
                    crate::revocation_feed::feed_loop(
                        source,
                        tenancy.clone(),
                        events_tx.clone(),
                        metrics.clone(),
                        shutdown_rx.clone(),
                    )
                    .instrument(span),
                ));
            }
        }
        drop(events_tx);
        if let Some(tls) = &tls {
            tasks.push(tokio::spawn(reload_loop(
                tls.clone(),
                Duration::from_secs(config.tls.reload_interval_secs),
                Hangup::register(),
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
                context,
            },
        ))
    }
}

/// The `[[revocation_feed]]` sources, each with an HTTP client trusting its console's CA.
fn feed_sources(
    config: &BrokerConfig,
) -> Result<Vec<crate::revocation_feed::FeedSource>, ConfigError> {
    use beckon_net::http::{HttpClient, HttpSettings};
    config
        .revocation_feed
        .iter()
        .map(|feed| {
            let invalid = |key, reason: String| ConfigError::Invalid { key, reason };
            let url = feed
                .feed_url()
                .map_err(|e| invalid("revocation_feed.console", e))?;
            let trust = match &feed.ca {
                Some(ca) => beckon_net::TrustAnchors::CaFile(ca.clone()),
                None => beckon_net::TrustAnchors::System,
            };
            let tls = (url.scheme == beckon_net::http::Scheme::Https)
                .then(|| {
                    beckon_net::TlsClient::new(&beckon_net::TlsSettings {
                        trust,
                        ..Default::default()
                    })
                    .map(Arc::new)
                    .map_err(|e| invalid("revocation_feed.ca", e.to_string()))
                })
                .transpose()?;
            let client = HttpClient::new(HttpSettings {
                tls,
                max_body: crate::revocation_feed::MAX_PAGE_BYTES,
                ..Default::default()
            });
            Ok(crate::revocation_feed::FeedSource {
                tenant: feed.tenant.clone(),
                url,
                token_file: feed.token_file.clone(),
                client,
                interval: Duration::from_secs(feed.poll_interval_secs),
            })
        })
        .collect()
}

/// The file descriptor limit (raised to the hard one) and the connection limit in force:
/// `limits.max_connections`, or what the descriptors allow when it is 0.
fn connection_limit(config: &BrokerConfig) -> (Option<fdlimit::FdLimit>, usize) {
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
    (fd_limit, max_connections)
}

/// The server TLS configuration when a TLS listener is on (certificates created in the data
/// folder when none is configured), and the generated CA clients must trust, if any.
fn server_tls(
    config: &BrokerConfig,
) -> Result<(Option<Arc<ReloadingServerConfig>>, Option<PathBuf>), ServerError> {
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
            if files.client_ca.is_none() && !config.allow_anonymous && config.tenants_dir.is_none()
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
    Ok((tls, generated_ca))
}

/// The bound listeners.
struct Listeners {
    /// The MQTT listeners (TLS, plain, shared port) with their kind.
    mqtt: Vec<(TcpListener, ListenerKind)>,
    /// The admin HTTP listener.
    admin: Option<TcpListener>,
}

/// Binds the MQTT listener of `kind` at `addr` when one is configured, adds it to
/// `listeners` and returns its address.
fn bind_mqtt(
    listeners: &mut Vec<(TcpListener, ListenerKind)>,
    kind: ListenerKind,
    addr: Option<SocketAddr>,
) -> Result<Option<SocketAddr>, ServerError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let (name, what) = match kind {
        ListenerKind::Tls => ("listeners.mqtts", "listening for MQTT over TLS"),
        ListenerKind::Plain => ("listeners.mqtt", "listening for plain MQTT (unencrypted)"),
        ListenerKind::Fallback => (
            "listeners.fallback",
            "listening on the shared HTTPS port: MQTT (ALPN mqtt), MQTT over WebSocket (/mqtt), health (/healthz)",
        ),
    };
    let (l, local) = bind_listener(name, addr)?;
    tracing::info!(addr = %local, "{what}");
    listeners.push((l, kind));
    Ok(Some(local))
}

/// Binds the MQTT listeners and the admin listener; notes their addresses in `bound`.
fn bind_listeners(config: &BrokerConfig, bound: &mut Bound) -> Result<Listeners, ServerError> {
    let mut listeners = Vec::new();
    let addrs = &config.listeners;
    bound.mqtts = bind_mqtt(&mut listeners, ListenerKind::Tls, addrs.mqtts.0)?;
    bound.mqtt = bind_mqtt(&mut listeners, ListenerKind::Plain, addrs.mqtt.0)?;
    bound.fallback = bind_mqtt(&mut listeners, ListenerKind::Fallback, addrs.fallback.0)?;
    if let Some(local) = bound.mqtt {
        if !local.ip().is_loopback() {
            tracing::warn!(addr = %local, "plain MQTT is reachable beyond loopback: traffic is not encrypted");
        }
        if !config.allow_anonymous {
            tracing::warn!(addr = %local, "on the plain listener clients cannot show a certificate; with anonymous access off they are refused");
        }
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
    Ok(Listeners {
        mqtt: listeners,
        admin,
    })
}

/// What every connection task shares: limits, TLS, tenants, metrics, the shutdown signal
/// and the core task's event queue (`core`).
fn connection_context(
    config: &BrokerConfig,
    tls: Option<Arc<ReloadingServerConfig>>,
    tenancy: Option<Arc<Tenancy>>,
    max_connections: usize,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: watch::Receiver<bool>,
    events: mpsc::Sender<Event>,
) -> ConnectionContext {
    ConnectionContext {
        tls,
        allow_anonymous: config.allow_anonymous,
        tenancy,
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
        metrics,
        connect_timeout: config.connect_timeout(),
        max_packet_size: config.limits.max_packet_size,
        max_outbound_packets: config.limits.max_outbound_packets,
        server_receive_maximum: config.limits.server_receive_maximum,
        server_max_inflight: config.limits.server_max_inflight,
        max_connections,
        busy_log: beckon_net::LogEvery::minute(),
        connect_limiter: crate::ratelimit::ConnectLimiter::new(
            crate::ratelimit::Rate::new(config.limits.connect_rate, config.limits.connect_burst),
            crate::ratelimit::Rate::new(
                config.limits.connect_rate_per_address,
                config.limits.connect_burst_per_address,
            ),
        ),
        active: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        shutdown,
        events,
    }
}

/// Joins the cluster when one is configured: the core becomes a node and the task gets its
/// side of the link.
async fn join_cluster(
    config: &BrokerConfig,
    core: &mut BrokerCore,
    bound: &mut Bound,
) -> Result<Option<ClusterSide>, ServerError> {
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
                security: c.security()?,
            };
            let (link, incoming, task) = beckon_cluster::join(options).await?;
            tracing::info!(node = %c.node, nats = ?c.nats, cluster = %c.name, "cluster node: messages, client ids and presence shared through NATS");
            bound.cluster_node = Some(c.node.clone());
            Some(ClusterSide::new(link, incoming, task))
        }
    };
    Ok(cluster)
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

async fn accept_loop(
    listener: TcpListener,
    kind: ListenerKind,
    context: Arc<ConnectionContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Above the limit, a few extra sockets are still read so they can be told "busy";
    // beyond this slack they are closed at once.
    let slack = (context.max_connections / 100).max(16);
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
                let active = context.active.fetch_add(1, Ordering::Relaxed) + 1;
                let guard = ActiveGuard(context.clone());
                if active > context.max_connections.saturating_add(slack) {
                    tracing::debug!(%remote, "far above the connection limit; closed at once");
                    drop(tcp);
                    drop(guard);
                    continue;
                }
                let over_limit = if active > context.max_connections {
                    Some(Busy::Connections)
                } else {
                    context
                        .connect_limiter
                        .admit(remote.ip(), std::time::Instant::now())
                        .err()
                        .map(Busy::Rate)
                };
                let conn = context.next_id.fetch_add(1, Ordering::Relaxed);
                let span = tracing::info_span!(
                    "conn",
                    id = conn,
                    remote = %remote,
                    path = kind.path(),
                    client_id = tracing::field::Empty
                );
                let peer = Peer::accepted(&context, conn, remote, kind, over_limit);
                let context = context.clone();
                tokio::spawn(
                    async move {
                        let _guard = guard;
                        serve(context, tcp, peer).await;
                    }
                    .instrument(span),
                );
            }
            Err(e) if crate::os::is_fd_exhaustion(&e) => {
                // Out of descriptors (or kernel memory): pause accepting instead of spinning;
                // pending clients wait in the backlog.
                backoff = (backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
                let now = Instant::now();
                if last_warn.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
                    tracing::warn!(
                        error = %e,
                        connections = context.active.load(Ordering::Relaxed),
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
    mut hangup: Option<Hangup>,
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
