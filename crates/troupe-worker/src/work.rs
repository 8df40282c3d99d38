//! The shared work queue: prefetched messages waiting for an executor, lowest actor priority
//! first, FIFO within a priority.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Mutex;

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
    pub(crate) fn push(&self, item: WorkItem) {
        if let Ok(mut items) = self.items.lock() {
            items.push(item);
        }
        self.available.notify_one();
    }

    pub(crate) async fn pop(&self) -> WorkItem {
        loop {
            let notified = self.available.notified();
            if let Some(item) = self.items.lock().ok().and_then(|mut i| i.pop()) {
                return item;
            }
            notified.await;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.items.lock().map(|i| i.len()).unwrap_or(0)
    }

    pub(crate) fn drain(&self) -> Vec<WorkItem> {
        self.items
            .lock()
            .map(|mut i| std::mem::take(&mut *i).into_sorted_vec())
            .unwrap_or_default()
    }
}
