//! The console's HTTP server: hyper's HTTP/1.1 connections around the axum router, with
//! the limits a port facing the internet needs.
//!
//! - a request head must arrive within [`HttpLimits::header_timeout`] (slowloris);
//! - a kept-alive connection with no request for [`HttpLimits::idle_timeout`] is closed;
//! - at most [`HttpLimits::max_connections`] connections (TLS handshakes included) are
//!   served at once; beyond, new ones wait in the listen backlog, and a warning is logged
//!   (at most once a minute).
//!
//! TLS handshakes run in the connection's own task, with a timeout: a slow or silent client
//! never holds up the accept loop. Each request carries its peer address as
//! [`ConnectInfo`], which the login and enrollment throttles key on.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use beckon_pki::ReloadingServerConfig;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// How long a client may take for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest request head (request line and headers); a larger one is answered 431.
const MAX_HEAD: usize = 32 * 1024;

/// How long a stopping console waits for requests in progress.
const DRAIN: Duration = Duration::from_secs(4);

/// The HTTP server's limits (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Time for a request's line and headers, from the connection's start or the end of the
    /// previous answer (10 s).
    pub header_timeout: Duration,
    /// A kept-alive connection with no request for this long is closed (5 s; the header
    /// timeout bounds it too, as it runs from the end of the previous answer).
    pub idle_timeout: Duration,
    /// Connections served at once (4096); each holds a file descriptor.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5),
            max_connections: 4096,
        }
    }
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown` turns true, then
/// lets requests in progress finish for a few seconds.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ReloadingServerConfig>>,
    router: axum::Router,
    limits: HttpLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = beckon_net::ConnectionSlots::new(limits.max_connections, "console");
    loop {
        let permit = tokio::select! {
            p = slots.acquire() => p,
            _ = crate::dispatch::stopped(&mut shutdown) => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::dispatch::stopped(&mut shutdown) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: slow down, never spin.
                tracing::warn!(error = %e, "console accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (router, tls, stop) = (router.clone(), tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Some(tls) = tls else {
                return connection(tcp, peer, router, limits, stop).await;
            };
            // The configuration in force now: a renewed certificate applies to new
            // connections.
            let acceptor = TlsAcceptor::from(tls.current());
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => connection(stream, peer, router, limits, stop).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
    drop(listener);
    // Every connection holds a slot: all slots back means all connections ended.
    slots.drained(DRAIN + Duration::from_secs(1)).await;
}

/// When a connection last finished a request, and how many it is answering now.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Option<Instant>>,
}

/// Marks a request in progress until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut last) = self.0.last.lock() {
            *last = Some(Instant::now());
        }
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Activity {
    /// When an idle kept-alive connection is due to close: `None` before its first
    /// request (the header timeout applies) and while a request is in progress.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = *self.last.lock().ok()?;
        last.map(|t| t + idle)
    }
}

/// Serves one connection until the client closes it, a limit ends it, or the console stops.
async fn connection<I>(
    io: I,
    peer: SocketAddr,
    router: axum::Router,
    limits: HttpLimits,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let seen = activity.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let in_flight = InFlight::new(&seen);
        req.extensions_mut().insert(ConnectInfo(peer));
        let router = router.clone();
        async move {
            let Ok(response) = router.oneshot(req.map(axum::body::Body::new)).await;
            // The answer's body (an event stream, say) may go on: hyper reads no further
            // request until it ends, so the connection is not idle meanwhile.
            Ok::<_, Infallible>(response.map(|body| {
                axum::body::Body::new(http_body_util::BodyExt::map_frame(body, move |f| {
                    let _keep = &in_flight;
                    f
                }))
            }))
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut stopping: Option<Instant> = None;
    loop {
        let idle_at = activity.idle_deadline(limits.idle_timeout);
        // Check again at least every second: a request may start or end meanwhile.
        let wake = Instant::now() + Duration::from_secs(1);
        let wake = idle_at.map_or(wake, |t| t.min(wake));
        let wake = stopping.map_or(wake, |t| t.min(wake));
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended");
                }
                return;
            }
            _ = tokio::time::sleep_until(wake) => {
                if stopping.is_some_and(|t| t <= Instant::now()) {
                    return;
                }
                if idle_at.is_some_and(|t| t <= Instant::now()) {
                    tracing::debug!(%peer, "idle kept-alive connection closed");
                    return;
                }
            }
            _ = crate::dispatch::stopped(&mut shutdown), if stopping.is_none() => {
                conn.as_mut().graceful_shutdown();
                stopping = Some(Instant::now() + DRAIN);
            }
        }
    }
}
