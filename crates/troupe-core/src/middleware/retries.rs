use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use serde_json::{Value, json};

use super::{Middleware, Next, Outcome, ProcessContext};
use crate::actor::{ErrorAction, RetryWhen};
use crate::message::{duration_ms, now_ms};

/// The longest backoff Dramatiq allows (7 days).
pub const MAX_BACKOFF_CAP: Duration = Duration::from_millis(troupe_options::defaults::MAX_BACKOFF_MS);

/// Retries failed messages with exponential backoff, then dead-letters them.
///
/// A failure re-enqueues the same message (same id, `retries` + 1, `traceback` and
/// `requeue_timestamp` set) after `min_backoff·2^r·U(1,2)`, capped at `max_backoff·U(0.5,1)`.
/// Defaults: 20 retries, 15 s, 7 days. After `max_retries` retries (or when `retry_when` says
/// no, or the error matches `throws`, or the actor called `fail_permanently`) the message is
/// dead-lettered with its traceback, and `on_retry_exhausted` is sent
/// `(message, {"retries", "max_retries"})`.
///
/// Each setting is the message's option, else the actor's, else this middleware's default; a 0
/// is a value (`max_retries` 0: no retry; a backoff of 0: retry at once). Change the defaults
/// without rebuilding the middleware list with `AppBuilder::retries`:
///
/// ```
/// # use std::time::Duration;
/// # use troupe_core::{App, MemoryBroker, middleware::Retries};
/// let app = App::builder(MemoryBroker::new().into_dyn())
///     .retries(
///         Retries::default()
///             .max_retries(Some(3))
///             .min_backoff(Duration::from_millis(100))
///             .max_backoff(Duration::from_secs(5)),
///     )
///     .build()?;
/// # Ok::<(), troupe_core::Error>(())
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct Retries {
    /// Default `max_retries` (20).
    pub max_retries: Option<u64>,
    /// Default `min_backoff` (15 s).
    pub min_backoff: Duration,
    /// Default `max_backoff` (7 days).
    pub max_backoff: Duration,
    /// Default `retry_when` (none).
    pub retry_when: Option<RetryWhen>,
}

impl std::fmt::Debug for Retries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retries")
            .field("max_retries", &self.max_retries)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("retry_when", &self.retry_when.as_ref().map(|_| ".."))
            .finish()
    }
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            max_retries: Some(troupe_options::defaults::MAX_RETRIES),
            min_backoff: Duration::from_millis(troupe_options::defaults::MIN_BACKOFF_MS),
            max_backoff: MAX_BACKOFF_CAP,
            retry_when: None,
        }
    }
}

impl Retries {
    /// Sets the default `max_retries` (`None`: retry forever).
    #[must_use]
    pub fn max_retries(mut self, max_retries: Option<u64>) -> Self {
        self.max_retries = max_retries;
        self
    }

    /// Sets the default `min_backoff`.
    #[must_use]
    pub fn min_backoff(mut self, d: Duration) -> Self {
        self.min_backoff = d;
        self
    }

    /// Sets the default `max_backoff` (at most [`MAX_BACKOFF_CAP`], 7 days).
    #[must_use]
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// Sets the default `retry_when`: retry only while `f(retries_so_far, error)` is true
    /// (instead of `max_retries`).
    #[must_use]
    pub fn retry_when(mut self, f: impl Fn(u64, &crate::ActorError) -> bool + Send + Sync + 'static) -> Self {
        self.retry_when = Some(std::sync::Arc::new(f));
        self
    }
}

/// Dramatiq's backoff: `factor·2^min(r,32)·U(1,2)`, and when that is over `max`,
/// `max·U(0.5,1)`.
#[must_use]
pub fn compute_backoff(retries: u64, factor: Duration, max: Duration) -> Duration {
    let mut rng = rand::rng();
    let exp = u32::try_from(retries.min(32)).unwrap_or(32);
    let base = factor.as_secs_f64() * f64::from(2u32).powi(i32::try_from(exp).unwrap_or(32));
    let mut backoff = base * rng.random_range(1.0..2.0);
    if backoff > max.as_secs_f64() {
        backoff = max.as_secs_f64() * rng.random_range(0.5..1.0);
    }
    Duration::try_from_secs_f64(backoff).unwrap_or(max)
}

#[async_trait]
impl Middleware for Retries {
    fn after_hooks(&self) -> bool {
        false
    }

    fn enqueue_hooks(&self) -> bool {
        false
    }

    fn actor_options(&self) -> &[&'static str] {
        troupe_options::read_by(troupe_options::middleware::RETRIES)
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let outcome = next.run(cx).await;
        if !matches!(outcome, Outcome::Failure(_)) {
            return outcome;
        }
        // In its own box: the retry's future is large, and most messages never need it.
        Box::pin(self.failed(cx, outcome)).await
    }
}

impl Retries {
    /// After a failed attempt: dead-letters the message, or enqueues its retry.
    async fn failed(&self, cx: &mut ProcessContext, outcome: Outcome) -> Outcome {
        let Outcome::Failure(error) = &outcome else {
            return outcome;
        };
        let options = cx.actor().map(|a| a.options().clone()).unwrap_or_default();
        let message_id = cx.message().message_id.clone();
        if error.action() == ErrorAction::FailPermanently {
            tracing::warn!(%message_id, error = %error, "message failed permanently; dead-lettering it");
            cx.fail(error.traceback());
            return outcome;
        }
        if options.throws.as_ref().is_some_and(|throws| throws(error)) {
            tracing::info!(%message_id, error = %error, "actor raised an expected error; not retrying");
            cx.fail(error.traceback());
            return outcome;
        }
        let retries = cx.message().retries();
        {
            let message = cx.message_mut();
            message.set_retries(retries + 1);
            message.set_traceback(error.traceback());
            message.set_requeue_timestamp(now_ms());
        }
        let max_retries = cx.message().max_retries().or(options.max_retries).or(self.max_retries);
        let retry_when = options.retry_when.clone().or_else(|| self.retry_when.clone());
        let give_up = match &retry_when {
            Some(f) => !f(retries, error),
            None => max_retries.is_some_and(|max| retries >= max),
        };
        if give_up {
            tracing::warn!(%message_id, retries, "retries exceeded; dead-lettering the message");
            cx.fail(error.traceback());
            let target = cx
                .message()
                .on_retry_exhausted()
                .map(str::to_owned)
                .or(options.on_retry_exhausted);
            if let Some(target) = target {
                let payload = json!({"retries": retries, "max_retries": max_retries});
                let args: Vec<Value> = vec![cx.message().to_value(), payload];
                if let Err(e) = cx.app().send_to(&target, args).await {
                    tracing::error!(callback = %target, error = %e, "could not send the on_retry_exhausted callback");
                }
            }
            return outcome;
        }
        let delay = match error.action() {
            ErrorAction::Retry(Some(delay)) => delay,
            _ => {
                let message = cx.message();
                let min_backoff = message
                    .min_backoff()
                    .or(options.min_backoff)
                    .unwrap_or(self.min_backoff);
                let max_backoff = message
                    .max_backoff()
                    .or(options.max_backoff)
                    .unwrap_or(self.max_backoff);
                compute_backoff(retries, min_backoff, max_backoff.min(MAX_BACKOFF_CAP))
            }
        };
        tracing::info!(%message_id, retries = retries + 1, delay_ms = duration_ms(delay), "retrying message");
        let mut retry = cx.message().clone();
        retry.queue_name = retry.canonical_queue().to_owned();
        // A broker briefly unable to take the retry (a restart, a failover, a queue electing a
        // leader) is waited for, as a follow-up is: returning the message to its queue at once
        // would run it again at once, and on RabbitMQ quorum queues every return counts toward
        // the delivery limit. Unlike a follow-up, any error left returns the message.
        let enqueued = super::retry_follow_up(cx, "enqueue the retry", |app| {
            let retry = retry.clone();
            async move { app.enqueue(retry, Some(delay)).await }
        })
        .await;
        if let Err(e) = enqueued {
            tracing::error!(%message_id, error = %e, "could not enqueue the retry; returning the message to its queue instead");
            cx.requeue();
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_bounds() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for r in 0..40u64 {
            for _ in 0..50 {
                let d = compute_backoff(r, min, max);
                let base = 100.0 * 2f64.powi(i32::try_from(r.min(32)).unwrap());
                let ms = d.as_secs_f64() * 1000.0;
                if base * 2.0 <= 10_000.0 {
                    assert!(ms >= base - 1e-6 && ms < base * 2.0 + 1e-6, "r={r} ms={ms}");
                } else {
                    assert!((0.0..=10_000.0 + 1e-6).contains(&ms), "r={r} ms={ms}");
                    if base > 10_000.0 {
                        assert!(ms >= 5_000.0 - 1e-6, "r={r} ms={ms}");
                    }
                }
            }
        }
    }

    #[test]
    fn defaults_are_dramatiqs() {
        let r = Retries::default();
        assert_eq!(r.max_retries, Some(20));
        assert_eq!(r.min_backoff, Duration::from_secs(15));
        assert_eq!(r.max_backoff, MAX_BACKOFF_CAP);
    }
}
