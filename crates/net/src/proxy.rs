//! HTTP `CONNECT` through a proxy, with Basic authentication when the proxy address carries
//! credentials (`http://user:password@host:port`). Negotiate and NTLM are not spoken: a proxy
//! that offers only those is reported clearly. The password never leaves this module except in
//! the `Proxy-Authorization` header: `Display` and `Debug` show the user name at most.

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

/// The proxy setting that means "the operating system's proxy" (an agent's `broker.proxy`,
/// the console's proxy policy): agents read it at each connection ladder start.
pub const SYSTEM_PROXY: &str = "system";

/// An HTTP proxy's address, as written by an operator: `http://host:port` or `host:port`,
/// optionally with credentials for Basic authentication: `http://user:password@host:port`
/// (percent-encode `@`, `:` and `%` in them, e.g. `p%40ss` for `p@ss`).
///
/// Two addresses are equal when they name the same proxy and user: the password is not part of
/// the identity (a stored path, written without it, still matches the configured proxy).
#[derive(Clone)]
pub struct ProxyUrl {
    host: String,
    port: u16,
    credentials: Option<Credentials>,
}

/// A user name and password for the proxy's Basic authentication.
#[derive(Clone)]
struct Credentials {
    user: String,
    password: String,
}

impl PartialEq for ProxyUrl {
    fn eq(&self, other: &Self) -> bool {
        self.host == other.host && self.port == other.port && self.user() == other.user()
    }
}

impl Eq for ProxyUrl {}

impl std::hash::Hash for ProxyUrl {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.host, self.port, self.user()).hash(state);
    }
}

/// Shows the user name, never the password.
impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user())
            .field("password", &self.credentials.as_ref().map(|_| "<redacted>"))
            .finish()
    }
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
    /// The credentials part is not `user:password` (or holds a bad percent-encoding).
    #[error(
        "proxy address {url}: write the credentials as http://user:password@host:port, percent-encoding @ : and % in them (e.g. %40 for @)"
    )]
    MalformedCredentials {
        /// The address as given, without the credentials.
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
    /// A proxy at `host:port`, without authentication.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            credentials: None,
        }
    }

    /// The same proxy, authenticating as `user` with `password` (Basic).
    pub fn with_credentials(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.credentials = Some(Credentials {
            user: user.into(),
            password: password.into(),
        });
        self
    }

    /// `address` as it may be shown or recorded: parsed and written without its password; an
    /// address that does not parse is withheld when it could carry credentials (an `@`).
    pub fn redact(address: &str) -> String {
        match address.parse::<ProxyUrl>() {
            Ok(p) if p.user().is_some() => p.to_string(),
            Ok(_) => address.to_owned(),
            Err(_) if address.contains('@') => "<unusable proxy address with credentials>".into(),
            Err(_) => address.to_owned(),
        }
    }

    /// The user name the agent authenticates as, if the address carries credentials.
    pub fn user(&self) -> Option<&str> {
        self.credentials.as_ref().map(|c| c.user.as_str())
    }

    /// The `Proxy-Authorization` header value (Basic), if the address carries credentials.
    fn authorization(&self) -> Option<String> {
        use base64::Engine as _;
        let c = self.credentials.as_ref()?;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password));
        Some(format!("Basic {token}"))
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
        let given = s.trim();
        let (scheme, rest) = match given.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, given),
        };
        // Error messages quote the address without the credentials.
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((userinfo, rest)) => (Some(userinfo), rest),
            None => (None, rest),
        };
        let shown = match scheme {
            Some(scheme) => format!("{scheme}://{rest}"),
            None => rest.to_owned(),
        };
        let url = shown.as_str();
        let owned = || format!("{url:?}");
        if scheme.is_some_and(|s| !s.eq_ignore_ascii_case("http")) {
            return Err(ProxyUrlError::UnsupportedScheme { url: owned() });
        }
        let credentials = match userinfo {
            None => None,
            Some(userinfo) => Some(
                parse_credentials(userinfo)
                    .ok_or_else(|| ProxyUrlError::MalformedCredentials { url: owned() })?,
            ),
        };
        // Accept a trailing slash, nothing else after the authority.
        let authority = rest.strip_suffix('/').unwrap_or(rest);
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
            credentials,
        })
    }
}

/// `user:password`, each percent-decoded; the user name must not be empty. A user alone (the
/// form `Display` writes) has an empty password.
fn parse_credentials(userinfo: &str) -> Option<Credentials> {
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let user = percent_decode(user)?;
    let password = percent_decode(password)?;
    (!user.is_empty()).then_some(Credentials { user, password })
}

/// Decodes `%XX` escapes; `None` for a broken escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            let hex = std::str::from_utf8(&hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// `http://host:port`, or `http://user@host:port` with credentials: never the password.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.user() {
            Some(user) => write!(f, "http://{user}@{}", authority(&self.host, self.port)),
            None => write!(f, "http://{}", authority(&self.host, self.port)),
        }
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
    /// 407 to a request without credentials: the proxy wants them.
    #[error(
        "the proxy {proxy} requires authentication (407): give its user name and password in the proxy address, http://user:password@host:port"
    )]
    AuthenticationRequired {
        /// The proxy.
        proxy: String,
    },
    /// 407 to a request with Basic credentials: the proxy refused them.
    #[error(
        "the proxy {proxy} refused the credentials of user {user:?} (407): check the proxy user name and password"
    )]
    CredentialsRefused {
        /// The proxy.
        proxy: String,
        /// The user name sent.
        user: String,
    },
    /// 407 offering only schemes other than Basic (Negotiate, NTLM, Digest).
    #[error(
        "the proxy {proxy} accepts only {schemes} authentication, which Beckon does not speak (it sends Basic): enable Basic authentication on the proxy for agents, or allow them through without authentication"
    )]
    UnsupportedAuthentication {
        /// The proxy.
        proxy: String,
        /// The schemes the proxy offered, comma-separated.
        schemes: String,
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
                | Self::CredentialsRefused { .. }
                | Self::UnsupportedAuthentication { .. }
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

/// Opens a tunnel to `target_host:target_port` through the HTTP proxy `proxy`, already
/// connected on `stream`: sends `CONNECT` (with Basic credentials when `proxy` carries them),
/// reads the answer (at most [`MAX_RESPONSE_HEADER`] bytes, within `timeout`) and requires a
/// 2xx status.
///
/// Bytes the proxy sent after its answer header are kept and returned first by the tunnel.
pub async fn http_connect<S>(
    mut stream: S,
    proxy: &ProxyUrl,
    target_host: &str,
    target_port: u16,
    timeout: Duration,
) -> Result<PrefixedStream<S>, ProxyError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let target = authority(target_host, target_port);
    let exchange = async {
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(authorization) = proxy.authorization() {
            request.push_str(&format!("Proxy-Authorization: {authorization}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|source| ProxyError::Io {
                proxy: proxy.to_string(),
                source,
            })?;
        stream.flush().await.map_err(|source| ProxyError::Io {
            proxy: proxy.to_string(),
            source,
        })?;
        read_answer(&mut stream, proxy, &target, target_port).await
    };
    let leftover = match tokio::time::timeout(timeout, exchange).await {
        Err(_) => {
            return Err(ProxyError::TimedOut {
                proxy: proxy.to_string(),
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
    proxy: &ProxyUrl,
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
                proxy: proxy.to_string(),
                source,
            })?;
        if n == 0 {
            return Err(ProxyError::Closed {
                proxy: proxy.to_string(),
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
                    407 => Err(refused_authentication(proxy, response.headers)),
                    403 => Err(ProxyError::Forbidden {
                        proxy: proxy.to_string(),
                        target: target.to_owned(),
                        port: target_port,
                        reason,
                    }),
                    _ => Err(ProxyError::Refused {
                        proxy: proxy.to_string(),
                        target: target.to_owned(),
                        status,
                        reason,
                    }),
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEADER => {}
            Ok(httparse::Status::Partial) => {
                return Err(ProxyError::HeaderTooLarge {
                    proxy: proxy.to_string(),
                    limit: MAX_RESPONSE_HEADER,
                });
            }
            Err(e) => {
                return Err(ProxyError::Malformed {
                    proxy: proxy.to_string(),
                    detail: e.to_string(),
                });
            }
        }
    }
}

/// The error for a 407: which schemes the proxy offers (`Proxy-Authenticate`) decides between
/// "give credentials", "wrong credentials" and "a scheme Beckon does not speak".
fn refused_authentication(proxy: &ProxyUrl, headers: &[httparse::Header<'_>]) -> ProxyError {
    let schemes: Vec<String> = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("proxy-authenticate"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .filter_map(|v| v.split_whitespace().next())
        .map(|scheme| scheme.trim_end_matches(',').to_owned())
        .collect();
    let basic_offered =
        schemes.is_empty() || schemes.iter().any(|s| s.eq_ignore_ascii_case("basic"));
    let name = proxy.to_string();
    match proxy.user() {
        _ if !basic_offered => ProxyError::UnsupportedAuthentication {
            proxy: name,
            schemes: schemes.join(", "),
        },
        Some(user) => ProxyError::CredentialsRefused {
            proxy: name,
            user: user.to_owned(),
        },
        None => ProxyError::AuthenticationRequired { proxy: name },
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
            ("http://:pw@proxy:3128", "http://user:password@host:port"),
            ("http://u:p%4@proxy:3128", "http://user:password@host:port"),
            ("https://user:secret@proxy:3128", "only http://"),
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
            assert!(!err.to_string().contains("secret"), "{input}: {err}");
        }
    }

    #[test]
    fn credentials_are_decoded_and_never_shown() {
        let p: ProxyUrl = "http://alice:s%40cr%3Aet@proxy.example:3128"
            .parse()
            .expect("valid");
        assert_eq!(p.user(), Some("alice"));
        assert_eq!(p.to_string(), "http://alice@proxy.example:3128");
        let debug = format!("{p:?}");
        assert!(
            !debug.contains("s@cr:et") && !debug.contains("s%40"),
            "{debug}"
        );
        assert!(
            debug.contains("alice") && debug.contains("redacted"),
            "{debug}"
        );
        // base64("alice:s@cr:et")
        assert_eq!(
            p.authorization().as_deref(),
            Some("Basic YWxpY2U6c0BjcjpldA==")
        );
        // The stored form (without the password) names the same proxy and user.
        assert_eq!(p.to_string().parse::<ProxyUrl>(), Ok(p.clone()));
        assert_ne!(p, ProxyUrl::new("proxy.example", 3128));
        assert_eq!(
            ProxyUrl::redact("http://alice:pw@proxy:3128"),
            "http://alice@proxy:3128"
        );
        assert_eq!(ProxyUrl::redact("http://proxy:3128"), "http://proxy:3128");
        assert!(!ProxyUrl::redact("http://alice:pw%z@proxy:3128").contains("pw"));
    }

    /// Runs `http_connect` against a scripted proxy that answers `answer` and returns what the
    /// proxy received.
    async fn scripted(
        answer: &'static [u8],
    ) -> (
        Result<PrefixedStream<tokio::io::DuplexStream>, ProxyError>,
        Vec<u8>,
    ) {
        scripted_as(ProxyUrl::new("proxy", 3128), answer).await
    }

    /// Like [`scripted`], connecting to `proxy` (with its credentials, if any).
    async fn scripted_as(
        url: ProxyUrl,
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
        let result =
            http_connect(client, &url, "broker.example", 8883, Duration::from_secs(5)).await;
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
    async fn sends_basic_credentials_and_names_their_refusal() {
        let proxy = ProxyUrl::new("proxy", 3128).with_credentials("alice", "secret");
        let (result, request) = scripted_as(
            proxy.clone(),
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n\r\n",
        )
        .await;
        let request = String::from_utf8(request).expect("ascii");
        assert!(
            request.contains("\r\nProxy-Authorization: Basic YWxpY2U6c2VjcmV0\r\n"),
            "{request}"
        );
        let text = result.expect_err("407").to_string();
        assert!(
            text.contains("refused the credentials of user \"alice\""),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
        let (result, _) = scripted_as(
            proxy,
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate\r\nProxy-Authenticate: NTLM\r\n\r\n",
        )
        .await;
        let text = result.expect_err("407").to_string();
        assert!(
            text.contains("accepts only Negotiate, NTLM authentication"),
            "{text}"
        );
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
        let err = http_connect(
            client,
            &ProxyUrl::new("proxy", 3128),
            "b",
            443,
            Duration::from_millis(200),
        )
        .await
        .expect_err("silent");
        assert!(matches!(err, ProxyError::TimedOut { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_closing_proxy_is_reported() {
        let (client, server) = duplex(1024);
        drop(server);
        let err = http_connect(
            client,
            &ProxyUrl::new("proxy", 3128),
            "b",
            443,
            Duration::from_secs(2),
        )
        .await
        .expect_err("closed");
        assert!(
            matches!(err, ProxyError::Closed { .. } | ProxyError::Io { .. }),
            "{err}"
        );
    }
}
