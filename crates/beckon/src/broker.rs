//! `beckon broker`.

use std::path::PathBuf;

use anyhow::Context;
use beckon_broker::{BrokerConfig, Listen, Server};

/// Flags of `beckon broker`. They override the configuration file and `BECKON_...`
/// environment variables (precedence: defaults < file < environment < flags).
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// TOML configuration file (every key has a default; see docs/configuration.md).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Plain MQTT listener address, e.g. 127.0.0.1:1883 ("off" to disable; off by default).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    mqtt: Option<Listen>,
    /// MQTT over TLS listener address (default 0.0.0.0:8883; "off" to disable).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    mqtts: Option<Listen>,
    /// The HTTPS port shared by MQTT (ALPN mqtt), MQTT over WebSocket (/mqtt) and health
    /// endpoints, e.g. 0.0.0.0:443 or 127.0.0.1:8443 (off by default).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    fallback: Option<Listen>,
    /// Admin HTTP listener for Prometheus /metrics and /healthz, e.g. 127.0.0.1:9883 (off by
    /// default).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    admin: Option<Listen>,
    /// Server certificate chain (PEM). Without it the broker uses its own CA and certificate
    /// in the data folder, creating them on first run.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key of --cert (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Folder of tenant files (`<tenant>.toml`): clients then authenticate as tenant
    /// identities by client certificate or token. Reloaded on change.
    #[arg(long, value_name = "DIR")]
    tenants_dir: Option<PathBuf>,
    /// Accept clients without authentication. Development and tests only: logged loudly.
    #[arg(long)]
    allow_anonymous: bool,
    /// Data folder: generated CA and certificates (default ./beckon-data).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    Listen::parse(s)
}

/// Defaults, then the file, then the environment, then the flags.
fn build_config(args: &BrokerArgs) -> anyhow::Result<BrokerConfig> {
    let mut config = match &args.config {
        Some(path) => BrokerConfig::from_file(path)?,
        None => BrokerConfig::default(),
    };
    config.apply_env(|k| std::env::var(k).ok())?;
    if let Some(dir) = &args.data {
        config.data_dir.clone_from(dir);
    }
    if let Some(l) = args.mqtt {
        config.listeners.mqtt = l;
    }
    if let Some(l) = args.mqtts {
        config.listeners.mqtts = l;
    }
    if let Some(l) = args.fallback {
        config.listeners.fallback = l;
    }
    if let Some(l) = args.admin {
        config.listeners.admin = l;
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        config.tls.cert = Some(cert.clone());
        config.tls.key = Some(key.clone());
    }
    if let Some(dir) = &args.tenants_dir {
        config.tenants_dir = Some(dir.clone());
    }
    if args.allow_anonymous {
        config.allow_anonymous = true;
    }
    config.validate()?;
    Ok(config)
}

/// SIGTERM and SIGINT, registered before the broker reports ready so that a signal sent
/// right after start is a graceful shutdown too (not the default kill). On Windows: Ctrl-C
/// and the console closing.
pub(crate) struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(windows)]
    int: tokio::signal::windows::CtrlC,
    #[cfg(windows)]
    close: tokio::signal::windows::CtrlClose,
}

impl ShutdownSignals {
    #[cfg(unix)]
    pub(crate) fn register() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    #[cfg(unix)]
    pub(crate) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }

    #[cfg(windows)]
    pub(crate) fn register() -> anyhow::Result<Self> {
        use tokio::signal::windows::{ctrl_c, ctrl_close};
        Ok(Self {
            int: ctrl_c().context("listening for Ctrl-C")?,
            close: ctrl_close().context("listening for the console closing")?,
        })
    }

    #[cfg(windows)]
    pub(crate) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "Ctrl-C",
            _ = self.close.recv() => "console closed",
        }
    }
}

/// Runs the broker until SIGTERM or SIGINT, then drains gracefully and returns.
pub fn main(args: BrokerArgs) -> anyhow::Result<()> {
    let config = build_config(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut signals = ShutdownSignals::register()?;
        let (bound, mut handle) = Server::bind(config).await?;
        if let Some(l) = bound.fd_limit {
            println!(
                "beckon broker: file descriptor limit {} (hard {}): room for about {} connections; max_connections = {}",
                l.soft,
                l.hard,
                l.connection_room(),
                bound.max_connections
            );
        }
        if let Some(addr) = bound.mqtts {
            println!("beckon broker: MQTT over TLS on {addr}");
        }
        if let Some(addr) = bound.fallback {
            println!("beckon broker: shared HTTPS port (MQTT, WebSocket /mqtt, /healthz) on {addr}");
        }
        if let Some(addr) = bound.admin {
            println!("beckon broker: metrics on http://{addr}/metrics");
        }
        if let Some(addr) = bound.mqtt {
            println!("beckon broker: plain MQTT on {addr}");
        }
        if let Some(ca) = &bound.generated_ca {
            println!(
                "beckon broker: clients must trust the CA certificate {}",
                ca.display()
            );
        }
        if let Some(node) = &bound.cluster_node {
            println!("beckon broker: cluster node {node}");
        }
        println!("beckon broker: ready");
        tokio::select! {
            signal = signals.recv() => {
                tracing::info!(signal, "shutting down: disconnecting clients");
                handle.shutdown().await?;
                tracing::info!("shut down");
                Ok(())
            }
            e = handle.stopped() => Err(e.into()),
        }
    })
}
