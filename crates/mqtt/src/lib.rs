//! MQTT 3.1.1 and 5.0 codec: bytes in, packets out, and back. No I/O, no async runtime.
//!
//! [`decode`] takes whole frames off the front of a buffer and rejects everything the
//! specification forbids that a decoder can see, mapping each failure to the v5 reason code
//! the server must send. [`encode`] writes a packet for a given protocol version.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod codes;
mod decode;
mod encode;
mod error;
mod packet;
mod props;
mod wire;

pub use decode::{decode, frame_len};
pub use encode::{encode, encoded_len};
pub use error::{DecodeError, EncodeError};
pub use packet::*;
