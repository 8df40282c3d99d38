use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::{Middleware, Outcome, ProcessContext};
use crate::results::{DEFAULT_RESULT_TTL, ResultBackend, wrap_failure};

/// Stores actors' results (when `store_results` is on) and final failures in a results backend.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Results {
    /// Where results go.
    pub backend: Arc<dyn ResultBackend>,
    /// The default for `store_results` (false).
    pub store_results: bool,
    /// The default TTL (10 minutes).
    pub result_ttl: Duration,
}

impl Results {
    /// Results stored in `backend`, off by default per actor.
    #[must_use]
    pub fn new(backend: Arc<dyn ResultBackend>) -> Self {
        Self {
            backend,
            store_results: false,
            result_ttl: DEFAULT_RESULT_TTL,
        }
    }

    fn lookup(&self, cx: &ProcessContext) -> (bool, Duration) {
        let message = cx.message();
        let actor = cx.actor().map(|a| a.options());
        let store = message
            .store_results()
            .or_else(|| actor.and_then(|o| o.store_results))
            .unwrap_or(self.store_results);
        let ttl = message
            .result_ttl()
            .or_else(|| actor.and_then(|o| o.result_ttl))
            .unwrap_or(self.result_ttl);
        (store, ttl)
    }

    /// Stores `value` as the message's result before the message is settled: transient errors
    /// (a dropped or stalled connection) are retried with backoff until it is stored or the
    /// worker stops hard (then the message is redelivered, its result not yet stored); any
    /// other error dead-letters the message with the error as its reason.
    fn store_before_settle(&self, cx: &mut ProcessContext, value: Value, ttl: Duration) {
        let backend = Arc::clone(&self.backend);
        let message = cx.message().clone();
        cx.before_settle(async move {
            let backoff = (Duration::from_millis(100), Duration::from_secs(5));
            crate::support::retry_transient("store the result", backoff, None, None, || {
                backend.store(&message, value.clone(), ttl)
            })
            .await
            .inspect_err(
                |e| tracing::error!(message_id = %message.message_id, error = %e, "could not store the result"),
            )
        });
    }
}

#[async_trait]
impl super::Middleware for Results {
    fn actor_options(&self) -> &[&'static str] {
        troupe_options::read_by(troupe_options::middleware::RESULTS)
    }

    async fn after_process(&self, cx: &mut ProcessContext, outcome: &Outcome) {
        let (store, ttl) = self.lookup(cx);
        if !store || cx.wants_requeue() {
            return;
        }
        // A failure is stored only when the message is dead-lettered (not when it is retried),
        // a skipped message's result is None.
        let value = match (cx.failure_reason(), outcome) {
            (Some(_), Outcome::Failure(e)) => wrap_failure(e.type_name(), e.message()),
            (Some(reason), _) => {
                let (t, m) = reason.split_once(": ").unwrap_or(("Exception", reason));
                wrap_failure(t, m)
            }
            (None, Outcome::Success(value)) => value.clone(),
            (None, Outcome::Skipped) => Value::Null,
            (None, Outcome::Failure(_)) => return,
        };
        self.store_before_settle(cx, value, ttl);
    }
}

impl Results {
    /// Wraps it for the app's middleware list.
    #[must_use]
    pub fn into_middleware(self) -> Arc<dyn Middleware> {
        Arc::new(self)
    }
}
