//! The Beckon endpoint agent: keeps one MQTT connection to the push service, acts on signed
//! wake-up calls, acknowledges them, and reports its state.
//!
//! - [`config`]: the TOML configuration (`docs/agent.md` lists every key).
//! - [`connector`]: how a byte stream to the broker is opened (the connection ladder plugs in
//!   here).
//! - [`session`]: the MQTT 5 client session over any stream.
//! - [`runtime`]: reconnect loop, wake-up handling, action worker, check-in scheduler.
//! - [`proxy`]: the proxy the ladder tries first (`broker.proxy`, or the system's setting).
//! - [`relay`]: Wake-on-LAN sent on this machine's network when the console asks.
//! - [`actions`]: the command and HTTP actions.
//! - [`state`], [`status`]: the state folder and `beckon agent status`.
//! - [`takeover`]: stops fighting another machine that uses the same identity.
//! - [`enroll`], [`inventory`], [`http`]: `beckon agent enroll` (key pair, signing request,
//!   inventory, the console's answer stored in the state folder, a ready configuration).
// No unsafe code but in `platform::windows` (Win32 calls), which allows it for itself.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod actions;
pub mod config;
pub mod connector;
pub mod enroll;
pub mod http;
pub mod inventory;
pub mod jitter;
pub mod platform;
pub mod proxy;
pub mod relay;
pub mod renew;
pub mod runtime;
pub mod session;
pub mod state;
pub mod status;
pub mod takeover;
pub mod timefmt;
pub mod wakeup;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;

pub use config::AgentConfig;
pub use connector::{
    BoxedStream, ConnectError, Connection, Connector, LadderConnector, PlainTcpConnector,
};
pub use runtime::{AgentError, run_agent};
pub use wakeup::{WakeUp, WakeUpCheck, WakeUpRejected};

/// `beckon agent ...`
#[derive(Debug, clap::Subcommand)]
pub enum AgentCommand {
    /// Run the agent: keep the push connection and act on wake-up calls.
    Run {
        /// The agent's configuration file.
        #[arg(long, default_value_os_t = platform::default_config_file(), env = "BECKON_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Enroll this machine with a console: make a key pair, have the console sign it, store
    /// certificate, CA, broker endpoints and wake-up key, write a ready configuration.
    Enroll {
        /// The console's URL, e.g. https://console.example.com:8080.
        #[arg(long, value_name = "URL")]
        console: String,
        /// The enrollment token (bke_...) from the console's Enrollment tokens page.
        #[arg(
            long,
            value_name = "TOKEN",
            env = "BECKON_ENROLL_TOKEN",
            hide_env_values = true
        )]
        token: String,
        /// The agent's state folder: key, certificates, tokens, state.
        #[arg(long, value_name = "DIR", default_value_os_t = platform::default_state_dir())]
        state_dir: PathBuf,
        /// Where to write the agent configuration.
        #[arg(long, value_name = "FILE", default_value_os_t = platform::default_config_file())]
        config_out: PathBuf,
        /// Name shown in the console (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Agent id to ask for (default: the console makes one).
        #[arg(long, value_name = "ID")]
        agent_id: Option<String>,
        /// PEM CA file for an https console with a private CA (default: the system store).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Enroll again even though the state folder holds an enrollment.
        #[arg(long)]
        force: bool,
    },
    /// Register the agent as a Windows service (automatic start, LocalSystem, restarted after
    /// a failure) that runs it with this configuration.
    #[cfg(windows)]
    InstallService {
        /// The agent's configuration file.
        #[arg(long, default_value_os_t = platform::default_config_file())]
        config: PathBuf,
    },
    /// Stop and remove the Windows service.
    #[cfg(windows)]
    UninstallService,
    /// What the Windows service control manager starts (not for a prompt).
    #[cfg(windows)]
    #[command(hide = true)]
    Service {
        /// The agent's configuration file.
        #[arg(long, default_value_os_t = platform::default_config_file())]
        config: PathBuf,
    },
    /// Print the agent's state: connected or not, path, last wake-up, last error.
    Status {
        /// The agent's state folder (default: state_dir from --config, else /var/lib/beckon-agent).
        #[arg(long, conflicts_with = "config")]
        state_dir: Option<PathBuf>,
        /// Read state_dir from this configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs an agent subcommand. `run` builds its own single-threaded tokio runtime (on a thread
/// of its own when called from inside a runtime) and returns when SIGTERM or SIGINT stops it.
pub fn run(cmd: AgentCommand) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Run { config } => {
            let config = AgentConfig::load(&config)?;
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .try_init();
            let run_here = move || -> anyhow::Result<()> {
                // One thread is plenty for one connection and keeps the idle agent small.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the agent's async runtime")?;
                runtime.block_on(run_configured(config))
            };
            if tokio::runtime::Handle::try_current().is_ok() {
                // Called from inside a runtime (a tokio main): a runtime cannot block inside
                // another, so the agent gets its own thread.
                return std::thread::Builder::new()
                    .name("beckon-agent".into())
                    .spawn(run_here)
                    .context("cannot start the agent's thread")?
                    .join()
                    .map_err(|_| anyhow::anyhow!("the agent's thread panicked"))?;
            }
            run_here()
        }
        AgentCommand::Enroll {
            console,
            token,
            state_dir,
            config_out,
            name,
            agent_id,
            ca,
            force,
        } => {
            let mut opts = enroll::EnrollOptions::new(console, token, state_dir, config_out);
            opts.name = name;
            opts.agent_id = agent_id;
            opts.console_ca = ca;
            opts.force = force;
            let enroll_here = move || -> anyhow::Result<enroll::Enrolled> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the async runtime")?;
                Ok(runtime.block_on(enroll::enroll(&opts))?)
            };
            let enrolled = if tokio::runtime::Handle::try_current().is_ok() {
                std::thread::spawn(enroll_here)
                    .join()
                    .map_err(|_| anyhow::anyhow!("the enrollment thread panicked"))??
            } else {
                enroll_here()?
            };
            println!(
                "enrolled as agent {} in tenant {}",
                enrolled.agent_id, enrolled.tenant
            );
            println!("  state:  {}", enrolled.config.state_dir.display());
            println!(
                "  broker: {}:{} (fallback {})",
                enrolled.config.broker.host,
                enrolled.config.broker.port,
                enrolled.config.broker.fallback_port
            );
            println!("  config: {}", enrolled.config_file.display());
            println!(
                "start it: beckon agent run --config {}",
                enrolled.config_file.display()
            );
            Ok(())
        }
        #[cfg(windows)]
        AgentCommand::InstallService { config } => platform::service::install(&config),
        #[cfg(windows)]
        AgentCommand::UninstallService => platform::service::uninstall(),
        #[cfg(windows)]
        AgentCommand::Service { config } => platform::service::run(config),
        AgentCommand::Status {
            state_dir,
            config,
            json,
        } => {
            let dir = match (state_dir, config) {
                (Some(dir), _) => dir,
                (None, Some(file)) => AgentConfig::load(&file)?.state_dir,
                (None, None) => platform::default_state_dir(),
            };
            let text = if json {
                status::status_json(&dir)
            } else {
                status::status_text(&dir)
            };
            let text = text.with_context(|| {
                format!(
                    "cannot read the agent state in {}; run as the agent's user or root, or pass --state-dir",
                    dir.display()
                )
            })?;
            print!("{text}");
            if json {
                println!();
            }
            Ok(())
        }
    }
}

/// Builds connector and wake-up check from the configuration and runs until SIGINT/SIGTERM.
async fn run_configured(config: AgentConfig) -> anyhow::Result<()> {
    let check: Arc<dyn WakeUpCheck> = Arc::new(wakeup::verifier(
        &config.tenant,
        &config.agent_id,
        &config.wakeup.console_keys,
    )?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        platform::wait_for_stop_signal().await;
        tracing::info!("stop signal received");
        let _ = stop_tx.send(true);
        // Keep the sender alive: dropping it also means "stop", but say it once, clearly.
        std::future::pending::<()>().await;
    });
    match config.broker.plain_port {
        Some(port) => {
            let loopback = config.broker.host == "localhost"
                || config
                    .broker
                    .host
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                tracing::warn!(
                    host = %config.broker.host,
                    "broker.plain_port sends MQTT unencrypted; use it only on loopback for development"
                );
            }
            let connector =
                PlainTcpConnector::new(&config.broker.host, port, config.broker.connect_timeout);
            run_agent(config, connector, check, stop_rx).await?;
        }
        None => {
            let connector = LadderConnector::new(&config)?;
            tracing::info!(order = ?connector.attempt_order(), "connection ladder");
            run_agent(config, connector, check, stop_rx).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        agent: AgentCommand,
    }

    #[test]
    fn command_line_parses_as_documented() {
        let cli = Cli::try_parse_from(["beckon", "run", "--config", "/etc/a.toml"]).expect("run");
        assert!(
            matches!(cli.agent, AgentCommand::Run { config } if config == std::path::Path::new("/etc/a.toml"))
        );
        let cli = Cli::try_parse_from(["beckon", "status", "--state-dir", "/x", "--json"])
            .expect("status");
        assert!(matches!(
            cli.agent,
            AgentCommand::Status {
                state_dir: Some(_),
                config: None,
                json: true
            }
        ));
        assert!(
            Cli::try_parse_from(["beckon", "status", "--state-dir", "/x", "--config", "/y"])
                .is_err(),
            "one source of the state folder"
        );
    }

    #[test]
    fn run_with_a_missing_config_names_the_file() {
        let err = run(AgentCommand::Run {
            config: PathBuf::from("/nonexistent/beckon-agent.toml"),
        })
        .expect_err("no such file");
        assert!(
            err.to_string().contains("/nonexistent/beckon-agent.toml"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn status_json_reports_running_and_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = state::StateStore::open(dir.path(), "a1").expect("open");
        store
            .update(|s| {
                s.connected = true;
                s.path = Some("8883".into());
            })
            .await
            .expect("update");
        let json: serde_json::Value =
            serde_json::from_str(&status::status_json(dir.path()).expect("json")).expect("valid");
        assert_eq!(json["running"], true, "this test process wrote it");
        assert_eq!(json["connected"], true);
        assert_eq!(json["path"], "8883");
        assert!(json.get("replay_guard").is_none(), "internal data left out");
    }
}
