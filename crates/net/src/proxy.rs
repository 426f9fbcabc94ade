//! HTTP `CONNECT` through a proxy, without authentication (Beckon, like the seed, does not
//! support proxy authentication; a proxy that asks for it is reported clearly).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The most we read of a proxy's answer before giving up: a CONNECT answer is a status line
/// and a few headers.
pub const MAX_RESPONSE_HEADER: usize = 8 * 1024;

/// An HTTP proxy's address, as written by an operator: `http://host:port` or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyUrl {
    host: String,
    port: u16,
}

/// A proxy address that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyUrlError {
    /// The scheme is not `http`.
    #[error(
        "proxy address {url:?}: only http:// proxies are supported (the tunnel itself carries TLS)"
    )]
    UnsupportedScheme {
        /// The address as given.
        url: String,
    },
    /// The address carries a user name or password.
    #[error(
        "proxy address {url:?}: proxy authentication is not supported; remove the credentials and allow this host on the proxy without authentication"
    )]
    CredentialsNotSupported {
        /// The address as given.
        url: String,
    },
    /// No port was given.
    #[error("proxy address {url:?}: name the port, for example http://proxy.example:3128")]
    MissingPort {
        /// The address as given.
        url: String,
    },
    /// The port is not a number from 1 to 65535.
    #[error("proxy address {url:?}: the port must be a number from 1 to 65535")]
    InvalidPort {
        /// The address as given.
        url: String,
    },
    /// The host part is empty or malformed.
    #[error("proxy address {url:?}: the host name is missing or malformed")]
    InvalidHost {
        /// The address as given.
        url: String,
    },
}

impl ProxyUrl {
    /// A proxy at `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }

    /// The proxy's host name or IP address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl FromStr for ProxyUrl {
    type Err = ProxyUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let url = s.trim();
        let owned = || url.to_owned();
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => return Err(ProxyUrlError::UnsupportedScheme { url: owned() }),
            None => url,
        };
        // Accept a trailing slash, nothing else after the authority.
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('@') {
            return Err(ProxyUrlError::CredentialsNotSupported { url: owned() });
        }
        if authority.contains('/') || authority.contains('?') || authority.contains('#') {
            return Err(ProxyUrlError::InvalidHost { url: owned() });
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| ProxyUrlError::InvalidHost { url: owned() })?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(ProxyUrlError::InvalidHost { url: owned() });
            }
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| ProxyUrlError::MissingPort { url: owned() })?;
            (host, port)
        } else {
            authority
                .rsplit_once(':')
                .ok_or_else(|| ProxyUrlError::MissingPort { url: owned() })?
        };
        if host.is_empty() || (host.contains(':') && !authority.starts_with('[')) {
            return Err(ProxyUrlError::InvalidHost { url: owned() });
        }
        if port.is_empty() {
            return Err(ProxyUrlError::MissingPort { url: owned() });
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ProxyUrlError::InvalidPort { url: owned() })?;
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}", authority(&self.host, self.port))
    }
}

/// `host:port`, with brackets around an IPv6 literal (given with or without brackets).
pub(crate) fn authority(host: &str, port: u16) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The proxy did not open a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// 407: the proxy wants credentials.
    #[error(
        "the proxy {proxy} requires authentication, which Beckon does not support: allow this machine through the proxy without authentication, or let agents connect directly"
    )]
    AuthenticationRequired {
        /// The proxy.
        proxy: String,
    },
    /// 403: the proxy's rules forbid this tunnel, most often because of the target port.
    #[error(
        "the proxy {proxy} forbids CONNECT to {target} (403 {reason}): proxies often allow tunnels only to port 443 (squid's default); allow CONNECT to port {port} in the proxy's rules"
    )]
    Forbidden {
        /// The proxy.
        proxy: String,
        /// The tunnel target `host:port`.
        target: String,
        /// The target port.
        port: u16,
        /// The reason phrase the proxy gave.
        reason: String,
    },
    /// Any other non-2xx status.
    #[error("the proxy {proxy} answered CONNECT {target} with {status} {reason}: {}", status_hint(*status))]
    Refused {
        /// The proxy.
        proxy: String,
        /// The tunnel target `host:port`.
        target: String,
        /// The HTTP status code.
        status: u16,
        /// The reason phrase the proxy gave.
        reason: String,
    },
    /// No complete answer in time.
    #[error(
        "the proxy {proxy} did not answer CONNECT {target} within {} s: the proxy may be unable to reach the broker",
        after.as_secs_f32()
    )]
    TimedOut {
        /// The proxy.
        proxy: String,
        /// The tunnel target `host:port`.
        target: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The proxy closed the connection before a complete answer.
    #[error(
        "the proxy {proxy} closed the connection before answering CONNECT {target}: is {proxy} an HTTP proxy?"
    )]
    Closed {
        /// The proxy.
        proxy: String,
        /// The tunnel target `host:port`.
        target: String,
    },
    /// The answer's header is larger than [`MAX_RESPONSE_HEADER`].
    #[error(
        "the proxy {proxy} sent an answer header larger than {limit} bytes: is {proxy} an HTTP proxy?"
    )]
    HeaderTooLarge {
        /// The proxy.
        proxy: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The answer is not HTTP.
    #[error(
        "the proxy {proxy} answered something that is not HTTP ({detail}): is {proxy} an HTTP proxy?"
    )]
    Malformed {
        /// The proxy.
        proxy: String,
        /// What was wrong.
        detail: String,
    },
    /// Reading from or writing to the proxy failed.
    #[error("talking to the proxy {proxy} failed: {source}")]
    Io {
        /// The proxy.
        proxy: String,
        /// The system's error.
        source: io::Error,
    },
}

impl ProxyError {
    /// True when the failure is the proxy's as a whole (not about this one target), so other
    /// tunnels through the same proxy would fail the same way.
    pub fn is_proxy_wide(&self) -> bool {
        matches!(
            self,
            Self::AuthenticationRequired { .. }
                | Self::HeaderTooLarge { .. }
                | Self::Malformed { .. }
        )
    }
}

fn status_hint(status: u16) -> &'static str {
    match status {
        400 | 405 | 501 => "the proxy does not support CONNECT tunnels; use a proxy that does",
        502 | 504 => {
            "the proxy could not reach the broker: check that the proxy itself can reach it (its firewall, its DNS)"
        }
        503 => "the proxy is unavailable or could not reach the broker; try again later",
        _ => "the proxy did not open the tunnel; check the proxy's log for this request",
    }
}

/// Opens a tunnel to `target_host:target_port` through an HTTP proxy already connected on
/// `stream`: sends `CONNECT`, reads the answer (at most [`MAX_RESPONSE_HEADER`] bytes, within
/// `timeout`) and requires a 2xx status. `proxy` names the proxy in error messages.
///
/// Bytes the proxy sent after its answer header are kept and returned first by the tunnel.
pub async fn http_connect<S>(
    mut stream: S,
    proxy: &str,
    target_host: &str,
    target_port: u16,
    timeout: Duration,
) -> Result<PrefixedStream<S>, ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = authority(target_host, target_port);
    let exchange = async {
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|source| ProxyError::Io {
                proxy: proxy.to_owned(),
                source,
            })?;
        stream.flush().await.map_err(|source| ProxyError::Io {
            proxy: proxy.to_owned(),
            source,
        })?;
        read_answer(&mut stream, proxy, &target, target_port).await
    };
    let leftover = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => {
            return Err(ProxyError::TimedOut {
                proxy: proxy.to_owned(),
                target,
                after: timeout,
            });
        }
        Ok(result) => result?,
    };
    Ok(PrefixedStream::new(leftover, stream))
}

/// Reads the proxy's answer; returns the bytes that followed its header.
async fn read_answer<S>(
    stream: &mut S,
    proxy: &str,
    target: &str,
    target_port: u16,
) -> Result<Bytes, ProxyError>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let room = (MAX_RESPONSE_HEADER - buf.len()).min(chunk.len());
        let n = stream
            .read(&mut chunk[..room])
            .await
            .map_err(|source| ProxyError::Io {
                proxy: proxy.to_owned(),
                source,
            })?;
        if n == 0 {
            return Err(ProxyError::Closed {
                proxy: proxy.to_owned(),
                target: target.to_owned(),
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(header_len)) => {
                let status = response.code.unwrap_or(0);
                let reason = response.reason.unwrap_or("").to_owned();
                return match status {
                    200..=299 => Ok(Bytes::copy_from_slice(&buf[header_len..])),
                    407 => Err(ProxyError::AuthenticationRequired {
                        proxy: proxy.to_owned(),
                    }),
                    403 => Err(ProxyError::Forbidden {
                        proxy: proxy.to_owned(),
                        target: target.to_owned(),
                        port: target_port,
                        reason,
                    }),
                    _ => Err(ProxyError::Refused {
                        proxy: proxy.to_owned(),
                        target: target.to_owned(),
                        status,
                        reason,
                    }),
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEADER => {}
            Ok(httparse::Status::Partial) => {
                return Err(ProxyError::HeaderTooLarge {
                    proxy: proxy.to_owned(),
                    limit: MAX_RESPONSE_HEADER,
                });
            }
            Err(e) => {
                return Err(ProxyError::Malformed {
                    proxy: proxy.to_owned(),
                    detail: e.to_string(),
                });
            }
        }
    }
}

/// A stream that first yields bytes already read from it (a proxy's data after its answer
/// header), then reads from the inner stream. Writes go straight to the inner stream.
#[derive(Debug)]
pub struct PrefixedStream<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> PrefixedStream<S> {
    /// Wraps `inner`, yielding `prefix` first.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// The bytes not yet read from the prefix.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The inner stream (any unread prefix is dropped).
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefixedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[test]
    fn parses_proxy_addresses() {
        let p: ProxyUrl = "http://proxy.example:3128".parse().expect("valid");
        assert_eq!((p.host(), p.port()), ("proxy.example", 3128));
        assert_eq!(p.to_string(), "http://proxy.example:3128");
        let p: ProxyUrl = "10.0.0.1:8080/".parse().expect("valid");
        assert_eq!((p.host(), p.port()), ("10.0.0.1", 8080));
        let p: ProxyUrl = "HTTP://[::1]:3128".parse().expect("valid");
        assert_eq!((p.host(), p.port()), ("::1", 3128));
        assert_eq!(p.to_string(), "http://[::1]:3128");
    }

    #[test]
    fn rejects_unusable_proxy_addresses() {
        let cases = [
            ("https://proxy:3128", "only http://"),
            (
                "http://user:pw@proxy:3128",
                "authentication is not supported",
            ),
            ("http://proxy", "name the port"),
            ("proxy:", "name the port"),
            ("proxy:0", "from 1 to 65535"),
            ("proxy:70000", "from 1 to 65535"),
            (":3128", "host name is missing"),
            ("http://proxy:3128/path", "host name is missing"),
            ("[::1:3128", "host name is missing"),
        ];
        for (input, expected) in cases {
            let err = input.parse::<ProxyUrl>().expect_err(input);
            assert!(err.to_string().contains(expected), "{input}: {err}");
        }
    }

    /// Runs `http_connect` against a scripted proxy that answers `answer` and returns what the
    /// proxy received.
    async fn scripted(
        answer: &'static [u8],
    ) -> (
        Result<PrefixedStream<tokio::io::DuplexStream>, ProxyError>,
        Vec<u8>,
    ) {
        let (client, mut server) = duplex(64 * 1024);
        let proxy = tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 512];
            while !request.ends_with(b"\r\n\r\n") {
                let n = server.read(&mut buf).await.expect("read request");
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            server.write_all(answer).await.expect("write answer");
            // Keep the server side open for the client to read the leftover.
            tokio::time::sleep(Duration::from_millis(200)).await;
            (request, server)
        });
        let result = http_connect(
            client,
            "proxy:3128",
            "broker.example",
            8883,
            Duration::from_secs(5),
        )
        .await;
        let (request, _server) = proxy.await.expect("proxy task");
        (result, request)
    }

    #[tokio::test]
    async fn sends_connect_and_keeps_bytes_after_the_header() {
        let (result, request) =
            scripted(b"HTTP/1.1 200 Connection established\r\nVia: test\r\n\r\nEARLY").await;
        assert_eq!(
            request,
            b"CONNECT broker.example:8883 HTTP/1.1\r\nHost: broker.example:8883\r\n\r\n"
        );
        let mut tunnel = result.expect("tunnel open");
        let mut early = [0u8; 5];
        tunnel.read_exact(&mut early).await.expect("leftover bytes");
        assert_eq!(&early, b"EARLY");
    }

    #[test]
    fn authority_brackets_ipv6_once() {
        assert_eq!(authority("broker.example", 8883), "broker.example:8883");
        assert_eq!(authority("::1", 443), "[::1]:443");
        assert_eq!(authority("[::1]", 443), "[::1]:443");
    }

    #[tokio::test]
    async fn names_the_status_of_a_refusal() {
        let (result, _) = scripted(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        let err = result.expect_err("502");
        let text = err.to_string();
        assert!(text.contains("502 Bad Gateway"), "{text}");
        assert!(text.contains("could not reach the broker"), "{text}");
        let (result, _) = scripted(b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n").await;
        assert!(matches!(
            result,
            Err(ProxyError::AuthenticationRequired { .. })
        ));
        let (result, _) = scripted(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
        let text = result.expect_err("403").to_string();
        assert!(text.contains("allow CONNECT to port 8883"), "{text}");
    }

    #[tokio::test]
    async fn rejects_non_http_answers() {
        let (result, _) = scripted(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
        assert!(
            matches!(result, Err(ProxyError::Malformed { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn bounds_the_answer_size() {
        static HUGE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
            // One endless header line: the header never ends within the limit.
            let mut v = b"HTTP/1.1 200 OK\r\nX-Filler: ".to_vec();
            v.resize(MAX_RESPONSE_HEADER + 100, b'a');
            v
        });
        let (result, _) = scripted(HUGE.as_slice()).await;
        assert!(
            matches!(result, Err(ProxyError::HeaderTooLarge { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_proxy_times_out() {
        let (client, _server) = duplex(1024);
        let err = http_connect(client, "proxy:3128", "b", 443, Duration::from_millis(200))
            .await
            .expect_err("silent");
        assert!(matches!(err, ProxyError::TimedOut { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_closing_proxy_is_reported() {
        let (client, server) = duplex(1024);
        drop(server);
        let err = http_connect(client, "proxy:3128", "b", 443, Duration::from_secs(2))
            .await
            .expect_err("closed");
        assert!(
            matches!(err, ProxyError::Closed { .. } | ProxyError::Io { .. }),
            "{err}"
        );
    }
}
