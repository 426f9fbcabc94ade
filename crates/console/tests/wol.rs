//! Wake-on-LAN through the API, captured byte for byte on loopback UDP sockets (never a
//! real broadcast address).

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use tokio::net::UdpSocket;

/// The packet as the specification writes it, built by hand here (not by the code under test).
fn expected(mac: [u8; 6], password: &[u8]) -> Vec<u8> {
    let mut p = vec![0xFF; 6];
    for _ in 0..16 {
        p.extend_from_slice(&mac);
    }
    p.extend_from_slice(password);
    p
}

async fn capture(socket: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf)).await {
            Ok(Ok((len, _))) => out.push(buf[..len].to_vec()),
            _ => break,
        }
    }
    out
}

/// An IPv4 and an IPv6 loopback socket on the same port.
async fn sockets() -> (UdpSocket, UdpSocket, u16) {
    for _ in 0..20 {
        let v4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = UdpSocket::bind(("::1", port)).await {
            return (v4, v6, port);
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

#[tokio::test]
async fn magic_packets_reach_every_configured_address_repeated_and_recorded() {
    let api = common::start_with(|_| {}).await;
    api.enroll(
        "pc-1",
        json!({"hostname": "pc-1", "addresses": [{"address": "192.168.1.23", "prefix_len": 24}], "macs": ["00:11:22:aa:bb:cc", "02-00-00-00-00-01"]}),
    )
    .await;
    let (v4, v6, port) = sockets().await;
    let (_, mut settings) = api.call("GET", "/api/v1/settings", None).await;
    // The agent's subnet broadcast (192.168.1.255) is a real LAN address: turned off here.
    settings["wol"] = json!({
        "addresses": ["127.0.0.1", "::1"],
        "subnet_broadcast": false,
        "port": port,
        "repeats": 2,
        "secureon": "01:02:03:04:05:06",
    });
    let (s, body) = api.call("PUT", "/api/v1/settings", Some(settings)).await;
    assert_eq!(s, StatusCode::OK, "{body}");

    let (s, sends) = api.call("POST", "/api/v1/agents/pc-1/wol", None).await;
    assert_eq!(s, StatusCode::OK, "{sends}");
    // Two MACs x two destinations, each recorded with its packet count.
    assert_eq!(sends.as_array().unwrap().len(), 4, "{sends}");
    for send in sends.as_array().unwrap() {
        assert_eq!(send["packets"], 2, "{send}");
        assert!(send["error"].is_null(), "{send}");
    }
    let pw = [1, 2, 3, 4, 5, 6];
    let want_a = expected([0x00, 0x11, 0x22, 0xaa, 0xbb, 0xcc], &pw);
    let want_b = expected([0x02, 0, 0, 0, 0, 0x01], &pw);
    assert_eq!(want_a.len(), 108);
    for socket in [&v4, &v6] {
        let got = capture(socket, 4).await;
        assert_eq!(
            got.len(),
            4,
            "two packets per MAC on {:?}",
            socket.local_addr()
        );
        assert_eq!(got.iter().filter(|p| **p == want_a).count(), 2);
        assert_eq!(got.iter().filter(|p| **p == want_b).count(), 2);
    }
    let (_, history) = api.call("GET", "/api/v1/agents/pc-1/wol", None).await;
    assert_eq!(history.as_array().unwrap().len(), 4);
    assert!(
        history
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["destination"] == format!("[::1]:{port}") && h["mac"] == "02:00:00:00:00:01")
    );
}

#[tokio::test]
async fn an_agent_without_mac_or_destination_gets_a_clear_refusal() {
    let api = common::start_with(|_| {}).await;
    api.enroll("pc-2", json!({"hostname": "pc-2"})).await;
    let (s, body) = api.call("POST", "/api/v1/agents/pc-2/wol", None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["error"].as_str().unwrap().contains("no MAC address"),
        "{body}"
    );
}
