//! Decoding: frames off the front of a buffer.

use bytes::BytesMut;

use crate::{DecodeError, Packet, ProtocolVersion};

/// The length of the first whole frame in `buf` (fixed header included), `Ok(None)` when more
/// bytes are needed. Checks the remaining length encoding and `max_packet_size` from the fixed
/// header alone, so a caller can refuse an oversized packet before buffering it.
pub fn frame_len(buf: &[u8], max_packet_size: u32) -> Result<Option<usize>, DecodeError> {
    let _ = (buf, max_packet_size);
    todo!("codec")
}

/// Decodes the first whole frame of `buf` and advances past it; `Ok(None)` (buffer untouched)
/// when the frame is not complete yet. `version` is the connection's negotiated version; a
/// CONNECT is decoded by the version it names itself. After an error the connection must be
/// closed: the buffer is left in an unspecified state.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    let _ = (buf, version, max_packet_size);
    todo!("codec")
}
