//! What travels between nodes: application messages (a header and the MQTT 5 PUBLISH that
//! carries them, encoded by the broker's own codec, so that every property survives the hop),
//! client-id claims and heartbeats (small JSON documents).

use beckon_mqtt::{DecodeError, Packet, ProtocolVersion, Publish, decode, encode};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// First byte of an encoded [`ClusterMessage`]; a later format gets another.
const FORMAT: u8 = 1;
/// Largest packet a node decodes from the cluster (the broker's own limit is lower or equal).
const MAX_PACKET: u32 = 256 * 1024 * 1024;

/// An application message published on another node.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterMessage {
    /// The node where it was published.
    pub origin: String,
    /// A number the origin node gives each message, increasing; with the origin it tells
    /// duplicates apart (a node whose subscriptions overlap gets a message once per match).
    pub seq: u64,
    /// The message: internal topic, payload, QoS, retain flag and properties, the Message
    /// Expiry Interval being what was left when it left the origin.
    pub publish: Publish,
}

/// Why bytes from the cluster are not a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The payload is shorter than its header says or has an unknown format byte.
    #[error("cluster message: malformed header (format {0})")]
    Header(u8),
    /// The PUBLISH inside does not decode.
    #[error("cluster message: {0}")]
    Decode(#[from] DecodeError),
    /// Something other than a PUBLISH was inside.
    #[error("cluster message: not a PUBLISH")]
    NotPublish,
    /// The PUBLISH could not be encoded (a property out of range).
    #[error("cluster message: cannot encode: {0}")]
    Encode(String),
}

impl ClusterMessage {
    /// The bytes sent on NATS.
    pub fn encode(&self) -> Result<Bytes, WireError> {
        let origin = self.origin.as_bytes();
        let origin_len = u8::try_from(origin.len()).map_err(|_| WireError::Header(FORMAT))?;
        let mut buf = BytesMut::with_capacity(10 + origin.len() + self.publish.payload.len() + 64);
        buf.put_u8(FORMAT);
        buf.put_u8(origin_len);
        buf.put_slice(origin);
        buf.put_u64(self.seq);
        let mut publish = self.publish.clone();
        // QoS 1/2 PUBLISH packets carry a packet id on the wire; it means nothing here.
        if publish.qos != beckon_mqtt::QoS::AtMostOnce {
            publish.packet_id = Some(1);
        } else {
            publish.packet_id = None;
        }
        encode(&Packet::Publish(publish), ProtocolVersion::V5, &mut buf)
            .map_err(|e| WireError::Encode(e.to_string()))?;
        Ok(buf.freeze())
    }

    /// Parses bytes received from NATS.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let (&format, rest) = bytes.split_first().ok_or(WireError::Header(0))?;
        if format != FORMAT {
            return Err(WireError::Header(format));
        }
        let (&len, rest) = rest.split_first().ok_or(WireError::Header(format))?;
        let len = usize::from(len);
        if rest.len() < len + 8 {
            return Err(WireError::Header(format));
        }
        let origin = String::from_utf8_lossy(&rest[..len]).into_owned();
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&rest[len..len + 8]);
        let mut packet = BytesMut::from(&rest[len + 8..]);
        match decode(&mut packet, ProtocolVersion::V5, MAX_PACKET)? {
            Some(Packet::Publish(publish)) => Ok(Self {
                origin,
                seq: u64::from_be_bytes(seq),
                publish,
            }),
            Some(_) => Err(WireError::NotPublish),
            None => Err(WireError::Header(format)),
        }
    }
}

/// A node accepted a connection for `client_id`: every other node closes the one it holds
/// (MQTT 5 DISCONNECT 0x8E, Session taken over) and forgets the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The node that accepted the new connection.
    pub node: String,
    /// The client id (for tenant identities `{tenant}/{role}/{id}`).
    pub client_id: String,
    /// Whether the new connection asked for a clean start (then the old will is published).
    pub clean_start: bool,
    /// When the node accepted it (Unix ms): two connections accepted at the same moment on
    /// two nodes (claims crossing in NATS) are settled alike everywhere, the later one
    /// staying, then the one on the greater node name. Absent from older nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<i64>,
}

/// Which message of which node a receipt is for. The node that took an agent's QoS 1/2
/// message from its publisher keeps it until the agent's node reports that the agent
/// acknowledged it, and sends it again to the node the agent moves to when the agent's node
/// dies (or the agent moves) first; the agent's own replay guard drops a copy it already had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The origin node.
    pub origin: std::sync::Arc<str>,
    /// The origin's number for the message ([`ClusterMessage::seq`]).
    pub seq: u64,
}

/// A node says it is alive, every heartbeat interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node's name.
    pub node: String,
    /// A random number drawn at start: a node that restarted under the same name between two
    /// checks is seen as gone, so that the identities its previous run held are released.
    pub boot: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use beckon_mqtt::{Properties, QoS};

    #[test]
    fn a_message_survives_the_hop_with_its_properties() {
        let properties = Properties::from(beckon_mqtt::PropertySet {
            message_expiry_interval: Some(600),
            content_type: Some("application/json".into()),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        });
        let msg = ClusterMessage {
            origin: "node-a".into(),
            seq: 42,
            publish: Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: true,
                topic: "t/acme/agents/pc-1/wake".into(),
                packet_id: Some(7),
                payload: Bytes::from_static(b"{\"v\":1}"),
                properties,
            },
        };
        let back = ClusterMessage::decode(&msg.encode().expect("encode")).expect("decode");
        assert_eq!(back.origin, "node-a");
        assert_eq!(back.seq, 42);
        assert_eq!(back.publish.topic, msg.publish.topic);
        assert_eq!(back.publish.payload, msg.publish.payload);
        assert_eq!(back.publish.qos, QoS::AtLeastOnce);
        assert!(back.publish.retain);
        assert_eq!(back.publish.properties.message_expiry_interval, Some(600));
        assert_eq!(
            back.publish.properties.content_type.as_deref(),
            Some("application/json")
        );
        assert_eq!(
            back.publish.properties.user_properties,
            msg.publish.properties.user_properties
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            b"\x01",
            b"\x02abc",
            b"\x01\x05ab",
            b"\x01\x00\0\0\0\0\0\0\0\x01\x30",
        ] {
            assert!(ClusterMessage::decode(bytes).is_err(), "{bytes:?}");
        }
    }
}
