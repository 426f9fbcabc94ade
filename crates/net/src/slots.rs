//! A server's limit of connections served at once: each connection holds a slot; at the
//! limit, the accept loop waits for a free one (new connections wait in the listen
//! backlog) and logs so, at most once a minute.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How often the limit is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
/// Says when a repeated warning is due: at most once per period (a flood of refusals
/// logs one line a minute, not one per connection).
pub struct LogEvery {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl LogEvery {
    /// At most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
        }
    }

    /// At most once a minute.
    pub fn minute() -> Self {
        Self::new(WARN_EVERY)
    }

    /// Whether to log now (and then not again for the period).
    pub fn due(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| t.elapsed() < self.every) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// Connection slots of one listener.
pub struct ConnectionSlots {
    slots: Arc<Semaphore>,
    max: usize,
    what: &'static str,
    warn: LogEvery,
}

impl ConnectionSlots {
    /// `max` slots for the listener named `what` in the log line.
    pub fn new(max: usize, what: &'static str) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            what,
            warn: LogEvery::minute(),
        }
    }

    /// A free slot, waiting for one at the limit (and logging that).
    pub async fn acquire(&self) -> OwnedSemaphorePermit {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return p;
        }
        if self.warn.due() {
            tracing::warn!(
                max_connections = self.max,
                "{} connection limit reached: new connections wait until others close (logged at most once a minute)",
                self.what
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_due_once_per_period() {
        let log = LogEvery::new(Duration::from_millis(200));
        assert!(log.due());
        assert!(!log.due());
        std::thread::sleep(Duration::from_millis(250));
        assert!(log.due());
    }
}
