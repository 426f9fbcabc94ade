//! Wake-on-LAN: magic packets sent by the console itself, and signed relay requests for an
//! online agent on the target's subnet.

use std::time::{Duration, Instant};

use beckon_mqtt::{Properties, Publish, QoS};
use bytes::Bytes;

use super::link::Conn;
use super::resend::wait_for_window;
use super::{Command, LinkError};
use crate::AppState;
use crate::model::*;
use crate::store::StoreResult;
use crate::wol::{RelayIndex, relay_subnets};

/// A relay request that could not go out: its sends say why.
pub(super) async fn relay_not_sent(st: &AppState, request_id: String) {
    let error = "not sent: the console is not connected to the push service";
    if let Err(e) = st
        .store
        .run(move |s| s.fail_relay(&request_id, error))
        .await
    {
        tracing::warn!(error = %e, "recording a relay failure failed");
    }
}

/// Publishes a signed relay request (QoS 1, message expiry: the request's lifetime).
pub(super) async fn publish_relay(
    conn: &mut Conn,
    agent: &str,
    request_id: String,
    payload: Vec<u8>,
    expiry_secs: u32,
) -> Result<(), LinkError> {
    wait_for_window(conn).await?;
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: beckon_identity::relay::relay_topic(agent),
        packet_id: None,
        payload: Bytes::from(payload),
        properties: Properties::from(beckon_mqtt::PropertySet {
            message_expiry_interval: Some(expiry_secs.max(1)),
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            ..Default::default()
        }),
    };
    let pid = conn.publish(publish)?;
    conn.relay_inflight.insert(pid, request_id);
    conn.flush().await?;
    conn.hand_over().await;
    Ok(())
}

/// How long a relay request stays valid, seconds: a relay is for "wake it now".
pub const RELAY_LIFETIME_SECS: u32 = 120;

/// How long the online agents read for choosing relays are used: a call to thousands of
/// sleeping machines reads them once, not once per machine, and a relay that went offline
/// since is out of the choice within this time.
const RELAY_CANDIDATES_FOR: Duration = Duration::from_secs(30);

/// The relays Wake-on-LAN may go through: the online agents, read from the store when first
/// needed, used for [`RELAY_CANDIDATES_FOR`] by every call and request of the console
/// ([`AppState::relays`]), then let go (a fleet's addresses are not kept for one machine
/// woken an hour ago).
#[derive(Debug, Default)]
pub struct Relays {
    index: tokio::sync::Mutex<Option<(Instant, RelayIndex)>>,
}

impl Relays {
    /// Lets the online agents go, to be read again at the next need: after agents were
    /// removed, none of them is asked to relay.
    pub async fn forget(&self) {
        *self.index.lock().await = None;
    }
}

/// For each relay subnet of `target`, the agent to relay through and the subnet's broadcast
/// address ([`RelayIndex::choose`]), from the console's [`Relays`].
async fn choose_relays(
    st: &AppState,
    target: &Agent,
    loopback: bool,
) -> StoreResult<Vec<(String, std::net::Ipv4Addr)>> {
    // Held while the candidates are read: the machines woken beside this one wait for the
    // same read instead of each reading the fleet.
    let mut index = st.relays.index.lock().await;
    let kept = match index.take() {
        Some((read, kept)) if read.elapsed() <= RELAY_CANDIDATES_FOR => (read, kept),
        _ => {
            let candidates = st.store.run(|s| s.relay_candidates()).await?;
            let read = Instant::now();
            let relays = st.relays.clone();
            tokio::spawn(async move {
                tokio::time::sleep(RELAY_CANDIDATES_FOR).await;
                let mut index = relays.index.lock().await;
                if index.as_ref().is_some_and(|(at, _)| *at == read) {
                    *index = None;
                }
            });
            (read, RelayIndex::new(candidates))
        }
    };
    Ok(index.insert(kept).1.choose(target, loopback))
}

/// Sends Wake-on-LAN for each MAC of `agent` to each destination of `wol` (the settings,
/// read once by the caller: a call's thousands of machines share them), recording every send.
pub async fn wake_on_lan(
    st: &AppState,
    agent: &Agent,
    call_id: Option<String>,
    wol: &crate::settings::WolSettings,
) -> StoreResult<Vec<WolSend>> {
    let secureon = crate::wol::parse_secureon(&wol.secureon).unwrap_or(None);
    let destinations = crate::wol::destinations(&agent.inventory.addresses, wol);
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
        sends.extend(request_relays(st, agent, call_id, wol).await?);
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
    let loopback = st.config.wol_relay_loopback;
    if macs.is_empty() || relay_subnets(&agent.inventory.addresses, loopback).is_empty() {
        return Ok(Vec::new());
    }
    let relays = choose_relays(st, agent, loopback).await?;
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
            if st.dispatch.send(command).await.is_err() {
                tracing::warn!("the dispatcher is gone: relay request not sent");
            }
        }
    }
    Ok(sends)
}
