//! A call-bench worker process: enrolls its share of the agents with the console (each its own
//! key pair and certificate), connects them to the broker with those certificates, and acts on
//! wake-ups as the agent does: verify the console's signature (and expiry, and replay), then
//! acknowledge. Commands and replies are JSON lines on stdin and stdout, as for the fleet's
//! workers.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use beckon_client::{Connection, End, Event as ClientEvent, Options, Session};
use beckon_identity::wakeup::{Ack, AckStatus, ReplayGuard, WakeUpVerifier};
use beckon_identity::{KeyId, PublicKey, TenantId};
use beckon_mqtt::{ProtocolVersion, QoS, Subscription, SubscriptionOptions};
use bytes::Bytes;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::net::TcpSocket;
use tokio::sync::{Semaphore, mpsc, watch};

use super::http::HttpClient;
use crate::protocol::unix_ns;
use crate::worker::{read_command, reply, stdin_lines};

/// Largest packet an agent accepts (a wake-up is at most 8 KiB).
const MAX_PACKET: u32 = 64 * 1024;

/// Which acks each simulated agent publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AckStages {
    /// `received` only: the call ends at `delivered`.
    Received,
    /// `received`, then `started` and `finished` (status ok) at once, as an agent whose action
    /// takes no time.
    Finished,
}

/// Everything a call worker needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallWorkerConfig {
    /// Worker number.
    pub worker: usize,
    /// Global index of its first agent.
    pub first_agent: usize,
    /// How many agents it runs.
    pub agents: usize,
    /// Agent ids are this prefix and the global index.
    pub id_prefix: String,
    /// The console's API (plain HTTP on loopback).
    pub console: SocketAddr,
    /// The enrollment token.
    pub enrollment_token: String,
    /// Enrollments in flight at once in this worker.
    pub enroll_concurrency: usize,
    /// The broker's MQTT over TLS address.
    pub broker: SocketAddr,
    /// The name in the broker's certificate.
    pub server_name: String,
    /// Source addresses to bind (agent `i` uses `source_addresses[i / per_source_address]`).
    pub source_addresses: Vec<Ipv4Addr>,
    /// Agents per source address.
    pub agents_per_source_address: usize,
    /// Connects in flight at once in this worker.
    pub connect_concurrency: usize,
    /// Bound on one connect (TCP, TLS, CONNECT, SUBSCRIBE), milliseconds.
    pub connect_timeout_ms: u64,
    /// Which acks to publish.
    pub acks: AckStages,
}

/// What the parent asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum CallCommand {
    /// Enroll every agent; answered by [`CallReply::Enrolled`].
    Enroll,
    /// Connect and subscribe every enrolled agent; answered by [`CallReply::Connected`].
    Connect,
    /// Count wake-ups from zero; answered by [`CallReply::Armed`].
    Arm,
    /// Wait until every connected agent acted on one wake-up, or `wait_ms`; answered by
    /// [`CallReply::Wakeups`].
    Collect {
        /// Bound, milliseconds.
        wait_ms: u64,
    },
    /// Disconnect and exit; answered by [`CallReply::Bye`].
    Shutdown,
}

/// A worker's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum CallReply {
    /// Configuration read.
    Ready {
        /// Its pid.
        pid: u32,
    },
    /// Enrollment done.
    Enrolled(PhaseOutcome),
    /// Connect done.
    Connected(PhaseOutcome),
    /// Counting.
    Armed {
        /// Agents connected now.
        expected: usize,
    },
    /// The wake-ups.
    Wakeups(WakeOutcome),
    /// Exiting.
    Bye,
    /// Could not do it.
    Failed {
        /// Why.
        message: String,
    },
}

/// An enrollment or connect phase of one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PhaseOutcome {
    /// Agents that made it.
    pub ok: usize,
    /// Agents that failed.
    pub failed: usize,
    /// The first failure.
    pub first_error: Option<String>,
    /// How long the phase took in this worker, milliseconds.
    pub elapsed_ms: u64,
}

/// What one worker's agents did with the call.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WakeOutcome {
    /// Agents connected when armed.
    pub expected: usize,
    /// Agents whose wake-up verified and was acknowledged.
    pub acked: usize,
    /// Wake-ups refused by the agent's checks (signature, expiry, identity, replay).
    pub rejected: usize,
    /// The first refusal.
    pub first_rejection: Option<String>,
    /// Wake-ups beyond the first per agent.
    pub duplicates: usize,
    /// Arrival of each agent's first wake-up (Unix ns).
    pub arrivals_unix_ns: Vec<u64>,
}

/// One enrolled agent's credentials.
struct Credentials {
    id: String,
    tls: tokio_rustls::TlsConnector,
    verifier: WakeUpVerifier,
}

/// What an agent tells its worker.
enum Event {
    Connected(Result<(), String>),
    Wakeup {
        arrived_unix_ns: u64,
        verdict: Result<(), String>,
    },
}

/// Runs a call worker until the parent says shutdown or closes stdin.
pub fn run_call_worker() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("call worker: cannot start the async runtime")?;
    runtime.block_on(worker_main())
}

async fn worker_main() -> anyhow::Result<()> {
    let mut lines = stdin_lines();
    let first = lines
        .recv()
        .await
        .context("call worker: no configuration on stdin")?;
    let config: CallWorkerConfig =
        serde_json::from_str(&first).context("call worker: unreadable configuration")?;
    reply(&CallReply::Ready {
        pid: std::process::id(),
    })?;
    let (events_tx, mut events) = mpsc::unbounded_channel::<(usize, Event)>();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut credentials: Vec<Arc<Credentials>> = Vec::new();
    let mut agents = tokio::task::JoinSet::new();
    let mut connected = vec![false; config.agents];
    let mut woken = vec![0u32; config.agents];
    let mut outcome = WakeOutcome::default();
    let mut collecting: Option<tokio::time::Instant> = None;
    let mut connect_started: Option<tokio::time::Instant> = None;
    let mut connect_outcome = PhaseOutcome::default();
    let mut connect_reported = 0usize;

    loop {
        if let Some(deadline) = collecting
            && (outcome.acked + outcome.rejected >= outcome.expected
                || tokio::time::Instant::now() >= deadline)
        {
            reply(&CallReply::Wakeups(std::mem::take(&mut outcome)))?;
            collecting = None;
        }
        let deadline =
            collecting.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400));
        tokio::select! {
            line = lines.recv() => {
                let Some(line) = line else { break };
                let Some(command) = read_command::<CallCommand, CallReply>(&line, "call worker", config.worker)? else {
                    continue;
                };
                match command {
                    CallCommand::Enroll => {
                        let (creds, phase) = enroll_all(&config).await;
                        credentials = creds;
                        reply(&CallReply::Enrolled(phase))?;
                    }
                    CallCommand::Connect => {
                        connect_started = Some(tokio::time::Instant::now());
                        connect_outcome = PhaseOutcome::default();
                        connect_reported = 0;
                        let gate = Arc::new(Semaphore::new(config.connect_concurrency.max(1)));
                        for (local, creds) in credentials.iter().enumerate() {
                            let source = source_of(&config, config.first_agent + local);
                            agents.spawn(run_agent(
                                local,
                                creds.clone(),
                                config.clone(),
                                source,
                                gate.clone(),
                                events_tx.clone(),
                                stop_rx.clone(),
                            ));
                        }
                        if credentials.is_empty() {
                            reply(&CallReply::Connected(connect_outcome.clone()))?;
                        }
                    }
                    CallCommand::Arm => {
                        woken.iter_mut().for_each(|w| *w = 0);
                        outcome = WakeOutcome {
                            expected: connected.iter().filter(|c| **c).count(),
                            ..Default::default()
                        };
                        reply(&CallReply::Armed { expected: outcome.expected })?;
                    }
                    CallCommand::Collect { wait_ms } => {
                        collecting = Some(tokio::time::Instant::now() + Duration::from_millis(wait_ms));
                    }
                    CallCommand::Shutdown => break,
                }
            }
            Some((local, event)) = events.recv() => match event {
                Event::Connected(result) => {
                    connect_reported += 1;
                    match result {
                        Ok(()) => {
                            connect_outcome.ok += 1;
                            if let Some(c) = connected.get_mut(local) { *c = true; }
                        }
                        Err(e) => {
                            connect_outcome.failed += 1;
                            connect_outcome.first_error.get_or_insert(e);
                        }
                    }
                    if connect_reported == credentials.len() {
                        connect_outcome.elapsed_ms = connect_started
                            .map_or(0, |t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
                        reply(&CallReply::Connected(connect_outcome.clone()))?;
                    }
                }
                Event::Wakeup { arrived_unix_ns, verdict } => {
                    let Some(count) = woken.get_mut(local) else { continue };
                    *count += 1;
                    if *count > 1 {
                        outcome.duplicates += 1;
                        continue;
                    }
                    match verdict {
                        Ok(()) => {
                            outcome.acked += 1;
                            outcome.arrivals_unix_ns.push(arrived_unix_ns);
                        }
                        Err(e) => {
                            outcome.rejected += 1;
                            outcome.first_rejection.get_or_insert(e);
                        }
                    }
                }
            },
            () = tokio::time::sleep_until(deadline), if collecting.is_some() => {}
        }
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while agents.join_next().await.is_some() {}
    })
    .await;
    agents.abort_all();
    let _ = reply(&CallReply::Bye);
    Ok(())
}

fn source_of(config: &CallWorkerConfig, global: usize) -> Option<Ipv4Addr> {
    if config.source_addresses.is_empty() {
        return None;
    }
    let slot = global / config.agents_per_source_address.max(1);
    Some(config.source_addresses[slot % config.source_addresses.len()])
}

/// The enrollment answer fields the bench uses.
#[derive(Deserialize)]
struct EnrollAnswer {
    agent_id: String,
    tenant: String,
    certificate: String,
    ca: String,
    wakeup_key: WakeUpKey,
}

#[derive(Deserialize)]
struct WakeUpKey {
    kid: String,
    public_key: String,
}

/// Enrolls every agent of this worker through `POST /api/v1/enroll`, `enroll_concurrency`
/// at a time, each on its own kept-alive connection.
async fn enroll_all(config: &CallWorkerConfig) -> (Vec<Arc<Credentials>>, PhaseOutcome) {
    let started = tokio::time::Instant::now();
    let lanes = config.enroll_concurrency.clamp(1, 64);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..lanes {
        let config = config.clone();
        let next = next.clone();
        tasks.spawn(async move {
            let mut client = HttpClient::new(config.console);
            let mut out = Vec::new();
            loop {
                let local = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if local >= config.agents {
                    return out;
                }
                let id = crate::agent_id(&config.id_prefix, config.first_agent + local);
                out.push((local, enroll_one(&mut client, &config, &id).await));
            }
        });
    }
    let mut results: Vec<(usize, Result<Credentials, String>)> = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(part) = done {
            results.extend(part);
        }
    }
    results.sort_by_key(|(local, _)| *local);
    let mut phase = PhaseOutcome::default();
    let mut creds = Vec::new();
    for (_, r) in results {
        match r {
            Ok(c) => {
                phase.ok += 1;
                creds.push(Arc::new(c));
            }
            Err(e) => {
                phase.failed += 1;
                phase.first_error.get_or_insert(e);
            }
        }
    }
    phase.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    (creds, phase)
}

async fn enroll_one(
    client: &mut HttpClient,
    config: &CallWorkerConfig,
    id: &str,
) -> Result<Credentials, String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("agent {id}: key pair: {e}"))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| format!("agent {id}: CSR: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, id);
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| format!("agent {id}: CSR: {e}"))?;
    let body = serde_json::json!({
        "token": config.enrollment_token,
        "agent_id": id,
        "csr": csr,
        "name": id,
        "inventory": {"hostname": id, "os": "bench"},
    });
    let response = client
        .request(
            "POST",
            "/api/v1/enroll",
            Some(&body),
            Duration::from_secs(60),
        )
        .await
        .map_err(|e| format!("agent {id}: enrollment: {e}"))?;
    if response.status != 201 && response.status != 200 {
        return Err(format!(
            "agent {id}: enrollment refused ({}): {}",
            response.status,
            response.error_message()
        ));
    }
    let answer: EnrollAnswer = serde_json::from_slice(&response.body)
        .map_err(|e| format!("agent {id}: unreadable enrollment answer: {e}"))?;
    if answer.agent_id != id {
        return Err(format!(
            "agent {id}: the console enrolled it as {:?}",
            answer.agent_id
        ));
    }
    let chain = CertificateDer::pem_slice_iter(answer.certificate.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("agent {id}: certificate: {e}"))?;
    let key_der = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
        .map_err(|e| format!("agent {id}: key: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(answer.ca.as_bytes()) {
        let ca = ca.map_err(|e| format!("agent {id}: CA: {e}"))?;
        roots.add(ca).map_err(|e| format!("agent {id}: CA: {e}"))?;
    }
    // The same handshake for every connect; the agent's post-quantum hybrid would only add
    // work to the setup, which is not what this bench measures.
    let options = beckon_pki::ClientTlsOptions {
        key_exchange: beckon_pki::KeyExchange::X25519,
        ..Default::default()
    };
    let tls = beckon_pki::client_config(
        beckon_pki::ServerVerification::Roots(roots),
        Some((chain, key_der)),
        &options,
    )
    .map_err(|e| format!("agent {id}: TLS client certificate: {e}"))?;
    let tenant =
        TenantId::new(answer.tenant.as_str()).map_err(|e| format!("agent {id}: tenant: {e}"))?;
    let kid = KeyId::new(answer.wakeup_key.kid.as_str())
        .map_err(|e| format!("agent {id}: wake-up key id: {e}"))?;
    let public = PublicKey::from_base64(&answer.wakeup_key.public_key)
        .map_err(|e| format!("agent {id}: wake-up key: {e}"))?;
    Ok(Credentials {
        id: id.to_owned(),
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        verifier: WakeUpVerifier::new(tenant, id, [(kid, public)]),
    })
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// One agent's connection: the shared client session over the agent's TLS stream.
type Link = Connection<TlsStream>;

async fn open(
    creds: &Credentials,
    config: &CallWorkerConfig,
    source: Option<Ipv4Addr>,
) -> Result<Link, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if let Some(source) = source {
        socket
            .bind(SocketAddr::new(source.into(), 0))
            .map_err(|e| format!("binding {source}: {e}"))?;
    }
    let tcp = socket
        .connect(config.broker)
        .await
        .map_err(|e| format!("TCP connect to {}: {e}", config.broker))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(config.server_name.clone())
        .map_err(|e| format!("server name {:?}: {e}", config.server_name))?;
    let io = creds
        .tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let mut options = Options::new(ProtocolVersion::V5, creds.id.clone());
    options.keep_alive = Duration::from_secs(300);
    options.max_packet_size = MAX_PACKET;
    let now = tokio::time::Instant::now().into_std();
    let mut link = Connection::start(io, Session::new(options, now));
    let subscription = Subscription {
        filter: beckon_identity::acl::wake_topic(&creds.id),
        options: SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..SubscriptionOptions::default()
        },
    };
    let id = link
        .session_mut()
        .subscribe(vec![subscription], now)
        .map_err(|e| format!("SUBSCRIBE: {e}"))?;
    loop {
        match link.next_event().await {
            Ok(ClientEvent::Subscribed {
                packet_id, codes, ..
            }) if packet_id == id => {
                return match codes.first() {
                    Some(c) if !c.is_error() => Ok(link),
                    Some(c) => Err(format!("the broker refused SUBSCRIBE (0x{:02X})", c.0)),
                    None => Err("SUBACK without a code".into()),
                };
            }
            Ok(_) => {}
            Err(End::Refused { code, .. }) => {
                return Err(format!(
                    "the broker refused CONNECT (reason 0x{:02X})",
                    code.0
                ));
            }
            Err(end) => return Err(end.to_string()),
        }
    }
}

async fn run_agent(
    local: usize,
    creds: Arc<Credentials>,
    config: CallWorkerConfig,
    source: Option<Ipv4Addr>,
    gate: Arc<Semaphore>,
    events: mpsc::UnboundedSender<(usize, Event)>,
    mut stop: watch::Receiver<bool>,
) {
    let limit = Duration::from_millis(config.connect_timeout_ms.max(1));
    let opened = {
        let _permit = gate.acquire().await;
        match tokio::time::timeout(limit, open(&creds, &config, source)).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "agent {}: connect timed out after {limit:?}",
                creds.id
            )),
        }
    };
    let mut link = match opened {
        Ok(l) => {
            let _ = events.send((local, Event::Connected(Ok(()))));
            l
        }
        Err(e) => {
            let _ = events.send((
                local,
                Event::Connected(Err(format!("agent {}: {e}", creds.id))),
            ));
            return;
        }
    };
    let mut replay = ReplayGuard::default();
    loop {
        let event = tokio::select! {
            e = link.next_event() => e,
            () = async { let _ = stop.wait_for(|s| *s).await.map(drop); } => {
                link.disconnect().await;
                return;
            }
        };
        // The session acknowledges the wake-up and ends on the broker's DISCONNECT.
        let p = match event {
            Ok(ClientEvent::Message(p)) => p,
            Ok(_) => continue,
            Err(_) => return,
        };
        let arrived_unix_ns = unix_ns();
        let now_s = i64::try_from(arrived_unix_ns / 1_000_000_000).unwrap_or(i64::MAX);
        let verdict = match creds.verifier.verify(&p.payload, now_s, &mut replay) {
            Ok(wakeup) => {
                let at_ms = i64::try_from(arrived_unix_ns / 1_000_000).unwrap_or(i64::MAX);
                let mut acks = vec![Ack::received(&wakeup.id, at_ms)];
                if config.acks == AckStages::Finished {
                    acks.push(Ack::started(&wakeup.id, at_ms));
                    acks.push(Ack::finished(&wakeup.id, AckStatus::Ok, Some(0), 0, at_ms));
                }
                let now = tokio::time::Instant::now().into_std();
                for ack in acks {
                    let ack = beckon_client::message(
                        format!("agents/{}/ack", creds.id),
                        QoS::AtLeastOnce,
                        Bytes::from(ack.to_json()),
                    );
                    let _ = link.session_mut().publish(ack, now);
                }
                Ok(())
            }
            Err(e) => Err(format!("agent {}: wake-up refused: {e}", creds.id)),
        };
        let _ = events.send((
            local,
            Event::Wakeup {
                arrived_unix_ns,
                verdict,
            },
        ));
        if link.flush().await.is_err() {
            return;
        }
    }
}
