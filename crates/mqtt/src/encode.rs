//! Encoding: a packet for a given protocol version.

use bytes::BytesMut;

use crate::{EncodeError, Packet, ProtocolVersion};

/// Appends `packet`, encoded for `version`, to `buf`. v5-only content (properties, reason
/// codes) is left out for v3.1.1; v5 reason codes of CONNACK and SUBACK are mapped to their
/// v3.1.1 return codes.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let _ = (packet, version, buf);
    todo!("codec")
}

/// The number of bytes [`encode`] would write, so that a sender can honour the peer's
/// maximum packet size without encoding first.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let _ = (packet, version);
    todo!("codec")
}
