//! The queue of packets waiting to be written to one connection.
//!
//! The core task pushes without waiting (it must never block on one slow client); the
//! connection task takes everything queued at once, encodes and writes it. An idle outbox
//! holds no allocation: the queue is taken whole, so its buffer goes with it.
//!
//! Slow-consumer policy: the queue holds at most `limit` packets. When it is full, a QoS 0
//! PUBLISH is dropped (and counted); a QoS 1/2 PUBLISH means the client has stopped reading,
//! so the connection is aborted without a flush and the core treats it as a transport loss
//! (the will is published, the session is kept for its expiry and QoS 1/2 messages are
//! delivered again when the client comes back).
//!
//! Answers to the client's own packets (PUBACK, SUBACK, PINGRESP, ...) get a further
//! [`RESPONSE_ALLOWANCE`] above the limit: a publisher that pipelines thousands of QoS 1
//! messages receives as many acknowledgements at once, and is reading them. Their number is
//! bounded all the same: a connection that cannot write stops reading, so it forwards no
//! more packets to answer than the core's queue holds.

use std::collections::VecDeque;
use std::sync::Mutex;

use beckon_mqtt::{Packet, QoS};
use tokio::sync::Notify;

/// How far answers to the client's own packets may go beyond the queue limit: more than the
/// core's event queue holds, so that everything a pipelining client has sent can be answered.
pub(crate) const RESPONSE_ALLOWANCE: usize = 8192;

/// What the connection task should do after writing what is queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutboxState {
    /// Keep going.
    Open,
    /// Write what is queued, then close (the core sent `Action::Close`).
    Closing,
    /// Close at once without writing (slow consumer, or the server is gone).
    Aborted,
}

/// Result of [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued.
    Queued,
    /// The queue was full and the packet was a QoS 0 PUBLISH: dropped.
    Dropped,
    /// The queue was full: the connection was aborted as a slow consumer.
    Overflow,
    /// The connection is closing or gone; nothing was queued.
    Closed,
}

#[derive(Debug)]
struct Inner {
    queue: VecDeque<Packet>,
    state: OutboxState,
    dropped: u64,
}

/// One connection's outbound queue, shared by the core task and the connection task.
#[derive(Debug)]
pub(crate) struct Outbox {
    inner: Mutex<Inner>,
    limit: usize,
    notify: Notify,
}

impl Outbox {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                state: OutboxState::Open,
                dropped: 0,
            }),
            limit,
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queue inconsistent (push/take are
        // single operations), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a packet (see the module's slow-consumer policy).
    pub(crate) fn push(&self, packet: Packet) -> Pushed {
        let pushed = {
            let mut inner = self.lock();
            if inner.state != OutboxState::Open {
                return Pushed::Closed;
            }
            let publish = matches!(&packet, Packet::Publish(_));
            if inner.queue.len() < self.limit
                || (!publish && inner.queue.len() < self.limit + RESPONSE_ALLOWANCE)
            {
                inner.queue.push_back(packet);
                Pushed::Queued
            } else if matches!(&packet, Packet::Publish(p) if p.qos == QoS::AtMostOnce) {
                inner.dropped += 1;
                return Pushed::Dropped;
            } else {
                inner.state = OutboxState::Aborted;
                inner.queue = VecDeque::new();
                Pushed::Overflow
            }
        };
        self.notify.notify_one();
        pushed
    }

    /// Flush what is queued, then close.
    pub(crate) fn close(&self) {
        {
            let mut inner = self.lock();
            if inner.state == OutboxState::Open {
                inner.state = OutboxState::Closing;
            }
        }
        self.notify.notify_one();
    }

    /// Takes everything queued, the state, and the count of QoS 0 messages dropped since the
    /// last call.
    pub(crate) fn take(&self) -> (VecDeque<Packet>, OutboxState, u64) {
        let mut inner = self.lock();
        let dropped = std::mem::take(&mut inner.dropped);
        (std::mem::take(&mut inner.queue), inner.state, dropped)
    }

    /// The current state.
    pub(crate) fn state(&self) -> OutboxState {
        self.lock().state
    }

    /// Waits until something was pushed or the state changed.
    pub(crate) async fn changed(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beckon_mqtt::{Properties, Publish};

    fn publish(qos: QoS) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: "t".into(),
            packet_id: (qos != QoS::AtMostOnce).then_some(1),
            payload: bytes::Bytes::new(),
            properties: Properties::default(),
        })
    }

    #[test]
    fn full_queue_drops_qos0_and_aborts_on_qos1() {
        let outbox = Outbox::new(2);
        assert_eq!(outbox.push(Packet::PingResp), Pushed::Queued);
        assert_eq!(outbox.push(publish(QoS::AtMostOnce)), Pushed::Queued);
        assert_eq!(outbox.push(publish(QoS::AtMostOnce)), Pushed::Dropped);
        let (_, state, dropped) = outbox.take();
        assert_eq!((state, dropped), (OutboxState::Open, 1));
        outbox.push(Packet::PingResp);
        outbox.push(Packet::PingResp);
        assert_eq!(outbox.push(publish(QoS::AtLeastOnce)), Pushed::Overflow);
        assert_eq!(outbox.state(), OutboxState::Aborted);
        assert_eq!(outbox.push(Packet::PingResp), Pushed::Closed);
        assert!(outbox.take().0.is_empty());
    }

    #[test]
    fn acknowledgements_to_a_pipelining_client_go_beyond_the_limit_but_not_forever() {
        let outbox = Outbox::new(2);
        let ack = || Packet::PubAck(beckon_mqtt::Ack::new(1));
        for _ in 0..2 + RESPONSE_ALLOWANCE {
            assert_eq!(outbox.push(ack()), Pushed::Queued);
        }
        // Messages from the broker still see the limit.
        assert_eq!(outbox.push(publish(QoS::AtMostOnce)), Pushed::Dropped);
        assert_eq!(outbox.push(ack()), Pushed::Overflow);
        assert_eq!(outbox.state(), OutboxState::Aborted);
    }

    #[test]
    fn close_keeps_what_is_queued() {
        let outbox = Outbox::new(4);
        outbox.push(Packet::PingResp);
        outbox.close();
        let (queue, state, _) = outbox.take();
        assert_eq!(queue.len(), 1);
        assert_eq!(state, OutboxState::Closing);
    }
}
