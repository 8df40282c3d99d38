//! Processing one message: the middleware chain, then ack or nack.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use troupe_core::middleware::{Next, Outcome, ProcessContext};
use troupe_core::{AckHandle, ActorError, App, Delivery, ErrorAction, Result};

use crate::worker::Minutes;

/// What is left of a processed message: settling it with the broker (ack, nack or requeue,
/// retried while transient) and the middleware's after-hooks. The worker runs it off the
/// executor ([`Settlement::run`], spawned as its own task), so an executor takes the next
/// message while the broker commits the ack. Plain data until then, with no future of its own:
/// the worker boxes [`Settlement::run`]'s once and spawns the box.
pub(crate) struct Settlement {
    /// The delivery's ack handle (the delivery itself would keep room for the message).
    handle: Box<dyn AckHandle>,
    hard_stop: CancellationToken,
    minutes: Arc<Minutes>,
    how: How,
}

/// How a delivery is settled.
// `Processed` is nearly every message: boxing it would cost an allocation per message to save
// bytes only on the rare undecodable one.
#[allow(clippy::large_enum_variant)]
enum How {
    /// It could not be decoded: dead-lettered with this reason.
    Undecodable(String),
    /// It ran through the chain.
    Processed {
        app: App,
        cx: ProcessContext,
        outcome: Outcome,
        writes: Vec<BoxFuture<'static, Result<()>>>,
        span: tracing::Span,
    },
}

/// Processes one delivery: runs it through the middleware and the actor, and returns what is
/// left to settle it.
pub(crate) async fn process(
    app: &App,
    mut delivery: Delivery,
    hard_stop: &CancellationToken,
    minutes: &Arc<Minutes>,
) -> Settlement {
    let hard_stop = hard_stop.clone();
    let minutes = Arc::clone(minutes);
    let message = match delivery.take_message() {
        Ok(message) => message,
        Err(reason) => {
            tracing::error!(queue = %delivery.queue(), %reason, "undecodable message; dead-lettering it");
            let reason = format!("undecodable message: {reason}");
            minutes.failed();
            return Settlement {
                handle: delivery.into_handle(),
                hard_stop,
                minutes,
                how: How::Undecodable(reason),
            };
        }
    };
    let span = tracing::info_span!(
        "troupe.process",
        actor = %message.actor_name,
        queue = %message.queue_name,
        message_id = %message.message_id,
        retries = message.retries(),
    );
    let (mut cx, outcome) = async {
        let actor = app.actor(&message.actor_name).cloned();
        let mut cx = ProcessContext::new(app.clone(), message, actor);
        let started = std::time::Instant::now();
        let outcome = match AssertUnwindSafe(Next::new(app.middleware()).run(&mut cx))
            .catch_unwind()
            .await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                let error = ActorError::new("MiddlewarePanic", "a middleware panicked while processing the message");
                cx.fail(error.traceback());
                Outcome::Failure(error)
            }
        };
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &outcome {
            Outcome::Success(_) => tracing::debug!(elapsed_ms, "message processed"),
            Outcome::Failure(e) => {
                if !matches!(e.action(), ErrorAction::Retry(_)) {
                    tracing::error!(elapsed_ms, error = %e.traceback(), "actor failed");
                }
                if e.action() == ErrorAction::FailPermanently && !cx.is_failed() {
                    cx.fail(e.traceback());
                }
            }
            _ => tracing::debug!(elapsed_ms, "message skipped"),
        }
        if matches!(outcome, Outcome::Skipped) {
            for m in after_hooks(app) {
                (**m).after_skip(&cx).await;
            }
        }
        for m in after_hooks(app) {
            (**m).after_process(&mut cx, &outcome).await;
        }
        (cx, outcome)
    }
    .instrument(span.clone())
    .await;
    let writes = cx.take_before_settle();
    Settlement {
        handle: delivery.into_handle(),
        hard_stop,
        minutes,
        how: How::Processed {
            app: app.clone(),
            cx,
            outcome,
            writes,
            span,
        },
    }
}

impl Settlement {
    /// Settles the message: the writes left for before the settlement, then the ack, nack or
    /// requeue, then the after-hooks.
    #[allow(clippy::manual_async_fn)] // see below: an `async fn` would hold `self` twice
    pub(crate) fn run(mut self) -> impl Future<Output = ()> + Send {
        // Fields used in place, not moved out: a settling future is a task per message, and
        // moving them would give the future a second copy of the settlement. (Not an `async fn`:
        // its future would hold `self` twice, as the argument and as the body's local.)
        async move {
            match &mut self.how {
                How::Undecodable(reason) => {
                    settle(&self.hard_stop, Settle::Nack, || self.handle.nack(None, reason)).await;
                }
                How::Processed {
                    app,
                    cx,
                    outcome,
                    writes,
                    span,
                } => {
                    let (writes, span) = (std::mem::take(writes), std::mem::replace(span, tracing::Span::none()));
                    settle_processed(app, cx, outcome, writes, &*self.handle, &self.hard_stop, &self.minutes)
                        .instrument(span)
                        .await;
                }
            }
        }
    }
}

/// Settles a message that ran through the chain.
async fn settle_processed(
    app: &App,
    cx: &mut ProcessContext,
    outcome: &Outcome,
    writes: Vec<BoxFuture<'static, Result<()>>>,
    handle: &dyn AckHandle,
    hard_stop: &CancellationToken,
    minutes: &Minutes,
) {
    // The writes the middleware left for before the settlement (task states the user waits
    // on): the message is acked or nacked only once they are stored.
    let mut requeue = cx.wants_requeue();
    if !writes.is_empty() {
        // Boxed: most messages have no such writes, and the join would grow every settling
        // future (a task per message) by its size.
        let written = Box::pin(async {
            tokio::select! {
                written = futures::future::join_all(writes) => Some(written),
                () = hard_stop.cancelled() => None,
            }
        })
        .await;
        let Some(written) = written else {
            tracing::warn!("stopped before the message's writes were stored; the broker will redeliver it");
            return;
        };
        for error in written.into_iter().filter_map(Result::err) {
            if error.is_transient() {
                requeue = true;
            } else if !cx.is_failed() {
                // Retrying would fail the same way: the message goes to the dead letters with
                // the reason, where it can be requeued once the cause is fixed.
                cx.fail(format!("StoreError: {error}"));
            }
        }
    }
    let how = if requeue {
        Settle::Requeue
    } else if cx.is_failed() {
        Settle::Nack
    } else {
        Settle::Ack
    };
    // One call site for the three (each would add its own retrying future to this one's size).
    settle(hard_stop, how, || how.apply(handle, cx)).await;
    match how {
        Settle::Requeue => {}
        Settle::Nack => {
            minutes.failed();
            for m in after_hooks(app) {
                (**m).after_nack(cx, outcome).await;
            }
        }
        Settle::Ack => {
            for m in after_hooks(app) {
                (**m).after_ack(cx, outcome).await;
            }
        }
    }
}

/// The middleware whose after-hooks run, last added first (those that declare none are
/// skipped: each call would box a no-op future).
fn after_hooks(app: &App) -> impl Iterator<Item = &Arc<dyn troupe_core::Middleware>> {
    app.middleware().iter().rev().filter(|m| m.after_hooks())
}

/// How a message is settled.
#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Nack,
    Requeue,
}

impl Settle {
    /// Acks, nacks (with the context's failure reason) or requeues the message of `handle`.
    async fn apply(self, handle: &dyn AckHandle, cx: &ProcessContext) -> Result<()> {
        match self {
            Self::Ack => handle.ack().await,
            Self::Nack => {
                handle
                    .nack(Some(cx.message()), cx.failure_reason().unwrap_or_default())
                    .await
            }
            Self::Requeue => handle.requeue().await,
        }
    }

    /// What settling does, for logs (static: settling is per message, logging rare).
    fn what(self) -> &'static str {
        match self {
            Self::Ack => "ack the message",
            Self::Nack => "nack the message",
            Self::Requeue => "requeue the message",
        }
    }
}

/// Runs an ack/nack/requeue, retrying transient broker errors with backoff (capped at 5 s,
/// as Dramatiq retries them) until the worker is stopped hard.
async fn settle<'a, F, Fut>(hard_stop: &CancellationToken, how: Settle, op: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<()>> + 'a,
{
    let backoff = (Duration::from_millis(100), Duration::from_secs(5));
    let what = how.what();
    let settled = troupe_core::support::retry_transient(what, backoff, None, Some(hard_stop), op).await;
    if let Err(e) = settled
        && !e.is_transient()
    {
        tracing::error!(error = %e, "could not {what}; the broker will redeliver it");
    }
}
