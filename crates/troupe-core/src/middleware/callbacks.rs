use async_trait::async_trait;
use serde_json::{Value, json};

use super::{Middleware, Next, Outcome, ProcessContext};

/// Sends `on_success` and `on_failure` callback actors a message after each attempt:
/// `(message, result)` on success, `(message, {"type", "message"})` on every failed attempt.
#[derive(Clone, Copy, Debug, Default)]
pub struct Callbacks;

/// The callback actor for `outcome`'s key: the message's, else the actor's.
fn callback(cx: &ProcessContext, success: bool) -> Option<String> {
    let message = cx.message();
    let own = if success {
        message.on_success()
    } else {
        message.on_failure()
    };
    own.map(str::to_owned).or_else(|| {
        let options = cx.actor()?.options();
        if success {
            options.on_success.clone()
        } else {
            options.on_failure.clone()
        }
    })
}

#[async_trait]
impl Middleware for Callbacks {
    fn after_hooks(&self) -> bool {
        false
    }

    fn enqueue_hooks(&self) -> bool {
        false
    }

    fn actor_options(&self) -> &[&'static str] {
        troupe_options::read_by(troupe_options::middleware::CALLBACKS)
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let outcome = next.run(cx).await;
        let success = match &outcome {
            Outcome::Success(_) => true,
            Outcome::Failure(_) => false,
            Outcome::Skipped => return outcome,
        };
        if let Some(target) = callback(cx, success) {
            // In its own box: the send's future is large, and most messages have no callback.
            Box::pin(send_callback(cx, &outcome, target)).await;
        }
        outcome
    }
}

/// Sends the callback actor `target` its message: `(message, result)` after a success,
/// `(message, {"type", "message"})` after a failure.
async fn send_callback(cx: &mut ProcessContext, outcome: &Outcome, target: String) {
    let (key, payload) = match outcome {
        Outcome::Success(v) => ("on_success", v.clone()),
        Outcome::Failure(e) => ("on_failure", json!({"type": e.type_name(), "message": e.message()})),
        Outcome::Skipped => return,
    };
    let args: Vec<Value> = vec![cx.message().to_value(), payload];
    let what = format!("send the {key} callback ({target})");
    super::follow_up(cx, &what, |app| {
        let (target, args) = (target.clone(), args.clone());
        async move { app.send_to(&target, args).await }
    })
    .await;
}
