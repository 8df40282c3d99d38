//! Redis interoperability with the real Python Dramatiq (2.2.1), both directions: messages,
//! results, delays, retries into the dead letters, and a queue shared by a Troupe worker and a
//! Python worker at once. The same on RabbitMQ (results in Redis) in `rabbitmq.rs`;
//! cancellation with Python's dramatiq-abort (1.2.1) in `cancel.rs`; a rate-limit mutex shared
//! with Python's `ConcurrentRateLimiter` in `limits.rs`; group completion callbacks with Python's
//! `GroupCallbacks` in `groups.rs`.
//!
//! The Python side is `tests/interop/peer.py`, run with `TROUPE_DRAMATIQ_PYTHON` (scripts/test
//! makes that venv, with dramatiq-abort) or `~/.cache/troupe/venv-dramatiq/bin/python`. The Redis server is
//! `TROUPE_REDIS_URL` (default `redis://127.0.0.1:6379/0`). Each test works in its own
//! namespace, so they run in parallel; its keys are deleted at the end.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod cancel;
mod groups;
#[allow(dead_code, unreachable_pub)]
#[path = "../../examples/interop.rs"]
mod interop;
mod limits;
mod rabbitmq;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use troupe::redis::redis;
use troupe::redis::{RedisBroker, RedisResults};
use troupe::worker::WorkerHandle;
use troupe::{App, Broker, Error, Message, ResultBackend, SendOptions, Sent, Worker};

/// The Python peer.
const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/interop/peer.py");
/// The longest any test waits for the other side.
const WAIT: Duration = Duration::from_secs(15);

/// The venv Python with Dramatiq 2.2.1; fails (never skips) when there is none.
fn python() -> PathBuf {
    let from_env = std::env::var_os("TROUPE_DRAMATIQ_PYTHON").filter(|p| !p.is_empty());
    let fallback = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/troupe/venv-dramatiq/bin/python"));
    for candidate in [from_env.map(PathBuf::from), fallback].into_iter().flatten() {
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "no Python with Dramatiq for the interop tests: TROUPE_DRAMATIQ_PYTHON is unset or missing and \
         ~/.cache/troupe/venv-dramatiq/bin/python does not exist; run scripts/test once (it creates the venv)"
    );
}

fn base_url() -> String {
    std::env::var("TROUPE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

/// A fresh uuid4 (Troupe's message ids are uuid4s).
fn uuid4() -> String {
    Message::new("default", "x", Vec::new(), Map::new()).message_id
}

/// One test's namespace on the shared Redis, with a Troupe broker and results backend on it.
struct Env {
    namespace: String,
    /// The Redis URL for Troupe: the base URL with `namespace=`.
    url: String,
    broker: RedisBroker,
    results: Arc<dyn ResultBackend>,
    /// Message ids with dramatiq-abort keys (outside the namespace), deleted at the end.
    aborts: std::sync::Mutex<Vec<String>>,
}

impl Env {
    async fn new() -> Self {
        python(); // fail first, and clearly, without the Python peer
        let namespace = format!("troupe-interop-{}", uuid4());
        let base = base_url();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}namespace={namespace}");
        let broker = RedisBroker::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("Redis at {base} (start it, or run scripts/test): {e}"));
        let results = RedisResults::connect(&url).await.unwrap().into_dyn();
        Self {
            namespace,
            url,
            broker,
            results,
            aborts: std::sync::Mutex::default(),
        }
    }

    /// Deletes the dramatiq-abort keys of `message_id` at the end (they live outside the
    /// namespace: `dramatiq:aborts:{cancel,abort}:{id}`).
    fn clean_aborts_of(&self, message_id: &str) {
        self.aborts.lock().unwrap().push(message_id.to_owned());
    }

    /// An app with the interop example's actors, on this namespace.
    fn app(&self) -> App {
        interop::build_app(Arc::new(self.broker.clone()), Arc::clone(&self.results)).unwrap()
    }

    /// A Troupe worker (in this process) with the example's actors.
    async fn troupe_worker(&self, concurrency: usize) -> WorkerHandle {
        Worker::builder(self.app())
            .concurrency(concurrency)
            .fetch_timeout(Duration::from_millis(100))
            .shutdown_timeout(Duration::from_secs(5))
            .start()
            .await
            .unwrap()
    }

    fn peer_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(python());
        command
            .arg(PEER)
            .args(args)
            .args(["--url", &base_url(), "--namespace", &self.namespace]);
        command
    }

    /// Runs a peer command (with `stdin`), returns its stdout as JSON documents, one per line.
    async fn peer(&self, args: &[&str], stdin: &str) -> Vec<Value> {
        let mut command = self.peer_command(args);
        let stdin = stdin.to_owned();
        let what = format!("peer.py {}", args.join(" "));
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
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(output.status.success(), "{what} failed: {}\n{stderr}", output.status);
            json_lines(&stdout)
        })
        .await
        .unwrap()
    }

    /// Starts `peer.py worker --until-empty default`; returns once its worker has started.
    async fn start_python_worker(&self) -> PythonWorker {
        self.start_python_worker_with(&[]).await
    }

    /// Starts `peer.py worker --until-empty default EXTRA..`; returns once its worker has started.
    async fn start_python_worker_with(&self, extra: &[&str]) -> PythonWorker {
        let mut args = vec!["worker", "--until-empty", "default", "--seconds", "20"];
        args.extend_from_slice(extra);
        let mut command = self.peer_command(&args);
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
            assert_eq!(
                serde_json::from_str::<Value>(&first).ok(),
                Some(json!({"started": true})),
                "the Python worker did not start: {first:?}"
            );
            PythonWorker { child, stdout }
        })
        .await
        .unwrap()
    }

    /// Runs a Python worker until the queue `default` is empty; returns what its actors received.
    async fn run_python_worker(&self) -> Vec<Value> {
        self.start_python_worker().await.finish().await
    }

    /// The Python view of the dead letters of `default`.
    async fn python_dead_letters(&self) -> Vec<Value> {
        let docs = self.peer(&["dlq", "default"], "").await;
        docs[0].as_array().unwrap().clone()
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
        self.broker.stats("default").await.unwrap().pending()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Delete the namespace's keys (results expire on their own).
        let Ok(mut conn) = redis::Client::open(base_url()).and_then(|c| c.get_connection()) else {
            return;
        };
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.namespace))
            .query(&mut conn)
            .unwrap_or_default();
        let aborts = self.aborts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for id in aborts.iter() {
            keys.extend([
                format!("dramatiq:aborts:cancel:{id}"),
                format!("dramatiq:aborts:abort:{id}"),
            ]);
        }
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
    }
}

/// A running `peer.py worker`.
struct PythonWorker {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl PythonWorker {
    /// Reads its output until the call of `message_id` starts (needs `--print-starts`).
    async fn wait_for_call(mut self, message_id: &str) -> Self {
        let id = message_id.to_owned();
        tokio::task::spawn_blocking(move || {
            loop {
                let mut line = String::new();
                let n = self.stdout.read_line(&mut line).unwrap();
                assert!(n > 0, "the Python worker stopped before it started {id}");
                let doc: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if doc["call_started"]["message_id"] == id.as_str() {
                    return self;
                }
            }
        })
        .await
        .unwrap()
    }

    /// Waits for it to stop (its queue empty); returns what its actors received.
    async fn finish(self) -> Vec<Value> {
        let Self { mut child, mut stdout } = self;
        tokio::task::spawn_blocking(move || {
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            let status = child.wait().unwrap();
            assert!(status.success(), "the Python worker failed: {status}\n{stderr}");
            assert!(!stderr.contains("did not drain"), "{stderr}");
            let mut records = json_lines(&rest);
            records.retain(|r| r.get("call_started").is_none());
            records
        })
        .await
        .unwrap()
    }
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Polls `check` every 20 ms until it holds; panics naming `what` after [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The example's calls of this process for these message ids.
fn troupe_calls(ids: &HashSet<String>) -> Vec<Value> {
    interop::calls()
        .into_iter()
        .filter(|c| c["message_id"].as_str().is_some_and(|id| ids.contains(id)))
        .collect()
}

/// One message and what should come of it.
struct Case {
    actor: &'static str,
    args: Value,
    kwargs: Value,
    /// What the actor receives, by parameter name.
    received: Value,
    /// Its stored result.
    result: Value,
}

/// Values of every JSON type, as Python and Troupe both represent them exactly.
fn sample_values() -> Vec<Value> {
    // Parsed from text so the numbers keep their JSON spelling (int or float).
    let text = r#"[
        0, -1, 42, 9007199254740993, 9223372036854775807, -9223372036854775808, 18446744073709551615,
        0.1, -2.5, 1.0, 1e-07, 1e+16, 1.7976931348623157e+308, 5e-324, -0.0, 3.141592653589793,
        "", "plain ascii", "üñíçødé ß Ωμέγα 中文 עברית", "astral: 😀 𝄞 🎉 𐍈",
        "escapes: \" \\ / \n \t \r \b \f \u0000 \u001f \u007f \u2028",
        [], [1, "two", 3.0, null, [true, false, [[]]]],
        {}, {"zeta": 1, "alpha": 2, "mid": {"nested": {"deep": [1, {"deeper": null}]}}, "é ключ 🔑": "unicode key", "": 0},
        null, true, false
    ]"#;
    let Value::Array(values) = serde_json::from_str(text).unwrap() else {
        unreachable!()
    };
    values
}

fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = sample_values()
        .into_iter()
        .map(|v| Case {
            actor: "echo",
            args: json!([v]),
            kwargs: json!({}),
            received: json!({"value": v}),
            result: v,
        })
        .collect();
    let mut case = |actor, args: Value, kwargs: Value, received: Value, result: Value| {
        cases.push(Case {
            actor,
            args,
            kwargs,
            received,
            result,
        });
    };
    let nested = json!({"kw": "only", "list": [1, 2.5, "три"]});
    case(
        "echo",
        json!([]),
        json!({"value": nested}),
        json!({"value": nested}),
        nested,
    );
    case("add", json!([2, 3]), json!({}), json!({"a": 2, "b": 3}), json!(5));
    case(
        "add",
        json!([9_223_372_036_854_775_807_i64, -9_223_372_036_854_775_807_i64 - 1]),
        json!({}),
        json!({"a": 9_223_372_036_854_775_807_i64, "b": -9_223_372_036_854_775_807_i64 - 1}),
        json!(-1),
    );
    case(
        "add",
        json!([4_611_686_018_427_387_904_u64, 4_611_686_018_427_387_904_u64]),
        json!({}),
        json!({"a": 4_611_686_018_427_387_904_u64, "b": 4_611_686_018_427_387_904_u64}),
        json!(9_223_372_036_854_775_808_u64),
    );
    case(
        "add",
        json!([0.1, 0.2]),
        json!({}),
        json!({"a": 0.1, "b": 0.2}),
        json!(0.300_000_000_000_000_04),
    );
    case("add", json!([1, 0.5]), json!({}), json!({"a": 1, "b": 0.5}), json!(1.5));
    case("add", json!([1]), json!({"b": 41}), json!({"a": 1, "b": 41}), json!(42));
    case(
        "add",
        json!([]),
        json!({"b": 2, "a": 1}),
        json!({"a": 1, "b": 2}),
        json!(3),
    );
    case("sleep_ms", json!([]), json!({"ms": 10}), json!({"ms": 10}), json!(10));
    cases
}

/// Exact equality, JSON spelling included: int vs float, and the order of object keys.
fn assert_same(what: &str, actual: &Value, expected: &Value) {
    assert_eq!(actual.to_string(), expected.to_string(), "{what}");
}

/// Python's type name for a JSON value it decoded.
fn python_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

const DELAY_MS: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sends_every_json_type_and_a_delay_troupe_runs_them_python_reads_the_results() {
    let env = Env::new().await;
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
    assert_eq!(delayed.queue_name, "default.DQ");
    let eta = delayed.eta().expect("Python sets an eta on a delayed message");
    sent.push(delayed.clone());
    let ids: HashSet<String> = sent.iter().map(|m| m.message_id.clone()).collect();

    let worker = env.troupe_worker(4).await;
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
        assert_same(
            &format!("what {} received from {}", case.actor, case.args),
            &call["received"],
            &case.received,
        );
    }
    let late = &calls[&delayed.message_id];
    assert_same("the delayed message", &late["received"], &json!({"value": "late 🕰"}));
    assert_eq!(late["queue_name"], "default", "moved from the delay queue");
    assert!(late["at_ms"].as_u64().unwrap() >= eta, "ran before its eta: {late}");

    // Python reads the results Troupe stored.
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
async fn troupe_sends_every_json_type_and_a_delay_python_runs_them_troupe_reads_the_results() {
    let env = Env::new().await;
    let cases = cases();
    let mut sent = Vec::new();
    for case in &cases {
        let kwargs = case
            .kwargs
            .as_object()
            .filter(|k| !k.is_empty())
            .map(|_| case.kwargs.to_string());
        let args = interop::SendArgs {
            broker_url: env.url.clone(),
            actor: case.actor.to_owned(),
            args: case.args.to_string(),
            kwargs,
            queue: "default".into(),
            delay_ms: None,
            options: vec!["result_ttl=60000".into()],
        };
        let mut out = Vec::new();
        let message = interop::send(args, &mut out).await.unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), format!("{}\n", message.message_id));
        sent.push(message);
    }
    let delayed = interop::send(
        interop::SendArgs {
            broker_url: env.url.clone(),
            actor: "echo".into(),
            args: r#"["late 🕰"]"#.into(),
            kwargs: None,
            queue: "default".into(),
            delay_ms: Some(DELAY_MS),
            options: Vec::new(),
        },
        &mut Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(delayed.queue_name, "default.DQ");
    let eta = delayed.eta().expect("a delayed message has an eta");
    sent.push(delayed.clone());

    let records = env.run_python_worker().await;
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
    assert_eq!(late["queue_name"], "default", "moved from the delay queue");
    assert!(late["at_ms"].as_u64().unwrap() >= eta, "ran before its eta: {late}");

    // The message option travelled: Python kept the result for result_ttl, not its default.
    let mut conn = env.broker.connection();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(troupe::result_key(&sent[0]))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (1..=60_000).contains(&ttl),
        "the result's TTL is {ttl} ms, not result_ttl=60000"
    );

    // Troupe reads the results Python stored.
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
        let got = app.get_result(message, None).await.unwrap();
        assert_same(&what, &got, expected);
    }
}

/// What both sides see of the one dead letter of `message`, and its failure result.
async fn check_dead_letter(env: &Env, message: &Message, ran_on: &str) {
    let python_letters = env.python_dead_letters().await;
    assert_eq!(python_letters.len(), 1, "{python_letters:?}");
    let python_letter = &python_letters[0]["message"];
    assert_eq!(python_letter["message_id"], message.message_id.as_str());
    assert_eq!(python_letter["actor_name"], "fail_always");
    assert_eq!(python_letter["queue_name"], "default");
    let python_retries = python_letter["options"]["retries"].as_u64();

    let letters = env.broker.dead_letters("default", 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = letters[0].message.as_ref().expect("Troupe decodes the dead letter");
    assert_eq!(letters[0].id, message.message_id);
    assert_eq!(letter.actor_name, "fail_always");
    assert_eq!(letter.option_u64("retries"), python_retries, "both sides read one body");
    // Two retries after the first attempt. Python's nack keeps the body as last enqueued
    // (retries = 2); Troupe's writes the message as it failed (see the report in the test log).
    let retries = python_retries.expect("the dead letter has options.retries");
    eprintln!("dead letter of a message run by {ran_on}: options.retries = {retries}");
    assert!((2..=3).contains(&retries), "retries = {retries}");

    // The failure result, read by both.
    let python = env.python_results(std::slice::from_ref(message)).await;
    let error = &python[0]["error"];
    assert_eq!(error["type"], "ResultFailure", "{python:?}");
    assert_eq!(error["orig_exc_type"], "ValueError");
    assert_eq!(error["orig_exc_msg"], "fail_always always fails");
    assert_eq!(error["message"], "actor raised ValueError: fail_always always fails");
    match env.app().get_result(message, Some(Duration::from_secs(5))).await {
        Err(Error::ResultFailure { error_type, message }) => {
            assert_eq!(error_type, "ValueError");
            assert_eq!(message, "fail_always always fails");
        }
        other => panic!("expected Error::ResultFailure, got {other:?}"),
    }
}

fn attempts(records: &[Value]) -> Vec<u64> {
    let mut retries: Vec<u64> = records
        .iter()
        .filter(|r| r["actor"] == "fail_always")
        .map(|r| r["retries"].as_u64().unwrap())
        .collect();
    retries.sort_unstable();
    retries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sends_fail_always_troupe_retries_it_into_the_dead_letters() {
    let env = Env::new().await;
    let sent = env.peer(&["send", "fail_always"], "").await;
    let message = Message::from_value(sent[0].clone()).unwrap();
    let ids = HashSet::from([message.message_id.clone()]);

    let worker = env.troupe_worker(2).await;
    wait_until("the message is dead-lettered", || async {
        env.broker.stats("default").await.unwrap().dead == 1 && env.pending().await == 0
    })
    .await;
    worker.stop().await;

    assert_eq!(attempts(&troupe_calls(&ids)), [0, 1, 2], "three attempts");
    check_dead_letter(&env, &message, "Troupe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn troupe_sends_fail_always_python_retries_it_into_the_dead_letters() {
    let env = Env::new().await;
    let app = env.app();
    let sent = interop::FailAlways.send(&app).await.unwrap();
    let records = env.run_python_worker().await;
    assert_eq!(attempts(&records), [0, 1, 2], "three attempts: {records:?}");
    assert!(records.iter().all(|r| r["message_id"] == sent.message_id()));
    match sent.wait_result(&app, Duration::from_secs(5)).await {
        Err(Error::ResultFailure { error_type, .. }) => assert_eq!(error_type, "ValueError"),
        other => panic!("expected Error::ResultFailure, got {other:?}"),
    }
    check_dead_letter(&env, sent.message(), "Python").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn troupe_and_python_workers_share_a_queue_each_message_runs_exactly_once() {
    const MESSAGES: u64 = 80;
    let env = Env::new().await;
    let app = env.app();
    let mut ids = HashSet::new();
    for i in 0..MESSAGES {
        let sent = interop::SleepMs.send(&app, 20 + i % 3).await.unwrap();
        ids.insert(sent.message_id().to_owned());
    }
    // Python first (it starts slower), then Troupe: both consume `default` at once.
    let python = env.start_python_worker().await;
    let troupe = env.troupe_worker(4).await;
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

/// Priorities on Redis: a message at priority 0 is Dramatiq's exact layout, which a Python
/// worker runs; one with another priority waits in a lane list Python Dramatiq does not read
/// (`ns:q.P<p>`, its body in `ns:q.msgs` as usual), so only a Troupe worker runs it, most urgent
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn troupe_priorities_python_runs_priority_zero_the_lanes_wait_for_troupe() {
    let env = Env::new().await;
    let app = env.app();
    let plain = interop::Echo.send(&app, json!("plain")).await.unwrap();
    assert!(!plain.message().options.contains_key("troupe_priority"));
    let mut ids = HashSet::new();
    for (value, priority) in [("lazy", 3), ("urgent", -5)] {
        let sent = interop::Echo
            .send_with_options(&app, json!(value), SendOptions::new().priority(priority))
            .await
            .unwrap();
        assert_eq!(sent.message().priority(), priority);
        ids.insert(sent.message_id().to_owned());
    }
    let python = env.peer(&["worker", "--seconds", "1.5"], "").await;
    let ran: Vec<&Value> = python.iter().filter_map(|r| r.get("received")).collect();
    assert_eq!(
        ran,
        [&json!({"value": "plain"})],
        "Python ran only the priority-0 message"
    );
    assert_eq!(
        env.pending().await,
        2,
        "the prioritized messages wait for a Troupe worker"
    );
    let troupe = env.troupe_worker(1).await;
    wait_until("the lanes are drained", || async { env.pending().await == 0 }).await;
    troupe.stop().await;
    let order: Vec<Value> = troupe_calls(&ids)
        .iter()
        .map(|c| c["received"]["value"].clone())
        .collect();
    assert_eq!(order, [json!("urgent"), json!("lazy")], "most urgent first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_worker_command_serves_python_until_sigterm() {
    use tokio::signal::unix::{SignalKind, signal};
    let env = Env::new().await;
    // Our own SIGTERM listener: from now on the signal is caught, never fatal to the test.
    let mut sigterm = signal(SignalKind::terminate()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let cli = <interop::Cli as clap::Parser>::try_parse_from([
        "interop",
        "worker",
        "--broker-url",
        &env.url,
        "-c",
        "2",
        "--metrics-bind",
        &metrics,
    ])
    .unwrap();
    let interop::Command::Worker(command) = cli.command else {
        panic!("parsed as another command")
    };
    let worker = tokio::spawn(interop::worker(command));

    let sent = env.peer(&["send", "add", "--args", "[2, 40]"], "").await;
    let message = Message::from_value(sent[0].clone()).unwrap();
    let results = env.python_results(&[message]).await;
    assert_eq!(results, [json!({"ok": 42})]);
    // The worker's metrics count the Python message, under Dramatiq's names.
    let scraped = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&metrics).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let total = scraped
        .lines()
        .find(|l| l.starts_with("dramatiq_messages_total{") && l.contains(r#"actor_name="add""#))
        .unwrap_or_else(|| panic!("no dramatiq_messages_total for add: {scraped}"));
    assert!(total.ends_with(" 1"), "{total}");

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
