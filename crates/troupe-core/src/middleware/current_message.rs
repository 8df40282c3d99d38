use std::sync::Arc;

use async_trait::async_trait;

use super::{Middleware, Next, Outcome, ProcessContext};
use crate::message::Message;

use crate::app::App;

use super::TaskHandle;

/// What an actor run by a worker sees of its run: one task-local (each task-local scope is
/// entered and left on every poll of the actor).
#[derive(Clone, Debug)]
struct Current {
    message: Arc<Message>,
    app: App,
    task: TaskHandle,
}

tokio::task_local! {
    static CURRENT: Current;
}

/// Makes the message being processed, and the app processing it, available to the actor
/// through [`current_message`] and [`current_app`] (so an actor can send further messages).
#[derive(Clone, Copy, Debug, Default)]
pub struct CurrentMessage;

/// The message the calling actor is processing, when the [`CurrentMessage`] middleware is on.
#[must_use]
pub fn current_message() -> Option<Message> {
    CURRENT.try_with(|c| Message::clone(&c.message)).ok()
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
    CURRENT
        .try_with(|c| c.app.clone())
        .map_err(|_| crate::Error::NoCurrentApp)
}

/// The running task of the calling actor (run by a worker with the [`CurrentMessage`]
/// middleware, on by default): watch it to stop cleanly when the task is cancelled or its soft
/// time limit passes, and report progress through it. Works in blocking (`fn`) actors too.
///
/// # Errors
/// [`Error::NoCurrentApp`](crate::Error::NoCurrentApp) outside an actor run by a worker.
pub fn current_task() -> crate::Result<TaskHandle> {
    CURRENT
        .try_with(|c| c.task.clone())
        .map_err(|_| crate::Error::NoCurrentApp)
}

/// What a blocking actor takes along to the blocking pool, where task-locals do not follow.
#[doc(hidden)]
#[derive(Debug)]
pub struct Scope {
    current: Option<Current>,
}

impl Scope {
    /// The calling task's current message, app and task handle.
    #[must_use]
    pub fn capture() -> Self {
        Self {
            current: CURRENT.try_with(Clone::clone).ok(),
        }
    }

    /// Runs `f` with them as current.
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        match self.current {
            Some(current) => CURRENT.sync_scope(current, f),
            None => f(),
        }
    }
}

#[async_trait]
impl Middleware for CurrentMessage {
    fn after_hooks(&self) -> bool {
        false
    }

    fn enqueue_hooks(&self) -> bool {
        false
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let current = Current {
            message: cx.shared_message(),
            app: cx.app().clone(),
            task: cx.task().clone(),
        };
        CURRENT.scope(current, next.run(cx)).await
    }
}
