//! `beckon doctor`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use beckon_agent::config::AgentConfig;
use beckon_agent::proxy::{FoundProxy, ProxySetting};
use beckon_net::ClientIdentity;

use crate::config::DoctorConfig;

/// `beckon doctor`: checks every path an agent would use to reach the broker (DNS, TCP,
/// proxy CONNECT, TLS, WebSocket, MQTT CONNECT, a round trip) and names the fix for each
/// failure. Exit status 0 when at least one path works, 1 when none does.
#[derive(Clone, clap::Args)]
pub struct DoctorArgs {
    /// The broker's host name or IP address (default: broker.host of --agent-config).
    #[arg(long, value_name = "HOST")]
    pub broker: Option<String>,
    /// The name checked in the broker's certificate, when it differs from --broker.
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// The primary MQTT-over-TLS port and the fallback port shared with HTTPS (ALPN mqtt and
    /// WebSocket), comma separated; a single port checks only the primary path.
    #[arg(long, value_name = "LIST", value_delimiter = ',', num_args = 1..=2)]
    pub ports: Option<Vec<u16>>,
    /// The HTTP proxy agents use first (`http://host:port`, or `http://user:password@host:port`),
    /// or `system` for this machine's proxy setting as the agent reads it.
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    /// PEM file with the CA that signs the broker's certificate (default: the system's store).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// The client certificate (PEM) the agent authenticates with.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// MQTT user name, sent with --token.
    #[arg(long, value_name = "U")]
    pub username: Option<String>,
    /// A token, sent as the MQTT password.
    #[arg(
        long,
        value_name = "T",
        env = "BECKON_DOCTOR_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Connect as this client id (an agent's id): checks its subscription to
    /// agents/{id}/wake and resumes its session rather than cleaning it. Default: a throw-away
    /// id and a clean session.
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// A topic the identity may publish and subscribe to, for the round-trip echo (default:
    /// beckon-doctor/{client id} for a throw-away id, none for an agent's id).
    #[arg(long, value_name = "TOPIC")]
    pub echo_topic: Option<String>,
    /// Take broker, ports, proxy, CA, client certificate, token and client id from an agent's
    /// configuration file; other flags override its values.
    #[arg(long, value_name = "FILE")]
    pub agent_config: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// How long each step may take, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
}

impl DoctorArgs {
    /// The checks these arguments ask for.
    pub fn to_config(&self) -> anyhow::Result<DoctorConfig> {
        let mut config = match &self.agent_config {
            Some(file) => {
                let agent = AgentConfig::load(file)?;
                DoctorConfig::from_agent_config(&agent)?
            }
            None => {
                let Some(broker) = &self.broker else {
                    bail!("name the broker to check: --broker HOST (or --agent-config FILE)");
                };
                DoctorConfig::new(broker.clone())
            }
        };
        if let Some(broker) = &self.broker {
            config.broker_host.clone_from(broker);
        }
        if self.server_name.is_some() {
            config.server_name.clone_from(&self.server_name);
        }
        if let Some(ports) = &self.ports {
            match ports.as_slice() {
                [primary] => {
                    config.primary_port = *primary;
                    config.fallback_port = None;
                }
                [primary, fallback] => {
                    config.primary_port = *primary;
                    config.fallback_port = Some(*fallback);
                }
                _ => bail!("--ports takes one or two ports, for example 8883,443"),
            }
            if ports.contains(&0) {
                bail!("--ports: 0 is not a port; give ports from 1 to 65535");
            }
        }
        if let Some(proxy) = &self.proxy {
            // The error quotes the address without its password.
            let setting = proxy.parse::<ProxySetting>().context("--proxy")?;
            let found = match setting {
                ProxySetting::Url(url) => FoundProxy {
                    proxy: Some(url),
                    source: "--proxy".into(),
                },
                ProxySetting::System => {
                    beckon_agent::proxy::find(Some(&setting), &config.broker_host)
                }
            };
            config.proxy = found.proxy;
            config.proxy_source = Some(found.source);
        }
        if let Some(ca) = &self.ca {
            config = config.with_ca_file(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            config.tls.identity = Some(ClientIdentity::Files {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        if self.username.is_some() {
            config.username.clone_from(&self.username);
        }
        if self.token.is_some() {
            config.password.clone_from(&self.token);
        }
        if let Some(id) = &self.client_id {
            config.client_id = Some(id.clone());
            config.wake_topic = Some(beckon_identity::acl::wake_topic(id));
        }
        if self.echo_topic.is_some() {
            config.echo_topic.clone_from(&self.echo_topic);
        }
        if !(self.timeout.is_finite() && self.timeout > 0.0 && self.timeout <= 3600.0) {
            bail!("--timeout takes a number of seconds above 0 and at most 3600");
        }
        config.step_timeout = Duration::from_secs_f64(self.timeout);
        Ok(config)
    }
}

/// The token is left out.
impl std::fmt::Debug for DoctorArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoctorArgs")
            .field("broker", &self.broker)
            .field("ports", &self.ports)
            .field("proxy", &self.proxy)
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert)
            .field("username", &self.username)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("client_id", &self.client_id)
            .field("agent_config", &self.agent_config)
            .field("json", &self.json)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Runs `beckon doctor`: prints the report (a tree, or JSON with `--json`) and returns exit
/// status 0 when a path works, 1 when none does. Errors are bad arguments or an unreadable
/// agent configuration.
pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let config = args.to_config()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the doctor's async runtime")?;
    let report = runtime.block_on(crate::diagnose(&config));
    if args.json {
        let json =
            serde_json::to_string_pretty(&report).context("cannot write the report as JSON")?;
        println!("{json}");
    } else {
        print!("{}", report.to_human());
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
