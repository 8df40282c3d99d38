//! Pipelines: chains of messages where each stage's result feeds the next.

use std::time::Duration;

use serde_json::Value;

use crate::app::App;
use crate::error::{Error, Result};
use crate::message::Message;

/// A chain of messages run one after another; each stage's result is appended to the next
/// stage's arguments (unless that stage has `pipe_ignore`). A failure stops the chain.
///
/// Built as Dramatiq builds it (`options.pipe_target` nests the rest of the chain), so a Python
/// worker can run a pipeline Troupe enqueued and the reverse.
#[derive(Clone, Debug)]
pub struct Pipeline {
    messages: Vec<Message>,
}

impl Pipeline {
    /// A pipeline of `messages`, in order.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no message.
    pub fn new(messages: Vec<Message>) -> Result<Self> {
        if messages.is_empty() {
            return Err(Error::Config("a pipeline needs at least one message".into()));
        }
        let mut chained: Vec<Message> = Vec::with_capacity(messages.len());
        let mut next: Option<Message> = None;
        for mut message in messages.into_iter().rev() {
            if let Some(target) = next.take() {
                message.set_pipe_target(&target);
            }
            next = Some(message.clone());
            chained.push(message);
        }
        chained.reverse();
        Ok(Self { messages: chained })
    }

    /// The stages, each with its `pipe_target` set.
    #[must_use]
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Enqueues the first stage (after the larger of `delay` and its own `delay` option).
    ///
    /// # Errors
    /// As [`App::enqueue`].
    pub async fn run(&self, app: &App, delay: Option<Duration>) -> Result<Message> {
        let first = self.messages[0].clone();
        let own = first.delay();
        let delay = match (delay, own) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
        .filter(|d| !d.is_zero());
        app.enqueue(first, delay).await
    }

    /// The last stage's result.
    ///
    /// # Errors
    /// As [`App::get_result`].
    pub async fn get_result(&self, app: &App, timeout: Option<Duration>) -> Result<Value> {
        let last = self
            .messages
            .last()
            .ok_or_else(|| Error::Config("empty pipeline".into()))?;
        app.get_result(last, timeout).await
    }
}

/// A pipeline of `messages` (Dramatiq's `pipeline([...])`).
///
/// # Errors
/// [`Error::Config`] when there is no message.
pub fn pipeline(messages: Vec<Message>) -> Result<Pipeline> {
    Pipeline::new(messages)
}
