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

/// Serves the admin listener until shutdown.
pub(crate) async fn admin_loop(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
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
