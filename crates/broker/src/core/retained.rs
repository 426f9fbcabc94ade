//! Retained messages: the last retained message of every topic, with expiry, and a quota of
//! messages and bytes per tenant so that one tenant's flood cannot fill the broker's memory.
//! The quota counts what this node's clients publish (and their wills); the broker's own
//! presence events (one per identity, bounded by the identities a tenant issues) and
//! messages from other cluster nodes (counted on the node their publisher is connected to)
//! are stored beside it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

use super::message::Message;
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

/// A stored message, and whether it counts against its tenant's quota.
#[derive(Debug)]
struct Stored {
    message: Arc<Message>,
    counted: bool,
}

/// Retained messages by topic, in topic order. A wildcard filter scans only the topics that
/// start with its literal part (`t/acme/agents/+/presence` scans `t/acme/agents...`), so a
/// tenant's subscriptions never walk the other tenants' messages.
#[derive(Debug)]
pub(crate) struct RetainedStore {
    messages: BTreeMap<String, Stored>,
    /// Expiry deadlines of the stored messages that have one.
    expiries: BTreeSet<(Instant, String)>,
    quota: RetainedQuota,
    /// Usage by tenant namespace (see [`RetainedStore::namespace`]).
    usage: HashMap<Box<str>, Usage>,
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
        let previous = self.messages.get(&message.topic).filter(|p| p.counted);
        let messages = used.messages + usize::from(previous.is_none());
        let bytes = used.bytes - previous.map_or(0, |p| size(&p.message)) + size(message);
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
            self.messages.remove(&message.topic)
        } else {
            if let Some(at) = message.expires_at {
                self.expiries.insert((at, message.topic.clone()));
            }
            if counted {
                self.account(message, true);
            }
            let stored = Stored {
                message: Arc::clone(message),
                counted,
            };
            self.messages.insert(message.topic.clone(), stored)
        };
        let Some(previous) = previous else {
            return Ok(());
        };
        if previous.counted {
            self.account(&previous.message, false);
        }
        if let Some(at) = previous.message.expires_at {
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

    /// The unexpired retained messages whose topic matches the (non-shared) `filter`.
    pub fn matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        if !filter.contains(['+', '#']) {
            return self
                .messages
                .get(filter)
                .filter(|s| !s.message.is_expired(now))
                .map(|s| Arc::clone(&s.message))
                .into_iter()
                .collect();
        }
        // Up to the level before the first wildcard: `a/#` also matches `a` itself.
        let wildcard = filter.find(['+', '#']).unwrap_or(filter.len());
        let prefix = filter[..wildcard].rfind('/').map_or("", |i| &filter[..i]);
        self.messages
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(topic, _)| topic.starts_with(prefix))
            .filter(|(topic, s)| filter_matches(filter, topic) && !s.message.is_expired(now))
            .map(|(_, s)| Arc::clone(&s.message))
            .collect()
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
                .get(&topic)
                .is_some_and(|s| s.message.is_expired(now))
                && let Some(gone) = self.messages.remove(&topic)
            {
                if gone.counted {
                    self.account(&gone.message, false);
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
