//! The fix for each failure, in one plain sentence an operator can act on. The errors of
//! `beckon-net` already say what failed; these sentences say what to change, and where.

use beckon_mqtt::ReasonCode;
use beckon_net::{ProxyError, ProxyUrl, ResolveError, TcpError, TlsError, WsError};

use crate::mqtt::{MqttError, describe_code};
use crate::report::CertificateFacts;
use crate::tls::{has_expired, not_yet_valid};

/// The TLS client could not be set up from the configured files.
pub(crate) fn setup(error: &beckon_net::TlsConfigError) -> String {
    use beckon_net::TlsConfigError;
    match error {
        TlsConfigError::FileUnreadable { what, path, source } => format!(
            "Check that the {what} file {} exists and that this user may read it ({source}); it comes from --ca, --client-cert or --client-key, or from broker.ca_file, client_cert or client_key in the agent's configuration.",
            path.display()
        ),
        TlsConfigError::InvalidPem { what, detail } => {
            format!("Give a PEM file with -----BEGIN ...----- blocks for the {what} ({detail}).")
        }
        TlsConfigError::NoSystemRoots { .. } => String::from(
            "Install the ca-certificates package, or give the broker's CA file with --ca.",
        ),
        TlsConfigError::Rejected(e) => {
            format!("Give a client key that belongs to the client certificate ({e}).")
        }
    }
}

/// The DNS step failed for `host`; `whose` is "broker" or "proxy".
pub(crate) fn resolve(error: &ResolveError, whose: &str) -> String {
    match error {
        ResolveError::NoSuchName { host, .. } => format!(
            "The {whose} name {host} does not resolve: check its spelling in the configuration and that this machine's DNS server knows it (try `getent hosts {host}`)."
        ),
        ResolveError::NoAddresses { host } => {
            format!("Add an A or AAAA record for the {whose} name {host} in DNS.")
        }
        ResolveError::TimedOut { host, .. } => format!(
            "This machine's DNS server did not answer for {host} in time: check which DNS servers this machine uses and that it may reach them (UDP and TCP port 53)."
        ),
        ResolveError::EmptyHost => {
            format!(
                "Set the {whose}'s host name (the doctor's --broker, or broker.host in the agent's configuration)."
            )
        }
    }
}

/// The broker port a path uses, for TCP fix sentences.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BrokerPort {
    pub port: u16,
    /// True for the primary (8883) port, for which the fallback port is an alternative.
    pub primary: bool,
    pub fallback: Option<u16>,
}

/// TCP straight to the broker failed.
pub(crate) fn tcp_to_broker(error: &TcpError, target: BrokerPort) -> String {
    let port = target.port;
    let alternative = match (target.primary, target.fallback) {
        (true, Some(fallback)) => format!(", or rely on the fallback port {fallback}"),
        _ => String::new(),
    };
    match error {
        TcpError::Refused { addr } => format!(
            "Nothing accepts TCP port {port} on {ip}: check that the broker listens on port {port} there, and that no firewall rejects outbound TCP {port} to {ip}{alternative}.",
            ip = addr.ip()
        ),
        TcpError::TimedOut { addr, .. } => format!(
            "Open outbound TCP port {port} to {ip} in the firewalls on the way (the connection attempt got no answer at all, which is how a firewall that drops packets behaves){alternative}.",
            ip = addr.ip()
        ),
        TcpError::Unreachable { addr, .. } => format!(
            "Fix the network route from this machine to {} (the system reports it unreachable).",
            addr.ip()
        ),
        TcpError::LocalBind { local, .. } => {
            format!("Use a local source address that belongs to this machine instead of {local}.")
        }
        TcpError::NoUsableAddress { host, .. } => format!(
            "Give {host} an address of the same IP family as this machine's source address."
        ),
        TcpError::Io { addr, source } => format!(
            "Check this machine's network configuration: connecting to {addr} failed with a system error ({source})."
        ),
    }
}

/// TCP to the proxy failed.
pub(crate) fn tcp_to_proxy(error: &TcpError, proxy: &ProxyUrl) -> String {
    match error {
        TcpError::Refused { .. } => format!(
            "Nothing accepts connections at the proxy address {proxy}: correct the proxy address in the agents' proxy policy or start the proxy (agents then fall back to going direct)."
        ),
        TcpError::TimedOut { .. } => format!(
            "Open outbound TCP to the proxy {proxy} in the firewall, or correct the proxy address in the agents' proxy policy."
        ),
        other => format!(
            "Fix the connection to the proxy {proxy} or correct its address in the agents' proxy policy ({other})."
        ),
    }
}

/// The proxy did not open the tunnel to `port`.
pub(crate) fn proxy(error: &ProxyError, proxy: &ProxyUrl, port: u16) -> String {
    match error {
        ProxyError::AuthenticationRequired { .. } => format!(
            "The proxy {proxy} requires authentication: put its user name and password in the proxy address, http://user:password@host:port (`proxy` under [broker] in the agent's configuration, or the proxy policy on the console's Settings page for agents enrolled after the change)."
        ),
        ProxyError::CredentialsRefused { user, .. } => format!(
            "The proxy refused the credentials: check the proxy user name ({user}) and password in the proxy address http://user:password@host:port (`proxy` under [broker] in the agent's configuration, or the proxy policy on the console's Settings page), percent-encoding @ : and % in them."
        ),
        ProxyError::UnsupportedAuthentication { schemes, .. } => format!(
            "Enable Basic authentication on the proxy {proxy} for the agents (it offers only {schemes}, which Beckon does not speak), or allow the agents through it without authentication (in squid, an `http_access allow` rule for them before the authentication rule)."
        ),
        ProxyError::Forbidden { .. } => format!(
            "Allow CONNECT to port {port} on the proxy {proxy} (squid: `acl SSL_ports port {port}`, which `http_access deny CONNECT !SSL_ports` then lets through; Apache httpd: `AllowCONNECT 443 {port}`; tinyproxy: `ConnectPort {port}`)."
        ),
        ProxyError::Refused { status, .. } if matches!(status, 502 | 504) => format!(
            "Let the proxy {proxy} itself reach the broker on port {port} (the proxy's own firewall and DNS): it answered {status} because it could not."
        ),
        ProxyError::Refused { status, .. } if matches!(status, 400 | 405 | 501) => format!(
            "Use a proxy that supports CONNECT tunnels: {proxy} answered CONNECT with {status}."
        ),
        ProxyError::Refused { status, .. } => format!(
            "Look up why the proxy {proxy} refused CONNECT to port {port} with status {status} in its log, and allow the tunnel."
        ),
        ProxyError::TimedOut { .. } => format!(
            "Check that the proxy {proxy} can reach the broker on port {port}: it did not answer CONNECT in time."
        ),
        ProxyError::Closed { .. }
        | ProxyError::HeaderTooLarge { .. }
        | ProxyError::Malformed { .. } => format!(
            "Check that {proxy} is an HTTP proxy: its answer to CONNECT was not HTTP, so the address may point at another service."
        ),
        ProxyError::Io { source, .. } => {
            format!(
                "Check the connection to the proxy {proxy}: it failed during CONNECT ({source})."
            )
        }
    }
}

/// What a TLS fix sentence can refer to.
pub(crate) struct TlsContext<'a> {
    /// "the CA file ca.pem", "this machine's CA store".
    pub trust: &'a str,
    /// Subjects of the configured CA certificates.
    pub ca_subjects: &'a [String],
    /// The chain the broker presented, leaf first (may be empty).
    pub chain: &'a [CertificateFacts],
    pub host: &'a str,
    pub port: u16,
    pub proxied: bool,
}

/// The TLS handshake failed.
pub(crate) fn tls(error: &TlsError, ctx: &TlsContext<'_>) -> String {
    let port = ctx.port;
    match error {
        TlsError::UntrustedCertificate { server } => {
            let issuer = ctx
                .chain
                .last()
                .map(|c| format!(" (it is issued by {})", c.issuer))
                .unwrap_or_default();
            let ours = if ctx.ca_subjects.is_empty() {
                String::new()
            } else {
                format!(", which holds {}", ctx.ca_subjects.join("; "))
            };
            let interception = if ctx.proxied {
                "; if the proxy inspects TLS, exempt the broker from inspection"
            } else {
                "; if a TLS-inspecting device is on the way, exempt the broker from inspection"
            };
            format!(
                "{trust}{ours} does not sign the certificate of {server}{issuer}: give the agents the CA that issued the broker's certificate (an enrolled agent's CA file){interception}.",
                trust = capitalize(ctx.trust)
            )
        }
        TlsError::ExpiredCertificate { server, not_after } => {
            let expired = ctx.chain.iter().find(|c| has_expired(&c.not_after));
            match expired {
                Some(cert) => format!(
                    "Renew the certificate {} of {server} on the broker: it expired on {} (if that date is still ahead, set this machine's clock right).",
                    cert.subject, cert.not_after
                ),
                None => format!(
                    "Renew the broker's certificate for {server}{}, or set this machine's clock right if the certificate is in fact current.",
                    not_after
                        .map(|t| format!(", which expired on {}", beckon_net::time::format_utc(t)))
                        .unwrap_or_default()
                ),
            }
        }
        TlsError::NotYetValidCertificate { server, .. } => {
            let early = ctx.chain.iter().find(|c| not_yet_valid(&c.not_before));
            match early {
                Some(cert) => format!(
                    "Set this machine's clock right: the certificate {} of {server} is valid only from {}.",
                    cert.subject, cert.not_before
                ),
                None => format!(
                    "Set this machine's clock right: the certificate of {server} is not valid yet."
                ),
            }
        }
        TlsError::WrongHostName { server, presented } => {
            let names = if presented.is_empty() {
                ctx.chain
                    .first()
                    .map(|c| c.names.join(", "))
                    .unwrap_or_default()
            } else {
                presented.join(", ")
            };
            if names.is_empty() {
                format!(
                    "Reissue the broker's certificate with {server} in its subject alternative names (it names no host at all)."
                )
            } else {
                format!(
                    "The broker's certificate names {names}, not {server}: connect with one of those names (broker.host or broker.server_name in the agent's configuration), or reissue the certificate with {server} in its subject alternative names."
                )
            }
        }
        TlsError::BadCertificate { detail, .. } => {
            format!("Install a usable certificate on the broker: {detail}.")
        }
        TlsError::ClientCertificateRequired { .. } => String::from(
            "The broker requires a client certificate: give the doctor the agent's certificate and key (--client-cert and --client-key, or --agent-config), or enroll the agent.",
        ),
        TlsError::ClientCertificateRejected { alert, .. } => format!(
            "The broker rejected the client certificate (TLS alert {alert:?}): it may be expired, revoked or issued by another tenant's CA, so enroll the agent again."
        ),
        TlsError::AlpnRefused { .. } => format!(
            "Port {port} on {} does not accept the application protocol mqtt: point this port at a Beckon broker's shared listener, or let agents use another path.",
            ctx.host
        ),
        TlsError::Incompatible { .. } => String::from(
            "Enable TLS 1.3 or TLS 1.2 with modern cipher suites (ECDHE with AES-GCM or ChaCha20) on the broker.",
        ),
        TlsError::NotTls { .. } => format!(
            "Port {port} on {} does not speak TLS: use the broker's TLS port (plain MQTT on 1883 is for loopback development only).",
            ctx.host
        ),
        TlsError::Closed { .. } => format!(
            "Find what closes connections to {}:{port} during the TLS handshake (the broker's log, a firewall or proxy that filters TLS) and let TLS through.",
            ctx.host
        ),
        TlsError::TimedOut { .. } => format!(
            "Port {port} on {} accepted TCP but never answered the TLS handshake: make sure the port is the broker's TLS listener and that nothing on the way holds the connection open without passing it on.",
            ctx.host
        ),
        TlsError::InvalidServerName { server } => format!(
            "Use a valid DNS name or IP address as the broker's certificate name instead of {server:?}."
        ),
        TlsError::HandshakeFailed { .. } | TlsError::Io { .. } => format!(
            "Look in the broker's log for this TLS connection from this machine to port {port} and remove the cause it names."
        ),
    }
}

/// The server did not choose ALPN `mqtt` on the fallback port.
pub(crate) fn alpn_not_negotiated(host: &str, port: u16) -> String {
    format!(
        "Serve MQTT with ALPN mqtt on {host}:{port} (a Beckon broker's shared port does), or exempt it from the TLS-terminating device in the way; agents can still use the WebSocket path there."
    )
}

/// The WebSocket upgrade failed.
pub(crate) fn websocket(error: &WsError, host: &str, port: u16) -> String {
    match error {
        WsError::Rejected { status: 404, path } => format!(
            "Enable MQTT over WebSocket at {path} on {host}:{port} (a Beckon broker's shared port serves it)."
        ),
        WsError::Rejected { status, .. } if matches!(status, 401 | 403 | 400 | 426) => format!(
            "Allow WebSocket upgrades to {host}:{port} on the device that refused it with HTTP {status} (a proxy or web filter on the way)."
        ),
        WsError::Rejected { status, .. } => format!(
            "Make {host}:{port} serve MQTT over WebSocket: it answered the upgrade with HTTP {status}."
        ),
        WsError::Subprotocol { path, .. } => format!(
            "Serve the WebSocket subprotocol mqtt at {path} on {host}:{port}: the endpoint there is not an MQTT one."
        ),
        WsError::Closed { path } | WsError::TimedOut { path, .. } => format!(
            "Make sure {host}:{port} serves MQTT over WebSocket at {path} (a plain MQTT port closes on the HTTP request) and that no proxy or filter on the way blocks WebSocket upgrades."
        ),
        WsError::Protocol { .. } | WsError::Io(_) => format!(
            "Look in the broker's log for this WebSocket connection to port {port} and remove the cause it names."
        ),
    }
}

/// What a CONNACK refusal sentence can refer to.
pub(crate) struct ConnectContext<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub has_password: bool,
    pub has_client_cert: bool,
}

/// The broker refused the CONNECT with `code`.
pub(crate) fn connack(
    code: ReasonCode,
    server_reference: Option<&str>,
    ctx: &ConnectContext<'_>,
) -> String {
    let described = describe_code(code);
    match code.0 {
        // v3.1.1 return code 4 arrives as 0x86 after mapping.
        0x86 => {
            let who = ctx
                .username
                .map(|u| format!("the user name {u} and its token"))
                .unwrap_or_else(|| String::from("the user name and token"));
            format!(
                "The broker refused the credentials with reason {described}: check {who} (a token expires: issue a new one, or enroll the agent again)."
            )
        }
        0x87 => {
            let how = match (ctx.has_client_cert, ctx.has_password, ctx.username) {
                (_, true, Some(user)) => format!("the user name {user} and its token"),
                (_, true, None) => String::from("the token"),
                (true, false, _) => String::from("the client certificate"),
                (false, false, _) => String::from(
                    "this connection without credentials (give the agent's certificate or token)",
                ),
            };
            format!(
                "The broker refused the credentials with reason {described}: check {how}, which must be valid (a wrong or expired token is refused this way too) and belong to this broker's tenant and to the client id {}.",
                ctx.client_id
            )
        }
        // A broker from before doctor probes refuses `<id>/doctor`.
        0x85 if ctx.client_id.ends_with("/doctor") => format!(
            "The broker refused the probe client id {} with reason {described}: it predates doctor probes, so upgrade it, or run the doctor with --client-id set to the agent's id (that takes the running agent's connection over for the moment of the check).",
            ctx.client_id
        ),
        0x85 => format!(
            "The broker refused the credentials with reason {described}: connect with the identity's own client id (an agent's id) instead of {}.",
            ctx.client_id
        ),
        0x84 => String::from(
            "The broker does not speak MQTT 5 (reason 0x84, unsupported protocol version): Beckon agents need an MQTT 5 broker, so upgrade it.",
        ),
        0x8A => format!(
            "The broker has banned this client (reason {described}): ask the broker's operator to lift the ban on {}.",
            ctx.client_id
        ),
        0x8C => format!(
            "The broker refused the credentials with reason {described}: connect with a client certificate or a token as the password, which is what Beckon agents use."
        ),
        0x88 | 0x89 | 0x97 | 0x9F => format!(
            "The broker is overloaded or limiting connections (reason {described}): agents wait longer and retry by themselves, and if this persists raise the broker's limits or add capacity."
        ),
        0x9C | 0x9D => format!(
            "The broker sends clients elsewhere (reason {described}{}): point the agents' broker address there.",
            server_reference
                .map(|s| format!(", to {s}"))
                .unwrap_or_default()
        ),
        0x8B => format!(
            "The broker is shutting down (reason {described}): check again once it is back."
        ),
        _ => format!(
            "The broker refused the connection with reason {described}: look in the broker's log for this client ({}).",
            ctx.client_id
        ),
    }
}

/// An MQTT exchange failed before or instead of an answer.
pub(crate) fn mqtt_error(error: &MqttError, host: &str, port: u16, tls: &TlsContext<'_>) -> String {
    match error {
        MqttError::TimedOut { what, .. } if *what == "CONNACK" => format!(
            "{host}:{port} accepted TLS but did not answer MQTT CONNECT: make sure this port carries MQTT (a Beckon or MQTT 5 broker), not only HTTPS."
        ),
        MqttError::TimedOut { what, .. } => format!(
            "The broker did not send {what} in time over this path: something on the way may hold or cut the connection after it starts, so check the proxy and firewall idle and content rules for {host}:{port}."
        ),
        MqttError::Closed { what } if *what == "CONNACK" => String::from(
            "The broker closed the connection instead of answering CONNECT: look in its log for this client (a broker that rejects the client certificate or the protocol version does this).",
        ),
        MqttError::Closed { .. } => format!(
            "The connection to {host}:{port} was cut after CONNECT: look in the broker's log for this client, and check the proxy and firewall rules on the way."
        ),
        // TLS 1.3 brokers check the client certificate after the handshake: it shows here.
        MqttError::Tls(e) => self::tls(e, tls),
        MqttError::Io { .. } => format!(
            "Check the network between this machine and {host}:{port}: the connection failed after it was established."
        ),
        MqttError::Decode(_) => {
            format!("Make sure {host}:{port} is an MQTT 5 broker: its answer was not valid MQTT.")
        }
        MqttError::V311(1) => String::from(
            "The broker speaks only MQTT 3.1.1 (it refused protocol level 5): Beckon agents need an MQTT 5 broker, so upgrade it.",
        ),
        MqttError::V311(code) => format!(
            "The broker answered in MQTT 3.1.1 with return code {code}: Beckon agents need an MQTT 5 broker, so upgrade it."
        ),
        MqttError::Disconnected(code, _) => format!(
            "The broker ended the connection with reason {}: look in its log for this client.",
            describe_code(*code)
        ),
        MqttError::Encode { .. } => String::from(
            "Use a shorter client id, user name or topic (MQTT strings are limited to 65,535 bytes).",
        ),
    }
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ConnectContext<'static> {
        ConnectContext {
            client_id: "laptop-42",
            username: Some("laptop-42"),
            has_password: true,
            has_client_cert: false,
        }
    }

    #[test]
    fn connack_refusals_name_the_reason_and_the_fix() {
        let cases: [(u8, Option<&str>, &[&str]); 6] = [
            (
                0x86,
                None,
                &[
                    "reason 0x86 (bad user name or password)",
                    "the user name laptop-42 and its token",
                ],
            ),
            (
                0x87,
                None,
                &["reason 0x87 (not authorized)", "client id laptop-42"],
            ),
            (0x84, None, &["MQTT 5", "upgrade"]),
            (
                0x89,
                None,
                &["reason 0x89 (server busy)", "retry by themselves"],
            ),
            (
                0x9C,
                Some("other.example:8883"),
                &["reason 0x9C (use another server), to other.example:8883"],
            ),
            (0x8A, None, &["banned", "laptop-42"]),
        ];
        for (code, reference, words) in cases {
            let fix = connack(ReasonCode(code), reference, &ctx());
            for word in words {
                assert!(fix.contains(word), "0x{code:02X}: {fix}");
            }
            // Each fix is one full sentence.
            assert!(fix.ends_with('.'), "{fix}");
        }
    }

    #[test]
    fn a_broker_refusing_the_probe_id_is_named_as_too_old() {
        let probe = ConnectContext {
            client_id: "laptop-42/doctor",
            ..ctx()
        };
        let fix = connack(ReasonCode(0x85), None, &probe);
        assert!(
            fix.contains("predates doctor probes") && fix.contains("--client-id"),
            "{fix}"
        );
    }

    #[test]
    fn proxy_refusals_name_the_rule_to_change() {
        let proxy = ProxyUrl::new("proxy.example", 3128);
        let bad_gateway = ProxyError::Refused {
            proxy: proxy.to_string(),
            target: "broker.example:8883".into(),
            status: 502,
            reason: "Bad Gateway".into(),
        };
        let fix = self::proxy(&bad_gateway, &proxy, 8883);
        assert!(
            fix.contains(
                "Let the proxy http://proxy.example:3128 itself reach the broker on port 8883"
            ),
            "{fix}"
        );
        let refused = ProxyError::CredentialsRefused {
            proxy: proxy.to_string(),
            user: "alice".into(),
        };
        let fix = self::proxy(&refused, &proxy, 8883);
        assert!(
            fix.starts_with(
                "The proxy refused the credentials: check the proxy user name (alice) and password"
            ),
            "{fix}"
        );
    }
}
