//! One client connection: TLS, the CONNECT phase (timeout, admission, authentication), then
//! reading frames into events for the core and writing what the core queues.
//!
//! Memory per idle connection is kept small on purpose: no read or write buffer is held
//! while idle (reads go through a temporary stack buffer and only a partial frame is kept),
//! the outbound queue is empty without allocation, and the task keeps only a few words of
//! state besides the stream itself.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use beckon_mqtt::{
    ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, ProtocolVersion, ReasonCode,
    decode, encode, frame_len,
};
use beckon_pki::ReloadingServerConfig;
use bytes::BytesMut;
use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};

use crate::core::{CloseReason, ConnId, ConnectionInfo, effective_keep_alive};
use crate::core_task::Event;
use crate::outbox::{Outbox, OutboxState};
use crate::tenancy::{Inbound, Scope, Tenancy, TenantSlot, TopicMap};

/// The CONNECT user property (MQTT 5) by which a client tells whether it came through an
/// HTTP proxy: `"true"` or `"false"`. It ends up in presence events as `via_proxy`.
pub const VIA_PROXY_PROPERTY: &str = "beckon-via-proxy";

/// Largest single read from the socket; also the stack buffer of each read.
const READ_CHUNK: usize = 8 * 1024;
/// How long a closing connection may take to flush and say goodbye.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which listener a connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListenerKind {
    /// MQTT over TLS.
    Tls,
    /// Plain MQTT.
    Plain,
    /// The shared HTTPS port: TLS, then raw MQTT, MQTT over WebSocket or HTTP.
    Fallback,
}

impl ListenerKind {
    /// The path name used in presence events and logs.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::Tls => "8883",
            Self::Plain => "1883",
            Self::Fallback => "443",
        }
    }
}

/// Why a connection is answered "busy" at CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Busy {
    /// Over `limits.max_connections` (0x89 Server busy).
    Connections,
    /// Over a connect rate (0x9F Connection rate exceeded).
    Rate(crate::ratelimit::RateExceeded),
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) tls: Option<Arc<ReloadingServerConfig>>,
    pub(crate) allow_anonymous: bool,
    /// Tenants, when `tenants_dir` is configured.
    pub(crate) tenancy: Option<Arc<Tenancy>>,
    /// The shared port's TLS configuration (ALPN `mqtt` and `http/1.1`), derived from the
    /// current one: (base, derived).
    pub(crate) fallback_tls: std::sync::Mutex<Option<(Arc<ServerConfig>, Arc<ServerConfig>)>>,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_packet_size: u32,
    pub(crate) max_outbound_packets: usize,
    /// `limits.server_receive_maximum` (sizes a console's outbox).
    pub(crate) server_receive_maximum: u16,
    /// `limits.server_max_inflight` (sizes a console's outbox).
    pub(crate) server_max_inflight: u16,
    pub(crate) max_connections: usize,
    /// Listeners whose connections start with a PROXY protocol header.
    pub(crate) proxy_protocol: Vec<ListenerKind>,
    /// Prometheus metrics.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// Connect-rate limits.
    pub(crate) connect_limiter: crate::ratelimit::ConnectLimiter,
    /// Connection tasks alive (in TLS, CONNECT or established).
    pub(crate) active: AtomicUsize,
    pub(crate) next_id: AtomicU64,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl Shared {
    /// The TLS configuration for a new connection on `kind`.
    fn tls_config(&self, tls: &ReloadingServerConfig, kind: ListenerKind) -> Arc<ServerConfig> {
        let base = match &self.tenancy {
            Some(t) => t.server_config(tls.current()),
            None => tls.current(),
        };
        if kind != ListenerKind::Fallback {
            return base;
        }
        let Ok(mut cache) = self.fallback_tls.lock() else {
            return base;
        };
        if let Some((b, derived)) = cache.as_ref()
            && Arc::ptr_eq(b, &base)
        {
            return derived.clone();
        }
        let mut config = (*base).clone();
        config.alpn_protocols = vec![b"mqtt".to_vec(), b"http/1.1".to_vec()];
        let derived = Arc::new(config);
        *cache = Some((base, derived.clone()));
        derived
    }
}

/// Decrements the live-connection count when a connection task ends.
pub(crate) struct ActiveGuard(pub(crate) Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads what the socket has into `buf`, through a temporary stack buffer so that nothing is
/// held while the socket is idle. Returns the number of bytes read (0 at end of stream).
async fn read_some<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    poll_fn(|cx| {
        // Left uninitialised: zeroing 8 KiB on every poll (most polls find nothing to read)
        // was the largest single item of the connection tasks' own instructions.
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut rb = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let filled = rb.filled();
                buf.extend_from_slice(filled);
                Poll::Ready(Ok(filled.len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// The next whole packet in `buf`, if any. Refuses an oversized packet from its fixed header
/// alone, and reserves room for a partial frame once its length is known.
fn next_packet(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    match frame_len(buf, max_packet_size)? {
        Some(len) if buf.len() >= len => decode(buf, version, max_packet_size),
        Some(len) => {
            buf.reserve(len - buf.len());
            Ok(None)
        }
        None => Ok(None),
    }
}

/// The protocol version a (possibly malformed) CONNECT names, read from its raw bytes, so
/// that a refusal can be written in the client's version.
fn sniff_connect_version(buf: &[u8]) -> Option<ProtocolVersion> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    if buf.get(i..i + 6)? != [0, 4, b'M', b'Q', b'T', b'T'] {
        return None;
    }
    match buf.get(i + 6)? {
        5 => Some(ProtocolVersion::V5),
        4 => Some(ProtocolVersion::V311),
        _ => None,
    }
}

/// Writes one packet and flushes, bounded in time (used on the way out).
async fn send_final<S: AsyncWrite + Unpin>(
    stream: &mut S,
    packet: Packet,
    version: ProtocolVersion,
) {
    let mut buf = BytesMut::new();
    if encode(&packet, version, &mut buf).is_ok() {
        let _ = timeout(CLOSE_TIMEOUT, async {
            stream.write_all(&buf).await?;
            stream.flush().await?;
            stream.shutdown().await
        })
        .await;
    }
}

fn connack(code: ReasonCode, reason: &str, version: ProtocolVersion) -> Packet {
    let mut properties = Properties::default();
    if version == ProtocolVersion::V5 {
        properties.reason_string = Some(reason.to_owned());
    }
    Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties,
    })
}

fn disconnect(code: ReasonCode) -> Packet {
    Packet::Disconnect(Disconnect {
        code,
        properties: Properties::default(),
    })
}

/// Serves one accepted TCP connection to its end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
    tcp: TcpStream,
    remote: SocketAddr,
    kind: ListenerKind,
    conn: ConnId,
    over_limit: Option<Busy>,
) {
    let _ = tcp.set_nodelay(true);
    let deadline = Instant::now() + shared.connect_timeout;
    let mut tcp = tcp;
    let mut remote = remote;
    if shared.proxy_protocol.contains(&kind) {
        match timeout_at(deadline, crate::proxy_protocol::read_header(&mut tcp)).await {
            Ok(Ok(Some(client))) => {
                tracing::Span::current().record("remote", tracing::field::display(client));
                remote = client;
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::info!(error = %e, "closed");
                return;
            }
            Err(_) => {
                tracing::info!("no PROXY protocol header within the connect timeout; closed");
                return;
            }
        }
    }
    match (kind, &shared.tls) {
        (ListenerKind::Fallback, Some(tls)) => {
            let config = shared.tls_config(tls, kind);
            let shutdown = shared.shutdown.clone();
            let Some((stream, leaf, alpn_mqtt)) = Box::pin(tls_handshake(
                &shared.metrics,
                config,
                tcp,
                deadline,
                shutdown,
            ))
            .await
            else {
                return;
            };
            Box::pin(serve_shared_port(
                &shared, events, stream, remote, conn, over_limit, leaf, alpn_mqtt, deadline,
            ))
            .await;
        }
        (ListenerKind::Tls, Some(tls)) => {
            // The handshake runs boxed and hands over a boxed stream: an async fn keeps the
            // storage of large values it moved, so keeping them out of this (long-lived)
            // state is what makes an idle connection small.
            let config = shared.tls_config(tls, kind);
            let shutdown = shared.shutdown.clone();
            let Some((stream, leaf, _)) = Box::pin(tls_handshake(
                &shared.metrics,
                config,
                tcp,
                deadline,
                shutdown,
            ))
            .await
            else {
                return;
            };
            run_mqtt(
                &shared,
                events,
                stream,
                remote,
                kind,
                conn,
                over_limit,
                leaf,
                deadline,
                kind.path(),
                BytesMut::new(),
            )
            .await;
        }
        _ => {
            run_mqtt(
                &shared,
                events,
                tcp,
                remote,
                kind,
                conn,
                over_limit,
                None,
                deadline,
                kind.path(),
                BytesMut::new(),
            )
            .await;
        }
    }
}

use crate::tls_stream::TlsStream;

/// TLS handshake within the connect deadline. Returns the stream (boxed) and the leaf of a
/// client certificate verified by the configured client CAs.
async fn tls_handshake(
    metrics: &crate::metrics::Metrics,
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    deadline: Instant,
    mut shutdown: watch::Receiver<bool>,
) -> Option<(Box<TlsStream>, Option<Vec<u8>>, bool)> {
    let accepted = tokio::select! {
        r = timeout_at(deadline, crate::tls_stream::accept(config, tcp)) => r,
        _ = shutdown.changed() => return None,
    };
    let accepted = match accepted {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            metrics.tls_failure();
            tracing::debug!(error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            metrics.tls_failure();
            tracing::debug!("TLS handshake not finished within the connect timeout; closed");
            return None;
        }
    };
    let stream = Box::new(accepted.stream);
    let alpn = accepted
        .alpn
        .map(|p| String::from_utf8_lossy(&p).into_owned());
    let leaf = accepted.client_certificate;
    tracing::debug!(
        alpn = alpn.as_deref().unwrap_or("none"),
        client_cert = leaf.is_some(),
        "TLS established"
    );
    let alpn_mqtt = alpn.as_deref() == Some("mqtt");
    Some((stream, leaf, alpn_mqtt))
}

/// How the CONNECT phase ended. Short-lived, so its size does not matter.
#[allow(clippy::large_enum_variant)]
enum ConnectPhase {
    Packet(Packet),
    Invalid(DecodeError, Option<ProtocolVersion>),
    Eof,
    Io(io::Error),
}

async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_packet_size: u32,
) -> ConnectPhase {
    loop {
        let sniffed = sniff_connect_version(buf);
        match next_packet(buf, ProtocolVersion::V311, max_packet_size) {
            Ok(Some(p)) => return ConnectPhase::Packet(p),
            Ok(None) => {}
            Err(e) => return ConnectPhase::Invalid(e, sniffed),
        }
        match read_some(stream, buf).await {
            Ok(0) => return ConnectPhase::Eof,
            Ok(_) => {}
            Err(e) => return ConnectPhase::Io(e),
        }
    }
}

/// The CONNECT phase: reads the CONNECT within the deadline, answers malformed ones, checks
/// the connection limit and authentication. Returns the admitted CONNECT. Boxed by the
/// caller, so its state is freed once the connection is established.
#[allow(clippy::too_many_arguments)]
async fn admit<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
    rbuf: &mut BytesMut,
    kind: ListenerKind,
    over_limit: Option<Busy>,
    leaf: Option<Vec<u8>>,
    deadline: Instant,
    mut shutdown: watch::Receiver<bool>,
) -> Option<Admitted> {
    let max = shared.max_packet_size;
    let phase = tokio::select! {
        r = Box::pin(timeout_at(deadline, read_connect(stream, rbuf, max))) => r,
        _ = shutdown.changed() => return None,
    };
    let mut connect: Box<Connect> = match phase {
        Err(_) => {
            tracing::info!(
                timeout_secs = shared.connect_timeout.as_secs(),
                "no complete CONNECT within the connect timeout; closed"
            );
            return None;
        }
        Ok(ConnectPhase::Packet(Packet::Connect(c))) => c,
        Ok(ConnectPhase::Packet(other)) => {
            tracing::info!(
                packet_type = other.packet_type(),
                "first packet is not CONNECT; closed"
            );
            return None;
        }
        Ok(ConnectPhase::Invalid(e, sniffed)) => {
            tracing::info!(error = %e, "invalid CONNECT; closed");
            match (&e, sniffed) {
                (DecodeError::UnsupportedProtocolVersion { .. }, _) => {
                    // Answered in v3.1.1 form (return code 1), which every version reads.
                    let p = connack(e.reason_code(), "", ProtocolVersion::V311);
                    shared.metrics.connack_packet(&p);
                    Box::pin(send_final(stream, p, ProtocolVersion::V311)).await;
                }
                (_, Some(ProtocolVersion::V5)) => {
                    let p = connack(e.reason_code(), &e.to_string(), ProtocolVersion::V5);
                    shared.metrics.connack_packet(&p);
                    Box::pin(send_final(stream, p, ProtocolVersion::V5)).await;
                }
                _ => {}
            }
            return None;
        }
        Ok(ConnectPhase::Eof) => {
            tracing::debug!("closed by the client before CONNECT");
            return None;
        }
        Ok(ConnectPhase::Io(e)) => {
            tracing::debug!(error = %e, "read failed before CONNECT");
            return None;
        }
    };
    let version = connect.protocol;

    // Admission: connection limit, then authentication.
    if let Some(busy) = over_limit {
        let (code, why) = match busy {
            Busy::Connections => {
                tracing::warn!(
                    max_connections = shared.max_connections,
                    "connection limit reached; refused with Server busy"
                );
                (
                    ReasonCode::SERVER_BUSY,
                    "connection limit reached, retry later",
                )
            }
            Busy::Rate(which) => {
                tracing::info!(
                    limit = ?which,
                    "connect rate exceeded; refused with 0x9F (v3.1.1: return code 3)"
                );
                (
                    ReasonCode::CONNECTION_RATE_EXCEEDED,
                    "connection rate exceeded, retry later",
                )
            }
        };
        let p = connack(code, why, version);
        shared.metrics.connack_packet(&p);
        Box::pin(send_final(stream, p, version)).await;
        return None;
    }
    let (map, slot) = match &shared.tenancy {
        None => {
            if !shared.allow_anonymous {
                let cert_name = leaf
                    .as_deref()
                    .and_then(|der| {
                        beckon_pki::certificate_identity(&CertificateDer::from(der)).ok()
                    })
                    .and_then(|id| id.common_name);
                let refusal = match &cert_name {
                    None => Some(match kind {
                        ListenerKind::Tls | ListenerKind::Fallback => "no client certificate issued by the broker's CA (and anonymous access is off)".to_owned(),
                        ListenerKind::Plain => "plain MQTT listener cannot carry a client certificate (and anonymous access is off)".to_owned(),
                    }),
                    Some(cn) if !connect.client_id.is_empty() && connect.client_id != *cn => Some(format!(
                        "client id {:?} differs from the certificate's identity {cn:?}",
                        connect.client_id
                    )),
                    Some(_) => None,
                };
                if let Some(why) = refusal {
                    tracing::info!(client_id = %connect.client_id, reason = %why, "refused: not authorized");
                    let p = connack(ReasonCode::NOT_AUTHORIZED, &why, version);
                    shared.metrics.connack_packet(&p);
                    Box::pin(send_final(stream, p, version)).await;
                    return None;
                }
                if let Some(cn) = &cert_name {
                    // The certificate is the identity; an empty client id takes it.
                    connect.client_id.clone_from(cn);
                }
            }
            (TopicMap::new(Scope::Plain), None)
        }
        Some(tenancy) => {
            let has_password = connect.password.as_ref().is_some_and(|p| !p.is_empty());
            if leaf.is_none() && !has_password && shared.allow_anonymous {
                if connect.client_id.contains('/') {
                    let why = "client ids containing '/' are reserved for tenant identities";
                    tracing::info!(client_id = %connect.client_id, code = "0x85", reason = why, "refused: client identifier not valid");
                    let p = connack(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, why, version);
                    shared.metrics.connack_packet(&p);
                    Box::pin(send_final(stream, p, version)).await;
                    return None;
                }
                (TopicMap::new(Scope::Anonymous), None)
            } else {
                match tenancy.admit(&mut connect, leaf.as_deref()) {
                    Ok((identity, assigned, slot)) => {
                        tracing::info!(identity = %identity, "authenticated");
                        (
                            TopicMap::new(Scope::Tenant {
                                identity: Box::new(identity),
                                assigned,
                            }),
                            Some(slot),
                        )
                    }
                    Err(refused) => {
                        tracing::info!(
                            client_id = %connect.client_id,
                            code = %format_args!("0x{:02X}", refused.code.0),
                            v3_return_code = refused.code.to_v311_connack(),
                            reason = %refused.why,
                            "refused CONNECT"
                        );
                        let p = connack(refused.code, &refused.why, version);
                        shared.metrics.connack_packet(&p);
                        Box::pin(send_final(stream, p, version)).await;
                        return None;
                    }
                }
            }
        }
    };
    if let Err(denied) = map.map_will(&mut connect) {
        let why = format!("will topic: {denied}");
        tracing::info!(code = "0x87", reason = %why, "refused CONNECT");
        let p = connack(ReasonCode::NOT_AUTHORIZED, &why, version);
        shared.metrics.connack_packet(&p);
        Box::pin(send_final(stream, p, version)).await;
        return None;
    }
    Some(Admitted {
        connect,
        map,
        _slot: slot,
    })
}

/// An admitted CONNECT with its topic mapping and quota slot.
struct Admitted {
    connect: Box<Connect>,
    map: TopicMap,
    _slot: Option<TenantSlot>,
}

#[allow(clippy::too_many_arguments)]
async fn run_mqtt<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    events: mpsc::Sender<Event>,
    mut stream: S,
    remote: SocketAddr,
    kind: ListenerKind,
    conn: ConnId,
    over_limit: Option<Busy>,
    leaf: Option<Vec<u8>>,
    deadline: Instant,
    path: &'static str,
    mut rbuf: BytesMut,
) {
    let max = shared.max_packet_size;
    let shutdown = shared.shutdown.clone();
    let admitted = Box::pin(admit(
        shared,
        &mut stream,
        &mut rbuf,
        kind,
        over_limit,
        leaf,
        deadline,
        shutdown,
    ))
    .await;
    let Some(Admitted {
        connect,
        mut map,
        _slot,
    }) = admitted
    else {
        return;
    };
    if let Some(slot) = &_slot {
        slot.attach(conn);
    }
    let version = connect.protocol;
    tracing::Span::current().record("client_id", connect.client_id.as_str());
    let identity = map.identity().map(|i| Box::new(i.clone()));
    // Agents say whether they came through an HTTP proxy (MQTT 5 user property); the broker
    // cannot see it.
    let via_proxy = connect
        .properties
        .user_properties
        .iter()
        .find(|(k, _)| k == VIA_PROXY_PROPERTY)
        .and_then(|(_, v)| match v.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        });
    let tenant_label = match &map.scope {
        Scope::Tenant { identity, .. } => identity.tenant.as_str().to_owned(),
        Scope::Anonymous => "anonymous".to_owned(),
        Scope::Plain => "-".to_owned(),
    };
    let _gauge = shared.metrics.connection(path, &tenant_label);
    drop(tenant_label);
    let client_keep_alive = connect.keep_alive;
    tracing::debug!(?version, keep_alive = client_keep_alive, "CONNECT accepted");

    let server = matches!(&map.scope, Scope::Tenant { identity, .. } if identity.role == beckon_identity::Role::Server);
    // A console may have a whole window of wake-ups and of acks towards it at once: its PUBACKs
    // and messages must fit in the outbox beside the usual slack.
    let outbox_size = if server {
        shared.max_outbound_packets.max(
            2 * (usize::from(shared.server_receive_maximum)
                + usize::from(shared.server_max_inflight)),
        )
    } else {
        shared.max_outbound_packets
    };
    let outbox = Arc::new(Outbox::new(outbox_size));
    let info = ConnectionInfo {
        remote_addr: remote,
        path,
        server,
        identity,
        via_proxy,
    };
    // Boxed send: an event is large and must not stay in this long-lived future's state.
    if send_boxed(
        &events,
        Event::Connect {
            conn,
            connect,
            info,
            outbox: outbox.clone(),
        },
    )
    .await
    .is_err()
    {
        return; // the server is stopping
    }

    let reason = established(
        &shared.metrics,
        &mut stream,
        &events,
        &outbox,
        &mut map,
        &mut rbuf,
        conn,
        version,
        client_keep_alive,
        max,
    )
    .await;
    if let Some(reason) = reason {
        tracing::debug!(?reason, "connection closed");
        // Tell the core unless it closed the connection itself (it already forgot it then).
        if outbox.state() == OutboxState::Open {
            let _ = send_boxed(&events, Event::Closed { conn, reason }).await;
        }
    } else {
        tracing::debug!("connection closed by the broker");
    }
}

/// The shared HTTPS port after TLS: ALPN `mqtt` or a first byte 0x10 is raw MQTT; anything
/// else is HTTP (health, info, or MQTT over WebSocket at `/mqtt`).
#[allow(clippy::too_many_arguments)]
async fn serve_shared_port(
    shared: &Arc<Shared>,
    events: mpsc::Sender<Event>,
    mut stream: Box<TlsStream>,
    remote: SocketAddr,
    conn: ConnId,
    over_limit: Option<Busy>,
    leaf: Option<Vec<u8>>,
    alpn_mqtt: bool,
    deadline: Instant,
) {
    let kind = ListenerKind::Fallback;
    let mut buf = BytesMut::new();
    if !alpn_mqtt {
        match timeout_at(deadline, read_some(&mut stream, &mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
    if alpn_mqtt || buf.first() == Some(&0x10) {
        tracing::Span::current().record("path", "443-mqtt");
        run_mqtt(
            shared, events, stream, remote, kind, conn, over_limit, leaf, deadline, "443-mqtt", buf,
        )
        .await;
        return;
    }
    let ready = !*shared.shutdown.borrow();
    match Box::pin(crate::shared_port::serve_http(stream, buf, deadline, ready)).await {
        crate::shared_port::HttpOutcome::WebSocket(ws) => {
            tracing::Span::current().record("path", "443-websocket");
            run_mqtt(
                shared,
                events,
                ws,
                remote,
                kind,
                conn,
                over_limit,
                leaf,
                deadline,
                "443-websocket",
                BytesMut::new(),
            )
            .await;
        }
        crate::shared_port::HttpOutcome::Done => {}
    }
}

/// Sends an event through a boxed future, so that the event's storage is not part of the
/// caller's state.
fn send_boxed(
    events: &mpsc::Sender<Event>,
    event: Event,
) -> Pin<Box<dyn Future<Output = Result<(), mpsc::error::SendError<Event>>> + Send + '_>> {
    Box::pin(events.send(event))
}

/// The established phase. Returns why the connection ended, or `None` when the broker
/// closed it (after `Action::Close`, a slow-consumer abort, or shutdown).
#[allow(clippy::too_many_arguments)]
async fn established<S: AsyncRead + AsyncWrite + Unpin>(
    metrics: &crate::metrics::Metrics,
    stream: &mut S,
    events: &mpsc::Sender<Event>,
    outbox: &Outbox,
    map: &mut TopicMap,
    rbuf: &mut BytesMut,
    conn: ConnId,
    version: ProtocolVersion,
    client_keep_alive: u16,
    max: u32,
) -> Option<CloseReason> {
    // Until the CONNACK sets it, no keep-alive deadline applies.
    let mut keep_alive: Option<Duration> = None;
    let far = Duration::from_secs(100 * 365 * 24 * 3600);
    let ka_sleep = sleep_until(Instant::now() + far);
    tokio::pin!(ka_sleep);
    loop {
        // Whole packets already buffered (e.g. sent right behind CONNECT) first.
        loop {
            // Take a slot in the core's queue before decoding, so that no decoded packet is
            // held across an await (it would enlarge every connection's state).
            let whole = matches!(frame_len(rbuf, max), Ok(Some(n)) if rbuf.len() >= n);
            let permit = if whole {
                // While the core's queue is full, keep writing what the core sends: a client
                // that pipelines many QoS 1 messages would otherwise see its acknowledgements
                // pile up unwritten until the outbound limit took it for a slow consumer.
                loop {
                    tokio::select! {
                        biased;
                        p = events.reserve() => match p {
                            Ok(p) => break Some(p),
                            Err(_) => return None,
                        },
                        () = outbox.changed() => {
                            match Box::pin(flush(metrics, stream, outbox, map, version, client_keep_alive, &mut keep_alive)).await {
                                Flushed::Open => {}
                                Flushed::ClosedByBroker => return None,
                                Flushed::WriteFailed => return Some(CloseReason::Transport),
                            }
                        }
                    }
                }
            } else {
                None
            };
            match next_packet(rbuf, version, max) {
                Ok(Some(packet)) => {
                    if let Some(ka) = keep_alive {
                        ka_sleep.as_mut().reset(Instant::now() + ka * 3 / 2);
                    }
                    match map.inbound(packet) {
                        Inbound::Forward(packet) => {
                            if let Some(permit) = permit {
                                permit.send(Event::Packet { conn, packet });
                            }
                        }
                        Inbound::Reply(packet) => {
                            metrics.denied(match packet {
                                Packet::SubAck(_) | Packet::UnsubAck(_) => "subscribe",
                                _ => "publish",
                            });
                            // Refusals are few and small; a full queue means the client
                            // does not read, which the core's next push notices.
                            let _ = outbox.push(packet);
                        }
                        Inbound::Drop => metrics.denied("publish"),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(error = %e, "malformed packet; closing");
                    if version == ProtocolVersion::V5 {
                        Box::pin(send_final(stream, disconnect(e.reason_code()), version)).await;
                    }
                    return Some(CloseReason::ProtocolViolation);
                }
            }
        }
        if rbuf.is_empty() {
            // Release the read buffer while idle. Once a packet was split off, an empty
            // buffer may show no capacity and still keep the whole read alive.
            *rbuf = BytesMut::new();
        }
        tokio::select! {
            biased;
            () = outbox.changed() => {
                match Box::pin(flush(metrics, stream, outbox, map, version, client_keep_alive, &mut keep_alive)).await {
                    Flushed::Open => {
                        // The first CONNACK starts the keep-alive clock.
                        if let Some(ka) = keep_alive
                            && ka_sleep.deadline() > Instant::now() + ka * 3 / 2
                        {
                            ka_sleep.as_mut().reset(Instant::now() + ka * 3 / 2);
                        }
                    }
                    Flushed::ClosedByBroker => return None,
                    Flushed::WriteFailed => return Some(CloseReason::Transport),
                }
            }
            r = read_some(stream, rbuf) => match r {
                Ok(0) => return Some(CloseReason::Transport),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "read failed");
                    return Some(CloseReason::Transport);
                }
            },
            () = &mut ka_sleep, if keep_alive.is_some() => {
                tracing::info!(
                    keep_alive_secs = keep_alive.map(|k| k.as_secs()),
                    "no packet within 1.5 times the keep alive; closing"
                );
                if version == ProtocolVersion::V5 {
                    Box::pin(send_final(stream, disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT), version)).await;
                }
                return Some(CloseReason::KeepAliveTimeout);
            }
        }
    }
}

enum Flushed {
    Open,
    ClosedByBroker,
    WriteFailed,
}

/// Writes everything queued; handles the close and abort states.
async fn flush<S: AsyncWrite + Unpin>(
    metrics: &crate::metrics::Metrics,
    stream: &mut S,
    outbox: &Outbox,
    map: &mut TopicMap,
    version: ProtocolVersion,
    client_keep_alive: u16,
    keep_alive: &mut Option<Duration>,
) -> Flushed {
    loop {
        let (mut packets, state, dropped) = outbox.take();
        packets.retain_mut(|p| map.outbound(p));
        if dropped > 0 {
            tracing::debug!(
                dropped,
                "QoS 0 messages dropped: the client reads too slowly"
            );
        }
        if state == OutboxState::Aborted {
            tracing::warn!("closing: the client does not read (outbound queue full)");
            return Flushed::ClosedByBroker;
        }
        if packets.is_empty() {
            if state == OutboxState::Closing {
                let _ = timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
                return Flushed::ClosedByBroker;
            }
            return Flushed::Open;
        }
        let mut wbuf = BytesMut::new();
        for packet in &packets {
            match packet {
                Packet::ConnAck(ack) => metrics.connack(ack.code),
                Packet::Publish(p)
                    if p.topic.starts_with("agents/") && p.topic.ends_with("/wake") =>
                {
                    metrics.wakeup_delivered();
                }
                _ => {}
            }
            if let Packet::ConnAck(ack) = packet
                && !ack.code.is_error()
            {
                // Only the keep alive matters to effective_keep_alive; the rest is filler.
                let probe = Connect::new(version, "", client_keep_alive);
                *keep_alive = effective_keep_alive(&probe, ack);
            }
            if let Err(e) = encode(packet, version, &mut wbuf) {
                tracing::warn!(error = %e, packet_type = packet.packet_type(), "packet cannot be encoded; skipped");
            }
        }
        drop(packets);
        let write = async {
            stream.write_all(&wbuf).await?;
            stream.flush().await
        };
        tokio::pin!(write);
        // A client that stops reading blocks this write; an abort from the core ends it.
        let result = loop {
            tokio::select! {
                r = &mut write => break r,
                () = outbox.changed() => {
                    if outbox.state() == OutboxState::Aborted {
                        tracing::warn!("closing: the client does not read (outbound queue full)");
                        return Flushed::ClosedByBroker;
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "write failed");
            return if state == OutboxState::Open {
                Flushed::WriteFailed
            } else {
                Flushed::ClosedByBroker
            };
        }
        if state == OutboxState::Closing {
            // Anything queued after the close is not sent.
            let _ = timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
            return Flushed::ClosedByBroker;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_the_version_of_a_connect() {
        let v5 = [0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60];
        assert_eq!(sniff_connect_version(&v5), Some(ProtocolVersion::V5));
        let v4 = [0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
        assert_eq!(sniff_connect_version(&v4), Some(ProtocolVersion::V311));
        assert_eq!(sniff_connect_version(&[0x30, 0x00]), None);
        assert_eq!(
            sniff_connect_version(&[0x10, 0xff, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(sniff_connect_version(&[0x10]), None);
    }
}
