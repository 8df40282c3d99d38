//! The examples, run end to end on a temporary SQLite file: each test calls the example's `run`
//! and checks what it did, not only that it finished.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/email_pipeline.rs"]
mod email_pipeline;

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/master_subtasks.rs"]
mod master_subtasks;

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/publish_priorities.rs"]
mod publish_priorities;

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/migrate_celery.rs"]
mod migrate_celery;

#[cfg(all(feature = "broker-postgres", feature = "results-postgres"))]
#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/migrate_pg_table.rs"]
mod migrate_pg_table;

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/brokers/shop.rs"]
mod shop;

#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/throttled_api.rs"]
mod throttled_api;

/// A temporary directory and the `sqlite://` URL of a file in it.
fn temp_db() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("example.db").display());
    (dir, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_pipeline_fans_out_ocr_and_monitors_every_attempt() {
    let (_dir, url) = temp_db();
    let mut out = Vec::new();
    let args = email_pipeline::Args {
        broker_url: url,
        concurrency: 4,
    };
    let summary = tokio::time::timeout(Duration::from_secs(20), email_pipeline::run(args, &mut out))
        .await
        .expect("the example finishes")
        .unwrap();
    let text = String::from_utf8(out).unwrap();

    assert_eq!(summary.emails, 5);
    assert_eq!(summary.attachments, 7);
    let email = &summary.actors["process_email"];
    assert_eq!(email.queue, "email");
    assert_eq!((email.started, email.succeeded, email.failed), (5, 5, 0), "{text}");
    // Three scans fail once each, then succeed on their retry.
    let ocr = &summary.actors["ocr_attachment"];
    assert_eq!(ocr.queue, "ocr");
    assert_eq!((ocr.started, ocr.succeeded, ocr.failed), (10, 7, 3), "{text}");
    assert!(ocr.max > Duration::ZERO && ocr.total >= ocr.max);

    // One start and one finish line per attempt, all printed.
    assert_eq!(summary.log_lines, 2 * 15);
    let lines = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(lines("[monitor] start"), 15, "{text}");
    assert_eq!(lines("[monitor] finish"), 15, "{text}");
    assert_eq!(lines("failed: OcrEngineBusy"), 3, "{text}");
    let retried = text
        .lines()
        .filter(|l| l.contains("ocr_attachment") && l.contains("retries=1"))
        .count();
    assert_eq!(retried, 6, "{text}");
    assert!(text.contains("per-actor summary"), "{text}");
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("ocr_attachment  ocr"))
        .expect("an ocr_attachment summary row");
    let numbers: Vec<&str> = row.split_whitespace().skip(2).take(3).collect();
    assert_eq!(numbers, ["10", "7", "3"], "{row}");
}

/// A webhook receiver: answers every POST with 204 and keeps the JSON bodies.
async fn webhook_server() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/failures", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::new()));
    let bodies = Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let bodies = Arc::clone(&bodies);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut chunk = [0u8; 1024];
                let (head_end, length) = loop {
                    let n = stream.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed before the headers ended");
                    request.extend_from_slice(&chunk[..n]);
                    if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
                        assert!(head.starts_with("post /hooks/failures http/1.1"), "{head}");
                        assert!(head.contains("content-type: application/json"), "{head}");
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse::<usize>().unwrap())
                            .expect("a Content-Length header");
                        break (end + 4, length);
                    }
                };
                while request.len() < head_end + length {
                    let n = stream.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed before the body ended");
                    request.extend_from_slice(&chunk[..n]);
                }
                let body: Value = serde_json::from_slice(&request[head_end..head_end + length]).unwrap();
                bodies.lock().unwrap().push(body);
                stream
                    .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let _ = stream.shutdown().await;
            });
        }
    });
    (url, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_subtasks_posts_each_batch_once_and_reports_failures_to_the_webhook() {
    let (_dir, url) = temp_db();
    let (webhook, received) = webhook_server().await;
    let mut out = Vec::new();
    let args = master_subtasks::Args {
        broker_url: url,
        webhook: Some(webhook),
        tasks: 2,
        subtasks: 10,
        worker_queues: master_subtasks::QUEUES.map(String::from).to_vec(),
    };
    let summary = tokio::time::timeout(Duration::from_secs(20), master_subtasks::run(args, &mut out))
        .await
        .expect("the example finishes")
        .unwrap();
    let text = String::from_utf8(out).unwrap();

    // task-1 (`master`): subtasks 0-9, even ones standard, odd ones Lumina; task-2 (`master_ops`):
    // all ten on Lumina. 2 and 7 time out once, 4 and 9 are rejected for good.
    assert_eq!(summary.subtasks, 20);
    let counts: BTreeMap<&str, (u64, u64)> = summary.by_queue.iter().map(|(q, c)| (q.as_str(), *c)).collect();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("master", (3, 0)), // task-1's master and both batch_done callbacks
            ("master_ops", (1, 0)),
            ("subtask", (4, 2)),
            ("subtask_ops", (12, 6))
        ]),
        "{text}"
    );

    let all = received.lock().unwrap().clone();
    // Each master task's batch outcome was posted once, failed subtasks included.
    let batches: Vec<&Value> = all.iter().filter(|d| d["event"] == "batch_done").collect();
    assert_eq!(batches.len(), 2, "one batch_done per master task: {batches:#?}");
    for task in ["task-1", "task-2"] {
        let batch = batches
            .iter()
            .find(|b| b["task_id"] == task)
            .unwrap_or_else(|| panic!("no batch_done for {task}: {batches:#?}"));
        assert_eq!(
            (batch["subtasks"].as_u64(), batch["succeeded"].as_u64()),
            (Some(10), Some(8)),
            "{batch}"
        );
        let failed = batch["failed"].as_array().unwrap();
        assert_eq!(failed.len(), 2, "{batch}");
        for f in failed {
            assert_eq!(f["error_type"], "ContentRejected", "{batch}");
            let error = f["error"].as_str().unwrap();
            assert!(
                error.starts_with(&format!("subtask 4 of {task}"))
                    || error.starts_with(&format!("subtask 9 of {task}")),
                "{error}"
            );
        }
        assert_eq!(batch["images"].as_array().unwrap().len(), 8);
    }
    let mut posted: Vec<String> = batches.iter().map(|b| b.to_string()).collect();
    let mut made: Vec<String> = summary.batches.iter().map(Value::to_string).collect();
    posted.sort();
    made.sort();
    assert_eq!(posted, made, "the webhook got exactly the batch outcomes made");
    let received: Vec<Value> = all.into_iter().filter(|d| d["event"] != "batch_done").collect();
    assert_eq!(summary.delivered, 12, "{text}");
    assert_eq!(received.len(), 12, "{received:#?}");
    let sorted = |docs: &[Value]| {
        let mut docs: Vec<String> = docs.iter().map(Value::to_string).collect();
        docs.sort();
        docs
    };
    assert_eq!(
        sorted(&received),
        sorted(&summary.reports),
        "the webhook got exactly the reports made"
    );
    let mut kinds: BTreeMap<(String, String, String), usize> = BTreeMap::new();
    for report in &received {
        let field = |k: &str| report[k].as_str().unwrap().to_owned();
        assert_eq!(report["retries"], 0, "{report}");
        assert_eq!(
            report["queue"].as_str(),
            Some(if field("actor") == "run_subtask" {
                "subtask"
            } else {
                "subtask_ops"
            })
        );
        *kinds
            .entry((field("event"), field("actor"), field("error_type")))
            .or_default() += 1;
    }
    let expected = |event: &str, actor: &str, error: &str, n: usize| ((event.into(), actor.into(), error.into()), n);
    assert_eq!(
        kinds,
        BTreeMap::from([
            expected("failure", "run_subtask", "ApiTimeout", 1),
            expected("failure", "run_subtask", "ContentRejected", 1),
            expected("failure", "run_subtask_ops", "ApiTimeout", 3),
            expected("failure", "run_subtask_ops", "ContentRejected", 3),
            expected("dead_lettered", "run_subtask", "ContentRejected", 1),
            expected("dead_lettered", "run_subtask_ops", "ContentRejected", 3),
        ]),
        "{received:#?}"
    );
    // Each dead-lettered message had a failure report first, and names its subtask.
    for dead in received.iter().filter(|r| r["event"] == "dead_lettered") {
        let id = &dead["message_id"];
        assert!(
            received
                .iter()
                .any(|r| r["event"] == "failure" && &r["message_id"] == id)
        );
        let error = dead["error"].as_str().unwrap();
        assert!(
            error.starts_with("subtask 4 of") || error.starts_with("subtask 9 of"),
            "{error}"
        );
    }
    assert_eq!(text.lines().filter(|l| l.contains("-> HTTP 204")).count(), 12, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_priorities_orders_by_priority_and_files_failures_for_review() {
    use troupe::{CancelOutcome, TaskStatus};

    let (_dir, url) = temp_db();
    let mut out = Vec::new();
    let args = publish_priorities::Args {
        broker_url: url,
        state_url: None,
    };
    let summary = tokio::time::timeout(Duration::from_secs(20), publish_priorities::run(args, &mut out))
        .await
        .expect("the example finishes")
        .unwrap();
    let text = String::from_utf8(out).unwrap();

    // First attempts ran in priority order, not in the order they were sent; the withdrawn
    // t-03 (p9) never ran.
    let first: Vec<(&str, i64)> = summary
        .order
        .iter()
        .filter(|r| r.attempt == 1)
        .map(|r| (r.task_id.as_str(), r.priority))
        .collect();
    assert_eq!(
        first,
        [
            ("t-02", 0),
            ("t-04", 1),
            ("b-01", 2),
            ("t-05", 3),
            ("t-01", 5),
            ("b-02", 7)
        ],
        "{text}"
    );
    let mut retried: Vec<(&str, bool)> = summary
        .order
        .iter()
        .filter(|r| r.attempt == 2)
        .map(|r| (r.task_id.as_str(), r.error.is_none()))
        .collect();
    retried.sort_unstable();
    assert_eq!(
        retried,
        [("b-02", false), ("t-01", true), ("t-04", false), ("t-05", true)],
        "{text}"
    );
    assert_eq!(summary.order.len(), 10, "{text}");
    assert!(summary.order.iter().all(|r| r.task_id != "t-03"), "{text}");

    // The cancellation: t-03 was pending when it was withdrawn.
    let (withdrawn, outcome) = summary.cancelled.as_ref().expect("SQLite keeps task states");
    assert_eq!(
        (withdrawn.task_id.as_str(), outcome),
        ("t-03", &CancelOutcome::Cancelled)
    );
    assert!(
        text.contains("withdrawn by its author: p9 t-03 -> Cancelled (state now cancelled"),
        "{text}"
    );

    // The library's task records: one per publish message sent, in final states.
    let states = summary.states.as_ref().expect("SQLite keeps task states");
    assert_eq!(states.len(), summary.submitted.len(), "{text}");
    for sent in &summary.submitted {
        let record = summary
            .record(&sent.task_id)
            .expect("every publish message has a record");
        assert_eq!(
            (record.actor.as_str(), record.queue.as_str()),
            (sent.actor.as_str(), "publish")
        );
        assert!(record.status.is_final(), "{record:?}");
    }
    // Listed by priority, then send time.
    let listed: Vec<&str> = states
        .iter()
        .map(|r| {
            let sent = summary.submitted.iter().find(|s| s.message_id == r.message_id).unwrap();
            sent.task_id.as_str()
        })
        .collect();
    assert_eq!(
        listed,
        ["t-02", "t-04", "b-01", "t-05", "t-01", "b-02", "t-03"],
        "{text}"
    );
    let by_task: BTreeMap<&str, (TaskStatus, u64, Option<&str>)> = summary
        .submitted
        .iter()
        .map(|s| {
            let r = summary.record(&s.task_id).unwrap();
            (s.task_id.as_str(), (r.status, r.attempts, r.error_type.as_deref()))
        })
        .collect();
    assert_eq!(
        by_task,
        BTreeMap::from([
            ("b-01", (TaskStatus::Succeeded, 1, None)),
            ("b-02", (TaskStatus::Failed, 2, Some("LoginExpired"))),
            // The douyin uploads time out once, then succeed; the record keeps the last error.
            ("t-01", (TaskStatus::Succeeded, 2, Some("UploadTimeout"))),
            ("t-02", (TaskStatus::Succeeded, 1, None)),
            ("t-03", (TaskStatus::Cancelled, 0, None)),
            ("t-04", (TaskStatus::Failed, 2, Some("LoginExpired"))),
            ("t-05", (TaskStatus::Succeeded, 2, Some("UploadTimeout"))),
        ]),
        "{text}"
    );
    for r in states.iter().filter(|r| r.status != TaskStatus::Cancelled) {
        let started = r.started_at.expect("started");
        let finished = r.finished_at.expect("finished");
        assert!(r.enqueued_at <= started && started <= finished, "{r:?}");
    }
    let t03 = summary.record("t-03").unwrap();
    assert_eq!(t03.started_at, None, "{t03:?}");
    assert_eq!(t03.worker, None, "{t03:?}");
    // Batch progress: b-01 published both posts; b-02 failed after the first.
    assert_eq!(
        summary.record("b-01").unwrap().progress,
        Some(serde_json::json!({"published": 2, "of": 2}))
    );
    assert_eq!(
        summary.record("b-02").unwrap().progress,
        Some(serde_json::json!({"published": 1, "of": 2}))
    );
    assert!(summary.record("t-02").unwrap().progress.is_none());
    assert!(text.contains("succeeded 4, failed 2, cancelled 1"), "{text}");

    // The manual-review table: the two tasks whose retries ran out, the same that failed above.
    let mut reviews: Vec<(&str, &str, u64, Option<u64>)> = summary
        .reviews
        .iter()
        .map(|r| (r.task_id.as_str(), r.actor.as_str(), r.retries, r.max_retries))
        .collect();
    reviews.sort_unstable();
    assert_eq!(
        reviews,
        [
            ("b-02", "publish_batch", 1, Some(1)),
            ("t-04", "publish_single", 1, Some(1))
        ],
        "{text}"
    );
    assert!(summary.reviews.iter().all(|r| r.error.starts_with("LoginExpired: ")));
    for review in &summary.reviews {
        assert_eq!(summary.record(&review.task_id).unwrap().message_id, review.message_id);
    }
    assert!(text.contains("manual review (2 rows)"), "{text}");
}

/// Runs the shop app (the same app on every broker) and checks everything it promises: each
/// priced line, the retried item, the delayed one, the dead letter and the drain.
async fn shop_runs_the_same_on(broker_url: &str, results_url: &str) {
    let mut out = Vec::new();
    let summary = tokio::time::timeout(Duration::from_secs(60), shop::run(broker_url, results_url, &mut out))
        .await
        .expect("the shop example finishes")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let totals: BTreeMap<&str, u64> = summary.totals.iter().map(|(i, t)| (i.as_str(), *t)).collect();
    // 100 cents + 10 per letter of the item's name, times the quantity; flaky-melon succeeded
    // on its retry, late-fig after its delay.
    let expected = BTreeMap::from([("apple", 450), ("pear", 280), ("flaky-melon", 210), ("late-fig", 720)]);
    assert_eq!(totals, expected, "{text}");
    assert_eq!(summary.failures.len(), 1, "{text}");
    assert_eq!(summary.failures[0].0, "broken-kiwi");
    assert!(summary.failures[0].1.contains("UnknownItem"), "{text}");
    assert_eq!(summary.dead.len(), 1, "{text}");
    assert!(summary.dead[0].1.contains("no price for broken-kiwi"), "{text}");
    assert!(summary.delayed_after >= Duration::from_millis(500), "{text}");
    assert!(text.contains("queue shop drained"), "{text}");
    assert!(!text.contains("secret"), "no password is printed: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shop_on_sqlite() {
    let (_dir, url) = temp_db();
    shop_runs_the_same_on(&url, &url).await;
}

#[cfg(all(feature = "broker-redis", feature = "results-redis"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shop_on_redis() {
    let url = "redis://127.0.0.1:6379/15?namespace=troupe-example-shop";
    shop_runs_the_same_on(url, url).await;
}

#[cfg(all(feature = "broker-postgres", feature = "results-postgres"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shop_on_postgres() {
    let url = "postgres://postgres@127.0.0.1:5432/test?schema=troupe_example_shop";
    shop_runs_the_same_on(url, url).await;
}

#[cfg(all(feature = "broker-rabbitmq", feature = "results-redis"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shop_on_rabbitmq() {
    shop_runs_the_same_on(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "redis://127.0.0.1:6379/15?namespace=troupe-example-shop-rmq",
    )
    .await;
}

/// The worker processes of `throttled_api_holds_the_rate_across_two_processes`: this test
/// binary, run again filtered to this test with `THROTTLED_API_URL` set, plays the example's
/// `worker` command; otherwise it does nothing.
#[test]
fn throttled_api_child() {
    let Ok(url) = std::env::var("THROTTLED_API_URL") else {
        return;
    };
    let number = |name: &str| std::env::var(name).unwrap().parse::<u32>().unwrap();
    let args = throttled_api::WorkerArgs {
        broker_url: url,
        limit: number("THROTTLED_API_LIMIT"),
        exit_after: Some(number("THROTTLED_API_CALLS")),
    };
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(throttled_api::worker(args))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_api_holds_the_rate_across_two_processes() {
    let (_dir, url) = temp_db();
    let args = throttled_api::RunArgs {
        broker_url: url,
        calls: 24,
        limit: 6,
        processes: 2,
    };
    let child = |w: &throttled_api::WorkerArgs| {
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command
            .args(["throttled_api_child", "--exact", "--nocapture", "--test-threads", "1"])
            .env("THROTTLED_API_URL", &w.broker_url)
            .env("THROTTLED_API_LIMIT", w.limit.to_string())
            .env("THROTTLED_API_CALLS", w.exit_after.unwrap().to_string());
        command
    };
    let mut out = Vec::new();
    let report = tokio::time::timeout(Duration::from_secs(60), throttled_api::run(args, child, &mut out))
        .await
        .expect("the example finishes")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(report.calls.len(), 24, "every call was made once: {text}");
    assert_eq!(
        report.per_second.values().sum::<u32>(),
        24,
        "no call was made twice: {text}"
    );
    assert!(
        report.per_second.values().all(|n| *n <= 6),
        "a second saw more than 6 calls: {text}"
    );
    assert!(
        report.per_second.len() >= 4,
        "24 calls at 6 a second take 4 seconds at least: {text}"
    );
    assert_eq!(report.per_process.len(), 2, "both processes made calls: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_celery_tracks_states_cancels_a_pending_task_and_calls_back_once() {
    use troupe::{CancelOutcome, TaskStatus};

    let (_dir, url) = temp_db();
    let mut out = Vec::new();
    let report = tokio::time::timeout(Duration::from_secs(60), migrate_celery::run(&url, &mut out))
        .await
        .expect("the example finishes")
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let status = |label: &str| {
        let record = report
            .record(label)
            .unwrap_or_else(|| panic!("no record of {label}: {text}"));
        (record.status, record.attempts, record.error_type.clone())
    };

    // Priorities: Celery-on-Redis 0 ran before 9 (one message at a time).
    let urgent = report.position("publish", "urgent-1").expect("urgent-1 ran");
    let low = report.position("publish", "low-1").expect("low-1 ran");
    assert!(urgent < low, "{text}");
    assert_eq!(report.urgent_result, "urgent-1 published");
    assert_eq!(status("urgent"), (TaskStatus::Succeeded, 1, None), "{text}");
    assert_eq!(status("low"), (TaskStatus::Succeeded, 1, None), "{text}");

    // The countdown: it started no earlier than 300 ms after it was sent.
    let later = report.record("countdown").unwrap();
    assert_eq!(later.status, TaskStatus::Succeeded, "{text}");
    let started = later.started_at.expect("started");
    assert!(started >= later.enqueued_at + 300, "{later:?}");

    // autoretry: the second attempt succeeded; the record keeps the first attempt's error.
    assert_eq!(
        status("flaky"),
        (TaskStatus::Succeeded, 2, Some("ConnectionError".to_owned())),
        "{text}"
    );
    assert_eq!(report.runs("publish", "flaky-1"), 2, "{text}");
    // FAILURE: no retry, one attempt.
    assert_eq!(
        status("broken"),
        (TaskStatus::Failed, 1, Some("FeedGone".to_owned())),
        "{text}"
    );
    assert_eq!(report.runs("import_feed", "https://example.com/gone.rss"), 1);

    // revoke: cancelled while pending, never ran.
    assert_eq!(report.cancelled, CancelOutcome::Cancelled);
    assert_eq!(status("withdrawn"), (TaskStatus::Cancelled, 0, None), "{text}");
    assert_eq!(report.runs("publish", "withdrawn-1"), 0, "{text}");

    // The group: each member once, the completion callback once, after all of them.
    for image in ["a.jpg", "b.jpg", "c.jpg"] {
        assert_eq!(report.runs("thumbnail", image), 1, "{text}");
    }
    assert_eq!(report.runs("notify", "holiday"), 1, "{text}");
    let notify = report.position("notify", "holiday").unwrap();
    for image in ["a.jpg", "b.jpg", "c.jpg"] {
        assert!(report.position("thumbnail", image).unwrap() < notify, "{text}");
    }
    assert_eq!(report.notify_records.len(), 1, "{:?}", report.notify_records);
    assert_eq!(report.notify_records[0].status, TaskStatus::Succeeded);

    // The chord: the body got the members' results, in order, once.
    assert_eq!(report.album, serde_json::json!("trip: x.jpg.thumb, y.jpg.thumb"));
    assert_eq!(report.runs("make_album", "trip"), 1, "{text}");
    // Every attempt is accounted for: 5 publish runs (4 posts, one of them retried), 1 import,
    // 5 thumbnails, 1 notify, 1 album.
    assert_eq!(report.ran.len(), 13, "{text}");
    assert!(
        text.contains("withdrawn-1 cancelled while pending: Cancelled"),
        "{text}"
    );
}

/// Needs the machine's PostgreSQL (`TROUPE_POSTGRES_URL`, default
/// postgres://postgres@127.0.0.1:5432/test); fails when it cannot be reached.
#[cfg(all(feature = "broker-postgres", feature = "results-postgres"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_pg_table_moves_each_legacy_job_once_in_one_transaction() {
    use troupe::TaskStatus;

    let args = migrate_pg_table::Args {
        database_url: migrate_pg_table::database_url(),
        keep: false,
    };
    let mut out = Vec::new();
    let report = tokio::time::timeout(Duration::from_secs(60), migrate_pg_table::run(args, &mut out))
        .await
        .expect("the example finishes")
        .unwrap_or_else(|e| panic!("the example failed (is PostgreSQL running?): {e}"));
    let text = String::from_utf8(out).unwrap();

    // The rolled-back drain had moved four rows; none of it remained.
    assert_eq!(report.rolled_back_drain.moved.len(), 4, "{text}");
    assert_eq!(
        report.after_rollback,
        migrate_pg_table::Snapshot {
            messages: 0,
            moved_rows: 0
        },
        "{text}"
    );
    // While the real drain's transaction was open, no one else saw its messages.
    assert_eq!(report.drain.visible_before_commit, 0, "{text}");

    // Moved: exactly the pending and running rows whose task type has an actor.
    let movable: Vec<i64> = report
        .before
        .iter()
        .filter(|r| {
            ["pending", "running"].contains(&r.status.as_str())
                && ["process_email", "ocr_document"].contains(&r.task_type.as_str())
        })
        .map(|r| r.id)
        .collect();
    assert_eq!(movable.len(), 4);
    let mut moved_ids: Vec<i64> = report.drain.moved.iter().map(|(id, _)| *id).collect();
    moved_ids.sort_unstable();
    assert_eq!(moved_ids, movable, "{text}");
    assert_eq!(report.drain.left.len(), 1, "{text}");
    for row in &report.rows {
        let before = report.before.iter().find(|b| b.id == row.id).unwrap();
        if movable.contains(&row.id) {
            // Marked in the drain's own transaction, with the message it became.
            assert_eq!(row.status, "moved", "{row:?}");
            assert_eq!(row.moved_txid, Some(report.drain.txid), "{row:?}");
            let message_id = row.moved_to.as_deref().expect("moved_to");
            assert!(report.drain.moved.contains(&(row.id, message_id.to_owned())), "{row:?}");
            // It ran exactly once, as that message.
            let runs: Vec<_> = report.ran.iter().filter(|r| r.message_id == message_id).collect();
            assert_eq!(runs.len(), 1, "row {} ran {} times: {text}", row.id, runs.len());
            // A row due later did not run before its run_at.
            let ran_at = i64::try_from(runs[0].at_ms).unwrap();
            assert!(ran_at + 5 >= before.run_at_ms, "{row:?} ran early: {text}");
        } else {
            // Finished, failed and unknown rows stay as they were.
            assert_eq!(row.status, before.status, "{row:?}");
            assert_eq!((row.moved_to.as_deref(), row.moved_txid), (None, None), "{row:?}");
        }
    }
    assert_eq!(report.ran.len(), 4, "nothing else ran: {text}");
    // Priority carried over: the urgent email (priority -5, sent last) ran before the other
    // email of its queue.
    let emails: Vec<&str> = report
        .ran
        .iter()
        .filter(|r| r.actor == "process_email")
        .map(|r| r.subject.as_str())
        .collect();
    assert_eq!(emails, ["URGENT: password reset", "invoice 17"], "{text}");
    // The worker recorded each moved message's state, though the messages were enqueued
    // outside the app.
    assert!(
        report
            .records
            .iter()
            .all(|r| r.as_ref().is_some_and(|r| r.status == TaskStatus::Succeeded)),
        "{:?}",
        report.records
    );
}
