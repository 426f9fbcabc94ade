//! A server's limit of connections served at once: each connection holds a slot; at the
//! limit, the accept loop waits for a free one (new connections wait in the listen
//! backlog) and logs so, at most once a minute.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How often the limit is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Connection slots of one listener.
pub struct ConnectionSlots {
    slots: Arc<Semaphore>,
    max: usize,
    what: &'static str,
    warned: Option<Instant>,
}

impl ConnectionSlots {
    /// `max` slots for the listener named `what` in the log line.
    pub fn new(max: usize, what: &'static str) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            what,
            warned: None,
        }
    }

    /// A free slot, waiting for one at the limit (and logging that).
    pub async fn acquire(&mut self) -> OwnedSemaphorePermit {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return p;
        }
        if self.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            tracing::warn!(
                max_connections = self.max,
                "{} connection limit reached: new connections wait until others close (logged at most once a minute)",
                self.what
            );
            self.warned = Some(Instant::now());
        }
        match self.slots.clone().acquire_owned().await {
            Ok(p) => p,
            // Never closed: this value holds the semaphore.
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits (at most `limit`) until every connection gave its slot back.
    pub async fn drained(&self, limit: Duration) {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(limit, self.slots.acquire_many(all)).await;
    }
}
