//! Prometheus metrics, served in the text format on the admin listener (`/metrics`), with
//! `/healthz` beside it.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use beckon_mqtt::ReasonCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::core::{BrokerCore, Quota};

/// Labels of the connection gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConnLabels {
    /// `8883`, `443-mqtt`, `443-websocket`, `1883`.
    pub(crate) path: String,
    /// The tenant id, `anonymous`, or `-` without tenants.
    pub(crate) tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccessLabels {
    access: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

/// The limit, named by its key in `[limits]`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: String,
}

/// Every metric of the broker.
pub(crate) struct Metrics {
    registry: Registry,
    connections: Family<ConnLabels, Gauge>,
    connacks: Family<ReasonLabels, Counter>,
    denied: Family<AccessLabels, Counter>,
    limits_reached: Family<LimitLabels, Counter>,
    tls_handshake_failures: Counter,
    wakeups_delivered: Counter,
    messages_in: Counter,
    messages_out: Counter,
    messages_dropped: Counter,
    slow_consumer_dropped: Counter,
    sessions: Gauge,
    subscriptions: Gauge,
    retained: Gauge,
    queued: Gauge,
    inflight: Gauge,
    open_fds: Gauge,
    fd_limit: Gauge,
    feed_revocations: Family<TenantLabels, Gauge>,
    feed_failures: Family<TenantLabels, Counter>,
    feed_last_read: Family<TenantLabels, Gauge>,
    /// Last core counters seen, to turn them into increments.
    last_in: AtomicU64,
    last_out: AtomicU64,
    last_dropped: AtomicU64,
    last_quotas: [AtomicU64; 3],
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

/// A short name for a CONNACK code.
fn reason_name(code: ReasonCode) -> &'static str {
    match code.0 {
        0x00 => "accepted",
        0x84 => "unsupported_protocol_version",
        0x85 => "client_identifier_not_valid",
        0x86 => "bad_user_name_or_password",
        0x87 => "not_authorized",
        0x89 => "server_busy",
        0x97 => "quota_exceeded",
        0x9F => "connection_rate_exceeded",
        _ => "other",
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("beckon_broker");
        let m = Self {
            registry: Registry::default(),
            connections: Family::default(),
            connacks: Family::default(),
            denied: Family::default(),
            limits_reached: Family::default(),
            tls_handshake_failures: Counter::default(),
            wakeups_delivered: Counter::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            messages_dropped: Counter::default(),
            slow_consumer_dropped: Counter::default(),
            sessions: Gauge::default(),
            subscriptions: Gauge::default(),
            retained: Gauge::default(),
            queued: Gauge::default(),
            inflight: Gauge::default(),
            open_fds: Gauge::default(),
            fd_limit: Gauge::default(),
            feed_revocations: Family::default(),
            feed_failures: Family::default(),
            feed_last_read: Family::default(),
            last_in: AtomicU64::new(0),
            last_out: AtomicU64::new(0),
            last_dropped: AtomicU64::new(0),
            last_quotas: Default::default(),
        };
        // Shown at zero from the start: dashboards and rate() have a series before the first
        // refusal.
        for access in ["publish", "subscribe"] {
            let _ = m.denied.get_or_create(&AccessLabels {
                access: access.to_owned(),
            });
        }
        for key in Quota::ALL
            .iter()
            .map(|q| q.key())
            .chain(["max_packet_size", "max_outbound_packets"])
        {
            let _ = m.limit_counter(key);
        }
        registry.register(
            "connections",
            "Established MQTT connections by path and tenant",
            m.connections.clone(),
        );
        registry.register(
            "connects",
            "CONNECT outcomes by reason (accepted or the refusal)",
            m.connacks.clone(),
        );
        registry.register(
            "denied",
            "Publishes and subscriptions refused by the access rules",
            m.denied.clone(),
        );
        registry.register(
            "limits_reached",
            "Refusals and disconnects by a limit, labelled with its key in [limits]",
            m.limits_reached.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "wakeups_delivered",
            "Messages sent on agents/{id}/wake topics",
            m.wakeups_delivered.clone(),
        );
        registry.register(
            "messages_in",
            "PUBLISH packets accepted from clients",
            m.messages_in.clone(),
        );
        registry.register(
            "messages_out",
            "PUBLISH packets sent to clients",
            m.messages_out.clone(),
        );
        registry.register(
            "messages_dropped",
            "Deliveries dropped (queue full, too large, expired, offline QoS 0)",
            m.messages_dropped.clone(),
        );
        registry.register(
            "slow_consumer_dropped",
            "QoS 0 messages dropped because the client reads too slowly (its outbound queue is full)",
            m.slow_consumer_dropped.clone(),
        );
        registry.register(
            "sessions",
            "Sessions, online and offline",
            m.sessions.clone(),
        );
        registry.register("subscriptions", "Subscriptions", m.subscriptions.clone());
        registry.register("retained_messages", "Retained messages", m.retained.clone());
        registry.register(
            "queued_messages",
            "Messages waiting in session queues",
            m.queued.clone(),
        );
        registry.register(
            "inflight_messages",
            "QoS 1/2 messages sent and not yet acknowledged",
            m.inflight.clone(),
        );
        registry.register(
            "open_fds",
            "Open file descriptors of the process",
            m.open_fds.clone(),
        );
        registry.register(
            "fd_limit",
            "Soft limit of open file descriptors",
            m.fd_limit.clone(),
        );
        registry.register(
            "revocation_feed_revocations",
            "Identities the console's revocation feed refuses something of, by tenant",
            m.feed_revocations.clone(),
        );
        registry.register(
            "revocation_feed_failures",
            "Polls of the console's revocation feed that failed (the known revocations stay), by tenant",
            m.feed_failures.clone(),
        );
        registry.register(
            "revocation_feed_last_read_seconds",
            "Unix time of the last page read from the console's revocation feed, by tenant",
            m.feed_last_read.clone(),
        );
        Self { registry, ..m }
    }

    /// A page of `tenant`'s revocation feed was read; the feed now refuses something of
    /// `known` identities.
    pub(crate) fn revocation_feed_read(&self, tenant: &str, known: usize) {
        let labels = TenantLabels {
            tenant: tenant.to_owned(),
        };
        self.feed_revocations
            .get_or_create(&labels)
            .set(i64::try_from(known).unwrap_or(i64::MAX));
        self.feed_last_read
            .get_or_create(&labels)
            .set(crate::tenancy::unix_now());
    }

    /// A poll of `tenant`'s revocation feed failed.
    pub(crate) fn revocation_feed_failed(&self, tenant: &str) {
        self.feed_failures
            .get_or_create(&TenantLabels {
                tenant: tenant.to_owned(),
            })
            .inc();
    }

    /// A connection was established on `path` for `tenant`; the returned guard counts it
    /// until dropped.
    pub(crate) fn connection(&self, path: &str, tenant: &str) -> ConnectionGauge {
        let gauge = self
            .connections
            .get_or_create(&ConnLabels {
                path: path.to_owned(),
                tenant: tenant.to_owned(),
            })
            .clone();
        gauge.inc();
        ConnectionGauge(gauge)
    }

    /// A CONNACK with `code` was sent.
    pub(crate) fn connack(&self, code: ReasonCode) {
        self.connacks
            .get_or_create(&ReasonLabels {
                reason: reason_name(code).to_owned(),
            })
            .inc();
    }

    /// A CONNACK packet was sent (other packets are ignored).
    pub(crate) fn connack_packet(&self, packet: &beckon_mqtt::Packet) {
        if let beckon_mqtt::Packet::ConnAck(ack) = packet {
            self.connack(ack.code);
        }
    }

    /// A publish or subscription was refused.
    pub(crate) fn denied(&self, access: &'static str) {
        self.denied
            .get_or_create(&AccessLabels {
                access: access.to_owned(),
            })
            .inc();
    }

    /// Something was refused or a connection closed by the limit `key` of `[limits]`.
    pub(crate) fn limit_reached(&self, key: &'static str) {
        self.limit_counter(key).inc();
    }

    fn limit_counter(&self, key: &'static str) -> Counter {
        self.limits_reached
            .get_or_create(&LimitLabels {
                limit: key.to_owned(),
            })
            .clone()
    }

    pub(crate) fn tls_failure(&self) {
        self.tls_handshake_failures.inc();
    }

    /// A QoS 0 message was dropped: its client's outbound queue is full.
    pub(crate) fn slow_consumer_dropped(&self) {
        self.slow_consumer_dropped.inc();
    }

    pub(crate) fn wakeup_delivered(&self) {
        self.wakeups_delivered.inc();
    }

    /// Copies the core's counters and sizes (walks all sessions: call it seldom).
    pub(crate) fn sync_core(&self, core: &BrokerCore) {
        let stats = core.stats();
        let add = |counter: &Counter, last: &AtomicU64, now: u64| {
            let before = last.swap(now, Ordering::Relaxed);
            counter.inc_by(now.saturating_sub(before));
        };
        add(&self.messages_in, &self.last_in, stats.publishes_received);
        add(&self.messages_out, &self.last_out, stats.publishes_sent);
        add(
            &self.messages_dropped,
            &self.last_dropped,
            stats.dropped_queue_full
                + stats.dropped_too_large
                + stats.dropped_expired
                + stats.dropped_qos0_offline,
        );
        for ((quota, last), now) in Quota::ALL
            .iter()
            .zip(&self.last_quotas)
            .zip(stats.quotas_reached)
        {
            if now > last.load(Ordering::Relaxed) {
                add(&self.limit_counter(quota.key()), last, now);
            }
        }
        let set = |g: &Gauge, v: usize| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.sessions, core.session_count());
        set(&self.subscriptions, core.subscription_count());
        set(&self.retained, core.retained_count());
        set(&self.queued, core.queued_messages());
        set(&self.inflight, core.inflight_messages());
    }

    /// The text exposition.
    pub(crate) fn render(&self) -> String {
        if let Ok(n) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds
                .set(i64::try_from(n.count()).unwrap_or(i64::MAX));
        }
        if let Ok(l) = crate::fdlimit::read() {
            self.fd_limit.set(i64::try_from(l.soft).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Counts one established connection until dropped.
#[derive(Debug)]
pub(crate) struct ConnectionGauge(Gauge);

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}
