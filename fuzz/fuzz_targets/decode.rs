//! Fuzz target: arbitrary bytes through `frame_len` and `decode` for both protocol versions.
//! Nothing may panic; an incomplete frame leaves the buffer alone; a decoded packet consumes
//! exactly `frame_len` bytes and re-encodes (with `encoded_len` agreeing) to bytes that
//! decode to the same packet.
#![no_main]

use beckon_mqtt::{Packet, ProtocolVersion, decode, encode, encoded_len, frame_len};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8], version: ProtocolVersion, max: u32) {
    let mut buf = BytesMut::from(data);
    // Several frames may follow one another; decode until the buffer runs dry or fails.
    for _ in 0..16 {
        let before = buf.clone();
        let framed = frame_len(&buf, max);
        match decode(&mut buf, version, max) {
            Ok(None) => {
                assert_eq!(buf, before, "an incomplete frame changed the buffer");
                return;
            }
            Err(e) => {
                assert!(matches!(
                    e.reason_code().0,
                    0x81 | 0x82 | 0x84 | 0x90 | 0x95
                ));
                return;
            }
            Ok(Some(packet)) => {
                let consumed = before.len() - buf.len();
                assert_eq!(framed, Ok(Some(consumed)), "decode and frame_len disagree");
                roundtrip(&packet, version);
            }
        }
    }
}

fn roundtrip(packet: &Packet, connection: ProtocolVersion) {
    let version = match packet {
        Packet::Connect(c) => c.protocol,
        _ => connection,
    };
    let mut out = BytesMut::new();
    if let Err(e) = encode(packet, version, &mut out) {
        panic!("decoded packet does not re-encode: {e}: {packet:?}");
    }
    assert_eq!(
        encoded_len(packet, version),
        Ok(out.len()),
        "encoded_len is wrong"
    );
    let bytes = out.clone();
    match decode(&mut out, version, u32::MAX) {
        Ok(Some(again)) => {
            assert_eq!(
                &again,
                packet,
                "re-encoding {:02x?} decodes differently",
                &bytes[..]
            );
            assert!(out.is_empty(), "re-encoding left bytes behind");
        }
        other => panic!(
            "re-encoding {:02x?} of {packet:?} decodes to {other:?}",
            &bytes[..]
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        check(data, version, u32::MAX);
    }
    // A limit inside the input's size exercises the packet-too-large path.
    let small = u32::try_from(data.len() / 2).unwrap_or(u32::MAX);
    check(data, ProtocolVersion::V5, small);
});
