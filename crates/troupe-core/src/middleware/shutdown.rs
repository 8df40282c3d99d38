use std::sync::Mutex;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{Middleware, Next, Outcome, ProcessContext};
use crate::app::App;

/// Cancels actors that opted in (`notify_shutdown`) when the worker begins to shut down; they
/// fail with `Shutdown` and are retried later by another worker.
#[derive(Debug, Default)]
pub struct ShutdownNotifications {
    notify_shutdown: bool,
    token: Mutex<CancellationToken>,
}

impl ShutdownNotifications {
    /// With `notify_shutdown` as the default for every actor.
    #[must_use]
    pub fn new(notify_shutdown: bool) -> Self {
        Self {
            notify_shutdown,
            token: Mutex::default(),
        }
    }

    fn token(&self) -> CancellationToken {
        self.token.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

#[async_trait]
impl Middleware for ShutdownNotifications {
    fn after_hooks(&self) -> bool {
        false
    }

    fn enqueue_hooks(&self) -> bool {
        false
    }

    fn actor_options(&self) -> &[&'static str] {
        troupe_options::read_by(troupe_options::middleware::SHUTDOWN_NOTIFICATIONS)
    }

    async fn on_worker_boot(&self, _app: &App) {
        if let Ok(mut token) = self.token.lock()
            && token.is_cancelled()
        {
            *token = CancellationToken::new();
        }
    }

    async fn on_worker_shutdown(&self, _app: &App) {
        self.token().cancel();
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let notify = cx
            .message()
            .notify_shutdown()
            .unwrap_or_else(|| cx.actor().is_some_and(|a| a.options().notify_shutdown) || self.notify_shutdown);
        if notify {
            cx.cancel_on(self.token());
        }
        next.run(cx).await
    }
}
