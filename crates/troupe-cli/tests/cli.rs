//! The `troupe` binary against real servers: SQLite (a file), Redis, PostgreSQL and RabbitMQ
//! (`TROUPE_REDIS_URL`, `TROUPE_POSTGRES_URL`, `TROUPE_RABBITMQ_URL`, defaults on 127.0.0.1;
//! RabbitMQ keeps task states in Redis). Each test runs a real worker in this process, drives
//! the binary as a user would and checks what it prints against what the worker did. A missing
//! server fails the tests; it never skips them.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use troupe::prelude::*;
use troupe::{ActorError, ActorOptions, TaskTracking};

const WAIT: Duration = Duration::from_secs(20);

fn redis_url() -> String {
    std::env::var("TROUPE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn postgres_url() -> String {
    std::env::var("TROUPE_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn rabbitmq_url() -> String {
    std::env::var("TROUPE_RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Runs `troupe ARGS` with these URLs; its output.
fn troupe(broker: &str, state: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_troupe"))
        .env_remove("TROUPE_BROKER_URL")
        .env_remove("TROUPE_STATE_URL")
        .env("NO_COLOR", "1")
        .args(["--broker-url", broker, "--state-url", state])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the troupe binary runs")
}

/// Runs `troupe ARGS` and expects success; its stdout.
fn ok(broker: &str, state: &str, args: &[&str]) -> String {
    let out = troupe(broker, state, args);
    assert!(
        out.status.success(),
        "troupe {args:?} failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// Runs `troupe --json ARGS`; the document it printed.
fn json(broker: &str, state: &str, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = ok(broker, state, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("troupe {args:?} printed no JSON document ({e}): {text}"))
}

/// Fails the first time each argument is seen, then succeeds; "always" always fails.
#[derive(Clone)]
struct Flaky {
    queue: String,
    runs: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Actor for Flaky {
    type Args = (String,);
    type Output = String;

    fn name(&self) -> &str {
        "flaky"
    }

    fn options(&self) -> ActorOptions {
        let mut options = ActorOptions::new();
        options.queue_name = self.queue.clone();
        options.max_retries = Some(0);
        options
    }

    async fn call(&self, (arg,): (String,)) -> Result<String, ActorError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let first = self.seen.lock().unwrap().insert(arg.clone());
        if arg == "always" || first && arg.starts_with("fail") {
            return Err(ActorError::new("Refused", format!("refused {arg}")));
        }
        Ok(arg)
    }
}

async fn poll<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn queue_row(doc: &Value, queue: &str) -> Value {
    doc["queues"]
        .as_array()
        .expect("a queues array")
        .iter()
        .find(|q| q["name"] == queue)
        .cloned()
        .unwrap_or_else(|| panic!("{queue} not in {doc}"))
}

/// The whole tour on one broker: enqueue by name, queue counts, a live worker, dead letters
/// listed, shown, requeued and purged, task states listed, shown, counted and cancelled, and a
/// queue purged.
async fn tour(broker_url: &str, state_url: &str) {
    let (b, s) = (broker_url, state_url);
    let queue = format!("cli_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let q = queue.as_str();

    // Sent before any worker runs: one ready, one delayed.
    let first = ok(b, s, &["enqueue", "flaky", "--args", r#"["hello"]"#, "--queue", q]);
    let first = first.trim().to_owned();
    assert_eq!(first.len(), 36, "a message id: {first:?}");
    let delayed = json(
        b,
        s,
        &[
            "enqueue",
            "flaky",
            "--args",
            r#"["later"]"#,
            "-q",
            q,
            "--delay",
            "1h",
            "--track",
        ],
    );
    assert_eq!(delayed["queue"], q);
    assert_eq!(delayed["actor"], "flaky");
    let delayed_id = delayed["message_id"].as_str().unwrap().to_owned();
    let row = queue_row(&json(b, s, &["queues", "--queue", q]), q);
    assert_eq!(
        (
            row["ready"].as_u64(),
            row["delayed"].as_u64(),
            row["in_flight"].as_u64(),
            row["dead"].as_u64()
        ),
        (Some(1), Some(1), Some(0), Some(0)),
        "{row}"
    );

    // A worker that tracks task states.
    let broker = troupe::connect(b).await.expect("broker");
    let state = troupe::connect_state(s).await.expect("state");
    let flaky = Flaky {
        queue: queue.clone(),
        runs: Arc::default(),
        seen: Arc::default(),
    };
    let app = App::builder(broker)
        .state(state)
        .track_tasks(TaskTracking::default())
        .actor(flaky.clone())
        .build()
        .expect("app");
    let worker = Worker::builder(app.clone())
        .concurrency(2)
        .heartbeat(Duration::from_millis(200))
        .fetch_timeout(Duration::from_millis(200))
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .expect("worker");
    poll("the first message to run", || async {
        flaky.runs.load(Ordering::SeqCst) >= 1
    })
    .await;

    // The worker is listed with its queue.
    let id = worker.id().to_owned();
    poll("the worker to be listed", || async {
        let doc = json(b, s, &["workers"]);
        doc["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["id"] == id.as_str() && w["queues"].as_array().unwrap().contains(&json!(q)))
    })
    .await;
    let table = ok(b, s, &["workers"]);
    assert!(table.contains(&id[..8]), "the table shows the worker: {table}");

    // Two failures: dead letters, listed by queue and actor, shown with their reason.
    let doomed = ok(b, s, &["enqueue", "flaky", "--args", r#"["fail-once"]"#, "-q", q])
        .trim()
        .to_owned();
    let always = ok(b, s, &["enqueue", "flaky", "--args", r#"["always"]"#, "-q", q])
        .trim()
        .to_owned();
    poll("two dead letters", || async {
        queue_row(&json(b, s, &["queues", "-q", q]), q)["dead"] == 2
    })
    .await;
    let listed = json(b, s, &["dead", "list", "-q", q, "--actor", "flaky"]);
    let letters = listed["dead_letters"].as_array().unwrap();
    let mut ids: Vec<&str> = letters.iter().map(|l| l["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let mut want = vec![doomed.as_str(), always.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    assert!(
        letters
            .iter()
            .all(|l| l["queue"] == q && l["reason"].as_str().unwrap().contains("refused")),
        "{listed}"
    );
    let none = json(b, s, &["dead", "list", "-q", q, "--actor", "someone_else"]);
    assert_eq!(none["dead_letters"], json!([]));
    let none = json(b, s, &["dead", "list", "-q", q, "--older-than", "1h"]);
    assert_eq!(none["dead_letters"], json!([]), "they died just now");
    let shown = json(b, s, &["dead", "show", &doomed]);
    assert_eq!(shown["message"]["args"], json!(["fail-once"]));
    let text = ok(b, s, &["dead", "show", &doomed, "-q", q]);
    assert!(
        text.contains("refused fail-once") && text.contains("actor:     flaky"),
        "{text}"
    );
    let missing = troupe(b, s, &["dead", "show", "no-such-id", "-q", q]);
    assert_eq!(missing.status.code(), Some(1));

    // Requeued by id: it succeeds the second time.
    let requeued = json(b, s, &["dead", "requeue", &doomed, "-q", q]);
    assert_eq!(requeued["requeued"], 1, "{requeued}");
    poll("the requeued message to succeed", || async {
        json(b, s, &["tasks", "show", &doomed])["status"] == "succeeded"
    })
    .await;
    // A bulk purge needs --yes without a terminal; then it deletes what is left.
    let refused = troupe(b, s, &["dead", "purge", "-q", q]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let purged = json(b, s, &["dead", "purge", "-q", q, "--yes"]);
    assert_eq!(purged["deleted"], 1, "{purged}");
    assert_eq!(queue_row(&json(b, s, &["queues", "-q", q]), q)["dead"], 0);

    // Task states: listed, counted, shown; the delayed message cancelled.
    let tasks = json(b, s, &["tasks", "list", "--queue", q]);
    let statuses: std::collections::HashMap<&str, &str> = tasks["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["message_id"].as_str().unwrap(), t["status"].as_str().unwrap()))
        .collect();
    assert_eq!(statuses.get(first.as_str()), Some(&"succeeded"), "{tasks}");
    assert_eq!(statuses.get(always.as_str()), Some(&"failed"), "{tasks}");
    let failed = json(b, s, &["tasks", "list", "-q", q, "--status", "failed"]);
    assert_eq!(failed["tasks"].as_array().unwrap().len(), 1, "{failed}");
    let stats = json(b, s, &["tasks", "stats", "-q", q]);
    assert_eq!(stats["by_status"]["succeeded"], 2, "{stats}");
    assert_eq!(json(b, s, &["tasks", "show", &delayed_id])["status"], "delayed");
    let cancelled = json(b, s, &["tasks", "cancel", &delayed_id]);
    assert_eq!(cancelled["outcome"], "cancelled", "{cancelled}");
    assert_eq!(json(b, s, &["tasks", "show", &delayed_id])["status"], "cancelled");
    let unknown = json(b, s, &["tasks", "cancel", "no-such-message"]);
    assert_eq!(unknown["outcome"], "unknown", "{unknown}");
    let finished = json(b, s, &["tasks", "cancel", &first]);
    assert_eq!(
        (finished["outcome"].as_str(), finished["status"].as_str()),
        (Some("finished"), Some("succeeded"))
    );
    let shown = ok(b, s, &["tasks", "show", &first]);
    assert!(shown.contains("status:     succeeded"), "{shown}");

    // Purging the queue drops the delayed message.
    let purged = json(b, s, &["purge", q, "--yes"]);
    assert_eq!(purged["queue"], q);
    let row = queue_row(&json(b, s, &["queues", "-q", q]), q);
    assert_eq!(
        (row["ready"].as_u64(), row["delayed"].as_u64()),
        (Some(0), Some(0)),
        "{row}"
    );

    worker.stop().await;
    let doc = json(b, s, &["workers"]);
    assert!(
        doc["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["id"] != id.as_str()),
        "a stopped worker is not listed: {doc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("cli.db").display());
    // The file exists once something opened it (the command refuses a missing one).
    troupe::connect(&url).await.unwrap().close().await.unwrap();
    tour(&url, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour_redis() {
    let ns = format!("troupe-cli-{}", uuid::Uuid::new_v4().simple());
    let url = format!("{}?namespace={ns}", redis_url());
    tour(&url, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour_postgres() {
    let url = format!("{}?schema=troupe_cli", postgres_url());
    tour(&url, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour_rabbitmq() {
    let state = format!("{}?namespace=troupe-cli-{}", redis_url(), uuid::Uuid::new_v4().simple());
    tour(&rabbitmq_url(), &state).await;
}

/// On RabbitMQ, which cannot list a server's queues, `queues` lists those live workers consume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_queues_come_from_live_workers() {
    let url = rabbitmq_url();
    let queue = format!("cli_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let flaky = Flaky {
        queue: queue.clone(),
        runs: Arc::default(),
        seen: Arc::default(),
    };
    let app = App::builder(troupe::connect(&url).await.unwrap())
        .actor(flaky)
        .build()
        .unwrap();
    let worker = Worker::builder(app)
        .heartbeat(Duration::from_millis(200))
        .fetch_timeout(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    poll("the worker's queue to be listed", || async {
        let out = troupe(&url, &redis_url(), &["--json", "queues"]);
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        doc["queues"]
            .as_array()
            .is_some_and(|qs| qs.iter().any(|q| q["name"] == queue.as_str()))
    })
    .await;
    worker.stop_with_timeout(Duration::from_secs(5)).await;
}

/// Errors: one line on stderr, exit 1 for a broker or input error, 2 for bad usage; no
/// password in any of it.
#[test]
fn errors_are_one_line_with_the_right_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("missing.db").display());
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--broker-url", "redis://:s3cret@127.0.0.1:1/0", "queues"],
            1,
            "cannot connect to Redis",
        ),
        (
            &["--broker-url", "amqp://guest:s3cret@127.0.0.1:1/%2f", "queues"],
            1,
            "cannot connect to RabbitMQ",
        ),
        (
            &["--broker-url", "kafka://localhost", "queues"],
            1,
            "unknown URL scheme",
        ),
        (&["--broker-url", &db, "queues"], 1, "no SQLite database"),
        (&["--broker-url", "memory://", "queues"], 2, "lives inside one process"),
        (&["queues"], 2, "no broker"),
        (
            &[
                "--broker-url",
                "redis://127.0.0.1:6379/0",
                "enqueue",
                "a",
                "--args",
                "[1,",
            ],
            2,
            "not valid JSON",
        ),
        (
            &[
                "--broker-url",
                "redis://127.0.0.1:6379/0",
                "enqueue",
                "a",
                "--args",
                "{}",
            ],
            2,
            "JSON array",
        ),
        (
            &[
                "--broker-url",
                "redis://127.0.0.1:6379/0",
                "enqueue",
                "a",
                "--priority",
                "99",
            ],
            2,
            "out of range",
        ),
        (
            &["--broker-url", "redis://127.0.0.1:6379/0", "queues", "-q", "bad name!"],
            1,
            "queue name",
        ),
        (
            &["--broker-url", "redis://127.0.0.1:6379/0", "no-such-command"],
            2,
            "unrecognized subcommand",
        ),
        (
            &["--broker-url", "amqp://guest:guest@127.0.0.1:5672/%2f", "tasks", "list"],
            2,
            "--state-url",
        ),
    ];
    for (args, code, says) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_troupe"))
            .env_remove("TROUPE_BROKER_URL")
            .env_remove("TROUPE_STATE_URL")
            .args(*args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?} should say {says:?}: {stderr}");
        assert!(!stderr.contains("s3cret"), "{args:?} printed the password: {stderr}");
        if *code == 1 {
            assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: one line: {stderr}");
            assert!(stderr.starts_with("troupe: "), "{stderr}");
        }
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    }
}

/// `completions` prints a script for each shell.
#[test]
fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef troupe"),
        ("fish", "complete -c troupe"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_troupe"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("requeue"), "{shell} completes subcommands");
    }
}

/// A reader that closed the pipe (`troupe … | head`) ends the command quietly, with success:
/// no panic, nothing on stderr.
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_troupe"))
        .args(["completions", "bash"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(stderr.is_empty(), "{stderr}");
}
