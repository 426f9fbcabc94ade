//! `beckon bench agent-memory`: the resident memory of one real, idle, connected agent.
//!
//! The bench starts `beckon up` (console and broker in one process, on loopback ports, in a
//! fresh folder), enrolls one agent with `beckon agent enroll` through an enrollment token
//! made with the console's API, and starts `beckon agent run` as a process of its own, from a
//! copy of the program (on an endpoint no console or broker maps the same file, and pages of
//! a file other processes map stay resident whatever the agent does). Once the console shows the agent online, one wake-up call makes it do what a deployed agent has
//! done by then: verify a signed wake-up, check in with the console over HTTP, publish its
//! acks. After `--idle-secs` more the bench reads the agent's `/proc/PID/status`: VmRSS, and
//! how much of it is anonymous (heap, stacks) and how much the program's own file pages.
//!
//! `--agent-command` runs the agent with another program, such as the Windows build under
//! Wine (`wine-run beckon.exe`), and `--agent-process NAME` names the process to read among
//! what that command starts when it is not the started process itself.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::call::http::HttpClient;
use crate::call::measure::console_tokens;
use crate::call::setup::{Service, free_port, start_service};
use crate::call::{api, the_call::ConsoleApi};
use crate::procstat::{MemorySample, ProcReader, find_in_tree, memory};

/// `beckon bench agent-memory`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentMemoryArgs {
    /// Beckon executable that runs `up` and, from a copy, the agent unless --agent-command
    /// says otherwise (default: this program).
    #[arg(long, value_name = "PATH")]
    pub beckon_bin: Option<PathBuf>,
    /// Run the agent with this command instead: a program and its first arguments, to which
    /// `agent enroll ...` and `agent run ...` are added (e.g. `scripts/windows/wine-run
    /// target/x86_64-pc-windows-gnu/release/beckon.exe`). Give it last: it takes the rest of
    /// the line.
    #[arg(long, value_name = "PROGRAM [ARG]...", num_args = 1.., allow_hyphen_values = true)]
    pub agent_command: Vec<String>,
    /// The process to read, by its program's file name, among the agent command and the
    /// processes it starts, for a runner that starts the agent as a child of its own.
    /// Default: the started process itself (`wine-run` and `wine` become the program).
    #[arg(long, value_name = "NAME")]
    pub agent_process: Option<String>,
    /// Give the agent Windows paths (`Z:\...`, Wine's name of the Linux root).
    #[arg(long)]
    pub windows_paths: bool,
    /// Wait after the wake-up's check-in before reading the agent, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub idle_secs: f64,
    /// Bound on the agent's enrollment and on its first connection, seconds (Wine starts
    /// slowly the first time).
    #[arg(long, default_value_t = 120.0)]
    pub wait_secs: f64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What an agent-memory run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentMemoryReport {
    /// The command that ran the agent.
    pub agent_command: String,
    /// From `agent run` until the console showed the agent online, seconds.
    pub online_after_s: f64,
    /// The wake-up call's last state for the agent (`finished` when it checked in).
    pub wake_state: String,
    /// That wake-up, from `queued` until `finished` in the console's stored times,
    /// milliseconds.
    pub wake_ms: Option<f64>,
    /// A second wake-up after the reading, to the agent idle for `idle_s`: the same span
    /// (what the idle agent's memory saving may cost the next wake-up).
    pub wake_after_idle_ms: Option<f64>,
    /// The wait between the wake-up's end and the reading, seconds.
    pub idle_s: f64,
    /// The agent's memory, read at the end of the idle wait.
    pub memory: MemorySample,
    /// CPU time the agent used over the idle wait, milliseconds.
    pub idle_cpu_ms: Option<f64>,
    /// The console still showed the agent online after the reading.
    pub online_at_end: bool,
}

impl AgentMemoryReport {
    /// The report as a table for people.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let kib = |k: u64| format!("{k} KiB ({:.1} MiB)", k as f64 / 1024.0);
        let m = &self.memory;
        let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.0}"));
        let rows: Vec<(&str, String)> = vec![
            ("agent command", self.agent_command.clone()),
            ("online after (s)", format!("{:.1}", self.online_after_s)),
            ("wake-up with check-in", self.wake_state.clone()),
            ("  queued to finished (ms)", ms(self.wake_ms)),
            ("idle before reading (s)", format!("{:.0}", self.idle_s)),
            ("VmRSS", kib(m.rss_kib)),
            ("  RssAnon (heap, stacks)", kib(m.anon_kib)),
            ("  RssFile (program, libraries)", kib(m.file_kib)),
            ("  RssShmem", kib(m.shmem_kib)),
            ("VmHWM (peak)", kib(m.peak_kib)),
            ("threads", m.threads.to_string()),
            (
                "CPU while idle (ms)",
                self.idle_cpu_ms
                    .map_or_else(|| "-".into(), |c| format!("{c:.1}")),
            ),
            (
                "next wake-up, queued to finished (ms)",
                ms(self.wake_after_idle_ms),
            ),
            ("online at the end", self.online_at_end.to_string()),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::from("beckon bench agent-memory: one idle, connected agent\n\n");
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<width$}  {v}");
        }
        out
    }
}

/// Runs `beckon bench agent-memory` and prints its report.
pub async fn agent_memory_command(args: &AgentMemoryArgs) -> anyhow::Result<()> {
    let report = run_agent_memory(args).await?;
    crate::print_report(&report, args.json, report.table())?;
    if report.wake_state != "finished" || !report.online_at_end {
        bail!(
            "the agent was not idle and connected: wake-up {}, online at the end: {}",
            report.wake_state,
            report.online_at_end
        );
    }
    Ok(())
}

/// Starts `beckon up`, enrolls and runs the agent, reads it, and stops everything.
pub async fn run_agent_memory(args: &AgentMemoryArgs) -> anyhow::Result<AgentMemoryReport> {
    let program = crate::beckon_program(args.beckon_bin.as_ref())?;
    let temp = tempfile::Builder::new()
        .prefix("beckon-bench-agent-memory-")
        .tempdir()
        .context("creating a temporary folder")?;
    let data = temp.path();
    let agent_command = if args.agent_command.is_empty() {
        // A copy, as on an endpoint, where no console or broker maps the same file: pages of a
        // file other processes map too stay resident whatever the agent does.
        let copy = data.join("beckon-agent");
        std::fs::copy(&program, &copy)
            .with_context(|| format!("copying {} for the agent", program.display()))?;
        vec![copy.display().to_string()]
    } else {
        args.agent_command.clone()
    };
    let console_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let mqtts = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let up_args: Vec<String> = [
        "up",
        "--data",
        &data.join("beckon-data").display().to_string(),
        "--console",
        &console_addr.to_string(),
        "--mqtts",
        &mqtts.to_string(),
        "--fallback",
        "off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (up, up_out) = start_service(
        "beckon up",
        &program,
        &up_args,
        &[],
        &data.join("up.log"),
        "beckon up: ready",
    )
    .await?;
    let password = up_out
        .iter()
        .find_map(|l| l.split("password ").nth(1)?.split_whitespace().next())
        .context("beckon up printed no first password")?
        .to_owned();
    let result = measure(args, &agent_command, data, console_addr, &password).await;
    up.stop().await;
    result
}

async fn measure(
    args: &AgentMemoryArgs,
    agent_command: &[String],
    data: &Path,
    console_addr: SocketAddr,
    password: &str,
) -> anyhow::Result<AgentMemoryReport> {
    let wait = Duration::from_secs_f64(args.wait_secs.max(1.0));
    let (ConsoleApi { mut client, .. }, token) = console_tokens(console_addr, password).await?;
    let agent_path = |p: &Path| {
        if args.windows_paths {
            format!("Z:{}", p.display()).replace('/', "\\")
        } else {
            p.display().to_string()
        }
    };
    let state = data.join("agent-state");
    let config = state.join("agent.toml");
    let mut enroll = agent_process(agent_command, &data.join("agent-enroll.log"))?;
    enroll
        .args(["agent", "enroll", "--console"])
        .arg(format!("http://{console_addr}"))
        .args(["--token", &token, "--name", "bench agent", "--state-dir"])
        .arg(agent_path(&state))
        .arg("--config-out")
        .arg(agent_path(&config))
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let enrolled = tokio::time::timeout(wait, enroll.output())
        .await
        .context("the agent's enrollment did not end in time")?
        .context("running the agent's enrollment")?;
    let printed = String::from_utf8_lossy(&enrolled.stdout);
    let agent_id = printed
        .lines()
        .find_map(|l| l.strip_prefix("enrolled as agent "))
        .and_then(|l| l.split_whitespace().next())
        .filter(|_| enrolled.status.success())
        .with_context(|| {
            format!(
                "the agent did not enroll ({}): {}",
                enrolled.status,
                log_tail(&data.join("agent-enroll.log"))
            )
        })?
        .to_owned();

    let log = data.join("agent.log");
    let started = Instant::now();
    let mut run = agent_process(agent_command, &log)?;
    let child = run
        .args(["agent", "run", "--config"])
        .arg(agent_path(&config))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the agent")?;
    let pid = child.id().context("the agent has no pid")?;
    let agent = Service { child, pid };
    let outcome = async {
        let record = format!("/api/v1/agents/{agent_id}");
        let online = |a: &serde_json::Value| a["presence"] == "online";
        wait_for(&mut client, &record, "the agent online", wait, online)
            .await
            .with_context(|| format!("agent log: {}", log_tail(&log)))?;
        let online_after_s = started.elapsed().as_secs_f64();
        // The process to read, once it runs (under Wine the program starts a moment later).
        let target = match &args.agent_process {
            None => pid,
            Some(name) => find_in_tree(pid, name)
                .with_context(|| format!("no process {name:?} under the agent command"))?,
        };
        let (wake_state, wake_ms) = wake_with_checkin(&mut client, &agent_id).await?;
        let reader = ProcReader::new();
        let before = reader.sample(target).ok();
        tokio::time::sleep(Duration::from_secs_f64(args.idle_secs.max(0.0))).await;
        let memory = memory(target).context("reading the agent's memory")?;
        let after = reader.sample(target).ok();
        let still = api(&mut client, "GET", &record, None, 200).await?;
        let (_, wake_after_idle_ms) = wake_with_checkin(&mut client, &agent_id).await?;
        Ok(AgentMemoryReport {
            agent_command: agent_command.join(" "),
            online_after_s,
            wake_state,
            wake_ms,
            wake_after_idle_ms,
            idle_s: args.idle_secs.max(0.0),
            memory,
            idle_cpu_ms: before
                .zip(after)
                .map(|(b, a)| a.cpu.saturating_sub(b.cpu).as_secs_f64() * 1000.0),
            online_at_end: online(&still),
        })
    }
    .await;
    agent.stop().await;
    outcome
}

/// `program [args]` of the agent command, its stderr into `log`.
fn agent_process(command: &[String], log: &Path) -> anyhow::Result<tokio::process::Command> {
    let (program, first_args) = command.split_first().context("an empty agent command")?;
    let log_file = std::fs::File::create(log)
        .with_context(|| format!("creating the agent log {}", log.display()))?;
    let mut process = tokio::process::Command::new(program);
    process
        .args(first_args)
        .stdin(Stdio::null())
        .stderr(Stdio::from(log_file))
        // The level a deployed agent logs at.
        .env("RUST_LOG", "info");
    Ok(process)
}

/// One wake-up call to the agent; waits until its state is final and returns it, and the
/// time from `queued` to `finished` when it finished. The enrolled agent's action is a
/// check-in with the console.
async fn wake_with_checkin(
    client: &mut HttpClient,
    agent_id: &str,
) -> anyhow::Result<(String, Option<f64>)> {
    let body = serde_json::json!({
        "target": { "agents": [agent_id] },
        "reason": "beckon bench agent-memory",
    });
    let call = api(client, "POST", "/api/v1/calls", Some(body), 201).await?;
    let id = call["id"].as_str().context("no id in the call's answer")?;
    let path = format!("/api/v1/calls/{id}");
    let is_final = |state: &str| matches!(state, "finished" | "expired" | "failed");
    let view = wait_for(
        client,
        &path,
        "the wake-up in a final state",
        Duration::from_secs(60),
        |v| v["deliveries"][0]["state"].as_str().is_some_and(is_final),
    )
    .await?;
    let delivery = &view["deliveries"][0];
    let mut state = delivery["state"].as_str().unwrap_or("?").to_owned();
    if let Some(status) = delivery["status"].as_str().filter(|s| *s != "ok") {
        state = format!("{state} ({status}: {})", delivery["detail"]);
    }
    let took = (state == "finished")
        .then(|| Some(delivery["finished_at"].as_i64()? - delivery["queued_at"].as_i64()?))
        .flatten()
        .map(|ms| ms as f64);
    Ok((state, took))
}

/// Polls `GET path` until `done` holds; fails after `limit`.
async fn wait_for(
    client: &mut HttpClient,
    path: &str,
    what: &str,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + limit;
    loop {
        let value = api(client, "GET", path, None, 200).await?;
        if done(&value) {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("waited {limit:?} for {what}: {value}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
