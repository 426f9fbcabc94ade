//! A worker process: runs its share of the agents and answers the parent's commands.
//!
//! The fleet is split over processes because one process may open only so many files; each
//! worker reads its [`WorkerConfig`] from the first line of stdin, then commands, and writes
//! one JSON reply per command on stdout. Logs and errors go to stderr.

use std::io::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::de::DeserializeOwned;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

use crate::agent::{self, AgentContext, AgentEvent, AgentSpec, Control};
use crate::conn::Connector;
use crate::protocol::{
    Command, ConnectOutcome, Reply, StormOutcome, WakeupOutcome, WorkerConfig, unix_ns,
};
use crate::worker_process::WorkerReply;

/// Bound on the whole connect phase of one worker; an agent's own connect is bounded by the
/// connect timeout, so this only guards against a bench bug.
const CONNECT_PHASE_LIMIT: Duration = Duration::from_secs(3600);

/// Bound on how long the worker waits for its agents to close at shutdown.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    connected: bool,
    initial_ok: bool,
    wakeups: u32,
    back: bool,
    /// Lost its connection since the storm was armed (counted with `lost_only`).
    lost: bool,
}

/// What the worker waits for before it answers.
enum Pending {
    Connect,
    Wakeups {
        deadline: Instant,
    },
    /// Not answered before `settle` unless the wait ends first.
    Storm {
        deadline: Instant,
        settle: Instant,
    },
}

struct State {
    slots: Vec<Slot>,
    initial_reported: usize,
    connect: ConnectOutcome,
    wake: WakeupOutcome,
    wake_expected: usize,
    storm: StormOutcome,
    storm_armed: bool,
    /// Count only the agents that lose their connection after the arming.
    storm_lost_only: bool,
}

/// Runs a worker on the current thread until the parent says shutdown or closes stdin.
pub fn run_worker() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("worker: cannot start the async runtime")?;
    runtime.block_on(worker_main())
}

/// Lines of stdin, read on their own thread (stdin is a blocking file); the channel closes
/// when stdin does.
pub(crate) fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Sends one reply line to the parent (the fleet's and the call's workers alike).
pub(crate) fn reply(reply: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut line = serde_json::to_string(reply).context("worker: cannot encode a reply")?;
    line.push('\n');
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(line.as_bytes())
        .and_then(|()| stdout.flush())
        .context("worker: the parent stopped reading (stdout closed)")
}

/// Reads a command line from the parent; an unreadable one is answered with a failure reply
/// (`R`) naming `name` `index`, and gives `None`.
pub(crate) fn read_command<C: DeserializeOwned, R: WorkerReply>(
    line: &str,
    name: &str,
    index: usize,
) -> anyhow::Result<Option<C>> {
    match serde_json::from_str(line) {
        Ok(command) => Ok(Some(command)),
        Err(e) => {
            reply(&R::failed(format!("{name} {index}: bad command: {e}")))?;
            Ok(None)
        }
    }
}

/// Reads the configuration line and builds what every agent of this worker shares.
async fn start(
    lines: &mut mpsc::UnboundedReceiver<String>,
) -> anyhow::Result<(
    WorkerConfig,
    Arc<AgentContext>,
    mpsc::UnboundedReceiver<AgentEvent>,
    Vec<String>,
)> {
    let first = lines
        .recv()
        .await
        .context("worker: stdin closed before the configuration line")?;
    let config: WorkerConfig =
        serde_json::from_str(&first).context("worker: the configuration line is not valid")?;
    let mut connectors = Vec::with_capacity(1 + config.failover.len());
    for target in std::iter::once(&config.target).chain(&config.failover) {
        match Connector::new(target).await {
            Ok(c) => connectors.push(c),
            Err(e) => {
                reply(&Reply::Failed {
                    message: format!(
                        "worker {} ({}:{}): {e}",
                        config.worker, target.host, target.port
                    ),
                })?;
                return Err(e.into());
            }
        }
    }
    let backoff = beckon_net::BackoffConfig {
        base: Duration::from_millis(config.backoff_base_ms),
        cap: Duration::from_millis(config.backoff_cap_ms),
        ..beckon_net::BackoffConfig::default()
    };
    if let Err(e) = beckon_net::Backoff::new(backoff) {
        reply(&Reply::Failed {
            message: format!("worker {}: reconnect backoff: {e}", config.worker),
        })?;
        return Err(e.into());
    }
    let passwords = match agent_passwords(&config) {
        Ok(p) => p,
        Err(e) => {
            reply(&Reply::Failed {
                message: format!("worker {}: {e:#}", config.worker),
            })?;
            return Err(e);
        }
    };
    let (events_tx, events) = mpsc::unbounded_channel();
    let ctx = Arc::new(AgentContext {
        connectors,
        connect_gate: Semaphore::new(config.connect_concurrency.max(1)),
        backoff,
        events: events_tx,
        subscribe_timeout: config.target.connect_timeout(),
    });
    Ok((config, ctx, events, passwords))
}

/// The tokens of this worker's agents in the bench's tenant, made here before the connect
/// phase (signing is cheap, but not part of what the connect phase measures); empty without
/// a tenant.
fn agent_passwords(config: &WorkerConfig) -> anyhow::Result<Vec<String>> {
    let Some(tenant) = &config.tenant else {
        return Ok(Vec::new());
    };
    let signer = tenant.signer()?;
    (0..config.agents)
        .map(|local| {
            let id = crate::agent_id(&config.client_id_prefix, config.first_agent + local);
            crate::tenant::token(&signer, beckon_identity::Role::Agent, &id)
        })
        .collect()
}

async fn worker_main() -> anyhow::Result<()> {
    let mut lines = stdin_lines();
    let (config, ctx, mut events, mut passwords) = start(&mut lines).await?;
    let (control_tx, control_rx) = watch::channel(Control::default());
    let mut agents = tokio::task::JoinSet::new();
    let mut state = State {
        slots: vec![Slot::default(); config.agents],
        initial_reported: 0,
        connect: ConnectOutcome::default(),
        wake: WakeupOutcome::default(),
        wake_expected: 0,
        storm: StormOutcome::default(),
        storm_armed: false,
        storm_lost_only: false,
    };
    let mut pending: Option<Pending> = None;
    let mut started = false;
    // One timer for the loop, moved only when the deadline changes: a fresh sleep per agent
    // event would register and cancel a timer for every wake-up the fleet receives.
    let mut deadline = Instant::now() + Duration::from_secs(86_400);
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    let mut batch = Vec::with_capacity(256);
    reply(&Reply::Ready {
        pid: std::process::id(),
    })?;

    loop {
        // Answer as soon as what is pending is complete.
        if let Some(p) = &pending
            && let Some(answer) = complete(p, &mut state, false)
        {
            reply(&answer)?;
            pending = None;
        }
        let wanted = match &pending {
            Some(Pending::Wakeups { deadline }) => Some(*deadline),
            Some(Pending::Storm { deadline, settle }) => Some(if Instant::now() < *settle {
                *settle
            } else {
                *deadline
            }),
            Some(Pending::Connect) => Some(deadline.min(Instant::now() + CONNECT_PHASE_LIMIT)),
            None => None,
        };
        let wanted = wanted.unwrap_or(deadline);
        if wanted != deadline {
            deadline = wanted;
            timer.as_mut().reset(deadline);
        }
        tokio::select! {
            line = lines.recv() => {
                // The parent is gone: stop.
                let Some(line) = line else { break };
                let Some(command) = read_command::<Command, Reply>(&line, "worker", config.worker)? else {
                    continue;
                };
                match command {
                    Command::Connect => {
                        if started {
                            reply(&Reply::Failed { message: "connect asked twice".to_owned() })?;
                            continue;
                        }
                        started = true;
                        state.connect.attempted = config.agents;
                        state.connect.started_unix_ns = unix_ns();
                        for local in 0..config.agents {
                            let password = passwords.get_mut(local).map(std::mem::take);
                            let spec = agent_spec(&config, local, password);
                            agents.spawn(agent::run(ctx.clone(), spec, control_rx.clone()));
                        }
                        pending = Some(Pending::Connect);
                    }
                    Command::ArmWakeups => {
                        state.wake = WakeupOutcome::default();
                        for slot in &mut state.slots {
                            slot.wakeups = 0;
                        }
                        state.wake_expected = state.slots.iter().filter(|s| s.connected).count();
                        state.wake.expected = state.wake_expected;
                        reply(&Reply::WakeupsArmed { expected: state.wake_expected })?;
                    }
                    Command::CollectWakeups { wait_ms } => {
                        pending = Some(Pending::Wakeups { deadline: Instant::now() + Duration::from_millis(wait_ms) });
                    }
                    Command::ArmStorm { cut, lost_only } => {
                        state.storm = StormOutcome {
                            back_per_endpoint: vec![0; 1 + config.failover.len()],
                            ..StormOutcome::default()
                        };
                        for slot in &mut state.slots {
                            slot.back = false;
                            slot.lost = false;
                        }
                        // With `lost_only` the expected count grows as connections are lost.
                        state.storm.expected = if lost_only {
                            0
                        } else {
                            state.slots.iter().filter(|s| s.initial_ok).count()
                        };
                        state.storm_armed = true;
                        state.storm_lost_only = lost_only;
                        if cut {
                            control_tx.send_modify(|c| c.cut_generation += 1);
                        }
                        reply(&Reply::StormArmed { expected: state.storm.expected })?;
                    }
                    Command::CollectStorm { wait_ms, settle_ms } => {
                        let now = Instant::now();
                        let deadline = now + Duration::from_millis(wait_ms);
                        let settle = (now + Duration::from_millis(settle_ms)).min(deadline);
                        pending = Some(Pending::Storm { deadline, settle });
                    }
                    Command::Shutdown => break,
                }
            }
            n = events.recv_many(&mut batch, 256) => {
                if n > 0 {
                    for event in batch.drain(..) {
                        record(&mut state, event);
                    }
                }
            }
            () = &mut timer, if pending.is_some() => {
                // The timer may have woken for a storm's settle time, not its deadline.
                let timed_out = match &pending {
                    Some(Pending::Storm { deadline, .. }) => Instant::now() >= *deadline,
                    _ => true,
                };
                if let Some(p) = &pending
                    && let Some(answer) = complete(p, &mut state, timed_out)
                {
                    reply(&answer)?;
                    pending = None;
                }
            }
        }
    }

    control_tx.send_modify(|c| c.shutdown = true);
    let _ = tokio::time::timeout(SHUTDOWN_LIMIT, async {
        while agents.join_next().await.is_some() {}
    })
    .await;
    agents.abort_all();
    // The parent may be gone already; nothing to do about a failed goodbye.
    let _ = reply(&Reply::Bye);
    Ok(())
}

fn agent_spec(config: &WorkerConfig, local: usize, password: Option<String>) -> AgentSpec {
    let global = config.first_agent + local;
    let source = if config.source_addresses.is_empty() {
        None
    } else {
        let slot = global / config.agents_per_source_address.max(1);
        Some(IpAddr::V4(
            config.source_addresses[slot % config.source_addresses.len()],
        ))
    };
    AgentSpec {
        local,
        client_id: crate::agent_id(&config.client_id_prefix, global),
        source,
        password,
    }
}

fn record(state: &mut State, event: AgentEvent) {
    match event {
        AgentEvent::Initial {
            agent,
            result,
            at_unix_ns,
        } => {
            state.initial_reported += 1;
            state.connect.finished_unix_ns = state.connect.finished_unix_ns.max(at_unix_ns);
            match result {
                Ok(latency) => {
                    state.connect.connected += 1;
                    state
                        .connect
                        .latencies_us
                        .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
                    if let Some(slot) = state.slots.get_mut(agent) {
                        slot.connected = true;
                        slot.initial_ok = true;
                    }
                }
                Err(error) => {
                    state.connect.failed += 1;
                    state.connect.first_error.get_or_insert(error);
                }
            }
        }
        AgentEvent::Wakeup {
            agent,
            sent_unix_ns,
            arrived_unix_ns,
        } => {
            let Some(slot) = state.slots.get_mut(agent) else {
                return;
            };
            slot.wakeups += 1;
            if slot.wakeups > 1 {
                state.wake.duplicates += 1;
                return;
            }
            state.wake.received += 1;
            state.wake.last_arrival_unix_ns = Some(
                state
                    .wake
                    .last_arrival_unix_ns
                    .map_or(arrived_unix_ns, |t| t.max(arrived_unix_ns)),
            );
            match sent_unix_ns {
                Some(sent) => state
                    .wake
                    .latencies_us
                    .push(arrived_unix_ns.saturating_sub(sent) / 1000),
                None => state.wake.unreadable += 1,
            }
        }
        AgentEvent::Down { agent } => {
            if let Some(slot) = state.slots.get_mut(agent) {
                slot.connected = false;
                if state.storm_armed && state.storm_lost_only && slot.initial_ok && !slot.lost {
                    slot.lost = true;
                    state.storm.expected += 1;
                }
            }
        }
        AgentEvent::AttemptFailed { error, .. } => {
            if state.storm_armed {
                state.storm.attempts += 1;
                state.storm.first_error.get_or_insert(error);
            }
        }
        AgentEvent::Up {
            agent,
            at_unix_ns,
            endpoint,
        } => {
            let Some(slot) = state.slots.get_mut(agent) else {
                return;
            };
            slot.connected = true;
            if state.storm_armed {
                state.storm.attempts += 1;
                let counted = slot.initial_ok && (slot.lost || !state.storm_lost_only);
                if counted && !slot.back {
                    slot.back = true;
                    state.storm.back += 1;
                    state.storm.back_unix_ns.push(at_unix_ns);
                    if let Some(n) = state.storm.back_per_endpoint.get_mut(endpoint) {
                        *n += 1;
                    }
                }
            }
        }
    }
}

/// The answer to what is pending, if it is complete (or `timed_out`).
fn complete(pending: &Pending, state: &mut State, timed_out: bool) -> Option<Reply> {
    match pending {
        Pending::Connect => (state.initial_reported == state.slots.len() || timed_out)
            .then(|| Reply::Connected(std::mem::take(&mut state.connect))),
        Pending::Wakeups { .. } => (state.wake.received >= state.wake_expected || timed_out)
            .then(|| Reply::Wakeups(std::mem::take(&mut state.wake))),
        Pending::Storm { settle, .. } => {
            let settled = Instant::now() >= *settle;
            ((settled && state.storm.back >= state.storm.expected) || timed_out).then(|| {
                state.storm_armed = false;
                Reply::Storm(std::mem::take(&mut state.storm))
            })
        }
    }
}
