//! Wake-on-LAN destinations: an agent's subnet broadcast and the configured addresses. The
//! magic packet and its UDP sender live in `beckon_net::wol` (re-exported here), shared with
//! the agent, which sends the same packet when the console asks it to relay.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub use beckon_net::wol::{
    MAGIC_PACKET_LEN, MacAddress, WolOutcome, magic_packet, parse_secureon, send_packet,
};

use crate::model::AgentAddress;

/// The directed broadcast address of an agent's IPv4 subnet (`192.168.1.23/24` ->
/// `192.168.1.255`). `None` for IPv6 (which has no broadcast), host routes (/31, /32),
/// loopback and link-local addresses.
pub fn subnet_broadcast(addr: &AgentAddress) -> Option<IpAddr> {
    let IpAddr::V4(v4) = addr.address else {
        return None;
    };
    if addr.prefix_len == 0 || addr.prefix_len > 30 || v4.is_loopback() || v4.is_link_local() {
        return None;
    }
    let mask = u32::MAX << (32 - u32::from(addr.prefix_len));
    Some(IpAddr::V4(Ipv4Addr::from(u32::from(v4) | !mask)))
}

/// Every destination for an agent: its subnet broadcasts (when enabled) and the configured
/// addresses, each once, on `port`.
pub fn destinations(
    addresses: &[AgentAddress],
    settings: &crate::settings::WolSettings,
) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    let mut push = |ip: IpAddr| {
        let sa = SocketAddr::new(ip, settings.port);
        if !out.contains(&sa) {
            out.push(sa);
        }
    };
    if settings.subnet_broadcast {
        for a in addresses {
            if let Some(b) = subnet_broadcast(a) {
                push(b);
            }
        }
    }
    for ip in &settings.addresses {
        push(*ip);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_broadcasts_follow_the_prefix() {
        let a = |s: &str, p| AgentAddress {
            address: s.parse().unwrap(),
            prefix_len: p,
        };
        assert_eq!(
            subnet_broadcast(&a("192.168.1.23", 24)),
            Some("192.168.1.255".parse().unwrap())
        );
        assert_eq!(
            subnet_broadcast(&a("10.1.2.3", 16)),
            Some("10.1.255.255".parse().unwrap())
        );
        assert_eq!(subnet_broadcast(&a("10.1.2.3", 32)), None);
        assert_eq!(subnet_broadcast(&a("127.0.0.1", 8)), None);
        assert_eq!(subnet_broadcast(&a("fe80::1", 64)), None);
    }
}
