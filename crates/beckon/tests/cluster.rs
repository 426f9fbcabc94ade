//! The push service as a cluster: a nats-server and three `beckon broker` nodes started by
//! the test (real processes on loopback, random free ports, killed on drop, every wait
//! bounded). Agents spread over the nodes; a wake-up published on one node reaches an agent
//! on another; a connection on one node takes over the session held on another (0x8E);
//! a node killed: its agents move to the others, presence follows (disconnected, then
//! connected on the new node) and every wake-up still valid arrives.
//!
//! nats-server must be installed (Debian package `nats-server`; scripts/test installs it):
//! without it these tests fail and say so.

mod cluster_support;
mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use beckon_identity::{PresenceEvent, PresenceState, Role};
use beckon_mqtt::{Packet, Properties, Publish, QoS, ReasonCode};
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use cluster_support::{
    Client, Node, ReadEnd, Tenant, WAIT, settled_nats_subscriptions, start_nats_monitored,
    start_nats_on,
};
use common::Process;

/// A NATS server and three nodes.
struct Cluster {
    nodes: Vec<Node>,
    tenant: Tenant,
    nats_url: String,
    /// nats-server's monitoring port.
    monitor: u16,
    nats: Option<Process>,
}

impl Cluster {
    fn start() -> Self {
        let (nats, url, monitor) = start_nats_monitored();
        let tenant = Tenant::create();
        let nodes = (0..3)
            .map(|i| Node::start(&format!("n{i}"), &url, tenant.dir.path()))
            .collect();
        Self {
            nodes,
            tenant,
            nats_url: url,
            monitor,
            nats: Some(nats),
        }
    }
}

/// A presence event as the test's server saw it.
#[derive(Debug, Clone)]
struct Seen {
    agent: String,
    state: PresenceState,
    node: Option<String>,
    reason: Option<String>,
}

/// The test's server: like the console, it subscribes to presence and acks, sends wake-ups
/// (QoS 1, 10 minutes expiry), and resends the ones not yet acknowledged when presence says
/// their agent connected (the console's rule).
struct Server {
    client: Client,
    /// Wake-up ids sent and not yet acknowledged, by agent.
    pending: HashMap<String, HashSet<String>>,
    presence: Vec<Seen>,
    connected_on: HashMap<String, String>,
}

impl Server {
    async fn start(cluster: &Cluster, node: usize) -> Self {
        let token = cluster.tenant.token(Role::Server, "console");
        let mut client = Client::connect(cluster.nodes[node].addr, &token)
            .await
            .expect("server connects");
        client.subscribe("agents/+/presence").await;
        client.subscribe("agents/+/ack").await;
        Self {
            client,
            pending: HashMap::new(),
            presence: Vec::new(),
            connected_on: HashMap::new(),
        }
    }

    async fn wake(&mut self, agent: &str, id: &str) {
        self.pending
            .entry(agent.to_owned())
            .or_default()
            .insert(id.to_owned());
        self.client
            .publish(&format!("agents/{agent}/wake"), id, Some(600))
            .await;
    }

    /// Handles messages until `done` holds; panics after `WAIT` saying `what`.
    async fn until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match self.client.message(left).await {
                Ok(m) => m,
                Err(e) => panic!(
                    "{what}: not within {WAIT:?} ({e:?}); presence seen {:#?}, pending {:?}",
                    self.presence, self.pending
                ),
            };
            let mut levels = msg.topic.split('/');
            let (Some("agents"), Some(agent), Some(kind)) =
                (levels.next(), levels.next(), levels.next())
            else {
                continue;
            };
            let agent = agent.to_owned();
            match kind {
                "presence" => {
                    let event = PresenceEvent::from_json(&msg.payload).expect("presence JSON");
                    self.presence.push(Seen {
                        agent: agent.clone(),
                        state: event.state,
                        node: event.node.clone(),
                        reason: event.reason.clone(),
                    });
                    if event.state == PresenceState::Connected {
                        self.connected_on
                            .insert(agent.clone(), event.node.clone().unwrap_or_default());
                        let ids: Vec<String> = self
                            .pending
                            .get(&agent)
                            .map(|p| p.iter().cloned().collect())
                            .unwrap_or_default();
                        for id in ids {
                            self.client
                                .publish(&format!("agents/{agent}/wake"), &id, Some(600))
                                .await;
                        }
                    } else {
                        self.connected_on.remove(&agent);
                    }
                }
                "ack" => {
                    let id = String::from_utf8_lossy(&msg.payload).into_owned();
                    if let Some(p) = self.pending.get_mut(&agent) {
                        p.remove(&id);
                    }
                }
                _ => {}
            }
        }
    }

    fn all_acked(&self) -> bool {
        self.pending.values().all(HashSet::is_empty)
    }

    /// The presence events of `agent` seen from index `from` on.
    fn history(&self, agent: &str, from: usize) -> Vec<Seen> {
        self.presence[from..]
            .iter()
            .filter(|s| s.agent == agent)
            .cloned()
            .collect()
    }
}

/// What a simulated agent reports.
#[derive(Debug)]
struct Received {
    agent: String,
    wake_id: String,
    node: usize,
    qos: QoS,
}

/// A simulated agent: connects to the first endpoint of its list that works, subscribes to
/// its wake-ups, acknowledges each (QoS 1 PUBACK, then an ack message with the wake-up id),
/// and moves on to the next endpoint when its connection ends, as the agent's ladder does
/// with several broker endpoints.
async fn run_agent(
    id: String,
    token: String,
    endpoints: Vec<(usize, SocketAddr)>,
    report: mpsc::UnboundedSender<Received>,
    mut stop: watch::Receiver<bool>,
) {
    let mut i = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let (node, addr) = endpoints[i % endpoints.len()];
        i += 1;
        let Ok(mut client) = Client::connect(addr, &token).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        client.subscribe(&format!("agents/{id}/wake")).await;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                msg = client.message(Duration::from_secs(3600)) => {
                    let Ok(msg) = msg else { break };
                    let wake_id = String::from_utf8_lossy(&msg.payload).into_owned();
                    let _ = report.send(Received { agent: id.clone(), wake_id: wake_id.clone(), node, qos: msg.qos });
                    let packet_id = client.packet_id();
                    let _ = client
                        .send(&Packet::Publish(Publish {
                            dup: false,
                            qos: QoS::AtLeastOnce,
                            retain: false,
                            topic: format!("agents/{id}/ack"),
                            packet_id: Some(packet_id),
                            payload: Bytes::from(wake_id),
                            properties: Properties::default(),
                        }))
                        .await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_ups_cross_nodes_and_a_connection_on_another_node_takes_the_session_over() {
    let cluster = Cluster::start();
    let mut server = Server::start(&cluster, 0).await;
    let subscriptions = settled_nats_subscriptions(cluster.monitor);

    // Six agents, two per node, each holding one connection.
    let mut agents = Vec::new();
    for k in 0..6 {
        let id = format!("pc-{k}");
        let node = k % 3;
        let token = cluster.tenant.token(Role::Agent, &id);
        let mut c = Client::connect(cluster.nodes[node].addr, &token)
            .await
            .expect("agent connects");
        c.subscribe(&format!("agents/{id}/wake")).await;
        agents.push((id, node, c));
    }
    server
        .until("every agent connected, on its own node", |s| {
            (0..6).all(|k| s.connected_on.get(&format!("pc-{k}")) == Some(&format!("n{}", k % 3)))
        })
        .await;

    // A wake-up published on n0 reaches the agents on n1 and n2, at QoS 1 with its expiry.
    for (id, _, _) in &agents {
        server.wake(id, &format!("w1-{id}")).await;
    }
    for (id, node, c) in &mut agents {
        let msg = c
            .message(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{id} on n{node} got no wake-up published on n0: {e:?}"));
        assert_eq!(msg.topic, format!("agents/{id}/wake"));
        assert_eq!(msg.payload, format!("w1-{id}").into_bytes());
        assert_eq!(msg.qos, QoS::AtLeastOnce, "QoS 1 end to end");
        let expiry = msg.properties.message_expiry_interval.expect("expiry kept");
        assert!((590..=600).contains(&expiry), "expiry {expiry}");
        // An ack published on the agent's node reaches the server on n0 (wildcard filter).
        c.publish(&format!("agents/{id}/ack"), &format!("w1-{id}"), None)
            .await;
    }
    server
        .until("every ack arrived on n0", Server::all_acked)
        .await;
    // Wake-ups went to each agent's node by the directory: the agents added no NATS
    // subscription (the acks' wildcard filter was the server's, before them).
    assert_eq!(
        settled_nats_subscriptions(cluster.monitor),
        subscriptions,
        "NATS holds no interest per agent"
    );

    // pc-1 lives on n1; a second connection with its identity on n2 takes the session over.
    let mark = server.presence.len();
    let token = cluster.tenant.token(Role::Agent, "pc-1");
    let mut moved = Client::connect(cluster.nodes[2].addr, &token)
        .await
        .expect("second connection accepted on n2");
    moved.subscribe("agents/pc-1/wake").await;
    let (_, _, old) = &mut agents[1];
    let mut old_code = None;
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match old.next(left).await {
            Ok(Packet::Disconnect(d)) => old_code = Some(d.code),
            Ok(_) => continue,
            Err(ReadEnd::Closed) => break,
            Err(ReadEnd::TimedOut) => panic!("the connection on n1 was not closed"),
        }
    }
    assert_eq!(
        old_code,
        Some(ReasonCode::SESSION_TAKEN_OVER),
        "0x8E across nodes"
    );
    server
        .until("pc-1 connected on n2", |s| {
            s.connected_on.get("pc-1").map(String::as_str) == Some("n2")
        })
        .await;
    let history = server.history("pc-1", mark);
    let states: Vec<_> = history
        .iter()
        .map(|s| (s.state, s.node.as_deref()))
        .collect();
    assert_eq!(
        states,
        [
            (PresenceState::Disconnected, Some("n1")),
            (PresenceState::Connected, Some("n2"))
        ],
        "{history:?}"
    );
    assert_eq!(history[0].reason.as_deref(), Some("taken_over"));

    // The next wake-up for pc-1 goes to n2.
    server.wake("pc-1", "w2").await;
    let msg = moved.message(WAIT).await.expect("wake-up on the new node");
    assert_eq!(msg.payload, &b"w2"[..]);

    // A server connecting later, on another node, finds the retained presence of every agent.
    let retained = retained_presence(cluster.nodes[1].addr, &cluster.tenant, 6).await;
    assert_eq!(
        retained.get("agents/pc-1/presence"),
        Some(&(PresenceState::Connected, Some("n2".to_owned())))
    );

    // A node that joins now gets the cluster's retained messages: presence included.
    let mut cluster = cluster;
    let joined = Node::start("n3", &cluster.nats_url, cluster.tenant.dir.path());
    let retained = retained_presence(joined.addr, &cluster.tenant, 6).await;
    for k in 0..6 {
        let expected = if k == 1 {
            "n2".to_owned()
        } else {
            format!("n{}", k % 3)
        };
        assert_eq!(
            retained.get(&format!("agents/pc-{k}/presence")),
            Some(&(PresenceState::Connected, Some(expected))),
            "{retained:?}"
        );
    }
    // It found every agent's node in that snapshot: a server on it wakes agents on the
    // others.
    cluster.nodes.push(joined);
    let mut late = Server::start(&cluster, 3).await;
    for (k, (id, _, c)) in agents.iter_mut().enumerate().filter(|(k, _)| *k != 1) {
        late.wake(id, &format!("w3-{k}")).await;
        let msg = c.message(WAIT).await.unwrap_or_else(|e| {
            panic!("{id} got no wake-up from the node that joined last: {e:?}")
        });
        assert_eq!(msg.payload, format!("w3-{k}").into_bytes());
    }
    late.wake("pc-1", "w3-1").await;
    let msg = moved.message(WAIT).await.expect("pc-1 woken from n3");
    assert_eq!(msg.payload, &b"w3-1"[..]);
}

/// The retained presence a server connecting to `addr` finds: at least `count` topics, within
/// `WAIT` (a node that just joined may still be receiving the snapshot: retried).
async fn retained_presence(
    addr: SocketAddr,
    tenant: &Tenant,
    count: usize,
) -> HashMap<String, (PresenceState, Option<String>)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let token = tenant.token(Role::Server, "late");
        let mut late = Client::connect(addr, &token).await.expect("late server");
        late.subscribe("agents/+/presence").await;
        let mut retained = HashMap::new();
        while let Ok(msg) = late.message(Duration::from_millis(500)).await {
            let event = PresenceEvent::from_json(&msg.payload).expect("JSON");
            retained.insert(msg.topic.clone(), (event.state, event.node));
        }
        if retained.len() >= count {
            return retained;
        }
        assert!(
            Instant::now() < deadline,
            "only {} retained presence events on {addr} within {WAIT:?}: {retained:?}",
            retained.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dies_its_agents_move_presence_follows_and_no_valid_wake_up_is_lost() {
    let mut cluster = Cluster::start();
    let mut server = Server::start(&cluster, 0).await;
    let (report_tx, mut report) = mpsc::unbounded_channel();
    let (stop, stop_rx) = watch::channel(false);

    // Six agents spread over the nodes, each with the list of all nodes starting at its own;
    // one more on n1 that knows no other endpoint (it cannot move).
    let endpoints: Vec<(usize, SocketAddr)> = cluster
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (i, n.addr))
        .collect();
    let mut ids = Vec::new();
    for k in 0..6 {
        let id = format!("pc-{k}");
        let mut list = endpoints.clone();
        list.rotate_left(k % 3);
        let token = cluster.tenant.token(Role::Agent, &id);
        tokio::spawn(run_agent(
            id.clone(),
            token,
            list,
            report_tx.clone(),
            stop_rx.clone(),
        ));
        ids.push(id);
    }
    let token = cluster.tenant.token(Role::Agent, "stuck");
    tokio::spawn(run_agent(
        "stuck".into(),
        token,
        vec![endpoints[1]],
        report_tx.clone(),
        stop_rx.clone(),
    ));
    server
        .until("every agent connected", |s| {
            (0..6).all(|k| s.connected_on.get(&format!("pc-{k}")) == Some(&format!("n{}", k % 3)))
                && s.connected_on.get("stuck").map(String::as_str) == Some("n1")
        })
        .await;
    for id in &ids {
        server.wake(id, &format!("before-{id}")).await;
    }
    server
        .until("the first wake-ups acknowledged", Server::all_acked)
        .await;

    // n1 dies. Wake-ups go out at once, while its agents are still moving.
    let mark = server.presence.len();
    cluster.nodes[1].kill();
    for id in &ids {
        server.wake(id, &format!("after-{id}")).await;
    }
    server
        .until(
            "every wake-up acknowledged, n1's agents connected elsewhere, stuck released",
            |s| {
                s.all_acked()
                    && ["pc-1", "pc-4"]
                        .iter()
                        .all(|a| s.connected_on.get(*a).is_some_and(|n| n != "n1"))
                    && s.history("stuck", mark)
                        .iter()
                        .any(|e| e.state == PresenceState::Disconnected)
            },
        )
        .await;

    // Presence of the moved agents: disconnected (from n1), then connected on a live node.
    for agent in ["pc-1", "pc-4"] {
        let history = server.history(agent, mark);
        let first_connected = history
            .iter()
            .position(|e| e.state == PresenceState::Connected)
            .unwrap_or_else(|| panic!("{agent}: no connected event after the kill: {history:?}"));
        assert!(
            history[..first_connected]
                .iter()
                .any(|e| e.state == PresenceState::Disconnected && e.node.as_deref() == Some("n1")),
            "{agent}: disconnected from n1 before connected elsewhere: {history:?}"
        );
        assert_ne!(history[first_connected].node.as_deref(), Some("n1"));
    }
    // The agent that could not move is released by the survivors when n1 goes silent.
    let stuck = server.history("stuck", mark);
    assert!(
        stuck.iter().any(|e| e.state == PresenceState::Disconnected
            && e.reason.as_deref() == Some("node_lost")
            && e.node.as_deref() == Some("n1")),
        "{stuck:?}"
    );
    // Agents on the surviving nodes saw no presence change.
    for agent in ["pc-0", "pc-2", "pc-3", "pc-5"] {
        assert!(
            server.history(agent, mark).is_empty(),
            "{agent}: {:?}",
            server.history(agent, mark)
        );
    }

    // Every wake-up reached its agent at QoS 1; the moved agents got theirs on a live node.
    let _ = stop.send(true);
    drop(report_tx);
    let mut got: HashMap<String, HashSet<String>> = HashMap::new();
    while let Ok(r) = report.try_recv() {
        assert_eq!(r.qos, QoS::AtLeastOnce, "{r:?}");
        if r.wake_id.starts_with("after-") && (r.agent == "pc-1" || r.agent == "pc-4") {
            assert_ne!(r.node, 1, "{r:?} arrived through the dead node");
        }
        got.entry(r.agent).or_default().insert(r.wake_id);
    }
    for id in &ids {
        let mine = got.get(id).cloned().unwrap_or_default();
        assert!(
            mine.contains(&format!("before-{id}")) && mine.contains(&format!("after-{id}")),
            "{id} got {mine:?}"
        );
    }
    let _ = &cluster.nodes[0].name;
}

/// Agent `id` connected to node `node` and subscribed to its wake-ups.
async fn agent_on(cluster: &Cluster, node: usize, id: &str) -> Client {
    let token = cluster.tenant.token(Role::Agent, id);
    let mut c = Client::connect(cluster.nodes[node].addr, &token)
        .await
        .unwrap_or_else(|e| panic!("{id} connects to n{node}: {e}"));
    c.subscribe(&format!("agents/{id}/wake")).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wake_ups_held_by_a_node_that_is_killed_reach_their_agents_on_the_next_node() {
    let mut cluster = Cluster::start();
    // The publisher sends each wake-up once and never again (no console's resend here).
    let token = cluster.tenant.token(Role::Server, "console");
    let mut publisher = Client::connect(cluster.nodes[0].addr, &token)
        .await
        .expect("server connects");
    publisher.subscribe("agents/+/presence").await;

    // Twenty agents on n1.
    let ids: Vec<String> = (0..20).map(|k| format!("pc-{k}")).collect();
    let mut agents = Vec::new();
    for id in &ids {
        agents.push(agent_on(&cluster, 1, id).await);
    }
    let mut on_n1 = HashSet::new();
    while on_n1.len() < ids.len() {
        let msg = publisher
            .message(WAIT)
            .await
            .unwrap_or_else(|e| panic!("only {} agents seen on n1: {e:?}", on_n1.len()));
        let event = PresenceEvent::from_json(&msg.payload).expect("presence JSON");
        if event.state == PresenceState::Connected && event.node.as_deref() == Some("n1") {
            on_n1.insert(msg.topic.clone());
        }
    }

    // The fan-out: every wake-up accepted on n0 (PUBACK) and handed to n1. Half of the
    // agents read theirs without acknowledging it; the other half do not even read.
    for id in &ids {
        publisher
            .publish(&format!("agents/{id}/wake"), &format!("w-{id}"), Some(600))
            .await;
    }
    for (id, agent) in ids.iter().zip(&mut agents).step_by(2) {
        match agent.read(WAIT).await {
            Ok(Packet::Publish(p)) => assert_eq!(p.payload, format!("w-{id}").into_bytes()),
            other => panic!("{id}: no wake-up on n1: {other:?}"),
        }
    }
    // n1 is killed before any agent acknowledged anything.
    cluster.nodes[1].kill();
    drop(agents);

    // Each agent comes back on n2, as a new session, and gets its wake-up there.
    for id in &ids {
        let mut c = agent_on(&cluster, 2, id).await;
        let msg = c
            .message(WAIT)
            .await
            .unwrap_or_else(|e| panic!("{id}: its wake-up did not follow it to n2: {e:?}"));
        assert_eq!(msg.payload, format!("w-{id}").into_bytes());
        assert_eq!(msg.qos, QoS::AtLeastOnce);
        let expiry = msg.properties.message_expiry_interval.expect("expiry kept");
        assert!((560..=600).contains(&expiry), "expiry {expiry}");
        // Acknowledged: it is not sent again.
        assert!(
            matches!(
                c.message(Duration::from_millis(300)).await,
                Err(ReadEnd::TimedOut)
            ),
            "{id}: a second copy"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_each_node_serves_its_own_clients_and_the_cluster_heals() {
    let mut cluster = Cluster::start();
    let mut server = Server::start(&cluster, 0).await;
    let mut agents = Vec::new();
    for (id, node) in [("pc-0", 0), ("pc-1", 1)] {
        let token = cluster.tenant.token(Role::Agent, id);
        let mut c = Client::connect(cluster.nodes[node].addr, &token)
            .await
            .expect("agent connects");
        c.subscribe(&format!("agents/{id}/wake")).await;
        agents.push(c);
    }
    server
        .until("both agents connected", |s| s.connected_on.len() == 2)
        .await;

    // NATS goes away: a wake-up from n0 to the agent on n0 still arrives.
    drop(cluster.nats.take());
    server
        .client
        .send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "agents/pc-0/wake".into(),
            packet_id: Some(900),
            payload: Bytes::from_static(b"local"),
            properties: Properties::default(),
        }))
        .await
        .expect("publish");
    let msg = agents[0]
        .message(WAIT)
        .await
        .expect("local wake-up without NATS");
    assert_eq!(msg.payload, &b"local"[..]);

    // NATS comes back on the same address: messages cross nodes again.
    let port = cluster
        .nats_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("port");
    cluster.nats = Some(start_nats_on(port));
    // The publisher whose PUBACK could not be kept was disconnected to resend; a new one.
    let mut server = Server::start(&cluster, 0).await;
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("healed-{n}");
        server.wake("pc-1", &id).await;
        match agents[1].message(Duration::from_secs(1)).await {
            Ok(msg) if msg.payload == id.as_bytes() => break,
            Ok(_) | Err(ReadEnd::TimedOut) => {}
            Err(ReadEnd::Closed) => panic!("the agent on n1 lost its connection"),
        }
        assert!(
            Instant::now() < deadline,
            "no wake-up crossed from n0 to n1 within {WAIT:?} after NATS came back"
        );
    }
}
