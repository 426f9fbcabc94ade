//! The console's own broker connection: publishes signed wake-ups (QoS 1, with message
//! expiry) to `agents/{id}/wake`, marks them `sent` on PUBACK, follows `agents/+/ack` and
//! `agents/+/presence`, resends what is still pending when an agent comes online (several
//! pending wake-ups for one agent go out as one message), and expires what is overdue.

use std::collections::HashMap;
use std::time::Duration;

use beckon_identity::acl::PresenceEvent;
use beckon_identity::wakeup::{Ack, AckStage, AckStatus, MAX_TEXT_LEN, WakeUp};
use beckon_identity::{ConnectionPath, PresenceState};
use beckon_mqtt::{
    Connect, Packet, Properties, ProtocolVersion, Publish, QoS, RetainHandling, Subscribe,
    Subscription, SubscriptionOptions,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::model::*;
use crate::store::{DeliveryAdvance, DeliveryUpdate, StoreResult};
use crate::{AppState, BrokerLink};

/// Largest packet the console accepts from the broker.
const MAX_PACKET: u32 = 256 * 1024;
/// Keep alive of the console's connection, seconds.
const KEEP_ALIVE: u16 = 30;
/// The console's MQTT client id (its server identity id).
pub const CLIENT_ID: &str = "console";

/// How often the doctor runs while the push service stays unreachable.
const DIAGNOSIS_EVERY: Duration = Duration::from_secs(60);

/// Work for the dispatcher.
#[derive(Debug)]
pub enum Command {
    /// A new call: publish one wake-up per delivery.
    Publish(WakeCall, Vec<CallDelivery>),
    /// Publish a signed Wake-on-LAN relay request to `agents/{agent}/relay`.
    Relay {
        /// The relaying agent.
        agent: String,
        /// The request id (the sends recorded for it are updated on failure or answer).
        request_id: String,
        /// The signed request.
        payload: Vec<u8>,
        /// Message expiry, seconds.
        expiry_secs: u32,
    },
    /// The broker is listening now (see [`ConsoleConfig::broker_starts_later`](crate::ConsoleConfig::broker_starts_later)).
    BrokerReady,
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await.map(drop);
}

/// Runs until `shutdown`: keeps the broker connection (reconnecting with backoff) and the
/// expiry sweep.
pub async fn run(
    st: AppState,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = beckon_net::Backoff::new(beckon_net::BackoffConfig {
        base: Duration::from_millis(500),
        cap: Duration::from_secs(30),
        ..Default::default()
    })
    .ok();
    let mut last_diagnosis = None;
    if st.config.broker_starts_later && st.config.broker != BrokerLink::None {
        // `beckon up` starts the broker after the console (the broker needs the console's
        // CA): trying before it listens would only log a failure at every start.
        loop {
            tokio::select! {
                c = commands.recv() => match c {
                    Some(Command::BrokerReady) => break,
                    // Calls stay queued; they go out when the connection comes up.
                    Some(Command::Publish(..)) => {}
                    Some(Command::Relay { request_id, .. }) => relay_not_sent(&st, request_id).await,
                    None => return,
                },
                () = stopped(&mut shutdown) => return,
            }
        }
    }
    loop {
        if *shutdown.borrow() {
            return;
        }
        let result = match &st.config.broker {
            BrokerLink::None => idle(&st, &mut commands, &mut shutdown).await,
            link => session(&st, link, &mut commands, &mut shutdown).await,
        };
        if *shutdown.borrow() {
            return;
        }
        let error = match result {
            Ok(()) => "the connection closed".to_owned(),
            Err(e) => e,
        };
        set_status(&st, false, Some(error.clone()));
        tracing::warn!(%error, "push service connection lost");
        if let BrokerLink::Tls { .. } = &st.config.broker
            && last_diagnosis.is_none_or(|t: tokio::time::Instant| t.elapsed() > DIAGNOSIS_EVERY)
        {
            last_diagnosis = Some(tokio::time::Instant::now());
            let report = tokio::select! {
                r = diagnose(&st) => r,
                () = stopped(&mut shutdown) => return,
            };
            if let Ok(mut p) = st.push.lock()
                && !p.connected
                && let Some((summary, value)) = report
            {
                p.message = format!("Push service servers are not reachable: {summary}");
                p.diagnosis = Some(value);
            }
        }
        let wait = backoff
            .as_mut()
            .map_or(Duration::from_secs(1), |b| b.next_delay());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}

fn set_status(st: &AppState, connected: bool, error: Option<String>) {
    if let Ok(mut p) = st.push.lock() {
        if p.connected != connected || error.is_some() {
            p.since = now_ms();
        }
        p.connected = connected;
        if connected {
            p.diagnosis = None;
        }
        p.message = if connected {
            "Push service servers are reachable".into()
        } else {
            format!(
                "Push service servers are not reachable: {}",
                error.as_deref().unwrap_or("not connected")
            )
        };
        if error.is_some() {
            p.last_error = error;
        }
    }
}

/// Without a broker: keep expiring calls, drop send requests (they stay queued).
async fn idle(
    st: &AppState,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    set_status(st, false, Some("no broker connection is configured".into()));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => expire(st).await,
            c = commands.recv() => match c {
                None => return Ok(()),
                Some(Command::Relay { request_id, .. }) => relay_not_sent(st, request_id).await,
                Some(_) => {}
            },
            _ = stopped(shutdown) => return Ok(()),
        }
    }
}

/// A relay request that could not go out: its sends say why.
async fn relay_not_sent(st: &AppState, request_id: String) {
    let error = "not sent: the console is not connected to the push service";
    if let Err(e) = st
        .store
        .run(move |s| s.fail_relay(&request_id, error))
        .await
    {
        tracing::warn!(error = %e, "recording a relay failure failed");
    }
}

async fn expire(st: &AppState) {
    match st.store.run(|s| s.expire_due(now_ms())).await {
        Ok(changed) => publish_events(st, &changed),
        Err(e) => tracing::warn!(error = %e, "expiring wake-ups failed"),
    }
}

fn publish_events(st: &AppState, changed: &[CallDelivery]) {
    for d in changed {
        let _ = st.events.send(CallEvent {
            call_id: d.call_id.clone(),
            agent_id: d.agent_id.clone(),
            state: d.state,
            at: now_ms(),
        });
    }
}

async fn connect(st: &AppState, link: &BrokerLink) -> Result<beckon_net::BoxedStream, String> {
    match link {
        BrokerLink::None => Err("no broker configured".into()),
        BrokerLink::Anonymous { address } => {
            let tcp = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(address.as_str()),
            )
            .await
            .map_err(|_| format!("TCP connect to {address} timed out"))?
            .map_err(|e| format!("TCP connect to {address} failed: {e}"))?;
            let _ = tcp.set_nodelay(true);
            Ok(Box::new(tcp))
        }
        BrokerLink::Tls {
            host,
            port,
            ca_file,
        } => {
            // The console's server identity: a client certificate from its own CA, made
            // fresh for each connection (cheap, and never stale).
            let issued = st
                .ca
                .issue_client(
                    CLIENT_ID,
                    Some(st.tenant.as_str()),
                    Some("server"),
                    Duration::from_secs(7 * 24 * 3600),
                )
                .map_err(|e| format!("cannot issue the console's client certificate: {e}"))?;
            let trust = match ca_file {
                Some(p) => beckon_net::TrustAnchors::CaFile(p.clone()),
                None => beckon_net::TrustAnchors::CaPem(st.ca.cert_pem().as_bytes().to_vec()),
            };
            let tls = beckon_net::TlsClient::new(&beckon_net::TlsSettings {
                trust,
                identity: Some(beckon_net::ClientIdentity::Pem {
                    cert: issued.cert_pem.into_bytes(),
                    key: issued.key_pem.into_bytes(),
                }),
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
            let mut config = beckon_net::LadderConfig::new(host.clone());
            config.primary_port = *port;
            let mut ladder = beckon_net::ConnectionLadder::new(config, std::sync::Arc::new(tls));
            let connected = ladder.connect().await.map_err(|e| e.to_string())?;
            Ok(connected.stream)
        }
    }
}

/// Runs the doctor's checks on the broker paths with the console's own identity; returns
/// the summary line and the report.
async fn diagnose(st: &AppState) -> Option<(String, serde_json::Value)> {
    let BrokerLink::Tls {
        host,
        port,
        ca_file,
    } = &st.config.broker
    else {
        return None;
    };
    let issued = st
        .ca
        .issue_client(
            CLIENT_ID,
            Some(st.tenant.as_str()),
            Some("server"),
            Duration::from_secs(24 * 3600),
        )
        .ok()?;
    let mut config = beckon_doctor::DoctorConfig::new(host.clone());
    config.primary_port = *port;
    config.tls.trust = match ca_file {
        Some(p) => beckon_net::TrustAnchors::CaFile(p.clone()),
        None => beckon_net::TrustAnchors::CaPem(st.ca.cert_pem().as_bytes().to_vec()),
    };
    config.ca_label = Some(match ca_file {
        Some(p) => format!("the broker CA file {} (--broker-ca)", p.display()),
        None => "the console's tenant CA (set --broker-ca if the broker's certificate comes from another CA)".into(),
    });
    config.tls.identity = Some(beckon_net::ClientIdentity::Pem {
        cert: issued.cert_pem.into_bytes(),
        key: issued.key_pem.into_bytes(),
    });
    // The console is not connected, so checking under its own client id takes nothing over.
    config.client_id = Some(CLIENT_ID.into());
    config.step_timeout = Duration::from_secs(5);
    let report = beckon_doctor::diagnose(&config).await;
    let value = serde_json::to_value(&report).ok()?;
    Some((report.summary.clone(), value))
}

struct Conn {
    stream: beckon_net::BoxedStream,
    rbuf: BytesMut,
    next_id: u16,
    /// PUBLISH packet id -> (agent, carrier wake-up id) waiting for PUBACK.
    inflight: HashMap<u16, (String, String)>,
    /// PUBLISH packet id -> relay request id waiting for PUBACK.
    relay_inflight: HashMap<u16, String>,
    /// The broker's Receive Maximum: at most this many QoS 1 publishes unacknowledged.
    receive_max: usize,
    /// Packets read while waiting for PUBACKs, handled next.
    deferred: std::collections::VecDeque<Packet>,
    /// State changes from PUBACKs and acks, written in one transaction by [`flush`].
    updates: Vec<DeliveryAdvance>,
    /// Packet ids of received QoS 1 messages, acknowledged by [`flush`] after their state
    /// changes are written.
    pubacks: Vec<u16>,
    /// Relay requests the broker refused: (request id, why), written by [`flush`].
    relay_failures: Vec<(String, String)>,
    /// While the console takes in what the broker holds for it after (re)connecting: the
    /// agents whose retained presence says connected.
    snapshot: Option<Vec<String>>,
    /// Agents that came online (live events) while the snapshot was read: their pending
    /// wake-ups go out once the acks queued for the console have been applied.
    came_online: Vec<String>,
    /// Wake-up ids published by a resend (queued at connect, an agent coming back) and when:
    /// a call's own publish command, still waiting in the channel, skips them, so that no
    /// wake-up goes out twice. Pruned once the channel is empty.
    resent: HashMap<String, tokio::time::Instant>,
}

impl Conn {
    async fn send(&mut self, packet: &Packet) -> Result<(), String> {
        let mut buf = BytesMut::new();
        beckon_mqtt::encode(packet, ProtocolVersion::V5, &mut buf)
            .map_err(|e| format!("cannot encode a packet: {e}"))?;
        self.stream
            .write_all(&buf)
            .await
            .map_err(|e| format!("writing to the broker failed: {e}"))
    }

    fn packet_id(&mut self) -> u16 {
        loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_id)
                && !self.relay_inflight.contains_key(&self.next_id)
            {
                return self.next_id;
            }
        }
    }

    /// The next packet already in the read buffer, if a whole one is there.
    fn try_decode(&mut self) -> Result<Option<Packet>, String> {
        beckon_mqtt::decode(&mut self.rbuf, ProtocolVersion::V5, MAX_PACKET)
            .map_err(|e| format!("the broker sent a malformed packet: {e}"))
    }

    async fn read_packet(&mut self) -> Result<Packet, String> {
        loop {
            match beckon_mqtt::decode(&mut self.rbuf, ProtocolVersion::V5, MAX_PACKET) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(format!("the broker sent a malformed packet: {e}")),
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| format!("reading from the broker failed: {e}"))?;
            if n == 0 {
                return Err("the broker closed the connection".into());
            }
        }
    }
}

async fn session(
    st: &AppState,
    link: &BrokerLink,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let stream = connect(st, link).await?;
    let mut conn = Conn {
        stream,
        rbuf: BytesMut::with_capacity(8192),
        next_id: 0,
        inflight: HashMap::new(),
        relay_inflight: HashMap::new(),
        receive_max: usize::from(u16::MAX),
        deferred: std::collections::VecDeque::new(),
        updates: Vec::new(),
        relay_failures: Vec::new(),
        pubacks: Vec::new(),
        snapshot: None,
        came_online: Vec::new(),
        resent: HashMap::new(),
    };
    let result = connected(st, &mut conn, commands, shutdown).await;
    // What was acknowledged before the connection ended is still written.
    flush(st, &mut conn).await;
    result
}

/// The conversation with the broker, from CONNECT until the connection ends.
async fn connected(
    st: &AppState,
    conn: &mut Conn,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let connect = Connect {
        protocol: ProtocolVersion::V5,
        clean_start: false,
        keep_alive: KEEP_ALIVE,
        client_id: CLIENT_ID.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties {
            // Keep the subscriptions, and the acks that arrive, for an hour while away.
            session_expiry_interval: Some(3600),
            maximum_packet_size: Some(MAX_PACKET),
            ..Default::default()
        },
    };
    conn.send(&Packet::Connect(Box::new(connect))).await?;
    let connack = tokio::time::timeout(Duration::from_secs(10), conn.read_packet())
        .await
        .map_err(|_| "the broker did not answer CONNECT within 10 s".to_owned())??;
    match connack {
        Packet::ConnAck(ack) if !ack.code.is_error() => {
            if let Some(max) = ack.properties.receive_maximum {
                conn.receive_max = usize::from(max.max(1));
            }
        }
        Packet::ConnAck(ack) => {
            return Err(format!(
                "the broker refused the console's connection (reason 0x{:02X}{})",
                ack.code.0,
                ack.properties
                    .reason_string
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
        }
        other => {
            return Err(format!(
                "the broker answered CONNECT with packet type {}",
                other.packet_type()
            ));
        }
    }
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        no_local: false,
        retain_as_published: false,
        retain_handling: RetainHandling::SendAtSubscribe,
    };
    let sub = Subscribe {
        packet_id: conn.packet_id(),
        subscriptions: ["agents/+/ack", "agents/+/presence", "agents/+/relay-result"]
            .into_iter()
            .map(|f| Subscription {
                filter: f.into(),
                options,
            })
            .collect(),
        properties: Properties::default(),
    };
    conn.send(&Packet::Subscribe(sub)).await?;
    // Before sending anything, take in what the broker holds for the console: the acks
    // queued in its session while it was away (so that nothing an agent already received
    // goes out again) and the retained presence of every agent (the registry's presence is
    // then current, not what it was when the console stopped). The barrier: with Beckon's
    // broker (TLS link), a second SUBSCRIBE to the console's own retained presence, which the
    // broker queues behind everything above (QoS 1 deliveries to a session are in order);
    // with a development broker, which has no presence, PINGREQ (answered at once, so only
    // what fits in the broker's in-flight window is sure to come before it).
    let own_presence = format!("servers/{CLIENT_ID}/presence");
    let tls = matches!(st.config.broker, BrokerLink::Tls { .. });
    if tls {
        let barrier = Subscribe {
            packet_id: conn.packet_id(),
            subscriptions: vec![Subscription {
                filter: own_presence.clone(),
                options,
            }],
            properties: Properties::default(),
        };
        conn.send(&Packet::Subscribe(barrier)).await?;
    } else {
        conn.send(&Packet::PingReq).await?;
    }
    conn.snapshot = Some(Vec::new());
    let mut barrier_reached = true;
    loop {
        let packet = match conn.try_decode()? {
            Some(p) => p,
            None => {
                // Nothing buffered: write what was read and acknowledge it, so that the
                // broker's in-flight window keeps moving.
                flush(st, conn).await;
                match tokio::time::timeout(Duration::from_secs(10), conn.read_packet()).await {
                    Ok(p) => p?,
                    Err(_) => {
                        // A TLS broker without tenants publishes no presence: go on without.
                        tracing::warn!(
                            "the broker sent nothing for 10 s after the console connected, not even the console's own presence (is it Beckon's broker with this tenant's file?); the registry's presence is not checked against it"
                        );
                        barrier_reached = false;
                        break;
                    }
                }
            }
        };
        match packet {
            Packet::PingResp if !tls => break,
            // Retained: sent for this SUBSCRIBE (the live event of this very connection comes
            // first when the session kept the subscription from an earlier run).
            Packet::Publish(p) if tls && p.retain && p.topic == own_presence => {
                if let (QoS::AtLeastOnce, Some(id)) = (p.qos, p.packet_id) {
                    conn.pubacks.push(id);
                }
                break;
            }
            other => handle_packet(st, conn, other).await?,
        }
    }
    flush(st, conn).await;
    let seen_online = conn.snapshot.take().unwrap_or_default();
    tracing::info!(
        agents_connected = seen_online.len(),
        "read the broker's presence after connecting"
    );
    // Only Beckon's broker with tenants (the TLS link) publishes presence; a development
    // broker has none, so its silence says nothing.
    if barrier_reached && tls {
        let at = now_ms();
        match st
            .store
            .run(move |s| s.reconcile_presence(&seen_online, at))
            .await
        {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(
                    agents = gone.len(),
                    "agents recorded online have no presence at the broker: marked offline"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconciling presence failed"),
        }
    }
    set_status(st, true, None);
    tracing::info!("connected to the push service");

    // Everything still queued goes out now.
    let queued = st
        .store
        .run(|s| s.agents_with_queued(now_ms()))
        .await
        .map_err(|e| e.to_string())?;
    for agent in queued {
        send_pending(st, conn, &agent, false).await?;
    }
    for agent in std::mem::take(&mut conn.came_online) {
        send_pending(st, conn, &agent, true).await?;
    }

    let mut ping = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE) / 2));
    ping.tick().await;
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    // State changes are written in batches: one transaction per tick rather than per ack.
    let mut write = tokio::time::interval(Duration::from_millis(25));
    let mut last_heard = tokio::time::Instant::now();
    loop {
        while let Some(p) = conn.deferred.pop_front() {
            handle_packet(st, conn, p).await?;
        }
        tokio::select! {
            packet = conn.read_packet() => {
                last_heard = tokio::time::Instant::now();
                handle_packet(st, conn, packet?).await?;
                if conn.updates.len() >= 1000 {
                    flush(st, conn).await;
                }
            }
            _ = write.tick() => flush(st, conn).await,
            c = commands.recv() => match c {
                Some(Command::Publish(call, deliveries)) => {
                    for d in deliveries {
                        if conn.resent.remove(&d.wakeup_id).is_some() {
                            continue;
                        }
                        let agent = d.agent_id.clone();
                        let out = OutgoingWakeUp {
                            carrier: d,
                            carried: Vec::new(),
                            reason: call.reason.clone(),
                            expires_at: call.expires_at,
                            spread: call.spread,
                            action: call.action.clone(),
                        };
                        publish_wakeup(st, conn, &agent, out).await?;
                    }
                }
                Some(Command::Relay { agent, request_id, payload, expiry_secs }) => {
                    publish_relay(conn, &agent, request_id, payload, expiry_secs).await?;
                }
                Some(Command::BrokerReady) => {}
                None => return Ok(()),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > Duration::from_secs(u64::from(KEEP_ALIVE) * 3 / 2) {
                    return Err("the broker stopped answering (no PINGRESP)".into());
                }
                conn.send(&Packet::PingReq).await?;
            }
            _ = sweep.tick() => {
                flush(st, conn).await;
                expire(st).await;
                if commands.is_empty() {
                    // Every command made before now has been handled (the API sends it
                    // right after recording the call).
                    conn.resent
                        .retain(|_, at| at.elapsed() < Duration::from_secs(10));
                }
            }
            _ = stopped(shutdown) => {
                let _ = conn.send(&Packet::Disconnect(beckon_mqtt::Disconnect {
                    code: beckon_mqtt::ReasonCode::SUCCESS,
                    properties: Properties::default(),
                })).await;
                return Ok(());
            }
        }
    }
}

/// PUBACK: the broker took the wake-up (`sent`), or refused it (`failed`).
fn handle_puback(conn: &mut Conn, ack: beckon_mqtt::Ack) {
    if let Some(request_id) = conn.relay_inflight.remove(&ack.packet_id) {
        if ack.code.is_error() {
            conn.relay_failures.push((
                request_id,
                format!(
                    "the broker refused the relay request (reason 0x{:02X}); check the console's permissions on the broker",
                    ack.code.0
                ),
            ));
        }
        return;
    }
    let Some((agent, wakeup_id)) = conn.inflight.remove(&ack.packet_id) else {
        return;
    };
    let (state, detail) = if ack.code.is_error() {
        let detail = format!(
            "the broker refused the wake-up (reason 0x{:02X}); check the console's permissions on the broker",
            ack.code.0
        );
        (CallState::Failed, Some(detail))
    } else {
        (CallState::Sent, None)
    };
    let update = DeliveryUpdate {
        detail,
        ..Default::default()
    };
    advance(conn, &agent, &wakeup_id, state, update);
}

async fn handle_packet(st: &AppState, conn: &mut Conn, packet: Packet) -> Result<(), String> {
    match packet {
        Packet::PubAck(ack) => handle_puback(conn, ack),
        Packet::Publish(p) => {
            handle_publish(st, conn, &p).await?;
            if let (QoS::AtLeastOnce, Some(id)) = (p.qos, p.packet_id) {
                // Acknowledged once what it changed is written (by `flush`): if the console
                // dies before, the broker delivers it again on the next connection.
                conn.pubacks.push(id);
            }
        }
        Packet::Disconnect(d) => {
            return Err(format!(
                "the broker disconnected the console (reason 0x{:02X}{})",
                d.code.0,
                d.properties
                    .reason_string
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
        }
        // QoS 2 is never subscribed to; PINGRESP and SUBACK need nothing.
        _ => {}
    }
    Ok(())
}

async fn handle_publish(st: &AppState, conn: &mut Conn, p: &Publish) -> Result<(), String> {
    let mut levels = p.topic.split('/');
    let (Some("agents"), Some(agent), Some(kind), None) =
        (levels.next(), levels.next(), levels.next(), levels.next())
    else {
        return Ok(());
    };
    let agent = agent.to_owned();
    match kind {
        "ack" => {
            let ack = match Ack::from_json(&p.payload) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(%agent, error = %e, "ignoring a malformed ack");
                    return Ok(());
                }
            };
            let state = match ack.stage {
                AckStage::Received => CallState::Delivered,
                AckStage::Started => CallState::Started,
                AckStage::Finished => CallState::Finished,
            };
            let update = DeliveryUpdate {
                status: ack.status.map(|s| {
                    match s {
                        AckStatus::Ok => "ok",
                        AckStatus::Failed => "failed",
                        AckStatus::TimedOut => "timed_out",
                    }
                    .to_owned()
                }),
                exit_code: ack.exit_code,
                duration_ms: ack.duration_ms,
                detail: ack.detail,
            };
            advance(conn, &agent, &ack.wakeup_id, state, update);
        }
        "relay-result" => {
            let result = match beckon_identity::relay::RelayResult::from_json(&p.payload) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(%agent, error = %e, "ignoring a malformed relay result");
                    return Ok(());
                }
            };
            let sends: Vec<(String, String, u32, Option<String>)> = result
                .sends
                .into_iter()
                .map(|s| (s.mac, s.destination, s.packets, s.error))
                .collect();
            let (a, id) = (agent.clone(), result.request_id);
            match st
                .store
                .run(move |s| s.record_relay_result(&a, &id, &sends))
                .await
            {
                Ok(recorded) => {
                    for r in &recorded {
                        tracing::info!(via = %agent, target = %r.agent_id, mac = %r.mac, destination = %r.destination, packets = r.packets, error = ?r.error, "Wake-on-LAN relayed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "recording a relay result failed"),
            }
        }
        "presence" => {
            if p.payload.is_empty() {
                return Ok(());
            }
            let ev = match PresenceEvent::from_json(&p.payload) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(%agent, error = %e, "ignoring a malformed presence event");
                    return Ok(());
                }
            };
            let presence = match ev.state {
                PresenceState::Connected => Presence::Online,
                PresenceState::Disconnected => Presence::Offline,
            };
            let path = match ev.path {
                ConnectionPath::Mqtts => "8883",
                ConnectionPath::SharedMqtt => "443-mqtt",
                ConnectionPath::SharedWebSocket => "443-websocket",
                ConnectionPath::Plain => "1883",
            };
            let path = if ev.via_proxy == Some(true) {
                format!("{path} via proxy")
            } else {
                path.to_owned()
            };
            let a = agent.clone();
            let remote = ev.remote_addr.clone();
            if let Err(e) = st
                .store
                .run(move |s| s.set_presence(&a, presence, ev.at, Some(path), Some(remote)))
                .await
            {
                tracing::warn!(error = %e, "recording presence failed");
            }
            if presence == Presence::Online {
                match (&mut conn.snapshot, p.retain) {
                    // The broker's retained state, sent at SUBSCRIBE: the agent did not just
                    // come back, and what it was sent waits in its session at the broker.
                    (Some(seen), true) => seen.push(agent),
                    (None, true) => {}
                    (Some(_), false) => conn.came_online.push(agent),
                    // The agent is back: what it has not received yet goes out again, as one.
                    (None, false) => send_pending(st, conn, &agent, true).await?,
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Queues a state change; [`flush`] writes the queue.
fn advance(
    conn: &mut Conn,
    agent: &str,
    wakeup_id: &str,
    state: CallState,
    update: DeliveryUpdate,
) {
    conn.updates.push(DeliveryAdvance {
        agent_id: agent.to_owned(),
        wakeup_id: wakeup_id.to_owned(),
        state,
        update,
        at: now_ms(),
    });
}

/// Writes the queued state changes in one transaction and tells live listeners.
async fn flush(st: &AppState, conn: &mut Conn) {
    for (request_id, error) in std::mem::take(&mut conn.relay_failures) {
        if let Err(e) = st
            .store
            .run(move |s| s.fail_relay(&request_id, &error))
            .await
        {
            tracing::warn!(error = %e, "recording a relay failure failed");
        }
    }
    if !conn.updates.is_empty() {
        let batch = std::mem::take(&mut conn.updates);
        match st.store.run(move |s| s.advance_deliveries(batch)).await {
            Ok(changed) => publish_events(st, &changed),
            Err(e) => {
                // Not acknowledged: the broker delivers these acks again after a reconnect.
                tracing::warn!(error = %e, "updating deliveries failed");
                conn.pubacks.clear();
                return;
            }
        }
    }
    for id in std::mem::take(&mut conn.pubacks) {
        // A failed write shows up as a read error on the connection right after.
        if conn
            .send(&Packet::PubAck(beckon_mqtt::Ack::new(id)))
            .await
            .is_err()
        {
            break;
        }
    }
}

/// One wake-up message to publish, standing for one or more pending deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingWakeUp {
    /// The delivery whose wake-up id the message carries (the newest).
    pub carrier: CallDelivery,
    /// Wake-up ids of the other deliveries the message stands for.
    pub carried: Vec<String>,
    /// The distinct reasons, joined.
    pub reason: String,
    /// The latest expiry, unix ms.
    pub expires_at: Millis,
    /// The smallest spread.
    pub spread: u32,
    /// The shared action.
    pub action: Option<String>,
}

type Pending<'a> = Vec<&'a (WakeCall, CallDelivery)>;

/// The messages to publish for an agent's pending deliveries: one per distinct action (the
/// wake-up format carries one action), each carried by the newest delivery of its group.
pub fn merge_pending(pending: &[(WakeCall, CallDelivery)]) -> Vec<OutgoingWakeUp> {
    let mut groups: Vec<(Option<String>, Pending<'_>)> = Vec::new();
    for p in pending {
        match groups.iter_mut().find(|(a, _)| *a == p.0.action) {
            Some((_, v)) => v.push(p),
            None => groups.push((p.0.action.clone(), vec![p])),
        }
    }
    groups
        .into_iter()
        .filter_map(|(action, items)| {
            let (_, carrier) = items.last()?;
            let mut reasons: Vec<&str> = Vec::new();
            for (c, _) in &items {
                if !c.reason.is_empty() && !reasons.contains(&c.reason.as_str()) {
                    reasons.push(&c.reason);
                }
            }
            let mut reason = reasons.join(", ");
            if reason.len() > MAX_TEXT_LEN {
                reason.truncate(reason.floor_char_boundary(MAX_TEXT_LEN));
            }
            let expires_at = items.iter().map(|(c, _)| c.expires_at).max()?;
            let spread = items.iter().map(|(c, _)| c.spread).min()?;
            let carried: Vec<String> = items
                .iter()
                .filter(|(_, d)| d.wakeup_id != carrier.wakeup_id)
                .map(|(_, d)| d.wakeup_id.clone())
                .collect();
            Some(OutgoingWakeUp {
                carrier: carrier.clone(),
                carried,
                reason,
                expires_at,
                spread,
                action,
            })
        })
        .collect()
}

async fn send_pending(
    st: &AppState,
    conn: &mut Conn,
    agent: &str,
    include_sent: bool,
) -> Result<(), String> {
    // The pending list must see the latest states (a `sent` not yet written would go out twice).
    flush(st, conn).await;
    let a = agent.to_owned();
    let pending: StoreResult<Vec<(WakeCall, CallDelivery)>> = st
        .store
        .run(move |s| s.pending_for_agent(&a, now_ms()))
        .await;
    let pending: Vec<_> = match pending {
        Ok(p) => p
            .into_iter()
            .filter(|(_, d)| include_sent || d.state == CallState::Queued)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "reading pending wake-ups failed");
            return Ok(());
        }
    };
    for out in merge_pending(&pending) {
        let now = tokio::time::Instant::now();
        conn.resent.insert(out.carrier.wakeup_id.clone(), now);
        for id in &out.carried {
            conn.resent.insert(id.clone(), now);
        }
        publish_wakeup(st, conn, agent, out).await?;
    }
    Ok(())
}

/// Signs and publishes one wake-up (QoS 1, message expiry = time left), keeping within the
/// broker's Receive Maximum: when that many are unacknowledged, PUBACKs are awaited first.
async fn publish_wakeup(
    st: &AppState,
    conn: &mut Conn,
    agent: &str,
    out: OutgoingWakeUp,
) -> Result<(), String> {
    let OutgoingWakeUp {
        carrier,
        carried,
        reason,
        expires_at,
        spread,
        action,
    } = out;
    let now = now_ms();
    let wakeup = WakeUp {
        v: beckon_identity::wakeup::WAKEUP_VERSION,
        id: carrier.wakeup_id.clone(),
        tenant: st.tenant.to_string(),
        agent: agent.to_owned(),
        reason,
        issued_at: now.div_euclid(1000),
        expires_at: expires_at.div_euclid(1000),
        spread,
        action,
    };
    let payload = match st.signer.sign(&wakeup) {
        Ok(p) => p,
        Err(e) => {
            let update = DeliveryUpdate {
                detail: Some(format!("the wake-up could not be signed: {e}")),
                ..Default::default()
            };
            advance(conn, agent, &carrier.wakeup_id, CallState::Failed, update);
            return Ok(());
        }
    };
    if !carried.is_empty() {
        let (c, w) = (carried.clone(), carrier.wakeup_id.clone());
        if let Err(e) = st.store.run(move |s| s.set_carried_by(&c, &w)).await {
            tracing::warn!(error = %e, "recording merged wake-ups failed");
        }
    }
    wait_for_window(conn).await?;
    let expiry_secs = ((expires_at - now) / 1000).max(1);
    let pid = conn.packet_id();
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: beckon_identity::acl::wake_topic(agent),
        packet_id: Some(pid),
        payload: Bytes::from(payload),
        properties: Properties {
            message_expiry_interval: Some(u32::try_from(expiry_secs).unwrap_or(u32::MAX)),
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            ..Default::default()
        },
    };
    conn.inflight
        .insert(pid, (agent.to_owned(), carrier.wakeup_id.clone()));
    conn.send(&Packet::Publish(publish)).await
}

/// Waits until one more QoS 1 publish fits in the broker's Receive Maximum.
async fn wait_for_window(conn: &mut Conn) -> Result<(), String> {
    while conn.inflight.len() + conn.relay_inflight.len() >= conn.receive_max {
        match conn.read_packet().await? {
            Packet::PubAck(ack) => handle_puback(conn, ack),
            other => conn.deferred.push_back(other),
        }
    }
    Ok(())
}

/// Publishes a signed relay request (QoS 1, message expiry: the request's lifetime).
async fn publish_relay(
    conn: &mut Conn,
    agent: &str,
    request_id: String,
    payload: Vec<u8>,
    expiry_secs: u32,
) -> Result<(), String> {
    wait_for_window(conn).await?;
    let pid = conn.packet_id();
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: beckon_identity::relay::relay_topic(agent),
        packet_id: Some(pid),
        payload: Bytes::from(payload),
        properties: Properties {
            message_expiry_interval: Some(expiry_secs.max(1)),
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            ..Default::default()
        },
    };
    conn.relay_inflight.insert(pid, request_id);
    conn.send(&Packet::Publish(publish)).await
}

/// How long a relay request stays valid, seconds: a relay is for "wake it now".
pub const RELAY_LIFETIME_SECS: u32 = 120;

/// Sends Wake-on-LAN for each MAC of `agent` to each destination, recording every send.
pub async fn wake_on_lan(
    st: &AppState,
    agent: &Agent,
    call_id: Option<String>,
) -> StoreResult<Vec<WolSend>> {
    let settings = st.store.run(|s| s.settings()).await?;
    let wol = settings.wol;
    let secureon = crate::wol::parse_secureon(&wol.secureon).unwrap_or(None);
    let destinations = crate::wol::destinations(&agent.inventory.addresses, &wol);
    let mut sends = Vec::new();
    for mac_text in &agent.inventory.macs {
        let Ok(mac) = mac_text.parse::<crate::wol::MacAddress>() else {
            continue;
        };
        let packet = crate::wol::magic_packet(mac, secureon.as_deref());
        for dest in &destinations {
            let outcome = crate::wol::send_packet(&packet, *dest, wol.repeats).await;
            let send = WolSend {
                agent_id: agent.id.clone(),
                call_id: call_id.clone(),
                mac: mac.to_string(),
                destination: dest.to_string(),
                at: now_ms(),
                packets: outcome.packets,
                error: outcome.error,
                via_agent: None,
                relay_id: None,
                relay_state: None,
            };
            let s2 = send.clone();
            st.store.run(move |s| s.record_wol_send(&s2)).await?;
            sends.push(send);
        }
    }
    if wol.relay {
        sends.extend(request_relays(st, agent, call_id, &wol).await?);
    }
    Ok(sends)
}

/// Asks an online agent on each subnet of `agent` to send its magic packets there, and
/// records one send per MAC (`relay_state` `requested` until the relay agent answers).
async fn request_relays(
    st: &AppState,
    agent: &Agent,
    call_id: Option<String>,
    wol: &crate::settings::WolSettings,
) -> StoreResult<Vec<WolSend>> {
    let macs: Vec<String> = agent
        .inventory
        .macs
        .iter()
        .filter_map(|m| m.parse::<crate::wol::MacAddress>().ok())
        .map(|m| m.to_string())
        .take(beckon_identity::relay::MAX_RELAY_MACS)
        .collect();
    if macs.is_empty() {
        return Ok(Vec::new());
    }
    let filter = crate::store::AgentFilter {
        presence: Some(Presence::Online),
        limit: 1000,
        ..Default::default()
    };
    let online = st.store.run(move |s| s.list_agents(&filter)).await?;
    let relays = crate::wol::choose_relays(agent, &online, st.config.wol_relay_loopback);
    let mut sends = Vec::new();
    for (relay, broadcast) in relays {
        let now = now_ms();
        let Ok(request_id) = beckon_identity::wakeup::new_wakeup_id(now) else {
            continue;
        };
        let request = beckon_identity::relay::RelayRequest {
            v: beckon_identity::relay::RELAY_VERSION,
            id: request_id.clone(),
            tenant: st.tenant.to_string(),
            agent: relay.clone(),
            target: agent.id.clone(),
            issued_at: now.div_euclid(1000),
            expires_at: now.div_euclid(1000) + i64::from(RELAY_LIFETIME_SECS),
            macs: macs.clone(),
            secureon: (!wol.secureon.trim().is_empty()).then(|| wol.secureon.trim().to_owned()),
            broadcast: broadcast.into(),
            port: wol.port,
            repeats: wol.repeats,
        };
        let signed = st.signer.sign_relay(&request);
        for mac in &macs {
            let send = WolSend {
                agent_id: agent.id.clone(),
                call_id: call_id.clone(),
                mac: mac.clone(),
                destination: std::net::SocketAddr::new(broadcast.into(), wol.port).to_string(),
                at: now,
                packets: 0,
                error: signed
                    .as_ref()
                    .err()
                    .map(|e| format!("the relay request could not be signed: {e}")),
                via_agent: Some(relay.clone()),
                relay_id: Some(request_id.clone()),
                relay_state: Some(
                    if signed.is_ok() {
                        "requested"
                    } else {
                        "failed"
                    }
                    .into(),
                ),
            };
            let s2 = send.clone();
            st.store.run(move |s| s.record_wol_send(&s2)).await?;
            sends.push(send);
        }
        if let Ok(payload) = signed {
            let command = Command::Relay {
                agent: relay,
                request_id,
                payload,
                expiry_secs: RELAY_LIFETIME_SECS,
            };
            if st.dispatch.send(command).is_err() {
                tracing::warn!("the dispatcher is gone: relay request not sent");
            }
        }
    }
    Ok(sends)
}
