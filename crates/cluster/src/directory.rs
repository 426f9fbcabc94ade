//! Which node holds each tenant agent, as this node knows it: agent-bound messages (wake-ups,
//! relay requests) are sent on that node's subject instead of through one NATS subscription
//! per agent (see [`crate::subject`]).
//!
//! Kept from what every node sees anyway: claims (a node accepted a connection for a client
//! id) and retained presence events (which carry the node), live and in the snapshot a
//! joining node asks for. A node's link updates the directory from a presence event before
//! it hands the event to the broker, so a server that sends a wake-up on seeing an agent
//! connected finds the agent's node here. A node that went silent is dropped with all its
//! agents: their sessions died with it.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Arc;

use beckon_identity::acl::{PresenceEvent, PresenceState};

use crate::subject::agent_of;

/// Agent -> the node holding it. Every node keeps an entry for every agent of the cluster,
/// so an entry is small (16 bytes): a 96-bit fingerprint of `t/{tenant}/agents/{id}` (two
/// independent keyed hashes) and the node's number. The map is keyed by the first 64 bits,
/// already a keyed hash, so it is not hashed again; the other 32 are checked on a lookup.
/// Two agents sharing the first 64 bits (about one chance in 10^7 with ten million agents)
/// only cost one of them its entry: its wake-ups then reach wildcard subscribers only, as
/// for an agent not known yet. Never the other's node.
#[derive(Debug, Default)]
pub struct Directory {
    agents: HashMap<u64, (u32, u16), BuildHasherDefault<Prehashed>>,
    /// Node names by number, and numbers by name.
    nodes: Vec<Arc<str>>,
    numbers: HashMap<Arc<str>, u16>,
    keys: (RandomState, RandomState),
}

impl Directory {
    /// The node holding the agent whose topic `topic` is, if known.
    pub fn holder(&self, topic: &str) -> Option<&Arc<str>> {
        self.node_of(agent_of(topic)?)
    }

    /// The node holding `agent` (`t/{tenant}/agents/{id}`), if known.
    pub fn node_of(&self, agent: &str) -> Option<&Arc<str>> {
        let (key, check) = self.fingerprint(agent);
        let &(stored, number) = self.agents.get(&key)?;
        if stored != check {
            return None;
        }
        self.nodes.get(usize::from(number))
    }

    /// How many agents the directory knows.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Whether it knows none.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// `node` accepted a connection for `client_id`; only tenant agents
    /// (`{tenant}/agent/{id}`) are kept. Returns the agent when its node changed.
    pub fn claimed(&mut self, client_id: &str, node: &str) -> Option<String> {
        let mut parts = client_id.splitn(3, '/');
        let (Some(tenant), Some("agent"), Some(id)) = (parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if tenant.is_empty() || id.is_empty() || id.contains('/') {
            return None;
        }
        let agent = format!("t/{tenant}/agents/{id}");
        self.set(&agent, node).then_some(agent)
    }

    /// A retained message passed (published here, from another node, or in a snapshot):
    /// when it is an agent's presence event, its node is noted. A connected event is the
    /// latest word; a disconnected one only fills a gap (its session may still wait on that
    /// node), because it can arrive after the connected event of the agent's next node.
    /// Returns the agent when its node changed.
    pub fn retained(&mut self, topic: &str, payload: &[u8]) -> Option<String> {
        let agent = topic
            .strip_suffix("/presence")
            .filter(|agent| agent_of(topic) == Some(*agent))?;
        let event = serde_json::from_slice::<PresenceEvent>(payload).ok()?;
        let node = event.node?;
        if event.state == PresenceState::Connected || self.node_of(agent).is_none() {
            return self.set(agent, &node).then(|| agent.to_owned());
        }
        None
    }

    /// `node` went silent or restarted: its agents are held nowhere until they connect again.
    pub fn node_lost(&mut self, node: &str) {
        if let Some(&number) = self.numbers.get(node) {
            self.agents.retain(|_, (_, n)| *n != number);
        }
    }

    fn fingerprint(&self, agent: &str) -> (u64, u32) {
        // The low half of the second hash: as random as the rest of it.
        #[allow(clippy::cast_possible_truncation)]
        let check = self.keys.1.hash_one(agent) as u32;
        (self.keys.0.hash_one(agent), check)
    }

    /// Notes `agent` on `node`; true when that changed where it is.
    fn set(&mut self, agent: &str, node: &str) -> bool {
        let number = match self.numbers.get(node) {
            Some(&number) => number,
            None => {
                let Ok(number) = u16::try_from(self.nodes.len()) else {
                    tracing::warn!(
                        node,
                        "cluster: more than 65,535 node names seen; wake-ups for its agents reach wildcard subscribers only"
                    );
                    return false;
                };
                let node: Arc<str> = Arc::from(node);
                self.nodes.push(node.clone());
                self.numbers.insert(node, number);
                number
            }
        };
        let (key, check) = self.fingerprint(agent);
        self.agents.insert(key, (check, number)) != Some((check, number))
    }
}

/// A hasher for keys that are already keyed hashes (the directory's fingerprints): passes the
/// `u64` through.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (a `u64` key); anything else is folded in.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beckon_identity::acl::ConnectionPath;

    fn presence(state: PresenceState, node: Option<&str>) -> Vec<u8> {
        PresenceEvent {
            state,
            at: 1,
            reason: None,
            remote_addr: "127.0.0.1:1".into(),
            path: ConnectionPath::Mqtts,
            via_proxy: None,
            node: node.map(str::to_owned),
        }
        .to_json()
    }

    const WAKE: &str = "t/acme/agents/pc-1/wake";

    #[test]
    fn claims_and_connected_events_name_the_node() {
        let mut dir = Directory::default();
        assert_eq!(dir.holder(WAKE).map(|n| &**n), None);
        assert_eq!(
            dir.claimed("acme/agent/pc-1", "n1").as_deref(),
            Some("t/acme/agents/pc-1")
        );
        assert_eq!(dir.claimed("acme/agent/pc-1", "n1"), None, "no move");
        assert_eq!(dir.holder(WAKE).map(|n| &**n), Some("n1"));
        assert_eq!(
            dir.holder("t/acme/agents/pc-1/relay").map(|n| &**n),
            Some("n1")
        );
        assert_eq!(dir.holder("t/acme/agents/pc-2/wake").map(|n| &**n), None);
        let connected = presence(PresenceState::Connected, Some("n2"));
        dir.retained("t/acme/agents/pc-1/presence", &connected);
        assert_eq!(dir.holder(WAKE).map(|n| &**n), Some("n2"));
        // Servers, anonymous clients and malformed ids are not agents.
        dir.claimed("acme/server/s1", "n1");
        dir.claimed("pc-9", "n1");
        dir.claimed("acme/agent/", "n1");
        dir.retained("t/acme/servers/s1/presence", &connected);
        assert_eq!(dir.len(), 1);
    }

    #[test]
    fn a_late_disconnected_event_does_not_undo_a_move() {
        let mut dir = Directory::default();
        dir.retained(
            "t/acme/agents/pc-1/presence",
            &presence(PresenceState::Connected, Some("n2")),
        );
        // The old node's taken-over event arrives after the new node's connected event.
        dir.retained(
            "t/acme/agents/pc-1/presence",
            &presence(PresenceState::Disconnected, Some("n1")),
        );
        assert_eq!(dir.holder(WAKE).map(|n| &**n), Some("n2"));
        // A disconnected event of an agent not known yet (a snapshot) names where its
        // session waits.
        dir.retained(
            "t/acme/agents/pc-3/presence",
            &presence(PresenceState::Disconnected, Some("n3")),
        );
        assert_eq!(
            dir.holder("t/acme/agents/pc-3/wake").map(|n| &**n),
            Some("n3")
        );
        // Events without a node, or not presence at all, change nothing.
        dir.retained(
            "t/acme/agents/pc-4/presence",
            &presence(PresenceState::Connected, None),
        );
        dir.retained("t/acme/agents/pc-4/presence", b"not json");
        dir.retained(
            "t/acme/agents/pc-4/status",
            &presence(PresenceState::Connected, Some("n1")),
        );
        assert_eq!(dir.holder("t/acme/agents/pc-4/wake").map(|n| &**n), None);
    }

    #[test]
    fn a_lost_node_takes_its_agents_along() {
        let mut dir = Directory::default();
        dir.claimed("acme/agent/pc-1", "n1");
        dir.claimed("acme/agent/pc-2", "n2");
        dir.claimed("globex/agent/pc-1", "n1");
        dir.node_lost("n1");
        assert_eq!(dir.holder(WAKE).map(|n| &**n), None);
        assert_eq!(dir.holder("t/globex/agents/pc-1/wake").map(|n| &**n), None);
        assert_eq!(
            dir.holder("t/acme/agents/pc-2/wake").map(|n| &**n),
            Some("n2")
        );
        assert_eq!(dir.len(), 1);
        // The node name is shared again when it comes back.
        dir.claimed("acme/agent/pc-1", "n1");
        assert_eq!(dir.holder(WAKE).map(|n| &**n), Some("n1"));
    }

    #[test]
    fn an_agent_sharing_only_the_first_64_bits_is_not_given_the_others_node() {
        let mut dir = Directory::default();
        dir.claimed("acme/agent/pc-1", "n1");
        // Another agent whose key matches but whose check bits do not (as if the two
        // collided in the first 64 bits): not known, rather than sent to n1.
        let (key, check) = dir.fingerprint("t/acme/agents/pc-1");
        let number = dir.agents[&key].1;
        dir.agents.insert(key, (check ^ 1, number));
        assert_eq!(dir.holder(WAKE), None);
        // Its own claim puts it right again.
        dir.claimed("acme/agent/pc-1", "n1");
        assert_eq!(dir.holder(WAKE).map(|n| &**n), Some("n1"));
    }
}
