//! Cancellation with Python's dramatiq-abort (1.2.1) on Redis, both directions: Python's
//! `abort(id, mode=...)` reaches a Troupe worker, the example's `cancel` command reaches a
//! Python worker with the `Abortable` middleware, for a pending message (it never runs) and a
//! running one (stopped well before its 20 s sleep ends, and not retried).
//!
//! Both sides use dramatiq-abort's default key prefix (`dramatiq:aborts:`); the message ids are
//! fresh uuids, so the tests run in parallel. The Troupe worker is set up as the example's
//! `worker` command sets it up without `--state-url`: its cancellation state is in the results'
//! Redis.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use troupe::worker::WorkerHandle;
use troupe::{Broker, CancelOutcome, Error, Message, Worker};

use super::{Env, interop, troupe_calls, wait_until};

/// How soon a running message must be stopped after the request (it sleeps 20 s otherwise).
const STOPPED_WITHIN: Duration = Duration::from_secs(5);
/// What `sleep_ms` sleeps in the abort tests.
const LONG_SLEEP_MS: &str = "20000";

/// A Troupe worker (in this process) with the example's actors and the state backend the
/// example's `worker` command connects when given no `--state-url`.
pub(super) async fn troupe_worker_with_state(env: &Env) -> WorkerHandle {
    let cli = <interop::Cli as clap::Parser>::try_parse_from(["interop", "worker", "--broker-url", &env.url]).unwrap();
    let interop::Command::Worker(mut command) = cli.command else {
        panic!("parsed as another command")
    };
    interop::worker_defaults(&mut command).unwrap();
    let state_url = command.worker.state_url.clone();
    assert_eq!(
        state_url.as_deref(),
        Some(env.url.as_str()),
        "the state defaults to the results URL, the broker's"
    );
    let state = troupe::connect_state(&env.url).await.unwrap();
    let app = interop::build_app_with(
        Arc::new(env.broker.clone()),
        Arc::clone(&env.results),
        Some(state),
        &command.actor_queue,
    )
    .unwrap();
    Worker::builder(app)
        .concurrency(2)
        .fetch_timeout(Duration::from_millis(100))
        .shutdown_timeout(Duration::from_secs(5))
        .start()
        .await
        .unwrap()
}

/// Python's `abort(message_id, mode=MODE)` (dramatiq-abort) from `peer.py abort`.
async fn python_abort(env: &Env, message_id: &str, mode: &str) {
    env.clean_aborts_of(message_id);
    let out = env.peer(&["abort", message_id, "--mode", mode], "").await;
    assert_eq!(out, [json!({"abort": message_id, "mode": mode})]);
}

/// The example's `cancel --state-url URL --message-id ID --mode MODE`: what it printed.
async fn troupe_cancel(env: &Env, message_id: &str, mode: &str) -> String {
    env.clean_aborts_of(message_id);
    let cli = <interop::Cli as clap::Parser>::try_parse_from([
        "interop",
        "cancel",
        "--state-url",
        &env.url,
        "--message-id",
        message_id,
        "--mode",
        mode,
    ])
    .unwrap();
    let interop::Command::Cancel(args) = cli.command else {
        panic!("parsed as another command")
    };
    let mut out = Vec::new();
    let outcome = interop::cancel(args, &mut out).await.unwrap();
    let printed = String::from_utf8(out).unwrap();
    assert_eq!(printed, format!("{}\n", interop::outcome_word(&outcome)));
    printed
}

/// The example's `send --actor ACTOR --args ARGS` on this test's namespace.
async fn troupe_send(env: &Env, actor: &str, args: &str) -> Message {
    interop::send(
        interop::SendArgs {
            broker_url: env.url.clone(),
            actor: actor.into(),
            args: args.into(),
            kwargs: None,
            queue: "default".into(),
            delay_ms: None,
            options: Vec::new(),
        },
        &mut Vec::new(),
    )
    .await
    .unwrap()
}

async fn python_send(env: &Env, actor: &str, args: &str) -> Message {
    let sent = env.peer(&["send", actor, "--args", args], "").await;
    Message::from_value(sent[0].clone()).unwrap()
}

async fn dead(env: &Env) -> u64 {
    env.broker.stats("default").await.unwrap().dead
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_cancels_a_pending_message_the_troupe_worker_skips_it() {
    let env = Env::new().await;
    let doomed = python_send(&env, "sleep_ms", "[50]").await;
    python_abort(&env, &doomed.message_id, "cancel").await;
    let after = python_send(&env, "echo", r#"["after"]"#).await;
    let ids = HashSet::from([doomed.message_id.clone(), after.message_id.clone()]);

    let worker = troupe_worker_with_state(&env).await;
    wait_until("Troupe ran the message sent after and the queue drained", || async {
        troupe_calls(&ids)
            .iter()
            .any(|c| c["message_id"] == after.message_id.as_str())
            && env.pending().await == 0
    })
    .await;
    worker.stop().await;

    let ran: Vec<Value> = troupe_calls(&ids).iter().map(|c| c["message_id"].clone()).collect();
    assert_eq!(ran, [json!(after.message_id)], "the cancelled message never ran");
    assert_eq!(dead(&env).await, 0, "skipped and acked, not dead-lettered");
    // Skipped as Python's SkipMessage is: acked with a None result, which Python reads.
    let results = env.python_results(&[doomed]).await;
    assert_eq!(results, [json!({"ok": null})]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_aborts_a_running_message_the_troupe_worker_stops_and_acks_it() {
    let env = Env::new().await;
    let sent = python_send(&env, "sleep_ms", &format!("[{LONG_SLEEP_MS}]")).await;
    let ids = HashSet::from([sent.message_id.clone()]);

    let worker = troupe_worker_with_state(&env).await;
    wait_until("Troupe started sleep_ms", || async { troupe_calls(&ids).len() == 1 }).await;
    let asked = Instant::now();
    python_abort(&env, &sent.message_id, "abort").await;
    wait_until("the queue drained", || async { env.pending().await == 0 }).await;
    let took = asked.elapsed();
    eprintln!("Troupe stopped sleep_ms({LONG_SLEEP_MS}) {took:?} after Python's abort()");
    assert!(took < STOPPED_WITHIN, "stopped {took:?} after the request");
    // Acked: nothing left (no retry on the delay queue: `pending` counts it), nothing dead.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.pending().await, 0, "not retried");
    assert_eq!(dead(&env).await, 0, "acked, not dead-lettered");
    worker.stop().await;
    assert_eq!(troupe_calls(&ids).len(), 1, "ran once, never again");
    let results = env.python_results(std::slice::from_ref(&sent)).await;
    eprintln!("Python reads the aborted message's result as {}", results[0]);
    assert_ne!(results[0], json!({"ok": 20000}), "it did not sleep to the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn troupe_cancels_a_pending_message_the_python_worker_skips_it() {
    let env = Env::new().await;
    let doomed = troupe_send(&env, "sleep_ms", "[50]").await;
    // No task record anywhere (`send` does not track it): the request is made all the same.
    assert_eq!(troupe_cancel(&env, &doomed.message_id, "pending").await, "unknown\n");
    let after = troupe_send(&env, "echo", r#"["after"]"#).await;

    let records = env.run_python_worker().await;
    let ran: Vec<&Value> = records.iter().map(|r| &r["message_id"]).collect();
    assert_eq!(
        ran,
        [&json!(after.message_id)],
        "Python ran only the message sent after"
    );
    assert!(env.python_dead_letters().await.is_empty());
    assert_eq!(env.pending().await, 0, "Python acked the skipped message");
    // Python's Results stores None for a skipped message; Troupe reads it.
    let app = env.app();
    let result = app.get_result(&doomed, Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(result, Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn troupe_aborts_a_running_message_the_python_worker_stops_it() {
    let env = Env::new().await;
    let sent = troupe_send(&env, "sleep_ms", &format!("[{LONG_SLEEP_MS}]")).await;

    let python = env.start_python_worker_with(&["--print-starts"]).await;
    let python = python.wait_for_call(&sent.message_id).await;
    let asked = Instant::now();
    assert_eq!(troupe_cancel(&env, &sent.message_id, "abort").await, "unknown\n");
    let records = python.finish().await;
    let took = asked.elapsed();
    eprintln!("Python stopped sleep_ms({LONG_SLEEP_MS}) {took:?} after Troupe's cancel");
    assert!(took < STOPPED_WITHIN, "stopped {took:?} after the request");

    assert_eq!(records.len(), 1, "ran once, never again: {records:?}");
    assert_eq!(records[0]["message_id"], sent.message_id.as_str());
    assert_eq!(records[0]["actor"], "sleep_ms");
    // dramatiq-abort raised Abort in the actor; with `throws=(Abort,)` Dramatiq fails the
    // message without a retry: a dead letter, and an Abort failure as its result.
    let letters = env.python_dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["message"]["message_id"], sent.message_id.as_str());
    match env.app().get_result(&sent, Some(Duration::from_secs(5))).await {
        Err(Error::ResultFailure { error_type, .. }) => assert_eq!(error_type, "Abort"),
        other => panic!("expected Python's Abort failure, got {other:?}"),
    }
}

/// The outcome words of `cancel`, for a message this app tracks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_command_prints_the_outcome_of_a_tracked_message() {
    let env = Env::new().await;
    let state = troupe::connect_state(&env.url).await.unwrap();
    let app = troupe::App::builder(Arc::new(env.broker.clone()))
        .state(state)
        .track_tasks(troupe::TaskTracking::default())
        .build()
        .unwrap();
    let message = Message::new("default", "echo", vec![json!("x")], serde_json::Map::new());
    let sent = app.enqueue(message, None).await.unwrap();
    assert_eq!(troupe_cancel(&env, &sent.message_id, "pending").await, "cancelled\n");
    assert_eq!(
        troupe_cancel(&env, &sent.message_id, "abort").await,
        "finished:cancelled\n"
    );
    assert_eq!(interop::outcome_word(&CancelOutcome::Aborting), "aborting");
}
