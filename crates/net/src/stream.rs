//! The one stream type that the MQTT code reads and writes, whatever the path underneath.

use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional byte stream: TCP, TLS over TCP, TLS through a proxy tunnel, or MQTT over
/// WebSocket. MQTT code treats them all alike.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// A boxed [`ByteStream`], as returned by the connection ladder.
pub type BoxedStream = Box<dyn ByteStream>;
