//! What the doctor checks: the broker, the ports, the proxy, the CA and the identity, given on
//! the command line, taken from an agent's configuration file, or built by the console.

use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use beckon_net::{ClientIdentity, ProxyUrl, TlsSettings, TrustAnchors};
use serde::Deserialize;

/// Default wait for each step (DNS, TCP, proxy, TLS, WebSocket, each MQTT answer).
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Default session expiry used when the doctor resumes a named client's session, so that the
/// session (and the wake-ups queued in it) outlives the check: the agent's own default.
pub const DEFAULT_RESUMED_SESSION_EXPIRY: Duration = Duration::from_secs(86_400);

/// Everything [`diagnose`](crate::diagnose) needs.
#[derive(Clone, PartialEq, Eq)]
pub struct DoctorConfig {
    /// The broker's host name or IP address.
    pub broker_host: String,
    /// The name checked in the broker's certificate (default: `broker_host`).
    pub server_name: Option<String>,
    /// The primary MQTT-over-TLS port (8883).
    pub primary_port: u16,
    /// The fallback port shared with HTTPS (443), carrying ALPN `mqtt` and WebSocket. `None`
    /// checks only the primary port.
    pub fallback_port: Option<u16>,
    /// The HTTP proxy agents try first, if any.
    pub proxy: Option<ProxyUrl>,
    /// Trust anchors and client certificate, as the agent has them.
    pub tls: TlsSettings,
    /// Where the CA came from, for fix sentences (`--ca FILE`, the agent's `ca_file`).
    pub ca_label: Option<String>,
    /// The MQTT user name (sent with a token).
    pub username: Option<String>,
    /// The token, sent as the MQTT password.
    pub password: Option<String>,
    /// The MQTT client id. When set, the doctor connects as that client and resumes its
    /// session rather than cleaning it (a running client with this id is taken over for the
    /// moment of the check). When `None`, a throw-away id `beckon-doctor-<random>` is used
    /// with a clean session.
    pub client_id: Option<String>,
    /// A topic the identity must be allowed to subscribe to: an agent's `agents/{id}/wake`
    /// (set by [`from_agent_config`](Self::from_agent_config) and by `--client-id`). `None`
    /// for other identities (the console's own, say).
    pub wake_topic: Option<String>,
    /// Session expiry when resuming a named client's session (see
    /// [`DEFAULT_RESUMED_SESSION_EXPIRY`]).
    pub session_expiry: Duration,
    /// The topic for the publish/subscribe echo. `None`: `beckon-doctor/{client id}` for a
    /// throw-away client; no echo for a named (agent) client, whose rights do not allow one.
    pub echo_topic: Option<String>,
    /// Wait for each step.
    pub step_timeout: Duration,
}

impl DoctorConfig {
    /// Checks `broker_host` on ports 8883 and 443, no proxy, the system's CA store, no
    /// credentials.
    pub fn new(broker_host: impl Into<String>) -> Self {
        Self {
            broker_host: broker_host.into(),
            server_name: None,
            primary_port: 8883,
            fallback_port: Some(443),
            proxy: None,
            tls: TlsSettings::default(),
            ca_label: None,
            username: None,
            password: None,
            client_id: None,
            wake_topic: None,
            session_expiry: DEFAULT_RESUMED_SESSION_EXPIRY,
            echo_topic: None,
            step_timeout: DEFAULT_STEP_TIMEOUT,
        }
    }

    /// The name checked in the broker's certificate.
    pub fn server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or(&self.broker_host)
    }

    /// Takes broker, ports, proxy, CA, client certificate, token and client id from an agent's
    /// configuration (the token read from its `token_file` if set).
    pub fn from_agent_config(agent: &AgentBrokerSettings) -> Self {
        let mut config = Self::new(agent.host.clone());
        config.server_name = agent.server_name.clone();
        config.primary_port = agent.port;
        config.fallback_port = Some(agent.fallback_port);
        config.proxy = agent.proxy.clone();
        if let Some(ca) = &agent.ca_file {
            config.tls.trust = TrustAnchors::CaFile(ca.clone());
            config.ca_label = Some(format!("the CA file {} (broker.ca_file)", ca.display()));
        }
        if let (Some(cert), Some(key)) = (&agent.client_cert, &agent.client_key) {
            config.tls.identity = Some(ClientIdentity::Files {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        config.password = agent.token.clone();
        // The agent sends its id as the user name with a token.
        config.username = agent.token.as_ref().map(|_| agent.agent_id.clone());
        config.client_id = Some(agent.agent_id.clone());
        config.wake_topic = Some(wake_topic(&agent.agent_id));
        config.session_expiry = agent.session_expiry;
        config
    }

    /// Uses the CA in `file`.
    pub fn with_ca_file(mut self, file: impl Into<PathBuf>) -> Self {
        let file = file.into();
        self.ca_label = Some(format!("the CA file {}", file.display()));
        self.tls.trust = TrustAnchors::CaFile(file);
        self
    }

    /// How the trust anchors are named in fix sentences.
    pub(crate) fn trust_label(&self) -> String {
        if let Some(label) = &self.ca_label {
            return label.clone();
        }
        match &self.tls.trust {
            TrustAnchors::System => String::from("this machine's CA store"),
            TrustAnchors::CaFile(file) => format!("the CA file {}", display(file)),
            TrustAnchors::CaPem(_) => String::from("the configured CA"),
        }
    }
}

/// The topic an agent receives its wake-ups on.
pub fn wake_topic(agent_id: &str) -> String {
    format!("agents/{agent_id}/wake")
}

/// The token is left out: reports and logs must not carry it.
impl std::fmt::Debug for DoctorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoctorConfig")
            .field("broker_host", &self.broker_host)
            .field("server_name", &self.server_name)
            .field("primary_port", &self.primary_port)
            .field("fallback_port", &self.fallback_port)
            .field("proxy", &self.proxy)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("client_id", &self.client_id)
            .field("wake_topic", &self.wake_topic)
            .field("echo_topic", &self.echo_topic)
            .field("step_timeout", &self.step_timeout)
            .finish_non_exhaustive()
    }
}

fn display(path: &FsPath) -> String {
    path.display().to_string()
}

/// An agent's configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    /// The file (or its token file) could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// "the agent configuration" or "the token file".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or a key has the wrong type.
    #[error("agent configuration {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser says, with line and key.
        message: String,
    },
    /// A value is well typed but not usable.
    #[error("agent configuration {}: key `{key}`: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, dotted.
        key: &'static str,
        /// Why, and what to write instead.
        reason: String,
    },
}

/// What the doctor needs from an agent's configuration file (the agent's TOML format, see
/// `docs/agent.md`): its id and its `[broker]` table. Other keys are ignored here; the agent
/// itself checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentBrokerSettings {
    /// `agent_id`: the MQTT client id, user name with a token, and topic level.
    pub agent_id: String,
    /// `broker.host`.
    pub host: String,
    /// `broker.server_name`.
    pub server_name: Option<String>,
    /// `broker.port` (default 8883).
    pub port: u16,
    /// `broker.fallback_port` (default 443).
    pub fallback_port: u16,
    /// `broker.ca_file`.
    pub ca_file: Option<PathBuf>,
    /// `broker.client_cert`.
    pub client_cert: Option<PathBuf>,
    /// `broker.client_key`.
    pub client_key: Option<PathBuf>,
    /// `broker.token`, or the content of `broker.token_file`.
    pub token: Option<String>,
    /// `broker.proxy`.
    pub proxy: Option<ProxyUrl>,
    /// `broker.session_expiry` (default one day).
    pub session_expiry: Duration,
}

#[derive(Deserialize)]
struct RawAgentConfig {
    agent_id: String,
    broker: RawBroker,
}

#[derive(Deserialize)]
struct RawBroker {
    host: String,
    server_name: Option<String>,
    port: Option<u16>,
    fallback_port: Option<u16>,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    token_file: Option<PathBuf>,
    token: Option<String>,
    proxy: Option<String>,
    session_expiry: Option<toml::Value>,
}

impl AgentBrokerSettings {
    /// Reads the settings from an agent's configuration file.
    pub fn load(path: &FsPath) -> Result<Self, AgentConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentConfigError::Read {
            what: "the agent configuration",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses configuration text; `path` names the file in errors and token files are read
    /// from disk.
    pub fn parse(text: &str, path: &FsPath) -> Result<Self, AgentConfigError> {
        let raw: RawAgentConfig = toml::from_str(text).map_err(|e| AgentConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |key: &'static str, reason: String| AgentConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        let b = raw.broker;
        if b.host.trim().is_empty() {
            return Err(invalid("broker.host", "must not be empty".into()));
        }
        if b.client_cert.is_some() != b.client_key.is_some() {
            return Err(invalid(
                "broker.client_key",
                "client_cert and client_key go together: set both or neither".into(),
            ));
        }
        let proxy = match &b.proxy {
            None => None,
            Some(p) => Some(
                p.parse::<ProxyUrl>()
                    .map_err(|e| invalid("broker.proxy", e.to_string()))?,
            ),
        };
        let token = match (b.token, &b.token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "broker.token",
                    "set either token or token_file, not both".into(),
                ));
            }
            (Some(token), None) => Some(token.trim().to_owned()),
            (None, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .map_err(|source| AgentConfigError::Read {
                        what: "the token file",
                        path: file.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let session_expiry = match &b.session_expiry {
            None => DEFAULT_RESUMED_SESSION_EXPIRY,
            Some(value) => duration(value).ok_or_else(|| {
                invalid(
                    "broker.session_expiry",
                    format!("{value} is not a duration: write seconds (86400) or a number with s, m, h or d (\"1d\")"),
                )
            })?,
        };
        Ok(Self {
            agent_id: raw.agent_id,
            host: b.host,
            server_name: b.server_name,
            port: b.port.unwrap_or(8883),
            fallback_port: b.fallback_port.unwrap_or(443),
            ca_file: b.ca_file,
            client_cert: b.client_cert,
            client_key: b.client_key,
            token,
            proxy,
            session_expiry,
        })
    }
}

/// A duration as the agent writes it: whole seconds, or text with a unit (`30s`, `5m`, `1d`).
fn duration(value: &toml::Value) -> Option<Duration> {
    match value {
        toml::Value::Integer(secs) => u64::try_from(*secs).ok().map(Duration::from_secs),
        toml::Value::String(text) => {
            let text = text.trim();
            let split = text
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(text.len());
            let (number, unit) = text.split_at(split);
            let value: f64 = number.parse().ok()?;
            let scale = match unit.trim() {
                "ms" => 0.001,
                "" | "s" => 1.0,
                "m" | "min" => 60.0,
                "h" => 3600.0,
                "d" => 86_400.0,
                _ => return None,
            };
            let secs = value * scale;
            (secs.is_finite() && (0.0..1e12).contains(&secs)).then(|| Duration::from_secs_f64(secs))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_doctor_needs_from_an_agent_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "  abc.def  \n").expect("token");
        let text = format!(
            "agent_id = \"laptop-42\"\ntenant = \"acme\"\n[broker]\nhost = \"push.example\"\nport = 9883\nca_file = \"ca.pem\"\ntoken_file = \"{}\"\nproxy = \"http://proxy.example:3128\"\nsession_expiry = \"2h\"\nkeepalive_direct = 60\n[actions.command]\nargv = [\"/bin/true\"]\n",
            token.display()
        );
        let agent = AgentBrokerSettings::parse(&text, FsPath::new("agent.toml")).expect("valid");
        assert_eq!(agent.port, 9883);
        assert_eq!(agent.fallback_port, 443);
        assert_eq!(agent.token.as_deref(), Some("abc.def"));
        assert_eq!(agent.session_expiry, Duration::from_secs(7200));
        let config = DoctorConfig::from_agent_config(&agent);
        assert_eq!(config.client_id.as_deref(), Some("laptop-42"));
        assert_eq!(config.username.as_deref(), Some("laptop-42"));
        assert_eq!(config.password.as_deref(), Some("abc.def"));
        assert_eq!(config.proxy, Some(ProxyUrl::new("proxy.example", 3128)));
        assert_eq!(config.tls.trust, TrustAnchors::CaFile("ca.pem".into()));
        assert!(config.trust_label().contains("broker.ca_file"));
        assert_eq!(config.wake_topic.as_deref(), Some("agents/laptop-42/wake"));
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("abc.def") && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[test]
    fn a_bad_agent_config_names_file_and_key() {
        let cases = [
            ("agent_id = \"a\"\n", "missing field `broker`"),
            (
                "agent_id = \"a\"\n[broker]\nhost = \"h\"\nclient_cert = \"c.pem\"\n",
                "broker.client_key",
            ),
            (
                "agent_id = \"a\"\n[broker]\nhost = \"h\"\nproxy = \"https://p:1\"\n",
                "broker.proxy",
            ),
            (
                "agent_id = \"a\"\n[broker]\nhost = \"h\"\nsession_expiry = \"soon\"\n",
                "broker.session_expiry",
            ),
            (
                "agent_id = \"a\"\n[broker]\nhost = \"h\"\ntoken_file = \"/nonexistent/token\"\n",
                "cannot read the token file",
            ),
        ];
        for (text, expected) in cases {
            let err = AgentBrokerSettings::parse(text, FsPath::new("x.toml")).expect_err(text);
            let message = err.to_string();
            assert!(message.contains(expected), "{text}: {message}");
        }
    }
}
