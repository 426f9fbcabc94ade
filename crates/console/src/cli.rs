//! `beckon console`: command-line arguments and the blocking entry point.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{BrokerLink, Console, ConsoleConfig};

/// Arguments of `beckon console`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleArgs {
    /// Data folder: database, tenant CA, wake-up signing key, HTTPS certificate.
    #[arg(long, env = "BECKON_CONSOLE_DATA", default_value = "beckon-console")]
    pub data_dir: PathBuf,
    /// Listen address of the API and web UI.
    #[arg(long, env = "BECKON_CONSOLE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// HTTPS certificate (PEM); default: one issued by the console's CA.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// HTTPS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP (loopback addresses only).
    #[arg(long)]
    pub plain_http: bool,
    /// Names (DNS or IP) for the generated HTTPS certificate.
    #[arg(long = "server-name", default_values = ["localhost", "127.0.0.1"])]
    pub server_names: Vec<String>,
    /// The tenant this console manages.
    #[arg(long, env = "BECKON_TENANT", default_value = "default")]
    pub tenant: String,
    /// The console's broker connection: mqtts://host[:port], mqtt://host:port (plain,
    /// development only) or none.
    #[arg(long, env = "BECKON_CONSOLE_BROKER", default_value = "none")]
    pub broker: BrokerLink,
    /// CA file that signed the broker's certificate (default: the console's CA).
    #[arg(long)]
    pub broker_ca: Option<PathBuf>,
    /// Broker endpoints given to agents until the settings name some (host:port).
    #[arg(long = "agent-broker-endpoint", default_values = ["localhost:8883", "localhost:8443"])]
    pub agent_broker_endpoints: Vec<String>,
    /// The broker's tenant file for this tenant (`<broker tenants folder>/<tenant>.toml`),
    /// rewritten when an agent is removed so that the broker refuses it. Without it, copy
    /// `GET /api/v1/tenant-file` to the broker (see docs/console.md).
    #[arg(long, env = "BECKON_CONSOLE_TENANT_FILE", value_name = "FILE")]
    pub broker_tenant_file: Option<PathBuf>,
    /// Validity of the agent certificates the console issues, in seconds (agents renew
    /// when a third is left). Short values are for tests.
    #[arg(long, value_name = "SECS", default_value_t = 365 * 24 * 3600,
          value_parser = clap::value_parser!(u64).range(60..=10 * 365 * 24 * 3600))]
    pub agent_cert_validity_secs: u64,
}

impl ConsoleArgs {
    /// The configuration these arguments describe.
    pub fn to_config(&self) -> ConsoleConfig {
        let mut c = ConsoleConfig::new(self.data_dir.clone());
        c.listen = self.listen;
        c.tls_files = self.tls_cert.clone().zip(self.tls_key.clone());
        c.plain_http = self.plain_http;
        c.server_names = self.server_names.clone();
        c.tenant = self.tenant.clone();
        c.broker = match (&self.broker, &self.broker_ca) {
            (BrokerLink::Tls { host, port, .. }, Some(ca)) => BrokerLink::Tls {
                host: host.clone(),
                port: *port,
                ca_file: Some(ca.clone()),
            },
            (b, _) => b.clone(),
        };
        c.default_broker_endpoints = self.agent_broker_endpoints.clone();
        c.broker_tenant_file.clone_from(&self.broker_tenant_file);
        c.agent_certificate_validity =
            std::time::Duration::from_secs(self.agent_cert_validity_secs);
        c
    }
}

/// Runs the console until Ctrl-C or SIGTERM.
pub fn run(args: ConsoleArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let handle = Console::start(args.to_config()).await?;
        println!("Beckon console at {}", handle.url());
        if let Some(pw) = &handle.initial_admin_password {
            println!(
                "First start: user {:?}, password {pw} (shown once; change it after logging in)",
                handle.state.config.admin_user
            );
        }
        wait_for_stop().await?;
        handle.shutdown().await;
        Ok(())
    })
}

/// Returns on Ctrl-C, or on SIGTERM (Unix).
async fn wait_for_stop() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        console: ConsoleArgs,
    }

    #[test]
    fn arguments_become_the_configuration() {
        let cli = Cli::try_parse_from([
            "console",
            "--data-dir",
            "d",
            "--listen",
            "127.0.0.1:9090",
            "--broker",
            "mqtts://push.example:8884",
            "--broker-ca",
            "ca.pem",
            "--tenant",
            "acme",
            "--agent-broker-endpoint",
            "push.example:8884",
        ])
        .unwrap();
        let c = cli.console.to_config();
        assert_eq!(c.listen.port(), 9090);
        assert_eq!(c.tenant, "acme");
        assert!(!c.plain_http);
        assert_eq!(c.default_broker_endpoints, ["push.example:8884"]);
        assert_eq!(
            c.broker,
            BrokerLink::Tls {
                host: "push.example".into(),
                port: 8884,
                ca_file: Some("ca.pem".into()),
            }
        );
        let cli = Cli::try_parse_from(["console", "--broker", "mqtt://127.0.0.1:1883"]).unwrap();
        assert_eq!(
            cli.console.broker,
            BrokerLink::Anonymous {
                address: "127.0.0.1:1883".into()
            }
        );
        let err = Cli::try_parse_from(["console", "--broker", "http://x"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("mqtts://host"), "{err}");
        let err = Cli::try_parse_from(["console", "--tls-cert", "c.pem"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--tls-key"), "{err}");
    }
}
