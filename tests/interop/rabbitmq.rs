//! RabbitMQ interoperability with the real Python Dramatiq (2.2.1), both directions, results in
//! Redis (as Python users run it: `RabbitmqBroker` + `RedisBackend`): every JSON type, kwargs,
//! a delay, retries into `Q.XQ` seen by both sides, results read both ways, `broker_priority`
//! with `max_priority` (queues declared by one side declared again by the other), and a queue
//! consumed by a Troupe worker and a Python worker at once.
//!
//! The server is `TROUPE_RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`), the
//! results' Redis `TROUPE_REDIS_URL`. Each test works on a queue of its own (the actors of both
//! sides are moved onto it), deleted at the end with its `.DQ` and `.XQ`.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use troupe::rabbitmq::{RabbitmqBroker, RabbitmqOptions};
use troupe::redis::RedisResults;
use troupe::redis::redis;
use troupe::worker::WorkerHandle;
use troupe::{App, Broker, Error, Message, ResultBackend, SendOptions, Sent, Worker};

use super::{
    DELAY_MS, PEER, PythonWorker, assert_same, attempts, base_url, cases, interop, json_lines, python, python_type,
    troupe_calls, uuid4, wait_until,
};

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The `max_priority` of the priority tests' queues.
const MAX_PRIORITY: u8 = 10;

fn amqp_url() -> String {
    std::env::var("TROUPE_RABBITMQ_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned())
}

/// The AMQP URL with `max_priority` in its query (how Troupe's URL carries it).
fn amqp_url_with(max_priority: Option<u8>) -> String {
    let base = amqp_url();
    match max_priority {
        Some(p) => {
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}max_priority={p}")
        }
        None => base,
    }
}

async fn connect_rabbitmq(max_priority: Option<u8>) -> RabbitmqBroker {
    let options = RabbitmqOptions::from_url(&amqp_url())
        .expect("TROUPE_RABBITMQ_URL is not an amqp:// URL")
        .max_priority(max_priority);
    RabbitmqBroker::open(options).await.unwrap_or_else(|e| {
        panic!(
            "RabbitMQ at {} (TROUPE_RABBITMQ_URL; start it, or run scripts/test): {e}",
            troupe::redact_url(&amqp_url())
        )
    })
}

/// One test's queue on the shared RabbitMQ, with a Troupe broker on it (declaring with
/// `max_priority`) and the results' Redis.
struct Rabbit {
    queue: String,
    max_priority: Option<u8>,
    broker: RabbitmqBroker,
    results: Arc<dyn ResultBackend>,
}

impl Rabbit {
    async fn new(max_priority: Option<u8>) -> Self {
        python(); // fail first, and clearly, without the Python peer
        let queue = format!("troupe_interop_{}", uuid4().replace('-', ""));
        let broker = connect_rabbitmq(max_priority).await;
        let results = RedisResults::connect(&base_url())
            .await
            .unwrap_or_else(|e| panic!("Redis (for the results) at {}: {e}", base_url()))
            .into_dyn();
        Self {
            queue,
            max_priority,
            broker,
            results,
        }
    }

    /// The interop example's actors, moved onto this test's queue.
    fn app(&self) -> App {
        interop::build_app_on(Arc::new(self.broker.clone()), Arc::clone(&self.results), &self.queue).unwrap()
    }

    /// A Troupe worker (in this process) with the example's actors.
    async fn troupe_worker(&self, concurrency: usize, prefetch: Option<usize>) -> WorkerHandle {
        let mut builder = Worker::builder(self.app())
            .concurrency(concurrency)
            .fetch_timeout(Duration::from_millis(100))
            .shutdown_timeout(Duration::from_secs(5));
        if let Some(n) = prefetch {
            builder = builder.prefetch(n);
        }
        builder.start().await.unwrap()
    }

    /// `peer.py ARGS` on RabbitMQ, its actors on this queue, with this `max_priority`.
    fn peer_command(&self, args: &[&str], max_priority: Option<u8>) -> Command {
        let mut command = Command::new(python());
        command.arg(PEER).args(args).args([
            "--broker",
            "rabbitmq",
            "--url",
            &amqp_url(),
            "--results-url",
            &base_url(),
            "--actor-queue",
            &self.queue,
        ]);
        if let Some(p) = max_priority {
            command.args(["--max-priority", &p.to_string()]);
        }
        command
    }

    /// Runs a peer command (with `stdin`); its exit status, stdout as JSON lines, and stderr.
    async fn peer_output(&self, args: &[&str], stdin: &str, max_priority: Option<u8>) -> (bool, Vec<Value>, String) {
        let mut command = self.peer_command(args, max_priority);
        let stdin = stdin.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut child = command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
            let output = child.wait_with_output().unwrap();
            let stdout = String::from_utf8(output.stdout).unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            (output.status.success(), json_lines(&stdout), stderr)
        })
        .await
        .unwrap()
    }

    /// Runs a peer command that must succeed, with this test's `max_priority`.
    async fn peer(&self, args: &[&str], stdin: &str) -> Vec<Value> {
        let (ok, docs, stderr) = self.peer_output(args, stdin, self.max_priority).await;
        assert!(ok, "peer.py {} failed:\n{stderr}", args.join(" "));
        docs
    }

    /// Starts `peer.py worker --until-empty QUEUE EXTRA..`; returns once its worker has started.
    async fn start_python_worker(&self, extra: &[&str]) -> PythonWorker {
        let mut args = vec!["worker", "--until-empty", &self.queue, "--seconds", "20"];
        args.extend_from_slice(extra);
        let mut command = self.peer_command(&args, self.max_priority);
        tokio::task::spawn_blocking(move || {
            let mut child = command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            let mut first = String::new();
            stdout.read_line(&mut first).unwrap();
            if serde_json::from_str::<Value>(&first).ok() != Some(json!({"started": true})) {
                let mut stderr = String::new();
                let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr);
                let _ = child.wait();
                panic!("the Python worker did not start: {first:?}\n{stderr}");
            }
            PythonWorker { child, stdout }
        })
        .await
        .unwrap()
    }

    /// Runs a Python worker until the queue is drained and its actors ran `expect` times.
    async fn run_python_worker(&self, expect: usize, extra: &[&str]) -> Vec<Value> {
        let expect = expect.to_string();
        let mut args = vec!["--expect", expect.as_str()];
        args.extend_from_slice(extra);
        self.start_python_worker(&args).await.finish().await
    }

    /// Python's `message.get_result(block=True)` for each message: `{"ok": v}` or `{"error": ..}`.
    async fn python_results(&self, messages: &[Message]) -> Vec<Value> {
        let texts: Vec<String> = messages.iter().map(|m| m.to_value().to_string()).collect();
        let mut args = vec!["get-result", "--timeout-ms", "10000"];
        args.extend(texts.iter().map(String::as_str));
        let results = self.peer(&args, "").await;
        assert_eq!(results.len(), messages.len());
        results
    }

    async fn pending(&self) -> u64 {
        self.broker.stats(&self.queue).await.unwrap().pending()
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        // Delete Q, Q.DQ and Q.XQ, on this broker's connection (the tests' runtime is
        // multi-threaded, so it can block here), even when the test failed.
        let (broker, queue) = (self.broker.clone(), self.queue.clone());
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let deleted = tokio::time::timeout(Duration::from_secs(10), broker.delete_queue(&queue)).await;
                if !matches!(deleted, Ok(Ok(()))) {
                    eprintln!("could not delete the queues of {queue}: {deleted:?}");
                }
                let _ = broker.close().await;
            });
        });
    }
}

/// The interop example's `send` on RabbitMQ (`--broker-url amqp://…`): one message to this
/// test's queue.
async fn example_send(
    env: &Rabbit,
    actor: &str,
    args: &Value,
    kwargs: Option<String>,
    delay_ms: Option<u64>,
    options: Vec<String>,
) -> Message {
    let send = interop::SendArgs {
        broker_url: amqp_url_with(env.max_priority),
        actor: actor.to_owned(),
        args: args.to_string(),
        kwargs,
        queue: env.queue.clone(),
        delay_ms,
        options,
    };
    let mut out = Vec::new();
    let message = interop::send(send, &mut out).await.unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), format!("{}\n", message.message_id));
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_python_sends_every_json_type_kwargs_and_a_delay_troupe_runs_them_python_reads_the_results() {
    let env = Rabbit::new(None).await;
    let cases = cases();
    let batch: String = cases
        .iter()
        .map(|c| json!({"actor": c.actor, "args": c.args, "kwargs": c.kwargs}).to_string() + "\n")
        .collect();
    let mut sent: Vec<Message> = env
        .peer(&["send-batch"], &batch)
        .await
        .into_iter()
        .map(|m| Message::from_value(m).unwrap())
        .collect();
    assert_eq!(sent.len(), cases.len());
    let delayed_text = env
        .peer(
            &[
                "send",
                "echo",
                "--args",
                r#"["late 🕰"]"#,
                "--delay-ms",
                &DELAY_MS.to_string(),
            ],
            "",
        )
        .await;
    let delayed = Message::from_value(delayed_text[0].clone()).unwrap();
    assert_eq!(delayed.queue_name, format!("{}.DQ", env.queue));
    let eta = delayed.eta().expect("Python sets an eta on a delayed message");
    sent.push(delayed.clone());
    let ids: HashSet<String> = sent.iter().map(|m| m.message_id.clone()).collect();

    let worker = env.troupe_worker(4, None).await;
    wait_until("Troupe ran every message Python sent", || async {
        troupe_calls(&ids).len() == ids.len() && env.pending().await == 0
    })
    .await;
    worker.stop().await;

    let calls: HashMap<String, Value> = troupe_calls(&ids)
        .into_iter()
        .map(|c| (c["message_id"].as_str().unwrap().to_owned(), c))
        .collect();
    assert_eq!(calls.len(), ids.len(), "each message ran once");
    for (case, message) in cases.iter().zip(&sent) {
        let call = &calls[&message.message_id];
        assert_eq!(call["actor"], case.actor);
        assert_eq!(call["queue_name"], env.queue.as_str());
        assert_same(
            &format!("what {} received from {}", case.actor, case.args),
            &call["received"],
            &case.received,
        );
    }
    let late = &calls[&delayed.message_id];
    assert_same("the delayed message", &late["received"], &json!({"value": "late 🕰"}));
    assert_eq!(late["queue_name"], env.queue.as_str(), "moved from the delay queue");
    assert!(late["at_ms"].as_u64().unwrap() >= eta, "ran before its eta: {late}");
    let stats = env.broker.stats(&env.queue).await.unwrap();
    assert_eq!((stats.ready, stats.delayed, stats.dead), (0, 0, 0), "{stats:?}");

    // Python reads the results Troupe stored in Redis.
    let results = env.python_results(&sent).await;
    let late_result = json!("late 🕰");
    let expected = cases.iter().map(|c| &c.result).chain([&late_result]);
    for ((result, expected), message) in results.iter().zip(expected).zip(&sent) {
        assert_same(
            &format!("Python's get_result for {} {}", message.actor_name, message.args.len()),
            result,
            &json!({"ok": expected}),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_troupe_sends_every_json_type_kwargs_and_a_delay_python_runs_them_troupe_reads_the_results() {
    let env = Rabbit::new(None).await;
    let cases = cases();
    let mut sent = Vec::new();
    for case in &cases {
        let kwargs = case
            .kwargs
            .as_object()
            .filter(|k| !k.is_empty())
            .map(|_| case.kwargs.to_string());
        let options = vec!["result_ttl=60000".to_owned()];
        sent.push(example_send(&env, case.actor, &case.args, kwargs, None, options).await);
    }
    let delayed = example_send(&env, "echo", &json!(["late 🕰"]), None, Some(DELAY_MS), Vec::new()).await;
    assert_eq!(delayed.queue_name, format!("{}.DQ", env.queue));
    let eta = delayed.eta().expect("a delayed message has an eta");
    sent.push(delayed.clone());

    let records = env.run_python_worker(sent.len(), &[]).await;
    let by_id: HashMap<String, Value> = records
        .iter()
        .map(|r| (r["message_id"].as_str().unwrap().to_owned(), r.clone()))
        .collect();
    assert_eq!(records.len(), sent.len(), "each message ran once: {records:?}");
    assert_eq!(by_id.len(), sent.len());
    for (case, message) in cases.iter().zip(&sent) {
        let record = &by_id[&message.message_id];
        assert_eq!(record["actor"], case.actor);
        let what = format!("what Python's {} received from {}", case.actor, case.args);
        assert_same(&what, &record["received"], &case.received);
        for (name, value) in case.received.as_object().unwrap() {
            assert_eq!(record["types"][name], python_type(value), "{what}: type of {name}");
        }
    }
    let late = &by_id[&delayed.message_id];
    assert_same("the delayed message", &late["received"], &json!({"value": "late 🕰"}));
    assert_eq!(late["queue_name"], env.queue.as_str(), "moved from the delay queue");
    assert!(late["at_ms"].as_u64().unwrap() >= eta, "ran before its eta: {late}");
    let stats = env.broker.stats(&env.queue).await.unwrap();
    assert_eq!(stats.pending() + stats.dead, 0, "{stats:?}");

    // The message option travelled: Python kept the result for result_ttl, not its default.
    let mut conn = redis::Client::open(base_url()).unwrap().get_connection().unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(troupe::result_key(&sent[0]))
        .query(&mut conn)
        .unwrap();
    assert!(
        (1..=60_000).contains(&ttl),
        "the result's TTL is {ttl} ms, not result_ttl=60000"
    );

    // Troupe reads the results Python stored in Redis.
    let app = env.app();
    let late_result = json!("late 🕰");
    let expected = cases.iter().map(|c| &c.result).chain([&late_result]);
    for (message, expected) in sent.iter().zip(expected) {
        let what = format!("the Python result of {} {}", message.actor_name, message.args.len());
        let waited: Value = Sent::<Value>::new(message.clone())
            .wait_result(&app, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_same(&what, &waited, expected);
    }
}

/// What both sides see of the one dead letter of `message` in `Q.XQ`, and its failure result.
async fn check_dead_letter(env: &Rabbit, message: &Message, ran_on: &str) {
    let python_letters = env.peer(&["dlq", &env.queue], "").await;
    let python_letters = python_letters[0].as_array().unwrap();
    assert_eq!(python_letters.len(), 1, "{python_letters:?}");
    let python_letter = &python_letters[0]["message"];
    assert_eq!(python_letter["message_id"], message.message_id.as_str());
    assert_eq!(python_letter["actor_name"], "fail_always");
    assert_eq!(python_letter["queue_name"], env.queue.as_str());
    let python_retries = python_letter["options"]["retries"].as_u64();

    let letters = env.broker.dead_letters(&env.queue, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = letters[0].message.as_ref().expect("Troupe decodes the dead letter");
    assert_eq!(letters[0].id, message.message_id);
    assert_eq!(letter.actor_name, "fail_always");
    assert_eq!(letter.option_u64("retries"), python_retries, "both sides read one body");
    let retries = python_retries.expect("the dead letter has options.retries");
    eprintln!(
        "dead letter of a message run by {ran_on}: options.retries = {retries}, x-death reason {}, Troupe's reason {:?}",
        python_letters[0]["x_death_reason"], letters[0].reason
    );
    assert!((2..=3).contains(&retries), "retries = {retries}");
    // Peeking put it back: still there, once.
    assert_eq!(env.broker.stats(&env.queue).await.unwrap().dead, 1);

    // The failure result, read by both.
    let python = env.python_results(std::slice::from_ref(message)).await;
    let error = &python[0]["error"];
    assert_eq!(error["type"], "ResultFailure", "{python:?}");
    assert_eq!(error["orig_exc_type"], "ValueError");
    assert_eq!(error["orig_exc_msg"], "fail_always always fails");
    match env.app().get_result(message, Some(Duration::from_secs(5))).await {
        Err(Error::ResultFailure { error_type, message }) => {
            assert_eq!(error_type, "ValueError");
            assert_eq!(message, "fail_always always fails");
        }
        other => panic!("expected Error::ResultFailure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_python_sends_fail_always_troupe_retries_it_into_the_dead_letters() {
    let env = Rabbit::new(None).await;
    let sent = env.peer(&["send", "fail_always"], "").await;
    let message = Message::from_value(sent[0].clone()).unwrap();
    let ids = HashSet::from([message.message_id.clone()]);

    let worker = env.troupe_worker(2, None).await;
    wait_until("the message is dead-lettered", || async {
        env.broker.stats(&env.queue).await.unwrap().dead == 1 && env.pending().await == 0
    })
    .await;
    worker.stop().await;

    assert_eq!(attempts(&troupe_calls(&ids)), [0, 1, 2], "three attempts");
    check_dead_letter(&env, &message, "Troupe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_troupe_sends_fail_always_python_retries_it_into_the_dead_letters() {
    let env = Rabbit::new(None).await;
    let app = env.app();
    let sent = app
        .send(&interop::OnQueue::new(interop::FailAlways, env.queue.as_str()), ())
        .await
        .unwrap();
    assert_eq!(sent.message().queue_name, env.queue);
    let records = env.run_python_worker(3, &[]).await;
    assert_eq!(attempts(&records), [0, 1, 2], "three attempts: {records:?}");
    assert!(records.iter().all(|r| r["message_id"] == sent.message_id()));
    check_dead_letter(&env, sent.message(), "Python").await;
}

/// Several messages with different `broker_priority` (and one without), as sent.
const PRIORITIES: [Option<u8>; 7] = [Some(1), Some(5), None, Some(9), Some(3), Some(10), Some(7)];

/// The values `echo` should receive when the messages run highest `broker_priority` first.
fn by_priority() -> Vec<Value> {
    let mut order: Vec<(u8, usize)> = PRIORITIES
        .iter()
        .enumerate()
        .map(|(i, p)| (p.unwrap_or(0), i))
        .collect();
    order.sort_by_key(|&(p, _)| std::cmp::Reverse(p));
    order.into_iter().map(|(_, i)| json!(i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_broker_priority_python_declares_with_max_priority_troupe_declares_again_and_runs_highest_first() {
    let env = Rabbit::new(Some(MAX_PRIORITY)).await;
    // Python declares the queues (max_priority=10) and queues them all before any worker runs.
    let batch: String = PRIORITIES
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let options = p.map_or_else(|| json!({}), |p| json!({"broker_priority": p}));
            json!({"actor": "echo", "args": [i], "options": options}).to_string() + "\n"
        })
        .collect();
    let sent: Vec<Message> = env
        .peer(&["send-batch"], &batch)
        .await
        .into_iter()
        .map(|m| Message::from_value(m).unwrap())
        .collect();
    assert_eq!(sent[0].option_u64("broker_priority"), Some(1));

    // The arguments matter: without max_priority RabbitMQ refuses Troupe's declaration...
    let plain = connect_rabbitmq(None).await;
    let refused = plain.declare_queue(&env.queue).await.unwrap_err().to_string();
    assert!(
        refused.contains("PRECONDITION_FAILED") || refused.contains("406"),
        "expected PRECONDITION_FAILED, got: {refused}"
    );
    plain.close().await.unwrap();
    // ...and with the same max_priority it declares Q, Q.DQ and Q.XQ again without error.
    env.broker.declare_queue(&env.queue).await.unwrap();
    assert_eq!(env.broker.stats(&env.queue).await.unwrap().ready, 7);

    // One message at a time: RabbitMQ hands out the highest broker_priority first.
    let ids: HashSet<String> = sent.iter().map(|m| m.message_id.clone()).collect();
    let worker = env.troupe_worker(1, Some(1)).await;
    wait_until("Troupe ran the prioritised messages", || async {
        troupe_calls(&ids).len() == ids.len() && env.pending().await == 0
    })
    .await;
    worker.stop().await;
    let order: Vec<Value> = troupe_calls(&ids)
        .into_iter()
        .map(|c| c["received"]["value"].clone())
        .collect();
    assert_eq!(order, by_priority(), "Troupe ran them in broker_priority order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_broker_priority_troupe_declares_with_max_priority_python_declares_again_and_runs_highest_first() {
    let env = Rabbit::new(Some(MAX_PRIORITY)).await;
    // Troupe declares the queues (max_priority=10) and queues them all before any worker runs.
    let app = env.app();
    let echo = interop::OnQueue::new(interop::Echo, env.queue.as_str());
    for (i, p) in PRIORITIES.iter().enumerate() {
        let options = p.map_or_else(SendOptions::new, |p| SendOptions::new().broker_priority(p));
        app.send_with_options(&echo, (json!(i),), options).await.unwrap();
    }
    assert_eq!(env.broker.stats(&env.queue).await.unwrap().ready, 7);

    // The arguments matter: without max_priority RabbitMQ refuses Python's declaration...
    let (ok, _, stderr) = env.peer_output(&["declare", &env.queue], "", None).await;
    assert!(!ok, "Python declared the queue without max_priority");
    assert!(stderr.contains("PRECONDITION_FAILED"), "{stderr}");
    // ...and with the same max_priority it declares them again and runs them, one at a time,
    // highest broker_priority first.
    assert_eq!(
        env.peer(&["declare", &env.queue], "").await,
        [json!({"declared": env.queue})]
    );
    let records = env
        .run_python_worker(PRIORITIES.len(), &["--threads", "1", "--prefetch", "1"])
        .await;
    let order: Vec<Value> = records.iter().map(|r| r["received"]["value"].clone()).collect();
    assert_eq!(
        order,
        by_priority(),
        "Python ran them in broker_priority order: {records:?}"
    );
}

/// Troupe's priorities on a queue with `max_priority`: p < 0 is published with AMQP priority
/// ceil(-p * max_priority / 10), p >= 0 with none (Dramatiq's bytes), and Dramatiq's own
/// `broker_priority` wins when set. A Python worker sees plain AMQP priorities and runs the
/// most urgent first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_troupe_priorities_are_amqp_priorities_python_runs_the_most_urgent_first() {
    let env = Rabbit::new(Some(MAX_PRIORITY)).await;
    let app = env.app();
    let echo = interop::OnQueue::new(interop::Echo, env.queue.as_str());
    let sends: [(&str, i32, Option<u8>); 7] = [
        ("a", 0, None),
        ("b", -2, None),
        ("c", 3, None),
        ("d", -10, None),
        ("e", -5, None),
        ("f", 0, None),
        ("g", -1, Some(9)),
    ];
    for (tag, priority, broker_priority) in sends {
        let mut options = SendOptions::new().priority(priority);
        if let Some(p) = broker_priority {
            options = options.broker_priority(p);
        }
        app.send_with_options(&echo, (json!(tag),), options).await.unwrap();
    }
    assert_eq!(env.broker.stats(&env.queue).await.unwrap().ready, 7);
    let records = env
        .run_python_worker(sends.len(), &["--threads", "1", "--prefetch", "1"])
        .await;
    let order: Vec<Value> = records.iter().map(|r| r["received"]["value"].clone()).collect();
    // AMQP priorities 10 (d), 9 (g: broker_priority), 5 (e), 2 (b), then none: a, c, f in order.
    assert_eq!(
        order,
        ["d", "g", "e", "b", "a", "c", "f"].map(|t| json!(t)),
        "Python ran them most urgent first: {records:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_troupe_and_python_workers_share_a_queue_each_message_runs_exactly_once() {
    const MESSAGES: u64 = 120;
    let env = Rabbit::new(None).await;
    let app = env.app();
    let sleep_ms = interop::OnQueue::new(interop::SleepMs, env.queue.as_str());
    let mut ids = HashSet::new();
    for i in 0..MESSAGES {
        let sent = app.send(&sleep_ms, (20 + i % 3,)).await.unwrap();
        ids.insert(sent.message_id().to_owned());
    }
    // Python first (it starts slower), then Troupe: both consume the queue at once.
    let python = env.start_python_worker(&[]).await;
    let troupe = env.troupe_worker(4, None).await;
    let python_records = python.finish().await;
    wait_until("the queue is drained", || async { env.pending().await == 0 }).await;
    troupe.stop().await;

    let troupe_records = troupe_calls(&ids);
    let mut seen = HashMap::<String, Vec<&str>>::new();
    for (side, records) in [("python", &python_records), ("troupe", &troupe_records)] {
        for r in records {
            assert_eq!(r["actor"], "sleep_ms");
            seen.entry(r["message_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(side);
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, sides)| sides.len() > 1).collect();
    assert!(twice.is_empty(), "messages run more than once: {twice:?}");
    let missing: Vec<_> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(missing.is_empty(), "messages never run: {missing:?}");
    assert_eq!(seen.len(), ids.len());
    eprintln!(
        "{MESSAGES} messages: {} run by Python, {} by Troupe",
        python_records.len(),
        troupe_records.len()
    );
    assert!(
        !python_records.is_empty() && !troupe_records.is_empty(),
        "both workers took part: Python {}, Troupe {}",
        python_records.len(),
        troupe_records.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_the_example_worker_command_needs_a_results_url_and_serves_python_until_sigterm() {
    use tokio::signal::unix::{SignalKind, signal};
    let env = Rabbit::new(None).await;
    let parse = |args: &[&str]| {
        let cli = <interop::Cli as clap::Parser>::try_parse_from(args).unwrap();
        let interop::Command::Worker(command) = cli.command else {
            panic!("parsed as another command")
        };
        command
    };
    let url = amqp_url();
    // No --results-url with an amqp:// broker: a one-line error, before connecting anywhere.
    let mut command = parse(&["interop", "worker", "--broker-url", &url]);
    command.worker.results_url = None; // whatever TROUPE_RESULTS_URL says
    let error = interop::worker(command).await.unwrap_err().to_string();
    assert!(error.contains("--results-url") && !error.contains('\n'), "{error}");
    assert!(!error.contains("guest:guest"), "no credentials in the error: {error}");

    // Our own SIGTERM listener: from now on the signal is caught, never fatal to the test.
    let mut sigterm = signal(SignalKind::terminate()).unwrap();
    let redis = base_url();
    let command = parse(&[
        "interop",
        "worker",
        "--broker-url",
        &url,
        "--results-url",
        &redis,
        "--actor-queue",
        &env.queue,
        "-c",
        "2",
    ]);
    let worker = tokio::spawn(interop::worker(command));

    let sent = env.peer(&["send", "add", "--args", "[2, 40]"], "").await;
    let message = Message::from_value(sent[0].clone()).unwrap();
    let results = env.python_results(&[message]).await;
    assert_eq!(results, [json!({"ok": 42})]);

    let pid = std::process::id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    sigterm.recv().await;
    let code = tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker stops on SIGTERM")
        .unwrap()
        .unwrap();
    assert_eq!(code, 0, "a clean shutdown");
}
