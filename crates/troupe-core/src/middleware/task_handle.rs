//! What a running actor sees of its own task: a stop signal it can watch (cancellation, soft
//! time limit, shutdown) and a way to report progress.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::app::App;
use crate::error::{Error, Result};

/// Why an actor is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StopReason {
    /// The task was cancelled (`App::cancel` with [`CancelMode::Abort`](crate::CancelMode::Abort),
    /// or dramatiq-abort's `abort`). An async actor is dropped at its next `.await` once its
    /// grace period passes; a blocking one is abandoned and its outcome discarded.
    Cancelled,
    /// The soft time limit passed: the hard time limit comes next. Save partial work and return.
    SoftTimeLimit,
    /// The worker is shutting down and the actor opted into `notify_shutdown`.
    Shutdown,
}

impl StopReason {
    /// The reason's name (`"cancelled"`, `"soft_time_limit"`, `"shutdown"`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::SoftTimeLimit => "soft_time_limit",
            Self::Shutdown => "shutdown",
        }
    }
}

/// The running task of the calling actor, from [`current_task`](crate::current_task): watch
/// [`stopped`](Self::stopped) to stop cleanly, and [`report_progress`](Self::report_progress)
/// to let users see how far it got.
///
/// ```
/// # use troupe_core::{ActorError, current_task};
/// async fn crawl(pages: Vec<String>) -> Result<usize, ActorError> {
///     let task = current_task()?;
///     for (done, _page) in pages.iter().enumerate() {
///         if task.is_stopped() {
///             // save what was fetched so far, then return
///             return Ok(done);
///         }
///         // fetch(page).await?;
///         task.report_progress(serde_json::json!({"done": done + 1, "of": pages.len()})).await?;
///     }
///     Ok(pages.len())
/// }
/// ```
#[derive(Clone, Debug)]
pub struct TaskHandle(Arc<Shared>);

/// What a handle and its clones share: one allocation per task, and clones that cost a count.
#[derive(Debug)]
struct Shared {
    message_id: String,
    /// Made when first needed (an actor that watches, a stop): most tasks never need it.
    stop: OnceLock<Arc<Stop>>,
    app: Option<App>,
    retention: Duration,
    running: Option<Arc<RunningSignal>>,
}

/// The stop signal and its reason.
#[derive(Debug, Default)]
struct Stop {
    token: CancellationToken,
    reason: OnceLock<StopReason>,
}

impl Shared {
    fn stop(&self) -> &Stop {
        self.stop.get_or_init(Arc::default)
    }
}

impl Clone for Shared {
    /// A copy that shares the stop signal: it is made first if it was not yet, so a stop
    /// through either copy reaches both.
    fn clone(&self) -> Self {
        let stop = Arc::clone(self.stop.get_or_init(Arc::default));
        Self {
            message_id: self.message_id.clone(),
            stop: OnceLock::from(stop),
            app: self.app.clone(),
            retention: self.retention,
            running: self.running.clone(),
        }
    }
}

/// Between an attempt's handle and the tracking: a progress report asks for the attempt's
/// `running` state to be written first (the tracking writes it only after a while), and
/// waits until it is.
#[derive(Debug)]
pub(crate) struct RunningSignal {
    asked: tokio::sync::Notify,
    written: tokio::sync::watch::Sender<bool>,
}

impl RunningSignal {
    pub(crate) fn new() -> Self {
        Self {
            asked: tokio::sync::Notify::new(),
            written: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Completes when a report asked for the `running` state.
    pub(crate) async fn asked(&self) {
        self.asked.notified().await;
    }

    /// The `running` state is written (or will not be).
    pub(crate) fn written(&self) {
        self.written.send_replace(true);
    }

    /// Asks for the `running` state and waits (at most 5 s) until it is written.
    async fn ask_and_wait(&self) {
        let mut written = self.written.subscribe();
        if *written.borrow() {
            return;
        }
        self.asked.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(5), written.wait_for(|w| *w)).await;
    }
}

impl TaskHandle {
    /// A handle for the task of `message_id`, reporting progress through `app`'s task store.
    #[must_use]
    pub fn new(message_id: impl Into<String>, app: Option<App>) -> Self {
        Self(Arc::new(Shared {
            message_id: message_id.into(),
            stop: OnceLock::new(),
            app,
            retention: crate::tasks::DEFAULT_TASK_RETENTION,
            running: None,
        }))
    }

    /// Progress reports first ask the tracking to write the `running` state through `signal`.
    pub(crate) fn with_running_signal(mut self, signal: Arc<RunningSignal>) -> Self {
        Arc::make_mut(&mut self.0).running = Some(signal);
        self
    }

    /// Progress is kept for `retention` after it is reported (the tracking's retention).
    #[must_use]
    pub fn with_retention(mut self, retention: Duration) -> Self {
        Arc::make_mut(&mut self.0).retention = retention;
        self
    }

    /// The task's message id.
    #[must_use]
    pub fn message_id(&self) -> &str {
        &self.0.message_id
    }

    /// Asks the actor to stop for `reason` (the first reason given is kept).
    pub fn stop(&self, reason: StopReason) {
        let stop = self.0.stop();
        let _ = stop.reason.set(reason);
        stop.token.cancel();
    }

    /// Whether the actor was asked to stop.
    #[must_use]
    pub fn is_stopped(&self) -> bool {
        self.0.stop.get().is_some_and(|stop| stop.token.is_cancelled())
    }

    /// Why the actor was asked to stop, once it was.
    #[must_use]
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.0.stop.get().and_then(|stop| stop.reason.get().copied())
    }

    /// Completes when the actor is asked to stop (cancelled, soft time limit, shutdown).
    pub fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.0.stop().token.cancelled()
    }

    /// The token that fires when the actor is asked to stop, to hand to code that takes one.
    #[must_use]
    pub fn token(&self) -> CancellationToken {
        self.0.stop().token.clone()
    }

    /// Stores `progress` (any serialisable value) with the task's state, readable by id
    /// through `App::task` while the task runs and after. Without tracking (no state backend
    /// that keeps task states, or `track_tasks` off) there is no record to keep it in, and the
    /// report is dropped: actors report progress the same way whatever the app's setup.
    ///
    /// # Errors
    /// A value that does not serialise; a store error.
    pub async fn report_progress(&self, progress: impl Serialize) -> Result<()> {
        let value = serde_json::to_value(progress).map_err(|e| Error::Encode(format!("progress: {e}")))?;
        self.store_progress(&value).await
    }

    /// [`report_progress`](Self::report_progress) from a blocking (`fn`) actor.
    ///
    /// # Errors
    /// As `report_progress`; also outside a tokio runtime.
    pub fn report_progress_blocking(&self, progress: impl Serialize) -> Result<()> {
        let value = serde_json::to_value(progress).map_err(|e| Error::Encode(format!("progress: {e}")))?;
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Config("report_progress_blocking needs the worker's tokio runtime".into()))?;
        handle.block_on(self.store_progress(&value))
    }

    async fn store_progress(&self, value: &Value) -> Result<()> {
        let shared = &self.0;
        let app = shared.app.as_ref().filter(|app| app.tracks_tasks());
        let Some(store) = app.and_then(|app| app.task_store().ok()) else {
            tracing::debug!(message_id = %shared.message_id, "no task store: progress not kept");
            return Ok(());
        };
        if let Some(running) = &shared.running {
            running.ask_and_wait().await;
        }
        if !store.set_progress(&shared.message_id, value, shared.retention).await? {
            tracing::debug!(message_id = %shared.message_id, "no task record (tracking is off): progress not kept");
        }
        Ok(())
    }
}
