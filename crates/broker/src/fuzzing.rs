//! Entry points of the fuzz targets in `fuzz/` (feature "fuzzing"); not part of the API.

use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::proxy_protocol::read_header;
use crate::shared_port::{HttpOutcome, serve_http};

/// Feeds `data` to the broker's TLS 1.3 record reader (see `fuzz/fuzz_targets/records.rs`).
pub fn tls13_records(data: &[u8]) {
    crate::tls13_records::fuzz(data);
}

/// Reads a PROXY protocol header from the start of `data`: it consumes exactly the header
/// (the TLS handshake after it stays unread) and agrees with the line or block parsers.
pub fn proxy_header(data: &[u8]) {
    let mut rest = data;
    let read = read_header(&mut rest)
        .now_or_never()
        .expect("reading from memory never waits");
    let header = &data[..data.len() - rest.len()];
    match read {
        Ok(address) if data[0] == b'P' => {
            assert!(
                header.ends_with(b"\r\n") && header.len() <= 107,
                "{header:?}"
            );
            let line_end = header.windows(2).position(|w| w == b"\r\n");
            assert_eq!(line_end, Some(header.len() - 2), "consumed past the line");
            assert_eq!(crate::proxy_protocol::parse_v1(header), Ok(address));
        }
        Ok(_) => {
            let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
            assert_eq!(header.len(), 16 + len, "consumed other than the v2 block");
        }
        Err(_) => {}
    }
}

/// Serves `data` (after a first byte: bit 0 readiness, the rest how many bytes came in as
/// the sniffed prefix) as one client's bytes on the shared HTTPS port, then reads MQTT from
/// the WebSocket when it upgraded. The client then closes its side: the server must finish,
/// and whatever it sent is an HTTP answer.
pub async fn shared_port(data: &[u8]) {
    let Some((&mode, request)) = data.split_first() else {
        return;
    };
    let ready = mode & 1 == 1;
    let sniffed = usize::from(mode >> 1).min(request.len());
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let request = request.to_vec();
    let writing = tokio::spawn(async move {
        let _ = to_server.write_all(&request[sniffed..]).await;
        let _ = to_server.shutdown().await;
    });
    let prefix = BytesMut::from(&data[1..=sniffed]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let reading = tokio::spawn(async move {
        let mut answer = Vec::new();
        let _ = from_server.read_to_end(&mut answer).await;
        answer
    });
    let served = tokio::time::timeout(
        Duration::from_secs(10),
        // A small WebSocket message cap, so that frames over it are within the inputs' reach.
        serve_http(server, prefix, deadline, ready, 8192),
    )
    .await
    .expect("the shared port gives up at its deadline");
    if let HttpOutcome::WebSocket(mut mqtt) = served {
        let mut buf = [0u8; 4096];
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while mqtt.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        assert!(
            drained.is_ok(),
            "MQTT over WebSocket does not see the close"
        );
    }
    writing.abort();
    let answer = tokio::time::timeout(Duration::from_secs(5), reading)
        .await
        .expect("the connection ends")
        .expect("reader");
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 ") || answer.starts_with(b"HTTP/1.0 "),
        "not an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
}
