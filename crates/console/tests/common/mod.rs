//! Test helpers: a console with an API client, raw MQTT peers; Mosquitto (killed on drop)
//! from beckon-testkit.
#![allow(dead_code)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use beckon_console::{Console, ConsoleConfig, ConsoleHandle};
use beckon_mqtt::{Packet, ProtocolVersion};
use bytes::BytesMut;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;

// Not every test program uses every one.
#[allow(unused_imports)]
pub use beckon_testkit::Mosquitto;

/// Every wait is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Api {
    pub handle: ConsoleHandle,
    pub router: axum::Router,
    pub token: String,
    pub dir: tempfile::TempDir,
}

pub async fn start_with(f: impl FnOnce(&mut ConsoleConfig)) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ConsoleConfig::new(dir.path().join("data"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    f(&mut config);
    let handle = Console::start(config).await.unwrap();
    let token = handle.create_api_token("tests").await.unwrap();
    let router = beckon_console::api::router(handle.state.clone());
    Api {
        handle,
        router,
        token,
        dir,
    }
}

impl Api {
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", self.token));
        let req = match body {
            Some(v) => {
                b = b.header("content-type", "application/json");
                b.body(Body::from(v.to_string())).unwrap()
            }
            None => b.body(Body::empty()).unwrap(),
        };
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, v)
    }

    /// Enrolls `id` with inventory `inv`; returns the enrollment response.
    pub async fn enroll(&self, id: &str, inv: Value) -> Value {
        self.enroll_with_key(id, inv, &rcgen::KeyPair::generate().unwrap())
            .await
    }

    /// Like [`Api::enroll`] with the agent's own key pair.
    pub async fn enroll_with_key(&self, id: &str, inv: Value, key: &rcgen::KeyPair) -> Value {
        let (_, t) = self
            .call(
                "POST",
                "/api/v1/enrollment-tokens",
                Some(serde_json::json!({})),
            )
            .await;
        let (s, e) = self
            .call(
                "POST",
                "/api/v1/enroll",
                Some(serde_json::json!({"token": t["token"], "agent_id": id, "csr": csr_for(key), "inventory": inv})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{e}");
        e
    }
}

pub fn csr() -> String {
    csr_for(&rcgen::KeyPair::generate().unwrap())
}

pub fn csr_for(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

/// A raw MQTT 5 client.
pub struct Peer<S = TcpStream> {
    stream: S,
    buf: BytesMut,
}

impl Peer<TcpStream> {
    pub async fn connect(port: u16) -> Self {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .unwrap()
            .unwrap();
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Peer<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        beckon_mqtt::encode(&p, ProtocolVersion::V5, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn recv_within(&mut self, limit: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(p) =
                beckon_mqtt::decode(&mut self.buf, ProtocolVersion::V5, 1 << 20).unwrap()
            {
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    pub async fn recv(&mut self) -> Packet {
        self.recv_within(WAIT)
            .await
            .expect("a packet within the wait")
    }
}
