//! Faults on Redis: a worker SIGKILLed mid-batch loses nothing, a Redis restart under a running
//! worker is survived, and passwords never appear in errors.
//!
//! The restart test runs its own `redis-server` on a free port, so the machine's Redis (used by
//! the other tests in parallel) is never stopped. The crash test runs this binary again as the
//! worker process (`TROUPE_REDIS_ROLE`).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use troupe_core::{Actor, ActorError, ActorOptions, App, Broker};
use troupe_redis::{RedisBroker, RedisOptions};
use troupe_worker::Worker;

const QUEUE: &str = "faults";

fn url() -> String {
    std::env::var("TROUPE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Counts its runs per argument in the hash `<namespace>:processed`.
struct Record;

impl Actor for Record {
    type Args = (u64,);
    type Output = ();
    fn name(&self) -> &str {
        "record"
    }
    fn options(&self) -> ActorOptions {
        ActorOptions::new().queue_name(QUEUE)
    }
    async fn call(&self, (n,): (u64,)) -> Result<(), ActorError> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let ns = std::env::var("TROUPE_REDIS_NS").map_err(|e| ActorError::msg(e.to_string()))?;
        let client = redis::Client::open(url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let _: i64 = redis::cmd("HINCRBY")
            .arg(format!("{ns}:processed"))
            .arg(n)
            .arg(1)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

fn options(ns: &str) -> RedisOptions {
    RedisOptions::from_url(&url())
        .unwrap()
        .namespace(ns)
        .heartbeat_timeout(Duration::from_secs(1))
        .maintenance_interval(Duration::from_millis(200))
}

/// The worker process of the crash test.
#[test]
fn child() {
    if std::env::var("TROUPE_REDIS_ROLE").is_err() {
        return;
    }
    let ns = std::env::var("TROUPE_REDIS_NS").unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async move {
        let broker = RedisBroker::open(options(&ns)).await.unwrap();
        let app = App::builder(Arc::new(broker)).actor(Record).build().unwrap();
        let _worker = Worker::builder(app).concurrency(4).start().await.unwrap();
        std::future::pending::<()>().await;
    });
}

fn spawn_worker(ns: &str) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["child", "--exact", "--nocapture", "--test-threads", "1"])
        .env("TROUPE_REDIS_ROLE", "worker")
        .env("TROUPE_REDIS_NS", ns)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn processed(ns: &str) -> HashMap<u64, u64> {
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("HGETALL")
        .arg(format!("{ns}:processed"))
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn wait_processed(ns: &str, n: usize, timeout: Duration) -> HashMap<u64, u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let p = processed(ns).await;
        if p.len() >= n || Instant::now() > deadline {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_loses_nothing() {
    const N: u64 = 300;
    let ns = format!("troupe-crash-{}", uuid::Uuid::new_v4().simple());
    let broker = RedisBroker::open(options(&ns)).await.unwrap();
    let app = App::builder(Arc::new(broker.clone())).actor(Record).build().unwrap();
    for n in 0..N {
        app.send(&Record, (n,)).await.unwrap();
    }
    let mut first = spawn_worker(&ns);
    let before = wait_processed(&ns, 60, Duration::from_secs(30)).await;
    assert!(before.len() >= 60, "the first worker ran {}", before.len());
    first.kill().unwrap();
    first.wait().unwrap();
    let in_flight = broker.stats(QUEUE).await.unwrap().in_flight;
    let mut second = spawn_worker(&ns);
    let done = wait_processed(&ns, usize::try_from(N).unwrap(), Duration::from_secs(60)).await;
    second.kill().unwrap();
    second.wait().unwrap();
    let missing: Vec<u64> = (0..N).filter(|n| !done.contains_key(n)).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    let duplicates: u64 = done.values().map(|c| c - 1).sum();
    eprintln!(
        "Redis SIGKILL crash test: {N} messages, {} run before the kill, {in_flight} in flight at the kill, {duplicates} run twice, none lost",
        before.len()
    );
    assert!(
        duplicates <= 8,
        "only the killed worker's prefetch window can run twice: {duplicates}"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_redis(port: u16) -> Child {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (it is on the project's machines)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

struct Count(Arc<std::sync::atomic::AtomicUsize>);

impl Actor for Count {
    type Args = ();
    type Output = ();
    fn name(&self) -> &str {
        "count"
    }
    fn options(&self) -> ActorOptions {
        ActorOptions::new().queue_name(QUEUE)
    }
    async fn call(&self, (): ()) -> Result<(), ActorError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_survives_a_redis_restart() {
    let port = free_port();
    let mut server = start_redis(port);
    let options = RedisOptions::from_url(&format!("redis://127.0.0.1:{port}/0"))
        .unwrap()
        .heartbeat_timeout(Duration::from_secs(2))
        .maintenance_interval(Duration::from_millis(200));
    let broker = RedisBroker::open(options).await.unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = App::builder(Arc::new(broker.clone()))
        .actor(Count(Arc::clone(&count)))
        .build()
        .unwrap();
    let worker = Worker::builder(app.clone())
        .concurrency(2)
        .fetch_timeout(Duration::from_millis(200))
        .start()
        .await
        .unwrap();
    app.send(&Count(Arc::clone(&count)), ()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count.load(std::sync::atomic::Ordering::SeqCst) < 1 {
        assert!(Instant::now() < deadline, "processed before the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    server.kill().unwrap();
    server.wait().unwrap();
    // While Redis is down, sends fail with a connection error (not a panic, not a hang).
    let err = app.send(&Count(Arc::clone(&count)), ()).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut server = start_redis(port);
    let deadline = Instant::now() + Duration::from_secs(20);
    let sent = loop {
        match app.send(&Count(Arc::clone(&count)), ()).await {
            Ok(sent) => break sent,
            Err(e) => {
                assert!(Instant::now() < deadline, "could not send after the restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while count.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "the worker did not resume after the restart ({sent:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await;
    server.kill().unwrap();
    server.wait().unwrap();
}

#[tokio::test]
async fn passwords_never_appear_in_errors() {
    let port = free_port();
    let err = RedisBroker::connect(&format!("redis://:hunter2secret@127.0.0.1:{port}/0?connect_timeout=1s"))
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("hunter2secret"), "{text}");
    let options = RedisOptions::from_url("redis://:hunter2secret@127.0.0.1:1/0").unwrap();
    assert!(!format!("{options:?}").contains("hunter2secret"));
    assert!(err.to_string().contains("cannot connect to Redis"), "{err}");
    assert!(!err.to_string().contains('\n'));
}
