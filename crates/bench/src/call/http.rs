//! The console's API on loopback for the call bench, over beckon-net's HTTP client: one
//! kept-alive connection per client (thousands of enrollments would otherwise leave
//! thousands of sockets in TIME_WAIT), and a Server-Sent Events reader.

use std::net::SocketAddr;
use std::time::Duration;

use beckon_net::http::{self as net_http, HttpConnection, HttpSettings, Request, Scheme, Url};

pub use beckon_net::http::{HttpError, Response};

/// Largest answer read (the deliveries of a 19,000-agent call are a few MB).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// One kept-alive HTTP connection to the console.
pub struct HttpClient {
    origin: Url,
    client: net_http::HttpClient,
    conn: Option<HttpConnection>,
    /// Extra headers on every request (authorization).
    pub headers: Vec<(String, String)>,
}

impl HttpClient {
    /// A client for the console at `addr` (connects on first use).
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            origin: Url {
                scheme: Scheme::Http,
                host: addr.ip().to_string(),
                port: addr.port(),
                path: "/".to_owned(),
            },
            client: net_http::HttpClient::new(HttpSettings {
                max_body: MAX_BODY,
                user_agent: "beckon-bench".to_owned(),
                ..HttpSettings::default()
            }),
            conn: None,
            headers: Vec::new(),
        }
    }

    /// Sends the bearer token on every request from now on.
    pub fn set_bearer(&mut self, token: &str) {
        self.headers.retain(|(n, _)| n != "Authorization");
        self.headers
            .push(("Authorization".into(), format!("Bearer {token}")));
    }

    fn build(&self, method: &str, body: Option<&serde_json::Value>) -> Result<Request, HttpError> {
        let mut request =
            Request::new(method)?.header("Accept", "application/json, text/event-stream");
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        if let Some(body) = body {
            request = request.json(body.to_string());
        }
        Ok(request)
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
        let request = self.build(method, body)?;
        let origin = self.origin.clone();
        let attempt = async {
            let reused = self.conn.as_ref().is_some_and(|c| !c.is_closed());
            let first = self.send(path, request.clone(), limit).await;
            match first {
                Err(HttpError::Closed { .. } | HttpError::Io { .. }) if reused => {
                    self.conn = None;
                    self.send(path, request, limit).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(r) => r,
            Err(_) => {
                self.conn = None;
                Err(HttpError::TimedOut {
                    url: origin.with_path(path).to_string(),
                    after: limit,
                })
            }
        }
    }

    async fn send(
        &mut self,
        path: &str,
        request: Request,
        limit: Duration,
    ) -> Result<Response, HttpError> {
        let conn = match self.conn.take() {
            Some(conn) if !conn.is_closed() => conn,
            _ => self.client.connect(&self.origin).await?,
        };
        let conn = self.conn.insert(conn);
        let result = conn.send(path, request, limit).await;
        if result.is_err() || conn.is_closed() {
            self.conn = None;
        }
        result
    }

    /// Opens a Server-Sent Events stream (`GET path`); the connection is then the stream's.
    pub async fn open_events(
        mut self,
        path: &str,
        limit: Duration,
    ) -> Result<EventStream, HttpError> {
        let request = self.build("GET", None)?;
        let conn = match self.conn.take() {
            Some(conn) if !conn.is_closed() => conn,
            _ => self.client.connect(&self.origin).await?,
        };
        let body = conn.open(path, request, limit).await?;
        if body.status != 200 {
            return Err(HttpError::NotHttp {
                url: self.origin.with_path(path).to_string(),
                detail: format!("GET {path} answered {}", body.status),
            });
        }
        Ok(EventStream {
            body,
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
    body: net_http::BodyStream,
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
            match self.body.next_chunk().await {
                Ok(Some(chunk)) => self.text.extend_from_slice(&chunk),
                Ok(None) | Err(HttpError::Closed { .. }) => return Ok(None),
                Err(e) => return Err(e),
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
