//! `beckon console`: command-line arguments and the blocking entry point.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use beckon_pki::{CertificateAuthority, ServerCertificate};

use crate::store::{CopyReport, DatabaseUrl, copy_store};
use crate::{BrokerLink, Console, ConsoleConfig, ConsoleError};

/// `beckon console`: run the console, or one of its subcommands (which take none of the
/// console's own flags).
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ConsoleCommandLine {
    /// A subcommand instead of running the console.
    #[command(subcommand)]
    pub command: Option<ConsoleCommand>,
    /// The console's flags.
    #[command(flatten)]
    pub run: ConsoleArgs,
}

/// Subcommands of `beckon console`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ConsoleCommand {
    /// Issue the broker's server certificate from the console's tenant CA (the CA enrolled
    /// agents trust): writes broker.pem and broker.key for `beckon broker --cert --key`.
    IssueBrokerCert(IssueBrokerCertArgs),
    /// Copy the whole store (agents, certificates, calls, users, sessions, tokens, settings,
    /// audit log, Wake-on-LAN sends) into another, empty database, e.g. from SQLite to
    /// PostgreSQL. Stop the console first; then start it with `--database` set to the target.
    MigrateStore(MigrateStoreArgs),
}

/// Arguments of `beckon console migrate-store`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateStoreArgs {
    /// The database to copy from: sqlite:PATH (the console's default is
    /// sqlite:<data folder>/console.db) or postgres://user:password@host:port/database.
    #[arg(long, value_name = "URL")]
    pub from: DatabaseUrl,
    /// The database to copy into (it must hold no rows; its schema is created).
    #[arg(long, value_name = "URL")]
    pub to: DatabaseUrl,
}

/// Copies the store named by `args.from` into `args.to`; returns the rows copied per table.
pub fn migrate_store(args: &MigrateStoreArgs) -> Result<CopyReport, ConsoleError> {
    if args.from == args.to {
        return Err(ConsoleError::Config(format!(
            "--from and --to both name {}: give the new database as --to",
            args.to
        )));
    }
    if let DatabaseUrl::Sqlite(path) = &args.from
        && !path.exists()
    {
        return Err(ConsoleError::Config(format!(
            "there is no database file {}: give the console's database (sqlite:<data folder>/console.db)",
            path.display()
        )));
    }
    let from = args.from.open()?;
    let to = args.to.open()?;
    Ok(copy_store(&from, &to)?)
}

/// Arguments of `beckon console issue-broker-cert`.
#[derive(Debug, Clone, clap::Args)]
pub struct IssueBrokerCertArgs {
    /// The console's data folder (it holds the tenant CA; start the console once first).
    #[arg(long, env = "BECKON_CONSOLE_DATA", default_value = "beckon-console")]
    pub data_dir: PathBuf,
    /// A DNS name or IP address agents use to reach the broker (repeat for more; the first
    /// is the certificate's common name).
    #[arg(long = "name", value_name = "HOST", required = true)]
    pub names: Vec<String>,
    /// Folder to write broker.pem and broker.key (0600) into; created when missing.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Validity in days.
    #[arg(long, value_name = "DAYS", default_value_t = 825,
          value_parser = clap::value_parser!(u64).range(1..=3650))]
    pub days: u64,
}

/// The copy of the last broker certificate `issue-broker-cert` wrote, kept in the console's
/// data folder so that the console's status warns 30 days before it ends.
pub const ISSUED_BROKER_CERT: &str = "issued-broker.pem";

/// Issues the broker's certificate from the tenant CA in `args.data_dir` into
/// `args.out` (`broker.pem`, `broker.key`), and keeps a copy of the certificate in the data
/// folder ([`ISSUED_BROKER_CERT`]). Returns the certificate's and the key's paths.
pub fn issue_broker_certificate(
    args: &IssueBrokerCertArgs,
) -> Result<(PathBuf, PathBuf), ConsoleError> {
    let (ca_cert, ca_key) = crate::tenant_ca_files(&args.data_dir);
    if !ca_cert.exists() {
        return Err(ConsoleError::Config(format!(
            "no tenant CA in {} ({} is missing): give the console's --data-dir, or start the console once first",
            args.data_dir.display(),
            ca_cert.display()
        )));
    }
    let ca = CertificateAuthority::load(&ca_cert, &ca_key)?;
    crate::create_private_dir(&args.out)?;
    let server = ServerCertificate {
        cert: args.out.join("broker.pem"),
        key: args.out.join("broker.key"),
        names: args.names.clone(),
        validity: Duration::from_secs(args.days * 24 * 3600),
    };
    server.issue(&ca)?;
    let pem = std::fs::read(&server.cert).map_err(|source| ConsoleError::Io {
        context: "cannot read",
        path: server.cert.clone(),
        source,
    })?;
    beckon_pki::write_atomic(&args.data_dir.join(ISSUED_BROKER_CERT), &pem, 0o644)?;
    Ok((server.cert, server.key))
}

/// Runs `beckon console` or its subcommand.
pub fn main(cli: ConsoleCommandLine) -> anyhow::Result<()> {
    match cli.command {
        None => run(cli.run),
        Some(ConsoleCommand::MigrateStore(args)) => {
            let report = migrate_store(&args)?;
            println!("Copied {} into {}:", args.from, args.to);
            for (table, rows) in report {
                println!("  {table}: {rows} rows");
            }
            println!("Start the console with --database {} to use it.", args.to);
            Ok(())
        }
        Some(ConsoleCommand::IssueBrokerCert(args)) => {
            let (cert, key) = issue_broker_certificate(&args)?;
            println!("Broker certificate for {}:", args.names.join(", "));
            println!("  {}", cert.display());
            println!("  {} (private key, mode 0600)", key.display());
            println!(
                "Copy both to the broker host; run `beckon broker --cert {} --key {} --tenants-dir ...`.",
                cert.file_name().unwrap_or_default().to_string_lossy(),
                key.file_name().unwrap_or_default().to_string_lossy()
            );
            Ok(())
        }
    }
}

/// Arguments of `beckon console`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleArgs {
    /// Data folder: database, tenant CA, wake-up signing key, HTTPS certificate.
    #[arg(long, env = "BECKON_CONSOLE_DATA", default_value = "beckon-console")]
    pub data_dir: PathBuf,
    /// The store: sqlite:PATH (default: console.db in the data folder) or
    /// postgres://user:password@host:port/database (see docs/console.md).
    #[arg(long, env = "BECKON_CONSOLE_DATABASE", value_name = "URL")]
    pub database: Option<DatabaseUrl>,
    /// This console's id: its client id at the broker and the name under which it sends
    /// calls. Consoles sharing one database (--database postgres://...) each need their own;
    /// keep it across restarts (see docs/console.md, "Several consoles").
    #[arg(long, env = "BECKON_CONSOLE_ID", value_name = "ID", default_value = crate::store::DEFAULT_CONSOLE_ID)]
    pub console_id: String,
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
    /// Names (DNS or IP) for the generated HTTPS certificate (issued again at start when they
    /// change, and when it ends within 30 days).
    #[arg(long = "server-name", default_values = ["localhost", "127.0.0.1"])]
    pub server_names: Vec<String>,
    /// The console's URL as agents reach it, e.g. https://console.example.com:8080: the
    /// check-in URL enrollment hands out and the command the Enrollment page shows.
    /// Default: the scheme and Host header of each enrollment request.
    #[arg(long, env = "BECKON_CONSOLE_PUBLIC_URL", value_name = "URL", value_parser = parse_public_url)]
    pub public_url: Option<String>,
    /// Seconds a client has to send a request's line and headers (also the longest wait
    /// for the next request on a kept-alive connection).
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub http_header_timeout_secs: u64,
    /// Seconds a kept-alive connection may stay without a request before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub http_idle_timeout_secs: u64,
    /// HTTP connections served at once; beyond, new ones wait (each takes a file
    /// descriptor: keep it below the process's limit).
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
    pub http_max_connections: u32,
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
    /// Enrolling agents trust the system's CA store for the broker as well as this console's
    /// CA: for brokers with a certificate from a public CA.
    #[arg(long)]
    pub agent_broker_system_roots: bool,
    /// The broker's tenant file for this tenant (`<broker tenants folder>/<tenant>.toml`),
    /// rewritten when an agent is removed so that the broker refuses it. Without it, copy
    /// `GET /api/v1/tenant-file` to the broker (see docs/console.md).
    #[arg(long, env = "BECKON_CONSOLE_TENANT_FILE", value_name = "FILE")]
    pub broker_tenant_file: Option<PathBuf>,
    /// Leave removed agents' credentials out of --broker-tenant-file: the broker follows the
    /// console's revocation feed instead (`[[revocation_feed]]`, see docs/tenants.md), which
    /// has no size limit.
    #[arg(long, env = "BECKON_CONSOLE_TENANT_FILE_WITHOUT_REVOCATIONS")]
    pub tenant_file_without_revocations: bool,
    /// Validity of the agent certificates the console issues, in seconds (agents renew
    /// when a third is left). Short values are for tests.
    #[arg(long, value_name = "SECS", default_value_t = 365 * 24 * 3600,
          value_parser = clap::value_parser!(u64).range(60..=10 * 365 * 24 * 3600))]
    pub agent_cert_validity_secs: u64,
    /// Single sign-on.
    #[command(flatten)]
    pub oidc: OidcArgs,
}

/// Single sign-on with OpenID Connect, beside local users (docs/console.md). Needs
/// `--public-url`: register `<public-url>/api/v1/oidc/callback` as the redirect URI.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OidcArgs {
    /// The OpenID provider's issuer URL (its discovery document is
    /// <issuer>/.well-known/openid-configuration); turns single sign-on on.
    #[arg(
        long = "oidc-issuer",
        env = "BECKON_OIDC_ISSUER",
        value_name = "URL",
        requires = "client_id"
    )]
    pub issuer: Option<String>,
    /// The console's client id at the provider.
    #[arg(
        long = "oidc-client-id",
        env = "BECKON_OIDC_CLIENT_ID",
        value_name = "ID"
    )]
    pub client_id: Option<String>,
    /// File holding the client secret (first line; keep it 0600).
    #[arg(
        long = "oidc-client-secret-file",
        env = "BECKON_OIDC_CLIENT_SECRET_FILE",
        value_name = "FILE",
        conflicts_with = "client_secret"
    )]
    pub client_secret_file: Option<PathBuf>,
    /// The client secret itself, from the environment only (a flag would show in `ps`).
    #[arg(long = "oidc-client-secret", env = "BECKON_OIDC_CLIENT_SECRET", hide = true,
          hide_env_values = true, value_parser = parse_secret)]
    pub client_secret: Option<crate::oidc::ClientSecret>,
    /// Name on the login page's button, "Sign in with NAME" (default: the issuer's host).
    #[arg(
        long = "oidc-provider-name",
        env = "BECKON_OIDC_PROVIDER_NAME",
        value_name = "NAME"
    )]
    pub provider_name: Option<String>,
    /// The ID token claim that holds the user's groups or roles (a list or a
    /// space-separated string).
    #[arg(
        long = "oidc-roles-claim",
        env = "BECKON_OIDC_ROLES_CLAIM",
        value_name = "CLAIM",
        default_value = "groups"
    )]
    pub roles_claim: String,
    /// Maps a value of the roles claim to viewer, operator or admin (repeat; comma-separated
    /// in the environment). A user gets the highest mapped role; without one, no login.
    #[arg(long = "oidc-role", env = "BECKON_OIDC_ROLES", value_name = "VALUE=ROLE",
          value_delimiter = ',', value_parser = crate::oidc::parse_role_mapping)]
    pub roles: Vec<(String, crate::model::Role)>,
    /// Scopes asked for (repeat; comma-separated in the environment); `openid` is always
    /// asked. Some providers put groups in the token only for a scope such as `groups`.
    #[arg(long = "oidc-scope", env = "BECKON_OIDC_SCOPES", value_name = "SCOPE",
          value_delimiter = ',', default_values = ["openid", "profile", "email"])]
    pub scopes: Vec<String>,
    /// CA file that signed the provider's HTTPS certificate (default: the system store).
    #[arg(
        long = "oidc-ca-file",
        env = "BECKON_OIDC_CA_FILE",
        value_name = "FILE"
    )]
    pub ca_file: Option<PathBuf>,
}

fn parse_secret(text: &str) -> Result<crate::oidc::ClientSecret, String> {
    Ok(crate::oidc::ClientSecret(text.trim().to_owned()))
}

impl OidcArgs {
    /// The single sign-on settings, `None` without `--oidc-issuer`; reads the secret file.
    pub fn to_config(&self) -> Result<Option<crate::oidc::OidcConfig>, ConsoleError> {
        let Some(issuer) = &self.issuer else {
            return Ok(None);
        };
        let client_secret = match (&self.client_secret_file, &self.client_secret) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConsoleError::Io {
                    context: "cannot read the OpenID client secret file",
                    path: path.clone(),
                    source,
                })?;
                crate::oidc::ClientSecret(text.lines().next().unwrap_or("").trim().to_owned())
            }
            (None, Some(secret)) => secret.clone(),
            (None, None) => crate::oidc::ClientSecret(String::new()),
        };
        let provider_name = self.provider_name.clone().unwrap_or_else(|| {
            beckon_net::http::Url::parse(issuer).map_or_else(|_| issuer.clone(), |u| u.host)
        });
        Ok(Some(crate::oidc::OidcConfig {
            issuer: issuer.clone(),
            client_id: self.client_id.clone().unwrap_or_default(),
            client_secret,
            provider_name,
            roles_claim: self.roles_claim.clone(),
            role_map: self.roles.clone(),
            scopes: self.scopes.clone(),
            ca_file: self.ca_file.clone(),
        }))
    }
}

impl ConsoleArgs {
    /// The configuration these arguments describe (reads the OpenID client secret file).
    pub fn to_config(&self) -> Result<ConsoleConfig, ConsoleError> {
        let mut c = ConsoleConfig::new(self.data_dir.clone());
        c.database.clone_from(&self.database);
        c.console_id.clone_from(&self.console_id);
        c.listen = self.listen;
        c.tls_files = self.tls_cert.clone().zip(self.tls_key.clone());
        c.plain_http = self.plain_http;
        c.server_names = self.server_names.clone();
        c.public_url.clone_from(&self.public_url);
        c.http = crate::HttpLimits {
            header_timeout: Duration::from_secs(self.http_header_timeout_secs),
            idle_timeout: Duration::from_secs(self.http_idle_timeout_secs),
            max_connections: self.http_max_connections as usize,
        };
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
        c.agent_broker_system_roots = self.agent_broker_system_roots;
        c.broker_tenant_file.clone_from(&self.broker_tenant_file);
        c.tenant_file_revocations = !self.tenant_file_without_revocations;
        c.agent_certificate_validity = Duration::from_secs(self.agent_cert_validity_secs);
        c.oidc = self.oidc.to_config()?;
        Ok(c)
    }
}

/// A `--public-url`: `http(s)://host[:port]` with no path, query or credentials; returned
/// without a trailing slash.
fn parse_public_url(text: &str) -> Result<String, String> {
    let url = text.trim_end_matches('/');
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("the public URL starts with https:// (or http://), e.g. https://console.example.com:8080")?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) || rest.contains(char::is_whitespace)
    {
        return Err(format!(
            "{text:?} is not a console URL: give scheme, host and port only, e.g. https://console.example.com:8080"
        ));
    }
    Ok(url.to_owned())
}

/// Runs the console until Ctrl-C or SIGTERM.
pub fn run(args: ConsoleArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let handle = Console::start(args.to_config()?).await?;
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

    #[derive(Parser)]
    struct Beckon {
        #[command(subcommand)]
        command: Top,
    }

    #[derive(clap::Subcommand)]
    enum Top {
        Console(ConsoleCommandLine),
    }

    fn console(args: &[&str]) -> Result<ConsoleCommandLine, clap::Error> {
        let Top::Console(c) =
            Beckon::try_parse_from(["beckon", "console"].iter().chain(args))?.command;
        Ok(c)
    }

    /// `beckon console` runs with its flags; `issue-broker-cert` takes its own, and writes a
    /// certificate from the tenant CA for the given names (refused without a tenant CA).
    #[test]
    fn issue_broker_cert_writes_a_certificate_from_the_tenant_ca() {
        let run = console(&["--listen", "127.0.0.1:9999"]).unwrap();
        assert!(run.command.is_none());
        assert_eq!(run.run.listen.port(), 9999);
        assert!(
            console(&["issue-broker-cert", "--out", "o"]).is_err(),
            "--name is required"
        );
        assert!(
            console(&[
                "--listen",
                "127.0.0.1:1",
                "issue-broker-cert",
                "--name",
                "a",
                "--out",
                "o"
            ])
            .is_err(),
            "console flags do not mix with the subcommand"
        );

        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("console");
        let out = dir.path().join("out");
        let (data_s, out_s) = (data.display().to_string(), out.display().to_string());
        let cli = console(&[
            "issue-broker-cert",
            "--data-dir",
            &data_s,
            "--name",
            "push.example.com",
            "--name",
            "192.0.2.1",
            "--out",
            &out_s,
        ])
        .unwrap();
        let Some(ConsoleCommand::IssueBrokerCert(args)) = cli.command else {
            panic!("not the subcommand")
        };
        assert_eq!(args.days, 825);
        let err = issue_broker_certificate(&args).unwrap_err().to_string();
        assert!(
            err.contains("tenant-ca.pem") && err.contains("start the console"),
            "{err}"
        );

        std::fs::create_dir_all(&data).unwrap();
        let ca = crate::load_or_create_ca(&data).unwrap();
        let (cert, key) = issue_broker_certificate(&args).unwrap();
        assert_eq!(cert, out.join("broker.pem"));
        let leaf = beckon_pki::load_certificates(&cert).unwrap().remove(0);
        let id = beckon_pki::certificate_identity(&leaf).unwrap();
        assert_eq!(id.common_name.as_deref(), Some("push.example.com"));
        beckon_pki::load_private_key(&key).unwrap();
        // Signed by the tenant CA: a client trusting only that CA accepts it for its names.
        let roots = beckon_pki::load_certificates(&data.join("tenant-ca.pem")).unwrap();
        let mut store = rustls::RootCertStore::empty();
        store.add(roots[0].clone()).unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let verifier = rustls::client::WebPkiServerVerifier::builder(store.into())
            .build()
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("push.example.com").unwrap();
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .expect("the tenant CA verifies the broker certificate");
        drop(ca);
        // The console keeps a copy, to warn before it ends.
        assert_eq!(
            std::fs::read(data.join(ISSUED_BROKER_CERT)).unwrap(),
            std::fs::read(&cert).unwrap()
        );
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
        let c = cli.console.to_config().unwrap();
        assert_eq!(c.database(), DatabaseUrl::Sqlite("d/console.db".into()));
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
        assert_eq!(c.public_url, None);
        assert_eq!(c.http, crate::HttpLimits::default());
        let cli = Cli::try_parse_from([
            "console",
            "--public-url",
            "https://console.example.com:8080/",
            "--http-header-timeout-secs",
            "3",
        ])
        .unwrap();
        let c = cli.console.to_config().unwrap();
        assert_eq!(
            c.public_url.as_deref(),
            Some("https://console.example.com:8080")
        );
        assert_eq!(c.http.header_timeout, Duration::from_secs(3));
        for bad in [
            "console.example.com",
            "https://",
            "https://h/path",
            "ftp://h",
        ] {
            let err = Cli::try_parse_from(["console", "--public-url", bad])
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains("https://console.example.com:8080"),
                "{bad}: {err}"
            );
        }
        let cli = Cli::try_parse_from([
            "console",
            "--database",
            "postgres://beckon:pw@db.example:5432/beckon",
        ])
        .unwrap();
        assert_eq!(
            cli.console.to_config().unwrap().database(),
            DatabaseUrl::Postgres("postgres://beckon:pw@db.example:5432/beckon".into())
        );
        let err = Cli::try_parse_from(["console", "--database", "db.sqlite"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("sqlite:PATH"), "{err}");
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
