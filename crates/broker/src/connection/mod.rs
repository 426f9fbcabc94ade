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

use beckon_mqtt::{Connect, DecodeError, Packet, ProtocolVersion, decode, encode, frame_len};
use beckon_pki::ReloadingServerConfig;
use bytes::BytesMut;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout, timeout_at};

mod admission;
mod established;

use admission::Admitted;

use crate::core::{ConnId, ConnectionInfo};
use crate::core_task::Event;
use crate::outbox::{Outbox, OutboxState};
use crate::tenancy::{Scope, Tenancy, TopicMap};

/// The CONNECT user property (MQTT 5) by which a client tells whether it came through an
/// HTTP proxy: `"true"` or `"false"`. It ends up in presence events as `via_proxy`.
pub const VIA_PROXY_PROPERTY: &str = "beckon-via-proxy";

/// Largest single read from the socket; also the stack buffer of each read.
const READ_CHUNK: usize = 8 * 1024;
/// How long a closing connection may take to flush and say goodbye.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection the broker ended keeps reading (and dropping) what the client still
/// sends, so that the client reads the DISCONNECT before the close.
pub(super) const LINGER: Duration = Duration::from_secs(2);

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

/// What every connection task needs, one for all of them (shared through an `Arc`):
/// limits, TLS, tenants, metrics, the core task's event queue and the shutdown signal.
#[derive(Debug)]
pub(crate) struct ConnectionContext {
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
    /// When the connection limit was last logged (at most once a minute).
    pub(crate) busy_log: beckon_net::LogEvery,
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
    /// The core task's event queue. The core drains it at shutdown until every holder is
    /// gone, i.e. until the last connection task ended.
    pub(crate) events: mpsc::Sender<Event>,
}

impl ConnectionContext {
    /// The outbox of a connection: a console may have a whole window of wake-ups and of acks
    /// towards it at once, its PUBACKs and messages must fit beside the usual slack.
    fn outbox_size(&self, server: bool) -> usize {
        if !server {
            return self.max_outbound_packets;
        }
        let window =
            usize::from(self.server_receive_maximum) + usize::from(self.server_max_inflight);
        self.max_outbound_packets.max(2 * window)
    }

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
pub(crate) struct ActiveGuard(pub(crate) Arc<ConnectionContext>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads what the socket has into `buf`, through a temporary stack buffer so that nothing is
/// held while the socket is idle. Returns the number of bytes read (0 at end of stream).
pub(super) async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> io::Result<usize> {
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
pub(super) fn next_packet(
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

/// Logs why a packet could not be decoded; a packet over `limits.max_packet_size` is also
/// counted, as a limit reached.
pub(super) fn log_decode_error(context: &ConnectionContext, e: &DecodeError, what: &str) {
    if let DecodeError::PacketTooLarge { size, max } = e {
        context.metrics.limit_reached("max_packet_size");
        tracing::warn!(
            size,
            max,
            key = "limits.max_packet_size",
            "{what} announces more than the maximum packet size; refused from its header, closing"
        );
    } else {
        tracing::info!(error = %e, "{what} is malformed; closing");
    }
}

/// Logs why reading from the client failed; a WebSocket frame over the limit of
/// [`websocket_message_limit`] is counted as a packet over `limits.max_packet_size`.
pub(super) fn log_read_error(context: &ConnectionContext, e: &io::Error) {
    use tokio_tungstenite::tungstenite;
    let too_large = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<tungstenite::Error>())
        .is_some_and(|inner| matches!(inner, tungstenite::Error::Capacity(_)));
    if too_large {
        context.metrics.limit_reached("max_packet_size");
        tracing::warn!(
            error = %e,
            key = "limits.max_packet_size",
            "a WebSocket frame announces more than twice the maximum packet size; refused from its header, closing"
        );
    } else {
        tracing::debug!(error = %e, "read failed");
    }
}

/// Writes one packet and flushes, bounded in time (used on the way out).
pub(super) async fn send_final<S: AsyncWrite + Unpin>(
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

/// One accepted connection, as far as its tasks need to know it before CONNECT.
pub(crate) struct Peer {
    conn: ConnId,
    /// The client's address (after the PROXY protocol header, when one is expected).
    remote: SocketAddr,
    kind: ListenerKind,
    /// The path for presence events and logs ("443-mqtt" once the shared port found MQTT).
    path: &'static str,
    /// Answered busy at CONNECT, when over a limit.
    over_limit: Option<Busy>,
    /// TLS and CONNECT must be done by then.
    deadline: Instant,
    /// The DER of a client certificate the configured client CAs verified, until admission.
    client_certificate: Option<Vec<u8>>,
}

impl Peer {
    /// A connection accepted on `kind` just now.
    pub(crate) fn accepted(
        context: &ConnectionContext,
        conn: ConnId,
        remote: SocketAddr,
        kind: ListenerKind,
        over_limit: Option<Busy>,
    ) -> Self {
        Self {
            conn,
            remote,
            kind,
            path: kind.path(),
            over_limit,
            deadline: Instant::now() + context.connect_timeout,
            client_certificate: None,
        }
    }
}

/// Serves one accepted TCP connection to its end.
pub(crate) async fn serve(context: Arc<ConnectionContext>, tcp: TcpStream, mut peer: Peer) {
    let _ = tcp.set_nodelay(true);
    let mut tcp = tcp;
    if context.proxy_protocol.contains(&peer.kind) {
        match timeout_at(peer.deadline, crate::proxy_protocol::read_header(&mut tcp)).await {
            Ok(Ok(Some(client))) => {
                tracing::Span::current().record("remote", tracing::field::display(client));
                peer.remote = client;
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
    let (ListenerKind::Tls | ListenerKind::Fallback, Some(tls)) = (peer.kind, &context.tls) else {
        return run_mqtt(&context, tcp, &mut peer, BytesMut::new()).await;
    };
    // The handshake runs boxed and hands over a boxed stream: an async fn keeps the storage
    // of large values it moved, so keeping them out of this (long-lived) state is what makes
    // an idle connection small.
    let config = context.tls_config(tls, peer.kind);
    let handshake = tls_handshake(&context, config, tcp, peer.deadline);
    let Some((stream, leaf, alpn_mqtt)) = Box::pin(handshake).await else {
        return;
    };
    peer.client_certificate = leaf;
    match peer.kind {
        ListenerKind::Fallback => {
            Box::pin(serve_shared_port(&context, stream, &mut peer, alpn_mqtt)).await;
        }
        ListenerKind::Tls | ListenerKind::Plain => {
            run_mqtt(&context, stream, &mut peer, BytesMut::new()).await;
        }
    }
}

use crate::tls_stream::TlsStream;

/// TLS handshake within the connect deadline. Returns the stream (boxed) and the leaf of a
/// client certificate verified by the configured client CAs.
async fn tls_handshake(
    context: &ConnectionContext,
    config: Arc<ServerConfig>,
    tcp: TcpStream,
    deadline: Instant,
) -> Option<(Box<TlsStream>, Option<Vec<u8>>, bool)> {
    let mut shutdown = context.shutdown.clone();
    let accepted = tokio::select! {
        r = timeout_at(deadline, crate::tls_stream::accept(config, tcp)) => r,
        _ = shutdown.changed() => return None,
    };
    let accepted = match accepted {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            context.metrics.tls_failure();
            tracing::debug!(error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            context.metrics.tls_failure();
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

/// MQTT on a stream: the CONNECT phase (boxed), then the established phase until the end.
async fn run_mqtt<S: AsyncRead + AsyncWrite + Unpin>(
    context: &ConnectionContext,
    mut stream: S,
    peer: &mut Peer,
    mut rbuf: BytesMut,
) {
    // The certificate is not kept past admission.
    let leaf = peer.client_certificate.take();
    let admitted = Box::pin(admission::admit(
        context,
        &mut stream,
        &mut rbuf,
        peer,
        leaf,
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
    let conn = peer.conn;
    if let Some(slot) = &_slot {
        slot.attach(conn);
    }
    let version = connect.protocol;
    tracing::Span::current().record("client_id", connect.client_id.as_str());
    let tenant_label = match &map.scope {
        Scope::Tenant { identity, .. } => identity.tenant.as_str().to_owned(),
        Scope::Anonymous => "anonymous".to_owned(),
        Scope::Plain => "-".to_owned(),
    };
    let _gauge = context.metrics.connection(peer.path, &tenant_label);
    drop(tenant_label);
    let client_keep_alive = connect.keep_alive;
    tracing::debug!(?version, keep_alive = client_keep_alive, "CONNECT accepted");

    let info = connection_info(peer, &connect, &map);
    let outbox = Arc::new(Outbox::new(context.outbox_size(info.server)));
    // Boxed send: an event is large and must not stay in this long-lived future's state.
    let connected = Event::Connect {
        conn,
        connect,
        info,
        outbox: outbox.clone(),
    };
    if send_boxed(&context.events, connected).await.is_err() {
        return; // the server is stopping
    }

    let link = established::Link {
        context,
        outbox: &outbox,
        conn,
        version,
        client_keep_alive,
    };
    let reason = link.run(&mut stream, &mut map, &mut rbuf).await;
    if let Some(reason) = reason {
        tracing::debug!(?reason, "connection closed");
        // Tell the core unless it closed the connection itself (it already forgot it then).
        if outbox.state() == OutboxState::Open {
            let _ = send_boxed(&context.events, Event::Closed { conn, reason }).await;
        }
    } else {
        tracing::debug!("connection closed by the broker");
    }
}

/// What the core is told about an admitted connection: address, path, tenant identity and
/// whether it came through a proxy.
fn connection_info(peer: &Peer, connect: &Connect, map: &TopicMap) -> ConnectionInfo {
    let server = matches!(&map.scope, Scope::Tenant { identity, .. } if identity.role == beckon_identity::Role::Server);
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
    ConnectionInfo {
        remote_addr: peer.remote,
        path: peer.path,
        server,
        // A doctor probe is not the identity coming online: no presence for it.
        identity: map
            .identity()
            .filter(|_| !map.is_probe())
            .map(|i| Box::new(i.clone())),
        via_proxy,
    }
}

/// The shared HTTPS port after TLS: ALPN `mqtt` or a first byte 0x10 is raw MQTT; anything
/// else is HTTP (health, info, or MQTT over WebSocket at `/mqtt`).
async fn serve_shared_port(
    context: &ConnectionContext,
    mut stream: Box<TlsStream>,
    peer: &mut Peer,
    alpn_mqtt: bool,
) {
    let mut buf = BytesMut::new();
    if !alpn_mqtt {
        match timeout_at(peer.deadline, read_some(&mut stream, &mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
    if alpn_mqtt || buf.first() == Some(&0x10) {
        tracing::Span::current().record("path", "443-mqtt");
        peer.path = "443-mqtt";
        run_mqtt(context, stream, peer, buf).await;
        return;
    }
    let ready = !*context.shutdown.borrow();
    match Box::pin(crate::shared_port::serve_http(
        stream,
        buf,
        peer.deadline,
        ready,
        websocket_message_limit(context.max_packet_size),
    ))
    .await
    {
        crate::shared_port::HttpOutcome::WebSocket(ws) => {
            tracing::Span::current().record("path", "443-websocket");
            peer.path = "443-websocket";
            run_mqtt(context, ws, peer, BytesMut::new()).await;
        }
        crate::shared_port::HttpOutcome::Done => {}
    }
}

/// The largest WebSocket frame or message accepted: twice the maximum packet size, so that
/// a client may put a few packets in one message, and no more is buffered before the MQTT
/// layer sees a packet's header.
fn websocket_message_limit(max_packet_size: u32) -> usize {
    usize::try_from(max_packet_size).map_or(usize::MAX, |m| m.saturating_mul(2))
}

/// Sends an event through a boxed future, so that the event's storage is not part of the
/// caller's state.
fn send_boxed(
    events: &mpsc::Sender<Event>,
    event: Event,
) -> Pin<Box<dyn Future<Output = Result<(), mpsc::error::SendError<Event>>> + Send + '_>> {
    Box::pin(events.send(event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize};

    /// The connection task's future is most of an idle connection's memory: 1,352 bytes
    /// before the connection context replaced the long parameter lists.
    #[tokio::test]
    async fn the_connection_task_stays_small() {
        let (_stop, shutdown) = watch::channel(false);
        let (events, _core) = mpsc::channel(1);
        let context = Arc::new(ConnectionContext {
            tls: None,
            allow_anonymous: true,
            tenancy: None,
            fallback_tls: std::sync::Mutex::new(None),
            connect_timeout: Duration::from_secs(5),
            max_packet_size: 1 << 20,
            max_outbound_packets: 100,
            server_receive_maximum: 10,
            server_max_inflight: 10,
            max_connections: 10,
            busy_log: beckon_net::LogEvery::minute(),
            proxy_protocol: Vec::new(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            connect_limiter: crate::ratelimit::ConnectLimiter::new(None, None),
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            shutdown,
            events,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (tcp, remote) = listener.accept().await.expect("accept");
        let peer = Peer::accepted(&context, 1, remote, ListenerKind::Tls, None);
        let task = serve(context, tcp, peer);
        let size = size_of_val(&task);
        println!("connection task: {size} bytes");
        assert!(
            size <= 1352,
            "the connection task's future grew to {size} bytes"
        );
    }
}
