//! The table of hand-encoded vectors, plus the fixed-header, size-limit and version-mapping
//! behaviour the broker relies on.

mod common;

use beckon_mqtt::{
    Ack, ConnAck, DecodeError, EncodeError, Packet, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, SubAck, decode, encode, encoded_len, frame_len,
};
use bytes::{Bytes, BytesMut};
use common::vectors::{self, Expect};
use common::{decode_one, hex};

fn encode_vec(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).expect("encodable");
    assert_eq!(
        encoded_len(packet, version).expect("measurable"),
        buf.len(),
        "encoded_len disagrees with encode for {packet:?}"
    );
    buf.to_vec()
}

/// The version a decoded packet re-encodes with (CONNECT carries its own).
fn version_of(packet: &Packet, connection: ProtocolVersion) -> ProtocolVersion {
    match packet {
        Packet::Connect(c) => c.protocol,
        _ => connection,
    }
}

#[test]
fn every_vector_decodes_as_the_spec_says() {
    let mut failures = Vec::new();
    for v in vectors::all() {
        let got = decode_one(&v.bytes, v.version);
        match (&v.expect, got) {
            (Expect::Packet { packet, canonical }, Ok(p)) => {
                if &p != packet {
                    failures.push(format!("{}: decoded {p:?}, expected {packet:?}", v.name));
                    continue;
                }
                let version = version_of(&p, v.version);
                let again = encode_vec(&p, version);
                if *canonical && again != v.bytes {
                    failures.push(format!(
                        "{}: re-encoded as {again:02x?}, expected {:02x?}",
                        v.name, v.bytes
                    ));
                }
                match decode_one(&again, version) {
                    Ok(q) if q == p => {}
                    other => failures.push(format!("{}: re-encoding decodes to {other:?}", v.name)),
                }
            }
            (Expect::Packet { .. }, Err(e)) => {
                failures.push(format!("{}: rejected a valid packet: {e}", v.name));
            }
            (Expect::Error(code), Ok(p)) => {
                failures.push(format!(
                    "{}: accepted an invalid packet as {p:?} (expected reason code {code:#04x})",
                    v.name
                ));
            }
            (Expect::Error(code), Err(e)) => {
                if e.reason_code() != ReasonCode(*code) {
                    failures.push(format!(
                        "{}: error {e} reports {:#04x}, expected {code:#04x}",
                        v.name,
                        e.reason_code().0
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} vector(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn incomplete_valid_frames_wait_and_leave_the_buffer_untouched() {
    for v in vectors::all() {
        if !matches!(v.expect, Expect::Packet { .. }) {
            continue;
        }
        for cut in 0..v.bytes.len() {
            let mut buf = BytesMut::from(&v.bytes[..cut]);
            let got = decode(&mut buf, v.version, u32::MAX);
            assert_eq!(got, Ok(None), "{}: prefix of {cut} bytes", v.name);
            assert_eq!(&buf[..], &v.bytes[..cut], "{}: buffer changed", v.name);
        }
    }
}

#[test]
fn frames_decode_one_after_another_from_one_buffer() {
    let mut buf = BytesMut::from(&hex("30 08 00 03 61 2f 62 00 68 69  c0 00  40 02 00 01  e0")[..]);
    let v = ProtocolVersion::V5;
    assert!(matches!(
        decode(&mut buf, v, 1024),
        Ok(Some(Packet::Publish(_)))
    ));
    assert_eq!(decode(&mut buf, v, 1024), Ok(Some(Packet::PingReq)));
    assert_eq!(
        decode(&mut buf, v, 1024),
        Ok(Some(Packet::PubAck(Ack::new(1))))
    );
    assert_eq!(decode(&mut buf, v, 1024), Ok(None));
    assert_eq!(&buf[..], &[0xe0]);
}

#[test]
fn payload_is_a_slice_of_the_frame_not_a_copy() {
    let frame = hex("30 0a 00 01 74 70 61 79 6c 6f 61 64");
    let mut buf = BytesMut::from(&frame[..]);
    let base = buf.as_ptr() as usize;
    let Ok(Some(Packet::Publish(p))) = decode(&mut buf, ProtocolVersion::V311, 1024) else {
        panic!("PUBLISH expected");
    };
    assert_eq!(&p.payload[..], b"payload");
    assert_eq!(p.payload.as_ptr() as usize, base + 5, "payload was copied");
}

#[test]
fn frame_len_refuses_an_oversized_packet_from_the_header_alone() {
    // Header announces 16,383 bytes of body; none of it has arrived.
    let header = hex("30 ff 7f");
    assert_eq!(
        frame_len(&header, 1024),
        Err(DecodeError::PacketTooLarge {
            size: 3 + 16_383,
            max: 1024
        })
    );
    let mut buf = BytesMut::from(&header[..]);
    let err = decode(&mut buf, ProtocolVersion::V5, 1024).unwrap_err();
    assert_eq!(err.reason_code(), ReasonCode::PACKET_TOO_LARGE);
    // Exactly at the limit is allowed; one byte over is not. The limit counts the header.
    let ping_plus = hex("30 03 00 01 74");
    assert_eq!(frame_len(&ping_plus, 5), Ok(Some(5)));
    assert!(matches!(
        frame_len(&ping_plus, 4),
        Err(DecodeError::PacketTooLarge { size: 5, max: 4 })
    ));
    // Incomplete headers ask for more.
    assert_eq!(frame_len(&[], 10), Ok(None));
    assert_eq!(frame_len(&[0x30], 10), Ok(None));
    assert_eq!(frame_len(&[0x30, 0x80], u32::MAX), Ok(None));
    assert_eq!(frame_len(&[0x30, 0x80, 0x01], u32::MAX), Ok(Some(3 + 128)));
    // Largest remaining length: 268,435,455 in four bytes.
    assert_eq!(
        frame_len(&[0x30, 0xff, 0xff, 0xff, 0x7f], u32::MAX),
        Ok(Some(5 + 268_435_455))
    );
}

#[test]
fn bad_first_byte_is_refused_before_the_body_arrives() {
    // SUBSCRIBE with flags 0000 whose body has not arrived yet [MQTT-3.8.1-1].
    let mut buf = BytesMut::from(&hex("80 06 00")[..]);
    let err = decode(&mut buf, ProtocolVersion::V311, 1024).unwrap_err();
    assert_eq!(err.reason_code(), ReasonCode::MALFORMED_PACKET);
}

#[test]
fn unsupported_protocol_reports_level_and_name() {
    let bytes = hex("10 0f 00 06 4d 51 49 73 64 70 03 02 00 3c 00 01 61");
    assert_eq!(
        decode_one(&bytes, ProtocolVersion::V311),
        Err(DecodeError::UnsupportedProtocolVersion {
            level: 3,
            name: "MQIsdp".into()
        })
    );
}

fn connack_v311(code: u8) -> Vec<u8> {
    let packet = Packet::ConnAck(ConnAck {
        session_present: false,
        code: ReasonCode(code),
        properties: Properties::default(),
    });
    encode_vec(&packet, ProtocolVersion::V311)
}

#[test]
fn connack_v5_codes_map_to_v311_return_codes() {
    let cases = [
        (0x00, 0),
        (0x84, 1), // unsupported protocol version -> unacceptable protocol version
        (0x85, 2), // client identifier not valid -> identifier rejected
        (0x88, 3), // server unavailable
        (0x89, 3), // server busy -> server unavailable
        (0x86, 4), // bad user name or password
        (0x87, 5), // not authorized
        (0x8A, 5), // banned -> not authorized
        (0x8C, 5), // bad authentication method -> not authorized
        (0x80, 3), // unspecified error -> server unavailable
        (0x97, 3), // quota exceeded -> server unavailable
        (0x9F, 3), // connection rate exceeded -> server unavailable
        (0x01, 1), // already a v3.1.1 return code
        (0x05, 5),
    ];
    for (v5, v311) in cases {
        assert_eq!(
            connack_v311(v5),
            vec![0x20, 0x02, 0x00, v311],
            "CONNACK {v5:#04x}"
        );
    }
    // Naming a decoded v3.1.1 return code with its v5 meaning, and back.
    for v311 in 0u8..=5 {
        let named = ReasonCode::from_v311_connack(v311);
        assert_eq!(named.to_v311_connack(), v311);
        assert_eq!(named.is_error(), v311 != 0);
    }
    assert_eq!(ReasonCode::from_v311_connack(5), ReasonCode::NOT_AUTHORIZED);
    // v5 keeps the reason code and adds the property length.
    let packet = Packet::ConnAck(ConnAck {
        code: ReasonCode::BANNED,
        ..Default::default()
    });
    assert_eq!(
        encode_vec(&packet, ProtocolVersion::V5),
        hex("20 03 00 8a 00")
    );
}

#[test]
fn suback_failures_are_0x80_in_v311() {
    let packet = Packet::SubAck(SubAck {
        packet_id: 9,
        codes: vec![
            ReasonCode::GRANTED_QOS_2,
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::TOPIC_FILTER_INVALID,
        ],
        properties: Properties::from(beckon_mqtt::PropertySet {
            reason_string: Some("left out in 3.1.1".into()),
            ..Default::default()
        }),
    });
    assert_eq!(
        encode_vec(&packet, ProtocolVersion::V311),
        hex("90 06 00 09 02 80 00 80")
    );
}

#[test]
fn v5_only_content_is_left_out_for_v311() {
    let mut ack = Ack::new(3);
    ack.code = ReasonCode::NO_MATCHING_SUBSCRIBERS;
    ack.properties.reason_string = Some("x".into());
    assert_eq!(
        encode_vec(&Packet::PubAck(ack.clone()), ProtocolVersion::V311),
        hex("40 02 00 03")
    );
    assert_eq!(
        encode_vec(&Packet::PubAck(ack), ProtocolVersion::V5),
        hex("40 08 00 03 10 04 1f 00 01 78")
    );
    let disconnect = Packet::Disconnect(beckon_mqtt::Disconnect {
        code: ReasonCode::SESSION_TAKEN_OVER,
        properties: Properties::default(),
    });
    assert_eq!(encode_vec(&disconnect, ProtocolVersion::V311), hex("e0 00"));
    assert_eq!(
        encode_vec(&disconnect, ProtocolVersion::V5),
        hex("e0 01 8e")
    );
    assert_eq!(
        encode_vec(&Packet::Disconnect(Default::default()), ProtocolVersion::V5),
        hex("e0 00")
    );
}

fn publish(qos: QoS, packet_id: Option<u16>) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: "t".into(),
        packet_id,
        payload: Bytes::new(),
        properties: Properties::default(),
    })
}

#[test]
fn encoder_refuses_what_it_cannot_express_and_leaves_the_buffer_untouched() {
    let v5 = ProtocolVersion::V5;
    let v311 = ProtocolVersion::V311;
    let cases: Vec<(Packet, ProtocolVersion)> = vec![
        (publish(QoS::AtLeastOnce, None), v5),
        (publish(QoS::ExactlyOnce, Some(0)), v5),
        (publish(QoS::AtMostOnce, Some(1)), v5),
        (Packet::Auth(Default::default()), v311),
        (
            Packet::PubAck(Ack {
                properties: Properties::from(beckon_mqtt::PropertySet {
                    topic_alias: Some(1),
                    ..Default::default()
                }),
                ..Ack::new(1)
            }),
            v5,
        ),
        (
            Packet::Publish(Publish {
                topic: "x".repeat(70_000),
                ..match publish(QoS::AtMostOnce, None) {
                    Packet::Publish(p) => p,
                    _ => unreachable!(),
                }
            }),
            v311,
        ),
    ];
    for (packet, version) in cases {
        let mut buf = BytesMut::from(&b"keep"[..]);
        let err = encode(&packet, version, &mut buf);
        assert!(
            matches!(err, Err(EncodeError::Invalid(_) | EncodeError::TooLarge(_))),
            "{packet:?} encoded as {err:?}"
        );
        assert_eq!(&buf[..], b"keep");
        assert!(encoded_len(&packet, version).is_err());
    }
}

#[test]
fn large_payload_uses_a_multi_byte_remaining_length() {
    let mut packet = publish(QoS::AtLeastOnce, Some(1));
    if let Packet::Publish(p) = &mut packet {
        p.payload = Bytes::from(vec![0x5a; 200_000]);
    }
    let bytes = encode_vec(&packet, ProtocolVersion::V5);
    // 3 (topic) + 2 (id) + 1 (properties) + 200,000 = 200,006 -> three length bytes.
    assert_eq!(bytes.len(), 1 + 3 + 200_006);
    assert_eq!(decode_one(&bytes, ProtocolVersion::V5), Ok(packet));
}
