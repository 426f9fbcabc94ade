//! What a run found, as JSON (`--json`) and as a table for people.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::conn::{KeyExchange, MqttVersion};

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Number of samples.
    pub samples: usize,
}

impl Percentiles {
    /// Nearest-rank percentiles of samples in microseconds (sorts them); `None` when empty.
    pub fn of_micros(samples: &mut [u64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            let index = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[index] as f64 / 1000.0
        };
        Some(Self {
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: rank(1.0),
            samples: samples.len(),
        })
    }
}

/// The connect phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Agents that tried.
    pub attempted: usize,
    /// Agents connected and subscribed.
    pub connected: usize,
    /// Agents that failed.
    pub failed: usize,
    /// The first failure.
    pub first_error: Option<String>,
    /// From the first connect to the last subscription, seconds.
    pub duration_s: f64,
    /// Connected agents per second over that time.
    pub rate_per_s: Option<f64>,
    /// TCP connect to CONNACK.
    pub latency_ms: Option<Percentiles>,
}

/// The idle phase: what the connected fleet costs the broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleReport {
    /// Wait after the connect phase before reading the broker, seconds.
    pub settle_s: f64,
    /// Broker RSS before the connect phase, KiB.
    pub rss_before_kib: Option<u64>,
    /// Broker RSS after the settle time, KiB.
    pub rss_after_kib: Option<u64>,
    /// RSS growth divided by connected agents, KiB.
    pub rss_per_connection_kib: Option<f64>,
    /// Broker CPU time (user + system) from before the connect phase to after the settle
    /// time, divided by connected agents, microseconds. Includes TLS, CONNECT and SUBSCRIBE.
    pub cpu_per_connect_us: Option<f64>,
}

/// The memory of one broker node (`--node-pid`) from before the connect phase to after the
/// idle phase (after the connect phase when the idle phase is not run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeMemory {
    /// The node's endpoint, `host:port`, as the agents reached it.
    pub endpoint: String,
    /// Its process id.
    pub pid: u32,
    /// Agents the bench connected to this node.
    pub agents: usize,
    /// VmRSS before the connect phase, KiB.
    pub rss_before_kib: u64,
    /// VmRSS after, KiB; `None` when it could not be read (see `error`).
    pub rss_after_kib: Option<u64>,
    /// Growth divided by the agents connected to this node, KiB.
    pub rss_per_agent_kib: Option<f64>,
    /// Why the second reading failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// nats-server's own figures (`--nats-monitor`, its `/varz`) from before the connect phase to
/// after the idle phase (after the connect phase when the idle phase is not run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NatsReport {
    /// The `/varz` URL read.
    pub url: String,
    /// Agents connected over all nodes.
    pub agents: usize,
    /// `mem` before, KiB.
    pub mem_before_kib: u64,
    /// `mem` after, KiB.
    pub mem_after_kib: Option<u64>,
    /// Memory growth divided by connected agents, KiB.
    pub mem_per_agent_kib: Option<f64>,
    /// `subscriptions` before.
    pub subscriptions_before: u64,
    /// `subscriptions` after.
    pub subscriptions_after: Option<u64>,
    /// Subscription growth divided by connected agents.
    pub subscriptions_per_agent: Option<f64>,
    /// `connections` before (the broker nodes' own).
    pub connections_before: u64,
    /// `connections` after.
    pub connections_after: Option<u64>,
    /// Why the second reading failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The fan-out phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutReport {
    /// Wake-ups the publishers wrote (one per agent).
    pub published: usize,
    /// Publisher connections.
    #[serde(default)]
    pub publishers: usize,
    /// Of those, acknowledged by the broker.
    pub acknowledged: usize,
    /// Window of each publisher connection (unacknowledged messages in flight).
    pub window: usize,
    /// Why the publisher stopped early, if it did.
    pub publisher_error: Option<String>,
    /// Connected agents, each expecting one wake-up.
    pub expected: usize,
    /// Agents that received theirs.
    pub delivered: usize,
    /// Agents that did not within the wait.
    pub missing: usize,
    /// Extra copies received.
    pub duplicates: usize,
    /// From the first to the last write of the publishers, seconds: when it is close to
    /// the last arrival, the publishers and not the broker set the pace.
    pub publish_s: f64,
    /// From the first write to the last arrival, seconds.
    pub last_arrival_s: Option<f64>,
    /// Send (timestamp in the payload) to arrival, per agent.
    pub latency_ms: Option<Percentiles>,
    /// Broker CPU time during the fan-out divided by wake-ups delivered, microseconds.
    pub cpu_per_wakeup_us: Option<f64>,
    /// The bound on the wait for arrivals, seconds.
    pub wait_s: f64,
}

/// Agents back on one node after a storm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointBack {
    /// The node, `host:port`.
    pub endpoint: String,
    /// Agents that came back on it.
    pub back: usize,
}

/// nats-server after it was restarted (`--storm-restart` with `--nats-monitor`): its `/varz`
/// before the kill, and until its clients (the nodes) were back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NatsStorm {
    /// The `/varz` URL read.
    pub url: String,
    /// Client connections before the kill.
    pub connections_before: u64,
    /// Subscriptions before the kill.
    pub subscriptions_before: u64,
    /// Client connections at the last reading.
    pub connections_after: Option<u64>,
    /// Subscriptions at the last reading.
    pub subscriptions_after: Option<u64>,
    /// From nats-server answering again to as many connections and subscriptions as before,
    /// seconds; `None`: not within the storm's wait.
    pub back_after_up_s: Option<f64>,
    /// Why the last reading failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The reconnect storm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormReport {
    /// "restart" (the bench restarted the broker), "cut" (the agents dropped their
    /// connections at once), "kill node" (a cluster node SIGKILLed, `--storm-kill`) or
    /// "restart nats" (nats-server SIGKILLed and started again, `--storm-restart`).
    pub method: String,
    /// How long the broker (or nats-server) was down before it was started again, seconds
    /// (0 for a cut or a node killed).
    pub outage_s: f64,
    /// Agents that should come back: every connected agent for a restart or a cut; for
    /// "kill node" and "restart nats", the agents that lost their connection.
    pub expected: usize,
    /// Agents that came back within the wait.
    pub back: usize,
    /// Agents that had not come back when the wait ended (gave up or still backing off).
    pub not_back: usize,
    /// From the broker listening again to 99% of agents back, seconds.
    pub back_99_after_up_s: Option<f64>,
    /// From the broker going down (or the cut) to 99% of agents back, seconds.
    pub back_99_after_down_s: Option<f64>,
    /// From the broker listening again to the last agent back, seconds.
    pub back_all_after_up_s: Option<f64>,
    /// Most reconnections completed within one second.
    pub peak_connects_per_s: usize,
    /// Broker CPU time during the storm (from the cut, or from the restarted broker
    /// listening, to the end of the wait) divided by agents back, microseconds.
    pub cpu_per_reconnect_us: Option<f64>,
    /// Connection attempts, failed and successful.
    pub attempts: u64,
    /// The first failed attempt.
    pub first_error: Option<String>,
    /// The bound on the wait, seconds.
    pub wait_s: f64,
    /// The process SIGKILLed ("kill node", "restart nats").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub killed_pid: Option<u32>,
    /// From the kill (or the broker stopping) until it listened again, seconds; `None` when
    /// nothing was started again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_after_down_s: Option<f64>,
    /// The restarted nats-server's pid: it keeps running after the bench.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_pid: Option<u32>,
    /// Where the restarted nats-server writes its output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_log: Option<String>,
    /// Agents back on each node (a cluster).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub back_per_endpoint: Vec<EndpointBack>,
    /// nats-server's clients after its restart (`--nats-monitor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsStorm>,
}

/// One fleet run against one broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetReport {
    /// The broker's name.
    pub broker: String,
    /// Agents simulated.
    pub agents: usize,
    /// Whether the agents used TLS.
    pub tls: bool,
    /// The TLS key exchange offered, when TLS.
    pub tls_key_exchange: Option<KeyExchange>,
    /// Protocol version.
    pub mqtt_version: MqttVersion,
    /// Worker processes.
    pub workers: usize,
    /// Broker nodes the agents were spread over (a cluster when above 1).
    #[serde(default = "one")]
    pub nodes: usize,
    /// Source addresses the sockets were spread over (0: chosen by the kernel).
    pub source_addresses: usize,
    /// Connect phase.
    pub connect: Option<ConnectReport>,
    /// Idle phase.
    pub idle: Option<IdleReport>,
    /// Fan-out phase.
    pub fanout: Option<FanoutReport>,
    /// Storm phase.
    pub storm: Option<StormReport>,
    /// The fan-out again after the storm.
    pub fanout_after_storm: Option<FanoutReport>,
    /// The tenant the agents belonged to (`--tenant-dir`); `None`: the target's credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The memory of each node given with `--node-pid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_memory: Vec<NodeMemory>,
    /// nats-server's figures (`--nats-monitor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsReport>,
}

fn one() -> usize {
    1
}

/// One line of a table: a figure, its unit, and its value if measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// What it is.
    pub name: String,
    /// Its unit.
    pub unit: String,
    /// Its value.
    pub value: Option<f64>,
    /// Whether a lower value is better (for ratios).
    pub lower_is_better: bool,
}

fn figure(name: &str, unit: &str, value: Option<f64>, lower_is_better: bool) -> Figure {
    Figure {
        name: name.to_owned(),
        unit: unit.to_owned(),
        value,
        lower_is_better,
    }
}

impl FleetReport {
    /// The report as a flat list of figures, in the order of the phases.
    pub fn figures(&self) -> Vec<Figure> {
        let mut out = Vec::new();
        if let Some(c) = &self.connect {
            out.push(figure(
                "agents connected",
                "",
                Some(c.connected as f64),
                false,
            ));
            out.push(figure("connect failures", "", Some(c.failed as f64), true));
            out.push(figure("connect rate", "/s", c.rate_per_s, false));
            out.push(figure(
                "connect latency p50",
                "ms",
                c.latency_ms.map(|p| p.p50_ms),
                true,
            ));
            out.push(figure(
                "connect latency p99",
                "ms",
                c.latency_ms.map(|p| p.p99_ms),
                true,
            ));
        }
        if let Some(i) = &self.idle {
            out.push(figure(
                "broker RSS per connection",
                "KiB",
                i.rss_per_connection_kib,
                true,
            ));
            out.push(figure(
                "broker CPU per connect",
                "us",
                i.cpu_per_connect_us,
                true,
            ));
        }
        for (n, node) in self.node_memory.iter().enumerate() {
            let name = |what: &str| format!("node {} ({}) {what}", n + 1, node.endpoint);
            out.push(figure(&name("agents"), "", Some(node.agents as f64), false));
            out.push(figure(
                &name("RSS before"),
                "KiB",
                Some(node.rss_before_kib as f64),
                true,
            ));
            out.push(figure(
                &name("RSS after"),
                "KiB",
                node.rss_after_kib.map(|v| v as f64),
                true,
            ));
            out.push(figure(
                &name("RSS per agent"),
                "KiB",
                node.rss_per_agent_kib,
                true,
            ));
        }
        if let Some(nats) = &self.nats {
            out.push(figure(
                "NATS memory before",
                "KiB",
                Some(nats.mem_before_kib as f64),
                true,
            ));
            out.push(figure(
                "NATS memory after",
                "KiB",
                nats.mem_after_kib.map(|v| v as f64),
                true,
            ));
            out.push(figure(
                "NATS memory per agent",
                "KiB",
                nats.mem_per_agent_kib,
                true,
            ));
            out.push(figure(
                "NATS subscriptions before",
                "",
                Some(nats.subscriptions_before as f64),
                true,
            ));
            out.push(figure(
                "NATS subscriptions after",
                "",
                nats.subscriptions_after.map(|v| v as f64),
                true,
            ));
            out.push(figure(
                "NATS subscriptions per agent",
                "",
                nats.subscriptions_per_agent,
                true,
            ));
            out.push(figure(
                "NATS connections after",
                "",
                nats.connections_after.map(|v| v as f64),
                false,
            ));
        }
        if let Some(f) = &self.fanout {
            out.push(figure(
                "wake-ups delivered",
                "",
                Some(f.delivered as f64),
                false,
            ));
            out.push(figure("wake-ups missing", "", Some(f.missing as f64), true));
            out.push(figure(
                "wake-up duplicates",
                "",
                Some(f.duplicates as f64),
                true,
            ));
            out.push(figure("fan-out: last arrival", "s", f.last_arrival_s, true));
            out.push(figure(
                "fan-out: publishers' write time",
                "s",
                Some(f.publish_s),
                true,
            ));
            out.push(figure(
                "wake-up latency p50",
                "ms",
                f.latency_ms.map(|p| p.p50_ms),
                true,
            ));
            out.push(figure(
                "wake-up latency p99",
                "ms",
                f.latency_ms.map(|p| p.p99_ms),
                true,
            ));
            out.push(figure(
                "wake-up latency max",
                "ms",
                f.latency_ms.map(|p| p.max_ms),
                true,
            ));
            out.push(figure(
                "broker CPU per wake-up",
                "us",
                f.cpu_per_wakeup_us,
                true,
            ));
        }
        if let Some(s) = &self.storm {
            storm_figures(s, &mut out);
        }
        if let Some(f) = &self.fanout_after_storm {
            out.push(figure(
                "after storm: wake-ups delivered",
                "",
                Some(f.delivered as f64),
                false,
            ));
            out.push(figure(
                "after storm: wake-ups missing",
                "",
                Some(f.missing as f64),
                true,
            ));
            out.push(figure(
                "after storm: wake-up latency p99",
                "ms",
                f.latency_ms.map(|p| p.p99_ms),
                true,
            ));
        }
        out
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", self.headline());
        let figures = self.figures();
        let width = figures.iter().map(|f| f.name.len()).max().unwrap_or(10);
        for f in &figures {
            let _ = writeln!(
                out,
                "  {:<width$}  {:>12} {}",
                f.name,
                format_value(f.value),
                f.unit
            );
        }
        for note in self.notes() {
            let _ = writeln!(out, "  note: {note}");
        }
        out
    }

    fn headline(&self) -> String {
        format!(
            "{}: {} agents, {}, MQTT {}, {} worker process(es), {} source address(es)",
            self.broker,
            self.agents,
            match self.tls_key_exchange {
                _ if !self.tls => "plain TCP",
                Some(KeyExchange::ProviderDefault) => "TLS (provider-default key exchange)",
                _ => "TLS (X25519)",
            },
            match self.mqtt_version {
                MqttVersion::V311 => "3.1.1",
                MqttVersion::V5 => "5",
            },
            self.workers,
            self.source_addresses
        ) + &if self.nodes > 1 {
            format!(
                ", spread over {} cluster nodes (publisher on the first)",
                self.nodes
            )
        } else {
            String::new()
        } + &self
            .tenant
            .as_ref()
            .map(|t| format!(", agents of tenant {t} (token per agent)"))
            .unwrap_or_default()
    }

    /// Things the figures alone do not say: first errors, missing broker readings.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(e) = self.connect.as_ref().and_then(|c| c.first_error.as_ref()) {
            notes.push(format!("first connect failure: {e}"));
        }
        if self
            .idle
            .as_ref()
            .is_some_and(|i| i.rss_per_connection_kib.is_none())
        {
            notes
                .push("no broker readings: give --broker-pid to measure memory and CPU".to_owned());
        }
        for node in &self.node_memory {
            if let Some(e) = &node.error {
                notes.push(format!(
                    "node {} (pid {}) not read after: {e}",
                    node.endpoint, node.pid
                ));
            }
        }
        if let Some(e) = self.nats.as_ref().and_then(|n| n.error.as_ref()) {
            notes.push(format!("NATS not read after: {e}"));
        }
        if !self.node_memory.is_empty() || self.nats.is_some() {
            notes.push(
                if self.idle.is_some() {
                    "node and NATS readings: before the connect phase and after the idle phase"
                } else {
                    "node and NATS readings: before and after the connect phase (no idle phase)"
                }
                .to_owned(),
            );
        }
        if let Some(e) = self
            .fanout
            .as_ref()
            .and_then(|f| f.publisher_error.as_ref())
        {
            notes.push(format!("publisher stopped early: {e}"));
        }
        if let Some(s) = &self.storm {
            if s.method == "cut" {
                notes.push(
                    "storm by cut: the bench did not start the broker, so the agents dropped their connections instead of a restart".to_owned(),
                );
            }
            let killed = s.killed_pid.map(|p| p.to_string()).unwrap_or_default();
            if s.method == "kill node" {
                notes.push(format!(
                    "storm by kill node: pid {killed} SIGKILLed; its agents reconnected to the next node of their list; times from the kill; the agents on the other nodes are not counted"
                ));
            }
            if s.method == "restart nats" {
                notes.push(format!(
                    "storm by restart nats: nats-server pid {killed} SIGKILLed, started again after {} s as pid {} (output: {}; it keeps running)",
                    format_value(Some(s.outage_s)),
                    s.restarted_pid.map(|p| p.to_string()).unwrap_or_default(),
                    s.restarted_log.as_deref().unwrap_or("-")
                ));
                match &s.nats {
                    None => notes.push(
                        "no --nats-monitor: the bench did not wait for the nodes to be back on NATS before the fan-out after the storm"
                            .to_owned(),
                    ),
                    Some(n) if n.back_after_up_s.is_none() => notes.push(format!(
                        "NATS not back within the wait: {} connection(s) and {} subscription(s) against {} and {} before{}",
                        n.connections_after.map_or_else(|| "-".to_owned(), |v| v.to_string()),
                        n.subscriptions_after.map_or_else(|| "-".to_owned(), |v| v.to_string()),
                        n.connections_before,
                        n.subscriptions_before,
                        n.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                    )),
                    Some(_) => {}
                }
            }
            if let Some(e) = &s.first_error {
                notes.push(format!("first failed reconnect attempt: {e}"));
            }
        }
        notes
    }
}

/// The storm's lines of the table, in the words of its method.
fn storm_figures(s: &StormReport, out: &mut Vec<Figure>) {
    let cluster = s.method == "kill node" || s.method == "restart nats";
    if cluster {
        out.push(figure(
            "storm: agents that lost their connection",
            "",
            Some(s.expected as f64),
            true,
        ));
    }
    out.push(figure("storm: agents back", "", Some(s.back as f64), false));
    out.push(figure("storm: not back", "", Some(s.not_back as f64), true));
    if cluster {
        if s.method == "restart nats" {
            out.push(figure(
                "storm: nats-server up after the kill",
                "s",
                s.up_after_down_s,
                true,
            ));
            if let Some(n) = &s.nats {
                out.push(figure(
                    "storm: NATS connections before",
                    "",
                    Some(n.connections_before as f64),
                    false,
                ));
                out.push(figure(
                    "storm: NATS connections after",
                    "",
                    n.connections_after.map(|v| v as f64),
                    false,
                ));
                out.push(figure(
                    "storm: NATS back after nats-server up",
                    "s",
                    n.back_after_up_s,
                    true,
                ));
            }
        }
        out.push(figure(
            "storm: 99% back after the kill",
            "s",
            s.back_99_after_down_s,
            true,
        ));
        out.push(figure(
            "storm: all back after the kill",
            "s",
            s.back_all_after_up_s
                .map(|after_up| after_up + s.up_after_down_s.unwrap_or(0.0)),
            true,
        ));
    } else {
        out.push(figure(
            "storm: 99% back after broker up",
            "s",
            s.back_99_after_up_s,
            true,
        ));
        out.push(figure(
            "storm: 99% back after down",
            "s",
            s.back_99_after_down_s,
            true,
        ));
    }
    out.push(figure(
        "storm: peak connect rate",
        "/s",
        Some(s.peak_connects_per_s as f64),
        false,
    ));
    out.push(figure(
        if cluster {
            "storm: nodes' CPU per reconnect"
        } else {
            "storm: broker CPU per reconnect"
        },
        "us",
        s.cpu_per_reconnect_us,
        true,
    ));
    for (n, node) in s.back_per_endpoint.iter().enumerate() {
        out.push(figure(
            &format!("storm: back on node {} ({})", n + 1, node.endpoint),
            "",
            Some(node.back as f64),
            false,
        ));
    }
}

/// A value for a table: integers without decimals, small numbers with more precision.
pub fn format_value(value: Option<f64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e12 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<u64> = (1..=100).map(|ms| ms * 1000).collect();
        let p = Percentiles::of_micros(&mut samples).expect("samples");
        assert_eq!(p.p50_ms, 50.0);
        assert_eq!(p.p99_ms, 99.0);
        assert_eq!(p.max_ms, 100.0);
        assert_eq!(p.samples, 100);
        assert!(Percentiles::of_micros(&mut []).is_none());
    }

    fn storm(method: &str) -> StormReport {
        StormReport {
            method: method.to_owned(),
            outage_s: 0.0,
            expected: 20,
            back: 19,
            not_back: 1,
            back_99_after_up_s: Some(1.5),
            back_99_after_down_s: Some(1.5),
            back_all_after_up_s: None,
            peak_connects_per_s: 12,
            cpu_per_reconnect_us: Some(210.0),
            attempts: 40,
            first_error: None,
            wait_s: 30.0,
            killed_pid: Some(4242),
            up_after_down_s: None,
            restarted_pid: None,
            restarted_log: None,
            back_per_endpoint: vec![
                EndpointBack {
                    endpoint: "127.0.0.1:1".to_owned(),
                    back: 19,
                },
                EndpointBack {
                    endpoint: "127.0.0.1:2".to_owned(),
                    back: 0,
                },
            ],
            nats: None,
        }
    }

    fn fleet_report(storm: StormReport) -> FleetReport {
        FleetReport {
            broker: "cluster".to_owned(),
            agents: 40,
            tls: false,
            tls_key_exchange: None,
            mqtt_version: MqttVersion::V311,
            workers: 2,
            nodes: 2,
            source_addresses: 1,
            connect: None,
            idle: None,
            fanout: None,
            storm: Some(storm),
            fanout_after_storm: None,
            tenant: None,
            node_memory: Vec::new(),
            nats: None,
        }
    }

    #[test]
    fn cluster_storms_speak_of_the_kill_and_of_each_node() {
        let table = fleet_report(storm("kill node")).table();
        for line in [
            "storm: agents that lost their connection",
            "storm: 99% back after the kill",
            "storm: nodes' CPU per reconnect",
            "storm: back on node 1 (127.0.0.1:1)",
            "storm: back on node 2 (127.0.0.1:2)",
            "pid 4242 SIGKILLed",
        ] {
            assert!(table.contains(line), "{line:?} not in:\n{table}");
        }
        assert!(!table.contains("after broker up"), "{table}");

        let mut restart = storm("restart nats");
        restart.outage_s = 2.0;
        restart.up_after_down_s = Some(2.3);
        restart.restarted_pid = Some(4343);
        restart.nats = Some(NatsStorm {
            url: "http://127.0.0.1:8222/varz".to_owned(),
            connections_before: 4,
            subscriptions_before: 60,
            connections_after: Some(3),
            subscriptions_after: Some(50),
            back_after_up_s: None,
            error: None,
        });
        let table = fleet_report(restart).table();
        for line in [
            "storm: nats-server up after the kill",
            "storm: NATS connections before",
            "started again after 2 s as pid 4343",
            "NATS not back within the wait: 3 connection(s) and 50 subscription(s) against 4 and 60",
        ] {
            assert!(table.contains(line), "{line:?} not in:\n{table}");
        }
        // Reports without the new fields (older runs) still read.
        let mut json = serde_json::to_value(fleet_report(storm("cut"))).expect("json");
        for field in ["killed_pid", "back_per_endpoint"] {
            json["storm"].as_object_mut().expect("storm").remove(field);
        }
        let back: FleetReport = serde_json::from_value(json).expect("reads");
        assert!(back.storm.expect("storm").back_per_endpoint.is_empty());
    }

    #[test]
    fn values_print_with_sensible_precision() {
        assert_eq!(format_value(None), "-");
        assert_eq!(format_value(Some(19000.0)), "19000");
        assert_eq!(format_value(Some(291.4)), "291");
        assert_eq!(format_value(Some(15.44)), "15.4");
        assert_eq!(format_value(Some(0.456)), "0.46");
    }
}
