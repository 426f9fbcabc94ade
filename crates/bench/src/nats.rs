//! nats-server's own figures from its monitoring port (`/varz`): what a cluster's fleet costs
//! the NATS server beside the broker nodes.

use std::time::Duration;

use anyhow::Context;
use beckon_net::http::{HttpClient, HttpSettings, Request, Url};

/// Bound on one `/varz` request.
const VARZ_LIMIT: Duration = Duration::from_secs(10);
/// `/varz` is a few KiB; a larger answer is not nats-server's.
const MAX_VARZ: usize = 4 * 1024 * 1024;

/// One reading of `/varz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Varz {
    /// `mem`: the server's resident memory, bytes.
    pub mem_bytes: u64,
    /// `subscriptions`: subscriptions the server holds, over all its clients.
    pub subscriptions: u64,
    /// `connections`: client connections now.
    pub connections: u64,
}

/// Reads the three figures from a `/varz` body.
pub fn parse_varz(body: &[u8]) -> Result<Varz, String> {
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let field = |name: &str| {
        json.get(name)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("no number \"{name}\" in it: is this nats-server's /varz?"))
    };
    Ok(Varz {
        mem_bytes: field("mem")?,
        subscriptions: field("subscriptions")?,
        connections: field("connections")?,
    })
}

/// The monitoring port of one nats-server.
#[derive(Debug, Clone)]
pub struct NatsMonitor {
    url: Url,
    client: HttpClient,
}

impl NatsMonitor {
    /// The monitor at `base` (`http://HOST:PORT`, as given to nats-server's `-m`); its
    /// `/varz` is read whatever path `base` has.
    pub fn new(base: &str) -> anyhow::Result<Self> {
        let url = Url::parse(base)
            .map_err(anyhow::Error::msg)
            .context("--nats-monitor")?
            .with_path("/varz");
        let client = HttpClient::new(HttpSettings {
            max_body: MAX_VARZ,
            user_agent: "beckon-bench".to_owned(),
            ..HttpSettings::default()
        });
        Ok(Self { url, client })
    }

    /// The `/varz` URL read.
    pub fn url(&self) -> String {
        self.url.to_string()
    }

    /// Reads `/varz` now.
    pub async fn read(&self) -> anyhow::Result<Varz> {
        let response = self
            .client
            .request(&self.url, Request::get(), VARZ_LIMIT)
            .await
            .with_context(|| format!("reading {}", self.url))?;
        if response.status != 200 {
            anyhow::bail!(
                "{} answered {}: {}",
                self.url,
                response.status,
                response.error_message()
            );
        }
        parse_varz(&response.body).map_err(|e| anyhow::anyhow!("{}: {e}", self.url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memory_subscriptions_and_connections() {
        // Cut from nats-server 2.9's /varz.
        let body = br#"{
            "server_id": "NB3X", "version": "2.9.20", "mem": 13115392, "cores": 2,
            "cpu": 0.5, "connections": 3, "total_connections": 7, "routes": 0,
            "remotes": 0, "leafnodes": 0, "in_msgs": 12, "subscriptions": 57,
            "http_req_stats": {"/varz": 2}
        }"#;
        assert_eq!(
            parse_varz(body),
            Ok(Varz {
                mem_bytes: 13_115_392,
                subscriptions: 57,
                connections: 3,
            })
        );
    }

    #[test]
    fn says_what_is_wrong_with_another_answer() {
        let error = parse_varz(b"<html>").expect_err("not JSON");
        assert!(error.contains("not JSON"), "{error}");
        let error = parse_varz(br#"{"mem": 1, "connections": 0}"#).expect_err("field missing");
        assert!(error.contains("\"subscriptions\""), "{error}");
    }

    #[test]
    fn reads_varz_whatever_path_the_base_has() {
        for base in [
            "http://127.0.0.1:8222",
            "http://127.0.0.1:8222/",
            "http://127.0.0.1:8222/varz",
        ] {
            let monitor = NatsMonitor::new(base).expect("url");
            assert_eq!(monitor.url(), "http://127.0.0.1:8222/varz");
        }
        let error = NatsMonitor::new("127.0.0.1:8222").expect_err("no scheme");
        assert!(format!("{error:#}").contains("http://"), "{error:#}");
    }
}
