//! Retained messages: the last retained message of every topic, with expiry.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;

use super::message::Message;
use super::topic_tree::filter_matches;

/// Retained messages by topic. Exact filters are a hash lookup; wildcard filters scan the
/// store (retained messages are few next to subscriptions in a push service).
#[derive(Debug, Default)]
pub(crate) struct RetainedStore {
    messages: HashMap<String, Arc<Message>>,
    /// Expiry deadlines of the stored messages that have one.
    expiries: BTreeSet<(Instant, String)>,
}

impl RetainedStore {
    /// Number of retained messages stored.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Stores `message` for its topic, replacing the previous one; an empty payload deletes
    /// the topic's retained message instead ([MQTT-3.3.1-6]).
    pub fn store(&mut self, message: &Arc<Message>) {
        let previous = if message.payload.is_empty() {
            self.messages.remove(&message.topic)
        } else {
            if let Some(at) = message.expires_at {
                self.expiries.insert((at, message.topic.clone()));
            }
            self.messages
                .insert(message.topic.clone(), Arc::clone(message))
        };
        if let Some(at) = previous.and_then(|p| p.expires_at) {
            // The same deadline may have been inserted just now for the new message.
            if message.payload.is_empty() || message.expires_at != Some(at) {
                self.expiries.remove(&(at, message.topic.clone()));
            }
        }
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
                .filter(|m| !m.is_expired(now))
                .cloned()
                .into_iter()
                .collect();
        }
        let mut found: Vec<Arc<Message>> = self
            .messages
            .iter()
            .filter(|(topic, m)| filter_matches(filter, topic) && !m.is_expired(now))
            .map(|(_, m)| Arc::clone(m))
            .collect();
        // A stable order for clients and tests.
        found.sort_by(|a, b| a.topic.cmp(&b.topic));
        found
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
            if self.messages.get(&topic).is_some_and(|m| m.is_expired(now)) {
                self.messages.remove(&topic);
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
