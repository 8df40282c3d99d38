//! Delayed messages held in memory until their eta, then moved to their canonical queue.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use troupe_core::{App, Delivery, Encoder as _, Message, MsgPackEncoder, now_ms, queue::q_name};

/// A delayed delivery waiting for its eta. A worker may hold thousands (its delay prefetch per
/// queue), so the message is kept packed (MessagePack): its bytes rather than a tree of maps,
/// strings and values, about a third of the memory.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) delivery: Delivery,
    message: Packed,
    pub(crate) permit: OwnedSemaphorePermit,
}

#[derive(Debug)]
enum Packed {
    Bytes(Box<[u8]>),
    /// Kept as it is when it cannot be packed (it always can: it was decoded).
    Message(Box<Message>),
}

impl Held {
    pub(crate) fn new(delivery: Delivery, message: Message, permit: OwnedSemaphorePermit) -> Self {
        let message = match MsgPackEncoder.encode(&message) {
            Ok(bytes) => Packed::Bytes(bytes.into_boxed_slice()),
            Err(_) => Packed::Message(Box::new(message)),
        };
        Self {
            delivery,
            message,
            permit,
        }
    }

    /// The message, unpacked.
    pub(crate) fn message(&self) -> troupe_core::Result<Message> {
        match &self.message {
            Packed::Bytes(bytes) => MsgPackEncoder.decode(bytes),
            Packed::Message(message) => Ok((**message).clone()),
        }
    }
}

/// Deliveries waiting for their eta, soonest first.
#[derive(Debug, Default)]
pub(crate) struct DelayHolder {
    inner: Mutex<Inner>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    order: BTreeMap<(u64, u64), ()>,
    items: HashMap<u64, Held>,
    seq: u64,
}

impl DelayHolder {
    /// The held deliveries, even after a thread panicked while holding them: every operation
    /// leaves them whole, so a poisoned lock must not drop deliveries.
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn hold(&self, eta: u64, held: Held) {
        {
            let mut inner = self.inner();
            inner.seq += 1;
            let seq = inner.seq;
            inner.order.insert((eta, seq), ());
            inner.items.insert(seq, held);
        }
        self.changed.notify_one();
    }

    fn next_eta(&self) -> Option<u64> {
        self.inner().order.keys().next().map(|(eta, _)| *eta)
    }

    fn take_due(&self, now: u64) -> Vec<(u64, Held)> {
        let mut inner = self.inner();
        let due: Vec<(u64, u64)> = inner.order.range(..=(now, u64::MAX)).map(|(k, ())| *k).collect();
        due.into_iter()
            .filter_map(|key| {
                inner.order.remove(&key);
                inner.items.remove(&key.1).map(|h| (key.0, h))
            })
            .collect()
    }

    pub(crate) fn drain(&self) -> Vec<Held> {
        let mut inner = self.inner();
        inner.order.clear();
        inner.items.drain().map(|(_, h)| h).collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.inner().items.len()
    }

    /// Moves due messages to their canonical queue (then acks the held delivery) until `stop`.
    /// Each ack runs on its own task in `settles` (which shutdown waits for): an ack that hangs
    /// on a connection dying under it must not stop the moves of every other held message.
    pub(crate) async fn run_mover(&self, app: &App, stop: &CancellationToken, settles: &TaskTracker) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = now_ms();
            for (eta, held) in self.take_due(now) {
                let mut message = match held.message() {
                    Ok(message) => message,
                    Err(e) => {
                        // Packed from a decoded message, so this cannot happen; if it did, the
                        // delivery goes back to the delay queue rather than being lost.
                        tracing::error!(error = %e, "could not unpack a held delayed message; returning it to its queue");
                        let Held { delivery, permit, .. } = held;
                        let _ = delivery.requeue().await;
                        drop(permit);
                        continue;
                    }
                };
                let Held { delivery, permit, .. } = held;
                message.queue_name = q_name(&message.queue_name).to_owned();
                message.clear_eta();
                match app.enqueue(message.clone(), None).await {
                    Ok(_) => {
                        let message_id = message.message_id;
                        settles.spawn(async move {
                            if let Err(e) = delivery.ack().await {
                                tracing::warn!(%message_id, error = %e, "could not ack a delayed message after moving it; it may run twice");
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(message_id = %message.message_id, error = %e, "could not move a due delayed message to its queue; trying again in 1 s");
                        let retry_at = now_ms().saturating_add(1000).max(eta);
                        self.hold(retry_at, Held::new(delivery, message, permit));
                    }
                }
            }
            let wait = self.next_eta().map_or(Duration::from_secs(3600), |eta| {
                Duration::from_millis(eta.saturating_sub(now_ms()))
            });
            tokio::select! {
                () = stop.cancelled() => return,
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::work::tests::delivery;

    fn held(id: &str) -> Held {
        let (delivery, message, permit) = delivery(id);
        Held::new(delivery, message, permit)
    }

    /// An ack handle whose ack never returns (a connection dying under it).
    #[derive(Debug)]
    struct HungAck;

    #[troupe_core::async_trait]
    impl troupe_core::AckHandle for HungAck {
        async fn ack(&self) -> troupe_core::Result<()> {
            std::future::pending().await
        }
        async fn nack(&self, _message: Option<&Message>, _reason: &str) -> troupe_core::Result<()> {
            std::future::pending().await
        }
        async fn requeue(&self) -> troupe_core::Result<()> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_hung_ack_does_not_hold_up_the_other_moves() {
        let broker = Arc::new(troupe_core::MemoryBroker::new());
        let app = App::builder(broker.clone()).build().unwrap();
        let holder = Arc::new(DelayHolder::default());
        let (_, message, permit) = delivery("hung");
        let hung = troupe_core::Delivery::new("q.DQ", Ok(message.clone()), false, Box::new(HungAck));
        holder.hold(1, Held::new(hung, message, permit));
        holder.hold(2, held("next"));
        let (stop, settles) = (CancellationToken::new(), TaskTracker::new());
        let mover = tokio::spawn({
            let (holder, stop, settles) = (Arc::clone(&holder), stop.clone(), settles.clone());
            async move { holder.run_mover(&app, &stop, &settles).await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut ready = 0;
        while ready < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            ready = troupe_core::Broker::stats(broker.as_ref(), "q").await.unwrap().ready;
        }
        assert_eq!(
            ready, 2,
            "both held messages are moved, the second despite the first's hung ack"
        );
        assert_eq!(holder.len(), 0);
        stop.cancel();
        mover.await.unwrap();
        assert_eq!(settles.len(), 1, "only the hung ack is still running");
    }

    #[test]
    fn a_poisoned_lock_drops_no_delivery() {
        let holder = Arc::new(DelayHolder::default());
        holder.hold(10, held("before"));
        let poisoner = Arc::clone(&holder);
        let panicked = std::thread::spawn(move || {
            let _inner = poisoner.inner.lock();
            panic!("poisoning the delay holder on purpose");
        })
        .join();
        assert!(panicked.is_err() && holder.inner.is_poisoned());
        holder.hold(20, held("after"));
        assert_eq!(holder.len(), 2);
        assert_eq!(holder.next_eta(), Some(10));
        let due: Vec<String> = holder
            .take_due(15)
            .into_iter()
            .map(|(_, h)| h.message().unwrap().message_id)
            .collect();
        assert_eq!(due, ["before"]);
        holder.hold(30, held("drained"));
        let mut left: Vec<String> = holder
            .drain()
            .into_iter()
            .map(|h| h.message().unwrap().message_id)
            .collect();
        left.sort();
        assert_eq!(left, ["after", "drained"]);
    }
}
