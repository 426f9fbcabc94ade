//! Decoding: frames off the front of a buffer.

use bytes::BytesMut;

use crate::props;
use crate::wire::Reader;
use crate::{
    Ack, Auth, ConnAck, Connect, DecodeError, Disconnect, Packet, ProtocolVersion, Publish, QoS,
    ReasonCode, RetainHandling, SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck,
    Unsubscribe, Will,
};

/// Parses the fixed header: `(header length, remaining length)`, `None` when incomplete.
fn fixed_header(buf: &[u8], max_packet_size: u32) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(DecodeError::Malformed(
                    "remaining length not in its shortest form [MQTT-1.5.5-1]",
                ));
            }
            let header = 2 + i;
            let size = header + remaining;
            if size > max_packet_size as usize {
                return Err(DecodeError::PacketTooLarge {
                    size,
                    max: max_packet_size,
                });
            }
            return Ok(Some((header, remaining)));
        }
    }
    Err(DecodeError::Malformed(
        "remaining length longer than 4 bytes (section 2.2.3)",
    ))
}

/// The length of the first whole frame in `buf` (fixed header included), `Ok(None)` when more
/// bytes are needed. Checks the remaining length encoding and `max_packet_size` from the fixed
/// header alone, so a caller can refuse an oversized packet before buffering it.
///
/// `max_packet_size` bounds the whole packet, fixed header included (the v5 Maximum Packet
/// Size); `u32::MAX` leaves only the protocol's own limit. Errors: `PacketTooLarge` (0x95) as
/// soon as the remaining length is known, `Malformed` (0x81) for a remaining length longer
/// than four bytes or not in its shortest form.
pub fn frame_len(buf: &[u8], max_packet_size: u32) -> Result<Option<usize>, DecodeError> {
    Ok(fixed_header(buf, max_packet_size)?.map(|(header, remaining)| header + remaining))
}

/// Checks the packet type and the flags of the first header byte [MQTT-2.2.2-2].
fn check_first_byte(first: u8, version: ProtocolVersion) -> Result<(), DecodeError> {
    let flags = first & 0x0F;
    match first >> 4 {
        0 => Err(DecodeError::Malformed("packet type 0 is reserved")),
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                Err(DecodeError::Malformed("PUBLISH with QoS 3 [MQTT-3.3.1-4]"))
            } else if qos == 0 && flags & 0b1000 != 0 {
                Err(DecodeError::Malformed(
                    "PUBLISH with QoS 0 and the DUP flag set [MQTT-3.3.1-2]",
                ))
            } else {
                Ok(())
            }
        }
        6 | 8 | 10 if flags != 0b0010 => Err(DecodeError::Malformed(
            "PUBREL, SUBSCRIBE and UNSUBSCRIBE must have header flags 0010 [MQTT-3.6.1-1] [MQTT-3.8.1-1] [MQTT-3.10.1-1]",
        )),
        6 | 8 | 10 => Ok(()),
        15 if version == ProtocolVersion::V311 => Err(DecodeError::Malformed(
            "packet type 15 (AUTH) is reserved in MQTT 3.1.1",
        )),
        _ if flags != 0 => Err(DecodeError::Malformed(
            "reserved header flags are not 0000 [MQTT-2.2.2-2]",
        )),
        _ => Ok(()),
    }
}

/// Decodes the first whole frame of `buf` and advances past it; `Ok(None)` (buffer untouched)
/// when the frame is not complete yet. `version` is the connection's negotiated version; a
/// CONNECT is decoded by the version it names itself. After an error the connection must be
/// closed: the buffer is left in an unspecified state.
///
/// The first header byte is checked before the rest of the frame arrives (packet type 0,
/// reserved flags, QoS 3), and the size limit as soon as the fixed header is complete, so
/// nothing is buffered for a packet that will be refused. Payloads and binary properties are
/// slices of the frame (no copy); strings are checked (well-formed UTF-8, no U+0000) and owned.
///
/// Not judged here, because the answer depends on session state or direction: topic filter
/// syntax (SUBACK 0x8F), `$share` with No Local, topic alias above the negotiated maximum,
/// subscription identifiers in a client's PUBLISH, client identifier rules, and whether a
/// reason code is one the packet type defines (codes are kept as numbers).
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    // Reject a bad first byte before waiting for the rest of the frame.
    check_first_byte(first, version)?;
    let Some((header, remaining)) = fixed_header(buf, max_packet_size)? else {
        return Ok(None);
    };
    let total = header + remaining;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = buf.split_to(total).freeze();
    let mut r = Reader::new(&frame, header, total);
    let flags = first & 0x0F;
    let v5 = version == ProtocolVersion::V5;
    let packet = match first >> 4 {
        1 => Packet::Connect(Box::new(connect(&mut r)?)),
        2 => Packet::ConnAck(connack(&mut r, v5)?),
        3 => Packet::Publish(publish(&mut r, flags, v5)?),
        4 => Packet::PubAck(ack(&mut r, v5)?),
        5 => Packet::PubRec(ack(&mut r, v5)?),
        6 => Packet::PubRel(ack(&mut r, v5)?),
        7 => Packet::PubComp(ack(&mut r, v5)?),
        8 => Packet::Subscribe(subscribe(&mut r, v5)?),
        9 => Packet::SubAck(suback(&mut r, v5)?),
        10 => Packet::Unsubscribe(unsubscribe(&mut r, v5)?),
        11 => Packet::UnsubAck(unsuback(&mut r, v5)?),
        12 => {
            r.finish("PINGREQ with a non-zero remaining length")?;
            Packet::PingReq
        }
        13 => {
            r.finish("PINGRESP with a non-zero remaining length")?;
            Packet::PingResp
        }
        14 => {
            let (code, properties) = reason_and_properties(&mut r, v5, props::DISCONNECT)?;
            r.finish("DISCONNECT longer than its fields")?;
            Packet::Disconnect(Disconnect { code, properties })
        }
        15 => {
            let (code, properties) = reason_and_properties(&mut r, v5, props::AUTH)?;
            r.finish("AUTH longer than its fields")?;
            if code != ReasonCode::SUCCESS && properties.authentication_method.is_none() {
                return Err(DecodeError::Protocol(
                    "AUTH continuing or restarting authentication without an authentication method (section 3.15.2.2.2)",
                ));
            }
            Packet::Auth(Auth { code, properties })
        }
        // check_first_byte rejected type 0; a nibble cannot exceed 15.
        _ => return Err(DecodeError::Malformed("packet type 0 is reserved")),
    };
    Ok(Some(packet))
}

/// A packet identifier, never 0 [MQTT-2.2.1-3].
fn packet_id(r: &mut Reader<'_>) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::Protocol("packet identifier 0 [MQTT-2.2.1-3]")),
        id => Ok(id),
    }
}

/// Checks a topic name (PUBLISH, will): no wildcards [MQTT-3.3.2-2], no U+0000
/// [MQTT-4.7.3-2], at least one character unless a topic alias stands in [MQTT-4.7.3-1].
fn topic_name(topic: &str, may_be_empty: bool) -> Result<String, DecodeError> {
    if topic.is_empty() && !may_be_empty {
        return Err(DecodeError::InvalidTopic(
            "empty topic name without a topic alias [MQTT-4.7.3-1]",
        ));
    }
    for b in topic.bytes() {
        match b {
            b'+' | b'#' => {
                return Err(DecodeError::InvalidTopic(
                    "wildcard in a topic name [MQTT-3.3.2-2]",
                ));
            }
            0 => {
                return Err(DecodeError::InvalidTopic(
                    "U+0000 in a topic name [MQTT-4.7.3-2]",
                ));
            }
            _ => {}
        }
    }
    Ok(topic.to_owned())
}

fn connect(r: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    let name = r.str()?;
    let level = r.u8()?;
    let protocol = match (name, level) {
        ("MQTT", 4) => ProtocolVersion::V311,
        ("MQTT", 5) => ProtocolVersion::V5,
        _ => {
            return Err(DecodeError::UnsupportedProtocolVersion {
                level,
                name: name.to_owned(),
            });
        }
    };
    let v5 = protocol == ProtocolVersion::V5;
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed(
            "CONNECT reserved flag is set [MQTT-3.1.2-3]",
        ));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or will retain set without the will flag [MQTT-3.1.2-11] [MQTT-3.1.2-13]",
        ));
    }
    let Some(will_qos) = QoS::from_u8(will_qos) else {
        return Err(DecodeError::Malformed("will QoS 3 [MQTT-3.1.2-12]"));
    };
    if !v5 && has_password && !has_username {
        return Err(DecodeError::Malformed(
            "MQTT 3.1.1 CONNECT with a password but no user name [MQTT-3.1.2-22]",
        ));
    }
    let keep_alive = r.u16()?;
    let properties = if v5 {
        props::decode(r, props::CONNECT)?
    } else {
        Default::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = if v5 {
            props::decode(r, props::WILL)?
        } else {
            Default::default()
        };
        let topic = topic_name(r.str_allow_nul()?, false)?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    r.finish("CONNECT longer than its fields")?;
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn connack(r: &mut Reader<'_>, v5: bool) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::Malformed(
            "CONNACK acknowledge flags bits 7-1 are not 0 [MQTT-3.2.2-1]",
        ));
    }
    let session_present = flags & 0x01 != 0;
    let code = ReasonCode(r.u8()?);
    if !v5 && code.0 > 5 {
        return Err(DecodeError::Malformed(
            "MQTT 3.1.1 CONNACK return code above 5 is reserved (section 3.2.2.3)",
        ));
    }
    if session_present && code.0 != 0 {
        return Err(DecodeError::Protocol(
            "CONNACK refuses the connection yet sets session present [MQTT-3.2.2-6]",
        ));
    }
    let properties = if v5 {
        props::decode(r, props::CONNACK)?
    } else {
        Default::default()
    };
    r.finish("CONNACK longer than its fields")?;
    Ok(ConnAck {
        session_present,
        code,
        properties,
    })
}

fn publish(r: &mut Reader<'_>, flags: u8, v5: bool) -> Result<Publish, DecodeError> {
    // check_first_byte has ruled out QoS 3 and DUP with QoS 0.
    let qos = QoS::from_u8((flags >> 1) & 0b11)
        .ok_or(DecodeError::Malformed("PUBLISH with QoS 3 [MQTT-3.3.1-4]"))?;
    let topic = r.str_allow_nul()?;
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(packet_id(r)?)
    };
    let properties = if v5 {
        props::decode(r, props::PUBLISH)?
    } else {
        Default::default()
    };
    let topic = topic_name(topic, properties.topic_alias.is_some())?;
    let payload = r.rest();
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        payload,
        properties,
    })
}

/// The optional reason code and properties that end PUBACK/PUBREC/PUBREL/PUBCOMP, DISCONNECT
/// and AUTH in v5: either may be left out when the rest is default (sections 3.4.2.1, 3.14.2.1,
/// 3.15.2.1). v3.1.1 has neither.
fn reason_and_properties(
    r: &mut Reader<'_>,
    v5: bool,
    allowed: props::Allowed,
) -> Result<(ReasonCode, crate::Properties), DecodeError> {
    if !v5 || r.is_empty() {
        return Ok((ReasonCode::SUCCESS, Default::default()));
    }
    let code = ReasonCode(r.u8()?);
    if r.is_empty() {
        return Ok((code, Default::default()));
    }
    Ok((code, props::decode(r, allowed)?))
}

fn ack(r: &mut Reader<'_>, v5: bool) -> Result<Ack, DecodeError> {
    let packet_id = packet_id(r)?;
    let (code, properties) = reason_and_properties(r, v5, props::ACK)?;
    r.finish("acknowledgement longer than its fields")?;
    Ok(Ack {
        packet_id,
        code,
        properties,
    })
}

fn subscribe(r: &mut Reader<'_>, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = if v5 {
        props::decode(r, props::SUBSCRIBE)?
    } else {
        Default::default()
    };
    let mut subscriptions = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = r.u8()?;
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if options & reserved != 0 {
            return Err(DecodeError::Malformed(
                "subscription options reserved bits are not 0 [MQTT-3.8.3-5]",
            ));
        }
        let qos = QoS::from_u8(options & 0b11).ok_or(DecodeError::Malformed(
            "subscription with maximum QoS 3 [MQTT-3.8.3-4]",
        ))?;
        let retain_handling = match (options >> 4) & 0b11 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendAtSubscribeIfNew,
            2 => RetainHandling::DoNotSend,
            _ => {
                return Err(DecodeError::Protocol("retain handling 3 (section 3.8.3.1)"));
            }
        };
        subscriptions.push(Subscription {
            filter,
            options: SubscriptionOptions {
                qos,
                no_local: options & 0b0100 != 0,
                retain_as_published: options & 0b1000 != 0,
                retain_handling,
            },
        });
    }
    if subscriptions.is_empty() {
        return Err(DecodeError::Protocol(
            "SUBSCRIBE without a topic filter [MQTT-3.8.3-3]",
        ));
    }
    Ok(Subscribe {
        packet_id,
        subscriptions,
        properties,
    })
}

fn suback(r: &mut Reader<'_>, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = if v5 {
        props::decode(r, props::ACK)?
    } else {
        Default::default()
    };
    let mut codes = Vec::with_capacity(r.remaining());
    while !r.is_empty() {
        let code = r.u8()?;
        if !v5 && !matches!(code, 0 | 1 | 2 | 0x80) {
            return Err(DecodeError::Malformed(
                "MQTT 3.1.1 SUBACK return code other than 0, 1, 2 or 0x80 [MQTT-3.9.3-2]",
            ));
        }
        codes.push(ReasonCode(code));
    }
    if codes.is_empty() {
        return Err(DecodeError::Protocol("SUBACK without a return code"));
    }
    Ok(SubAck {
        packet_id,
        codes,
        properties,
    })
}

fn unsubscribe(r: &mut Reader<'_>, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = if v5 {
        props::decode(r, props::UNSUBSCRIBE)?
    } else {
        Default::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "UNSUBSCRIBE without a topic filter [MQTT-3.10.3-2]",
        ));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn unsuback(r: &mut Reader<'_>, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    if !v5 {
        r.finish("MQTT 3.1.1 UNSUBACK longer than its packet identifier")?;
        return Ok(UnsubAck {
            packet_id,
            codes: Vec::new(),
            properties: Default::default(),
        });
    }
    let properties = props::decode(r, props::ACK)?;
    let codes: Vec<ReasonCode> = std::iter::from_fn(|| {
        if r.is_empty() {
            None
        } else {
            r.u8().ok().map(ReasonCode)
        }
    })
    .collect();
    if codes.is_empty() {
        return Err(DecodeError::Protocol("UNSUBACK without a reason code"));
    }
    Ok(UnsubAck {
        packet_id,
        codes,
        properties,
    })
}
