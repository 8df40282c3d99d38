use async_trait::async_trait;
use serde_json::{Value, json};

use super::{Middleware, Next, Outcome, ProcessContext};

/// Sends `on_success` and `on_failure` callback actors a message after each attempt:
/// `(message, result)` on success, `(message, {"type", "message"})` on every failed attempt.
#[derive(Clone, Copy, Debug, Default)]
pub struct Callbacks;

fn callback(cx: &ProcessContext, key: &str) -> Option<String> {
    cx.message().option_str(key).map(str::to_owned).or_else(|| {
        let options = cx.actor()?.options();
        match key {
            "on_success" => options.on_success.clone(),
            _ => options.on_failure.clone(),
        }
    })
}

#[async_trait]
impl Middleware for Callbacks {
    fn actor_options(&self) -> &[&'static str] {
        &["on_success", "on_failure"]
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let outcome = next.run(cx).await;
        let (key, payload) = match &outcome {
            Outcome::Success(v) => ("on_success", v.clone()),
            Outcome::Failure(e) => ("on_failure", json!({"type": e.type_name(), "message": e.message()})),
            Outcome::Skipped => return outcome,
        };
        if let Some(target) = callback(cx, key) {
            let args: Vec<Value> = vec![cx.message().to_value(), payload];
            if let Err(e) = cx.app().send_to(&target, args).await {
                tracing::error!(callback = %target, error = %e, "could not send the {key} callback");
            }
        }
        outcome
    }
}
