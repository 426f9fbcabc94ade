//! `beckon bench call`: one wake-up call to a whole fleet through the console, timed from the
//! API request until the console's state says every agent is `delivered`.
//!
//! The bench starts a real `beckon console` and a real `beckon broker` (release builds of the
//! program that runs it, or `--beckon-bin`) as separate processes on loopback, in a fresh
//! data folder: the console first (it creates its tenant CA and wake-up signing key), then
//! the broker with a server certificate from that CA and the console's tenant file, as
//! `beckon up` wires them. Every simulated agent enrolls through the console's real
//! enrollment API (`POST /api/v1/enroll`, its own P-256 key pair and CSR, an enrollment token
//! made through the API), connects to the broker over TLS with the certificate it got, and
//! subscribes to its own wake-up topic. The agents live in worker processes (`bench
//! call-worker`), at most `--agents-per-worker` each, bound to source addresses 127.0.0.2, ...
//!
//! Then ONE call (`POST /api/v1/calls`, target `all`) and the readings:
//! - the API's response time;
//! - when the console reported the last `sent` and the last `delivered` state change, read
//!   live from its Server-Sent Events (`GET /api/v1/events`, subscribed before the call), and
//!   the same from the stored per-agent times (`GET /api/v1/calls/{id}` at the end);
//! - per agent: the wake-up's arrival at the agent (after the request) and the console's
//!   `delivered_at`, p50/p99/max;
//! - every agent checks the wake-up's signature, expiry and replay with the console's key as
//!   the agent does, and only then acknowledges (`received`, optionally `started` and
//!   `finished`); a refused wake-up is counted and fails the run;
//! - the console's and the broker's CPU time over the call and the console's RSS.

pub(crate) mod http;
pub(crate) mod measure;
pub(crate) mod setup;
pub(crate) mod the_call;
pub mod worker;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use beckon_pki::CertificateAuthority;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::cli::FleetSize;
use crate::procstat::{ProcReader, ProcSample};
use crate::protocol::unix_ns;
use crate::report::{Percentiles, format_value};
use http::HttpClient;
use measure::measure;
use setup::{Service, free_port, start_service};
use the_call::the_call;
pub use worker::{AckStages, run_call_worker};
use worker::{CallCommand, CallReply, CallWorkerConfig, PhaseOutcome, WakeOutcome};

/// Bound on each API request the bench makes (not the timed call itself, which is measured).
const API_LIMIT: Duration = Duration::from_secs(60);

/// `beckon bench call`.
#[derive(Debug, Clone, clap::Args)]
pub struct CallArgs {
    /// How many simulated agents (each enrolled with its own identity), in how many workers.
    #[command(flatten)]
    pub size: FleetSize,
    /// Enrollments in flight at once, over all workers.
    #[arg(long, default_value_t = 8)]
    pub enroll_concurrency: usize,
    /// Connects in flight at once, over all workers.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Acks each agent publishes: `received` only, or `finished` (received, started,
    /// finished at once).
    #[arg(long, value_enum, default_value = "received")]
    pub acks: AckStages,
    /// Beckon executable that runs `console` and `broker` (default: this program).
    #[arg(long, value_name = "PATH")]
    pub beckon_bin: Option<PathBuf>,
    /// Folder for the run's data (console, broker, logs); a fresh temporary folder, removed
    /// afterwards, by default. It must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// A broker limit for this run, `KEY=VALUE` of the `[limits]` table (e.g.
    /// `receive_maximum=1000`); repeat for several. Default: the broker's own limits.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_limit)]
    pub broker_limit: Vec<(String, u64)>,
    /// Calls to every agent made (each until all are `delivered`) before the measured one:
    /// the console keeps every call's deliveries, so a console in use has history.
    #[arg(long, default_value_t = 0)]
    pub earlier_calls: usize,
    /// Wait before the call, once every agent is online in the console, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub settle_secs: f64,
    /// Bound on the wait for every agent to be `delivered`, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub wait_secs: f64,
    /// Agent ids are this prefix and the agent's number.
    #[arg(long, default_value = "call-agent-")]
    pub id_prefix: String,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What a call run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CallReport {
    /// Agents asked for.
    pub agents: usize,
    /// Acks the agents publish.
    pub acks: String,
    /// The load average when the call was made (1, 5, 15 minutes): the machine is shared.
    pub load_average: Option<[f64; 3]>,
    /// Agents enrolled through the API.
    pub enrolled: usize,
    /// Enrollment: time for all, seconds.
    pub enroll_s: f64,
    /// Agents connected and subscribed.
    pub connected: usize,
    /// Connect: time for all, seconds.
    pub connect_s: f64,
    /// From the last connect until the console counted every agent online, seconds.
    pub console_online_wait_s: f64,
    /// Agents the console had online when the call was made.
    pub console_online: u64,
    /// Calls made before the measured one, and how long they took together, seconds.
    #[serde(default)]
    pub earlier_calls: usize,
    #[serde(default)]
    pub earlier_calls_s: f64,
    /// The call's id.
    pub call_id: Option<String>,
    /// Agents the call addressed (from the API's answer).
    pub call_agents: u64,
    /// `POST /api/v1/calls` response time, milliseconds.
    pub api_response_ms: f64,
    /// From the request until the console's event for the last `sent`, milliseconds.
    pub all_sent_ms: Option<f64>,
    /// From the request until the console's event for the last `delivered`, milliseconds.
    pub all_delivered_ms: Option<f64>,
    /// The same from the stored `sent_at` (ms grain).
    pub all_sent_stored_ms: Option<f64>,
    /// The same from the stored `delivered_at` (ms grain).
    pub all_delivered_stored_ms: Option<f64>,
    /// Deliveries per state at the end.
    pub states: std::collections::BTreeMap<String, u64>,
    /// Agents `delivered` or further at the end.
    pub delivered: u64,
    /// Addressed agents not `delivered` at the end.
    pub missing: u64,
    /// Per agent: from the request until the wake-up arrived at the agent.
    pub arrival_ms: Option<Percentiles>,
    /// Per agent: from the request until the console's `delivered_at`.
    pub delivered_latency_ms: Option<Percentiles>,
    /// Wake-ups the agents refused (signature, expiry, identity, replay).
    pub rejected: usize,
    /// The first refusal.
    pub first_rejection: Option<String>,
    /// Wake-ups beyond the first per agent.
    pub duplicates: usize,
    /// Live events the console dropped for the bench's slow reading (SSE `lagged`).
    pub events_missed: u64,
    /// Console CPU time from the request until all delivered, milliseconds.
    pub console_cpu_ms: Option<f64>,
    /// Console CPU per addressed agent, microseconds.
    pub console_cpu_per_agent_us: Option<f64>,
    /// Broker CPU time over the same span, milliseconds.
    pub broker_cpu_ms: Option<f64>,
    /// CPU time of the simulated agents (the bench's workers: TLS, signature checks, acks)
    /// over the same span, milliseconds: work that shares the machine's cores.
    pub agents_cpu_ms: Option<f64>,
    /// Console RSS before the call, KiB.
    pub console_rss_before_kib: Option<u64>,
    /// Console RSS when all were delivered, KiB.
    pub console_rss_after_kib: Option<u64>,
    /// Messages the broker dropped over the whole run (its metrics: queue full, expired,
    /// too large).
    pub broker_messages_dropped: Option<u64>,
    /// First failure of enrollment or connect, if any.
    pub first_error: Option<String>,
}

impl CallReport {
    /// The report as a table for people.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let f = |v: Option<f64>| format_value(v);
        let pct = |p: &Option<Percentiles>| {
            p.map_or_else(
                || "-".to_owned(),
                |p| {
                    format!(
                        "{} / {} / {}",
                        format_value(Some(p.p50_ms)),
                        format_value(Some(p.p99_ms)),
                        format_value(Some(p.max_ms))
                    )
                },
            )
        };
        let rows: Vec<(&str, String)> = vec![
            ("agents", self.agents.to_string()),
            ("acks published", self.acks.clone()),
            (
                "load average (1/5/15 min)",
                self.load_average.map_or_else(
                    || "-".into(),
                    |l| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]),
                ),
            ),
            ("enrolled through the API", self.enrolled.to_string()),
            ("enrollment: all (s)", f(Some(self.enroll_s))),
            ("connected and subscribed", self.connected.to_string()),
            ("connect: all (s)", f(Some(self.connect_s))),
            ("online in the console", self.console_online.to_string()),
            (
                "earlier calls: how many / all (s)",
                format!("{} / {}", self.earlier_calls, f(Some(self.earlier_calls_s))),
            ),
            ("agents addressed by the call", self.call_agents.to_string()),
            ("API response (ms)", f(Some(self.api_response_ms))),
            ("all sent, live events (ms)", f(self.all_sent_ms)),
            ("all delivered, live events (ms)", f(self.all_delivered_ms)),
            ("all sent, stored times (ms)", f(self.all_sent_stored_ms)),
            (
                "all delivered, stored times (ms)",
                f(self.all_delivered_stored_ms),
            ),
            ("delivered", self.delivered.to_string()),
            ("missing", self.missing.to_string()),
            ("arrival at agent p50/p99/max (ms)", pct(&self.arrival_ms)),
            (
                "delivered_at p50/p99/max (ms)",
                pct(&self.delivered_latency_ms),
            ),
            ("wake-ups refused by agents", self.rejected.to_string()),
            ("duplicate wake-ups", self.duplicates.to_string()),
            ("live events missed", self.events_missed.to_string()),
            ("console CPU (ms)", f(self.console_cpu_ms)),
            (
                "console CPU per agent (us)",
                f(self.console_cpu_per_agent_us),
            ),
            ("broker CPU (ms)", f(self.broker_cpu_ms)),
            ("simulated agents' CPU (ms)", f(self.agents_cpu_ms)),
            (
                "broker: messages dropped",
                self.broker_messages_dropped
                    .map_or_else(|| "-".into(), |d| d.to_string()),
            ),
            (
                "console RSS before / after (MiB)",
                format!(
                    "{} / {}",
                    f(self.console_rss_before_kib.map(|k| k as f64 / 1024.0)),
                    f(self.console_rss_after_kib.map(|k| k as f64 / 1024.0))
                ),
            ),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::from("beckon bench call: one wake-up call through the console\n\n");
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<width$}  {v}");
        }
        if let Some(e) = &self.first_error {
            let _ = writeln!(out, "\n  first error: {e}");
        }
        if let Some(e) = &self.first_rejection {
            let _ = writeln!(out, "  first refused wake-up: {e}");
        }
        out
    }

    /// Why the run failed, if it did: an agent not enrolled, connected or delivered, or a
    /// wake-up refused.
    pub fn failure(&self) -> Option<String> {
        let mut why = Vec::new();
        if self.enrolled < self.agents {
            why.push(format!(
                "{} agent(s) not enrolled",
                self.agents - self.enrolled
            ));
        }
        if self.connected < self.enrolled {
            why.push(format!(
                "{} agent(s) not connected",
                self.enrolled - self.connected
            ));
        }
        if self.missing > 0 {
            why.push(format!("{} agent(s) not delivered", self.missing));
        }
        if self.rejected > 0 {
            why.push(format!("{} wake-up(s) refused by agents", self.rejected));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// Runs `beckon bench call` and prints its report.
pub async fn call_command(args: &CallArgs) -> anyhow::Result<()> {
    let report = run_call(args).await?;
    crate::print_report(&report, args.json, report.table())?;
    if let Some(why) = report.failure() {
        bail!("the call did not reach every agent: {why}");
    }
    Ok(())
}

fn parse_limit(text: &str) -> Result<(String, u64), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    let key = key.trim();
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return Err(format!(
            "{key:?} is not a key of the broker's [limits] table"
        ));
    }
    let value = value
        .trim()
        .parse::<u64>()
        .map_err(|e| format!("{key}: {value:?} is not a whole number: {e}"))?;
    Ok((key.to_owned(), value))
}

pub(crate) async fn api(
    client: &mut HttpClient,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    expect: u16,
) -> anyhow::Result<serde_json::Value> {
    let r = client
        .request(method, path, body.as_ref(), API_LIMIT)
        .await
        .with_context(|| format!("{method} {path}"))?;
    if r.status != expect {
        bail!(
            "{method} {path} answered {} (expected {expect}): {}",
            r.status,
            r.error_message()
        );
    }
    r.json()
        .with_context(|| format!("{method} {path}: the answer is not JSON"))
}

/// Runs the whole bench: services, enrollment, connects, the call, the readings.
pub async fn run_call(args: &CallArgs) -> anyhow::Result<CallReport> {
    if args.size.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let program = crate::beckon_program(args.beckon_bin.as_ref())?;
    let temp;
    let data = match &args.data_dir {
        Some(d) => {
            if d.exists()
                && std::fs::read_dir(d)
                    .with_context(|| format!("reading {}", d.display()))?
                    .next()
                    .is_some()
            {
                bail!(
                    "--data-dir {} is not empty: the bench needs a fresh console and broker",
                    d.display()
                );
            }
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("beckon-bench-call-")
                .tempdir()
                .context("creating a temporary folder")?;
            temp.path().to_owned()
        }
    };
    let console_dir = data.join("console");
    let broker_dir = data.join("broker");
    let tenants_dir = broker_dir.join("tenants");
    std::fs::create_dir_all(&tenants_dir)
        .with_context(|| format!("creating {}", tenants_dir.display()))?;

    // The console first: it makes its CA and signing key, then keeps trying the broker.
    let console_port = free_port()?;
    let broker_port = free_port()?;
    let console_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, console_port));
    let broker_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, broker_port));
    let console_args: Vec<String> = [
        "console",
        "--data-dir",
        &console_dir.display().to_string(),
        "--listen",
        &console_addr.to_string(),
        "--plain-http",
        "--broker",
        &format!("mqtts://localhost:{broker_port}"),
        "--agent-broker-endpoint",
        &format!("localhost:{broker_port}"),
        // The console writes the broker's tenant file itself, before it listens.
        "--broker-tenant-file",
        &tenants_dir.join("default.toml").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (console, console_out) = start_service(
        "console",
        &program,
        &console_args,
        &[],
        &data.join("console.log"),
        "password",
    )
    .await?;
    let password = console_out
        .iter()
        .find_map(|l| {
            l.split("password ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
        })
        .context("the console printed no first password")?
        .to_owned();

    let ca = CertificateAuthority::load(
        &console_dir.join("tenant-ca.pem"),
        &console_dir.join("tenant-ca.key"),
    )
    .context("loading the console's tenant CA")?;
    let names = ["localhost", "127.0.0.1"].map(String::from);
    ca.issue_server(&names, Duration::from_secs(30 * 24 * 3600))?
        .save(
            &broker_dir.join("server.pem"),
            &broker_dir.join("server.key"),
        )
        .context("writing the broker's certificate")?;
    let mut broker_args: Vec<String> = vec![
        "broker".into(),
        "--mqtts".into(),
        broker_addr.to_string(),
        "--cert".into(),
        broker_dir.join("server.pem").display().to_string(),
        "--key".into(),
        broker_dir.join("server.key").display().to_string(),
        "--tenants-dir".into(),
        tenants_dir.display().to_string(),
        "--data".into(),
        broker_dir.display().to_string(),
    ];
    if !args.broker_limit.is_empty() {
        let file = broker_dir.join("broker.toml");
        let mut text = String::from("[limits]\n");
        for (key, value) in &args.broker_limit {
            text.push_str(&format!("{key} = {value}\n"));
        }
        std::fs::write(&file, text).context("writing the broker's configuration")?;
        broker_args.push("--config".into());
        broker_args.push(file.display().to_string());
    }
    // Its metrics tell whether it dropped messages (a full queue towards the console).
    let admin_port = free_port()?;
    broker_args.push("--admin".into());
    broker_args.push(format!("127.0.0.1:{admin_port}"));
    let (broker, _) = start_service(
        "broker",
        &program,
        &broker_args,
        &[(
            "BECKON_TLS_CLIENT_CA",
            console_dir.join("tenant-ca.pem").display().to_string(),
        )],
        &data.join("broker.log"),
        "ready",
    )
    .await?;

    let admin_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, admin_port));
    let result = measure(
        args,
        admin_addr,
        console_addr,
        broker_addr,
        &password,
        &console,
        &broker,
    )
    .await;
    broker.stop().await;
    console.stop().await;
    result
}
