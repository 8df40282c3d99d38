//! Helpers shared by the ports: fast retries, worker start-up, polling, and a hand-written
//! actor for options the `#[actor]` macro cannot express (`retry_when`, `throws`, invalid
//! values).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use troupe::middleware::Retries;
use troupe::worker::WorkerHandle;
use troupe::{Actor, ActorError, ActorOptions, App, Error, MemoryBroker, Worker};

/// How long a test waits for a queue to drain or a condition to hold before failing.
pub(crate) const WAIT: Duration = Duration::from_secs(5);

/// Retries backing off 20..100 ms instead of 15 s..7 days, for `AppBuilder::retries` (the rest
/// of the default middleware unchanged).
pub(crate) fn fast_retries() -> Retries {
    Retries::default()
        .min_backoff(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(100))
}

/// A worker like Dramatiq's stub worker: a 100 ms fetch timeout.
pub(crate) async fn start(app: &App, concurrency: usize) -> WorkerHandle {
    Worker::builder(app.clone())
        .concurrency(concurrency)
        .fetch_timeout(Duration::from_millis(100))
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .expect("the worker starts")
}

/// Joins `queue` (fail fast), panicking on any error.
pub(crate) async fn join(broker: &MemoryBroker, queue: &str) {
    broker
        .join(queue, WAIT)
        .await
        .expect("the queue drains without failure");
}

/// Joins `queue` without failing on dead letters (Dramatiq's `join(fail_fast=False)`).
pub(crate) async fn join_all(broker: &MemoryBroker, queue: &str) {
    broker.join_with(queue, WAIT, false).await.expect("the queue drains");
}

/// Joins `queue` expecting a dead letter; returns its reason.
pub(crate) async fn join_failed(broker: &MemoryBroker, queue: &str) -> String {
    match broker.join(queue, WAIT).await {
        Err(Error::MessageFailed { reason, .. }) => reason,
        other => panic!(
            "expected the join to re-raise a failed message, got {other:?}; dead letters {:?}, stats {:?}",
            broker.dead_letters_of(queue),
            troupe::Broker::stats(broker, queue).await
        ),
    }
}

/// Polls `check` every 5 ms until it holds or `WAIT` passes; returns whether it held.
pub(crate) async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

type Behaviour = Arc<dyn Fn(usize, &[Value]) -> Result<Value, ActorError> + Send + Sync>;

/// A hand-written actor taking any positional arguments: it records them and answers with a
/// behaviour given the call's index (0 for the first call).
#[derive(Clone)]
pub(crate) struct Probe {
    name: String,
    options: ActorOptions,
    behaviour: Behaviour,
    calls: Arc<Mutex<Vec<Vec<Value>>>>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Probe {
    /// An actor on the default queue that returns null.
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            options: ActorOptions::new(),
            behaviour: Arc::new(|_, _| Ok(Value::Null)),
            calls: Arc::default(),
        }
    }

    /// Sets the options.
    pub(crate) fn options(mut self, options: ActorOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets the behaviour.
    pub(crate) fn behaviour(
        mut self,
        f: impl Fn(usize, &[Value]) -> Result<Value, ActorError> + Send + Sync + 'static,
    ) -> Self {
        self.behaviour = Arc::new(f);
        self
    }

    /// How many times it ran.
    pub(crate) fn count(&self) -> usize {
        self.calls.lock().map(|c| c.len()).unwrap_or(0)
    }
}

impl Actor for Probe {
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
            let mut calls = self.calls.lock().map_err(|_| ActorError::msg("poisoned"))?;
            calls.push(args.clone());
            calls.len() - 1
        };
        (self.behaviour)(index, &args)
    }
}

/// Locks a mutex, ignoring poisoning (a panicking test reports its own failure).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
