use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::{Middleware, Next, Outcome, ProcessContext};
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

    async fn store(&self, cx: &ProcessContext, value: Value, ttl: Duration) {
        if let Err(e) = self.backend.store(cx.message(), value, ttl).await {
            tracing::error!(message_id = %cx.message().message_id, error = %e, "could not store the result");
        }
    }
}

#[async_trait]
impl super::Middleware for Results {
    fn actor_options(&self) -> &[&'static str] {
        troupe_options::read_by(troupe_options::middleware::RESULTS)
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let outcome = next.run(cx).await;
        if let Outcome::Success(value) = &outcome {
            let (store, ttl) = self.lookup(cx);
            if store {
                self.store(cx, value.clone(), ttl).await;
            }
        }
        outcome
    }

    async fn after_skip(&self, cx: &ProcessContext) {
        let (store, ttl) = self.lookup(cx);
        if store && !cx.is_failed() {
            self.store(cx, Value::Null, ttl).await;
        }
    }

    async fn after_nack(&self, cx: &ProcessContext, outcome: &Outcome) {
        let (store, ttl) = self.lookup(cx);
        if !store {
            return;
        }
        let value = match outcome {
            Outcome::Failure(e) => wrap_failure(e.type_name(), e.message()),
            _ => {
                let reason = cx.failure_reason().unwrap_or("message failed");
                let (t, m) = reason.split_once(": ").unwrap_or(("Exception", reason));
                wrap_failure(t, m)
            }
        };
        self.store(cx, value, ttl).await;
    }
}

impl Results {
    /// Wraps it for the app's middleware list.
    #[must_use]
    pub fn into_middleware(self) -> Arc<dyn Middleware> {
        Arc::new(self)
    }
}
