//! Which HTTP proxy the connection ladder tries first: the one `broker.proxy` names, or with
//! `broker.proxy = "system"` the operating system's setting, read again at each ladder start
//! (it may change while the agent runs). On Windows that is the machine's WinHTTP default
//! proxy (what `netsh winhttp set proxy` writes, the one a LocalSystem service sees); on Unix
//! the `https_proxy` / `all_proxy` and `no_proxy` environment variables, read as curl reads
//! them. The platform modules read the raw setting; this module turns it into an address.

use std::fmt;
use std::net::IpAddr;

use beckon_net::ProxyUrl;

/// The `broker.proxy` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxySetting {
    /// This proxy.
    Url(ProxyUrl),
    /// The operating system's proxy setting (`"system"`).
    System,
}

impl std::str::FromStr for ProxySetting {
    type Err = beckon_net::ProxyUrlError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.trim().eq_ignore_ascii_case(beckon_net::SYSTEM_PROXY) {
            Ok(Self::System)
        } else {
            text.parse().map(Self::Url)
        }
    }
}

/// The proxy a ladder start uses and where it came from, for logs, `beckon agent status`
/// and the doctor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundProxy {
    /// The proxy to try first; `None`: connect directly.
    pub proxy: Option<ProxyUrl>,
    /// Where it came from, or why there is none, in plain words.
    pub source: String,
}

impl FoundProxy {
    fn none(source: impl Into<String>) -> Self {
        Self {
            proxy: None,
            source: source.into(),
        }
    }

    fn found(proxy: ProxyUrl, source: impl Into<String>) -> Self {
        Self {
            proxy: Some(proxy),
            source: source.into(),
        }
    }
}

/// `http://proxy:3128 (system proxy: WinHTTP default proxy)`, `none (no broker.proxy set)`.
impl fmt::Display for FoundProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.proxy {
            Some(proxy) => write!(f, "{proxy} ({})", self.source),
            None => write!(f, "none ({})", self.source),
        }
    }
}

/// The proxy for connections to `broker_host` under `setting`; the system setting is read
/// now.
pub fn find(setting: Option<&ProxySetting>, broker_host: &str) -> FoundProxy {
    match setting {
        None => FoundProxy::none("no broker.proxy set"),
        Some(ProxySetting::Url(proxy)) => FoundProxy::found(proxy.clone(), "broker.proxy"),
        Some(ProxySetting::System) => crate::platform::system_proxy(broker_host),
    }
}

/// The WinHTTP default proxy: `named` when its access type is "named proxy", `list` its
/// proxy list (`host:port`, or per scheme `http=host:port;https=host2:port`, entries split by
/// `;` or white space) and `bypass` its bypass list. The tunnel carries TLS, so the `https`
/// entry counts, else one without a scheme, as WinHTTP picks for an `https://` request. A
/// port left out is 80, as in WinHTTP.
pub fn from_winhttp(named: bool, list: &str, bypass: &str, broker_host: &str) -> FoundProxy {
    const SOURCE: &str = "system proxy: WinHTTP default proxy";
    if !named || list.trim().is_empty() {
        return FoundProxy::none(
            "system proxy: WinHTTP is set to direct access (netsh winhttp show proxy)",
        );
    }
    let entries: Vec<(Option<&str>, &str)> = list
        .split(|c: char| c == ';' || c.is_whitespace())
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once('=') {
            Some((scheme, address)) => (Some(scheme), address),
            None => (None, e),
        })
        .collect();
    let chosen = entries
        .iter()
        .find(|(scheme, _)| scheme.is_some_and(|s| s.eq_ignore_ascii_case("https")))
        .or_else(|| entries.iter().find(|(scheme, _)| scheme.is_none()));
    let Some((_, address)) = chosen else {
        return FoundProxy::none(format!(
            "system proxy: the WinHTTP proxy list {list:?} has no entry for https"
        ));
    };
    if bypass_matches(bypass, broker_host) {
        return FoundProxy::none(format!(
            "system proxy: the WinHTTP bypass list holds {broker_host}"
        ));
    }
    match with_default_port(address, 80).parse::<ProxyUrl>() {
        Ok(proxy) => FoundProxy::found(proxy, SOURCE),
        Err(e) => FoundProxy::none(format!(
            "system proxy: the WinHTTP proxy cannot be used, so none: {e}"
        )),
    }
}

/// Whether WinHTTP's bypass list names `host`: `<local>` stands for names without a dot,
/// `*` for any run of characters (`*.corp.example`, `10.*`); case does not matter.
pub fn bypass_matches(bypass: &str, host: &str) -> bool {
    let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
    bypass
        .split(|c: char| c == ';' || c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry.eq_ignore_ascii_case("<local>") {
                !host.contains('.') && !host.contains(':')
            } else {
                wildcard_match(&entry.to_ascii_lowercase(), &host)
            }
        })
}

/// `pattern` with `*` for any run of characters, matched against the whole of `text`.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The environment's proxy for a TLS connection, as curl reads it: `https_proxy` (or
/// `HTTPS_PROXY`), else `all_proxy` (or `ALL_PROXY`); none when `no_proxy` (or `NO_PROXY`)
/// names the host. An address without a scheme is `http://`, one without a port uses 1080,
/// as in curl. `var` reads one variable.
pub fn from_env(var: impl Fn(&str) -> Option<String>, broker_host: &str) -> FoundProxy {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    let Some((name, value)) = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
        .into_iter()
        .find_map(|name| set(name).map(|v| (name, v)))
    else {
        return FoundProxy::none("system proxy: no https_proxy or all_proxy in the environment");
    };
    let no_proxy = set("no_proxy")
        .or_else(|| set("NO_PROXY"))
        .unwrap_or_default();
    if no_proxy_matches(&no_proxy, broker_host) {
        return FoundProxy::none(format!("system proxy: no_proxy holds {broker_host}"));
    }
    match with_default_port(&value, 1080).parse::<ProxyUrl>() {
        Ok(proxy) => FoundProxy::found(
            proxy,
            format!("system proxy: the environment variable {name}"),
        ),
        Err(e) => FoundProxy::none(format!("system proxy: {name} cannot be used, so none: {e}")),
    }
}

/// Whether curl's `no_proxy` list names `host`: `*` for every host, a name for itself and
/// its subdomains (a leading dot changes nothing), an address for itself, `address/bits`
/// for a network.
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
    let host = host.trim_end_matches('.');
    let ip = host.parse::<IpAddr>().ok();
    no_proxy
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
        .any(|entry| {
            let entry = entry.trim_matches(['[', ']']).to_ascii_lowercase();
            if entry == "*" {
                return true;
            }
            if let (Some(ip), Some((network, bits))) = (ip, entry.split_once('/')) {
                return in_network(ip, network, bits);
            }
            let entry = entry.trim_start_matches('.').trim_end_matches('.');
            !entry.is_empty()
                && (host == entry
                    || (ip.is_none()
                        && host.len() > entry.len()
                        && host.ends_with(entry)
                        && host[..host.len() - entry.len()].ends_with('.')))
        })
}

/// Whether `ip` lies in `network/bits`.
fn in_network(ip: IpAddr, network: &str, bits: &str) -> bool {
    let (Ok(network), Ok(bits)) = (network.parse::<IpAddr>(), bits.parse::<u32>()) else {
        return false;
    };
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// `address` with `:port` added when it names none (`host`, `http://host`, `[v6]`).
fn with_default_port(address: &str, port: u16) -> String {
    let address = address.trim();
    let address = address.strip_suffix('/').unwrap_or(address);
    let authority = address.split_once("://").map_or(address, |(_, rest)| rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let has_port = match host_port.strip_prefix('[') {
        Some(v6) => v6
            .split_once(']')
            .is_some_and(|(_, after)| after.starts_with(':')),
        None => host_port.contains(':'),
    };
    if has_port || host_port.is_empty() {
        address.to_owned()
    } else {
        format!("{address}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn winhttp(list: &str, bypass: &str, host: &str) -> FoundProxy {
        from_winhttp(true, list, bypass, host)
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_setting_is_system_or_an_address() {
        assert_eq!("system".parse(), Ok(ProxySetting::System));
        assert_eq!(" System ".parse(), Ok(ProxySetting::System));
        assert_eq!(
            "http://p.example:3128".parse(),
            Ok(ProxySetting::Url(ProxyUrl::new("p.example", 3128)))
        );
        assert!("systems".parse::<ProxySetting>().is_err());
    }

    #[test]
    fn a_configured_proxy_or_none_says_where_it_came_from() {
        let proxy = ProxySetting::Url(ProxyUrl::new("p.example", 3128));
        assert_eq!(
            find(Some(&proxy), "b.example").to_string(),
            "http://p.example:3128 (broker.proxy)"
        );
        assert_eq!(
            find(None, "b.example").to_string(),
            "none (no broker.proxy set)"
        );
    }

    #[test]
    fn winhttp_proxy_lists() {
        let found = winhttp("proxy.corp:8080", "", "push.example");
        assert_eq!(found.proxy, Some(ProxyUrl::new("proxy.corp", 8080)));
        assert_eq!(
            found.to_string(),
            "http://proxy.corp:8080 (system proxy: WinHTTP default proxy)"
        );
        // Per scheme: the https entry, wherever it stands.
        let found = winhttp("http=web.corp:80;https=tls.corp:8443", "", "push.example");
        assert_eq!(found.proxy, Some(ProxyUrl::new("tls.corp", 8443)));
        let found = winhttp("https=tls.corp:8443 http=web.corp:80", "", "push.example");
        assert_eq!(found.proxy, Some(ProxyUrl::new("tls.corp", 8443)));
        // A scheme prefix on the address, and no port: 80.
        let found = winhttp("http://proxy.corp", "", "push.example");
        assert_eq!(found.proxy, Some(ProxyUrl::new("proxy.corp", 80)));
        let found = winhttp("[fd00::1]:3128", "", "push.example");
        assert_eq!(found.proxy, Some(ProxyUrl::new("fd00::1", 3128)));
        // Only a plain-HTTP entry: nothing for a TLS connection.
        let found = winhttp("http=web.corp:80", "", "push.example");
        assert_eq!(found.proxy, None);
        assert!(found.source.contains("no entry for https"), "{found}");
        // Direct access, or an empty list.
        let found = from_winhttp(false, "", "", "push.example");
        assert_eq!(found.proxy, None);
        assert!(found.source.contains("direct access"), "{found}");
        assert_eq!(from_winhttp(true, " ", "", "push.example").proxy, None);
        // An address that cannot be used is reported, and the agent goes direct.
        let found = winhttp("https=proxy.corp:99999", "", "push.example");
        assert_eq!(found.proxy, None);
        assert!(found.source.contains("port"), "{found}");
    }

    #[test]
    fn winhttp_bypass_lists() {
        for (bypass, host, bypassed) in [
            ("<local>", "push", true),
            ("<local>", "push.example", false),
            ("*.example", "push.example", true),
            ("*.EXAMPLE", "Push.Example", true),
            ("*.example", "example", false),
            ("10.*", "10.1.2.3", true),
            ("10.*", "110.1.2.3", false),
            ("push.example", "push.example", true),
            ("push.example", "push.example.org", false),
            ("intranet;<local> *.corp.example", "b.corp.example", true),
            ("*push*", "my-push-host", true),
            ("", "push.example", false),
        ] {
            assert_eq!(
                bypass_matches(bypass, host),
                bypassed,
                "{bypass:?} for {host}"
            );
        }
        let found = winhttp("proxy.corp:8080", "<local>;*.example", "push.example");
        assert_eq!(found.proxy, None);
        assert_eq!(
            found.to_string(),
            "none (system proxy: the WinHTTP bypass list holds push.example)"
        );
    }

    #[test]
    fn environment_variables_as_curl_reads_them() {
        let found = from_env(
            env(&[("https_proxy", "http://p.example:3128")]),
            "push.example",
        );
        assert_eq!(found.proxy, Some(ProxyUrl::new("p.example", 3128)));
        assert_eq!(
            found.to_string(),
            "http://p.example:3128 (system proxy: the environment variable https_proxy)"
        );
        // Lower case first, then upper case, then all_proxy; no scheme is http, no port 1080.
        let found = from_env(
            env(&[("HTTPS_PROXY", "upper:1"), ("https_proxy", "lower:2")]),
            "push.example",
        );
        assert_eq!(found.proxy, Some(ProxyUrl::new("lower", 2)));
        let found = from_env(env(&[("ALL_PROXY", "all.example")]), "push.example");
        assert_eq!(found.proxy, Some(ProxyUrl::new("all.example", 1080)));
        // http_proxy is for plain HTTP, not for the broker's TLS.
        let found = from_env(env(&[("http_proxy", "web:80")]), "push.example");
        assert_eq!(found.proxy, None);
        assert!(found.source.contains("no https_proxy"), "{found}");
        // Credentials are used and never shown.
        let found = from_env(
            env(&[("https_proxy", "http://agent:s3cret@p.example:3128/")]),
            "push.example",
        );
        assert_eq!(found.proxy.as_ref().and_then(ProxyUrl::user), Some("agent"));
        assert!(!found.to_string().contains("s3cret"), "{found}");
        // A proxy the agent cannot speak to: direct, and why.
        let found = from_env(env(&[("https_proxy", "socks5://s:1080")]), "push.example");
        assert_eq!(found.proxy, None);
        assert!(found.source.contains("only http://"), "{found}");
    }

    #[test]
    fn no_proxy_lists() {
        for (no_proxy, host, bypassed) in [
            ("*", "push.example", true),
            ("example", "push.example", true),
            (".example", "push.example", true),
            ("example", "example", true),
            ("example", "pushexample", false),
            ("localhost,push.example", "Push.Example", true),
            ("other.example, push.example", "push.example", true),
            ("127.0.0.1", "127.0.0.1", true),
            ("0.0.1", "127.0.0.1", false),
            ("10.0.0.0/8", "10.20.30.40", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("fd00::/16", "[fd00::5]", true),
            ("", "push.example", false),
        ] {
            assert_eq!(
                no_proxy_matches(no_proxy, host),
                bypassed,
                "{no_proxy:?} for {host}"
            );
        }
        let found = from_env(
            env(&[("https_proxy", "p:3128"), ("NO_PROXY", ".example")]),
            "push.example",
        );
        assert_eq!(found.proxy, None);
        assert!(found.source.contains("no_proxy"), "{found}");
    }
}
