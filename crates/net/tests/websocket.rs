//! MQTT over WebSocket through an in-test server (tokio-tungstenite accept with subprotocol
//! `mqtt`, over TLS): bytes cross both ways as through TCP; refusals are worded.

mod support;

use beckon_net::{
    TlsClient, TlsSettings, TrustAnchors, WsByteStream, WsError, WsSettings, websocket_handshake,
};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn tls_to(server: &TlsServer, ca: &TestCa) -> beckon_net::tls::TlsStream<TcpStream> {
    let client = TlsClient::new(&TlsSettings {
        trust: TrustAnchors::CaPem(ca.pem().into_bytes()),
        ..TlsSettings::default()
    })
    .expect("client");
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let (tls, info) = client
        .connect(tcp, "localhost", &["http/1.1"], WAIT)
        .await
        .expect("TLS");
    assert_eq!(info.alpn.as_deref(), Some("http/1.1"));
    tls
}

/// A TLS connection to `server`, upgraded to WebSocket with `settings`.
async fn upgrade(
    server: &TlsServer,
    ca: &TestCa,
    settings: &WsSettings,
) -> Result<WsByteStream<beckon_net::tls::TlsStream<TcpStream>>, WsError> {
    let tls = tls_to(server, ca).await;
    websocket_handshake(tls, "localhost", server.port(), settings, WAIT).await
}

async fn server_with(ca: &TestCa, behaviour: WsBehaviour) -> TlsServer {
    start_tls_server_with(
        server_config(ca.server_cert(&["localhost"]), &["mqtt", "http/1.1"]),
        behaviour,
    )
    .await
}

/// A server that behaves as `behaviour` says, and a WebSocket upgraded to it.
async fn upgraded_to(
    behaviour: WsBehaviour,
) -> (
    TlsServer,
    WsByteStream<beckon_net::tls::TlsStream<TcpStream>>,
) {
    let ca = TestCa::new("CA");
    let server = server_with(&ca, behaviour).await;
    let ws = upgrade(&server, &ca, &WsSettings::default())
        .await
        .expect("upgrade");
    (server, ws)
}

/// Upgrades to a server that behaves as `behaviour` says, then reads once (in time).
async fn first_read_from(behaviour: WsBehaviour) -> std::io::Result<usize> {
    let (_server, mut ws) = upgraded_to(behaviour).await;
    let mut buf = [0u8; 8];
    tokio::time::timeout(WAIT, ws.read(&mut buf))
        .await
        .expect("in time")
}

#[tokio::test]
async fn carries_bytes_both_ways() {
    let (mut server, mut ws) = upgraded_to(WsBehaviour::Echo).await;

    // A CONNECT-like packet, sent without a flush (as on TCP, a write goes out at once),
    // then a payload larger than one read buffer: the reader must hand it out in pieces,
    // losing nothing.
    ws.write_all(b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00")
        .await
        .expect("write");
    let mut back = [0u8; 15];
    tokio::time::timeout(WAIT, ws.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&back, b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x00");

    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    ws.write_all(&big).await.expect("write big");
    ws.flush().await.expect("flush");
    let mut got = vec![0u8; big.len()];
    tokio::time::timeout(WAIT, ws.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("echo big");
    assert_eq!(got, big);

    ws.shutdown().await.expect("close");
    assert_eq!(server.next_served().await, Served::WebSocket);
}

#[tokio::test]
async fn server_close_is_end_of_stream() {
    let n = first_read_from(WsBehaviour::Close)
        .await
        .expect("clean close");
    assert_eq!(n, 0);
}

#[tokio::test]
async fn text_messages_are_an_error() {
    let err = first_read_from(WsBehaviour::SendText)
        .await
        .expect_err("text is not MQTT");
    assert!(err.to_string().contains("binary messages only"), "{err}");
}

#[tokio::test]
async fn a_server_without_the_mqtt_subprotocol_is_refused() {
    let ca = TestCa::new("CA");
    let server = server_with(&ca, WsBehaviour::NoSubprotocol).await;
    let err = upgrade(&server, &ca, &WsSettings::default())
        .await
        .expect_err("no subprotocol");
    assert!(matches!(err, WsError::Subprotocol { .. }), "{err}");
    assert!(err.to_string().contains("subprotocol mqtt"), "{err}");
}

#[tokio::test]
async fn a_wrong_path_is_reported_with_its_status() {
    let ca = TestCa::new("CA");
    let server = server_with(&ca, WsBehaviour::Echo).await;
    let settings = WsSettings {
        path: "/not-mqtt".into(),
        ..WsSettings::default()
    };
    let err = upgrade(&server, &ca, &settings).await.expect_err("404");
    assert!(
        matches!(err, WsError::Rejected { status: 404, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("no MQTT WebSocket endpoint"),
        "{err}"
    );
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let (addr, _task) = start_silent_server().await;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let err = websocket_handshake(
        tcp,
        "localhost",
        addr.port(),
        &WsSettings::default(),
        std::time::Duration::from_millis(300),
    )
    .await
    .expect_err("silent");
    assert!(matches!(err, WsError::TimedOut { .. }), "{err}");
}
