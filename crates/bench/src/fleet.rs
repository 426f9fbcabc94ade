//! The fleet run: spawn the workers, drive the phases, read the broker, build the report.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use beckon_identity::{Role, TokenSigner};

use crate::cli::{LoadArgs, Phase};
use crate::conn::{Connector, Target};
use crate::nats::{NatsMonitor, Varz};
use crate::procstat::{ProcReader, ProcSample};
use crate::protocol::{Command, ConnectOutcome, Reply, WakeupOutcome, WorkerConfig};
use crate::publisher::{PublishOutcome, publish_wakeups};
use crate::report::{
    ConnectReport, FanoutReport, FleetReport, IdleReport, NatsReport, NodeMemory, Percentiles,
};
use crate::storm::{StormMethod, StormSetup, endpoint_order};
use crate::tenant::TenantAuth;
use crate::worker_process::{WorkerGroup, WorkerProcess, impl_worker_reply};

/// The broker under test, as far as the bench can see and steer it.
pub trait BrokerControl {
    /// A name for the report.
    fn label(&self) -> String;
    /// Its process id, to read its memory and CPU; `None` when unknown.
    fn pid(&self) -> Option<u32>;
    /// Whether [`BrokerControl::restart`] works (the bench started the broker).
    fn can_restart(&self) -> bool;
    /// Stops the broker, waits `outage`, starts it again and waits until it listens. Returns
    /// when it stopped and when it listened again (Unix ns).
    fn restart(&mut self, outage: Duration) -> anyhow::Result<(u64, u64)>;
}

/// A broker the bench did not start: it can be read (given its pid), not restarted.
#[derive(Debug, Clone)]
pub struct ExternalBroker {
    /// Its pid, if given.
    pub pid: Option<u32>,
    /// Its name in the report.
    pub label: String,
}

impl BrokerControl for ExternalBroker {
    fn label(&self) -> String {
        self.label.clone()
    }
    fn pid(&self) -> Option<u32> {
        self.pid
    }
    fn can_restart(&self) -> bool {
        false
    }
    fn restart(&mut self, _outage: Duration) -> anyhow::Result<(u64, u64)> {
        bail!("the bench did not start this broker and cannot restart it")
    }
}

/// How worker processes are started: `program` followed by `args`, then the worker reads its
/// configuration from stdin.
#[derive(Debug, Clone)]
pub struct WorkerLauncher {
    /// The executable (by default this very program).
    pub program: PathBuf,
    /// Arguments that select the worker mode.
    pub args: Vec<String>,
}

impl WorkerLauncher {
    /// This executable, as `<exe> bench worker`.
    pub fn current_exe() -> anyhow::Result<Self> {
        Ok(Self {
            program: std::env::current_exe()
                .context("cannot find this program's path to start worker processes")?,
            args: vec!["bench".to_owned(), "worker".to_owned()],
        })
    }
}

/// The fleet's worker processes.
pub(crate) type Fleet = WorkerGroup<Reply>;

impl_worker_reply!(Reply);

/// The source addresses for `agents` sockets to a broker at `broker`: 127.0.0.2, .3, ... when
/// the broker is on loopback, none otherwise (the kernel then picks).
pub(crate) fn source_addresses(broker: IpAddr, agents: usize, per_address: usize) -> Vec<Ipv4Addr> {
    if !broker.is_loopback() {
        return Vec::new();
    }
    let count = agents.div_ceil(per_address.max(1)).clamp(1, 250);
    (0..count)
        .map(|i| Ipv4Addr::new(127, 0, 0, u8::try_from(i + 2).unwrap_or(252)))
        .collect()
}

/// The client id of agent `index`.
pub fn agent_id(prefix: &str, index: usize) -> String {
    format!("{prefix}{index:06}")
}

/// What a fleet run may add to agents that all present the target's credentials.
#[derive(Debug, Clone, Default)]
pub struct FleetOptions {
    /// The agents are identities of the bench's tenant, each with a token of its own, and
    /// the publishers its servers (`--tenant-dir`).
    pub tenant: Option<TenantAuth>,
    /// Processes of broker nodes whose memory to read, in the order of the targets: the first
    /// is the first target's (`--node-pid`).
    pub node_pids: Vec<u32>,
    /// nats-server's monitoring URL, to read its `/varz` (`--nats-monitor`).
    pub nats_monitor: Option<String>,
    /// How the storm phase is made (`--storm-kill`, `--storm-restart`).
    pub storm: StormMethod,
}

/// What the phases of one run share.
struct Run<'a> {
    phases: BTreeSet<Phase>,
    target: &'a Target,
    targets: &'a [Target],
    load: &'a LoadArgs,
    connector: std::sync::Arc<Connector>,
    reader: ProcReader,
    /// Signs the publishers' tokens in tenant mode.
    signer: Option<TokenSigner>,
    node_pids: &'a [u32],
    nats: Option<NatsMonitor>,
    storm: &'a StormMethod,
}

/// The client id of the (first) publisher.
fn publisher_id(load: &LoadArgs) -> String {
    format!("{}publisher", load.client_id_prefix)
}

/// Runs the fleet phases against one broker.
pub async fn run_fleet(
    target: &Target,
    load: &LoadArgs,
    broker: &mut dyn BrokerControl,
    launcher: &WorkerLauncher,
) -> anyhow::Result<FleetReport> {
    run_fleet_spread(std::slice::from_ref(target), load, broker, launcher).await
}

/// Runs the fleet phases against the nodes of a cluster: worker processes connect to the
/// targets in turn (at least one worker per target), the publisher and the broker readings
/// use the first.
pub async fn run_fleet_spread(
    targets: &[Target],
    load: &LoadArgs,
    broker: &mut dyn BrokerControl,
    launcher: &WorkerLauncher,
) -> anyhow::Result<FleetReport> {
    run_fleet_with(targets, load, &FleetOptions::default(), broker, launcher).await
}

/// As [`run_fleet_spread`], with tenant agents and readings of the nodes and of NATS as
/// `options` ask.
pub async fn run_fleet_with(
    targets: &[Target],
    load: &LoadArgs,
    options: &FleetOptions,
    broker: &mut dyn BrokerControl,
    launcher: &WorkerLauncher,
) -> anyhow::Result<FleetReport> {
    let Some(target) = targets.first() else {
        bail!("no broker to reach");
    };
    if options.node_pids.len() > targets.len() {
        bail!(
            "{} --node-pid for {} node(s): give at most one per node, the first for --host:--port, \
             then one per --endpoint in their order",
            options.node_pids.len(),
            targets.len()
        );
    }
    let nats = options
        .nats_monitor
        .as_deref()
        .map(NatsMonitor::new)
        .transpose()?;
    check_storm(&options.storm, options, load, broker)?;
    let signer = match &options.tenant {
        None => None,
        Some(tenant) => {
            let signer = tenant.signer()?;
            // An id the identity rules refuse fails here, not in every worker.
            crate::tenant::token(&signer, Role::Agent, &agent_id(&load.client_id_prefix, 0))
                .context("--client-id-prefix")?;
            crate::tenant::await_admission(targets, &signer, &publisher_id(load)).await?;
            Some(signer)
        }
    };
    let phases: BTreeSet<Phase> = load.phases.iter().copied().collect();
    let agents = load.size.agents;
    if agents == 0 {
        bail!("--agents must be at least 1");
    }
    let per_worker = load
        .size
        .agents_per_worker
        .clamp(1, 19_000)
        .min(agents.div_ceil(targets.len()));
    let worker_count = agents.div_ceil(per_worker);
    let connector = std::sync::Arc::new(
        Connector::new(target)
            .await
            .with_context(|| format!("broker {}:{}", target.host, target.port))?,
    );
    let sources = source_addresses(
        connector.addr().ip(),
        agents,
        load.size.agents_per_source_address,
    );
    let reader = ProcReader::new();

    let mut fleet = WorkerGroup(Vec::with_capacity(worker_count));
    let concurrency = load
        .connect_concurrency
        .max(1)
        .div_ceil(worker_count)
        .max(1);
    for worker in 0..worker_count {
        let first_agent = worker * per_worker;
        let config = WorkerConfig {
            worker,
            first_agent,
            agents: per_worker.min(agents - first_agent),
            client_id_prefix: load.client_id_prefix.clone(),
            // The worker's own node first, then the others in the order its agents try them.
            target: targets[worker % targets.len()].clone(),
            failover: endpoint_order(worker, targets.len())
                .skip(1)
                .map(|t| targets[t].clone())
                .collect(),
            source_addresses: sources.clone(),
            agents_per_source_address: load.size.agents_per_source_address.max(1),
            connect_concurrency: concurrency,
            backoff_base_ms: load.backoff_base_ms,
            backoff_cap_ms: load.backoff_cap_secs.saturating_mul(1000),
            tenant: options.tenant.clone(),
        };
        fleet
            .0
            .push(WorkerProcess::spawn("worker", launcher, worker, &config).await?);
    }
    let run = Run {
        phases,
        target,
        targets,
        load,
        connector,
        reader,
        signer,
        node_pids: &options.node_pids,
        nats,
        storm: &options.storm,
    };
    let result = drive(&mut fleet, &run, broker).await;
    fleet.shutdown(&Command::Shutdown).await;
    let mut report = result?;
    report.nodes = targets.len();
    report.workers = worker_count;
    report.source_addresses = sources.len();
    Ok(report)
}

async fn drive(
    fleet: &mut Fleet,
    run: &Run<'_>,
    broker: &mut dyn BrokerControl,
) -> anyhow::Result<FleetReport> {
    let (phases, target, load, reader) = (&run.phases, run.target, run.load, &run.reader);
    let agents = load.size.agents;
    fleet
        .gather(Duration::from_secs(30), "start-up")
        .await
        .context("starting the worker processes")?;
    let mut report = FleetReport {
        broker: broker.label(),
        agents,
        tls: target.tls.is_some(),
        tls_key_exchange: target.tls.as_ref().map(|t| t.key_exchange),
        mqtt_version: target.version,
        workers: 0,
        nodes: 1,
        source_addresses: 0,
        connect: None,
        idle: None,
        fanout: None,
        storm: None,
        fanout_after_storm: None,
        tenant: run
            .signer
            .as_ref()
            .map(|_| crate::tenant::TENANT.to_owned()),
        node_memory: Vec::new(),
        nats: None,
    };

    // Connect (always: every other phase needs the fleet connected).
    let before_connect = read_broker(reader, broker, "before the connect phase")?;
    let nodes_before = run
        .node_pids
        .iter()
        .map(|&pid| {
            crate::procstat::rss_kib(pid)
                .with_context(|| format!("--node-pid {pid} before the connect phase"))
        })
        .collect::<anyhow::Result<Vec<u64>>>()?;
    let nats_before = match &run.nats {
        Some(nats) => Some(
            nats.read()
                .await
                .context("--nats-monitor before the connect phase")?,
        ),
        None => None,
    };
    fleet.broadcast(&Command::Connect).await?;
    // Each agent's connect is bounded; the phase is bounded by the slowest wave of them.
    let waves = agents.div_ceil(load.connect_concurrency.max(1));
    let connect_bound = target
        .connect_timeout()
        .saturating_mul(2)
        .saturating_mul(u32::try_from(waves).unwrap_or(u32::MAX))
        .min(Duration::from_secs(3600))
        + Duration::from_secs(30);
    // Worker `w` connected its agents to target `w % targets`.
    let mut connected_per_target = vec![0; run.targets.len()];
    let connected: Vec<ConnectOutcome> = fleet
        .gather(connect_bound, "connect phase")
        .await?
        .into_iter()
        .enumerate()
        .filter_map(|(worker, r)| match r {
            Reply::Connected(c) => {
                connected_per_target[worker % run.targets.len()] += c.connected;
                Some(c)
            }
            _ => None,
        })
        .collect();
    let connect = merge_connect(&connected);
    let connected_count = connect.connected;
    report.connect = Some(connect);

    if phases.contains(&Phase::Idle) {
        let settle = Duration::from_secs_f64(load.settle_secs.max(0.0));
        tokio::time::sleep(settle).await;
        let after = read_broker(reader, broker, "after the idle settle time")?;
        report.idle = Some(idle_report(
            before_connect,
            after,
            connected_count,
            load.settle_secs,
        ));
    }
    report.node_memory = run
        .node_pids
        .iter()
        .zip(&nodes_before)
        .zip(run.targets.iter().zip(&connected_per_target))
        .map(|((&pid, &before), (target, &agents))| {
            node_memory(
                pid,
                format!("{}:{}", target.host, target.port),
                agents,
                before,
                crate::procstat::rss_kib(pid).map_err(|e| e.to_string()),
            )
        })
        .collect();
    if let (Some(nats), Some(before)) = (&run.nats, nats_before) {
        let after = nats.read().await.map_err(|e| format!("{e:#}"));
        report.nats = Some(nats_report(nats.url(), connected_count, before, after));
    }

    if phases.contains(&Phase::Fanout) {
        report.fanout = Some(fan_out(fleet, run, broker).await?);
    }

    if phases.contains(&Phase::Storm) {
        let setup = StormSetup {
            method: run.storm,
            load,
            targets: run.targets,
            node_pids: run.node_pids,
            nats: run.nats.as_ref(),
        };
        report.storm = Some(crate::storm::storm(fleet, broker, &setup).await?);
        if phases.contains(&Phase::FanoutAfterStorm) {
            report.fanout_after_storm = Some(fan_out(fleet, run, broker).await?);
        }
    }
    Ok(report)
}

/// Refuses a storm method that cannot run as asked, before any agent connects.
fn check_storm(
    method: &StormMethod,
    options: &FleetOptions,
    load: &LoadArgs,
    broker: &dyn BrokerControl,
) -> anyhow::Result<()> {
    let (option, pid) = match method {
        StormMethod::Broker => return Ok(()),
        StormMethod::KillNode { pid } => ("--storm-kill", *pid),
        StormMethod::RestartNats { pid, .. } => ("--storm-restart", *pid),
    };
    if broker.can_restart() {
        bail!("{option} replaces the broker restart of the storm: the bench started this broker");
    }
    if !load.phases.contains(&Phase::Storm) {
        bail!("{option} makes the storm phase: add storm to --phases");
    }
    if broker.pid() == Some(pid) {
        bail!("{option} {pid} is also --broker-pid: the broker read after the storm would be gone");
    }
    match method {
        StormMethod::KillNode { .. } => {
            if options.node_pids.first() == Some(&pid) {
                bail!(
                    "--storm-kill {pid} is the first node (--host:--port), where the publisher connects: kill another node"
                );
            }
            crate::storm::check_running(pid, option)
        }
        _ => crate::storm::ProcessImage::read(pid, option).map(drop),
    }
}

/// Reads the broker's memory and CPU, when its pid is known (asked each time: a restart
/// changes it).
fn read_broker(
    reader: &ProcReader,
    broker: &dyn BrokerControl,
    what: &str,
) -> anyhow::Result<Option<ProcSample>> {
    broker
        .pid()
        .map(|pid| {
            reader
                .sample(pid)
                .with_context(|| format!("reading the broker {what}"))
        })
        .transpose()
}

fn merge_connect(outcomes: &[ConnectOutcome]) -> ConnectReport {
    let mut latencies: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| o.latencies_us.iter().copied())
        .collect();
    let started = outcomes
        .iter()
        .map(|o| o.started_unix_ns)
        .min()
        .unwrap_or(0);
    let finished = outcomes
        .iter()
        .map(|o| o.finished_unix_ns)
        .max()
        .unwrap_or(0);
    let connected: usize = outcomes.iter().map(|o| o.connected).sum();
    let duration_s = finished.saturating_sub(started) as f64 / 1e9;
    ConnectReport {
        attempted: outcomes.iter().map(|o| o.attempted).sum(),
        connected,
        failed: outcomes.iter().map(|o| o.failed).sum(),
        first_error: outcomes.iter().find_map(|o| o.first_error.clone()),
        duration_s,
        rate_per_s: (duration_s > 0.0).then(|| connected as f64 / duration_s),
        latency_ms: Percentiles::of_micros(&mut latencies),
    }
}

fn idle_report(
    before: Option<ProcSample>,
    after: Option<ProcSample>,
    connected: usize,
    settle_secs: f64,
) -> IdleReport {
    let (rss_per_connection_kib, cpu_per_connect_us, rss_before_kib, rss_after_kib) =
        match (before, after) {
            (Some(b), Some(a)) if connected > 0 => (
                Some((a.rss_kib as f64 - b.rss_kib as f64) / connected as f64),
                Some(a.cpu.saturating_sub(b.cpu).as_secs_f64() * 1e6 / connected as f64),
                Some(b.rss_kib),
                Some(a.rss_kib),
            ),
            _ => (
                None,
                None,
                before.map(|b| b.rss_kib),
                after.map(|a| a.rss_kib),
            ),
        };
    IdleReport {
        settle_s: settle_secs,
        rss_before_kib,
        rss_after_kib,
        rss_per_connection_kib,
        cpu_per_connect_us,
    }
}

/// One node's memory figures from its two readings.
fn node_memory(
    pid: u32,
    endpoint: String,
    agents: usize,
    before: u64,
    after: Result<u64, String>,
) -> NodeMemory {
    let (after, error) = match after {
        Ok(kib) => (Some(kib), None),
        Err(e) => (None, Some(e)),
    };
    NodeMemory {
        endpoint,
        pid,
        agents,
        rss_before_kib: before,
        rss_after_kib: after,
        rss_per_agent_kib: after
            .filter(|_| agents > 0)
            .map(|a| (a as f64 - before as f64) / agents as f64),
        error,
    }
}

/// nats-server's figures from its two readings.
fn nats_report(
    url: String,
    agents: usize,
    before: Varz,
    after: Result<Varz, String>,
) -> NatsReport {
    let (after, error) = match after {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    let per_agent = |b: u64, a: u64| (a as f64 - b as f64) / agents as f64;
    let measured = after.filter(|_| agents > 0);
    NatsReport {
        url,
        agents,
        mem_before_kib: before.mem_bytes / 1024,
        mem_after_kib: after.map(|a| a.mem_bytes / 1024),
        mem_per_agent_kib: measured.map(|a| per_agent(before.mem_bytes, a.mem_bytes) / 1024.0),
        subscriptions_before: before.subscriptions,
        subscriptions_after: after.map(|a| a.subscriptions),
        subscriptions_per_agent: measured.map(|a| per_agent(before.subscriptions, a.subscriptions)),
        connections_before: before.connections,
        connections_after: after.map(|a| a.connections),
        error,
    }
}

async fn fan_out(
    fleet: &mut Fleet,
    run: &Run<'_>,
    broker: &dyn BrokerControl,
) -> anyhow::Result<FanoutReport> {
    let (connector, load, reader) = (&run.connector, run.load, &run.reader);
    let ids: Vec<String> = (0..load.size.agents)
        .map(|i| agent_id(&load.client_id_prefix, i))
        .collect();
    fleet.broadcast(&Command::ArmWakeups).await?;
    fleet
        .gather(Duration::from_secs(30), "arming the fan-out")
        .await?;
    let wait = Duration::from_secs_f64(load.fanout_wait_secs.max(0.1));
    let before = read_broker(reader, broker, "before the fan-out")?;
    // In tenant mode each publisher connection is a server of the tenant, with its token.
    let password_for = |id: &str| {
        run.signer
            .as_ref()
            .and_then(|signer| crate::tenant::token(signer, Role::Server, id).ok())
    };
    let published = publish_wakeups(
        connector,
        &publisher_id(load),
        password_for,
        &ids,
        load.publishers,
        load.publish_window,
        wait,
    )
    .await
    .unwrap_or_else(|e| {
        // Reported, not fatal: the other phases still tell something.
        PublishOutcome::failed(
            load.publishers,
            format!("the publisher could not connect: {e}"),
        )
    });
    // Nothing was sent: nothing to wait for.
    let collect_wait = if published.sent == 0 {
        Duration::ZERO
    } else {
        wait
    };
    fleet
        .broadcast(&Command::CollectWakeups {
            wait_ms: u64::try_from(collect_wait.as_millis()).unwrap_or(u64::MAX),
        })
        .await?;
    let outcomes: Vec<WakeupOutcome> = fleet
        .gather(wait + Duration::from_secs(30), "fan-out")
        .await?
        .into_iter()
        .filter_map(|r| match r {
            Reply::Wakeups(w) => Some(w),
            _ => None,
        })
        .collect();
    let after = read_broker(reader, broker, "after the fan-out")?;
    let mut latencies: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| o.latencies_us.iter().copied())
        .collect();
    let expected: usize = outcomes.iter().map(|o| o.expected).sum();
    let delivered: usize = outcomes.iter().map(|o| o.received).sum();
    let last = outcomes.iter().filter_map(|o| o.last_arrival_unix_ns).max();
    Ok(FanoutReport {
        published: published.sent,
        publishers: published.publishers,
        acknowledged: published.acked,
        window: published.window,
        publisher_error: published.error,
        expected,
        delivered,
        missing: expected.saturating_sub(delivered),
        duplicates: outcomes.iter().map(|o| o.duplicates).sum(),
        publish_s: published
            .written_unix_ns
            .saturating_sub(published.started_unix_ns) as f64
            / 1e9,
        last_arrival_s: last.map(|t| t.saturating_sub(published.started_unix_ns) as f64 / 1e9),
        latency_ms: Percentiles::of_micros(&mut latencies),
        cpu_per_wakeup_us: match (before, after) {
            (Some(b), Some(a)) if delivered > 0 => {
                Some(a.cpu.saturating_sub(b.cpu).as_secs_f64() * 1e6 / delivered as f64)
            }
            _ => None,
        },
        wait_s: wait.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_brokers_get_several_source_addresses() {
        let addrs = source_addresses(IpAddr::V4(Ipv4Addr::LOCALHOST), 19_000, 5_000);
        assert_eq!(
            addrs,
            vec![
                Ipv4Addr::new(127, 0, 0, 2),
                Ipv4Addr::new(127, 0, 0, 3),
                Ipv4Addr::new(127, 0, 0, 4),
                Ipv4Addr::new(127, 0, 0, 5)
            ]
        );
        assert!(source_addresses(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 10, 5).is_empty());
    }
}
