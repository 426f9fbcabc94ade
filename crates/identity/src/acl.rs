//! The topic namespace and its access rules.
//!
//! Clients see tenant-relative topics (`agents/pc-42/wake`). The broker maps every topic and
//! filter into the tenant's own namespace, `t/{tenant}/...`, before it touches the topic tree,
//! and maps topics back with [`to_external`] when it delivers. Wildcards therefore never reach
//! past `t/{tenant}/`: a server's `#` becomes `t/{tenant}/#`.
//!
//! | who | may publish | may subscribe |
//! |---|---|---|
//! | agent X | `agents/X/ack`, `agents/X/relay-result` | `agents/X/wake`, `agents/X/relay` (exact filters) |
//! | server | `agents/{id}/wake`, `agents/{id}/relay` | any filter, wildcards included, inside its tenant |
//! | broker | `agents/{id}/presence`, `servers/{id}/presence` (see [`presence_topic`]) | – |
//!
//! Anonymous clients (development flag only) get their own namespace `anon/...` beside the
//! tenants ([`anonymous_to_internal`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::{Identity, Role, TenantId, validate_id};

/// First level of every internal topic; the second is the tenant id.
pub const NAMESPACE_ROOT: &str = "t";
/// Longest topic or filter in MQTT, in bytes.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Last level of the topic a server publishes wake-ups to.
pub const WAKE: &str = "wake";
/// Last level of the topic an agent publishes acks to.
pub const ACK: &str = "ack";
/// Last level of the topic a server publishes Wake-on-LAN relay requests to.
pub const RELAY: &str = "relay";
/// Last level of the topic an agent publishes Wake-on-LAN relay results to.
pub const RELAY_RESULT: &str = "relay-result";
/// Last level of the broker's presence topics.
pub const PRESENCE: &str = "presence";

/// Publishing or subscribing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// PUBLISH to a topic name (also a CONNECT will topic).
    Publish,
    /// SUBSCRIBE with a topic filter (or UNSUBSCRIBE).
    Subscribe,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Publish => "publish to",
            Access::Subscribe => "subscribe to",
        })
    }
}

/// Why a publish or subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclDenied {
    /// The topic or filter is not valid MQTT (empty, NUL, a wildcard in a topic name, a
    /// misplaced wildcard, a `$` topic, too long).
    #[error("cannot {access} {topic:?}: {reason}")]
    Malformed {
        /// Publish or subscribe.
        access: Access,
        /// The topic as the client sent it (shortened).
        topic: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The identity may not publish or subscribe there.
    #[error("{identity} may not {access} {topic:?}: {rule}")]
    NotPermitted {
        /// Who asked.
        identity: Identity,
        /// Publish or subscribe.
        access: Access,
        /// The topic as the client sent it (shortened).
        topic: String,
        /// The rule, in words.
        rule: &'static str,
    },
}

impl AclDenied {
    /// The MQTT 5 reason code for SUBACK or PUBACK/PUBREC: 0x87 Not authorized; 0x8F Topic
    /// Filter invalid or 0x90 Topic Name invalid for malformed ones.
    pub fn reason_code(&self) -> u8 {
        match self {
            AclDenied::Malformed {
                access: Access::Subscribe,
                ..
            } => 0x8F,
            AclDenied::Malformed {
                access: Access::Publish,
                ..
            } => 0x90,
            AclDenied::NotPermitted { .. } => crate::auth::NOT_AUTHORIZED,
        }
    }

    /// The MQTT 3.1.1 SUBACK return code: 0x80 Failure. (3.1.1 has no code for a refused
    /// PUBLISH: the broker acknowledges and drops it.)
    pub fn suback_code_v3(&self) -> u8 {
        0x80
    }
}

fn shorten(topic: &str) -> String {
    topic.chars().take(200).collect()
}

fn tenant_prefix(tenant: &TenantId) -> String {
    format!("{NAMESPACE_ROOT}/{tenant}/")
}

/// Checks topic-name syntax: no wildcard, no NUL, no leading `$`, not empty.
fn check_topic_name(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("a topic name is never empty");
    }
    if topic.contains(['+', '#']) {
        return Err("wildcards '+' and '#' are only allowed in subscription filters");
    }
    if topic.contains('\0') {
        return Err("topics may not contain NUL");
    }
    if topic.starts_with('$') {
        return Err("topics starting with '$' are reserved for the broker");
    }
    Ok(())
}

/// Checks topic-filter syntax: wildcards fill whole levels, `#` only last, no NUL, no leading
/// `$`, not empty.
fn check_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("a topic filter is never empty");
    }
    if filter.contains('\0') {
        return Err("topic filters may not contain NUL");
    }
    if filter.starts_with('$') {
        return Err("topics starting with '$' are reserved for the broker");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("'#' must be a whole level and the last one");
        }
        if level.contains('+') && *level != "+" {
            return Err("'+' must fill a whole level");
        }
    }
    Ok(())
}

/// If `topic` is `agents/{id}/{kind}` with a valid id, its id and kind.
fn agent_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix("agents/")?;
    let (id, kind) = rest.split_once('/')?;
    if kind.contains('/') || validate_id(id).is_err() {
        return None;
    }
    Some((id, kind))
}

fn is_presence_topic(topic: &str) -> bool {
    let mut levels = topic.split('/');
    matches!(
        (levels.next(), levels.next(), levels.next(), levels.next()),
        (Some("agents" | "servers"), Some(_), Some(PRESENCE), None)
    )
}

/// Splits `$share/{group}/{filter}` into group and filter.
fn split_shared(filter: &str) -> Result<Option<(&str, &str)>, &'static str> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        return Ok(None);
    };
    let Some((group, inner)) = rest.split_once('/') else {
        return Err("a shared subscription is $share/{group}/{filter}");
    };
    if group.is_empty() || group.contains(['+', '#', '\0']) {
        return Err("a share group name is not empty and has no '+', '#' or NUL");
    }
    Ok(Some((group, inner)))
}

/// Checks the syntax of `topic_or_filter` as `access` needs it (a topic name to publish, a
/// filter to subscribe) and splits off the group of a shared subscription:
/// `(share group, topic name or filter)`.
fn check_syntax(
    access: Access,
    topic_or_filter: &str,
) -> Result<(Option<&str>, &str), &'static str> {
    match access {
        Access::Publish => {
            check_topic_name(topic_or_filter)?;
            Ok((None, topic_or_filter))
        }
        Access::Subscribe => {
            let (group, filter) = match split_shared(topic_or_filter)? {
                Some((group, inner)) => (Some(group), inner),
                None => (None, topic_or_filter),
            };
            check_filter(filter)?;
            Ok((group, filter))
        }
    }
}

/// Decides whether `identity` may publish to a topic or subscribe with a filter, and maps the
/// client's tenant-relative topic into the tenant namespace (`agents/x/wake` ->
/// `t/{tenant}/agents/x/wake`; `$share/g/agents/+/ack` -> `$share/g/t/{tenant}/agents/+/ack`).
///
/// The broker calls it for every PUBLISH (and the CONNECT will topic) with
/// [`Access::Publish`], and for every SUBSCRIBE/UNSUBSCRIBE filter with [`Access::Subscribe`].
/// Shared subscriptions are checked on their inner filter; the group name is kept, and since
/// the mapped filter carries the tenant, groups of different tenants never mix.
pub fn to_internal(
    identity: &Identity,
    access: Access,
    topic_or_filter: &str,
) -> Result<String, AclDenied> {
    let malformed = |reason| AclDenied::Malformed {
        access,
        topic: shorten(topic_or_filter),
        reason,
    };
    let denied = |rule| AclDenied::NotPermitted {
        identity: identity.clone(),
        access,
        topic: shorten(topic_or_filter),
        rule,
    };
    let (share_group, topic) = check_syntax(access, topic_or_filter).map_err(malformed)?;

    match (identity.role, access) {
        (_, Access::Publish) if is_presence_topic(topic) => {
            return Err(denied("presence topics are published by the broker only"));
        }
        (Role::Agent, Access::Publish) => match agent_topic(topic) {
            Some((id, ACK | RELAY_RESULT)) if id == identity.id() => {}
            _ => {
                return Err(denied(
                    "an agent publishes only to agents/{its id}/ack and agents/{its id}/relay-result",
                ));
            }
        },
        (Role::Agent, Access::Subscribe) => match agent_topic(topic) {
            Some((id, WAKE | RELAY)) if id == identity.id() => {}
            _ => {
                return Err(denied(
                    "an agent subscribes only to agents/{its id}/wake and agents/{its id}/relay, without wildcards",
                ));
            }
        },
        (Role::Server, Access::Publish) => match agent_topic(topic) {
            Some((_, WAKE | RELAY)) => {}
            _ => {
                return Err(denied(
                    "a server publishes only to agents/{agent id}/wake and agents/{agent id}/relay",
                ));
            }
        },
        // Any filter: the namespace prefix keeps it inside the tenant.
        (Role::Server, Access::Subscribe) => {}
    }

    let mut internal = String::with_capacity(topic_or_filter.len() + 80);
    if let Some(group) = share_group {
        internal.push_str("$share/");
        internal.push_str(group);
        internal.push('/');
    }
    internal.push_str(&tenant_prefix(&identity.tenant));
    internal.push_str(topic);
    if internal.len() > MAX_TOPIC_LEN {
        return Err(malformed("too long once mapped into the tenant namespace"));
    }
    Ok(internal)
}

/// First level of the namespace for anonymous clients, allowed only behind the broker's
/// development flag. It sits beside the tenants' `t/`, so anonymous clients never see them.
pub const ANONYMOUS_ROOT: &str = "anon";

/// Maps a topic or filter of an anonymous client (development flag only) into `anon/...`.
/// Anything syntactically valid is allowed there; nothing there is a tenant's.
pub fn anonymous_to_internal(access: Access, topic_or_filter: &str) -> Result<String, AclDenied> {
    let malformed = |reason| AclDenied::Malformed {
        access,
        topic: shorten(topic_or_filter),
        reason,
    };
    let (group, topic) = check_syntax(access, topic_or_filter).map_err(malformed)?;
    let internal = match group {
        Some(group) => format!("$share/{group}/{ANONYMOUS_ROOT}/{topic}"),
        None => format!("{ANONYMOUS_ROOT}/{topic}"),
    };
    if internal.len() > MAX_TOPIC_LEN {
        return Err(malformed(
            "too long once mapped into the anonymous namespace",
        ));
    }
    Ok(internal)
}

/// Maps an internal topic back for an anonymous client, or `None` if it is not in `anon/`.
pub fn anonymous_to_external(internal_topic: &str) -> Option<&str> {
    internal_topic
        .strip_prefix(ANONYMOUS_ROOT)?
        .strip_prefix('/')
        .filter(|rest| !rest.is_empty())
}

/// Maps an internal topic name back to what `identity`'s client sees, or `None` when the
/// topic is not in `identity`'s tenant (the broker must then not deliver it at all).
pub fn to_external(identity: &Identity, internal_topic: &str) -> Option<String> {
    tenant_relative(&identity.tenant, internal_topic).map(str::to_owned)
}

/// The tenant-relative part of an internal topic if it belongs to `tenant`.
pub fn tenant_relative<'a>(tenant: &TenantId, internal_topic: &'a str) -> Option<&'a str> {
    let rest = internal_topic
        .strip_prefix(NAMESPACE_ROOT)?
        .strip_prefix('/')?;
    let rest = rest.strip_prefix(tenant.as_str())?.strip_prefix('/')?;
    (!rest.is_empty()).then_some(rest)
}

/// The tenant an internal topic belongs to, if any (for the cluster link and metrics).
pub fn tenant_of(internal_topic: &str) -> Option<&str> {
    let rest = internal_topic
        .strip_prefix(NAMESPACE_ROOT)?
        .strip_prefix('/')?;
    rest.split_once('/').map(|(tenant, _)| tenant)
}

/// The tenant-relative topic a server publishes wake-ups for `agent_id` to.
pub fn wake_topic(agent_id: &str) -> String {
    format!("agents/{agent_id}/{WAKE}")
}

/// The tenant-relative topic an agent publishes its acks to.
pub fn ack_topic(agent_id: &str) -> String {
    format!("agents/{agent_id}/{ACK}")
}

/// The internal topic the broker publishes `identity`'s presence to (retained, QoS 1):
/// `t/{tenant}/agents/{id}/presence` for agents, `t/{tenant}/servers/{id}/presence` for
/// servers. Servers of the tenant see it as `agents/{id}/presence`.
pub fn presence_topic(identity: &Identity) -> String {
    let kind = match identity.role {
        Role::Agent => "agents",
        Role::Server => "servers",
    };
    format!(
        "{}{kind}/{}/{PRESENCE}",
        tenant_prefix(&identity.tenant),
        identity.id()
    )
}

/// Connected or disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceState {
    /// The client completed CONNECT.
    Connected,
    /// The connection ended.
    Disconnected,
}

/// Which of the broker's doors a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectionPath {
    /// MQTT over TLS on the MQTT port (8883).
    #[serde(rename = "8883")]
    Mqtts,
    /// Raw MQTT on the shared HTTPS port (443, ALPN `mqtt` or sniffed).
    #[serde(rename = "443-mqtt")]
    SharedMqtt,
    /// MQTT over WebSocket on the shared HTTPS port (443, `GET /mqtt`).
    #[serde(rename = "443-websocket")]
    SharedWebSocket,
    /// Plain MQTT without TLS (1883, loopback and development only).
    #[serde(rename = "1883")]
    Plain,
}

/// The presence event the broker publishes (retained) when a client connects or disconnects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    /// Connected or disconnected.
    pub state: PresenceState,
    /// When, in unix milliseconds.
    pub at: i64,
    /// Why (see `docs/tenants.md` for the values the broker uses, e.g. `client_disconnect`,
    /// `keepalive_timeout`, `taken_over`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The client's address as the broker saw it (`ip:port`).
    pub remote_addr: String,
    /// Which door the connection came through.
    pub path: ConnectionPath,
    /// Whether the client said it came through an HTTP proxy; `null` when unknown.
    pub via_proxy: Option<bool>,
    /// The cluster node holding the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl PresenceEvent {
    /// The JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings, integers and enums always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a presence payload (console side).
    pub fn from_json(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}
