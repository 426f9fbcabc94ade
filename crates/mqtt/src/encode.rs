//! Encoding: a packet for a given protocol version.
//!
//! Every packet is encoded in two passes: [`measure`] computes the remaining length (and the
//! property lengths) and checks everything that could fail, then [`write`] appends the bytes
//! and cannot fail. So an error leaves `buf` untouched, and [`encoded_len`] never encodes.

use bytes::{BufMut, BytesMut};

use crate::props;
use crate::wire::{self, VARINT_MAX};
use crate::{Connect, EncodeError, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode};

/// Lengths found by the measuring pass, reused by the writing pass.
#[derive(Debug, Default, Clone, Copy)]
struct Lens {
    /// Remaining length of the fixed header.
    remaining: usize,
    /// Length of the packet's property list (v5).
    props: usize,
    /// Length of the will's property list (v5 CONNECT).
    will_props: usize,
}

/// Size of a v5 property list with its length prefix.
fn props_field(len: usize) -> usize {
    wire::varint_len(len) + len
}

/// The v5 reason code and properties tail of acks, DISCONNECT and AUTH: left out entirely when
/// the code is 0 and there are no properties, the properties left out when empty.
fn tail_len(
    code: ReasonCode,
    properties: &Properties,
    allowed: props::Allowed,
) -> Result<(usize, usize), EncodeError> {
    let p = props::len(properties, allowed)?;
    let n = if p > 0 {
        1 + props_field(p)
    } else if code != ReasonCode::SUCCESS {
        1
    } else {
        0
    };
    Ok((n, p))
}

fn put_tail(buf: &mut BytesMut, code: ReasonCode, properties: &Properties, lens: Lens) {
    if lens.props > 0 {
        buf.put_u8(code.0);
        props::put(buf, properties, lens.props);
    } else if code != ReasonCode::SUCCESS {
        buf.put_u8(code.0);
    }
}

fn measure(packet: &Packet, version: ProtocolVersion) -> Result<Lens, EncodeError> {
    let v5 = version == ProtocolVersion::V5;
    let mut lens = Lens::default();
    let remaining = match packet {
        Packet::Connect(c) => measure_connect(c, version, &mut lens)?,
        Packet::ConnAck(c) => {
            let mut n = 2;
            if v5 {
                lens.props = props::len(&c.properties, props::CONNACK)?;
                n += props_field(lens.props);
            }
            n
        }
        Packet::Publish(p) => measure_publish(p, v5, &mut lens)?,
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            let mut n = 2;
            if v5 {
                let (tail, p) = tail_len(a.code, &a.properties, props::ACK)?;
                lens.props = p;
                n += tail;
            }
            n
        }
        Packet::Subscribe(s) => {
            if s.subscriptions.is_empty() {
                return Err(EncodeError::Invalid("SUBSCRIBE without a topic filter"));
            }
            let mut n = 2usize;
            if v5 {
                lens.props = props::len(&s.properties, props::SUBSCRIBE)?;
                n += props_field(lens.props);
            }
            for sub in &s.subscriptions {
                n = n.saturating_add(wire::str_len(&sub.filter)? + 1);
            }
            n
        }
        Packet::SubAck(s) => {
            let mut n = 2usize;
            if v5 {
                lens.props = props::len(&s.properties, props::ACK)?;
                n += props_field(lens.props);
            }
            n.saturating_add(s.codes.len())
        }
        Packet::Unsubscribe(u) => {
            if u.filters.is_empty() {
                return Err(EncodeError::Invalid("UNSUBSCRIBE without a topic filter"));
            }
            let mut n = 2usize;
            if v5 {
                lens.props = props::len(&u.properties, props::UNSUBSCRIBE)?;
                n += props_field(lens.props);
            }
            for f in &u.filters {
                n = n.saturating_add(wire::str_len(f)?);
            }
            n
        }
        Packet::UnsubAck(u) => {
            let mut n = 2usize;
            if v5 {
                lens.props = props::len(&u.properties, props::ACK)?;
                n += props_field(lens.props);
                n = n.saturating_add(u.codes.len());
            }
            n
        }
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) => {
            if v5 {
                let (tail, p) = tail_len(d.code, &d.properties, props::DISCONNECT)?;
                lens.props = p;
                tail
            } else {
                0
            }
        }
        Packet::Auth(a) => {
            if !v5 {
                return Err(EncodeError::Invalid("AUTH does not exist in MQTT 3.1.1"));
            }
            let (tail, p) = tail_len(a.code, &a.properties, props::AUTH)?;
            lens.props = p;
            tail
        }
    };
    if remaining > VARINT_MAX as usize {
        return Err(EncodeError::TooLarge(
            "remaining length above 268,435,455 bytes",
        ));
    }
    lens.remaining = remaining;
    Ok(lens)
}

/// The remaining length of a CONNECT, its property lengths into `lens`.
fn measure_connect(
    c: &Connect,
    version: ProtocolVersion,
    lens: &mut Lens,
) -> Result<usize, EncodeError> {
    let v5 = version == ProtocolVersion::V5;
    if c.protocol != version {
        return Err(EncodeError::Invalid(
            "CONNECT names a protocol version other than the one it is encoded for",
        ));
    }
    if !v5 && c.password.is_some() && c.username.is_none() {
        return Err(EncodeError::Invalid(
            "an MQTT 3.1.1 CONNECT cannot carry a password without a user name",
        ));
    }
    // Protocol name, level, flags, keep alive.
    let mut n = 6 + 1 + 1 + 2;
    if v5 {
        lens.props = props::len(&c.properties, props::CONNECT)?;
        n += props_field(lens.props);
    }
    n += wire::str_len(&c.client_id)?;
    if let Some(w) = &c.will {
        if v5 {
            lens.will_props = props::len(&w.properties, props::WILL)?;
            n += props_field(lens.will_props);
        }
        n += wire::str_len(&w.topic)? + wire::bin_len(&w.payload)?;
    }
    if let Some(u) = &c.username {
        n += wire::str_len(u)?;
    }
    if let Some(p) = &c.password {
        n += wire::bin_len(p)?;
    }
    Ok(n)
}

/// The remaining length of a PUBLISH, its property length into `lens`.
fn measure_publish(p: &Publish, v5: bool, lens: &mut Lens) -> Result<usize, EncodeError> {
    match (p.qos, p.packet_id) {
        (QoS::AtMostOnce, Some(_)) => {
            return Err(EncodeError::Invalid(
                "QoS 0 PUBLISH with a packet identifier",
            ));
        }
        (QoS::AtLeastOnce | QoS::ExactlyOnce, None | Some(0)) => {
            return Err(EncodeError::Invalid(
                "QoS 1 or 2 PUBLISH without a non-zero packet identifier",
            ));
        }
        _ => {}
    }
    if p.dup && p.qos == QoS::AtMostOnce {
        return Err(EncodeError::Invalid(
            "QoS 0 PUBLISH with the DUP flag [MQTT-3.3.1-2]",
        ));
    }
    let mut n = wire::str_len(&p.topic)?;
    if p.packet_id.is_some() {
        n += 2;
    }
    if v5 {
        lens.props = props::len(&p.properties, props::PUBLISH)?;
        n += props_field(lens.props);
    }
    Ok(n.saturating_add(p.payload.len()))
}

/// The first header byte: packet type and flags.
fn first_byte(packet: &Packet) -> u8 {
    let flags = match packet {
        Packet::Publish(p) => (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain),
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
        _ => 0,
    };
    (packet.packet_type() << 4) | flags
}

fn write(packet: &Packet, version: ProtocolVersion, lens: Lens, buf: &mut BytesMut) {
    let v5 = version == ProtocolVersion::V5;
    buf.put_u8(first_byte(packet));
    wire::put_varint(buf, lens.remaining);
    match packet {
        Packet::Connect(c) => {
            wire::put_str(buf, "MQTT");
            buf.put_u8(version.level());
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 0x02;
            }
            if let Some(w) = &c.will {
                flags |= 0x04 | ((w.qos as u8) << 3);
                if w.retain {
                    flags |= 0x20;
                }
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            buf.put_u8(flags);
            buf.put_u16(c.keep_alive);
            if v5 {
                props::put(buf, &c.properties, lens.props);
            }
            wire::put_str(buf, &c.client_id);
            if let Some(w) = &c.will {
                if v5 {
                    props::put(buf, &w.properties, lens.will_props);
                }
                wire::put_str(buf, &w.topic);
                wire::put_bin(buf, &w.payload);
            }
            if let Some(u) = &c.username {
                wire::put_str(buf, u);
            }
            if let Some(p) = &c.password {
                wire::put_bin(buf, p);
            }
        }
        Packet::ConnAck(c) => {
            buf.put_u8(u8::from(c.session_present));
            if v5 {
                buf.put_u8(c.code.0);
                props::put(buf, &c.properties, lens.props);
            } else {
                buf.put_u8(c.code.to_v311_connack());
            }
        }
        Packet::Publish(p) => {
            wire::put_str(buf, &p.topic);
            if let Some(id) = p.packet_id {
                buf.put_u16(id);
            }
            if v5 {
                props::put(buf, &p.properties, lens.props);
            }
            buf.put_slice(&p.payload);
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            buf.put_u16(a.packet_id);
            if v5 {
                put_tail(buf, a.code, &a.properties, lens);
            }
        }
        Packet::Subscribe(s) => {
            buf.put_u16(s.packet_id);
            if v5 {
                props::put(buf, &s.properties, lens.props);
            }
            for sub in &s.subscriptions {
                wire::put_str(buf, &sub.filter);
                let o = &sub.options;
                let mut byte = o.qos as u8;
                if v5 {
                    byte |= (u8::from(o.no_local) << 2)
                        | (u8::from(o.retain_as_published) << 3)
                        | ((o.retain_handling as u8) << 4);
                }
                buf.put_u8(byte);
            }
        }
        Packet::SubAck(s) => {
            buf.put_u16(s.packet_id);
            if v5 {
                props::put(buf, &s.properties, lens.props);
                for c in &s.codes {
                    buf.put_u8(c.0);
                }
            } else {
                for &c in &s.codes {
                    buf.put_u8(c.to_v311_suback());
                }
            }
        }
        Packet::Unsubscribe(u) => {
            buf.put_u16(u.packet_id);
            if v5 {
                props::put(buf, &u.properties, lens.props);
            }
            for f in &u.filters {
                wire::put_str(buf, f);
            }
        }
        Packet::UnsubAck(u) => {
            buf.put_u16(u.packet_id);
            if v5 {
                props::put(buf, &u.properties, lens.props);
                for c in &u.codes {
                    buf.put_u8(c.0);
                }
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => {
            if v5 {
                put_tail(buf, d.code, &d.properties, lens);
            }
        }
        Packet::Auth(a) => put_tail(buf, a.code, &a.properties, lens),
    }
}

/// Appends `packet`, encoded for `version`, to `buf`. v5-only content (properties, reason
/// codes) is left out for v3.1.1; v5 reason codes of CONNACK and SUBACK are mapped to their
/// v3.1.1 return codes.
///
/// CONNACK in v3.1.1: codes 0..=5 are written as they are (v3.1.1 return codes); 0x84 -> 1,
/// 0x85 -> 2, 0x86 -> 4, 0x87/0x8A/0x8C -> 5, every other failure -> 3 (server unavailable).
/// SUBACK in v3.1.1: 0..=2 as they are, anything else -> 0x80.
///
/// Fails, leaving `buf` untouched, when the packet cannot be expressed: a string over 65,535
/// bytes, a packet over the remaining-length limit, a property the packet type may not carry,
/// AUTH in v3.1.1, a CONNECT whose `protocol` differs from `version`, a PUBLISH whose packet
/// identifier does not match its QoS, an empty SUBSCRIBE or UNSUBSCRIBE.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let lens = measure(packet, version)?;
    let total = 1 + wire::varint_len(lens.remaining) + lens.remaining;
    buf.reserve(total);
    let start = buf.len();
    write(packet, version, lens, buf);
    debug_assert_eq!(
        buf.len() - start,
        total,
        "measured and written lengths differ"
    );
    Ok(())
}

/// The number of bytes [`encode`] would write, so that a sender can honour the peer's
/// maximum packet size without encoding first.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let lens = measure(packet, version)?;
    Ok(1 + wire::varint_len(lens.remaining) + lens.remaining)
}
