//! A fleet for tests of console processes: plain HTTP/1.1 requests to a console, and
//! simulated agents (MQTT clients with the certificates the console's enrollment API issued)
//! that count the wake-ups they receive and acknowledge each. Every wait is bounded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use beckon_mqtt::{
    Ack, Connect, Packet, Properties, ProtocolVersion, Publish, QoS, RetainHandling, Subscribe,
    Subscription, SubscriptionOptions,
};
use bytes::{Bytes, BytesMut};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 request to the console; returns status, body and a `set-cookie` value.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    auth: &str,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        s.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = match tokio::time::timeout(Duration::from_secs(15), exchange).await {
        Ok(Ok(r)) => r,
        // Status 0: no answer (the console is down or restarting).
        Ok(Err(e)) => return (0, Value::String(format!("{method} {path}: {e}")), None),
        Err(_) => {
            return (
                0,
                Value::String(format!("{method} {path}: no answer")),
                None,
            );
        }
    };
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let cookie = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("set-cookie").then(|| {
            value
                .trim()
                .split(';')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
    });
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::Null),
        cookie,
    )
}

/// An enrolled agent's identity.
pub struct Identity {
    pub id: String,
    pub cert: String,
    pub key: String,
}

impl Identity {
    /// The identity the console's answer to an enrollment request gives.
    pub fn enrolled(id: String, key: String, answer: &Value) -> Self {
        Self {
            id,
            cert: answer["certificate"].as_str().unwrap().to_owned(),
            key,
        }
    }
}

/// A new key pair, as `beckon agent enroll` makes one, and the enrollment request for agent
/// `id` with `token`: (the private key in PEM, the request body).
pub fn enrollment_request(id: &str, token: &str) -> (String, Value) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let body = json!({"token": token, "agent_id": id, "csr": csr, "inventory": {"hostname": id}});
    (key.serialize_pem(), body)
}

/// Wake-ups received, per agent: wake-up id -> how many times.
pub type Received = Arc<Mutex<HashMap<String, HashMap<String, u32>>>>;

/// A simulated agent: connects with its certificate (persistent session, like the real
/// agent), subscribes to its wake topic, and for each wake-up counts it and acks
/// `received`, `started` and `finished`. Reconnects until `stop`.
pub async fn sim_agent(
    who: Identity,
    ca: PathBuf,
    port: u16,
    received: Received,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let tls = beckon_net::TlsClient::new(&beckon_net::TlsSettings {
        trust: beckon_net::TrustAnchors::CaFile(ca),
        identity: Some(beckon_net::ClientIdentity::Pem {
            cert: who.cert.clone().into_bytes(),
            key: who.key.clone().into_bytes(),
        }),
        ..Default::default()
    })
    .expect("tls client");
    loop {
        tokio::select! {
            () = session(&who.id, &tls, port, &received) => {}
            _ = stop.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn session(id: &str, tls: &beckon_net::TlsClient, port: u16, received: &Received) {
    let Ok(Ok(tcp)) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return;
    };
    let Ok((mut stream, _)) = tls
        .connect(tcp, "127.0.0.1", &["mqtt"], Duration::from_secs(10))
        .await
    else {
        return;
    };
    let send = |p: Packet| {
        let mut b = BytesMut::new();
        beckon_mqtt::encode(&p, ProtocolVersion::V5, &mut b).expect("encode");
        b
    };
    let mut out = send(Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start: false,
        keep_alive: 60,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::from(beckon_mqtt::PropertySet {
            session_expiry_interval: Some(3600),
            ..Default::default()
        }),
    })));
    out.extend_from_slice(&send(Packet::Subscribe(Subscribe {
        packet_id: 1,
        subscriptions: vec![Subscription {
            filter: format!("agents/{id}/wake"),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: RetainHandling::DoNotSend,
            },
        }],
        properties: Properties::default(),
    })));
    if stream.write_all(&out).await.is_err() {
        return;
    }
    let mut buf = BytesMut::new();
    let mut next_id: u16 = 10;
    loop {
        let packet = match beckon_mqtt::decode(&mut buf, ProtocolVersion::V5, 1 << 20) {
            Ok(Some(p)) => p,
            Ok(None) => match stream.read_buf(&mut buf).await {
                Ok(n) if n > 0 => continue,
                _ => return,
            },
            Err(_) => return,
        };
        let Packet::Publish(p) = packet else {
            continue;
        };
        let mut reply = BytesMut::new();
        if let Some(pid) = p.packet_id {
            reply.extend_from_slice(&send(Packet::PubAck(Ack::new(pid))));
        }
        let wakeup_id = serde_json::from_slice::<Value>(&p.payload)
            .ok()
            .and_then(|e| e["wakeup"].as_str().map(str::to_owned))
            .and_then(|inner| serde_json::from_str::<Value>(&inner).ok())
            .and_then(|w| w["id"].as_str().map(str::to_owned))
            .expect("a signed wake-up with an id");
        *received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_default()
            .entry(wakeup_id.clone())
            .or_default() += 1;
        let now = 1_795_000_000_000_i64;
        for ack in [
            json!({"wakeup_id": wakeup_id, "stage": "received", "at": now}),
            json!({"wakeup_id": wakeup_id, "stage": "started", "at": now}),
            json!({"wakeup_id": wakeup_id, "stage": "finished", "status": "ok", "duration_ms": 1, "at": now}),
        ] {
            next_id = next_id.wrapping_add(1).max(10);
            reply.extend_from_slice(&send(Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: format!("agents/{id}/ack"),
                packet_id: Some(next_id),
                payload: Bytes::from(ack.to_string()),
                properties: Properties::default(),
            })));
        }
        if stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}
