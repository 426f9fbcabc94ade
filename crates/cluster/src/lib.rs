//! The Beckon push service's cluster link: several broker nodes behind one name share
//! messages, client ids and presence through NATS (core NATS; JetStream is not needed).
//!
//! - [`subject`]: MQTT topics and filters as NATS subjects, so that NATS routes each message
//!   only to the node holding its agent and the nodes whose clients subscribed to a matching
//!   filter.
//! - [`directory`]: which node holds each tenant agent, so that agent-bound messages go to
//!   that node and not through one NATS subscription per agent.
//! - [`resend`]: agents' messages kept until their node reports them acknowledged, sent
//!   again to the agent's next node when its node dies first.
//! - [`wire`]: the message, claim and heartbeat formats.
//! - [`link`]: the task between one node's broker core and NATS.
//! - [`security`]: TLS and credentials towards NATS.
//!
//! The broker core stays free of I/O: it hands the link what must go to other nodes and
//! takes in what comes from them (`beckon-broker`'s `core` module).
#![forbid(unsafe_code)]

pub mod directory;
pub mod link;
pub mod resend;
pub mod security;
pub mod subject;
pub mod wire;

pub use link::{ClusterError, ClusterLink, ClusterOptions, Incoming, Outgoing, join};
pub use security::{NatsAuth, NatsSecurity};
pub use wire::{Claim, ClusterMessage, Heartbeat, Receipt};
