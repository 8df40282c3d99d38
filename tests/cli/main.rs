//! The worker's command line: flags, exit codes and signals, tested on a real child process.
//!
//! The test binary runs itself as the child (`TROUPE_CLI_CHILD=1`, filtered to the `child`
//! test), so no other binary needs building.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use troupe::prelude::*;
use troupe::worker::WorkerArgs;

#[troupe::actor(queue_name = "cli")]
async fn nap(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
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
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let code = runtime.block_on(async move {
        let args = match <WorkerArgs as clap::Parser>::try_parse_from(&args) {
            Ok(args) => args,
            Err(e) => {
                eprintln!("{e}");
                return 2;
            }
        };
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
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child", "--exact", "--nocapture", "--test-threads", "1"])
        .env("TROUPE_CLI_CHILD", "1")
        .env("TROUPE_CLI_ARGS", args)
        .env_remove("TROUPE_BROKER_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(ms) = nap {
        cmd.env("TROUPE_CLI_NAP", ms.to_string());
    }
    cmd.spawn().unwrap()
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
