//! The quotas of one client and one tenant: topic filters per session, retained messages and
//! bytes per tenant.

use super::*;
use crate::core::Quota;

fn reached(h: &Harness, quota: Quota) -> u64 {
    let index = Quota::ALL.iter().position(|q| *q == quota).expect("listed");
    h.core.stats().quotas_reached[index]
}

fn suback_codes(out: &[Action], conn: ConnId) -> Vec<ReasonCode> {
    packets(out, conn)
        .into_iter()
        .find_map(|p| match p {
            Packet::SubAck(s) => Some(s.codes),
            _ => None,
        })
        .expect("a SUBACK")
}

fn subscribe_many(packet_id: u16, filters: &[&str]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        subscriptions: filters
            .iter()
            .map(|f| Subscription {
                filter: (*f).into(),
                options: options(QoS::AtLeastOnce),
            })
            .collect(),
        properties: Properties::default(),
    })
}

#[test]
fn filters_beyond_the_subscription_quota_are_refused_one_by_one() {
    let mut h = Harness::with_config(CoreConfig {
        max_subscriptions: 3,
        ..CoreConfig::default()
    });
    let (c, _, _) = h.connect_ok(v5("many"));
    let out = h.send(c, subscribe_many(1, &["a", "b", "c", "d", "e"]));
    let granted = ReasonCode(QoS::AtLeastOnce as u8);
    let quota = ReasonCode::QUOTA_EXCEEDED;
    assert_eq!(
        suback_codes(&out, c),
        [granted, granted, granted, quota, quota]
    );
    assert!(!closed(&out, c), "the client stays connected");
    assert_eq!(h.core.subscription_count(), 3);
    assert_eq!(
        reached(&h, Quota::Subscriptions),
        1,
        "one count per SUBSCRIBE"
    );

    // Subscribing again to a filter it holds replaces it and is not a new one.
    let out = h.send(c, subscribe_many(2, &["a"]));
    assert_eq!(suback_codes(&out, c), [granted]);
    // A refused filter receives nothing.
    let (p, _, _) = h.connect_ok(v5("pub"));
    assert!(publishes(&h.send(p, pub_packet("d", "x", QoS::AtMostOnce, None)), c).is_empty());
    // Unsubscribing makes room.
    h.send(
        c,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 3,
            filters: vec!["b".into()],
            properties: Properties::default(),
        }),
    );
    assert_eq!(
        suback_codes(&h.send(c, subscribe_many(4, &["d"])), c),
        [granted]
    );

    // MQTT 3.1.1 has no quota code: 0x80, failure.
    let (v3c, _, _) = h.connect_ok(v3("old", true));
    let out = h.send(v3c, subscribe_many(1, &["a", "b", "c", "d"]));
    assert_eq!(suback_codes(&out, v3c)[3], ReasonCode::UNSPECIFIED_ERROR);
}

#[test]
fn a_retained_publish_over_the_tenant_quota_is_refused_and_nothing_else_is() {
    let mut h = Harness::with_config(CoreConfig {
        max_retained_messages: 2,
        tenant_namespaces: true,
        ..CoreConfig::default()
    });
    let (s, _, _) = h.connect_ok(v5("sub"));
    h.subscribe(s, "t/acme/#", QoS::AtLeastOnce);
    let (p, _, _) = h.connect_ok(v5("pub"));
    h.send(p, retained("t/acme/a", "1", QoS::AtLeastOnce, Some(1)));
    h.send(p, retained("t/acme/b", "2", QoS::AtLeastOnce, Some(2)));

    // The third topic of the tenant: PUBACK 0x97, not stored, not delivered.
    let out = h.send(p, retained("t/acme/c", "3", QoS::AtLeastOnce, Some(3)));
    let Some(Packet::PubAck(ack)) = packets(&out, p).first().cloned() else {
        panic!("no PUBACK: {out:?}");
    };
    assert_eq!((ack.packet_id, ack.code), (3, ReasonCode::QUOTA_EXCEEDED));
    assert!(publishes(&out, s).is_empty());
    assert!(!closed(&out, p));
    // QoS 2: PUBREC 0x97, and the packet id is free again.
    let out = h.send(p, retained("t/acme/c", "3", QoS::ExactlyOnce, Some(4)));
    assert!(
        matches!(packets(&out, p).first(), Some(Packet::PubRec(a)) if a.code == ReasonCode::QUOTA_EXCEEDED),
        "{out:?}"
    );
    assert_eq!(h.core.retained_count(), 2);
    assert_eq!(reached(&h, Quota::RetainedMessages), 2);

    // Replacing a stored topic, a publish that is not retained, deleting, and another
    // tenant's namespace are all fine.
    h.send(p, retained("t/acme/a", "1b", QoS::AtLeastOnce, Some(5)));
    let out = h.send(p, pub_packet("t/acme/c", "live", QoS::AtLeastOnce, Some(6)));
    assert_eq!(payloads(&out, s), ["live"]);
    h.send(p, retained("t/other/a", "x", QoS::AtLeastOnce, Some(7)));
    assert_eq!(h.core.retained_count(), 3);
    h.send(p, retained("t/acme/b", "", QoS::AtLeastOnce, Some(8)));
    let out = h.send(p, retained("t/acme/c", "3", QoS::AtLeastOnce, Some(9)));
    assert!(matches!(packets(&out, p).first(), Some(Packet::PubAck(a)) if !a.code.is_error()));

    // A QoS 0 publish and an MQTT 3.1.1 client cannot be told: the connection ends.
    let out = h.send(p, retained("t/acme/d", "4", QoS::AtMostOnce, None));
    assert_disconnected(&out, p, ReasonCode::QUOTA_EXCEEDED);
    let (old, _, _) = h.connect_ok(v3("old", true));
    let out = h.send(old, retained("t/acme/d", "4", QoS::AtLeastOnce, Some(1)));
    assert!(closed(&out, old) && disconnect_code(&out, old).is_none());
}

#[test]
fn retained_bytes_count_topic_and_payload_and_are_freed_on_expiry() {
    let mut h = Harness::with_config(CoreConfig {
        max_retained_bytes: 20,
        ..CoreConfig::default()
    });
    let (p, _, _) = h.connect_ok(v5("pub"));
    // 1 + 9 bytes, twice: 20.
    h.send(p, retained("a", "123456789", QoS::AtLeastOnce, Some(1)));
    h.send(p, expiring("b", "123456789", 5, true, 2));
    let out = h.send(p, retained("c", "1", QoS::AtLeastOnce, Some(3)));
    assert!(
        matches!(packets(&out, p).first(), Some(Packet::PubAck(a)) if a.code == ReasonCode::QUOTA_EXCEEDED)
    );
    assert_eq!(reached(&h, Quota::RetainedBytes), 1);
    // A smaller message on a stored topic fits in what the old one frees.
    let out = h.send(p, retained("a", "1", QoS::AtLeastOnce, Some(4)));
    assert!(matches!(packets(&out, p).first(), Some(Packet::PubAck(a)) if !a.code.is_error()));
    // Without tenants every topic shares the quota; an expired message gives its bytes back.
    h.advance(6);
    let out = h.send(p, retained("t/x/c", "12345678", QoS::AtLeastOnce, Some(5)));
    assert!(matches!(packets(&out, p).first(), Some(Packet::PubAck(a)) if !a.code.is_error()));
}

#[test]
fn the_brokers_own_retained_presence_is_beside_the_quota() {
    let mut h = Harness::with_config(CoreConfig {
        max_retained_messages: 1,
        tenant_namespaces: true,
        ..CoreConfig::default()
    });
    // One retained presence event per identity, however many agents a tenant has.
    for agent in ["a", "b", "c"] {
        let mut out = Vec::new();
        let topic = format!("t/acme/agents/{agent}/presence");
        let payload = Bytes::from_static(b"{}");
        h.core
            .publish_from_broker(h.now, topic, payload, QoS::AtLeastOnce, true, &mut out);
    }
    assert_eq!(h.core.retained_count(), 3);
    // They take nothing from what the tenant's clients may retain.
    let (p, _, _) = h.connect_ok(v5("pub"));
    let out = h.send(
        p,
        retained("t/acme/status", "up", QoS::AtLeastOnce, Some(1)),
    );
    assert!(
        matches!(packets(&out, p).first(), Some(Packet::PubAck(a)) if !a.code.is_error()),
        "{out:?}"
    );
    assert_eq!(h.core.retained_count(), 4);
    assert_eq!(reached(&h, Quota::RetainedMessages), 0);
}

#[test]
fn an_unsubscribe_of_many_filters_removes_those_held_once() {
    let mut h = Harness::new();
    let (c, _, _) = h.connect_ok(v5("many"));
    h.send(c, subscribe_many(1, &["a", "$share/g/b", "c/#"]));
    let mut filters: Vec<String> = (0..10_000).map(|i| format!("x/{i}")).collect();
    filters.extend(["a", "$share/g/b", "a", "c/+"].map(String::from));
    let out = h.send(
        c,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            filters,
            properties: Properties::default(),
        }),
    );
    let Some(Packet::UnsubAck(ack)) = packets(&out, c).first().cloned() else {
        panic!("no UNSUBACK: {out:?}");
    };
    let gone = ReasonCode::NO_SUBSCRIPTION_EXISTED;
    assert!(ack.codes[..10_000].iter().all(|c| *c == gone));
    assert_eq!(
        ack.codes[10_000..],
        [ReasonCode::SUCCESS, ReasonCode::SUCCESS, gone, gone]
    );
    assert_eq!(h.core.subscription_count(), 1, "c/# stays");
    // The filters removed are free again under the quota, and deliver nothing meanwhile.
    let (p, _, _) = h.connect_ok(v5("pub"));
    assert!(publishes(&h.send(p, pub_packet("a", "x", QoS::AtMostOnce, None)), c).is_empty());
    assert_eq!(
        payloads(&h.send(p, pub_packet("c/d", "y", QoS::AtMostOnce, None)), c),
        ["y"]
    );
}

#[test]
fn a_wildcard_finds_retained_messages_by_its_literal_prefix_and_the_parent_level() {
    let mut h = Harness::new();
    let (p, _, _) = h.connect_ok(v5("pub"));
    for (i, topic) in ["a", "a/b", "ab", "t/acme/x", "t/acmex/y", "a/b/c"]
        .into_iter()
        .enumerate()
    {
        h.send(p, retained(topic, "r", QoS::AtMostOnce, None));
        assert_eq!(h.core.retained_count(), i + 1);
    }
    let (s, _, _) = h.connect_ok(v5("sub"));
    let topics = |out: Vec<Action>| -> Vec<String> {
        publishes(&out, s).into_iter().map(|p| p.topic).collect()
    };
    assert_eq!(
        topics(h.subscribe(s, "a/#", QoS::AtMostOnce)),
        ["a", "a/b", "a/b/c"]
    );
    assert_eq!(
        topics(h.subscribe(s, "t/acme/#", QoS::AtMostOnce)),
        ["t/acme/x"]
    );
    assert_eq!(topics(h.subscribe(s, "a/+/c", QoS::AtMostOnce)), ["a/b/c"]);
    assert_eq!(topics(h.subscribe(s, "+", QoS::AtMostOnce)), ["a", "ab"]);
}
