//! Tenants in the broker: the tenant directory (reloaded by polling), the TLS configuration
//! whose client-certificate roots are the tenants' CAs, authentication at CONNECT, per-tenant
//! connection counts, and the topic mapping of each connection ([`TopicMap`]).
//!
//! The protocol core knows nothing of tenants: every topic and filter is mapped into the
//! tenant's namespace (`t/{tenant}/...`) before it reaches the core, and mapped back before a
//! packet is written. Sessions of tenant identities are keyed by `tenant/role/id`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use beckon_identity::{
    Access, AclDenied, Authenticator, Credential, Credentials, Identity, TenantDirectory, acl,
    check_quota, probe_client_id,
};

use crate::core::ConnId;
use crate::revocation_feed::{FeedChange, FeedRevocations};
use beckon_mqtt::{Ack, Connect, Packet, Properties, ReasonCode, SubAck, UnsubAck};
use rustls::pki_types::CertificateDer;
use rustls::{RootCertStore, ServerConfig};

/// The tenant directory and what hangs on it.
#[derive(Debug)]
pub(crate) struct Tenancy {
    folder: PathBuf,
    directory: ArcSwap<TenantDirectory>,
    authenticator: Authenticator,
    /// Connections admitted per tenant on this node (for `max_connections` quotas).
    counts: Mutex<HashMap<String, usize>>,
    tls13_only: bool,
    /// The last TLS configuration built: (base, directory, result).
    tls_cache: Mutex<Option<TlsCacheEntry>>,
    /// The credentials of every admitted tenant connection, by slot: a reload that revokes
    /// one of them closes its connection.
    live: Mutex<LiveCredentials>,
    /// What the consoles' revocation feeds refuse, by tenant (`[[revocation_feed]]`), beside
    /// the tenant files' `[[revoked]]` entries.
    feeds: RwLock<HashMap<String, FeedRevocations>>,
}

/// What each admitted connection authenticated with.
#[derive(Debug, Default)]
struct LiveCredentials {
    next_slot: u64,
    by_slot: HashMap<u64, LiveCredential>,
}

#[derive(Debug)]
struct LiveCredential {
    identity: Identity,
    certificate_serial: Option<String>,
    token_issued_at: Option<i64>,
    /// Set once the connection task knows its id ([`TenantSlot::attach`]).
    conn: Option<ConnId>,
}

impl LiveCredential {
    /// The credentials the connection presented.
    fn presented(&self) -> impl Iterator<Item = Credential<'_>> {
        self.certificate_serial
            .as_deref()
            .map(Credential::Certificate)
            .into_iter()
            .chain(self.token_issued_at.map(Credential::Token))
    }
}

/// What a reload of the tenant folder changed for live connections.
#[derive(Debug, Default)]
pub(crate) struct Reloaded {
    /// Tenants whose file was removed: all their connections close.
    pub(crate) removed: Vec<String>,
    /// Connections whose credentials a `[[revoked]]` entry now names.
    pub(crate) revoked: Vec<ConnId>,
}

type TlsCacheEntry = (Arc<ServerConfig>, Arc<TenantDirectory>, Arc<ServerConfig>);

/// Unix seconds now (0 if the clock is before 1970).
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Unix milliseconds now.
pub(crate) fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Tenancy {
    /// Loads the tenant folder; problems are logged, valid tenants are used.
    pub(crate) fn load(folder: &Path, tls13_only: bool) -> Self {
        let outcome = TenantDirectory::load(folder);
        for e in &outcome.errors {
            tracing::warn!(error = %e, "tenant file not used");
        }
        tracing::info!(
            folder = %folder.display(),
            tenants = outcome.directory.len(),
            "tenants loaded: clients authenticate as tenant identities"
        );
        if outcome.directory.is_empty() {
            tracing::warn!(folder = %folder.display(), "no tenant loaded yet: every authenticated client is refused until a tenant file is added");
        }
        Self {
            folder: folder.to_owned(),
            directory: ArcSwap::from_pointee(outcome.directory),
            authenticator: Authenticator::default(),
            counts: Mutex::new(HashMap::new()),
            tls13_only,
            tls_cache: Mutex::new(None),
            live: Mutex::new(LiveCredentials::default()),
            feeds: RwLock::new(HashMap::new()),
        }
    }

    /// The tenants in force.
    pub(crate) fn directory(&self) -> Arc<TenantDirectory> {
        self.directory.load_full()
    }

    /// Re-reads the folder if a file changed; returns the tenants that were removed and the
    /// connections whose credentials were revoked.
    pub(crate) fn reload_if_changed(&self) -> Reloaded {
        let before = self.directory.load_full();
        let Some(outcome) = before.reload_if_changed() else {
            return Reloaded::default();
        };
        let removed: Vec<String> = before
            .iter()
            .filter(|t| outcome.directory.get(t.id.as_str()).is_none())
            .map(|t| t.id.as_str().to_owned())
            .collect();
        for e in &outcome.errors {
            tracing::warn!(error = %e, "tenant file not used");
        }
        tracing::info!(
            folder = %self.folder.display(),
            tenants = outcome.directory.len(),
            "tenant folder changed: reloaded"
        );
        if !removed.is_empty() {
            tracing::warn!(tenants = ?removed, "tenants removed: their connections are closed");
        }
        let revoked = self.revoked_connections(&outcome.directory);
        self.directory.store(Arc::new(outcome.directory));
        Reloaded { removed, revoked }
    }

    /// Applies a page of `tenant`'s revocation feed; returns the live connections whose
    /// credentials it newly revokes (each logged) and how many identities the feed now
    /// refuses something of.
    pub(crate) fn apply_feed(
        &self,
        tenant: &str,
        changes: Vec<FeedChange>,
        now: i64,
    ) -> (Vec<ConnId>, usize) {
        let Ok(mut feeds) = self.feeds.write() else {
            return (Vec::new(), 0);
        };
        let feed = feeds.entry(tenant.to_owned()).or_default();
        let revoked: std::collections::HashSet<(beckon_identity::Role, String)> =
            feed.apply(changes).into_iter().collect();
        let known = feed.len();
        if revoked.is_empty() {
            return (Vec::new(), known);
        }
        let Ok(live) = self.live.lock() else {
            return (Vec::new(), known);
        };
        let mut closed = Vec::new();
        for credential in live.by_slot.values() {
            let identity = &credential.identity;
            let Some(conn) = credential.conn else {
                continue;
            };
            if identity.tenant.as_str() != tenant
                || !revoked.contains(&(identity.role, identity.id().to_owned()))
            {
                continue;
            }
            if let Some(c) = credential
                .presented()
                .find(|c| feed.revokes(identity.role, identity.id(), *c, now))
            {
                tracing::warn!(
                    tenant = %identity.tenant,
                    role = %identity.role,
                    id = identity.id(),
                    credential = %c,
                    "credential revoked by the console's revocation feed: closing the connection"
                );
                closed.push(conn);
            }
        }
        (closed, known)
    }

    /// The credential of `auth` that a revocation feed refuses, if any.
    fn refused_by_feed(
        feeds: &HashMap<String, FeedRevocations>,
        auth: &beckon_identity::Authenticated,
    ) -> Option<String> {
        let feed = feeds.get(auth.identity.tenant.as_str())?;
        let identity = &auth.identity;
        let now = unix_now();
        auth.certificate_serial
            .as_deref()
            .map(Credential::Certificate)
            .into_iter()
            .chain(auth.token_issued_at.map(Credential::Token))
            .find(|c| feed.revokes(identity.role, identity.id(), *c, now))
            .map(|c| c.to_string())
    }

    /// The live connections whose credentials `directory` revokes (each logged).
    fn revoked_connections(&self, directory: &TenantDirectory) -> Vec<ConnId> {
        let Ok(live) = self.live.lock() else {
            return Vec::new();
        };
        let mut closed = Vec::new();
        for credential in live.by_slot.values() {
            let Some(conn) = credential.conn else {
                continue;
            };
            let identity = &credential.identity;
            let Some(tenant) = directory.get(identity.tenant.as_str()) else {
                continue;
            };
            for c in credential.presented() {
                if tenant.revocation(identity.role, identity.id(), c).is_some() {
                    tracing::warn!(
                        tenant = %identity.tenant,
                        role = %identity.role,
                        id = identity.id(),
                        credential = %c,
                        "credential revoked: closing the connection"
                    );
                    closed.push(conn);
                    break;
                }
            }
        }
        closed
    }

    /// The TLS configuration for a new connection: `base` (certificate and the whole TLS
    /// policy, see [`beckon_pki::server_config_verifying`]) with a client-certificate verifier
    /// whose roots are the tenants' CAs (clients without a
    /// certificate are still accepted, they may show a token). Rebuilt when the certificate
    /// or the tenants change; `base` itself when no tenant has a CA.
    pub(crate) fn server_config(&self, base: Arc<ServerConfig>) -> Arc<ServerConfig> {
        let directory = self.directory();
        let Ok(mut cache) = self.tls_cache.lock() else {
            return base;
        };
        if let Some((b, d, built)) = cache.as_ref()
            && Arc::ptr_eq(b, &base)
            && Arc::ptr_eq(d, &directory)
        {
            return built.clone();
        }
        let built = match self.build(&base, &directory) {
            Ok(Some(c)) => Arc::new(c),
            Ok(None) => base.clone(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot use the tenants' CAs for client certificates; only tokens authenticate until this is fixed");
                base.clone()
            }
        };
        *cache = Some((base, directory, built.clone()));
        built
    }

    fn build(
        &self,
        base: &ServerConfig,
        directory: &TenantDirectory,
    ) -> Result<Option<ServerConfig>, String> {
        let mut roots = RootCertStore::empty();
        for der in directory.client_ca_certificates() {
            if let Err(e) = roots.add(CertificateDer::from(der.to_vec())) {
                tracing::warn!(error = %e, "a tenant CA certificate cannot be a TLS trust anchor; skipped");
            }
        }
        if roots.is_empty() {
            return Ok(None);
        }
        let min_version = if self.tls13_only {
            beckon_pki::TlsVersion::Tls13
        } else {
            beckon_pki::TlsVersion::Tls12
        };
        let config = beckon_pki::server_config_verifying(base, roots, min_version)
            .map_err(|e| e.to_string())?;
        Ok(Some(config))
    }

    /// Authenticates a CONNECT and takes a slot in its tenant's quota. On success the
    /// CONNECT's client id becomes the session key `tenant/role/id` (`tenant/role/id/doctor`
    /// for a probe, which also gets a clean start and no session to keep).
    pub(crate) fn admit(
        self: &Arc<Self>,
        connect: &mut Connect,
        leaf: Option<&[u8]>,
    ) -> Result<(Scope, TenantSlot), Refused> {
        let directory = self.directory();
        let credentials = Credentials {
            client_certificate: leaf,
            password: connect.password.as_deref(),
            client_id: &connect.client_id,
        };
        let auth = self
            .authenticator
            .authenticate(&directory, &credentials, unix_now())
            .map_err(|r| Refused {
                code: ReasonCode(r.reason_code()),
                why: r.to_string(),
            })?;
        // Held until the connection is listed as live: a feed page applied meanwhile then
        // finds it and closes it.
        let feeds = self.feeds.read().ok();
        if let Some(credential) = feeds
            .as_deref()
            .and_then(|f| Self::refused_by_feed(f, &auth))
        {
            let identity = &auth.identity;
            return Err(Refused {
                code: ReasonCode::NOT_AUTHORIZED,
                why: format!(
                    "{identity} (tenant {}, {} {}) is revoked: its {credential} is listed in the console's revocation feed; enroll the agent again to give it a new identity",
                    identity.tenant,
                    identity.role,
                    identity.id()
                ),
            });
        }
        let tenant_key = auth.identity.tenant.as_str().to_owned();
        let Some(tenant) = directory.get(&tenant_key) else {
            return Err(Refused {
                code: ReasonCode::NOT_AUTHORIZED,
                why: format!("tenant {tenant_key:?} was removed"),
            });
        };
        {
            let mut counts = self.counts.lock().map_err(|_| Refused {
                code: ReasonCode::SERVER_UNAVAILABLE,
                why: "internal state poisoned".into(),
            })?;
            let current = counts.get(&tenant_key).copied().unwrap_or(0);
            check_quota(tenant, current).map_err(|r| Refused {
                code: ReasonCode(r.reason_code()),
                why: r.to_string(),
            })?;
            *counts.entry(tenant_key.clone()).or_insert(0) += 1;
        }
        let slot = match self.live.lock() {
            Ok(mut live) => {
                live.next_slot += 1;
                let slot = live.next_slot;
                live.by_slot.insert(
                    slot,
                    LiveCredential {
                        identity: auth.identity.clone(),
                        certificate_serial: auth.certificate_serial.clone(),
                        token_issued_at: auth.token_issued_at,
                        conn: None,
                    },
                );
                slot
            }
            Err(_) => 0,
        };
        drop(feeds);
        connect.client_id = auth.identity.session_key();
        if auth.probe {
            // Beside the identity's own session, never in it, and nothing kept afterwards.
            connect.client_id = probe_client_id(&connect.client_id);
            connect.clean_start = true;
            connect.properties.session_expiry_interval = None;
        }
        let scope = Scope::Tenant {
            identity: Box::new(auth.identity),
            assigned: auth.client_id_assigned,
            probe: auth.probe,
        };
        let slot = TenantSlot {
            tenancy: self.clone(),
            tenant: tenant_key,
            slot,
        };
        Ok((scope, slot))
    }

    /// How often to poll the folder.
    pub(crate) fn poll_interval(secs: u64) -> Duration {
        Duration::from_secs(secs.max(1))
    }
}

/// Why a CONNECT was refused: the code for CONNACK (v3.1.1 clients get its return code) and
/// the sentence for the log and the v5 reason string.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) code: ReasonCode,
    pub(crate) why: String,
}

/// One connection's place in its tenant's quota; released when dropped.
#[derive(Debug)]
pub(crate) struct TenantSlot {
    tenancy: Arc<Tenancy>,
    tenant: String,
    /// Key of this connection's credentials in [`Tenancy::live`].
    slot: u64,
}

impl TenantSlot {
    /// Tells the tenancy which connection holds this slot, so that revoking its credentials
    /// can close it.
    pub(crate) fn attach(&self, conn: ConnId) {
        if let Ok(mut live) = self.tenancy.live.lock()
            && let Some(c) = live.by_slot.get_mut(&self.slot)
        {
            c.conn = Some(conn);
        }
    }
}

impl Drop for TenantSlot {
    fn drop(&mut self) {
        if let Ok(mut live) = self.tenancy.live.lock() {
            live.by_slot.remove(&self.slot);
        }
        if let Ok(mut counts) = self.tenancy.counts.lock()
            && let Some(n) = counts.get_mut(&self.tenant)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}

/// Whose topics a connection uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Topics as they are (no tenants configured: conformance and legacy certificates).
    Plain,
    /// An anonymous client beside tenants: its topics live under `anon/`.
    Anonymous,
    /// A tenant identity: its topics live under `t/{tenant}/`.
    Tenant {
        /// Who.
        identity: Box<Identity>,
        /// Whether the client sent an empty client id (v5 clients are told the id).
        assigned: bool,
        /// A doctor probe (client id `<id>/doctor`): connect and ping only.
        probe: bool,
    },
}

/// What to do with a packet read from the client.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// Hand it (mapped) to the core.
    Forward(Packet),
    /// Answer the client directly (a refusal); the core never sees the packet.
    Reply(Packet),
    /// Drop it (a QoS 0 publish that is not allowed).
    Drop,
}

/// Which acknowledgement a splice belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckKind {
    Sub,
    Unsub,
}

/// Refusals to put back into one SUBACK/UNSUBACK: (kind, packet id, (index, code)...).
type Splice = (AckKind, u16, Vec<(usize, ReasonCode)>);

/// The topic mapping of one connection, with the refusals to put back into the core's
/// SUBACK/UNSUBACK when only part of a SUBSCRIBE was allowed.
#[derive(Debug)]
pub(crate) struct TopicMap {
    pub(crate) scope: Scope,
    splices: Vec<Splice>,
}

impl TopicMap {
    pub(crate) fn new(scope: Scope) -> Self {
        Self {
            scope,
            splices: Vec::new(),
        }
    }

    /// The identity, if a tenant's.
    pub(crate) fn identity(&self) -> Option<&Identity> {
        match &self.scope {
            Scope::Tenant { identity, .. } => Some(identity),
            _ => None,
        }
    }

    /// True for a doctor probe, which the core must not announce (no presence event).
    pub(crate) fn is_probe(&self) -> bool {
        matches!(self.scope, Scope::Tenant { probe: true, .. })
    }

    fn to_internal(&self, access: Access, topic: &str) -> Result<Option<String>, AclDenied> {
        match &self.scope {
            Scope::Plain => Ok(None),
            Scope::Tenant {
                identity,
                probe: true,
                ..
            } => Err(AclDenied::NotPermitted {
                identity: (**identity).clone(),
                access,
                topic: topic.chars().take(200).collect(),
                rule: "a doctor probe (client id <id>/doctor) may only connect and ping",
            }),
            Scope::Anonymous => acl::anonymous_to_internal(access, topic).map(Some),
            Scope::Tenant { identity, .. } => acl::to_internal(identity, access, topic).map(Some),
        }
    }

    /// Maps a will topic; `Err` refuses the CONNECT.
    pub(crate) fn map_will(&self, connect: &mut Connect) -> Result<(), AclDenied> {
        if let Some(will) = connect.will.as_mut()
            && let Some(mapped) = self.to_internal(Access::Publish, &will.topic)?
        {
            will.topic = mapped;
        }
        Ok(())
    }

    /// Maps a packet from the client into the internal namespace, or refuses it.
    pub(crate) fn inbound(&mut self, packet: Packet) -> Inbound {
        if self.scope == Scope::Plain {
            return Inbound::Forward(packet);
        }
        match packet {
            // An empty topic stands for a topic alias the core resolves: the alias was set by
            // an earlier, mapped, PUBLISH.
            Packet::Publish(mut p) if !p.topic.is_empty() => {
                match self.to_internal(Access::Publish, &p.topic) {
                    Ok(Some(t)) => {
                        p.topic = t;
                        Inbound::Forward(Packet::Publish(p))
                    }
                    Ok(None) => Inbound::Forward(Packet::Publish(p)),
                    Err(denied) => {
                        tracing::info!(reason = %denied, "publish refused");
                        let code = ReasonCode(denied.reason_code());
                        let ack = |packet_id| Ack {
                            packet_id,
                            code,
                            properties: Properties::default(),
                        };
                        match (p.qos as u8, p.packet_id) {
                            (1, Some(id)) => Inbound::Reply(Packet::PubAck(ack(id))),
                            (2, Some(id)) => Inbound::Reply(Packet::PubRec(ack(id))),
                            _ => Inbound::Drop,
                        }
                    }
                }
            }
            Packet::Subscribe(mut s) => {
                let all = std::mem::take(&mut s.subscriptions);
                match self.map_filters(AckKind::Sub, s.packet_id, all, |sub| &mut sub.filter) {
                    Ok(kept) => {
                        s.subscriptions = kept;
                        Inbound::Forward(Packet::Subscribe(s))
                    }
                    Err(codes) => Inbound::Reply(Packet::SubAck(SubAck {
                        packet_id: s.packet_id,
                        codes,
                        properties: Properties::default(),
                    })),
                }
            }
            Packet::Unsubscribe(mut u) => {
                let all = std::mem::take(&mut u.filters);
                match self.map_filters(AckKind::Unsub, u.packet_id, all, |filter| filter) {
                    Ok(kept) => {
                        u.filters = kept;
                        Inbound::Forward(Packet::Unsubscribe(u))
                    }
                    Err(codes) => Inbound::Reply(Packet::UnsubAck(UnsubAck {
                        packet_id: u.packet_id,
                        codes,
                        properties: Properties::default(),
                    })),
                }
            }
            other => Inbound::Forward(other),
        }
    }

    /// Maps the filters of a SUBSCRIBE or UNSUBSCRIBE (`filter_of` finds an item's filter)
    /// into the internal namespace and returns the allowed items, mapped. The refused ones are
    /// left out and noted, with their positions, to be spliced into the core's SUBACK or
    /// UNSUBACK (`kind`); when every one was refused, their reason codes come back instead,
    /// for the acknowledgement the client gets at once.
    fn map_filters<T>(
        &mut self,
        kind: AckKind,
        packet_id: u16,
        items: Vec<T>,
        filter_of: fn(&mut T) -> &mut String,
    ) -> Result<Vec<T>, Vec<ReasonCode>> {
        let mut denied = Vec::new();
        let mut kept = Vec::with_capacity(items.len());
        for (i, mut item) in items.into_iter().enumerate() {
            let filter = filter_of(&mut item);
            match self.to_internal(Access::Subscribe, filter) {
                Ok(mapped) => {
                    if let Some(f) = mapped {
                        *filter = f;
                    }
                    kept.push(item);
                }
                Err(d) => {
                    tracing::info!(reason = %d, ?kind, "topic filter refused");
                    denied.push((i, ReasonCode(d.reason_code())));
                }
            }
        }
        if kept.is_empty() {
            return Err(denied.into_iter().map(|(_, code)| code).collect());
        }
        if !denied.is_empty() {
            self.splices.push((kind, packet_id, denied));
        }
        Ok(kept)
    }

    /// Maps a packet for the client back into its view. Returns `false` when it must not be
    /// sent (a topic outside the client's namespace; the core never routes one there).
    pub(crate) fn outbound(&mut self, packet: &mut Packet) -> bool {
        match (&self.scope, packet) {
            (Scope::Plain, _) => true,
            (scope, Packet::Publish(p)) if !p.topic.is_empty() => {
                let external = match scope {
                    Scope::Tenant { identity, .. } => {
                        acl::tenant_relative(&identity.tenant, &p.topic)
                    }
                    _ => acl::anonymous_to_external(&p.topic),
                };
                match external.map(|rest| p.topic.len() - rest.len()) {
                    Some(prefix) => {
                        // The client's topic is a suffix of the internal one: cut the prefix
                        // in place (one allocation less for every message delivered).
                        p.topic.drain(..prefix);
                        true
                    }
                    None => {
                        tracing::warn!(topic = %p.topic, "a message outside the client's namespace was not delivered");
                        false
                    }
                }
            }
            (_, Packet::SubAck(ack)) => {
                self.splice(AckKind::Sub, ack.packet_id, &mut ack.codes);
                true
            }
            (_, Packet::UnsubAck(ack)) => {
                self.splice(AckKind::Unsub, ack.packet_id, &mut ack.codes);
                true
            }
            (
                Scope::Tenant {
                    identity, assigned, ..
                },
                Packet::ConnAck(ack),
            ) => {
                if *assigned && !ack.code.is_error() {
                    ack.properties.assigned_client_identifier = Some(identity.id().to_owned());
                }
                true
            }
            _ => true,
        }
    }

    fn splice(&mut self, kind: AckKind, packet_id: u16, codes: &mut Vec<ReasonCode>) {
        let Some(pos) = self
            .splices
            .iter()
            .position(|(k, id, _)| *k == kind && *id == packet_id)
        else {
            return;
        };
        let (_, _, denied) = self.splices.swap_remove(pos);
        // v3.1.1 UNSUBACK has no codes: nothing to splice into.
        if kind == AckKind::Unsub && codes.is_empty() {
            return;
        }
        for (i, code) in denied {
            let at = i.min(codes.len());
            codes.insert(at, code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beckon_identity::{Role, TenantId};
    use beckon_mqtt::{QoS, Subscribe, Subscription, SubscriptionOptions};
    use rustls::pki_types::pem::PemObject;

    fn agent(id: &str) -> TopicMap {
        TopicMap::new(Scope::Tenant {
            identity: Box::new(
                Identity::new(TenantId::new("acme").expect("tenant"), Role::Agent, id)
                    .expect("identity"),
            ),
            assigned: false,
            probe: false,
        })
    }

    fn sub(filter: &str) -> Subscription {
        Subscription {
            filter: filter.into(),
            options: SubscriptionOptions::default(),
        }
    }

    /// A base TLS configuration as the broker builds it, and a tenant folder with one tenant
    /// whose CA verifies client certificates.
    fn base_and_tenancy(
        dir: &Path,
    ) -> (Arc<ServerConfig>, Tenancy, beckon_pki::CertificateAuthority) {
        let day = Duration::from_secs(86_400);
        let ca = beckon_pki::CertificateAuthority::generate("broker CA", day).expect("CA");
        let cert = dir.join("server.pem");
        let key = dir.join("server.key");
        ca.issue_server(&["localhost".to_owned()], day)
            .expect("server certificate")
            .save(&cert, &key)
            .expect("save");
        let files = beckon_pki::TlsFiles {
            cert,
            key,
            client_ca: None,
        };
        let options = beckon_pki::ServerTlsOptions {
            alpn: vec![b"mqtt".to_vec()],
            ..Default::default()
        };
        let base = Arc::new(beckon_pki::server_config(&files, &options).expect("base config"));
        let tenants = dir.join("tenants");
        std::fs::create_dir_all(&tenants).expect("tenants folder");
        let tenant_ca =
            beckon_pki::CertificateAuthority::generate("acme agents CA", day).expect("tenant CA");
        std::fs::write(tenants.join("acme-ca.pem"), tenant_ca.cert_pem()).expect("write CA");
        std::fs::write(
            tenants.join("acme.toml"),
            "name = \"acme\"\n[[ca]]\nfile = \"acme-ca.pem\"\n",
        )
        .expect("write tenant");
        (base, Tenancy::load(&tenants, false), ca)
    }

    #[test]
    fn the_tenant_tls_configuration_keeps_the_base_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, tenancy, _) = base_and_tenancy(dir.path());
        let tenant = tenancy.server_config(base.clone());
        assert!(
            !Arc::ptr_eq(&tenant, &base),
            "the tenants' CAs need a configuration of their own"
        );
        let suites = |c: &ServerConfig| -> Vec<rustls::CipherSuite> {
            c.crypto_provider()
                .cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect()
        };
        assert_eq!(suites(&tenant), suites(&base));
        assert_eq!(tenant.ignore_client_order, base.ignore_client_order);
        assert!(
            tenant.enable_secret_extraction,
            "idle tenant connections take the lean record path"
        );
        assert_eq!(tenant.send_tls13_tickets, base.send_tls13_tickets);
        assert_eq!(tenant.alpn_protocols, base.alpn_protocols);
        assert!(Arc::ptr_eq(&tenant.ticketer, &base.ticketer));
    }

    #[tokio::test]
    async fn a_tenant_connection_ends_on_the_brokers_own_record_layer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, tenancy, ca) = base_and_tenancy(dir.path());
        let config = tenancy.server_config(base);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            crate::tls_stream::accept(config, tcp).await
        });
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("CA der"))
            .expect("root");
        let client = beckon_pki::client_config(
            beckon_pki::ServerVerification::Roots(roots),
            None,
            &beckon_pki::ClientTlsOptions {
                min_version: beckon_pki::TlsVersion::Tls13,
                ..Default::default()
            },
        )
        .expect("client config");
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let wait = Duration::from_secs(10);
        let _client = tokio::time::timeout(
            wait,
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp),
        )
        .await
        .expect("handshake in time")
        .expect("handshake");
        let accepted = tokio::time::timeout(wait, server)
            .await
            .expect("server in time")
            .expect("task")
            .expect("accepted");
        assert!(accepted.stream.on_own_records());
    }

    #[test]
    fn a_partly_refused_subscribe_gets_its_codes_back_in_order() {
        let mut map = agent("pc-1");
        let packet = Packet::Subscribe(Subscribe {
            packet_id: 7,
            subscriptions: vec![sub("agents/pc-2/wake"), sub("agents/pc-1/wake"), sub("#")],
            properties: Properties::default(),
        });
        let Inbound::Forward(Packet::Subscribe(s)) = map.inbound(packet) else {
            panic!("the allowed filter is forwarded");
        };
        assert_eq!(s.subscriptions.len(), 1);
        assert_eq!(s.subscriptions[0].filter, "t/acme/agents/pc-1/wake");
        let mut ack = Packet::SubAck(SubAck {
            packet_id: 7,
            codes: vec![ReasonCode(1)],
            properties: Properties::default(),
        });
        assert!(map.outbound(&mut ack));
        let Packet::SubAck(ack) = ack else { panic!() };
        assert_eq!(
            ack.codes,
            vec![
                ReasonCode::NOT_AUTHORIZED,
                ReasonCode(1),
                ReasonCode::NOT_AUTHORIZED
            ]
        );
    }

    #[test]
    fn a_doctor_probe_may_neither_subscribe_nor_publish_nor_leave_a_will() {
        let mut map = agent("pc-1");
        map.scope = match map.scope {
            Scope::Tenant { identity, .. } => Scope::Tenant {
                identity,
                assigned: false,
                probe: true,
            },
            other => other,
        };
        assert!(map.is_probe());
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![sub("agents/pc-1/wake")],
            properties: Properties::default(),
        });
        let Inbound::Reply(Packet::SubAck(ack)) = map.inbound(subscribe) else {
            panic!("the subscription must be refused")
        };
        assert_eq!(ack.codes, vec![ReasonCode::NOT_AUTHORIZED]);
        let publish = Packet::Publish(beckon_mqtt::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "agents/pc-1/ack".into(),
            packet_id: Some(2),
            payload: bytes::Bytes::new(),
            properties: Properties::default(),
        });
        assert!(matches!(
            map.inbound(publish),
            Inbound::Reply(Packet::PubAck(a)) if a.code == ReasonCode::NOT_AUTHORIZED
        ));
        let mut connect = Connect::new(beckon_mqtt::ProtocolVersion::V5, "pc-1/doctor", 30);
        connect.will = Some(beckon_mqtt::Will {
            topic: "agents/pc-1/ack".into(),
            payload: bytes::Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        });
        assert!(map.map_will(&mut connect).is_err());
    }

    #[test]
    fn a_refused_qos1_publish_is_answered_0x87_and_qos0_is_dropped() {
        let mut map = agent("pc-1");
        let publish = |qos, packet_id| {
            Packet::Publish(beckon_mqtt::Publish {
                dup: false,
                qos,
                retain: false,
                topic: "agents/pc-2/ack".into(),
                packet_id,
                payload: bytes::Bytes::new(),
                properties: Properties::default(),
            })
        };
        match map.inbound(publish(QoS::AtLeastOnce, Some(3))) {
            Inbound::Reply(Packet::PubAck(a)) => {
                assert_eq!((a.packet_id, a.code), (3, ReasonCode::NOT_AUTHORIZED));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            map.inbound(publish(QoS::AtMostOnce, None)),
            Inbound::Drop
        ));
    }

    #[test]
    fn delivered_topics_lose_their_tenant_prefix() {
        let mut map = agent("pc-1");
        let mut p = Packet::Publish(beckon_mqtt::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "t/acme/agents/pc-1/wake".into(),
            packet_id: Some(1),
            payload: bytes::Bytes::new(),
            properties: Properties::default(),
        });
        assert!(map.outbound(&mut p));
        let Packet::Publish(p) = p else { panic!() };
        assert_eq!(p.topic, "agents/pc-1/wake");
    }
}
