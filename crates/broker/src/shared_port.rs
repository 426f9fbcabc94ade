//! The shared HTTPS port (443, or e.g. 8443 unprivileged): after TLS, ALPN `mqtt` is raw
//! MQTT; otherwise the first decrypted byte decides: 0x10 (CONNECT) is raw MQTT, anything
//! else is HTTP, served by hyper. Over HTTP, `GET /mqtt` with a WebSocket upgrade carries
//! MQTT in binary frames; `/healthz`, `/readyz` and `/` answer short texts.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use beckon_net::{PrefixedStream, WsByteStream};
use bytes::{Bytes, BytesMut};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Largest HTTP request head read (hyper's read buffer); a larger head is refused.
const MAX_HEAD: usize = 16 * 1024;

/// MQTT over WebSocket on the shared port, as the MQTT code reads it.
pub(crate) type WebSocketMqtt = WsByteStream<TokioIo<Upgraded>>;

/// What an HTTP request on the shared port turned into.
pub(crate) enum HttpOutcome {
    /// `GET /mqtt` upgraded: MQTT follows.
    WebSocket(Box<WebSocketMqtt>),
    /// Answered (or failed); the connection is done.
    Done,
}

/// hyper's HTTP/1.1 server for one request per connection (every answer but the WebSocket
/// upgrade's says `connection: close`): the head must arrive by `deadline` and fit in
/// [`MAX_HEAD`], so a slow or chatty client cannot hold the connection.
pub(crate) fn one_request_server(deadline: Instant) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(deadline.saturating_duration_since(Instant::now()))
        .max_buf_size(MAX_HEAD);
    builder
}

/// A short answer; the connection closes after it.
pub(crate) fn text(
    status: u16,
    kind: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Serves the HTTP request whose first bytes are in `buf` (already read from `stream`):
/// answers it, or upgrades `GET /mqtt` to WebSocket, all within `deadline`. A WebSocket
/// frame or message announcing more than `max_message` bytes ends the connection from its
/// header, before anything is buffered for it.
pub(crate) async fn serve_http<S>(
    stream: S,
    buf: BytesMut,
    deadline: Instant,
    ready: bool,
    max_message: usize,
) -> HttpOutcome
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The sniffed bytes are read again by hyper.
    let io = TokioIo::new(PrefixedStream::new(buf.freeze(), stream));
    let upgrade: Arc<Mutex<Option<OnUpgrade>>> = Arc::default();
    let slot = upgrade.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let answer = answer(&mut req, ready, &slot);
        async move { Ok::<_, Infallible>(answer) }
    });
    let conn = one_request_server(deadline)
        .serve_connection(io, service)
        .with_upgrades();
    match timeout_at(deadline, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "not MQTT and not a valid HTTP request");
            return HttpOutcome::Done;
        }
        Err(_) => return HttpOutcome::Done,
    }
    let Some(on_upgrade) = upgrade.lock().ok().and_then(|mut u| u.take()) else {
        return HttpOutcome::Done;
    };
    match timeout_at(deadline, on_upgrade).await {
        Ok(Ok(upgraded)) => {
            // tungstenite reserves a frame's announced length at once (16 MiB by default).
            let config = WebSocketConfig::default()
                .max_frame_size(Some(max_message))
                .max_message_size(Some(max_message));
            let io = TokioIo::new(upgraded);
            let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            HttpOutcome::WebSocket(Box::new(WsByteStream::new(ws)))
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "WebSocket upgrade failed");
            HttpOutcome::Done
        }
        Err(_) => HttpOutcome::Done,
    }
}

/// The answer to one request; a WebSocket upgrade leaves its handle in `upgrade`.
fn answer(
    req: &mut Request<Incoming>,
    ready: bool,
    upgrade: &Mutex<Option<OnUpgrade>>,
) -> Response<Full<Bytes>> {
    let route = req.uri().path();
    let wants_websocket = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    if route == "/mqtt" && wants_websocket && req.method() == Method::GET {
        let Some(accepted) = accept_websocket(req) else {
            return text(400, "text/plain", "bad WebSocket upgrade\n");
        };
        if let Ok(mut slot) = upgrade.lock() {
            *slot = Some(hyper::upgrade::on(req));
        }
        return accepted;
    }
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        return text(405, "text/plain", "only GET is served here\n");
    }
    let (status, kind, body): (u16, &'static str, &'static str) = match route {
        "/healthz" => (200, "application/json", "{\"status\":\"ok\"}\n"),
        "/readyz" if ready => (200, "application/json", "{\"status\":\"ready\"}\n"),
        "/readyz" => (503, "application/json", "{\"status\":\"stopping\"}\n"),
        "/" => (
            200,
            "text/plain; charset=utf-8",
            "Beckon push service.\nMQTT: ALPN \"mqtt\" on this port, or WebSocket at /mqtt (subprotocol mqtt).\nHealth: /healthz, /readyz.\n",
        ),
        "/mqtt" => (
            426,
            "text/plain",
            "MQTT over WebSocket: send a WebSocket upgrade with subprotocol mqtt\n",
        ),
        _ => (404, "text/plain", "not found\n"),
    };
    text(status, kind, if head { "" } else { body })
}

/// The `101 Switching Protocols` answer to a valid WebSocket upgrade (RFC 6455 section 4.2),
/// with the subprotocol `mqtt` when the client offers it; `None` for an invalid upgrade.
fn accept_websocket(req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade")
        || headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
    {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes())).ok()?;
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out = response.headers_mut();
    out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if has_token(header::SEC_WEBSOCKET_PROTOCOL, "mqtt") {
        out.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("mqtt"),
        );
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Serves `request` on an in-memory stream; returns what was answered and how it ended.
    async fn serve(request: Vec<u8>, deadline: Duration) -> (String, HttpOutcome) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(serve_http(
            server,
            BytesMut::new(),
            Instant::now() + deadline,
            true,
            1 << 20,
        ));
        client.write_all(&request).await.expect("write");
        let outcome = tokio::time::timeout(Duration::from_secs(5), serving)
            .await
            .expect("the server gives up in time")
            .expect("served");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), client.read_to_end(&mut answer)).await;
        (String::from_utf8_lossy(&answer).into_owned(), outcome)
    }

    #[tokio::test]
    async fn a_slow_client_is_let_go_at_the_deadline() {
        let started = Instant::now();
        let (_, outcome) = serve(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec(),
            Duration::from_millis(300),
        )
        .await;
        assert!(matches!(outcome, HttpOutcome::Done));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let mut request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        request.extend(std::iter::repeat_n(b'a', 2 * MAX_HEAD));
        request.extend_from_slice(b"\r\n\r\n");
        let (answer, outcome) = serve(request, Duration::from_secs(2)).await;
        assert!(matches!(outcome, HttpOutcome::Done));
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }

    #[tokio::test]
    async fn the_websocket_upgrade_names_mqtt_only_when_offered() {
        let upgrade = |protocol: &str| {
            format!(
                "GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{protocol}\r\n"
            )
            .into_bytes()
        };
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(serve_http(
            server,
            BytesMut::new(),
            Instant::now() + Duration::from_secs(2),
            true,
            1 << 20,
        ));
        client
            .write_all(&upgrade("Sec-WebSocket-Protocol: mqtt\r\n"))
            .await
            .expect("write");
        let outcome = serving.await.expect("served");
        assert!(matches!(outcome, HttpOutcome::WebSocket(_)));
        let mut head = vec![0u8; 4096];
        let n = client.read(&mut head).await.expect("read");
        let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        // RFC 6455's example key and its answer.
        assert!(
            head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
            "{head}"
        );
        assert!(head.contains("sec-websocket-protocol: mqtt\r\n"), "{head}");

        let (answer, outcome) = serve(upgrade(""), Duration::from_secs(2)).await;
        assert!(matches!(outcome, HttpOutcome::WebSocket(_)));
        assert!(
            !answer
                .to_ascii_lowercase()
                .contains("sec-websocket-protocol"),
            "{answer}"
        );

        let (answer, outcome) = serve(
            b"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                .to_vec(),
            Duration::from_secs(2),
        )
        .await;
        assert!(matches!(outcome, HttpOutcome::Done));
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
}
