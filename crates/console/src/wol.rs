//! Wake-on-LAN destinations: an agent's subnet broadcast and the configured addresses. The
//! magic packet and its UDP sender live in `beckon_net::wol` (re-exported here), shared with
//! the agent, which sends the same packet when the console asks it to relay.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub use beckon_net::wol::{
    MAGIC_PACKET_LEN, MacAddress, WolOutcome, magic_packet, parse_secureon, send_packet,
};

use crate::model::{AgentAddress, RelayCandidate};

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

/// The online agents a relay is chosen from, by IPv4 address: finding the relay of a subnet
/// reads only the agents in it, and a subnet asked about again (the sleeping machines of one
/// office) is answered from memory. Built once for many targets (a call to a fleet).
#[derive(Debug, Default)]
pub struct RelayIndex {
    /// (address, index into `candidates`), by address.
    by_address: Vec<(u32, usize)>,
    candidates: Vec<RelayCandidate>,
    /// (network, prefix length) -> its two best candidates, best first, two different agents:
    /// the target itself may be one.
    best: HashMap<(u32, u8), [Option<usize>; 2]>,
}

impl RelayIndex {
    /// An index of `candidates` (online agents, as [`crate::store::WolStore::relay_candidates`]
    /// reads them).
    pub fn new(candidates: Vec<RelayCandidate>) -> Self {
        let mut by_address: Vec<(u32, usize)> = candidates
            .iter()
            .enumerate()
            .flat_map(|(i, c)| {
                c.addresses.iter().filter_map(move |a| match a.address {
                    IpAddr::V4(v4) => Some((u32::from(v4), i)),
                    IpAddr::V6(_) => None,
                })
            })
            .collect();
        by_address.sort_unstable();
        Self {
            by_address,
            candidates,
            best: HashMap::new(),
        }
    }

    /// How many agents the index holds.
    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    /// Whether the index holds no agent.
    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    /// For each relay subnet of `target`, the agent to relay through: a candidate other than
    /// the target with an address in that subnet (not its broadcast address), the most
    /// recently online first, then the smallest id. Returns (relay agent id, subnet broadcast).
    pub fn choose(
        &mut self,
        target: &crate::model::Agent,
        allow_loopback: bool,
    ) -> Vec<(String, Ipv4Addr)> {
        let mut out: Vec<(String, Ipv4Addr)> = Vec::new();
        for (network, prefix_len, broadcast) in
            relay_subnets(&target.inventory.addresses, allow_loopback)
        {
            let best = *self
                .best
                .entry((u32::from(network), prefix_len))
                .or_insert_with(|| {
                    best_two(&self.by_address, &self.candidates, network, broadcast)
                });
            let relay = best
                .into_iter()
                .flatten()
                .map(|i| &self.candidates[i])
                .find(|c| c.id != target.id);
            if let Some(relay) = relay
                && !out.iter().any(|(_, b)| *b == broadcast)
            {
                out.push((relay.id.clone(), broadcast));
            }
        }
        out
    }
}

/// The two best different candidates with an address from `network` to `broadcast`
/// (exclusive): the latest `presence_at` first, then the smallest id.
fn best_two(
    by_address: &[(u32, usize)],
    candidates: &[RelayCandidate],
    network: Ipv4Addr,
    broadcast: Ipv4Addr,
) -> [Option<usize>; 2] {
    let (low, high) = (u32::from(network), u32::from(broadcast));
    let from = by_address.partition_point(|(a, _)| *a < low);
    let to = by_address.partition_point(|(a, _)| *a < high);
    let rank = |i: usize| {
        let c = &candidates[i];
        (c.presence_at.unwrap_or(0), std::cmp::Reverse(c.id.as_str()))
    };
    let mut best: [Option<usize>; 2] = [None, None];
    for &(_, i) in &by_address[from..to] {
        if best.contains(&Some(i)) {
            // The same agent by another address of the subnet.
            continue;
        }
        if best[0].is_none_or(|b| rank(i) > rank(b)) {
            best = [Some(i), best[0]];
        } else if best[1].is_none_or(|s| rank(i) > rank(s)) {
            best[1] = Some(i);
        }
    }
    best
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

    fn agent(id: &str, addr: &str, prefix_len: u8) -> crate::model::Agent {
        crate::model::Agent {
            id: id.into(),
            name: id.into(),
            inventory: crate::model::Inventory {
                addresses: vec![address(addr, prefix_len)],
                macs: vec!["00:11:22:33:44:55".into()],
                ..Default::default()
            },
            groups: Vec::new(),
            enrolled_at: 0,
            last_checkin: None,
            presence: crate::model::Presence::Offline,
            presence_at: Some(0),
            path: None,
            remote_addr: None,
            revoked: false,
            cloned: None,
        }
    }

    fn address(addr: &str, prefix_len: u8) -> AgentAddress {
        AgentAddress {
            address: addr.parse().unwrap(),
            prefix_len,
        }
    }

    fn online(id: &str, addr: &str, prefix_len: u8, at: i64) -> RelayCandidate {
        RelayCandidate {
            id: id.into(),
            addresses: vec![address(addr, prefix_len)],
            presence_at: Some(at),
        }
    }

    fn relay(id: &str, broadcast: &str) -> Vec<(String, Ipv4Addr)> {
        vec![(id.to_owned(), broadcast.parse().unwrap())]
    }

    #[test]
    fn the_relay_is_an_online_agent_of_the_same_subnet_most_recent_first() {
        let target = agent("sleeper", "192.168.1.23", 24);
        let candidates = vec![
            online("sleeper", "192.168.1.23", 24, 50),
            online("other-net", "192.168.2.7", 24, 40),
            online("old", "192.168.1.8", 24, 10),
            // The candidate's own prefix does not matter: its address is in the subnet.
            online("newer", "192.168.1.9", 16, 20),
            online("on-the-broadcast", "192.168.1.255", 24, 60),
        ];
        let mut index = RelayIndex::new(candidates.clone());
        assert_eq!(
            index.choose(&target, false),
            relay("newer", "192.168.1.255")
        );
        // Asked again (the answer is remembered per subnet): the same.
        assert_eq!(
            index.choose(&target, false),
            relay("newer", "192.168.1.255")
        );
        // The sleeper itself, online, does not relay to itself.
        assert!(
            RelayIndex::new(candidates[..2].to_vec())
                .choose(&target, false)
                .is_empty()
        );
        // An online agent is woken through its most recent peer, never itself.
        let awake = agent("newer", "192.168.1.9", 24);
        assert_eq!(
            index.choose(&awake, false),
            relay("sleeper", "192.168.1.255")
        );
        let looped = agent("sleeper", "127.0.0.2", 30);
        let mut peer = RelayIndex::new(vec![online("peer", "127.0.0.1", 30, 1)]);
        assert!(
            peer.choose(&looped, false).is_empty(),
            "loopback is no subnet"
        );
        assert_eq!(peer.choose(&looped, true), relay("peer", "127.0.0.3"));
    }

    #[test]
    fn every_online_agent_is_a_candidate_however_large_the_fleet() {
        // 5,000 online agents in other subnets, the one relay of the sleeper's subnet last:
        // the console once only looked at the first 1,000 online agents.
        let mut candidates: Vec<RelayCandidate> = (0..5000)
            .map(|i| {
                let addr = format!("10.{}.{}.{}", i / 250 % 250, i % 250, 7);
                online(&format!("a{i:05}"), &addr, 24, 100)
            })
            .collect();
        candidates.push(online("z-relay", "172.16.9.4", 22, 1));
        // The smallest id of 10.0.0.0/16, at its highest address.
        candidates.push(online("a0", "10.0.255.9", 24, 100));
        let mut index = RelayIndex::new(candidates);
        assert_eq!(index.len(), 5002);
        let sleeper = agent("sleeper", "172.16.10.200", 22);
        assert_eq!(
            index.choose(&sleeper, false),
            relay("z-relay", "172.16.11.255")
        );
        // Ties on the time: the smallest id, whichever address comes first.
        let target = agent("t", "10.0.3.1", 16);
        assert_eq!(index.choose(&target, false), relay("a0", "10.0.255.255"));
    }

    #[test]
    fn an_agent_with_two_addresses_in_the_subnet_counts_once() {
        let mut two = online("two", "192.168.1.5", 24, 9);
        two.addresses.push(address("192.168.1.6", 24));
        let mut index = RelayIndex::new(vec![two, online("one", "192.168.1.7", 24, 1)]);
        // The best is the target itself: the second best is another agent, not its other
        // address.
        let target = agent("two", "192.168.1.5", 24);
        assert_eq!(index.choose(&target, false), relay("one", "192.168.1.255"));
        let other = agent("x", "192.168.1.50", 24);
        assert_eq!(index.choose(&other, false), relay("two", "192.168.1.255"));
        // The subnet's own network address is in it (its broadcast address is not).
        let mut at_network = RelayIndex::new(vec![online("net", "192.168.1.0", 24, 1)]);
        assert_eq!(
            at_network.choose(&other, false),
            relay("net", "192.168.1.255")
        );
    }
}
