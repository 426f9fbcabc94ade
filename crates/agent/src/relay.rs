//! Wake-on-LAN relay: the console asks this agent, over the push channel, to send the magic
//! packets for a machine on the same subnet (`docs/wake-up.md`, "Wake-on-LAN relay"). The
//! request is verified like a wake-up (signature, target, time, replay) before it gets here;
//! the packets are the console's own (`beckon_net::wol`), and the answer lists what was
//! sent, per MAC address.
//!
//! The agent sends only to a loopback address or to the broadcast address of one of its own
//! IPv4 subnets: a relay request can make it wake machines next to it, never send packets
//! elsewhere.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use beckon_identity::relay::{RelayRequest, RelayResult, RelaySend};
use beckon_net::wol::{MacAddress, magic_packet, parse_secureon, send_packet};

use crate::inventory::InterfaceAddress;

/// The directed broadcast address of each of `own` IPv4 subnets (prefix up to /30).
pub fn own_broadcasts(own: &[InterfaceAddress]) -> Vec<IpAddr> {
    own.iter()
        .filter_map(|a| match a.address {
            IpAddr::V4(v4) if (1..=30).contains(&a.prefix_len) => {
                let mask = u32::MAX << (32 - u32::from(a.prefix_len));
                Some(IpAddr::V4(Ipv4Addr::from(u32::from(v4) | !mask)))
            }
            _ => None,
        })
        .collect()
}

/// Whether this agent may send to `destination`: loopback (stays on this machine) or the
/// broadcast address of one of its own subnets.
pub fn allowed_destination(destination: IpAddr, own_broadcasts: &[IpAddr]) -> bool {
    destination.is_loopback() || own_broadcasts.contains(&destination)
}

/// Sends the packets a verified request asks for and says what happened, per MAC.
pub async fn perform(
    request: &RelayRequest,
    own_broadcasts: &[IpAddr],
    now_ms: i64,
) -> RelayResult {
    let destination = SocketAddr::new(request.broadcast, request.port);
    let secureon = parse_secureon(request.secureon.as_deref().unwrap_or(""));
    let refused = |mac: &str, error: String| RelaySend {
        mac: mac.to_owned(),
        destination: destination.to_string(),
        packets: 0,
        error: Some(error),
    };
    let mut sends = Vec::with_capacity(request.macs.len());
    for mac_text in &request.macs {
        if !allowed_destination(request.broadcast, own_broadcasts) {
            sends.push(refused(
                mac_text,
                format!(
                    "{} is not the broadcast address of a subnet of this agent; it relays only on its own network",
                    request.broadcast
                ),
            ));
            continue;
        }
        let mac = match mac_text.parse::<MacAddress>() {
            Ok(m) => m,
            Err(e) => {
                sends.push(refused(mac_text, e));
                continue;
            }
        };
        let password = match &secureon {
            Ok(p) => p.as_deref(),
            Err(e) => {
                sends.push(refused(mac_text, e.clone()));
                continue;
            }
        };
        let outcome = send_packet(&magic_packet(mac, password), destination, request.repeats).await;
        sends.push(RelaySend {
            mac: mac_text.clone(),
            destination: destination.to_string(),
            packets: outcome.packets,
            error: outcome.error,
        });
    }
    RelayResult {
        request_id: request.id.clone(),
        sends,
        at: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(text: &str, prefix_len: u8) -> InterfaceAddress {
        InterfaceAddress {
            address: text.parse().unwrap(),
            prefix_len,
        }
    }

    #[test]
    fn only_own_subnet_broadcasts_and_loopback_are_allowed() {
        let own = own_broadcasts(&[a("192.168.1.23", 24), a("10.0.0.5", 32), a("fd00::5", 64)]);
        assert_eq!(own, vec!["192.168.1.255".parse::<IpAddr>().unwrap()]);
        assert!(allowed_destination("192.168.1.255".parse().unwrap(), &own));
        assert!(allowed_destination("127.0.0.3".parse().unwrap(), &own));
        assert!(!allowed_destination("192.168.2.255".parse().unwrap(), &own));
        assert!(!allowed_destination("8.8.8.8".parse().unwrap(), &own));
    }

    fn request_to(broadcast: &str, port: u16) -> RelayRequest {
        RelayRequest {
            v: 1,
            id: "01999999-9999-7999-8999-999999999999".into(),
            tenant: "acme".into(),
            agent: "pc-on".into(),
            target: "pc-off".into(),
            issued_at: 1,
            expires_at: 61,
            macs: vec!["02:00:00:be:ef:01".into()],
            secureon: Some("01:02:03:04".into()),
            broadcast: broadcast.parse().unwrap(),
            port,
            repeats: 2,
        }
    }

    /// The packet as the specification writes it, built here by hand.
    fn expected_packet() -> Vec<u8> {
        let mut want = vec![0xFF; 6];
        for _ in 0..16 {
            want.extend_from_slice(&[0x02, 0, 0, 0xbe, 0xef, 0x01]);
        }
        want.extend_from_slice(&[1, 2, 3, 4]);
        want
    }

    async fn receive(socket: &tokio::net::UdpSocket, count: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        for i in 0..count {
            let (n, _) = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                socket.recv_from(&mut buf),
            )
            .await
            .unwrap_or_else(|_| panic!("magic packet {} did not arrive", i + 1))
            .expect("receive");
            got.push(buf[..n].to_vec());
        }
        got
    }

    /// A relay request's packets arrive byte for byte on a UDP socket of this machine (the
    /// Windows build runs this under Wine: the sockets are Winsock's there).
    #[tokio::test]
    async fn the_relay_puts_the_magic_packet_on_the_wire() {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let result = perform(&request_to("127.0.0.1", port), &[], 5).await;
        assert_eq!(result.sends.len(), 1);
        let send = &result.sends[0];
        assert_eq!((send.packets, send.error.as_deref()), (2, None), "{send:?}");
        assert_eq!(send.destination, format!("127.0.0.1:{port}"));
        assert_eq!(receive(&socket, 2).await, vec![expected_packet(); 2]);
    }

    /// Sent to the broadcast address of one of the agent's own subnets (here loopback's
    /// 127.0.0.0/8: nothing leaves the machine), the packet reaches a socket listening on
    /// every address, as the sleeping machine's card would see it.
    #[tokio::test]
    async fn the_relay_broadcasts_on_its_own_subnet() {
        let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let own = own_broadcasts(&[a("127.0.0.1", 8)]);
        assert_eq!(own, vec!["127.255.255.255".parse::<IpAddr>().unwrap()]);
        let result = perform(&request_to("127.255.255.255", port), &own, 5).await;
        let send = &result.sends[0];
        assert_eq!((send.packets, send.error.as_deref()), (2, None), "{send:?}");
        assert_eq!(receive(&socket, 2).await, vec![expected_packet(); 2]);
    }

    #[tokio::test]
    async fn a_refused_destination_sends_nothing_and_says_why() {
        let request = RelayRequest {
            macs: vec!["00:11:22:33:44:55".into(), "nonsense".into()],
            secureon: None,
            repeats: 1,
            ..request_to("192.0.2.255", 9)
        };
        let result = perform(&request, &[], 5).await;
        assert_eq!(result.sends.len(), 2);
        assert!(
            result
                .sends
                .iter()
                .all(|s| s.packets == 0 && s.error.is_some())
        );
        assert!(
            result.sends[0]
                .error
                .as_deref()
                .unwrap()
                .contains("own network")
        );
    }
}
