//! Test peers shared by Beckon's test suites, so that each suite does not grow its own copy:
//! a test CA made with rcgen, Debian's tinyproxy and Mosquitto started on free loopback ports
//! (killed on drop), and small scripted TCP servers (an echo server among them). Every wait is
//! bounded by [`WAIT`]. A missing program fails the test with the package to install: a
//! missing peer is no pass. With feature `broker`: Beckon's own broker and test tenants; with
//! feature `mqtt`: the handshakes of an MQTT test client.
//!
//! Only for tests: it panics on every failure, as a test should.

#![forbid(unsafe_code)]
#![allow(clippy::missing_panics_doc)]

#[cfg(feature = "broker")]
mod broker;
mod ca;
#[cfg(feature = "mqtt")]
mod mqtt;
mod process;
mod servers;

#[cfg(feature = "broker")]
pub use broker::{RunningBroker, TestTenant};
#[cfg(feature = "mqtt")]
pub use mqtt::TestClient;

pub use ca::{ServerIdentity, TestCa};
pub use process::{Mosquitto, Squid, Tinyproxy, find_program, wait_listening};
pub use servers::{start_echo_server, start_scripted_server, start_silent_server};

use std::time::Duration;

/// Every network wait in the tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A loopback port on which nothing listens (bind, read the port, close).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local address").port()
}
