//! Shared by the integration tests: the table of hand-encoded vectors and small helpers.
#![allow(dead_code)]

pub mod strategies;
pub mod vectors;

use beckon_mqtt::{DecodeError, Packet, ProtocolVersion, decode, encode};
use bytes::BytesMut;

/// Parses "10 0c 00 04" style hex (spaces and newlines ignored).
pub fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    assert!(
        digits.len().is_multiple_of(2),
        "odd number of hex digits in {s:?}"
    );
    digits
        .chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).expect("hex digits are ASCII");
            u8::from_str_radix(text, 16).expect("hex digits")
        })
        .collect()
}

/// Decodes exactly one packet from `bytes`, failing if bytes are left over or the frame is
/// incomplete.
pub fn decode_one(bytes: &[u8], version: ProtocolVersion) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    match decode(&mut buf, version, u32::MAX)? {
        Some(p) => {
            assert!(buf.is_empty(), "decode left {} bytes behind", buf.len());
            Ok(p)
        }
        None => panic!("decode wants more bytes for a complete vector: {bytes:02x?}"),
    }
}

/// Our encoding of a valid packet (for comparing with an oracle's).
pub fn our_encode(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).expect("valid packet encodes");
    buf.to_vec()
}

/// Our decoding of `bytes`, the error as text (for comparing with an oracle's).
pub fn our_decode(bytes: &[u8], version: ProtocolVersion) -> Result<Option<Packet>, String> {
    decode(&mut BytesMut::from(bytes), version, u32::MAX).map_err(|e| e.to_string())
}
