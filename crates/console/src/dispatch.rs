//! The console's own broker connection: publishes signed wake-ups (QoS 1, with message
//! expiry) to `agents/{id}/wake`, marks them `sent` on PUBACK, follows `agents/+/ack` and
//! `agents/+/presence`, resends what is still pending when an agent comes online (several
//! pending wake-ups for one agent go out as one message), and expires what is overdue.

use std::collections::HashMap;
use std::time::Duration;

use beckon_identity::acl::PresenceEvent;
use beckon_identity::wakeup::{Ack, AckStage, AckStatus, MAX_TEXT_LEN, WakeUp, WakeUpSigner};
use beckon_identity::{ConnectionPath, PresenceState};
use beckon_mqtt::{
    Connect, Packet, Properties, ProtocolVersion, Publish, QoS, RetainHandling, Subscribe,
    Subscription, SubscriptionOptions,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::model::*;
use crate::store::{DeliveryAdvance, DeliveryUpdate, PresenceUpdate, StoreResult};
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

/// What the dispatcher collected since it last handed over to [`write_states`].
#[derive(Default)]
struct Changes {
    /// State changes from PUBACKs and acks.
    advances: Vec<DeliveryAdvance>,
    /// Presence changes.
    presence: Vec<PresenceUpdate>,
    /// Answers of relaying agents: (agent, request id, (MAC, destination, packets, error)).
    relay_results: Vec<RelayAnswer>,
    /// Relay requests the broker refused: (request id, why).
    relay_failures: Vec<(String, String)>,
    /// Packet ids of the QoS 1 messages (acks, presence, relay results) these changes come
    /// from: acknowledged once the changes are written, so that a console killed before
    /// gets them again from its session at the broker.
    pubacks: Vec<u16>,
}

type RelayAnswer = (String, String, Vec<(String, String, u32, Option<String>)>);

impl Changes {
    fn is_empty(&self) -> bool {
        self.advances.is_empty()
            && self.presence.is_empty()
            && self.relay_results.is_empty()
            && self.relay_failures.is_empty()
            && self.pubacks.is_empty()
    }

    /// Rows to write.
    fn len(&self) -> usize {
        self.advances.len()
            + self.presence.len()
            + self.relay_results.len()
            + self.relay_failures.len()
    }

    fn append(&mut self, mut other: Changes) {
        self.advances.append(&mut other.advances);
        self.presence.append(&mut other.presence);
        self.relay_results.append(&mut other.relay_results);
        self.relay_failures.append(&mut other.relay_failures);
        self.pubacks.append(&mut other.pubacks);
    }
}

/// Work for [`write_states`].
enum WriteJob {
    Changes(Changes),
    /// Answered once everything sent before it is written.
    Sync(oneshot::Sender<()>),
}

/// Most state changes written in one transaction (below the live-event channel's 4096, so
/// that one transaction's events never overrun a listener that keeps up).
const MAX_WRITE_BATCH: usize = 2048;

/// Writes state changes and presence beside the broker connection, so that reading acks and
/// publishing never wait for the database: whatever arrived while one transaction ran goes
/// into the next (group commit). Live listeners hear of a change once it is written, and the
/// broker gets the PUBACKs of the messages a batch came from once it is written (all of them
/// in one write to `out`, so that its in-flight window towards the console keeps moving).
async fn write_states(
    st: AppState,
    mut jobs: mpsc::UnboundedReceiver<WriteJob>,
    out: mpsc::UnboundedSender<Bytes>,
) {
    while let Some(first) = jobs.recv().await {
        let mut batch = Changes::default();
        let mut syncs = Vec::new();
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                WriteJob::Changes(c) => batch.append(c),
                WriteJob::Sync(s) => syncs.push(s),
            }
            if batch.len() < MAX_WRITE_BATCH {
                next = jobs.try_recv().ok();
            }
        }
        let Changes {
            advances,
            presence,
            relay_results,
            relay_failures,
            pubacks,
        } = batch;
        let mut written = true;
        if !advances.is_empty()
            || !presence.is_empty()
            || !relay_results.is_empty()
            || !relay_failures.is_empty()
        {
            let result = st
                .store
                .run(move |s| {
                    // Relay records are kept apart: one that cannot be written is logged
                    // and does not hold back the acks of everything else.
                    for (request_id, error) in &relay_failures {
                        if let Err(e) = s.fail_relay(request_id, error) {
                            tracing::warn!(error = %e, "recording a relay failure failed");
                        }
                    }
                    for (via, request_id, sends) in &relay_results {
                        match s.record_relay_result(via, request_id, sends) {
                            Ok(recorded) => {
                                for r in &recorded {
                                    tracing::info!(via = %via, target = %r.agent_id, mac = %r.mac, destination = %r.destination, packets = r.packets, error = ?r.error, "Wake-on-LAN relayed");
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "recording a relay result failed"),
                        }
                    }
                    if !presence.is_empty() {
                        s.set_presences(presence)?;
                    }
                    if advances.is_empty() {
                        return Ok(Vec::new());
                    }
                    s.advance_deliveries(advances)
                })
                .await;
            match result {
                Ok(changed) => publish_events(&st, &changed),
                Err(e) => {
                    // Not acknowledged: the broker delivers these messages again after the
                    // next reconnect.
                    tracing::warn!(
                        error = %e,
                        "recording delivery states and presence failed; the broker delivers the messages again after the next reconnect"
                    );
                    written = false;
                }
            }
        }
        if written && !pubacks.is_empty() {
            let mut acks = BytesMut::with_capacity(pubacks.len() * 4);
            for id in pubacks {
                // Encoding a PUBACK cannot fail.
                let _ = beckon_mqtt::encode(
                    &Packet::PubAck(beckon_mqtt::Ack::new(id)),
                    ProtocolVersion::V5,
                    &mut acks,
                );
            }
            // A closed connection shows up on the dispatcher's side.
            let _ = out.send(acks.freeze());
        }
        for s in syncs {
            let _ = s.send(());
        }
    }
}

struct Conn {
    /// Bytes for the socket writer ([`write_packets`]).
    out: mpsc::UnboundedSender<Bytes>,
    /// Packets from the socket reader ([`read_packets`]), or why reading stopped.
    incoming: mpsc::UnboundedReceiver<Result<Packet, String>>,
    /// Packets received and not handled yet.
    ready: std::collections::VecDeque<Packet>,
    /// Packets encoded but not handed to the socket writer yet.
    wbuf: BytesMut,
    next_id: u16,
    /// PUBLISH packet id -> (agent, carrier wake-up id) waiting for PUBACK.
    inflight: HashMap<u16, (String, String)>,
    /// PUBLISH packet id -> relay request id waiting for PUBACK.
    relay_inflight: HashMap<u16, String>,
    /// The broker's Receive Maximum: at most this many QoS 1 publishes unacknowledged.
    receive_max: usize,
    /// Changes (and the PUBACKs that wait for them) not yet handed to the writer.
    changes: Changes,
    /// Agents that came online: what they have not received goes out again.
    came_online: Vec<String>,
    /// While the console takes in what the broker holds for it after (re)connecting: the
    /// agents whose retained presence says connected.
    snapshot: Option<Vec<String>>,
    /// Wake-up ids published by a resend (queued at connect, an agent coming back) and when:
    /// a call's own publish command, still waiting in the channel, skips them, so that no
    /// wake-up goes out twice. Pruned once the channel is empty.
    resent: HashMap<String, tokio::time::Instant>,
    /// The state writer.
    writer: mpsc::UnboundedSender<WriteJob>,
}

/// Reads the broker's packets as they come, whatever the dispatcher is doing, so that the
/// broker never sees a console that does not read (it would close it, or drop acks queued
/// for it). QoS 1 messages (acks, presence) are acknowledged by [`write_states`] once what
/// they change is written; the broker's in-flight window for a server identity is large
/// enough to keep them flowing meanwhile.
async fn read_packets(
    mut read: tokio::io::ReadHalf<beckon_net::BoxedStream>,
    packets: mpsc::UnboundedSender<Result<Packet, String>>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        match read.read_buf(&mut buf).await {
            Ok(0) => {
                let _ = packets.send(Err("the broker closed the connection".into()));
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = packets.send(Err(format!("reading from the broker failed: {e}")));
                return;
            }
        }
        loop {
            match beckon_mqtt::decode(&mut buf, ProtocolVersion::V5, MAX_PACKET) {
                Ok(Some(p)) => {
                    if packets.send(Ok(p)).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = packets.send(Err(format!("the broker sent a malformed packet: {e}")));
                    return;
                }
            }
        }
    }
}

/// Writes what the dispatcher and the reader queue, many packets per write.
async fn write_packets(
    mut write: tokio::io::WriteHalf<beckon_net::BoxedStream>,
    mut out: mpsc::UnboundedReceiver<Bytes>,
    errors: mpsc::UnboundedSender<Result<Packet, String>>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while let Some(first) = out.recv().await {
        buf.extend_from_slice(&first);
        while buf.len() < 256 * 1024 {
            match out.try_recv() {
                Ok(more) => buf.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        let written = async {
            write.write_all(&buf).await?;
            write.flush().await
        }
        .await;
        if let Err(e) = written {
            let _ = errors.send(Err(format!("writing to the broker failed: {e}")));
            return;
        }
        buf.clear();
    }
}

impl Conn {
    /// A fresh connection's state over the socket writer's, socket reader's and state
    /// writer's channels.
    fn new(
        out: mpsc::UnboundedSender<Bytes>,
        incoming: mpsc::UnboundedReceiver<Result<Packet, String>>,
        writer: mpsc::UnboundedSender<WriteJob>,
    ) -> Self {
        Self {
            out,
            incoming,
            ready: std::collections::VecDeque::new(),
            wbuf: BytesMut::with_capacity(64 * 1024),
            next_id: 0,
            inflight: HashMap::new(),
            relay_inflight: HashMap::new(),
            receive_max: usize::from(u16::MAX),
            changes: Changes::default(),
            came_online: Vec::new(),
            snapshot: None,
            resent: HashMap::new(),
            writer,
        }
    }

    /// Encodes a packet for the next [`write_out`](Self::write_out).
    fn queue(&mut self, packet: &Packet) -> Result<(), String> {
        beckon_mqtt::encode(packet, ProtocolVersion::V5, &mut self.wbuf)
            .map_err(|e| format!("cannot encode a packet: {e}"))
    }

    /// Hands every queued packet to the socket writer (which writes many at once: one TLS
    /// record, one system call).
    async fn write_out(&mut self) -> Result<(), String> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let out = self.wbuf.split().freeze();
        self.out
            .send(out)
            .map_err(|_| "writing to the broker failed: the connection is closed".to_owned())
    }

    async fn send(&mut self, packet: &Packet) -> Result<(), String> {
        self.queue(packet)?;
        self.write_out().await
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

    /// Waits for the next packet from the broker. Cancel safe.
    async fn read_more(&mut self) -> Result<(), String> {
        match self.incoming.recv().await {
            Some(Ok(p)) => {
                self.ready.push_back(p);
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err("the broker connection's reader stopped".into()),
        }
    }

    /// The next packet already received, if any.
    fn next_packet(&mut self) -> Result<Option<Packet>, String> {
        if let Some(p) = self.ready.pop_front() {
            return Ok(Some(p));
        }
        match self.incoming.try_recv() {
            Ok(Ok(p)) => Ok(Some(p)),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(None),
        }
    }

    async fn read_packet(&mut self) -> Result<Packet, String> {
        loop {
            if let Some(p) = self.next_packet()? {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    /// Handles every packet received so far.
    fn drain_packets(&mut self) -> Result<(), String> {
        while let Some(p) = self.next_packet()? {
            handle_packet(self, p)?;
        }
        Ok(())
    }

    /// Hands the collected changes to the writer (without waiting for it).
    fn hand_over(&mut self) {
        if !self.changes.is_empty() {
            let _ = self
                .writer
                .send(WriteJob::Changes(std::mem::take(&mut self.changes)));
        }
    }

    /// Waits until every change collected so far is written.
    async fn sync(&mut self) {
        self.hand_over();
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriteJob::Sync(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Handles whatever the broker already sent, without waiting.
    async fn take_in_ready(&mut self) -> Result<(), String> {
        self.drain_packets()
    }
}

async fn session(
    st: &AppState,
    link: &BrokerLink,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let stream = connect(st, link).await?;
    let (read, write) = tokio::io::split(stream);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let reading = tokio::spawn(read_packets(read, in_tx.clone()));
    let writing = tokio::spawn(write_packets(write, out_rx, in_tx));
    let (writer, jobs) = mpsc::unbounded_channel();
    let storing = tokio::spawn(write_states(st.clone(), jobs, out_tx.clone()));
    let mut conn = Conn::new(out_tx, in_rx, writer);
    let result = connected(st, &mut conn, commands, shutdown).await;
    // What was acknowledged before the connection ended is still written.
    conn.sync().await;
    drop(conn);
    reading.abort();
    // The state writer ends with the dispatcher's sender (everything was written above).
    let _ = storing.await;
    // The last packets (a DISCONNECT) go out before the socket closes; the socket writer
    // ends once the reader's and the state writer's senders are gone too.
    let _ = tokio::time::timeout(Duration::from_secs(2), writing).await;
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
        properties: Properties::from(beckon_mqtt::PropertySet {
            // Keep the subscriptions, and the acks that arrive, for an hour while away.
            session_expiry_interval: Some(3600),
            maximum_packet_size: Some(MAX_PACKET),
            ..Default::default()
        }),
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
                    .as_ref()
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
    take_in_held(st, conn, options).await?;
    set_status(st, true, None);
    tracing::info!("connected to the push service");

    // Everything still queued goes out now.
    let queued = st
        .store
        .run(|s| s.agents_with_queued(now_ms()))
        .await
        .map_err(|e| e.to_string())?;
    send_pending(st, conn, queued, false).await?;

    let mut ping = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE) / 2));
    ping.tick().await;
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let mut last_heard = tokio::time::Instant::now();
    loop {
        if !conn.came_online.is_empty() {
            // The agents are back: what they have not received yet goes out again, as one.
            let agents = std::mem::take(&mut conn.came_online);
            send_pending(st, conn, agents, true).await?;
        }
        tokio::select! {
            read = conn.read_more() => {
                read?;
                last_heard = tokio::time::Instant::now();
                conn.drain_packets()?;
                conn.write_out().await?;
                conn.hand_over();
            }
            c = commands.recv() => match c {
                Some(Command::Publish(call, deliveries)) => {
                    let messages = deliveries
                        .into_iter()
                        // Already out with a resend (queued at connect, an agent coming back).
                        .filter(|d| conn.resent.remove(&d.wakeup_id).is_none())
                        .map(|d| {
                            let agent = d.agent_id.clone();
                            let out = OutgoingWakeUp {
                                carrier: d,
                                carried: Vec::new(),
                                reason: call.reason.clone(),
                                expires_at: call.expires_at,
                                spread: call.spread,
                                action: call.action.clone(),
                            };
                            (agent, out)
                        })
                        .collect();
                    publish_all(st, conn, messages).await?;
                    last_heard = tokio::time::Instant::now();
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
                conn.sync().await;
                expire(st).await;
                if commands.is_empty() {
                    // Every command made before now has been handled (the API sends it
                    // right after recording the call).
                    conn.resent
                        .retain(|_, at| at.elapsed() < Duration::from_secs(10));
                }
            }
            _ = stopped(shutdown) => {
                // What was read is written and acknowledged before the DISCONNECT.
                conn.drain_packets()?;
                conn.sync().await;
                let _ = conn.send(&Packet::Disconnect(beckon_mqtt::Disconnect {
                    code: beckon_mqtt::ReasonCode::SUCCESS,
                    properties: Properties::default(),
                })).await;
                return Ok(());
            }
        }
    }
}

/// Before sending anything, takes in what the broker holds for the console: the acks
/// queued in its session while it was away (so that nothing an agent already received goes
/// out again) and the retained presence of every agent (the registry's presence is then
/// current, not what it was when the console stopped). The barrier: with Beckon's broker
/// (TLS link), a second SUBSCRIBE to the console's own retained presence, which the broker
/// queues behind everything above (QoS 1 deliveries to a session are in order); with a
/// development broker, which has no presence, PINGREQ (answered at once, so only what fits
/// in the broker's in-flight window is sure to come before it).
async fn take_in_held(
    st: &AppState,
    conn: &mut Conn,
    options: SubscriptionOptions,
) -> Result<(), String> {
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
        let Some(packet) = conn.next_packet()? else {
            // All read is handled: have it written and acknowledged (one PUBACK batch), so
            // that the broker's in-flight window keeps moving.
            conn.hand_over();
            match tokio::time::timeout(Duration::from_secs(10), conn.read_more()).await {
                Ok(read) => {
                    read?;
                    continue;
                }
                Err(_) => {
                    // A TLS broker without tenants publishes no presence: go on without.
                    tracing::warn!(
                        "the broker sent nothing for 10 s after the console connected, not even the console's own presence (is it Beckon's broker with this tenant's file?); the registry's presence is not checked against it"
                    );
                    barrier_reached = false;
                    break;
                }
            }
        };
        match packet {
            Packet::PingResp if !tls => break,
            // Retained: sent for this SUBSCRIBE (the live event of this very connection comes
            // first when the session kept the subscription from an earlier run).
            Packet::Publish(p) if tls && p.retain && p.topic == own_presence => {
                if let (QoS::AtLeastOnce, Some(id)) = (p.qos, p.packet_id) {
                    conn.changes.pubacks.push(id);
                }
                break;
            }
            other => handle_packet(conn, other)?,
        }
    }
    // The presence read is written before it is compared.
    conn.sync().await;
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
    Ok(())
}

/// PUBACK: the broker took the wake-up (`sent`), or refused it (`failed`).
fn handle_puback(conn: &mut Conn, ack: beckon_mqtt::Ack) {
    if let Some(request_id) = conn.relay_inflight.remove(&ack.packet_id) {
        if ack.code.is_error() {
            conn.changes.relay_failures.push((
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

/// Handles one packet from the broker without waiting for anything: state changes and the
/// PUBACKs that wait for them are queued for the writer, agents that came online for
/// [`send_pending`].
fn handle_packet(conn: &mut Conn, packet: Packet) -> Result<(), String> {
    match packet {
        Packet::PubAck(ack) => handle_puback(conn, ack),
        Packet::Publish(p) => {
            handle_publish(conn, &p);
            if let (QoS::AtLeastOnce, Some(id)) = (p.qos, p.packet_id) {
                // Acknowledged once what it changed is written (by `write_states`): if the
                // console dies before, the broker delivers it again on the next connection.
                conn.changes.pubacks.push(id);
            }
        }
        Packet::Disconnect(d) => {
            return Err(format!(
                "the broker disconnected the console (reason 0x{:02X}{})",
                d.code.0,
                d.properties
                    .reason_string
                    .as_ref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
        }
        // QoS 2 is never subscribed to; PINGRESP and SUBACK need nothing.
        _ => {}
    }
    Ok(())
}

fn handle_publish(conn: &mut Conn, p: &Publish) {
    let mut levels = p.topic.split('/');
    let (Some("agents"), Some(agent), Some(kind), None) =
        (levels.next(), levels.next(), levels.next(), levels.next())
    else {
        return;
    };
    let agent = agent.to_owned();
    match kind {
        "ack" => {
            let ack = match Ack::from_json(&p.payload) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(%agent, error = %e, "ignoring a malformed ack");
                    return;
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
                    return;
                }
            };
            let sends = result
                .sends
                .into_iter()
                .map(|s| (s.mac, s.destination, s.packets, s.error))
                .collect();
            conn.changes
                .relay_results
                .push((agent, result.request_id, sends));
        }
        "presence" => {
            if p.payload.is_empty() {
                return;
            }
            let ev = match PresenceEvent::from_json(&p.payload) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(%agent, error = %e, "ignoring a malformed presence event");
                    return;
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
            if presence == Presence::Online {
                // While the console takes in the broker's presence after connecting, an agent
                // online by the retained state or by a live event in the meantime is online:
                // the reconciliation must not mark it offline.
                if let Some(seen) = &mut conn.snapshot {
                    seen.push(agent.clone());
                }
                // Only a live event says the agent just came (back): what it was sent goes
                // out again. With the retained state it waits in its session at the broker.
                if !p.retain && !conn.came_online.contains(&agent) {
                    conn.came_online.push(agent.clone());
                }
            }
            conn.changes.presence.push(PresenceUpdate {
                agent_id: agent,
                presence,
                at: ev.at,
                path: Some(path),
                remote_addr: Some(ev.remote_addr),
            });
        }
        _ => {}
    }
}

/// Queues a state change for the writer.
fn advance(
    conn: &mut Conn,
    agent: &str,
    wakeup_id: &str,
    state: CallState,
    update: DeliveryUpdate,
) {
    conn.changes.advances.push(DeliveryAdvance {
        agent_id: agent.to_owned(),
        wakeup_id: wakeup_id.to_owned(),
        state,
        update,
        at: now_ms(),
    });
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

/// Publishes what `agents` have not received yet (`queued`, and with `include_sent` also
/// `sent`): one store trip for all of them, then one message per agent and distinct action.
async fn send_pending(
    st: &AppState,
    conn: &mut Conn,
    mut agents: Vec<String>,
    include_sent: bool,
) -> Result<(), String> {
    if agents.is_empty() {
        return Ok(());
    }
    agents.sort_unstable();
    agents.dedup();
    // The pending list must see the latest states (a `sent` not yet written would go out
    // twice) and the presence just received.
    conn.sync().await;
    let pending = st
        .store
        .run(move |s| s.pending_for_agents(&agents, now_ms()))
        .await;
    let pending = match pending {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "reading pending wake-ups failed");
            return Ok(());
        }
    };
    let mut messages = Vec::new();
    let mut merged: Vec<(Vec<String>, String)> = Vec::new();
    for (agent, list) in pending {
        let list: Vec<_> = list
            .into_iter()
            .filter(|(_, d)| include_sent || d.state == CallState::Queued)
            .collect();
        for out in merge_pending(&list) {
            let now = tokio::time::Instant::now();
            conn.resent.insert(out.carrier.wakeup_id.clone(), now);
            for id in &out.carried {
                conn.resent.insert(id.clone(), now);
            }
            if !out.carried.is_empty() {
                merged.push((out.carried.clone(), out.carrier.wakeup_id.clone()));
            }
            messages.push((agent.clone(), out));
        }
    }
    if !merged.is_empty()
        && let Err(e) = st
            .store
            .run(move |s| {
                for (carried, carrier) in &merged {
                    s.set_carried_by(carried, carrier)?;
                }
                Ok(())
            })
            .await
    {
        tracing::warn!(error = %e, "recording merged wake-ups failed");
    }
    publish_all(st, conn, messages).await
}

/// Wake-ups signed per batch on the blocking pool.
const SIGN_BATCH: usize = 256;
/// Batches signed ahead of the one being written.
const SIGN_AHEAD: usize = 3;
/// Queued output written once it reaches this size.
const WRITE_CHUNK: usize = 64 * 1024;

/// The signed payload of one wake-up.
fn sign_wakeup(
    signer: &WakeUpSigner,
    tenant: &str,
    agent: &str,
    out: &OutgoingWakeUp,
    now: Millis,
) -> Result<Vec<u8>, String> {
    let wakeup = WakeUp {
        v: beckon_identity::wakeup::WAKEUP_VERSION,
        id: out.carrier.wakeup_id.clone(),
        tenant: tenant.to_owned(),
        agent: agent.to_owned(),
        reason: out.reason.clone(),
        issued_at: now.div_euclid(1000),
        expires_at: out.expires_at.div_euclid(1000),
        spread: out.spread,
        action: out.action.clone(),
    };
    signer.sign(&wakeup).map_err(|e| e.to_string())
}

type Signed = Vec<(String, OutgoingWakeUp, Result<Vec<u8>, String>)>;

/// Signs and publishes wake-ups (QoS 1, message expiry = time left), each signed on its own
/// as `wake-up.md` describes. Signing runs on the blocking pool a few batches ahead of the
/// writing, so that it overlaps with the broker's work and uses every core; the writing
/// keeps within the broker's Receive Maximum, reading PUBACKs and acks while it waits.
async fn publish_all(
    st: &AppState,
    conn: &mut Conn,
    messages: Vec<(String, OutgoingWakeUp)>,
) -> Result<(), String> {
    let mut batches = Vec::new();
    let mut rest = messages.into_iter().peekable();
    while rest.peek().is_some() {
        batches.push(rest.by_ref().take(SIGN_BATCH).collect::<Vec<_>>());
    }
    let mut batches = batches.into_iter();
    let mut signing: std::collections::VecDeque<tokio::task::JoinHandle<Signed>> =
        std::collections::VecDeque::new();
    let start_signing = |batch: Vec<(String, OutgoingWakeUp)>| {
        let signer = st.signer.clone();
        let tenant = st.tenant.to_string();
        tokio::task::spawn_blocking(move || {
            let now = now_ms();
            batch
                .into_iter()
                .map(|(agent, out)| {
                    let payload = sign_wakeup(&signer, &tenant, &agent, &out, now);
                    (agent, out, payload)
                })
                .collect::<Signed>()
        })
    };
    loop {
        while signing.len() <= SIGN_AHEAD {
            match batches.next() {
                Some(b) => signing.push_back(start_signing(b)),
                None => break,
            }
        }
        let Some(next) = signing.pop_front() else {
            break;
        };
        let signed = next
            .await
            .map_err(|e| format!("signing wake-ups stopped: {e}"))?;
        for (agent, out, payload) in signed {
            match payload {
                Ok(payload) => publish_signed(conn, &agent, &out, payload).await?,
                Err(e) => {
                    let update = DeliveryUpdate {
                        detail: Some(format!("the wake-up could not be signed: {e}")),
                        ..Default::default()
                    };
                    advance(
                        conn,
                        &agent,
                        &out.carrier.wakeup_id,
                        CallState::Failed,
                        update,
                    );
                }
            }
        }
        // Between batches: out with what is queued, in with what the broker sent.
        conn.write_out().await?;
        conn.take_in_ready().await?;
        conn.write_out().await?;
        conn.hand_over();
    }
    conn.write_out().await?;
    conn.hand_over();
    Ok(())
}

/// Queues one signed wake-up, first waiting (reading PUBACKs and acks) while the broker's
/// Receive Maximum is used up.
async fn publish_signed(
    conn: &mut Conn,
    agent: &str,
    out: &OutgoingWakeUp,
    payload: Vec<u8>,
) -> Result<(), String> {
    wait_for_window(conn).await?;
    let now = now_ms();
    let expiry_secs = ((out.expires_at - now) / 1000).max(1);
    let pid = conn.packet_id();
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: beckon_identity::acl::wake_topic(agent),
        packet_id: Some(pid),
        payload: Bytes::from(payload),
        properties: Properties::from(beckon_mqtt::PropertySet {
            message_expiry_interval: Some(u32::try_from(expiry_secs).unwrap_or(u32::MAX)),
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            ..Default::default()
        }),
    };
    conn.queue(&Packet::Publish(publish))?;
    conn.inflight
        .insert(pid, (agent.to_owned(), out.carrier.wakeup_id.clone()));
    if conn.wbuf.len() >= WRITE_CHUNK {
        conn.write_out().await?;
    }
    Ok(())
}

/// Waits (reading PUBACKs and acks, and handing their changes to the writer, which
/// acknowledges the acks) until one more QoS 1 publish fits in the broker's Receive Maximum.
async fn wait_for_window(conn: &mut Conn) -> Result<(), String> {
    while conn.inflight.len() + conn.relay_inflight.len() >= conn.receive_max {
        conn.write_out().await?;
        tokio::time::timeout(
            Duration::from_secs(u64::from(KEEP_ALIVE) * 3 / 2),
            conn.read_more(),
        )
        .await
        .map_err(|_| "the broker stopped acknowledging wake-ups (no PUBACK)".to_owned())??;
        conn.drain_packets()?;
        conn.hand_over();
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
        properties: Properties::from(beckon_mqtt::PropertySet {
            message_expiry_interval: Some(expiry_secs.max(1)),
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            ..Default::default()
        }),
    };
    conn.queue(&Packet::Publish(publish))?;
    conn.relay_inflight.insert(pid, request_id);
    conn.write_out().await?;
    conn.hand_over();
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection's dispatcher state without sockets or tasks behind it.
    fn conn() -> Conn {
        let (out, _) = mpsc::unbounded_channel();
        let (_, incoming) = mpsc::unbounded_channel();
        let (writer, _) = mpsc::unbounded_channel();
        Conn::new(out, incoming, writer)
    }

    fn presence(agent: &str, state: PresenceState, retain: bool, packet_id: u16) -> Packet {
        let event = PresenceEvent {
            state,
            at: 1_000,
            reason: None,
            remote_addr: "127.0.0.1:40000".into(),
            path: ConnectionPath::Mqtts,
            via_proxy: Some(false),
            node: None,
        };
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain,
            topic: format!("agents/{agent}/presence"),
            packet_id: Some(packet_id),
            payload: Bytes::from(event.to_json()),
            properties: Properties::default(),
        })
    }

    #[test]
    fn agents_coming_online_while_presence_is_taken_in_count_as_online() {
        let mut conn = conn();
        conn.snapshot = Some(Vec::new());
        // Retained state: online before the console connected.
        handle_packet(&mut conn, presence("a1", PresenceState::Connected, true, 1)).unwrap();
        // Live, during the take-in: connected just now.
        handle_packet(
            &mut conn,
            presence("a2", PresenceState::Connected, false, 2),
        )
        .unwrap();
        // Live, during the take-in: gone.
        handle_packet(
            &mut conn,
            presence("a3", PresenceState::Disconnected, false, 3),
        )
        .unwrap();
        assert_eq!(
            conn.snapshot.as_deref(),
            Some(&["a1".to_owned(), "a2".to_owned()][..])
        );
        // Only the live arrival gets what it was sent again.
        assert_eq!(conn.came_online, ["a2".to_owned()]);
        let recorded: Vec<(&str, Presence)> = conn
            .changes
            .presence
            .iter()
            .map(|p| (p.agent_id.as_str(), p.presence))
            .collect();
        assert_eq!(
            recorded,
            [
                ("a1", Presence::Online),
                ("a2", Presence::Online),
                ("a3", Presence::Offline)
            ]
        );
        assert_eq!(conn.changes.pubacks, [1, 2, 3]);
    }

    #[test]
    fn outside_the_take_in_a_live_arrival_is_only_a_comeback() {
        let mut conn = conn();
        handle_packet(
            &mut conn,
            presence("a2", PresenceState::Connected, false, 7),
        )
        .unwrap();
        assert!(conn.snapshot.is_none());
        assert_eq!(conn.came_online, ["a2".to_owned()]);
    }
}
