//! How the agent gets a byte stream to the broker. The reconnect loop only knows this trait,
//! so tests drive it with in-memory streams and the production build plugs in the connection
//! ladder of `beckon-net`.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Any bidirectional byte stream the MQTT session can run over.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// A boxed [`ByteStream`].
pub type BoxedStream = Box<dyn ByteStream>;

/// A stream to the broker and how it was reached.
pub struct Connection {
    /// The stream, ready for MQTT CONNECT.
    pub stream: BoxedStream,
    /// The path, as a string the connector understands again (`direct:8883`, ...).
    pub path: String,
    /// True for paths whose idle connections get cut (443, any proxy): shorter keepalive.
    pub fallback: bool,
}

/// Why no stream could be opened, in plain words with the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(pub String);

/// Opens streams to the broker.
pub trait Connector: Send + 'static {
    /// Opens a stream, trying the paths in order from the preferred one.
    fn connect(&mut self) -> impl Future<Output = Result<Connection, ConnectError>> + Send;

    /// Start from this path next time (the last one that worked, read from the state folder).
    fn prefer(&mut self, path: &str);

    /// The broker sent "use another server"/"server moved" with this Server Reference
    /// (`host` or `host:port`, possibly several separated by spaces).
    fn redirect(&mut self, server_reference: &str);
}

/// Plain TCP to `host:port`: development brokers on loopback, and tests. No TLS.
pub struct PlainTcpConnector {
    host: String,
    port: u16,
    timeout: Duration,
}

impl PlainTcpConnector {
    /// A connector to `host:port` with a connect timeout.
    pub fn new(host: &str, port: u16, timeout: Duration) -> Self {
        Self {
            host: host.to_owned(),
            port,
            timeout,
        }
    }
}

impl Connector for PlainTcpConnector {
    async fn connect(&mut self) -> Result<Connection, ConnectError> {
        let target = (self.host.as_str(), self.port);
        let label = format!("{}:{}", self.host, self.port);
        match tokio::time::timeout(self.timeout, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => {
                // Small packets, sent at once.
                let _ = stream.set_nodelay(true);
                Ok(Connection {
                    stream: Box::new(stream),
                    path: format!("plain:{}", self.port),
                    fallback: false,
                })
            }
            Ok(Err(e)) => Err(ConnectError(format!(
                "TCP connection to {label} failed: {e}; is the broker running and the port open?"
            ))),
            Err(_) => Err(ConnectError(format!(
                "TCP connection to {label} timed out after {:?}; check the host name and firewall",
                self.timeout
            ))),
        }
    }

    fn prefer(&mut self, _path: &str) {}

    fn redirect(&mut self, server_reference: &str) {
        if let Some((host, port)) = parse_server_reference(server_reference, self.port) {
            self.host = host;
            self.port = port;
        }
    }
}

/// The first entry of a Server Reference: `host`, `host:port` or `[v6]:port`.
pub fn parse_server_reference(reference: &str, default_port: u16) -> Option<(String, u16)> {
    let first = reference.split_whitespace().next()?;
    if let Some(v6) = first.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if rest.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match first.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host.to_owned(), port.parse().ok()?)),
        Some(_) => Some((first.to_owned(), default_port)),
        None => Some((first.to_owned(), default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_references() {
        assert_eq!(
            parse_server_reference("b2.example.com", 8883),
            Some(("b2.example.com".into(), 8883))
        );
        assert_eq!(
            parse_server_reference("b2:9000 b3:9000", 8883),
            Some(("b2".into(), 9000))
        );
        assert_eq!(
            parse_server_reference("[::1]:1884", 8883),
            Some(("::1".into(), 1884))
        );
        assert_eq!(parse_server_reference("b2:port", 8883), None);
        assert_eq!(parse_server_reference("  ", 8883), None);
    }
}
