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

/// The largest window an adaptive prefetch grows to (see [`WorkerBuilder::prefetch`]). Larger
/// windows drained no faster (Redis, PostgreSQL, `troupe-bench` on two cores), while fetching
/// a thousand messages in one script held Redis long enough to double the pick-up latency of
/// other queues' messages.
pub const ADAPTIVE_PREFETCH_MAX: usize = 256;

/// How much work an adaptive prefetch window holds: the messages a queue goes through in this
/// time (see [`WorkerBuilder::prefetch`]). Short, since what one worker holds no other worker
/// can run.
pub const ADAPTIVE_PREFETCH_HOLD: Duration = Duration::from_millis(5);

/// How often an adaptive window measures its queue's rate, and grows at once when the rate
/// calls for more. Short, so a burst finds its window within its first tens of milliseconds
/// (with 200 ms, a 20,000-message burn-down that takes 250 ms ran nearly all at the starting
/// window).
const ADAPTIVE_PERIOD: Duration = Duration::from_millis(50);

/// How many periods in a row a window's rate must call for less before it shrinks (to the most
/// any of them called for): a rate near a power of two's edge does not flip the window, and
/// with it a RabbitMQ consumer's `basic.qos`, every period.
const ADAPTIVE_SHRINK_AFTER: u32 = 4;

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

    /// Messages held per queue, running ones included: a fixed window. By default the window
    /// follows the work: it starts at 2 × concurrency and, for a queue whose messages run
    /// faster than the fetches bring them, grows (in powers of two, to at most
    /// [`ADAPTIVE_PREFETCH_MAX`]) to what the worker goes through in about
    /// [`ADAPTIVE_PREFETCH_HOLD`], and shrinks back when the queue slows or empties. So fast
    /// messages are fetched in large batches, while a slow queue's messages are not held away
    /// from other workers.
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
        // The most a ready queue's window grows to: fixed when set, else adaptive.
        let prefetch_max = match self.prefetch {
            Some(n) => n,
            None => prefetch.max(ADAPTIVE_PREFETCH_MAX),
        };
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
            fetch_timeout: self.fetch_timeout,
            settling: Arc::new(Semaphore::new(prefetch_max.saturating_mul(queues.len()).max(1))),
            settles: TaskTracker::new(),
            processed: AtomicU64::new(0),
            minutes: Arc::default(),
        });
        let mut consumers = Vec::new();
        let mut windows = Vec::new();
        for queue in &queues {
            let mut names = vec![(queue.clone(), prefetch, prefetch_max)];
            if !native_delays {
                names.push((dq_name(queue), delay_prefetch, delay_prefetch));
            }
            for (name, window, max) in names {
                let consumer = app.broker().consume(&name, ConsumerOptions::new(window)).await?;
                let shared = Arc::clone(&shared);
                let slots = Arc::new(Semaphore::new(window));
                let fetching = Arc::new(AtomicUsize::new(0));
                let size = Arc::new(AtomicUsize::new(window));
                windows.push(Window {
                    name: name.clone(),
                    size: Arc::clone(&size),
                    slots: Arc::clone(&slots),
                    fetching: Arc::clone(&fetching),
                });
                let window = Adaptive::new(window, max, size, slots);
                consumers.push(tokio::spawn(async move {
                    consume_loop(shared, name, window, fetching, consumer).await
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
    /// Places in the window (taken or free).
    size: Arc<AtomicUsize>,
    /// Free places in the window.
    slots: Arc<Semaphore>,
    /// Places taken for a fetch still under way (no message in them yet).
    fetching: Arc<AtomicUsize>,
}

impl Window {
    /// Messages held: prefetched, running or settling.
    fn held(&self) -> u64 {
        let taken = self
            .size
            .load(Ordering::Relaxed)
            .saturating_sub(self.slots.available_permits());
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
                // Boxed before it is spawned: spawning moves the future it is given several
                // times, and a pointer is cheaper to move than the settling future.
                let settling = Box::pin(settlement.run());
                shared.settles.spawn(async move {
                    if std::panic::AssertUnwindSafe(settling).catch_unwind().await.is_err() {
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
    mut adaptive: Adaptive,
    fetching: Arc<AtomicUsize>,
    consumer: Box<dyn Consumer>,
) -> Option<Box<dyn Consumer>> {
    let slots = Arc::clone(&adaptive.slots);
    let mut consumer = Some(consumer);
    let mut backoff = Duration::from_millis(100);
    let delay_queue = is_delay_queue(&queue);
    loop {
        let before = adaptive.current;
        adaptive.resize();
        let window = adaptive.current;
        if window != before
            && let Some(current) = consumer.as_mut()
            && let Err(e) = current.set_prefetch(window).await
        {
            // As a lost link: a new consumer starts at the current window.
            tracing::warn!(%queue, error = %e, "cannot resize the consumer's prefetch; reconnecting");
            if let Some(old) = consumer.take() {
                let _ = old.close().await;
            }
        }
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
                adaptive.fetched(deliveries.len());
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

/// A consumer's prefetch window: fixed, or (`max` above `min`) resized every
/// [`ADAPTIVE_PERIOD`] to the messages fetched in [`ADAPTIVE_PREFETCH_HOLD`] at the rate of the
/// last period, in powers of two between `min` and `max`.
struct Adaptive {
    min: usize,
    max: usize,
    /// The window now.
    current: usize,
    /// The places that exist (the window, plus places still to be forgotten after a shrink
    /// while they were taken), as the heartbeat reads them.
    size: Arc<AtomicUsize>,
    slots: Arc<Semaphore>,
    /// Places to forget once they are given back (a shrink while they were taken).
    owed: usize,
    /// Messages fetched since `since`.
    counted: usize,
    since: std::time::Instant,
    /// Periods in a row that called for a smaller window, and the most any of them called for.
    smaller: u32,
    smaller_want: usize,
}

impl Adaptive {
    fn new(min: usize, max: usize, size: Arc<AtomicUsize>, slots: Arc<Semaphore>) -> Self {
        Self {
            min,
            max: max.max(min),
            current: min,
            size,
            slots,
            owed: 0,
            counted: 0,
            since: std::time::Instant::now(),
            smaller: 0,
            smaller_want: 0,
        }
    }

    fn fetched(&mut self, n: usize) {
        self.counted += n;
    }

    /// Resizes the window once a period has passed.
    fn resize(&mut self) {
        if self.owed > 0 {
            self.owed -= self.slots.forget_permits(self.owed);
        }
        if self.max > self.min {
            let elapsed = self.since.elapsed();
            if elapsed >= ADAPTIVE_PERIOD {
                #[allow(clippy::cast_precision_loss)]
                let per_hold = self.counted as f64 * ADAPTIVE_PREFETCH_HOLD.as_secs_f64() / elapsed.as_secs_f64();
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let want = (per_hold.ceil() as usize)
                    .checked_next_power_of_two()
                    .unwrap_or(self.max)
                    .clamp(self.min, self.max);
                self.counted = 0;
                self.since = std::time::Instant::now();
                if want < self.current {
                    self.smaller += 1;
                    self.smaller_want = self.smaller_want.max(want);
                    if self.smaller >= ADAPTIVE_SHRINK_AFTER {
                        let want = self.smaller_want;
                        let fewer = self.current - want;
                        self.owed += fewer - self.slots.forget_permits(fewer);
                        self.current = want;
                        self.smaller = 0;
                        self.smaller_want = 0;
                    }
                } else {
                    if want > self.current {
                        self.slots.add_permits(want - self.current);
                        self.current = want;
                    }
                    self.smaller = 0;
                    self.smaller_want = 0;
                }
            }
        }
        self.size.store(self.current + self.owed, Ordering::Relaxed);
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
    shared.work.push(WorkItem::new(priority, delivery, permit));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptive(min: usize, max: usize) -> Adaptive {
        Adaptive::new(min, max, Arc::new(AtomicUsize::new(min)), Arc::new(Semaphore::new(min)))
    }

    /// Pretends messages were fetched at `per_sec` over the last period, then resizes.
    fn period(window: &mut Adaptive, per_sec: usize) {
        let millis = usize::try_from(ADAPTIVE_PERIOD.as_millis()).unwrap();
        window.fetched(per_sec * millis / 1000);
        window.since = std::time::Instant::now() - ADAPTIVE_PERIOD;
        window.resize();
    }

    #[test]
    fn an_adaptive_window_grows_with_the_rate_and_shrinks_when_it_falls() {
        let mut window = adaptive(32, 1024);
        // 100,000/s: 500 in 5 ms, rounded up to 512.
        period(&mut window, 100_000);
        assert_eq!(window.current, 512);
        assert_eq!(window.slots.available_permits(), 512);
        assert_eq!(window.size.load(Ordering::Relaxed), 512);
        // Capped at the maximum.
        period(&mut window, 1_000_000);
        assert_eq!(window.current, 1024);
        // A slow queue: back to the minimum. The 24 free places are forgotten at once, the
        // 1,000 taken ones count until given back.
        let taken = Arc::clone(&window.slots).try_acquire_many_owned(1000).unwrap();
        for _ in 1..ADAPTIVE_SHRINK_AFTER {
            period(&mut window, 10);
            assert_eq!(window.current, 1024, "a slower period or a few do not shrink it yet");
        }
        period(&mut window, 10);
        assert_eq!(window.current, 32);
        assert_eq!(window.slots.available_permits(), 0);
        assert_eq!(window.size.load(Ordering::Relaxed), 1000, "taken places still count");
        drop(taken);
        window.resize();
        assert_eq!(window.owed, 0);
        assert_eq!(window.slots.available_permits(), 32);
        assert_eq!(window.size.load(Ordering::Relaxed), 32);
    }

    #[test]
    fn a_window_shrinks_to_the_most_its_slower_periods_called_for() {
        let mut window = adaptive(32, 1024);
        period(&mut window, 1_000_000);
        assert_eq!(window.current, 1024);
        // 50,000/s (250 in 5 ms: 256), 10,000/s (64), 1,000/s (the minimum), then nothing.
        for per_sec in [50_000, 10_000, 1_000] {
            period(&mut window, per_sec);
        }
        assert_eq!(window.current, 1024);
        period(&mut window, 0);
        assert_eq!(window.current, 256, "the most the four slower periods called for");
        // A period that calls for the window as it is starts the count again.
        for _ in 1..ADAPTIVE_SHRINK_AFTER {
            period(&mut window, 0);
        }
        period(&mut window, 50_000);
        for _ in 1..ADAPTIVE_SHRINK_AFTER {
            period(&mut window, 0);
        }
        assert_eq!(window.current, 256);
        period(&mut window, 0);
        assert_eq!(window.current, 32);
    }

    #[test]
    fn a_fixed_window_never_resizes() {
        let mut window = adaptive(64, 64);
        period(&mut window, 1_000_000);
        assert_eq!(window.current, 64);
        assert_eq!(window.slots.available_permits(), 64);
    }

    #[test]
    fn the_window_resizes_only_once_a_period_has_passed() {
        let mut window = adaptive(32, 1024);
        window.fetched(1_000_000);
        window.resize();
        assert_eq!(window.current, 32);
    }
}
