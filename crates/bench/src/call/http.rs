//! A small HTTP/1.1 client for the console's API on loopback: one kept-alive connection per
//! client (thousands of enrollments would otherwise leave thousands of sockets in TIME_WAIT),
//! bodies by `Content-Length` or chunked, and a Server-Sent Events reader.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest answer read (the deliveries of a 19,000-agent call are a few MB).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The connection could not be made or broke.
    #[error("console at {addr}: {error}")]
    Io {
        /// The console's address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
    /// The console closed the connection before a whole answer.
    #[error("console at {0} closed the connection before a whole answer")]
    Closed(SocketAddr),
    /// The answer is not HTTP this client understands.
    #[error("console at {addr} answered something unreadable: {detail}")]
    Malformed {
        /// The console's address.
        addr: SocketAddr,
        /// What was wrong.
        detail: String,
    },
    /// No whole answer in time.
    #[error("console at {addr} gave no answer to {what} within {after:?}")]
    TimedOut {
        /// The console's address.
        addr: SocketAddr,
        /// The request.
        what: String,
        /// The bound.
        after: Duration,
    },
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The `error` field of a JSON error body, or the start of the body.
    pub fn error_text(&self) -> String {
        if let Ok(v) = self.json()
            && let Some(e) = v.get("error").and_then(|e| e.as_str())
        {
            return e.to_owned();
        }
        String::from_utf8_lossy(&self.body)
            .chars()
            .take(300)
            .collect()
    }
}

/// How a body is framed.
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// One kept-alive HTTP connection to the console.
pub struct HttpClient {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: BytesMut,
    /// Extra headers on every request (authorization).
    pub headers: Vec<(String, String)>,
}

impl HttpClient {
    /// A client for the console at `addr` (connects on first use).
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            stream: None,
            buf: BytesMut::with_capacity(16 * 1024),
            headers: Vec::new(),
        }
    }

    /// Sends the bearer token on every request from now on.
    pub fn set_bearer(&mut self, token: &str) {
        self.headers.retain(|(n, _)| n != "Authorization");
        self.headers
            .push(("Authorization".into(), format!("Bearer {token}")));
    }

    fn io(&self, error: std::io::Error) -> HttpError {
        HttpError::Io {
            addr: self.addr,
            error,
        }
    }

    async fn stream(&mut self) -> Result<&mut TcpStream, HttpError> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .map_err(|e| self.io(e))?;
            let _ = s.set_nodelay(true);
            self.stream = Some(s);
            self.buf.clear();
        }
        self.stream.as_mut().ok_or(HttpError::Closed(self.addr))
    }

    /// One request with an optional JSON body, bounded by `limit`. A connection the console
    /// closed while idle is opened again once.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        limit: Duration,
    ) -> Result<Response, HttpError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let what = format!("{method} {path}");
        let addr = self.addr;
        let attempt = async {
            let reused = self.stream.is_some();
            match self.exchange(method, path, body.as_deref()).await {
                Err(HttpError::Closed(_) | HttpError::Io { .. }) if reused => {
                    self.stream = None;
                    self.exchange(method, path, body.as_deref()).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(r) => r,
            Err(_) => {
                self.stream = None;
                Err(HttpError::TimedOut {
                    addr,
                    what,
                    after: limit,
                })
            }
        }
    }

    fn head(&self, method: &str, path: &str, body_len: Option<usize>) -> String {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: beckon-bench\r\nAccept: application/json, text/event-stream\r\n",
            self.addr
        );
        if let Some(len) = body_len {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {len}\r\n"
            ));
        }
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        let (status, headers, framing) = self.send_and_read_head(method, path, body).await?;
        let body = match framing {
            Framing::Length(n) => {
                while self.buf.len() < n {
                    self.fill().await?;
                }
                self.buf.split_to(n).to_vec()
            }
            Framing::Chunked => {
                let mut out = Vec::new();
                while let Some(chunk) = self.next_chunk().await? {
                    out.extend_from_slice(&chunk);
                    if out.len() > MAX_BODY {
                        return Err(self.malformed("the body is larger than 64 MiB"));
                    }
                }
                out
            }
            Framing::UntilClose => {
                loop {
                    match self.fill().await {
                        Ok(()) => {}
                        Err(HttpError::Closed(_)) => break,
                        Err(e) => return Err(e),
                    }
                }
                self.stream = None;
                self.buf.split().to_vec()
            }
        };
        let close = headers
            .iter()
            .any(|(n, v)| n == "connection" && v.eq_ignore_ascii_case("close"));
        if close {
            self.stream = None;
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn malformed(&self, detail: impl Into<String>) -> HttpError {
        HttpError::Malformed {
            addr: self.addr,
            detail: detail.into(),
        }
    }

    async fn fill(&mut self) -> Result<(), HttpError> {
        let addr = self.addr;
        if self.buf.len() > MAX_BODY {
            return Err(self.malformed("the answer is larger than 64 MiB"));
        }
        self.stream().await?;
        let Some(stream) = self.stream.as_mut() else {
            return Err(HttpError::Closed(addr));
        };
        match stream.read_buf(&mut self.buf).await {
            Ok(0) => {
                self.stream = None;
                Err(HttpError::Closed(addr))
            }
            Ok(_) => Ok(()),
            Err(e) => {
                self.stream = None;
                Err(HttpError::Io { addr, error: e })
            }
        }
    }

    async fn send_and_read_head(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<(String, String)>, Framing), HttpError> {
        let mut request = self.head(method, path, body.map(<[u8]>::len)).into_bytes();
        request.extend_from_slice(body.unwrap_or_default());
        self.buf.clear();
        let addr = self.addr;
        let stream = self.stream().await?;
        stream
            .write_all(&request)
            .await
            .map_err(|error| HttpError::Io { addr, error })?;
        loop {
            let parsed = {
                let mut slots = [httparse::EMPTY_HEADER; 32];
                let mut resp = httparse::Response::new(&mut slots);
                match resp.parse(&self.buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let headers: Vec<(String, String)> = resp
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_ascii_lowercase(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect();
                        Some((n, resp.code.unwrap_or(0), headers))
                    }
                    Ok(httparse::Status::Partial) => None,
                    Err(e) => return Err(self.malformed(e.to_string())),
                }
            };
            if let Some((n, status, headers)) = parsed {
                self.buf.advance(n);
                let get = |name: &str| {
                    headers
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                };
                let framing = if get("transfer-encoding")
                    .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
                {
                    Framing::Chunked
                } else if let Some(len) = get("content-length") {
                    let n = len
                        .trim()
                        .parse::<usize>()
                        .map_err(|_| self.malformed(format!("Content-Length {len:?}")))?;
                    if n > MAX_BODY {
                        return Err(self.malformed("the body is larger than 64 MiB"));
                    }
                    Framing::Length(n)
                } else if method == "HEAD" || status == 204 || status == 304 {
                    Framing::Length(0)
                } else {
                    Framing::UntilClose
                };
                return Ok((status, headers, framing));
            }
            self.fill().await?;
        }
    }

    /// The next chunk of a chunked body; `None` after the last one.
    async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, HttpError> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let size_text = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16)
                    .map_err(|_| self.malformed(format!("chunk size {line:?}")))?;
                if size > MAX_BODY {
                    return Err(self.malformed("a chunk larger than 64 MiB"));
                }
                // size line, data, CRLF (for the last chunk: the trailer's empty line).
                let need = end + 2 + size + 2;
                while self.buf.len() < need {
                    self.fill().await?;
                }
                self.buf.advance(end + 2);
                let data = self.buf.split_to(size).to_vec();
                self.buf.advance(2);
                return Ok((size > 0).then_some(data));
            }
            self.fill().await?;
        }
    }

    /// Opens a Server-Sent Events stream (`GET path`); the connection is then the stream's.
    pub async fn open_events(
        mut self,
        path: &str,
        limit: Duration,
    ) -> Result<EventStream, HttpError> {
        let addr = self.addr;
        let head = tokio::time::timeout(limit, self.send_and_read_head("GET", path, None))
            .await
            .map_err(|_| HttpError::TimedOut {
                addr,
                what: format!("GET {path}"),
                after: limit,
            })??;
        let (status, _, framing) = head;
        if status != 200 {
            return Err(self.malformed(format!("GET {path} answered {status}")));
        }
        Ok(EventStream {
            chunked: matches!(framing, Framing::Chunked),
            client: self,
            text: Vec::new(),
        })
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEvent {
    /// `event:` (empty when absent).
    pub event: String,
    /// `data:` lines joined.
    pub data: String,
}

/// A Server-Sent Events stream.
pub struct EventStream {
    client: HttpClient,
    chunked: bool,
    text: Vec<u8>,
}

impl EventStream {
    /// The next event; `None` when the stream ended. Cancel safe only between events: call
    /// it from one task.
    pub async fn next(&mut self) -> Result<Option<ServerEvent>, HttpError> {
        loop {
            if let Some(end) = find_event_end(&self.text) {
                let raw: Vec<u8> = self.text.drain(..end.0 + end.1).collect();
                let block = String::from_utf8_lossy(&raw[..end.0]).into_owned();
                let mut event = ServerEvent {
                    event: String::new(),
                    data: String::new(),
                };
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event.event = v.trim_start().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if !event.data.is_empty() {
                            event.data.push('\n');
                        }
                        event.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if event.event.is_empty() && event.data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                return Ok(Some(event));
            }
            if self.chunked {
                match self.client.next_chunk().await {
                    Ok(Some(chunk)) => self.text.extend_from_slice(&chunk),
                    Ok(None) | Err(HttpError::Closed(_)) => return Ok(None),
                    Err(e) => return Err(e),
                }
            } else {
                match self.client.fill().await {
                    Ok(()) => {
                        let all = self.client.buf.split();
                        self.text.extend_from_slice(&all);
                    }
                    Err(HttpError::Closed(_)) => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Where the first event block ends: (its length, the separator's length).
fn find_event_end(text: &[u8]) -> Option<(usize, usize)> {
    let lf = text.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = text
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_blocks_end_at_a_blank_line() {
        assert_eq!(find_event_end(b"event: a\ndata: 1\n\nrest"), Some((16, 2)));
        assert_eq!(find_event_end(b"data: 1\r\n\r\n"), Some((7, 4)));
        assert_eq!(find_event_end(b"data: 1\n"), None);
    }
}
