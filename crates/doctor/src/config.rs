//! What the doctor checks: the broker, the ports, the proxy, the CA and the identity, given on
//! the command line, taken from an agent's configuration file, or built by the console.

use std::path::{Path as FsPath, PathBuf};
use std::time::Duration;

use beckon_agent::config::{AgentConfig, ConfigError};
use beckon_net::{ClientIdentity, ProxyUrl, TlsSettings, TrustAnchors};

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
    /// Where `proxy` came from, or why there is none (the agent's `broker.proxy`, the
    /// system's proxy setting), when known.
    pub proxy_source: Option<String>,
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
    /// moment of the check), unless `probe` is set. When `None`, a throw-away id
    /// `beckon-doctor-<random>` is used with a clean session.
    pub client_id: Option<String>,
    /// Probe as the identity's doctor client (`<id>/doctor`, set by
    /// [`from_agent_config`](Self::from_agent_config)): a clean session of its own, CONNECT
    /// and PINGREQ only, so that a running agent is neither taken over nor robbed of its
    /// queued wake-ups.
    pub probe: bool,
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
            proxy_source: None,
            tls: TlsSettings::default(),
            ca_label: None,
            username: None,
            password: None,
            client_id: None,
            probe: false,
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
    /// configuration (the token read from its `token_file` if set), so that the doctor checks
    /// exactly what the agent uses.
    pub fn from_agent_config(agent: &AgentConfig) -> Result<Self, ConfigError> {
        let b = &agent.broker;
        let mut config = Self::new(b.host.clone());
        config.server_name = b.server_name.clone();
        config.primary_port = b.port;
        config.fallback_port = Some(b.fallback_port);
        // `broker.proxy = "system"` is read now, as the agent reads it at each attempt.
        let found = beckon_agent::proxy::find(b.proxy.as_ref(), &b.host);
        config.proxy = found.proxy;
        config.proxy_source = Some(found.source);
        config.tls.trust = b.trust_anchors();
        if let Some(ca) = &b.ca_file {
            let system = if b.system_roots {
                " and this machine's CA store (broker.system_roots)"
            } else {
                ""
            };
            config.ca_label = Some(format!(
                "the CA file {} (broker.ca_file){system}",
                ca.display()
            ));
        }
        if let (Some(cert), Some(key)) = (&b.client_cert, &b.client_key) {
            config.tls.identity = Some(ClientIdentity::Files {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        config.password = agent.token()?;
        // The agent sends its id as the user name with a token.
        config.username = config.password.as_ref().map(|_| agent.agent_id.clone());
        config.client_id = Some(beckon_identity::probe_client_id(&agent.agent_id));
        config.probe = true;
        config.session_expiry = b.session_expiry;
        Ok(config)
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
            TrustAnchors::CaFileAndSystem(file) => {
                format!("the CA file {} and this machine's CA store", display(file))
            }
            TrustAnchors::CaPem(_) => String::from("the configured CA"),
        }
    }
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
            .field("proxy_source", &self.proxy_source)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("client_id", &self.client_id)
            .field("probe", &self.probe)
            .field("wake_topic", &self.wake_topic)
            .field("echo_topic", &self.echo_topic)
            .field("step_timeout", &self.step_timeout)
            .finish_non_exhaustive()
    }
}

fn display(path: &FsPath) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str =
        "[wakeup.console_keys]\nconsole-2026 = \"6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw\"\n";

    #[test]
    fn takes_what_the_doctor_needs_from_an_agent_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "  abc.def  \n").expect("token");
        let text = format!(
            "agent_id = \"laptop-42\"\ntenant = \"acme\"\n[broker]\nhost = \"push.example\"\nport = 9883\nca_file = \"ca.pem\"\ntoken_file = \"{}\"\nproxy = \"http://proxy.example:3128\"\nsession_expiry = \"2h\"\nkeepalive_direct = 60\n[actions.command]\nargv = [\"/bin/true\"]\n{KEYS}",
            token.display()
        );
        let agent = AgentConfig::parse(&text, FsPath::new("agent.toml")).expect("valid");
        let config = DoctorConfig::from_agent_config(&agent).expect("token readable");
        assert_eq!(config.primary_port, 9883);
        assert_eq!(config.fallback_port, Some(443));
        assert_eq!(config.session_expiry, Duration::from_secs(7200));
        assert_eq!(config.client_id.as_deref(), Some("laptop-42/doctor"));
        assert!(config.probe);
        assert_eq!(config.username.as_deref(), Some("laptop-42"));
        assert_eq!(config.password.as_deref(), Some("abc.def"));
        assert_eq!(config.proxy, Some(ProxyUrl::new("proxy.example", 3128)));
        assert_eq!(config.tls.trust, TrustAnchors::CaFile("ca.pem".into()));
        assert!(config.trust_label().contains("broker.ca_file"));
        assert_eq!(config.wake_topic, None, "a probe does not subscribe");
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("abc.def") && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[test]
    fn an_unreadable_token_file_is_named() {
        let text = format!(
            "agent_id = \"a\"\ntenant = \"acme\"\n[broker]\nhost = \"h\"\ntoken_file = \"/nonexistent/token\"\n{KEYS}"
        );
        let agent = AgentConfig::parse(&text, FsPath::new("x.toml")).expect("valid");
        let err = DoctorConfig::from_agent_config(&agent).expect_err("no token file");
        assert!(err.to_string().contains("/nonexistent/token"), "{err}");
    }
}
