//! Conformance cases for task stores (design §4b): task states, queries, progress, cancellation
//! requests and unique keys, the same on every state backend. Each case works on actors and
//! queues of its own, so backends shared between cases (one Redis, one database) stay apart.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use troupe_core::tasks::task_version;
use troupe_core::{CancelMode, StateBackend, TaskFilter, TaskQuery, TaskStatus, TaskStore, TaskUpdate, now_ms};

const KEEP: Duration = Duration::from_secs(3600);

fn store(backend: &Arc<dyn StateBackend>) -> &dyn TaskStore {
    backend.tasks().expect("this state backend keeps task states")
}

fn id() -> String {
    troupe_core::new_message_id()
}

fn update(id: &str, actor: &str, queue: &str, status: TaskStatus, version: u64, at: u64) -> TaskUpdate {
    let mut u = TaskUpdate::new(id, actor, queue, status, version);
    u.at = at;
    u
}

/// A record follows a message's writes in version order, whatever order they arrive in: a late
/// enqueue write does not undo a start, times and the worker are kept, the error of a failure
/// stays after a later success write of a newer attempt.
pub async fn task_state_records_follow_versions(backend: Arc<dyn StateBackend>) {
    let tasks = store(&backend);
    let (m, actor, queue) = (id(), crate::unique_queue("act"), crate::unique_queue("q"));
    let t0 = now_ms();
    assert!(tasks.task(&m).await.expect("task").is_none());

    let mut running = update(&m, &actor, &queue, TaskStatus::Running, task_version(0, 1), t0 + 10);
    running.attempts = 1;
    running.worker = Some("host-a:1".into());
    assert!(
        tasks.record(&running, KEEP).await.expect("record running"),
        "first write creates"
    );
    let late = update(&m, &actor, &queue, TaskStatus::Enqueued, task_version(0, 0), t0);
    assert!(
        !tasks.record(&late, KEEP).await.expect("record late"),
        "an older version is refused"
    );
    let r = tasks.task(&m).await.expect("task").expect("record");
    assert_eq!(r.status, TaskStatus::Running);
    assert_eq!((r.actor.as_str(), r.queue.as_str()), (actor.as_str(), queue.as_str()));
    assert_eq!(r.started_at, Some(t0 + 10));
    assert_eq!(r.worker.as_deref(), Some("host-a:1"));
    assert_eq!(r.attempts, 1);
    assert_eq!(r.finished_at, None);

    let mut retrying = update(&m, &actor, &queue, TaskStatus::Retrying, task_version(1, 0), t0 + 20);
    retrying.attempts = 1;
    retrying.eta = Some(t0 + 5_000);
    retrying.error_type = Some("ValueError".into());
    retrying.error = Some("boom".into());
    assert!(tasks.record(&retrying, KEEP).await.expect("record retrying"));
    let r = tasks.task(&m).await.expect("task").expect("record");
    assert_eq!(r.status, TaskStatus::Retrying);
    assert_eq!(r.eta, Some(t0 + 5_000));
    assert_eq!(
        (r.error_type.as_deref(), r.error.as_deref()),
        (Some("ValueError"), Some("boom"))
    );

    let mut second = update(&m, &actor, &queue, TaskStatus::Running, task_version(1, 1), t0 + 30);
    second.attempts = 2;
    second.worker = Some("host-b:2".into());
    assert!(tasks.record(&second, KEEP).await.expect("record second attempt"));
    let mut done = update(&m, &actor, &queue, TaskStatus::Succeeded, task_version(1, 2), t0 + 40);
    done.attempts = 2;
    assert!(tasks.record(&done, KEEP).await.expect("record success"));
    let r = tasks.task(&m).await.expect("task").expect("record");
    assert_eq!(r.status, TaskStatus::Succeeded);
    assert_eq!(r.eta, None, "the eta is cleared once the message runs");
    assert_eq!(
        (r.started_at, r.finished_at, r.updated_at),
        (Some(t0 + 30), Some(t0 + 40), t0 + 40)
    );
    assert_eq!(r.worker.as_deref(), Some("host-b:2"));
    assert_eq!(r.attempts, 2);
    assert_eq!(r.error.as_deref(), Some("boom"), "the last error is kept");
    assert_eq!(r.enqueued_at, t0 + 10, "first recorded when the first write came");

    let mut kept = update(&id(), &actor, &queue, TaskStatus::Enqueued, 0, t0);
    kept.args = Some(json!({"args": [1, "two"], "kwargs": {"k": null}}));
    assert!(tasks.record(&kept, KEEP).await.expect("record with args"));
    let r = tasks.task(&kept.message_id).await.expect("task").expect("record");
    assert_eq!(r.args, kept.args);
    assert_eq!(r.progress, None);
}

/// `record_many` applies each update by the same rule as `record` and says which applied.
pub async fn task_state_record_many_applies_each_by_its_version(backend: Arc<dyn StateBackend>) {
    let tasks = store(&backend);
    let (actor, queue) = (crate::unique_queue("act"), crate::unique_queue("q"));
    let (started, fresh, cancelled) = (id(), id(), id());
    let t0 = now_ms();
    assert!(
        tasks
            .record(&update(&started, &actor, &queue, TaskStatus::Running, 1, t0), KEEP)
            .await
            .expect("record")
    );
    assert!(
        tasks
            .record(&update(&cancelled, &actor, &queue, TaskStatus::Enqueued, 0, t0), KEEP)
            .await
            .expect("record")
    );
    assert_eq!(
        tasks.mark_cancelled(&cancelled, KEEP).await.expect("mark"),
        Some(TaskStatus::Enqueued)
    );
    let mut batch = vec![
        update(&started, &actor, &queue, TaskStatus::Enqueued, 0, t0 + 1),
        update(&fresh, &actor, &queue, TaskStatus::Enqueued, 0, t0 + 1),
        update(&cancelled, &actor, &queue, TaskStatus::Running, 1, t0 + 1),
    ];
    batch[1].worker = Some("w".into());
    assert_eq!(
        tasks.record_many(&batch, KEEP).await.expect("record many"),
        vec![false, true, false]
    );
    assert_eq!(
        tasks.task(&started).await.expect("task").expect("record").status,
        TaskStatus::Running
    );
    assert_eq!(
        tasks
            .task(&fresh)
            .await
            .expect("task")
            .expect("record")
            .worker
            .as_deref(),
        Some("w")
    );
    assert_eq!(
        tasks.task(&cancelled).await.expect("task").expect("record").status,
        TaskStatus::Cancelled
    );
    let twice = [
        update(&fresh, &actor, &queue, TaskStatus::Running, 1, t0 + 2),
        update(&fresh, &actor, &queue, TaskStatus::Succeeded, 2, t0 + 3),
    ];
    assert_eq!(
        tasks.record_many(&twice, KEEP).await.expect("record many"),
        vec![true, true],
        "one message twice, in order"
    );
    assert_eq!(
        tasks.task(&fresh).await.expect("task").expect("record").status,
        TaskStatus::Succeeded
    );
}

/// Pages are newest first, filtered by status, actor, queue and time, and a cursor continues a
/// page where it ended without repeating or skipping a task.
pub async fn task_state_queries_filter_and_page(backend: Arc<dyn StateBackend>) {
    let tasks = store(&backend);
    let (a, b) = (crate::unique_queue("act"), crate::unique_queue("act"));
    let (q1, q2) = (crate::unique_queue("q"), crate::unique_queue("q"));
    let t0 = now_ms() - 100_000;
    // (actor, queue, status, enqueued_at offset): two at one instant to test the id tie-break.
    let rows = [
        (&a, &q1, TaskStatus::Enqueued, 1),
        (&a, &q1, TaskStatus::Failed, 2),
        (&a, &q2, TaskStatus::Failed, 3),
        (&a, &q1, TaskStatus::Failed, 3),
        (&b, &q1, TaskStatus::Failed, 4),
        (&a, &q2, TaskStatus::Succeeded, 5),
        (&a, &q1, TaskStatus::Failed, 6),
    ];
    let mut ids = Vec::new();
    for (actor, queue, status, offset) in rows {
        let m = id();
        let version = if status.is_final() { 2 } else { 0 };
        let u = update(&m, actor, queue, status, version, t0 + offset);
        assert!(tasks.record(&u, KEEP).await.expect("record"));
        ids.push((m, offset));
    }
    let newest_first = |wanted: &[usize]| -> Vec<String> {
        let mut picked: Vec<(u64, String)> = wanted.iter().map(|&i| (ids[i].1, ids[i].0.clone())).collect();
        picked.sort_by(|x, y| y.cmp(x));
        picked.into_iter().map(|(_, m)| m).collect()
    };
    let page_ids = |page: &troupe_core::TaskPage| page.tasks.iter().map(|t| t.message_id.clone()).collect::<Vec<_>>();

    let failed_a = TaskFilter::new().status(TaskStatus::Failed).actor(a.clone());
    let all = tasks.tasks(&TaskQuery::new(failed_a.clone())).await.expect("page");
    assert_eq!(page_ids(&all), newest_first(&[1, 2, 3, 6]));
    assert!(all.next.is_none(), "a page that is not full has no next");
    assert!(all.tasks.iter().all(|t| t.status == TaskStatus::Failed && t.actor == a));

    let mut seen = Vec::new();
    let mut query = TaskQuery::new(failed_a.clone()).limit(2);
    loop {
        let page = tasks.tasks(&query).await.expect("page");
        assert!(page.tasks.len() <= 2);
        seen.extend(page_ids(&page));
        match page.next {
            Some(next) => query = TaskQuery::new(failed_a.clone()).limit(2).after(next),
            None => break,
        }
    }
    assert_eq!(
        seen,
        newest_first(&[1, 2, 3, 6]),
        "cursor pages cover the filter once each"
    );

    let by_queue = tasks
        .tasks(&TaskQuery::new(TaskFilter::new().queue(q2.clone())))
        .await
        .expect("page");
    assert_eq!(page_ids(&by_queue), newest_first(&[2, 5]));
    let failed_q1 = tasks
        .tasks(&TaskQuery::new(
            TaskFilter::new().status(TaskStatus::Failed).queue(q1.clone()),
        ))
        .await
        .expect("page");
    assert_eq!(page_ids(&failed_q1), newest_first(&[1, 3, 4, 6]));
    let window = tasks
        .tasks(&TaskQuery::new(
            TaskFilter::new().actor(a.clone()).since(t0 + 2).until(t0 + 5),
        ))
        .await
        .expect("page");
    assert_eq!(
        page_ids(&window),
        newest_first(&[1, 2, 3]),
        "since is inclusive, until exclusive"
    );
    let actor_and_queue = tasks
        .tasks(&TaskQuery::new(TaskFilter::new().actor(a.clone()).queue(q1.clone())))
        .await
        .expect("page");
    assert_eq!(page_ids(&actor_and_queue), newest_first(&[0, 1, 3, 6]));
    let none = tasks
        .tasks(&TaskQuery::new(
            TaskFilter::new().status(TaskStatus::Running).actor(b.clone()),
        ))
        .await
        .expect("page");
    assert!(none.tasks.is_empty() && none.next.is_none());
}

/// Counts per status, actor and queue, within one actor or one queue, follow every change.
pub async fn task_state_counts_per_status_actor_and_queue(backend: Arc<dyn StateBackend>) {
    let tasks = store(&backend);
    let (a, b) = (crate::unique_queue("act"), crate::unique_queue("act"));
    let (q1, q2) = (crate::unique_queue("q"), crate::unique_queue("q"));
    let t0 = now_ms();
    let moving = id();
    for (m, actor, queue, status) in [
        (moving.clone(), &a, &q1, TaskStatus::Enqueued),
        (id(), &a, &q1, TaskStatus::Succeeded),
        (id(), &b, &q1, TaskStatus::Succeeded),
        (id(), &a, &q2, TaskStatus::Failed),
    ] {
        let version = if status.is_final() { 2 } else { 0 };
        assert!(
            tasks
                .record(&update(&m, actor, queue, status, version, t0), KEEP)
                .await
                .expect("record")
        );
    }
    let in_q1 = tasks
        .task_counts(&TaskFilter::new().queue(q1.clone()))
        .await
        .expect("counts");
    assert_eq!(in_q1.status(TaskStatus::Enqueued), 1);
    assert_eq!(in_q1.status(TaskStatus::Succeeded), 2);
    assert_eq!(in_q1.status(TaskStatus::Failed), 0);
    assert_eq!(in_q1.total(), 3);
    assert_eq!(in_q1.by_actor.get(&a).copied(), Some(2));
    assert_eq!(in_q1.by_actor.get(&b).copied(), Some(1));
    assert_eq!(in_q1.by_queue.get(&q1).copied(), Some(3));
    assert_eq!(in_q1.by_queue.len(), 1);
    let of_a = tasks
        .task_counts(&TaskFilter::new().actor(a.clone()))
        .await
        .expect("counts");
    assert_eq!(of_a.total(), 3);
    assert_eq!(of_a.by_queue.get(&q1).copied(), Some(2));
    assert_eq!(of_a.by_queue.get(&q2).copied(), Some(1));
    assert_eq!(of_a.by_actor.len(), 1);
    // The per-status counts a dashboard reads agree, for every scope.
    for scope in [
        TaskFilter::new().queue(q1.clone()),
        TaskFilter::new().actor(a.clone()),
        TaskFilter::new().actor(a.clone()).queue(q2.clone()),
    ] {
        let full = tasks.task_counts(&scope).await.expect("counts").by_status;
        assert_eq!(
            tasks.status_counts(&scope).await.expect("status counts"),
            full,
            "{scope:?}"
        );
    }

    let running = update(&moving, &a, &q1, TaskStatus::Running, 1, t0 + 1);
    assert!(tasks.record(&running, KEEP).await.expect("record"));
    let in_q1 = tasks
        .task_counts(&TaskFilter::new().queue(q1.clone()))
        .await
        .expect("counts");
    assert_eq!(
        in_q1.status(TaskStatus::Enqueued),
        0,
        "a change moves the task between statuses"
    );
    assert_eq!(in_q1.status(TaskStatus::Running), 1);
    assert!(tasks.delete_task(&moving).await.expect("delete"));
    let in_q1 = tasks
        .task_counts(&TaskFilter::new().queue(q1.clone()))
        .await
        .expect("counts");
    assert_eq!(
        (in_q1.status(TaskStatus::Running), in_q1.total()),
        (0, 2),
        "a deleted task is not counted"
    );
}

/// A record can be deleted, and records past their retention are gone (and `expire_tasks`
/// removes them); a change renews the retention.
pub async fn task_state_delete_and_expire(backend: Arc<dyn StateBackend>) {
    let tasks = store(&backend);
    let (actor, queue) = (crate::unique_queue("act"), crate::unique_queue("q"));
    let m = id();
    assert!(
        tasks
            .record(&update(&m, &actor, &queue, TaskStatus::Enqueued, 0, now_ms()), KEEP)
            .await
            .expect("record")
    );
    assert!(tasks.delete_task(&m).await.expect("delete"));
    assert!(
        !tasks.delete_task(&m).await.expect("delete again"),
        "nothing left to delete"
    );
    assert!(tasks.task(&m).await.expect("task").is_none());

    let short = Duration::from_millis(300);
    let (gone, renewed) = (id(), id());
    for m in [&gone, &renewed] {
        assert!(
            tasks
                .record(&update(m, &actor, &queue, TaskStatus::Enqueued, 0, now_ms()), short)
                .await
                .expect("record")
        );
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        tasks
            .record(
                &update(&renewed, &actor, &queue, TaskStatus::Running, 1, now_ms()),
                KEEP
            )
            .await
            .expect("renew")
    );
    // Fixed wait: expiry follows each backend's own clock.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(tasks.task(&gone).await.expect("task").is_none(), "past its retention");
    let mut removed = 0;
    for _ in 0..100 {
        let n = tasks.expire_tasks(1000).await.expect("expire");
        removed += n;
        if n == 0 {
            break;
        }
    }
    let _ = removed; // other cases sharing the store may expire records of their own
    assert!(tasks.task(&gone).await.expect("task").is_none());
    assert!(
        tasks.task(&renewed).await.expect("task").is_some(),
        "a change renews the retention"
    );
    let page = tasks
        .tasks(&TaskQuery::new(TaskFilter::new().actor(actor.clone())))
        .await
        .expect("page");
    assert_eq!(page.tasks.len(), 1, "an expired record is not listed");
    let counts = tasks
        .task_counts(&TaskFilter::new().actor(actor.clone()))
        .await
        .expect("counts");
    assert_eq!(counts.total(), 1, "an expired record is not counted");
}

/// Progress is stored with a task's record and replaced by the next report; a task without a
/// record has none.
pub async fn progress_is_stored_with_the_record(backend: Arc<dyn StateBackend>) {
    let tasks = store(&backend);
    let m = id();
    assert!(
        !tasks.set_progress(&m, &json!(0.5), KEEP).await.expect("progress"),
        "no record yet"
    );
    let running = update(
        &m,
        &crate::unique_queue("act"),
        &crate::unique_queue("q"),
        TaskStatus::Running,
        1,
        now_ms(),
    );
    assert!(tasks.record(&running, KEEP).await.expect("record"));
    assert!(
        tasks
            .set_progress(&m, &json!({"done": 3, "of": 10}), KEEP)
            .await
            .expect("progress")
    );
    assert!(
        tasks
            .set_progress(&m, &json!({"done": 7, "of": 10, "step": "upload ✓"}), KEEP)
            .await
            .expect("progress")
    );
    let r = tasks.task(&m).await.expect("task").expect("record");
    assert_eq!(r.progress, Some(json!({"done": 7, "of": 10, "step": "upload ✓"})));
    assert_eq!(r.status, TaskStatus::Running, "progress does not change the state");
    let done = update(&m, &r.actor, &r.queue, TaskStatus::Succeeded, 2, now_ms());
    assert!(tasks.record(&done, KEEP).await.expect("record"));
    assert_eq!(
        tasks.task(&m).await.expect("task").expect("record").progress,
        Some(json!({"done": 7, "of": 10, "step": "upload ✓"}))
    );
}

/// A cancellation request is kept for its TTL and seen by id; marking cancelled changes only a
/// pending task, and a cancelled record refuses every later write.
pub async fn cancel_requests_are_kept_and_marked(backend: Arc<dyn StateBackend>) {
    let tasks = store(&backend);
    let (actor, queue) = (crate::unique_queue("act"), crate::unique_queue("q"));
    let (pending, running, done, unknown) = (id(), id(), id(), id());
    let t0 = now_ms();
    for (m, status, version) in [
        (&pending, TaskStatus::Delayed, 0),
        (&running, TaskStatus::Running, 1),
        (&done, TaskStatus::Succeeded, 2),
    ] {
        assert!(
            tasks
                .record(&update(m, &actor, &queue, status, version, t0), KEEP)
                .await
                .expect("record")
        );
    }
    assert_eq!(tasks.cancel_requested(&pending).await.expect("requested"), None);
    tasks
        .request_cancel(&pending, CancelMode::Pending, KEEP)
        .await
        .expect("request");
    tasks
        .request_cancel(&running, CancelMode::Abort, KEEP)
        .await
        .expect("request");
    for _ in 0..2 {
        assert_eq!(
            tasks.cancel_requested(&pending).await.expect("requested"),
            Some(CancelMode::Pending),
            "reading a request keeps it"
        );
    }
    assert_eq!(
        tasks.cancel_requested(&running).await.expect("requested"),
        Some(CancelMode::Abort)
    );
    let asked = [pending.clone(), unknown.clone(), running.clone()];
    assert_eq!(
        tasks.cancel_requests(&asked).await.expect("requests"),
        vec![Some(CancelMode::Pending), None, Some(CancelMode::Abort)],
        "several at once, in the order asked"
    );

    assert_eq!(
        tasks.mark_cancelled(&pending, KEEP).await.expect("mark"),
        Some(TaskStatus::Delayed)
    );
    assert_eq!(
        tasks.mark_cancelled(&running, KEEP).await.expect("mark"),
        Some(TaskStatus::Running)
    );
    assert_eq!(
        tasks.mark_cancelled(&done, KEEP).await.expect("mark"),
        Some(TaskStatus::Succeeded)
    );
    assert_eq!(tasks.mark_cancelled(&unknown, KEEP).await.expect("mark"), None);
    let r = tasks.task(&pending).await.expect("task").expect("record");
    assert_eq!(r.status, TaskStatus::Cancelled);
    assert!(r.finished_at.is_some());
    assert_eq!(
        tasks.task(&running).await.expect("task").expect("record").status,
        TaskStatus::Running
    );
    assert_eq!(
        tasks.task(&done).await.expect("task").expect("record").status,
        TaskStatus::Succeeded
    );
    let late_start = update(&pending, &actor, &queue, TaskStatus::Running, 1, now_ms());
    assert!(
        !tasks.record(&late_start, KEEP).await.expect("record"),
        "a cancelled record refuses later writes"
    );
    assert_eq!(
        tasks.task(&pending).await.expect("task").expect("record").status,
        TaskStatus::Cancelled
    );

    let short = Duration::from_millis(200);
    let fleeting = id();
    tasks
        .request_cancel(&fleeting, CancelMode::Abort, short)
        .await
        .expect("request");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        tasks.cancel_requested(&fleeting).await.expect("requested"),
        None,
        "a request lives for its TTL"
    );
}

/// `wait_cancels` returns the requests among the ids it watches, as soon as one is made, and
/// nothing when none comes in time.
pub async fn cancel_requests_wake_a_watcher(backend: Arc<dyn StateBackend>) {
    let tasks = store(&backend);
    let (watched, other) = (vec![id(), id()], id());
    tasks
        .request_cancel(&other, CancelMode::Abort, KEEP)
        .await
        .expect("request");
    let found = tasks
        .wait_cancels(&watched, Duration::from_millis(100))
        .await
        .expect("wait");
    assert!(found.is_empty(), "{found:?}");
    let waiter = {
        let backend = Arc::clone(&backend);
        let watched = watched.clone();
        tokio::spawn(async move { store(&backend).wait_cancels(&watched, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    tasks
        .request_cancel(&watched[1], CancelMode::Abort, KEEP)
        .await
        .expect("request");
    let found = waiter.await.expect("join").expect("wait");
    assert_eq!(found, vec![(watched[1].clone(), CancelMode::Abort)]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the watcher woke before its timeout"
    );
}

/// A unique key is held by one message until it is freed by its holder or its TTL passes.
pub async fn unique_keys_are_claimed_once(backend: Arc<dyn StateBackend>) {
    let tasks = store(&backend);
    let key = crate::unique_queue("unique");
    let (first, second) = (id(), id());
    assert_eq!(tasks.claim_unique(&key, &first, KEEP).await.expect("claim"), None);
    assert_eq!(
        tasks.claim_unique(&key, &second, KEEP).await.expect("claim"),
        Some(first.clone())
    );
    assert_eq!(
        tasks.claim_unique(&key, &first, KEEP).await.expect("claim"),
        None,
        "the holder may claim again"
    );
    tasks.release_unique(&key, &second).await.expect("release");
    assert_eq!(
        tasks.claim_unique(&key, &second, KEEP).await.expect("claim"),
        Some(first.clone()),
        "only the holder frees it"
    );
    tasks.release_unique(&key, &first).await.expect("release");
    assert_eq!(tasks.claim_unique(&key, &second, KEEP).await.expect("claim"), None);

    let brief = crate::unique_queue("unique");
    assert_eq!(
        tasks
            .claim_unique(&brief, &first, Duration::from_millis(200))
            .await
            .expect("claim"),
        None
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        tasks.claim_unique(&brief, &second, KEEP).await.expect("claim"),
        None,
        "the key frees itself"
    );
}

/// Twenty claims racing on one key: exactly one wins, and every loser is told the winner.
pub async fn unique_claims_race_to_one_winner(backend: Arc<dyn StateBackend>) {
    let key = crate::unique_queue("unique");
    let ids: Vec<String> = (0..20).map(|_| id()).collect();
    let mut racers = Vec::new();
    for m in &ids {
        let (backend, key, m) = (Arc::clone(&backend), key.clone(), m.clone());
        racers.push(tokio::spawn(async move {
            let held = store(&backend).claim_unique(&key, &m, KEEP).await.expect("claim");
            (m, held)
        }));
    }
    let mut winners = Vec::new();
    let mut told = Vec::new();
    for racer in racers {
        let (m, held) = racer.await.expect("join");
        match held {
            None => winners.push(m),
            Some(holder) => told.push(holder),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert!(told.iter().all(|h| *h == winners[0]), "every loser is told the winner");
}
