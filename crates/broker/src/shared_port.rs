//! The shared HTTPS port (443, or e.g. 8443 unprivileged): after TLS, ALPN `mqtt` is raw
//! MQTT; otherwise the first decrypted byte decides: 0x10 (CONNECT) is raw MQTT, anything
//! else is HTTP. Over HTTP, `GET /mqtt` with a WebSocket upgrade carries MQTT in binary
//! frames; `/healthz`, `/readyz` and `/` answer short texts.

use beckon_net::{PrefixedStream, WsByteStream};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// Largest HTTP request head read.
const MAX_HEAD: usize = 16 * 1024;

/// What an HTTP request on the shared port turned into.
pub(crate) enum HttpOutcome<S> {
    /// `GET /mqtt` upgraded: MQTT follows.
    WebSocket(Box<WsByteStream<PrefixedStream<S>>>),
    /// Answered (or failed); the connection is done.
    Done,
}

/// Reads the request head after `buf` (which holds the first bytes already read), then
/// answers it or upgrades it to WebSocket, within `deadline`.
pub(crate) async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    mut buf: BytesMut,
    deadline: Instant,
    ready: bool,
) -> HttpOutcome<S> {
    let Some((method, path, upgrade)) = read_head(&mut stream, &mut buf, deadline).await else {
        return HttpOutcome::Done;
    };
    let route = path.split('?').next().unwrap_or("/");
    if route == "/mqtt" && upgrade && method == "GET" {
        // The callback's signature is tungstenite's.
        #[allow(clippy::result_large_err)]
        let callback =
            |req: &WsRequest, mut resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
                let offers_mqtt = req
                    .headers()
                    .get_all("sec-websocket-protocol")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .any(|p| p.trim().eq_ignore_ascii_case("mqtt"));
                if offers_mqtt {
                    resp.headers_mut()
                        .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
                }
                Ok(resp)
            };
        // The sniffed bytes are read again by the handshake.
        let io = PrefixedStream::new(buf.freeze(), stream);
        return match timeout_at(deadline, tokio_tungstenite::accept_hdr_async(io, callback)).await {
            Ok(Ok(ws)) => HttpOutcome::WebSocket(Box::new(WsByteStream::new(ws))),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                HttpOutcome::Done
            }
            Err(_) => HttpOutcome::Done,
        };
    }
    let head = method == "HEAD";
    if method != "GET" && !head {
        respond(&mut stream, 405, "text/plain", "only GET is served here\n").await;
        return HttpOutcome::Done;
    }
    let (status, kind, body): (u16, &str, &str) = match route {
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
    respond(&mut stream, status, kind, if head { "" } else { body }).await;
    HttpOutcome::Done
}

/// Reads an HTTP/1.1 request head (after the bytes already in `buf`) within `deadline`:
/// method, path and whether it asks for a WebSocket upgrade. A malformed or oversized head is
/// answered 400; `None` then, and when the client goes away.
pub(crate) async fn read_head<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Option<(String, String, bool)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(_)) => {
                let upgrade = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("upgrade")
                        && String::from_utf8_lossy(h.value).eq_ignore_ascii_case("websocket")
                });
                return Some((
                    req.method.unwrap_or("GET").to_owned(),
                    req.path.unwrap_or("/").to_owned(),
                    upgrade,
                ));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {
                let mut chunk = [0u8; 4096];
                match timeout_at(deadline, tokio::io::AsyncReadExt::read(stream, &mut chunk)).await
                {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return None,
                }
            }
            _ => {
                tracing::debug!("not MQTT and not a valid HTTP request; answered 400");
                respond(stream, 400, "text/plain", "bad request\n").await;
                return None;
            }
        }
    }
}

/// Writes a whole HTTP response and closes.
pub(crate) async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    kind: &str,
    body: &str,
) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        _ => "Service Unavailable",
    };
    let text = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\ncache-control: no-store\r\n\r\n{body}",
        body.len()
    );
    let _ = timeout(std::time::Duration::from_secs(5), async {
        stream.write_all(text.as_bytes()).await?;
        stream.flush().await?;
        stream.shutdown().await
    })
    .await;
}
