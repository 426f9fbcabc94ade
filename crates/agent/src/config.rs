//! The agent's configuration file (TOML). Every key and its default is documented in
//! `docs/agent.md`; a bad file names the file, the key and the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Default folder for the agent's state (`state.json`) on this system (Windows: the one used
/// when `%ProgramData%` is not set; [`crate::platform::default_state_dir`] reads it).
pub const DEFAULT_STATE_DIR: &str = crate::platform::STATE_DIR;
/// Default configuration file of the packaged agent on this system.
pub const DEFAULT_CONFIG_FILE: &str = crate::platform::CONFIG_FILE;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or a key has a wrong type or unknown name.
    #[error("agent config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser says, with line and key.
        message: String,
    },
    /// A value is well typed but not acceptable.
    #[error("agent config {path}: key `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending key, dotted (`broker.host`).
        key: &'static str,
        /// Why, and what to write instead.
        reason: String,
    },
}

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's id: its MQTT client id and its topics `agents/{id}/...`.
    pub agent_id: String,
    /// The tenant the agent belongs to (checked against a wake-up's target).
    pub tenant: String,
    /// Where state.json lives (last path, seen wake-ups, last result, last error).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The push service.
    pub broker: BrokerConfig,
    /// Reconnect pacing.
    #[serde(default)]
    pub reconnect: ReconnectConfig,
    /// Wake-up verification.
    #[serde(default)]
    pub wakeup: WakeUpConfig,
    /// What to do on a wake-up.
    #[serde(default)]
    pub actions: ActionsConfig,
    /// Periodic check-in with the console.
    #[serde(default)]
    pub checkin: CheckinConfig,
}

/// How to reach and authenticate to the push service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Host name (or address) of the push service.
    pub host: String,
    /// More push-service nodes of a cluster (host names or addresses, same ports), tried in
    /// turn after the whole ladder failed against the current one: an agent whose node went
    /// away moves to the next. Empty by default (one name, e.g. a load balancer).
    #[serde(default)]
    pub more_hosts: Vec<String>,
    /// The name checked in the broker's certificate (default: `host`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// MQTT over TLS port.
    #[serde(default = "default_port_mqtts")]
    pub port: u16,
    /// The TLS fallback port shared with HTTPS (ALPN `mqtt`, then WebSocket `/mqtt`).
    #[serde(default = "default_port_fallback")]
    pub fallback_port: u16,
    /// PEM file with the CA that signs the broker's certificate (default: the system store).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Trust the system store as well as `ca_file`: for a broker with a certificate from a
    /// public CA (enrollment writes it when the console says so).
    #[serde(default)]
    pub system_roots: bool,
    /// PEM client certificate (mTLS identity).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate (keep it 0600).
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// File holding a signed token sent as the MQTT password (preferred over `token`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The token itself, inline.
    #[serde(default)]
    pub token: Option<String>,
    /// HTTP proxy for the connection ladder, from the `proxy` key: `http://host:port`, or with
    /// Basic authentication `http://user:password@host:port` (keep the file 0600 then), or
    /// `system` for the operating system's setting (WinHTTP on Windows, `https_proxy` on
    /// Unix; see [`crate::proxy`]). Debug output and logs show the user name at most.
    #[serde(skip)]
    pub proxy: Option<crate::proxy::ProxySetting>,
    /// The `proxy` key as written, moved into `proxy` by [`AgentConfig::parse`] (it may hold a
    /// password, so it is not kept; a TOML error would quote the whole line).
    #[serde(rename = "proxy", default)]
    proxy_text: Option<String>,
    /// Whether the agent goes direct after every path through the proxy failed (default
    /// true). `false` where only the proxy leads out or policy forbids direct connections
    /// (the console's proxy policy `direct_fallback`); without a proxy, or when `proxy =
    /// "system"` finds none, the agent goes direct whatever this says.
    #[serde(default = "direct_fallback_default")]
    pub direct_fallback: bool,
    /// Development only: plain MQTT over TCP on this port, no TLS. Never on a real network.
    #[serde(default)]
    pub plain_port: Option<u16>,
    /// Keepalive on direct 8883.
    #[serde(default = "default_keepalive_direct", deserialize_with = "duration")]
    pub keepalive_direct: Duration,
    /// Keepalive via 443 or a proxy, whose idle connections get cut.
    #[serde(default = "default_keepalive_fallback", deserialize_with = "duration")]
    pub keepalive_fallback: Duration,
    /// How long to wait for PINGRESP before the connection counts as dead.
    #[serde(default = "default_ping_timeout", deserialize_with = "duration")]
    pub ping_timeout: Duration,
    /// How long a connection attempt (TCP, TLS, CONNECT/CONNACK) may take.
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// MQTT session expiry: how long the broker keeps queued wake-ups while the agent is away.
    #[serde(default = "default_session_expiry", deserialize_with = "duration")]
    pub session_expiry: Duration,
}

/// Reconnect pacing: full-jitter exponential backoff plus a random start delay.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconnectConfig {
    /// First backoff step.
    #[serde(deserialize_with = "duration")]
    pub backoff_base: Duration,
    /// Largest backoff step; also the wait after refused credentials.
    #[serde(deserialize_with = "duration")]
    pub backoff_cap: Duration,
    /// A connection that lived this long resets the backoff.
    #[serde(deserialize_with = "duration")]
    pub reset_after: Duration,
    /// Random delay before the first connection, in `[0, start_delay_max]`.
    #[serde(deserialize_with = "duration")]
    pub start_delay_max: Duration,
    /// Least wait after "server busy" (0x89) or "connection rate exceeded" (0x9F).
    #[serde(deserialize_with = "duration")]
    pub busy_wait_min: Duration,
    /// Session takeovers (another connection with this agent's id) within `takeover_window`
    /// that mean another machine uses this identity; 0: never stop reconnecting.
    pub takeover_limit: u32,
    /// The window takeovers are counted in.
    #[serde(deserialize_with = "duration")]
    pub takeover_window: Duration,
    /// How long the agent stays away once another machine uses its identity.
    #[serde(deserialize_with = "duration")]
    pub takeover_pause: Duration,
}

/// Wake-up verification settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WakeUpConfig {
    /// The console's wake-up signing keys: key id = base64url Ed25519 public key.
    pub console_keys: BTreeMap<String, String>,
    /// Upper bound on a wake-up's `spread`, whatever the wake-up says.
    #[serde(deserialize_with = "duration")]
    pub max_spread: Duration,
    /// How many seen wake-up ids are remembered against replays.
    pub replay_memory: usize,
    /// Send Wake-on-LAN packets on this machine's network when the console asks (a signed
    /// relay request on `agents/{id}/relay`). Default true.
    pub relay: bool,
}

/// What the agent does on a wake-up.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionsConfig {
    /// Run a program.
    #[serde(default)]
    pub command: Option<CommandAction>,
    /// Call a local HTTP endpoint.
    #[serde(default)]
    pub http: Option<HttpAction>,
}

/// Run a program (argv, never a shell).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandAction {
    /// Program and arguments; the program is `argv[0]` (absolute path recommended).
    pub argv: Vec<String>,
    /// The program is killed after this long.
    #[serde(default = "default_command_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Working directory (default: the state folder).
    #[serde(default)]
    pub working_dir: Option<PathBuf>,
    /// Run `argv` through `cmd` or `powershell` (Windows) instead of directly.
    #[serde(default)]
    pub shell: Option<crate::platform::Shell>,
}

/// Call a local HTTP endpoint (plain `http://`, meant for loopback services).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAction {
    /// `http://host:port/path`.
    pub url: String,
    /// HTTP method.
    #[serde(default = "default_http_method")]
    pub method: String,
    /// The whole request may take this long.
    #[serde(default = "default_http_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
}

/// Periodic check-in with the console.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckinConfig {
    /// Console base URL (`http(s)://host[:port]`); no check-in when absent.
    pub console_url: Option<String>,
    /// File holding the check-in secret enrollment gave (`Authorization: Bearer`); without
    /// it the broker token, if any, is sent.
    pub token_file: Option<PathBuf>,
    /// PEM CA file for an `https://` console with a private CA (default: the system store).
    pub ca_file: Option<PathBuf>,
    /// Mean time between check-ins.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// Each interval is shifted by a random amount in `[-jitter, +jitter]`.
    #[serde(deserialize_with = "duration")]
    pub jitter: Duration,
    /// Also check in on every wake-up (the built-in wake-up action).
    pub on_wakeup: bool,
    /// A check-in request may take this long.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
}

fn default_state_dir() -> PathBuf {
    crate::platform::default_state_dir()
}

fn direct_fallback_default() -> bool {
    true
}

fn default_port_mqtts() -> u16 {
    8883
}
fn default_port_fallback() -> u16 {
    443
}
fn default_keepalive_direct() -> Duration {
    Duration::from_secs(60)
}
fn default_keepalive_fallback() -> Duration {
    Duration::from_secs(30)
}
fn default_ping_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_session_expiry() -> Duration {
    Duration::from_secs(86_400)
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_http_method() -> String {
    "POST".to_owned()
}
fn default_http_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            reset_after: Duration::from_secs(60),
            start_delay_max: Duration::from_secs(30),
            busy_wait_min: Duration::from_secs(30),
            takeover_limit: 3,
            takeover_window: Duration::from_secs(600),
            takeover_pause: Duration::from_secs(3600),
        }
    }
}

impl Default for WakeUpConfig {
    fn default() -> Self {
        Self {
            console_keys: BTreeMap::new(),
            max_spread: Duration::from_secs(3600),
            replay_memory: beckon_identity::wakeup::DEFAULT_REPLAY_CAPACITY,
            relay: true,
        }
    }
}

impl Default for CheckinConfig {
    fn default() -> Self {
        Self {
            console_url: None,
            token_file: None,
            ca_file: None,
            interval: Duration::from_secs(600),
            jitter: Duration::from_secs(60),
            on_wakeup: true,
            timeout: Duration::from_secs(30),
        }
    }
}

impl BrokerConfig {
    /// The CAs trusted for the broker's certificate: `ca_file` (with the system store when
    /// `system_roots` says so), else the system store.
    pub fn trust_anchors(&self) -> beckon_net::TrustAnchors {
        use beckon_net::TrustAnchors;
        match &self.ca_file {
            Some(file) if self.system_roots => TrustAnchors::CaFileAndSystem(file.clone()),
            Some(file) => TrustAnchors::CaFile(file.clone()),
            None => TrustAnchors::System,
        }
    }
}

impl ReconnectConfig {
    /// The reconnect backoff settings of `beckon-net`.
    pub fn backoff(&self) -> beckon_net::BackoffConfig {
        beckon_net::BackoffConfig {
            base: self.backoff_base,
            cap: self.backoff_cap,
            busy_floor: self.busy_wait_min,
            reset_after: self.reset_after,
            startup_spread: self.start_delay_max,
        }
    }

    /// When the agent stops fighting over its identity.
    pub fn takeover_limits(&self) -> crate::takeover::TakeoverLimits {
        crate::takeover::TakeoverLimits {
            limit: self.takeover_limit,
            window: self.takeover_window,
            pause: self.takeover_pause,
        }
    }
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if let Some(text) = config.broker.proxy_text.take() {
            let proxy =
                text.parse()
                    .map_err(|e: beckon_net::ProxyUrlError| ConfigError::Invalid {
                        path: path.to_owned(),
                        key: "broker.proxy",
                        reason: e.to_string(),
                    })?;
            config.broker.proxy = Some(proxy);
        }
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        beckon_identity::validate_id(&self.agent_id)
            .map_err(|e| invalid("agent_id", e.to_string()))?;
        beckon_identity::TenantId::new(self.tenant.as_str())
            .map_err(|e| invalid("tenant", e.to_string()))?;
        crate::wakeup::verifier(&self.tenant, &self.agent_id, &self.wakeup.console_keys)
            .map_err(|e| invalid("wakeup.console_keys", e.to_string()))?;
        if self.broker.host.trim().is_empty() {
            return Err(invalid("broker.host", "must not be empty".into()));
        }
        if self.broker.client_cert.is_some() != self.broker.client_key.is_some() {
            return Err(invalid(
                "broker.client_key",
                "client_cert and client_key go together: set both or neither".into(),
            ));
        }
        if self.broker.token.is_some() && self.broker.token_file.is_some() {
            return Err(invalid(
                "broker.token",
                "set either token or token_file, not both".into(),
            ));
        }
        for (key, d) in [
            ("broker.keepalive_direct", self.broker.keepalive_direct),
            ("broker.keepalive_fallback", self.broker.keepalive_fallback),
        ] {
            if d.as_secs() == 0 || d.as_secs() > u64::from(u16::MAX) {
                return Err(invalid(key, "must be between 1 s and 65535 s".into()));
            }
        }
        if self.broker.ping_timeout.is_zero() || self.broker.connect_timeout.is_zero() {
            return Err(invalid(
                "broker.ping_timeout",
                "ping_timeout and connect_timeout must be above zero".into(),
            ));
        }
        if let Err(e) = self.reconnect.backoff().validate() {
            return Err(invalid("reconnect", e.to_string()));
        }
        if self.reconnect.takeover_limit > 0
            && (self.reconnect.takeover_window.is_zero() || self.reconnect.takeover_pause.is_zero())
        {
            return Err(invalid(
                "reconnect.takeover_window",
                "takeover_window and takeover_pause must be above zero (takeover_limit = 0 turns the check off)".into(),
            ));
        }
        if let Some(cmd) = &self.actions.command {
            if cmd.argv.first().is_none_or(|p| p.is_empty()) {
                return Err(invalid(
                    "actions.command.argv",
                    "needs at least the program, e.g. [\"/usr/bin/true\"]".into(),
                ));
            }
            if cmd.timeout.is_zero() {
                return Err(invalid(
                    "actions.command.timeout",
                    "must be above zero".into(),
                ));
            }
        }
        if let Some(http) = &self.actions.http {
            if parse_http_url(&http.url).is_none() {
                return Err(invalid(
                    "actions.http.url",
                    format!("{:?} is not an http://host[:port]/path URL", http.url),
                ));
            }
            if http.method.is_empty() || !http.method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(invalid(
                    "actions.http.method",
                    "an upper-case HTTP method such as POST".into(),
                ));
            }
        }
        if let Some(url) = &self.checkin.console_url {
            if let Err(e) = crate::http::Url::parse(url) {
                return Err(invalid("checkin.console_url", e));
            }
            if self.checkin.interval.is_zero() || self.checkin.jitter >= self.checkin.interval {
                return Err(invalid(
                    "checkin.interval",
                    "must be above zero and larger than checkin.jitter".into(),
                ));
            }
        }
        Ok(())
    }

    /// The topic the agent subscribes to.
    pub fn wake_topic(&self) -> String {
        beckon_identity::acl::wake_topic(&self.agent_id)
    }

    /// The topic the agent publishes its acks to.
    pub fn ack_topic(&self) -> String {
        beckon_identity::acl::ack_topic(&self.agent_id)
    }

    /// The check-in secret: `checkin.token_file` if set, else the MQTT token.
    pub fn checkin_token(&self) -> Result<Option<String>, ConfigError> {
        match &self.checkin.token_file {
            Some(file) => std::fs::read_to_string(file)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|source| ConfigError::Read {
                    path: file.clone(),
                    source,
                }),
            None => self.token(),
        }
    }

    /// The MQTT password: the token, read from `token_file` if set.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        if let Some(token) = &self.broker.token {
            return Ok(Some(token.trim().to_owned()));
        }
        match &self.broker.token_file {
            None => Ok(None),
            Some(file) => std::fs::read_to_string(file)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|source| ConfigError::Read {
                    path: file.clone(),
                    source,
                }),
        }
    }
}

/// Parses a plain `http://` URL; `None` for anything else (https, user info, bad port).
pub fn parse_http_url(url: &str) -> Option<crate::http::Url> {
    crate::http::Url::parse(url)
        .ok()
        .filter(|u| u.scheme == crate::http::Scheme::Http)
}

/// Parses a duration written as whole seconds (`30`) or text with a unit:
/// `250ms`, `30s`, `5m`, `2h`, `1d`.
pub fn parse_duration(text: &str) -> Option<Duration> {
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

fn duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(de)? {
        Raw::Secs(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => parse_duration(&t).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{t:?} is not a duration: write seconds (30) or a number with ms, s, m, h or d (\"30s\")"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
agent_id = "laptop-42"
tenant = "acme"
[broker]
host = "push.example.com"
[wakeup.console_keys]
console-2026 = "6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw"
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = AgentConfig::parse(MINIMAL, Path::new("agent.toml")).expect("valid");
        assert_eq!(c.broker.port, 8883);
        assert_eq!(c.broker.fallback_port, 443);
        assert_eq!(c.broker.keepalive_direct, Duration::from_secs(60));
        assert_eq!(c.broker.keepalive_fallback, Duration::from_secs(30));
        assert_eq!(c.reconnect.backoff_base, Duration::from_secs(1));
        assert_eq!(c.reconnect.backoff_cap, Duration::from_secs(300));
        assert_eq!(c.reconnect.reset_after, Duration::from_secs(60));
        assert_eq!(
            c.reconnect.takeover_limits(),
            crate::takeover::TakeoverLimits {
                limit: 3,
                window: Duration::from_secs(600),
                pause: Duration::from_secs(3600),
            }
        );
        assert_eq!(c.checkin.interval, Duration::from_secs(600));
        assert_eq!(c.state_dir, crate::platform::default_state_dir());
        assert_eq!(c.wakeup.replay_memory, 4096);
        assert_eq!(c.wake_topic(), "agents/laptop-42/wake");
        assert_eq!(c.ack_topic(), "agents/laptop-42/ack");
    }

    #[test]
    fn a_zero_takeover_pause_is_refused_unless_the_check_is_off() {
        let zero = MINIMAL.replace("[broker]", "[reconnect]\ntakeover_pause = \"0s\"\n[broker]");
        let err = AgentConfig::parse(&zero, Path::new("x.toml")).expect_err("zero pause");
        assert!(
            err.to_string().contains("reconnect.takeover_window"),
            "{err}"
        );
        let off = zero.replace("[reconnect]", "[reconnect]\ntakeover_limit = 0");
        AgentConfig::parse(&off, Path::new("x.toml")).expect("the check is off");
    }

    #[test]
    fn errors_name_file_and_key() {
        let bad = MINIMAL.replace("laptop-42", "a/b");
        let err = AgentConfig::parse(&bad, Path::new("x.toml")).expect_err("slash in id");
        let text = err.to_string();
        assert!(
            text.contains("x.toml") && text.contains("agent_id"),
            "{text}"
        );

        let no_keys = MINIMAL.replace(
            "console-2026 = \"6kpsY-KcUgq-9VB7Ey7F-ZVHdq6-vnuSQh7qaRRG0iw\"",
            "",
        );
        let err = AgentConfig::parse(&no_keys, Path::new("x.toml")).expect_err("no console key");
        assert!(err.to_string().contains("wakeup.console_keys"), "{err}");

        let unknown = MINIMAL.replace("[broker]", "colour = 1\n[broker]");
        let err = AgentConfig::parse(&unknown, Path::new("x.toml")).expect_err("unknown key");
        assert!(err.to_string().contains("colour"), "{err}");

        let empty_argv = format!("{MINIMAL}[actions.command]\nargv = []\n");
        let bad_tenant = MINIMAL.replace("tenant = \"acme\"", "tenant = \"Acme Corp\"");
        let err = AgentConfig::parse(&bad_tenant, Path::new("x.toml")).expect_err("bad tenant");
        assert!(err.to_string().contains("key `tenant`"), "{err}");
        let err = AgentConfig::parse(&empty_argv, Path::new("x.toml")).expect_err("empty argv");
        assert!(err.to_string().contains("actions.command.argv"), "{err}");

        let bad_duration = MINIMAL.replace(
            "host = \"push.example.com\"",
            "host = \"push.example.com\"\nkeepalive_direct = \"soon\"",
        );
        let err = AgentConfig::parse(&bad_duration, Path::new("x.toml")).expect_err("bad duration");
        assert!(err.to_string().contains("soon"), "{err}");
    }

    #[test]
    fn proxy_credentials_are_read_and_never_shown() {
        let with = |proxy: &str| {
            MINIMAL.replace(
                "host = \"push.example.com\"",
                &format!("host = \"push.example.com\"\nproxy = \"{proxy}\""),
            )
        };
        let c = AgentConfig::parse(&with("http://alice:s3cret@proxy:3128"), Path::new("x"))
            .expect("valid");
        let Some(crate::proxy::ProxySetting::Url(proxy)) = &c.broker.proxy else {
            panic!("a proxy address: {:?}", c.broker.proxy)
        };
        assert_eq!((proxy.host(), proxy.user()), ("proxy", Some("alice")));
        let debug = format!("{c:?}");
        assert!(
            debug.contains("alice") && !debug.contains("s3cret"),
            "{debug}"
        );
        let err = AgentConfig::parse(&with("http://alice:s3cret%zz@proxy:3128"), Path::new("x"))
            .expect_err("bad escape");
        let text = err.to_string();
        assert!(text.contains("key `broker.proxy`"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
        let c = AgentConfig::parse(&with("system"), Path::new("x")).expect("valid");
        assert_eq!(c.broker.proxy, Some(crate::proxy::ProxySetting::System));
    }

    #[test]
    fn durations_and_urls() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("1 fortnight"), None);
        let u = parse_http_url("http://127.0.0.1:8080/hook?x=1").expect("url");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/hook?x=1")
        );
        let u = parse_http_url("http://[::1]/").expect("v6");
        assert_eq!((u.host.as_str(), u.port), ("::1", 80));
        assert_eq!(parse_http_url("https://x/"), None);
        assert_eq!(parse_http_url("http://user@x/"), None);
        assert_eq!(parse_http_url("http://x:0/"), None);
    }
}
