//! A small HTTP/1.1 client for talking to the console: one request per connection
//! (`Connection: close`), over plain TCP or TLS (`beckon-net`'s client, so trust works as
//! for the broker: a CA file or the system store), the answer's status and body returned.
//! Used for enrollment and check-ins; every step is bounded by a timeout.

use std::fmt;
use std::time::Duration;

use beckon_net::{TcpOptions, TlsClient};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest answer read (headers and body).
const MAX_RESPONSE: usize = 1024 * 1024;

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (loopback and development).
    Http,
    /// HTTP over TLS.
    Https,
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
        let default_port = match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
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
                "" => default_port,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| bad("bad port"))?,
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| bad("bad port"))?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad("empty host or port 0"));
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
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        format!("{scheme}://{}", self.host_header())
    }

    fn host_header(&self) -> String {
        let default = match self.scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// The body (chunked encoding undone).
    pub body: Vec<u8>,
}

impl Response {
    /// The `error` field of a JSON error body, else the body as text (shortened).
    pub fn error_message(&self) -> String {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.body)
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

/// Why a request got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The name did not resolve.
    #[error(transparent)]
    Resolve(#[from] beckon_net::ResolveError),
    /// No TCP connection.
    #[error(transparent)]
    Connect(#[from] beckon_net::TcpError),
    /// The TLS handshake failed.
    #[error(transparent)]
    Tls(#[from] beckon_net::TlsError),
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
    /// No complete answer within the time limit.
    #[error("{url} gave no complete answer within {after:?}")]
    TimedOut {
        /// The URL.
        url: String,
        /// The limit.
        after: Duration,
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

/// Sends one request with a JSON body (`body` empty: none) and returns the answer.
/// `tls` is needed for `https://` URLs. The whole exchange is bounded by `limit`.
pub async fn request(
    url: &Url,
    method: &str,
    headers: &[(&str, String)],
    body: &[u8],
    tls: Option<&TlsClient>,
    limit: Duration,
) -> Result<Response, HttpError> {
    match tokio::time::timeout(limit, exchange(url, method, headers, body, tls, limit)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::TimedOut {
            url: url.to_string(),
            after: limit,
        }),
    }
}

async fn exchange(
    url: &Url,
    method: &str,
    headers: &[(&str, String)],
    body: &[u8],
    tls: Option<&TlsClient>,
    limit: Duration,
) -> Result<Response, HttpError> {
    let addrs = beckon_net::resolve(&url.host, url.port, limit).await?;
    let options = TcpOptions {
        connect_timeout: limit,
        ..TcpOptions::default()
    };
    let (tcp, _) = beckon_net::connect_addrs(&url.host, &addrs, &options).await?;
    let request = request_head(url, method, headers, body.len());
    match url.scheme {
        Scheme::Http => talk(tcp, url, &request, body).await,
        Scheme::Https => {
            let tls = tls.ok_or_else(|| HttpError::NoTls(url.to_string()))?;
            let (stream, _) = tls.connect(tcp, &url.host, &["http/1.1"], limit).await?;
            talk(stream, url, &request, body).await
        }
    }
}

fn request_head(url: &Url, method: &str, headers: &[(&str, String)], body_len: usize) -> String {
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: beckon-agent/{}\r\nAccept: application/json\r\nConnection: close\r\n",
        url.path,
        url.host_header(),
        env!("CARGO_PKG_VERSION"),
    );
    if body_len > 0 || method != "GET" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {body_len}\r\n"
        ));
    }
    for (name, value) in headers {
        let clean: String = value.chars().filter(|c| !c.is_control()).collect();
        head.push_str(&format!("{name}: {clean}\r\n"));
    }
    head.push_str("\r\n");
    head
}

async fn talk<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    url: &Url,
    head: &str,
    body: &[u8],
) -> Result<Response, HttpError> {
    let io = |e: std::io::Error| HttpError::Io {
        url: url.to_string(),
        detail: e.to_string(),
    };
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(body).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(response) = parse_complete(&buf, url, false)? {
            return Ok(response);
        }
        let n = match stream.read(&mut chunk).await {
            Ok(n) => n,
            // A TLS peer that closes without close_notify: what arrived is the answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(io(e)),
        };
        if n == 0 {
            return parse_complete(&buf, url, true)?.ok_or_else(|| HttpError::NotHttp {
                url: url.to_string(),
                detail: if buf.is_empty() {
                    "the connection closed without an answer".into()
                } else {
                    "the answer ended early".into()
                },
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(HttpError::NotHttp {
                url: url.to_string(),
                detail: "the answer is larger than 1 MiB".into(),
            });
        }
    }
}

/// The response if `buf` holds all of it; at `eof`, whatever body arrived counts.
fn parse_complete(buf: &[u8], url: &Url, eof: bool) -> Result<Option<Response>, HttpError> {
    let not_http = |detail: String| HttpError::NotHttp {
        url: url.to_string(),
        detail,
    };
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut slots);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(not_http(e.to_string())),
    };
    let status = parsed.code.unwrap_or(0);
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let rest = &buf[head_len..];
    if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        return match dechunk(rest) {
            Some(body) => Ok(Some(Response { status, body })),
            None if eof => Err(not_http("the chunked answer ended early".into())),
            None => Ok(None),
        };
    }
    if let Some(len) = header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| not_http(format!("bad Content-Length {len:?}")))?;
        if rest.len() >= len {
            return Ok(Some(Response {
                status,
                body: rest[..len].to_vec(),
            }));
        }
        return if eof {
            Err(not_http(
                "the answer is shorter than its Content-Length".into(),
            ))
        } else {
            Ok(None)
        };
    }
    // No length: the body runs to the end of the connection (or there is none).
    if eof || status == 204 || status == 304 {
        return Ok(Some(Response {
            status,
            body: rest.to_vec(),
        }));
    }
    Ok(None)
}

/// Undoes chunked transfer encoding; `None` while incomplete or malformed.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        if data.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
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

    fn url() -> Url {
        Url::parse("http://127.0.0.1:1/").expect("url")
    }

    #[test]
    fn answers_with_length_chunks_or_eof() {
        let r = parse_complete(
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}",
            &url(),
            false,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!((r.status, r.body.as_slice()), (201, &b"{}"[..]));
        let partial = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab";
        assert!(
            parse_complete(partial, &url(), false)
                .expect("ok")
                .is_none()
        );
        assert!(parse_complete(partial, &url(), true).is_err());
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let r = parse_complete(chunked, &url(), false)
            .expect("ok")
            .expect("complete");
        assert_eq!(r.body, b"abcde");
        let r = parse_complete(b"HTTP/1.1 200 OK\r\n\r\nrest", &url(), true)
            .expect("ok")
            .expect("complete");
        assert_eq!(r.body, b"rest");
        assert!(parse_complete(b"\x16\x03\x01 garbage\r\n\r\n", &url(), false).is_err());
    }

    #[test]
    fn error_messages_come_from_the_json_body() {
        let r = Response {
            status: 401,
            body: br#"{"error":"the enrollment token is not known"}"#.to_vec(),
        };
        assert_eq!(r.error_message(), "the enrollment token is not known");
        let r = Response {
            status: 502,
            body: b"Bad Gateway".to_vec(),
        };
        assert_eq!(r.error_message(), "Bad Gateway");
    }
}
