//! `beckon wake`: the command-line client of the console's API. Makes a wake-up call
//! (`POST /api/v1/calls`), prints its id, and with `--wait` follows each agent's state
//! (the call's counts from `GET /api/v1/calls/{id}`, polled twice a second) until every agent
//! is in a final state (`finished`, `expired`, `failed`) or the time limit passes, then reads
//! every agent's state a page at a time (`GET /api/v1/calls/{id}/deliveries`) and prints a
//! table.
//!
//! Exit codes: 0 the call was made (and with `--wait`: every agent finished with status
//! `ok`); 1 with `--wait`: some agent failed, expired, finished with another status, or had
//! not reached a final state in time; 2 the call could not be made (console unreachable,
//! refused token, a token without the operator role (403), unknown agent or group, bad
//! flag): the console's message is printed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use beckon_agent::http::{self, Url};
use serde::Deserialize;

/// Flags of `beckon wake`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["agents", "group", "all"])))]
pub struct WakeArgs {
    /// The console's URL, e.g. https://console.example:8080.
    #[arg(long, env = "BECKON_CONSOLE_URL", value_name = "URL")]
    console: String,
    /// An API token (bkt_...) with the operator role or more (making a call needs it;
    /// --wait reads, which any role may). An admin creates one on the API tokens page in the
    /// console (or POST /api/v1/api-tokens {"name": "...", "role": "operator"}); see
    /// docs/api.md, "Roles".
    #[arg(
        long,
        env = "BECKON_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: String,
    /// PEM file of the CA that signed the console's HTTPS certificate (default: the
    /// system's trust store).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The agents to wake, by id.
    #[arg(value_name = "AGENT_ID")]
    agents: Vec<String>,
    /// Wake every agent of this group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Wake every agent.
    #[arg(long)]
    all: bool,
    /// Why (shown in the console and handed to the agents' actions).
    #[arg(long, default_value = "")]
    reason: String,
    /// The action the agents run (default: check in with the console).
    #[arg(long)]
    action: Option<String>,
    /// How long the call stays valid, e.g. 90s, 10m, 1h (default: the console's setting).
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    expiry: Option<u32>,
    /// Window over which the agents spread their action, e.g. 30s (default: the console's
    /// rule for large calls).
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    spread: Option<u32>,
    /// Also send Wake-on-LAN to the agents that are not online.
    #[arg(long)]
    wol: bool,
    /// Follow the agents' states until each is final, then print a table.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long (default: the call's expiry plus 10 s).
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    timeout: Option<u32>,
}

fn parse_secs(text: &str) -> Result<u32, String> {
    let d = beckon_agent::config::parse_duration(text).ok_or_else(|| {
        format!("{text:?} is not a duration: write e.g. 90s, 10m, 1h or whole seconds")
    })?;
    u32::try_from(d.as_secs())
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("{text:?}: give at least one second and at most 136 years"))
}

/// Limit for each request to the console.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How often `--wait` asks for the call's state.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// A per-agent state as `GET /api/v1/calls/{id}` reports it.
#[derive(Debug, Deserialize)]
struct Delivery {
    agent_id: String,
    state: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    exit_code: Option<i64>,
    #[serde(default)]
    duration_ms: Option<i64>,
    #[serde(default)]
    detail: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CallView {
    id: String,
    #[serde(default)]
    expires_at: Option<i64>,
    /// How many agents are in each state.
    #[serde(default)]
    counts: std::collections::BTreeMap<String, u64>,
}

/// A page of `GET /api/v1/calls/{id}/deliveries`.
#[derive(Debug, Deserialize)]
struct DeliveryPage {
    deliveries: Vec<Delivery>,
    next_after: Option<String>,
}

/// The most deliveries the console gives in one page.
const PAGE: u32 = 5000;

fn is_final(state: &str) -> bool {
    matches!(state, "finished" | "expired" | "failed")
}

fn succeeded(d: &Delivery) -> bool {
    d.state == "finished" && d.status.as_deref().is_none_or(|s| s == "ok")
}

/// Runs `beckon wake`; the exit code is chosen as described in the module documentation.
pub fn main(args: WakeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", crate::error_chain(&e));
            ExitCode::from(2)
        }
    }
}

struct Client {
    base: Url,
    token: String,
    http: http::HttpClient,
}

impl Client {
    async fn call(&self, method: &str, path: &str, body: &[u8]) -> anyhow::Result<Vec<u8>> {
        let url = self.base.with_path(path);
        let headers = [("Authorization", format!("Bearer {}", self.token))];
        let r = http::request(&self.http, &url, method, &headers, body, REQUEST_TIMEOUT)
            .await
            .map_err(|e| {
                let hint = match &e {
                    http::HttpError::Tls(_) => {
                        "; for a console with its own CA, pass that CA's PEM file with --ca"
                    }
                    _ => "; check the URL (scheme, host and port) and that the console is running",
                };
                anyhow::anyhow!("cannot reach the console at {url}: {e}{hint}")
            })?;
        match r.status {
            200..=299 => Ok(r.body),
            401 => bail!(
                "the console refused the API token (HTTP 401): {}",
                r.error_message()
            ),
            status => bail!(
                "the console refused {method} {path} (HTTP {status}): {}",
                r.error_message()
            ),
        }
    }
}

async fn run(args: WakeArgs) -> anyhow::Result<ExitCode> {
    let base = Url::parse(args.console.trim_end_matches('/'))
        .map_err(|e| anyhow::anyhow!("--console: {e}"))?;
    let token = args.token.trim().to_owned();
    if !token.starts_with("bkt_") {
        bail!(
            "--token must be an API token (they start with bkt_): an administrator creates one on the API tokens page in the console (or POST /api/v1/api-tokens; see docs/api.md)"
        );
    }
    let http = http::console_client(&base, args.ca.as_deref()).context("--ca")?;
    let client = Client {
        base: base.with_path("/"),
        token,
        http,
    };
    let target = if args.all {
        serde_json::json!("all")
    } else if let Some(g) = &args.group {
        serde_json::json!({ "group": g })
    } else {
        serde_json::json!({ "agents": args.agents })
    };
    let mut body = serde_json::json!({ "target": target, "reason": args.reason });
    if let Some(a) = &args.action {
        body["action"] = a.as_str().into();
    }
    if let Some(e) = args.expiry {
        body["expires_in_secs"] = e.into();
    }
    if let Some(s) = args.spread {
        body["spread_secs"] = s.into();
    }
    if args.wol {
        body["wake_on_lan"] = true.into();
    }
    let created = client
        .call("POST", "/api/v1/calls", body.to_string().as_bytes())
        .await?;
    let created: CallView =
        serde_json::from_slice(&created).context("the console's answer is not a call")?;
    println!("{}", created.id);
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }

    let limit = match (args.timeout, created.expires_at) {
        (Some(t), _) => Duration::from_secs(u64::from(t)),
        (None, Some(expires_at)) => {
            let left = expires_at.saturating_sub(now_ms()).max(0);
            Duration::from_millis(u64::try_from(left).unwrap_or(0)) + Duration::from_secs(10)
        }
        (None, None) => Duration::from_secs(600),
    };
    let deadline = Instant::now() + limit;
    let path = format!("/api/v1/calls/{}", created.id);
    loop {
        let view: CallView = serde_json::from_slice(&client.call("GET", &path, &[]).await?)
            .context("the console's answer is not a call")?;
        let done = view.counts.iter().all(|(s, n)| is_final(s) || *n == 0);
        if done || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    let deliveries = all_deliveries(&client, &created.id).await?;
    print!("{}", table(&deliveries));
    let pending = deliveries.iter().filter(|d| !is_final(&d.state)).count();
    let bad = deliveries
        .iter()
        .filter(|d| is_final(&d.state) && !succeeded(d))
        .count();
    if pending > 0 {
        eprintln!(
            "{pending} of {} agents not in a final state after {limit:?}",
            deliveries.len()
        );
    }
    if bad > 0 {
        eprintln!("{bad} of {} agents failed or expired", deliveries.len());
    }
    Ok(if pending + bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Every agent's state of the call `id`, read a page at a time.
async fn all_deliveries(client: &Client, id: &str) -> anyhow::Result<Vec<Delivery>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/calls/{id}/deliveries?limit={PAGE}");
        if let Some(a) = &after {
            path.push_str(&format!("&after={}", percent_encode(a)));
        }
        let page: DeliveryPage = serde_json::from_slice(&client.call("GET", &path, &[]).await?)
            .context("the console's answer is not a page of deliveries")?;
        out.extend(page.deliveries);
        match page.next_after {
            Some(next) => after = Some(next),
            None => return Ok(out),
        }
    }
}

/// `text` as a query string value: bytes other than letters, digits and `-._~` as `%XX`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The per-agent table: AGENT, STATE, STATUS, EXIT, DURATION, DETAIL.
fn table(deliveries: &[Delivery]) -> String {
    let rows: Vec<[String; 6]> = deliveries
        .iter()
        .map(|d| {
            [
                d.agent_id.clone(),
                d.state.clone(),
                d.status.clone().unwrap_or_else(|| "-".into()),
                d.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
                d.duration_ms
                    .map_or_else(|| "-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
                d.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let header = ["AGENT", "STATE", "STATUS", "EXIT", "DURATION", "DETAIL"].map(String::from);
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(percent_encode("pc-1.lab_~"), "pc-1.lab_~");
        assert_eq!(percent_encode("a&b=c %"), "a%26b%3Dc%20%25");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_secs("90s"), Ok(90));
        assert_eq!(parse_secs("10m"), Ok(600));
        assert_eq!(parse_secs("45"), Ok(45));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("soon").unwrap_err().contains("not a duration"));
    }

    #[test]
    fn the_table_lines_up_and_counts_only_ok_as_success() {
        let d = |id: &str, state: &str, status: Option<&str>| Delivery {
            agent_id: id.into(),
            state: state.into(),
            status: status.map(Into::into),
            exit_code: status.map(|_| 0),
            duration_ms: Some(1200),
            detail: None,
        };
        let rows = [
            d("pc-1", "finished", Some("ok")),
            d("laptop-22", "expired", None),
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("AGENT      STATE"), "{t}");
        assert!(lines[1].starts_with("pc-1       finished  ok"), "{t}");
        assert!(succeeded(&rows[0]) && !succeeded(&rows[1]));
        assert!(!succeeded(&d("pc-2", "finished", Some("failed"))));
    }
}
