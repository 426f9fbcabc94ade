//! Retained messages: the last retained message of every topic, with expiry, and a quota of
//! messages and bytes per tenant so that one tenant's flood cannot fill the broker's memory.
//! The quota counts what this node's clients publish (and their wills); the broker's own
//! presence events (one per identity, bounded by the identities a tenant issues) and
//! messages from other cluster nodes (counted on the node their publisher is connected to)
//! are stored beside it.
//!
//! Presence events are kept as their fields, not as messages: every cluster node stores one
//! for every identity of the whole cluster, and a message (topic twice, the shared message,
//! its JSON) costs about 470 bytes where the fields take about a third of that.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

use beckon_identity::{ConnectionPath, PresenceEvent, PresenceState};
use beckon_mqtt::{Properties, QoS};
use bytes::Bytes;

use super::message::Message;
use super::presence::PresenceReason;
use super::topic_tree::filter_matches;

/// How much one tenant may retain.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetainedQuota {
    /// Messages per tenant.
    pub messages: usize,
    /// Bytes (topic and payload) per tenant.
    pub bytes: usize,
    /// Topics are tenant namespaces (`t/{tenant}/...`, `anon/...`); otherwise all topics
    /// share one quota.
    pub per_tenant: bool,
}

/// Which quota a retained message would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OverQuota {
    Messages,
    Bytes,
}

/// What one tenant retains.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    messages: usize,
    bytes: usize,
}

/// What is stored for a topic.
#[derive(Debug)]
enum Stored {
    /// A message as published, and whether it counts against its tenant's quota.
    Message {
        message: Arc<Message>,
        counted: bool,
    },
    /// A presence event (never counted), as its fields.
    Presence(PresenceRecord),
}

impl Stored {
    /// The message, when it counts against its tenant's quota.
    fn counted(&self) -> Option<&Message> {
        match self {
            Self::Message {
                message,
                counted: true,
            } => Some(message),
            _ => None,
        }
    }

    fn expires_at(&self) -> Option<Instant> {
        match self {
            Self::Message { message, .. } => message.expires_at,
            Self::Presence(_) => None,
        }
    }

    fn is_expired(&self, now: Instant) -> bool {
        match self {
            Self::Message { message, .. } => message.is_expired(now),
            Self::Presence(_) => false,
        }
    }
}

/// A retained presence event that its JSON can be written again from, byte for byte.
/// 40 bytes: the address as its bytes, the node as a number.
#[derive(Debug, Clone, Copy)]
struct PresenceRecord {
    at: i64,
    /// The address (an IPv4 one mapped into IPv6, see `v4`) and port.
    ip: [u8; 16],
    port: u16,
    v4: bool,
    /// The node's number in [`RetainedStore::nodes`], or [`NO_NODE`].
    node: u16,
    state: PresenceState,
    reason: Option<PresenceReason>,
    path: ConnectionPath,
    via_proxy: Option<bool>,
    qos: QoS,
}

/// Node names presence records may number; a record naming another one is kept as a message.
const MAX_NODE_NAMES: usize = 4096;

/// A presence record's node number when the event names none (a single broker).
const NO_NODE: u16 = u16::MAX;

/// Retained messages by topic, in topic order. A wildcard filter scans only the topics that
/// start with its literal part (`t/acme/agents/+/presence` scans `t/acme/agents...`), so a
/// tenant's subscriptions never walk the other tenants' messages.
#[derive(Debug)]
pub(crate) struct RetainedStore {
    messages: BTreeMap<Box<str>, Stored>,
    /// Expiry deadlines of the stored messages that have one.
    expiries: BTreeSet<(Instant, String)>,
    quota: RetainedQuota,
    /// Usage by tenant namespace (see [`RetainedStore::namespace`]).
    usage: HashMap<Box<str>, Usage>,
    /// The node names presence records refer to, by number.
    nodes: Vec<Arc<str>>,
    node_numbers: HashMap<Arc<str>, u16>,
}

/// What a retained message counts against the bytes quota.
fn size(message: &Message) -> usize {
    message.topic.len() + message.payload.len()
}

impl RetainedStore {
    pub fn new(quota: RetainedQuota) -> Self {
        Self {
            messages: BTreeMap::new(),
            expiries: BTreeSet::new(),
            quota,
            usage: HashMap::new(),
            nodes: Vec::new(),
            node_numbers: HashMap::new(),
        }
    }

    /// The namespace whose quota `topic` counts against: `t/{tenant}/` or `anon/` with
    /// tenants, the empty namespace otherwise.
    fn namespace<'a>(&self, topic: &'a str) -> &'a str {
        if !self.quota.per_tenant {
            return "";
        }
        if let Some(rest) = topic.strip_prefix("t/") {
            return rest.find('/').map_or(topic, |i| &topic[..i + 3]);
        }
        topic.find('/').map_or(topic, |i| &topic[..=i])
    }

    /// Whether storing `message` stays within its tenant's quota (replacing a topic's message
    /// counts the difference; deleting always fits).
    pub fn admits(&self, message: &Message) -> Result<(), OverQuota> {
        if message.payload.is_empty() {
            return Ok(());
        }
        let used = self
            .usage
            .get(self.namespace(&message.topic))
            .copied()
            .unwrap_or_default();
        let previous = self
            .messages
            .get(message.topic.as_str())
            .and_then(Stored::counted);
        let messages = used.messages + usize::from(previous.is_none());
        let bytes = used.bytes - previous.map_or(0, size) + size(message);
        if messages > self.quota.messages {
            Err(OverQuota::Messages)
        } else if bytes > self.quota.bytes {
            Err(OverQuota::Bytes)
        } else {
            Ok(())
        }
    }

    /// Counts `message` in (`added`) or out of its tenant's usage.
    fn account(&mut self, message: &Message, added: bool) {
        let namespace = self.namespace(&message.topic);
        if added {
            let usage = self.usage.entry(namespace.into()).or_default();
            usage.messages += 1;
            usage.bytes += size(message);
        } else if let Some(usage) = self.usage.get_mut(namespace) {
            usage.messages -= 1;
            usage.bytes -= size(message);
            if usage.messages == 0 {
                self.usage.remove(namespace);
            }
        }
    }

    /// Number of retained messages stored.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Stores `message` for its topic, replacing the previous one; an empty payload deletes
    /// the topic's retained message instead ([MQTT-3.3.1-6]). A `counted` message (from a
    /// client of this node) over its tenant's quota is not stored (the previous one stays)
    /// and the quota it broke is returned.
    pub fn store(&mut self, message: &Arc<Message>, counted: bool) -> Result<(), OverQuota> {
        if counted {
            self.admits(message)?;
        }
        let previous = if message.payload.is_empty() {
            self.messages.remove(message.topic.as_str())
        } else {
            if let Some(at) = message.expires_at {
                self.expiries.insert((at, message.topic.clone()));
            }
            if counted {
                self.account(message, true);
            }
            let record = if counted {
                None
            } else {
                self.presence_record(message)
            };
            let stored = match record {
                Some(record) => Stored::Presence(record),
                None => Stored::Message {
                    message: Arc::clone(message),
                    counted,
                },
            };
            self.messages.insert(message.topic.as_str().into(), stored)
        };
        let Some(previous) = previous else {
            return Ok(());
        };
        if let Some(counted) = previous.counted() {
            self.account(counted, false);
        }
        if let Some(at) = previous.expires_at() {
            // The same deadline may have been inserted just now for the new message.
            if message.payload.is_empty() || message.expires_at != Some(at) {
                self.expiries.remove(&(at, message.topic.clone()));
            }
        }
        Ok(())
    }

    /// Whether a retained message is stored on `topic`.
    pub fn contains(&self, topic: &str) -> bool {
        self.messages.contains_key(topic)
    }

    /// `message` as a presence record, when it is a presence event (the broker's own, or
    /// another node's) whose JSON the record writes again byte for byte; anything else, or
    /// anything unusual in it, is kept as the message it is.
    fn presence_record(&mut self, message: &Message) -> Option<PresenceRecord> {
        if !is_presence_topic(&message.topic)
            || !message.retain
            || message.expires_at.is_some()
            || message.receipt.is_some()
            || !message.properties.is_empty()
        {
            return None;
        }
        let event = PresenceEvent::from_json(&message.payload).ok()?;
        let reason = match event.reason.as_deref() {
            Some(reason) => Some(PresenceReason::parse(reason)?),
            None => None,
        };
        let remote: SocketAddr = event.remote_addr.parse().ok()?;
        let ip = match remote.ip() {
            IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            IpAddr::V6(ip) => ip,
        };
        let mut record = PresenceRecord {
            at: event.at,
            ip: ip.octets(),
            port: remote.port(),
            v4: remote.is_ipv4(),
            node: NO_NODE,
            state: event.state,
            reason,
            path: event.path,
            via_proxy: event.via_proxy,
            qos: message.qos,
        };
        // Compared with the event's own node name; the name is numbered only when it
        // matches, so that what is kept as a message takes no room among the names.
        if event_json(&record, event.node.as_deref()) != message.payload {
            return None;
        }
        if let Some(node) = event.node.as_deref() {
            record.node = self.node_number(node)?;
        }
        Some(record)
    }

    /// The number of node name `node`, given one if new (while there is room).
    fn node_number(&mut self, node: &str) -> Option<u16> {
        if let Some(&number) = self.node_numbers.get(node) {
            return Some(number);
        }
        // A name a broker would not take (see the `[cluster]` config), or no room left (which
        // also keeps every number below NO_NODE).
        let valid = node.len() <= 200
            && (node.bytes()).all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid || self.nodes.len() >= MAX_NODE_NAMES {
            return None;
        }
        let number = u16::try_from(self.nodes.len()).ok()?;
        let node: Arc<str> = Arc::from(node);
        self.nodes.push(Arc::clone(&node));
        self.node_numbers.insert(node, number);
        Some(number)
    }

    /// The JSON payload of `record`'s event.
    fn presence_json(&self, record: &PresenceRecord) -> Vec<u8> {
        let node = self.nodes.get(usize::from(record.node));
        event_json(record, node.map(|n| &**n))
    }

    /// The message stored on `topic`. A presence record's is written out anew on each read
    /// (a JSON encode, and a message of its own for every reader where a stored one was
    /// shared): reads are a server subscribing to presence, a node joining, a connect
    /// across nodes; the records are kept for every identity of the cluster.
    fn message(&self, topic: &str, stored: &Stored) -> Arc<Message> {
        match stored {
            Stored::Message { message, .. } => Arc::clone(message),
            Stored::Presence(record) => Arc::new(Message {
                topic: topic.to_owned(),
                payload: Bytes::from(self.presence_json(record)),
                qos: record.qos,
                retain: true,
                properties: Properties::default(),
                expires_at: None,
                receipt: None,
            }),
        }
    }

    /// The unexpired retained messages whose topic matches the (non-shared) `filter`.
    pub fn matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        (self.entries(filter, now))
            .map(|(topic, stored)| self.message(topic, stored))
            .collect()
    }

    /// Those of [`RetainedStore::matching`] that may be connected presence events naming
    /// `node`: presence records only when they do (nothing written out for the others), any
    /// other message as it is, for the caller to read.
    pub fn connected_on_node(&self, filter: &str, node: &str, now: Instant) -> Vec<Arc<Message>> {
        let number = self.node_numbers.get(node).copied();
        (self.entries(filter, now))
            .filter(|(_, stored)| match stored {
                Stored::Presence(record) => {
                    record.state == PresenceState::Connected && Some(record.node) == number
                }
                Stored::Message { .. } => true,
            })
            .map(|(topic, stored)| self.message(topic, stored))
            .collect()
    }

    /// The unexpired entries whose topic matches the (non-shared) `filter`.
    fn entries<'a>(
        &'a self,
        filter: &'a str,
        now: Instant,
    ) -> impl Iterator<Item = (&'a str, &'a Stored)> + 'a {
        let (prefix, exact) = if filter.contains(['+', '#']) {
            // Up to the level before the first wildcard: `a/#` also matches `a` itself.
            let wildcard = filter.find(['+', '#']).unwrap_or(filter.len());
            (
                filter[..wildcard].rfind('/').map_or("", |i| &filter[..i]),
                false,
            )
        } else {
            (filter, true)
        };
        self.messages
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(topic, _)| topic.starts_with(prefix))
            .take_while(move |(topic, _)| !exact || &***topic == filter)
            .filter(move |(topic, stored)| filter_matches(filter, topic) && !stored.is_expired(now))
            .map(|(topic, stored)| (&**topic, stored))
    }

    /// Deletes the retained messages that expired by `now`; returns how many.
    pub fn purge(&mut self, now: Instant) -> usize {
        let mut purged = 0;
        while let Some((at, _)) = self.expiries.first() {
            if *at > now {
                break;
            }
            let Some((_, topic)) = self.expiries.pop_first() else {
                break;
            };
            if self
                .messages
                .get(topic.as_str())
                .is_some_and(|stored| stored.is_expired(now))
                && let Some(gone) = self.messages.remove(topic.as_str())
            {
                if let Some(counted) = gone.counted() {
                    self.account(counted, false);
                }
                purged += 1;
            }
        }
        purged
    }

    /// When the next retained message expires.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.expiries.first().map(|(at, _)| *at)
    }
}

/// Whether `topic` is a presence topic: `t/{tenant}/agents/{id}/presence` or
/// `t/{tenant}/servers/{id}/presence`.
fn is_presence_topic(topic: &str) -> bool {
    let mut levels = topic.split('/');
    matches!(
        (levels.next(), levels.next(), levels.next(), levels.next(), levels.next(), levels.next()),
        (Some("t"), Some(tenant), Some("agents" | "servers"), Some(id), Some("presence"), None)
            if !tenant.is_empty() && !id.is_empty()
    )
}

/// The JSON payload of `record`'s event, naming `node`.
fn event_json(record: &PresenceRecord, node: Option<&str>) -> Vec<u8> {
    let ip = Ipv6Addr::from(record.ip);
    let ip = match ip.to_ipv4_mapped() {
        Some(v4) if record.v4 => IpAddr::V4(v4),
        _ => IpAddr::V6(ip),
    };
    PresenceEvent {
        state: record.state,
        at: record.at,
        reason: record.reason.map(|r| r.as_str().to_owned()),
        remote_addr: SocketAddr::new(ip, record.port).to_string(),
        path: record.path,
        via_proxy: record.via_proxy,
        node: node.map(str::to_owned),
    }
    .to_json()
}

#[cfg(test)]
mod tests {
    use super::*;
    use beckon_mqtt::PropertySet;

    fn store() -> RetainedStore {
        RetainedStore::new(RetainedQuota {
            messages: 100,
            bytes: 1 << 20,
            per_tenant: true,
        })
    }

    fn message(topic: &str, payload: &[u8]) -> Arc<Message> {
        message_with(topic, payload, |_| {})
    }

    fn message_with(
        topic: &str,
        payload: &[u8],
        change: impl FnOnce(&mut Message),
    ) -> Arc<Message> {
        let payload = Bytes::copy_from_slice(payload);
        let mut retained = Message::new(
            Instant::now(),
            topic.into(),
            payload,
            QoS::AtLeastOnce,
            true,
            Properties::default(),
        );
        change(&mut retained);
        Arc::new(retained)
    }

    fn event(reason: Option<&str>, remote: &str, node: Option<&str>) -> Vec<u8> {
        PresenceEvent {
            state: PresenceState::Disconnected,
            at: 1_765_000_000_123,
            reason: reason.map(str::to_owned),
            remote_addr: remote.into(),
            path: ConnectionPath::SharedWebSocket,
            via_proxy: Some(true),
            node: node.map(str::to_owned),
        }
        .to_json()
    }

    fn kept_as_record(store: &RetainedStore, topic: &str) -> bool {
        matches!(store.messages.get(topic), Some(Stored::Presence(_)))
    }

    #[test]
    fn presence_events_come_back_byte_for_byte_from_their_records() {
        let mut store = store();
        let events = [
            (
                "t/acme/agents/pc-1/presence",
                event(None, "127.0.0.1:5000", Some("n1")),
            ),
            (
                "t/acme/agents/pc-2/presence",
                event(Some("taken_over"), "[2001:db8::7]:443", Some("n2")),
            ),
            (
                "t/acme/servers/s1/presence",
                event(Some("node_lost"), "[::ffff:10.0.0.1]:9", None),
            ),
            (
                "t/acme/agents/pc-3/presence",
                event(Some("revoked"), "10.1.2.3:65535", Some("n1")),
            ),
        ];
        for (topic, payload) in &events {
            store.store(&message(topic, payload), false).unwrap();
            assert!(kept_as_record(&store, topic), "{topic}");
        }
        let now = Instant::now();
        let back = store.matching("t/acme/+/+/presence", now);
        assert_eq!(back.len(), events.len());
        for (topic, payload) in &events {
            let m = back.iter().find(|m| m.topic == *topic).unwrap();
            assert_eq!(&m.payload[..], &payload[..], "{topic}");
            assert_eq!(
                (m.qos, m.retain, m.expires_at),
                (QoS::AtLeastOnce, true, None)
            );
            assert!(m.properties.is_empty());
        }
        // One topic alone, and an agent's own topics.
        let one = store.matching("t/acme/agents/pc-2/presence", now);
        assert_eq!(one[0].payload, Bytes::from(events[1].1.clone()));
        assert_eq!(store.matching("t/acme/agents/pc-3/+", now).len(), 1);
        // Replaced by the next event, deleted by an empty payload.
        let next = event(None, "127.0.0.1:5001", Some("n3"));
        store.store(&message(events[0].0, &next), false).unwrap();
        assert_eq!(
            store.matching(events[0].0, now)[0].payload,
            Bytes::from(next)
        );
        store.store(&message(events[0].0, b""), false).unwrap();
        assert!(store.matching(events[0].0, now).is_empty());
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn anything_unusual_is_kept_as_the_message_it_is() {
        let mut store = store();
        let plain = event(None, "127.0.0.1:1", Some("n1"));
        let mut reordered = serde_json::from_slice::<serde_json::Value>(&plain).unwrap();
        reordered["extra"] = serde_json::Value::Bool(true);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            // Not byte for byte what the broker writes: spaces, another field, another reason.
            (
                "t/a/agents/1/presence",
                String::from_utf8(plain.clone())
                    .unwrap()
                    .replace(',', ", ")
                    .into_bytes(),
            ),
            (
                "t/a/agents/2/presence",
                serde_json::to_vec(&reordered).unwrap(),
            ),
            (
                "t/a/agents/3/presence",
                event(Some("meteor"), "127.0.0.1:1", None),
            ),
            ("t/a/agents/4/presence", event(None, "[fe80::1%2]:80", None)),
            ("t/a/agents/5/presence", b"not json".to_vec()),
            // Not a presence topic; a node name no broker takes.
            ("t/a/devices/9/presence", plain.clone()),
            ("anon/x/presence", plain.clone()),
            (
                "t/a/agents/10/presence",
                event(None, "127.0.0.1:1", Some("n 1")),
            ),
            (
                "t/a/agents/11/presence",
                event(None, "127.0.0.1:1", Some(&"n".repeat(201))),
            ),
        ];
        for (topic, payload) in &cases {
            store.store(&message(topic, payload), false).unwrap();
            assert!(!kept_as_record(&store, topic), "{topic}");
        }
        // A client's own message (counted), one with properties, one that expires.
        store
            .store(&message("t/a/agents/6/presence", &plain), true)
            .unwrap();
        let with_props = message_with("t/a/agents/7/presence", &plain, |m| {
            m.properties = Properties::from(PropertySet {
                content_type: Some("application/json".into()),
                ..PropertySet::default()
            });
        });
        store.store(&with_props, false).unwrap();
        let expiring = message_with("t/a/agents/8/presence", &plain, |m| {
            m.expires_at = Some(Instant::now() + std::time::Duration::from_secs(60));
        });
        store.store(&expiring, false).unwrap();
        for n in 6..=8 {
            assert!(!kept_as_record(&store, &format!("t/a/agents/{n}/presence")));
        }
        let now = Instant::now();
        for (topic, payload) in &cases {
            assert_eq!(&store.matching(topic, now)[0].payload[..], &payload[..]);
        }
        let props = &store.matching("t/a/agents/7/presence", now)[0].properties;
        assert!(!props.is_empty());
        // The counted one still counts against the tenant's quota.
        assert_eq!(store.usage.get("t/a/").map(|u| u.messages), Some(1));
        // Nothing kept as a message took a place among the node names.
        assert!(store.nodes.is_empty(), "{:?}", store.nodes);
    }

    #[test]
    fn a_lost_nodes_connected_events_are_found_without_writing_out_the_others() {
        let mut store = store();
        let connected = |node: &str| {
            let mut event = PresenceEvent::from_json(&event(None, "127.0.0.1:1", None)).unwrap();
            event.state = PresenceState::Connected;
            event.node = Some(node.into());
            event.to_json()
        };
        store
            .store(&message("t/a/agents/1/presence", &connected("n1")), false)
            .unwrap();
        store
            .store(&message("t/a/agents/2/presence", &connected("n2")), false)
            .unwrap();
        let gone = event(Some("client_disconnect"), "127.0.0.1:1", Some("n1"));
        store
            .store(&message("t/a/agents/3/presence", &gone), false)
            .unwrap();
        // Not a record: handed over for the caller to read.
        store
            .store(&message("t/a/agents/4/presence", b"{}"), false)
            .unwrap();
        let now = Instant::now();
        let topics = |node| {
            let found = store.connected_on_node("t/+/agents/+/presence", node, now);
            found.iter().map(|m| m.topic.clone()).collect::<Vec<_>>()
        };
        assert_eq!(
            topics("n1"),
            ["t/a/agents/1/presence", "t/a/agents/4/presence"]
        );
        assert_eq!(
            topics("n2"),
            ["t/a/agents/2/presence", "t/a/agents/4/presence"]
        );
        assert_eq!(topics("n9"), ["t/a/agents/4/presence"]);
    }
}
