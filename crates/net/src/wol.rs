//! Wake-on-LAN: the magic packet and sending it by UDP, shared by the console (which sends
//! to subnet broadcasts and configured addresses) and the agent (which sends on its own
//! network when the console asks it to relay).
//!
//! The packet is 6 bytes `0xFF` then the MAC address 16 times (102 bytes), followed by an
//! optional SecureOn password of 4 or 6 bytes. It goes to each destination `repeats` times
//! (UDP may drop one). Sockets come from socket2 so that broadcast is allowed and multicast
//! gets a hop limit; IPv6 multicast (`ff02::1`) works too.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// Length of a magic packet without password.
pub const MAGIC_PACKET_LEN: usize = 102;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

fn parse_hex_bytes(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    let parts: Vec<&str> = if text.contains([':', '-']) {
        text.split([':', '-']).collect()
    } else if text.len().is_multiple_of(2) {
        (0..text.len())
            .step_by(2)
            .filter_map(|i| text.get(i..i + 2))
            .collect()
    } else {
        return None;
    };
    parts
        .iter()
        .map(|p| {
            if p.len() == 2 {
                u8::from_str_radix(p, 16).ok()
            } else {
                None
            }
        })
        .collect()
}

impl std::str::FromStr for MacAddress {
    type Err = String;

    /// `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` or `aabbccddeeff`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes = parse_hex_bytes(text)
            .filter(|b| b.len() == 6)
            .ok_or_else(|| {
                format!(
                    "{text:?} is not a MAC address: write six hex bytes, e.g. 00:11:22:33:44:55"
                )
            })?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&bytes);
        if mac == [0; 6] || mac == [0xff; 6] || mac[0] & 1 == 1 {
            return Err(format!(
                "{text:?} is not a network card's address (zero, broadcast or multicast)"
            ));
        }
        Ok(Self(mac))
    }
}

/// Parses a SecureOn password: empty (none), or 4 or 6 hex bytes.
pub fn parse_secureon(text: &str) -> Result<Option<Vec<u8>>, String> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    match parse_hex_bytes(text) {
        Some(b) if b.len() == 4 || b.len() == 6 => Ok(Some(b)),
        _ => Err(format!(
            "{text:?} is not a SecureOn password: write 4 or 6 hex bytes, e.g. 01:02:03:04:05:06"
        )),
    }
}

/// The magic packet for `mac`, with the SecureOn password appended when given.
pub fn magic_packet(mac: MacAddress, secureon: Option<&[u8]>) -> Vec<u8> {
    let mut packet = Vec::with_capacity(MAGIC_PACKET_LEN + 6);
    packet.extend_from_slice(&[0xFF; 6]);
    for _ in 0..16 {
        packet.extend_from_slice(&mac.0);
    }
    if let Some(pw) = secureon {
        packet.extend_from_slice(pw);
    }
    packet
}

/// The result of sending to one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WolOutcome {
    /// Where.
    pub destination: SocketAddr,
    /// How many packets were sent.
    pub packets: u32,
    /// The error, if sending failed.
    pub error: Option<String>,
}

/// Sends `packet` `repeats` times to `destination` (a pause of 50 ms between repeats), from
/// a fresh UDP socket with broadcast allowed and multicast hop limit 1 (stays on the link).
pub async fn send_packet(packet: &[u8], destination: SocketAddr, repeats: u8) -> WolOutcome {
    let mut outcome = WolOutcome {
        destination,
        packets: 0,
        error: None,
    };
    let socket = match wol_socket(destination) {
        Ok(s) => s,
        Err(e) => {
            outcome.error = Some(format!("cannot open a UDP socket for {destination}: {e}"));
            return outcome;
        }
    };
    for i in 0..repeats.max(1) {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match socket.send_to(packet, destination).await {
            Ok(_) => outcome.packets += 1,
            Err(e) => {
                outcome.error = Some(format!("sending to {destination} failed: {e}"));
                break;
            }
        }
    }
    outcome
}

fn wol_socket(destination: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let domain = if destination.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    match destination.ip() {
        IpAddr::V4(ip) => {
            socket.set_broadcast(true)?;
            if ip.is_multicast() {
                socket.set_multicast_ttl_v4(1)?;
            }
            socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
        }
        IpAddr::V6(ip) => {
            if ip.is_multicast() {
                socket.set_multicast_hops_v6(1)?;
            }
            socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())?;
        }
    }
    socket.set_nonblocking(true)?;
    tokio::net::UdpSocket::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_in_the_usual_spellings_and_bad_ones_are_refused() {
        let want = MacAddress([0x00, 0x11, 0x22, 0xaa, 0xbb, 0xcc]);
        for text in ["00:11:22:aa:bb:cc", "00-11-22-AA-BB-CC", "001122aabbcc"] {
            assert_eq!(text.parse::<MacAddress>().unwrap(), want, "{text}");
        }
        for bad in [
            "",
            "00:11:22:33:44",
            "00:11:22:33:44:55:66",
            "zz:11:22:33:44:55",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "0:1:2:3:4:5",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
        assert_eq!(want.to_string(), "00:11:22:aa:bb:cc");
    }

    #[test]
    fn secureon_passwords_are_four_or_six_bytes() {
        assert_eq!(parse_secureon("").unwrap(), None);
        assert_eq!(
            parse_secureon("01:02:03:04").unwrap(),
            Some(vec![1, 2, 3, 4])
        );
        assert_eq!(parse_secureon("010203040506").unwrap().unwrap().len(), 6);
        assert!(parse_secureon("01:02:03").is_err());
        assert!(parse_secureon("01:02:03:04:05").is_err());
    }

    #[tokio::test]
    async fn a_packet_arrives_byte_for_byte_on_loopback() {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = socket.local_addr().unwrap();
        let mac: MacAddress = "00:11:22:33:44:55".parse().unwrap();
        let packet = magic_packet(mac, Some(&[1, 2, 3, 4]));
        let outcome = send_packet(&packet, to, 2).await;
        assert_eq!((outcome.packets, outcome.error), (2, None));
        let mut buf = [0u8; 256];
        for _ in 0..2 {
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], packet.as_slice());
        }
        assert_eq!(packet.len(), MAGIC_PACKET_LEN + 4);
        assert_eq!(&packet[..6], &[0xFF; 6]);
        assert!(packet[6..102].chunks(6).all(|c| c == mac.0));
    }
}
