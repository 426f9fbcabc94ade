//! Hand-encoded packets, valid and invalid, each naming the spec statement it checks. The ids
//! A3..B19 are the conformance vectors of the codec study (research section 1.2).

// A table reads best as one push per row, and its rows are built once per test run.
#![allow(clippy::vec_init_then_push, clippy::large_enum_variant)]

use beckon_mqtt::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck,
    Unsubscribe, Will,
};
use bytes::Bytes;

use super::hex;

use ProtocolVersion::{V5, V311};

/// What decoding a vector must give.
pub enum Expect {
    /// This packet. `canonical`: our encoder writes exactly the vector's bytes back.
    Packet { packet: Packet, canonical: bool },
    /// An error reporting this v5 reason code.
    Error(u8),
}

/// One hand-encoded packet.
pub struct Vector {
    /// The spec statement (or section) it checks, and the study id if it has one.
    pub name: &'static str,
    /// The connection's version the vector is decoded with.
    pub version: ProtocolVersion,
    /// The bytes on the wire.
    pub bytes: Vec<u8>,
    /// The expected outcome.
    pub expect: Expect,
}

const MALFORMED: u8 = 0x81;
const PROTOCOL: u8 = 0x82;
const TOPIC: u8 = 0x90;
const VERSION: u8 = 0x84;

fn ok(name: &'static str, version: ProtocolVersion, bytes: &str, packet: Packet) -> Vector {
    Vector {
        name,
        version,
        bytes: hex(bytes),
        expect: Expect::Packet {
            packet,
            canonical: true,
        },
    }
}

/// Valid, but our encoder writes it differently (property order, long forms).
fn ok_noncanonical(
    name: &'static str,
    version: ProtocolVersion,
    bytes: &str,
    packet: Packet,
) -> Vector {
    Vector {
        name,
        version,
        bytes: hex(bytes),
        expect: Expect::Packet {
            packet,
            canonical: false,
        },
    }
}

fn err(name: &'static str, version: ProtocolVersion, bytes: &str, code: u8) -> Vector {
    Vector {
        name,
        version,
        bytes: hex(bytes),
        expect: Expect::Error(code),
    }
}

fn connect(protocol: ProtocolVersion, client_id: &str) -> Connect {
    Connect::new(protocol, client_id, 60)
}

fn publish0(topic: &str, payload: &'static [u8]) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        payload: Bytes::from_static(payload),
        properties: Properties::default(),
    }
}

fn ack(packet_id: u16, code: u8) -> Ack {
    Ack {
        packet_id,
        code: ReasonCode(code),
        properties: Properties::default(),
    }
}

fn sub(filter: &str, options: SubscriptionOptions) -> Subscription {
    Subscription {
        filter: filter.into(),
        options,
    }
}

fn qos_opts(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..Default::default()
    }
}

/// The whole table.
pub fn all() -> Vec<Vector> {
    let mut v = Vec::new();

    // ---- CONNECT ----
    v.push(ok(
        "minimal MQTT 3.1.1 CONNECT (section 3.1)",
        V311,
        "10 0d 00 04 4d 51 54 54 04 02 00 3c 00 01 61",
        Packet::Connect(Box::new(connect(V311, "a"))),
    ));
    v.push(ok(
        "minimal MQTT 5 CONNECT (section 3.1)",
        V5,
        "10 0e 00 04 4d 51 54 54 05 02 00 3c 00 00 01 61",
        Packet::Connect(Box::new(connect(V5, "a"))),
    ));
    v.push(ok(
        "CONNECT is decoded by its own protocol level, whatever the connection's version",
        V311,
        "10 0e 00 04 4d 51 54 54 05 02 00 3c 00 00 01 61",
        Packet::Connect(Box::new(connect(V5, "a"))),
    ));
    v.push(ok(
        "MQTT 3.1.1 empty client id is well formed [MQTT-3.1.3-6]",
        V311,
        "10 0c 00 04 4d 51 54 54 04 02 00 3c 00 00",
        Packet::Connect(Box::new(connect(V311, ""))),
    ));
    v.push(err(
        "A10: CONNECT reserved flag set [MQTT-3.1.2-3]",
        V311,
        "10 0d 00 04 4d 51 54 54 04 03 00 3c 00 01 61",
        MALFORMED,
    ));
    v.push(err(
        "A10: CONNECT reserved flag set, v5 [MQTT-3.1.2-3]",
        V5,
        "10 0e 00 04 4d 51 54 54 05 03 00 3c 00 00 01 61",
        MALFORMED,
    ));
    v.push(err(
        "A14: will QoS set without the will flag [MQTT-3.1.2-11]",
        V311,
        "10 0d 00 04 4d 51 54 54 04 0a 00 3c 00 01 61",
        MALFORMED,
    ));
    v.push(err(
        "will retain set without the will flag [MQTT-3.1.2-13]",
        V311,
        "10 0d 00 04 4d 51 54 54 04 22 00 3c 00 01 61",
        MALFORMED,
    ));
    v.push(err(
        "will QoS 3 [MQTT-3.1.2-12]",
        V311,
        "10 13 00 04 4d 51 54 54 04 1e 00 3c 00 01 61 00 01 74 00 01 70",
        MALFORMED,
    ));
    v.push(err(
        "A15: MQTT 3.1.1 password without user name [MQTT-3.1.2-22]",
        V311,
        "10 10 00 04 4d 51 54 54 04 42 00 3c 00 01 61 00 01 70",
        MALFORMED,
    ));
    v.push(ok(
        "B18: MQTT 5 password without user name is allowed (section 3.1.2.9)",
        V5,
        "10 11 00 04 4d 51 54 54 05 42 00 3c 00 00 01 61 00 01 70",
        Packet::Connect(Box::new(Connect {
            password: Some(Bytes::from_static(b"p")),
            ..connect(V5, "a")
        })),
    ));
    v.push(err(
        "protocol level 3 (MQIsdp) is not supported [MQTT-3.1.2-2]",
        V311,
        "10 0f 00 06 4d 51 49 73 64 70 03 02 00 3c 00 01 61",
        VERSION,
    ));
    v.push(err(
        "unknown protocol level 6 [MQTT-3.1.2-2]",
        V5,
        "10 0e 00 04 4d 51 54 54 06 02 00 3c 00 00 01 61",
        VERSION,
    ));
    v.push(err(
        "wrong protocol name [MQTT-3.1.2-1]",
        V311,
        "10 0d 00 04 4d 51 54 58 04 02 00 3c 00 01 61",
        VERSION,
    ));
    v.push(err(
        "CONNECT with a trailing byte: remaining length inconsistent (section 2.1.4)",
        V311,
        "10 0e 00 04 4d 51 54 54 04 02 00 3c 00 01 61 ff",
        MALFORMED,
    ));
    v.push(err(
        "CONNECT shorter than its fields (section 2.1.4)",
        V311,
        "10 0c 00 04 4d 51 54 54 04 02 00 3c 00 01",
        MALFORMED,
    ));
    v.push(err(
        "client id with invalid UTF-8 [MQTT-1.5.4-1]",
        V311,
        "10 0e 00 04 4d 51 54 54 04 02 00 3c 00 02 c3 28",
        MALFORMED,
    ));
    v.push(err(
        "client id with an encoded surrogate U+D800 [MQTT-1.5.4-1]",
        V311,
        "10 0f 00 04 4d 51 54 54 04 02 00 3c 00 03 ed a0 80",
        MALFORMED,
    ));
    v.push(err(
        "client id with U+0000 [MQTT-1.5.4-2]",
        V311,
        "10 0e 00 04 4d 51 54 54 04 02 00 3c 00 02 61 00",
        MALFORMED,
    ));
    v.push(err(
        "will topic with a wildcard [MQTT-3.1.3-11] [MQTT-3.3.2-2]",
        V311,
        "10 15 00 04 4d 51 54 54 04 06 00 3c 00 01 61 00 03 61 2f 23 00 01 70",
        TOPIC,
    ));
    // Every CONNECT property, including authentication, and every will property. Properties
    // are in an order our encoder does not use, so the re-encoding differs in bytes only.
    v.push(ok_noncanonical(
        "v5 CONNECT with every client property, authentication and a full will (section 3.1.2.11, 3.1.3.2)",
        V5,
        "10 6d 00 04 4d 51 54 54 05 ee 00 1e
         28
           11 00 00 00 78  21 00 10  27 00 00 10 00  22 00 0a  19 01  17 00
           26 00 01 6b 00 01 76  15 00 05 50 4c 41 49 4e  16 00 02 01 02
         00 02 63 31
         25
           18 00 00 00 05  01 01  02 00 00 00 3c  03 00 04 74 65 78 74  08 00 03 72 2f 31
           09 00 02 ab cd  26 00 01 61 00 01 62
         00 03 77 2f 31  00 02 6f 6b
         00 01 75  00 02 70 77",
        Packet::Connect(Box::new(Connect {
            protocol: V5,
            clean_start: true,
            keep_alive: 30,
            client_id: "c1".into(),
            will: Some(Will {
                topic: "w/1".into(),
                payload: Bytes::from_static(b"ok"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::from(beckon_mqtt::PropertySet {
                    will_delay_interval: Some(5),
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(60),
                    content_type: Some("text".into()),
                    response_topic: Some("r/1".into()),
                    correlation_data: Some(Bytes::from_static(&[0xab, 0xcd])),
                    user_properties: vec![("a".into(), "b".into())],
                    ..Default::default()
                }),
            }),
            username: Some("u".into()),
            password: Some(Bytes::from_static(b"pw")),
            properties: Properties::from(beckon_mqtt::PropertySet {
                session_expiry_interval: Some(120),
                receive_maximum: Some(16),
                maximum_packet_size: Some(4096),
                topic_alias_maximum: Some(10),
                request_response_information: Some(1),
                request_problem_information: Some(0),
                user_properties: vec![("k".into(), "v".into())],
                authentication_method: Some("PLAIN".into()),
                authentication_data: Some(Bytes::from_static(&[1, 2])),
                ..Default::default()
            }),
        })),
    ));
    v.push(err(
        "CONNECT with receive maximum 0 (section 3.1.2.11.3)",
        V5,
        "10 11 00 04 4d 51 54 54 05 02 00 3c 03 21 00 00 00 01 61",
        PROTOCOL,
    ));
    v.push(err(
        "CONNECT with maximum packet size 0 (section 3.1.2.11.4)",
        V5,
        "10 13 00 04 4d 51 54 54 05 02 00 3c 05 27 00 00 00 00 00 01 61",
        PROTOCOL,
    ));
    v.push(ok(
        "CONNECT with topic alias maximum 0 is valid (section 3.1.2.11.5); it panics mqtt-protocol-core",
        V5,
        "10 11 00 04 4d 51 54 54 05 02 00 3c 03 22 00 00 00 01 61",
        Packet::Connect(Box::new(Connect {
            properties: Properties::from(beckon_mqtt::PropertySet {
                topic_alias_maximum: Some(0),
                ..Default::default()
            }),
            ..connect(V5, "a")
        })),
    ));
    v.push(err(
        "CONNECT with authentication data but no method (section 3.1.2.11.10)",
        V5,
        "10 12 00 04 4d 51 54 54 05 02 00 3c 04 16 00 01 ff 00 01 61",
        PROTOCOL,
    ));
    v.push(err(
        "CONNECT with request problem information 2 (section 3.1.2.11.7)",
        V5,
        "10 10 00 04 4d 51 54 54 05 02 00 3c 02 17 02 00 01 61",
        PROTOCOL,
    ));
    v.push(err(
        "CONNECT with a PUBLISH-only property (topic alias) (section 2.2.2.2)",
        V5,
        "10 11 00 04 4d 51 54 54 05 02 00 3c 03 23 00 01 00 01 61",
        MALFORMED,
    ));
    v.push(err(
        "property length runs past the packet (section 2.2.2.1)",
        V5,
        "10 0e 00 04 4d 51 54 54 05 02 00 3c 09 00 01 61",
        MALFORMED,
    ));

    // ---- CONNACK ----
    v.push(ok(
        "MQTT 3.1.1 CONNACK accepted (section 3.2)",
        V311,
        "20 02 00 00",
        Packet::ConnAck(ConnAck::default()),
    ));
    v.push(ok(
        "MQTT 3.1.1 CONNACK session present (section 3.2.2.2)",
        V311,
        "20 02 01 00",
        Packet::ConnAck(ConnAck {
            session_present: true,
            ..Default::default()
        }),
    ));
    v.push(ok(
        "MQTT 3.1.1 CONNACK not authorized (return code 5, section 3.2.2.3)",
        V311,
        "20 02 00 05",
        Packet::ConnAck(ConnAck {
            code: ReasonCode(5),
            ..Default::default()
        }),
    ));
    v.push(err(
        "MQTT 3.1.1 CONNACK reserved return code 6 (section 3.2.2.3)",
        V311,
        "20 02 00 06",
        MALFORMED,
    ));
    v.push(err(
        "CONNACK acknowledge flags bits 7-1 set [MQTT-3.2.2-1]",
        V311,
        "20 02 02 00",
        MALFORMED,
    ));
    v.push(err(
        "CONNACK refusal with session present [MQTT-3.2.2-4] [MQTT-3.2.2-6]",
        V311,
        "20 02 01 05",
        PROTOCOL,
    ));
    v.push(err(
        "v5 CONNACK without property length (section 3.2.2.3)",
        V5,
        "20 02 00 00",
        MALFORMED,
    ));
    v.push(ok(
        "v5 CONNACK with receive maximum and maximum QoS (section 3.2.2.3)",
        V5,
        "20 08 00 00 05 21 00 0a 24 01",
        Packet::ConnAck(ConnAck {
            properties: Properties::from(beckon_mqtt::PropertySet {
                receive_maximum: Some(10),
                maximum_qos: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        }),
    ));
    v.push(ok(
        "v5 CONNACK refusal 0x87 not authorized (section 3.2.2.2)",
        V5,
        "20 03 00 87 00",
        Packet::ConnAck(ConnAck {
            code: ReasonCode::NOT_AUTHORIZED,
            ..Default::default()
        }),
    ));
    v.push(err(
        "v5 CONNACK with receive maximum 0 (section 3.2.2.3.3)",
        V5,
        "20 06 00 00 03 21 00 00",
        PROTOCOL,
    ));
    v.push(err(
        "v5 CONNACK with maximum packet size 0 (section 3.2.2.3.6)",
        V5,
        "20 08 00 00 05 27 00 00 00 00",
        PROTOCOL,
    ));
    v.push(err(
        "v5 CONNACK with maximum QoS 2 (section 3.2.2.3.4)",
        V5,
        "20 05 00 00 02 24 02",
        PROTOCOL,
    ));

    // ---- PUBLISH ----
    v.push(ok(
        "MQTT 3.1.1 QoS 0 PUBLISH (section 3.3)",
        V311,
        "30 07 00 03 61 2f 62 68 69",
        Packet::Publish(publish0("a/b", b"hi")),
    ));
    v.push(ok(
        "QoS 2 PUBLISH with DUP and RETAIN (section 3.3.1)",
        V311,
        "3d 07 00 03 61 2f 62 00 07",
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: true,
            packet_id: Some(7),
            ..publish0("a/b", b"")
        }),
    ));
    v.push(err(
        "A11: QoS 1 PUBLISH with packet id 0 [MQTT-2.2.1-3]",
        V311,
        "32 07 00 03 61 2f 62 00 00",
        PROTOCOL,
    ));
    v.push(err(
        "PUBLISH QoS 3 [MQTT-3.3.1-4]",
        V311,
        "36 07 00 03 61 2f 62 00 01",
        MALFORMED,
    ));
    v.push(err(
        "QoS 0 PUBLISH with DUP [MQTT-3.3.1-2]",
        V311,
        "38 05 00 03 61 2f 62",
        MALFORMED,
    ));
    v.push(err(
        "A8: topic contains U+0000 [MQTT-4.7.3-2]",
        V311,
        "30 05 00 03 61 00 62",
        TOPIC,
    ));
    v.push(err(
        "A16: wildcard + in a PUBLISH topic [MQTT-3.3.2-2]",
        V311,
        "30 05 00 03 61 2f 2b",
        TOPIC,
    ));
    v.push(err(
        "A16: wildcard # in a v5 PUBLISH topic [MQTT-3.3.2-2]",
        V5,
        "30 06 00 03 61 2f 23 00",
        TOPIC,
    ));
    v.push(err(
        "empty PUBLISH topic in MQTT 3.1.1 [MQTT-4.7.3-1]",
        V311,
        "30 02 00 00",
        TOPIC,
    ));
    v.push(err(
        "empty v5 PUBLISH topic without topic alias (section 3.3.2.1)",
        V5,
        "30 03 00 00 00",
        TOPIC,
    ));
    v.push(ok(
        "empty v5 PUBLISH topic with a topic alias (section 3.3.2.3.4)",
        V5,
        "30 06 00 00 03 23 00 01",
        Packet::Publish(Publish {
            properties: Properties::from(beckon_mqtt::PropertySet {
                topic_alias: Some(1),
                ..Default::default()
            }),
            ..publish0("", b"")
        }),
    ));
    v.push(err(
        "B19: topic alias 0 [MQTT-3.3.2-8]",
        V5,
        "30 07 00 01 74 03 23 00 00",
        PROTOCOL,
    ));
    v.push(err(
        "PUBLISH topic with invalid UTF-8 [MQTT-1.5.4-1]",
        V311,
        "30 04 00 02 c3 28",
        MALFORMED,
    ));
    v.push(ok(
        "B9: v5 PUBLISH with every PUBLISH property, two subscription ids (section 3.3.2.3)",
        V5,
        "32 2d 00 01 74 00 01 26
           01 01  02 00 00 00 0a  03 00 04 6a 73 6f 6e  08 00 01 72  09 00 02 01 02
           0b 05  0b 80 01  23 00 02  26 00 01 6b 00 01 76
         70",
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "t".into(),
            packet_id: Some(1),
            payload: Bytes::from_static(b"p"),
            properties: Properties::from(beckon_mqtt::PropertySet {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(10),
                content_type: Some("json".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(&[1, 2])),
                subscription_identifiers: vec![5, 128],
                topic_alias: Some(2),
                user_properties: vec![("k".into(), "v".into())],
                ..Default::default()
            }),
        }),
    ));
    v.push(err(
        "B10: v5 PUBLISH carrying the CONNECT-only property 0x11 (section 2.2.2.2)",
        V5,
        "30 09 00 01 74 05 11 00 00 00 0a",
        MALFORMED,
    ));
    v.push(err(
        "B11: duplicated property (message expiry twice) (section 3.3.2.3.3)",
        V5,
        "30 0e 00 01 74 0a 02 00 00 00 01 02 00 00 00 02",
        PROTOCOL,
    ));
    v.push(ok(
        "user property may repeat, with the same key (section 3.3.2.3.7)",
        V5,
        "30 13 00 01 74 0e 26 00 01 6b 00 01 31 26 00 01 6b 00 01 32 78",
        Packet::Publish(Publish {
            properties: Properties::from(beckon_mqtt::PropertySet {
                user_properties: vec![("k".into(), "1".into()), ("k".into(), "2".into())],
                ..Default::default()
            }),
            ..publish0("t", b"x")
        }),
    ));
    v.push(err(
        "response topic with a wildcard [MQTT-3.3.2-14]",
        V5,
        "30 09 00 01 74 05 08 00 02 61 23",
        PROTOCOL,
    ));
    v.push(err(
        "payload format indicator 2 (section 3.3.2.3.2)",
        V5,
        "30 06 00 01 74 02 01 02",
        PROTOCOL,
    ));
    v.push(err(
        "subscription identifier 0 in PUBLISH (section 3.3.2.3.8)",
        V5,
        "30 06 00 01 74 02 0b 00",
        PROTOCOL,
    ));
    v.push(err(
        "unknown property identifier 0x7f (section 2.2.2.2)",
        V5,
        "30 06 00 01 74 02 7f 00",
        MALFORMED,
    ));

    // ---- PUBACK, PUBREC, PUBREL, PUBCOMP ----
    v.push(ok(
        "B7: v5 PUBACK short form, packet id only (section 3.4.2.1)",
        V5,
        "40 02 00 01",
        Packet::PubAck(ack(1, 0)),
    ));
    v.push(ok(
        "B8: v5 PUBACK with reason code only (section 3.4.2.1)",
        V5,
        "40 03 00 01 10",
        Packet::PubAck(ack(1, 0x10)),
    ));
    v.push(ok_noncanonical(
        "v5 PUBACK with reason code and empty properties (section 3.4.2.2)",
        V5,
        "40 04 00 01 10 00",
        Packet::PubAck(ack(1, 0x10)),
    ));
    v.push(ok(
        "v5 PUBREC with reason string (section 3.5.2.2.2)",
        V5,
        "50 08 00 01 80 04 1f 00 01 78",
        Packet::PubRec(Ack {
            properties: Properties::from(beckon_mqtt::PropertySet {
                reason_string: Some("x".into()),
                ..Default::default()
            }),
            ..ack(1, 0x80)
        }),
    ));
    v.push(ok(
        "PUBREL short form (section 3.6.2.1)",
        V5,
        "62 02 00 01",
        Packet::PubRel(ack(1, 0)),
    ));
    v.push(ok(
        "MQTT 3.1.1 PUBCOMP (section 3.7)",
        V311,
        "70 02 12 34",
        Packet::PubComp(ack(0x1234, 0)),
    ));
    v.push(err(
        "PUBREL with header flags 0000 [MQTT-3.6.1-1]",
        V311,
        "60 02 00 01",
        MALFORMED,
    ));
    v.push(err(
        "PUBREC with header flags 0001 [MQTT-2.2.2-2]",
        V5,
        "51 02 00 01",
        MALFORMED,
    ));
    v.push(err(
        "PUBACK with packet id 0 [MQTT-2.2.1-3]",
        V5,
        "40 02 00 00",
        PROTOCOL,
    ));
    v.push(err(
        "MQTT 3.1.1 PUBACK with a trailing byte (section 3.4.1)",
        V311,
        "40 03 00 01 00",
        MALFORMED,
    ));
    v.push(err(
        "PUBACK shorter than a packet id (section 3.4.2)",
        V5,
        "40 01 00",
        MALFORMED,
    ));
    v.push(err(
        "PUBACK with a PUBLISH-only property (section 2.2.2.2)",
        V5,
        "40 06 00 01 00 02 01 00",
        MALFORMED,
    ));

    // ---- SUBSCRIBE / SUBACK ----
    v.push(ok(
        "MQTT 3.1.1 SUBSCRIBE (section 3.8)",
        V311,
        "82 06 00 01 00 01 74 01",
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![sub("t", qos_opts(QoS::AtLeastOnce))],
            properties: Properties::default(),
        }),
    ));
    v.push(err(
        "A3: SUBSCRIBE reserved flags 0000 [MQTT-3.8.1-1]",
        V311,
        "80 06 00 01 00 01 74 00",
        MALFORMED,
    ));
    v.push(err(
        "MQTT 3.1.1 SUBSCRIBE options bits 7-2 set [MQTT-3-8.3-4]",
        V311,
        "82 06 00 01 00 01 74 05",
        MALFORMED,
    ));
    v.push(err(
        "empty MQTT 3.1.1 SUBSCRIBE [MQTT-3.8.3-3]",
        V311,
        "82 02 00 01",
        PROTOCOL,
    ));
    v.push(err(
        "empty v5 SUBSCRIBE [MQTT-3.8.3-2]",
        V5,
        "82 03 00 01 00",
        PROTOCOL,
    ));
    v.push(ok(
        "v5 SUBSCRIBE with no local, retain as published, retain handling 2 and a subscription id (section 3.8.3.1)",
        V5,
        "82 0b 00 01 02 0b 07 00 03 61 2f 23 2e",
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![sub(
                "a/#",
                SubscriptionOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: RetainHandling::DoNotSend,
                },
            )],
            properties: Properties::from(beckon_mqtt::PropertySet {
                subscription_identifiers: vec![7],
                ..Default::default()
            }),
        }),
    ));
    v.push(err(
        "B13: v5 subscription options reserved bits set [MQTT-3.8.3-5]",
        V5,
        "82 0b 00 01 02 0b 07 00 03 61 2f 23 42",
        MALFORMED,
    ));
    v.push(err(
        "v5 subscription retain handling 3 (section 3.8.3.1)",
        V5,
        "82 0b 00 01 02 0b 07 00 03 61 2f 23 30",
        PROTOCOL,
    ));
    v.push(err(
        "subscription maximum QoS 3 [MQTT-3-8.3-4]",
        V5,
        "82 09 00 01 00 00 03 61 2f 23 03",
        MALFORMED,
    ));
    v.push(err(
        "B14: subscription identifier 0 (section 3.8.2.1.2)",
        V5,
        "82 0b 00 01 02 0b 00 00 03 61 2f 23 00",
        PROTOCOL,
    ));
    v.push(err(
        "two subscription identifiers in SUBSCRIBE (section 3.8.2.1.2)",
        V5,
        "82 0d 00 01 04 0b 01 0b 02 00 03 61 2f 23 00",
        PROTOCOL,
    ));
    v.push(err(
        "SUBSCRIBE with packet id 0 [MQTT-2.2.1-3]",
        V311,
        "82 06 00 00 00 01 74 01",
        PROTOCOL,
    ));
    v.push(err(
        "topic filter with U+0000 [MQTT-1.5.4-2]",
        V311,
        "82 07 00 01 00 02 74 00 01",
        MALFORMED,
    ));
    v.push(ok(
        "MQTT 3.1.1 SUBACK with a failure (section 3.9.3)",
        V311,
        "90 04 00 01 00 80",
        Packet::SubAck(SubAck {
            packet_id: 1,
            codes: vec![ReasonCode(0), ReasonCode(0x80)],
            properties: Properties::default(),
        }),
    ));
    v.push(err(
        "MQTT 3.1.1 SUBACK with reserved return code 0x87 [MQTT-3.9.3-2]",
        V311,
        "90 03 00 01 87",
        MALFORMED,
    ));
    v.push(ok(
        "v5 SUBACK with 0x87 not authorized (section 3.9.3)",
        V5,
        "90 05 00 01 00 01 87",
        Packet::SubAck(SubAck {
            packet_id: 1,
            codes: vec![ReasonCode(1), ReasonCode(0x87)],
            properties: Properties::default(),
        }),
    ));

    // ---- UNSUBSCRIBE / UNSUBACK ----
    v.push(ok(
        "MQTT 3.1.1 UNSUBSCRIBE (section 3.10)",
        V311,
        "a2 05 00 01 00 01 74",
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 1,
            filters: vec!["t".into()],
            properties: Properties::default(),
        }),
    ));
    v.push(ok(
        "v5 UNSUBSCRIBE with two filters (section 3.10)",
        V5,
        "a2 0b 00 01 00 00 01 74 00 03 61 2f 2b",
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 1,
            filters: vec!["t".into(), "a/+".into()],
            properties: Properties::default(),
        }),
    ));
    v.push(err(
        "UNSUBSCRIBE with header flags 0000 [MQTT-3.10.1-1]",
        V311,
        "a0 05 00 01 00 01 74",
        MALFORMED,
    ));
    v.push(err(
        "empty UNSUBSCRIBE [MQTT-3.10.3-2]",
        V311,
        "a2 02 00 01",
        PROTOCOL,
    ));
    v.push(ok(
        "MQTT 3.1.1 UNSUBACK (section 3.11)",
        V311,
        "b0 02 00 01",
        Packet::UnsubAck(UnsubAck {
            packet_id: 1,
            codes: vec![],
            properties: Properties::default(),
        }),
    ));
    v.push(ok(
        "v5 UNSUBACK no subscription existed (section 3.11.3)",
        V5,
        "b0 04 00 01 00 11",
        Packet::UnsubAck(UnsubAck {
            packet_id: 1,
            codes: vec![ReasonCode::NO_SUBSCRIPTION_EXISTED],
            properties: Properties::default(),
        }),
    ));

    // ---- PINGREQ / PINGRESP ----
    v.push(ok("PINGREQ (section 3.12)", V311, "c0 00", Packet::PingReq));
    v.push(ok("PINGRESP (section 3.13)", V5, "d0 00", Packet::PingResp));
    v.push(err(
        "PINGREQ with a body (section 3.12.1)",
        V311,
        "c0 01 00",
        MALFORMED,
    ));
    v.push(err(
        "PINGREQ with header flags 0001 [MQTT-2.2.2-2]",
        V5,
        "c1 00",
        MALFORMED,
    ));

    // ---- DISCONNECT ----
    v.push(ok(
        "B3: v5 DISCONNECT short form e0 00 (section 3.14.2.1)",
        V5,
        "e0 00",
        Packet::Disconnect(Disconnect::default()),
    ));
    v.push(ok(
        "B4: v5 DISCONNECT with reason code only, e0 01 04 (section 3.14.2.1)",
        V5,
        "e0 01 04",
        Packet::Disconnect(Disconnect {
            code: ReasonCode::DISCONNECT_WITH_WILL,
            ..Default::default()
        }),
    ));
    v.push(ok(
        "v5 DISCONNECT session taken over, e0 01 8e (section 3.14.2.1)",
        V5,
        "e0 01 8e",
        Packet::Disconnect(Disconnect {
            code: ReasonCode::SESSION_TAKEN_OVER,
            ..Default::default()
        }),
    ));
    v.push(ok(
        "v5 DISCONNECT with session expiry and reason string (section 3.14.2.2)",
        V5,
        "e0 0c 8e 0a 11 00 00 00 3c 1f 00 02 62 79",
        Packet::Disconnect(Disconnect {
            code: ReasonCode::SESSION_TAKEN_OVER,
            properties: Properties::from(beckon_mqtt::PropertySet {
                session_expiry_interval: Some(60),
                reason_string: Some("by".into()),
                ..Default::default()
            }),
        }),
    ));
    v.push(ok(
        "MQTT 3.1.1 DISCONNECT (section 3.14)",
        V311,
        "e0 00",
        Packet::Disconnect(Disconnect::default()),
    ));
    v.push(err(
        "MQTT 3.1.1 DISCONNECT with a body (section 3.14.1)",
        V311,
        "e0 01 00",
        MALFORMED,
    ));
    v.push(err(
        "v5 DISCONNECT with a topic alias property (section 2.2.2.2)",
        V5,
        "e0 05 00 03 23 00 01",
        MALFORMED,
    ));

    // ---- AUTH ----
    v.push(ok(
        "B5: v5 AUTH short form f0 00 (section 3.15.2.1)",
        V5,
        "f0 00",
        Packet::Auth(Auth::default()),
    ));
    v.push(ok(
        "B6: v5 AUTH continue with method and data (section 3.15.2.2)",
        V5,
        "f0 0e 18 0c 15 00 05 50 4c 41 49 4e 16 00 01 ff",
        Packet::Auth(Auth {
            code: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: Properties::from(beckon_mqtt::PropertySet {
                authentication_method: Some("PLAIN".into()),
                authentication_data: Some(Bytes::from_static(&[0xff])),
                ..Default::default()
            }),
        }),
    ));
    v.push(err(
        "AUTH in MQTT 3.1.1: packet type 15 is reserved (section 2.2.1)",
        V311,
        "f0 00",
        MALFORMED,
    ));
    v.push(err(
        "AUTH continue without an authentication method (section 3.15.2.2.2)",
        V5,
        "f0 01 18",
        PROTOCOL,
    ));
    v.push(err(
        "AUTH with data but no method (section 3.15.2.2.3)",
        V5,
        "f0 06 18 04 16 00 01 ff",
        PROTOCOL,
    ));

    // ---- fixed header ----
    v.push(err(
        "packet type 0 is reserved (section 2.1.2)",
        V5,
        "00 00",
        MALFORMED,
    ));
    v.push(err(
        "remaining length of 5 bytes (section 1.5.5)",
        V5,
        "30 ff ff ff ff 7f",
        MALFORMED,
    ));
    v.push(err(
        "remaining length not in its shortest form [MQTT-1.5.5-1]",
        V5,
        "c0 80 00",
        MALFORMED,
    ));
    v
}
