//! The broker link: the console's MQTT connection (the socket through beckon-net's ladder,
//! and the shared client session over it, which builds CONNECT, keeps the packet ids, pings
//! and writes). The rest of the dispatcher talks to it through [`Conn`]'s methods only.

use std::collections::HashMap;
use std::time::Duration;

use beckon_client::{Connection, Event, Options, Session};
use beckon_mqtt::{
    ProtocolVersion, Publish, QoS, RetainHandling, Subscription, SubscriptionOptions,
};
use tokio::sync::{mpsc, oneshot};

use super::LinkError;
use super::incoming::handle_event;
use super::writer::{Changes, MAX_WRITE_BATCH, WRITE_JOBS, WriteJob};
use crate::{AppState, BrokerLink};

/// Largest packet the console accepts from the broker.
pub(super) const MAX_PACKET: u32 = 256 * 1024;
/// Keep alive of the console's connection.
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(30);
pub(super) async fn connect(
    st: &AppState,
    link: &BrokerLink,
) -> Result<beckon_net::BoxedStream, LinkError> {
    match link {
        BrokerLink::None => Err(LinkError::NotConfigured),
        BrokerLink::Anonymous { address } => {
            let tcp = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(address.as_str()),
            )
            .await
            .map_err(|_| LinkError::DialTimeout {
                address: address.clone(),
            })?
            .map_err(|source| LinkError::Dial {
                address: address.clone(),
                source,
            })?;
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
            let issued = st.ca.issue_client(
                &st.config.console_id,
                Some(st.tenant.as_str()),
                Some("server"),
                Duration::from_secs(7 * 24 * 3600),
            )?;
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
            })?;
            let mut config = beckon_net::LadderConfig::new(host.clone());
            config.primary_port = *port;
            let mut ladder = beckon_net::ConnectionLadder::new(config, std::sync::Arc::new(tls));
            let connected = ladder.connect().await?;
            Ok(connected.stream)
        }
    }
}

/// The console's Receive Maximum: how many acks, presence events and relay answers the
/// broker may push before the console acknowledges them. The console acknowledges a message
/// once what it changed is written, so this bounds what waits for the state writer: the
/// writer's queue and the batch the dispatcher is about to hand over. A flood of acks waits
/// at the broker (in the console's session queue there, bounded on its side too), and TCP
/// pushes back while the dispatcher does not read.
pub(super) const INCOMING_WINDOW: u16 = {
    let window = (WRITE_JOBS + 1) * MAX_WRITE_BATCH;
    assert!(window <= u16::MAX as usize);
    window as u16
};
/// Batches of packet ids the state writer has written and the dispatcher has not
/// acknowledged yet (one per written batch).
pub(super) const ACKED_BATCHES: usize = 16;

/// What the console asks for in CONNECT (its client id is its console id, so that consoles
/// on one database each have their own session): its session kept at the broker for an hour (the
/// subscriptions, and the acks that arrive while it is away), incoming messages acknowledged
/// by the dispatcher once written, and our publishes as many as the broker's Receive Maximum
/// lets in flight.
pub(super) fn options(client_id: &str) -> Options {
    let mut options = Options::new(ProtocolVersion::V5, client_id);
    options.clean_start = false;
    options.session_expiry = 3600;
    options.keep_alive = KEEP_ALIVE;
    options.max_packet_size = MAX_PACKET;
    options.max_inflight = 65_535;
    options.auto_ack = false;
    options.receive_maximum = INCOMING_WINDOW;
    options
}

/// The subscription options of every console subscription: QoS 1, retained messages sent at
/// subscribe (the agents' presence).
pub(super) const SUBSCRIPTION: SubscriptionOptions = SubscriptionOptions {
    qos: QoS::AtLeastOnce,
    no_local: false,
    retain_as_published: false,
    retain_handling: RetainHandling::SendAtSubscribe,
};

/// The tokio clock as a `std` instant (what the session takes).
pub(super) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

pub(super) struct Conn {
    /// The MQTT session over the broker stream.
    pub(super) link: Connection<beckon_net::BoxedStream>,
    /// Packet ids of messages whose changes the state writer has written: acknowledged now.
    pub(super) acked: mpsc::Receiver<Vec<u16>>,
    /// How many of our QoS 1 publishes may be in flight (the broker's Receive Maximum).
    pub(super) window: usize,
    /// PUBLISH packet id -> (agent, carrier wake-up id) waiting for PUBACK.
    pub(super) inflight: HashMap<u16, (String, String)>,
    /// PUBLISH packet id -> relay request id waiting for PUBACK.
    pub(super) relay_inflight: HashMap<u16, String>,
    /// Changes (and the PUBACKs that wait for them) not yet handed to the writer.
    pub(super) changes: Changes,
    /// Agents that came online: what they have not received goes out again.
    pub(super) came_online: Vec<String>,
    /// While the console takes in what the broker holds for it after (re)connecting: the
    /// agents whose retained presence says connected.
    pub(super) snapshot: Option<Vec<String>>,
    /// Wake-up ids published by a resend (queued at connect, an agent coming back) and when:
    /// a call's own publish command, still waiting in the channel, skips them, so that no
    /// wake-up goes out twice. Pruned once the channel is empty.
    pub(super) resent: HashMap<String, tokio::time::Instant>,
    /// The state writer.
    pub(super) writer: mpsc::Sender<WriteJob>,
}

impl Conn {
    /// A connection's dispatcher state over the started connection, the state writer's
    /// queue and its channel of written packet ids.
    pub(super) fn new(
        link: Connection<beckon_net::BoxedStream>,
        acked: mpsc::Receiver<Vec<u16>>,
        writer: mpsc::Sender<WriteJob>,
    ) -> Self {
        Self {
            link,
            acked,
            window: usize::from(u16::MAX),
            inflight: HashMap::new(),
            relay_inflight: HashMap::new(),
            changes: Changes::default(),
            came_online: Vec::new(),
            snapshot: None,
            resent: HashMap::new(),
            writer,
        }
    }

    /// Queues a QoS 1 publish in the session (beyond the window it waits there, in order)
    /// and returns its packet id.
    pub(super) fn publish(&mut self, publish: Publish) -> Result<u16, LinkError> {
        self.link
            .session_mut()
            .publish(publish, now())?
            .ok_or(LinkError::Session(beckon_client::Error::NoPacketId))
    }

    /// Writes everything the session queued, in one write.
    pub(super) async fn flush(&mut self) -> Result<(), LinkError> {
        Ok(self.link.flush().await?)
    }

    /// The next event from the broker. Cancel safe.
    pub(super) async fn next_event(&mut self) -> Result<Event, LinkError> {
        Ok(self.link.next_event().await?)
    }

    /// Acknowledges messages whose changes are written (see [`acknowledge`]).
    pub(super) fn acknowledge(&mut self, ids: Vec<u16>) {
        acknowledge(&mut self.link, ids);
    }

    /// Acknowledges what the state writer has written so far, without waiting.
    pub(super) fn acknowledge_written(&mut self) {
        while let Ok(ids) = self.acked.try_recv() {
            self.acknowledge(ids);
        }
    }

    /// Handles every event received so far, handing the changes over to the writer in
    /// batches of at most [`MAX_WRITE_BATCH`] (so that a flood of acks, which keeps this loop
    /// going, is held by the bounded queues and not by a growing batch).
    pub(super) async fn drain_events(&mut self) {
        while let Some(event) = self.link.session_mut().poll_event() {
            self.take(event).await;
        }
    }

    /// Handles one event, handing the changes over once a batch is full.
    pub(super) async fn take(&mut self, event: Event) {
        handle_event(self, event);
        if self.changes.is_full() {
            self.hand_over().await;
        }
    }

    /// Hands the collected changes to the writer, waiting while its queue is full (see
    /// [`WRITE_JOBS`]).
    pub(super) async fn hand_over(&mut self) {
        if !self.changes.is_empty() {
            let changes = std::mem::take(&mut self.changes);
            self.send_job(WriteJob::Changes(changes)).await;
        }
    }

    /// Sends a job to the state writer. While its queue is full, what it wrote meanwhile is
    /// acknowledged, so that it never waits for the dispatcher while the dispatcher waits
    /// for it.
    async fn send_job(&mut self, job: WriteJob) {
        let Self {
            link,
            acked,
            writer,
            ..
        } = self;
        loop {
            tokio::select! {
                permit = writer.reserve() => {
                    if let Ok(permit) = permit {
                        permit.send(job);
                    }
                    return;
                }
                ids = acked.recv() => match ids {
                    Some(ids) => acknowledge(link, ids),
                    None => {
                        let _ = writer.send(job).await;
                        return;
                    }
                },
            }
        }
    }

    /// Waits until every change collected so far is written, and acknowledges the messages
    /// they came from.
    pub(super) async fn sync(&mut self) {
        self.hand_over().await;
        let (tx, mut rx) = oneshot::channel();
        self.send_job(WriteJob::Sync(tx)).await;
        loop {
            tokio::select! {
                _ = &mut rx => break,
                ids = self.acked.recv() => match ids {
                    Some(ids) => self.acknowledge(ids),
                    None => {
                        let _ = (&mut rx).await;
                        break;
                    }
                },
            }
        }
        self.acknowledge_written();
    }

    /// Opens the MQTT session: subscribes to agents' acks, presence and relay answers (sent
    /// right behind CONNECT) and waits for the CONNACK, taking the broker's Receive Maximum.
    pub(super) async fn open_session(&mut self) -> Result<(), LinkError> {
        let subscriptions = ["agents/+/ack", "agents/+/presence", "agents/+/relay-result"]
            .into_iter()
            .map(|f| Subscription {
                filter: f.into(),
                options: SUBSCRIPTION,
            })
            .collect();
        self.link.session_mut().subscribe(subscriptions, now())?;
        loop {
            match self.next_event().await? {
                Event::Connected(settled) => {
                    self.window = settled.window.max(1);
                    return Ok(());
                }
                other => self.take(other).await,
            }
        }
    }
}

/// Acknowledges messages whose changes are written (the PUBACKs go out with the next
/// write). Once the connection is over there is nothing to acknowledge: the broker delivers
/// them again.
fn acknowledge(link: &mut Connection<beckon_net::BoxedStream>, ids: Vec<u16>) {
    let now = now();
    for id in ids {
        let _ = link.session_mut().acknowledge(id, now);
    }
}

/// A session for the console's connections.
pub(super) fn new_session(client_id: &str) -> Session {
    Session::new(options(client_id), now())
}
