//! Agents' QoS 1/2 messages this node handed to another node, kept until that node reports
//! that the agent acknowledged them (a [`crate::Receipt`]).
//!
//! Core NATS stores nothing: a wake-up in the queue of a node that dies dies with it. So the
//! node that took the message from its publisher (the console's node) keeps a copy, and when
//! its directory sees the agent on another node (it connected again elsewhere after its node
//! died, or moved), it sends the copy there. The agent may then get a message twice (its node
//! delivered it, and died before the receipt left): Beckon's agent drops a wake-up it has
//! already seen (its replay guard), and MQTT QoS 1 allows it.
//!
//! Plain state: time comes in as arguments, the link does the sending.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::subject::agent_of;

/// How long a message without an expiry is kept (a wake-up carries its own, 10 minutes).
pub const KEEP_WITHOUT_EXPIRY: Duration = Duration::from_secs(600);
/// At most this many messages are kept; beyond, new ones are sent without a copy (the
/// console's resend on `connected` still covers wake-ups).
pub const MAX_KEPT: usize = 1_000_000;

/// A kept message.
#[derive(Debug)]
struct Kept {
    /// Its internal topic (an agent topic).
    topic: Box<str>,
    /// The node it was last sent to.
    holder: Arc<str>,
    /// The encoded [`crate::ClusterMessage`], as sent.
    bytes: Bytes,
    /// When it is no longer worth sending.
    until: Instant,
}

/// A kept message to send again, to the agent's new node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resend {
    /// The origin's number for it.
    pub seq: u64,
    /// Its topic.
    pub topic: String,
    /// The encoded message.
    pub bytes: Bytes,
}

/// The messages kept, by sequence number and by agent.
#[derive(Debug, Default)]
pub struct Unacknowledged {
    by_seq: HashMap<u64, Kept>,
    by_agent: HashMap<Box<str>, Vec<u64>>,
    /// Whether the "full" warning was logged since the last time there was room.
    full: bool,
}

impl Unacknowledged {
    /// Keeps message `seq` on the agent topic `topic`, sent to `holder` at `now`, for as long as
    /// its expiry (`expiry_secs`, the Message Expiry Interval) or [`KEEP_WITHOUT_EXPIRY`].
    /// Returns false when it is not kept (not an agent topic, or [`MAX_KEPT`] reached).
    pub fn keep(
        &mut self,
        now: Instant,
        seq: u64,
        topic: &str,
        expiry_secs: Option<u32>,
        holder: Arc<str>,
        bytes: Bytes,
    ) -> bool {
        let Some(agent) = agent_of(topic) else {
            return false;
        };
        if self.by_seq.len() >= MAX_KEPT {
            if !self.full {
                self.full = true;
                tracing::warn!(
                    kept = MAX_KEPT,
                    "cluster: too many agent messages wait for their receipt; new ones are not kept for a resend if their node dies"
                );
            }
            return false;
        }
        self.full = false;
        let keep = expiry_secs.map_or(KEEP_WITHOUT_EXPIRY, |s| Duration::from_secs(s.into()));
        self.by_agent.entry(agent.into()).or_default().push(seq);
        self.by_seq.insert(
            seq,
            Kept {
                topic: topic.into(),
                holder,
                bytes,
                until: now + keep,
            },
        );
        true
    }

    /// The agent's node reported message `seq` acknowledged: it is no longer kept.
    pub fn acknowledged(&mut self, seq: u64) {
        let Some(kept) = self.by_seq.remove(&seq) else {
            return;
        };
        self.forget(&kept.topic, seq);
    }

    /// The agent `agent` (`t/{tenant}/agents/{id}`) is now held by `node`: the messages kept
    /// for it that went to another node, to send to `node` (now their holder). Expired ones
    /// are dropped.
    pub fn moved(&mut self, now: Instant, agent: &str, node: &Arc<str>) -> Vec<Resend> {
        let Some(seqs) = self.by_agent.get(agent) else {
            return Vec::new();
        };
        let mut resend = Vec::new();
        let mut expired = Vec::new();
        for &seq in seqs {
            let Some(kept) = self.by_seq.get_mut(&seq) else {
                continue;
            };
            if kept.until <= now {
                expired.push(seq);
            } else if kept.holder != *node {
                kept.holder = node.clone();
                resend.push(Resend {
                    seq,
                    topic: kept.topic.to_string(),
                    bytes: kept.bytes.clone(),
                });
            }
        }
        for seq in expired {
            self.acknowledged(seq);
        }
        resend
    }

    /// Node `node` went silent or restarted: what it held is gone with it, so the messages
    /// sent to it go again wherever their agent is seen next, that node (its next run)
    /// included.
    pub fn node_lost(&mut self, node: &str) {
        let gone: Arc<str> = Arc::from("");
        for kept in self.by_seq.values_mut() {
            if &*kept.holder == node {
                kept.holder = gone.clone();
            }
        }
    }

    /// Drops what expired by `now`.
    pub fn expire(&mut self, now: Instant) {
        let expired: Vec<u64> = (self.by_seq.iter())
            .filter(|(_, kept)| kept.until <= now)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            self.acknowledged(seq);
        }
    }

    /// How many messages are kept.
    pub fn len(&self) -> usize {
        self.by_seq.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    fn forget(&mut self, topic: &str, seq: u64) {
        let Some(agent) = agent_of(topic) else {
            return;
        };
        if let Some(seqs) = self.by_agent.get_mut(agent) {
            seqs.retain(|s| *s != seq);
            if seqs.is_empty() {
                self.by_agent.remove(agent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAKE: &str = "t/acme/agents/pc-1/wake";
    const AGENT: &str = "t/acme/agents/pc-1";

    fn node(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[test]
    fn a_message_is_kept_until_its_receipt() {
        let t0 = Instant::now();
        let mut kept = Unacknowledged::default();
        assert!(kept.keep(
            t0,
            1,
            WAKE,
            Some(600),
            node("n2"),
            Bytes::from_static(b"one")
        ));
        assert!(kept.keep(
            t0,
            2,
            WAKE,
            Some(600),
            node("n2"),
            Bytes::from_static(b"two")
        ));
        assert!(!kept.keep(t0, 3, "t/acme/servers/s/x", None, node("n2"), Bytes::new()));
        assert_eq!(kept.len(), 2);
        kept.acknowledged(1);
        kept.acknowledged(99);
        assert_eq!(kept.len(), 1);
        // The agent moves to n3: what it has not acknowledged goes there, once.
        let resend = kept.moved(t0, AGENT, &node("n3"));
        assert_eq!(
            resend,
            [Resend {
                seq: 2,
                topic: WAKE.into(),
                bytes: Bytes::from_static(b"two")
            }]
        );
        assert_eq!(kept.moved(t0, AGENT, &node("n3")), []);
        // Its receipt from n3 ends it.
        kept.acknowledged(2);
        assert!(kept.is_empty());
        assert_eq!(kept.moved(t0, AGENT, &node("n4")), []);
    }

    #[test]
    fn expired_messages_are_not_sent_again() {
        let t0 = Instant::now();
        let mut kept = Unacknowledged::default();
        kept.keep(t0, 1, WAKE, Some(10), node("n2"), Bytes::new());
        kept.keep(t0, 2, WAKE, None, node("n2"), Bytes::new());
        kept.keep(
            t0,
            3,
            "t/acme/agents/pc-2/wake",
            Some(10),
            node("n2"),
            Bytes::new(),
        );
        let later = t0 + Duration::from_secs(11);
        let resend = kept.moved(later, AGENT, &node("n3"));
        assert_eq!(resend.iter().map(|r| r.seq).collect::<Vec<_>>(), [2]);
        kept.expire(later);
        assert_eq!(kept.len(), 1, "the one without expiry stays");
        kept.expire(t0 + KEEP_WITHOUT_EXPIRY);
        assert!(kept.is_empty());
        assert!(kept.by_agent.is_empty());
    }

    #[test]
    fn after_its_node_restarted_an_agent_back_on_it_gets_its_messages_again() {
        let t0 = Instant::now();
        let mut kept = Unacknowledged::default();
        kept.keep(t0, 1, WAKE, None, node("n2"), Bytes::new());
        kept.keep(
            t0,
            2,
            "t/acme/agents/pc-2/wake",
            None,
            node("n3"),
            Bytes::new(),
        );
        kept.node_lost("n2");
        assert_eq!(kept.moved(t0, AGENT, &node("n2")).len(), 1);
        assert_eq!(kept.moved(t0, "t/acme/agents/pc-2", &node("n3")), []);
    }

    #[test]
    fn an_agent_still_on_the_node_it_was_sent_to_gets_nothing_again() {
        let t0 = Instant::now();
        let mut kept = Unacknowledged::default();
        kept.keep(t0, 1, WAKE, None, node("n2"), Bytes::new());
        assert_eq!(kept.moved(t0, AGENT, &node("n2")), []);
        assert_eq!(kept.moved(t0, "t/acme/agents/pc-9", &node("n3")), []);
        assert_eq!(kept.len(), 1);
    }
}
