//! The SIGKILL test every durable broker runs: a worker process killed mid-batch loses nothing,
//! and only what it held can run twice.
//!
//! The test binary runs itself as the child process, filtered to its `child` test, which
//! calls [`child`]. A backend supplies a [`KillBackend`]: how to open its broker on a place (a
//! database file, a schema, a namespace) with the lease or heartbeat settings that make recovery
//! fast, and where each run is recorded ([`Runs`]: somewhere the kill cannot touch).
//! [`MidBatchKill::run`] does the rest and returns a [`KillReport`] for any checks of the
//! backend's own; [`spawn`] starts other children (workers, or producers of [`Record`]
//! messages) for tests of several processes.
//!
//! ```text
//! struct Mine;
//!
//! impl KillBackend for Mine {
//!     type Broker = MyBroker;
//!     type Runs = FileRuns;
//!     const NAME: &'static str = "Mine";
//!     async fn open(&self, place: &str) -> (MyBroker, FileRuns) { ... }
//! }
//!
//! #[test]
//! fn child() {
//!     troupe_test_suite::kill::child(&Mine);
//! }
//!
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn sigkill_mid_batch_loses_nothing() {
//!     MidBatchKill::default().run(&Mine, &place, QUEUE).await;
//! }
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use troupe_core::limits::{BucketRateLimiter, ConcurrentRateLimiter, WhenLimited, WindowRateLimiter};
use troupe_core::middleware::TaskTracking;
use troupe_core::{
    Actor, ActorError, ActorOptions, App, AppBuilder, Broker, Message, QueueStats, ResultBackend, SendOptions,
    StateBackend, TaskStatus, group, now_ms,
};
use troupe_worker::{Worker, WorkerBuilder};

const ROLE: &str = "TROUPE_KILL_ROLE";
const PLACE: &str = "TROUPE_KILL_PLACE";
const QUEUE: &str = "TROUPE_KILL_QUEUE";
const FROM: &str = "TROUPE_KILL_FROM";
const TO: &str = "TROUPE_KILL_TO";

/// Where the runs of [`Record`] are counted, per argument.
pub trait Runs: Send + Sync + 'static {
    /// Creates what the records go into; called once, by the parent, before any child starts.
    fn prepare(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Records one run of `n`.
    fn record(&self, n: u64) -> impl Future<Output = Result<(), ActorError>> + Send;

    /// How many times each argument has run so far.
    fn counts(&self) -> impl Future<Output = HashMap<u64, u64>> + Send;
}

/// Counts how many times each argument occurs.
#[must_use]
pub fn tally(runs: impl IntoIterator<Item = u64>) -> HashMap<u64, u64> {
    let mut seen = HashMap::new();
    for n in runs {
        *seen.entry(n).or_insert(0) += 1;
    }
    seen
}

/// Runs recorded as one line each in a file (appends of one short line are atomic, so several
/// processes may write it).
#[derive(Clone, Debug)]
pub struct FileRuns {
    path: PathBuf,
}

impl FileRuns {
    /// Runs recorded in the file at `path` (created on the first run).
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Runs recorded in `<temp dir>/<name>.log`.
    #[must_use]
    pub fn temp(name: &str) -> Self {
        Self::new(std::env::temp_dir().join(format!("{name}.log")))
    }

    /// The file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Runs for FileRuns {
    async fn record(&self, n: u64) -> Result<(), ActorError> {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        file.write_all(format!("{n}\n").as_bytes())?;
        Ok(())
    }

    async fn counts(&self) -> HashMap<u64, u64> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        tally(text.lines().filter_map(|line| line.parse().ok()))
    }
}

/// Polls `runs` every 50 ms until `distinct` arguments have run or `timeout` passes; returns
/// the counts it last saw.
pub async fn wait_runs(runs: &impl Runs, distinct: usize, timeout: Duration) -> HashMap<u64, u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = runs.counts().await;
        if seen.len() >= distinct || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The actor of the test: `record(n)` pauses 5 ms, then records one run of `n`.
pub struct Record<R> {
    queue: String,
    runs: Arc<R>,
}

impl<R> Clone for Record<R> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
            runs: Arc::clone(&self.runs),
        }
    }
}

impl<R> std::fmt::Debug for Record<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl<R: Runs> Record<R> {
    /// The actor on `queue`, recording into `runs`.
    #[must_use]
    pub fn new(queue: &str, runs: Arc<R>) -> Self {
        Self {
            queue: queue.to_owned(),
            runs,
        }
    }
}

impl<R: Runs> Actor for Record<R> {
    type Args = (u64,);
    type Output = ();

    fn name(&self) -> &str {
        "record"
    }

    fn arg_names(&self) -> &[&str] {
        &["n"]
    }

    fn options(&self) -> ActorOptions {
        ActorOptions::new().queue_name(self.queue.clone())
    }

    async fn call(&self, (n,): (u64,)) -> Result<(), ActorError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.runs.record(n).await
    }
}

/// A backend under the SIGKILL test.
pub trait KillBackend: Send + Sync + 'static {
    /// The broker, as the backend's tests use it.
    type Broker: Broker + Clone;

    /// Where runs are recorded.
    type Runs: Runs;

    /// The backend's name in the summary line ("SQLite").
    const NAME: &'static str;

    /// Opens the broker on `place` (what the backend's test passed to [`MidBatchKill::run`],
    /// handed to the children in an environment variable), with settings that make a dead
    /// worker's messages come back quickly, and the place its runs are recorded.
    fn open(&self, place: &str) -> impl Future<Output = (Self::Broker, Self::Runs)> + Send;

    /// Adjusts the child's worker (concurrency 4 already set).
    fn worker(&self, builder: WorkerBuilder) -> WorkerBuilder {
        builder
    }

    /// The state backend of `place`, when the backend keeps task states: the parent and the
    /// children then track tasks in it, and the test checks that every message's state ends
    /// succeeded, across the kill.
    fn state(&self, _place: &str) -> impl Future<Output = Option<Arc<dyn StateBackend>>> + Send {
        async { None }
    }

    /// The result backend of `place`, when the backend has one: the chaos rounds
    /// ([`crate::chaos`]) then check that every message's result was stored, across the fault.
    fn results(&self, _place: &str) -> impl Future<Output = Option<Arc<dyn ResultBackend>>> + Send {
        async { None }
    }
}

/// The app of the test, tracking task states when the backend keeps them.
fn app_builder(broker: Arc<dyn Broker>, state: Option<Arc<dyn StateBackend>>) -> AppBuilder {
    let builder = App::builder(broker);
    match state {
        Some(state) => builder.state(state).track_tasks(TaskTracking::default()),
        None => builder,
    }
}

/// What a child process does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Runs a worker (concurrency 4) until killed.
    Worker,
    /// Sends `record(n)` for each `n` of the range, then exits.
    Producer(Range<u64>),
    /// Sends `record(n)` for each `n` of the range with `send_many`, [`PRODUCER_BATCH`] at a
    /// time, saying on stderr how far it has sent after each call returns (`child: sent
    /// through N`), then exits.
    BatchProducer(Range<u64>),
    /// Sends `record(n)` for each `n` of the range as a unique message (`unique_for` an hour;
    /// needs the backend's [`KillBackend::state`]), then exits.
    UniqueProducer(Range<u64>),
    /// Takes the `ConcurrentRateLimiter` named after the place and queue (limit 1, in the backend's
    /// [`KillBackend::state`]) this many times, holding it 10 ms each, and records each hold's
    /// interval ([`hold_code`]), then exits.
    Holder(u64),
    /// Tries a bucket (`"bucket"`) or window (`"window"`) limiter of 5 a second, named after
    /// the place and queue, as fast as it can for 1.5 s, and records the second (unix) of each
    /// acquire it can place in one.
    Limited(&'static str),
}

/// Acquires per second the limiters of [`Role::Limited`] allow.
pub const LIMITED_PER_SECOND: u32 = 5;

/// One hold's interval `[start, end]` (ms since the epoch) as the one number a [`Runs`] keeps:
/// the start in the high bits, the length (under 2^20 ms) in the low 20.
#[must_use]
pub fn hold_code(start: u64, end: u64) -> u64 {
    (start << 20) | (end.saturating_sub(start) & 0xF_FFFF)
}

/// The interval of a [`hold_code`].
#[must_use]
pub fn hold_interval(code: u64) -> (u64, u64) {
    let start = code >> 20;
    (start, start + (code & 0xF_FFFF))
}

/// The body of a test binary's `child` test: does nothing when the binary was not started as a
/// child by [`spawn`]; otherwise plays the role it was given.
///
/// # Panics
/// When the role's environment is incomplete, the broker does not open or a send fails.
pub fn child<B: KillBackend>(backend: &B) {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set for a child"));
    let (place, queue) = (var(PLACE), var(QUEUE));
    // Warnings and errors on stderr, which the parent keeps (`TROUPE_CHILD_LOG` for more).
    troupe_worker::init_logging(0);
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async move {
        let (broker, runs) = backend.open(&place).await;
        let runs = Arc::new(runs);
        let record = Record::new(&queue, Arc::clone(&runs));
        let results = backend.results(&place).await;
        let chaos = crate::chaos::Chaos::new(&queue, runs, results.is_some());
        let mut builder = app_builder(Arc::new(broker), backend.state(&place).await)
            .actor(record.clone())
            .actor(chaos);
        if let Some(results) = results {
            builder = builder.results(results);
        }
        let app = builder.build().expect("app");
        match role.as_str() {
            "worker" => {
                let _worker = backend
                    .worker(Worker::builder(app).concurrency(4))
                    .start()
                    .await
                    .expect("worker");
                eprintln!("child: worker started");
                std::future::pending::<()>().await;
            }
            "producer" | "unique-producer" => {
                let from: u64 = var(FROM).parse().expect("a number");
                let to: u64 = var(TO).parse().expect("a number");
                let options = if role == "unique-producer" {
                    SendOptions::new().unique_for(Duration::from_secs(3600))
                } else {
                    SendOptions::new()
                };
                for n in from..to {
                    app.send_with_options(&record, (n,), options.clone())
                        .await
                        .expect("enqueue");
                }
                eprintln!("child: produced {from}..{to}");
            }
            "batch-producer" => {
                let from: u64 = var(FROM).parse().expect("a number");
                let to: u64 = var(TO).parse().expect("a number");
                let mut n = from;
                while n < to {
                    let end = (n + PRODUCER_BATCH).min(to);
                    app.send_many(&record, (n..end).map(|i| (i,))).await.expect("enqueue");
                    eprintln!("child: sent through {end}");
                    n = end;
                }
            }
            "holder" => {
                let rounds: u64 = var(FROM).parse().expect("a number");
                let state = backend.state(&place).await.expect("a state backend for the holders");
                let mutex = ConcurrentRateLimiter::new(state, format!("{place}-{queue}-mutex"), 1);
                for _ in 0..rounds {
                    let slot = mutex
                        .acquire(WhenLimited::Wait(Duration::from_secs(30)))
                        .await
                        .expect("the mutex within 30 s");
                    let start = now_ms();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let end = now_ms();
                    slot.release().await.expect("release");
                    record.runs.record(hold_code(start, end)).await.expect("record");
                }
                eprintln!("child: held the mutex {rounds} times");
            }
            "bucket" | "window" => {
                let state = backend.state(&place).await.expect("a state backend for the limiters");
                let key = format!("{place}-{queue}-{role}");
                let bucket = BucketRateLimiter::new(
                    Arc::clone(&state),
                    key.clone(),
                    LIMITED_PER_SECOND,
                    Duration::from_secs(1),
                );
                let window = WindowRateLimiter::new(state, key, LIMITED_PER_SECOND, Duration::from_secs(1));
                let until = Instant::now() + Duration::from_millis(1500);
                let mut taken = 0;
                while Instant::now() < until {
                    let second = if role == "bucket" {
                        bucket
                            .try_acquire_bucket()
                            .await
                            .expect("acquire")
                            .map(|start| start / 1000)
                    } else {
                        let before = now_ms() / 1000;
                        let got = window.try_acquire().await.expect("acquire");
                        // Only an acquire that stayed within one second can be placed in it.
                        (got && now_ms() / 1000 == before).then_some(before)
                    };
                    if let Some(second) = second {
                        taken += 1;
                        record.runs.record(second).await.expect("record");
                    }
                }
                eprintln!("child: {taken} {role} acquires");
            }
            other => panic!("unknown role {other}"),
        }
    });
}

/// Every message's task state ends succeeded, the ones the killed worker held included (a
/// state is written before its message is acked, so the last ones may still be on their way
/// when the runs are counted: waits up to 10 s).
async fn check_states(app: &App, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut not_done = Vec::new();
        for id in ids {
            let record = app.task(id).await.expect("task");
            if record.as_ref().map(|r| r.status) != Some(TaskStatus::Succeeded) {
                not_done.push((id.clone(), record));
            }
        }
        if not_done.is_empty() {
            eprintln!("task states: all {} succeeded across the kill", ids.len());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} task states did not end succeeded: {:?}",
            not_done.len(),
            &not_done[..not_done.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two producer processes race to send the same `messages` unique messages (`record(n)` for
/// each n, `unique_for` an hour), then two worker processes run them: each must run exactly
/// once (the producers enqueued one message per n between them). Needs the backend's
/// [`KillBackend::state`].
///
/// # Panics
/// On a message run twice or never, or when a child fails.
pub async fn unique_across_processes<B: KillBackend>(backend: &B, place: &str, queue: &str, messages: u64) {
    let (broker, runs) = backend.open(place).await;
    assert!(backend.state(place).await.is_some(), "{} keeps no task states", B::NAME);
    runs.prepare().await;
    let mut producers = [
        spawn(&Role::UniqueProducer(0..messages), place, queue),
        spawn(&Role::UniqueProducer(0..messages), place, queue),
    ];
    for producer in &mut producers {
        let status = producer.wait();
        assert!(status.success(), "a producer failed: {}", producer.log());
    }
    let queued = broker.stats(queue).await.expect("stats");
    let workers = [spawn(&Role::Worker, place, queue), spawn(&Role::Worker, place, queue)];
    let all = usize::try_from(messages).expect("a count");
    let done = wait_runs(&runs, all, Duration::from_secs(60)).await;
    // Let a duplicate, had there been one, run too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let done = if done.len() >= all { runs.counts().await } else { done };
    drop(workers);
    let missing: Vec<u64> = (0..messages).filter(|n| !done.contains_key(n)).collect();
    let twice: Vec<u64> = done.iter().filter(|(_, c)| **c > 1).map(|(n, _)| *n).collect();
    eprintln!(
        "{} unique messages across processes: 2 producers x {messages} sends, {} queued, {} ran, {} twice",
        B::NAME,
        queued.ready + queued.delayed,
        done.len(),
        twice.len()
    );
    assert!(missing.is_empty(), "never ran: {missing:?}");
    assert!(twice.is_empty(), "ran twice: {twice:?}");
    assert_eq!(
        queued.ready + queued.delayed,
        messages,
        "one message per key was enqueued"
    );
}

/// Two processes take one `ConcurrentRateLimiter` (limit 1) `rounds` times each, at once: no
/// two of their holds overlap, and every hold happens. Needs the backend's
/// [`KillBackend::state`].
///
/// # Panics
/// On overlapping holds, a missing one, or a child that fails.
pub async fn mutex_across_processes<B: KillBackend>(backend: &B, place: &str, queue: &str, rounds: u64) {
    let (_broker, runs) = backend.open(place).await;
    assert!(backend.state(place).await.is_some(), "{} keeps no state", B::NAME);
    runs.prepare().await;
    let mut holders = [
        spawn(&Role::Holder(rounds), place, queue),
        spawn(&Role::Holder(rounds), place, queue),
    ];
    for holder in &mut holders {
        let status = holder.wait();
        assert!(status.success(), "a holder failed: {}", holder.log());
    }
    let codes = runs.counts().await;
    let mut holds: Vec<(u64, u64)> = codes
        .iter()
        .flat_map(|(code, n)| std::iter::repeat_n(hold_interval(*code), usize::try_from(*n).unwrap_or(0)))
        .collect();
    holds.sort_unstable();
    assert_eq!(
        holds.len(),
        usize::try_from(2 * rounds).expect("a count"),
        "every hold was recorded"
    );
    let overlaps: Vec<_> = holds.windows(2).filter(|w| w[0].1 > w[1].0).collect();
    let span = holds.last().map_or(0, |l| l.1) - holds.first().map_or(0, |f| f.0);
    eprintln!(
        "{}: 2 processes x {rounds} holds of one mutex over {span} ms, {} overlapping",
        B::NAME,
        overlaps.len()
    );
    assert!(overlaps.is_empty(), "two holders at once: {overlaps:?}");
}

/// Two processes hammer one bucket limiter, then one window limiter, of
/// [`LIMITED_PER_SECOND`]: no second gets more acquires than the limit (no lost update under
/// the database's locking), and some second gets exactly the limit (the processes did contend
/// for it). Needs the backend's [`KillBackend::state`].
///
/// # Panics
/// On a second over the limit, no saturated second, or a child that fails.
pub async fn limits_across_processes<B: KillBackend>(backend: &B, place: &str, queue: &str) {
    let (_broker, runs) = backend.open(place).await;
    assert!(backend.state(place).await.is_some(), "{} keeps no state", B::NAME);
    runs.prepare().await;
    for kind in ["bucket", "window"] {
        let queue = format!("{queue}-{kind}");
        let before = runs.counts().await;
        let mut children = [
            spawn(&Role::Limited(kind), place, &queue),
            spawn(&Role::Limited(kind), place, &queue),
        ];
        for child in &mut children {
            let status = child.wait();
            assert!(status.success(), "a {kind} child failed: {}", child.log());
        }
        let mut per_second = runs.counts().await;
        for (second, n) in before {
            if let Some(c) = per_second.get_mut(&second) {
                *c -= n;
            }
        }
        per_second.retain(|_, n| *n > 0);
        eprintln!(
            "{}: {kind} limiter of {LIMITED_PER_SECOND}/s from 2 processes: {per_second:?}",
            B::NAME
        );
        let over: Vec<_> = per_second
            .iter()
            .filter(|(_, n)| **n > u64::from(LIMITED_PER_SECOND))
            .collect();
        assert!(over.is_empty(), "{kind}: seconds over the limit: {over:?}");
        assert!(
            per_second.values().any(|n| *n == u64::from(LIMITED_PER_SECOND)),
            "{kind}: no second reached the limit, so the processes never contended: {per_second:?}"
        );
    }
}

/// A group's completion callback across a SIGKILL: `children` `record(n)` messages are sent
/// as a group whose completion callback is `record(children)`; a worker process is killed
/// while it holds some of them, a fresh one finishes the rest. Every child runs, and the
/// callback runs once, after all of them (a redelivered child is not counted twice, which would
/// clear the barrier early and send the callback again). Needs the backend's
/// [`KillBackend::state`].
///
/// # Panics
/// On a lost child, a callback sent twice, never or early, or a child that fails.
pub async fn group_across_a_kill<B: KillBackend>(backend: &B, place: &str, queue: &str, children: u64) {
    let (broker, runs) = backend.open(place).await;
    let state = backend
        .state(place)
        .await
        .expect("a state backend for the group's barrier");
    runs.prepare().await;
    let runs = Arc::new(runs);
    let record = Record::new(queue, Arc::clone(&runs));
    let app = App::builder(Arc::new(broker.clone()))
        .state(state)
        .actor(record.clone())
        .build()
        .expect("app");
    let message = |n: u64| Message::new(queue, "record", vec![n.into()], serde_json::Map::new());
    group((0..children).map(message))
        .add_completion_callback(message(children))
        .run(&app, None)
        .await
        .expect("run the group");

    let mut first = spawn(&Role::Worker, place, queue);
    let before_kill = usize::try_from(children / 4).expect("a count");
    let before = wait_runs(runs.as_ref(), before_kill, Duration::from_secs(30)).await;
    assert!(
        before.len() >= before_kill,
        "the first worker ran {} children: {}",
        before.len(),
        first.log()
    );
    first.kill();
    let mut second = spawn(&Role::Worker, place, queue);
    let all = usize::try_from(children + 1).expect("a count");
    let _ = wait_runs(runs.as_ref(), all, Duration::from_secs(60)).await;
    // Let a second callback, had there been one, run too.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let done = runs.counts().await;
    second.kill();
    let missing: Vec<u64> = (0..children).filter(|n| !done.contains_key(n)).collect();
    assert!(missing.is_empty(), "children never ran: {missing:?}");
    let redelivered: u64 = (0..children)
        .map(|n| done.get(&n).copied().unwrap_or(0).saturating_sub(1))
        .sum();
    eprintln!(
        "{}: a group of {children} across a SIGKILL ({} run before it, {redelivered} run again after it), callback run {} time(s)",
        B::NAME,
        before.len(),
        done.get(&children).copied().unwrap_or(0)
    );
    assert_eq!(
        done.get(&children).copied(),
        Some(1),
        "the completion callback ran exactly once"
    );
}

/// A child process and the lines of its stderr so far. Dropping it kills the process.
#[derive(Debug)]
pub struct Spawned {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Spawned {
    /// Kills the process with SIGKILL and reaps it.
    ///
    /// # Panics
    /// When the process cannot be signalled or reaped.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the child");
        self.child.wait().expect("reap the child");
    }

    /// Waits for the process to exit.
    ///
    /// # Panics
    /// When the process cannot be reaped.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("reap the child")
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its stderr so far.
    #[must_use]
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts the current test binary, filtered to its `child` test, in `role` on `place` and
/// `queue`.
///
/// # Panics
/// When the process cannot be started.
#[must_use]
pub fn spawn(role: &Role, place: &str, queue: &str) -> Spawned {
    spawn_with(role, place, queue, &[])
}

/// [`spawn`], with more environment variables for the child (a proxy's address, say).
///
/// # Panics
/// When the process cannot be started.
#[must_use]
pub fn spawn_with(role: &Role, place: &str, queue: &str, env: &[(&str, String)]) -> Spawned {
    spawn_in(&[], role, place, queue, env)
}

/// [`spawn_with`], the command run through `prefix` (`ip netns exec NAME`, to run on another
/// "host" of [`crate::servers::NetHosts`]), which must exec it in place (so that killing the
/// child kills the test binary).
///
/// # Panics
/// When the process cannot be started.
#[must_use]
pub fn spawn_in(prefix: &[String], role: &Role, place: &str, queue: &str, env: &[(&str, String)]) -> Spawned {
    let binary = std::env::current_exe().expect("the test binary");
    let mut cmd = match prefix.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(binary);
            cmd
        }
        None => Command::new(binary),
    };
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    cmd.args(["child", "--exact", "--nocapture", "--test-threads", "1"])
        .env(PLACE, place)
        .env(QUEUE, queue)
        .env(
            "RUST_LOG",
            std::env::var("TROUPE_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    match role {
        Role::Worker => {
            cmd.env(ROLE, "worker");
        }
        Role::Producer(range) => {
            cmd.env(ROLE, "producer")
                .env(FROM, range.start.to_string())
                .env(TO, range.end.to_string());
        }
        Role::BatchProducer(range) => {
            cmd.env(ROLE, "batch-producer")
                .env(FROM, range.start.to_string())
                .env(TO, range.end.to_string());
        }
        Role::UniqueProducer(range) => {
            cmd.env(ROLE, "unique-producer")
                .env(FROM, range.start.to_string())
                .env(TO, range.end.to_string());
        }
        Role::Holder(rounds) => {
            cmd.env(ROLE, "holder").env(FROM, rounds.to_string());
        }
        Role::Limited(kind) => {
            cmd.env(ROLE, *kind);
        }
    }
    let mut child = cmd.spawn().expect("spawn the child");
    let log = Arc::new(Mutex::new(Vec::new()));
    if let Some(stderr) = child.stderr.take() {
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut sink) = sink.lock() {
                    sink.push(line);
                }
            }
        });
    }
    Spawned { child, log }
}

/// Messages per `send_many` call of a [`Role::BatchProducer`].
pub const PRODUCER_BATCH: u64 = 25;

/// What [`producer_kill`] saw, over its rounds.
#[derive(Debug)]
#[non_exhaustive]
pub struct ProducerKillReport {
    /// Rounds run.
    pub rounds: u32,
    /// Messages whose `send_many` call had returned when the producer was killed.
    pub confirmed: u64,
    /// Confirmed messages that never ran (must be 0).
    pub lost: u64,
    /// Messages past the confirmed ones that ran anyway, per round: the call the kill cut
    /// short, and one that returned just before it but had not said so (at most 2 ×
    /// [`PRODUCER_BATCH`] each).
    pub unconfirmed_ran: Vec<u64>,
    /// Runs beyond the first.
    pub duplicates: u64,
}

/// The producer SIGKILL test, in rounds (three, or `TROUPE_CHAOS_ROUNDS`): a producer process
/// sends 20,000 messages in `send_many` calls of [`PRODUCER_BATCH`] and is SIGKILLed once a
/// thousand or more were confirmed, mid-call most likely; then a worker process runs what
/// arrived. Every message of a call that returned must run; those of the call cut short may or
/// may not (counted). The summary line (and `TROUPE_CHAOS_REPORT`) is a chaos table row.
///
/// # Panics
/// When a confirmed message is lost, or the children fail.
pub async fn producer_kill<B: KillBackend>(backend: &B, place: &str, queue: &str) -> ProducerKillReport {
    let (_broker, runs) = backend.open(place).await;
    runs.prepare().await;
    let sent_through = |log: &str| -> u64 {
        log.lines()
            .filter_map(|l| l.strip_prefix("child: sent through "))
            .filter_map(|n| n.trim().parse().ok())
            .max()
            .unwrap_or(0)
    };
    let rounds = crate::chaos::rounds_from_env(3);
    let mut report = ProducerKillReport {
        rounds,
        confirmed: 0,
        lost: 0,
        unconfirmed_ran: Vec::new(),
        duplicates: 0,
    };
    let mut recovery = Vec::new();
    for round in 0..rounds {
        let queue = format!("{queue}-{round}");
        let base = (u64::from(round) + 1) * 1_000_000;
        let total = 20_000;
        let mut producer = spawn(&Role::BatchProducer(base..base + total), place, &queue);
        let deadline = Instant::now() + Duration::from_secs(60);
        while sent_through(&producer.log()) < base + 1_000 {
            assert!(
                Instant::now() < deadline,
                "round {round}: the producer sent too little in 60 s: {}",
                producer.log()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        producer.kill();
        // The last lines may still be on their way through the pipe.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let confirmed = sent_through(&producer.log()) - base;
        assert!(
            confirmed < total,
            "round {round}: the producer finished before the kill"
        );

        let killed = Instant::now();
        let mut worker = spawn(&Role::Worker, place, &queue);
        let in_round = |counts: HashMap<u64, u64>| -> HashMap<u64, u64> {
            counts
                .into_iter()
                .filter(|(n, _)| (base..base + total).contains(n))
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut done = in_round(runs.counts().await);
        while (base..base + confirmed).any(|n| !done.contains_key(&n)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            done = in_round(runs.counts().await);
        }
        recovery.push(killed.elapsed());
        // Let the rest of what arrived run too.
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = in_round(runs.counts().await);
            if now.len() == done.len() {
                break;
            }
            done = now;
        }
        worker.kill();
        let lost: Vec<u64> = (base..base + confirmed).filter(|n| !done.contains_key(n)).collect();
        let unconfirmed_ran = done.keys().filter(|n| **n >= base + confirmed).count() as u64;
        assert!(
            lost.is_empty(),
            "round {round}: confirmed sends lost: {lost:?}; the worker said {}",
            worker.log()
        );
        // The call cut short, and one that returned just before the kill but had not said so.
        assert!(
            unconfirmed_ran <= 2 * PRODUCER_BATCH,
            "round {round}: only the calls around the kill may have sent unconfirmed messages: {unconfirmed_ran}"
        );
        report.confirmed += confirmed;
        report.lost += lost.len() as u64;
        report.unconfirmed_ran.push(unconfirmed_ran);
        report.duplicates += done.values().map(|c| c - 1).sum::<u64>();
    }
    recovery.sort();
    let median = recovery.get(recovery.len() / 2).copied().unwrap_or_default();
    let max = recovery.last().copied().unwrap_or_default();
    eprintln!(
        "CHAOS {} | producer SIGKILL mid-send_many | rounds {rounds} | messages {} (confirmed) | lost {} | duplicates {} | unconfirmed that ran, per round {:?} | recovery median {:.2} s, max {:.2} s",
        B::NAME,
        report.confirmed,
        report.lost,
        report.duplicates,
        report.unconfirmed_ran,
        median.as_secs_f64(),
        max.as_secs_f64(),
    );
    if let Ok(path) = std::env::var("TROUPE_CHAOS_REPORT") {
        crate::chaos::append_report(
            &path,
            &serde_json::json!({
                "broker": B::NAME,
                "fault": "producer SIGKILL mid-send_many",
                "rounds": rounds,
                "messages": report.confirmed,
                "lost": report.lost,
                "duplicates": report.duplicates,
                "unconfirmed_ran": report.unconfirmed_ran,
                "recovery_median_s": median.as_secs_f64(),
                "recovery_max_s": max.as_secs_f64(),
            }),
        );
    }
    report
}

/// The SIGKILL test: `messages` messages are sent; a worker process runs until at least
/// `before_kill` have run (within 30 s) and is SIGKILLed; a fresh worker process runs until
/// every one has run (within 60 s). None may be lost and at most `max_duplicates` may run twice.
#[derive(Clone, Copy, Debug)]
pub struct MidBatchKill {
    messages: u64,
    before_kill: usize,
    max_duplicates: u64,
    while_holding: bool,
}

impl Default for MidBatchKill {
    /// 300 messages, the kill after 60 have run, at most 8 run twice (the killed worker's
    /// prefetch window).
    fn default() -> Self {
        Self {
            messages: 300,
            before_kill: 60,
            max_duplicates: 8,
            while_holding: false,
        }
    }
}

/// What [`MidBatchKill::run`] saw, for the checks a backend adds.
#[derive(Debug)]
#[non_exhaustive]
pub struct KillReport<B> {
    /// The parent's broker.
    pub broker: B,
    /// How many messages were sent.
    pub messages: u64,
    /// Distinct messages run when the kill was decided.
    pub before: usize,
    /// Distinct messages run once the killed process was reaped.
    pub at_kill: usize,
    /// The queue's counts once the killed process was reaped.
    pub stats_at_kill: QueueStats,
    /// Runs per message at the end.
    pub runs: HashMap<u64, u64>,
    /// Runs beyond the first, over all messages.
    pub duplicates: u64,
    /// Both children's stderr.
    pub log: String,
}

impl MidBatchKill {
    /// At most `n` messages may run twice.
    #[must_use]
    pub fn max_duplicates(mut self, n: u64) -> Self {
        self.max_duplicates = n;
        self
    }

    /// Kills only once the parent's broker sees messages in flight (within 5 s of the first
    /// `before_kill` runs), so the kill lands while the worker holds a batch rather than in the
    /// instant between two claims. For brokers whose `stats` count every process's in-flight
    /// messages (not RabbitMQ, which sees only its own).
    #[must_use]
    pub fn while_holding(mut self) -> Self {
        self.while_holding = true;
        self
    }

    /// Runs the test on `place` and `queue`; panics on a lost message or too many duplicates.
    ///
    /// # Panics
    /// On a violation, or when the broker or the children fail.
    pub async fn run<B: KillBackend>(&self, backend: &B, place: &str, queue: &str) -> KillReport<B::Broker> {
        let n = self.messages;
        let (broker, runs) = backend.open(place).await;
        runs.prepare().await;
        let runs = Arc::new(runs);
        let record = Record::new(queue, Arc::clone(&runs));
        let state = backend.state(place).await;
        let app = app_builder(Arc::new(broker.clone()), state.clone())
            .actor(record.clone())
            .build()
            .expect("app");
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(app.send(&record, (i,)).await.expect("send").message_id().to_owned());
        }

        let mut first = spawn(&Role::Worker, place, queue);
        let before = wait_runs(runs.as_ref(), self.before_kill, Duration::from_secs(30)).await;
        assert!(
            before.len() >= self.before_kill,
            "the first worker ran {} messages: {}",
            before.len(),
            first.log()
        );
        if self.while_holding {
            let until = tokio::time::Instant::now() + Duration::from_secs(5);
            while broker.stats(queue).await.expect("stats").in_flight == 0 && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        first.kill();
        let at_kill = runs.counts().await.len();
        let stats_at_kill = broker.stats(queue).await.expect("stats");

        let mut second = spawn(&Role::Worker, place, queue);
        let all = usize::try_from(n).expect("a count");
        let done = wait_runs(runs.as_ref(), all, Duration::from_secs(60)).await;
        if state.is_some() && done.len() >= all {
            // Before the kill: the last messages' states are written after their runs.
            check_states(&app, &ids).await;
        }
        second.kill();

        let missing: Vec<u64> = (0..n).filter(|i| !done.contains_key(i)).collect();
        assert!(missing.is_empty(), "lost: {missing:?}");
        let duplicates: u64 = done.values().map(|c| c - 1).sum();
        let mut twice: Vec<u64> = done.iter().filter(|(_, c)| **c > 1).map(|(i, _)| *i).collect();
        twice.sort_unstable();
        eprintln!(
            "{} SIGKILL crash test: {n} messages, {} run before the kill, {at_kill} at the kill ({} in flight, {} ready), {duplicates} run twice {twice:?}, none lost",
            B::NAME,
            before.len(),
            stats_at_kill.in_flight,
            stats_at_kill.ready,
        );
        assert!(
            duplicates <= self.max_duplicates,
            "only the killed worker's prefetch window can run twice: {duplicates}"
        );
        KillReport {
            broker,
            messages: n,
            before: before.len(),
            at_kill,
            stats_at_kill,
            runs: done,
            duplicates,
            log: [first.log(), second.log()].join("\n"),
        }
    }
}
