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

mod http;
pub mod worker;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use beckon_pki::CertificateAuthority;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::procstat::{ProcReader, ProcSample};
use crate::protocol::unix_ns;
use crate::report::{Percentiles, format_value};
use http::HttpClient;
pub use worker::{AckStages, run_call_worker};
use worker::{CallCommand, CallReply, CallWorkerConfig, PhaseOutcome, WakeOutcome};

/// Bound on each API request the bench makes (not the timed call itself, which is measured).
const API_LIMIT: Duration = Duration::from_secs(60);

/// `beckon bench call`.
#[derive(Debug, Clone, clap::Args)]
pub struct CallArgs {
    /// Simulated agents, each enrolled with its own identity.
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// Agents per worker process (a process may open only so many files).
    #[arg(long, default_value_t = 5000)]
    pub agents_per_worker: usize,
    /// Agents per source address (127.0.0.2, .3, ...).
    #[arg(long, default_value_t = 5000)]
    pub agents_per_source_address: usize,
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

/// A process the bench started; killed when dropped.
struct Service {
    child: Child,
    pid: u32,
}

impl Service {
    /// Asks it to stop (SIGTERM) and waits a little, then kills it.
    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
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

/// Starts `program args`, logs to `log`, and waits (at most 60 s) for a stdout line
/// containing `ready`; returns the service and the stdout lines read until then.
async fn start_service(
    name: &'static str,
    program: &Path,
    args: &[String],
    env: &[(&str, String)],
    log: &Path,
    ready: &str,
) -> anyhow::Result<(Service, Vec<String>)> {
    let log_file = std::fs::File::create(log)
        .with_context(|| format!("creating the {name} log {}", log.display()))?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().with_context(|| {
        format!(
            "starting the {name}: {} {}",
            program.display(),
            args.join(" ")
        )
    })?;
    let pid = child.id().context("the started process has no pid")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            let done = line.contains(ready);
            seen.push(line);
            if done {
                return Ok::<bool, std::io::Error>(true);
            }
        }
        Ok(false)
    };
    let ok = tokio::time::timeout(Duration::from_secs(60), wait).await;
    let log_tail = || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join(" | ")
    };
    match ok {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) | Ok(Err(_)) => {
            bail!("the {name} exited before it was ready: {}", log_tail())
        }
        Err(_) => bail!("the {name} was not ready within 60 s: {}", log_tail()),
    }
    // Keep draining stdout so that the service never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Service { child, pid }, seen))
}

struct CallWorker {
    index: usize,
    pid: Option<u32>,
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::UnboundedReceiver<Result<CallReply, String>>,
}

impl CallWorker {
    async fn spawn(program: &Path, config: &CallWorkerConfig) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(program)
            .args(["bench", "call-worker"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting call worker {}", program.display()))?;
        let mut stdin = child.stdin.take().context("worker stdin missing")?;
        let stdout = child.stdout.take().context("worker stdout missing")?;
        let (tx, replies) = mpsc::unbounded_channel();
        let index = config.worker;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            loop {
                let item = match lines.next_line().await {
                    Ok(Some(line)) => serde_json::from_str::<CallReply>(&line).map_err(|e| {
                        format!("call worker {index} wrote an unreadable line ({e}): {line:.200}")
                    }),
                    Ok(None) => Err(format!("call worker {index} exited")),
                    Err(e) => Err(format!("reading call worker {index}: {e}")),
                };
                let end = item.is_err();
                if tx.send(item).is_err() || end {
                    return;
                }
            }
        });
        let mut line = serde_json::to_string(config).context("encoding a worker configuration")?;
        line.push('\n');
        stdin
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("sending call worker {index} its configuration"))?;
        Ok(Self {
            index,
            pid: child.id(),
            child,
            stdin,
            replies,
        })
    }

    async fn send(&mut self, command: &CallCommand) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(command).context("encoding a worker command")?;
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("call worker {} takes no commands (exited?)", self.index))
    }

    async fn reply(&mut self, deadline: Instant, what: &str) -> anyhow::Result<CallReply> {
        match tokio::time::timeout_at(deadline, self.replies.recv()).await {
            Err(_) => bail!("call worker {} did not answer ({what}) in time", self.index),
            Ok(None) => bail!("call worker {} is gone ({what})", self.index),
            Ok(Some(Err(m))) => bail!("{m} ({what})"),
            Ok(Some(Ok(CallReply::Failed { message }))) => {
                bail!("call worker {} failed ({what}): {message}", self.index)
            }
            Ok(Some(Ok(r))) => Ok(r),
        }
    }
}

struct Workers(Vec<CallWorker>);

impl Workers {
    async fn ask(
        &mut self,
        command: &CallCommand,
        within: Duration,
        what: &str,
    ) -> anyhow::Result<Vec<CallReply>> {
        for w in &mut self.0 {
            w.send(command).await?;
        }
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        for w in &mut self.0 {
            out.push(w.reply(deadline, what).await?);
        }
        Ok(out)
    }

    async fn shutdown(mut self) {
        for w in &mut self.0 {
            let _ = w.send(&CallCommand::Shutdown).await;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for w in &mut self.0 {
            if tokio::time::timeout_at(deadline, w.child.wait())
                .await
                .is_err()
            {
                let _ = w.child.kill().await;
            }
        }
    }
}

fn sum_phase(replies: Vec<CallReply>, enrolled: bool) -> anyhow::Result<PhaseOutcome> {
    let mut total = PhaseOutcome::default();
    for r in replies {
        let p = match (r, enrolled) {
            (CallReply::Enrolled(p), true) | (CallReply::Connected(p), false) => p,
            (other, _) => bail!("a call worker answered out of turn: {other:?}"),
        };
        total.ok += p.ok;
        total.failed += p.failed;
        total.elapsed_ms = total.elapsed_ms.max(p.elapsed_ms);
        if total.first_error.is_none() {
            total.first_error = p.first_error;
        }
    }
    Ok(total)
}

fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

async fn api(
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

/// The state changes of one call read live, as the bench saw them.
#[derive(Default)]
struct LiveStates {
    /// (call id, agent id, state) → when the bench read it (Unix ns); first only.
    first_seen: std::collections::HashMap<(String, String, String), u64>,
    missed: u64,
}

#[derive(Deserialize)]
struct DeliveryEvent {
    call_id: String,
    agent_id: String,
    state: String,
}

/// Runs the whole bench: services, enrollment, connects, the call, the readings.
pub async fn run_call(args: &CallArgs) -> anyhow::Result<CallReport> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let program = match &args.beckon_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("cannot find this program's path")?,
    };
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

async fn measure(
    args: &CallArgs,
    broker_admin: SocketAddr,
    console_addr: SocketAddr,
    broker_addr: SocketAddr,
    password: &str,
    console: &Service,
    broker: &Service,
) -> anyhow::Result<CallReport> {
    let mut report = CallReport {
        agents: args.agents,
        acks: match args.acks {
            AckStages::Received => "received".into(),
            AckStages::Finished => "received, started, finished".into(),
        },
        ..Default::default()
    };
    // An API token, through a session of the first user.
    let mut client = HttpClient::new(console_addr);
    let login = client
        .request(
            "POST",
            "/api/v1/login",
            Some(&serde_json::json!({"user": "admin", "password": password})),
            API_LIMIT,
        )
        .await?;
    if login.status != 200 {
        bail!(
            "logging in to the console failed ({}): {}",
            login.status,
            login.error_message()
        );
    }
    let cookie = login
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .context("the console set no session cookie")?
        .to_owned();
    client.headers.push(("Cookie".into(), cookie));
    let token = api(
        &mut client,
        "POST",
        "/api/v1/api-tokens",
        Some(serde_json::json!({"name": "beckon bench call"})),
        201,
    )
    .await?;
    let token = token["token"]
        .as_str()
        .context("no API token in the answer")?
        .to_owned();
    client.headers.clear();
    client.set_bearer(&token);

    // The console's broker connection (it retries with backoff since it started first).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = api(&mut client, "GET", "/api/v1/status", None, 200).await?;
        if status["push_service"]["connected"] == serde_json::Value::Bool(true) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the console did not connect to the broker within 60 s: {}",
                status["push_service"]["message"]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let enrollment = api(
        &mut client,
        "POST",
        "/api/v1/enrollment-tokens",
        Some(serde_json::json!({"label": "beckon bench call", "max_uses": 0, "expires_in_secs": 86400})),
        201,
    )
    .await?;
    let enrollment_token = enrollment["token"]
        .as_str()
        .context("no enrollment token in the answer")?
        .to_owned();

    // Workers: this program (the bench under test), whatever runs console and broker.
    let worker_program =
        std::env::current_exe().context("cannot find this program's path to start workers")?;
    let per_worker = args.agents_per_worker.clamp(1, 19_000);
    let count = args.agents.div_ceil(per_worker);
    let per_address = args.agents_per_source_address.max(1);
    let sources: Vec<Ipv4Addr> = (0..args.agents.div_ceil(per_address).clamp(1, 250))
        .map(|i| Ipv4Addr::new(127, 0, 0, u8::try_from(i + 2).unwrap_or(252)))
        .collect();
    let mut workers = Workers(Vec::with_capacity(count));
    for w in 0..count {
        let first_agent = w * per_worker;
        let config = CallWorkerConfig {
            worker: w,
            first_agent,
            agents: per_worker.min(args.agents - first_agent),
            id_prefix: args.id_prefix.clone(),
            console: console_addr,
            enrollment_token: enrollment_token.clone(),
            enroll_concurrency: args.enroll_concurrency.max(1).div_ceil(count).max(1),
            broker: broker_addr,
            server_name: "localhost".into(),
            source_addresses: sources.clone(),
            agents_per_source_address: per_address,
            connect_concurrency: args.connect_concurrency.max(1).div_ceil(count).max(1),
            connect_timeout_ms: 30_000,
            acks: args.acks,
        };
        workers
            .0
            .push(CallWorker::spawn(&worker_program, &config).await?);
    }
    let outcome = async {
        for w in &mut workers.0 {
            match w
                .reply(Instant::now() + Duration::from_secs(30), "start")
                .await?
            {
                CallReply::Ready { .. } => {}
                other => bail!("call worker {} answered {other:?} at start", w.index),
            }
        }
        let enrolled = sum_phase(
            workers
                .ask(
                    &CallCommand::Enroll,
                    Duration::from_secs(3600),
                    "enrollment",
                )
                .await?,
            true,
        )?;
        report.enrolled = enrolled.ok;
        report.enroll_s = enrolled.elapsed_ms as f64 / 1000.0;
        report.first_error = enrolled.first_error;
        let connected = sum_phase(
            workers
                .ask(&CallCommand::Connect, Duration::from_secs(1800), "connect")
                .await?,
            false,
        )?;
        report.connected = connected.ok;
        report.connect_s = connected.elapsed_ms as f64 / 1000.0;
        if report.first_error.is_none() {
            report.first_error = connected.first_error;
        }
        the_call(
            args,
            &mut report,
            &mut client,
            &mut workers,
            console_addr,
            &token,
            console,
            broker,
        )
        .await?;
        report.broker_messages_dropped = broker_dropped(broker_admin).await;
        Ok(())
    }
    .await;
    workers.shutdown().await;
    outcome.map(|()| report)
}

/// The broker's count of messages it dropped (queue full, expired, too large), from its
/// metrics.
async fn broker_dropped(admin: SocketAddr) -> Option<u64> {
    // The broker copies its counters into the metrics once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut client = HttpClient::new(admin);
    let r = client
        .request("GET", "/metrics", None, Duration::from_secs(10))
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&r.body);
    text.lines()
        .find_map(|l| l.strip_prefix("beckon_broker_messages_dropped_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

#[allow(clippy::too_many_arguments)]
async fn the_call(
    args: &CallArgs,
    report: &mut CallReport,
    client: &mut HttpClient,
    workers: &mut Workers,
    console_addr: SocketAddr,
    token: &str,
    console: &Service,
    broker: &Service,
) -> anyhow::Result<()> {
    // Wait until the console has taken in every agent's presence (it resends pending
    // wake-ups per agent coming online; the call must not race that work).
    let online_started = Instant::now();
    let deadline = online_started + Duration::from_secs(300);
    loop {
        let status = api(client, "GET", "/api/v1/status", None, 200).await?;
        let online = status["agents_online"].as_u64().unwrap_or(0);
        report.console_online = online;
        if online >= report.connected as u64 {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the console counted {online} of {} agents online after 300 s",
                report.connected
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.console_online_wait_s = online_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(args.settle_secs.max(0.0))).await;

    // Live state changes, subscribed before the call.
    let mut events_client = HttpClient::new(console_addr);
    events_client.set_bearer(token);
    let mut events = events_client
        .open_events("/api/v1/events", API_LIMIT)
        .await
        .context("subscribing to the console's live events")?;
    let (live_tx, mut live_rx) = mpsc::unbounded_channel::<(u64, Result<DeliveryEvent, u64>)>();
    let reader = tokio::spawn(async move {
        while let Ok(Some(ev)) = events.next().await {
            let at = unix_ns();
            let item = match ev.event.as_str() {
                "delivery" => match serde_json::from_str::<DeliveryEvent>(&ev.data) {
                    Ok(d) => Ok(d),
                    Err(_) => continue,
                },
                "lagged" => Err(serde_json::from_str::<serde_json::Value>(&ev.data)
                    .ok()
                    .and_then(|v| v["missed"].as_u64())
                    .unwrap_or(1)),
                _ => continue,
            };
            if live_tx.send((at, item)).is_err() {
                return;
            }
        }
    });

    let arm = workers
        .ask(&CallCommand::Arm, Duration::from_secs(30), "arm")
        .await?;
    let expected: usize = arm
        .iter()
        .map(|r| match r {
            CallReply::Armed { expected } => *expected,
            _ => 0,
        })
        .sum();
    for w in &mut workers.0 {
        w.send(&CallCommand::Collect {
            wait_ms: (args.wait_secs.max(1.0) * 1000.0) as u64,
        })
        .await?;
    }
    let reader_procs = ProcReader::new();
    let console_before = reader_procs.sample(console.pid).ok();
    let worker_pids: Vec<u32> = workers.0.iter().filter_map(|w| w.pid).collect();
    let workers_cpu = |reader: &ProcReader| -> Option<f64> {
        let mut total = 0.0;
        for pid in &worker_pids {
            total += reader.sample(*pid).ok()?.cpu.as_secs_f64();
        }
        Some(total)
    };
    let workers_before = workers_cpu(&reader_procs);
    let broker_before = reader_procs.sample(broker.pid).ok();
    report.console_rss_before_kib = console_before.map(|s| s.rss_kib);
    report.load_average = load_average();

    // The call.
    let t0 = unix_ns();
    let started = Instant::now();
    let created = client
        .request(
            "POST",
            "/api/v1/calls",
            Some(&serde_json::json!({"target": "all", "reason": "beckon bench call"})),
            API_LIMIT,
        )
        .await
        .context("POST /api/v1/calls")?;
    report.api_response_ms = started.elapsed().as_secs_f64() * 1000.0;
    if created.status != 201 {
        bail!(
            "POST /api/v1/calls answered {}: {}",
            created.status,
            created.error_message()
        );
    }
    let body = created.json().context("the call's answer is not JSON")?;
    let call_id = body["id"]
        .as_str()
        .context("the call has no id")?
        .to_owned();
    report.call_agents = body["agents"].as_u64().unwrap_or(0);
    report.call_id = Some(call_id.clone());

    // Follow the live events until every addressed agent is delivered (or the bound).
    let target = report.call_agents;
    let mut live = LiveStates::default();
    let mut delivered_live = 0u64;
    let mut last_sent = None;
    let mut last_delivered = None;
    let mut sent_live = 0u64;
    let deadline = started + Duration::from_secs_f64(args.wait_secs.max(1.0));
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    let mut end_sample: Option<(ProcSample, Option<ProcSample>)> = None;
    loop {
        tokio::select! {
            item = live_rx.recv() => {
                let Some((at, item)) = item else { break };
                match item {
                    Err(missed) => live.missed += missed,
                    Ok(d) if d.call_id == call_id => {
                        let key = (d.call_id, d.agent_id, d.state.clone());
                        if live.first_seen.insert(key, at).is_none() {
                            match d.state.as_str() {
                                "sent" => { sent_live += 1; last_sent = Some(at); }
                                "delivered" => { delivered_live += 1; last_delivered = Some(at); }
                                _ => {}
                            }
                        }
                    }
                    Ok(_) => {}
                }
                if delivered_live >= target {
                    end_sample = reader_procs.sample(console.pid).ok().map(|c| (c, reader_procs.sample(broker.pid).ok()));
                    break;
                }
            }
            _ = poll.tick() => {
                // When live events were missed, the stored counts decide.
                if live.missed > 0 {
                    let calls = api(client, "GET", "/api/v1/calls?limit=5", None, 200).await?;
                    let done = calls.as_array().and_then(|a| a.iter().find(|c| c["id"] == call_id.as_str())).map(|c| {
                        ["delivered", "started", "finished"].iter().map(|s| c["counts"][*s].as_u64().unwrap_or(0)).sum::<u64>()
                    }).unwrap_or(0);
                    if done >= target {
                        end_sample = reader_procs.sample(console.pid).ok().map(|c| (c, reader_procs.sample(broker.pid).ok()));
                        break;
                    }
                }
                if Instant::now() > deadline { break; }
            }
        }
    }
    reader.abort();
    if end_sample.is_none() {
        end_sample = reader_procs
            .sample(console.pid)
            .ok()
            .map(|c| (c, reader_procs.sample(broker.pid).ok()));
    }
    let _ = sent_live;
    report.events_missed = live.missed;
    let ms_since_t0 = |at: u64| at.saturating_sub(t0) as f64 / 1e6;
    if live.missed == 0 {
        report.all_sent_ms = last_sent.map(ms_since_t0);
        report.all_delivered_ms = (delivered_live >= target)
            .then_some(())
            .and_then(|()| last_delivered.map(ms_since_t0));
    }
    if let (Some(before), Some(after)) = (workers_before, workers_cpu(&reader_procs)) {
        report.agents_cpu_ms = Some((after - before) * 1000.0);
    }
    if let (Some(before), Some((after, broker_after))) = (console_before, end_sample) {
        let cpu = after.cpu.saturating_sub(before.cpu).as_secs_f64() * 1000.0;
        report.console_cpu_ms = Some(cpu);
        report.console_cpu_per_agent_us = (target > 0).then(|| cpu * 1000.0 / target as f64);
        report.console_rss_after_kib = Some(after.rss_kib);
        if let (Some(b0), Some(b1)) = (broker_before, broker_after) {
            report.broker_cpu_ms = Some(b1.cpu.saturating_sub(b0.cpu).as_secs_f64() * 1000.0);
        }
    }

    // The agents' side.
    let mut wake = WakeOutcome::default();
    for w in &mut workers.0 {
        let r = w
            .reply(
                Instant::now() + Duration::from_secs_f64(args.wait_secs.max(1.0) + 30.0),
                "wake-ups",
            )
            .await?;
        if let CallReply::Wakeups(o) = r {
            wake.expected += o.expected;
            wake.acked += o.acked;
            wake.rejected += o.rejected;
            wake.duplicates += o.duplicates;
            if wake.first_rejection.is_none() {
                wake.first_rejection = o.first_rejection;
            }
            wake.arrivals_unix_ns.extend(o.arrivals_unix_ns);
        }
    }
    let _ = expected;
    report.rejected = wake.rejected;
    report.first_rejection = wake.first_rejection;
    report.duplicates = wake.duplicates;
    let mut arrivals: Vec<u64> = wake
        .arrivals_unix_ns
        .iter()
        .map(|a| a.saturating_sub(t0) / 1000)
        .collect();
    report.arrival_ms = Percentiles::of_micros(&mut arrivals);

    // The stored states, once the acks have had a moment to be written.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored = api(
        client,
        "GET",
        &format!("/api/v1/calls/{call_id}"),
        None,
        200,
    )
    .await?;
    let t0_ms = (t0 / 1_000_000) as i64;
    let mut delivered_us = Vec::new();
    let mut max_sent: Option<i64> = None;
    let mut max_delivered: Option<i64> = None;
    if let Some(list) = stored["deliveries"].as_array() {
        for d in list {
            let state = d["state"].as_str().unwrap_or("?").to_owned();
            *report.states.entry(state).or_default() += 1;
            if let Some(s) = d["sent_at"].as_i64() {
                max_sent = Some(max_sent.map_or(s, |m| m.max(s)));
            }
            if let Some(s) = d["delivered_at"].as_i64() {
                max_delivered = Some(max_delivered.map_or(s, |m| m.max(s)));
                delivered_us.push(u64::try_from((s - t0_ms).max(0)).unwrap_or(0) * 1000);
            }
        }
    }
    report.delivered = ["delivered", "started", "finished"]
        .iter()
        .map(|s| report.states.get(*s).copied().unwrap_or(0))
        .sum();
    report.missing = target.saturating_sub(report.delivered);
    report.all_sent_stored_ms = max_sent.map(|m| (m - t0_ms) as f64);
    report.all_delivered_stored_ms = max_delivered.map(|m| (m - t0_ms) as f64);
    report.delivered_latency_ms = Percentiles::of_micros(&mut delivered_us);
    Ok(())
}
