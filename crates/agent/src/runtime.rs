//! The agent's life: a random delay at start, then connect, run the session, record why it
//! ended, wait (backoff with jitter, longer when the broker is busy, at the cap when the
//! credentials are refused, soon after a redirect) and connect again, forever. Beside it, the
//! action worker runs wake-ups one batch at a time, and the check-in scheduler.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, watch};

use crate::actions::{self, ActionOutcome};
use crate::config::{AgentConfig, ConfigError, parse_http_url};
use crate::connector::Connector;
use crate::jitter::{near_cap, random_up_to};
use crate::session::{
    Incoming, MqttSession, OnIncoming, Outbox, SessionEnd, SessionOptions, new_client,
};
use crate::state::{IdentityConflict, LastResult, LastWakeUp, StateError, StateStore};
use crate::takeover::{AfterTakeover, TakeoverGuard};
use crate::timefmt::{unix_now, unix_now_ms};
use crate::wakeup::{WakeUp, WakeUpCheck, WakeUpRejected, finished_ack, received_ack, started_ack};
use beckon_identity::relay::RelayRequest;
use beckon_identity::wakeup::ReplayGuard;
use beckon_mqtt::ReasonCode;
use beckon_net::Backoff;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state folder is not usable.
    #[error("{0}; the agent needs a writable state folder (state_dir)")]
    State(#[from] StateError),
    /// The configuration asks for something this build cannot do yet.
    #[error("{0}")]
    Unsupported(String),
}

/// Relay requests waiting for the relay worker.
const RELAY_QUEUE: usize = 64;

/// How long the agent must have been quiet (no new connection, wake-up or check-in) before
/// it gives back the memory that work left behind.
const QUIET_BEFORE_RELEASE: Duration = Duration::from_secs(10);

/// Wake-ups accepted but not yet acted on; everything here merges into the next run.
#[derive(Default)]
pub struct PendingWakeUps {
    queue: Mutex<Vec<WakeUp>>,
    notify: Notify,
}

impl PendingWakeUps {
    fn push(&self, wakeup: WakeUp) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(wakeup);
        self.notify.notify_one();
    }

    fn take(&self) -> Vec<WakeUp> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// What every connection of the agent works with: set up once by [`run_agent`], the same
/// for each connection and for each wake-up or relay request that arrives on it.
struct Agent {
    config: Arc<AgentConfig>,
    check: Arc<dyn WakeUpCheck>,
    state: Arc<StateStore>,
    /// Acks and relay results waiting for the session.
    outbox: Arc<Outbox>,
    /// Accepted wake-ups waiting for the action worker.
    pending: Arc<PendingWakeUps>,
    /// Verified relay requests for the relay worker.
    relay: tokio::sync::mpsc::Sender<RelayRequest>,
    /// The agent's token, sent as the MQTT password.
    password: Option<Bytes>,
    /// Check-ins with the console, when it is configured.
    checkin: Option<Arc<CheckinClient>>,
    /// Told after each piece of work: see [`release_when_quiet`].
    worked: Arc<Notify>,
}

/// What one connection attempt leaves to the next: how to connect (the ladder remembers the
/// working path and redirects), the client session (unacknowledged acks are resent on the
/// next connection) and the backoff.
struct Link<C> {
    connector: C,
    client: Option<beckon_client::Session>,
    backoff: Backoff,
    /// Counts session takeovers: another machine with this identity.
    takeovers: TakeoverGuard,
}

/// Runs the agent until `shutdown` turns true (or its sender is dropped).
pub async fn run_agent<C: Connector>(
    config: AgentConfig,
    mut connector: C,
    check: Arc<dyn WakeUpCheck>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let config = Arc::new(config);
    let mut backoff = Backoff::new(config.reconnect.backoff())
        .map_err(|e| AgentError::Unsupported(format!("reconnect settings: {e}")))?;
    let state = Arc::new(StateStore::open(&config.state_dir, &config.agent_id)?);
    // The first write: it also proves the state folder is writable.
    state
        .update(|s| {
            if s.replay_guard.is_empty() {
                s.replay_guard = ReplayGuard::new(config.wakeup.replay_memory);
            }
        })
        .await?;
    if let Some(path) = state.snapshot().last_working_path {
        connector.prefer(&path);
    }
    let password = config.token()?.map(Bytes::from);
    let checkin_client = CheckinClient::new(&config)?.map(Arc::new);
    let outbox = Arc::new(Outbox::new(1024));
    let pending = Arc::new(PendingWakeUps::default());
    let worked = Arc::new(Notify::new());
    let release = tokio::spawn(release_when_quiet(Arc::clone(&worked)));
    // Relay requests are few (a person clicks Wake-on-LAN); when the worker is this far
    // behind, a further request is dropped with a warning instead of queueing without bound.
    let (relay_tx, relay_rx) = tokio::sync::mpsc::channel(RELAY_QUEUE);
    let relay = config.wakeup.relay.then(|| {
        tokio::spawn(relay_worker(
            relay_rx,
            Arc::clone(&outbox),
            Arc::clone(&state),
        ))
    });

    if config.actions.command.is_none()
        && config.actions.http.is_none()
        && !(config.checkin.on_wakeup && config.checkin.console_url.is_some())
    {
        tracing::warn!("no action configured: wake-ups will be acknowledged and do nothing");
    }
    let worker = tokio::spawn(action_worker(
        Arc::clone(&config),
        Arc::clone(&pending),
        Arc::clone(&outbox),
        Arc::clone(&state),
        checkin_client.clone(),
        Arc::clone(&worked),
        shutdown.clone(),
    ));
    let checkin = checkin_client.clone().map(|client| {
        tokio::spawn(checkin_scheduler(
            Arc::clone(&config),
            client,
            Arc::clone(&worked),
            shutdown.clone(),
        ))
    });
    // Certificates issued by the console are renewed through it before they run out.
    let renewal = (config.checkin.console_url.is_some() && config.broker.client_cert.is_some())
        .then(|| {
            tokio::spawn(crate::renew::renewal_loop(
                Arc::clone(&config),
                Some(Arc::clone(&state)),
                shutdown.clone(),
            ))
        });

    // The random start delay spreads the reconnects of many agents restarted at once (a
    // reboot, an update). An agent that never connected, just enrolled with its operator
    // waiting to see it online, connects at once.
    let never_connected = state.snapshot().last_working_path.is_none();
    let start_delay = if never_connected {
        Duration::ZERO
    } else {
        backoff.startup_delay()
    };
    tracing::info!(agent_id = %config.agent_id, delay_ms = start_delay.as_millis() as u64, never_connected, "agent starting");
    let agent = Agent {
        config: Arc::clone(&config),
        check,
        state: Arc::clone(&state),
        outbox,
        pending,
        relay: relay_tx,
        password,
        checkin: checkin_client,
        worked,
    };
    let mut link = Link {
        connector,
        client: None,
        backoff,
        takeovers: TakeoverGuard::new(config.reconnect.takeover_limits()),
    };
    if !sleep_or_shutdown(start_delay, &mut shutdown).await {
        loop {
            let wait = agent.connect_once(&mut link, &mut shutdown).await;
            if stopping(&shutdown) {
                break;
            }
            tracing::info!(
                wait_ms = wait.as_millis() as u64,
                "reconnecting after a pause"
            );
            if sleep_or_shutdown(wait, &mut shutdown).await {
                break;
            }
        }
    }
    state
        .update_logged(|s| {
            s.connected = false;
            s.since = Some(unix_now());
            s.pid = None;
        })
        .await;
    worker.abort();
    release.abort();
    if let Some(relay) = relay {
        relay.abort();
    }
    if let Some(checkin) = checkin {
        checkin.abort();
    }
    if let Some(renewal) = renewal {
        renewal.abort();
    }
    tracing::info!("agent stopped");
    Ok(())
}

impl Agent {
    /// One connection attempt and, if it succeeds, the whole session. Returns the wait
    /// before the next attempt.
    async fn connect_once<C: Connector>(
        &self,
        link: &mut Link<C>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Duration {
        let config = &*self.config;
        // The connector times its own steps; this bounds a whole ladder walk.
        let ladder_limit = config.broker.connect_timeout.saturating_mul(8);
        let connection = tokio::select! {
            c = tokio::time::timeout(ladder_limit, link.connector.connect()) => c,
            _ = shutdown.changed() => return Duration::ZERO,
        };
        let proxy = link.connector.proxy_found();
        if proxy != self.state.snapshot().proxy {
            self.state.update_logged(|s| s.proxy = proxy).await;
        }
        let connection = match connection {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot reach the push service");
                self.state.record_error(e.0).await;
                return link.backoff.next_delay();
            }
            Err(_) => {
                let message = format!(
                    "no path to the push service opened within {ladder_limit:?}; run `beckon doctor` to see which step fails"
                );
                tracing::warn!("{message}");
                self.state.record_error(message).await;
                return link.backoff.next_delay();
            }
        };
        let path = connection.path.clone();
        let password = self.password.clone();
        let options = SessionOptions {
            client_id: config.agent_id.clone(),
            username: password.as_ref().map(|_| config.agent_id.clone()),
            password,
            keepalive: if connection.fallback {
                config.broker.keepalive_fallback
            } else {
                config.broker.keepalive_direct
            },
            ping_timeout: config.broker.ping_timeout,
            connect_timeout: config.broker.connect_timeout,
            session_expiry: u32::try_from(config.broker.session_expiry.as_secs())
                .unwrap_or(u32::MAX),
            wake_topic: config.wake_topic(),
            ack_topic: config.ack_topic(),
            relay_topics: config.wakeup.relay.then(|| {
                (
                    beckon_identity::relay::relay_topic(&config.agent_id),
                    beckon_identity::relay::relay_result_topic(&config.agent_id),
                )
            }),
            via_proxy: connection.via_proxy,
        };
        let session = link.client.take().unwrap_or_else(|| new_client(&options));
        let end = match MqttSession::establish(connection.stream, session, options).await {
            Err((session, end)) => {
                link.client = Some(session);
                end
            }
            Ok((session, established)) => {
                tracing::info!(
                    path = %path,
                    keepalive_s = established.keepalive.as_secs(),
                    session_present = established.session_present,
                    "connected to the push service"
                );
                self.state
                    .update_logged(|s| {
                        s.connected = true;
                        s.path = Some(path.clone());
                        s.last_working_path = Some(path.clone());
                        s.since = Some(unix_now());
                    })
                    .await;
                link.connector.prefer(&path);
                self.worked.notify_one();
                let connected_at = std::time::Instant::now();
                link.backoff.connected(connected_at);
                let (session, end) = session.run(&self.outbox, self, shutdown).await;
                link.client = Some(session);
                // Resets the backoff only if the connection lived `reset_after`.
                link.backoff.disconnected(std::time::Instant::now());
                let conflict_over = link.takeovers.session_lived(connected_at.elapsed());
                if conflict_over {
                    tracing::info!(
                        "the connection lived a whole takeover window: no other machine uses this agent's identity any more"
                    );
                }
                self.state
                    .update_logged(|s| {
                        s.connected = false;
                        if conflict_over {
                            s.identity_conflict = None;
                        }
                        s.since = Some(unix_now());
                        if end != SessionEnd::Shutdown {
                            // Kept apart from last_error, which the reconnect attempts overwrite.
                            s.last_disconnect = Some(crate::state::LastError {
                                message: format!("{end} (path {path})"),
                                at: unix_now(),
                            });
                        }
                    })
                    .await;
                end
            }
        };
        if end == SessionEnd::Shutdown {
            return Duration::ZERO;
        }
        let message = format!("{end} (path {path})");
        tracing::warn!("{message}");
        self.state.record_error(message).await;
        if matches!(
            end,
            SessionEnd::Disconnected {
                code: ReasonCode::SESSION_TAKEN_OVER,
                ..
            }
        ) {
            self.report_takeover();
            if let AfterTakeover::Pause { takeovers, pause } =
                link.takeovers.taken_over(std::time::Instant::now())
            {
                return self.pause_for_clone(takeovers, pause).await;
            }
        }
        wait_after(&end, config, &mut link.connector, &mut link.backoff)
    }

    /// Checks in at once, so that the console sees which machine each takeover came from
    /// (two machines with one identity check in with two inventories, by turns).
    fn report_takeover(&self) {
        if let Some(client) = &self.checkin {
            let (client, config) = (Arc::clone(client), Arc::clone(&self.config));
            tokio::spawn(async move {
                let outcome = client.checkin(&config, None, true).await;
                if let Some(detail) = outcome.detail {
                    tracing::warn!(%detail, "check-in after a takeover failed");
                }
            });
        }
    }

    /// Another machine uses this identity: says so once, in the log and the state, and
    /// returns the long pause.
    async fn pause_for_clone(&self, takeovers: u32, pause: Duration) -> Duration {
        let window = self.config.reconnect.takeover_window;
        tracing::error!(
            takeovers,
            window_s = window.as_secs(),
            pause_s = pause.as_secs(),
            "another machine uses this agent's identity (agent id {}): the push session was taken over {takeovers} times within {window:?}; not reconnecting for {pause:?} so that the other machine keeps its connection. Fix: on one of the machines run `beckon agent enroll --force` to give it an identity of its own, then restart its agent",
            self.config.agent_id
        );
        let now = unix_now();
        let pause_secs = i64::try_from(pause.as_secs()).unwrap_or(i64::MAX);
        self.state
            .update_logged(|s| {
                s.identity_conflict = Some(IdentityConflict {
                    takeovers,
                    window_secs: window.as_secs(),
                    paused_at: now,
                    paused_until: now.saturating_add(pause_secs),
                });
            })
            .await;
        pause
    }
}

/// How long to wait after a session ended this way.
fn wait_after<C: Connector>(
    end: &SessionEnd,
    config: &AgentConfig,
    connector: &mut C,
    backoff: &mut Backoff,
) -> Duration {
    let (code, reference) = match end {
        SessionEnd::Refused {
            code,
            server_reference,
            ..
        }
        | SessionEnd::Disconnected {
            code,
            server_reference,
            ..
        } => (Some(*code), server_reference.as_deref()),
        SessionEnd::SubscribeRefused(_) => {
            backoff.next_delay();
            return near_cap(config.reconnect.backoff_cap);
        }
        SessionEnd::Shutdown => return Duration::ZERO,
        _ => (None, None),
    };
    match (code, reference) {
        (Some(ReasonCode::SERVER_BUSY | ReasonCode::CONNECTION_RATE_EXCEEDED), _) => {
            backoff.next_busy_delay()
        }
        (Some(ReasonCode::USE_ANOTHER_SERVER | ReasonCode::SERVER_MOVED), Some(reference)) => {
            tracing::info!(
                server_reference = reference,
                "following the broker's redirect"
            );
            connector.redirect(reference);
            // Soon, but jittered: a whole fleet is being redirected at once.
            random_up_to(config.reconnect.backoff_base)
        }
        (
            Some(
                ReasonCode::CLIENT_IDENTIFIER_NOT_VALID
                | ReasonCode::BAD_USER_NAME_OR_PASSWORD
                | ReasonCode::NOT_AUTHORIZED
                | ReasonCode::BANNED
                | ReasonCode::BAD_AUTHENTICATION_METHOD,
            ),
            _,
        ) if matches!(end, SessionEnd::Refused { .. }) => {
            tracing::error!(
                "the broker refuses this agent's credentials; retrying rarely (about every {:?}) until an administrator fixes it",
                config.reconnect.backoff_cap
            );
            // Counts as a failure; the wait itself stays near the cap.
            backoff.next_delay();
            near_cap(config.reconnect.backoff_cap)
        }
        _ => backoff.next_delay(),
    }
}

/// Each wake-up or relay payload, before the session sends its PUBACK: checked, recorded
/// in the state (on disk before the `received` ack goes out), handed on.
impl OnIncoming for Agent {
    async fn on_incoming(&self, incoming: Incoming) {
        let (check, state) = (&self.check, &self.state);
        let payload = match incoming {
            Incoming::WakeUp(payload) => payload,
            Incoming::Relay(payload) => {
                let now = unix_now();
                let result = state
                    .update_logged(|s| check.check_relay(&payload, now, &mut s.replay_guard))
                    .await;
                match result {
                    Ok(request) => {
                        tracing::info!(id = %request.id, target = %request.target, broadcast = %request.broadcast, "Wake-on-LAN relay request received");
                        if let Err(e) = self.relay.try_send(request) {
                            tracing::warn!(error = %e, "relay worker busy; relay request dropped");
                        }
                    }
                    Err(WakeUpRejected::Replayed(id)) => {
                        tracing::info!(%id, "relay request already received; replay dropped");
                    }
                    Err(e) => {
                        // Not answered: the id of a request that failed its checks cannot
                        // be trusted.
                        tracing::warn!(error = %e, "Wake-on-LAN relay request refused");
                        state
                            .record_error(format!("relay request refused: {e}"))
                            .await;
                    }
                }
                return;
            }
        };
        let now = unix_now();
        let result = state
            .update_logged(|s| {
                let result = check.check(&payload, now, &mut s.replay_guard);
                if let Ok(w) = &result {
                    s.last_wakeup = Some(LastWakeUp {
                        id: w.id.clone(),
                        reason: w.reason.clone(),
                        received_at: now,
                    });
                }
                result
            })
            .await;
        match result {
            Ok(wakeup) => {
                tracing::info!(id = %wakeup.id, reason = %wakeup.reason, "wake-up received");
                self.outbox.push(received_ack(&wakeup.id, unix_now_ms()));
                self.pending.push(wakeup);
            }
            Err(WakeUpRejected::Replayed(id)) => {
                // A QoS 1 redelivery after a lost PUBACK looks the same: not an error.
                tracing::info!(%id, "wake-up already received; replay dropped");
            }
            Err(e) => {
                // Not acked: the id of a payload that failed its checks cannot be trusted.
                tracing::warn!(error = %e, "wake-up refused");
                state.record_error(e.to_string()).await;
            }
        }
    }
}

/// Sends the magic packets of verified relay requests, one request at a time, and queues
/// each result for `agents/{id}/relay-result`.
async fn relay_worker(
    mut requests: tokio::sync::mpsc::Receiver<RelayRequest>,
    outbox: Arc<Outbox>,
    state: Arc<StateStore>,
) {
    while let Some(request) = requests.recv().await {
        // The machine's own subnets, read now: addresses change (DHCP, VPN, roaming).
        let own = crate::relay::own_broadcasts(&crate::inventory::Inventory::gather().addresses);
        let result = crate::relay::perform(&request, &own, unix_now_ms()).await;
        for send in &result.sends {
            match &send.error {
                None => {
                    tracing::info!(mac = %send.mac, destination = %send.destination, packets = send.packets, target = %request.target, "Wake-on-LAN relayed")
                }
                Some(e) => {
                    tracing::warn!(mac = %send.mac, destination = %send.destination, error = %e, "Wake-on-LAN relay failed");
                    state.record_error(format!("Wake-on-LAN relay: {e}")).await;
                }
            }
        }
        outbox.push_relay_result(result.to_json());
    }
}

/// Runs wake-ups one batch at a time: everything that arrives while a run is going on merges
/// into the one follow-up run.
async fn action_worker(
    config: Arc<AgentConfig>,
    pending: Arc<PendingWakeUps>,
    outbox: Arc<Outbox>,
    state: Arc<StateStore>,
    checkin: Option<Arc<CheckinClient>>,
    worked: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = pending.notify.notified() => {}
            _ = shutdown.changed() => return,
        }
        let mut batch = pending.take();
        // The most urgent call of the batch sets the pace.
        let Some(merged) = WakeUp::merge(&batch) else {
            continue;
        };
        let spread = Duration::from_secs(u64::from(merged.spread)).min(config.wakeup.max_spread);
        let delay = random_up_to(spread);
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "spreading the wake-up action"
            );
            if sleep_or_shutdown(delay, &mut shutdown).await {
                return;
            }
            // Wake-ups that came during the spread delay are answered by this same run.
            batch.extend(pending.take());
        }
        for w in &batch {
            outbox.push(started_ack(&w.id, unix_now_ms()));
        }
        let outcome = tokio::select! {
            outcome = run_actions(&config, &batch, checkin.as_deref()) => outcome,
            _ = shutdown.changed() => return,
        };
        let now = unix_now();
        tracing::info!(
            status = outcome.status,
            exit_code = ?outcome.exit_code,
            duration_ms = outcome.duration.as_millis() as u64,
            wakeups = batch.len(),
            "wake-up action finished"
        );
        // On disk before the `finished` acks: whoever gets one can read the result.
        state
            .update_logged(|s| {
                s.last_result = Some(LastResult {
                    wakeup_ids: batch.iter().map(|w| w.id.clone()).collect(),
                    status: outcome.status.to_owned(),
                    exit_code: outcome.exit_code,
                    duration_ms: outcome.duration.as_millis() as u64,
                    finished_at: now,
                    detail: outcome.detail.clone(),
                });
                if let Some(detail) = &outcome.detail
                    && !outcome.ok()
                {
                    s.last_error = Some(crate::state::LastError {
                        message: format!("wake-up action: {detail}"),
                        at: now,
                    });
                }
            })
            .await;
        for w in &batch {
            outbox.push(finished_ack(&w.id, &outcome, unix_now_ms()));
        }
        worked.notify_one();
    }
}

/// Runs every configured action for one batch; the combined outcome is the first failure.
async fn run_actions(
    config: &AgentConfig,
    batch: &[WakeUp],
    checkin: Option<&CheckinClient>,
) -> ActionOutcome {
    let started = std::time::Instant::now();
    let mut outcomes = Vec::new();
    let latest = batch.last();
    // The latest wake-up's (verified) JSON goes to the command's stdin and the HTTP body.
    let latest_json = latest
        .map(|w| serde_json::to_vec(w).unwrap_or_default())
        .unwrap_or_default();
    if config.checkin.on_wakeup
        && let Some(client) = checkin
    {
        outcomes.push(
            client
                .checkin(config, latest.map(|w| w.id.as_str()), false)
                .await,
        );
    }
    if let Some(command) = &config.actions.command {
        let env = actions::wakeup_env(batch, &config.agent_id, &config.tenant);
        outcomes.push(actions::run_command(command, &env, &latest_json, &config.state_dir).await);
    }
    if let Some(http) = &config.actions.http {
        match parse_http_url(&http.url) {
            Some(url) => {
                let headers: Vec<(&str, String)> = latest
                    .map(|w| {
                        vec![
                            ("X-Beckon-Wakeup-Id", w.id.clone()),
                            ("X-Beckon-Wakeup-Count", batch.len().to_string()),
                        ]
                    })
                    .unwrap_or_default();
                outcomes.push(
                    actions::run_http(&url, &http.method, http.timeout, &headers, &latest_json)
                        .await,
                );
            }
            None => outcomes.push(ActionOutcome {
                status: "error",
                exit_code: None,
                detail: Some(format!("actions.http.url {:?} is not usable", http.url)),
                duration: Duration::ZERO,
            }),
        }
    }
    let exit_code = outcomes.iter().find_map(|o| o.exit_code);
    let failure = outcomes.iter().find(|o| !o.ok());
    ActionOutcome {
        status: failure.map_or("ok", |o| o.status),
        exit_code,
        detail: failure.and_then(|o| o.detail.clone()),
        duration: started.elapsed(),
    }
}

/// Checks in with the console: `POST {console_url}/api/v1/agents/{id}/checkin`, over HTTP
/// or HTTPS, with the check-in secret as bearer token.
pub struct CheckinClient {
    url: crate::http::Url,
    token: Option<String>,
    http: crate::http::HttpClient,
}

impl CheckinClient {
    /// The client for `config.checkin`; `None` when no console URL is set.
    pub fn new(config: &AgentConfig) -> Result<Option<Self>, AgentError> {
        let Some(base) = config.checkin.console_url.as_deref() else {
            return Ok(None);
        };
        let base = crate::http::Url::parse(base.trim_end_matches('/'))
            .map_err(|e| AgentError::Unsupported(format!("checkin.console_url: {e}")))?;
        let url = base.with_path(&format!(
            "{}/api/v1/agents/{}/checkin",
            base.path.trim_end_matches('/'),
            config.agent_id
        ));
        let http = crate::http::console_client(&url, config.checkin.ca_file.as_deref())
            .map_err(|e| AgentError::Unsupported(format!("checkin.ca_file: {e}")))?;
        Ok(Some(Self {
            url,
            token: config.checkin_token()?,
            http,
        }))
    }

    /// One check-in with this machine's inventory; `wakeup_id` names the wake-up that
    /// caused it, `taken_over` says that the push session was just taken over by another
    /// connection with this agent's id.
    pub async fn checkin(
        &self,
        config: &AgentConfig,
        wakeup_id: Option<&str>,
        taken_over: bool,
    ) -> ActionOutcome {
        let started = std::time::Instant::now();
        let inventory = crate::inventory::Inventory::gather();
        let body = serde_json::json!({
            "agent_id": config.agent_id,
            "tenant": config.tenant,
            "hostname": inventory.hostname,
            "inventory": inventory,
            "taken_over": taken_over,
            "wakeup_id": wakeup_id,
            "at": crate::timefmt::format_rfc3339(unix_now()),
        });
        let mut headers = Vec::new();
        if let Some(token) = &self.token {
            headers.push(("Authorization", format!("Bearer {token}")));
        }
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let result = crate::http::request(
            &self.http,
            &self.url,
            "POST",
            &headers,
            &body,
            config.checkin.timeout,
        )
        .await;
        let (status, detail) = match result {
            Ok(r) if (200..300).contains(&r.status) => ("ok", None),
            Ok(r) => (
                "failed",
                Some(format!(
                    "check-in at {} answered HTTP {}: {}",
                    self.url,
                    r.status,
                    r.error_message()
                )),
            ),
            Err(e) => ("error", Some(format!("check-in: {e}"))),
        };
        ActionOutcome {
            status,
            exit_code: None,
            detail,
            duration: started.elapsed(),
        }
    }
}

/// Checks in every `interval ± jitter`, whether or not the push connection is up.
async fn checkin_scheduler(
    config: Arc<AgentConfig>,
    client: Arc<CheckinClient>,
    worked: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let jitter = random_up_to(config.checkin.jitter.saturating_mul(2));
        let wait = config
            .checkin
            .interval
            .saturating_sub(config.checkin.jitter)
            + jitter;
        if sleep_or_shutdown(wait, &mut shutdown).await {
            return;
        }
        let outcome = client.checkin(&config, None, false).await;
        if outcome.ok() {
            tracing::debug!("checked in with the console");
        } else {
            tracing::warn!(detail = ?outcome.detail, "check-in with the console failed");
        }
        worked.notify_one();
    }
}

/// Gives back the memory a burst of work left behind (start-up and connecting above all:
/// [`crate::platform::release_idle_memory`]) once the agent has been quiet for
/// [`QUIET_BEFORE_RELEASE`], so that an idle agent holds only what idling needs.
async fn release_when_quiet(worked: Arc<Notify>) {
    loop {
        worked.notified().await;
        // More work starts the quiet wait again.
        while tokio::time::timeout(QUIET_BEFORE_RELEASE, worked.notified())
            .await
            .is_ok()
        {}
        crate::platform::release_idle_memory();
    }
}

/// True when the agent must stop (asked to, or nobody can ask any more).
fn stopping(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow() || shutdown.has_changed().is_err()
}

/// Sleeps; true when shutdown came first.
async fn sleep_or_shutdown(wait: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if stopping(shutdown) {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(wait) => *shutdown.borrow(),
        changed = shutdown.changed() => changed.is_err() || *shutdown.borrow(),
    }
}
