//! MQTT 5 properties: per-packet allow-lists, decoding with the value checks the spec makes
//! mandatory, length computation and encoding.

use bytes::{BufMut, BytesMut};

use crate::wire::{self, Reader, VARINT_MAX};
use crate::{DecodeError, EncodeError, Properties};

const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION_DATA: u8 = 0x09;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
const SERVER_KEEP_ALIVE: u8 = 0x13;
const AUTHENTICATION_METHOD: u8 = 0x15;
const AUTHENTICATION_DATA: u8 = 0x16;
const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
const WILL_DELAY_INTERVAL: u8 = 0x18;
const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
const RESPONSE_INFORMATION: u8 = 0x1A;
const SERVER_REFERENCE: u8 = 0x1C;
const REASON_STRING: u8 = 0x1F;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const TOPIC_ALIAS: u8 = 0x23;
const MAXIMUM_QOS: u8 = 0x24;
const RETAIN_AVAILABLE: u8 = 0x25;
const USER_PROPERTY: u8 = 0x26;
const MAXIMUM_PACKET_SIZE: u8 = 0x27;
const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;

/// The properties a packet may carry (MQTT 5 section 2.2.2.2), as a bit set of identifiers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Allowed {
    mask: u64,
    /// PUBLISH may repeat the Subscription Identifier; everywhere else it is single.
    multi_subscription_id: bool,
}

const fn mask(ids: &[u8]) -> u64 {
    let mut m = 0u64;
    let mut i = 0;
    while i < ids.len() {
        m |= 1u64 << ids[i];
        i += 1;
    }
    m
}

const fn allowed(ids: &[u8]) -> Allowed {
    Allowed {
        mask: mask(ids),
        multi_subscription_id: false,
    }
}

pub(crate) const CONNECT: Allowed = allowed(&[
    SESSION_EXPIRY_INTERVAL,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    REQUEST_PROBLEM_INFORMATION,
    REQUEST_RESPONSE_INFORMATION,
    RECEIVE_MAXIMUM,
    TOPIC_ALIAS_MAXIMUM,
    USER_PROPERTY,
    MAXIMUM_PACKET_SIZE,
]);
pub(crate) const WILL: Allowed = allowed(&[
    PAYLOAD_FORMAT_INDICATOR,
    MESSAGE_EXPIRY_INTERVAL,
    CONTENT_TYPE,
    RESPONSE_TOPIC,
    CORRELATION_DATA,
    WILL_DELAY_INTERVAL,
    USER_PROPERTY,
]);
pub(crate) const CONNACK: Allowed = allowed(&[
    SESSION_EXPIRY_INTERVAL,
    ASSIGNED_CLIENT_IDENTIFIER,
    SERVER_KEEP_ALIVE,
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    RESPONSE_INFORMATION,
    SERVER_REFERENCE,
    REASON_STRING,
    RECEIVE_MAXIMUM,
    TOPIC_ALIAS_MAXIMUM,
    MAXIMUM_QOS,
    RETAIN_AVAILABLE,
    USER_PROPERTY,
    MAXIMUM_PACKET_SIZE,
    WILDCARD_SUBSCRIPTION_AVAILABLE,
    SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    SHARED_SUBSCRIPTION_AVAILABLE,
]);
pub(crate) const PUBLISH: Allowed = Allowed {
    mask: mask(&[
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        SUBSCRIPTION_IDENTIFIER,
        TOPIC_ALIAS,
        USER_PROPERTY,
    ]),
    multi_subscription_id: true,
};
/// PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK and UNSUBACK.
pub(crate) const ACK: Allowed = allowed(&[REASON_STRING, USER_PROPERTY]);
pub(crate) const SUBSCRIBE: Allowed = allowed(&[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY]);
pub(crate) const UNSUBSCRIBE: Allowed = allowed(&[USER_PROPERTY]);
pub(crate) const DISCONNECT: Allowed = allowed(&[
    SESSION_EXPIRY_INTERVAL,
    SERVER_REFERENCE,
    REASON_STRING,
    USER_PROPERTY,
]);
pub(crate) const AUTH: Allowed = allowed(&[
    AUTHENTICATION_METHOD,
    AUTHENTICATION_DATA,
    REASON_STRING,
    USER_PROPERTY,
]);

/// A byte property that may only be 0 or 1.
fn flag(r: &mut Reader<'_>, what: &'static str) -> Result<u8, DecodeError> {
    match r.u8()? {
        v @ (0 | 1) => Ok(v),
        _ => Err(DecodeError::Protocol(what)),
    }
}

/// Reads a property length and the properties it covers, rejecting what the packet may not
/// carry (Malformed, section 2.2.2.2), duplicates (Protocol Error) and forbidden values.
pub(crate) fn decode(r: &mut Reader<'_>, allowed: Allowed) -> Result<Properties, DecodeError> {
    let len = r.varint()?;
    let mut r = r.sub(len as usize)?;
    let mut p = Properties::default();
    if r.is_empty() {
        return Ok(p);
    }
    let mut seen = 0u64;
    while !r.is_empty() {
        let id = r.varint()?;
        let bit = if id < 64 { 1u64 << id } else { 0 };
        if allowed.mask & bit == 0 {
            return Err(DecodeError::Malformed(
                "property identifier not allowed in this packet (section 2.2.2.2)",
            ));
        }
        // `allowed` only holds ids below 64, so `id` fits a u8 here.
        let id = id as u8;
        let repeatable =
            id == USER_PROPERTY || (id == SUBSCRIPTION_IDENTIFIER && allowed.multi_subscription_id);
        if seen & bit != 0 && !repeatable {
            return Err(DecodeError::Protocol(
                "property included more than once (section 2.2.2.2)",
            ));
        }
        seen |= bit;
        match id {
            PAYLOAD_FORMAT_INDICATOR => {
                p.payload_format_indicator =
                    Some(flag(&mut r, "payload format indicator is not 0 or 1")?);
            }
            MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(r.u32()?),
            CONTENT_TYPE => p.content_type = Some(r.string()?),
            RESPONSE_TOPIC => {
                let topic = r.str()?;
                if topic.is_empty() || topic.bytes().any(|b| b == b'+' || b == b'#') {
                    return Err(DecodeError::Protocol(
                        "response topic is empty or contains wildcards [MQTT-3.3.2-14]",
                    ));
                }
                p.response_topic = Some(topic.to_owned());
            }
            CORRELATION_DATA => p.correlation_data = Some(r.binary()?),
            SUBSCRIPTION_IDENTIFIER => {
                let v = r.varint()?;
                if v == 0 {
                    return Err(DecodeError::Protocol(
                        "subscription identifier 0 (section 3.8.2.1.2)",
                    ));
                }
                p.subscription_identifiers.push(v);
            }
            SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(r.u32()?),
            ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(r.string()?),
            SERVER_KEEP_ALIVE => p.server_keep_alive = Some(r.u16()?),
            AUTHENTICATION_METHOD => p.authentication_method = Some(r.string()?),
            AUTHENTICATION_DATA => p.authentication_data = Some(r.binary()?),
            REQUEST_PROBLEM_INFORMATION => {
                p.request_problem_information =
                    Some(flag(&mut r, "request problem information is not 0 or 1")?);
            }
            WILL_DELAY_INTERVAL => p.will_delay_interval = Some(r.u32()?),
            REQUEST_RESPONSE_INFORMATION => {
                p.request_response_information =
                    Some(flag(&mut r, "request response information is not 0 or 1")?);
            }
            RESPONSE_INFORMATION => p.response_information = Some(r.string()?),
            SERVER_REFERENCE => p.server_reference = Some(r.string()?),
            REASON_STRING => p.reason_string = Some(r.string()?),
            RECEIVE_MAXIMUM => {
                let v = r.u16()?;
                if v == 0 {
                    return Err(DecodeError::Protocol(
                        "receive maximum 0 (section 3.1.2.11.3)",
                    ));
                }
                p.receive_maximum = Some(v);
            }
            TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(r.u16()?),
            TOPIC_ALIAS => {
                let v = r.u16()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("topic alias 0 [MQTT-3.3.2-8]"));
                }
                p.topic_alias = Some(v);
            }
            MAXIMUM_QOS => p.maximum_qos = Some(flag(&mut r, "maximum QoS is not 0 or 1")?),
            RETAIN_AVAILABLE => {
                p.retain_available = Some(flag(&mut r, "retain available is not 0 or 1")?);
            }
            USER_PROPERTY => {
                let key = r.string()?;
                let value = r.string()?;
                p.user_properties.push((key, value));
            }
            MAXIMUM_PACKET_SIZE => {
                let v = r.u32()?;
                if v == 0 {
                    return Err(DecodeError::Protocol(
                        "maximum packet size 0 (section 3.1.2.11.4)",
                    ));
                }
                p.maximum_packet_size = Some(v);
            }
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                p.wildcard_subscription_available = Some(flag(
                    &mut r,
                    "wildcard subscription available is not 0 or 1",
                )?);
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                p.subscription_identifier_available = Some(flag(
                    &mut r,
                    "subscription identifier available is not 0 or 1",
                )?);
            }
            SHARED_SUBSCRIPTION_AVAILABLE => {
                p.shared_subscription_available =
                    Some(flag(&mut r, "shared subscription available is not 0 or 1")?);
            }
            _ => {
                return Err(DecodeError::Malformed("unknown property identifier"));
            }
        }
    }
    if p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(DecodeError::Protocol(
            "authentication data without authentication method (section 3.1.2.11.10)",
        ));
    }
    Ok(p)
}

fn check(allowed: Allowed, id: u8) -> Result<(), EncodeError> {
    if allowed.mask & (1u64 << id) == 0 {
        return Err(EncodeError::Invalid(
            "a property is set that this packet type may not carry",
        ));
    }
    Ok(())
}

/// Length of the property list (without its own length prefix). Also checks what the encoder
/// cannot write: a property this packet may not carry, an out-of-range subscription
/// identifier, over-long strings.
pub(crate) fn len(p: &Properties, allowed: Allowed) -> Result<usize, EncodeError> {
    let mut n = 0usize;
    if p.payload_format_indicator.is_some() {
        check(allowed, PAYLOAD_FORMAT_INDICATOR)?;
        n += 2;
    }
    if p.message_expiry_interval.is_some() {
        check(allowed, MESSAGE_EXPIRY_INTERVAL)?;
        n += 5;
    }
    if let Some(s) = &p.content_type {
        check(allowed, CONTENT_TYPE)?;
        n += 1 + wire::str_len(s)?;
    }
    if let Some(s) = &p.response_topic {
        check(allowed, RESPONSE_TOPIC)?;
        n += 1 + wire::str_len(s)?;
    }
    if let Some(b) = &p.correlation_data {
        check(allowed, CORRELATION_DATA)?;
        n += 1 + wire::bin_len(b)?;
    }
    if !p.subscription_identifiers.is_empty() {
        check(allowed, SUBSCRIPTION_IDENTIFIER)?;
        if !allowed.multi_subscription_id && p.subscription_identifiers.len() > 1 {
            return Err(EncodeError::Invalid(
                "SUBSCRIBE carries at most one subscription identifier",
            ));
        }
        for &id in &p.subscription_identifiers {
            if id == 0 || id > VARINT_MAX {
                return Err(EncodeError::Invalid(
                    "subscription identifier outside 1..=268,435,455",
                ));
            }
            n += 1 + wire::varint_len(id as usize);
        }
    }
    if p.session_expiry_interval.is_some() {
        check(allowed, SESSION_EXPIRY_INTERVAL)?;
        n += 5;
    }
    if let Some(s) = &p.assigned_client_identifier {
        check(allowed, ASSIGNED_CLIENT_IDENTIFIER)?;
        n += 1 + wire::str_len(s)?;
    }
    if p.server_keep_alive.is_some() {
        check(allowed, SERVER_KEEP_ALIVE)?;
        n += 3;
    }
    if let Some(s) = &p.authentication_method {
        check(allowed, AUTHENTICATION_METHOD)?;
        n += 1 + wire::str_len(s)?;
    }
    if let Some(b) = &p.authentication_data {
        check(allowed, AUTHENTICATION_DATA)?;
        n += 1 + wire::bin_len(b)?;
    }
    if p.request_problem_information.is_some() {
        check(allowed, REQUEST_PROBLEM_INFORMATION)?;
        n += 2;
    }
    if p.will_delay_interval.is_some() {
        check(allowed, WILL_DELAY_INTERVAL)?;
        n += 5;
    }
    if p.request_response_information.is_some() {
        check(allowed, REQUEST_RESPONSE_INFORMATION)?;
        n += 2;
    }
    if let Some(s) = &p.response_information {
        check(allowed, RESPONSE_INFORMATION)?;
        n += 1 + wire::str_len(s)?;
    }
    if let Some(s) = &p.server_reference {
        check(allowed, SERVER_REFERENCE)?;
        n += 1 + wire::str_len(s)?;
    }
    if let Some(s) = &p.reason_string {
        check(allowed, REASON_STRING)?;
        n += 1 + wire::str_len(s)?;
    }
    if p.receive_maximum.is_some() {
        check(allowed, RECEIVE_MAXIMUM)?;
        n += 3;
    }
    if p.topic_alias_maximum.is_some() {
        check(allowed, TOPIC_ALIAS_MAXIMUM)?;
        n += 3;
    }
    if p.topic_alias.is_some() {
        check(allowed, TOPIC_ALIAS)?;
        n += 3;
    }
    if p.maximum_qos.is_some() {
        check(allowed, MAXIMUM_QOS)?;
        n += 2;
    }
    if p.retain_available.is_some() {
        check(allowed, RETAIN_AVAILABLE)?;
        n += 2;
    }
    if !p.user_properties.is_empty() {
        check(allowed, USER_PROPERTY)?;
        for (k, v) in &p.user_properties {
            n = n.saturating_add(1 + wire::str_len(k)? + wire::str_len(v)?);
        }
    }
    if p.maximum_packet_size.is_some() {
        check(allowed, MAXIMUM_PACKET_SIZE)?;
        n += 5;
    }
    if p.wildcard_subscription_available.is_some() {
        check(allowed, WILDCARD_SUBSCRIPTION_AVAILABLE)?;
        n += 2;
    }
    if p.subscription_identifier_available.is_some() {
        check(allowed, SUBSCRIPTION_IDENTIFIER_AVAILABLE)?;
        n += 2;
    }
    if p.shared_subscription_available.is_some() {
        check(allowed, SHARED_SUBSCRIPTION_AVAILABLE)?;
        n += 2;
    }
    if n > VARINT_MAX as usize {
        return Err(EncodeError::TooLarge(
            "properties longer than 268,435,455 bytes",
        ));
    }
    Ok(n)
}

/// Writes the property length `len` (from [`len`]) and the properties, in identifier order
/// (user properties and subscription identifiers in their own order).
pub(crate) fn put(buf: &mut BytesMut, p: &Properties, len: usize) {
    wire::put_varint(buf, len);
    if len == 0 {
        return;
    }
    let byte = |buf: &mut BytesMut, id: u8, v: Option<u8>| {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u8(v);
        }
    };
    let two = |buf: &mut BytesMut, id: u8, v: Option<u16>| {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u16(v);
        }
    };
    let four = |buf: &mut BytesMut, id: u8, v: Option<u32>| {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u32(v);
        }
    };
    let string = |buf: &mut BytesMut, id: u8, v: &Option<String>| {
        if let Some(v) = v {
            buf.put_u8(id);
            wire::put_str(buf, v);
        }
    };
    let binary = |buf: &mut BytesMut, id: u8, v: &Option<bytes::Bytes>| {
        if let Some(v) = v {
            buf.put_u8(id);
            wire::put_bin(buf, v);
        }
    };
    byte(buf, PAYLOAD_FORMAT_INDICATOR, p.payload_format_indicator);
    four(buf, MESSAGE_EXPIRY_INTERVAL, p.message_expiry_interval);
    string(buf, CONTENT_TYPE, &p.content_type);
    string(buf, RESPONSE_TOPIC, &p.response_topic);
    binary(buf, CORRELATION_DATA, &p.correlation_data);
    for &id in &p.subscription_identifiers {
        buf.put_u8(SUBSCRIPTION_IDENTIFIER);
        wire::put_varint(buf, id as usize);
    }
    four(buf, SESSION_EXPIRY_INTERVAL, p.session_expiry_interval);
    string(
        buf,
        ASSIGNED_CLIENT_IDENTIFIER,
        &p.assigned_client_identifier,
    );
    two(buf, SERVER_KEEP_ALIVE, p.server_keep_alive);
    string(buf, AUTHENTICATION_METHOD, &p.authentication_method);
    binary(buf, AUTHENTICATION_DATA, &p.authentication_data);
    byte(
        buf,
        REQUEST_PROBLEM_INFORMATION,
        p.request_problem_information,
    );
    four(buf, WILL_DELAY_INTERVAL, p.will_delay_interval);
    byte(
        buf,
        REQUEST_RESPONSE_INFORMATION,
        p.request_response_information,
    );
    string(buf, RESPONSE_INFORMATION, &p.response_information);
    string(buf, SERVER_REFERENCE, &p.server_reference);
    string(buf, REASON_STRING, &p.reason_string);
    two(buf, RECEIVE_MAXIMUM, p.receive_maximum);
    two(buf, TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    two(buf, TOPIC_ALIAS, p.topic_alias);
    byte(buf, MAXIMUM_QOS, p.maximum_qos);
    byte(buf, RETAIN_AVAILABLE, p.retain_available);
    for (k, v) in &p.user_properties {
        buf.put_u8(USER_PROPERTY);
        wire::put_str(buf, k);
        wire::put_str(buf, v);
    }
    four(buf, MAXIMUM_PACKET_SIZE, p.maximum_packet_size);
    byte(
        buf,
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        p.wildcard_subscription_available,
    );
    byte(
        buf,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        p.subscription_identifier_available,
    );
    byte(
        buf,
        SHARED_SUBSCRIPTION_AVAILABLE,
        p.shared_subscription_available,
    );
}
