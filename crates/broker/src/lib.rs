//! The Beckon broker: the MQTT protocol core as plain state ([`core`]) and the tokio layer
//! that puts it on the network.
#![forbid(unsafe_code)]

pub mod core;
