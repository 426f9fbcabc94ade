//! The quotas that keep one client or tenant from exhausting the broker: topic filters per
//! session and retained messages per tenant. A refusal is counted (the `limits_reached`
//! metric, labelled with the configuration key) and logged, at most once per limit every
//! [`WARN_EVERY`], so that a flood of refusals cannot flood the log as well.

use std::time::{Duration, Instant};

use super::BrokerCore;
use super::retained::OverQuota;

/// Least time between two log lines about the same limit.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A quota of the core, named by its configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// `limits.max_subscriptions`.
    Subscriptions,
    /// `limits.max_retained_messages`.
    RetainedMessages,
    /// `limits.max_retained_bytes`.
    RetainedBytes,
}

impl Quota {
    /// Every quota, in the order of [`QuotaCounts`].
    pub const ALL: [Self; 3] = [
        Self::Subscriptions,
        Self::RetainedMessages,
        Self::RetainedBytes,
    ];

    /// The configuration key, also the metric's label.
    pub fn key(self) -> &'static str {
        match self {
            Self::Subscriptions => "max_subscriptions",
            Self::RetainedMessages => "max_retained_messages",
            Self::RetainedBytes => "max_retained_bytes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<OverQuota> for Quota {
    fn from(over: OverQuota) -> Self {
        match over {
            OverQuota::Messages => Self::RetainedMessages,
            OverQuota::Bytes => Self::RetainedBytes,
        }
    }
}

/// Refusals by quota since start, indexed like [`Quota::ALL`].
pub type QuotaCounts = [u64; 3];

/// When each quota was last logged.
#[derive(Debug, Default)]
pub(super) struct QuotaLog {
    last: [Option<Instant>; 3],
}

impl BrokerCore {
    /// Counts a refusal by `quota` of what `client_id` sent, and logs it unless the same
    /// quota was logged within [`WARN_EVERY`].
    pub(super) fn quota_reached(&mut self, now: Instant, quota: Quota, client_id: &str) {
        self.stats.quotas_reached[quota.index()] += 1;
        let last = &mut self.quota_log.last[quota.index()];
        if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            return;
        }
        *last = Some(now);
        let (limit, what) = match quota {
            Quota::Subscriptions => (
                self.config.max_subscriptions,
                "topic filters of one session; further filters refused (0x97, MQTT 3.1.1: 0x80)",
            ),
            Quota::RetainedMessages => (
                self.config.max_retained_messages,
                "retained messages of one tenant; the retained publish is refused",
            ),
            Quota::RetainedBytes => (
                self.config.max_retained_bytes,
                "bytes of retained messages of one tenant; the retained publish is refused",
            ),
        };
        tracing::warn!(
            client_id,
            key = %format_args!("limits.{}", quota.key()),
            limit,
            refused_total = self.stats.quotas_reached[quota.index()],
            "quota reached: {what} (further refusals within {WARN_EVERY:?} are only counted)"
        );
    }
}
