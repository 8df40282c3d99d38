//! The consumer of a SQL broker: claims in batches, woken by its queue's waker and polling.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;
use troupe_core::support::{BatchedAck, poll_until};
use troupe_core::{Consumer, Delivery, Result, decode_delivery};

use crate::SqlBroker;
use crate::dialect::Dialect;
use crate::settings::SqlOptions;

pub(crate) struct SqlConsumer<D: Dialect> {
    broker: SqlBroker<D>,
    queue: String,
    owner: String,
    waker: Arc<Notify>,
    /// The last claim filled its batch: claim again without looking first.
    busy: AtomicBool,
    /// When the look-first query (and the release of due delayed rows) last ran.
    last_look: Mutex<Option<Instant>>,
}

impl<D: Dialect> std::fmt::Debug for SqlConsumer<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlConsumer")
            .field("backend", &D::BACKEND)
            .field("queue", &self.queue)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl<D: Dialect> SqlConsumer<D> {
    pub(crate) fn new(broker: SqlBroker<D>, queue: &str, owner: String) -> Self {
        let waker = broker.shared.wake.wakers.get(queue);
        Self {
            broker,
            queue: queue.to_owned(),
            owner,
            waker,
            busy: AtomicBool::new(false),
            last_look: Mutex::new(None),
        }
    }

    /// One claim of at most `max` deliveries. The look-first query, and the release of due
    /// delayed rows, run once per poll interval, and (where the dialect asks) whenever the
    /// last claim came back short, so idle consumers only read.
    async fn claim(&self, max: usize) -> Result<Vec<Delivery>> {
        let shared = &self.broker.shared;
        let dialect = &shared.dialect;
        let poll = shared.options.common().poll_interval;
        let due_look = self
            .last_look
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none_or(|at| at.elapsed() >= poll);
        if due_look || (D::LOOK_WHEN_IDLE && !self.busy.load(Ordering::Relaxed)) {
            let (ready, due) = dialect.look(&self.queue).await?;
            *self.last_look.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            if due {
                dialect.release_due(&self.queue).await?;
            }
            if !ready && !due {
                self.busy.store(false, Ordering::Relaxed);
                return Ok(Vec::new());
            }
        }
        let common = shared.options.common();
        let mut claimed = dialect.claim(&self.queue, &self.owner, common.lease, max).await?;
        claimed.sort_by_key(|c| (c.priority, c.id));
        self.busy.store(claimed.len() == max, Ordering::Relaxed);
        let encoder = &self.broker.encoder;
        Ok(claimed
            .into_iter()
            .map(|c| {
                let message = decode_delivery(encoder.as_ref(), &c.body, common.max_message_size);
                let handle = BatchedAck::new(shared.writer.clone(), (c.id, c.attempt), Arc::clone(encoder));
                Delivery::new(self.queue.clone(), message, c.attempt > 1, Box::new(handle))
            })
            .collect())
    }
}

#[async_trait]
impl<D: Dialect> Consumer for SqlConsumer<D> {
    async fn fetch(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        self.broker.shared.check_open()?;
        let poll = self.broker.shared.options.common().poll_interval;
        let this = &*self;
        let got = poll_until(timeout, poll, Some(&this.waker), || async {
            let got = this.claim(max.max(1)).await?;
            Ok((!got.is_empty()).then_some(got))
        })
        .await?;
        Ok(got.unwrap_or_default())
    }

    async fn close(self: Box<Self>) -> Result<()> {
        let shared = &self.broker.shared;
        shared.forget_owner(&self.owner);
        if shared.check_open().is_err() {
            return Ok(());
        }
        if shared.dialect.return_owned(&self.owner).await? > 0 {
            self.waker.notify_waiters();
        }
        Ok(())
    }
}

impl<D: Dialect> Drop for SqlConsumer<D> {
    fn drop(&mut self) {
        // Stop renewing this consumer's leases: what it still holds returns to the queue when
        // they run out, as if its process had died.
        self.broker.shared.forget_owner(&self.owner);
    }
}
