use std::time::Duration;

use async_trait::async_trait;

use super::{Middleware, Next, Outcome, ProcessContext};
use crate::message::now_ms;

/// Dead-letters messages older than their `max_age` instead of running them. A `max_age` of 0
/// (on the message, the actor or here) is no limit.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct AgeLimit {
    /// The default maximum age (none: no limit).
    pub max_age: Option<Duration>,
}

impl AgeLimit {
    /// An age limit with a default maximum age for every actor.
    #[must_use]
    pub fn new(max_age: Option<Duration>) -> Self {
        Self { max_age }
    }
}

#[async_trait]
impl Middleware for AgeLimit {
    fn after_hooks(&self) -> bool {
        false
    }

    fn enqueue_hooks(&self) -> bool {
        false
    }

    fn actor_options(&self) -> &[&'static str] {
        troupe_options::read_by(troupe_options::middleware::AGE_LIMIT)
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let max_age = cx
            .message()
            .max_age()
            .or_else(|| cx.actor().and_then(|a| a.options().max_age))
            .or(self.max_age)
            .filter(|max_age| !max_age.is_zero());
        if let Some(max_age) = max_age {
            let age = now_ms().saturating_sub(cx.message().message_timestamp);
            if u128::from(age) >= max_age.as_millis() {
                let max_ms = max_age.as_millis();
                tracing::warn!(message_id = %cx.message().message_id, age_ms = age, max_age_ms = max_ms, "message age limit exceeded; dead-lettering it");
                // Dramatiq's exact text: Python clients read it back from the results backend.
                cx.fail("SkipMessage: Message age limit exceeded");
                return Outcome::Skipped;
            }
        }
        next.run(cx).await
    }
}
