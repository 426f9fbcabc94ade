//! The Beckon broker: the MQTT protocol core as plain state ([`core`]) and the tokio layer
//! that puts it on the network ([`Server`], [`run`]).
//!
//! `unsafe` is denied everywhere except the one module that reads the file descriptor limit
//! through `libc` ([`fdlimit`]). What differs by operating system is there and in `os`.
#![deny(unsafe_code)]

mod admin;
pub mod config;
mod connection;
pub mod core;
mod core_task;
pub mod fdlimit;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod metrics;
mod os;
mod outbox;
mod proxy_protocol;
mod ratelimit;
mod revocation_feed;
mod server;
mod shared_port;
mod tenancy;
mod tls13_records;
mod tls_stream;

pub use config::{BrokerConfig, ConfigError, Listen};
pub use connection::VIA_PROXY_PROPERTY;
pub use server::{Bound, Server, ServerError, ServerHandle, default_certificate_names, run};
