//! `beckon up --demo-agents N`: N agents in the same process, enrolled through the console's
//! HTTP API exactly as real agents are (each with its own key pair and certificate in
//! `<data>/demo-agents/<name>/`), connected to the broker, acting on wake-ups by checking in
//! with the console. A second start reuses them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use beckon_agent::enroll::{EnrollError, EnrollOptions, enroll};
use beckon_agent::http::{self, Url};
use beckon_agent::inventory::{InterfaceAddress, Inventory};
use beckon_agent::{AgentConfig, LadderConnector, WakeUpCheck, run_agent};
use beckon_console::ConsoleHandle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Most demo agents `beckon up` runs.
pub const MAX_DEMO_AGENTS: u16 = 50;

/// Name of the API token `beckon up` makes (and revokes) to create the enrollment token.
const API_TOKEN_NAME: &str = "beckon up: demo agents";

/// Settings appended to each demo agent's configuration: connect soon after start (a real
/// fleet waits up to 30 s at random so as not to stampede; ten agents on loopback need not).
const DEMO_CONFIG: &str = "[reconnect]\nstart_delay_max = \"2s\"\nbackoff_cap = \"30s\"\n";

/// The running demo agents.
pub struct DemoAgents {
    /// How many run.
    pub running: usize,
    /// How many were enrolled on this start (the others were reused).
    pub enrolled_now: usize,
    /// Their folder.
    pub dir: PathBuf,
    tasks: Vec<JoinHandle<()>>,
}

impl DemoAgents {
    /// Waits (at most `limit`) for the agents to disconnect after shutdown was signalled.
    pub async fn stopped(self, limit: Duration) {
        let all = futures_join(self.tasks);
        let _ = tokio::time::timeout(limit, all).await;
    }
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// Where this start's broker listens (the ports may differ from the start that enrolled
/// the agents).
pub struct BrokerPorts {
    /// MQTT over TLS.
    pub mqtts: u16,
    /// The shared HTTPS port, when on.
    pub fallback: Option<u16>,
}

/// Enrolls the demo agents that have no configuration yet (or whose certificate is from
/// another CA than the console's), then starts all `count` of them.
pub async fn start(
    console: &ConsoleHandle,
    data: &Path,
    count: u16,
    ports: BrokerPorts,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<DemoAgents> {
    let dir = std::path::absolute(data.join("demo-agents"))
        .with_context(|| format!("resolving {}", data.display()))?;
    let console_ca = console.state.ca.cert_pem().to_owned();
    let names: Vec<String> = (1..=count).map(|i| format!("demo-{i:02}")).collect();
    let mut configs = Vec::new();
    let mut missing = Vec::new();
    for name in &names {
        let agent_dir = dir.join(name);
        match reusable(&agent_dir, &console_ca) {
            Some(config) => configs.push(config),
            None => missing.push(name.clone()),
        }
    }
    let enrolled_now = missing.len();
    if !missing.is_empty() {
        configs.extend(enroll_all(console, &dir, &missing).await?);
    }
    let mut tasks = Vec::new();
    for mut config in configs {
        // Reused agents follow this start's addresses (flags may have changed since).
        config.broker.host = "localhost".into();
        config.broker.port = ports.mqtts;
        config.broker.fallback_port = ports.fallback.unwrap_or(443);
        config.checkin.console_url = Some(console.url());
        let name = config.agent_id.clone();
        let check: Arc<dyn WakeUpCheck> = Arc::new(
            beckon_agent::wakeup::verifier(
                &config.tenant,
                &config.agent_id,
                &config.wakeup.console_keys,
            )
            .with_context(|| format!("demo agent {name}: the console's wake-up key"))?,
        );
        let connector = LadderConnector::new(&config)
            .with_context(|| format!("demo agent {name}: its certificate files"))?;
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = run_agent(config, connector, check, shutdown).await {
                tracing::error!(agent = %name, error = %e, "demo agent stopped");
            }
        }));
    }
    Ok(DemoAgents {
        running: tasks.len(),
        enrolled_now,
        dir,
        tasks,
    })
}

/// The agent's configuration when it exists, parses, and its CA is the console's.
fn reusable(agent_dir: &Path, console_ca: &str) -> Option<AgentConfig> {
    let file = agent_dir.join("agent.toml");
    if !file.exists() {
        return None;
    }
    let config = match AgentConfig::load(&file) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "demo agent configuration unusable: enrolling it again");
            return None;
        }
    };
    let ca = std::fs::read_to_string(agent_dir.join("ca.pem")).unwrap_or_default();
    if ca.trim() != console_ca.trim() {
        tracing::warn!(
            dir = %agent_dir.display(),
            "demo agent enrolled with another console's CA (was the console folder reset?): enrolling it again"
        );
        return None;
    }
    Some(config)
}

/// Makes an enrollment token for `names.len()` agents through the API, enrolls each over
/// HTTP, then revokes the token and the API token used to make it.
async fn enroll_all(
    console: &ConsoleHandle,
    dir: &Path,
    names: &[String],
) -> anyhow::Result<Vec<AgentConfig>> {
    let base = Url::parse(&console.url()).map_err(anyhow::Error::msg)?;
    let client = http::console_client(&base, None).context("the demo console's client")?;
    let api_token = console
        .create_api_token(API_TOKEN_NAME)
        .await
        .context("creating an API token for the demo agents")?;
    let auth = [("Authorization", format!("Bearer {api_token}"))];
    let body = serde_json::json!({
        "label": "beckon up: demo agents",
        "expires_in_secs": 600,
        "max_uses": names.len(),
    });
    let response = http::request(
        &client,
        &base.with_path("/api/v1/enrollment-tokens"),
        "POST",
        &auth,
        body.to_string().as_bytes(),
        Duration::from_secs(10),
    )
    .await
    .context("asking the console for an enrollment token")?;
    if response.status != 201 {
        anyhow::bail!(
            "the console refused an enrollment token for the demo agents (HTTP {}): {}",
            response.status,
            response.error_message()
        );
    }
    let created: serde_json::Value =
        serde_json::from_slice(&response.body).context("reading the enrollment token")?;
    let token = created["token"].as_str().unwrap_or_default().to_owned();
    let token_id = created["id"].as_str().unwrap_or_default().to_owned();

    let os = Inventory::gather().os;
    let mut configs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let agent_dir = dir.join(name);
        let mut opts = EnrollOptions::new(
            console.url(),
            token.clone(),
            &agent_dir,
            agent_dir.join("agent.toml"),
        );
        opts.name = Some(name.clone());
        opts.agent_id = Some(name.clone());
        opts.inventory = Some(demo_inventory(name, &os, i));
        opts.extra_config = DEMO_CONFIG.to_owned();
        opts.force = true;
        let enrolled = match enroll(&opts).await {
            // The id is taken (the console keeps an agent of an earlier demo folder): let
            // the console choose one.
            Err(EnrollError::Refused { status: 409, .. }) => {
                opts.agent_id = None;
                enroll(&opts).await
            }
            other => other,
        }
        .with_context(|| format!("enrolling demo agent {name}"))?;
        configs.push(enrolled.config);
    }

    // Clean up: the token is used up anyway; the API token has done its job.
    let _ = http::request(
        &client,
        &base.with_path(&format!("/api/v1/enrollment-tokens/{token_id}")),
        "DELETE",
        &auth,
        b"",
        Duration::from_secs(10),
    )
    .await;
    revoke_api_token(&client, &base, &auth).await;
    Ok(configs)
}

async fn revoke_api_token(client: &http::HttpClient, base: &Url, auth: &[(&str, String)]) {
    let Ok(list) = http::request(
        client,
        &base.with_path("/api/v1/api-tokens"),
        "GET",
        auth,
        b"",
        Duration::from_secs(10),
    )
    .await
    else {
        return;
    };
    let tokens: Vec<serde_json::Value> = serde_json::from_slice(&list.body).unwrap_or_default();
    for t in tokens {
        if t["name"] == API_TOKEN_NAME && t["revoked"] == false {
            let id = t["id"].as_str().unwrap_or_default();
            let _ = http::request(
                client,
                &base.with_path(&format!("/api/v1/api-tokens/{id}")),
                "DELETE",
                auth,
                b"",
                Duration::from_secs(10),
            )
            .await;
        }
    }
}

/// A demo agent's inventory: its name as host name, this machine's OS, and a loopback
/// address with a locally administered MAC, so that Wake-on-LAN from the demo console sends
/// its packets to 127.255.255.255 and never onto the real network.
fn demo_inventory(name: &str, os: &str, index: usize) -> Inventory {
    Inventory {
        hostname: name.to_owned(),
        os: os.to_owned(),
        addresses: vec![InterfaceAddress {
            address: std::net::Ipv4Addr::LOCALHOST.into(),
            prefix_len: 8,
        }],
        macs: vec![format!(
            "02:be:c0:00:{:02x}:{:02x}",
            (index >> 8) & 0xff,
            index & 0xff
        )],
    }
}
