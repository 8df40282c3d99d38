use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::Value;
use troupe_core::{Actor, ActorError, ActorOptions, Message, current_message};

/// A unique queue name for one case.
#[must_use]
pub fn unique_queue(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Polls `check` every 10 ms until it is true or `timeout` passes. Returns whether it became
/// true.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One call of a [`TestActor`].
#[derive(Clone, Debug)]
pub struct Call {
    /// When it started.
    pub at: Instant,
    /// The positional arguments.
    pub args: Vec<Value>,
    /// The message (from the CurrentMessage middleware).
    pub message: Option<Message>,
}

type Behaviour = Arc<dyn Fn(usize, Vec<Value>) -> BoxFuture<'static, Result<Value, ActorError>> + Send + Sync>;

/// An actor taking any positional arguments that records its calls and runs a behaviour
/// given the call's index (0 for the first call).
#[derive(Clone)]
pub struct TestActor {
    name: String,
    options: ActorOptions,
    behaviour: Behaviour,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl std::fmt::Debug for TestActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestActor")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TestActor {
    /// An actor that returns its first argument (or null).
    #[must_use]
    pub fn new(name: &str, queue: &str) -> Self {
        Self {
            name: name.to_owned(),
            options: ActorOptions::new().queue_name(queue),
            behaviour: Arc::new(|_, args| Box::pin(async move { Ok(args.into_iter().next().unwrap_or(Value::Null)) })),
            calls: Arc::default(),
        }
    }

    /// Sets the options (the queue is kept).
    #[must_use]
    pub fn options(mut self, f: impl FnOnce(ActorOptions) -> ActorOptions) -> Self {
        self.options = f(self.options);
        self
    }

    /// Sets the behaviour.
    #[must_use]
    pub fn behaviour<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(usize, Vec<Value>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Value, ActorError>> + Send + 'static,
    {
        self.behaviour = Arc::new(move |i, args| Box::pin(f(i, args)));
        self
    }

    /// The calls so far.
    #[must_use]
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// How many calls so far.
    #[must_use]
    pub fn count(&self) -> usize {
        self.calls.lock().map(|c| c.len()).unwrap_or(0)
    }
}

impl Actor for TestActor {
    type Args = Vec<Value>;
    type Output = Value;

    fn name(&self) -> &str {
        &self.name
    }

    fn options(&self) -> ActorOptions {
        self.options.clone()
    }

    async fn call(&self, args: Vec<Value>) -> Result<Value, ActorError> {
        let index = {
            let mut calls = self.calls.lock().map_err(|_| ActorError::msg("calls lock poisoned"))?;
            calls.push(Call {
                at: Instant::now(),
                args: args.clone(),
                message: current_message(),
            });
            calls.len() - 1
        };
        (self.behaviour)(index, args).await
    }
}

/// The queue of [`Count`].
pub const COUNT_QUEUE: &str = "faults";

/// An actor (`count`, on [`COUNT_QUEUE`]) that counts its runs.
#[derive(Clone, Debug)]
pub struct Count(pub Arc<std::sync::atomic::AtomicUsize>);

impl Actor for Count {
    type Args = ();
    type Output = ();
    fn name(&self) -> &str {
        "count"
    }
    fn options(&self) -> ActorOptions {
        ActorOptions::new().queue_name(COUNT_QUEUE)
    }
    async fn call(&self, (): ()) -> Result<(), ActorError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// An app on `broker` with the [`Count`] actor, and its count.
///
/// # Panics
/// When the app cannot be built.
#[must_use]
pub fn counting_app(broker: Arc<dyn troupe_core::Broker>) -> (troupe_core::App, Arc<std::sync::atomic::AtomicUsize>) {
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = troupe_core::App::builder(broker)
        .actor(Count(Arc::clone(&count)))
        .build()
        .expect("an app with the count actor");
    (app, count)
}
