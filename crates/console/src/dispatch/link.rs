//! The broker link: the console's MQTT connection (the socket through beckon-net's ladder,
//! CONNECT and SUBSCRIBE, packet ids, and the tasks that read and write the socket). The rest
//! of the dispatcher talks to it through [`Conn`]'s methods only.

use std::collections::HashMap;
use std::time::Duration;

use beckon_mqtt::{
    Connect, Packet, Properties, ProtocolVersion, QoS, RetainHandling, Subscribe, Subscription,
    SubscriptionOptions,
};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::LinkError;
use super::incoming::handle_packet;
use super::writer::{Changes, WriteJob};
use crate::{AppState, BrokerLink};

/// Largest packet the console accepts from the broker.
pub(super) const MAX_PACKET: u32 = 256 * 1024;
/// Keep alive of the console's connection, seconds.
pub(super) const KEEP_ALIVE: u16 = 30;
/// The console's MQTT client id (its server identity id).
pub const CLIENT_ID: &str = "console";

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
            .map_err(|_| LinkError::ConnectTimeout {
                address: address.clone(),
            })?
            .map_err(|source| LinkError::Connect {
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
                CLIENT_ID,
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

/// Packets read from the broker and not handled yet. When the dispatcher falls behind (the
/// state writer is slow, say), the socket reader waits here and stops reading: TCP pushes
/// back onto the broker, which keeps what it still has to send (acks, presence) in the
/// console's session queue, bounded on its side too.
pub(super) const INCOMING_PACKETS: usize = 1024;
/// Byte chunks (each many packets) waiting for the socket writer. When full, whoever writes
/// (the dispatcher, the state writer's PUBACKs) waits for the socket.
pub(super) const OUTGOING_CHUNKS: usize = 64;

pub(super) struct Conn {
    /// Bytes for the socket writer ([`write_packets`]).
    pub(super) out: mpsc::Sender<Bytes>,
    /// Packets from the socket reader ([`read_packets`]), or why reading stopped.
    pub(super) incoming: mpsc::Receiver<Result<Packet, LinkError>>,
    /// Packets received and not handled yet.
    pub(super) ready: std::collections::VecDeque<Packet>,
    /// Packets encoded but not handed to the socket writer yet.
    pub(super) wbuf: BytesMut,
    pub(super) next_id: u16,
    /// PUBLISH packet id -> (agent, carrier wake-up id) waiting for PUBACK.
    pub(super) inflight: HashMap<u16, (String, String)>,
    /// PUBLISH packet id -> relay request id waiting for PUBACK.
    pub(super) relay_inflight: HashMap<u16, String>,
    /// The broker's Receive Maximum: at most this many QoS 1 publishes unacknowledged.
    pub(super) receive_max: usize,
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

/// Reads the broker's packets as they come, whatever the dispatcher is doing, so that the
/// broker never sees a console that does not read (it would close it, or drop acks queued
/// for it). QoS 1 messages (acks, presence) are acknowledged by [`write_states`] once what
/// they change is written; the broker's in-flight window for a server identity is large
/// enough to keep them flowing meanwhile.
pub(super) async fn read_packets(
    mut read: tokio::io::ReadHalf<beckon_net::BoxedStream>,
    packets: mpsc::Sender<Result<Packet, LinkError>>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        match read.read_buf(&mut buf).await {
            Ok(0) => {
                let _ = packets.send(Err(LinkError::Closed)).await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = packets.send(Err(LinkError::Read(e))).await;
                return;
            }
        }
        loop {
            match beckon_mqtt::decode(&mut buf, ProtocolVersion::V5, MAX_PACKET) {
                Ok(Some(p)) => {
                    // Waits while the dispatcher is behind (see INCOMING_PACKETS).
                    if packets.send(Ok(p)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = packets.send(Err(LinkError::Malformed(e))).await;
                    return;
                }
            }
        }
    }
}

/// Writes what the dispatcher and the reader queue, many packets per write.
pub(super) async fn write_packets(
    mut write: tokio::io::WriteHalf<beckon_net::BoxedStream>,
    mut out: mpsc::Receiver<Bytes>,
    errors: mpsc::Sender<Result<Packet, LinkError>>,
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
            let _ = errors.send(Err(LinkError::Write(e))).await;
            return;
        }
        buf.clear();
    }
}

impl Conn {
    /// A fresh connection's state over the socket writer's, socket reader's and state
    /// writer's channels.
    pub(super) fn new(
        out: mpsc::Sender<Bytes>,
        incoming: mpsc::Receiver<Result<Packet, LinkError>>,
        writer: mpsc::Sender<WriteJob>,
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
    pub(super) fn queue(&mut self, packet: &Packet) -> Result<(), LinkError> {
        beckon_mqtt::encode(packet, ProtocolVersion::V5, &mut self.wbuf).map_err(LinkError::from)
    }

    /// Hands every queued packet to the socket writer (which writes many at once: one TLS
    /// record, one system call).
    pub(super) async fn write_out(&mut self) -> Result<(), LinkError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let out = self.wbuf.split().freeze();
        self.out.send(out).await.map_err(|_| LinkError::WriterGone)
    }

    pub(super) async fn send(&mut self, packet: &Packet) -> Result<(), LinkError> {
        self.queue(packet)?;
        self.write_out().await
    }

    pub(super) fn packet_id(&mut self) -> u16 {
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
    pub(super) async fn read_more(&mut self) -> Result<(), LinkError> {
        match self.incoming.recv().await {
            Some(Ok(p)) => {
                self.ready.push_back(p);
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err(LinkError::ReaderGone),
        }
    }

    /// The next packet already received, if any.
    pub(super) fn next_packet(&mut self) -> Result<Option<Packet>, LinkError> {
        if let Some(p) = self.ready.pop_front() {
            return Ok(Some(p));
        }
        match self.incoming.try_recv() {
            Ok(Ok(p)) => Ok(Some(p)),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(None),
        }
    }

    pub(super) async fn read_packet(&mut self) -> Result<Packet, LinkError> {
        loop {
            if let Some(p) = self.next_packet()? {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    /// Handles every packet received so far, handing the changes over to the writer in
    /// batches of at most [`MAX_WRITE_BATCH`](super::writer::MAX_WRITE_BATCH) (so that a flood of acks, which keeps this loop
    /// going, is held by the bounded channels and not by a growing batch).
    pub(super) async fn drain_packets(&mut self) -> Result<(), LinkError> {
        while let Some(p) = self.next_packet()? {
            self.take(p).await?;
        }
        Ok(())
    }

    /// Handles one packet, handing the changes over once a batch is full.
    pub(super) async fn take(&mut self, packet: Packet) -> Result<(), LinkError> {
        handle_packet(self, packet)?;
        if self.changes.is_full() {
            self.hand_over().await;
        }
        Ok(())
    }

    /// Hands the collected changes to the writer, waiting while its queue is full (see
    /// [`WRITE_JOBS`](super::writer::WRITE_JOBS)).
    pub(super) async fn hand_over(&mut self) {
        if !self.changes.is_empty() {
            let _ = self
                .writer
                .send(WriteJob::Changes(std::mem::take(&mut self.changes)))
                .await;
        }
    }

    /// Waits until every change collected so far is written.
    pub(super) async fn sync(&mut self) {
        self.hand_over().await;
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriteJob::Sync(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Handles whatever the broker already sent, without waiting.
    pub(super) async fn take_in_ready(&mut self) -> Result<(), LinkError> {
        self.drain_packets().await
    }
}

impl Conn {
    /// Opens the MQTT session: CONNECT (keeping the session at the broker for an hour),
    /// CONNACK (taking the broker's Receive Maximum) and the SUBSCRIBE to agents' acks,
    /// presence and relay answers. Returns the subscription options, for later SUBSCRIBEs.
    pub(super) async fn open_session(&mut self) -> Result<SubscriptionOptions, LinkError> {
        let conn = self;
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
            .map_err(|_| LinkError::NoConnAck)??;
        match connack {
            Packet::ConnAck(ack) if !ack.code.is_error() => {
                if let Some(max) = ack.properties.receive_maximum {
                    conn.receive_max = usize::from(max.max(1));
                }
            }
            Packet::ConnAck(ack) => {
                return Err(LinkError::Refused {
                    code: ack.code.0,
                    reason: ack.properties.reason_string.clone(),
                });
            }
            other => {
                return Err(LinkError::NotConnAck(other.packet_type()));
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
        Ok(options)
    }
}
