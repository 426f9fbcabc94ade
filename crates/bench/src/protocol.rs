//! What the parent and its worker processes say to each other: one JSON object per line, the
//! parent on the worker's stdin, the worker on its stdout. The first line a worker reads is its
//! [`WorkerConfig`]; after that, one [`Command`] at a time, each answered by one [`Reply`].

use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::conn::Target;

/// Everything a worker needs to run its share of the fleet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// Worker number, for messages.
    pub worker: usize,
    /// Global index of this worker's first agent.
    pub first_agent: usize,
    /// How many agents this worker runs.
    pub agents: usize,
    /// Client identifiers are this prefix followed by the agent's global index.
    pub client_id_prefix: String,
    /// The broker these agents connect to first.
    pub target: Target,
    /// The other nodes of a cluster, in the order an agent tries them after `target` when a
    /// reconnect attempt fails (round robin from its own); empty for one broker.
    #[serde(default)]
    pub failover: Vec<Target>,
    /// Source addresses to bind, agent `i` using `source_addresses[i / per_source_address]`;
    /// empty to let the kernel choose.
    pub source_addresses: Vec<Ipv4Addr>,
    /// Agents per source address.
    pub agents_per_source_address: usize,
    /// Connects this worker runs at once in the connect phase.
    pub connect_concurrency: usize,
    /// Reconnect backoff base, in milliseconds.
    pub backoff_base_ms: u64,
    /// Reconnect backoff cap, in milliseconds.
    pub backoff_cap_ms: u64,
    /// Agents of the bench's tenant: each signs in with a token of its own, made by the
    /// worker with this key; `None`: the target's credentials for all.
    #[serde(default)]
    pub tenant: Option<crate::tenant::TenantAuth>,
}

/// A step the parent asks a worker to take.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Connect and subscribe every agent; answered by [`Reply::Connected`].
    Connect,
    /// Start counting wake-ups from zero; answered by [`Reply::WakeupsArmed`].
    ArmWakeups,
    /// Wait until every connected agent has its wake-up or `wait_ms` passed; answered by
    /// [`Reply::Wakeups`].
    CollectWakeups {
        /// Bound on the wait, in milliseconds.
        wait_ms: u64,
    },
    /// Start counting reconnections; with `cut`, drop every connection now. Answered by
    /// [`Reply::StormArmed`].
    ArmStorm {
        /// Cut the connections from the agents' side.
        cut: bool,
        /// Count only the agents that lose their connection from now on (a node killed, NATS
        /// restarted): the others are neither expected back nor missing.
        #[serde(default)]
        lost_only: bool,
    },
    /// Wait until every agent is back or `wait_ms` passed; answered by [`Reply::Storm`].
    CollectStorm {
        /// Bound on the wait, in milliseconds.
        wait_ms: u64,
        /// Answer no sooner than this (milliseconds), so that connections still being lost
        /// are counted (with `lost_only`, none lost yet is not "all back").
        #[serde(default)]
        settle_ms: u64,
    },
    /// Disconnect every agent and exit; answered by [`Reply::Bye`].
    Shutdown,
}

/// A worker's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The worker read its configuration and is ready.
    Ready {
        /// Its process id.
        pid: u32,
    },
    /// The connect phase is over for this worker.
    Connected(ConnectOutcome),
    /// Wake-ups are being counted.
    WakeupsArmed {
        /// Agents connected now, which should each receive one.
        expected: usize,
    },
    /// The wake-ups this worker's agents received.
    Wakeups(WakeupOutcome),
    /// Reconnections are being counted.
    StormArmed {
        /// Agents that should come back.
        expected: usize,
    },
    /// The reconnections of this worker's agents.
    Storm(StormOutcome),
    /// The worker is exiting.
    Bye,
    /// The worker could not do what was asked.
    Failed {
        /// Why.
        message: String,
    },
}

/// One worker's connect phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectOutcome {
    /// Agents that tried.
    pub attempted: usize,
    /// Agents connected and subscribed.
    pub connected: usize,
    /// Agents that failed.
    pub failed: usize,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// Connect latency of each connected agent (TCP connect to CONNACK), microseconds.
    pub latencies_us: Vec<u64>,
    /// When the first connect started (Unix time, nanoseconds).
    pub started_unix_ns: u64,
    /// When the last subscription was granted or the last failure came (Unix time, ns).
    pub finished_unix_ns: u64,
}

/// One worker's fan-out phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WakeupOutcome {
    /// Agents that should have received a wake-up.
    pub expected: usize,
    /// Agents that received at least one.
    pub received: usize,
    /// Wake-ups received beyond the first per agent.
    pub duplicates: usize,
    /// Wake-ups whose payload carried no readable send time.
    pub unreadable: usize,
    /// Send-to-arrival latency of each agent's first wake-up, microseconds.
    pub latencies_us: Vec<u64>,
    /// Arrival of the last first wake-up (Unix time, nanoseconds).
    pub last_arrival_unix_ns: Option<u64>,
}

/// One worker's reconnect storm.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormOutcome {
    /// Agents that should come back (with `lost_only`: those that lost their connection).
    pub expected: usize,
    /// Agents back on each endpoint, in the order of the worker's `target` then `failover`.
    #[serde(default)]
    pub back_per_endpoint: Vec<usize>,
    /// Agents back (connected and subscribed again).
    pub back: usize,
    /// When each agent came back (Unix time, nanoseconds).
    pub back_unix_ns: Vec<u64>,
    /// Connection attempts made, successful or not.
    pub attempts: u64,
    /// The first failed attempt's message.
    pub first_error: Option<String>,
}

/// Now as Unix time in nanoseconds: the clock every process of the bench shares.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}
