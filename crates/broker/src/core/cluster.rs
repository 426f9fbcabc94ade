//! The core as a cluster node: what it hands to the cluster link (messages, interest,
//! claims), what it takes from other nodes, and the retained store as other nodes and
//! presence read it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use beckon_cluster::Receipt;
use beckon_mqtt::{Packet, Publish, QoS};
use bytes::Bytes;

use super::message::Message;
use super::session::Pending;
use super::topic_tree::{SessionKey, filter_matches, parse_filter};
use super::{Action, BrokerCore, ConnId};

/// What a clustered core hands to the cluster link (see [`BrokerCore::enable_cluster`]).
#[allow(clippy::large_enum_variant)] // as Action: no allocation per message
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterOut {
    /// A message published on this node, for the other nodes' subscribers. Its Message
    /// Expiry Interval is what is left of it now.
    Publish {
        /// The message as a PUBLISH with the internal topic (no packet id).
        publish: Publish,
        /// A PUBACK/PUBREC the core did not send: it goes to `conn` once the message left for
        /// the cluster ([`BrokerCore::cluster_ack`] gives it back).
        ack: Option<(ConnId, Packet)>,
    },
    /// The first session subscribed to `filter` (`added`), or the last one left it.
    Interest {
        /// The topic filter, without a `$share/{group}/` prefix.
        filter: String,
        /// Added or removed.
        added: bool,
    },
    /// The first session joined the shared subscription `share` (`$share/{group}/{filter}`)
    /// here (`added`), or the last one left it.
    SharedInterest {
        /// The shared subscription as subscribed.
        share: String,
        /// Added or removed.
        added: bool,
    },
    /// A client here acknowledged a message that came with a receipt: its origin node stops
    /// keeping it.
    Delivered(Receipt),
    /// A connection for `client_id` was accepted on this node: other nodes drop theirs.
    Claim {
        /// The client id.
        client_id: String,
        /// Whether the new connection started clean.
        clean_start: bool,
        /// When it was accepted (Unix ms): of two connections accepted at the same moment
        /// on two nodes, the later one stays (then the greater node name).
        at_ms: i64,
    },
}

/// A connection accepted on another node for a client id ([`BrokerCore::handle_remote_claim`]).
#[derive(Debug, Clone, Copy)]
pub struct RemoteClaim<'a> {
    /// The node.
    pub node: &'a str,
    /// The client id.
    pub client_id: &'a str,
    /// Whether it started clean.
    pub clean_start: bool,
    /// When it was accepted there (Unix ms); `None` from a node that does not say (it wins).
    pub at_ms: Option<i64>,
}

/// What a remote claim did here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// No connection or session for that client id here.
    None,
    /// The connection here was closed (0x8E) and its session ended.
    TakenOver(ConnId),
    /// The connection here is the newer one and stays: the other node was told so (this
    /// node's claim again) and closes its own.
    Kept(ConnId),
}

/// The cluster side of a core: what waits to go out, and the filters subscribed here.
#[derive(Debug, Default)]
pub(super) struct ClusterState {
    pub(super) out: Vec<ClusterOut>,
    /// Sessions subscribed per filter, to tell first and last apart.
    pub(super) interest: HashMap<String, usize>,
    /// Sessions in each shared subscription (`$share/{group}/{filter}`), likewise.
    pub(super) shared: HashMap<String, usize>,
    /// What this node claimed for each session it holds a connection of.
    pub(super) claims: HashMap<SessionKey, Claim>,
    /// This node's name: assigned client ids carry it, so that two nodes never assign the
    /// same one (which would take the other's client over).
    pub(super) node: String,
    /// Messages with a receipt that came for an agent's session before it subscribed to
    /// their topic (it connects, and its wake-ups follow it here before its SUBSCRIBE):
    /// delivered when it does (see [`BrokerCore::handle_remote_publish`]).
    pub(super) parked: HashMap<SessionKey, Vec<Arc<Message>>>,
}

/// A connection this node accepted for a session (and told the other nodes of).
#[derive(Debug, Clone, Copy)]
pub(super) struct Claim {
    /// When it was accepted (Unix ms), and whether it started clean: to settle two claims of
    /// one client id at the same moment.
    pub(super) at_ms: i64,
    pub(super) clean_start: bool,
    /// The session is a tenant agent's and holds its own topics here (see
    /// [`BrokerCore::hold_own_topics`]).
    pub(super) holds_own: bool,
}

/// At most this many messages wait for an agent's SUBSCRIBE; older ones make room.
const MAX_PARKED: usize = 32;

impl BrokerCore {
    /// Makes this core a cluster node: from now on it hands out what other nodes must know
    /// ([`BrokerCore::take_cluster_out`]): messages published here (QoS 1/2 acknowledgements
    /// held until the cluster took the message), the filters its sessions subscribe to, and
    /// the client ids it accepts. `node` is this node's name, unique in the cluster. Call it
    /// before the first connection.
    pub fn enable_cluster(&mut self, node: &str) {
        self.cluster = Some(ClusterState {
            node: node.to_owned(),
            ..ClusterState::default()
        });
        self.presence.set_node(node);
    }

    /// What waits to go to the cluster, in order; empty when not clustered.
    pub fn take_cluster_out(&mut self) -> Vec<ClusterOut> {
        self.cluster
            .as_mut()
            .map(|c| std::mem::take(&mut c.out))
            .unwrap_or_default()
    }

    /// A message published on another node: stored if retained and delivered to the
    /// matching local subscriptions only (never handed back to the cluster). With a
    /// `receipt`, each client's acknowledgement of it is reported back
    /// ([`ClusterOut::Delivered`]). Returns whether a local subscription received it.
    pub fn handle_remote_publish(
        &mut self,
        now: Instant,
        publish: Publish,
        receipt: Option<Receipt>,
        out: &mut Vec<Action>,
    ) -> bool {
        if publish.topic.is_empty() || publish.topic.contains(['+', '#', '\0']) {
            return false;
        }
        // Presence events are retained; only they can contradict a connection held here.
        let presence = (publish.retain && publish.topic.ends_with("/presence"))
            .then(|| (publish.topic.clone(), publish.payload.clone()));
        let mut message = self.remote_message(now, publish);
        message.receipt = receipt.map(Box::new);
        let message = Arc::new(message);
        if message.receipt.is_some() {
            self.park_for_agent(&message);
        }
        let delivered = self.route(now, None, message, out);
        if let Some((topic, payload)) = presence {
            self.answer_presence_conflict(now, topic, &payload, out);
        }
        delivered
    }

    /// A message with a receipt for the agent whose session is here but not subscribed to
    /// its topic yet is kept for its SUBSCRIBE: an agent that moves here after its node died
    /// gets the wake-ups that follow it even when they arrive between its CONNECT and
    /// its SUBSCRIBE.
    fn park_for_agent(&mut self, message: &Arc<Message>) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let Some(client_id) = agent_client_id(&message.topic) else {
            return;
        };
        let Some(&key) = self.by_client_id.get(&client_id) else {
            return;
        };
        let subscribed = self.sessions.get(&key).is_some_and(|s| {
            s.subscriptions
                .iter()
                .any(|f| filter_matches(f, &message.topic))
        });
        if subscribed || !cluster.claims.get(&key).is_some_and(|c| c.holds_own) {
            return;
        }
        let parked = cluster.parked.entry(key).or_default();
        if parked.len() >= MAX_PARKED {
            parked.remove(0);
        }
        parked.push(message.clone());
    }

    /// A message NATS gave this node for the shared subscription `share`
    /// (`$share/{group}/{filter}`, one node per group in the cluster): delivered to one local
    /// member of the group, whichever node published it. Returns whether one received it.
    pub fn handle_shared_publish(
        &mut self,
        now: Instant,
        share: &str,
        publish: Publish,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(filter) = parse_filter(share) else {
            return false;
        };
        // Retained messages travel on one subject for all topics.
        if !filter_matches(filter.filter, &publish.topic) {
            return false;
        }
        let sessions = &self.sessions;
        let online = |key| sessions.get(&key).is_some_and(|s| s.conn.is_some());
        let Some(entry) = self.tree.pick_shared(filter, &online) else {
            return false;
        };
        let message = self.remote_message(now, publish);
        let Some(session) = self.sessions.get_mut(&entry.session) else {
            return false;
        };
        let delivery = Pending {
            qos: entry.qos.min(message.qos),
            retain: message.retain && entry.retain_as_published,
            sub_ids: entry.id.into_iter().collect(),
            msg: Arc::new(message),
        };
        session.deliver(now, delivery, &self.config, &mut self.stats, out);
        true
    }

    /// A message from the cluster as this node keeps it (QoS capped at its maximum).
    fn remote_message(&self, now: Instant, publish: Publish) -> Message {
        // A retained message is kept (presence: one per identity of the cluster on every
        // node): its own payload, not a slice of the whole packet it arrived in.
        let payload = if publish.retain {
            Bytes::copy_from_slice(&publish.payload)
        } else {
            publish.payload
        };
        Message::new(
            now,
            publish.topic,
            payload,
            publish.qos.min(self.config.max_qos),
            publish.retain,
            publish.properties,
        )
    }

    /// Another node accepted a connection for a client id: the connection held here, if any,
    /// gets DISCONNECT 0x8E (Session taken over, v5) and is closed, and the session ends here
    /// (its state does not move between nodes). The old will is published when the new
    /// connection started clean or the old session had no expiry, as for a local takeover.
    ///
    /// Unless the connection here is the newer one (two connections at the same moment: the
    /// claims crossed in NATS): it stays, and this node claims the client id again so that
    /// the other node closes its own. Every node decides alike, by accept time, then node
    /// name, so exactly one connection remains.
    pub fn handle_remote_claim(
        &mut self,
        now: Instant,
        claim: RemoteClaim<'_>,
        out: &mut Vec<Action>,
    ) -> ClaimOutcome {
        let Some(&key) = self.by_client_id.get(claim.client_id) else {
            return ClaimOutcome::None;
        };
        let conn = self.sessions.get(&key).and_then(|s| s.conn);
        if let (Some(conn), Some(remote_at), Some(cluster)) = (conn, claim.at_ms, &mut self.cluster)
            && let Some(&Claim {
                at_ms, clean_start, ..
            }) = cluster.claims.get(&key)
            && (at_ms, cluster.node.as_str()) > (remote_at, claim.node)
        {
            // The other node's connected event, on its way, is answered when it arrives
            // ([`BrokerCore::answer_presence_conflict`]).
            cluster.out.push(ClusterOut::Claim {
                client_id: claim.client_id.to_owned(),
                clean_start,
                at_ms,
            });
            return ClaimOutcome::Kept(conn);
        }
        if let Some(conn) = conn {
            // The node that took the client over publishes the disconnected event.
            self.presence.end(conn);
        }
        let by = format!("a connection on node {}", claim.node);
        if self
            .take_over(now, key, claim.clean_start, &by, out)
            .is_some()
        {
            self.end_session(key);
        }
        conn.map_or(ClaimOutcome::None, ClaimOutcome::TakenOver)
    }

    /// Clustered: the session of `conn` is a tenant agent's, whose own topics
    /// (`t/{tenant}/agents/{id}/+`, from its client id `{tenant}/agent/{id}`) other nodes
    /// send to this node's subject, found through their directory
    /// (`beckon_cluster::directory`): the session's own subscriptions inside them need no
    /// NATS interest of their own.
    pub(super) fn hold_own_topics(&mut self, conn: ConnId) {
        let (Some(cluster), Some(key)) = (&mut self.cluster, self.conns.get(&conn)) else {
            return;
        };
        if let Some(claim) = cluster.claims.get_mut(key) {
            claim.holds_own = true;
        }
    }

    /// The connection holding `client_id` here, if any.
    pub fn connection_of(&self, client_id: &str) -> Option<ConnId> {
        let key = self.by_client_id.get(client_id)?;
        self.sessions.get(key)?.conn
    }

    /// The payload of the retained message on `topic`, if any.
    pub fn retained_payload(&self, topic: &str, now: Instant) -> Option<Bytes> {
        self.retained
            .matching(topic, now)
            .into_iter()
            .find(|m| m.topic == topic)
            .map(|m| m.payload.clone())
    }

    /// Every unexpired retained message as a PUBLISH (internal topic, remaining expiry), for
    /// a node that joins the cluster.
    pub fn retained_snapshot(&self, now: Instant) -> Vec<Publish> {
        self.retained
            .matching("#", now)
            .into_iter()
            .filter_map(|m| {
                let packet_id = (m.qos != QoS::AtMostOnce).then_some(1);
                m.to_publish(now, m.qos, true, packet_id, &[])
            })
            .collect()
    }

    /// A retained message from another node's snapshot: stored unless this node already has
    /// one on that topic (what arrived live is newer than a snapshot). Not delivered.
    pub fn store_retained_if_absent(&mut self, now: Instant, publish: Publish) -> bool {
        if !self.config.retain_available
            || publish.payload.is_empty()
            || publish.topic.is_empty()
            || publish.topic.contains(['+', '#', '\0'])
            || self.retained.contains(&publish.topic)
        {
            return false;
        }
        let message = Message::new(
            now,
            publish.topic,
            Bytes::copy_from_slice(&publish.payload),
            publish.qos.min(self.config.max_qos),
            true,
            publish.properties,
        );
        // Counted on the node its publisher is connected to.
        self.retained.store(&Arc::new(message), false).is_ok()
    }

    /// The session `key` acknowledged `message` (PUBACK, or PUBCOMP): when the message asked
    /// for a receipt and the session is the agent whose topic it is (not, say, a console's
    /// wildcard subscription on the same node), the origin node hears of it.
    pub(super) fn delivered(&mut self, key: SessionKey, message: Option<Arc<Message>>) {
        let (Some(cluster), Some(message)) = (&mut self.cluster, message) else {
            return;
        };
        let Some(receipt) = &message.receipt else {
            return;
        };
        let holds_own = cluster.claims.get(&key).is_some_and(|c| c.holds_own);
        if holds_own
            && (self.sessions.get(&key)).is_some_and(|s| is_own_topic(&s.client_id, &message.topic))
        {
            cluster
                .out
                .push(ClusterOut::Delivered(Receipt::clone(receipt)));
        }
    }

    /// A PUBACK/PUBREC held for the cluster may now go out ([`ClusterOut::Publish`]).
    pub fn cluster_ack(&self, conn: ConnId, packet: Packet, out: &mut Vec<Action>) {
        if self.conns.contains_key(&conn) {
            out.push(Action::Send { conn, packet });
        }
    }

    /// Hands a message to the cluster, if clustered; `ack` waits for it there. Returns the
    /// ack when it cannot wait (not clustered, or the message already expired).
    pub(super) fn hand_to_cluster(
        &mut self,
        now: Instant,
        message: &Message,
        ack: Option<(ConnId, Packet)>,
    ) -> Option<(ConnId, Packet)> {
        let Some(cluster) = &mut self.cluster else {
            return ack;
        };
        // Packet id 1 only so that the PUBLISH is well formed; the link rewrites it.
        let packet_id = (message.qos != QoS::AtMostOnce).then_some(1);
        match message.to_publish(now, message.qos, message.retain, packet_id, &[]) {
            Some(publish) => {
                cluster.out.push(ClusterOut::Publish { publish, ack });
                None
            }
            None => ack,
        }
    }
}

/// The session `key` subscribed to `filter`: the messages parked for it that match, to
/// deliver.
pub(super) fn unpark(
    cluster: &mut ClusterState,
    key: SessionKey,
    filter: &str,
) -> Vec<Arc<Message>> {
    let Some(parked) = cluster.parked.get_mut(&key) else {
        return Vec::new();
    };
    let (matching, rest) = std::mem::take(parked)
        .into_iter()
        .partition(|m| filter_matches(filter, &m.topic));
    *parked = rest;
    if parked.is_empty() {
        cluster.parked.remove(&key);
    }
    matching
}

/// The client id of the tenant agent whose topic `topic` is (`t/{tenant}/agents/{id}/...`
/// belongs to `{tenant}/agent/{id}`).
fn agent_client_id(topic: &str) -> Option<String> {
    let mut levels = topic.splitn(5, '/');
    match (levels.next(), levels.next(), levels.next(), levels.next()) {
        (Some("t"), Some(tenant), Some("agents"), Some(id)) => Some(format!("{tenant}/agent/{id}")),
        _ => None,
    }
}

/// Whether `topic` is one of the own topics (`t/{tenant}/agents/{id}/+`) of the tenant
/// agent whose client id is `client_id` (`{tenant}/agent/{id}`).
fn is_own_topic(client_id: &str, topic: &str) -> bool {
    let Some((tenant, id)) = client_id.split_once("/agent/") else {
        return false;
    };
    (topic.strip_prefix("t/"))
        .and_then(|t| t.strip_prefix(tenant))
        .and_then(|t| t.strip_prefix("/agents/"))
        .and_then(|t| t.strip_prefix(id))
        .and_then(|t| t.strip_prefix('/'))
        .is_some_and(|level| !level.contains('/'))
}

/// A session's own subscription that began or ended: not counted when it lies inside the
/// agent topics the session holds (an agent's own wake topic), which reach this node through
/// its node subject, so that an agent costs NATS no subscription at all.
pub(super) fn note_session_interest(
    cluster: &mut ClusterState,
    key: SessionKey,
    client_id: &str,
    raw: &str,
    added: bool,
) {
    let covered = cluster.claims.get(&key).is_some_and(|c| c.holds_own)
        && !raw.contains(['+', '#'])
        && !raw.starts_with("$share/")
        && is_own_topic(client_id, raw);
    if !covered {
        note_interest(cluster, raw, added);
    }
}

/// Counts a session's subscription to `raw` (maybe shared) that began or ended, and tells
/// the cluster when a filter (or a shared subscription) gets its first or loses its last
/// subscriber on this node.
pub(super) fn note_interest(cluster: &mut ClusterState, raw: &str, added: bool) {
    let Some(filter) = parse_filter(raw) else {
        return;
    };
    let (counts, key) = match filter.share_group {
        None => (&mut cluster.interest, filter.filter),
        Some(_) => (&mut cluster.shared, raw),
    };
    let changed = if added {
        let count = counts.entry(key.to_owned()).or_insert(0);
        *count += 1;
        *count == 1
    } else {
        let Some(count) = counts.get_mut(key) else {
            return;
        };
        *count -= 1;
        let last = *count == 0;
        if last {
            counts.remove(key);
        }
        last
    };
    if changed {
        cluster.out.push(match filter.share_group {
            None => ClusterOut::Interest {
                filter: key.to_owned(),
                added,
            },
            Some(_) => ClusterOut::SharedInterest {
                share: key.to_owned(),
                added,
            },
        });
    }
}
