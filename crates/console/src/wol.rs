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

/// The IPv4 subnets of an agent a relay can serve: (network, prefix length, broadcast) for
/// each address with a prefix of /1 to /30, not link-local, and not loopback unless
/// `allow_loopback` (development: every machine has 127.0.0.1).
pub fn relay_subnets(
    addresses: &[AgentAddress],
    allow_loopback: bool,
) -> Vec<(Ipv4Addr, u8, Ipv4Addr)> {
    let mut out = Vec::new();
    for a in addresses {
        let IpAddr::V4(v4) = a.address else { continue };
        if !(1..=30).contains(&a.prefix_len)
            || v4.is_link_local()
            || (v4.is_loopback() && !allow_loopback)
        {
            continue;
        }
        let mask = u32::MAX << (32 - u32::from(a.prefix_len));
        let network = Ipv4Addr::from(u32::from(v4) & mask);
        let broadcast = Ipv4Addr::from(u32::from(v4) | !mask);
        if !out
            .iter()
            .any(|(n, p, _)| *n == network && *p == a.prefix_len)
        {
            out.push((network, a.prefix_len, broadcast));
        }
    }
    out
}

/// For each relay subnet of `target`, the agent to relay through: one of `candidates`
/// (online agents) other than the target with an address in that subnet, the most recently
/// seen first. Returns (relay agent id, subnet broadcast).
pub fn choose_relays(
    target: &crate::model::Agent,
    candidates: &[crate::model::Agent],
    allow_loopback: bool,
) -> Vec<(String, Ipv4Addr)> {
    let mut out: Vec<(String, Ipv4Addr)> = Vec::new();
    for (network, prefix_len, broadcast) in
        relay_subnets(&target.inventory.addresses, allow_loopback)
    {
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        let relay = candidates
            .iter()
            .filter(|c| {
                c.id != target.id
                    && !c.revoked
                    && c.presence == crate::model::Presence::Online
                    && c.inventory.addresses.iter().any(|a| match a.address {
                        IpAddr::V4(v4) => {
                            u32::from(v4) & mask == u32::from(network) && v4 != broadcast
                        }
                        IpAddr::V6(_) => false,
                    })
            })
            .max_by_key(|c| c.presence_at.unwrap_or(0));
        if let Some(relay) = relay
            && !out.iter().any(|(_, b)| *b == broadcast)
        {
            out.push((relay.id.clone(), broadcast));
        }
    }
    out
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

    fn agent(id: &str, addr: &str, prefix_len: u8, online: bool, at: i64) -> crate::model::Agent {
        crate::model::Agent {
            id: id.into(),
            name: id.into(),
            inventory: crate::model::Inventory {
                addresses: vec![AgentAddress {
                    address: addr.parse().unwrap(),
                    prefix_len,
                }],
                macs: vec!["00:11:22:33:44:55".into()],
                ..Default::default()
            },
            groups: Vec::new(),
            enrolled_at: 0,
            last_checkin: None,
            presence: if online {
                crate::model::Presence::Online
            } else {
                crate::model::Presence::Offline
            },
            presence_at: Some(at),
            path: None,
            remote_addr: None,
            revoked: false,
            cloned: None,
        }
    }

    #[test]
    fn the_relay_is_an_online_agent_of_the_same_subnet_most_recent_first() {
        let target = agent("sleeper", "192.168.1.23", 24, false, 0);
        let candidates = vec![
            agent("sleeper", "192.168.1.23", 24, true, 50),
            agent("other-net", "192.168.2.7", 24, true, 40),
            agent("old", "192.168.1.8", 24, true, 10),
            agent("newer", "192.168.1.9", 16, true, 20),
            agent("offline", "192.168.1.10", 24, false, 30),
        ];
        assert_eq!(
            choose_relays(&target, &candidates, false),
            vec![("newer".to_owned(), "192.168.1.255".parse().unwrap())]
        );
        assert!(choose_relays(&target, &candidates[..2], false).is_empty());
        let looped = agent("sleeper", "127.0.0.2", 30, false, 0);
        let peer = [agent("peer", "127.0.0.1", 30, true, 1)];
        assert!(
            choose_relays(&looped, &peer, false).is_empty(),
            "loopback is no subnet"
        );
        assert_eq!(
            choose_relays(&looped, &peer, true),
            vec![("peer".to_owned(), "127.0.0.3".parse().unwrap())]
        );
    }
}
