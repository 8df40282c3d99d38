//! The shared work queue: prefetched messages waiting for an executor, lowest priority first
//! (the message's, else its actor's), FIFO within a priority.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, OwnedSemaphorePermit};
use troupe_core::Delivery;

/// A prefetched delivery and the prefetch slot it holds.
#[derive(Debug)]
pub(crate) struct WorkItem {
    pub(crate) priority: i32,
    pub(crate) seq: u64,
    pub(crate) delivery: Delivery,
    pub(crate) permit: OwnedSemaphorePermit,
}

impl PartialEq for WorkItem {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for WorkItem {}

impl PartialOrd for WorkItem {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for WorkItem {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: the "greatest" item is the lowest priority, then oldest.
        other
            .priority
            .cmp(&self.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

#[derive(Debug, Default)]
pub(crate) struct WorkQueue {
    items: Mutex<BinaryHeap<WorkItem>>,
    available: Notify,
}

impl WorkQueue {
    /// The items, even after a thread panicked while holding them: every operation leaves the
    /// heap whole, so a poisoned lock must not drop deliveries.
    fn items(&self) -> MutexGuard<'_, BinaryHeap<WorkItem>> {
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn push(&self, item: WorkItem) {
        self.items().push(item);
        self.available.notify_one();
    }

    pub(crate) async fn pop(&self) -> WorkItem {
        loop {
            let notified = self.available.notified();
            let item = self.items().pop();
            if let Some(item) = item {
                return item;
            }
            notified.await;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items().len()
    }

    pub(crate) fn drain(&self) -> Vec<WorkItem> {
        std::mem::take(&mut *self.items()).into_sorted_vec()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use tokio::sync::Semaphore;
    use troupe_core::{AckHandle, Delivery, Message, Result, async_trait};

    use super::*;

    #[derive(Debug)]
    struct NoAck;

    #[async_trait]
    impl AckHandle for NoAck {
        async fn ack(&self) -> Result<()> {
            Ok(())
        }
        async fn nack(&self, _message: Option<&Message>, _reason: &str) -> Result<()> {
            Ok(())
        }
        async fn requeue(&self) -> Result<()> {
            Ok(())
        }
    }

    /// A delivery of a message with this id, and a prefetch permit.
    pub(crate) fn delivery(id: &str) -> (Delivery, Message, OwnedSemaphorePermit) {
        let mut message = Message::new("q", "a", Vec::new(), serde_json::Map::new());
        id.clone_into(&mut message.message_id);
        let delivery = Delivery::new("q", Ok(message.clone()), false, Box::new(NoAck));
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        (delivery, message, permit)
    }

    fn item(id: &str, seq: u64) -> WorkItem {
        let (delivery, _, permit) = delivery(id);
        WorkItem {
            priority: 0,
            seq,
            delivery,
            permit,
        }
    }

    fn id(item: &WorkItem) -> String {
        item.delivery.message().unwrap().message_id.clone()
    }

    #[tokio::test]
    async fn a_poisoned_lock_drops_no_delivery() {
        let queue = Arc::new(WorkQueue::default());
        queue.push(item("before", 1));
        let holder = Arc::clone(&queue);
        let panicked = std::thread::spawn(move || {
            let _items = holder.items.lock();
            panic!("poisoning the work queue on purpose");
        })
        .join();
        assert!(panicked.is_err() && queue.items.is_poisoned());
        queue.push(item("after", 2));
        assert_eq!(queue.len(), 2);
        assert_eq!(id(&queue.pop().await), "before");
        queue.push(item("drained", 3));
        let drained: Vec<String> = queue.drain().iter().map(id).collect();
        assert_eq!(drained.len(), 2);
        assert!(drained.contains(&"after".to_owned()) && drained.contains(&"drained".to_owned()));
    }
}
