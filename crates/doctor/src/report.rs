//! The doctor's findings: per path, per step, a verdict, a duration, what was seen, and on
//! failure the fix in one sentence. Serializable to JSON for machines (`--json`, the console)
//! and printable as a tree for people.

use std::fmt::{self, Write as _};

use serde::Serialize;

/// The outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The step worked.
    Pass,
    /// The step failed; the step's `fix` says what to do.
    Fail,
    /// The step was not run (an earlier step failed, or it does not apply).
    Skipped,
}

/// The steps of one path, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepName {
    /// Resolving the broker's name (direct) or the proxy's (proxied).
    Dns,
    /// TCP to the broker's port, or to the proxy.
    Tcp,
    /// The proxy's CONNECT tunnel to the broker's port.
    ProxyConnect,
    /// The TLS handshake: version, suite, ALPN, certificate chain, expiry, host name.
    Tls,
    /// The WebSocket upgrade (`GET /mqtt`, subprotocol `mqtt`).
    #[serde(rename = "websocket")]
    WebSocket,
    /// MQTT 5 CONNECT and the broker's CONNACK reason code.
    MqttConnect,
    /// PINGREQ/PINGRESP, the identity's subscription, and a publish/subscribe echo.
    RoundTrip,
}

impl fmt::Display for StepName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Dns => "DNS",
            Self::Tcp => "TCP",
            Self::ProxyConnect => "proxy CONNECT",
            Self::Tls => "TLS",
            Self::WebSocket => "WebSocket",
            Self::MqttConnect => "MQTT CONNECT",
            Self::RoundTrip => "round trip",
        })
    }
}

/// One certificate of the broker's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateFacts {
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Start of validity, `YYYY-MM-DD HH:MM:SS UTC`.
    pub not_before: String,
    /// End of validity, `YYYY-MM-DD HH:MM:SS UTC`.
    pub not_after: String,
    /// DNS names and IP addresses in the subject alternative names (leaf certificates).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

/// What a TLS handshake showed (also filled, as far as seen, when it failed on the
/// certificate).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TlsFacts {
    /// The name checked in the certificate.
    pub server_name: String,
    /// `TLS 1.3` or `TLS 1.2`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The cipher suite's IANA name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cipher_suite: Option<String>,
    /// The application protocol the server chose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
    /// The server's chain, leaf first.
    pub chain: Vec<CertificateFacts>,
    /// The earliest end of validity in the chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain_expires: Option<String>,
}

/// One step of one path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    /// Which step.
    pub step: StepName,
    /// Pass, fail or skipped.
    pub verdict: Verdict,
    /// How long it took, in milliseconds (0 when skipped).
    pub duration_ms: f64,
    /// What was seen (addresses, negotiated TLS, reason code), or the error.
    pub detail: String,
    /// On failure: what to do, in one sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// DNS: the addresses found.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// TLS: what was negotiated and the chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFacts>,
    /// MQTT CONNECT: the CONNACK reason code (MQTT 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<u8>,
}

impl StepReport {
    pub(crate) fn new(step: StepName, verdict: Verdict, detail: impl Into<String>) -> Self {
        Self {
            step,
            verdict,
            duration_ms: 0.0,
            detail: detail.into(),
            fix: None,
            addresses: Vec::new(),
            tls: None,
            reason_code: None,
        }
    }
}

/// One path of the ladder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathReport {
    /// The presence label: `8883`, `443-mqtt`, `443-websocket`, with ` via proxy`.
    pub path: String,
    /// The form the agent stores in its state (`443-mqtt via http://proxy:3128`).
    pub stored_form: String,
    /// What the path is, in words (`MQTT over TLS to broker.example:8883 via proxy ...`).
    pub description: String,
    /// The broker port this path uses.
    pub port: u16,
    /// True when the path goes through the proxy.
    pub proxied: bool,
    /// True when every step passed.
    pub ok: bool,
    /// The steps, in order.
    pub steps: Vec<StepReport>,
}

impl PathReport {
    /// The first failed step, if any.
    pub fn failure(&self) -> Option<&StepReport> {
        self.steps.iter().find(|s| s.verdict == Verdict::Fail)
    }
}

/// The whole diagnosis.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The broker checked.
    pub broker: String,
    /// The name checked in its certificate.
    pub server_name: String,
    /// The proxy, if one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// Where the proxy came from, or why there is none (`system proxy: WinHTTP default
    /// proxy`, ...), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_source: Option<String>,
    /// The MQTT client id used.
    pub client_id: String,
    /// A problem that stopped every check before it started (unreadable CA file, ...), with
    /// its fix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_error: Option<String>,
    /// What to do about the setup error, in one sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_fix: Option<String>,
    /// Each path, in ladder order.
    pub paths: Vec<PathReport>,
    /// The path agents will use: the first that passes, in ladder order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_in_use: Option<String>,
    /// One line: which path agents will use, or that none works.
    pub summary: String,
    /// True when at least one path works.
    pub ok: bool,
}

impl Report {
    /// The report as people read it: a tree of paths and steps with ✓/✗, the fix under each
    /// failure, and the summary line.
    pub fn to_human(&self) -> String {
        let mut out = String::new();
        let _ = write!(out, "Beckon doctor: broker {}", self.broker);
        if self.server_name != self.broker {
            let _ = write!(out, " (certificate name {})", self.server_name);
        }
        match &self.proxy {
            Some(proxy) => {
                let _ = write!(out, ", proxy {proxy}");
            }
            None => out.push_str(", no proxy"),
        }
        if let Some(source) = &self.proxy_source {
            let _ = write!(out, " ({source})");
        }
        let _ = writeln!(out, ", client id {}", self.client_id);
        if let Some(error) = &self.setup_error {
            let _ = writeln!(out, "\n✗ cannot start the checks: {error}");
            if let Some(fix) = &self.setup_fix {
                let _ = writeln!(out, "  fix: {fix}");
            }
        }
        let width = self
            .paths
            .iter()
            .flat_map(|p| p.steps.iter())
            .map(|s| s.step.to_string().chars().count())
            .max()
            .unwrap_or(0);
        for path in &self.paths {
            let mark = if path.ok { '✓' } else { '✗' };
            let _ = writeln!(out, "\n{mark} {}: {}", path.path, path.description);
            for step in &path.steps {
                let mark = match step.verdict {
                    Verdict::Pass => '✓',
                    Verdict::Fail => '✗',
                    Verdict::Skipped => '-',
                };
                let name = step.step.to_string();
                let time = if step.verdict == Verdict::Skipped {
                    String::new()
                } else {
                    format!(" ({})", format_ms(step.duration_ms))
                };
                let _ = writeln!(out, "    {mark} {name:<width$}  {}{time}", step.detail);
                if let Some(tls) = &step.tls {
                    for (i, cert) in tls.chain.iter().enumerate() {
                        let role = if i == 0 { "certificate" } else { "issued by  " };
                        let _ = writeln!(
                            out,
                            "      {:<width$}  {role} {} (issuer {}, valid {} to {})",
                            "",
                            cert.subject,
                            cert.issuer,
                            short_date(&cert.not_before),
                            short_date(&cert.not_after)
                        );
                    }
                }
                if let Some(fix) = &step.fix {
                    let _ = writeln!(out, "      {:<width$}  fix: {fix}", "");
                }
            }
        }
        let _ = writeln!(out, "\n{}", self.summary);
        out
    }
}

fn format_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// `2030-06-15 00:00:00 UTC` -> `2030-06-15`.
fn short_date(date: &str) -> &str {
    date.split(' ').next().unwrap_or(date)
}
