use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{Middleware, Next, Outcome, ProcessContext};
use crate::app::App;
use crate::composition::{GROUP_BARRIER_TTL, finished_barrier};
use crate::error::Result;
use crate::message::{Message, option_keys};
use crate::state::StateBackend;

/// Sends a group's completion callbacks ([`Group`](crate::Group)) when its last child
/// finishes, through a barrier in the app's state backend: Dramatiq's `GroupCallbacks` (on
/// success, the options `group_completion_uuid` and `group_completion_callbacks`, the barrier
/// under the raw uuid), and Troupe's finished callbacks (on any final outcome, with every
/// child's outcome). On by default whenever the app has a state backend.
///
/// A child arrives once, at its final outcome (after the last retry), with an arrival that
/// counts each message id once, so a child redelivered after a crash is not counted twice. The
/// arrival and the callbacks' enqueue are written before the child is acked (a failure
/// requeues the child). Only the child whose arrival cleared the barrier sends the callbacks;
/// if its send was interrupted (a crash, a failed enqueue), it sends them when it is redelivered
/// and arrives again.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct GroupCallbacks {
    /// How long barriers live after an arrival (default 24 hours, Dramatiq's).
    pub barrier_ttl: Duration,
}

impl Default for GroupCallbacks {
    fn default() -> Self {
        Self {
            barrier_ttl: GROUP_BARRIER_TTL,
        }
    }
}

/// The callback messages of an option (message dicts), if any.
fn callbacks(message: &Message, key: &str) -> Vec<Value> {
    message
        .options
        .get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

#[async_trait]
impl Middleware for GroupCallbacks {
    fn after_hooks(&self) -> bool {
        false
    }

    fn enqueue_hooks(&self) -> bool {
        false
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let outcome = next.run(cx).await;
        let message = cx.message();
        let Some(group) = message
            .options
            .get(option_keys::GROUP_COMPLETION_UUID)
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return outcome;
        };
        // Only a final outcome arrives: a failure that will be retried does not.
        let (finished, success) = match &outcome {
            Outcome::Success(_) => (true, !cx.is_failed()),
            Outcome::Failure(_) => (cx.is_failed(), false),
            Outcome::Skipped => (true, false),
        };
        if !finished {
            return outcome;
        }
        let completion = if success {
            callbacks(message, option_keys::GROUP_COMPLETION_CALLBACKS)
        } else {
            Vec::new()
        };
        let on_finish = callbacks(message, option_keys::GROUP_FINISHED_CALLBACKS);
        if completion.is_empty() && on_finish.is_empty() {
            return outcome;
        }
        let Some(state) = cx.app().state().cloned() else {
            tracing::error!(group = %group, "a group child finished in an app without a state backend: its group's callbacks cannot be sent");
            return outcome;
        };
        let mut record = match &outcome {
            Outcome::Success(value) => json!({"ok": true, "result": value}),
            Outcome::Failure(e) => json!({"ok": false, "error": {"type": e.type_name(), "message": e.message()}}),
            Outcome::Skipped => json!({"ok": false, "skipped": true}),
        };
        record["message_id"] = Value::from(message.message_id.clone());
        record["index"] = message
            .options
            .get(option_keys::GROUP_INDEX)
            .cloned()
            .unwrap_or(Value::Null);
        let arrival = Arrive {
            app: cx.app().clone(),
            state,
            party: message.message_id.clone(),
            ttl: self.barrier_ttl,
        };
        cx.before_settle(async move {
            if !completion.is_empty() {
                arrival.arrive(&group, "", completion, false).await?;
            }
            if !on_finish.is_empty() {
                arrival
                    .arrive(&finished_barrier(&group), &record.to_string(), on_finish, true)
                    .await?;
            }
            Ok(())
        });
        outcome
    }
}

/// One child's arrival at its group's barriers.
struct Arrive {
    app: App,
    state: Arc<dyn StateBackend>,
    party: String,
    ttl: Duration,
}

impl Arrive {
    /// Arrives at `barrier` with `outcome`; when that clears it, sends `callbacks` (with the
    /// children's outcomes appended when `with_outcomes`) unless a send is known done.
    async fn arrive(&self, barrier: &str, outcome: &str, callbacks: Vec<Value>, with_outcomes: bool) -> Result<()> {
        let arrival = self.state.arrive(barrier, &self.party, outcome, self.ttl).await?;
        // Only the child whose arrival cleared the barrier sends.
        if !arrival.cleared || !arrival.clearer {
            return Ok(());
        }
        let sent = format!("{barrier}@sent");
        // Its repeat (it was redelivered) sends only if its first send never finished.
        if !arrival.counted && self.state.get(&sent).await?.is_some() {
            return Ok(());
        }
        let outcomes = if with_outcomes {
            let mut all: Vec<Value> = self
                .state
                .arrivals(barrier)
                .await?
                .into_iter()
                .filter_map(|(_, o)| serde_json::from_str(&o).ok())
                .collect();
            all.sort_by_key(|o| o["index"].as_u64().unwrap_or(u64::MAX));
            for o in &mut all {
                if let Some(map) = o.as_object_mut() {
                    map.remove("index");
                }
            }
            Some(Value::Array(all))
        } else {
            None
        };
        for callback in callbacks {
            let mut message = match Message::from_value(callback) {
                Ok(message) => message,
                Err(e) => {
                    // Bad input is not retried: the other callbacks still go.
                    tracing::error!(barrier = %barrier, error = %e, "a group callback is not a message; it is dropped");
                    continue;
                }
            };
            // A pipeline's stage after a group (it keeps its delay, as `Pipelines` sends one).
            let pipe_stage = message.option_bool(option_keys::GROUP_RESULTS) == Some(true);
            if let Some(outcomes) = &outcomes {
                if pipe_stage {
                    // A pipeline's stage after a group: every child's result, or no stage.
                    let all = outcomes.as_array().map(Vec::as_slice).unwrap_or_default();
                    if all.iter().any(|o| o["ok"] != true) {
                        tracing::info!(barrier = %barrier, "a child of a pipeline's group failed: the pipeline stops");
                        continue;
                    }
                    if !message.pipe_ignore().unwrap_or(false) {
                        message
                            .args
                            .push(Value::Array(all.iter().map(|o| o["result"].clone()).collect()));
                    }
                } else {
                    message.args.push(outcomes.clone());
                }
            }
            let delay = message.delay().filter(|d| pipe_stage && !d.is_zero());
            self.app.enqueue(message, delay).await?;
        }
        self.state.add(&sent, 1, self.ttl).await?;
        Ok(())
    }
}
