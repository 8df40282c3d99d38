use async_trait::async_trait;

use super::{Middleware, Next, Outcome, ProcessContext};
use crate::composition::Group;
use crate::message::{Message, option_keys};

/// Enqueues a pipeline's next stage (`options.pipe_target`) after a success, with the result
/// appended to its arguments unless `pipe_ignore` is set; or runs it, when it is a group
/// (`options.troupe_pipe_group`), each of its messages given the result.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pipelines;

#[async_trait]
impl Middleware for Pipelines {
    fn after_hooks(&self) -> bool {
        false
    }

    fn enqueue_hooks(&self) -> bool {
        false
    }

    fn actor_options(&self) -> &[&'static str] {
        troupe_options::read_by(troupe_options::middleware::PIPELINES)
    }

    async fn process(&self, cx: &mut ProcessContext, next: Next<'_>) -> Outcome {
        let outcome = next.run(cx).await;
        let message = cx.message();
        if !matches!(outcome, Outcome::Success(_))
            || cx.is_failed()
            || (message.pipe_target().is_none() && !message.options.contains_key(option_keys::PIPE_GROUP))
        {
            return outcome;
        }
        // In its own box: the next stage's future is large, and most messages have none.
        Box::pin(next_stage(cx, outcome)).await
    }
}

/// After a success: runs or enqueues the pipeline's next stage.
async fn next_stage(cx: &mut ProcessContext, outcome: Outcome) -> Outcome {
    let Outcome::Success(result) = &outcome else {
        return outcome;
    };
    if let Some(next) = cx.message().options.get(option_keys::PIPE_GROUP).cloned() {
        // The next stage is a group: its messages get the result, run in parallel, and the
        // stage after it gets their results once all succeeded.
        let ignore = cx.actor().is_some_and(|a| a.options().pipe_ignore);
        let group = Group::from_pipe_group(&next, (!ignore).then_some(result));
        match group {
            Ok(group) => {
                super::follow_up(cx, "run the pipeline's next stage (a group)", |app| {
                    let group = group.clone();
                    async move { group.run(&app, None).await }
                })
                .await;
            }
            Err(e) => tracing::error!(error = %e, "options.troupe_pipe_group is not a group of messages"),
        }
        return outcome;
    }
    let Some(target) = cx.message().pipe_target().cloned() else {
        return outcome;
    };
    match Message::from_value(target) {
        Ok(mut next_message) => {
            // Either the next stage or the actor that ran asks to ignore the result.
            let ignore =
                next_message.pipe_ignore().unwrap_or(false) || cx.actor().is_some_and(|a| a.options().pipe_ignore);
            if !ignore {
                next_message.args.push(result.clone());
            }
            let delay = next_message.delay().filter(|d| !d.is_zero());
            super::follow_up(cx, "enqueue the next pipeline stage", |app| {
                let next_message = next_message.clone();
                async move { app.enqueue(next_message, delay).await }
            })
            .await;
        }
        Err(e) => tracing::error!(error = %e, "options.pipe_target is not a message"),
    }
    outcome
}
