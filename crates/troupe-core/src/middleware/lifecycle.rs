//! Task lifecycle on the state backend (design §4b): task states, cancellation and the release
//! of unique keys, in one middleware the app places outermost.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::task_handle::RunningSignal;
use super::{Middleware, Next, Outcome, ProcessContext};
use crate::app::App;
use crate::error::Result;
use crate::message::Message;
use crate::support::Gather;
use crate::tasks::{CancelMode, TaskStatus, TaskStore, TaskUpdate, task_version};

/// Task-state tracking settings (`AppBuilder::track_tasks`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskTracking {
    /// How long a record is kept after its last change (7 days).
    pub retention: Duration,
    /// Whether records keep the message's arguments (off: they may be large or private).
    pub keep_args: bool,
    /// How long an attempt runs before its `running` state is written (100 ms). An attempt
    /// that ends sooner is recorded once, in its final state (with its start time), which
    /// halves the writes of short tasks; `Duration::ZERO` writes `running` before every
    /// attempt.
    pub running_after: Duration,
}

impl Default for TaskTracking {
    fn default() -> Self {
        Self {
            retention: crate::tasks::DEFAULT_TASK_RETENTION,
            keep_args: false,
            running_after: Duration::from_millis(100),
        }
    }
}

impl TaskTracking {
    /// Keeps records for `retention` after their last change.
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Keeps each message's arguments in its record.
    #[must_use]
    pub fn keep_args(mut self, on: bool) -> Self {
        self.keep_args = on;
        self
    }

    /// Writes `running` once an attempt has run for `after` (see
    /// [`running_after`](Self::running_after)).
    #[must_use]
    pub fn running_after(mut self, after: Duration) -> Self {
        self.running_after = after;
        self
    }
}

/// Cancellation settings (`AppBuilder::cancellation`). Cancellation is on whenever the app has
/// a state backend that keeps task states.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Cancellation {
    /// Whether workers honour cancellations (on).
    pub enabled: bool,
    /// How long a cancellation request is kept for a message that has not arrived yet (7
    /// days: a delayed message may be due long after).
    pub request_ttl: Duration,
    /// How long a running async actor has to return once told it is cancelled, before it is
    /// dropped (0: dropped at its next `.await`, as dramatiq-abort's default `abort_timeout`).
    pub grace: Duration,
    /// How long a worker's watcher waits for a cancellation of running work per round (1 s).
    pub watch_interval: Duration,
}

impl Default for Cancellation {
    fn default() -> Self {
        Self {
            enabled: true,
            request_ttl: Duration::from_secs(7 * 24 * 3600),
            grace: Duration::ZERO,
            watch_interval: Duration::from_secs(1),
        }
    }
}

impl Cancellation {
    /// Workers ignore cancellations (no read per message).
    #[must_use]
    pub fn off() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Keeps requests for `ttl`.
    #[must_use]
    pub fn request_ttl(mut self, ttl: Duration) -> Self {
        self.request_ttl = ttl;
        self
    }

    /// Gives a cancelled running actor `grace` to return before it is dropped.
    #[must_use]
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Waits up to `interval` per round for cancellations of running work.
    #[must_use]
    pub fn watch_interval(mut self, interval: Duration) -> Self {
        self.watch_interval = interval;
        self
    }
}

/// This process's name in task records: `host:pid`.
#[must_use]
pub fn worker_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_owned());
        format!("{host}:{}", std::process::id())
    })
}

/// Records task states, honours cancellations and frees unique keys. The app adds it, first in
/// the list, when it has a state backend that keeps task states (see `AppBuilder::track_tasks`
/// and `AppBuilder::cancellation`).
#[derive(Debug)]
pub struct TaskLifecycle {
    tracking: Option<TaskTracking>,
    cancellation: Cancellation,
    running: Arc<Running>,
    watcher: Mutex<Option<CancellationToken>>,
    /// The app's state backend (set when the app is built) and the round trips gathered on it.
    backend: Option<Arc<dyn crate::StateBackend>>,
    batches: Mutex<Option<Batches>>,
    /// Cancellation reads started when a worker prefetched a message, by message id.
    prechecked: Mutex<HashMap<String, Precheck>>,
}

/// A cancellation read started at prefetch.
struct Precheck {
    started: Instant,
    answer: BoxFuture<'static, Result<Option<CancelMode>>>,
}

impl std::fmt::Debug for Precheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Precheck")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

/// How long a cancellation read started at prefetch that found no request answers for the
/// message: one that waited longer for an executor is read again before it runs.
const PRECHECK_FRESH: Duration = Duration::from_millis(50);

/// The most prefetch reads kept (a worker holds far fewer; past this, the oldest are
/// forgotten and those messages read again before they run).
const MAX_PRECHECKED: usize = 4096;

/// Writes and cancellation reads of many executors, gathered into one store call per batch
/// (`record_many`, `cancel_requests`: one transaction or pipeline).
#[derive(Clone, Debug)]
struct Batches {
    writes: Gather<TaskUpdate, bool>,
    cancels: Gather<String, Option<CancelMode>>,
}

/// The most updates or reads one store call takes.
const MAX_BATCH: usize = 512;

/// The running messages a worker's watcher looks for cancellations of.
#[derive(Debug, Default)]
struct Running {
    tokens: Mutex<HashMap<String, CancellationToken>>,
    added: Notify,
}

impl Running {
    fn tokens(&self) -> MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removes a running message from the watch list when its processing ends (or is dropped).
struct Watched<'a> {
    running: &'a Running,
    id: String,
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        self.running.tokens().remove(&self.id);
    }
}

impl TaskLifecycle {
    /// The lifecycle with these settings.
    #[must_use]
    pub fn new(tracking: Option<TaskTracking>, cancellation: Cancellation) -> Self {
        Self {
            tracking,
            cancellation,
            running: Arc::default(),
            watcher: Mutex::new(None),
            backend: None,
            batches: Mutex::new(None),
            prechecked: Mutex::new(HashMap::new()),
        }
    }

    /// The tracking settings, when tracking is on.
    #[must_use]
    pub fn tracking(&self) -> Option<&TaskTracking> {
        self.tracking.as_ref()
    }

    /// The cancellation settings.
    #[must_use]
    pub fn cancellation(&self) -> &Cancellation {
        &self.cancellation
    }

    fn retention(&self) -> Duration {
        self.tracking
            .as_ref()
            .map_or(crate::tasks::DEFAULT_TASK_RETENTION, |t| t.retention)
    }

    /// The update recording that `message` was enqueued with `delay`.
    fn enqueued(&self, message: &Message, delay: Option<Duration>) -> TaskUpdate {
        let retries = message.retries();
        let eta = message.eta().or_else(|| {
            delay
                .filter(|d| !d.is_zero())
                .map(|d| crate::now_ms() + crate::duration_ms(d))
        });
        let status = match (eta.is_some(), retries > 0) {
            (true, true) => TaskStatus::Retrying,
            (true, false) => TaskStatus::Delayed,
            (false, _) => TaskStatus::Enqueued,
        };
        let mut update = self.update(message, status, task_version(retries, 0));
        update.eta = eta;
        update.attempts = retries;
        if let Some(traceback) = message.traceback().filter(|_| retries > 0) {
            let (kind, text) = split_error(traceback);
            update.error_type = Some(kind);
            update.error = Some(text);
        }
        update
    }

    fn update(&self, message: &Message, status: TaskStatus, version: u64) -> TaskUpdate {
        let mut update = TaskUpdate::new(
            message.message_id.clone(),
            message.actor_name.clone(),
            message.canonical_queue(),
            status,
            version,
        );
        if self.tracking.as_ref().is_some_and(|t| t.keep_args) {
            update.args = Some(serde_json::json!({"args": message.args, "kwargs": message.kwargs}));
        }
        update
    }

    /// The lifecycle of an app whose state backend is `backend`.
    pub(crate) fn on_backend(mut self, backend: Arc<dyn crate::StateBackend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// The gathered round trips, started on first use in the calling runtime (and again if
    /// that runtime has ended); `None` outside a runtime or without a backend.
    fn batches(&self) -> Option<Batches> {
        let backend = self.backend.as_ref()?;
        let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(live) = batches
            .as_ref()
            .filter(|b| !b.writes.is_closed() && !b.cancels.is_closed())
        {
            return Some(live.clone());
        }
        tokio::runtime::Handle::try_current().ok()?;
        let retention = self.retention();
        let for_writes = Arc::clone(backend);
        let writes = Gather::spawn("tasks", MAX_BATCH, move |updates: Vec<TaskUpdate>| {
            let backend = Arc::clone(&for_writes);
            async move {
                match backend.tasks() {
                    Some(store) => store.record_many(&updates, retention).await,
                    None => Ok(vec![false; updates.len()]),
                }
            }
        });
        let for_cancels = Arc::clone(backend);
        let cancels = Gather::spawn("tasks", MAX_BATCH, move |ids: Vec<String>| {
            let backend = Arc::clone(&for_cancels);
            async move {
                match backend.tasks() {
                    Some(store) => store.cancel_requests(&ids).await,
                    None => Ok(vec![None; ids.len()]),
                }
            }
        });
        let fresh = Batches { writes, cancels };
        *batches = Some(fresh.clone());
        Some(fresh)
    }

    /// Writes `update` (gathered with other executors' writes), retrying transient errors: a
    /// state the worker acks after must be stored first.
    async fn record(&self, store: &dyn TaskStore, update: &TaskUpdate) -> Result<bool> {
        write_state(self.batches().as_ref(), store, update, self.retention()).await
    }

    /// The cancellation request of `id`: the read started when the message was prefetched,
    /// if it found one or is fresh, else a read now (gathered with other executors' reads).
    async fn cancel_requested(&self, store: &dyn TaskStore, id: &str) -> Result<Option<CancelMode>> {
        let pre = self
            .prechecked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(pre) = pre {
            // A request found stands at any age (none is withdrawn); "none" goes stale.
            let fresh = pre.started.elapsed() <= PRECHECK_FRESH;
            if let Ok(answer) = pre.answer.await
                && (fresh || answer.is_some())
            {
                return Ok(answer);
            }
        }
        durable("read the cancellation requests", || async {
            match self.batches() {
                Some(batches) => batches.cancels.call(id.to_owned()).await,
                None => store.cancel_requested(id).await,
            }
        })
        .await
    }

    /// Writes an attempt's `running` state; says whether the record turned out cancelled.
    async fn write_running(&self, store: &dyn TaskStore, update: &TaskUpdate) -> Started {
        match self.record(store, update).await {
            Ok(true) => Started::Recorded,
            Ok(false) => {
                let record = store.task(&update.message_id).await.ok().flatten();
                if record.is_some_and(|r| r.status == TaskStatus::Cancelled) {
                    Started::Cancelled
                } else {
                    Started::Recorded
                }
            }
            Err(e) => {
                tracing::error!(message_id = %update.message_id, error = %e, "could not record the running task state");
                Started::Recorded
            }
        }
    }

    /// Skips a cancelled message: records it cancelled and frees its unique key.
    async fn skip_cancelled(&self, store: &dyn TaskStore, cx: &mut ProcessContext, version: u64) -> Outcome {
        tracing::info!(message_id = %cx.message().message_id, "message was cancelled; skipping it");
        cx.mark_cancelled();
        if self.tracking.is_some() {
            let update = self.update(cx.message(), TaskStatus::Cancelled, version);
            if let Err(e) = self.record(store, &update).await {
                tracing::error!(message_id = %cx.message().message_id, error = %e, "could not record the cancellation");
            }
        }
        if let Some(key) = cx.message().option_str(crate::option_keys::UNIQUE_HELD) {
            release_unique(store, key, &cx.message().message_id).await;
        }
        Outcome::Skipped
    }

    /// The writes that end an attempt, run by the worker before it settles the message (see
    /// [`ProcessContext::before_settle`]): the final state (gathered with other messages'),
    /// then the unique key's release. An error when the state could not be stored: the worker
    /// then returns the message to its queue.
    fn settle_writes(
        &self,
        app: App,
        update: Option<TaskUpdate>,
        unique: Option<(String, String)>,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let batches = self.batches();
        let retention = self.retention();
        async move {
            let store = app.task_store()?;
            if let Some(update) = update
                && let Err(e) = write_state(batches.as_ref(), store, &update, retention).await
            {
                tracing::error!(message_id = %update.message_id, error = %e, "could not record the final task state; returning the message to its queue");
                return Err(e);
            }
            if let Some((key, id)) = unique {
                release_unique(store, &key, &id).await;
            }
            Ok(())
        }
    }

    fn start_watcher(&self, app: &App) {
        let Ok(store_backend) = app.state_with_tasks() else {
            return;
        };
        let mut watcher = self.watcher.lock().unwrap_or_else(PoisonError::into_inner);
        if watcher.as_ref().is_some_and(|t| !t.is_cancelled()) {
            return;
        }
        let stop = CancellationToken::new();
        *watcher = Some(stop.clone());
        let running = Arc::clone(&self.running);
        let interval = self.cancellation.watch_interval;
        let expire = self.tracking.is_some();
        if self.cancellation.enabled {
            let backend = Arc::clone(&store_backend);
            let stop = stop.clone();
            tokio::spawn(async move { watch_cancels(backend, running, interval, stop).await });
        }
        if expire {
            tokio::spawn(async move { expire_records(store_backend, stop).await });
        }
    }
}

/// What writing `running` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Started {
    /// Written, or refused for a newer state: the attempt goes on.
    Recorded,
    /// The record is cancelled: the attempt must not run.
    Cancelled,
}

/// Splits a traceback `Type: text` into its parts.
fn split_error(traceback: &str) -> (String, String) {
    let first = traceback.lines().next().unwrap_or(traceback);
    match first.split_once(": ") {
        Some((kind, _)) if !kind.is_empty() && !kind.contains(' ') => {
            (kind.to_owned(), traceback[kind.len() + 2..].to_owned())
        }
        _ => ("Error".to_owned(), traceback.to_owned()),
    }
}

/// Retries `op` on transient errors with backoff (50 ms doubling to 2 s, about 30 s in all).
async fn durable<T, F, Fut>(what: &str, op: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let (first, max) = (Duration::from_millis(50), Duration::from_secs(2));
    crate::support::retry_transient(what, (first, max), Some(Duration::from_secs(30)), None, op).await
}

/// Writes `update` through `batches` (one store call with other messages' writes) or, without
/// them, alone, retrying transient errors.
async fn write_state(
    batches: Option<&Batches>,
    store: &dyn TaskStore,
    update: &TaskUpdate,
    retention: Duration,
) -> Result<bool> {
    durable("record the task state", || async {
        match batches {
            Some(batches) => batches.writes.call(update.clone()).await,
            None => store.record(update, retention).await,
        }
    })
    .await
}

async fn release_unique(store: &dyn TaskStore, key: &str, message_id: &str) {
    let release = durable("free the unique key", || store.release_unique(key, message_id)).await;
    if let Err(e) = release {
        tracing::warn!(%message_id, error = %e, "could not free the unique key; it frees itself when unique_for passes");
    }
}

/// Watches the running messages for cancellations (mode abort) and stops them.
async fn watch_cancels(
    backend: Arc<dyn crate::StateBackend>,
    running: Arc<Running>,
    interval: Duration,
    stop: CancellationToken,
) {
    let Some(store) = backend.tasks() else { return };
    // Running messages whose request cancels pending work only: not stopped, not asked again.
    let mut pending_only: HashSet<String> = HashSet::new();
    loop {
        let added = running.added.notified();
        tokio::pin!(added);
        added.as_mut().enable();
        let ids: Vec<String> = {
            let tokens = running.tokens();
            pending_only.retain(|id| tokens.contains_key(id));
            tokens
                .iter()
                .filter(|(id, token)| !token.is_cancelled() && !pending_only.contains(*id))
                .map(|(id, _)| id.clone())
                .collect()
        };
        if ids.is_empty() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = added => continue,
            }
        }
        let found = tokio::select! {
            () = stop.cancelled() => return,
            found = store.wait_cancels(&ids, interval) => found,
        };
        match found {
            Ok(found) if found.is_empty() => {}
            Ok(found) => {
                for (id, mode) in found {
                    match mode {
                        CancelMode::Pending => {
                            pending_only.insert(id);
                        }
                        _ => {
                            if let Some(token) = running.tokens().get(&id) {
                                tracing::info!(message_id = %id, "running message was cancelled; stopping it");
                                token.cancel();
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not watch for cancellations; retrying in 1 s");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
        // A store may answer at once without awaiting anything; let the stopped actors run.
        tokio::task::yield_now().await;
    }
}

/// Deletes records past their retention once a minute.
async fn expire_records(backend: Arc<dyn crate::StateBackend>, stop: CancellationToken) {
    const BATCH: usize = 10_000;
    let Some(store) = backend.tasks() else { return };
    loop {
        for _ in 0..100 {
            match store.expire_tasks(BATCH).await {
                Ok(n) if usize::try_from(n).unwrap_or(usize::MAX) >= BATCH => {}
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "could not expire task records; trying again in a minute");
                    break;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

#[async_trait]
impl Middleware for TaskLifecycle {
    fn after_hooks(&self) -> bool {
        false
    }

    async fn after_enqueue(&self, app: &App, message: &Message, delay: Option<Duration>) {
        if self.tracking.is_none() {
            return;
        }
        let Ok(store) = app.task_store() else { return };
        let update = self.enqueued(message, delay);
        if let Err(e) = self.record(store, &update).await {
            tracing::error!(message_id = %message.message_id, error = %e, "could not record the enqueued task state");
        }
    }

    async fn after_enqueue_many(&self, app: &App, messages: &[(Message, Option<Duration>)]) {
        if self.tracking.is_none() || messages.is_empty() {
            return;
        }
        let Ok(store) = app.task_store() else { return };
        let updates: Vec<TaskUpdate> = messages
            .iter()
            .map(|(message, delay)| self.enqueued(message, *delay))
            .collect();
        let retention = self.retention();
        let written = durable("record the enqueued task states", || {
            store.record_many(&updates, retention)
        })
        .await;
        if let Err(e) = written {
            tracing::error!(messages = updates.len(), error = %e, "could not record the enqueued task states");
        }
    }

    async fn on_worker_boot(&self, app: &App) {
        self.start_watcher(app);
    }

    fn on_prefetch(&self, _app: &App, message: &Message) {
        if !self.cancellation.enabled {
            return;
        }
        let Some(batches) = self.batches() else { return };
        let answer = batches.cancels.submit(message.message_id.clone());
        let mut prechecked = self.prechecked.lock().unwrap_or_else(PoisonError::into_inner);
        if prechecked.len() >= MAX_PRECHECKED {
            prechecked.clear();
        }
        prechecked.insert(
            message.message_id.clone(),
            Precheck {
                started: Instant::now(),
                answer: Box::pin(answer),
            },
        );
    }

    async fn on_worker_shutdown(&self, _app: &App) {
        self.prechecked.lock().unwrap_or_else(PoisonError::into_inner).clear();
        if let Some(stop) = self.watcher.lock().unwrap_or_else(PoisonError::into_inner).take() {
            stop.cancel();
        }
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let app = cx.app().clone();
        let Ok(store) = app.task_store() else {
            return next.run(cx).await;
        };
        let retries = cx.message().retries();
        let id = cx.message().message_id.clone();
        if self.cancellation.enabled {
            match self.cancel_requested(store, &id).await {
                Ok(Some(_)) => return self.skip_cancelled(store, cx, task_version(retries, 2)).await,
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(message_id = %id, error = %e, "could not read the cancellation requests; running the message");
                }
            }
        }
        let started = crate::now_ms();
        let running = match &self.tracking {
            Some(tracking) => {
                let mut update = self.update(cx.message(), TaskStatus::Running, task_version(retries, 1));
                update.attempts = retries + 1;
                update.worker = Some(worker_id().to_owned());
                update.started_at = Some(started);
                let signal = Arc::new(RunningSignal::new());
                let task = cx
                    .task()
                    .clone()
                    .with_retention(self.retention())
                    .with_running_signal(Arc::clone(&signal));
                cx.set_task(task);
                Some((update, tracking.running_after, signal))
            }
            None => None,
        };
        if let Some((update, after, signal)) = &running
            && after.is_zero()
        {
            let started = self.write_running(store, update).await;
            signal.written();
            if started == Started::Cancelled {
                return self.skip_cancelled(store, cx, task_version(retries, 2)).await;
            }
        }
        let abort = CancellationToken::new();
        let _watched = if self.cancellation.enabled {
            self.running.tokens().insert(id.clone(), abort.clone());
            self.running.added.notify_waiters();
            cx.abort_on(abort.clone(), self.cancellation.grace);
            Some(Watched {
                running: &self.running,
                id: id.clone(),
            })
        } else {
            None
        };
        let outcome = match &running {
            Some((update, after, signal)) if !after.is_zero() => {
                // Short attempts are recorded once, when they end; a longer one (or one that
                // reports progress) gets its `running` state written while it goes on.
                let run = next.run(cx);
                tokio::pin!(run);
                let due = async {
                    tokio::select! {
                        () = tokio::time::sleep(*after) => {}
                        () = signal.asked() => {}
                    }
                };
                tokio::select! {
                    biased;
                    outcome = &mut run => outcome,
                    () = due => {
                        let write = async {
                            let started = self.write_running(store, update).await;
                            signal.written();
                            if started == Started::Cancelled {
                                // Cancelled while it started: the caller was told it would
                                // not run, so it is stopped whatever the mode.
                                abort.cancel();
                            }
                        };
                        let (outcome, ()) = tokio::join!(&mut run, write);
                        outcome
                    }
                }
            }
            _ => next.run(cx).await,
        };
        drop(_watched);
        let ended = if cx.wants_requeue() {
            None
        } else {
            match &outcome {
                _ if cx.was_cancelled() => Some(TaskStatus::Cancelled),
                Outcome::Success(_) => Some(TaskStatus::Succeeded),
                Outcome::Skipped if cx.is_failed() => Some(TaskStatus::Failed),
                Outcome::Skipped => Some(TaskStatus::Skipped),
                Outcome::Failure(_) if cx.is_failed() => Some(TaskStatus::Failed),
                Outcome::Failure(_) => None,
            }
        };
        let Some(status) = ended else {
            return outcome;
        };
        let update = self.tracking.is_some().then(|| {
            let mut update = self.update(cx.message(), status, task_version(retries, 2));
            update.attempts = retries + 1;
            update.started_at = Some(started);
            update.worker = Some(worker_id().to_owned());
            if status == TaskStatus::Failed {
                let (kind, text) = match &outcome {
                    Outcome::Failure(e) => (e.type_name().to_owned(), e.message().to_owned()),
                    _ => split_error(cx.failure_reason().unwrap_or("message failed")),
                };
                update.error_type = Some(kind);
                update.error = Some(text);
            }
            update
        });
        let unique = cx
            .message()
            .option_str(crate::option_keys::UNIQUE_HELD)
            .map(|key| (key.to_owned(), id.clone()));
        if update.is_some() || unique.is_some() {
            let writes = self.settle_writes(app.clone(), update, unique);
            cx.before_settle(writes);
        }
        outcome
    }
}

/// Abort watcher and tracking need the state backend as an `Arc` (the watcher outlives a call).
impl App {
    pub(crate) fn state_with_tasks(&self) -> Result<Arc<dyn crate::StateBackend>> {
        match self.state() {
            Some(state) if state.tasks().is_some() => Ok(Arc::clone(state)),
            _ => Err(crate::Error::Config(
                "task states and cancellation need a state backend that keeps them: AppBuilder::state with the \
                 memory, SQLite, Redis or PostgreSQL state backend"
                    .into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_split_into_type_and_text() {
        assert_eq!(
            split_error("ValueError: bad: worse"),
            ("ValueError".into(), "bad: worse".into())
        );
        assert_eq!(split_error("it broke"), ("Error".into(), "it broke".into()));
        assert_eq!(split_error("two words: x"), ("Error".into(), "two words: x".into()));
    }

    #[test]
    fn worker_id_names_host_and_pid() {
        assert!(worker_id().ends_with(&format!(":{}", std::process::id())));
    }
}
