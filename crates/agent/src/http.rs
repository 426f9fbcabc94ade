//! Talking to the console (enrollment, check-ins, renewals, `beckon wake`): beckon-net's HTTP
//! client with the agent's user agent and trust (a CA file or the system store), JSON in and
//! out, every exchange bounded by a time limit.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use beckon_net::http::{HttpClient, HttpError, Response, Scheme, Url};
use beckon_net::http::{HttpSettings, Request};
use beckon_net::{TlsClient, TlsConfigError, TlsSettings, TrustAnchors};

/// Largest answer accepted from the console.
const MAX_RESPONSE: usize = 1024 * 1024;

/// The agent's `User-Agent`, to the console and to the local HTTP action.
pub const USER_AGENT: &str = concat!("beckon-agent/", env!("CARGO_PKG_VERSION"));

/// The client for the console at `url`: for `https://`, TLS trusting `ca_file` (the system
/// store when `None`).
pub fn console_client(url: &Url, ca_file: Option<&Path>) -> Result<HttpClient, TlsConfigError> {
    let tls = match url.scheme {
        Scheme::Http => None,
        Scheme::Https => Some(Arc::new(TlsClient::new(&TlsSettings {
            trust: match ca_file {
                Some(f) => TrustAnchors::CaFile(f.to_path_buf()),
                None => TrustAnchors::System,
            },
            ..TlsSettings::default()
        })?)),
    };
    Ok(HttpClient::new(HttpSettings {
        tls,
        max_body: MAX_RESPONSE,
        user_agent: USER_AGENT.to_owned(),
        ..HttpSettings::default()
    }))
}

/// Sends one request with a JSON body (`body` empty: none for `GET`) and returns the answer;
/// the whole exchange is bounded by `limit`.
pub async fn request(
    client: &HttpClient,
    url: &Url,
    method: &str,
    headers: &[(&str, String)],
    body: &[u8],
    limit: Duration,
) -> Result<Response, HttpError> {
    let request = json_request(method, headers, body)?.header("Accept", "application/json");
    client.request(url, request, limit).await
}

/// A `method` request with `headers` and the JSON `body` (none for a `GET` without one).
pub fn json_request(
    method: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<Request, HttpError> {
    let mut request = Request::new(method)?;
    for (name, value) in headers {
        request = request.header(name, value);
    }
    if !body.is_empty() || method != "GET" {
        request = request.json(body.to_vec());
    }
    Ok(request)
}
