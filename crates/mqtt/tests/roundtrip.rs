//! Property tests: valid packets survive encode -> decode unchanged, and no input makes the
//! decoder panic; whatever it accepts re-encodes to bytes that decode to the same packet.

mod common;

use beckon_mqtt::{Packet, ProtocolVersion, decode, encode, encoded_len, frame_len};
use bytes::BytesMut;
use common::strategies::{packet, versioned_packet};
use proptest::prelude::*;

fn version_of(packet: &Packet, connection: ProtocolVersion) -> ProtocolVersion {
    match packet {
        Packet::Connect(c) => c.protocol,
        _ => connection,
    }
}

/// Decodes `bytes` as a connection of `version` would, with `max` as the limit, and checks the
/// contract: no panic, an incomplete frame leaves the buffer alone, a decoded packet consumed
/// exactly `frame_len` bytes and re-encodes to something that decodes to the same packet.
fn decode_checked(bytes: &[u8], version: ProtocolVersion, max: u32) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(bytes);
    let framed = frame_len(bytes, max);
    match decode(&mut buf, version, max) {
        Ok(None) => {
            prop_assert_eq!(
                &buf[..],
                bytes,
                "incomplete frame must leave the buffer alone"
            );
        }
        Ok(Some(p)) => {
            let consumed = bytes.len() - buf.len();
            prop_assert_eq!(framed, Ok(Some(consumed)));
            let v = version_of(&p, version);
            let mut again = BytesMut::new();
            encode(&p, v, &mut again)
                .map_err(|e| TestCaseError::fail(format!("{p:?} does not re-encode: {e}")))?;
            prop_assert_eq!(encoded_len(&p, v), Ok(again.len()));
            let copy = again.clone();
            let back = decode(&mut again, v, u32::MAX);
            prop_assert_eq!(
                back,
                Ok(Some(p.clone())),
                "re-encoding {:02x?} of {:?}",
                &copy[..],
                p
            );
            prop_assert!(again.is_empty());
        }
        Err(e) => {
            // Every error maps to one of the five reason codes a decoder reports.
            prop_assert!(matches!(
                e.reason_code().0,
                0x81 | 0x82 | 0x84 | 0x90 | 0x95
            ));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn valid_packets_roundtrip((version, p) in versioned_packet()) {
        let mut buf = BytesMut::new();
        encode(&p, version, &mut buf).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(encoded_len(&p, version), Ok(buf.len()));
        prop_assert_eq!(frame_len(&buf, u32::MAX), Ok(Some(buf.len())));
        let bytes = buf.clone();
        let back = decode(&mut buf, version, u32::MAX);
        prop_assert_eq!(back, Ok(Some(p)), "bytes {:02x?}", &bytes[..]);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn v311_packets_roundtrip(p in packet(ProtocolVersion::V311)) {
        let mut buf = BytesMut::new();
        encode(&p, ProtocolVersion::V311, &mut buf).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(decode(&mut buf, ProtocolVersion::V311, u32::MAX), Ok(Some(p)));
    }

    #[test]
    fn packet_size_limit_is_exact((version, p) in versioned_packet()) {
        let len = encoded_len(&p, version).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let mut buf = BytesMut::new();
        encode(&p, version, &mut buf).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let limit = u32::try_from(len).map_err(|_| TestCaseError::reject("huge"))?;
        prop_assert!(decode(&mut buf.clone(), version, limit).is_ok());
        let err = decode(&mut buf, version, limit - 1).unwrap_err();
        prop_assert_eq!(err.reason_code().0, 0x95);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..64),
        v5 in any::<bool>(),
        max in prop_oneof![Just(u32::MAX), 0u32..80],
    ) {
        let version = if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V311 };
        decode_checked(&bytes, version, max)?;
    }

    /// Mutations of valid frames reach much deeper than random bytes: flip, insert, delete
    /// and overwrite bytes, then hold the decoder to its contract.
    #[test]
    fn mutated_valid_packets_never_panic(
        (version, p) in versioned_packet(),
        edits in proptest::collection::vec((0u8..4, any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = BytesMut::new();
        encode(&p, version, &mut bytes).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        let mut bytes = bytes.to_vec();
        for (op, at, value) in edits {
            let at = if bytes.is_empty() { 0 } else { at % bytes.len() };
            match op {
                0 if !bytes.is_empty() => bytes[at] ^= value | 1,
                1 => bytes.insert(at, value),
                2 if !bytes.is_empty() => { bytes.remove(at); }
                _ if !bytes.is_empty() => bytes[at] = value,
                _ => bytes.push(value),
            }
        }
        decode_checked(&bytes, version, u32::MAX)?;
        let other = if version == ProtocolVersion::V5 { ProtocolVersion::V311 } else { ProtocolVersion::V5 };
        decode_checked(&bytes, other, u32::MAX)?;
    }
}
