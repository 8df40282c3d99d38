use std::time::Duration;

use async_trait::async_trait;

use super::{Middleware, Next, Outcome, ProcessContext};

/// Cancels actors that run longer than their time limit (default 10 minutes). The actor then
/// fails with `TimeLimitExceeded`, which the Retries middleware retries like any failure. A time
/// limit of 0 (on the message, the actor or here) is no limit.
///
/// Async actors are cancelled at their next `.await`; a sync actor cannot be interrupted, so
/// its thread is abandoned (it runs on, its result discarded) and its worker slot freed.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TimeLimit {
    /// The default limit.
    pub time_limit: Duration,
}

impl Default for TimeLimit {
    fn default() -> Self {
        Self {
            time_limit: Duration::from_millis(troupe_options::defaults::TIME_LIMIT_MS),
        }
    }
}

impl TimeLimit {
    /// A time limit with another default.
    #[must_use]
    pub fn new(time_limit: Duration) -> Self {
        Self { time_limit }
    }
}

#[async_trait]
impl Middleware for TimeLimit {
    fn after_hooks(&self) -> bool {
        false
    }

    fn enqueue_hooks(&self) -> bool {
        false
    }

    fn actor_options(&self) -> &[&'static str] {
        troupe_options::read_by(troupe_options::middleware::TIME_LIMIT)
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let limit = cx
            .message()
            .time_limit()
            .or_else(|| cx.actor().and_then(|a| a.options().time_limit))
            .unwrap_or(self.time_limit);
        if !limit.is_zero() {
            cx.limit_time(limit);
        }
        let soft = cx
            .message()
            .option_duration(crate::option_keys::SOFT_TIME_LIMIT)
            .or_else(|| cx.actor().and_then(|a| a.options().soft_time_limit));
        if let Some(soft) = soft.filter(|d| !d.is_zero()) {
            cx.limit_soft_time(soft);
        }
        next.run(cx).await
    }
}
