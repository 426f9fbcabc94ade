//! `beckon bench console`: the console over a large registry, through its HTTP API as a
//! client sees it.
//!
//! The bench writes a made-up registry into `--database` (SQLite or PostgreSQL): agents
//! with inventory, 60% online, 30% offline (a sixth of them stale), 10% never seen; ten site
//! groups and one wake-up group of `--group-size` agents; `--calls` past calls of
//! `--deliveries-per-call` finished, expired and failed deliveries each (the store's
//! seeding path, the database numbering the rows itself). Then it starts a real `beckon
//! console` on that database and a real `beckon broker` (plain MQTT on loopback: no agent
//! connects, so the registry's presence stays as written), and measures with an API token:
//! - idle: the console's CPU over `--idle-secs` with every delivery finished;
//! - the agents page (list, search by name, filter by group, by presence), the dashboard's
//!   counts (`GET /api/v1/status`, which it polls), the calls list, one call's page and its
//!   deliveries filtered by state: `--requests` requests each, p50/p99;
//! - Wake-on-LAN to one sleeping machine (`--requests` requests, one machine each, as the
//!   Agents page sends them), p50/p99, after a first request timed on its own (it reads the
//!   online agents to choose relays from);
//! - a call to the wake-up group: from the API request until the console's live event for
//!   the first `sent` (the broker took the first wake-up);
//! - the console's resident memory, idle and after the call.
//!
//! Each figure is printed beside its target with PASS or MISS.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use beckon_console::store::{
    DatabaseUrl, SEED_AGENT_PREFIX, SEED_SITES, SEED_WAKE_GROUP, SeedPlan, SeedReport,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::call::api;
use crate::call::http::HttpClient;
use crate::call::setup::{Service, free_port, load_average, start_service};
use crate::call::the_call::subscribe_live;
use crate::procstat::ProcReader;
use crate::protocol::unix_ns;
use crate::report::{Percentiles, format_value};

/// The request path of a measured page, for the k-th request.
type PagePath = Box<dyn Fn(usize) -> String>;

/// Bound on each request the bench makes outside of the timed ones.
const API_LIMIT: Duration = Duration::from_secs(120);

/// `beckon bench console`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleBenchArgs {
    /// Agents in the registry.
    #[arg(long, default_value_t = 1_000_000)]
    pub agents: u64,
    /// The console's database: sqlite:PATH or postgres://user:password@host:port/database
    /// (default: sqlite in the data folder). It must hold no agents (or see
    /// --keep-registry).
    #[arg(long, value_name = "URL")]
    pub database: Option<DatabaseUrl>,
    /// Past calls in the registry.
    #[arg(long, default_value_t = 100)]
    pub calls: u64,
    /// Deliveries of each past call (at most --agents).
    #[arg(long, default_value_t = 100_000)]
    pub deliveries_per_call: u64,
    /// Agents of the group the bench calls (at most --agents).
    #[arg(long, default_value_t = 100_000)]
    pub group_size: u64,
    /// Requests per measured page.
    #[arg(long, default_value_t = 200)]
    pub requests: usize,
    /// How long the idle console's CPU is read, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub idle_secs: f64,
    /// Measure the registry a previous run left in --database instead of writing one
    /// (writing a million agents and ten million deliveries takes a while).
    #[arg(long)]
    pub keep_registry: bool,
    /// Beckon executable that runs `console` and `broker` (default: this program).
    #[arg(long, value_name = "PATH")]
    pub beckon_bin: Option<PathBuf>,
    /// Folder for the run's data (console, broker, logs, the default SQLite database); a
    /// fresh temporary folder, removed afterwards, by default.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One measured request kind: latencies against a target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageTiming {
    /// What was asked, e.g. "agents page: list".
    pub what: String,
    /// One example request.
    pub example: String,
    /// Latencies, milliseconds.
    pub latency: Option<Percentiles>,
    /// The target for the p99, milliseconds.
    pub target_p99_ms: f64,
}

/// What a console bench measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConsoleReport {
    /// `sqlite` or `postgresql`.
    pub backend: String,
    /// Agents in the registry.
    pub agents: u64,
    /// Members of the group called.
    pub group_size: u64,
    /// Past calls.
    pub calls: u64,
    /// Deliveries of the past calls.
    pub deliveries: u64,
    /// Writing the registry, seconds (`None`: a kept registry).
    pub seed_s: Option<f64>,
    /// The load average at the start of the measurements (1, 5, 15 minutes).
    pub load_average: Option<[f64; 3]>,
    /// From starting the console until it answered with its broker connected, seconds.
    pub console_start_s: f64,
    /// Console CPU while idle, percent of one core.
    pub idle_cpu_percent: Option<f64>,
    /// Over how long, seconds.
    pub idle_secs: f64,
    /// The pages, each with its latencies.
    pub pages: Vec<PageTiming>,
    /// The dashboard's figures as read: agents online.
    pub agents_online: Option<u64>,
    /// The dashboard's figures as read: agents stale.
    pub agents_stale: Option<u64>,
    /// Agents the call addressed.
    pub call_agents: u64,
    /// `POST /api/v1/calls` response time, milliseconds.
    pub call_response_ms: Option<f64>,
    /// The first Wake-on-LAN request's response time, milliseconds: it reads the online
    /// agents to choose relays from (the others reuse them for 30 s).
    #[serde(default)]
    pub wol_first_ms: Option<f64>,
    /// From the request until the live event of the first `sent`, milliseconds.
    pub first_sent_ms: Option<f64>,
    /// Console RSS idle, KiB.
    pub rss_idle_kib: Option<u64>,
    /// Console RSS after the measurements and the call, KiB.
    pub rss_after_kib: Option<u64>,
}

/// Targets (issue: the console at fleet scale).
const PAGE_TARGET_MS: f64 = 100.0;
const FIRST_SENT_TARGET_MS: f64 = 2000.0;
const IDLE_CPU_TARGET_PERCENT: f64 = 1.0;

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "-",
    }
}

impl ConsoleReport {
    /// Every measured figure against its target: (what, figure, target, met).
    pub fn checks(&self) -> Vec<(String, String, String, Option<bool>)> {
        let f = |v: Option<f64>| format_value(v);
        let mut out = Vec::new();
        out.push((
            "idle console CPU (% of a core)".to_owned(),
            f(self.idle_cpu_percent),
            format!("< {IDLE_CPU_TARGET_PERCENT}"),
            self.idle_cpu_percent.map(|c| c < IDLE_CPU_TARGET_PERCENT),
        ));
        for p in &self.pages {
            out.push((
                format!("{} p50 / p99 (ms)", p.what),
                p.latency.map_or_else(
                    || "-".to_owned(),
                    |l| format!("{} / {}", f(Some(l.p50_ms)), f(Some(l.p99_ms))),
                ),
                format!("p99 < {}", p.target_p99_ms),
                p.latency.map(|l| l.p99_ms < p.target_p99_ms),
            ));
        }
        out.push((
            format!(
                "call to {} agents: first wake-up sent (ms)",
                self.call_agents
            ),
            f(self.first_sent_ms),
            format!("< {FIRST_SENT_TARGET_MS}"),
            self.first_sent_ms.map(|m| m < FIRST_SENT_TARGET_MS),
        ));
        out
    }

    /// The report as a table for people.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let f = |v: Option<f64>| format_value(v);
        let mib = |k: Option<u64>| f(k.map(|k| k as f64 / 1024.0));
        let mut out = format!(
            "beckon bench console: {} agents, {} calls of {} deliveries, {}\n\n",
            self.agents,
            self.calls,
            self.deliveries.checked_div(self.calls).unwrap_or(0),
            self.backend
        );
        let facts: Vec<(&str, String)> = vec![
            (
                "load average (1/5/15 min)",
                self.load_average.map_or_else(
                    || "-".into(),
                    |l| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]),
                ),
            ),
            ("registry written in (s)", f(self.seed_s)),
            ("deliveries stored", self.deliveries.to_string()),
            ("console ready in (s)", f(Some(self.console_start_s))),
            (
                "dashboard: online / stale",
                format!(
                    "{} / {}",
                    self.agents_online
                        .map_or_else(|| "-".into(), |n| n.to_string()),
                    self.agents_stale
                        .map_or_else(|| "-".into(), |n| n.to_string())
                ),
            ),
            ("call: API response (ms)", f(self.call_response_ms)),
            ("Wake-on-LAN: first request (ms)", f(self.wol_first_ms)),
            (
                "console RSS idle / after the call (MiB)",
                format!("{} / {}", mib(self.rss_idle_kib), mib(self.rss_after_kib)),
            ),
        ];
        let checks = self.checks();
        let width = facts
            .iter()
            .map(|(k, _)| k.len())
            .chain(checks.iter().map(|c| c.0.len()))
            .max()
            .unwrap_or(0);
        for (k, v) in facts {
            let _ = writeln!(out, "  {k:<width$}  {v}");
        }
        out.push('\n');
        let value_width = checks.iter().map(|c| c.1.len()).max().unwrap_or(0);
        let target_width = checks.iter().map(|c| c.2.len()).max().unwrap_or(0);
        let _ = writeln!(
            out,
            "  {:<width$}  {:>value_width$}  {:<target_width$}  result",
            "measured", "figure", "target"
        );
        for (what, value, target, ok) in checks {
            let _ = writeln!(
                out,
                "  {what:<width$}  {value:>value_width$}  {target:<target_width$}  {}",
                verdict(ok)
            );
        }
        out
    }

    /// The figures that are missing (a page never answered, no `sent` seen, no CPU read).
    pub fn missing_figures(&self) -> Vec<String> {
        self.checks()
            .into_iter()
            .filter(|c| c.3.is_none())
            .map(|c| c.0)
            .collect()
    }
}

/// Runs `beckon bench console` and prints its report.
pub async fn console_command(args: &ConsoleBenchArgs) -> anyhow::Result<()> {
    let report = run_console_bench(args).await?;
    crate::print_report(&report, args.json, report.table())?;
    let missing = report.missing_figures();
    if !missing.is_empty() {
        bail!("no figure for: {}", missing.join("; "));
    }
    Ok(())
}

/// Seeds (or keeps) the registry, starts console and broker, measures.
pub async fn run_console_bench(args: &ConsoleBenchArgs) -> anyhow::Result<ConsoleReport> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    if args.group_size > args.agents || args.deliveries_per_call > args.agents {
        bail!(
            "--group-size ({}) and --deliveries-per-call ({}) can be at most --agents ({})",
            args.group_size,
            args.deliveries_per_call,
            args.agents
        );
    }
    if args.group_size == 0 {
        bail!("--group-size must be at least 1: the bench calls that group");
    }
    let program = crate::beckon_program(args.beckon_bin.as_ref())?;
    let temp;
    let data = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("beckon-bench-console-")
                .tempdir()
                .context("creating a temporary folder")?;
            temp.path().to_owned()
        }
    };
    let database = args
        .database
        .clone()
        .unwrap_or_else(|| DatabaseUrl::Sqlite(data.join("console.db")));
    let mut report = ConsoleReport {
        backend: match database {
            DatabaseUrl::Sqlite(_) => "sqlite".into(),
            DatabaseUrl::Postgres(_) => "postgresql".into(),
        },
        agents: args.agents,
        group_size: args.group_size,
        calls: args.calls,
        idle_secs: args.idle_secs.max(1.0),
        ..Default::default()
    };

    // The registry, and an API token for the measurements.
    let plan = SeedPlan {
        agents: args.agents,
        wake_group: args.group_size,
        calls: args.calls,
        deliveries_per_call: args.deliveries_per_call,
        now: beckon_console::model::now_ms(),
    };
    let keep = args.keep_registry;
    let url = database.clone();
    let (seeded, seed_s, token) = tokio::task::spawn_blocking(move || {
        let store = url
            .open()
            .with_context(|| format!("opening the database {url}"))?;
        let started = std::time::Instant::now();
        let seeded = if keep {
            None
        } else {
            let mut last = std::time::Instant::now();
            Some(
                store
                    .seed_registry(&plan, &mut |what, n| {
                        if last.elapsed() > Duration::from_secs(10) {
                            eprintln!("beckon bench console: {n} {what} written");
                            last = std::time::Instant::now();
                        }
                    })
                    .with_context(|| format!("writing the registry into {url}"))?,
            )
        };
        let seed_s = started.elapsed().as_secs_f64();
        let token = store
            .make_api_token("beckon bench console", beckon_console::model::now_ms())
            .context("making an API token")?;
        anyhow::Ok((seeded, seed_s, token))
    })
    .await
    .context("the seeding task failed")??;
    if let Some(SeedReport {
        agents,
        calls,
        deliveries,
        ..
    }) = seeded
    {
        report.seed_s = Some(seed_s);
        report.agents = agents;
        report.calls = calls;
        report.deliveries = deliveries;
    }

    let (console, broker, console_addr) = start_services(&program, &data, &database).await?;
    let result = measure(args, &mut report, console_addr, &token, &console).await;
    broker.stop().await;
    console.stop().await;
    result.map(|()| report)
}

/// A plain broker (anonymous, loopback) and the console on `database`, connected to it.
async fn start_services(
    program: &std::path::Path,
    data: &std::path::Path,
    database: &DatabaseUrl,
) -> anyhow::Result<(Service, Service, SocketAddr)> {
    let broker_port = free_port()?;
    let broker_dir = data.join("broker");
    std::fs::create_dir_all(&broker_dir)
        .with_context(|| format!("creating {}", broker_dir.display()))?;
    let broker_args: Vec<String> = vec![
        "broker".into(),
        "--mqtt".into(),
        format!("127.0.0.1:{broker_port}"),
        "--mqtts".into(),
        "off".into(),
        "--allow-anonymous".into(),
        "--data".into(),
        broker_dir.display().to_string(),
    ];
    let (broker, _) = start_service(
        "broker",
        program,
        &broker_args,
        &[],
        &data.join("broker.log"),
        "ready",
    )
    .await?;
    let console_port = free_port()?;
    let console_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, console_port));
    let console_args: Vec<String> = vec![
        "console".into(),
        "--data-dir".into(),
        data.join("console").display().to_string(),
        "--database".into(),
        database_arg(database),
        "--listen".into(),
        console_addr.to_string(),
        "--plain-http".into(),
        "--broker".into(),
        format!("mqtt://127.0.0.1:{broker_port}"),
    ];
    let console = start_service(
        "console",
        program,
        &console_args,
        &[],
        &data.join("console.log"),
        "Beckon console at",
    )
    .await;
    match console {
        Ok((console, _)) => Ok((console, broker, console_addr)),
        Err(e) => {
            broker.stop().await;
            Err(e)
        }
    }
}

/// The database URL as the console's `--database` takes it (with its password: the
/// displayed form hides it).
fn database_arg(database: &DatabaseUrl) -> String {
    match database {
        DatabaseUrl::Sqlite(path) => format!("sqlite:{}", path.display()),
        DatabaseUrl::Postgres(url) => url.clone(),
    }
}

async fn measure(
    args: &ConsoleBenchArgs,
    report: &mut ConsoleReport,
    console_addr: SocketAddr,
    token: &str,
    console: &Service,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut client = HttpClient::new(console_addr);
    client.set_bearer(token);
    let deadline = started + Duration::from_secs(120);
    let status = loop {
        let status = api(&mut client, "GET", "/api/v1/status", None, 200).await?;
        if status["push_service"]["connected"] == serde_json::Value::Bool(true) {
            break status;
        }
        if Instant::now() > deadline {
            bail!(
                "the console did not connect to the broker within 120 s: {}",
                status["push_service"]["message"]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    report.console_start_s = started.elapsed().as_secs_f64();
    report.agents_online = status["agents_online"].as_u64();
    report.agents_stale = status["agents_stale"].as_u64();
    if args.keep_registry {
        let calls = api(&mut client, "GET", "/api/v1/calls?limit=1000", None, 200).await?;
        // The seeded calls only: an earlier run's own call is not one of them.
        let calls: Vec<serde_json::Value> = calls
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| {
                c["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("seed-call-"))
            })
            .collect();
        report.calls = calls.len() as u64;
        report.deliveries = calls
            .iter()
            .map(|c| {
                c["counts"]
                    .as_object()
                    .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum::<u64>())
            })
            .sum();
    }

    // Idle: once no call has wake-ups queued or sent (a kept registry's last call expires
    // when the console starts) or is still being recorded (an earlier run's call, its
    // console stopped mid-recording), the console's own CPU time over the span.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let calls = api(&mut client, "GET", "/api/v1/calls?limit=10", None, 200).await?;
        let open = calls.as_array().is_some_and(|calls| {
            calls.iter().any(|c| {
                let recorded: u64 = c["counts"]
                    .as_object()
                    .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum());
                ["queued", "sent"]
                    .iter()
                    .any(|s| c["counts"][*s].as_u64().unwrap_or(0) > 0)
                    || recorded < c["targeted"].as_u64().unwrap_or(0)
            })
        });
        if !open {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "a call still had wake-ups queued or sent, or was still being recorded, 300 s after the console started"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let procs = ProcReader::new();
    let before = procs.sample(console.pid).ok();
    let idle_from = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(report.idle_secs)).await;
    let after = procs.sample(console.pid).ok();
    if let (Some(b), Some(a)) = (before, after) {
        let cpu = a.cpu.saturating_sub(b.cpu).as_secs_f64();
        report.idle_cpu_percent = Some(cpu / idle_from.elapsed().as_secs_f64() * 100.0);
        report.rss_idle_kib = Some(a.rss_kib);
    }
    report.load_average = load_average();

    // The pages, each request differing a little as people's do.
    let n = args.requests.max(1);
    let agents = args.agents.max(1);
    let calls = report.calls.max(1);
    let presences = ["online", "offline", "unknown"];
    let states = ["finished", "expired", "failed"];
    let mut pages: Vec<(&str, PagePath)> = vec![
        (
            "agents page: list",
            Box::new(|k| format!("/api/v1/agents?limit=100&offset={}", (k % 5) * 100)),
        ),
        (
            "agents page: search by name",
            Box::new(move |k| format!("/api/v1/agents?limit=100&search=ws-{}", pick(k, agents))),
        ),
        (
            "agents page: filter by group",
            Box::new(move |k| {
                if k % 2 == 0 {
                    format!("/api/v1/agents?limit=100&group={SEED_WAKE_GROUP}")
                } else {
                    format!(
                        "/api/v1/agents?limit=100&group=seed-site-{}",
                        k as u64 % SEED_SITES
                    )
                }
            }),
        ),
        (
            "agents page: filter by presence",
            Box::new(move |k| {
                format!(
                    "/api/v1/agents?limit=100&presence={}",
                    presences[k % presences.len()]
                )
            }),
        ),
        ("dashboard counts", Box::new(|_| "/api/v1/status".into())),
        ("calls list", Box::new(|_| "/api/v1/calls?limit=50".into())),
    ];
    if report.calls > 0 {
        pages.push((
            "one call's page",
            Box::new(move |k| format!("/api/v1/calls/seed-call-{}", pick(k, calls))),
        ));
        pages.push((
            "a call's deliveries by state",
            Box::new(move |k| {
                format!(
                    "/api/v1/calls/seed-call-{}/deliveries?state={}&limit=100&after={SEED_AGENT_PREFIX}{}",
                    pick(k, calls),
                    states[k % states.len()],
                    pick(k + 1, agents)
                )
            }),
        ));
    }
    for (what, path) in &pages {
        let mut micros = Vec::with_capacity(n);
        for k in 0..n {
            let p = path(k);
            let t = Instant::now();
            api(&mut client, "GET", &p, None, 200).await?;
            micros.push(t.elapsed().as_micros() as u64);
        }
        report.pages.push(PageTiming {
            what: (*what).to_owned(),
            example: path(0),
            latency: Percentiles::of_micros(&mut micros),
            target_p99_ms: PAGE_TARGET_MS,
        });
    }

    wake_on_lan(report, &mut client, n, agents).await?;
    the_call(report, console_addr, token, &mut client).await?;
    report.rss_after_kib = procs.sample(console.pid).ok().map(|s| s.rss_kib);
    Ok(())
}

/// The `k`th of `m` things, spread over them as people's requests are.
fn pick(k: usize, m: u64) -> u64 {
    (k as u64).wrapping_mul(7919).wrapping_add(13) % m
}

/// Wake-on-LAN to one sleeping machine at a time, as the Agents page sends it for each
/// selected agent: the console sends its packets and asks an online agent of the machine's
/// subnet to relay them. The settings send one packet to 127.0.0.1 (the made-up addresses
/// lead nowhere on this machine), so that what is timed is the console's own work: the
/// settings, the relay's choice among the online agents, signing and recording.
async fn wake_on_lan(
    report: &mut ConsoleReport,
    client: &mut HttpClient,
    requests: usize,
    agents: u64,
) -> anyhow::Result<()> {
    // Seeded agent i is offline when i % 10 is 6, 7 or 8.
    let tens = agents / 10;
    if tens == 0 {
        return Ok(());
    }
    let path = |k: usize| {
        let i = pick(k, tens) * 10 + 6 + k as u64 % 3;
        format!("/api/v1/agents/{SEED_AGENT_PREFIX}{i}/wol")
    };
    let mut settings = api(client, "GET", "/api/v1/settings", None, 200).await?;
    settings["wol"]["addresses"] = serde_json::json!(["127.0.0.1"]);
    settings["wol"]["subnet_broadcast"] = false.into();
    settings["wol"]["repeats"] = 1.into();
    api(client, "PUT", "/api/v1/settings", Some(settings), 200).await?;
    let mut micros = Vec::with_capacity(requests);
    for k in 0..=requests {
        let t = Instant::now();
        let sends = api(client, "POST", &path(k), None, 200).await?;
        let took = t.elapsed();
        if k == 0 {
            report.wol_first_ms = Some(took.as_secs_f64() * 1000.0);
        } else {
            micros.push(took.as_micros() as u64);
        }
        // Every seeded agent shares one subnet: each machine has a relay.
        let relayed = sends.as_array().is_some_and(|sends| {
            sends.iter().any(|s| s["via_agent"].is_string())
                && sends.iter().any(|s| s["packets"].as_u64() == Some(1))
        });
        if !relayed {
            bail!(
                "POST {}: no packet sent or no relay asked: {sends}",
                path(k)
            );
        }
    }
    report.pages.push(PageTiming {
        what: "Wake-on-LAN to one machine".to_owned(),
        example: format!("POST {}", path(1)),
        latency: Percentiles::of_micros(&mut micros),
        target_p99_ms: PAGE_TARGET_MS,
    });
    Ok(())
}

/// A call to the wake-up group; the time until the console's live event of its first
/// `sent`.
async fn the_call(
    report: &mut ConsoleReport,
    console_addr: SocketAddr,
    token: &str,
    client: &mut HttpClient,
) -> anyhow::Result<()> {
    let (reader, mut live) = subscribe_live(console_addr, token).await?;
    let started = Instant::now();
    let started_ns = unix_ns();
    let created = client
        .request(
            "POST",
            "/api/v1/calls",
            Some(&serde_json::json!({
                "target": {"group": SEED_WAKE_GROUP},
                "reason": "beckon bench console",
                "expires_in_secs": 60,
            })),
            API_LIMIT,
        )
        .await
        .context("POST /api/v1/calls")?;
    report.call_response_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
    if created.status != 201 {
        reader.abort();
        bail!(
            "POST /api/v1/calls answered {}: {}",
            created.status,
            created.error_message()
        );
    }
    let body = created.json().context("the call's answer is not JSON")?;
    let call_id = body["id"].as_str().unwrap_or_default().to_owned();
    report.call_agents = body["agents"].as_u64().unwrap_or(0);
    let wait = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some((at, item)) = live.recv().await {
            if let Ok(d) = item
                && d.call_id == call_id
                && d.state == "sent"
            {
                return Some(at);
            }
        }
        None
    })
    .await;
    reader.abort();
    report.first_sent_ms = wait
        .ok()
        .flatten()
        .map(|at| at.saturating_sub(started_ns) as f64 / 1e6);
    Ok(())
}
