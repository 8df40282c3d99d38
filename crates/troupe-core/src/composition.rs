//! Pipelines (chains of messages where each stage's result feeds the next) and groups
//! (messages run in parallel, with completion callbacks).

use std::time::Duration;

use serde_json::Value;

use crate::app::App;
use crate::error::{Error, Result};
use crate::message::{Message, option_keys};

/// A stage of a [`Pipeline`]: a message, or a group of messages run in parallel.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Stage {
    /// One message.
    Message(Message),
    /// A group of messages (messages only); the next stage gets the list of their results.
    Group(Group),
}

impl From<Message> for Stage {
    fn from(message: Message) -> Self {
        Self::Message(message)
    }
}

impl From<Group> for Stage {
    fn from(group: Group) -> Self {
        Self::Group(group)
    }
}

/// A chain of stages run one after another; each stage's result is appended to the next
/// stage's arguments (unless that stage has `pipe_ignore`). A failure stops the chain.
///
/// Built as Dramatiq builds it (`options.pipe_target` nests the rest of the chain), so a Python
/// worker can run a pipeline of messages Troupe enqueued and the reverse. A stage may also be a
/// group of messages (which Dramatiq cannot do): each of its messages gets the previous stage's
/// result, they run in parallel, and once all succeeded the next stage gets the list of their
/// results, in order (a failed one stops the chain). The stage before a group carries it in
/// `troupe_pipe_group`; the group's barrier needs the app's state backend.
#[derive(Clone, Debug)]
pub struct Pipeline {
    stages: Vec<Stage>,
}

impl Pipeline {
    /// A pipeline of `stages`, in order: messages (`pipeline(vec![a, b])`), or
    /// [`Stage`]s mixing messages and groups of messages.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no stage, a group stage is empty or holds a pipeline or
    /// a group, or two group stages follow each other.
    pub fn new<S: Into<Stage>>(stages: impl IntoIterator<Item = S>) -> Result<Self> {
        let stages: Vec<Stage> = stages.into_iter().map(Into::into).collect();
        if stages.is_empty() {
            return Err(Error::Config("a pipeline needs at least one stage".into()));
        }
        for (i, stage) in stages.iter().enumerate() {
            if let Stage::Group(group) = stage {
                if group.is_empty() || group.children().iter().any(|c| !matches!(c, GroupChild::Message(_))) {
                    return Err(Error::Config(format!(
                        "stage {i} of the pipeline is a group: it must hold messages, and at least one"
                    )));
                }
                if matches!(stages.get(i + 1), Some(Stage::Group(_))) {
                    return Err(Error::Config(format!(
                        "stages {i} and {} of the pipeline are both groups; put a message between them",
                        i + 1
                    )));
                }
            }
        }
        let mut chained: Vec<Stage> = Vec::with_capacity(stages.len());
        let mut next: Option<Stage> = None;
        for stage in stages.into_iter().rev() {
            let stage = match stage {
                Stage::Message(mut message) => {
                    match &next {
                        Some(Stage::Message(target)) => message.set_pipe_target(target),
                        Some(Stage::Group(group)) => {
                            message
                                .options
                                .insert(option_keys::PIPE_GROUP.into(), group.as_pipe_group());
                        }
                        None => {}
                    }
                    Stage::Message(message)
                }
                Stage::Group(mut group) => {
                    group.then = match &next {
                        Some(Stage::Message(target)) => Some(target.clone()),
                        _ => None,
                    };
                    Stage::Group(group)
                }
            };
            next = Some(stage.clone());
            chained.push(stage);
        }
        chained.reverse();
        Ok(Self { stages: chained })
    }

    /// The stages, chained (each message with its `pipe_target` or `troupe_pipe_group` set).
    #[must_use]
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The message stages, in order.
    #[must_use]
    pub fn messages(&self) -> Vec<&Message> {
        self.stages
            .iter()
            .filter_map(|s| match s {
                Stage::Message(m) => Some(m),
                Stage::Group(_) => None,
            })
            .collect()
    }

    /// Enqueues the first stage (after the larger of `delay` and its own `delay` option).
    ///
    /// # Errors
    /// As [`App::enqueue`], or [`Group::run`] when the first stage is a group.
    pub async fn run(&self, app: &App, delay: Option<Duration>) -> Result<()> {
        match &self.stages[0] {
            Stage::Message(first) => {
                let own = first.delay();
                let delay = match (delay, own) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                }
                .filter(|d| !d.is_zero());
                app.enqueue(first.clone(), delay).await?;
            }
            Stage::Group(group) => {
                group.run(app, delay).await?;
            }
        }
        Ok(())
    }

    /// The last stage's result (a group's: the list of its results).
    ///
    /// # Errors
    /// As [`App::get_result`].
    pub async fn get_result(&self, app: &App, timeout: Option<Duration>) -> Result<Value> {
        match self.stages.last() {
            Some(Stage::Message(last)) => app.get_result(last, timeout).await,
            Some(Stage::Group(group)) => Ok(Value::Array(group.results(app, timeout).await?)),
            None => Err(Error::Config("empty pipeline".into())),
        }
    }
}

/// A pipeline of `stages` (Dramatiq's `pipeline([...])`): messages, or [`Stage`]s mixing
/// messages and groups.
///
/// # Errors
/// As [`Pipeline::new`].
pub fn pipeline<S: Into<Stage>>(stages: impl IntoIterator<Item = S>) -> Result<Pipeline> {
    Pipeline::new(stages)
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
    /// As a pipeline stage: the next stage, sent with the children's results once all
    /// succeeded.
    then: Option<Message>,
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
            then: None,
        }
    }

    /// The group as the `troupe_pipe_group` option of the stage before it: its messages and
    /// the stage after it.
    fn as_pipe_group(&self) -> Value {
        let children: Vec<Value> = self
            .children
            .iter()
            .filter_map(|c| match c {
                GroupChild::Message(m) => Some(m.to_value()),
                _ => None,
            })
            .collect();
        serde_json::json!({
            "children": children,
            "then": self.then.as_ref().map(Message::to_value),
        })
    }

    /// The group a `troupe_pipe_group` option describes, each message given `result` (unless
    /// it ignores results), with the next stage as its results callback.
    ///
    /// # Errors
    /// [`Error::Decode`] when the option is not such a group.
    pub(crate) fn from_pipe_group(option: &Value, result: Option<&Value>) -> Result<Self> {
        let bad = |what: &str| Error::Decode(format!("troupe_pipe_group: {what}"));
        let children = option["children"].as_array().ok_or_else(|| bad("no children"))?;
        let mut messages = Vec::with_capacity(children.len());
        for child in children {
            let mut message = Message::from_value(child.clone())?;
            if let Some(result) = result.filter(|_| !message.pipe_ignore().unwrap_or(false)) {
                message.args.push(result.clone());
            }
            messages.push(message);
        }
        let mut group = Group::new(messages);
        if let Some(then) = option.get("then").filter(|t| !t.is_null()) {
            let mut then = Message::from_value(then.clone())?;
            then.options
                .insert(option_keys::GROUP_RESULTS.into(), Value::Bool(true));
            group = group.add_finished_callback(then);
        }
        Ok(group)
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

    /// How long the barrier lives (default 24 hours): a group whose children take longer in
    /// all must raise it. The workers refresh the barrier with their `GroupCallbacks` TTL at
    /// each arrival, and keep each child's arrival that long after it.
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
        if let Some(then) = &self.then {
            // A pipeline's group stage: the next stage is its results callback.
            let mut then = then.clone();
            then.options
                .insert(option_keys::GROUP_RESULTS.into(), Value::Bool(true));
            let mut group = self.clone();
            group.then = None;
            group.finished.push(then);
            return Box::pin(group.run(app, delay)).await;
        }
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
                    let mut stages = pipeline.stages().to_vec();
                    match stages.last_mut() {
                        Some(Stage::Message(last)) => mark(last, index),
                        _ => {
                            return Err(Error::Config(
                                "a pipeline that ends in a group cannot be a member of a group with callbacks".into(),
                            ));
                        }
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
