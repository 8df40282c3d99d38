//! Middleware: code that runs around enqueueing and processing every message.
//!
//! A middleware implements only the hooks it needs; every hook is a no-op by default. Processing
//! has one around-hook, [`Middleware::process`]: code before `next.run(cx).await` runs before the
//! actor, code after it runs after, and the list order makes an onion, so after-code runs in the
//! reverse order of before-code, exactly as Dramatiq's `emit_after`.
//!
//! The defaults ([`defaults`]), in Dramatiq's order: [`AgeLimit`], [`TimeLimit`],
//! [`ShutdownNotifications`], [`Callbacks`], [`Pipelines`], [`Retries`]. [`Results`] and
//! [`CurrentMessage`] are added by the app when configured.
//!
//! # Order
//!
//! The list runs outermost first: a middleware sees what every one after it did. One placed
//! before [`Retries`] (outside it) sees each attempt's outcome after Retries handled it, and
//! `cx.is_failed()` then tells a final failure (dead-lettered) from one that will be retried;
//! one placed after it (inside) sees every attempt's raw outcome, before Retries decides.
//! [`MiddlewareStack`] places a middleware relative to another by type, and the app builder
//! does the same without rebuilding the list (`AppBuilder::middleware_before::<Retries>(m)`,
//! `middleware_after`, `replace_middleware`, and `retries(Retries::default()...)` for the
//! retry defaults).

mod age_limit;
mod callbacks;
pub(crate) mod current_message;
mod group_callbacks;
mod lifecycle;
mod pipelines;
mod results;
mod retries;
mod shutdown;
mod stack;
mod task_handle;
mod time_limit;

use std::any::TypeId;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use age_limit::AgeLimit;
pub use callbacks::Callbacks;
pub use current_message::{CurrentMessage, current_app, current_message, current_task};
pub use group_callbacks::GroupCallbacks;
pub use lifecycle::{Cancellation, TaskLifecycle, TaskTracking, worker_id};
pub use pipelines::Pipelines;
pub use results::Results;
pub use retries::{MAX_BACKOFF_CAP, Retries, compute_backoff};
pub use shutdown::ShutdownNotifications;
pub use stack::MiddlewareStack;
pub use task_handle::{StopReason, TaskHandle};
pub use time_limit::TimeLimit;

use crate::actor::{ActorError, DynActor, ErrorAction};
use crate::app::App;
use crate::error::Result;
use crate::message::Message;

/// What processing a message came to.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// The actor returned this value.
    Success(Value),
    /// The actor (or a middleware) failed.
    Failure(ActorError),
    /// The message was skipped: not run, or the actor asked to skip it.
    Skipped,
}

impl Outcome {
    /// Whether it succeeded.
    #[must_use]
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Success(_))
    }

    /// The error, if it failed.
    #[must_use]
    pub fn error(&self) -> Option<&ActorError> {
        match self {
            Self::Failure(e) => Some(e),
            _ => None,
        }
    }
}

/// Everything middleware can see and change while a message is processed.
#[derive(Debug)]
pub struct ProcessContext {
    /// Shared with the actor's task-local (`current_message`) while it runs, instead of
    /// copied: [`message_mut`](Self::message_mut) copies it only if the actor still holds it.
    message: Arc<Message>,
    app: App,
    actor: Option<Arc<dyn DynActor>>,
    failed: Option<String>,
    requeue: bool,
    time_limit: Option<Duration>,
    soft_time_limit: Option<Duration>,
    cancel: Option<CancellationToken>,
    abort: Option<(CancellationToken, Duration)>,
    task: TaskHandle,
    cancelled: bool,
    before_settle: BeforeSettle,
}

/// How long an enqueue that a processed message's waiters need (a pipeline's next stage, a
/// callback) retries transient errors before the message is returned to its queue instead.
const FOLLOW_UP_RETRY_FOR: Duration = Duration::from_secs(30);

/// Runs an enqueue the message's waiters need (a pipeline's next stage, a callback) while the
/// message is processed: transient errors are retried with backoff for up to 30 s; if it still
/// fails on one, the message is returned to its queue (its actor runs again) rather than acked
/// with the follow-up lost. Other errors (a malformed target) are logged: retrying cannot help.
pub(crate) async fn follow_up<T, F, Fut>(cx: &mut ProcessContext, what: &str, op: F)
where
    F: Fn(App) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    match retry_follow_up(cx, what, op).await {
        Ok(_) => {}
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "could not {what}; the message goes back to its queue to run again");
            cx.requeue();
        }
        Err(e) => tracing::error!(error = %e, "could not {what}"),
    }
}

/// Runs an enqueue a processed message needs (a follow-up, a retry), retrying transient errors
/// with backoff for up to 30 s; returns its last outcome.
pub(crate) async fn retry_follow_up<T, F, Fut>(cx: &ProcessContext, what: &str, op: F) -> Result<T>
where
    F: Fn(App) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let app = cx.app().clone();
    let backoff = (Duration::from_millis(100), Duration::from_secs(5));
    crate::support::retry_transient(what, backoff, Some(FOLLOW_UP_RETRY_FOR), None, || op(app.clone())).await
}

/// Writes the worker awaits before it settles a message (see
/// [`ProcessContext::before_settle`]).
/// (A mutex only so that the context is `Sync`: it is only reached through `&mut`.)
#[derive(Default)]
struct BeforeSettle(std::sync::Mutex<Vec<BoxFuture<'static, Result<()>>>>);

impl BeforeSettle {
    fn writes(&mut self) -> &mut Vec<BoxFuture<'static, Result<()>>> {
        self.0.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl fmt::Debug for BeforeSettle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BeforeSettle").finish_non_exhaustive()
    }
}

impl ProcessContext {
    /// A context for `message`, run by `actor` (none when no actor has that name).
    #[must_use]
    pub fn new(app: App, message: Message, actor: Option<Arc<dyn DynActor>>) -> Self {
        let task = TaskHandle::new(message.message_id.clone(), Some(app.clone()));
        Self {
            message: Arc::new(message),
            app,
            actor,
            failed: None,
            requeue: false,
            time_limit: None,
            soft_time_limit: None,
            cancel: None,
            abort: None,
            task,
            cancelled: false,
            before_settle: BeforeSettle::default(),
        }
    }

    /// Adds a write the worker awaits after the chain returns and before it acks or nacks the
    /// message (a state the user waits on, stored without holding an executor: the executor
    /// takes its next message meanwhile, and writes of many messages go in one batch). When
    /// one fails on a transient error, the message is returned to its queue instead; on any
    /// other error it is dead-lettered with the error as its reason. The write runs after every
    /// `process` hook returned, so it must own what it needs.
    pub fn before_settle(&mut self, write: impl Future<Output = Result<()>> + Send + 'static) {
        self.before_settle.writes().push(Box::pin(write));
    }

    /// Takes the writes added with [`before_settle`](Self::before_settle); the worker calls it
    /// and awaits them before settling.
    pub fn take_before_settle(&mut self) -> Vec<BoxFuture<'static, Result<()>>> {
        std::mem::take(self.before_settle.writes())
    }

    /// The message being processed.
    #[must_use]
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message, to change (Retries sets `retries` and `traceback`).
    pub fn message_mut(&mut self) -> &mut Message {
        Arc::make_mut(&mut self.message)
    }

    /// Takes the message out of the context.
    #[must_use]
    pub fn into_message(self) -> Message {
        Arc::unwrap_or_clone(self.message)
    }

    /// The message, shared (what [`CurrentMessage`] gives the actor).
    pub(crate) fn shared_message(&self) -> Arc<Message> {
        Arc::clone(&self.message)
    }

    /// The app (broker, results, actors).
    #[must_use]
    pub fn app(&self) -> &App {
        &self.app
    }

    /// The actor, when one is registered under the message's name.
    #[must_use]
    pub fn actor(&self) -> Option<&Arc<dyn DynActor>> {
        self.actor.as_ref()
    }

    /// Marks the message failed: it will be dead-lettered (nacked) with `reason` instead of acked.
    pub fn fail(&mut self, reason: impl Into<String>) {
        self.failed = Some(reason.into());
    }

    /// Whether the message was marked failed.
    #[must_use]
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Why it was marked failed.
    #[must_use]
    pub fn failure_reason(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Asks the worker to return the message to its queue instead of acking it (when a retry
    /// could not be enqueued, so nothing is lost).
    pub fn requeue(&mut self) {
        self.requeue = true;
    }

    /// Whether the message will be returned to its queue instead of acked.
    #[must_use]
    pub fn wants_requeue(&self) -> bool {
        self.requeue
    }

    /// Limits how long the actor may run; the tightest limit set wins.
    pub fn limit_time(&mut self, limit: Duration) {
        self.time_limit = Some(self.time_limit.map_or(limit, |l| l.min(limit)));
    }

    /// The time limit the actor will run under.
    #[must_use]
    pub fn time_limit(&self) -> Option<Duration> {
        self.time_limit
    }

    /// Cancels the actor when `token` is cancelled (the actor fails with `Shutdown`).
    pub fn cancel_on(&mut self, token: CancellationToken) {
        self.cancel = Some(token);
    }

    /// Tells the actor (through its [`TaskHandle`]) when `limit` passes, before the hard time
    /// limit; the tightest soft limit set wins.
    pub fn limit_soft_time(&mut self, limit: Duration) {
        self.soft_time_limit = Some(self.soft_time_limit.map_or(limit, |l| l.min(limit)));
    }

    /// The soft time limit the actor will run under.
    #[must_use]
    pub fn soft_time_limit(&self) -> Option<Duration> {
        self.soft_time_limit
    }

    /// Aborts the actor when `token` is cancelled: it is told at once (its [`TaskHandle`] stops
    /// with [`StopReason::Cancelled`]), given `grace` to return, then dropped (a blocking actor
    /// is abandoned); the message is skipped and [`was_cancelled`](Self::was_cancelled) is set.
    pub fn abort_on(&mut self, token: CancellationToken, grace: Duration) {
        self.abort = Some((token, grace));
    }

    /// Marks the message cancelled: it is skipped (acked without running, or with its outcome
    /// discarded).
    pub fn mark_cancelled(&mut self) {
        self.cancelled = true;
    }

    /// Whether the message was cancelled (before or while it ran).
    #[must_use]
    pub fn was_cancelled(&self) -> bool {
        self.cancelled
    }

    /// The running task's handle, as the actor sees it through
    /// [`current_task`].
    #[must_use]
    pub fn task(&self) -> &TaskHandle {
        &self.task
    }

    /// Replaces the task handle (the tracking sets its retention on it).
    pub fn set_task(&mut self, task: TaskHandle) {
        self.task = task;
    }
}

/// The rest of the middleware chain, then the actor.
#[derive(Clone, Copy)]
pub struct Next<'a> {
    rest: &'a [Arc<dyn Middleware>],
}

impl fmt::Debug for Next<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Next").field("remaining", &self.rest.len()).finish()
    }
}

impl<'a> Next<'a> {
    /// The chain of `middleware`, ending with the actor.
    #[must_use]
    pub fn new(middleware: &'a [Arc<dyn Middleware>]) -> Self {
        Self { rest: middleware }
    }

    /// Runs the rest of the chain and the actor.
    ///
    /// The future is the next middleware's own (already boxed: `process` is an `async_trait`
    /// method), or the actor's run, boxed here. So a middleware's future holds a pointer to the
    /// rest of the chain, not the actor's run inline: each stays small (about 100 bytes, not
    /// 1.1 kB), which the allocator serves from its per-thread cache.
    pub fn run<'c>(self, cx: &'c mut ProcessContext) -> BoxFuture<'c, Outcome>
    where
        'a: 'c,
    {
        match self.rest.split_first() {
            Some((first, rest)) => (**first).process(cx, Next { rest }),
            None => Box::pin(invoke_actor(cx)),
        }
    }
}

/// Error type names the runtime uses.
pub mod error_types {
    /// No actor is registered under the message's name.
    pub const ACTOR_NOT_FOUND: &str = "ActorNotFound";
    /// The actor ran past its time limit.
    pub const TIME_LIMIT_EXCEEDED: &str = "TimeLimitExceeded";
    /// The actor panicked.
    pub const PANIC: &str = "Panic";
    /// The worker shut down while the actor ran (ShutdownNotifications).
    pub const SHUTDOWN: &str = "Shutdown";
}

/// How the actor's run ended.
enum Ended<T> {
    /// It returned (or panicked), or its time limit passed (`None`).
    Done(Option<T>),
    /// The worker shut down.
    Shutdown,
    /// It was cancelled.
    Aborted,
}

async fn invoke_actor(cx: &mut ProcessContext) -> Outcome {
    let Some(actor) = cx.actor.clone() else {
        let name = cx.message.actor_name.clone();
        return Outcome::Failure(
            ActorError::new(
                error_types::ACTOR_NOT_FOUND,
                format!("no actor named {name:?} is registered with this worker"),
            )
            .with_action(ErrorAction::FailPermanently),
        );
    };
    let ended = {
        let call = AssertUnwindSafe(actor.invoke(&cx.message.args, &cx.message.kwargs)).catch_unwind();
        let task = cx.task.clone();
        let soft = cx.soft_time_limit;
        // The rare timers are boxed (a soft limit, an abort's grace period): inline, they would
        // grow every message's future past what the allocator serves from its per-thread cache.
        let soft_limit = async {
            if let Some(limit) = soft {
                Box::pin(tokio::time::sleep(limit)).await;
                task.stop(StopReason::SoftTimeLimit);
            }
            futures::future::pending::<std::convert::Infallible>().await
        };
        let limited = async {
            tokio::pin!(call);
            let run = async {
                tokio::select! {
                    r = &mut call => r,
                    never = soft_limit => match never {},
                }
            };
            match cx.time_limit {
                Some(limit) => tokio::time::timeout(limit, run).await.ok(),
                None => Some(run.await),
            }
        };
        let cancelled = async {
            match &cx.cancel {
                Some(token) => {
                    token.cancelled().await;
                    cx.task.stop(StopReason::Shutdown);
                }
                None => futures::future::pending().await,
            }
        };
        let aborted = async {
            match &cx.abort {
                Some((token, grace)) => {
                    token.cancelled().await;
                    cx.task.stop(StopReason::Cancelled);
                    *grace
                }
                None => futures::future::pending().await,
            }
        };
        tokio::pin!(limited);
        tokio::select! {
            r = &mut limited => Ended::Done(r),
            () = cancelled => Ended::Shutdown,
            grace = aborted => {
                // Told to stop: the actor may return within its grace period; its outcome is
                // discarded either way.
                let _ = Box::pin(tokio::time::timeout(grace, &mut limited)).await;
                Ended::Aborted
            }
        }
    };
    let result = match ended {
        Ended::Done(result) => result,
        Ended::Shutdown => {
            return Outcome::Failure(ActorError::new(error_types::SHUTDOWN, "the worker is shutting down"));
        }
        Ended::Aborted => {
            cx.cancelled = true;
            return Outcome::Skipped;
        }
    };
    match result {
        None => Outcome::Failure(ActorError::new(
            error_types::TIME_LIMIT_EXCEEDED,
            format!("time limit of {:?} exceeded", cx.time_limit.unwrap_or_default()),
        )),
        Some(Err(panic)) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(ToString::to_string)
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "actor panicked".into());
            Outcome::Failure(ActorError::new(error_types::PANIC, text))
        }
        Some(Ok(Ok(value))) => Outcome::Success(value),
        Some(Ok(Err(e))) if e.action() == ErrorAction::Skip => Outcome::Skipped,
        Some(Ok(Err(e))) => Outcome::Failure(e),
    }
}

/// A hook into enqueueing and processing. Every hook is a no-op by default.
///
/// ```
/// use std::time::Instant;
/// use troupe_core::middleware::{Middleware, Next, Outcome, ProcessContext};
///
/// /// Logs how long each message took.
/// #[derive(Debug)]
/// struct Timing;
///
/// #[troupe_core::async_trait]
/// impl Middleware for Timing {
///     async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
///         let start = Instant::now();
///         let outcome = next.run(cx).await;
///         println!("{} took {:?}", cx.message().actor_name, start.elapsed());
///         outcome
///     }
/// }
/// ```
#[async_trait]
pub trait Middleware: Send + Sync + fmt::Debug + 'static {
    /// The actor options this middleware reads (for a user middleware, the keys of
    /// `ActorOptions::extra` it reads): an actor option that neither the app nor one of its
    /// middleware reads is an error when the app is built. The built-in middleware return
    /// their rows of the one options table ([`troupe_options::read_by`]).
    fn actor_options(&self) -> &[&'static str] {
        &[]
    }

    /// The middleware's own type, seen through `Arc` and `Box`: what lookups by type compare
    /// ([`MiddlewareStack::position`], `AppBuilder::middleware_before`). Keep the default.
    fn middleware_type(&self) -> TypeId {
        TypeId::of::<Self>()
    }

    /// Whether this middleware overrides any of the hooks that run after processing
    /// ([`after_skip`](Self::after_skip), [`after_process`](Self::after_process),
    /// [`after_ack`](Self::after_ack), [`after_nack`](Self::after_nack)). A worker does not
    /// call those hooks on a middleware that returns `false`, which saves an allocation per
    /// hook per message (each call of an `async_trait` method is boxed). Keep the default
    /// (`true`) unless none of the four is overridden.
    fn after_hooks(&self) -> bool {
        true
    }

    /// Whether this middleware overrides any of the hooks that run when a message is enqueued
    /// ([`before_enqueue`](Self::before_enqueue), [`after_enqueue`](Self::after_enqueue),
    /// [`after_enqueue_many`](Self::after_enqueue_many)). An app does not call those hooks on
    /// a middleware that returns `false`, which saves an allocation per hook per message sent.
    /// Keep the default (`true`) unless none of the three is overridden.
    fn enqueue_hooks(&self) -> bool {
        true
    }

    /// Before a message is enqueued (also for retries and delayed messages becoming due). May
    /// change the message; an error stops the enqueue.
    async fn before_enqueue(&self, _app: &App, _message: &mut Message, _delay: Option<Duration>) -> Result<()> {
        Ok(())
    }

    /// After a message was enqueued.
    async fn after_enqueue(&self, _app: &App, _message: &Message, _delay: Option<Duration>) {}

    /// After a batch was enqueued (`App::enqueue_many`), with each message's delay. By default
    /// `after_enqueue` for each, in order; a middleware that writes somewhere overrides it to
    /// write the batch at once.
    async fn after_enqueue_many(&self, app: &App, messages: &[(Message, Option<Duration>)]) {
        for (message, delay) in messages {
            self.after_enqueue(app, message, *delay).await;
        }
    }

    /// When a worker receives a message it must hold until its eta.
    async fn before_delay_message(&self, _app: &App, _message: &Message) {}

    /// When a worker takes a ready message into its work queue, before an executor runs it
    /// (for a prefetched message, while executors still run earlier ones). Must return at once:
    /// it may start work (a read the message needs before it runs, say) whose result
    /// [`process`](Self::process) picks up.
    fn on_prefetch(&self, _app: &App, _message: &Message) {}

    /// Around processing: call `next.run(cx).await` to run the rest of the chain and the actor.
    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        next.run(cx).await
    }

    /// After a message was skipped, before it is acked or nacked.
    async fn after_skip(&self, _cx: &ProcessContext) {}

    /// Once the chain returned and the message's fate is decided ([`ProcessContext::failure_reason`]
    /// says whether it will be dead-lettered, [`ProcessContext::wants_requeue`] whether it goes
    /// back to its queue; otherwise it will be acked), before it is settled. A middleware adds
    /// here the writes the message's waiters need (a result, say) with
    /// [`ProcessContext::before_settle`], so the message is settled only once they are stored.
    /// Runs for every outcome, after [`after_skip`](Self::after_skip).
    async fn after_process(&self, _cx: &mut ProcessContext, _outcome: &Outcome) {}

    /// After a message was acked.
    async fn after_ack(&self, _cx: &ProcessContext, _outcome: &Outcome) {}

    /// After a message was nacked (dead-lettered).
    async fn after_nack(&self, _cx: &ProcessContext, _outcome: &Outcome) {}

    /// When a worker starts, before it consumes.
    async fn on_worker_boot(&self, _app: &App) {}

    /// When a worker begins to shut down.
    async fn on_worker_shutdown(&self, _app: &App) {}
}

/// `Arc<M>` and `Box<M>` of a middleware are the middleware, so an app can be given a shared
/// handle while the caller keeps another (to read what the middleware gathered):
/// `.middleware(Arc::clone(&monitor))`.
macro_rules! forward_middleware {
    ($($pointer:ident),*) => {$(
        #[async_trait]
        impl<M: Middleware + ?Sized> Middleware for $pointer<M> {
            fn actor_options(&self) -> &[&'static str] {
                (**self).actor_options()
            }

            fn middleware_type(&self) -> TypeId {
                (**self).middleware_type()
            }

            fn after_hooks(&self) -> bool {
                (**self).after_hooks()
            }

            fn enqueue_hooks(&self) -> bool {
                (**self).enqueue_hooks()
            }

            async fn before_enqueue(&self, app: &App, message: &mut Message, delay: Option<Duration>) -> Result<()> {
                (**self).before_enqueue(app, message, delay).await
            }

            async fn after_enqueue(&self, app: &App, message: &Message, delay: Option<Duration>) {
                (**self).after_enqueue(app, message, delay).await;
            }

            async fn after_enqueue_many(&self, app: &App, messages: &[(Message, Option<Duration>)]) {
                (**self).after_enqueue_many(app, messages).await;
            }

            async fn before_delay_message(&self, app: &App, message: &Message) {
                (**self).before_delay_message(app, message).await;
            }

            fn on_prefetch(&self, app: &App, message: &Message) {
                (**self).on_prefetch(app, message);
            }

            async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
                (**self).process(cx, next).await
            }

            async fn after_skip(&self, cx: &ProcessContext) {
                (**self).after_skip(cx).await;
            }

            async fn after_process(&self, cx: &mut ProcessContext, outcome: &Outcome) {
                (**self).after_process(cx, outcome).await;
            }

            async fn after_ack(&self, cx: &ProcessContext, outcome: &Outcome) {
                (**self).after_ack(cx, outcome).await;
            }

            async fn after_nack(&self, cx: &ProcessContext, outcome: &Outcome) {
                (**self).after_nack(cx, outcome).await;
            }

            async fn on_worker_boot(&self, app: &App) {
                (**self).on_worker_boot(app).await;
            }

            async fn on_worker_shutdown(&self, app: &App) {
                (**self).on_worker_shutdown(app).await;
            }
        }
    )*};
}

forward_middleware!(Arc, Box);

/// Dramatiq's default middleware, in its order (outermost first): [`AgeLimit`], [`TimeLimit`],
/// [`ShutdownNotifications`], [`Callbacks`], [`Pipelines`], [`Retries`]. Every app starts from
/// this list ([`App::builder`](crate::App::builder)).
#[must_use]
pub fn defaults() -> MiddlewareStack {
    let mut stack = MiddlewareStack::new();
    stack.push(AgeLimit::default());
    stack.push(TimeLimit::default());
    stack.push(ShutdownNotifications::default());
    stack.push(Callbacks);
    stack.push(Pipelines);
    stack.push(Retries::default());
    stack
}

/// Dramatiq's default middleware as a list: [`defaults`]`().into_vec()`.
#[must_use]
pub fn default_middleware() -> Vec<Arc<dyn Middleware>> {
    defaults().into_vec()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::MemoryBroker;

    /// Records every hook called on it.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<&'static str>>,
    }

    impl Recorder {
        fn record(&self, hook: &'static str) {
            self.calls.lock().unwrap().push(hook);
        }
    }

    #[async_trait]
    impl Middleware for Recorder {
        fn actor_options(&self) -> &[&'static str] {
            &["recorded"]
        }
        async fn before_enqueue(&self, _app: &App, _message: &mut Message, _delay: Option<Duration>) -> Result<()> {
            self.record("before_enqueue");
            Ok(())
        }
        async fn after_enqueue(&self, _app: &App, _message: &Message, _delay: Option<Duration>) {
            self.record("after_enqueue");
        }
        async fn before_delay_message(&self, _app: &App, _message: &Message) {
            self.record("before_delay_message");
        }
        fn on_prefetch(&self, _app: &App, _message: &Message) {
            self.record("on_prefetch");
        }
        async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
            self.record("process");
            next.run(cx).await
        }
        async fn after_skip(&self, _cx: &ProcessContext) {
            self.record("after_skip");
        }
        async fn after_ack(&self, _cx: &ProcessContext, _outcome: &Outcome) {
            self.record("after_ack");
        }
        async fn after_nack(&self, _cx: &ProcessContext, _outcome: &Outcome) {
            self.record("after_nack");
        }
        async fn on_worker_boot(&self, _app: &App) {
            self.record("on_worker_boot");
        }
        async fn on_worker_shutdown(&self, _app: &App) {
            self.record("on_worker_shutdown");
        }
    }

    /// Calls every hook of `m` once; returns its actor options.
    async fn call_every_hook(m: &dyn Middleware) -> Vec<&'static str> {
        let app = App::builder(MemoryBroker::new().into_dyn()).build().unwrap();
        let mut message = Message::new("q", "nobody", Vec::new(), serde_json::Map::new());
        m.before_enqueue(&app, &mut message, None).await.unwrap();
        m.after_enqueue(&app, &message, None).await;
        m.before_delay_message(&app, &message).await;
        m.on_prefetch(&app, &message);
        let mut cx = ProcessContext::new(app.clone(), message, None);
        let outcome = m.process(&mut cx, Next::new(&[])).await;
        assert!(outcome.error().is_some(), "no actor: the chain's end fails");
        m.after_skip(&cx).await;
        m.after_ack(&cx, &outcome).await;
        m.after_nack(&cx, &outcome).await;
        m.on_worker_boot(&app).await;
        m.on_worker_shutdown(&app).await;
        m.actor_options().to_vec()
    }

    const EVERY_HOOK: [&str; 10] = [
        "before_enqueue",
        "after_enqueue",
        "before_delay_message",
        "on_prefetch",
        "process",
        "after_skip",
        "after_ack",
        "after_nack",
        "on_worker_boot",
        "on_worker_shutdown",
    ];

    #[tokio::test]
    async fn arc_and_box_forward_every_hook() {
        let shared = Arc::new(Recorder::default());
        let options = call_every_hook(&Arc::clone(&shared)).await;
        assert_eq!(options, ["recorded"]);
        assert_eq!(*shared.calls.lock().unwrap(), EVERY_HOOK);

        let boxed: Box<Recorder> = Box::default();
        let options = call_every_hook(&boxed).await;
        assert_eq!(options, ["recorded"]);
        assert_eq!(*boxed.calls.lock().unwrap(), EVERY_HOOK);

        // An already erased middleware, boxed again, still reaches the recorder.
        let erased: Arc<dyn Middleware> = Arc::clone(&shared) as Arc<dyn Middleware>;
        call_every_hook(&Box::new(erased)).await;
        assert_eq!(shared.calls.lock().unwrap().len(), 2 * EVERY_HOOK.len());
        assert_eq!(
            Box::new(Arc::clone(&shared) as Arc<dyn Middleware>).middleware_type(),
            TypeId::of::<Recorder>(),
            "the type is seen through Arc and Box"
        );
    }

    /// Counts the enqueue hooks called on it; declares them or not.
    #[derive(Debug)]
    struct EnqueueHooks {
        declared: bool,
        calls: Arc<Mutex<Vec<&'static str>>>,
    }

    #[async_trait]
    impl Middleware for EnqueueHooks {
        fn enqueue_hooks(&self) -> bool {
            self.declared
        }
        async fn before_enqueue(&self, _app: &App, _message: &mut Message, _delay: Option<Duration>) -> Result<()> {
            self.calls.lock().unwrap().push("before_enqueue");
            Ok(())
        }
        async fn after_enqueue(&self, _app: &App, _message: &Message, _delay: Option<Duration>) {
            self.calls.lock().unwrap().push("after_enqueue");
        }
    }

    #[tokio::test]
    async fn enqueue_hooks_run_only_on_middleware_that_declares_them() {
        let declared = Arc::new(Mutex::new(Vec::new()));
        let undeclared = Arc::new(Mutex::new(Vec::new()));
        let app = App::builder(MemoryBroker::new().into_dyn())
            .middleware(EnqueueHooks {
                declared: true,
                calls: Arc::clone(&declared),
            })
            // Through an Arc too: the pointer forwards the declaration.
            .middleware(Arc::new(EnqueueHooks {
                declared: false,
                calls: Arc::clone(&undeclared),
            }))
            .build()
            .unwrap();
        let message = |n: u64| Message::new("q", "nobody", vec![n.into()], serde_json::Map::new());
        app.enqueue(message(0), None).await.unwrap();
        let sent = vec![(message(1), None), (message(2), Some(Duration::from_secs(60)))];
        let ids: Vec<String> = sent.iter().map(|(m, _)| m.message_id.clone()).collect();
        let enqueued = app.enqueue_many(sent).await.unwrap();
        // Each message comes back in its place, as enqueued (the delayed one on the delay queue).
        let back: Vec<&str> = enqueued.iter().map(|m| m.message_id.as_str()).collect();
        assert_eq!(back, ids);
        assert_eq!(enqueued[1].queue_name, "q.DQ");
        assert_eq!(
            *declared.lock().unwrap(),
            [
                "before_enqueue",
                "after_enqueue",
                "before_enqueue",
                "before_enqueue",
                "after_enqueue",
                "after_enqueue"
            ]
        );
        assert!(undeclared.lock().unwrap().is_empty());
    }

    #[test]
    fn a_task_handle_and_a_changed_copy_share_the_stop() {
        let task = TaskHandle::new("m1", None);
        // A copy changed while the first is held gets its own settings, the same stop signal
        // (made when the copy is, since neither had one yet).
        let copy = task.clone().with_retention(Duration::from_secs(1));
        assert!(!copy.is_stopped());
        task.stop(StopReason::Cancelled);
        assert!(copy.is_stopped());
        assert_eq!(copy.stop_reason(), Some(StopReason::Cancelled));
        assert!(copy.token().is_cancelled());
        // A handle no one watched still reports its stop.
        let alone = TaskHandle::new("m2", None);
        assert!(!alone.is_stopped());
        alone.stop(StopReason::Shutdown);
        assert!(alone.is_stopped());
        assert_eq!(alone.stop_reason(), Some(StopReason::Shutdown));
    }

    /// The built-in middleware read exactly their rows of the options table, and together with
    /// the app's own they read every `ActorOptions` option.
    #[test]
    fn builtin_actor_options_are_the_tables() {
        use troupe_options::middleware as name;
        let results = Results::new(crate::MemoryResults::new().into_dyn());
        let builtins: [(&str, &dyn Middleware); 7] = [
            (name::AGE_LIMIT, &AgeLimit::default()),
            (name::TIME_LIMIT, &TimeLimit::default()),
            (name::SHUTDOWN_NOTIFICATIONS, &ShutdownNotifications::default()),
            (name::CALLBACKS, &Callbacks),
            (name::PIPELINES, &Pipelines),
            (name::RETRIES, &Retries::default()),
            (name::RESULTS, &results),
        ];
        let mut read: Vec<&str> = troupe_options::app_options().collect();
        for (reader, m) in builtins {
            assert_eq!(m.actor_options(), troupe_options::read_by(reader), "{reader}");
            read.extend(m.actor_options());
        }
        for option in troupe_options::ACTOR_OPTIONS.iter().filter(|o| o.in_actor_options()) {
            assert!(read.contains(&option.name), "nobody reads {}", option.name);
        }
        assert!(CurrentMessage.actor_options().is_empty());
    }

    /// An actor with the given options, erased as the registry holds it.
    fn actor_with(options: crate::ActorOptions) -> Arc<dyn DynActor> {
        struct WithOptions(crate::ActorOptions);
        impl crate::Actor for WithOptions {
            type Args = ();
            type Output = ();
            fn name(&self) -> &str {
                "with_options"
            }
            fn options(&self) -> crate::ActorOptions {
                self.0.clone()
            }
            async fn call(&self, (): ()) -> std::result::Result<(), ActorError> {
                Ok(())
            }
        }
        Arc::new(crate::actor::Erased::new(WithOptions(options)))
    }

    /// Message options to set, by key.
    type Set<'a> = &'a [(&'a str, Value)];

    fn message_with(options: Set<'_>) -> Message {
        let mut message = Message::new("q", "with_options", Vec::new(), serde_json::Map::new());
        for (key, value) in options {
            message.options.insert((*key).to_owned(), value.clone());
        }
        message
    }

    /// One rule for 0: a time limit of 0 (message, actor or middleware default) is no limit;
    /// an absent or `null` message option falls back to the actor's, then the default.
    #[tokio::test]
    async fn a_zero_time_limit_is_no_limit() {
        use crate::message::option_keys::TIME_LIMIT;
        use serde_json::json;
        let app = App::builder(MemoryBroker::new().into_dyn()).build().unwrap();
        let five = Some(Duration::from_secs(5));
        let cases: [(Set<'_>, Option<Duration>, TimeLimit, Option<Duration>); 7] = [
            (&[], None, TimeLimit::default(), Some(Duration::from_secs(600))),
            (&[], five, TimeLimit::default(), five),
            (
                &[(TIME_LIMIT, json!(2000))],
                five,
                TimeLimit::default(),
                Some(Duration::from_secs(2)),
            ),
            (&[(TIME_LIMIT, json!(0))], five, TimeLimit::default(), None),
            (&[(TIME_LIMIT, Value::Null)], five, TimeLimit::default(), five),
            (&[], Some(Duration::ZERO), TimeLimit::default(), None),
            (&[], None, TimeLimit::new(Duration::ZERO), None),
        ];
        for (i, (message, actor, middleware, expected)) in cases.into_iter().enumerate() {
            let options = crate::ActorOptions::new();
            let options = match actor {
                Some(limit) => options.time_limit(limit),
                None => options,
            };
            let mut cx = ProcessContext::new(app.clone(), message_with(message), Some(actor_with(options)));
            let outcome = middleware.process(&mut cx, Next::new(&[])).await;
            assert!(outcome.is_success(), "case {i}: {outcome:?}");
            assert_eq!(cx.time_limit(), expected, "case {i}");
        }
    }

    /// One rule for 0: a maximum age of 0 is no limit, on the message as on the actor.
    #[tokio::test]
    async fn a_zero_max_age_is_no_limit() {
        use crate::message::option_keys::MAX_AGE;
        use serde_json::json;
        let app = App::builder(MemoryBroker::new().into_dyn()).build().unwrap();
        let second = Some(Duration::from_secs(1));
        let cases: [(Set<'_>, Option<Duration>, bool); 6] = [
            (&[], None, false),
            (&[], second, true),
            (&[(MAX_AGE, json!(0))], second, false),
            (&[(MAX_AGE, Value::Null)], second, true),
            (&[(MAX_AGE, json!(60_000))], second, false),
            (&[], Some(Duration::ZERO), false),
        ];
        for (i, (message, actor, too_old)) in cases.into_iter().enumerate() {
            let options = crate::ActorOptions::new();
            let options = match actor {
                Some(age) => options.max_age(age),
                None => options,
            };
            let mut message = message_with(message);
            message.message_timestamp -= 10_000;
            let mut cx = ProcessContext::new(app.clone(), message, Some(actor_with(options)));
            let outcome = AgeLimit::default().process(&mut cx, Next::new(&[])).await;
            assert_eq!(cx.is_failed(), too_old, "case {i}: {outcome:?}");
            assert_eq!(outcome.is_success(), !too_old, "case {i}");
        }
    }

    /// One rule for 0: a message's `max_retries` of 0 retries nothing, over the actor's; a
    /// `null` one is not set, so the actor's (here 0 too) applies.
    #[tokio::test]
    async fn a_zero_max_retries_retries_nothing() {
        use crate::message::option_keys::MAX_RETRIES;
        use serde_json::json;
        let broker = MemoryBroker::new();
        let app = App::builder(broker.clone().into_dyn()).build().unwrap();
        let cases = [(json!(0), 5, true), (Value::Null, 0, true), (json!(1), 0, false)];
        for (value, actor_max, gives_up) in cases {
            let options = crate::ActorOptions::new()
                .max_retries(actor_max)
                .min_backoff(Duration::ZERO)
                .max_backoff(Duration::ZERO);
            let message = message_with(&[(MAX_RETRIES, value.clone())]);
            let mut cx = ProcessContext::new(app.clone(), message, Some(actor_with(options)));
            let failing: Arc<dyn Middleware> = Arc::new(FailEveryTime);
            let chain = [failing];
            Retries::default().process(&mut cx, Next::new(&chain)).await;
            assert_eq!(cx.is_failed(), gives_up, "max_retries {value}");
            assert_eq!(cx.message().retries(), 1, "max_retries {value}");
        }
    }

    /// Fails every message it sees, without running the actor.
    #[derive(Debug)]
    struct FailEveryTime;

    #[async_trait]
    impl Middleware for FailEveryTime {
        async fn process(&self, _cx: &mut ProcessContext, _next: Next<'_>) -> Outcome {
            Outcome::Failure(ActorError::msg("always"))
        }
    }
}
