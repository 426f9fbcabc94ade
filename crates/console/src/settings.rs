//! The settings an administrator changes on the Settings page, with their validation.

use std::net::IpAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Every setting, grouped as on the Settings page. Each group is stored under its own key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Wake-on-LAN.
    pub wol: WolSettings,
    /// Wake-up calls.
    pub wakeup: WakeUpSettings,
    /// How agents reach the broker.
    pub broker: BrokerSettings,
    /// The HTTP proxy agents use.
    pub proxy: ProxySettings,
    /// The agent registry.
    pub agents: AgentSettings,
}

/// The agent registry: when an agent counts as stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSettings {
    /// An agent not online and not seen (enrollment, check-in, presence change) for this many
    /// days is stale: listed on the dashboard and the Agents page for removal. Default 30,
    /// 1 to 3650.
    pub stale_after_days: u32,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            stale_after_days: 30,
        }
    }
}

impl AgentSettings {
    /// Agents last seen before this time (unix ms) are stale at `now`.
    pub fn stale_before(&self, now: i64) -> i64 {
        now - i64::from(self.stale_after_days) * 24 * 3600 * 1000
    }
}

/// Wake-on-LAN: where the magic packets go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WolSettings {
    /// Extra destinations besides each agent's subnet broadcast: broadcast or multicast
    /// addresses, IPv4 or IPv6 (e.g. `10.1.255.255`, `ff02::1`).
    pub addresses: Vec<IpAddr>,
    /// Also send to each agent's last known subnet broadcast (IPv4). Default true.
    pub subnet_broadcast: bool,
    /// UDP port. Default 9 (discard).
    pub port: u16,
    /// How many times each packet is sent (UDP may drop one). Default 3, 1 to 10.
    pub repeats: u8,
    /// SecureOn password, 4 or 6 bytes as hex with `:` or `-` separators; empty: none.
    pub secureon: String,
    /// Also ask an online agent on the same subnet to send the packets on its network
    /// (over the push channel). Default true.
    pub relay: bool,
}

impl Default for WolSettings {
    fn default() -> Self {
        Self {
            addresses: Vec::new(),
            subnet_broadcast: true,
            port: 9,
            repeats: 3,
            secureon: String::new(),
            relay: true,
        }
    }
}

/// Wake-up call defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WakeUpSettings {
    /// Expiry of a wake-up, seconds. Default 600 (10 minutes), 10 s to 7 days.
    pub default_expiry_secs: u32,
    /// Spread window of calls to many agents, seconds. Default 60.
    pub spread_secs: u32,
    /// Calls to at least this many agents get the spread window; smaller calls act at once.
    /// Default 50.
    pub spread_from_agents: u32,
}

impl Default for WakeUpSettings {
    fn default() -> Self {
        Self {
            default_expiry_secs: 600,
            spread_secs: 60,
            spread_from_agents: 50,
        }
    }
}

/// Broker endpoints given to agents at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSettings {
    /// `host:port` of each broker endpoint, preferred first (e.g. `push.example.com:8883`,
    /// `push.example.com:443`).
    pub endpoints: Vec<String>,
}

/// HTTP proxy policy for agents.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// `http://host:port` of the proxy agents try first, or `http://user:password@host:port`
    /// for a proxy that demands Basic authentication, or `system` for each agent's machine
    /// setting (WinHTTP on Windows, `https_proxy` on Unix); empty: none.
    pub url: String,
    /// When the proxy fails, agents connect directly (the seed's behaviour). Default true,
    /// also for a missing field or group (`default` above takes [`ProxySettings::default`]).
    pub direct_fallback: bool,
}

impl ProxySettings {
    /// The same policy with the password taken out of the address (for the audit log).
    pub fn without_password(&self) -> Self {
        Self {
            url: beckon_net::ProxyUrl::redact(&self.url),
            direct_fallback: self.direct_fallback,
        }
    }
}

/// The address may carry a password: shown without it.
impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = self.without_password();
        f.debug_struct("ProxySettings")
            .field("url", &shown.url)
            .field("direct_fallback", &self.direct_fallback)
            .finish()
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            direct_fallback: true,
        }
    }
}

/// A setting that does not pass validation: `field` says which, `reason` what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("setting {field}: {reason}")]
pub struct InvalidSetting {
    /// Dotted field name, e.g. `wol.port`.
    pub field: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

fn invalid(field: &str, reason: impl Into<String>) -> InvalidSetting {
    InvalidSetting {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Largest wake-up expiry: 7 days, the wake-up format's limit.
pub const MAX_EXPIRY_SECS: u32 = 7 * 24 * 3600;

impl Settings {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.wol.validate()?;
        let w = &self.wakeup;
        if !(10..=MAX_EXPIRY_SECS).contains(&w.default_expiry_secs) {
            return Err(invalid(
                "wakeup.default_expiry_secs",
                format!("must be 10 to {MAX_EXPIRY_SECS} seconds"),
            ));
        }
        if w.spread_secs > 24 * 3600 {
            return Err(invalid(
                "wakeup.spread_secs",
                "must be at most 86400 seconds (24 hours)",
            ));
        }
        if !(1..=3650).contains(&self.agents.stale_after_days) {
            return Err(invalid("agents.stale_after_days", "must be 1 to 3650 days"));
        }
        if self.broker.endpoints.len() > 16 {
            return Err(invalid("broker.endpoints", "at most 16 endpoints"));
        }
        for (i, e) in self.broker.endpoints.iter().enumerate() {
            parse_host_port(e)
                .map_err(|r| invalid(&format!("broker.endpoints[{i}]"), r.to_string()))?;
        }
        // `system`: agents use their machine's own proxy setting.
        if !self.proxy.url.is_empty() && self.proxy.url != beckon_net::SYSTEM_PROXY {
            if !self.proxy.url.starts_with("http://") {
                return Err(invalid(
                    "proxy.url",
                    "must start with http:// (agents speak HTTP CONNECT to the proxy)",
                ));
            }
            self.proxy
                .url
                .parse::<beckon_net::ProxyUrl>()
                .map_err(|e| invalid("proxy.url", e.to_string()))?;
        }
        Ok(())
    }
}

impl WolSettings {
    /// Checks the Wake-on-LAN fields.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.port == 0 {
            return Err(invalid("wol.port", "must be 1 to 65535 (usually 9 or 7)"));
        }
        if !(1..=10).contains(&self.repeats) {
            return Err(invalid("wol.repeats", "must be 1 to 10"));
        }
        if self.addresses.len() > 64 {
            return Err(invalid("wol.addresses", "at most 64 addresses"));
        }
        for (i, a) in self.addresses.iter().enumerate() {
            if a.is_unspecified() {
                return Err(invalid(
                    &format!("wol.addresses[{i}]"),
                    format!("{a} is not a destination: give a broadcast or multicast address"),
                ));
            }
        }
        crate::wol::parse_secureon(&self.secureon).map_err(|r| invalid("wol.secureon", r))?;
        Ok(())
    }
}

/// Why a `host:port` is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    /// No `:port` at the end.
    #[error("{0:?} is not host:port")]
    NoPort(String),
    /// The port is not a number from 1 to 65535.
    #[error("{0:?}: port must be 1 to 65535")]
    Port(String),
    /// The host is neither a DNS name nor an IP address.
    #[error("{text:?}: {host:?} is not a host name or IP address")]
    Host {
        /// The whole text.
        text: String,
        /// The host part.
        host: String,
    },
}

/// Checks `host:port` (host a DNS name, an IPv4 address or a bracketed IPv6 address).
pub fn parse_host_port(text: &str) -> Result<(String, u16), HostPortError> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| HostPortError::NoPort(text.to_owned()))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| HostPortError::Port(text.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ok_name = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    if !ok_name || (host.contains(':') && host.parse::<IpAddr>().is_err()) {
        return Err(HostPortError::Host {
            text: text.to_owned(),
            host: host.to_owned(),
        });
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_field() {
        Settings::default().validate().unwrap();
        assert!(Settings::default().proxy.direct_fallback);
        let mut s = Settings::default();
        s.wol.port = 0;
        assert_eq!(s.validate().unwrap_err().field, "wol.port");
        let mut s = Settings::default();
        s.wol.secureon = "aa:bb:cc".into();
        assert_eq!(s.validate().unwrap_err().field, "wol.secureon");
        let mut s = Settings::default();
        s.broker.endpoints = vec!["push.example.com:8883".into(), "nope".into()];
        assert_eq!(s.validate().unwrap_err().field, "broker.endpoints[1]");
        let mut s = Settings::default();
        s.proxy.url = "socks5://p:1080".into();
        assert_eq!(s.validate().unwrap_err().field, "proxy.url");
        let mut s = Settings::default();
        assert_eq!(s.agents.stale_after_days, 30);
        s.agents.stale_after_days = 0;
        assert_eq!(s.validate().unwrap_err().field, "agents.stale_after_days");
        let mut s = Settings::default();
        s.proxy.url = "socks5://p:1080".into();
        assert_eq!(s.validate().unwrap_err().field, "proxy.url");
        s.proxy.url = "http://proxy.example:3128".into();
        assert!(s.validate().is_ok());
        s.proxy.url = "system".into();
        assert!(s.validate().is_ok(), "each agent's own machine setting");
        s.proxy.url = "http://agents:p%40ss@proxy.example:3128".into();
        assert!(s.validate().is_ok());
        assert_eq!(
            s.proxy.without_password().url,
            "http://agents@proxy.example:3128"
        );
        assert!(!format!("{s:?}").contains("p%40ss"));
        s.proxy.url = "http://agents:p%4@proxy.example:3128".into();
        let err = s.validate().unwrap_err();
        assert_eq!(err.field, "proxy.url");
        assert!(!err.reason.contains("p%4"), "{err}");
        s.proxy.url = "http://proxy.example:3128".into();
        s.broker.endpoints = vec!["[::1]:8883".into(), "10.0.0.1:443".into()];
        s.validate().unwrap();
    }
}
