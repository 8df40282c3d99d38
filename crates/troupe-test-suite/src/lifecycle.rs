//! Conformance cases for the task lifecycle through a worker (design §4b): task states,
//! cancellation, unique messages, progress and soft time limits, on the broker under test with
//! its state backend ([`TestBroker::state`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use troupe_core::middleware::{Retries, TaskTracking, worker_id};
use troupe_core::{
    ActorError, App, CancelMode, CancelOutcome, SendOptions, StopReason, TaskFilter, TaskQuery, TaskRecord, TaskStatus,
    current_task, now_ms,
};
use troupe_worker::{Worker, WorkerHandle};

use crate::TestBroker;
use crate::cases::wait_drained;
use crate::support::{TestActor, eventually, unique_queue};

const WAIT: Duration = Duration::from_secs(15);

fn app(tb: &TestBroker, actors: &[&TestActor]) -> App {
    let mut builder = App::builder(Arc::clone(&tb.broker))
        .state(Arc::clone(&tb.state))
        .track_tasks(TaskTracking::default())
        .retries(Retries::default().min_backoff(Duration::from_millis(50)));
    for actor in actors {
        builder = builder.actor((*actor).clone());
    }
    builder.build().expect("app")
}

/// A worker for the lifecycle and group cases: concurrency 4, quick fetches and shutdown.
pub(crate) async fn start(app: &App) -> WorkerHandle {
    Worker::builder(app.clone())
        .concurrency(4)
        .fetch_timeout(Duration::from_millis(200))
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .expect("worker starts")
}

async fn record(app: &App, id: &str) -> TaskRecord {
    app.task(id).await.expect("task").expect("the task has a record")
}

/// Waits until the task of `id` is in `status`; returns its record.
async fn wait_status(app: &App, id: &str, status: TaskStatus) -> TaskRecord {
    let deadline = Instant::now() + WAIT;
    loop {
        let current = app.task(id).await.expect("task");
        if let Some(r) = current.as_ref().filter(|r| r.status == status) {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "task {id} never became {status}: {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An actor that runs until `release` is set (at most 30 s), counting its starts.
fn holding(name: &str, queue: &str, release: &Arc<AtomicBool>) -> TestActor {
    let release = Arc::clone(release);
    TestActor::new(name, queue).behaviour(move |_, _| {
        let release = Arc::clone(&release);
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !release.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(json!("released"))
        }
    })
}

/// Every state a message passes is recorded, with times, attempts, the last error and the
/// worker: delayed, enqueued, succeeded, failed, retrying (with its eta), skipped; pages and
/// counts see them.
pub async fn task_state_follows_a_message_through_the_worker(tb: &TestBroker) {
    let q = unique_queue("states");
    let ok = TestActor::new("st_ok", &q);
    let failing = TestActor::new("st_fail", &q)
        .options(|o| o.max_retries(0))
        .behaviour(|_, _| async { Err(ActorError::new("Boom", "it broke")) });
    let retrying = TestActor::new("st_retry", &q)
        .options(|o| o.min_backoff(Duration::from_secs(3600)))
        .behaviour(|_, _| async { Err(ActorError::new("Flaky", "try later")) });
    let skipping = TestActor::new("st_skip", &q).behaviour(|_, _| async { Err(ActorError::skip()) });
    let app = app(tb, &[&ok, &failing, &retrying, &skipping]);

    let sent_at = now_ms();
    let delayed = app
        .send_with_options(
            &ok,
            vec![json!("later")],
            SendOptions::new().delay(Duration::from_secs(3600)),
        )
        .await
        .expect("send");
    let r = record(&app, delayed.message_id()).await;
    assert_eq!(r.status, TaskStatus::Delayed);
    let eta = r.eta.expect("a delayed task has an eta");
    assert!(eta >= sent_at + 3_599_000, "eta {eta} vs sent {sent_at}");
    tokio::time::sleep(Duration::from_millis(5)).await; // a later first-recorded time: newest first below
    let first = app.send(&ok, vec![json!(1)]).await.expect("send");
    let r = record(&app, first.message_id()).await;
    assert_eq!(
        (r.status, r.actor.as_str(), r.queue.as_str()),
        (TaskStatus::Enqueued, "st_ok", q.as_str())
    );
    assert!(r.enqueued_at >= sent_at && r.started_at.is_none());
    assert_eq!(r.args, None, "arguments are not kept unless asked");
    let failed = app.send(&failing, vec![]).await.expect("send");
    let retried = app.send(&retrying, vec![]).await.expect("send");
    let skipped = app.send(&skipping, vec![]).await.expect("send");

    let worker = start(&app).await;
    let r = wait_status(&app, first.message_id(), TaskStatus::Succeeded).await;
    let (started, finished) = (r.started_at.expect("started"), r.finished_at.expect("finished"));
    assert!(r.enqueued_at <= started && started <= finished, "{r:?}");
    assert_eq!(r.attempts, 1);
    assert_eq!(r.worker.as_deref(), Some(worker_id()));
    let r = wait_status(&app, failed.message_id(), TaskStatus::Failed).await;
    assert_eq!(
        (r.error_type.as_deref(), r.error.as_deref()),
        (Some("Boom"), Some("it broke"))
    );
    let r = wait_status(&app, retried.message_id(), TaskStatus::Retrying).await;
    assert!(
        r.eta.expect("a retrying task has an eta") > now_ms() + 1_800_000,
        "{r:?}"
    );
    assert_eq!(r.attempts, 1);
    assert_eq!(r.error_type.as_deref(), Some("Flaky"));
    wait_status(&app, skipped.message_id(), TaskStatus::Skipped).await;
    worker.stop().await;

    let counts = app
        .task_counts(&TaskFilter::new().queue(q.clone()))
        .await
        .expect("counts");
    for (status, n) in [
        (TaskStatus::Delayed, 1),
        (TaskStatus::Succeeded, 1),
        (TaskStatus::Failed, 1),
        (TaskStatus::Retrying, 1),
        (TaskStatus::Skipped, 1),
    ] {
        assert_eq!(counts.status(status), n, "{status}: {counts:?}");
    }
    assert_eq!(counts.by_actor.get("st_ok").copied(), Some(2));
    let page = app
        .tasks(&TaskQuery::new(
            TaskFilter::new().status(TaskStatus::Failed).queue(q.clone()),
        ))
        .await
        .expect("page");
    let ids: Vec<&str> = page.tasks.iter().map(|t| t.message_id.as_str()).collect();
    assert_eq!(ids, vec![failed.message_id()]);
    let oks = app
        .tasks(&TaskQuery::new(TaskFilter::new().actor("st_ok").queue(q.clone())))
        .await
        .expect("page");
    let ids: Vec<&str> = oks.tasks.iter().map(|t| t.message_id.as_str()).collect();
    assert_eq!(ids, vec![first.message_id(), delayed.message_id()], "newest first");
}

/// A message cancelled while no worker runs (queued, or delayed) never runs when a worker
/// comes back: it is skipped and acked, and its state is cancelled.
pub async fn cancel_while_the_worker_is_stopped(tb: &TestBroker) {
    let q = unique_queue("cancel_pending");
    let victim = TestActor::new("victim", &q);
    let marker = TestActor::new("marker", &q);
    let app = app(tb, &[&victim, &marker]);
    let queued = app.send(&victim, vec![json!("queued")]).await.expect("send");
    let delayed = app
        .send_with_options(
            &victim,
            vec![json!("delayed")],
            SendOptions::new().delay(Duration::from_millis(300)),
        )
        .await
        .expect("send");
    assert_eq!(
        app.cancel(queued.message_id()).await.expect("cancel"),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        app.cancel_with(delayed.message_id(), CancelMode::Pending)
            .await
            .expect("cancel"),
        CancelOutcome::Cancelled
    );
    assert_eq!(record(&app, queued.message_id()).await.status, TaskStatus::Cancelled);
    let worker = start(&app).await;
    app.send(&marker, vec![]).await.expect("send");
    assert!(eventually(WAIT, || marker.count() == 1).await, "the marker ran");
    // Waits for the delayed one too: it counts as pending until it came due and was skipped.
    wait_drained(tb, &q).await;
    worker.stop().await;
    assert_eq!(victim.count(), 0, "a cancelled message never runs");
    for id in [queued.message_id(), delayed.message_id()] {
        let r = record(&app, id).await;
        assert_eq!(r.status, TaskStatus::Cancelled, "{r:?}");
        assert!(r.started_at.is_none(), "{r:?}");
    }
}

/// Cancelling a running async actor stops it at its next `.await` (its drop guard runs), its
/// state becomes cancelled, and its message is acked: it does not come back, not even after
/// the broker's redelivery time.
pub async fn cancel_stops_a_running_async_actor(tb: &TestBroker) {
    struct Guard(Arc<AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let q = unique_queue("cancel_running");
    let dropped = Arc::new(AtomicUsize::new(0));
    let guard_count = Arc::clone(&dropped);
    let long = TestActor::new("long", &q).behaviour(move |_, _| {
        let guard_count = Arc::clone(&guard_count);
        async move {
            let _guard = Guard(guard_count);
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(json!("finished"))
        }
    });
    let app = app(tb, &[&long]);
    let worker = start(&app).await;
    let sent = app.send(&long, vec![]).await.expect("send");
    wait_status(&app, sent.message_id(), TaskStatus::Running).await;
    assert_eq!(
        app.cancel(sent.message_id()).await.expect("cancel"),
        CancelOutcome::Aborting
    );
    let r = wait_status(&app, sent.message_id(), TaskStatus::Cancelled).await;
    assert!(r.finished_at.is_some());
    assert!(
        eventually(WAIT, || dropped.load(Ordering::SeqCst) == 1).await,
        "the actor's future was dropped"
    );
    wait_drained(tb, &q).await;
    tokio::time::sleep(tb.redelivery_timeout + Duration::from_millis(500)).await;
    worker.stop().await;
    assert_eq!(long.count(), 1, "the cancelled message did not come back");
    assert_eq!(record(&app, sent.message_id()).await.status, TaskStatus::Cancelled);
}

/// A running blocking actor that is cancelled is abandoned: its worker slot is freed, its
/// outcome is discarded, and it can see it was stopped (to end early).
pub async fn cancel_abandons_a_running_blocking_actor(tb: &TestBroker) {
    let q = unique_queue("cancel_blocking");
    let saw_stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&saw_stop);
    let blocking = TestActor::new("blocking", &q).behaviour(move |_, _| {
        let seen = Arc::clone(&seen);
        troupe_core::__private::run_blocking(move || {
            let task = current_task().map_err(ActorError::from)?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !task.is_stopped() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if task.stop_reason() == Some(StopReason::Cancelled) {
                seen.store(true, Ordering::SeqCst);
            }
            Ok(json!("discarded"))
        })
    });
    let app = app(tb, &[&blocking]);
    let worker = start(&app).await;
    let sent = app.send(&blocking, vec![]).await.expect("send");
    wait_status(&app, sent.message_id(), TaskStatus::Running).await;
    assert_eq!(
        app.cancel(sent.message_id()).await.expect("cancel"),
        CancelOutcome::Aborting
    );
    wait_status(&app, sent.message_id(), TaskStatus::Cancelled).await;
    assert!(
        eventually(WAIT, || saw_stop.load(Ordering::SeqCst)).await,
        "the blocking call saw it was cancelled"
    );
    wait_drained(tb, &q).await;
    worker.stop().await;
    assert_eq!(
        record(&app, sent.message_id()).await.status,
        TaskStatus::Cancelled,
        "its outcome was discarded"
    );
}

/// `CancelMode::Pending` leaves running work alone: it finishes and succeeds.
pub async fn cancel_pending_only_lets_running_work_finish(tb: &TestBroker) {
    let q = unique_queue("cancel_mode");
    let release = Arc::new(AtomicBool::new(false));
    let held = holding("held", &q, &release);
    let app = app(tb, &[&held]);
    let worker = start(&app).await;
    let sent = app.send(&held, vec![]).await.expect("send");
    wait_status(&app, sent.message_id(), TaskStatus::Running).await;
    assert_eq!(
        app.cancel_with(sent.message_id(), CancelMode::Pending)
            .await
            .expect("cancel"),
        CancelOutcome::Running
    );
    // No event tells that the watcher saw the request and left the attempt alone: give it
    // a third of a second (its rounds wake on requests) before letting the actor finish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.store(true, Ordering::SeqCst);
    wait_status(&app, sent.message_id(), TaskStatus::Succeeded).await;
    wait_drained(tb, &q).await;
    worker.stop().await;
    assert_eq!(held.count(), 1);
}

/// Cancelling an unknown id or a finished task changes nothing and says which it was.
pub async fn cancel_unknown_or_finished_ids_are_told_apart(tb: &TestBroker) {
    let q = unique_queue("cancel_done");
    let quick = TestActor::new("quick", &q);
    let app = app(tb, &[&quick]);
    let unknown = troupe_core::new_message_id();
    assert_eq!(app.cancel(&unknown).await.expect("cancel"), CancelOutcome::Unknown);
    let worker = start(&app).await;
    let sent = app.send(&quick, vec![]).await.expect("send");
    wait_status(&app, sent.message_id(), TaskStatus::Succeeded).await;
    worker.stop().await;
    assert_eq!(
        app.cancel(sent.message_id()).await.expect("cancel"),
        CancelOutcome::Finished(TaskStatus::Succeeded)
    );
    assert_eq!(record(&app, sent.message_id()).await.status, TaskStatus::Succeeded);
}

/// While a unique message is pending or running, sending the same actor and arguments (or the
/// same unique key) returns its id and enqueues nothing; two apps racing enqueue one; once it
/// has finished, the key is free again.
pub async fn unique_sends_return_the_first_id(tb: &TestBroker) {
    let q = unique_queue("unique");
    let release = Arc::new(AtomicBool::new(false));
    let once = holding("once", &q, &release).options(|o| o.unique_for(Duration::from_secs(3600)));
    let app = app(tb, &[&once]);
    let other_app = app_like(tb, &once);

    let first = app.send(&once, vec![json!("a"), json!({"k": 1})]).await.expect("send");
    let again = app.send(&once, vec![json!("a"), json!({"k": 1})]).await.expect("send");
    assert_eq!(again.message_id(), first.message_id());
    let different = app.send(&once, vec![json!("b")]).await.expect("send");
    assert_ne!(different.message_id(), first.message_id());
    let keyed = SendOptions::new().unique_key("order-7");
    let k1 = app
        .send_with_options(&once, vec![json!("x")], keyed.clone())
        .await
        .expect("send");
    let k2 = app
        .send_with_options(&once, vec![json!("y")], keyed)
        .await
        .expect("send");
    assert_eq!(k1.message_id(), k2.message_id(), "one key given by the sender");

    let mut racers = Vec::new();
    for i in 0..10 {
        let racer = if i % 2 == 0 { app.clone() } else { other_app.clone() };
        let actor = once.clone();
        racers.push(tokio::spawn(async move {
            racer
                .send(&actor, vec![json!("race")])
                .await
                .map(|s| s.message_id().to_owned())
        }));
    }
    let mut ids = Vec::new();
    for racer in racers {
        ids.push(racer.await.expect("join").expect("send"));
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "racing senders enqueue one message: {ids:?}");
    assert_eq!(
        tb.broker.stats(&q).await.expect("stats").ready,
        4,
        "a, b, order-7, race"
    );

    let worker = start(&app).await;
    assert!(
        eventually(WAIT, || once.count() == 4).await,
        "each unique message ran once"
    );
    let running_again = app.send(&once, vec![json!("a"), json!({"k": 1})]).await.expect("send");
    assert_eq!(
        running_again.message_id(),
        first.message_id(),
        "still running: still the first"
    );
    release.store(true, Ordering::SeqCst);
    wait_status(&app, first.message_id(), TaskStatus::Succeeded).await;
    wait_drained(tb, &q).await;
    let after = app.send(&once, vec![json!("a"), json!({"k": 1})]).await.expect("send");
    assert_ne!(
        after.message_id(),
        first.message_id(),
        "the key was freed when it finished"
    );
    assert!(eventually(WAIT, || once.count() == 5).await);
    wait_drained(tb, &q).await;
    worker.stop().await;
}

fn app_like(tb: &TestBroker, actor: &TestActor) -> App {
    app(tb, &[actor])
}

/// A unique key frees itself when `unique_for` passes, even if its message never ran (its
/// worker crashed, or none runs).
pub async fn unique_key_frees_itself_when_unique_for_passes(tb: &TestBroker) {
    let q = unique_queue("unique_ttl");
    let brief = TestActor::new("brief", &q).options(|o| o.unique_for(Duration::from_millis(300)));
    let app = app(tb, &[&brief]);
    let first = app.send(&brief, vec![json!(1)]).await.expect("send");
    let again = app.send(&brief, vec![json!(1)]).await.expect("send");
    assert_eq!(again.message_id(), first.message_id());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = app.send(&brief, vec![json!(1)]).await.expect("send");
    assert_ne!(later.message_id(), first.message_id());
    let worker = start(&app).await;
    assert!(eventually(WAIT, || brief.count() == 2).await);
    wait_drained(tb, &q).await;
    worker.stop().await;
}

/// Progress an actor reports is readable by id while it runs, and kept after.
pub async fn progress_is_readable_while_the_task_runs(tb: &TestBroker) {
    let q = unique_queue("progress");
    let release = Arc::new(AtomicBool::new(false));
    let gate = Arc::clone(&release);
    let reporting = TestActor::new("reporting", &q).behaviour(move |_, _| {
        let gate = Arc::clone(&gate);
        async move {
            let task = current_task()?;
            task.report_progress(json!({"done": 1, "of": 3})).await?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !gate.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            task.report_progress(json!({"done": 3, "of": 3})).await?;
            Ok(Value::Null)
        }
    });
    let app = app(tb, &[&reporting]);
    let worker = start(&app).await;
    let sent = app.send(&reporting, vec![]).await.expect("send");
    let deadline = Instant::now() + WAIT;
    loop {
        let r = record(&app, sent.message_id()).await;
        if r.progress.is_some() {
            assert_eq!(r.status, TaskStatus::Running);
            assert_eq!(r.progress, Some(json!({"done": 1, "of": 3})));
            break;
        }
        assert!(Instant::now() < deadline, "no progress seen: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    release.store(true, Ordering::SeqCst);
    let r = wait_status(&app, sent.message_id(), TaskStatus::Succeeded).await;
    assert_eq!(r.progress, Some(json!({"done": 3, "of": 3})));
    worker.stop().await;
}

/// The soft time limit tells the actor (its task handle stops with `SoftTimeLimit`) before the
/// hard limit, so it can return what it has.
pub async fn progress_soft_time_limit_tells_the_actor(tb: &TestBroker) {
    let q = unique_queue("soft_limit");
    let reason = Arc::new(std::sync::Mutex::new(None));
    let seen = Arc::clone(&reason);
    let patient = TestActor::new("patient", &q)
        .options(|o| {
            o.soft_time_limit(Duration::from_millis(200))
                .time_limit(Duration::from_secs(20))
        })
        .behaviour(move |_, _| {
            let seen = Arc::clone(&seen);
            async move {
                let task = current_task()?;
                let started = Instant::now();
                let _ = tokio::time::timeout(Duration::from_secs(10), task.stopped()).await;
                if let Ok(mut seen) = seen.lock() {
                    *seen = Some((task.stop_reason(), started.elapsed()));
                }
                Ok(json!("partial"))
            }
        });
    let app = app(tb, &[&patient]);
    let worker = start(&app).await;
    let sent = app.send(&patient, vec![]).await.expect("send");
    wait_status(&app, sent.message_id(), TaskStatus::Succeeded).await;
    worker.stop().await;
    let (why, after) = reason.lock().expect("lock").expect("the actor returned");
    assert_eq!(why, Some(StopReason::SoftTimeLimit));
    assert!(
        after >= Duration::from_millis(150) && after < Duration::from_secs(10),
        "{after:?}"
    );
}
