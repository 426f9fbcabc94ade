//! Beckon's MQTT client: one session as plain state and one thin tokio driver over it.
//!
//! Modelled on quinn-proto: the [`Session`] does no I/O and has no clock. Packets (or bytes)
//! and time go in ([`Session::receive`], [`Session::handle_timeout`]); bytes to write
//! ([`Session::take_transmit`]), the next deadline ([`Session::poll_timeout`]) and
//! [`Event`]s come out, and an [`End`] says why a connection ended. It builds the CONNECT
//! from [`Options`] (Beckon's properties included), keeps the packet ids, the in-flight
//! window both ways, QoS 0/1/2, keep alive, the subscriptions to send again after a
//! reconnect and the publishes to resend.
//!
//! [`Connection`] drives one session over any `AsyncRead + AsyncWrite` stream.

mod driver;
mod options;
mod session;

pub use driver::Connection;
pub use options::{Options, VIA_PROXY_PROPERTY};
pub use session::{End, Error, Event, IoError, Session, Settled, message};
