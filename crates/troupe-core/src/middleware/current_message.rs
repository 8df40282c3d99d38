use async_trait::async_trait;

use super::{Middleware, Next, Outcome, ProcessContext};
use crate::message::Message;

tokio::task_local! {
    static CURRENT: Message;
}

/// Makes the message being processed available to the actor through [`current_message`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CurrentMessage;

/// The message the calling actor is processing, when the [`CurrentMessage`] middleware is on.
#[must_use]
pub fn current_message() -> Option<Message> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs a blocking closure with `message` as the current message (for sync actors run on the
/// blocking pool, where task-locals do not follow).
#[doc(hidden)]
pub fn with_current_message<R>(message: Option<Message>, f: impl FnOnce() -> R) -> R {
    match message {
        Some(m) => CURRENT.sync_scope(m, f),
        None => f(),
    }
}

#[async_trait]
impl Middleware for CurrentMessage {
    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let message = cx.message().clone();
        CURRENT.scope(message, next.run(cx)).await
    }
}
