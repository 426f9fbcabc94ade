//! Codec errors, each mapped to the MQTT 5 reason code that reports it.

use crate::ReasonCode;

/// Why a frame could not be decoded. Every variant maps to the reason code a server sends in
/// CONNACK or DISCONNECT before it closes the connection ([`DecodeError::reason_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not form a valid packet (0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet is well formed but breaks a protocol rule (0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The remaining length announces a packet larger than the allowed maximum (0x95).
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge {
        /// Size of the whole packet, fixed header included.
        size: usize,
        /// The maximum in force.
        max: u32,
    },
    /// CONNECT names a protocol version this codec does not speak (0x84).
    #[error("unsupported protocol version {level} (name {name:?})")]
    UnsupportedProtocolVersion {
        /// Protocol level byte.
        level: u8,
        /// Protocol name as sent.
        name: String,
    },
    /// A PUBLISH topic name is not valid: wildcards, U+0000, empty without alias (0x90).
    #[error("invalid topic name: {0}")]
    InvalidTopic(&'static str),
}

impl DecodeError {
    /// The MQTT 5 reason code that reports this error to the peer.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Self::Malformed(_) => ReasonCode::MALFORMED_PACKET,
            Self::Protocol(_) => ReasonCode::PROTOCOL_ERROR,
            Self::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            Self::UnsupportedProtocolVersion { .. } => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            Self::InvalidTopic(_) => ReasonCode::TOPIC_NAME_INVALID,
        }
    }
}

/// Why a packet could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded packet would exceed the 268,435,455-byte remaining-length limit or a
    /// string or binary field would exceed 65,535 bytes.
    #[error("packet too large to encode: {0}")]
    TooLarge(&'static str),
    /// The packet cannot be expressed in the connection's protocol version (AUTH in v3.1.1,
    /// packet id missing for QoS > 0, ...).
    #[error("packet cannot be encoded: {0}")]
    Invalid(&'static str),
}
