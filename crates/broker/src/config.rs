//! The broker's configuration: a TOML file where every key has a default, environment
//! overrides for the keys an operator changes most, and errors that name the file, the key
//! and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use beckon_mqtt::QoS;
use serde::{Deserialize, Deserializer};

use crate::core::CoreConfig;

mod cluster;
pub use cluster::ClusterConfig;

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or a key is unknown or has the wrong type.
    #[error("configuration file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message: line, column, key and reason.
        message: String,
    },
    /// An environment variable holds a value that does not fit its key.
    #[error("environment variable {var}={value:?}: {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why it does not fit.
        reason: String,
    },
    /// A value is out of range or keys contradict each other.
    #[error("configuration key {key}: {reason}")]
    Invalid {
        /// The key, in TOML dotted form.
        key: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },
}

/// A listening address, or off. Written in TOML as `"0.0.0.0:8883"` or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl Listen {
    /// Parses `"off"` (or an empty string) or a socket address.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("off") {
            return Ok(Self(None));
        }
        s.parse::<SocketAddr>().map(|a| Self(Some(a))).map_err(|_| {
            format!(
                "{s:?} is not an address: write IP:PORT (e.g. 0.0.0.0:8883 or [::]:8883) or \"off\""
            )
        })
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The whole broker configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Folder for generated certificates and (later) state. Default `./beckon-data`.
    pub data_dir: PathBuf,
    /// Accept clients without authentication (development and conformance tests only; logged
    /// loudly at start). Default false.
    pub allow_anonymous: bool,
    /// Folder of tenant files (`<tenant>.toml`, see docs/tenants.md). When set, every client
    /// authenticates as a tenant identity (client certificate from a tenant's CA, or a token
    /// as MQTT password) and lives in its tenant's topic namespace. Default: none (clients
    /// authenticate with certificates of the broker's own CA and see plain topics).
    pub tenants_dir: Option<PathBuf>,
    /// How often the tenant folder is checked for changes, in seconds. Default 5.
    pub tenants_reload_interval_secs: u64,
    /// Listening addresses.
    pub listeners: ListenersConfig,
    /// Certificates.
    pub tls: TlsConfig,
    /// Limits of the network layer and of the protocol core.
    pub limits: LimitsConfig,
    /// Cluster membership through NATS (`[cluster]`, see docs/cluster.md). Default: off, a
    /// single node.
    pub cluster: Option<ClusterConfig>,
    /// The consoles' revocation feeds the broker follows (`[[revocation_feed]]`, one per
    /// tenant, see docs/tenants.md). Default: none; revocations come from the tenant files.
    pub revocation_feed: Vec<RevocationFeedConfig>,
}

/// `[[revocation_feed]]`: the broker polls a tenant's console for the credentials of
/// removed agents (`GET /api/v1/revocations`), beside the tenant file's `[[revoked]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationFeedConfig {
    /// The tenant whose revocations the console lists (a tenant file of `tenants_dir`).
    pub tenant: String,
    /// The console's URL, e.g. `https://console.example.com:8443`.
    pub console: String,
    /// A file holding an API token of the console (role viewer is enough), read at each poll.
    pub token_file: PathBuf,
    /// The CA certificates (PEM) that signed the console's HTTPS certificate. Default: the
    /// system's trust store.
    pub ca: Option<PathBuf>,
    /// Seconds between polls when the feed has nothing more. Default 5: a removed agent is
    /// cut off within about that long (plus the request).
    #[serde(default = "default_feed_interval")]
    pub poll_interval_secs: u64,
}

fn default_feed_interval() -> u64 {
    5
}

impl RevocationFeedConfig {
    /// The feed's URL: the console's, with `/api/v1/revocations` after its path.
    pub fn feed_url(&self) -> Result<beckon_net::http::Url, String> {
        let console = beckon_net::http::Url::parse(&self.console)?;
        let base = console.path.trim_end_matches('/');
        if base.contains('?') {
            return Err(format!(
                "{:?}: give the console's address without a query",
                self.console
            ));
        }
        Ok(console.with_path(&format!("{base}/api/v1/revocations")))
    }
}

/// `[listeners]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenersConfig {
    /// MQTT over TLS. Default `0.0.0.0:8883`.
    pub mqtts: Listen,
    /// Plain MQTT (no encryption): for loopback and development only. Default off.
    pub mqtt: Listen,
    /// The HTTPS port shared by MQTT (ALPN `mqtt`), MQTT over WebSocket (`/mqtt`) and health
    /// endpoints; `0.0.0.0:443` in production, `127.0.0.1:8443` unprivileged. Default off.
    pub fallback: Listen,
    /// Plain HTTP admin listener: Prometheus `/metrics` and `/healthz`. Keep it on loopback
    /// or a management network. Default off.
    pub admin: Listen,
    /// Listeners (`"mqtts"`, `"fallback"`, `"mqtt"`) where every connection starts with a
    /// PROXY protocol header (v1 or v2) from a TCP load balancer; connections without one are
    /// closed. Default none.
    pub proxy_protocol: Vec<String>,
}

impl Default for ListenersConfig {
    fn default() -> Self {
        Self {
            mqtts: Listen(Some(SocketAddr::from(([0, 0, 0, 0], 8883)))),
            mqtt: Listen(None),
            fallback: Listen(None),
            admin: Listen(None),
            proxy_protocol: Vec::new(),
        }
    }
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Server certificate chain (PEM). Default: none, the broker then uses (and on first run
    /// creates) `server.pem` signed by its own CA in the data folder.
    pub cert: Option<PathBuf>,
    /// Private key of `cert` (PEM). Required with `cert`.
    pub key: Option<PathBuf>,
    /// CA (PEM) whose client certificates authenticate clients. Default: the broker's own CA
    /// (`ca.pem` in the data folder) when the broker generated its certificate; none otherwise.
    pub client_ca: Option<PathBuf>,
    /// Lowest TLS version accepted: "1.2" or "1.3". Default "1.2".
    pub min_version: String,
    /// How often certificate files are checked for changes, in seconds (0 = only on SIGHUP).
    /// Default 5.
    pub reload_interval_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            client_ca: None,
            min_version: "1.2".into(),
            reload_interval_secs: 5,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most simultaneous connections (including those still in TLS or CONNECT); beyond it a
    /// client gets CONNACK 0x89 Server busy (v3.1.1: return code 3). 0 = as many as the file
    /// descriptor limit allows. Default 0.
    pub max_connections: usize,
    /// Seconds a new connection has to finish TLS and send a whole CONNECT. Default 10.
    pub connect_timeout_secs: u64,
    /// Largest packet accepted, in bytes (announced to v5 clients). Default 1048576.
    pub max_packet_size: u32,
    /// Packets waiting to be written to one connection; beyond it QoS 0 messages are dropped and
    /// a QoS 1/2 message closes the connection as a slow consumer (answers to the client's own
    /// packets may go 8,192 further). Default 1000.
    pub max_outbound_packets: usize,
    /// Receive Maximum announced to v5 clients. Default 64.
    pub receive_maximum: u16,
    /// QoS 1/2 messages in flight towards one client. Default 32.
    pub max_inflight: u16,
    /// Messages queued per session while offline or while its window is full. Default 1000.
    pub max_queued_messages: usize,
    /// Receive Maximum announced to server identities (consoles), which publish one wake-up
    /// per agent of a call. Default 1024.
    pub server_receive_maximum: u16,
    /// QoS 1/2 messages in flight towards a server identity, which receives the acks and
    /// presence of a whole fleet. Default 1024.
    pub server_max_inflight: u16,
    /// Messages queued for a server identity's session while it is away or busy: size it to
    /// three acks per agent. Default 200000.
    pub server_max_queued_messages: usize,
    /// Longest session expiry a client may ask for, in seconds. Default 604800 (7 days).
    pub max_session_expiry_secs: u32,
    /// Topic aliases accepted from each v5 client (0 = off). Default 64.
    pub topic_alias_maximum: u16,
    /// Caps the clients' keep alive, in seconds (Server Keep Alive); 0 = no cap. Default 0.
    pub max_keep_alive_secs: u16,
    /// Whether retained messages are supported. Default true.
    pub retain_available: bool,
    /// Highest QoS granted: 0, 1 or 2. Default 2.
    pub max_qos: u8,
    /// New connections per second across the broker (token bucket); beyond it a client gets
    /// CONNACK 0x9F Connection rate exceeded (v3.1.1: return code 3). 0 = no limit. Default 0.
    pub connect_rate: u32,
    /// Connections accepted at once above `connect_rate` (0 = one second's worth). Default 0.
    pub connect_burst: u32,
    /// New connections per second from one source address (0 = no limit). Default 0: agents
    /// behind one NAT share an address.
    pub connect_rate_per_address: u32,
    /// Burst of `connect_rate_per_address` (0 = one second's worth). Default 0.
    pub connect_burst_per_address: u32,
    /// Topic filters one client's session may hold; further filters are refused in the
    /// SUBACK (0x97 Quota exceeded, v3.1.1: 0x80). Default 1000.
    pub max_subscriptions: usize,
    /// Retained messages one tenant may store (without tenants: the whole broker); a retained
    /// publish beyond it is refused. Default 10000.
    pub max_retained_messages: usize,
    /// Bytes (topic and payload) of the retained messages one tenant may store (without
    /// tenants: the whole broker). Default 67108864 (64 MiB).
    pub max_retained_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let core = CoreConfig::default();
        Self {
            max_connections: 0,
            connect_timeout_secs: 10,
            max_packet_size: core.max_packet_size,
            max_outbound_packets: 1000,
            receive_maximum: core.receive_maximum,
            max_inflight: core.max_inflight,
            max_queued_messages: core.max_queued_messages,
            server_receive_maximum: core.server_receive_maximum,
            server_max_inflight: core.server_max_inflight,
            server_max_queued_messages: core.server_max_queued_messages,
            max_session_expiry_secs: core.max_session_expiry,
            topic_alias_maximum: core.topic_alias_maximum,
            max_keep_alive_secs: core.max_keep_alive.unwrap_or(0),
            retain_available: core.retain_available,
            max_qos: core.max_qos as u8,
            connect_rate: 0,
            connect_burst: 0,
            connect_rate_per_address: 0,
            connect_burst_per_address: 0,
            max_subscriptions: core.max_subscriptions,
            max_retained_messages: core.max_retained_messages,
            max_retained_bytes: core.max_retained_bytes,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./beckon-data"),
            allow_anonymous: false,
            tenants_dir: None,
            tenants_reload_interval_secs: 5,
            listeners: ListenersConfig::default(),
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            cluster: None,
            revocation_feed: Vec::new(),
        }
    }
}

/// The environment variables read by [`BrokerConfig::apply_env`], with their keys.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("BECKON_DATA_DIR", "data_dir"),
    ("BECKON_ALLOW_ANONYMOUS", "allow_anonymous"),
    ("BECKON_TENANTS_DIR", "tenants_dir"),
    ("BECKON_MQTTS", "listeners.mqtts"),
    ("BECKON_MQTT", "listeners.mqtt"),
    ("BECKON_FALLBACK", "listeners.fallback"),
    ("BECKON_ADMIN", "listeners.admin"),
    ("BECKON_TLS_CERT", "tls.cert"),
    ("BECKON_TLS_KEY", "tls.key"),
    ("BECKON_TLS_CLIENT_CA", "tls.client_ca"),
    ("BECKON_TLS_MIN_VERSION", "tls.min_version"),
    ("BECKON_MAX_CONNECTIONS", "limits.max_connections"),
    ("BECKON_CONNECT_TIMEOUT_SECS", "limits.connect_timeout_secs"),
    ("BECKON_MAX_PACKET_SIZE", "limits.max_packet_size"),
];

impl BrokerConfig {
    /// Reads a TOML file; missing keys take their defaults, unknown keys are errors.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text (the error is the parser's message with line and key).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Applies the `BECKON_...` overrides of [`ENV_OVERRIDES`] read through `var` (pass
    /// `|k| std::env::var(k).ok()` for the process environment).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &'static str, value: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.trim().parse::<T>().map_err(|e| ConfigError::Env {
                var,
                value: value.to_owned(),
                reason: e.to_string(),
            })
        }
        for &(name, _) in ENV_OVERRIDES {
            let Some(value) = var(name) else { continue };
            match name {
                "BECKON_DATA_DIR" => self.data_dir = PathBuf::from(value),
                "BECKON_ALLOW_ANONYMOUS" => {
                    self.allow_anonymous = match value.trim().to_ascii_lowercase().as_str() {
                        "1" | "true" | "yes" | "on" => true,
                        "0" | "false" | "no" | "off" | "" => false,
                        _ => {
                            return Err(ConfigError::Env {
                                var: name,
                                value,
                                reason: "expected true or false".into(),
                            });
                        }
                    }
                }
                "BECKON_MQTTS" | "BECKON_MQTT" | "BECKON_FALLBACK" | "BECKON_ADMIN" => {
                    let listen = Listen::parse(&value).map_err(|reason| ConfigError::Env {
                        var: name,
                        value: value.clone(),
                        reason,
                    })?;
                    match name {
                        "BECKON_MQTTS" => self.listeners.mqtts = listen,
                        "BECKON_FALLBACK" => self.listeners.fallback = listen,
                        "BECKON_ADMIN" => self.listeners.admin = listen,
                        _ => self.listeners.mqtt = listen,
                    }
                }
                "BECKON_TENANTS_DIR" => self.tenants_dir = Some(PathBuf::from(value)),
                "BECKON_TLS_CERT" => self.tls.cert = Some(PathBuf::from(value)),
                "BECKON_TLS_KEY" => self.tls.key = Some(PathBuf::from(value)),
                "BECKON_TLS_CLIENT_CA" => self.tls.client_ca = Some(PathBuf::from(value)),
                "BECKON_TLS_MIN_VERSION" => self.tls.min_version = value,
                "BECKON_MAX_CONNECTIONS" => self.limits.max_connections = parse(name, &value)?,
                "BECKON_CONNECT_TIMEOUT_SECS" => {
                    self.limits.connect_timeout_secs = parse(name, &value)?;
                }
                "BECKON_MAX_PACKET_SIZE" => self.limits.max_packet_size = parse(name, &value)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Checks ranges and combinations; call after file, environment and flags are applied.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if let Some(cluster) = &self.cluster {
            if cluster.nats.is_empty() {
                return invalid(
                    "cluster.nats",
                    "a cluster needs at least one NATS server URL, e.g. nats = [\"nats://127.0.0.1:4222\"]; remove [cluster] for a single node",
                );
            }
            let token_ok = |t: &str| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            };
            if !token_ok(&cluster.node) || cluster.node.len() > 200 {
                return invalid(
                    "cluster.node",
                    "a node name is 1 to 200 letters, digits, '-' or '_', unique in the cluster",
                );
            }
            if !token_ok(&cluster.name) {
                return invalid(
                    "cluster.name",
                    "the cluster name is letters, digits, '-' or '_' (it starts every NATS subject)",
                );
            }
            if cluster.heartbeat_ms == 0 || cluster.node_timeout_ms < 2 * cluster.heartbeat_ms {
                return invalid(
                    "cluster.node_timeout_ms",
                    "must be at least twice cluster.heartbeat_ms (which must not be 0), or nodes are declared gone between two heartbeats",
                );
            }
            cluster.security()?;
        }
        self.validate_revocation_feeds()?;
        if self.listeners.mqtts.0.is_none()
            && self.listeners.mqtt.0.is_none()
            && self.listeners.fallback.0.is_none()
        {
            return invalid(
                "listeners",
                "every MQTT listener is off: set listeners.mqtts (e.g. \"0.0.0.0:8883\")",
            );
        }
        if let Some(bad) = self
            .listeners
            .proxy_protocol
            .iter()
            .find(|n| !matches!(n.as_str(), "mqtts" | "fallback" | "mqtt"))
        {
            return Err(ConfigError::Invalid {
                key: "listeners.proxy_protocol",
                reason: format!(
                    "unknown listener {bad:?}: expected \"mqtts\", \"fallback\" or \"mqtt\""
                ),
            });
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return invalid(
                "tls.cert",
                "tls.cert and tls.key go together: set both, or neither to use the generated certificate",
            );
        }
        if self.min_tls_version().is_none() {
            return invalid("tls.min_version", "expected \"1.2\" or \"1.3\"");
        }
        let l = &self.limits;
        if l.connect_timeout_secs == 0 {
            return invalid("limits.connect_timeout_secs", "must be at least 1");
        }
        if l.max_packet_size < 64 {
            return invalid(
                "limits.max_packet_size",
                "must be at least 64 bytes (a CONNECT must fit)",
            );
        }
        if l.max_outbound_packets == 0 {
            return invalid("limits.max_outbound_packets", "must be at least 1");
        }
        if l.server_receive_maximum == 0 {
            return invalid("limits.server_receive_maximum", "must be at least 1");
        }
        if l.receive_maximum == 0 {
            return invalid("limits.receive_maximum", "must be at least 1");
        }
        if l.max_inflight == 0 {
            return invalid("limits.max_inflight", "must be at least 1");
        }
        if QoS::from_u8(l.max_qos).is_none() {
            return invalid("limits.max_qos", "must be 0, 1 or 2");
        }
        if l.max_subscriptions == 0 {
            return invalid("limits.max_subscriptions", "must be at least 1");
        }
        if l.max_retained_messages == 0 || l.max_retained_bytes == 0 {
            return invalid(
                "limits.max_retained_messages",
                "limits.max_retained_messages and limits.max_retained_bytes must be at least 1; to turn retained messages off, set limits.retain_available = false",
            );
        }
        Ok(())
    }

    fn validate_revocation_feeds(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if !self.revocation_feed.is_empty() && self.tenants_dir.is_none() {
            return invalid(
                "revocation_feed",
                "a revocation feed belongs to a tenant: set tenants_dir too".into(),
            );
        }
        let mut tenants = std::collections::BTreeSet::new();
        for (i, feed) in self.revocation_feed.iter().enumerate() {
            if let Err(e) = beckon_identity::TenantId::new(feed.tenant.clone()) {
                return invalid(
                    "revocation_feed.tenant",
                    format!("revocation_feed[{i}]: {e}"),
                );
            }
            if !tenants.insert(feed.tenant.as_str()) {
                return invalid(
                    "revocation_feed.tenant",
                    format!(
                        "revocation_feed[{i}]: tenant {:?} has a feed already; one console feed per tenant",
                        feed.tenant
                    ),
                );
            }
            let url = feed.feed_url().map_err(|e| ConfigError::Invalid {
                key: "revocation_feed.console",
                reason: format!("revocation_feed[{i}]: {e}"),
            })?;
            if url.scheme == beckon_net::http::Scheme::Http
                && !beckon_cluster::security::is_loopback(&feed.console)
            {
                return invalid(
                    "revocation_feed.console",
                    format!(
                        "revocation_feed[{i}]: {} is not on this machine and not https://: the API token would cross the network in clear text",
                        feed.console
                    ),
                );
            }
            if !(1..=3600).contains(&feed.poll_interval_secs) {
                return invalid(
                    "revocation_feed.poll_interval_secs",
                    format!("revocation_feed[{i}]: must be 1 to 3600 seconds"),
                );
            }
        }
        Ok(())
    }

    /// The lowest TLS version from `tls.min_version`.
    pub fn min_tls_version(&self) -> Option<beckon_pki::TlsVersion> {
        match self.tls.min_version.trim() {
            "1.2" => Some(beckon_pki::TlsVersion::Tls12),
            "1.3" => Some(beckon_pki::TlsVersion::Tls13),
            _ => None,
        }
    }

    /// The protocol core's share of the limits.
    pub fn core_config(&self) -> CoreConfig {
        let l = &self.limits;
        CoreConfig {
            max_packet_size: l.max_packet_size,
            receive_maximum: l.receive_maximum,
            max_inflight: l.max_inflight,
            max_queued_messages: l.max_queued_messages,
            server_receive_maximum: l.server_receive_maximum,
            server_max_inflight: l.server_max_inflight,
            server_max_queued_messages: l.server_max_queued_messages,
            max_session_expiry: l.max_session_expiry_secs,
            topic_alias_maximum: l.topic_alias_maximum,
            max_keep_alive: (l.max_keep_alive_secs != 0).then_some(l.max_keep_alive_secs),
            retain_available: l.retain_available,
            max_qos: QoS::from_u8(l.max_qos).unwrap_or(QoS::ExactlyOnce),
            max_subscriptions: l.max_subscriptions,
            max_retained_messages: l.max_retained_messages,
            max_retained_bytes: l.max_retained_bytes,
            tenant_namespaces: self.tenants_dir.is_some(),
        }
    }

    /// `limits.connect_timeout_secs` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.connect_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = BrokerConfig::from_toml("").expect("empty");
        assert_eq!(
            c.listeners.mqtts.0,
            Some("0.0.0.0:8883".parse().expect("addr"))
        );
        assert_eq!(c.listeners.mqtt.0, None);
        assert_eq!(c.limits.connect_timeout_secs, 10);
        assert_eq!(c.data_dir, PathBuf::from("./beckon-data"));
        assert!(!c.allow_anonymous);
        c.validate().expect("defaults are valid");
    }

    #[test]
    fn a_revocation_feed_is_read_and_checked() {
        let feed = |extra: &str, console: &str| {
            BrokerConfig::from_toml(&format!(
                "tenants_dir = \"tenants\"\n[[revocation_feed]]\ntenant = \"acme\"\nconsole = \"{console}\"\ntoken_file = \"token\"\n{extra}"
            ))
            .expect("parses")
        };
        let c = feed("", "https://console.example.com:8080/");
        c.validate().expect("valid");
        let f = &c.revocation_feed[0];
        assert_eq!(f.poll_interval_secs, 5);
        assert_eq!(
            f.feed_url().expect("url").to_string(),
            "https://console.example.com:8080/api/v1/revocations"
        );
        feed("", "http://127.0.0.1:8080")
            .validate()
            .expect("loopback may be plain");
        for (c, want) in [
            (feed("", "http://console.example.com"), "clear text"),
            (feed("", "ftp://console"), "http"),
            (feed("poll_interval_secs = 0", "https://c"), "1 to 3600"),
            (
                feed(
                    "[[revocation_feed]]\ntenant = \"acme\"\nconsole = \"https://c\"\ntoken_file = \"t\"",
                    "https://c",
                ),
                "one console feed per tenant",
            ),
            (
                BrokerConfig {
                    tenants_dir: None,
                    ..feed("", "https://c")
                },
                "tenants_dir",
            ),
        ] {
            let e = c.validate().expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!(
            BrokerConfig::from_toml("[[revocation_feed]]\ntenant = \"a\"\nconsole = \"https://c\"\ntoken_file = \"t\"\ntoken = \"x\"")
                .is_err(),
            "unknown keys are errors"
        );
    }

    #[test]
    fn keys_are_read() {
        let c = BrokerConfig::from_toml(
            r#"
            data_dir = "/var/lib/beckon"
            allow_anonymous = true
            [listeners]
            mqtts = "off"
            mqtt = "127.0.0.1:1883"
            [tls]
            min_version = "1.3"
            [limits]
            max_connections = 5
            max_qos = 1
            max_subscriptions = 50
            max_retained_messages = 20
            max_retained_bytes = 4096
            "#,
        )
        .expect("parse");
        assert_eq!(c.listeners.mqtts.0, None);
        assert_eq!(
            c.listeners.mqtt.0,
            Some("127.0.0.1:1883".parse().expect("addr"))
        );
        assert_eq!(c.limits.max_connections, 5);
        assert_eq!(c.core_config().max_qos, QoS::AtLeastOnce);
        let core = c.core_config();
        assert_eq!(
            (
                core.max_subscriptions,
                core.max_retained_messages,
                core.max_retained_bytes,
                core.tenant_namespaces
            ),
            (50, 20, 4096, false)
        );
        assert_eq!(c.min_tls_version(), Some(beckon_pki::TlsVersion::Tls13));
        c.validate().expect("valid");
    }

    #[test]
    fn unknown_key_and_bad_value_are_named() {
        let err = BrokerConfig::from_toml("[limits]\nmax_conections = 5\n").expect_err("unknown");
        assert!(err.contains("max_conections"), "{err}");
        let err = BrokerConfig::from_toml("[listeners]\nmqtts = \"8883\"\n").expect_err("bad addr");
        assert!(err.contains("mqtts") || err.contains("IP:PORT"), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, "allow_anonymous = \"maybe\"\n").expect("write");
        let err = BrokerConfig::from_file(&path)
            .expect_err("bad type")
            .to_string();
        assert!(
            err.contains("broker.toml") && err.contains("allow_anonymous"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c = BrokerConfig::from_toml("[limits]\nmax_connections = 5\n").expect("parse");
        let env = |k: &str| match k {
            "BECKON_MAX_CONNECTIONS" => Some("7".to_owned()),
            "BECKON_MQTT" => Some("127.0.0.1:0".to_owned()),
            "BECKON_ALLOW_ANONYMOUS" => Some("true".to_owned()),
            _ => None,
        };
        c.apply_env(env).expect("env");
        assert_eq!(c.limits.max_connections, 7);
        assert!(c.allow_anonymous);
        assert_eq!(
            c.listeners.mqtt.0,
            Some("127.0.0.1:0".parse().expect("addr"))
        );
        let err = c
            .apply_env(|k| (k == "BECKON_MAX_PACKET_SIZE").then(|| "big".to_owned()))
            .expect_err("bad number")
            .to_string();
        assert!(err.contains("BECKON_MAX_PACKET_SIZE"), "{err}");
    }

    #[test]
    fn contradictions_are_refused() {
        let mut c = BrokerConfig::default();
        c.tls.cert = Some("a.pem".into());
        let err = c.validate().expect_err("cert without key").to_string();
        assert!(err.contains("tls.cert"), "{err}");
        let mut c = BrokerConfig::default();
        c.listeners.mqtts = Listen(None);
        assert!(c.validate().is_err());
        let mut c = BrokerConfig::default();
        c.limits.max_retained_bytes = 0;
        let err = c.validate().expect_err("no room to retain").to_string();
        assert!(err.contains("retain_available"), "{err}");
    }

    #[test]
    fn push_service_keys_are_read_and_checked() {
        let c = BrokerConfig::from_toml(
            "tenants_dir = \"/etc/beckon/tenants\"\ntenants_reload_interval_secs = 2\n[listeners]\nfallback = \"127.0.0.1:8443\"\nadmin = \"127.0.0.1:9883\"\nproxy_protocol = [\"fallback\"]\n[limits]\nconnect_rate = 100\nconnect_burst_per_address = 3\n",
        )
        .expect("parse");
        assert_eq!(c.tenants_dir, Some(PathBuf::from("/etc/beckon/tenants")));
        assert_eq!(c.tenants_reload_interval_secs, 2);
        assert_eq!(
            c.listeners.fallback.0,
            Some("127.0.0.1:8443".parse().expect("addr"))
        );
        assert_eq!(
            c.listeners.admin.0,
            Some("127.0.0.1:9883".parse().expect("addr"))
        );
        assert_eq!(c.limits.connect_rate, 100);
        assert_eq!(c.limits.connect_burst_per_address, 3);
        assert!(c.validate().is_ok());

        let mut bad = c.clone();
        bad.listeners.proxy_protocol = vec!["https".into()];
        let err = bad.validate().expect_err("unknown listener").to_string();
        assert!(
            err.contains("proxy_protocol") && err.contains("https"),
            "{err}"
        );

        // The shared port alone is enough to serve MQTT.
        let mut only_fallback = BrokerConfig::default();
        only_fallback.listeners.mqtts = Listen(None);
        only_fallback.listeners.fallback = Listen(Some("127.0.0.1:8443".parse().expect("addr")));
        assert!(only_fallback.validate().is_ok());

        let mut env = BrokerConfig::default();
        env.apply_env(|k| match k {
            "BECKON_TENANTS_DIR" => Some("tenants".to_owned()),
            "BECKON_FALLBACK" => Some("127.0.0.1:8443".to_owned()),
            "BECKON_ADMIN" => Some("off".to_owned()),
            _ => None,
        })
        .expect("env");
        assert_eq!(env.tenants_dir, Some(PathBuf::from("tenants")));
        assert_eq!(
            env.listeners.fallback.0,
            Some("127.0.0.1:8443".parse().expect("addr"))
        );
        assert_eq!(env.listeners.admin.0, None);
    }
}
