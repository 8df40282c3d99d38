use async_trait::async_trait;

use super::{Middleware, Next, Outcome, ProcessContext};
use crate::message::Message;

use crate::app::App;

use super::TaskHandle;

tokio::task_local! {
    static CURRENT: Message;
    static APP: App;
    static TASK: TaskHandle;
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

/// The running task of the calling actor (run by a worker with the [`CurrentMessage`]
/// middleware, on by default): watch it to stop cleanly when the task is cancelled or its soft
/// time limit passes, and report progress through it. Works in blocking (`fn`) actors too.
///
/// # Errors
/// [`Error::NoCurrentApp`](crate::Error::NoCurrentApp) outside an actor run by a worker.
pub fn current_task() -> crate::Result<TaskHandle> {
    TASK.try_with(Clone::clone).map_err(|_| crate::Error::NoCurrentApp)
}

/// What a blocking actor takes along to the blocking pool, where task-locals do not follow.
#[doc(hidden)]
#[derive(Debug)]
pub struct Scope {
    message: Option<Message>,
    app: Option<App>,
    task: Option<TaskHandle>,
}

impl Scope {
    /// The calling task's current message, app and task handle.
    #[must_use]
    pub fn capture() -> Self {
        Self {
            message: current_message(),
            app: current_app().ok(),
            task: current_task().ok(),
        }
    }

    /// Runs `f` with them as current.
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        let Self { message, app, task } = self;
        let with_task = move || match task {
            Some(t) => TASK.sync_scope(t, f),
            None => f(),
        };
        let with_app = move || match app {
            Some(a) => APP.sync_scope(a, with_task),
            None => with_task(),
        };
        match message {
            Some(m) => CURRENT.sync_scope(m, with_app),
            None => with_app(),
        }
    }
}

#[async_trait]
impl Middleware for CurrentMessage {
    fn after_hooks(&self) -> bool {
        false
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let message = cx.message().clone();
        let app = cx.app().clone();
        let task = cx.task().clone();
        CURRENT
            .scope(message, APP.scope(app, TASK.scope(task, next.run(cx))))
            .await
    }
}
