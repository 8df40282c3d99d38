//! The worker's command line: flags, exit codes and signals, tested on a real child process.
//!
//! The test binary runs itself as the child (`TROUPE_CLI_CHILD=1`, filtered to the `child`
//! test), so no other binary needs building.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use troupe::prelude::*;
use troupe::worker::WorkerArgs;
use troupe_test_suite::servers::{free_port, redis_server};

#[troupe::actor(queue_name = "cli")]
async fn nap(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

#[troupe::actor(queue_name = "cli", store_results = true)]
async fn double(x: i64) -> i64 {
    x * 2
}

/// A periodic actor (the child's app when TROUPE_CLI_TICKS names a file): appends its tick to
/// that file, one line per run.
#[troupe::actor(queue_name = "cli", every = "1s")]
async fn tick() {
    use std::io::Write;
    let tick = troupe::current_message()
        .and_then(|m| m.options.get("troupe_tick").and_then(serde_json::Value::as_u64))
        .unwrap_or(0);
    if let Ok(path) = std::env::var("TROUPE_CLI_TICKS")
        && let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path)
    {
        let _ = writeln!(file, "{tick} {}", std::process::id());
    }
}

/// The child's app when TROUPE_CLI_BACKENDS is set (`run_worker_with`): it says which backends
/// it was given, then sends itself `double(21)`, waits for the result through the results
/// backend, puts it in the state backend under "answer" and prints `child: stored ID VALUE`.
fn build_with_backends(backends: troupe::Backends) -> troupe::Result<App> {
    eprintln!(
        "child: results={} state={}",
        backends.results.is_some(),
        backends.state.is_some()
    );
    let app = backends.app_builder().actor(Double).build()?;
    let sender = app.clone();
    tokio::spawn(async move {
        let sent = Double.send(&sender, 21).await.unwrap();
        let value = sent.wait_result(&sender, Duration::from_secs(10)).await.unwrap();
        let state = sender.state().expect("a state backend");
        assert!(state.add("answer", value, Duration::from_secs(600)).await.unwrap());
        eprintln!("child: stored {} {value}", sent.message_id());
    });
    Ok(app)
}

/// The child: a worker binary's `main`, with its flags in TROUPE_CLI_ARGS. When
/// TROUPE_CLI_NAP is set, it first sends itself a message that naps that many ms, so a
/// signal arrives while an actor runs.
#[test]
fn child() {
    if std::env::var("TROUPE_CLI_CHILD").is_err() {
        return;
    }
    let args: Vec<String> = std::iter::once("worker".to_owned())
        .chain(
            std::env::var("TROUPE_CLI_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned),
        )
        .collect();
    let nap = std::env::var("TROUPE_CLI_NAP").ok().and_then(|v| v.parse::<u64>().ok());
    let with_backends = std::env::var("TROUPE_CLI_BACKENDS").is_ok();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let code = runtime.block_on(async move {
        let args = match <WorkerArgs as clap::Parser>::try_parse_from(&args) {
            Ok(args) => args,
            Err(e) => {
                eprintln!("{e}");
                return 2;
            }
        };
        if std::env::var("TROUPE_CLI_TICKS").is_ok() {
            return i32::from(
                troupe::run_worker_status_with(args, |backends| backends.app_builder().actor(Tick).build()).await,
            );
        }
        if with_backends {
            return i32::from(troupe::run_worker_status_with(args, build_with_backends).await);
        }
        let exit = troupe::run_worker_status(args, move |broker| {
            let app = App::builder(broker).actor(Nap).build()?;
            if let Some(ms) = nap {
                let app = app.clone();
                tokio::spawn(async move { Nap.send(&app, ms).await });
            }
            eprintln!("child: ready");
            Ok(app)
        })
        .await;
        i32::from(exit)
    });
    std::process::exit(code);
}

fn spawn(args: &str, nap: Option<u64>) -> std::process::Child {
    child_command(args, nap).spawn().unwrap()
}

fn child_command(args: &str, nap: Option<u64>) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child", "--exact", "--nocapture", "--test-threads", "1"])
        .env("TROUPE_CLI_CHILD", "1")
        .env("TROUPE_CLI_ARGS", args)
        .env_remove("TROUPE_BROKER_URL")
        .env_remove("TROUPE_RESULTS_URL")
        .env_remove("TROUPE_STATE_URL")
        .env_remove("TROUPE_CLI_BACKENDS")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(ms) = nap {
        cmd.env("TROUPE_CLI_NAP", ms.to_string());
    }
    cmd
}

/// Runs a child that is expected to exit on its own; returns its exit code and stderr.
fn run_to_end(mut cmd: Command) -> (Option<i32>, String) {
    finish(&mut cmd.spawn().unwrap())
}

/// Waits (at most 20 s) for a child to exit; returns its exit code and stderr.
fn finish(child: &mut std::process::Child) -> (Option<i32>, String) {
    let code = wait_with_timeout(child, Duration::from_secs(20));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (code, stderr)
}

/// Reads the child's stderr until a line contains `needle` (at most 20 s); returns that line
/// and keeps draining the rest.
fn wait_for_line(child: &mut std::process::Child, needle: &str) -> String {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = needle.to_owned();
    std::thread::spawn(move || {
        let mut found = false;
        for line in BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
            if !found && line.contains(&wanted) {
                found = true;
                let _ = tx.send(line);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            panic!("the child never printed {needle:?}");
        }
    }
}

fn signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .args(["-s", sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_with_timeout(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

fn wait_ready(child: &mut std::process::Child) {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("worker started") {
            break;
        }
        assert!(Instant::now() < deadline, "child did not start");
    }
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
}

#[test]
fn sigterm_shuts_down_gracefully_with_exit_code_0() {
    let mut child = spawn("--broker-url memory:// --shutdown-timeout 10s", Some(300));
    wait_ready(&mut child);
    std::thread::sleep(Duration::from_millis(100));
    signal(&child, "TERM");
    let started = Instant::now();
    assert_eq!(wait_with_timeout(&mut child, Duration::from_secs(10)), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "graceful shutdown waited for the 300 ms actor only"
    );
}

#[test]
fn a_second_signal_exits_at_once_with_code_1() {
    let mut child = spawn("--broker-url memory:// --shutdown-timeout 60s", Some(60_000));
    wait_ready(&mut child);
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, "INT");
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "INT");
    assert_eq!(wait_with_timeout(&mut child, Duration::from_secs(5)), Some(1));
}

#[test]
fn bad_arguments_exit_with_code_2() {
    let mut child = spawn("--concurrency lots", None);
    assert_eq!(wait_with_timeout(&mut child, Duration::from_secs(10)), Some(2));
    let mut child = spawn("--broker-url ftp://nowhere", None);
    assert_eq!(wait_with_timeout(&mut child, Duration::from_secs(10)), Some(2));
    let mut child = spawn("--broker-url memory:// --queues nobody_consumes_this", None);
    assert_eq!(wait_with_timeout(&mut child, Duration::from_secs(10)), Some(2));
}

/// Runs a `run_worker_with` child given a results and a state URL, each in its own SQLite
/// file, by flags or by environment variables, and checks that its actor's result and its
/// state landed in those files.
fn backends_reach_the_app(by_env: bool) {
    let dir = tempfile::tempdir().unwrap();
    let results_url = format!("sqlite://{}/results.db", dir.path().display());
    let state_url = format!("sqlite://{}/state.db", dir.path().display());
    let mut cmd = if by_env {
        let mut cmd = child_command("--broker-url memory://", None);
        cmd.env("TROUPE_RESULTS_URL", &results_url)
            .env("TROUPE_STATE_URL", &state_url);
        cmd
    } else {
        child_command(
            &format!("--broker-url memory:// --results-url {results_url} --state-url {state_url}"),
            None,
        )
    };
    let mut child = cmd.env("TROUPE_CLI_BACKENDS", "1").spawn().unwrap();
    let line = wait_for_line(&mut child, "child: stored");
    signal(&child, "TERM");
    assert_eq!(wait_with_timeout(&mut child, Duration::from_secs(10)), Some(0));

    let mut words = line.rsplit(' ');
    assert_eq!(words.next(), Some("42"), "{line}");
    let message_id = words.next().unwrap().to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let state = troupe::connect_state(&state_url).await.unwrap();
        assert_eq!(state.get("answer").await.unwrap(), Some(42));
        let results = troupe::connect_results(&results_url).await.unwrap();
        let mut message = Message::new("cli", "double", Vec::new(), serde_json::Map::new());
        message.message_id = message_id;
        assert_eq!(results.get(&message, None).await.unwrap(), serde_json::json!(42));
    });
}

#[test]
fn results_and_state_urls_from_flags_reach_the_app() {
    backends_reach_the_app(false);
}

#[test]
fn results_and_state_urls_from_the_environment_reach_the_app() {
    backends_reach_the_app(true);
}

#[test]
fn results_and_state_url_errors_exit_with_code_2_and_hide_passwords() {
    // run_worker cannot hand them to its app: it refuses rather than ignore them.
    let (code, stderr) = run_to_end(child_command("--broker-url memory:// --results-url memory://", None));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--results-url") && stderr.contains("run_worker_with"),
        "{stderr}"
    );
    let mut cmd = child_command("--broker-url memory://", None);
    cmd.env("TROUPE_STATE_URL", "memory://");
    let (code, stderr) = run_to_end(cmd);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("TROUPE_STATE_URL"), "{stderr}");

    // Bad URLs, with run_worker_with: one line, no password.
    for flags in [
        "--broker-url memory:// --results-url kafka://user:hunter2@localhost/0",
        "--broker-url memory:// --state-url ftp://user:hunter2@localhost/x",
        "--broker-url memory:// --results-url amqp://user:hunter2@localhost/",
    ] {
        let mut cmd = child_command(flags, None);
        cmd.env("TROUPE_CLI_BACKENDS", "1");
        let (code, stderr) = run_to_end(cmd);
        assert_eq!(code, Some(2), "{flags}: {stderr}");
        assert!(stderr.contains("error: "), "{flags}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{flags}: {stderr}");
    }
}

/// `GET /metrics` on `port`; the body.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split_once("\r\n\r\n").unwrap().1.to_owned()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{series} not in {text}"))
        .parse()
        .unwrap()
}

/// Sends `n` nap messages to the SQLite broker at `url`.
fn send_naps(url: &str, n: usize, ms: u64) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let app = App::builder(troupe::connect(url).await.unwrap())
            .actor(Nap)
            .build()
            .unwrap();
        for _ in 0..n {
            Nap.send(&app, ms).await.unwrap();
        }
    });
}

/// The queue's counts and the live workers, read from the broker at `url`.
fn look(url: &str) -> (troupe::QueueStats, Vec<troupe::WorkerInfo>) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let broker = troupe::connect(url).await.unwrap();
        let stats = broker.stats("cli").await.unwrap();
        let workers = broker.workers().await.unwrap();
        broker.close().await.unwrap();
        (stats, workers)
    })
}

fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `--processes 2 --metrics-bind`: two worker processes share the queue, and the supervisor's
/// `/metrics` is the sum of theirs: exactly the messages that ran.
#[test]
fn processes_share_the_work_and_their_metrics_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("procs.db").display());
    send_naps(&url, 120, 5);
    let port = free_port();
    let mut supervisor = spawn(
        &format!("--broker-url {url} --processes 2 --concurrency 4 --metrics-bind 127.0.0.1:{port}"),
        None,
    );
    let mut pids = std::collections::BTreeSet::new();
    wait_until("two worker processes", Duration::from_secs(20), || {
        let (_, workers) = look(&url);
        pids.extend(workers.iter().map(|w| w.pid));
        pids.len() >= 2
    });
    assert!(!pids.contains(&supervisor.id()), "the supervisor runs no worker itself");
    wait_until("the queue to drain", Duration::from_secs(30), || {
        look(&url).0.pending() == 0
    });
    // The processes write their metrics every second.
    std::thread::sleep(Duration::from_millis(1500));
    let text = scrape(port);
    let labels = r#"{actor_name="nap",queue_name="cli"}"#;
    assert_eq!(
        metric(&text, &format!("dramatiq_messages_total{labels}")),
        120.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("dramatiq_message_duration_milliseconds_count{labels}")),
        120.0
    );
    assert_eq!(metric(&text, &format!("dramatiq_messages_inprogress{labels}")), 0.0);
    assert_eq!(
        metric(&text, r#"troupe_queue_messages{queue_name="cli",state="ready"}"#),
        0.0
    );
    signal(&supervisor, "TERM");
    assert_eq!(wait_with_timeout(&mut supervisor, Duration::from_secs(20)), Some(0));
    let (_, workers) = look(&url);
    assert!(
        workers.iter().all(|w| !pids.contains(&w.pid)),
        "every worker process stopped: {workers:?}"
    );
}

/// A worker process killed with SIGKILL is replaced, and its messages still run: none lost.
#[test]
fn a_killed_worker_process_is_replaced_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?lease=2s", dir.path().join("kill.db").display());
    send_naps(&url, 400, 100);
    let mut supervisor = spawn(&format!("--broker-url {url} --processes 2 --concurrency 4"), None);
    let mut first = Vec::new();
    wait_until("two worker processes", Duration::from_secs(20), || {
        let (_, workers) = look(&url);
        first = workers.iter().map(|w| w.pid).collect();
        first.len() == 2
    });
    // Both are busy: 400 messages of 100 ms take 5 s on 8 slots.
    std::thread::sleep(Duration::from_millis(500));
    let victim = first[0];
    let killed = Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap();
    assert!(killed.success());
    wait_until("a replacement process", Duration::from_secs(20), || {
        let (_, workers) = look(&url);
        workers.iter().any(|w| !first.contains(&w.pid))
    });
    wait_until("every message to run", Duration::from_secs(60), || {
        look(&url).0.pending() == 0
    });
    let (stats, _) = look(&url);
    assert_eq!(stats.dead, 0, "{stats:?}");
    signal(&supervisor, "TERM");
    let (code, stderr) = finish(&mut supervisor);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("pid={victim}")) && stderr.contains("was killed by signal 9"),
        "the supervisor says which process died: {stderr}"
    );
}

/// A worker process that cannot reach its broker stops the supervisor with Dramatiq's code 3.
#[test]
fn processes_that_cannot_start_stop_the_supervisor_with_their_code() {
    let (code, stderr) = run_to_end(child_command("--broker-url redis://127.0.0.1:1/0 --processes 2", None));
    assert_eq!(code, Some(3), "{stderr}");
}

/// Three worker processes with a periodic actor: each tick runs once, whichever process wins it.
#[test]
fn a_periodic_actor_ticks_once_across_three_processes() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ticks.db").display());
    let ticks = dir.path().join("ticks.txt");
    let mut supervisor = child_command(&format!("--broker-url {url} --state-url {url} --processes 3"), None)
        .env("TROUPE_CLI_TICKS", &ticks)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(5500));
    signal(&supervisor, "TERM");
    // With what the processes said (seen once in CI: the supervisor exited with code 2).
    let (code, stderr) = finish(&mut supervisor);
    assert_eq!(code, Some(0), "{stderr}");
    let text = std::fs::read_to_string(&ticks).unwrap_or_default();
    let mut runs: Vec<(u64, u32)> = text
        .lines()
        .map(|l| {
            let (tick, pid) = l.split_once(' ').unwrap();
            (tick.parse().unwrap(), pid.parse().unwrap())
        })
        .collect();
    runs.sort_unstable();
    let ticks: Vec<u64> = runs.iter().map(|(t, _)| *t).collect();
    assert!(ticks.len() >= 3, "about one tick a second: {runs:?}");
    for pair in ticks.windows(2) {
        assert_eq!(pair[1] - pair[0], 1000, "each tick once, none skipped: {runs:?}");
    }
    let pids: std::collections::BTreeSet<u32> = runs.iter().map(|(_, p)| *p).collect();
    assert!(!pids.contains(&supervisor.id()), "worker processes ran them: {runs:?}");
}

/// Everything a worker prints while things go wrong, at debug level, never contains a password:
/// a worker whose Redis (password-protected; broker, results and state on it) is killed and
/// restarted under it, its metrics, and workers refused for a wrong password or an unreachable
/// server on each broker; and the options' `Debug` output.
#[test]
fn passwords_never_appear_in_what_a_failing_run_prints() {
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = redis_server(port, dir.path(), &["--requirepass", &password]);
    let url = format!("redis://:{password}@127.0.0.1:{port}/0");
    let metrics = free_port();
    let mut cmd = child_command(
        &format!("--broker-url {url} --results-url {url} --state-url {url} --metrics-bind 127.0.0.1:{metrics}"),
        None,
    );
    let mut worker = cmd
        .env("TROUPE_CLI_BACKENDS", "1")
        .env("RUST_LOG", "debug")
        .spawn()
        .unwrap();
    let stderr = worker.stderr.take().unwrap();
    let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = std::thread::spawn({
        let printed = std::sync::Arc::clone(&printed);
        move || {
            use std::io::{BufRead, BufReader};
            for line in BufReader::new(stderr).lines().map_while(std::result::Result::ok) {
                let mut all = printed.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        }
    });
    wait_until("the worker stored its answer", Duration::from_secs(20), || {
        printed.lock().unwrap().contains("child: stored")
    });

    // The server dies under the worker and stays down until the worker has logged the outage.
    redis.kill().unwrap();
    redis.wait().unwrap();
    wait_until("the worker logged the outage", Duration::from_secs(20), || {
        printed.lock().unwrap().contains("connection error")
    });
    let mut redis = redis_server(port, dir.path(), &["--requirepass", &password]);
    wait_until("the worker reconnected", Duration::from_secs(20), || {
        printed.lock().unwrap().contains("reconnected")
    });
    let scraped = scrape(metrics);
    signal(&worker, "TERM");
    assert!(
        wait_with_timeout(&mut worker, Duration::from_secs(20)).is_some(),
        "the worker stopped"
    );
    reader.join().unwrap();
    let _ = redis.kill();
    let _ = redis.wait();
    let printed = printed.lock().unwrap().clone();
    assert!(
        printed.contains("connection error") && printed.contains("reconnected"),
        "the worker logged the outage: {printed}"
    );

    // Workers that cannot start: a wrong password, and servers that are not there.
    let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
    let refused_port = free_port();
    let mut refused = String::new();
    for flags in [
        format!("--broker-url redis://:{wrong}@127.0.0.1:{port}/0"),
        format!("--broker-url amqp://guest:{wrong}@127.0.0.1:5672/%2f"),
        format!("--broker-url amqp://guest:{wrong}@127.0.0.1:{refused_port}/%2f"),
        format!("--broker-url postgres://postgres:{wrong}@127.0.0.1:{refused_port}/test"),
        format!("--broker-url redis://:{wrong}@127.0.0.1:{refused_port}/0"),
    ] {
        let mut cmd = child_command(&flags, None);
        cmd.env("RUST_LOG", "debug");
        let (code, stderr) = run_to_end(cmd);
        assert_ne!(code, Some(0), "{flags}: {stderr}");
        refused.push_str(&stderr);
    }

    let debug = [
        format!("{:?}", troupe::redis::RedisOptions::from_url(&url).unwrap()),
        format!(
            "{:?}",
            troupe::rabbitmq::RabbitmqOptions::from_url(&format!("amqp://guest:{password}@127.0.0.1:5672/%2f"))
                .unwrap()
        ),
        format!(
            "{:?}",
            troupe::postgres::PostgresOptions::from_url(&format!("postgres://postgres:{password}@127.0.0.1:5432/test"))
                .unwrap()
        ),
    ]
    .join("\n");
    for (what, text) in [
        ("the worker's log", &printed),
        ("the metrics", &scraped),
        ("the refused workers' output", &refused),
        ("the options' Debug", &debug),
    ] {
        assert!(!text.contains(&password), "{what} shows the password: {text}");
        assert!(!text.contains(&wrong), "{what} shows the wrong password: {text}");
    }
}
