//! Prints how fast the codec decodes and encodes a typical small PUBLISH (a wake-up call) and
//! a PUBLISH with properties, in packets per second. A figure to watch, not a test:
//! `cargo run --release -p beckon-mqtt --example codec_speed`.

use std::hint::black_box;
use std::time::Instant;

use beckon_mqtt::{Packet, Properties, ProtocolVersion, Publish, QoS, decode, encode};
use bytes::{Bytes, BytesMut};

fn measure(name: &str, packet: &Packet, version: ProtocolVersion) {
    const ROUNDS: usize = 1_000;
    const BATCH: usize = 1_000;
    let mut one = BytesMut::new();
    if let Err(e) = encode(packet, version, &mut one) {
        eprintln!("{name}: cannot encode: {e}");
        return;
    }
    // Encoding: a batch of packets into one buffer, as a connection's writer does.
    let mut buf = BytesMut::with_capacity(one.len() * BATCH);
    let start = Instant::now();
    for _ in 0..ROUNDS {
        buf.clear();
        for _ in 0..BATCH {
            if encode(black_box(packet), version, &mut buf).is_err() {
                return;
            }
        }
    }
    let encode_rate = (ROUNDS * BATCH) as f64 / start.elapsed().as_secs_f64();
    // Decoding: the same batch back out of one buffer, as a connection's reader does.
    let batch = buf.clone().freeze();
    let start = Instant::now();
    let mut decoded = 0usize;
    for _ in 0..ROUNDS {
        let mut input = BytesMut::from(&batch[..]);
        while let Ok(Some(p)) = decode(&mut input, version, u32::MAX) {
            black_box(p);
            decoded += 1;
        }
    }
    let decode_rate = decoded as f64 / start.elapsed().as_secs_f64();
    println!(
        "{name:<34} {:>4} bytes  encode {:>10.0} packets/s  decode {:>10.0} packets/s",
        one.len(),
        encode_rate,
        decode_rate
    );
}

fn main() {
    let wake = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "t/acme/d/4f1c2a/wake".into(),
        packet_id: Some(17),
        payload: Bytes::from_static(br#"{"id":"01J9","ts":1732700000}"#),
        properties: Properties::default(),
    };
    let with_props = Publish {
        properties: Properties::from(beckon_mqtt::PropertySet {
            message_expiry_interval: Some(300),
            content_type: Some("application/json".into()),
            correlation_data: Some(Bytes::from_static(b"0123456789abcdef")),
            user_properties: vec![("tenant".into(), "acme".into())],
            ..Default::default()
        }),
        ..wake.clone()
    };
    println!(
        "beckon-mqtt codec speed (one core, {} packets per figure)",
        1_000_000
    );
    measure(
        "PUBLISH QoS 1, v3.1.1",
        &Packet::Publish(wake.clone()),
        ProtocolVersion::V311,
    );
    measure(
        "PUBLISH QoS 1, v5",
        &Packet::Publish(wake),
        ProtocolVersion::V5,
    );
    measure(
        "PUBLISH QoS 1, v5, 4 properties",
        &Packet::Publish(with_props),
        ProtocolVersion::V5,
    );
}
