//! Entry points of the fuzz targets in `fuzz/` (feature "fuzzing"); not part of the API.
//!
//! A server's answer, made of arbitrary bytes, read by each of the client's HTTP parsers: the
//! proxy's answer to `CONNECT`, the HTTP client's response (whole, or streamed), and the
//! WebSocket upgrade answer with the frames after it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::http::{HttpClient, HttpError, HttpSettings, Request, Url};
use crate::ws::{WsError, WsSettings, websocket_handshake};
use crate::{ProxyError, ProxyUrl, http_connect};

/// Longer than anything here may take: the server's side is closed, so every read ends.
const LIMIT: Duration = Duration::from_secs(5);

/// The client's end of a connection whose server already sent `answer` and closed its
/// sending side; the server's end is returned too, so that the client can still write.
async fn answered(answer: &[u8]) -> (DuplexStream, DuplexStream) {
    // Room for the answer and for all the client writes (requests, WebSocket pongs).
    let (client, mut server) = tokio::io::duplex(2 * answer.len() + 64 * 1024);
    server.write_all(answer).await.expect("the buffer holds it");
    server.shutdown().await.expect("shutdown");
    (client, server)
}

/// The first byte picks the parser; the rest is the server's answer.
pub async fn http_answers(data: &[u8]) {
    let Some((&mode, answer)) = data.split_first() else {
        return;
    };
    if mode % 4 == 3 {
        return websocket(answer).await;
    }
    let (client, _server) = answered(answer).await;
    match mode % 4 {
        0 => proxy_answer(client, answer).await,
        1 => response(client, false).await,
        _ => response(client, true).await,
    }
}

async fn proxy_answer(client: DuplexStream, answer: &[u8]) {
    // With credentials, so a 407 answer takes the path that names refused credentials.
    let proxy = ProxyUrl::new("proxy", 3128).with_credentials("agent", "secret");
    match http_connect(client, &proxy, "broker.example", 8883, LIMIT).await {
        // What followed the answer's head is passed on, unchanged: the part already read
        // first, then the rest of the stream.
        Ok(mut tunnel) => {
            let mut after_head = Vec::new();
            let _ = tunnel.read_to_end(&mut after_head).await;
            assert!(answer.ends_with(&after_head));
        }
        Err(e @ ProxyError::TimedOut { .. }) => panic!("{e}"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// One to three requests on one connection (`streamed`: the first one's body read piece by
/// piece, as Server-Sent Events are).
async fn response(client: DuplexStream, streamed: bool) {
    let settings = HttpSettings {
        max_body: 4096,
        ..HttpSettings::default()
    };
    let http = HttpClient::new(settings);
    let url = Url::parse("http://console.example:8080/").expect("url");
    let Ok(mut conn) = http.handshake(Box::new(client), &url).await else {
        return;
    };
    if streamed {
        let Ok(mut body) = conn.open("/api/v1/events", Request::get(), LIMIT).await else {
            return;
        };
        assert!((100..1000).contains(&body.status));
        for _ in 0..64 {
            match body.next_chunk().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return not_timed_out(&e),
            }
        }
        return;
    }
    for _ in 0..3 {
        let request = Request::new("POST")
            .expect("POST")
            .json(&b"{\"agent_id\":\"pc-42\"}"[..]);
        match conn.send("/api/v1/checkin", request, LIMIT).await {
            Ok(answer) => {
                assert!((100..1000).contains(&answer.status));
                assert!(answer.body.len() <= 4096);
                let _ = answer.json();
                let _ = answer.error_message();
            }
            Err(e) => return not_timed_out(&e),
        }
        if conn.is_closed() {
            return;
        }
    }
}

fn not_timed_out(e: &HttpError) {
    assert!(!matches!(e, HttpError::TimedOut { .. }), "{e}");
}

/// The upgrade answer, then MQTT bytes out of the frames that follow it. `{accept}` in the
/// answer becomes the `Sec-WebSocket-Accept` value of the client's random key, so that the
/// frames after a valid answer are reached.
async fn websocket(answer: &[u8]) {
    let (client, mut server) = tokio::io::duplex(2 * answer.len() + 64 * 1024);
    let answer = answer.to_vec();
    let serving = tokio::spawn(async move {
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match server.read(&mut buf).await {
                Ok(0) | Err(_) => return server,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
        let key = text
            .split("\r\n")
            .find_map(|line| line.strip_prefix("sec-websocket-key: "))
            .unwrap_or_default();
        // The key is base64, whose letters' case matters: take it from the request as sent.
        let at = text.find(key).unwrap_or(0);
        let key = String::from_utf8_lossy(&request[at..at + key.len()]).into_owned();
        let accept = derive_accept_key(key.as_bytes());
        let answer = match answer.windows(8).position(|w| w == b"{accept}") {
            Some(i) => [&answer[..i], accept.as_bytes(), &answer[i + 8..]].concat(),
            None => answer,
        };
        let _ = server.write_all(&answer).await;
        let _ = server.shutdown().await;
        server
    });
    let settings = WsSettings {
        max_message_size: 64 * 1024,
        ..WsSettings::default()
    };
    match websocket_handshake(client, "broker.example", 443, &settings, LIMIT).await {
        Ok(mut mqtt) => {
            let mut buf = [0u8; 4096];
            let drained = tokio::time::timeout(LIMIT, async {
                while mqtt.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            })
            .await;
            assert!(
                drained.is_ok(),
                "MQTT over WebSocket does not see the close"
            );
        }
        Err(e @ WsError::TimedOut { .. }) => panic!("{e}"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let _server = serving.await;
}
