//! Pipelines (chains of messages where each stage's result feeds the next) and groups
//! (messages run in parallel, with completion callbacks).

use std::time::Duration;

use serde_json::Value;

use crate::app::App;
use crate::error::{Error, Result};
use crate::message::{Message, option_keys};

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

/// How long a group's barrier lives after its last arrival (Dramatiq's `GroupCallbacks`
/// default: 24 hours).
pub const GROUP_BARRIER_TTL: Duration = Duration::from_secs(24 * 3600);

/// One member of a [`Group`]: a message, a pipeline (its last stage's result is the member's)
/// or a group (its results, in order).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum GroupChild {
    /// A single message.
    Message(Message),
    /// A pipeline.
    Pipeline(Pipeline),
    /// A nested group.
    Group(Group),
}

impl From<Message> for GroupChild {
    fn from(message: Message) -> Self {
        Self::Message(message)
    }
}

impl From<Pipeline> for GroupChild {
    fn from(pipeline: Pipeline) -> Self {
        Self::Pipeline(pipeline)
    }
}

impl From<Group> for GroupChild {
    fn from(group: Group) -> Self {
        Self::Group(group)
    }
}

/// Messages, pipelines and groups run in parallel (Dramatiq's `group`), with optional
/// completion callbacks through a barrier on the app's state backend:
///
/// - [`add_completion_callback`](Self::add_completion_callback): Dramatiq's, sent once every
///   child succeeded (a child that fails for good means it is never sent, as in Dramatiq), with
///   Dramatiq's options and barrier, so Python's `GroupCallbacks` and Troupe's interoperate;
/// - [`add_finished_callback`](Self::add_finished_callback): sent once every child finished,
///   failed or not, with the children's outcomes appended to its arguments: a list, in the
///   group's order, of `{"message_id", "ok": true, "result"}`, `{"message_id", "ok": false,
///   "error": {"type", "message"}}` or `{"message_id", "ok": false, "skipped": true}`.
///
/// Each child counts once, at its final outcome: retries do not count, and a child redelivered
/// after its worker was killed is not counted twice.
#[derive(Clone, Debug)]
pub struct Group {
    children: Vec<GroupChild>,
    completion: Vec<Message>,
    finished: Vec<Message>,
    barrier_ttl: Duration,
}

/// A group of `children` (Dramatiq's `group([...])`).
pub fn group<C: Into<GroupChild>>(children: impl IntoIterator<Item = C>) -> Group {
    Group::new(children)
}

impl Group {
    /// A group of `children`.
    pub fn new<C: Into<GroupChild>>(children: impl IntoIterator<Item = C>) -> Self {
        Self {
            children: children.into_iter().map(Into::into).collect(),
            completion: Vec::new(),
            finished: Vec::new(),
            barrier_ttl: GROUP_BARRIER_TTL,
        }
    }

    /// Sends `message` once every child succeeded (Dramatiq's `add_completion_callback`).
    #[must_use]
    pub fn add_completion_callback(mut self, message: Message) -> Self {
        self.completion.push(message);
        self
    }

    /// Sends `message`, with the children's outcomes as its last argument, once every child
    /// finished, failed or not.
    #[must_use]
    pub fn add_finished_callback(mut self, message: Message) -> Self {
        self.finished.push(message);
        self
    }

    /// How long the barrier lives after its last arrival (default 24 hours): a group whose
    /// children take longer in all must raise it. The workers refresh it with their
    /// `GroupCallbacks` TTL at each arrival.
    #[must_use]
    pub fn barrier_ttl(mut self, ttl: Duration) -> Self {
        self.barrier_ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// The members.
    #[must_use]
    pub fn children(&self) -> &[GroupChild] {
        &self.children
    }

    /// How many members.
    #[must_use]
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether there is no member.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Enqueues every member (after `delay`, if any). With callbacks, first creates the
    /// group's barrier in the app's state backend under a new id (a new one on every run, as
    /// Dramatiq's), which it returns.
    ///
    /// # Errors
    /// [`Error::Config`] for callbacks without a state backend, or on a group that holds a
    /// group; the broker's and state backend's errors.
    pub async fn run(&self, app: &App, delay: Option<Duration>) -> Result<Option<String>> {
        if self.completion.is_empty() && self.finished.is_empty() {
            for child in &self.children {
                run_child(child, app, delay).await?;
            }
            return Ok(None);
        }
        let state = app.state().ok_or_else(|| {
            Error::Config(
                "group callbacks need a state backend (their barrier lives there): add AppBuilder::state(..)".into(),
            )
        })?;
        if self.children.iter().any(|c| matches!(c, GroupChild::Group(_))) {
            return Err(Error::Config(
                "a group with completion callbacks cannot hold a group (as in Dramatiq); run the inner group on its own".into(),
            ));
        }
        let id = crate::new_message_id();
        let parties = i64::try_from(self.children.len()).unwrap_or(i64::MAX);
        if !self.completion.is_empty() {
            state.add(&id, parties, self.barrier_ttl).await?;
        }
        if !self.finished.is_empty() {
            state.add(&finished_barrier(&id), parties, self.barrier_ttl).await?;
        }
        let completion: Vec<Value> = self.completion.iter().map(Message::to_value).collect();
        let finished: Vec<Value> = self.finished.iter().map(Message::to_value).collect();
        let mark = |message: &mut Message, index: usize| {
            let options = &mut message.options;
            options.insert(option_keys::GROUP_COMPLETION_UUID.into(), Value::from(id.clone()));
            if !completion.is_empty() {
                options.insert(
                    option_keys::GROUP_COMPLETION_CALLBACKS.into(),
                    Value::from(completion.clone()),
                );
            }
            if !finished.is_empty() {
                options.insert(
                    option_keys::GROUP_FINISHED_CALLBACKS.into(),
                    Value::from(finished.clone()),
                );
                options.insert(option_keys::GROUP_INDEX.into(), Value::from(index));
            }
        };
        for (index, child) in self.children.iter().enumerate() {
            let marked = match child {
                GroupChild::Message(message) => {
                    let mut message = message.clone();
                    mark(&mut message, index);
                    GroupChild::Message(message)
                }
                // The last stage arrives at the barrier.
                GroupChild::Pipeline(pipeline) => {
                    let mut stages = pipeline.messages().to_vec();
                    if let Some(last) = stages.last_mut() {
                        mark(last, index);
                    }
                    GroupChild::Pipeline(Pipeline::new(stages)?)
                }
                // Rejected above.
                GroupChild::Group(group) => GroupChild::Group(group.clone()),
            };
            run_child(&marked, app, delay).await?;
        }
        Ok(Some(id))
    }

    /// Every member's result, in order (a pipeline's last stage's, a group's as a list),
    /// waiting up to `timeout` in all (`None`: no waiting).
    ///
    /// # Errors
    /// As [`App::get_result`]: a member not done yet ([`Error::ResultMissing`] or
    /// [`Error::ResultTimeout`]), a failed one ([`Error::ResultFailure`]).
    pub async fn results(&self, app: &App, timeout: Option<Duration>) -> Result<Vec<Value>> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        self.results_until(app, deadline).await
    }

    fn results_until<'a>(
        &'a self,
        app: &'a App,
        deadline: Option<tokio::time::Instant>,
    ) -> futures::future::BoxFuture<'a, Result<Vec<Value>>> {
        Box::pin(async move {
            let left = || deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
            let mut out = Vec::with_capacity(self.children.len());
            for child in &self.children {
                out.push(match child {
                    GroupChild::Message(message) => app.get_result(message, left()).await?,
                    GroupChild::Pipeline(pipeline) => pipeline.get_result(app, left()).await?,
                    GroupChild::Group(group) => Value::Array(group.results_until(app, deadline).await?),
                });
            }
            Ok(out)
        })
    }

    /// Waits up to `timeout` for every member to finish.
    ///
    /// # Errors
    /// As [`results`](Self::results).
    pub async fn wait(&self, app: &App, timeout: Duration) -> Result<()> {
        self.results(app, Some(timeout)).await.map(|_| ())
    }

    /// How many members have finished (stored a result or a failure); a nested group counts
    /// once all its members have.
    ///
    /// # Errors
    /// A results backend error.
    pub fn completed_count<'a>(&'a self, app: &'a App) -> futures::future::BoxFuture<'a, Result<usize>> {
        Box::pin(async move {
            let mut done = 0;
            for child in &self.children {
                let finished = match child {
                    GroupChild::Message(message) => stored(app.get_result(message, None).await)?,
                    GroupChild::Pipeline(pipeline) => stored(pipeline.get_result(app, None).await)?,
                    GroupChild::Group(group) => group.completed_count(app).await? == group.len(),
                };
                done += usize::from(finished);
            }
            Ok(done)
        })
    }
}

/// Whether a result read found something stored (a value or a failure).
fn stored(read: Result<Value>) -> Result<bool> {
    match read {
        Ok(_) | Err(Error::ResultFailure { .. }) => Ok(true),
        Err(Error::ResultMissing(_) | Error::ResultTimeout(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The barrier of a group's finished callbacks.
pub(crate) fn finished_barrier(id: &str) -> String {
    format!("{id}@finished")
}

fn run_child<'a>(
    child: &'a GroupChild,
    app: &'a App,
    delay: Option<Duration>,
) -> futures::future::BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        match child {
            GroupChild::Message(message) => {
                app.enqueue(message.clone(), delay).await?;
            }
            GroupChild::Pipeline(pipeline) => {
                pipeline.run(app, delay).await?;
            }
            GroupChild::Group(group) => {
                group.run(app, delay).await?;
            }
        }
        Ok(())
    })
}
