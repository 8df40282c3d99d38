//! The shared work queue: prefetched messages waiting for an executor, lowest priority first
//! (the message's, else its actor's); within a priority, fair between queues and FIFO within
//! each queue.
//!
//! Fairness is start-time fair queueing: each item gets a tag one past the larger of its
//! queue's last tag and the tag of the item an executor last took. A queue with a thousand
//! prefetched messages holds tags far ahead, so a message of a quiet queue, tagged just past
//! what runs now, is taken next instead of waiting behind the whole prefetched backlog; busy
//! queues take turns, one message each.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::{Notify, OwnedSemaphorePermit};
use troupe_core::Delivery;

/// A prefetched delivery and the prefetch slot it holds.
#[derive(Debug)]
pub(crate) struct WorkItem {
    pub(crate) priority: i32,
    /// Its fair-queueing tag, which [`WorkQueue::push`] sets.
    pub(crate) seq: u64,
    /// The order it arrived in, which [`WorkQueue::push`] sets: among equal tags, the older
    /// item first.
    pub(crate) arrival: u64,
    pub(crate) delivery: Delivery,
    pub(crate) permit: OwnedSemaphorePermit,
}

impl WorkItem {
    /// A delivery waiting at `priority`, holding its prefetch slot; [`WorkQueue::push`] tags it.
    pub(crate) fn new(priority: i32, delivery: Delivery, permit: OwnedSemaphorePermit) -> Self {
        Self {
            priority,
            seq: 0,
            arrival: 0,
            delivery,
            permit,
        }
    }
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
            .then_with(|| other.arrival.cmp(&self.arrival))
    }
}

#[derive(Debug, Default)]
pub(crate) struct WorkQueue {
    items: Mutex<Items>,
    available: Notify,
}

/// The heap and the fair-queueing clocks.
#[derive(Debug, Default)]
struct Items {
    heap: BinaryHeap<WorkItem>,
    /// The tag of the item an executor took last.
    now: u64,
    /// Each queue's last tag.
    last: HashMap<String, u64>,
    /// Items pushed so far.
    arrivals: u64,
}

impl WorkQueue {
    /// The items, even after a thread panicked while holding them: every operation leaves the
    /// heap whole, so a poisoned lock must not drop deliveries.
    fn items(&self) -> MutexGuard<'_, Items> {
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an item, tagged fairly against the other queues' (its `seq` and `arrival` are
    /// overwritten).
    pub(crate) fn push(&self, mut item: WorkItem) {
        let mut items = self.items();
        let now = items.now;
        let tag = match items.last.get_mut(item.delivery.queue()) {
            Some(last) => {
                *last = (*last).max(now) + 1;
                *last
            }
            None => {
                items.last.insert(item.delivery.queue().to_owned(), now + 1);
                now + 1
            }
        };
        item.seq = tag;
        items.arrivals += 1;
        item.arrival = items.arrivals;
        items.heap.push(item);
        drop(items);
        self.available.notify_one();
    }

    pub(crate) async fn pop(&self) -> WorkItem {
        loop {
            let notified = self.available.notified();
            let item = {
                let mut items = self.items();
                let item = items.heap.pop();
                if let Some(item) = &item {
                    items.now = items.now.max(item.seq);
                }
                item
            };
            if let Some(item) = item {
                return item;
            }
            notified.await;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items().heap.len()
    }

    pub(crate) fn drain(&self) -> Vec<WorkItem> {
        std::mem::take(&mut self.items().heap).into_sorted_vec()
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

    fn item(id: &str) -> WorkItem {
        item_of("q", id)
    }

    fn item_of(queue: &str, id: &str) -> WorkItem {
        let (_, message, permit) = delivery(id);
        WorkItem::new(0, Delivery::new(queue, Ok(message), false, Box::new(NoAck)), permit)
    }

    fn id(item: &WorkItem) -> String {
        item.delivery.message().unwrap().message_id.clone()
    }

    #[tokio::test]
    async fn a_poisoned_lock_drops_no_delivery() {
        let queue = Arc::new(WorkQueue::default());
        queue.push(item("before"));
        let holder = Arc::clone(&queue);
        let panicked = std::thread::spawn(move || {
            let _items = holder.items.lock();
            panic!("poisoning the work queue on purpose");
        })
        .join();
        assert!(panicked.is_err() && queue.items.is_poisoned());
        queue.push(item("after"));
        assert_eq!(queue.len(), 2);
        assert_eq!(id(&queue.pop().await), "before");
        queue.push(item("drained"));
        let drained: Vec<String> = queue.drain().iter().map(id).collect();
        assert_eq!(drained.len(), 2);
        assert!(drained.contains(&"after".to_owned()) && drained.contains(&"drained".to_owned()));
    }

    #[tokio::test]
    async fn a_quiet_queue_is_not_stuck_behind_a_busy_queues_backlog() {
        let queue = WorkQueue::default();
        for i in 0..1000 {
            queue.push(item_of("busy", &format!("busy-{i}")));
        }
        for _ in 0..10 {
            queue.pop().await;
        }
        queue.push(item_of("quiet", "quiet-0"));
        // Behind at most the one busy message that shares its tag.
        let next: Vec<String> = [queue.pop().await, queue.pop().await].iter().map(id).collect();
        assert!(next.contains(&"quiet-0".to_owned()), "{next:?}");
        // The busy queue's order holds.
        let mut rest = Vec::new();
        while queue.len() > 0 {
            rest.push(id(&queue.pop().await));
        }
        let busy: Vec<usize> = rest
            .iter()
            .filter_map(|id| id.strip_prefix("busy-")?.parse().ok())
            .collect();
        assert_eq!(busy.len(), 989);
        assert!(busy.windows(2).all(|w| w[0] < w[1]), "FIFO within a queue");
    }

    #[tokio::test]
    async fn busy_queues_take_turns_and_priority_comes_first() {
        let queue = WorkQueue::default();
        for i in 0..3 {
            queue.push(item_of("a", &format!("a-{i}")));
        }
        for i in 0..3 {
            queue.push(item_of("b", &format!("b-{i}")));
        }
        let mut urgent = item_of("c", "c-urgent");
        urgent.priority = -1;
        queue.push(urgent);
        let mut order = Vec::new();
        for _ in 0..7 {
            order.push(id(&queue.pop().await));
        }
        assert_eq!(order, ["c-urgent", "a-0", "b-0", "a-1", "b-1", "a-2", "b-2"]);
    }
}
