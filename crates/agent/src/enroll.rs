//! `beckon agent enroll`: the agent makes its key pair locally (ECDSA P-256; the private key
//! never leaves the machine), sends a certificate signing request with its inventory and a
//! one-time enrollment token to the console (`POST /api/v1/enroll`), and stores what comes
//! back in its state folder:
//!
//! | file | what | mode |
//! |---|---|---|
//! | `agent.key` | the private key (PKCS#8 PEM) | 0600 |
//! | `agent.pem` | the certificate the console's CA signed | 0644 |
//! | `ca.pem` | the console's CA (trust for the broker) | 0644 |
//! | `checkin.token` | the secret for check-ins with the console | 0600 |
//! | `console-ca.pem` | the CA given with `--ca` for an HTTPS console | 0644 |
//! | `enrollment.json` | broker endpoints, proxy policy, wake-up key, console URL | 0644 |
//!
//! and writes a ready-to-run agent configuration (`beckon agent run --config FILE`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use beckon_net::{ClientIdentity, TlsClient, TlsSettings, TrustAnchors};
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::http::{self, Scheme, Url};
use crate::inventory::Inventory;

/// What to enroll with and where to put the result.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// The console's base URL, `http(s)://host[:port]`.
    pub console_url: String,
    /// The enrollment token (`bke_...`).
    pub token: String,
    /// The agent's state folder; the key, certificates and token go here.
    pub state_dir: PathBuf,
    /// Where the agent configuration is written.
    pub config_out: PathBuf,
    /// Display name in the console (default: the host name).
    pub name: Option<String>,
    /// The agent id to ask for (default: the console makes one).
    pub agent_id: Option<String>,
    /// PEM CA file for an HTTPS console with a private CA (default: the system store).
    pub console_ca: Option<PathBuf>,
    /// The inventory to report (default: read from this machine).
    pub inventory: Option<Inventory>,
    /// TOML appended to the generated configuration (embedders tune it this way).
    pub extra_config: String,
    /// Replace an existing enrollment in `state_dir`.
    pub force: bool,
    /// Limit for the whole exchange with the console.
    pub timeout: Duration,
}

impl EnrollOptions {
    /// Options with the defaults: no name, no requested id, system trust, gathered
    /// inventory, 30 s limit.
    pub fn new(
        console_url: impl Into<String>,
        token: impl Into<String>,
        state_dir: impl Into<PathBuf>,
        config_out: impl Into<PathBuf>,
    ) -> Self {
        Self {
            console_url: console_url.into(),
            token: token.into(),
            state_dir: state_dir.into(),
            config_out: config_out.into(),
            name: None,
            agent_id: None,
            console_ca: None,
            inventory: None,
            extra_config: String::new(),
            force: false,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The result of a successful enrollment.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The agent id the console recorded.
    pub agent_id: String,
    /// The tenant.
    pub tenant: String,
    /// The configuration file written.
    pub config_file: PathBuf,
    /// That configuration, parsed.
    pub config: AgentConfig,
}

/// Why enrollment failed; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The console URL cannot be used.
    #[error("--console: {0}")]
    BadUrl(String),
    /// The token does not look like an enrollment token.
    #[error(
        "the enrollment token must start with bke_: create one in the console (Enrollment tokens) and pass it with --token"
    )]
    BadToken,
    /// The state folder already holds an enrollment.
    #[error(
        "{} already holds an enrolled agent (agent.pem): this machine is enrolled; pass --force to enroll again (the old agent stays in the console until you delete it), or choose another --state-dir",
        .0.display()
    )]
    AlreadyEnrolled(PathBuf),
    /// The TLS client for an HTTPS console could not be set up (for example an unreadable
    /// `--ca` file).
    #[error("{0}")]
    TlsSetup(#[from] beckon_net::TlsConfigError),
    /// No key pair or signing request could be made.
    #[error("cannot make the agent's key pair: {0}")]
    Key(String),
    /// The console could not be reached or gave no HTTP answer.
    #[error("cannot reach the console at {url}: {source}{hint}")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// What failed.
        source: http::HttpError,
        /// What to check.
        hint: &'static str,
    },
    /// The console refused the enrollment (4xx).
    #[error("the console refused the enrollment (HTTP {status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The console's message.
        message: String,
    },
    /// The console failed (5xx or another unexpected status).
    #[error(
        "the console could not enroll the agent (HTTP {status}): {message}; try again later, and see the console's log"
    )]
    ConsoleFailed {
        /// HTTP status.
        status: u16,
        /// The console's message.
        message: String,
    },
    /// The console's answer is not what an enrollment returns.
    #[error("the console's answer cannot be used: {0}; is --console the Beckon console?")]
    BadAnswer(String),
    /// A file could not be written.
    #[error(
        "cannot write {what} {}: {source}; run as a user who may write there (the agent's service user or root), or choose another place with --state-dir / --config-out",
        path.display()
    )]
    Io {
        /// What the file is.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The generated configuration did not pass the agent's own checks (a bug, or an
    /// unusual answer from the console).
    #[error("the generated configuration is not valid: {0}")]
    Config(#[from] crate::config::ConfigError),
}

/// The request body of `POST /api/v1/enroll`.
#[derive(Serialize)]
struct EnrollRequest<'a> {
    token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_id: Option<&'a str>,
    csr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    inventory: &'a Inventory,
}

/// The console's answer.
#[derive(Debug, Deserialize)]
struct EnrollAnswer {
    agent_id: String,
    tenant: String,
    certificate: String,
    ca: String,
    #[serde(default)]
    broker_endpoints: Vec<String>,
    /// The broker's certificate may come from a public CA: trust the system store too.
    #[serde(default)]
    broker_system_roots: bool,
    #[serde(default)]
    proxy: ProxyPolicy,
    wakeup_key: WakeUpKey,
    checkin_token: String,
    #[serde(default)]
    checkin_url: Option<String>,
}

/// The proxy policy the console hands out (going direct allowed unless it says otherwise).
#[derive(Clone, Serialize, Deserialize)]
pub struct ProxyPolicy {
    /// `http://host:port`, or `http://user:password@host:port`, or `system` (the machine's
    /// own proxy setting); empty: none.
    #[serde(default)]
    pub url: String,
    /// Go direct when the proxy fails.
    #[serde(default = "yes")]
    pub direct_fallback: bool,
}

fn yes() -> bool {
    true
}

impl ProxyPolicy {
    /// The same policy with the password taken out of the address (for the enrollment
    /// record, which is not a secret).
    fn without_password(&self) -> Self {
        Self {
            url: beckon_net::ProxyUrl::redact(self.url.trim()),
            direct_fallback: self.direct_fallback,
        }
    }
}

/// The address may carry a password: shown without it.
impl std::fmt::Debug for ProxyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyPolicy")
            .field("url", &self.without_password().url)
            .field("direct_fallback", &self.direct_fallback)
            .finish()
    }
}

impl Default for ProxyPolicy {
    fn default() -> Self {
        Self {
            url: String::new(),
            direct_fallback: true,
        }
    }
}

/// The console's wake-up signing key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WakeUpKey {
    /// Key id.
    pub kid: String,
    /// Ed25519 public key, base64url.
    pub public_key: String,
}

/// `enrollment.json`: what the console said, for people and tools (no secrets).
#[derive(Debug, Serialize)]
struct EnrollmentRecord<'a> {
    agent_id: &'a str,
    tenant: &'a str,
    console_url: String,
    broker_endpoints: &'a [String],
    proxy: ProxyPolicy,
    wakeup_key: &'a WakeUpKey,
    enrolled_at: String,
}

/// Enrolls with the console and writes key, certificates, token and configuration.
pub async fn enroll(opts: &EnrollOptions) -> Result<Enrolled, EnrollError> {
    let console =
        Url::parse(opts.console_url.trim_end_matches('/')).map_err(EnrollError::BadUrl)?;
    let console = console.with_path("/");
    let token = opts.token.trim();
    if !token.starts_with("bke_") {
        return Err(EnrollError::BadToken);
    }
    let state_dir = absolute(&opts.state_dir);
    let config_out = absolute(&opts.config_out);
    if state_dir.join("agent.pem").exists() && !opts.force {
        return Err(EnrollError::AlreadyEnrolled(state_dir));
    }
    let client = http::console_client(&console, opts.console_ca.as_deref())?;

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    // The console sets the certificate's names; the CSR only proves the key.
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        opts.agent_id.as_deref().unwrap_or("beckon-agent"),
    );
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    let key_pem = key.serialize_pem();

    let inventory = match &opts.inventory {
        Some(inv) => inv.clone(),
        None => Inventory::gather(),
    };
    let body = serde_json::to_vec(&EnrollRequest {
        token,
        agent_id: opts.agent_id.as_deref(),
        csr,
        name: opts.name.as_deref(),
        inventory: &inventory,
    })
    .map_err(|e| EnrollError::Key(e.to_string()))?;
    let url = console.with_path("/api/v1/enroll");
    let response = http::request(&client, &url, "POST", &[], &body, opts.timeout)
        .await
        .map_err(|source| {
            let hint = match &source {
                http::HttpError::Tls(beckon_net::TlsError::NotTls { .. }) => {
                    "; the console serves plain HTTP there: use http://"
                }
                http::HttpError::Tls(_) if opts.console_ca.is_none() => {
                    "; for a console with its own CA, pass that CA's PEM file with --ca"
                }
                http::HttpError::Tls(_) => {
                    "; check that --ca is the CA that signed the console's certificate"
                }
                http::HttpError::NotHttp { .. } => "",
                _ => "; check the URL (scheme, host and port) and that the console is running",
            };
            EnrollError::Unreachable {
                url: url.to_string(),
                source,
                hint,
            }
        })?;
    match response.status {
        200 | 201 => {}
        400..=499 => {
            return Err(EnrollError::Refused {
                status: response.status,
                message: response.error_message(),
            });
        }
        status => {
            return Err(EnrollError::ConsoleFailed {
                status,
                message: response.error_message(),
            });
        }
    }
    let answer: EnrollAnswer = serde_json::from_slice(&response.body)
        .map_err(|e| EnrollError::BadAnswer(format!("not an enrollment answer: {e}")))?;
    check_answer(&answer, &key_pem)?;

    write_files(opts, &state_dir, &answer, &key_pem, &console)?;
    let text = config_text(opts, &state_dir, &answer, &console)?;
    let config = AgentConfig::parse(&text, &config_out)?;
    if let Some(parent) = config_out.parent() {
        create_dir(parent, 0o755, "the configuration folder")?;
    }
    // A proxy password in the file makes it a secret.
    let mode = if matches!(&config.broker.proxy, Some(crate::proxy::ProxySetting::Url(p)) if p.user().is_some())
    {
        0o600
    } else {
        0o644
    };
    write(
        &config_out,
        text.as_bytes(),
        mode,
        "the agent configuration",
    )?;
    Ok(Enrolled {
        agent_id: answer.agent_id,
        tenant: answer.tenant,
        config_file: config_out,
        config,
    })
}

/// The answer holds a usable identity: valid id, a certificate for our own key from the
/// CA it sent, a wake-up key.
fn check_answer(answer: &EnrollAnswer, key_pem: &str) -> Result<(), EnrollError> {
    beckon_identity::validate_id(&answer.agent_id)
        .map_err(|e| EnrollError::BadAnswer(format!("agent_id: {e}")))?;
    beckon_identity::TenantId::new(answer.tenant.as_str())
        .map_err(|e| EnrollError::BadAnswer(format!("tenant: {e}")))?;
    if answer.checkin_token.trim().is_empty() {
        return Err(EnrollError::BadAnswer("no checkin_token".into()));
    }
    // rustls checks that the certificate's public key is ours.
    TlsClient::new(&TlsSettings {
        trust: TrustAnchors::CaPem(answer.ca.as_bytes().to_vec()),
        identity: Some(ClientIdentity::Pem {
            cert: answer.certificate.as_bytes().to_vec(),
            key: key_pem.as_bytes().to_vec(),
        }),
        ..TlsSettings::default()
    })
    .map_err(|e| EnrollError::BadAnswer(format!("certificate or CA: {e}")))?;
    let keys = [(
        answer.wakeup_key.kid.clone(),
        answer.wakeup_key.public_key.clone(),
    )]
    .into_iter()
    .collect();
    crate::wakeup::verifier(&answer.tenant, &answer.agent_id, &keys)
        .map_err(|e| EnrollError::BadAnswer(format!("wakeup_key: {e}")))?;
    Ok(())
}

fn write_files(
    opts: &EnrollOptions,
    state_dir: &Path,
    answer: &EnrollAnswer,
    key_pem: &str,
    console: &Url,
) -> Result<(), EnrollError> {
    create_dir(state_dir, 0o700, "the state folder")?;
    let token = format!("{}\n", answer.checkin_token.trim());
    let files: [(&str, &[u8], u32, &'static str); 4] = [
        ("agent.key", key_pem.as_bytes(), 0o600, "the private key"),
        (
            "agent.pem",
            answer.certificate.as_bytes(),
            0o644,
            "the agent certificate",
        ),
        ("ca.pem", answer.ca.as_bytes(), 0o644, "the CA certificate"),
        (
            "checkin.token",
            token.as_bytes(),
            0o600,
            "the check-in token",
        ),
    ];
    for (name, contents, mode, what) in files {
        write(&state_dir.join(name), contents, mode, what)?;
    }
    if let Some(ca) = &opts.console_ca {
        let pem = std::fs::read(ca).map_err(|source| EnrollError::Io {
            what: "(reading) the console CA",
            path: ca.clone(),
            source,
        })?;
        write(
            &state_dir.join("console-ca.pem"),
            &pem,
            0o644,
            "the console CA",
        )?;
    }
    let record = EnrollmentRecord {
        agent_id: &answer.agent_id,
        tenant: &answer.tenant,
        console_url: console_base(console),
        broker_endpoints: &answer.broker_endpoints,
        proxy: answer.proxy.without_password(),
        wakeup_key: &answer.wakeup_key,
        enrolled_at: crate::timefmt::format_rfc3339(crate::timefmt::unix_now()),
    };
    let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
    write(
        &state_dir.join("enrollment.json"),
        &json,
        0o644,
        "the enrollment record",
    )
}

/// `scheme://host:port` of the console.
fn console_base(console: &Url) -> String {
    console.origin()
}

/// Broker host, primary port and fallback port from the endpoint list (`host:port`,
/// preferred first). The agent's ladder reaches one host on two ports: the first endpoint
/// is the primary, a later one on the same host the fallback (443 when there is none).
fn broker_target(endpoints: &[String], console: &Url) -> (String, u16, u16) {
    let parsed: Vec<(String, u16)> = endpoints
        .iter()
        .filter_map(|e| crate::connector::parse_server_reference(e, 8883))
        .collect();
    let Some((host, port)) = parsed.first().cloned() else {
        // No endpoint configured: the broker runs beside the console.
        return (console.host.clone(), 8883, 443);
    };
    let fallback = parsed
        .iter()
        .skip(1)
        .find(|(h, p)| *h == host && *p != port)
        .map_or(443, |(_, p)| *p);
    for (h, p) in parsed.iter().filter(|(h, _)| *h != host) {
        tracing::warn!(
            endpoint = %format!("{h}:{p}"),
            "the agent connects to one broker host; this endpoint is not used"
        );
    }
    (host, port, fallback)
}

fn toml_str(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

fn toml_path(path: &Path) -> String {
    toml_str(&path.to_string_lossy())
}

fn config_text(
    opts: &EnrollOptions,
    state_dir: &Path,
    answer: &EnrollAnswer,
    console: &Url,
) -> Result<String, EnrollError> {
    let (host, port, fallback) = broker_target(&answer.broker_endpoints, console);
    let mut t = String::new();
    t.push_str(&format!(
        "# Written by `beckon agent enroll` at {} from {}.\n# Every key is described in docs/agent.md.\n\n",
        crate::timefmt::format_rfc3339(crate::timefmt::unix_now()),
        console_base(console)
    ));
    t.push_str(&format!("agent_id = {}\n", toml_str(&answer.agent_id)));
    t.push_str(&format!("tenant = {}\n", toml_str(&answer.tenant)));
    t.push_str(&format!("state_dir = {}\n\n", toml_path(state_dir)));
    t.push_str("[broker]\n");
    t.push_str(&format!("host = {}\n", toml_str(&host)));
    t.push_str(&format!("port = {port}\nfallback_port = {fallback}\n"));
    t.push_str(&format!(
        "ca_file = {}\n",
        toml_path(&state_dir.join("ca.pem"))
    ));
    if answer.broker_system_roots {
        t.push_str("system_roots = true\n");
    }
    t.push_str(&format!(
        "client_cert = {}\n",
        toml_path(&state_dir.join("agent.pem"))
    ));
    t.push_str(&format!(
        "client_key = {}\n",
        toml_path(&state_dir.join("agent.key"))
    ));
    let proxy = answer.proxy.url.trim();
    if !proxy.is_empty() {
        t.push_str(&format!("proxy = {}\n", toml_str(proxy)));
        if !answer.proxy.direct_fallback {
            t.push_str("direct_fallback = false\n");
        }
    }
    t.push_str("\n[wakeup.console_keys]\n");
    t.push_str(&format!(
        "{} = {}\n",
        toml_str(&answer.wakeup_key.kid),
        toml_str(&answer.wakeup_key.public_key)
    ));
    t.push_str("\n[checkin]\n");
    let checkin_url = console_base(console);
    if let Some(said) = &answer.checkin_url
        && said.trim_end_matches('/') != checkin_url
    {
        tracing::debug!(console_said = %said, using = %checkin_url, "check-in URL: the one enrollment used");
    }
    t.push_str(&format!("console_url = {}\n", toml_str(&checkin_url)));
    t.push_str(&format!(
        "token_file = {}\n",
        toml_path(&state_dir.join("checkin.token"))
    ));
    if console.scheme == Scheme::Https && opts.console_ca.is_some() {
        t.push_str(&format!(
            "ca_file = {}\n",
            toml_path(&state_dir.join("console-ca.pem"))
        ));
    }
    if !opts.extra_config.is_empty() {
        t.push('\n');
        t.push_str(&opts.extra_config);
        if !t.ends_with('\n') {
            t.push('\n');
        }
    }
    Ok(t)
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn create_dir(dir: &Path, mode: u32, what: &'static str) -> Result<(), EnrollError> {
    if dir.is_dir() {
        return Ok(());
    }
    crate::platform::create_dir(dir, mode).map_err(|source| EnrollError::Io {
        what,
        path: dir.to_owned(),
        source,
    })
}

fn write(path: &Path, contents: &[u8], mode: u32, what: &'static str) -> Result<(), EnrollError> {
    beckon_pki::write_atomic(path, contents, mode).map_err(|e| EnrollError::Io {
        what,
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_endpoints_map_to_host_and_ports() {
        let console = Url::parse("http://10.0.0.5:8080").expect("url");
        let e = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            broker_target(
                &e(&["push.example.com:8883", "push.example.com:443"]),
                &console
            ),
            ("push.example.com".into(), 8883, 443)
        );
        assert_eq!(
            broker_target(&e(&["localhost:9883", "localhost:9443"]), &console),
            ("localhost".into(), 9883, 9443)
        );
        assert_eq!(
            broker_target(&e(&["[::1]:8883"]), &console),
            ("::1".into(), 8883, 443)
        );
        assert_eq!(broker_target(&[], &console), ("10.0.0.5".into(), 8883, 443));
    }

    #[test]
    fn an_answer_without_a_proxy_policy_allows_going_direct() {
        let answer = |proxy: &str| -> EnrollAnswer {
            serde_json::from_str(&format!(
                r#"{{"agent_id": "pc-1", "tenant": "acme", "certificate": "", "ca": "",
                    "wakeup_key": {{"kid": "console-1", "public_key": "x"}},
                    "checkin_token": "bka_x"{proxy}}}"#
            ))
            .expect("answer")
        };
        assert!(answer("").proxy.direct_fallback, "no proxy policy");
        let a = answer(r#", "proxy": {"url": "http://proxy.example:3128"}"#);
        assert!(a.proxy.direct_fallback, "a policy without the field");
        let a = answer(r#", "proxy": {"url": "", "direct_fallback": false}"#);
        assert!(!a.proxy.direct_fallback, "forbidden on purpose");
    }

    #[test]
    fn the_enrollment_record_shows_the_proxy_user_but_not_the_password() {
        let answer: EnrollAnswer = serde_json::from_str(
            r#"{"agent_id": "pc-1", "tenant": "acme", "certificate": "", "ca": "",
                "proxy": {"url": "http://agents:s3cret@proxy.example:3128"},
                "wakeup_key": {"kid": "k", "public_key": "p"}, "checkin_token": "bka_x"}"#,
        )
        .expect("answer");
        assert!(!format!("{answer:?}").contains("s3cret"));
        let dir = tempfile::tempdir().expect("tempdir");
        let console = Url::parse("https://console.example.com").expect("url");
        let opts = EnrollOptions::new(console.to_string(), "bke_x", "/s", "/c");
        write_files(&opts, dir.path(), &answer, "KEY", &console).expect("files");
        let record = std::fs::read_to_string(dir.path().join("enrollment.json")).expect("record");
        assert!(
            record.contains("http://agents@proxy.example:3128") && !record.contains("s3cret"),
            "{record}"
        );
    }

    #[test]
    fn the_written_config_quotes_paths_and_carries_the_proxy() {
        let answer = EnrollAnswer {
            agent_id: "pc-1".into(),
            tenant: "acme".into(),
            certificate: String::new(),
            ca: String::new(),
            broker_endpoints: vec!["push.example.com:8883".into()],
            broker_system_roots: false,
            proxy: ProxyPolicy {
                url: "http://proxy.example:3128".into(),
                direct_fallback: true,
            },
            wakeup_key: WakeUpKey {
                kid: "console-1".into(),
                public_key: "6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw".into(),
            },
            checkin_token: "bka_x".into(),
            checkin_url: None,
        };
        let console = Url::parse("https://console.example.com").expect("url");
        let mut opts = EnrollOptions::new(console.to_string(), "bke_x", "/s", "/c");
        opts.console_ca = Some(PathBuf::from("/tmp/ca.pem"));
        let state = Path::new("/var/lib/odd \"name\" \\ dir");
        let text = config_text(&opts, state, &answer, &console).expect("text");
        let config = AgentConfig::parse(&text, Path::new("x.toml")).expect("valid");
        assert_eq!(config.state_dir, state);
        assert_eq!(config.broker.client_key, Some(state.join("agent.key")));
        assert_eq!(
            config.broker.proxy,
            Some(crate::proxy::ProxySetting::Url(beckon_net::ProxyUrl::new(
                "proxy.example",
                3128
            )))
        );
        assert_eq!(
            (
                config.broker.host.as_str(),
                config.broker.port,
                config.broker.fallback_port
            ),
            ("push.example.com", 8883, 443)
        );
        assert_eq!(
            config.checkin.console_url.as_deref(),
            Some("https://console.example.com")
        );
        assert_eq!(config.checkin.ca_file, Some(state.join("console-ca.pem")));
        assert_eq!(config.checkin.token_file, Some(state.join("checkin.token")));
        assert_eq!(
            config.broker.trust_anchors(),
            TrustAnchors::CaFile(state.join("ca.pem")),
            "the console's CA only, unless the console says the broker's certificate is public"
        );
        let public = EnrollAnswer {
            broker_system_roots: true,
            ..answer
        };
        let text = config_text(&opts, state, &public, &console).expect("text");
        let config = AgentConfig::parse(&text, Path::new("x.toml")).expect("valid");
        assert_eq!(
            config.broker.trust_anchors(),
            TrustAnchors::CaFileAndSystem(state.join("ca.pem"))
        );

        // The console's "system" policy: the agent reads the machine's own proxy setting.
        let mut answer = public;
        answer.proxy.url = "system".into();
        let text = config_text(&opts, state, &answer, &console).expect("text");
        let config = AgentConfig::parse(&text, Path::new("x.toml")).expect("valid");
        assert_eq!(
            config.broker.proxy,
            Some(crate::proxy::ProxySetting::System)
        );
        assert!(
            config.broker.direct_fallback,
            "the policy allows going direct"
        );

        // A policy that forbids going direct reaches the agent's ladder.
        answer.proxy.direct_fallback = false;
        let text = config_text(&opts, state, &answer, &console).expect("text");
        let config = AgentConfig::parse(&text, Path::new("x.toml")).expect("valid");
        assert!(!config.broker.direct_fallback, "{text}");
    }

    #[tokio::test]
    async fn a_token_of_the_wrong_kind_is_refused_before_any_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = EnrollOptions::new(
            "http://127.0.0.1:9",
            "bkt_not_an_enrollment_token",
            dir.path().join("state"),
            dir.path().join("agent.toml"),
        );
        let err = enroll(&opts).await.expect_err("wrong token kind");
        assert!(matches!(err, EnrollError::BadToken), "{err}");
        let opts = EnrollOptions::new("console:8080", "bke_x", dir.path(), dir.path());
        let err = enroll(&opts).await.expect_err("no scheme");
        assert!(err.to_string().contains("http:// or https://"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_console_is_named() {
        // A port nobody listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = EnrollOptions::new(
            format!("http://127.0.0.1:{port}"),
            "bke_whatever",
            dir.path().join("state"),
            dir.path().join("agent.toml"),
        );
        let err = enroll(&opts).await.expect_err("nobody listens");
        let text = err.to_string();
        assert!(
            text.contains("cannot reach the console") && text.contains("console is running"),
            "{text}"
        );
        assert!(
            !dir.path().join("state/agent.key").exists(),
            "nothing written on failure"
        );
    }
}
