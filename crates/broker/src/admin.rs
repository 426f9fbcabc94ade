//! The admin listener: `/metrics` (OpenMetrics) and `/healthz` over plain HTTP, served by
//! hyper one request per connection.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::{Instant, timeout_at};

use crate::metrics::Metrics;
use crate::shared_port::{one_request_server, text};

/// How long one admin connection may take, request and answer.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// Admin connections served at once; beyond, new ones wait in the listen backlog (a
/// scraper or health check needs a handful).
const MAX_CONNECTIONS: usize = 64;

/// Serves the admin listener until shutdown.
pub(crate) async fn admin_loop(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    serve(listener, metrics, MAX_CONNECTIONS, shutdown).await;
}

/// Serves at most `max` connections at once, each one request within [`REQUEST_LIMIT`].
async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    max: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = beckon_net::ConnectionSlots::new(max, "admin listener");
    loop {
        let permit = tokio::select! {
            p = slots.acquire() => p,
            _ = shutdown.changed() => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let deadline = Instant::now() + REQUEST_LIMIT;
            let service = hyper::service::service_fn(move |req| {
                let (status, kind, body) = route(req.method(), req.uri().path(), &metrics);
                async move { Ok::<_, Infallible>(text(status, kind, body)) }
            });
            let conn = one_request_server(deadline).serve_connection(TokioIo::new(tcp), service);
            if let Ok(Err(e)) = timeout_at(deadline, conn).await {
                tracing::debug!(error = %e, "admin request failed");
            }
        });
    }
}

fn route(method: &Method, path: &str, metrics: &Metrics) -> (u16, &'static str, String) {
    match (method, path) {
        (&Method::GET, "/metrics") => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, "/healthz") => (200, "application/json", "{\"status\":\"ok\"}\n".to_owned()),
        (&Method::GET, _) => (
            404,
            "text/plain",
            "not found: try /metrics or /healthz\n".to_owned(),
        ),
        _ => (405, "text/plain", "only GET is served here\n".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn health(addr: std::net::SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Slow clients hold at most `max` slots; the next request waits for a free one and is
    /// then answered.
    #[tokio::test]
    async fn at_the_connection_limit_requests_wait_for_a_free_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(serve(listener, Arc::new(Metrics::new()), 4, shutdown));
        assert!(health(addr).await.starts_with("HTTP/1.1 200"));
        let mut slow = Vec::new();
        for _ in 0..4 {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\n")
                .await
                .expect("write");
            slow.push(s);
        }
        let waiting = tokio::spawn(health(addr));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiting.is_finished(), "served beyond the limit");
        drop(slow);
        let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("served once slots are free")
            .expect("task");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
