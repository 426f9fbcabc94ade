//! Walks each path of the agent's ladder step by step. The steps are those of
//! `beckon_net::connect_path` (the agent's own connection code), taken one at a time so that
//! each is timed and reported, and carried on into MQTT.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use beckon_mqtt::ReasonCode;
use beckon_net::{
    BoxedStream, LadderConfig, Path, PrefixedStream, ProxyUrl, Route, TcpOptions, Timeouts,
    TlsSessionInfo, Transport, WsSettings, connect_addrs, http_connect, resolve,
    websocket_handshake,
};
use bytes::Bytes;
use rand::Rng;
use tokio::net::TcpStream;

use crate::config::DoctorConfig;
use crate::fix::{self, BrokerPort, ConnectContext, TlsContext};
use crate::mqtt::{MqttIdentity, MqttProbe, describe_code};
use crate::report::{PathReport, Report, StepName, StepReport, TlsFacts, Verdict};
use crate::tls::ProbeTls;

/// Checks every path of the agent's ladder, in ladder order, and says which one agents will
/// use. Never panics and never waits longer than the configured step timeout per step.
pub async fn diagnose(config: &DoctorConfig) -> Report {
    let identity = identity(config);
    let mut report = Report {
        broker: config.broker_host.clone(),
        server_name: config.server_name().to_owned(),
        proxy: config.proxy.as_ref().map(ToString::to_string),
        proxy_source: config.proxy_source.clone(),
        client_id: identity.client_id.clone(),
        setup_error: None,
        setup_fix: None,
        paths: Vec::new(),
        path_in_use: None,
        summary: String::new(),
        ok: false,
    };
    let tls = match ProbeTls::new(&config.tls) {
        Ok(tls) => tls,
        Err(e) => {
            let fix = fix::setup(&e);
            report.summary = format!("The checks could not start: {fix}");
            report.setup_error = Some(e.to_string());
            report.setup_fix = Some(fix);
            return report;
        }
    };
    let ladder = ladder_config(config);
    let mut checker = PathChecker {
        config,
        ladder: &ladder,
        tls: &tls,
        identity: &identity,
        failed: HashMap::new(),
    };
    for path in rungs(config, &ladder) {
        let path_report = checker.check(&path).await;
        report.paths.push(path_report);
    }
    summarize(&mut report);
    report
}

fn identity(config: &DoctorConfig) -> MqttIdentity {
    match &config.client_id {
        Some(id) if config.probe => MqttIdentity {
            client_id: id.clone(),
            named: false,
            probe: true,
            username: config.username.clone(),
            password: config.password.clone(),
            session_expiry: Duration::ZERO,
        },
        Some(id) => MqttIdentity {
            client_id: id.clone(),
            named: true,
            probe: false,
            username: config.username.clone(),
            password: config.password.clone(),
            session_expiry: config.session_expiry,
        },
        None => MqttIdentity {
            client_id: format!("beckon-doctor-{:08x}", rand::rng().random::<u32>()),
            named: false,
            probe: false,
            username: config.username.clone(),
            password: config.password.clone(),
            session_expiry: Duration::ZERO,
        },
    }
}

fn ladder_config(config: &DoctorConfig) -> LadderConfig {
    let mut ladder = LadderConfig::new(config.broker_host.clone());
    ladder.server_name = config.server_name.clone();
    ladder.primary_port = config.primary_port;
    ladder.fallback_port = config.fallback_port.unwrap_or(config.primary_port);
    ladder.proxy = config.proxy.clone();
    ladder.websocket = WsSettings::default();
    let t = config.step_timeout;
    ladder.timeouts = Timeouts {
        resolve: t,
        tcp_connect: t,
        proxy_connect: t,
        tls_handshake: t,
        websocket_handshake: t,
    };
    ladder
}

/// The ladder's rungs; only the primary port's when no fallback port is checked.
fn rungs(config: &DoctorConfig, ladder: &LadderConfig) -> Vec<Path> {
    ladder
        .rungs()
        .into_iter()
        .filter(|p| config.fallback_port.is_some() || !p.transport.uses_fallback_port())
        .collect()
}

fn describe_path(config: &DoctorConfig, ladder: &LadderConfig, path: &Path) -> String {
    let host = &config.broker_host;
    let port = ladder.port_for(path.transport);
    let what = match path.transport {
        Transport::Mqtts => format!("MQTT over TLS to {host}:{port}"),
        Transport::AlpnMqtt => format!("MQTT over TLS with ALPN mqtt to {host}:{port}"),
        Transport::WebSocket => format!(
            "MQTT over WebSocket to wss://{host}:{port}{}",
            ladder.websocket.path
        ),
    };
    match &path.route {
        Route::Direct => format!("{what}, direct"),
        Route::Proxy(proxy) => format!("{what}, through the proxy {proxy}"),
    }
}

/// A failure that would repeat identically on a later path (same name, same TCP target,
/// same proxy), so that the doctor does not wait for the same timeout twice.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RepeatKey {
    Resolve(String),
    Tcp(String, u16),
    ProxyWide(String),
    Tunnel(String, u16),
}

struct Remembered {
    path: String,
    step: StepReport,
}

struct PathChecker<'a> {
    config: &'a DoctorConfig,
    ladder: &'a LadderConfig,
    tls: &'a ProbeTls,
    identity: &'a MqttIdentity,
    failed: HashMap<RepeatKey, Remembered>,
}

/// Steps of one path, collected as they run.
struct Steps {
    steps: Vec<StepReport>,
}

impl Steps {
    fn pass(&mut self, step: StepName, started: Instant, detail: String) -> &mut StepReport {
        let mut report = StepReport::new(step, Verdict::Pass, detail);
        report.duration_ms = ms(started.elapsed());
        self.steps.push(report);
        self.steps.last_mut().expect("just pushed")
    }

    fn fail(
        &mut self,
        step: StepName,
        started: Instant,
        detail: String,
        fix: String,
    ) -> &mut StepReport {
        let mut report = StepReport::new(step, Verdict::Fail, detail);
        report.duration_ms = ms(started.elapsed());
        report.fix = Some(fix);
        self.steps.push(report);
        self.steps.last_mut().expect("just pushed")
    }

    /// Marks the steps after a failure as skipped.
    fn skip_rest(&mut self, rest: &[StepName]) {
        for step in rest {
            self.steps.push(StepReport::new(
                *step,
                Verdict::Skipped,
                "not run: an earlier step failed",
            ));
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

impl PathChecker<'_> {
    async fn check(&mut self, path: &Path) -> PathReport {
        let port = self.ladder.port_for(path.transport);
        let mut order = vec![StepName::Dns, StepName::Tcp];
        if path.is_proxied() {
            order.push(StepName::ProxyConnect);
        }
        order.push(StepName::Tls);
        if path.transport == Transport::WebSocket {
            order.push(StepName::WebSocket);
        }
        order.extend([StepName::MqttConnect, StepName::RoundTrip]);
        let mut steps = Steps { steps: Vec::new() };
        let ok = self.run_steps(path, port, &mut steps).await;
        let done = steps.steps.len();
        if !ok {
            steps.skip_rest(&order[done.min(order.len())..]);
        }
        PathReport {
            path: path.label(),
            stored_form: path.to_string(),
            description: describe_path(self.config, self.ladder, path),
            port,
            proxied: path.is_proxied(),
            ok,
            steps: steps.steps,
        }
    }

    /// A remembered failure for `key`, copied as this path's result of the same step.
    fn repeat(&self, key: &RepeatKey, steps: &mut Steps) -> bool {
        let Some(earlier) = self.failed.get(key) else {
            return false;
        };
        let mut step = earlier.step.clone();
        step.duration_ms = 0.0;
        step.detail = format!("not run again, as on {}: {}", earlier.path, step.detail);
        steps.steps.push(step);
        true
    }

    fn remember(&mut self, key: RepeatKey, path: &Path, steps: &Steps) {
        if let Some(step) = steps.steps.last() {
            self.failed.insert(
                key,
                Remembered {
                    path: path.label(),
                    step: step.clone(),
                },
            );
        }
    }

    /// Runs the steps until one fails; true when all passed.
    async fn run_steps(&mut self, path: &Path, port: u16, steps: &mut Steps) -> bool {
        let proxy: Option<&ProxyUrl> = match &path.route {
            Route::Direct => None,
            Route::Proxy(p) => Some(p),
        };
        let Some(stream) = self.open_stream(path, port, proxy, steps).await else {
            return false;
        };
        self.secure_and_speak(path, port, proxy.is_some(), stream, steps)
            .await
    }

    /// DNS, TCP and (through a proxy) the CONNECT tunnel: the byte stream to the broker, or
    /// `None` when a step failed (it is recorded in `steps`).
    async fn open_stream(
        &mut self,
        path: &Path,
        port: u16,
        proxy: Option<&ProxyUrl>,
        steps: &mut Steps,
    ) -> Option<PrefixedStream<TcpStream>> {
        let config = self.config;
        let timeout = config.step_timeout;
        let (host, tcp_port, whose) = match proxy {
            None => (config.broker_host.as_str(), port, "broker"),
            Some(p) => (p.host(), p.port(), "proxy"),
        };

        // DNS
        let key = RepeatKey::Resolve(host.to_owned());
        if self.repeat(&key, steps) {
            return None;
        }
        let started = Instant::now();
        let addrs = match resolve(host, tcp_port, timeout).await {
            Ok(addrs) => {
                let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
                let note = if proxy.is_some() {
                    format!(
                        "; the proxy resolves the broker's name {} itself",
                        config.broker_host
                    )
                } else {
                    String::new()
                };
                let found = if host
                    .trim_matches(|c| c == '[' || c == ']')
                    .parse::<std::net::IpAddr>()
                    .is_ok()
                {
                    format!("{whose} {host} is an IP address, no lookup needed")
                } else {
                    format!("{whose} {host} is {}", list.join(", "))
                };
                let step = steps.pass(StepName::Dns, started, format!("{found}{note}"));
                step.addresses = list;
                addrs
            }
            Err(e) => {
                steps.fail(
                    StepName::Dns,
                    started,
                    e.to_string(),
                    fix::resolve(&e, whose),
                );
                self.remember(key, path, steps);
                return None;
            }
        };

        // TCP
        let key = RepeatKey::Tcp(host.to_owned(), tcp_port);
        if self.repeat(&key, steps) {
            return None;
        }
        let options = TcpOptions {
            connect_timeout: timeout,
            local_addr: None,
            nodelay: true,
        };
        let started = Instant::now();
        let (tcp, peer): (TcpStream, _) = match connect_addrs(host, &addrs, &options).await {
            Ok(connected) => connected,
            Err(e) => {
                let fix = match proxy {
                    None => fix::tcp_to_broker(
                        &e,
                        BrokerPort {
                            port,
                            primary: !path.transport.uses_fallback_port(),
                            fallback: config.fallback_port,
                        },
                    ),
                    Some(p) => fix::tcp_to_proxy(&e, p),
                };
                steps.fail(StepName::Tcp, started, e.to_string(), fix);
                self.remember(key, path, steps);
                return None;
            }
        };
        let target = match proxy {
            None => format!("port {port} of {}", peer.ip()),
            Some(p) => format!("the proxy {p} at {peer}"),
        };
        steps.pass(StepName::Tcp, started, format!("connected to {target}"));

        // Proxy CONNECT
        let stream = match proxy {
            None => PrefixedStream::new(Bytes::new(), tcp),
            Some(p) => {
                let wide = RepeatKey::ProxyWide(p.to_string());
                let tunnel_key = RepeatKey::Tunnel(p.to_string(), port);
                if self.repeat(&wide, steps) || self.repeat(&tunnel_key, steps) {
                    return None;
                }
                let started = Instant::now();
                match http_connect(tcp, p, &config.broker_host, port, timeout).await {
                    Ok(tunnel) => {
                        steps.pass(
                            StepName::ProxyConnect,
                            started,
                            format!("the proxy opened a tunnel to {}:{port}", config.broker_host),
                        );
                        tunnel
                    }
                    Err(e) => {
                        let proxy_wide = e.is_proxy_wide();
                        steps.fail(
                            StepName::ProxyConnect,
                            started,
                            e.to_string(),
                            fix::proxy(&e, p, port),
                        );
                        self.remember(if proxy_wide { wide } else { tunnel_key }, path, steps);
                        return None;
                    }
                }
            }
        };
        Some(stream)
    }

    /// TLS, the WebSocket upgrade (on that transport) and MQTT over `stream`; true when all
    /// passed.
    async fn secure_and_speak(
        &mut self,
        path: &Path,
        port: u16,
        proxied: bool,
        stream: PrefixedStream<TcpStream>,
        steps: &mut Steps,
    ) -> bool {
        let config = self.config;
        let timeout = config.step_timeout;
        // TLS
        let server = config.server_name();
        let trust = config.trust_label();
        self.tls.clear();
        let started = Instant::now();
        let handshake = self
            .tls
            .client
            .connect(stream, server, path.transport.alpn(), timeout)
            .await;
        let chain = self.tls.last_chain();
        let tls_context = TlsContext {
            trust: &trust,
            ca_subjects: &self.tls.ca_subjects,
            chain: &chain,
            host: &config.broker_host,
            port,
            proxied,
        };
        let (tls_stream, info) = match handshake {
            Ok(done) => done,
            Err(e) => {
                let fix = fix::tls(&e, &tls_context);
                let step = steps.fail(StepName::Tls, started, e.to_string(), fix);
                step.tls = Some(TlsFacts {
                    server_name: server.to_owned(),
                    chain: chain.clone(),
                    ..TlsFacts::default()
                });
                return false;
            }
        };
        let facts = tls_facts(&info, &chain);
        let mut summary = tls_summary(&facts);
        if let Some(days) = days_left(&info).filter(|d| *d < RENEW_WARNING_DAYS) {
            summary.push_str(&format!(
                " (in {days} days: renew the broker's certificate soon, or agents stop connecting then)"
            ));
        }
        if path.transport == Transport::AlpnMqtt && info.alpn.as_deref() != Some("mqtt") {
            let step = steps.fail(
                StepName::Tls,
                started,
                format!(
                    "{summary}, but the server did not choose the application protocol mqtt (ALPN: {})",
                    info.alpn.as_deref().unwrap_or("none")
                ),
                fix::alpn_not_negotiated(&config.broker_host, port),
            );
            step.tls = Some(facts);
            return false;
        }
        let step = steps.pass(StepName::Tls, started, summary);
        step.tls = Some(facts);

        // WebSocket
        let stream: BoxedStream = match path.transport {
            Transport::Mqtts | Transport::AlpnMqtt => Box::new(tls_stream),
            Transport::WebSocket => {
                let started = Instant::now();
                match websocket_handshake(tls_stream, server, port, &self.ladder.websocket, timeout)
                    .await
                {
                    Ok(ws) => {
                        steps.pass(
                            StepName::WebSocket,
                            started,
                            format!(
                                "upgraded GET {} with subprotocol mqtt",
                                self.ladder.websocket.path
                            ),
                        );
                        Box::new(ws)
                    }
                    Err(e) => {
                        steps.fail(
                            StepName::WebSocket,
                            started,
                            e.to_string(),
                            fix::websocket(&e, &config.broker_host, port),
                        );
                        return false;
                    }
                }
            }
        };

        self.mqtt(stream, port, steps, &tls_context).await
    }

    /// MQTT CONNECT and the round trip.
    async fn mqtt(
        &self,
        stream: BoxedStream,
        port: u16,
        steps: &mut Steps,
        tls_context: &TlsContext<'_>,
    ) -> bool {
        let config = self.config;
        let identity = self.identity;
        let host = config.broker_host.as_str();
        let mut probe = MqttProbe::new(
            stream,
            config.step_timeout,
            config.server_name(),
            config.tls.min_version,
        );
        let started = Instant::now();
        let connack = match probe.connect(identity, tls_context.proxied).await {
            Ok(ack) => ack,
            Err(e) => {
                let fix = fix::mqtt_error(&e, host, port, tls_context);
                steps.fail(StepName::MqttConnect, started, e.to_string(), fix);
                return false;
            }
        };
        let context = ConnectContext {
            client_id: &identity.client_id,
            username: identity.username.as_deref(),
            has_password: identity.password.is_some(),
            has_client_cert: config.tls.identity.is_some(),
        };
        let reason = connack
            .properties
            .reason_string
            .as_deref()
            .map(|r| format!(", \"{r}\""))
            .unwrap_or_default();
        if connack.code.is_error() {
            let fix = fix::connack(
                connack.code,
                connack.properties.server_reference.as_deref(),
                &context,
            );
            let step = steps.fail(
                StepName::MqttConnect,
                started,
                format!(
                    "the broker refused CONNECT as {}: CONNACK {}{reason}",
                    identity.client_id,
                    describe_code(connack.code)
                ),
                fix,
            );
            step.reason_code = Some(connack.code.0);
            probe.disconnect().await;
            return false;
        }
        let session = if identity.named {
            if connack.session_present {
                ", resumed its session"
            } else {
                ", no stored session"
            }
        } else {
            ""
        };
        let step = steps.pass(
            StepName::MqttConnect,
            started,
            format!(
                "CONNACK {} as {}{session}{reason}",
                describe_code(connack.code),
                identity.client_id
            ),
        );
        step.reason_code = Some(connack.code.0);

        let started = Instant::now();
        let outcome = self.round_trip(&mut probe, host, port, tls_context).await;
        probe.disconnect().await;
        match outcome {
            Ok(detail) => {
                steps.pass(StepName::RoundTrip, started, detail);
                true
            }
            Err((detail, fix)) => {
                steps.fail(StepName::RoundTrip, started, detail, fix);
                false
            }
        }
    }

    /// PINGREQ/PINGRESP, the agent's subscription, the echo. `Err((detail, fix))` on the first
    /// failure (the detail lists what passed before it).
    async fn round_trip(
        &self,
        probe: &mut MqttProbe<BoxedStream>,
        host: &str,
        port: u16,
        tls_context: &TlsContext<'_>,
    ) -> Result<String, (String, String)> {
        let identity = self.identity;
        let mut done: Vec<String> = Vec::new();
        let failed = |done: &Vec<String>, what: String| {
            if done.is_empty() {
                what
            } else {
                format!("{}; {what}", done.join("; "))
            }
        };

        match probe.ping().await {
            Ok(rtt) => done.push(format!("PINGRESP in {:.1} ms", ms(rtt))),
            Err(e) => {
                let fix = fix::mqtt_error(&e, host, port, tls_context);
                return Err((failed(&done, format!("PINGREQ: {e}")), fix));
            }
        }

        if identity.probe {
            done.push(format!(
                "connected as {} beside the agent's own session, which it leaves alone (connect and ping only)",
                identity.client_id
            ));
            return Ok(done.join("; "));
        }

        if let Some(topic) = &self.config.wake_topic {
            let topic = topic.as_str();
            match probe.subscribe(topic).await {
                Ok((code, _)) if !code.is_error() => {
                    done.push(format!("subscribed to {topic} ({})", describe_code(code)));
                }
                Ok((code, reason)) => {
                    let fix = format!(
                        "Allow the identity {} to subscribe to its own {topic} in the broker's access rules (the broker answered {}), or the agent never receives a wake-up.",
                        identity.client_id,
                        describe_code(code)
                    );
                    let reason = reason.map(|r| format!(", \"{r}\"")).unwrap_or_default();
                    return Err((
                        failed(
                            &done,
                            format!("SUBSCRIBE {topic} refused: {}{reason}", describe_code(code)),
                        ),
                        fix,
                    ));
                }
                Err(e) => {
                    let fix = fix::mqtt_error(&e, host, port, tls_context);
                    return Err((failed(&done, format!("SUBSCRIBE {topic}: {e}")), fix));
                }
            }
        }

        let echo_topic = match (&self.config.echo_topic, identity.named) {
            (Some(topic), _) => topic.clone(),
            (None, false) => format!("beckon-doctor/{}", identity.client_id),
            (None, true) => {
                done.push(String::from(
                    "no publish/subscribe echo (an agent may only publish its acks; --echo-topic names a topic to echo on)",
                ));
                return Ok(done.join("; "));
            }
        };
        match probe.subscribe(&echo_topic).await {
            Ok((code, _)) if !code.is_error() => {}
            Ok((code, _)) => {
                let fix = format!(
                    "Choose an echo topic that {} may subscribe and publish to (--echo-topic), or allow it in the broker's access rules: SUBSCRIBE {echo_topic} was answered {}.",
                    identity.client_id,
                    describe_code(code)
                );
                return Err((
                    failed(
                        &done,
                        format!("SUBSCRIBE {echo_topic} refused: {}", describe_code(code)),
                    ),
                    fix,
                ));
            }
            Err(e) => {
                let fix = fix::mqtt_error(&e, host, port, tls_context);
                return Err((failed(&done, format!("SUBSCRIBE {echo_topic}: {e}")), fix));
            }
        }
        let payload = Bytes::from(format!(
            "beckon doctor echo {:016x}",
            rand::rng().random::<u64>()
        ));
        let result = probe.echo(&echo_topic, &payload).await;
        // The echo subscription is the doctor's, not the identity's: remove it (best effort).
        let _ = probe.unsubscribe(&echo_topic).await;
        match result {
            Ok((code, _, Some(back))) if !code.is_error() => {
                done.push(format!(
                    "published to {echo_topic} and received it back in {:.1} ms",
                    ms(back)
                ));
                Ok(done.join("; "))
            }
            Ok((code, reason, _))
                if code.is_error() || code == ReasonCode::NO_MATCHING_SUBSCRIBERS =>
            {
                let reason = reason.map(|r| format!(", \"{r}\"")).unwrap_or_default();
                let fix = format!(
                    "Choose an echo topic that {} may publish and subscribe to (--echo-topic), or allow it in the broker's access rules: PUBLISH to {echo_topic} was answered {}.",
                    identity.client_id,
                    describe_code(code)
                );
                Err((
                    failed(
                        &done,
                        format!(
                            "PUBLISH {echo_topic} refused: {}{reason}",
                            describe_code(code)
                        ),
                    ),
                    fix,
                ))
            }
            Ok(_) | Err(crate::mqtt::MqttError::TimedOut { .. }) => Err((
                failed(
                    &done,
                    format!(
                        "the message published to {echo_topic} did not come back within {} s",
                        self.config.step_timeout.as_secs_f32()
                    ),
                ),
                format!(
                    "Check the broker's access rules for {echo_topic} and its log: it accepted the message but did not deliver it back to the subscription of {}.",
                    identity.client_id
                ),
            )),
            Err(e) => {
                let fix = fix::mqtt_error(&e, host, port, tls_context);
                Err((failed(&done, format!("echo on {echo_topic}: {e}")), fix))
            }
        }
    }
}

fn tls_facts(info: &TlsSessionInfo, chain: &[crate::report::CertificateFacts]) -> TlsFacts {
    TlsFacts {
        server_name: info.server_name.clone(),
        version: info.version.map(|v| v.to_string()),
        cipher_suite: info.cipher_suite.clone(),
        alpn: info.alpn.clone(),
        chain: chain.to_vec(),
        chain_expires: info.chain_expiry().map(beckon_net::time::format_utc),
    }
}

/// Days until the chain's earliest expiry (negative once expired), if known.
fn days_left(info: &TlsSessionInfo) -> Option<i64> {
    let expiry = info.chain_expiry()?;
    let secs = match expiry.duration_since(std::time::SystemTime::now()) {
        Ok(ahead) => i64::try_from(ahead.as_secs()).unwrap_or(i64::MAX),
        Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
    };
    Some(secs.div_euclid(86_400))
}

/// Renewal warning for a chain that expires within this many days.
const RENEW_WARNING_DAYS: i64 = 21;

fn tls_summary(facts: &TlsFacts) -> String {
    let mut parts = vec![
        facts.version.clone().unwrap_or_else(|| "TLS".into()),
        facts.cipher_suite.clone().unwrap_or_default(),
    ];
    parts.push(format!("ALPN {}", facts.alpn.as_deref().unwrap_or("none")));
    parts.push(format!("certificate valid for {}", facts.server_name));
    if let Some(expires) = &facts.chain_expires {
        parts.push(format!("chain valid until {expires}"));
    }
    parts.retain(|p| !p.is_empty());
    parts.join(", ")
}

fn summarize(report: &mut Report) {
    let total = report.paths.len();
    let working = report.paths.iter().filter(|p| p.ok).count();
    if let Some(first) = report.paths.iter().find(|p| p.ok) {
        report.ok = true;
        report.path_in_use = Some(first.path.clone());
        report.summary = format!(
            "Agents will use {} ({}), the first path that works in ladder order; {working} of {total} paths work.",
            first.path, first.description
        );
        // A configured proxy that works for no path is bypassed: worth saying.
        if let Some(proxy) = &report.proxy
            && !first.proxied
        {
            let why = report
                .paths
                .iter()
                .filter(|p| p.proxied)
                .find_map(|p| p.failure())
                .and_then(|s| s.fix.clone());
            if let Some(why) = why {
                report.summary.push_str(&format!(
                    " The proxy {proxy} works for no path, so agents go direct: {why}"
                ));
            }
        }
        return;
    }
    report.ok = false;
    let first_failure = report
        .paths
        .iter()
        .find_map(|p| p.failure().map(|s| (p, s)));
    report.summary = match first_failure {
        Some((path, step)) => format!(
            "No path to {} works, so agents get no wake-ups; start with the first failure ({}, {}): {}",
            report.broker,
            path.path,
            step.step,
            step.fix.as_deref().unwrap_or(&step.detail)
        ),
        None => format!(
            "No path to {} works, so agents get no wake-ups.",
            report.broker
        ),
    };
}
