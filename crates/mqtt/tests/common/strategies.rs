//! proptest strategies for valid packets of either version: everything the decoder accepts,
//! and only that (properties limited to what each packet may carry, values in range).

use beckon_mqtt::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck,
    Unsubscribe, Will,
};
use bytes::Bytes;
use proptest::collection::vec;
use proptest::option::of as opt;
use proptest::prelude::*;

/// A UTF-8 string without control characters (so without U+0000).
pub fn text() -> impl Strategy<Value = String> {
    "\\PC{0,8}"
}

/// A topic name: non-empty, no wildcards, some non-ASCII.
pub fn topic() -> impl Strategy<Value = String> {
    "[a-z0-9/é€ ]{1,12}"
}

/// A topic filter (the codec does not judge filters; the broker does).
pub fn filter() -> impl Strategy<Value = String> {
    "[a-z/+#$]{1,12}"
}

pub fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..12).prop_map(Bytes::from)
}

pub fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn flag() -> impl Strategy<Value = Option<u8>> {
    opt(0u8..=1)
}

/// Every property, each present or not, with a valid value.
pub fn any_properties() -> impl Strategy<Value = Properties> {
    let a = (
        flag(),
        opt(any::<u32>()),
        opt(text()),
        opt(topic()),
        opt(binary()),
        vec(1u32..=268_435_455, 0..3),
        opt(any::<u32>()),
        opt(text()),
        opt(any::<u16>()),
        opt(text()),
        opt(binary()),
        flag(),
    );
    let b = (
        opt(any::<u32>()),
        flag(),
        opt(text()),
        opt(text()),
        opt(text()),
        opt(1u16..),
        opt(any::<u16>()),
        opt(1u16..),
        flag(),
        flag(),
        vec((text(), text()), 0..3),
        opt(1u32..),
    );
    let c = (flag(), flag(), flag());
    (a, b, c).prop_map(|(a, b, c)| {
        Properties::from(beckon_mqtt::PropertySet {
            payload_format_indicator: a.0,
            message_expiry_interval: a.1,
            content_type: a.2,
            response_topic: a.3,
            correlation_data: a.4,
            subscription_identifiers: a.5,
            session_expiry_interval: a.6,
            assigned_client_identifier: a.7,
            server_keep_alive: a.8,
            authentication_method: a.9,
            authentication_data: a.10,
            request_problem_information: a.11,
            will_delay_interval: b.0,
            request_response_information: b.1,
            response_information: b.2,
            server_reference: b.3,
            reason_string: b.4,
            receive_maximum: b.5,
            topic_alias_maximum: b.6,
            topic_alias: b.7,
            maximum_qos: b.8,
            retain_available: b.9,
            user_properties: b.10,
            maximum_packet_size: b.11,
            wildcard_subscription_available: c.0,
            subscription_identifier_available: c.1,
            shared_subscription_available: c.2,
        })
    })
}

/// Keeps only the properties with the given identifiers.
pub fn keep(p: Properties, ids: &[u8]) -> Properties {
    let has = |id: u8| ids.contains(&id);
    let p = p.into_set();
    let mut p = beckon_mqtt::PropertySet {
        payload_format_indicator: p.payload_format_indicator.filter(|_| has(0x01)),
        message_expiry_interval: p.message_expiry_interval.filter(|_| has(0x02)),
        content_type: p.content_type.filter(|_| has(0x03)),
        response_topic: p.response_topic.filter(|_| has(0x08)),
        correlation_data: p.correlation_data.filter(|_| has(0x09)),
        subscription_identifiers: if has(0x0B) {
            p.subscription_identifiers
        } else {
            Vec::new()
        },
        session_expiry_interval: p.session_expiry_interval.filter(|_| has(0x11)),
        assigned_client_identifier: p.assigned_client_identifier.filter(|_| has(0x12)),
        server_keep_alive: p.server_keep_alive.filter(|_| has(0x13)),
        authentication_method: p.authentication_method.filter(|_| has(0x15)),
        authentication_data: p.authentication_data.filter(|_| has(0x16)),
        request_problem_information: p.request_problem_information.filter(|_| has(0x17)),
        will_delay_interval: p.will_delay_interval.filter(|_| has(0x18)),
        request_response_information: p.request_response_information.filter(|_| has(0x19)),
        response_information: p.response_information.filter(|_| has(0x1A)),
        server_reference: p.server_reference.filter(|_| has(0x1C)),
        reason_string: p.reason_string.filter(|_| has(0x1F)),
        receive_maximum: p.receive_maximum.filter(|_| has(0x21)),
        topic_alias_maximum: p.topic_alias_maximum.filter(|_| has(0x22)),
        topic_alias: p.topic_alias.filter(|_| has(0x23)),
        maximum_qos: p.maximum_qos.filter(|_| has(0x24)),
        retain_available: p.retain_available.filter(|_| has(0x25)),
        user_properties: if has(0x26) {
            p.user_properties
        } else {
            Vec::new()
        },
        maximum_packet_size: p.maximum_packet_size.filter(|_| has(0x27)),
        wildcard_subscription_available: p.wildcard_subscription_available.filter(|_| has(0x28)),
        subscription_identifier_available: p
            .subscription_identifier_available
            .filter(|_| has(0x29)),
        shared_subscription_available: p.shared_subscription_available.filter(|_| has(0x2A)),
    };
    // Authentication data needs a method.
    if p.authentication_method.is_none() {
        p.authentication_data = None;
    }
    Properties::from(p)
}

pub const CONNECT: &[u8] = &[0x11, 0x15, 0x16, 0x17, 0x19, 0x21, 0x22, 0x26, 0x27];
pub const WILL: &[u8] = &[0x01, 0x02, 0x03, 0x08, 0x09, 0x18, 0x26];
pub const CONNACK: &[u8] = &[
    0x11, 0x12, 0x13, 0x15, 0x16, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29,
    0x2A,
];
pub const PUBLISH: &[u8] = &[0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x23, 0x26];
pub const ACK: &[u8] = &[0x1F, 0x26];
pub const SUBSCRIBE: &[u8] = &[0x0B, 0x26];
pub const UNSUBSCRIBE: &[u8] = &[0x26];
pub const DISCONNECT: &[u8] = &[0x11, 0x1C, 0x1F, 0x26];
pub const AUTH: &[u8] = &[0x15, 0x16, 0x1F, 0x26];

/// Properties for a packet: the allowed subset in v5, none in v3.1.1.
fn props(v5: bool, ids: &'static [u8]) -> BoxedStrategy<Properties> {
    if v5 {
        any_properties().prop_map(move |p| keep(p, ids)).boxed()
    } else {
        Just(Properties::default()).boxed()
    }
}

fn reason(v5: bool) -> BoxedStrategy<ReasonCode> {
    if v5 {
        any::<u8>().prop_map(ReasonCode).boxed()
    } else {
        Just(ReasonCode::SUCCESS).boxed()
    }
}

fn connect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version == ProtocolVersion::V5;
    let will = opt(
        (topic(), binary(), qos(), any::<bool>(), props(v5, WILL)).prop_map(
            |(topic, payload, qos, retain, properties)| Will {
                topic,
                payload,
                qos,
                retain,
                properties,
            },
        ),
    );
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        will,
        opt(text()),
        opt(binary()),
        props(v5, CONNECT),
    )
        .prop_map(
            move |(
                clean_start,
                keep_alive,
                client_id,
                will,
                mut username,
                password,
                properties,
            )| {
                if !v5 && password.is_some() && username.is_none() {
                    username = Some("user".into());
                }
                Packet::Connect(Box::new(Connect {
                    clean_start,
                    will,
                    username,
                    password,
                    properties,
                    ..Connect::new(version, client_id, keep_alive)
                }))
            },
        )
}

fn ack(v5: bool) -> impl Strategy<Value = Ack> {
    (1u16.., reason(v5), props(v5, ACK)).prop_map(|(packet_id, code, properties)| Ack {
        packet_id,
        code,
        properties,
    })
}

fn options(v5: bool) -> impl Strategy<Value = SubscriptionOptions> {
    let rh = prop_oneof![
        Just(RetainHandling::SendAtSubscribe),
        Just(RetainHandling::SendAtSubscribeIfNew),
        Just(RetainHandling::DoNotSend)
    ];
    (qos(), any::<bool>(), any::<bool>(), rh).prop_map(move |(qos, nl, rap, rh)| {
        if v5 {
            SubscriptionOptions {
                qos,
                no_local: nl,
                retain_as_published: rap,
                retain_handling: rh,
            }
        } else {
            SubscriptionOptions {
                qos,
                ..Default::default()
            }
        }
    })
}

/// Any valid packet for `version`.
pub fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version == ProtocolVersion::V5;
    let connack_code = if v5 {
        any::<u8>().prop_map(ReasonCode).boxed()
    } else {
        (0u8..=5).prop_map(ReasonCode).boxed()
    };
    let connack = (any::<bool>(), connack_code, props(v5, CONNACK)).prop_map(
        |(session_present, code, properties)| {
            Packet::ConnAck(ConnAck {
                session_present: session_present && code == ReasonCode::SUCCESS,
                code,
                properties,
            })
        },
    );
    let publish = (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic(),
        1u16..,
        vec(any::<u8>(), 0..40),
        props(v5, PUBLISH),
    )
        .prop_map(|(dup, qos, retain, topic, id, payload, properties)| {
            let zero = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !zero,
                qos,
                retain,
                topic,
                packet_id: (!zero).then_some(id),
                payload: Bytes::from(payload),
                properties,
            })
        });
    let subscribe = (
        1u16..,
        vec(
            (filter(), options(v5)).prop_map(|(filter, options)| Subscription { filter, options }),
            1..4,
        ),
        props(v5, SUBSCRIBE),
    )
        .prop_map(|(packet_id, subscriptions, mut properties)| {
            properties.subscription_identifiers.truncate(1);
            Packet::Subscribe(Subscribe {
                packet_id,
                subscriptions,
                properties,
            })
        });
    let suback_code = if v5 {
        any::<u8>().prop_map(ReasonCode).boxed()
    } else {
        prop_oneof![Just(0u8), Just(1), Just(2), Just(0x80)]
            .prop_map(ReasonCode)
            .boxed()
    };
    let suback = (1u16.., vec(suback_code, 1..4), props(v5, ACK)).prop_map(
        |(packet_id, codes, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                codes,
                properties,
            })
        },
    );
    let unsubscribe = (1u16.., vec(filter(), 1..4), props(v5, UNSUBSCRIBE)).prop_map(
        |(packet_id, filters, properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        },
    );
    let unsuback_codes = if v5 {
        vec(any::<u8>().prop_map(ReasonCode), 1..4).boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    let unsuback =
        (1u16.., unsuback_codes, props(v5, ACK)).prop_map(|(packet_id, codes, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                codes,
                properties,
            })
        });
    let disconnect = (reason(v5), props(v5, DISCONNECT))
        .prop_map(|(code, properties)| Packet::Disconnect(Disconnect { code, properties }));
    let mut choices: Vec<BoxedStrategy<Packet>> = vec![
        connect(version).boxed(),
        connack.boxed(),
        publish.boxed(),
        ack(v5).prop_map(Packet::PubAck).boxed(),
        ack(v5).prop_map(Packet::PubRec).boxed(),
        ack(v5).prop_map(Packet::PubRel).boxed(),
        ack(v5).prop_map(Packet::PubComp).boxed(),
        subscribe.boxed(),
        suback.boxed(),
        unsubscribe.boxed(),
        unsuback.boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect.boxed(),
    ];
    if v5 {
        let auth = (reason(true), props(true, AUTH)).prop_map(|(code, mut properties)| {
            // Continue and re-authenticate name their method (section 3.15.2.2.2).
            if code != ReasonCode::SUCCESS && properties.authentication_method.is_none() {
                properties.authentication_method = Some("SCRAM-SHA-1".into());
            }
            Packet::Auth(Auth { code, properties })
        });
        choices.push(auth.boxed());
    }
    proptest::strategy::Union::new(choices).boxed()
}

/// A version, then a valid packet of it.
pub fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    prop_oneof![Just(ProtocolVersion::V311), Just(ProtocolVersion::V5)]
        .prop_flat_map(|v| packet(v).prop_map(move |p| (v, p)))
}

/// Reason codes each v5 packet type defines (sections 3.2.2.2, 3.4.2.1, ... 3.15.2.1).
pub fn valid_codes(packet: &Packet) -> &'static [u8] {
    match packet {
        Packet::ConnAck(_) => &[
            0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
            0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
        ],
        Packet::PubAck(_) | Packet::PubRec(_) => {
            &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]
        }
        Packet::PubRel(_) | Packet::PubComp(_) => &[0x00, 0x92],
        Packet::SubAck(_) => &[
            0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
        ],
        Packet::UnsubAck(_) => &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91],
        Packet::Disconnect(_) => &[
            0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
            0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1,
            0xA2,
        ],
        Packet::Auth(_) => &[0x00, 0x18, 0x19],
        _ => &[],
    }
}

/// Replaces every reason code by one the packet type defines (picked by the generated value).
pub fn with_defined_codes(mut packet: Packet) -> Packet {
    let codes = valid_codes(&packet);
    let fix = |c: &mut ReasonCode| {
        if !codes.is_empty() && !codes.contains(&c.0) {
            c.0 = codes[usize::from(c.0) % codes.len()];
        }
    };
    match &mut packet {
        Packet::ConnAck(c) => {
            fix(&mut c.code);
            c.session_present &= c.code == ReasonCode::SUCCESS;
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            fix(&mut a.code);
        }
        Packet::SubAck(s) => s.codes.iter_mut().for_each(fix),
        Packet::UnsubAck(u) => u.codes.iter_mut().for_each(fix),
        Packet::Disconnect(d) => fix(&mut d.code),
        Packet::Auth(a) => fix(&mut a.code),
        _ => {}
    }
    packet
}
