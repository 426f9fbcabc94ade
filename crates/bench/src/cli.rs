//! Command-line arguments of `beckon bench`.

use std::path::PathBuf;

use crate::conn::{KeyExchange, MqttVersion, Target, TlsSettings};

/// The phases of a fleet run, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Phase {
    /// Connect and subscribe every agent (always runs: the others need it).
    Connect,
    /// Wait, then read the broker's memory and CPU per connection.
    Idle,
    /// One QoS 1 wake-up per agent, from `--publishers` connections.
    Fanout,
    /// Restart the broker (or cut every connection) and time the agents' return.
    Storm,
    /// After the storm, the fan-out again: every agent must be subscribed again.
    FanoutAfterStorm,
}

/// The broker to reach (fleet only: compare starts its own).
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Broker host name or IP address.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Speak TLS (implied by --ca).
    #[arg(long)]
    pub tls: bool,
    /// PEM file of the CA that signs the broker's certificate.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Name to check the broker's certificate against (default: --host).
    #[arg(long)]
    pub server_name: Option<String>,
    /// PEM client certificate (chain) to present.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// User name for CONNECT.
    #[arg(long)]
    pub username: Option<String>,
    /// Password for CONNECT.
    #[arg(long, env = "BECKON_BENCH_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Another node of a cluster, `HOST:PORT` (repeat for each): the agents are spread over
    /// --host:--port and these, worker process by worker process, round-robin, while the
    /// publisher stays on --host:--port, so that most wake-ups cross nodes.
    #[arg(long = "endpoint", value_name = "HOST:PORT")]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub session: SessionArgs,
}

/// How each agent speaks, for fleet and compare alike.
#[derive(Debug, Clone, clap::Args)]
pub struct SessionArgs {
    /// MQTT protocol version.
    #[arg(long, value_enum, default_value = "3.1.1")]
    pub mqtt_version: MqttVersion,
    /// Keep alive each agent announces, seconds.
    #[arg(long, default_value_t = 300)]
    pub keep_alive: u16,
    /// Bound on one connection attempt (TCP, TLS, CONNECT to CONNACK; and SUBSCRIBE to
    /// SUBACK), seconds.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout_secs: f64,
    /// TLS key exchange offered: x25519 (the same handshake for every broker) or
    /// provider-default (post-quantum hybrid first, as the agent offers).
    #[arg(long, value_enum, default_value = "x25519")]
    pub tls_key_exchange: KeyExchange,
}

/// How many simulated agents, and how they spread over worker processes and source
/// addresses: shared by fleet, compare and call.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetSize {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Agents per worker process (a process may open only so many files).
    #[arg(long, default_value_t = 5000)]
    pub agents_per_worker: usize,
    /// Agents per source address (127.0.0.2, .3, ... when the broker is on loopback; one
    /// address has about 28,000 ephemeral ports).
    #[arg(long, default_value_t = 5000)]
    pub agents_per_source_address: usize,
}

/// The size and shape of the load, shared by fleet and compare.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// How many agents, in how many workers.
    #[command(flatten)]
    pub size: FleetSize,
    /// Connects in flight at once in the connect phase, over all workers.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Phases to run (connect always runs).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "connect,idle,fanout,storm,fanout-after-storm"
    )]
    pub phases: Vec<Phase>,
    /// Idle phase: wait after connecting before reading the broker, seconds.
    #[arg(long, default_value_t = 5.0)]
    pub settle_secs: f64,
    /// Fan-out: publisher connections; each sends the wake-ups of every n-th agent, all
    /// starting at the same moment. One by default: the product's wake-ups all come through
    /// one connection, the console's.
    #[arg(long, default_value_t = 1, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..=256), usize::from))]
    pub publishers: usize,
    /// Fan-out: unacknowledged wake-ups each publisher connection keeps in flight (at most
    /// 65,535, and capped by the broker's Receive Maximum in MQTT 5).
    #[arg(long, default_value_t = 10_000)]
    pub publish_window: usize,
    /// Fan-out: bound on the wait for every wake-up to arrive, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub fanout_wait_secs: f64,
    /// Storm: how long the broker stays down when the bench restarts it, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub outage_secs: f64,
    /// Storm: bound on the wait for the agents to come back, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub storm_wait_secs: f64,
    /// Agent reconnect backoff: base, milliseconds (full jitter, doubling).
    #[arg(long, default_value_t = 1000)]
    pub backoff_base_ms: u64,
    /// Agent reconnect backoff: cap, seconds.
    #[arg(long, default_value_t = 300)]
    pub backoff_cap_secs: u64,
    /// Client identifiers are this prefix and the agent's number.
    #[arg(long, default_value = "bench-")]
    pub client_id_prefix: String,
}

/// `beckon bench fleet`: simulated agents against any MQTT broker.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// The broker's process id, to read its memory and CPU from /proc (same machine only).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Agents of tenant `bench` instead of the target's credentials: each connects with its
    /// id as client id and a token of its own, the publishers as servers of the tenant. The
    /// bench writes DIR/bench.toml (the tenant file) and DIR/bench.key (its token key), or
    /// reuses both when they exist; start the brokers with tenants_dir = DIR.
    #[arg(long, value_name = "DIR")]
    pub tenant_dir: Option<PathBuf>,
    /// A broker node's process id, to read its VmRSS before the connect phase and after the
    /// idle phase, and its growth per agent connected to it (same machine only). Repeat in
    /// the order of the nodes: the first for --host:--port, then one per --endpoint.
    #[arg(long = "node-pid", value_name = "PID")]
    pub node_pids: Vec<u32>,
    /// nats-server's monitoring URL (its -m port, e.g. http://127.0.0.1:8222), to read its
    /// memory, subscriptions and connections (/varz) before the connect phase and after the
    /// idle phase.
    #[arg(long, value_name = "URL")]
    pub nats_monitor: Option<String>,
    /// Storm: SIGKILL this process (a cluster node the bench did not start) instead of a
    /// restart or a cut; its agents reconnect to the next node of their list. Counts and
    /// times only the agents that lost their connection, from the kill. Not the first node
    /// (the publisher's).
    #[arg(long, value_name = "PID", conflicts_with = "storm_restart")]
    pub storm_kill: Option<u32>,
    /// Storm: SIGKILL this process (nats-server), wait --outage-secs, and start it again with
    /// the same command line and working directory (it keeps running after the bench; its
    /// output goes next to --tenant-dir, else nowhere). With --nats-monitor, waits until
    /// nats-server has its connections and subscriptions back before the next phase.
    #[arg(long, value_name = "PID")]
    pub storm_restart: Option<u32>,
    /// The broker's name in the report.
    #[arg(long, default_value = "broker")]
    pub label: String,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `beckon bench compare`: the same fleet against Mosquitto and Beckon, started here.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub session: SessionArgs,
    /// Plain MQTT instead of TLS.
    #[arg(long)]
    pub plain: bool,
    /// Mosquitto executable.
    #[arg(long, value_name = "PATH", default_value = "/usr/sbin/mosquitto")]
    pub mosquitto_bin: PathBuf,
    /// Beckon executable that runs `broker` (default: this program).
    #[arg(long, value_name = "PATH")]
    pub beckon_bin: Option<PathBuf>,
    /// Runs per broker; the brokers alternate and the summary takes the median.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `beckon bench worker` (internal): one worker process of a fleet.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {}

impl SessionArgs {
    /// The connect timeout in milliseconds, at least one.
    pub fn connect_timeout_ms(&self) -> u64 {
        (self.connect_timeout_secs.max(0.001) * 1000.0) as u64
    }
}

impl TargetArgs {
    /// The first target (--host, --port), then one per --endpoint, alike but for host and
    /// port. Errors name the endpoint that is not `HOST:PORT`.
    pub fn targets(&self) -> Result<Vec<Target>, String> {
        let first = self.target();
        let mut targets = vec![first.clone()];
        for endpoint in &self.endpoints {
            let (host, port) = endpoint
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                .filter(|(h, _)| !h.is_empty())
                .ok_or_else(|| {
                    format!("--endpoint {endpoint:?}: write HOST:PORT, e.g. 127.0.0.1:8884")
                })?;
            let mut target = first.clone();
            target.host = host.to_owned();
            target.port = port;
            targets.push(target);
        }
        Ok(targets)
    }

    /// The target these arguments name.
    pub fn target(&self) -> Target {
        let tls = (self.tls || self.ca.is_some()).then(|| TlsSettings {
            // Without --ca the system has no CA to offer here: the bench is for brokers with
            // a known CA. An empty path fails with a clear message when loaded.
            ca_file: self.ca.clone().unwrap_or_default(),
            server_name: self.server_name.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
            key_exchange: self.session.tls_key_exchange,
        });
        Target {
            host: self.host.clone(),
            port: self.port,
            tls,
            version: self.session.mqtt_version,
            username: self.username.clone(),
            password: self.password.clone(),
            keep_alive: self.session.keep_alive,
            connect_timeout_ms: self.session.connect_timeout_ms(),
        }
    }
}
