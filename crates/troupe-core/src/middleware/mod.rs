//! Middleware: code that runs around enqueueing and processing every message.
//!
//! A middleware implements only the hooks it needs; every hook is a no-op by default. Processing
//! has one around-hook, [`Middleware::process`]: code before `next.run(cx).await` runs before the
//! actor, code after it runs after, and the list order makes an onion, so after-code runs in the
//! reverse order of before-code, exactly as Dramatiq's `emit_after`.
//!
//! The defaults, in Dramatiq's order: [`AgeLimit`], [`TimeLimit`], [`ShutdownNotifications`],
//! [`Callbacks`], [`Pipelines`], [`Retries`]. [`Results`] and [`CurrentMessage`] are added by the
//! app when configured.

mod age_limit;
mod callbacks;
pub(crate) mod current_message;
mod pipelines;
mod results;
mod retries;
mod shutdown;
mod time_limit;

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use age_limit::AgeLimit;
pub use callbacks::Callbacks;
pub use current_message::{CurrentMessage, current_app, current_message};
pub use pipelines::Pipelines;
pub use results::Results;
pub use retries::{MAX_BACKOFF_CAP, Retries, compute_backoff};
pub use shutdown::ShutdownNotifications;
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
    message: Message,
    app: App,
    actor: Option<Arc<dyn DynActor>>,
    failed: Option<String>,
    requeue: bool,
    time_limit: Option<Duration>,
    cancel: Option<CancellationToken>,
}

impl ProcessContext {
    /// A context for `message`, run by `actor` (none when no actor has that name).
    #[must_use]
    pub fn new(app: App, message: Message, actor: Option<Arc<dyn DynActor>>) -> Self {
        Self {
            message,
            app,
            actor,
            failed: None,
            requeue: false,
            time_limit: None,
            cancel: None,
        }
    }

    /// The message being processed.
    #[must_use]
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message, to change (Retries sets `retries` and `traceback`).
    pub fn message_mut(&mut self) -> &mut Message {
        &mut self.message
    }

    /// Takes the message out of the context.
    #[must_use]
    pub fn into_message(self) -> Message {
        self.message
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
    pub async fn run(self, cx: &mut ProcessContext) -> Outcome {
        match self.rest.split_first() {
            Some((first, rest)) => (**first).process(cx, Next { rest }).await,
            None => invoke_actor(cx).await,
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
    let call = AssertUnwindSafe(actor.invoke(&cx.message.args, &cx.message.kwargs)).catch_unwind();
    let limited = async {
        match cx.time_limit {
            Some(limit) => tokio::time::timeout(limit, call).await.ok(),
            None => Some(call.await),
        }
    };
    let cancelled = async {
        match &cx.cancel {
            Some(token) => token.cancelled().await,
            None => futures::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = limited => r,
        () = cancelled => {
            return Outcome::Failure(ActorError::new(error_types::SHUTDOWN, "the worker is shutting down"));
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
    /// The actor options this middleware reads; any other option on an actor is an error when
    /// the app is built.
    fn actor_options(&self) -> &[&'static str] {
        &[]
    }

    /// Before a message is enqueued (also for retries and delayed messages becoming due). May
    /// change the message; an error stops the enqueue.
    async fn before_enqueue(&self, _app: &App, _message: &mut Message, _delay: Option<Duration>) -> Result<()> {
        Ok(())
    }

    /// After a message was enqueued.
    async fn after_enqueue(&self, _app: &App, _message: &Message, _delay: Option<Duration>) {}

    /// When a worker receives a message it must hold until its eta.
    async fn before_delay_message(&self, _app: &App, _message: &Message) {}

    /// Around processing: call `next.run(cx).await` to run the rest of the chain and the actor.
    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        next.run(cx).await
    }

    /// After a message was skipped, before it is acked or nacked.
    async fn after_skip(&self, _cx: &ProcessContext) {}

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

            async fn before_enqueue(&self, app: &App, message: &mut Message, delay: Option<Duration>) -> Result<()> {
                (**self).before_enqueue(app, message, delay).await
            }

            async fn after_enqueue(&self, app: &App, message: &Message, delay: Option<Duration>) {
                (**self).after_enqueue(app, message, delay).await;
            }

            async fn before_delay_message(&self, app: &App, message: &Message) {
                (**self).before_delay_message(app, message).await;
            }

            async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
                (**self).process(cx, next).await
            }

            async fn after_skip(&self, cx: &ProcessContext) {
                (**self).after_skip(cx).await;
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

/// Dramatiq's default middleware, in its order.
#[must_use]
pub fn default_middleware() -> Vec<Arc<dyn Middleware>> {
    vec![
        Arc::new(AgeLimit::default()),
        Arc::new(TimeLimit::default()),
        Arc::new(ShutdownNotifications::default()),
        Arc::new(Callbacks),
        Arc::new(Pipelines),
        Arc::new(Retries::default()),
    ]
}

/// Runs `f` for a message option, falling back to the actor option: Dramatiq's truthiness
/// lookup (`message.options.get(k) or actor.options.get(k)`).
pub(crate) fn option_ms(cx: &ProcessContext, key: &str, actor: Option<Duration>) -> Option<Duration> {
    cx.message
        .option_u64(key)
        .filter(|v| *v > 0)
        .map(Duration::from_millis)
        .or(actor)
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

    const EVERY_HOOK: [&str; 9] = [
        "before_enqueue",
        "after_enqueue",
        "before_delay_message",
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
    }
}
