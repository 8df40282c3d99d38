//! The worker: consumers, executors, the delay mover and shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use troupe_core::queue::{dq_name, is_delay_queue};
use troupe_core::{App, Consumer, ConsumerOptions, Error, Result, WorkerInfo, now_ms};

use crate::delay::{DelayHolder, Held};
use crate::periodic::Scheduler;
use crate::process::process;
use crate::work::{WorkItem, WorkQueue};
use troupe_core::periodic::Periodic;

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
            heartbeat: DEFAULT_HEARTBEAT,
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
    heartbeat: Duration,
}

/// The longest wait between two attempts to reconnect a consumer (the wait starts at 100 ms
/// and doubles). Short, so a restarted server is back in use within seconds of answering;
/// Dramatiq's consumers wait 3 s between attempts.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The most delayed messages a worker holds per queue by default (see
/// [`WorkerBuilder::delay_prefetch`]).
pub const DEFAULT_MAX_DELAY_PREFETCH: usize = 8_000;

/// How often a worker tells the broker it is alive (see [`WorkerBuilder::heartbeat`]).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

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

    /// Delayed messages held per queue (default min(1000 × concurrency, 8000): Dramatiq's
    /// 1000 per thread, at most what its default 8 threads hold, so a worker's memory does not
    /// grow with the machine's cores).
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

    /// How often the worker records its heartbeat on the broker (default 5 s), for
    /// `troupe workers` and the dashboard: its queues, the messages it holds on each, what it
    /// has processed. A worker missing three beats counts as gone.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every.max(Duration::from_millis(10));
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
        let delay_prefetch = self
            .delay_prefetch
            .unwrap_or((1000 * concurrency).min(DEFAULT_MAX_DELAY_PREFETCH));
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
        let mut schedulers = Vec::new();
        for actor in app.actors() {
            let Some(periodic) = Periodic::of(actor.name(), actor.options())? else {
                continue;
            };
            let queue = actor.options().queue_name.clone();
            if !queues.contains(&queue) {
                continue;
            }
            let Some(state) = app.state() else {
                return Err(Error::Config(format!(
                    "the periodic actor {} needs a state backend, so that one message per tick is sent across workers; \
                     give the app one (--state-url)",
                    actor.name()
                )));
            };
            schedulers.push(Scheduler {
                app: app.clone(),
                state: Arc::clone(state),
                actor: actor.name().to_owned(),
                queue,
                periodic,
            });
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
            processed: AtomicU64::new(0),
            minutes: Arc::default(),
        });
        let mut consumers = Vec::new();
        let mut windows = Vec::new();
        for queue in &queues {
            let mut names = vec![(queue.clone(), prefetch)];
            if !native_delays {
                names.push((dq_name(queue), delay_prefetch));
            }
            for (name, window) in names {
                let consumer = app.broker().consume(&name, ConsumerOptions::new(window)).await?;
                let shared = Arc::clone(&shared);
                let slots = Arc::new(Semaphore::new(window));
                let fetching = Arc::new(AtomicUsize::new(0));
                windows.push(Window {
                    name: name.clone(),
                    size: window,
                    slots: Arc::clone(&slots),
                    fetching: Arc::clone(&fetching),
                });
                consumers.push(tokio::spawn(async move {
                    consume_loop(shared, name, window, slots, fetching, consumer).await
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
            tokio::spawn(async move {
                shared
                    .delays
                    .run_mover(&shared.app, &shared.stop_fetch, &shared.settles)
                    .await;
            })
        };
        let beat = WorkerInfo::new(
            uuid::Uuid::new_v4().to_string(),
            queues.clone(),
            concurrency as u64,
            self.heartbeat * 3,
        );
        let worker_id = beat.id.clone();
        for scheduler in schedulers {
            let stop = shared.stop_fetch.clone();
            tokio::spawn(scheduler.run(stop));
        }
        let heart = {
            let shared = Arc::clone(&shared);
            let every = self.heartbeat;
            tokio::spawn(async move { heartbeat_loop(shared, beat, windows, every).await })
        };
        tracing::info!(
            ?queues,
            concurrency,
            prefetch,
            broker = app.broker().backend(),
            worker = %worker_id,
            "worker started"
        );
        Ok(WorkerHandle {
            shared,
            consumers,
            executors,
            mover,
            heart,
            worker_id,
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
    /// Messages processed (settled or abandoned) since the start.
    processed: AtomicU64,
    /// Per-minute counts of the last hour, for the heartbeat.
    minutes: Arc<Minutes>,
}

/// Messages processed and dead-lettered per minute over the last hour.
#[derive(Debug, Default)]
pub(crate) struct Minutes {
    counts: std::sync::Mutex<std::collections::VecDeque<[u64; 3]>>,
}

impl Minutes {
    fn add(&self, processed: u64, failed: u64) {
        let minute = now_ms() / 60_000;
        if let Ok(mut counts) = self.counts.lock() {
            match counts.back_mut() {
                Some(last) if last[0] == minute => {
                    last[1] += processed;
                    last[2] += failed;
                }
                _ => counts.push_back([minute, processed, failed]),
            }
            while counts.front().is_some_and(|c| c[0] + 60 <= minute) {
                counts.pop_front();
            }
        }
    }

    /// A message was processed.
    pub(crate) fn processed(&self) {
        self.add(1, 0);
    }

    /// A message was dead-lettered.
    pub(crate) fn failed(&self) {
        self.add(0, 1);
    }

    fn last_hour(&self) -> Vec<[u64; 3]> {
        let minute = now_ms() / 60_000;
        self.counts
            .lock()
            .map(|c| c.iter().filter(|c| c[0] + 60 > minute).copied().collect())
            .unwrap_or_default()
    }
}

/// One consumer's prefetch window, as the heartbeat reads it.
struct Window {
    name: String,
    size: usize,
    /// Free places in the window.
    slots: Arc<Semaphore>,
    /// Places taken for a fetch still under way (no message in them yet).
    fetching: Arc<AtomicUsize>,
}

impl Window {
    /// Messages held: prefetched, running or settling.
    fn held(&self) -> u64 {
        let taken = self.size.saturating_sub(self.slots.available_permits());
        taken.saturating_sub(self.fetching.load(Ordering::Relaxed)) as u64
    }
}

/// Records the worker's heartbeat every `every` until the worker stops.
async fn heartbeat_loop(shared: Arc<Shared>, mut beat: WorkerInfo, windows: Vec<Window>, every: Duration) {
    let ttl = every * 3;
    let mut failing = false;
    loop {
        let now = now_ms();
        beat.beat_at = now;
        beat.expires_at = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        beat.processed = shared.processed.load(Ordering::Relaxed);
        beat.minutes = shared.minutes.last_hour();
        beat.in_flight = windows.iter().map(|w| (w.name.clone(), w.held())).collect();
        match shared.app.broker().beat(&beat).await {
            Ok(()) if failing => {
                tracing::info!("worker heartbeat recorded again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "could not record the worker heartbeat; `troupe workers` may not list this worker");
                failing = true;
            }
            Err(_) => {}
        }
        // Beats go on through a graceful shutdown (running actors still hold messages); the
        // handle aborts this task once the worker stopped.
        tokio::time::sleep(every).await;
    }
}

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    shared: Arc<Shared>,
    consumers: Vec<JoinHandle<Option<Box<dyn Consumer>>>>,
    executors: Vec<JoinHandle<()>>,
    mover: JoinHandle<()>,
    heart: JoinHandle<()>,
    worker_id: String,
    shutdown_timeout: Duration,
}

impl WorkerHandle {
    /// Messages prefetched and waiting for an executor, and delayed messages held.
    #[must_use]
    pub fn held(&self) -> (usize, usize) {
        (self.shared.work.len(), self.shared.delays.len())
    }

    /// This run's id, as `troupe workers` lists it.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.worker_id
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
        self.heart.abort();
        if let Err(e) = app.broker().forget_worker(&self.worker_id).await {
            tracing::debug!(error = %e, "could not remove the worker's heartbeat; it expires by itself");
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
        let run = std::panic::AssertUnwindSafe(process(&shared.app, delivery, &shared.hard_stop, &shared.minutes))
            .catch_unwind();
        let settlement = run.await;
        shared.processed.fetch_add(1, Ordering::Relaxed);
        shared.minutes.processed();
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
    fetching: Arc<AtomicUsize>,
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
                    backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        fetching.store(permits.len(), Ordering::Relaxed);
        let fetched = tokio::select! {
            () = shared.stop_fetch.cancelled() => return consumer,
            r = current.fetch(permits.len(), shared.fetch_timeout) => r,
        };
        match fetched {
            Ok(deliveries) => {
                backoff = Duration::from_millis(100);
                let mut permits = permits.into_iter();
                for (delivery, permit) in deliveries.into_iter().zip(permits.by_ref()) {
                    fetching.fetch_sub(1, Ordering::Relaxed);
                    route(&shared, delivery, permit, delay_queue).await;
                }
                drop(permits);
                fetching.store(0, Ordering::Relaxed);
            }
            Err(e) => {
                drop(permits);
                fetching.store(0, Ordering::Relaxed);
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
                backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
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
            shared
                .delays
                .hold(eta.unwrap_or(now), Held::new(delivery, message, permit));
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
