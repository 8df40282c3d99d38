use async_trait::async_trait;

use super::{Middleware, Next, Outcome, ProcessContext};
use crate::message::Message;

use crate::app::App;

tokio::task_local! {
    static CURRENT: Message;
    static APP: App;
}

/// Makes the message being processed, and the app processing it, available to the actor
/// through [`current_message`] and [`current_app`] (so an actor can send further messages).
#[derive(Clone, Copy, Debug, Default)]
pub struct CurrentMessage;

/// The message the calling actor is processing, when the [`CurrentMessage`] middleware is on.
#[must_use]
pub fn current_message() -> Option<Message> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The app whose worker runs the calling actor, when the [`CurrentMessage`] middleware is on
/// (it is by default): actors use it to send further messages (fan-out) or read results. Use
/// it with `?` inside an actor:
///
/// ```
/// # use troupe_core::{ActorError, current_app};
/// async fn fan_out() -> Result<(), ActorError> {
///     let app = current_app()?;
///     // app.send(&Next, (42,)).await?;
/// #   let _ = app;
///     Ok(())
/// }
/// ```
///
/// # Errors
/// [`Error::NoCurrentApp`](crate::Error::NoCurrentApp) outside an actor run by a worker.
pub fn current_app() -> crate::Result<App> {
    APP.try_with(Clone::clone).map_err(|_| crate::Error::NoCurrentApp)
}

/// Runs a blocking closure with `message` as the current message (for sync actors run on the
/// blocking pool, where task-locals do not follow).
#[doc(hidden)]
pub fn with_current_message<R>(message: Option<Message>, app: Option<App>, f: impl FnOnce() -> R) -> R {
    match (message, app) {
        (Some(m), Some(a)) => CURRENT.sync_scope(m, || APP.sync_scope(a, f)),
        (Some(m), None) => CURRENT.sync_scope(m, f),
        (None, Some(a)) => APP.sync_scope(a, f),
        (None, None) => f(),
    }
}

#[async_trait]
impl Middleware for CurrentMessage {
    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let message = cx.message().clone();
        let app = cx.app().clone();
        CURRENT.scope(message, APP.scope(app, next.run(cx))).await
    }
}
