//! An application message as the broker keeps it between receipt and delivery, and the size
//! of the PUBLISH that carries it.

use std::time::{Duration, Instant};

use beckon_mqtt::{Properties, ProtocolVersion, Publish, QoS};
use bytes::Bytes;

/// One application message, shared (behind an `Arc`) by every session it is routed to and
/// by the retained store.
#[derive(Debug)]
pub(crate) struct Message {
    /// Topic name (an inbound topic alias is already resolved).
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS it was published with.
    pub qos: QoS,
    /// RETAIN flag it was published with.
    pub retain: bool,
    /// Properties passed through to subscribers unchanged: payload format indicator, content
    /// type, response topic, correlation data, user properties. The message expiry interval
    /// is kept as [`Message::expires_at`] and rewritten for every delivery.
    pub properties: Properties,
    /// When the message expires (v5 Message Expiry Interval), if ever.
    pub expires_at: Option<Instant>,
    /// A message from another node whose origin waits to hear that a client acknowledged it
    /// (see [`beckon_cluster::Receipt`]).
    /// Boxed: every retained message of the cluster is a `Message`, few carry one.
    pub receipt: Option<Box<beckon_cluster::Receipt>>,
}

impl Message {
    /// A message from a received PUBLISH (or will), received at `now`.
    pub fn new(
        now: Instant,
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        mut properties: Properties,
    ) -> Self {
        // Changed without allocating a property set where the publish brought none.
        let mut expires_at = None;
        if let Some(set) = properties.existing_mut() {
            expires_at = set
                .message_expiry_interval
                .take()
                .map(|secs| now + Duration::from_secs(u64::from(secs)));
            // Properties that belong to one hop, not to the message.
            set.topic_alias = None;
            set.subscription_identifiers = Vec::new();
            set.will_delay_interval = None;
        }
        properties.compact();
        Self {
            topic,
            payload,
            qos,
            retain,
            properties,
            expires_at,
            receipt: None,
        }
    }

    /// Whether the message has expired at `now` and must no longer be delivered.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// The PUBLISH that delivers this message at `now`, with the Message Expiry Interval
    /// reduced by the time the message waited in the broker (rounded up, so that a message
    /// that has not expired never announces 0). `None` when it has expired.
    pub fn to_publish(
        &self,
        now: Instant,
        qos: QoS,
        retain: bool,
        packet_id: Option<u16>,
        sub_ids: &[u32],
    ) -> Option<Publish> {
        let mut properties = self.properties.clone();
        if let Some(at) = self.expires_at {
            let left = at.checked_duration_since(now).filter(|d| !d.is_zero())?;
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            properties.message_expiry_interval = Some(u32::try_from(secs).unwrap_or(u32::MAX));
        }
        // Written only when there are some: a write allocates the property set.
        if !sub_ids.is_empty() {
            properties.subscription_identifiers = sub_ids.to_vec();
        }
        Some(Publish {
            dup: false,
            qos,
            retain,
            topic: self.topic.clone(),
            packet_id,
            payload: self.payload.clone(),
            properties,
        })
    }
}

/// Length of a Variable Byte Integer.
fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Bytes of the PUBLISH-relevant properties as the encoder writes them (identifier byte
/// plus value for each property present).
fn publish_properties_len(p: &Properties) -> usize {
    let mut len = 0;
    if p.payload_format_indicator.is_some() {
        len += 2;
    }
    if p.message_expiry_interval.is_some() {
        len += 5;
    }
    if let Some(s) = &p.content_type {
        len += 3 + s.len();
    }
    if let Some(s) = &p.response_topic {
        len += 3 + s.len();
    }
    if let Some(b) = &p.correlation_data {
        len += 3 + b.len();
    }
    for &id in &p.subscription_identifiers {
        len += 1 + varint_len(id as usize);
    }
    if p.topic_alias.is_some() {
        len += 3;
    }
    for (k, v) in &p.user_properties {
        len += 1 + 2 + k.len() + 2 + v.len();
    }
    len
}

/// The size of `publish` on the wire for `version`, fixed header included, so that a client's
/// Maximum Packet Size is honoured without encoding.
pub(crate) fn publish_len(publish: &Publish, version: ProtocolVersion) -> usize {
    let mut remaining = 2 + publish.topic.len() + publish.payload.len();
    if publish.qos != QoS::AtMostOnce {
        remaining += 2;
    }
    if version == ProtocolVersion::V5 {
        let props = publish_properties_len(&publish.properties);
        remaining += varint_len(props) + props;
    }
    1 + varint_len(remaining) + remaining
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_reduced_by_waiting_time_and_rounded_up() {
        let t0 = Instant::now();
        let props = Properties::from(beckon_mqtt::PropertySet {
            message_expiry_interval: Some(10),
            ..Default::default()
        });
        let m = Message::new(t0, "t".into(), Bytes::new(), QoS::AtLeastOnce, false, props);
        let p = m
            .to_publish(
                t0 + Duration::from_millis(3500),
                QoS::AtLeastOnce,
                false,
                Some(1),
                &[],
            )
            .expect("not expired");
        assert_eq!(p.properties.message_expiry_interval, Some(7));
        assert!(
            m.to_publish(
                t0 + Duration::from_secs(10),
                QoS::AtLeastOnce,
                false,
                Some(1),
                &[]
            )
            .is_none()
        );
        assert!(m.is_expired(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn publish_len_counts_every_part() {
        let mut p = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "a/b".into(),
            packet_id: None,
            payload: Bytes::from_static(b"hello"),
            properties: Properties::default(),
        };
        // 1 header + 1 length + (2 + 3 topic) + 5 payload = 12 in v3.1.1; +1 property length in v5.
        assert_eq!(publish_len(&p, ProtocolVersion::V311), 12);
        assert_eq!(publish_len(&p, ProtocolVersion::V5), 13);
        p.qos = QoS::AtLeastOnce;
        p.packet_id = Some(7);
        p.properties.subscription_identifiers = vec![1, 200];
        p.properties.user_properties = vec![("k".into(), "vv".into())];
        // + 2 packet id; properties: (1+1) + (1+2) + (1+2+1+2+2) = 13, + 1 length byte already
        // counted in the 13 above.
        assert_eq!(publish_len(&p, ProtocolVersion::V5), 13 + 2 + 13);
        p.payload = Bytes::from(vec![0u8; 200]);
        // Remaining length grows past 127: two length bytes.
        assert_eq!(
            publish_len(&p, ProtocolVersion::V311),
            1 + 2 + 2 + 3 + 2 + 200
        );
    }

    proptest::proptest! {
        #[test]
        fn publish_len_agrees_with_the_encoder(
            topic in "[a-z/]{1,40}",
            payload_len in 0usize..70_000,
            qos in 0u8..3,
            expiry in proptest::option::of(proptest::num::u32::ANY),
            sub_ids in proptest::collection::vec(1u32..268_435_455, 0..4),
            user in proptest::collection::vec(("[a-z]{0,10}", "[a-z]{0,300}"), 0..3),
            content_type in proptest::option::of("[a-z/]{0,20}"),
            correlation in proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..20)),
        ) {
            let qos = QoS::from_u8(qos).unwrap_or_default();
            let publish = Publish {
                dup: false,
                qos,
                retain: false,
                topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(1),
                payload: Bytes::from(vec![7u8; payload_len]),
                properties: Properties::from(beckon_mqtt::PropertySet {
                    message_expiry_interval: expiry,
                    subscription_identifiers: sub_ids,
                    user_properties: user,
                    content_type,
                    correlation_data: correlation.map(Bytes::from),
                    payload_format_indicator: Some(1),
                    ..Default::default()
                }),
            };
            let packet = beckon_mqtt::Packet::Publish(publish.clone());
            for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
                let encoded = beckon_mqtt::encoded_len(&packet, version).expect("encodable");
                proptest::prop_assert_eq!(publish_len(&publish, version), encoded);
            }
        }
    }
}
