//! The task that owns the [`BrokerCore`]: it feeds the core what the connection tasks, the
//! cluster link and the clock bring, and carries out what the core decides (packets into
//! the connections' outboxes, closes, messages for the cluster).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use beckon_mqtt::{Connect, Packet};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::core::{
    Action, BrokerCore, ClaimOutcome, CloseReason, ClusterOut, ConnId, ConnectionInfo, RemoteClaim,
};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Pushed};

/// Events queued from connection tasks to the core task. Bounded: a busy core slows the
/// readers down instead of growing memory.
pub(crate) const EVENT_QUEUE: usize = 4096;
/// How long shutdown waits for connections to flush their last packets.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The core is ticked when its next deadline is due, and at least this often.
const MAX_TICK: Duration = Duration::from_secs(1);

/// From a connection task to the core task.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // packets are not boxed twice; the queue is bounded
pub(crate) enum Event {
    /// An admitted CONNECT.
    Connect {
        conn: ConnId,
        connect: Box<Connect>,
        /// Address, path and tenant identity of the connection.
        info: ConnectionInfo,
        outbox: Arc<Outbox>,
    },
    /// A packet after CONNECT.
    Packet { conn: ConnId, packet: Packet },
    /// The connection ended on the client's side or by a protocol error.
    Closed { conn: ConnId, reason: CloseReason },
    /// Tenant files were removed: their connections are closed.
    TenantsRemoved(Vec<String>),
    /// These connections' credentials were revoked (tenant file `[[revoked]]`): closed.
    Revoked(Vec<ConnId>),
}

/// The core task's side of the cluster link.
pub(crate) struct ClusterSide {
    link: beckon_cluster::ClusterLink,
    incoming: mpsc::Receiver<beckon_cluster::Incoming>,
    task: JoinHandle<()>,
    /// PUBACK/PUBREC packets waiting for their message to leave for NATS, by token.
    pending: HashMap<u64, (ConnId, Packet)>,
    next_token: u64,
}

impl ClusterSide {
    /// The core task's side of a cluster link that [`beckon_cluster::join`] returned.
    pub(crate) fn new(
        link: beckon_cluster::ClusterLink,
        incoming: mpsc::Receiver<beckon_cluster::Incoming>,
        task: JoinHandle<()>,
    ) -> Self {
        Self {
            link,
            incoming,
            task,
            pending: HashMap::new(),
            next_token: 1,
        }
    }

    /// Hands what the core produced for the cluster to the link. Returns the connections
    /// whose acknowledgement cannot be kept (the link is not keeping up): they are closed so
    /// that their clients resend.
    fn forward(&mut self, core: &mut BrokerCore) -> Vec<ConnId> {
        use beckon_cluster::Outgoing;
        let mut failed = Vec::new();
        for item in core.take_cluster_out() {
            let command = match item {
                ClusterOut::Publish { publish, ack } => {
                    let token = ack.map(|ack| {
                        let token = self.next_token;
                        self.next_token += 1;
                        self.pending.insert(token, ack);
                        token
                    });
                    Outgoing::Publish { publish, token }
                }
                ClusterOut::Delivered(receipt) => Outgoing::Delivered(receipt),
                ClusterOut::Interest { filter, added } => Outgoing::Interest { filter, added },
                ClusterOut::SharedInterest { share, added } => {
                    Outgoing::SharedInterest { share, added }
                }
                ClusterOut::Claim {
                    client_id,
                    clean_start,
                    at_ms,
                } => Outgoing::Claim {
                    client_id,
                    clean_start,
                    at_ms,
                },
            };
            if let Err(command) = self.link.send(command) {
                tracing::warn!(
                    "cluster link queue full: a message, subscription or claim did not reach the other nodes"
                );
                if let Outgoing::Publish {
                    token: Some(token), ..
                } = command
                    && let Some((conn, _)) = self.pending.remove(&token)
                {
                    failed.push(conn);
                }
            }
        }
        failed
    }
}

/// The core task: the core, the outboxes of the connections it knows, the cluster link and
/// the clock.
pub(crate) struct CoreTask {
    core: BrokerCore,
    events: mpsc::Receiver<Event>,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    cluster: Option<ClusterSide>,
    /// The outbox of every connection the core knows (and of those it refused, until the
    /// refusal is written).
    conns: HashMap<ConnId, Arc<Outbox>>,
    /// What the core decided and is not carried out yet; reused.
    out: Vec<Action>,
    next_tick: Instant,
    last_sync: Instant,
}

impl CoreTask {
    /// A task for `core`, reading `events` until `shutdown`.
    pub(crate) fn new(
        core: BrokerCore,
        events: mpsc::Receiver<Event>,
        shutdown: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
        cluster: Option<ClusterSide>,
    ) -> Self {
        Self {
            core,
            events,
            shutdown,
            metrics,
            cluster,
            conns: HashMap::new(),
            out: Vec::new(),
            next_tick: Instant::now() + MAX_TICK,
            last_sync: Instant::now(),
        }
    }

    /// Runs until shutdown (then shuts the broker down gracefully) or until the cluster link
    /// stops (an error).
    pub(crate) async fn run(mut self) -> Result<(), String> {
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => break,
                ev = self.events.recv() => {
                    let Some(ev) = ev else { break };
                    self.on_event(ev);
                    self.settle_all();
                    self.tick_no_later_than_due();
                }
                incoming = next_incoming(&mut self.cluster) => {
                    let Some(incoming) = incoming else {
                        return Err("the cluster link stopped".to_owned());
                    };
                    self.on_cluster(incoming);
                    self.settle_all();
                    self.tick_no_later_than_due();
                }
                () = tokio::time::sleep_until(self.next_tick) => self.on_tick(),
            }
        }
        self.shut_down().await;
        Ok(())
    }

    /// One event from a connection task or the tenant reloader.
    fn on_event(&mut self, ev: Event) {
        let now = std::time::Instant::now();
        let (core, out) = (&mut self.core, &mut self.out);
        match ev {
            Event::Connect {
                conn,
                connect,
                info,
                outbox,
            } => {
                self.conns.insert(conn, outbox);
                // The connection task learns the outcome from the CONNACK in its outbox.
                let _ = core.handle_connect(now, conn, *connect, info, out);
            }
            Event::Packet { conn, packet } => {
                if self.conns.contains_key(&conn) {
                    core.handle_packet(now, conn, packet, out);
                }
            }
            Event::TenantsRemoved(tenants) => core.close_tenants(now, &tenants, out),
            Event::Revoked(revoked) => core.revoke(now, &revoked, out),
            Event::Closed { conn, reason } => {
                if self.conns.remove(&conn).is_some() {
                    core.handle_close(now, conn, reason, out);
                }
            }
        }
    }

    /// What the cluster link reports.
    fn on_cluster(&mut self, incoming: beckon_cluster::Incoming) {
        use beckon_cluster::Incoming;
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let now = std::time::Instant::now();
        let (core, out) = (&mut self.core, &mut self.out);
        match incoming {
            Incoming::Message { publish, receipt } => {
                core.handle_remote_publish(now, publish, receipt, out);
            }
            Incoming::Shared { share, publish } => {
                core.handle_shared_publish(now, &share, publish, out);
            }
            Incoming::Claim(claim) => {
                let remote = RemoteClaim {
                    node: &claim.node,
                    client_id: &claim.client_id,
                    clean_start: claim.clean_start,
                    at_ms: claim.at_ms,
                };
                let (client_id, node) = (&claim.client_id, &claim.node);
                match core.handle_remote_claim(now, remote, out) {
                    ClaimOutcome::TakenOver(conn) => {
                        tracing::info!(conn, client_id = %client_id, node = %node, "session taken over on another node");
                    }
                    ClaimOutcome::Kept(conn) => {
                        tracing::info!(conn, client_id = %client_id, node = %node, "connected on another node at the same moment: the connection here is the newer and stays");
                    }
                    ClaimOutcome::None => {}
                }
            }
            Incoming::NodeLost(node) => {
                let released = core.handle_node_lost(now, &node, out);
                tracing::warn!(node = %node, identities = released, "cluster node gone: its identities are disconnected");
            }
            Incoming::Flushed { tokens, ok } => {
                for token in tokens {
                    let Some((conn, packet)) = cluster.pending.remove(&token) else {
                        continue;
                    };
                    if ok {
                        core.cluster_ack(conn, packet, out);
                    } else {
                        drop_connection(core, &mut self.conns, conn, out);
                    }
                }
            }
            Incoming::Reconnected => core.republish_presence(now, out),
            Incoming::SnapshotRequest { reply } => {
                let retained = core.retained_snapshot(now);
                let snapshot = beckon_cluster::Outgoing::Snapshot { reply, retained };
                if cluster.link.send(snapshot).is_err() {
                    tracing::warn!(
                        "cluster link queue full: a joining node gets no retained messages from this one"
                    );
                }
            }
            Incoming::Retained(publish) => {
                core.store_retained_if_absent(now, publish);
            }
        }
    }

    /// The core's timed work (delayed wills, expiries), and the metrics it keeps.
    fn on_tick(&mut self) {
        let now = std::time::Instant::now();
        let next = self.core.tick(now, &mut self.out);
        self.settle_all();
        // Walks every session: at most once a second.
        if self.last_sync.elapsed() >= Duration::from_secs(1) {
            self.metrics.sync_core(&self.core);
            self.last_sync = Instant::now();
        }
        let cap = Instant::now() + MAX_TICK;
        self.next_tick = next.map_or(cap, |n| Instant::from_std(n).min(cap));
    }

    /// An event may bring timed work forward (a will delay, a session expiry).
    fn tick_no_later_than_due(&mut self) {
        if let Some(due) = self.core.next_deadline() {
            self.next_tick = self.next_tick.min(Instant::from_std(due));
        }
    }

    /// Carries out the core's actions and hands the cluster what it must know, until both
    /// are done.
    fn settle_all(&mut self) {
        apply(
            &mut self.core,
            &mut self.conns,
            &mut self.out,
            &self.metrics,
        );
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        loop {
            let failed = cluster.forward(&mut self.core);
            if failed.is_empty() {
                break;
            }
            for conn in failed {
                drop_connection(&mut self.core, &mut self.conns, conn, &mut self.out);
            }
            apply(
                &mut self.core,
                &mut self.conns,
                &mut self.out,
                &self.metrics,
            );
        }
    }

    /// Graceful shutdown: the core says goodbye to everyone (presence events to the tenants'
    /// servers, DISCONNECT 0x8B to v5 clients), the cluster link and the connections flush,
    /// bounded in time.
    async fn shut_down(mut self) {
        self.core.shutdown(std::time::Instant::now(), &mut self.out);
        apply(
            &mut self.core,
            &mut self.conns,
            &mut self.out,
            &self.metrics,
        );
        // The last presence events go to the other nodes before the link closes.
        if let Some(mut c) = self.cluster.take() {
            c.forward(&mut self.core);
            let ClusterSide { link, task, .. } = c;
            drop(link);
            if tokio::time::timeout(DRAIN_TIMEOUT, task).await.is_err() {
                tracing::warn!("the cluster link did not finish within {DRAIN_TIMEOUT:?}");
            }
        }
        for outbox in self.conns.values() {
            outbox.close();
        }
        self.conns.clear();
        // Wait until every connection task has flushed and ended (each holds an event
        // sender), bounded so that a client that does not read cannot hold the exit.
        let events = &mut self.events;
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while events.recv().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "some connections did not finish within {DRAIN_TIMEOUT:?}; closing them"
            );
        }
    }
}

/// Carries out the core's actions. Slow consumers found on the way are closed and reported
/// back to the core, which may produce more actions; the loop runs until none are left.
fn apply(
    core: &mut BrokerCore,
    conns: &mut HashMap<ConnId, Arc<Outbox>>,
    out: &mut Vec<Action>,
    metrics: &Metrics,
) {
    while !out.is_empty() {
        let mut slow = Vec::new();
        for action in out.drain(..) {
            match action {
                Action::Send { conn, packet } => {
                    let Some(outbox) = conns.get(&conn) else {
                        continue;
                    };
                    match outbox.push(packet) {
                        Pushed::Overflow => {
                            conns.remove(&conn);
                            slow.push(conn);
                        }
                        Pushed::Dropped => metrics.slow_consumer_dropped(),
                        Pushed::Queued | Pushed::Closed => {}
                    }
                }
                Action::Close { conn } => {
                    if let Some(outbox) = conns.remove(&conn) {
                        outbox.close();
                    }
                }
            }
        }
        let now = std::time::Instant::now();
        for conn in slow {
            metrics.limit_reached("max_outbound_packets");
            tracing::warn!(
                conn,
                "outbound queue full (limits.max_outbound_packets): closing a client that does not read"
            );
            core.handle_close(now, conn, CloseReason::Transport, out);
        }
    }
}

/// Closes a connection the broker gives up on (its PUBACK cannot be kept): the client
/// reconnects and resends.
fn drop_connection(
    core: &mut BrokerCore,
    conns: &mut HashMap<ConnId, Arc<Outbox>>,
    conn: ConnId,
    out: &mut Vec<Action>,
) {
    if let Some(outbox) = conns.remove(&conn) {
        outbox.close();
        core.handle_close(std::time::Instant::now(), conn, CloseReason::Closed, out);
    }
}

async fn next_incoming(cluster: &mut Option<ClusterSide>) -> Option<beckon_cluster::Incoming> {
    match cluster {
        Some(c) => c.incoming.recv().await,
        None => std::future::pending().await,
    }
}
