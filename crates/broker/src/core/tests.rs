//! Behaviour of the core as clients see it: an in-memory harness feeds CONNECT and packets,
//! advances a fake clock, and inspects the actions that come out. No sockets, no real time.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use beckon_mqtt::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, RetainHandling, Subscribe, Subscription, SubscriptionOptions, Unsubscribe, Will,
};
use bytes::Bytes;

mod quota;

use super::{
    Action, BrokerCore, CloseReason, ConnId, ConnectionInfo, CoreConfig, effective_keep_alive,
};

/// A broker core with a fake clock and numbered connections.
struct Harness {
    core: BrokerCore,
    now: Instant,
    next_conn: ConnId,
}

impl Harness {
    fn new() -> Self {
        Self::with_config(CoreConfig::default())
    }

    fn with_config(config: CoreConfig) -> Self {
        Self {
            core: BrokerCore::new(config),
            now: Instant::now(),
            next_conn: 1,
        }
    }

    /// Opens a connection with `connect`; returns its id and the actions (CONNACK first).
    fn connect(&mut self, connect: Connect) -> (ConnId, Vec<Action>) {
        self.open(connect, false)
    }

    /// Opens a connection of an agent (`server` false, port 40000) or of a server identity
    /// such as a console (port 40001); returns its id and the actions.
    fn open(&mut self, connect: Connect, server: bool) -> (ConnId, Vec<Action>) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let mut out = Vec::new();
        let info = ConnectionInfo {
            remote_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 40000 + u16::from(server))),
            path: "8883",
            server,
            identity: None,
            via_proxy: None,
        };
        let _accepted = self
            .core
            .handle_connect(self.now, conn, connect, info, &mut out);
        (conn, out)
    }

    /// Connects and asserts success; returns the connection, its CONNACK and the actions.
    fn connect_ok(&mut self, connect: Connect) -> (ConnId, ConnAck, Vec<Action>) {
        accepted(self.open(connect, false))
    }

    /// [`connect_ok`](Self::connect_ok) for a server identity (a console).
    fn connect_server(&mut self, connect: Connect) -> (ConnId, ConnAck, Vec<Action>) {
        accepted(self.open(connect, true))
    }

    /// Connects (asserting success) and subscribes to `filter`; returns the connection.
    fn subscriber(&mut self, connect: Connect, filter: &str, qos: QoS) -> ConnId {
        let (conn, _, _) = self.connect_ok(connect);
        self.subscribe(conn, filter, qos);
        conn
    }

    fn send(&mut self, conn: ConnId, packet: Packet) -> Vec<Action> {
        let mut out = Vec::new();
        self.core.handle_packet(self.now, conn, packet, &mut out);
        out
    }

    fn close(&mut self, conn: ConnId) -> Vec<Action> {
        let mut out = Vec::new();
        self.core
            .handle_close(self.now, conn, CloseReason::Transport, &mut out);
        out
    }

    fn advance(&mut self, secs: u64) -> Vec<Action> {
        self.now += Duration::from_secs(secs);
        let mut out = Vec::new();
        self.core.tick(self.now, &mut out);
        out
    }

    /// Subscribes `conn` to `filter` and returns the actions (SUBACK, retained messages).
    fn subscribe(&mut self, conn: ConnId, filter: &str, qos: QoS) -> Vec<Action> {
        self.send(conn, subscribe(1, filter, options(qos)))
    }
}

/// The CONNACK of an opened connection, which must be first and a success.
fn accepted((conn, out): (ConnId, Vec<Action>)) -> (ConnId, ConnAck, Vec<Action>) {
    let Some(Packet::ConnAck(ack)) = packets(&out, conn).first().cloned() else {
        panic!("no CONNACK first: {out:?}");
    };
    assert_eq!(ack.code, ReasonCode::SUCCESS, "{ack:?}");
    (conn, ack, out)
}

fn v5(client_id: &str) -> Connect {
    Connect::new(ProtocolVersion::V5, client_id, 60)
}

/// A v5 CONNECT that resumes (clean start 0) with a session expiry interval.
fn v5_persistent(client_id: &str, expiry: u32) -> Connect {
    let mut c = v5(client_id);
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(expiry);
    c
}

fn v3(client_id: &str, clean: bool) -> Connect {
    Connect {
        protocol: ProtocolVersion::V311,
        clean_start: clean,
        ..v5(client_id)
    }
}

fn with_will(mut c: Connect, topic: &str, delay: Option<u32>) -> Connect {
    c.will = Some(Will {
        topic: topic.into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::from(beckon_mqtt::PropertySet {
            will_delay_interval: delay,
            ..Default::default()
        }),
    });
    c
}

fn options(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..SubscriptionOptions::default()
    }
}

fn subscribe(packet_id: u16, filter: &str, options: SubscriptionOptions) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        subscriptions: vec![Subscription {
            filter: filter.into(),
            options,
        }],
        properties: Properties::default(),
    })
}

fn publish(topic: &str, payload: &'static str, qos: QoS, packet_id: Option<u16>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        payload: Bytes::from_static(payload.as_bytes()),
        properties: Properties::default(),
    }
}

fn pub_packet(topic: &str, payload: &'static str, qos: QoS, packet_id: Option<u16>) -> Packet {
    Packet::Publish(publish(topic, payload, qos, packet_id))
}

fn packets(actions: &[Action], conn: ConnId) -> Vec<Packet> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { conn: c, packet } if *c == conn => Some(packet.clone()),
            _ => None,
        })
        .collect()
}

fn publishes(actions: &[Action], conn: ConnId) -> Vec<Publish> {
    packets(actions, conn)
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn payloads(actions: &[Action], conn: ConnId) -> Vec<String> {
    publishes(actions, conn)
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

fn closed(actions: &[Action], conn: ConnId) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Close { conn: c } if *c == conn))
}

/// The reason code of the DISCONNECT sent to `conn`, if one was sent.
fn disconnect_code(actions: &[Action], conn: ConnId) -> Option<ReasonCode> {
    packets(actions, conn).into_iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.code),
        _ => None,
    })
}

/// Asserts that `conn` was sent a DISCONNECT with `code` and closed.
fn assert_disconnected(actions: &[Action], conn: ConnId, code: ReasonCode) {
    assert_eq!(disconnect_code(actions, conn), Some(code), "{actions:?}");
    assert!(closed(actions, conn), "{actions:?}");
}

// ---------------------------------------------------------------------------------------
// CONNECT and CONNACK

#[test]
fn v5_connack_announces_the_limits() {
    let mut h = Harness::with_config(CoreConfig {
        max_keep_alive: Some(30),
        ..CoreConfig::default()
    });
    let connect = v5("agent-1");
    let (_, ack, _) = h.connect_ok(connect.clone());
    let p = &ack.properties;
    assert!(!ack.session_present);
    assert_eq!(p.receive_maximum, Some(64));
    assert_eq!(p.maximum_packet_size, Some(1024 * 1024));
    assert_eq!(p.topic_alias_maximum, Some(64));
    assert_eq!(p.maximum_qos, None, "QoS 2 is supported: no Maximum QoS");
    assert_eq!(p.retain_available, None);
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(p.subscription_identifier_available, Some(1));
    assert_eq!(p.shared_subscription_available, Some(1));
    assert_eq!(
        p.server_keep_alive,
        Some(30),
        "client asked 60, the server caps at 30"
    );
    assert_eq!(
        effective_keep_alive(&connect, &ack),
        Some(Duration::from_secs(30))
    );
    assert_eq!(p.assigned_client_identifier, None);
}

#[test]
fn v5_connack_reports_reduced_capabilities() {
    let mut h = Harness::with_config(CoreConfig {
        max_qos: QoS::AtLeastOnce,
        retain_available: false,
        topic_alias_maximum: 0,
        max_session_expiry: 100,
        ..CoreConfig::default()
    });
    let (_, ack, _) = h.connect_ok(v5_persistent("a", 1000));
    assert_eq!(ack.properties.maximum_qos, Some(1));
    assert_eq!(ack.properties.retain_available, Some(0));
    assert_eq!(ack.properties.topic_alias_maximum, None);
    assert_eq!(
        ack.properties.session_expiry_interval,
        Some(100),
        "capped expiry announced"
    );
    assert_eq!(ack.properties.server_keep_alive, None);
}

#[test]
fn v3_connack_has_no_properties_and_keeps_client_keep_alive() {
    let mut h = Harness::new();
    let connect = v3("agent-1", true);
    let (conn, ack, _) = h.connect_ok(connect.clone());
    assert!(ack.properties.is_empty());
    assert_eq!(
        effective_keep_alive(&connect, &ack),
        Some(Duration::from_secs(60))
    );
    assert_eq!(h.core.connection_count(), 1);
    assert_eq!(h.core.client_id(conn), Some("agent-1"));
    assert_eq!(h.core.connection_info(conn).map(|i| i.path), Some("8883"));
}

#[test]
fn v3_keep_alive_above_server_maximum_is_refused() {
    let mut h = Harness::with_config(CoreConfig {
        max_keep_alive: Some(30),
        ..CoreConfig::default()
    });
    let (conn, out) = h.connect(v3("a", true));
    assert!(
        matches!(&packets(&out, conn)[0], Packet::ConnAck(a) if a.code == ReasonCode::CLIENT_IDENTIFIER_NOT_VALID)
    );
    assert!(closed(&out, conn));
    let mut ok = v3("b", true);
    ok.keep_alive = 30;
    h.connect_ok(ok);
}

#[test]
fn empty_client_id_gets_a_unique_assigned_id() {
    let mut h = Harness::new();
    let (c1, a1, _) = h.connect_ok(v5(""));
    let (c2, a2, _) = h.connect_ok(v5(""));
    let id1 = a1
        .properties
        .assigned_client_identifier
        .clone()
        .expect("assigned id");
    let id2 = a2
        .properties
        .assigned_client_identifier
        .clone()
        .expect("assigned id");
    assert_ne!(id1, id2);
    assert_eq!(h.core.client_id(c1), Some(id1.as_str()));
    assert_eq!(h.core.client_id(c2), Some(id2.as_str()));
    // v3.1.1: accepted with clean session 1 (no property to tell the id), refused with 0.
    let (c3, a3, _) = h.connect_ok(v3("", true));
    assert!(a3.properties.assigned_client_identifier.is_none());
    assert!(h.core.client_id(c3).is_some_and(|id| !id.is_empty()));
    let (c4, out) = h.connect(v3("", false));
    assert!(
        matches!(&packets(&out, c4)[0], Packet::ConnAck(a) if a.code == ReasonCode::CLIENT_IDENTIFIER_NOT_VALID)
    );
    assert!(closed(&out, c4));
    assert_eq!(h.core.connection_count(), 3);
}

#[test]
fn enhanced_authentication_is_refused() {
    let mut h = Harness::new();
    let mut c = v5("a");
    c.properties.authentication_method = Some("SCRAM-SHA-1".into());
    let (conn, out) = h.connect(c);
    assert!(
        matches!(&packets(&out, conn)[0], Packet::ConnAck(a) if a.code == ReasonCode::BAD_AUTHENTICATION_METHOD)
    );
    assert!(closed(&out, conn));
    assert_eq!(h.core.connection_count(), 0);

    let (conn, _, _) = h.connect_ok(v5("b"));
    let out = h.send(conn, Packet::Auth(Auth::default()));
    assert_disconnected(&out, conn, ReasonCode::PROTOCOL_ERROR);
    assert_eq!(h.core.connection_count(), 0);
}

#[test]
fn second_connect_on_a_connection_is_a_protocol_error() {
    let mut h = Harness::new();
    let (conn, _, _) = h.connect_ok(v5("a"));
    let out = h.send(conn, Packet::Connect(Box::new(v5("a"))));
    assert_disconnected(&out, conn, ReasonCode::PROTOCOL_ERROR);
    assert_eq!(h.core.connection_count(), 0);
    assert_eq!(h.core.stats().protocol_errors, 1);
    // Packets for a connection the core forgot produce nothing.
    assert!(h.send(conn, Packet::PingReq).is_empty());
    assert!(h.close(conn).is_empty());
}

#[test]
fn will_qos_or_retain_beyond_capabilities_is_refused_in_v5() {
    let mut h = Harness::with_config(CoreConfig {
        max_qos: QoS::AtMostOnce,
        retain_available: false,
        ..CoreConfig::default()
    });
    let (conn, out) = h.connect(with_will(v5("a"), "w", None));
    assert!(
        matches!(&packets(&out, conn)[0], Packet::ConnAck(a) if a.code == ReasonCode::QOS_NOT_SUPPORTED)
    );
    let mut c = with_will(v5("b"), "w", None);
    if let Some(w) = c.will.as_mut() {
        w.qos = QoS::AtMostOnce;
        w.retain = true;
    }
    let (conn, out) = h.connect(c);
    assert!(
        matches!(&packets(&out, conn)[0], Packet::ConnAck(a) if a.code == ReasonCode::RETAIN_NOT_SUPPORTED)
    );
    assert!(closed(&out, conn));
}

#[test]
fn ping_gets_pong() {
    let mut h = Harness::new();
    let (conn, _, _) = h.connect_ok(v3("a", true));
    assert_eq!(
        packets(&h.send(conn, Packet::PingReq), conn),
        vec![Packet::PingResp]
    );
}

// ---------------------------------------------------------------------------------------
// Sessions

#[test]
fn clean_start_discards_the_stored_session() {
    let mut h = Harness::new();
    let c = h.subscriber(
        v5_persistent("agent", 300),
        "agents/agent/wake",
        QoS::AtLeastOnce,
    );
    h.close(c);
    assert_eq!(h.core.session_count(), 1);
    let (p, _, _) = h.connect_ok(v5("server"));
    h.send(
        p,
        pub_packet("agents/agent/wake", "w", QoS::AtLeastOnce, Some(1)),
    );
    let mut fresh = v5_persistent("agent", 300);
    fresh.clean_start = true;
    let (c2, ack, out) = h.connect_ok(fresh);
    assert!(!ack.session_present);
    assert!(
        publishes(&out, c2).is_empty(),
        "queued message went with the old session"
    );
    let out = h.send(
        p,
        pub_packet("agents/agent/wake", "w", QoS::AtLeastOnce, Some(2)),
    );
    assert!(
        publishes(&out, c2).is_empty(),
        "subscription went with the old session"
    );
}

#[test]
fn persistent_session_resumes_with_queued_messages() {
    let mut h = Harness::new();
    let c = h.subscriber(
        v5_persistent("agent", 300),
        "agents/agent/wake",
        QoS::AtLeastOnce,
    );
    h.close(c);
    let (p, _, _) = h.connect_ok(v5("server"));
    let out = h.send(
        p,
        pub_packet("agents/agent/wake", "one", QoS::AtLeastOnce, Some(1)),
    );
    assert_eq!(
        packets(&out, p),
        vec![Packet::PubAck(Ack::new(1))],
        "an offline subscriber counts as matching"
    );
    h.send(
        p,
        pub_packet("agents/agent/wake", "two", QoS::AtLeastOnce, Some(2)),
    );
    h.send(
        p,
        pub_packet("agents/agent/wake", "lost", QoS::AtMostOnce, None),
    );
    assert_eq!(h.core.queued_messages(), 2);
    assert_eq!(
        h.core.stats().dropped_qos0_offline,
        1,
        "QoS 0 is not queued for offline clients"
    );
    let (c2, ack, out) = h.connect_ok(v5_persistent("agent", 300));
    assert!(ack.session_present);
    assert_eq!(payloads(&out, c2), vec!["one", "two"]);
    assert!(
        publishes(&out, c2)
            .iter()
            .all(|p| !p.dup && p.qos == QoS::AtLeastOnce)
    );
}

#[test]
fn v5_session_expires_after_its_interval() {
    let mut h = Harness::new();
    let c = h.subscriber(v5_persistent("agent", 10), "t", QoS::AtLeastOnce);
    h.close(c);
    h.advance(9);
    assert_eq!(h.core.session_count(), 1);
    assert_eq!(h.core.subscription_count(), 1);
    h.advance(1);
    assert_eq!(h.core.session_count(), 0);
    assert_eq!(h.core.subscription_count(), 0);
    assert_eq!(h.core.stats().sessions_expired, 1);
    let (_, ack, _) = h.connect_ok(v5_persistent("agent", 10));
    assert!(!ack.session_present);
}

#[test]
fn tick_reports_the_next_deadline() {
    let mut h = Harness::new();
    let (c, _, _) = h.connect_ok(v5_persistent("agent", 10));
    let mut out = Vec::new();
    assert_eq!(h.core.tick(h.now, &mut out), None);
    h.close(c);
    assert_eq!(
        h.core.next_deadline(),
        Some(h.now + Duration::from_secs(10))
    );
    assert_eq!(
        h.core.tick(h.now, &mut out),
        Some(h.now + Duration::from_secs(10))
    );
}

#[test]
fn session_with_expiry_zero_ends_at_close() {
    let mut h = Harness::new();
    let c = h.subscriber(v5("a"), "t", QoS::AtLeastOnce);
    h.close(c);
    assert_eq!(h.core.session_count(), 0);
    assert_eq!(h.core.subscription_count(), 0);
}

#[test]
fn v3_persistent_session_is_bounded_by_max_session_expiry() {
    let mut h = Harness::with_config(CoreConfig {
        max_session_expiry: 100,
        ..CoreConfig::default()
    });
    let c = h.subscriber(v3("old-agent", false), "t", QoS::AtLeastOnce);
    h.close(c);
    h.advance(99);
    let (c2, ack, _) = h.connect_ok(v3("old-agent", false));
    assert!(ack.session_present);
    h.close(c2);
    h.advance(100);
    assert_eq!(h.core.session_count(), 0);
    // v3.1.1 clean session 1 ends at close.
    let (c3, _, _) = h.connect_ok(v3("clean", true));
    h.close(c3);
    assert_eq!(h.core.session_count(), 0);
}

#[test]
fn disconnect_may_change_session_expiry() {
    let mut h = Harness::new();
    // Raising a zero expiry at DISCONNECT is a protocol error.
    let (c, _, _) = h.connect_ok(v5("a"));
    let d = Disconnect {
        properties: Properties::from(beckon_mqtt::PropertySet {
            session_expiry_interval: Some(60),
            ..Default::default()
        }),
        ..Disconnect::default()
    };
    let out = h.send(c, Packet::Disconnect(d.clone()));
    assert_disconnected(&out, c, ReasonCode::PROTOCOL_ERROR);
    // Lowering to zero ends the session at close.
    let (c, _, _) = h.connect_ok(v5_persistent("b", 60));
    let d0 = Disconnect {
        properties: Properties::from(beckon_mqtt::PropertySet {
            session_expiry_interval: Some(0),
            ..Default::default()
        }),
        ..Disconnect::default()
    };
    let out = h.send(c, Packet::Disconnect(d0));
    assert!(closed(&out, c));
    assert_eq!(
        disconnect_code(&out, c),
        None,
        "the server does not answer a DISCONNECT"
    );
    assert_eq!(h.core.session_count(), 0);
    // Changing a non-zero expiry is allowed.
    let (c, _, _) = h.connect_ok(v5_persistent("c", 10));
    h.send(c, Packet::Disconnect(d));
    h.advance(30);
    assert_eq!(h.core.session_count(), 1, "expiry raised to 60 s");
    h.advance(30);
    assert_eq!(h.core.session_count(), 0);
}

#[test]
fn offline_queue_is_bounded_and_overflow_counted() {
    let mut h = Harness::with_config(CoreConfig {
        max_queued_messages: 3,
        ..CoreConfig::default()
    });
    let c = h.subscriber(v5_persistent("agent", 300), "t", QoS::AtLeastOnce);
    h.close(c);
    let (p, _, _) = h.connect_ok(v5("server"));
    for (i, payload) in ["1", "2", "3", "4", "5"].into_iter().enumerate() {
        h.send(
            p,
            pub_packet("t", payload, QoS::AtLeastOnce, Some(i as u16 + 1)),
        );
    }
    assert_eq!(h.core.stats().dropped_queue_full, 2);
    let (c2, _, out) = h.connect_ok(v5_persistent("agent", 300));
    assert_eq!(payloads(&out, c2), vec!["1", "2", "3"]);
}

#[test]
fn a_server_identity_gets_the_larger_window_and_queue_of_a_console() {
    let mut h = Harness::with_config(CoreConfig {
        receive_maximum: 4,
        max_inflight: 2,
        max_queued_messages: 3,
        server_receive_maximum: 50,
        server_max_inflight: 10,
        server_max_queued_messages: 100,
        ..CoreConfig::default()
    });
    let (console, ack, _) = h.connect_server(v5_persistent("console", 300));
    assert_eq!(ack.properties.receive_maximum, Some(50));
    h.subscribe(console, "agents/+/ack", QoS::AtLeastOnce);
    let (agent, ack, _) = h.connect_ok(v5("agent"));
    assert_eq!(ack.properties.receive_maximum, Some(4));
    // 60 acks while the console reads nothing: 10 in flight, 50 queued, none dropped (an
    // agent's session would hold 2 + 3 and drop the rest).
    let mut delivered = 0;
    for i in 0..60u16 {
        let out = h.send(
            agent,
            pub_packet("agents/a/ack", "ok", QoS::AtLeastOnce, Some(i + 1)),
        );
        delivered += payloads(&out, console).len();
    }
    assert_eq!(delivered, 10);
    assert_eq!(h.core.stats().dropped_queue_full, 0);
    // Away, the console's session keeps queueing up to its own bound.
    h.close(console);
    for i in 0..60u16 {
        h.send(
            agent,
            pub_packet("agents/a/ack", "ok", QoS::AtLeastOnce, Some(i + 100)),
        );
    }
    assert_eq!(
        h.core.stats().dropped_queue_full,
        10,
        "50 + 60 queued, bound 100"
    );
}

#[test]
fn takeover_disconnects_the_old_connection_and_keeps_the_session() {
    let mut h = Harness::new();
    let watcher = h.subscriber(v5("watcher"), "wills/#", QoS::AtLeastOnce);
    let old = h.subscriber(
        with_will(v5_persistent("agent", 300), "wills/agent", None),
        "t",
        QoS::AtLeastOnce,
    );
    let (new, out) = h.connect(v5_persistent("agent", 300));
    assert_disconnected(&out, old, ReasonCode::SESSION_TAKEN_OVER);
    // Two clients sharing a client id (or a tenant identity) take each other over at every
    // reconnect, and each waits for its acknowledgements meanwhile; the reason string says
    // so, where the bare code looked like a broker that stalls.
    let told = packets(&out, old).into_iter().find_map(|p| match p {
        Packet::Disconnect(d) => d.properties.reason_string.clone(),
        _ => None,
    });
    assert_eq!(told.as_deref(), Some(super::connect::TAKEN_OVER));
    let order: Vec<bool> = out
        .iter()
        .map(|a| matches!(a, Action::Close { .. }))
        .collect();
    assert_eq!(order.iter().filter(|c| **c).count(), 1);
    assert!(matches!(&packets(&out, new)[0], Packet::ConnAck(a) if a.session_present));
    assert!(
        publishes(&out, watcher).is_empty(),
        "session continues: old will not published"
    );
    assert_eq!(h.core.connection_count(), 2);
    assert_eq!(h.core.stats().sessions_taken_over, 1);
    // The subscription moved to the new connection.
    let out = h.send(watcher, pub_packet("t", "x", QoS::AtMostOnce, None));
    assert_eq!(payloads(&out, new), vec!["x"]);
    // A late close report for the old connection changes nothing.
    assert!(h.close(old).is_empty());
    assert_eq!(h.core.connection_count(), 2);
}

#[test]
fn takeover_with_clean_start_publishes_the_old_will() {
    let mut h = Harness::new();
    let watcher = h.subscriber(v5("watcher"), "wills/#", QoS::AtLeastOnce);
    let (old, _, _) = h.connect_ok(with_will(v3("agent", true), "wills/agent", None));
    let (new, out) = h.connect(v5("agent"));
    assert_eq!(
        disconnect_code(&out, old),
        None,
        "v3.1.1 has no DISCONNECT from the server"
    );
    assert!(closed(&out, old));
    assert!(matches!(&packets(&out, new)[0], Packet::ConnAck(a) if !a.session_present));
    assert_eq!(payloads(&out, watcher), vec!["gone"]);
}

// ---------------------------------------------------------------------------------------
// QoS flows

#[test]
fn inbound_qos1_is_acknowledged_with_matching_state() {
    let mut h = Harness::new();
    let (p, _, _) = h.connect_ok(v5("pub"));
    let out = h.send(p, pub_packet("nobody", "x", QoS::AtLeastOnce, Some(7)));
    assert_eq!(
        packets(&out, p),
        vec![Packet::PubAck(Ack {
            code: ReasonCode::NO_MATCHING_SUBSCRIBERS,
            ..Ack::new(7)
        })]
    );
    let (p3, _, _) = h.connect_ok(v3("pub3", true));
    let out = h.send(p3, pub_packet("nobody", "x", QoS::AtLeastOnce, Some(7)));
    assert_eq!(packets(&out, p3), vec![Packet::PubAck(Ack::new(7))]);
    assert_eq!(h.core.stats().publishes_received, 2);
}

#[test]
fn inbound_qos2_is_delivered_once() {
    let mut h = Harness::new();
    let s = h.subscriber(v5("sub"), "t", QoS::ExactlyOnce);
    let (p, _, _) = h.connect_ok(v5("pub"));
    let out = h.send(p, pub_packet("t", "once", QoS::ExactlyOnce, Some(5)));
    assert_eq!(packets(&out, p), vec![Packet::PubRec(Ack::new(5))]);
    assert_eq!(payloads(&out, s), vec!["once"]);
    let mut dup = publish("t", "once", QoS::ExactlyOnce, Some(5));
    dup.dup = true;
    let out = h.send(p, Packet::Publish(dup));
    assert_eq!(packets(&out, p), vec![Packet::PubRec(Ack::new(5))]);
    assert!(
        publishes(&out, s).is_empty(),
        "retransmission not delivered twice"
    );
    let out = h.send(p, Packet::PubRel(Ack::new(5)));
    assert_eq!(packets(&out, p), vec![Packet::PubComp(Ack::new(5))]);
    // After the exchange ends the id is free for a new message.
    let out = h.send(p, pub_packet("t", "again", QoS::ExactlyOnce, Some(5)));
    assert_eq!(payloads(&out, s), vec!["again"]);
    // PUBREL for an unknown id.
    let out = h.send(p, Packet::PubRel(Ack::new(99)));
    assert_eq!(
        packets(&out, p),
        vec![Packet::PubComp(Ack {
            code: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            ..Ack::new(99)
        })]
    );
}

#[test]
fn inbound_receive_maximum_exceeded_disconnects() {
    let mut h = Harness::with_config(CoreConfig {
        receive_maximum: 2,
        ..CoreConfig::default()
    });
    let (p, _, _) = h.connect_ok(v5("pub"));
    h.send(p, pub_packet("t", "1", QoS::ExactlyOnce, Some(1)));
    h.send(p, pub_packet("t", "2", QoS::ExactlyOnce, Some(2)));
    let out = h.send(p, pub_packet("t", "3", QoS::AtLeastOnce, Some(3)));
    assert_disconnected(&out, p, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
}

#[test]
fn outbound_window_follows_client_receive_maximum() {
    let mut h = Harness::new();
    let mut c = v5("sub");
    c.properties.receive_maximum = Some(2);
    let s = h.subscriber(c, "t", QoS::AtLeastOnce);
    let (p, _, _) = h.connect_ok(v5("pub"));
    let mut sent = Vec::new();
    for i in 1..=5u16 {
        let out = h.send(p, pub_packet("t", "m", QoS::AtLeastOnce, Some(i)));
        sent.extend(publishes(&out, s));
    }
    assert_eq!(sent.len(), 2, "window of 2");
    assert_eq!(h.core.inflight_messages(), 2);
    assert_eq!(h.core.queued_messages(), 3);
    let ids: Vec<u16> = sent.iter().filter_map(|p| p.packet_id).collect();
    assert!(ids.iter().all(|id| *id != 0));
    assert_ne!(ids[0], ids[1]);
    let out = h.send(s, Packet::PubAck(Ack::new(ids[0])));
    let next = publishes(&out, s);
    assert_eq!(next.len(), 1, "one ack frees one slot");
    assert!(next[0].packet_id.is_some_and(|id| id != ids[1]));
    // An ack for an unknown id is ignored.
    assert!(h.send(s, Packet::PubAck(Ack::new(999))).is_empty());
}

#[test]
fn config_max_inflight_caps_the_window() {
    let mut h = Harness::with_config(CoreConfig {
        max_inflight: 3,
        ..CoreConfig::default()
    });
    let s = h.subscriber(v3("sub", true), "t", QoS::AtLeastOnce);
    let (p, _, _) = h.connect_ok(v3("pub", true));
    let mut count = 0;
    for i in 1..=10u16 {
        count += publishes(
            &h.send(p, pub_packet("t", "m", QoS::AtLeastOnce, Some(i))),
            s,
        )
        .len();
    }
    assert_eq!(count, 3);
}

#[test]
fn outbound_qos2_full_exchange() {
    let mut h = Harness::new();
    let s = h.subscriber(v5("sub"), "t", QoS::ExactlyOnce);
    let (p, _, _) = h.connect_ok(v5("pub"));
    let out = h.send(p, pub_packet("t", "m", QoS::ExactlyOnce, Some(1)));
    let id = publishes(&out, s)[0].packet_id.expect("QoS 2 has an id");
    let out = h.send(s, Packet::PubRec(Ack::new(id)));
    assert_eq!(packets(&out, s), vec![Packet::PubRel(Ack::new(id))]);
    assert_eq!(h.core.inflight_messages(), 1);
    h.send(s, Packet::PubComp(Ack::new(id)));
    assert_eq!(h.core.inflight_messages(), 0);
    // A PUBREC with an error code ends the exchange without PUBREL.
    let out = h.send(p, pub_packet("t", "m", QoS::ExactlyOnce, Some(2)));
    let id = publishes(&out, s)[0].packet_id.expect("id");
    let refused = Ack {
        code: ReasonCode::UNSPECIFIED_ERROR,
        ..Ack::new(id)
    };
    assert!(packets(&h.send(s, Packet::PubRec(refused)), s).is_empty());
    assert_eq!(h.core.inflight_messages(), 0);
}

#[test]
fn unacknowledged_messages_are_redelivered_on_resume() {
    let mut h = Harness::new();
    let s = h.subscriber(v5_persistent("sub", 300), "q1", QoS::AtLeastOnce);
    h.subscribe(s, "q2", QoS::ExactlyOnce);
    let (p, _, _) = h.connect_ok(v5("pub"));
    let out = h.send(p, pub_packet("q1", "a", QoS::AtLeastOnce, Some(1)));
    let id1 = publishes(&out, s)[0].packet_id.expect("id");
    let out = h.send(p, pub_packet("q2", "b", QoS::ExactlyOnce, Some(2)));
    let id2 = publishes(&out, s)[0].packet_id.expect("id");
    let out = h.send(p, pub_packet("q2", "c", QoS::ExactlyOnce, Some(3)));
    let id3 = publishes(&out, s)[0].packet_id.expect("id");
    h.send(s, Packet::PubRec(Ack::new(id2)));
    h.close(s);
    let (s2, ack, out) = h.connect_ok(v5_persistent("sub", 300));
    assert!(ack.session_present);
    let resent = packets(&out, s2);
    assert_eq!(
        resent.len(),
        4,
        "CONNACK, PUBLISH a, PUBREL b, PUBLISH c: {resent:?}"
    );
    let Packet::Publish(a) = &resent[1] else {
        panic!("expected PUBLISH");
    };
    assert!(a.dup);
    assert_eq!(a.packet_id, Some(id1));
    assert_eq!(resent[2], Packet::PubRel(Ack::new(id2)));
    let Packet::Publish(c) = &resent[3] else {
        panic!("expected PUBLISH");
    };
    assert!(c.dup);
    assert_eq!(c.packet_id, Some(id3));
    assert_eq!(c.qos, QoS::ExactlyOnce);
}

#[test]
fn delivery_qos_is_capped_by_subscription_and_server() {
    let mut h = Harness::with_config(CoreConfig {
        max_qos: QoS::AtLeastOnce,
        ..CoreConfig::default()
    });
    let s0 = h.subscriber(v5("s0"), "t", QoS::AtMostOnce);
    let (s2, _, _) = h.connect_ok(v5("s2"));
    let out = h.subscribe(s2, "t", QoS::ExactlyOnce);
    assert!(
        matches!(&packets(&out, s2)[0], Packet::SubAck(a) if a.codes == vec![ReasonCode::GRANTED_QOS_1])
    );
    let (p, _, _) = h.connect_ok(v5("pub"));
    let out = h.send(p, pub_packet("t", "m", QoS::AtLeastOnce, Some(1)));
    assert_eq!(publishes(&out, s0)[0].qos, QoS::AtMostOnce);
    assert_eq!(publishes(&out, s0)[0].packet_id, None);
    assert_eq!(publishes(&out, s2)[0].qos, QoS::AtLeastOnce);
    let out = h.send(p, pub_packet("t", "m", QoS::AtMostOnce, None));
    assert_eq!(publishes(&out, s2)[0].qos, QoS::AtMostOnce);
    // Publishing above the server's maximum QoS is refused.
    let out = h.send(p, pub_packet("t", "m", QoS::ExactlyOnce, Some(2)));
    assert_eq!(
        disconnect_code(&out, p),
        Some(ReasonCode::QOS_NOT_SUPPORTED)
    );
}

// ---------------------------------------------------------------------------------------
// Retained messages and expiry

fn retained(topic: &str, payload: &'static str, qos: QoS, id: Option<u16>) -> Packet {
    let mut p = publish(topic, payload, qos, id);
    p.retain = true;
    Packet::Publish(p)
}

#[test]
fn retained_messages_are_stored_replaced_and_deleted() {
    let mut h = Harness::new();
    let (p, _, _) = h.connect_ok(v5("pub"));
    h.send(p, retained("status/a", "old", QoS::AtLeastOnce, Some(1)));
    h.send(p, retained("status/a", "new", QoS::AtLeastOnce, Some(2)));
    h.send(p, retained("status/b", "b", QoS::AtMostOnce, None));
    assert_eq!(h.core.retained_count(), 2);
    let (s, _, _) = h.connect_ok(v5("sub"));
    let out = h.subscribe(s, "status/+", QoS::AtLeastOnce);
    assert!(
        matches!(&packets(&out, s)[0], Packet::SubAck(_)),
        "SUBACK before retained"
    );
    let got = publishes(&out, s);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|m| m.retain));
    assert_eq!(String::from_utf8_lossy(&got[0].payload), "new");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert_eq!(got[1].qos, QoS::AtMostOnce, "min of stored and granted QoS");
    // A normal delivery of a retained publish has RETAIN 0 without retain-as-published.
    let out = h.send(p, retained("status/a", "live", QoS::AtMostOnce, None));
    assert!(!publishes(&out, s)[0].retain);
    // An empty retained payload deletes and is still delivered.
    let out = h.send(p, retained("status/a", "", QoS::AtMostOnce, None));
    assert_eq!(publishes(&out, s).len(), 1);
    assert_eq!(h.core.retained_count(), 1);
    let (s2, _, _) = h.connect_ok(v3("sub2", true));
    let out = h.subscribe(s2, "status/a", QoS::AtLeastOnce);
    assert!(publishes(&out, s2).is_empty());
}

#[test]
fn retain_handling_and_retain_as_published() {
    let mut h = Harness::new();
    let (p, _, _) = h.connect_ok(v5("pub"));
    h.send(p, retained("r", "x", QoS::AtMostOnce, None));
    let (s, _, _) = h.connect_ok(v5("sub"));
    let if_new = SubscriptionOptions {
        retain_handling: RetainHandling::SendAtSubscribeIfNew,
        retain_as_published: true,
        ..options(QoS::AtLeastOnce)
    };
    assert_eq!(publishes(&h.send(s, subscribe(1, "r", if_new)), s).len(), 1);
    assert_eq!(
        publishes(&h.send(s, subscribe(2, "r", if_new)), s).len(),
        0,
        "not new"
    );
    let always = SubscriptionOptions {
        retain_handling: RetainHandling::SendAtSubscribe,
        ..if_new
    };
    assert_eq!(publishes(&h.send(s, subscribe(3, "r", always)), s).len(), 1);
    let never = SubscriptionOptions {
        retain_handling: RetainHandling::DoNotSend,
        ..if_new
    };
    let (s2, _, _) = h.connect_ok(v5("sub2"));
    assert_eq!(
        publishes(&h.send(s2, subscribe(1, "r", never)), s2).len(),
        0
    );
    // Retain as published keeps RETAIN 1 on normal deliveries.
    let out = h.send(p, retained("r", "y", QoS::AtMostOnce, None));
    assert!(publishes(&out, s)[0].retain);
    assert!(publishes(&out, s2)[0].retain);
}

#[test]
fn retained_not_stored_when_unavailable() {
    let mut h = Harness::with_config(CoreConfig {
        retain_available: false,
        ..CoreConfig::default()
    });
    let (p, _, _) = h.connect_ok(v5("pub"));
    let out = h.send(p, retained("r", "x", QoS::AtMostOnce, None));
    assert_eq!(
        disconnect_code(&out, p),
        Some(ReasonCode::RETAIN_NOT_SUPPORTED)
    );
    assert_eq!(h.core.retained_count(), 0);
}

fn expiring(topic: &str, payload: &'static str, secs: u32, retain: bool, id: u16) -> Packet {
    let mut p = publish(topic, payload, QoS::AtLeastOnce, Some(id));
    p.retain = retain;
    p.properties.message_expiry_interval = Some(secs);
    Packet::Publish(p)
}

#[test]
fn message_expiry_is_reduced_and_expired_messages_dropped() {
    let mut h = Harness::new();
    let s = h.subscriber(v5_persistent("agent", 3600), "wake", QoS::AtLeastOnce);
    h.close(s);
    let (p, _, _) = h.connect_ok(v5("server"));
    h.send(p, expiring("wake", "short", 5, false, 1));
    h.send(p, expiring("wake", "long", 600, false, 2));
    h.advance(10);
    let (s2, _, out) = h.connect_ok(v5_persistent("agent", 3600));
    let got = publishes(&out, s2);
    assert_eq!(got.len(), 1, "expired wake-up dropped: {got:?}");
    assert_eq!(String::from_utf8_lossy(&got[0].payload), "long");
    assert_eq!(got[0].properties.message_expiry_interval, Some(590));
    assert_eq!(h.core.stats().dropped_expired, 1);
}

#[test]
fn retained_messages_expire() {
    let mut h = Harness::new();
    let (p, _, _) = h.connect_ok(v5("pub"));
    h.send(p, expiring("r/a", "x", 5, true, 1));
    h.advance(3);
    let (s, _, _) = h.connect_ok(v5("s"));
    let got = publishes(&h.subscribe(s, "r/a", QoS::AtLeastOnce), s);
    assert_eq!(got[0].properties.message_expiry_interval, Some(2));
    h.advance(2);
    let (s2, _, _) = h.connect_ok(v5("s2"));
    assert!(publishes(&h.subscribe(s2, "r/#", QoS::AtLeastOnce), s2).is_empty());
    assert_eq!(h.core.retained_count(), 0, "tick purged it");
}

// ---------------------------------------------------------------------------------------
// Wills

fn will_watcher(h: &mut Harness) -> ConnId {
    h.subscriber(v5("watcher"), "wills/#", QoS::AtLeastOnce)
}

#[test]
fn will_is_published_on_connection_loss_only() {
    let mut h = Harness::new();
    let w = will_watcher(&mut h);
    let (a, _, _) = h.connect_ok(with_will(v5("a"), "wills/a", None));
    let out = h.close(a);
    let got = publishes(&out, w);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].topic, "wills/a");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    // Normal DISCONNECT: no will.
    let (b, _, _) = h.connect_ok(with_will(v5("b"), "wills/b", None));
    let out = h.send(b, Packet::Disconnect(Disconnect::default()));
    assert!(closed(&out, b));
    assert!(publishes(&out, w).is_empty());
    // v3.1.1 DISCONNECT: no will.
    let (b3, _, _) = h.connect_ok(with_will(v3("b3", true), "wills/b3", None));
    assert!(publishes(&h.send(b3, Packet::Disconnect(Disconnect::default())), w).is_empty());
    // DISCONNECT 0x04, and a DISCONNECT with an error code (not a normal disconnection):
    // will.
    for (id, code) in [
        ("c", ReasonCode::DISCONNECT_WITH_WILL),
        ("e", ReasonCode::UNSPECIFIED_ERROR),
    ] {
        let (c, _, _) = h.connect_ok(with_will(v5(id), &format!("wills/{id}"), None));
        let disconnect = Disconnect {
            code,
            ..Disconnect::default()
        };
        let out = h.send(c, Packet::Disconnect(disconnect));
        assert_eq!(payloads(&out, w), vec!["gone"], "{code:?}");
    }
    // Protocol error found by the core: will.
    let (d, _, _) = h.connect_ok(with_will(v5("d"), "wills/d", None));
    let out = h.send(d, Packet::PingResp);
    assert_eq!(disconnect_code(&out, d), Some(ReasonCode::PROTOCOL_ERROR));
    assert_eq!(payloads(&out, w), vec!["gone"]);
    assert_eq!(h.core.stats().wills_published, 4);
}

#[test]
fn will_delay_waits_and_is_cancelled_by_reconnect() {
    let mut h = Harness::new();
    let w = will_watcher(&mut h);
    let (a, _, _) = h.connect_ok(with_will(v5_persistent("a", 300), "wills/a", Some(5)));
    assert!(publishes(&h.close(a), w).is_empty());
    assert!(publishes(&h.advance(4), w).is_empty());
    assert_eq!(
        publishes(&h.advance(1), w).len(),
        1,
        "published after the delay"
    );
    // Reconnecting within the delay cancels it.
    let (b, _, _) = h.connect_ok(with_will(v5_persistent("b", 300), "wills/b", Some(5)));
    h.close(b);
    h.advance(2);
    let (_, _, out) = h.connect_ok(v5_persistent("b", 300));
    assert!(publishes(&out, w).is_empty());
    assert!(publishes(&h.advance(10), w).is_empty());
}

#[test]
fn will_is_published_when_session_ends_before_delay() {
    let mut h = Harness::new();
    let w = will_watcher(&mut h);
    let (a, _, _) = h.connect_ok(with_will(v5_persistent("a", 10), "wills/a", Some(100)));
    h.close(a);
    assert!(publishes(&h.advance(9), w).is_empty());
    assert_eq!(publishes(&h.advance(1), w).len(), 1);
    assert_eq!(h.core.session_count(), 1, "only the watcher is left");
    // Session expiry 0 ends at close: the will goes out at once despite the delay.
    let (b, _, _) = h.connect_ok(with_will(v5("b"), "wills/b", Some(100)));
    assert_eq!(publishes(&h.close(b), w).len(), 1);
}

#[test]
fn will_retain_is_stored() {
    let mut h = Harness::new();
    let mut c = with_will(v5("a"), "wills/a", None);
    if let Some(will) = c.will.as_mut() {
        will.retain = true;
    }
    let (a, _, _) = h.connect_ok(c);
    h.close(a);
    assert_eq!(h.core.retained_count(), 1);
    let (s, _, _) = h.connect_ok(v5("late"));
    let got = publishes(&h.subscribe(s, "wills/+", QoS::AtLeastOnce), s);
    assert_eq!(got.len(), 1);
    assert!(got[0].retain);
}

// ---------------------------------------------------------------------------------------
// Subscriptions

#[test]
fn wildcards_and_dollar_topics_route_correctly() {
    let mut h = Harness::new();
    let all = h.subscriber(v5("all"), "#", QoS::AtMostOnce);
    let plus = h.subscriber(v5("plus"), "agents/+/wake", QoS::AtMostOnce);
    let sys = h.subscriber(v5("sys"), "$SYS/#", QoS::AtMostOnce);
    let (p, _, _) = h.connect_ok(v5("pub"));
    let out = h.send(p, pub_packet("agents/7/wake", "w", QoS::AtMostOnce, None));
    assert_eq!(publishes(&out, all).len(), 1);
    assert_eq!(publishes(&out, plus).len(), 1);
    assert!(publishes(&out, sys).is_empty());
    let out = h.send(p, pub_packet("$SYS/load", "l", QoS::AtMostOnce, None));
    assert!(publishes(&out, all).is_empty(), "# does not match $ topics");
    assert_eq!(publishes(&out, sys).len(), 1);
}

#[test]
fn invalid_filters_fail_in_suback() {
    let mut h = Harness::new();
    let (s, _, _) = h.connect_ok(v5("s"));
    let sub = Packet::Subscribe(Subscribe {
        packet_id: 9,
        subscriptions: vec![
            Subscription {
                filter: "a/#/b".into(),
                options: options(QoS::AtLeastOnce),
            },
            Subscription {
                filter: "ok/+".into(),
                options: options(QoS::ExactlyOnce),
            },
        ],
        properties: Properties::default(),
    });
    let out = h.send(s, sub.clone());
    let Packet::SubAck(ack) = &packets(&out, s)[0] else {
        panic!("no SUBACK");
    };
    assert_eq!(ack.packet_id, 9);
    assert_eq!(
        ack.codes,
        vec![ReasonCode::TOPIC_FILTER_INVALID, ReasonCode::GRANTED_QOS_2]
    );
    let (s3, _, _) = h.connect_ok(v3("s3", true));
    let Packet::SubAck(ack) = &packets(&h.send(s3, sub), s3)[0] else {
        panic!("no SUBACK");
    };
    assert_eq!(ack.codes, vec![ReasonCode(0x80), ReasonCode::GRANTED_QOS_2]);
}

#[test]
fn overlapping_subscriptions_give_one_message_with_all_identifiers() {
    let mut h = Harness::new();
    let (s, _, _) = h.connect_ok(v5("s"));
    for (id, filter, qos) in [
        (1, "a/+", QoS::AtMostOnce),
        (2, "a/#", QoS::ExactlyOnce),
        (3, "a/b", QoS::AtLeastOnce),
    ] {
        let mut sub = subscribe(id as u16, filter, options(qos));
        if let Packet::Subscribe(s) = &mut sub {
            s.properties.subscription_identifiers = vec![id];
        }
        h.send(s, sub);
    }
    let (p, _, _) = h.connect_ok(v5("p"));
    let out = h.send(p, pub_packet("a/b", "m", QoS::ExactlyOnce, Some(1)));
    let got = publishes(&out, s);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, QoS::ExactlyOnce);
    let mut ids = got[0].properties.subscription_identifiers.clone();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3]);
    // Re-subscribing replaces the identifier.
    let mut sub = subscribe(9, "a/#", options(QoS::AtMostOnce));
    if let Packet::Subscribe(s) = &mut sub {
        s.properties.subscription_identifiers = vec![20];
    }
    h.send(s, sub);
    let out = h.send(p, pub_packet("a/c", "m", QoS::AtMostOnce, None));
    let mut ids = publishes(&out, s)[0]
        .properties
        .subscription_identifiers
        .clone();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 20], "a/+ (1) and a/# (now 20) match a/c");
}

#[test]
fn shared_subscriptions_deliver_to_one_member_round_robin() {
    let mut h = Harness::new();
    let (m1, _, _) = h.connect_ok(v5("m1"));
    let (m2, _, _) = h.connect_ok(v3("m2", true));
    let (plain, _, _) = h.connect_ok(v5("plain"));
    let (p, _, _) = h.connect_ok(v5("p"));
    h.send(p, retained("jobs/1", "old", QoS::AtMostOnce, None));
    let out = h.subscribe(m1, "$share/workers/jobs/+", QoS::AtLeastOnce);
    assert!(
        publishes(&out, m1).is_empty(),
        "no retained messages for shared subscriptions"
    );
    h.subscribe(m2, "$share/workers/jobs/+", QoS::AtLeastOnce);
    h.subscribe(plain, "jobs/+", QoS::AtMostOnce);
    let mut counts = [0, 0];
    for i in 1..=4u16 {
        let out = h.send(p, pub_packet("jobs/x", "j", QoS::AtLeastOnce, Some(i)));
        counts[0] += publishes(&out, m1).len();
        counts[1] += publishes(&out, m2).len();
        assert_eq!(
            publishes(&out, plain).len(),
            1,
            "normal subscribers get every message"
        );
    }
    assert_eq!(counts, [2, 2]);
    // Offline members are skipped while an online one exists.
    h.close(m2);
    let mut got = 0;
    for i in 5..=8u16 {
        got += publishes(
            &h.send(p, pub_packet("jobs/x", "j", QoS::AtLeastOnce, Some(i))),
            m1,
        )
        .len();
    }
    assert_eq!(got, 4);
    // No Local on a shared subscription is a protocol error.
    let nl = SubscriptionOptions {
        no_local: true,
        ..options(QoS::AtLeastOnce)
    };
    let out = h.send(m1, subscribe(3, "$share/g/x", nl));
    assert_eq!(disconnect_code(&out, m1), Some(ReasonCode::PROTOCOL_ERROR));
}

#[test]
fn no_local_skips_own_messages() {
    let mut h = Harness::new();
    let (a, _, _) = h.connect_ok(v5("a"));
    let nl = SubscriptionOptions {
        no_local: true,
        ..options(QoS::AtMostOnce)
    };
    h.send(a, subscribe(1, "chat", nl));
    let b = h.subscriber(v5("b"), "chat", QoS::AtMostOnce);
    let out = h.send(a, pub_packet("chat", "hi", QoS::AtMostOnce, None));
    assert!(publishes(&out, a).is_empty());
    assert_eq!(publishes(&out, b).len(), 1);
    let out = h.send(b, pub_packet("chat", "yo", QoS::AtMostOnce, None));
    assert_eq!(publishes(&out, a).len(), 1);
}

#[test]
fn properties_pass_through_unchanged() {
    let mut h = Harness::new();
    let s = h.subscriber(v5("s"), "req", QoS::AtMostOnce);
    let (p, _, _) = h.connect_ok(v5("p"));
    let mut m = publish("req", "{}", QoS::AtMostOnce, None);
    m.properties = Properties::from(beckon_mqtt::PropertySet {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("resp/p".into()),
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        ..Default::default()
    });
    let expected = m.properties.clone();
    let got = publishes(&h.send(p, Packet::Publish(m)), s);
    assert_eq!(got[0].properties, expected);
}

#[test]
fn unsubscribe_reports_per_filter() {
    let mut h = Harness::new();
    let s = h.subscriber(v5("s"), "a", QoS::AtMostOnce);
    let out = h.send(
        s,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 4,
            filters: vec!["a".into(), "b".into()],
            properties: Properties::default(),
        }),
    );
    let Packet::UnsubAck(ack) = &packets(&out, s)[0] else {
        panic!("no UNSUBACK");
    };
    assert_eq!(ack.packet_id, 4);
    assert_eq!(
        ack.codes,
        vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
    );
    let (p, _, _) = h.connect_ok(v5("p"));
    assert!(publishes(&h.send(p, pub_packet("a", "x", QoS::AtMostOnce, None)), s).is_empty());
    assert_eq!(h.core.subscription_count(), 0);
    let (s3, _, _) = h.connect_ok(v3("s3", true));
    let out = h.send(
        s3,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 5,
            filters: vec!["a".into()],
            properties: Properties::default(),
        }),
    );
    assert!(matches!(&packets(&out, s3)[0], Packet::UnsubAck(a) if a.codes.is_empty()));
}

// ---------------------------------------------------------------------------------------
// Topic aliases, packet size, shutdown

/// A Subscription Identifier is the server's to send: in a client's PUBLISH it is a protocol
/// error [MQTT-3.3.4-6], and nothing is routed.
#[test]
fn a_client_publish_with_a_subscription_identifier_is_a_protocol_error() {
    let mut h = Harness::new();
    let s = h.subscriber(v5("s"), "t", QoS::AtMostOnce);
    let (p, _, _) = h.connect_ok(v5("p"));
    let mut bad = publish("t", "x", QoS::AtLeastOnce, Some(1));
    bad.properties.subscription_identifiers = vec![7];
    let out = h.send(p, Packet::Publish(bad));
    assert!(publishes(&out, s).is_empty(), "nothing routed: {out:?}");
    assert_disconnected(&out, p, ReasonCode::PROTOCOL_ERROR);
}

#[test]
fn inbound_topic_aliases() {
    let mut h = Harness::with_config(CoreConfig {
        topic_alias_maximum: 2,
        ..CoreConfig::default()
    });
    let s = h.subscriber(v5("s"), "long/topic/name", QoS::AtMostOnce);
    let (p, _, _) = h.connect_ok(v5("p"));
    let mut first = publish("long/topic/name", "1", QoS::AtMostOnce, None);
    first.properties.topic_alias = Some(2);
    let out = h.send(p, Packet::Publish(first));
    let got = publishes(&out, s);
    assert_eq!(got[0].topic, "long/topic/name");
    assert_eq!(got[0].properties.topic_alias, None, "no outbound aliases");
    let mut second = publish("", "2", QoS::AtMostOnce, None);
    second.properties.topic_alias = Some(2);
    let got = publishes(&h.send(p, Packet::Publish(second)), s);
    assert_eq!(got[0].topic, "long/topic/name");
    let mut unknown = publish("", "3", QoS::AtMostOnce, None);
    unknown.properties.topic_alias = Some(1);
    let out = h.send(p, Packet::Publish(unknown));
    assert_eq!(disconnect_code(&out, p), Some(ReasonCode::PROTOCOL_ERROR));
    let (p2, _, _) = h.connect_ok(v5("p2"));
    let mut too_big = publish("x", "4", QoS::AtMostOnce, None);
    too_big.properties.topic_alias = Some(3);
    let out = h.send(p2, Packet::Publish(too_big));
    assert_disconnected(&out, p2, ReasonCode::TOPIC_ALIAS_INVALID);
}

#[test]
fn messages_larger_than_client_maximum_are_dropped() {
    let mut h = Harness::new();
    let mut c = v5("small");
    c.properties.maximum_packet_size = Some(30);
    let s = h.subscriber(c, "t", QoS::AtLeastOnce);
    let (p, _, _) = h.connect_ok(v5("p"));
    let out = h.send(
        p,
        pub_packet(
            "t",
            "this payload is far too long for thirty bytes",
            QoS::AtLeastOnce,
            Some(1),
        ),
    );
    assert!(publishes(&out, s).is_empty());
    assert_eq!(h.core.stats().dropped_too_large, 1);
    assert_eq!(h.core.inflight_messages(), 0, "dropped as if delivered");
    let out = h.send(p, pub_packet("t", "short", QoS::AtLeastOnce, Some(2)));
    assert_eq!(payloads(&out, s), vec!["short"]);
}

#[test]
fn shutdown_disconnects_everyone() {
    let mut h = Harness::new();
    let (a, _, _) = h.connect_ok(v5("a"));
    let (b, _, _) = h.connect_ok(v3("b", true));
    let (c, _, _) = h.connect_ok(v5_persistent("c", 100));
    let mut out = Vec::new();
    h.core.shutdown(h.now, &mut out);
    assert_eq!(
        disconnect_code(&out, a),
        Some(ReasonCode::SERVER_SHUTTING_DOWN)
    );
    assert_eq!(disconnect_code(&out, b), None);
    assert!(closed(&out, a) && closed(&out, b) && closed(&out, c));
    assert_eq!(h.core.connection_count(), 0);
    assert_eq!(h.core.session_count(), 1, "the persistent session stays");
}

#[test]
fn twenty_thousand_agents_each_get_their_own_wake_up() {
    let mut h = Harness::new();
    let agents: Vec<ConnId> = (0..20_000)
        .map(|i| {
            h.subscriber(
                v5_persistent(&format!("agent-{i}"), 3600),
                &format!("agents/agent-{i}/wake"),
                QoS::AtLeastOnce,
            )
        })
        .collect();
    let (server, _, _) = h.connect_ok(v5("console"));
    let started = Instant::now();
    let mut out = Vec::new();
    for i in 0..19_000u32 {
        let topic = format!("agents/agent-{i}/wake");
        let id = (i % 65_535) as u16 + 1;
        h.core.handle_packet(
            h.now,
            server,
            pub_packet(&topic, "wake", QoS::AtLeastOnce, Some(id)),
            &mut out,
        );
    }
    let elapsed = started.elapsed();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!("routed 19,000 QoS 1 wake-ups to 20,000 sessions in {elapsed:?} ({profile} build)");
    let mut per_conn = std::collections::HashMap::new();
    for a in &out {
        if let Action::Send {
            conn,
            packet: Packet::Publish(_),
        } = a
        {
            *per_conn.entry(*conn).or_insert(0) += 1;
        }
    }
    assert_eq!(per_conn.len(), 19_000);
    assert!(per_conn.values().all(|n| *n == 1));
    assert!(agents[..19_000].iter().all(|c| per_conn.contains_key(c)));
    assert!(agents[19_000..].iter().all(|c| !per_conn.contains_key(c)));
}

#[test]
fn idle_session_stays_small() {
    // Queues, alias tables and QoS 2 ids allocate only when used; the will is boxed.
    let size = size_of::<super::session::Session>();
    println!("Session: {size} bytes inline");
    assert!(size <= 512, "Session grew to {size} bytes");
}

#[test]
fn inbound_qos2_state_survives_a_reconnect() {
    let mut h = Harness::new();
    let s = h.subscriber(v5("sub"), "t", QoS::ExactlyOnce);
    let (p, _, _) = h.connect_ok(v5_persistent("pub", 300));
    assert_eq!(
        payloads(
            &h.send(p, pub_packet("t", "x", QoS::ExactlyOnce, Some(5))),
            s
        ),
        vec!["x"]
    );
    h.close(p);
    let (p2, _, _) = h.connect_ok(v5_persistent("pub", 300));
    let mut again = publish("t", "x", QoS::ExactlyOnce, Some(5));
    again.dup = true;
    let out = h.send(p2, Packet::Publish(again));
    assert_eq!(packets(&out, p2), vec![Packet::PubRec(Ack::new(5))]);
    assert!(
        publishes(&out, s).is_empty(),
        "exactly once across the reconnect"
    );
    assert_eq!(
        packets(&h.send(p2, Packet::PubRel(Ack::new(5))), p2),
        vec![Packet::PubComp(Ack::new(5))]
    );
}

#[test]
fn takeover_of_a_session_that_ends_at_close_starts_fresh() {
    let mut h = Harness::new();
    let w = will_watcher(&mut h);
    let old = h.subscriber(
        with_will(v5("agent"), "wills/agent", None),
        "t",
        QoS::AtLeastOnce,
    );
    let (new, out) = h.connect(v5_persistent("agent", 300));
    assert_eq!(
        disconnect_code(&out, old),
        Some(ReasonCode::SESSION_TAKEN_OVER)
    );
    assert!(matches!(&packets(&out, new)[0], Packet::ConnAck(a) if !a.session_present));
    assert_eq!(
        payloads(&out, w),
        vec!["gone"],
        "the old session ended: its will goes out"
    );
    assert_eq!(
        h.core.subscription_count(),
        1,
        "only the watcher's subscription is left"
    );
}

#[test]
fn unacknowledged_message_that_expired_is_not_resent() {
    let mut h = Harness::new();
    let s = h.subscriber(v5_persistent("sub", 300), "t", QoS::AtLeastOnce);
    let (p, _, _) = h.connect_ok(v5("pub"));
    let out = h.send(p, expiring("t", "soon", 5, false, 1));
    assert_eq!(publishes(&out, s).len(), 1);
    h.close(s);
    h.advance(6);
    let (s2, _, out) = h.connect_ok(v5_persistent("sub", 300));
    assert!(publishes(&out, s2).is_empty());
    assert_eq!(h.core.inflight_messages(), 0);
}

#[test]
fn broker_message_is_retained_and_reaches_subscribers_and_later_ones() {
    let mut h = Harness::new();
    let (early, _, _) = h.connect_ok(v5("early"));
    h.send(
        early,
        subscribe(1, "t/acme/agents/+/presence", options(QoS::AtLeastOnce)),
    );
    let mut out = Vec::new();
    let matched = h.core.publish_from_broker(
        h.now,
        "t/acme/agents/pc-1/presence".into(),
        Bytes::from_static(b"{\"state\":\"connected\"}"),
        QoS::AtLeastOnce,
        true,
        &mut out,
    );
    assert!(matched);
    let got = publishes(&out, early);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert_eq!(got[0].topic, "t/acme/agents/pc-1/presence");

    // A later subscriber gets the retained state.
    let (late, _, _) = h.connect_ok(v5("late"));
    let out = h.send(late, subscribe(1, "t/acme/#", options(QoS::AtLeastOnce)));
    assert_eq!(payloads(&out, late), vec!["{\"state\":\"connected\"}"]);
}

// ---- cluster node ----

use super::{ClaimOutcome, ClusterOut, RemoteClaim};

/// A claim from node n9 that does not say when (as from an older node: it wins).
fn claim(client_id: &str, clean_start: bool) -> RemoteClaim<'_> {
    RemoteClaim {
        node: "n9",
        client_id,
        clean_start,
        at_ms: None,
    }
}

fn clustered() -> Harness {
    let mut h = Harness::new();
    h.core.enable_cluster("n1");
    h
}

#[test]
fn a_single_node_hands_nothing_to_a_cluster() {
    let mut h = Harness::new();
    let c = h.subscriber(v5("a"), "x/#", QoS::AtLeastOnce);
    let out = h.send(c, pub_packet("x/y", "m", QoS::AtLeastOnce, Some(3)));
    assert!(
        matches!(packets(&out, c).last(), Some(Packet::PubAck(_))),
        "{out:?}"
    );
    assert!(h.core.take_cluster_out().is_empty());
}

#[test]
fn a_node_tells_the_cluster_its_interest_once_per_filter() {
    let mut h = clustered();
    let (a, _, _) = h.connect_ok(v5("a"));
    let (b, _, _) = h.connect_ok(v5("b"));
    h.subscribe(a, "t/acme/agents/+/wake", QoS::AtLeastOnce);
    h.subscribe(b, "t/acme/agents/+/wake", QoS::AtLeastOnce);
    h.send(
        b,
        subscribe(2, "$share/g/t/acme/#", options(QoS::AtLeastOnce)),
    );
    let out = h.core.take_cluster_out();
    let interest: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            ClusterOut::Interest { filter, added } => Some((filter.clone(), *added)),
            // A shared subscription is a queue group of its own in NATS.
            ClusterOut::SharedInterest { share, added } => Some((share.clone(), *added)),
            _ => None,
        })
        .collect();
    assert_eq!(
        interest,
        [
            ("t/acme/agents/+/wake".to_owned(), true),
            ("$share/g/t/acme/#".to_owned(), true)
        ]
    );
    let claims = out
        .iter()
        .filter(|o| matches!(o, ClusterOut::Claim { client_id, .. } if client_id == "a" || client_id == "b"))
        .count();
    assert_eq!(claims, 2, "each accepted connection claims its client id");
    // The first leaves: interest stays; the last leaves: the filter is withdrawn.
    h.close(a);
    assert!(h.core.take_cluster_out().is_empty());
    h.close(b);
    let out = h.core.take_cluster_out();
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out.iter().all(|o| matches!(
        o,
        ClusterOut::Interest { added: false, .. } | ClusterOut::SharedInterest { added: false, .. }
    )));
}

#[test]
fn a_shared_subscription_gets_what_nats_gives_this_node_for_its_group_only() {
    let mut h = clustered();
    let (p, _, _) = h.connect_ok(v5("publisher"));
    let m1 = h.subscriber(v5("m1"), "$share/g/jobs/+", QoS::AtLeastOnce);
    let m2 = h.subscriber(v5("m2"), "$share/g/jobs/+", QoS::AtLeastOnce);
    // Published here: the group is served by whichever node NATS picks, not here at once.
    let out = h.send(p, pub_packet("jobs/1", "j", QoS::AtMostOnce, None));
    assert!(packets(&out, m1).is_empty() && packets(&out, m2).is_empty());
    // What NATS gives this node for the group goes to one member, round robin.
    let mut got = Vec::new();
    for _ in 0..2 {
        let mut out = Vec::new();
        let msg = publish("jobs/1", "j", QoS::AtLeastOnce, None);
        assert!(
            h.core
                .handle_shared_publish(h.now, "$share/g/jobs/+", msg, &mut out)
        );
        let to: Vec<_> = [m1, m2]
            .into_iter()
            .filter(|&m| !packets(&out, m).is_empty())
            .collect();
        assert_eq!(to.len(), 1, "one member per message");
        got.extend(to);
    }
    got.sort_unstable();
    assert_eq!(got, [m1, m2]);
    // A retained message on another topic (they share one subject) or another group: nothing.
    let mut out = Vec::new();
    let other = publish("other/1", "x", QoS::AtLeastOnce, None);
    assert!(
        !h.core
            .handle_shared_publish(h.now, "$share/g/jobs/+", other, &mut out)
    );
    let msg = publish("jobs/1", "j", QoS::AtLeastOnce, None);
    assert!(
        !h.core
            .handle_shared_publish(h.now, "$share/h/jobs/+", msg, &mut out)
    );
    assert!(out.is_empty());
}

#[test]
fn a_node_acknowledges_a_qos1_publish_only_after_the_cluster_took_it() {
    let mut h = clustered();
    let (p, _, _) = h.connect_ok(v5("publisher"));
    let s = h.subscriber(v5("local"), "agents/+/wake", QoS::AtLeastOnce);
    h.core.take_cluster_out();
    let mut msg = publish("agents/a1/wake", "w", QoS::AtLeastOnce, Some(9));
    msg.properties.message_expiry_interval = Some(600);
    let out = h.send(p, Packet::Publish(msg));
    assert_eq!(payloads(&out, s), ["w"], "local subscribers get it at once");
    assert!(packets(&out, p).is_empty(), "no PUBACK yet: {out:?}");
    let mut cluster = h.core.take_cluster_out();
    let Some(ClusterOut::Publish {
        publish,
        ack: Some((conn, ack)),
    }) = cluster.pop()
    else {
        panic!("expected the message with its held ack: {cluster:?}");
    };
    assert_eq!(publish.topic, "agents/a1/wake");
    assert_eq!(publish.qos, QoS::AtLeastOnce);
    assert_eq!(publish.properties.message_expiry_interval, Some(600));
    assert_eq!(conn, p);
    let mut out = Vec::new();
    h.core.cluster_ack(conn, ack, &mut out);
    assert!(
        matches!(packets(&out, p).as_slice(), [Packet::PubAck(a)] if a.packet_id == 9 && a.code == ReasonCode::SUCCESS)
    );
}

#[test]
fn a_message_from_another_node_reaches_local_subscribers_and_is_not_sent_back() {
    let mut h = clustered();
    let s = h.subscriber(v5("agent"), "t/acme/agents/a1/wake", QoS::AtLeastOnce);
    h.core.take_cluster_out();
    let mut out = Vec::new();
    let mut remote = publish("t/acme/agents/a1/wake", "hello", QoS::AtLeastOnce, Some(1));
    remote.properties.message_expiry_interval = Some(30);
    assert!(h.core.handle_remote_publish(h.now, remote, None, &mut out));
    let got = publishes(&out, s);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, QoS::AtLeastOnce, "QoS 1 kept across nodes");
    assert_eq!(got[0].properties.message_expiry_interval, Some(30));
    assert!(h.core.take_cluster_out().is_empty(), "not forwarded again");
    // Expired by the time it would be resent: the normal expiry applies.
    h.core
        .handle_close(h.now, s, CloseReason::Transport, &mut Vec::new());
}

#[test]
fn the_agent_acknowledging_a_message_from_another_node_sends_its_receipt() {
    let mut h = clustered();
    let a = h.subscriber(
        v5("acme/agent/a1"),
        "t/acme/agents/a1/wake",
        QoS::AtLeastOnce,
    );
    h.core.hold_own_topics(a);
    // A console on this node watching every agent's wake-ups gets it too.
    let w = h.subscriber(
        v5("acme/server/c"),
        "t/acme/agents/+/wake",
        QoS::AtLeastOnce,
    );
    h.core.take_cluster_out();
    let receipt = beckon_cluster::Receipt {
        origin: "n0".into(),
        seq: 42,
    };
    let mut out = Vec::new();
    let remote = publish("t/acme/agents/a1/wake", "w", QoS::AtLeastOnce, Some(1));
    assert!(
        h.core
            .handle_remote_publish(h.now, remote, Some(receipt.clone()), &mut out)
    );
    let (to_agent, to_watcher) = (publishes(&out, a), publishes(&out, w));
    // The watcher's acknowledgement is not the agent's: no receipt.
    h.send(
        w,
        Packet::PubAck(Ack::new(to_watcher[0].packet_id.expect("id"))),
    );
    assert_eq!(h.core.take_cluster_out(), []);
    h.send(
        a,
        Packet::PubAck(Ack::new(to_agent[0].packet_id.expect("id"))),
    );
    assert_eq!(h.core.take_cluster_out(), [ClusterOut::Delivered(receipt)]);
    // A duplicate PUBACK ends nothing and sends nothing.
    h.send(
        a,
        Packet::PubAck(Ack::new(to_agent[0].packet_id.expect("id"))),
    );
    assert_eq!(h.core.take_cluster_out(), []);
}

#[test]
fn a_message_that_follows_an_agent_here_waits_for_its_subscribe() {
    let mut h = clustered();
    let (a, _, _) = h.connect_ok(v5("acme/agent/a1"));
    h.core.hold_own_topics(a);
    h.core.take_cluster_out();
    let receipt = beckon_cluster::Receipt {
        origin: "n0".into(),
        seq: 7,
    };
    // It connected; its wake-up (sent again by its origin) comes before its SUBSCRIBE.
    let mut out = Vec::new();
    let early = publish("t/acme/agents/a1/wake", "w", QoS::AtLeastOnce, Some(1));
    h.core
        .handle_remote_publish(h.now, early, Some(receipt.clone()), &mut out);
    assert!(publishes(&out, a).is_empty());
    // Another agent's message, or one without a receipt, is not kept for it.
    let other = publish("t/acme/agents/a1/wake", "plain", QoS::AtLeastOnce, Some(1));
    h.core.handle_remote_publish(h.now, other, None, &mut out);
    let out = h.subscribe(a, "t/acme/agents/a1/wake", QoS::AtLeastOnce);
    let got = publishes(&out, a);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload, &b"w"[..]);
    assert!(!got[0].retain);
    h.send(a, Packet::PubAck(Ack::new(got[0].packet_id.expect("id"))));
    assert_eq!(h.core.take_cluster_out(), [ClusterOut::Delivered(receipt)]);
    // Delivered once: subscribing again sends nothing more.
    let out = h.subscribe(a, "t/acme/agents/a1/+", QoS::AtLeastOnce);
    assert!(publishes(&out, a).is_empty());
}

#[test]
fn a_claim_from_another_node_takes_the_session_over() {
    let mut h = clustered();
    let old = h.subscriber(
        v5_persistent("acme/agent/a1", 600),
        "t/acme/agents/a1/wake",
        QoS::AtLeastOnce,
    );
    h.core.take_cluster_out();
    let mut out = Vec::new();
    assert_eq!(h.core.connection_of("acme/agent/a1"), Some(old));
    let outcome = h
        .core
        .handle_remote_claim(h.now, claim("acme/agent/a1", false), &mut out);
    assert_eq!(outcome, ClaimOutcome::TakenOver(old));
    assert_disconnected(&out, old, ReasonCode::SESSION_TAKEN_OVER);
    assert_eq!(
        h.core.session_count(),
        0,
        "the session moved to the other node"
    );
    let withdrawn = h.core.take_cluster_out();
    assert!(
        matches!(
            withdrawn.as_slice(),
            [ClusterOut::Interest { added: false, .. }]
        ),
        "{withdrawn:?}"
    );
    // A claim for an id this node does not hold changes nothing.
    assert_eq!(
        h.core
            .handle_remote_claim(h.now, claim("acme/agent/zz", true), &mut out),
        ClaimOutcome::None
    );
}

#[test]
fn of_two_claims_at_the_same_moment_the_later_connection_stays_on_every_node() {
    let mut h = clustered();
    h.core.set_wall_clock(|| 1_000);
    let here = h.subscriber(v5("a"), "x", QoS::AtLeastOnce);
    h.core.take_cluster_out();
    let at = |at_ms, node| RemoteClaim {
        node,
        client_id: "a",
        clean_start: true,
        at_ms: Some(at_ms),
    };
    // n9's connection was accepted earlier (or at the same ms, n0 < n1): this one stays and
    // claims the id again, so that n9 closes its own.
    for (at_ms, node) in [(999, "n9"), (1_000, "n0")] {
        let mut out = Vec::new();
        let outcome = h.core.handle_remote_claim(h.now, at(at_ms, node), &mut out);
        assert_eq!(outcome, ClaimOutcome::Kept(here));
        assert!(!closed(&out, here));
        assert_eq!(
            h.core.take_cluster_out(),
            [ClusterOut::Claim {
                client_id: "a".into(),
                clean_start: true,
                at_ms: 1_000
            }]
        );
    }
    // A later one (or the same ms on a greater node name) takes the session over.
    let mut out = Vec::new();
    let outcome = h.core.handle_remote_claim(h.now, at(1_000, "n2"), &mut out);
    assert_eq!(outcome, ClaimOutcome::TakenOver(here));
    assert_disconnected(&out, here, ReasonCode::SESSION_TAKEN_OVER);
}

#[test]
fn retained_messages_from_other_nodes_are_kept_here() {
    let mut h = clustered();
    let mut out = Vec::new();
    let mut remote = publish(
        "t/acme/agents/a1/presence",
        "{\"state\":\"connected\"}",
        QoS::AtLeastOnce,
        Some(1),
    );
    remote.retain = true;
    h.core.handle_remote_publish(h.now, remote, None, &mut out);
    assert_eq!(
        h.core
            .retained_payload("t/acme/agents/a1/presence", h.now)
            .as_deref(),
        Some(&b"{\"state\":\"connected\"}"[..])
    );
    let (s, _, _) = h.connect_ok(v5("server"));
    let out = h.subscribe(s, "t/acme/agents/+/presence", QoS::AtLeastOnce);
    assert_eq!(payloads(&out, s), ["{\"state\":\"connected\"}"]);
}

/// The cluster output is one change of NATS interest: `filter` added or removed.
#[track_caller]
fn assert_one_interest(out: Vec<ClusterOut>, filter: &str, added: bool) {
    assert!(
        matches!(out.as_slice(), [ClusterOut::Interest { filter: f, added: a }] if f == filter && *a == added),
        "{out:?}"
    );
}

#[test]
fn an_agents_own_topics_cost_no_nats_interest() {
    let mut h = clustered();
    let (a, _, _) = h.connect_ok(v5("acme/agent/a1"));
    h.core.take_cluster_out();
    h.core.hold_own_topics(a);
    // Its own topics reach this node through the node's subject: its exact subscriptions
    // inside them add no NATS interest; a wildcard one, or one outside, does.
    h.subscribe(a, "t/acme/agents/a1/wake", QoS::AtLeastOnce);
    h.subscribe(a, "t/acme/agents/a1/relay", QoS::AtLeastOnce);
    assert_eq!(h.core.take_cluster_out(), []);
    h.subscribe(a, "t/acme/agents/a1/+", QoS::AtLeastOnce);
    assert_one_interest(h.core.take_cluster_out(), "t/acme/agents/a1/+", true);
    h.close(a);
    assert_one_interest(h.core.take_cluster_out(), "t/acme/agents/a1/+", false);
    // A session of another client subscribing to those exact topics needs interest.
    let (b, _, _) = h.connect_ok(v5("acme/server/s1"));
    h.core.take_cluster_out();
    h.subscribe(b, "t/acme/agents/a1/wake", QoS::AtLeastOnce);
    assert_one_interest(h.core.take_cluster_out(), "t/acme/agents/a1/wake", true);
}

#[test]
fn a_connected_tenant_agent_holds_its_own_topics_on_every_connection() {
    let mut h = clustered();
    for port in [50001, 50002] {
        // Connected as the identity (the network layer's path), then a new connection of
        // the same agent: each holds the agent's own topics without NATS interest.
        let (a, _) = connect_identity(&mut h, agent("a1"), port, "8883", &mut Vec::new());
        h.core.take_cluster_out();
        h.subscribe(a, "t/acme/agents/a1/wake", QoS::AtLeastOnce);
        h.subscribe(a, "t/acme/agents/a2/wake", QoS::AtLeastOnce);
        assert_one_interest(h.core.take_cluster_out(), "t/acme/agents/a2/wake", true);
        h.close(a);
        let out = h.core.take_cluster_out();
        assert!(
            !out.iter()
                .any(|o| matches!(o, ClusterOut::Interest { filter, .. } if filter.contains("a1"))),
            "{out:?}"
        );
    }
}

#[test]
fn assigned_client_ids_name_the_node() {
    let mut h = clustered();
    let (_, ack, _) = h.connect_ok(v5(""));
    let id = ack
        .properties
        .assigned_client_identifier
        .clone()
        .expect("assigned");
    assert!(id.starts_with("beckon-auto-n1-"), "{id}");
}

// Presence: the broker's retained events for tenant identities, decided by the core.

/// A watcher of every agent's and server's presence (a console).
fn presence_watcher(h: &mut Harness) -> ConnId {
    let w = h.subscriber(v5("watcher"), "t/+/agents/+/presence", QoS::AtLeastOnce);
    h.subscribe(w, "t/+/servers/+/presence", QoS::AtLeastOnce);
    w
}

fn agent(id: &str) -> Box<beckon_identity::Identity> {
    Box::new(beckon_identity::Identity::parse("acme", "agent", id).expect("identity"))
}

/// Connects tenant identity `identity` from `port` on `path`; returns the connection and
/// what was accepted.
fn connect_identity(
    h: &mut Harness,
    identity: Box<beckon_identity::Identity>,
    port: u16,
    path: &'static str,
    out: &mut Vec<Action>,
) -> (ConnId, super::Accepted) {
    let conn = h.next_conn;
    h.next_conn += 1;
    let connect = v5(&identity.session_key());
    let info = ConnectionInfo {
        remote_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        path,
        server: false,
        identity: Some(identity),
        via_proxy: Some(true),
    };
    let accepted = h.core.handle_connect(h.now, conn, connect, info, out);
    (conn, accepted.expect("accepted"))
}

/// The presence events `conn` received: (topic, event).
fn presence_events(
    actions: &[Action],
    conn: ConnId,
) -> Vec<(String, beckon_identity::PresenceEvent)> {
    publishes(actions, conn)
        .into_iter()
        .filter(|p| p.topic.ends_with("/presence"))
        .map(|p| {
            let event = beckon_identity::PresenceEvent::from_json(&p.payload).expect("json");
            (p.topic, event)
        })
        .collect()
}

fn states(events: &[(String, beckon_identity::PresenceEvent)]) -> Vec<(&str, Option<&str>)> {
    use beckon_identity::PresenceState;
    events
        .iter()
        .map(|(_, e)| {
            let state = match e.state {
                PresenceState::Connected => "connected",
                PresenceState::Disconnected => "disconnected",
            };
            (state, e.reason.as_deref())
        })
        .collect()
}

#[test]
fn connect_tells_what_was_accepted() {
    let mut h = Harness::with_config(CoreConfig {
        max_keep_alive: Some(30),
        max_session_expiry: 100,
        ..CoreConfig::default()
    });
    let mut out = Vec::new();
    let mut connect = v5_persistent("", 600);
    connect.keep_alive = 0;
    let accepted = h
        .core
        .handle_connect(h.now, 1, connect, info_of(false), &mut out)
        .expect("accepted");
    assert_eq!(accepted.keep_alive, Some(Duration::from_secs(30)));
    assert!(accepted.assigned_client_id);
    assert!(!accepted.session_present);
    assert_eq!(accepted.session_expiry, 100);
    let Some(Packet::ConnAck(ack)) = packets(&out, 1).first().cloned() else {
        panic!("no CONNACK: {out:?}");
    };
    assert_eq!(
        accepted.receive_maximum,
        ack.properties.receive_maximum.expect("announced")
    );
    assert_eq!(effective_keep_alive(&v5("x"), &ack), accepted.keep_alive);

    // Back with the id it was given: the session is present; v3.1.1 keeps its keep alive.
    let id = ack
        .properties
        .assigned_client_identifier
        .clone()
        .expect("assigned");
    h.close(1);
    let accepted = h
        .core
        .handle_connect(h.now, 2, v5_persistent(&id, 600), info_of(false), &mut out)
        .expect("accepted");
    assert!(accepted.session_present && !accepted.assigned_client_id);
    let mut old = v3("old", true);
    old.keep_alive = 20;
    let accepted = h
        .core
        .handle_connect(h.now, 3, old, info_of(false), &mut out)
        .expect("accepted");
    assert_eq!(accepted.keep_alive, Some(Duration::from_secs(20)));

    // A refusal says why, and a second CONNECT on one connection is a protocol error.
    let mut auth = v5("x");
    auth.properties.authentication_method = Some("SCRAM".into());
    assert_eq!(
        h.core
            .handle_connect(h.now, 4, auth, info_of(false), &mut out),
        Err(ReasonCode::BAD_AUTHENTICATION_METHOD)
    );
    assert_eq!(
        h.core
            .handle_connect(h.now, 3, v3("old", true), info_of(false), &mut out),
        Err(ReasonCode::PROTOCOL_ERROR)
    );
}

fn info_of(server: bool) -> ConnectionInfo {
    ConnectionInfo {
        remote_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 40000)),
        path: "8883",
        server,
        identity: None,
        via_proxy: None,
    }
}

#[test]
fn presence_of_a_clean_disconnect() {
    let mut h = Harness::new();
    h.core.set_wall_clock(|| 1_700_000_000_123);
    let w = presence_watcher(&mut h);
    let mut out = Vec::new();
    let (a, _) = connect_identity(&mut h, agent("a1"), 50001, "443-websocket", &mut out);
    let events = presence_events(&out, w);
    assert_eq!(states(&events), [("connected", None)]);
    let (topic, event) = &events[0];
    assert_eq!(topic, "t/acme/agents/a1/presence");
    assert_eq!(event.remote_addr, "127.0.0.1:50001");
    assert_eq!(event.path, beckon_identity::ConnectionPath::SharedWebSocket);
    assert_eq!(event.via_proxy, Some(true));
    assert_eq!(event.node, None);
    assert_eq!(event.at, 1_700_000_000_123);

    let out = h.send(a, Packet::Disconnect(Disconnect::default()));
    assert!(closed(&out, a));
    let events = presence_events(&out, w);
    assert_eq!(
        states(&events),
        [("disconnected", Some("client_disconnect"))]
    );
    assert_eq!(events[0].1.remote_addr, "127.0.0.1:50001");
    // A console that connects later reads the current state from the retained event.
    let retained = h
        .core
        .retained_payload("t/acme/agents/a1/presence", h.now)
        .expect("retained");
    let event = beckon_identity::PresenceEvent::from_json(&retained).expect("json");
    assert_eq!(event.reason.as_deref(), Some("client_disconnect"));
}

#[test]
fn presence_of_a_keepalive_timeout_a_lost_connection_and_a_protocol_error() {
    let mut h = Harness::new();
    let w = presence_watcher(&mut h);
    let mut out = Vec::new();
    let (a, _) = connect_identity(&mut h, agent("a1"), 50001, "8883", &mut out);
    let (b, _) = connect_identity(&mut h, agent("b1"), 50002, "8883", &mut out);
    let (c, _) = connect_identity(&mut h, agent("c1"), 50003, "8883", &mut out);
    let mut out = Vec::new();
    h.core
        .handle_close(h.now, a, CloseReason::KeepAliveTimeout, &mut out);
    h.core
        .handle_close(h.now, b, CloseReason::Transport, &mut out);
    // PINGRESP is only sent by a server.
    h.core.handle_packet(h.now, c, Packet::PingResp, &mut out);
    assert!(closed(&out, c));
    assert_eq!(
        states(&presence_events(&out, w)),
        [
            ("disconnected", Some("keepalive_timeout")),
            ("disconnected", Some("connection_lost")),
            ("disconnected", Some("protocol_error")),
        ]
    );
    // Each once: a close of a connection already gone publishes nothing more.
    let mut again = Vec::new();
    h.core
        .handle_close(h.now, a, CloseReason::Transport, &mut again);
    assert!(presence_events(&again, w).is_empty());
}

#[test]
fn presence_disconnected_follows_the_will() {
    let mut h = Harness::new();
    let w = presence_watcher(&mut h);
    h.subscribe(w, "t/acme/agents/a1/status", QoS::AtLeastOnce);
    let conn = h.next_conn;
    h.next_conn += 1;
    let connect = with_will(v5("acme/agent/a1"), "t/acme/agents/a1/status", None);
    let info = ConnectionInfo {
        identity: Some(agent("a1")),
        ..info_of(false)
    };
    let mut out = Vec::new();
    h.core
        .handle_connect(h.now, conn, connect, info, &mut out)
        .expect("accepted");
    let mut out = Vec::new();
    h.core
        .handle_close(h.now, conn, CloseReason::Transport, &mut out);
    let topics: Vec<String> = publishes(&out, w).into_iter().map(|p| p.topic).collect();
    assert_eq!(
        topics,
        ["t/acme/agents/a1/status", "t/acme/agents/a1/presence"],
        "the will first, then the identity is gone"
    );
}

#[test]
fn presence_of_a_takeover() {
    let mut h = Harness::new();
    let w = presence_watcher(&mut h);
    let mut out = Vec::new();
    let (old, _) = connect_identity(&mut h, agent("a1"), 50001, "8883", &mut out);
    let mut out = Vec::new();
    let (new, _) = connect_identity(&mut h, agent("a1"), 50002, "443-mqtt", &mut out);
    assert_eq!(
        disconnect_code(&out, old),
        Some(ReasonCode::SESSION_TAKEN_OVER)
    );
    assert!(closed(&out, old) && !closed(&out, new));
    let events = presence_events(&out, w);
    assert_eq!(
        states(&events),
        [("disconnected", Some("taken_over")), ("connected", None)]
    );
    assert_eq!(events[0].1.remote_addr, "127.0.0.1:50001");
    assert_eq!(events[1].1.remote_addr, "127.0.0.1:50002");
    assert_eq!(
        events[1].1.path,
        beckon_identity::ConnectionPath::SharedMqtt
    );
    // The old connection's own close later changes nothing; the new one still counts.
    let out = h.close(old);
    assert!(presence_events(&out, w).is_empty());
    let out = h.close(new);
    assert_eq!(
        states(&presence_events(&out, w)),
        [("disconnected", Some("connection_lost"))]
    );
}

#[test]
fn presence_at_server_shutdown_reaches_the_watchers_before_their_goodbye() {
    let mut h = Harness::new();
    let w = presence_watcher(&mut h);
    let mut out = Vec::new();
    let (a, _) = connect_identity(&mut h, agent("a1"), 50001, "8883", &mut out);
    let (b, _) = connect_identity(&mut h, agent("b1"), 50002, "8883", &mut out);
    let mut out = Vec::new();
    h.core.shutdown(h.now, &mut out);
    assert_eq!(
        states(&presence_events(&out, w)),
        [
            ("disconnected", Some("server_shutdown")),
            ("disconnected", Some("server_shutdown")),
        ]
    );
    let last_event = out
        .iter()
        .rposition(|x| matches!(x, Action::Send { conn, packet: Packet::Publish(_) } if *conn == w))
        .expect("events");
    let goodbye = out
        .iter()
        .position(
            |x| matches!(x, Action::Send { conn, packet: Packet::Disconnect(_) } if *conn == w),
        )
        .expect("DISCONNECT 0x8B");
    assert!(last_event < goodbye, "{out:?}");
    assert!(closed(&out, a) && closed(&out, b) && closed(&out, w));
}

#[test]
fn presence_of_removed_tenants_and_revoked_credentials() {
    let mut h = Harness::new();
    let w = presence_watcher(&mut h);
    let mut out = Vec::new();
    let (a, _) = connect_identity(&mut h, agent("a1"), 50001, "8883", &mut out);
    let other = Box::new(beckon_identity::Identity::parse("beta", "agent", "b1").expect("id"));
    let (b, _) = connect_identity(&mut h, other, 50002, "8883", &mut out);
    let mut out = Vec::new();
    h.core.revoke(h.now, &[a], &mut out);
    assert!(closed(&out, a) && !closed(&out, b));
    assert_eq!(
        states(&presence_events(&out, w)),
        [("disconnected", Some("revoked"))]
    );
    let mut out = Vec::new();
    h.core.close_tenants(h.now, &["beta".to_owned()], &mut out);
    assert!(closed(&out, b));
    let events = presence_events(&out, w);
    assert_eq!(states(&events), [("disconnected", Some("tenant_removed"))]);
    assert_eq!(events[0].0, "t/beta/agents/b1/presence");
    assert_eq!(h.core.connection_count(), 1, "only the watcher is left");
}

#[test]
fn clustered_presence_names_the_node_and_releases_a_lost_one() {
    let mut h = clustered();
    let w = presence_watcher(&mut h);
    // Another node said a2 was connected there; then a2 arrives here.
    let mut out = Vec::new();
    let mut elsewhere = publish(
        "t/acme/agents/a2/presence",
        "{\"state\":\"connected\",\"at\":1,\"remote_addr\":\"10.0.0.9:1\",\"path\":\"8883\",\"via_proxy\":null,\"node\":\"n2\"}",
        QoS::AtLeastOnce,
        Some(1),
    );
    elsewhere.retain = true;
    h.core
        .handle_remote_publish(h.now, elsewhere, None, &mut out);
    let mut out = Vec::new();
    let (a, _) = connect_identity(&mut h, agent("a2"), 50001, "8883", &mut out);
    let events = presence_events(&out, w);
    assert_eq!(
        states(&events),
        [("disconnected", Some("taken_over")), ("connected", None)]
    );
    assert_eq!(events[0].1.node.as_deref(), Some("n2"));
    assert_eq!(events[1].1.node.as_deref(), Some("n1"));
    // The agent's own topics need no NATS interest: other nodes find this node in their
    // directory (its claim and connected event).
    let sent = h.core.take_cluster_out();
    assert!(
        !sent
            .iter()
            .any(|o| matches!(o, ClusterOut::Interest { filter, .. } if filter.contains("a2"))),
        "{sent:?}"
    );
    assert!(
        sent.iter().any(
            |o| matches!(o, ClusterOut::Claim { client_id, .. } if client_id == "acme/agent/a2")
        ),
        "{sent:?}"
    );
    // After a cut-off, this node says again who is connected here.
    let mut out = Vec::new();
    h.core.republish_presence(h.now, &mut out);
    assert_eq!(states(&presence_events(&out, w)), [("connected", None)]);
    // A node that went silent: what it held is released here, what this node holds stays.
    let mut out = Vec::new();
    let mut on_n3 = publish(
        "t/acme/servers/s3/presence",
        "{\"state\":\"connected\",\"at\":1,\"remote_addr\":\"10.0.0.9:1\",\"path\":\"8883\",\"via_proxy\":null,\"node\":\"n3\"}",
        QoS::AtLeastOnce,
        Some(1),
    );
    on_n3.retain = true;
    h.core.handle_remote_publish(h.now, on_n3, None, &mut out);
    let mut out = Vec::new();
    assert_eq!(h.core.handle_node_lost(h.now, "n3", &mut out), 1);
    let events = presence_events(&out, w);
    assert_eq!(states(&events), [("disconnected", Some("node_lost"))]);
    assert_eq!(events[0].0, "t/acme/servers/s3/presence");
    // A claim from another node ends the connection here without an event from this node.
    let mut out = Vec::new();
    h.core
        .handle_remote_claim(h.now, claim("acme/agent/a2", false), &mut out);
    assert!(closed(&out, a));
    assert!(presence_events(&out, w).is_empty());
}
