//! Beckon's one HTTP/1.1 client: hyper's client connection over the streams this crate's
//! connectors return (TCP, a tunnel through an HTTP proxy's `CONNECT`, TLS with the trust the
//! caller configured), so that enrollment, check-ins, renewals, the agent's local HTTP action
//! and the bench's API calls reach a server the way the broker is reached.
//!
//! Every answer is bounded: its body by a size limit, the whole exchange by a time limit.
//!
//! ```no_run
//! use std::time::Duration;
//! use beckon_net::http::{HttpClient, HttpSettings, Request, Url};
//!
//! # async fn run() -> Result<(), beckon_net::http::HttpError> {
//! let client = HttpClient::new(HttpSettings::default());
//! let url = Url::parse("http://127.0.0.1:8080/api/v1/status").expect("url");
//! let answer = client.request(&url, Request::get(), Duration::from_secs(10)).await?;
//! println!("{} {}", answer.status, String::from_utf8_lossy(&answer.body));
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::{BoxedStream, ProxyUrl, TcpOptions, TlsClient};

/// Default largest body accepted.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// Largest response head (status line and headers) read; hyper's read buffer.
const MAX_HEAD: usize = 64 * 1024;

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (loopback and development).
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }
}

/// A parsed `http(s)://host[:port][/path]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// The scheme.
    pub scheme: Scheme,
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port (80 or 443 when absent).
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Url {
    /// Parses a URL; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("{text:?} is not a usable URL: {why}");
        let (scheme, rest) = if let Some(r) = text.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (Scheme::Http, r)
        } else {
            return Err(bad("it must start with http:// or https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("write http(s)://host[:port] without user name"));
        }
        if path.contains(char::is_whitespace) || path.contains(char::is_control) {
            return Err(bad("the path contains spaces or control characters"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("missing ]"))?;
            let port = match after {
                "" => scheme.default_port(),
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| bad("bad port"))?,
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| bad("bad port"))?),
                None => (authority, scheme.default_port()),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad("empty host or port 0"));
        }
        if path.parse::<hyper::Uri>().is_err() {
            return Err(bad("the path is not a valid request target"));
        }
        Ok(Self {
            scheme,
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// The same server with another path.
    pub fn with_path(&self, path: &str) -> Self {
        Self {
            path: path.to_owned(),
            ..self.clone()
        }
    }

    /// `scheme://host[:port]`, the port only when it is not the scheme's default.
    pub fn origin(&self) -> String {
        format!("{}://{}", self.scheme.name(), self.host_header())
    }

    /// The `Host` header: `host[:port]`, IPv6 in brackets, the port only when not the
    /// scheme's default.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == self.scheme.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.scheme.name();
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// How the client reaches servers.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// The TLS client for `https://` URLs (its trust: a CA file or the system store).
    pub tls: Option<Arc<TlsClient>>,
    /// An HTTP proxy to tunnel through with `CONNECT`; `None`: connect directly.
    pub proxy: Option<ProxyUrl>,
    /// Limit for name resolution, the TCP connect, the proxy's answer and the TLS handshake,
    /// each.
    pub connect_timeout: Duration,
    /// Largest body accepted; a larger answer is refused with [`HttpError::TooLarge`].
    pub max_body: usize,
    /// The `User-Agent` header.
    pub user_agent: String,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            tls: None,
            proxy: None,
            connect_timeout: Duration::from_secs(10),
            max_body: DEFAULT_MAX_BODY,
            user_agent: concat!("beckon/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// One request: method, extra headers, body. The path and `Host` come from the URL.
#[derive(Debug, Clone)]
pub struct Request {
    method: hyper::Method,
    headers: Vec<(String, String)>,
    body: Option<Bytes>,
}

impl Request {
    /// A request with `method` (`GET`, `POST`, ...) and no body.
    pub fn new(method: &str) -> Result<Self, HttpError> {
        let method = method
            .parse::<hyper::Method>()
            .map_err(|_| HttpError::Invalid(format!("{method:?} is not an HTTP method")))?;
        Ok(Self {
            method,
            headers: Vec::new(),
            body: None,
        })
    }

    /// `GET` without a body.
    pub fn get() -> Self {
        Self {
            method: hyper::Method::GET,
            headers: Vec::new(),
            body: None,
        }
    }

    /// Adds a header; control characters in the value (which could end the header) are
    /// dropped.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let clean: String = value.chars().filter(|c| !c.is_control()).collect();
        self.headers.push((name.to_owned(), clean));
        self
    }

    /// Sets a JSON body (with its `Content-Type`, unless one was set).
    pub fn json(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        if self
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        {
            return self;
        }
        self.header("Content-Type", "application/json")
    }

    /// Sets a body as it is; give its `Content-Type` with [`Request::header`] (e.g. a
    /// form, `application/x-www-form-urlencoded`).
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// The method.
    pub fn method(&self) -> &str {
        self.method.as_str()
    }

    fn build(self, url: &Url, user_agent: &str) -> Result<hyper::Request<Full<Bytes>>, HttpError> {
        let body = self.body.unwrap_or_default();
        let mut builder = hyper::Request::builder()
            .method(self.method.clone())
            .uri(url.path.as_str())
            .header(hyper::header::HOST, url.host_header())
            .header(hyper::header::USER_AGENT, user_agent);
        // A POST without a body still says so, for servers that want a length.
        if !body.is_empty() || !matches!(self.method, hyper::Method::GET | hyper::Method::HEAD) {
            builder = builder.header(hyper::header::CONTENT_LENGTH, body.len());
        }
        for (name, value) in &self.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder
            .body(Full::new(body))
            .map_err(|e| HttpError::Invalid(format!("request to {url}: {e}")))
    }
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// The headers.
    pub headers: hyper::HeaderMap,
    /// The body (chunked encoding undone).
    pub body: Vec<u8>,
}

impl Response {
    /// A header's value, when it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The `error` field of a JSON error body, else the body as text (shortened).
    pub fn error_message(&self) -> String {
        if let Ok(v) = self.json()
            && let Some(e) = v.get("error").and_then(|e| e.as_str())
        {
            return e.to_owned();
        }
        let text = String::from_utf8_lossy(&self.body);
        let text: String = text.trim().chars().take(300).collect();
        if text.is_empty() {
            "no explanation given".to_owned()
        } else {
            text
        }
    }
}

/// Why a request got no usable HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The request itself is not valid (method or header).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The name did not resolve.
    #[error(transparent)]
    Resolve(#[from] crate::ResolveError),
    /// No TCP connection.
    #[error(transparent)]
    Connect(#[from] crate::TcpError),
    /// The proxy did not open a tunnel.
    #[error(transparent)]
    Proxy(#[from] crate::ProxyError),
    /// The TLS handshake failed.
    #[error(transparent)]
    Tls(#[from] crate::TlsError),
    /// An `https://` URL without a TLS client.
    #[error("{0} is https:// but no TLS client was set up")]
    NoTls(String),
    /// Sending or receiving failed.
    #[error("talking to {url}: {detail}")]
    Io {
        /// The URL.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The server closed the connection before a whole answer (a kept-alive connection the
    /// server closed while idle ends this way too).
    #[error("{url} closed the connection before a whole answer")]
    Closed {
        /// The URL.
        url: String,
    },
    /// No complete answer within the time limit.
    #[error("{url} gave no complete answer within {after:?}")]
    TimedOut {
        /// The URL.
        url: String,
        /// The limit.
        after: Duration,
    },
    /// The answer's body is larger than the limit.
    #[error(
        "{url} answered with a body larger than {limit} bytes; the answer was refused (raise the limit if the server is right)"
    )]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The answer is not HTTP.
    #[error("{url} did not answer HTTP ({detail}); is the scheme right (http:// or https://)?")]
    NotHttp {
        /// The URL.
        url: String,
        /// What was wrong.
        detail: String,
    },
}

/// Connects and sends; build once, use for many requests.
#[derive(Debug, Clone)]
pub struct HttpClient {
    settings: HttpSettings,
}

impl HttpClient {
    /// A client with these settings.
    pub fn new(settings: HttpSettings) -> Self {
        Self { settings }
    }

    /// The settings.
    pub fn settings(&self) -> &HttpSettings {
        &self.settings
    }

    /// One request on a connection of its own, the whole exchange (connect included)
    /// bounded by `limit`.
    pub async fn request(
        &self,
        url: &Url,
        request: Request,
        limit: Duration,
    ) -> Result<Response, HttpError> {
        let exchange = async {
            let mut conn = self.connect(url).await?;
            conn.send_unbounded(url, request).await
        };
        tokio::time::timeout(limit, exchange)
            .await
            .unwrap_or_else(|_| Err(timed_out(url, limit)))
    }

    /// Opens a connection to `url`'s server (through the proxy when one is set, with TLS for
    /// `https://`) for one or more requests.
    pub async fn connect(&self, url: &Url) -> Result<HttpConnection, HttpError> {
        let stream = self.open_stream(url).await?;
        self.handshake(stream, url).await
    }

    /// Starts HTTP/1.1 on an open `stream` to `url`'s server.
    pub(crate) async fn handshake(
        &self,
        stream: BoxedStream,
        url: &Url,
    ) -> Result<HttpConnection, HttpError> {
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD)
            // Header names as people write them (`X-Beckon-Wakeup-Id`), for servers and
            // scripts that match them by case.
            .title_case_headers(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| io_error(url, &e))?;
        // The connection's driver; aborted with the connection, so a server that never
        // answers cannot keep it alive.
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConnection {
            sender,
            driver,
            origin: url.with_path("/"),
            max_body: self.settings.max_body,
            user_agent: self.settings.user_agent.clone(),
        })
    }

    async fn open_stream(&self, url: &Url) -> Result<BoxedStream, HttpError> {
        let limit = self.settings.connect_timeout;
        let options = TcpOptions {
            connect_timeout: limit,
            ..TcpOptions::default()
        };
        let tcp: BoxedStream = match &self.settings.proxy {
            None => {
                let addrs = crate::resolve(&url.host, url.port, limit).await?;
                let (tcp, _) = crate::connect_addrs(&url.host, &addrs, &options).await?;
                Box::new(tcp)
            }
            Some(proxy) => {
                let addrs = crate::resolve(proxy.host(), proxy.port(), limit).await?;
                let (tcp, _) = crate::connect_addrs(proxy.host(), &addrs, &options).await?;
                let tunnel = crate::http_connect(tcp, proxy, &url.host, url.port, limit).await?;
                Box::new(tunnel)
            }
        };
        match url.scheme {
            Scheme::Http => Ok(tcp),
            Scheme::Https => {
                let tls = self
                    .settings
                    .tls
                    .as_ref()
                    .ok_or_else(|| HttpError::NoTls(url.to_string()))?;
                let (stream, _) = tls.connect(tcp, &url.host, &["http/1.1"], limit).await?;
                Ok(Box::new(stream))
            }
        }
    }
}

/// One open HTTP/1.1 connection: requests one after another (kept alive while the server
/// allows). Dropping it closes the connection.
pub struct HttpConnection {
    sender: SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
    origin: Url,
    max_body: usize,
    user_agent: String,
}

impl fmt::Debug for HttpConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConnection")
            .field("origin", &self.origin.origin())
            .finish_non_exhaustive()
    }
}

impl Drop for HttpConnection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl HttpConnection {
    /// True once the server (or an error) closed the connection; open a new one then.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Sends `request` for `path` and reads the whole answer within `limit`.
    pub async fn send(
        &mut self,
        path: &str,
        request: Request,
        limit: Duration,
    ) -> Result<Response, HttpError> {
        let url = self.origin.with_path(path);
        tokio::time::timeout(limit, self.send_unbounded(&url, request))
            .await
            .unwrap_or_else(|_| Err(timed_out(&url, limit)))
    }

    async fn send_unbounded(&mut self, url: &Url, request: Request) -> Result<Response, HttpError> {
        let (status, headers, mut body) = self.send_head(url, request).await?;
        let too_large = || HttpError::TooLarge {
            url: url.to_string(),
            limit: self.max_body,
        };
        let announced = headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|n| n > self.max_body as u64) {
            return Err(too_large());
        }
        let mut collected = Vec::new();
        while let Some(chunk) = next_chunk(&mut body, url).await? {
            if collected.len() + chunk.len() > self.max_body {
                return Err(too_large());
            }
            collected.extend_from_slice(&chunk);
        }
        Ok(Response {
            status,
            headers,
            body: collected,
        })
    }

    /// Sends `request` for `path` and returns once the answer's head arrived (within
    /// `limit`); the body is then read piece by piece (Server-Sent Events), without the
    /// size limit.
    pub async fn open(
        mut self,
        path: &str,
        request: Request,
        limit: Duration,
    ) -> Result<BodyStream, HttpError> {
        let url = self.origin.with_path(path);
        let (status, headers, body) = tokio::time::timeout(limit, self.send_head(&url, request))
            .await
            .unwrap_or_else(|_| Err(timed_out(&url, limit)))?;
        Ok(BodyStream {
            status,
            headers,
            body,
            url,
            _conn: self,
        })
    }

    async fn send_head(
        &mut self,
        url: &Url,
        request: Request,
    ) -> Result<(u16, hyper::HeaderMap, Incoming), HttpError> {
        let request = request.build(url, &self.user_agent)?;
        self.sender.ready().await.map_err(|e| classify(url, &e))?;
        let answer = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| classify(url, &e))?;
        let (parts, body) = answer.into_parts();
        Ok((parts.status.as_u16(), parts.headers, body))
    }
}

/// An answer whose body is read as it arrives.
#[derive(Debug)]
pub struct BodyStream {
    /// Status code.
    pub status: u16,
    /// The headers.
    pub headers: hyper::HeaderMap,
    body: Incoming,
    url: Url,
    _conn: HttpConnection,
}

impl BodyStream {
    /// The next piece of the body; `None` at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, HttpError> {
        next_chunk(&mut self.body, &self.url).await
    }
}

async fn next_chunk(body: &mut Incoming, url: &Url) -> Result<Option<Bytes>, HttpError> {
    loop {
        match body.frame().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(classify(url, &e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
                // Trailers: nothing Beckon reads.
            }
        }
    }
}

fn timed_out(url: &Url, after: Duration) -> HttpError {
    HttpError::TimedOut {
        url: url.to_string(),
        after,
    }
}

fn io_error(url: &Url, e: &hyper::Error) -> HttpError {
    HttpError::Io {
        url: url.to_string(),
        detail: error_chain(e),
    }
}

/// Sorts hyper's errors into the ones a user can act on.
fn classify(url: &Url, e: &hyper::Error) -> HttpError {
    if e.is_parse() || e.is_parse_status() || e.is_parse_too_large() {
        HttpError::NotHttp {
            url: url.to_string(),
            detail: error_chain(e),
        }
    } else if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        HttpError::Closed {
            url: url.to_string(),
        }
    } else {
        io_error(url, e)
    }
}

fn error_chain(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults() {
        let u = Url::parse("https://console.example.com").expect("url");
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.path.as_str()),
            (Scheme::Https, "console.example.com", 443, "/")
        );
        let u = Url::parse("http://[::1]:8080/api").expect("v6");
        assert_eq!((u.host.as_str(), u.port), ("::1", 8080));
        assert_eq!(u.host_header(), "[::1]:8080");
        assert!(Url::parse("ftp://x").is_err());
        assert!(Url::parse("http://user@x").is_err());
        assert!(Url::parse("http://x:0").is_err());
        assert!(Url::parse("http://x:port").is_err());
    }

    #[test]
    fn error_messages_come_from_the_json_body() {
        let answer = |status, body: &[u8]| Response {
            status,
            headers: hyper::HeaderMap::new(),
            body: body.to_vec(),
        };
        let r = answer(401, br#"{"error":"the enrollment token is not known"}"#);
        assert_eq!(r.error_message(), "the enrollment token is not known");
        assert_eq!(answer(502, b"Bad Gateway").error_message(), "Bad Gateway");
        assert_eq!(answer(500, b"").error_message(), "no explanation given");
    }

    #[test]
    fn header_values_cannot_end_the_header() {
        let request = Request::get()
            .header("X-Wakeup", "a\r\nInjected: yes")
            .build(&Url::parse("http://h/p").expect("url"), "ua")
            .expect("request");
        assert_eq!(request.headers()["x-wakeup"], "aInjected: yes");
        assert_eq!(request.headers()["host"], "h");
        assert!(Request::new("BAD METHOD").is_err());
    }
}
