//! The worker: consumers, executors, the delay mover and shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use troupe_core::queue::{dq_name, is_delay_queue};
use troupe_core::{App, Consumer, ConsumerOptions, Error, Result, now_ms};

use crate::delay::{DelayHolder, Held};
use crate::process::process;
use crate::work::{WorkItem, WorkQueue};

/// Runs actors: consumes their queues and processes the messages.
#[derive(Debug)]
pub struct Worker;

impl Worker {
    /// Starts configuring a worker for `app`'s actors.
    pub fn builder(app: App) -> WorkerBuilder {
        WorkerBuilder {
            app,
            concurrency: None,
            queues: None,
            prefetch: None,
            delay_prefetch: None,
            fetch_timeout: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(600),
        }
    }
}

/// Configures and starts a [`Worker`].
#[derive(Debug)]
#[must_use]
pub struct WorkerBuilder {
    app: App,
    concurrency: Option<usize>,
    queues: Option<Vec<String>>,
    prefetch: Option<usize>,
    delay_prefetch: Option<usize>,
    fetch_timeout: Duration,
    shutdown_timeout: Duration,
}

impl WorkerBuilder {
    /// How many messages run at once (default 8 per core).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n.max(1));
        self
    }

    /// Consume only these queues (default: every queue of the app's actors).
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.queues = Some(queues.into_iter().map(Into::into).collect());
        self
    }

    /// Messages held per queue, running ones included (default 2 × concurrency).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.prefetch = Some(n.max(1));
        self
    }

    /// Delayed messages held per queue (default min(1000 × concurrency, 65535)).
    pub fn delay_prefetch(mut self, n: usize) -> Self {
        self.delay_prefetch = Some(n.max(1));
        self
    }

    /// How long one fetch waits for messages before checking for shutdown (default 1 s).
    pub fn fetch_timeout(mut self, d: Duration) -> Self {
        self.fetch_timeout = d;
        self
    }

    /// How long a graceful shutdown waits for running actors (default 10 minutes).
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }

    fn resolved_concurrency(&self) -> usize {
        self.concurrency
            .unwrap_or_else(|| 8 * std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
    }

    /// Starts consuming. Returns once every consumer is connected.
    ///
    /// # Errors
    /// [`Error::Config`] when no registered actor consumes the selected queues; a broker error
    /// when the broker cannot be reached.
    pub async fn start(self) -> Result<WorkerHandle> {
        let concurrency = self.resolved_concurrency();
        let prefetch = self.prefetch.unwrap_or(2 * concurrency);
        let delay_prefetch = self.delay_prefetch.unwrap_or((1000 * concurrency).min(65_535));
        let app = self.app;
        let mut queues = app.queues();
        if let Some(whitelist) = &self.queues {
            queues.retain(|q| whitelist.contains(q));
            if queues.is_empty() {
                return Err(Error::Config(format!(
                    "no registered actor consumes any of the queues {whitelist:?}; the app's actors use {:?}",
                    app.queues()
                )));
            }
        }
        if queues.is_empty() {
            return Err(Error::Config(
                "the app has no actors, so the worker has nothing to consume".into(),
            ));
        }
        for queue in &queues {
            app.declare_queue(queue).await?;
        }
        for m in app.middleware() {
            (**m).on_worker_boot(&app).await;
        }
        let native_delays = app.broker().capabilities().native_delays;
        let shared = Arc::new(Shared {
            app: app.clone(),
            work: WorkQueue::default(),
            delays: DelayHolder::default(),
            stop_fetch: CancellationToken::new(),
            stop_work: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            seq: AtomicU64::new(0),
            fetch_timeout: self.fetch_timeout,
            settling: Arc::new(Semaphore::new(prefetch.saturating_mul(queues.len()).max(1))),
            settles: TaskTracker::new(),
        });
        let mut consumers = Vec::new();
        for queue in &queues {
            let mut names = vec![(queue.clone(), prefetch)];
            if !native_delays {
                names.push((dq_name(queue), delay_prefetch));
            }
            for (name, window) in names {
                let consumer = app.broker().consume(&name, ConsumerOptions::new(window)).await?;
                let shared = Arc::clone(&shared);
                let slots = Arc::new(Semaphore::new(window));
                consumers.push(tokio::spawn(async move {
                    consume_loop(shared, name, window, slots, consumer).await
                }));
            }
        }
        let executors = (0..concurrency)
            .map(|_| {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move { execute_loop(shared).await })
            })
            .collect();
        let mover = {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move { shared.delays.run_mover(&shared.app, &shared.stop_fetch).await })
        };
        tracing::info!(
            ?queues,
            concurrency,
            prefetch,
            broker = app.broker().backend(),
            "worker started"
        );
        Ok(WorkerHandle {
            shared,
            consumers,
            executors,
            mover,
            shutdown_timeout: self.shutdown_timeout,
        })
    }

    /// Starts the worker and runs it until SIGINT or SIGTERM, then shuts down gracefully; a
    /// second signal exits the process at once (exit code 1).
    ///
    /// # Errors
    /// As [`start`](Self::start).
    pub async fn run(self) -> Result<()> {
        let handle = self.start().await?;
        wait_for_signal().await;
        tracing::info!("shutting down gracefully; send the signal again to exit now");
        tokio::select! {
            () = handle.stop() => Ok(()),
            () = wait_for_signal() => {
                tracing::warn!("second signal: exiting now; unacked messages will be redelivered by the broker");
                std::process::exit(i32::from(crate::exit_code::KILLED));
            }
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[derive(Debug)]
struct Shared {
    app: App,
    work: WorkQueue,
    delays: DelayHolder,
    stop_fetch: CancellationToken,
    stop_work: CancellationToken,
    hard_stop: CancellationToken,
    seq: AtomicU64,
    fetch_timeout: Duration,
    /// Room for settlements (acks, nacks, requeues) in flight after their executor moved on.
    settling: Arc<Semaphore>,
    /// The settlements in flight; shutdown waits for them before closing the consumers.
    settles: TaskTracker,
}

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    shared: Arc<Shared>,
    consumers: Vec<JoinHandle<Option<Box<dyn Consumer>>>>,
    executors: Vec<JoinHandle<()>>,
    mover: JoinHandle<()>,
    shutdown_timeout: Duration,
}

impl WorkerHandle {
    /// Messages prefetched and waiting for an executor, and delayed messages held.
    #[must_use]
    pub fn held(&self) -> (usize, usize) {
        (self.shared.work.len(), self.shared.delays.len())
    }

    /// Shuts down gracefully with the configured timeout.
    pub async fn stop(self) {
        let timeout = self.shutdown_timeout;
        self.stop_with_timeout(timeout).await;
    }

    /// Shuts down: stops fetching, lets running actors finish for up to `timeout` (then
    /// abandons them; the broker redelivers their messages), and returns prefetched and delayed
    /// messages to the broker.
    pub async fn stop_with_timeout(self, timeout: Duration) {
        let shared = self.shared;
        let app = &shared.app;
        for m in app.middleware() {
            (**m).on_worker_shutdown(app).await;
        }
        shared.stop_fetch.cancel();
        let mut consumers = Vec::new();
        for c in self.consumers {
            if let Ok(Some(consumer)) = c.await {
                consumers.push(consumer);
            }
        }
        let _ = self.mover.await;
        shared.stop_work.cancel();
        let mut executors = self.executors;
        let finished = tokio::time::timeout(timeout, futures::future::join_all(executors.iter_mut())).await;
        if finished.is_err() {
            tracing::warn!(
                ?timeout,
                "running actors did not finish within the shutdown timeout; abandoning them"
            );
            shared.hard_stop.cancel();
            for e in &executors {
                e.abort();
            }
        }
        // Acks, nacks and requeues still in flight finish before the consumers close (a
        // consumer's close returns what it still holds to the queue).
        shared.settles.close();
        if tokio::time::timeout(timeout, shared.settles.wait()).await.is_err() {
            tracing::warn!("settling processed messages did not finish within the shutdown timeout");
            shared.hard_stop.cancel();
            shared.settles.wait().await;
        }
        let queued = shared.work.drain();
        let held = shared.delays.drain();
        let returned = queued.len() + held.len();
        for item in queued {
            if let Err(e) = item.delivery.requeue().await {
                tracing::warn!(error = %e, "could not return a prefetched message; the broker will redeliver it");
            }
        }
        for held in held {
            if let Err(e) = held.delivery.requeue().await {
                tracing::warn!(error = %e, "could not return a delayed message; the broker will redeliver it");
            }
        }
        for consumer in consumers {
            if let Err(e) = consumer.close().await {
                tracing::warn!(error = %e, "error closing a consumer");
            }
        }
        tracing::info!(returned, "worker stopped");
    }
}

async fn execute_loop(shared: Arc<Shared>) {
    loop {
        let item = tokio::select! {
            biased;
            () = shared.stop_work.cancelled() => return,
            item = shared.work.pop() => item,
        };
        let WorkItem { delivery, permit, .. } = item;
        // Room for this message's settlement, taken first: when the broker is slow to ack,
        // executors wait here rather than pile up unsettled messages.
        let Ok(settle_slot) = Arc::clone(&shared.settling).acquire_owned().await else {
            return;
        };
        let run = std::panic::AssertUnwindSafe(process(&shared.app, delivery, &shared.hard_stop)).catch_unwind();
        let settlement = run.await;
        // The message is done with: its prefetch slot goes back to the consumer now, while
        // the broker commits the ack (which batches with other executors' acks).
        drop(permit);
        match settlement {
            Ok(settlement) => {
                shared.settles.spawn(async move {
                    if std::panic::AssertUnwindSafe(settlement).catch_unwind().await.is_err() {
                        tracing::error!("panic while settling a message; it will be redelivered");
                    }
                    drop(settle_slot);
                });
            }
            Err(_) => tracing::error!("panic while processing a message; it will be redelivered"),
        }
    }
}

async fn consume_loop(
    shared: Arc<Shared>,
    queue: String,
    window: usize,
    slots: Arc<Semaphore>,
    consumer: Box<dyn Consumer>,
) -> Option<Box<dyn Consumer>> {
    let mut consumer = Some(consumer);
    let mut backoff = Duration::from_millis(100);
    let delay_queue = is_delay_queue(&queue);
    loop {
        // While executors still have prefetched work, wait until half the window is free, so
        // each fetch is one round trip for a batch rather than one per message.
        let want = if shared.work.len() > 0 { (window / 2).max(1) } else { 1 };
        let mut first = tokio::select! {
            () = shared.stop_fetch.cancelled() => return consumer,
            permit = Arc::clone(&slots).acquire_many_owned(u32::try_from(want).unwrap_or(1)) => match permit {
                Ok(p) => p,
                Err(_) => return consumer,
            },
        };
        let mut permits = Vec::with_capacity(window);
        while first.num_permits() > 1 {
            if let Some(one) = first.split(1) {
                permits.push(one);
            }
        }
        permits.push(first);
        while permits.len() < window {
            match Arc::clone(&slots).try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let current = match consumer.as_mut() {
            Some(c) => c,
            None => match shared.app.broker().consume(&queue, ConsumerOptions::new(window)).await {
                Ok(c) => {
                    tracing::info!(%queue, "consumer reconnected");
                    backoff = Duration::from_millis(100);
                    consumer.insert(c)
                }
                Err(e) => {
                    tracing::warn!(%queue, error = %e, "cannot reconnect the consumer; retrying in {backoff:?}");
                    drop(permits);
                    if sleep_or_stop(&shared.stop_fetch, backoff).await {
                        return None;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            },
        };
        let fetched = tokio::select! {
            () = shared.stop_fetch.cancelled() => return consumer,
            r = current.fetch(permits.len(), shared.fetch_timeout) => r,
        };
        match fetched {
            Ok(deliveries) => {
                backoff = Duration::from_millis(100);
                for (delivery, permit) in deliveries.into_iter().zip(permits.drain(..)) {
                    route(&shared, delivery, permit, delay_queue).await;
                }
            }
            Err(e) => {
                drop(permits);
                if e.is_transient() {
                    tracing::warn!(%queue, error = %e, "lost the broker; reconnecting in {backoff:?}");
                    if let Some(old) = consumer.take() {
                        let _ = old.close().await;
                    }
                } else {
                    tracing::error!(%queue, error = %e, "fetch failed; retrying in {backoff:?}");
                }
                if sleep_or_stop(&shared.stop_fetch, backoff).await {
                    return consumer;
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Sleeps for `d`; returns true when `stop` fired first.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

async fn route(
    shared: &Shared,
    delivery: troupe_core::Delivery,
    permit: tokio::sync::OwnedSemaphorePermit,
    from_delay_queue: bool,
) {
    let (priority, eta) = match delivery.message() {
        Ok(message) => (
            // The message's priority (`troupe_priority`, which sending sets from the actor's);
            // the actor's for a message without one, such as a Python producer's.
            if message.has_priority() {
                message.priority()
            } else {
                shared
                    .app
                    .actor(&message.actor_name)
                    .map_or(0, |a| troupe_core::priority::clamp(i64::from(a.options().priority)))
            },
            message.eta(),
        ),
        Err(_) => (0, None),
    };
    let now = now_ms();
    let hold = match eta {
        Some(eta) => from_delay_queue || eta > now,
        None => from_delay_queue,
    };
    if hold && delivery.message().is_ok() {
        let mut delivery = delivery;
        if let Ok(message) = delivery.take_message() {
            for m in shared.app.middleware() {
                (**m).before_delay_message(&shared.app, &message).await;
            }
            shared.delays.hold(
                eta.unwrap_or(now),
                Held {
                    delivery,
                    message,
                    permit,
                },
            );
        }
        return;
    }
    // Ready messages, and undecodable ones (an executor dead-letters those).
    if let Ok(message) = delivery.message() {
        for m in shared.app.middleware() {
            (**m).on_prefetch(&shared.app, message);
        }
    }
    let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
    shared.work.push(WorkItem {
        priority,
        seq,
        delivery,
        permit,
    });
}
