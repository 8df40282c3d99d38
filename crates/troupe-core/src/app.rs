//! The app: a broker with its middleware, actors and results backend.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::actor::{Actor, DynActor, Erased, encode_args};
use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::message::{Message, duration_ms, option_keys};
use crate::middleware::{
    Cancellation, CurrentMessage, GroupCallbacks, Middleware, MiddlewareStack, Results, Retries, TaskLifecycle,
    TaskTracking,
};
use crate::queue::{q_name, validate_queue_name};
use crate::results::{ResultBackend, unwrap_result};
use crate::state::StateBackend;
use crate::tasks::{
    CancelMode, CancelOutcome, TaskCounts, TaskFilter, TaskPage, TaskQuery, TaskRecord, TaskStatus, TaskStore,
};

/// A broker together with its middleware, registered actors and optional results and state
/// backends. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Arc<dyn Broker>,
    middleware: Vec<Arc<dyn Middleware>>,
    actors: HashMap<String, Arc<dyn DynActor>>,
    results: Option<Arc<dyn ResultBackend>>,
    state: Option<Arc<dyn StateBackend>>,
    lifecycle: Option<Arc<TaskLifecycle>>,
    declared: Mutex<HashSet<String>>,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut actors: Vec<&String> = self.inner.actors.keys().collect();
        actors.sort();
        f.debug_struct("App")
            .field("broker", &self.inner.broker)
            .field("middleware", &self.inner.middleware)
            .field("actors", &actors)
            .field("results", &self.inner.results)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Starts building an app on `broker`, with Dramatiq's default middleware
    /// ([`middleware::defaults`](crate::middleware::defaults)).
    pub fn builder(broker: Arc<dyn Broker>) -> AppBuilder {
        AppBuilder {
            broker,
            middleware: crate::middleware::defaults(),
            placements: Vec::new(),
            actors: Vec::new(),
            results: None,
            state: None,
            tracking: None,
            cancellation: None,
            current_message: true,
            results_middleware: false,
        }
    }

    /// The broker.
    #[must_use]
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.inner.broker
    }

    /// The middleware, outermost first.
    #[must_use]
    pub fn middleware(&self) -> &[Arc<dyn Middleware>] {
        &self.inner.middleware
    }

    /// This app with `middleware` first in its list (outermost: its `process` sees every
    /// attempt, its hooks run first), sharing the broker, the backends and the actors: for
    /// middleware a worker binary adds to the app its user built, such as the metrics of
    /// `--metrics-bind`. The app it was made from is unchanged.
    #[must_use]
    pub fn with_outer_middleware(&self, middleware: Arc<dyn Middleware>) -> App {
        let mut list = Vec::with_capacity(self.inner.middleware.len() + 1);
        list.push(middleware);
        list.extend(self.inner.middleware.iter().cloned());
        let declared = self.inner.declared.lock().map(|d| d.clone()).unwrap_or_default();
        App {
            inner: Arc::new(Inner {
                broker: Arc::clone(&self.inner.broker),
                middleware: list,
                actors: self.inner.actors.clone(),
                results: self.inner.results.clone(),
                state: self.inner.state.clone(),
                lifecycle: self.inner.lifecycle.clone(),
                declared: Mutex::new(declared),
            }),
        }
    }

    /// The results backend, if any.
    #[must_use]
    pub fn results(&self) -> Option<&Arc<dyn ResultBackend>> {
        self.inner.results.as_ref()
    }

    /// The state backend given to the builder, if any: actors reach it with
    /// `current_app()?.state()` for counters with TTLs, `add`-once keys and events shared by
    /// every worker (on memory, SQLite, Redis or PostgreSQL alike).
    #[must_use]
    pub fn state(&self) -> Option<&Arc<dyn StateBackend>> {
        self.inner.state.as_ref()
    }

    /// The task store of the app's state backend (task states, cancellation requests, unique
    /// keys).
    ///
    /// # Errors
    /// [`Error::Config`] when the app has no state backend, or one that keeps no task states.
    pub fn task_store(&self) -> Result<&dyn TaskStore> {
        match self.inner.state.as_ref() {
            Some(state) => state.tasks().ok_or_else(|| {
                Error::Config(format!(
                    "the state backend {state:?} keeps no task states: use the memory, SQLite, Redis or PostgreSQL \
                     state backend"
                ))
            }),
            None => Err(Error::Config(
                "task states, cancellation and unique messages need a state backend: AppBuilder::state(..)".into(),
            )),
        }
    }

    /// Whether the app records task states (`AppBuilder::track_tasks`).
    #[must_use]
    pub fn tracks_tasks(&self) -> bool {
        self.inner.lifecycle.as_ref().is_some_and(|l| l.tracking().is_some())
    }

    /// How long task records are kept (the tracking's retention; 7 days by default).
    fn task_retention(&self) -> Duration {
        self.inner
            .lifecycle
            .as_ref()
            .and_then(|l| l.tracking())
            .map_or(crate::tasks::DEFAULT_TASK_RETENTION, |t| t.retention)
    }

    /// One task's record (`None`: unknown, or past its retention).
    ///
    /// # Errors
    /// As [`task_store`](Self::task_store); a store error.
    pub async fn task(&self, message_id: &str) -> Result<Option<TaskRecord>> {
        self.task_store()?.task(message_id).await
    }

    /// A page of tasks, newest first: `app.tasks(TaskQuery::new(TaskFilter::new().status(TaskStatus::Failed)))`;
    /// the page's `next` continues it (`TaskQuery::after`).
    ///
    /// # Errors
    /// As [`task_store`](Self::task_store); a store error.
    pub async fn tasks(&self, query: &TaskQuery) -> Result<TaskPage> {
        self.task_store()?.tasks(query).await
    }

    /// Counts per status, actor and queue, within `filter`'s actor and queue.
    ///
    /// # Errors
    /// As [`task_store`](Self::task_store); a store error.
    pub async fn task_counts(&self, filter: &TaskFilter) -> Result<TaskCounts> {
        self.task_store()?.task_counts(filter).await
    }

    /// Deletes one task's record. Returns whether there was one.
    ///
    /// # Errors
    /// As [`task_store`](Self::task_store); a store error.
    pub async fn delete_task(&self, message_id: &str) -> Result<bool> {
        self.task_store()?.delete_task(message_id).await
    }

    /// Cancels a message from any process ([`CancelMode::Abort`]): if it is pending it never
    /// runs, and if it is running its worker stops it. See [`cancel_with`](Self::cancel_with).
    ///
    /// # Errors
    /// As [`cancel_with`](Self::cancel_with).
    pub async fn cancel(&self, message_id: &str) -> Result<CancelOutcome> {
        self.cancel_with(message_id, CancelMode::Abort).await
    }

    /// Cancels a message: a pending one (queued, delayed, retrying) never runs (its worker
    /// skips and acks it when it arrives, and its state becomes cancelled); a running one is
    /// stopped when `mode` is [`CancelMode::Abort`] (an async actor is told through its
    /// [`TaskHandle`](crate::TaskHandle) and dropped at its next `.await`; a blocking one is
    /// abandoned and its outcome discarded). The request is kept in the state backend, so it
    /// takes effect when a stopped worker comes back. A finished message is left alone
    /// ([`CancelOutcome::Finished`]); an id with no record is [`CancelOutcome::Unknown`] (the
    /// request is kept all the same).
    ///
    /// # Errors
    /// As [`task_store`](Self::task_store); a store error.
    pub async fn cancel_with(&self, message_id: &str, mode: CancelMode) -> Result<CancelOutcome> {
        let store = self.task_store()?;
        let before = store.mark_cancelled(message_id, self.task_retention()).await?;
        if let Some(status) = before.filter(|s| s.is_final()) {
            return Ok(CancelOutcome::Finished(status));
        }
        let ttl = self
            .inner
            .lifecycle
            .as_ref()
            .map_or_else(|| Cancellation::default().request_ttl, |l| l.cancellation().request_ttl);
        store.request_cancel(message_id, mode, ttl).await?;
        Ok(match before {
            None => CancelOutcome::Unknown,
            Some(TaskStatus::Running) if mode == CancelMode::Abort => CancelOutcome::Aborting,
            Some(TaskStatus::Running) => CancelOutcome::Running,
            Some(_) => CancelOutcome::Cancelled,
        })
    }

    /// The actor registered under `name`.
    #[must_use]
    pub fn actor(&self, name: &str) -> Option<&Arc<dyn DynActor>> {
        self.inner.actors.get(name)
    }

    /// Every registered actor.
    pub fn actors(&self) -> impl Iterator<Item = &Arc<dyn DynActor>> {
        self.inner.actors.values()
    }

    /// The queues of the registered actors, sorted.
    #[must_use]
    pub fn queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = self
            .inner
            .actors
            .values()
            .map(|a| a.options().queue_name.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        queues.sort();
        queues
    }

    /// Declares `queue` on the broker once per app.
    ///
    /// # Errors
    /// An invalid name or a broker error.
    pub async fn declare_queue(&self, queue: &str) -> Result<()> {
        let queue = q_name(queue);
        let known = self.inner.declared.lock().map(|d| d.contains(queue)).unwrap_or(false);
        if !known {
            validate_queue_name(queue)?;
            self.inner.broker.declare_queue(queue).await?;
            if let Ok(mut declared) = self.inner.declared.lock() {
                declared.insert(queue.to_owned());
            }
        }
        Ok(())
    }

    /// Enqueues a message through the middleware (`before_enqueue`, the broker,
    /// `after_enqueue`). Returns the message as enqueued.
    ///
    /// # Errors
    /// An invalid queue name, a middleware refusal, an oversized message or a broker error.
    pub async fn enqueue(&self, mut message: Message, delay: Option<Duration>) -> Result<Message> {
        self.declare_queue(&message.queue_name).await?;
        self.apply_actor_priority(&mut message);
        for m in self.enqueue_middleware() {
            (**m).before_enqueue(self, &mut message, delay).await?;
        }
        let claimed = self.claim_unique(&mut message).await?;
        if let Some(first) = claimed.duplicate_of {
            tracing::debug!(message_id = %first, "a message with the same unique key is pending or running; not enqueueing another");
            message.message_id = first;
            return Ok(message);
        }
        let span = tracing::info_span!(
            "troupe.enqueue",
            actor = %message.actor_name,
            queue = %message.queue_name,
            message_id = %message.message_id,
            retries = message.retries(),
            delay_ms = delay.map(duration_ms),
        );
        let enqueued = match tracing::Instrument::instrument(self.inner.broker.enqueue(message, delay), span).await {
            Ok(enqueued) => enqueued,
            Err(e) => {
                claimed.release(self).await;
                return Err(e);
            }
        };
        for m in self.enqueue_middleware().rev() {
            (**m).after_enqueue(self, &enqueued, delay).await;
        }
        Ok(enqueued)
    }

    /// Enqueues several messages in one broker call ([`Broker::enqueue_many`]: one transaction
    /// on SQL brokers, one script call per queue on Redis, pipelined confirms on RabbitMQ), each
    /// through the middleware as [`App::enqueue`] does. Returns them as enqueued, in order.
    ///
    /// # Errors
    /// As [`App::enqueue`]; a middleware refusal stops the batch before anything is enqueued.
    pub async fn enqueue_many(&self, messages: Vec<(Message, Option<Duration>)>) -> Result<Vec<Message>> {
        let mut prepared = Vec::with_capacity(messages.len());
        for (mut message, delay) in messages {
            self.declare_queue(&message.queue_name).await?;
            self.apply_actor_priority(&mut message);
            for m in self.enqueue_middleware() {
                (**m).before_enqueue(self, &mut message, delay).await?;
            }
            prepared.push((message, delay));
        }
        // Unique messages already pending (or twice in this batch) are answered with the first
        // one's id and not enqueued; `slots` says, per message asked for, which one answers it.
        let mut slots: Vec<std::result::Result<usize, Message>> = Vec::with_capacity(prepared.len());
        let mut batch = Vec::with_capacity(prepared.len());
        let mut claims = Vec::new();
        for (mut message, delay) in prepared {
            let claimed = match self.claim_unique(&mut message).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    for claim in claims {
                        Claimed::release(&claim, self).await;
                    }
                    return Err(e);
                }
            };
            match claimed.duplicate_of {
                Some(first) => {
                    message.message_id = first;
                    slots.push(Err(message));
                }
                None => {
                    claims.push(claimed);
                    slots.push(Ok(batch.len()));
                    batch.push((message, delay));
                }
            }
        }
        let delays: Vec<Option<Duration>> = batch.iter().map(|(_, delay)| *delay).collect();
        let span = tracing::info_span!("troupe.enqueue_many", messages = batch.len());
        let enqueued = if batch.is_empty() {
            Vec::new()
        } else {
            match tracing::Instrument::instrument(self.inner.broker.enqueue_many(batch), span).await {
                Ok(enqueued) => enqueued,
                Err(e) => {
                    for claim in claims {
                        Claimed::release(&claim, self).await;
                    }
                    return Err(e);
                }
            }
        };
        // Moved, not cloned: the hooks see the batch, then each message goes to its slot.
        let batch: Vec<(Message, Option<Duration>)> = enqueued.into_iter().zip(delays).collect();
        for m in self.enqueue_middleware().rev() {
            (**m).after_enqueue_many(self, &batch).await;
        }
        let mut enqueued: Vec<Option<Message>> = batch.into_iter().map(|(message, _)| Some(message)).collect();
        Ok(slots
            .into_iter()
            .filter_map(|slot| match slot {
                Ok(i) => enqueued.get_mut(i).and_then(Option::take),
                Err(duplicate) => Some(duplicate),
            })
            .collect())
    }

    /// The middleware whose enqueue hooks run, in the app's order (those that declare none are
    /// skipped: each call would box a no-op future).
    fn enqueue_middleware(&self) -> impl DoubleEndedIterator<Item = &Arc<dyn Middleware>> {
        self.inner.middleware.iter().filter(|m| m.enqueue_hooks())
    }

    /// Takes the unique key of a message sent with `unique_for` (its own option, else its
    /// actor's), unless it holds one already (a retry, or a delayed message coming due).
    async fn claim_unique(&self, message: &mut Message) -> Result<Claimed> {
        let none = Claimed::default();
        if message.options.contains_key(option_keys::UNIQUE_HELD) {
            return Ok(none);
        }
        let unique_for = message
            .option_duration(option_keys::UNIQUE_FOR)
            .or_else(|| {
                self.inner
                    .actors
                    .get(&message.actor_name)
                    .and_then(|a| a.options().unique_for)
            })
            .filter(|d| !d.is_zero());
        let Some(ttl) = unique_for else {
            return Ok(none);
        };
        let store = self.task_store()?;
        let key = crate::tasks::unique_key(message);
        let holder = store.claim_unique(&key, &message.message_id, ttl).await?;
        if holder.is_some() {
            return Ok(Claimed {
                key: None,
                message_id: String::new(),
                duplicate_of: holder,
            });
        }
        message
            .options
            .insert(option_keys::UNIQUE_HELD.into(), Value::from(key.clone()));
        Ok(Claimed {
            key: Some(key),
            message_id: message.message_id.clone(),
            duplicate_of: None,
        })
    }

    /// Gives a message without a priority of its own its actor's priority (when the actor is
    /// registered here and its priority is not 0), so the broker orders it.
    fn apply_actor_priority(&self, message: &mut Message) {
        if message.has_priority() {
            return;
        }
        if let Some(actor) = self.inner.actors.get(&message.actor_name) {
            let priority = crate::priority::clamp(i64::from(actor.options().priority));
            if priority != 0 {
                message.options.insert(crate::priority::OPTION.into(), priority.into());
            }
        }
    }

    /// Sends one message to `actor` per item of `calls`, in one broker call (see
    /// [`App::enqueue_many`]).
    ///
    /// # Errors
    /// As [`App::enqueue_many`].
    pub async fn send_many<A: Actor>(
        &self,
        actor: &A,
        calls: impl IntoIterator<Item = A::Args>,
    ) -> Result<Vec<Sent<A::Output>>> {
        let messages = calls
            .into_iter()
            .map(|args| Self::message(actor, &args).map(|m| (m, None)))
            .collect::<Result<Vec<_>>>()?;
        Ok(self
            .enqueue_many(messages)
            .await?
            .into_iter()
            .map(|m| Sent::from_app(self, m))
            .collect())
    }

    /// Builds the message calling `actor` with `args`, carrying the actor's priority (as
    /// `troupe_priority`, when not 0).
    ///
    /// # Errors
    /// [`Error::Encode`] when the arguments cannot be serialised.
    pub fn message<A: Actor>(actor: &A, args: &A::Args) -> Result<Message> {
        let options = actor.options();
        let message = Message::new(options.queue_name, actor.name(), encode_args(args)?, Map::new())
            .with_priority(options.priority);
        Ok(message)
    }

    /// Sends a message to `actor`.
    ///
    /// # Errors
    /// As [`App::enqueue`].
    pub async fn send<A: Actor>(&self, actor: &A, args: A::Args) -> Result<Sent<A::Output>> {
        self.send_with_options(actor, args, SendOptions::default()).await
    }

    /// Sends a message to `actor` with per-message options (delay, priority, any option).
    ///
    /// # Errors
    /// As [`App::enqueue`].
    pub async fn send_with_options<A: Actor>(
        &self,
        actor: &A,
        args: A::Args,
        options: SendOptions,
    ) -> Result<Sent<A::Output>> {
        let mut message = Self::message(actor, &args)?;
        let delay = options.apply(&mut message);
        let message = self.enqueue(message, delay).await?;
        Ok(Sent::from_app(self, message))
    }

    /// Sends positional `args` to the actor named `actor_name` (its queue from the registry, or
    /// `"default"` when it is not registered here), as a callback would. Its result, if the
    /// actor stores one, comes back as JSON through the returned [`Sent`].
    ///
    /// # Errors
    /// As [`App::enqueue`].
    pub async fn send_to(&self, actor_name: &str, args: Vec<Value>) -> Result<Sent<Value>> {
        let queue = self.actor(actor_name).map_or_else(
            || crate::actor::DEFAULT_QUEUE.to_owned(),
            |a| a.options().queue_name.clone(),
        );
        let message = self
            .enqueue(Message::new(queue, actor_name, args, Map::new()), None)
            .await?;
        Ok(Sent::from_app(self, message))
    }

    /// The stored result of `message` (a stored failure is [`Error::ResultFailure`]). With
    /// `timeout`, waits up to that long for it.
    ///
    /// # Errors
    /// [`Error::NoResultBackend`], [`Error::ResultMissing`], [`Error::ResultTimeout`],
    /// [`Error::ResultFailure`], or a backend error.
    pub async fn get_result(&self, message: &Message, timeout: Option<Duration>) -> Result<Value> {
        let backend = self.results().ok_or(Error::NoResultBackend)?;
        unwrap_result(backend.get(message, timeout).await?)
    }

    /// Waits until `queue` is drained: no message ready, delayed or in flight (a worker, in
    /// this process or another, processed them all), on any broker. Fails fast with
    /// [`Error::MessageFailed`] as soon as a message of the queue is dead-lettered while it
    /// waits, as [`MemoryBroker::join`](crate::MemoryBroker::join) does; see
    /// [`join_with`](Self::join_with) to wait through failures.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use troupe_core::{Actor, ActorError, App, MemoryBroker};
    /// # struct Add;
    /// # impl Actor for Add {
    /// #     type Args = (i64, i64);
    /// #     type Output = i64;
    /// #     fn name(&self) -> &str { "add" }
    /// #     async fn call(&self, (x, y): (i64, i64)) -> Result<i64, ActorError> { Ok(x + y) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> troupe_core::Result<()> {
    /// let app = App::builder(MemoryBroker::new().into_dyn()).actor(Add).build()?;
    /// app.send(&Add, (1, 2)).await?;
    /// // ... a worker runs (here none does, so the wait times out)
    /// let waited = app.join("default", Duration::from_millis(50)).await;
    /// assert!(matches!(waited, Err(troupe_core::Error::QueueJoinTimeout(_))));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::QueueJoinTimeout`] when the queue is not drained within `timeout`,
    /// [`Error::MessageFailed`] for a dead letter, or the broker's error. A queue no one
    /// declared counts as empty on most brokers (the memory broker included), so joining a
    /// misspelt name returns at once; [`MemoryBroker::join`](crate::MemoryBroker::join) fails
    /// with [`Error::QueueNotFound`] instead.
    pub async fn join(&self, queue: &str, timeout: Duration) -> Result<()> {
        self.join_with(queue, timeout, JoinOptions::new()).await
    }

    /// [`join`](Self::join) with options.
    ///
    /// The queue's counts are polled ([`Broker::stats`]) with a short backoff (5 ms, growing
    /// to 100 ms). With `fail_fast`, only dead letters that appear while `join` waits count:
    /// those already there when it starts (a durable broker keeps the dead letters of earlier
    /// runs) do not, nor does a message dead-lettered before the first poll.
    ///
    /// # Errors
    /// As [`join`](Self::join).
    pub async fn join_with(&self, queue: &str, timeout: Duration, options: JoinOptions) -> Result<()> {
        let queue = q_name(queue);
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || Error::QueueJoinTimeout(queue.to_owned());
        // The fewest dead letters seen: more than that means one appeared while waiting
        // (the lowest count, since dead letters may expire or be requeued meanwhile).
        let mut known_dead: Option<u64> = None;
        let mut pause = JOIN_POLL_FIRST;
        loop {
            let stats = tokio::time::timeout_at(deadline, self.inner.broker.stats(queue))
                .await
                .map_err(|_| timed_out())??;
            if options.fail_fast {
                if let Some(known) = known_dead.filter(|known| stats.dead > *known)
                    && let Some(failure) = self.dead_letter_after(queue, known).await?
                {
                    return Err(failure);
                }
                known_dead = Some(known_dead.map_or(stats.dead, |known| known.min(stats.dead)));
            }
            if stats.pending() == 0 {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(timed_out());
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(JOIN_POLL_MAX);
        }
    }

    /// The dead letter of `queue` after the first `known` ones (oldest first), as
    /// [`Error::MessageFailed`]; `None` if there is none any more.
    async fn dead_letter_after(&self, queue: &str, known: u64) -> Result<Option<Error>> {
        let index = usize::try_from(known).unwrap_or(usize::MAX);
        let dead = self.inner.broker.dead_letters(queue, index.saturating_add(1)).await?;
        Ok(dead.get(index).or(dead.last()).map(|letter| {
            let (message_id, actor_name) = match &letter.message {
                Ok(m) => (m.message_id.clone(), m.actor_name.clone()),
                Err(_) => (letter.id.clone(), String::from("<undecodable>")),
            };
            Error::MessageFailed {
                message_id,
                actor_name,
                reason: letter.reason.clone(),
            }
        }))
    }
}

/// The first pause between two polls of [`App::join`]; it doubles up to [`JOIN_POLL_MAX`].
const JOIN_POLL_FIRST: Duration = Duration::from_millis(5);
/// The longest pause between two polls of [`App::join`].
const JOIN_POLL_MAX: Duration = Duration::from_millis(100);

/// How [`App::join_with`] waits.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct JoinOptions {
    fail_fast: bool,
}

impl Default for JoinOptions {
    fn default() -> Self {
        Self { fail_fast: true }
    }
}

impl JoinOptions {
    /// The defaults: fail fast.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a message dead-lettered while waiting ends the wait with
    /// [`Error::MessageFailed`] (default `true`). Without it, `join` waits for the drain
    /// whatever fails.
    #[must_use]
    pub fn fail_fast(mut self, on: bool) -> Self {
        self.fail_fast = on;
        self
    }
}

/// A change to the middleware list that places a middleware by another's type, made when the
/// app is built.
type Placement = Box<dyn FnOnce(&mut MiddlewareStack) -> Result<()> + Send + Sync>;

/// Builds an [`App`].
///
/// # Middleware
///
/// The list starts as [`middleware::defaults`](crate::middleware::defaults) (Dramatiq's,
/// outermost first, [`Retries`] last). [`middleware`](Self::middleware) appends (inside every
/// built-in one); [`middleware_before`](Self::middleware_before),
/// [`middleware_after`](Self::middleware_after), [`replace_middleware`](Self::replace_middleware)
/// and [`retries`](Self::retries) place one by another's type without rebuilding the list;
/// [`middleware_list`](Self::middleware_list) replaces the list. When the app is built,
/// `Results` (with a results backend) and [`CurrentMessage`] are appended, then the placements
/// are made in the order they were asked for, so they may name those two as well.
#[must_use]
pub struct AppBuilder {
    broker: Arc<dyn Broker>,
    middleware: MiddlewareStack,
    placements: Vec<Placement>,
    actors: Vec<Arc<dyn DynActor>>,
    results: Option<Arc<dyn ResultBackend>>,
    state: Option<Arc<dyn StateBackend>>,
    tracking: Option<TaskTracking>,
    cancellation: Option<Cancellation>,
    current_message: bool,
    results_middleware: bool,
}

impl fmt::Debug for AppBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppBuilder")
            .field("broker", &self.broker)
            .field("middleware", &self.middleware)
            .field("placements", &self.placements.len())
            .field("actors", &self.actors.len())
            .finish_non_exhaustive()
    }
}

impl AppBuilder {
    /// Registers an actor, so workers of this app run it.
    pub fn actor<A: Actor>(mut self, actor: A) -> Self {
        self.actors.push(Arc::new(Erased::new(actor)));
        self
    }

    /// Appends a middleware (it runs inside the ones before it, so inside [`Retries`]: its
    /// `process` sees every attempt).
    pub fn middleware(mut self, middleware: impl Middleware) -> Self {
        self.middleware.push(middleware);
        self
    }

    /// Appends an already shared middleware.
    pub fn middleware_arc(mut self, middleware: Arc<dyn Middleware>) -> Self {
        self.middleware.push_arc(middleware);
        self
    }

    /// Replaces the whole middleware list (the defaults included). Placements by type
    /// ([`middleware_before`](Self::middleware_before), ...) apply to the new list.
    pub fn middleware_list(mut self, middleware: Vec<Arc<dyn Middleware>>) -> Self {
        self.middleware = MiddlewareStack::from(middleware);
        self
    }

    /// Puts `middleware` just before (outside) the first middleware of type `T`, when the app
    /// is built. Outside [`Retries`], a middleware's `process` sees each attempt once Retries
    /// handled it: `cx.is_failed()` is then true only for the final failure.
    ///
    /// ```
    /// # use troupe_core::{App, MemoryBroker, Middleware, middleware::Retries};
    /// # #[derive(Debug)] struct Audit;
    /// # impl Middleware for Audit {}
    /// let app = App::builder(MemoryBroker::new().into_dyn())
    ///     .middleware_before::<Retries>(Audit)
    ///     .build()?;
    /// let names: Vec<String> = app.middleware().iter().map(|m| format!("{m:?}")).collect();
    /// assert!(names[names.len() - 3].starts_with("Audit"), "{names:?}");
    /// # Ok::<(), troupe_core::Error>(())
    /// ```
    ///
    /// [`build`](Self::build) fails with [`Error::Config`] when the list has no `T`.
    pub fn middleware_before<T: Middleware>(self, middleware: impl Middleware) -> Self {
        self.place(move |stack| stack.insert_before::<T>(middleware))
    }

    /// Puts `middleware` just after (inside) the first middleware of type `T`, when the app is
    /// built. [`build`](Self::build) fails with [`Error::Config`] when the list has no `T`.
    pub fn middleware_after<T: Middleware>(self, middleware: impl Middleware) -> Self {
        self.place(move |stack| stack.insert_after::<T>(middleware))
    }

    /// Replaces the first middleware of type `T` with `middleware`, in its place, when the app
    /// is built. [`build`](Self::build) fails with [`Error::Config`] when the list has no `T`.
    pub fn replace_middleware<T: Middleware>(self, middleware: impl Middleware) -> Self {
        self.place(move |stack| stack.replace::<T>(middleware).map(drop))
    }

    /// Uses `retries` as the [`Retries`] middleware, in the default's place: how to change the
    /// retry defaults (`max_retries`, `min_backoff`, `max_backoff`, `retry_when`) without
    /// rebuilding the list. [`build`](Self::build) fails with [`Error::Config`] when the list
    /// has no `Retries`.
    pub fn retries(self, retries: Retries) -> Self {
        self.replace_middleware::<Retries>(retries)
    }

    fn place(mut self, placement: impl FnOnce(&mut MiddlewareStack) -> Result<()> + Send + Sync + 'static) -> Self {
        self.placements.push(Box::new(placement));
        self
    }

    /// Stores results in `backend` (adds the [`Results`] middleware).
    pub fn results(mut self, backend: Arc<dyn ResultBackend>) -> Self {
        self.results = Some(backend);
        self
    }

    /// Stores results with a configured [`Results`] middleware (other defaults or TTL).
    pub fn results_middleware(mut self, results: Results) -> Self {
        self.results = Some(Arc::clone(&results.backend));
        self.middleware.push(results);
        self.results_middleware = true;
        self
    }

    /// Shares a state backend with the app's actors ([`App::state`]); task states
    /// ([`track_tasks`](Self::track_tasks)), cancellation requests and unique keys are kept in
    /// it. With a backend that keeps task states (memory, SQLite, Redis, PostgreSQL), workers
    /// honour cancellations ([`App::cancel`]) unless [`cancellation`](Self::cancellation) turns
    /// them off.
    pub fn state(mut self, backend: Arc<dyn StateBackend>) -> Self {
        self.state = Some(backend);
        self
    }

    /// Records every message's state in the state backend, from the moment it is sent:
    /// enqueued, delayed, running, retrying, succeeded, failed, skipped, cancelled (see
    /// [`App::task`], [`App::tasks`], [`App::task_counts`]). Needs [`state`](Self::state).
    ///
    /// ```
    /// # use troupe_core::{App, MemoryBroker, MemoryState, middleware::TaskTracking};
    /// # use std::sync::Arc;
    /// let app = App::builder(MemoryBroker::new().into_dyn())
    ///     .state(Arc::new(MemoryState::new()))
    ///     .track_tasks(TaskTracking::default()) // kept 7 days, arguments not kept
    ///     .build()?;
    /// # Ok::<(), troupe_core::Error>(())
    /// ```
    pub fn track_tasks(mut self, tracking: TaskTracking) -> Self {
        self.tracking = Some(tracking);
        self
    }

    /// Sets how workers honour cancellations (on by default with a state backend that keeps
    /// task states; [`Cancellation::off`] saves the read per message).
    pub fn cancellation(mut self, cancellation: Cancellation) -> Self {
        self.cancellation = Some(cancellation);
        self
    }

    /// Whether to add the [`CurrentMessage`] middleware (on by default).
    pub fn current_message(mut self, on: bool) -> Self {
        self.current_message = on;
        self
    }

    /// Checks the actors and builds the app.
    ///
    /// # Errors
    /// [`Error::Config`] for two actors with one name, an invalid queue name, an actor option
    /// that neither the app nor one of its middleware reads (see [`troupe_options`]), or a
    /// middleware placed by a type the list does not have.
    pub fn build(mut self) -> Result<App> {
        let keeps_tasks = self.state.as_ref().is_some_and(|s| s.tasks().is_some());
        if self.tracking.is_some() && !keeps_tasks {
            return Err(Error::Config(match &self.state {
                None => "track_tasks needs a state backend: add AppBuilder::state(..) with the memory, SQLite, Redis \
                         or PostgreSQL state backend"
                    .into(),
                Some(state) => format!(
                    "track_tasks needs a state backend that keeps task states, and {state:?} does not: use the \
                     memory, SQLite, Redis or PostgreSQL state backend"
                ),
            }));
        }
        let cancellation = self.cancellation.take().unwrap_or_default();
        let lifecycle = match &self.state {
            Some(state) if keeps_tasks && (self.tracking.is_some() || cancellation.enabled) => Some(Arc::new(
                TaskLifecycle::new(self.tracking.take(), cancellation).on_backend(Arc::clone(state)),
            )),
            _ => None,
        };
        // Group callbacks act on a child's final outcome, so outside Retries; the lifecycle
        // (pushed after, so outermost) records the state after them.
        if self.state.is_some() && !self.middleware.contains::<GroupCallbacks>() {
            self.middleware
                .push_front_arc(Arc::new(GroupCallbacks::default()) as Arc<dyn Middleware>);
        }
        if let Some(lifecycle) = &lifecycle {
            self.middleware
                .push_front_arc(Arc::clone(lifecycle) as Arc<dyn Middleware>);
        }
        if let Some(backend) = self.results.as_ref().filter(|_| !self.results_middleware) {
            self.middleware.push(Results::new(Arc::clone(backend)));
        }
        if self.current_message {
            self.middleware.push(CurrentMessage);
        }
        for placement in self.placements {
            placement(&mut self.middleware)?;
        }
        let known: HashSet<&str> = self
            .middleware
            .iter()
            .flat_map(|m| (**m).actor_options().iter().copied())
            .chain(troupe_options::app_options())
            .collect();
        let mut actors = HashMap::new();
        for actor in self.actors {
            let name = actor.name().to_owned();
            let options = actor.options();
            validate_queue_name(&options.queue_name).map_err(|e| Error::Config(format!("actor {name:?}: {e}")))?;
            check_options(&name, options, &known)?;
            if actors.insert(name.clone(), actor).is_some() {
                return Err(Error::Config(format!(
                    "two actors are named {name:?}; actor names must be unique"
                )));
            }
        }
        Ok(App {
            inner: Arc::new(Inner {
                broker: self.broker,
                middleware: self.middleware.into_vec(),
                actors,
                results: self.results,
                state: self.state,
                lifecycle,
                declared: Mutex::new(HashSet::new()),
            }),
        })
    }
}

/// Checks `actor`'s options against the options table and the options `known` to the app (its
/// own and its middleware's).
fn check_options(actor: &str, options: &crate::ActorOptions, known: &HashSet<&str>) -> Result<()> {
    if let Some(key) = options.extra.keys().find(|k| troupe_options::find(k).is_some()) {
        return Err(Error::Config(format!(
            "actor {actor:?} sets {key:?} as an extra option, but it is a built-in actor option: set it with \
             its own ActorOptions method"
        )));
    }
    crate::periodic::Periodic::of(actor, options)?;
    let Some(unknown) = options.option_names().into_iter().find(|k| !known.contains(k)) else {
        return Ok(());
    };
    if let Some(troupe_options::Reader::Middleware(reader)) = troupe_options::find(unknown).map(|o| o.reader) {
        return Err(Error::Config(format!(
            "actor {actor:?} has option {unknown:?}, which the {reader} middleware reads, and this app has no \
             {reader} middleware"
        )));
    }
    let mut valid: Vec<&str> = known.iter().copied().collect();
    valid.sort_unstable();
    Err(Error::Config(format!(
        "actor {actor:?} has option {unknown:?}, which no middleware of this app reads; valid options: {}",
        valid.join(", ")
    )))
}

/// A unique key taken by [`App::claim_unique`], freed again when the enqueue fails.
#[derive(Debug, Default)]
struct Claimed {
    key: Option<String>,
    message_id: String,
    /// The id of the message that holds the key already.
    duplicate_of: Option<String>,
}

impl Claimed {
    async fn release(&self, app: &App) {
        if let (Some(key), Ok(store)) = (&self.key, app.task_store())
            && let Err(e) = store.release_unique(key, &self.message_id).await
        {
            tracing::warn!(error = %e, "could not free a unique key after a failed enqueue; it frees itself when unique_for passes");
        }
    }
}

/// Per-message options for `send_with_options`.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct SendOptions {
    /// Enqueue after this delay.
    pub delay: Option<Duration>,
    /// Options to set on the message (any key; Dramatiq's keys have their meaning).
    pub options: Map<String, Value>,
}

impl SendOptions {
    /// No options.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Delays the message.
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Dramatiq's own RabbitMQ priority option (`broker_priority`): the AMQP priority itself,
    /// higher first, on a queue declared with `max_priority`; other brokers ignore it. Prefer
    /// [`priority`](Self::priority), which every broker honours; this one is for Python
    /// interop, and when set it wins over `priority`'s mapping on RabbitMQ.
    #[must_use]
    pub fn broker_priority(self, priority: u8) -> Self {
        self.option(option_keys::BROKER_PRIORITY, priority)
    }

    /// This message's priority: lower runs first (Dramatiq's direction), in -10..=10 (clamped),
    /// instead of its actor's. Every broker honours it (see [`crate::priority`]); it travels as
    /// the `troupe_priority` option, which a message at priority 0 does not carry (unless it
    /// overrides a non-zero actor priority).
    #[must_use]
    pub fn priority(self, priority: i32) -> Self {
        self.option(crate::priority::OPTION, crate::priority::clamp(i64::from(priority)))
    }

    /// Sets `max_retries` for this message (0: no retry).
    #[must_use]
    pub fn max_retries(self, max_retries: u64) -> Self {
        self.option(option_keys::MAX_RETRIES, max_retries)
    }

    /// Sets `min_backoff` for this message (zero: retry at once).
    #[must_use]
    pub fn min_backoff(self, min_backoff: Duration) -> Self {
        self.option(option_keys::MIN_BACKOFF, duration_ms(min_backoff))
    }

    /// Sets `max_backoff` for this message (zero: retry at once).
    #[must_use]
    pub fn max_backoff(self, max_backoff: Duration) -> Self {
        self.option(option_keys::MAX_BACKOFF, duration_ms(max_backoff))
    }

    /// Sets `time_limit` for this message (zero: no limit).
    #[must_use]
    pub fn time_limit(self, time_limit: Duration) -> Self {
        self.option(option_keys::TIME_LIMIT, duration_ms(time_limit))
    }

    /// Sets a soft time limit for this message: its actor is told to wrap up when it passes
    /// (its task handle stops with `SoftTimeLimit`), before the hard `time_limit`.
    #[must_use]
    pub fn soft_time_limit(self, limit: Duration) -> Self {
        self.option(option_keys::SOFT_TIME_LIMIT, duration_ms(limit))
    }

    /// Makes this message unique for `unique_for`: while a message with the same actor and
    /// arguments (or the same [`unique_key`](Self::unique_key)) is pending or running, sending
    /// this one returns that message's id instead of enqueueing it. Needs a state backend
    /// that keeps task states.
    #[must_use]
    pub fn unique_for(self, unique_for: Duration) -> Self {
        self.option(option_keys::UNIQUE_FOR, duration_ms(unique_for))
    }

    /// Uses `key` as this message's unique key instead of its actor and arguments (with
    /// `unique_for` here or on the actor).
    #[must_use]
    pub fn unique_key(self, key: impl Into<String>) -> Self {
        self.option(option_keys::UNIQUE_KEY, key.into())
    }

    /// Sets `max_age` for this message (zero: no limit).
    #[must_use]
    pub fn max_age(self, max_age: Duration) -> Self {
        self.option(option_keys::MAX_AGE, duration_ms(max_age))
    }

    /// Sets `store_results` for this message.
    #[must_use]
    pub fn store_results(self, store_results: bool) -> Self {
        self.option(option_keys::STORE_RESULTS, store_results)
    }

    /// Sets `result_ttl` for this message.
    #[must_use]
    pub fn result_ttl(self, result_ttl: Duration) -> Self {
        self.option(option_keys::RESULT_TTL, duration_ms(result_ttl))
    }

    /// Sets the `on_success` callback actor for this message.
    #[must_use]
    pub fn on_success(self, actor_name: impl Into<String>) -> Self {
        self.option(option_keys::ON_SUCCESS, actor_name.into())
    }

    /// Sets the `on_failure` callback actor for this message.
    #[must_use]
    pub fn on_failure(self, actor_name: impl Into<String>) -> Self {
        self.option(option_keys::ON_FAILURE, actor_name.into())
    }

    /// Sets the `on_retry_exhausted` callback actor for this message.
    #[must_use]
    pub fn on_retry_exhausted(self, actor_name: impl Into<String>) -> Self {
        self.option(option_keys::ON_RETRY_EXHAUSTED, actor_name.into())
    }

    /// Sets `notify_shutdown` for this message.
    #[must_use]
    pub fn notify_shutdown(self, notify_shutdown: bool) -> Self {
        self.option(option_keys::NOTIFY_SHUTDOWN, notify_shutdown)
    }

    /// Sets any message option (see [`option_keys`] for Dramatiq's and Troupe's keys).
    #[must_use]
    pub fn option(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }

    /// Applies the options to `message`, returning the delay.
    pub(crate) fn apply(self, message: &mut Message) -> Option<Duration> {
        for (k, v) in self.options {
            // Priority 0 over an actor at 0 is no option at all: Dramatiq's exact bytes.
            if k == crate::priority::OPTION && crate::priority::of_value(&v) == 0 && !message.has_priority() {
                continue;
            }
            message.options.insert(k, v);
        }
        self.delay
    }
}

/// A sent message, typed by its actor's output so its result can be fetched.
pub struct Sent<O> {
    message: Message,
    /// The results backend of the app that sent it, so the result can be fetched without
    /// being handed the app again.
    results: Option<Arc<dyn ResultBackend>>,
    _output: PhantomData<fn() -> O>,
}

impl<O> Clone for Sent<O> {
    fn clone(&self) -> Self {
        Self {
            message: self.message.clone(),
            results: self.results.clone(),
            _output: PhantomData,
        }
    }
}

impl<O> fmt::Debug for Sent<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Sent").field(&self.message).finish()
    }
}

impl<O> Sent<O> {
    /// Wraps an enqueued message (with no results backend: fetch its result through an app,
    /// [`get_result`](Self::get_result)).
    #[must_use]
    pub fn new(message: Message) -> Self {
        Self {
            message,
            results: None,
            _output: PhantomData,
        }
    }

    /// Wraps a message `app` enqueued, keeping the app's results backend.
    #[must_use]
    pub fn from_app(app: &App, message: Message) -> Self {
        Self {
            message,
            results: app.results().cloned(),
            _output: PhantomData,
        }
    }

    /// The message as enqueued.
    #[must_use]
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Its id.
    #[must_use]
    pub fn message_id(&self) -> &str {
        &self.message.message_id
    }

    /// The message, untyped.
    #[must_use]
    pub fn into_message(self) -> Message {
        self.message
    }
}

impl<O: DeserializeOwned> Sent<O> {
    /// The result, if stored yet ([`Error::ResultMissing`] if not), from the results backend
    /// of the app that sent the message.
    ///
    /// # Errors
    /// As [`get_result`](Self::get_result).
    pub async fn result(&self) -> Result<O> {
        self.fetch(None).await
    }

    /// Waits up to `timeout` for the result, in the results backend of the app that sent the
    /// message.
    ///
    /// # Errors
    /// As [`wait_result`](Self::wait_result).
    pub async fn wait(&self, timeout: Duration) -> Result<O> {
        self.fetch(Some(timeout)).await
    }

    async fn fetch(&self, timeout: Option<Duration>) -> Result<O> {
        let backend = self.results.as_ref().ok_or(Error::NoResultBackend)?;
        decode_result(unwrap_result(backend.get(&self.message, timeout).await?)?)
    }

    /// The result, if stored yet ([`Error::ResultMissing`] if not), from `app`'s results
    /// backend.
    ///
    /// # Errors
    /// See [`App::get_result`]; also [`Error::Decode`] when the stored value is not an `O`.
    pub async fn get_result(&self, app: &App) -> Result<O> {
        decode_result(app.get_result(&self.message, None).await?)
    }

    /// Waits up to `timeout` for the result in `app`'s results backend.
    ///
    /// # Errors
    /// See [`App::get_result`]; also [`Error::Decode`] when the stored value is not an `O`.
    pub async fn wait_result(&self, app: &App, timeout: Duration) -> Result<O> {
        decode_result(app.get_result(&self.message, Some(timeout)).await?)
    }
}

fn decode_result<O: DeserializeOwned>(value: Value) -> Result<O> {
    serde_json::from_value(value).map_err(|e| Error::Decode(format!("stored result has another type: {e}")))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{ConsumerOptions, MemoryBroker};

    fn message(queue: &str, n: i64) -> Message {
        Message::new(queue, "work", vec![json!(n)], Map::new())
    }

    /// Takes one delivery of `queue` and acks it, or nacks it when its argument is negative.
    async fn settle_one(broker: &MemoryBroker, queue: &str) -> String {
        let mut consumer = broker.consume(queue, ConsumerOptions::new(1)).await.unwrap();
        let delivery = loop {
            if let Some(d) = consumer.fetch(1, Duration::from_millis(50)).await.unwrap().pop() {
                break d;
            }
        };
        let m = delivery.message().unwrap().clone();
        if m.args[0].as_i64().unwrap() < 0 {
            delivery.nack(Some(&m), "negative").await.unwrap();
        } else {
            delivery.ack().await.unwrap();
        }
        m.message_id
    }

    struct Double;

    impl Actor for Double {
        type Args = (i64,);
        type Output = i64;

        fn name(&self) -> &str {
            "double"
        }

        async fn call(&self, (x,): (i64,)) -> std::result::Result<i64, crate::ActorError> {
            Ok(2 * x)
        }
    }

    // Paused clock: the "later" writes happen after the wait began, in virtual time, not
    // after a real sleep that a loaded machine could outrun.
    #[tokio::test(start_paused = true)]
    async fn a_sent_message_fetches_its_result_without_the_app() {
        let results = crate::MemoryResults::new();
        let app = App::builder(MemoryBroker::new().into_dyn())
            .results(results.clone().into_dyn())
            .actor(Double)
            .build()
            .unwrap();
        let sent = app.send(&Double, (21,)).await.unwrap();
        assert!(matches!(sent.result().await, Err(Error::ResultMissing(_))));
        let store = {
            let results = results.clone();
            let message = sent.message().clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                results.store(&message, json!(42), Duration::from_secs(60)).await
            })
        };
        assert_eq!(sent.wait(Duration::from_secs(5)).await.unwrap(), 42);
        store.await.unwrap().unwrap();
        assert_eq!(sent.result().await.unwrap(), 42);
        assert_eq!(sent.clone().result().await.unwrap(), 42, "clones keep the backend");

        let by_name = app.send_to("double", vec![json!(1)]).await.unwrap();
        results
            .store(by_name.message(), json!(2), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(by_name.result().await.unwrap(), json!(2));

        let bare: Sent<i64> = Sent::new(sent.message().clone());
        assert!(matches!(bare.result().await, Err(Error::NoResultBackend)));
        assert_eq!(
            bare.get_result(&app).await.unwrap(),
            42,
            "an app's backend still serves"
        );
    }

    /// An actor with the given options.
    struct Configured(crate::ActorOptions);

    impl Actor for Configured {
        type Args = ();
        type Output = ();

        fn name(&self) -> &str {
            "configured"
        }

        fn options(&self) -> crate::ActorOptions {
            self.0.clone()
        }

        async fn call(&self, (): ()) -> std::result::Result<(), crate::ActorError> {
            Ok(())
        }
    }

    fn build_with(options: crate::ActorOptions, middleware: Vec<Arc<dyn Middleware>>) -> Result<App> {
        App::builder(MemoryBroker::new().into_dyn())
            .middleware_list(middleware)
            .actor(Configured(options))
            .build()
    }

    #[test]
    fn build_checks_actor_options_against_the_table() {
        use crate::middleware::{TimeLimit, defaults};
        let retries = crate::ActorOptions::new().max_retries(3).queue_name("q").priority(2);
        build_with(retries.clone(), defaults().into_vec()).unwrap();

        // Without its reader, an option is an error naming the middleware.
        let mut no_retries = defaults();
        no_retries.remove::<Retries>();
        let err = build_with(retries, no_retries.into_vec()).unwrap_err().to_string();
        assert!(
            err.contains("\"max_retries\", which the Retries middleware reads, and this app has no Retries"),
            "{err}"
        );
        // The app's own options need no middleware at all.
        build_with(crate::ActorOptions::new().queue_name("q").priority(-3), Vec::new()).unwrap();
        let err = build_with(crate::ActorOptions::new().time_limit(Duration::ZERO), Vec::new()).unwrap_err();
        assert!(err.to_string().contains("TimeLimit middleware"), "{err}");
        build_with(
            crate::ActorOptions::new().time_limit(Duration::ZERO),
            vec![Arc::new(TimeLimit::default())],
        )
        .unwrap();

        // An extra option no middleware declares, and a built-in one passed as extra.
        let err = build_with(crate::ActorOptions::new().extra("rate", 1), defaults().into_vec()).unwrap_err();
        assert!(
            err.to_string()
                .contains("which no middleware of this app reads; valid options: "),
            "{err}"
        );
        assert!(err.to_string().contains("max_retries"), "{err}");
        let err = build_with(
            crate::ActorOptions::new().extra("max_retries", 1),
            defaults().into_vec(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("is a built-in actor option"), "{err}");
    }

    /// Records nothing; a marker to place in the list.
    #[derive(Debug)]
    struct Marker(#[allow(dead_code)] &'static str); // read through Debug

    impl Middleware for Marker {}

    fn middleware_names(app: &App) -> Vec<String> {
        app.middleware()
            .iter()
            .map(|m| {
                let text = format!("{m:?}");
                if text.starts_with("Marker") {
                    text
                } else {
                    text.split([' ', '(']).next().unwrap_or_default().to_owned()
                }
            })
            .collect()
    }

    #[test]
    fn the_builder_places_middleware_by_type() {
        use crate::middleware::{Retries, TimeLimit};
        let app = App::builder(MemoryBroker::new().into_dyn())
            .results(crate::MemoryResults::new().into_dyn())
            .middleware(Marker("appended"))
            .middleware_before::<Retries>(Marker("outside retries"))
            .middleware_after::<Retries>(Marker("inside retries"))
            .middleware_after::<Results>(Marker("after results"))
            .middleware_before::<CurrentMessage>(Marker("before current"))
            .retries(
                Retries::default()
                    .max_retries(Some(2))
                    .min_backoff(Duration::from_millis(1)),
            )
            .replace_middleware::<TimeLimit>(TimeLimit::new(Duration::from_secs(1)))
            .build()
            .unwrap();
        assert_eq!(
            middleware_names(&app),
            [
                "AgeLimit",
                "TimeLimit",
                "ShutdownNotifications",
                "Callbacks",
                "Pipelines",
                "Marker(\"outside retries\")",
                "Retries",
                "Marker(\"inside retries\")",
                "Marker(\"appended\")",
                "Results",
                "Marker(\"after results\")",
                "Marker(\"before current\")",
                "CurrentMessage",
            ]
        );
        let retries = format!("{:?}", app.middleware()[6]);
        assert!(
            retries.contains("max_retries: Some(2)") && retries.contains("min_backoff: 1ms"),
            "{retries}"
        );
        assert!(format!("{:?}", app.middleware()[1]).contains("time_limit: 1s"));

        // Placements apply to a replaced list, and one without its anchor fails the build.
        let err = App::builder(MemoryBroker::new().into_dyn())
            .retries(Retries::default())
            .middleware_list(Vec::new())
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        assert!(err.to_string().contains("cannot replace Retries"), "{err}");
        let err = App::builder(MemoryBroker::new().into_dyn())
            .middleware_after::<Results>(Marker("x"))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("after Results"), "{err}");
    }

    #[tokio::test]
    async fn current_app_outside_an_actor_is_an_error() {
        let e = crate::current_app().unwrap_err();
        assert!(matches!(e, Error::NoCurrentApp), "{e}");
        assert!(e.to_string().contains("outside an actor"), "{e}");
    }

    // Paused clock: the "later" writes happen after the wait began, in virtual time, not
    // after a real sleep that a loaded machine could outrun.
    #[tokio::test(start_paused = true)]
    async fn join_waits_for_the_drain_and_times_out() {
        let broker = MemoryBroker::new();
        let app = App::builder(broker.clone().into_dyn()).build().unwrap();
        for n in 0..3 {
            app.enqueue(message("j", n), None).await.unwrap();
        }
        let err = app.join("j", Duration::from_millis(30)).await.unwrap_err();
        assert!(matches!(err, Error::QueueJoinTimeout(ref q) if q == "j"), "{err}");
        let worker = broker.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                settle_one(&worker, "j").await;
            }
        });
        app.join("j", Duration::from_secs(5)).await.unwrap();
        assert_eq!(broker.stats("j").await.unwrap().pending(), 0);
    }

    // Paused clock: the "later" writes happen after the wait began, in virtual time, not
    // after a real sleep that a loaded machine could outrun.
    #[tokio::test(start_paused = true)]
    async fn join_fails_fast_on_a_new_dead_letter_only() {
        let broker = MemoryBroker::new();
        let app = App::builder(broker.clone().into_dyn()).build().unwrap();
        // A dead letter from before the join does not count.
        app.enqueue(message("f", -1), None).await.unwrap();
        settle_one(&broker, "f").await;
        app.join("f", Duration::from_secs(1)).await.unwrap();

        // One that appears while join waits ends it at once, other messages still pending.
        app.enqueue(message("f", -2), None).await.unwrap();
        app.enqueue(message("f", 1), None).await.unwrap();
        let worker = broker.clone();
        let failed = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            settle_one(&worker, "f").await
        });
        let err = app.join("f", Duration::from_secs(5)).await.unwrap_err();
        let failed_id = failed.await.unwrap();
        match err {
            Error::MessageFailed {
                message_id,
                actor_name,
                reason,
            } => {
                assert_eq!(message_id, failed_id);
                assert_eq!(actor_name, "work");
                assert_eq!(reason, "negative");
            }
            other => panic!("expected MessageFailed, got {other}"),
        }
        assert_eq!(broker.stats("f").await.unwrap().ready, 1, "returned before the drain");

        // Without fail_fast it waits for the drain through failures.
        app.enqueue(message("f", -3), None).await.unwrap();
        let worker = broker.clone();
        tokio::spawn(async move {
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                settle_one(&worker, "f").await;
            }
        });
        app.join_with("f", Duration::from_secs(5), JoinOptions::new().fail_fast(false))
            .await
            .unwrap();
        assert_eq!(broker.stats("f").await.unwrap().dead, 3);
    }
}
