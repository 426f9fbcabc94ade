//! Topic namespace and access rules, as a broker would apply them.

use beckon_identity::acl::{
    ConnectionPath, PresenceEvent, PresenceState, anonymous_to_external, anonymous_to_internal,
    presence_topic, tenant_of, to_external, to_internal, wake_topic,
};
use beckon_identity::{Access, AclDenied, Identity};
use proptest::prelude::*;

fn agent(tenant: &str, id: &str) -> Identity {
    Identity::parse(tenant, "agent", id).unwrap()
}

fn server(tenant: &str, id: &str) -> Identity {
    Identity::parse(tenant, "server", id).unwrap()
}

fn allowed(identity: &Identity, access: Access, topic: &str) -> bool {
    to_internal(identity, access, topic).is_ok()
}

#[test]
fn an_agent_receives_only_its_own_wake_ups_and_relay_requests() {
    let a = agent("acme", "pc-1");
    assert_eq!(
        to_internal(&a, Access::Subscribe, "agents/pc-1/wake").unwrap(),
        "t/acme/agents/pc-1/wake"
    );
    assert!(allowed(&a, Access::Subscribe, "agents/pc-1/relay"));
    for denied in [
        "agents/pc-2/wake",
        "agents/+/wake",
        "agents/pc-1/#",
        "agents/pc-1/+",
        "agents/pc-1/ack",
        "agents/pc-1/presence",
        "#",
        "agents/pc-1/wake/x",
        "t/acme/agents/pc-1/wake",
    ] {
        let err = to_internal(&a, Access::Subscribe, denied).unwrap_err();
        assert!(
            matches!(err, AclDenied::NotPermitted { .. }),
            "{denied}: {err}"
        );
        assert_eq!(err.reason_code(), 0x87);
        assert_eq!(err.suback_code_v3(), 0x80);
    }
}

#[test]
fn an_agent_publishes_only_its_own_acks_and_relay_results() {
    let a = agent("acme", "pc-1");
    assert_eq!(
        to_internal(&a, Access::Publish, "agents/pc-1/ack").unwrap(),
        "t/acme/agents/pc-1/ack"
    );
    assert!(allowed(&a, Access::Publish, "agents/pc-1/relay-result"));
    for denied in [
        "agents/pc-2/ack",
        "agents/pc-1/wake",
        "agents/pc-2/wake",
        "agents/pc-1/presence",
        "agents/pc-1/relay",
        "anything",
    ] {
        let err = to_internal(&a, Access::Publish, denied).unwrap_err();
        assert_eq!(err.reason_code(), 0x87, "{denied}");
    }
}

#[test]
fn a_server_wakes_any_agent_of_its_tenant_and_reads_everything_in_it() {
    let s = server("acme", "console");
    assert_eq!(
        to_internal(&s, Access::Publish, &wake_topic("pc-9")).unwrap(),
        "t/acme/agents/pc-9/wake"
    );
    assert!(allowed(&s, Access::Publish, "agents/pc-9/relay"));
    for denied in [
        "agents/pc-9/ack",
        "agents/pc-9/presence",
        "servers/console/presence",
        "agents/pc-9",
        "agents/a/b/wake",
        "other",
    ] {
        let err = to_internal(&s, Access::Publish, denied).unwrap_err();
        assert_eq!(err.reason_code(), 0x87, "{denied}");
    }
    for (filter, internal) in [
        ("#", "t/acme/#"),
        ("agents/+/ack", "t/acme/agents/+/ack"),
        ("agents/+/presence", "t/acme/agents/+/presence"),
        ("agents/#", "t/acme/agents/#"),
        ("+/+/+", "t/acme/+/+/+"),
        (
            "$share/workers/agents/+/ack",
            "$share/workers/t/acme/agents/+/ack",
        ),
    ] {
        assert_eq!(
            to_internal(&s, Access::Subscribe, filter).unwrap(),
            internal
        );
    }
}

#[test]
fn presence_is_written_by_the_broker_only() {
    for who in [agent("acme", "pc-1"), server("acme", "console")] {
        for topic in ["agents/pc-1/presence", "servers/console/presence"] {
            let err = to_internal(&who, Access::Publish, topic).unwrap_err();
            assert!(err.to_string().contains("broker only"), "{err}");
        }
    }
    let a = agent("acme", "pc-1");
    assert_eq!(presence_topic(&a), "t/acme/agents/pc-1/presence");
    assert_eq!(
        presence_topic(&server("acme", "console")),
        "t/acme/servers/console/presence"
    );
    // A server of the tenant sees it, relative, through its subscription.
    let s = server("acme", "console");
    assert_eq!(
        to_external(&s, &presence_topic(&a)).as_deref(),
        Some("agents/pc-1/presence")
    );
    assert_eq!(
        to_external(&server("globex", "console"), &presence_topic(&a)),
        None
    );
}

#[test]
fn malformed_topics_get_the_malformed_reason_codes() {
    let s = server("acme", "console");
    for (access, topic, code) in [
        (Access::Publish, "", 0x90),
        (Access::Publish, "agents/+/wake", 0x90),
        (Access::Publish, "agents/#", 0x90),
        (Access::Publish, "agents/a\0/wake", 0x90),
        (Access::Publish, "$SYS/x", 0x90),
        (Access::Subscribe, "", 0x8F),
        (Access::Subscribe, "agents/#/wake", 0x8F),
        (Access::Subscribe, "agents/a+/wake", 0x8F),
        (Access::Subscribe, "agents/x#", 0x8F),
        (Access::Subscribe, "$SYS/#", 0x8F),
        (Access::Subscribe, "$share/g", 0x8F),
        (Access::Subscribe, "$share//#", 0x8F),
        (Access::Subscribe, "$share/g+/#", 0x8F),
        (Access::Subscribe, "$share/g/", 0x8F),
        (Access::Subscribe, "$share/g/$SYS/#", 0x8F),
    ] {
        let err = to_internal(&s, access, topic).unwrap_err();
        assert!(
            matches!(err, AclDenied::Malformed { .. }),
            "{topic:?}: {err}"
        );
        assert_eq!(err.reason_code(), code, "{topic:?}");
    }
    let too_long = format!("agents/{}", "x/".repeat(32_765));
    let err = to_internal(&s, Access::Subscribe, &too_long).unwrap_err();
    assert!(err.to_string().contains("too long"), "{err}");
}

#[test]
fn shared_subscriptions_are_checked_on_the_inner_filter() {
    let a = agent("acme", "pc-1");
    assert_eq!(
        to_internal(&a, Access::Subscribe, "$share/g/agents/pc-1/wake").unwrap(),
        "$share/g/t/acme/agents/pc-1/wake"
    );
    assert!(!allowed(&a, Access::Subscribe, "$share/g/agents/pc-2/wake"));
    assert!(!allowed(&a, Access::Subscribe, "$share/g/#"));
}

#[test]
fn external_topics_round_trip_and_never_cross_tenants() {
    let s = server("acme", "console");
    assert_eq!(
        to_external(&s, "t/acme/agents/x/ack").as_deref(),
        Some("agents/x/ack")
    );
    for foreign in [
        "t/globex/agents/x/ack",
        "t/acme-eu/agents/x/ack",
        "t/acm/agents/x/ack",
        "t/acme",
        "t/acme/",
        "acme/agents/x/ack",
        "$SYS/broker/uptime",
    ] {
        assert_eq!(to_external(&s, foreign), None, "{foreign}");
    }
    assert_eq!(tenant_of("t/acme/agents/x/ack"), Some("acme"));
    assert_eq!(tenant_of("$SYS/x"), None);
}

#[test]
fn anonymous_clients_may_use_any_topic_in_their_own_namespace() {
    assert_eq!(
        anonymous_to_internal(Access::Subscribe, "#").unwrap(),
        "anon/#"
    );
    assert_eq!(
        anonymous_to_internal(Access::Publish, "test/topic").unwrap(),
        "anon/test/topic"
    );
    assert_eq!(
        anonymous_to_internal(Access::Subscribe, "$share/g/test/+").unwrap(),
        "$share/g/anon/test/+"
    );
    assert_eq!(anonymous_to_external("anon/test/topic"), Some("test/topic"));
    assert_eq!(anonymous_to_external("t/acme/agents/x/wake"), None);
    for (access, bad) in [
        (Access::Publish, "a/+"),
        (Access::Subscribe, "a/#/b"),
        (Access::Subscribe, "$share/g"),
        (Access::Publish, ""),
    ] {
        assert!(anonymous_to_internal(access, bad).is_err(), "{bad}");
    }
}

#[test]
fn presence_events_serialize_to_the_documented_json() {
    let event = PresenceEvent {
        state: PresenceState::Disconnected,
        at: 1_790_000_000_123,
        reason: Some("keepalive_timeout".into()),
        remote_addr: "203.0.113.5:50122".into(),
        path: ConnectionPath::SharedWebSocket,
        via_proxy: None,
        node: Some("node-2".into()),
    };
    let json = String::from_utf8(event.to_json()).unwrap();
    assert_eq!(
        json,
        r#"{"state":"disconnected","at":1790000000123,"reason":"keepalive_timeout","remote_addr":"203.0.113.5:50122","path":"443-websocket","via_proxy":null,"node":"node-2"}"#
    );
    assert_eq!(PresenceEvent::from_json(json.as_bytes()).unwrap(), event);
    let connected = PresenceEvent {
        state: PresenceState::Connected,
        at: 1,
        reason: None,
        remote_addr: "[::1]:1".into(),
        path: ConnectionPath::Mqtts,
        via_proxy: Some(true),
        node: None,
    };
    assert_eq!(
        String::from_utf8(connected.to_json()).unwrap(),
        r#"{"state":"connected","at":1,"remote_addr":"[::1]:1","path":"8883","via_proxy":true}"#
    );
    assert!(PresenceEvent::from_json(b"{").is_err());
}

// --- isolation property -------------------------------------------------------------------

/// A plain MQTT matcher (filter against topic name), written independently of the broker.
fn matches(filter: &str, topic: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((_, inner)) => inner,
            None => return false,
        },
        None => filter,
    };
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    let mut i = 0;
    loop {
        match (f.get(i), t.get(i)) {
            (Some(&"#"), _) => return true,
            (Some(&"+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
        i += 1;
    }
}

#[test]
fn the_reference_matcher_is_right() {
    assert!(matches("#", "a/b"));
    assert!(matches("a/#", "a"));
    assert!(matches("a/+/c", "a/b/c"));
    assert!(matches("+/+", "/x"));
    assert!(!matches("a/+", "a/b/c"));
    assert!(!matches("#", "$SYS/x"));
    assert!(matches("$share/g/a/#", "a/b"));
}

fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("+".to_owned()),
        Just("#".to_owned()),
        Just("t".to_owned()),
        Just("acme".to_owned()),
        Just("globex".to_owned()),
        Just("agents".to_owned()),
        Just("wake".to_owned()),
        Just("".to_owned()),
        Just("$share".to_owned()),
        "[a-z+#/]{1,4}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(level(), 1..7).prop_map(|levels| levels.join("/"))
}

/// Mostly well-formed agent topics (which servers and agents may publish), sometimes noise.
fn topic_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => ("[a-z0-9]{1,3}", prop_oneof![Just("wake"), Just("relay"), Just("ack"), Just("relay-result")])
            .prop_map(|(id, kind)| format!("agents/{id}/{kind}")),
        1 => text(),
    ]
}

fn any_identity(tenant: &'static str) -> impl Strategy<Value = Identity> {
    (prop_oneof![Just("agent"), Just("server")], "[a-z0-9]{1,3}")
        .prop_map(move |(role, id)| Identity::parse(tenant, role, &id).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Whatever tenant A subscribes to, it never matches a topic tenant B can publish or the
    /// broker publishes for B; and B's topics never map back into A.
    #[test]
    fn no_filter_of_one_tenant_matches_a_topic_of_another(
        a in any_identity("acme"),
        b in any_identity("globex"),
        filter in text(),
        topic in topic_text(),
    ) {
        if let Ok(internal_filter) = to_internal(&a, Access::Subscribe, &filter) {
            if let Ok(internal_topic) = to_internal(&b, Access::Publish, &topic) {
                prop_assert!(!matches(&internal_filter, &internal_topic),
                    "{internal_filter} matches {internal_topic}");
                prop_assert_eq!(to_external(&a, &internal_topic), None);
            }
            prop_assert!(!matches(&internal_filter, &presence_topic(&b)));
            // Any topic B could possibly own, wildcard-free, with an arbitrary suffix.
            let raw = format!("t/globex/{}", topic.replace(['+', '#'], "x"));
            prop_assert!(!matches(&internal_filter, &raw), "{internal_filter} matches {raw}");
        }
    }

    /// Anonymous development clients live beside the tenants, never inside one.
    #[test]
    fn anonymous_clients_never_reach_a_tenant(
        b in any_identity("globex"),
        filter in text(),
        topic in topic_text(),
    ) {
        if let Ok(internal_filter) = anonymous_to_internal(Access::Subscribe, &filter) {
            if let Ok(internal_topic) = to_internal(&b, Access::Publish, &topic) {
                prop_assert!(!matches(&internal_filter, &internal_topic));
                prop_assert_eq!(anonymous_to_external(&internal_topic), None);
            }
            prop_assert!(!matches(&internal_filter, &presence_topic(&b)));
        }
        if let Ok(internal_topic) = anonymous_to_internal(Access::Publish, &topic) {
            prop_assert_eq!(anonymous_to_external(&internal_topic), Some(topic.as_str()));
            prop_assert_eq!(to_external(&b, &internal_topic), None);
        }
    }

    /// Mapping is reversible for the client's own tenant.
    #[test]
    fn published_topics_map_back_to_what_the_client_sent(
        a in any_identity("acme"),
        topic in topic_text(),
    ) {
        if let Ok(internal) = to_internal(&a, Access::Publish, &topic) {
            prop_assert_eq!(to_external(&a, &internal), Some(topic));
        }
    }
}
