//! `beckon bench`: a fleet of simulated agents against an MQTT broker, and the same fleet
//! against Mosquitto and Beckon side by side.
//!
//! A fleet run has four phases, each optional but the first:
//! - **connect**: every agent connects (TCP, TLS, CONNECT) and subscribes to its own topic
//!   `agents/{id}/wake` at QoS 1: connect rate, latency, failures;
//! - **idle**: after a settle time, the broker's RSS per connection and CPU per connect;
//! - **fan-out**: one QoS 1 wake-up per agent from several publisher connections: time to
//!   the last arrival, latency percentiles (the payload carries the send time), broker CPU
//!   per wake-up, misses, and the publishers' own write time;
//! - **storm**: the broker restarts (or every connection is cut; or, in a cluster, a node is
//!   SIGKILLed or nats-server restarted) and each agent comes back with the agent's
//!   full-jitter backoff, to the next node when its own is gone: time to 99% back, peak
//!   connect rate, stragglers.
//!
//! The agents live in worker processes (this same program, run as `bench worker`), each
//! binding its sockets to several source addresses in 127.0.0.0/8 when the broker is on
//! loopback, so that neither the per-process file limit nor one address's ephemeral ports
//! caps the fleet. Workers and parent speak JSON lines ([`protocol`]).
//!
//! Wiring it into a binary: the worker processes are started as `<this exe> bench worker`,
//! so the binary must route `bench` to [`run`]:
//!
//! ```ignore
//! #[derive(clap::Subcommand)]
//! enum Command {
//!     /// Fleet load generator.
//!     #[command(subcommand)]
//!     Bench(beckon_bench::BenchCommand),
//! }
//! // ...
//! Command::Bench(command) => beckon_bench::run(command),
//! ```
#![forbid(unsafe_code)]

pub mod agent;
pub mod agent_memory;
pub mod call;
pub mod certs;
pub mod cli;
pub mod compare;
pub mod conn;
pub mod console;
pub mod fleet;
pub mod floor;
pub mod nats;
pub mod procstat;
pub mod protocol;
pub mod publisher;
pub mod report;
pub mod storm;
pub mod tenant;
pub mod worker;
mod worker_process;

use anyhow::{Context, bail};

pub use cli::{CompareArgs, FleetArgs, LoadArgs, Phase, WorkerArgs};
pub use fleet::{WorkerLauncher, agent_id};

/// The `beckon` program a bench starts (console, broker, agent): the one given with
/// `--beckon-bin`, else this program.
pub(crate) fn beckon_program(
    given: Option<&std::path::PathBuf>,
) -> anyhow::Result<std::path::PathBuf> {
    match given {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe().context("cannot find this program's path"),
    }
}

/// `beckon bench ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// Simulated agents against any MQTT broker: connect, idle, fan-out and storm phases.
    Fleet(Box<FleetArgs>),
    /// The same fleet against Mosquitto and Beckon, started here, side by side.
    Compare(CompareArgs),
    /// One wake-up call to a fleet through the console: time from the API request until
    /// every agent is `delivered` (starts its own console and broker).
    Call(call::CallArgs),
    /// The console over a large made-up registry (agents, groups, past calls), through its
    /// API: the agents page, dashboard, calls pages, a call to a large group, memory and idle
    /// CPU, each beside its target (starts its own console and broker).
    Console(console::ConsoleBenchArgs),
    /// The resident memory of one real agent, enrolled, connected and idle (starts its own
    /// console and broker with `beckon up`).
    AgentMemory(agent_memory::AgentMemoryArgs),
    /// What the kernel alone charges a broker per wake-up on this machine: one thread
    /// writes a message to each of N idle loopback TCP connections and reads a reply.
    Floor(floor::FloorArgs),
    /// One peer process of a floor run (started by floor).
    #[command(hide = true)]
    FloorPeer(floor::FloorPeerArgs),
    /// One worker process of a fleet (started by fleet and compare).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// One worker process of a call bench (started by call).
    #[command(hide = true)]
    CallWorker,
}

/// The command line of a program that is only the bench: `<program> bench ...`.
#[derive(clap::Parser)]
#[command(
    name = "bench",
    about = "The fleet load generator of beckon, standalone"
)]
struct StandaloneCli {
    #[command(subcommand)]
    top: StandaloneTop,
}

#[derive(clap::Subcommand)]
enum StandaloneTop {
    /// Load generator.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// Reads `bench ...` from this program's command line and runs it: for programs that are
/// only the bench (the standalone example, test programs), which the fleet starts again as
/// its workers (`<program> bench worker`).
pub fn run_standalone() -> anyhow::Result<()> {
    use clap::Parser as _;
    let StandaloneCli {
        top: StandaloneTop::Bench(command),
    } = StandaloneCli::parse();
    run(command)
}

/// Runs a bench command; builds its own async runtime.
pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Worker(_) => worker::run_worker(),
        BenchCommand::CallWorker => call::run_call_worker(),
        BenchCommand::FloorPeer(args) => floor::run_floor_peer(&args),
        BenchCommand::Floor(args) => {
            let program = std::env::current_exe()
                .context("cannot find this program's path to start peer processes")?;
            let report = floor::run_floor(&args, &program)?;
            print_report(&report, args.json, report.table())?;
            Ok(())
        }
        BenchCommand::Call(args) => runtime()?.block_on(call::call_command(&args)),
        BenchCommand::Console(args) => runtime()?.block_on(console::console_command(&args)),
        BenchCommand::AgentMemory(args) => {
            runtime()?.block_on(agent_memory::agent_memory_command(&args))
        }
        BenchCommand::Fleet(args) => {
            let launcher = WorkerLauncher::current_exe()?;
            runtime()?.block_on(fleet_command(&args, &launcher))
        }
        BenchCommand::Compare(args) => {
            let launcher = WorkerLauncher::current_exe()?;
            runtime()?.block_on(compare_command(&args, &launcher))
        }
    }
}

/// Prints a report as pretty JSON, or as its table.
pub(crate) fn print_report(
    report: &impl serde::Serialize,
    json: bool,
    table: String,
) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).context("encoding the report")?
        );
    } else {
        print!("{table}");
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn fleet_command(args: &FleetArgs, launcher: &WorkerLauncher) -> anyhow::Result<()> {
    if args.target.tls && args.target.ca.is_none() {
        bail!("--tls needs --ca FILE: the CA certificate that signs the broker's certificate");
    }
    let targets = args.target.targets().map_err(anyhow::Error::msg)?;
    let mut broker = fleet::ExternalBroker {
        pid: args.broker_pid,
        label: args.label.clone(),
    };
    let tenant = match &args.tenant_dir {
        Some(dir) => {
            let (auth, created) = tenant::prepare(dir)?;
            if created {
                eprintln!(
                    "wrote {}: brokers with tenants_dir = {} load it within their reload interval",
                    tenant::tenant_file(dir).display(),
                    dir.display()
                );
            }
            Some(auth)
        }
        None => None,
    };
    let storm = match (args.storm_kill, args.storm_restart) {
        (Some(pid), _) => storm::StormMethod::KillNode { pid },
        (None, Some(pid)) => storm::StormMethod::RestartNats {
            pid,
            log: restarted_nats_log(args.tenant_dir.as_deref()),
        },
        (None, None) => storm::StormMethod::Broker,
    };
    let options = fleet::FleetOptions {
        tenant,
        node_pids: args.node_pids.clone(),
        nats_monitor: args.nats_monitor.clone(),
        storm,
    };
    let report =
        fleet::run_fleet_with(&targets, &args.load, &options, &mut broker, launcher).await?;
    print_report(&report, args.json, report.table())?;
    Ok(())
}

/// Where a nats-server the bench starts again writes: next to the tenant folder, else nowhere.
fn restarted_nats_log(tenant_dir: Option<&std::path::Path>) -> std::path::PathBuf {
    match tenant_dir {
        Some(dir) => {
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| std::path::Path::new("."));
            parent.join("nats-server-restarted.log")
        }
        None => std::path::PathBuf::from("/dev/null"),
    }
}

async fn compare_command(args: &CompareArgs, launcher: &WorkerLauncher) -> anyhow::Result<()> {
    let report = compare::run_compare(args, launcher).await?;
    print_report(&report, args.json, report.table())?;
    let failed: Vec<String> = report
        .runs
        .iter()
        .filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("{} (round {}): {e}", r.broker, r.round + 1))
        })
        .collect();
    if !failed.is_empty() {
        bail!("{} run(s) failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}
