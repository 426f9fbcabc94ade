//! MQTT over WebSocket (subprotocol `mqtt`), seen by MQTT code as a plain byte stream:
//! bytes written become binary frames, binary frames read become bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::proxy::authority;

/// The WebSocket subprotocol that carries MQTT (MQTT 3.1.1 and 5.0 both use `mqtt`).
pub const SUBPROTOCOL: &str = "mqtt";

/// WebSocket limits and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsSettings {
    /// The request path. Default `/mqtt`.
    pub path: String,
    /// Read buffer per connection, in bytes. Default 4 KiB: MQTT wake-ups are small and a
    /// load generator holds many connections.
    pub read_buffer_size: usize,
    /// Largest WebSocket message accepted from the server, in bytes. Default 16 MiB.
    pub max_message_size: usize,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            path: String::from("/mqtt"),
            read_buffer_size: 4 * 1024,
            max_message_size: 16 * 1024 * 1024,
        }
    }
}

/// The WebSocket upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// The server answered the upgrade with an HTTP status other than 101.
    #[error(
        "the server answered the WebSocket upgrade for {path} with HTTP {status}: {}",
        status_hint(*status)
    )]
    Rejected {
        /// The request path.
        path: String,
        /// The HTTP status.
        status: u16,
    },
    /// The server did not agree to the `mqtt` subprotocol.
    #[error(
        "the server's WebSocket endpoint {path} does not speak the subprotocol mqtt ({detail}): it is not an MQTT WebSocket endpoint"
    )]
    Subprotocol {
        /// The request path.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// The upgrade did not finish in time.
    #[error("the WebSocket upgrade for {path} did not finish within {} s", after.as_secs_f32())]
    TimedOut {
        /// The request path.
        path: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The server closed the connection during the upgrade.
    #[error(
        "the server closed the connection during the WebSocket upgrade for {path}: a proxy may block WebSocket"
    )]
    Closed {
        /// The request path.
        path: String,
    },
    /// The answer was not a valid WebSocket upgrade, or the request could not be built.
    #[error("the WebSocket upgrade for {path} failed: {detail}")]
    Protocol {
        /// The request path.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// A system error on the socket.
    #[error("the WebSocket connection failed: {0}")]
    Io(#[source] io::Error),
}

fn status_hint(status: u16) -> &'static str {
    match status {
        404 => "the server has no MQTT WebSocket endpoint at that path",
        400 | 426 => "the server or a proxy on the way refused the upgrade",
        401 | 403 => "the server or a proxy on the way forbids it",
        502..=504 => "a proxy on the way could not reach the broker",
        _ => "the endpoint does not accept MQTT over WebSocket",
    }
}

/// Performs the WebSocket upgrade (`GET {path}`, subprotocol `mqtt`) on `stream` (already
/// TLS), naming the server `host:port` in the `Host` header, within `timeout`.
pub async fn websocket_handshake<S>(
    stream: S,
    host: &str,
    port: u16,
    settings: &WsSettings,
    timeout: Duration,
) -> Result<WsByteStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let path = settings.path.clone();
    let protocol_error = |detail: String| WsError::Protocol {
        path: path.clone(),
        detail,
    };
    let uri = format!("wss://{}{}", authority(host, port), settings.path);
    let mut request = uri
        .as_str()
        .into_client_request()
        .map_err(|e| protocol_error(format!("invalid request {uri}: {e}")))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(settings.read_buffer_size)
        // Write each message at once, as a TCP write would: MQTT code may not flush.
        .write_buffer_size(0)
        .max_message_size(Some(settings.max_message_size))
        .max_frame_size(Some(settings.max_message_size));
    let handshake = tokio_tungstenite::client_async_with_config(request, stream, Some(config));
    let (ws, response) = match tokio::time::timeout(timeout, handshake).await {
        Err(_) => {
            return Err(WsError::TimedOut {
                path,
                after: timeout,
            });
        }
        Ok(Err(e)) => return Err(classify(&path, e)),
        Ok(Ok(done)) => done,
    };
    // tungstenite already checks that the server chose one of the offered subprotocols.
    tracing::debug!(status = %response.status(), "WebSocket upgrade done");
    Ok(WsByteStream::new(ws))
}

fn classify(path: &str, error: tungstenite::Error) -> WsError {
    let path = path.to_owned();
    match error {
        tungstenite::Error::Http(response) => WsError::Rejected {
            path,
            status: response.status().as_u16(),
        },
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(e),
        ) => WsError::Subprotocol {
            path,
            detail: e.to_string(),
        },
        tungstenite::Error::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            WsError::Closed { path }
        }
        tungstenite::Error::Protocol(tungstenite::error::ProtocolError::HandshakeIncomplete)
        | tungstenite::Error::ConnectionClosed
        | tungstenite::Error::AlreadyClosed => WsError::Closed { path },
        tungstenite::Error::Io(e) => WsError::Io(e),
        other => WsError::Protocol {
            path,
            detail: other.to_string(),
        },
    }
}

/// An established MQTT-over-WebSocket connection as a byte stream.
#[derive(Debug)]
pub struct WsByteStream<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    pending: Bytes,
    /// The server closed the WebSocket: reads return end of stream.
    read_closed: bool,
}

impl<S> WsByteStream<S> {
    /// Carries MQTT bytes over `ws`, an established WebSocket (either side: the broker's
    /// shared port uses it for the connections it accepts).
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            read_closed: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsByteStream<S> {
    /// The stream under the WebSocket.
    pub fn get_ref(&self) -> &S {
        self.ws.get_ref()
    }
}

fn to_io(error: tungstenite::Error) -> io::Error {
    match error {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket is closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsByteStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.read_closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None
                | Some(Ok(Message::Close(_)))
                | Some(Err(tungstenite::Error::ConnectionClosed)) => {
                    self.read_closed = true;
                }
                Some(Ok(Message::Binary(data))) => self.pending = data,
                // tungstenite answers pings itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the peer sent a WebSocket text message; MQTT over WebSocket uses binary messages only",
                    )));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsByteStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(())
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}
