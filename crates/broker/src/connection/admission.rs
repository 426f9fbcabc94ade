//! The CONNECT phase of a connection: reading the CONNECT within the connect timeout,
//! answering a malformed one, the limits, authentication and the will's topic.

use std::io;

use beckon_mqtt::{ConnAck, Connect, DecodeError, Packet, Properties, ProtocolVersion, ReasonCode};
use bytes::BytesMut;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, timeout_at};

use super::{
    Busy, ConnectionContext, ListenerKind, Peer, log_decode_error, log_read_error, next_packet,
    read_some, send_final,
};
use crate::tenancy::{Scope, TenantSlot, TopicMap};

/// The protocol version a (possibly malformed) CONNECT names, read from its raw bytes, so
/// that a refusal can be written in the client's version.
fn sniff_connect_version(buf: &[u8]) -> Option<ProtocolVersion> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    if buf.get(i..i + 6)? != [0, 4, b'M', b'Q', b'T', b'T'] {
        return None;
    }
    match buf.get(i + 6)? {
        5 => Some(ProtocolVersion::V5),
        4 => Some(ProtocolVersion::V311),
        _ => None,
    }
}

fn connack(code: ReasonCode, reason: &str, version: ProtocolVersion) -> Packet {
    let mut properties = Properties::default();
    if version == ProtocolVersion::V5 {
        properties.reason_string = Some(reason.to_owned());
    }
    Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties,
    })
}

/// How the CONNECT phase ended. Short-lived, so its size does not matter.
#[allow(clippy::large_enum_variant)]
enum ConnectPhase {
    Packet(Packet),
    Invalid(DecodeError, Option<ProtocolVersion>),
    Eof,
    Io(io::Error),
}

async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_packet_size: u32,
) -> ConnectPhase {
    loop {
        let sniffed = sniff_connect_version(buf);
        match next_packet(buf, ProtocolVersion::V311, max_packet_size) {
            Ok(Some(p)) => return ConnectPhase::Packet(p),
            Ok(None) => {}
            Err(e) => return ConnectPhase::Invalid(e, sniffed),
        }
        match read_some(stream, buf).await {
            Ok(0) => return ConnectPhase::Eof,
            Ok(_) => {}
            Err(e) => return ConnectPhase::Io(e),
        }
    }
}

/// The CONNECT phase: reads the CONNECT within the deadline, answers malformed ones, checks
/// the connection limit and authentication. Returns the admitted CONNECT. Boxed by the
/// caller, so its state is freed once the connection is established.
pub(super) async fn admit<S: AsyncRead + AsyncWrite + Unpin>(
    context: &ConnectionContext,
    stream: &mut S,
    rbuf: &mut BytesMut,
    peer: &Peer,
    leaf: Option<Vec<u8>>,
) -> Option<Admitted> {
    let mut connect = receive_connect(context, stream, rbuf, peer.deadline).await?;
    let version = connect.protocol;
    // Admission: connection limit, then authentication, then the will's topic.
    let admitted = match peer.over_limit {
        Some(busy) => Err(busy_refusal(context, busy)),
        None => authenticate(context, &mut connect, peer.kind, leaf.as_deref()),
    };
    let refusal = match admitted {
        Ok((map, slot)) => match map.map_will(&mut connect) {
            Ok(()) => {
                return Some(Admitted {
                    connect,
                    map,
                    _slot: slot,
                });
            }
            Err(denied) => {
                let why = format!("will topic: {denied}");
                tracing::info!(code = "0x87", reason = %why, "refused CONNECT");
                (ReasonCode::NOT_AUTHORIZED, why)
            }
        },
        Err(refusal) => refusal,
    };
    let (code, why) = refusal;
    refuse(context, stream, connack(code, &why, version), version).await;
    None
}

/// Answers a refused CONNECT with `packet` (a CONNACK), counted, and closes.
async fn refuse<S: AsyncWrite + Unpin>(
    context: &ConnectionContext,
    stream: &mut S,
    packet: Packet,
    version: ProtocolVersion,
) {
    context.metrics.connack_packet(&packet);
    Box::pin(send_final(stream, packet, version)).await;
}

/// Reads the CONNECT within `deadline` (or until shutdown). A malformed one is answered
/// in the client's version when it can be told; anything else just ends the connection.
async fn receive_connect<S: AsyncRead + AsyncWrite + Unpin>(
    context: &ConnectionContext,
    stream: &mut S,
    rbuf: &mut BytesMut,
    deadline: Instant,
) -> Option<Box<Connect>> {
    let max = context.max_packet_size;
    let mut shutdown = context.shutdown.clone();
    let phase = tokio::select! {
        r = Box::pin(timeout_at(deadline, read_connect(stream, rbuf, max))) => r,
        _ = shutdown.changed() => return None,
    };
    match phase {
        Err(_) => {
            tracing::info!(
                timeout_secs = context.connect_timeout.as_secs(),
                "no complete CONNECT within the connect timeout; closed"
            );
        }
        Ok(ConnectPhase::Packet(Packet::Connect(c))) => return Some(c),
        Ok(ConnectPhase::Packet(other)) => {
            tracing::info!(
                packet_type = other.packet_type(),
                "first packet is not CONNECT; closed"
            );
        }
        Ok(ConnectPhase::Invalid(e, sniffed)) => {
            log_decode_error(context, &e, "the CONNECT");
            match (&e, sniffed) {
                (DecodeError::UnsupportedProtocolVersion { .. }, _) => {
                    // Answered in v3.1.1 form (return code 1), which every version reads.
                    let v3 = ProtocolVersion::V311;
                    refuse(context, stream, connack(e.reason_code(), "", v3), v3).await;
                }
                (_, Some(ProtocolVersion::V5)) => {
                    let v5 = ProtocolVersion::V5;
                    let p = connack(e.reason_code(), &e.to_string(), v5);
                    refuse(context, stream, p, v5).await;
                }
                _ => {}
            }
        }
        Ok(ConnectPhase::Eof) => tracing::debug!("closed by the client before CONNECT"),
        Ok(ConnectPhase::Io(e)) => log_read_error(context, &e),
    }
    None
}

/// A refusal: the reason code and the reason string (v5).
type Refusal = (ReasonCode, String);

/// The refusal of a connection over a limit.
fn busy_refusal(context: &ConnectionContext, busy: Busy) -> Refusal {
    match busy {
        Busy::Connections => {
            if context.busy_log.due() {
                tracing::warn!(
                    max_connections = context.max_connections,
                    "connection limit reached; refusing new connections with Server busy (logged at most once a minute)"
                );
            }
            let why = "connection limit reached, retry later";
            (ReasonCode::SERVER_BUSY, why.to_owned())
        }
        Busy::Rate(which) => {
            tracing::info!(
                limit = ?which,
                "connect rate exceeded; refused with 0x9F (v3.1.1: return code 3)"
            );
            let why = "connection rate exceeded, retry later";
            (ReasonCode::CONNECTION_RATE_EXCEEDED, why.to_owned())
        }
    }
}

/// Who the client is: with tenants, a tenant identity (or anonymous, when allowed);
/// without, the client certificate's name (or anonymous, when allowed). Returns its topic
/// mapping and tenant quota slot, or the refusal.
fn authenticate(
    context: &ConnectionContext,
    connect: &mut Connect,
    kind: ListenerKind,
    leaf: Option<&[u8]>,
) -> Result<(TopicMap, Option<TenantSlot>), Refusal> {
    let Some(tenancy) = &context.tenancy else {
        if !context.allow_anonymous {
            authenticate_by_certificate(connect, kind, leaf)?;
        }
        return Ok((TopicMap::new(Scope::Plain), None));
    };
    let has_password = connect.password.as_ref().is_some_and(|p| !p.is_empty());
    if leaf.is_none() && !has_password && context.allow_anonymous {
        if connect.client_id.contains('/') {
            let why = "client ids containing '/' are reserved for tenant identities";
            tracing::info!(client_id = %connect.client_id, code = "0x85", reason = why, "refused: client identifier not valid");
            return Err((ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, why.to_owned()));
        }
        return Ok((TopicMap::new(Scope::Anonymous), None));
    }
    match tenancy.admit(connect, leaf) {
        Ok((scope, slot)) => {
            let map = TopicMap::new(scope);
            if let Some(identity) = map.identity() {
                tracing::info!(identity = %identity, probe = map.is_probe(), "authenticated");
            }
            Ok((map, Some(slot)))
        }
        Err(refused) => {
            tracing::info!(
                client_id = %connect.client_id,
                code = %format_args!("0x{:02X}", refused.code.0),
                v3_return_code = refused.code.to_v311_connack(),
                reason = %refused.why,
                "refused CONNECT"
            );
            Err((refused.code, refused.why))
        }
    }
}

/// Without tenants and anonymous access: the client certificate issued by the broker's CA
/// is the identity; an empty client id takes its name, another one is refused.
fn authenticate_by_certificate(
    connect: &mut Connect,
    kind: ListenerKind,
    leaf: Option<&[u8]>,
) -> Result<(), Refusal> {
    let cert_name = leaf
        .and_then(|der| beckon_pki::certificate_identity(&CertificateDer::from(der)).ok())
        .and_then(|id| id.common_name);
    let refusal = match &cert_name {
        None => Some(match kind {
            ListenerKind::Tls | ListenerKind::Fallback => "no client certificate issued by the broker's CA (and anonymous access is off)".to_owned(),
            ListenerKind::Plain => "plain MQTT listener cannot carry a client certificate (and anonymous access is off)".to_owned(),
        }),
        Some(cn) if !connect.client_id.is_empty() && connect.client_id != *cn => Some(format!(
            "client id {:?} differs from the certificate's identity {cn:?}",
            connect.client_id
        )),
        Some(_) => None,
    };
    if let Some(why) = refusal {
        tracing::info!(client_id = %connect.client_id, reason = %why, "refused: not authorized");
        return Err((ReasonCode::NOT_AUTHORIZED, why));
    }
    if let Some(cn) = cert_name {
        // The certificate is the identity; an empty client id takes it.
        connect.client_id = cn;
    }
    Ok(())
}

/// An admitted CONNECT with its topic mapping and quota slot.
pub(super) struct Admitted {
    pub(super) connect: Box<Connect>,
    pub(super) map: TopicMap,
    pub(super) _slot: Option<TenantSlot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_the_version_of_a_connect() {
        let v5 = [0x10, 0x10, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60];
        assert_eq!(sniff_connect_version(&v5), Some(ProtocolVersion::V5));
        let v4 = [0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
        assert_eq!(sniff_connect_version(&v4), Some(ProtocolVersion::V311));
        assert_eq!(sniff_connect_version(&[0x30, 0x00]), None);
        assert_eq!(
            sniff_connect_version(&[0x10, 0xff, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(sniff_connect_version(&[0x10]), None);
    }
}
