//! Wake-on-LAN through the API, captured byte for byte on loopback UDP sockets (never a
//! real broadcast address).

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
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

/// An agent on 192.168.7.0/24 with one MAC.
fn on_subnet(host: &str, mac: &str) -> Value {
    json!({"hostname": host, "addresses": [{"address": "192.168.7.23", "prefix_len": 24}], "macs": [mac]})
}

/// Enrolls `awake` on the subnet and marks it online, as the broker's presence event would.
async fn enroll_online_relay(api: &common::Api) {
    api.enroll("awake", on_subnet("awake", "02:00:00:00:01:00"))
        .await;
    api.execute_sql("UPDATE agents SET presence = 'online', presence_at = 5 WHERE id = 'awake'");
}

/// Wake-on-LAN settings sending `repeats` packets to a loopback socket of the test (no subnet
/// broadcast), relaying on; returns the socket and its port.
async fn wol_to_loopback(api: &common::Api, repeats: u8) -> (UdpSocket, u16) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let (_, mut settings) = api.call("GET", "/api/v1/settings", None).await;
    settings["wol"] = json!({
        "addresses": ["127.0.0.1"],
        "subnet_broadcast": false,
        "port": port,
        "repeats": repeats,
        "secureon": "",
        "relay": true,
    });
    let (s, body) = api.call("PUT", "/api/v1/settings", Some(settings)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    (socket, port)
}

/// A call with `wake_on_lan`: the console sends magic packets for the call's agents that are
/// not online, records each send under the call, and asks an online agent of the sleeper's
/// subnet to relay (here the console has no push connection, so the request is recorded and
/// then marked failed). The online agent gets no packet, nor the removed one (not part of the
/// call: the store test checks the read itself leaves removed agents out).
#[tokio::test]
async fn a_call_wakes_its_sleeping_agents_by_lan_and_chooses_an_online_relay() {
    let api = common::start_with(|_| {}).await;
    enroll_online_relay(&api).await;
    api.enroll("asleep", on_subnet("asleep", "02:00:00:00:00:02"))
        .await;
    api.enroll("removed", on_subnet("removed", "02:00:00:00:00:03"))
        .await;
    let (s, body) = api.call("DELETE", "/api/v1/agents/removed", None).await;
    assert!(s.is_success(), "{s} {body}");
    let (socket, port) = wol_to_loopback(&api, 1).await;

    let (s, call) = api
        .create_call(json!({"target": "all", "reason": "patch day", "wake_on_lan": true}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{call}");
    let call_id = call["id"].as_str().unwrap();
    let history = api
        .wait_for(
            "the sleeper's sends recorded, the relay request failed",
            "/api/v1/agents/asleep/wol",
            |h| {
                h.as_array()
                    .is_some_and(|h| h.len() == 2 && h.iter().any(|s| s["relay_state"] == "failed"))
            },
        )
        .await;
    let direct = history
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["via_agent"].is_null())
        .expect("a send by the console");
    assert_eq!(
        direct["destination"],
        format!("127.0.0.1:{port}"),
        "{direct}"
    );
    assert_eq!(direct["packets"], 1, "{direct}");
    assert_eq!(direct["call_id"], call_id, "{direct}");
    let relayed = history
        .as_array()
        .unwrap()
        .iter()
        .find(|h| !h["via_agent"].is_null())
        .expect("a relay request");
    assert_eq!(relayed["via_agent"], "awake", "{relayed}");
    assert_eq!(
        relayed["destination"],
        format!("192.168.7.255:{port}"),
        "{relayed}"
    );
    assert_eq!(relayed["call_id"], call_id, "{relayed}");

    let got = capture(&socket, 1).await;
    assert_eq!(
        got,
        [expected([2, 0, 0, 0, 0, 2], &[])],
        "the sleeper's packet"
    );
    for id in ["awake", "removed"] {
        let (_, sends) = api
            .call("GET", &format!("/api/v1/agents/{id}/wol"), None)
            .await;
        assert_eq!(sends, json!([]), "{id} is not woken");
    }
    let mut buf = [0u8; 256];
    assert!(socket.try_recv_from(&mut buf).is_err(), "one packet in all");
}

/// A call to many sleeping machines wakes each of them once (they are woken several at a
/// time, sharing one read of the relays): every machine's packets arrive, each recorded
/// once with its relay request through the one online agent of the subnet.
#[tokio::test]
async fn a_call_to_many_sleeping_machines_wakes_each_once() {
    let api = common::start_with(|_| {}).await;
    enroll_online_relay(&api).await;
    let sleepers = 30u8;
    for i in 0..sleepers {
        api.enroll(
            &format!("asleep-{i:02}"),
            on_subnet("asleep", &format!("02:00:00:00:00:{i:02x}")),
        )
        .await;
    }
    let (socket, _) = wol_to_loopback(&api, 2).await;

    let (s, call) = api
        .create_call(json!({"target": "all", "reason": "patch day", "wake_on_lan": true}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{call}");
    let got = capture(&socket, 2 * usize::from(sleepers)).await;
    for i in 0..sleepers {
        let want = expected([2, 0, 0, 0, 0, i], &[]);
        assert_eq!(
            got.iter().filter(|p| **p == want).count(),
            2,
            "asleep-{i:02}"
        );
        let history = api
            .wait_for(
                "a console send and a relay request",
                &format!("/api/v1/agents/asleep-{i:02}/wol"),
                |h| h.as_array().is_some_and(|h| h.len() == 2),
            )
            .await;
        let via: Vec<&Value> = history
            .as_array()
            .unwrap()
            .iter()
            .map(|h| &h["via_agent"])
            .collect();
        assert!(via.contains(&&json!("awake")), "{history}");
        assert!(via.contains(&&Value::Null), "{history}");
    }
    let mut buf = [0u8; 256];
    assert!(socket.try_recv_from(&mut buf).is_err(), "no packet twice");
}
