//! `beckon up`: the embedded default. Console and broker in one process on one data folder,
//! on loopback, with nothing to configure.
//!
//! One CA serves the whole installation: the console's tenant CA (created by the console on
//! first start) signs the broker's server certificate and every client certificate, so an
//! agent trusts one file and the broker trusts the console's agents and the console itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use beckon_broker::{BrokerConfig, Listen, Server};
use beckon_console::{BrokerLink, Console, ConsoleConfig};
use beckon_pki::{CertificateAuthority, ServerCertificate};

mod demo;

/// Flags of `beckon up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Data folder: certificates, database, keys (created on first run, reused after).
    #[arg(long, value_name = "DIR", default_value = "beckon-data")]
    data: PathBuf,
    /// MQTT over TLS listener (loopback by default).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8883")]
    mqtts: SocketAddr,
    /// The 443 fallback: one TLS port for MQTT (ALPN mqtt), MQTT over WebSocket and health
    /// ("off" to disable).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8443", value_parser = parse_listen)]
    fallback: Listen,
    /// Console (web UI and API) listener, plain HTTP on loopback.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    console: SocketAddr,
    /// The broker's admin listener (Prometheus /metrics and /healthz, plain HTTP: keep it on
    /// loopback), e.g. 127.0.0.1:9883; off unless given. The console's metrics are at
    /// <console>/metrics with an API token.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Also run N demo agents in this process (enrolled once through the console's API,
    /// kept in <data>/demo-agents and reused), so that wake-ups can be tried at once.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=i64::from(demo::MAX_DEMO_AGENTS)))]
    demo_agents: u16,
    /// Single sign-on for the console (the same flags as `beckon console`).
    #[command(flatten)]
    oidc: beckon_console::OidcArgs,
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    Listen::parse(s)
}

/// Server certificate lifetime; issued again at start when 30 days or less are left.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(825 * 24 * 3600);

/// Runs console and broker until SIGTERM or SIGINT.
pub fn main(args: UpArgs) -> anyhow::Result<()> {
    if !args.console.ip().is_loopback()
        || !args.mqtts.ip().is_loopback()
        || args.fallback.0.is_some_and(|a| !a.ip().is_loopback())
    {
        anyhow::bail!(
            "beckon up listens on loopback only (it serves the console over plain HTTP); \
             run `beckon broker` and `beckon console` for a deployment"
        );
    }
    let console_dir = args.data.join("console");
    let broker_dir = args.data.join("broker");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let mut signals = crate::broker::ShutdownSignals::register()?;

        let mut console_config = ConsoleConfig::new(&console_dir);
        console_config.listen = args.console;
        console_config.plain_http = true;
        // The address it prints: what enrollment and the Enrollment page hand to agents
        // (on this machine: `beckon up` listens on loopback only).
        console_config.public_url =
            (args.console.port() != 0).then(|| format!("http://{}", args.console));
        console_config.oidc = args.oidc.to_config()?;
        console_config.broker = BrokerLink::Tls {
            host: "localhost".into(),
            port: args.mqtts.port(),
            ca_file: None,
        };
        console_config.default_broker_endpoints = std::iter::once(args.mqtts)
            .chain(args.fallback.0)
            .map(|a| format!("localhost:{}", a.port()))
            .collect();
        // The console keeps the broker's tenant file (CA, token key, removed agents).
        let tenants_dir = broker_dir.join("tenants");
        console_config.broker_tenant_file =
            Some(tenants_dir.join(format!("{}.toml", console_config.tenant)));
        // The broker needs the console's CA and tenant file, so it starts second; the
        // console connects to it once it listens (no failed first attempt to warn about).
        console_config.broker_starts_later = true;
        // Its status warns when the broker's certificate nears its end (this process renews
        // it at its next start).
        console_config.broker_certificate = Some(broker_dir.join("server.pem"));
        let console = Console::start(console_config)
            .await
            .with_context(|| format!("starting the console in {}", console_dir.display()))?;

        let (cert, key, ca_file) =
            ensure_broker_certificate(&console_dir, &broker_dir, SERVER_CERT_VALIDITY)?;
        let mut broker_config = BrokerConfig::default();
        broker_config.data_dir.clone_from(&broker_dir);
        broker_config.tenants_dir = Some(tenants_dir);
        broker_config.listeners.mqtts = Listen(Some(args.mqtts));
        broker_config.listeners.fallback = args.fallback;
        broker_config.listeners.admin = Listen(args.admin);
        broker_config.tls.cert = Some(cert);
        broker_config.tls.key = Some(key);
        broker_config.tls.client_ca = Some(ca_file.clone());
        broker_config.validate()?;
        let (bound, mut broker) = Server::bind(broker_config)
            .await
            .context("starting the broker")?;
        console.broker_ready();

        let (stop_agents, agents_stop) = tokio::sync::watch::channel(false);
        let demo = if args.demo_agents > 0 {
            Some(
                demo::start(
                    &console,
                    &args.data,
                    args.demo_agents,
                    demo::BrokerPorts {
                        mqtts: bound.mqtts.map_or_else(|| args.mqtts.port(), |a| a.port()),
                        fallback: bound.fallback.map(|a| a.port()),
                    },
                    agents_stop,
                )
                    .await
                    .context("starting the demo agents")?,
            )
        } else {
            None
        };

        println!("Beckon is up (data in {})", args.data.display());
        println!("  console:  {}", console.url());
        if let Some(password) = &console.initial_admin_password {
            println!("  login:    user admin, password {password}  (shown only this once)");
        }
        if let Some(addr) = bound.mqtts {
            println!("  broker:   MQTT over TLS on {addr}");
        }
        if let Some(addr) = bound.fallback {
            println!("  fallback: {addr} (MQTT over TLS with ALPN mqtt, WebSocket /mqtt)");
        }
        if let Some(addr) = bound.admin {
            println!(
                "  metrics:  http://{addr}/metrics (broker), {}/metrics with an API token (console)",
                console.url()
            );
        }
        println!("  CA:       {} (what agents trust)", ca_file.display());
        match &demo {
            Some(d) => println!(
                "  demo:     {} demo agents running ({} enrolled now, the rest reused), in {}; each checks in when woken",
                d.running,
                d.enrolled_now,
                d.dir.display()
            ),
            None => println!(
                "  agents:   create an enrollment token in the console, then on each machine:\n            beckon agent enroll --console {} --token bke_...",
                console.url()
            ),
        }
        println!("beckon up: ready");

        let result = tokio::select! {
            signal = signals.recv() => {
                tracing::info!(signal, "shutting down");
                Ok(())
            }
            e = broker.stopped() => Err(anyhow::Error::from(e)),
        };
        // Agents first, so that they say goodbye to a broker that is still there.
        let _ = stop_agents.send(true);
        if let Some(d) = demo {
            d.stopped(Duration::from_secs(5)).await;
        }
        broker.shutdown().await.ok();
        console.shutdown().await;
        result
    })
}

/// The broker's server certificate, issued by the console's CA on first run and reused
/// after, issued again when it ends within 30 days (a log line says so). Returns
/// (certificate, key, CA file).
fn ensure_broker_certificate(
    console_dir: &Path,
    broker_dir: &Path,
    validity: Duration,
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let ca_cert = console_dir.join("tenant-ca.pem");
    let ca_key = console_dir.join("tenant-ca.key");
    std::fs::create_dir_all(broker_dir)
        .with_context(|| format!("creating {}", broker_dir.display()))?;
    let server = ServerCertificate {
        cert: broker_dir.join("server.pem"),
        key: broker_dir.join("server.key"),
        names: ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec(),
        validity,
    };
    let ca = CertificateAuthority::load(&ca_cert, &ca_key)
        .with_context(|| format!("loading the console's CA {}", ca_cert.display()))?;
    if let Some(reason) = server
        .ensure(&ca)
        .with_context(|| format!("writing {}", server.cert.display()))?
    {
        tracing::info!(file = %server.cert.display(), "issued the broker's certificate: {reason}");
    }
    Ok((server.cert, server.key, ca_cert))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// First run issues; a later run keeps a certificate with time left, and issues again one
    /// that ends within 30 days.
    #[test]
    fn the_broker_certificate_renews_near_its_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("console");
        let broker = dir.path().join("broker");
        std::fs::create_dir_all(&console).unwrap();
        CertificateAuthority::generate("test", Duration::from_secs(3600 * 24 * 900))
            .unwrap()
            .save(
                &console.join("tenant-ca.pem"),
                &console.join("tenant-ca.key"),
            )
            .unwrap();
        let (cert, _, _) =
            ensure_broker_certificate(&console, &broker, SERVER_CERT_VALIDITY).unwrap();
        let first = std::fs::read(&cert).unwrap();
        ensure_broker_certificate(&console, &broker, SERVER_CERT_VALIDITY).unwrap();
        assert_eq!(std::fs::read(&cert).unwrap(), first, "kept");
        // Ten days is within the renewal window: the next start issues it again.
        std::fs::remove_file(&cert).unwrap();
        let ten_days = Duration::from_secs(10 * 24 * 3600);
        ensure_broker_certificate(&console, &broker, ten_days).unwrap();
        let short = std::fs::read(&cert).unwrap();
        ensure_broker_certificate(&console, &broker, SERVER_CERT_VALIDITY).unwrap();
        let renewed = std::fs::read(&cert).unwrap();
        assert_ne!(renewed, short, "renewed near its end");
        let leaf = &beckon_pki::load_certificates(&cert).unwrap()[0];
        assert!(!beckon_pki::ends_soon(leaf).unwrap());
    }
}
