//! The node's link to NATS: one task that publishes what the broker core hands it, keeps the
//! NATS subscriptions equal to the filters local clients hold, sends heartbeats and tells the
//! broker what arrives (messages, claims, nodes that went silent, PUBACKs that may now go).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use beckon_mqtt::{Publish, QoS};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::directory::Directory;
use crate::resend::Unacknowledged;
use crate::security::{NatsSecurity, Rejected, refusal};
use crate::subject::{
    agent_of, node_subject, receipt_subject, routed_filter_subjects, routed_subject, share_queue,
};
use crate::wire::{Claim, ClusterMessage, Heartbeat, Receipt};

/// How many duplicate-detection entries a node keeps (messages matched by several of its
/// NATS subscriptions arrive back to back, so a short memory suffices).
const DEDUP_WINDOW: usize = 8192;
/// Commands from the broker queued for the link; beyond this the broker is told the cluster
/// is not keeping up (and closes the publishers whose PUBACK would wait).
pub const COMMAND_QUEUE: usize = 65_536;
/// Messages from NATS queued for the link task.
const RECEIVE_QUEUE: usize = 65_536;
/// How long a starting node waits for NATS to accept or refuse it: a refusal (credentials,
/// TLS) stops the start with its reason; silence (NATS not reachable yet) does not.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(5);
/// How often a node sends the receipts it gathered (or sooner, at [`RECEIPT_BATCH`]): one
/// NATS message per origin for a fan-out's worth of PUBACKs, not one per PUBACK.
const RECEIPT_INTERVAL: Duration = Duration::from_millis(100);
const RECEIPT_BATCH: usize = 8192;

/// How a node joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// NATS server URLs (`nats://host:4222`); the client moves between them.
    pub servers: Vec<String>,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// First token of every subject, so that several clusters can share one NATS.
    pub subject_root: String,
    /// How often this node says it is alive.
    pub heartbeat: Duration,
    /// After how long without a heartbeat another node counts as gone.
    pub node_timeout: Duration,
    /// How long a flush to NATS may take before the PUBACKs waiting on it are given up.
    pub flush_timeout: Duration,
    /// TLS and credentials towards NATS.
    pub security: NatsSecurity,
}

/// Why the link could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The NATS options are unusable (a bad URL).
    #[error(
        "cluster: cannot use the NATS servers {servers:?}: {reason}; check cluster.nats (URLs like nats://127.0.0.1:4222)"
    )]
    Connect {
        /// The configured servers.
        servers: Vec<String>,
        /// The client's message.
        reason: String,
    },
    /// NATS refused the node (credentials, TLS) when it started.
    #[error("cluster: cannot join through NATS {servers:?}: {reason}")]
    Refused {
        /// The configured servers.
        servers: Vec<String>,
        /// What NATS or the TLS handshake said, and what to check.
        reason: String,
    },
    /// A subscription every node needs could not be made.
    #[error("cluster: cannot subscribe to {subject}: {reason}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// The client's message.
        reason: String,
    },
}

/// From the broker to the link.
// Messages are not boxed: they pass one bounded queue, once.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Outgoing {
    /// A message published on this node (by a client, a will or the broker itself).
    Publish {
        /// The message, with its internal topic.
        publish: Publish,
        /// When set, the broker holds a PUBACK/PUBREC until the message left for NATS; the
        /// link answers with [`Incoming::Flushed`] carrying it.
        token: Option<u64>,
    },
    /// The first local subscription to `filter` appeared (`added`) or the last one went.
    Interest {
        /// The MQTT filter without any shared-subscription prefix.
        filter: String,
        /// Added or removed.
        added: bool,
    },
    /// The first local session joined the shared subscription `share`
    /// (`$share/{group}/{filter}`), or the last one left it.
    SharedInterest {
        /// The shared subscription as subscribed.
        share: String,
        /// Added or removed.
        added: bool,
    },
    /// The retained messages this node holds, for a node that joined (answer to
    /// [`Incoming::SnapshotRequest`]).
    Snapshot {
        /// Where to send them.
        reply: String,
        /// The messages (retained, internal topics, remaining expiry).
        retained: Vec<Publish>,
    },
    /// A local agent acknowledged a message that came with a receipt (see
    /// [`Incoming::Message`]): its origin node is told.
    Delivered(Receipt),
    /// A connection for `client_id` was accepted here.
    Claim {
        /// The client id.
        client_id: String,
        /// Whether it asked for a clean start.
        clean_start: bool,
        /// When it was accepted (Unix ms).
        at_ms: i64,
    },
}

/// From the link to the broker.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Incoming {
    /// A message published on another node that matches a local subscription or is retained.
    Message {
        /// The message.
        publish: Publish,
        /// For an agent's QoS 1/2 message: to hand back in [`Outgoing::Delivered`] when the
        /// agent acknowledged it, so that its origin stops keeping it.
        receipt: Option<Receipt>,
    },
    /// A message (from any node, this one included) that NATS gave this node for the shared
    /// subscription `share`: one node per group gets each message.
    Shared {
        /// The shared subscription (`$share/{group}/{filter}`).
        share: Arc<str>,
        /// The message.
        publish: Publish,
    },
    /// Another node accepted a connection for a client id.
    Claim(Claim),
    /// A node joined and asks for the retained messages: answer with
    /// [`Outgoing::Snapshot`] to `reply`.
    SnapshotRequest {
        /// The reply subject.
        reply: String,
    },
    /// One retained message of the snapshot this node asked for when it joined: to be
    /// stored unless a newer one arrived live.
    Retained(Publish),
    /// A node stopped sending heartbeats (or restarted): the identities it held are gone.
    NodeLost(String),
    /// Messages with these tokens were written to NATS (`ok`), or could not be (`!ok`).
    Flushed {
        /// The tokens of [`Outgoing::Publish`].
        tokens: Vec<u64>,
        /// Whether the flush succeeded in time.
        ok: bool,
    },
    /// The NATS connection came back after a loss: other nodes may have declared this node
    /// gone meanwhile, so the broker republishes what it holds (presence).
    Reconnected,
}

/// The broker's handle on the link.
#[derive(Debug, Clone)]
pub struct ClusterLink {
    commands: mpsc::Sender<Outgoing>,
    node: String,
}

impl ClusterLink {
    /// Queues a command without waiting; gives it back when the link is not keeping up.
    #[allow(clippy::result_large_err)] // the command comes back unboxed, as it went in
    pub fn send(&self, command: Outgoing) -> Result<(), Outgoing> {
        self.commands.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }
}

/// What a NATS subscription carries.
#[derive(Debug, Clone)]
enum Kind {
    Message,
    /// Messages for a shared subscription (a queue subscription).
    Shared(Arc<str>),
    Claim,
    Heartbeat,
    SnapshotRequest,
    Snapshot,
    /// Receipts for messages this node sent to other nodes' agents.
    Receipts,
}

/// Connects to NATS (in the background: a node starts even when NATS is not reachable yet,
/// and keeps trying) and starts the link task.
pub async fn join(
    options: ClusterOptions,
) -> Result<(ClusterLink, mpsc::Receiver<Incoming>, JoinHandle<()>), ClusterError> {
    let (incoming_tx, incoming_rx) = mpsc::channel(RECEIVE_QUEUE);
    let events_tx = incoming_tx.clone();
    let node = options.node.clone();
    let seen_first = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The first connection's outcome: accepted, or refused for a reason of this node's own.
    let (first_tx, mut first_rx) = tokio::sync::watch::channel(None::<Result<(), String>>);
    let rejected = Rejected::default();
    let rejected_seen = rejected.clone();
    let auth = Arc::new(options.security.auth.clone());
    let client = connect_options(&node, "")
        .no_echo()
        .event_callback(move |event| {
            let events_tx = events_tx.clone();
            let seen_first = seen_first.clone();
            let first_tx = first_tx.clone();
            let rejected = rejected_seen.clone();
            let auth = auth.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        first_tx.send_if_modified(|first| first.replace(Ok(())).is_none());
                        if seen_first.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            tracing::info!("cluster: connected to NATS again");
                            let _ = events_tx.send(Incoming::Reconnected).await;
                        } else {
                            tracing::info!("cluster: connected to NATS");
                        }
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("cluster: lost the NATS connection; reconnecting (messages to other nodes wait)");
                    }
                    async_nats::Event::ClientError(async_nats::ClientError::Other(e)) => {
                        match refusal(&e, &rejected, &auth) {
                            Some(reason) => {
                                tracing::error!("cluster: {reason}");
                                first_tx.send_if_modified(|first| {
                                    first.get_or_insert(Err(reason));
                                    true
                                });
                            }
                            None => tracing::warn!(error = %e, "cluster: cannot connect to NATS; retrying"),
                        }
                    }
                    other => tracing::info!(event = %other, "cluster: NATS event"),
                }
            }
        });
    let client = connect(client, &options, &rejected).await?;
    // A refused node stops here with the reason; one that finds no NATS yet starts anyway.
    if let Ok(Ok(first)) =
        tokio::time::timeout(FIRST_CONNECT_WAIT, first_rx.wait_for(Option::is_some)).await
        && let Some(Err(reason)) = &*first
    {
        return Err(ClusterError::Refused {
            servers: options.servers.clone(),
            reason: reason.clone(),
        });
    }

    // Shared subscriptions get a connection of their own: NATS gives no connection its own
    // messages back (no_echo above), and a group's queue must be able to pick this node for
    // a message published here.
    let shared_options = connect_options(&node, " shared subscriptions");
    let shared_client = connect(shared_options, &options, &Rejected::default()).await?;

    let (raw_tx, raw_rx) = mpsc::channel(RECEIVE_QUEUE);
    let root = &options.subject_root;
    let mut fixed = Vec::new();
    let inbox = client.new_inbox();
    for (subject, kind) in [
        (format!("{root}.r"), Kind::Message),
        (format!("{root}.claim"), Kind::Claim),
        (format!("{root}.hb"), Kind::Heartbeat),
        (format!("{root}.sync"), Kind::SnapshotRequest),
        (inbox.clone(), Kind::Snapshot),
        // The agent topics of every agent this node holds, whatever their number.
        (node_subject(root, &node), Kind::Message),
        (receipt_subject(root, &node), Kind::Receipts),
    ] {
        fixed.push(subscribe(&client, subject, None, kind, raw_tx.clone()).await?);
    }
    // Retained messages (presence among them) published before this node joined: every
    // node answers, the first to answer is used.
    if let Err(e) = client
        .publish_with_reply(format!("{root}.sync"), inbox, bytes::Bytes::new())
        .await
    {
        tracing::warn!(error = %e, "cluster: cannot ask the other nodes for their retained messages");
    }
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let link = Link {
        directory: Directory::default(),
        unacknowledged: Unacknowledged::default(),
        receipts: HashMap::new(),
        receipt_count: 0,
        retained_subject: format!("{root}.r"),
        claim_subject: format!("{root}.claim"),
        heartbeat_subject: format!("{root}.hb"),
        boot: rand::random(),
        options,
        client,
        shared_client,
        shared: HashMap::new(),
        raw_tx,
        interest: HashMap::new(),
        peers: HashMap::new(),
        seen: HashSet::new(),
        seen_order: VecDeque::new(),
        // Receipts name messages by number: a restarted node does not reuse its previous
        // run's numbers.
        seq: u64::from(rand::random::<u32>()) << 32,
        snapshot_from: None,
        snapshot_count: 0,
        incoming: incoming_tx,
        _fixed: fixed,
    };
    let task = tokio::spawn(link.run(commands_rx, raw_rx));
    Ok((
        ClusterLink {
            commands: commands_tx,
            node,
        },
        incoming_rx,
        task,
    ))
}

/// Subscribes and forwards what arrives to the link task; the subscription ends (NATS
/// UNSUB) when the returned task is aborted.
async fn subscribe(
    client: &async_nats::Client,
    subject: String,
    queue: Option<String>,
    kind: Kind,
    raw: mpsc::Sender<(Kind, async_nats::Message)>,
) -> Result<AbortOnDrop, ClusterError> {
    let sub = match queue {
        Some(queue) => client.queue_subscribe(subject.clone(), queue).await,
        None => client.subscribe(subject.clone()).await,
    };
    let mut sub = sub.map_err(|e| ClusterError::Subscribe {
        subject,
        reason: e.to_string(),
    })?;
    Ok(AbortOnDrop(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if raw.send((kind.clone(), msg)).await.is_err() {
                break;
            }
        }
    })))
}

/// The client options both of a node's NATS connections use.
fn connect_options(node: &str, purpose: &str) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .name(format!("beckon-broker {node}{purpose}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        // NATS is close by: come back within a second of it, not the client's default 4 s.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(1000))
        })
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(Duration::from_secs(10))
}

/// Connects (in the background) with the node's TLS and credentials.
async fn connect(
    client: async_nats::ConnectOptions,
    options: &ClusterOptions,
    rejected: &Rejected,
) -> Result<async_nats::Client, ClusterError> {
    let servers = &options.servers;
    options
        .security
        .apply(client, servers, rejected)?
        .connect(servers.clone())
        .await
        .map_err(|e| ClusterError::Connect {
            servers: servers.clone(),
            reason: e.to_string(),
        })
}

/// A forwarding task that ends (and unsubscribes) when dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Peer {
    last_seen: Instant,
    boot: u64,
}

struct Link {
    options: ClusterOptions,
    client: async_nats::Client,
    /// The connection of the shared subscriptions' queue groups.
    shared_client: async_nats::Client,
    /// Shared subscription (`$share/{group}/{filter}`) -> its queue subscriptions.
    shared: HashMap<String, Vec<AbortOnDrop>>,
    /// Which node holds each tenant agent: where agent-bound messages go.
    directory: Directory,
    /// Agents' messages sent to other nodes, until their receipt.
    unacknowledged: Unacknowledged,
    /// Receipts to send, by origin node.
    receipts: HashMap<Arc<str>, Vec<u64>>,
    /// How many receipts wait in `receipts`.
    receipt_count: usize,
    retained_subject: String,
    claim_subject: String,
    heartbeat_subject: String,
    boot: u64,
    raw_tx: mpsc::Sender<(Kind, async_nats::Message)>,
    /// NATS subject -> (local filters that need it, its subscription).
    interest: HashMap<String, (usize, AbortOnDrop)>,
    peers: HashMap<String, Peer>,
    seen: HashSet<(String, u64)>,
    seen_order: VecDeque<(String, u64)>,
    seq: u64,
    /// The node whose retained snapshot is used (the first to answer).
    snapshot_from: Option<String>,
    snapshot_count: usize,
    incoming: mpsc::Sender<Incoming>,
    _fixed: Vec<AbortOnDrop>,
}

impl Link {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Outgoing>,
        mut raw: mpsc::Receiver<(Kind, async_nats::Message)>,
    ) {
        let mut heartbeat = tokio::time::interval(self.options.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut receipts = tokio::time::interval(RECEIPT_INTERVAL);
        receipts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tokens = Vec::new();
        // Whether every message of the current batch reached the NATS client.
        let mut batch_ok = true;
        loop {
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { break };
                    batch_ok &= self.command(command, &mut tokens).await;
                    // A burst (a fan-out's PUBACKs) shares one flush.
                    while tokens.len() < 4096 {
                        let Ok(command) = commands.try_recv() else { break };
                        batch_ok &= self.command(command, &mut tokens).await;
                    }
                    if self.receipt_count >= RECEIPT_BATCH {
                        self.send_receipts().await;
                    }
                    if !tokens.is_empty() {
                        let ok = std::mem::replace(&mut batch_ok, true) && matches!(
                            tokio::time::timeout(self.options.flush_timeout, self.client.flush()).await,
                            Ok(Ok(()))
                        );
                        if !ok {
                            tracing::warn!(messages = tokens.len(), "cluster: NATS flush failed or timed out; their publishers are not acknowledged");
                        }
                        let tokens = std::mem::take(&mut tokens);
                        if self.incoming.send(Incoming::Flushed { tokens, ok }).await.is_err() {
                            break;
                        }
                    }
                }
                msg = raw.recv() => {
                    let Some((kind, msg)) = msg else { break };
                    if self.received(kind, msg).await.is_err() {
                        break;
                    }
                }
                _ = receipts.tick(), if self.receipt_count > 0 => self.send_receipts().await,
                _ = heartbeat.tick() => {
                    self.unacknowledged.expire(Instant::now());
                    if self.beat().await.is_err() {
                        break;
                    }
                }
            }
        }
        // The broker is stopping: what it handed over last goes out before the process ends.
        let _ = tokio::time::timeout(self.options.flush_timeout, self.client.flush()).await;
    }

    /// Carries out one command; returns false when a message could not be handed to the
    /// NATS client in time (its client buffer stays full while NATS is unreachable).
    async fn command(&mut self, command: Outgoing, tokens: &mut Vec<u64>) -> bool {
        let mut ok = true;
        match command {
            Outgoing::Publish { publish, token } => {
                self.seq += 1;
                let mut moved = None;
                let mut holder = None;
                let subject = if publish.retain {
                    // This node's own presence events among them.
                    moved = self.directory.retained(&publish.topic, &publish.payload);
                    self.retained_subject.clone()
                } else {
                    holder = self.directory.holder(&publish.topic).cloned();
                    let holder = holder.as_deref();
                    routed_subject(&self.options.subject_root, &publish.topic, holder)
                };
                // An agent's QoS 1/2 message to another node is kept until its receipt.
                let keep =
                    holder.filter(|h| **h != *self.options.node && publish.qos != QoS::AtMostOnce);
                let expiry = publish.properties.message_expiry_interval;
                let msg = ClusterMessage {
                    origin: self.options.node.clone(),
                    seq: self.seq,
                    publish,
                };
                match msg.encode() {
                    Ok(bytes) => {
                        if let Some(holder) = keep {
                            let (now, topic) = (Instant::now(), &msg.publish.topic);
                            self.unacknowledged.keep(
                                now,
                                msg.seq,
                                topic,
                                expiry,
                                holder,
                                bytes.clone(),
                            );
                        }
                        let sent = tokio::time::timeout(
                            self.options.flush_timeout,
                            self.client.publish(subject, bytes),
                        )
                        .await;
                        if !matches!(sent, Ok(Ok(()))) {
                            ok = false;
                            tracing::warn!("cluster: cannot hand a message to NATS (unreachable?)");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: message not sent to other nodes")
                    }
                }
                tokens.extend(token);
                if self.placed(moved).await.is_err() {
                    ok = false;
                }
            }
            Outgoing::Delivered(receipt) => {
                if *receipt.origin == *self.options.node {
                    // A message kept here and handed to a local agent after it moved here.
                    self.unacknowledged.acknowledged(receipt.seq);
                } else {
                    self.receipts
                        .entry(receipt.origin)
                        .or_default()
                        .push(receipt.seq);
                    self.receipt_count += 1;
                }
            }
            Outgoing::Interest { filter, added } => {
                for subject in routed_filter_subjects(&self.options.subject_root, &filter) {
                    if added {
                        if let Some((count, _)) = self.interest.get_mut(&subject) {
                            *count += 1;
                            continue;
                        }
                        match subscribe(
                            &self.client,
                            subject.clone(),
                            None,
                            Kind::Message,
                            self.raw_tx.clone(),
                        )
                        .await
                        {
                            Ok(sub) => {
                                self.interest.insert(subject, (1, sub));
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cluster: messages from other nodes for this filter will not arrive")
                            }
                        }
                    } else if let Some((count, _)) = self.interest.get_mut(&subject) {
                        *count -= 1;
                        if *count == 0 {
                            self.interest.remove(&subject);
                        }
                    }
                }
            }
            Outgoing::SharedInterest { share, added } => {
                if !added {
                    self.shared.remove(&share);
                    return ok;
                }
                let Some((_, filter)) = share
                    .strip_prefix("$share/")
                    .and_then(|rest| rest.split_once('/'))
                else {
                    return ok;
                };
                // Retained messages travel on one subject whatever their topic: the node NATS
                // picks for the group checks the filter.
                let mut subjects = routed_filter_subjects(&self.options.subject_root, filter);
                subjects.push(self.retained_subject.clone());
                let kind = Kind::Shared(Arc::from(share.as_str()));
                let queue = share_queue(&self.options.subject_root, &share);
                let mut subs = Vec::new();
                for subject in subjects {
                    let raw = self.raw_tx.clone();
                    let sub = subscribe(
                        &self.shared_client,
                        subject,
                        Some(queue.clone()),
                        kind.clone(),
                        raw,
                    );
                    match sub.await {
                        Ok(sub) => subs.push(sub),
                        Err(e) => {
                            tracing::warn!(error = %e, share = %share, "cluster: messages for this shared subscription will not all arrive")
                        }
                    }
                }
                self.shared.insert(share, subs);
            }
            Outgoing::Snapshot { reply, retained } => {
                let count = retained.len();
                for publish in retained {
                    self.seq += 1;
                    let msg = ClusterMessage {
                        origin: self.options.node.clone(),
                        seq: self.seq,
                        publish,
                    };
                    if let Ok(bytes) = msg.encode() {
                        let _ = self.client.publish(reply.clone(), bytes).await;
                    }
                }
                // An empty message ends the snapshot.
                let _ = self.client.publish(reply, bytes::Bytes::new()).await;
                tracing::info!(
                    retained = count,
                    "cluster: sent the retained messages to a node that joined"
                );
            }
            Outgoing::Claim {
                client_id,
                clean_start,
                at_ms,
            } => {
                let moved = self.directory.claimed(&client_id, &self.options.node);
                if self.placed(moved).await.is_err() {
                    ok = false;
                }
                let claim = Claim {
                    node: self.options.node.clone(),
                    client_id,
                    clean_start,
                    at_ms: Some(at_ms),
                };
                let bytes = serde_json::to_vec(&claim).unwrap_or_default();
                if let Err(e) = self
                    .client
                    .publish(self.claim_subject.clone(), bytes.into())
                    .await
                {
                    tracing::warn!(error = %e, "cluster: cannot publish a client-id claim");
                }
            }
        }
        ok
    }

    /// Returns `Err` when the broker is gone.
    async fn received(&mut self, kind: Kind, msg: async_nats::Message) -> Result<(), ()> {
        match kind {
            Kind::Message => {
                let msg = match ClusterMessage::decode(&msg.payload) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(subject = %msg.subject, error = %e, "cluster: dropped a malformed message");
                        return Ok(());
                    }
                };
                if msg.origin == self.options.node {
                    return Ok(());
                }
                let receipt = (!msg.publish.retain
                    && msg.publish.qos != QoS::AtMostOnce
                    && agent_of(&msg.publish.topic).is_some())
                .then(|| Receipt {
                    origin: Arc::from(msg.origin.as_str()),
                    seq: msg.seq,
                });
                let id = (msg.origin, msg.seq);
                if !self.seen.insert(id.clone()) {
                    return Ok(());
                }
                self.seen_order.push_back(id);
                if self.seen_order.len() > DEDUP_WINDOW
                    && let Some(old) = self.seen_order.pop_front()
                {
                    self.seen.remove(&old);
                }
                // Before the broker passes a presence event on: a wake-up sent on seeing it
                // finds the agent's node.
                if msg.publish.retain {
                    let moved = self
                        .directory
                        .retained(&msg.publish.topic, &msg.publish.payload);
                    self.placed(moved).await?;
                }
                self.incoming
                    .send(Incoming::Message {
                        publish: msg.publish,
                        receipt,
                    })
                    .await
                    .map_err(|_| ())
            }
            Kind::Shared(share) => match ClusterMessage::decode(&msg.payload) {
                Ok(m) => self
                    .incoming
                    .send(Incoming::Shared {
                        share,
                        publish: m.publish,
                    })
                    .await
                    .map_err(|_| ()),
                Err(e) => {
                    tracing::warn!(subject = %msg.subject, error = %e, "cluster: dropped a malformed message");
                    Ok(())
                }
            },
            Kind::SnapshotRequest => match msg.reply {
                Some(reply) => self
                    .incoming
                    .send(Incoming::SnapshotRequest {
                        reply: reply.to_string(),
                    })
                    .await
                    .map_err(|_| ()),
                None => Ok(()),
            },
            Kind::Snapshot => {
                if msg.payload.is_empty() {
                    if self.snapshot_from.is_some() {
                        tracing::info!(retained = self.snapshot_count, from = ?self.snapshot_from, "cluster: retained messages of the cluster received");
                    }
                    return Ok(());
                }
                let msg = match ClusterMessage::decode(&msg.payload) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: dropped a malformed retained message");
                        return Ok(());
                    }
                };
                let from = self.snapshot_from.get_or_insert_with(|| msg.origin.clone());
                if *from != msg.origin {
                    return Ok(());
                }
                self.snapshot_count += 1;
                let moved = self
                    .directory
                    .retained(&msg.publish.topic, &msg.publish.payload);
                self.placed(moved).await?;
                self.incoming
                    .send(Incoming::Retained(msg.publish))
                    .await
                    .map_err(|_| ())
            }
            Kind::Claim => match serde_json::from_slice::<Claim>(&msg.payload) {
                Ok(claim) if claim.node != self.options.node => {
                    let moved = self.directory.claimed(&claim.client_id, &claim.node);
                    self.placed(moved).await?;
                    self.incoming
                        .send(Incoming::Claim(claim))
                        .await
                        .map_err(|_| ())
                }
                Ok(_) => Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: dropped a malformed claim");
                    Ok(())
                }
            },
            Kind::Receipts => {
                for seq in msg.payload.chunks_exact(8) {
                    let seq = u64::from_be_bytes(seq.try_into().unwrap_or_default());
                    self.unacknowledged.acknowledged(seq);
                }
                Ok(())
            }
            Kind::Heartbeat => {
                let Ok(beat) = serde_json::from_slice::<Heartbeat>(&msg.payload) else {
                    tracing::warn!("cluster: dropped a malformed heartbeat");
                    return Ok(());
                };
                if beat.node == self.options.node {
                    if beat.boot != self.boot {
                        tracing::error!(node = %beat.node, "cluster: another node uses this node's name; give every node its own cluster.node");
                    }
                    return Ok(());
                }
                let now = Instant::now();
                match self.peers.get_mut(&beat.node) {
                    Some(peer) if peer.boot == beat.boot => peer.last_seen = now,
                    Some(peer) => {
                        tracing::warn!(node = %beat.node, "cluster: node restarted; releasing what its previous run held");
                        peer.boot = beat.boot;
                        peer.last_seen = now;
                        self.directory.node_lost(&beat.node);
                        self.unacknowledged.node_lost(&beat.node);
                        self.incoming
                            .send(Incoming::NodeLost(beat.node))
                            .await
                            .map_err(|_| ())?;
                    }
                    None => {
                        tracing::info!(node = %beat.node, "cluster: node joined");
                        self.peers.insert(
                            beat.node,
                            Peer {
                                last_seen: now,
                                boot: beat.boot,
                            },
                        );
                    }
                }
                Ok(())
            }
        }
    }

    /// The directory has `agent` on another node now (`None`: nothing moved): the messages
    /// kept for it that went to its previous node go to the new one, or to the broker here
    /// when that is this node. Returns `Err` when the broker is gone.
    async fn placed(&mut self, agent: Option<String>) -> Result<(), ()> {
        let Some(agent) = agent else {
            return Ok(());
        };
        let Some(node) = self.directory.node_of(&agent).cloned() else {
            return Ok(());
        };
        let resend = self.unacknowledged.moved(Instant::now(), &agent, &node);
        if resend.is_empty() {
            return Ok(());
        }
        tracing::info!(agent = %agent, node = %node, messages = resend.len(), "cluster: the agent moved before acknowledging; its messages follow it");
        for message in resend {
            if *node == *self.options.node {
                let Ok(msg) = ClusterMessage::decode(&message.bytes) else {
                    continue;
                };
                let receipt = Some(Receipt {
                    origin: node.clone(),
                    seq: message.seq,
                });
                self.incoming
                    .send(Incoming::Message {
                        publish: msg.publish,
                        receipt,
                    })
                    .await
                    .map_err(|_| ())?;
            } else {
                let root = &self.options.subject_root;
                let subject = routed_subject(root, &message.topic, Some(&node));
                if let Err(e) = self.client.publish(subject, message.bytes).await {
                    tracing::warn!(error = %e, "cluster: cannot send a message again to the agent's new node");
                }
            }
        }
        Ok(())
    }

    /// Sends the receipts gathered since the last time, one NATS message per origin node.
    async fn send_receipts(&mut self) {
        self.receipt_count = 0;
        for (origin, seqs) in self.receipts.drain() {
            let mut payload = bytes::BytesMut::with_capacity(seqs.len() * 8);
            for seq in seqs {
                payload.extend_from_slice(&seq.to_be_bytes());
            }
            let subject = receipt_subject(&self.options.subject_root, &origin);
            if let Err(e) = self.client.publish(subject, payload.freeze()).await {
                tracing::warn!(error = %e, "cluster: cannot send receipts; the origin keeps those messages until they expire");
            }
        }
    }

    async fn beat(&mut self) -> Result<(), ()> {
        let beat = Heartbeat {
            node: self.options.node.clone(),
            boot: self.boot,
        };
        let bytes = serde_json::to_vec(&beat).unwrap_or_default();
        let _ = self
            .client
            .publish(self.heartbeat_subject.clone(), bytes.into())
            .await;
        let now = Instant::now();
        if self.client.connection_state() != State::Connected {
            // Cut off from NATS: silence from the others says nothing about them.
            for peer in self.peers.values_mut() {
                peer.last_seen = now;
            }
            return Ok(());
        }
        let timeout = self.options.node_timeout;
        let lost: Vec<String> = self
            .peers
            .iter()
            .filter(|(_, p)| now.duration_since(p.last_seen) > timeout)
            .map(|(n, _)| n.clone())
            .collect();
        for node in lost {
            self.peers.remove(&node);
            tracing::warn!(node = %node, timeout_ms = timeout.as_millis() as u64, "cluster: node silent; its connections count as gone");
            self.directory.node_lost(&node);
            self.unacknowledged.node_lost(&node);
            self.incoming
                .send(Incoming::NodeLost(node))
                .await
                .map_err(|_| ())?;
        }
        Ok(())
    }
}
