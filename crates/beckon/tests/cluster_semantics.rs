//! MQTT semantics that span the cluster, on a nats-server and two `beckon broker` nodes:
//! a shared subscription with members on both nodes gets each message once in the cluster;
//! one client id connecting on both nodes at the same moment ends with exactly one session
//! (the later connection, then the greater node name), the other connection getting
//! DISCONNECT 0x8E, and presence ending on the connection that stayed.

mod cluster_support;
mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use beckon_identity::{PresenceEvent, PresenceState, Role};
use beckon_mqtt::{Packet, ReasonCode};

use cluster_support::{Client, Node, ReadEnd, Tenant, WAIT, start_nats};

/// How a connection of the pair ended, or that it is still open after the settling time.
#[derive(Debug, PartialEq)]
enum Fate {
    Open,
    /// DISCONNECT with this reason code, then closed.
    Disconnected(ReasonCode),
    /// Closed without a DISCONNECT.
    Closed,
}

/// Reads `client` until it is closed or `until` passes.
async fn fate(client: &mut Client, until: Instant) -> Fate {
    let mut code = None;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match client.next(left).await {
            Ok(Packet::Disconnect(d)) => code = Some(d.code),
            Ok(_) => {}
            Err(ReadEnd::TimedOut) => return Fate::Open,
            Err(ReadEnd::Closed) => return code.map_or(Fate::Closed, Fate::Disconnected),
        }
    }
}

/// The retained presence of `agent` as a server connecting to `addr` finds it, once it says
/// connected on `node` (bounded by `WAIT`).
async fn presence_settles(addr: SocketAddr, tenant: &Tenant, agent: &str, node: &str) {
    let deadline = Instant::now() + WAIT;
    let topic = format!("agents/{agent}/presence");
    loop {
        let mut late = Client::connect(addr, &tenant.token(Role::Server, "late"))
            .await
            .expect("late server");
        late.subscribe(&topic).await;
        let mut seen = None;
        while let Ok(msg) = late.message(Duration::from_millis(300)).await {
            let event = PresenceEvent::from_json(&msg.payload).expect("presence JSON");
            seen = Some((event.state, event.node));
        }
        if seen == Some((PresenceState::Connected, Some(node.to_owned()))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{agent}: retained presence on {addr} is {seen:?}, not connected on {node}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_id_on_two_nodes_at_the_same_moment_ends_with_one_session() {
    let (_nats, url) = start_nats();
    let tenant = Tenant::create();
    let nodes = [
        Node::start("n0", &url, tenant.dir.path()),
        Node::start("n1", &url, tenant.dir.path()),
    ];
    let mut server = Client::connect(nodes[0].addr, &tenant.token(Role::Server, "console"))
        .await
        .expect("server connects");

    for round in 0..6 {
        let agent = format!("twin-{round}");
        let token = tenant.token(Role::Agent, &agent);
        let (a, b) = tokio::join!(
            Client::connect(nodes[0].addr, &token),
            Client::connect(nodes[1].addr, &token)
        );
        let mut pair = [a.expect("accepted on n0"), b.expect("accepted on n1")];
        // Well beyond a claim's round trip through NATS on loopback.
        let until = Instant::now() + Duration::from_secs(3);
        let [p0, p1] = &mut pair;
        let (fate_a, fate_b) = tokio::join!(fate(p0, until), fate(p1, until));
        let fates = [fate_a, fate_b];
        let open: Vec<usize> = (0..2).filter(|&i| fates[i] == Fate::Open).collect();
        assert_eq!(open.len(), 1, "round {round}: exactly one stays: {fates:?}");
        let (stays, goes) = (open[0], 1 - open[0]);
        assert_eq!(
            fates[goes],
            Fate::Disconnected(ReasonCode::SESSION_TAKEN_OVER),
            "round {round}: the other is taken over"
        );

        // The session that stayed works across the cluster: a wake-up from n0 reaches it.
        let survivor = &mut pair[stays];
        survivor.subscribe(&format!("agents/{agent}/wake")).await;
        presence_settles(nodes[0].addr, &tenant, &agent, &nodes[stays].name).await;
        presence_settles(nodes[1].addr, &tenant, &agent, &nodes[stays].name).await;
        let id = format!("w-{round}");
        server
            .publish(&format!("agents/{agent}/wake"), &id, Some(600))
            .await;
        let msg = survivor
            .message(WAIT)
            .await
            .unwrap_or_else(|e| panic!("round {round}: no wake-up on n{stays}: {e:?}"));
        assert_eq!(msg.payload, id.as_bytes());
    }
}

/// Reads what `member` received until nothing more comes for `quiet`: payload -> count.
async fn drain(member: &mut Client, quiet: Duration, into: &mut HashMap<String, usize>) {
    while let Ok(msg) = member.message(quiet).await {
        *into
            .entry(String::from_utf8_lossy(&msg.payload).into_owned())
            .or_default() += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_gets_each_message_once_in_the_cluster() {
    let (_nats, url) = start_nats();
    let tenant = Tenant::create();
    let nodes = [
        Node::start("n0", &url, tenant.dir.path()),
        Node::start("n1", &url, tenant.dir.path()),
    ];
    // One member of the group on each node; one publishing agent on each node.
    let mut members = Vec::new();
    let mut agents = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut member = Client::connect(
            node.addr,
            &tenant.token(Role::Server, &format!("worker-{i}")),
        )
        .await
        .expect("member connects");
        member.subscribe("$share/workers/agents/+/ack").await;
        members.push(member);
        let agent = Client::connect(node.addr, &tenant.token(Role::Agent, &format!("pc-{i}")))
            .await
            .expect("agent connects");
        agents.push(agent);
    }

    // Until both nodes' queue subscriptions are in NATS, probes may go to one member only.
    let deadline = Instant::now() + WAIT;
    let mut probe = 0;
    let mut got: [HashMap<String, usize>; 2] = Default::default();
    loop {
        probe += 1;
        agents[0]
            .publish("agents/pc-0/ack", &format!("probe-{probe}"), None)
            .await;
        for (member, got) in members.iter_mut().zip(&mut got) {
            drain(member, Duration::from_millis(100), got).await;
        }
        if !got[0].is_empty() && !got[1].is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group never reached both nodes within {WAIT:?}"
        );
    }
    for member in &mut members {
        drain(member, Duration::from_millis(700), &mut HashMap::new()).await;
    }

    // 40 messages, half published on each node: each reaches exactly one member.
    for k in 0..40 {
        let i = k % 2;
        agents[i]
            .publish(&format!("agents/pc-{i}/ack"), &format!("job-{k}"), None)
            .await;
    }
    let mut got: [HashMap<String, usize>; 2] = Default::default();
    for (member, got) in members.iter_mut().zip(&mut got) {
        drain(member, Duration::from_millis(700), got).await;
    }
    for k in 0..40 {
        let job = format!("job-{k}");
        let times = got[0].get(&job).unwrap_or(&0) + got[1].get(&job).unwrap_or(&0);
        assert_eq!(times, 1, "{job} delivered {times} times: {got:?}");
    }
    // NATS spreads the group over both nodes, whichever node published.
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "one member got everything: {got:?}"
    );
}
